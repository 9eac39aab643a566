//! Command-line flags of the DNS server, to be flattened into `netd run`. Doc comments are the
//! `--help` text; every flag is also a `NETD_*` environment variable.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::ArgAction;
use ipnet::IpNet;

use crate::resolv::{parse_upstream, upstreams_from_resolv_conf, without_self, SYSTEMD_RESOLV_CONF};
use crate::{DnsError, ServerConfig, ZoneConfig};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Serve cluster DNS on this node (cluster domain from Services/EndpointSlices, other names
    /// forwarded).
    #[arg(long = "dns", env = "NETD_DNS", default_value_t = true, action = ArgAction::Set)]
    pub dns: bool,
    /// Node-local address the DNS server listens on (UDP and TCP); added to lo when absent.
    #[arg(long, env = "NETD_DNS_LISTEN", default_value = "169.254.20.10:53")]
    pub dns_listen: SocketAddr,
    /// The cluster DNS service IP (kube-dns's ClusterIP, e.g. 10.96.0.10). Served locally on
    /// every node: it is added to lo and listened on (port of --dns-listen); the proxy leaves
    /// its port 53 untracked. Also the address of ns.dns.<cluster-domain>.
    #[arg(long, env = "NETD_CLUSTER_DNS_IP")]
    pub cluster_dns_ip: Option<IpAddr>,
    /// The cluster domain the server is authoritative for.
    #[arg(long, env = "NETD_CLUSTER_DOMAIN", default_value = "cluster.local", value_parser = parse_domain)]
    pub cluster_domain: String,
    /// Upstream resolvers for other names, comma-separated IP or IP:port (default: the
    /// nameservers of --dns-resolv-conf).
    #[arg(long, env = "NETD_DNS_UPSTREAM", value_delimiter = ',', value_parser = parse_upstream)]
    pub dns_upstream: Vec<SocketAddr>,
    /// resolv.conf to take upstreams from when --dns-upstream is not set; a 127.0.0.53 stub
    /// means systemd-resolved's /run/systemd/resolve/resolv.conf.
    #[arg(long, env = "NETD_DNS_RESOLV_CONF", default_value = "/etc/resolv.conf")]
    pub dns_resolv_conf: PathBuf,
    /// TTL of cluster answers, seconds.
    #[arg(long, env = "NETD_DNS_TTL", default_value_t = 30)]
    pub dns_ttl: u32,
    /// TTL of negative cluster answers (NXDOMAIN, NODATA) and SOA minimum, seconds.
    #[arg(long, env = "NETD_DNS_NEGATIVE_TTL", default_value_t = 5)]
    pub dns_negative_ttl: u32,
    /// Entries in the cache of forwarded answers (0 disables it).
    #[arg(long, env = "NETD_DNS_CACHE_SIZE", default_value_t = 10000)]
    pub dns_cache_size: usize,
    /// The pod network (comma-separated CIDRs): its clients, and the node itself, get recursion;
    /// others only get cluster answers (REFUSED for other names).
    #[arg(long, env = "NETD_CLUSTER_CIDR", value_delimiter = ',')]
    pub cluster_cidr: Vec<IpNet>,
    /// More networks allowed recursion, comma-separated CIDRs.
    #[arg(long, env = "NETD_DNS_ALLOW", value_delimiter = ',')]
    pub dns_allow: Vec<IpNet>,
    /// UDP sockets/threads per listen address (SO_REUSEPORT); 0 = one per CPU.
    #[arg(long, env = "NETD_DNS_WORKERS", default_value_t = 0)]
    pub dns_workers: usize,
    /// Forwards in flight at most; beyond, clients get SERVFAIL at once.
    #[arg(long, env = "NETD_DNS_MAX_INFLIGHT", default_value_t = 1000)]
    pub dns_max_inflight: usize,
    /// Time to wait for one upstream before trying the next (e.g. 2s, 500ms).
    #[arg(long, env = "NETD_DNS_UPSTREAM_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub dns_upstream_timeout: Duration,
    /// Serve SkyDNS records written to etcd under --dns-skydns-prefix (CoreDNS's etcd plugin):
    /// in the cluster domain after Services, and in --dns-skydns-zones.
    #[arg(long = "dns-skydns", env = "NETD_DNS_SKYDNS", default_value_t = true, action = ArgAction::Set)]
    pub dns_skydns: bool,
    /// etcd key prefix of SkyDNS records (`<prefix>/local/cluster/svc/default/date` is
    /// date.default.svc.cluster.local).
    #[arg(long, env = "NETD_DNS_SKYDNS_PREFIX", default_value = crate::skydns::DEFAULT_PREFIX)]
    pub dns_skydns_prefix: String,
    /// Zones answered from SkyDNS records, comma-separated (default: the cluster domain).
    #[arg(long, env = "NETD_DNS_SKYDNS_ZONES", value_delimiter = ',', value_parser = parse_domain)]
    pub dns_skydns_zones: Vec<String>,
    /// netd's config file (YAML): its `dns` section sets these flags' values (a key set there
    /// wins over its flag) and per-zone forwarding; errors name the line.
    #[arg(long, env = "NETD_DNS_CONFIG")]
    pub dns_config: Option<PathBuf>,
    /// Answer from expired cache entries up to this long past their TTL when every upstream
    /// fails (serve stale, RFC 8767; answers go out with TTL 0), e.g. 1h. Off by default.
    #[arg(long, env = "NETD_DNS_SERVE_STALE", value_parser = parse_duration)]
    pub dns_serve_stale: Option<Duration>,
    /// A hosts file (/etc/hosts format) answered before everything else (CoreDNS's hosts
    /// plugin); reloaded when it changes.
    #[arg(long, env = "NETD_DNS_HOSTS_FILE")]
    pub dns_hosts_file: Option<PathBuf>,
    /// Stub zones (from the config file's `dns.forward` and `dns.stubDomains`; no flag).
    #[arg(skip)]
    pub dns_forward_zones: Vec<crate::stub::ForwardZone>,
    /// Add the listen addresses to lo when no interface has them.
    #[arg(long, env = "NETD_DNS_ADD_LO_ADDRESS", default_value_t = true, action = ArgAction::Set)]
    pub dns_add_lo_address: bool,
    /// Take the DNS sockets over from a netd running with the same --run-dir (its
    /// dns-handover.sock), and hand them on to the next one, so that an upgrade loses no query.
    /// false: bind fresh sockets (queries are lost while no process listens).
    #[arg(long, env = "NETD_DNS_HANDOVER", default_value_t = true, action = ArgAction::Set)]
    pub dns_handover: bool,
}

impl Args {
    /// These flags with the `dns` section of --dns-config applied (themselves when none is
    /// given). Read once at start: a bad file is an error naming its line.
    pub fn effective(&self) -> Result<Args, DnsError> {
        match &self.dns_config {
            Some(path) => crate::config::load(path, self),
            None => Ok(self.clone()),
        }
    }

    /// The zone parameters.
    pub fn zone_config(&self) -> ZoneConfig {
        ZoneConfig {
            domain: self.cluster_domain.clone(),
            ttl: self.dns_ttl,
            negative_ttl: self.dns_negative_ttl,
            dns_ips: self.cluster_dns_ip.into_iter().collect(),
            serial: None,
        }
    }

    /// The zones served from SkyDNS records (empty when --dns-skydns is off).
    pub fn skydns_zones(&self) -> Vec<String> {
        match (self.dns_skydns, self.dns_skydns_zones.is_empty()) {
            (false, _) => Vec::new(),
            (true, true) => vec![self.cluster_domain.clone()],
            (true, false) => self.dns_skydns_zones.clone(),
        }
    }

    /// The listen addresses: --dns-listen, and the cluster DNS IP on the same port.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        let mut v = vec![self.dns_listen];
        if let Some(ip) = self.cluster_dns_ip {
            let sa = SocketAddr::new(ip, self.dns_listen.port());
            if !v.contains(&sa) {
                v.push(sa);
            }
        }
        v
    }

    /// The server configuration; reads resolv.conf when --dns-upstream is empty.
    /// `cluster_network` (the flannel network netd knows) is allowed recursion when
    /// --cluster-cidr is not given.
    pub fn server_config(&self, cluster_network: Option<IpNet>) -> Result<ServerConfig, DnsError> {
        let listen = self.listen_addrs();
        let upstreams = if self.dns_upstream.is_empty() {
            upstreams_from_resolv_conf(&self.dns_resolv_conf, SYSTEMD_RESOLV_CONF.as_ref())?
        } else {
            self.dns_upstream.clone()
        };
        let upstreams = without_self(upstreams, &listen);
        let mut allowed = if self.cluster_cidr.is_empty() { cluster_network.into_iter().collect() } else { self.cluster_cidr.clone() };
        allowed.extend(self.dns_allow.iter().copied());
        Ok(ServerConfig {
            listen,
            add_to_lo: self.dns_add_lo_address,
            workers: self.dns_workers,
            upstreams,
            upstream_timeout: self.dns_upstream_timeout,
            max_inflight: self.dns_max_inflight,
            cache_size: self.dns_cache_size,
            recursion_allowed: allowed,
            zone: self.zone_config(),
            forward_zones: self.dns_forward_zones.clone(),
            serve_stale: self.dns_serve_stale,
            hosts_file: self.dns_hosts_file.clone(),
            ..ServerConfig::default()
        })
    }
}

pub(crate) fn parse_domain(s: &str) -> Result<String, String> {
    let d = s.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !d.is_empty()
        && d.len() < 250
        && d.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if ok {
        Ok(d)
    } else {
        Err(format!("{s:?} is not a domain name"))
    }
}

/// Parses `500ms`, `2s`, `1m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 2s)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("{s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        dns: Args,
    }

    #[test]
    fn well_formed_and_every_flag_has_an_env_var() {
        Cli::command().debug_assert();
        for arg in Cli::command().get_arguments() {
            if arg.get_long().is_some() && !["help", "version"].contains(&arg.get_id().as_str()) {
                let env = arg.get_env().unwrap_or_else(|| panic!("--{} has no env var", arg.get_id()));
                assert!(env.to_string_lossy().starts_with("NETD_"), "{env:?}");
                assert!(arg.get_help().is_some(), "--{} has no help", arg.get_id());
            }
        }
    }

    #[test]
    fn defaults() {
        let a = Cli::try_parse_from(["x"]).unwrap().dns;
        assert!(a.dns && a.dns_handover);
        assert_eq!(a.dns_listen, "169.254.20.10:53".parse().unwrap());
        assert_eq!(a.cluster_domain, "cluster.local");
        assert_eq!((a.dns_ttl, a.dns_negative_ttl), (30, 5));
        assert_eq!(a.listen_addrs(), ["169.254.20.10:53".parse().unwrap()]);
        let z = a.zone_config();
        assert_eq!(z.domain, "cluster.local");
        assert_eq!((a.dns_skydns_prefix.as_str(), a.skydns_zones()), ("/skydns", vec!["cluster.local".to_string()]));
        let a = Cli::try_parse_from(["x", "--dns-skydns-zones", "skydns.local,Example.org."]).unwrap().dns;
        assert_eq!(a.skydns_zones(), ["skydns.local", "example.org"]);
        let a = Cli::try_parse_from(["x", "--dns-skydns", "false"]).unwrap().dns;
        assert!(a.skydns_zones().is_empty());
    }

    #[test]
    fn explicit_flags() {
        let a = Cli::try_parse_from([
            "x",
            "--cluster-dns-ip",
            "10.96.0.10",
            "--cluster-domain",
            "Example.Internal.",
            "--dns-upstream",
            "198.18.0.53,198.18.0.54:5353",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--dns-upstream-timeout",
            "500ms",
            "--dns",
            "false",
        ])
        .unwrap()
        .dns;
        assert!(!a.dns);
        assert_eq!(a.cluster_domain, "example.internal");
        assert_eq!(a.listen_addrs().len(), 2);
        let c = a.server_config(None).unwrap();
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.upstream_timeout, Duration::from_millis(500));
        assert_eq!(c.recursion_allowed, ["10.244.0.0/16".parse::<IpNet>().unwrap()]);
        assert_eq!(c.zone.dns_ips, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert!(Cli::try_parse_from(["x", "--cluster-domain", "a..b"]).is_err());
        assert!(Cli::try_parse_from(["x", "--dns-upstream", "nope"]).is_err());
    }

    #[test]
    fn cluster_network_is_the_default_acl() {
        let a = Cli::try_parse_from(["x", "--dns-upstream", "198.18.0.53"]).unwrap().dns;
        let c = a.server_config(Some("10.244.0.0/16".parse().unwrap())).unwrap();
        assert_eq!(c.recursion_allowed, ["10.244.0.0/16".parse::<IpNet>().unwrap()]);
    }
}
