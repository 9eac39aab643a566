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
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::{DnsError, DnsServer};

/// The handover socket's name in netd's run dir.
pub const SOCKET_NAME: &str = "dns-handover.sock";

/// Descriptors sent in one message (the kernel takes up to 253).
pub const FDS_PER_MESSAGE: usize = 32;

const HELLO: &str = "netd-dns-handover 1";
const FDS: &[u8] = b"fds";
const SERVING: &[u8] = b"serving";

/// How long a successor waits for the sockets, and the old server for `serving`.
const TIMEOUT: Duration = Duration::from_secs(10);

fn err(op: &'static str, path: &Path, source: io::Error) -> DnsError {
    DnsError::Handover { op, path: path.to_path_buf(), source }
}

/// `sendmsg` of `data` with `fds` attached (`SCM_RIGHTS`) on a connected unix socket.
pub fn send_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let payload = size_of::<RawFd>() * raw.len();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = if raw.is_empty() { 0 } else { (unsafe { libc::CMSG_SPACE(payload as u32) }) as usize };
    // u64 words: the control buffer must be aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: msghdr is a plain C struct; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds CMSG_SPACE(payload) bytes, so the first header and
        // its data (payload bytes, copied from `raw`) fit in it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), payload);
        }
    }
    loop {
        // SAFETY: `msg` points to `iov`, `data` and `control`, all alive for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `recvmsg` into `buf`; returns the bytes received (0: the peer closed) and the descriptors
/// attached (`SCM_RIGHTS`, close-on-exec).
pub fn recv_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((size_of::<RawFd>() * FDS_PER_MESSAGE) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is a plain C struct; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: `msg` points to `iov` (into `buf`) and `control`, alive for the call, with
        // their lengths.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to msg_controllen; CMSG_FIRSTHDR/NXTHDR stay within
    // it, and an SCM_RIGHTS header's data is an array of descriptors now owned by us.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg);
                for i in 0..len / size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.add(i * size_of::<RawFd>()).cast::<RawFd>());
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("descriptors were truncated (too many in one message)"));
    }
    Ok((n, fds))
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

    #[test]
    fn descriptors_cross_a_socket_pair() {
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        let file = tempfile::tempfile().unwrap();
        let many: Vec<std::fs::File> = (0..FDS_PER_MESSAGE).map(|_| file.try_clone().unwrap()).collect();
        let fds: Vec<BorrowedFd> = many.iter().map(|f| f.as_fd()).collect();
        send_fds(a.as_fd(), b"x", &fds).unwrap();
        let mut buf = [0u8; 8];
        let (n, got) = recv_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, got.len()), (1, FDS_PER_MESSAGE));
        // The same open file: writing through one is seen through the other.
        use std::io::{Seek, Write};
        let mut f = std::fs::File::from(got.into_iter().next().unwrap());
        f.write_all(b"hello").unwrap();
        assert_eq!(file.metadata().unwrap().len(), 5);
        f.rewind().unwrap();
        drop(a);
        assert_eq!(recv_fds(b.as_fd(), &mut buf).unwrap().0, 0, "end of stream");
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
