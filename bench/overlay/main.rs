//! `overlay`: benchmarks netd's pod network on the namespace test bed.
//!
//! 1. Pod-to-pod TCP throughput (iperf3) and TCP request/response latency
//!    across two nodes, for netd's VXLAN (with its default flags and with
//!    `--ip-masq false`), netd's udp backend (userspace datapath), a
//!    hand-made kernel VXLAN set up with flannel's recipe, and the bare
//!    underlay (no encapsulation). Rounds interleave the configurations so
//!    that drift in machine load hits all alike. CPU per Gbit/s counts the
//!    iperf3 client and server, both netd processes (the udp datapath runs
//!    in them) and all irq/softirq time (where the kernel does VXLAN, veth
//!    and UDP work) during each iperf3 run.
//! 2. Convergence: a fake peer's lease is put into etcd while 3 netd nodes
//!    run; time until the route is on every node (then it is deleted, and
//!    the time until the route is gone everywhere is measured too).
//!
//! Needs root (network namespaces), etcd, iperf3, ss, and netd built in
//! release mode (`cargo build --release -p netd` is run if `NETD_BIN` is
//! not set). Not a test: it asserts nothing and exits 0 whatever the
//! figures, unless something could not be measured at all.

mod convergence;
mod perf;
mod setups;
mod stats;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use setups::{Kind, Setup};
use stats::{mean, median, percentile};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

/// Anchors the figures are compared with.
const TARGET_THROUGHPUT_RATIO: f64 = 0.97;
const TARGET_CONVERGENCE_P99_MS: f64 = 200.0;
/// udp backend vs kernel VXLAN: throughput at least, RR p50 at most.
const TARGET_UDP_THROUGHPUT_RATIO: f64 = 0.8;
const TARGET_UDP_LATENCY_RATIO: f64 = 1.3;

#[derive(Debug, Parser)]
#[command(
    about = "netd overlay benchmark: throughput/latency vs hand VXLAN and bare underlay, convergence"
)]
struct Cli {
    /// iperf3 and RR runs per configuration (the median run is reported).
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Seconds per iperf3 run (after one omitted warm-up second).
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Request/response transactions per RR run.
    #[arg(long, default_value_t = 20000)]
    rr_count: u32,
    /// Convergence trials (after one unmeasured warm-up trial).
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Measure only this part.
    #[arg(long, value_enum)]
    only: Option<Part>,
    /// Throughput configurations to measure, comma-separated, from: vxlan,
    /// vxlan-nomasq, udp, hand, bare (default: all).
    #[arg(long, value_delimiter = ',')]
    configs: Vec<String>,
    /// Extra `netd run` arguments for every netd configuration, e.g.
    /// `--netd-args=--udp-nice=0` (space-separated).
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    netd_args: String,
    /// With these (space-separated) `netd run` arguments added, the udp
    /// backend is measured a second time in the same run ("netd udp
    /// (variant)"), e.g. `--udp-variant-args=--udp-nice=0`.
    #[arg(long, allow_hyphen_values = true)]
    udp_variant_args: Option<String>,
    #[command(subcommand)]
    helper: Option<Helper>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Throughput,
    Convergence,
}

/// Helpers the benchmark runs inside pod namespaces.
#[derive(Debug, Subcommand)]
enum Helper {
    #[command(hide = true)]
    RrServer {
        #[arg(long)]
        port: u16,
    },
    #[command(hide = true)]
    RrClient {
        #[arg(long)]
        addr: String,
        #[arg(long)]
        count: u32,
        #[arg(long, default_value_t = 1000)]
        warmup: u32,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.helper {
        Some(Helper::RrServer { port }) => return perf::rr_server(port),
        Some(Helper::RrClient {
            addr,
            count,
            warmup,
        }) => return perf::rr_client(&addr, count, warmup),
        None => {}
    }
    if unsafe_geteuid() != 0 {
        bail!("run as root: the benchmark builds network namespaces");
    }
    use_release_netd()?;
    catch_interrupts();
    println!(
        "netd overlay benchmark ({} CPUs, load average {})",
        cpus(),
        loadavg()
    );

    let mut throughput_ok = true;
    if cli.only != Some(Part::Convergence) {
        throughput_ok = throughput(&cli)?;
    }
    if cli.only != Some(Part::Throughput) {
        convergence(&cli)?;
    }
    println!("\nload average at the end: {}", loadavg());
    if !throughput_ok {
        bail!("some throughput runs failed (see above)");
    }
    Ok(())
}

/// Set by SIGINT/SIGTERM; the bench stops at the next checkpoint and
/// returns an error, so every namespace and process is torn down by the
/// test bed's destructors (the default action would skip them).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; `signal` is given a valid function pointer.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

/// Fails once an interrupt was received.
pub fn checkpoint() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; tearing down");
    }
    Ok(())
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// Points the test bed at a release netd: `$NETD_BIN` if set, else
/// `<target>/release/netd`, built (or found up to date) by cargo.
fn use_release_netd() -> Result<()> {
    if std::env::var_os("NETD_BIN").is_some() {
        return Ok(());
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("no workspace root")?
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--release", "-p", "netd", "--quiet"])
        .current_dir(&root)
        .status()
        .with_context(|| format!("running {cargo} build"))?;
    if !status.success() {
        bail!("`cargo build --release -p netd` failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| root.join(d))
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("release").join("netd");
    if !bin.is_file() {
        bail!("no netd at {}", bin.display());
    }
    // Single-threaded so far: nothing else reads the environment yet.
    std::env::set_var("NETD_BIN", &bin);
    Ok(())
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

#[derive(Default)]
struct Figures {
    gbps: Vec<f64>,
    retrans: Vec<u64>,
    rtt_us: Vec<f64>,
    /// Cores busy with the transfer per Gbit/s, per run.
    cpu_per_gbps: Vec<f64>,
    errors: Vec<String>,
}

fn throughput(cli: &Cli) -> Result<bool> {
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|k| cli.configs.is_empty() || cli.configs.iter().any(|c| c == k.name()))
        .filter(|k| *k != Kind::NetdUdpVariant || cli.udp_variant_args.is_some())
        .collect();
    let netd_args: Vec<&str> = cli.netd_args.split_whitespace().collect();
    let variant_args: Vec<&str> = netd_args
        .iter()
        .copied()
        .chain(
            cli.udp_variant_args
                .as_deref()
                .unwrap_or("")
                .split_whitespace(),
        )
        .collect();
    if let Some(v) = &cli.udp_variant_args {
        println!("  netd udp (variant): netd run {v}");
    }
    println!(
        "\n== Pod-to-pod across two nodes: {} runs x {} s iperf3, {} x {} RR ==",
        cli.runs, cli.seconds, cli.runs, cli.rr_count
    );
    eprintln!("building the {} configurations ...", kinds.len());
    let mut setups = Vec::new();
    for kind in kinds {
        checkpoint()?;
        let args = if kind == Kind::NetdUdpVariant {
            &variant_args
        } else {
            &netd_args
        };
        let setup = Setup::build_with(kind, 2, args)
            .with_context(|| format!("setting up {}", kind.label()))?;
        let servers = perf::start_servers(&setup.b)?;
        if let Some(details) = setups::vxlan_details(&setup) {
            println!("  {:<28} {details}", kind.label());
        }
        setups.push((setup, servers, Figures::default()));
    }

    for run in 1..=cli.runs {
        // Each round starts with another configuration, so none is always
        // measured first (right after the previous round's bare underlay).
        let start = (run as usize - 1) % setups.len();
        setups.rotate_left(start);
        for (setup, servers, fig) in &mut setups {
            checkpoint()?;
            let label = setup.kind.label();
            let b = setup.b.ip.to_string();
            eprint!("run {run}/{}: {label} ... ", cli.runs);
            let mut pids = vec![servers.0.pid()];
            pids.extend(setup.cluster.nodes().iter().filter_map(|n| n.netd_pid()));
            let cpu = || {
                pids.iter().map(|p| perf::process_cpu(*p)).sum::<f64>()
                    + perf::children_cpu()
                    + perf::irq_cpu()
            };
            let (cpu0, wall0) = (cpu(), std::time::Instant::now());
            match perf::iperf(&setup.a, &b, cli.seconds) {
                Ok((gbps, retrans)) => {
                    let cores = (cpu() - cpu0) / wall0.elapsed().as_secs_f64();
                    eprint!(
                        "{gbps:.2} Gbit/s ({retrans} retransmits, {:.2} cores/Gbit/s) ",
                        cores / gbps
                    );
                    fig.gbps.push(gbps);
                    fig.retrans.push(retrans);
                    fig.cpu_per_gbps.push(cores / gbps);
                }
                Err(e) => {
                    eprint!("iperf3 FAILED ");
                    fig.errors.push(format!("run {run} iperf3: {e:#}"));
                }
            }
            match perf::rr(&setup.a, &b, cli.rr_count) {
                Ok(samples) => {
                    eprintln!("RR p50 {:.1} us", median(&samples).unwrap_or(f64::NAN));
                    fig.rtt_us.extend(samples);
                }
                Err(e) => {
                    eprintln!("RR FAILED");
                    fig.errors.push(format!("run {run} RR: {e:#}"));
                }
            }
        }
        setups.rotate_right(start);
    }

    println!();
    println!(
        "  {:<28} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9}   Gbit/s of each run",
        "configuration", "Gbit/s", "retrans", "RR mean", "RR p50", "RR p99", "CPU/Gbps"
    );
    let mut ok = true;
    for (setup, _, fig) in &setups {
        let runs = fig
            .gbps
            .iter()
            .map(|g| format!("{g:.2}"))
            .collect::<Vec<_>>()
            .join(" ");
        let us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}us"));
        println!(
            "  {:<28} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9}   {}",
            setup.kind.label(),
            median(&fig.gbps).map_or("-".into(), |g| format!("{g:.2}")),
            fig.retrans.iter().sum::<u64>(),
            us(mean(&fig.rtt_us)),
            us(median(&fig.rtt_us)),
            us(percentile(&fig.rtt_us, 99.0)),
            median(&fig.cpu_per_gbps).map_or("-".into(), |c| format!("{c:.3}")),
            runs,
        );
        for e in &fig.errors {
            println!("    error: {e}");
            ok = false;
        }
    }

    let get = |k: Kind| setups.iter().find(|(s, ..)| s.kind == k).map(|(_, _, f)| f);
    println!();
    let vxlans = [
        ("netd (defaults)", get(Kind::Netd)),
        ("netd --ip-masq=false", get(Kind::NetdNoMasq)),
    ];
    for (name, f, hand, bare) in vxlans
        .into_iter()
        .filter_map(|(n, f)| Some((n, f?, get(Kind::HandVxlan)?, get(Kind::Bare)?)))
    {
        let ratio = |other: &Figures| match (median(&f.gbps), median(&other.gbps)) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let lat = |other: &Figures| match (median(&f.rtt_us), median(&other.rtt_us)) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        let vs_hand = ratio(hand);
        println!(
            "  {name:<22} throughput vs hand VXLAN {} (target >= {TARGET_THROUGHPUT_RATIO}: {}), vs bare {}; RR p50 vs hand {}, vs bare {}",
            vs_hand.map_or("-".into(), |r| format!("{r:.3}x")),
            verdict(vs_hand.map(|r| r >= TARGET_THROUGHPUT_RATIO)),
            ratio(bare).map_or("-".into(), |r| format!("{r:.3}x")),
            lat(hand),
            lat(bare),
        );
    }
    // The udp backend against kernel VXLAN: netd's (same daemon, same
    // masquerade) and the hand-made one (no nftables at all).
    let med_ratio = |a: &[f64], b: &[f64]| match (median(a), median(b)) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let x = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.3}x"));
    let anchors = [
        ("netd vxlan (defaults)", get(Kind::Netd)),
        ("hand-made kernel vxlan", get(Kind::HandVxlan)),
    ];
    for (name, kind, udp, anchor) in anchors.into_iter().flat_map(|(n, a)| {
        [Kind::NetdUdp, Kind::NetdUdpVariant]
            .into_iter()
            .filter_map(move |k| Some((n, k, get(k)?, a?)))
    }) {
        let tput = med_ratio(&udp.gbps, &anchor.gbps);
        let lat = med_ratio(&udp.rtt_us, &anchor.rtt_us);
        println!(
            "  {:<19} vs {name:<22}: throughput {} (target >= {TARGET_UDP_THROUGHPUT_RATIO}: {}), RR p50 {} (target <= {TARGET_UDP_LATENCY_RATIO}: {}), CPU per Gbit/s {}",
            kind.label().trim_end_matches(" (defaults)"),
            x(tput),
            verdict(tput.map(|r| r >= TARGET_UDP_THROUGHPUT_RATIO)),
            x(lat),
            verdict(lat.map(|r| r <= TARGET_UDP_LATENCY_RATIO)),
            x(med_ratio(&udp.cpu_per_gbps, &anchor.cpu_per_gbps)),
        );
    }
    eprintln!("tearing the configurations down ...");
    drop(setups);
    Ok(ok)
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "n/a",
    }
}

fn convergence(cli: &Cli) -> Result<()> {
    println!(
        "\n== Convergence: lease put -> route on all 3 nodes ({} trials) ==",
        cli.trials
    );
    eprintln!("building a 3-node netd cluster ...");
    checkpoint()?;
    let setup = Setup::build(Kind::Netd, 3)?;
    let trials = convergence::measure(&setup.cluster, cli.trials)?;
    let add: Vec<f64> = trials.iter().map(|t| t.add_ms).collect();
    let del: Vec<f64> = trials.iter().map(|t| t.del_ms).collect();
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
    println!(
        "  {:<26} {:>10} {:>10} {:>10} {:>10}",
        "", "min", "median", "p99", "max"
    );
    for (name, v) in [
        ("route added (lease put)", &add),
        ("route removed (lease del)", &del),
    ] {
        println!(
            "  {:<26} {:>10} {:>10} {:>10} {:>10}",
            name,
            ms(percentile(v, 0.0)),
            ms(median(v)),
            ms(percentile(v, 99.0)),
            ms(percentile(v, 100.0)),
        );
    }
    let p99 = percentile(&add, 99.0);
    println!(
        "  add p99 {} (target < {TARGET_CONVERGENCE_P99_MS} ms: {}); with {} trials p99 is the slowest trial",
        ms(p99),
        verdict(p99.map(|p| p < TARGET_CONVERGENCE_P99_MS)),
        add.len()
    );
    Ok(())
}
