//! The worker threads. A worker is one TUN queue + one `SO_REUSEPORT` UDP
//! socket, served by two threads: `tx` (TUN → peers) and `rx` (peers →
//! TUN). Both run non-blocking system calls in batches and sleep in
//! `poll` (with the stop eventfd) only when there is nothing to do.
//!
//! All buffers are allocated when the thread starts; the per-batch vectors
//! are cleared, not freed, so the steady state allocates nothing.

use crate::gro::{finalize_head, Gro, Push, SegRef};
use crate::gso::{self, Seg};
use crate::packet;
use crate::{checksum, vnet};
use crate::peers::PeerTable;
use crate::stats::{Counters, Local, C};
use crate::sys::{self, CmsgBuf};
use crate::vnet::{VirtioNetHdr, GSO_NONE, GSO_TCPV4, GSO_UDP_L4, VNET_HDR_LEN};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Packets read from the TUN device per `sendmmsg` at most...
const TX_BATCH: usize = 32;
/// ...and bytes: a few super-packets already make the syscall cost
/// negligible, and reading more before sending only delays the first.
const TX_BATCH_BYTES: usize = 128 * 1024;
/// Stop reading more when a batch has this many messages.
const TX_MAX_MSGS: usize = 512;
/// Datagrams per `recvmmsg`.
const RX_BATCH: usize = 16;
/// Buffer for one TUN read: virtio header + a 64 KiB IP packet.
const TUN_BUF: usize = VNET_HDR_LEN + 65_535;
/// Buffer for one received datagram (UDP GRO: up to 64 KiB).
const RX_BUF: usize = 65_536;
/// Largest UDP payload of one send (IPv4: 65535 - 20 - 8).
const MAX_UDP_PAYLOAD: usize = 65_507;
/// Segments per `UDP_SEGMENT` send at most (the kernel's `UDP_MAX_SEGMENTS`
/// is 64 on older kernels, 128 on newer).
const MAX_GSO_SEGS: usize = 64;
/// At most one error log line per thread this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// State shared by the handle and all threads.
pub(crate) struct Shared {
    /// Bumped after every peer table change; threads compare it per batch.
    pub gen: AtomicU64,
    pub table: RwLock<Arc<PeerTable>>,
    pub stop: AtomicBool,
    pub stop_fd: OwnedFd,
    pub port: u16,
    pub decrement_ttl: bool,
    /// The TUN device's MTU: an inner packet longer than that is a TCP super-packet a peer's
    /// kernel encapsulated whole (see [`super_packet_header`]). Follows MTU changes.
    pub mtu: AtomicUsize,
}

/// A thread's copy of the current peer table.
struct PeerView {
    table: Arc<PeerTable>,
    gen: u64,
}

impl PeerView {
    fn new(shared: &Shared) -> PeerView {
        let gen = shared.gen.load(Ordering::Acquire);
        let table = shared
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        PeerView { table, gen }
    }

    #[inline]
    fn refresh(&mut self, shared: &Shared) {
        let gen = shared.gen.load(Ordering::Acquire);
        if gen != self.gen {
            *self = PeerView::new(shared);
        }
    }
}

/// Rate-limited error logging.
struct ErrLog {
    what: &'static str,
    worker: usize,
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrLog {
    fn new(what: &'static str, worker: usize) -> ErrLog {
        ErrLog {
            what,
            worker,
            last: None,
            suppressed: 0,
        }
    }

    fn log(&mut self, op: &str, e: &dyn std::fmt::Display) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            worker = self.worker,
            thread = %self.what,
            suppressed = self.suppressed,
            "{op}: {e}"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// What a worker thread needs.
pub(crate) struct Ctx {
    pub index: usize,
    pub shared: Arc<Shared>,
    pub tun: Arc<OwnedFd>,
    pub sock: Arc<OwnedFd>,
    pub counters: Arc<Counters>,
    /// Send with `UDP_SEGMENT` (TX) / the socket has `UDP_GRO` (RX).
    pub udp_offload: bool,
    /// Coalesce TCP segments into GSO writes to the TUN (RX).
    pub tun_gro: bool,
    /// Nice value for this thread (0: leave it).
    pub nice: i32,
}

/// Applies [`Ctx::nice`] to the calling thread.
fn set_nice(ctx: &Ctx) {
    if ctx.nice == 0 {
        return;
    }
    if let Err(e) = sys::set_thread_nice(ctx.nice) {
        tracing::warn!(
            worker = ctx.index,
            nice = ctx.nice,
            "cannot set the datapath thread's priority: {e}"
        );
    }
}

// ---------------------------------------------------------------- TX

/// Where an iovec of an outgoing message points.
#[derive(Debug, Clone, Copy)]
enum Piece {
    /// `hdrs[off..off + len]`.
    Hdr { off: usize, len: usize },
    /// `bufs[slot][off..off + len]`.
    Buf { slot: usize, off: usize, len: usize },
}

/// One outgoing `mmsghdr`.
#[derive(Debug, Clone, Copy)]
struct OutMsg {
    dst: u32,
    /// `UDP_SEGMENT` size, 0 for a plain datagram.
    seg_size: u16,
    pieces: (usize, usize),
    segments: u32,
    bytes: u32,
}

struct Tx {
    ctx: Ctx,
    peers: PeerView,
    local: Local,
    log: ErrLog,
    gso: bool,
    bufs: Vec<Box<[u8]>>,
    hdrs: Vec<u8>,
    segs: Vec<Seg>,
    pieces: Vec<Piece>,
    msgs: Vec<OutMsg>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_in>,
    cmsgs: Vec<CmsgBuf>,
    mmsgs: Vec<libc::mmsghdr>,
}

pub(crate) fn run_tx(ctx: Ctx) {
    set_nice(&ctx);
    let peers = PeerView::new(&ctx.shared);
    let log = ErrLog::new("tx", ctx.index);
    let gso = ctx.udp_offload;
    let mut tx = Tx {
        peers,
        local: Local::default(),
        log,
        gso,
        bufs: (0..TX_BATCH)
            .map(|_| vec![0u8; TUN_BUF].into_boxed_slice())
            .collect(),
        hdrs: Vec::with_capacity(256 * 1024),
        segs: Vec::with_capacity(4096),
        pieces: Vec::with_capacity(8192),
        msgs: Vec::with_capacity(TX_MAX_MSGS * 2),
        iovs: Vec::with_capacity(8192),
        addrs: Vec::with_capacity(TX_MAX_MSGS * 2),
        cmsgs: Vec::with_capacity(TX_MAX_MSGS * 2),
        mmsgs: Vec::with_capacity(TX_MAX_MSGS * 2),
        ctx,
    };
    tx.run();
}

impl Tx {
    fn run(&mut self) {
        let tun = self.ctx.tun.as_raw_fd();
        let stop_fd = self.ctx.shared.stop_fd.as_raw_fd();
        loop {
            if self.ctx.shared.stop.load(Ordering::Relaxed) {
                break;
            }
            self.peers.refresh(&self.ctx.shared);
            let mut nread = 0;
            let mut bytes = 0;
            let mut hard_error = false;
            while nread < TX_BATCH && bytes < TX_BATCH_BYTES && self.msgs.len() < TX_MAX_MSGS {
                match sys::read(tun, &mut self.bufs[nread]) {
                    Ok(n) => {
                        bytes += n;
                        self.local.add(C::TunReads, 1);
                        self.plan(nread, n);
                        nread += 1;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.local.add(C::Errors, 1);
                        self.log.log("reading from the TUN device", &e);
                        hard_error = true;
                        break;
                    }
                }
            }
            if !self.msgs.is_empty() {
                self.send();
            }
            self.hdrs.clear();
            self.segs.clear();
            self.pieces.clear();
            self.msgs.clear();
            self.local.publish(&self.ctx.counters);
            if hard_error {
                std::thread::sleep(Duration::from_millis(10));
            } else if nread == 0 {
                match sys::wait(tun, libc::POLLIN, stop_fd) {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => {
                        self.log.log("polling the TUN device", &e);
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        }
    }

    /// Turns the packet in `bufs[slot][..n]` into messages.
    fn plan(&mut self, slot: usize, n: usize) {
        let Some(vh) = VirtioNetHdr::parse(&self.bufs[slot][..n]) else {
            self.local.add(C::DroppedMalformed, 1);
            return;
        };
        let pkt = &mut self.bufs[slot][VNET_HDR_LEN..n];
        let Some(ip) = packet::ipv4(pkt) else {
            // IPv6 (if the caller left it enabled on the device) lands here.
            self.local.add(C::DroppedMalformed, 1);
            return;
        };
        let Some(peer) = self.peers.table.lookup(ip.dst) else {
            self.local.add(C::DroppedNoRoute, 1);
            return;
        };
        if self.ctx.shared.decrement_ttl && !packet::decrement_ttl(pkt) {
            self.local.add(C::DroppedTtl, 1);
            return;
        }
        let pkt = &mut pkt[..ip.total_len];
        match vh.gso_kind() {
            GSO_NONE => {
                if vh.needs_csum()
                    && gso::complete_checksum(pkt, vh.csum_start, vh.csum_offset).is_err()
                {
                    self.local.add(C::DroppedMalformed, 1);
                    return;
                }
                let p = self.pieces.len();
                self.pieces.push(Piece::Buf {
                    slot,
                    off: VNET_HDR_LEN,
                    len: ip.total_len,
                });
                self.msgs.push(OutMsg {
                    dst: peer,
                    seg_size: 0,
                    pieces: (p, p + 1),
                    segments: 1,
                    bytes: ip.total_len as u32,
                });
            }
            GSO_TCPV4 | GSO_UDP_L4 => {
                let first = self.segs.len();
                if gso::segment(pkt, &vh, &mut self.hdrs, &mut self.segs).is_err() {
                    self.local.add(C::DroppedMalformed, 1);
                    return;
                }
                self.local.add(C::GsoPackets, 1);
                self.group(slot, peer, first);
            }
            _ => self.local.add(C::DroppedMalformed, 1),
        }
    }

    /// Groups `segs[first..]` (all of one super-packet) into messages:
    /// runs of at most [`MAX_GSO_SEGS`] segments and [`MAX_UDP_PAYLOAD`]
    /// bytes sent with `UDP_SEGMENT`, or one message per segment without.
    fn group(&mut self, slot: usize, peer: u32, first: usize) {
        let end = self.segs.len();
        let seg_size = self.segs[first].len();
        let mut i = first;
        while i < end {
            let p0 = self.pieces.len();
            let (mut count, mut bytes) = (0usize, 0usize);
            while i < end {
                let s = self.segs[i];
                if count > 0
                    && (!self.gso || count == MAX_GSO_SEGS || bytes + s.len() > MAX_UDP_PAYLOAD)
                {
                    break;
                }
                self.pieces.push(Piece::Hdr {
                    off: s.hdr_off,
                    len: s.hdr_len,
                });
                if s.payload_len > 0 {
                    self.pieces.push(Piece::Buf {
                        slot,
                        off: VNET_HDR_LEN + s.payload_off,
                        len: s.payload_len,
                    });
                }
                count += 1;
                bytes += s.len();
                i += 1;
            }
            self.msgs.push(OutMsg {
                dst: peer,
                seg_size: if count > 1 { seg_size as u16 } else { 0 },
                pieces: (p0, self.pieces.len()),
                segments: count as u32,
                bytes: bytes as u32,
            });
        }
    }

    fn iov(&self, p: Piece) -> libc::iovec {
        match p {
            Piece::Hdr { off, len } => sys::iovec(&self.hdrs[off..off + len]),
            Piece::Buf { slot, off, len } => sys::iovec(&self.bufs[slot][off..off + len]),
        }
    }

    /// Builds the `mmsghdr`s for `msgs[range]` into the scratch vectors.
    fn build(&mut self, msgs: std::ops::Range<usize>) {
        self.iovs.clear();
        self.mmsgs.clear();
        let n = msgs.len();
        if self.addrs.len() < n {
            self.addrs.resize(
                n,
                sys::sockaddr_in(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
            );
            self.cmsgs.resize(n, CmsgBuf::default());
        }
        // First pass: iovecs, addresses, control messages (vectors may
        // still grow here, so no pointers into them are taken yet).
        for k in 0..n {
            let m = self.msgs[msgs.start + k];
            for pi in m.pieces.0..m.pieces.1 {
                let iov = self.iov(self.pieces[pi]);
                self.iovs.push(iov);
            }
            self.addrs[k] = sys::sockaddr_in(SocketAddrV4::new(
                Ipv4Addr::from(m.dst),
                self.ctx.shared.port,
            ));
        }
        // Second pass: the headers, pointing into the now-fixed vectors.
        let mut iov_at = 0;
        for (k, mi) in msgs.enumerate() {
            let m = self.msgs[mi];
            let niov = m.pieces.1 - m.pieces.0;
            let mut h = sys::zeroed_mmsghdr();
            h.msg_hdr.msg_name = &mut self.addrs[k] as *mut libc::sockaddr_in as *mut libc::c_void;
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = self.iovs[iov_at..].as_mut_ptr();
            h.msg_hdr.msg_iovlen = niov as _;
            if m.seg_size > 0 {
                let len = self.cmsgs[k].set_udp_segment(m.seg_size);
                h.msg_hdr.msg_control = self.cmsgs[k].0.as_mut_ptr() as *mut libc::c_void;
                h.msg_hdr.msg_controllen = len as _;
            }
            self.mmsgs.push(h);
            iov_at += niov;
        }
    }

    fn send(&mut self) {
        let sock = self.ctx.sock.as_raw_fd();
        let total = self.msgs.len();
        let mut base = 0;
        while base < total {
            // sendmmsg takes at most UIO_MAXIOV (1024) messages per call.
            let end = total.min(base + 1024);
            self.build(base..end);
            let mut i = 0;
            while i < self.mmsgs.len() {
                match sys::sendmmsg(sock, &mut self.mmsgs[i..], 0) {
                    Ok(k) => {
                        self.local.add(C::UdpSends, 1);
                        for m in &self.msgs[base + i..base + i + k] {
                            self.local.add(C::PacketsOut, u64::from(m.segments));
                            self.local.add(C::BytesOut, u64::from(m.bytes));
                        }
                        i += k.max(1);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let m = self.msgs[base + i];
                        let errno = e.raw_os_error().unwrap_or(0);
                        if m.seg_size > 0 && (errno == libc::EIO || errno == libc::EINVAL) {
                            // UDP GSO refused for this path (no checksum
                            // offload on old kernels: EIO; segment larger
                            // than the path MTU: EINVAL): send the segments
                            // one by one and let the kernel fragment.
                            if errno == libc::EIO && self.gso {
                                tracing::warn!(worker = self.ctx.index, "UDP GSO refused by the kernel ({e}); sending datagrams one by one from now on");
                                self.gso = false;
                            }
                            self.send_split(m);
                        } else {
                            self.local.add(C::Errors, 1);
                            self.log.log("sending to a peer", &e);
                        }
                        i += 1;
                    }
                }
            }
            base = end;
        }
    }

    /// Sends the segments of a `UDP_SEGMENT` message as single datagrams.
    fn send_split(&mut self, m: OutMsg) {
        let sock = self.ctx.sock.as_raw_fd();
        let sa = sys::sockaddr_in(SocketAddrV4::new(
            Ipv4Addr::from(m.dst),
            self.ctx.shared.port,
        ));
        let mut pi = m.pieces.0;
        while pi < m.pieces.1 {
            // A segment is a header piece followed by its payload piece.
            let mut iov = [self.iov(self.pieces[pi]), sys::iovec(&[])];
            let mut niov = 1;
            let mut len = iov[0].iov_len;
            if let Some(p @ Piece::Buf { .. }) = self
                .pieces
                .get(pi + 1)
                .copied()
                .filter(|_| pi + 1 < m.pieces.1)
            {
                iov[1] = self.iov(p);
                len += iov[1].iov_len;
                niov = 2;
            }
            pi += niov;
            let mut h = sys::zeroed_mmsghdr();
            let mut sa = sa;
            h.msg_hdr.msg_name = &mut sa as *mut libc::sockaddr_in as *mut libc::c_void;
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = iov.as_mut_ptr();
            h.msg_hdr.msg_iovlen = niov as _;
            match sys::sendmmsg(sock, std::slice::from_mut(&mut h), 0) {
                Ok(_) => {
                    self.local.add(C::UdpSends, 1);
                    self.local.add(C::PacketsOut, 1);
                    self.local.add(C::BytesOut, len as u64);
                }
                Err(e) => {
                    self.local.add(C::Errors, 1);
                    self.log.log("sending to a peer", &e);
                }
            }
        }
    }
}

// ---------------------------------------------------------------- RX

struct Rx {
    ctx: Ctx,
    peers: PeerView,
    local: Local,
    log: ErrLog,
    bufs: Vec<Box<[u8]>>,
    addrs: Vec<libc::sockaddr_in>,
    cmsgs: Vec<CmsgBuf>,
    iovs: Vec<libc::iovec>,
    mmsgs: Vec<libc::mmsghdr>,
    gro: Gro,
    wiov: Vec<libc::iovec>,
}

pub(crate) fn run_rx(ctx: Ctx) {
    set_nice(&ctx);
    let mut rx = Rx {
        peers: PeerView::new(&ctx.shared),
        local: Local::default(),
        log: ErrLog::new("rx", ctx.index),
        bufs: (0..RX_BATCH)
            .map(|_| vec![0u8; RX_BUF].into_boxed_slice())
            .collect(),
        addrs: vec![sys::sockaddr_in(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); RX_BATCH],
        cmsgs: vec![CmsgBuf::default(); RX_BATCH],
        iovs: Vec::with_capacity(RX_BATCH),
        mmsgs: Vec::with_capacity(RX_BATCH),
        gro: Gro::new(),
        wiov: Vec::with_capacity(crate::gro::MAX_SEGS + 2),
        ctx,
    };
    rx.run();
}

static ZERO_VNET: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

impl Rx {
    fn run(&mut self) {
        let sock = self.ctx.sock.as_raw_fd();
        let stop_fd = self.ctx.shared.stop_fd.as_raw_fd();
        // The iovecs point at the buffers for good (boxed slices never move).
        for b in &self.bufs {
            self.iovs.push(sys::iovec(b));
        }
        for k in 0..RX_BATCH {
            let mut h = sys::zeroed_mmsghdr();
            h.msg_hdr.msg_name = &mut self.addrs[k] as *mut libc::sockaddr_in as *mut libc::c_void;
            h.msg_hdr.msg_iov = &mut self.iovs[k] as *mut libc::iovec;
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.cmsgs[k].0.as_mut_ptr() as *mut libc::c_void;
            self.mmsgs.push(h);
        }
        loop {
            if self.ctx.shared.stop.load(Ordering::Relaxed) {
                break;
            }
            self.peers.refresh(&self.ctx.shared);
            for h in &mut self.mmsgs {
                h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                h.msg_hdr.msg_controllen = std::mem::size_of::<CmsgBuf>() as _;
                h.msg_hdr.msg_flags = 0;
                h.msg_len = 0;
            }
            match sys::recvmmsg(sock, &mut self.mmsgs, libc::MSG_DONTWAIT) {
                Ok(n) => {
                    self.local.add(C::UdpRecvs, 1);
                    self.process(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.local.publish(&self.ctx.counters);
                    match sys::wait(sock, libc::POLLIN, stop_fd) {
                        Ok(true) => break,
                        Ok(false) => {}
                        Err(e) => {
                            self.log.log("polling the UDP socket", &e);
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.local.add(C::Errors, 1);
                    self.log.log("receiving from the UDP socket", &e);
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            self.local.publish(&self.ctx.counters);
        }
    }

    fn process(&mut self, n: usize) {
        for m in 0..n {
            let h = &self.mmsgs[m];
            let len = h.msg_len as usize;
            let flags = h.msg_hdr.msg_flags;
            #[allow(clippy::unnecessary_cast)] // size_t on glibc, socklen_t on musl
            let clen = h.msg_hdr.msg_controllen as usize;
            self.local.add(C::UdpDatagramsIn, 1);
            if flags & libc::MSG_TRUNC != 0 || len == 0 {
                self.local.add(C::DroppedMalformed, 1);
                continue;
            }
            let seg_size = self.cmsgs[m].udp_gro_size(clen).unwrap_or(len).min(len);
            let src = u32::from_be(self.addrs[m].sin_addr.s_addr);
            if !self.peers.table.is_peer(src) {
                self.local
                    .add(C::DroppedUnknownSource, len.div_ceil(seg_size) as u64);
                continue;
            }
            let mut off = 0;
            while off < len {
                let seg_len = seg_size.min(len - off);
                self.segment(m, off, seg_len);
                off += seg_len;
            }
        }
        while let Some(k) = self.gro.oldest() {
            self.write_item(k);
        }
    }

    /// One inner packet at `bufs[m][off..off + len]`.
    fn segment(&mut self, m: usize, off: usize, len: usize) {
        let pkt = &mut self.bufs[m][off..off + len];
        let Some(ip) = packet::ipv4(pkt) else {
            self.local.add(C::DroppedMalformed, 1);
            return;
        };
        if self.ctx.shared.decrement_ttl && !packet::decrement_ttl(pkt) {
            self.local.add(C::DroppedTtl, 1);
            return;
        }
        let seg = SegRef {
            buf: m,
            off,
            len: ip.total_len,
        };
        let mtu = self.ctx.shared.mtu.load(Ordering::Relaxed);
        if ip.total_len > mtu && ip.proto == packet::PROTO_TCP {
            // One datagram, one inner packet longer than the MTU: a TCP super-packet a peer's
            // kernel fast path encapsulated whole, handed over unsegmented by a virtual
            // underlay (veth). Written as what it is, a GSO packet the kernel cuts up.
            // Packets held for coalescing came first: out before it (TCP would see them
            // reordered).
            while let Some(k) = self.gro.oldest() {
                self.write_item(k);
            }
            if let Some(vh) = super_packet_header(&mut self.bufs[m][off..off + ip.total_len], mtu) {
                let vh = vh.to_bytes();
                self.wiov.clear();
                self.wiov.push(sys::iovec(&vh));
                self.wiov.push(sys::iovec(&self.bufs[m][off..off + seg.len]));
                self.write(1, seg.len);
                return;
            }
            // Not one we can cut up (a peer with a larger MTU sent it as one packet): written
            // as it is; the kernel fragments it or answers "fragmentation needed".
            self.write_single(seg);
            return;
        }
        if !self.ctx.tun_gro {
            self.write_single(seg);
            return;
        }
        loop {
            match self.gro.push(seg, &self.bufs[m][off..off + ip.total_len]) {
                Push::Consumed => return,
                Push::Passthrough => {
                    self.write_single(seg);
                    return;
                }
                Push::Flush(k) => self.write_item(k),
            }
        }
    }

    fn write_single(&mut self, seg: SegRef) {
        let vh = partial_checksum_header(&self.bufs[seg.buf][seg.off..seg.off + seg.len]).map(|h| h.to_bytes());
        self.wiov.clear();
        self.wiov.push(sys::iovec(vh.as_ref().unwrap_or(&ZERO_VNET)));
        self.wiov
            .push(sys::iovec(&self.bufs[seg.buf][seg.off..seg.off + seg.len]));
        self.write(1, seg.len);
    }

    fn write_item(&mut self, k: usize) {
        let item = self.gro.item(k);
        if item.count == 1 {
            let head = item.head;
            self.gro.release(k);
            self.write_single(head);
            return;
        }
        let h = item.head;
        let vh = finalize_head(&mut self.bufs[h.buf][h.off..h.off + h.len], item).to_bytes();
        self.wiov.clear();
        self.wiov.push(sys::iovec(&vh));
        self.wiov
            .push(sys::iovec(&self.bufs[h.buf][h.off..h.off + h.len]));
        for t in &item.tails {
            self.wiov
                .push(sys::iovec(&self.bufs[t.buf][t.off..t.off + t.len]));
        }
        let count = item.count;
        let bytes = count * (20 + item.tcphl) + item.payload_total;
        self.local.add(C::GroPackets, 1);
        self.write(count, bytes);
        self.gro.release(k);
    }

    /// Writes `self.wiov` (which must stay valid: it points into `bufs` or
    /// statics or a live local) to the TUN device.
    fn write(&mut self, packets: usize, bytes: usize) {
        let tun: RawFd = self.ctx.tun.as_raw_fd();
        loop {
            match sys::writev(tun, &self.wiov) {
                Ok(_) => {
                    self.local.add(C::TunWrites, 1);
                    self.local.add(C::PacketsIn, packets as u64);
                    self.local.add(C::BytesIn, bytes as u64);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.local.add(C::Errors, 1);
                    self.log.log("writing to the TUN device", &e);
                    return;
                }
            }
        }
    }
}

/// A packet whose TCP/UDP checksum field holds only the pseudo-header sum: what a sender's
/// kernel leaves for the NIC to complete (`CHECKSUM_PARTIAL`), and what a veth underlay hands
/// over as is when a peer's kernel fast path encapsulated it. Written with this header, the
/// kernel completes the checksum; written plainly, it would drop the packet as corrupt. (A
/// complete checksum that happens to equal the pseudo-header sum is recomputed to the same
/// value: no harm.) `None`: a plain write.
pub(crate) fn partial_checksum_header(pkt: &[u8]) -> Option<VirtioNetHdr> {
    let ip = packet::ipv4(pkt)?;
    let csum_offset = match ip.proto {
        packet::PROTO_TCP => 16,
        packet::PROTO_UDP => 6,
        _ => return None,
    };
    // Fragments carry no (or a partial) L4 header.
    if packet::be16(pkt, 6) & 0x3fff != 0 || ip.total_len < ip.header_len + csum_offset + 2 {
        return None;
    }
    let l4_len = ip.total_len - ip.header_len;
    let ps = checksum::fold(checksum::pseudo_header(packet::addr(pkt, 12), packet::addr(pkt, 16), ip.proto, l4_len as u16));
    let at = ip.header_len + csum_offset;
    (packet::be16(pkt, at) == ps && ps != 0).then_some(VirtioNetHdr {
        flags: vnet::F_NEEDS_CSUM,
        gso_type: vnet::GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: ip.header_len as u16,
        csum_offset: csum_offset as u16,
    })
}

/// The virtio header for writing `pkt`, one IPv4 TCP packet longer than `mtu`, to the TUN
/// device as a GSO packet: segments of `mtu` minus the IP and TCP headers (the MSS the
/// sender's TCP used: its device had this MTU too), checksum completed by the kernel (the
/// field is set to the pseudo-header sum, as `F_NEEDS_CSUM` wants). `None` for anything else
/// (not TCP, truncated headers): such a packet cannot be cut up without knowing its segment
/// size.
pub(crate) fn super_packet_header(pkt: &mut [u8], mtu: usize) -> Option<VirtioNetHdr> {
    let ip = packet::ipv4(pkt)?;
    if ip.proto != packet::PROTO_TCP || ip.total_len != pkt.len() || pkt.len() < ip.header_len + 20 {
        return None;
    }
    let tcphl = usize::from(pkt[ip.header_len + 12] >> 4) * 4;
    let hl = ip.header_len + tcphl;
    if tcphl < 20 || pkt.len() <= hl || mtu <= hl {
        return None;
    }
    let tcp_len = pkt.len() - ip.header_len;
    let ps = checksum::pseudo_header(packet::addr(pkt, 12), packet::addr(pkt, 16), packet::PROTO_TCP, tcp_len as u16);
    let c = ip.header_len + 16;
    pkt[c..c + 2].copy_from_slice(&checksum::fold(ps).to_be_bytes());
    Some(VirtioNetHdr {
        flags: vnet::F_NEEDS_CSUM,
        gso_type: vnet::GSO_TCPV4,
        hdr_len: hl as u16,
        gso_size: (mtu - hl) as u16,
        csum_start: ip.header_len as u16,
        csum_offset: 16,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gso::tests::{assert_valid, materialize, tcp_packet, tso_hdr};

    /// A 60 KB TCP super-packet as a peer's kernel encapsulates it: the header says GSO with
    /// the MSS of a 1472-byte MTU, and cutting it up by that header gives valid packets that
    /// fit the MTU and carry every byte.
    #[test]
    fn super_packet_becomes_a_gso_write() {
        let mut pkt = tcp_packet(60_000, 7, 0x18, 9);
        let want_check = [pkt[36], pkt[37]];
        pkt[36..38].copy_from_slice(&[0xde, 0xad]); // whatever the sender left there
        let vh = super_packet_header(&mut pkt, 1472).expect("a TCP super-packet");
        assert_eq!(vh, tso_hdr(1472 - 52));
        assert_eq!([pkt[36], pkt[37]], want_check, "the checksum field holds the pseudo-header sum");
        let (mut hdrs, mut segs) = (Vec::new(), Vec::new());
        gso::segment(&pkt, &vh, &mut hdrs, &mut segs).unwrap();
        let out = materialize(&pkt, &hdrs, &segs);
        assert_eq!(out.len(), 60_000usize.div_ceil(1420));
        for p in &out {
            assert!(p.len() <= 1472);
            assert_valid(p);
        }
        assert_eq!(out.iter().map(|p| p.len() - 52).sum::<usize>(), 60_000);
    }

    /// A packet fresh from a sender's kernel (checksum field = pseudo-header sum) is written
    /// for the kernel to complete; a packet with a complete checksum is written as it is.
    #[test]
    fn partial_checksums_are_completed_by_the_kernel_complete_ones_left_alone() {
        let mut pkt = tcp_packet(1000, 1, 0x18, 1);
        let vh = partial_checksum_header(&pkt).expect("partial");
        assert_eq!((vh.flags, vh.gso_type, vh.csum_start, vh.csum_offset), (vnet::F_NEEDS_CSUM, vnet::GSO_NONE, 20, 16));
        gso::complete_checksum(&mut pkt, 20, 16).unwrap();
        assert_valid(&pkt);
        assert_eq!(partial_checksum_header(&pkt), None, "a complete checksum");
        let mut frag = tcp_packet(1000, 1, 0x18, 1);
        frag[6] |= 0x20; // more fragments
        assert_eq!(partial_checksum_header(&frag), None);
    }

    #[test]
    fn only_tcp_super_packets_get_a_gso_header() {
        let mut udp = tcp_packet(3000, 1, 0x10, 1);
        udp[9] = 17;
        assert_eq!(super_packet_header(&mut udp, 1472), None);
        let mut short = tcp_packet(3000, 1, 0x10, 1);
        short.truncate(40);
        assert_eq!(super_packet_header(&mut short, 1472), None, "truncated: total length beyond the slice");
    }
}
