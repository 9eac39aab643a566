//! Control-plane timing of the eBPF dataplane (root): full sync of N services × M endpoints
//! into the maps, then one endpoint change. Maps only (a private bpffs, nothing attached).
//!
//!   cargo run --release -p netd-ebpf --example sync_bench -- [services] [endpoints]

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

use netd_ebpf::{EbpfBackend, EbpfConfig};
use netd_proxy::model::ServicePortPlan;
use netd_proxy::{Endpoint, NsName, Plan, Proto, ServicePortKey};

fn plan(services: u32, eps: u32, bump: Option<u32>) -> Plan {
    let mut p = Plan::default();
    for s in 0..services {
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + s);
        let mut endpoints: Vec<Endpoint> = (0..eps)
            .map(|e| {
                let n = s * eps + e + if bump == Some(s) && e == 0 { 1_000_000 } else { 0 };
                Endpoint { ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + n % 65000), port: 8080 + (n / 65000) as u16, local: false, ready: true, serving: true, terminating: false }
            })
            .collect();
        endpoints.sort();
        let key = ServicePortKey { service: NsName { namespace: "bench".into(), name: format!("s{s}") }, port_name: String::new(), proto: Proto::Tcp };
        let sp = ServicePortPlan {
            slug: key.slug(80).into(),
            key: key.clone(),
            port: 80,
            cluster_ip: Some(vip),
            external_ips: vec![],
            lb_ips: vec![],
            node_port: None,
            affinity_timeout: None,
            external_local: false,
            internal_local: false,
            health_check_node_port: None,
            source_ranges: Vec::new(),
            lists_cluster_ip: true,
            local_endpoints: vec![],
            cluster_endpoints: endpoints,
        };
        p.services.insert(key, Arc::new(sp));
    }
    p
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<u32> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (services, eps) = (args.first().copied().unwrap_or(10_000), args.get(1).copied().unwrap_or(10));
    let mnt = std::env::temp_dir().join(format!("netd-ebpf-bench-{}", std::process::id()));
    std::fs::create_dir_all(&mnt)?;
    let cfg = EbpfConfig { bpffs_dir: mnt.join("netd"), mount_bpffs: true, cgroup: None, ..Default::default() };
    let result = (|| -> Result<(), Box<dyn std::error::Error>> {
        let mut b = EbpfBackend::new(cfg)?;
        let mut p1 = plan(services, eps, None);
        p1.mark_edited();
        let t = Instant::now();
        let r = b.sync_plan(&p1, true)?;
        println!("full sync {services} x {eps}: {:?} ({} map ops)", t.elapsed(), r.size);
        // As the planner does: unchanged services keep their Arc, one service changes, and the
        // new plan says which, relative to the plan applied before (`changes_since`).
        let mut p2 = p1.clone();
        let changed = plan(services, eps, Some(services / 2));
        let name = format!("s{}", services / 2);
        let (k, v) = changed.services.iter().find(|(k, _)| k.service.name == name).unwrap();
        p2.services.insert(k.clone(), v.clone());
        let keys: Arc<[ServicePortKey]> = Arc::from(vec![k.clone()]);
        let last = b.last().unwrap().clone();
        let t = Instant::now();
        let st = netd_ebpf::render(&p2, Some(&last));
        let tr = t.elapsed();
        let ops = netd_ebpf::render::diff(&last, &st);
        println!("  full render {tr:?} + diff {:?} ({} ops), for comparison", t.elapsed() - tr, ops.len());
        drop((st, last));
        let mut times = Vec::new();
        let mut last_size = 0;
        let mut applied = p1.id();
        for i in 0..40 {
            let p = if i % 2 == 0 { &mut p2 } else { &mut p1 };
            p.set_changed_since(applied, keys.clone());
            applied = p.id();
            let t = Instant::now();
            let r = b.sync_plan(p, false)?;
            times.push(t.elapsed());
            last_size = r.size;
        }
        times.sort();
        println!("one endpoint change (in place: render + diff + apply of that service), 40 runs: median {:?}, p90 {:?}, max {:?} ({last_size} map ops)", times[20], times[36], times[39]);
        let t = Instant::now();
        let r = b.sync_plan(&p2, true)?;
        println!("resync (read maps back, nothing to write): {:?} ({} ops)", t.elapsed(), r.size);
        b.remove_all()?;
        Ok(())
    })();
    let _ = std::process::Command::new("umount").arg("-l").arg(&mnt).status();
    let _ = std::fs::remove_dir(&mnt);
    result
}
