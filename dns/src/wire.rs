//! DNS wire format: the allocation-free parsing and writing the fast path needs.
//!
//! Only what a server must understand of a *query* is parsed here (header, one question, the
//! OPT record), plus a bounds-checked walk over resource records used on upstream responses.
//! Everything works on byte slices; every index is checked, so a malformed packet is an `Err`,
//! never a panic (the fuzz target and `tests::random_packets_never_panic` hold us to that).

/// Length of the fixed DNS header.
pub const HEADER_LEN: usize = 12;
/// Longest name in wire format, root label included (RFC 1035 §2.3.4).
pub const MAX_NAME_LEN: usize = 255;
/// Size of the OPT record this server appends (root name, no options).
pub const OPT_LEN: usize = 11;

/// Record types the server treats specially.
pub mod ty {
    pub const A: u16 = 1;
    pub const NS: u16 = 2;
    pub const CNAME: u16 = 5;
    pub const SOA: u16 = 6;
    pub const PTR: u16 = 12;
    pub const MX: u16 = 15;
    pub const TXT: u16 = 16;
    pub const AAAA: u16 = 28;
    pub const SRV: u16 = 33;
    pub const OPT: u16 = 41;
    pub const IXFR: u16 = 251;
    pub const AXFR: u16 = 252;
    pub const ANY: u16 = 255;
}

/// Classes.
pub mod class {
    pub const IN: u16 = 1;
    pub const ANY: u16 = 255;
}

/// Response codes (BADVERS is an extended rcode carried partly in OPT).
pub mod rcode {
    pub const NOERROR: u16 = 0;
    pub const FORMERR: u16 = 1;
    pub const SERVFAIL: u16 = 2;
    pub const NXDOMAIN: u16 = 3;
    pub const NOTIMP: u16 = 4;
    pub const REFUSED: u16 = 5;
    pub const BADVERS: u16 = 16;
}

/// Header flag bits (second 16-bit word of the header).
pub mod flag {
    pub const QR: u16 = 0x8000;
    pub const OPCODE: u16 = 0x7800;
    pub const AA: u16 = 0x0400;
    pub const TC: u16 = 0x0200;
    pub const RD: u16 = 0x0100;
    pub const RA: u16 = 0x0080;
    pub const AD: u16 = 0x0020;
    pub const CD: u16 = 0x0010;
    pub const RCODE: u16 = 0x000f;
}

#[inline]
pub fn get_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

#[inline]
pub fn get_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

#[inline]
pub fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// The EDNS(0) parameters of a query (RFC 6891).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// Requestor's UDP payload size (values below 512 count as 512).
    pub udp_size: u16,
    pub version: u8,
    /// The DO bit (RFC 3225): copied into the response.
    pub dnssec_ok: bool,
}

/// Why a packet is not answered normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Not worth an answer: shorter than a header, or a response (QR set).
    Ignore,
    /// Answer with a bare header carrying this rcode (FORMERR, NOTIMP).
    Error(u16),
}

/// A parsed query: one question, its name lower-cased in wire format, and EDNS.
#[derive(Clone)]
pub struct Query<'a> {
    pub raw: &'a [u8],
    pub id: u16,
    pub flags: u16,
    pub qtype: u16,
    pub qclass: u16,
    /// Offset of the end of the question (header + name + type + class).
    pub question_end: usize,
    pub edns: Option<Edns>,
    name: [u8; MAX_NAME_LEN],
    name_len: usize,
}

impl std::fmt::Debug for Query<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Query")
            .field("id", &self.id)
            .field("name", &name_to_string(self.name()))
            .field("qtype", &self.qtype)
            .field("qclass", &self.qclass)
            .field("edns", &self.edns)
            .finish()
    }
}

impl<'a> Query<'a> {
    /// The question name, lower-cased, in wire format (length-prefixed labels, root included).
    #[inline]
    pub fn name(&self) -> &[u8] {
        &self.name[..self.name_len]
    }

    /// The question as the client sent it (original case): header excluded.
    #[inline]
    pub fn question(&self) -> &'a [u8] {
        &self.raw[HEADER_LEN..self.question_end]
    }

    #[inline]
    pub fn rd(&self) -> bool {
        self.flags & flag::RD != 0
    }

    #[inline]
    pub fn dnssec_ok(&self) -> bool {
        self.edns.is_some_and(|e| e.dnssec_ok)
    }

    /// Largest response this client accepts over UDP, given our own cap.
    #[inline]
    pub fn udp_limit(&self, cap: u16) -> usize {
        match self.edns {
            Some(e) => e.udp_size.clamp(512, cap.max(512)) as usize,
            None => 512,
        }
    }
}

/// Parses a query: header, exactly one question (no compression in it), and the other sections
/// far enough to find and validate the OPT record.
pub fn parse_query(raw: &[u8]) -> Result<Query<'_>, Reject> {
    if raw.len() < HEADER_LEN {
        return Err(Reject::Ignore);
    }
    let id = get_u16(raw, 0).ok_or(Reject::Ignore)?;
    let flags = get_u16(raw, 2).ok_or(Reject::Ignore)?;
    if flags & flag::QR != 0 {
        return Err(Reject::Ignore);
    }
    if flags & flag::OPCODE != 0 {
        return Err(Reject::Error(rcode::NOTIMP));
    }
    let counts = [
        get_u16(raw, 4).unwrap_or(0),
        get_u16(raw, 6).unwrap_or(0),
        get_u16(raw, 8).unwrap_or(0),
        get_u16(raw, 10).unwrap_or(0),
    ];
    if counts[0] != 1 {
        return Err(Reject::Error(rcode::FORMERR));
    }
    let formerr = Reject::Error(rcode::FORMERR);
    let mut name = [0u8; MAX_NAME_LEN];
    let mut n = 0usize;
    let mut pos = HEADER_LEN;
    loop {
        let len = *raw.get(pos).ok_or(formerr)? as usize;
        if len == 0 {
            if n + 1 > MAX_NAME_LEN {
                return Err(formerr);
            }
            name[n] = 0;
            n += 1;
            pos += 1;
            break;
        }
        if len > 63 {
            // Compression pointers in a question, or reserved label types.
            return Err(formerr);
        }
        if n + 1 + len + 1 > MAX_NAME_LEN {
            return Err(formerr);
        }
        let label = raw.get(pos + 1..pos + 1 + len).ok_or(formerr)?;
        name[n] = len as u8;
        for (d, s) in name[n + 1..n + 1 + len].iter_mut().zip(label) {
            *d = s.to_ascii_lowercase();
        }
        n += 1 + len;
        pos += 1 + len;
    }
    let qtype = get_u16(raw, pos).ok_or(formerr)?;
    let qclass = get_u16(raw, pos + 2).ok_or(formerr)?;
    let question_end = pos + 4;

    let mut edns = None;
    let mut it = RrIter::new(raw, question_end, counts[1], counts[2], counts[3]);
    for rr in &mut it {
        let rr = rr.map_err(|_| formerr)?;
        if rr.rtype == ty::OPT {
            if rr.section != Section::Additional || edns.is_some() || raw.get(rr.name_start) != Some(&0) {
                return Err(formerr);
            }
            let ttl = get_u32(raw, rr.ttl_at).ok_or(formerr)?;
            edns = Some(Edns {
                udp_size: rr.class.max(512),
                version: (ttl >> 16) as u8,
                dnssec_ok: ttl & 0x8000 != 0,
            });
        }
    }
    Ok(Query { raw, id, flags, qtype, qclass, question_end, edns, name, name_len: n })
}

/// Message sections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Answer,
    Authority,
    Additional,
}

/// One resource record located in a message.
#[derive(Debug, Clone, Copy)]
pub struct Rr {
    pub section: Section,
    /// Offset of the owner name (possibly a compression pointer).
    pub name_start: usize,
    pub rtype: u16,
    pub class: u16,
    /// Offset of the 32-bit TTL field.
    pub ttl_at: usize,
    pub rdata_start: usize,
    pub end: usize,
}

/// Skips a (possibly compressed) name starting at `pos`; returns the offset after it.
pub fn skip_name(raw: &[u8], mut pos: usize) -> Option<usize> {
    let mut total = 0usize;
    loop {
        let len = *raw.get(pos)? as usize;
        match len & 0xc0 {
            0x00 if len == 0 => return Some(pos + 1),
            0x00 => {
                total += len + 1;
                if total > MAX_NAME_LEN {
                    return None;
                }
                pos += 1 + len;
            }
            0xc0 => {
                raw.get(pos + 1)?;
                return Some(pos + 2);
            }
            _ => return None,
        }
    }
}

/// Walks the answer, authority and additional sections, bounds-checking everything.
pub struct RrIter<'a> {
    raw: &'a [u8],
    pos: usize,
    left: [u16; 3],
    failed: bool,
}

impl<'a> RrIter<'a> {
    pub fn new(raw: &'a [u8], start: usize, an: u16, ns: u16, ar: u16) -> Self {
        RrIter { raw, pos: start, left: [an, ns, ar], failed: false }
    }

    /// Offset just after the last record returned.
    pub fn pos(&self) -> usize {
        self.pos
    }
}

impl Iterator for RrIter<'_> {
    type Item = Result<Rr, ()>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let section = if self.left[0] > 0 {
            self.left[0] -= 1;
            Section::Answer
        } else if self.left[1] > 0 {
            self.left[1] -= 1;
            Section::Authority
        } else if self.left[2] > 0 {
            self.left[2] -= 1;
            Section::Additional
        } else {
            return None;
        };
        let raw = self.raw;
        let parsed = (|| {
            let name_start = self.pos;
            let p = skip_name(raw, name_start)?;
            let rtype = get_u16(raw, p)?;
            let class = get_u16(raw, p + 2)?;
            let rdlen = get_u16(raw, p + 8)? as usize;
            let rdata_start = p + 10;
            let end = rdata_start + rdlen;
            if end > raw.len() {
                return None;
            }
            Some(Rr { section, name_start, rtype, class, ttl_at: p + 4, rdata_start, end })
        })();
        match parsed {
            Some(rr) => {
                self.pos = rr.end;
                Some(Ok(rr))
            }
            None => {
                self.failed = true;
                Some(Err(()))
            }
        }
    }
}

/// Compares two uncompressed wire names ASCII-case-insensitively.
pub fn name_eq_ignore_case(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.eq_ignore_ascii_case(y))
}

/// Reads a possibly compressed name at `pos` into `out` (lower-cased, uncompressed).
/// Returns the uncompressed length. Follows at most 32 pointers, backwards only.
pub fn read_name_lower(raw: &[u8], mut pos: usize, out: &mut [u8; MAX_NAME_LEN]) -> Option<usize> {
    let mut n = 0usize;
    let mut hops = 0;
    loop {
        let len = *raw.get(pos)? as usize;
        match len & 0xc0 {
            0x00 if len == 0 => {
                if n >= MAX_NAME_LEN {
                    return None;
                }
                out[n] = 0;
                return Some(n + 1);
            }
            0x00 => {
                if n + 1 + len + 1 > MAX_NAME_LEN {
                    return None;
                }
                let label = raw.get(pos + 1..pos + 1 + len)?;
                out[n] = len as u8;
                for (d, s) in out[n + 1..n + 1 + len].iter_mut().zip(label) {
                    *d = s.to_ascii_lowercase();
                }
                n += 1 + len;
                pos += 1 + len;
            }
            0xc0 => {
                let target = ((len & 0x3f) << 8) | *raw.get(pos + 1)? as usize;
                hops += 1;
                if hops > 32 || target >= pos {
                    return None;
                }
                pos = target;
            }
            _ => return None,
        }
    }
}

/// Presentation form of a wire name (`www.example.com.`), for logs and tests.
pub fn name_to_string(wire: &[u8]) -> String {
    let mut s = String::new();
    let mut pos = 0;
    while let Some(&len) = wire.get(pos) {
        if len == 0 {
            break;
        }
        let label = wire.get(pos + 1..pos + 1 + len as usize).unwrap_or(&[]);
        s.push_str(&String::from_utf8_lossy(label));
        s.push('.');
        pos += 1 + len as usize;
    }
    if s.is_empty() {
        s.push('.');
    }
    s
}

/// Wire form of a presentation name (lower-cased); `None` if a label is empty or too long.
pub fn name_from_str(s: &str) -> Option<Vec<u8>> {
    let s = s.strip_suffix('.').unwrap_or(s);
    let mut out = Vec::with_capacity(s.len() + 2);
    if !s.is_empty() {
        for label in s.split('.') {
            if label.is_empty() || label.len() > 63 {
                return None;
            }
            out.push(label.len() as u8);
            out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
    }
    out.push(0);
    (out.len() <= MAX_NAME_LEN).then_some(out)
}

/// The labels of a wire name, first to last (root excluded).
pub fn labels(wire: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        let len = *wire.get(pos)? as usize;
        if len == 0 {
            return None;
        }
        let l = wire.get(pos + 1..pos + 1 + len)?;
        pos += 1 + len;
        Some(l)
    })
}

/// If `name` is `zone` or below it (both uncompressed lower-case wire names), the number of
/// bytes of `name` before the zone suffix (0 for the apex); the suffix must start at a label
/// boundary.
pub fn strip_zone(name: &[u8], zone: &[u8]) -> Option<usize> {
    if name.len() < zone.len() || !name.ends_with(zone) {
        return None;
    }
    let want = name.len() - zone.len();
    let mut pos = 0;
    while pos < want {
        pos += 1 + name[pos] as usize;
    }
    (pos == want).then_some(want)
}

/// Writes an 11-byte OPT record at `at`.
#[inline]
pub fn write_opt(buf: &mut [u8], at: usize, udp_size: u16, ext_rcode: u8, dnssec_ok: bool) {
    let b = &mut buf[at..at + OPT_LEN];
    b[0] = 0;
    b[1..3].copy_from_slice(&ty::OPT.to_be_bytes());
    b[3..5].copy_from_slice(&udp_size.to_be_bytes());
    b[5] = ext_rcode;
    b[6] = 0;
    b[7] = if dnssec_ok { 0x80 } else { 0 };
    b[8] = 0;
    b[9] = 0;
    b[10] = 0;
}

/// Writes a header-only error response to `raw` (FORMERR, NOTIMP, ...) into `out`.
/// Returns the length, or `None` if `raw` is not even a header or is itself a response.
pub fn write_header_error(raw: &[u8], rc: u16, out: &mut [u8]) -> Option<usize> {
    let id = get_u16(raw, 0)?;
    let qflags = get_u16(raw, 2)?;
    if qflags & flag::QR != 0 || out.len() < HEADER_LEN {
        return None;
    }
    let flags = flag::QR | (qflags & (flag::OPCODE | flag::RD | flag::CD)) | (rc & flag::RCODE);
    put_u16(out, 0, id);
    put_u16(out, 2, flags);
    out[4..12].fill(0);
    Some(HEADER_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16, edns: Option<(u16, bool)>) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, if edns.is_some() { 1 } else { 0 }];
        for l in name.trim_end_matches('.').split('.').filter(|l| !l.is_empty()) {
            m.push(l.len() as u8);
            m.extend_from_slice(l.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        if let Some((size, dnssec_ok)) = edns {
            let mut opt = [0u8; OPT_LEN];
            write_opt(&mut opt, 0, size, 0, dnssec_ok);
            m.extend_from_slice(&opt);
        }
        m
    }

    #[test]
    fn parses_question_lowercase_and_keeps_raw_case() {
        let raw = query("WeB.Default.SVC.cluster.local", ty::A, None);
        let q = parse_query(&raw).unwrap();
        assert_eq!(q.id, 0x1234);
        assert!(q.rd());
        assert_eq!(name_to_string(q.name()), "web.default.svc.cluster.local.");
        assert_eq!(&q.question()[1..4], b"WeB");
        assert_eq!(q.qtype, ty::A);
        assert_eq!(q.qclass, class::IN);
        assert_eq!(q.edns, None);
        assert_eq!(q.udp_limit(1232), 512);
    }

    #[test]
    fn parses_edns() {
        let raw = query("example.com", ty::AAAA, Some((4096, true)));
        let q = parse_query(&raw).unwrap();
        assert_eq!(q.edns, Some(Edns { udp_size: 4096, version: 0, dnssec_ok: true }));
        assert!(q.dnssec_ok());
        assert_eq!(q.udp_limit(1232), 1232);
        let raw = query("example.com", ty::AAAA, Some((100, false)));
        assert_eq!(parse_query(&raw).unwrap().udp_limit(1232), 512);
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(parse_query(&[0; 5]).unwrap_err(), Reject::Ignore);
        let mut r = query("a.b", ty::A, None);
        r[2] |= 0x80; // a response
        assert_eq!(parse_query(&r).unwrap_err(), Reject::Ignore);
        let mut r = query("a.b", ty::A, None);
        r[2] |= 0x28; // opcode 5 (UPDATE)
        assert_eq!(parse_query(&r).unwrap_err(), Reject::Error(rcode::NOTIMP));
        let mut r = query("a.b", ty::A, None);
        r[5] = 2; // two questions
        assert_eq!(parse_query(&r).unwrap_err(), Reject::Error(rcode::FORMERR));
        let r = query("a.b", ty::A, None);
        assert_eq!(parse_query(&r[..r.len() - 1]).unwrap_err(), Reject::Error(rcode::FORMERR));
        // A compression pointer in the question.
        let mut r = query("a.b", ty::A, None);
        r[12] = 0xc0;
        assert_eq!(parse_query(&r).unwrap_err(), Reject::Error(rcode::FORMERR));
        // Two OPT records.
        let mut r = query("a.b", ty::A, Some((1232, false)));
        let mut opt = [0u8; OPT_LEN];
        write_opt(&mut opt, 0, 1232, 0, false);
        r.extend_from_slice(&opt);
        r[11] = 2;
        assert_eq!(parse_query(&r).unwrap_err(), Reject::Error(rcode::FORMERR));
        // Additional count larger than what is there.
        let mut r = query("a.b", ty::A, Some((1232, false)));
        r[11] = 3;
        assert_eq!(parse_query(&r).unwrap_err(), Reject::Error(rcode::FORMERR));
    }

    #[test]
    fn name_too_long_is_formerr() {
        let long = vec!["a".repeat(63); 4].join(".");
        assert_eq!(parse_query(&query(&long, ty::A, None)).unwrap_err(), Reject::Error(rcode::FORMERR));
        let ok = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61)].join(".");
        assert_eq!(parse_query(&query(&ok, ty::A, None)).unwrap().name().len(), 255);
    }

    #[test]
    fn zone_stripping_respects_label_boundaries() {
        let zone = name_from_str("cluster.local").unwrap();
        assert_eq!(strip_zone(&name_from_str("cluster.local.").unwrap(), &zone), Some(0));
        assert_eq!(strip_zone(&name_from_str("a.svc.cluster.local").unwrap(), &zone), Some(6));
        assert_eq!(strip_zone(&name_from_str("xcluster.local").unwrap(), &zone), None);
        assert_eq!(strip_zone(&name_from_str("local").unwrap(), &zone), None);
        assert_eq!(labels(&name_from_str("a.bc").unwrap()).collect::<Vec<_>>(), [b"a" as &[u8], b"bc"]);
    }

    #[test]
    fn reads_compressed_names() {
        // "example.com" at 12, then a pointer name "www" + ptr(12).
        let mut m = vec![0u8; 12];
        m.extend_from_slice(b"\x07example\x03com\x00");
        let at = m.len();
        m.extend_from_slice(b"\x03WWW\xc0\x0c");
        let mut out = [0u8; MAX_NAME_LEN];
        let n = read_name_lower(&m, at, &mut out).unwrap();
        assert_eq!(name_to_string(&out[..n]), "www.example.com.");
        assert_eq!(skip_name(&m, at), Some(m.len()));
        // A pointer loop is refused.
        let looped = [0u8, 0, 0xc0, 0x02];
        assert_eq!(read_name_lower(&looped, 2, &mut out), None);
    }

    #[test]
    fn header_error_keeps_id_and_rd() {
        let raw = query("a.b", ty::A, None);
        let mut out = [0u8; 64];
        let n = write_header_error(&raw, rcode::FORMERR, &mut out).unwrap();
        assert_eq!(n, 12);
        assert_eq!(&out[..2], &[0x12, 0x34]);
        assert_eq!(get_u16(&out, 2), Some(flag::QR | flag::RD | rcode::FORMERR));
    }
}
