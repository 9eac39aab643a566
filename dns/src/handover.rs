//! Handing the DNS listening sockets from a running netd to its successor, so that an upgrade
//! loses no query.
//!
//! Two processes each with their own `SO_REUSEPORT` socket are not enough: when the old one closes
//! its socket, the datagrams queued in it are dropped, and the kernel hashes queries onto it until
//! then. So the sockets themselves move: the running server listens on a unix seqpacket socket
//! (`<run-dir>/dns-handover.sock`, mode 0600); a successor started with the same run dir connects
//! and receives every listening socket (UDP and TCP, every address) with `SCM_RIGHTS`, starts
//! serving on the very same sockets, and says so; only then does the old server stop reading
//! (answering what it already took). The kernel sockets never close, both processes read the same
//! receive queues during the overlap, and nothing queued is lost. Connections the old server
//! accepted finish there; new ones are accepted by the successor.
//!
//! Protocol (seqpacket, one message each): old → new `netd-dns-handover 1 <count>`, then the
//! sockets in messages `fds` carrying at most [`FDS_PER_MESSAGE`] descriptors; new → old `serving`.
//! A successor that goes away before `serving` leaves the old server serving as before.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

use netd_common::fdpass::{recv_fds, send_fds, FDS_PER_MESSAGE};

use crate::{DnsError, DnsServer};

/// The handover socket's name in netd's run dir.
pub const SOCKET_NAME: &str = "dns-handover.sock";


const HELLO: &str = "netd-dns-handover 1";
const FDS: &[u8] = b"fds";
const SERVING: &[u8] = b"serving";

/// How long a successor waits for the sockets, and the old server for `serving`.
const TIMEOUT: Duration = Duration::from_secs(10);

fn err(op: &'static str, path: &Path, source: io::Error) -> DnsError {
    DnsError::Handover { op, path: path.to_path_buf(), source }
}

fn seqpacket() -> io::Result<Socket> {
    Socket::new(Domain::UNIX, Type::SEQPACKET, None)
}

/// The sockets received from a running predecessor; [`Predecessor::confirm`] once serving on them.
#[derive(Debug)]
pub struct Predecessor {
    conn: Socket,
    path: PathBuf,
    /// The listening sockets, UDP and TCP, for [`DnsServer::start_with`].
    pub sockets: Vec<OwnedFd>,
}

impl Predecessor {
    /// The sockets, for [`DnsServer::start_with`] (the predecessor serves them until
    /// [`Predecessor::confirm`]).
    pub fn take_sockets(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.sockets)
    }

    /// Tells the predecessor we serve on its sockets: it stops reading them.
    pub fn confirm(self) -> Result<(), DnsError> {
        send_fds(self.conn.as_fd(), SERVING, &[]).map_err(|e| err("confirming the DNS handover on", &self.path, e))
    }
}

/// Connects to a running server's handover socket at `path` and receives its listening sockets.
/// `Ok(None)` when no server listens there (no socket file, or a stale one).
pub fn take_over(path: &Path) -> Result<Option<Predecessor>, DnsError> {
    let conn = seqpacket().map_err(|e| err("creating a socket for", path, e))?;
    let addr = SockAddr::unix(path).map_err(|e| err("addressing", path, e))?;
    match conn.connect(&addr) {
        Ok(()) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ECONNREFUSED)) => return Ok(None),
        Err(e) => return Err(err("connecting to", path, e)),
    }
    conn.set_read_timeout(Some(TIMEOUT)).map_err(|e| err("setting a timeout on", path, e))?;
    let mut buf = [0u8; 64];
    let (n, _) = recv_fds(conn.as_fd(), &mut buf).map_err(|e| err("receiving the DNS handover header from", path, e))?;
    let count = parse_hello(&buf[..n]).ok_or_else(|| err("reading the DNS handover header from", path, io::Error::other(format!("unexpected {:?}", String::from_utf8_lossy(&buf[..n])))))?;
    let mut sockets = Vec::with_capacity(count);
    while sockets.len() < count {
        let (n, fds) = recv_fds(conn.as_fd(), &mut buf).map_err(|e| err("receiving the DNS sockets from", path, e))?;
        if n == 0 || &buf[..n] != FDS || fds.is_empty() {
            return Err(err("receiving the DNS sockets from", path, io::Error::other(format!("got {} of {count} sockets, then {:?}", sockets.len(), String::from_utf8_lossy(&buf[..n])))));
        }
        sockets.extend(fds);
    }
    Ok(Some(Predecessor { conn, path: path.to_path_buf(), sockets }))
}

fn parse_hello(msg: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(msg).ok()?;
    text.strip_prefix(HELLO)?.strip_prefix(' ')?.parse().ok()
}

/// Serves `server`'s sockets to a successor on `path` (replacing a socket file left there), from
/// a thread of its own. Once a successor has confirmed, the server is retired
/// ([`DnsServer::retire`]) and the thread ends; a successor that fails before confirming changes
/// nothing.
pub fn serve(path: &Path, server: Arc<DnsServer>) -> Result<(), DnsError> {
    let listener = seqpacket().map_err(|e| err("creating", path, e))?;
    let _ = std::fs::remove_file(path);
    let addr = SockAddr::unix(path).map_err(|e| err("addressing", path, e))?;
    listener.bind(&addr).map_err(|e| err("binding", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| err("restricting", path, e))?;
    listener.listen(4).map_err(|e| err("listening on", path, e))?;
    let thread_path = path.to_path_buf();
    std::thread::Builder::new()
        .name("netd-dns-handover".into())
        .spawn(move || loop {
            let path = &thread_path;
            let conn = match listener.accept() {
                Ok((c, _)) => c,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "DNS handover socket: accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            match hand_over(&conn, &server) {
                Ok(()) => {
                    server.retire();
                    tracing::info!(path = %path.display(), "DNS sockets handed over to a successor; this server stopped reading them");
                    return;
                }
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "DNS handover failed; still serving"),
            }
        })
        .map_err(|e| err("starting the handover thread for", path, e))?;
    Ok(())
}

/// Sends the sockets on `conn` and waits for the successor's `serving`.
fn hand_over(conn: &Socket, server: &DnsServer) -> io::Result<()> {
    conn.set_read_timeout(Some(TIMEOUT))?;
    let sockets = server.listen_sockets();
    send_fds(conn.as_fd(), format!("{HELLO} {}", sockets.len()).as_bytes(), &[])?;
    for chunk in sockets.chunks(FDS_PER_MESSAGE) {
        send_fds(conn.as_fd(), FDS, chunk)?;
    }
    let mut buf = [0u8; 16];
    let (n, _) = recv_fds(conn.as_fd(), &mut buf)?;
    if &buf[..n] == SERVING {
        Ok(())
    } else if n == 0 {
        Err(io::Error::other("the successor went away before serving"))
    } else {
        Err(io::Error::other(format!("the successor answered {:?}", String::from_utf8_lossy(&buf[..n]))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trip() {
        assert_eq!(parse_hello(format!("{HELLO} 7").as_bytes()), Some(7));
        assert_eq!(parse_hello(b"netd-dns-handover 2 7"), None);
        assert_eq!(parse_hello(b"serving"), None);
    }

    fn config(workers: usize) -> crate::ServerConfig {
        crate::ServerConfig { listen: vec!["127.0.0.1:0".parse().unwrap()], add_to_lo: false, workers, ..Default::default() }
    }

    fn requests(server: &DnsServer) -> u64 {
        server.metrics().requests.iter().map(|r| r.count).sum()
    }

    /// Two servers in this process, the second taking the first's sockets over under 1,000
    /// queries/s from 8 client sockets (spread over all the first server's SO_REUSEPORT
    /// sockets): every query is answered, by one or the other.
    #[test]
    fn a_successor_takes_the_sockets_over_under_load_and_no_query_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET_NAME);
        let old = Arc::new(DnsServer::start(config(3)).unwrap());
        serve(&path, old.clone()).unwrap();
        let addr = old.local_addrs()[0];
        let load = netd_tests::DnsLoad::start(None, addr, "web.default.svc.cluster.local", 1000, 8).unwrap();
        std::thread::sleep(Duration::from_millis(300));

        let mut pred = take_over(&path).unwrap().expect("the running server answers");
        let sockets = pred.take_sockets();
        assert_eq!(sockets.len(), 3 + 1, "3 UDP sockets and the TCP listener");
        // Fewer workers asked than sockets inherited: every inherited socket is read anyway.
        let new = Arc::new(DnsServer::start_with(config(1), sockets, Some(old.zone())).unwrap());
        assert_eq!(new.local_addrs(), [addr], "the same port");
        assert_eq!(new.listen_sockets().len(), 4);
        serve(&path, new.clone()).unwrap();
        assert!(!old.retired());
        pred.confirm().unwrap();
        netd_tests::wait_until(Duration::from_secs(5), Duration::from_millis(10), || Ok(old.retired())).unwrap();
        assert!(old.drain(Duration::from_secs(5)), "the old server answered what it took");
        let old_answered = requests(&old);
        drop(old);
        std::thread::sleep(Duration::from_millis(300));
        let report = load.finish();
        assert_eq!(report.lost, 0, "{report}");
        assert!(old_answered > 0 && requests(&new) > 0, "both served: {old_answered} then {}", requests(&new));
        assert_eq!(report.answered, report.sent);

        // And on to a third (the successor serves the handover socket in turn).
        let mut third = take_over(&path).unwrap().expect("the successor answers");
        assert_eq!(third.take_sockets().len(), 4);
    }

    /// A successor that takes the sockets but never says it serves changes nothing.
    #[test]
    fn a_successor_that_does_not_confirm_leaves_the_server_serving() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET_NAME);
        let old = Arc::new(DnsServer::start(config(1)).unwrap());
        serve(&path, old.clone()).unwrap();
        let mut pred = take_over(&path).unwrap().unwrap();
        drop(pred.take_sockets());
        drop(pred);
        std::thread::sleep(Duration::from_millis(200));
        assert!(!old.retired());
        let load = netd_tests::DnsLoad::start(None, old.local_addrs()[0], "x.cluster.local", 200, 2).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let report = load.finish();
        assert!(report.sent > 0 && report.lost == 0, "{report}");
        // It can still hand over later.
        assert!(take_over(&path).unwrap().is_some());
    }

    #[test]
    fn nobody_listening_is_no_predecessor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET_NAME);
        assert!(take_over(&path).unwrap().is_none());
        // A stale socket file from a process that is gone.
        let stale = seqpacket().unwrap();
        stale.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        drop(stale);
        assert!(take_over(&path).unwrap().is_none());
    }
}
