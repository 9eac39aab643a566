//! Inbound: coalescing consecutive TCP segments of one flow into a GSO
//! super-packet that is written to the TUN device with one `writev` (the
//! kernel then handles it like a GRO packet: one trip through the stack
//! for up to 64 KiB). This is what wireguard-go and Tailscale do for their
//! TUN offloads, and what Linux GRO does on a NIC.
//!
//! The coalescer never touches packet bytes itself: it is fed segment
//! references plus their bytes, keeps a few open *items* (one per flow,
//! oldest first) and tells the caller when an item has to be written out.
//! The caller then rewrites the item's head header with [`finalize_head`]
//! and writes `[virtio hdr][head segment][payload of segment 2]...` as an
//! iovec, so segment payloads are never copied in user space.
//!
//! A segment may be appended to an item when (as Linux `tcp_gro_receive`
//! and wireguard-go's `tcpPacketsCanCoalesce` require): same addresses and
//! ports; IPv4 without options, not a fragment; same TOS, TTL, DF bit; TCP
//! flags exactly ACK or ACK|PSH; same ACK number, window and TCP options;
//! sequence number right after the item's last byte; the item has no PSH
//! yet and no short segment yet; the segment is not larger than the first;
//! the result stays within 65535 bytes and 64 segments; without DF the IP
//! ids must be consecutive (with DF they carry no meaning, RFC 6864).

use crate::checksum;
use crate::packet::{
    self, be16, be32, put16, IP_DF, IP_MF, IP_OFFSET, PROTO_TCP, TCP_ACK, TCP_PSH,
};
use crate::vnet::{VirtioNetHdr, F_NEEDS_CSUM, GSO_TCPV4};

/// Open items (flows) at once; the oldest is flushed when a new flow needs
/// a slot.
pub const MAX_ITEMS: usize = 8;
/// Segments per super-packet at most.
pub const MAX_SEGS: usize = 64;

/// A byte range in one of the caller's receive buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SegRef {
    pub buf: usize,
    pub off: usize,
    pub len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct FlowKey {
    src: u32,
    dst: u32,
    /// Source port << 16 | destination port.
    ports: u32,
}

/// The parsed facts of a TCP/IPv4 segment that matter for coalescing.
#[derive(Debug, Clone, Copy)]
struct TcpSeg {
    key: FlowKey,
    tcphl: usize,
    tos: u8,
    ttl: u8,
    /// Top three bits of the flags/fragment word (reserved, DF, MF).
    ipflags: u8,
    df: bool,
    id: u16,
    seq: u32,
    ack: u32,
    window: u16,
    flags: u8,
    payload_len: usize,
}

/// `Some` for an unfragmented TCP/IPv4 packet without IP options whose
/// lengths are consistent (`pkt` is exactly the IP total length).
fn parse_tcp(pkt: &[u8]) -> Option<TcpSeg> {
    let ip = packet::ipv4(pkt)?;
    if ip.proto != PROTO_TCP || ip.header_len != 20 || ip.total_len != pkt.len() || pkt.len() < 40 {
        return None;
    }
    let frag = be16(pkt, 6);
    if frag & (IP_MF | IP_OFFSET) != 0 {
        return None;
    }
    let tcphl = usize::from(pkt[32] >> 4) * 4;
    if tcphl < 20 || 20 + tcphl > pkt.len() {
        return None;
    }
    Some(TcpSeg {
        key: FlowKey {
            src: ip.src,
            dst: ip.dst,
            ports: be32(pkt, 20),
        },
        tcphl,
        tos: pkt[1],
        ttl: pkt[8],
        ipflags: pkt[6] >> 5,
        df: frag & IP_DF != 0,
        id: be16(pkt, 4),
        seq: be32(pkt, 24),
        ack: be32(pkt, 28),
        window: be16(pkt, 34),
        flags: pkt[33],
        payload_len: pkt.len() - 20 - tcphl,
    })
}

/// One flow's segments being merged.
#[derive(Debug, Clone)]
pub struct Item {
    open: bool,
    /// Creation order, for flushing oldest first.
    serial: u64,
    key: FlowKey,
    /// The first segment (headers + payload); its header becomes the
    /// super-packet's.
    pub head: SegRef,
    /// TCP header length (the IP header is always 20 bytes).
    pub tcphl: usize,
    tos: u8,
    ttl: u8,
    ipflags: u8,
    df: bool,
    head_id: u16,
    ack: u32,
    window: u16,
    options: [u8; 40],
    next_seq: u32,
    /// Payload size of the first segment: the GSO segment size.
    pub gso_size: usize,
    last_len: usize,
    /// Some merged segment had PSH (then it was the last one).
    pub psh: bool,
    /// Segments merged, head included.
    pub count: usize,
    /// Payload bytes of all segments, head included.
    pub payload_total: usize,
    /// Payload ranges of segments 2..=count.
    pub tails: Vec<SegRef>,
}

impl Default for Item {
    fn default() -> Self {
        Item {
            open: false,
            serial: 0,
            key: FlowKey::default(),
            head: SegRef::default(),
            tcphl: 20,
            tos: 0,
            ttl: 0,
            ipflags: 0,
            df: false,
            head_id: 0,
            ack: 0,
            window: 0,
            options: [0; 40],
            next_seq: 0,
            gso_size: 0,
            last_len: 0,
            psh: false,
            count: 0,
            payload_total: 0,
            tails: Vec::new(),
        }
    }
}

impl Item {
    fn can_append(&self, t: &TcpSeg, pkt: &[u8]) -> bool {
        t.tcphl == self.tcphl
            && pkt[40..20 + t.tcphl] == self.options[..t.tcphl - 20]
            && t.tos == self.tos
            && t.ttl == self.ttl
            && t.ipflags == self.ipflags
            && t.ack == self.ack
            && t.window == self.window
            && t.seq == self.next_seq
            && !self.psh
            && self.last_len == self.gso_size
            && t.payload_len <= self.gso_size
            && self.count < MAX_SEGS
            && 20 + self.tcphl + self.payload_total + t.payload_len <= 65535
            && (self.df || t.id == self.head_id.wrapping_add(self.count as u16))
    }
}

/// What the caller must do with the segment it just pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Taken into an item; nothing to do now.
    Consumed,
    /// Not coalescable: write it as it is (with a zero virtio header).
    Passthrough,
    /// Write out item `k` (see [`Gro::item`], [`finalize_head`]), call
    /// [`Gro::release`]`(k)`, then push the same segment again.
    Flush(usize),
}

/// The coalescer: [`MAX_ITEMS`] reusable slots; no allocation once every
/// slot's tail list has grown to its working size.
#[derive(Debug)]
pub struct Gro {
    items: Vec<Item>,
    serial: u64,
}

impl Default for Gro {
    fn default() -> Self {
        Gro::new()
    }
}

impl Gro {
    pub fn new() -> Gro {
        let items = (0..MAX_ITEMS)
            .map(|_| Item {
                tails: Vec::with_capacity(MAX_SEGS),
                ..Item::default()
            })
            .collect();
        Gro { items, serial: 0 }
    }

    /// Offers the segment `seg` whose bytes are `pkt` (exactly the inner IP
    /// packet).
    pub fn push(&mut self, seg: SegRef, pkt: &[u8]) -> Push {
        let Some(t) = parse_tcp(pkt) else {
            // TCP we cannot key (IP options, a fragment): flush everything
            // first so that no flow is reordered around it.
            let tcp = packet::ipv4(pkt).is_some_and(|ip| ip.proto == PROTO_TCP);
            return match self.oldest() {
                Some(k) if tcp => Push::Flush(k),
                _ => Push::Passthrough,
            };
        };
        let slot = self.items.iter().position(|i| i.open && i.key == t.key);
        let candidate = (t.flags == TCP_ACK || t.flags == TCP_ACK | TCP_PSH) && t.payload_len > 0;
        if !candidate {
            // Keep the flow in order: what we hold of it goes first.
            return match slot {
                Some(k) => Push::Flush(k),
                None => Push::Passthrough,
            };
        }
        if let Some(k) = slot {
            let item = &mut self.items[k];
            if !item.can_append(&t, pkt) {
                return Push::Flush(k);
            }
            item.tails.push(SegRef {
                buf: seg.buf,
                off: seg.off + 20 + t.tcphl,
                len: t.payload_len,
            });
            item.count += 1;
            item.payload_total += t.payload_len;
            item.next_seq = item.next_seq.wrapping_add(t.payload_len as u32);
            item.last_len = t.payload_len;
            item.psh = t.flags & TCP_PSH != 0;
            return Push::Consumed;
        }
        let Some(k) = self.items.iter().position(|i| !i.open) else {
            return Push::Flush(self.oldest().expect("all slots are open"));
        };
        self.serial += 1;
        let item = &mut self.items[k];
        item.open = true;
        item.serial = self.serial;
        item.key = t.key;
        item.head = seg;
        item.tcphl = t.tcphl;
        item.tos = t.tos;
        item.ttl = t.ttl;
        item.ipflags = t.ipflags;
        item.df = t.df;
        item.head_id = t.id;
        item.ack = t.ack;
        item.window = t.window;
        item.options[..t.tcphl - 20].copy_from_slice(&pkt[40..20 + t.tcphl]);
        item.next_seq = t.seq.wrapping_add(t.payload_len as u32);
        item.gso_size = t.payload_len;
        item.last_len = t.payload_len;
        item.psh = t.flags & TCP_PSH != 0;
        item.count = 1;
        item.payload_total = t.payload_len;
        item.tails.clear();
        Push::Consumed
    }

    /// The open item that was created first, if any: flush order at the end
    /// of a batch is repeated `oldest` + `release`.
    pub fn oldest(&self) -> Option<usize> {
        self.items
            .iter()
            .enumerate()
            .filter(|(_, i)| i.open)
            .min_by_key(|(_, i)| i.serial)
            .map(|(k, _)| k)
    }

    pub fn item(&self, k: usize) -> &Item {
        &self.items[k]
    }

    /// Frees slot `k` after its item was written out.
    pub fn release(&mut self, k: usize) {
        self.items[k].open = false;
        self.items[k].tails.clear();
    }

    /// Number of open items.
    pub fn open_items(&self) -> usize {
        self.items.iter().filter(|i| i.open).count()
    }
}

/// Rewrites the head segment `head` (its full bytes) of an item with
/// `item.count >= 2` into the header of the super-packet: IP total length
/// and checksum, PSH if the last segment had it, and the TCP checksum field
/// set to the pseudo-header sum (`F_NEEDS_CSUM` semantics: the kernel
/// completes it if the packet ever needs a real checksum). Returns the
/// virtio header to write in front.
pub fn finalize_head(head: &mut [u8], item: &Item) -> VirtioNetHdr {
    let hl = 20 + item.tcphl;
    let tcp_len = item.tcphl + item.payload_total;
    put16(head, 2, (20 + tcp_len) as u16);
    packet::fix_ipv4_checksum(head);
    if item.psh {
        head[33] |= TCP_PSH;
    }
    let ps = checksum::pseudo_header(
        packet::addr(head, 12),
        packet::addr(head, 16),
        PROTO_TCP,
        tcp_len as u16,
    );
    put16(head, 36, checksum::fold(ps));
    VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: hl as u16,
        gso_size: item.gso_size as u16,
        csum_start: 20,
        csum_offset: 16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gso::tests::{assert_valid, materialize, tcp_packet, tso_hdr};
    use crate::gso::{complete_checksum, segment};
    use crate::packet::{put32, TCP_FIN, TCP_SYN};

    /// Segments `payload` bytes with `gso` per segment; returns the
    /// original super-packet and the segments laid out back to back in
    /// one buffer (like a UDP GRO receive) with their refs.
    fn segmented(payload: usize, gso: u16, flags: u8) -> (Vec<u8>, Vec<u8>, Vec<SegRef>) {
        let pkt = tcp_packet(payload, 1_000_000, flags, 500);
        let (mut hdrs, mut segs) = (Vec::new(), Vec::new());
        segment(&pkt, &tso_hdr(gso), &mut hdrs, &mut segs).unwrap();
        let mut buf = Vec::new();
        let mut refs = Vec::new();
        for p in materialize(&pkt, &hdrs, &segs) {
            assert_valid(&p);
            refs.push(SegRef {
                buf: 0,
                off: buf.len(),
                len: p.len(),
            });
            buf.extend_from_slice(&p);
        }
        (pkt, buf, refs)
    }

    /// Runs the caller protocol over `segs`, flushing at the end; returns
    /// the packets as they would be written: coalesced ones rebuilt as
    /// contiguous super-packets (with their virtio header), others as is.
    fn run(buf: &mut [u8], segs: &[SegRef]) -> Vec<(Option<VirtioNetHdr>, Vec<u8>)> {
        let mut gro = Gro::new();
        let mut out = Vec::new();
        let write = |gro: &mut Gro, buf: &mut [u8], k: usize, out: &mut Vec<_>| {
            let item = gro.item(k).clone();
            let head = &mut buf[item.head.off..item.head.off + item.head.len];
            if item.count == 1 {
                out.push((None, head.to_vec()));
            } else {
                let vh = finalize_head(head, &item);
                let mut p = head.to_vec();
                for t in &item.tails {
                    p.extend_from_slice(&buf[t.off..t.off + t.len]);
                }
                out.push((Some(vh), p));
            }
            gro.release(k);
        };
        for &s in segs {
            loop {
                let r = gro.push(s, &buf[s.off..s.off + s.len]);
                match r {
                    Push::Consumed => break,
                    Push::Passthrough => {
                        out.push((None, buf[s.off..s.off + s.len].to_vec()));
                        break;
                    }
                    Push::Flush(k) => write(&mut gro, buf, k, &mut out),
                }
            }
        }
        while let Some(k) = gro.oldest() {
            write(&mut gro, buf, k, &mut out);
        }
        out
    }

    #[test]
    fn segments_of_a_tso_packet_coalesce_back_into_it() {
        let (orig, mut buf, refs) = segmented(20_000, 1448, TCP_ACK | TCP_PSH);
        assert_eq!(refs.len(), 14);
        let out = run(&mut buf, &refs);
        assert_eq!(out.len(), 1);
        let (vh, p) = &out[0];
        let vh = vh.expect("coalesced");
        assert_eq!(vh.gso_type, GSO_TCPV4);
        assert_eq!(vh.gso_size, 1448);
        assert_eq!((vh.hdr_len, vh.csum_start, vh.csum_offset), (52, 20, 16));
        // Byte-identical to the super-packet the sender's kernel produced.
        assert_eq!(p, &orig);
        let mut done = p.clone();
        complete_checksum(&mut done, vh.csum_start, vh.csum_offset).unwrap();
        assert_valid(&done);
    }

    #[test]
    fn largest_super_packet_fits_and_the_next_segment_starts_a_new_one() {
        // 65535 - 52 bytes of payload in 1000-byte segments: 66 segments,
        // more than MAX_SEGS, so two super-packets.
        let (_, mut buf, refs) = segmented(65_535 - 52, 1000, TCP_ACK);
        let out = run(&mut buf, &refs);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].1.len(), 52 + MAX_SEGS * 1000);
        let mut total = 0;
        for (vh, p) in &out {
            let mut p = p.clone();
            let vh = vh.unwrap();
            complete_checksum(&mut p, vh.csum_start, vh.csum_offset).unwrap();
            assert_valid(&p);
            total += p.len() - 52;
        }
        assert_eq!(total, 65_535 - 52);
    }

    #[test]
    fn a_single_segment_is_written_unchanged() {
        let (_, mut buf, refs) = segmented(1000, 1448, TCP_ACK);
        let before = buf.clone();
        let out = run(&mut buf, &refs);
        assert_eq!(out, vec![(None, before)]);
    }

    #[test]
    fn gap_in_sequence_flushes() {
        let (_, mut buf, mut refs) = segmented(4 * 1000, 1000, TCP_ACK);
        refs.remove(1); // segment 2 lost
        let out = run(&mut buf, &refs);
        assert_eq!(out.len(), 2, "1 alone, then 3+4 together");
        assert!(out[0].0.is_none());
        assert_eq!(out[1].0.unwrap().gso_size, 1000);
        assert_eq!(out[1].1.len(), 52 + 2000);
    }

    #[test]
    fn psh_ends_an_item_and_short_segment_ends_an_item() {
        // PSH on the last segment of the first packet: the next packet's
        // segments start a new item.
        let (_, mut a, ra) = segmented(3000, 1000, TCP_ACK | TCP_PSH);
        let next = tcp_packet(2500, 1_003_000, TCP_ACK, 503);
        let (mut hdrs, mut segs) = (Vec::new(), Vec::new());
        segment(&next, &tso_hdr(1000), &mut hdrs, &mut segs).unwrap();
        let mut refs = ra.clone();
        for p in materialize(&next, &hdrs, &segs) {
            refs.push(SegRef {
                buf: 0,
                off: a.len(),
                len: p.len(),
            });
            a.extend_from_slice(&p);
        }
        let out = run(&mut a, &refs);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].1.len(), 52 + 3000);
        assert_eq!(
            out[0].1[33] & TCP_PSH,
            TCP_PSH,
            "PSH kept on the super-packet"
        );
        // Second: 1000 + 1000 + 500; the short one closes it.
        assert_eq!(out[1].1.len(), 52 + 2500);
        assert_eq!(out[1].1[33] & TCP_PSH, 0);
    }

    #[test]
    fn segment_after_a_short_one_is_not_appended() {
        let mut buf = Vec::new();
        let mut refs = Vec::new();
        for (seq, len) in [(0u32, 1000usize), (1000, 500), (1500, 500)] {
            let p = tcp_packet(len, seq, TCP_ACK, seq as u16);
            let mut p = p;
            complete_checksum(&mut p, 20, 16).unwrap();
            refs.push(SegRef {
                buf: 0,
                off: buf.len(),
                len: p.len(),
            });
            buf.extend_from_slice(&p);
        }
        let out = run(&mut buf, &refs);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].1.len(), 52 + 1500);
        assert!(out[1].0.is_none());
    }

    #[test]
    fn control_segments_pass_through_in_flow_order() {
        let mut buf = Vec::new();
        let mut refs = Vec::new();
        let mut add = |p: Vec<u8>| {
            refs.push(SegRef {
                buf: 0,
                off: buf.len(),
                len: p.len(),
            });
            buf.extend_from_slice(&p);
        };
        add(tcp_packet(1000, 0, TCP_ACK, 0));
        add(tcp_packet(1000, 1000, TCP_ACK, 1));
        add(tcp_packet(0, 2000, TCP_ACK | TCP_FIN, 2));
        add(tcp_packet(0, 0, TCP_SYN, 0)); // another flow? same key: passthrough
        let out = run(&mut buf, &refs);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].1.len(), 52 + 2000, "data first");
        assert_eq!(out[1].1[33], TCP_ACK | TCP_FIN, "then the FIN");
        assert_eq!(out[2].1[33], TCP_SYN);
    }

    #[test]
    fn non_tcp_passes_through() {
        let mut icmp = vec![
            0x45, 0, 0, 28, 0, 1, 0, 0, 64, 1, 0, 0, 10, 244, 1, 1, 10, 244, 2, 1,
        ];
        packet::fix_ipv4_checksum(&mut icmp);
        icmp.extend_from_slice(&[8, 0, 0xf7, 0xff, 0, 0, 0, 0]);
        let mut gro = Gro::new();
        let r = SegRef {
            buf: 0,
            off: 0,
            len: icmp.len(),
        };
        assert_eq!(gro.push(r, &icmp), Push::Passthrough);
        assert_eq!(gro.push(r, &[0x60; 40]), Push::Passthrough);
        assert_eq!(gro.open_items(), 0);
    }

    #[test]
    fn interleaved_flows_coalesce_separately_and_table_evicts_oldest() {
        let flow = |port: u16, seq: u32| {
            let mut p = tcp_packet(1000, seq, TCP_ACK, seq as u16);
            put16(&mut p, 20, port);
            p
        };
        let mut buf = Vec::new();
        let mut refs = Vec::new();
        for round in 0..3u32 {
            for port in 0..(MAX_ITEMS as u16 + 1) {
                let p = flow(40000 + port, round * 1000);
                refs.push(SegRef {
                    buf: 0,
                    off: buf.len(),
                    len: p.len(),
                });
                buf.extend_from_slice(&p);
            }
        }
        let mut gro = Gro::new();
        let mut flushed = Vec::new();
        for &s in &refs {
            loop {
                match gro.push(s, &buf[s.off..s.off + s.len]) {
                    Push::Consumed => break,
                    Push::Passthrough => panic!("all coalescable"),
                    Push::Flush(k) => {
                        let it = gro.item(k);
                        flushed.push((be16(&buf, it.head.off + 20), it.count));
                        gro.release(k);
                    }
                }
            }
        }
        // 9 flows in 8 slots: every new flow evicts the oldest, so nothing
        // merges and each flush is a single segment, oldest first.
        assert!(flushed.iter().all(|&(_, c)| c == 1));
        assert_eq!(flushed[0].0, 40000);
        assert_eq!(gro.open_items(), MAX_ITEMS);

        // With fewer flows than slots, interleaving still coalesces.
        let mut buf = Vec::new();
        let mut refs = Vec::new();
        for round in 0..3u32 {
            for port in 0..3u16 {
                let p = flow(40000 + port, round * 1000);
                refs.push(SegRef {
                    buf: 0,
                    off: buf.len(),
                    len: p.len(),
                });
                buf.extend_from_slice(&p);
            }
        }
        let out = run(&mut buf, &refs);
        assert_eq!(out.len(), 3);
        for (vh, p) in out {
            assert_eq!(vh.unwrap().gso_size, 1000);
            assert_eq!(p.len(), 52 + 3000);
        }
    }

    #[test]
    fn header_differences_prevent_merging() {
        type Mutate = fn(&mut Vec<u8>);
        let cases: [(&str, Mutate); 7] = [
            ("ack", |p| put32(p, 28, 1)),
            ("window", |p| put16(p, 34, 1)),
            ("tos", |p| p[1] = 3),
            ("ttl", |p| p[8] = 1),
            ("options", |p| p[44] = 9),
            ("DF", |p| put16(p, 6, 0)),
            ("fragment", |p| put16(p, 6, 0x2000)),
        ];
        for (what, mutate) in cases {
            let a = tcp_packet(1000, 0, TCP_ACK, 0);
            let mut b = tcp_packet(1000, 1000, TCP_ACK, 1);
            mutate(&mut b);
            packet::fix_ipv4_checksum(&mut b);
            let mut buf = a.clone();
            buf.extend_from_slice(&b);
            let refs = [
                SegRef {
                    buf: 0,
                    off: 0,
                    len: a.len(),
                },
                SegRef {
                    buf: 0,
                    off: a.len(),
                    len: b.len(),
                },
            ];
            let out = run(&mut buf, &refs);
            assert_eq!(out.len(), 2, "{what} differs: must not merge");
        }
    }

    #[test]
    fn without_df_ip_ids_must_be_consecutive() {
        let mk = |seq: u32, id: u16| {
            let mut p = tcp_packet(1000, seq, TCP_ACK, id);
            put16(&mut p, 6, 0);
            packet::fix_ipv4_checksum(&mut p);
            p
        };
        for (id2, merged) in [(8u16, true), (9, false)] {
            let a = mk(0, 7);
            let b = mk(1000, id2);
            let mut buf = a.clone();
            buf.extend_from_slice(&b);
            let refs = [
                SegRef {
                    buf: 0,
                    off: 0,
                    len: a.len(),
                },
                SegRef {
                    buf: 0,
                    off: a.len(),
                    len: b.len(),
                },
            ];
            assert_eq!(run(&mut buf, &refs).len() == 1, merged, "id {id2}");
        }
    }
}
