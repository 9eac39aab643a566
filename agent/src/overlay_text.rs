//! Overlay changes as an operator reads them in logs and in `netd status`: the kernel object in
//! `ip`'s words, with the device names (`added route 10.244.58.0/24 via 10.244.58.0 dev netd.1`).
//! The planner's `Op` knows devices only by role (`Via`); the daemon names them here.

use std::fmt;

use crate::overlay::{Op, Via};

/// The devices overlay changes are made on, by role.
#[derive(Debug, Clone, Copy)]
pub struct Devices<'a> {
    /// The backend's device: the VXLAN device (`netd.<VNI>`), or the udp backend's TUN device.
    /// Neighbor and FDB entries, and `Via::Overlay`/`Via::Tun` routes, are on it.
    pub overlay: &'a str,
    /// The underlay interface (DirectRouting routes).
    pub underlay: &'a str,
}

/// One [`Op`] with its devices named: `added ...`/`removed ...` once applied ([`Op::done`]),
/// `add ...`/`remove ...` when it failed ([`Op::todo`]).
pub struct OpText<'a> {
    op: &'a Op,
    devices: Devices<'a>,
    done: bool,
}

impl Op {
    /// The change as applied: `added route 10.244.58.0/24 via 10.244.58.0 dev netd.1`.
    pub fn done<'a>(&'a self, devices: Devices<'a>) -> OpText<'a> {
        OpText { op: self, devices, done: true }
    }

    /// The change as attempted: `add route 10.244.58.0/24 via 10.244.58.0 dev netd.1`.
    pub fn todo<'a>(&'a self, devices: Devices<'a>) -> OpText<'a> {
        OpText { op: self, devices, done: false }
    }
}

impl fmt::Display for OpText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (add, replace, remove) = if self.done { ("added", "replaced", "removed") } else { ("add", "replace", "remove") };
        let dev = self.devices.overlay;
        let route = |f: &mut fmt::Formatter<'_>, verb: &str, net, spec: &crate::overlay::RouteSpec| match spec.via {
            Via::Overlay => write!(f, "{verb} route {net} via {} dev {dev}", spec.gateway),
            Via::Underlay => write!(f, "{verb} route {net} via {} dev {}", spec.gateway, self.devices.underlay),
            Via::Tun => write!(f, "{verb} route {net} dev {dev}"),
        };
        match self.op {
            Op::AddRoute(net, spec) => route(f, add, net, spec),
            // netd's own route to that destination, changed.
            Op::SetRoute(net, spec) => route(f, replace, net, spec),
            Op::DelRoute(net, spec) => route(f, remove, net, spec),
            Op::SetNeigh(ip, mac) => write!(f, "{add} neigh {ip} lladdr {mac} dev {dev}"),
            Op::DelNeigh(ip, mac) => write!(f, "{remove} neigh {ip} lladdr {mac} dev {dev}"),
            Op::SetFdb(mac, dst) => write!(f, "{add} fdb {mac} dst {dst} dev {dev}"),
            Op::DelFdb(mac, dst) => write!(f, "{remove} fdb {mac} dst {dst} dev {dev}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::RouteSpec;

    const DEVS: Devices<'static> = Devices { overlay: "netd.1", underlay: "eth0" };

    #[test]
    fn ops_read_as_ip_commands_with_device_names() {
        let net = "10.244.58.0/24".parse().unwrap();
        let gw = "10.244.58.0".parse().unwrap();
        let mac = "0e:00:c6:12:00:0b".parse().unwrap();
        let peer = "198.18.0.11".parse().unwrap();
        let overlay = RouteSpec { gateway: gw, via: Via::Overlay };
        let direct = RouteSpec { gateway: peer, via: Via::Underlay };
        let ops = [
            Op::SetNeigh(gw, mac),
            Op::SetFdb(mac, peer),
            Op::AddRoute(net, overlay),
            Op::SetRoute(net, direct),
            Op::DelRoute(net, overlay),
            Op::DelNeigh(gw, mac),
            Op::DelFdb(mac, peer),
        ];
        let done: Vec<String> = ops.iter().map(|o| o.done(DEVS).to_string()).collect();
        assert_eq!(
            done,
            [
                "added neigh 10.244.58.0 lladdr 0e:00:c6:12:00:0b dev netd.1",
                "added fdb 0e:00:c6:12:00:0b dst 198.18.0.11 dev netd.1",
                "added route 10.244.58.0/24 via 10.244.58.0 dev netd.1",
                "replaced route 10.244.58.0/24 via 198.18.0.11 dev eth0",
                "removed route 10.244.58.0/24 via 10.244.58.0 dev netd.1",
                "removed neigh 10.244.58.0 lladdr 0e:00:c6:12:00:0b dev netd.1",
                "removed fdb 0e:00:c6:12:00:0b dst 198.18.0.11 dev netd.1",
            ]
        );
        assert_eq!(ops[2].todo(DEVS).to_string(), "add route 10.244.58.0/24 via 10.244.58.0 dev netd.1");
        assert_eq!(ops[6].todo(DEVS).to_string(), "remove fdb 0e:00:c6:12:00:0b dst 198.18.0.11 dev netd.1");
    }

    #[test]
    fn the_udp_backends_network_route_has_no_gateway() {
        let udp = Devices { overlay: "netd-udp0", underlay: "eth0" };
        let op = Op::AddRoute("10.244.0.0/16".parse().unwrap(), RouteSpec { gateway: std::net::Ipv4Addr::UNSPECIFIED, via: Via::Tun });
        assert_eq!(op.done(udp).to_string(), "added route 10.244.0.0/16 dev netd-udp0");
    }
}
