//! `desired(node, snapshot) -> Plan`: the pure planner.
//!
//! Kubernetes semantics as kube-proxy implements them: ready endpoints, else serving-terminating
//! ones; traffic policies; session affinity; LoadBalancer ingress IPs; frontends claimed by two
//! services go to the older one. [`desired_from`] gives the same answer as [`desired`] but reuses
//! the previous plan's per-service results where the inputs are the very same objects, which is
//! what keeps an endpoint change cheap with 10,000 services.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{Endpoint, HealthCheck, NodeInfo, Plan, Proto, ServicePortKey, ServicePortPlan};
use crate::snapshot::{NsName, ServiceSnapshot};

/// Services with this label belong to another proxy (`--service-proxy-name` of kube-proxy).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// kube-proxy's default ClientIP affinity timeout (3 h).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

/// The objects a service's port plans were computed from.
#[derive(Debug, Clone)]
pub(crate) struct Inputs {
    /// creationTimestamp in seconds (older services win contested frontends).
    created: i64,
    service: Arc<Service>,
    slices: Vec<Arc<EndpointSlice>>,
    ports: Vec<Arc<ServicePortPlan>>,
    warnings: Vec<String>,
}

impl Inputs {
    fn same<'a>(&self, service: &Arc<Service>, slices: impl ExactSizeIterator<Item = &'a Arc<EndpointSlice>>) -> bool {
        Arc::ptr_eq(&self.service, service) && self.slices.len() == slices.len() && self.slices.iter().zip(slices).all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

/// What this node must program for `snap`.
pub fn desired(node: &NodeInfo, snap: &ServiceSnapshot) -> Plan {
    desired_from(node, snap, None)
}

/// [`desired`], reusing `prev`'s results for services whose objects did not change. When `snap`
/// can say which services it touched since `prev` was planned, only those are looked at.
pub fn desired_from(node: &NodeInfo, snap: &ServiceSnapshot, prev: Option<&Plan>) -> Plan {
    plan_from(node, snap, prev, true)
}

/// [`desired_from`] without trusting the snapshot's change log: every service's inputs are
/// compared with `prev`'s by pointer (O(services), no allocation). The proxy does this on its
/// periodic resync, so that the result rests on the full snapshot alone.
pub fn desired_from_all(node: &NodeInfo, snap: &ServiceSnapshot, prev: Option<&Plan>) -> Plan {
    plan_from(node, snap, prev, false)
}

fn plan_from(node: &NodeInfo, snap: &ServiceSnapshot, prev: Option<&Plan>, use_log: bool) -> Plan {
    let prev = prev.filter(|p| p.node == *node);
    let mark = snap.mark();
    let service_cidr = snap.cluster_config.as_ref().map(|c| c.service_cluster_ip_range);
    if let Some(mut plan) = prev.and_then(|p| patch(node, snap, p, use_log)) {
        plan.mark = Some(mark);
        plan.service_cidr = service_cidr;
        return plan;
    }
    // Services, slice groups and the previous inputs are all sorted by service: walk them in
    // step instead of looking each service up (this runs on every change, for every service).
    let mut prev_iter = prev.map(|p| p.inputs.iter().peekable());
    let mut slice_iter = snap.slice_groups().iter().peekable();
    let empty = crate::snapshot::SliceGroup::default();
    let mut inputs = imbl::OrdMap::new();
    for (key, svc) in snap.services() {
        while slice_iter.peek().is_some_and(|(k, _)| *k < key) {
            slice_iter.next();
        }
        let group = match slice_iter.peek() {
            Some((k, g)) if *k == key => *g,
            _ => &empty,
        };
        let mut reused = None;
        if let Some(it) = prev_iter.as_mut() {
            while it.peek().is_some_and(|(k, i)| !Arc::ptr_eq(&i.service, svc) && *k < key) {
                it.next();
            }
            if let Some((k, i)) = it.peek() {
                if (Arc::ptr_eq(&i.service, svc) || *k == key) && i.same(svc, group.values()) {
                    reused = Some(Arc::clone(i));
                }
            }
        }
        let entry = reused.unwrap_or_else(|| {
            let slices: Vec<Arc<EndpointSlice>> = group.values().cloned().collect();
            let mut warnings = Vec::new();
            let ports = plan_service(node, key, svc, &slices, &mut warnings).into_iter().map(Arc::new).collect();
            let created = svc.metadata.creation_timestamp.as_ref().map_or(i64::MAX, |t| t.0.as_second());
            Arc::new(Inputs { created, service: svc.clone(), slices, ports, warnings })
        });
        inputs.insert(key.clone(), entry);
    }
    let mut plan = assemble(node, inputs);
    plan.mark = Some(mark);
    plan.service_cidr = service_cidr;
    plan
}

/// The fast path of [`desired_from`]: when the same services exist as in `prev` and every
/// changed one keeps its frontends (only endpoints or other per-service details changed),
/// the new plan is `prev` with those services' port plans swapped in. The frontend claims,
/// their order and the warnings are then provably what [`assemble`] would produce, so the
/// result is identical to a full plan; anything else returns `None` (full path).
///
/// The candidates are the services the snapshot touched since `prev` (O(changes)) when
/// `use_log` and the snapshot knows; otherwise every service, compared by pointer.
fn patch(node: &NodeInfo, snap: &ServiceSnapshot, prev: &Plan, use_log: bool) -> Option<Plan> {
    if prev.inputs.len() != snap.services().len() {
        return None;
    }
    let logged = if use_log { prev.mark.and_then(|m| snap.changed_since(m)) } else { None };
    let candidates: Vec<(&NsName, &Arc<Service>, &Arc<Inputs>)> = match logged {
        Some(keys) => {
            let mut v = Vec::new();
            for key in keys {
                match (snap.services().get_key_value(key), prev.inputs.get(key)) {
                    (Some((k, svc)), Some(old)) => v.push((k, svc, old)),
                    (None, None) => {} // slices of a service that does not exist
                    _ => return None,  // a service came or went
                }
            }
            v
        }
        None => {
            let mut v = Vec::new();
            for ((key, svc), (pkey, old)) in snap.services().iter().zip(prev.inputs.iter()) {
                if key != pkey {
                    return None;
                }
                v.push((key, svc, old));
            }
            v
        }
    };
    let empty = crate::snapshot::SliceGroup::default();
    let mut changed: Vec<(&NsName, Arc<Inputs>)> = Vec::new();
    for (key, svc, old) in candidates {
        let group = snap.slice_groups().get(key).unwrap_or(&empty);
        if old.same(svc, group.values()) {
            continue;
        }
        let slices: Vec<Arc<EndpointSlice>> = group.values().cloned().collect();
        let mut warnings = Vec::new();
        let ports: Vec<Arc<ServicePortPlan>> = plan_service(node, key, svc, &slices, &mut warnings).into_iter().map(Arc::new).collect();
        let created = svc.metadata.creation_timestamp.as_ref().map_or(i64::MAX, |t| t.0.as_second());
        if created != old.created || warnings != old.warnings || ports.len() != old.ports.len() {
            return None;
        }
        for (o, n) in old.ports.iter().zip(&ports) {
            let same_frontends = o.key == n.key
                && o.port == n.port
                && o.cluster_ip == n.cluster_ip
                && o.external_ips == n.external_ips
                && o.lb_ips == n.lb_ips
                && o.node_port == n.node_port
                && o.health_check_node_port == n.health_check_node_port;
            // The old port plan must have won all its claims (it is in the plan as it was).
            if !same_frontends || !prev.services.get(&o.key).is_some_and(|p| Arc::ptr_eq(p, o)) {
                return None;
            }
        }
        changed.push((key, Arc::new(Inputs { created, service: svc.clone(), slices, ports, warnings })));
    }
    let mut plan = prev.clone();
    let mut swapped = Vec::new();
    for (key, new) in changed {
        for sp in &new.ports {
            plan.services.insert(sp.key.clone(), sp.clone());
            swapped.push(sp.key.clone());
        }
        for hc in new.ports.iter().filter_map(|sp| sp.health_check_node_port) {
            if let Some(e) = plan.health_checks.get_mut(&hc).filter(|e| e.service == *key) {
                e.local_endpoints =
                    new.ports.iter().filter(|sp| sp.health_check_node_port == Some(hc)).map(|sp| sp.local_endpoints.len()).max().unwrap_or(0);
            }
        }
        plan.inputs.insert(key.clone(), new);
    }
    plan.id = crate::model::next_plan_id();
    plan.delta = Some((prev.id, swapped.into()));
    Some(plan)
}

/// Puts the per-service results together, settling frontends claimed twice.
fn assemble(node: &NodeInfo, inputs: imbl::OrdMap<NsName, Arc<Inputs>>) -> Plan {
    let mut plan = Plan { node: node.clone(), id: crate::model::next_plan_id(), ..Default::default() };
    // Older services win a contested frontend, as the API server would have refused the newer.
    let mut order: Vec<(&NsName, &Arc<Inputs>)> = inputs.iter().collect();
    order.sort_by(|a, b| a.1.created.cmp(&b.1.created).then(a.0.cmp(b.0)));
    let mut ip_claims: HashMap<(Ipv4Addr, Proto, u16), &ServicePortKey> = HashMap::with_capacity(inputs.len() * 2);
    let mut np_claims: HashMap<(Proto, u16), &ServicePortKey> = HashMap::new();
    let mut listed: std::collections::HashSet<Ipv4Addr> = std::collections::HashSet::with_capacity(inputs.len());
    for (_, inp) in order {
        plan.warnings.extend(inp.warnings.iter().cloned());
        for sp in &inp.ports {
            let mut lost: Vec<String> = Vec::new();
            let mut claim_ip = |ip: Ipv4Addr, what: &str| -> bool {
                match ip_claims.entry((ip, sp.key.proto, sp.port)) {
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(&sp.key);
                        true
                    }
                    std::collections::hash_map::Entry::Occupied(o) => {
                        lost.push(format!("{} {what} {ip}:{} is already used by {}", sp.key, sp.port, o.get()));
                        false
                    }
                }
            };
            let cluster_ok = sp.cluster_ip.is_none_or(|ip| claim_ip(ip, "cluster IP"));
            let ext_ok: Vec<bool> = sp.external_ips.iter().map(|ip| claim_ip(*ip, "external IP")).collect();
            let lb_ok: Vec<bool> = sp.lb_ips.iter().map(|ip| claim_ip(*ip, "load-balancer IP")).collect();
            let np_ok = match sp.node_port {
                None => true,
                Some(np) => match np_claims.entry((sp.key.proto, np)) {
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(&sp.key);
                        true
                    }
                    std::collections::hash_map::Entry::Occupied(o) => {
                        lost.push(format!("{} nodePort {np} is already used by {}", sp.key, o.get()));
                        false
                    }
                },
            };
            // One port plan lists each ClusterIP (see `lists_cluster_ip`): the first port of the
            // oldest service holding it.
            let unlist = sp.lists_cluster_ip && !(cluster_ok && sp.cluster_ip.is_some_and(|ip| listed.insert(ip)));
            let sp = if lost.is_empty() && !unlist {
                sp.clone()
            } else {
                plan.warnings.append(&mut lost);
                let mut s = (**sp).clone();
                if !cluster_ok {
                    s.cluster_ip = None;
                }
                s.external_ips = s.external_ips.iter().zip(&ext_ok).filter(|(_, ok)| **ok).map(|(ip, _)| *ip).collect();
                s.lb_ips = s.lb_ips.iter().zip(&lb_ok).filter(|(_, ok)| **ok).map(|(ip, _)| *ip).collect();
                if !np_ok {
                    s.node_port = None;
                }
                if unlist {
                    s.lists_cluster_ip = false;
                }
                Arc::new(s)
            };
            if let Some(hc) = sp.health_check_node_port {
                let e = plan.health_checks.entry(hc).or_insert(HealthCheck { service: sp.key.service.clone(), local_endpoints: 0 });
                if e.service == sp.key.service {
                    e.local_endpoints = e.local_endpoints.max(sp.local_endpoints.len());
                }
            }
            plan.services.insert(sp.key.clone(), sp);
        }
    }
    plan.inputs = inputs;
    plan
}

/// The port plans of one service.
fn plan_service(node: &NodeInfo, key: &NsName, svc: &Service, slices: &[Arc<EndpointSlice>], warnings: &mut Vec<String>) -> Vec<ServicePortPlan> {
    let Some(spec) = &svc.spec else { return Vec::new() };
    let typ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if typ == "ExternalName" {
        return Vec::new();
    }
    // A Service labelled for another proxy implementation is that proxy's to program (kube-proxy
    // skips them the same way).
    if svc.metadata.labels.as_ref().is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
        return Vec::new();
    }
    let parse_ip = |s: &str, what: &str, warnings: &mut Vec<String>| -> Option<Ipv4Addr> {
        match s.parse::<Ipv4Addr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                warnings.push(format!("{key}: {what} {s:?} is not an IPv4 address; ignored"));
                None
            }
        }
    };
    let cluster_ip = match spec.cluster_ip.as_deref() {
        None | Some("") | Some("None") => None,
        Some(s) => parse_ip(s, "clusterIP", warnings),
    };
    if cluster_ip.is_some_and(|ip| node.local_service_ips.contains(&ip)) {
        return Vec::new();
    }
    let external_ips: Vec<Ipv4Addr> =
        spec.external_ips.iter().flatten().filter_map(|s| parse_ip(s, "externalIP", warnings)).collect();
    let lb_ips: Vec<Ipv4Addr> = if typ == "LoadBalancer" {
        svc.status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref())
            .filter_map(|s| parse_ip(s, "load-balancer ingress IP", warnings))
            .collect()
    } else {
        Vec::new()
    };
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    // Invalid ranges are reported and left out; extra blanks are tolerated as by kube-proxy.
    let mut source_ranges: Vec<Ipv4Net> = Vec::new();
    if typ == "LoadBalancer" {
        for r in spec.load_balancer_source_ranges.iter().flatten() {
            match r.trim().parse::<ipnet::IpNet>() {
                Ok(ipnet::IpNet::V4(n)) => source_ranges.push(n.trunc()),
                Ok(ipnet::IpNet::V6(_)) => {}
                Err(_) => warnings.push(format!("{key}: loadBalancerSourceRanges entry {r:?} is not a CIDR; ignored")),
            }
        }
    }
    let node_ports_allowed = typ == "NodePort" || typ == "LoadBalancer";
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let hcnp = if external_local && node_ports_allowed {
        spec.health_check_node_port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0)
    } else {
        None
    };

    let mut out = Vec::new();
    for port in spec.ports.iter().flatten() {
        let Some(proto) = Proto::from_k8s(port.protocol.as_deref()) else {
            warnings.push(format!("{key}: protocol {:?} is not supported; port ignored", port.protocol));
            continue;
        };
        let Ok(p) = u16::try_from(port.port) else { continue };
        if p == 0 {
            continue;
        }
        let port_name = port.name.clone().unwrap_or_default();
        let node_port = if node_ports_allowed { port.node_port.and_then(|n| u16::try_from(n).ok()).filter(|n| *n > 0) } else { None };
        let (all, warn) = endpoints_for(node, slices, &port_name, proto);
        warnings.extend(warn.into_iter().map(|w| format!("{key}: {w}")));
        let cluster_endpoints = choose(all.iter().filter(|_| true));
        let local_endpoints = choose(all.iter().filter(|e| e.local));
        if cluster_ip.is_none() && external_ips.is_empty() && lb_ips.is_empty() && node_port.is_none() {
            continue; // headless: nothing for the proxy
        }
        let spk = ServicePortKey { service: key.clone(), port_name, proto };
        out.push(ServicePortPlan {
            slug: spk.slug(p).into(),
            key: spk,
            port: p,
            cluster_ip,
            external_ips: external_ips.clone(),
            lb_ips: lb_ips.clone(),
            node_port,
            affinity_timeout,
            external_local,
            internal_local,
            health_check_node_port: hcnp,
            source_ranges: source_ranges.clone(),
            lists_cluster_ip: out.is_empty() && cluster_ip.is_some(),
            cluster_endpoints,
            local_endpoints,
        });
    }
    out
}

/// Ready endpoints; if there are none, the serving terminating ones (kube-proxy's fallback).
fn choose<'a>(eps: impl Iterator<Item = &'a Endpoint> + Clone) -> Vec<Endpoint> {
    let ready: Vec<Endpoint> = eps.clone().filter(|e| e.ready).cloned().collect();
    if !ready.is_empty() {
        return ready;
    }
    eps.filter(|e| e.serving && e.terminating).cloned().collect()
}

/// Every IPv4 endpoint of `slices` for the service port named `port_name`, distinct by
/// address and port, sorted.
fn endpoints_for(node: &NodeInfo, slices: &[Arc<EndpointSlice>], port_name: &str, proto: Proto) -> (Vec<Endpoint>, Vec<String>) {
    let mut by_addr: BTreeMap<(Ipv4Addr, u16), Endpoint> = BTreeMap::new();
    let mut warnings = Vec::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let Some(target) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name && Proto::from_k8s(p.protocol.as_deref()) == Some(proto)
        }) else {
            continue;
        };
        let Some(tport) = target.port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0) else { continue };
        for ep in &slice.endpoints {
            let Some(addr) = ep.addresses.first() else { continue };
            let Ok(ip) = addr.parse::<Ipv4Addr>() else {
                warnings.push(format!("endpoint address {addr:?} is not IPv4; ignored"));
                continue;
            };
            let c = ep.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let local = !node.name.is_empty() && ep.node_name.as_deref() == Some(node.name.as_str());
            let e = Endpoint { ip, port: tport, local, ready, serving, terminating };
            by_addr
                .entry((ip, tport))
                .and_modify(|old| {
                    // The same address in two slices (during a move): the better state wins.
                    old.ready |= e.ready;
                    old.serving |= e.serving;
                    old.terminating &= e.terminating;
                    old.local |= e.local;
                })
                .or_insert(e);
        }
    }
    (by_addr.into_values().collect(), warnings)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;
    pub use crate::testdata::{node, slice, svc, web_snapshot};

    #[test]
    fn ports_frontends_and_endpoints() {
        let plan = desired(&node(), &web_snapshot());
        assert_eq!(plan.services.len(), 2);
        let http = plan.services.values().find(|s| s.key.port_name == "http").unwrap();
        assert_eq!(http.cluster_ip, Some("10.96.0.10".parse().unwrap()));
        assert_eq!(http.node_port, Some(30080));
        assert_eq!(http.external_ips, vec!["198.18.0.200".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(http.affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT));
        let ips: Vec<String> = http.cluster_endpoints.iter().map(|e| e.addr()).collect();
        assert_eq!(ips, ["10.244.1.5:8080", "10.244.2.7:8080"], "terminating endpoint unused while ready ones exist");
        assert_eq!(http.local_endpoints.len(), 1);
        let dns = plan.services.values().find(|s| s.key.port_name == "dns").unwrap();
        assert_eq!(dns.key.proto, Proto::Udp);
        assert_eq!(dns.cluster_endpoints[0].port, 5353);
    }

    #[test]
    fn terminating_endpoints_only_when_no_ready_ones_remain() {
        let snap = ServiceSnapshot::from_objects(
            [svc(json!({"metadata": {"name": "a"}, "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 80}]}}))],
            [slice(json!({
                "metadata": {"name": "a-x", "labels": {"kubernetes.io/service-name": "a"}},
                "addressType": "IPv4", "ports": [{"port": 80}],
                "endpoints": [
                    {"addresses": ["10.244.2.8"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                    {"addresses": ["10.244.2.9"], "conditions": {"ready": false, "serving": false, "terminating": true}}
                ]
            }))],
        );
        let plan = desired(&node(), &snap);
        let sp = plan.services.values().next().unwrap();
        assert_eq!(sp.cluster_endpoints.len(), 1);
        assert_eq!(sp.cluster_endpoints[0].ip.to_string(), "10.244.2.8");
    }

    #[test]
    fn traffic_policies_and_health_checks() {
        let snap = ServiceSnapshot::from_objects(
            [svc(json!({"metadata": {"name": "lb"}, "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.12",
                "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local", "healthCheckNodePort": 31000,
                "ports": [{"port": 80, "nodePort": 30081}]},
                "status": {"loadBalancer": {"ingress": [{"ip": "198.18.0.201"}]}}}))],
            [slice(json!({
                "metadata": {"name": "lb-x", "labels": {"kubernetes.io/service-name": "lb"}},
                "addressType": "IPv4", "ports": [{"port": 8080}],
                "endpoints": [{"addresses": ["10.244.2.8"], "nodeName": "node1"}]
            }))],
        );
        let plan = desired(&node(), &snap);
        let sp = plan.services.values().next().unwrap();
        assert_eq!(sp.lb_ips.len(), 1);
        assert!(sp.internal_endpoints().is_empty() && sp.external_endpoints().is_empty());
        assert_eq!(sp.internal_fallback(), crate::model::NoEndpoints::Drop);
        assert_eq!(plan.health_checks[&31000].local_endpoints, 0);
    }

    #[test]
    fn contested_frontends_go_to_the_older_service() {
        let snap = ServiceSnapshot::from_objects(
            [
                svc(json!({"metadata": {"name": "old", "creationTimestamp": "2024-01-01T00:00:00Z"},
                    "spec": {"clusterIP": "10.96.0.20", "externalIPs": ["198.18.0.250"], "ports": [{"port": 80}]}})),
                svc(json!({"metadata": {"name": "new", "creationTimestamp": "2025-01-01T00:00:00Z"},
                    "spec": {"clusterIP": "10.96.0.21", "externalIPs": ["198.18.0.250"], "ports": [{"port": 80}]}})),
            ],
            [],
        );
        let plan = desired(&node(), &snap);
        let new = plan.services.values().find(|s| s.key.service.name == "new").unwrap();
        assert!(new.external_ips.is_empty());
        assert_eq!(plan.warnings.len(), 1, "{:?}", plan.warnings);
    }

    #[test]
    fn incremental_planning_reuses_unchanged_services_and_equals_a_full_plan() {
        let mut snap = web_snapshot();
        snap.put_service(Arc::new(svc(json!({"metadata": {"name": "b"}, "spec": {"clusterIP": "10.96.0.30", "ports": [{"port": 80}]}}))));
        let p1 = desired(&node(), &snap);
        snap.put_slice(Arc::new(slice(json!({
            "metadata": {"name": "b-1", "labels": {"kubernetes.io/service-name": "b"}},
            "addressType": "IPv4", "ports": [{"port": 80}], "endpoints": [{"addresses": ["10.244.3.3"]}]}))));
        let p2 = desired_from(&node(), &snap, Some(&p1));
        let full = desired(&node(), &snap);
        let web = |p: &Plan| p.services.values().find(|s| s.key.port_name == "http").unwrap().clone();
        assert!(Arc::ptr_eq(&web(&p1), &web(&p2)), "unchanged service reused");
        let b = |p: &Plan| p.services.values().find(|s| s.key.service.name == "b").unwrap().clone();
        assert_eq!(b(&p2).cluster_endpoints.len(), 1);
        assert_eq!(p2.services.len(), full.services.len());
        for (k, v) in &full.services {
            assert_eq!(**v, *p2.services[k]);
        }
        // The incremental plan says what changed since which plan; a full plan does not.
        assert!(p1.id() != 0 && p2.id() != p1.id());
        let changed = p2.changes_since(p1.id()).expect("incremental");
        assert_eq!(changed.iter().map(|k| k.service.name.as_str()).collect::<Vec<_>>(), ["b"]);
        assert!(full.changes_since(p1.id()).is_none() && p1.delta.is_none());
    }

    #[test]
    fn services_of_another_proxy_are_skipped() {
        let plan = desired(&node(), &crate::testdata::feature_snapshot());
        assert!(plan.services.keys().all(|k| k.service.name != "other"), "labelled service.kubernetes.io/service-proxy-name");
        assert!(plan.services.keys().any(|k| k.service.name == "dual"));
    }

    #[test]
    fn load_balancer_source_ranges_and_the_service_range() {
        let snap = crate::testdata::feature_snapshot();
        let plan = desired(&node(), &snap);
        assert_eq!(plan.service_cidr, Some("10.96.0.0/12".parse().unwrap()), "from <prefix>/config");
        let lb = plan.services.values().find(|s| s.key.service.name == "lb").unwrap();
        let want: Vec<ipnet::Ipv4Net> = vec!["198.18.0.0/24".parse().unwrap(), "203.0.113.0/25".parse().unwrap()];
        assert_eq!(lb.source_ranges, want, "blanks around a range are tolerated");
        // node0 (198.18.0.10) is in a range: its LB IP may be the source too, as in kube-proxy.
        let fw = lb.firewall(&node()).unwrap();
        assert_eq!(fw.last(), Some(&"198.18.0.210/32".parse().unwrap()));
        let mut far = node();
        far.ips = vec!["192.0.2.1".parse().unwrap()];
        assert_eq!(lb.firewall(&far).unwrap(), want);
        // Only LoadBalancers have them; a bad entry is reported.
        let snap = ServiceSnapshot::from_objects(
            [
                svc(json!({"metadata": {"name": "np"}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.11", "loadBalancerSourceRanges": ["10.0.0.0/8"],
                    "ports": [{"port": 80, "nodePort": 30001}]}})),
                svc(json!({"metadata": {"name": "bad"}, "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.12", "loadBalancerSourceRanges": ["nonsense", "10.1.0.0/16"],
                    "ports": [{"port": 80, "nodePort": 30002}]}, "status": {"loadBalancer": {"ingress": [{"ip": "198.18.0.220"}]}}})),
            ],
            [],
        );
        let plan = desired(&node(), &snap);
        let np = plan.services.values().find(|s| s.key.service.name == "np").unwrap();
        assert!(np.source_ranges.is_empty() && np.firewall(&node()).is_none());
        let bad = plan.services.values().find(|s| s.key.service.name == "bad").unwrap();
        assert_eq!(bad.source_ranges, vec!["10.1.0.0/16".parse::<ipnet::Ipv4Net>().unwrap()]);
        assert!(plan.warnings.iter().any(|w| w.contains("\"nonsense\"")), "{:?}", plan.warnings);
    }

    #[test]
    fn one_port_plan_lists_each_cluster_ip() {
        let mut snap = crate::testdata::feature_snapshot();
        // A second service with the same ClusterIP on another port (the API server would refuse
        // it; two lists of one address would be one element deleted twice).
        snap.put_service(Arc::new(svc(json!({"metadata": {"name": "twin"},
            "spec": {"clusterIP": "10.96.0.70", "ports": [{"port": 54}]}}))));
        let plan = desired(&node(), &snap);
        let mut count: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
        for sp in plan.services.values() {
            let vip = sp.cluster_ip.unwrap();
            *count.entry(vip).or_default() += usize::from(sp.lists_cluster_ip);
        }
        assert!(count.values().all(|n| *n == 1), "{count:?}");
        let dual: Vec<bool> = plan.services.values().filter(|s| s.key.service.name == "dual").map(|s| s.lists_cluster_ip).collect();
        assert_eq!(dual.len(), 2);
        assert!(plan.services.values().any(|s| s.key.service.name == "twin" && !s.lists_cluster_ip));
    }

    #[test]
    fn headless_and_external_name_services_are_ignored() {
        let snap = ServiceSnapshot::from_objects(
            [
                svc(json!({"metadata": {"name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}})),
                svc(json!({"metadata": {"name": "e"}, "spec": {"type": "ExternalName", "externalName": "example.org"}})),
            ],
            [],
        );
        assert!(desired(&node(), &snap).services.is_empty());
    }

    /// Plans made from the snapshot's change log (and from the pointer walk) equal plans made
    /// from scratch, through endpoint changes, service edits that move frontends, services
    /// added and removed, slices moved between services, the local DNS VIP, and a snapshot
    /// forked on the side.
    #[test]
    fn incremental_plans_equal_full_plans() {
        use crate::testdata::{generated_service, generated_slice, generated_snapshot};
        let same = |a: &Plan, b: &Plan| a.services == b.services && a.health_checks == b.health_checks && a.warnings == b.warnings;
        let mut n = node();
        n.local_service_ips = vec![crate::testdata::generated_vip(7)];
        let mut snap = generated_snapshot(30, 2, 8080);
        let mut by_log = desired(&n, &snap);
        let mut by_walk = by_log.clone();
        let mut deltas = 0;
        for g in 1..=60u32 {
            let i = (g as usize * 7) % 30;
            match g % 10 {
                0 => snap.put_service(Arc::new(generated_service(200 + g as usize))),
                1 => snap.remove_service(&NsName::new("bench", format!("svc-{}", 200 + g as usize - 1))),
                2 => {
                    // The same service, another cluster IP: frontends move (full path).
                    let mut s = generated_service(i);
                    s.spec.as_mut().unwrap().cluster_ip = Some(crate::testdata::generated_vip(1000 + g as usize).to_string());
                    snap.put_service(Arc::new(s));
                }
                3 => {
                    let mut sl = generated_slice(i, 1, 8080, g);
                    sl.metadata.labels.as_mut().unwrap().insert(crate::snapshot::SERVICE_NAME_LABEL.into(), format!("svc-{}", (i + 1) % 30));
                    snap.put_slice(Arc::new(sl));
                }
                4 => snap.remove_slice(&NsName::new("bench", format!("svc-{i}"))),
                _ => snap.put_slice(Arc::new(generated_slice(i, 1 + g as usize % 3, 8080, g))),
            }
            let full = desired(&n, &snap);
            let next = desired_from(&n, &snap, Some(&by_log));
            assert!(same(&next, &full), "change log, pass {g}");
            let walked = desired_from_all(&n, &snap, Some(&by_walk));
            assert!(same(&walked, &full), "pointer walk, pass {g}");
            if next.delta.is_some() {
                deltas += 1;
            }
            by_log = next;
            by_walk = walked;
        }
        assert!(deltas >= 25, "most passes take the O(changes) path: {deltas}");
        assert!(!by_log.services.values().any(|sp| sp.cluster_ip == Some(crate::testdata::generated_vip(7))), "the local DNS VIP is not load-balanced");
        // A snapshot changed on the side (a fork) is planned correctly from an old plan.
        let mut side = snap.clone();
        snap.put_slice(Arc::new(generated_slice(3, 2, 8080, 999)));
        side.put_slice(Arc::new(generated_slice(4, 2, 8080, 999)));
        let p_head = desired_from(&n, &snap, Some(&by_log));
        assert!(same(&desired_from(&n, &side, Some(&p_head)), &desired(&n, &side)));
    }
}
