//! Routes to peer subnets:
//! `ip route replace SUBNET via GW dev DEV onlink proto 110` (overlay) or
//! `ip route replace SUBNET via PUBLIC_IP dev UNDERLAY proto 110` (DirectRouting);
//! `ip route add` instead of `replace` where netd has no route yet, so that a route netd did not
//! create is never overwritten.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType};
use rtnetlink::RouteMessageBuilder;

use super::{Netlink, NetlinkError};
use crate::overlay::{ForeignRoute, OtherRoutes, RouteSpec, Via};

/// The routing protocol number netd tags its routes with (`ip route show proto 110`), so that it
/// can tell its own routes from everyone else's after a restart and never touches the others.
pub const RTPROT_NETD: u8 = 110;
pub(super) const MAIN_TABLE: u8 = 254;

/// A route as `ip route` shows it, for `netd cleanup`: `DST/LEN [via GW] dev INDEX [table T]`.
fn describe_route(r: &RouteMessage) -> String {
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let (mut via, mut dev) = (String::new(), String::new());
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = format!(" via {g}"),
            RouteAttribute::Oif(i) => dev = format!(" dev #{i}"),
            _ => {}
        }
    }
    let table = if r.header.table == MAIN_TABLE { String::new() } else { format!(" table {}", r.header.table) };
    format!("{dst}/{}{via}{dev}{table}", r.header.destination_prefix_length)
}

impl Netlink {
    /// Every IPv4 route (`ip -4 route show table all`); `op` names the caller's command in errors.
    pub(super) async fn routes_v4(&self, op: &str) -> Result<Vec<RouteMessage>, NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().build();
        self.handle.route().get(msg).execute().try_collect().await.map_err(NetlinkError::op(op))
    }

    /// `ip -4 route show table main`, split: netd's routes (proto 110) through `overlay_index`
    /// or `underlay_index` (the only ones netd creates), and everything else in the table, which
    /// netd must not touch. A route without a gateway through the overlay device is the udp
    /// backend's `Via::Tun` route. With `adopt` (the device was taken over from flanneld), the
    /// other unicast routes with a gateway through `overlay_index` are `adopted`, not foreign.
    pub async fn main_routes(&self, overlay_index: u32, underlay_index: u32, adopt: bool) -> Result<(BTreeMap<Ipv4Net, RouteSpec>, OtherRoutes), NetlinkError> {
        let routes = self.routes_v4("ip -4 route show table main").await?;
        let mut out = BTreeMap::new();
        let mut others = OtherRoutes::default();
        for r in routes {
            if r.header.table != MAIN_TABLE {
                continue;
            }
            let mut dst = Ipv4Addr::UNSPECIFIED; // absent for a default route
            let mut gw = None;
            let mut oif = None;
            let mut metric = 0;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Priority(p) => metric = *p,
                    _ => {}
                }
            }
            let Ok(net) = Ipv4Net::new(dst, r.header.destination_prefix_length) else { continue };
            if r.header.protocol != RouteProtocol::Other(RTPROT_NETD) {
                if let (true, RouteType::Unicast, Some(gw), Some(o)) = (adopt, r.header.kind, gw, oif) {
                    if o == overlay_index {
                        others.adopted.insert(net, RouteSpec { gateway: gw, via: Via::Overlay });
                        continue;
                    }
                }
                let kind = (r.header.kind != RouteType::Unicast).then(|| format!("{:?}", r.header.kind).to_lowercase());
                let protocol = u8::from(r.header.protocol);
                others.foreign.entry(net).or_default().push(ForeignRoute { kind, gateway: gw, oif, protocol, metric });
                continue;
            }
            let via = match (gw, oif) {
                (None, Some(o)) if o == overlay_index => Via::Tun,
                (Some(_), Some(o)) if o == overlay_index => Via::Overlay,
                (Some(_), Some(o)) if o == underlay_index => Via::Underlay,
                _ => {
                    others.netd_elsewhere.insert(net);
                    continue;
                }
            };
            let gw = gw.unwrap_or(Ipv4Addr::UNSPECIFIED);
            out.insert(net, RouteSpec { gateway: gw, via });
        }
        Ok((out, others))
    }

    /// `ip route flush proto 110`: removes every route netd created. Returns how many.
    /// With `dry_run`, only lists them. Returns each as `DST/LEN [via GW] dev INDEX`.
    pub async fn del_routes_by_proto(&self, dry_run: bool) -> Result<Vec<String>, NetlinkError> {
        let routes = self.routes_v4("ip -4 route show proto 110").await?;
        let mut removed = Vec::new();
        for r in routes.into_iter().filter(|r| r.header.protocol == RouteProtocol::Other(RTPROT_NETD)) {
            let what = describe_route(&r);
            if dry_run {
                removed.push(what);
                continue;
            }
            match self.handle.route().del(r).execute().await.map_err(NetlinkError::op("ip route flush proto 110")) {
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
                Ok(()) => removed.push(what),
            }
        }
        Ok(removed)
    }

    /// `ip route replace NET via GW dev INDEX [onlink] proto 110`, or without a gateway
    /// (`GW` unspecified) `ip route replace NET dev INDEX scope link proto 110`. With `replace`
    /// false `ip route add`: fails (EEXIST) rather than overwrite a route already there, which
    /// may not be netd's.
    pub async fn set_route(&self, net: Ipv4Net, gw: Ipv4Addr, index: u32, onlink: bool, replace: bool) -> Result<(), NetlinkError> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .output_interface(index)
            .protocol(RouteProtocol::Other(RTPROT_NETD));
        b = if gw.is_unspecified() { b.scope(RouteScope::Link) } else { b.gateway(gw).scope(RouteScope::Universe) };
        if onlink {
            b = b.onlink();
        }
        let o = if onlink { " onlink" } else { "" };
        let req = self.handle.route().add(b.build());
        // Without `replace` the request carries NLM_F_EXCL: the kernel refuses to touch an
        // existing route with the same destination and metric.
        let (req, cmd) = if replace { (req.replace(), "replace") } else { (req, "add") };
        req.execute().await.map_err(NetlinkError::op(format!("ip route {cmd} {net} via {gw} dev index {index}{o} proto {RTPROT_NETD}")))
    }

    /// `ip route del NET via GW dev INDEX proto 110` (absent is fine).
    pub async fn del_route(&self, net: Ipv4Net, gw: Ipv4Addr, index: u32) -> Result<(), NetlinkError> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .output_interface(index)
            .protocol(RouteProtocol::Other(RTPROT_NETD));
        if !gw.is_unspecified() {
            b = b.gateway(gw);
        }
        let mut msg = b.build();
        msg.header.flags = RouteFlags::empty();
        // Any scope, as `ip route del` does: the kernel only deletes a route whose scope equals
        // the request's, and a gateway-less route (udp backend, or one added by hand) has link
        // scope, not the builder's default universe.
        msg.header.scope = RouteScope::NoWhere;
        match self.handle.route().del(msg).execute().await.map_err(NetlinkError::op(format!("ip route del {net} via {gw} dev index {index}"))) {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        }
    }
}
