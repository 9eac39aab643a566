//! Outbound: turning what the TUN device hands us into complete inner IPv4
//! packets, ready to be sent as UDP payloads.
//!
//! With `TUN_F_CSUM|TUN_F_TSO4|TUN_F_USO4` the kernel hands us
//! * plain packets, possibly with a partial checksum (`F_NEEDS_CSUM`):
//!   [`complete_checksum`] finishes it;
//! * TCP super-packets (up to 64 KiB, `GSO_TCPV4`) and UDP super-packets
//!   (`GSO_UDP_L4`): [`segment`] writes one fixed-up header per segment
//!   into a header arena and describes each segment as (header, payload
//!   slice of the super-packet). The payload is never copied: the sender
//!   hands the kernel an iovec per header and per payload, and one
//!   `sendmsg` with `UDP_SEGMENT` = header + `gso_size` turns the whole
//!   thing into equal-size datagrams, each a complete inner packet.

use crate::checksum;
use crate::packet::{
    self, be16, be32, put16, put32, PROTO_TCP, PROTO_UDP, TCP_CWR, TCP_FIN, TCP_PSH,
};
use crate::vnet::{VirtioNetHdr, GSO_NONE, GSO_TCPV4, GSO_UDP_L4};

/// Why a packet from the TUN device could not be turned into segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GsoError {
    #[error("not a well-formed IPv4 packet")]
    NotIpv4,
    #[error("malformed {0} header")]
    BadTransport(&'static str),
    #[error("checksum offsets start {start} offset {offset} outside the {len}-byte packet")]
    BadChecksumOffsets { start: u16, offset: u16, len: usize },
    #[error("GSO type {0:#x} is not supported")]
    Unsupported(u8),
    #[error("GSO super-packet with gso_size 0")]
    ZeroGsoSize,
    #[error("GSO type {gso_type:#x} does not match IP protocol {proto}")]
    ProtoMismatch { gso_type: u8, proto: u8 },
}

/// One output segment: its headers in the arena, its payload in the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    /// Offset of the segment's IP+transport headers in the header arena.
    pub hdr_off: usize,
    /// Length of those headers (the same for every segment of a packet).
    pub hdr_len: usize,
    /// Offset of the segment's payload in the super-packet.
    pub payload_off: usize,
    pub payload_len: usize,
}

impl Seg {
    pub fn len(&self) -> usize {
        self.hdr_len + self.payload_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Finishes a partial checksum (`F_NEEDS_CSUM`): sums `pkt[start..]` (the
/// checksum field already holds the pseudo-header sum) and stores the
/// result at `start + offset`.
pub fn complete_checksum(pkt: &mut [u8], start: u16, offset: u16) -> Result<(), GsoError> {
    let (s, o) = (usize::from(start), usize::from(offset));
    if s + o + 2 > pkt.len() {
        return Err(GsoError::BadChecksumOffsets {
            start,
            offset,
            len: pkt.len(),
        });
    }
    let mut c = checksum::finish(checksum::sum(&pkt[s..], 0));
    // A UDP checksum of 0 means "none"; RFC 768 sends all ones instead.
    // (For TCP the transmitted 0xffff and 0 are equivalent.)
    if c == 0 && o == 6 {
        c = 0xffff;
    }
    put16(pkt, s + o, c);
    Ok(())
}

/// Splits the super-packet `pkt` described by `vh` into segments.
///
/// `pkt` is the IPv4 packet (after the virtio header). Headers are appended
/// to `hdrs` and one [`Seg`] per segment to `segs` (neither is cleared: a
/// batch accumulates many packets). Every segment header gets: IP total
/// length, IP id (incremented per segment, as Linux TSO does), IP checksum;
/// for TCP the sequence number, FIN/PSH only on the last segment, CWR only
/// on the first, and a full TCP checksum (pseudo-header, header, payload);
/// for UDP the length and a full UDP checksum.
///
/// A `GSO_NONE` packet becomes a single segment (its checksum completed if
/// `F_NEEDS_CSUM`), but callers normally send those without going through
/// here. Returns the number of segments.
pub fn segment(
    pkt: &[u8],
    vh: &VirtioNetHdr,
    hdrs: &mut Vec<u8>,
    segs: &mut Vec<Seg>,
) -> Result<usize, GsoError> {
    let ip = packet::ipv4(pkt).ok_or(GsoError::NotIpv4)?;
    let pkt = &pkt[..ip.total_len];
    let iphl = ip.header_len;
    let kind = vh.gso_kind();
    let (l4hl, proto) = match kind {
        GSO_TCPV4 => {
            if pkt.len() < iphl + 20 {
                return Err(GsoError::BadTransport("TCP"));
            }
            let doff = usize::from(pkt[iphl + 12] >> 4) * 4;
            if doff < 20 || iphl + doff > pkt.len() {
                return Err(GsoError::BadTransport("TCP"));
            }
            (doff, PROTO_TCP)
        }
        GSO_UDP_L4 => {
            if pkt.len() < iphl + 8 {
                return Err(GsoError::BadTransport("UDP"));
            }
            (8, PROTO_UDP)
        }
        GSO_NONE => {
            // One segment: the packet as is, checksum completed.
            let start = hdrs.len();
            hdrs.extend_from_slice(pkt);
            if vh.needs_csum() {
                let r = complete_checksum(&mut hdrs[start..], vh.csum_start, vh.csum_offset);
                if let Err(e) = r {
                    hdrs.truncate(start);
                    return Err(e);
                }
            }
            segs.push(Seg {
                hdr_off: start,
                hdr_len: pkt.len(),
                payload_off: pkt.len(),
                payload_len: 0,
            });
            return Ok(1);
        }
        other => return Err(GsoError::Unsupported(other)),
    };
    if ip.proto != proto {
        return Err(GsoError::ProtoMismatch {
            gso_type: vh.gso_type,
            proto: ip.proto,
        });
    }
    let gso = usize::from(vh.gso_size);
    if gso == 0 {
        return Err(GsoError::ZeroGsoSize);
    }
    let hl = iphl + l4hl;
    let payload = &pkt[hl..];
    let n = payload.len().div_ceil(gso).max(1);
    let base_id = be16(pkt, 4);
    let src = packet::addr(pkt, 12);
    let dst = packet::addr(pkt, 16);
    let (base_seq, flags) = if proto == PROTO_TCP {
        (be32(pkt, iphl + 4), pkt[iphl + 13])
    } else {
        (0, 0)
    };

    hdrs.reserve(n * hl);
    segs.reserve(n);
    for i in 0..n {
        let off = i * gso;
        let plen = gso.min(payload.len() - off);
        let h0 = hdrs.len();
        hdrs.extend_from_slice(&pkt[..hl]);
        let h = &mut hdrs[h0..h0 + hl];
        put16(h, 2, (hl + plen) as u16);
        put16(h, 4, base_id.wrapping_add(i as u16));
        packet::fix_ipv4_checksum(h);
        let body = &payload[off..off + plen];
        let l4len = (l4hl + plen) as u16;
        let pseudo = checksum::pseudo_header(src, dst, proto, l4len);
        if proto == PROTO_TCP {
            let t = iphl;
            put32(h, t + 4, base_seq.wrapping_add(off as u32));
            let mut f = flags;
            if i + 1 < n {
                f &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                f &= !TCP_CWR;
            }
            h[t + 13] = f;
            put16(h, t + 16, 0);
            let c = checksum::finish(checksum::sum(body, checksum::sum(&h[t..], pseudo)));
            put16(h, t + 16, c);
        } else {
            let t = iphl;
            put16(h, t + 4, l4len);
            put16(h, t + 6, 0);
            let mut c = checksum::finish(checksum::sum(body, checksum::sum(&h[t..], pseudo)));
            if c == 0 {
                c = 0xffff;
            }
            put16(h, t + 6, c);
        }
        segs.push(Seg {
            hdr_off: h0,
            hdr_len: hl,
            payload_off: hl + off,
            payload_len: plen,
        });
    }
    Ok(n)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::checksum::tests::reference_sum;
    use crate::packet::{TCP_ACK, TCP_SYN};
    use crate::vnet::{F_NEEDS_CSUM, GSO_ECN};

    /// A TCP/IPv4 packet with `payload` bytes of pattern data, 12 bytes of
    /// options (NOP NOP timestamp), the checksum field holding the
    /// pseudo-header sum as the kernel leaves it for `CHECKSUM_PARTIAL`.
    pub(crate) fn tcp_packet(payload: usize, seq: u32, flags: u8, id: u16) -> Vec<u8> {
        let iphl = 20;
        let tcphl = 32;
        let total = iphl + tcphl + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[1] = 0x02; // ECT(0)
        put16(&mut p, 2, if total > 65535 { 0 } else { total as u16 });
        put16(&mut p, 4, id);
        put16(&mut p, 6, 0x4000); // DF
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 244, 1, 5]);
        p[16..20].copy_from_slice(&[10, 244, 2, 7]);
        packet::fix_ipv4_checksum(&mut p);
        let t = iphl;
        put16(&mut p, t, 40000);
        put16(&mut p, t + 2, 5201);
        put32(&mut p, t + 4, seq);
        put32(&mut p, t + 8, 0xabcdef01);
        p[t + 12] = ((tcphl / 4) as u8) << 4;
        p[t + 13] = flags;
        put16(&mut p, t + 14, 502);
        p[t + 20..t + 32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 1, 2, 0, 0, 3, 4]);
        for (i, b) in p[t + tcphl..].iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(2654435761).to_be_bytes()[0];
        }
        let ps = checksum::pseudo_header(
            [10, 244, 1, 5],
            [10, 244, 2, 7],
            PROTO_TCP,
            (tcphl + payload) as u16,
        );
        put16(&mut p, t + 16, checksum::fold(ps));
        p
    }

    pub(crate) fn tso_hdr(gso_size: u16) -> VirtioNetHdr {
        VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size,
            csum_start: 20,
            csum_offset: 16,
        }
    }

    /// Concatenates each segment's header and payload into a packet.
    pub(crate) fn materialize(pkt: &[u8], hdrs: &[u8], segs: &[Seg]) -> Vec<Vec<u8>> {
        segs.iter()
            .map(|s| {
                let mut v = hdrs[s.hdr_off..s.hdr_off + s.hdr_len].to_vec();
                v.extend_from_slice(&pkt[s.payload_off..s.payload_off + s.payload_len]);
                v
            })
            .collect()
    }

    /// Verifies IP and transport checksums with the independent reference.
    pub(crate) fn assert_valid(p: &[u8]) {
        let hl = usize::from(p[0] & 0xf) * 4;
        assert_eq!(usize::from(be16(p, 2)), p.len(), "IP total length");
        assert_eq!(reference_sum(&p[..hl]), 0xffff, "IP header checksum");
        let l4 = &p[hl..];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&p[12..20]);
        pseudo.extend_from_slice(&[0, p[9]]);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(l4);
        assert_eq!(reference_sum(&pseudo), 0xffff, "transport checksum");
    }

    #[test]
    fn tso_segmentation_fixes_every_header() {
        let gso = 1420u16;
        let payload = 65_535 - 52;
        let mut pkt = tcp_packet(payload, 0xffff_f000, TCP_ACK | TCP_PSH | TCP_FIN, 0xfffe);
        let mut vh = tso_hdr(gso);
        vh.gso_type |= GSO_ECN;
        pkt[20 + 13] |= TCP_CWR;
        let (mut hdrs, mut segs) = (Vec::new(), Vec::new());
        let n = segment(&pkt, &vh, &mut hdrs, &mut segs).unwrap();
        assert_eq!(n, payload.div_ceil(usize::from(gso)));
        let out = materialize(&pkt, &hdrs, &segs);
        let mut reassembled = Vec::new();
        for (i, p) in out.iter().enumerate() {
            assert_valid(p);
            let last = i + 1 == n;
            if !last {
                assert_eq!(
                    p.len(),
                    52 + usize::from(gso),
                    "all but the last are full size"
                );
            }
            assert_eq!(be16(p, 4), 0xfffeu16.wrapping_add(i as u16), "IP id");
            assert_eq!(
                be32(p, 24),
                0xffff_f000u32.wrapping_add(i as u32 * u32::from(gso)),
                "seq wraps"
            );
            let f = p[33];
            assert_eq!(f & TCP_ACK, TCP_ACK);
            assert_eq!(
                f & (TCP_PSH | TCP_FIN) != 0,
                last,
                "PSH/FIN only on the last segment"
            );
            assert_eq!(f & TCP_CWR != 0, i == 0, "CWR only on the first segment");
            // Everything else in the headers is copied from the template.
            assert_eq!(p[..2], pkt[..2]);
            assert_eq!(p[6..10], pkt[6..10]);
            assert_eq!(p[12..24], pkt[12..24]);
            assert_eq!(p[28..33], pkt[28..33]);
            assert_eq!(p[34..36], pkt[34..36]);
            assert_eq!(p[38..52], pkt[38..52]);
            reassembled.extend_from_slice(&p[52..]);
        }
        assert_eq!(reassembled, pkt[52..]);
    }

    #[test]
    fn tso_with_payload_that_fits_one_segment() {
        let pkt = tcp_packet(100, 1, TCP_ACK | TCP_PSH, 7);
        let (mut hdrs, mut segs) = (Vec::new(), Vec::new());
        assert_eq!(
            segment(&pkt, &tso_hdr(1400), &mut hdrs, &mut segs).unwrap(),
            1
        );
        let out = materialize(&pkt, &hdrs, &segs);
        assert_valid(&out[0]);
        assert_eq!(out[0].len(), pkt.len());
        assert_eq!(out[0][33], TCP_ACK | TCP_PSH);
    }

    #[test]
    fn exact_multiple_of_gso_size() {
        let pkt = tcp_packet(4 * 1000, 0, TCP_ACK, 0);
        let (mut hdrs, mut segs) = (Vec::new(), Vec::new());
        assert_eq!(
            segment(&pkt, &tso_hdr(1000), &mut hdrs, &mut segs).unwrap(),
            4
        );
        for p in materialize(&pkt, &hdrs, &segs) {
            assert_eq!(p.len(), 1052);
            assert_valid(&p);
        }
    }

    #[test]
    fn segments_accumulate_across_packets() {
        let a = tcp_packet(3000, 0, TCP_ACK, 0);
        let b = tcp_packet(2000, 3000, TCP_ACK, 3);
        let (mut hdrs, mut segs) = (Vec::new(), Vec::new());
        segment(&a, &tso_hdr(1000), &mut hdrs, &mut segs).unwrap();
        let first = segs.len();
        segment(&b, &tso_hdr(1000), &mut hdrs, &mut segs).unwrap();
        assert_eq!(segs.len(), 5);
        for p in materialize(&b, &hdrs, &segs[first..]) {
            assert_valid(&p);
        }
    }

    fn udp_packet(payload: usize) -> Vec<u8> {
        let total = 28 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        put16(&mut p, 2, total as u16);
        put16(&mut p, 4, 100);
        p[8] = 64;
        p[9] = PROTO_UDP;
        p[12..16].copy_from_slice(&[10, 244, 1, 5]);
        p[16..20].copy_from_slice(&[10, 244, 2, 7]);
        packet::fix_ipv4_checksum(&mut p);
        put16(&mut p, 20, 5353);
        put16(&mut p, 22, 9999);
        put16(&mut p, 24, (8 + payload) as u16);
        for (i, b) in p[28..].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let ps = checksum::pseudo_header(
            [10, 244, 1, 5],
            [10, 244, 2, 7],
            PROTO_UDP,
            (8 + payload) as u16,
        );
        put16(&mut p, 26, checksum::fold(ps));
        p
    }

    #[test]
    fn uso_segmentation() {
        let pkt = udp_packet(5000);
        let vh = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            hdr_len: 28,
            gso_size: 1200,
            csum_start: 20,
            csum_offset: 6,
        };
        let (mut hdrs, mut segs) = (Vec::new(), Vec::new());
        assert_eq!(segment(&pkt, &vh, &mut hdrs, &mut segs).unwrap(), 5);
        let out = materialize(&pkt, &hdrs, &segs);
        let mut body = Vec::new();
        for (i, p) in out.iter().enumerate() {
            assert_valid(p);
            assert_eq!(usize::from(be16(p, 24)), p.len() - 20, "UDP length");
            assert_eq!(be16(p, 4), 100 + i as u16);
            assert_ne!(be16(p, 26), 0, "UDP checksum present");
            body.extend_from_slice(&p[28..]);
        }
        assert_eq!(body, pkt[28..]);
        assert_eq!(out[4].len(), 28 + 200);
    }

    #[test]
    fn partial_checksum_completion() {
        let mut pkt = tcp_packet(333, 5, TCP_ACK | TCP_PSH, 1);
        complete_checksum(&mut pkt, 20, 16).unwrap();
        assert_valid(&pkt);
        let mut u = udp_packet(77);
        complete_checksum(&mut u, 20, 6).unwrap();
        assert_valid(&u);
        assert_eq!(
            complete_checksum(&mut u, 100, 6),
            Err(GsoError::BadChecksumOffsets {
                start: 100,
                offset: 6,
                len: u.len()
            })
        );
        // Through `segment` with GSO_NONE too.
        let pkt = tcp_packet(10, 5, TCP_SYN, 1);
        let vh = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..Default::default()
        };
        let (mut hdrs, mut segs) = (Vec::new(), Vec::new());
        assert_eq!(segment(&pkt, &vh, &mut hdrs, &mut segs).unwrap(), 1);
        assert_valid(&materialize(&pkt, &hdrs, &segs)[0]);
    }

    #[test]
    fn malformed_input_is_rejected() {
        let (mut hdrs, mut segs) = (Vec::new(), Vec::new());
        let pkt = tcp_packet(3000, 0, TCP_ACK, 0);
        let mut vh = tso_hdr(1000);
        vh.gso_size = 0;
        assert_eq!(
            segment(&pkt, &vh, &mut hdrs, &mut segs),
            Err(GsoError::ZeroGsoSize)
        );
        let vh6 = VirtioNetHdr {
            gso_type: crate::vnet::GSO_TCPV6,
            ..tso_hdr(1000)
        };
        assert_eq!(
            segment(&pkt, &vh6, &mut hdrs, &mut segs),
            Err(GsoError::Unsupported(crate::vnet::GSO_TCPV6))
        );
        let vhu = VirtioNetHdr {
            gso_type: GSO_UDP_L4,
            ..tso_hdr(1000)
        };
        assert!(matches!(
            segment(&pkt, &vhu, &mut hdrs, &mut segs),
            Err(GsoError::ProtoMismatch { .. })
        ));
        assert_eq!(
            segment(&pkt[..30], &tso_hdr(1000), &mut hdrs, &mut segs),
            Err(GsoError::NotIpv4)
        );
        let mut bad = pkt.clone();
        bad[32] = 0x30; // doff 3
        assert_eq!(
            segment(&bad, &tso_hdr(1000), &mut hdrs, &mut segs),
            Err(GsoError::BadTransport("TCP"))
        );
        assert!(hdrs.is_empty() && segs.is_empty());
    }
}
