//! The etcd side of the service registry: `<prefix>/services/<ns>/<name>` (v1 Service JSON),
//! `<prefix>/endpointslices/<ns>/<name>` (discovery.k8s.io/v1 EndpointSlice JSON), and the
//! allocation keys `<prefix>/allocations/clusterips/<ip>` and `<prefix>/allocations/nodeports/<port>`
//! (value: `ns/name` of the owner). A Service and its allocations are written in one
//! transaction that fails if any of the claimed keys appeared meanwhile, so two concurrent
//! `netd apply` can never hand out the same ClusterIP or nodePort.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, Txn, TxnOp, WatchOptions};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use rand::Rng;
use tokio::sync::watch;
use tracing::{info, warn};

use super::manifest::{Object, CONVERTER, MANAGED_BY_LABEL};
use crate::etcd::{error_text, list_prefix, watch_client};
use crate::snapshot::{namespace_of, NsName, ServiceSnapshot, SERVICE_NAME_LABEL};

pub const DEFAULT_PREFIX: &str = "/netd/registry";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Transaction attempts before giving up on a contended allocation.
const ATTEMPTS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("etcd {op}: {}", error_text(.source))]
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

/// Ranges allocations come from.
#[derive(Debug, Clone)]
pub struct AllocOptions {
    pub service_cidr: Ipv4Net,
    pub node_ports: RangeInclusive<u16>,
}

impl Default for AllocOptions {
    fn default() -> Self {
        AllocOptions { service_cidr: "10.96.0.0/12".parse().expect("valid"), node_ports: 30000..=32767 }
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

#[derive(Clone)]
pub struct ServiceRegistry {
    client: Client,
    prefix: String,
}

/// What `apply` did with one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub what: String,
    pub created: bool,
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.what, if self.created { "created" } else { "configured" })
    }
}

impl ServiceRegistry {
    pub async fn connect(opts: &RegistryOptions) -> Result<Self, RegistryError> {
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
        let client = Client::connect(&opts.endpoints, Some(co)).await.map_err(etcd(format!("connect to {}", opts.endpoints.join(","))))?;
        Ok(ServiceRegistry { client, prefix: opts.prefix.trim_end_matches('/').to_string() })
    }

    pub fn service_key(&self, k: &NsName) -> String {
        format!("{}/services/{}/{}", self.prefix, k.namespace, k.name)
    }
    pub fn slice_key(&self, k: &NsName) -> String {
        format!("{}/endpointslices/{}/{}", self.prefix, k.namespace, k.name)
    }
    fn ip_key(&self, ip: Ipv4Addr) -> String {
        format!("{}/allocations/clusterips/{ip}", self.prefix)
    }
    fn port_key(&self, port: u16) -> String {
        format!("{}/allocations/nodeports/{port}", self.prefix)
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

    /// Stores validated objects (from [`super::apply_manifests`]), allocating what is missing.
    pub async fn apply(&self, objects: Vec<Object>, alloc: &AllocOptions) -> Result<Vec<Applied>, RegistryError> {
        let mut out = Vec::new();
        for o in objects {
            match o {
                Object::Service(s) => out.push(self.apply_service(s, alloc).await?),
                Object::EndpointSlice(s) => out.push(self.put_slice(&s).await?),
                Object::Endpoints { namespace, name, slices } => {
                    let keep: BTreeSet<String> = slices.iter().filter_map(|s| s.metadata.name.clone()).collect();
                    let mut created = false;
                    for s in &slices {
                        created |= self.put_slice(s).await?.created;
                    }
                    // Slices converted from an earlier version of this Endpoints that has fewer subsets now.
                    let prefix = format!("{}/endpointslices/{namespace}/{name}-", self.prefix);
                    for (key, value) in self.keys_under(&prefix).await? {
                        let slice_name = key.rsplit('/').next().unwrap_or_default().to_string();
                        let converted = serde_json::from_str::<EndpointSlice>(&value).ok().is_some_and(|s| {
                            let l = s.metadata.labels.unwrap_or_default();
                            l.get(MANAGED_BY_LABEL).map(String::as_str) == Some(CONVERTER) && l.get(SERVICE_NAME_LABEL) == Some(&name)
                        });
                        if converted && !keep.contains(&slice_name) {
                            self.client.kv_client().delete(key.clone(), None).await.map_err(etcd(format!("del {key}")))?;
                        }
                    }
                    out.push(Applied { what: format!("endpoints/{name}"), created });
                }
            }
        }
        Ok(out)
    }

    async fn put_slice(&self, s: &EndpointSlice) -> Result<Applied, RegistryError> {
        let id = NsName::new(namespace_of(&s.metadata), s.metadata.name.clone().unwrap_or_default());
        let key = self.slice_key(&id);
        let mut s = s.clone();
        let existing = self.get_raw(&key).await?;
        s.metadata.creation_timestamp = existing
            .as_ref()
            .and_then(|(v, _)| serde_json::from_slice::<EndpointSlice>(v).ok())
            .and_then(|o| o.metadata.creation_timestamp)
            .or_else(|| Some(now()));
        let value = serde_json::to_string(&s).expect("serialisable");
        self.client.kv_client().put(key.clone(), value, None).await.map_err(etcd(format!("put {key}")))?;
        Ok(Applied { what: format!("endpointslice/{}", id.name), created: existing.is_none() })
    }

    /// Creates or updates a Service: keeps its ClusterIP and nodePorts across updates
    /// (immutable, as in Kubernetes), allocates missing ones, and writes the Service with
    /// its allocation keys in one compare-and-swap transaction, retried on contention.
    async fn apply_service(&self, svc: Service, alloc: &AllocOptions) -> Result<Applied, RegistryError> {
        let id = NsName::new(namespace_of(&svc.metadata), svc.metadata.name.clone().unwrap_or_default());
        let owner = id.to_string();
        let key = self.service_key(&id);
        let object = format!("service/{}", id.name);
        for _ in 0..ATTEMPTS {
            let existing = self.get_raw(&key).await?;
            let old: Option<Service> = existing.as_ref().and_then(|(v, _)| serde_json::from_slice(v).ok());
            let mut s = svc.clone();
            merge_immutable(&mut s, old.as_ref(), &object)?;
            let ips = self.keys_under(&format!("{}/allocations/clusterips/", self.prefix)).await?;
            let ports = self.keys_under(&format!("{}/allocations/nodeports/", self.prefix)).await?;
            let mine = |v: Option<&String>| v.is_none_or(|o| *o == owner);
            let mut claims: Vec<String> = Vec::new();
            let spec = s.spec.as_mut().expect("validated");
            // ClusterIP.
            let typ = spec.type_.clone().unwrap_or_default();
            if typ != "ExternalName" {
                match spec.cluster_ip.clone().as_deref() {
                    Some("None") => {}
                    None | Some("") => {
                        let ip = pick_ip(&alloc.service_cidr, |ip| ips.contains_key(&self.ip_key(ip)))
                            .ok_or_else(|| invalid(&object, "spec.clusterIP", format!("Internal error: no free address in {}", alloc.service_cidr)))?;
                        spec.cluster_ip = Some(ip.to_string());
                        claims.push(self.ip_key(ip));
                    }
                    Some(ip) => {
                        let ip: Ipv4Addr = ip.parse().expect("validated");
                        if !alloc.service_cidr.contains(&ip) {
                            return Err(invalid(&object, "spec.clusterIP", format!("Invalid value: \"{ip}\": provided IP is not in the valid range. The range of valid IPs is {}", alloc.service_cidr)));
                        }
                        if !mine(ips.get(&self.ip_key(ip))) {
                            return Err(invalid(&object, "spec.clusterIP", format!("Invalid value: \"{ip}\": provided IP is already allocated")));
                        }
                        claims.push(self.ip_key(ip));
                    }
                }
                spec.cluster_ips = spec.cluster_ip.clone().filter(|c| c != "None").map(|c| vec![c]);
            }
            // nodePorts and the health check port.
            let wants_ports = typ == "NodePort" || typ == "LoadBalancer";
            let mut taken: BTreeSet<u16> = ports.keys().filter_map(|k| k.rsplit('/').next()?.parse().ok()).filter(|p| !mine(ports.get(&self.port_key(*p)))).collect();
            let mut used_here = BTreeSet::new();
            if wants_ports {
                for (i, p) in spec.ports.iter_mut().flatten().enumerate() {
                    match p.node_port {
                        Some(np) => {
                            let np = np as u16;
                            if !alloc.node_ports.contains(&np) {
                                return Err(invalid(&object, &format!("spec.ports[{i}].nodePort"), format!("Invalid value: {np}: provided port is not in the valid range. The range of valid ports is {}-{}", alloc.node_ports.start(), alloc.node_ports.end())));
                            }
                            if taken.contains(&np) {
                                return Err(invalid(&object, &format!("spec.ports[{i}].nodePort"), format!("Invalid value: {np}: provided port is already allocated")));
                            }
                            used_here.insert(np);
                        }
                        None => {
                            let np = pick_port(&alloc.node_ports, |p| taken.contains(&p) || used_here.contains(&p))
                                .ok_or_else(|| invalid(&object, &format!("spec.ports[{i}].nodePort"), "Internal error: no free node port".into()))?;
                            p.node_port = Some(i32::from(np));
                            used_here.insert(np);
                        }
                    }
                }
                taken.extend(used_here.iter().copied());
                if typ == "LoadBalancer" && spec.external_traffic_policy.as_deref() == Some("Local") {
                    let hc = match spec.health_check_node_port {
                        Some(h) => h as u16,
                        None => pick_port(&alloc.node_ports, |p| taken.contains(&p)).ok_or_else(|| invalid(&object, "spec.healthCheckNodePort", "Internal error: no free node port".into()))?,
                    };
                    spec.health_check_node_port = Some(i32::from(hc));
                    used_here.insert(hc);
                }
            }
            claims.extend(used_here.iter().map(|p| self.port_key(*p)));
            // Allocations this service held and no longer uses.
            let old_claims: BTreeSet<String> = ips.iter().chain(ports.iter()).filter(|(_, v)| **v == owner).map(|(k, _)| k.clone()).collect();
            let claims: BTreeSet<String> = claims.into_iter().collect();
            let mut cmp = vec![match &existing {
                Some((_, rev)) => Compare::mod_revision(key.clone(), CompareOp::Equal, *rev),
                None => Compare::version(key.clone(), CompareOp::Equal, 0),
            }];
            let mut ops = Vec::new();
            for c in &claims {
                if !old_claims.contains(c) {
                    cmp.push(Compare::version(c.clone(), CompareOp::Equal, 0));
                    ops.push(TxnOp::put(c.clone(), owner.clone(), None));
                }
            }
            for c in old_claims.difference(&claims) {
                cmp.push(Compare::value(c.clone(), CompareOp::Equal, owner.clone()));
                ops.push(TxnOp::delete(c.clone(), None));
            }
            if s.metadata.creation_timestamp.is_none() {
                s.metadata.creation_timestamp = Some(now());
            }
            if s.metadata.uid.is_none() {
                s.metadata.uid = Some(format!("{:032x}", rand::thread_rng().gen::<u128>()));
            }
            ops.push(TxnOp::put(key.clone(), serde_json::to_string(&s).expect("serialisable"), None));
            let r = self.client.kv_client().txn(Txn::new().when(cmp).and_then(ops)).await.map_err(etcd(format!("txn apply {key}")))?;
            if r.succeeded() {
                return Ok(Applied { what: object, created: existing.is_none() });
            }
        }
        Err(RegistryError::Contended(object))
    }

    pub async fn get_service(&self, id: &NsName) -> Result<Option<Service>, RegistryError> {
        let key = self.service_key(id);
        match self.get_raw(&key).await? {
            None => Ok(None),
            Some((v, _)) => serde_json::from_slice(&v).map(Some).map_err(|e| RegistryError::Malformed { key, message: e.to_string() }),
        }
    }

    /// Deletes a Service and releases its ClusterIP and nodePorts, in one transaction.
    pub async fn delete_service(&self, id: &NsName) -> Result<(), RegistryError> {
        let key = self.service_key(id);
        let owner = id.to_string();
        for _ in 0..ATTEMPTS {
            let Some((_, rev)) = self.get_raw(&key).await? else { return Err(RegistryError::NotFound(format!("service \"{}\" in namespace \"{}\"", id.name, id.namespace))) };
            let mut cmp = vec![Compare::mod_revision(key.clone(), CompareOp::Equal, rev)];
            let mut ops = vec![TxnOp::delete(key.clone(), None)];
            for dir in ["clusterips", "nodeports"] {
                for (k, v) in self.keys_under(&format!("{}/allocations/{dir}/", self.prefix)).await? {
                    if v == owner {
                        cmp.push(Compare::value(k.clone(), CompareOp::Equal, owner.clone()));
                        ops.push(TxnOp::delete(k, None));
                    }
                }
            }
            let r = self.client.kv_client().txn(Txn::new().when(cmp).and_then(ops)).await.map_err(etcd(format!("txn delete {key}")))?;
            if r.succeeded() {
                return Ok(());
            }
        }
        Err(RegistryError::Contended(format!("service/{}", id.name)))
    }

    pub async fn delete_slice(&self, id: &NsName) -> Result<(), RegistryError> {
        let key = self.slice_key(id);
        let r = self.client.kv_client().delete(key.clone(), None).await.map_err(etcd(format!("del {key}")))?;
        if r.deleted() == 0 {
            return Err(RegistryError::NotFound(format!("endpointslice \"{}\" in namespace \"{}\"", id.name, id.namespace)));
        }
        Ok(())
    }
}

fn invalid(object: &str, field: &str, message: String) -> RegistryError {
    RegistryError::Invalid { object: object.into(), field: field.into(), message }
}

fn now() -> Time {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap_or_default())
}

/// Carries the fields an update may not change (or may omit) over from the stored object.
fn merge_immutable(new: &mut Service, old: Option<&Service>, object: &str) -> Result<(), RegistryError> {
    let Some(old) = old else { return Ok(()) };
    new.metadata.creation_timestamp = old.metadata.creation_timestamp.clone();
    new.metadata.uid = old.metadata.uid.clone();
    let (Some(ns), Some(os)) = (new.spec.as_mut(), old.spec.as_ref()) else { return Ok(()) };
    let old_ip = os.cluster_ip.clone().unwrap_or_default();
    match ns.cluster_ip.as_deref() {
        None | Some("") => ns.cluster_ip = os.cluster_ip.clone(),
        Some(ip) if !old_ip.is_empty() && ip != old_ip => {
            return Err(invalid(object, "spec.clusterIP", format!("Invalid value: \"{ip}\": field is immutable")));
        }
        _ => {}
    }
    let same_kind = ns.type_ == os.type_ || (ns.type_.as_deref() != Some("ClusterIP") && os.type_.as_deref() != Some("ClusterIP"));
    if same_kind {
        for p in ns.ports.iter_mut().flatten().filter(|p| p.node_port.is_none()) {
            if let Some(o) = os.ports.iter().flatten().find(|o| o.port == p.port && o.protocol == p.protocol) {
                p.node_port = o.node_port;
            }
        }
        if ns.health_check_node_port.is_none() && ns.external_traffic_policy == os.external_traffic_policy {
            ns.health_check_node_port = os.health_check_node_port;
        }
    }
    Ok(())
}

/// A random free address of the CIDR (network and broadcast addresses excluded).
pub fn pick_ip(cidr: &Ipv4Net, taken: impl Fn(Ipv4Addr) -> bool) -> Option<Ipv4Addr> {
    let first = u32::from(cidr.network()) + 1;
    let last = u32::from(cidr.broadcast()).checked_sub(1)?;
    if last < first {
        return None;
    }
    let mut rng = rand::thread_rng();
    for _ in 0..64 {
        let ip = Ipv4Addr::from(rng.gen_range(first..=last));
        if !taken(ip) {
            return Some(ip);
        }
    }
    (first..=last).map(Ipv4Addr::from).find(|ip| !taken(*ip))
}

/// A random free port of the range.
pub fn pick_port(range: &RangeInclusive<u16>, taken: impl Fn(u16) -> bool) -> Option<u16> {
    let mut rng = rand::thread_rng();
    for _ in 0..64 {
        let p = rng.gen_range(range.clone());
        if !taken(p) {
            return Some(p);
        }
    }
    range.clone().find(|p| !taken(*p))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_free_addresses_and_ports() {
        let cidr: Ipv4Net = "10.96.0.0/30".parse().unwrap();
        assert_eq!(pick_ip(&cidr, |ip| ip == Ipv4Addr::new(10, 96, 0, 1)), Some(Ipv4Addr::new(10, 96, 0, 2)));
        assert_eq!(pick_ip(&cidr, |_| true), None);
        assert_eq!(pick_port(&(30000..=30001), |p| p == 30000), Some(30001));
        assert_eq!(pick_port(&(30000..=30000), |_| true), None);
    }
}
