//! Shared by the integration tests. They run the sources against `netd_kube::testserver`, a
//! fake API server on 127.0.0.1 that implements list and watch semantics (410 Gone, bookmarks,
//! timeouts, paging) and serves the fixtures in `testdata/`: hand-written in exactly the shape
//! kube-apiserver returns, since no real API server can run on these machines.
#![allow(dead_code)]

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netd_kube::testserver::FakeApiServer;
use netd_kube::WatchConfig;
use tokio::sync::watch;

/// A fixture's text.
pub fn fixture(name: &str) -> String {
    let path = format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

pub fn fixture_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&fixture(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// A fake server holding the Service and EndpointSlice fixtures.
pub async fn server_with_services() -> FakeApiServer {
    let server = FakeApiServer::start().await.expect("fake API server on 127.0.0.1");
    server.load(&fixture("services.json")).expect("services fixture");
    server.load(&fixture("endpointslices.json")).expect("endpointslices fixture");
    server
}

/// Short pauses so the tests run fast, and a small page size so lists take several pages.
pub fn fast() -> WatchConfig {
    WatchConfig { backoff_initial: Duration::from_millis(10), backoff_max: Duration::from_millis(100), timeout_secs: 60, page_size: 2 }
}

/// Fails the test if `f` has not finished in 30 s: a guard against hangs, not a timing assertion.
pub async fn guard<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(30), f).await {
        Ok(v) => v,
        Err(_) => panic!("test hung waiting for: {what}"),
    }
}

/// Records everything a source publishes, in order.
pub struct Recorder<T> {
    all: Arc<Mutex<Vec<T>>>,
    tick: Arc<watch::Sender<usize>>,
}

impl<T: Clone + Send + 'static> Recorder<T> {
    pub fn new() -> Self {
        Recorder { all: Arc::default(), tick: Arc::new(watch::channel(0).0) }
    }

    /// The callback to hand to `run_*_with`.
    pub fn publisher(&self) -> impl FnMut(T) -> bool + Send + 'static {
        let all = self.all.clone();
        let tick = self.tick.clone();
        move |t| {
            all.lock().unwrap().push(t);
            tick.send_modify(|n| *n += 1);
            true
        }
    }

    pub fn all(&self) -> Vec<T> {
        self.all.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.all.lock().unwrap().len()
    }

    /// Waits for a published value satisfying `pred` (the latest one is checked on each publish).
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&T) -> bool) -> T {
        let mut rx = self.tick.subscribe();
        guard(what, async {
            loop {
                if let Some(last) = self.all.lock().unwrap().last() {
                    if pred(last) {
                        return last.clone();
                    }
                }
                rx.changed().await.expect("recorder alive");
            }
        })
        .await
    }
}

/// Waits until `status` satisfies `pred`.
pub async fn wait_status<S: Clone>(what: &str, rx: &mut watch::Receiver<S>, pred: impl Fn(&S) -> bool) -> S {
    guard(what, async {
        let s = rx.wait_for(|s| pred(s)).await.expect("status sender alive");
        s.clone()
    })
    .await
}
