//! Links: lookup, the VXLAN device, up/MTU/MAC.

use std::net::Ipv4Addr;

use futures::TryStreamExt;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage};
use rtnetlink::{LinkUnspec, LinkVxlan};

use super::{Netlink, NetlinkError};
use crate::lease::Mac;

/// What we read back about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Option<Mac>,
    pub up: bool,
    pub kind: Option<String>,
    /// For a vxlan link: its parameters, to compare against the wanted spec.
    pub vxlan: Option<VxlanSpec>,
}

/// The VXLAN device netd wants:
/// `ip link add NAME type vxlan id VNI local LOCAL dev DEV dstport PORT nolearning` + MAC and MTU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub vni: u32,
    pub local: Option<Ipv4Addr>,
    pub port: u16,
    pub underlay_index: Option<u32>,
    pub learning: bool,
}

fn parse_link(msg: LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        mtu: 0,
        mac: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        kind: None,
        vxlan: None,
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => info.name = n,
            LinkAttribute::Mtu(m) => info.mtu = m,
            LinkAttribute::Address(a) if a.len() == 6 => {
                info.mac = Some(Mac([a[0], a[1], a[2], a[3], a[4], a[5]]));
            }
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        NlLinkInfo::Kind(k) => info.kind = Some(k.to_string()),
                        NlLinkInfo::Data(InfoData::Vxlan(v)) => {
                            let mut s = VxlanSpec { vni: 0, local: None, port: 0, underlay_index: None, learning: true };
                            for x in v {
                                match x {
                                    InfoVxlan::Id(id) => s.vni = id,
                                    InfoVxlan::Local(ip) => s.local = Some(ip),
                                    InfoVxlan::Port(p) => s.port = p,
                                    InfoVxlan::Link(l) => s.underlay_index = Some(l),
                                    InfoVxlan::Learning(l) => s.learning = l,
                                    _ => {}
                                }
                            }
                            info.vxlan = Some(s);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    info
}

impl Netlink {
    /// `ip link show NAME`; `None` when there is no such link.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        let res: Result<Vec<_>, _> = self.handle.link().get().match_name(name.to_string()).execute().try_collect().await;
        match res {
            Ok(msgs) => Ok(msgs.into_iter().next().map(parse_link)),
            Err(e) => {
                let e = NetlinkError::Op { op: format!("ip link show {name}"), source: e };
                if e.is_not_found() { Ok(None) } else { Err(e) }
            }
        }
    }

    /// `ip link show`: every link.
    pub async fn links(&self) -> Result<Vec<LinkInfo>, NetlinkError> {
        let msgs: Vec<LinkMessage> = self.handle.link().get().execute().try_collect().await.map_err(NetlinkError::op("ip link show"))?;
        Ok(msgs.into_iter().map(parse_link).collect())
    }

    /// `ip link show` for one index.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<LinkInfo>, NetlinkError> {
        let res: Result<Vec<_>, _> = self.handle.link().get().match_index(index).execute().try_collect().await;
        match res {
            Ok(msgs) => Ok(msgs.into_iter().next().map(parse_link)),
            Err(e) => {
                let e = NetlinkError::Op { op: format!("ip link show index {index}"), source: e };
                if e.is_not_found() { Ok(None) } else { Err(e) }
            }
        }
    }

    /// `ip link add NAME type vxlan id VNI local LOCAL dev DEV dstport PORT nolearning`
    /// followed by `ip link set NAME address MAC mtu MTU up`.
    pub async fn add_vxlan(&self, name: &str, spec: &VxlanSpec, mac: Mac, mtu: u32) -> Result<(), NetlinkError> {
        let mut b = LinkVxlan::new(name, spec.vni).port(spec.port).learning(spec.learning);
        if let Some(local) = spec.local {
            b = b.local(local);
        }
        if let Some(dev) = spec.underlay_index {
            b = b.dev(dev);
        }
        let msg = b.address(mac.0.to_vec()).mtu(mtu).up().build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(NetlinkError::op(format!("ip link add {name} type vxlan id {} dstport {} nolearning", spec.vni, spec.port)))
    }

    /// `ip link set dev INDEX mtu MTU address MAC up`.
    pub async fn set_link(&self, index: u32, mtu: u32, mac: Option<Mac>) -> Result<(), NetlinkError> {
        let mut b = LinkUnspec::new_with_index(index).mtu(mtu).up();
        if let Some(mac) = mac {
            b = b.address(mac.0.to_vec());
        }
        self.handle
            .link()
            .set(b.build())
            .execute()
            .await
            .map_err(NetlinkError::op(format!("ip link set index {index} mtu {mtu} up")))
    }

    /// `ip link del INDEX`.
    pub async fn del_link(&self, index: u32, name: &str) -> Result<(), NetlinkError> {
        self.handle.link().del(index).execute().await.map_err(NetlinkError::op(format!("ip link del {name}")))
    }
}

/// Whether an existing vxlan link can be kept for `want` (so a restart adopts it instead of
/// recreating it, which would drop traffic).
pub fn vxlan_matches(have: &LinkInfo, want: &VxlanSpec) -> bool {
    have.kind.as_deref() == Some(InfoKind::Vxlan.to_string().as_str()) && have.vxlan.as_ref() == Some(want)
}

/// In `ip -d link` words, for logs: `vxlan id 1 local 198.18.0.10 dev 2 dstport 8472 nolearning`
/// (the underlay by index, as the kernel reports it).
impl std::fmt::Display for VxlanSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vxlan id {}", self.vni)?;
        if let Some(local) = self.local {
            write!(f, " local {local}")?;
        }
        if let Some(dev) = self.underlay_index {
            write!(f, " dev {dev}")?;
        }
        write!(f, " dstport {}{}", self.port, if self.learning { "" } else { " nolearning" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vxlan_spec_reads_as_ip_link_does() {
        let mut spec = VxlanSpec { vni: 1, local: Some(Ipv4Addr::new(198, 18, 0, 10)), port: 8472, underlay_index: Some(2), learning: false };
        assert_eq!(spec.to_string(), "vxlan id 1 local 198.18.0.10 dev 2 dstport 8472 nolearning");
        spec = VxlanSpec { vni: 7, local: None, port: 4789, underlay_index: None, learning: true };
        assert_eq!(spec.to_string(), "vxlan id 7 dstport 4789");
    }
}
