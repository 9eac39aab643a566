//! The peer table: peer subnet → peer public (underlay) IP, with
//! longest-prefix match, and the set of peer public IPs that inbound
//! datagrams must come from.
//!
//! A table is immutable once built; [`crate::UdpDatapath::set_peers`]
//! builds a new one and publishes it, and every worker picks it up at the
//! start of its next batch (one atomic load per batch, no lock per packet).

use ipnet::Ipv4Net;
use std::net::Ipv4Addr;

/// Subnets of one prefix length, sorted by network address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Level {
    prefix_len: u8,
    mask: u32,
    /// (network address, peer public IP), sorted by network, unique.
    nets: Vec<(u32, u32)>,
}

/// An immutable lookup table built from `(subnet, peer public IP)` pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerTable {
    /// One level per distinct prefix length, longest prefix first. In a
    /// flannel network all leases have the same length, so one level.
    levels: Vec<Level>,
    /// Every peer public IP, sorted, unique.
    peers: Vec<u32>,
}

fn mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len))
    }
}

impl PeerTable {
    /// Builds a table. Host bits of a subnet are ignored (`10.244.1.7/24`
    /// is `10.244.1.0/24`); of two entries for the same subnet the first
    /// wins. Entries whose peer IP is `local` (our own lease) or is
    /// unspecified are skipped: sending to ourselves would loop.
    pub fn new(entries: &[(Ipv4Net, Ipv4Addr)], local: Ipv4Addr) -> PeerTable {
        let mut levels: Vec<Level> = Vec::new();
        let mut peers = Vec::with_capacity(entries.len());
        for (net, peer) in entries {
            if *peer == local || peer.is_unspecified() {
                continue;
            }
            let net = net.trunc();
            let len = net.prefix_len();
            let level = match levels.iter_mut().position(|l| l.prefix_len == len) {
                Some(i) => &mut levels[i],
                None => {
                    levels.push(Level {
                        prefix_len: len,
                        mask: mask(len),
                        nets: Vec::new(),
                    });
                    levels.last_mut().expect("just pushed")
                }
            };
            level
                .nets
                .push((u32::from(net.network()), u32::from(*peer)));
            peers.push(u32::from(*peer));
        }
        for l in &mut levels {
            // Stable sort keeps the first of duplicates first; dedup keeps it.
            l.nets.sort_by_key(|&(n, _)| n);
            l.nets.dedup_by_key(|&mut (n, _)| n);
        }
        levels.sort_by_key(|l| std::cmp::Reverse(l.prefix_len));
        peers.sort_unstable();
        peers.dedup();
        PeerTable { levels, peers }
    }

    /// The peer public IP for inner destination `dst` (host byte order),
    /// by longest-prefix match.
    #[inline]
    pub fn lookup(&self, dst: u32) -> Option<u32> {
        for l in &self.levels {
            let key = dst & l.mask;
            if let Ok(i) = l.nets.binary_search_by_key(&key, |&(n, _)| n) {
                return Some(l.nets[i].1);
            }
        }
        None
    }

    /// Whether `ip` (host byte order) is the public IP of a current peer.
    #[inline]
    pub fn is_peer(&self, ip: u32) -> bool {
        self.peers.binary_search(&ip).is_ok()
    }

    /// Number of subnets in the table.
    pub fn len(&self) -> usize {
        self.levels.iter().map(|l| l.nets.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().unwrap())
    }

    fn entry(net: &str, peer: &str) -> (Ipv4Net, Ipv4Addr) {
        (net.parse().unwrap(), peer.parse().unwrap())
    }

    #[test]
    fn lookup_finds_the_peer_of_the_subnet() {
        let t = PeerTable::new(
            &[
                entry("10.244.2.0/24", "198.18.2.2"),
                entry("10.244.3.0/24", "198.18.2.3"),
            ],
            "198.18.2.1".parse().unwrap(),
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(ip("10.244.2.0")), Some(ip("198.18.2.2")));
        assert_eq!(t.lookup(ip("10.244.2.255")), Some(ip("198.18.2.2")));
        assert_eq!(t.lookup(ip("10.244.3.17")), Some(ip("198.18.2.3")));
        assert_eq!(t.lookup(ip("10.244.4.1")), None);
        assert_eq!(t.lookup(ip("10.244.1.1")), None);
        assert!(t.is_peer(ip("198.18.2.2")));
        assert!(t.is_peer(ip("198.18.2.3")));
        assert!(!t.is_peer(ip("198.18.2.1")));
        assert!(!t.is_peer(ip("198.18.2.99")));
    }

    #[test]
    fn longest_prefix_wins() {
        let t = PeerTable::new(
            &[
                entry("10.244.0.0/16", "198.18.0.1"),
                entry("10.244.5.0/24", "198.18.0.5"),
                entry("10.244.5.128/25", "198.18.0.6"),
                entry("0.0.0.0/0", "198.18.0.9"),
            ],
            Ipv4Addr::UNSPECIFIED,
        );
        assert_eq!(t.lookup(ip("10.244.5.200")), Some(ip("198.18.0.6")));
        assert_eq!(t.lookup(ip("10.244.5.100")), Some(ip("198.18.0.5")));
        assert_eq!(t.lookup(ip("10.244.6.1")), Some(ip("198.18.0.1")));
        assert_eq!(t.lookup(ip("8.8.8.8")), Some(ip("198.18.0.9")));
    }

    #[test]
    fn host_bits_are_ignored_and_first_duplicate_wins() {
        let t = PeerTable::new(
            &[
                entry("10.244.2.77/24", "198.18.2.2"),
                entry("10.244.2.0/24", "198.18.2.9"),
            ],
            Ipv4Addr::UNSPECIFIED,
        );
        assert_eq!(t.len(), 1);
        assert_eq!(t.lookup(ip("10.244.2.1")), Some(ip("198.18.2.2")));
        // The losing duplicate's IP is still a peer address: inbound from
        // it is not "unknown source" (it holds a lease in the input).
        assert!(t.is_peer(ip("198.18.2.9")));
    }

    #[test]
    fn own_and_unspecified_addresses_are_skipped() {
        let t = PeerTable::new(
            &[
                entry("10.244.1.0/24", "198.18.2.1"),
                entry("10.244.9.0/24", "0.0.0.0"),
            ],
            "198.18.2.1".parse().unwrap(),
        );
        assert!(t.is_empty());
        assert_eq!(t.lookup(ip("10.244.1.1")), None);
        assert!(!t.is_peer(ip("198.18.2.1")));
    }

    #[test]
    fn many_peers() {
        let entries: Vec<_> = (0..=255u32)
            .map(|i| {
                let net = Ipv4Net::new(Ipv4Addr::from(ip("10.244.0.0") + (i << 8)), 24).unwrap();
                (net, Ipv4Addr::from(ip("198.18.0.0") + i + 1))
            })
            .collect();
        let t = PeerTable::new(&entries, Ipv4Addr::UNSPECIFIED);
        assert_eq!(t.len(), 256);
        for i in 0..=255u32 {
            assert_eq!(
                t.lookup(ip("10.244.0.9") + (i << 8)),
                Some(ip("198.18.0.0") + i + 1)
            );
        }
    }
}
