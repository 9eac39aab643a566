//! `ip -4 addr show dev INDEX` over rtnetlink.

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};

/// The link's IPv4 addresses with their prefix lengths, each once. The caller names the
/// operation in its own error type.
pub async fn addrs_v4(
    handle: &rtnetlink::Handle,
    index: u32,
) -> Result<Vec<Ipv4Net>, rtnetlink::Error> {
    let msgs: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await?;
    let mut out = Vec::new();
    for m in msgs {
        let local = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) => {
                Some(*ip)
            }
            _ => None,
        });
        if let Some(Ok(net)) = local.map(|ip| Ipv4Net::new(ip, m.header.prefix_len)) {
            if !out.contains(&net) {
                out.push(net);
            }
        }
    }
    Ok(out)
}
