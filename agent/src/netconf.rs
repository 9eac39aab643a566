//! The network configuration at `<prefix>/config`: flannel's JSON, flannel's defaults, flannel's
//! validation (pkg/subnet/config.go), so that an existing flannel etcd network can be taken over
//! as it is. Pure: parsing and validation never touch etcd.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Deserialize;

/// Why a network configuration was refused. Each variant names the field at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("network config is not valid JSON: {0}")]
    Json(String),
    #[error("network config field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}

fn field(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field { field, reason: reason.into() }
}

/// The `Backend` object. Field names match flannel's case-insensitively (Go's JSON decoder does),
/// so we accept both `VNI` and `vni`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub kind: BackendKind,
    /// VXLAN network identifier (vxlan only).
    pub vni: u32,
    /// UDP port: vxlan 8472, udp 8285 by default.
    pub port: u16,
    /// Route straight to peers on the same L2 segment instead of encapsulating (vxlan only).
    pub direct_routing: bool,
    /// Underlay MTU override; the overlay MTU is this minus the encapsulation overhead.
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Vxlan,
    Udp,
}

impl BackendKind {
    /// The name written into leases' `BackendType`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Vxlan => "vxlan",
            BackendKind::Udp => "udp",
        }
    }

    /// Bytes of outer headers per packet: Ethernet+IP+UDP+VXLAN for vxlan, IP+UDP for udp.
    pub fn encap_overhead(self) -> u32 {
        match self {
            BackendKind::Vxlan => 50,
            BackendKind::Udp => 28,
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            BackendKind::Vxlan => 8472,
            BackendKind::Udp => 8285,
        }
    }
}

/// A validated network configuration with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub network: Ipv4Net,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub backend: BackendConfig,
}

impl NetworkConfig {
    /// Parses and validates `<prefix>/config` the way flanneld does, with errors naming the field.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        let obj = raw
            .as_object()
            .ok_or_else(|| ConfigError::Json("expected a JSON object".into()))?;
        let get = |name: &str| {
            obj.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        };

        if let Some(v) = get("EnableIPv6") {
            if v.as_bool() == Some(true) {
                return Err(field("EnableIPv6", "IPv6 pod networks are not supported yet"));
            }
        }
        if let Some(v) = get("EnableIPv4") {
            if v.as_bool() == Some(false) {
                return Err(field("EnableIPv4", "netd needs an IPv4 pod network"));
            }
        }

        let network: Ipv4Net = match get("Network") {
            None | Some(serde_json::Value::Null) => {
                return Err(field("Network", "missing: define the cluster's pod network, e.g. \"10.244.0.0/16\""))
            }
            Some(v) => parse_net(v).map_err(|r| field("Network", r))?,
        };

        let subnet_len = match get("SubnetLen") {
            None | Some(serde_json::Value::Null) => 0,
            Some(v) => v
                .as_u64()
                .filter(|n| *n <= 32)
                .ok_or_else(|| field("SubnetLen", format!("expected a prefix length 0-32, got {v}")))?
                as u8,
        };
        let subnet_len = if subnet_len > 0 {
            if subnet_len > 30 {
                return Err(field("SubnetLen", format!("/{subnet_len} must be less than /31")));
            }
            if subnet_len < network.prefix_len() + 2 {
                return Err(field(
                    "SubnetLen",
                    format!("/{subnet_len}: network {network} must be able to accommodate at least four subnets"),
                ));
            }
            subnet_len
        } else if network.prefix_len() > 28 {
            return Err(field("Network", format!("{network} is too small: the minimum useful prefix is /28")));
        } else if network.prefix_len() <= 22 {
            24
        } else {
            network.prefix_len() + 2
        };

        let size = 1u32 << (32 - subnet_len);
        let net_start = u32::from(network.network());
        let mask = u32::MAX << (32 - subnet_len);
        let subnet_min = match get("SubnetMin") {
            None | Some(serde_json::Value::Null) => Ipv4Addr::from(net_start + size),
            Some(v) => bound(v, "SubnetMin", &network, mask)?,
        };
        let subnet_max = match get("SubnetMax") {
            None | Some(serde_json::Value::Null) => {
                Ipv4Addr::from(net_start.wrapping_add(network.hosts_len_u32()).wrapping_sub(size))
            }
            Some(v) => bound(v, "SubnetMax", &network, mask)?,
        };
        if subnet_min > subnet_max {
            return Err(field("SubnetMin", format!("{subnet_min} is above SubnetMax {subnet_max}")));
        }

        let backend = parse_backend(get("Backend"))?;
        Ok(NetworkConfig { network, subnet_len, subnet_min, subnet_max, backend })
    }

    /// Whether `subnet` could be handed out under this configuration (flannel's
    /// "compatible lease" test: inside SubnetMin..=SubnetMax and of the configured length).
    pub fn allows(&self, subnet: &Ipv4Net) -> bool {
        subnet.prefix_len() == self.subnet_len
            && subnet.network() >= self.subnet_min
            && subnet.network() <= self.subnet_max
    }

    /// Every subnet that may be leased, in address order.
    pub fn candidate_subnets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        let step = 1u64 << (32 - self.subnet_len);
        let (lo, hi) = (u32::from(self.subnet_min) as u64, u32::from(self.subnet_max) as u64);
        (lo..=hi)
            .step_by(step as usize)
            .map(move |a| Ipv4Net::new(Ipv4Addr::from(a as u32), self.subnet_len).expect("valid prefix"))
    }
}

trait HostsLen {
    fn hosts_len_u32(&self) -> u32;
}
impl HostsLen for Ipv4Net {
    /// Number of addresses in the network (wrapping to 0 for /0, which validation rejects anyway).
    fn hosts_len_u32(&self) -> u32 {
        (1u64 << (32 - self.prefix_len())) as u32
    }
}

fn parse_net(v: &serde_json::Value) -> Result<Ipv4Net, String> {
    let s = v.as_str().ok_or_else(|| format!("expected a CIDR string, got {v}"))?;
    let net: Ipv4Net = s.parse().map_err(|_| format!("{s:?} is not an IPv4 CIDR"))?;
    // Go's net.ParseCIDR masks host bits off; do the same so "10.244.1.7/16" means 10.244.0.0/16.
    Ok(net.trunc())
}

fn bound(v: &serde_json::Value, name: &'static str, network: &Ipv4Net, mask: u32) -> Result<Ipv4Addr, ConfigError> {
    let s = v.as_str().ok_or_else(|| field(name, format!("expected an IPv4 address string, got {v}")))?;
    let ip: Ipv4Addr = s.parse().map_err(|_| field(name, format!("{s:?} is not an IPv4 address")))?;
    if !network.contains(&ip) {
        return Err(field(name, format!("{ip} is not in the range of the Network {network}")));
    }
    if u32::from(ip) & mask != u32::from(ip) {
        return Err(field(name, format!("{ip} is not on a SubnetLen boundary")));
    }
    Ok(ip)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    #[serde(alias = "type", alias = "TYPE")]
    #[serde(rename = "Type")]
    kind: Option<String>,
    #[serde(rename = "VNI", alias = "vni", alias = "Vni")]
    vni: Option<u32>,
    #[serde(rename = "Port", alias = "port")]
    port: Option<u16>,
    #[serde(rename = "DirectRouting", alias = "directRouting", alias = "directrouting")]
    direct_routing: Option<bool>,
    #[serde(rename = "MTU", alias = "mtu", alias = "Mtu")]
    mtu: Option<u32>,
    // Accepted for flannel compatibility; netd's behaviour for these is fixed.
    #[serde(rename = "Learning", alias = "learning")]
    learning: Option<bool>,
    #[serde(rename = "GBP", alias = "gbp")]
    gbp: Option<bool>,
    #[serde(rename = "MacPrefix", alias = "macPrefix")]
    _mac_prefix: Option<String>,
}

fn parse_backend(v: Option<&serde_json::Value>) -> Result<BackendConfig, ConfigError> {
    // flannel: no Backend at all means the udp backend; a Backend without Type is an error.
    let raw = match v {
        None | Some(serde_json::Value::Null) => RawBackend {
            kind: Some("udp".into()),
            vni: None,
            port: None,
            direct_routing: None,
            mtu: None,
            learning: None,
            gbp: None,
            _mac_prefix: None,
        },
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| field("Backend", e.to_string()))?,
    };
    let kind = match raw.kind.as_deref().map(str::to_ascii_lowercase).as_deref() {
        Some("vxlan") => BackendKind::Vxlan,
        Some("udp") => BackendKind::Udp,
        Some("") | None => return Err(field("Backend.Type", "missing: set \"vxlan\" or \"udp\"")),
        Some(other) => {
            return Err(field("Backend.Type", format!("{other:?} is not supported (netd has \"vxlan\" and \"udp\")")))
        }
    };
    if raw.learning == Some(true) {
        return Err(field("Backend.Learning", "netd programs the FDB itself and keeps learning off"));
    }
    if raw.gbp == Some(true) {
        return Err(field("Backend.GBP", "group-based policy is not supported"));
    }
    let vni = raw.vni.unwrap_or(1);
    if kind == BackendKind::Vxlan && (vni == 0 || vni > 0xff_ffff) {
        return Err(field("Backend.VNI", format!("{vni} is outside 1-16777215")));
    }
    let port = match raw.port {
        None | Some(0) => kind.default_port(),
        Some(p) => p,
    };
    if let Some(mtu) = raw.mtu {
        if !(576 + kind.encap_overhead()..=65535).contains(&mtu) {
            return Err(field("Backend.MTU", format!("{mtu} is outside {}-65535", 576 + kind.encap_overhead())));
        }
    }
    Ok(BackendConfig { kind, vni, port, direct_routing: raw.direct_routing.unwrap_or(false), mtu: raw.mtu })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        NetworkConfig::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn flannel_defaults_for_a_16() {
        let c = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, "10.244.1.0".parse::<Ipv4Addr>().unwrap());
        assert_eq!(c.subnet_max, "10.244.255.0".parse::<Ipv4Addr>().unwrap());
        assert_eq!(c.backend, BackendConfig { kind: BackendKind::Vxlan, vni: 1, port: 8472, direct_routing: false, mtu: None });
        assert_eq!(c.candidate_subnets().count(), 255);
    }

    #[test]
    fn small_networks_get_prefix_plus_two() {
        let c = NetworkConfig::parse(r#"{"Network":"10.244.0.0/26","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.subnet_len, 28);
        assert_eq!(c.candidate_subnets().map(|n| n.to_string()).collect::<Vec<_>>(),
                   ["10.244.0.16/28", "10.244.0.32/28", "10.244.0.48/28"]);
        assert!(err(r#"{"Network":"10.244.0.0/29"}"#).contains("too small"));
    }

    #[test]
    fn case_insensitive_fields_and_host_bits_masked() {
        let c = NetworkConfig::parse(r#"{"network":"10.244.3.4/16","backend":{"type":"VXLAN","vni":7,"port":4789,"directRouting":true}}"#).unwrap();
        assert_eq!(c.network.to_string(), "10.244.0.0/16");
        assert_eq!((c.backend.vni, c.backend.port, c.backend.direct_routing), (7, 4789, true));
    }

    #[test]
    fn missing_backend_means_udp_like_flannel() {
        let c = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        assert_eq!(c.backend.kind, BackendKind::Udp);
        assert_eq!(c.backend.port, 8285);
    }

    #[test]
    fn errors_name_the_field() {
        assert!(err("{").contains("not valid JSON"));
        assert!(err(r#"{"Backend":{"Type":"vxlan"}}"#).contains("`Network`"));
        assert!(err(r#"{"Network":"10.244.0.0/33"}"#).contains("`Network`"));
        assert!(err(r#"{"Network":"fd00::/8"}"#).contains("`Network`"));
        assert!(err(r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#).contains("`SubnetLen`"));
        assert!(err(r#"{"Network":"10.244.0.0/16","SubnetLen":17}"#).contains("four subnets"));
        assert!(err(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.245.0.0"}"#).contains("`SubnetMin`"));
        assert!(err(r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.3.5"}"#).contains("boundary"));
        assert!(err(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.9.0","SubnetMax":"10.244.3.0"}"#).contains("above"));
        assert!(err(r#"{"Network":"10.244.0.0/16","Backend":{}}"#).contains("`Backend.Type`"));
        assert!(err(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#).contains("host-gw"));
        assert!(err(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":0}}"#).contains("`Backend.VNI`"));
        assert!(err(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Bogus":1}}"#).contains("Bogus"));
        assert!(err(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","MTU":100}}"#).contains("`Backend.MTU`"));
    }

    #[test]
    fn explicit_bounds_are_honoured() {
        let c = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.12.0","Backend":{"Type":"vxlan"}}"#,
        ).unwrap();
        assert_eq!(c.candidate_subnets().count(), 3);
        assert!(c.allows(&"10.244.11.0/24".parse().unwrap()));
        assert!(!c.allows(&"10.244.13.0/24".parse().unwrap()));
        assert!(!c.allows(&"10.244.11.0/25".parse().unwrap()));
    }
}
