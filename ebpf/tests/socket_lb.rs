//! Root tests of the socket load balancer on the kernel, in namespaces and a dedicated test
//! cgroup (never the host's root cgroup), with a private bpffs instance. Skipped, with a
//! message, when not root or when the kernel lacks the hooks.
//!
//! Bed: namespace `cli` (10.244.1.2/24) ── veth ── namespace `srv` (10.244.1.3/24 and
//! 10.244.1.4/24, python servers answering with their name). There is no route for
//! 10.96.0.0/12 anywhere: reaching a ClusterIP at all proves connect()/sendmsg() were
//! rewritten.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
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
use common::{TestBpffs, CLIENT_PY};

const SERVER_PY: &str = r#"
import socket, sys, socketserver
proto, ip, port, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if proto == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, port))
    while True:
        d, a = s.recvfrom(100)
        s.sendto(name.encode(), a)
else:
    class H(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.sendall(name.encode())
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer((ip, port), H).serve_forever()
"#;


/// A cgroup v2 child created for one test; processes are moved out and it is removed on drop.
struct TestCgroup {
    path: PathBuf,
    root: PathBuf,
}

impl TestCgroup {
    fn new() -> Result<TestCgroup> {
        let root = netd_ebpf::default_cgroup();
        let path = root.join(format!("netd-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(TestCgroup { path, root })
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Anything still inside goes back to the root (it is only a test client).
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.path) {
            eprintln!("cannot remove test cgroup {}: {e}", self.path.display());
        }
    }
}


struct Bed {
    // Field order is drop order: the backend (pins) first, then bpffs, cgroup, namespaces.
    backend: Option<EbpfBackend>,
    bpffs: TestBpffs,
    cgroup: TestCgroup,
    cli: Netns,
    srv: Netns,
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
    netd_ebpf::probe().err()
}

macro_rules! bed_or_skip {
    () => {{
        if let Some(why) = skip() {
            eprintln!("SKIPPED: eBPF socket LB test needs root and a kernel with cgroup sock_addr hooks: {why}");
            return Ok(());
        }
        Bed::new()?
    }};
}

impl Bed {
    fn new() -> Result<Bed> {
        let cli = Netns::new("ebpf-cli")?;
        let srv = Netns::new("ebpf-srv")?;
        let (a, b) = (format!("ve{}c", N.fetch_add(1, Ordering::Relaxed)), format!("ve{}s", N.fetch_add(1, Ordering::Relaxed)));
        let a = format!("{a}{}", std::process::id() % 100000);
        let b = format!("{b}{}", std::process::id() % 100000);
        cli.ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
        cli.ip(&["link", "set", &b, "netns", srv.name()])?;
        cli.ip(&["addr", "add", "10.244.1.2/24", "dev", &a])?;
        cli.ip(&["link", "set", &a, "up"])?;
        srv.ip(&["addr", "add", "10.244.1.3/24", "dev", &b])?;
        srv.ip(&["addr", "add", "10.244.1.4/24", "dev", &b])?;
        srv.ip(&["link", "set", &b, "up"])?;
        let scripts = std::env::temp_dir().join(format!("netd-ebpf-py-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&scripts)?;
        std::fs::write(scripts.join("server.py"), SERVER_PY)?;
        std::fs::write(scripts.join("client.py"), CLIENT_PY)?;
        let bpffs = TestBpffs::new()?;
        let cgroup = TestCgroup::new()?;
        let mut bed = Bed { backend: None, bpffs, cgroup, cli, srv, scripts };
        bed.backend = Some(EbpfBackend::new(bed.config())?);
        for (proto, ip, port, name) in [("tcp", "10.244.1.3", "8080", "A"), ("tcp", "10.244.1.4", "8080", "B"), ("udp", "10.244.1.3", "5353", "UA"), ("udp", "10.244.1.4", "5353", "UB")] {
            let py = bed.scripts.join("server.py");
            bed.srv.spawn(&["python3", py.to_str().unwrap(), proto, ip, port, name], None)?;
        }
        // Wait for the servers (directly, not through a service).
        netd_tests::wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            Ok(bed.client_outside("tcp", "10.244.1.3", 8080)?.starts_with("OK") && bed.client_outside("tcp", "10.244.1.4", 8080)?.starts_with("OK"))
        })?;
        Ok(bed)
    }

    fn config(&self) -> EbpfConfig {
        EbpfConfig { bpffs_dir: self.bpffs.dir(), mount_bpffs: false, cgroup: Some(self.cgroup.path.clone()), ..Default::default() }
    }

    fn backend(&mut self) -> &mut EbpfBackend {
        self.backend.as_mut().unwrap()
    }

    /// Runs the client in `cli` AND in the test cgroup.
    fn client(&self, proto: &str, host: &str, port: u16) -> Result<String> {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {} python3 {} {proto} {host} {port}",
            self.cgroup.path.display(),
            self.cli.name(),
            self.scripts.join("client.py").display()
        );
        let out = Command::new("sh").args(["-c", &script]).output()?;
        anyhow::ensure!(out.status.success(), "client: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    /// The same client in `cli` but outside the test cgroup.
    fn client_outside(&self, proto: &str, host: &str, port: u16) -> Result<String> {
        let py = self.scripts.join("client.py");
        let out = self.cli.run(&["python3", py.to_str().unwrap(), proto, host, &port.to_string()])?;
        Ok(out.trim().to_string())
    }
}

fn ep(ip: [u8; 4], port: u16) -> Endpoint {
    Endpoint { ip: Ipv4Addr::from(ip), port, local: true, ready: true, serving: true, terminating: false }
}

fn service(name: &str, vip: [u8; 4], port: u16, proto: Proto, eps: Vec<Endpoint>, affinity: Option<u32>) -> ServicePortPlan {
    ServicePortPlan {
        slug: ServicePortKey { service: NsName { namespace: "default".into(), name: name.into() }, port_name: String::new(), proto }.slug(port).into(),
        key: ServicePortKey { service: NsName { namespace: "default".into(), name: name.into() }, port_name: String::new(), proto },
        port,
        cluster_ip: Some(Ipv4Addr::from(vip)),
        external_ips: vec![],
        lb_ips: vec![],
        node_port: None,
        affinity_timeout: affinity,
        external_local: false,
        internal_local: false,
        health_check_node_port: None,
        source_ranges: Vec::new(),
        lists_cluster_ip: true,
        local_endpoints: eps.clone(),
        cluster_endpoints: eps,
    }
}

fn plan(sps: Vec<ServicePortPlan>) -> Plan {
    let mut p = Plan::default();
    p.node = NodeInfo { name: "node-1".into(), ..Default::default() };
    for s in sps {
        p.services.insert(s.key.clone(), Arc::new(s));
    }
    p
}

fn two_backends(affinity: Option<u32>) -> Plan {
    plan(vec![
        service("web", [10, 96, 0, 10], 80, Proto::Tcp, vec![ep([10, 244, 1, 3], 8080), ep([10, 244, 1, 4], 8080)], affinity),
        service("dns", [10, 96, 0, 10], 53, Proto::Udp, vec![ep([10, 244, 1, 3], 5353), ep([10, 244, 1, 4], 5353)], affinity),
        service("empty", [10, 96, 0, 11], 80, Proto::Tcp, vec![], None),
    ])
}

#[test]
fn tcp_cluster_ip_reaches_a_backend_and_the_peer_is_the_vip() -> Result<()> {
    let mut bed = bed_or_skip!();
    bed.backend().sync_plan(&two_backends(None), false)?;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let out = bed.client("tcp", "10.96.0.10", 80)?;
        let f: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(f.first(), Some(&"OK"), "{out}");
        assert_eq!(&f[2..], ["10.96.0.10", "80"], "getpeername shows the service: {out}");
        seen.insert(f[1].to_string());
    }
    assert_eq!(seen.len(), 2, "both backends used over 30 connections: {seen:?}");
    // Outside the test cgroup nothing is translated (and there is no route to 10.96/12).
    assert!(bed.client_outside("tcp", "10.96.0.10", 80)?.starts_with("ERR"));
    Ok(())
}

#[test]
fn udp_reply_appears_to_come_from_the_vip() -> Result<()> {
    let mut bed = bed_or_skip!();
    bed.backend().sync_plan(&two_backends(None), false)?;
    let out = bed.client("udp", "10.96.0.10", 53)?;
    let f: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(f.first(), Some(&"OK"), "{out}");
    assert!(f[1] == "UA" || f[1] == "UB", "{out}");
    assert_eq!(&f[2..], ["10.96.0.10", "53"], "recvfrom shows the service: {out}");
    Ok(())
}

#[test]
fn service_without_endpoints_is_refused_at_once() -> Result<()> {
    let mut bed = bed_or_skip!();
    bed.backend().sync_plan(&two_backends(None), false)?;
    assert_eq!(bed.client("tcp", "10.96.0.11", 80)?, format!("ERR {}", libc::ECONNREFUSED));
    Ok(())
}

#[test]
fn session_affinity_sticks_to_one_backend() -> Result<()> {
    let mut bed = bed_or_skip!();
    bed.backend().sync_plan(&two_backends(Some(10800)), false)?;
    let first = bed.client("tcp", "10.96.0.10", 80)?;
    assert!(first.starts_with("OK"), "{first}");
    for _ in 0..15 {
        assert_eq!(bed.client("tcp", "10.96.0.10", 80)?, first);
    }
    Ok(())
}

#[test]
fn endpoint_changes_apply_and_a_restart_keeps_serving() -> Result<()> {
    let mut bed = bed_or_skip!();
    let only_b = plan(vec![service("web", [10, 96, 0, 10], 80, Proto::Tcp, vec![ep([10, 244, 1, 4], 8080)], None)]);
    bed.backend().sync_plan(&two_backends(None), false)?;
    let r = bed.backend().sync_plan(&only_b, false)?;
    // web: slot 1 rewritten, count 2→1, slot 2 deleted; dns: 1 + 2 slots; empty: 1.
    assert!(r.changed && r.size == 7, "small diff: {r:?}");
    for _ in 0..5 {
        assert_eq!(bed.client("tcp", "10.96.0.10", 80)?, "OK B 10.96.0.10 80");
    }
    // "Restart": drop the backend without removing anything; the pinned links and maps
    // keep serving, and a new instance adopts them with nothing to write.
    drop(bed.backend.take());
    assert_eq!(bed.client("tcp", "10.96.0.10", 80)?, "OK B 10.96.0.10 80");
    bed.backend = Some(EbpfBackend::new(bed.config())?);
    let r = bed.backend().sync_plan(&only_b, true)?;
    assert!(r.observed && !r.changed, "adopted as is: {r:?}");
    assert_eq!(bed.client("tcp", "10.96.0.10", 80)?, "OK B 10.96.0.10 80");
    // Service removed: nothing is translated any more.
    bed.backend().sync_plan(&plan(vec![]), false)?;
    assert!(bed.client("tcp", "10.96.0.10", 80)?.starts_with("ERR"));
    Ok(())
}

