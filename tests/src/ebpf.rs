//! eBPF test helpers: a private cgroup2 mount and bpffs per test (never the host's root cgroup),
//! clients run inside a node's cgroup, and the probes that make eBPF tests skip with a
//! message on kernels without the hooks.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use crate::Pod;

/// A cgroup v2 directory of the test's own (never the root: the hooks load-balance every
/// process in the cgroup's subtree), and a private bpffs mount for the pins. The cgroup2
/// hierarchy is mounted once more under a temp dir, because `ip netns exec` (which runs netd)
/// remounts /sys and so hides /sys/fs/cgroup. Everything is unmounted and removed on drop.
pub struct EbpfSandbox {
    dir: tempfile::TempDir,
    /// `ntb-<pid>-ebpf<n>`: the cgroup2 hierarchy is one for the whole host, whatever dir it is
    /// mounted on, so two sandboxes of one test process must not share a cgroup name (dropping
    /// one would kill the other's clients and remove its cgroup under a running netd).
    tag: String,
    /// Per-node cgroups (`new_for_nodes`), removed on drop like the shared one.
    node_cgroups: Vec<std::path::PathBuf>,
}

impl EbpfSandbox {
    pub fn new() -> Result<EbpfSandbox> {
        let dir = tempfile::tempdir()?;
        let mnt = dir.path().join("cg");
        std::fs::create_dir_all(&mnt)?;
        let st = std::process::Command::new("mount").args(["-t", "cgroup2", "none"]).arg(&mnt).status()?;
        anyhow::ensure!(st.success(), "mounting cgroup2 on {}", mnt.display());
        // netd mounts its own bpffs on the pin directory's parent.
        std::fs::create_dir_all(dir.path().join("bpf"))?;
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let tag = format!("{}ebpf{}", crate::namespace_prefix(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let sandbox = EbpfSandbox { dir, tag, node_cgroups: Vec::new() };
        std::fs::create_dir_all(sandbox.cgroup())?;
        Ok(sandbox)
    }

    /// One cgroup and one pin directory per node: every node runs its own socket load
    /// balancer, on the clients put into that node's cgroup.
    pub fn new_for_nodes(n: usize) -> Result<EbpfSandbox> {
        let mut sandbox = EbpfSandbox::new()?;
        for i in 0..n {
            let cg = sandbox.dir.path().join("cg").join(format!("{}-node{i}", sandbox.tag));
            std::fs::create_dir_all(&cg)?;
            sandbox.node_cgroups.push(cg);
            std::fs::create_dir_all(sandbox.dir.path().join(format!("bpf{i}")))?;
        }
        Ok(sandbox)
    }

    pub fn node_cgroup(&self, i: usize) -> &std::path::Path {
        &self.node_cgroups[i]
    }

    pub fn node_pins(&self, i: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("bpf{i}")).join("netd")
    }

    pub fn cgroup(&self) -> std::path::PathBuf {
        self.dir.path().join("cg").join(&self.tag)
    }

    pub fn pins(&self) -> std::path::PathBuf {
        self.dir.path().join("bpf").join("netd")
    }
}

impl Drop for EbpfSandbox {
    fn drop(&mut self) {
        let mut cgroups = self.node_cgroups.clone();
        cgroups.push(self.cgroup());
        for cg in &cgroups {
            if let Ok(pids) = std::fs::read_to_string(cg.join("cgroup.procs")) {
                for pid in pids.split_whitespace() {
                    let _ = std::process::Command::new("kill").args(["-9", pid]).status();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        for cg in &cgroups {
            let _ = std::fs::remove_dir(cg);
        }
        for m in ["bpf", "cg"] {
            // netd mounts its bpffs in its own mount namespace: usually nothing to unmount here.
        let _ = std::process::Command::new("umount").arg(self.dir.path().join(m)).stderr(std::process::Stdio::null()).status();
        }
    }
}

/// One TCP exchange from `pod` with the client process in `cgroup` (where the node's socket
/// load balancer is attached): into the cgroup first, with the host's /sys, then into the
/// pod's network namespace (`ip netns exec` remounts /sys).
pub fn ask_in_cgroup(cgroup: &Path, pod: &Pod, addr: &str) -> Result<String> {
    ask_in_cgroup_from(cgroup, &pod.ns, addr)
}

/// [`ask_in_cgroup`] from any namespace (a node's: the node itself as the client).
pub fn ask_in_cgroup_from(cgroup: &Path, ns: &crate::Netns, addr: &str) -> Result<String> {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {} socat -T 3 - TCP:{addr},connect-timeout=3 2>&1",
        cgroup.display(),
        ns.name()
    );
    let out = std::process::Command::new("sh").args(["-c", &script]).stdin(std::process::Stdio::null()).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The tc programs need TCX links (Linux >= 6.6).
pub fn netd_ebpf_tc_probe() -> Result<(), String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").map_err(|e| e.to_string())?;
    let mut it = release.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|x| x.parse::<u32>().ok());
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    if (major, minor) < (6, 6) {
        return Err(format!("kernel {} lacks TCX links (the eBPF NodePort programs need Linux >= 6.6)", release.trim()));
    }
    Ok(())
}

pub fn netd_ebpf_probe() -> Result<(), String> {
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err("kernel without BTF".into());
    }
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|e| e.to_string())?;
    if !mounts.lines().any(|l| l.split_whitespace().nth(2) == Some("cgroup2")) {
        return Err("no cgroup v2 hierarchy".into());
    }
    Ok(())
}
