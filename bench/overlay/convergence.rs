//! Convergence: time from writing a peer's lease into etcd until the route
//! to its subnet exists on every node (and, after deleting it, until the
//! route is gone everywhere).
//!
//! The clock starts right before the HTTP request of the `put` leaves this
//! process: the put goes through etcd's JSON gateway over a TCP connection
//! opened from a thread that joined the underlay namespace, so no process
//! start-up (etcdctl) is counted. The clock stops when `ip monitor route`,
//! started on every node before the first put, prints the route.

use anyhow::{bail, Context, Result};
use netd_tests::Cluster;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How long one change may take before the trial counts as failed.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// One trial's outcome: slowest node's delay for the add, and for the delete.
#[derive(Debug, Clone, Copy)]
pub struct Trial {
    pub add_ms: f64,
    pub del_ms: f64,
}

/// `ip -n NS monitor route` on every node; lines arrive on one channel as
/// (node index, arrival time, line). Killed and reaped on drop.
struct Monitors {
    children: Vec<Child>,
    rx: Receiver<(usize, Instant, String)>,
}

impl Monitors {
    fn start(cluster: &Cluster) -> Result<Monitors> {
        let (tx, rx) = channel();
        let mut monitors = Monitors {
            children: Vec::new(),
            rx,
        };
        for (i, node) in cluster.nodes().iter().enumerate() {
            let mut child = Command::new("ip")
                .args(["-n", node.ns().name(), "monitor", "route"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("spawning ip monitor route")?;
            let stdout = child.stdout.take().context("no stdout")?;
            monitors.children.push(child);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((i, Instant::now(), line)).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(monitors)
    }

    /// Returns once every monitor is known to be listening: a probe route
    /// (198.19.255.254/32 on `lo`, underlay range, nothing netd manages) is
    /// added and removed on each node until its monitor has printed it.
    /// Without this the first put can beat a monitor's start-up.
    fn wait_ready(&self, cluster: &Cluster) -> Result<()> {
        const PROBE: &str = "198.19.255.254";
        let deadline = Instant::now() + TRIAL_TIMEOUT;
        let mut ready = HashSet::new();
        while ready.len() < cluster.nodes().len() {
            if Instant::now() >= deadline {
                bail!("ip monitor route did not report a probe route on every node within {TRIAL_TIMEOUT:?}");
            }
            for (i, node) in cluster.nodes().iter().enumerate() {
                if !ready.contains(&i) {
                    let probe = format!("{PROBE}/32");
                    node.ns().ip(&["route", "add", &probe, "dev", "lo"])?;
                    node.ns().ip(&["route", "del", &probe, "dev", "lo"])?;
                }
            }
            let until = Instant::now() + Duration::from_millis(100);
            while let Ok((i, _, line)) = self
                .rx
                .recv_timeout(until.saturating_duration_since(Instant::now()))
            {
                if line.contains(PROBE) {
                    ready.insert(i);
                }
            }
        }
        self.drain();
        Ok(())
    }

    fn drain(&self) {
        while self.rx.try_recv().is_ok() {}
    }

    /// Waits until every node printed a line for `subnet` (an added route,
    /// or a `Deleted` one); returns the latest arrival time.
    fn wait_all(&self, nodes: usize, subnet: &str, deleted: bool) -> Result<Instant> {
        let deadline = Instant::now() + TRIAL_TIMEOUT;
        let mut seen = HashSet::new();
        let mut last = Instant::now();
        while seen.len() < nodes {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((i, at, line)) => {
                    let is_delete = line.starts_with("Deleted");
                    let words: Vec<&str> = line.split_whitespace().collect();
                    let dst = if is_delete {
                        words.get(1)
                    } else {
                        words.first()
                    };
                    if is_delete == deleted && dst == Some(&subnet) && seen.insert(i) {
                        last = at;
                    }
                }
                Err(RecvTimeoutError::Timeout) => bail!(
                    "route {subnet} {} on only {} of {nodes} nodes after {TRIAL_TIMEOUT:?}",
                    if deleted { "removed" } else { "added" },
                    seen.len()
                ),
                Err(RecvTimeoutError::Disconnected) => bail!("ip monitor exited"),
            }
        }
        Ok(last)
    }
}

impl Drop for Monitors {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Deletes the keys it was given when dropped (a failed trial leaves no
/// fake peer behind in etcd).
struct KeyGuard<'a> {
    etcd: &'a Etcd,
    key: Option<String>,
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            if let Err(e) = self.etcd.delete(&key) {
                eprintln!("netd-bench: cannot delete {key}: {e:#}");
            }
        }
    }
}

/// Runs `trials` measured trials (after one unmeasured warm-up) against
/// the netd nodes of `cluster`.
pub fn measure(cluster: &Cluster, trials: usize) -> Result<Vec<Trial>> {
    let etcd = Etcd {
        netns: cluster.underlay().name().to_string(),
        addr: cluster
            .etcd()
            .endpoint()
            .trim_start_matches("http://")
            .to_string(),
    };
    let prefix = cluster.etcd_prefix().to_string();
    // Third octets already leased by the nodes cannot be used for fake peers.
    let taken: HashSet<u8> = cluster
        .etcd()
        .get_prefix(&format!("{prefix}/subnets/"))?
        .iter()
        .filter_map(|(k, _)| k.rsplit('/').next()?.split('.').nth(2)?.parse().ok())
        .collect();
    let octets: Vec<u8> = (150..=254u8)
        .filter(|o| !taken.contains(o))
        .take(trials + 1)
        .collect();
    if octets.len() < trials + 1 {
        bail!("not enough free /24s for {trials} trials");
    }

    let monitors = Monitors::start(cluster)?;
    monitors.wait_ready(cluster)?;
    let nodes = cluster.nodes().len();
    let mut results = Vec::new();
    for (k, octet) in octets.into_iter().enumerate() {
        let subnet = format!("10.244.{octet}.0/24");
        let key = format!("{prefix}/subnets/10.244.{octet}.0-24");
        let value = format!(
            r#"{{"PublicIP":"198.18.1.{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:aa:bb:cc:dd:{:02x}"}}}}"#,
            k + 1,
            k + 1
        );
        crate::checkpoint()?;
        monitors.drain();
        let mut guard = KeyGuard {
            etcd: &etcd,
            key: None,
        };
        let t0 = etcd.put(&key, &value)?;
        guard.key = Some(key.clone());
        let added = monitors
            .wait_all(nodes, &subnet, false)
            .map_err(|e| with_routes(e, cluster, &subnet))?;
        guard.key = None;
        let t1 = etcd.delete(&key)?;
        let removed = monitors
            .wait_all(nodes, &subnet, true)
            .map_err(|e| with_routes(e, cluster, &subnet))?;
        if k > 0 {
            results.push(Trial {
                add_ms: added.saturating_duration_since(t0).as_secs_f64() * 1e3,
                del_ms: removed.saturating_duration_since(t1).as_secs_f64() * 1e3,
            });
        }
    }
    Ok(results)
}

/// Adds to a timeout error what the nodes' routing tables actually say,
/// which tells a slow netd from a monitor that missed the event.
fn with_routes(e: anyhow::Error, cluster: &Cluster, subnet: &str) -> anyhow::Error {
    let mut msg = format!("{e:#}; the routing tables now say:");
    for node in cluster.nodes() {
        let routes = node
            .ns()
            .ip(&["route", "show", subnet])
            .unwrap_or_else(|e| format!("{e:#}"));
        msg.push_str(&format!(
            "\n  {}: ip route show {subnet}: {}",
            node.name(),
            routes.trim()
        ));
    }
    anyhow::anyhow!(msg)
}

/// etcd's v3 JSON gateway, reached from inside the underlay namespace.
struct Etcd {
    netns: String,
    /// `IP:PORT`
    addr: String,
}

impl Etcd {
    /// Puts `key`; returns when the request was sent.
    fn put(&self, key: &str, value: &str) -> Result<Instant> {
        let body = format!(r#"{{"key":"{}","value":"{}"}}"#, b64(key), b64(value));
        self.post("/v3/kv/put", body)
    }

    /// Deletes `key`; returns when the request was sent.
    fn delete(&self, key: &str) -> Result<Instant> {
        self.post("/v3/kv/deleterange", format!(r#"{{"key":"{}"}}"#, b64(key)))
    }

    /// One HTTP/1.1 POST on a fresh connection, made from a thread inside
    /// the underlay namespace (network namespaces are per thread, and the
    /// root namespace has no route to the underlay). Waits for a 200.
    fn post(&self, path: &str, body: String) -> Result<Instant> {
        let netns = format!("/run/netns/{}", self.netns);
        let addr = self.addr.clone();
        let path = path.to_string();
        let worker = std::thread::spawn(move || -> Result<Instant> {
            let ns = std::fs::File::open(&netns).with_context(|| format!("opening {netns}"))?;
            // SAFETY: setns(2) only reads the descriptor, which `ns` keeps
            // open for the duration of the call, and changes the network
            // namespace of this thread alone; the thread ends right after.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns({netns}): {}", std::io::Error::last_os_error());
            }
            let mut conn = TcpStream::connect(&addr)
                .with_context(|| format!("connecting to etcd at {addr}"))?;
            conn.set_nodelay(true)?;
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            let request = format!(
                "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let sent = Instant::now();
            conn.write_all(request.as_bytes())?;
            let mut response = String::new();
            conn.read_to_string(&mut response)?;
            if !response.starts_with("HTTP/1.1 200") {
                bail!(
                    "etcd {path}: {}",
                    response.lines().next().unwrap_or("(no response)")
                );
            }
            Ok(sent)
        });
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("etcd client thread panicked"))?
    }
}

/// Standard base64 with padding (what etcd's gateway wants for bytes).
fn b64(s: &str) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in s.as_bytes().chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn b64_matches_rfc4648_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::b64(plain), enc);
        }
    }
}
