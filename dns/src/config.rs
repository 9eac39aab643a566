//! The `dns` section of netd's config file (`--dns-config FILE`, YAML): what the flags set,
//! for files kept in configuration management, and what flags cannot say well (per-zone
//! forwarding). Every key is checked: an unknown key, a wrong type or a bad value is an error
//! that names the file, the line and the column. A key set in the file wins over its flag (and
//! its environment variable); flags stay for the common cases.
//!
//! ```yaml
//! dns:
//!   upstreams: [198.18.0.53, "198.18.0.54:5353"]
//!   upstreamTimeout: 2s
//!   ttl: 30
//!   negativeTtl: 5
//!   cacheSize: 10000
//!   serveStale: 1h
//!   hostsFile: /etc/netd/hosts
//!   skydns:
//!     enabled: true
//!     prefix: /skydns
//!     zones: [cluster.local, skydns.local]
//!   stubDomains:                  # kube-dns's: zone -> upstreams, CoreDNS's forward defaults
//!     corp.example: [198.18.7.53]
//!   forward:                      # CoreDNS's forward per zone, with its options
//!     - zone: lab.example
//!       upstreams: [198.18.8.53, 198.18.8.54]
//!       forceTcp: false
//!       preferUdp: false
//!       policy: sequential        # random (default), round_robin
//!       healthCheck: 500ms
//!       maxFails: 2
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::args::{parse_domain, parse_duration};
use crate::resolv::parse_upstream;
use crate::stub::{ForwardZone, Policy};
use crate::{Args, DnsError};

/// The whole file: only the `dns` section is netd's today; other top-level keys are refused
/// (a typo must not pass unnoticed).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    dns: Option<DnsSection>,
}

/// The `dns` section. Keys absent keep their flag's value.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DnsSection {
    /// `--dns-upstream`.
    #[serde(default, deserialize_with = "upstreams")]
    pub upstreams: Option<Vec<SocketAddr>>,
    /// `--dns-upstream-timeout`.
    #[serde(default, deserialize_with = "duration")]
    pub upstream_timeout: Option<Duration>,
    /// `--dns-ttl`.
    pub ttl: Option<u32>,
    /// `--dns-negative-ttl`.
    pub negative_ttl: Option<u32>,
    /// `--dns-cache-size`.
    pub cache_size: Option<usize>,
    /// `--dns-max-inflight`.
    pub max_inflight: Option<usize>,
    /// `--dns-serve-stale`.
    #[serde(default, deserialize_with = "duration")]
    pub serve_stale: Option<Duration>,
    /// `--dns-hosts-file`.
    pub hosts_file: Option<std::path::PathBuf>,
    pub skydns: Option<SkyDnsSection>,
    /// kube-dns's `stubDomains`: zone -> upstreams (CoreDNS's `forward` defaults).
    #[serde(default, deserialize_with = "stub_domains")]
    pub stub_domains: Option<Vec<ForwardZone>>,
    /// CoreDNS's `forward` per zone.
    #[serde(default)]
    pub forward: Option<Vec<ForwardSection>>,
}

/// One entry of `dns.forward`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ForwardSection {
    #[serde(deserialize_with = "domain")]
    pub zone: String,
    #[serde(deserialize_with = "some_upstreams")]
    pub upstreams: Vec<SocketAddr>,
    #[serde(default)]
    pub force_tcp: bool,
    #[serde(default)]
    pub prefer_udp: bool,
    #[serde(default)]
    pub policy: Policy,
    #[serde(default, deserialize_with = "duration")]
    pub health_check: Option<Duration>,
    pub max_fails: Option<u32>,
}

impl ForwardSection {
    fn zone(&self) -> ForwardZone {
        let d = ForwardZone::new(&self.zone, self.upstreams.clone());
        ForwardZone {
            force_tcp: self.force_tcp,
            prefer_udp: self.prefer_udp,
            policy: self.policy,
            health_check: self.health_check.unwrap_or(d.health_check),
            max_fails: self.max_fails.unwrap_or(d.max_fails),
            ..d
        }
    }
}

/// `dns.skydns`: `--dns-skydns`, `--dns-skydns-prefix`, `--dns-skydns-zones`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkyDnsSection {
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "prefix")]
    pub prefix: Option<String>,
    #[serde(default, deserialize_with = "domains")]
    pub zones: Option<Vec<String>>,
}

/// A string value parsed by `f`; a bad one is an error raised while the deserializer is at
/// that value, so serde_yaml reports the value's own line.
#[derive(Clone, Copy)]
struct Parsed<F>(F);

impl<'de, T, F: Fn(&str) -> Result<T, String>> serde::de::Visitor<'de> for Parsed<F> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        (self.0)(v).map_err(E::custom)
    }
}

impl<'de, T, F: Fn(&str) -> Result<T, String>> serde::de::DeserializeSeed<'de> for Parsed<F> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_str(self)
    }
}

/// A list of strings, each parsed by `f` (an error names the element's line); `true`: an empty
/// list is an error too.
struct ParsedList<F>(F, bool);

impl<'de, T, F: Fn(&str) -> Result<T, String> + Copy> serde::de::Visitor<'de> for ParsedList<F> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list of strings")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut v = Vec::new();
        while let Some(x) = seq.next_element_seed(Parsed(self.0))? {
            v.push(x);
        }
        if v.is_empty() && self.1 {
            return Err(serde::de::Error::custom("no upstreams"));
        }
        Ok(v)
    }
}

fn upstreams<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<SocketAddr>>, D::Error> {
    d.deserialize_seq(ParsedList(parse_upstream, false)).map(Some)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    d.deserialize_str(Parsed(parse_duration)).map(Some)
}

fn domain<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_str(Parsed(parse_domain))
}

fn some_upstreams<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    d.deserialize_seq(ParsedList(parse_upstream, true))
}

/// `zone: [upstream, ...]`, each zone and each address checked where it is written.
fn stub_domains<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<ForwardZone>>, D::Error> {
    #[derive(Deserialize, PartialEq, Eq, PartialOrd, Ord)]
    struct Zone(#[serde(deserialize_with = "domain")] String);
    #[derive(Deserialize)]
    struct Ups(#[serde(deserialize_with = "some_upstreams")] Vec<SocketAddr>);
    let m: BTreeMap<Zone, Ups> = BTreeMap::deserialize(d)?;
    Ok(Some(m.into_iter().map(|(z, u)| ForwardZone::new(&z.0, u.0)).collect()))
}

fn domains<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    d.deserialize_seq(ParsedList(parse_domain, false)).map(Some)
}

fn prefix<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let check = |s: &str| {
        if !s.starts_with('/') || s.trim_end_matches('/').is_empty() {
            return Err(format!("prefix {s:?} must be an etcd key path like /skydns"));
        }
        Ok(s.to_string())
    };
    d.deserialize_str(Parsed(check)).map(Some)
}

/// Parses a config file's text; the error names the line and column (`source` names the file).
pub fn parse_dns_section(text: &str, source: &str) -> Result<DnsSection, DnsError> {
    if text.trim().is_empty() {
        return Ok(DnsSection::default());
    }
    let f: ConfigFile = serde_yaml::from_str(text).map_err(|e| DnsError::Config(format!("{source}: {}", located(&e))))?;
    Ok(f.dns.unwrap_or_default())
}

/// serde_yaml's message with the position spelled out (it says `at line L column C` for most
/// errors, but not for all).
fn located(e: &serde_yaml::Error) -> String {
    let msg = e.to_string();
    match e.location() {
        Some(l) if !msg.contains("line ") => format!("line {} column {}: {msg}", l.line(), l.column()),
        _ => msg,
    }
}

impl DnsSection {
    /// `args` with the keys this section sets replaced.
    pub fn over(&self, args: &Args) -> Args {
        let mut a = args.clone();
        if let Some(v) = &self.upstreams {
            a.dns_upstream = v.clone();
        }
        a.dns_upstream_timeout = self.upstream_timeout.unwrap_or(a.dns_upstream_timeout);
        a.dns_ttl = self.ttl.unwrap_or(a.dns_ttl);
        a.dns_negative_ttl = self.negative_ttl.unwrap_or(a.dns_negative_ttl);
        a.dns_cache_size = self.cache_size.unwrap_or(a.dns_cache_size);
        a.dns_max_inflight = self.max_inflight.unwrap_or(a.dns_max_inflight);
        a.dns_serve_stale = self.serve_stale.or(a.dns_serve_stale);
        a.dns_hosts_file = self.hosts_file.clone().or(a.dns_hosts_file);
        if let Some(s) = &self.skydns {
            a.dns_skydns = s.enabled.unwrap_or(a.dns_skydns);
            a.dns_skydns_prefix = s.prefix.clone().unwrap_or(a.dns_skydns_prefix);
            a.dns_skydns_zones = s.zones.clone().unwrap_or(a.dns_skydns_zones);
        }
        if self.stub_domains.is_some() || self.forward.is_some() {
            let mut zones = self.stub_domains.clone().unwrap_or_default();
            zones.extend(self.forward.iter().flatten().map(ForwardSection::zone));
            a.dns_forward_zones = zones;
        }
        a
    }
}

/// Reads `path` and applies its `dns` section over `args`.
pub fn load(path: &Path, args: &Args) -> Result<Args, DnsError> {
    let text = std::fs::read_to_string(path).map_err(|e| DnsError::Config(format!("cannot read the config file {}: {e}", path.display())))?;
    Ok(parse_dns_section(&text, &path.display().to_string())?.over(args))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        dns: Args,
    }

    fn err(text: &str) -> String {
        parse_dns_section(text, "netd.yaml").unwrap_err().to_string()
    }

    #[test]
    fn a_full_section_overrides_the_flags() {
        let text = "dns:\n  upstreams: [198.18.0.53, \"198.18.0.54:5353\"]\n  upstreamTimeout: 500ms\n  ttl: 60\n  negativeTtl: 10\n  cacheSize: 5\n  maxInflight: 7\n  skydns:\n    enabled: true\n    prefix: /dns/\n    zones: [Skydns.Local., example.org]\n";
        let s = parse_dns_section(text, "netd.yaml").unwrap();
        let flags = Cli::try_parse_from(["x", "--dns-upstream", "198.18.0.1", "--dns-ttl", "5", "--dns-skydns", "false"]).unwrap().dns;
        let a = s.over(&flags);
        assert_eq!(a.dns_upstream, ["198.18.0.53:53".parse().unwrap(), "198.18.0.54:5353".parse().unwrap()]);
        assert_eq!((a.dns_upstream_timeout, a.dns_ttl, a.dns_negative_ttl, a.dns_cache_size, a.dns_max_inflight), (Duration::from_millis(500), 60, 10, 5, 7));
        assert_eq!((a.dns_skydns_prefix.as_str(), a.skydns_zones()), ("/dns/", vec!["skydns.local".to_string(), "example.org".to_string()]));
        // Keys the file does not set keep the flags'.
        let a = parse_dns_section("dns:\n  ttl: 60\n", "f").unwrap().over(&flags);
        assert_eq!((a.dns_upstream.len(), a.dns_ttl, a.dns_skydns), (1, 60, false));
        assert_eq!(parse_dns_section("", "f").unwrap(), DnsSection::default());
        assert_eq!(parse_dns_section("dns:\n", "f").unwrap(), DnsSection::default());
    }

    #[test]
    fn errors_name_the_file_and_the_line() {
        let e = err("dns:\n  ttl: 30\n  upstream: [198.18.0.53]\n");
        assert!(e.starts_with("netd.yaml: ") && e.contains("unknown field `upstream`") && e.contains("line 3"), "{e}");
        let e = err("dns:\n  ttl: thirty\n");
        assert!(e.contains("line 2") && e.contains("invalid type"), "{e}");
        let e = err("dns:\n  ttl: 30\n  upstreams:\n    - 198.18.0.53\n    - nope\n");
        assert!(e.contains("\"nope\" is not an IP address") && e.contains("line 5"), "{e}");
        let e = err("dns:\n  upstreamTimeout: 2d\n");
        assert!(e.contains("unknown unit") && e.contains("line 2"), "{e}");
        let e = err("dns:\n  skydns:\n    zones: [\"a..b\"]\n");
        assert!(e.contains("is not a domain name") && e.contains("line 3"), "{e}");
        let e = err("dns:\n  skydns:\n    prefix: skydns\n");
        assert!(e.contains("must be an etcd key path") && e.contains("line 3"), "{e}");
        let e = err("proxy:\n  mode: nftables\n");
        assert!(e.contains("unknown field `proxy`") && e.contains("line 1"), "{e}");
        let e = err("dns: [1\n");
        assert!(e.contains("line "), "{e}");
    }

    #[test]
    fn stub_domains_and_forward_zones() {
        let text = "dns:\n  stubDomains:\n    Corp.Example.: [198.18.7.53, \"198.18.7.54:5353\"]\n  forward:\n    - zone: lab.example\n      upstreams: [198.18.8.53]\n      forceTcp: true\n      policy: sequential\n      healthCheck: 2s\n      maxFails: 0\n";
        let flags = Cli::try_parse_from(["x"]).unwrap().dns;
        let a = parse_dns_section(text, "f").unwrap().over(&flags);
        let mut corp = ForwardZone::new("corp.example", vec!["198.18.7.53:53".parse().unwrap(), "198.18.7.54:5353".parse().unwrap()]);
        assert_eq!(a.dns_forward_zones[0], corp);
        corp = ForwardZone { zone: "lab.example".into(), upstreams: vec!["198.18.8.53:53".parse().unwrap()], force_tcp: true, policy: Policy::Sequential, health_check: Duration::from_secs(2), max_fails: 0, ..corp };
        assert_eq!(a.dns_forward_zones[1], corp);
        assert_eq!(a.server_config(None).unwrap().forward_zones.len(), 2);
        let e = err("dns:\n  forward:\n    - zone: lab.example\n      upstreams: [198.18.8.53]\n      policy: fastest\n");
        assert!(e.contains("unknown variant `fastest`") && e.contains("line 5"), "{e}");
        let e = err("dns:\n  forward:\n    - zone: lab.example\n      upstreams: []\n");
        assert!(e.contains("no upstreams") && e.contains("line 4"), "{e}");
        let e = err("dns:\n  stubDomains:\n    corp.example: [198.18.7.53]\n    \"bad..zone\": [198.18.7.53]\n");
        assert!(e.contains("is not a domain name") && e.contains("line 4"), "{e}");
        let e = err("dns:\n  forward:\n    - zone: lab.example\n      upstream: [198.18.8.53]\n");
        assert!(e.contains("unknown field `upstream`") && e.contains("line 4"), "{e}");
    }

    #[test]
    fn load_reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("netd.yaml");
        std::fs::write(&path, "dns:\n  cacheSize: 3\n").unwrap();
        let flags = Cli::try_parse_from(["x"]).unwrap().dns;
        assert_eq!(load(&path, &flags).unwrap().dns_cache_size, 3);
        let e = load(&dir.path().join("missing.yaml"), &flags).unwrap_err().to_string();
        assert!(e.contains("cannot read the config file") && e.contains("missing.yaml"), "{e}");
    }
}
