//! Connectivity and sync state of a source, for `netd status`.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// What a Kubernetes source knows about its connection to the API server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SourceStatus {
    /// The last request of every watched resource was answered (a list completed or a watch
    /// is open). `false` while the API server is unreachable; the last good state stays published.
    pub connected: bool,
    /// Every resource has been listed completely at least once, so a state has been published.
    pub synced: bool,
    /// The latest error, kept after recovery (see `last_error_at` against `last_sync`).
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
    /// When a complete list (initial or relist) was last applied.
    pub last_sync: Option<SystemTime>,
    /// When the last watch event (or bookmark) arrived.
    pub last_event: Option<SystemTime>,
    /// Resource → the resourceVersion the source is at.
    pub resource_versions: BTreeMap<String, String>,
    /// Complete lists done (the initial ones and every relist).
    pub lists: u64,
    /// Times the server said a resourceVersion was too old (410 Gone/Expired), each followed by a relist.
    pub expired: u64,
    /// Failed requests and broken watches.
    pub errors: u64,
    /// Objects in the published state.
    pub objects: usize,
    /// Objects left out of the published state, each with the reason.
    pub skipped: Vec<String>,
}

/// Keeps a [`SourceStatus`] up to date from the engines' reports.
pub(crate) struct Tracker {
    tx: watch::Sender<SourceStatus>,
    /// Per resource: did its last request succeed?
    up: BTreeMap<&'static str, bool>,
    source: &'static str,
}

impl Tracker {
    pub(crate) fn new(tx: watch::Sender<SourceStatus>, source: &'static str, resources: &[&'static str]) -> Self {
        let up = resources.iter().map(|r| (*r, false)).collect();
        tx.send_modify(|s| s.connected = false);
        Tracker { tx, up, source }
    }

    fn set_connected(&mut self, what: &'static str, ok: bool) {
        self.up.insert(what, ok);
        let all = self.up.values().all(|v| *v);
        self.tx.send_if_modified(|s| {
            let changed = s.connected != all;
            s.connected = all;
            changed
        });
    }

    pub(crate) fn connected(&mut self, what: &'static str) {
        if self.up.get(what) == Some(&false) {
            debug!(source = self.source, resource = what, "API server answered");
        }
        self.set_connected(what, true);
    }

    pub(crate) fn failed(&mut self, what: &'static str, error: String, expired: bool) {
        if expired {
            // Expected now and then (history compacted, watch too slow): not a lost connection.
            info!(source = %self.source, resource = %what, "{error}");
        } else {
            warn!(source = %self.source, resource = %what, "{error} (keeping the last good state, retrying)");
            self.set_connected(what, false);
        }
        self.tx.send_modify(|s| {
            if expired {
                s.expired += 1;
            } else {
                s.errors += 1;
            }
            s.last_error = Some(error);
            s.last_error_at = Some(SystemTime::now());
        });
    }

    pub(crate) fn listed(&mut self, what: &'static str, rv: &str) {
        self.tx.send_modify(|s| {
            s.lists += 1;
            s.last_sync = Some(SystemTime::now());
            s.resource_versions.insert(what.to_string(), rv.to_string());
        });
    }

    pub(crate) fn event(&mut self, what: &'static str, rv: Option<String>) {
        self.tx.send_modify(|s| {
            s.last_event = Some(SystemTime::now());
            if let Some(rv) = rv {
                s.resource_versions.insert(what.to_string(), rv);
            }
        });
    }

    /// After a publish: the object count, the skipped objects, and `synced`.
    pub(crate) fn published(&mut self, objects: usize, skipped: Vec<String>) {
        self.tx.send_modify(|s| {
            if !s.synced {
                info!(source = %self.source, objects, "initial state from the API server published");
            }
            s.synced = true;
            s.objects = objects;
            s.skipped = skipped;
        });
    }
}
