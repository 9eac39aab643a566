//! [`ServiceSnapshot`]: the registry contents at one revision, immutable once published.
//!
//! Objects are held behind `Arc`s and a new snapshot shares every unchanged object with the
//! previous one, so the planner can tell "unchanged" by pointer in constant time.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `namespace/name` of an object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NsName {
    pub namespace: String,
    pub name: String,
}

impl NsName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        NsName { namespace: namespace.into(), name: name.into() }
    }
}

impl std::fmt::Display for NsName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Services and EndpointSlices at one registry revision. EndpointSlices are grouped by the
/// Service they belong to (label `kubernetes.io/service-name`).
///
/// The maps are persistent (`imbl`): publishing a snapshot after one change is an O(1) clone
/// that shares everything else with the previous one. The snapshot also keeps a log of which
/// services were touched (their Service or one of their slices put or removed), so a consumer
/// holding a [`SnapshotMark`] can ask what changed since ([`ServiceSnapshot::changed_since`])
/// instead of comparing every service.
#[derive(Debug, Clone)]
pub struct ServiceSnapshot {
    pub revision: i64,
    /// The cluster's service ranges (`<registry prefix>/config`, set by `netd config set` or the
    /// first `netd apply`); `None` when not set, malformed, or the source has none (the
    /// Kubernetes API server does not publish its ranges).
    pub cluster_config: Option<crate::registry::ClusterConfig>,
    /// Private, like everything below: changes go through `put_*`/`remove_*`, which keep the
    /// change log right.
    services: imbl::OrdMap<NsName, Arc<Service>>,
    /// Service → slice name → slice.
    slices: imbl::OrdMap<NsName, SliceGroup>,
    /// Slice → the service it was filed under (to move it when its label changes).
    slice_owner: imbl::OrdMap<NsName, NsName>,
    /// Identifies this snapshot's line of descent (clones share it; `new()` starts another).
    lineage: u64,
    /// Number of touches so far.
    seq: u64,
    /// The seq of the newest state of this lineage, shared by all its clones: a snapshot that
    /// is touched while not the newest (a clone of an older state, changed on the side) would
    /// fork the history, so it starts a lineage of its own instead.
    head: Arc<std::sync::atomic::AtomicU64>,
    /// Service → seq of its last touch; and the reverse, seq → service.
    touched: imbl::OrdMap<NsName, u64>,
    log: imbl::OrdMap<u64, NsName>,
    /// Touches at or below this seq were dropped from the log (it is bounded).
    log_floor: u64,
}

/// The slices of one service, by name. Small (usually one slice), so a plain map copied on
/// write: a persistent map per service would cost kilobytes each.
pub type SliceGroup = Arc<std::collections::BTreeMap<String, Arc<EndpointSlice>>>;

/// A point in a snapshot's history (see [`ServiceSnapshot::changed_since`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotMark {
    lineage: u64,
    seq: u64,
}

impl Default for ServiceSnapshot {
    fn default() -> Self {
        ServiceSnapshot {
            revision: 0,
            cluster_config: None,
            services: Default::default(),
            slices: Default::default(),
            slice_owner: Default::default(),
            lineage: next_lineage(),
            seq: 0,
            head: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            touched: Default::default(),
            log: Default::default(),
            log_floor: 0,
        }
    }
}

fn next_lineage() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl ServiceSnapshot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every Service, by namespace/name.
    pub fn services(&self) -> &imbl::OrdMap<NsName, Arc<Service>> {
        &self.services
    }

    /// Every EndpointSlice, grouped by the Service it is filed under (then by slice name).
    pub fn slice_groups(&self) -> &imbl::OrdMap<NsName, SliceGroup> {
        &self.slices
    }

    /// Where this snapshot is in its history.
    pub fn mark(&self) -> SnapshotMark {
        SnapshotMark { lineage: self.lineage, seq: self.seq }
    }

    /// The services touched since `mark` (each once, in no particular order), or `None` when
    /// that is not known: `mark` is from another snapshot's history, from the future, or older
    /// than the log keeps. A service is touched when its Service or any slice filed under it
    /// is put or removed, so every service whose inputs differ from `mark`'s is listed.
    pub fn changed_since(&self, mark: SnapshotMark) -> Option<impl Iterator<Item = &NsName> + '_> {
        if mark.lineage != self.lineage || mark.seq > self.seq || mark.seq < self.log_floor {
            return None;
        }
        Some(self.log.range(mark.seq + 1..).map(|(_, k)| k))
    }

    fn touch(&mut self, key: &NsName) {
        use std::sync::atomic::Ordering;
        if self.head.compare_exchange(self.seq, self.seq + 1, Ordering::AcqRel, Ordering::Acquire).is_err() {
            // Another clone already moved this history on: fork into a new lineage, whose log
            // starts now (marks from the old one get `None`).
            self.lineage = next_lineage();
            self.head = Arc::new(std::sync::atomic::AtomicU64::new(self.seq + 1));
            self.touched = Default::default();
            self.log = Default::default();
            self.log_floor = self.seq;
        }
        self.seq += 1;
        if let Some(old) = self.touched.insert(key.clone(), self.seq) {
            self.log.remove(&old);
        }
        self.log.insert(self.seq, key.clone());
        // Keep the log about as large as the registry: forget the oldest touches (of services
        // long gone, typically); marks older than that get `None` and a full comparison.
        let cap = 2 * (self.services.len() + self.slices.len()) + 1024;
        while self.log.len() > cap {
            let Some((seq, k)) = self.log.get_min().map(|(s, k)| (*s, k.clone())) else { break };
            self.log.remove(&seq);
            self.touched.remove(&k);
            self.log_floor = seq;
        }
    }

    /// Builds a snapshot from plain lists (tests, `netd get`).
    pub fn from_objects(services: impl IntoIterator<Item = Service>, slices: impl IntoIterator<Item = EndpointSlice>) -> Self {
        let mut s = ServiceSnapshot::new();
        for svc in services {
            s.put_service(Arc::new(svc));
        }
        for sl in slices {
            s.put_slice(Arc::new(sl));
        }
        s
    }

    pub fn put_service(&mut self, svc: Arc<Service>) {
        let key = NsName::new(namespace_of(&svc.metadata), svc.metadata.name.clone().unwrap_or_default());
        self.touch(&key);
        self.services.insert(key, svc);
    }

    pub fn remove_service(&mut self, key: &NsName) {
        if self.services.remove(key).is_some() {
            self.touch(key);
        }
    }

    pub fn put_slice(&mut self, slice: Arc<EndpointSlice>) {
        let ns = namespace_of(&slice.metadata);
        let name = slice.metadata.name.clone().unwrap_or_default();
        let key = NsName::new(ns.clone(), name.clone());
        self.remove_slice(&key);
        let owner = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).cloned().unwrap_or_default();
        let owner = NsName::new(ns, owner);
        self.touch(&owner);
        Arc::make_mut(self.slices.entry(owner.clone()).or_default()).insert(name, slice);
        self.slice_owner.insert(key, owner);
    }

    pub fn remove_slice(&mut self, key: &NsName) {
        if let Some(owner) = self.slice_owner.remove(key) {
            self.touch(&owner);
            if let Some(group) = self.slices.get_mut(&owner) {
                Arc::make_mut(group).remove(&key.name);
                if group.is_empty() {
                    self.slices.remove(&owner);
                }
            }
        }
    }

    /// The slices of one service, in name order.
    pub fn slices_of(&self, service: &NsName) -> Vec<Arc<EndpointSlice>> {
        self.slices.get(service).map(|g| g.values().cloned().collect()).unwrap_or_default()
    }

    /// Every slice, with the key it is stored under.
    pub fn all_slices(&self) -> impl Iterator<Item = (NsName, &Arc<EndpointSlice>)> {
        self.slices.iter().flat_map(|(owner, g)| g.iter().map(move |(n, s)| (NsName::new(owner.namespace.clone(), n.clone()), s)))
    }

    pub fn slice_count(&self) -> usize {
        self.slice_owner.len()
    }
}

pub(crate) fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::{generated_service, generated_slice, generated_snapshot};

    fn names<'a>(it: impl Iterator<Item = &'a NsName>) -> Vec<String> {
        let mut v: Vec<String> = it.map(|k| k.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn the_log_names_every_service_touched_since_a_mark() {
        let mut s = generated_snapshot(5, 2, 8080);
        let m = s.mark();
        assert_eq!(names(s.changed_since(m).unwrap()), Vec::<String>::new());
        s.put_slice(Arc::new(generated_slice(1, 3, 8080, 1)));
        s.put_service(Arc::new(generated_service(3)));
        s.put_slice(Arc::new(generated_slice(1, 4, 8080, 2)));
        s.remove_service(&NsName::new("bench", "svc-4"));
        s.remove_service(&NsName::new("bench", "nope")); // absent: not a change
        assert_eq!(names(s.changed_since(m).unwrap()), ["bench/svc-1", "bench/svc-3", "bench/svc-4"]);
        // A slice relabelled to another service touches both.
        let m2 = s.mark();
        let mut moved = generated_slice(2, 1, 8080, 3);
        moved.metadata.labels.as_mut().unwrap().insert(SERVICE_NAME_LABEL.into(), "svc-0".into());
        s.put_slice(Arc::new(moved));
        assert_eq!(names(s.changed_since(m2).unwrap()), ["bench/svc-0", "bench/svc-2"]);
        // A mark from the future or from another snapshot is not understood.
        assert!(generated_snapshot(5, 2, 8080).changed_since(m2).is_none());
        let old = s.clone();
        s.put_service(Arc::new(generated_service(0)));
        assert!(old.changed_since(s.mark()).is_none());
    }

    #[test]
    fn a_clone_changed_on_the_side_forks_instead_of_lying() {
        let mut head = generated_snapshot(5, 2, 8080);
        let published = head.clone();
        let m = published.mark();
        head.put_slice(Arc::new(generated_slice(1, 3, 8080, 1)));
        // The published copy is changed on the side (as a filter might): svc-2 only.
        let mut side = published.clone();
        side.put_slice(Arc::new(generated_slice(2, 3, 8080, 1)));
        // Its history is not head's: head's mark is meaningless to it and the reverse.
        assert!(side.changed_since(head.mark()).is_none());
        assert!(head.changed_since(side.mark()).is_none());
        // Head's own line still answers exactly.
        assert_eq!(names(head.changed_since(m).unwrap()), ["bench/svc-1"]);
    }

    #[test]
    fn the_log_is_bounded_and_old_marks_expire() {
        let mut s = generated_snapshot(2, 1, 8080);
        let m = s.mark();
        for i in 0..3000 {
            s.put_service(Arc::new(generated_service(100 + i)));
            s.remove_service(&NsName::new("bench", format!("svc-{}", 100 + i)));
        }
        assert!(s.log.len() <= 2 * (s.services.len() + s.slices.len()) + 1024);
        assert!(s.changed_since(m).is_none(), "too old: the caller compares everything");
        let m2 = s.mark();
        s.put_slice(Arc::new(generated_slice(0, 2, 8080, 5)));
        assert_eq!(names(s.changed_since(m2).unwrap()), ["bench/svc-0"]);
    }
}
