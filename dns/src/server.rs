//! The server: per-core `SO_REUSEPORT` UDP sockets, each served by a worker thread that
//! receives and sends in batches (`recvmmsg`/`sendmmsg`) and answers from the current zone
//! snapshot without allocating; TCP, the forwarder and housekeeping on a small tokio runtime
//! that runs in a thread of its own (so the server can be started from sync or async code).

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use crate::acl::Acl;
use crate::answer::{handle, qtype_index, write_rcode, Ctx, ForwardRequest, Outcome, Transport, MAX_MESSAGE};
use crate::cache::Cache;
use crate::forward::Forwarder;
use crate::metrics::{snapshot, Counter, Counters, DnsMetrics};
use crate::hosts::Hosts;
use crate::skydns::SkyZone;
use crate::stub::ForwardZone;
use crate::wire::rcode;
use crate::zone::{Zone, ZoneConfig};
use crate::DnsError;

/// How the server runs. [`crate::Args::server_config`] builds one from flags.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Addresses served over UDP and TCP (port 0 picks a free port, the same for all sockets).
    pub listen: Vec<SocketAddr>,
    /// Add listen addresses no interface has to `lo`.
    pub add_to_lo: bool,
    /// UDP sockets (each with its worker thread) per listen address; 0 = one per CPU.
    pub workers: usize,
    pub upstreams: Vec<SocketAddr>,
    /// Wait for one upstream this long before trying the next.
    pub upstream_timeout: Duration,
    /// Forwards in flight at most.
    pub max_inflight: usize,
    /// Forward cache entries (0: no cache).
    pub cache_size: usize,
    /// Networks allowed recursion besides loopback and the node's own addresses.
    pub recursion_allowed: Vec<IpNet>,
    /// Our EDNS UDP payload size: the largest UDP response sent.
    pub udp_payload: u16,
    pub tcp_idle_timeout: Duration,
    pub max_tcp_connections: usize,
    /// Zone parameters, for the SERVFAIL-ing zone served until the first [`DnsServer::set_zone`].
    pub zone: ZoneConfig,
    /// Stub zones: names in them go to upstreams of their own ([`crate::stub`]).
    pub forward_zones: Vec<ForwardZone>,
    /// Serve expired cached answers up to this long past their TTL when every upstream fails.
    pub serve_stale: Option<Duration>,
    /// A hosts file answered before everything else ([`crate::hosts`]); reloaded when it changes.
    pub hosts_file: Option<std::path::PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec!["169.254.20.10:53".parse().expect("static address")],
            add_to_lo: true,
            workers: 0,
            upstreams: Vec::new(),
            upstream_timeout: Duration::from_secs(2),
            max_inflight: 1000,
            cache_size: 10000,
            recursion_allowed: Vec::new(),
            udp_payload: 1232,
            tcp_idle_timeout: Duration::from_secs(10),
            max_tcp_connections: 256,
            zone: ZoneConfig::default(),
            forward_zones: Vec::new(),
            serve_stale: None,
            hosts_file: None,
        }
    }
}

struct Shared {
    zone: ArcSwap<Zone>,
    sky: ArcSwap<SkyZone>,
    hosts: ArcSwap<Hosts>,
    acl: Acl,
    fwd: Arc<Forwarder>,
    workers: Box<[Counters]>,
    stop: AtomicBool,
    udp_cap: u16,
    tcp_connections: Counter,
    /// One permit per TCP connection being served.
    tcp_permits: Arc<Semaphore>,
    max_tcp: usize,
    tcp_rotation: AtomicU32,
    tcp_idle: Duration,
    /// Set by [`DnsServer::retire`]: the TCP listeners stop accepting.
    retired: watch::Sender<bool>,
}

/// A forward handed from a UDP worker to the runtime.
struct UdpJob {
    req: Box<ForwardRequest>,
    sock: Arc<UdpSocket>,
    client: SocketAddr,
}

/// A running DNS server. Dropping it stops it.
pub struct DnsServer {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    runtime: Option<JoinHandle<()>>,
    stop_tx: Option<oneshot::Sender<()>>,
    wake: OwnedFd,
    local: Vec<SocketAddr>,
    added_to_lo: Vec<IpAddr>,
    /// A descriptor of every listening socket (UDP and TCP), for a successor
    /// ([`crate::handover`]) or systemd's file descriptor store.
    listen_fds: Vec<OwnedFd>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer").field("listen", &self.local).field("sockets", &self.listen_fds.len()).finish()
    }
}

impl DnsServer {
    /// Adds missing listen addresses to `lo` (if configured), binds every socket, and starts
    /// the workers. Cluster names get SERVFAIL until [`DnsServer::set_zone`] is called.
    pub fn start(cfg: ServerConfig) -> Result<DnsServer, DnsError> {
        DnsServer::start_with(cfg, Vec::new(), None)
    }

    /// [`DnsServer::start`] serving on `inherited` listening sockets (from a predecessor, see
    /// [`crate::handover`], or from systemd) where they match a listen address, and on fresh ones
    /// elsewhere. Every inherited UDP socket of a listen address gets a worker, even beyond
    /// `cfg.workers`: a socket nobody reads would keep the share of the queries the kernel
    /// hashes onto it. Inherited sockets of addresses no longer listened on are closed.
    /// `zone`: served from the first query on (a successor must not answer SERVFAIL for names
    /// its predecessor answered), instead of the pending zone.
    pub fn start_with(cfg: ServerConfig, inherited: Vec<OwnedFd>, zone: Option<Arc<Zone>>) -> Result<DnsServer, DnsError> {
        if cfg.listen.is_empty() {
            return Err(DnsError::Config("no listen address".into()));
        }
        let added_to_lo = if cfg.add_to_lo {
            crate::lo::ensure_on_lo_blocking(cfg.listen.iter().map(|a| a.ip()).collect())?
        } else {
            Vec::new()
        };
        let nworkers = match cfg.workers {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        };

        let (mut inherited_udp, mut inherited_tcp) = sort_inherited(&cfg.listen, inherited);
        let nworkers = inherited_udp.iter().map(Vec::len).fold(nworkers, usize::max);
        let reused = inherited_udp.iter().map(Vec::len).sum::<usize>() + inherited_tcp.iter().flatten().count();

        // UDP: `nworkers` sockets per address, all on the first socket's port.
        let mut udp: Vec<Vec<Arc<UdpSocket>>> = Vec::new();
        let mut local = Vec::new();
        for (i, &addr) in cfg.listen.iter().enumerate() {
            let mut socks: Vec<Arc<UdpSocket>> = std::mem::take(&mut inherited_udp[i]).into_iter().map(Arc::new).collect();
            if socks.is_empty() {
                socks.push(Arc::new(udp_socket(addr).map_err(|e| DnsError::Bind { addr, proto: "udp", source: e })?));
            }
            let actual = socks[0].local_addr().map_err(|e| DnsError::Bind { addr, proto: "udp", source: e })?;
            while socks.len() < nworkers {
                socks.push(Arc::new(udp_socket(actual).map_err(|e| DnsError::Bind { addr: actual, proto: "udp", source: e })?));
            }
            udp.push(socks);
            local.push(actual);
        }
        let mut tcp = Vec::new();
        for (i, &addr) in local.iter().enumerate() {
            let l = match inherited_tcp[i].take() {
                Some(l) => l.set_nonblocking(true).map(|()| l),
                None => tcp_listener(addr),
            };
            tcp.push(l.map_err(|e| DnsError::Bind { addr, proto: "tcp", source: e })?);
        }
        let dup = |fd: BorrowedFd<'_>, addr: SocketAddr, proto| fd.try_clone_to_owned().map_err(|e| DnsError::Bind { addr, proto, source: e });
        let mut listen_fds = Vec::new();
        for (socks, &addr) in udp.iter().zip(&local) {
            for s in socks {
                listen_fds.push(dup(s.as_fd(), addr, "udp")?);
            }
        }
        for (l, &addr) in tcp.iter().zip(&local) {
            listen_fds.push(dup(l.as_fd(), addr, "tcp")?);
        }

        // SAFETY: eventfd takes plain integers; the result is checked before use.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: `efd` is a fresh descriptor that nothing else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(efd) };

        let hosts = match &cfg.hosts_file {
            Some(p) => Hosts::load(p).map_err(|e| DnsError::Config(format!("cannot read the hosts file {}: {e}", p.display())))?,
            None => Hosts::default(),
        };
        for why in &hosts.skipped {
            tracing::warn!("hosts file: skipping {why}");
        }
        let stale = cfg.serve_stale.map_or(0, |d| d.as_secs().min(u64::from(u32::MAX)) as u32);
        let cache = Arc::new(Cache::new(cfg.cache_size).with_stale(stale));
        let fwd = Arc::new(Forwarder::new(
            cfg.upstreams.clone(),
            cfg.forward_zones.clone(),
            cfg.upstream_timeout,
            cache,
            cfg.max_inflight,
            cfg.udp_payload.max(512),
        ));
        let shared = Arc::new(Shared {
            zone: ArcSwap::new(zone.unwrap_or_else(|| Arc::new(Zone::pending(&cfg.zone)))),
            sky: ArcSwap::from_pointee(SkyZone::default()),
            hosts: ArcSwap::from_pointee(hosts),
            acl: Acl::new(cfg.recursion_allowed.clone()),
            fwd,
            workers: (0..nworkers * udp.len()).map(|_| Counters::default()).collect(),
            stop: AtomicBool::new(false),
            udp_cap: cfg.udp_payload.max(512),
            tcp_connections: Counter::default(),
            tcp_permits: Arc::new(Semaphore::new(cfg.max_tcp_connections.max(1))),
            max_tcp: cfg.max_tcp_connections.max(1),
            tcp_rotation: AtomicU32::new(0),
            tcp_idle: cfg.tcp_idle_timeout,
            retired: watch::channel(false).0,
        });

        let (job_tx, job_rx) = mpsc::unbounded_channel::<UdpJob>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), DnsError>>();
        let rt_shared = shared.clone();
        let hosts_file = cfg.hosts_file.clone();
        let runtime = std::thread::Builder::new()
            .name("netd-dns-rt".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("netd-dns-fwd")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                rt.block_on(async move {
                    for l in tcp {
                        match tokio::net::TcpListener::from_std(l) {
                            Ok(l) => {
                                tokio::spawn(tcp_accept(rt_shared.clone(), l));
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(e.into()));
                                return;
                            }
                        }
                    }
                    tokio::spawn(dispatch(rt_shared.fwd.clone(), job_rx));
                    tokio::spawn(rt_shared.fwd.clone().health_checks());
                    let acl_shared = rt_shared.clone();
                    let hosts_file = hosts_file.clone();
                    tokio::spawn(async move {
                        let mut tick = tokio::time::interval(Duration::from_secs(5));
                        loop {
                            tick.tick().await;
                            acl_shared.acl.refresh();
                            if let Some(p) = &hosts_file {
                                reload_hosts(&acl_shared, p);
                            }
                        }
                    });
                    let _ = ready_tx.send(Ok(()));
                    let _ = stop_rx.await;
                });
                rt.shutdown_timeout(Duration::from_millis(500));
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(DnsError::Config("the DNS runtime thread died".into())),
        }

        // One thread per socket (per core and listen address): a thread with a single socket
        // blocks in recvmmsg itself instead of in epoll_wait (one system call less per wake-up).
        let mut workers = Vec::with_capacity(nworkers * udp.len());
        for i in 0..nworkers {
            for (a, per_addr) in udp.iter().enumerate() {
                let idx = i * udp.len() + a;
                let socks = vec![per_addr[i].clone()];
                let shared = shared.clone();
                let tx = job_tx.clone();
                let wake_fd = wake.as_raw_fd();
                workers.push(
                    std::thread::Builder::new()
                        .name(format!("netd-dns-udp{idx}"))
                        .spawn(move || worker(shared, idx, socks, wake_fd, tx))?,
                );
            }
        }
        let addrs = |a: &[SocketAddr]| a.iter().map(SocketAddr::to_string).collect::<Vec<_>>().join(",");
        tracing::info!(listen = %addrs(&local), workers = nworkers, inherited_sockets = reused, upstreams = %addrs(&cfg.upstreams), "DNS server started");
        Ok(DnsServer { shared, workers: Mutex::new(workers), runtime: Some(runtime), stop_tx: Some(stop_tx), wake, local, added_to_lo, listen_fds })
    }

    /// Every listening socket (UDP and TCP), to hand to a successor or to systemd.
    pub fn listen_sockets(&self) -> Vec<BorrowedFd<'_>> {
        self.listen_fds.iter().map(|f| f.as_fd()).collect()
    }

    /// Stops reading the listening sockets (a successor serves them now): the UDP workers answer
    /// what they have received and end, the TCP listeners stop accepting. Forwards in flight and
    /// accepted TCP connections go on until [`DnsServer::drain`] sees them done. The sockets stay
    /// open (closing ours closes nothing the successor holds).
    pub fn retire(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.wake_workers();
        self.shared.retired.send_replace(true);
    }

    /// True once [`DnsServer::retire`] was called.
    pub fn retired(&self) -> bool {
        *self.shared.retired.borrow()
    }

    /// Waits (up to `timeout`) until a retired server has answered everything it took: the UDP
    /// workers ended, no forward in flight, no TCP connection open. Returns whether it has.
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let s = &self.shared;
            let workers_done = self.workers.lock().unwrap_or_else(|p| p.into_inner()).iter().all(|w| w.is_finished());
            if workers_done && s.fwd.in_flight() == 0 && s.tcp_permits.available_permits() == s.max_tcp {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wake_workers(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe {
            libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), size_of::<u64>());
        }
    }

    /// Serves `zone` from now on (atomic: a query sees the old or the new zone, whole).
    pub fn set_zone(&self, zone: Arc<Zone>) {
        self.shared.zone.store(zone);
    }

    /// The zone being served.
    pub fn zone(&self) -> Arc<Zone> {
        self.shared.zone.load_full()
    }

    /// Serves these SkyDNS records from now on (atomic, like [`DnsServer::set_zone`]).
    pub fn set_skydns(&self, sky: Arc<SkyZone>) {
        self.shared.sky.store(sky);
    }

    /// The SkyDNS records being served.
    pub fn skydns(&self) -> Arc<SkyZone> {
        self.shared.sky.load_full()
    }

    /// Replaces the upstream resolvers (e.g. after resolv.conf changed).
    pub fn set_upstreams(&self, upstreams: Vec<SocketAddr>) {
        self.shared.fwd.set_upstreams(upstreams);
    }

    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.shared.fwd.upstreams()
    }

    /// The bound addresses (with the actual port when 0 was asked).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local
    }

    /// Addresses this server added to `lo` at start (left there on stop: the kernel keeps
    /// netd's state across restarts; `lo::remove_ours_from_lo` is for cleanup).
    pub fn added_to_lo(&self) -> &[IpAddr] {
        &self.added_to_lo
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> DnsMetrics {
        let s = &self.shared;
        let mut m = snapshot(s.workers.iter().chain(std::iter::once(&s.fwd.counters)), &s.fwd.stats);
        m.cache_entries = s.fwd.cache.len() as u64;
        m.forwards_in_flight = s.fwd.in_flight() as u64;
        m.tcp_connections = s.tcp_connections.get();
        m.zone_serial = s.zone.load().serial;
        m
    }

    /// Stops the workers and the runtime and waits for them.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.wake_workers();
        for w in self.workers.get_mut().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = w.join();
        }
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.runtime.take() {
            let _ = rt.join();
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Sorts inherited sockets by listen address (index into `listen`): UDP sockets, and one TCP
/// listener. Sockets of no listen address, or that cannot be inspected, are closed (and logged).
fn sort_inherited(listen: &[SocketAddr], inherited: Vec<OwnedFd>) -> (Vec<Vec<UdpSocket>>, Vec<Option<std::net::TcpListener>>) {
    let mut udp: Vec<Vec<UdpSocket>> = listen.iter().map(|_| Vec::new()).collect();
    let mut tcp: Vec<Option<std::net::TcpListener>> = listen.iter().map(|_| None).collect();
    for fd in inherited {
        let raw = fd.as_raw_fd();
        let s = Socket::from(fd);
        let kind = s.local_addr().map(|a| a.as_socket()).and_then(|a| Ok((a, s.r#type()?)));
        match kind {
            Ok((Some(addr), ty)) => match (listen_slot(listen, addr), ty) {
                (Some(i), Type::DGRAM) => udp[i].push(s.into()),
                (Some(i), Type::STREAM) if tcp[i].is_none() => tcp[i] = Some(s.into()),
                _ => tracing::warn!(fd = raw, %addr, "inherited DNS socket is not one of the listen addresses; closed"),
            },
            Ok((None, _)) => tracing::warn!(fd = raw, "inherited DNS socket is not an IP socket; closed"),
            Err(e) => tracing::warn!(fd = raw, error = %e, "cannot inspect an inherited DNS socket; closed"),
        }
    }
    (udp, tcp)
}

/// Which listen address a socket bound to `bound` serves: the same IP, and the same port unless
/// the listen address asks for any port (0).
fn listen_slot(listen: &[SocketAddr], bound: SocketAddr) -> Option<usize> {
    listen.iter().position(|l| l.ip() == bound.ip() && (l.port() == bound.port() || l.port() == 0))
}

fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
        let _ = s.set_freebind_v6(true);
    } else {
        let _ = s.set_freebind_v4(true);
    }
    set_recv_buffer_force(&s, 4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// A receive buffer of `bytes` even above `net.core.rmem_max` (SO_RCVBUFFORCE, which netd's
/// CAP_NET_ADMIN allows), else as big as SO_RCVBUF gets: while netd restarts, queries wait in the
/// socket (systemd's descriptor store, a successor starting), and a default-sized buffer
/// (~200 packets) overflows after a fifth of a second at 1,000 queries/s.
fn set_recv_buffer_force(s: &Socket, bytes: usize) {
    let val = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt on a live descriptor with a pointer to a c_int and its size.
    let r = unsafe {
        libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, (&val as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    if r != 0 {
        let _ = s.set_recv_buffer_size(bytes);
    }
}

fn tcp_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    // A netd that could not take its predecessor's sockets over still starts beside it.
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
        let _ = s.set_freebind_v6(true);
    } else {
        let _ = s.set_freebind_v4(true);
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

const BATCH: usize = 32;
const RX_SIZE: usize = 4096;
const TX_SIZE: usize = 4096;
/// Batches taken from one socket before the others get a turn.
const MAX_BATCHES_PER_WAKE: usize = 16;

/// Buffers and message headers for one `recvmmsg`/`sendmmsg` round. Heap-allocated once and
/// never moved: the headers point into the buffers.
struct Batch {
    rx: Box<[u8]>,
    tx: Box<[u8]>,
    addrs: Box<[libc::sockaddr_storage]>,
    rx_iov: Box<[libc::iovec]>,
    rx_hdr: Box<[libc::mmsghdr]>,
    tx_iov: Box<[libc::iovec]>,
    tx_hdr: Box<[libc::mmsghdr]>,
    /// Receive headers the kernel filled in the last `recv` (to be reset before the next):
    /// resetting only those keeps a one-datagram wake-up from touching 32 cache lines.
    filled: usize,
}

impl Batch {
    fn new() -> Batch {
        // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs for which all-zero
        // bytes are a valid value (null pointers, zero lengths).
        let (addr0, iov0, hdr0) = unsafe {
            (
                std::mem::zeroed::<libc::sockaddr_storage>(),
                std::mem::zeroed::<libc::iovec>(),
                std::mem::zeroed::<libc::mmsghdr>(),
            )
        };
        let mut b = Batch {
            rx: vec![0u8; BATCH * RX_SIZE].into_boxed_slice(),
            tx: vec![0u8; BATCH * TX_SIZE].into_boxed_slice(),
            addrs: vec![addr0; BATCH].into_boxed_slice(),
            rx_iov: vec![iov0; BATCH].into_boxed_slice(),
            rx_hdr: vec![hdr0; BATCH].into_boxed_slice(),
            tx_iov: vec![iov0; BATCH].into_boxed_slice(),
            tx_hdr: vec![hdr0; BATCH].into_boxed_slice(),
            filled: BATCH,
        };
        for i in 0..BATCH {
            b.rx_iov[i].iov_base = b.rx[i * RX_SIZE..].as_mut_ptr().cast();
            b.rx_iov[i].iov_len = RX_SIZE;
            b.rx_hdr[i].msg_hdr.msg_iov = &mut b.rx_iov[i];
            b.rx_hdr[i].msg_hdr.msg_iovlen = 1;
            b.rx_hdr[i].msg_hdr.msg_name = (&mut b.addrs[i] as *mut libc::sockaddr_storage).cast();
            b.tx_iov[i].iov_base = b.tx[i * TX_SIZE..].as_mut_ptr().cast();
            b.tx_hdr[i].msg_hdr.msg_iov = &mut b.tx_iov[i];
            b.tx_hdr[i].msg_hdr.msg_iovlen = 1;
        }
        b
    }

    /// Receives up to BATCH datagrams; returns how many. `flags`: `MSG_DONTWAIT`, or
    /// `MSG_WAITFORONE` on a blocking socket (wait for one, then take what is there).
    fn recv(&mut self, fd: RawFd, flags: libc::c_int) -> usize {
        for h in self.rx_hdr[..self.filled].iter_mut() {
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: the headers point into buffers owned by `self` that outlive the call, with
        // the lengths given; the kernel writes at most that much.
        let n = unsafe {
            libc::recvmmsg(fd, self.rx_hdr.as_mut_ptr(), BATCH as libc::c_uint, flags, std::ptr::null_mut())
        };
        self.filled = n.clamp(0, BATCH as libc::c_int) as usize;
        self.filled
    }

    /// Sends the first `k` prepared replies; a reply the kernel refuses is skipped.
    fn send(&mut self, fd: RawFd, k: usize) {
        let mut sent = 0;
        let mut waits = 0;
        while sent < k {
            // SAFETY: headers `sent..k` were filled by `reply` and point into our buffers and
            // into `addrs`, all alive for the call.
            let r = unsafe {
                libc::sendmmsg(fd, self.tx_hdr[sent..].as_mut_ptr(), (k - sent) as libc::c_uint, libc::MSG_DONTWAIT)
            };
            if r > 0 {
                sent += r as usize;
                continue;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN) if waits < 3 => {
                    waits += 1;
                    let mut p = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut p, 1, 10) };
                }
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN) => return,
                _ => sent += 1,
            }
        }
    }

    fn client(&self, i: usize) -> Option<SocketAddr> {
        sockaddr_to_std(&self.addrs[i], self.rx_hdr[i].msg_hdr.msg_namelen)
    }

    /// Prepares reply slot `k` (length `len`, already in `tx`) to the sender of datagram `i`.
    fn reply(&mut self, k: usize, i: usize, len: usize) {
        self.tx_iov[k].iov_len = len;
        self.tx_hdr[k].msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
        self.tx_hdr[k].msg_hdr.msg_namelen = self.rx_hdr[i].msg_hdr.msg_namelen;
    }
}

fn sockaddr_to_std(ss: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says this storage holds a sockaddr_in, which fits in it.
            let sin = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = u32::from_be(sin.sin_addr.s_addr).into();
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family says this storage holds a sockaddr_in6, which fits in it.
            let sin6 = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                sin6.sin6_addr.s6_addr.into(),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// How long a worker with a single socket blocks in `recvmmsg` before it looks at the stop
/// flag.
const STOP_POLL: Duration = Duration::from_millis(100);

/// One UDP worker. With one socket (one listen address, the usual case) it blocks in
/// `recvmmsg(MSG_WAITFORONE)` itself: a wake-up costs two system calls (receive, send), not
/// three (epoll_wait, receive, send), which is a good part of the cost of a query at moderate
/// rates, when batches hold one or two datagrams. With several sockets it waits on epoll.
fn worker(shared: Arc<Shared>, idx: usize, socks: Vec<Arc<UdpSocket>>, wake_fd: RawFd, jobs: mpsc::UnboundedSender<UdpJob>) {
    let mut w = Worker { shared: &shared, counters: &shared.workers[idx], batch: Batch::new(), jobs, rotation: (idx as u32).wrapping_mul(7919) };
    if socks.len() == 1 && blocking_with_timeout(&socks[0]).is_ok() {
        let fd = socks[0].as_raw_fd();
        while !shared.stop.load(Ordering::Relaxed) {
            let n = w.batch.recv(fd, libc::MSG_WAITFORONE);
            if n > 0 {
                w.serve(&socks[0], fd, n);
            }
        }
        return;
    }
    // epoll (registered once, level-triggered, no timeout: the eventfd wakes us to stop)
    // costs less per wake-up than poll(2), which re-registers every descriptor and arms a
    // timer on each call.
    // SAFETY: epoll_create1 takes a flag and returns a new descriptor or -1 (checked).
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        tracing::error!(error = %io::Error::last_os_error(), "DNS worker cannot create an epoll instance");
        return;
    }
    // SAFETY: `ep` is a fresh descriptor that nothing else owns.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    let fds: Vec<RawFd> = socks.iter().map(|s| s.as_raw_fd()).chain(std::iter::once(wake_fd)).collect();
    for (j, &fd) in fds.iter().enumerate() {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: j as u64 };
        // SAFETY: registers a live descriptor with a valid event struct.
        if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            tracing::error!(error = %io::Error::last_os_error(), "DNS worker cannot register a socket");
            return;
        }
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; fds.len()];
    let mut ready = vec![false; socks.len()];
    while !shared.stop.load(Ordering::Relaxed) {
        // SAFETY: `events` is a live array of the given length.
        let r = unsafe { libc::epoll_wait(ep.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                tracing::warn!(error = %e, "DNS worker epoll_wait failed");
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        ready.iter_mut().for_each(|r| *r = false);
        for ev in &events[..r as usize] {
            if let Some(slot) = ready.get_mut(ev.u64 as usize) {
                *slot = true;
            }
        }
        for j in 0..socks.len() {
            if !ready[j] {
                continue;
            }
            let fd = fds[j];
            for _ in 0..MAX_BATCHES_PER_WAKE {
                let n = w.batch.recv(fd, libc::MSG_DONTWAIT);
                if n == 0 {
                    break;
                }
                w.serve(&socks[j], fd, n);
                if n < BATCH {
                    break;
                }
            }
        }
    }
}

/// Makes a worker's socket blocking with a receive timeout (so the worker notices `stop`).
/// Every other use of the socket passes `MSG_DONTWAIT`.
fn blocking_with_timeout(sock: &UdpSocket) -> io::Result<()> {
    let s = socket2::SockRef::from(sock);
    s.set_read_timeout(Some(STOP_POLL))?;
    s.set_nonblocking(false)
}

struct Worker<'a> {
    shared: &'a Shared,
    counters: &'a Counters,
    batch: Batch,
    jobs: mpsc::UnboundedSender<UdpJob>,
    rotation: u32,
}

impl Worker<'_> {
    /// Answers the `n` datagrams in the batch and sends the replies in one `sendmmsg`.
    fn serve(&mut self, sock: &Arc<UdpSocket>, fd: RawFd, n: usize) {
        let shared = self.shared;
        let counters = self.counters;
        let batch = &mut self.batch;
        let zone = shared.zone.load();
        let sky = shared.sky.load();
        let hosts = shared.hosts.load();
        let mut k = 0;
        for i in 0..n {
            let hdr = &batch.rx_hdr[i];
            let len = hdr.msg_len as usize;
            let Some(client) = batch.client(i) else {
                counters.dropped.inc();
                continue;
            };
            if hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || len > RX_SIZE {
                counters.dropped.inc();
                continue;
            }
            let ctx = Ctx {
                zone: &zone,
                sky: &sky,
                hosts: &hosts,
                cache: &shared.fwd.cache,
                acl: &shared.acl,
                counters,
                udp_cap: shared.udp_cap,
                rotation: self.rotation,
            };
            self.rotation = self.rotation.wrapping_add(1);
            let rx = &batch.rx[i * RX_SIZE..i * RX_SIZE + len];
            let out = &mut batch.tx[k * TX_SIZE..(k + 1) * TX_SIZE];
            match handle(&ctx, rx, client.ip(), Transport::Udp, out) {
                Outcome::Reply(len) => {
                    if out[2] & 0x02 != 0 {
                        counters.truncated.inc();
                    }
                    batch.reply(k, i, len);
                    k += 1;
                }
                Outcome::Forward(req) => {
                    if shared.fwd.try_begin() {
                        let job = UdpJob { req, sock: sock.clone(), client };
                        if self.jobs.send(job).is_err() {
                            shared.fwd.end();
                        }
                    } else {
                        counters.forward_rejected.inc();
                        counters.request(qtype_index(req.qtype), rcode::SERVFAIL);
                        let len = write_rcode(&req.info(), rcode::SERVFAIL, false, true, shared.udp_cap, out);
                        batch.reply(k, i, len);
                        k += 1;
                    }
                }
                Outcome::Drop => {}
            }
        }
        drop((zone, sky, hosts));
        if k > 0 {
            batch.send(fd, k);
        }
    }
}

/// Reads the hosts file again when its modification time changed; a file that cannot be read
/// keeps the last one.
fn reload_hosts(shared: &Shared, path: &std::path::Path) {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    if modified.is_none() || modified == shared.hosts.load().modified {
        return;
    }
    match Hosts::load(path) {
        Ok(h) => {
            for why in &h.skipped {
                tracing::warn!("hosts file: skipping {why}");
            }
            tracing::info!(path = %path.display(), "hosts file reloaded");
            shared.hosts.store(Arc::new(h));
        }
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot read the hosts file; keeping the last one"),
    }
}

/// Runs UDP forwards handed over by the workers, one task each.
async fn dispatch(fwd: Arc<Forwarder>, mut rx: mpsc::UnboundedReceiver<UdpJob>) {
    while let Some(job) = rx.recv().await {
        let fwd = fwd.clone();
        tokio::spawn(async move {
            let mut out = vec![0u8; job.req.limit.max(512)];
            let n = fwd.answer(&job.req, &mut out).await;
            fwd.end();
            // The worker's socket may be blocking: never wait here.
            let sent = socket2::SockRef::from(&*job.sock).send_to_with_flags(&out[..n], &job.client.into(), libc::MSG_DONTWAIT);
            if let Err(e) = sent {
                tracing::debug!(client = %job.client, error = %e, "cannot send forwarded answer");
            }
        });
    }
}

/// Accepts until the server is retired (then the listener is closed here; a successor holds it).
async fn tcp_accept(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    let mut retired = shared.retired.subscribe();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = retired.wait_for(|r| *r) => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = shared.tcp_permits.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        shared.tcp_connections.inc();
        let shared = shared.clone();
        tokio::spawn(async move {
            tcp_conn(&shared, stream, peer).await;
            drop(permit);
        });
    }
}

/// One TCP connection: length-prefixed queries answered in order until idle or closed.
async fn tcp_conn(shared: &Shared, mut stream: tokio::net::TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let idle = shared.tcp_idle;
    let mut inbuf = vec![0u8; MAX_MESSAGE];
    let mut out = vec![0u8; MAX_MESSAGE + 2];
    loop {
        let len = match tokio::time::timeout(idle, stream.read_u16()).await {
            Ok(Ok(l)) => l as usize,
            _ => return,
        };
        if !matches!(tokio::time::timeout(idle, stream.read_exact(&mut inbuf[..len])).await, Ok(Ok(_))) {
            return;
        }
        let outcome = {
            let zone = shared.zone.load();
            let sky = shared.sky.load();
            let hosts = shared.hosts.load();
            let ctx = Ctx {
                zone: &zone,
                sky: &sky,
                hosts: &hosts,
                cache: &shared.fwd.cache,
                acl: &shared.acl,
                counters: &shared.fwd.counters,
                udp_cap: shared.udp_cap,
                rotation: shared.tcp_rotation.fetch_add(1, Ordering::Relaxed),
            };
            handle(&ctx, &inbuf[..len], peer.ip(), Transport::Tcp, &mut out[2..])
        };
        let n = match outcome {
            Outcome::Reply(n) => n,
            Outcome::Forward(req) => {
                if shared.fwd.try_begin() {
                    let n = shared.fwd.answer(&req, &mut out[2..]).await;
                    shared.fwd.end();
                    n
                } else {
                    shared.fwd.counters.forward_rejected.inc();
                    shared.fwd.counters.request(qtype_index(req.qtype), rcode::SERVFAIL);
                    write_rcode(&req.info(), rcode::SERVFAIL, false, true, shared.udp_cap, &mut out[2..])
                }
            }
            Outcome::Drop => return,
        };
        out[..2].copy_from_slice(&(n as u16).to_be_bytes());
        if !matches!(tokio::time::timeout(idle, stream.write_all(&out[..n + 2])).await, Ok(Ok(_))) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As root (netd has CAP_NET_ADMIN), the receive buffer goes past net.core.rmem_max, so
    /// queries can wait in the socket through a restart on nodes with the default (~200 KiB).
    #[test]
    fn the_receive_buffer_goes_past_rmem_max() {
        let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap().trim().parse().unwrap();
        // The kernel doubles what it is given (bookkeeping), so SO_RCVBUF alone reaches 2 x rmem_max.
        let want = 2 * rmem_max + (1 << 20);
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        set_recv_buffer_force(&s, want);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let got = s.recv_buffer_size().unwrap();
            assert!(got >= want, "receive buffer {got} bytes, asked for {want} (rmem_max {rmem_max})");
        }
    }
}
