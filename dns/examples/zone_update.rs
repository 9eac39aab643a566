//! Zone update latency at N services (plus N/10 headless ones with 3 endpoints each): one
//! EndpointSlice changes per round (a new endpoint address), and the zone is made again, both
//! by a full rebuild ([`netd_dns::build_zone`]) and by a long-lived [`netd_dns::ZoneBuilder`]
//! fed the whole snapshot (shared `Arc`s, as the agent's registry snapshots are).
//!
//!   cargo run --release -p netd-dns --example zone_update -- [services] [rounds]
//!
//! `INCREMENTAL_ONLY=1` skips the full rebuilds (for profiling the incremental path).
use std::sync::Arc;
use std::time::Instant;

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn summary(mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    format!("median {:.3} ms, max {:.3} ms over {} rounds", v[v.len() / 2], v[v.len() - 1], v.len())
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let rounds: usize = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(20);
    let (svcs, slices) = netd_dns::fixtures::synthetic(n, n / 10);
    let cfg = netd_dns::ZoneConfig { serial: Some(1), ..Default::default() };
    let svcs: Vec<Arc<_>> = svcs.into_iter().map(Arc::new).collect();
    let mut slices: Vec<Arc<_>> = slices.into_iter().map(Arc::new).collect();

    let mut builder = netd_dns::ZoneBuilder::new(cfg.clone());
    let t = Instant::now();
    let z = builder.update(&svcs, &slices);
    println!("first build: {} services, {} names, {} records: {:.1} ms", z.stats().services, z.stats().names, z.stats().records, ms(t));

    let (mut full, mut inc) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let k = r % slices.len();
        let mut s = (*slices[k]).clone();
        s.endpoints[0].addresses[0] = format!("10.245.{}.{}", r / 250, r % 250 + 1);
        slices[k] = Arc::new(s);
        let t = Instant::now();
        let z = builder.update(&svcs, &slices);
        inc.push(ms(t));
        if std::env::var_os("INCREMENTAL_ONLY").is_some() {
            continue;
        }
        // The full rebuild of the same snapshot, for comparison (and as a check).
        let plain_svcs: Vec<_> = svcs.iter().map(|s| (**s).clone()).collect();
        let plain_slices: Vec<_> = slices.iter().map(|s| (**s).clone()).collect();
        let t = Instant::now();
        let f = netd_dns::build_zone(&cfg, &plain_svcs, &plain_slices);
        full.push(ms(t));
        assert_eq!(z.stats(), f.stats());
    }
    if !full.is_empty() {
        println!("one EndpointSlice change, full rebuild:       {}", summary(full));
    }
    println!("one EndpointSlice change, incremental update: {}", summary(inc));
}
