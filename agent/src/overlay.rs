//! What the overlay must look like on this node for a set of leases, and the difference from what
//! the kernel has. Pure: the rtnetlink applier in `netlink` only executes the `Plan`.
//!
//! For each vxlan peer, flannel's recipe (so flanneld and netd nodes interoperate):
//!   ip neigh replace <peer subnet network addr> lladdr <peer VtepMAC> dev <vxlan> nud permanent
//!   bridge fdb replace <peer VtepMAC> dev <vxlan> dst <peer PublicIP> self permanent
//!   ip route replace <peer subnet> via <peer subnet network addr> dev <vxlan> onlink
//! With DirectRouting and the peer on our L2 segment, only
//!   ip route replace <peer subnet> via <peer PublicIP> dev <underlay>

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::lease::{Lease, Mac};

/// Which link a route leaves through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Via {
    /// The VXLAN device, gateway reached "onlink" (resolved by the permanent neighbor entry).
    Overlay,
    /// The underlay interface, gateway is the peer's public IP (DirectRouting).
    Underlay,
    /// The udp backend's TUN device, no gateway (`ip route NETWORK dev netd-udp0`): the userspace
    /// datapath picks the peer from the inner destination.
    Tun,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteSpec {
    pub gateway: Ipv4Addr,
    pub via: Via,
}

/// The desired overlay state of one node, keyed the way the kernel keys it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayState {
    /// Permanent ARP entries on the VXLAN device: peer subnet network address -> peer VtepMAC.
    pub neighs: BTreeMap<Ipv4Addr, Mac>,
    /// Permanent FDB entries on the VXLAN device: peer VtepMAC -> peer public IP.
    pub fdb: BTreeMap<Mac, Ipv4Addr>,
    /// Routes to peer subnets.
    pub routes: BTreeMap<Ipv4Net, RouteSpec>,
}

/// This node, as the planner needs it.
#[derive(Debug, Clone)]
pub struct LocalNode {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    pub vni: u32,
    /// The network config's `Network` and `SubnetLen`: a peer lease is only used if its subnet is
    /// one of the network's subnets of that length. Anything else (a key for the underlay's own
    /// prefix, the service range, a leftover of another network) is no peer, whatever it says.
    pub network: Ipv4Net,
    pub subnet_len: u8,
    pub direct_routing: bool,
    /// Prefixes directly connected on the underlay interface (for DirectRouting).
    pub underlay_prefixes: Vec<Ipv4Net>,
}

/// A peer lease that was skipped, and why (reported in logs and status, never fatal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The lease's key, so the report says what to fix.
    pub key: String,
    pub subnet: Ipv4Net,
    pub reason: String,
}

/// Why a peer lease cannot be used whatever the backend: it is not one of the network's
/// subnets (outside `Network`, another length than `SubnetLen`, host bits set), overlaps our
/// subnet, or names our own public IP.
fn unusable(local: &LocalNode, lease: &Lease) -> Option<String> {
    let subnet = lease.subnet;
    if subnet != subnet.trunc() {
        // Registry keys with host bits never become leases; Node podCIDRs might.
        Some(format!("{subnet} has host bits set (the subnet would be {})", subnet.trunc()))
    } else if !local.network.contains(&subnet) {
        Some(format!("outside the pod network {} (Network in the network config)", local.network))
    } else if subnet.prefix_len() != local.subnet_len {
        Some(format!("a /{} where the network config's SubnetLen is {}", subnet.prefix_len(), local.subnet_len))
    } else if subnet.contains(&local.subnet.network()) || local.subnet.contains(&subnet.network()) {
        Some(format!("overlaps this node's subnet {}", local.subnet))
    } else if lease.attrs.public_ip == local.public_ip {
        Some(format!("carries this node's public IP {} (a stale lease of ours?)", local.public_ip))
    } else {
        None
    }
}

/// Computes the overlay state for `local` from all leases in the registry (ours included: it is
/// filtered out here, so callers can pass the whole snapshot).
pub fn desired(local: &LocalNode, leases: &[Lease]) -> (OverlayState, Vec<Skipped>) {
    let mut state = OverlayState::default();
    let mut skipped = Vec::new();
    let mut sorted: Vec<&Lease> = leases.iter().collect();
    sorted.sort_by_key(|l| l.subnet);
    for lease in sorted {
        let subnet = lease.subnet;
        if subnet == local.subnet {
            continue;
        }
        let mut skip = |reason: String| skipped.push(Skipped { key: lease.key.clone(), subnet, reason });
        if let Some(reason) = unusable(local, lease) {
            skip(reason);
            continue;
        }
        if state.routes.keys().any(|r| r.contains(&subnet.network()) || subnet.contains(&r.network())) {
            skip("overlaps another peer's subnet".into());
            continue;
        }
        let data = match lease.attrs.vxlan_data() {
            None => {
                skip(format!("backend {:?} is not vxlan", lease.attrs.backend_type));
                continue;
            }
            Some(Err(e)) => {
                skip(e);
                continue;
            }
            Some(Ok(d)) => d,
        };
        if local.direct_routing && local.underlay_prefixes.iter().any(|p| p.contains(&lease.attrs.public_ip)) {
            state.routes.insert(subnet, RouteSpec { gateway: lease.attrs.public_ip, via: Via::Underlay });
            continue;
        }
        if data.vni != local.vni {
            skip(format!("VNI {} differs from ours ({})", data.vni, local.vni));
            continue;
        }
        if let Some(other) = state.fdb.get(&data.vtep_mac) {
            skip(format!("VtepMAC {} is already used by the node at {other}", data.vtep_mac));
            continue;
        }
        let gw = subnet.network();
        state.neighs.insert(gw, data.vtep_mac);
        state.fdb.insert(data.vtep_mac, lease.attrs.public_ip);
        state.routes.insert(subnet, RouteSpec { gateway: gw, via: Via::Overlay });
    }
    (state, skipped)
}

/// The udp backend's state: one route for the whole cluster network through the TUN device
/// (the node's own, more specific subnet stays on its pod bridge), and the peer table the
/// datapath encapsulates by: peer subnet -> peer public IP.
pub fn desired_udp(local: &LocalNode, leases: &[Lease]) -> (OverlayState, Vec<(Ipv4Net, Ipv4Addr)>, Vec<Skipped>) {
    let mut state = OverlayState::default();
    state.routes.insert(local.network, RouteSpec { gateway: Ipv4Addr::UNSPECIFIED, via: Via::Tun });
    let mut peers: Vec<(Ipv4Net, Ipv4Addr)> = Vec::new();
    let mut skipped = Vec::new();
    let mut sorted: Vec<&Lease> = leases.iter().collect();
    sorted.sort_by_key(|l| l.subnet);
    for lease in sorted {
        let subnet = lease.subnet;
        if subnet == local.subnet {
            continue;
        }
        let reason = if let Some(reason) = unusable(local, lease) {
            Some(reason)
        } else if !lease.attrs.is_udp() {
            Some(format!("backend {:?} is not udp", lease.attrs.backend_type))
        } else if peers.iter().any(|(n, _)| n.contains(&subnet.network()) || subnet.contains(&n.network())) {
            Some("overlaps another peer's subnet".to_string())
        } else {
            None
        };
        match reason {
            Some(reason) => skipped.push(Skipped { key: lease.key.clone(), subnet, reason }),
            None => peers.push((subnet, lease.attrs.public_ip)),
        }
    }
    (state, peers, skipped)
}

/// A route in the main table that netd did not create (another `proto`: the kernel's connected
/// route, a static route, DHCP's, flanneld's), as observed. netd never replaces or deletes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignRoute {
    /// Route type when not unicast ("blackhole", "unreachable", ...).
    pub kind: Option<String>,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub protocol: u8,
    pub metric: u32,
}

impl ForeignRoute {
    /// The route as `ip route` shows it, with `dev_name` naming interfaces by index.
    pub fn describe(&self, dst: Ipv4Net, dev_name: impl Fn(u32) -> Option<String>) -> String {
        let mut out = String::new();
        if let Some(k) = &self.kind {
            out.push_str(k);
            out.push(' ');
        }
        out.push_str(&dst.to_string());
        if let Some(gw) = self.gateway {
            out.push_str(&format!(" via {gw}"));
        }
        if let Some(i) = self.oif {
            out.push_str(&format!(" dev {}", dev_name(i).unwrap_or_else(|| format!("index {i}"))));
        }
        // iproute2's names (/etc/iproute2/rt_protos) for the usual ones.
        let proto = match self.protocol {
            1 => "redirect".to_string(),
            2 => "kernel".to_string(),
            3 => "boot".to_string(),
            4 => "static".to_string(),
            9 => "ra".to_string(),
            16 => "dhcp".to_string(),
            186 => "bgp".to_string(),
            188 => "ospf".to_string(),
            n => n.to_string(),
        };
        out.push_str(&format!(" proto {proto}"));
        if self.metric != 0 {
            out.push_str(&format!(" metric {}", self.metric));
        }
        out
    }
}

/// What the main routing table holds beside netd's routes through its own devices (the
/// `observed` state's routes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtherRoutes {
    /// Routes netd did not create, by destination.
    pub foreign: BTreeMap<Ipv4Net, Vec<ForeignRoute>>,
    /// Destinations of netd's own routes (proto 110) through other devices, e.g. a previous
    /// config's device not yet removed: netd's to replace.
    pub netd_elsewhere: BTreeSet<Ipv4Net>,
    /// Routes netd did not create through its overlay device, observed only when it takes the
    /// device over from flanneld (`--take-over flannel`, which makes them netd's by the
    /// operator's word): a desired one is replaced in place by netd's own (`ip route replace`
    /// swaps it atomically, traffic never lacks a route); the others are left alone.
    pub adopted: BTreeMap<Ipv4Net, RouteSpec>,
}

/// A desired route that is not programmed because its destination has a route netd did not
/// create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConflict {
    pub net: Ipv4Net,
    pub wanted: RouteSpec,
    pub existing: Vec<ForeignRoute>,
}

/// One kernel change. The applier executes them in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    DelRoute(Ipv4Net, RouteSpec),
    DelNeigh(Ipv4Addr, Mac),
    DelFdb(Mac, Ipv4Addr),
    SetNeigh(Ipv4Addr, Mac),
    SetFdb(Mac, Ipv4Addr),
    /// A route to a destination that has none of netd's: created only if the destination is
    /// still free when applied (`ip route add`, never `replace`), so a route that appeared
    /// meanwhile is not overwritten.
    AddRoute(Ipv4Net, RouteSpec),
    /// netd's own route to this destination, changed (`ip route replace`).
    SetRoute(Ipv4Net, RouteSpec),
}

/// What `diff` decided: the changes, and the desired routes left out because their destination
/// belongs to a route netd did not create.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub ops: Vec<Op>,
    pub conflicts: Vec<RouteConflict>,
}

/// The changes that turn `observed` into `desired`, ordered so that traffic is never sent into a
/// half-programmed path: stale routes go first, then stale entries; new neighbor and FDB entries
/// go in before the route that uses them (so the kernel never has to ARP for an onlink gateway).
///
/// Only netd's own routes (`observed`) are ever deleted or replaced. A desired route whose
/// destination has a route netd did not create (`others.foreign`, e.g. the kernel's connected
/// route to the underlay) is a conflict, not drift: it is left out and reported, and a route of
/// ours to that destination is removed, since it would shadow the other one (or be shadowed).
pub fn diff(desired: &OverlayState, observed: &OverlayState, others: &OtherRoutes) -> Changes {
    let mut ops = Vec::new();
    let conflicts: Vec<RouteConflict> = desired
        .routes
        .iter()
        .filter_map(|(net, spec)| others.foreign.get(net).map(|existing| RouteConflict { net: *net, wanted: *spec, existing: existing.clone() }))
        .collect();
    let conflicted = |net: &Ipv4Net| conflicts.iter().any(|c| c.net == *net);
    for (net, spec) in &observed.routes {
        // A route whose prefix stays but whose gateway changes is replaced below, not deleted.
        if !desired.routes.contains_key(net) || conflicted(net) {
            ops.push(Op::DelRoute(*net, *spec));
        }
    }
    for (ip, mac) in &observed.neighs {
        if !desired.neighs.contains_key(ip) {
            ops.push(Op::DelNeigh(*ip, *mac));
        }
    }
    for (mac, dst) in &observed.fdb {
        if !desired.fdb.contains_key(mac) {
            ops.push(Op::DelFdb(*mac, *dst));
        }
    }
    for (ip, mac) in &desired.neighs {
        if observed.neighs.get(ip) != Some(mac) {
            ops.push(Op::SetNeigh(*ip, *mac));
        }
    }
    for (mac, dst) in &desired.fdb {
        if observed.fdb.get(mac) != Some(dst) {
            ops.push(Op::SetFdb(*mac, *dst));
        }
    }
    for (net, spec) in &desired.routes {
        if conflicted(net) {
            continue;
        }
        match observed.routes.get(net) {
            Some(have) if have == spec => {}
            // Ours: "replace" moves it to the new gateway in one step.
            Some(_) => ops.push(Op::SetRoute(*net, *spec)),
            None if others.netd_elsewhere.contains(net) || others.adopted.contains_key(net) => ops.push(Op::SetRoute(*net, *spec)),
            None => ops.push(Op::AddRoute(*net, *spec)),
        }
    }
    Changes { ops, conflicts }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{LeaseAttrs, VxlanData};

    fn local() -> LocalNode {
        LocalNode {
            subnet: "10.244.1.0/24".parse().unwrap(),
            public_ip: "198.18.0.10".parse().unwrap(),
            vni: 1,
            network: "10.244.0.0/16".parse().unwrap(),
            subnet_len: 24,
            direct_routing: false,
            underlay_prefixes: vec!["198.18.0.0/24".parse().unwrap()],
        }
    }
    fn vx(subnet: &str, ip: &str, mac: &str) -> Lease {
        Lease {
            key: format!("/coreos.com/network/subnets/{}", subnet.replace('/', "-")),
            subnet: subnet.parse().unwrap(),
            attrs: LeaseAttrs::vxlan(ip.parse().unwrap(), &VxlanData { vni: 1, vtep_mac: mac.parse().unwrap() }),
            etcd_lease: Some(1),
            mod_revision: 1,
        }
    }

    #[test]
    fn one_neigh_fdb_and_onlink_route_per_peer() {
        let leases = [
            vx("10.244.1.0/24", "198.18.0.10", "0e:00:00:00:00:01"), // ours
            vx("10.244.2.0/24", "198.18.0.11", "0e:00:00:00:00:02"),
            vx("10.244.3.0/24", "198.18.0.12", "0e:00:00:00:00:03"),
        ];
        let (s, skipped) = desired(&local(), &leases);
        assert!(skipped.is_empty());
        assert_eq!(s.routes.len(), 2);
        let r = s.routes[&"10.244.3.0/24".parse().unwrap()];
        assert_eq!(r, RouteSpec { gateway: "10.244.3.0".parse().unwrap(), via: Via::Overlay });
        assert_eq!(s.neighs[&"10.244.2.0".parse().unwrap()].to_string(), "0e:00:00:00:00:02");
        assert_eq!(s.fdb[&"0e:00:00:00:00:03".parse().unwrap()], "198.18.0.12".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn direct_routing_for_peers_on_our_segment_only() {
        let mut l = local();
        l.direct_routing = true;
        let leases = [vx("10.244.2.0/24", "198.18.0.11", "0e:00:00:00:00:02"), vx("10.244.3.0/24", "198.19.5.5", "0e:00:00:00:00:03")];
        let (s, _) = desired(&l, &leases);
        assert_eq!(s.routes[&"10.244.2.0/24".parse().unwrap()], RouteSpec { gateway: "198.18.0.11".parse().unwrap(), via: Via::Underlay });
        assert_eq!(s.routes[&"10.244.3.0/24".parse().unwrap()].via, Via::Overlay);
        assert_eq!(s.fdb.len(), 1);
    }

    #[test]
    fn bad_peers_are_skipped_with_a_reason() {
        let mut dup_mac = vx("10.244.5.0/24", "198.18.0.15", "0e:00:00:00:00:02");
        dup_mac.mod_revision = 2;
        let mut other_vni = vx("10.244.6.0/24", "198.18.0.16", "0e:00:00:00:00:06");
        other_vni.attrs.backend_data = Some(serde_json::json!({"VNI": 2, "VtepMAC": "0e:00:00:00:00:06"}));
        let mut broken = vx("10.244.7.0/24", "198.18.0.17", "0e:00:00:00:00:07");
        broken.attrs.backend_data = Some(serde_json::json!({"VNI": 1}));
        let mut udp = vx("10.244.8.0/24", "198.18.0.18", "0e:00:00:00:00:08");
        udp.attrs = LeaseAttrs::udp("198.18.0.18".parse().unwrap());
        let leases = [
            vx("10.244.2.0/24", "198.18.0.11", "0e:00:00:00:00:02"),
            vx("10.244.1.0/25", "198.18.0.13", "0e:00:00:00:00:04"), // overlaps ours
            vx("10.244.9.0/24", "198.18.0.10", "0e:00:00:00:00:09"), // our public IP
            dup_mac,
            other_vni,
            broken,
            udp,
        ];
        let (s, skipped) = desired(&local(), &leases);
        assert_eq!(s.routes.keys().map(|n| n.to_string()).collect::<Vec<_>>(), ["10.244.2.0/24"]);
        let reasons: Vec<String> = skipped.iter().map(|s| format!("{} {}", s.subnet, s.reason)).collect();
        assert_eq!(skipped.len(), 6, "{reasons:#?}");
        assert!(reasons.iter().any(|r| r.starts_with("10.244.5.0/24 VtepMAC")));
        assert!(reasons.iter().any(|r| r.starts_with("10.244.6.0/24 VNI 2")));
        assert!(reasons.iter().any(|r| r.starts_with("10.244.7.0/24 BackendData")));
        assert!(reasons.iter().any(|r| r.starts_with("10.244.8.0/24 backend \"udp\"")));
    }

    #[test]
    fn udp_backend_routes_the_network_to_the_tun_and_peers_by_public_ip() {
        let mut flannel_udp = vx("10.244.4.0/24", "198.18.0.14", "0e:00:00:00:00:04");
        flannel_udp.attrs = LeaseAttrs::from_json(&flannel_udp.subnet, br#"{"PublicIP":"198.18.0.14","PublicIPv6":null}"#).unwrap();
        let mut netd_udp = vx("10.244.2.0/24", "198.18.0.11", "0e:00:00:00:00:02");
        netd_udp.attrs = LeaseAttrs::udp("198.18.0.11".parse().unwrap());
        let vxlan_peer = vx("10.244.3.0/24", "198.18.0.12", "0e:00:00:00:00:03");
        let (s, peers, skipped) = desired_udp(&local(), &[netd_udp, flannel_udp, vxlan_peer]);
        assert_eq!(s.routes.len(), 1);
        assert_eq!(s.routes[&"10.244.0.0/16".parse().unwrap()], RouteSpec { gateway: Ipv4Addr::UNSPECIFIED, via: Via::Tun });
        assert!(s.neighs.is_empty() && s.fdb.is_empty());
        assert_eq!(
            peers,
            vec![("10.244.2.0/24".parse().unwrap(), "198.18.0.11".parse().unwrap()), ("10.244.4.0/24".parse().unwrap(), "198.18.0.14".parse().unwrap())]
        );
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].reason.contains("not udp"));
    }

    #[test]
    fn diff_is_empty_when_converged_and_ordered_when_not() {
        let leases = [vx("10.244.2.0/24", "198.18.0.11", "0e:00:00:00:00:02"), vx("10.244.3.0/24", "198.18.0.12", "0e:00:00:00:00:03")];
        let (want, _) = desired(&local(), &leases);
        assert_eq!(diff(&want, &want, &OtherRoutes::default()), Changes::default());

        // Observed: peer 3 missing its route, a stale peer 4, and peer 2 moved to a new host.
        let mut seen = want.clone();
        seen.routes.remove(&"10.244.3.0/24".parse().unwrap());
        seen.routes.insert("10.244.4.0/24".parse().unwrap(), RouteSpec { gateway: "10.244.4.0".parse().unwrap(), via: Via::Overlay });
        seen.neighs.insert("10.244.4.0".parse().unwrap(), "0e:00:00:00:00:04".parse().unwrap());
        seen.fdb.insert("0e:00:00:00:00:02".parse().unwrap(), "198.18.0.99".parse().unwrap());
        let Changes { ops, conflicts } = diff(&want, &seen, &OtherRoutes::default());
        assert!(conflicts.is_empty());
        assert_eq!(
            ops,
            vec![
                Op::DelRoute("10.244.4.0/24".parse().unwrap(), RouteSpec { gateway: "10.244.4.0".parse().unwrap(), via: Via::Overlay }),
                Op::DelNeigh("10.244.4.0".parse().unwrap(), "0e:00:00:00:00:04".parse().unwrap()),
                Op::SetFdb("0e:00:00:00:00:02".parse().unwrap(), "198.18.0.11".parse().unwrap()),
                Op::AddRoute("10.244.3.0/24".parse().unwrap(), RouteSpec { gateway: "10.244.3.0".parse().unwrap(), via: Via::Overlay }),
            ]
        );
        // Our route with another gateway is replaced; one of ours on another device (a previous
        // config's) too: both are netd's.
        let mut seen = want.clone();
        let moved = RouteSpec { gateway: "198.18.0.12".parse().unwrap(), via: Via::Underlay };
        seen.routes.insert("10.244.3.0/24".parse().unwrap(), moved);
        seen.routes.remove(&"10.244.2.0/24".parse().unwrap());
        let others = OtherRoutes { netd_elsewhere: ["10.244.2.0/24".parse().unwrap()].into(), ..Default::default() };
        assert_eq!(
            diff(&want, &seen, &others).ops,
            vec![
                Op::SetRoute("10.244.2.0/24".parse().unwrap(), want.routes[&"10.244.2.0/24".parse().unwrap()]),
                Op::SetRoute("10.244.3.0/24".parse().unwrap(), want.routes[&"10.244.3.0/24".parse().unwrap()]),
            ]
        );
    }

    fn skipped_reasons(skipped: &[Skipped]) -> Vec<String> {
        skipped.iter().map(|s| format!("{} {}: {}", s.key, s.subnet, s.reason)).collect()
    }

    /// Only the network's own subnets are peers: a key for the underlay's prefix, the service
    /// range, a subnet of another length or one with host bits set is skipped and reported with
    /// its key, whatever backend, whatever it says.
    #[test]
    fn leases_outside_the_network_or_of_another_length_are_no_peers() {
        let mut host_bits = vx("10.244.5.0/24", "198.18.0.15", "0e:00:00:00:00:05");
        host_bits.subnet = Ipv4Net::new("10.244.5.7".parse().unwrap(), 24).unwrap();
        host_bits.key = "node/node5".into();
        let leases = [
            vx("10.244.2.0/24", "198.18.0.11", "0e:00:00:00:00:02"),
            vx("198.18.0.0/24", "198.18.0.12", "0e:00:00:00:00:03"), // the underlay's own prefix
            vx("10.96.0.0/12", "198.18.0.13", "0e:00:00:00:00:04"),  // the service range
            vx("10.244.8.0/23", "198.18.0.14", "0e:00:00:00:00:08"), // inside, another length
            vx("10.0.0.0/8", "198.18.0.16", "0e:00:00:00:00:10"),    // contains the whole network
            host_bits,
        ];
        let mut udp_leases = leases.clone();
        for l in &mut udp_leases {
            l.attrs = LeaseAttrs::udp(l.attrs.public_ip);
        }
        let mut direct = local();
        direct.direct_routing = true;
        let (vxlan, _) = desired(&local(), &leases);
        let (dr, _) = desired(&direct, &leases);
        let (udp, udp_peers, udp_skipped) = desired_udp(&local(), &udp_leases);
        for state in [&vxlan, &dr] {
            assert_eq!(state.routes.keys().map(|n| n.to_string()).collect::<Vec<_>>(), ["10.244.2.0/24"]);
        }
        assert_eq!(vxlan.fdb.len(), 1);
        assert_eq!(vxlan.neighs.len(), 1);
        assert_eq!(udp.routes.keys().map(|n| n.to_string()).collect::<Vec<_>>(), ["10.244.0.0/16"]);
        assert_eq!(udp_peers, vec![("10.244.2.0/24".parse().unwrap(), "198.18.0.11".parse().unwrap())]);

        let (_, skipped) = desired(&local(), &leases);
        for reasons in [skipped_reasons(&skipped), skipped_reasons(&udp_skipped)] {
            assert_eq!(
                reasons,
                [
                    "/coreos.com/network/subnets/10.0.0.0-8 10.0.0.0/8: outside the pod network 10.244.0.0/16 (Network in the network config)",
                    "/coreos.com/network/subnets/10.96.0.0-12 10.96.0.0/12: outside the pod network 10.244.0.0/16 (Network in the network config)",
                    "node/node5 10.244.5.7/24: 10.244.5.7/24 has host bits set (the subnet would be 10.244.5.0/24)",
                    "/coreos.com/network/subnets/10.244.8.0-23 10.244.8.0/23: a /23 where the network config's SubnetLen is 24",
                    "/coreos.com/network/subnets/198.18.0.0-24 198.18.0.0/24: outside the pod network 10.244.0.0/16 (Network in the network config)",
                ],
            );
        }
    }

    fn kernel_route(oif: u32) -> ForeignRoute {
        ForeignRoute { kind: None, gateway: None, oif: Some(oif), protocol: 2, metric: 0 }
    }

    /// A destination with a route netd did not create is a conflict: no add, no replace, no
    /// delete of that route; the rest goes on; a route of ours there is removed (it would shadow
    /// the other one); foreign routes elsewhere never show up in the changes at all.
    #[test]
    fn routes_netd_did_not_create_are_never_replaced_or_removed() {
        let leases = [vx("10.244.2.0/24", "198.18.0.11", "0e:00:00:00:00:02"), vx("10.244.3.0/24", "198.18.0.12", "0e:00:00:00:00:03")];
        let (want, _) = desired(&local(), &leases);
        let n2: Ipv4Net = "10.244.2.0/24".parse().unwrap();
        let n3: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        let static_route = ForeignRoute { kind: None, gateway: Some("198.18.0.1".parse().unwrap()), oif: Some(2), protocol: 3, metric: 100 };
        let mut others = OtherRoutes::default();
        others.foreign.insert(n3, vec![static_route.clone()]);
        others.foreign.insert("198.18.0.0/24".parse().unwrap(), vec![kernel_route(2)]);
        others.foreign.insert("0.0.0.0/0".parse().unwrap(), vec![static_route.clone()]);

        // Nothing programmed yet: peer 2 is added, peer 3's route is a conflict.
        let c = diff(&want, &OverlayState::default(), &others);
        assert_eq!(c.conflicts, vec![RouteConflict { net: n3, wanted: want.routes[&n3], existing: vec![static_route.clone()] }]);
        let routes: Vec<&Op> = c.ops.iter().filter(|o| matches!(o, Op::AddRoute(..) | Op::SetRoute(..) | Op::DelRoute(..))).collect();
        assert_eq!(routes, [&Op::AddRoute(n2, want.routes[&n2])]);
        // The neighbor and FDB entries are netd's own, on its own device: still programmed.
        assert_eq!(c.ops.iter().filter(|o| matches!(o, Op::SetNeigh(..) | Op::SetFdb(..))).count(), 4);

        // Our route to peer 3 was there before the other one: ours goes, theirs stays.
        let c = diff(&want, &want, &others);
        assert_eq!(c.ops, vec![Op::DelRoute(n3, want.routes[&n3])]);
        assert_eq!(c.conflicts.len(), 1);

        // The same for the udp backend's network route and for DirectRouting's.
        let mut udp_others = OtherRoutes::default();
        udp_others.foreign.insert("10.244.0.0/16".parse().unwrap(), vec![kernel_route(7)]);
        let (udp, _, _) = desired_udp(&local(), &leases);
        let c = diff(&udp, &OverlayState::default(), &udp_others);
        assert!(c.ops.is_empty(), "{:?}", c.ops);
        assert_eq!(c.conflicts[0].net.to_string(), "10.244.0.0/16");
        let mut direct = local();
        direct.direct_routing = true;
        let (dr, _) = desired(&direct, &leases);
        let c = diff(&dr, &OverlayState::default(), &others);
        assert_eq!(c.ops, vec![Op::AddRoute(n2, RouteSpec { gateway: "198.18.0.11".parse().unwrap(), via: Via::Underlay })]);
        assert_eq!(c.conflicts.len(), 1);
    }

    /// flanneld's routes through the device netd took over from it are replaced in place
    /// (SetRoute, never a delete and an add), also when they are already what netd wants; one
    /// to a subnet netd does not want stays as it is.
    #[test]
    fn routes_on_a_taken_over_device_are_replaced_in_place() {
        let leases = [vx("10.244.2.0/24", "198.18.0.11", "0e:00:00:00:00:02"), vx("10.244.3.0/24", "198.18.0.12", "0e:00:00:00:00:03")];
        let (want, _) = desired(&local(), &leases);
        let n2: Ipv4Net = "10.244.2.0/24".parse().unwrap();
        let n3: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        let n9: Ipv4Net = "10.244.9.0/24".parse().unwrap();
        // flanneld left the neighbour and FDB entries (the device's) and routes to 2, 3 and 9.
        let seen = OverlayState { routes: Default::default(), ..want.clone() };
        let mut others = OtherRoutes::default();
        for n in [n2, n3, n9] {
            others.adopted.insert(n, RouteSpec { gateway: n.network(), via: Via::Overlay });
        }
        let c = diff(&want, &seen, &others);
        assert!(c.conflicts.is_empty());
        assert_eq!(c.ops, vec![Op::SetRoute(n2, want.routes[&n2]), Op::SetRoute(n3, want.routes[&n3])]);
    }

    #[test]
    fn foreign_routes_are_described_as_ip_route_shows_them() {
        let names = |i: u32| (i == 2).then(|| "eth0".to_string());
        assert_eq!(kernel_route(2).describe("198.18.0.0/24".parse().unwrap(), names), "198.18.0.0/24 dev eth0 proto kernel");
        let r = ForeignRoute { kind: None, gateway: Some("198.18.0.1".parse().unwrap()), oif: Some(9), protocol: 4, metric: 100 };
        assert_eq!(r.describe("10.244.3.0/24".parse().unwrap(), names), "10.244.3.0/24 via 198.18.0.1 dev index 9 proto static metric 100");
        let r = ForeignRoute { kind: Some("blackhole".into()), gateway: None, oif: None, protocol: 42, metric: 0 };
        assert_eq!(r.describe("10.244.3.0/24".parse().unwrap(), names), "blackhole 10.244.3.0/24 proto 42");
    }
}
