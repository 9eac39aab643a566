//! The ADD result: one model, rendered in the layout of the negotiated
//! version (1.x, or 0.3.x/0.4.0 with `ips[].version`), and parsed back from
//! either layout (`prevResult` for CHECK and for chaining).
//!
//! Addresses are kept as strings so that a `prevResult` from another plugin
//! (IPv6 included) passes through unchanged; unknown keys are kept too.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::CniError;
use crate::version::Version;

fn is_empty_map(m: &Map<String, Value>) -> bool {
    m.is_empty()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Only rendered for 1.1.0 and later (it appeared in 1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(flatten, skip_serializing_if = "is_empty_map")]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// CIDR, e.g. `10.244.7.5/24`.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    #[serde(flatten, skip_serializing_if = "is_empty_map")]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
    #[serde(flatten, skip_serializing_if = "is_empty_map")]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Dns {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

impl CniResult {
    /// Renders the result for `version`.
    pub fn render(&self, version: Version) -> Value {
        let mut out = Map::new();
        out.insert("cniVersion".into(), Value::String(version.to_string()));
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut i = i.clone();
                if version < Version(1, 1, 0) {
                    i.mtu = None;
                }
                to_value(&i)
            })
            .collect();
        if !interfaces.is_empty() {
            out.insert("interfaces".into(), Value::Array(interfaces));
        }
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut v = to_value(ip);
                if version.is_legacy() {
                    let family = if ip.address.contains(':') { "6" } else { "4" };
                    if let Value::Object(m) = &mut v {
                        m.insert("version".into(), Value::String(family.into()));
                    }
                }
                v
            })
            .collect();
        if !ips.is_empty() {
            out.insert("ips".into(), Value::Array(ips));
        }
        if !self.routes.is_empty() {
            out.insert(
                "routes".into(),
                Value::Array(self.routes.iter().map(to_value).collect()),
            );
        }
        if !self.dns.is_empty() {
            out.insert("dns".into(), to_value(&self.dns));
        }
        Value::Object(out)
    }

    /// Parses a result in any supported layout (`ips[].version` is dropped:
    /// it is derived from the address when rendering).
    pub fn parse(v: &Value) -> Result<CniResult, CniError> {
        let bad = |e: String| CniError::InvalidConfig(format!("field \"prevResult\": {e}"));
        let obj = v
            .as_object()
            .ok_or_else(|| bad("expected an object".into()))?;
        if obj.contains_key("ip4") || obj.contains_key("ip6") {
            return Err(bad(
                "the 0.1.0/0.2.0 result layout (ip4/ip6) is not supported".into(),
            ));
        }
        let mut r = CniResult::deserialize(v).map_err(|e| bad(e.to_string()))?;
        for ip in &mut r.ips {
            ip.extra.remove("version");
        }
        Ok(r)
    }

    /// `prev` followed by `ours` (a plugin later in a chain must pass the
    /// previous result through): interfaces and IPs are appended with our
    /// interface indices shifted; our DNS wins when we have any.
    pub fn merged_after(self, prev: CniResult) -> CniResult {
        let shift = prev.interfaces.len();
        let mut out = prev;
        out.interfaces.extend(self.interfaces);
        out.ips.extend(self.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + shift);
            ip
        }));
        out.routes.extend(self.routes);
        if !self.dns.is_empty() {
            out.dns = self.dns;
        }
        out
    }
}

fn to_value<T: Serialize>(t: &T) -> Value {
    // Our types are plain strings, numbers and maps: serialization cannot fail.
    serde_json::to_value(t).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "netd0".into(),
                    mac: Some("0a:58:0a:f4:07:01".into()),
                    mtu: Some(1450),
                    ..Default::default()
                },
                Interface {
                    name: "veth0123456789a".into(),
                    mac: Some("02:11:22:33:44:55".into()),
                    mtu: Some(1450),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("0a:58:0a:f4:07:05".into()),
                    mtu: Some(1450),
                    sandbox: Some("/var/run/netns/p".into()),
                    ..Default::default()
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.7.5/24".into(),
                gateway: Some("10.244.7.1".into()),
                interface: Some(2),
                ..Default::default()
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".into(),
                gw: Some("10.244.7.1".into()),
                ..Default::default()
            }],
            dns: Dns {
                nameservers: vec!["10.96.0.10".into()],
                search: vec!["svc.cluster.local".into()],
                ..Default::default()
            },
        }
    }

    #[test]
    fn renders_1_1_0() {
        let v = sample().render(Version(1, 1, 0));
        assert_eq!(
            v,
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [
                    {"name": "netd0", "mac": "0a:58:0a:f4:07:01", "mtu": 1450},
                    {"name": "veth0123456789a", "mac": "02:11:22:33:44:55", "mtu": 1450},
                    {"name": "eth0", "mac": "0a:58:0a:f4:07:05", "mtu": 1450, "sandbox": "/var/run/netns/p"}
                ],
                "ips": [{"address": "10.244.7.5/24", "gateway": "10.244.7.1", "interface": 2}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.7.1"}],
                "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}
            })
        );
    }

    #[test]
    fn renders_1_0_0_without_mtu() {
        let v = sample().render(Version(1, 0, 0));
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(v["interfaces"][2].get("mtu").is_none());
        assert!(v["ips"][0].get("version").is_none());
    }

    #[test]
    fn renders_legacy_with_ip_version() {
        for ver in [Version(0, 3, 0), Version(0, 3, 1), Version(0, 4, 0)] {
            let v = sample().render(ver);
            assert_eq!(v["cniVersion"], ver.to_string());
            assert_eq!(
                v["ips"][0],
                json!({"version": "4", "address": "10.244.7.5/24", "gateway": "10.244.7.1", "interface": 2})
            );
            assert!(v["interfaces"][0].get("mtu").is_none());
        }
    }

    #[test]
    fn parses_both_layouts_back() {
        for ver in [Version(0, 3, 1), Version(0, 4, 0), Version(1, 0, 0)] {
            let mut expected = sample();
            for i in &mut expected.interfaces {
                i.mtu = None;
            }
            assert_eq!(CniResult::parse(&sample().render(ver)).unwrap(), expected);
        }
        assert_eq!(
            CniResult::parse(&sample().render(Version(1, 1, 0))).unwrap(),
            sample()
        );
    }

    #[test]
    fn ipv6_and_unknown_keys_pass_through() {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/x", "pciID": "0000:00:01.0"}],
            "ips": [{"address": "fd00::5/64", "interface": 0}],
            "routes": [{"dst": "::/0", "priority": 10}]
        });
        let r = CniResult::parse(&prev).unwrap();
        let legacy = r.render(Version(0, 4, 0));
        assert_eq!(legacy["ips"][0]["version"], "6");
        assert_eq!(legacy["interfaces"][0]["pciID"], "0000:00:01.0");
        assert_eq!(legacy["routes"][0]["priority"], 10);
    }

    #[test]
    fn rejects_ancient_and_malformed() {
        let e = CniResult::parse(&json!({"cniVersion":"0.2.0","ip4":{"ip":"10.0.0.2/24"}}))
            .unwrap_err();
        assert_eq!(e.code(), 7);
        let e = CniResult::parse(&json!({"ips":[{"address":5}]})).unwrap_err();
        assert_eq!(e.code(), 7);
        assert!(e.to_string().contains("prevResult"), "{e}");
    }

    #[test]
    fn merge_shifts_interface_indices() {
        let prev = CniResult {
            interfaces: vec![Interface {
                name: "lo".into(),
                sandbox: Some("/x".into()),
                ..Default::default()
            }],
            ips: vec![IpConfig {
                address: "127.0.0.1/8".into(),
                interface: Some(0),
                ..Default::default()
            }],
            dns: Dns {
                domain: Some("prev".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let merged = sample().merged_after(prev);
        assert_eq!(merged.interfaces.len(), 4);
        assert_eq!(merged.ips[0].interface, Some(0));
        assert_eq!(merged.ips[1].interface, Some(3));
        assert_eq!(merged.interfaces[3].name, "eth0");
        assert_eq!(merged.dns.nameservers, vec!["10.96.0.10"]);
        let merged = CniResult::default().merged_after(sample());
        assert_eq!(merged, sample());
    }
}
