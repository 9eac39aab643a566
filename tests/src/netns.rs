//! [`Netns`]: an RAII network namespace, and reaping of namespaces left by
//! test processes that died without running their destructors.

use crate::cmd::{self, check, check_output, command, kill_pid, log_stdio, ns_command, output};
use anyhow::{bail, Context, Result};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::{sleep, JoinHandle};
use std::time::{Duration, Instant};

/// Longest namespace name we create. Names show up in `ip netns list`,
/// log lines and error messages; keeping them short keeps those readable.
const MAX_NAME_LEN: usize = 30;

/// Process-wide counter so names are unique across parallel tests.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `ntb-<pid>-`: every namespace (and temp dir) this process creates starts
/// with it. The pid is what lets [`reap_stale_namespaces`] tell a dead run's
/// leftovers from a live run's namespaces.
pub fn namespace_prefix() -> String {
    format!("ntb-{}-", std::process::id())
}

/// A network namespace `ntb-<pid>-<counter>-<role>`, deleted on drop
/// together with every process still running inside it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace and brings `lo` up (many tools, etcd included,
    /// expect a working loopback).
    pub fn new(role: &str) -> Result<Netns> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let head = format!("{}{n}-", namespace_prefix());
        let room = MAX_NAME_LEN.saturating_sub(head.len());
        let role: String = role
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .take(room)
            .collect();
        let name = format!("{head}{role}");
        check(&mut command("ip", &["netns", "add", &name]))?;
        // From here on the guard exists, so a failure below still cleans up.
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The name as shown by `ip netns list`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A `Command` for `ip netns exec NAME args...` (stdin closed), for
    /// callers that need custom stdio or environment.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        ns_command(&self.name, args)
    }

    /// Runs `args` inside the namespace and returns its output whatever the
    /// exit status.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        output(&mut self.command(args))
    }

    /// Runs `args` inside the namespace; a non-zero exit is an error that
    /// includes the command line and stderr. Returns stdout.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.command(args);
        let out = output(&mut cmd)?;
        check_output(&cmd, out)
    }

    /// `sh -c SCRIPT` inside the namespace, like [`Netns::run`].
    pub fn sh(&self, script: &str) -> Result<String> {
        self.run(&["sh", "-c", script])
    }

    /// `ip -n NAME args...`: cheaper than `exec` for plain `ip` calls.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        check(&mut command("ip", &full))
    }

    /// Wires `pod` to this (node) namespace the way routed CNIs do, with no bridge: a veth
    /// `host_if` here and `eth0` in the pod, the pod's `ip`/32 routed to `host_if`, proxy ARP on
    /// it, and the pod's default route via 169.254.1.1. The benchmarks' minimal pods.
    pub fn add_routed_pod(&self, pod: &Netns, ip: &str, host_if: &str) -> Result<()> {
        self.ip(&["link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", pod.name()])?;
        self.ip(&["link", "set", host_if, "up"])?;
        self.run(&["sysctl", "-q", "-w", &format!("net.ipv4.conf.{host_if}.proxy_arp=1")])?;
        self.ip(&["route", "add", &format!("{ip}/32"), "dev", host_if])?;
        pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        pod.ip(&["route", "add", "169.254.1.1", "dev", "eth0"])?;
        pod.ip(&["route", "add", "default", "via", "169.254.1.1"])?;
        Ok(())
    }

    /// Starts `args` inside the namespace in the background; stdout and
    /// stderr are appended to `log` if given, else discarded. The process
    /// is killed when this namespace is dropped, whoever holds the `Child`.
    pub fn spawn(&self, args: &[&str], log: Option<&Path>) -> Result<Child> {
        let mut cmd = self.command(args);
        log_stdio(&mut cmd, log)?;
        cmd.spawn()
            .with_context(|| format!("cannot spawn `{}`", cmd::describe(&cmd)))
    }

    /// Pids of the processes currently inside the namespace.
    pub fn pids(&self) -> Vec<u32> {
        ns_pids(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_namespace(&self.name);
    }
}

fn ns_pids(name: &str) -> Vec<u32> {
    match check(&mut command("ip", &["netns", "pids", name])) {
        Ok(out) => out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// SIGKILLs everything inside, waits briefly for it to die (a namespace
/// with live processes outlives `ip netns del`, and with it its veths and
/// addresses), then deletes it. Logs, never panics: this runs in `Drop`,
/// possibly while unwinding.
fn delete_namespace(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let pids = ns_pids(name);
        if pids.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            eprintln!("netd-tests: pids {pids:?} still in netns {name}; deleting it anyway");
            break;
        }
        for pid in pids {
            kill_pid(pid, libc::SIGKILL);
        }
        sleep(Duration::from_millis(20));
    }
    if let Err(e) = check(&mut command("ip", &["netns", "del", name])) {
        eprintln!("netd-tests: cannot delete netns {name}: {e:#}");
    }
}

/// The pid encoded in a name `ntb-<pid>-...`, if it is one of ours.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("ntb-")?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

/// True if `pid` is a live process other than a zombie. A test process that
/// was SIGKILLed is gone from `/proc` once its parent (cargo) reaped it.
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3, after the parenthesised command name, is the state.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => false,
    }
}

/// Deletes `ntb-<pid>-...` namespaces (killing their processes first) and
/// `ntb-<pid>-...` temp dirs whose `<pid>` is no longer running: what a
/// test run killed with SIGKILL (or a crashed harness) left behind.
/// Namespaces of live processes, including parallel test binaries, are
/// left alone. Returns the names of the deleted namespaces.
pub fn reap_stale_namespaces() -> Vec<String> {
    let me = std::process::id();
    let stale = |name: &str| owner_pid(name).is_some_and(|pid| pid != me && !pid_alive(pid));

    let mut reaped = Vec::new();
    match check(&mut command("ip", &["netns", "list"])) {
        Ok(list) => {
            for line in list.lines() {
                // Lines look like "NAME" or "NAME (id: 3)".
                let Some(name) = line.split_whitespace().next() else {
                    continue;
                };
                if stale(name) {
                    eprintln!("netd-tests: reaping stale netns {name}");
                    delete_namespace(name);
                    reaped.push(name.to_string());
                }
            }
        }
        Err(e) => eprintln!("netd-tests: cannot list namespaces: {e:#}"),
    }

    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path: PathBuf = entry.path();
            if stale(&name) && path.is_dir() {
                if let Err(e) = std::fs::remove_dir_all(&path) {
                    eprintln!("netd-tests: cannot remove stale {}: {e}", path.display());
                }
            }
        }
    }
    reaped
}

/// A temp dir named `ntb-<pid>-<role>-XXXX`, so that it is reaped like a
/// namespace if this process dies without dropping it.
pub(crate) fn tempdir(role: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("{}{role}-", namespace_prefix()))
        .tempdir()
        .context("cannot create temp dir")
}

/// Runs `f` on a new thread inside network namespace `netns` (an `ip netns` name).
pub fn thread_in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> JoinHandle<Result<T>> {
    let name = netns.to_string();
    std::thread::spawn(move || {
        let path = format!("/var/run/netns/{name}");
        let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns(2) only reads the descriptor, which `ns` keeps open for the call; it
        // changes the namespace of this thread alone.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns({name}): {}", std::io::Error::last_os_error());
        }
        f()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_our_names_only() {
        assert_eq!(owner_pid("ntb-1234-5-node0"), Some(1234));
        assert_eq!(owner_pid("ntb-x-5-node0"), None);
        assert_eq!(owner_pid("cni-1234-5"), None);
    }

    #[test]
    fn pid_alive_sees_self_and_not_bogus() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX));
    }
}
