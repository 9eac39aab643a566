//! What the eBPF root test files need: the Python client run inside test namespaces, and a
//! private bpffs mount.

// Each test binary uses part of this module.
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Result;
use netd_tests::Netns;

static N: AtomicU32 = AtomicU32::new(0);

/// `client.py udp|tcp HOST PORT`: one exchange; prints `OK <answer> <peer ip> <peer port>` or
/// `ERR <errno>`.
pub const CLIENT_PY: &str = r#"
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.sendto(b"hi", (host, port))
        d, a = s.recvfrom(100)
    else:
        s = socket.socket()
        s.settimeout(5)
        s.connect((host, port))
        a = s.getpeername()
        d = s.recv(100)
    print("OK", d.decode(), a[0], a[1])
except OSError as e:
    print("ERR", e.errno)
"#;

/// A private bpffs instance on a temp dir, unmounted and removed on drop.
pub struct TestBpffs {
    mnt: PathBuf,
}

impl TestBpffs {
    pub fn new() -> Result<TestBpffs> {
        let mnt = std::env::temp_dir().join(format!("netd-ebpf-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&mnt)?;
        let st = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&mnt).status()?;
        anyhow::ensure!(st.success(), "mount bpffs on {}", mnt.display());
        Ok(TestBpffs { mnt })
    }
    pub fn dir(&self) -> PathBuf {
        self.mnt.join("netd")
    }
}

impl Drop for TestBpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = std::fs::remove_dir(&self.mnt);
    }
}

/// Runs `f` on a thread inside `ns` (tc attaches by device name, in the caller's namespace).
pub fn in_ns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{}", ns.name());
    std::thread::spawn(move || {
        let f0 = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns(2) on a descriptor we own; only this thread moves.
        assert_eq!(unsafe { libc::setns(f0.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns {path}");
        f()
    })
    .join()
    .expect("thread in namespace panicked")
}
