//! flannel-compatible `udp` backend datapath for netd.
//!
//! # Wire format
//! One UDP datagram per inner packet, to the peer's public IP on port 8285
//! by default; the UDP payload is the raw inner IPv4 packet, no header.
//! Interoperates with flannel's `udp` backend in both directions.
//!
//! # What this crate does, and what it leaves to the caller
//! [`UdpDatapath::start`] creates a multi-queue TUN device (`IFF_TUN |
//! IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE`) with the given name and
//! MTU, brings it up, opens one `SO_REUSEPORT` UDP socket per worker bound
//! to `local_ip:port`, and starts the workers. The caller installs the
//! address and routes (`ip addr add 10.244.1.0/32 dev netd-udp0`, `ip route
//! add 10.244.0.0/16 dev netd-udp0`) and keeps the peer table current with
//! [`UdpDatapath::set_peers`]. By default the device is not persistent: it
//! disappears, with its addresses and routes, when the datapath stops. With
//! [`UdpConfig::persist`] it is made persistent (`TUNSETPERSIST`) and an
//! existing device of that name is adopted rather than recreated, so a
//! restarted process finds the device, its addresses and routes as it left
//! them (packets routed to it while no process holds it are dropped by the
//! kernel; TCP retransmits them once the next process attaches).
//! [`UdpDatapath::remove`] stops and removes a persistent device.
//!
//! # Performance design
//! flannel's `udp` backend moves one packet per system call per direction
//! on a single thread. Here:
//! * **TUN offloads.** The device is set to `TUN_F_CSUM | TUN_F_TSO4 |
//!   TUN_F_TSO_ECN | TUN_F_USO4/6` (falling back step by step when the
//!   kernel refuses), so one `read` returns up to 64 KiB of one TCP flow.
//! * **UDP GSO on send.** A super-packet is cut into complete inner packets
//!   (headers rewritten and checksummed: [`gso::segment`]) described by an
//!   iovec per header and per payload slice (no payload copy), and handed to
//!   one `sendmsg` with `UDP_SEGMENT`; the kernel makes the datagrams.
//!   Up to 32 reads (or 128 KiB) go out in one `sendmmsg`.
//! * **UDP GRO on receive.** The sockets have `UDP_GRO`, so one
//!   `recvmmsg` slot holds up to 64 KiB of datagrams of one peer. Inner
//!   TCP segments of one flow are coalesced back into a super-packet
//!   ([`gro`]) and written with one `writev` (virtio header `GSO_TCPV4`).
//! * **One worker per core**: a TUN queue and a socket each, with a TX and
//!   an RX thread; the kernel spreads flows over TUN queues (TX) and peers
//!   over sockets (RX, `SO_REUSEPORT` hashing).
//! * **No lock, no allocation per packet.** The peer table is swapped
//!   atomically and checked once per batch; buffers are per thread.
//!
//! # Beside the kernel fast path
//! netd runs tc eBPF programs (`netd-ebpf`, `bpf/udp_overlay.c`) on the TUN device and the
//! underlay where the kernel allows; they encapsulate and decapsulate most traffic and leave
//! the rest to this datapath. Two kinds of received datagram exist only because of them, and are
//! handled here:
//! * **TCP super-packets.** A peer's programs encapsulate a GSO packet whole; a veth underlay
//!   hands it over unsegmented: one datagram, one inner TCP packet of up to 64 KiB. It is
//!   written to the TUN device as a GSO packet (segment size: the TUN MTU minus the headers, the
//!   MSS the sender used) for the kernel to cut up.
//! * **Partial checksums.** What a peer's kernel sent over a veth underlay may still carry only
//!   the pseudo-header sum in its TCP/UDP checksum field (`CHECKSUM_PARTIAL`: the NIC would
//!   have completed it). Such a packet is written with `VIRTIO_NET_HDR_F_NEEDS_CSUM`, so the
//!   kernel completes the checksum instead of dropping the packet.
//!
//! # Policy choices
//! * Inbound datagrams whose source IP is not a current peer's public IP
//!   are dropped and counted (flannel accepts any source).
//! * Outbound packets with no peer route are dropped and counted (flannel
//!   sends ICMP net-unreachable; we do not).
//! * TTL: not decremented by default. Both hosts already decrement it when
//!   they route a packet through the TUN device, so forwarding loops end;
//!   decrementing again in user space (as flannel does) only shortens the
//!   path budget and makes segments of a flow differ from what the sender
//!   produced. [`UdpConfig::decrement_ttl`] restores flannel's behaviour
//!   (both directions, RFC 1624 incremental checksum, TTL ≤ 1 dropped).

pub mod checksum;
pub mod gro;
pub mod gso;
pub mod packet;
pub mod peers;
mod stats;
mod sys;
pub mod vnet;
mod worker;

pub use peers::PeerTable;
pub use stats::UdpStats;

use ipnet::Ipv4Net;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use worker::{Ctx, Shared};

/// flannel's default `udp` backend port.
pub const DEFAULT_PORT: u16 = 8285;
/// Outer IPv4 (20) + UDP (8) header bytes: TUN MTU = underlay MTU - 28.
pub const ENCAP_OVERHEAD: u32 = 28;
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;
/// Most queues a TUN device may have.
pub const MAX_WORKERS: usize = 256;
/// Socket buffer size asked for (`SO_RCVBUFFORCE`/`SO_SNDBUFFORCE`, or the
/// capped plain options without `CAP_NET_ADMIN`).
const SOCKET_BUFFER: i32 = 8 << 20;

/// The TUN MTU for an underlay MTU (flannel: `extIface.MTU - 28`).
pub fn tun_mtu_for_underlay(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(ENCAP_OVERHEAD)
}

/// How to start the datapath. `..Default::default()` fills the optional
/// fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpConfig {
    /// TUN device name, e.g. `netd-udp0` (1..=15 bytes).
    pub tun_name: String,
    /// MTU of the TUN device (not of the underlay): the underlay MTU minus
    /// [`ENCAP_OVERHEAD`], see [`tun_mtu_for_underlay`].
    pub mtu: u32,
    /// Address the sockets bind to (the node's public IP); unspecified
    /// binds to every address.
    pub local_ip: Ipv4Addr,
    /// UDP port, the same on every node ([`DEFAULT_PORT`]).
    pub port: u16,
    /// Worker count: TUN queues and sockets. 0 = one per available CPU.
    pub workers: usize,
    /// Decrement the inner TTL in both directions, as flannel does.
    pub decrement_ttl: bool,
    /// Use TUN offloads (TSO/USO, checksum), UDP GSO/GRO and TCP
    /// coalescing. Off: one packet per read/datagram/write (slow; for
    /// comparison and debugging).
    pub offloads: bool,
    /// Keep the device when the datapath stops, and adopt an existing
    /// device of the same name at start (see the crate docs).
    pub persist: bool,
    /// Nice value of the worker threads (0: the caller's). The kernel's own
    /// encapsulation (VXLAN) runs in softirq context, ahead of every task;
    /// a negative value brings the userspace datapath closer to that on a
    /// busy node, so a packet does not wait behind unrelated work.
    pub nice: i32,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            tun_name: "netd-udp0".into(),
            mtu: tun_mtu_for_underlay(1500),
            local_ip: Ipv4Addr::UNSPECIFIED,
            port: DEFAULT_PORT,
            workers: 0,
            decrement_ttl: false,
            offloads: true,
            persist: false,
            nice: 0,
        }
    }
}

/// Errors of [`UdpDatapath::start`]; each names the operation and object.
#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    #[error("invalid UDP datapath configuration: {0}")]
    Config(String),
    #[error("creating the stop eventfd: {0}")]
    EventFd(#[source] io::Error),
    #[error("opening queue {queue} of TUN device {name}: {source}")]
    TunOpen {
        name: String,
        queue: usize,
        source: io::Error,
    },
    #[error("configuring TUN device {name} ({what}): {source}")]
    TunConfig {
        name: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("setting MTU {mtu} on {name}: {source}")]
    SetMtu {
        name: String,
        mtu: u32,
        source: io::Error,
    },
    #[error("bringing {name} up: {source}")]
    LinkUp { name: String, source: io::Error },
    #[error("creating UDP socket bound to {addr} for worker {worker}: {source}")]
    Socket {
        addr: SocketAddrV4,
        worker: usize,
        source: io::Error,
    },
    #[error("setting {what} on UDP socket {addr}: {source}")]
    SocketOption {
        addr: SocketAddrV4,
        what: &'static str,
        source: io::Error,
    },
    #[error("spawning datapath thread {name}: {source}")]
    Spawn { name: String, source: io::Error },
}

/// What the kernel agreed to, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// The `TUN_F_*` flags accepted by `TUNSETOFFLOAD` (0: none).
    pub tun_offload: u32,
    /// `UDP_SEGMENT` is used on send.
    pub udp_gso: bool,
    /// `UDP_GRO` is set on the sockets.
    pub udp_gro: bool,
    /// TCP segments are coalesced into GSO writes to the TUN.
    pub tun_gro: bool,
    /// Workers started.
    pub workers: usize,
}

/// The running datapath. Dropping it (or [`UdpDatapath::stop`]) stops the
/// workers and closes the TUN queues, which removes the device.
pub struct UdpDatapath {
    shared: Arc<Shared>,
    /// Queue 0, kept to clear `IFF_PERSIST` in [`UdpDatapath::remove`].
    tun0: Arc<std::os::fd::OwnedFd>,
    adopted: bool,
    counters: Vec<Arc<stats::Counters>>,
    threads: Vec<JoinHandle<()>>,
    local: SocketAddrV4,
    tun_name: String,
    features: Features,
}

impl std::fmt::Debug for UdpDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpDatapath")
            .field("tun_name", &self.tun_name)
            .field("local", &self.local)
            .field("features", &self.features)
            .finish()
    }
}

/// Offload sets to try, best first. The kernel accepts USO only as
/// USO4|USO6 together (Linux ≥ 6.2); without IPv6 on the device no IPv6
/// super-packet can come.
const OFFLOAD_TRIES: [(libc::c_uint, &str); 4] = [
    (
        libc::TUN_F_CSUM
            | libc::TUN_F_TSO4
            | libc::TUN_F_TSO_ECN
            | libc::TUN_F_USO4
            | libc::TUN_F_USO6,
        "csum+tso4+ecn+uso",
    ),
    (
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO_ECN,
        "csum+tso4+ecn",
    ),
    (libc::TUN_F_CSUM | libc::TUN_F_TSO4, "csum+tso4"),
    (libc::TUN_F_CSUM, "csum"),
];

fn validate(cfg: &UdpConfig) -> Result<usize, UdpError> {
    let n = &cfg.tun_name;
    if n.is_empty()
        || n.len() > MAX_IFNAME_LEN
        || n.bytes()
            .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace())
        || n == "."
        || n == ".."
    {
        return Err(UdpError::Config(format!(
            "bad TUN device name {n:?} (1..={MAX_IFNAME_LEN} bytes, no '/', NUL or space)"
        )));
    }
    if !(68..=65_535).contains(&cfg.mtu) {
        return Err(UdpError::Config(format!(
            "MTU {} out of range 68..=65535",
            cfg.mtu
        )));
    }
    if cfg.port == 0 {
        return Err(UdpError::Config(
            "port 0: every node must use the same fixed port".into(),
        ));
    }
    let workers = match cfg.workers {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        w => w,
    };
    if workers > MAX_WORKERS {
        return Err(UdpError::Config(format!(
            "{workers} workers: at most {MAX_WORKERS} (TUN queue limit)"
        )));
    }
    Ok(workers)
}

impl UdpDatapath {
    /// Creates the TUN device and sockets in the calling thread's network
    /// namespace and starts the workers. The peer table starts empty.
    pub fn start(cfg: UdpConfig) -> Result<UdpDatapath, UdpError> {
        let workers = validate(&cfg)?;
        let name = cfg.tun_name.clone();
        let stop_fd = sys::eventfd().map_err(UdpError::EventFd)?;
        let shared = Arc::new(Shared {
            gen: AtomicU64::new(0),
            table: RwLock::new(Arc::new(PeerTable::default())),
            stop: AtomicBool::new(false),
            stop_fd,
            port: cfg.port,
            decrement_ttl: cfg.decrement_ttl,
            mtu: AtomicUsize::new(cfg.mtu as usize),
        });

        // TUN queues; the first creates the device (or, persisting, attaches
        // to the one a previous datapath left).
        let adopted = cfg.persist && sys::link_exists(&name);
        let mut queues = Vec::with_capacity(workers);
        for q in 0..workers {
            let fd = sys::open_tun_queue(&name, q == 0 && !cfg.persist).map_err(|source| {
                UdpError::TunOpen {
                    name: name.clone(),
                    queue: q,
                    source,
                }
            })?;
            queues.push(Arc::new(fd));
        }
        let q0 = queues[0].as_raw_fd();
        let tun_err = |what| {
            let name = name.clone();
            move |source| UdpError::TunConfig { name, what, source }
        };
        sys::tun_set_vnet_hdr_sz(q0, vnet::VNET_HDR_LEN as i32)
            .map_err(tun_err("TUNSETVNETHDRSZ"))?;
        if let Err(e) = sys::tun_set_vnet_le(q0) {
            if cfg!(target_endian = "big") {
                return Err(tun_err("TUNSETVNETLE")(e));
            }
            tracing::debug!(device = %name, "TUNSETVNETLE refused ({e}); native little-endian headers apply");
        }
        let mut tun_offload = 0;
        if cfg.offloads {
            for (flags, label) in OFFLOAD_TRIES {
                match sys::tun_set_offload(q0, flags) {
                    Ok(()) => {
                        tun_offload = flags;
                        if flags != OFFLOAD_TRIES[0].0 {
                            tracing::warn!(device = %name, offloads = %label, "TUN device: kernel refused the preferred offloads; using a smaller set");
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::info!(device = %name, offloads = %label, "TUNSETOFFLOAD refused: {e}")
                    }
                }
            }
            if tun_offload == 0 {
                tracing::warn!(device = %name, "TUN device: no offload accepted; one packet per read");
            }
        }
        if let Err(e) = sys::disable_ipv6(&name) {
            tracing::debug!(device = %name, "cannot disable IPv6 on the device: {e}");
        }
        sys::set_mtu(&name, cfg.mtu).map_err(|source| UdpError::SetMtu {
            name: name.clone(),
            mtu: cfg.mtu,
            source,
        })?;
        sys::set_up(&name).map_err(|source| UdpError::LinkUp {
            name: name.clone(),
            source,
        })?;

        // Sockets.
        let addr = SocketAddrV4::new(cfg.local_ip, cfg.port);
        let mut socks = Vec::with_capacity(workers);
        let (mut udp_gso, mut udp_gro) = (cfg.offloads, cfg.offloads);
        for w in 0..workers {
            let fd = sys::udp_socket(addr).map_err(|source| UdpError::Socket {
                addr,
                worker: w,
                source,
            })?;
            let raw = fd.as_raw_fd();
            for (force, plain, what) in [
                (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "SO_RCVBUF"),
                (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "SO_SNDBUF"),
            ] {
                if sys::setsockopt_int(raw, libc::SOL_SOCKET, force, SOCKET_BUFFER).is_err() {
                    sys::setsockopt_int(raw, libc::SOL_SOCKET, plain, SOCKET_BUFFER)
                        .map_err(|source| UdpError::SocketOption { addr, what, source })?;
                }
            }
            if udp_gro {
                if let Err(e) = sys::setsockopt_int(raw, sys::SOL_UDP, libc::UDP_GRO, 1) {
                    tracing::warn!(%addr, "UDP_GRO not supported ({e}); receiving one datagram per slot");
                    udp_gro = false;
                }
            }
            if udp_gso {
                if let Err(e) = sys::getsockopt_int(raw, sys::SOL_UDP, libc::UDP_SEGMENT) {
                    tracing::warn!(%addr, "UDP_SEGMENT not supported ({e}); sending one datagram per packet");
                    udp_gso = false;
                }
            }
            socks.push(Arc::new(fd));
        }
        let local = sys::local_addr(socks[0].as_raw_fd()).unwrap_or(addr);

        let features = Features {
            tun_offload,
            udp_gso,
            udp_gro,
            tun_gro: cfg.offloads,
            workers,
        };
        let mut dp = UdpDatapath {
            shared,
            tun0: queues[0].clone(),
            adopted,
            counters: Vec::new(),
            threads: Vec::new(),
            local,
            tun_name: name.clone(),
            features,
        };
        for (w, (tun, sock)) in queues.into_iter().zip(socks).enumerate() {
            for dir in ["tx", "rx"] {
                let counters = Arc::new(stats::Counters::default());
                dp.counters.push(counters.clone());
                let ctx = Ctx {
                    index: w,
                    shared: dp.shared.clone(),
                    tun: tun.clone(),
                    sock: sock.clone(),
                    counters,
                    udp_offload: udp_gso,
                    tun_gro: cfg.offloads,
                    nice: cfg.nice,
                };
                let tname = format!("udp-{dir}{w}");
                let spawned = std::thread::Builder::new()
                    .name(tname.clone())
                    .spawn(move || {
                        if dir == "tx" {
                            worker::run_tx(ctx)
                        } else {
                            worker::run_rx(ctx)
                        }
                    });
                match spawned {
                    Ok(h) => dp.threads.push(h),
                    // `dp` is dropped here: the threads already started stop.
                    Err(source) => {
                        return Err(UdpError::Spawn {
                            name: tname,
                            source,
                        })
                    }
                }
            }
        }
        // Last, so that a start failing earlier leaves no device it created.
        if cfg.persist {
            sys::tun_set_persist(dp.tun0.as_raw_fd(), true).map_err(tun_err("TUNSETPERSIST"))?;
        }
        tracing::info!(device = %name, mtu = cfg.mtu, %local, workers, adopted, tun_offload = format!("{tun_offload:#x}"), udp_gso, udp_gro, "UDP datapath started");
        Ok(dp)
    }

    /// Tells the workers the TUN device's MTU changed (the caller changed it): received inner
    /// packets longer than that are handled as TCP super-packets.
    pub fn set_mtu(&self, mtu: u32) {
        self.shared.mtu.store(mtu as usize, Ordering::Relaxed);
    }

    /// Replaces the peer table: `(peer subnet, peer public IP)` pairs. Takes
    /// effect at each worker's next batch. Entries for our own `local_ip`
    /// are ignored; for a duplicated subnet the first entry wins.
    pub fn set_peers(&self, peers: &[(Ipv4Net, Ipv4Addr)]) {
        let table = Arc::new(PeerTable::new(peers, *self.local.ip()));
        *self.shared.table.write().unwrap_or_else(|e| e.into_inner()) = table;
        self.shared.gen.fetch_add(1, Ordering::Release);
    }

    /// The counters summed over all workers.
    pub fn stats(&self) -> UdpStats {
        let mut s = UdpStats::default();
        for c in &self.counters {
            c.add_to(&mut s);
        }
        s
    }

    /// What the kernel agreed to.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The address the sockets are bound to.
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// The TUN device name.
    pub fn tun_name(&self) -> &str {
        &self.tun_name
    }

    /// Stops the workers, waits for them, and closes the device (which
    /// stays if it is persistent).
    pub fn stop(self) {}

    /// Stops the workers and removes the device, persistent or not.
    pub fn remove(self) -> Result<(), UdpError> {
        let r = sys::tun_set_persist(self.tun0.as_raw_fd(), false).map_err(|source| {
            UdpError::TunConfig {
                name: self.tun_name.clone(),
                what: "TUNSETPERSIST",
                source,
            }
        });
        drop(self);
        r
    }

    /// True when [`UdpConfig::persist`] found the device already there and
    /// attached to it instead of creating it.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Err(e) = sys::eventfd_signal(self.shared.stop_fd.as_raw_fd()) {
            // The flag alone still stops busy threads; idle ones would hang.
            tracing::error!("waking the UDP datapath workers: {e}");
        }
        for h in self.threads.drain(..) {
            if h.join().is_err() {
                tracing::error!("a UDP datapath thread panicked");
            }
        }
    }
}

impl Drop for UdpDatapath {
    fn drop(&mut self) {
        self.shutdown();
        tracing::info!(device = %self.tun_name, "UDP datapath stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtu_for_underlay() {
        assert_eq!(tun_mtu_for_underlay(1500), 1472);
        assert_eq!(tun_mtu_for_underlay(9001), 8973);
        assert_eq!(tun_mtu_for_underlay(10), 0);
        assert_eq!(UdpConfig::default().mtu, 1472);
        assert_eq!(UdpConfig::default().port, 8285);
    }

    #[test]
    fn datapath_handle_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<UdpDatapath>();
    }

    #[test]
    fn config_validation() {
        let ok = UdpConfig {
            workers: 3,
            ..Default::default()
        };
        assert_eq!(validate(&ok).unwrap(), 3);
        assert!(
            validate(&UdpConfig {
                workers: 0,
                ..Default::default()
            })
            .unwrap()
                >= 1
        );
        assert_eq!(
            validate(&UdpConfig {
                tun_name: "x".repeat(15),
                workers: 1,
                ..Default::default()
            })
            .unwrap(),
            1
        );
        let bad = [
            UdpConfig {
                tun_name: String::new(),
                ..ok.clone()
            },
            UdpConfig {
                tun_name: "x".repeat(16),
                ..ok.clone()
            },
            UdpConfig {
                tun_name: "a/b".into(),
                ..ok.clone()
            },
            UdpConfig {
                tun_name: "a b".into(),
                ..ok.clone()
            },
            UdpConfig {
                tun_name: "..".into(),
                ..ok.clone()
            },
            UdpConfig {
                mtu: 67,
                ..ok.clone()
            },
            UdpConfig {
                mtu: 65_536,
                ..ok.clone()
            },
            UdpConfig {
                port: 0,
                ..ok.clone()
            },
            UdpConfig {
                workers: MAX_WORKERS + 1,
                ..ok.clone()
            },
        ];
        for cfg in bad {
            let e = validate(&cfg).unwrap_err();
            assert!(matches!(e, UdpError::Config(_)), "{cfg:?}");
            assert!(
                e.to_string()
                    .starts_with("invalid UDP datapath configuration"),
                "{e}"
            );
        }
    }
}
