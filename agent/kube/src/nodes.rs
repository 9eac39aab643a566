//! `--subnet-manager kube`: flannel's kube subnet manager, so that netd and flanneld nodes in
//! kube mode share one cluster (flannel-io/flannel `pkg/subnet/kube/kube.go`):
//!
//! - a node's subnet is its `spec.podCIDR` (the first IPv4 entry of `spec.podCIDRs` when that is
//!   set), assigned by kube-controller-manager (`--allocate-node-cidrs`); nobody else allocates;
//! - each node announces itself with annotations on its own Node object (written, like flannel
//!   does, as a strategic merge patch through the `nodes/status` subresource):
//!   `<prefix>/backend-type` ("vxlan"), `<prefix>/backend-data` (`{"VNI":1,"VtepMAC":"…"}`),
//!   `<prefix>/public-ip` and `<prefix>/kube-subnet-manager: "true"`, with
//!   `<prefix>/public-ip-overwrite` (set by an admin) taking the place of the detected public IP;
//! - peers are the Nodes whose `kube-subnet-manager` annotation is `"true"`; a node lacking a
//!   podCIDR or with malformed annotations is left out and reported with the reason.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::error::{brief, KubeError};
use crate::listwatch::{list_watch, Update, WatchConfig};
use crate::status::{SourceStatus, Tracker};

/// flannel's default `--kube-annotation-prefix`.
pub const DEFAULT_ANNOTATION_PREFIX: &str = "flannel.alpha.coreos.com";

const NODES: &str = "nodes";

/// The node annotation names for one prefix, as flannel derives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotations {
    /// `<prefix>/kube-subnet-manager`: "true" on nodes run by a kube subnet manager.
    pub kube_subnet_manager: String,
    /// `<prefix>/backend-type`, e.g. "vxlan".
    pub backend_type: String,
    /// `<prefix>/backend-data`: the backend's JSON, e.g. `{"VNI":1,"VtepMAC":"0e:…"}`.
    pub backend_data: String,
    /// `<prefix>/public-ip`: the address peers send encapsulated traffic to.
    pub public_ip: String,
    /// `<prefix>/public-ip-overwrite`: set by an admin, replaces the detected public IP.
    pub public_ip_overwrite: String,
}

impl Default for Annotations {
    fn default() -> Self {
        Annotations::with_prefix_unchecked(&format!("{DEFAULT_ANNOTATION_PREFIX}/"))
    }
}

impl Annotations {
    /// Names under `prefix` with flannel's rules: at most one `/`; without one, `/` is appended;
    /// with one but not ending in `/` or `-`, `-` is appended (`example.com/net` →
    /// `example.com/net-backend-type`). The result must look like `fqdn/[a-z0-9_-]*`.
    pub fn new(prefix: &str) -> Result<Self, KubeError> {
        let bad = |reason: &str| KubeError::AnnotationPrefix { prefix: prefix.to_string(), reason: reason.to_string() };
        let mut p = prefix.to_string();
        match p.matches('/').count() {
            0 => p.push('/'),
            1 => {}
            _ => return Err(bad("may contain at most one '/'")),
        }
        if !p.ends_with('/') && !p.ends_with('-') {
            p.push('-');
        }
        let (domain, rest) = p.split_once('/').ok_or_else(|| bad("no '/'"))?;
        let word = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2 || !labels.iter().all(|l| word(l)) {
            return Err(bad("must start with a domain name (lowercase letters, digits, '-', '_', dots), like flannel.alpha.coreos.com"));
        }
        let rest_ok = rest.is_empty() || (rest.ends_with('-') && word(rest));
        if !rest_ok {
            return Err(bad("the part after '/' may only hold lowercase letters, digits, '-' and '_'"));
        }
        Ok(Self::with_prefix_unchecked(&p))
    }

    fn with_prefix_unchecked(p: &str) -> Self {
        Annotations {
            kube_subnet_manager: format!("{p}kube-subnet-manager"),
            backend_type: format!("{p}backend-type"),
            backend_data: format!("{p}backend-data"),
            public_ip: format!("{p}public-ip"),
            public_ip_overwrite: format!("{p}public-ip-overwrite"),
        }
    }
}

/// A peer (or this node) as its Node object describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeLease {
    /// The Node's name.
    pub node: String,
    /// Its pod subnet (`spec.podCIDR`).
    pub subnet: Ipv4Net,
    /// `<prefix>/public-ip`.
    pub public_ip: Ipv4Addr,
    /// `<prefix>/backend-type`.
    pub backend_type: String,
    /// `<prefix>/backend-data` parsed as JSON (`None` when absent or `null`).
    pub backend_data: Option<serde_json::Value>,
}

/// What this node announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAttrs {
    pub public_ip: Ipv4Addr,
    pub backend_type: String,
    /// Written as JSON; `None` is written as `null` (what flannel writes for backends without data).
    pub backend_data: Option<serde_json::Value>,
}

/// The node's IPv4 pod subnet: the first IPv4 entry of `spec.podCIDRs` if that is set, else
/// `spec.podCIDR`. `Ok(None)`: not assigned yet. `Err`: assigned but unusable (malformed,
/// IPv6 only, more than two entries).
pub fn pod_cidr(node: &Node) -> Result<Option<Ipv4Net>, String> {
    let spec = node.spec.as_ref();
    let cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    let single = spec.and_then(|s| s.pod_cidr.clone()).filter(|c| !c.is_empty());
    let parse = |c: &str| c.parse::<IpNet>().map_err(|_| format!("spec.podCIDR {c:?} is not a CIDR"));
    if cidrs.is_empty() {
        return match single {
            None => Ok(None),
            Some(c) => match parse(&c)? {
                IpNet::V4(n) => Ok(Some(n.trunc())),
                IpNet::V6(_) => Err(format!("spec.podCIDR {c:?} is IPv6; netd needs an IPv4 pod subnet")),
            },
        };
    }
    if cidrs.len() > 2 {
        return Err(format!("spec.podCIDRs {cidrs:?}: at most one IPv4 and one IPv6 CIDR are allowed"));
    }
    for c in &cidrs {
        if let IpNet::V4(n) = parse(c)? {
            return Ok(Some(n.trunc()));
        }
    }
    Err(format!("spec.podCIDRs {cidrs:?} has no IPv4 CIDR; netd needs an IPv4 pod subnet"))
}

/// A Node as a lease, or why it is not one.
pub fn node_to_lease(node: &Node, names: &Annotations) -> Result<NodeLease, String> {
    let name = node.metadata.name.clone().filter(|n| !n.is_empty()).ok_or("Node without metadata.name")?;
    let empty = BTreeMap::new();
    let ann = node.metadata.annotations.as_ref().unwrap_or(&empty);
    if ann.get(&names.kube_subnet_manager).map(String::as_str) != Some("true") {
        return Err(format!("not announced by a kube subnet manager (annotation {} is not \"true\")", names.kube_subnet_manager));
    }
    let subnet = pod_cidr(node)?.ok_or("no spec.podCIDR assigned")?;
    let public_ip = match ann.get(&names.public_ip) {
        None => return Err(format!("no {} annotation", names.public_ip)),
        Some(ip) => ip.parse::<Ipv4Addr>().map_err(|_| format!("annotation {} = {ip:?} is not an IPv4 address", names.public_ip))?,
    };
    let backend_type = ann.get(&names.backend_type).cloned().filter(|t| !t.is_empty()).ok_or_else(|| format!("no {} annotation", names.backend_type))?;
    let backend_data = match ann.get(&names.backend_data).filter(|d| !d.is_empty()) {
        None => None,
        Some(d) => match serde_json::from_str::<serde_json::Value>(d) {
            Ok(serde_json::Value::Null) => None,
            Ok(v) => Some(v),
            Err(e) => return Err(format!("annotation {} is not JSON ({e}): {d:?}", names.backend_data)),
        },
    };
    Ok(NodeLease { node: name, subnet, public_ip, backend_type, backend_data })
}

/// This node's pod subnet, waiting (and saying so in the log) until the Node exists and has a
/// `spec.podCIDR`. Polls every 2 s; connection errors are waited out too. Fails at once when the
/// podCIDR is unusable or the server refuses access (401/403: RBAC `get nodes` missing).
pub async fn node_subnet(client: &Client, node_name: &str) -> Result<Ipv4Net, KubeError> {
    node_subnet_with(client, node_name, Duration::from_secs(2)).await
}

/// [`node_subnet`] polling every `poll`.
pub async fn node_subnet_with(client: &Client, node_name: &str, poll: Duration) -> Result<Ipv4Net, KubeError> {
    let api: Api<Node> = Api::all(client.clone());
    let mut said: Option<String> = None;
    loop {
        let waiting_for = match api.get_opt(node_name).await {
            Ok(Some(node)) => match pod_cidr(&node) {
                Ok(Some(net)) => {
                    info!(node = %node_name, subnet = %net, "node's podCIDR");
                    return Ok(net);
                }
                Ok(None) => "the Node has no spec.podCIDR yet (kube-controller-manager assigns it with --allocate-node-cidrs=true and --cluster-cidr)".to_string(),
                Err(reason) => return Err(KubeError::Node { node: node_name.to_string(), reason }),
            },
            Ok(None) => "no Node object by that name yet (the kubelet registers it; is --node-name right?)".to_string(),
            Err(kube::Error::Api(s)) if s.code == 401 || s.code == 403 => {
                return Err(KubeError::Api { op: "get node", object: node_name.to_string(), source: kube::Error::Api(s) })
            }
            Err(e) => format!("get node: {}", brief(&e)),
        };
        if said.as_deref() != Some(waiting_for.as_str()) {
            info!(node = %node_name, "waiting for the node's pod subnet: {waiting_for}");
            said = Some(waiting_for);
        }
        tokio::time::sleep(poll).await;
    }
}

/// Announces this node the way flanneld in kube mode does: sets the backend-type, backend-data,
/// public-ip and kube-subnet-manager annotations of Node `node_name` with one strategic merge
/// patch on `nodes/status` (only if one of them differs). An admin's
/// `<prefix>/public-ip-overwrite` annotation wins over `attrs.public_ip`. Returns the public IP
/// announced. One attempt: on `Err` the caller retries (see [`KubeError::status_code`]).
///
/// Needs RBAC `get` on `nodes` and `patch` on `nodes/status`.
pub async fn publish_annotations(client: &Client, node_name: &str, names: &Annotations, attrs: &NodeAttrs) -> Result<Ipv4Addr, KubeError> {
    let api: Api<Node> = Api::all(client.clone());
    let node = api.get(node_name).await.map_err(KubeError::api("get node", node_name))?;
    let current = node.metadata.annotations.unwrap_or_default();
    let public_ip = match current.get(&names.public_ip_overwrite).filter(|s| !s.is_empty()) {
        Some(o) => {
            let ip = o.parse::<Ipv4Addr>().map_err(|_| KubeError::Node {
                node: node_name.to_string(),
                reason: format!("annotation {} = {o:?} is not an IPv4 address", names.public_ip_overwrite),
            })?;
            if ip != attrs.public_ip {
                info!(node = %node_name, "public IP {ip} from annotation {} instead of {}", names.public_ip_overwrite, attrs.public_ip);
            }
            ip
        }
        None => attrs.public_ip,
    };
    let data = serde_json::to_string(&attrs.backend_data).map_err(|source| KubeError::Encode { what: format!("backend data of node {node_name}"), source })?;
    let desired = [
        (&names.backend_type, attrs.backend_type.clone()),
        (&names.backend_data, data),
        (&names.public_ip, public_ip.to_string()),
        (&names.kube_subnet_manager, "true".to_string()),
    ];
    let changes: BTreeMap<&String, String> = desired.into_iter().filter(|(k, v)| current.get(*k) != Some(v)).collect();
    if changes.is_empty() {
        return Ok(public_ip);
    }
    let patch = serde_json::json!({ "metadata": { "annotations": changes } });
    api.patch_status(node_name, &PatchParams::default(), &Patch::Strategic(&patch)).await.map_err(KubeError::api("patch node status", node_name))?;
    info!(node = %node_name, annotations = %changes.keys().map(|k| k.as_str()).collect::<Vec<_>>().join(","), "node annotations published");
    Ok(public_ip)
}

/// Keeps `tx` holding every Node announced by a kube subnet manager (this node included), in
/// name order, and `status` describing the connection; nodes left out are in
/// `status.skipped`, each with the reason. Publishes only after the initial list and only when
/// the list changed; keeps the last list while the API server is unreachable. Returns when every
/// receiver of `tx` is gone.
///
/// Needs RBAC `list` and `watch` on `nodes`.
pub async fn run_node_watch(client: Client, names: Annotations, tx: watch::Sender<Arc<Vec<NodeLease>>>, status: watch::Sender<SourceStatus>) {
    let publish = |leases: Arc<Vec<NodeLease>>| tx.send(leases).is_ok();
    tokio::select! {
        _ = run_node_watch_with(client, names, WatchConfig::default(), status, publish) => {}
        _ = tx.closed() => {}
    }
}

/// [`run_node_watch`] with explicit timings, handing each new list to `publish` (which returns
/// `false` to stop).
pub async fn run_node_watch_with<F>(client: Client, names: Annotations, cfg: WatchConfig, status: watch::Sender<SourceStatus>, mut publish: F)
where
    F: FnMut(Arc<Vec<NodeLease>>) -> bool,
{
    let (ntx, mut rx) = mpsc::channel(256);
    let engine = list_watch(Api::<Node>::all(client), NODES, cfg, ntx);
    let mut tracker = Tracker::new(status, "kubernetes nodes", &[NODES]);
    let fold = async move {
        // Node name → its lease, or why it is not one.
        let mut nodes: BTreeMap<String, Result<NodeLease, String>> = BTreeMap::new();
        let mut listed = false;
        let mut dirty = false;
        let mut published: Option<Arc<Vec<NodeLease>>> = None;
        let mut reported: BTreeMap<String, String> = BTreeMap::new();
        let fold_one = |u: Update<Node>, nodes: &mut BTreeMap<String, Result<NodeLease, String>>, tracker: &mut Tracker| -> (bool, bool) {
            let entry = |n: &Node| n.metadata.name.clone().map(|name| (name, node_to_lease(n, &names)));
            match u {
                Update::Listed { items, resource_version } => {
                    tracker.listed(NODES, &resource_version);
                    *nodes = items.iter().filter_map(entry).collect();
                    (true, true)
                }
                Update::Applied(n) => {
                    tracker.event(NODES, n.metadata.resource_version.clone());
                    if let Some((name, lease)) = entry(&n) {
                        nodes.insert(name, lease);
                    }
                    (false, true)
                }
                Update::Deleted(n) => {
                    tracker.event(NODES, n.metadata.resource_version.clone());
                    if let Some(name) = &n.metadata.name {
                        nodes.remove(name);
                    }
                    (false, true)
                }
                Update::Bookmark(rv) => {
                    tracker.event(NODES, Some(rv));
                    (false, false)
                }
                Update::Connected => {
                    tracker.connected(NODES);
                    (false, false)
                }
                Update::Failed { error, expired } => {
                    tracker.failed(NODES, error, expired);
                    (false, false)
                }
            }
        };
        while let Some(u) = rx.recv().await {
            let (l, d) = fold_one(u, &mut nodes, &mut tracker);
            listed |= l;
            dirty |= d;
            for _ in 0..1024 {
                let Ok(u) = rx.try_recv() else { break };
                let (l, d) = fold_one(u, &mut nodes, &mut tracker);
                listed |= l;
                dirty |= d;
            }
            if !(listed && dirty) {
                continue;
            }
            dirty = false;
            let leases: Vec<NodeLease> = nodes.values().filter_map(|r| r.as_ref().ok().cloned()).collect();
            let skipped: Vec<String> = nodes.iter().filter_map(|(n, r)| r.as_ref().err().map(|e| format!("node {n}: {e}"))).collect();
            for (n, r) in &nodes {
                if let Err(reason) = r {
                    if reported.get(n) != Some(reason) {
                        warn!(node = %n, "node left out of the peers: {reason}");
                        reported.insert(n.clone(), reason.clone());
                    }
                }
            }
            reported.retain(|n, _| matches!(nodes.get(n), Some(Err(_))));
            tracker.published(leases.len(), skipped);
            if published.as_deref() == Some(&leases) {
                continue;
            }
            let leases = Arc::new(leases);
            published = Some(leases.clone());
            if !publish(leases) {
                return;
            }
        }
    };
    tokio::select! {
        _ = fold => {}
        _ = engine => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidr: Option<&str>, ann: &[(&str, &str)]) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.annotations = Some(ann.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec { pod_cidr: cidr.map(String::from), ..Default::default() });
        n
    }

    const FULL: &[(&str, &str)] = &[
        ("flannel.alpha.coreos.com/backend-type", "vxlan"),
        ("flannel.alpha.coreos.com/backend-data", r#"{"VNI":1,"VtepMAC":"0e:6f:0a:00:00:02"}"#),
        ("flannel.alpha.coreos.com/public-ip", "10.0.0.2"),
        ("flannel.alpha.coreos.com/kube-subnet-manager", "true"),
    ];

    #[test]
    fn annotation_names_follow_flannel() {
        let a = Annotations::default();
        assert_eq!(a.backend_data, "flannel.alpha.coreos.com/backend-data");
        assert_eq!(a.kube_subnet_manager, "flannel.alpha.coreos.com/kube-subnet-manager");
        assert_eq!(Annotations::new("flannel.alpha.coreos.com").unwrap(), a);
        assert_eq!(Annotations::new("example.com/net").unwrap().public_ip, "example.com/net-public-ip");
        assert_eq!(Annotations::new("example.com/net-").unwrap().public_ip, "example.com/net-public-ip");
        assert!(Annotations::new("a/b/c").is_err());
        assert!(Annotations::new("NoDomain").is_err());
        assert!(Annotations::new("example.com/Net").is_err());
    }

    #[test]
    fn a_full_node_is_a_lease() {
        let l = node_to_lease(&node("n2", Some("10.244.2.0/24"), FULL), &Annotations::default()).unwrap();
        assert_eq!(l.subnet, "10.244.2.0/24".parse::<Ipv4Net>().unwrap());
        assert_eq!(l.public_ip, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(l.backend_type, "vxlan");
        assert_eq!(l.backend_data, Some(serde_json::json!({"VNI": 1, "VtepMAC": "0e:6f:0a:00:00:02"})));
    }

    #[test]
    fn unusable_nodes_say_why() {
        let names = Annotations::default();
        let why = |n: Node| node_to_lease(&n, &names).unwrap_err();
        assert!(why(node("n", None, FULL)).contains("no spec.podCIDR"));
        assert!(why(node("n", Some("10.244.2.0/24"), &[])).contains("kube-subnet-manager"));
        assert!(why(node("n", Some("banana"), FULL)).contains("not a CIDR"));
        assert!(why(node("n", Some("fd00::/64"), FULL)).contains("IPv6"));
        let mut bad_ip = FULL.to_vec();
        bad_ip[2] = ("flannel.alpha.coreos.com/public-ip", "10.0.0");
        assert!(why(node("n", Some("10.244.2.0/24"), &bad_ip)).contains("not an IPv4 address"));
        let mut bad_data = FULL.to_vec();
        bad_data[1] = ("flannel.alpha.coreos.com/backend-data", "{VNI:1");
        assert!(why(node("n", Some("10.244.2.0/24"), &bad_data)).contains("not JSON"));
        let no_type: Vec<_> = FULL.iter().filter(|(k, _)| !k.ends_with("backend-type")).cloned().collect();
        assert!(why(node("n", Some("10.244.2.0/24"), &no_type)).contains("backend-type"));
    }

    #[test]
    fn null_backend_data_is_none_and_dual_stack_takes_the_ipv4_cidr() {
        let mut ann = FULL.to_vec();
        ann[1] = ("flannel.alpha.coreos.com/backend-data", "null");
        let mut n = node("n", None, &ann);
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            pod_cidr: Some("fd00:10:244:3::/64".into()),
            pod_cidrs: Some(vec!["fd00:10:244:3::/64".into(), "10.244.3.0/24".into()]),
            ..Default::default()
        });
        let l = node_to_lease(&n, &Annotations::default()).unwrap();
        assert_eq!(l.backend_data, None);
        assert_eq!(l.subnet.to_string(), "10.244.3.0/24");
    }
}
