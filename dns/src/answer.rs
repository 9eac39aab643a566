//! Answering one query: the fast path shared by the UDP workers and TCP connections.
//!
//! [`handle`] parses the query, looks the name up in the precomputed [`Zone`] or the forward
//! cache, and writes the response into the caller's buffer. It never allocates unless the query
//! must go upstream (then it returns [`Outcome::Forward`] with an owned copy of the query).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::acl::Acl;
use crate::cache::{cache_key, Cache, CACHE_KEY_MAX};
use crate::hosts::Hosts;
use crate::metrics::Counters;
use crate::skydns::{SkyAnswer, SkyZone};
use crate::wire::{self, class, flag, put_u16, put_u32, rcode, ty, Edns, Query, Reject, HEADER_LEN, OPT_LEN};
use crate::zone::{parse_dashed_ip, External, Kind, Packed, Zone};

/// Largest DNS message (TCP).
pub const MAX_MESSAGE: usize = 65535;

/// Everything `handle` reads besides the packet.
pub(crate) struct Ctx<'a> {
    pub zone: &'a Zone,
    /// SkyDNS records from etcd ([`crate::skydns`]).
    pub sky: &'a SkyZone,
    /// The hosts file ([`crate::hosts`]), answered before everything else.
    pub hosts: &'a Hosts,
    pub cache: &'a Cache,
    pub acl: &'a Acl,
    pub counters: &'a Counters,
    /// Our EDNS UDP payload size: the cap on UDP responses.
    pub udp_cap: u16,
    /// Round-robin offset for multi-address answers.
    pub rotation: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

/// What to do with a packet.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Send `out[..n]`.
    Reply(usize),
    /// Needs an upstream exchange (general path).
    Forward(Box<ForwardRequest>),
    /// Send nothing.
    Drop,
}

#[derive(Debug)]
pub(crate) enum ForwardKind {
    /// A name outside the cluster zone.
    Recurse,
    /// An ExternalName service: the CNAME chain, then the target resolved upstream.
    External(Arc<External>),
}

/// An owned query that goes upstream.
#[derive(Debug)]
pub(crate) struct ForwardRequest {
    pub raw: Box<[u8]>,
    pub question_end: usize,
    pub id: u16,
    pub flags: u16,
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<Edns>,
    /// Lower-case wire name of the question.
    pub name: Box<[u8]>,
    /// Largest response the client takes.
    pub limit: usize,
    pub kind: ForwardKind,
}

impl ForwardRequest {
    pub fn info(&self) -> QInfo<'_> {
        QInfo { raw: &self.raw, question_end: self.question_end, id: self.id, flags: self.flags, edns: self.edns }
    }

    pub fn dnssec_ok(&self) -> bool {
        self.edns.is_some_and(|e| e.dnssec_ok)
    }
}

/// The parts of a query a response is built from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QInfo<'a> {
    pub raw: &'a [u8],
    pub question_end: usize,
    pub id: u16,
    pub flags: u16,
    pub edns: Option<Edns>,
}

impl<'a> QInfo<'a> {
    pub fn of(q: &Query<'a>) -> Self {
        QInfo { raw: q.raw, question_end: q.question_end, id: q.id, flags: q.flags, edns: q.edns }
    }
}

/// How the header flags of a precomputed or cached message are adjusted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Patch<'a> {
    pub ra: bool,
    /// Round-robin offset (used only for messages with a rotatable answer).
    pub rotation: u32,
    /// TTL fields to decrement by `elapsed` seconds (cached answers).
    pub ttls: &'a [u16],
    pub elapsed: u32,
}

/// Index into the per-type request counters.
pub(crate) fn qtype_index(t: u16) -> usize {
    match t {
        ty::A => 0,
        ty::AAAA => 1,
        ty::SRV => 2,
        ty::PTR => 3,
        ty::TXT => 4,
        ty::CNAME => 5,
        ty::SOA => 6,
        ty::NS => 7,
        ty::MX => 8,
        ty::ANY => 9,
        _ => 10,
    }
}

/// Answers one packet. `out` must be at least 512 bytes (UDP) or [`MAX_MESSAGE`] (TCP).
pub(crate) fn handle(ctx: &Ctx<'_>, raw: &[u8], client: IpAddr, transport: Transport, out: &mut [u8]) -> Outcome {
    let q = match wire::parse_query(raw) {
        Ok(q) => q,
        Err(Reject::Ignore) => {
            ctx.counters.dropped.inc();
            return Outcome::Drop;
        }
        Err(Reject::Error(rc)) => {
            return match wire::write_header_error(raw, rc, out) {
                Some(n) => {
                    ctx.counters.request(10, rc);
                    Outcome::Reply(n)
                }
                None => {
                    ctx.counters.dropped.inc();
                    Outcome::Drop
                }
            };
        }
    };
    let qi = QInfo::of(&q);
    let limit = match transport {
        Transport::Udp => q.udp_limit(ctx.udp_cap),
        Transport::Tcp => MAX_MESSAGE,
    }
    .min(out.len());
    let ti = qtype_index(q.qtype);
    let ra = ctx.acl.allows(client);

    if let Some(e) = q.edns {
        if e.version != 0 {
            let n = write_rcode(&qi, rcode::BADVERS, false, ra, ctx.udp_cap, out);
            ctx.counters.request(ti, rcode::BADVERS);
            return Outcome::Reply(n);
        }
    }
    let patch = Patch { ra, rotation: ctx.rotation, ttls: &[], elapsed: 0 };
    let zone = ctx.zone;

    if q.qclass == class::IN || q.qclass == class::ANY {
        let name = q.name();
        if !ctx.hosts.is_empty() {
            if let Some(p) = ctx.hosts.answer(name, q.qtype) {
                ctx.counters.zone_answers.inc();
                ctx.counters.request(ti, rcode::NOERROR);
                return Outcome::Reply(finalize(p, &qi, patch, limit, ctx.udp_cap, out));
            }
        }
        if let Some(entry) = zone.names.get(name) {
            if let Some(p) = entry.answer(q.qtype) {
                let n = finalize(p, &qi, patch, limit, ctx.udp_cap, out);
                ctx.counters.zone_answers.inc();
                ctx.counters.request(ti, rcode::NOERROR);
                return Outcome::Reply(n);
            }
            match &entry.kind {
                Kind::Zone => {
                    ctx.counters.zone_answers.inc();
                    if q.qtype == ty::AXFR || q.qtype == ty::IXFR {
                        ctx.counters.request(ti, rcode::REFUSED);
                        return Outcome::Reply(write_rcode(&qi, rcode::REFUSED, true, ra, ctx.udp_cap, out));
                    }
                    if let Some(fb) = &entry.fallback {
                        ctx.counters.request(ti, rcode::NOERROR);
                        return Outcome::Reply(finalize(fb, &qi, patch, limit, ctx.udp_cap, out));
                    }
                    let n = write_negative(&qi, q.name().len(), zone, rcode::NOERROR, ra, ctx.udp_cap, out);
                    ctx.counters.request(ti, rcode::NOERROR);
                    return Outcome::Reply(n);
                }
                Kind::External(ext) => {
                    ctx.counters.zone_answers.inc();
                    if ra {
                        return Outcome::Forward(forward_request(&q, limit, ForwardKind::External(ext.clone())));
                    }
                    ctx.counters.request(ti, rcode::NOERROR);
                    return match &entry.fallback {
                        Some(fb) => Outcome::Reply(finalize(fb, &qi, patch, limit, ctx.udp_cap, out)),
                        None => Outcome::Reply(write_rcode(&qi, rcode::SERVFAIL, true, ra, ctx.udp_cap, out)),
                    };
                }
                // Other types at a reverse name go upstream, like CoreDNS's fallthrough.
                Kind::Reverse => {}
            }
        } else if let Some(prefix) = wire::strip_zone(name, &zone.apex) {
            ctx.counters.zone_answers.inc();
            if !zone.synced {
                ctx.counters.request(ti, rcode::SERVFAIL);
                return Outcome::Reply(write_rcode(&qi, rcode::SERVFAIL, false, ra, ctx.udp_cap, out));
            }
            if q.qtype == ty::AXFR || q.qtype == ty::IXFR {
                ctx.counters.request(ti, rcode::REFUSED);
                return Outcome::Reply(write_rcode(&qi, rcode::REFUSED, true, ra, ctx.udp_cap, out));
            }
            let (rc, n) = answer_dynamic(&qi, &name[..prefix], name.len(), q.qtype, zone, ra, ctx.udp_cap, out);
            // Services win; what the cluster zone does not have may be a SkyDNS record.
            if rc == rcode::NXDOMAIN && !ctx.sky.is_empty() {
                if let Some(o) = sky_outcome(ctx, &q, limit, patch, true, out) {
                    return o;
                }
            }
            ctx.counters.request(ti, rc);
            return Outcome::Reply(n);
        }
        if ctx.sky.serves(q.name()) {
            if let Some(o) = sky_outcome(ctx, &q, limit, patch, false, out) {
                return o;
            }
        }
    }

    // Outside the cluster zone: recursion, for allowed clients only.
    if !ra {
        ctx.counters.refused_recursion.inc();
        ctx.counters.request(ti, rcode::REFUSED);
        return Outcome::Reply(write_rcode(&qi, rcode::REFUSED, false, false, ctx.udp_cap, out));
    }
    let mut kbuf = [0u8; CACHE_KEY_MAX];
    let key = cache_key(q.name(), q.qtype, q.qclass, q.dnssec_ok(), q.flags & flag::CD != 0, &mut kbuf);
    if let Some((entry, elapsed)) = ctx.cache.get(key, Instant::now()) {
        ctx.counters.cache_hits.inc();
        let p = Patch { ra: true, rotation: 0, ttls: &entry.ttl_offsets, elapsed };
        let n = finalize(&entry.packed, &qi, p, limit, ctx.udp_cap, out);
        ctx.counters.request(ti, entry.rcode);
        return Outcome::Reply(n);
    }
    ctx.counters.cache_misses.inc();
    Outcome::Forward(forward_request(&q, limit, ForwardKind::Recurse))
}

/// The answer of the SkyDNS records. `fallthrough`: the cluster zone has no such name, and
/// keeps its own NXDOMAIN when the records have none either (or are not listed yet).
fn sky_outcome(ctx: &Ctx<'_>, q: &Query<'_>, limit: usize, patch: Patch<'_>, fallthrough: bool, out: &mut [u8]) -> Option<Outcome> {
    let qi = QInfo::of(q);
    let ti = qtype_index(q.qtype);
    let reply = |p: &Packed, out: &mut [u8]| {
        let n = finalize(p, &qi, patch, limit, ctx.udp_cap, out);
        ctx.counters.zone_answers.inc();
        ctx.counters.request(ti, wire::get_u16(out, 2).unwrap_or(0) & flag::RCODE);
        Outcome::Reply(n)
    };
    if q.qtype == ty::AXFR || q.qtype == ty::IXFR {
        ctx.counters.request(ti, rcode::REFUSED);
        return Some(Outcome::Reply(write_rcode(&qi, rcode::REFUSED, true, patch.ra, ctx.udp_cap, out)));
    }
    match ctx.sky.answer(q.name(), q.qtype, ctx.zone)? {
        SkyAnswer::Reply(p) => Some(reply(&p, out)),
        SkyAnswer::Forward { ext, fallback } => {
            if patch.ra {
                ctx.counters.zone_answers.inc();
                return Some(Outcome::Forward(forward_request(q, limit, ForwardKind::External(ext))));
            }
            Some(reply(&fallback, out))
        }
        SkyAnswer::NameError | SkyAnswer::ServFail if fallthrough => None,
        SkyAnswer::NameError => ctx.sky.name_error(q.name(), q.qtype).map(|p| reply(&p, out)),
        SkyAnswer::ServFail => {
            ctx.counters.request(ti, rcode::SERVFAIL);
            Some(Outcome::Reply(write_rcode(&qi, rcode::SERVFAIL, false, patch.ra, ctx.udp_cap, out)))
        }
    }
}

fn forward_request(q: &Query<'_>, limit: usize, kind: ForwardKind) -> Box<ForwardRequest> {
    Box::new(ForwardRequest {
        raw: q.raw[..q.question_end].into(),
        question_end: q.question_end,
        id: q.id,
        flags: q.flags,
        qtype: q.qtype,
        qclass: q.qclass,
        edns: q.edns,
        name: q.name().into(),
        limit,
        kind,
    })
}

/// Names under the zone that are not in the table: pod names, `<ns>.pod`, or NXDOMAIN.
#[allow(clippy::too_many_arguments)]
fn answer_dynamic(
    qi: &QInfo<'_>,
    prefix: &[u8],
    name_len: usize,
    qtype: u16,
    zone: &Zone,
    ra: bool,
    udp_cap: u16,
    out: &mut [u8],
) -> (u16, usize) {
    let mut labels: [&[u8]; 4] = [&[]; 4];
    let mut count = 0;
    for l in wire::labels(prefix) {
        if count == 4 {
            count += 1;
            break;
        }
        labels[count] = l;
        count += 1;
    }
    if count == 2 && labels[1] == b"pod" {
        // `<namespace>.pod.<zone>`: exists (namespaces are not checked, like "pods insecure").
        return (rcode::NOERROR, write_negative(qi, name_len, zone, rcode::NOERROR, ra, udp_cap, out));
    }
    if count == 3 && labels[2] == b"pod" {
        if let Some(ip) = parse_dashed_ip(labels[0]) {
            let n = match (ip, qtype) {
                (IpAddr::V4(v4), ty::A) => write_address(qi, &v4.octets(), ty::A, zone.ttl, ra, udp_cap, out),
                (IpAddr::V6(v6), ty::AAAA) => write_address(qi, &v6.octets(), ty::AAAA, zone.ttl, ra, udp_cap, out),
                _ => write_negative(qi, name_len, zone, rcode::NOERROR, ra, udp_cap, out),
            };
            return (rcode::NOERROR, n);
        }
    }
    (rcode::NXDOMAIN, write_negative(qi, name_len, zone, rcode::NXDOMAIN, ra, udp_cap, out))
}

/// Copies a precomputed (or cached) message for this query: ID and RD/CD/RA patched, the
/// client's question copied over (to keep its letter case), TTLs decremented, answers rotated,
/// OPT appended; the additional section, then everything, dropped (TC) if over `limit`.
pub(crate) fn finalize(p: &Packed, qi: &QInfo<'_>, patch: Patch<'_>, limit: usize, udp_cap: u16, out: &mut [u8]) -> usize {
    let opt = if qi.edns.is_some() { OPT_LEN } else { 0 };
    let limit = limit.min(out.len());
    let qend = qi.question_end;
    // The template's question must have the query's length (same name, lower-cased).
    if p.qend != qend || p.bytes.len() < qend {
        return write_rcode(qi, rcode::SERVFAIL, false, patch.ra, udp_cap, out);
    }
    let (body, drop_additional, truncated) = if p.bytes.len() + opt <= limit {
        (p.bytes.len(), false, false)
    } else if p.no_additional_len + opt <= limit {
        (p.no_additional_len, true, false)
    } else {
        (qend, true, true)
    };
    out[..body].copy_from_slice(&p.bytes[..body]);
    out[HEADER_LEN..qend].copy_from_slice(&qi.raw[HEADER_LEN..qend]);
    put_u16(out, 0, qi.id);
    let tflags = wire::get_u16(&p.bytes, 2).unwrap_or(flag::QR);
    let mut flags = (tflags & (flag::QR | flag::OPCODE | flag::AA | flag::AD | flag::RCODE)) | (qi.flags & (flag::RD | flag::CD));
    if patch.ra {
        flags |= flag::RA;
    }
    if flags & flag::AD != 0 && qi.flags & flag::AD == 0 && !qi.edns.is_some_and(|e| e.dnssec_ok) {
        flags &= !flag::AD;
    }
    if truncated {
        flags |= flag::TC;
        out[6..10].fill(0);
    }
    put_u16(out, 2, flags);
    if drop_additional {
        put_u16(out, 10, 0);
    }
    if !truncated {
        if let Some(r) = p.rotate {
            let k = patch.rotation as usize % r.count;
            let end = r.start + r.count * r.rr_len;
            if k != 0 && end <= body {
                out[r.start..end].rotate_left(k * r.rr_len);
            }
        }
        if patch.elapsed > 0 {
            for &at in patch.ttls {
                let at = at as usize;
                if at + 4 <= body {
                    let t = wire::get_u32(out, at).unwrap_or(0);
                    put_u32(out, at, t.saturating_sub(patch.elapsed));
                }
            }
        }
    }
    if let Some(e) = qi.edns {
        wire::write_opt(out, body, udp_cap, 0, e.dnssec_ok);
        let ar = wire::get_u16(out, 10).unwrap_or(0);
        put_u16(out, 10, ar.wrapping_add(1));
    }
    body + opt
}

/// Header + the client's question, for building responses in place. Returns the offset after
/// the question.
fn write_head(qi: &QInfo<'_>, flags: u16, an: u16, ns: u16, out: &mut [u8]) -> usize {
    let qend = qi.question_end;
    put_u16(out, 0, qi.id);
    put_u16(out, 2, flags | (qi.flags & (flag::RD | flag::CD)));
    put_u16(out, 4, 1);
    put_u16(out, 6, an);
    put_u16(out, 8, ns);
    put_u16(out, 10, 0);
    out[HEADER_LEN..qend].copy_from_slice(&qi.raw[HEADER_LEN..qend]);
    qend
}

fn push_opt(qi: &QInfo<'_>, at: usize, ext_rcode: u8, udp_cap: u16, out: &mut [u8]) -> usize {
    match qi.edns {
        Some(e) => {
            wire::write_opt(out, at, udp_cap, ext_rcode, e.dnssec_ok);
            put_u16(out, 10, 1);
            at + OPT_LEN
        }
        None => at,
    }
}

/// A response with no records: SERVFAIL, REFUSED, BADVERS...
pub(crate) fn write_rcode(qi: &QInfo<'_>, rc: u16, aa: bool, ra: bool, udp_cap: u16, out: &mut [u8]) -> usize {
    let mut flags = flag::QR | (rc & flag::RCODE);
    if aa {
        flags |= flag::AA;
    }
    if ra {
        flags |= flag::RA;
    }
    let at = write_head(qi, flags, 0, 0, out);
    push_opt(qi, at, (rc >> 4) as u8, udp_cap, out)
}

/// NXDOMAIN or NODATA with the zone's SOA in the authority section. The SOA's owner (the
/// apex) is a pointer into the question name, which ends with it.
pub(crate) fn write_negative(qi: &QInfo<'_>, name_len: usize, zone: &Zone, rc: u16, ra: bool, udp_cap: u16, out: &mut [u8]) -> usize {
    let mut flags = flag::QR | flag::AA | (rc & flag::RCODE);
    if ra {
        flags |= flag::RA;
    }
    if name_len < zone.apex.len() {
        return write_rcode(qi, rcode::SERVFAIL, false, ra, udp_cap, out);
    }
    let mut at = write_head(qi, flags, 0, 1, out);
    let apex_at = HEADER_LEN + name_len - zone.apex.len();
    let apex_ptr = 0xc000 | apex_at as u16;
    put_u16(out, at, apex_ptr);
    put_u16(out, at + 2, ty::SOA);
    put_u16(out, at + 4, class::IN);
    put_u32(out, at + 6, zone.negative_ttl);
    at += 10;
    let rdlen_at = at;
    at += 2;
    out[at..at + 7].copy_from_slice(b"\x02ns\x03dns");
    put_u16(out, at + 7, apex_ptr);
    at += 9;
    out[at..at + 11].copy_from_slice(b"\x0ahostmaster");
    put_u16(out, at + 11, apex_ptr);
    at += 13;
    for v in [zone.serial, 7200, 1800, 86400, zone.negative_ttl] {
        put_u32(out, at, v);
        at += 4;
    }
    put_u16(out, rdlen_at, (at - rdlen_at - 2) as u16);
    push_opt(qi, at, 0, udp_cap, out)
}

/// One A or AAAA record for the question name (pod names).
fn write_address(qi: &QInfo<'_>, addr: &[u8], t: u16, ttl: u32, ra: bool, udp_cap: u16, out: &mut [u8]) -> usize {
    let mut flags = flag::QR | flag::AA;
    if ra {
        flags |= flag::RA;
    }
    let mut at = write_head(qi, flags, 1, 0, out);
    put_u16(out, at, 0xc00c);
    put_u16(out, at + 2, t);
    put_u16(out, at + 4, class::IN);
    put_u32(out, at + 6, ttl);
    put_u16(out, at + 10, addr.len() as u16);
    at += 12;
    out[at..at + addr.len()].copy_from_slice(addr);
    at += addr.len();
    push_opt(qi, at, 0, udp_cap, out)
}
