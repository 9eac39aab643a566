//! What `netd apply` and `netd delete` write to etcd, planned from one read of the registry.
//! Pure (the etcd side is `store.rs`): allocation, "unchanged", and the cutting into
//! transactions are unit-tested here.
//!
//! Every object becomes one [`Step`]: the keys it writes or deletes, and for each key the value
//! it must still have when the step is written (absent for a new ClusterIP or nodePort claim,
//! the owner for a released one, the value read for the object itself). Steps are written in
//! transactions of at most [`MAX_TXN_OPS`] operations that fail as a whole if any of those
//! values changed meanwhile: two concurrent applies can never hand out one ClusterIP or
//! nodePort twice, nor overwrite each other's objects unseen.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use rand::Rng;

use super::config::ClusterConfig;
use super::manifest::{Kind, Object, ObjectRef, CONVERTER, MANAGED_BY_LABEL};
use super::store::RegistryError;
use crate::snapshot::{namespace_of, NsName, SERVICE_NAME_LABEL};

/// etcd's default `--max-txn-ops`: no transaction may hold more compares, nor more operations.
pub const MAX_TXN_OPS: usize = 128;
/// Bytes of keys and values per transaction: well under etcd's default `--max-request-bytes`
/// (1.5 MiB).
pub const MAX_TXN_BYTES: usize = 1 << 20;

/// The registry's etcd keys.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys { prefix: prefix.trim_end_matches('/').to_string() }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn service(&self, id: &NsName) -> String {
        format!("{}/services/{}/{}", self.prefix, id.namespace, id.name)
    }
    pub fn slice(&self, id: &NsName) -> String {
        format!("{}/endpointslices/{}/{}", self.prefix, id.namespace, id.name)
    }
    /// Prefix of every EndpointSlice of a namespace.
    pub fn slices_in(&self, namespace: &str) -> String {
        format!("{}/endpointslices/{namespace}/", self.prefix)
    }
    pub fn cluster_ips(&self) -> String {
        format!("{}/allocations/clusterips/", self.prefix)
    }
    pub fn node_ports(&self) -> String {
        format!("{}/allocations/nodeports/", self.prefix)
    }
    pub fn alloc(&self, a: Alloc) -> String {
        match a {
            Alloc::Ip(ip) => format!("{}{ip}", self.cluster_ips()),
            Alloc::Port(p) => format!("{}{p}", self.node_ports()),
        }
    }
    /// `<prefix>/config`: the cluster's service ranges ([`ClusterConfig`]).
    pub fn config(&self) -> String {
        format!("{}/config", self.prefix)
    }
}

/// A ClusterIP or a nodePort, held by one Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Alloc {
    Ip(Ipv4Addr),
    Port(u16),
}

/// What one read of the registry found: the allocations, and the stored values of the keys the
/// objects at hand map to. Planning updates it as it goes, so each object sees what the ones
/// before it in the same file will have written.
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// Allocation → owner (`namespace/name` of its Service).
    pub allocs: HashMap<Alloc, String>,
    /// Stored values of the object keys that were read; a key read and not found is absent.
    pub values: BTreeMap<String, Vec<u8>>,
}

impl Known {
    /// Adds the allocation keys of one prefix listing (`<prefix>/allocations/<kind>/<x>` →
    /// owner); keys that are neither an address nor a port are skipped.
    pub fn add_allocs(&mut self, keys: &Keys, listing: BTreeMap<String, String>) {
        for (k, owner) in listing {
            let a = if let Some(ip) = k.strip_prefix(&keys.cluster_ips()) {
                ip.parse().ok().map(Alloc::Ip)
            } else {
                k.strip_prefix(&keys.node_ports()).and_then(|p| p.parse().ok()).map(Alloc::Port)
            };
            match a {
                Some(a) => {
                    self.allocs.insert(a, owner);
                }
                None => tracing::warn!("ignoring malformed allocation key {k}"),
            }
        }
    }

    fn owned(&self) -> HashMap<String, BTreeSet<Alloc>> {
        let mut m: HashMap<String, BTreeSet<Alloc>> = HashMap::new();
        for (a, o) in &self.allocs {
            m.entry(o.clone()).or_default().insert(*a);
        }
        m
    }
}

/// What a key must hold for a step to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    Absent,
    Value(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(String, Vec<u8>),
    Delete(String),
}

/// kubectl's words for what happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Configured,
    Unchanged,
    Deleted,
}

/// What happened to one object (`service/web created`, `service "web" deleted`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub what: String,
    pub change: Change,
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let word = match self.change {
            Change::Created => "created",
            Change::Configured => "configured",
            Change::Unchanged => "unchanged",
            Change::Deleted => "deleted",
        };
        write!(f, "{} {word}", self.what)
    }
}

/// One object's writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub applied: Applied,
    pub compares: Vec<(String, Expect)>,
    pub ops: Vec<Op>,
}

impl Step {
    fn unchanged(what: String) -> Step {
        Step { applied: Applied { what, change: Change::Unchanged }, compares: Vec::new(), ops: Vec::new() }
    }

    fn keys(&self) -> impl Iterator<Item = &str> {
        self.compares.iter().map(|(k, _)| k.as_str()).chain(self.ops.iter().map(|o| match o {
            Op::Put(k, _) | Op::Delete(k) => k.as_str(),
        }))
    }

    fn bytes(&self) -> usize {
        let c: usize = self.compares.iter().map(|(k, e)| k.len() + if let Expect::Value(v) = e { v.len() } else { 0 }).sum();
        let o: usize = self.ops.iter().map(|o| match o {
            Op::Put(k, v) => k.len() + v.len(),
            Op::Delete(k) => k.len(),
        }).sum();
        c + o
    }
}

/// Time and uid for new objects (a parameter, so tests are deterministic).
pub struct Stamp<'a> {
    pub now: Time,
    pub uid: &'a mut (dyn FnMut() -> String + Send),
}

impl Stamp<'_> {
    /// A random uid, as the API server's.
    pub fn random_uid() -> String {
        format!("{:032x}", rand::thread_rng().gen::<u128>())
    }
}

/// Plans every object (one step each, in order), allocating from `config`. All objects are
/// validated first: any error, and nothing is to be written (every error is returned).
pub fn plan_apply(objects: &[Object], known: &mut Known, keys: &Keys, config: &ClusterConfig, stamp: &mut Stamp) -> Result<Vec<Step>, Vec<RegistryError>> {
    let mut owned = known.owned();
    let mut steps = Vec::new();
    let mut errors = Vec::new();
    for o in objects {
        let step = match o {
            Object::Service(s) => plan_service(s, known, &mut owned, keys, config, stamp),
            Object::EndpointSlice(s) => Ok(plan_slices(std::slice::from_ref(s), None, known, keys, &stamp.now, format!("endpointslice/{}", s.metadata.name.as_deref().unwrap_or("")))),
            Object::Endpoints { namespace, name, slices } => Ok(plan_slices(slices, Some(&NsName::new(namespace.clone(), name.clone())), known, keys, &stamp.now, format!("endpoints/{name}"))),
        };
        match step {
            Ok(s) => steps.push(s),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(steps)
    } else {
        Err(errors)
    }
}

fn invalid(object: &str, field: &str, message: String) -> RegistryError {
    RegistryError::Invalid { object: object.into(), field: field.into(), message }
}

fn same<T: serde::Serialize>(a: &T, b: &T) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

/// A Service: keeps its ClusterIP and nodePorts across updates (immutable, as in Kubernetes),
/// allocates the missing ones, and releases those it no longer uses.
fn plan_service(svc: &Service, known: &mut Known, owned: &mut HashMap<String, BTreeSet<Alloc>>, keys: &Keys, config: &ClusterConfig, stamp: &mut Stamp) -> Result<Step, RegistryError> {
    let id = NsName::new(namespace_of(&svc.metadata), svc.metadata.name.clone().unwrap_or_default());
    let owner = id.to_string();
    let key = keys.service(&id);
    let object = format!("service/{}", id.name);
    let old_raw = known.values.get(&key).cloned();
    let old: Option<Service> = old_raw.as_ref().and_then(|v| serde_json::from_slice(v).ok());
    let mut s = svc.clone();
    merge_immutable(&mut s, old.as_ref(), &object)?;
    let held = owned.get(&owner).cloned().unwrap_or_default();
    let taken = |a: Alloc| known.allocs.get(&a).is_some_and(|o| *o != owner);
    let mut claims: BTreeSet<Alloc> = BTreeSet::new();
    let spec = s.spec.as_mut().expect("validated");
    let typ = spec.type_.clone().unwrap_or_default();
    if typ != "ExternalName" {
        match spec.cluster_ip.clone().as_deref() {
            Some("None") => {}
            None | Some("") => {
                let ip = pick_ip(config, |ip| known.allocs.contains_key(&Alloc::Ip(ip)))
                    .ok_or_else(|| invalid(&object, "spec.clusterIP", format!("Internal error: no free address in {}", config.service_cluster_ip_range)))?;
                spec.cluster_ip = Some(ip.to_string());
                claims.insert(Alloc::Ip(ip));
            }
            Some(ip) => {
                let ip: Ipv4Addr = ip.parse().expect("validated");
                // An address this Service already holds stays valid (checked when it was taken).
                if !held.contains(&Alloc::Ip(ip)) && !config.usable_cluster_ip(ip) {
                    return Err(invalid(&object, "spec.clusterIP", config.ip_range_message(ip)));
                }
                if taken(Alloc::Ip(ip)) {
                    return Err(invalid(&object, "spec.clusterIP", format!("Invalid value: \"{ip}\": provided IP is already allocated")));
                }
                claims.insert(Alloc::Ip(ip));
            }
        }
        spec.cluster_ips = spec.cluster_ip.clone().filter(|c| c != "None").map(|c| vec![c]);
    }
    let wants_hc = typ == "LoadBalancer" && spec.external_traffic_policy.as_deref() == Some("Local");
    if !wants_hc {
        // Carried over from an earlier version that had one: not held any more.
        spec.health_check_node_port = None;
    }
    if typ == "NodePort" || typ == "LoadBalancer" {
        // Requested ports first, so an allocated one never collides with a later request.
        let check = |np: u16, field: &str| -> Result<(), RegistryError> {
            if !held.contains(&Alloc::Port(np)) && !config.service_node_port_range.contains(&np) {
                return Err(invalid(&object, field, config.port_range_message(np)));
            }
            if taken(Alloc::Port(np)) {
                return Err(invalid(&object, field, format!("Invalid value: {np}: provided port is already allocated")));
            }
            Ok(())
        };
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            if let Some(np) = p.node_port {
                let np = np as u16;
                check(np, &format!("spec.ports[{i}].nodePort"))?;
                if !claims.insert(Alloc::Port(np)) {
                    return Err(invalid(&object, &format!("spec.ports[{i}].nodePort"), format!("Duplicate value: {np}")));
                }
            }
        }
        if let Some(h) = spec.health_check_node_port {
            let h = h as u16;
            check(h, "spec.healthCheckNodePort")?;
            if !claims.insert(Alloc::Port(h)) {
                return Err(invalid(&object, "spec.healthCheckNodePort", format!("Duplicate value: {h}")));
            }
        }
        let free = |p: u16, claims: &BTreeSet<Alloc>| !taken(Alloc::Port(p)) && !claims.contains(&Alloc::Port(p));
        for (i, p) in spec.ports.iter_mut().flatten().enumerate() {
            if p.node_port.is_none() {
                let np = pick_port(&config.service_node_port_range, |n| !free(n, &claims))
                    .ok_or_else(|| invalid(&object, &format!("spec.ports[{i}].nodePort"), "Internal error: no free node port".into()))?;
                p.node_port = Some(i32::from(np));
                claims.insert(Alloc::Port(np));
            }
        }
        if wants_hc && spec.health_check_node_port.is_none() {
            let h = pick_port(&config.service_node_port_range, |n| !free(n, &claims))
                .ok_or_else(|| invalid(&object, "spec.healthCheckNodePort", "Internal error: no free node port".into()))?;
            spec.health_check_node_port = Some(i32::from(h));
            claims.insert(Alloc::Port(h));
        }
    }
    if let Some(o) = &old {
        if claims == held && same(&s, o) {
            return Ok(Step::unchanged(object));
        }
    }
    if s.metadata.creation_timestamp.is_none() {
        s.metadata.creation_timestamp = Some(stamp.now.clone());
    }
    if s.metadata.uid.is_none() {
        s.metadata.uid = Some((stamp.uid)());
    }
    let value = serde_json::to_vec(&s).expect("serialisable");
    let mut compares = vec![(key.clone(), old_raw.clone().map_or(Expect::Absent, Expect::Value))];
    let mut ops = Vec::new();
    for a in claims.difference(&held) {
        compares.push((keys.alloc(*a), Expect::Absent));
        ops.push(Op::Put(keys.alloc(*a), owner.clone().into_bytes()));
        known.allocs.insert(*a, owner.clone());
    }
    for a in held.difference(&claims) {
        compares.push((keys.alloc(*a), Expect::Value(owner.clone().into_bytes())));
        ops.push(Op::Delete(keys.alloc(*a)));
        known.allocs.remove(a);
    }
    ops.push(Op::Put(key.clone(), value.clone()));
    known.values.insert(key, value);
    owned.insert(owner, claims);
    let change = if old_raw.is_some() { Change::Configured } else { Change::Created };
    Ok(Step { applied: Applied { what: object, change }, compares, ops })
}

/// EndpointSlices: one, or those a v1 Endpoints became (`converted_from`: then slices converted
/// from an earlier version of it that it no longer has are deleted).
fn plan_slices(slices: &[EndpointSlice], converted_from: Option<&NsName>, known: &mut Known, keys: &Keys, now: &Time, what: String) -> Step {
    let mut compares = Vec::new();
    let mut ops = Vec::new();
    let mut created = true;
    for (i, sl) in slices.iter().enumerate() {
        let id = NsName::new(namespace_of(&sl.metadata), sl.metadata.name.clone().unwrap_or_default());
        let key = keys.slice(&id);
        let old_raw = known.values.get(&key).cloned();
        let old: Option<EndpointSlice> = old_raw.as_ref().and_then(|v| serde_json::from_slice(v).ok());
        if i == 0 {
            created = old_raw.is_none();
        }
        let mut s = sl.clone();
        s.metadata.creation_timestamp = old.as_ref().and_then(|o| o.metadata.creation_timestamp.clone()).or_else(|| Some(now.clone()));
        if old.as_ref().is_some_and(|o| same(&s, o)) {
            continue;
        }
        let value = serde_json::to_vec(&s).expect("serialisable");
        compares.push((key.clone(), old_raw.map_or(Expect::Absent, Expect::Value)));
        ops.push(Op::Put(key.clone(), value.clone()));
        known.values.insert(key, value);
    }
    if let Some(ep) = converted_from {
        let keep: BTreeSet<String> = slices.iter().map(|s| keys.slice(&NsName::new(ep.namespace.clone(), s.metadata.name.clone().unwrap_or_default()))).collect();
        for key in converted_slices(known, keys, ep) {
            if !keep.contains(&key) {
                let raw = known.values.remove(&key).expect("listed");
                compares.push((key.clone(), Expect::Value(raw)));
                ops.push(Op::Delete(key));
            }
        }
    }
    if ops.is_empty() {
        return Step::unchanged(what);
    }
    Step { applied: Applied { what, change: if created { Change::Created } else { Change::Configured } }, compares, ops }
}

/// Keys of the slices converted from v1 Endpoints `ep` (`<name>`, `<name>-1`, ...), among the
/// values read.
fn converted_slices(known: &Known, keys: &Keys, ep: &NsName) -> Vec<String> {
    let base = keys.slice(ep);
    known
        .values
        .range(base.clone()..)
        .take_while(|(k, _)| k.starts_with(&base))
        .filter(|(k, v)| {
            let rest = &k[base.len()..];
            (rest.is_empty() || rest.strip_prefix('-').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())))
                && serde_json::from_slice::<EndpointSlice>(v).ok().is_some_and(|s| {
                    let l = s.metadata.labels.unwrap_or_default();
                    l.get(MANAGED_BY_LABEL).map(String::as_str) == Some(CONVERTER) && l.get(SERVICE_NAME_LABEL) == Some(&ep.name)
                })
        })
        .map(|(k, _)| k.clone())
        .collect()
}

/// Plans deleting the named objects: a Service with its ClusterIP, its nodePorts and its
/// EndpointSlices (what ownerReferences do in Kubernetes: they go with it); an EndpointSlice;
/// v1 Endpoints as the slices converted from it.
/// `known` must hold the objects' keys and, for Services and Endpoints, every slice of their
/// namespace. One entry per ref: `None` for an object that is not there.
pub fn plan_delete(refs: &[ObjectRef], known: &mut Known, keys: &Keys) -> Vec<Option<Step>> {
    let owned = known.owned();
    let mut steps: Vec<Option<Step>> = vec![None; refs.len()];
    // Slices and Endpoints named in the file first, so a Service named before them leaves
    // them to their own step (`delete -f` of a Service and its Endpoints reports both).
    let order = (0..refs.len()).filter(|i| refs[*i].kind != Kind::Service).chain((0..refs.len()).filter(|i| refs[*i].kind == Kind::Service));
    for i in order {
        let r = &refs[i];
        let id = NsName::new(r.namespace.clone(), r.name.clone());
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        let mut gone = |key: String, known: &mut Known| {
            if let Some(raw) = known.values.remove(&key) {
                compares.push((key.clone(), Expect::Value(raw)));
                ops.push(Op::Delete(key));
            }
        };
        match r.kind {
            Kind::Service => {
                let key = keys.service(&id);
                if known.values.contains_key(&key) {
                    gone(key, known);
                    let prefix = keys.slices_in(&id.namespace);
                    let slices: Vec<String> = known
                        .values
                        .range(prefix.clone()..)
                        .take_while(|(k, _)| k.starts_with(&prefix))
                        .filter(|(_, v)| serde_json::from_slice::<EndpointSlice>(v).ok().is_some_and(|s| s.metadata.labels.unwrap_or_default().get(SERVICE_NAME_LABEL) == Some(&id.name)))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in slices {
                        gone(k, known);
                    }
                    for a in owned.get(&id.to_string()).into_iter().flatten() {
                        if known.allocs.remove(a).is_some() {
                            compares.push((keys.alloc(*a), Expect::Value(id.to_string().into_bytes())));
                            ops.push(Op::Delete(keys.alloc(*a)));
                        }
                    }
                }
            }
            Kind::EndpointSlice => gone(keys.slice(&id), known),
            Kind::Endpoints => {
                for k in converted_slices(known, keys, &id) {
                    gone(k, known);
                }
            }
        }
        steps[i] = (!ops.is_empty()).then(|| Step { applied: Applied { what: r.quoted(), change: Change::Deleted }, compares, ops });
    }
    steps
}

/// Cuts steps into transactions: consecutive steps, each transaction within [`MAX_TXN_OPS`]
/// compares and operations (less `reserve` of each, for the config check every transaction
/// carries) and [`MAX_TXN_BYTES`], and no key twice (etcd refuses a transaction that writes a
/// key twice, and a step that rewrites what an earlier step of the same transaction wrote
/// would compare against the value before both). Returns the index ranges; a step too large
/// for any transaction gets one of its own (and etcd's error). Steps with nothing to write
/// join whichever transaction is open.
pub fn batches(steps: &[Step], reserve: usize) -> Vec<RangeInclusive<usize>> {
    let limit = MAX_TXN_OPS.saturating_sub(reserve).max(1);
    let mut out = Vec::new();
    let mut start = 0;
    let (mut ops, mut cmps, mut bytes) = (0, 0, 0);
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for (i, s) in steps.iter().enumerate() {
        let clash = s.keys().any(|k| seen.contains(k));
        let full = ops + s.ops.len() > limit || cmps + s.compares.len() > limit || bytes + s.bytes() > MAX_TXN_BYTES;
        if i > start && ops > 0 && (clash || full) {
            out.push(start..=i - 1);
            start = i;
            (ops, cmps, bytes) = (0, 0, 0);
            seen.clear();
        }
        ops += s.ops.len();
        cmps += s.compares.len();
        bytes += s.bytes();
        seen.extend(s.keys());
    }
    if start < steps.len() {
        out.push(start..=steps.len() - 1);
    }
    out
}

/// Carries the fields an update may not change (or may omit) over from the stored object.
fn merge_immutable(new: &mut Service, old: Option<&Service>, object: &str) -> Result<(), RegistryError> {
    let Some(old) = old else { return Ok(()) };
    new.metadata.creation_timestamp = old.metadata.creation_timestamp.clone();
    new.metadata.uid = old.metadata.uid.clone();
    let (Some(ns), Some(os)) = (new.spec.as_mut(), old.spec.as_ref()) else { return Ok(()) };
    let old_ip = os.cluster_ip.clone().unwrap_or_default();
    match ns.cluster_ip.as_deref() {
        None | Some("") => {
            ns.cluster_ip = os.cluster_ip.clone();
            ns.cluster_ips = os.cluster_ips.clone();
        }
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

/// A random free ClusterIP of the config's range (its network and broadcast addresses are
/// never handed out).
pub fn pick_ip(config: &ClusterConfig, taken: impl Fn(Ipv4Addr) -> bool) -> Option<Ipv4Addr> {
    let cidr = &config.service_cluster_ip_range;
    let first = u32::from(cidr.network()).checked_add(1)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::config::AllocOptions;
    use crate::registry::manifest::apply_manifests;

    fn keys() -> Keys {
        Keys::new("/r")
    }

    fn services(n: usize, extra: &str) -> Vec<Object> {
        let text: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"apiVersion": "v1", "kind": "Service", "metadata": {{"name": "s{i}"}}, "spec": {{"ports": [{{"port": 80}}]{extra}}}}}"#))
            .collect();
        apply_manifests(&text.join("\n---\n")).unwrap()
    }

    fn config(cidr: &str, ports: RangeInclusive<u16>) -> ClusterConfig {
        AllocOptions::ranges(cidr.parse().unwrap(), ports).over(&ClusterConfig::default())
    }

    fn plan(objects: &[Object], known: &mut Known, config: &ClusterConfig) -> Result<Vec<Step>, String> {
        let mut n = 0;
        let mut uid = || {
            n += 1;
            format!("uid-{n}")
        };
        let mut stamp = Stamp { now: Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap()), uid: &mut uid };
        plan_apply(objects, known, &keys(), config, &mut stamp).map_err(|e| e.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))
    }

    #[test]
    fn allocates_from_the_range_without_network_and_broadcast() {
        // A /29 has 6 usable addresses: .1 to .6.
        let config = config("10.96.0.0/29", 30000..=30010);
        let mut known = Known::default();
        let steps = plan(&services(6, ""), &mut known, &config).unwrap();
        let ips: BTreeSet<Alloc> = known.allocs.keys().copied().collect();
        assert_eq!(ips, (1..=6).map(|i| Alloc::Ip(Ipv4Addr::new(10, 96, 0, i))).collect());
        assert!(steps.iter().all(|s| s.applied.change == Change::Created && s.compares.iter().any(|(k, e)| k.starts_with("/r/allocations/clusterips/") && *e == Expect::Absent)));
        // A seventh finds the range full; one asking for the network or broadcast address is refused.
        let err = plan(&services(7, ""), &mut Known::default(), &config).unwrap_err();
        assert!(err.contains("service/s6: spec.clusterIP: Internal error: no free address in 10.96.0.0/29"), "{err}");
        for ip in ["10.96.0.0", "10.96.0.7"] {
            let err = plan(&services(1, &format!(r#", "clusterIP": "{ip}""#)), &mut Known::default(), &config).unwrap_err();
            assert_eq!(err, format!("service/s0: spec.clusterIP: Invalid value: \"{ip}\": provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/29"));
        }
    }

    #[test]
    fn every_object_is_validated_before_anything_is_written() {
        let config = config("10.96.0.0/24", 30000..=30010);
        let mut known = Known::default();
        known.allocs.insert(Alloc::Ip(Ipv4Addr::new(10, 96, 0, 9)), "other/x".into());
        let mut objects = services(3, "");
        objects.extend(services(1, r#", "clusterIP": "10.96.0.9""#).into_iter().map(|o| match o {
            Object::Service(mut s) => {
                s.metadata.name = Some("taken".into());
                Object::Service(s)
            }
            o => o,
        }));
        objects.extend(apply_manifests(r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "np"}, "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 31000}]}}"#).unwrap());
        let err = plan(&objects, &mut known, &config).unwrap_err();
        assert_eq!(
            err,
            "service/taken: spec.clusterIP: Invalid value: \"10.96.0.9\": provided IP is already allocated\n\
             service/np: spec.ports[0].nodePort: Invalid value: 31000: provided port is not in the valid range. The range of valid ports is 30000-30010"
        );
    }

    #[test]
    fn reapplying_the_same_objects_changes_nothing() {
        let config = ClusterConfig::default();
        let mut known = Known::default();
        let mut objects = services(2, r#", "type": "LoadBalancer", "externalTrafficPolicy": "Local""#);
        objects.extend(
            apply_manifests(
                r#"{"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "s0"}, "subsets": [{"addresses": [{"ip": "10.244.1.1"}], "ports": [{"port": 80}]}, {"addresses": [{"ip": "10.244.1.2"}], "ports": [{"port": 81}]}]}
---
{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "s1-x", "labels": {"kubernetes.io/service-name": "s1"}}, "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.2.1"]}]}"#,
            )
            .unwrap(),
        );
        let first = plan(&objects, &mut known, &config).unwrap();
        assert!(first.iter().all(|s| s.applied.change == Change::Created), "{first:?}");
        // Each LoadBalancer with policy Local holds a ClusterIP, a nodePort and a health check port.
        assert_eq!(known.allocs.len(), 6);
        let again = plan(&objects, &mut known, &config).unwrap();
        let shown: Vec<String> = again.iter().map(|s| s.applied.to_string()).collect();
        assert_eq!(shown, ["service/s0 unchanged", "service/s1 unchanged", "endpoints/s0 unchanged", "endpointslice/s1-x unchanged"]);
        assert!(again.iter().all(|s| s.ops.is_empty() && s.compares.is_empty()));
        // v1 Endpoints with one subset fewer: its second slice goes.
        let fewer = apply_manifests(r#"{"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "s0"}, "subsets": [{"addresses": [{"ip": "10.244.1.1"}], "ports": [{"port": 80}]}]}"#).unwrap();
        let step = plan(&fewer, &mut known, &config).unwrap().remove(0);
        assert_eq!(step.applied.to_string(), "endpoints/s0 configured");
        assert_eq!(step.ops, vec![Op::Delete("/r/endpointslices/default/s0-1".into())]);
    }

    #[test]
    fn a_changed_service_keeps_its_allocations_and_releases_what_it_no_longer_uses() {
        let config = ClusterConfig::default();
        let mut known = Known::default();
        plan(&services(1, r#", "type": "NodePort""#), &mut known, &config).unwrap();
        let held: BTreeSet<Alloc> = known.allocs.keys().copied().collect();
        let port = held.iter().find(|a| matches!(a, Alloc::Port(_))).copied().unwrap();
        let step = plan(&services(1, r#", "type": "ClusterIP""#), &mut known, &config).unwrap().remove(0);
        assert_eq!(step.applied.change, Change::Configured);
        assert!(step.compares.contains(&(keys().alloc(port), Expect::Value(b"default/s0".to_vec()))), "{step:?}");
        assert!(step.ops.contains(&Op::Delete(keys().alloc(port))));
        assert_eq!(known.allocs.len(), 1, "the ClusterIP stays");
        assert!(held.contains(known.allocs.keys().next().unwrap()));
        // A LoadBalancer going from policy Local to Cluster gives its health check port back.
        plan(&services(1, r#", "type": "LoadBalancer", "externalTrafficPolicy": "Local""#), &mut known, &config).unwrap();
        assert_eq!(known.allocs.len(), 3);
        plan(&services(1, r#", "type": "LoadBalancer", "externalTrafficPolicy": "Cluster""#), &mut known, &config).unwrap();
        assert_eq!(known.allocs.len(), 2, "ClusterIP and nodePort");
        let stored: Service = serde_json::from_slice(&known.values["/r/services/default/s0"]).unwrap();
        assert_eq!(stored.spec.unwrap().health_check_node_port, None);
    }

    #[test]
    fn transactions_stay_within_etcds_limits() {
        let config = ClusterConfig::default();
        let mut known = Known::default();
        let mut objects = services(300, "");
        // The same Service twice: the second write of its key must go to a later transaction.
        objects.insert(10, services(1, r#", "sessionAffinity": "ClientIP""#).remove(0));
        let steps = plan(&objects, &mut known, &config).unwrap();
        let batches = batches(&steps, 1);
        let mut next = 0;
        for b in &batches {
            assert_eq!(*b.start(), next);
            next = b.end() + 1;
            let ops: usize = steps[b.clone()].iter().map(|s| s.ops.len()).sum();
            let cmps: usize = steps[b.clone()].iter().map(|s| s.compares.len()).sum();
            assert!(ops < MAX_TXN_OPS && cmps < MAX_TXN_OPS, "{ops} {cmps}");
            let keys: Vec<&str> = steps[b.clone()].iter().flat_map(|s| s.ops.iter()).map(|o| match o {
                Op::Put(k, _) | Op::Delete(k) => k.as_str(),
            }).collect();
            assert_eq!(keys.iter().collect::<BTreeSet<_>>().len(), keys.len(), "a key twice in one transaction");
        }
        assert_eq!(next, steps.len());
        // 301 services of 2 operations (the Service, its ClusterIP), 63 per transaction, and
        // the cut before the second s0.
        assert_eq!(batches.len(), 6);
        assert_eq!(*batches[0].end(), 9);
    }

    #[test]
    fn deleting_a_service_takes_its_allocations_and_slices() {
        let config = ClusterConfig::default();
        let mut known = Known::default();
        let mut objects = services(2, r#", "type": "NodePort""#);
        objects.extend(
            apply_manifests(
                r#"{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "s0-a", "labels": {"kubernetes.io/service-name": "s0"}}, "addressType": "IPv4", "endpoints": []}
---
{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "s1-a", "labels": {"kubernetes.io/service-name": "s1"}}, "addressType": "IPv4", "endpoints": []}"#,
            )
            .unwrap(),
        );
        plan(&objects, &mut known, &config).unwrap();
        let r = |kind, name: &str| ObjectRef { kind, namespace: "default".into(), name: name.into() };
        let steps = plan_delete(&[r(Kind::Service, "s0"), r(Kind::Service, "nope"), r(Kind::Endpoints, "s1")], &mut known, &keys());
        let s0 = steps[0].as_ref().unwrap();
        assert_eq!(s0.applied.to_string(), "service \"s0\" deleted");
        let deleted: BTreeSet<&str> = s0.ops.iter().map(|o| match o {
            Op::Delete(k) => k.as_str(),
            Op::Put(..) => panic!(),
        }).collect();
        assert!(deleted.contains("/r/services/default/s0") && deleted.contains("/r/endpointslices/default/s0-a"), "{deleted:?}");
        assert_eq!(deleted.iter().filter(|k| k.starts_with("/r/allocations/")).count(), 2, "ClusterIP and nodePort");
        assert!(steps[1].is_none() && steps[2].is_none(), "no such Service; s1's slice is not converted from v1 Endpoints");
        assert_eq!(known.allocs.values().filter(|o| *o == "default/s1").count(), 2, "s1 keeps its allocations");
        // A Service and the v1 Endpoints of the same name (one file): each is deleted by its own step.
        plan(&apply_manifests(r#"{"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "s1"}, "subsets": [{"addresses": [{"ip": "10.244.1.1"}]}]}"#).unwrap(), &mut known, &config).unwrap();
        let steps = plan_delete(&[r(Kind::Service, "s1"), r(Kind::Endpoints, "s1")], &mut known, &keys());
        let ops = |i: usize| steps[i].as_ref().map(|s| s.ops.len());
        assert_eq!((ops(0), ops(1)), (Some(4), Some(1)), "service, its slice s1-a, ClusterIP, nodePort; the converted slice s1");
    }
}
