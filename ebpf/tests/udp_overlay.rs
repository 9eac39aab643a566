//! Root tests of the udp overlay fast path (`bpf/udp_overlay.c`) on the kernel, in namespaces
//! and a private bpffs. Skipped, with a message, when not root or without TCX (Linux < 6.6).
//!
//! Bed: nodes `a` (198.18.0.1) and `b` (198.18.0.2) on one veth pair (the underlay `u0`), each
//! with a TUN device `t0`, the overlay address 10.244.N.0/32 on it, the route 10.244.0.0/16 via
//! it, and a "pod" address 10.244.N.5 on `lo`. The TUN device is either the userspace datapath's
//! (`netd-udp`, which takes what the programs leave to it, as in netd) or one with no process
//! attached (`ip tuntap`): then whatever arrives went through the programs.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use netd_ebpf::{UdpOverlay, UdpOverlayConfig, UdpPeerEntry};
use netd_tests::Netns;

mod common;
use common::{in_ns, TestBpffs};

const PORT: u16 = 8285;

struct Node {
    // Drop order: the fast path's pins, the userspace datapath, the bpffs, the namespace.
    fast: Option<UdpOverlay>,
    user: Option<netd_udp::UdpDatapath>,
    bpffs: TestBpffs,
    ns: Netns,
    ip: &'static str,
    pod: &'static str,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.fast = None;
        if let Err(e) = UdpOverlay::remove(&self.bpffs.dir()) {
            eprintln!("removing the udp fast path: {e}");
        }
    }
}

impl Node {
    fn new(role: &str, ip: &'static str, pod: &'static str) -> Result<Node> {
        Ok(Node { fast: None, user: None, bpffs: TestBpffs::new()?, ns: Netns::new(role)?, ip, pod })
    }

    /// The TUN device (the userspace datapath's, or a bare one), its address and the route.
    fn overlay(&mut self, n: u8, userspace: bool) -> Result<()> {
        if userspace {
            let cfg = netd_udp::UdpConfig { tun_name: "t0".into(), mtu: 1472, local_ip: self.ip.parse()?, port: PORT, workers: 1, ..Default::default() };
            self.user = Some(in_ns(&self.ns, move || netd_udp::UdpDatapath::start(cfg))?);
        } else {
            self.ns.ip(&["tuntap", "add", "mode", "tun", "name", "t0"])?;
            self.ns.ip(&["link", "set", "t0", "mtu", "1472", "up"])?;
        }
        self.ns.ip(&["addr", "add", &format!("10.244.{n}.0/32"), "dev", "t0"])?;
        self.ns.ip(&["route", "add", "10.244.0.0/16", "dev", "t0"])?;
        self.ns.ip(&["addr", "add", &format!("{}/32", self.pod), "dev", "lo"])?;
        self.ns.ip(&["link", "set", "lo", "up"])?;
        Ok(())
    }

    fn config(&self) -> UdpOverlayConfig {
        UdpOverlayConfig {
            bpffs_dir: self.bpffs.dir(),
            mount_bpffs: false,
            tun_device: "t0".into(),
            underlay_device: "u0".into(),
            local_ip: self.ip.parse().unwrap(),
            port: PORT,
        }
    }

    fn start(&mut self) -> Result<()> {
        let cfg = self.config();
        self.fast = Some(in_ns(&self.ns, move || UdpOverlay::start(cfg))?);
        Ok(())
    }

    fn fast(&mut self) -> &mut UdpOverlay {
        self.fast.as_mut().expect("started")
    }

    fn ping(&self, to: &str) -> bool {
        self.ns.run(&["ping", "-c", "1", "-W", "1", "-I", self.pod, to]).is_ok()
    }
}

fn skip() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    (!netd_ebpf::has_tcx()).then(|| "kernel without TCX (Linux < 6.6)".into())
}

fn bed(userspace: bool) -> Result<Option<(Node, Node)>> {
    if let Some(why) = skip() {
        eprintln!("SKIPPED: udp overlay fast path test needs root and TCX: {why}");
        return Ok(None);
    }
    let mut a = Node::new("udpf-a", "198.18.0.1", "10.244.1.5")?;
    let mut b = Node::new("udpf-b", "198.18.0.2", "10.244.2.5")?;
    a.ns.ip(&["link", "add", "u0", "type", "veth", "peer", "name", "u0", "netns", b.ns.name()])?;
    for n in [&a, &b] {
        n.ns.ip(&["addr", "add", &format!("{}/24", n.ip), "dev", "u0"])?;
        n.ns.ip(&["link", "set", "u0", "up"])?;
    }
    a.overlay(1, userspace)?;
    b.overlay(2, userspace)?;
    Ok(Some((a, b)))
}

/// `of` as a (netd) peer, which takes super-packets.
fn peers(of: &Node) -> Vec<UdpPeerEntry> {
    let n: u8 = if of.ip.ends_with(".1") { 1 } else { 2 };
    vec![UdpPeerEntry { net: [10, 244, n, 0].into(), prefix_len: 24, ip: of.ip.parse().unwrap(), super_packets: true }]
}

/// Both nodes' userspace datapaths know each other.
fn user_peers(a: &Node, b: &Node) {
    for (n, other) in [(a, b), (b, a)] {
        let p = &peers(other)[0];
        let net = ipnet::Ipv4Net::new(p.net, p.prefix_len).unwrap();
        n.user.as_ref().expect("userspace datapath").set_peers(&[(net, p.ip)]);
    }
}

/// 50 MB of TCP from a's pod to b's pod on `port`, every byte checked (length and sha256).
fn bulk_tcp(a: &Node, b: &Node, port: u16) -> Result<()> {
    let recv = format!(
        "import socket, hashlib\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{}', {port})); s.listen(1); s.settimeout(20); c, _ = s.accept(); c.settimeout(20); h = hashlib.sha256(); n = 0\n\
         while True:\n    d = c.recv(1 << 20)\n    if not d: break\n    h.update(d); n += len(d)\nprint(n, h.hexdigest())",
        b.pod
    );
    let send = format!(
        "import socket, hashlib\nblock = bytes(range(256)) * 4096\nh = hashlib.sha256()\nfor _ in range(50): h.update(block)\n\
         s = socket.create_connection(('{}', {port}), timeout=20, source_address=('{}', 0))\n\
         for _ in range(50): s.sendall(block)\ns.close()\nprint(50 * len(block), h.hexdigest())",
        b.pod, a.pod
    );
    let server = b.ns.command(&["python3", "-c", &recv]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let sent = a.ns.run(&["python3", "-c", &send]).context("bulk TCP sender over the fast path")?;
    let got = server.wait_with_output()?;
    let got_s = String::from_utf8_lossy(&got.stdout);
    anyhow::ensure!(got_s.trim() == sent.trim(), "bulk TCP: received {:?} vs sent {:?} (len, sha256); stderr {}", got_s.trim(), sent.trim(), String::from_utf8_lossy(&got.stderr));
    Ok(())
}

/// With netd's userspace datapath beside them, as netd runs them: small packets both ways in
/// the kernel, a bulk TCP transfer encapsulated in the kernel as super-packets and taken apart
/// by the receiver's userspace datapath (every byte checked), then a restart and a removal.
#[test]
fn carries_ping_and_tcp_both_ways_then_survives_a_restart() -> Result<()> {
    let Some((mut a, mut b)) = bed(true)? else { return Ok(()) };
    user_peers(&a, &b);
    assert!(a.ping(b.pod), "the userspace datapath alone carries a ping");
    a.start()?;
    b.start()?;
    let (pa, pb) = (peers(&b), peers(&a));
    assert_eq!(a.fast().set_peers(&pa)?, 2, "one peer, one source");
    assert_eq!(b.fast().set_peers(&pb)?, 2);
    assert_eq!(a.fast().set_peers(&pa)?, 0, "setting the same peers again writes nothing");
    let user_b = b.user.as_ref().unwrap().stats().packets_in;
    assert!(a.ping(b.pod), "ping a -> b over the fast path");
    assert!(b.ping(a.pod), "ping b -> a over the fast path");
    let (sa, sb) = (a.fast().stats()?, b.fast().stats()?);
    assert!(sa.encap_packets >= 2 && sa.decap_packets >= 2, "a's counters: {sa:?}");
    assert!(sb.encap_packets >= 2 && sb.decap_packets >= 2, "b's counters: {sb:?}");
    assert_eq!(b.user.as_ref().unwrap().stats().packets_in, user_b, "the pings went through the kernel only");

    // Bulk TCP: GSO super-packets encapsulated whole (the veth hands them over unsegmented),
    // left by b's program to b's userspace datapath, which writes them to the TUN device as GSO
    // packets; the receiver checks every byte.
    bulk_tcp(&a, &b, 9000)?;
    let (sa, sb) = (a.fast().stats()?, b.fast().stats()?);
    eprintln!("after the bulk transfer: a {sa:?} ({} inner bytes per encapsulation); b {sb:?}; b userspace {:?}", sa.encap_bytes / sa.encap_packets.max(1), b.user.as_ref().unwrap().stats());
    assert_eq!(sa.encap_errors, 0);
    assert!(sa.encap_bytes > 50 * 1024 * 1024, "a encapsulated the transfer in the kernel: {sa:?}");
    assert!(sb.decap_bulk > 0, "b left the super-packets to userspace: {sb:?}");

    // What a real NIC does: the sender's underlay cuts the encapsulated super-packets into
    // datagrams (software UDP-tunnel GSO here: the feature turned off on a's veth); b then gets
    // single datagrams, and decapsulates them in the kernel.
    a.ns.run(&["ethtool", "-K", "u0", "tx-udp_tnl-segmentation", "off", "tx-udp_tnl-csum-segmentation", "off"])?;
    let before = b.fast().stats()?;
    bulk_tcp(&a, &b, 9001)?;
    let after = b.fast().stats()?;
    assert!(after.decap_bytes - before.decap_bytes > 50 * 1024 * 1024, "b decapsulated the segmented transfer in the kernel: {after:?}");

    // Restart: the programs stay attached while nobody holds them, and a new start adopts
    // the pinned maps and links.
    a.fast = None;
    let before = a.ns.run(&["cat", "/sys/class/net/u0/statistics/tx_packets"])?;
    assert!(a.ping(b.pod), "traffic must flow while netd is away");
    a.start()?;
    assert_eq!(a.fast().set_peers(&pa)?, 0, "the pinned peers were adopted");
    assert!(a.ping(b.pod), "after the restart");
    assert_ne!(before, a.ns.run(&["cat", "/sys/class/net/u0/statistics/tx_packets"])?);
    let links = std::fs::read_dir(a.bpffs.dir().join("links"))?.count();
    assert_eq!(links, 2, "one encap and one decap link, not one more per start");

    // Removal hands everything back to the userspace datapath.
    a.fast = None;
    UdpOverlay::remove(&a.bpffs.dir())?;
    assert!(!UdpOverlay::is_pinned(&a.bpffs.dir()));
    // The kernel lets go of an unpinned link after an RCU grace period, and the workers publish
    // their counters in batches: ping until the userspace datapath has sent one.
    let user_a = a.user.as_ref().unwrap().stats().packets_out;
    netd_tests::wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        Ok(a.ping(b.pod) && a.user.as_ref().unwrap().stats().packets_out > user_a)
    })
    .context("after the removal, the userspace datapath carries a ping")?;
    Ok(())
}

#[test]
fn unknown_sources_and_destinations_are_left_to_userspace() -> Result<()> {
    let Some((mut a, mut b)) = bed(false)? else { return Ok(()) };
    a.start()?;
    b.start()?;
    // b knows a's subnet, but a does not accept b as a source.
    b.fast().set_peers(&peers(&a))?;
    a.fast().set_peers(&[])?;
    let before = a.fast().stats()?;
    assert!(!b.ping(a.pod), "a must not decapsulate from a source that is not a peer");
    let after = a.fast().stats()?;
    assert!(after.decap_passed > before.decap_passed, "the datagram was left to userspace: {after:?}");
    assert_eq!(after.decap_packets, before.decap_packets);
    // A peer that does not decapsulate in the kernel (flanneld): everything to it goes
    // through the userspace datapath (absent here), nothing through the programs.
    let mut flannel_like = peers(&a);
    flannel_like[0].super_packets = false;
    b.fast().set_peers(&flannel_like)?;
    let before = b.fast().stats()?;
    assert!(!b.ping(a.pod));
    let after = b.fast().stats()?;
    assert!(after.encap_passed > before.encap_passed && after.encap_packets == before.encap_packets, "{after:?}");
    b.fast().set_peers(&peers(&a))?;
    // No peer for the destination: left to the TUN queue (userspace drops and counts it).
    let before = a.fast().stats()?;
    assert!(!a.ping("10.244.9.9"));
    let after = a.fast().stats()?;
    assert!(after.encap_passed > before.encap_passed, "{after:?}");
    assert_eq!(after.encap_packets, before.encap_packets);
    // A peer removed by set_peers stops being one.
    a.fast().set_peers(&peers(&b))?;
    assert!(b.ping(a.pod));
    a.fast().set_peers(&[])?;
    assert!(!b.ping(a.pod), "a peer removed from the leases is still accepted");
    Ok(())
}

/// flannel's wire format: a plain UDP socket on the peer's port 8285 receives the inner IPv4
/// packet as the whole payload, from source port 8285.
#[test]
fn wire_format_is_flannel_udp() -> Result<()> {
    let Some((mut a, b)) = bed(false)? else { return Ok(()) };
    a.start()?;
    a.fast().set_peers(&peers(&b))?;
    let py = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("198.18.0.2", 8285))
s.settimeout(5)
d, src = s.recvfrom(65535)
print(src[0], src[1], len(d), d[0] >> 4, (d[2] << 8) | d[3], d[9], ".".join(map(str, d[12:16])), ".".join(map(str, d[16:20])))
"#;
    let mut child = b.ns.command(&["python3", "-c", py]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    // Until the receiver (which may start slowly on a busy machine) has taken one.
    for _ in 0..40 {
        let _ = a.ping(b.pod);
        if child.try_wait()?.is_some() {
            break;
        }
    }
    let out = child.wait_with_output()?;
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let f: Vec<&str> = line.split(' ').collect();
    assert_eq!(f.len(), 8, "receiver printed {line:?}, stderr {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(&f[..2], ["198.18.0.1", "8285"], "outer source address and port");
    assert_eq!(f[2], f[4], "the payload is exactly one inner packet (its total length)");
    assert_eq!(&f[3..4], ["4"]);
    assert_eq!(f[5], "1", "ICMP inside");
    assert_eq!(&f[6..], ["10.244.1.5", "10.244.2.5"]);
    Ok(())
}
