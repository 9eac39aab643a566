//! The cluster's service ranges, kept once in etcd beside the registry (`<prefix>/config`), so
//! every `netd apply` allocates from the same ones and every node knows them (they are part of
//! the [`ServiceSnapshot`](crate::ServiceSnapshot)). `netd config set` changes them; the first
//! `netd apply` of an empty cluster seeds them from its flags (or the defaults). Pure: nothing
//! here talks to etcd.

use std::fmt;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// kube-apiserver's default `--service-cluster-ip-range` (kubeadm's `--service-cidr`).
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";
/// kube-apiserver's default `--service-node-port-range`.
pub const DEFAULT_NODE_PORTS: RangeInclusive<u16> = 30000..=32767;

/// The ranges ClusterIPs and nodePorts come from, named after kube-apiserver's flags
/// (`--service-cluster-ip-range`, `--service-node-port-range`). Stored as
/// `{"serviceClusterIPRange": "10.96.0.0/12", "serviceNodePortRange": "30000-32767"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub service_cluster_ip_range: Ipv4Net,
    pub service_node_port_range: RangeInclusive<u16>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    #[serde(rename = "serviceClusterIPRange")]
    service_cluster_ip_range: String,
    #[serde(rename = "serviceNodePortRange")]
    service_node_port_range: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig { service_cluster_ip_range: DEFAULT_SERVICE_CIDR.parse().expect("valid"), service_node_port_range: DEFAULT_NODE_PORTS }
    }
}

impl fmt::Display for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "serviceClusterIPRange {}, serviceNodePortRange {}", self.service_cluster_ip_range, ports(&self.service_node_port_range))
    }
}

fn ports(r: &RangeInclusive<u16>) -> String {
    format!("{}-{}", r.start(), r.end())
}

/// Parses `30000-32767`.
pub fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?} is not FIRST-LAST"))?;
    let (a, b): (u16, u16) = (a.trim().parse().map_err(|_| format!("{a:?} is not a port"))?, b.trim().parse().map_err(|_| format!("{b:?} is not a port"))?);
    if a == 0 || a > b {
        return Err(format!("{s:?} is not a valid port range"));
    }
    Ok(a..=b)
}

/// Parses and checks a service CIDR: an IPv4 network (no host bits), between /12 (the largest
/// kube-apiserver accepts) and /30 (two usable addresses: network and broadcast are reserved).
pub fn parse_service_cidr(s: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = s.trim().parse().map_err(|e| format!("{s:?} is not an IPv4 CIDR: {e}"))?;
    if net.trunc() != net {
        return Err(format!("{net} has host bits set (the network is {})", net.trunc()));
    }
    if net.prefix_len() < 12 {
        return Err(format!("{net} is too large: the mask must be /12 or longer"));
    }
    if net.prefix_len() > 30 {
        return Err(format!("{net} is too small: the network and broadcast addresses are reserved, so it must be /30 or shorter"));
    }
    Ok(net)
}

impl ClusterConfig {
    /// Reads the stored JSON, checking it as `netd config set` does.
    pub fn from_json(bytes: &[u8]) -> Result<ClusterConfig, String> {
        let s: Stored = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        Ok(ClusterConfig {
            service_cluster_ip_range: parse_service_cidr(&s.service_cluster_ip_range).map_err(|e| format!("serviceClusterIPRange: {e}"))?,
            service_node_port_range: parse_port_range(&s.service_node_port_range).map_err(|e| format!("serviceNodePortRange: {e}"))?,
        })
    }

    /// The checks `netd config set` makes (for configs not read through [`Self::from_json`]).
    pub fn check(&self) -> Result<(), String> {
        parse_service_cidr(&self.service_cluster_ip_range.to_string()).map_err(|e| format!("serviceClusterIPRange: {e}"))?;
        parse_port_range(&ports(&self.service_node_port_range)).map_err(|e| format!("serviceNodePortRange: {e}"))?;
        Ok(())
    }

    pub fn to_json(&self) -> String {
        let s = Stored { service_cluster_ip_range: self.service_cluster_ip_range.to_string(), service_node_port_range: ports(&self.service_node_port_range) };
        serde_json::to_string(&s).expect("serialisable")
    }

    /// As `netd config get` shows it.
    pub fn to_yaml(&self) -> String {
        format!("serviceClusterIPRange: {}\nserviceNodePortRange: {}\n", self.service_cluster_ip_range, ports(&self.service_node_port_range))
    }

    /// Whether `ip` may be a ClusterIP: in the range, and neither its network nor its broadcast
    /// address (Kubernetes reserves both).
    pub fn usable_cluster_ip(&self, ip: Ipv4Addr) -> bool {
        let net = &self.service_cluster_ip_range;
        net.contains(&ip) && ip != net.network() && ip != net.broadcast()
    }

    /// `provided IP is not in the valid range...`, the API server's words.
    pub fn ip_range_message(&self, ip: Ipv4Addr) -> String {
        format!("Invalid value: \"{ip}\": provided IP is not in the valid range. The range of valid IPs is {}", self.service_cluster_ip_range)
    }

    pub fn port_range_message(&self, port: u16) -> String {
        format!("Invalid value: {port}: provided port is not in the valid range. The range of valid ports is {}", ports(&self.service_node_port_range))
    }
}

/// The ranges a client asks for with `--service-cidr` and `--service-node-port-range`; `None`:
/// whatever the cluster has. They only seed an empty cluster: given to a cluster whose
/// config differs, they are an error (two operators with different flags would otherwise
/// allocate from different ranges).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllocOptions {
    pub service_cidr: Option<Ipv4Net>,
    pub node_ports: Option<RangeInclusive<u16>>,
}

impl AllocOptions {
    /// Both ranges given.
    pub fn ranges(service_cidr: Ipv4Net, node_ports: RangeInclusive<u16>) -> Self {
        AllocOptions { service_cidr: Some(service_cidr), node_ports: Some(node_ports) }
    }

    /// `base` with the given ranges in place of its own.
    pub fn over(&self, base: &ClusterConfig) -> ClusterConfig {
        ClusterConfig {
            service_cluster_ip_range: self.service_cidr.unwrap_or(base.service_cluster_ip_range),
            service_node_port_range: self.node_ports.clone().unwrap_or_else(|| base.service_node_port_range.clone()),
        }
    }

    /// The config an apply allocates from: the stored one, which every flag given must match;
    /// or, when nothing is stored, the flags over the defaults (`true`: to be written).
    pub fn resolve(&self, stored: Option<&ClusterConfig>) -> Result<(ClusterConfig, bool), ConfigMismatch> {
        let Some(stored) = stored else { return Ok((self.over(&ClusterConfig::default()), true)) };
        if let Some(cidr) = self.service_cidr.filter(|c| *c != stored.service_cluster_ip_range) {
            return Err(ConfigMismatch { flag: "--service-cidr", given: cidr.to_string(), field: "serviceClusterIPRange", stored: stored.service_cluster_ip_range.to_string() });
        }
        if let Some(p) = self.node_ports.as_ref().filter(|p| **p != stored.service_node_port_range) {
            return Err(ConfigMismatch { flag: "--service-node-port-range", given: ports(p), field: "serviceNodePortRange", stored: ports(&stored.service_node_port_range) });
        }
        Ok((stored.clone(), false))
    }
}

/// A flag of `netd apply` that disagrees with the cluster's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigMismatch {
    pub flag: &'static str,
    pub given: String,
    pub field: &'static str,
    pub stored: String,
}

impl fmt::Display for ConfigMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} disagrees with the cluster's {} {} (flags only seed an empty cluster: drop the flag, or change the cluster's ranges with `netd config set`)",
            self.flag, self.given, self.field, self.stored
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_form_round_trips_and_is_checked() {
        let c = ClusterConfig::default();
        assert_eq!(c.to_json(), r#"{"serviceClusterIPRange":"10.96.0.0/12","serviceNodePortRange":"30000-32767"}"#);
        assert_eq!(ClusterConfig::from_json(c.to_json().as_bytes()).unwrap(), c);
        let bad = ClusterConfig::from_json(br#"{"serviceClusterIPRange":"10.96.0.1/12","serviceNodePortRange":"30000-32767"}"#).unwrap_err();
        assert!(bad.contains("serviceClusterIPRange: 10.96.0.1/12 has host bits set (the network is 10.96.0.0/12)"), "{bad}");
        assert!(ClusterConfig::from_json(br#"{"serviceCIDR":"10.96.0.0/12"}"#).is_err());
        assert!(parse_service_cidr("10.0.0.0/8").unwrap_err().contains("too large"));
        assert!(parse_service_cidr("10.96.0.0/31").unwrap_err().contains("too small"));
        assert!(parse_port_range("5-1").is_err());
    }

    #[test]
    fn network_and_broadcast_addresses_are_not_cluster_ips() {
        let c = AllocOptions::ranges("10.96.0.0/30".parse().unwrap(), 30000..=30001).over(&ClusterConfig::default());
        let usable: Vec<u8> = (0..=4).filter(|i| c.usable_cluster_ip(Ipv4Addr::new(10, 96, 0, *i))).collect();
        assert_eq!(usable, vec![1, 2]);
    }

    #[test]
    fn flags_seed_an_empty_cluster_and_must_match_a_configured_one() {
        let flags = AllocOptions { service_cidr: Some("10.100.0.0/16".parse().unwrap()), node_ports: None };
        let (seeded, write) = flags.resolve(None).unwrap();
        assert!(write);
        assert_eq!((seeded.service_cluster_ip_range.to_string(), seeded.service_node_port_range.clone()), ("10.100.0.0/16".into(), 30000..=32767));
        assert_eq!(flags.resolve(Some(&seeded)).unwrap(), (seeded.clone(), false));
        assert_eq!(AllocOptions::default().resolve(Some(&seeded)).unwrap(), (seeded.clone(), false));
        let err = flags.resolve(Some(&ClusterConfig::default())).unwrap_err().to_string();
        assert!(err.starts_with("--service-cidr 10.100.0.0/16 disagrees with the cluster's serviceClusterIPRange 10.96.0.0/12"), "{err}");
        let err = AllocOptions { service_cidr: None, node_ports: Some(31000..=31010) }.resolve(Some(&seeded)).unwrap_err().to_string();
        assert!(err.starts_with("--service-node-port-range 31000-31010 disagrees with the cluster's serviceNodePortRange 30000-32767"), "{err}");
    }
}
