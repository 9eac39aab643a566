//! Addresses on a link.

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::address::AddressMessage;

use super::{Netlink, NetlinkError};

impl Netlink {
    /// `ip -4 addr show dev INDEX`: the link's IPv4 addresses with their prefix lengths.
    pub async fn addrs_v4(&self, index: u32) -> Result<Vec<Ipv4Net>, NetlinkError> {
        netd_common::addr::addrs_v4(&self.handle, index).await.map_err(NetlinkError::op(format!("ip -4 addr show dev index {index}")))
    }

    /// `ip addr add IP/LEN dev INDEX` (an existing identical address is fine).
    pub async fn add_addr(&self, index: u32, addr: Ipv4Net) -> Result<(), NetlinkError> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
            .execute()
            .await
            .map_err(NetlinkError::op(format!("ip addr add {addr} dev index {index}")))
        {
            Err(e) if e.is_exists() => Ok(()),
            other => other,
        }
    }

    /// `ip addr del IP/LEN dev INDEX`.
    pub async fn del_addr(&self, index: u32, addr: Ipv4Net) -> Result<(), NetlinkError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(IpAddr::V4(addr.addr()))
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::op(format!("ip addr show dev index {index}")))?;
        for m in msgs.into_iter().filter(|m| m.header.prefix_len == addr.prefix_len()) {
            self.handle
                .address()
                .del(m)
                .execute()
                .await
                .map_err(NetlinkError::op(format!("ip addr del {addr} dev index {index}")))?;
        }
        Ok(())
    }
}
