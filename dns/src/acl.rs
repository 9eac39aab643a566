//! Who gets recursion: the cluster network, extra allowed networks, and the node itself
//! (loopback and every address configured on the node, refreshed periodically).

use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::IpNet;

#[derive(Debug)]
pub(crate) struct Acl {
    nets: Vec<IpNet>,
    local: ArcSwap<Vec<IpAddr>>,
}

impl Acl {
    pub fn new(nets: Vec<IpNet>) -> Self {
        Acl { nets, local: ArcSwap::from_pointee(local_addresses()) }
    }

    /// True if `ip` may use recursion (names outside the cluster zone).
    #[inline]
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_loopback() || self.nets.iter().any(|n| n.contains(&ip)) || self.local.load().contains(&ip)
    }

    /// Re-reads the node's own addresses.
    pub fn refresh(&self) {
        let now = local_addresses();
        if **self.local.load() != now {
            self.local.store(Arc::new(now));
        }
    }
}

/// Every address configured on an interface of this network namespace (getifaddrs(3)).
pub(crate) fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into the pointer we pass; freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says which struct it is.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()));
            } else if family == libc::AF_INET6 {
                // SAFETY: AF_INET6 addresses are sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_cluster_and_local_addresses_are_allowed() {
        let acl = Acl::new(vec!["10.244.0.0/16".parse().unwrap()]);
        assert!(acl.allows("127.0.0.1".parse().unwrap()));
        assert!(acl.allows("::1".parse().unwrap()));
        assert!(acl.allows("10.244.3.4".parse().unwrap()));
        assert!(acl.allows("::ffff:10.244.3.4".parse().unwrap()));
        assert!(!acl.allows("10.245.0.1".parse().unwrap()));
        assert!(!acl.allows("198.51.100.7".parse().unwrap()));
        // Whatever this namespace has configured counts as "the node".
        for ip in local_addresses() {
            assert!(acl.allows(ip), "{ip}");
        }
    }
}
