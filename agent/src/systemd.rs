//! The little of systemd's protocols netd speaks, without libsystemd:
//!
//! - `sd_notify`: datagrams to `$NOTIFY_SOCKET` (`Type=notify`): `READY=1` once the node is ready
//!   (the condition of `/readyz`), `STOPPING=1` on SIGTERM, and `FDSTORE=1` with the DNS listening
//!   sockets attached, so that systemd keeps them open across `systemctl restart` (the unit's
//!   `FileDescriptorStoreMax=`): queries that arrive while no netd runs wait in the socket instead
//!   of being refused.
//! - `LISTEN_FDS`: sockets systemd passes at start (from the store, or socket activation), taken
//!   over by the DNS server instead of binding fresh ones.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::server::Shared;

/// The name netd gives its DNS sockets in systemd's store (`FDNAME=`, `LISTEN_FDNAMES`).
pub const DNS_FD_NAME: &str = "dns";

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Where `sd_notify` messages go: `$NOTIFY_SOCKET`, a path or (`@name`) an abstract address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notifier {
    socket: String,
}

impl Notifier {
    /// `None` when netd does not run under systemd with `Type=notify`.
    pub fn from_env() -> Option<Notifier> {
        std::env::var("NOTIFY_SOCKET").ok().filter(|s| !s.is_empty()).map(|socket| Notifier { socket })
    }

    pub fn new(socket: impl Into<String>) -> Notifier {
        Notifier { socket: socket.into() }
    }

    fn connect(&self) -> io::Result<UnixDatagram> {
        let sock = UnixDatagram::unbound()?;
        match self.socket.strip_prefix('@') {
            Some(name) => sock.connect_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?,
            None => sock.connect(PathBuf::from(&self.socket))?,
        }
        Ok(sock)
    }

    /// Sends `state` (newline-separated `KEY=VALUE`), with `fds` attached when there are any.
    pub fn send(&self, state: &str, fds: &[BorrowedFd<'_>]) -> Result<(), NotifyError> {
        let err = |source| NotifyError { socket: self.socket.clone(), state: state.lines().next().unwrap_or("").to_string(), source };
        let sock = self.connect().map_err(err)?;
        netd_common::fdpass::send_fds(sock.as_fd(), state.as_bytes(), fds).map_err(err)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("sd_notify {state} to {socket}: {source}")]
pub struct NotifyError {
    socket: String,
    state: String,
    #[source]
    source: io::Error,
}

/// Sends `READY=1` once `shared`'s readiness (what `/readyz` checks) has nothing missing, and
/// returns. Polls: readiness has many writers, and a notification 100 ms late costs nothing.
pub async fn notify_when_ready(notifier: Notifier, shared: Arc<Shared>) {
    loop {
        let missing = shared.readiness.read().unwrap_or_else(|p| p.into_inner()).missing();
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match notifier.send("READY=1\nSTATUS=node ready", &[]) {
        Ok(()) => tracing::info!("told systemd the node is ready"),
        Err(e) => tracing::warn!(error = %e, "cannot tell systemd the node is ready"),
    }
}

/// Stores the DNS listening sockets in systemd's file descriptor store (the same sockets sent
/// again are stored once).
pub fn store_dns_sockets(notifier: &Notifier, fds: &[BorrowedFd<'_>]) -> Result<(), NotifyError> {
    for chunk in fds.chunks(netd_common::fdpass::FDS_PER_MESSAGE) {
        notifier.send(&format!("FDSTORE=1\nFDNAME={DNS_FD_NAME}"), chunk)?;
    }
    Ok(())
}

/// The descriptors systemd passed this process (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`)
/// with their names: `(fd, name)`, fds from 3 on. Empty when they are not for this process.
pub fn parse_listen_env(pid: u32, listen_pid: Option<&str>, listen_fds: Option<&str>, names: Option<&str>) -> Vec<(RawFd, String)> {
    let (Some(for_pid), Some(count)) = (listen_pid.and_then(|p| p.trim().parse::<u32>().ok()), listen_fds.and_then(|n| n.trim().parse::<i32>().ok())) else {
        return Vec::new();
    };
    if for_pid != pid || count <= 0 {
        return Vec::new();
    }
    let names: Vec<&str> = names.map(|n| n.split(':').collect()).unwrap_or_default();
    (0..count).map(|i| (LISTEN_FDS_START + i, names.get(i as usize).copied().unwrap_or("unknown").to_string())).collect()
}

/// Takes the DNS sockets systemd passed: those named [`DNS_FD_NAME`] (the store), or every one
/// when systemd gave no names. Marked close-on-exec (netd runs `nft`, `iptables-restore`).
pub fn take_dns_listen_fds() -> Vec<OwnedFd> {
    let env = |k| std::env::var(k).ok();
    let passed = parse_listen_env(std::process::id(), env("LISTEN_PID").as_deref(), env("LISTEN_FDS").as_deref(), env("LISTEN_FDNAMES").as_deref());
    let named = env("LISTEN_FDNAMES").is_some();
    let mut fds = Vec::new();
    for (fd, name) in passed {
        if named && name != DNS_FD_NAME {
            continue;
        }
        // SAFETY: LISTEN_PID names this process, so systemd opened descriptors 3..3+LISTEN_FDS
        // for it and nothing else in netd owns them (netd opens nothing before reading them).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: F_SETFD on a descriptor we own.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            tracing::warn!(fd, error = %io::Error::last_os_error(), "cannot mark a socket from systemd close-on-exec");
        }
        fds.push(owned);
    }
    if !fds.is_empty() {
        tracing::info!(sockets = fds.len(), "DNS sockets passed by systemd");
    }
    fds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::NodeStatus;

    fn fake_systemd() -> (tempfile::TempDir, UnixDatagram, Notifier) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (dir, sock, Notifier::new(path.to_str().unwrap()))
    }

    fn recv(sock: &UnixDatagram) -> (String, Vec<OwnedFd>) {
        let mut buf = [0u8; 256];
        let (n, fds) = netd_common::fdpass::recv_fds(sock.as_fd(), &mut buf).unwrap();
        (String::from_utf8_lossy(&buf[..n]).into_owned(), fds)
    }

    #[tokio::test]
    async fn ready_only_once_the_node_is_then_stopping() {
        let (_dir, sock, notifier) = fake_systemd();
        let shared = Shared::new(NodeStatus::default());
        shared.set_ready(|r| r.cni_config = Some(false));
        let task = tokio::spawn(notify_when_ready(notifier.clone(), shared.clone()));
        sock.set_nonblocking(true).unwrap();
        for step in 0..3 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let mut buf = [0u8; 64];
            assert!(sock.recv(&mut buf).is_err(), "nothing before the node is ready (step {step})");
            shared.set_ready(|r| match step {
                0 => r.lease = true,
                1 => r.subnet_env = true,
                _ => {}
            });
        }
        shared.set_ready(|r| r.cni_config = Some(true));
        tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
        sock.set_nonblocking(false).unwrap();
        assert_eq!(recv(&sock).0, "READY=1\nSTATUS=node ready");
        notifier.send("STOPPING=1", &[]).unwrap();
        assert_eq!(recv(&sock).0, "STOPPING=1");
    }

    #[test]
    fn the_fd_store_gets_the_sockets() {
        let (_dir, sock, notifier) = fake_systemd();
        let udp: Vec<std::net::UdpSocket> = (0..40).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        let fds: Vec<BorrowedFd> = udp.iter().map(|s| s.as_fd()).collect();
        store_dns_sockets(&notifier, &fds).unwrap();
        let (first, a) = recv(&sock);
        let (second, b) = recv(&sock);
        assert_eq!((first.as_str(), second.as_str()), ("FDSTORE=1\nFDNAME=dns", "FDSTORE=1\nFDNAME=dns"));
        assert_eq!((a.len(), b.len()), (32, 8), "in messages of at most 32");
        let got = std::net::UdpSocket::from(b.into_iter().last().unwrap());
        assert_eq!(got.local_addr().unwrap(), udp[39].local_addr().unwrap(), "the very same socket");
    }

    #[test]
    fn abstract_notify_socket() {
        let name = format!("netd-test-notify-{}", std::process::id());
        let sock = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        Notifier::new(format!("@{name}")).send("READY=1", &[]).unwrap();
        let mut buf = [0u8; 16];
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn listen_fds_only_for_this_process() {
        assert_eq!(parse_listen_env(7, Some("7"), Some("2"), Some("dns:other")), [(3, "dns".to_string()), (4, "other".to_string())]);
        assert_eq!(parse_listen_env(7, Some("7"), Some("1"), None), [(3, "unknown".to_string())]);
        assert!(parse_listen_env(7, Some("8"), Some("2"), None).is_empty(), "another process's");
        assert!(parse_listen_env(7, None, Some("2"), None).is_empty());
        assert!(parse_listen_env(7, Some("7"), Some("0"), None).is_empty());
        assert!(parse_listen_env(7, Some("7"), Some("x"), None).is_empty());
    }
}
