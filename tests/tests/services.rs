//! Services end to end (issue: the kube-proxy dataplane): manifests applied with `netd apply`
//! into the etcd registry, every node's netd programming its dataplane, real clients (socat, curl)
//! in pod namespaces and in an "outside" namespace on the underlay. Run for both backends.

use std::time::Duration;

use anyhow::{Context, Result};
use netd_tests::ebpf::{ask_in_cgroup, ask_in_cgroup_from, netd_ebpf_probe, netd_ebpf_tc_probe, EbpfSandbox};
use netd_tests::{kube_node, netd_binary, wait_until, Cluster, FakeApiServer, Pod};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

fn cluster(n: usize, mode: &str) -> Result<Cluster> {
    cluster_with(n, &["--proxy-mode", mode])
}

/// `n` nodes running netd with `args`, each with its subnet and CNI config.
fn cluster_with(n: usize, args: &[&str]) -> Result<Cluster> {
    let mut c = Cluster::new(n)?;
    c.write_network_config(VXLAN)?;
    c.start_netd_all(args)?;
    for i in 0..n {
        c.node_mut(i).wait_ready(WAIT)?;
    }
    Ok(c)
}

/// `netd apply -f -` run on the underlay (where etcd is), as an operator would.
fn apply(c: &Cluster, manifest: &str) -> Result<String> {
    c.netd_apply(manifest)
}

fn service(name: &str, ip: &str, ty: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: {ty}\n  clusterIP: {ip}\n  selector:\n    app: {name}\n  ports:\n  - name: http\n    protocol: TCP\n    port: 80\n    targetPort: 8080\n{extra}---\n"
    )
}

fn slice(name: &str, endpoints: &[(&Pod, &str)]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- name: http\n  protocol: TCP\n  port: 8080\nendpoints:\n"
    );
    for (pod, node) in endpoints {
        s.push_str(&format!("- addresses: [\"{}\"]\n  conditions:\n    ready: true\n  nodeName: {node}\n", pod.ip));
    }
    s.push_str("---\n");
    s
}

/// A TCP server on port 8080 in the pod that answers with its own name.
fn serve(pod: &Pod, name: &str) -> Result<std::process::Child> {
    pod.spawn(&["socat", "TCP-LISTEN:8080,fork,reuseaddr", &format!("SYSTEM:echo {name}")], None)
}

/// One TCP exchange from `ns` to `addr`: the answer, or the error socat printed.
fn ask(pod_or_ns: &netd_tests::Netns, addr: &str) -> Result<String> {
    let out = pod_or_ns.exec(&["socat", "-T", "3", "-", &format!("TCP:{addr},connect-timeout=3")])?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Ok(format!("ERROR {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn services_end_to_end(mode: &str) -> Result<()> {
    let mut c = cluster(3, mode)?;
    let a = c.node_mut(0).add_cni_pod("a")?;
    let b = c.node_mut(1).add_cni_pod("b")?;
    let d = c.node_mut(2).add_cni_pod("d")?;
    let _sb = serve(&b, "b")?;
    let _sd = serve(&d, "d")?;
    let manifest = [
        service("web", "10.96.0.50", "NodePort", "    nodePort: 30080\n"),
        slice("web", &[(&b, "node1")]),
        service("empty", "10.96.0.51", "ClusterIP", ""),
    ]
    .concat();
    let out = apply(&c, &manifest)?;
    assert!(out.contains("service/default/web") || out.contains("web"), "{out}");

    // ClusterIP from a pod on another node reaches the backend.
    wait_until(WAIT, POLL, || Ok(ask(&a.ns, "10.96.0.50:80")? == "b"))?;
    // NodePort from outside the cluster (the underlay), on a node without the backend.
    wait_until(WAIT, POLL, || Ok(ask(c.underlay(), &format!("{}:30080", c.node(0).ip()))? == "b"))?;
    // A service without endpoints rejects at once instead of hanging.
    let refused = ask(&a.ns, "10.96.0.51:80")?;
    assert!(refused.contains("Connection refused") || refused.contains("No route to host") || refused.contains("unreachable"), "{refused}");

    // A registry edit reaches every node: the endpoint moves to d on node2.
    apply(&c, &slice("web", &[(&d, "node2")]))?;
    wait_until(WAIT, POLL, || Ok(ask(&a.ns, "10.96.0.50:80")? == "d"))?;
    wait_until(WAIT, POLL, || Ok(ask(&b.ns, "10.96.0.50:80")? == "d"))?;
    wait_until(WAIT, POLL, || Ok(ask(c.underlay(), &format!("{}:30080", c.node(1).ip()))? == "d"))?;

    // `netd status` reports the services programmed.
    let bin = netd_binary()?;
    let n0 = c.node(0);
    wait_until(WAIT, POLL, || {
        let out = n0.ns().exec(&[bin.to_str().unwrap(), "status", "--run-dir", n0.run_dir().to_str().unwrap()])?;
        Ok(String::from_utf8_lossy(&out.stdout).contains(&format!("services  2 programmed by {mode}")))
    })?;
    Ok(())
}

#[test]
fn services_with_nftables() -> Result<()> {
    services_end_to_end("nftables")
}

#[test]
fn services_with_iptables() -> Result<()> {
    services_end_to_end("iptables")
}

/// 1000 services at once, on both nodes; a sample answers.
#[test]
fn a_thousand_services() -> Result<()> {
    let mut c = cluster(2, "nftables")?;
    let a = c.node_mut(0).add_cni_pod("a")?;
    let b = c.node_mut(1).add_cni_pod("b")?;
    let _sb = serve(&b, "b")?;
    let mut manifest = String::new();
    for i in 0..1000u32 {
        let name = format!("s{i}");
        let ip = format!("10.96.{}.{}", 10 + i / 200, 1 + i % 200);
        manifest.push_str(&service(&name, &ip, "ClusterIP", ""));
        manifest.push_str(&slice(&name, &[(&b, "node1")]));
    }
    apply(&c, &manifest)?;
    for i in [0u32, 1, 499, 998, 999] {
        let ip = format!("10.96.{}.{}:80", 10 + i / 200, 1 + i % 200);
        wait_until(WAIT, POLL, || Ok(ask(&a.ns, &ip)? == "b"))?;
    }
    Ok(())
}

#[test]
fn services_from_the_kubernetes_api_server() -> Result<()> {
    let mut c = Cluster::new(2)?;
    c.write_network_config(VXLAN)?;
    let mut api = FakeApiServer::start(&c)?;
    let kubeconfig = api.kubeconfig();
    c.start_netd_all(&["--source", "kubernetes", "--kubeconfig", &kubeconfig])?;
    for i in 0..2 {
        c.node_mut(i).wait_ready(WAIT)?;
    }
    let a = c.node_mut(0).add_cni_pod("a")?;
    let b = c.node_mut(1).add_cni_pod("b")?;
    let _sb = serve(&b, "b")?;
    let svc = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default", "uid": "5b1c9f4e-0000-4000-8000-000000000001"},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.60", "clusterIPs": ["10.96.0.60"], "ipFamilies": ["IPv4"],
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}], "selector": {"app": "web"},
                 "sessionAffinity": "None", "internalTrafficPolicy": "Cluster"},
        "status": {"loadBalancer": {}}
    });
    let slice = serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abcde", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": [{"addresses": [b.ip.to_string()], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": "node1"}]
    });
    api.load(serde_json::json!([svc, slice]))?;
    wait_until(WAIT, POLL, || Ok(ask(&a.ns, "10.96.0.60:80")? == "b"))?;
    // DNS serves the same model as the proxy, whichever the source.
    wait_until(WAIT, POLL, || Ok(dig(&a, &["@169.254.20.10", "+short", "web.default.svc.cluster.local"])?.trim() == "10.96.0.60"))?;

    // 410 Gone: every watch is expired and history compacted; the sources relist and carry on.
    api.cmd("compact")?;
    api.cmd("expire")?;
    api.cmd("delete endpointslice default web-abcde")?;
    wait_until(WAIT, POLL, || Ok(ask(&a.ns, "10.96.0.60:80")?.starts_with("ERROR")))?;
    api.load(serde_json::json!([slice]))?;
    wait_until(WAIT, POLL, || Ok(ask(&a.ns, "10.96.0.60:80")? == "b"))?;

    // The API server goes away: the last good state keeps serving, and status says why.
    api.cmd("stop")?;
    let bin = netd_binary()?;
    let n0 = c.node(0);
    wait_until(WAIT, POLL, || {
        let out = n0.ns().exec(&[bin.to_str().unwrap(), "status", "--run-dir", n0.run_dir().to_str().unwrap()])?;
        Ok(String::from_utf8_lossy(&out.stdout).contains("apiserver UNREACHABLE"))
    })?;
    assert_eq!(ask(&a.ns, "10.96.0.60:80")?, "b");
    api.cmd("start")?;
    Ok(())
}

/// The bootstrap deadlock: the API server's configured address (here a kubeconfig's, in a pod
/// the `kubernetes` ClusterIP) is unreachable; `--kube-api-server` names the real one, netd reads
/// the Services through it, and `netd status` says which URL it uses and where that came from.
#[test]
fn the_api_server_address_override() -> Result<()> {
    let mut c = Cluster::new(1)?;
    c.write_network_config(VXLAN)?;
    let mut api = FakeApiServer::start(&c)?;
    // The kubeconfig's server is a port of the underlay nothing listens on.
    let dead = api.dir().join("kubeconfig-dead");
    std::fs::write(&dead, std::fs::read_to_string(api.kubeconfig())?.replace("198.18.0.1:6443", "198.18.0.1:6444"))?;
    c.start_netd_all(&["--source", "kubernetes", "--kubeconfig", dead.to_str().unwrap(), "--kube-api-server", "http://198.18.0.1:6443"])?;
    c.node_mut(0).wait_subnet_env(WAIT)?;
    let svc = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default", "uid": "5b1c9f4e-0000-4000-8000-000000000002"},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.61", "clusterIPs": ["10.96.0.61"], "ipFamilies": ["IPv4"],
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}], "selector": {"app": "web"}},
        "status": {"loadBalancer": {}}
    });
    api.load(serde_json::json!([svc]))?;
    let n = c.node(0);
    wait_until(WAIT, POLL, || {
        let (_, out) = n.netd_status(&["--json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v["status"]["api_server"]["connected"] == true && v["status"]["services"]["services"].as_u64() >= Some(1))
    })?;
    let (_, out) = n.netd_status(&["--json"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["status"]["api_endpoint"]["url"], "http://198.18.0.1:6443", "{out}");
    assert_eq!(v["status"]["api_endpoint"]["from"], "--kube-api-server", "{out}");
    let (_, text) = n.netd_status(&[])?;
    assert!(text.contains("apiserver connected http://198.18.0.1:6443 (from --kube-api-server)"), "{text}");
    Ok(())
}

/// `/etc/netns/<pod>/resolv.conf`, which `ip netns exec` bind-mounts over /etc/resolv.conf: the
/// pod's resolver configuration as a kubelet writes it. Removed on drop.
struct PodResolvConf(std::path::PathBuf);

impl PodResolvConf {
    fn new(pod: &Pod, nameserver: &str) -> Result<PodResolvConf> {
        let dir = std::path::Path::new("/etc/netns").join(pod.ns.name());
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {nameserver}\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"),
        )?;
        Ok(PodResolvConf(dir))
    }
}

impl Drop for PodResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dig(pod: &Pod, args: &[&str]) -> Result<String> {
    let mut full = vec!["dig", "+time=2", "+tries=1"];
    full.extend_from_slice(args);
    Ok(String::from_utf8_lossy(&pod.exec(&full)?.stdout).into_owned())
}

/// Cluster DNS on every node, from the same registry the proxy uses: dig against the node-local
/// address and the cluster DNS IP, the glibc resolver with a pod's resolv.conf (search path,
/// ndots:5), a connection by service name, and a registry edit reaching DNS.
#[test]
fn cluster_dns_answers_from_the_registry_on_every_node() -> Result<()> {
    let mut c = cluster_with(2, &["--cluster-dns-ip", "10.96.0.10", "--dns-upstream", "198.18.0.1:53"])?;
    let conf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(c.node(0).cni_conf_dir().join("10-netd.conflist"))?)?;
    assert_eq!(conf["plugins"][0]["dns"]["nameservers"][0], "10.96.0.10", "pods are pointed at the cluster DNS IP");
    let a = c.node_mut(0).add_cni_pod("a")?;
    let b = c.node_mut(1).add_cni_pod("b")?;
    let _sb = serve(&b, "b")?;
    let headless = "apiVersion: v1\nkind: Service\nmetadata:\n  name: db\n  namespace: default\nspec:\n  clusterIP: None\n  ports:\n  - name: pg\n    protocol: TCP\n    port: 5432\n---\n";
    let db_slice = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: db-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: db\naddressType: IPv4\nports:\n- name: pg\n  protocol: TCP\n  port: 5432\nendpoints:\n- addresses: [\"{}\"]\n  hostname: db-0\n  conditions:\n    ready: true\n  nodeName: node1\n---\n",
        b.ip
    );
    apply(&c, &[service("web", "10.96.0.50", "ClusterIP", ""), slice("web", &[(&b, "node1")]), headless.to_string(), db_slice].concat())?;

    for server in ["@169.254.20.10", "@10.96.0.10"] {
        wait_until(WAIT, POLL, || Ok(dig(&a, &[server, "+short", "web.default.svc.cluster.local"])?.trim() == "10.96.0.50"))?;
    }
    assert_eq!(dig(&b, &["@10.96.0.10", "+short", "WEB.Default.svc.cluster.local"])?.trim(), "10.96.0.50", "case-insensitive, and on the other node too");
    assert_eq!(dig(&a, &["@10.96.0.10", "+short", "db.default.svc.cluster.local"])?.trim(), b.ip.to_string(), "headless: the endpoints");
    assert_eq!(dig(&a, &["@10.96.0.10", "+short", "db-0.db.default.svc.cluster.local"])?.trim(), b.ip.to_string());
    let srv = dig(&a, &["@10.96.0.10", "+short", "SRV", "_pg._tcp.db.default.svc.cluster.local"])?;
    assert!(srv.contains("5432 db-0.db.default.svc.cluster.local."), "{srv}");
    let nx = dig(&a, &["@10.96.0.10", "nope.default.svc.cluster.local"])?;
    assert!(nx.contains("status: NXDOMAIN") && nx.contains("SOA"), "{nx}");
    let ptr = dig(&a, &["@10.96.0.10", "+short", "-x", "10.96.0.50"])?;
    assert_eq!(ptr.trim(), "web.default.svc.cluster.local.");

    // The glibc resolver with the pod's resolv.conf: search path and ndots:5.
    let _rc = PodResolvConf::new(&a, "10.96.0.10")?;
    let hosts = a.run(&["getent", "hosts", "web"])?;
    assert!(hosts.starts_with("10.96.0.50"), "{hosts}");
    // A connection by name: DNS, then the service proxy, then the overlay.
    wait_until(WAIT, POLL, || Ok(ask(&a.ns, "web:80")? == "b"))?;

    // A registry edit reaches DNS on every node.
    let bin = netd_binary()?;
    c.underlay().run(&[bin.to_str().unwrap(), "delete", "service", "web", "-n", "default", "--etcd-endpoints", &c.etcd().endpoint()])?;
    for p in [&a, &b] {
        wait_until(WAIT, POLL, || Ok(dig(p, &["@10.96.0.10", "web.default.svc.cluster.local"])?.contains("status: NXDOMAIN")))?;
    }
    let n0 = c.node(0);
    let out = n0.ns().run(&[bin.to_str().unwrap(), "status", "--run-dir", n0.run_dir().to_str().unwrap()])?;
    assert!(out.contains("dns       ") && out.contains("169.254.20.10:53"), "{out}");
    Ok(())
}

/// `--subnet-manager kube` (flannel's kube subnet manager) with `--source kubernetes`: no etcd at
/// all. Each node's subnet is its Node's podCIDR, netd publishes its VTEP in the Node's flannel
/// annotations, and the peers come from the other Nodes' annotations — including a node set up
/// the way flanneld does it (its annotations written in flannel's format).
#[test]
fn node_subnets_from_the_kubernetes_api_server() -> Result<()> {
    let mut c = Cluster::new(3)?;
    let mut api = FakeApiServer::start(&c)?;
    api.load(serde_json::json!([
        kube_node("node0", "10.244.10.0/24", "198.18.0.10"),
        kube_node("node1", "10.244.11.0/24", "198.18.0.11"),
    ]))?;
    let dir = tempfile::tempdir()?;
    let net_conf = dir.path().join("net-conf.json");
    std::fs::write(&net_conf, VXLAN)?;
    let kubeconfig = api.kubeconfig();
    let args = ["--subnet-manager", "kube", "--source", "kubernetes", "--kubeconfig", &kubeconfig, "--net-conf-file", net_conf.to_str().unwrap()];
    for i in 0..2 {
        c.node_mut(i).start_netd(&args)?;
    }
    for (i, want) in ["10.244.10.1/24", "10.244.11.1/24"].iter().enumerate() {
        let env = c.node_mut(i).wait_subnet_env(WAIT)?;
        assert_eq!(&env["FLANNEL_SUBNET"], want, "node{i}'s subnet is its podCIDR");
    }
    // A flannel node: its annotations as flanneld writes them, and its VXLAN device by hand.
    let fmac = "6a:1f:3e:99:00:02";
    let mut flannel = kube_node("node2", "10.244.12.0/24", "198.18.0.12");
    flannel["metadata"]["annotations"] = serde_json::json!({
        "flannel.alpha.coreos.com/backend-data": format!("{{\"VNI\":1,\"VtepMAC\":\"{fmac}\"}}"),
        "flannel.alpha.coreos.com/backend-type": "vxlan",
        "flannel.alpha.coreos.com/kube-subnet-manager": "true",
        "flannel.alpha.coreos.com/public-ip": "198.18.0.12"
    });
    api.load(serde_json::json!([flannel]))?;
    let f = c.node(2).ns();
    f.sh(&format!(
        "ip link add flannel.1 type vxlan id 1 local 198.18.0.12 dev eth0 dstport 8472 nolearning && \
         ip link set flannel.1 address {fmac} mtu 1450 up && ip addr add 10.244.12.0/32 dev flannel.1"
    ))?;
    // netd's own annotations, read back from the API server, tell flanneld how to reach node0.
    let node0 = c.underlay().run(&["curl", "-s", "http://198.18.0.1:6443/api/v1/nodes/node0"])?;
    let node0: serde_json::Value = serde_json::from_str(&node0)?;
    let ann = &node0["metadata"]["annotations"];
    assert_eq!(ann["flannel.alpha.coreos.com/backend-type"], "vxlan", "{node0}");
    assert_eq!(ann["flannel.alpha.coreos.com/public-ip"], "198.18.0.10");
    assert_eq!(ann["flannel.alpha.coreos.com/kube-subnet-manager"], "true");
    let data: serde_json::Value = serde_json::from_str(ann["flannel.alpha.coreos.com/backend-data"].as_str().context("backend-data")?)?;
    let mac0 = data["VtepMAC"].as_str().context("VtepMAC")?;
    f.sh(&format!(
        "ip neigh replace 10.244.10.0 lladdr {mac0} dev flannel.1 nud permanent && \
         bridge fdb replace {mac0} dev flannel.1 dst 198.18.0.10 self permanent && \
         ip route replace 10.244.10.0/24 via 10.244.10.0 dev flannel.1 onlink"
    ))?;
    std::fs::write(c.node(2).run_dir().join("subnet.env"), "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.12.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")?;

    for i in 0..2 {
        let n = c.node(i);
        wait_until(WAIT, POLL, || Ok(n.cni_conf_dir().join("10-netd.conflist").exists()))?;
    }
    let a = c.node_mut(0).add_cni_pod("a")?;
    let b = c.node_mut(1).add_cni_pod("b")?;
    let fpod = c.node_mut(2).add_pod("flannel-pod")?;
    wait_until(WAIT, POLL, || Ok(a.ping(b.ip)))?;
    wait_until(WAIT, POLL, || Ok(b.ping(a.ip)))?;
    wait_until(WAIT, POLL, || Ok(a.ping(fpod.ip)))?;
    wait_until(WAIT, POLL, || Ok(fpod.ping(a.ip)))?;
    // Healthy, with no etcd anywhere.
    let bin = netd_binary()?;
    let n0 = c.node(0);
    wait_until(WAIT, POLL, || Ok(n0.ns().exec(&[bin.to_str().unwrap(), "status", "--run-dir", n0.run_dir().to_str().unwrap()])?.status.code() == Some(0)))?;
    Ok(())
}

/// A node whose service registry cannot be listed (etcd is down as it boots; its subnet comes
/// from its Node): the cluster DNS binds and answers anyway (cluster names SERVFAIL, other names
/// forwarded), `netd status` says why services wait instead of HEALTHY, and once etcd is back the
/// services and their names come.
#[test]
fn dns_serves_and_status_tells_while_the_service_registry_cannot_be_listed() -> Result<()> {
    let mut c = Cluster::new(1)?;
    let api = FakeApiServer::start(&c)?;
    let mut api = api;
    api.load(serde_json::json!([kube_node("node0", "10.244.10.0/24", "198.18.0.10")]))?;
    apply(&c, &service("web", "10.96.0.50", "ClusterIP", ""))?;
    c.etcd_mut().stop()?;
    let dir = tempfile::tempdir()?;
    let net_conf = dir.path().join("net-conf.json");
    std::fs::write(&net_conf, VXLAN)?;
    let kubeconfig = api.kubeconfig();
    let args = [
        "--subnet-manager", "kube", "--kubeconfig", &kubeconfig, "--net-conf-file", net_conf.to_str().unwrap(),
        "--cluster-dns-ip", "10.96.0.10", "--dns-upstream", "198.18.0.1:53",
    ];
    c.node_mut(0).start_netd(&args)?;
    c.node_mut(0).wait_ready(WAIT)?;
    let a = c.node_mut(0).add_cni_pod("a")?;

    let bin = netd_binary()?;
    let status = |n: &netd_tests::Node| -> Result<serde_json::Value> {
        let out = n.ns().exec(&[bin.to_str().unwrap(), "status", "--json", "--run-dir", n.run_dir().to_str().unwrap()])?;
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let why = |v: &serde_json::Value| -> Option<String> {
        v["reasons"].as_array()?.iter().filter_map(|r| r.as_str()).find(|r| r.starts_with("service registry /netd/registry/ (etcd http://198.18.0.1:2379) cannot be listed: etcd get --prefix /netd/registry/: ")).map(str::to_string)
    };
    let r = wait_until(WAIT, POLL, || Ok(why(&status(c.node(0))?).is_some()));
    let v = status(c.node(0))?;
    assert!(r.is_ok(), "status should say why services wait: {v:#}");
    assert_eq!(v["health"], "degraded");
    let why = why(&v).unwrap();
    assert!(why.contains("Connection refused") && !why.contains("Status {") && !why.contains("source:"), "one readable line: {why}");
    // DNS is up: a cluster name gets SERVFAIL at once (no zone yet), another name is forwarded
    // (to an upstream that does not answer here: the attempt is what counts).
    let answer = dig(&a, &["@10.96.0.10", "web.default.svc.cluster.local"])?;
    assert!(answer.contains("status: SERVFAIL"), "{answer}");
    dig(&a, &["@10.96.0.10", "www.example.com"])?;
    let forwarded = |v: serde_json::Value| v["status"]["dns"]["forwards"].as_u64().unwrap_or(0) + v["status"]["dns"]["forward_failures"].as_u64().unwrap_or(0);
    wait_until(WAIT, POLL, || Ok(forwarded(status(c.node(0))?) >= 1))?;

    c.etcd_mut().start()?;
    wait_until(WAIT, POLL, || Ok(dig(&a, &["@10.96.0.10", "+short", "web.default.svc.cluster.local"])?.trim() == "10.96.0.50"))?;
    let r = wait_until(WAIT, POLL, || Ok(status(c.node(0))?["health"] == "healthy"));
    assert!(r.is_ok(), "{:#}", status(c.node(0))?);
    Ok(())
}

/// The path to etcd turns into a black hole (packets dropped without a word, as when etcd's
/// machine dies or a NAT forgets the connection): the registry watch finds out by its keep-alive
/// pings instead of waiting forever, status says so, and once the path is back the node lists
/// the registry again and follows it.
#[test]
fn a_silently_dead_registry_connection_is_noticed_and_replaced() -> Result<()> {
    let c = cluster(1, "nftables")?;
    apply(&c, &service("one", "10.96.0.61", "ClusterIP", ""))?;
    let n = c.node(0);
    let programmed = |ip: &str| -> Result<bool> { Ok(n.ns().run(&["nft", "list", "table", "ip", "netd-proxy"])?.contains(ip)) };
    wait_until(WAIT, POLL, || programmed("10.96.0.61"))?;
    n.ns().sh(
        "nft add table inet ntb-cut && \
         nft add chain inet ntb-cut in '{ type filter hook input priority -300; }' && \
         nft add chain inet ntb-cut out '{ type filter hook output priority -300; }' && \
         nft add rule inet ntb-cut in tcp sport 2379 drop && nft add rule inet ntb-cut out tcp dport 2379 drop",
    )?;
    let bin = netd_binary()?;
    let followed = || -> Result<bool> {
        let out = n.ns().exec(&[bin.to_str().unwrap(), "status", "--run-dir", n.run_dir().to_str().unwrap()])?;
        Ok(!String::from_utf8_lossy(&out.stdout).contains("service registry /netd/registry/ (etcd http://198.18.0.1:2379) cannot be followed: etcd "))
    };
    let r = wait_until(WAIT, POLL, || Ok(!followed()?));
    n.ns().run(&["nft", "delete", "table", "inet", "ntb-cut"])?;
    assert!(r.is_ok(), "status should say the registry cannot be followed");
    apply(&c, &service("two", "10.96.0.62", "ClusterIP", ""))?;
    wait_until(WAIT, POLL, || programmed("10.96.0.62"))?;
    wait_until(WAIT, POLL, followed)?;
    Ok(())
}

/// `--proxy-mode ebpf`: ClusterIP by socket-level load balancing, for a client in the cgroup the
/// programs are attached to (a test cgroup here; the node's cgroup v2 root in production).
#[test]
fn services_with_ebpf_socket_load_balancing() -> Result<()> {
    if let Err(why) = netd_ebpf_probe() {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let sandbox = EbpfSandbox::new()?;
    let mut c = Cluster::new(2)?;
    c.write_network_config(VXLAN)?;
    let pins = sandbox.pins();
    let cgroup = sandbox.cgroup();
    c.node_mut(0).start_netd(&["--proxy-mode", "ebpf", "--ebpf-cgroup", cgroup.to_str().unwrap(), "--ebpf-bpffs", pins.to_str().unwrap()])?;
    c.node_mut(1).start_netd(&[])?;
    for i in 0..2 {
        c.node_mut(i).wait_ready(WAIT)?;
    }
    let a = c.node_mut(0).add_cni_pod("a")?;
    let b = c.node_mut(1).add_cni_pod("b")?;
    let _sb = serve(&b, "b")?;
    apply(&c, &[service("web", "10.96.0.50", "ClusterIP", ""), slice("web", &[(&b, "node1")]), service("empty", "10.96.0.51", "ClusterIP", "")].concat())?;
    // Into the cgroup first (from the host's view of /sys: `ip netns exec` remounts /sys), then
    // into the pod's network namespace: the process stays in the cgroup across the exec.
    let in_cgroup = |addr: &str| -> Result<String> {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {} socat -T 3 - TCP:{addr},connect-timeout=3 2>&1",
            cgroup.display(),
            a.ns.name()
        );
        let out = std::process::Command::new("sh").args(["-c", &script]).stdin(std::process::Stdio::null()).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    if let Err(e) = wait_until(WAIT, POLL, || Ok(in_cgroup("10.96.0.50:80")? == "b")) {
        let log = c.node(0).log();
        let tail: Vec<&str> = log.lines().rev().filter(|l| !l.contains("DEBUG")).take(40).collect();
        anyhow::bail!("{e}\nlast answer: {}\nnode0 log:\n{}", in_cgroup("10.96.0.50:80")?, tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    let refused = in_cgroup("10.96.0.51:80")?;
    assert!(refused.contains("Connection refused"), "{refused}");
    // Maps and links are pinned, in netd's mount namespace (`ip netns exec` gave it its own).
    let pid = c.node(0).netd_pid().context("netd pid")?.to_string();
    let out = std::process::Command::new("nsenter").args(["-t", &pid, "-m", "ls", "-R"]).arg(&pins).output()?;
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !listing.trim().is_empty(), "nothing pinned under {}: {listing}", pins.display());
    drop(c);
    Ok(())
}

/// A TCP server on port 8080 in the pod answering with its name and the address it sees the
/// client connect from (to tell SNAT from a preserved client address).
fn serve_with_peer(pod: &Pod, name: &str) -> Result<std::process::Child> {
    pod.spawn(&["socat", "TCP-LISTEN:8080,fork,reuseaddr", &format!("SYSTEM:echo {name} $SOCAT_PEERADDR")], None)
}

/// The network address of a node's pod subnet (FLANNEL_SUBNET 10.244.X.1/24 -> 10.244.X.0):
/// the address the eBPF dataplane SNATs to when it sends external traffic to another node.
fn overlay_address(env: &std::collections::HashMap<String, String>) -> Result<String> {
    let net: ipnet::Ipv4Net = env.get("FLANNEL_SUBNET").context("FLANNEL_SUBNET")?.parse()?;
    Ok(net.network().to_string())
}

/// `--proxy-mode ebpf` on every node, the whole service feature set from outside and inside:
/// ClusterIP across nodes (socket LB), NodePort from the underlay to a node without the
/// backend (tc DNAT + SNAT to the node's overlay address, reply reverse-NATed on the overlay
/// device) and to the node with it (client address kept), an external IP routed to a node,
/// externalTrafficPolicy Local (client address kept; dropped on a node without a local
/// endpoint), a LoadBalancer ingress IP, UDP, reject without endpoints, and a registry edit
/// reaching every node.
#[test]
fn services_with_ebpf_nodeport_external_ip_and_local_policy() -> Result<()> {
    if let Err(why) = netd_ebpf_probe().and_then(|()| netd_ebpf_tc_probe()) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let (mut c, sandbox, snat) = ebpf_cluster(3)?;
    let a = c.node_mut(0).add_cni_pod("a")?;
    let b = c.node_mut(1).add_cni_pod("b")?;
    let d = c.node_mut(2).add_cni_pod("d")?;
    let _sb = serve_with_peer(&b, "b")?;
    let _sd = serve_with_peer(&d, "d")?;
    let _ub = b.spawn(&["socat", "UDP-RECVFROM:5353,fork", "SYSTEM:echo ub $SOCAT_PEERADDR"], None)?;
    let (n0, n1, n2) = (c.node(0).ip(), c.node(1).ip(), c.node(2).ip());
    // The external IP is routed to node0 by the underlay (as a router would).
    c.underlay().ip(&["route", "add", "198.18.5.5/32", "via", &n0.to_string()])?;
    // The load balancer's ingress IP is routed to node2 (which has no backend of `lb`).
    c.underlay().ip(&["route", "add", "198.18.5.6/32", "via", &n2.to_string()])?;
    let manifest = [
        service("web", "10.96.0.50", "NodePort", "    nodePort: 30080\n  externalIPs: [\"198.18.5.5\"]\n"),
        slice("web", &[(&b, "node1")]),
        service("local", "10.96.0.52", "NodePort", "    nodePort: 30081\n  externalTrafficPolicy: Local\n"),
        slice("local", &[(&b, "node1")]),
        service("empty", "10.96.0.51", "NodePort", "    nodePort: 30082\n"),
        service("lb", "10.96.0.54", "LoadBalancer", "    nodePort: 30083\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 198.18.5.6\n"),
        slice("lb", &[(&b, "node1")]),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: dns\n  namespace: default\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.53\n  ports:\n  - name: dns\n    protocol: UDP\n    port: 53\n    targetPort: 5353\n    nodePort: 30053\n---\n".to_string(),
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dns-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: dns\naddressType: IPv4\nports:\n- name: dns\n  protocol: UDP\n  port: 5353\nendpoints:\n- addresses: [\"{}\"]\n  conditions:\n    ready: true\n  nodeName: node1\n---\n",
            b.ip
        ),
    ]
    .concat();
    apply(&c, &manifest)?;
    let expect = |what: &str, from: &dyn Fn() -> Result<String>, want: &str| expect_answer(&c, what, from, want);
    let cg0 = sandbox.node_cgroup(0);

    // ClusterIP across nodes, by the socket load balancer: the backend sees the pod itself.
    expect("ClusterIP from node0", &|| ask_in_cgroup(cg0, &a, "10.96.0.50:80"), &format!("b {}", a.ip))?;
    // NodePort on a node without the backend: SNAT to node0's overlay address.
    expect("NodePort via node0 (SNAT)", &|| ask(c.underlay(), &format!("{n0}:30080")), &format!("b {}", snat[0]))?;
    // NodePort on the backend's node: the client address is kept.
    expect("NodePort via node1 (local backend)", &|| ask(c.underlay(), &format!("{n1}:30080")), "b 198.18.0.1")?;
    // A LoadBalancer ingress IP, routed to node2: SNAT to node2's overlay address.
    expect("LoadBalancer IP via node2 (SNAT)", &|| ask(c.underlay(), "198.18.5.6:80"), &format!("b {}", snat[2]))?;
    // UDP NodePort through the SNAT path: the answer comes back from the NodePort.
    let udp = |addr: String| -> Result<String> {
        let out = c.underlay().exec(&["sh", "-c", &format!("echo hi | socat -T 2 - UDP:{addr} 2>&1")])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    expect("UDP NodePort via node0 (SNAT)", &|| udp(format!("{n0}:30053")), &format!("ub {}", snat[0]))?;
    expect("UDP NodePort via node1 (local backend)", &|| udp(format!("{n1}:30053")), "ub 198.18.0.1")?;
    // An external IP routed to node0.
    expect("externalIP via node0", &|| ask(c.underlay(), "198.18.5.5:80"), &format!("b {}", snat[0]))?;
    // externalTrafficPolicy Local: the client address is kept, and a node without a local
    // endpoint drops (no SNAT hop to another node).
    expect("Local policy via node1", &|| ask(c.underlay(), &format!("{n1}:30081")), "b 198.18.0.1")?;
    let dropped = ask(c.underlay(), &format!("{n0}:30081"))?;
    assert!(dropped.starts_with("ERROR") && !dropped.contains("refused"), "node0 has no local endpoint of `local`: {dropped}");
    // No endpoints at all: refused at once, from outside (NodePort) and inside (ClusterIP).
    let refused = ask(c.underlay(), &format!("{n0}:30082"))?;
    assert!(refused.contains("Connection refused"), "{refused}");
    let refused = ask_in_cgroup(cg0, &a, "10.96.0.51:80")?;
    assert!(refused.contains("Connection refused"), "{refused}");

    // A registry edit reaches every node: web's endpoint moves to d on node2.
    apply(&c, &slice("web", &[(&d, "node2")]))?;
    expect("ClusterIP after the move", &|| ask_in_cgroup(cg0, &a, "10.96.0.50:80"), &format!("d {}", a.ip))?;
    expect("NodePort via node1 after the move (SNAT)", &|| ask(c.underlay(), &format!("{n1}:30080")), &format!("d {}", snat[1]))?;
    expect("NodePort via node2 after the move (local)", &|| ask(c.underlay(), &format!("{n2}:30080")), "d 198.18.0.1")?;
    expect("NodePort via node0 after the move (SNAT)", &|| ask(c.underlay(), &format!("{n0}:30080")), &format!("d {}", snat[0]))?;
    Ok(())
}


/// `n` nodes with `--proxy-mode ebpf`, each with its own cgroup and pin
/// directory, the network ready on every one. Returns the cluster, the sandbox and the nodes' SNAT (overlay) addresses.
fn ebpf_cluster(n: usize) -> Result<(Cluster, EbpfSandbox, Vec<String>)> {
    let sandbox = EbpfSandbox::new_for_nodes(n)?;
    let mut c = Cluster::new(n)?;
    c.write_network_config(VXLAN)?;
    for i in 0..n {
        let (cg, pins) = (sandbox.node_cgroup(i).to_path_buf(), sandbox.node_pins(i));
        c.node_mut(i).start_netd(&["--proxy-mode", "ebpf", "--ebpf-cgroup", cg.to_str().unwrap(), "--ebpf-bpffs", pins.to_str().unwrap()])?;
    }
    let mut snat = Vec::new();
    for i in 0..n {
        let env = c.node_mut(i).wait_subnet_env(WAIT)?;
        snat.push(overlay_address(&env)?);
        let n = c.node(i);
        wait_until(WAIT, POLL, || Ok(n.cni_conf_dir().join("10-netd.conflist").exists()))?;
    }
    Ok((c, sandbox, snat))
}

/// Waits until `from` answers `want`; the error names the step and shows the nodes' log tails.
fn expect_answer(c: &Cluster, what: &str, from: &dyn Fn() -> Result<String>, want: &str) -> Result<()> {
    wait_until(WAIT, POLL, || Ok(from()? == want)).map_err(|e| {
        let logs: Vec<String> = (0..c.nodes().len())
            .map(|i| {
                let log = c.node(i).log();
                let tail: Vec<&str> = log.lines().rev().filter(|l| !l.contains("DEBUG")).take(15).collect();
                format!("node{i}:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })
            .collect();
        anyhow::anyhow!("{what}: {e}\nlast answer: {}\n{}", from().unwrap_or_default(), logs.join("\n"))
    })
}

/// eBPF, a NodePort Service whose only endpoint is a pod on node0, in an EndpointSlice without
/// `nodeName` (as many controllers write them): a client outside the cluster reaches it through
/// node0 itself (DNAT to the pod, the client's address kept, the reply's source put back by the
/// egress program), as well as through node1 (SNAT hop over the overlay). Node0 used to SNAT to
/// its overlay address and the pod's reply, delivered to node0's own stack, was never translated
/// back: the SYN timed out.
#[test]
fn ebpf_nodeport_through_the_node_that_hosts_the_backend() -> Result<()> {
    if let Err(why) = netd_ebpf_probe().and_then(|()| netd_ebpf_tc_probe()) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let (mut c, _sandbox, snat) = ebpf_cluster(2)?;
    let a = c.node_mut(0).add_cni_pod("a")?;
    let _sa = serve_with_peer(&a, "a")?;
    let no_node_name = slice("web", &[(&a, "")]).replace("  nodeName: \n", "\n");
    apply(&c, &[service("web", "10.96.0.50", "NodePort", "    nodePort: 30080\n"), no_node_name].concat())?;
    let (n0, n1) = (c.node(0).ip(), c.node(1).ip());
    expect_answer(&c, "NodePort via node1 (SNAT)", &|| ask(c.underlay(), &format!("{n1}:30080")), &format!("a {}", snat[1]))?;
    expect_answer(&c, "NodePort via node0 (the backend's node)", &|| ask(c.underlay(), &format!("{n0}:30080")), "a 198.18.0.1")?;
    Ok(())
}

/// `--proxy-mode ebpf` on a node where the eBPF dataplane cannot attach (here: a cgroup that does
/// not exist) falls back to nftables, loudly: services answer, `netd status` names the problem and
/// the fallback, the metric says so. With `--ebpf-fallback none` (eBPF only) nothing is
/// programmed, and that is reported the same way.
#[test]
fn ebpf_that_cannot_run_falls_back_to_nftables_unless_ebpf_only() -> Result<()> {
    if let Err(why) = netd_ebpf_probe() {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let sandbox = EbpfSandbox::new_for_nodes(2)?;
    let mut c = Cluster::new(2)?;
    c.write_network_config(VXLAN)?;
    let bogus = sandbox.node_cgroup(0).join("no-such-cgroup");
    let ebpf_args = |i: usize| -> Vec<String> {
        ["--proxy-mode", "ebpf", "--ebpf-cgroup", bogus.to_str().unwrap(), "--ebpf-bpffs", sandbox.node_pins(i).to_str().unwrap()].map(String::from).to_vec()
    };
    let args0 = ebpf_args(0);
    c.node_mut(0).start_netd(&args0.iter().map(String::as_str).collect::<Vec<_>>())?;
    let mut args1 = ebpf_args(1);
    args1.extend(["--ebpf-fallback".to_string(), "none".to_string()]);
    c.node_mut(1).start_netd(&args1.iter().map(String::as_str).collect::<Vec<_>>())?;
    for i in 0..2 {
        c.node_mut(i).wait_ready(WAIT)?;
    }
    let a = c.node_mut(0).add_cni_pod("a")?;
    let b = c.node_mut(1).add_cni_pod("b")?;
    let _sa = serve(&a, "a")?;
    let _sb = serve(&b, "b")?;
    apply(&c, &[service("web", "10.96.0.50", "ClusterIP", ""), slice("web", &[(&a, "node0"), (&b, "node1")])].concat())?;
    // node0: nftables serves the ClusterIP (the pod is in no cgroup of ours: only rules can).
    expect_answer(&c, "ClusterIP on the node that fell back", &|| Ok(if ["a", "b"].contains(&ask(&a.ns, "10.96.0.50:80")?.as_str()) { "ok".into() } else { "no".into() }), "ok")?;
    let (_, status0) = c.node(0).netd_status(&[])?;
    assert!(status0.contains("programmed by nftables (eBPF unavailable)"), "{status0}");
    assert!(status0.contains("eBPF service dataplane unavailable, services programmed by nftables instead"), "{status0}");
    assert!(status0.contains("no-such-cgroup"), "the reason names the cgroup: {status0}");
    let metric = |n: usize| -> Result<String> {
        let out = c.node(n).ns().run(&["curl", "-s", "http://127.0.0.1:9402/metrics"])?;
        Ok(out.lines().find(|l| l.starts_with("netd_service_proxy_fallback ")).unwrap_or_default().to_string())
    };
    assert_eq!(metric(0)?, "netd_service_proxy_fallback 1");
    // What the failed load pinned (its maps) is gone: nothing of eBPF's answers beside nftables.
    let pid = c.node(0).netd_pid().context("netd pid")?.to_string();
    let pins = sandbox.node_pins(0);
    let out = std::process::Command::new("nsenter").args(["-t", &pid, "-m", "ls", "-A"]).arg(&pins).output()?;
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty(), "left pinned under {}: {}", pins.display(), String::from_utf8_lossy(&out.stdout));
    // node1, eBPF only: nothing programmed, nothing answers, and status says why.
    let (_, status1) = c.node(1).netd_status(&[])?;
    assert!(status1.contains("services not programmed (--ebpf-fallback none)"), "{status1}");
    assert_eq!(metric(1)?, "netd_service_proxy_fallback 1");
    let out = ask(&b.ns, "10.96.0.50:80")?;
    assert!(out.starts_with("ERROR"), "no service rules on node1, yet: {out}");
    Ok(())
}

/// eBPF, externalTrafficPolicy Local with the only endpoint on node1: pods of node0 and node0
/// itself still reach it through node0's NodePort, the external IP and the LoadBalancer IP (the
/// policy is for traffic from outside; kube-proxy short-circuits the node's own), while a client
/// outside still gets nothing through node0.
#[test]
fn ebpf_local_policy_short_circuits_pods_and_the_node() -> Result<()> {
    if let Err(why) = netd_ebpf_probe().and_then(|()| netd_ebpf_tc_probe()) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let (mut c, sandbox, _snat) = ebpf_cluster(2)?;
    let a = c.node_mut(0).add_cni_pod("a")?;
    let b = c.node_mut(1).add_cni_pod("b")?;
    let _sb = serve_with_peer(&b, "b")?;
    let extra = "    nodePort: 30081\n  externalTrafficPolicy: Local\n  externalIPs: [\"198.18.5.5\"]\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 198.18.5.6\n";
    apply(&c, &[service("local", "10.96.0.52", "LoadBalancer", extra), slice("local", &[(&b, "node1")])].concat())?;
    let (n0, n1) = (c.node(0).ip(), c.node(1).ip());
    let cg0 = sandbox.node_cgroup(0);
    // Programmed: from outside through node1, which has the endpoint.
    expect_answer(&c, "NodePort via node1 from outside", &|| ask(c.underlay(), &format!("{n1}:30081")), "b 198.18.0.1")?;
    for addr in [format!("{n0}:30081"), "198.18.5.5:80".into(), "198.18.5.6:80".into()] {
        expect_answer(&c, &format!("{addr} from a pod of node0"), &|| ask_in_cgroup(cg0, &a, &addr), &format!("b {}", a.ip))?;
        let from_node = ask_in_cgroup_from(cg0, c.node(0).ns(), &addr)?;
        assert!(from_node.starts_with("b "), "{addr} from node0 itself: {from_node}");
    }
    let dropped = ask(c.underlay(), &format!("{n0}:30081"))?;
    assert!(dropped.starts_with("ERROR"), "node0 has no local endpoint: from outside, nothing: {dropped}");
    Ok(())
}

/// One UDP exchange from `ns`: the answer, or socat's error (an ICMP port unreachable shows as
/// "Connection refused").
fn ask_udp(ns: &netd_tests::Netns, addr: &str) -> Result<String> {
    let out = ns.exec(&["sh", "-c", &format!("echo hi | socat -T 2 - UDP:{addr} 2>&1")])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// eBPF, from a host outside the cluster: an external IP and a LoadBalancer IP of Services
/// without endpoints are refused at once (ICMP port unreachable from the frontend, TCP and UDP),
/// not forwarded out of the node; ClusterIPs are served to a host that routes the service range
/// through a node (a remote backend sees the node's SNAT address, a local one the client's) and
/// refused when they have no endpoints.
#[test]
fn ebpf_serves_and_rejects_from_outside_as_kube_proxy() -> Result<()> {
    if let Err(why) = netd_ebpf_probe().and_then(|()| netd_ebpf_tc_probe()) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let (mut c, _sandbox, snat) = ebpf_cluster(2)?;
    let a = c.node_mut(0).add_cni_pod("a")?;
    let b = c.node_mut(1).add_cni_pod("b")?;
    let _sa = serve_with_peer(&a, "a")?;
    let _sb = serve_with_peer(&b, "b")?;
    let n0 = c.node(0).ip().to_string();
    // The outside host (the underlay) routes external IPs, LB IPs and the service range to node0.
    for net in ["198.18.5.5/32", "198.18.5.6/32", "10.96.0.0/12"] {
        c.underlay().ip(&["route", "add", net, "via", &n0])?;
    }
    let udp = "  - name: dns\n    protocol: UDP\n    port: 53\n    targetPort: 5353\n";
    let manifest = [
        service("noeps-ext", "10.96.0.60", "ClusterIP", &format!("{udp}  externalIPs: [\"198.18.5.5\"]\n")),
        service("noeps-lb", "10.96.0.61", "LoadBalancer", "    nodePort: 30061\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 198.18.5.6\n"),
        service("remote", "10.96.0.62", "ClusterIP", ""),
        slice("remote", &[(&b, "node1")]),
        service("local", "10.96.0.63", "ClusterIP", ""),
        slice("local", &[(&a, "node0")]),
    ]
    .concat();
    apply(&c, &manifest)?;
    let u = c.underlay();
    let refused = |r: String| if r.contains("Connection refused") { "refused".to_string() } else { r };
    expect_answer(&c, "external IP without endpoints (TCP)", &|| Ok(refused(ask(u, "198.18.5.5:80")?)), "refused")?;
    expect_answer(&c, "external IP without endpoints (UDP)", &|| Ok(refused(ask_udp(u, "198.18.5.5:53")?)), "refused")?;
    expect_answer(&c, "LoadBalancer IP without endpoints", &|| Ok(refused(ask(u, "198.18.5.6:80")?)), "refused")?;
    expect_answer(&c, "ClusterIP from outside, remote backend", &|| ask(u, "10.96.0.62:80"), &format!("b {}", snat[0]))?;
    expect_answer(&c, "ClusterIP from outside, local backend", &|| ask(u, "10.96.0.63:80"), "a 198.18.0.1")?;
    expect_answer(&c, "ClusterIP without endpoints from outside", &|| Ok(refused(ask(u, "10.96.0.60:80")?)), "refused")?;
    Ok(())
}

/// SkyDNS records written to etcd by hand (issue 19), answered by every node's cluster DNS: the
/// seeds' exact commands (`etcdctl put`, then `dig +short ... in srv`), the CNAME chase to an
/// address record, Services winning over a record of the same name, an edit and a delete
/// reaching every node through the watch, and a malformed value skipped and reported while the
/// others keep answering.
#[test]
fn skydns_records_from_etcd_on_every_node() -> Result<()> {
    let mut c = cluster_with(2, &["--cluster-dns-ip", "10.96.0.10", "--dns-upstream", "198.18.0.1:53"])?;
    let a = c.node_mut(0).add_cni_pod("a")?;
    let b = c.node_mut(1).add_cni_pod("b")?;
    apply(&c, &service("web", "10.96.0.50", "ClusterIP", ""))?;
    let etcd = c.etcd();
    etcd.ctl(&["put", "/skydns/local/cluster/svc/default/date", r#"{"host": "date-1-0-0.default.svc.cluster.local.", "port": 7001}"#])?;
    etcd.ctl(&["put", "/skydns/local/cluster/svc/default/time", r#"{"host": "time-1-0-0.default.svc.cluster.local.", "port": 7002}"#])?;
    etcd.ctl(&["put", "/skydns/local/cluster/svc/default/date-1-0-0", r#"{"host": "10.0.7.1"}"#])?;
    etcd.ctl(&["put", "/skydns/local/cluster/svc/default/web", r#"{"host": "10.9.9.9"}"#])?;
    etcd.ctl(&["put", "/skydns/local/cluster/svc/default/broken", "{not json"])?;

    for p in [&a, &b] {
        let r = wait_until(WAIT, POLL, || Ok(dig(p, &["@10.96.0.10", "+short", "date.default.svc.cluster.local", "in", "srv"])?.trim() == "10 100 7001 date-1-0-0.default.svc.cluster.local."));
        if r.is_err() {
            eprintln!("the last answer:\n{}", dig(p, &["@10.96.0.10", "date.default.svc.cluster.local", "in", "srv"])?);
            c.dump_logs();
        }
        r?;
        assert_eq!(dig(p, &["@169.254.20.10", "+short", "time.default.svc.cluster.local", "in", "srv"])?.trim(), "10 100 7002 time-1-0-0.default.svc.cluster.local.");
        assert_eq!(dig(p, &["@10.96.0.10", "+short", "date.default.svc.cluster.local"])?.trim(), "date-1-0-0.default.svc.cluster.local.\n10.0.7.1", "the CNAME, chased");
        assert_eq!(dig(p, &["@10.96.0.10", "+short", "web.default.svc.cluster.local"])?.trim(), "10.96.0.50", "the Service wins over the record");
        let srv = dig(p, &["@10.96.0.10", "date.default.svc.cluster.local", "SRV"])?;
        assert!(srv.contains("status: NOERROR") && srv.contains("flags: qr aa") && srv.contains("10.0.7.1"), "authoritative, the target's address as additional: {srv}");
    }

    // An edit and a delete reach every node through the watch (the time is printed, not asserted).
    let t0 = std::time::Instant::now();
    etcd.ctl(&["put", "/skydns/local/cluster/svc/default/date", r#"{"host": "date-1-0-0.default.svc.cluster.local.", "port": 7003, "priority": 5, "weight": 50}"#])?;
    for p in [&a, &b] {
        wait_until(WAIT, Duration::from_millis(5), || Ok(dig(p, &["@10.96.0.10", "+short", "date.default.svc.cluster.local", "in", "srv"])?.trim() == "5 100 7003 date-1-0-0.default.svc.cluster.local."))?;
    }
    eprintln!("an etcdctl put answered on both nodes after {:?} (including dig start-up)", t0.elapsed());
    etcd.ctl(&["del", "/skydns/local/cluster/svc/default/time"])?;
    for p in [&a, &b] {
        wait_until(WAIT, POLL, || Ok(dig(p, &["@10.96.0.10", "time.default.svc.cluster.local", "in", "srv"])?.contains("status: NXDOMAIN")))?;
    }

    // The malformed value is reported and the others are served.
    let bin = netd_binary()?;
    let n0 = c.node(0);
    let status = n0.ns().command(&[bin.to_str().unwrap(), "status", "--run-dir", n0.run_dir().to_str().unwrap()]).output()?;
    let out = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.status.code(), Some(1), "degraded by the malformed value: {out}");
    assert!(out.contains("skydns    /skydns/ for cluster.local listed (3 records, 1 skipped"), "{out}");
    assert!(out.contains("/skydns/local/cluster/svc/default/broken: not a SkyDNS value"), "{out}");
    Ok(())
}
