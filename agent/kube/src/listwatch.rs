//! List and watch one resource type, the way client-go's reflector does, by hand on top of
//! `kube::Api` (kube_runtime's `watcher` retries a watch that the server refuses with an HTTP
//! 410 from the same, expired resourceVersion forever; this loop relists instead).
//!
//! ```text
//!  ┌─► list (paged, consistent)  ── error ─► back off, list again
//!  │      │ Listed{items, rv}
//!  │      ▼
//!  │   watch from rv (bookmarks on, timeoutSeconds)
//!  │      │ ADDED/MODIFIED → Applied, DELETED → Deleted, BOOKMARK → rv moves on
//!  │      │ stream ends (timeout) → watch again from the last rv seen
//!  │      │ error / no byte for timeout+5s → back off, watch again from the last rv
//!  └──────┘ 410 Gone/Expired (HTTP answer or ERROR event) → relist
//! ```
//!
//! The engine only reports; what to publish is the caller's business (see
//! [`crate::services`] and [`crate::nodes`]): it never sees a half-done relist, because a
//! relist arrives as one `Listed` update.

use std::fmt::Debug;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::error::brief;

/// How the sources talk to the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchConfig {
    /// First pause after an error; doubled after each further error (plus up to 25% jitter).
    pub backoff_initial: Duration,
    /// Longest pause between retries.
    pub backoff_max: Duration,
    /// `timeoutSeconds` of each watch request; the server ends the watch after it and the source
    /// watches again from where it was (no relist). A watch that has not said a thing for this
    /// long plus 5 s is taken as dead.
    pub timeout_secs: u32,
    /// Page size (`limit`) of list requests.
    pub page_size: u32,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig { backoff_initial: Duration::from_millis(500), backoff_max: Duration::from_secs(30), timeout_secs: 290, page_size: 500 }
    }
}

/// What happened to one resource type.
#[derive(Debug)]
pub(crate) enum Update<K> {
    /// A complete list at one resourceVersion: replaces everything known of this type.
    Listed { items: Vec<K>, resource_version: String },
    Applied(K),
    Deleted(K),
    /// Nothing changed up to this resourceVersion.
    Bookmark(String),
    /// The API server answered (a list completed or a watch started).
    Connected,
    /// A request failed; the engine retries. `expired`: the server said 410 (Gone/Expired), so
    /// the engine relists.
    Failed { error: String, expired: bool },
}

pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(cfg: &WatchConfig) -> Self {
        Backoff { initial: cfg.backoff_initial, max: cfg.backoff_max.max(cfg.backoff_initial), next: cfg.backoff_initial }
    }
    pub(crate) fn reset(&mut self) {
        self.next = self.initial;
    }
    /// The pause to take now; the one after it is twice as long, up to the maximum.
    pub(crate) fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter_ms = (d.as_millis() / 4) as u64;
        let jitter = if jitter_ms > 0 { Duration::from_millis(rand::random::<u64>() % jitter_ms) } else { Duration::ZERO };
        d + jitter
    }
}

/// Sleeps for `d`, or until nobody listens to `tx` any more (then `false`).
async fn pause<T>(tx: &mpsc::Sender<T>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = tx.closed() => false,
    }
}

fn is_gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 410)
}

/// One complete, consistent list (all pages) and its resourceVersion.
async fn list_all<K>(api: &Api<K>, page_size: u32) -> Result<(Vec<K>, String), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let mut lp = ListParams::default().limit(page_size);
    let mut items = Vec::new();
    loop {
        let page = api.list(&lp).await?;
        items.extend(page.items);
        let rv = page.metadata.resource_version.unwrap_or_default();
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => lp.continue_token = Some(token),
            None => return Ok((items, rv)),
        }
    }
}

/// Lists and watches `api` forever, reporting to `tx`; returns when `tx`'s receiver is gone.
/// `what` names the resource in errors ("services").
pub(crate) async fn list_watch<K>(api: Api<K>, what: &'static str, cfg: WatchConfig, tx: mpsc::Sender<Update<K>>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut backoff = Backoff::new(&cfg);
    let timeout_secs = cfg.timeout_secs.max(1);
    let idle = Duration::from_secs(u64::from(timeout_secs) + 5);
    let wp = WatchParams::default().timeout(timeout_secs);
    // Consecutive 410s with nothing learnt in between: the first relists at once, the next ones
    // back off (a server that expires everything must not be hammered with lists).
    let mut expired_in_a_row = 0u32;
    'relist: loop {
        if expired_in_a_row > 1 && !pause(&tx, backoff.step()).await {
            return;
        }
        let (items, mut rv) = match list_all(&api, cfg.page_size).await {
            Ok(r) => r,
            Err(e) => {
                let expired = is_gone(&e);
                if tx.send(Update::Failed { error: format!("list {what}: {}", brief(&e)), expired }).await.is_err() || !pause(&tx, backoff.step()).await {
                    return;
                }
                continue 'relist;
            }
        };
        if rv.is_empty() {
            let error = format!("list {what}: the answer has no metadata.resourceVersion to watch from");
            if tx.send(Update::Failed { error, expired: false }).await.is_err() || !pause(&tx, backoff.step()).await {
                return;
            }
            continue 'relist;
        }
        if tx.send(Update::Connected).await.is_err() || tx.send(Update::Listed { items, resource_version: rv.clone() }).await.is_err() {
            return;
        }
        backoff.reset();
        // Watch from `rv` until the server says it is too old.
        loop {
            let stream = match api.watch(&wp, &rv).await {
                Ok(s) => s,
                Err(e) if is_gone(&e) => {
                    expired_in_a_row += 1;
                    let error = format!("watch {what} from resourceVersion {rv}: {} (relisting)", brief(&e));
                    if tx.send(Update::Failed { error, expired: true }).await.is_err() {
                        return;
                    }
                    continue 'relist;
                }
                Err(e) => {
                    let error = format!("watch {what} from resourceVersion {rv}: {}", brief(&e));
                    if tx.send(Update::Failed { error, expired: false }).await.is_err() || !pause(&tx, backoff.step()).await {
                        return;
                    }
                    continue;
                }
            };
            if tx.send(Update::Connected).await.is_err() {
                return;
            }
            let mut stream = std::pin::pin!(stream);
            let mut events = 0u64;
            let ended_with_error = loop {
                let next = tokio::select! {
                    n = tokio::time::timeout(idle, stream.next()) => n,
                    _ = tx.closed() => return,
                };
                let update = match next {
                    Err(_) => break Some(format!("watch {what}: nothing heard for {}s, reconnecting", idle.as_secs())),
                    Ok(None) => break None,
                    Ok(Some(Err(e))) if is_gone(&e) => {
                        expired_in_a_row += 1;
                        let error = format!("watch {what} from resourceVersion {rv}: {} (relisting)", brief(&e));
                        if tx.send(Update::Failed { error, expired: true }).await.is_err() {
                            return;
                        }
                        continue 'relist;
                    }
                    Ok(Some(Err(e))) => break Some(format!("watch {what}: {}", brief(&e))),
                    Ok(Some(Ok(WatchEvent::Error(status)))) if status.code == 410 => {
                        expired_in_a_row += 1;
                        let error = format!(
                            "watch {what} from resourceVersion {rv}: {} {}: {} (relisting)",
                            status.code, status.reason, status.message
                        );
                        if tx.send(Update::Failed { error, expired: true }).await.is_err() {
                            return;
                        }
                        continue 'relist;
                    }
                    Ok(Some(Ok(WatchEvent::Error(status)))) => {
                        break Some(format!("watch {what}: error event {} {}: {}", status.code, status.reason, status.message));
                    }
                    Ok(Some(Ok(WatchEvent::Added(obj) | WatchEvent::Modified(obj)))) => {
                        if let Some(v) = obj.resource_version().filter(|v| !v.is_empty()) {
                            rv = v;
                        }
                        Update::Applied(obj)
                    }
                    Ok(Some(Ok(WatchEvent::Deleted(obj)))) => {
                        if let Some(v) = obj.resource_version().filter(|v| !v.is_empty()) {
                            rv = v;
                        }
                        Update::Deleted(obj)
                    }
                    Ok(Some(Ok(WatchEvent::Bookmark(b)))) => {
                        if b.metadata.resource_version.is_empty() {
                            continue;
                        }
                        rv = b.metadata.resource_version.clone();
                        Update::Bookmark(b.metadata.resource_version)
                    }
                };
                events += 1;
                expired_in_a_row = 0;
                if tx.send(update).await.is_err() {
                    return;
                }
            };
            match ended_with_error {
                Some(error) => {
                    if tx.send(Update::Failed { error, expired: false }).await.is_err() || !pause(&tx, backoff.step()).await {
                        return;
                    }
                }
                // The server closed the watch (timeoutSeconds): watch again from `rv`. A server
                // that closes every watch at once without a word gets a short pause.
                None if events == 0 => {
                    if !pause(&tx, cfg.backoff_initial).await {
                        return;
                    }
                }
                None => backoff.reset(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_resets() {
        let cfg = WatchConfig { backoff_initial: Duration::from_millis(400), backoff_max: Duration::from_secs(2), ..WatchConfig::default() };
        let mut b = Backoff::new(&cfg);
        let steps: Vec<Duration> = (0..5).map(|_| b.step()).collect();
        // Each pause is its nominal value plus at most 25% jitter.
        for (got, nominal) in steps.iter().zip([400u64, 800, 1600, 2000, 2000]) {
            let nominal = Duration::from_millis(nominal);
            assert!(*got >= nominal && *got <= nominal + nominal / 4, "{got:?} vs {nominal:?}");
        }
        b.reset();
        assert!(b.step() < Duration::from_millis(501));
    }
}
