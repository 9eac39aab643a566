//! The status socket (`<run-dir>/netd.sock`, mode 0600: HTTP+JSON for `netd status`), the
//! health listener (`--healthz-bind-address`, kube-proxy's `:10256`: `/healthz`, `/livez`,
//! `/readyz`, for the kubelet's probes and load balancers) and the metrics listener
//! (`/metrics`, `/healthz`, `/readyz`; localhost by default).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use netd_proxy::health::{HealthCheckResult, ProxierHealth};

use crate::metrics::Metrics;
use crate::status::NodeStatus;

/// State shared by the daemon (writer) and the servers (readers).
pub struct Shared {
    pub status: RwLock<NodeStatus>,
    /// netd-cni's IPAM state file and the node subnet's prefix length, once the CNI config is
    /// written: read on every status request, so pod counts are current.
    pub cni_state: RwLock<Option<(PathBuf, u8)>>,
    pub metrics: Metrics,
    pub readiness: RwLock<Readiness>,
    /// The service proxy's freshness, once a proxy runs (`None`: nothing to be stale).
    pub proxier_health: RwLock<Option<Arc<std::sync::Mutex<ProxierHealth>>>>,
}

/// What `/readyz` waits for: the node can serve pods only once all of these hold.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    pub lease: bool,
    pub subnet_env: bool,
    /// `None` when netd does not write a CNI config (`--cni-conf-dir ""`).
    pub cni_config: Option<bool>,
    /// `None` when no service proxy runs.
    pub first_service_sync: Option<bool>,
    /// `None` without cluster DNS. During an upgrade the new netd is ready only once it serves
    /// DNS (on its predecessor's sockets), so the old one is stopped only then.
    pub dns: Option<bool>,
}

impl Readiness {
    pub fn missing(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if !self.lease {
            m.push("subnet lease");
        }
        if !self.subnet_env {
            m.push("subnet.env");
        }
        if self.cni_config == Some(false) {
            m.push("CNI config");
        }
        if self.first_service_sync == Some(false) {
            m.push("first service sync");
        }
        if self.dns == Some(false) {
            m.push("cluster DNS");
        }
        m
    }
}

impl Shared {
    pub fn new(status: NodeStatus) -> Arc<Self> {
        Arc::new(Shared {
            status: RwLock::new(status),
            cni_state: RwLock::new(None),
            metrics: Metrics::new(),
            readiness: RwLock::new(Readiness::default()),
            proxier_health: RwLock::new(None),
        })
    }

    pub fn update(&self, f: impl FnOnce(&mut NodeStatus)) {
        f(&mut self.status.write().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn set_ready(&self, f: impl FnOnce(&mut Readiness)) {
        let mut r = self.readiness.write().unwrap_or_else(|p| p.into_inner());
        f(&mut r);
        self.metrics.ready.set(i64::from(r.missing().is_empty()));
    }

    pub fn snapshot(&self) -> NodeStatus {
        let mut s = self.status.read().unwrap_or_else(|p| p.into_inner()).clone();
        s.now = unix_now();
        if let Some((path, len)) = self.cni_state.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            s.cni = Some(crate::status::CniStatus::read(path, *len));
        }
        s
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("binding the status socket {path}: {source}")]
    Socket { path: String, source: std::io::Error },
    #[error("binding the metrics listener {addr}: {source}")]
    Metrics { addr: String, source: std::io::Error },
    #[error("binding the health listener {addr} (--healthz-bind-address): {source}")]
    Health { addr: String, source: std::io::Error },
}

async fn status(State(s): State<Arc<Shared>>) -> Json<NodeStatus> {
    Json(s.snapshot())
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    // The CNI figures live in netd-cni's IPAM file: read at scrape time, so they are current.
    if let Some(cni) = s.snapshot().cni.filter(|c| c.error.is_none()) {
        s.metrics.cni_pods.set(cni.pods as i64);
        s.metrics.cni_addresses_free.set(cni.addresses_free as i64);
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.encode())
}

impl Shared {
    /// The service proxy's freshness now: healthy when no proxy runs.
    pub fn proxy_health(&self) -> HealthCheckResult {
        let h = self.proxier_health.read().unwrap_or_else(|p| p.into_inner()).clone();
        match h {
            Some(h) => h.lock().unwrap_or_else(|p| p.into_inner()).check(std::time::Instant::now()),
            None => HealthCheckResult { healthy: true, last_updated: None, reason: None },
        }
    }
}

/// kube-proxy's `/healthz` (and, without `nodeEligible`, `/livez`): 200 while the service rules
/// are fresh, 503 once an update has waited past the limit, a small JSON body either way. As in
/// kube-proxy, a healthy answer's `lastUpdated` is the current time; times are RFC 3339 (UTC).
fn proxy_health_response(s: &Shared, node_eligible: bool) -> (StatusCode, [(header::HeaderName, &'static str); 2], String) {
    let check = s.proxy_health();
    let now = std::time::SystemTime::now();
    let last = if check.healthy { Some(now) } else { check.last_updated };
    let mut body = serde_json::json!({
        "lastUpdated": last.map(netd_common::report::rfc3339).unwrap_or_default(),
        "currentTime": netd_common::report::rfc3339(now),
    });
    if node_eligible {
        body["nodeEligible"] = true.into();
    }
    if let Some(reason) = &check.reason {
        body["reason"] = reason.as_str().into();
    }
    let code = if check.healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [(header::CONTENT_TYPE, "application/json"), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")], body.to_string())
}

async fn healthz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    proxy_health_response(&s, true)
}

async fn livez(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    proxy_health_response(&s, false)
}

async fn readyz(State(s): State<Arc<Shared>>) -> (StatusCode, String) {
    let missing = s.readiness.read().unwrap_or_else(|p| p.into_inner()).missing();
    if missing.is_empty() {
        (StatusCode::OK, "ok\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: waiting for {}\n", missing.join(", ")))
    }
}

/// Binds `<run-dir>/netd.sock` (replacing a stale socket from an earlier run) with mode 0600 and
/// serves the status API on it.
pub async fn serve_status(path: PathBuf, shared: Arc<Shared>) -> Result<(), ServerError> {
    let err = |source| ServerError::Socket { path: path.display().to_string(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).map_err(err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    let app = Router::new().route("/status", get(status)).route("/healthz", get(healthz)).route("/livez", get(livez)).with_state(shared);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "status socket server stopped");
        }
    });
    Ok(())
}

pub async fn serve_metrics(addr: String, shared: Arc<Shared>) -> Result<Option<std::net::SocketAddr>, ServerError> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(shared);
    serve_when_free("metrics", &addr, app).await.map_err(|source| ServerError::Metrics { addr: addr.clone(), source })
}

/// The health listener (`--healthz-bind-address`): `/healthz`, `/livez`, `/readyz`. Returns the
/// address it is bound to (`None` while another process holds it: see [`serve_when_free`]).
pub async fn serve_health(addr: &str, shared: Arc<Shared>) -> Result<Option<std::net::SocketAddr>, ServerError> {
    let app = Router::new().route("/healthz", get(healthz)).route("/livez", get(livez)).route("/readyz", get(readyz)).with_state(shared);
    serve_when_free("health", addr, app).await.map_err(|source| ServerError::Health { addr: addr.to_string(), source })
}

/// Serves `app` on `addr`. While the address is in use, which is what happens during a rolling
/// update (the DaemonSet's maxSurge starts the new pod while the old one, on the same host
/// network, still serves), it is not an error: the old process keeps answering, and this one
/// binds as soon as the address is free (tried every second). Other errors (a malformed
/// address, no such local address) are.
async fn serve_when_free(what: &'static str, addr: &str, app: Router) -> std::io::Result<Option<std::net::SocketAddr>> {
    let serve = move |listener: tokio::net::TcpListener| {
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "{what} server stopped");
            }
        });
    };
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            let local = listener.local_addr()?;
            serve(listener);
            Ok(Some(local))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::warn!(%addr, "{what} listener: the address is in use (another netd during an upgrade?); binding it once it is free");
            let addr = addr.to_string();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    match tokio::net::TcpListener::bind(&addr).await {
                        Ok(listener) => {
                            tracing::info!(%addr, "{what} listener bound");
                            return serve(listener);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                        Err(e) => return tracing::error!(%addr, error = %e, "{what} listener cannot be bound"),
                    }
                }
            });
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Client side of the status socket: `GET /status` over HTTP/1.0 (no client library needed).
pub async fn fetch_status(path: &Path) -> std::io::Result<NodeStatus> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(path).await?;
    stream.write_all(b"GET /status HTTP/1.0\r\nHost: netd\r\n\r\n").await?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other("malformed HTTP response"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("status socket answered: {}", head.lines().next().unwrap_or(""))));
    }
    serde_json::from_str(body).map_err(|e| std::io::Error::other(format!("status JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn status_socket_round_trip_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("netd.sock");
        let shared = Shared::new(NodeStatus { node: "n1".into(), ..Default::default() });
        serve_status(path.clone(), shared.clone()).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let s = fetch_status(&path).await.unwrap();
        assert_eq!(s.node, "n1");
        assert!(s.now > 0);
    }

    /// `GET path` over HTTP/1.0: (status code, body).
    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: netd\r\n\r\n").as_bytes()).await.unwrap();
        let mut buf = String::new();
        stream.read_to_string(&mut buf).await.unwrap();
        let (head, body) = buf.split_once("\r\n\r\n").unwrap();
        (head.split_whitespace().nth(1).unwrap().parse().unwrap(), body.to_string())
    }

    /// A dataplane whose passes fail while `failing` is set.
    struct Flaky(Arc<std::sync::atomic::AtomicBool>);

    impl netd_proxy::Backend for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn sync(&mut self, _: &netd_proxy::Plan, observe: bool) -> Result<netd_proxy::dataplane::ApplyReport, netd_proxy::dataplane::DataplaneError> {
            if self.0.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(netd_proxy::dataplane::DataplaneError::Ebpf(Box::new(std::io::Error::other("injected: nft: Operation not permitted"))));
            }
            Ok(netd_proxy::dataplane::ApplyReport { changed: true, size: 0, observed: observe })
        }
        fn remove(&mut self) -> Result<(), netd_proxy::dataplane::DataplaneError> {
            Ok(())
        }
    }

    /// kube-proxy's rule on the health listener: 200 with a JSON body while the rules are
    /// fresh; 503 (naming the error) once an update cannot be applied for longer than twice the
    /// resync interval (here 2 ms, so the wait is short); 200 again once it is applied.
    /// `/livez` follows the same rule; `/readyz` is served there too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn healthz_turns_503_while_the_service_rules_are_stale() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let shared = Shared::new(NodeStatus::default());
        shared.set_ready(|r| (r.lease, r.subnet_env) = (true, true));
        let addr = serve_health("127.0.0.1:0", shared.clone()).await.unwrap().expect("bound");
        let (code, body) = get(addr, "/healthz").await;
        assert_eq!(code, 200, "no proxy, nothing stale: {body}");

        let failing = Arc::new(AtomicBool::new(false));
        let mut cfg = netd_proxy::ProxyConfig::new(netd_proxy::NodeInfo::default(), netd_proxy::ProxyMode::Nftables);
        cfg.resync_interval = std::time::Duration::from_millis(1);
        cfg.health_bind = None;
        cfg.conntrack = false;
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(netd_proxy::ServiceSnapshot::new()));
        crate::services::spawn_proxy_with(cfg, Some(Box::new(Flaky(failing.clone()))), rx, shared.clone(), Default::default());
        let applied = |s: &Shared| s.snapshot().services.and_then(|v| v.applied_revision);
        while applied(&shared).is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let (code, body) = get(addr, "/healthz").await;
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["nodeEligible"], true);
        assert_eq!(v["lastUpdated"], v["currentTime"], "healthy: lastUpdated is now, as kube-proxy says it");
        assert!(v["currentTime"].as_str().unwrap().ends_with('Z'));

        // The dataplane starts failing and a new state is published: stale.
        failing.store(true, Ordering::SeqCst);
        let mut next = netd_proxy::ServiceSnapshot::new();
        next.revision = 2;
        tx.send(Arc::new(next)).unwrap();
        // A guard against a hang (a healthz that never turns), not a timing assertion.
        let turned = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                let (code, body) = get(addr, "/healthz").await;
                if code != 200 {
                    return (code, body);
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        });
        let (code, body) = turned.await.expect("/healthz still 200 with the service rules stale");
        assert_eq!(code, 503, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v["reason"].as_str().unwrap().contains("revision 2 not applied") && v["reason"].as_str().unwrap().contains("injected: nft"), "{body}");
        assert_eq!(get(addr, "/livez").await.0, 503);
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 200, "ready stays: the first sync was done ({body})");

        // Applied at last: fresh again.
        failing.store(false, Ordering::SeqCst);
        while applied(&shared) != Some(2) {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let (code, body) = get(addr, "/healthz").await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(get(addr, "/livez").await.0, 200);
        drop(tx);
    }

    /// A second netd on the same host network (a maxSurge rollout) does not fail on the taken
    /// health port: the first keeps answering, the second takes over once the port is free.
    #[tokio::test]
    async fn a_taken_health_port_is_bound_once_free() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let shared = Shared::new(NodeStatus::default());
        assert_eq!(serve_health(&addr.to_string(), shared).await.unwrap(), None);
        drop(held);
        let answered = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    return get(addr, "/livez").await.0;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        });
        assert_eq!(answered.await.expect("the freed port was never bound"), 200);
        assert!(serve_health("not an address", Shared::new(NodeStatus::default())).await.is_err());
    }

    #[test]
    fn readiness_lists_what_is_missing() {
        let mut r = Readiness { cni_config: Some(false), ..Default::default() };
        assert_eq!(r.missing(), ["subnet lease", "subnet.env", "CNI config"]);
        r.lease = true;
        r.subnet_env = true;
        r.cni_config = Some(true);
        assert!(r.missing().is_empty());
        r.first_service_sync = Some(false);
        assert_eq!(r.missing(), ["first service sync"]);
        r.first_service_sync = Some(true);
        r.dns = Some(false);
        assert_eq!(r.missing(), ["cluster DNS"]);
    }
}
