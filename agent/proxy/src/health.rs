//! healthCheckNodePort servers: for each service with externalTrafficPolicy Local, an HTTP
//! endpoint answering 200 while this node has local endpoints and 503 otherwise, with
//! kube-proxy's JSON body, so an external load balancer only sends traffic to nodes that can
//! serve it locally.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::NsName;

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
