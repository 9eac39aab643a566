//! Throughput of the UDP datapath vs kernel VXLAN between the same two
//! namespaces, in one run. Needs root and iperf3.
//!
//! ```text
//! cargo run --release -p netd-udp --example pair -- [--seconds 5] [--runs 3] [--streams 1] [--no-plain] [--only MODE]
//! ```
//!
//! Namespaces A and B share a veth (198.18.2.1/24 — 198.18.2.2/24, GRO on
//! as on a real NIC). Over it run, side by side:
//! * kernel VXLAN `vx0` (VNI 42, port 4789, MTU 1450 as flannel), overlay
//!   10.244.101.1/24 — .2/24;
//! * the UDP datapath `netd-udp0` (MTU 1472), 10.244.1.0/32 — 10.244.2.0/32
//!   with 10.244.0.0/16 routed through it;
//! * optionally (default on) the same datapath with offloads off (one packet
//!   per read / datagram / write: flannel's model, but still batched and
//!   multi-threaded), on `netd-udp1`, port 8286, 10.244.{3,4}.0.
//!
//! Each run is an iperf3 TCP transfer A -> B; modes alternate and the
//! median (and best) run is reported with the CPU time it took: iperf3
//! client + server + this process (the datapath threads) by getrusage,
//! plus all irq/softirq time from /proc/stat (where kernel VXLAN and veth
//! work is accounted); also the machine-wide busy CPU, which includes
//! anything else running on the machine.

#[path = "../tests/common/mod.rs"]
mod common;

use anyhow::{bail, Context, Result};
use common::*;
use netd_udp::{UdpConfig, UdpDatapath};
use std::time::Instant;

const VXLAN: &str = "kernel vxlan";
const UDP: &str = "netd-udp";
const PLAIN: &str = "netd-udp, offloads off";

struct Args {
    seconds: u32,
    runs: usize,
    streams: u32,
    plain: bool,
    /// Run only the modes whose name contains this.
    only: Option<String>,
    /// `tc qdisc replace dev netd-udp0 root noqueue` on both nodes.
    noqueue: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        seconds: 5,
        runs: 3,
        streams: 1,
        plain: true,
        only: None,
        noqueue: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--seconds" => a.seconds = val()?.parse()?,
            "--runs" => a.runs = val()?.parse()?,
            "--streams" => a.streams = val()?.parse()?,
            "--no-plain" => a.plain = false,
            "--only" => a.only = Some(val()?),
            "--noqueue" => a.noqueue = true,
            _ => bail!("unknown argument {k}"),
        }
    }
    Ok(a)
}

/// (busy, irq + softirq) jiffies of all CPUs, from /proc/stat.
fn cpu_jiffies() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    Ok((total - at(3) - at(4), at(5) + at(6)))
}

/// CPU seconds (user + system) of this process's threads, and of its
/// waited-for children, so far.
fn rusage_cpu() -> (f64, f64) {
    let get = |who| {
        // SAFETY: getrusage writes one rusage into the zeroed struct.
        let ru = unsafe {
            let mut ru: libc::rusage = std::mem::zeroed();
            libc::getrusage(who, &mut ru);
            ru
        };
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        t(ru.ru_utime) + t(ru.ru_stime)
    };
    (get(libc::RUSAGE_SELF), get(libc::RUSAGE_CHILDREN))
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

#[derive(Debug, Clone, Copy)]
struct Run {
    gbps: f64,
    retrans: u64,
    /// Machine-wide busy CPU, in cores (CPU-seconds per second): includes
    /// whatever else runs on the machine.
    machine_cores: f64,
    /// CPU of the transfer itself, in cores: iperf3 client and server,
    /// this process (the UDP datapath threads) and all irq/softirq time
    /// (where kernel VXLAN and veth work is accounted).
    cores: f64,
    /// This process's CPU (the UDP datapath threads), in cores.
    dp_cores: f64,
}

fn measure(pair: &Pair, server_ip: &str, a: &Args) -> Result<Run> {
    let streams = a.streams.to_string();
    let (b0, i0) = cpu_jiffies()?;
    let (s0, c0) = rusage_cpu();
    let w0 = Instant::now();
    let r = iperf(&pair.b, &pair.a, server_ip, a.seconds, &["-P", &streams])?;
    let wall = w0.elapsed().as_secs_f64();
    let (b1, i1) = cpu_jiffies()?;
    let (s1, c1) = rusage_cpu();
    let hz = ticks_per_second();
    Ok(Run {
        gbps: r.gbps,
        retrans: r.retransmits,
        machine_cores: (b1 - b0) as f64 / hz / wall,
        cores: ((s1 - s0) + (c1 - c0) + (i1 - i0) as f64 / hz) / wall,
        dp_cores: (s1 - s0) / wall,
    })
}

fn main() -> Result<()> {
    let a = args()?;
    // SAFETY: geteuid has no memory effects.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (network namespaces)");
    }
    let pair = Pair::new("udp-bench")?;

    // Kernel VXLAN between the same namespaces.
    for (ns, local, remote, ip) in [
        (&pair.a, UNDERLAY_A, UNDERLAY_B, "10.244.101.1/24"),
        (&pair.b, UNDERLAY_B, UNDERLAY_A, "10.244.101.2/24"),
    ] {
        #[rustfmt::skip]
        ns.ip(&["link", "add", "vx0", "mtu", "1450", "type", "vxlan", "id", "42", "local", local,
                "remote", remote, "dstport", "4789", "dev", "eth0"])?;
        ns.ip(&["addr", "add", ip, "dev", "vx0"])?;
        ns.ip(&["link", "set", "vx0", "up"])?;
    }

    let da = start_node(&pair.a, config(UNDERLAY_A, 0), TUN_ADDR_A)?;
    let db = start_node(&pair.b, config(UNDERLAY_B, 0), TUN_ADDR_B)?;
    da.set_peers(&[peer(SUBNET_B, UNDERLAY_B)]);
    db.set_peers(&[peer(SUBNET_A, UNDERLAY_A)]);
    if a.noqueue {
        for ns in [&pair.a, &pair.b] {
            ns.run(&["tc", "qdisc", "replace", "dev", TUN, "root", "noqueue"])?;
        }
    }

    let mut plain: Option<(UdpDatapath, UdpDatapath)> = None;
    if a.plain {
        let cfg = |local: &str| UdpConfig {
            tun_name: "netd-udp1".into(),
            port: 8286,
            offloads: false,
            ..config(local, 0)
        };
        let pa = start_node_on(&pair.a, cfg(UNDERLAY_A), "10.244.3.0", "10.244.4.0/24")?;
        let pb = start_node_on(&pair.b, cfg(UNDERLAY_B), "10.244.4.0", "10.244.3.0/24")?;
        pa.set_peers(&[peer("10.244.4.0/24", UNDERLAY_B)]);
        pb.set_peers(&[peer("10.244.3.0/24", UNDERLAY_A)]);
        plain = Some((pa, pb));
    }

    let mut modes = vec![(VXLAN, "10.244.101.2"), (UDP, TUN_ADDR_B)];
    if plain.is_some() {
        modes.push((PLAIN, "10.244.4.0"));
    }
    if let Some(only) = &a.only {
        let all = modes.clone();
        modes.retain(|(name, _)| name.contains(only.as_str()));
        if modes.is_empty() {
            bail!("--only {only}: no mode matches ({all:?})");
        }
    }
    for (name, ip) in &modes {
        if !ping(&pair.a, ip, 2) {
            bail!("{name}: no ping to {ip}");
        }
    }

    println!(
        "iperf3 TCP A -> B, {} s x {} runs, {} stream(s), {} CPUs; median run per mode",
        a.seconds,
        a.runs,
        a.streams,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); modes.len()];
    for run in 0..a.runs {
        for (i, (name, ip)) in modes.iter().enumerate() {
            let r = measure(&pair, ip, &a).with_context(|| format!("{name}, run {run}"))?;
            eprintln!(
                "  run {run} {name:<24} {:6.2} Gbit/s  cpu {:4.2} cores (machine {:4.2})",
                r.gbps, r.cores, r.machine_cores
            );
            results[i].push(r);
        }
    }
    let median = |v: &mut Vec<Run>| {
        v.sort_by(|x, y| x.gbps.total_cmp(&y.gbps));
        (v[v.len() / 2], v[v.len() - 1])
    };
    let meds: Vec<(Run, Run)> = results.iter_mut().map(median).collect();
    println!(
        "{:<24} {:>8} {:>8} {:>8} {:>10} {:>14} {:>10} {:>12}",
        "mode",
        "Gbit/s",
        "best",
        "retrans",
        "cpu cores",
        "cores/(Gbit/s)",
        "dp cores",
        "machine cpu"
    );
    for ((name, _), (r, best)) in modes.iter().zip(&meds) {
        let dp = if name.starts_with("netd") {
            format!("{:.2}", r.dp_cores)
        } else {
            "-".into()
        };
        #[rustfmt::skip]
        println!("{:<24} {:>8.2} {:>8.2} {:>8} {:>10.2} {:>14.3} {:>10} {:>12.2}",
                 name, r.gbps, best.gbps, r.retrans, r.cores, r.cores / r.gbps.max(1e-9), dp, r.machine_cores);
    }
    let find = |n: &str| modes.iter().position(|(m, _)| *m == n).map(|i| meds[i]);
    if let (Some(u), Some(v)) = (find(UDP), find(VXLAN)) {
        println!(
            "ratio netd-udp / kernel vxlan: {:.2} (median runs), {:.2} (best runs)",
            u.0.gbps / v.0.gbps,
            u.1.gbps / v.1.gbps
        );
    }
    if let (Some(u), Some(p)) = (find(UDP), find(PLAIN)) {
        println!(
            "ratio netd-udp / offloads off: {:.2} (median runs)",
            u.0.gbps / p.0.gbps
        );
    }
    println!("netd-udp A: {:?}", da.stats());
    println!("netd-udp B: {:?}", db.stats());
    drop(plain);
    Ok(())
}

/// Like `start_node`, with an explicit route to the peer's subnet instead
/// of the whole network (the second datapath shares the namespaces).
fn start_node_on(
    ns: &netd_tests::Netns,
    cfg: UdpConfig,
    tun_addr: &str,
    peer_subnet: &str,
) -> Result<UdpDatapath> {
    let name = cfg.tun_name.clone();
    let dp = in_netns(ns, || UdpDatapath::start(cfg)).context("starting the datapath")?;
    ns.ip(&["addr", "add", &format!("{tun_addr}/32"), "dev", &name])?;
    ns.ip(&["route", "add", peer_subnet, "dev", &name])?;
    Ok(dp)
}
