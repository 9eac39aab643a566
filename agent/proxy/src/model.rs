//! The Plan: what this node's service dataplane must do, derived from a snapshot by
//! [`crate::plan::desired`]. Backends render it; nothing here knows about nftables or iptables.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;

use crate::snapshot::NsName;

/// What the proxy knows about the node it runs on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeInfo {
    /// Node name, compared with `EndpointSlice.endpoints[].nodeName` to find local endpoints.
    pub name: String,
    /// Addresses NodePorts are served on. Empty: every local address.
    pub ips: Vec<Ipv4Addr>,
    /// This node's pod subnet.
    pub pod_cidr: Option<Ipv4Net>,
    /// The whole pod network: traffic from outside it to a ClusterIP is masqueraded.
    pub cluster_cidr: Option<Ipv4Net>,
    /// Cluster IPs answered on this node itself (the cluster DNS VIP, served by netd's DNS
    /// on every node): their services are not load-balanced.
    pub local_service_ips: Vec<Ipv4Addr>,
}

/// Transport protocols a Service port can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// IANA protocol number (`meta l4proto`).
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Sctp => 132,
        }
    }

    /// Lower-case name, as nft and iptables spell it.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }

    /// The Kubernetes spelling (`TCP`); `None` for anything else.
    pub fn from_k8s(s: Option<&str>) -> Option<Proto> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            "SCTP" => Some(Proto::Sctp),
            _ => None,
        }
    }

    pub fn from_number(n: u8) -> Option<Proto> {
        [Proto::Tcp, Proto::Udp, Proto::Sctp].into_iter().find(|p| p.number() == n)
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One port of one Service: the unit the dataplanes program.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortKey {
    pub service: NsName,
    /// `spec.ports[].name`, possibly empty for a single-port service.
    pub port_name: String,
    pub proto: Proto,
}

impl ServicePortKey {
    /// `ns/name/proto/port-name-or-number`: readable and unique, used in nftables chain names.
    pub fn slug(&self, port: u16) -> String {
        let p = if self.port_name.is_empty() { port.to_string() } else { self.port_name.clone() };
        format!("{}/{}/{}/{}", self.service.namespace, self.service.name, self.proto, p)
    }
}

impl fmt::Display for ServicePortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port_name.is_empty() {
            write!(f, "{}/{}", self.service, self.proto)
        } else {
            write!(f, "{}:{}/{}", self.service, self.port_name, self.proto)
        }
    }
}

/// A backend of a service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// On this node (`nodeName` matches).
    pub local: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Endpoint {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }
}

/// Everything the dataplane does for one service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortPlan {
    pub key: ServicePortKey,
    /// `key.slug(port)`, computed once: names the port's chains and keys the rendered parts.
    pub slug: Arc<str>,
    /// `spec.ports[].port`: the port on the ClusterIP, external IPs and LB IPs.
    pub port: u16,
    pub cluster_ip: Option<Ipv4Addr>,
    /// `spec.externalIPs` (IPv4 only).
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip`.
    pub lb_ips: Vec<Ipv4Addr>,
    pub node_port: Option<u16>,
    /// sessionAffinity ClientIP: its timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// externalTrafficPolicy Local (only meaningful with external frontends).
    pub external_local: bool,
    /// internalTrafficPolicy Local.
    pub internal_local: bool,
    /// `spec.healthCheckNodePort` when externalTrafficPolicy is Local.
    pub health_check_node_port: Option<u16>,
    /// `spec.loadBalancerSourceRanges` (IPv4, type LoadBalancer only): when not empty, only these
    /// clients may use the LB IPs (the node's own addresses too, if a range holds them).
    pub source_ranges: Vec<Ipv4Net>,
    /// This port plan lists the ClusterIP among the addresses every port of which is answered
    /// (REJECT for ports no Service serves). One port plan per ClusterIP does, so that no two
    /// parts of a rendered ruleset carry the same element.
    pub lists_cluster_ip: bool,
    /// Endpoints for cluster-wide policy: the ready ones, or if none is ready, the serving
    /// terminating ones. Sorted, distinct.
    pub cluster_endpoints: Vec<Endpoint>,
    /// The node-local subset chosen the same way (ready local ones, else serving-terminating).
    pub local_endpoints: Vec<Endpoint>,
}

impl ServicePortPlan {
    /// Has any frontend reachable from outside the cluster (NodePort, external IP, LB IP).
    pub fn has_external(&self) -> bool {
        self.node_port.is_some() || !self.external_ips.is_empty() || !self.lb_ips.is_empty()
    }

    /// Endpoints for traffic to the ClusterIP.
    pub fn internal_endpoints(&self) -> &[Endpoint] {
        if self.internal_local {
            &self.local_endpoints
        } else {
            &self.cluster_endpoints
        }
    }

    /// Endpoints for traffic to the external frontends.
    pub fn external_endpoints(&self) -> &[Endpoint] {
        if self.external_local {
            &self.local_endpoints
        } else {
            &self.cluster_endpoints
        }
    }

    /// What a packet to the ClusterIP gets when there is no endpoint to send it to.
    pub fn internal_fallback(&self) -> NoEndpoints {
        if self.cluster_endpoints.is_empty() {
            NoEndpoints::Reject
        } else {
            NoEndpoints::Drop
        }
    }

    /// Same for the external frontends.
    pub fn external_fallback(&self) -> NoEndpoints {
        self.internal_fallback()
    }

    /// Every endpoint any chain of this service sends to (the union of both policies).
    pub fn all_endpoints(&self) -> Vec<&Endpoint> {
        let mut v: Vec<&Endpoint> = self.cluster_endpoints.iter().chain(self.local_endpoints.iter()).collect();
        v.sort_by_key(|e| (e.ip, e.port));
        v.dedup_by_key(|e| (e.ip, e.port));
        v
    }

    /// LB IPs with `loadBalancerSourceRanges` to enforce, with the sources allowed: the ranges,
    /// and when a range holds one of the node's addresses, the LB IP itself (kube-proxy's rule:
    /// a node reaching its LB IP may be SNATed to it by the load balancer's own setup).
    pub fn firewall(&self, node: &NodeInfo) -> Option<Vec<Ipv4Net>> {
        if self.source_ranges.is_empty() || self.lb_ips.is_empty() {
            return None;
        }
        let mut allowed = self.source_ranges.clone();
        if node.ips.iter().any(|ip| self.source_ranges.iter().any(|r| r.contains(ip))) {
            allowed.extend(self.lb_ips.iter().map(|ip| Ipv4Net::from(*ip)));
        }
        Some(allowed)
    }

    /// Frontends (IP, port) that carry "external" traffic: external IPs then LB IPs.
    pub fn external_frontends(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.external_ips.iter().chain(self.lb_ips.iter()).copied()
    }
}

/// The answer to a packet for a frontend without usable endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoEndpoints {
    /// The service has no endpoints at all: ICMP port unreachable / TCP reset, at once.
    Reject,
    /// A traffic policy of Local and no endpoint on this node: drop (what kube-proxy does).
    Drop,
}

/// A health check HTTP server for a service with externalTrafficPolicy Local.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: NsName,
    pub local_endpoints: usize,
}

/// The whole desired state of this node's service dataplane.
///
/// The maps are persistent (`imbl`): cloning a plan is O(1) and the next plan shares every
/// unchanged entry, so a plan that differs in one service costs O(log n) to make, not O(n).
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub node: NodeInfo,
    /// The cluster's service range (`serviceClusterIPRange` of `<prefix>/config`): a packet to an
    /// address of it that no Service holds is dropped, as kube-proxy does.
    pub service_cidr: Option<Ipv4Net>,
    pub services: imbl::OrdMap<ServicePortKey, Arc<ServicePortPlan>>,
    /// healthCheckNodePort → what it reports.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// Human-readable problems (two services claiming one frontend, unsupported fields ...).
    pub warnings: Vec<String>,
    /// What the plan was derived from, per service, so the next plan can reuse unchanged work.
    pub(crate) inputs: imbl::OrdMap<NsName, Arc<crate::plan::Inputs>>,
    /// This plan's identity (0: none), for [`Plan::changes_since`].
    pub(crate) id: u64,
    /// When this plan was made by swapping a few port plans into another one: that plan's id
    /// and the keys swapped.
    pub(crate) delta: Option<(u64, Arc<[ServicePortKey]>)>,
    /// The snapshot state it was planned from (for the snapshot's change log).
    pub(crate) mark: Option<crate::snapshot::SnapshotMark>,
}

/// A fresh plan identity.
pub(crate) fn next_plan_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Plan {
    /// This plan's identity: renderers remember which plan they rendered.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The service ports whose plan differs from the plan with id `base`, when this plan is
    /// known to be `base` with exactly those ports replaced (same keys, same frontends; only
    /// endpoints and per-port details differ). `None`: unknown, compare everything. Renderers
    /// use it to redo O(changes) work instead of O(services); a full comparison gives the
    /// same result.
    pub fn changes_since(&self, base: u64) -> Option<&[ServicePortKey]> {
        match &self.delta {
            Some((b, keys)) if base != 0 && *b == base => Some(keys),
            _ => None,
        }
    }

    /// For a plan edited by hand (tests, benchmarks): a new identity and no claim about what
    /// changed, so dataplanes compare everything.
    pub fn mark_edited(&mut self) {
        self.id = next_plan_id();
        self.delta = None;
        self.mark = None;
    }

    /// For a plan edited by hand that is the plan with id `base` with exactly the `changed`
    /// ports replaced (benchmarks of the incremental paths). A wrong list makes a dataplane
    /// miss the ports left out, until its next resync.
    pub fn set_changed_since(&mut self, base: u64, changed: Arc<[ServicePortKey]>) {
        self.id = next_plan_id();
        self.delta = Some((base, changed));
        self.mark = None;
    }

    /// Every `(ip, proto, port)` frontend that carries UDP, with the endpoints behind it
    /// (for conntrack clean-up).
    pub fn udp_frontends(&self) -> Vec<(Ipv4Addr, u16, Vec<Endpoint>)> {
        self.udp_frontends_of(self.services.values())
    }

    /// [`Plan::udp_frontends`] of some of the service ports.
    pub fn udp_frontends_of<'a>(&'a self, ports: impl Iterator<Item = &'a Arc<ServicePortPlan>>) -> Vec<(Ipv4Addr, u16, Vec<Endpoint>)> {
        let mut out = Vec::new();
        for sp in ports.filter(|s| s.key.proto == Proto::Udp) {
            if let Some(ip) = sp.cluster_ip {
                out.push((ip, sp.port, sp.internal_endpoints().to_vec()));
            }
            for ip in sp.external_frontends() {
                out.push((ip, sp.port, sp.external_endpoints().to_vec()));
            }
            if let Some(np) = sp.node_port {
                for ip in &self.node.ips {
                    out.push((*ip, np, sp.external_endpoints().to_vec()));
                }
            }
        }
        out
    }
}
