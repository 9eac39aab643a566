//! A batched DNS load generator (`sendmmsg`/`recvmmsg` on connected UDP sockets): dnsperf
//! needs a whole core for ~100k queries/s, which hides the capacity of the server under test
//! on a small machine. Closed loop (`window` queries outstanding) for the maximum rate, or
//! paced (`rate`) for latency percentiles.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const BATCH: usize = 64;
const HIST_US: usize = 200_000;

pub struct Report {
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub qps: f64,
    pub rcodes: [u64; 16],
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// p99 over every query sent in the measured period, the lost ones counted as slower than
    /// any answer (infinite when more than 1% were lost): a server that drops what it cannot
    /// answer quickly does not look faster than one that answers late.
    pub p99_all_us: f64,
    pub mean_us: f64,
    /// Time this (single-threaded) client spent runnable but waiting for its CPU during the
    /// measured period (`run_delay` of /proc/thread-self/schedstat), in µs; `None` where the
    /// kernel does not account it. Another task on the client's core delays both the queries
    /// due and the reading of answers, and shows in the percentiles as if the server were slow.
    pub wait_us: Option<f64>,
}

/// This thread's time spent runnable but not running, in ns (the second field of
/// /proc/thread-self/schedstat, kept by the scheduler when CONFIG_SCHED_INFO is set).
pub fn run_delay_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat").ok()?.split_whitespace().nth(1)?.parse().ok()
}

fn qtype(s: &str) -> Result<u16> {
    Ok(match s.to_ascii_uppercase().as_str() {
        "A" => 1,
        "NS" => 2,
        "CNAME" => 5,
        "SOA" => 6,
        "PTR" => 12,
        "TXT" => 16,
        "AAAA" => 28,
        "SRV" => 33,
        t => bail!("unknown type {t}"),
    })
}

/// dnsperf's query file format: `name type` per line.
pub fn load_queries(path: &Path) -> Result<Vec<Vec<u8>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')) {
        let mut w = line.split_whitespace();
        let (Some(name), Some(t)) = (w.next(), w.next()) else { bail!("bad line {line:?}") };
        let mut q = vec![0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend(netd_dns::wire::name_from_str(name).context("bad name")?);
        q.extend_from_slice(&qtype(t)?.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        out.push(q);
    }
    if out.is_empty() {
        bail!("no queries in {}", path.display());
    }
    Ok(out)
}

struct Sock {
    sock: UdpSocket,
    tx: Vec<[u8; 512]>,
    tx_iov: Vec<libc::iovec>,
    tx_hdr: Vec<libc::mmsghdr>,
    rx: Vec<[u8; 2048]>,
    rx_iov: Vec<libc::iovec>,
    rx_hdr: Vec<libc::mmsghdr>,
}

impl Sock {
    fn new(server: SocketAddr) -> Result<Box<Sock>> {
        let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
        let sock = UdpSocket::bind(bind)?;
        sock.connect(server)?;
        sock.set_nonblocking(true)?;
        // SAFETY: iovec and mmsghdr are plain C structs; all-zero is a valid value.
        let (iov0, hdr0) = unsafe { (std::mem::zeroed::<libc::iovec>(), std::mem::zeroed::<libc::mmsghdr>()) };
        let mut s = Box::new(Sock {
            sock,
            tx: vec![[0; 512]; BATCH],
            tx_iov: vec![iov0; BATCH],
            tx_hdr: vec![hdr0; BATCH],
            rx: vec![[0; 2048]; BATCH],
            rx_iov: vec![iov0; BATCH],
            rx_hdr: vec![hdr0; BATCH],
        });
        for i in 0..BATCH {
            s.tx_iov[i].iov_base = s.tx[i].as_mut_ptr().cast();
            s.tx_hdr[i].msg_hdr.msg_iov = &mut s.tx_iov[i];
            s.tx_hdr[i].msg_hdr.msg_iovlen = 1;
            s.rx_iov[i].iov_base = s.rx[i].as_mut_ptr().cast();
            s.rx_iov[i].iov_len = 2048;
            s.rx_hdr[i].msg_hdr.msg_iov = &mut s.rx_iov[i];
            s.rx_hdr[i].msg_hdr.msg_iovlen = 1;
        }
        Ok(s)
    }

    fn send(&mut self, n: usize) -> usize {
        // SAFETY: the first `n` headers point at our own buffers with their lengths set.
        let r = unsafe { libc::sendmmsg(self.sock.as_raw_fd(), self.tx_hdr.as_mut_ptr(), n as u32, libc::MSG_DONTWAIT) };
        r.max(0) as usize
    }

    fn recv(&mut self) -> usize {
        // SAFETY: the headers point at our own receive buffers, alive for the call.
        let r = unsafe {
            libc::recvmmsg(self.sock.as_raw_fd(), self.rx_hdr.as_mut_ptr(), BATCH as u32, libc::MSG_DONTWAIT, std::ptr::null_mut())
        };
        r.max(0) as usize
    }
}

/// Runs the load for `seconds`; `rate` 0 = as fast as the window allows.
pub fn run(server: SocketAddr, queries: &[Vec<u8>], seconds: f64, window: usize, rate: u64, sockets: usize) -> Result<Report> {
    let mut socks: Vec<Box<Sock>> = (0..sockets.max(1)).map(|_| Sock::new(server)).collect::<Result<_>>()?;
    let nsock = socks.len();
    // Per socket: send time (ns since start) per ID; u64::MAX = free.
    let mut slots: Vec<Vec<u64>> = vec![vec![u64::MAX; 65536]; nsock];
    let mut next_id = vec![0u16; nsock];
    let mut hist = vec![0u64; HIST_US + 1];
    let mut rep = Report { sent: 0, received: 0, lost: 0, qps: 0.0, rcodes: [0; 16], p50_us: 0.0, p99_us: 0.0, p999_us: 0.0, p99_all_us: 0.0, mean_us: 0.0, wait_us: None };
    let (mut qi, mut outstanding, mut sum_us) = (0usize, 0usize, 0f64);
    let start = Instant::now();
    let end = Duration::from_secs_f64(seconds);
    let warmup = Duration::from_secs_f64((seconds * 0.1).min(1.0));
    let mut measured_from: Option<(Instant, u64)> = None;
    let mut lost_before = 0u64;
    let mut wait_before = None;
    let mut last_reap = Instant::now();
    let mut turn = 0usize;
    loop {
        let now = start.elapsed();
        if now >= end {
            break;
        }
        if measured_from.is_none() && now >= warmup {
            measured_from = Some((Instant::now(), rep.received));
            lost_before = rep.lost;
            wait_before = run_delay_ns();
            hist.iter_mut().for_each(|h| *h = 0);
            sum_us = 0.0;
        }
        let s = turn % nsock;
        turn += 1;
        // Send.
        let mut budget = window.saturating_sub(outstanding).min(BATCH);
        if rate > 0 {
            let due = (now.as_secs_f64() * rate as f64) as u64;
            budget = budget.min(due.saturating_sub(rep.sent) as usize);
        }
        let sock = &mut socks[s];
        let tns = now.as_nanos() as u64;
        let mut k = 0;
        while k < budget {
            let id = next_id[s];
            next_id[s] = id.wrapping_add(1);
            if slots[s][id as usize] != u64::MAX {
                break; // the ID space is full of outstanding queries
            }
            let q = &queries[qi % queries.len()];
            qi += 1;
            sock.tx[k][..q.len()].copy_from_slice(q);
            sock.tx[k][..2].copy_from_slice(&id.to_be_bytes());
            sock.tx_iov[k].iov_len = q.len();
            slots[s][id as usize] = tns;
            k += 1;
        }
        if k > 0 {
            let sent = sock.send(k);
            // Unsent ones free their slots again.
            for j in sent..k {
                let id = u16::from_be_bytes([sock.tx[j][0], sock.tx[j][1]]);
                slots[s][id as usize] = u64::MAX;
            }
            rep.sent += sent as u64;
            outstanding += sent;
        }
        // Receive from every socket.
        let mut got = 0;
        for (si, sock) in socks.iter_mut().enumerate() {
            loop {
                let n = sock.recv();
                if n == 0 {
                    break;
                }
                got += n;
                let rns = start.elapsed().as_nanos() as u64;
                for i in 0..n {
                    let len = sock.rx_hdr[i].msg_len as usize;
                    if len < 12 {
                        continue;
                    }
                    let b = &sock.rx[i];
                    let id = u16::from_be_bytes([b[0], b[1]]) as usize;
                    let t = slots[si][id];
                    if t == u64::MAX {
                        continue;
                    }
                    slots[si][id] = u64::MAX;
                    outstanding -= 1;
                    rep.received += 1;
                    rep.rcodes[(b[3] & 0x0f) as usize] += 1;
                    let us = (rns.saturating_sub(t)) as f64 / 1000.0;
                    sum_us += us;
                    hist[(us as usize).min(HIST_US)] += 1;
                }
                if n < BATCH {
                    break;
                }
            }
        }
        // Queries unanswered for a second are lost.
        if last_reap.elapsed() > Duration::from_millis(100) {
            last_reap = Instant::now();
            let cutoff = (start.elapsed().as_nanos() as u64).saturating_sub(1_000_000_000);
            for sl in slots.iter_mut() {
                for v in sl.iter_mut() {
                    if *v != u64::MAX && *v < cutoff {
                        *v = u64::MAX;
                        outstanding -= 1;
                        rep.lost += 1;
                    }
                }
            }
        }
        if k == 0 && got == 0 {
            // Nothing to send and nothing arrived: sleep until a response comes (at most
            // 50 µs when pacing, so the send schedule holds).
            let mut pfds: Vec<libc::pollfd> =
                socks.iter().map(|s| libc::pollfd { fd: s.sock.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
            if rate > 0 {
                std::thread::sleep(Duration::from_micros(20));
            } else {
                // SAFETY: a live array of initialized pollfds.
                unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 1) };
            }
        }
    }
    if let (Some(a), Some(b)) = (wait_before, run_delay_ns()) {
        rep.wait_us = Some(b.saturating_sub(a) as f64 / 1000.0);
    }
    let (t0, r0) = measured_from.unwrap_or((start, 0));
    let measured = rep.received - r0;
    rep.qps = measured as f64 / t0.elapsed().as_secs_f64();
    let total: u64 = hist.iter().sum();
    if total > 0 {
        rep.mean_us = sum_us / total as f64;
        let pct = |p: f64| {
            let want = (p * total as f64).ceil() as u64;
            let mut acc = 0;
            for (us, c) in hist.iter().enumerate() {
                acc += c;
                if acc >= want {
                    return us as f64;
                }
            }
            HIST_US as f64
        };
        rep.p50_us = pct(0.5);
        rep.p99_us = pct(0.99);
        rep.p999_us = pct(0.999);
        let lost = rep.lost - lost_before;
        let want = (0.99 * (total + lost) as f64).ceil() as u64;
        rep.p99_all_us = f64::INFINITY;
        let mut acc = 0;
        for (us, c) in hist.iter().enumerate() {
            acc += c;
            if acc >= want {
                rep.p99_all_us = us as f64;
                break;
            }
        }
    }
    Ok(rep)
}
