//! The thin shell between desired state and the kernel: rtnetlink calls, one file per object
//! kind, each saying its `ip` equivalent. No decisions are made here; `overlay` decides.

mod addr;
mod fdb;
mod link;
mod neigh;
mod route;

pub use link::{vxlan_matches, LinkInfo, VxlanSpec};
pub use route::RTPROT_NETD;

use rtnetlink::Handle;

/// A netlink failure, naming the operation (as its `ip` command) and the object.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("`{op}`: {source}")]
    Op { op: String, source: rtnetlink::Error },
    #[error("{0}")]
    Other(String),
}

impl NetlinkError {
    fn op(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
        let op = op.into();
        move |source| NetlinkError::Op { op, source }
    }

    /// Whether the kernel said "no such object" (ENOENT / ESRCH / ENODEV).
    pub fn is_not_found(&self) -> bool {
        matches!(self, NetlinkError::Op { source: rtnetlink::Error::NetlinkError(e), .. }
            if matches!(e.raw_code().abs(), libc::ENOENT | libc::ESRCH | libc::ENODEV))
    }

    /// Whether the kernel said "already exists" (EEXIST).
    pub fn is_exists(&self) -> bool {
        matches!(self, NetlinkError::Op { source: rtnetlink::Error::NetlinkError(e), .. }
            if e.raw_code().abs() == libc::EEXIST)
    }
}

/// A route-netlink connection in the current network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens the socket and spawns its driver task on the current tokio runtime.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// The interface of the IPv4 default route (`ip route show default`), lowest metric first.
    pub async fn default_route_link(&self) -> Result<Option<u32>, NetlinkError> {
        use netlink_packet_route::route::RouteAttribute;
        let routes = self.routes_v4("ip route show default").await?;
        let mut best: Option<(u32, u32)> = None;
        for r in routes {
            if r.header.destination_prefix_length != 0 || r.header.table != route::MAIN_TABLE {
                continue;
            }
            let oif = r.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None });
            let prio = r.attributes.iter().find_map(|a| if let RouteAttribute::Priority(p) = a { Some(*p) } else { None });
            if let Some(oif) = oif {
                let prio = prio.unwrap_or(0);
                if best.is_none_or(|(p, _)| prio < p) {
                    best = Some((prio, oif));
                }
            }
        }
        Ok(best.map(|(_, oif)| oif))
    }
}
