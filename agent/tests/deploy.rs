//! The deployment artifacts in `deploy/` agree with the binary: they parse, every NETD_* setting
//! is a real flag's env var with a valid value, ports and paths match the flags' values.

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
fn parse_run_with_env(args: &[&str], env: &BTreeMap<String, String>) -> netd::cli::RunArgs {
    // The environment is process-wide: tests set and clear their NETD_* variables under a lock.
    let _guard = ENV_LOCK.lock().unwrap();
    for (k, v) in env {
        std::env::set_var(k, v);
    }
    let parsed = Cli::try_parse_from(args);
    for k in env.keys() {
        std::env::remove_var(k);
    }
    match parsed.unwrap_or_else(|e| panic!("{args:?} with {env:?}: {e}")).command {
        Command::Run(r) => *r,
        other => panic!("expected run, got {other:?}"),
    }
}

static ENV_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn daemonset_configmap_and_rbac_agree_with_the_binary() {
    let text = deploy("kubernetes/netd.yaml");
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "ConfigMap", "DaemonSet"]);

    let cm = &docs[3];
    let env: BTreeMap<String, String> = serde_yaml::from_value(cm["data"].clone()).unwrap();
    let known = known_env();
    for k in env.keys() {
        assert!(known.contains(k), "ConfigMap sets {k}, which no netd flag reads");
    }
    let mut run_env = env.clone();
    run_env.remove("NETD_LOG");
    let ds = &docs[5];
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], true);
    assert_eq!(c["envFrom"][0]["configMapRef"]["name"], cm["metadata"]["name"]);
    assert_eq!(c["env"][0]["name"], "NETD_NODE_NAME");
    let mut argv = vec!["netd".to_string()];
    argv.extend(c["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap().to_string()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let run = parse_run_with_env(&argv, &run_env);

    // Ports: the probes and the declared port are the metrics listener's.
    let port: u16 = run.metrics_listen.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(c["ports"][0]["containerPort"].as_u64(), Some(u64::from(port)));
    assert_eq!(c["readinessProbe"]["httpGet"]["port"].as_u64(), Some(u64::from(port)));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"].as_str(), Some(port.to_string().as_str()));
    assert!(run.metrics_listen.starts_with("0.0.0.0:"), "probes reach the node IP, not loopback");

    // Paths: each directory netd uses is a hostPath mount at the same place.
    let mounts: BTreeMap<String, String> = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| (m["mountPath"].as_str().unwrap().to_string(), m["name"].as_str().unwrap().to_string()))
        .collect();
    let host_path = |name: &str| -> Option<String> {
        pod["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == name).and_then(|v| v["hostPath"]["path"].as_str().map(String::from))
    };
    for dir in [&run.run_dir, &run.state_dir, &run.cni_conf_dir] {
        let dir = dir.display().to_string();
        let vol = mounts.get(&dir).unwrap_or_else(|| panic!("{dir} is not mounted"));
        assert_eq!(host_path(vol).as_deref(), Some(dir.as_str()), "{dir} must be the host's own");
    }
    // The network config file is the second ConfigMap's key, mounted where the flag says.
    let conf = run.net_conf_file.display().to_string();
    let (dir, file) = conf.rsplit_once('/').unwrap();
    let vol = mounts.get(dir).unwrap_or_else(|| panic!("{dir} is not mounted"));
    let cm_name = pod["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == vol.as_str()).unwrap()["configMap"]["name"].clone();
    let net_conf = docs.iter().find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == cm_name).expect("net-conf ConfigMap");
    let text = net_conf["data"][file].as_str().unwrap_or_else(|| panic!("no key {file}"));
    netd::netconf::NetworkConfig::parse(text).unwrap();
    // netd takes its upstreams from the pod's resolv.conf: it must be the node's, not one naming
    // the cluster DNS IP that netd itself answers (no upstream at all).
    assert_eq!(pod["dnsPolicy"], "Default");
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    // The init container installs netd-cni where runtimes look for plugins.
    let init = &pod["initContainers"][0];
    assert!(init["command"][2].as_str().unwrap().contains("/opt/cni/bin/netd-cni"));
    assert_eq!(host_path(init["volumeMounts"][0]["name"].as_str().unwrap()).as_deref(), Some("/opt/cni/bin"));

    // The API server is the service source and the subnet manager (no etcd needed), and the
    // cluster DNS IP is answered on the node.
    assert_eq!(run.kube.source, netd_kube::SourceKind::Kubernetes);
    assert_eq!(run.kube.subnet_manager, netd_kube::SubnetManagerKind::Kube);
    assert!(run.dns.cluster_dns_ip.is_some());
    // RBAC: bound to the DaemonSet's service account; exactly what netd uses.
    assert_eq!(docs[2]["subjects"][0]["name"], pod["serviceAccountName"]);
    let mut grants: Vec<String> = Vec::new();
    for rule in docs[1]["rules"].as_sequence().unwrap() {
        for res in rule["resources"].as_sequence().unwrap() {
            for verb in rule["verbs"].as_sequence().unwrap() {
                grants.push(format!("{}:{}", res.as_str().unwrap(), verb.as_str().unwrap()));
            }
        }
    }
    grants.sort();
    assert_eq!(
        grants,
        ["endpointslices:list", "endpointslices:watch", "nodes/status:patch", "nodes:get", "nodes:list", "nodes:watch", "services:list", "services:watch"]
    );
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
    let run = parse_run_with_env(&argv, &BTreeMap::new());
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
