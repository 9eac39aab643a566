//! Subnet leases as flannel stores them in etcd: the key `<prefix>/subnets/10.244.1.0-24` and the
//! JSON value `{"PublicIP":..,"PublicIPv6":null,"BackendType":"vxlan","BackendData":{..}}`.
//! Pure: encoding and decoding only.

use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error("subnet key {key:?}: {reason}")]
    Key { key: String, reason: String },
    /// `10.244.5.7-24`: a key that is not a subnet's canonical name. It still names a subnet
    /// (`subnet`, the address with its host bits cleared), which the caller may want to keep from
    /// being handed out.
    #[error("subnet key {key:?}: address has host bits set (the subnet would be {subnet})")]
    HostBits { key: String, subnet: Ipv4Net },
    #[error("lease value for {subnet}: {reason}")]
    Value { subnet: String, reason: String },
}

/// A MAC address, written the way flannel writes `VtepMAC` ("0e:6e:c6:12:00:0b").
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}
impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().ok_or_else(|| format!("{s:?} is not a MAC address"))?;
            if p.len() != 2 {
                return Err(format!("{s:?} is not a MAC address"));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        if parts.next().is_some() {
            return Err(format!("{s:?} is not a MAC address"));
        }
        Ok(Mac(out))
    }
}
impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Mac {
    /// A stable VTEP MAC for a node: locally administered, unicast, derived from the public IP and
    /// the VNI. Stable across restarts and device re-creation, so peers' FDB and neighbor entries
    /// stay right even when the device is lost; unique because public IPs are.
    pub fn for_vtep(public_ip: Ipv4Addr, vni: u32) -> Mac {
        let o = public_ip.octets();
        Mac([0x0e, (vni as u8) ^ 0x6e, o[0], o[1], o[2], o[3]])
    }
}

/// `BackendData` of a vxlan lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanData {
    #[serde(rename = "VNI")]
    pub vni: u32,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: Mac,
}

/// flannel's `LeaseAttrs`. `PublicIPv6` is always written (as null), the rest omitted when empty,
/// byte-for-byte what flanneld writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<std::net::Ipv6Addr>,
    #[serde(rename = "BackendType", default, skip_serializing_if = "String::is_empty")]
    pub backend_type: String,
    #[serde(rename = "BackendData", default, skip_serializing_if = "Option::is_none")]
    pub backend_data: Option<serde_json::Value>,
    #[serde(rename = "BackendV6Data", default, skip_serializing_if = "Option::is_none")]
    pub backend_v6_data: Option<serde_json::Value>,
}

/// `BackendData` key of a udp lease: see [`LeaseAttrs::udp`].
pub const UDP_SUPER_PACKETS: &str = "NetdSuperPackets";

impl LeaseAttrs {
    pub fn vxlan(public_ip: Ipv4Addr, data: &VxlanData) -> Self {
        LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: Some(serde_json::to_value(data).expect("plain struct")),
            backend_v6_data: None,
        }
    }

    /// A udp-backend lease, as flanneld writes one, plus `BackendData`
    /// `{"NetdSuperPackets":true}` (flanneld's udp backend ignores `BackendData`): this node
    /// takes a datagram holding one TCP super-packet (up to 64 KiB, longer than the MTU),
    /// which is what a peer's kernel fast path sends when a virtual underlay (veth) hands
    /// UDP-tunnel GSO packets over unsegmented. Peers that do not say so (flanneld, older
    /// netd) get everything from the sender's userspace datapath: proper datagrams.
    pub fn udp(public_ip: Ipv4Addr) -> Self {
        let backend_data = Some(serde_json::json!({ UDP_SUPER_PACKETS: true }));
        LeaseAttrs { public_ip, public_ipv6: None, backend_type: "udp".into(), backend_data, backend_v6_data: None }
    }

    /// Whether the lease says its node takes TCP super-packets in one datagram (see [`Self::udp`]).
    pub fn udp_super_packets(&self) -> bool {
        self.backend_data.as_ref().and_then(|d| d.get(UDP_SUPER_PACKETS)).and_then(|v| v.as_bool()).unwrap_or(false)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain struct")
    }

    pub fn from_json(subnet: &Ipv4Net, text: &[u8]) -> Result<Self, LeaseError> {
        serde_json::from_slice(text).map_err(|e| LeaseError::Value { subnet: subnet.to_string(), reason: e.to_string() })
    }

    /// Whether this is a udp-backend lease: netd writes "udp", flanneld writes no BackendType.
    pub fn is_udp(&self) -> bool {
        self.backend_type == "udp" || self.backend_type.is_empty()
    }

    /// The peer's VXLAN data, if it is a vxlan lease with well-formed data.
    pub fn vxlan_data(&self) -> Option<Result<VxlanData, String>> {
        if self.backend_type != "vxlan" {
            return None;
        }
        Some(match &self.backend_data {
            None => Err("vxlan lease without BackendData".into()),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| format!("BackendData: {e}")),
        })
    }
}

/// One lease as read from the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Where it was read from (the etcd key, or `node/<name>` with Node-based subnets): what
    /// reports name, so an operator can find and fix it.
    pub key: String,
    pub subnet: Ipv4Net,
    pub attrs: LeaseAttrs,
    /// etcd lease ID the key is bound to; `None` for a reservation (a key without an etcd lease).
    pub etcd_lease: Option<i64>,
    /// etcd mod revision of the key, for optimistic concurrency.
    pub mod_revision: i64,
}

impl Lease {
    pub fn is_reservation(&self) -> bool {
        self.etcd_lease.is_none()
    }
}

/// `10.244.1.0/24` -> `10.244.1.0-24`.
pub fn subnet_key_name(subnet: &Ipv4Net) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix_len())
}

/// Parses the last path element of a lease key (`10.244.1.0-24`). A dual-stack key
/// (`10.244.1.0-24&fc00::-64`) yields its IPv4 part.
pub fn parse_subnet_key(key: &str) -> Result<Ipv4Net, LeaseError> {
    let name = key.rsplit('/').next().unwrap_or(key);
    let v4 = name.split('&').next().unwrap_or(name);
    let bad = |reason: &str| LeaseError::Key { key: key.to_string(), reason: reason.to_string() };
    let (ip, len) = v4.split_once('-').ok_or_else(|| bad("expected <ip>-<prefix length>"))?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad("not an IPv4 address before '-'"))?;
    let len: u8 = len.parse().map_err(|_| bad("not a prefix length after '-'"))?;
    let net = Ipv4Net::new(ip, len).map_err(|_| bad("prefix length above 32"))?;
    if net.network() != ip {
        return Err(LeaseError::HostBits { key: key.to_string(), subnet: net.trunc() });
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_exactly_what_flanneld_writes() {
        let attrs = LeaseAttrs::vxlan(
            "192.168.64.3".parse().unwrap(),
            &VxlanData { vni: 1, vtep_mac: "c6:d2:32:6f:8f:44".parse().unwrap() },
        );
        assert_eq!(
            attrs.to_json(),
            r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#
        );
    }

    #[test]
    fn reads_flannel_leases() {
        let net: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        let a = LeaseAttrs::from_json(&net, br#"{"PublicIP":"198.18.0.12","BackendType":"vxlan","BackendData":{"VtepMAC":"0e:6e:c6:12:00:0c","VNI":1}}"#).unwrap();
        assert_eq!(a.vxlan_data().unwrap().unwrap().vtep_mac, Mac([0x0e, 0x6e, 0xc6, 0x12, 0, 0x0c]));
        // A udp lease as flannel writes it: no backend type at all.
        let u = LeaseAttrs::from_json(&net, br#"{"PublicIP":"198.18.0.12","PublicIPv6":null}"#).unwrap();
        assert!(u.vxlan_data().is_none());
        assert!(LeaseAttrs::from_json(&net, b"{not json").unwrap_err().to_string().contains("10.244.3.0/24"));
        let bad_mac = LeaseAttrs::from_json(&net, br#"{"PublicIP":"198.18.0.12","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz"}}"#).unwrap();
        assert!(bad_mac.vxlan_data().unwrap().is_err());
    }

    #[test]
    fn subnet_keys() {
        let n = parse_subnet_key("/coreos.com/network/subnets/10.244.1.0-24").unwrap();
        assert_eq!(n.to_string(), "10.244.1.0/24");
        assert_eq!(subnet_key_name(&n), "10.244.1.0-24");
        assert_eq!(parse_subnet_key("x/10.244.2.0-24&fc00::-64").unwrap().to_string(), "10.244.2.0/24");
        for bad in ["x/garbage", "x/10.244.1.0", "x/10.244.1.5-24", "x/10.244.1.0-40", "x/a.b.c.d-24"] {
            assert!(parse_subnet_key(bad).is_err(), "{bad}");
        }
        // Host bits: refused, but the error names the subnet the key would stand for.
        assert_eq!(
            parse_subnet_key("x/10.244.5.7-24"),
            Err(LeaseError::HostBits { key: "x/10.244.5.7-24".into(), subnet: "10.244.5.0/24".parse().unwrap() })
        );
    }

    #[test]
    fn vtep_mac_is_stable_local_unicast() {
        let m = Mac::for_vtep("198.18.0.11".parse().unwrap(), 1);
        assert_eq!(m, Mac::for_vtep("198.18.0.11".parse().unwrap(), 1));
        assert_eq!(m.0[0] & 0x03, 0x02, "locally administered, unicast");
        assert_ne!(m, Mac::for_vtep("198.18.0.12".parse().unwrap(), 1));
    }
}
