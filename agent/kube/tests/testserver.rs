//! The fake API server itself: the fixtures parse as the Kubernetes types, and its list, watch
//! and patch answers have the semantics (and the shapes) of kube-apiserver's. It stands in for a
//! real API server, which cannot run on these machines; the fixtures are hand-written in the
//! exact shape a real server returns (see `testdata/README.md`).

mod common;

use common::*;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use kube::Api;
use netd_kube::testserver::{FakeApiServer, GoneMode, Kind};
use serde_json::json;

#[test]
fn the_fixtures_parse_as_kubernetes_types() {
    let services: kube::core::ObjectList<Service> = serde_json::from_str(&fixture("services.json")).expect("ServiceList");
    assert_eq!(services.items.len(), 6);
    let slices: kube::core::ObjectList<EndpointSlice> = serde_json::from_str(&fixture("endpointslices.json")).expect("EndpointSliceList");
    assert_eq!(slices.items.len(), 5);
    for f in ["node-flannel.json", "node-self.json", "node-no-podcidr.json"] {
        let _: Node = serde_json::from_str(&fixture(f)).expect(f);
    }
    let gone: kube::core::Status = serde_json::from_str(&fixture("status-410-expired.json")).expect("Status");
    assert_eq!((gone.code, gone.reason.as_str()), (410, "Expired"));

    let events: Vec<WatchEvent<Service>> =
        fixture("watch-services.jsonl").lines().map(|l| serde_json::from_str(l).expect("watch event")).collect();
    assert!(matches!(events[0], WatchEvent::Added(_)));
    assert!(matches!(events[1], WatchEvent::Modified(_)));
    assert!(matches!(events[2], WatchEvent::Deleted(_)));
    assert!(matches!(&events[3], WatchEvent::Bookmark(b) if b.metadata.resource_version == "48520"));
    assert!(matches!(&events[4], WatchEvent::Error(s) if s.code == 410 && s.reason == "Expired"));
}

#[tokio::test]
async fn lists_are_paged_over_one_consistent_version_and_expire_with_compaction() {
    let server = server_with_services().await;
    let api: Api<Service> = Api::all(server.client().expect("client"));
    let first = api.list(&ListParams::default().limit(4)).await.expect("page 1");
    assert_eq!(first.items.len(), 4);
    let token = first.metadata.continue_.clone().expect("continue token");
    assert_eq!(first.metadata.remaining_item_count, Some(2));

    // A change after the first page does not show up in the second.
    server.apply(json!({"kind": "Service", "apiVersion": "v1", "metadata": {"name": "zz", "namespace": "zz"}, "spec": {"type": "ExternalName", "externalName": "zz.example.com"}})).expect("zz");
    let second = api.list(&ListParams::default().limit(4).continue_token(&token)).await.expect("page 2");
    assert_eq!(second.items.len(), 2);
    assert_eq!(second.metadata.resource_version, first.metadata.resource_version);
    assert!(second.metadata.continue_.as_deref().unwrap_or_default().is_empty());

    server.compact();
    let err = api.list(&ListParams::default().limit(4).continue_token(&token)).await.expect_err("expired token");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 410 && s.reason == "Expired"), "{err}");

    // List items carry no kind/apiVersion, as in a real list; namespaced lists and selectors work.
    let raw = server.requests().last().cloned().expect("a request");
    assert_eq!(raw.verb, "list");
    let shop: Api<Service> = Api::namespaced(server.client().expect("client"), "shop");
    assert_eq!(shop.list(&ListParams::default()).await.expect("shop").items.len(), 4);
    assert_eq!(shop.list(&ListParams::default().labels("app=web")).await.expect("app=web").items.len(), 1);
    assert_eq!(shop.list(&ListParams::default().fields("metadata.name=db")).await.expect("name=db").items.len(), 1);
    let got = shop.get("db").await.expect("get db");
    assert_eq!(got.spec.and_then(|s| s.cluster_ip).as_deref(), Some("None"));
    let missing = shop.get("nope").await.expect_err("404");
    assert!(matches!(&missing, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound" && s.message == "services \"nope\" not found"), "{missing}");
}

#[tokio::test]
async fn watches_replay_history_send_bookmarks_and_end_at_their_timeout() {
    let server = server_with_services().await;
    let api: Api<Service> = Api::all(server.client().expect("client"));
    let from = server.resource_version();
    server.apply(json!({"kind": "Service", "apiVersion": "v1", "metadata": {"name": "a", "namespace": "shop"}, "spec": {"type": "ExternalName", "externalName": "a.example.com"}})).expect("a");
    server.delete(Kind::Service, "shop", "a").expect("a existed");

    let mut stream = api.watch(&WatchParams::default().timeout(1), &from.to_string()).await.expect("watch").boxed();
    let added = guard("ADDED", stream.next()).await.expect("event").expect("ok");
    assert!(matches!(&added, WatchEvent::Added(s) if s.metadata.name.as_deref() == Some("a")));
    let deleted = guard("DELETED", stream.next()).await.expect("event").expect("ok");
    assert!(matches!(&deleted, WatchEvent::Deleted(s) if s.metadata.resource_version == Some(server.resource_version().to_string())));
    guard("the watch registered", server.wait_until(|s| !s.open_watches().is_empty())).await;
    server.bookmark();
    let bm = guard("BOOKMARK", stream.next()).await.expect("event").expect("ok");
    assert!(matches!(&bm, WatchEvent::Bookmark(b) if b.metadata.resource_version == server.resource_version().to_string()));
    // timeoutSeconds=1: a last bookmark, then the end of the stream.
    let rest: Vec<_> = guard("the end of the watch", stream.collect::<Vec<_>>()).await;
    assert!(rest.iter().all(|e| matches!(e, Ok(WatchEvent::Bookmark(_)))), "{rest:?}");

    // Without a resourceVersion: the current objects as ADDED.
    let initial: Vec<_> = guard("initial events", api.watch(&WatchParams::default().timeout(1).disable_bookmarks(), "0").await.expect("watch").try_collect::<Vec<_>>()).await.expect("events");
    assert_eq!(initial.len(), 6);
    assert!(initial.iter().all(|e| matches!(e, WatchEvent::Added(_))));
}

#[tokio::test]
async fn a_watch_from_a_compacted_version_gets_410_expired_both_ways() {
    let server = server_with_services().await;
    let api: Api<Service> = Api::all(server.client().expect("client"));
    let old = server.resource_version();
    server.apply(json!({"kind": "Service", "apiVersion": "v1", "metadata": {"name": "b", "namespace": "shop"}, "spec": {"type": "ExternalName", "externalName": "b.example.com"}})).expect("b");
    server.compact();
    let fixture_status: serde_json::Value = fixture_json("status-410-expired.json");

    // The watch cache's way: 200, then an ERROR event.
    let events: Vec<_> = guard("the error event", api.watch(&WatchParams::default(), &old.to_string()).await.expect("200").collect::<Vec<_>>()).await;
    match events.as_slice() {
        [Ok(WatchEvent::Error(s))] => {
            assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
            assert!(s.message.starts_with("too old resource version: "), "{}", s.message);
        }
        other => panic!("expected one ERROR event, got {other:?}"),
    }

    // As the HTTP answer.
    server.set_gone_mode(GoneMode::HttpError);
    let err = api.watch(&WatchParams::default(), &old.to_string()).await.err().expect("410");
    let kube::Error::Api(s) = &err else { panic!("expected an API error, got {err}") };
    assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
    // Same shape as the fixture (a real server's Status): same fields.
    let ours = serde_json::to_value(&**s).expect("json");
    for field in ["status", "reason", "code"] {
        assert_eq!(ours[field], fixture_status[field], "{field}");
    }

    // The current version is fine.
    let now = server.resource_version().to_string();
    assert!(api.watch(&WatchParams::default().timeout(1), &now).await.is_ok());
}

#[tokio::test]
async fn patches_merge_and_the_status_subresource_keeps_the_spec() {
    let server = FakeApiServer::start().await.expect("server");
    server.load(&fixture("node-self.json")).expect("node");
    let api: Api<Node> = Api::all(server.client().expect("client"));
    let rv = server.resource_version();

    let p = json!({"metadata": {"annotations": {"a": "1", "node.alpha.kubernetes.io/ttl": null}}, "spec": {"unschedulable": true}});
    let n = api.patch_status("netd-1", &PatchParams::default(), &Patch::Merge(&p)).await.expect("patch status");
    let ann = n.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(ann.get("a").map(String::as_str), Some("1"));
    assert!(!ann.contains_key("node.alpha.kubernetes.io/ttl"));
    assert_eq!(n.spec.as_ref().and_then(|s| s.unschedulable), None, "spec kept through /status");
    assert_eq!(n.metadata.resource_version, Some((rv + 1).to_string()));

    let n = api.patch("netd-1", &PatchParams::default(), &Patch::Strategic(&json!({"spec": {"unschedulable": true}, "status": {"phase": "x"}}))).await.expect("patch");
    assert_eq!(n.spec.as_ref().and_then(|s| s.unschedulable), Some(true));
    assert_eq!(n.status.as_ref().and_then(|s| s.phase.clone()), None, "status kept through the object");

    // A patch that changes nothing does not bump the version.
    let same = api.patch("netd-1", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"unschedulable": true}}))).await.expect("no-op");
    assert_eq!(same.metadata.resource_version, n.metadata.resource_version);

    let err = api.patch("nope", &PatchParams::default(), &Patch::Merge(&json!({}))).await.expect_err("404");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 404), "{err}");
}

#[tokio::test]
async fn a_stopped_server_refuses_connections_and_answers_again_after_restart() {
    let server = server_with_services().await;
    let api: Api<Service> = Api::all(server.client().expect("client"));
    let mut stream = api.watch(&WatchParams::default(), &server.resource_version().to_string()).await.expect("watch").boxed();
    guard("the watch registered", server.wait_until(|s| s.open_watches().len() == 1)).await;

    server.stop().await;
    assert!(!server.is_up());
    // The open watch is broken (an error or the end of the stream), and new requests fail.
    let next = guard("the broken watch", stream.next()).await;
    assert!(!matches!(next, Some(Ok(_))), "{next:?}");
    assert!(api.list(&ListParams::default()).await.is_err());
    assert!(server.open_watches().is_empty());

    server.restart().await.expect("restart");
    assert_eq!(api.list(&ListParams::default()).await.expect("list after restart").items.len(), 6);
}
