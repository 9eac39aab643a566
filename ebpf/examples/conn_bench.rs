//! Connection-rate benchmark of the eBPF dataplane against netd's nftables one, in one run
//! (root):
//!
//!     cargo run --release -p netd-ebpf --example conn_bench [-- --services 10000 --endpoints 10 --conn-seconds 3]
//!
//! Measured the way `netd-proxy`'s bench measures nftables (same bed, same client loop): new
//! TCP connections per second, each closed with a reset, through
//! - a ClusterIP from a client pod (eBPF: the socket load balancer; the bench process is put
//!   into a cgroup of its own, which the programs are attached to, for these runs only);
//! - a NodePort from a client outside the node (eBPF: the tc programs on the node's external
//!   device; the backend is on the node, so no SNAT).
//!
//! Each with 1 service and with N services programmed, rounds interleaving the modes, medians.
//! Everything runs in network namespaces this program creates; the cgroup and bpffs are its
//! own and removed.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd_ebpf::{EbpfBackend, EbpfConfig};
use netd_proxy::nft::{self, Nftables};
use netd_proxy::plan::desired;
use netd_proxy::testdata::{generated_slice, generated_snapshot, generated_vip};
use netd_proxy::{NodeInfo, Plan};
use netd_tests::Netns;

const NODE_PORT: u16 = 30080;
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);

fn node() -> NodeInfo {
    NodeInfo {
        name: "bench-node".into(),
        ips: vec![NODE_IP],
        pod_cidr: Some("10.244.1.0/24".parse().unwrap()),
        cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
        local_service_ips: Vec::new(),
    }
}

fn enter(path: &str) {
    let f = std::fs::File::open(path).expect("open netns");
    // SAFETY: setns(2) on a descriptor we own; only the calling thread moves.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {path}");
}

/// Runs `f` on a thread inside `ns`.
fn in_ns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{}", ns.name());
    std::thread::spawn(move || {
        enter(&path);
        f()
    })
    .join()
    .expect("bench thread panicked")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// node (forwarding) with a client pod and a server pod behind it (as in netd-proxy's bench),
/// plus an "outside" namespace on the node's external link d0 (198.18.0.1 <-> 198.18.0.10).
struct Bed {
    node: Netns,
    client: Netns,
    outside: Netns,
    _server: Netns,
}

fn bed() -> Result<Bed> {
    let node = Netns::new("ebc-node")?;
    let client = Netns::new("ebc-cli")?;
    let server = Netns::new("ebc-srv")?;
    let outside = Netns::new("ebc-out")?;
    node.run(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
    node.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "eth0", "netns", outside.name()])?;
    node.ip(&["addr", "add", "198.18.0.10/24", "dev", "d0"])?;
    node.ip(&["link", "set", "d0", "up"])?;
    node.ip(&["route", "add", "default", "via", "198.18.0.1"])?;
    outside.ip(&["addr", "add", "198.18.0.1/24", "dev", "eth0"])?;
    outside.ip(&["link", "set", "eth0", "up"])?;
    node.add_routed_pod(&client, "10.244.1.2", "vc")?;
    node.add_routed_pod(&server, "10.244.1.3", "vs")?;
    let path = format!("/run/netns/{}", server.name());
    std::thread::spawn(move || {
        enter(&path);
        let l = TcpListener::bind("0.0.0.0:8080").expect("bind");
        // A deep accept queue: on a busy machine this thread is not always scheduled in time,
        // and an overflowing queue drops SYNs (a 1 s retransmission, not the dataplane's cost).
        // SAFETY: listen(2) again on our listening socket only changes its backlog.
        unsafe { libc::listen(l.as_raw_fd(), 4096) };
        for s in l.incoming().flatten() {
            drop(s);
        }
    });
    Ok(Bed { node, client, outside, _server: server })
}

/// New connections per second from `ns` to `addr`, over `secs` seconds (netd-proxy's loop).
fn conn_rate(ns: &Netns, addr: SocketAddr, secs: f64) -> f64 {
    let path = format!("/run/netns/{}", ns.name());
    std::thread::spawn(move || {
        enter(&path);
        // Warm up (neighbour entries, proxy ARP's delayed answers) outside the timed window.
        for _ in 0..3 {
            if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() {
                break;
            }
        }
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let (mut n, mut failed) = (0u64, 0u64);
        let mut last_err = None;
        let start = Instant::now();
        while Instant::now() < deadline {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(s) => {
                    let l = libc::linger { l_onoff: 1, l_linger: 0 };
                    // SAFETY: setsockopt on a live socket with a pointer to a linger struct.
                    unsafe { libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, &l as *const _ as *const libc::c_void, std::mem::size_of::<libc::linger>() as u32) };
                    n += 1;
                }
                Err(e) => {
                    failed += 1;
                    last_err = Some(e);
                }
            }
        }
        if failed > 0 {
            eprintln!("  {addr}: {failed} failed connections (last: {last_err:?}) next to {n}");
        }
        n as f64 / start.elapsed().as_secs_f64()
    })
    .join()
    .unwrap()
}

/// `n` generated services; the first one points at the server pod (on this node) and also
/// has a NodePort.
fn bench_plan(n: usize, m: usize) -> Plan {
    let mut snap = generated_snapshot(n, m, 8080);
    let mut first = generated_slice(0, 1, 8080, 0);
    first.endpoints[0].addresses = vec!["10.244.1.3".into()];
    first.endpoints[0].node_name = Some("bench-node".into());
    snap.put_slice(Arc::new(first));
    let mut plan = desired(&node(), &snap);
    let key = plan.services.keys().find(|k| k.service.name == "svc-0").expect("svc-0").clone();
    let mut sp = (*plan.services[&key]).clone();
    sp.node_port = Some(NODE_PORT);
    plan.services.insert(key, Arc::new(sp));
    plan.mark_edited();
    plan
}

/// The bench process's own cgroup v2 child, which the socket load balancer is attached to;
/// the process enters it only for the ClusterIP runs.
struct BenchCgroup {
    root: PathBuf,
    path: PathBuf,
}

impl BenchCgroup {
    fn new() -> Result<BenchCgroup> {
        let root = netd_ebpf::default_cgroup();
        let path = root.join(format!("netd-conn-bench-{}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(BenchCgroup { root, path })
    }
    fn enter(&self) -> Result<()> {
        std::fs::write(self.path.join("cgroup.procs"), std::process::id().to_string()).context("entering the bench cgroup")
    }
    fn leave(&self) -> Result<()> {
        std::fs::write(self.root.join("cgroup.procs"), std::process::id().to_string()).context("leaving the bench cgroup")
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        let _ = self.leave();
        let _ = std::fs::remove_dir(&self.path);
    }
}

struct Bpffs(PathBuf);

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

struct Rates {
    cluster_ip: f64,
    node_port: f64,
}

fn measure(bed: &Bed, cg: Option<&BenchCgroup>, secs: f64) -> Result<Rates> {
    let vip = SocketAddr::from((generated_vip(0), 80));
    if let Some(cg) = cg {
        cg.enter()?;
    }
    let cluster_ip = conn_rate(&bed.client, vip, secs);
    if let Some(cg) = cg {
        cg.leave()?;
    }
    let node_port = conn_rate(&bed.outside, SocketAddr::from((NODE_IP, NODE_PORT)), secs);
    Ok(Rates { cluster_ip, node_port })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| -> usize {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
    };
    let n = arg("--services", 10_000);
    let m = arg("--endpoints", 10);
    let secs = arg("--conn-seconds", 3) as f64;
    let rounds = arg("--rounds", 5).max(1);
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root (it creates network namespaces, a cgroup and a bpffs)");
    }
    if let Err(why) = netd_ebpf::probe().and_then(|()| netd_ebpf::probe_tc()) {
        bail!("this kernel cannot run the eBPF dataplane: {why}");
    }
    let bed = bed()?;
    let (one, many) = (bench_plan(1, 1), bench_plan(n, m));
    eprintln!("connection rate, 1 vs {n} services x {m} endpoints, {secs} s per measurement, {rounds} rounds");

    // Rounds interleave the modes, so that the machine's load drifts over all of them alike;
    // each mode's state is removed before the other's is measured.
    let cg = BenchCgroup::new()?;
    let mnt = Bpffs(std::env::temp_dir().join(format!("netd-conn-bench-{}", std::process::id())));
    std::fs::create_dir_all(&mnt.0)?;
    let cfg = EbpfConfig {
        bpffs_dir: mnt.0.join("netd"),
        mount_bpffs: true,
        cgroup: Some(cg.path.clone()),
        external_devices: vec!["d0".into()],
        overlay_device: None,
    };
    let mut nft_rates = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut ebpf_rates = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        for (plan, (ci, np)) in [(&one, (&mut nft_rates.0, &mut nft_rates.1)), (&many, (&mut nft_rates.2, &mut nft_rates.3))] {
            let plan = plan.clone();
            in_ns(&bed.node, move || Nftables::new().sync(&nft::render(&plan, None), false).map(|_| ()))?;
            let r = measure(&bed, None, secs)?;
            ci.push(r.cluster_ip);
            np.push(r.node_port);
        }
        in_ns(&bed.node, || Nftables::new().remove())?;
        let c = cfg.clone();
        let mut backend: EbpfBackend = in_ns(&bed.node, move || EbpfBackend::new(c))?;
        let result = (|| -> Result<()> {
            for (plan, (ci, np)) in [(&one, (&mut ebpf_rates.0, &mut ebpf_rates.1)), (&many, (&mut ebpf_rates.2, &mut ebpf_rates.3))] {
                backend.sync_plan(plan, false)?;
                let r = measure(&bed, Some(&cg), secs)?;
                ci.push(r.cluster_ip);
                np.push(r.node_port);
            }
            Ok(())
        })();
        backend.remove_all()?;
        drop(backend);
        result?;
        eprintln!("  round {}: nftables {:.0}/{:.0} (ClusterIP 1/N), eBPF {:.0}/{:.0}", round + 1, nft_rates.0[round], nft_rates.2[round], ebpf_rates.0[round], ebpf_rates.2[round]);
    }
    if std::env::var_os("CONN_BENCH_NSTAT").is_some() {
        for ns in [&bed.node, &bed._server, &bed.client, &bed.outside] {
            eprintln!("{}: {}", ns.name(), ns.run(&["nstat", "-az", "TcpExtListenOverflows", "TcpExtListenDrops", "TcpRetransSegs", "IpExtInNoRoutes", "TcpExtTCPTimeouts", "TcpAttemptFails", "TcpOutRsts"]).unwrap_or_default());
        }
    }

    let rows = [
        ("nftables", "ClusterIP", nft_rates.0, nft_rates.2),
        ("nftables", "NodePort ", nft_rates.1, nft_rates.3),
        ("ebpf    ", "ClusterIP", ebpf_rates.0, ebpf_rates.2),
        ("ebpf    ", "NodePort ", ebpf_rates.1, ebpf_rates.3),
    ];
    let medians: Vec<(f64, f64)> = rows.iter().map(|(_, _, a, b)| (median(a.clone()), median(b.clone()))).collect();
    println!("\n| mode | frontend | 1 service | {n} services | ratio {n}/1 | vs nftables at {n} |\n|---|---|---|---|---|---|");
    for (i, (mode, what, _, _)) in rows.iter().enumerate() {
        let (r1, rn) = medians[i];
        let anchor = medians[i % 2].1;
        println!("| {mode} | {what} | {r1:.0}/s | {rn:.0}/s | {:.3} | {:.2}x |", rn / r1, rn / anchor);
    }
    Ok(())
}
