//! `upgrade`: replaces a node's netd under load and counts what was lost (see README.md).
//!
//! Three ways, same scenario (`netd_tests::upgrade::upgrade_under_load`: 1,000 DNS queries/s
//! from a pod to the cluster DNS IP, a busy TCP connection through a ClusterIP, a NodePort
//! connection every 50 ms from outside):
//!
//! - `handover`: the new netd starts beside the old one and takes its DNS sockets over, then
//!   the old one gets SIGTERM (a DaemonSet rollout with maxSurge 1);
//! - `reuseport`: the same overlap with `--dns-handover=false`: the new netd binds its own
//!   `SO_REUSEPORT` sockets beside the old ones, which close when the old netd exits;
//! - `stop-start` (the anchor): SIGTERM, then start the new netd;
//! - `systemd-restart`: `systemctl restart` of the `Type=notify` unit, with a stand-in for systemd
//!   that keeps the DNS sockets netd stored (`FDSTORE=1`) and passes them to the new netd.
//!
//! Needs root, etcd, socat and dig. Asserts nothing; exits non-zero only when a run could not
//! be measured at all.

use anyhow::Result;
use clap::Parser;
use netd_tests::upgrade::{upgrade_under_load, Replacement, UpgradeOutcome};

#[derive(Debug, Parser)]
#[command(about = "netd upgrade benchmark: DNS queries lost and the longest gap while netd is replaced")]
struct Cli {
    /// DNS queries per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Runs of each way (each on a fresh test bed).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Only these ways (comma-separated: handover, reuseport, stop-start, systemd-restart).
    #[arg(long, value_delimiter = ',', default_value = "handover,reuseport,stop-start,systemd-restart")]
    ways: Vec<String>,
}

fn way(name: &str) -> Option<(Replacement, bool)> {
    match name {
        "handover" => Some((Replacement::Overlap, true)),
        "reuseport" => Some((Replacement::Overlap, false)),
        "stop-start" => Some((Replacement::StopThenStart, false)),
        "systemd-restart" => Some((Replacement::SystemdRestart, true)),
        _ => None,
    }
}

fn row(name: &str, run: usize, o: &UpgradeOutcome) -> String {
    format!(
        "| {name} | {run} | {} | {} | {} | {:.1} | {:.1} | {}/{} | {} | {:.0} |",
        o.dns.sent,
        o.dns.lost,
        o.dns.errors,
        o.dns.longest_gap.as_secs_f64() * 1000.0,
        o.dns.slowest.as_secs_f64() * 1000.0,
        o.nodeport.answered,
        o.nodeport.attempts,
        match &o.stream {
            Ok(bytes) => format!("unbroken ({} KiB)", bytes / 1024),
            Err(e) => format!("BROKEN: {e}"),
        },
        o.replace_took.as_secs_f64() * 1000.0,
    )
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    println!("netd: {}", netd_tests::netd_binary()?.display());
    println!("{} DNS queries/s; a query unanswered after {:?} is lost\n", cli.rate, netd_tests::LOSS_TIMEOUT);
    println!("| way | run | queries sent | lost | not NOERROR | longest gap (ms) | slowest (ms) | NodePort answered | TCP stream | replacement (ms) |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut totals = Vec::new();
    for name in &cli.ways {
        let Some((how, handover)) = way(name) else {
            anyhow::bail!("unknown way {name:?} (handover, reuseport, stop-start, systemd-restart)");
        };
        let (mut sent, mut lost, mut worst_gap) = (0, 0, 0.0f64);
        for run in 1..=cli.runs {
            let o = upgrade_under_load(how, cli.rate, handover)?;
            println!("{}", row(name, run, &o));
            sent += o.dns.sent;
            lost += o.dns.lost + o.dns.errors;
            worst_gap = worst_gap.max(o.dns.longest_gap.as_secs_f64() * 1000.0);
            if o.state_after_stop != o.state_before {
                println!("  (kernel state changed across a stop:\n{}\n---\n{})", o.state_before, o.state_after_stop);
            }
        }
        totals.push(format!("{name}: {lost} of {sent} queries lost or failed, longest gap {worst_gap:.1} ms"));
    }
    println!();
    for t in totals {
        println!("{t}");
    }
    Ok(())
}
