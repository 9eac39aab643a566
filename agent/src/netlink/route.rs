//! Routes to peer subnets:
//! `ip route replace SUBNET via GW dev DEV onlink proto 110` (overlay) or
//! `ip route replace SUBNET via PUBLIC_IP dev UNDERLAY proto 110` (DirectRouting).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope};
use rtnetlink::RouteMessageBuilder;

use super::{Netlink, NetlinkError};
use crate::overlay::{RouteSpec, Via};

/// The routing protocol number netd tags its routes with (`ip route show proto 110`), so that it
/// can tell its own routes from everyone else's after a restart and never touches the others.
pub const RTPROT_NETD: u8 = 110;
pub(super) const MAIN_TABLE: u8 = 254;

impl Netlink {
    /// Every IPv4 route (`ip -4 route show table all`); `op` names the caller's command in errors.
    pub(super) async fn routes_v4(&self, op: &str) -> Result<Vec<RouteMessage>, NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().build();
        self.handle.route().get(msg).execute().try_collect().await.map_err(NetlinkError::op(op))
    }

    /// `ip -4 route show table main proto 110`, keeping only routes through `overlay_index` or
    /// `underlay_index` (the only ones netd creates). A route without a gateway through the
    /// overlay device is the udp backend's `Via::Tun` route.
    pub async fn netd_routes(&self, overlay_index: u32, underlay_index: u32) -> Result<BTreeMap<Ipv4Net, RouteSpec>, NetlinkError> {
        let routes = self.routes_v4("ip -4 route show proto 110").await?;
        let mut out = BTreeMap::new();
        for r in routes {
            if r.header.table != MAIN_TABLE || r.header.protocol != RouteProtocol::Other(RTPROT_NETD) {
                continue;
            }
            let mut dst = None;
            let mut gw = None;
            let mut oif = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let (Some(dst), Some(oif)) = (dst, oif) else { continue };
            let Ok(net) = Ipv4Net::new(dst, r.header.destination_prefix_length) else { continue };
            let via = match gw {
                None if oif == overlay_index => Via::Tun,
                None => continue,
                Some(_) if oif == overlay_index => Via::Overlay,
                Some(_) if oif == underlay_index => Via::Underlay,
                Some(_) => continue,
            };
            let gw = gw.unwrap_or(Ipv4Addr::UNSPECIFIED);
            out.insert(net, RouteSpec { gateway: gw, via });
        }
        Ok(out)
    }

    /// `ip route flush proto 110`: removes every route netd created. Returns how many.
    pub async fn del_routes_by_proto(&self) -> Result<usize, NetlinkError> {
        let routes = self.routes_v4("ip -4 route show proto 110").await?;
        let mut n = 0;
        for r in routes.into_iter().filter(|r| r.header.protocol == RouteProtocol::Other(RTPROT_NETD)) {
            match self.handle.route().del(r).execute().await.map_err(NetlinkError::op("ip route flush proto 110")) {
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
                Ok(()) => n += 1,
            }
        }
        Ok(n)
    }

    /// `ip route replace NET via GW dev INDEX [onlink] proto 110`, or without a gateway
    /// (`GW` unspecified) `ip route replace NET dev INDEX scope link proto 110`.
    pub async fn set_route(&self, net: Ipv4Net, gw: Ipv4Addr, index: u32, onlink: bool) -> Result<(), NetlinkError> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .output_interface(index)
            .protocol(RouteProtocol::Other(RTPROT_NETD));
        b = if gw.is_unspecified() { b.scope(RouteScope::Link) } else { b.gateway(gw).scope(RouteScope::Universe) };
        if onlink {
            b = b.onlink();
        }
        let o = if onlink { " onlink" } else { "" };
        self.handle
            .route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .map_err(NetlinkError::op(format!("ip route replace {net} via {gw} dev index {index}{o} proto {RTPROT_NETD}")))
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
