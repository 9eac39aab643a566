//! The etcd side of the service registry: `<prefix>/services/<ns>/<name>` (v1 Service JSON),
//! `<prefix>/endpointslices/<ns>/<name>` (discovery.k8s.io/v1 EndpointSlice JSON), the
//! allocation keys `<prefix>/allocations/clusterips/<ip>` and `<prefix>/allocations/nodeports/<port>`
//! (value: `ns/name` of the owner), and the cluster's service ranges at `<prefix>/config`.
//!
//! `netd apply` reads the registry once (the allocations, the config, and the stored value of
//! every key the file's objects map to), plans every object from that ([`super::changes`]:
//! nothing is written unless all of them are valid and can be allocated), then writes the
//! objects in order, in transactions of up to 128 operations. Each transaction fails as a
//! whole if any key it claims appeared, or any value it replaces changed, since the read; then
//! the registry is read again and the objects not yet written are planned again. So two
//! concurrent `netd apply` can never hand out the same ClusterIP or nodePort, nor overwrite
//! each other's objects unseen. What a concurrent writer *can* cause: between the read and a
//! later transaction it may take the address or port an object of this file asks for by
//! name, or the last free ones; the objects written before that stay written, and the error
//! says how many there were (without concurrent writers, a file that validates is written
//! completely, or not at all when etcd is unreachable before the first transaction).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::sync::watch;
use tracing::{info, warn};

use super::changes::{self, Applied, Expect, Keys, Known, Op, Stamp, Step};
use super::config::{AllocOptions, ClusterConfig, ConfigMismatch};
use super::manifest::{Kind, Object, ObjectRef};
use crate::snapshot::{NsName, ServiceSnapshot};
use crate::etcd::{list_prefix, watch_client};

pub const DEFAULT_PREFIX: &str = "/netd/registry";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Transactions in a row that may lose a race (each followed by a fresh read) before giving up.
const ATTEMPTS: usize = 20;
/// Read-only transactions of `get`s run at once while reading the objects of a file.
const PARALLEL_READS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("etcd {op}: {}", super::etcd_brief(source))]
    Etcd { op: String, source: etcd_client::Error },
    #[error("reading etcd TLS file {path}: {source}")]
    TlsFile { path: String, source: std::io::Error },
    #[error("etcd TLS: {0}")]
    Tls(String),
    #[error("{object}: {field}: {message}")]
    Invalid { object: String, field: String, message: String },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}: too much contention, gave up")]
    Contended(String),
    #[error("malformed value at {key}: {message}")]
    Malformed { key: String, message: String },
    /// Every object of a file that cannot be applied (nothing of it was written).
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Rejected(Vec<RegistryError>),
    #[error("{0}")]
    ConfigMismatch(ConfigMismatch),
    #[error("cluster config: {0}")]
    InvalidConfig(String),
    /// Objects written before `source` stopped the rest (only when a concurrent writer or etcd
    /// failed us after the file had been validated).
    #[error("{source}\n{} of {total} objects were applied before this and stay applied; the others were not", done.len())]
    Partial { done: Vec<Applied>, total: usize, source: Box<RegistryError> },
}

fn etcd(op: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> RegistryError {
    let op = op.into();
    move |source| RegistryError::Etcd { op, source }
}

/// How to reach etcd and where the registry lives.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl RegistryOptions {
    pub fn new(endpoints: Vec<String>) -> Self {
        RegistryOptions { endpoints, prefix: DEFAULT_PREFIX.into(), ca_file: None, cert_file: None, key_file: None }
    }
}

/// How [`ServiceRegistry::run_watch`] is doing, for `netd status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchStatus {
    /// A complete list has been published at least once.
    pub listed: bool,
    /// Why the registry cannot be followed right now (the etcd operation and its error), while
    /// the last snapshot stays published; `None` once a list succeeds again.
    pub error: Option<String>,
    /// Revision of the published snapshot.
    pub revision: i64,
    /// Services in it.
    pub services: usize,
}

/// A client of the etcd `opts` names (TLS when files are given), as the registry uses: also for
/// other readers of the same etcd (cluster DNS's SkyDNS records).
pub async fn etcd_client(opts: &RegistryOptions) -> Result<Client, RegistryError> {
    // Keep-alive pings, as for the subnet registry: without them a watch on a connection that
    // died silently (etcd's machine restarted, a NAT forgot it) waits forever.
    let mut co = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    if opts.ca_file.is_some() || opts.cert_file.is_some() {
        co = co.with_tls(tls_options(opts)?);
    }
    Client::connect(&opts.endpoints, Some(co)).await.map_err(etcd(format!("connect to {}", opts.endpoints.join(","))))
}

#[derive(Clone)]
pub struct ServiceRegistry {
    client: Client,
    prefix: String,
}

impl ServiceRegistry {
    pub async fn connect(opts: &RegistryOptions) -> Result<Self, RegistryError> {
        let client = etcd_client(opts).await?;
        Ok(ServiceRegistry { client, prefix: opts.prefix.trim_end_matches('/').to_string() })
    }

    fn keys(&self) -> Keys {
        Keys::new(&self.prefix)
    }
    pub fn service_key(&self, k: &NsName) -> String {
        self.keys().service(k)
    }
    pub fn slice_key(&self, k: &NsName) -> String {
        self.keys().slice(k)
    }

    /// Lists the whole registry at one revision (in pages: it is bigger than one gRPC message
    /// past a few thousand Services).
    pub async fn snapshot(&self) -> Result<ServiceSnapshot, RegistryError> {
        let prefix = format!("{}/", self.prefix);
        let listing = list_prefix(&self.client, &prefix).await.map_err(etcd(format!("get --prefix {prefix}")))?;
        let mut snap = ServiceSnapshot::new();
        snap.revision = listing.revision;
        for kv in &listing.kvs {
            self.fold(&mut snap, kv.key(), Some(kv.value()));
        }
        Ok(snap)
    }

    /// Applies one key's new value (`None`: deleted) to a snapshot; malformed values are
    /// skipped with a warning (the object is then absent, as if never written).
    fn fold(&self, snap: &mut ServiceSnapshot, key: &[u8], value: Option<&[u8]>) {
        let key = String::from_utf8_lossy(key);
        let Some(rest) = key.strip_prefix(&format!("{}/", self.prefix)) else { return };
        if rest == "config" {
            snap.cluster_config = value.and_then(|v| match ClusterConfig::from_json(v) {
                Ok(c) => Some(c),
                Err(e) => {
                    warn!("ignoring malformed cluster config at {key}: {e}");
                    None
                }
            });
            return;
        }
        let mut parts = rest.splitn(3, '/');
        let (Some(kind), Some(ns), Some(name)) = (parts.next(), parts.next(), parts.next()) else { return };
        let id = NsName::new(ns, name);
        match (kind, value) {
            ("services", None) => snap.remove_service(&id),
            ("endpointslices", None) => snap.remove_slice(&id),
            ("services", Some(v)) => match serde_json::from_slice::<Service>(v) {
                Ok(s) => snap.put_service(Arc::new(s)),
                Err(e) => {
                    warn!("ignoring malformed Service at {key}: {e}");
                    snap.remove_service(&id);
                }
            },
            ("endpointslices", Some(v)) => match serde_json::from_slice::<EndpointSlice>(v) {
                Ok(s) => snap.put_slice(Arc::new(s)),
                Err(e) => {
                    warn!("ignoring malformed EndpointSlice at {key}: {e}");
                    snap.remove_slice(&id);
                }
            },
            _ => {}
        }
    }

    /// Keeps `tx` holding the current registry: list, then watch from that revision; on any
    /// error the last snapshot stays published and the registry is listed again after a pause.
    /// `status` says how that goes (for `netd status`). Returns when every receiver is gone.
    pub async fn run_watch(&self, tx: watch::Sender<Arc<ServiceSnapshot>>, status: &watch::Sender<WatchStatus>) {
        let prefix = format!("{}/", self.prefix);
        let mut backoff = Duration::from_millis(200);
        let failed = |e: &RegistryError| status.send_modify(|s| s.error = Some(e.to_string()));
        loop {
            if tx.is_closed() {
                return;
            }
            let mut snap = match self.snapshot().await {
                Ok(s) => s,
                Err(e) => {
                    warn!("listing the service registry failed (keeping the last snapshot): {e}");
                    failed(&e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            info!(revision = snap.revision, services = snap.services().len(), "service registry listed");
            let _ = tx.send(Arc::new(snap.clone()));
            status.send_modify(|s| *s = WatchStatus { listed: true, error: None, revision: snap.revision, services: snap.services().len() });
            let opts = WatchOptions::new().with_prefix().with_start_revision(snap.revision + 1).with_progress_notify();
            let mut stream = match watch_client(&self.client).watch(prefix.clone(), Some(opts)).await {
                Ok(s) => s,
                Err(e) => {
                    let e = etcd(format!("watch {prefix}"))(e);
                    warn!("watching the service registry failed: {e}");
                    failed(&e);
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    _ = tx.closed() => return,
                };
                match msg {
                    Ok(Some(resp)) if !resp.canceled() && resp.compact_revision() == 0 => {
                        if resp.events().is_empty() {
                            continue;
                        }
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            match ev.event_type() {
                                EventType::Put => self.fold(&mut snap, kv.key(), Some(kv.value())),
                                EventType::Delete => self.fold(&mut snap, kv.key(), None),
                            }
                            snap.revision = snap.revision.max(kv.mod_revision());
                        }
                        let _ = tx.send(Arc::new(snap.clone()));
                        status.send_modify(|s| {
                            s.revision = snap.revision;
                            s.services = snap.services().len();
                        });
                    }
                    Ok(_) => break,
                    Err(e) => {
                        let e = etcd(format!("watch {prefix}"))(e);
                        warn!("service registry watch broke (relisting): {e}");
                        failed(&e);
                        break;
                    }
                }
            }
            tokio::time::sleep(backoff).await;
        }
    }

    async fn get_raw(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, RegistryError> {
        let r = self.client.kv_client().get(key, None).await.map_err(etcd(format!("get {key}")))?;
        Ok(r.kvs().first().map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    async fn keys_under(&self, prefix: &str) -> Result<BTreeMap<String, String>, RegistryError> {
        let listing = list_prefix(&self.client, prefix).await.map_err(etcd(format!("get --prefix {prefix}")))?;
        Ok(listing.kvs.iter().map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), String::from_utf8_lossy(kv.value()).into_owned())).collect())
    }

    /// Values of many keys (`true`: every key under that prefix), read in read-only
    /// transactions of up to [`changes::MAX_TXN_OPS`] `get`s, a few at a time. Keys not found
    /// are absent from the result.
    async fn get_many(&self, gets: Vec<(String, bool)>) -> Result<BTreeMap<String, Vec<u8>>, RegistryError> {
        let chunks: Vec<Vec<(String, bool)>> = gets.chunks(changes::MAX_TXN_OPS).map(<[_]>::to_vec).collect();
        let reads = chunks.into_iter().map(|chunk| {
            let mut kv = self.client.kv_client();
            async move {
                let what = format!("get {} and {} more keys", chunk[0].0, chunk.len() - 1);
                let ops: Vec<TxnOp> = chunk.iter().map(|(k, prefix)| TxnOp::get(k.clone(), prefix.then(|| GetOptions::new().with_prefix()))).collect();
                let r = kv.txn(Txn::new().and_then(ops)).await.map_err(etcd(what))?;
                let mut out = Vec::new();
                for resp in r.op_responses() {
                    if let TxnOpResponse::Get(g) = resp {
                        out.extend(g.kvs().iter().map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec())));
                    }
                }
                Ok::<_, RegistryError>(out)
            }
        });
        let parts: Vec<Vec<(String, Vec<u8>)>> = futures::stream::iter(reads).buffered(PARALLEL_READS).try_collect().await?;
        Ok(parts.into_iter().flatten().collect())
    }

    /// Every ClusterIP and nodePort allocation, by owner.
    async fn read_allocations(&self, known: &mut Known) -> Result<(), RegistryError> {
        let keys = self.keys();
        known.add_allocs(&keys, self.keys_under(&keys.cluster_ips()).await?);
        known.add_allocs(&keys, self.keys_under(&keys.node_ports()).await?);
        Ok(())
    }

    /// Writes steps in one transaction that fails (`Ok(false)`) if any value a step expects
    /// changed. `config`: also fails if the cluster config is not that any more, and writes the
    /// seed if one is given.
    async fn write(&self, steps: &[Step], config: Option<(&Expect, Option<&Vec<u8>>)>) -> Result<bool, RegistryError> {
        let config_key = self.keys().config();
        let mut cmp = Vec::new();
        let mut ops = Vec::new();
        if let Some((now, seed)) = config {
            cmp.push(expect(&config_key, now));
            ops.extend(seed.map(|v| TxnOp::put(config_key.clone(), v.clone(), None)));
        }
        for s in steps {
            cmp.extend(s.compares.iter().map(|(k, e)| expect(k, e)));
            ops.extend(s.ops.iter().map(|o| match o {
                Op::Put(k, v) => TxnOp::put(k.clone(), v.clone(), None),
                Op::Delete(k) => TxnOp::delete(k.clone(), None),
            }));
        }
        let what = format!("txn writing {} ({} objects, {} operations)", steps.first().map_or("", |s| s.applied.what.as_str()), steps.len(), ops.len());
        let r = self.client.kv_client().txn(Txn::new().when(cmp).and_then(ops)).await.map_err(etcd(what))?;
        Ok(r.succeeded())
    }

    /// The cluster's service ranges as stored (`None`: not set yet).
    pub async fn cluster_config(&self) -> Result<Option<ClusterConfig>, RegistryError> {
        let key = self.keys().config();
        match self.get_raw(&key).await? {
            None => Ok(None),
            Some((v, _)) => ClusterConfig::from_json(&v).map(Some).map_err(|message| RegistryError::Malformed { key, message }),
        }
    }

    /// `netd config set`: the given ranges replace the stored ones (a range not given keeps its
    /// stored value, or the default). Refused while a Service holds a ClusterIP or nodePort
    /// outside the new ranges: it would keep an address the cluster no longer hands out. The
    /// write fails, and is retried after a fresh read, if any allocation changed since the check.
    pub async fn set_cluster_config(&self, flags: &AllocOptions) -> Result<ClusterConfig, RegistryError> {
        let keys = self.keys();
        let key = keys.config();
        for _ in 0..ATTEMPTS {
            let r = self.client.kv_client().get(key.clone(), None).await.map_err(etcd(format!("get {key}")))?;
            let revision = r.header().map_or(0, |h| h.revision());
            let raw = r.kvs().first().map(|kv| kv.value().to_vec());
            // A malformed stored config is what this command repairs: start from the defaults.
            let base = raw.as_deref().and_then(|v| ClusterConfig::from_json(v).ok()).unwrap_or_default();
            let new = flags.over(&base);
            new.check().map_err(RegistryError::InvalidConfig)?;
            let mut known = Known::default();
            self.read_allocations(&mut known).await?;
            let mut outside: Vec<String> = known
                .allocs
                .iter()
                .filter(|(a, _)| match a {
                    changes::Alloc::Ip(ip) => !new.usable_cluster_ip(*ip),
                    changes::Alloc::Port(p) => !new.service_node_port_range.contains(p),
                })
                .map(|(a, owner)| match a {
                    changes::Alloc::Ip(ip) => format!("service {owner} has ClusterIP {ip}"),
                    changes::Alloc::Port(p) => format!("service {owner} has nodePort {p}"),
                })
                .collect();
            if !outside.is_empty() {
                outside.sort();
                let more = if outside.len() > 5 { format!(" and {} more", outside.len() - 5) } else { String::new() };
                outside.truncate(5);
                return Err(RegistryError::InvalidConfig(format!("{new} would leave allocations outside it: {}{more} (delete those Services first)", outside.join(", "))));
            }
            let mut cmp = vec![expect(&key, &raw.map_or(Expect::Absent, Expect::Value))];
            // No allocation created or changed since the check above.
            cmp.push(Compare::mod_revision(format!("{}/allocations/", keys.prefix()), CompareOp::Less, revision + 1).with_prefix());
            let put = TxnOp::put(key.clone(), new.to_json(), None);
            let r = self.client.kv_client().txn(Txn::new().when(cmp).and_then(vec![put])).await.map_err(etcd(format!("txn put {key}")))?;
            if r.succeeded() {
                return Ok(new);
            }
        }
        Err(RegistryError::Contended("cluster config".into()))
    }

    /// Stores validated objects (from [`super::apply_manifests`]), allocating what is missing
    /// from the cluster's ranges (seeded from `flags` on an empty cluster; flags that disagree
    /// with them are an error). See the module comment for what is read and written when.
    pub async fn apply(&self, objects: Vec<Object>, flags: &AllocOptions) -> Result<Vec<Applied>, RegistryError> {
        let keys = self.keys();
        let total = objects.len();
        let mut done: Vec<Applied> = Vec::new();
        let mut written = false;
        let mut lost = 0;
        let fail = |done: &[Applied], written: bool, e: RegistryError| {
            if written {
                RegistryError::Partial { done: done.to_vec(), total, source: Box::new(e) }
            } else {
                e
            }
        };
        while done.len() < total {
            let rest = &objects[done.len()..];
            let mut gets = vec![(keys.config(), false)];
            for o in rest {
                gets.push(match o {
                    Object::Service(s) => (keys.service(&id_of(&s.metadata)), false),
                    Object::EndpointSlice(s) => (keys.slice(&id_of(&s.metadata)), false),
                    // `<name>` and what an earlier version made of it (`<name>-1`, ...).
                    Object::Endpoints { namespace, name, .. } => (keys.slice(&NsName::new(namespace.clone(), name.clone())), true),
                });
            }
            let read = async {
                let mut known = Known { values: self.get_many(gets).await?, ..Default::default() };
                self.read_allocations(&mut known).await?;
                Ok::<_, RegistryError>(known)
            };
            let mut known = read.await.map_err(|e| fail(&done, written, e))?;
            let raw = known.values.remove(&keys.config());
            let stored = match raw.as_deref().map(ClusterConfig::from_json).transpose() {
                Ok(s) => s,
                Err(message) => return Err(fail(&done, written, RegistryError::Malformed { key: keys.config(), message: format!("{message} (repair it with `netd config set`)") })),
            };
            let (config, seed) = flags.resolve(stored.as_ref()).map_err(|e| fail(&done, written, RegistryError::ConfigMismatch(e)))?;
            if seed {
                config.check().map_err(|e| fail(&done, written, RegistryError::InvalidConfig(e)))?;
            }
            let mut uid = Stamp::random_uid;
            let mut stamp = Stamp { now: now(), uid: &mut uid };
            let steps = changes::plan_apply(rest, &mut known, &keys, &config, &mut stamp).map_err(|mut errors| {
                let e = if errors.len() == 1 { errors.remove(0) } else { RegistryError::Rejected(errors) };
                fail(&done, written, e)
            })?;
            let mut config_now = raw.map_or(Expect::Absent, Expect::Value);
            let mut seed_value = seed.then(|| config.to_json().into_bytes());
            let mut raced = false;
            for range in changes::batches(&steps, 1) {
                let batch = &steps[range];
                if batch.iter().any(|s| !s.ops.is_empty()) {
                    if !self.write(batch, Some((&config_now, seed_value.as_ref()))).await.map_err(|e| fail(&done, written, e))? {
                        raced = true;
                        break;
                    }
                    written = true;
                    if let Some(v) = seed_value.take() {
                        config_now = Expect::Value(v);
                    }
                }
                done.extend(batch.iter().map(|s| s.applied.clone()));
                lost = 0;
            }
            if raced {
                lost += 1;
                if lost >= ATTEMPTS {
                    let what = rest.first().map(Object::describe).unwrap_or_default();
                    return Err(fail(&done, written, RegistryError::Contended(what)));
                }
            }
        }
        Ok(done)
    }

    pub async fn get_service(&self, id: &NsName) -> Result<Option<Service>, RegistryError> {
        let key = self.service_key(id);
        match self.get_raw(&key).await? {
            None => Ok(None),
            Some((v, _)) => serde_json::from_slice(&v).map(Some).map_err(|e| RegistryError::Malformed { key, message: e.to_string() }),
        }
    }

    /// Deletes the named objects ([`changes::plan_delete`]: a Service takes its ClusterIP,
    /// nodePorts and EndpointSlices with it), in transactions as `apply` writes them. Returns
    /// what was deleted and what was not found.
    pub async fn delete(&self, refs: &[ObjectRef]) -> Result<(Vec<Applied>, Vec<ObjectRef>), RegistryError> {
        let keys = self.keys();
        let mut pending: Vec<ObjectRef> = refs.to_vec();
        let mut deleted = Vec::new();
        let mut missing = Vec::new();
        let mut lost = 0;
        while !pending.is_empty() {
            let mut gets = Vec::new();
            let mut namespaces = BTreeSet::new();
            for r in &pending {
                let id = NsName::new(r.namespace.clone(), r.name.clone());
                match r.kind {
                    Kind::Service => {
                        gets.push((keys.service(&id), false));
                        namespaces.insert(r.namespace.clone());
                    }
                    Kind::EndpointSlice => gets.push((keys.slice(&id), false)),
                    Kind::Endpoints => {
                        namespaces.insert(r.namespace.clone());
                    }
                }
            }
            gets.extend(namespaces.iter().map(|ns| (keys.slices_in(ns), true)));
            let mut known = Known { values: self.get_many(gets).await?, ..Default::default() };
            if pending.iter().any(|r| r.kind == Kind::Service) {
                self.read_allocations(&mut known).await?;
            }
            let planned = changes::plan_delete(&pending, &mut known, &keys);
            let mut steps = Vec::new();
            let mut found = Vec::new();
            for (r, step) in pending.iter().zip(planned) {
                match step {
                    Some(s) => {
                        found.push(r.clone());
                        steps.push(s);
                    }
                    None => missing.push(r.clone()),
                }
            }
            let mut written = 0;
            let mut raced = false;
            for range in changes::batches(&steps, 0) {
                let batch = &steps[range.clone()];
                if !self.write(batch, None).await? {
                    raced = true;
                    break;
                }
                deleted.extend(batch.iter().map(|s| s.applied.clone()));
                written = range.end() + 1;
                lost = 0;
            }
            pending = found.split_off(written);
            if raced {
                lost += 1;
                if lost >= ATTEMPTS {
                    return Err(RegistryError::Contended(pending.first().map(ToString::to_string).unwrap_or_default()));
                }
            }
        }
        Ok((deleted, missing))
    }

    async fn delete_one(&self, kind: Kind, id: &NsName) -> Result<(), RegistryError> {
        let (_, missing) = self.delete(&[ObjectRef { kind, namespace: id.namespace.clone(), name: id.name.clone() }]).await?;
        match missing.first() {
            Some(r) => Err(RegistryError::NotFound(r.not_found())),
            None => Ok(()),
        }
    }

    /// Deletes a Service, releasing its ClusterIP and nodePorts, with its EndpointSlices.
    pub async fn delete_service(&self, id: &NsName) -> Result<(), RegistryError> {
        self.delete_one(Kind::Service, id).await
    }

    pub async fn delete_slice(&self, id: &NsName) -> Result<(), RegistryError> {
        self.delete_one(Kind::EndpointSlice, id).await
    }
}

fn expect(key: &str, e: &Expect) -> Compare {
    match e {
        Expect::Absent => Compare::version(key, CompareOp::Equal, 0),
        Expect::Value(v) => Compare::value(key, CompareOp::Equal, v.clone()),
    }
}

fn id_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> NsName {
    NsName::new(crate::snapshot::namespace_of(m), m.name.clone().unwrap_or_default())
}

fn now() -> Time {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap_or_default())
}

fn tls_options(opts: &RegistryOptions) -> Result<etcd_client::TlsOptions, RegistryError> {
    etcd_tls(opts.ca_file.as_deref(), opts.cert_file.as_deref(), opts.key_file.as_deref())
}

/// etcd client TLS from PEM files (`--etcd-cafile`, `--etcd-certfile`, `--etcd-keyfile`): one
/// implementation for every etcd client netd has (subnet leases and the service registry).
pub fn etcd_tls(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> Result<etcd_client::TlsOptions, RegistryError> {
    let read = |p: &Path| std::fs::read(p).map_err(|source| RegistryError::TlsFile { path: p.display().to_string(), source });
    let mut tls = etcd_client::TlsOptions::new();
    if let Some(ca) = ca {
        tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
    }
    match (cert, key) {
        (Some(c), Some(k)) => tls = tls.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?)),
        (None, None) => {}
        _ => return Err(RegistryError::Tls("--etcd-certfile and --etcd-keyfile go together".into())),
    }
    Ok(tls)
}
