//! [`Cluster`]: underlay + etcd + n nodes, torn down in a safe order.

use crate::cmd::{self, check, command};
use crate::etcd::Etcd;
use crate::netns::{reap_stale_namespaces, Netns};
use crate::node::Node;
use anyhow::{Context, Result};
use std::net::Ipv4Addr;

/// Address of `br0` in the underlay namespace; etcd listens here and it is
/// every node's default gateway.
pub const UNDERLAY_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// flannel's default etcd prefix, which netd keeps for drop-in
/// compatibility.
pub const DEFAULT_ETCD_PREFIX: &str = "/coreos.com/network";

/// Lines of each log shown by [`Cluster::dump_logs`].
const DUMP_LINES: usize = 80;

/// A test cluster: an "underlay" namespace (bridge `br0`, 198.18.0.1/24,
/// etcd) and nodes attached to it.
///
/// Dropping it stops everything: netd on every node first (so no daemon
/// sees its network vanish under it), then the nodes' namespaces, etcd,
/// and the underlay. If the drop happens during a panic, the logs are
/// printed first.
#[derive(Debug)]
pub struct Cluster {
    // Field order is drop order after `Drop::drop` has stopped netd.
    nodes: Vec<Node>,
    etcd: Etcd,
    underlay: Netns,
    prefix: String,
}

impl Cluster {
    /// Builds the underlay, starts etcd on 198.18.0.1:2379 and adds
    /// `n_nodes` nodes. Reaps namespaces left by dead test processes first.
    /// If any step fails, what was built so far is torn down.
    pub fn new(n_nodes: usize) -> Result<Cluster> {
        Self::build(n_nodes, false)
    }

    /// Like [`Cluster::new`], but etcd serves TLS only and requires client certificates
    /// (a fresh CA and certificates made with openssl; see [`Etcd::tls_files`]). netd must be
    /// started with the `--etcd-*file` flags from [`Cluster::netd_tls_args`].
    pub fn new_tls(n_nodes: usize) -> Result<Cluster> {
        Self::build(n_nodes, true)
    }

    /// The `--etcd-cafile/--etcd-certfile/--etcd-keyfile` flags for a TLS cluster.
    pub fn netd_tls_args(&self) -> Vec<String> {
        match self.etcd.tls_files() {
            Some(t) => vec![
                "--etcd-cafile".into(),
                t.ca.display().to_string(),
                "--etcd-certfile".into(),
                t.cert.display().to_string(),
                "--etcd-keyfile".into(),
                t.key.display().to_string(),
            ],
            None => Vec::new(),
        }
    }

    fn build(n_nodes: usize, tls: bool) -> Result<Cluster> {
        reap_stale_namespaces();
        let underlay = Netns::new("underlay")?;
        underlay.ip(&["link", "add", "br0", "type", "bridge"])?;
        underlay.ip(&[
            "addr",
            "add",
            &format!("{UNDERLAY_GATEWAY}/24"),
            "dev",
            "br0",
        ])?;
        underlay.ip(&["link", "set", "br0", "up"])?;
        let etcd = if tls { Etcd::new_tls(&underlay, UNDERLAY_GATEWAY) } else { Etcd::new(&underlay, UNDERLAY_GATEWAY) }
            .context("starting etcd")?;
        let mut cluster = Cluster {
            nodes: Vec::new(),
            etcd,
            underlay,
            prefix: DEFAULT_ETCD_PREFIX.to_string(),
        };
        for _ in 0..n_nodes {
            cluster.add_node()?;
        }
        Ok(cluster)
    }

    /// Adds a node (same recipe as in `new`); returns its index.
    pub fn add_node(&mut self) -> Result<usize> {
        let index = self.nodes.len();
        let node = Node::new(index, &self.underlay, &self.etcd.endpoint())
            .with_context(|| format!("creating node{index}"))?;
        self.nodes.push(node);
        Ok(index)
    }

    /// Node `i`. Panics if there is no such node.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Node `i`, mutably (to start/stop netd, add pods). Panics if there is
    /// no such node.
    pub fn node_mut(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i]
    }

    /// All nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// All nodes, mutably.
    pub fn nodes_mut(&mut self) -> &mut [Node] {
        &mut self.nodes
    }

    /// Starts netd on every node with the same extra arguments.
    pub fn start_netd_all(&mut self, extra_args: &[&str]) -> Result<()> {
        for node in &mut self.nodes {
            node.start_netd(extra_args)?;
        }
        Ok(())
    }

    /// The etcd server.
    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// The etcd server, mutably (to `stop`/`start` it).
    pub fn etcd_mut(&mut self) -> &mut Etcd {
        &mut self.etcd
    }

    /// The underlay namespace (bridge `br0`, etcd).
    pub fn underlay(&self) -> &Netns {
        &self.underlay
    }

    /// Key prefix used by [`Cluster::write_network_config`].
    pub fn etcd_prefix(&self) -> &str {
        &self.prefix
    }

    /// Changes the prefix used by [`Cluster::write_network_config`]. netd
    /// must be told too (through `extra_args` of `start_netd`).
    pub fn set_etcd_prefix(&mut self, prefix: &str) {
        self.prefix = prefix.trim_end_matches('/').to_string();
    }

    /// Puts `<prefix>/config` (flannel's network config JSON).
    pub fn write_network_config(&self, json: &str) -> Result<()> {
        self.etcd.put(&format!("{}/config", self.prefix), json)
    }

    /// `netd apply -f -` of `manifest` run on the underlay (where etcd is), as an operator would;
    /// its output.
    pub fn netd_apply(&self, manifest: &str) -> Result<String> {
        use std::io::Write;
        let bin = crate::netd_binary()?;
        let mut cmd = self.underlay.command(&[bin.to_str().context("non-UTF-8 netd path")?, "apply", "-f", "-", "--etcd-endpoints", &self.etcd.endpoint()]);
        cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn()?;
        child.stdin.take().context("stdin")?.write_all(manifest.as_bytes())?;
        let out = child.wait_with_output()?;
        anyhow::ensure!(out.status.success(), "netd apply failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Names of every namespace the cluster owns (underlay and nodes; pods
    /// are owned by their [`crate::Pod`]).
    pub fn namespace_names(&self) -> Vec<String> {
        std::iter::once(self.underlay.name())
            .chain(self.nodes.iter().map(|n| n.ns().name()))
            .map(str::to_string)
            .collect()
    }

    /// Prints, to stderr, each node's netd log tail with its addresses and
    /// routes, then the etcd log tail. Called automatically when the
    /// cluster is dropped during a panic.
    pub fn dump_logs(&self) {
        let mut out = String::new();
        for node in &self.nodes {
            let ns = node.ns().name();
            out.push_str(&format!(
                "\n===== {} ({ns}, {}) netd log: {} =====\n",
                node.name(),
                node.ip(),
                node.log_path().display()
            ));
            let log = node.log();
            if log.is_empty() {
                out.push_str("(empty)\n");
            } else {
                out.push_str(&cmd::tail(&log, DUMP_LINES));
            }
            for args in [["-br", "addr"], ["route", "show"]] {
                let mut full = vec!["-n", ns];
                full.extend_from_slice(&args);
                out.push_str(&format!("----- ip {} -----\n", args.join(" ")));
                match check(&mut command("ip", &full)) {
                    Ok(text) => out.push_str(&text),
                    Err(e) => out.push_str(&format!("{e:#}\n")),
                }
            }
        }
        out.push_str(&format!(
            "\n===== etcd log: {} =====\n",
            self.etcd.log_path().display()
        ));
        out.push_str(&cmd::tail(&self.etcd.log(), DUMP_LINES / 2));
        eprintln!("{out}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        // Stop every daemon before any namespace disappears; the fields
        // are then dropped in declaration order: nodes, etcd, underlay.
        for node in &mut self.nodes {
            if let Err(e) = node.kill_netd() {
                eprintln!("netd-tests: cannot kill netd on {}: {e:#}", node.name());
            }
        }
    }
}
