//! [`DnsLoad`]: a DNS load generator that counts. Queries go out at a fixed rate from several UDP
//! sockets (so the server's `SO_REUSEPORT` group spreads them over all its sockets), each with its
//! own id; a query without an answer within [`LOSS_TIMEOUT`] is lost. Used by the upgrade test and
//! the upgrade bench: "0 lost" is asserted by count, the longest gap between answers is reported.

use crate::thread_in_netns;
use anyhow::{bail, Context, Result};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// An unanswered query counts as lost after this long (what a resolver waits by default, and
/// more than twice what a query on a loaded node takes).
pub const LOSS_TIMEOUT: Duration = Duration::from_secs(2);

/// Queries in flight are told apart by id, so at most this many per [`LOSS_TIMEOUT`].
const IDS: u64 = 1 << 16;

/// What a [`DnsLoad`] run counted.
#[derive(Debug, Clone, Default)]
pub struct DnsLoadReport {
    pub sent: u64,
    /// Answered within [`LOSS_TIMEOUT`].
    pub answered: u64,
    /// `sent - answered`: unanswered, or answered too late.
    pub lost: u64,
    /// Of the answered, those with an rcode other than NOERROR (a failed lookup all the same).
    pub errors: u64,
    /// Of the lost, those answered after [`LOSS_TIMEOUT`].
    pub late: u64,
    /// The longest time without any answer, while queries were being sent.
    pub longest_gap: Duration,
    /// The slowest answer.
    pub slowest: Duration,
    /// Sequence numbers of the first few lost queries (for a failure message).
    pub first_lost: Vec<u64>,
}

impl std::fmt::Display for DnsLoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} queries sent, {} answered ({} not NOERROR), {} lost ({} late), longest gap between answers {:.1} ms, slowest answer {:.1} ms",
            self.sent,
            self.answered,
            self.errors,
            self.lost,
            self.late,
            self.longest_gap.as_secs_f64() * 1000.0,
            self.slowest.as_secs_f64() * 1000.0
        )
    }
}

#[derive(Default)]
struct Log {
    /// Send time of query `seq`.
    sent: Vec<Instant>,
    /// First answer to query `seq`, and its rcode.
    answered: Vec<Option<(Instant, u8)>>,
}

/// A running load; [`DnsLoad::finish`] stops it and counts.
pub struct DnsLoad {
    stop_sending: Arc<AtomicBool>,
    stop_receiving: Arc<AtomicBool>,
    sender: Option<JoinHandle<()>>,
    receivers: Vec<JoinHandle<()>>,
    log: Arc<Mutex<Log>>,
}

/// A query for `qname` type A with id `id`, recursion desired.
pub fn dns_query(id: u16, qname: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in qname.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

impl DnsLoad {
    /// Starts sending `rate` queries per second for `qname` to `server` from `sockets` UDP
    /// sockets, created in network namespace `netns` (`ip netns` name; `None`: this one).
    pub fn start(netns: Option<&str>, server: SocketAddr, qname: &str, rate: u32, sockets: usize) -> Result<DnsLoad> {
        if rate == 0 || sockets == 0 {
            bail!("DnsLoad needs a rate and sockets");
        }
        let socks = open_sockets(netns, server, sockets)?;
        let (stop_sending, stop_receiving) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let log = Arc::new(Mutex::new(Log::default()));
        let mut receivers = Vec::new();
        for s in &socks {
            let s = s.try_clone()?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            let (stop, log) = (stop_receiving.clone(), log.clone());
            receivers.push(std::thread::Builder::new().name("dnsload-rx".into()).spawn(move || receive(s, stop, log))?);
        }
        let (stop2, log2, qname) = (stop_sending.clone(), log.clone(), qname.to_string());
        let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
        let sender = std::thread::Builder::new().name("dnsload-tx".into()).spawn(move || {
            let start = Instant::now();
            let mut seq: u64 = 0;
            while !stop2.load(Ordering::Relaxed) {
                let due = start + interval * seq as u32;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let q = dns_query((seq % IDS) as u16, &qname);
                {
                    let mut l = log2.lock().unwrap_or_else(|p| p.into_inner());
                    l.sent.push(Instant::now());
                    l.answered.push(None);
                }
                // A failed send (e.g. ECONNREFUSED reported from an earlier ICMP) is a query the
                // server never gets: it counts as lost, as it should.
                let _ = socks[(seq % socks.len() as u64) as usize].send(&q);
                seq += 1;
            }
        })?;
        Ok(DnsLoad { stop_sending, stop_receiving, sender: Some(sender), receivers, log })
    }

    /// Queries sent so far.
    pub fn sent(&self) -> u64 {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).sent.len() as u64
    }

    /// Answers received so far.
    pub fn answered(&self) -> u64 {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).answered.iter().flatten().count() as u64
    }

    /// Stops sending, waits [`LOSS_TIMEOUT`] for the last answers, and counts.
    pub fn finish(mut self) -> DnsLoadReport {
        self.stop_sending.store(true, Ordering::Relaxed);
        if let Some(s) = self.sender.take() {
            let _ = s.join();
        }
        std::thread::sleep(LOSS_TIMEOUT + Duration::from_millis(200));
        self.stop_receiving.store(true, Ordering::Relaxed);
        for r in self.receivers.drain(..) {
            let _ = r.join();
        }
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        report(&log.sent, &log.answered)
    }
}

impl Drop for DnsLoad {
    fn drop(&mut self) {
        self.stop_sending.store(true, Ordering::Relaxed);
        self.stop_receiving.store(true, Ordering::Relaxed);
        if let Some(s) = self.sender.take() {
            let _ = s.join();
        }
        for r in self.receivers.drain(..) {
            let _ = r.join();
        }
    }
}

fn open_sockets(netns: Option<&str>, server: SocketAddr, n: usize) -> Result<Vec<UdpSocket>> {
    let open = move || -> Result<Vec<UdpSocket>> {
        let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
        (0..n)
            .map(|_| {
                let s = UdpSocket::bind(bind).context("binding a DNS load socket")?;
                s.connect(server).with_context(|| format!("connecting a DNS load socket to {server}"))?;
                Ok(s)
            })
            .collect()
    };
    match netns {
        Some(name) => thread_in_netns(name, open).join().map_err(|_| anyhow::anyhow!("the DNS load socket thread panicked"))?,
        None => open(),
    }
}

fn receive(s: UdpSocket, stop: Arc<AtomicBool>, log: Arc<Mutex<Log>>) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        match s.recv(&mut buf) {
            Ok(n) if n >= 12 && buf[2] & 0x80 != 0 => {
                let now = Instant::now();
                let id = u64::from(u16::from_be_bytes([buf[0], buf[1]]));
                let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                // The latest query with this id (ids repeat every 65,536 queries).
                let sent = l.sent.len() as u64;
                if sent > id {
                    let seq = id + (sent - 1 - id) / IDS * IDS;
                    let slot = &mut l.answered[seq as usize];
                    if slot.is_none() {
                        *slot = Some((now, buf[3] & 0x0f));
                    }
                }
            }
            // Timeouts, and errors such as ECONNREFUSED (nobody listening for a moment).
            _ => {}
        }
    }
}

/// Counts from the send and first-answer times of every query.
fn report(sent: &[Instant], answered: &[Option<(Instant, u8)>]) -> DnsLoadReport {
    let mut r = DnsLoadReport { sent: sent.len() as u64, ..Default::default() };
    let mut times = Vec::new();
    for (seq, (s, a)) in sent.iter().zip(answered).enumerate() {
        match a {
            Some((a, rcode)) if a.duration_since(*s) <= LOSS_TIMEOUT => {
                r.answered += 1;
                r.errors += u64::from(*rcode != 0);
                r.slowest = r.slowest.max(a.duration_since(*s));
                times.push(*a);
            }
            other => {
                r.lost += 1;
                r.late += u64::from(other.is_some());
                if r.first_lost.len() < 10 {
                    r.first_lost.push(seq as u64);
                }
            }
        }
    }
    times.sort();
    // Gaps while queries were going out: from the first query to the last answer.
    let mut prev = sent.first().copied();
    for t in times {
        if let Some(p) = prev {
            r.longest_gap = r.longest_gap.max(t.saturating_duration_since(p));
        }
        prev = Some(t);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_wire_format() {
        let q = dns_query(0x1234, "a.bc.");
        assert_eq!(q, [0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 2, b'b', b'c', 0, 0, 1, 0, 1]);
    }

    #[test]
    fn counts_lost_and_late_answers_and_the_longest_gap() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let sent = [ms(0), ms(10), ms(20), ms(30)];
        let answered = [Some((ms(1), 0)), None, Some((ms(2500), 0)), Some((ms(400), 2))];
        let r = report(&sent, &answered);
        assert_eq!((r.sent, r.answered, r.errors, r.lost, r.late), (4, 2, 1, 2, 1));
        assert_eq!(r.first_lost, [1, 2]);
        assert_eq!(r.longest_gap, Duration::from_millis(399));
        assert_eq!(r.slowest, Duration::from_millis(370));
    }
}
