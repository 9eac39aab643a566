//! [`Node`]: one Kubernetes node = one namespace on the underlay, running
//! (optionally) netd, hosting pods.

use crate::cmd::{self, kill_and_reap, read_log, terminate};
use crate::netd_bin::netd_binary;
use crate::netns::{tempdir, Netns};
use crate::pod::Pod;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::thread::sleep;
use std::time::{Duration, Instant};

thread_local! {
    static NETD_ENV: std::cell::RefCell<Vec<(String, String)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Environment variables every netd started *from this thread* gets, after the standard ones
/// (a test runs on its own thread: this varies one setting, e.g. `NETD_UDP_DATAPATH`, across
/// a whole scenario without threading it through every call).
pub fn set_thread_netd_env(vars: &[(&str, &str)]) {
    NETD_ENV.with(|e| *e.borrow_mut() = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
}

/// Test bridge pods are attached to. Not `cni0`, so it can never be
/// confused with what a CNI plugin (or netd) creates.
const POD_BRIDGE: &str = "tbr0";

/// How long `stop_netd` lets netd shut down before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The pod subnet as configured on `tbr0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PodSubnet {
    gateway: Ipv4Addr,
    prefix_len: u8,
    mtu: u32,
}

/// A node of the cluster: namespace `ntb-...-node<i>` with `eth0` =
/// 198.18.0.(10+i)/24 on the underlay bridge and a default route via
/// 198.18.0.1, plus a temp dir holding netd's `run/`, `state/` and log.
#[derive(Debug)]
pub struct Node {
    index: usize,
    netd: Option<Child>,
    /// The netd being replaced, while its successor starts ([`Node::start_successor_netd`]).
    predecessor: Option<Child>,
    etcd_endpoint: String,
    ip: Ipv4Addr,
    pod_subnet: Option<PodSubnet>,
    next_host: u32,
    next_veth: u32,
    // Drop order: the namespace (and anything left in it) before the dir.
    ns: Netns,
    dir: tempfile::TempDir,
}

impl Node {
    /// Builds node `index`: namespace, veth to the underlay bridge, address,
    /// default route, IP forwarding.
    pub(crate) fn new(index: usize, underlay: &Netns, etcd_endpoint: &str) -> Result<Node> {
        let host = u8::try_from(10 + index)
            .ok()
            .filter(|h| *h < 255)
            .with_context(|| format!("node index {index} does not fit in 198.18.0.0/24"))?;
        let ip = Ipv4Addr::new(198, 18, 0, host);
        let name = format!("node{index}");
        let ns = Netns::new(&name)?;
        let dir = tempdir(&name)?;
        std::fs::create_dir(dir.path().join("run"))?;
        std::fs::create_dir(dir.path().join("state"))?;

        // Created from inside the underlay namespace with the peer placed
        // straight into the node namespace: no link ever exists in the
        // root namespace, not even briefly.
        let host_if = format!("n{index}");
        underlay.ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        underlay.ip(&["link", "set", &host_if, "master", "br0", "up"])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "mtu", "1500", "up"])?;
        // netd finds its interface through the default route, like flanneld.
        ns.ip(&["route", "add", "default", "via", "198.18.0.1"])?;
        ns.run(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;

        Ok(Node {
            index,
            netd: None,
            predecessor: None,
            etcd_endpoint: etcd_endpoint.to_string(),
            ip,
            pod_subnet: None,
            next_host: 2,
            next_veth: 0,
            ns,
            dir,
        })
    }

    /// Position in the cluster (0-based).
    pub fn index(&self) -> usize {
        self.index
    }

    /// `node<i>`, also netd's `--node-name`.
    pub fn name(&self) -> String {
        format!("node{}", self.index)
    }

    /// The node's namespace.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// Underlay address of `eth0` (198.18.0.(10+i)).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// netd's `--run-dir` (subnet.env lands here).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// netd's `--state-dir`.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The node's temp dir (netd's run and state dirs, its log; fixtures put their files here).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Where this node's netd writes its CNI config (10-netd.conflist).
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.path().join("cni-conf")
    }

    /// netd's stdout+stderr, appended across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("netd.log")
    }

    /// Contents of the netd log (empty if netd never ran).
    pub fn log(&self) -> String {
        read_log(&self.log_path())
    }

    /// Spawns `netd run` inside the node namespace with the standard test
    /// flags followed by `extra_args`, env `NETD_LOG=netd=debug,info` (our debug lines, not the etcd client's HTTP/2 chatter).
    pub fn start_netd(&mut self, extra_args: &[&str]) -> Result<()> {
        self.start_netd_via(extra_args, |ns, args| Ok(ns.command(args)))
    }

    /// [`Node::start_netd`] with the command made by `launch` from the namespace and netd's
    /// command line (e.g. to pass descriptors and `LISTEN_FDS` as systemd does).
    pub fn start_netd_via(&mut self, extra_args: &[&str], launch: impl FnOnce(&Netns, &[&str]) -> Result<std::process::Command>) -> Result<()> {
        if self.netd_running() {
            bail!("netd already running on {}", self.name());
        }
        let bin = netd_binary()?;
        let bin = bin.to_str().context("non-UTF-8 netd path")?;
        let run = self.run_dir();
        let state = self.state_dir();
        let cni_conf = self.cni_conf_dir();
        let name = self.name();
        let mut args = vec![
            bin,
            "run",
            "--etcd-endpoints",
            &self.etcd_endpoint,
            "--run-dir",
            run.to_str().context("non-UTF-8 temp dir")?,
            "--state-dir",
            state.to_str().context("non-UTF-8 temp dir")?,
            "--node-name",
            &name,
            "--resync-interval",
            "1s",
            // Never the host's /etc/cni/net.d: namespaces share the file system.
            "--cni-conf-dir",
            cni_conf.to_str().context("non-UTF-8 temp dir")?,
        ];
        args.extend_from_slice(extra_args);

        let log = self.log_path();
        let mut command = launch(&self.ns, &args)?;
        command.env("NETD_LOG", "netd=debug,info").env("RUST_BACKTRACE", "1");
        NETD_ENV.with(|e| {
            for (k, v) in e.borrow().iter() {
                command.env(k, v);
            }
        });
        // A marker line separates runs in the appended log.
        writeln!(
            cmd::append_file(&log)?,
            "=== netd-tests: starting `{}` ===",
            cmd::describe(&command)
        )?;
        cmd::log_stdio(&mut command, Some(&log))?;
        let child = command
            .spawn()
            .with_context(|| format!("cannot spawn `{}`", cmd::describe(&command)))?;
        self.netd = Some(child);
        Ok(())
    }

    /// Runs `netd status [args]` against this node's netd (its run dir), in its namespace:
    /// (exit code, stdout).
    pub fn netd_status(&self, args: &[&str]) -> Result<(i32, String)> {
        let bin = netd_binary()?;
        let run = self.run_dir();
        let mut cmd = vec![bin.to_str().context("non-UTF-8 netd path")?, "status", "--run-dir", run.to_str().context("non-UTF-8 temp dir")?];
        cmd.extend_from_slice(args);
        let out = self.ns.exec(&cmd)?;
        Ok((out.status.code().context("netd status killed by a signal")?, String::from_utf8_lossy(&out.stdout).into_owned()))
    }

    /// True while the netd started by [`Node::start_netd`] is running.
    pub fn netd_running(&mut self) -> bool {
        matches!(self.netd.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Pid of netd, if one was started and not yet stopped.
    pub fn netd_pid(&self) -> Option<u32> {
        self.netd.as_ref().map(Child::id)
    }

    /// SIGTERM, then wait up to 10 s, then SIGKILL. Returns the exit status
    /// (`None` if netd was not started), so a test can check for a clean
    /// shutdown with `status.success()`.
    pub fn stop_netd(&mut self) -> Result<Option<ExitStatus>> {
        match self.netd.take() {
            Some(mut child) => Ok(Some(terminate(&mut child, STOP_GRACE)?)),
            None => Ok(None),
        }
    }

    /// Starts a second netd beside the running one, as an upgrade does (a DaemonSet rollout with
    /// maxSurge 1, a new binary): same run dir, same flags plus `extra_args`. The running one
    /// becomes the predecessor, stopped by [`Node::stop_predecessor_netd`]; from now on
    /// [`Node::netd_pid`], [`Node::stop_netd`] and the rest mean the successor.
    pub fn start_successor_netd(&mut self, extra_args: &[&str]) -> Result<()> {
        if self.predecessor.is_some() {
            bail!("an upgrade of netd on {} is already under way", self.name());
        }
        let running = self.netd.take().context("no netd running to replace")?;
        match self.start_netd(extra_args) {
            Ok(()) => {
                self.predecessor = Some(running);
                Ok(())
            }
            Err(e) => {
                self.netd = Some(running);
                Err(e)
            }
        }
    }

    /// Pid of the netd being replaced.
    pub fn predecessor_pid(&self) -> Option<u32> {
        self.predecessor.as_ref().map(Child::id)
    }

    /// SIGTERM to the netd being replaced (as the kubelet sends once the new pod is ready), then
    /// up to 10 s, then SIGKILL. Its exit status.
    pub fn stop_predecessor_netd(&mut self) -> Result<Option<ExitStatus>> {
        match self.predecessor.take() {
            Some(mut child) => Ok(Some(terminate(&mut child, STOP_GRACE)?)),
            None => Ok(None),
        }
    }

    /// SIGKILL (a crash, as far as netd can tell) and reap.
    pub fn kill_netd(&mut self) -> Result<Option<ExitStatus>> {
        match self.netd.take() {
            Some(mut child) => Ok(Some(kill_and_reap(&mut child)?)),
            None => Ok(None),
        }
    }

    /// Parses `<run>/subnet.env` (`KEY=VALUE` lines; blanks and `#`
    /// comments skipped).
    pub fn subnet_env(&self) -> Result<HashMap<String, String>> {
        let path = self.run_dir().join("subnet.env");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(parse_env(&text))
    }

    /// Polls until the node can serve pods: `subnet.env` written and netd's CNI config in place.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        self.wait_subnet_env(timeout)?;
        let conflist = self.cni_conf_dir().join("10-netd.conflist");
        crate::wait_until(timeout, Duration::from_millis(100), || Ok(conflist.exists()))
            .with_context(|| format!("no {} on {}", conflist.display(), self.name()))
    }

    /// Polls until `subnet.env` exists and has `FLANNEL_SUBNET`. Fails
    /// early, with the log tail, if netd was started and exited.
    pub fn wait_subnet_env(&mut self, timeout: Duration) -> Result<HashMap<String, String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.subnet_env() {
                Ok(env) if env.contains_key("FLANNEL_SUBNET") => return Ok(env),
                Ok(_) => "subnet.env has no FLANNEL_SUBNET".to_string(),
                Err(e) => format!("{e:#}"),
            };
            if let Some(child) = self.netd.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "netd on {} exited ({status}) before writing subnet.env; log tail:\n{}",
                        self.name(),
                        cmd::tail(&self.log(), 40)
                    );
                }
            }
            if Instant::now() >= deadline {
                bail!("no subnet.env on {} after {timeout:?}: {last}", self.name());
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// Attaches a new pod namespace to this node, without any CNI plugin:
    /// bridge `tbr0` (created on first use) holds FLANNEL_SUBNET's gateway
    /// address; the pod gets `eth0` with the next free host address, MTU
    /// FLANNEL_MTU and a default route via the gateway. Needs `subnet.env`
    /// (written by netd, or by the test).
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        let env = self
            .subnet_env()
            .context("add_pod needs subnet.env (wait_subnet_env, or write one)")?;
        let subnet = parse_pod_subnet(&env)?;
        self.ensure_bridge(subnet)?;

        let ip = self.allocate_ip(subnet)?;
        let ns = Netns::new(&format!("n{}-{name}", self.index))?;
        let host_if = format!("tv{}", self.next_veth);
        self.next_veth += 1;
        let mtu = subnet.mtu.to_string();
        self.ns.ip(&[
            "link",
            "add",
            &host_if,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "mtu",
            &mtu,
            "netns",
            ns.name(),
        ])?;
        self.ns
            .ip(&["link", "set", &host_if, "master", POD_BRIDGE, "up"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{ip}/{}", subnet.prefix_len),
            "dev",
            "eth0",
        ])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &subnet.gateway.to_string(),
        ])?;
        Ok(Pod {
            ns,
            ip,
            gateway: subnet.gateway,
            prefix_len: subnet.prefix_len,
            node: self.index,
        })
    }

    /// Creates a pod the way a container runtime does: a new network namespace, then `netd-cni ADD`
    /// with the plugin configuration from the conflist netd wrote into [`Node::cni_conf_dir`].
    /// The pod's address and gateway come from the plugin's result.
    pub fn add_cni_pod(&mut self, name: &str) -> Result<Pod> {
        let conflist_path = self.cni_conf_dir().join("10-netd.conflist");
        let text = std::fs::read_to_string(&conflist_path)
            .with_context(|| format!("reading {} (has netd written it yet?)", conflist_path.display()))?;
        let list: serde_json::Value = serde_json::from_str(&text)?;
        let mut conf = list["plugins"][0].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        self.cni_add(&crate::netd_cni_binary()?, &conf, name)
    }

    /// Creates pod `name` in a new namespace with CNI plugin `bin` (`ADD`, run in this node's
    /// namespace with `CNI_PATH=/usr/lib/cni` for the plugins it delegates to) and plugin
    /// configuration `conf`; the pod's address and gateway come from the plugin's result.
    pub fn cni_add(&self, bin: &Path, conf: &serde_json::Value, name: &str) -> Result<Pod> {
        let ns = Netns::new(&format!("n{}-{name}", self.index))?;
        let netns_path = format!("/var/run/netns/{}", ns.name());
        let container_id = format!("{}-{name}", ns.name());
        let mut cmd = self.ns.command(&[bin.to_str().context("non-UTF-8 path")?]);
        cmd.env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", &container_id)
            .env("CNI_NETNS", &netns_path)
            .env("CNI_IFNAME", "eth0")
            // As kubelet's runtimes pass them (the reference plugins refuse unknown keys without IgnoreUnknown).
            .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"))
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("spawning {}", bin.display()))?;
        child.stdin.take().context("no stdin")?.write_all(conf.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("{} ADD for {name} failed ({}): {stdout} {}", bin.display(), out.status, String::from_utf8_lossy(&out.stderr));
        }
        let result: serde_json::Value = serde_json::from_str(&stdout).with_context(|| format!("{} result: {stdout}", bin.display()))?;
        let addr = result["ips"][0]["address"].as_str().context("result without ips[0].address")?;
        let (ip, len) = addr.split_once('/').context("address without prefix length")?;
        let gateway = result["ips"][0]["gateway"].as_str().context("result without a gateway")?;
        Ok(Pod { ns, ip: ip.parse()?, gateway: gateway.parse()?, prefix_len: len.parse()?, node: self.index })
    }

    fn ensure_bridge(&mut self, subnet: PodSubnet) -> Result<()> {
        match self.pod_subnet {
            Some(existing) if existing == subnet => return Ok(()),
            Some(existing) => bail!(
                "{POD_BRIDGE} on {} is set up for {}/{} mtu {}, but subnet.env now says \
                 {}/{} mtu {}",
                self.name(),
                existing.gateway,
                existing.prefix_len,
                existing.mtu,
                subnet.gateway,
                subnet.prefix_len,
                subnet.mtu
            ),
            None => {}
        }
        self.ns.ip(&["link", "add", POD_BRIDGE, "type", "bridge"])?;
        let addr = format!("{}/{}", subnet.gateway, subnet.prefix_len);
        self.ns.ip(&["addr", "add", &addr, "dev", POD_BRIDGE])?;
        let mtu = subnet.mtu.to_string();
        self.ns
            .ip(&["link", "set", POD_BRIDGE, "mtu", &mtu, "up"])?;
        self.pod_subnet = Some(subnet);
        Ok(())
    }

    /// Next host address of the subnet, skipping the gateway, the network
    /// and broadcast addresses.
    fn allocate_ip(&mut self, subnet: PodSubnet) -> Result<Ipv4Addr> {
        let host_bits = 32 - u32::from(subnet.prefix_len);
        let size = 1u64 << host_bits;
        let mask = if host_bits == 32 {
            0
        } else {
            u32::MAX << host_bits
        };
        let network = u32::from(subnet.gateway) & mask;
        loop {
            let host = self.next_host;
            if u64::from(host) >= size - 1 {
                bail!(
                    "pod subnet {}/{} of {} is full",
                    subnet.gateway,
                    subnet.prefix_len,
                    self.name()
                );
            }
            self.next_host += 1;
            let ip = Ipv4Addr::from(network | host);
            if ip != subnet.gateway {
                return Ok(ip);
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.predecessor.take() {
            if let Err(e) = kill_and_reap(&mut child) {
                eprintln!("netd-tests: cannot kill the replaced netd on {}: {e:#}", self.name());
            }
        }
        if let Err(e) = self.kill_netd() {
            eprintln!("netd-tests: cannot kill netd on {}: {e:#}", self.name());
        }
    }
}

fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn parse_pod_subnet(env: &HashMap<String, String>) -> Result<PodSubnet> {
    let subnet = env
        .get("FLANNEL_SUBNET")
        .context("subnet.env has no FLANNEL_SUBNET")?;
    let (gw, len) = subnet
        .split_once('/')
        .with_context(|| format!("FLANNEL_SUBNET={subnet} is not ADDR/LEN"))?;
    let gateway: Ipv4Addr = gw
        .parse()
        .with_context(|| format!("FLANNEL_SUBNET={subnet}"))?;
    let prefix_len: u8 = len
        .parse()
        .with_context(|| format!("FLANNEL_SUBNET={subnet}"))?;
    if !(8..=30).contains(&prefix_len) {
        bail!("FLANNEL_SUBNET={subnet}: prefix length out of range");
    }
    let mtu = env
        .get("FLANNEL_MTU")
        .context("subnet.env has no FLANNEL_MTU")?;
    let mtu: u32 = mtu.parse().with_context(|| format!("FLANNEL_MTU={mtu}"))?;
    Ok(PodSubnet {
        gateway,
        prefix_len,
        mtu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flannel_subnet_env() {
        let env = parse_env(
            "# comment\nFLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\n\
             FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        );
        assert_eq!(env["FLANNEL_IPMASQ"], "true");
        assert_eq!(
            parse_pod_subnet(&env).unwrap(),
            PodSubnet {
                gateway: Ipv4Addr::new(10, 244, 5, 1),
                prefix_len: 24,
                mtu: 1450
            }
        );
    }

    #[test]
    fn rejects_incomplete_subnet_env() {
        assert!(parse_pod_subnet(&parse_env("FLANNEL_SUBNET=10.244.5.1/24")).is_err());
        assert!(parse_pod_subnet(&parse_env("FLANNEL_SUBNET=10.244.5.1\nFLANNEL_MTU=1")).is_err());
    }
}
