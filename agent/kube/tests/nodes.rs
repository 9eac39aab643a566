//! `--subnet-manager kube`: this node's subnet from `spec.podCIDR`, its flannel annotations, and
//! the peers from every Node's annotations, as flannel's kube subnet manager does.
//!
//! These tests run against `netd_kube::testserver::FakeApiServer` on 127.0.0.1, a fake API
//! server implementing get, list, watch and merge/strategic-merge PATCH (incl. the `status`
//! subresource). No real API server can run on these machines; the Nodes are the fixtures in
//! `testdata/`, hand-written in exactly the shape kube-apiserver returns them (a flanneld node
//! in kube mode, a fresh node, a node without podCIDR). No assertion depends on timing.

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use netd_kube::testserver::{FakeApiServer, Kind};
use netd_kube::{node_subnet_with, publish_annotations, run_node_watch, run_node_watch_with, Annotations, NodeAttrs, NodeLease, SourceStatus};
use serde_json::{json, Value};
use tokio::sync::watch;

const POLL: Duration = Duration::from_millis(10);

async fn server_with_nodes() -> FakeApiServer {
    let server = FakeApiServer::start().await.expect("fake API server on 127.0.0.1");
    for f in ["node-flannel.json", "node-self.json", "node-no-podcidr.json"] {
        server.load(&fixture(f)).expect(f);
    }
    server
}

fn netd_attrs() -> NodeAttrs {
    NodeAttrs {
        public_ip: Ipv4Addr::new(192, 0, 2, 12),
        backend_type: "vxlan".into(),
        backend_data: Some(json!({ "VNI": 1, "VtepMAC": "0e:6f:c0:00:02:0c" })),
    }
}

fn annotations_of(server: &FakeApiServer, node: &str) -> serde_json::Map<String, Value> {
    server.get(Kind::Node, "", node).expect("node")["metadata"]["annotations"].as_object().cloned().unwrap_or_default()
}

#[tokio::test]
async fn node_subnet_is_the_pod_cidr() {
    let server = server_with_nodes().await;
    let client = server.client().expect("client");
    let net = guard("podCIDR", node_subnet_with(&client, "worker-1", POLL)).await.expect("subnet");
    assert_eq!(net.to_string(), "10.244.1.0/24");
}

#[tokio::test]
async fn node_subnet_waits_until_the_node_gets_a_pod_cidr() {
    let server = server_with_nodes().await;
    let client = server.client().expect("client");
    let waiting = tokio::spawn(async move { node_subnet_with(&client, "worker-3", POLL).await });
    // It keeps asking while the Node has no podCIDR.
    guard("repeated gets", server.wait_until(|s| s.requests_of("get", Kind::Node).len() >= 3)).await;
    assert!(!waiting.is_finished());

    let mut node = fixture_json("node-no-podcidr.json");
    node["spec"]["podCIDR"] = json!("10.244.3.0/24");
    node["spec"]["podCIDRs"] = json!(["10.244.3.0/24"]);
    server.apply(node).expect("assign podCIDR");
    let net = guard("the subnet", waiting).await.expect("no panic").expect("subnet");
    assert_eq!(net.to_string(), "10.244.3.0/24");
}

#[tokio::test]
async fn node_subnet_waits_for_a_node_not_registered_yet_and_refuses_an_ipv6_only_one() {
    let server = server_with_nodes().await;
    let client = server.client().expect("client");
    let c = client.clone();
    let waiting = tokio::spawn(async move { node_subnet_with(&c, "late", POLL).await });
    guard("404s", server.wait_until(|s| s.requests().iter().filter(|r| r.status == 404).count() >= 2)).await;
    let mut node = fixture_json("node-self.json");
    node["metadata"]["name"] = json!("late");
    server.apply(node).expect("late node");
    assert_eq!(guard("the subnet", waiting).await.expect("no panic").expect("subnet").to_string(), "10.244.2.0/24");

    let mut v6 = fixture_json("node-self.json");
    v6["metadata"]["name"] = json!("v6");
    v6["spec"]["podCIDR"] = json!("fd00:10:244:4::/64");
    v6["spec"]["podCIDRs"] = json!(["fd00:10:244:4::/64"]);
    server.apply(v6).expect("v6 node");
    let err = guard("the error", node_subnet_with(&client, "v6", POLL)).await.expect_err("IPv6-only podCIDR");
    assert!(err.to_string().contains("node v6") && err.to_string().contains("no IPv4 CIDR"), "{err}");
}

#[tokio::test]
async fn annotations_are_patched_the_way_flanneld_writes_them() {
    let server = server_with_nodes().await;
    let client = server.client().expect("client");
    let names = Annotations::default();
    let ip = publish_annotations(&client, "netd-1", &names, &netd_attrs()).await.expect("publish");
    assert_eq!(ip, Ipv4Addr::new(192, 0, 2, 12));

    let ann = annotations_of(&server, "netd-1");
    assert_eq!(ann["flannel.alpha.coreos.com/backend-type"], "vxlan");
    assert_eq!(ann["flannel.alpha.coreos.com/backend-data"], r#"{"VNI":1,"VtepMAC":"0e:6f:c0:00:02:0c"}"#);
    assert_eq!(ann["flannel.alpha.coreos.com/public-ip"], "192.0.2.12");
    assert_eq!(ann["flannel.alpha.coreos.com/kube-subnet-manager"], "true");
    // The node's other annotations and its spec are untouched.
    assert_eq!(ann["node.alpha.kubernetes.io/ttl"], "0");
    let node = server.get(Kind::Node, "", "netd-1").expect("node");
    assert_eq!(node["spec"]["podCIDR"], "10.244.2.0/24");
    assert_eq!(node["spec"]["taints"][0]["key"], "node.kubernetes.io/not-ready");

    // Like flanneld: a strategic merge patch through nodes/status.
    let patches = server.requests_of("patch", Kind::Node);
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0].path, "/api/v1/nodes/netd-1/status");
    assert_eq!(patches[0].content_type.as_deref(), Some("application/strategic-merge-patch+json"));

    // Nothing changed: no second patch.
    publish_annotations(&client, "netd-1", &names, &netd_attrs()).await.expect("publish again");
    assert_eq!(server.requests_of("patch", Kind::Node).len(), 1);

    // The same node as flanneld annotated it reads back as the same lease netd reads for flanneld.
    let typed: k8s_openapi::api::core::v1::Node = serde_json::from_value(server.get(Kind::Node, "", "netd-1").expect("node")).expect("Node");
    let lease = netd_kube::node_to_lease(&typed, &names).expect("lease");
    assert_eq!(lease.backend_data, netd_attrs().backend_data);
}

#[tokio::test]
async fn an_admins_public_ip_overwrite_wins() {
    let server = server_with_nodes().await;
    let client = server.client().expect("client");
    let mut node = fixture_json("node-self.json");
    node["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ip-overwrite"] = json!("198.51.100.7");
    server.apply(node).expect("node");
    let ip = publish_annotations(&client, "netd-1", &Annotations::default(), &netd_attrs()).await.expect("publish");
    assert_eq!(ip, Ipv4Addr::new(198, 51, 100, 7));
    assert_eq!(annotations_of(&server, "netd-1")["flannel.alpha.coreos.com/public-ip"], "198.51.100.7");

    let missing = publish_annotations(&client, "nope", &Annotations::default(), &netd_attrs()).await.expect_err("no such node");
    assert_eq!(missing.status_code(), Some(404));
    assert!(missing.to_string().contains("get node nope"), "{missing}");
}

#[tokio::test]
async fn peers_are_published_and_unusable_nodes_skipped_with_a_reason() {
    let server = server_with_nodes().await;
    // A node announced by flanneld whose podCIDR was never assigned, and one with broken data.
    let mut no_cidr = fixture_json("node-flannel.json");
    no_cidr["metadata"]["name"] = json!("worker-5");
    no_cidr["spec"] = json!({});
    server.apply(no_cidr).expect("worker-5");
    let mut broken = fixture_json("node-flannel.json");
    broken["metadata"]["name"] = json!("worker-6");
    broken["spec"] = json!({ "podCIDR": "10.244.6.0/24", "podCIDRs": ["10.244.6.0/24"] });
    broken["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-data"] = json!("{\"VNI\":1,");
    server.apply(broken).expect("worker-6");

    let client = server.client().expect("client");
    let rec: Recorder<Arc<Vec<NodeLease>>> = Recorder::new();
    let (stx, mut status) = watch::channel(SourceStatus::default());
    let task = tokio::spawn(run_node_watch_with(client.clone(), Annotations::default(), fast(), stx, rec.publisher()));

    let first = rec.wait_for("the first peers", |_| true).await;
    assert_eq!(first.iter().map(|l| l.node.as_str()).collect::<Vec<_>>(), ["worker-1"]);
    let w1 = &first[0];
    assert_eq!(w1.subnet.to_string(), "10.244.1.0/24");
    assert_eq!(w1.public_ip, Ipv4Addr::new(192, 0, 2, 11));
    assert_eq!(w1.backend_type, "vxlan");
    assert_eq!(w1.backend_data, Some(json!({ "VNI": 1, "VtepMAC": "6a:0f:3c:1d:52:8e" })));

    let st = wait_status("synced", &mut status, |s| s.synced).await;
    let skipped = st.skipped.join("\n");
    assert!(skipped.contains("node worker-5: no spec.podCIDR"), "{skipped}");
    assert!(skipped.contains("node worker-6: annotation flannel.alpha.coreos.com/backend-data is not JSON"), "{skipped}");
    assert!(skipped.contains("node netd-1: not announced by a kube subnet manager"), "{skipped}");
    assert!(skipped.contains("node worker-3"), "{skipped}");

    // netd announces itself: it appears among the peers.
    publish_annotations(&client, "netd-1", &Annotations::default(), &netd_attrs()).await.expect("publish");
    let peers = rec.wait_for("netd-1 among the peers", |p| p.iter().any(|l| l.node == "netd-1")).await;
    assert_eq!(peers.iter().map(|l| l.node.as_str()).collect::<Vec<_>>(), ["netd-1", "worker-1"]);

    // A node that leaves the cluster leaves the peers.
    server.delete(Kind::Node, "", "worker-1").expect("worker-1 existed");
    let peers = rec.wait_for("worker-1 gone", |p| p.iter().all(|l| l.node != "worker-1")).await;
    assert_eq!(peers.len(), 1);

    // A Node status heartbeat changes nothing that matters: no new list is published.
    let before = rec.count();
    let mut beat = server.get(Kind::Node, "", "netd-1").expect("netd-1");
    beat["status"]["conditions"][0]["lastHeartbeatTime"] = json!("2025-05-14T16:45:00Z");
    server.apply(beat).expect("heartbeat");
    let rv = server.resource_version().to_string();
    wait_status("the heartbeat seen", &mut status, |s| s.resource_versions.get("nodes") == Some(&rv)).await;
    assert_eq!(rec.count(), before);
    task.abort();
}

#[tokio::test]
async fn peers_survive_an_unreachable_server_and_a_410() {
    let server = server_with_nodes().await;
    let client = server.client().expect("client");
    let (tx, mut rx) = watch::channel(Arc::new(Vec::<NodeLease>::new()));
    let (stx, mut status) = watch::channel(SourceStatus::default());
    let task = tokio::spawn(run_node_watch(client, Annotations::default(), tx, stx));
    guard("peers", rx.wait_for(|p| p.len() == 1)).await.expect("sender alive");

    server.stop().await;
    wait_status("disconnected", &mut status, |s| !s.connected).await;
    assert_eq!(rx.borrow().len(), 1, "the last peers stay while the server is unreachable");
    let mut w7 = fixture_json("node-flannel.json");
    w7["metadata"]["name"] = json!("worker-7");
    w7["spec"] = json!({ "podCIDR": "10.244.7.0/24", "podCIDRs": ["10.244.7.0/24"] });
    server.apply(w7).expect("worker-7");
    server.compact();
    server.restart().await.expect("restart");

    let peers = guard("worker-7 after the relist", rx.wait_for(|p| p.len() == 2)).await.expect("sender alive").clone();
    assert_eq!(peers[1].node, "worker-7");
    wait_status("the 410 and the relist", &mut status, |s| s.connected && s.expired >= 1 && s.lists >= 2).await;
    drop(rx);
    guard("the watch to return", task).await.expect("no panic");
}
