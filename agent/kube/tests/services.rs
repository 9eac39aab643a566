//! `--source kubernetes`: Services and EndpointSlices from the API server into the proxy's
//! `ServiceSnapshot`.
//!
//! These tests run against `netd_kube::testserver::FakeApiServer` on 127.0.0.1, a fake API
//! server that implements list (paged) and watch semantics: bookmarks, `410 Expired` after
//! compaction (as an HTTP answer and as an `ERROR` event), timeouts, and being unreachable. No
//! real API server can run on these machines; the objects it serves are the fixtures in
//! `testdata/`, hand-written in exactly the shape kube-apiserver returns them (see
//! `testdata/README.md`). No assertion depends on timing; the only clock is a hang guard.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use netd_kube::testserver::{FakeApiServer, GoneMode, Kind};
use netd_kube::{run_service_source, run_service_source_with, SourceStatus};
use netd_proxy::snapshot::{NsName, ServiceSnapshot};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

type Snap = Arc<ServiceSnapshot>;

fn start(server: &FakeApiServer) -> (Recorder<Snap>, watch::Receiver<SourceStatus>, JoinHandle<()>) {
    let rec = Recorder::new();
    let (stx, srx) = watch::channel(SourceStatus::default());
    let client = server.client().expect("client");
    let task = tokio::spawn(run_service_source_with(client, fast(), stx, rec.publisher()));
    (rec, srx, task)
}

/// The server's objects, round-tripped through the typed structs, keyed like the snapshot.
fn server_state(server: &FakeApiServer) -> (BTreeMap<NsName, Value>, BTreeMap<NsName, Value>) {
    let key = |v: &Value| {
        NsName::new(v["metadata"]["namespace"].as_str().unwrap_or_default(), v["metadata"]["name"].as_str().unwrap_or_default())
    };
    let services = server
        .objects(Kind::Service)
        .into_iter()
        .map(|v| (key(&v), serde_json::to_value(serde_json::from_value::<Service>(v).expect("Service")).expect("json")))
        .collect();
    let slices = server
        .objects(Kind::EndpointSlice)
        .into_iter()
        .map(|v| (key(&v), serde_json::to_value(serde_json::from_value::<EndpointSlice>(v).expect("EndpointSlice")).expect("json")))
        .collect();
    (services, slices)
}

fn snapshot_state(snap: &ServiceSnapshot) -> (BTreeMap<NsName, Value>, BTreeMap<NsName, Value>) {
    let services = snap.services().iter().map(|(k, s)| (k.clone(), serde_json::to_value(&**s).expect("json"))).collect();
    let slices = snap.all_slices().map(|(k, s)| (k, serde_json::to_value(&**s).expect("json"))).collect();
    (services, slices)
}

/// The snapshot holds exactly what the server holds.
fn converged(snap: &ServiceSnapshot, server: &FakeApiServer) -> bool {
    snapshot_state(snap) == server_state(server)
}

fn service(ns: &str, name: &str, ip: &str, port: u16) -> Value {
    json!({
        "kind": "Service", "apiVersion": "v1",
        "metadata": { "name": name, "namespace": ns, "labels": { "app": name } },
        "spec": {
            "ports": [{ "name": "http", "protocol": "TCP", "port": port, "targetPort": 8080 }],
            "selector": { "app": name },
            "clusterIP": ip, "clusterIPs": [ip], "type": "ClusterIP", "sessionAffinity": "None",
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster"
        },
        "status": { "loadBalancer": {} }
    })
}

fn slice(ns: &str, name: &str, svc: &str, ips: &[&str]) -> Value {
    let endpoints: Vec<Value> =
        ips.iter().map(|ip| json!({ "addresses": [ip], "conditions": { "ready": true, "serving": true, "terminating": false }, "nodeName": "worker-1" })).collect();
    json!({
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name, "namespace": ns, "generateName": format!("{svc}-"),
            "labels": { "kubernetes.io/service-name": svc, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io" }
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{ "name": "http", "protocol": "TCP", "port": 8080 }]
    })
}

async fn wait_watching(server: &FakeApiServer) {
    guard("watches on services and endpointslices", server.wait_until(|s| {
        let w = s.open_watches();
        w.iter().any(|w| w.kind == Kind::Service) && w.iter().any(|w| w.kind == Kind::EndpointSlice)
    }))
    .await;
}

/// List requests that started a list (not the follow-up pages).
fn lists_started(server: &FakeApiServer, kind: Kind) -> usize {
    server.requests_of("list", kind).iter().filter(|r| r.param("continue").is_none()).count()
}

#[tokio::test]
async fn the_initial_list_is_published_as_one_complete_snapshot() {
    let server = server_with_services().await;
    let (rec, mut status, task) = start(&server);
    rec.wait_for("the first snapshot", |_| true).await;
    let first = rec.all()[0].clone();
    assert_eq!(first.services().len(), 6, "{:?}", first.services().keys().collect::<Vec<_>>());
    assert_eq!(first.slice_count(), 5);
    assert!(converged(&first, &server));
    assert_eq!(first.revision, server.resource_version() as i64);

    // Every type of Service came through as the server has it.
    let svc = |ns: &str, n: &str| first.services()[&NsName::new(ns, n)].spec.clone().expect("spec");
    assert_eq!(svc("shop", "db").cluster_ip.as_deref(), Some("None"));
    assert_eq!(svc("shop", "payments").type_.as_deref(), Some("ExternalName"));
    assert_eq!(svc("shop", "payments").external_name.as_deref(), Some("payments.example.com"));
    assert_eq!(svc("shop", "ingress").health_check_node_port, Some(32401));
    let web = first.slices_of(&NsName::new("shop", "web"));
    let terminating = web[0].endpoints[1].conditions.as_ref().expect("conditions");
    assert_eq!((terminating.ready, terminating.serving, terminating.terminating), (Some(false), Some(true), Some(true)));

    // Paged: 6 services at 2 a page.
    let lists = server.requests_of("list", Kind::Service);
    assert_eq!(lists.len(), 3);
    assert_eq!(lists[0].param("limit"), Some("2"));
    assert!(lists[1].param("continue").is_some());

    let st = wait_status("synced", &mut status, |s| s.synced && s.connected).await;
    assert_eq!((st.objects, st.lists, st.expired), (11, 2, 0));
    assert!(st.last_sync.is_some());
    task.abort();
}

#[tokio::test]
async fn the_snapshot_equals_what_the_etcd_registry_model_holds_so_the_proxy_plans_the_same() {
    let server = server_with_services().await;
    let (rec, _status, task) = start(&server);
    let snap = rec.wait_for("the first snapshot", |_| true).await;

    let services: Vec<Service> = serde_json::from_value(fixture_json("services.json")["items"].clone()).expect("services");
    let slices: Vec<EndpointSlice> = serde_json::from_value(fixture_json("endpointslices.json")["items"].clone()).expect("slices");
    let etcd_model = ServiceSnapshot::from_objects(services, slices);
    assert_eq!(snap.services().keys().collect::<Vec<_>>(), etcd_model.services().keys().collect::<Vec<_>>());
    assert_eq!(snap.all_slices().map(|(k, _)| k).collect::<Vec<_>>(), etcd_model.all_slices().map(|(k, _)| k).collect::<Vec<_>>());

    let node = netd_proxy::NodeInfo {
        name: "netd-1".into(),
        ips: vec!["192.0.2.12".parse().expect("ip")],
        pod_cidr: Some("10.244.2.0/24".parse().expect("cidr")),
        cluster_cidr: Some("10.244.0.0/16".parse().expect("cidr")),
        local_service_ips: Vec::new(),
    };
    let from_kube = netd_proxy::desired(&node, &snap);
    let from_etcd = netd_proxy::desired(&node, &etcd_model);
    assert!(!from_kube.services.is_empty());
    assert_eq!(from_kube.services, from_etcd.services);
    assert_eq!(from_kube.health_checks, from_etcd.health_checks);
    task.abort();
}

#[tokio::test]
async fn watch_events_flow_into_new_snapshots_without_relisting() {
    let server = server_with_services().await;
    let (rec, mut status, task) = start(&server);
    rec.wait_for("the first snapshot", |_| true).await;
    wait_watching(&server).await;

    server.apply(service("shop", "cart", "10.96.7.7", 80)).expect("cart");
    server.apply(slice("shop", "cart-abcde", "cart", &["10.244.1.20", "10.244.2.21"])).expect("cart slice");
    server.apply(slice("shop", "web-5hq8d", "web", &["10.244.1.7"])).expect("web slice");
    server.delete(Kind::Service, "shop", "payments").expect("payments existed");
    let snap = rec.wait_for("all four changes", |s| converged(s, &server)).await;

    assert!(snap.services().contains_key(&NsName::new("shop", "cart")));
    assert!(!snap.services().contains_key(&NsName::new("shop", "payments")));
    assert_eq!(snap.slices_of(&NsName::new("shop", "cart"))[0].endpoints.len(), 2);
    assert_eq!(snap.slices_of(&NsName::new("shop", "web"))[0].endpoints.len(), 1);
    assert_eq!(snap.revision, server.resource_version() as i64);
    // Unchanged objects are shared with the first snapshot (the planner compares pointers).
    let first = rec.all()[0].clone();
    let key = NsName::new("kube-system", "kube-dns");
    assert!(Arc::ptr_eq(&first.services()[&key], &snap.services()[&key]));
    // Events only: one list each.
    assert_eq!((lists_started(&server, Kind::Service), lists_started(&server, Kind::EndpointSlice)), (1, 1));
    let st = status.borrow_and_update().clone();
    assert_eq!((st.lists, st.expired), (2, 0));
    task.abort();
}

/// The server is unreachable while objects change and history is compacted; when it is back,
/// the watch from the old resourceVersion is refused with 410, the source relists and ends up
/// with every change, and no snapshot on the way is empty or partial.
async fn gone_relists_and_converges(mode: GoneMode) {
    let server = server_with_services().await;
    server.set_gone_mode(mode);
    let (rec, mut status, task) = start(&server);
    rec.wait_for("the first snapshot", |_| true).await;
    wait_watching(&server).await;

    server.stop().await;
    wait_status("disconnected", &mut status, |s| !s.connected).await;
    server.apply(service("shop", "cart", "10.96.7.7", 80)).expect("cart");
    server.apply(slice("shop", "cart-abcde", "cart", &["10.244.1.20"])).expect("cart slice");
    server.delete(Kind::Service, "shop", "payments").expect("payments existed");
    server.apply(slice("shop", "web-5hq8d", "web", &["10.244.1.7", "10.244.1.8", "10.244.2.9"])).expect("web slice");
    server.compact();
    server.restart().await.expect("restart");

    let snap = rec.wait_for("convergence after the relist", |s| converged(s, &server)).await;
    assert!(snap.services().contains_key(&NsName::new("shop", "cart")));
    assert!(!snap.services().contains_key(&NsName::new("shop", "payments")));

    let gone_watches: Vec<_> = server.requests().into_iter().filter(|r| r.verb == "watch" && r.status == 410).collect();
    match mode {
        GoneMode::HttpError => assert!(!gone_watches.is_empty(), "no watch was refused with HTTP 410"),
        GoneMode::ErrorEvent => assert!(gone_watches.is_empty()),
    }
    assert_eq!(lists_started(&server, Kind::Service), 2, "one relist of services");
    assert_eq!(lists_started(&server, Kind::EndpointSlice), 2, "one relist of endpointslices");
    let st = wait_status("reconnected", &mut status, |s| s.connected && s.expired >= 2).await;
    assert!(st.last_error.is_some() && st.errors >= 1);
    // Never an empty or half-listed state: every snapshot has all six services and every slice.
    for s in rec.all() {
        assert_eq!(s.services().len(), 6);
        assert!(s.slice_count() >= 5);
        assert!(s.services().contains_key(&NsName::new("default", "kubernetes")));
    }
    task.abort();
}

#[tokio::test]
async fn http_410_on_watch_start_relists_and_converges_with_no_lost_update() {
    gone_relists_and_converges(GoneMode::HttpError).await;
}

#[tokio::test]
async fn error_event_410_in_the_watch_stream_relists_and_converges_with_no_lost_update() {
    gone_relists_and_converges(GoneMode::ErrorEvent).await;
}

#[tokio::test]
async fn an_open_watch_expired_by_the_server_relists_without_an_empty_snapshot() {
    let server = server_with_services().await;
    let (rec, mut status, task) = start(&server);
    rec.wait_for("the first snapshot", |_| true).await;
    wait_watching(&server).await;

    server.apply(service("shop", "cart", "10.96.7.7", 80)).expect("cart");
    server.compact();
    server.expire_watches();
    let snap = rec.wait_for("the new service", |s| converged(s, &server)).await;
    assert!(snap.services().contains_key(&NsName::new("shop", "cart")));
    wait_status("relisted", &mut status, |s| s.expired >= 2 && s.lists >= 4).await;
    assert_eq!(lists_started(&server, Kind::Service), 2);
    assert!(rec.all().iter().all(|s| s.services().len() >= 6 && s.slice_count() == 5));
    task.abort();
}

#[tokio::test]
async fn bookmarks_let_a_quiet_watch_resume_after_compaction_without_relisting() {
    let server = server_with_services().await;
    let (rec, mut status, task) = start(&server);
    rec.wait_for("the first snapshot", |_| true).await;
    wait_watching(&server).await;
    let listed_at: u64 = status.borrow().resource_versions["services"].parse().expect("numeric rv");

    // Only EndpointSlices change: the services watch hears nothing and its version grows old.
    server.apply(slice("kube-system", "kube-dns-extra", "kube-dns", &["10.244.2.30"])).expect("slice");
    rec.wait_for("the new slice", |s| converged(s, &server)).await;
    let now = server.resource_version();
    assert!(listed_at < now);

    server.bookmark();
    wait_status("the bookmark", &mut status, |s| s.resource_versions.get("services") == Some(&now.to_string())).await;
    // History before `now` is gone; the watches end (as at their timeout) and come back.
    server.compact();
    server.close_watches();
    guard("watches resumed from the bookmark", server.wait_until(|s| {
        s.open_watches().iter().any(|w| w.kind == Kind::Service && w.resource_version == Some(now.to_string()))
    }))
    .await;

    assert_eq!(lists_started(&server, Kind::Service), 1, "resumed from the bookmark, no relist");
    assert!(server.requests().iter().all(|r| r.status != 410));
    let st = status.borrow().clone();
    assert_eq!(st.expired, 0);
    // Watches asked for bookmarks.
    assert!(server.requests_of("watch", Kind::Service).iter().all(|r| r.param("allowWatchBookmarks") == Some("true")));
    task.abort();
}

#[tokio::test]
async fn watch_timeouts_resume_from_the_last_version() {
    let server = server_with_services().await;
    let rec = Recorder::new();
    let (stx, _srx) = watch::channel(SourceStatus::default());
    let cfg = netd_kube::WatchConfig { timeout_secs: 1, ..fast() };
    let task = tokio::spawn(run_service_source_with(server.client().expect("client"), cfg, stx, rec.publisher()));
    rec.wait_for("the first snapshot", |_| true).await;
    // Each watch asks the server to end it after 1 s; the source watches again, without relisting.
    guard("a third services watch", server.wait_until(|s| s.requests_of("watch", Kind::Service).len() >= 3)).await;
    let watches = server.requests_of("watch", Kind::Service);
    assert!(watches.iter().all(|w| w.param("timeoutSeconds") == Some("1") && w.param("resourceVersion").is_some()));
    assert_eq!(lists_started(&server, Kind::Service), 1);
    server.apply(service("shop", "cart", "10.96.7.7", 80)).expect("cart");
    rec.wait_for("the new service", |s| converged(s, &server)).await;
    task.abort();
}

#[tokio::test]
async fn an_unreachable_server_keeps_the_last_snapshot_backs_off_and_recovers() {
    let server = server_with_services().await;
    let (rec, mut status, task) = start(&server);
    rec.wait_for("the first snapshot", |_| true).await;
    wait_watching(&server).await;
    let published = rec.count();

    server.stop().await;
    let st = wait_status("several failed retries", &mut status, |s| !s.connected && s.errors >= 4).await;
    assert!(st.synced);
    assert!(st.last_error.as_deref().is_some_and(|e| e.contains("services") || e.contains("endpointslices")), "{:?}", st.last_error);
    assert_eq!(rec.count(), published, "nothing published while unreachable: the last snapshot stands");
    assert_eq!(rec.all().last().map(|s| s.services().len()), Some(6));

    server.restart().await.expect("restart");
    server.apply(service("shop", "cart", "10.96.7.7", 80)).expect("cart");
    rec.wait_for("the change made after recovery", |s| converged(s, &server)).await;
    wait_status("connected again", &mut status, |s| s.connected).await;
    // The history was kept, so the watches resumed: no relist was needed.
    assert_eq!(lists_started(&server, Kind::Service), 1);
    task.abort();
}

#[tokio::test]
async fn run_service_source_feeds_a_watch_channel_and_returns_when_nobody_listens() {
    let server = server_with_services().await;
    let (tx, mut rx) = watch::channel(Arc::new(ServiceSnapshot::new()));
    let (stx, mut srx) = watch::channel(SourceStatus::default());
    let task = tokio::spawn(run_service_source(server.client().expect("client"), tx, stx));
    let snap = guard("a snapshot", rx.wait_for(|s| s.services().len() == 6)).await.expect("sender alive").clone();
    assert_eq!(snap.slice_count(), 5);

    server.stop().await;
    wait_status("disconnected", &mut srx, |s| !s.connected).await;
    assert_eq!(rx.borrow().services().len(), 6, "the last good snapshot stays published");

    drop(rx);
    guard("the source to return", task).await.expect("no panic");
}

/// `--kubeconfig PATH` as `netd run` parses it.
fn kubeconfig_args(path: &std::path::Path) -> netd_kube::KubeArgs {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        kube: netd_kube::KubeArgs,
    }
    <Cli as clap::Parser>::try_parse_from(["netd", "--kubeconfig", path.to_str().expect("UTF-8 path")]).expect("flags").kube
}

#[tokio::test]
async fn a_kubeconfig_file_pointing_to_the_server_works() {
    let server = server_with_services().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, server.kubeconfig()).expect("write kubeconfig");
    let (client, api) = netd_kube::client(&kubeconfig_args(&path)).await.expect("client from kubeconfig");
    assert_eq!(api.from, format!("kubeconfig {}", path.display()));

    let (tx, mut rx) = watch::channel(Arc::new(ServiceSnapshot::new()));
    let (stx, _srx) = watch::channel(SourceStatus::default());
    let task = tokio::spawn(run_service_source(client, tx, stx));
    guard("a snapshot through the kubeconfig client", rx.wait_for(|s| s.services().len() == 6)).await.expect("sender alive");
    task.abort();

    let missing = netd_kube::client(&kubeconfig_args(&dir.path().join("nope"))).await.err().expect("a missing kubeconfig is an error");
    assert!(missing.to_string().contains("nope"), "{missing}");
}
