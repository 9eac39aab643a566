//! Root tests of the tc NodePort programs on the kernel, in namespaces and a private bpffs
//! (nothing attached outside the namespaces this test creates). Skipped, with a message, when
//! not root or when the kernel lacks TCX or the programs' helpers.
//!
//! Bed: `out` (198.18.0.1, the client outside the cluster) ── veth ── `node` (d0 198.18.0.10,
//! forwarding) ── veth ── `pod` (10.244.1.3, TCP and UDP servers answering with their name
//! and the client address they see). The backend is on the node: DNAT only, the client
//! address is kept, replies get the NodePort back as their source on d0's egress.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use netd_ebpf::{EbpfBackend, EbpfConfig};
use netd_proxy::model::{ServicePortKey, ServicePortPlan};
use netd_proxy::{Endpoint, NodeInfo, NsName, Plan, Proto};
use netd_tests::Netns;

static N: AtomicU32 = AtomicU32::new(0);

mod common;
use common::{in_ns, TestBpffs, CLIENT_PY};

const SERVER_PY: &str = r#"
import socket, sys, socketserver, threading
ip, name = sys.argv[1], sys.argv[2]
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, 5353))
    while True:
        d, a = s.recvfrom(100)
        s.sendto(("%s %s" % (name, a[0])).encode(), a)
threading.Thread(target=udp, daemon=True).start()
class H(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(("%s %s" % (name, self.client_address[0])).encode())
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer((ip, 8080), H).serve_forever()
"#;



struct Bed {
    // Drop order: the backend (pins) first, then the bpffs, then the namespaces.
    backend: Option<EbpfBackend>,
    bpffs: TestBpffs,
    out: Netns,
    node: Netns,
    _pod: Netns,
    /// A pod "on another node", behind the node's "overlay" device ov0 (a veth here), which
    /// has the node's overlay address 10.244.1.0 (the SNAT address).
    _remote: Netns,
    scripts: PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(mut b) = self.backend.take() {
            if let Err(e) = b.remove_all() {
                eprintln!("removing the eBPF dataplane: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.scripts);
    }
}

fn skip() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    netd_ebpf::probe().and_then(|()| netd_ebpf::probe_tc()).err()
}

macro_rules! bed_or_skip {
    () => {{
        if let Some(why) = skip() {
            eprintln!("SKIPPED: eBPF NodePort test needs root and a kernel with TCX and the tc helpers: {why}");
            return Ok(());
        }
        Bed::new()?
    }};
}

impl Bed {
    fn new() -> Result<Bed> {
        let out = Netns::new("np-out")?;
        let node = Netns::new("np-node")?;
        let pod = Netns::new("np-pod")?;
        node.run(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
        node.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "eth0", "netns", out.name()])?;
        node.ip(&["addr", "add", "198.18.0.10/24", "dev", "d0"])?;
        node.ip(&["link", "set", "d0", "up"])?;
        out.ip(&["addr", "add", "198.18.0.1/24", "dev", "eth0"])?;
        out.ip(&["link", "set", "eth0", "up"])?;
        node.ip(&["link", "add", "vp", "type", "veth", "peer", "name", "eth0", "netns", pod.name()])?;
        node.ip(&["addr", "add", "10.244.1.1/24", "dev", "vp"])?;
        node.ip(&["link", "set", "vp", "up"])?;
        pod.ip(&["addr", "add", "10.244.1.3/24", "dev", "eth0"])?;
        pod.ip(&["addr", "add", "10.244.1.4/24", "dev", "eth0"])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        pod.ip(&["route", "add", "default", "via", "10.244.1.1"])?;
        let remote = Netns::new("np-remote")?;
        node.ip(&["link", "add", "ov0", "type", "veth", "peer", "name", "eth0", "netns", remote.name()])?;
        node.ip(&["addr", "add", "10.244.1.0/32", "dev", "ov0"])?;
        node.ip(&["link", "set", "ov0", "up"])?;
        node.ip(&["route", "add", "10.244.2.3/32", "dev", "ov0"])?;
        remote.ip(&["addr", "add", "10.244.2.3/24", "dev", "eth0"])?;
        remote.ip(&["link", "set", "eth0", "up"])?;
        remote.ip(&["route", "add", "10.244.1.0/32", "dev", "eth0"])?;
        let scripts = std::env::temp_dir().join(format!("netd-np-py-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&scripts)?;
        std::fs::write(scripts.join("server.py"), SERVER_PY)?;
        std::fs::write(scripts.join("client.py"), CLIENT_PY)?;
        let bed = Bed { backend: None, bpffs: TestBpffs::new()?, out, node, _pod: pod, _remote: remote, scripts };
        let py = bed.scripts.join("server.py");
        bed._pod.spawn(&["python3", py.to_str().unwrap(), "10.244.1.3", "A"], None)?;
        bed._pod.spawn(&["python3", py.to_str().unwrap(), "10.244.1.4", "B"], None)?;
        bed._remote.spawn(&["python3", py.to_str().unwrap(), "10.244.2.3", "R"], None)?;
        let client = bed.scripts.join("client.py");
        for ip in ["10.244.1.3", "10.244.1.4", "10.244.2.3"] {
            netd_tests::wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
                Ok(bed.node.run(&["python3", client.to_str().unwrap(), "tcp", ip, "8080"])?.starts_with("OK"))
            })
            .with_context(|| format!("the server pod answers the node directly on {ip}"))?;
        }
        Ok(bed)
    }

    fn config(&self) -> EbpfConfig {
        EbpfConfig {
            bpffs_dir: self.bpffs.dir(),
            mount_bpffs: false,
            cgroup: None,
            external_devices: vec!["d0".into()],
            overlay_device: Some("ov0".into()),
        }
    }

    fn start(&mut self) -> Result<()> {
        let cfg = self.config();
        self.backend = Some(in_ns(&self.node, move || EbpfBackend::new(cfg))?);
        Ok(())
    }

    fn backend(&mut self) -> &mut EbpfBackend {
        self.backend.as_mut().unwrap()
    }

    /// The client, outside the node.
    fn client(&self, proto: &str, host: &str, port: u16) -> Result<String> {
        let py = self.scripts.join("client.py");
        Ok(self.out.run(&["python3", py.to_str().unwrap(), proto, host, &port.to_string()])?.trim().to_string())
    }
}

fn service(name: &str, proto: Proto, port: u16, target: u16, node_port: u16, eps: Vec<Endpoint>) -> ServicePortPlan {
    let key = ServicePortKey { service: NsName { namespace: "default".into(), name: name.into() }, port_name: String::new(), proto };
    ServicePortPlan {
        slug: key.slug(port).into(),
        key,
        port,
        cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 10)),
        external_ips: vec![],
        lb_ips: vec![],
        node_port: Some(node_port),
        affinity_timeout: None,
        external_local: false,
        internal_local: false,
        health_check_node_port: None,
        source_ranges: Vec::new(),
        lists_cluster_ip: true,
        local_endpoints: eps.iter().filter(|e| e.local).cloned().collect(),
        cluster_endpoints: eps.into_iter().map(|e| Endpoint { port: target, ..e }).collect(),
    }
}

fn plan(sps: Vec<ServicePortPlan>) -> Plan {
    let mut p = Plan::default();
    p.node = NodeInfo {
        name: "node-1".into(),
        ips: vec![Ipv4Addr::new(198, 18, 0, 10)],
        pod_cidr: Some("10.244.1.0/24".parse().unwrap()),
        cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
        local_service_ips: Vec::new(),
    };
    for s in sps {
        p.services.insert(s.key.clone(), Arc::new(s));
    }
    p
}

fn local_ep(port: u16) -> Endpoint {
    local_ep_at(3, port)
}

fn local_ep_at(last: u8, port: u16) -> Endpoint {
    Endpoint { ip: Ipv4Addr::new(10, 244, 1, last), port, local: true, ready: true, serving: true, terminating: false }
}

fn web() -> Plan {
    plan(vec![
        service("web", Proto::Tcp, 80, 8080, 30080, vec![local_ep(8080)]),
        service("dns", Proto::Udp, 53, 5353, 30053, vec![local_ep(5353)]),
        service("empty", Proto::Tcp, 81, 8080, 30081, vec![]),
    ])
}

#[test]
fn node_port_reaches_a_local_backend_keeping_the_client_address() -> Result<()> {
    let mut bed = bed_or_skip!();
    bed.start()?;
    // Nothing programmed yet: nothing listens on the node's port.
    assert!(bed.client("tcp", "198.18.0.10", 30080)?.starts_with("ERR"));
    bed.backend().sync_plan(&web(), false)?;
    for _ in 0..5 {
        // The backend sees the client's own address; the client sees the NodePort answer.
        assert_eq!(bed.client("tcp", "198.18.0.10", 30080)?, "OK A 198.18.0.1 198.18.0.10 30080");
    }
    // UDP: the reply's source is reverse-translated on the way out.
    assert_eq!(bed.client("udp", "198.18.0.10", 30053)?, "OK A 198.18.0.1 198.18.0.10 30053");
    // No endpoints: left to the stack, which refuses at once.
    assert_eq!(bed.client("tcp", "198.18.0.10", 30081)?, format!("ERR {}", libc::ECONNREFUSED));
    Ok(())
}

/// The udp backend's decapsulation attached to the same device first (netd sets up the overlay
/// before the services): packets that are not its own go on to the NodePort program (a program
/// returning TC_ACT_OK would end the TCX chain there).
#[test]
fn node_port_works_behind_the_udp_fast_path_on_the_same_device() -> Result<()> {
    let mut bed = bed_or_skip!();
    bed.node.ip(&["tuntap", "add", "mode", "tun", "name", "t0"])?;
    bed.node.ip(&["link", "set", "t0", "up"])?;
    let cfg = netd_ebpf::UdpOverlayConfig {
        bpffs_dir: bed.bpffs.dir(),
        mount_bpffs: false,
        tun_device: "t0".into(),
        underlay_device: "d0".into(),
        local_ip: Ipv4Addr::new(198, 18, 0, 10),
        port: 8285,
    };
    let fast = in_ns(&bed.node, move || netd_ebpf::UdpOverlay::start(cfg))?;
    bed.start()?;
    bed.backend().sync_plan(&web(), false)?;
    assert_eq!(bed.client("tcp", "198.18.0.10", 30080)?, "OK A 198.18.0.1 198.18.0.10 30080");
    assert_eq!(bed.client("udp", "198.18.0.10", 30053)?, "OK A 198.18.0.1 198.18.0.10 30053");
    drop(fast);
    netd_ebpf::UdpOverlay::remove(&bed.bpffs.dir())?;
    Ok(())
}

#[test]
fn a_restart_swaps_the_tc_programs_in_place_and_removal_detaches_them() -> Result<()> {
    let mut bed = bed_or_skip!();
    bed.start()?;
    bed.backend().sync_plan(&web(), false)?;
    assert_eq!(bed.client("tcp", "198.18.0.10", 30080)?, "OK A 198.18.0.1 198.18.0.10 30080");
    // "Restart": the old instance goes away without removing anything; links and maps stay
    // pinned and keep translating; the new instance replaces the programs in the pinned links
    // and adopts the maps with nothing to write.
    drop(bed.backend.take());
    assert_eq!(bed.client("tcp", "198.18.0.10", 30080)?, "OK A 198.18.0.1 198.18.0.10 30080");
    bed.start()?;
    let r = bed.backend().sync_plan(&web(), true)?;
    assert!(r.observed && !r.changed, "adopted as is: {r:?}");
    assert_eq!(bed.client("tcp", "198.18.0.10", 30080)?, "OK A 198.18.0.1 198.18.0.10 30080");
    let links: Vec<String> = std::fs::read_dir(bed.bpffs.dir().join("links"))?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(links.contains(&"tc-ingress-d0".to_string()) && links.contains(&"tc-egress-d0".to_string()), "{links:?}");
    // Removal unpins the links: the port is the stack's again.
    bed.backend().remove_all()?;
    bed.backend = None;
    assert!(bed.client("tcp", "198.18.0.10", 30080)?.starts_with("ERR"));
    Ok(())
}

#[test]
fn node_port_balances_and_client_ip_affinity_sticks() -> Result<()> {
    let mut bed = bed_or_skip!();
    bed.start()?;
    let two = |affinity: Option<u32>| {
        let mut s = service("web", Proto::Tcp, 80, 8080, 30080, vec![local_ep_at(3, 8080), local_ep_at(4, 8080)]);
        s.affinity_timeout = affinity;
        plan(vec![s])
    };
    bed.backend().sync_plan(&two(None), false)?;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let out = bed.client("tcp", "198.18.0.10", 30080)?;
        assert!(out.starts_with("OK") && out.ends_with("198.18.0.1 198.18.0.10 30080"), "{out}");
        seen.insert(out);
    }
    assert_eq!(seen.len(), 2, "both backends used over 30 connections: {seen:?}");
    // sessionAffinity ClientIP: the tc programs key it by the client's address.
    bed.backend().sync_plan(&two(Some(10800)), false)?;
    let first = bed.client("tcp", "198.18.0.10", 30080)?;
    for _ in 0..15 {
        assert_eq!(bed.client("tcp", "198.18.0.10", 30080)?, first);
    }
    Ok(())
}

#[test]
fn node_port_to_a_remote_backend_is_snated_and_its_reply_reverse_natted_on_the_overlay() -> Result<()> {
    let mut bed = bed_or_skip!();
    bed.start()?;
    let remote = Endpoint { ip: Ipv4Addr::new(10, 244, 2, 3), port: 8080, local: false, ready: true, serving: true, terminating: false };
    let udp_remote = Endpoint { port: 5353, ..remote.clone() };
    bed.backend().sync_plan(
        &plan(vec![service("web", Proto::Tcp, 80, 8080, 30080, vec![remote]), service("dns", Proto::Udp, 53, 5353, 30053, vec![udp_remote])]),
        false,
    )?;
    // The backend sees the node's overlay address; the client sees the NodePort answer.
    for _ in 0..3 {
        assert_eq!(bed.client("tcp", "198.18.0.10", 30080)?, "OK R 10.244.1.0 198.18.0.10 30080");
    }
    assert_eq!(bed.client("udp", "198.18.0.10", 30053)?, "OK R 10.244.1.0 198.18.0.10 30053");
    // Closed TCP connections mark their SNAT entries closing (their ports are reusable soon);
    // SNAT ports come from the configured range.
    let map = aya::maps::MapData::from_pin(bed.bpffs.dir().join("netd_ct"))?;
    let ct: aya::maps::HashMap<_, netd_ebpf::maps::CtKey, netd_ebpf::maps::CtValue> = aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(map))?;
    let replies: Vec<(netd_ebpf::maps::CtKey, netd_ebpf::maps::CtValue)> =
        ct.iter().filter_map(|r| r.ok()).filter(|(k, _)| k.dir == netd_ebpf::maps::CT_REPLY && k.proto == 6).collect();
    assert_eq!(replies.len(), 3, "one reply entry per connection: {replies:?}");
    for (k, v) in &replies {
        let port = u16::from_be(k.dport);
        assert!((netd_ebpf::maps::SNAT_PORT_MIN..=netd_ebpf::maps::SNAT_PORT_MAX).contains(&port), "{port}");
        assert_eq!(netd_ebpf::maps::ip_from_be(k.daddr), Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(v.flags & netd_ebpf::maps::CT_F_SNAT, netd_ebpf::maps::CT_F_SNAT);
        assert_eq!(v.flags & netd_ebpf::maps::CT_F_CLOSING, netd_ebpf::maps::CT_F_CLOSING, "closed connection: {k:?} {v:?}");
    }
    Ok(())
}
