//! The service registry against a real etcd (in the test bed's underlay namespace): apply,
//! allocation (also under concurrency), immutability, delete, the cluster's service ranges,
//! the kubectl-like command line, the watch, and a registry edit reaching the dataplane of
//! every node.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use clap::Parser;
use common::*;
use netd_proxy::registry::cli::{run_cli_to, ServiceCommand};
use netd_proxy::registry::{apply_manifests, AllocOptions, ClusterConfig, RegistryError, RegistryOptions, ServiceRegistry};
use netd_proxy::{NodeInfo, NsName, ProxyConfig, ProxyMode};
use netd_tests::{netd_binary, wait_until, Cluster};

/// Runs `f` with a connected registry on a thread inside the underlay namespace (where etcd is).
fn with_registry<T: Send + 'static, F>(c: &Cluster, f: impl FnOnce(ServiceRegistry) -> F + Send + 'static) -> T
where
    F: std::future::Future<Output = T>,
{
    let opts = RegistryOptions::new(vec![c.etcd().endpoint()]);
    in_netns(c.underlay().name(), move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let reg = ServiceRegistry::connect(&opts).await.unwrap();
            f(reg).await
        })
    })
}

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: web, namespace: shop}
subsets:
- addresses: [{ip: 10.244.1.3, nodeName: node0}]
  ports: [{name: http, port: 8080}]
"#;

#[test]
fn apply_allocates_once_keeps_allocations_and_delete_releases_them() -> Result<()> {
    let c = Cluster::new(0)?;
    let (first, second, after_delete) = with_registry(&c, |reg| async move {
        let alloc = AllocOptions::default();
        reg.apply(apply_manifests(WEB).unwrap(), &alloc).await.unwrap();
        let first = reg.get_service(&NsName::new("shop", "web")).await.unwrap().unwrap();
        // Applying the same manifest again keeps the ClusterIP and the nodePort, and says so.
        let again = reg.apply(apply_manifests(WEB).unwrap(), &alloc).await.unwrap();
        let shown: Vec<String> = again.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["service/web unchanged", "endpoints/web unchanged"]);
        let second = reg.get_service(&NsName::new("shop", "web")).await.unwrap().unwrap();
        reg.delete_service(&NsName::new("shop", "web")).await.unwrap();
        let snap = reg.snapshot().await.unwrap();
        (first, second, snap)
    });
    let spec = first.spec.clone().unwrap();
    let ip: Ipv4Addr = spec.cluster_ip.clone().unwrap().parse()?;
    ensure!("10.96.0.0/12".parse::<ipnet::Ipv4Net>()?.contains(&ip), "{ip}");
    let np = spec.ports.as_ref().unwrap()[0].node_port.unwrap();
    ensure!((30000..=32767).contains(&np), "{np}");
    assert_eq!(second.spec.as_ref().unwrap().cluster_ip, spec.cluster_ip);
    assert_eq!(second.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].node_port, Some(np));
    ensure!(after_delete.services().is_empty());
    assert_eq!(after_delete.slice_count(), 0, "the Service's EndpointSlices go with it");
    let allocations = c.etcd().get_prefix("/netd/registry/allocations/")?;
    ensure!(allocations.is_empty(), "delete released {allocations:?}");
    Ok(())
}

#[test]
fn concurrent_applies_never_hand_out_an_address_or_port_twice() -> Result<()> {
    let c = Cluster::new(0)?;
    let results = with_registry(&c, |reg| async move {
        // 14 usable addresses and 20 ports for 15 services applied at once.
        let alloc = AllocOptions::ranges("10.96.0.0/28".parse().unwrap(), 30000..=30019);
        let mut tasks = Vec::new();
        for i in 0..15 {
            let reg = reg.clone();
            let alloc = alloc.clone();
            let m = format!("{{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {{\"name\": \"s{i}\"}}, \"spec\": {{\"type\": \"NodePort\", \"ports\": [{{\"port\": 80}}]}}}}");
            tasks.push(tokio::spawn(async move { reg.apply(apply_manifests(&m).unwrap(), &alloc).await }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        (out, reg.snapshot().await.unwrap())
    });
    let (results, snap) = results;
    let failed: Vec<&RegistryError> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(failed.len(), 1, "exactly one service finds the range full: {failed:?}");
    ensure!(failed[0].to_string().contains("no free address"), "{}", failed[0]);
    let mut ips = BTreeSet::new();
    let mut ports = BTreeSet::new();
    for s in snap.services().values() {
        let spec = s.spec.as_ref().unwrap();
        ensure!(ips.insert(spec.cluster_ip.clone().unwrap()), "ClusterIP handed out twice");
        ensure!(ports.insert(spec.ports.as_ref().unwrap()[0].node_port.unwrap()), "nodePort handed out twice");
    }
    assert_eq!(ips.len(), 14);
    Ok(())
}

#[test]
fn cluster_ips_are_immutable_and_taken_ones_are_refused() -> Result<()> {
    let c = Cluster::new(0)?;
    let (changed, taken) = with_registry(&c, |reg| async move {
        let alloc = AllocOptions::default();
        let m = |name: &str, ip: &str| format!("{{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {{\"name\": \"{name}\"}}, \"spec\": {{\"clusterIP\": \"{ip}\", \"ports\": [{{\"port\": 80}}]}}}}");
        reg.apply(apply_manifests(&m("a", "10.96.0.100")).unwrap(), &alloc).await.unwrap();
        let changed = reg.apply(apply_manifests(&m("a", "10.96.0.101")).unwrap(), &alloc).await.unwrap_err().to_string();
        let taken = reg.apply(apply_manifests(&m("b", "10.96.0.100")).unwrap(), &alloc).await.unwrap_err().to_string();
        (changed, taken)
    });
    ensure!(changed.contains("spec.clusterIP") && changed.contains("field is immutable"), "{changed}");
    ensure!(taken.contains("provided IP is already allocated"), "{taken}");
    Ok(())
}

#[derive(Parser)]
struct Netd {
    #[command(subcommand)]
    cmd: ServiceCommand,
}

/// `netd ARGS... --etcd-endpoints <the cluster's>` as an operator types it, run in this process
/// inside the underlay namespace: what it printed, or its error.
fn netd(c: &Cluster, args: &[&str]) -> std::result::Result<String, String> {
    let mut argv: Vec<String> = std::iter::once("netd").chain(args.iter().copied()).map(String::from).collect();
    argv.extend(["--etcd-endpoints".to_string(), c.etcd().endpoint()]);
    let cmd = Netd::try_parse_from(argv).map_err(|e| e.to_string())?.cmd;
    in_netns(c.underlay().name(), move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut out = Vec::new();
        let r = rt.block_on(run_cli_to(cmd, &mut out));
        r.map(|()| String::from_utf8(out).unwrap()).map_err(|e| e.to_string())
    })
}

/// A manifest in a temporary file.
fn file(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

fn services(names: impl IntoIterator<Item = String>, spec: &str) -> String {
    names
        .into_iter()
        .map(|n| format!("{{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {{\"name\": \"{n}\"}}, \"spec\": {spec}}}"))
        .collect::<Vec<_>>()
        .join("\n---\n")
}

#[test]
fn a_yaml_typo_is_one_error_with_line_and_column_in_bounded_memory() -> Result<()> {
    // `{a` made `netd apply` collect the same parse error until the OOM killer stopped it: run
    // the real binary with 1 GB of address space and a timeout, so a regression fails here
    // instead of eating the machine.
    let bin = netd_binary()?;
    let bad = file("{a");
    for dry in [&["--dry-run"][..], &[]] {
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "ulimit -v 1000000; bin=$0; f=$1; shift; exec timeout 60 \"$bin\" apply -f \"$f\" \"$@\""]).arg(&bin).arg(bad.path()).args(dry);
        // Without --dry-run: the parse fails before any connection (none is listening there).
        cmd.args(["--etcd-endpoints", "http://127.0.0.1:9"]);
        let out = cmd.output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.matches("did not find expected ',' or '}' at line 2 column 1").count(), 1, "{stderr}");
    }
    Ok(())
}

#[test]
fn a_file_that_cannot_be_applied_writes_nothing() -> Result<()> {
    let c = Cluster::new(0)?;
    netd(&c, &["apply", "-f", file(&services(["x".to_string()], r#"{"clusterIP": "10.96.0.50", "ports": [{"port": 80}]}"#)).path().to_str().unwrap()]).unwrap();
    // Two good Services, then one asking for x's address: none of the three is written.
    let mut text = services(["a".to_string(), "b".to_string()], r#"{"ports": [{"port": 80}]}"#);
    text.push_str("\n---\n");
    text.push_str(&services(["c".to_string()], r#"{"clusterIP": "10.96.0.50", "ports": [{"port": 80}]}"#));
    let err = netd(&c, &["apply", "-f", file(&text).path().to_str().unwrap()]).unwrap_err();
    assert_eq!(err, "service/c: spec.clusterIP: Invalid value: \"10.96.0.50\": provided IP is already allocated");
    let stored: Vec<String> = c.etcd().get_prefix("/netd/registry/services/")?.into_iter().map(|(k, _)| k).collect();
    assert_eq!(stored, ["/netd/registry/services/default/x"]);
    assert_eq!(c.etcd().get_prefix("/netd/registry/allocations/")?.len(), 1);
    Ok(())
}

#[test]
fn ten_thousand_services_each_get_an_address_of_their_own() -> Result<()> {
    let c = Cluster::new(0)?;
    let n = 10_000;
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "---\n{{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {{\"name\": \"s{i}\"}}, \"spec\": {{\"ports\": [{{\"port\": 80}}]}}}}\n\
             ---\n{{\"apiVersion\": \"discovery.k8s.io/v1\", \"kind\": \"EndpointSlice\", \"metadata\": {{\"name\": \"s{i}-a\", \"labels\": {{\"kubernetes.io/service-name\": \"s{i}\"}}}}, \"addressType\": \"IPv4\", \"endpoints\": [{{\"addresses\": [\"10.244.{}.{}\"]}}]}}\n",
            i / 200,
            i % 200 + 1
        ));
    }
    let out = netd(&c, &["apply", "-f", file(&text).path().to_str().unwrap()]).unwrap();
    assert_eq!(out.lines().filter(|l| l.ends_with(" created")).count(), 2 * n);
    let ips = c.etcd().get_prefix("/netd/registry/allocations/clusterips/")?;
    let owners: BTreeSet<&str> = ips.iter().map(|(_, v)| v.as_str()).collect();
    assert_eq!((ips.len(), owners.len()), (n, n), "one address per Service");
    for (k, _) in &ips {
        let ip: Ipv4Addr = k.rsplit('/').next().unwrap().parse()?;
        ensure!(ip != Ipv4Addr::new(10, 96, 0, 0) && ip != Ipv4Addr::new(10, 111, 255, 255), "{ip}");
    }
    assert_eq!(c.etcd().get_prefix("/netd/registry/services/")?.len(), n);
    assert_eq!(c.etcd().get_prefix("/netd/registry/endpointslices/")?.len(), n);
    Ok(())
}

#[test]
fn two_concurrent_applies_of_many_services_never_share_an_address_or_port() -> Result<()> {
    let c = Cluster::new(0)?;
    // 2 x 250 NodePort Services into 510 addresses and 600 ports: the two planners pick the
    // same address or port many times; the losing transaction is planned again.
    let results = with_registry(&c, |reg| async move {
        let alloc = AllocOptions::ranges("10.96.0.0/23".parse().unwrap(), 30000..=30599);
        let mut tasks = Vec::new();
        for who in ["a", "b"] {
            let (reg, alloc) = (reg.clone(), alloc.clone());
            let text = services((0..250).map(|i| format!("{who}{i}")), r#"{"type": "NodePort", "ports": [{"port": 80}]}"#);
            tasks.push(tokio::spawn(async move { reg.apply(apply_manifests(&text).unwrap(), &alloc).await }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap().map(|r| r.len()).map_err(|e| e.to_string()));
        }
        out
    });
    assert_eq!(results, [Ok(250), Ok(250)]);
    let mut ips = BTreeSet::new();
    let mut ports = BTreeSet::new();
    for (_, v) in c.etcd().get_prefix("/netd/registry/services/")? {
        let s: k8s_openapi::api::core::v1::Service = serde_json::from_str(&v)?;
        let spec = s.spec.unwrap();
        ensure!(ips.insert(spec.cluster_ip.unwrap()), "ClusterIP handed out twice");
        ensure!(ports.insert(spec.ports.unwrap()[0].node_port.unwrap()), "nodePort handed out twice");
    }
    assert_eq!((ips.len(), ports.len()), (500, 500));
    assert_eq!(c.etcd().get_prefix("/netd/registry/allocations/")?.len(), 1000);
    Ok(())
}

#[test]
fn a_dual_stack_service_is_refused_with_the_api_servers_message() -> Result<()> {
    let c = Cluster::new(0)?;
    let text = services(["dual".to_string()], r#"{"ipFamilyPolicy": "RequireDualStack", "selector": {"app": "x"}, "ports": [{"port": 80}]}"#);
    let err = netd(&c, &["apply", "-f", file(&text).path().to_str().unwrap()]).unwrap_err();
    assert_eq!(err, "document 1 (Service default/dual): spec.ipFamilyPolicy: Invalid value: \"RequireDualStack\": this cluster is not configured for dual-stack services");
    ensure!(c.etcd().get_prefix("/netd/registry/services/")?.is_empty());
    Ok(())
}

#[test]
fn network_and_broadcast_addresses_are_never_cluster_ips() -> Result<()> {
    let c = Cluster::new(0)?;
    netd(&c, &["config", "set", "--service-cidr", "10.96.0.0/30"]).unwrap();
    let apply = |name: &str, spec: &str| netd(&c, &["apply", "-f", file(&services([name.to_string()], spec)).path().to_str().unwrap()]);
    for ip in ["10.96.0.0", "10.96.0.3"] {
        let err = apply("explicit", &format!(r#"{{"clusterIP": "{ip}", "ports": [{{"port": 80}}]}}"#)).unwrap_err();
        assert_eq!(err, format!("service/explicit: spec.clusterIP: Invalid value: \"{ip}\": provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/30"));
    }
    apply("a", r#"{"ports": [{"port": 80}]}"#).unwrap();
    apply("b", r#"{"ports": [{"port": 80}]}"#).unwrap();
    let err = apply("c", r#"{"ports": [{"port": 80}]}"#).unwrap_err();
    ensure!(err.contains("no free address in 10.96.0.0/30"), "{err}");
    let ips: Vec<String> = c.etcd().get_prefix("/netd/registry/allocations/clusterips/")?.into_iter().map(|(k, _)| k.rsplit('/').next().unwrap().to_string()).collect();
    assert_eq!(ips, ["10.96.0.1", "10.96.0.2"]);
    Ok(())
}

#[test]
fn the_service_ranges_live_in_etcd_set_once_for_every_client_and_node() -> Result<()> {
    let c = Cluster::new(0)?;
    let np = r#"{"type": "NodePort", "ports": [{"port": 80}]}"#;
    let a = file(&services(["a".to_string()], np));
    let b = file(&services(["b".to_string()], np));
    let (a, b) = (a.path().to_str().unwrap(), b.path().to_str().unwrap());
    assert_eq!(netd(&c, &["config", "get"]).unwrap_err(), "cluster config (/netd/registry/config; `netd config set` or the first `netd apply` sets it) not found");
    // The first apply seeds them from its flags.
    netd(&c, &["apply", "-f", a, "--service-cidr", "10.100.0.0/16", "--service-node-port-range", "31000-31099"]).unwrap();
    assert_eq!(c.etcd().get("/netd/registry/config")?.as_deref(), Some(r#"{"serviceClusterIPRange":"10.100.0.0/16","serviceNodePortRange":"31000-31099"}"#));
    // Another operator's different flag is an error naming both values, and writes nothing.
    let err = netd(&c, &["apply", "-f", b, "--service-cidr", "10.200.0.0/16"]).unwrap_err();
    ensure!(err.starts_with("--service-cidr 10.200.0.0/16 disagrees with the cluster's serviceClusterIPRange 10.100.0.0/16"), "{err}");
    ensure!(c.etcd().get("/netd/registry/services/default/b")?.is_none());
    // Without flags, the cluster's ranges.
    netd(&c, &["apply", "-f", b]).unwrap();
    let svc: k8s_openapi::api::core::v1::Service = serde_json::from_str(&c.etcd().get("/netd/registry/services/default/b")?.unwrap())?;
    let spec = svc.spec.unwrap();
    ensure!("10.100.0.0/16".parse::<ipnet::Ipv4Net>()?.contains(&spec.cluster_ip.clone().unwrap().parse::<Ipv4Addr>()?), "{:?}", spec.cluster_ip);
    ensure!((31000..=31099).contains(&spec.ports.unwrap()[0].node_port.unwrap()));
    assert_eq!(netd(&c, &["config", "get"]).unwrap(), "serviceClusterIPRange: 10.100.0.0/16\nserviceNodePortRange: 31000-31099\n");
    // A range that would strand the Services' addresses is refused; once they are gone it is set.
    let err = netd(&c, &["config", "set", "--service-cidr", "10.200.0.0/16"]).unwrap_err();
    ensure!(err.contains("would leave allocations outside it: service default/a has ClusterIP 10.100."), "{err}");
    // Nodes see the ranges in their snapshot, and changes through the watch.
    let seen = with_registry(&c, |reg| async move {
        let first = reg.snapshot().await.unwrap().cluster_config;
        let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(netd_proxy::ServiceSnapshot::new()));
        let watcher = reg.clone();
        let (status, _status_rx) = tokio::sync::watch::channel(netd_proxy::registry::WatchStatus::default());
        let watch = tokio::spawn(async move { watcher.run_watch(tx, &status).await });
        reg.delete_service(&NsName::new("default", "a")).await.unwrap();
        reg.delete_service(&NsName::new("default", "b")).await.unwrap();
        let set = reg.set_cluster_config(&AllocOptions { service_cidr: Some("10.96.0.0/12".parse().unwrap()), node_ports: None }).await.unwrap();
        let changed = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(c) = rx.borrow_and_update().cluster_config.clone().filter(|c| *c == set) {
                    return c;
                }
                rx.changed().await.unwrap();
            }
        })
        .await
        .expect("the watch delivers the new ranges");
        watch.abort();
        (first, changed)
    });
    let seeded = AllocOptions::ranges("10.100.0.0/16".parse()?, 31000..=31099).over(&ClusterConfig::default());
    assert_eq!(seen.0, Some(seeded));
    assert_eq!(seen.1, AllocOptions::ranges("10.96.0.0/12".parse()?, 31000..=31099).over(&ClusterConfig::default()));
    Ok(())
}

#[test]
fn the_command_line_behaves_like_kubectl() -> Result<()> {
    let c = Cluster::new(0)?;
    let web = file(WEB);
    let web = web.path().to_str().unwrap();
    assert_eq!(netd(&c, &["apply", "-f", web]).unwrap(), "service/web created\nendpoints/web created\n");
    assert_eq!(netd(&c, &["apply", "-f", web]).unwrap(), "service/web unchanged\nendpoints/web unchanged\n");
    // One object is printed as that object, several as a List.
    let one = netd(&c, &["get", "svc", "web", "-n", "shop", "-o", "yaml"]).unwrap();
    ensure!(one.starts_with("apiVersion: v1\n") && one.contains("\nkind: Service\n") && !one.contains("List"), "{one}");
    let all = netd(&c, &["get", "services", "-A", "-o", "json"]).unwrap();
    ensure!(all.contains("\"kind\": \"List\""), "{all}");
    let ep = netd(&c, &["get", "ep", "web", "-n", "shop", "-o", "json"]).unwrap();
    ensure!(ep.contains("\"kind\": \"EndpointSlice\"") && !ep.contains("List"), "{ep}");
    // Not found is an error for every kind.
    for (kind, word) in [("svc", "service"), ("endpoints", "endpoints"), ("endpointslice", "endpointslice")] {
        assert_eq!(netd(&c, &["get", kind, "nope", "-n", "shop"]).unwrap_err(), format!("{word} \"nope\" in namespace \"shop\" not found"));
        ensure!(netd(&c, &["delete", kind, "nope", "-n", "shop"]).unwrap_err().ends_with("not found"));
    }
    // delete -f: what the file names; the Service's EndpointSlices go with it.
    let extra = file(
        r#"{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "web-extra", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}}, "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.1.9"]}]}"#,
    );
    netd(&c, &["apply", "-f", extra.path().to_str().unwrap()]).unwrap();
    assert_eq!(netd(&c, &["delete", "-f", web]).unwrap(), "service \"web\" deleted\nendpoints \"web\" deleted\n");
    ensure!(c.etcd().get_prefix("/netd/registry/endpointslices/")?.is_empty() && c.etcd().get_prefix("/netd/registry/allocations/")?.is_empty());
    assert_eq!(netd(&c, &["delete", "-f", web]).unwrap_err(), "service \"web\" in namespace \"shop\" not found, endpoints \"web\" in namespace \"shop\" not found");
    // And the binary exits 1 on not found, whatever the kind.
    let bin = netd_binary()?;
    for kind in ["svc", "ep", "endpointslices"] {
        let out = c.underlay().exec(&[bin.to_str().unwrap(), "get", kind, "nope", "--etcd-endpoints", &c.etcd().endpoint()])?;
        assert_eq!(out.status.code(), Some(1), "get {kind}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// `run_watch` + `run_proxy` inside a node namespace, as the netd daemon will run them.
struct NodeProxy {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NodeProxy {
    fn start(c: &Cluster, i: usize) -> NodeProxy {
        let node = c.node(i);
        let opts = RegistryOptions::new(vec![c.etcd().endpoint()]);
        let info = NodeInfo { name: node.name(), ips: vec![node.ip()], pod_cidr: None, cluster_cidr: Some("10.244.0.0/16".parse().unwrap()), local_service_ips: Vec::new() };
        let mut cfg = ProxyConfig::new(info, ProxyMode::Nftables);
        cfg.resync_interval = Duration::from_secs(1);
        cfg.health_bind = None;
        let path = format!("/run/netns/{}", node.ns().name());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            enter(&path).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let reg = ServiceRegistry::connect(&opts).await.unwrap();
                let (tx, rx) = tokio::sync::watch::channel(Arc::new(netd_proxy::ServiceSnapshot::new()));
                let (status, _) = tokio::sync::watch::channel(Default::default());
                tokio::select! {
                    _ = reg.run_watch(tx, &status) => {}
                    r = netd_proxy::run_proxy(cfg, rx) => { r.unwrap(); }
                    _ = stopped => {}
                }
            });
        });
        NodeProxy { stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for NodeProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_registry_edit_reaches_every_node() -> Result<()> {
    let c = Cluster::new(3)?;
    let proxies: Vec<NodeProxy> = (0..3).map(|i| NodeProxy::start(&c, i)).collect();
    let m = |ip: &str| {
        format!(
            r#"{{"apiVersion": "v1", "kind": "Service", "metadata": {{"name": "api"}}, "spec": {{"clusterIP": "10.96.0.77", "ports": [{{"port": 443}}]}}}}
---
{{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {{"name": "api-1", "labels": {{"kubernetes.io/service-name": "api"}}}},
  "addressType": "IPv4", "ports": [{{"port": 6443}}], "endpoints": [{{"addresses": ["{ip}"]}}]}}"#
        )
    };
    for ep in ["10.244.5.5", "10.244.6.6"] {
        let text = m(ep);
        with_registry(&c, move |reg| async move { reg.apply(apply_manifests(&text).unwrap(), &AllocOptions::default()).await.unwrap() });
        for node in c.nodes() {
            wait_until(WAIT, POLL, || {
                let t = node.ns().run(&["nft", "list", "table", "ip", "netd-proxy"])?;
                Ok(t.contains("10.96.0.77 . tcp . 443 : goto lb-1") && t.contains(&format!("10.96.0.77 . tcp . 443 . 0x00000000 : {ep} . 6443")))
            })?;
        }
    }
    // And a delete reaches them too.
    with_registry(&c, |reg| async move { reg.delete_service(&NsName::new("default", "api")).await.unwrap() });
    for node in c.nodes() {
        wait_until(WAIT, POLL, || Ok(!node.ns().run(&["nft", "list", "table", "ip", "netd-proxy"])?.contains("10.96.0.77")))?;
    }
    drop(proxies);
    Ok(())
}

/// Runs `f` with a plain etcd client, on a thread inside the underlay namespace.
fn with_client<T: Send + 'static, F>(c: &Cluster, f: impl FnOnce(etcd_client::Client) -> F + Send + 'static) -> T
where
    F: std::future::Future<Output = T>,
{
    let endpoint = c.etcd().endpoint();
    in_netns(c.underlay().name(), move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move { f(etcd_client::Client::connect([endpoint], None).await.unwrap()).await })
    })
}

/// The paged list against a real etcd, in the subnet registry's layout: pages of 4 keys, every
/// lease across the page boundaries in key order, nothing from a neighbouring prefix, and the
/// revision etcd was at.
#[test]
fn paged_list_returns_every_subnet_lease_at_one_revision() -> Result<()> {
    let c = Cluster::new(0)?;
    let mut kvs: Vec<(String, String)> = (0..25).map(|i| (format!("/coreos.com/network/subnets/10.244.{i}.0-24"), format!(r#"{{"PublicIP":"198.18.0.{i}"}}"#))).collect();
    kvs.push(("/coreos.com/network/subnets0".into(), "just after the range".into()));
    kvs.push(("/coreos.com/network/subnet".into(), "just before it".into()));
    c.etcd().put_all(&kvs)?;
    let (listing, newest) = with_client(&c, |client| async move {
        let listing = netd_proxy::etcd::list_prefix_paged(&client, "/coreos.com/network/subnets/", 4).await.unwrap();
        let newest = client.kv_client().get("/none", None).await.unwrap().header().unwrap().revision();
        (listing, newest)
    });
    let mut want: Vec<String> = kvs[..25].iter().map(|(k, _)| k.clone()).collect();
    want.sort();
    let got: Vec<String> = listing.kvs.iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect();
    assert_eq!(got, want);
    assert_eq!(listing.revision, newest);
    Ok(())
}

/// Values too big for pages of the default size in one gRPC message (4 MiB): the list reads
/// smaller pages instead of failing like one `get --prefix` does.
#[test]
fn pages_too_big_for_one_grpc_message_are_read_in_smaller_ones() -> Result<()> {
    let c = Cluster::new(0)?;
    let kvs: Vec<(String, String)> = (0..10).map(|i| (format!("/ntb/big/{i}"), format!("{i}").repeat(1 << 20))).collect();
    c.etcd().put_all(&kvs)?;
    let (whole, listing) = with_client(&c, |client| async move {
        let whole = client.kv_client().get("/ntb/big/", Some(etcd_client::GetOptions::new().with_prefix())).await.map(drop).map_err(|e| e.to_string());
        (whole, netd_proxy::etcd::list_prefix(&client, "/ntb/big/").await.unwrap())
    });
    let e = whole.expect_err("10 MiB do not fit one message");
    assert!(e.contains("message length too large"), "{e}");
    assert_eq!(listing.kvs.len(), 10);
    assert!(listing.kvs.iter().enumerate().all(|(i, kv)| kv.value().len() == 1 << 20 && kv.value()[0] == b'0' + i as u8));
    Ok(())
}
