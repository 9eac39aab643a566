//! Building Services and EndpointSlices by hand: for the unit tests, the fuzz target, the
//! standalone binary's benchmark data, and as documentation of what the zone reads.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::zone::{build_zone, Zone, ZoneConfig};

/// (name, protocol, port); an empty name is an unnamed port.
pub type Port<'a> = (&'a str, &'a str, i32);

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta { namespace: Some(ns.into()), name: Some(name.into()), ..Default::default() }
}

fn service_ports(ports: &[Port<'_>]) -> Vec<ServicePort> {
    ports
        .iter()
        .map(|(n, proto, port)| ServicePort {
            name: (!n.is_empty()).then(|| n.to_string()),
            protocol: Some(proto.to_string()),
            port: *port,
            ..Default::default()
        })
        .collect()
}

/// A ClusterIP service with the given cluster IPs (one per family).
pub fn cluster_ip(ns: &str, name: &str, ips: &[&str], ports: &[Port<'_>]) -> Service {
    Service {
        metadata: meta(ns, name),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: ips.first().map(|s| s.to_string()),
            cluster_ips: Some(ips.iter().map(|s| s.to_string()).collect()),
            ports: Some(service_ports(ports)),
            ..Default::default()
        }),
        status: None,
    }
}

/// A headless service (`clusterIP: None`).
pub fn headless(ns: &str, name: &str, ports: &[Port<'_>]) -> Service {
    Service {
        metadata: meta(ns, name),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some("None".into()),
            cluster_ips: Some(vec!["None".into()]),
            ports: Some(service_ports(ports)),
            ..Default::default()
        }),
        status: None,
    }
}

/// An ExternalName service.
pub fn external_name(ns: &str, name: &str, target: &str) -> Service {
    Service {
        metadata: meta(ns, name),
        spec: Some(ServiceSpec {
            type_: Some("ExternalName".into()),
            external_name: Some(target.into()),
            ..Default::default()
        }),
        status: None,
    }
}

/// One endpoint: addresses, hostname, ready.
pub type Ep<'a> = (&'a [&'a str], Option<&'a str>, bool);

/// An EndpointSlice of service `svc` (address type from the first address).
pub fn slice(ns: &str, svc: &str, slice_name: &str, endpoints: &[Ep<'_>], ports: &[Port<'_>]) -> EndpointSlice {
    let v6 = endpoints.first().and_then(|e| e.0.first()).is_some_and(|a| a.contains(':'));
    let mut m = meta(ns, slice_name);
    m.labels = Some(BTreeMap::from([("kubernetes.io/service-name".to_string(), svc.to_string())]));
    EndpointSlice {
        metadata: m,
        address_type: if v6 { "IPv6" } else { "IPv4" }.into(),
        endpoints: endpoints
            .iter()
            .map(|(addrs, host, ready)| Endpoint {
                addresses: addrs.iter().map(|s| s.to_string()).collect(),
                hostname: host.map(str::to_string),
                conditions: Some(EndpointConditions { ready: Some(*ready), serving: Some(*ready), terminating: Some(false) }),
                ..Default::default()
            })
            .collect(),
        ports: Some(
            ports
                .iter()
                .map(|(n, proto, port)| EndpointPort {
                    name: Some(n.to_string()),
                    protocol: Some(proto.to_string()),
                    port: Some(*port),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

/// The objects of the unit tests and integration tests:
///
/// | service | kind | addresses |
/// | --- | --- | --- |
/// | default/kubernetes | ClusterIP 10.96.0.1 | https 443/TCP |
/// | kube-system/kube-dns | ClusterIP 10.96.0.10 | dns 53/UDP, dns-tcp 53/TCP, metrics 9153/TCP; endpoints 10.244.1.10, 10.244.2.10 |
/// | default/web | ClusterIP 10.96.0.20 | http 80/TCP; ready 10.244.1.5, 10.244.2.6; not ready 10.244.3.7 |
/// | default/db | headless | postgres 5432/TCP; db-0 10.244.1.21, db-1 10.244.2.22 ready; db-2 10.244.3.23 not ready |
/// | default/anon | headless | unnamed 8080/TCP; 10.244.1.31, 10.244.1.32 (no hostnames) |
/// | default/empty | headless | no endpoints |
/// | default/ext | ExternalName www.example.com | |
/// | default/alias | ExternalName web.default.svc.cluster.local | |
/// | dual/web6 | ClusterIP 10.96.0.30, fd00::30 | http 80/TCP |
/// | many/big | headless | 200 ready endpoints 10.244.100.0-199, port 80 |
pub fn sample() -> (Vec<Service>, Vec<EndpointSlice>) {
    let services = vec![
        cluster_ip("default", "kubernetes", &["10.96.0.1"], &[("https", "TCP", 443)]),
        cluster_ip(
            "kube-system",
            "kube-dns",
            &["10.96.0.10"],
            &[("dns", "UDP", 53), ("dns-tcp", "TCP", 53), ("metrics", "TCP", 9153)],
        ),
        cluster_ip("default", "web", &["10.96.0.20"], &[("http", "TCP", 80)]),
        headless("default", "db", &[("postgres", "TCP", 5432)]),
        headless("default", "anon", &[("", "TCP", 8080)]),
        headless("default", "empty", &[("http", "TCP", 80)]),
        external_name("default", "ext", "www.example.com"),
        external_name("default", "alias", "web.default.svc.cluster.local"),
        cluster_ip("dual", "web6", &["10.96.0.30", "fd00::30"], &[("http", "TCP", 80)]),
        headless("many", "big", &[("http", "TCP", 80)]),
    ];
    let big: Vec<String> = (0..200).map(|i| format!("10.244.100.{i}")).collect();
    let big_refs: Vec<[&str; 1]> = big.iter().map(|s| [s.as_str()]).collect();
    let big_eps: Vec<Ep<'_>> = big_refs.iter().map(|a| (&a[..], None, true)).collect();
    let slices = vec![
        slice(
            "kube-system",
            "kube-dns",
            "kube-dns-1",
            &[(&["10.244.1.10"], None, true), (&["10.244.2.10"], None, true)],
            &[("dns", "UDP", 53), ("dns-tcp", "TCP", 53), ("metrics", "TCP", 9153)],
        ),
        slice(
            "default",
            "web",
            "web-1",
            &[(&["10.244.1.5"], None, true), (&["10.244.3.7"], None, false)],
            &[("http", "TCP", 8080)],
        ),
        slice("default", "web", "web-2", &[(&["10.244.2.6"], None, true)], &[("http", "TCP", 8080)]),
        slice(
            "default",
            "db",
            "db-1",
            &[
                (&["10.244.1.21"], Some("db-0"), true),
                (&["10.244.2.22"], Some("db-1"), true),
                (&["10.244.3.23"], Some("db-2"), false),
            ],
            &[("postgres", "TCP", 5432)],
        ),
        slice(
            "default",
            "anon",
            "anon-1",
            &[(&["10.244.1.31"], None, true), (&["10.244.1.32"], None, true)],
            &[("", "TCP", 8080)],
        ),
        slice("many", "big", "big-1", &big_eps, &[("http", "TCP", 80)]),
    ];
    (services, slices)
}

/// The zone of [`sample`] with fixed parameters (serial 1, TTL 30/5, DNS IP 10.96.0.10).
pub fn sample_zone() -> Zone {
    let (svcs, slices) = sample();
    build_zone(&sample_config(), &svcs, &slices)
}

pub fn sample_config() -> ZoneConfig {
    ZoneConfig {
        dns_ips: vec!["10.96.0.10".parse().expect("static")],
        serial: Some(1),
        ..ZoneConfig::default()
    }
}

/// `n` ClusterIP services `svc-<i>` in namespaces `ns-<i % 10>` with one named port each and
/// `headless` headless services `hl-<i>` with 3 endpoints each: benchmark data.
pub fn synthetic(n: usize, headless_n: usize) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut services = Vec::with_capacity(n + headless_n);
    let mut slices = Vec::with_capacity(headless_n);
    for i in 0..n {
        let ip = format!("10.96.{}.{}", 10 + i / 250, 1 + i % 250);
        services.push(cluster_ip(&format!("ns-{}", i % 10), &format!("svc-{i}"), &[&ip], &[("http", "TCP", 80)]));
    }
    for i in 0..headless_n {
        let ns = format!("ns-{}", i % 10);
        let name = format!("hl-{i}");
        services.push(headless(&ns, &name, &[("http", "TCP", 8080)]));
        let addrs: Vec<String> = (0..3).map(|k| format!("10.244.{}.{}", 200 + i / 80, (i % 80) * 3 + k + 1)).collect();
        let a: Vec<[&str; 1]> = addrs.iter().map(|s| [s.as_str()]).collect();
        let eps: Vec<Ep<'_>> = a.iter().map(|x| (&x[..], None, true)).collect();
        slices.push(slice(&ns, &name, &format!("{name}-1"), &eps, &[("http", "TCP", 8080)]));
    }
    (services, slices)
}

/// SkyDNS values (key, JSON) in the cluster domain: the seeds of netd's founding document, an
/// address record for one seed's target (so that the CNAME chase ends in an address), and a
/// CNAME to a Service of [`sample`].
pub const SKYDNS_SEEDS: &[(&str, &str)] = &[
    ("/skydns/local/cluster/svc/default/date", r#"{"host": "date-1-0-0.default.svc.cluster.local.", "port": 7001}"#),
    ("/skydns/local/cluster/svc/default/time", r#"{"host": "time-1-0-0.default.svc.cluster.local.", "port": 7002}"#),
    ("/skydns/local/cluster/svc/default/date-1-0-0", r#"{"host": "10.0.7.1"}"#),
    ("/skydns/local/cluster/svc/default/to-web", r#"{"host": "web.default.svc.cluster.local"}"#),
];

/// [`SKYDNS_SEEDS`] served for the cluster domain (negative TTL 5, serial 1).
pub fn sample_skydns() -> crate::skydns::SkyZone {
    let mut t = crate::skydns::SkyTable::new(crate::skydns::DEFAULT_PREFIX);
    for (k, v) in SKYDNS_SEEDS {
        t.put(k.as_bytes(), v.as_bytes()).expect("the seeds are well-formed");
    }
    t.zone(&["cluster.local".to_string()], 5, 1)
}
