//! Services and EndpointSlices from the API server into the proxy's [`ServiceSnapshot`]: the same
//! model netd's etcd registry feeds, so the proxy and DNS behave the same with either source.
//!
//! Publishing rules:
//! - nothing is published until both Services and EndpointSlices have been listed completely;
//! - a relist (after 410 Gone, or a list retried after errors) replaces a resource type in one
//!   step, so no half-empty state is ever published;
//! - while the API server is unreachable nothing is published: the last good snapshot stays;
//! - unchanged objects keep their `Arc` across snapshots (the planner compares by pointer).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Api, Client};
use netd_proxy::snapshot::{NsName, ServiceSnapshot};
use tokio::sync::{mpsc, watch};

use crate::listwatch::{list_watch, Update, WatchConfig};
use crate::status::{SourceStatus, Tracker};

const SERVICES: &str = "services";
const SLICES: &str = "endpointslices";

/// Keeps `tx` holding the Services and EndpointSlices of every namespace, as the API server has
/// them, and `status` describing the connection. Returns when every receiver of `tx` is gone.
///
/// Needs RBAC `list` and `watch` on `services` (core) and `endpointslices` (discovery.k8s.io).
pub async fn run_service_source(client: Client, tx: watch::Sender<Arc<ServiceSnapshot>>, status: watch::Sender<SourceStatus>) {
    let publish = |snap: Arc<ServiceSnapshot>| tx.send(snap).is_ok();
    tokio::select! {
        _ = run_service_source_with(client, WatchConfig::default(), status, publish) => {}
        _ = tx.closed() => {}
    }
}

/// [`run_service_source`] with explicit timings, handing each new snapshot to `publish` (which
/// returns `false` to stop the source).
pub async fn run_service_source_with<F>(client: Client, cfg: WatchConfig, status: watch::Sender<SourceStatus>, publish: F)
where
    F: FnMut(Arc<ServiceSnapshot>) -> bool,
{
    let (svc_tx, svc_rx) = mpsc::channel(256);
    let (eps_tx, eps_rx) = mpsc::channel(256);
    let services = list_watch(Api::<Service>::all(client.clone()), SERVICES, cfg.clone(), svc_tx);
    let slices = list_watch(Api::<EndpointSlice>::all(client), SLICES, cfg, eps_tx);
    let tracker = Tracker::new(status, "kubernetes services", &[SERVICES, SLICES]);
    let fold = fold_updates(svc_rx, eps_rx, tracker, publish);
    tokio::select! {
        _ = fold => {}
        _ = async { tokio::join!(services, slices) } => {}
    }
}

fn key_of(meta: &ObjectMeta) -> Option<NsName> {
    let name = meta.name.clone().filter(|n| !n.is_empty())?;
    let ns = meta.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".to_string());
    Some(NsName::new(ns, name))
}

/// Same object at the same version: keep the old `Arc` so the planner sees it unchanged.
fn same_version(a: &ObjectMeta, b: &ObjectMeta) -> bool {
    a.resource_version.is_some() && a.resource_version == b.resource_version && a.uid == b.uid
}

#[derive(Default)]
struct State {
    snap: ServiceSnapshot,
    services_listed: bool,
    slices_listed: bool,
    rv: BTreeMap<&'static str, String>,
    /// Objects left out (no name), per resource.
    skipped: BTreeMap<&'static str, BTreeSet<String>>,
    dirty: bool,
}

impl State {
    fn skip(&mut self, what: &'static str, meta: &ObjectMeta) {
        let ns = meta.namespace.clone().unwrap_or_default();
        self.skipped.entry(what).or_default().insert(format!("{what} in namespace {ns:?} without metadata.name"));
    }

    fn replace_services(&mut self, items: Vec<Service>) {
        self.skipped.remove(SERVICES);
        let mut fresh = BTreeMap::new();
        for svc in items {
            let Some(key) = key_of(&svc.metadata) else {
                self.skip(SERVICES, &svc.metadata);
                continue;
            };
            fresh.insert(key, svc);
        }
        // Through put/remove, so that the snapshot's change log sees every difference.
        let gone: Vec<NsName> = self.snap.services().keys().filter(|k| !fresh.contains_key(*k)).cloned().collect();
        for k in &gone {
            self.snap.remove_service(k);
        }
        for (key, svc) in fresh {
            match self.snap.services().get(&key) {
                Some(old) if same_version(&old.metadata, &svc.metadata) => {}
                _ => self.snap.put_service(Arc::new(svc)),
            }
        }
    }

    fn replace_slices(&mut self, items: Vec<EndpointSlice>) {
        self.skipped.remove(SLICES);
        let mut fresh = BTreeMap::new();
        for sl in items {
            match key_of(&sl.metadata) {
                Some(key) => {
                    fresh.insert(key, sl);
                }
                None => self.skip(SLICES, &sl.metadata),
            }
        }
        let gone: Vec<NsName> = self.snap.all_slices().map(|(k, _)| k).filter(|k| !fresh.contains_key(k)).collect();
        for k in &gone {
            self.snap.remove_slice(k);
        }
        let existing: BTreeMap<NsName, Arc<EndpointSlice>> = self.snap.all_slices().map(|(k, s)| (k, s.clone())).collect();
        for (key, sl) in fresh {
            match existing.get(&key) {
                Some(old) if same_version(&old.metadata, &sl.metadata) => {}
                _ => self.snap.put_slice(Arc::new(sl)),
            }
        }
    }

    fn apply_service(&mut self, update: Update<Service>, tracker: &mut Tracker) {
        match update {
            Update::Listed { items, resource_version } => {
                tracker.listed(SERVICES, &resource_version);
                self.replace_services(items);
                self.rv.insert(SERVICES, resource_version);
                self.services_listed = true;
                self.dirty = true;
            }
            Update::Applied(svc) => {
                tracker.event(SERVICES, svc.metadata.resource_version.clone());
                self.note_rv(SERVICES, &svc.metadata);
                match key_of(&svc.metadata) {
                    Some(_) => self.snap.put_service(Arc::new(svc)),
                    None => self.skip(SERVICES, &svc.metadata),
                }
                self.dirty = true;
            }
            Update::Deleted(svc) => {
                tracker.event(SERVICES, svc.metadata.resource_version.clone());
                self.note_rv(SERVICES, &svc.metadata);
                if let Some(key) = key_of(&svc.metadata) {
                    self.snap.remove_service(&key);
                }
                self.dirty = true;
            }
            Update::Bookmark(rv) => {
                tracker.event(SERVICES, Some(rv.clone()));
                self.rv.insert(SERVICES, rv);
            }
            Update::Connected => tracker.connected(SERVICES),
            Update::Failed { error, expired } => tracker.failed(SERVICES, error, expired),
        }
    }

    fn apply_slice(&mut self, update: Update<EndpointSlice>, tracker: &mut Tracker) {
        match update {
            Update::Listed { items, resource_version } => {
                tracker.listed(SLICES, &resource_version);
                self.replace_slices(items);
                self.rv.insert(SLICES, resource_version);
                self.slices_listed = true;
                self.dirty = true;
            }
            Update::Applied(sl) => {
                tracker.event(SLICES, sl.metadata.resource_version.clone());
                self.note_rv(SLICES, &sl.metadata);
                match key_of(&sl.metadata) {
                    Some(_) => self.snap.put_slice(Arc::new(sl)),
                    None => self.skip(SLICES, &sl.metadata),
                }
                self.dirty = true;
            }
            Update::Deleted(sl) => {
                tracker.event(SLICES, sl.metadata.resource_version.clone());
                self.note_rv(SLICES, &sl.metadata);
                if let Some(key) = key_of(&sl.metadata) {
                    self.snap.remove_slice(&key);
                }
                self.dirty = true;
            }
            Update::Bookmark(rv) => {
                tracker.event(SLICES, Some(rv.clone()));
                self.rv.insert(SLICES, rv);
            }
            Update::Connected => tracker.connected(SLICES),
            Update::Failed { error, expired } => tracker.failed(SLICES, error, expired),
        }
    }

    fn note_rv(&mut self, what: &'static str, meta: &ObjectMeta) {
        if let Some(rv) = meta.resource_version.clone().filter(|v| !v.is_empty()) {
            self.rv.insert(what, rv);
        }
    }

    /// The snapshot's revision: the newest resourceVersion seen (Kubernetes resourceVersions are
    /// etcd revisions, shared by all resources), never going back; +1 if they are not numbers.
    fn next_revision(&self) -> i64 {
        let prev = self.snap.revision;
        let parsed: Option<Vec<i64>> = self.rv.values().map(|v| v.parse::<i64>().ok()).collect();
        match parsed.and_then(|v| v.into_iter().max()) {
            Some(newest) => prev.max(newest),
            None => prev + 1,
        }
    }
}

/// Folds both engines' updates into one snapshot and publishes it whenever it changed and
/// both resource types have been listed. Updates already queued are folded before publishing,
/// so a burst of events makes one snapshot.
async fn fold_updates<F>(
    mut svc_rx: mpsc::Receiver<Update<Service>>,
    mut eps_rx: mpsc::Receiver<Update<EndpointSlice>>,
    mut tracker: Tracker,
    mut publish: F,
) where
    F: FnMut(Arc<ServiceSnapshot>) -> bool,
{
    let mut st = State::default();
    loop {
        tokio::select! {
            u = svc_rx.recv() => match u {
                Some(u) => st.apply_service(u, &mut tracker),
                None => return,
            },
            u = eps_rx.recv() => match u {
                Some(u) => st.apply_slice(u, &mut tracker),
                None => return,
            },
        }
        // Fold what is already waiting (bounded, so a flood cannot starve publishing).
        for _ in 0..1024 {
            if let Ok(u) = svc_rx.try_recv() {
                st.apply_service(u, &mut tracker);
            } else if let Ok(u) = eps_rx.try_recv() {
                st.apply_slice(u, &mut tracker);
            } else {
                break;
            }
        }
        if st.dirty && st.services_listed && st.slices_listed {
            st.snap.revision = st.next_revision();
            st.dirty = false;
            let snap = Arc::new(st.snap.clone());
            let objects = snap.services().len() + snap.slice_count();
            let skipped = st.skipped.values().flatten().cloned().collect();
            tracker.published(objects, skipped);
            if !publish(snap) {
                return;
            }
        }
    }
}
