//! The status socket (`<run-dir>/netd.sock`, mode 0600: HTTP+JSON for `netd status`) and the
//! metrics listener (`/metrics`, `/healthz`, `/readyz`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

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

async fn healthz() -> &'static str {
    "ok\n"
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
    let app = Router::new().route("/status", get(status)).route("/healthz", get(healthz)).with_state(shared);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "status socket server stopped");
        }
    });
    Ok(())
}

pub async fn serve_metrics(addr: String, shared: Arc<Shared>) -> Result<(), ServerError> {
    let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|source| ServerError::Metrics { addr: addr.clone(), source })?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(shared);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
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
