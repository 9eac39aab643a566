//! The general path: names outside the cluster zone go to the node's upstream resolvers.
//!
//! Each forward sends our own query (random ID, random source port, EDNS with our payload size
//! and the client's DO bit) over UDP, retries over TCP when the answer is truncated, and tries
//! the next upstream on a timeout or error. The response is cached (see [`crate::cache`]) and
//! rewritten for the client. A bound on forwards in flight keeps a dead upstream from piling up
//! work: past it, clients get SERVFAIL at once.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::Message;
use hickory_proto::rr::Name;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::answer::{finalize, qtype_index, write_rcode, ForwardKind, ForwardRequest, Patch};
use crate::cache::{cache_key, entry_from_response, Cache, CacheEntry, CachePolicy, CACHE_KEY_MAX};
use crate::metrics::{Counters, ForwardStats};
use crate::stub::{self, ForwardZone, StubZone};
use crate::wire::{self, flag, rcode, HEADER_LEN, OPT_LEN};
use crate::zone::pack;

/// Our EDNS payload size toward upstreams (the DNS flag day 2020 value).
const UPSTREAM_PAYLOAD: u16 = 1232;

#[derive(Debug)]
pub(crate) struct Forwarder {
    upstreams: ArcSwap<Vec<SocketAddr>>,
    timeout: Duration,
    pub cache: Arc<Cache>,
    policy: CachePolicy,
    inflight: AtomicUsize,
    max_inflight: usize,
    next: AtomicUsize,
    udp_cap: u16,
    pub stats: ForwardStats,
    /// Counters of responses produced here (forwarded answers) and on TCP.
    pub counters: Counters,
    /// Zones forwarded to upstreams of their own ([`crate::stub`]).
    stubs: Box<[StubZone]>,
}

#[derive(Debug)]
enum ExchangeError {
    Io(io::Error),
    Timeout,
    BadResponse,
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeError::Io(e) => write!(f, "{e}"),
            ExchangeError::Timeout => f.write_str("timed out"),
            ExchangeError::BadResponse => f.write_str("bad response"),
        }
    }
}

impl From<io::Error> for ExchangeError {
    fn from(e: io::Error) -> Self {
        ExchangeError::Io(e)
    }
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>, stubs: Vec<ForwardZone>, timeout: Duration, cache: Arc<Cache>, max_inflight: usize, udp_cap: u16) -> Self {
        Forwarder {
            upstreams: ArcSwap::from_pointee(upstreams),
            timeout,
            cache,
            policy: CachePolicy::default(),
            inflight: AtomicUsize::new(0),
            max_inflight,
            next: AtomicUsize::new(0),
            udp_cap,
            stats: ForwardStats::default(),
            counters: Counters::default(),
            stubs: stubs.into_iter().map(StubZone::new).collect(),
        }
    }

    /// Probes the stub zones' down upstreams (`. IN NS`) every `health_check` (the shortest of
    /// the zones'); an answer brings one back. Runs forever; nothing to do without stub zones.
    pub async fn health_checks(self: Arc<Self>) {
        let Some(every) = self.stubs.iter().filter(|z| z.cfg.max_fails > 0).map(|z| z.cfg.health_check).min() else { return };
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for z in self.stubs.iter() {
                for up in z.down() {
                    let id: u16 = rand::random();
                    let probe = build_query(id, &[0], crate::wire::ty::NS, crate::wire::class::IN, false, false);
                    let ok = if z.cfg.force_tcp { exchange_tcp(up, &probe, id, self.timeout).await } else { exchange_udp(up, &probe, id, self.timeout).await }.is_ok();
                    if ok {
                        tracing::info!(upstream = %up, zone = %z.cfg.zone, "stub zone upstream answers again");
                        z.report(up, true);
                    }
                }
            }
        }
    }

    pub fn set_upstreams(&self, upstreams: Vec<SocketAddr>) {
        self.upstreams.store(Arc::new(upstreams));
    }

    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.upstreams.load().to_vec()
    }

    /// Takes an in-flight slot; false when the bound is reached.
    pub fn try_begin(&self) -> bool {
        self.inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max_inflight).then_some(n + 1))
            .is_ok()
    }

    /// Releases a slot taken by [`Forwarder::try_begin`].
    pub fn end(&self) {
        self.inflight.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Answers a request that needs upstream data; writes the response into `out` (at least
    /// [`crate::answer::MAX_MESSAGE`] bytes for TCP, `req.limit` for UDP) and returns its length.
    pub async fn answer(&self, req: &ForwardRequest, out: &mut [u8]) -> usize {
        let qi = req.info();
        let cd = req.flags & flag::CD != 0;
        let n = match &req.kind {
            ForwardKind::Recurse => match self.resolve(&req.name, req.qtype, req.qclass, req.dnssec_ok(), cd).await {
                Some((entry, elapsed)) => {
                    let p = Patch { ra: true, rotation: 0, ttls: &entry.ttl_offsets, elapsed };
                    finalize(&entry.packed, &qi, p, req.limit, self.udp_cap, out)
                }
                None => write_rcode(&qi, rcode::SERVFAIL, false, true, self.udp_cap, out),
            },
            ForwardKind::External(ext) => {
                match self.resolve(&ext.target, req.qtype, req.qclass, req.dnssec_ok(), cd).await {
                    Some((entry, elapsed)) => match chase(req, &ext.chain, &entry, elapsed) {
                        Some(p) => {
                            let patch = Patch { ra: true, rotation: 0, ttls: &[], elapsed: 0 };
                            finalize(&p, &qi, patch, req.limit, self.udp_cap, out)
                        }
                        None => write_rcode(&qi, rcode::SERVFAIL, false, true, self.udp_cap, out),
                    },
                    None => write_rcode(&qi, rcode::SERVFAIL, false, true, self.udp_cap, out),
                }
            }
        };
        let rc = wire::get_u16(out, 2).unwrap_or(0) & flag::RCODE;
        self.counters.request(qtype_index(req.qtype), rc);
        if wire::get_u16(out, 2).unwrap_or(0) & flag::TC != 0 {
            self.counters.truncated.inc();
        }
        n
    }

    /// The upstream answer for a question, from the cache or the network, with the seconds it
    /// spent in the cache. `None` when no upstream answered.
    async fn resolve(&self, name: &[u8], qtype: u16, qclass: u16, dnssec_ok: bool, cd: bool) -> Option<(Arc<CacheEntry>, u32)> {
        let mut kbuf = [0u8; CACHE_KEY_MAX];
        let key = cache_key(name, qtype, qclass, dnssec_ok, cd, &mut kbuf);
        if let Some(hit) = self.cache.get(key, Instant::now()) {
            return Some(hit);
        }
        // A stub zone's upstreams in its order, else the node's, each query starting one
        // further (and at least two tries, so that one lost datagram is not a failure).
        let stub = stub::route(&self.stubs, name);
        let order: Vec<SocketAddr> = match stub {
            Some(z) => z.order(),
            None => {
                let upstreams = self.upstreams.load_full();
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..if upstreams.is_empty() { 0 } else { upstreams.len().max(2) }).map(|i| upstreams[(start + i) % upstreams.len()]).collect()
            }
        };
        if order.is_empty() {
            self.stats.failures.inc();
            return None;
        }
        let force_tcp = stub.is_some_and(|z| z.cfg.force_tcp);
        let id: u16 = rand::random();
        let query = build_query(id, name, qtype, qclass, dnssec_ok, cd);
        for up in order {
            let t0 = Instant::now();
            let resp = match force_tcp {
                true => exchange_tcp(up, &query, id, self.timeout).await,
                false => match exchange_udp(up, &query, id, self.timeout).await {
                    Ok(r) if r.get(2).is_some_and(|f| f & 0x02 != 0) => {
                        self.stats.tcp_fallbacks.inc();
                        exchange_tcp(up, &query, id, self.timeout).await
                    }
                    other => other,
                },
            };
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(upstream = %up, error = %e, name = %wire::name_to_string(name), "upstream exchange failed");
                    self.stats.upstream_errors.inc();
                    if let Some(z) = stub {
                        z.report(up, false);
                    }
                    continue;
                }
            };
            if let Some(z) = stub {
                z.report(up, true);
            }
            let Some(entry) = entry_from_response(&resp, name, qtype, qclass, self.policy, Instant::now()) else {
                tracing::debug!(upstream = %up, "upstream response does not match the question");
                continue;
            };
            self.stats.latency.observe(t0.elapsed());
            self.stats.forwards.inc();
            let entry = Arc::new(entry);
            self.cache.insert(key, entry.clone());
            return Some((entry, 0));
        }
        // Every upstream failed: an expired answer within the stale bound beats SERVFAIL.
        if let Some(stale) = self.cache.get_stale(key, Instant::now()) {
            self.stats.stale_answers.inc();
            tracing::debug!(name = %wire::name_to_string(name), "every upstream failed; answering from the stale cache");
            return Some(stale);
        }
        self.stats.failures.inc();
        None
    }
}

/// Our query to an upstream: RD, the client's CD, EDNS with the client's DO bit.
fn build_query(id: u16, name: &[u8], qtype: u16, qclass: u16, dnssec_ok: bool, cd: bool) -> Vec<u8> {
    let mut q = Vec::with_capacity(HEADER_LEN + name.len() + 4 + OPT_LEN);
    q.extend_from_slice(&id.to_be_bytes());
    let flags = flag::RD | if cd { flag::CD } else { 0 };
    q.extend_from_slice(&flags.to_be_bytes());
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]);
    q.extend_from_slice(name);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&qclass.to_be_bytes());
    let at = q.len();
    q.resize(at + OPT_LEN, 0);
    wire::write_opt(&mut q, at, UPSTREAM_PAYLOAD, 0, dnssec_ok);
    q
}

fn is_reply_to(resp: &[u8], id: u16) -> bool {
    wire::get_u16(resp, 0) == Some(id) && resp.get(2).is_some_and(|f| f & 0x80 != 0)
}

async fn exchange_udp(up: SocketAddr, query: &[u8], id: u16, timeout: Duration) -> Result<Vec<u8>, ExchangeError> {
    let bind: SocketAddr = if up.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(up).await?;
    sock.send(query).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            Err(_) => return Err(ExchangeError::Timeout),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(n)) if is_reply_to(&buf[..n], id) => {
                buf.truncate(n);
                return Ok(buf);
            }
            // A stray or spoofed datagram: keep waiting for ours.
            Ok(Ok(_)) => continue,
        }
    }
}

async fn exchange_tcp(up: SocketAddr, query: &[u8], id: u16, timeout: Duration) -> Result<Vec<u8>, ExchangeError> {
    let work = async {
        let mut s = TcpStream::connect(up).await?;
        s.set_nodelay(true)?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&(query.len() as u16).to_be_bytes());
        framed.extend_from_slice(query);
        s.write_all(&framed).await?;
        let len = s.read_u16().await? as usize;
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).await?;
        if !is_reply_to(&buf, id) {
            return Err(ExchangeError::BadResponse);
        }
        Ok(buf)
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| ExchangeError::Timeout)?
}

/// An ExternalName answer: the CNAME chain, then the upstream answer for the target.
fn chase(req: &ForwardRequest, chain: &[hickory_proto::rr::Record], entry: &CacheEntry, elapsed: u32) -> Option<crate::zone::Packed> {
    let up = Message::from_vec(&entry.packed.bytes).ok()?;
    let owner = Name::from_labels(wire::labels(&req.name)).ok()?;
    let age = |r: &hickory_proto::rr::Record| {
        let mut r = r.clone();
        r.set_ttl(r.ttl().saturating_sub(elapsed));
        r
    };
    let mut answers: Vec<_> = chain.to_vec();
    answers.extend(up.answers().iter().map(age));
    let authority: Vec<_> = if up.answers().is_empty() { up.name_servers().iter().map(age).collect() } else { Vec::new() };
    pack(&owner, req.qtype, &answers, &authority, &[], up.response_code())
}
