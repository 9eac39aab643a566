//! Plan → map contents (pure), and the ordered map operations that turn one content into
//! another without a moment where a frontend points at a missing backend.
//!
//! Every frontend (ClusterIP:port, externalIP/LB IP:port, NodePort) gets a backend set id
//! and slots `1..=count`. Ids and slot positions are kept from the previous state wherever
//! possible, so one endpoint change is one or two map writes and session affinity survives.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use std::sync::Arc;

use netd_proxy::model::{NoEndpoints, ServicePortPlan};
use netd_proxy::{Endpoint, NodeInfo, Plan, ServicePortKey};

use crate::maps::*;

/// What one frontend holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    pub value: SvcValue,
    /// Slot `i + 1` holds `backends[i]`; `value.count == backends.len()`.
    pub backends: Vec<BackendValue>,
}

/// The desired (or observed) contents of `netd_svc` and `netd_slots`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapState {
    /// Shared with the previous state when unchanged (cheap clones, pointer-equal diffs).
    pub frontends: BTreeMap<SvcKey, Arc<Frontend>>,
    /// Observed only: slots no frontend refers to (left by an interrupted apply).
    pub orphans: Vec<SlotKey>,
    /// Rendered only: which plan entry produced which frontends, so the next render redoes
    /// only the services that changed. Sorted by `ServicePortKey` (the plan's order).
    pub services: Vec<ServiceEntry>,
    pub node: Option<NodeInfo>,
    /// `netd_cfg[0]`: the node's SNAT address for the tc programs.
    pub cfg: CfgValue,
    /// The next backend set id to hand out (0: not known yet, computed on the next render).
    pub next_id: u32,
    /// Rendered only: the id of the plan this is the render of ([`Plan::id`]; 0: unknown).
    pub generation: u64,
}

/// One service port as rendered: its plan and the frontends it produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    pub plan: Arc<ServicePortPlan>,
    pub keys: Arc<[SvcKey]>,
}

impl MapState {
    pub fn slot_count(&self) -> usize {
        self.frontends.values().map(|f| f.backends.len()).sum()
    }
}

/// One map operation, in the order it must be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    PutCfg(CfgValue),
    PutSlot(SlotKey, BackendValue),
    PutSvc(SvcKey, SvcValue),
    DelSvc(SvcKey),
    DelSlot(SlotKey),
}

struct Want<'a> {
    key: SvcKey,
    endpoints: &'a [Endpoint],
    flags: u32,
    affinity_timeout: u32,
}

fn wants<'a>(sp: &'a ServicePortPlan, node: &NodeInfo, out: &mut Vec<Want<'a>>) {
    let proto = sp.key.proto.number();
    let affinity = sp.affinity_timeout.map(|t| (SVC_F_AFFINITY, t)).unwrap_or((0, 0));
    let reject = |eps: &[Endpoint], fallback: NoEndpoints| {
        if eps.is_empty() && fallback == NoEndpoints::Reject {
            SVC_F_REJECT
        } else {
            0
        }
    };
    if let Some(ip) = sp.cluster_ip {
        let eps = sp.internal_endpoints();
        out.push(Want {
            key: SvcKey::new(ip, sp.port, proto, SCOPE_INTERNAL),
            endpoints: eps,
            flags: affinity.0 | reject(eps, sp.internal_fallback()),
            affinity_timeout: affinity.1,
        });
    }
    let eps = sp.external_endpoints();
    let flags = affinity.0 | reject(eps, sp.external_fallback()) | if sp.external_local { SVC_F_LOCAL } else { 0 };
    // externalTrafficPolicy Local is for traffic from outside: pods and the node itself reach an
    // external frontend through every endpoint of the cluster, as kube-proxy short-circuits them.
    // The socket load balancer looks the internal scope up first, so those frontends get an
    // internal entry with the cluster's endpoints ("any node address" NodePorts stay with tc).
    let short_circuit = sp.external_local.then(|| {
        let eps = sp.cluster_endpoints.as_slice();
        (eps, affinity.0 | reject(eps, sp.external_fallback()))
    });
    let mut ext = |ip: Ipv4Addr, port: u16| {
        out.push(Want { key: SvcKey::new(ip, port, proto, SCOPE_EXTERNAL), endpoints: eps, flags, affinity_timeout: affinity.1 });
        if let Some((eps, flags)) = short_circuit.filter(|_| !ip.is_unspecified()) {
            out.push(Want { key: SvcKey::new(ip, port, proto, SCOPE_INTERNAL), endpoints: eps, flags, affinity_timeout: affinity.1 });
        }
    };
    for ip in sp.external_frontends() {
        ext(ip, sp.port);
    }
    if let Some(np) = sp.node_port {
        if node.ips.is_empty() {
            ext(Ipv4Addr::UNSPECIFIED, np);
        } else {
            for ip in &node.ips {
                ext(*ip, np);
            }
        }
    }
}

/// Renders one service port's frontends into `frontends` (skipping any another service
/// holds: the planner settles contested frontends, first wins here too). `prev` supplies ids
/// and slot positions of frontends that existed before; `next_id` hands out new ids (never
/// one in use, nor one freed in the same pass, while its slots may still be deleted).
fn render_service(
    sp: &ServicePortPlan,
    node: &NodeInfo,
    prev: &BTreeMap<SvcKey, Arc<Frontend>>,
    frontends: &mut BTreeMap<SvcKey, Arc<Frontend>>,
    next_id: &mut u32,
) -> Arc<[SvcKey]> {
    let mut ws = Vec::new();
    wants(sp, node, &mut ws);
    let mut keys = Vec::with_capacity(ws.len());
    for w in ws {
        if frontends.contains_key(&w.key) {
            continue;
        }
        let old = prev.get(&w.key);
        let id = old.map(|f| f.value.id).unwrap_or_else(|| {
            *next_id += 1;
            *next_id - 1
        });
        let new: Vec<BackendValue> = w.endpoints.iter().map(|e| BackendValue::new(e.ip, e.port, e.local || on_this_node(node, e.ip))).collect();
        let backends = assign_slots(old.map(|f| f.backends.as_slice()).unwrap_or(&[]), &new);
        let value = SvcValue { id, count: backends.len() as u32, flags: w.flags, affinity_timeout: w.affinity_timeout };
        let f = Frontend { value, backends };
        // Unchanged content keeps the old Arc (pointer-equal: skipped by diff).
        let f = match old {
            Some(o) if **o == f => o.clone(),
            _ => Arc::new(f),
        };
        frontends.insert(w.key, f);
        keys.push(w.key);
    }
    Arc::from(keys)
}

/// Whether `ip` is reached on this node itself (a pod of its subnet, or one of its addresses),
/// whatever the endpoint's `nodeName` says. The tc programs SNAT connections to backends that
/// are not "local" and expect their replies back on the overlay or external device; a pod of
/// this node answers on its bridge instead, to an address of this node, and the connection
/// would hang (an EndpointSlice without `nodeName`, or naming the node differently). Traffic
/// policies still go by `nodeName`, as kube-proxy's do.
fn on_this_node(node: &NodeInfo, ip: Ipv4Addr) -> bool {
    node.pod_cidr.is_some_and(|net| net.contains(&ip)) || node.ips.contains(&ip)
}

fn first_free_id(frontends: &BTreeMap<SvcKey, Arc<Frontend>>) -> u32 {
    frontends.values().map(|f| f.value.id).max().unwrap_or(0) + 1
}

/// The frontends `plan` asks for. Pure; `prev` keeps ids and slot positions stable, and
/// services whose plan entry did not change are carried over without being re-rendered.
pub fn render(plan: &Plan, prev: Option<&MapState>) -> MapState {
    let empty = MapState::default();
    let prev = prev.unwrap_or(&empty);
    let incremental = prev.node.as_ref() == Some(&plan.node);
    let mut next_id = if prev.next_id == 0 { first_free_id(&prev.frontends) } else { prev.next_id };
    let mut frontends = if incremental { prev.frontends.clone() } else { BTreeMap::new() };
    let mut services: Vec<ServiceEntry> = Vec::with_capacity(plan.services.len());
    let mut changed = Vec::new();
    // Merge walk over two sorted lists: the plan and what the previous render came from.
    let no_services = Vec::new();
    let mut old_iter = if incremental { &prev.services } else { &no_services }.iter().peekable();
    let fresh = |sp: &Arc<ServicePortPlan>| ServiceEntry { plan: sp.clone(), keys: Arc::from(Vec::new()) };
    for (k, sp) in &plan.services {
        while let Some(old) = old_iter.peek() {
            match old.plan.key.cmp(k) {
                std::cmp::Ordering::Less => {
                    for key in old.keys.iter() {
                        frontends.remove(key); // service gone
                    }
                    old_iter.next();
                }
                _ => break,
            }
        }
        match old_iter.peek() {
            Some(old) if old.plan.key == *k && (Arc::ptr_eq(&old.plan, sp) || *old.plan == **sp) => {
                services.push((*old).clone());
                old_iter.next();
            }
            Some(old) if old.plan.key == *k => {
                for key in old.keys.iter() {
                    frontends.remove(key); // re-rendered below
                }
                old_iter.next();
                changed.push(services.len());
                services.push(fresh(sp));
            }
            _ => {
                changed.push(services.len());
                services.push(fresh(sp));
            }
        }
    }
    for old in old_iter {
        for key in old.keys.iter() {
            frontends.remove(key);
        }
    }
    for i in changed {
        let sp = services[i].plan.clone();
        services[i].keys = render_service(&sp, &plan.node, &prev.frontends, &mut frontends, &mut next_id);
    }
    MapState {
        frontends,
        orphans: Vec::new(),
        services,
        node: Some(plan.node.clone()),
        cfg: render_cfg(&plan.node),
        next_id,
        generation: plan.id(),
    }
}

/// [`render`] for a plan that differs from the one `state` was rendered from only in the
/// service ports `changed`, done in place: only those services' frontends are looked at,
/// whatever the number of services. Returns the map operations, in order. `state` must be
/// the render of that previous plan (same node).
pub fn update(state: &mut MapState, plan: &Plan, changed: &[ServicePortKey]) -> Vec<Op> {
    let mut old_part = MapState::default();
    let mut new_part = MapState::default();
    // Take every changed service's frontends out first (a frontend may move between them).
    for k in changed {
        if let Ok(i) = state.services.binary_search_by(|e| e.plan.key.cmp(k)) {
            let old = state.services.remove(i);
            for key in old.keys.iter() {
                if let Some(f) = state.frontends.remove(key) {
                    old_part.frontends.insert(*key, f);
                }
            }
        }
    }
    let mut done = BTreeSet::new();
    for k in changed {
        if !done.insert(k) {
            continue; // listed twice
        }
        if let Some(sp) = plan.services.get(k) {
            let keys = render_service(sp, &plan.node, &old_part.frontends, &mut state.frontends, &mut state.next_id);
            for key in keys.iter() {
                new_part.frontends.insert(*key, state.frontends[key].clone());
            }
            let entry = ServiceEntry { plan: sp.clone(), keys };
            match state.services.binary_search_by(|e| e.plan.key.cmp(k)) {
                Ok(i) => state.services[i] = entry, // cannot happen: taken out above
                Err(i) => state.services.insert(i, entry),
            }
        }
    }
    state.generation = plan.id();
    diff(&old_part, &new_part)
}

/// The tc programs' settings: connections to backends on other nodes are SNATed to the
/// network address of this node's pod subnet, which netd puts on the overlay device and
/// every other node routes back through the overlay (so the reply returns here).
pub fn render_cfg(node: &NodeInfo) -> CfgValue {
    match node.pod_cidr {
        Some(net) => CfgValue { snat_ip: ip_be(net.network()), snat_port_min: SNAT_PORT_MIN, snat_port_max: SNAT_PORT_MAX },
        None => CfgValue::default(),
    }
}

/// Orders `new` so that backends already in `prev` keep their slot: removed ones' slots
/// are refilled with new backends, or with the last ones when nothing new came.
pub fn assign_slots(prev: &[BackendValue], new: &[BackendValue]) -> Vec<BackendValue> {
    let new_set: BTreeSet<(u32, u16)> = new.iter().map(|b| (b.ip, b.port)).collect();
    let prev_set: BTreeSet<(u32, u16)> = prev.iter().map(|b| (b.ip, b.port)).collect();
    // Same endpoint, possibly with a changed `local` bit: take the new value.
    let by_addr: BTreeMap<(u32, u16), BackendValue> = new.iter().map(|b| ((b.ip, b.port), *b)).collect();
    let mut slots: Vec<Option<BackendValue>> =
        prev.iter().map(|b| new_set.contains(&(b.ip, b.port)).then(|| by_addr[&(b.ip, b.port)])).collect();
    let mut fresh = new.iter().filter(|b| !prev_set.contains(&(b.ip, b.port))).copied();
    for s in slots.iter_mut().filter(|s| s.is_none()) {
        *s = fresh.next();
    }
    slots.extend(fresh.map(Some));
    // Close the remaining holes with entries from the end.
    let mut i = 0;
    while i < slots.len() {
        if slots[i].is_none() {
            let last = slots.pop().flatten();
            if i < slots.len() {
                slots[i] = last;
            }
            continue;
        }
        i += 1;
    }
    slots.into_iter().flatten().collect()
}

/// The operations that turn `old` into `new`, ordered so that the programs never see a
/// frontend whose count exposes a slot not yet (or no longer) written.
pub fn diff(old: &MapState, new: &MapState) -> Vec<Op> {
    let mut ops = Vec::new();
    if old.cfg != new.cfg {
        ops.push(Op::PutCfg(new.cfg));
    }
    for k in &old.orphans {
        ops.push(Op::DelSlot(*k));
    }
    for (key, f) in &old.frontends {
        if !new.frontends.contains_key(key) {
            ops.push(Op::DelSvc(*key));
            ops.extend((1..=f.backends.len() as u32).map(|slot| Op::DelSlot(SlotKey { id: f.value.id, slot })));
        }
    }
    for (key, f) in &new.frontends {
        if old.frontends.get(key).is_some_and(|o| Arc::ptr_eq(o, f)) {
            continue;
        }
        let id = f.value.id;
        let old_f = old.frontends.get(key);
        let old_f = old_f.filter(|o| o.value.id == id);
        let old_backends: &[BackendValue] = old_f.map(|o| o.backends.as_slice()).unwrap_or(&[]);
        for (i, b) in f.backends.iter().enumerate() {
            if old_backends.get(i) != Some(b) {
                ops.push(Op::PutSlot(SlotKey { id, slot: i as u32 + 1 }, *b));
            }
        }
        if old_f.map(|o| o.value) != Some(f.value) || old.frontends.get(key).is_some_and(|o| o.value.id != id) {
            ops.push(Op::PutSvc(*key, f.value));
        }
        for slot in f.backends.len() + 1..=old_backends.len() {
            ops.push(Op::DelSlot(SlotKey { id, slot: slot as u32 }));
        }
        if let Some(o) = old.frontends.get(key).filter(|o| o.value.id != id) {
            ops.extend((1..=o.backends.len() as u32).map(|slot| Op::DelSlot(SlotKey { id: o.value.id, slot })));
        }
    }
    ops
}

/// The map entry an operation writes or deletes, named as in the maps (`netd_svc`,
/// `netd_slots`, `netd_cfg`) with addresses in dotted form: for errors people read.
impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let svc = |f: &mut std::fmt::Formatter<'_>, k: &SvcKey| {
            let proto = match k.proto {
                6 => "tcp".to_string(),
                17 => "udp".to_string(),
                132 => "sctp".to_string(),
                p => format!("protocol {p}"),
            };
            let scope = if k.scope == SCOPE_EXTERNAL { " (from outside)" } else { "" };
            write!(f, "netd_svc entry {}:{}/{proto}{scope}", k.ip(), k.host_port())
        };
        match self {
            Op::PutCfg(v) => write!(f, "writing netd_cfg (SNAT address {})", ip_from_be(v.snat_ip)),
            Op::PutSlot(k, v) => write!(f, "writing netd_slots entry {}/{} = {}:{}", k.id, k.slot, v.ip(), v.host_port()),
            Op::PutSvc(k, _) => {
                f.write_str("writing ")?;
                svc(f, k)
            }
            Op::DelSvc(k) => {
                f.write_str("deleting ")?;
                svc(f, k)
            }
            Op::DelSlot(k) => write!(f, "deleting netd_slots entry {}/{}", k.id, k.slot),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netd_proxy::{NsName, Proto, ServicePortKey};

    fn ep(last: u8, port: u16) -> Endpoint {
        Endpoint { ip: Ipv4Addr::new(10, 244, 1, last), port, local: last & 1 == 0, ready: true, serving: true, terminating: false }
    }

    fn sp(name: &str, vip: [u8; 4], eps: Vec<Endpoint>) -> ServicePortPlan {
        ServicePortPlan {
            slug: ServicePortKey { service: NsName { namespace: "default".into(), name: name.into() }, port_name: String::new(), proto: Proto::Tcp }.slug(80).into(),
            key: ServicePortKey { service: NsName { namespace: "default".into(), name: name.into() }, port_name: String::new(), proto: Proto::Tcp },
            port: 80,
            cluster_ip: Some(Ipv4Addr::from(vip)),
            external_ips: vec![],
            lb_ips: vec![],
            node_port: None,
            affinity_timeout: None,
            external_local: false,
            internal_local: false,
            health_check_node_port: None,
            source_ranges: Vec::new(),
            lists_cluster_ip: true,
            local_endpoints: eps.iter().filter(|e| e.local).cloned().collect(),
            cluster_endpoints: eps,
        }
    }

    fn plan(sps: Vec<ServicePortPlan>) -> Plan {
        let mut p = Plan::default();
        p.node = NodeInfo { name: "n1".into(), ..Default::default() };
        for s in sps {
            p.services.insert(s.key.clone(), Arc::new(s));
        }
        p
    }

    fn key(vip: [u8; 4], port: u16) -> SvcKey {
        SvcKey::new(Ipv4Addr::from(vip), port, 6, SCOPE_INTERNAL)
    }

    #[test]
    fn cluster_ip_renders_slots() {
        let p = plan(vec![sp("a", [10, 96, 0, 10], vec![ep(1, 8080), ep(2, 8080)])]);
        let st = render(&p, None);
        let f = &st.frontends[&key([10, 96, 0, 10], 80)];
        assert_eq!(f.value, SvcValue { id: 1, count: 2, flags: 0, affinity_timeout: 0 });
        assert_eq!(f.backends[0], BackendValue::new(Ipv4Addr::new(10, 244, 1, 1), 8080, false));
        let ops = diff(&MapState::default(), &st);
        // Slots before the frontend that exposes them.
        assert!(matches!(ops.last(), Some(Op::PutSvc(..))));
        assert_eq!(ops.len(), 3);
    }

    #[test]
    fn no_endpoints_rejects_and_affinity_flags() {
        let mut a = sp("a", [10, 96, 0, 10], vec![]);
        a.affinity_timeout = Some(10800);
        let st = render(&plan(vec![a]), None);
        let f = &st.frontends[&key([10, 96, 0, 10], 80)];
        assert_eq!(f.value.count, 0);
        assert_eq!(f.value.flags, SVC_F_REJECT | SVC_F_AFFINITY);
        assert_eq!(f.value.affinity_timeout, 10800);
    }

    #[test]
    fn local_policy_without_local_endpoints_drops_not_rejects() {
        let mut a = sp("a", [10, 96, 0, 10], vec![ep(1, 80)]);
        a.internal_local = true;
        let st = render(&plan(vec![a]), None);
        let f = &st.frontends[&key([10, 96, 0, 10], 80)];
        assert_eq!((f.value.count, f.value.flags & SVC_F_REJECT), (0, 0));
    }

    #[test]
    fn external_frontends_and_node_ports() {
        let mut a = sp("a", [10, 96, 0, 10], vec![ep(1, 80), ep(2, 80)]);
        a.node_port = Some(30080);
        a.external_ips = vec![Ipv4Addr::new(198, 18, 5, 5)];
        a.external_local = true;
        let mut p = plan(vec![a]);
        p.node.ips = vec![Ipv4Addr::new(198, 18, 0, 1)];
        let st = render(&p, None);
        assert_eq!(st.frontends.len(), 5);
        let np = &st.frontends[&SvcKey::new(Ipv4Addr::new(198, 18, 0, 1), 30080, 6, SCOPE_EXTERNAL)];
        assert_eq!(np.backends.len(), 1, "externalTrafficPolicy Local: local endpoints only");
        assert_ne!(np.value.flags & SVC_F_LOCAL, 0);
        let ext = &st.frontends[&SvcKey::new(Ipv4Addr::new(198, 18, 5, 5), 80, 6, SCOPE_EXTERNAL)];
        assert_eq!(ext.backends, np.backends);
        assert_eq!(st.frontends[&key([10, 96, 0, 10], 80)].backends.len(), 2);
        // Pods and the node (the socket load balancer, internal scope first) reach every
        // endpoint through the external frontends: kube-proxy's short-circuit.
        for k in [SvcKey::new(Ipv4Addr::new(198, 18, 0, 1), 30080, 6, SCOPE_INTERNAL), key([198, 18, 5, 5], 80)] {
            assert_eq!((st.frontends[&k].backends.len(), st.frontends[&k].value.flags), (2, 0), "{k:?}");
        }
        // Distinct ids.
        let ids: BTreeSet<u32> = st.frontends.values().map(|f| f.value.id).collect();
        assert_eq!(ids.len(), 5);
    }

    #[test]
    fn a_backend_in_this_nodes_pod_subnet_is_local_whatever_its_node_name() {
        // Endpoints without nodeName: ep(1) is odd (not "local"), in this node's pod subnet.
        let mut e = ep(1, 80);
        e.local = false;
        let other = Endpoint { ip: Ipv4Addr::new(10, 244, 2, 7), ..e.clone() };
        let host = Endpoint { ip: Ipv4Addr::new(198, 18, 0, 1), ..e.clone() };
        let mut a = sp("a", [10, 96, 0, 10], vec![e, other, host]);
        a.node_port = Some(30080);
        let mut p = plan(vec![a]);
        p.node.ips = vec![Ipv4Addr::new(198, 18, 0, 1)];
        p.node.pod_cidr = Some("10.244.1.0/24".parse().unwrap());
        let st = render(&p, None);
        let np = &st.frontends[&SvcKey::new(Ipv4Addr::new(198, 18, 0, 1), 30080, 6, SCOPE_EXTERNAL)];
        let local: Vec<(Ipv4Addr, bool)> = np.backends.iter().map(|b| (b.ip(), b.local != 0)).collect();
        assert_eq!(local, vec![(Ipv4Addr::new(10, 244, 1, 1), true), (Ipv4Addr::new(10, 244, 2, 7), false), (Ipv4Addr::new(198, 18, 0, 1), true)]);
    }

    #[test]
    fn one_endpoint_change_is_one_write_and_keeps_slots() {
        let eps: Vec<Endpoint> = (1..=10).map(|i| ep(i, 80)).collect();
        let st1 = render(&plan(vec![sp("a", [10, 96, 0, 10], eps.clone())]), None);
        // Remove endpoint 3, add endpoint 42.
        let mut eps2: Vec<Endpoint> = eps.iter().filter(|e| e.ip.octets()[3] != 3).cloned().collect();
        eps2.push(ep(42, 80));
        eps2.sort();
        let st2 = render(&plan(vec![sp("a", [10, 96, 0, 10], eps2)]), Some(&st1));
        let ops = diff(&st1, &st2);
        assert_eq!(ops, vec![Op::PutSlot(SlotKey { id: 1, slot: 3 }, BackendValue::new(Ipv4Addr::new(10, 244, 1, 42), 80, true))]);
        // Removing one: the last slot moves into the hole, the count shrinks, the tail goes.
        let eps3: Vec<Endpoint> = eps.iter().filter(|e| e.ip.octets()[3] != 3).cloned().collect();
        let st3 = render(&plan(vec![sp("a", [10, 96, 0, 10], eps3)]), Some(&st1));
        let ops = diff(&st1, &st3);
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert!(matches!(ops[0], Op::PutSlot(SlotKey { slot: 3, .. }, _)));
        assert!(matches!(ops[1], Op::PutSvc(_, SvcValue { count: 9, .. })));
        assert!(matches!(ops[2], Op::DelSlot(SlotKey { slot: 10, .. })));
        assert!(diff(&st3, &render(&plan(vec![sp("a", [10, 96, 0, 10], eps.iter().filter(|e| e.ip.octets()[3] != 3).cloned().collect())]), Some(&st3))).is_empty());
    }

    #[test]
    fn removed_service_ids_are_not_reused_in_the_same_pass() {
        let st1 = render(&plan(vec![sp("a", [10, 96, 0, 10], vec![ep(1, 80)])]), None);
        let st2 = render(&plan(vec![sp("b", [10, 96, 0, 11], vec![ep(2, 80)])]), Some(&st1));
        assert_eq!(st2.frontends.values().next().unwrap().value.id, 2);
        let ops = diff(&st1, &st2);
        assert_eq!(ops[0], Op::DelSvc(key([10, 96, 0, 10], 80)));
        assert_eq!(ops.len(), 4);
    }

    #[test]
    fn update_in_place_matches_a_full_render() {
        let eps: Vec<Endpoint> = (1..=4).map(|i| ep(i, 80)).collect();
        let p1 = plan(vec![sp("a", [10, 96, 0, 10], eps.clone()), sp("b", [10, 96, 0, 11], eps.clone()), sp("c", [10, 96, 0, 12], vec![]), sp("e", [10, 96, 0, 14], eps.clone())]);
        let st1 = render(&p1, None);
        // b loses an endpoint, c gets one, d is new, e goes; a is untouched.
        let mut p2 = p1.clone();
        let b = sp("b", [10, 96, 0, 11], eps.iter().filter(|e| e.ip.octets()[3] != 2).cloned().collect());
        let c = sp("c", [10, 96, 0, 12], vec![ep(9, 80)]);
        let d = sp("d", [10, 96, 0, 13], vec![ep(7, 80)]);
        let e_key = p1.services.keys().find(|k| k.service.name == "e").unwrap().clone();
        // (b listed twice: harmless)
        let changed: Vec<ServicePortKey> = vec![b.key.clone(), c.key.clone(), d.key.clone(), e_key.clone(), b.key.clone()];
        for s in [b, c, d] {
            p2.services.insert(s.key.clone(), Arc::new(s));
        }
        p2.services.remove(&e_key);
        let full = render(&p2, Some(&st1));
        let full_ops = diff(&st1, &full);
        let mut in_place = st1.clone();
        let ops = update(&mut in_place, &p2, &changed);
        assert_eq!(ops, full_ops);
        assert_eq!(in_place.frontends, full.frontends);
        assert_eq!(in_place.services, full.services);
        assert_eq!(in_place.next_id, full.next_id);
        assert!(ops.len() >= 5, "{ops:?}");
    }

    #[test]
    fn assign_slots_cases() {
        let b = |i: u8| BackendValue::new(Ipv4Addr::new(10, 0, 0, i), 80, false);
        assert_eq!(assign_slots(&[], &[b(1), b(2)]), vec![b(1), b(2)]);
        assert_eq!(assign_slots(&[b(1), b(2), b(3)], &[b(1), b(3)]), vec![b(1), b(3)]);
        assert_eq!(assign_slots(&[b(1), b(2), b(3)], &[b(2), b(3)]), vec![b(3), b(2)]);
        assert_eq!(assign_slots(&[b(1), b(2), b(3)], &[b(2), b(4)]), vec![b(4), b(2)]);
        assert_eq!(assign_slots(&[b(1), b(2), b(3)], &[]), vec![]);
        assert_eq!(assign_slots(&[b(1)], &[b(1), b(5), b(6)]), vec![b(1), b(5), b(6)]);
    }

    #[test]
    fn ops_read_as_the_map_entries_they_change() {
        let key = SvcKey::new(Ipv4Addr::new(10, 96, 0, 10), 53, 17, SCOPE_INTERNAL);
        let ext = SvcKey::new(Ipv4Addr::new(198, 18, 0, 10), 30080, 6, SCOPE_EXTERNAL);
        let slot = SlotKey { id: 7, slot: 2 };
        let be = BackendValue::new(Ipv4Addr::new(10, 244, 1, 5), 8053, true);
        let texts: Vec<String> = [
            Op::PutSvc(key, SvcValue::default()),
            Op::DelSvc(ext),
            Op::PutSlot(slot, be),
            Op::DelSlot(slot),
            Op::PutCfg(CfgValue { snat_ip: BackendValue::new(Ipv4Addr::new(198, 18, 0, 10), 0, false).ip, ..Default::default() }),
        ]
        .iter()
        .map(|o| o.to_string())
        .collect();
        assert_eq!(
            texts,
            [
                "writing netd_svc entry 10.96.0.10:53/udp",
                "deleting netd_svc entry 198.18.0.10:30080/tcp (from outside)",
                "writing netd_slots entry 7/2 = 10.244.1.5:8053",
                "deleting netd_slots entry 7/2",
                "writing netd_cfg (SNAT address 198.18.0.10)",
            ]
        );
    }
}
