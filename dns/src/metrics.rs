//! Counters: plain atomics, one block per UDP worker (no shared cache lines on the fast path),
//! summed into a [`DnsMetrics`] snapshot on demand.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::wire::rcode;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Query types the request counters distinguish (index = [`crate::answer::qtype_index`]).
pub const QTYPE_NAMES: [&str; 11] = ["A", "AAAA", "SRV", "PTR", "TXT", "CNAME", "SOA", "NS", "MX", "ANY", "other"];
/// Response codes the request counters distinguish.
pub const RCODE_NAMES: [&str; 7] = ["NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "other"];

fn rcode_index(rc: u16) -> usize {
    match rc {
        rcode::NOERROR..=rcode::REFUSED => rc as usize,
        _ => 6,
    }
}

/// One worker's (or the general path's) counters.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Counters {
    requests: [[Counter; 7]; 11],
    /// Answered from the cluster zone (including negative answers).
    pub zone_answers: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    /// Packets not answered at all (too short, responses, unparsable).
    pub dropped: Counter,
    /// Responses sent with TC set.
    pub truncated: Counter,
    /// Non-cluster queries from clients not allowed recursion (answered REFUSED).
    pub refused_recursion: Counter,
    /// Forwards refused because the in-flight bound was reached (answered SERVFAIL).
    pub forward_rejected: Counter,
}

impl Counters {
    #[inline]
    pub fn request(&self, qtype_index: usize, rc: u16) {
        self.requests[qtype_index.min(10)][rcode_index(rc)].inc();
    }
}

/// Upper bounds (seconds) of the forward latency histogram buckets.
pub const LATENCY_BOUNDS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

#[derive(Debug, Default)]
pub(crate) struct Histogram {
    buckets: [Counter; 13],
    sum_nanos: Counter,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BOUNDS.iter().position(|b| s <= *b).unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].inc();
        self.sum_nanos.add(d.as_nanos().min(u64::MAX as u128) as u64);
    }
}

/// Upstream exchange statistics.
#[derive(Debug, Default)]
pub(crate) struct ForwardStats {
    /// Upstream exchanges that produced a usable response.
    pub forwards: Counter,
    /// Forwarded queries answered SERVFAIL because no upstream answered in time.
    pub failures: Counter,
    /// Retries over TCP after a truncated UDP response.
    pub tcp_fallbacks: Counter,
    /// Exchanges with one upstream that failed (timeout, error), each try counted.
    pub upstream_errors: Counter,
    /// Answers served stale (expired, within the bound) because every upstream failed.
    pub stale_answers: Counter,
    pub latency: Histogram,
}

/// A snapshot of the server's counters (all monotonic except `cache_entries` and
/// `forwards_in_flight`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DnsMetrics {
    /// Responses sent, by query type and response code (pairs with a non-zero count).
    pub requests: Vec<RequestCount>,
    /// Queries answered from the cluster zone (positive and negative).
    pub zone_answers: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Entries currently in the forward cache (gauge).
    pub cache_entries: u64,
    /// Upstream exchanges that produced a response.
    pub forwards: u64,
    /// Forwarded queries answered SERVFAIL because no upstream answered.
    pub forward_failures: u64,
    /// Forwards refused (SERVFAIL) because the in-flight bound was reached.
    pub forward_rejected: u64,
    /// Forwards in flight now (gauge).
    pub forwards_in_flight: u64,
    pub tcp_fallbacks: u64,
    /// Exchanges with one upstream that failed (each try of each forward).
    pub upstream_errors: u64,
    /// Answers served from the stale cache because every upstream failed.
    pub stale_answers: u64,
    /// Queries for other names from clients outside the recursion ACL (REFUSED).
    pub refused_recursion: u64,
    /// Packets dropped without an answer.
    pub dropped: u64,
    /// Responses sent truncated (TC).
    pub truncated: u64,
    pub tcp_connections: u64,
    /// Latency of upstream exchanges.
    pub forward_latency: LatencyHistogram,
    /// SOA serial of the zone being served.
    pub zone_serial: u32,
}

/// Responses of one (type, rcode) pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestCount {
    pub qtype: &'static str,
    pub rcode: &'static str,
    pub count: u64,
}

/// A latency histogram: `counts[i]` observations fell in `(bounds[i-1], bounds[i]]`, the last
/// count is above the last bound (not cumulative; Prometheus wants the running sum).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LatencyHistogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl DnsMetrics {
    /// The count for one (type, rcode) pair, e.g. `("A", "NXDOMAIN")`.
    pub fn requests_of(&self, qtype: &str, rcode: &str) -> u64 {
        self.requests.iter().filter(|r| r.qtype == qtype && r.rcode == rcode).map(|r| r.count).sum()
    }

    /// All responses sent.
    pub fn total_requests(&self) -> u64 {
        self.requests.iter().map(|r| r.count).sum()
    }
}

/// Sums counter blocks into a snapshot (the caller fills the gauges).
pub(crate) fn snapshot<'a>(blocks: impl Iterator<Item = &'a Counters>, fwd: &ForwardStats) -> DnsMetrics {
    let mut req = [[0u64; 7]; 11];
    let mut m = DnsMetrics::default();
    for c in blocks {
        for (t, row) in c.requests.iter().enumerate() {
            for (r, v) in row.iter().enumerate() {
                req[t][r] += v.get();
            }
        }
        m.zone_answers += c.zone_answers.get();
        m.cache_hits += c.cache_hits.get();
        m.cache_misses += c.cache_misses.get();
        m.dropped += c.dropped.get();
        m.truncated += c.truncated.get();
        m.refused_recursion += c.refused_recursion.get();
        m.forward_rejected += c.forward_rejected.get();
    }
    for (t, row) in req.iter().enumerate() {
        for (r, &count) in row.iter().enumerate() {
            if count > 0 {
                m.requests.push(RequestCount { qtype: QTYPE_NAMES[t], rcode: RCODE_NAMES[r], count });
            }
        }
    }
    m.forwards = fwd.forwards.get();
    m.forward_failures = fwd.failures.get();
    m.tcp_fallbacks = fwd.tcp_fallbacks.get();
    m.upstream_errors = fwd.upstream_errors.get();
    m.stale_answers = fwd.stale_answers.get();
    let counts: Vec<u64> = fwd.latency.buckets.iter().map(Counter::get).collect();
    m.forward_latency = LatencyHistogram {
        bounds: LATENCY_BOUNDS.to_vec(),
        count: counts.iter().sum(),
        counts,
        sum_seconds: fwd.latency.sum_nanos.get() as f64 / 1e9,
    };
    m
}
