//! The forward cache: upstream responses keyed by (name, type, class, DO, CD), kept for their
//! TTL (positive) or the SOA's negative TTL (RFC 2308), bounded in entries (LRU per shard).
//!
//! Entries are stored ready to send: ID 0, no OPT record, TTL offsets recorded so a hit only
//! copies the message and decrements the TTLs by the time spent in the cache.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use lru::LruCache;

use crate::wire::{self, flag, rcode, ty, Section, MAX_NAME_LEN};
use crate::zone::{packed_from, Packed};

/// Longest cache key: a name plus type, class and a flag byte.
pub(crate) const CACHE_KEY_MAX: usize = MAX_NAME_LEN + 5;

/// Builds the cache key into `buf`.
pub(crate) fn cache_key<'b>(
    name: &[u8],
    qtype: u16,
    qclass: u16,
    dnssec_ok: bool,
    cd: bool,
    buf: &'b mut [u8; CACHE_KEY_MAX],
) -> &'b [u8] {
    let n = name.len().min(MAX_NAME_LEN);
    buf[..n].copy_from_slice(&name[..n]);
    buf[n..n + 2].copy_from_slice(&qtype.to_be_bytes());
    buf[n + 2..n + 4].copy_from_slice(&qclass.to_be_bytes());
    buf[n + 4] = u8::from(dnssec_ok) | (u8::from(cd) << 1);
    &buf[..n + 5]
}

/// Bounds on how long answers are kept, whatever upstream says.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CachePolicy {
    pub max_ttl: u32,
    pub max_negative_ttl: u32,
}

impl Default for CachePolicy {
    fn default() -> Self {
        // CoreDNS's cache plugin defaults.
        CachePolicy { max_ttl: 3600, max_negative_ttl: 1800 }
    }
}

/// An upstream response ready to be sent again.
#[derive(Debug)]
pub(crate) struct CacheEntry {
    pub packed: Packed,
    pub ttl_offsets: Box<[u16]>,
    pub stored: Instant,
    /// Seconds the entry may be served (0: not cacheable).
    pub ttl: u32,
    pub rcode: u16,
}

type Shard = Mutex<LruCache<Box<[u8]>, Arc<CacheEntry>>>;

#[derive(Debug)]
pub(crate) struct Cache {
    shards: Box<[Shard]>,
    /// Seconds past its TTL an entry is kept to be served when every upstream fails (serve
    /// stale, RFC 8767); 0: expired entries are dropped.
    stale: u32,
}

impl Cache {
    /// A cache of at most `capacity` entries (0 disables caching).
    pub fn new(capacity: usize) -> Self {
        let nshards = if capacity >= 1024 { 16 } else { 1 };
        let per = capacity.div_ceil(nshards);
        let shards = match NonZeroUsize::new(per) {
            Some(per) => (0..nshards).map(|_| Mutex::new(LruCache::new(per))).collect(),
            None => Vec::new().into_boxed_slice(),
        };
        Cache { shards, stale: 0 }
    }

    /// Keeps expired entries `stale` seconds longer, for [`Cache::get_stale`].
    pub fn with_stale(mut self, stale: u32) -> Self {
        self.stale = stale;
        self
    }

    fn shard(&self, key: &[u8]) -> Option<&Shard> {
        if self.shards.is_empty() {
            return None;
        }
        // FNV-1a: cheap and good enough to spread names over shards.
        let mut h: u32 = 0x811c_9dc5;
        for &b in key {
            h = (h ^ b as u32).wrapping_mul(0x0100_0193);
        }
        Some(&self.shards[h as usize % self.shards.len()])
    }

    /// A live entry and the whole seconds it has spent in the cache.
    pub fn get(&self, key: &[u8], now: Instant) -> Option<(Arc<CacheEntry>, u32)> {
        let shard = self.shard(key)?;
        let mut g = shard.lock().unwrap_or_else(|e| e.into_inner());
        let e = g.get(key)?;
        let elapsed = now.saturating_duration_since(e.stored).as_secs();
        if elapsed >= u64::from(e.ttl) {
            if elapsed >= u64::from(e.ttl) + u64::from(self.stale) {
                g.pop(key);
            }
            return None;
        }
        Some((e.clone(), elapsed as u32))
    }

    /// An expired entry still within the stale bound (to answer when every upstream failed),
    /// with the seconds it has spent in the cache (more than any of its TTLs: sent with TTL 0).
    pub fn get_stale(&self, key: &[u8], now: Instant) -> Option<(Arc<CacheEntry>, u32)> {
        let shard = self.shard(key)?;
        let g = shard.lock().unwrap_or_else(|e| e.into_inner());
        let e = g.peek(key)?;
        let elapsed = now.saturating_duration_since(e.stored).as_secs();
        (elapsed < u64::from(e.ttl) + u64::from(self.stale)).then(|| (e.clone(), elapsed.min(u64::from(u32::MAX)) as u32))
    }

    pub fn insert(&self, key: &[u8], entry: Arc<CacheEntry>) {
        if entry.ttl == 0 {
            return;
        }
        if let Some(shard) = self.shard(key) {
            shard.lock().unwrap_or_else(|e| e.into_inner()).put(key.into(), entry);
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len()).sum()
    }
}

/// Checks an upstream response against the question we asked and turns it into a cache entry
/// (its `ttl` is 0 when it must not be cached). `None`: the response is not an answer to
/// this question, or is malformed.
pub(crate) fn entry_from_response(
    resp: &[u8],
    name: &[u8],
    qtype: u16,
    qclass: u16,
    policy: CachePolicy,
    now: Instant,
) -> Option<CacheEntry> {
    entry_inner(resp, name, qtype, qclass, policy, now, true)
}

fn entry_inner(
    resp: &[u8],
    name: &[u8],
    qtype: u16,
    qclass: u16,
    policy: CachePolicy,
    now: Instant,
    may_reencode: bool,
) -> Option<CacheEntry> {
    let flags = wire::get_u16(resp, 2)?;
    if flags & flag::QR == 0 || wire::get_u16(resp, 4)? != 1 {
        return None;
    }
    let mut nbuf = [0u8; MAX_NAME_LEN];
    let n = wire::read_name_lower(resp, wire::HEADER_LEN, &mut nbuf)?;
    if nbuf[..n] != *name {
        return None;
    }
    let qpos = wire::skip_name(resp, wire::HEADER_LEN)?;
    if wire::get_u16(resp, qpos)? != qtype || wire::get_u16(resp, qpos + 2)? != qclass {
        return None;
    }
    let qend = qpos + 4;
    let (an, ns, ar) = (wire::get_u16(resp, 6)?, wire::get_u16(resp, 8)?, wire::get_u16(resp, 10)?);
    let mut it = wire::RrIter::new(resp, qend, an, ns, ar);
    let mut rrs = Vec::with_capacity(an as usize + ns as usize + ar as usize);
    for rr in &mut it {
        rrs.push(rr.ok()?);
    }
    let end = it.pos();
    let opts: Vec<usize> = (0..rrs.len()).filter(|&i| rrs[i].rtype == ty::OPT).collect();
    if opts.len() > 1 {
        return None;
    }
    let mut bytes = match opts.first() {
        Some(&i) if i + 1 == rrs.len() => {
            let mut b = resp[..rrs[i].name_start].to_vec();
            wire::put_u16(&mut b, 10, ar - 1);
            rrs.pop();
            b
        }
        Some(_) if may_reencode => {
            // OPT in the middle of the additional section: let hickory re-encode without it.
            let mut m = hickory_proto::op::Message::from_vec(resp).ok()?;
            *m.extensions_mut() = None;
            let b = m.to_vec().ok()?;
            return entry_inner(&b, name, qtype, qclass, policy, now, false);
        }
        Some(_) => return None,
        None => resp[..end].to_vec(),
    };
    let rc = flags & flag::RCODE;
    let positive = rc == rcode::NOERROR && rrs.iter().any(|r| r.section == Section::Answer);
    let negative = rc == rcode::NXDOMAIN || (rc == rcode::NOERROR && !positive);
    let cap = if positive { policy.max_ttl } else { policy.max_negative_ttl };
    let mut ttl_offsets = Vec::with_capacity(rrs.len());
    let mut min_answer = u32::MAX;
    let mut neg_ttl: Option<u32> = None;
    for r in &rrs {
        let t = wire::get_u32(&bytes, r.ttl_at)?.min(cap);
        wire::put_u32(&mut bytes, r.ttl_at, t);
        ttl_offsets.push(u16::try_from(r.ttl_at).ok()?);
        if r.section == Section::Answer {
            min_answer = min_answer.min(t);
        }
        if r.section == Section::Authority && r.rtype == ty::SOA && r.end >= r.rdata_start + 20 {
            let minimum = wire::get_u32(&bytes, r.end - 4)?;
            neg_ttl = Some(t.min(minimum));
        }
    }
    let ttl = if positive {
        min_answer
    } else if negative {
        neg_ttl.unwrap_or(0).min(policy.max_negative_ttl)
    } else {
        0
    };
    wire::put_u16(&mut bytes, 0, 0);
    wire::put_u16(&mut bytes, 2, flags & (flag::QR | flag::OPCODE | flag::AD | flag::RCODE));
    Some(CacheEntry { packed: packed_from(bytes), ttl_offsets: ttl_offsets.into_boxed_slice(), stored: now, ttl, rcode: rc })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use std::time::Duration;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn response(rc: ResponseCode, answers: Vec<Record>, authority: Vec<Record>, edns: bool) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(77).set_message_type(MessageType::Response).set_response_code(rc).set_recursion_available(true);
        m.add_query(Query::query(name("WWW.example.com."), RecordType::A));
        m.add_answers(answers);
        m.add_name_servers(authority);
        if edns {
            m.set_edns(Edns::new());
        }
        m.to_vec().unwrap()
    }

    fn soa(ttl: u32, minimum: u32) -> Record {
        Record::from_rdata(
            name("example.com."),
            ttl,
            RData::SOA(SOA::new(name("ns.example.com."), name("h.example.com."), 1, 2, 3, 4, minimum)),
        )
    }

    fn wire(s: &str) -> Vec<u8> {
        wire::name_from_str(s).unwrap()
    }

    #[test]
    fn positive_ttl_is_the_smallest_answer_ttl_and_opt_is_stripped() {
        let a = |ip: [u8; 4], ttl| Record::from_rdata(name("www.example.com."), ttl, RData::A(A(ip.into())));
        let resp = response(ResponseCode::NoError, vec![a([1, 2, 3, 4], 300), a([1, 2, 3, 5], 60)], vec![], true);
        let e = entry_from_response(&resp, &wire("www.example.com"), 1, 1, CachePolicy::default(), Instant::now()).unwrap();
        assert_eq!(e.ttl, 60);
        assert_eq!(e.rcode, 0);
        assert_eq!(e.ttl_offsets.len(), 2);
        let m = Message::from_vec(&e.packed.bytes).unwrap();
        assert!(m.extensions().is_none());
        assert_eq!(m.id(), 0);
        assert_eq!(m.answers().len(), 2);
    }

    #[test]
    fn ttls_are_capped() {
        let a = Record::from_rdata(name("www.example.com."), 86400 * 7, RData::A(A([1, 2, 3, 4].into())));
        let resp = response(ResponseCode::NoError, vec![a], vec![], false);
        let e = entry_from_response(&resp, &wire("www.example.com"), 1, 1, CachePolicy::default(), Instant::now()).unwrap();
        assert_eq!(e.ttl, 3600);
        assert_eq!(Message::from_vec(&e.packed.bytes).unwrap().answers()[0].ttl(), 3600);
    }

    #[test]
    fn negative_ttl_comes_from_the_soa() {
        let resp = response(ResponseCode::NXDomain, vec![], vec![soa(300, 60)], false);
        let e = entry_from_response(&resp, &wire("www.example.com"), 1, 1, CachePolicy::default(), Instant::now()).unwrap();
        assert_eq!((e.ttl, e.rcode), (60, rcode::NXDOMAIN));
        let resp = response(ResponseCode::NoError, vec![], vec![soa(20, 60)], false);
        let e = entry_from_response(&resp, &wire("www.example.com"), 1, 1, CachePolicy::default(), Instant::now()).unwrap();
        assert_eq!((e.ttl, e.rcode), (20, rcode::NOERROR));
        // Without an SOA a negative answer is not cached; nor is SERVFAIL.
        let resp = response(ResponseCode::NXDomain, vec![], vec![], false);
        assert_eq!(entry_from_response(&resp, &wire("www.example.com"), 1, 1, CachePolicy::default(), Instant::now()).unwrap().ttl, 0);
        let resp = response(ResponseCode::ServFail, vec![], vec![soa(300, 60)], false);
        assert_eq!(entry_from_response(&resp, &wire("www.example.com"), 1, 1, CachePolicy::default(), Instant::now()).unwrap().ttl, 0);
    }

    #[test]
    fn mismatched_question_is_rejected() {
        let resp = response(ResponseCode::NoError, vec![], vec![], false);
        assert!(entry_from_response(&resp, &wire("other.example.com"), 1, 1, CachePolicy::default(), Instant::now()).is_none());
        assert!(entry_from_response(&resp, &wire("www.example.com"), 28, 1, CachePolicy::default(), Instant::now()).is_none());
        assert!(entry_from_response(&resp[..resp.len() - 1], &wire("www.example.com"), 1, 1, CachePolicy::default(), Instant::now()).is_none());
    }

    #[test]
    fn entries_expire_and_capacity_is_bounded() {
        let a = Record::from_rdata(name("www.example.com."), 2, RData::A(A([1, 2, 3, 4].into())));
        let resp = response(ResponseCode::NoError, vec![a], vec![], false);
        let t0 = Instant::now();
        let e = Arc::new(entry_from_response(&resp, &wire("www.example.com"), 1, 1, CachePolicy::default(), t0).unwrap());
        let cache = Cache::new(3);
        let mut kb = [0u8; CACHE_KEY_MAX];
        let key = cache_key(&wire("www.example.com"), 1, 1, false, false, &mut kb).to_vec();
        cache.insert(&key, e.clone());
        assert_eq!(cache.get(&key, t0 + Duration::from_millis(1500)).map(|(_, s)| s), Some(1));
        assert!(cache.get(&key, t0 + Duration::from_secs(2)).is_none());
        assert_eq!(cache.len(), 0);
        for i in 0..10u8 {
            cache.insert(&[i], e.clone());
        }
        assert_eq!(cache.len(), 3);
        assert!(Cache::new(0).get(&key, t0).is_none());
    }

    #[test]
    fn stale_entries_are_kept_for_the_bound_and_only_served_on_request() {
        let a = Record::from_rdata(name("www.example.com."), 2, RData::A(A([1, 2, 3, 4].into())));
        let resp = response(ResponseCode::NoError, vec![a], vec![], false);
        let t0 = Instant::now();
        let e = Arc::new(entry_from_response(&resp, &wire("www.example.com"), 1, 1, CachePolicy::default(), t0).unwrap());
        let cache = Cache::new(3).with_stale(10);
        cache.insert(b"k", e.clone());
        assert!(cache.get_stale(b"k", t0 + Duration::from_secs(1)).is_some(), "a live entry is stale-servable too");
        assert!(cache.get(b"k", t0 + Duration::from_secs(5)).is_none(), "expired: not a hit");
        assert_eq!(cache.get_stale(b"k", t0 + Duration::from_secs(11)).map(|(_, s)| s), Some(11));
        assert!(cache.get_stale(b"k", t0 + Duration::from_secs(12)).is_none(), "past TTL + bound");
        assert!(cache.get(b"k", t0 + Duration::from_secs(12)).is_none());
        assert_eq!(cache.len(), 0, "dropped once past the bound");
        let plain = Cache::new(3);
        plain.insert(b"k", e);
        assert!(plain.get(b"k", t0 + Duration::from_secs(3)).is_none());
        assert!(plain.get_stale(b"k", t0 + Duration::from_secs(3)).is_none(), "without serve-stale, expired entries go");
    }

    #[test]
    fn dnssec_ok_and_cd_are_part_of_the_key() {
        let mut a = [0u8; CACHE_KEY_MAX];
        let mut b = [0u8; CACHE_KEY_MAX];
        let n = wire("x.y");
        assert_ne!(cache_key(&n, 1, 1, false, false, &mut a), cache_key(&n, 1, 1, true, false, &mut b));
        assert_ne!(cache_key(&n, 1, 1, false, false, &mut a), cache_key(&n, 1, 1, false, true, &mut b));
        assert_ne!(cache_key(&n, 1, 1, false, false, &mut a), cache_key(&n, 28, 1, false, false, &mut b));
    }
}
