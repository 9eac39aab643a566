//! The kernel side: rtnetlink calls (each documented with its `ip`
//! equivalent) on a connection in the node's namespace or in a pod's.
//!
//! A netlink socket acts in the namespace it was created in. To talk to a
//! pod's namespace, [`Nl::in_netns`] creates the socket on a short-lived
//! thread that first `setns`es into the pod namespace; the connection is
//! then driven by the caller's runtime like any other. The calling thread
//! never changes namespace.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, RawFd};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoVeth, LinkAttribute, LinkFlags, LinkInfo,
    LinkMessage,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("opening a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("entering network namespace: {0}")]
    Setns(std::io::Error),
    #[error("`{op}`: {source}")]
    Op {
        op: String,
        source: rtnetlink::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl NetError {
    fn op(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
        let op = op.into();
        move |source| NetError::Op { op, source }
    }

    /// The kernel's errno, for an operation the kernel refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetError::Op {
                source: rtnetlink::Error::NetlinkError(e),
                ..
            } => Some(e.raw_code().abs()),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENODEV | libc::ENOENT | libc::ESRCH)
        )
    }

    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What we read back about a link.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<String>,
    pub mtu: u32,
    pub up: bool,
    pub kind: Option<String>,
    /// Index of the bridge (or other controller) it is enslaved to.
    pub controller: Option<u32>,
    /// Bridge port hairpin mode, for a bridge port.
    pub hairpin: Option<bool>,
}

fn parse_link(msg: LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        up: msg.header.flags.contains(LinkFlags::Up),
        ..Default::default()
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Mtu(m) => link.mtu = m,
            LinkAttribute::Address(a) => link.mac = Some(fmt_mac(&a)),
            LinkAttribute::Controller(c) => link.controller = Some(c),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => link.kind = Some(k.to_string()),
                        LinkInfo::PortData(InfoPortData::BridgePort(port)) => {
                            for p in port {
                                if let InfoBridgePort::HairpinMode(h) = p {
                                    link.hairpin = Some(h);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

/// One end of a veth pair to create.
#[derive(Debug, Clone)]
pub struct VethEnd<'a> {
    pub name: &'a str,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// A route-netlink connection in one network namespace.
pub struct Nl {
    handle: Handle,
}

impl Nl {
    /// A connection in the current (node) namespace, driven by the current
    /// tokio runtime.
    pub fn current() -> Result<Nl, NetError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
        tokio::spawn(conn);
        Ok(Nl { handle })
    }

    /// A connection in the namespace `netns` (an open `/var/run/netns/X` or
    /// `/proc/PID/ns/net`), driven by the current tokio runtime.
    pub fn in_netns(netns: &File) -> Result<Nl, NetError> {
        let rt = tokio::runtime::Handle::current();
        let fd: RawFd = netns.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || -> Result<Nl, NetError> {
                // SAFETY: setns(2) takes plain integers; `fd` stays open for
                // the whole scope because the caller's `File` is borrowed for
                // it. Only this thread, which exits right after creating the
                // socket, changes namespace.
                let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(NetError::Setns(std::io::Error::last_os_error()));
                }
                // The socket is registered with the caller's runtime, which
                // drives it from the caller's thread from now on.
                let _guard = rt.enter();
                let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
                rt.spawn(conn);
                Ok(Nl { handle })
            })
            .join()
            .unwrap_or_else(|_| Err(NetError::Other("netns thread panicked".into())))
        })
    }

    /// `ip link show NAME`; `None` if there is none.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, NetError> {
        let res: Result<Vec<LinkMessage>, _> = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_collect()
            .await;
        match res.map_err(NetError::op(format!("ip link show {name}"))) {
            Ok(msgs) => Ok(msgs.into_iter().next().map(parse_link)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `ip link add NAME type bridge` + `address MAC mtu MTU up`. An
    /// existing link of that name is left alone (EEXIST is success).
    pub async fn add_bridge(&self, name: &str, mac: [u8; 6], mtu: u32) -> Result<(), NetError> {
        let msg = LinkBridge::new(name)
            .address(mac.to_vec())
            .mtu(mtu)
            .up()
            .build();
        match self
            .handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(NetError::op(format!("ip link add {name} type bridge")))
        {
            Err(e) if e.is_exists() => Ok(()),
            other => other,
        }
    }

    /// `ip link set dev INDEX up`.
    pub async fn set_up(&self, index: u32) -> Result<(), NetError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(NetError::op(format!("ip link set index {index} up")))
    }

    /// `ip link add HOST address M mtu N master BRIDGE up type veth peer name
    /// PEER address M mtu N netns NS` — one message: the pod end is born in
    /// the pod namespace. (It cannot be born up: the kernel opens the peer
    /// before the pair is linked and answers ENOTCONN.)
    pub async fn add_veth(
        &self,
        host: &VethEnd<'_>,
        peer: &VethEnd<'_>,
        peer_netns: &File,
        bridge_index: u32,
    ) -> Result<(), NetError> {
        let peer_msg = LinkUnspec::new_with_name(peer.name)
            .address(peer.mac.to_vec())
            .mtu(peer.mtu)
            .setns_by_fd(peer_netns.as_raw_fd())
            .build();
        let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host.name.to_string())
            .address(host.mac.to_vec())
            .mtu(host.mtu)
            .controller(bridge_index)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(NetError::op(format!(
                "ip link add {} master index {bridge_index} type veth peer name {} netns FD",
                host.name, peer.name
            )))
    }

    /// `ip link set dev INDEX type bridge_slave hairpin on`.
    pub async fn set_hairpin(&self, index: u32) -> Result<(), NetError> {
        self.handle
            .link()
            .set_port(LinkBridgePort::new(index).hairpin(true).build())
            .execute()
            .await
            .map_err(NetError::op(format!(
                "ip link set index {index} type bridge_slave hairpin on"
            )))
    }

    /// `ip link del NAME`; false if there was no such link.
    pub async fn del_link(&self, name: &str) -> Result<bool, NetError> {
        match self
            .handle
            .link()
            .del_with_message(LinkUnspec::new_with_name(name).build())
            .execute()
            .await
            .map_err(NetError::op(format!("ip link del {name}")))
        {
            Ok(()) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `ip addr add ADDR/LEN dev INDEX`; `exist_ok` makes EEXIST success.
    pub async fn add_addr(
        &self,
        index: u32,
        addr: Ipv4Net,
        exist_ok: bool,
    ) -> Result<(), NetError> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
            .execute()
            .await
            .map_err(NetError::op(format!(
                "ip addr add {addr} dev index {index}"
            ))) {
            Err(e) if exist_ok && e.is_exists() => Ok(()),
            other => other,
        }
    }

    /// `ip -4 addr show dev INDEX`.
    pub async fn addrs_v4(&self, index: u32) -> Result<Vec<Ipv4Net>, NetError> {
        netd_common::addr::addrs_v4(&self.handle, index)
            .await
            .map_err(NetError::op(format!("ip -4 addr show dev index {index}")))
    }

    /// `ip route add default via GW dev INDEX`.
    pub async fn add_default_route(&self, index: u32, gw: Ipv4Addr) -> Result<(), NetError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gw)
            .output_interface(index)
            .build();
        self.handle
            .route()
            .add(msg)
            .execute()
            .await
            .map_err(NetError::op(format!(
                "ip route add default via {gw} dev index {index}"
            )))
    }

    /// `ip -4 route show table main`: (destination, gateway, output index).
    pub async fn routes_v4(
        &self,
    ) -> Result<Vec<(Ipv4Net, Option<Ipv4Addr>, Option<u32>)>, NetError> {
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(NetError::op("ip -4 route show"))?;
        let mut out = Vec::new();
        for r in msgs {
            let mut dst = Ipv4Addr::UNSPECIFIED;
            let mut gw = None;
            let mut oif = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if let Ok(net) = Ipv4Net::new(dst, r.header.destination_prefix_length) {
                out.push((net, gw, oif));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_format() {
        assert_eq!(fmt_mac(&[0x0a, 0x58, 0, 0xff, 7, 1]), "0a:58:00:ff:07:01");
    }
}
