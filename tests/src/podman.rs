//! [`NodeHost`]: a test node's own file system and container runtime, for running netd's image
//! the way a kubelet does (podman, host network = the node's network namespace).
//!
//! Every node gets a persistent mount namespace in which its own directories are bind-mounted
//! over `/etc/cni`, `/opt`, `/var/lib` and `/run`, and a bpffs of its own on `/sys/fs/bpf`. A
//! DaemonSet's hostPath volumes then mean the same path to netd in its container, to netd-cni
//! run by podman on the "host", and to podman's own CNI cache and netns files, exactly as on a
//! real node, while nothing of the real host's /etc/cni, /opt/cni, /run/netd or /var/lib is
//! touched. podman runs entered into that mount namespace and the node's network namespace
//! (`nsenter --mount --net`: `ip netns exec` would remount /sys and hide the cgroup mount), with
//! its storage, run root and configuration in the node's temp dir.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd::{check, command, describe, output};
use crate::netns::Netns;

/// The host directories every node has its own copy of: (path on the node, dir under the
/// node's temp dir).
const NODE_DIRS: [(&str, &str); 4] = [("/etc/cni", "etc-cni"), ("/opt", "opt"), ("/var/lib", "var-lib"), ("/run", "run")];

/// A node's file system and podman.
#[derive(Debug)]
pub struct NodeHost {
    netns: String,
    dir: tempfile::TempDir,
    mntns: PathBuf,
    /// Whether `mntns`'s parent was bind-mounted (private) and must be unmounted.
    bound: bool,
}

impl NodeHost {
    /// Builds the node's mount namespace and podman configuration for the node whose network
    /// namespace is `ns`.
    pub fn new(ns: &Netns) -> Result<NodeHost> {
        let dir = crate::netns::tempdir(&format!("{}-host", ns.name().rsplit('-').next().unwrap_or("node")))?;
        let mnt_dir = dir.path().join("mntns");
        std::fs::create_dir_all(&mnt_dir)?;
        let mut host = NodeHost { netns: ns.name().to_string(), mntns: mnt_dir.join("mnt"), dir, bound: false };
        for (_, sub) in NODE_DIRS {
            std::fs::create_dir_all(host.dir.path().join("fs").join(sub))?;
        }
        std::fs::create_dir_all(host.dir.path().join("tmp"))?;
        // What a node with a container runtime has before any network add-on: the CNI
        // directories (podman refuses to start without its plugin dir).
        for d in ["/opt/cni/bin", "/etc/cni/net.d"] {
            std::fs::create_dir_all(host.path(d).context("a node dir")?)?;
        }
        // `unshare --mount=FILE` keeps the namespace alive through a bind mount on FILE, which
        // must not be on a shared mount: the dir is bind-mounted onto itself and made private.
        let m = mnt_dir.to_str().context("non-UTF-8 temp dir")?;
        check(&mut command("mount", &["--bind", m, m]))?;
        host.bound = true;
        check(&mut command("mount", &["--make-private", m]))?;
        std::fs::write(&host.mntns, "")?;
        let mut script = String::from("set -e\n");
        for (path, sub) in NODE_DIRS {
            script.push_str(&format!("mount --bind '{}' {path}\n", host.dir.path().join("fs").join(sub).display()));
        }
        script.push_str("mount -t bpf bpf /sys/fs/bpf\n");
        let ns_file = host.mntns.to_str().context("non-UTF-8 temp dir")?.to_string();
        check(&mut command("unshare", &[&format!("--mount={ns_file}"), "--propagation", "private", "sh", "-c", &script]))?;
        let limits = |res: libc::__rlimit_resource_t| -> (u64, u64) {
            let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: getrlimit writes into the valid `l`.
            unsafe { libc::getrlimit(res, &mut l) };
            (l.rlim_cur, l.rlim_max)
        };
        // podman's default limits (nofile and nproc of 1048576) are above what this machine's
        // unprivileged-for-rlimits root may set; the node's own limits are what a kubelet's
        // containers would inherit.
        let (nofile, nofile_max) = limits(libc::RLIMIT_NOFILE);
        let nproc = limits(libc::RLIMIT_NPROC).0.min(32768);
        let conf = format!(
            "[containers]\ndefault_ulimits = [\"nofile={nofile}:{nofile_max}\", \"nproc={nproc}:{nproc}\"]\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nevents_logfile_path = \"{}\"\ntmp_dir = \"{}\"\n\
             [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"/opt/cni/bin\"]\nnetwork_config_dir = \"/etc/cni/net.d\"\n",
            host.dir.path().join("events.log").display(),
            host.dir.path().join("tmp").display()
        );
        std::fs::write(host.dir.path().join("containers.conf"), conf)?;
        Ok(host)
    }

    /// Where a path of the node's file system is, seen from the test (outside the node's mount
    /// namespace); `None` for a path the node shares with the host (read-only ones such as
    /// /lib/modules).
    pub fn path(&self, node_path: &str) -> Option<PathBuf> {
        NODE_DIRS.iter().find_map(|(p, sub)| {
            let rest = node_path.strip_prefix(p)?;
            (rest.is_empty() || rest.starts_with('/')).then(|| self.dir.path().join("fs").join(sub).join(rest.trim_start_matches('/')))
        })
    }

    /// The node's temp dir (ConfigMap files, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `podman ARGS` on the node.
    pub fn podman(&self, args: &[&str]) -> Command {
        let root = self.dir.path().join("storage");
        let runroot = self.dir.path().join("storage-run");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount={}", self.mntns.display()))
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("podman")
            .arg("--root")
            .arg(root)
            .arg("--runroot")
            .arg(runroot)
            .args(args)
            .env("CONTAINERS_CONF", self.dir.path().join("containers.conf"))
            // No registry is ever asked: images come from `podman load`.
            .env("CONTAINERS_REGISTRIES_CONF", "/dev/null")
            .stdin(std::process::Stdio::null());
        cmd
    }

    /// `podman ARGS`, failing with its stderr; stdout.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        check(&mut self.podman(args))
    }

    /// `podman ARGS`: (success, stdout, stderr).
    pub fn try_run(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let mut cmd = self.podman(args);
        let out = output(&mut cmd).with_context(|| describe(&cmd))?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned()))
    }

    /// A shell command in the node's mount and network namespaces (as the node's root).
    pub fn sh(&self, script: &str) -> Result<String> {
        check(
            Command::new("nsenter")
                .arg(format!("--mount={}", self.mntns.display()))
                .arg(format!("--net=/run/netns/{}", self.netns))
                .args(["sh", "-c", script])
                .stdin(std::process::Stdio::null()),
        )
    }

    /// `podman load -i ARCHIVE`: the image name it loaded.
    pub fn load(&self, archive: &Path) -> Result<String> {
        let out = self.run(&["load", "-i", archive.to_str().context("non-UTF-8 path")?])?;
        match out.lines().find_map(|l| l.strip_prefix("Loaded image: ")) {
            Some(name) => Ok(name.trim().to_string()),
            None => bail!("podman load said: {out}"),
        }
    }

    /// The network namespace of a running container (`/proc/PID/ns/net`).
    pub fn container_netns(&self, name: &str) -> Result<PathBuf> {
        let pid = self.run(&["inspect", "-f", "{{.State.Pid}}", name])?;
        let pid: u32 = pid.trim().parse().with_context(|| format!("pid of {name}: {pid:?}"))?;
        anyhow::ensure!(pid > 0, "{name} is not running");
        Ok(PathBuf::from(format!("/proc/{pid}/ns/net")))
    }
}

impl Drop for NodeHost {
    fn drop(&mut self) {
        // Containers first (their conmon and processes live in the mount namespace), then
        // podman's storage (its overlay mounts are in the namespace too), then the namespace.
        let _ = output(&mut self.podman(&["rm", "-af", "-t", "0"]));
        let _ = output(&mut self.podman(&["system", "reset", "-f"]));
        let _ = output(&mut command("umount", &["-l", self.mntns.to_str().unwrap_or_default()]));
        if self.bound {
            if let Some(parent) = self.mntns.parent() {
                let _ = output(&mut command("umount", &["-l", parent.to_str().unwrap_or_default()]));
            }
        }
    }
}
