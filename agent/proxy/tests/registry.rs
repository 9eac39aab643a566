//! The service registry against a real etcd (in the test bed's underlay namespace): apply,
//! allocation (also under concurrency), immutability, delete, the watch, and a registry edit
//! reaching the dataplane of every node.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use common::*;
use netd_proxy::registry::{apply_manifests, AllocOptions, RegistryError, RegistryOptions, ServiceRegistry};
use netd_proxy::{NodeInfo, NsName, ProxyConfig, ProxyMode};
use netd_tests::{wait_until, Cluster};

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
        // Applying the same manifest again keeps the ClusterIP and the nodePort.
        let again = reg.apply(apply_manifests(WEB).unwrap(), &alloc).await.unwrap();
        assert!(again.iter().all(|a| !a.created), "{again:?}");
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
    assert_eq!(after_delete.slice_count(), 1, "the converted Endpoints stay");
    let allocations = c.etcd().get_prefix("/netd/registry/allocations/")?;
    ensure!(allocations.is_empty(), "delete released {allocations:?}");
    Ok(())
}

#[test]
fn concurrent_applies_never_hand_out_an_address_or_port_twice() -> Result<()> {
    let c = Cluster::new(0)?;
    let results = with_registry(&c, |reg| async move {
        // 14 usable addresses and 20 ports for 15 services applied at once.
        let alloc = AllocOptions { service_cidr: "10.96.0.0/28".parse().unwrap(), node_ports: 30000..=30019 };
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
