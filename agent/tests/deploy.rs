//! The deployment artifacts in `deploy/` agree with the binary: they parse, every NETD_* setting
//! is a real flag's env var with a valid value, probes reach the health listener's port and
//! paths, the pod has the capabilities netd needs and no more, every mount has its volume. The
//! checks return what is wrong, so that they are also run against broken manifests.

use std::collections::BTreeMap;
use std::path::Path;

use clap::{CommandFactory, Parser};
use netd::cli::{Cli, Command};

fn deploy(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every env var a flag of `netd run` reads, plus the log filter (read by tracing, not clap).
fn known_env() -> Vec<String> {
    let cmd = Cli::command();
    let mut out: Vec<String> = cmd.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()).collect();
    let run = cmd.find_subcommand("run").unwrap();
    out.extend(run.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()));
    out.push("NETD_LOG".into());
    out
}

/// Parses `netd run` with `env` applied as the environment would (env vars are read by clap).
fn parse_run_with_env(args: &[&str], env: &BTreeMap<String, String>) -> Result<netd::cli::RunArgs, String> {
    // The environment is process-wide: tests set and clear their NETD_* variables under a lock.
    let _guard = ENV_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    for (k, v) in env {
        std::env::set_var(k, v);
    }
    let parsed = Cli::try_parse_from(args);
    for k in env.keys() {
        std::env::remove_var(k);
    }
    match parsed.map_err(|e| format!("{args:?} with {env:?}: {e}"))?.command {
        Command::Run(r) => Ok(*r),
        other => Err(format!("expected run, got {other:?}")),
    }
}

static ENV_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn yaml_docs(text: &str) -> Result<Vec<serde_yaml::Value>, String> {
    serde_yaml::Deserializer::from_str(text).map(|d| serde::Deserialize::deserialize(d).map_err(|e| format!("YAML: {e}"))).collect()
}

/// The capabilities the default mode (vxlan, nftables, DNS) needs: found by running the e2e
/// tests with netd's bounding set cut to them (see the comment in netd.yaml).
const CAPABILITIES: [&str; 2] = ["NET_ADMIN", "NET_BIND_SERVICE"];

/// The DaemonSet's pod spec, its netd container, and `netd run` as that container runs it.
struct Deployed {
    docs: Vec<serde_yaml::Value>,
    pod: serde_yaml::Value,
    run: netd::cli::RunArgs,
}

/// Everything wrong with a netd.yaml, in words (empty: nothing). Checked against the binary:
/// flags and their values, the health listener's port and paths, the directories netd uses.
fn manifest_problems(text: &str) -> (Vec<String>, Option<Deployed>) {
    let mut bad = Vec::new();
    let docs = match yaml_docs(text) {
        Ok(d) => d,
        Err(e) => return (vec![e], None),
    };
    let kind = |k: &str| docs.iter().filter(|d| d["kind"] == k).cloned().collect::<Vec<_>>();
    let (Some(ds), Some(cm)) = (kind("DaemonSet").pop(), kind("ConfigMap").into_iter().find(|c| c["metadata"]["name"] == "netd-config")) else {
        return (vec!["no DaemonSet or no netd-config ConfigMap".into()], None);
    };
    let pod = ds["spec"]["template"]["spec"].clone();
    let c = &pod["containers"][0];
    let known = known_env();

    // Settings: every NETD_* key is a flag's env var, and together they parse as `netd run`.
    let env: BTreeMap<String, String> = serde_yaml::from_value(cm["data"].clone()).unwrap_or_default();
    let mut run_env = env.clone();
    for e in c["env"].as_sequence().into_iter().flatten() {
        if let (Some(k), Some(v)) = (e["name"].as_str(), e["value"].as_str()) {
            run_env.insert(k.to_string(), v.to_string());
        } else if let Some(k) = e["name"].as_str() {
            run_env.insert(k.to_string(), "node-from-fieldref".into());
        }
    }
    for k in run_env.keys().filter(|k| k.starts_with("NETD_")) {
        if !known.contains(k) {
            bad.push(format!("{k} is set, but no netd flag reads it"));
        }
    }
    if c["envFrom"][0]["configMapRef"]["name"] != cm["metadata"]["name"] {
        bad.push("the container does not take its environment from netd-config".into());
    }
    run_env.remove("NETD_LOG");
    run_env.retain(|k, _| known.contains(k));
    let mut argv = vec!["netd".to_string()];
    argv.extend(c["args"].as_sequence().into_iter().flatten().filter_map(|a| a.as_str().map(String::from)));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let run = match parse_run_with_env(&argv, &run_env) {
        Ok(r) => r,
        Err(e) => return ({ bad.push(format!("netd run does not accept the settings: {e}")); bad }, None),
    };
    if run.kube.kube_api_server.is_none() {
        bad.push("no NETD_KUBE_API_SERVER: the in-cluster address is a ClusterIP netd itself must program (bootstrap deadlock)".into());
    }
    if run.kube.source != netd_kube::SourceKind::Kubernetes || run.kube.subnet_manager != netd_kube::SubnetManagerKind::Kube {
        bad.push("not the API server for services and subnets (the DaemonSet has no etcd)".into());
    }
    if run.dns.cluster_dns_ip.is_none() {
        bad.push("no cluster DNS IP".into());
    }

    // The pod: on the host network, on every Linux node, first to be scheduled, no ports (on the
    // host network a containerPort becomes a hostPort, which blocks the surge pod).
    let expect = |bad: &mut Vec<String>, what: &str, got: &serde_yaml::Value, want: serde_yaml::Value| {
        if *got != want {
            bad.push(format!("{what} is {got:?}, not {want:?}"));
        }
    };
    expect(&mut bad, "hostNetwork", &pod["hostNetwork"], true.into());
    expect(&mut bad, "dnsPolicy", &pod["dnsPolicy"], "Default".into());
    expect(&mut bad, "nodeSelector kubernetes.io/os", &pod["nodeSelector"]["kubernetes.io/os"], "linux".into());
    expect(&mut bad, "priorityClassName", &pod["priorityClassName"], "system-node-critical".into());
    if !pod["tolerations"].as_sequence().into_iter().flatten().any(|t| t["operator"] == "Exists" && t.get("key").is_none()) {
        bad.push("no toleration of every taint".into());
    }
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    expect(&mut bad, "maxSurge", &rolling["maxSurge"], 1.into());
    expect(&mut bad, "maxUnavailable", &rolling["maxUnavailable"], 0.into());
    let containers: Vec<&serde_yaml::Value> = pod["containers"].as_sequence().into_iter().flatten().chain(pod["initContainers"].as_sequence().into_iter().flatten()).collect();
    for k in &containers {
        if k.get("ports").is_some() {
            bad.push(format!("container {:?} declares ports (a hostPort on the host network: no surge pod fits)", k["name"]));
        }
    }

    // Privileges: the capabilities the default mode needs, not privileged.
    let sc = &c["securityContext"];
    if sc["privileged"] == true {
        bad.push("the default manifest is privileged".into());
    }
    let added: Vec<&str> = sc["capabilities"]["add"].as_sequence().into_iter().flatten().filter_map(|v| v.as_str()).collect();
    if added != CAPABILITIES {
        bad.push(format!("capabilities added are {added:?}, not {CAPABILITIES:?}"));
    }
    if !sc["capabilities"]["drop"].as_sequence().into_iter().flatten().any(|v| v == "ALL") {
        bad.push("capabilities: the container's defaults are not dropped (drop: [ALL])".into());
    }

    // Probes: on the health listener (reachable at the node's address), metrics on localhost.
    let health_port = run.proxy.healthz_bind_address.rsplit(':').next().and_then(|p| p.parse::<u64>().ok());
    if !run.proxy.healthz_bind_address.starts_with("0.0.0.0:") {
        bad.push(format!("the health listener {} is not on all addresses: the kubelet probes the node IP", run.proxy.healthz_bind_address));
    }
    if !run.metrics_listen.is_empty() && !run.metrics_listen.starts_with("127.0.0.1:") {
        bad.push(format!("metrics on {}: not localhost", run.metrics_listen));
    }
    for probe in ["livenessProbe", "readinessProbe"] {
        let get = &c[probe]["httpGet"];
        if get["port"].as_u64() != health_port {
            bad.push(format!("{probe} asks port {:?}, the health listener is {}", get["port"], run.proxy.healthz_bind_address));
        }
        if !["/healthz", "/livez", "/readyz"].contains(&get["path"].as_str().unwrap_or("")) {
            bad.push(format!("{probe} asks {:?}, which the health listener does not serve", get["path"]));
        }
    }

    // Volumes: every mount names a volume, every volume is mounted; netd's directories are the
    // host's own.
    let volumes: BTreeMap<String, serde_yaml::Value> =
        pod["volumes"].as_sequence().into_iter().flatten().map(|v| (v["name"].as_str().unwrap_or("").to_string(), v.clone())).collect();
    let mut used = std::collections::BTreeSet::new();
    for k in &containers {
        for m in k["volumeMounts"].as_sequence().into_iter().flatten() {
            let name = m["name"].as_str().unwrap_or("");
            used.insert(name.to_string());
            if !volumes.contains_key(name) {
                bad.push(format!("container {:?} mounts volume {name:?}, which the pod does not have", k["name"]));
            }
        }
    }
    for v in volumes.keys().filter(|v| !used.contains(*v)) {
        bad.push(format!("volume {v:?} is not mounted"));
    }
    let mounts: BTreeMap<String, String> =
        c["volumeMounts"].as_sequence().into_iter().flatten().map(|m| (m["mountPath"].as_str().unwrap_or("").to_string(), m["name"].as_str().unwrap_or("").to_string())).collect();
    let host_path = |name: &str| volumes.get(name).and_then(|v| v["hostPath"]["path"].as_str().map(String::from));
    for dir in [&run.run_dir, &run.state_dir, &run.cni_conf_dir] {
        let dir = dir.display().to_string();
        if mounts.get(&dir).and_then(|v| host_path(v)).as_deref() != Some(dir.as_str()) {
            bad.push(format!("{dir} is not the host's {dir}"));
        }
    }
    // The network config file is a key of the ConfigMap mounted where the flag says.
    let conf = run.net_conf_file.display().to_string();
    let (dir, file) = conf.rsplit_once('/').unwrap_or(("", ""));
    let net_conf = mounts.get(dir).and_then(|v| volumes.get(v)).and_then(|v| {
        let name = v["configMap"]["name"].clone();
        docs.iter().find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == name).and_then(|d| d["data"][file].as_str().map(String::from))
    });
    match net_conf.map(|t| netd::netconf::NetworkConfig::parse(&t)) {
        Some(Ok(_)) => {}
        Some(Err(e)) => bad.push(format!("{conf}: {e}")),
        None => bad.push(format!("{conf} is not a mounted ConfigMap key")),
    }
    // The init container installs netd-cni and what the conflist chains into the host's plugin
    // directory.
    let init = &pod["initContainers"][0];
    let script = init["command"][2].as_str().unwrap_or("");
    let conf = netd::cniconf::CniConf { subnet_file: "/run/netd/subnet.env".into(), data_dir: "/var/lib/netd".into(), bridge: "netd0".into(), nameserver: None, cluster_domain: "cluster.local".into(), host_local_dirs: Vec::new() };
    let conflist: serde_json::Value = serde_json::from_str(&conf.render()).expect("conflist JSON");
    for ty in conflist["plugins"].as_array().into_iter().flatten().filter_map(|p| p["type"].as_str()) {
        // Installed = moved into place (atomically, after a copy beside it).
        let dest = format!("/opt/cni/bin/{ty}");
        let installs = script.split(['&', ';', '|']).any(|step| {
            let w: Vec<&str> = step.split_whitespace().collect();
            w.first() == Some(&"mv") && w.last() == Some(&dest.as_str())
        });
        if !installs {
            bad.push(format!("the init container does not install {ty}, which the conflist chains"));
        }
    }
    let cni_bin = init["volumeMounts"].as_sequence().into_iter().flatten().find(|m| m["mountPath"] == "/opt/cni/bin").and_then(|m| m["name"].as_str()).and_then(host_path);
    if cni_bin.as_deref() != Some("/opt/cni/bin") {
        bad.push("the init container's /opt/cni/bin is not the host's".into());
    }

    // RBAC: bound to the DaemonSet's service account; exactly what netd uses.
    if kind("ClusterRoleBinding").first().map(|b| b["subjects"][0]["name"].clone()) != Some(pod["serviceAccountName"].clone()) {
        bad.push("the ClusterRoleBinding is not the pod's service account's".into());
    }
    let mut grants: Vec<String> = Vec::new();
    for rule in kind("ClusterRole").first().map(|r| r["rules"].clone()).and_then(|r| r.as_sequence().cloned()).unwrap_or_default() {
        for res in rule["resources"].as_sequence().into_iter().flatten() {
            for verb in rule["verbs"].as_sequence().into_iter().flatten() {
                grants.push(format!("{}:{}", res.as_str().unwrap_or(""), verb.as_str().unwrap_or("")));
            }
        }
    }
    grants.sort();
    let want = ["endpointslices:list", "endpointslices:watch", "nodes/status:patch", "nodes:get", "nodes:list", "nodes:watch", "services:list", "services:watch"];
    if grants != want {
        bad.push(format!("RBAC grants {grants:?}, netd uses {want:?}"));
    }
    (bad, Some(Deployed { docs, pod, run }))
}

#[test]
fn the_daemonset_agrees_with_the_binary() {
    let (bad, deployed) = manifest_problems(&deploy("kubernetes/netd.yaml"));
    assert!(bad.is_empty(), "deploy/kubernetes/netd.yaml:\n  {}", bad.join("\n  "));
    let d = deployed.unwrap();
    let kinds: Vec<&str> = d.docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "ConfigMap", "DaemonSet"]);
    assert_eq!(d.run.proxy_mode, netd_proxy::ProxyMode::Nftables, "the default manifest is the default mode");
    assert!(d.pod["containers"][0]["volumeMounts"].as_sequence().unwrap().iter().all(|m| m["mountPath"] != "/sys/fs/bpf"), "no bpffs without eBPF");
}

/// The probes ask paths the health listener answers (not 404), at the port netd binds.
#[tokio::test]
async fn the_probes_reach_the_health_listener() {
    let (_, deployed) = manifest_problems(&deploy("kubernetes/netd.yaml"));
    let d = deployed.expect("netd.yaml parses");
    let shared = netd::server::Shared::new(netd::status::NodeStatus::default());
    let addr = netd::server::serve_health("127.0.0.1:0", shared).await.unwrap().unwrap();
    for probe in ["livenessProbe", "readinessProbe"] {
        let path = d.pod["containers"][0][probe]["httpGet"]["path"].as_str().unwrap().to_string();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        let code = answer.split_whitespace().nth(1).unwrap();
        assert!(code == "200" || code == "503", "{probe} {path}: {answer}");
    }
}

/// The checks fail on broken manifests, each naming what is wrong.
#[test]
fn broken_manifests_are_caught() {
    let good = deploy("kubernetes/netd.yaml");
    let broken = |from: &str, to: &str| -> Vec<String> {
        assert!(good.contains(from), "netd.yaml has no {from:?}");
        manifest_problems(&good.replacen(from, to, 1)).0
    };
    let has = |bad: Vec<String>, what: &str| assert!(bad.iter().any(|b| b.contains(what)), "expected {what:?} in {bad:?}");
    has(broken("  NETD_SUBNET_MANAGER: \"kube\"", "  NETD_SUBNET_MANAGER: \"kube\"\n  NETD_HEALTHZ_PORT: \"1\""), "NETD_HEALTHZ_PORT is set, but no netd flag reads it");
    has(broken("NETD_IP_MASQ: \"true\"", "NETD_IP_MASQ: \"maybe\""), "netd run does not accept the settings");
    has(broken("              port: 10256\n            periodSeconds: 10", "              port: 9402\n            periodSeconds: 10"), "livenessProbe asks port Number(9402)");
    has(broken("path: /readyz", "path: /ready"), "readinessProbe asks String(\"/ready\")");
    has(broken("privileged: false", "privileged: true"), "the default manifest is privileged");
    has(broken("add: [\"NET_ADMIN\", \"NET_BIND_SERVICE\"]", "add: [\"NET_ADMIN\"]"), "capabilities added are [\"NET_ADMIN\"]");
    has(broken("            - name: state\n              mountPath", "            - name: stat\n              mountPath"), "mounts volume \"stat\"");
    has(broken("          resources:", "          ports:\n            - containerPort: 10256\n          resources:"), "declares ports");
    has(broken("maxUnavailable: 0", "maxUnavailable: 1"), "maxUnavailable");
    has(broken("dnsPolicy: Default", "dnsPolicy: ClusterFirstWithHostNet"), "dnsPolicy");
    has(broken("  NETD_KUBE_API_SERVER: \"https://kube-apiserver.invalid:6443\"\n", ""), "bootstrap deadlock");
    has(broken("NETD_METRICS_LISTEN: \"127.0.0.1:9402\"", "NETD_METRICS_LISTEN: \"0.0.0.0:9402\""), "not localhost");
    has(broken("/opt/cni/bin/portmap;", "/opt/cni/bin/portmap.old;"), "does not install portmap");
}

/// The eBPF variant: privileged, the host's bpffs (propagated) and cgroup v2 hierarchy mounted,
/// --ebpf-cgroup naming the host's cgroup root, not the pod's cgroup namespace.
#[test]
fn the_ebpf_patch_mounts_the_host_s_cgroup_and_bpffs() {
    let patch = yaml_docs(&deploy("kubernetes/netd-ebpf-patch.yaml")).unwrap().remove(0);
    let pod = &patch["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["name"], "netd", "the patch merges into the netd container by name");
    assert_eq!(c["securityContext"]["privileged"], true);
    let env: BTreeMap<String, String> = c["env"].as_sequence().unwrap().iter().map(|e| (e["name"].as_str().unwrap().into(), e["value"].as_str().unwrap().into())).collect();
    let known = known_env();
    assert!(env.keys().all(|k| known.contains(k)), "{env:?}");
    let mut base_env: BTreeMap<String, String> = BTreeMap::new();
    base_env.extend(env.clone());
    let run = parse_run_with_env(&["netd", "run"], &base_env).unwrap();
    assert_eq!(run.proxy_mode, netd_proxy::ProxyMode::Ebpf);
    let host_of = |mount: &str| -> (String, serde_yaml::Value) {
        let m = c["volumeMounts"].as_sequence().unwrap().iter().find(|m| m["mountPath"] == mount).unwrap_or_else(|| panic!("nothing mounted at {mount}"));
        let v = pod["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == m["name"]).unwrap_or_else(|| panic!("no volume {:?}", m["name"]));
        (v["hostPath"]["path"].as_str().unwrap().to_string(), m["mountPropagation"].clone())
    };
    let cgroup = run.ebpf_cgroup.expect("--ebpf-cgroup set").display().to_string();
    assert_ne!(cgroup, "/sys/fs/cgroup", "the pod's /sys/fs/cgroup is its own cgroup namespace");
    assert_eq!(host_of(&cgroup).0, "/sys/fs/cgroup");
    let bpffs = run.ebpf_bpffs.parent().unwrap().display().to_string();
    assert_eq!(host_of(&bpffs), ("/sys/fs/bpf".to_string(), "Bidirectional".into()));
}

#[test]
fn systemd_unit_agrees_with_the_binary() {
    let text = deploy("systemd/netd.service");
    let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if line.starts_with('[') {
            current = line.trim_matches(['[', ']']).to_string();
            continue;
        }
        let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("not key=value: {line}"));
        sections.entry(current.clone()).or_default().insert(k.to_string(), v.to_string());
    }
    let svc = &sections["Service"];
    let argv: Vec<&str> = svc["ExecStart"].split_whitespace().collect();
    assert_eq!(argv[0], "/usr/local/bin/netd");
    let run = parse_run_with_env(&argv, &BTreeMap::new()).unwrap();
    assert_eq!(svc["RuntimeDirectory"], run.run_dir.file_name().unwrap().to_str().unwrap());
    assert_eq!(run.run_dir, Path::new("/run/netd"));
    assert_eq!(svc["StateDirectory"], run.state_dir.file_name().unwrap().to_str().unwrap());
    assert_eq!(run.state_dir, Path::new("/var/lib/netd"));
    assert_eq!(svc["KillMode"], "process", "stopping netd must not take the dataplane with it");
    assert_eq!(svc["RuntimeDirectoryPreserve"], "yes", "subnet.env outlives a restart");
    assert_eq!(svc["Type"], "notify", "ready only when the node is (sd_notify READY=1)");
    assert!(svc["FileDescriptorStoreMax"].parse::<u32>().unwrap() >= 64, "the DNS sockets are kept across a restart");
    assert_eq!(sections["Install"]["WantedBy"], "multi-user.target");
}
