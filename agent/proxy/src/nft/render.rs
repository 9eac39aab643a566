//! Plan → [`Ruleset`] for nftables. Per packet: one lookup in a verdict map keyed by
//! `ip daddr . meta l4proto . th dport`, one short service chain, one lookup in the service's
//! endpoint map — the same work with 10 services or 10,000.
//!
//! ```text
//! nat-prerouting / nat-output ─► services: ip daddr . meta l4proto . th dport vmap @service-ips
//!                                          ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
//!   @service-ips  VIP . tcp . 80 : goto lb-2                     (plain ClusterIP, 2 endpoints)
//!                 VIP . tcp . 80 : goto svc-ns/name/tcp/http     (cluster policy, other services)
//!                 EXT . tcp . 80 : goto ext-ns/name/tcp/http     (external traffic)
//!   lb-N: masquerade off-cluster clients; dnat to ip daddr . meta l4proto . th dport . numgen random mod N map @cluster-endpoints
//!   svc-…: masquerade off-cluster clients; dnat to VIP . tcp . 80 . numgen random mod N map @endpoints-XX
//!   @endpoints-XX: 10.96.0.10 . tcp . 80 . 0 : 10.244.1.5 . 8080, 10.96.0.10 . tcp . 80 . 1 : 10.244.2.7 . 8080
//! filter-input/forward/output ─► endpoints-check: @no-endpoint-services → reject, ... → drop
//! nat-postrouting ─► masquerading: hairpin connections and marked packets are masqueraded
//! ```
//!
//! A service's chains and its entries in the verdict maps depend only on the Service object;
//! endpoint changes only change elements of plain sets and data maps. That matters for cost:
//! the kernel re-validates the whole table's jump graph on every transaction that adds a rule
//! or a jump (O(services × endpoints)); element changes of data maps skip that, so an
//! endpoint change costs the same whatever the number of services. Services with ClientIP
//! affinity keep kube-proxy's layout (a chain and an affinity set per endpoint): their
//! endpoint changes pay the re-validation.

use std::collections::BTreeMap;
use std::sync::Arc;

use ipnet::Ipv4Net;

use super::ir::*;
use super::ir::fnv1a;
use crate::model::{Endpoint, NoEndpoints, NodeInfo, Plan, Proto, ServicePortPlan};

/// Our table: `table ip netd-proxy`.
pub const TABLE: &str = "netd-proxy";
/// The mark for "masquerade this" (kube-proxy's value, which netd's pod-network rules skip).
pub const MASQ_MARK: u32 = 0x4000;

pub const SERVICE_IPS: &str = "service-ips";
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
pub const NO_EP_SERVICES: &str = "no-endpoint-services";
pub const NO_EP_NODEPORTS: &str = "no-endpoint-nodeports";
pub const NO_LOCAL_EP_SERVICES: &str = "no-local-endpoint-services";
pub const NO_LOCAL_EP_NODEPORTS: &str = "no-local-endpoint-nodeports";
pub const HAIRPIN: &str = "hairpin";
pub const ENDPOINTS: &str = "endpoints";
pub const LOCAL_ENDPOINTS: &str = "local-endpoints";
/// Endpoint maps are sharded: the kernel checks each element added to a map against every
/// rule that looks the map up, and looks sets up by name in a list; 64 maps keep both small
/// (about 150 rules per map with 10,000 services).
pub const ENDPOINT_SHARDS: u64 = 64;
/// Fewer for node-local endpoints (only services with a traffic policy of Local use them).
pub const LOCAL_ENDPOINT_SHARDS: u64 = 8;

/// The endpoint map (of `base`: ENDPOINTS or LOCAL_ENDPOINTS) a service frontend is in.
pub fn endpoint_map(base: &str, fe: (std::net::Ipv4Addr, Proto, u16)) -> String {
    let shards = if base == LOCAL_ENDPOINTS { LOCAL_ENDPOINT_SHARDS } else { ENDPOINT_SHARDS };
    let shard = fnv1a(&ElemKey::AddrProtoPort(fe.0, fe.1, fe.2).bytes()) % shards;
    format!("{base}-{shard:02x}")
}
pub const NODEPORT_IPS: &str = "nodeport-ips";
/// Every ClusterIP: a port of one that no Service serves is rejected.
pub const CLUSTER_IPS: &str = "cluster-ips";
/// LB IP . proto . port → the service's `firewall-…` chain (loadBalancerSourceRanges).
pub const FIREWALL_IPS: &str = "firewall-ips";
/// Endpoints of plain ClusterIP services (see [`shared_lb`]): one map, looked up by a few
/// rules only, so it needs no sharding.
pub const CLUSTER_ENDPOINTS: &str = "cluster-endpoints";
/// Plain ClusterIP services with 1..=SHARED_LB_MAX endpoints share the chain `lb-N`.
pub const SHARED_LB_MAX: usize = 32;

/// The shared chain for plain ClusterIP services with `n` endpoints.
pub fn lb_chain(n: usize) -> String {
    format!("lb-{n}")
}
const MARK_MASQ: &str = "mark-for-masquerade";
const REJECT: &str = "reject-chain";
const CLUSTER_IPS_CHECK: &str = "cluster-ips-check";
const FIREWALL_CHECK: &str = "firewall-check";

/// nft's named priorities.
const DSTNAT: i32 = -100;
const SRCNAT: i32 = 100;
const FILTER: i32 = 0;

/// How service ports are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// netd's: endpoint maps, element-only endpoint changes.
    Netd,
    /// kube-proxy's nftables layout (a chain per endpoint, numgen verdict maps) for every
    /// service: the benchmark's anchor.
    KubeProxy,
}

/// Renders the plan; fragments of service ports whose plan is the same object as in `prev`
/// are reused as they are.
pub fn render(plan: &Plan, prev: Option<&Ruleset>) -> Ruleset {
    render_style(plan, prev, Style::Netd)
}

/// [`render`] in a chosen [`Style`].
pub fn render_style(plan: &Plan, prev: Option<&Ruleset>, style: Style) -> Ruleset {
    if let Some(rs) = prev.and_then(|p| render_delta(plan, p, style)) {
        return rs;
    }
    let mut rs = Ruleset { table: TABLE.to_string(), id: next_ruleset_id(), plan_id: plan.id(), ..Default::default() };
    let skeleton = skeleton(plan, style);
    let skeleton = match prev.and_then(|p| p.fragments.get("")) {
        Some(old) if **old == skeleton => old.clone(),
        _ => Arc::new(skeleton),
    };
    rs.fragments.insert(Arc::from(""), skeleton);
    for sp in plan.services.values() {
        let key = sp.slug.clone();
        let reuse = prev.and_then(|p| Some((p.sources.get(&key)?, p.fragments.get(&key)?))).filter(|(src, _)| Arc::ptr_eq(src, sp));
        let frag = match reuse {
            Some((_, f)) => f.clone(),
            None => Arc::new(service_fragment(sp, &plan.node, style)),
        };
        rs.fragments.insert(key.clone(), frag);
        rs.sources.insert(key, sp.clone());
    }
    rs
}

/// The O(changes) path: `plan` is `prev`'s plan with a few port plans swapped
/// ([`Plan::changes_since`]), so the ruleset is `prev` with those fragments re-rendered.
/// `None` when that is not known to be so (then everything is rendered, reusing by pointer).
fn render_delta(plan: &Plan, prev: &Ruleset, style: Style) -> Option<Ruleset> {
    let keys = plan.changes_since(prev.plan_id)?;
    let mut rs = prev.clone();
    let mut changed: Vec<Arc<str>> = Vec::with_capacity(keys.len() + 1);
    let skeleton = skeleton(plan, style);
    if prev.fragments.get("").is_none_or(|old| **old != skeleton) {
        rs.fragments.insert(Arc::from(""), Arc::new(skeleton));
        changed.push(Arc::from(""));
    }
    for key in keys {
        let sp = plan.services.get(key)?;
        // A swapped port plan keeps its frontends, hence its slug; anything else is not a
        // delta this path understands.
        let old = prev.sources.get(&sp.slug)?;
        if Arc::ptr_eq(old, sp) {
            continue;
        }
        rs.fragments.insert(sp.slug.clone(), Arc::new(service_fragment(sp, &plan.node, style)));
        rs.sources.insert(sp.slug.clone(), sp.clone());
        changed.push(sp.slug.clone());
    }
    rs.id = next_ruleset_id();
    rs.plan_id = plan.id();
    rs.delta = Some((prev.id, changed.into()));
    Some(rs)
}

fn next_ruleset_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn rule(stmts: Vec<Stmt>) -> Rule {
    Rule(stmts)
}

fn goto(c: &str) -> Stmt {
    Stmt::Verdict(Verdict::Goto(c.to_string()))
}

fn jump(c: &str) -> Stmt {
    Stmt::Verdict(Verdict::Jump(c.to_string()))
}

fn base(name: &str, nat: bool, hook: Hook, priority: i32, rules: Vec<Rule>) -> ChainDef {
    ChainDef { name: name.to_string(), base: Some(BaseChain { nat, hook, priority }), rules }
}

fn regular(name: &str, rules: Vec<Rule>) -> ChainDef {
    ChainDef { name: name.to_string(), base: None, rules }
}

/// The fixed part: base chains, dispatch chains, the maps (empty here; elements come from the
/// service fragments) and the node addresses NodePorts answer on.
fn skeleton(plan: &Plan, style: Style) -> Fragment {
    let mut f = Fragment::default();
    let set = |name: &str, kind, comment: &str| SetDef { name: name.to_string(), kind, comment: Some(comment.to_string()) };
    f.sets.push(set(SERVICE_IPS, SetKind::AddrProtoPortVmap, "ClusterIP, ExternalIP and LoadBalancer IP traffic"));
    f.sets.push(set(SERVICE_NODEPORTS, SetKind::ProtoPortVmap, "NodePort traffic"));
    f.sets.push(set(NO_EP_SERVICES, SetKind::AddrProtoPort, "services without endpoints: reject"));
    f.sets.push(set(NO_EP_NODEPORTS, SetKind::ProtoPort, "nodeports without endpoints: reject"));
    f.sets.push(set(NO_LOCAL_EP_SERVICES, SetKind::AddrProtoPort, "traffic policy Local and no local endpoint: drop"));
    f.sets.push(set(NO_LOCAL_EP_NODEPORTS, SetKind::ProtoPort, "nodeports with policy Local and no local endpoint: drop"));
    f.sets.push(set(CLUSTER_IPS, SetKind::Addrs, "ClusterIPs: ports no service serves are rejected"));
    f.sets.push(set(FIREWALL_IPS, SetKind::AddrProtoPortVmap, "LoadBalancer IPs subject to loadBalancerSourceRanges"));
    if style == Style::Netd {
        f.sets.push(set(HAIRPIN, SetKind::Hairpin, "client . endpoint . cluster IP . port of pods reaching themselves"));
    }
    if style == Style::Netd {
        for shard in 0..ENDPOINT_SHARDS {
            f.sets.push(SetDef { name: format!("{ENDPOINTS}-{shard:02x}"), kind: SetKind::Endpoints, comment: None });
        }
        for shard in 0..LOCAL_ENDPOINT_SHARDS {
            f.sets.push(SetDef { name: format!("{LOCAL_ENDPOINTS}-{shard:02x}"), kind: SetKind::Endpoints, comment: None });
        }
        f.sets.push(set(CLUSTER_ENDPOINTS, SetKind::Endpoints, "endpoints of plain ClusterIP services: VIP . proto . port . slot"));
        // Shared by every plain ClusterIP service with N endpoints: the packet's destination
        // is its key into @cluster-endpoints. 10,000 services need 32 chains, not 10,000.
        for n in 1..=SHARED_LB_MAX {
            let mut rules = Vec::new();
            if let Some(cidr) = plan.node.cluster_cidr {
                rules.push(rule(vec![Stmt::Saddr { net: cidr, negate: true }, jump(MARK_MASQ)]));
            }
            rules.push(rule(vec![Stmt::DnatNumgenMapByDest { set: CLUSTER_ENDPOINTS.into(), n: n as u32 }]));
            f.chains.push(regular(&lb_chain(n), rules));
        }
    }
    let nodeport_match = if plan.node.ips.is_empty() {
        Stmt::FibLocal { saddr: false }
    } else {
        f.sets.push(set(NODEPORT_IPS, SetKind::Addrs, "IPs that accept NodePort traffic"));
        for ip in &plan.node.ips {
            f.elements.push((NODEPORT_IPS.into(), ElemKey::Addr(*ip), None));
        }
        Stmt::DaddrInSet(NODEPORT_IPS.into())
    };
    let to_services = vec![rule(vec![jump("services")])];
    f.chains.push(base("nat-prerouting", true, Hook::Prerouting, DSTNAT, to_services.clone()));
    f.chains.push(base("nat-output", true, Hook::Output, DSTNAT, to_services));
    f.chains.push(base("nat-postrouting", true, Hook::Postrouting, SRCNAT, vec![rule(vec![jump("masquerading")])]));
    let check = vec![rule(vec![Stmt::CtStateNew, jump("endpoints-check")])];
    // Packets still addressed to a ClusterIP after DNAT had no service port to go to: forwarded
    // ones and the node's own (packets for an address of this node itself go to input).
    let mut check_all = check.clone();
    check_all.push(rule(vec![Stmt::CtStateNew, jump(CLUSTER_IPS_CHECK)]));
    f.chains.push(base("filter-input", false, Hook::Input, FILTER - 10, check));
    f.chains.push(base("filter-forward", false, Hook::Forward, FILTER - 10, check_all.clone()));
    f.chains.push(base("filter-output", false, Hook::Output, FILTER - 10, check_all));
    // loadBalancerSourceRanges are checked before DNAT, on the address the client used.
    let firewall = vec![rule(vec![Stmt::CtStateNew, jump(FIREWALL_CHECK)])];
    f.chains.push(base("filter-prerouting-pre-dnat", false, Hook::Prerouting, DSTNAT - 10, firewall.clone()));
    f.chains.push(base("filter-output-pre-dnat", false, Hook::Output, DSTNAT - 10, firewall));
    f.chains.push(regular(FIREWALL_CHECK, vec![rule(vec![Stmt::VmapAddrProtoPort(FIREWALL_IPS.into())])]));
    let mut cluster_ips_check = vec![
        // Addresses this node answers itself (the cluster DNS VIP on lo) are not services here.
        rule(vec![Stmt::FibLocal { saddr: false }, Stmt::Verdict(Verdict::Return)]),
        rule(vec![Stmt::DaddrInSet(CLUSTER_IPS.into()), Stmt::Reject]),
    ];
    if let Some(cidr) = plan.service_cidr {
        cluster_ips_check.push(rule(vec![Stmt::Daddr { net: cidr, negate: false }, Stmt::Verdict(Verdict::Drop)]));
    }
    f.chains.push(regular(CLUSTER_IPS_CHECK, cluster_ips_check));
    f.chains.push(regular(
        "services",
        vec![
            rule(vec![Stmt::VmapAddrProtoPort(SERVICE_IPS.into())]),
            rule(vec![nodeport_match.clone(), Stmt::VmapProtoPort(SERVICE_NODEPORTS.into())]),
        ],
    ));
    f.chains.push(regular(
        "endpoints-check",
        vec![
            rule(vec![Stmt::InAddrProtoPort(NO_EP_SERVICES.into()), goto(REJECT)]),
            rule(vec![Stmt::InAddrProtoPort(NO_LOCAL_EP_SERVICES.into()), Stmt::Verdict(Verdict::Drop)]),
            rule(vec![nodeport_match.clone(), Stmt::InProtoPort(NO_EP_NODEPORTS.into()), goto(REJECT)]),
            rule(vec![nodeport_match, Stmt::InProtoPort(NO_LOCAL_EP_NODEPORTS.into()), Stmt::Verdict(Verdict::Drop)]),
        ],
    ));
    let mut masq = vec![
        rule(vec![Stmt::MarkMatch { mask: MASQ_MARK, value: 0 }, Stmt::Verdict(Verdict::Return)]),
        rule(vec![Stmt::MarkXor(MASQ_MARK)]),
        rule(vec![Stmt::Masquerade]),
    ];
    if style == Style::Netd {
        masq.insert(0, rule(vec![Stmt::InHairpin(HAIRPIN.into()), Stmt::Masquerade]));
    }
    f.chains.push(regular("masquerading", masq));
    f.chains.push(regular(MARK_MASQ, vec![rule(vec![Stmt::MarkOr(MASQ_MARK)])]));
    f.chains.push(regular(
        REJECT,
        vec![rule(vec![Stmt::L4Proto(Proto::Tcp), Stmt::RejectTcpReset]), rule(vec![Stmt::Reject])],
    ));
    f
}

/// Chain and set names of one service port.
pub struct Names {
    slug: String,
}

impl Names {
    pub fn new(sp: &ServicePortPlan) -> Self {
        Names { slug: sp.key.slug(sp.port) }
    }
    pub fn svc(&self) -> String {
        format!("svc-{}", self.slug)
    }
    pub fn local(&self) -> String {
        format!("local-{}", self.slug)
    }
    pub fn ext(&self) -> String {
        format!("ext-{}", self.slug)
    }
    pub fn sep(&self, e: &Endpoint) -> String {
        format!("sep-{}__{}/{}", self.slug, e.ip, e.port)
    }
    pub fn affinity(&self, e: &Endpoint) -> String {
        format!("aff-{}__{}/{}", self.slug, e.ip, e.port)
    }
    pub fn firewall(&self) -> String {
        format!("firewall-{}", self.slug)
    }

}

/// Rules that pick an endpoint: affinity first, then a random one.
fn balance(sp: &ServicePortPlan, n: &Names, eps: &[Endpoint]) -> Vec<Rule> {
    let mut rules = Vec::new();
    if sp.affinity_timeout.is_some() {
        for e in eps {
            rules.push(rule(vec![Stmt::SaddrInSet(n.affinity(e)), goto(&n.sep(e))]));
        }
    }
    if eps.len() == 1 {
        rules.push(rule(vec![goto(&n.sep(&eps[0]))]));
    } else if !eps.is_empty() {
        rules.push(rule(vec![Stmt::NumgenVmap(eps.iter().map(|e| n.sep(e)).collect())]));
    }
    rules
}

/// Where a frontend without usable endpoints is listed: the reject or the drop set.
fn no_endpoint_set(v: NoEndpoints, nodeport: bool) -> &'static str {
    match (v, nodeport) {
        (NoEndpoints::Reject, false) => NO_EP_SERVICES,
        (NoEndpoints::Reject, true) => NO_EP_NODEPORTS,
        (NoEndpoints::Drop, false) => NO_LOCAL_EP_SERVICES,
        (NoEndpoints::Drop, true) => NO_LOCAL_EP_NODEPORTS,
    }
}

/// The key every endpoint map element of a service port starts with: its ClusterIP (or first
/// external frontend, or 0.0.0.0 and its NodePort) . protocol . port, unique per service port.
pub fn frontend(sp: &ServicePortPlan) -> (std::net::Ipv4Addr, Proto, u16) {
    match (sp.cluster_ip, sp.external_frontends().next(), sp.node_port) {
        (Some(ip), _, _) | (None, Some(ip), _) => (ip, sp.key.proto, sp.port),
        (None, None, np) => (std::net::Ipv4Addr::UNSPECIFIED, sp.key.proto, np.unwrap_or(0)),
    }
}

/// A plain ClusterIP service port (cluster traffic policy, no affinity, no external frontend,
/// at most [`SHARED_LB_MAX`] endpoints) is elements only: its VIP in @service-ips goes to the
/// shared chain `lb-N`, its endpoints are in @cluster-endpoints. No chain or rule of its own, so
/// adding one costs the kernel a few elements, and an endpoint change, even one that changes
/// N, stays an element change.
fn shared_lb(sp: &ServicePortPlan, vip: std::net::Ipv4Addr, node: &NodeInfo) -> Fragment {
    let mut f = Fragment::default();
    if sp.lists_cluster_ip {
        f.elements.push((CLUSTER_IPS.into(), ElemKey::Addr(vip), None));
    }
    let key = ElemKey::AddrProtoPort(vip, sp.key.proto, sp.port);
    let eps = &sp.cluster_endpoints;
    if eps.is_empty() {
        f.elements.push((no_endpoint_set(sp.internal_fallback(), false).into(), key, None));
        return f;
    }
    f.elements.push((SERVICE_IPS.into(), key, Some(Value::Verdict(Verdict::Goto(lb_chain(eps.len()))))));
    for (i, e) in eps.iter().enumerate() {
        f.elements.push((CLUSTER_ENDPOINTS.into(), ElemKey::Slot(vip, sp.key.proto, sp.port, i as u32), Some(Value::Target(e.ip, e.port))));
    }
    let mut seen = std::collections::BTreeSet::new();
    for e in eps.iter().filter(|e| node.pod_cidr.is_none_or(|c| c.contains(&e.ip))) {
        if seen.insert(e.ip) {
            f.elements.push((HAIRPIN.into(), ElemKey::Hairpin(e.ip, e.ip, vip, sp.key.proto, sp.port), None));
        }
    }
    f
}

/// Everything one service port contributes. Chains and verdict-map elements depend only on the
/// Service; endpoints only show in elements (netd style) or in per-endpoint chains (kube-proxy
/// style, and services with session affinity).
pub fn service_fragment(sp: &ServicePortPlan, node: &NodeInfo, style: Style) -> Fragment {
    let cluster_cidr = node.cluster_cidr;
    let n = Names::new(sp);
    let mut f = Fragment::default();
    let proto = sp.key.proto;
    let per_endpoint = style == Style::KubeProxy || sp.affinity_timeout.is_some();
    let need_local = sp.internal_local || (sp.external_local && sp.has_external());
    let need_cluster = !sp.internal_local || sp.has_external();
    if style == Style::Netd && !per_endpoint && !need_local && !sp.has_external() && sp.cluster_endpoints.len() <= SHARED_LB_MAX {
        if let Some(vip) = sp.cluster_ip {
            return shared_lb(sp, vip, node);
        }
    }

    let mut svc_rules = Vec::new();
    if let (Some(vip), Some(cidr)) = (sp.cluster_ip, cluster_cidr) {
        svc_rules.push(rule(vec![Stmt::Daddr { net: Ipv4Net::from(vip), negate: false }, Stmt::Saddr { net: cidr, negate: true }, jump(MARK_MASQ)]));
    }
    let mut local_rules = Vec::new();
    // internalTrafficPolicy Local does not change who is masqueraded: the node and off-cluster
    // clients of the ClusterIP still are (the ClusterIP rule of the local chain; the chain also
    // serves external traffic of externalTrafficPolicy Local, which is never masqueraded).
    if let (true, Some(vip), Some(cidr)) = (sp.internal_local, sp.cluster_ip, cluster_cidr) {
        local_rules.push(rule(vec![Stmt::Daddr { net: Ipv4Net::from(vip), negate: false }, Stmt::Saddr { net: cidr, negate: true }, jump(MARK_MASQ)]));
    }
    if per_endpoint {
        let mut used: BTreeMap<(std::net::Ipv4Addr, u16), &Endpoint> = BTreeMap::new();
        if need_cluster {
            used.extend(sp.cluster_endpoints.iter().map(|e| ((e.ip, e.port), e)));
        }
        if need_local {
            used.extend(sp.local_endpoints.iter().map(|e| ((e.ip, e.port), e)));
        }
        for e in used.values() {
            let mut rules = vec![rule(vec![Stmt::Saddr { net: Ipv4Net::from(e.ip), negate: false }, jump(MARK_MASQ)])];
            if let Some(t) = sp.affinity_timeout {
                f.sets.push(SetDef { name: n.affinity(e), kind: SetKind::Affinity { timeout_secs: t }, comment: None });
                rules.push(rule(vec![Stmt::UpdateSaddr(n.affinity(e))]));
            }
            rules.push(rule(vec![Stmt::L4Proto(proto), Stmt::Dnat(e.ip, e.port)]));
            f.chains.push(regular(&n.sep(e), rules));
        }
        svc_rules.extend(balance(sp, &n, &sp.cluster_endpoints));
        local_rules.extend(balance(sp, &n, &sp.local_endpoints));
    } else {
        // Slot i of this service's frontend → endpoint i. Only the slot count is in the rule, so
        // endpoints that change without the count changing only change elements.
        let fe = frontend(sp);
        let pick = |base: &str, eps: &[Endpoint], f: &mut Fragment| -> Option<Rule> {
            let set = endpoint_map(base, fe);
            for (i, e) in eps.iter().enumerate() {
                f.elements.push((set.clone(), ElemKey::Slot(fe.0, fe.1, fe.2, i as u32), Some(Value::Target(e.ip, e.port))));
            }
            (!eps.is_empty()).then(|| rule(vec![Stmt::L4Proto(proto), Stmt::DnatNumgenMap { set, frontend: fe, n: eps.len() as u32 }]))
        };
        if need_cluster {
            svc_rules.extend(pick(ENDPOINTS, &sp.cluster_endpoints, &mut f));
        }
        if need_local {
            local_rules.extend(pick(LOCAL_ENDPOINTS, &sp.local_endpoints, &mut f));
        }
        // Hairpin: a pod that is an endpoint reaching itself through the ClusterIP. Only pods
        // of this node can do that here (a pod's packets are NATed by its own node), so only
        // endpoints in this node's pod subnet are listed: with N nodes, 1/N of the endpoints.
        if let Some(vip) = sp.cluster_ip {
            let mut seen = std::collections::BTreeSet::new();
            for e in sp.internal_endpoints().iter().filter(|e| node.pod_cidr.is_none_or(|c| c.contains(&e.ip))) {
                if seen.insert(e.ip) {
                    f.elements.push((HAIRPIN.into(), ElemKey::Hairpin(e.ip, e.ip, vip, sp.key.proto, sp.port), None));
                }
            }
        }
    }
    if need_cluster {
        f.chains.push(regular(&n.svc(), svc_rules));
    }
    if need_local {
        f.chains.push(regular(&n.local(), local_rules));
    }

    // ClusterIP.
    if let Some(vip) = sp.cluster_ip {
        if sp.lists_cluster_ip {
            f.elements.push((CLUSTER_IPS.into(), ElemKey::Addr(vip), None));
        }
        let key = ElemKey::AddrProtoPort(vip, proto, sp.port);
        let target = if sp.internal_local { n.local() } else { n.svc() };
        f.elements.push((SERVICE_IPS.into(), key, Some(Value::Verdict(Verdict::Goto(target)))));
        if sp.internal_endpoints().is_empty() {
            f.elements.push((no_endpoint_set(sp.internal_fallback(), false).into(), key, None));
        }
    }

    // External frontends: external IPs, LB IPs, NodePort.
    if sp.has_external() {
        let mut rules = Vec::new();
        if sp.external_local {
            if let Some(cidr) = cluster_cidr {
                rules.push(rule(vec![Stmt::Saddr { net: cidr, negate: false }, goto(&n.svc())]));
            }
            rules.push(rule(vec![Stmt::FibLocal { saddr: true }, jump(MARK_MASQ)]));
            rules.push(rule(vec![Stmt::FibLocal { saddr: true }, goto(&n.svc())]));
            rules.push(rule(vec![goto(&n.local())]));
        } else {
            rules.push(rule(vec![jump(MARK_MASQ)]));
            rules.push(rule(vec![goto(&n.svc())]));
        }
        f.chains.push(regular(&n.ext(), rules));
        // loadBalancerSourceRanges: clients of the LB IPs outside the ranges are dropped.
        if let Some(allowed) = sp.firewall(node) {
            let mut rules: Vec<Rule> = allowed.iter().map(|net| rule(vec![Stmt::Saddr { net: *net, negate: false }, Stmt::Verdict(Verdict::Return)])).collect();
            rules.push(rule(vec![Stmt::Verdict(Verdict::Drop)]));
            f.chains.push(regular(&n.firewall(), rules));
            for ip in &sp.lb_ips {
                f.elements.push((FIREWALL_IPS.into(), ElemKey::AddrProtoPort(*ip, proto, sp.port), Some(Value::Verdict(Verdict::Goto(n.firewall())))));
            }
        }
        let ok = Value::Verdict(Verdict::Goto(n.ext()));
        let none = sp.external_endpoints().is_empty();
        for ip in sp.external_frontends() {
            let key = ElemKey::AddrProtoPort(ip, proto, sp.port);
            f.elements.push((SERVICE_IPS.into(), key, Some(ok.clone())));
            if none {
                f.elements.push((no_endpoint_set(sp.external_fallback(), false).into(), key, None));
            }
        }
        if let Some(np) = sp.node_port {
            let key = ElemKey::ProtoPort(proto, np);
            f.elements.push((SERVICE_NODEPORTS.into(), key, Some(ok)));
            if none {
                f.elements.push((no_endpoint_set(sp.external_fallback(), true).into(), key, None));
            }
        }
    }
    f
}
