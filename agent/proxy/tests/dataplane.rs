//! Every dataplane feature with real clients (curl, socat UDP) in pod namespaces and in an
//! "outside" namespace, on both backends, with `run_proxy` running inside the node namespace.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use common::*;
use netd_proxy::testdata::{slice, svc};
use netd_proxy::{NodeInfo, ProxyConfig, ProxyMode, ServiceSnapshot};
use serde_json::json;

fn node_info() -> NodeInfo {
    NodeInfo {
        name: "node0".into(),
        ips: vec![ip(NODE_IP)],
        pod_cidr: Some("10.244.1.0/24".parse().unwrap()),
        cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
        local_service_ips: Vec::new(),
    }
}

fn config(mode: ProxyMode) -> ProxyConfig {
    let mut c = ProxyConfig::new(node_info(), mode);
    c.resync_interval = Duration::from_secs(1);
    c.iptables_restore = "iptables-legacy-restore".into();
    c
}

fn eps(name: &str, svc_name: &str, port: u16, proto: &str, ips: &[&str]) -> serde_json::Value {
    let e: Vec<serde_json::Value> = ips.iter().map(|i| json!({"addresses": [i], "nodeName": "node0"})).collect();
    json!({"metadata": {"name": name, "namespace": "t", "labels": {"kubernetes.io/service-name": svc_name}},
           "addressType": "IPv4", "ports": [{"port": port, "protocol": proto}], "endpoints": e})
}

/// The services of the feature test; `dns_eps` are the UDP service's endpoints.
fn snapshot(rev: i64, dns_eps: &[&str]) -> ServiceSnapshot {
    let services = [
        json!({"metadata": {"name": "web", "namespace": "t"}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
            "externalIPs": ["198.18.0.200"], "ports": [{"port": 80, "nodePort": 30080}]}}),
        json!({"metadata": {"name": "dns", "namespace": "t"}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.11",
            "ports": [{"port": 53, "protocol": "UDP", "nodePort": 30053}]}}),
        json!({"metadata": {"name": "empty", "namespace": "t"}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.12",
            "ports": [{"port": 80, "nodePort": 30012}]}}),
        json!({"metadata": {"name": "sticky", "namespace": "t"}, "spec": {"clusterIP": "10.96.0.13", "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}, "ports": [{"port": 80}]}}),
        json!({"metadata": {"name": "lb", "namespace": "t"}, "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.14",
            "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000, "ports": [{"port": 80, "nodePort": 30014}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.18.0.210"}]}}}),
        json!({"metadata": {"name": "self", "namespace": "t"}, "spec": {"clusterIP": "10.96.0.15", "ports": [{"port": 80}]}}),
    ];
    let slices = [
        eps("web-1", "web", 8080, "TCP", &["10.244.1.3", "10.244.1.4"]),
        eps("dns-1", "dns", 5353, "UDP", dns_eps),
        eps("sticky-1", "sticky", 8080, "TCP", &["10.244.1.3", "10.244.1.4"]),
        eps("lb-1", "lb", 8080, "TCP", &["10.244.1.3"]),
        eps("self-1", "self", 8080, "TCP", &["10.244.1.2"]),
    ];
    let mut s = ServiceSnapshot::from_objects(services.into_iter().map(svc), slices.into_iter().map(slice));
    s.revision = rev;
    s
}

fn bed() -> Result<Bed> {
    let mut bed = Bed::new()?;
    bed.add_pod("a", 2)?;
    bed.add_pod("b", 3)?;
    bed.add_pod("c", 4)?;
    for p in ["a", "b", "c"] {
        bed.http_server(p, 8080)?;
    }
    bed.udp_server("b", 5353)?;
    bed.udp_server("c", 5353)?;
    Ok(bed)
}

fn one_of(body: &str, names: &[&str]) -> Result<()> {
    ensure!(names.contains(&body), "answer {body:?} is not one of {names:?}");
    Ok(())
}

fn features(mode: ProxyMode) -> Result<()> {
    let bed = bed()?;
    let proxy = ProxyHandle::start(&bed.node, config(mode), snapshot(1, &["10.244.1.3"]));
    proxy.wait_applied(1)?;
    let a = bed.pod("a");

    // ClusterIP TCP from a pod, and from the node itself.
    let body = eventually(|| curl(a, "http://10.96.0.10/").map_err(|c| anyhow::anyhow!("curl exit {c}")))?;
    one_of(&body, &["b", "c"])?;
    one_of(&eventually(|| curl(&bed.node, "http://10.96.0.10/").map_err(|c| anyhow::anyhow!("curl exit {c}")))?, &["b", "c"])?;
    // Both endpoints are used.
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        seen.insert(curl(a, "http://10.96.0.10/").unwrap_or_default());
    }
    ensure!(seen.contains("b") && seen.contains("c"), "load balancing used only {seen:?}");

    // ClusterIP UDP.
    ensure!(eventually(|| udp(a, "10.96.0.11:53"))?.starts_with("b "), "UDP through the ClusterIP");

    // No endpoints: refused at once (TCP reset / ICMP), not a timeout (curl exit 7, not 28).
    assert_eq!(curl(a, "http://10.96.0.12/"), Err(7), "ClusterIP without endpoints");
    assert_eq!(curl(&bed.outside, &format!("http://{NODE_IP}:30012/")), Err(7), "NodePort without endpoints");

    // Session affinity: one client always lands on the same endpoint.
    let first = curl(a, "http://10.96.0.13/").map_err(|c| anyhow::anyhow!("curl exit {c}"))?;
    for _ in 0..15 {
        assert_eq!(curl(a, "http://10.96.0.13/").unwrap_or_default(), first, "ClientIP affinity");
    }

    // From outside: NodePort, external IP, load-balancer IP; UDP NodePort.
    one_of(&eventually(|| curl(&bed.outside, &format!("http://{NODE_IP}:30080/")).map_err(|c| anyhow::anyhow!("curl exit {c}")))?, &["b", "c"])?;
    one_of(&curl(&bed.outside, "http://198.18.0.200/").map_err(|c| anyhow::anyhow!("external IP: curl exit {c}"))?, &["b", "c"])?;
    assert_eq!(curl(&bed.outside, "http://198.18.0.210/").map_err(|c| anyhow::anyhow!("LB IP: curl exit {c}"))?, "b");
    let got = eventually(|| udp(&bed.outside, &format!("{NODE_IP}:30053")).and_then(|g| if g.is_empty() { bail!("no answer") } else { Ok(g) }))?;
    ensure!(got.starts_with("b "), "UDP NodePort: {got:?}");

    // externalTrafficPolicy Local: the health check reports the local endpoint.
    let health = eventually(|| curl(&bed.outside, &format!("http://{NODE_IP}:32000/")).map_err(|c| anyhow::anyhow!("curl exit {c}")))?;
    ensure!(health.contains("\"localEndpoints\":1") && health.contains("\"name\":\"lb\""), "{health}");

    // Hairpin: a pod reaches itself through its own service.
    assert_eq!(curl(a, "http://10.96.0.15/").map_err(|c| anyhow::anyhow!("hairpin: curl exit {c}"))?, "a");

    // The UDP endpoint moves from b to c: the same client flow (same source port) follows,
    // because the stale conntrack entry is flushed.
    let flow = |bed: &Bed| -> Result<String> {
        eventually(|| udp(bed.pod("a"), "10.96.0.11:53,sourceport=40000,reuseaddr"))
    };
    ensure!(flow(&bed)?.starts_with("b "));
    proxy.publish(snapshot(2, &["10.244.1.4"]));
    proxy.wait_applied(2)?;
    let moved = flow(&bed)?;
    ensure!(moved.starts_with("c "), "after the endpoint change the flow still goes to {moved:?}");
    Ok(())
}

#[test]
fn nftables_features() -> Result<()> {
    features(ProxyMode::Nftables)
}

#[test]
fn iptables_features() -> Result<()> {
    features(ProxyMode::Iptables)
}

/// What the kernel shows of our rules (handles and order included).
fn listing(bed: &Bed, mode: ProxyMode) -> Result<String> {
    Ok(match mode {
        ProxyMode::Nftables => bed.node.run(&["nft", "-a", "list", "table", "ip", "netd-proxy"])?,
        _ => {
            let nat = bed.node.run(&["iptables-legacy-save", "-t", "nat"])?;
            let filter = bed.node.run(&["iptables-legacy-save", "-t", "filter"])?;
            format!("{nat}{filter}").lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n")
        }
    })
}

fn restart_keeps_rules(mode: ProxyMode) -> Result<()> {
    let bed = bed()?;
    let proxy = ProxyHandle::start(&bed.node, config(mode), snapshot(1, &["10.244.1.3"]));
    proxy.wait_applied(1)?;
    let before = listing(&bed, mode)?;
    drop(proxy);
    let proxy = ProxyHandle::start(&bed.node, config(mode), snapshot(1, &["10.244.1.3"]));
    proxy.wait_applied(1)?;
    // Let a resync pass too.
    let syncs = proxy.status.borrow().syncs;
    netd_tests::wait_until(WAIT, POLL, || Ok(proxy.status.borrow().syncs > syncs + 1))?;
    let after = listing(&bed, mode)?;
    if before != after {
        bail!("a restart changed the rules:\n--- before\n{before}\n--- after\n{after}");
    }
    one_of(&curl(bed.pod("a"), "http://10.96.0.10/").map_err(|c| anyhow::anyhow!("curl exit {c}"))?, &["b", "c"])?;
    Ok(())
}

#[test]
fn nftables_restart_neither_flushes_nor_reorders() -> Result<()> {
    restart_keeps_rules(ProxyMode::Nftables)
}

#[test]
fn iptables_restart_neither_flushes_nor_reorders() -> Result<()> {
    restart_keeps_rules(ProxyMode::Iptables)
}

fn thousand_services(mode: ProxyMode) -> Result<()> {
    let bed = bed()?;
    let mut snap = ServiceSnapshot::new();
    for i in 0..1000usize {
        snap.put_service(Arc::new(netd_proxy::testdata::generated_service(i)));
        snap.put_slice(Arc::new(slice(json!({
            "metadata": {"name": format!("svc-{i}-1"), "namespace": "bench", "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.244.1.3"], "nodeName": "node0"}, {"addresses": ["10.244.1.4"], "nodeName": "node0"}]}))));
    }
    snap.revision = 7;
    let proxy = ProxyHandle::start(&bed.node, config(mode), snap);
    proxy.wait_applied(7)?;
    ensure!(proxy.status.borrow().services == 1000);
    for i in [0usize, 1, 499, 998, 999] {
        let vip = netd_proxy::testdata::generated_vip(i);
        one_of(&eventually(|| curl(bed.pod("a"), &format!("http://{vip}/")).map_err(|c| anyhow::anyhow!("{vip}: curl exit {c}")))?, &["b", "c"])?;
    }
    Ok(())
}

#[test]
fn nftables_1000_services() -> Result<()> {
    thousand_services(ProxyMode::Nftables)
}

#[test]
fn iptables_1000_services() -> Result<()> {
    thousand_services(ProxyMode::Iptables)
}
