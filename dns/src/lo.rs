//! The listen addresses on `lo`: added when absent (like node-local-dns does), so that pods can
//! reach 169.254.20.10 (and the cluster DNS IP, when the proxy leaves it untracked) on every node.
//! IPv4 addresses netd adds carry the label [`LO_LABEL`], so that `netd cleanup` removes exactly
//! those (a cluster DNS IP left on lo would black-hole the next cluster DNS) and never an address
//! the operator put there.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};

use crate::acl::local_addresses;
use crate::DnsError;

/// The label of the IPv4 addresses netd puts on lo (`ip addr show dev lo label lo:netd`). IPv6
/// addresses have no labels.
pub const LO_LABEL: &str = "lo:netd";

fn err(ip: IpAddr, what: impl std::fmt::Display) -> DnsError {
    DnsError::LoAddress { ip, reason: what.to_string() }
}

async fn lo_index(handle: &rtnetlink::Handle, ip: IpAddr) -> Result<u32, DnsError> {
    let links: Vec<_> = handle
        .link()
        .get()
        .match_name("lo")
        .execute()
        .try_collect()
        .await
        .map_err(|e| err(ip, format!("cannot find lo: {e}")))?;
    links.first().map(|l| l.header.index).ok_or_else(|| err(ip, "no lo device"))
}

fn connect(ip: IpAddr) -> Result<rtnetlink::Handle, DnsError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| err(ip, format!("netlink socket: {e}")))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// `ip addr add IP/32 dev lo label lo:netd` (/128 for IPv6) for each address not configured anywhere in this
/// network namespace. Returns the addresses it added. Needs a tokio runtime.
pub async fn ensure_on_lo(ips: &[IpAddr]) -> Result<Vec<IpAddr>, DnsError> {
    let present = local_addresses();
    let mut added = Vec::new();
    for &ip in ips {
        if ip.is_unspecified() || ip.is_loopback() || present.contains(&ip) || added.contains(&ip) {
            continue;
        }
        let handle = connect(ip)?;
        let index = lo_index(&handle, ip).await?;
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        let mut req = handle.address().add(index, ip, prefix);
        if ip.is_ipv4() {
            req.message_mut().attributes.push(AddressAttribute::Label(LO_LABEL.into()));
        }
        match req.execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::EEXIST => {}
            Err(e) => return Err(err(ip, format!("ip addr add {ip}/{prefix} dev lo: {e}"))),
        }
        added.push(ip);
    }
    Ok(added)
}

/// `ip addr del IP dev lo` for every address on lo labelled [`LO_LABEL`] (for `netd cleanup`).
/// Returns the addresses removed (with `dry_run`, the ones that would be, left in place).
pub async fn remove_ours_from_lo(dry_run: bool) -> Result<Vec<IpAddr>, DnsError> {
    let any = IpAddr::from([0, 0, 0, 0]);
    let handle = connect(any)?;
    let index = lo_index(&handle, any).await?;
    let msgs: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| err(any, format!("ip addr show dev lo: {e}")))?;
    let mut removed = Vec::new();
    for m in msgs {
        let ours = m.attributes.iter().any(|a| matches!(a, AddressAttribute::Label(l) if l == LO_LABEL));
        let ip = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        if let (true, Some(ip)) = (ours, ip) {
            if dry_run {
                removed.push(ip);
                continue;
            }
            handle.address().del(m).execute().await.map_err(|e| err(ip, format!("ip addr del {ip} dev lo: {e}")))?;
            removed.push(ip);
        }
    }
    Ok(removed)
}

/// [`ensure_on_lo`] from synchronous code, on a private runtime in a private thread (safe to
/// call from inside another runtime).
pub(crate) fn ensure_on_lo_blocking(ips: Vec<IpAddr>) -> Result<Vec<IpAddr>, DnsError> {
    let first = ips.first().copied().unwrap_or(IpAddr::from([0, 0, 0, 0]));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| err(first, format!("runtime: {e}")))?;
        rt.block_on(ensure_on_lo(&ips))
    })
    .join()
    .map_err(|_| err(first, "address thread panicked"))?
}
