//! Health of the service proxy:
//!
//! - healthCheckNodePort servers: for each service with externalTrafficPolicy Local, an HTTP
//!   endpoint answering 200 while this node has local endpoints and 503 otherwise, with
//!   kube-proxy's JSON body, so an external load balancer only sends traffic to nodes that can
//!   serve it locally.
//! - [`ProxierHealth`]: whether the service rules are fresh, with kube-proxy's rule for its
//!   `:10256/healthz` (what load balancers of externalTrafficPolicy Cluster services and
//!   liveness probes ask).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::model::HealthCheck;

type Shared = Arc<Mutex<HashMap<u16, HealthCheck>>>;

/// The running servers, one task per port.
pub struct HealthServers {
    bind: Ipv4Addr,
    state: Shared,
    tasks: HashMap<u16, JoinHandle<()>>,
}

impl HealthServers {
    pub fn new(bind: Ipv4Addr) -> Self {
        HealthServers { bind, state: Arc::default(), tasks: HashMap::new() }
    }

    /// Serves exactly `checks`: new ports are bound, gone ones closed, counts updated.
    pub async fn update(&mut self, checks: &std::collections::BTreeMap<u16, HealthCheck>) {
        {
            let mut st = self.state.lock().expect("health state poisoned");
            st.clear();
            st.extend(checks.iter().map(|(k, v)| (*k, v.clone())));
        }
        self.tasks.retain(|port, task| {
            let keep = checks.contains_key(port) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for port in checks.keys() {
            if self.tasks.contains_key(port) {
                continue;
            }
            match TcpListener::bind(SocketAddr::from((self.bind, *port))).await {
                Ok(l) => {
                    info!(port, "serving healthCheckNodePort");
                    self.tasks.insert(*port, tokio::spawn(serve(l, *port, self.state.clone())));
                }
                Err(e) => warn!(port, "cannot listen for healthCheckNodePort: {e}"),
            }
        }
    }

    pub fn ports(&self) -> Vec<u16> {
        let mut v: Vec<u16> = self.tasks.keys().copied().collect();
        v.sort();
        v
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for t in self.tasks.values() {
            t.abort();
        }
    }
}

async fn serve(l: TcpListener, port: u16, state: Shared) {
    loop {
        let Ok((mut s, _)) = l.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf)).await;
            let check = state.lock().ok().and_then(|m| m.get(&port).cloned());
            let resp = response(check.as_ref());
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

/// The HTTP response for one check (kube-proxy's format).
pub fn response(check: Option<&HealthCheck>) -> String {
    let (code, body) = match check {
        Some(c) => (
            if c.local_endpoints > 0 { "200 OK" } else { "503 Service Unavailable" },
            serde_json::json!({
                "service": {"namespace": c.service.namespace, "name": c.service.name},
                "localEndpoints": c.local_endpoints,
                "serviceProxyHealthy": true
            })
            .to_string(),
        ),
        None => ("404 Not Found", "{}".to_string()),
    };
    let weight = check.map(|c| c.local_endpoints).unwrap_or(0);
    format!(
        "HTTP/1.1 {code}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nX-Load-Balancing-Endpoint-Weight: {weight}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Whether the service rules are fresh, kube-proxy's way: an update (a new snapshot, or a pass
/// that failed and left the kernel short of the wanted state) that stays unapplied for longer
/// than `timeout` (kube-proxy: twice the sync period) makes the proxy unhealthy until a pass
/// applies that update or a newer one. Nothing pending (at start, before the source has
/// published, or when everything is applied) is healthy. Times are passed in, so the rule is
/// tested without clocks.
#[derive(Debug, Clone)]
pub struct ProxierHealth {
    timeout: Duration,
    /// The newest revision a pass applied.
    applied: Option<i64>,
    /// When the last pass succeeded (wall clock, for the JSON body).
    last_updated: Option<SystemTime>,
    /// The newest unapplied revision and when the oldest unapplied update arrived.
    pending: Option<(i64, Instant)>,
    last_error: Option<String>,
}

/// What [`ProxierHealth::check`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckResult {
    pub healthy: bool,
    pub last_updated: Option<SystemTime>,
    /// Why not healthy (how long which revision has waited, the last error).
    pub reason: Option<String>,
}

impl ProxierHealth {
    pub fn new(timeout: Duration) -> Self {
        ProxierHealth { timeout, applied: None, last_updated: None, pending: None, last_error: None }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A snapshot at `revision` was published. One a pass has already applied (the notice can
    /// arrive after the pass) queues nothing.
    pub fn queued(&mut self, revision: i64, now: Instant) {
        if self.applied.is_some_and(|a| revision <= a) {
            return;
        }
        let since = self.pending.map_or(now, |(_, since)| since);
        let newest = self.pending.map_or(revision, |(r, _)| r.max(revision));
        self.pending = Some((newest, since));
    }

    /// A pass applied the snapshot at `revision`: updates up to it are done.
    pub fn updated(&mut self, revision: i64, wall: SystemTime) {
        self.applied = Some(self.applied.map_or(revision, |a| a.max(revision)));
        self.last_updated = Some(wall);
        self.last_error = None;
        if self.pending.is_some_and(|(r, _)| r <= revision) {
            self.pending = None;
        }
    }

    /// A pass for the snapshot at `revision` failed: the kernel is not in the wanted state,
    /// which counts as an update pending since now (or since the older update still waiting).
    pub fn failed(&mut self, revision: i64, error: String, now: Instant) {
        self.last_error = Some(error);
        let since = self.pending.map_or(now, |(_, since)| since);
        let newest = self.pending.map_or(revision, |(r, _)| r.max(revision));
        self.pending = Some((newest, since));
    }

    pub fn check(&self, now: Instant) -> HealthCheckResult {
        let late = self.pending.filter(|(_, since)| now.saturating_duration_since(*since) >= self.timeout);
        let reason = late.map(|(revision, since)| {
            let error = self.last_error.as_deref().map(|e| format!("; last sync error: {e}")).unwrap_or_default();
            format!(
                "service rules stale: revision {revision} not applied for {:.0}s (limit {:.0}s){error}",
                now.saturating_duration_since(since).as_secs_f64(),
                self.timeout.as_secs_f64()
            )
        });
        HealthCheckResult { healthy: late.is_none(), last_updated: self.last_updated, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::NsName;

    #[test]
    fn an_update_unapplied_past_the_timeout_is_unhealthy_until_applied() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_748_779_200);
        let mut h = ProxierHealth::new(Duration::from_secs(60));
        // Starting: nothing published, nothing pending.
        assert!(h.check(s(1000)).healthy);
        h.queued(10, s(0));
        assert!(h.check(s(59)).healthy, "not late yet");
        assert!(!h.check(s(60)).healthy);
        // A newer update does not restart the clock; applying an older one does not clear it.
        h.queued(11, s(30));
        h.updated(10, wall);
        let c = h.check(s(61));
        assert!(!c.healthy);
        assert_eq!(c.reason.as_deref(), Some("service rules stale: revision 11 not applied for 61s (limit 60s)"));
        h.updated(11, wall);
        assert_eq!(h.check(s(1000)), HealthCheckResult { healthy: true, last_updated: Some(wall), reason: None });
        // A notice that arrives after its pass queues nothing.
        h.queued(11, s(70));
        assert!(h.check(s(1000)).healthy);
    }

    #[test]
    fn a_failing_pass_is_stale_past_the_timeout_and_names_the_error() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut h = ProxierHealth::new(Duration::from_secs(60));
        h.updated(5, SystemTime::UNIX_EPOCH);
        // A resync of the applied revision fails: the kernel drifted and cannot be repaired.
        h.failed(5, "nft: Operation not permitted".into(), s(10));
        h.failed(5, "nft: Operation not permitted".into(), s(40));
        assert!(h.check(s(69)).healthy);
        let c = h.check(s(70));
        assert!(!c.healthy);
        assert!(c.reason.unwrap().ends_with("; last sync error: nft: Operation not permitted"));
        h.updated(5, SystemTime::UNIX_EPOCH);
        assert!(h.check(s(1000)).healthy);
    }

    #[test]
    fn answers_like_kube_proxy() {
        let c = HealthCheck { service: NsName::new("prod", "lb"), local_endpoints: 2 };
        let r = response(Some(&c));
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.ends_with(r#"{"localEndpoints":2,"service":{"name":"lb","namespace":"prod"},"serviceProxyHealthy":true}"#), "{r}");
        let c = HealthCheck { local_endpoints: 0, ..c };
        assert!(response(Some(&c)).starts_with("HTTP/1.1 503"));
    }
}
