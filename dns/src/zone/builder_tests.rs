//! The incremental builder against a fresh one: after any sequence of snapshots, the zone a
//! long-lived [`ZoneBuilder`] publishes must equal what a new builder makes from the last
//! snapshot alone (the level-triggered contract: history never shows). Random snapshots are
//! drawn from a small universe so that services collide where they can: shared endpoint and
//! cluster addresses (merged PTRs), ExternalName chains and loops through other services,
//! slices without their Service, invalid objects.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::fixtures;

/// Everything a zone answers with, in a comparable form.
fn dump(z: &Zone) -> (BTreeMap<Vec<u8>, String>, String) {
    let mut m = BTreeMap::new();
    for (k, e) in z.names.iter() {
        let kind = match &e.kind {
            Kind::Zone => "zone".to_string(),
            Kind::Reverse => "reverse".to_string(),
            Kind::External(x) => format!("external {:?} {:?}", x.chain, x.target),
        };
        let answers: Vec<(u16, &[u8])> = e.answers.iter().map(|(t, p)| (*t, &*p.bytes)).collect();
        let v = format!("{kind} {answers:?} {:?} {:?}", e.fallback.as_ref().map(|p| &p.bytes), e.rrs);
        m.insert(k.to_vec(), v);
    }
    let s = z.stats();
    let head = format!(
        "serial {} synced {} services {} headless {} ext {} endpoints {} names {} records {} skipped {:?}",
        z.serial, z.synced, s.services, s.headless, s.external_names, s.endpoints, s.names, s.records, s.skipped
    );
    assert_eq!(s.names, m.len(), "the name count matches the table");
    (m, head)
}

const NAMESPACES: [&str; 4] = ["default", "kube-system", "apps", "Bad"];
const NAMES: [&str; 7] = ["web", "db", "api", "cache", "alias", "ext", "Upper"];

fn ip(rng: &mut StdRng, v6: bool) -> String {
    if v6 {
        format!("fd00::{:x}", rng.gen_range(1..6))
    } else {
        format!("10.244.0.{}", rng.gen_range(1..16))
    }
}

fn random_service(rng: &mut StdRng, ns: &str, name: &str) -> Service {
    let ports: Vec<(&str, &str, i32)> = match rng.gen_range(0..4) {
        0 => vec![],
        1 => vec![("http", "TCP", 80)],
        2 => vec![("", "TCP", 8080), ("dns", "UDP", 53)],
        _ => vec![("http", "TCP", 80), ("Bad_Port", "TCP", 81), ("grpc", "SCTP", 9000)],
    };
    match rng.gen_range(0..10) {
        0..=3 => {
            let a = format!("10.96.0.{}", rng.gen_range(1..6));
            let ips: Vec<String> = if rng.gen_bool(0.3) { vec![a, format!("fd00:96::{}", rng.gen_range(1..4))] } else { vec![a] };
            let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
            fixtures::cluster_ip(ns, name, if rng.gen_bool(0.1) { &[] } else { &refs }, &ports)
        }
        4..=6 => {
            let mut s = fixtures::headless(ns, name, &ports);
            if rng.gen_bool(0.3) {
                s.spec.as_mut().unwrap().publish_not_ready_addresses = Some(true);
            }
            s
        }
        7 | 8 => {
            let target = match rng.gen_range(0..5) {
                0 => "www.example.com".to_string(),
                1 => "10.1.2.3".to_string(),
                _ => format!(
                    "{}.{}.svc.cluster.local",
                    NAMES[rng.gen_range(0..NAMES.len())].to_ascii_lowercase(),
                    NAMESPACES[rng.gen_range(0..3)]
                ),
            };
            fixtures::external_name(ns, name, &target)
        }
        _ => {
            let mut s = fixtures::cluster_ip(ns, name, &["10.96.0.9"], &ports);
            s.spec = None;
            s
        }
    }
}

fn random_slice(rng: &mut StdRng, ns: &str, svc: &str, slice_name: &str) -> EndpointSlice {
    let v6 = rng.gen_bool(0.2);
    let n = rng.gen_range(0..4);
    let addrs: Vec<[String; 1]> = (0..n).map(|_| [ip(rng, v6)]).collect();
    let refs: Vec<[&str; 1]> = addrs.iter().map(|a| [a[0].as_str()]).collect();
    let hosts: Vec<Option<&str>> = (0..n).map(|i| match rng.gen_range(0..4) {
        0 => Some(["h0", "h1", "Bad_Host"][i % 3]),
        _ => None,
    }).collect();
    let eps: Vec<fixtures::Ep<'_>> = refs.iter().zip(&hosts).map(|(a, h)| (&a[..], *h, rng.gen_bool(0.8))).collect();
    let ports: &[fixtures::Port<'_>] = if rng.gen_bool(0.5) { &[("http", "TCP", 8080)] } else { &[("", "UDP", 53), ("metrics", "TCP", 9100)] };
    let mut s = fixtures::slice(ns, svc, slice_name, &eps, ports);
    if rng.gen_bool(0.05) {
        s.metadata.labels = None;
    }
    s
}

/// A snapshot: services and slices by key, as `Arc`s that survive unchanged between steps.
#[derive(Clone, Default)]
struct World {
    services: BTreeMap<(String, String), Arc<Service>>,
    slices: BTreeMap<(String, String), Arc<EndpointSlice>>,
}

impl World {
    fn mutate(&mut self, rng: &mut StdRng) {
        for _ in 0..rng.gen_range(1..4) {
            let ns = NAMESPACES[rng.gen_range(0..NAMESPACES.len())];
            let name = NAMES[rng.gen_range(0..NAMES.len())];
            let k = (ns.to_string(), name.to_string());
            match rng.gen_range(0..10) {
                0..=2 => {
                    self.services.insert(k, Arc::new(random_service(rng, ns, name)));
                }
                3 => {
                    self.services.remove(&k);
                }
                4..=6 => {
                    let sk = (ns.to_string(), format!("{name}-{}", rng.gen_range(0..2)));
                    self.slices.insert(sk.clone(), Arc::new(random_slice(rng, ns, name, &sk.1)));
                }
                7 => {
                    let sk = (ns.to_string(), format!("{name}-{}", rng.gen_range(0..2)));
                    self.slices.remove(&sk);
                }
                8 => {
                    // Same content, new allocation (a relist): must be recognised as unchanged.
                    if let Some(s) = self.services.get_mut(&k) {
                        *s = Arc::new((**s).clone());
                    }
                }
                _ => {
                    // The same Service object under a changed spec detail.
                    if let Some(s) = self.services.get_mut(&k) {
                        let mut svc = (**s).clone();
                        if let Some(spec) = svc.spec.as_mut() {
                            spec.publish_not_ready_addresses = Some(!spec.publish_not_ready_addresses.unwrap_or(false));
                        }
                        *s = Arc::new(svc);
                    }
                }
            }
        }
    }
}

fn config(serial: u32) -> ZoneConfig {
    ZoneConfig { serial: Some(serial), dns_ips: vec!["10.96.0.10".parse().unwrap()], ..ZoneConfig::default() }
}

#[test]
fn incremental_updates_equal_a_fresh_build() {
    for seed in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut world = World::default();
        let mut inc = ZoneBuilder::new(config(1));
        for step in 0..40 {
            world.mutate(&mut rng);
            let z = inc.update(world.services.values(), world.slices.values());
            let fresh = ZoneBuilder::new(config(1)).update(world.services.values(), world.slices.values());
            let (a, ha) = dump(&z);
            let (b, hb) = dump(&fresh);
            assert_eq!(ha, hb, "seed {seed} step {step}");
            if a != b {
                for k in a.keys().chain(b.keys()) {
                    if a.get(k) != b.get(k) {
                        panic!(
                            "seed {seed} step {step}: {}\n incremental: {:?}\n fresh: {:?}",
                            wire::name_to_string(k),
                            a.get(k),
                            b.get(k)
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn an_unchanged_snapshot_returns_the_same_zone_and_a_change_shares_the_rest() {
    let (svcs, slices) = fixtures::sample();
    let svcs: Vec<Arc<Service>> = svcs.into_iter().map(Arc::new).collect();
    let mut slices: Vec<Arc<EndpointSlice>> = slices.into_iter().map(Arc::new).collect();
    let mut b = ZoneBuilder::new(config(1));
    let z1 = b.update(&svcs, &slices);
    // Equal objects in new allocations: nothing to do.
    let copies: Vec<Arc<Service>> = svcs.iter().map(|s| Arc::new((**s).clone())).collect();
    assert!(Arc::ptr_eq(&z1, &b.update(&copies, &slices)));
    // One endpoint moves: the new address answers, the old one is gone, the rest is as it was.
    let i = slices.iter().position(|s| s.metadata.name.as_deref() == Some("web-2")).unwrap();
    let mut s = (*slices[i]).clone();
    s.endpoints[0].addresses = vec!["10.244.9.9".into()];
    slices[i] = Arc::new(s);
    let z2 = b.update(&svcs, &slices);
    let key = |n: &str| wire::name_from_str(n).unwrap();
    assert!(z2.names.get(&key("9.9.244.10.in-addr.arpa.")).is_some());
    assert!(z2.names.get(&key("6.2.244.10.in-addr.arpa.")).is_none());
    assert!(z1.names.get(&key("6.2.244.10.in-addr.arpa.")).is_some(), "the old zone is untouched");
    assert_eq!(dump(&z2), dump(&build_zone(&config(1), &svcs.iter().map(|s| (**s).clone()).collect::<Vec<_>>(), &slices.iter().map(|s| (**s).clone()).collect::<Vec<_>>())));
}

/// 5,000 services behind one endpoint address: its reverse name has a PTR per service, in
/// service order, and stays right when services leave (the merged PTRs are redone). Building
/// it used to compare every PTR with all before it (minutes in a debug build).
#[test]
fn many_services_sharing_an_endpoint_address() {
    const N: usize = 5_000;
    let mut svcs = Vec::with_capacity(N);
    let mut slices = Vec::with_capacity(N);
    for i in 0..N {
        let (ns, name) = (format!("ns-{}", i % 10), format!("svc-{i:04}"));
        let ip = format!("10.96.{}.{}", 10 + i / 250, 1 + i % 250);
        svcs.push(Arc::new(fixtures::cluster_ip(&ns, &name, &[&ip], &[("http", "TCP", 80)])));
        slices.push(Arc::new(fixtures::slice(&ns, &name, &format!("{name}-1"), &[(&["10.244.0.5"], None, true)], &[("http", "TCP", 80)])));
    }
    let key = wire::name_from_str("5.0.244.10.in-addr.arpa.").unwrap();
    let ptrs = |z: &Zone| -> Vec<String> {
        z.names.get(&key).unwrap().rrs.iter().map(|r| match r.data() {
            RData::PTR(p) => p.0.to_string(),
            d => panic!("{d:?}"),
        }).collect()
    };
    let mut b = ZoneBuilder::new(config(1));
    let z = b.update(&svcs, &slices);
    let p = ptrs(&z);
    assert_eq!(p.len(), N);
    assert_eq!(p[0], "10-244-0-5.svc-0000.ns-0.svc.cluster.local.");
    assert_eq!(p[1], "10-244-0-5.svc-0010.ns-0.svc.cluster.local.", "in service key order");
    assert_eq!(z.stats().endpoints, 1);
    // Per service: A and SRV at the service name, SRV at _http._tcp, A at the endpoint name,
    // the PTRs of its cluster IP and of the shared endpoint address.
    let fixed = ZoneBuilder::new(config(1)).update(&[], &[]).stats().records;
    assert_eq!(z.stats().records, fixed + 6 * N);

    // Every other service leaves; one service's endpoint becomes not ready.
    let keep: Vec<usize> = (0..N).filter(|i| i % 2 == 0).collect();
    let svcs: Vec<Arc<Service>> = keep.iter().map(|&i| svcs[i].clone()).collect();
    let mut slices: Vec<Arc<EndpointSlice>> = keep.iter().map(|&i| slices[i].clone()).collect();
    slices[0] = Arc::new(fixtures::slice("ns-0", "svc-0000", "svc-0000-1", &[(&["10.244.0.5"], None, false)], &[("http", "TCP", 80)]));
    let z = b.update(&svcs, &slices);
    let p = ptrs(&z);
    assert_eq!(p.len(), N / 2 - 1);
    assert_eq!(p[0], "10-244-0-5.svc-0010.ns-0.svc.cluster.local.");
    assert_eq!(dump(&z), dump(&ZoneBuilder::new(config(1)).update(&svcs, &slices)));
}
