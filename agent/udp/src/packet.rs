//! Minimal IPv4 / TCP / UDP header access on byte slices.

use crate::checksum;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// TCP flag bits (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;
pub const TCP_ECE: u8 = 0x40;
pub const TCP_CWR: u8 = 0x80;

/// IPv4 "don't fragment" and "more fragments" bits and the offset mask, in
/// the 16-bit flags/fragment-offset word.
pub const IP_DF: u16 = 0x4000;
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET: u16 = 0x1fff;

#[inline]
pub fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

#[inline]
pub fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

#[inline]
pub fn put16(b: &mut [u8], i: usize, v: u16) {
    b[i..i + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub fn put32(b: &mut [u8], i: usize, v: u32) {
    b[i..i + 4].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub fn addr(b: &[u8], i: usize) -> [u8; 4] {
    [b[i], b[i + 1], b[i + 2], b[i + 3]]
}

/// The basic facts of an IPv4 packet, validated against the slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Info {
    /// Header length in bytes (20..=60).
    pub header_len: usize,
    /// Total length from the header, at most the slice length. A total
    /// length of 0 (what Linux writes for BIG TCP super-packets) is taken
    /// as the slice length.
    pub total_len: usize,
    pub proto: u8,
    pub src: u32,
    pub dst: u32,
}

/// Parses the IPv4 header at the start of `pkt`; `None` unless it is a
/// well-formed IPv4 header that fits in `pkt`.
#[inline]
pub fn ipv4(pkt: &[u8]) -> Option<Ipv4Info> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(pkt[0] & 0x0f) * 4;
    if header_len < 20 || header_len > pkt.len() {
        return None;
    }
    let total_len = match usize::from(be16(pkt, 2)) {
        0 => pkt.len(),
        n if n < header_len || n > pkt.len() => return None,
        n => n,
    };
    Some(Ipv4Info {
        header_len,
        total_len,
        proto: pkt[9],
        src: be32(pkt, 12),
        dst: be32(pkt, 16),
    })
}

/// Recomputes the IPv4 header checksum of `ip` (header length from byte 0).
#[inline]
pub fn fix_ipv4_checksum(ip: &mut [u8]) {
    let hl = usize::from(ip[0] & 0x0f) * 4;
    put16(ip, 10, 0);
    let c = checksum::checksum(&ip[..hl]);
    put16(ip, 10, c);
}

/// Decrements the TTL of the IPv4 packet `ip` and patches its header
/// checksum incrementally (RFC 1624), as flannel's `udp` backend does.
/// Returns `false`, leaving the packet untouched, if the TTL is 0 or 1: the
/// packet must then be dropped.
#[inline]
pub fn decrement_ttl(ip: &mut [u8]) -> bool {
    let ttl = ip[8];
    if ttl <= 1 {
        return false;
    }
    let old = be16(ip, 8);
    ip[8] = ttl - 1;
    let new = be16(ip, 8);
    let c = checksum::update(be16(ip, 10), old, new);
    put16(ip, 10, c);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::tests::reference_sum;

    fn header(ttl: u8) -> Vec<u8> {
        let mut h = vec![
            0x45, 0, 0, 20, 0x12, 0x34, 0x40, 0, ttl, 6, 0, 0, 10, 244, 1, 2, 10, 244, 2, 3,
        ];
        fix_ipv4_checksum(&mut h);
        h
    }

    #[test]
    fn ttl_decrement_patches_the_checksum() {
        for ttl in 2..=255u8 {
            let mut h = header(ttl);
            assert!(decrement_ttl(&mut h));
            assert_eq!(h[8], ttl - 1);
            assert_eq!(
                reference_sum(&h),
                0xffff,
                "ttl {ttl}: header checksum must verify"
            );
            let mut fresh = h.clone();
            fix_ipv4_checksum(&mut fresh);
            assert_eq!(fresh, h, "ttl {ttl}: incremental == recomputed");
        }
    }

    #[test]
    fn ttl_one_or_zero_is_refused() {
        for ttl in [0u8, 1] {
            let mut h = header(ttl);
            let before = h.clone();
            assert!(!decrement_ttl(&mut h));
            assert_eq!(h, before);
        }
    }

    #[test]
    fn ipv4_parse_validates() {
        let mut p = header(64);
        p.extend_from_slice(&[0; 10]);
        put16(&mut p, 2, 30);
        let i = ipv4(&p).unwrap();
        assert_eq!((i.header_len, i.total_len, i.proto), (20, 30, 6));
        assert_eq!(i.dst, u32::from_be_bytes([10, 244, 2, 3]));
        // Trailing bytes beyond the total length are not part of the packet.
        p.extend_from_slice(&[0; 4]);
        assert_eq!(ipv4(&p).unwrap().total_len, 30);
        // Total length longer than the slice, IPv6, short header: rejected.
        put16(&mut p, 2, 100);
        assert_eq!(ipv4(&p), None);
        assert_eq!(ipv4(&[0x60; 40]), None);
        assert_eq!(ipv4(&[0x45; 19]), None);
        let mut bad = header(1);
        bad[0] = 0x44;
        assert_eq!(ipv4(&bad), None);
    }
}
