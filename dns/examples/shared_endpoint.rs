//! Zone build time when N ClusterIP services share one ready endpoint address (their reverse
//! name then has N PTRs), and the cost of an update that touches that address (one service's
//! slice gains a second endpoint).
//!
//!   cargo run -p netd-dns --example shared_endpoint -- [services]
use std::sync::Arc;
use std::time::Instant;

use netd_dns::fixtures::{cluster_ip, slice};

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(4_000);
    let mut svcs = Vec::with_capacity(n);
    let mut slices = Vec::with_capacity(n);
    for i in 0..n {
        let (ns, name) = (format!("ns-{}", i % 10), format!("svc-{i}"));
        let ip = format!("10.96.{}.{}", 10 + i / 250, 1 + i % 250);
        svcs.push(Arc::new(cluster_ip(&ns, &name, &[&ip], &[("http", "TCP", 80)])));
        slices.push(Arc::new(slice(&ns, &name, &format!("{name}-1"), &[(&["10.244.0.5"], None, true)], &[("http", "TCP", 80)])));
    }
    let cfg = netd_dns::ZoneConfig { serial: Some(1), ..Default::default() };
    let mut builder = netd_dns::ZoneBuilder::new(cfg);
    let t = Instant::now();
    let z = builder.update(&svcs, &slices);
    println!("first build: {} services sharing one endpoint, {} names, {} records: {:.1} ms", n, z.stats().names, z.stats().records, t.elapsed().as_secs_f64() * 1e3);
    slices[0] = Arc::new(slice("ns-0", "svc-0", "svc-0-1", &[(&["10.244.0.5"], None, true), (&["10.244.0.6"], None, true)], &[("http", "TCP", 80)]));
    let t = Instant::now();
    let z = builder.update(&svcs, &slices);
    println!("update touching the shared address: {} records: {:.1} ms", z.stats().records, t.elapsed().as_secs_f64() * 1e3);
}
