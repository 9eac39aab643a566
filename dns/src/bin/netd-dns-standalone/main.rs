//! The DNS server on its own, fed from Service/EndpointSlice JSON files instead of the
//! registry: for the integration tests (run inside network namespaces) and bench/dns.
//!
//! ```text
//! netd-dns-standalone serve --services svc.json --slices eps.json [netd's --dns-* flags]
//! netd-dns-standalone zonefile --services svc.json --slices eps.json   # master file on stdout
//! netd-dns-standalone bench-data --out DIR --services 1000 --headless 100
//! ```
//!
//! JSON files hold a Kubernetes list (`kubectl get svc -A -o json`) or a bare array. With
//! `serve`, the files are re-read when they change (the registry's role), keeping the last
//! good zone when one does not parse.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

mod blast;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use netd_dns::{build_zone, parse_duration, DnsServer, Zone, ZoneBuilder, ZoneConfig};
use serde::de::DeserializeOwned;

#[derive(Debug, Parser)]
#[command(name = "netd-dns-standalone", about = "netd's cluster DNS server fed from JSON files")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Args)]
struct Inputs {
    /// Services: a Kubernetes List or a JSON array.
    #[arg(long)]
    services: PathBuf,
    /// EndpointSlices: a Kubernetes List or a JSON array (optional).
    #[arg(long)]
    slices: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    inputs: Inputs,
    #[command(flatten)]
    dns: netd_dns::Args,
    /// How often the input files are checked for changes.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    watch_interval: Duration,
    /// Write the metrics as JSON to this file, refreshed every 200 ms.
    #[arg(long)]
    metrics_file: Option<PathBuf>,
    /// Fixed SOA serial (default: the time of each load).
    #[arg(long)]
    serial: Option<u32>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve DNS until SIGTERM/SIGINT.
    Serve(Box<ServeArgs>),
    /// Print the zone in master-file format.
    Zonefile {
        #[command(flatten)]
        inputs: Inputs,
        #[arg(long, default_value = "cluster.local")]
        cluster_domain: String,
        #[arg(long, default_value_t = 30)]
        ttl: u32,
        #[arg(long, default_value_t = 5)]
        negative_ttl: u32,
        #[arg(long)]
        cluster_dns_ip: Option<std::net::IpAddr>,
        #[arg(long, default_value_t = 1)]
        serial: u32,
    },
    /// Load generator: send the queries of a dnsperf-style file as fast as a window of
    /// outstanding queries allows (or at --rate), print rate and latency percentiles.
    Blast {
        #[arg(long)]
        server: std::net::SocketAddr,
        #[arg(long)]
        queries: PathBuf,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Queries outstanding at most.
        #[arg(long, default_value_t = 512)]
        window: usize,
        /// Queries per second (0: as fast as possible).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Source sockets (ports).
        #[arg(long, default_value_t = 4)]
        sockets: usize,
    },
    /// Write benchmark inputs: services.json, slices.json, cluster.local.zone and dnsperf
    /// query files (queries-a.txt, queries-nx.txt, queries-srv.txt).
    BenchData {
        #[arg(long)]
        out: PathBuf,
        /// ClusterIP services.
        #[arg(long, default_value_t = 1000)]
        services: usize,
        /// Headless services (3 endpoints each).
        #[arg(long, default_value_t = 100)]
        headless: usize,
    },
}

fn read_list<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let items = match v {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Object(mut o) => match o.remove("items") {
            Some(serde_json::Value::Array(a)) => a,
            Some(serde_json::Value::Null) => Vec::new(),
            _ => bail!("{}: an object without an items array", path.display()),
        },
        _ => bail!("{}: neither a list nor an array", path.display()),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, it)| serde_json::from_value(it).with_context(|| format!("{}: item {i}", path.display())))
        .collect()
}

fn load(inputs: &Inputs) -> Result<(Vec<Service>, Vec<EndpointSlice>)> {
    let services = read_list(&inputs.services)?;
    let slices = match &inputs.slices {
        Some(p) => read_list(p)?,
        None => Vec::new(),
    };
    Ok((services, slices))
}

fn stamp(inputs: &Inputs) -> Vec<Option<(SystemTime, u64)>> {
    std::iter::once(&inputs.services)
        .chain(inputs.slices.iter())
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

fn build(inputs: &Inputs, cfg: &ZoneConfig) -> Result<Zone> {
    let (svcs, slices) = load(inputs)?;
    let zone = build_zone(cfg, &svcs, &slices);
    for s in &zone.stats().skipped {
        tracing::warn!("skipped: {s}");
    }
    Ok(zone)
}

/// Reloads the files into `builder`: objects equal to the last load are not encoded again.
fn update(inputs: &Inputs, builder: &mut ZoneBuilder) -> Result<Arc<Zone>> {
    let (svcs, slices) = load(inputs)?;
    let svcs: Vec<Arc<_>> = svcs.into_iter().map(Arc::new).collect();
    let slices: Vec<Arc<_>> = slices.into_iter().map(Arc::new).collect();
    let zone = builder.update(&svcs, &slices);
    for s in &zone.stats().skipped {
        tracing::warn!("skipped: {s}");
    }
    Ok(zone)
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn serve(inputs: Inputs, dns: netd_dns::Args, watch: Duration, metrics_file: Option<PathBuf>, serial: Option<u32>) -> Result<()> {
    let dns = dns.effective()?;
    let mut zcfg = dns.zone_config();
    zcfg.serial = serial;
    let cfg = dns.server_config(None)?;
    let server = DnsServer::start(cfg)?;
    let mut builder = ZoneBuilder::new(zcfg);
    let first = update(&inputs, &mut builder)?;
    let stats = first.stats();
    tracing::info!(serial = first.serial(), services = stats.services, endpoints = stats.endpoints, records = stats.records, skipped = stats.skipped.len(), "zone loaded");
    server.set_zone(first);
    eprintln!("netd-dns-standalone: serving on {:?}", server.local_addrs());

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(watch);
        let mut last = stamp(&inputs);
        let mut last_metrics = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = tick.tick() => {
                    let now = stamp(&inputs);
                    if now != last {
                        last = now;
                        let t0 = std::time::Instant::now();
                        match update(&inputs, &mut builder) {
                            Ok(z) => {
                                tracing::info!(serial = z.serial(), services = z.stats().services, took_ms = netd_common::report::millis(t0.elapsed()), "zone reloaded");
                                server.set_zone(z);
                            }
                            Err(e) => tracing::warn!("keeping the last zone: {e:#}"),
                        }
                    }
                    if let Some(p) = &metrics_file {
                        if last_metrics.elapsed() >= Duration::from_millis(200) {
                            last_metrics = std::time::Instant::now();
                            if let Err(e) = write_atomic(p, &serde_json::to_vec_pretty(&server.metrics())?) {
                                tracing::warn!("cannot write metrics: {e:#}");
                            }
                        }
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;
    if let Some(p) = &metrics_file {
        let _ = write_atomic(p, &serde_json::to_vec_pretty(&server.metrics())?);
    }
    eprintln!("netd-dns-standalone: stopping; metrics: {}", serde_json::to_string(&server.metrics())?);
    server.stop();
    Ok(())
}

fn bench_data(out: &Path, n: usize, headless: usize) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let (svcs, slices) = netd_dns::fixtures::synthetic(n, headless);
    std::fs::write(out.join("services.json"), serde_json::to_vec(&svcs)?)?;
    std::fs::write(out.join("slices.json"), serde_json::to_vec(&slices)?)?;
    let cfg = ZoneConfig { serial: Some(1), dns_ips: vec!["10.96.0.10".parse()?], ..ZoneConfig::default() };
    let t0 = std::time::Instant::now();
    let zone = build_zone(&cfg, &svcs, &slices);
    let took = t0.elapsed();
    std::fs::write(out.join("cluster.local.zone"), zone.to_zone_file())?;
    let mut a = String::new();
    let mut nx = String::new();
    let mut srv = String::new();
    for i in 0..n {
        let ns = i % 10;
        a.push_str(&format!("svc-{i}.ns-{ns}.svc.cluster.local A\n"));
        // What a pod's search path produces for an external name: NXDOMAIN in the zone.
        nx.push_str(&format!("www.example{i}.com.ns-{ns}.svc.cluster.local A\n"));
        srv.push_str(&format!("_http._tcp.svc-{i}.ns-{ns}.svc.cluster.local SRV\n"));
    }
    std::fs::write(out.join("queries-a.txt"), a)?;
    std::fs::write(out.join("queries-nx.txt"), nx)?;
    std::fs::write(out.join("queries-srv.txt"), srv)?;
    println!("zone: {} services, {} names, {} records, built in {:.1} ms", zone.stats().services, zone.stats().names, zone.stats().records, took.as_secs_f64() * 1000.0);
    Ok(())
}

fn main() -> Result<()> {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(netd_common::report::use_colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match Cli::parse().cmd {
        Cmd::Serve(a) => {
            let a = *a;
            serve(a.inputs, a.dns, a.watch_interval, a.metrics_file, a.serial)
        }
        Cmd::Zonefile { inputs, cluster_domain, ttl, negative_ttl, cluster_dns_ip, serial } => {
            let cfg = ZoneConfig { domain: cluster_domain, ttl, negative_ttl, dns_ips: cluster_dns_ip.into_iter().collect(), serial: Some(serial) };
            print!("{}", build(&inputs, &cfg)?.to_zone_file());
            Ok(())
        }
        Cmd::BenchData { out, services, headless } => bench_data(&out, services, headless),
        Cmd::Blast { server, queries, seconds, window, rate, sockets } => {
            let qs = blast::load_queries(&queries)?;
            let r = blast::run(server, &qs, seconds, window, rate, sockets)?;
            let rc: Vec<String> = r.rcodes.iter().enumerate().filter(|(_, c)| **c > 0).map(|(i, c)| format!("rcode{i}={c}")).collect();
            println!(
                "qps {:.0} sent {} received {} lost {} p50_us {:.0} p99_us {:.0} p999_us {:.0} p99_all_us {:.0} mean_us {:.1} wait_us {} {}",
                r.qps, r.sent, r.received, r.lost, r.p50_us, r.p99_us, r.p999_us, r.p99_all_us, r.mean_us,
                r.wait_us.map_or("-".to_string(), |w| format!("{w:.0}")), rc.join(" ")
            );
            Ok(())
        }
    }
}
