//! Permanent FDB entries on the VXLAN device: `bridge fdb replace MAC dev DEV dst IP self permanent`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use futures::TryStreamExt;
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState};
use netlink_packet_route::AddressFamily;

use super::{Netlink, NetlinkError};
use crate::lease::Mac;

impl Netlink {
    /// `bridge fdb show dev INDEX`, the permanent unicast entries with an IPv4 destination.
    pub async fn fdb_entries(&self, index: u32) -> Result<BTreeMap<Mac, Ipv4Addr>, NetlinkError> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::op("bridge fdb show"))?;
        let mut out = BTreeMap::new();
        for m in msgs {
            // `bridge fdb add ... permanent` (an operator's, or a fixture's) also sets NUD_NOARP:
            // permanent is the bit, not the whole state.
            if m.header.ifindex != index || u16::from(m.header.state) & u16::from(NeighbourState::Permanent) == 0 {
                continue;
            }
            let mut dst = None;
            let mut mac = None;
            for a in m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(i)) => dst = Some(i),
                    // For AF_BRIDGE dumps the parser cannot know the destination's family and
                    // hands back raw bytes.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                        dst = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
                    }
                    NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                        mac = Some(Mac([l[0], l[1], l[2], l[3], l[4], l[5]]))
                    }
                    _ => {}
                }
            }
            // The all-zero MAC would be a default (flood) entry; netd never creates one.
            if let (Some(dst), Some(mac)) = (dst, mac) {
                if mac.0 != [0; 6] {
                    out.insert(mac, dst);
                }
            }
        }
        Ok(out)
    }

    /// `bridge fdb replace MAC dev INDEX dst IP self permanent`.
    pub async fn set_fdb(&self, index: u32, mac: Mac, dst: Ipv4Addr) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac.0)
            .destination(std::net::IpAddr::V4(dst))
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(NetlinkError::op(format!("bridge fdb replace {mac} dev index {index} dst {dst} self permanent")))
    }

    /// `bridge fdb del MAC dev INDEX dst IP self` (absent is fine).
    pub async fn del_fdb(&self, index: u32, mac: Mac, dst: Ipv4Addr) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        msg.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
        match self.handle.neighbours().del(msg).execute().await.map_err(NetlinkError::op(format!("bridge fdb del {mac} dev index {index} dst {dst}"))) {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        }
    }
}
