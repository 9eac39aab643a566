//! The lifecycle test: netd's image, run by a real container runtime (podman, runc, podman's CNI
//! backend) exactly as deploy/kubernetes/netd.yaml says, on three test nodes, against the
//! Kubernetes API server stand-in; pods made by podman through netd's conflist, a Service and
//! DNS by name from those pods, cross-node traffic, an upgrade under DNS load following the
//! manifest's update strategy, and the uninstall, after which an inventory of every kernel
//! object and file of each node equals the one taken before netd was installed.
//!
//! Needs `make image` (it downloads Debian packages) and podman: `make e2e-lifecycle` runs it.
//!
//! What a kubelet would do and podman cannot is done here, as a kubelet would: hostPath
//! directories are created (DirectoryOrCreate, FileOrCreate), ConfigMap volumes written out as
//! files, init containers run to completion before the container starts, probes polled over
//! the node's address. Two things differ from a real cluster, both because the stand-in serves
//! plain HTTP without service-account tokens: netd is given a kubeconfig (NETD_KUBECONFIG,
//! mounted read-only) instead of the service account kubelet would inject; and each node's
//! resolv.conf (dnsPolicy: Default) names the underlay gateway, where nothing answers, so that
//! no query ever leaves the test bed.

use std::io::Write;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd_tests::daemonset::{podman_args, Container, Manifest, Mount, NodeFacts, PodSpec, VolumeSource};
use netd_tests::{kube_node, wait_until, Cluster, FakeApiServer, Inventory, InventoryScope, NodeHost, UNDERLAY_GATEWAY};
use serde_json::json;

const NODES: usize = 3;
const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(200);
const SERVICE_IP: &str = "10.96.0.50";
const SERVICE_NAME: &str = "web.default.svc.cluster.local";
/// Where the test mounts the stand-in's kubeconfig in netd's container.
const KUBECONFIG_DIR: &str = "/var/run/netd-test";
/// The image a rollout moves to: the same archive under a second tag.
const UPGRADE_TAG: &str = "netd:0.1.0-upgrade";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// One node: its test-bed namespace, its own file system and podman, and the DaemonSet's pod.
struct Kubelet<'a> {
    i: usize,
    host: NodeHost,
    facts: NodeFacts,
    manifest: &'a Manifest,
    kubeconfig: String,
    /// netd containers started so far (the current one last).
    generation: usize,
}

impl Kubelet<'_> {
    fn pod(&self, image: &str) -> Result<PodSpec> {
        let mut pod = PodSpec::from_manifest(self.manifest, &self.facts)?;
        for c in pod.init.iter_mut().chain(pod.containers.iter_mut()) {
            c.image = image.to_string();
        }
        Ok(pod)
    }

    /// What a kubelet does before starting containers: hostPath directories and files of type
    /// DirectoryOrCreate/FileOrCreate, ConfigMap volumes as files (and the test's kubeconfig).
    fn prepare_volumes(&self, pod: &PodSpec) -> Result<()> {
        for m in pod.all_mounts() {
            match &m.source {
                VolumeSource::HostPath { path, kind } => {
                    let Some(local) = self.host.path(path) else { continue };
                    match kind.as_str() {
                        "DirectoryOrCreate" => std::fs::create_dir_all(&local)?,
                        "FileOrCreate" => {
                            std::fs::create_dir_all(local.parent().context("file at /")?)?;
                            std::fs::OpenOptions::new().create(true).append(true).open(&local)?;
                        }
                        _ => {}
                    }
                }
                VolumeSource::ConfigMap { name } => {
                    let dir = self.configmap_dir(name);
                    std::fs::create_dir_all(&dir)?;
                    let cm = self.manifest.find("ConfigMap", Some(name)).with_context(|| format!("ConfigMap {name}"))?;
                    for (k, v) in cm["data"].as_object().into_iter().flatten() {
                        let mut text = v.as_str().unwrap_or_default().to_string();
                        // A kubeconfig shipped in a ConfigMap points at the real API server:
                        // here, at the stand-in.
                        if text.contains("kind: Config") {
                            text = self.kubeconfig.clone();
                        }
                        std::fs::write(dir.join(k), text)?;
                    }
                }
            }
        }
        let dir = self.configmap_dir("netd-test-kubeconfig");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("kubeconfig"), &self.kubeconfig)?;
        Ok(())
    }

    fn configmap_dir(&self, name: &str) -> PathBuf {
        self.host.dir().join("configmaps").join(name)
    }

    /// The test's additions to netd's container: the stand-in's kubeconfig.
    fn with_kubeconfig(&self, c: &Container) -> (Container, Vec<(String, String)>) {
        let mut c = c.clone();
        c.mounts.push(Mount {
            volume: "netd-test-kubeconfig".into(),
            mount_path: KUBECONFIG_DIR.into(),
            read_only: true,
            source: VolumeSource::ConfigMap { name: "netd-test-kubeconfig".into() },
        });
        let mut env = if c.env.iter().any(|(k, _)| k == "NETD_KUBECONFIG") {
            Vec::new()
        } else {
            vec![("NETD_KUBECONFIG".to_string(), format!("{KUBECONFIG_DIR}/kubeconfig"))]
        };
        // The manifest's NETD_KUBE_API_SERVER is a placeholder the operator replaces with the API
        // server's real address: here, the stand-in's (the kubeconfig's server).
        if let Some(server) = self.kubeconfig.lines().find_map(|l| l.trim_start().strip_prefix("server: ")) {
            env.push(("NETD_KUBE_API_SERVER".to_string(), server.trim().to_string()));
        }
        (c, env)
    }

    fn args(&self, c: &Container, pod: &PodSpec) -> Vec<String> {
        let (mut c, env) = self.with_kubeconfig(c);
        // A hostPath outside the node's own directories that this machine lacks (its kernel
        // has no /lib/modules): a CRI runtime would create it on the host; the test leaves it
        // out rather than write to the real host.
        c.mounts.retain(|m| match &m.source {
            VolumeSource::HostPath { path, .. } => self.host.path(path).is_some() || Path::new(path).exists(),
            _ => true,
        });
        podman_args(&c, pod, &|cm| self.configmap_dir(cm), &env, &UNDERLAY_GATEWAY.to_string())
    }

    /// Init containers to completion, then netd's container (detached). Returns its name.
    fn start(&mut self, image: &str) -> Result<String> {
        let pod = self.pod(image)?;
        anyhow::ensure!(pod.host_network, "the DaemonSet's pod must use the host network");
        anyhow::ensure!(pod.containers.len() == 1, "the test runs one container per pod, the manifest has {}", pod.containers.len());
        self.prepare_volumes(&pod)?;
        self.generation += 1;
        for (j, c) in pod.init.iter().enumerate() {
            let mut a = vec!["run".to_string(), "--rm".into(), "--name".into(), format!("{}-init{j}-{}", c.name, self.generation)];
            a.extend(self.args(c, &pod));
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            self.host.run(&a).with_context(|| format!("node{}: init container {}", self.i, c.name))?;
        }
        let c = &pod.containers[0];
        let name = format!("{}-{}", c.name, self.generation);
        let mut a = vec!["run".to_string(), "-d".into(), "--name".into(), name.clone()];
        a.extend(self.args(c, &pod));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        self.host.run(&a).with_context(|| format!("node{}: starting {name}", self.i))?;
        Ok(name)
    }

    /// Stops a netd container the way a kubelet deletes its pod: SIGTERM, the grace period,
    /// SIGKILL; then removes it.
    fn stop(&self, name: &str) -> Result<()> {
        let grace = self.pod("unused")?.grace_seconds.to_string();
        self.host.run(&["stop", "-t", &grace, name])?;
        self.host.run(&["rm", name])?;
        Ok(())
    }

    /// One probe, as the kubelet sends it (to the pod IP, which is the node's with hostNetwork).
    fn probe_ok(&self, c: &Cluster, path: &str, port: u16) -> Result<bool> {
        let url = format!("http://{}:{port}{path}", self.facts.ip);
        let out = c.node(self.i).ns().exec(&["curl", "-s", "-o", "/dev/null", "-m", "2", "-w", "%{http_code}", &url])?;
        let code: u16 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
        Ok((200..400).contains(&code))
    }

    /// Waits until the container's readiness probe (or, without one, its liveness probe)
    /// passes, failing early if the container exits.
    fn wait_ready(&self, c: &Cluster, name: &str) -> Result<()> {
        let pod = self.pod("unused")?;
        let probe = pod.containers[0].readiness.clone().or(pod.containers[0].liveness.clone());
        wait_until(WAIT, POLL, || {
            let state = self.host.run(&["inspect", "-f", "{{.State.Status}}", name])?;
            if state.trim() != "running" {
                bail!("{name} on node{} is {}; its log:\n{}", self.i, state.trim(), self.logs(name));
            }
            match &probe {
                Some(p) => self.probe_ok(c, &p.path, p.port),
                None => Ok(true),
            }
        })
        .with_context(|| format!("{name} on node{} never became ready; its log:\n{}", self.i, self.logs(name)))
    }

    fn logs(&self, name: &str) -> String {
        match self.host.try_run(&["logs", "--tail", "40", name]) {
            Ok((_, out, err)) => format!("{out}{err}"),
            Err(e) => format!("{e:#}"),
        }
    }

    /// The liveness probe passes (where the manifest has one).
    fn assert_live(&self, c: &Cluster) -> Result<()> {
        let pod = self.pod("unused")?;
        if let Some(p) = &pod.containers[0].liveness {
            anyhow::ensure!(self.probe_ok(c, &p.path, p.port)?, "node{}: liveness probe {}:{} fails", self.i, p.path, p.port);
        }
        Ok(())
    }

    /// What the inventory covers besides the namespace: the directories the DaemonSet's
    /// hostPath volumes name.
    fn scope(&self) -> Result<InventoryScope> {
        let pod = self.pod("unused")?;
        let mut dirs = Vec::new();
        for m in pod.all_mounts() {
            // A FileOrCreate hostPath (the xtables lock) is the kubelet's, shared with every
            // iptables user of the node: not netd's to remove.
            if let VolumeSource::HostPath { path, kind } = &m.source {
                if let Some(local) = self.host.path(path).filter(|_| !kind.starts_with("File")) {
                    dirs.push(local);
                }
            }
        }
        Ok(InventoryScope { dirs, ..Default::default() })
    }

    fn inventory(&self, c: &Cluster) -> Result<Inventory> {
        Inventory::take(c.node(self.i).ns(), &self.scope()?)
    }

    /// `netd cleanup` from the image, as an operator runs it: the DaemonSet's container with
    /// every volume of the pod (the init container's CNI bin dir too) and its environment.
    fn cleanup(&self, image: &str) -> Result<String> {
        let pod = self.pod(image)?;
        let mut c = pod.containers[0].clone();
        c.mounts = pod.all_mounts();
        c.command = vec!["/usr/local/bin/netd".into(), "cleanup".into()];
        c.args.clear();
        let mut a = vec!["run".to_string(), "--rm".into(), "--name".into(), "netd-cleanup".into()];
        a.extend(self.args(&c, &pod));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        self.host.run(&a)
    }
}

/// A client pod: the netd image's busybox serving its name over HTTP on 8080, its resolver the
/// cluster DNS as a kubelet writes it for dnsPolicy ClusterFirst.
fn start_client_pod(k: &Kubelet, network: &str, dns_ip: &str, image: &str) -> Result<String> {
    let name = format!("pod{}", k.i);
    let script = format!("busybox mkdir -p /www && echo {name} > /www/index.html && exec busybox httpd -f -p 8080 -h /www");
    k.host.run(&[
        "run", "-d", "--name", &name, "--network", network, "--dns", dns_ip, "--dns-search", "default.svc.cluster.local", "--dns-search", "svc.cluster.local",
        "--dns-search", "cluster.local", "--dns-option", "ndots:5", "--entrypoint", "[\"/bin/sh\"]", image, "-c", &script,
    ])?;
    let ip = k.host.run(&["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", &name])?;
    Ok(ip.trim().to_string())
}

/// An HTTP GET from inside the pod with busybox nc (the image's busybox wget crashes); the
/// body's last line, or `ERROR ...`.
fn wget(k: &Kubelet, pod: &str, url: &str) -> Result<String> {
    let rest = url.strip_prefix("http://").context("http URL")?;
    let (hostport, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "80"));
    let script = format!("printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 3 {host} {port}");
    let (ok, out, err) = k.host.try_run(&["exec", pod, "busybox", "sh", "-c", &script])?;
    let body = out.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or_default().to_string();
    Ok(if ok && out.starts_with("HTTP/1") { body } else { format!("ERROR {} {}", out.trim(), err.trim()) })
}

/// DNS queries from inside a pod's network namespace, one outstanding at a time: a query not
/// answered within `timeout` is lost.
struct DnsLoad {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(u64, u64)>>>,
}

fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// One A query for `name` from inside `netns`: the first address of the answer.
fn resolve_in(netns: &Path, server: &str, name: &str) -> Result<Option<String>> {
    let (netns, server, name) = (netns.to_path_buf(), server.to_string(), name.to_string());
    std::thread::spawn(move || -> Result<Option<String>> {
        let f = std::fs::File::open(&netns)?;
        // SAFETY: setns moves only this short-lived thread.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        anyhow::ensure!(r == 0, "setns {}: {}", netns.display(), std::io::Error::last_os_error());
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(Duration::from_secs(1)))?;
        let q = dns_query(7, &name);
        sock.send_to(&q, &server)?;
        let mut buf = [0u8; 512];
        let Ok((n, _)) = sock.recv_from(&mut buf) else { return Ok(None) };
        // The answer's last 4 bytes are the first A record's address when it is the only one.
        let ancount = u16::from_be_bytes([buf[6], buf[7]]);
        if n < q.len() + 16 || ancount == 0 || buf[3] & 0x0f != 0 {
            return Ok(None);
        }
        let a = &buf[q.len() + 12..q.len() + 16];
        Ok(Some(format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("resolver thread panicked"))?
}

impl DnsLoad {
    fn start(netns: PathBuf, server: String, name: &'static str, interval: Duration, timeout: Duration) -> DnsLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> Result<(u64, u64)> {
            let f = std::fs::File::open(&netns).with_context(|| format!("opening {}", netns.display()))?;
            // SAFETY: setns moves only this thread, which does nothing but this load and ends.
            let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            anyhow::ensure!(r == 0, "setns {}: {}", netns.display(), std::io::Error::last_os_error());
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            sock.set_read_timeout(Some(timeout))?;
            let (mut sent, mut lost, mut id) = (0u64, 0u64, 0u16);
            let mut buf = [0u8; 512];
            while !flag.load(Ordering::Relaxed) {
                id = id.wrapping_add(1);
                sock.send_to(&dns_query(id, name), &server)?;
                sent += 1;
                let deadline = Instant::now() + timeout;
                let answered = loop {
                    match sock.recv_from(&mut buf) {
                        // A late answer to an earlier query is skipped.
                        Ok((n, _)) if n >= 4 && u16::from_be_bytes([buf[0], buf[1]]) == id => break buf[3] & 0x0f == 0,
                        Ok(_) if Instant::now() < deadline => continue,
                        _ => break false,
                    }
                };
                if !answered {
                    lost += 1;
                }
                std::thread::sleep(interval);
            }
            Ok((sent, lost))
        });
        DnsLoad { stop, thread: Some(thread) }
    }

    /// (sent, lost).
    fn finish(mut self) -> Result<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().context("finished twice")?.join().map_err(|_| anyhow::anyhow!("DNS load thread panicked"))?
    }
}

/// The kubeconfig with a CA of its own (`certificate-authority-data`), as a service account
/// always has one: the image has no system CA roots, and netd's client, given no CA, fails
/// building its TLS configuration even for the stand-in's plain-HTTP URL.
fn with_ca(kubeconfig: &str) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let (key, cert) = (dir.path().join("ca.key"), dir.path().join("ca.crt"));
    let st = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=netd-lifecycle-ca", "-days", "1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "openssl req failed");
    let b64 = std::process::Command::new("base64").args(["-w", "0"]).arg(&cert).output()?;
    let b64 = String::from_utf8(b64.stdout)?;
    let mut out = String::new();
    for line in kubeconfig.lines() {
        out.push_str(line);
        out.push('\n');
        if line.trim_start().starts_with("server: ") {
            out.push_str(&format!("{}certificate-authority-data: {}\n", &line[..line.len() - line.trim_start().len()], b64.trim()));
        }
    }
    Ok(out)
}

#[test]
#[ignore = "needs `make image` (downloads Debian packages) and podman: run by `make e2e-lifecycle`"]
fn daemonset_install_serve_upgrade_uninstall_with_podman() -> Result<()> {
    let started = Instant::now();
    let phase = |what: &str| eprintln!("lifecycle: {what} at {:.1} s", started.elapsed().as_secs_f64());
    let root = workspace();
    let version = std::fs::read_to_string(root.join("Cargo.toml"))?
        .lines()
        .skip_while(|l| l.trim() != "[workspace.package]")
        .find_map(|l| l.trim().strip_prefix("version = ").map(|v| v.trim_matches('"').to_string()))
        .context("workspace version")?;
    let archive = root.join(format!("target/image/netd-{version}.oci.tar"));
    anyhow::ensure!(archive.exists(), "{} is missing: run `make image` first (or `make e2e-lifecycle`)", archive.display());
    let manifest = Manifest::read(&root.join("deploy/kubernetes/netd.yaml"))?;
    let ds_env = PodSpec::from_manifest(&manifest, &NodeFacts { name: "node0".into(), ip: "198.18.0.10".into() })?.containers[0].env.clone();
    let env_of = |k: &str| ds_env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.clone());
    assert_eq!(env_of("NETD_SUBNET_MANAGER").as_deref(), Some("kube"), "the manifest runs netd with --subnet-manager kube");
    assert_eq!(env_of("NETD_SOURCE").as_deref(), Some("kubernetes"), "the manifest runs netd with --source kubernetes");
    let dns_ip = env_of("NETD_CLUSTER_DNS_IP").unwrap_or_else(|| "10.96.0.10".into());

    // The cluster: three nodes on the underlay, the API server stand-in there. The test bed's
    // etcd runs too but netd is not told of it (the manifest's netd needs no etcd).
    let c = Cluster::new(NODES)?;
    let mut api = FakeApiServer::start(&c)?;
    api.load(json!((0..NODES).map(|i| kube_node(&format!("node{i}"), &format!("10.244.{}.0/24", 10 + i), &format!("198.18.0.{}", 10 + i))).collect::<Vec<_>>()))?;
    let kubeconfig = with_ca(&std::fs::read_to_string(api.kubeconfig())?)?;
    let mut nodes = Vec::new();
    for i in 0..NODES {
        let host = NodeHost::new(c.node(i).ns())?;
        let facts = NodeFacts { name: c.node(i).name(), ip: c.node(i).ip().to_string() };
        nodes.push(Kubelet { i, host, facts, manifest: &manifest, kubeconfig: kubeconfig.clone(), generation: 0 });
    }
    let image = manifest.daemonset()?["spec"]["template"]["spec"]["containers"][0]["image"].as_str().context("image")?.to_string();
    for k in &nodes {
        let loaded = k.host.load(&archive)?;
        // The manifest's short name (netd:0.1.0) is what a kubelet asks the runtime for.
        k.host.run(&["tag", &loaded, &image])?;
        k.host.run(&["tag", &loaded, UPGRADE_TAG])?;
    }
    phase("images loaded on 3 nodes");
    let before: Vec<Inventory> = nodes.iter().map(|k| k.inventory(&c)).collect::<Result<_>>()?;

    // Install: the DaemonSet's pod on every node.
    let mut current = Vec::new();
    for k in &mut nodes {
        current.push(k.start(&image)?);
    }
    for (k, name) in nodes.iter().zip(&current) {
        k.wait_ready(&c, name)?;
    }
    phase("netd ready on 3 nodes");
    let mut deviations = Vec::new();
    let conflist = |k: &Kubelet| -> Result<serde_json::Value> {
        let p = k.host.path("/etc/cni/net.d/10-netd.conflist").context("conflist path")?;
        Ok(serde_json::from_str(&std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?)?)
    };
    let mut test_made_plugins = Vec::new();
    for k in &nodes {
        wait_until(WAIT, POLL, || Ok(conflist(k).is_ok()))?;
        // Everything the conflist chains must be in the CNI bin dir the init container filled.
        for plugin in conflist(k)?["plugins"].as_array().into_iter().flatten() {
            let t = plugin["type"].as_str().unwrap_or_default();
            let bin = k.host.path("/opt/cni/bin").context("cni bin")?.join(t);
            if !bin.exists() {
                deviations.push(format!("node{}: the conflist chains {t}, which the init container did not install in /opt/cni/bin (the test copied Debian's)", k.i));
                std::fs::copy(Path::new("/usr/lib/cni").join(t), &bin).with_context(|| format!("no {t} in /usr/lib/cni either"))?;
                test_made_plugins.push(t.to_string());
            }
        }
    }
    let network = conflist(&nodes[0])?["name"].as_str().context("conflist name")?.to_string();

    // Pods through netd's conflist (podman's CNI backend runs netd-cni), one per node.
    let mut pod_ips = Vec::new();
    for k in &nodes {
        pod_ips.push(start_client_pod(k, &network, &dns_ip, &image)?);
    }
    phase("3 pods created by podman through netd-cni");
    for (i, ip) in pod_ips.iter().enumerate() {
        assert!(ip.starts_with(&format!("10.244.{}.", 10 + i)), "pod{i} got {ip}, not from node{i}'s podCIDR");
    }
    // Cross-node pod traffic.
    for (i, k) in nodes.iter().enumerate() {
        let j = (i + 1) % NODES;
        let url = format!("http://{}:8080/", pod_ips[j]);
        let mut last = String::new();
        wait_until(WAIT, POLL, || {
            last = wget(k, &format!("pod{i}"), &url)?;
            Ok(last == format!("pod{j}"))
        })
        .with_context(|| {
            format!(
                "pod{i} -> pod{j} ({url}): {last}\nnode{i} routes:\n{}\npodman ps:\n{}\npod{j} log:\n{}\nlocal: {}\nnetd log:\n{}",
                c.node(i).ns().run(&["ip", "route"]).unwrap_or_default(),
                k.host.run(&["ps", "-a"]).unwrap_or_default(),
                nodes[j].logs(&format!("pod{j}")),
                k.host.try_run(&["exec", &format!("pod{i}"), "busybox", "sh", "-c", "busybox wget -O - -T 3 http://127.0.0.1:8080/ 2>&1; busybox netstat -ltn; busybox ls -la /www; busybox ps; busybox ip addr"]).map(|r| format!("{r:?}")).unwrap_or_default(),
                k.logs(&current[i])
            )
        })?;
    }
    // A Service backed by the three pods, and DNS by name.
    let slice_endpoints: Vec<_> = pod_ips
        .iter()
        .enumerate()
        .map(|(i, ip)| json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": format!("node{i}")}))
        .collect();
    api.load(json!([
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "web", "namespace": "default", "uid": "5b1c9f4e-0000-4000-8000-00000000aa01"},
         "spec": {"type": "ClusterIP", "clusterIP": SERVICE_IP, "clusterIPs": [SERVICE_IP], "ipFamilies": ["IPv4"],
                  "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}], "selector": {"app": "web"},
                  "sessionAffinity": "None", "internalTrafficPolicy": "Cluster"},
         "status": {"loadBalancer": {}}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "web-abcde", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": 8080}], "endpoints": slice_endpoints}
    ]))?;
    for k in &nodes {
        let pod = format!("pod{}", k.i);
        let netns = k.host.container_netns(&pod)?;
        let mut last = None;
        wait_until(WAIT, POLL, || {
            last = resolve_in(&netns, &format!("{dns_ip}:53"), SERVICE_NAME)?;
            Ok(last.as_deref() == Some(SERVICE_IP))
        })
        .with_context(|| format!("{pod}: {SERVICE_NAME} resolved to {last:?}, not {SERVICE_IP}"))?;
        let mut seen = std::collections::BTreeSet::new();
        let mut last = String::new();
        wait_until(WAIT, POLL, || {
            let got = wget(k, &pod, "http://web/")?;
            last = got.clone();
            if got.starts_with("pod") {
                seen.insert(got);
            }
            Ok(seen.len() == NODES)
        })
        .with_context(|| format!("{pod}: http://web/ reached only {seen:?}; last: {last}"))?;
    }
    phase("Service by name from every pod, reaching every backend");
    for k in &nodes {
        k.assert_live(&c)?;
    }

    // Upgrade under DNS load, node by node, as the update strategy says.
    let pod_spec = nodes[0].pod(UPGRADE_TAG)?;
    let loads: Vec<DnsLoad> = nodes
        .iter()
        .map(|k| -> Result<DnsLoad> {
            let netns = k.host.container_netns(&format!("pod{}", k.i))?;
            Ok(DnsLoad::start(netns, format!("{dns_ip}:53"), SERVICE_NAME, Duration::from_millis(5), Duration::from_millis(500)))
        })
        .collect::<Result<_>>()?;
    std::thread::sleep(Duration::from_secs(1));
    for (n, k) in nodes.iter_mut().enumerate() {
        let old = current[n].clone();
        if pod_spec.surges() {
            let new = k.start(UPGRADE_TAG)?;
            k.wait_ready(&c, &new)?;
            k.stop(&old)?;
            current[n] = new;
        } else {
            k.stop(&old)?;
            let new = k.start(UPGRADE_TAG)?;
            k.wait_ready(&c, &new)?;
            current[n] = new;
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let mut lost_total = 0;
    let mut sent_total = 0;
    for (i, l) in loads.into_iter().enumerate() {
        let (sent, lost) = l.finish()?;
        eprintln!("lifecycle: node{i}: {sent} DNS queries during the upgrade, {lost} lost");
        sent_total += sent;
        lost_total += lost;
    }
    phase(&format!(
        "upgrade done ({} strategy, maxSurge {}, maxUnavailable {}): {sent_total} DNS queries, {lost_total} lost",
        pod_spec.update_type, pod_spec.max_surge, pod_spec.max_unavailable
    ));
    assert!(sent_total > 0, "the DNS load sent nothing");
    for k in &nodes {
        let pod = format!("pod{}", k.i);
        wait_until(WAIT, POLL, || Ok(wget(k, &pod, "http://web/")?.starts_with("pod")))?;
        let j = (k.i + 1) % NODES;
        assert_eq!(wget(k, &pod, &format!("http://{}:8080/", pod_ips[j]))?, format!("pod{j}"));
        k.assert_live(&c)?;
    }

    // Uninstall: the workloads go (CNI DEL through netd-cni), the DaemonSet is deleted, then
    // `netd cleanup` from the image on every node (the manifest has no uninstall job).
    for k in &nodes {
        k.host.run(&["rm", "-f", "-t", "0", &format!("pod{}", k.i)])?;
    }
    for (k, name) in nodes.iter().zip(&current) {
        k.stop(name)?;
    }
    let mut cleanup_out = Vec::new();
    for k in &nodes {
        cleanup_out.push(k.cleanup(UPGRADE_TAG)?);
    }
    phase("uninstalled");
    for (k, before) in nodes.iter().zip(&before) {
        let after = k.inventory(&c)?;
        let left = before.diff(&after).without(|section, line| {
            // The reference plugins the test itself copied in place of the init container.
            section == "files" && test_made_plugins.iter().any(|p| line.ends_with(&format!("/opt/cni/bin: {p}")))
        });
        assert!(left.is_empty(), "node{}: after the uninstall, left (+) or missing (-):\n{left}\nnetd cleanup said: {}", k.i, cleanup_out[k.i]);
    }
    phase("inventories equal before install and after uninstall");
    let _ = std::io::stderr().flush();

    assert!(deviations.is_empty(), "the manifest did not work as written:\n{}", deviations.join("\n"));
    assert_eq!(
        lost_total, 0,
        "{lost_total} of {sent_total} DNS queries were lost while netd was upgraded: the DNS socket handover (both processes on the \
         sockets during the overlap, issue #16 item 3) is what makes this 0"
    );
    Ok(())
}
