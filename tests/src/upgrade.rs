//! Replacing a node's netd under load, counted: DNS queries ([`DnsLoad`]), a long-lived TCP
//! connection through a ClusterIP ([`EchoStream`]) and repeated NodePort connections
//! ([`NodePortProbe`]) run while netd is replaced, the way [`Replacement`] says. Shared by the
//! upgrade test (which asserts the counts) and the upgrade bench (which prints them).

use crate::{netd_binary, set_thread_netd_env, FakeSystemd, thread_in_netns, wait_until, Cluster, DnsLoad, DnsLoadReport, Pod};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

fn join<T>(h: JoinHandle<Result<T>>) -> Result<T> {
    h.join().map_err(|_| anyhow::anyhow!("a load thread panicked"))?
}

/// One TCP connection kept busy: 1 KB written every 10 ms to an echo server, every byte read
/// back and compared. Broken if any write, read or comparison fails.
pub struct EchoStream {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<u64>>>,
}

impl EchoStream {
    pub fn start(netns: &str, addr: SocketAddr) -> Result<EchoStream> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread_in_netns(netns, move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).with_context(|| format!("connecting to {addr}"))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.set_nodelay(true)?;
            let mut echoed = 0u64;
            let mut back = vec![0u8; 1024];
            let mut round = 0u8;
            while !flag.load(Ordering::Relaxed) {
                let chunk = vec![round; 1024];
                s.write_all(&chunk).with_context(|| format!("writing to {addr} after {echoed} bytes"))?;
                s.read_exact(&mut back).with_context(|| format!("reading the echo from {addr} after {echoed} bytes"))?;
                if back != chunk {
                    bail!("the echo from {addr} differs after {echoed} bytes");
                }
                echoed += 1024;
                round = round.wrapping_add(1);
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(echoed)
        });
        Ok(EchoStream { stop, thread: Some(thread) })
    }

    /// Stops; the bytes echoed, or how the connection broke.
    pub fn finish(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        join(self.thread.take().context("finished twice")?)
    }
}

impl Drop for EchoStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What [`NodePortProbe`] counted.
#[derive(Debug, Clone, Default)]
pub struct NodePortReport {
    pub attempts: u64,
    pub answered: u64,
    /// The first few failures, as the client saw them.
    pub failures: Vec<String>,
}

/// A new TCP connection to a NodePort every `interval`, each expected to answer `expect`.
pub struct NodePortProbe {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<NodePortReport>>>,
}

impl NodePortProbe {
    pub fn start(netns: &str, addr: SocketAddr, expect: &str, interval: Duration) -> NodePortProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, expect) = (stop.clone(), expect.to_string());
        let thread = thread_in_netns(netns, move || {
            let mut r = NodePortReport::default();
            while !flag.load(Ordering::Relaxed) {
                r.attempts += 1;
                let got = (|| -> Result<String> {
                    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
                    s.set_read_timeout(Some(Duration::from_secs(3)))?;
                    let mut text = String::new();
                    s.read_to_string(&mut text)?;
                    Ok(text.trim().to_string())
                })();
                match got {
                    Ok(t) if t == expect => r.answered += 1,
                    other if r.failures.len() < 10 => r.failures.push(format!("{:?}", other.map_err(|e| e.to_string()))),
                    _ => {}
                }
                std::thread::sleep(interval);
            }
            Ok(r)
        });
        NodePortProbe { stop, thread: Some(thread) }
    }

    pub fn finish(mut self) -> Result<NodePortReport> {
        self.stop.store(true, Ordering::Relaxed);
        join(self.thread.take().context("finished twice")?)
    }
}

impl Drop for NodePortProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How netd is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replacement {
    /// As a DaemonSet rollout with maxSurge 1 does: the new netd starts beside the old one, and
    /// once it serves DNS (it has taken the sockets over, or, with the handover disabled, bound
    /// its own) the old one gets SIGTERM.
    Overlap,
    /// The overlap, but the old netd gets SIGTERM as soon as the new one has started (its status
    /// socket is up), long before it serves DNS: the old one must wait for the handover.
    OverlapEarlyStop,
    /// The anchor: SIGTERM, then start the new one.
    StopThenStart,
    /// `systemctl restart` of `Type=notify` netd: SIGTERM, then the new one started with the
    /// sockets the old one put into the file descriptor store ([`FakeSystemd`]).
    SystemdRestart,
}

/// The counts of one [`upgrade_under_load`] run.
#[derive(Debug)]
pub struct UpgradeOutcome {
    pub dns: DnsLoadReport,
    pub nodeport: NodePortReport,
    /// Bytes echoed on the long-lived connection, or how it broke.
    pub stream: Result<u64, String>,
    /// From starting the new netd (or stopping the old one) to the old one gone and the new one
    /// serving.
    pub replace_took: Duration,
    /// The kernel state netd made (nft tables, routes, lo addresses) before the replacement,
    /// and after netd was stopped at the end (must be the same: a stop flushes nothing).
    pub state_before: String,
    pub state_after_stop: String,
    /// With [`Replacement::SystemdRestart`]: what netd told systemd, in order.
    pub systemd_messages: Vec<String>,
}

/// What a DaemonSet runs on every node here: services by nftables, cluster DNS.
pub const NETD_ARGS: &[&str] = &["--proxy-mode", "nftables", "--cluster-dns-ip", "10.96.0.10", "--dns-upstream", "198.18.0.1:53"];
const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

fn manifest(backend: &Pod) -> String {
    let svc = |name: &str, ty: &str, ip: &str, port: u16, target: u16, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: {ty}\n  clusterIP: {ip}\n  ports:\n  - name: p\n    protocol: TCP\n    port: {port}\n    targetPort: {target}\n{extra}---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- name: p\n  protocol: TCP\n  port: {target}\nendpoints:\n- addresses: [\"{}\"]\n  conditions:\n    ready: true\n  nodeName: node1\n---\n",
            backend.ip
        )
    };
    [svc("web", "NodePort", "10.96.0.50", 80, 8080, "    nodePort: 30080\n"), svc("echo", "ClusterIP", "10.96.0.51", 5201, 5201, "")].concat()
}

fn apply(c: &Cluster, manifest: &str) -> Result<()> {
    let bin = netd_binary()?;
    let mut cmd = c.underlay().command(&[bin.to_str().context("path")?, "apply", "-f", "-", "--etcd-endpoints", &c.etcd().endpoint()]);
    cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    child.stdin.take().context("stdin")?.write_all(manifest.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "netd apply failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// What netd leaves in a node's kernel: nft tables, routes, the addresses on lo.
fn kernel_state(c: &Cluster) -> Result<String> {
    let ns = c.node(0).ns();
    Ok(format!("{}\n{}\n{}", ns.run(&["nft", "list", "tables"])?, ns.run(&["ip", "route"])?, ns.run(&["ip", "-4", "-o", "addr", "show", "dev", "lo"])?))
}

fn dns_serving(c: &Cluster, processes: usize) -> bool {
    c.node(0).log().matches("cluster DNS serving").count() >= processes
}

/// Two nodes with netd ([`NETD_ARGS`]); pod `a` on node0 (the node upgraded) and `b` on node1
/// (backend of NodePort `web` 30080 and ClusterIP `echo` 10.96.0.51:5201). While `rate` DNS
/// queries/s go from `a` to the cluster DNS IP, a connection from `a` to `echo` stays busy and the
/// underlay connects to node0's NodePort every 50 ms, node0's netd is replaced as `how` says.
/// At the end netd on node0 is stopped, to compare the kernel state with the one before.
/// `handover: false` runs every netd with `--dns-handover=false` (the anchor).
pub fn upgrade_under_load(how: Replacement, rate: u32, handover: bool) -> Result<UpgradeOutcome> {
    set_thread_netd_env(if handover { &[] } else { &[("NETD_DNS_HANDOVER", "false")] });
    let mut c = Cluster::new(2)?;
    c.write_network_config(VXLAN)?;
    let systemd = match how {
        Replacement::SystemdRestart => Some(FakeSystemd::new()?),
        _ => None,
    };
    match &systemd {
        Some(sd) => c.node_mut(0).start_netd_via(NETD_ARGS, |ns, args| sd.launch(ns, args))?,
        None => c.node_mut(0).start_netd(NETD_ARGS)?,
    }
    c.node_mut(1).start_netd(NETD_ARGS)?;
    for i in 0..2 {
        c.node_mut(i).wait_ready(WAIT)?;
    }
    let a = c.node_mut(0).add_cni_pod("a")?;
    let b = c.node_mut(1).add_cni_pod("b")?;
    let _web = b.spawn(&["socat", "TCP-LISTEN:8080,fork,reuseaddr", "SYSTEM:echo b"], None)?;
    let _echo = b.spawn(&["socat", "TCP-LISTEN:5201,fork,reuseaddr", "PIPE"], None)?;
    apply(&c, &manifest(&b))?;
    let nodeport: SocketAddr = SocketAddr::new(c.node(0).ip().into(), 30080);
    wait_until(WAIT, POLL, || {
        let out = a.exec(&["dig", "+time=1", "+tries=1", "+short", "@10.96.0.10", "web.default.svc.cluster.local"])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim() == "10.96.0.50")
    })?;
    wait_until(WAIT, POLL, || {
        let out = c.underlay().exec(&["socat", "-T", "2", "-", &format!("TCP:{nodeport},connect-timeout=2")])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim() == "b")
    })?;
    wait_until(WAIT, POLL, || Ok(a.exec(&["socat", "-T", "2", "/dev/null", "TCP:10.96.0.51:5201,connect-timeout=2"])?.status.success()))?;
    let state_before = kernel_state(&c)?;

    let dns = DnsLoad::start(Some(a.ns.name()), "10.96.0.10:53".parse()?, "web.default.svc.cluster.local", rate, 8)?;
    let stream = EchoStream::start(a.ns.name(), "10.96.0.51:5201".parse()?)?;
    let probe = NodePortProbe::start(c.underlay().name(), nodeport, "b", Duration::from_millis(50));
    std::thread::sleep(Duration::from_secs(1));

    let started = Instant::now();
    match how {
        Replacement::Overlap => {
            c.node_mut(0).start_successor_netd(NETD_ARGS)?;
            wait_until(WAIT, Duration::from_millis(20), || {
                let log = c.node(0).log();
                Ok(dns_serving(&c, 2) && (!handover || log.contains("handed over to a successor")))
            })
            .context("the new netd did not take over")?;
            c.node_mut(0).stop_predecessor_netd()?;
        }
        Replacement::OverlapEarlyStop => {
            use std::os::unix::fs::MetadataExt;
            let sock = c.node(0).run_dir().join("netd.sock");
            let old = std::fs::metadata(&sock)?.ino();
            c.node_mut(0).start_successor_netd(NETD_ARGS)?;
            wait_until(WAIT, Duration::from_millis(5), || Ok(std::fs::metadata(&sock).is_ok_and(|m| m.ino() != old))).context("the new netd did not start")?;
            c.node_mut(0).stop_predecessor_netd()?;
            wait_until(WAIT, Duration::from_millis(20), || Ok(dns_serving(&c, 2))).context("the new netd does not serve DNS")?;
        }
        Replacement::StopThenStart | Replacement::SystemdRestart => {
            c.node_mut(0).stop_netd()?;
            match &systemd {
                Some(sd) => c.node_mut(0).start_netd_via(NETD_ARGS, |ns, args| sd.launch(ns, args))?,
                None => c.node_mut(0).start_netd(NETD_ARGS)?,
            }
            wait_until(WAIT, Duration::from_millis(20), || Ok(dns_serving(&c, 2))).context("the new netd does not serve DNS")?;
        }
    }
    let replace_took = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let stream = stream.finish().map_err(|e| format!("{e:#}"));
    let nodeport = probe.finish()?;
    let dns = dns.finish();

    c.node_mut(0).stop_netd()?;
    let state_after_stop = kernel_state(&c)?;
    let systemd_messages = systemd.map(|sd| sd.messages()).unwrap_or_default();
    Ok(UpgradeOutcome { dns, nodeport, stream, replace_took, state_before, state_after_stop, systemd_messages })
}
