//! What the overlay must look like on this node for a set of leases, and the difference from what
//! the kernel has. Pure: the rtnetlink applier in `netlink` only executes the `Plan`.
//!
//! For each vxlan peer, flannel's recipe (so flanneld and netd nodes interoperate):
//!   ip neigh replace <peer subnet network addr> lladdr <peer VtepMAC> dev <vxlan> nud permanent
//!   bridge fdb replace <peer VtepMAC> dev <vxlan> dst <peer PublicIP> self permanent
//!   ip route replace <peer subnet> via <peer subnet network addr> dev <vxlan> onlink
//! With DirectRouting and the peer on our L2 segment, only
//!   ip route replace <peer subnet> via <peer PublicIP> dev <underlay>

use std::collections::BTreeMap;
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
    pub direct_routing: bool,
    /// Prefixes directly connected on the underlay interface (for DirectRouting).
    pub underlay_prefixes: Vec<Ipv4Net>,
}

/// A peer lease that was skipped, and why (reported in logs and status, never fatal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub subnet: Ipv4Net,
    pub reason: String,
}

/// Why a peer lease cannot be used whatever the backend: it overlaps our subnet, or names our
/// own public IP.
fn unusable(local: &LocalNode, lease: &Lease) -> Option<String> {
    let subnet = lease.subnet;
    if subnet.contains(&local.subnet.network()) || local.subnet.contains(&subnet.network()) {
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
        let mut skip = |reason: String| skipped.push(Skipped { subnet, reason });
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
pub fn desired_udp(local: &LocalNode, network: Ipv4Net, leases: &[Lease]) -> (OverlayState, Vec<(Ipv4Net, Ipv4Addr)>, Vec<Skipped>) {
    let mut state = OverlayState::default();
    state.routes.insert(network, RouteSpec { gateway: Ipv4Addr::UNSPECIFIED, via: Via::Tun });
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
            Some(reason) => skipped.push(Skipped { subnet, reason }),
            None => peers.push((subnet, lease.attrs.public_ip)),
        }
    }
    (state, peers, skipped)
}

/// One kernel change. The applier executes them in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    DelRoute(Ipv4Net, RouteSpec),
    DelNeigh(Ipv4Addr, Mac),
    DelFdb(Mac, Ipv4Addr),
    SetNeigh(Ipv4Addr, Mac),
    SetFdb(Mac, Ipv4Addr),
    SetRoute(Ipv4Net, RouteSpec),
}

/// The changes that turn `observed` into `desired`, ordered so that traffic is never sent into a
/// half-programmed path: stale routes go first, then stale entries; new neighbor and FDB entries
/// go in before the route that uses them (so the kernel never has to ARP for an onlink gateway).
pub fn diff(desired: &OverlayState, observed: &OverlayState) -> Vec<Op> {
    let mut ops = Vec::new();
    for (net, spec) in &observed.routes {
        // A route whose prefix stays but whose gateway changes is replaced below, not deleted.
        if !desired.routes.contains_key(net) {
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
        if observed.routes.get(net) != Some(spec) {
            // "replace" semantics: a route to the same prefix with another gateway is overwritten.
            ops.push(Op::SetRoute(*net, *spec));
        }
    }
    ops
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
            direct_routing: false,
            underlay_prefixes: vec!["198.18.0.0/24".parse().unwrap()],
        }
    }
    fn vx(subnet: &str, ip: &str, mac: &str) -> Lease {
        Lease {
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
        let (s, peers, skipped) = desired_udp(&local(), "10.244.0.0/16".parse().unwrap(), &[netd_udp, flannel_udp, vxlan_peer]);
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
        assert!(diff(&want, &want).is_empty());

        // Observed: peer 3 missing its route, a stale peer 4, and peer 2 moved to a new host.
        let mut seen = want.clone();
        seen.routes.remove(&"10.244.3.0/24".parse().unwrap());
        seen.routes.insert("10.244.4.0/24".parse().unwrap(), RouteSpec { gateway: "10.244.4.0".parse().unwrap(), via: Via::Overlay });
        seen.neighs.insert("10.244.4.0".parse().unwrap(), "0e:00:00:00:00:04".parse().unwrap());
        seen.fdb.insert("0e:00:00:00:00:02".parse().unwrap(), "198.18.0.99".parse().unwrap());
        let ops = diff(&want, &seen);
        assert_eq!(
            ops,
            vec![
                Op::DelRoute("10.244.4.0/24".parse().unwrap(), RouteSpec { gateway: "10.244.4.0".parse().unwrap(), via: Via::Overlay }),
                Op::DelNeigh("10.244.4.0".parse().unwrap(), "0e:00:00:00:00:04".parse().unwrap()),
                Op::SetFdb("0e:00:00:00:00:02".parse().unwrap(), "198.18.0.11".parse().unwrap()),
                Op::SetRoute("10.244.3.0/24".parse().unwrap(), RouteSpec { gateway: "10.244.3.0".parse().unwrap(), via: Via::Overlay }),
            ]
        );
    }
}
