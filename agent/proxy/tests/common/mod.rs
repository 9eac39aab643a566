//! Shared helpers for the proxy's root tests: running code inside a test namespace, and a
//! small "node" bed (node namespace, pods, an outside client) built on `netd-tests`.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use netd_tests::Netns;

pub const WAIT: Duration = Duration::from_secs(20);
pub const POLL: Duration = Duration::from_millis(50);

/// Runs `f` on a new thread that has entered `ns`'s network namespace (and only that thread:
/// the test process itself never leaves the root namespace, and nothing ever runs there).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        enter(&path).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// Moves the calling thread into the namespace bound at `path`.
pub fn enter(path: &str) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("open {path}"))?;
    // SAFETY: setns(2) on a descriptor we own; affects only the calling thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    anyhow::ensure!(r == 0, "setns {path}: {}", std::io::Error::last_os_error());
    Ok(())
}

/// A proxy (`run_proxy`) running on its own thread inside a namespace, fed snapshots by the
/// test. Dropping it stops the proxy (the snapshot channel closes) and joins the thread.
pub struct ProxyHandle {
    tx: Option<tokio::sync::watch::Sender<Arc<netd_proxy::ServiceSnapshot>>>,
    pub status: tokio::sync::watch::Receiver<netd_proxy::ProxyStatus>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProxyHandle {
    pub fn start(ns: &Netns, mut cfg: netd_proxy::ProxyConfig, snap: netd_proxy::ServiceSnapshot) -> ProxyHandle {
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(snap));
        let (stx, srx) = tokio::sync::watch::channel(netd_proxy::ProxyStatus::default());
        cfg.status = Some(stx);
        let path = format!("/run/netns/{}", ns.name());
        let thread = std::thread::spawn(move || {
            enter(&path).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            if let Err(e) = rt.block_on(netd_proxy::run_proxy(cfg, rx)) {
                eprintln!("run_proxy ended with an error: {e}");
            }
        });
        ProxyHandle { tx: Some(tx), status: srx, thread: Some(thread) }
    }

    pub fn publish(&self, snap: netd_proxy::ServiceSnapshot) {
        let _ = self.tx.as_ref().unwrap().send(Arc::new(snap));
    }

    /// Waits until the proxy has applied a snapshot of at least `revision`.
    pub fn wait_applied(&self, revision: i64) -> Result<()> {
        netd_tests::wait_until(WAIT, POLL, || {
            let st = self.status.borrow().clone();
            if let Some(e) = &st.last_error {
                anyhow::bail!("proxy error: {e}");
            }
            Ok(st.applied_revision.is_some_and(|r| r >= revision))
        })
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// One node in its own namespace with routed pods (a /32 veth per pod, proxy ARP on the node
/// side, as Calico does: every pod-to-pod packet crosses the node's IP stack) and an "outside"
/// host on the underlay: node eth0 198.18.0.10/24 <-> outside eth0 198.18.0.100/24.
pub struct Bed {
    pub pods: Vec<(String, Ipv4Addr, Netns)>,
    pub outside: Netns,
    pub node: Netns,
    servers: Vec<std::process::Child>,
}

pub const NODE_IP: &str = "198.18.0.10";
pub const OUTSIDE_IP: &str = "198.18.0.100";

impl Bed {
    pub fn new() -> Result<Bed> {
        netd_tests::reap_stale_namespaces();
        let node = Netns::new("pxnode")?;
        let outside = Netns::new("pxout")?;
        node.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", outside.name()])?;
        node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"])?;
        node.ip(&["link", "set", "eth0", "up"])?;
        outside.ip(&["addr", "add", &format!("{OUTSIDE_IP}/24"), "dev", "eth0"])?;
        outside.ip(&["link", "set", "eth0", "up"])?;
        // External and load-balancer IPs are routed to the node, as a router would.
        outside.ip(&["route", "add", "198.18.0.192/26", "via", NODE_IP])?;
        node.ip(&["route", "add", "default", "via", OUTSIDE_IP])?;
        node.run(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
        Ok(Bed { pods: Vec::new(), outside, node, servers: Vec::new() })
    }

    /// Adds pod `name` with address 10.244.1.`host`/32.
    pub fn add_pod(&mut self, name: &str, host: u8) -> Result<Ipv4Addr> {
        let ip = Ipv4Addr::new(10, 244, 1, host);
        let ns = Netns::new(&format!("px{name}"))?;
        let hif = format!("vp{host}");
        self.node.ip(&["link", "add", &hif, "type", "veth", "peer", "name", "eth0", "netns", ns.name()])?;
        self.node.ip(&["link", "set", &hif, "up"])?;
        self.node.run(&["sysctl", "-q", "-w", &format!("net.ipv4.conf.{hif}.proxy_arp=1")])?;
        self.node.ip(&["route", "add", &format!("{ip}/32"), "dev", &hif])?;
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "169.254.1.1", "dev", "eth0"])?;
        ns.ip(&["route", "add", "default", "via", "169.254.1.1"])?;
        self.pods.push((name.to_string(), ip, ns));
        Ok(ip)
    }

    pub fn pod(&self, name: &str) -> &Netns {
        &self.pods.iter().find(|p| p.0 == name).expect("no such pod").2
    }

    /// An HTTP server (socat) on `port` in pod `name`, answering with the pod's name.
    pub fn http_server(&mut self, name: &str, port: u16) -> Result<()> {
        let listen = format!("TCP-LISTEN:{port},fork,reuseaddr");
        // Read the whole request first: closing with unread data would reset the connection.
        let reply = format!("SYSTEM:while read l && [ ${{#l}} -gt 1 ]; do true; done; echo HTTP/1.0 200 OK; echo; echo {name}");
        let child = self.pod(name).spawn(&["socat", &listen, &reply], None)?;
        self.servers.push(child);
        Ok(())
    }

    /// A UDP echo-like server on `port` in pod `name`, answering every datagram with the pod's
    /// name and the client's address.
    pub fn udp_server(&mut self, name: &str, port: u16) -> Result<()> {
        let listen = format!("UDP-RECVFROM:{port},fork,reuseaddr");
        let reply = format!("SYSTEM:echo {name} $SOCAT_PEERADDR");
        let child = self.pod(name).spawn(&["socat", &listen, &reply], None)?;
        self.servers.push(child);
        Ok(())
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `curl` from `ns`: `Ok(body)` on success, `Err(exit code)` on failure (7: refused).
pub fn curl(ns: &Netns, url: &str) -> std::result::Result<String, i32> {
    let out = ns.exec(&["curl", "-s", "--max-time", "5", url]).map_err(|_| -1)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(out.status.code().unwrap_or(-1))
    }
}

/// One UDP request from `ns` (socat), the answer trimmed.
pub fn udp(ns: &Netns, addr: &str) -> Result<String> {
    let out = ns.sh(&format!("echo ping | socat -T 2 - UDP:{addr}"))?;
    anyhow::ensure!(!out.trim().is_empty(), "no UDP answer from {addr}");
    Ok(out.trim().to_string())
}

/// Retries `f` until it returns Ok (the dataplane may be a moment behind).
pub fn eventually<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let mut last = None;
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("timed out")))
}
