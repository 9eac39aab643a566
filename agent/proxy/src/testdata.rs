//! Fixtures shared by the unit tests, the root tests, the benchmark and (later) the end-to-end
//! tests: a node, snapshots exercising every feature, and generated snapshots of any size.

use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

use crate::model::NodeInfo;
use crate::snapshot::ServiceSnapshot;

pub fn svc(v: serde_json::Value) -> Service {
    serde_json::from_value(v).expect("valid Service JSON")
}

pub fn slice(v: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(v).expect("valid EndpointSlice JSON")
}

/// node0 of the test bed: 198.18.0.10, pods 10.244.1.0/24 of 10.244.0.0/16.
pub fn node() -> NodeInfo {
    NodeInfo {
        name: "node0".into(),
        ips: vec![Ipv4Addr::new(198, 18, 0, 10)],
        pod_cidr: Some("10.244.1.0/24".parse().expect("valid")),
        cluster_cidr: Some("10.244.0.0/16".parse().expect("valid")),
        local_service_ips: Vec::new(),
    }
}

/// `default/web`: NodePort, external IP, ClientIP affinity, a TCP and a UDP port, endpoints on
/// node0 and node1, one of them terminating.
pub fn web_snapshot() -> ServiceSnapshot {
    ServiceSnapshot::from_objects(
        [svc(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "externalIPs": ["198.18.0.200"],
                     "sessionAffinity": "ClientIP",
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080},
                               {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]}
        }))],
        [slice(json!({
            "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": ["10.244.1.5"], "nodeName": "node0"},
                {"addresses": ["10.244.2.7"], "nodeName": "node1", "conditions": {"ready": true}},
                {"addresses": ["10.244.2.8"], "nodeName": "node1", "conditions": {"ready": false, "serving": true, "terminating": true}}
            ]
        }))],
    )
}

/// [`web_snapshot`] plus a service without endpoints, a LoadBalancer with
/// externalTrafficPolicy Local and loadBalancerSourceRanges, one with externalTrafficPolicy Local
/// and no endpoint on node0, an SCTP service with internalTrafficPolicy Local, a TCP and a UDP
/// port of one number, a service of another proxy, and the cluster's service range.
pub fn feature_snapshot() -> ServiceSnapshot {
    let mut s = web_snapshot();
    for v in [
        json!({"metadata": {"name": "empty", "namespace": "default"},
               "spec": {"type": "NodePort", "clusterIP": "10.96.0.40", "ports": [{"port": 80, "nodePort": 30040}]}}),
        json!({"metadata": {"name": "lb", "namespace": "prod"},
               "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.50", "externalTrafficPolicy": "Local",
                        "healthCheckNodePort": 32000, "ports": [{"port": 443, "nodePort": 30443}],
                        "loadBalancerSourceRanges": ["198.18.0.0/24", " 203.0.113.0/25"]},
               "status": {"loadBalancer": {"ingress": [{"ip": "198.18.0.210"}]}}}),
        json!({"metadata": {"name": "remote", "namespace": "prod"},
               "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.51", "externalTrafficPolicy": "Local",
                        "healthCheckNodePort": 32001, "ports": [{"port": 80, "nodePort": 30081}]},
               "status": {"loadBalancer": {"ingress": [{"ip": "198.18.0.211"}]}}}),
        json!({"metadata": {"name": "dual", "namespace": "default"},
               "spec": {"clusterIP": "10.96.0.70", "ports": [{"name": "dns-tcp", "port": 53}, {"name": "dns-udp", "port": 53, "protocol": "UDP"}]}}),
        json!({"metadata": {"name": "other", "namespace": "default", "labels": {"service.kubernetes.io/service-proxy-name": "someone-else"}},
               "spec": {"clusterIP": "10.96.0.80", "ports": [{"port": 80}]}}),
        json!({"metadata": {"name": "itp", "namespace": "prod"},
               "spec": {"clusterIP": "10.96.0.60", "internalTrafficPolicy": "Local", "ports": [{"port": 7000, "protocol": "SCTP"}]}}),
    ] {
        s.put_service(Arc::new(svc(v)));
    }
    for v in [
        json!({"metadata": {"name": "lb-1", "namespace": "prod", "labels": {"kubernetes.io/service-name": "lb"}},
               "addressType": "IPv4", "ports": [{"port": 8443}],
               "endpoints": [{"addresses": ["10.244.1.9"], "nodeName": "node0"}, {"addresses": ["10.244.2.9"], "nodeName": "node1"}]}),
        json!({"metadata": {"name": "itp-1", "namespace": "prod", "labels": {"kubernetes.io/service-name": "itp"}},
               "addressType": "IPv4", "ports": [{"port": 7000, "protocol": "SCTP"}],
               "endpoints": [{"addresses": ["10.244.2.10"], "nodeName": "node1"}]}),
        json!({"metadata": {"name": "remote-1", "namespace": "prod", "labels": {"kubernetes.io/service-name": "remote"}},
               "addressType": "IPv4", "ports": [{"port": 8080}],
               "endpoints": [{"addresses": ["10.244.2.11"], "nodeName": "node1"}]}),
        json!({"metadata": {"name": "dual-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "dual"}},
               "addressType": "IPv4", "ports": [{"name": "dns-tcp", "port": 53}, {"name": "dns-udp", "port": 53, "protocol": "UDP"}],
               "endpoints": [{"addresses": ["10.244.1.6"], "nodeName": "node0"}]}),
        json!({"metadata": {"name": "other-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "other"}},
               "addressType": "IPv4", "ports": [{"port": 80}],
               "endpoints": [{"addresses": ["10.244.1.7"], "nodeName": "node0"}]}),
    ] {
        s.put_slice(Arc::new(slice(v)));
    }
    s.cluster_config = Some(crate::registry::ClusterConfig::default());
    s
}

/// The i-th generated ClusterIP: 10.96.0.0/12 from 10.96.1.0 on.
pub fn generated_vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 1, 0)) + i as u32)
}

/// A generated service `bench/svc-<i>` (ClusterIP, TCP 80).
pub fn generated_service(i: usize) -> Service {
    svc(json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
        "spec": {"clusterIP": generated_vip(i).to_string(), "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))
}

/// The slice of generated service `i` with `endpoints` endpoints (10.244.x.y, port `port`),
/// shifted by `generation` so a new generation is a real endpoint change.
pub fn generated_slice(i: usize, endpoints: usize, port: u16, generation: u32) -> EndpointSlice {
    let eps: Vec<serde_json::Value> = (0..endpoints)
        .map(|e| {
            let n = u32::from(Ipv4Addr::new(10, 244, 0, 0)) + ((i * endpoints + e) as u32 + generation * 1009) % 65000 + 2;
            json!({"addresses": [Ipv4Addr::from(n).to_string()], "nodeName": "node1"})
        })
        .collect();
    slice(json!({
        "metadata": {"name": format!("svc-{i}-1"), "namespace": "bench", "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": port}], "endpoints": eps
    }))
}

/// `n` generated services with `endpoints` endpoints each.
pub fn generated_snapshot(n: usize, endpoints: usize, port: u16) -> ServiceSnapshot {
    let mut s = ServiceSnapshot::new();
    for i in 0..n {
        s.put_service(Arc::new(generated_service(i)));
        s.put_slice(Arc::new(generated_slice(i, endpoints, port, 0)));
    }
    s
}
