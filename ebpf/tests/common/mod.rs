//! What both eBPF root test files need: the Python client run inside test namespaces, and a
//! private bpffs mount.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Result;

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
