//! [`FakeSystemd`]: the two parts of systemd netd talks to, for tests and benches: the notify
//! socket (`NOTIFY_SOCKET`: the messages in order, the file descriptor store) and the start of a
//! service with the stored descriptors (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`).

use crate::netns::Netns;
use anyhow::{Context, Result};
use netd_common::fdpass::recv_fds;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Default)]
struct State {
    messages: Vec<String>,
    /// The store: descriptors with their names, one per open file (as systemd dedups them).
    store: Vec<(OwnedFd, String)>,
}

/// A notify socket in a temp dir and a descriptor store.
pub struct FakeSystemd {
    path: PathBuf,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// Device and inode: the same open file, whatever the descriptor.
fn identity(fd: RawFd) -> Option<(u64, u64)> {
    // SAFETY: stat is a plain C struct; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `st`, which we own; `fd` is open while the caller holds it.
    let ok = unsafe { libc::fstat(fd, &mut st) } == 0;
    ok.then_some((st.st_dev, st.st_ino))
}

impl FakeSystemd {
    pub fn new() -> Result<FakeSystemd> {
        let dir = tempfile::Builder::new().prefix(&format!("{}systemd-", crate::namespace_prefix())).tempdir()?;
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let (state, stop) = (Arc::new(Mutex::new(State::default())), Arc::new(AtomicBool::new(false)));
        let (st, flag) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !flag.load(Ordering::Relaxed) {
                let Ok((n, fds)) = recv_fds(sock.as_fd(), &mut buf) else { continue };
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
                if msg.lines().any(|l| l == "FDSTORE=1") {
                    let name = msg.lines().find_map(|l| l.strip_prefix("FDNAME=")).unwrap_or("stored").to_string();
                    for fd in fds {
                        let id = identity(fd.as_raw_fd());
                        if !s.store.iter().any(|(have, _)| identity(have.as_raw_fd()) == id) {
                            s.store.push((fd, name.clone()));
                        }
                    }
                }
                s.messages.push(msg);
            }
        });
        Ok(FakeSystemd { path, state, stop, thread: Some(thread), _dir: dir })
    }

    /// Every message received so far, in order.
    pub fn messages(&self) -> Vec<String> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).messages.clone()
    }

    /// Descriptors in the store.
    pub fn stored(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).store.len()
    }

    /// The command systemd would run: `args` in namespace `ns` with `NOTIFY_SOCKET`, and the
    /// stored descriptors as 3, 4, ... with `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` (the
    /// pid is only known in the child: a shell exports it and execs `ip netns exec`, which execs
    /// netd in the same process).
    pub fn launch(&self, ns: &Netns, args: &[&str]) -> Result<Command> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Copies far above 3..3+n, so that placing them cannot overwrite one not yet placed.
        let mut high = Vec::new();
        for (fd, _) in &s.store {
            // SAFETY: F_DUPFD_CLOEXEC on a descriptor the store holds open; the result is checked.
            let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 1000) };
            anyhow::ensure!(dup >= 0, "dup of a stored descriptor: {}", std::io::Error::last_os_error());
            // SAFETY: `dup` is a new descriptor nothing else owns.
            high.push(unsafe { OwnedFd::from_raw_fd(dup) });
        }
        let names: Vec<&str> = s.store.iter().map(|(_, n)| n.as_str()).collect();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "export LISTEN_PID=$$; exec \"$@\"", "sh", "ip", "netns", "exec", ns.name()]).args(args);
        cmd.stdin(std::process::Stdio::null()).env("NOTIFY_SOCKET", &self.path);
        if !high.is_empty() {
            cmd.env("LISTEN_FDS", high.len().to_string()).env("LISTEN_FDNAMES", names.join(":"));
            let raw: Vec<RawFd> = high.iter().map(|f| f.as_raw_fd()).collect();
            // SAFETY: between fork and exec only dup2 runs (async-signal-safe), on descriptors
            // the parent keeps open (`high`, moved into the closure) until the command is dropped.
            unsafe {
                cmd.pre_exec(move || {
                    let _keep = &high;
                    for (i, fd) in raw.iter().enumerate() {
                        if libc::dup2(*fd, 3 + i as RawFd) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        Ok(cmd)
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
