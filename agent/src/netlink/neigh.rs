//! Permanent ARP entries on the VXLAN device: `ip neigh replace IP lladdr MAC dev DEV nud permanent`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState};
use netlink_packet_route::AddressFamily;

use super::{Netlink, NetlinkError};
use crate::lease::Mac;

impl Netlink {
    /// `ip -4 neigh show dev INDEX nud permanent`.
    pub async fn permanent_neighs(&self, index: u32) -> Result<BTreeMap<Ipv4Addr, Mac>, NetlinkError> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::op("ip -4 neigh show nud permanent"))?;
        let mut out = BTreeMap::new();
        for m in msgs {
            if m.header.ifindex != index || m.header.state != NeighbourState::Permanent {
                continue;
            }
            let mut ip = None;
            let mut mac = None;
            for a in m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(i)) => ip = Some(i),
                    NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                        mac = Some(Mac([l[0], l[1], l[2], l[3], l[4], l[5]]))
                    }
                    _ => {}
                }
            }
            if let (Some(ip), Some(mac)) = (ip, mac) {
                out.insert(ip, mac);
            }
        }
        Ok(out)
    }

    /// `ip neigh replace IP lladdr MAC dev INDEX nud permanent`.
    pub async fn set_neigh(&self, index: u32, ip: Ipv4Addr, mac: Mac) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(&mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(NetlinkError::op(format!("ip neigh replace {ip} lladdr {mac} dev index {index} nud permanent")))
    }

    /// `ip neigh del IP dev INDEX` (absent is fine).
    pub async fn del_neigh(&self, index: u32, ip: Ipv4Addr) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = index;
        msg.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        match self.handle.neighbours().del(msg).execute().await.map_err(NetlinkError::op(format!("ip neigh del {ip} dev index {index}"))) {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        }
    }
}
