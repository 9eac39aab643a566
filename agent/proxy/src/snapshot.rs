//! [`ServiceSnapshot`]: the registry contents at one revision, immutable once published.
//!
//! Objects are held behind `Arc`s and a new snapshot shares every unchanged object with the
//! previous one, so the planner can tell "unchanged" by pointer in constant time.

use std::collections::BTreeMap;
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
#[derive(Debug, Clone, Default)]
pub struct ServiceSnapshot {
    pub revision: i64,
    pub services: BTreeMap<NsName, Arc<Service>>,
    /// Service → slice name → slice.
    pub slices: BTreeMap<NsName, BTreeMap<String, Arc<EndpointSlice>>>,
    /// Slice → the service it was filed under (to move it when its label changes).
    slice_owner: BTreeMap<NsName, NsName>,
}

impl ServiceSnapshot {
    pub fn new() -> Self {
        Self::default()
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
        self.services.insert(key, svc);
    }

    pub fn remove_service(&mut self, key: &NsName) {
        self.services.remove(key);
    }

    pub fn put_slice(&mut self, slice: Arc<EndpointSlice>) {
        let ns = namespace_of(&slice.metadata);
        let name = slice.metadata.name.clone().unwrap_or_default();
        let key = NsName::new(ns.clone(), name.clone());
        self.remove_slice(&key);
        let owner = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).cloned().unwrap_or_default();
        let owner = NsName::new(ns, owner);
        self.slices.entry(owner.clone()).or_default().insert(name, slice);
        self.slice_owner.insert(key, owner);
    }

    pub fn remove_slice(&mut self, key: &NsName) {
        if let Some(owner) = self.slice_owner.remove(key) {
            if let Some(group) = self.slices.get_mut(&owner) {
                group.remove(&key.name);
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
