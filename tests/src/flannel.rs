//! [`Flannel`]: nodes set up exactly as flanneld's vxlan backend, flannel's CNI plugin and
//! kube-proxy (iptables mode) leave them, without running either (neither is packaged in Debian):
//! the state a node is in when it is switched to netd.
//!
//! Per node, as flanneld does it (pkg/backend/vxlan, pkg/subnet/etcd):
//! - a lease `<prefix>/subnets/10.244.<n>.0-24` under a 24 h etcd lease, value
//!   `{"PublicIP":..,"PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":..}}`;
//! - `flannel.1`: `vxlan id 1 local <eth0 ip> dev eth0 dstport 8472 nolearning`, the VtepMAC, MTU
//!   1450, address `10.244.<n>.0/32`, up;
//! - per peer: `ip neigh replace <peer subnet>.0 lladdr <peer VtepMAC> nud permanent`, `bridge
//!   fdb replace <peer VtepMAC> dst <peer PublicIP> self permanent` (netlink NeighSet), `ip route replace <peer
//!   subnet> via <peer subnet>.0 dev flannel.1 onlink` (proto boot, as netlink's default);
//! - `subnet.env` (here `<node dir>/flannel/subnet.env`, not /run/flannel: namespaces share the
//!   file system);
//! - flanneld's masquerade chain `FLANNEL-POSTRTG` (nat) and forward chain `FLANNEL-FWD` (filter).
//!
//! Pods as flannel's CNI plugin makes them: it delegates to the reference `bridge` plugin
//! (`cni0`, isGateway, isDefaultGateway, hairpinMode, ipMasq false) with `host-local` IPAM over
//! the node's subnet, network name `cbr0` (the store is `<dataDir>/cbr0/`).
//!
//! kube-proxy's rules ([`kube_proxy_rules`]): nat `KUBE-SERVICES`, `KUBE-SVC-*`, `KUBE-SEP-*`,
//! `KUBE-EXT-*`, `KUBE-NODEPORTS`, `KUBE-POSTROUTING`, `KUBE-MARK-MASQ`; filter `KUBE-FORWARD`,
//! `KUBE-SERVICES`, `KUBE-EXTERNAL-SERVICES`, `KUBE-NODEPORTS`, `KUBE-PROXY-FIREWALL`; with the
//! jumps from the built-in chains, as `iptables-save` shows them on a kube-proxy node.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::{Cluster, Node, Pod};

/// The pod network, with flannel's default backend.
pub const FLANNEL_VXLAN_CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// flannel's CNI network name (kube-flannel.yml's `cni-conf.json`).
pub const FLANNEL_CNI_NETWORK: &str = "cbr0";

/// One node as flanneld set it up.
#[derive(Debug, Clone)]
pub struct FlannelNode {
    /// The node's index in the cluster.
    pub index: usize,
    /// Underlay (public) address.
    pub public_ip: Ipv4Addr,
    /// `10.244.<octet>.0/24`.
    pub octet: u8,
    /// flannel.1's MAC, the lease's VtepMAC.
    pub vtep_mac: String,
}

impl FlannelNode {
    /// `10.244.<n>.0/24`.
    pub fn subnet(&self) -> String {
        format!("10.244.{}.0/24", self.octet)
    }

    /// The subnet's network address: flannel.1's address, peers' onlink gateway.
    pub fn network_addr(&self) -> String {
        format!("10.244.{}.0", self.octet)
    }

    /// The lease's etcd key under `prefix`.
    pub fn lease_key(&self, prefix: &str) -> String {
        format!("{prefix}/subnets/10.244.{}.0-24", self.octet)
    }

    /// The lease's value, byte for byte as flanneld writes it.
    pub fn lease_value(&self) -> String {
        format!(r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}}}}"#, self.public_ip, self.vtep_mac)
    }
}

/// Where the fixture keeps flannel's files of `node`.
pub fn flannel_dir(node: &Node) -> PathBuf {
    node.dir().join("flannel")
}

/// host-local's `dataDir` for flannel's pods on `node`; its store is `<this>/cbr0`.
pub fn host_local_data_dir(node: &Node) -> PathBuf {
    flannel_dir(node).join("cni-networks")
}

/// Every node of `c` as flanneld's vxlan backend leaves it (module docs): network config,
/// leases, devices, peers, subnet.env, masquerade rules. Node `i` gets 10.244.(i+1).0/24.
pub fn install(c: &Cluster) -> Result<Vec<FlannelNode>> {
    c.write_network_config(FLANNEL_VXLAN_CONFIG)?;
    let nodes: Vec<FlannelNode> = c
        .nodes()
        .iter()
        .map(|n| FlannelNode {
            index: n.index(),
            public_ip: n.ip(),
            octet: u8::try_from(n.index() + 1).expect("few nodes"),
            // flanneld lets the kernel pick a random MAC: any locally administered unicast one.
            vtep_mac: format!("a6:3f:{:02x}:5c:9e:{:02x}", n.index() * 7 + 1, n.index() + 0x10),
        })
        .collect();
    let grant = c.etcd().ctl(&["lease", "grant", "86400"])?;
    let lease = grant.split_whitespace().nth(1).with_context(|| format!("etcdctl lease grant said {grant:?}"))?.to_string();
    for f in &nodes {
        c.etcd().ctl(&["put", &format!("--lease={lease}"), &f.lease_key(c.etcd_prefix()), &f.lease_value()])?;
    }
    for (node, f) in c.nodes().iter().zip(&nodes) {
        flanneld_programs(node, f, &nodes)?;
    }
    Ok(nodes)
}

/// What flanneld programs on `node` (`f`) when it starts, given every node's lease (`nodes`):
/// the device (kept if there), the peers' entries and routes (replaced), subnet.env, its
/// masquerade chains. Also what a flanneld started again on a node netd ran on does.
pub fn flanneld_programs(node: &Node, f: &FlannelNode, nodes: &[FlannelNode]) -> Result<()> {
    let ns = node.ns();
    let mut script = format!(
        "set -e\n\
         ip link show flannel.1 >/dev/null 2>&1 || ip link add flannel.1 type vxlan id 1 local {ip} dev eth0 dstport 8472 nolearning\n\
         ip link set flannel.1 address {mac} mtu 1450\n\
         ip addr replace {gw}/32 dev flannel.1\n\
         ip link set flannel.1 up\n",
        ip = f.public_ip,
        mac = f.vtep_mac,
        gw = f.network_addr()
    );
    for p in nodes.iter().filter(|p| p.index != f.index) {
        let _ = write!(
            script,
            "ip neigh replace {gw} lladdr {mac} dev flannel.1 nud permanent\n\
             bridge fdb replace {mac} dev flannel.1 dst {ip} self permanent\n\
             ip route replace {sub} via {gw} dev flannel.1 onlink\n",
            gw = p.network_addr(),
            mac = p.vtep_mac,
            ip = p.public_ip,
            sub = p.subnet()
        );
    }
    ns.sh(&script).with_context(|| format!("flannel.1 on {}", node.name()))?;
    std::fs::create_dir_all(flannel_dir(node))?;
    std::fs::write(
        flannel_dir(node).join("subnet.env"),
        format!("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{}.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", f.octet),
    )?;
    restore(node, &flannel_masq_rules(f))?;
    Ok(())
}

/// flanneld's `--ip-masq` rules for node `f` (iptables-restore input).
pub fn flannel_masq_rules(f: &FlannelNode) -> String {
    let (net, sub) = ("10.244.0.0/16", f.subnet());
    let c = "-m comment --comment \"flanneld masq\"";
    format!(
        "*nat\n:FLANNEL-POSTRTG - [0:0]\n\
         -A POSTROUTING {c} -j FLANNEL-POSTRTG\n\
         -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c} -j RETURN\n\
         -A FLANNEL-POSTRTG -s {sub} -d {net} {c} -j RETURN\n\
         -A FLANNEL-POSTRTG -s {net} -d {sub} {c} -j RETURN\n\
         -A FLANNEL-POSTRTG ! -s {net} -d {sub} {c} -j RETURN\n\
         -A FLANNEL-POSTRTG -s {net} ! -d 224.0.0.0/4 {c} -j MASQUERADE --random-fully\n\
         -A FLANNEL-POSTRTG ! -s {net} -d {net} {c} -j MASQUERADE --random-fully\n\
         COMMIT\n\
         *filter\n:FLANNEL-FWD - [0:0]\n\
         -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
         -A FLANNEL-FWD -s {net} -m comment --comment \"flanneld forward\" -j ACCEPT\n\
         -A FLANNEL-FWD -d {net} -m comment --comment \"flanneld forward\" -j ACCEPT\n\
         COMMIT\n"
    )
}

/// `iptables-restore --noflush` of `rules` in `node`'s namespace.
pub fn restore(node: &Node, rules: &str) -> Result<()> {
    restore_with(node, "iptables-restore", rules)
}

/// [`restore`] with another `iptables-restore` (`iptables-legacy-restore`: a node whose
/// iptables is the legacy one).
pub fn restore_with(node: &Node, bin: &str, rules: &str) -> Result<()> {
    let path = flannel_dir(node).join(format!("rules-{}.txt", std::process::id()));
    std::fs::create_dir_all(flannel_dir(node))?;
    std::fs::write(&path, rules)?;
    node.ns().sh(&format!("{bin} --noflush --wait < {}", path.display())).map(drop)
}

/// A pod on `node` made as flannel's CNI plugin makes one: the reference `bridge` plugin on
/// `cni0` with `host-local` over the node's subnet (flannel's delegate config).
pub fn add_flannel_pod(node: &Node, f: &FlannelNode, name: &str) -> Result<Pod> {
    let conf = serde_json::json!({
        "cniVersion": "0.3.1",
        "name": FLANNEL_CNI_NETWORK,
        "type": "bridge",
        "bridge": "cni0",
        "mtu": 1450,
        "ipMasq": false,
        "isGateway": true,
        "isDefaultGateway": true,
        "hairpinMode": true,
        "ipam": {
            "type": "host-local",
            "dataDir": host_local_data_dir(node),
            "ranges": [[{ "subnet": f.subnet() }]],
            "routes": [{ "dst": "10.244.0.0/16" }],
        },
    });
    node.cni_add(Path::new("/usr/lib/cni/bridge"), &conf, name)
}

/// One Service port as kube-proxy programs it: a ClusterIP (and optionally a NodePort) with one
/// endpoint.
#[derive(Debug, Clone)]
pub struct KubeServicePort {
    /// `namespace/name:port-name`, kube-proxy's comment.
    pub id: String,
    /// kube-proxy's chain suffix (a hash of the id; any 16 characters here).
    pub hash: String,
    pub cluster_ip: Ipv4Addr,
    /// `tcp` or `udp`.
    pub proto: &'static str,
    pub port: u16,
    pub node_port: Option<u16>,
    pub endpoint: (Ipv4Addr, u16),
}

/// kube-proxy's iptables rules for `ports` in cluster CIDR `cluster_cidr` (iptables-restore
/// input), in the layout kube-proxy 1.28+ writes.
pub fn kube_proxy_rules(ports: &[KubeServicePort], cluster_cidr: &str) -> String {
    let mut chains = String::from(":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    for p in ports {
        let (svc, sep, ext) = (format!("KUBE-SVC-{}", p.hash), format!("KUBE-SEP-{}", p.hash), format!("KUBE-EXT-{}", p.hash));
        let (proto, id, (eip, eport)) = (p.proto, &p.id, p.endpoint);
        let _ = writeln!(chains, ":{svc} - [0:0]\n:{sep} - [0:0]");
        let _ = write!(
            rules,
            "-A KUBE-SERVICES -d {ip}/32 -p {proto} -m comment --comment \"{id} cluster IP\" -m {proto} --dport {port} -j {svc}\n\
             -A {svc} ! -s {cluster_cidr} -d {ip}/32 -p {proto} -m comment --comment \"{id} cluster IP\" -m {proto} --dport {port} -j KUBE-MARK-MASQ\n\
             -A {svc} -m comment --comment \"{id} -> {eip}:{eport}\" -j {sep}\n\
             -A {sep} -s {eip}/32 -m comment --comment \"{id}\" -j KUBE-MARK-MASQ\n\
             -A {sep} -p {proto} -m comment --comment \"{id}\" -m {proto} -j DNAT --to-destination {eip}:{eport}\n",
            ip = p.cluster_ip,
            port = p.port
        );
        if let Some(np) = p.node_port {
            let _ = writeln!(chains, ":{ext} - [0:0]");
            let _ = write!(
                rules,
                "-A KUBE-NODEPORTS -p {proto} -m comment --comment \"{id}\" -m {proto} --dport {np} -j {ext}\n\
                 -A {ext} -m comment --comment \"masquerade traffic for {id} external destinations\" -j KUBE-MARK-MASQ\n\
                 -A {ext} -j {svc}\n"
            );
        }
    }
    rules.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    format!(
        "*nat\n{chains}{rules}COMMIT\n\
         *filter\n:KUBE-FORWARD - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n"
    )
}

/// The chains of `table` in `node`'s namespace whose names start with one of `prefixes`, in
/// either iptables (`iptables-save -t TABLE` and `iptables-legacy-save -t TABLE`), sorted.
pub fn iptables_chains(node: &Node, table: &str, prefixes: &[&str]) -> Result<Vec<String>> {
    let out = node.ns().run(&["iptables-save", "-t", table])? + &node.ns().run(&["iptables-legacy-save", "-t", table])?;
    let mut chains: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| prefixes.iter().any(|p| c.starts_with(p)))
        .map(str::to_string)
        .collect();
    chains.sort();
    Ok(chains)
}
