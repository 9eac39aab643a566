//! A fake Kubernetes API server for tests (cargo feature `testserver`).
//!
//! No real API server can run on netd's test machines, so the sources are tested against this
//! one: an HTTP/1.1 server that answers for Nodes, Services and EndpointSlices the way
//! kube-apiserver does, with objects written in the exact shape the real server returns (see
//! `agent/kube/testdata/README.md`; they are hand-written in that shape, not recorded from a live
//! cluster).
//!
//! What it implements, per resource (`/api/v1/nodes`, `/api/v1/services`,
//! `/api/v1/namespaces/{ns}/services`, `/apis/discovery.k8s.io/v1/endpointslices`,
//! `/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices`, and `/{name}` under each):
//!
//! - **get** by name (404 with a `NotFound` Status when absent);
//! - **list** at a `metadata.resourceVersion`, with `limit`/`continue` paging over a consistent
//!   snapshot (a continue token whose version was compacted away gets `410 Expired`),
//!   `resourceVersion` (unset, `0`, or a number with `resourceVersionMatch`), `labelSelector`
//!   (`k=v`, `k==v`, `k!=v`, `k`, `!k`) and `fieldSelector` (`metadata.name`, `metadata.namespace`);
//! - **watch** (`watch=true|1`): newline-delimited `{"type":…,"object":…}` events: `ADDED`,
//!   `MODIFIED`, `DELETED` from the requested resourceVersion on (synthetic `ADDED`s of the
//!   current state when it is unset or `0`, and with `sendInitialEvents=true` the
//!   `k8s.io/initial-events-end` bookmark), `BOOKMARK` when `allowWatchBookmarks=true` (on
//!   [`FakeApiServer::bookmark`] and right before a watch times out), `timeoutSeconds`;
//!   a resourceVersion older than the compacted history gets `410 Expired`, as an `ERROR`
//!   event in a 200 stream (what kube-apiserver's watch cache does, the default here) or as the
//!   HTTP answer itself ([`GoneMode::HttpError`], what a watch served from etcd can return);
//! - **patch** of an object or its `status` subresource with `application/merge-patch+json`
//!   or `application/strategic-merge-patch+json` (applied as a JSON merge patch, which is what a
//!   strategic merge patch of maps such as `metadata.annotations` does); through `/status` the
//!   spec is kept, through the object the status is kept, as the real server's strategies do.
//!
//! Test controls: [`FakeApiServer::apply`]/[`FakeApiServer::delete`] (each bumping one global
//! resourceVersion, like etcd's revision), [`FakeApiServer::compact`] (history before now is
//! gone: the next watch from an older version gets 410), [`FakeApiServer::expire_watches`]
//! (every open watch gets a 410 `ERROR` event, as when the watch cache drops a slow watcher),
//! [`FakeApiServer::close_watches`], [`FakeApiServer::bookmark`], and
//! [`FakeApiServer::stop`]/[`FakeApiServer::restart`]: stopping closes the listening socket
//! (connections are refused) and breaks every open connection, as an unreachable server does.
//!
//! It listens on the address it is given (127.0.0.1 in this crate's tests; the e2e tests may run
//! it inside a network namespace of the test bed).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State as AxState};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The resource types the fake server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Node,
    Service,
    EndpointSlice,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Node, Kind::Service, Kind::EndpointSlice];

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Node | Kind::Service => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }
    pub fn kind(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Node => "nodes",
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
        }
    }
    pub fn namespaced(self) -> bool {
        self != Kind::Node
    }
    fn group(self) -> &'static str {
        match self {
            Kind::Node | Kind::Service => "",
            Kind::EndpointSlice => "discovery.k8s.io",
        }
    }
    fn from_group_plural(group: &str, plural: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.group() == group && k.plural() == plural)
    }
    /// The kind of an object from its `apiVersion` and `kind`.
    pub fn of(obj: &Value) -> Option<Kind> {
        let kind = obj.get("kind")?.as_str()?;
        let api_version = obj.get("apiVersion")?.as_str()?;
        Kind::ALL.into_iter().find(|k| k.kind() == kind && k.api_version() == api_version)
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    /// `node`/`nodes`/`Node`, `service`/`svc`, `endpointslice`/`endpointslices.discovery.k8s.io`.
    fn from_str(s: &str) -> Result<Kind, String> {
        match s.to_ascii_lowercase().trim_end_matches(".discovery.k8s.io") {
            "node" | "nodes" | "no" => Ok(Kind::Node),
            "service" | "services" | "svc" => Ok(Kind::Service),
            "endpointslice" | "endpointslices" => Ok(Kind::EndpointSlice),
            other => Err(format!("unknown kind {other:?} (node, service, endpointslice)")),
        }
    }
}

/// How a watch from a compacted resourceVersion is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoneMode {
    /// HTTP 200 and a single `ERROR` event holding the 410 `Expired` Status (kube-apiserver's
    /// watch cache).
    ErrorEvent,
    /// HTTP 410 with the `Expired` Status as the body.
    HttpError,
}

/// One request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    /// "get", "list", "watch", "patch" or "other".
    pub verb: &'static str,
    pub kind: Option<Kind>,
    pub status: u16,
    /// The request's `Content-Type` (patches).
    pub content_type: Option<String>,
    /// The request's `Authorization` header (the server accepts any).
    pub authorization: Option<String>,
}

impl RequestRecord {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }
}

/// An open watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchInfo {
    pub kind: Kind,
    pub namespace: Option<String>,
    /// The `resourceVersion` it was started from.
    pub resource_version: Option<String>,
    pub bookmarks: bool,
}

type Key = (Kind, String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

struct Stored {
    rv: u64,
    key: Key,
    ty: EventType,
    /// The object after the change (for a deletion: as it was deleted, at the new version).
    obj: Value,
    /// The object before the change, to rebuild older states for paged lists.
    prev: Option<Value>,
}

enum Frame {
    Line(Bytes),
    /// Break the connection (server stopped).
    Abort,
}

struct Watcher {
    id: u64,
    info: WatchInfo,
    filter: Filter,
    tx: mpsc::UnboundedSender<Frame>,
}

struct Inner {
    rv: u64,
    /// Events up to and including this version are forgotten.
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Stored>,
    watchers: Vec<Watcher>,
    next_id: u64,
    gone_mode: GoneMode,
    requests: Vec<RequestRecord>,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Bumped by `stop`: connections accepted before stop fail on their next read or write.
    epoch: AtomicU64,
    /// Bumped on every change (request, watch opened/closed, object written), for `wait_until`.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding the lock must not hide its own failure behind ours.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

/// The fake API server. Dropping it stops it.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    serving: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(h) = self.serving.lock().unwrap_or_else(|e| e.into_inner()).take() {
            h.abort();
        }
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        for w in self.shared.lock().watchers.drain(..) {
            let _ = w.tx.send(Frame::Abort);
        }
    }
}

impl FakeApiServer {
    /// A server on an ephemeral port of 127.0.0.1.
    pub async fn start() -> io::Result<FakeApiServer> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// A server on `addr`.
    pub async fn start_on(addr: SocketAddr) -> io::Result<FakeApiServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (changed, _) = tokio::sync::watch::channel(0);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                rv: 100,
                compacted: 0,
                objects: BTreeMap::new(),
                history: Vec::new(),
                watchers: Vec::new(),
                next_id: 1,
                gone_mode: GoneMode::ErrorEvent,
                requests: Vec::new(),
            }),
            epoch: AtomicU64::new(0),
            changed,
        });
        let server = FakeApiServer { shared, addr, serving: Mutex::new(None) };
        server.serve(listener);
        Ok(server)
    }

    fn serve(&self, listener: TcpListener) {
        let app = Router::new().fallback(handle).with_state(self.shared.clone());
        let listener = EpochListener { inner: listener, shared: self.shared.clone() };
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        *self.serving.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client for this server.
    pub fn client(&self) -> Result<kube::Client, crate::KubeError> {
        let uri: axum::http::Uri = self.url().parse().unwrap_or_default();
        crate::client_from_config(kube::Config::new(uri))
    }

    /// A kubeconfig file's text pointing at this server (token auth, which it ignores).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: netd\n    namespace: kube-system\ncurrent-context: fake\nusers:\n- name: netd\n  user:\n    token: fake-token\npreferences: {{}}\n",
            url = self.url()
        )
    }

    /// Stops answering: the listening socket is closed (new connections are refused) and every
    /// open connection, watches included, is broken.
    pub async fn stop(&self) {
        let task = self.serving.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        for w in self.shared.lock().watchers.drain(..) {
            let _ = w.tx.send(Frame::Abort);
        }
        self.shared.notify();
    }

    /// Answers again, on the same address, with the same objects and history.
    pub async fn restart(&self) -> io::Result<()> {
        if self.is_up() {
            return Ok(());
        }
        let listener = TcpListener::bind(self.addr).await?;
        self.serve(listener);
        self.shared.notify();
        Ok(())
    }

    pub fn is_up(&self) -> bool {
        self.serving.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Creates or replaces an object (`kind`/`apiVersion` must name a known kind). Sets
    /// `metadata.resourceVersion` (and `uid`, `creationTimestamp` when missing), records an
    /// `ADDED` or `MODIFIED` event and returns the new resourceVersion.
    pub fn apply(&self, obj: Value) -> Result<u64, String> {
        let kind = Kind::of(&obj).ok_or_else(|| format!("unknown apiVersion/kind in {}", short(&obj)))?;
        let rv = {
            let mut inner = self.shared.lock();
            inner.put(kind, obj)?
        };
        self.shared.notify();
        Ok(rv)
    }

    /// Loads objects from JSON text: one object, or a list (`ServiceList`, `NodeList`,
    /// `EndpointSliceList`, `List`) whose items may lack `kind`/`apiVersion` as in a real list.
    pub fn load(&self, json_text: &str) -> Result<u64, String> {
        let v: Value = serde_json::from_str(json_text).map_err(|e| format!("fixture is not JSON: {e}"))?;
        let list_kind = v.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
        let Some(items) = v.get("items").and_then(Value::as_array) else {
            return self.apply(v);
        };
        let item_kind = Kind::ALL.into_iter().find(|k| format!("{}List", k.kind()) == list_kind);
        let mut rv = self.resource_version();
        for item in items {
            let mut item = item.clone();
            if let (Some(k), Some(m)) = (item_kind, item.as_object_mut()) {
                m.entry("kind").or_insert_with(|| json!(k.kind()));
                m.entry("apiVersion").or_insert_with(|| json!(k.api_version()));
            }
            rv = self.apply(item)?;
        }
        Ok(rv)
    }

    /// Deletes an object (namespace ignored for Nodes), recording a `DELETED` event. Returns the
    /// new resourceVersion, or `None` if there was no such object.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<u64> {
        let rv = {
            let mut inner = self.shared.lock();
            let key = key_for(kind, namespace, name);
            let old = inner.objects.remove(&key)?;
            inner.rv += 1;
            let rv = inner.rv;
            let mut gone = old.clone();
            set_rv(&mut gone, rv);
            inner.record(Stored { rv, key, ty: EventType::Deleted, obj: gone, prev: Some(old) });
            rv
        };
        self.shared.notify();
        Some(rv)
    }

    /// The current object (with `kind`/`apiVersion`).
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.shared.lock().objects.get(&key_for(kind, namespace, name)).cloned()
    }

    /// Every current object of a kind, in namespace/name order (with `kind`/`apiVersion`).
    pub fn objects(&self, kind: Kind) -> Vec<Value> {
        self.shared.lock().objects.iter().filter(|(k, _)| k.0 == kind).map(|(_, v)| v.clone()).collect()
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Forgets the history up to now, as etcd compaction does: a watch (or a continued list)
    /// from an older resourceVersion gets 410 Expired. Open watches are not affected.
    pub fn compact(&self) {
        let mut inner = self.shared.lock();
        inner.compacted = inner.rv;
        inner.history.clear();
    }

    /// Sends every open watch an `ERROR` event with a 410 Expired Status and ends it, as the
    /// watch cache does with a watcher that fell behind.
    pub fn expire_watches(&self) {
        {
            let mut inner = self.shared.lock();
            let rv = inner.rv;
            for w in inner.watchers.drain(..) {
                let from = w.info.resource_version.clone().unwrap_or_default();
                let _ = w.tx.send(Frame::Line(event_line("ERROR", &expired_status(&format!("too old resource version: {from} ({rv})")))));
            }
        }
        self.shared.notify();
    }

    /// Ends every open watch normally (as when its `timeoutSeconds` runs out, without the bookmark).
    pub fn close_watches(&self) {
        self.shared.lock().watchers.clear();
        self.shared.notify();
    }

    /// Sends a `BOOKMARK` at the current resourceVersion to every open watch that allowed them.
    pub fn bookmark(&self) {
        let inner = self.shared.lock();
        for w in inner.watchers.iter().filter(|w| w.info.bookmarks) {
            let _ = w.tx.send(Frame::Line(bookmark_line(w.info.kind, inner.rv, false)));
        }
    }

    /// How a watch from a compacted resourceVersion is refused (default: [`GoneMode::ErrorEvent`]).
    pub fn set_gone_mode(&self, mode: GoneMode) {
        self.shared.lock().gone_mode = mode;
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.clone()
    }

    /// The requests of one verb on one kind.
    pub fn requests_of(&self, verb: &str, kind: Kind) -> Vec<RequestRecord> {
        self.requests().into_iter().filter(|r| r.verb == verb && r.kind == Some(kind)).collect()
    }

    /// The watches open now.
    pub fn open_watches(&self) -> Vec<WatchInfo> {
        self.shared.lock().watchers.iter().map(|w| w.info.clone()).collect()
    }

    /// Waits until `cond` holds, re-checking whenever the server's state changes (a request, a
    /// watch opened or closed, an object written). No timing: wrap it in a timeout as a guard.
    pub async fn wait_until(&self, mut cond: impl FnMut(&FakeApiServer) -> bool) {
        let mut rx = self.shared.changed.subscribe();
        loop {
            if cond(self) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 120 {
        format!("{}…", &s[..s.char_indices().take_while(|(i, _)| *i < 120).last().map_or(0, |(i, _)| i)])
    } else {
        s
    }
}

fn key_for(kind: Kind, namespace: &str, name: &str) -> Key {
    let ns = if kind.namespaced() { if namespace.is_empty() { "default" } else { namespace } } else { "" };
    (kind, ns.to_string(), name.to_string())
}

fn set_rv(obj: &mut Value, rv: u64) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
    }
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

impl Inner {
    /// Stores an object (create or replace) at a new resourceVersion.
    fn put(&mut self, kind: Kind, mut obj: Value) -> Result<u64, String> {
        let name = meta_str(&obj, "name").filter(|n| !n.is_empty()).ok_or_else(|| format!("{} without metadata.name", kind.kind()))?.to_string();
        let ns = meta_str(&obj, "namespace").unwrap_or_default().to_string();
        let key = key_for(kind, &ns, &name);
        let prev = self.objects.get(&key).cloned();
        self.rv += 1;
        let rv = self.rv;
        let meta = obj.get_mut("metadata").and_then(Value::as_object_mut).ok_or("metadata is not an object")?;
        if kind.namespaced() {
            meta.insert("namespace".into(), json!(key.1));
        } else {
            meta.remove("namespace");
        }
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        let old_meta = prev.as_ref().and_then(|p| p.get("metadata"));
        for field in ["uid", "creationTimestamp"] {
            if let Some(v) = old_meta.and_then(|m| m.get(field)) {
                meta.insert(field.into(), v.clone());
            }
        }
        meta.entry("uid").or_insert_with(|| json!(new_uid()));
        meta.entry("creationTimestamp").or_insert_with(|| json!(netd_common::report::rfc3339(SystemTime::now())));
        if let Some(m) = obj.as_object_mut() {
            m.insert("kind".into(), json!(kind.kind()));
            m.insert("apiVersion".into(), json!(kind.api_version()));
        }
        let ty = if prev.is_some() { EventType::Modified } else { EventType::Added };
        self.objects.insert(key.clone(), obj.clone());
        self.record(Stored { rv, key, ty, obj, prev });
        Ok(rv)
    }

    /// Keeps the event in the history and sends it to the open watches it concerns.
    fn record(&mut self, ev: Stored) {
        let line = event_line(ev.ty.as_str(), &ev.obj);
        self.watchers.retain(|w| {
            if w.info.kind != ev.key.0 || !w.filter.matches(&ev.key, &ev.obj) {
                return !w.tx.is_closed();
            }
            w.tx.send(Frame::Line(line.clone())).is_ok()
        });
        self.history.push(ev);
    }

    /// The objects as they were at `rv` (`None`: that part of the history is compacted).
    fn state_at(&self, rv: u64) -> Option<BTreeMap<Key, Value>> {
        if rv < self.compacted || rv > self.rv {
            return None;
        }
        let mut objects = self.objects.clone();
        for ev in self.history.iter().rev().take_while(|e| e.rv > rv) {
            match &ev.prev {
                Some(p) => objects.insert(ev.key.clone(), p.clone()),
                None => objects.remove(&ev.key),
            };
        }
        Some(objects)
    }
}

fn new_uid() -> String {
    let r: u128 = rand::random();
    let h = format!("{r:032x}");
    format!("{}-{}-4{}-a{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

fn event_line(ty: &str, obj: &Value) -> Bytes {
    let mut s = json!({ "type": ty, "object": obj }).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn bookmark_line(kind: Kind, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({ "resourceVersion": rv.to_string(), "creationTimestamp": null });
    if initial_events_end {
        metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    event_line("BOOKMARK", &json!({ "kind": kind.kind(), "apiVersion": kind.api_version(), "metadata": metadata }))
}

/// A `Status` object as kube-apiserver writes it.
fn status_object(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut s = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        s["details"] = d;
    }
    s
}

fn expired_status(message: &str) -> Value {
    status_object(410, "Expired", message, None)
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}

fn status_response(code: u16, reason: &str, message: &str, details: Option<Value>) -> Response {
    json_response(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &status_object(code, reason, message, details))
}

fn not_found(kind: Kind, name: &str) -> Response {
    let mut details = json!({ "name": name, "group": kind.group(), "kind": kind.plural() });
    if kind.group().is_empty() {
        if let Some(d) = details.as_object_mut() {
            d.remove("group");
        }
    }
    status_response(404, "NotFound", &format!("{} \"{name}\" not found", qualified(kind)), Some(details))
}

/// `services`, `endpointslices.discovery.k8s.io`: how the API server names a resource in messages.
fn qualified(kind: Kind) -> String {
    if kind.group().is_empty() {
        kind.plural().to_string()
    } else {
        format!("{}.{}", kind.plural(), kind.group())
    }
}

/// A request path, parsed.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => ("discovery.k8s.io", rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(sub.to_string())),
        _ => return None,
    };
    let kind = Kind::from_group_plural(group, plural)?;
    if namespace.is_some() && !kind.namespaced() {
        return None;
    }
    if name.is_some() && kind.namespaced() && namespace.is_none() {
        return None;
    }
    Some(Target { kind, namespace, name, subresource: sub })
}

/// Label and field selectors of a list or watch.
#[derive(Default, Clone)]
struct Filter {
    namespace: Option<String>,
    labels: Vec<Requirement>,
    fields: Vec<(String, bool, String)>,
}

#[derive(Clone)]
enum Requirement {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
}

impl Filter {
    fn new(namespace: Option<String>, q: &BTreeMap<String, String>) -> Result<Filter, String> {
        let mut f = Filter { namespace, ..Default::default() };
        if let Some(sel) = q.get("labelSelector").filter(|s| !s.is_empty()) {
            if sel.contains('(') {
                return Err(format!("unable to parse requirement: set-based selector {sel:?} is not supported by this fake API server"));
            }
            for part in sel.split(',').map(str::trim) {
                let req = if let Some((k, v)) = part.split_once("!=") {
                    Requirement::Ne(k.trim().into(), v.trim().into())
                } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                    Requirement::Eq(k.trim().into(), v.trim().into())
                } else if let Some(k) = part.strip_prefix('!') {
                    Requirement::Absent(k.trim().into())
                } else if !part.is_empty() {
                    Requirement::Exists(part.into())
                } else {
                    return Err(format!("unable to parse requirement: empty requirement in {sel:?}"));
                };
                f.labels.push(req);
            }
        }
        if let Some(sel) = q.get("fieldSelector").filter(|s| !s.is_empty()) {
            for part in sel.split(',').map(str::trim) {
                let (field, eq, value) = if let Some((k, v)) = part.split_once("!=") {
                    (k, false, v)
                } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                    (k, true, v)
                } else {
                    return Err(format!("invalid field selector: {part:?}"));
                };
                if field != "metadata.name" && field != "metadata.namespace" {
                    return Err(format!("field label not supported: {field}"));
                }
                f.fields.push((field.to_string(), eq, value.to_string()));
            }
        }
        Ok(f)
    }

    fn matches(&self, key: &Key, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if &key.1 != ns {
                return false;
            }
        }
        let labels = obj.get("metadata").and_then(|m| m.get("labels")).and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            Requirement::Eq(k, v) => label(k) == Some(v.as_str()),
            Requirement::Ne(k, v) => label(k) != Some(v.as_str()),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::Absent(k) => label(k).is_none(),
        });
        let fields_ok = self.fields.iter().all(|(field, eq, value)| {
            let actual = if field == "metadata.name" { key.2.as_str() } else { key.1.as_str() };
            (actual == value) == *eq
        });
        labels_ok && fields_ok
    }
}

/// A continue token: opaque to clients (hex of the JSON kube-apiserver base64-encodes).
fn encode_continue(rv: u64, after: &Key) -> String {
    let start = format!("{}/{}\u{0}", after.1, after.2);
    json!({ "v": "meta.k8s.io/v1", "rv": rv, "start": start }).to_string().bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Option<(u64, String, String)> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len()).step_by(2).map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok()).collect();
    let v: Value = serde_json::from_slice(&bytes?).ok()?;
    let rv = v.get("rv")?.as_u64()?;
    let start = v.get("start")?.as_str()?.trim_end_matches('\u{0}');
    let (ns, name) = start.split_once('/')?;
    Some((rv, ns.to_string(), name.to_string()))
}

/// The JSON merge patch of RFC 7386.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

async fn handle(
    AxState(shared): AxState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    let target = parse_path(uri.path());
    let watch = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (&method, &target) {
        (&Method::GET, Some(t)) if t.name.is_some() => "get",
        (&Method::GET, Some(_)) if watch => "watch",
        (&Method::GET, Some(_)) => "list",
        (&Method::PATCH, Some(_)) => "patch",
        _ => "other",
    };
    let response = match target {
        None => status_response(404, "NotFound", "the server could not find the requested resource", None),
        Some(t) => match verb {
            "get" => get(&shared, &t),
            "watch" => start_watch(&shared, &t, &q),
            "list" => list(&shared, &t, &q),
            "patch" => patch(&shared, &t, &headers, &body),
            _ => status_response(405, "MethodNotAllowed", &format!("{method} is not supported by this fake API server"), None),
        },
    };
    let record = RequestRecord {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: q,
        verb,
        kind: parse_path(uri.path()).map(|t| t.kind),
        status: response.status().as_u16(),
        content_type: headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(String::from),
        authorization: headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(String::from),
    };
    shared.lock().requests.push(record);
    shared.notify();
    response
}

fn get(shared: &Shared, t: &Target) -> Response {
    let name = t.name.clone().unwrap_or_default();
    if t.subresource.as_deref().is_some_and(|s| s != "status") {
        return status_response(404, "NotFound", "the server could not find the requested resource", None);
    }
    let inner = shared.lock();
    match inner.objects.get(&key_for(t.kind, t.namespace.as_deref().unwrap_or_default(), &name)) {
        Some(obj) => json_response(StatusCode::OK, obj),
        None => not_found(t.kind, &name),
    }
}

fn strip_type(mut obj: Value) -> Value {
    if let Some(m) = obj.as_object_mut() {
        m.remove("kind");
        m.remove("apiVersion");
    }
    obj
}

fn list(shared: &Shared, t: &Target, q: &BTreeMap<String, String>) -> Response {
    let filter = match Filter::new(t.namespace.clone(), q) {
        Ok(f) => f,
        Err(e) => return status_response(400, "BadRequest", &e, None),
    };
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => None,
        Some(Ok(0)) => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return status_response(400, "BadRequest", "limit: invalid value", None),
    };
    let inner = shared.lock();
    let (rv, objects, after) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let Some((rv, ns, name)) = decode_continue(token) else {
                return status_response(400, "BadRequest", "continue key is not valid: illegal base64 data", None);
            };
            match inner.state_at(rv) {
                Some(objects) => (rv, objects, Some((t.kind, ns, name))),
                None => {
                    return status_response(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
                        None,
                    )
                }
            }
        }
        None => {
            let requested = q.get("resourceVersion").filter(|v| !v.is_empty() && *v != "0");
            match requested.map(|v| v.parse::<u64>()) {
                None => (inner.rv, inner.objects.clone(), None),
                Some(Err(_)) => return status_response(400, "BadRequest", "resourceVersion: Invalid value", None),
                Some(Ok(n)) if n > inner.rv => {
                    return status_response(
                        504,
                        "Timeout",
                        &format!("Timeout: Too large resource version: {n}, current: {}", inner.rv),
                        Some(json!({ "causes": [{ "reason": "ResourceVersionTooLarge", "message": "Too large resource version" }], "retryAfterSeconds": 1 })),
                    )
                }
                Some(Ok(n)) if q.get("resourceVersionMatch").map(String::as_str) == Some("Exact") => match inner.state_at(n) {
                    Some(objects) => (n, objects, None),
                    None => return status_response(410, "Expired", &format!("too old resource version: {n} ({})", inner.compacted + 1), None),
                },
                Some(Ok(_)) => (inner.rv, inner.objects.clone(), None),
            }
        }
    };
    drop(inner);
    let mut matching = objects.into_iter().filter(|(k, v)| k.0 == t.kind && filter.matches(k, v)).filter(|(k, _)| after.as_ref().is_none_or(|a| k > a));
    let mut items = Vec::new();
    let mut last: Option<Key> = None;
    for (k, v) in matching.by_ref() {
        if limit.is_some_and(|l| items.len() >= l) {
            // One more exists: this page ends at `last`.
            let remaining = 1 + matching.count();
            let token = last.as_ref().map(|l| encode_continue(rv, l)).unwrap_or_default();
            return json_response(
                StatusCode::OK,
                &json!({
                    "kind": format!("{}List", t.kind.kind()),
                    "apiVersion": t.kind.api_version(),
                    "metadata": { "resourceVersion": rv.to_string(), "continue": token, "remainingItemCount": remaining },
                    "items": items,
                }),
            );
        }
        last = Some(k);
        items.push(strip_type(v));
    }
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", t.kind.kind()),
            "apiVersion": t.kind.api_version(),
            "metadata": { "resourceVersion": rv.to_string() },
            "items": items,
        }),
    )
}

fn start_watch(shared: &Arc<Shared>, t: &Target, q: &BTreeMap<String, String>) -> Response {
    let filter = match Filter::new(t.namespace.clone(), q) {
        Ok(f) => f,
        Err(e) => return status_response(400, "BadRequest", &e, None),
    };
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let initial_events = q.get("sendInitialEvents").map(String::as_str) == Some("true");
    if initial_events && q.get("resourceVersionMatch").map(String::as_str) != Some("NotOlderThan") {
        return status_response(422, "Invalid", "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan", None);
    }
    let timeout = match q.get("timeoutSeconds").map(|s| s.parse::<u64>()) {
        None => Duration::from_secs(1800),
        Some(Ok(s)) => Duration::from_secs(s),
        Some(Err(_)) => return status_response(400, "BadRequest", "timeoutSeconds: invalid value", None),
    };
    let requested = q.get("resourceVersion").cloned().filter(|v| !v.is_empty());
    let (tx, rx) = mpsc::unbounded_channel();
    let mut inner = shared.lock();
    match requested.as_deref() {
        // "Most recent" / "any": the current state as ADDED events, then the changes.
        None | Some("0") => {
            for (_, v) in inner.objects.iter().filter(|(k, v)| k.0 == t.kind && filter.matches(k, v)) {
                let _ = tx.send(Frame::Line(event_line("ADDED", v)));
            }
            if initial_events {
                let _ = tx.send(Frame::Line(bookmark_line(t.kind, inner.rv, true)));
            }
        }
        Some(v) => {
            let Ok(from) = v.parse::<u64>() else {
                return status_response(400, "BadRequest", &format!("resourceVersion: Invalid value: {v:?}"), None);
            };
            if from < inner.compacted {
                let status = expired_status(&format!("too old resource version: {from} ({})", inner.compacted + 1));
                return match inner.gone_mode {
                    GoneMode::HttpError => json_response(StatusCode::GONE, &status),
                    GoneMode::ErrorEvent => watch_response(stream_of(vec![Frame::Line(event_line("ERROR", &status))])),
                };
            }
            if from > inner.rv {
                return status_response(504, "Timeout", &format!("Timeout: Too large resource version: {from}, current: {}", inner.rv), None);
            }
            if initial_events {
                for (_, v) in inner.state_at(from).unwrap_or_default().iter().filter(|(k, v)| k.0 == t.kind && filter.matches(k, v)) {
                    let _ = tx.send(Frame::Line(event_line("ADDED", v)));
                }
                let _ = tx.send(Frame::Line(bookmark_line(t.kind, from, true)));
            }
            for ev in inner.history.iter().filter(|e| e.rv > from && e.key.0 == t.kind && filter.matches(&e.key, &e.obj)) {
                let _ = tx.send(Frame::Line(event_line(ev.ty.as_str(), &ev.obj)));
            }
        }
    }
    let id = inner.next_id;
    inner.next_id += 1;
    let info = WatchInfo { kind: t.kind, namespace: t.namespace.clone(), resource_version: requested, bookmarks };
    inner.watchers.push(Watcher { id, info, filter, tx });
    drop(inner);
    shared.notify();
    let guard = WatchGuard { shared: shared.clone(), id };
    let deadline = Box::pin(tokio::time::sleep(timeout));
    let kind = t.kind;
    let stream = futures::stream::unfold((rx, deadline, guard, false), move |(mut rx, mut deadline, guard, done)| async move {
        if done {
            return None;
        }
        tokio::select! {
            frame = rx.recv() => match frame {
                Some(Frame::Line(line)) => Some((Ok(line), (rx, deadline, guard, false))),
                Some(Frame::Abort) => Some((Err(io::Error::new(io::ErrorKind::ConnectionAborted, "fake API server stopped")), (rx, deadline, guard, true))),
                None => None,
            },
            _ = &mut deadline => {
                // timeoutSeconds ran out: a last bookmark (if allowed), then the end.
                if bookmarks {
                    let rv = guard.shared.lock().rv;
                    Some((Ok(bookmark_line(kind, rv, false)), (rx, deadline, guard, true)))
                } else {
                    None
                }
            }
        }
    });
    watch_response(Body::from_stream(stream))
}

fn stream_of(frames: Vec<Frame>) -> Body {
    let lines: Vec<Result<Bytes, io::Error>> = frames
        .into_iter()
        .map(|f| match f {
            Frame::Line(b) => Ok(b),
            Frame::Abort => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "aborted")),
        })
        .collect();
    Body::from_stream(futures::stream::iter(lines))
}

fn watch_response(body: Body) -> Response {
    Response::builder().status(StatusCode::OK).header(header::CONTENT_TYPE, "application/json").body(body).unwrap_or_default()
}

/// Unregisters a watch when its response body is dropped (client gone, timeout, server stopped).
struct WatchGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.shared.lock().watchers.retain(|w| w.id != self.id);
        self.shared.notify();
    }
}

fn patch(shared: &Shared, t: &Target, headers: &HeaderMap, body: &[u8]) -> Response {
    let Some(name) = t.name.clone() else {
        return status_response(405, "MethodNotAllowed", "PATCH needs an object name", None);
    };
    let status_sub = match t.subresource.as_deref() {
        None => false,
        Some("status") => true,
        Some(_) => return status_response(404, "NotFound", "the server could not find the requested resource", None),
    };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let content_type = content_type.split(';').next().unwrap_or_default().trim();
    if content_type != "application/merge-patch+json" && content_type != "application/strategic-merge-patch+json" {
        return status_response(
            415,
            "UnsupportedMediaType",
            &format!("the body of the request was in an unknown format - accepted media types by this fake API server: application/merge-patch+json, application/strategic-merge-patch+json; got {content_type:?}"),
            None,
        );
    }
    let patch: Value = match serde_json::from_slice(body) {
        Ok(p @ Value::Object(_)) => p,
        Ok(_) => return status_response(400, "BadRequest", "the patch is not a JSON object", None),
        Err(e) => return status_response(400, "BadRequest", &format!("error decoding patch: {e}"), None),
    };
    let key = key_for(t.kind, t.namespace.as_deref().unwrap_or_default(), &name);
    let result = {
        let mut inner = shared.lock();
        let Some(old) = inner.objects.get(&key).cloned() else {
            return not_found(t.kind, &name);
        };
        let mut new = old.clone();
        merge_patch(&mut new, &patch);
        // The status strategy keeps the spec; the main resource's keeps the status.
        let kept = if status_sub { "spec" } else { "status" };
        match (old.get(kept), new.as_object_mut()) {
            (Some(v), Some(m)) => {
                m.insert(kept.into(), v.clone());
            }
            (None, Some(m)) => {
                m.remove(kept);
            }
            _ => {}
        }
        for field in ["name", "namespace", "uid", "resourceVersion", "creationTimestamp"] {
            if let (Some(v), Some(m)) = (old.get("metadata").and_then(|m| m.get(field)), new.get_mut("metadata").and_then(Value::as_object_mut)) {
                m.insert(field.into(), v.clone());
            }
        }
        if new == old {
            Ok(old)
        } else {
            inner.put(t.kind, new).map(|_| inner.objects.get(&key).cloned().unwrap_or_default())
        }
    };
    shared.notify();
    match result {
        Ok(obj) => json_response(StatusCode::OK, &obj),
        Err(e) => status_response(422, "Invalid", &e, None),
    }
}

/// Accepts connections, tagging each with the epoch it was accepted in.
struct EpochListener {
    inner: TcpListener,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for EpochListener {
    type Io = EpochIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let epoch = self.shared.epoch.load(Ordering::SeqCst);
                    return (EpochIo { stream, epoch, shared: self.shared.clone() }, addr);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection that fails once the server has been stopped after it was accepted.
struct EpochIo {
    stream: TcpStream,
    epoch: u64,
    shared: Arc<Shared>,
}

impl EpochIo {
    fn check(&self) -> io::Result<()> {
        if self.shared.epoch.load(Ordering::SeqCst) == self.epoch {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::ConnectionReset, "fake API server stopped"))
        }
    }
}

impl AsyncRead for EpochIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for EpochIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_like_the_api_server_routes_them() {
        let t = parse_path("/api/v1/namespaces/default/services/web").unwrap();
        assert_eq!((t.kind, t.namespace.as_deref(), t.name.as_deref()), (Kind::Service, Some("default"), Some("web")));
        let t = parse_path("/apis/discovery.k8s.io/v1/endpointslices").unwrap();
        assert_eq!((t.kind, t.namespace, t.name), (Kind::EndpointSlice, None, None));
        let t = parse_path("/api/v1/nodes/n1/status").unwrap();
        assert_eq!((t.kind, t.subresource.as_deref()), (Kind::Node, Some("status")));
        assert!(parse_path("/api/v1/endpointslices").is_none());
        assert!(parse_path("/api/v1/namespaces/x/nodes").is_none());
        assert!(parse_path("/api/v1/services/web").is_none());
    }

    #[test]
    fn continue_tokens_round_trip() {
        let tok = encode_continue(42, &(Kind::Service, "kube-system".into(), "kube-dns".into()));
        assert_eq!(decode_continue(&tok), Some((42, "kube-system".into(), "kube-dns".into())));
        assert_eq!(decode_continue("zz"), None);
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut v = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge_patch(&mut v, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
        assert_eq!(v, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
    }

    }
