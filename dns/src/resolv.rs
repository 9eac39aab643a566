//! Upstream resolvers: `--dns-upstream`, or the node's resolv.conf (following systemd-resolved's
//! stub to the real servers), never ourselves.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use crate::DnsError;

/// Where systemd-resolved lists the servers behind its 127.0.0.53 stub.
pub const SYSTEMD_RESOLV_CONF: &str = "/run/systemd/resolve/resolv.conf";

/// `nameserver` addresses of a resolv.conf, in order (scoped IPv6 `%iface` suffixes dropped).
pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "nameserver").then(|| w.next()).flatten()
        })
        .filter_map(|a| a.split('%').next()?.parse().ok())
        .collect()
}

/// `1.2.3.4`, `1.2.3.4:5353`, `::1`, `[::1]:53`.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{s:?} is not an IP address or IP:port"))
}

/// The servers of `path`; when that is only systemd-resolved's stub (127.0.0.53), the servers
/// of `systemd_path` instead.
pub fn upstreams_from_resolv_conf(path: &Path, systemd_path: &Path) -> Result<Vec<SocketAddr>, DnsError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| DnsError::Config(format!("cannot read {}: {e}", p.display())))
    };
    let mut servers = parse_resolv_conf(&read(path)?);
    let stub: IpAddr = [127, 0, 0, 53].into();
    if !servers.is_empty() && servers.iter().all(|s| *s == stub) {
        servers = parse_resolv_conf(&read(systemd_path)?);
    }
    Ok(servers.into_iter().map(|ip| SocketAddr::new(ip, 53)).collect())
}

/// Drops upstreams that are this server (a resolv.conf pointing at the node-local address
/// would make every forward loop).
pub fn without_self(upstreams: Vec<SocketAddr>, own: &[SocketAddr]) -> Vec<SocketAddr> {
    upstreams
        .into_iter()
        .filter(|u| !own.iter().any(|o| o.port() == u.port() && (o.ip() == u.ip())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn parses_nameserver_lines() {
        let t = "# c\nsearch a b\nnameserver 10.0.0.1\nnameserver  fe80::1%eth0\nnameserver bogus\noptions ndots:5\n";
        assert_eq!(parse_resolv_conf(t), ["10.0.0.1".parse::<IpAddr>().unwrap(), "fe80::1".parse().unwrap()]);
    }

    #[test]
    fn upstream_syntax() {
        assert_eq!(parse_upstream("1.2.3.4").unwrap(), "1.2.3.4:53".parse().unwrap());
        assert_eq!(parse_upstream("1.2.3.4:5353").unwrap(), "1.2.3.4:5353".parse().unwrap());
        assert_eq!(parse_upstream("::1").unwrap(), "[::1]:53".parse().unwrap());
        assert_eq!(parse_upstream("[::1]:54").unwrap(), "[::1]:54".parse().unwrap());
        assert!(parse_upstream("dns.example").is_err());
    }

    #[test]
    fn systemd_stub_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("resolv.conf");
        let real = dir.path().join("real.conf");
        std::fs::File::create(&main).unwrap().write_all(b"nameserver 127.0.0.53\noptions edns0\n").unwrap();
        std::fs::File::create(&real).unwrap().write_all(b"nameserver 198.18.0.53\n").unwrap();
        assert_eq!(upstreams_from_resolv_conf(&main, &real).unwrap(), ["198.18.0.53:53".parse().unwrap()]);
        std::fs::write(&main, "nameserver 198.18.0.1\n").unwrap();
        assert_eq!(upstreams_from_resolv_conf(&main, &real).unwrap(), ["198.18.0.1:53".parse().unwrap()]);
        assert!(upstreams_from_resolv_conf(&dir.path().join("missing"), &real).is_err());
    }

    #[test]
    fn own_addresses_are_not_upstreams() {
        let own: Vec<SocketAddr> = vec!["169.254.20.10:53".parse().unwrap()];
        let ups = vec!["169.254.20.10:53".parse().unwrap(), "198.18.0.53:53".parse().unwrap()];
        assert_eq!(without_self(ups, &own), ["198.18.0.53:53".parse().unwrap()]);
    }
}
