//! Shared by the integration tests and the `pair` example: two namespaces
//! joined by a veth, running code inside a namespace from this process,
//! iperf3 runs.
#![allow(dead_code)]

use anyhow::{bail, Context, Result};
use netd_tests::Netns;
use netd_udp::{UdpConfig, UdpDatapath};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Underlay addresses (198.18.0.0/15 only) of the two nodes.
pub const UNDERLAY_A: &str = "198.18.2.1";
pub const UNDERLAY_B: &str = "198.18.2.2";
/// Overlay (pod network) addresses: each node's subnet and the address
/// of its TUN device (the subnet's network address, as flannel does).
pub const SUBNET_A: &str = "10.244.1.0/24";
pub const SUBNET_B: &str = "10.244.2.0/24";
pub const TUN_ADDR_A: &str = "10.244.1.0";
pub const TUN_ADDR_B: &str = "10.244.2.0";
pub const NETWORK: &str = "10.244.0.0/16";
pub const TUN: &str = "netd-udp0";

/// Runs `f` on a thread that has joined `ns`'s network namespace. Sockets
/// and TUN devices created there stay in that namespace whatever thread
/// uses them later.
pub fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/var/run/netns/{}", ns.name());
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            // SAFETY: setns on a valid namespace fd; it only changes this
            // (short-lived) thread's network namespace.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread panicked")
    })
}

/// Turns GRO on for `dev` in `ns` (`ethtool -K dev gro on`, via the
/// ioctl): on a veth that also switches on its NAPI receive path, which is
/// what makes UDP GRO (and VXLAN GRO) happen, as on any real NIC.
pub fn enable_gro(ns: &Netns, dev: &str) -> Result<()> {
    const ETHTOOL_SGRO: u32 = 0x2c;
    in_netns(ns, || {
        #[repr(C)]
        struct EthtoolValue {
            cmd: u32,
            data: u32,
        }
        let mut v = EthtoolValue {
            cmd: ETHTOOL_SGRO,
            data: 1,
        };
        // SAFETY: plain socket(2) call; closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: all-zero is a valid ifreq.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(dev.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_data = &mut v as *mut EthtoolValue as *mut libc::c_char;
        // SAFETY: SIOCETHTOOL with an ifreq whose ifr_data points at a live
        // ethtool_value, as ETHTOOL_SGRO expects.
        let r = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL as _, &mut req as *mut libc::ifreq) };
        let err = std::io::Error::last_os_error();
        // SAFETY: `fd` is ours and closed once.
        unsafe { libc::close(fd) };
        if r < 0 {
            bail!("ETHTOOL_SGRO on {dev}: {err}");
        }
        Ok(())
    })
}

/// Two namespaces `a` and `b` joined by a veth `eth0` with the underlay
/// addresses. Field order is drop order.
pub struct Pair {
    pub a: Netns,
    pub b: Netns,
}

impl Pair {
    pub fn new(tag: &str) -> Result<Pair> {
        netd_tests::reap_stale_namespaces();
        let a = Netns::new(&format!("{tag}-a"))?;
        let b = Netns::new(&format!("{tag}-b"))?;
        a.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            b.name(),
        ])?;
        for (ns, ip) in [(&a, UNDERLAY_A), (&b, UNDERLAY_B)] {
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            enable_gro(ns, "eth0")?;
        }
        Ok(Pair { a, b })
    }
}

/// Starts a datapath in `ns` with `cfg`, gives the TUN device `tun_addr`/32
/// and routes the whole pod network through it.
pub fn start_node(ns: &Netns, cfg: UdpConfig, tun_addr: &str) -> Result<UdpDatapath> {
    let name = cfg.tun_name.clone();
    let dp = in_netns(ns, || UdpDatapath::start(cfg)).context("starting the datapath")?;
    ns.ip(&["addr", "add", &format!("{tun_addr}/32"), "dev", &name])?;
    ns.ip(&["route", "add", NETWORK, "dev", &name])?;
    Ok(dp)
}

pub fn config(local: &str, workers: usize) -> UdpConfig {
    UdpConfig {
        tun_name: TUN.into(),
        mtu: 1472,
        local_ip: local.parse().unwrap(),
        port: 8285,
        workers,
        ..Default::default()
    }
}

pub fn peer(net: &str, ip: &str) -> (ipnet::Ipv4Net, std::net::Ipv4Addr) {
    (net.parse().unwrap(), ip.parse().unwrap())
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `ping -c count` from `ns` to `dst`; true if all answered.
pub fn ping(ns: &Netns, dst: &str, count: u32) -> bool {
    let c = count.to_string();
    ns.exec(&["ping", "-c", &c, "-i", "0.2", "-W", "1", "-q", dst])
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Result of one iperf3 client run.
#[derive(Debug, Clone, Copy)]
pub struct Iperf {
    pub bytes: u64,
    pub gbps: f64,
    pub retransmits: u64,
    pub seconds: f64,
}

/// Runs an iperf3 server (one connection) in `server` and a client in
/// `client` for `secs` seconds towards `server_ip`.
pub fn iperf(
    server: &Netns,
    client: &Netns,
    server_ip: &str,
    secs: u32,
    extra: &[&str],
) -> Result<Iperf> {
    let mut srv = server.spawn(&["iperf3", "-s", "-1", "-B", server_ip, "-p", "5201"], None)?;
    let ready = eventually(Duration::from_secs(10), || {
        server
            .exec(&["ss", "-Hltn", "sport = :5201"])
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false)
    });
    if !ready {
        let _ = srv.kill();
        let _ = srv.wait();
        bail!("iperf3 server in {} did not listen", server.name());
    }
    let t = secs.to_string();
    let mut args = vec!["iperf3", "-c", server_ip, "-p", "5201", "-t", &t, "-J"];
    args.extend_from_slice(extra);
    let out = client.exec(&args)?;
    let _ = srv.kill();
    let _ = srv.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("iperf3 printed no JSON: {text}"))?;
    if let Some(err) = json["error"].as_str() {
        bail!("iperf3 -c {server_ip}: {err}");
    }
    let r = &json["end"]["sum_received"];
    Ok(Iperf {
        bytes: r["bytes"].as_u64().context("no end.sum_received.bytes")?,
        gbps: r["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9,
        retransmits: json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        seconds: r["seconds"].as_f64().unwrap_or(0.0),
    })
}
