//! Per-zone forwarding: stub domains (kube-dns's `stubDomains`, CoreDNS's `forward` in a
//! server block of its own). Names in a stub zone go to that zone's upstreams instead of the
//! node's resolvers, with the zone's options:
//!
//! - `policy`: the order upstreams are tried in: `sequential` (as listed), `round_robin` (each
//!   query starts one further), `random` (CoreDNS's default, and ours).
//! - health: an upstream whose last `max_fails` exchanges failed is *down*: it is tried only
//!   after every healthy one (and still tried when all are down, like CoreDNS). A down upstream
//!   is probed every `health_check` with `. IN NS` over the zone's transport; any answer brings
//!   it back. `max_fails: 0` turns health tracking off.
//! - `force_tcp`: every exchange over TCP. `prefer_udp`: UDP first, TCP only after a truncated
//!   answer; netd's forwarder always does that, so the option is accepted for CoreDNS
//!   compatibility and changes nothing.
//!
//! The longest matching zone wins. Stub zones inside the cluster domain are never consulted
//! (the cluster zone answers its names).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use crate::wire;

/// How a stub zone's upstreams are ordered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    Sequential,
    RoundRobin,
    #[default]
    Random,
}

/// One stub zone as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardZone {
    /// The zone, lower case, without the trailing dot.
    pub zone: String,
    pub upstreams: Vec<SocketAddr>,
    pub force_tcp: bool,
    pub prefer_udp: bool,
    pub policy: Policy,
    /// How often a down upstream is probed.
    pub health_check: Duration,
    /// Failed exchanges in a row that make an upstream down (0: never).
    pub max_fails: u32,
}

impl ForwardZone {
    /// A zone with CoreDNS's defaults (random order, probe every 0.5 s, down after 2 failures).
    pub fn new(zone: &str, upstreams: Vec<SocketAddr>) -> ForwardZone {
        ForwardZone {
            zone: zone.trim_end_matches('.').to_ascii_lowercase(),
            upstreams,
            force_tcp: false,
            prefer_udp: false,
            policy: Policy::Random,
            health_check: Duration::from_millis(500),
            max_fails: 2,
        }
    }
}

/// A stub zone being served: its upstreams' health.
#[derive(Debug)]
pub(crate) struct StubZone {
    pub cfg: ForwardZone,
    wire: Box<[u8]>,
    /// Failed exchanges in a row, per upstream.
    fails: Box<[AtomicU32]>,
    next: AtomicUsize,
}

impl StubZone {
    pub fn new(cfg: ForwardZone) -> StubZone {
        let wire = wire::name_from_str(&cfg.zone).unwrap_or_default().into_boxed_slice();
        let fails = cfg.upstreams.iter().map(|_| AtomicU32::new(0)).collect();
        StubZone { cfg, wire, fails, next: AtomicUsize::new(0) }
    }

    fn is_down(&self, i: usize) -> bool {
        self.cfg.max_fails > 0 && self.fails[i].load(Ordering::Relaxed) >= self.cfg.max_fails
    }

    /// The upstreams to try, in order: healthy ones by the policy, then down ones.
    pub fn order(&self) -> Vec<SocketAddr> {
        let n = self.cfg.upstreams.len();
        if n == 0 {
            return Vec::new();
        }
        let start = match self.cfg.policy {
            Policy::Sequential => 0,
            Policy::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
            Policy::Random => rand::random::<u32>() as usize % n,
        };
        let idx: Vec<usize> = (0..n).map(|k| (start + k) % n).collect();
        let (up, down): (Vec<usize>, Vec<usize>) = idx.into_iter().partition(|&i| !self.is_down(i));
        up.into_iter().chain(down).map(|i| self.cfg.upstreams[i]).collect()
    }

    /// Counts an exchange with `addr`.
    pub fn report(&self, addr: SocketAddr, ok: bool) {
        if let Some(i) = self.cfg.upstreams.iter().position(|a| *a == addr) {
            if ok {
                self.fails[i].store(0, Ordering::Relaxed);
            } else {
                self.fails[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Upstreams that are down now (to probe).
    pub fn down(&self) -> Vec<SocketAddr> {
        (0..self.cfg.upstreams.len()).filter(|&i| self.is_down(i)).map(|i| self.cfg.upstreams[i]).collect()
    }
}

/// The stub zone for `name` (lower-case wire form): the longest that contains it.
pub(crate) fn route<'a>(zones: &'a [StubZone], name: &[u8]) -> Option<&'a StubZone> {
    zones.iter().filter(|z| wire::strip_zone(name, &z.wire).is_some()).max_by_key(|z| z.wire.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(v: &[SocketAddr]) -> Vec<String> {
        v.iter().map(|a| a.ip().to_string()).collect()
    }

    fn zone(policy: Policy, max_fails: u32) -> StubZone {
        let mut z = ForwardZone::new("Corp.Test.", vec!["198.18.7.1:53".parse().unwrap(), "198.18.7.2:53".parse().unwrap(), "198.18.7.3:53".parse().unwrap()]);
        (z.policy, z.max_fails) = (policy, max_fails);
        StubZone::new(z)
    }

    #[test]
    fn policies_and_failover_order() {
        let z = zone(Policy::Sequential, 2);
        assert_eq!(z.cfg.zone, "corp.test");
        assert_eq!(addrs(&z.order()), ["198.18.7.1", "198.18.7.2", "198.18.7.3"]);
        let rr = zone(Policy::RoundRobin, 2);
        let firsts: Vec<String> = (0..4).map(|_| addrs(&rr.order())[0].clone()).collect();
        assert_eq!(firsts, ["198.18.7.1", "198.18.7.2", "198.18.7.3", "198.18.7.1"]);
        let r = zone(Policy::Random, 2);
        for _ in 0..20 {
            let mut o = addrs(&r.order());
            o.sort();
            assert_eq!(o, ["198.18.7.1", "198.18.7.2", "198.18.7.3"], "every upstream, once");
        }
    }

    #[test]
    fn an_upstream_failing_max_fails_times_in_a_row_goes_last_until_it_answers() {
        let z = zone(Policy::Sequential, 2);
        let first: SocketAddr = "198.18.7.1:53".parse().unwrap();
        z.report(first, false);
        assert_eq!(addrs(&z.order())[0], "198.18.7.1", "one failure is not enough");
        z.report(first, false);
        assert_eq!(addrs(&z.order()), ["198.18.7.2", "198.18.7.3", "198.18.7.1"]);
        assert_eq!(z.down(), [first]);
        z.report(first, true);
        assert_eq!(addrs(&z.order())[0], "198.18.7.1");
        assert!(z.down().is_empty());
        // Off: never down.
        let z = zone(Policy::Sequential, 0);
        for _ in 0..5 {
            z.report(first, false);
        }
        assert_eq!(addrs(&z.order())[0], "198.18.7.1");
    }

    #[test]
    fn the_longest_zone_wins() {
        let zones = vec![StubZone::new(ForwardZone::new("test", vec![])), StubZone::new(ForwardZone::new("corp.test", vec![]))];
        let n = |s: &str| wire::name_from_str(s).unwrap();
        assert_eq!(route(&zones, &n("a.corp.test")).unwrap().cfg.zone, "corp.test");
        assert_eq!(route(&zones, &n("corp.test")).unwrap().cfg.zone, "corp.test");
        assert_eq!(route(&zones, &n("other.test")).unwrap().cfg.zone, "test");
        assert!(route(&zones, &n("example.com")).is_none());
        assert!(route(&zones, &n("xcorp.test")).is_some_and(|z| z.cfg.zone == "test"));
    }
}
