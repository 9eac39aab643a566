//! Node-local IPAM: addresses from the node's subnet, one record per
//! attachment `(containerID, ifname)`.
//!
//! The pool is the node's whole subnet whatever network (conflist) asks, so
//! there is one record store per node: `<dataDir>/_node/state.json`, shared
//! by every network name and every subnet (a record outside the current
//! subnet, left from an earlier lease, is kept until its DEL or GC but does
//! not take an address of the current one). Each record names the network
//! that made it, for GC.
//!
//! Earlier versions kept one store per network name,
//! `<dataDir>/<name>/state.json`. Those records are still read (merged into
//! the node's view), and the first update moves them into the node store,
//! notes the network in `migrated` (so a crash before the old file is
//! renamed to `state.json.migrated` cannot bring back a record released in
//! the meantime), then renames the old file.
//!
//! Writers hold an exclusive `flock` on `<dataDir>/_node/lock` for the whole
//! read-modify-write, and replace the file by rename, so concurrent plugin
//! processes never hand out an address twice and readers never see half a
//! file. The directory is 0700 and the lock file 0600, both owned by us
//! (root): a user who could open the lock could hold it and stall every
//! ADD. Waiting for the lock is bounded and ends in "try again later". The
//! allocation logic itself ([`State`], [`next_free`]) is pure.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::config::{IpRequest, Mac};
use crate::error::CniError;

/// The node store's directory under `dataDir`. Network names start with an
/// alphanumeric character, so no network's old directory can be this one.
pub const NODE_DIR: &str = "_node";
const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";
/// What a migrated per-network state file is renamed to.
const MIGRATED_SUFFIX: &str = ".migrated";

/// `0a:58:` + the IPv4 address (the convention of several CNI plugins): a
/// reused address keeps its MAC, so neighbours' ARP caches stay right.
pub fn mac_for_ip(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

/// The address whose derived MAC ([`mac_for_ip`]) is `mac`, if it is one.
fn ip_of_derived_mac(mac: [u8; 6]) -> Option<Ipv4Addr> {
    match mac {
        [0x0a, 0x58, a, b, c, d] => Some(Ipv4Addr::new(a, b, c, d)),
        _ => None,
    }
}

/// One attachment's address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    pub ip: Ipv4Addr,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    /// Host end of the veth, so DEL and GC can remove it without the netns.
    pub host_veth: String,
    /// The network (config `name`) that made it; GC of a network only
    /// releases its own. Records of per-network stores get their
    /// directory's name when migrated.
    #[serde(default)]
    pub network: String,
    /// The pod interface's MAC when the runtime asked for one; otherwise it
    /// is [`mac_for_ip`] of the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl Allocation {
    /// The MAC of the pod's interface.
    pub fn pod_mac(&self) -> [u8; 6] {
        self.mac
            .as_deref()
            .and_then(|m| Mac::parse(m).ok())
            .map_or_else(|| mac_for_ip(self.ip), |m| m.0)
    }

    /// "container C interface I (network N)", for messages.
    pub fn holder(&self) -> String {
        format!(
            "container {} interface {} (network {})",
            self.container_id,
            self.ifname,
            if self.network.is_empty() {
                "unknown"
            } else {
                &self.network
            }
        )
    }
}

/// The whole IPAM state of the node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// The most recently handed-out address: allocation continues after it,
    /// so a released address is not reused at once (stale ARP/conntrack).
    #[serde(default)]
    pub last_reserved: Option<Ipv4Addr>,
    #[serde(default)]
    pub allocations: Vec<Allocation>,
    /// Networks whose per-network store has been merged into this one; their
    /// old files are ignored from then on.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub migrated: BTreeSet<String>,
}

/// What one ADD asks the IPAM for.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub network: &'a str,
    pub container_id: &'a str,
    pub ifname: &'a str,
    pub host_veth: &'a str,
    /// A specific address (`IP=`, `ips`), else the next free one.
    pub ip: Option<IpRequest>,
    /// A specific MAC (`MAC=`, `mac`), else [`mac_for_ip`].
    pub mac: Option<Mac>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocError {
    AlreadyExists(Box<Allocation>),
    Exhausted { subnet: Ipv4Net, in_use: usize },
    /// The requested address cannot be a pod's here; the string says why.
    Unusable(String),
    /// The requested address belongs to another attachment.
    IpHeld(Box<Allocation>),
    /// The requested MAC is another attachment's.
    MacHeld(Box<Allocation>),
}

/// The first free host address after `last` (wrapping around), skipping the
/// network and broadcast addresses, `gateway` and everything in `used`.
pub fn next_free(
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    used: &BTreeSet<Ipv4Addr>,
    last: Option<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let first = u32::from(subnet.network()).checked_add(1)?;
    let end = u32::from(subnet.broadcast()).checked_sub(1)?; // inclusive
    if first > end {
        return None;
    }
    let start = match last.map(u32::from) {
        Some(l) if (first..end).contains(&l) => l + 1,
        _ => first,
    };
    let usable = |n: u32| {
        let ip = Ipv4Addr::from(n);
        ip != gateway && !used.contains(&ip)
    };
    (start..=end)
        .chain(first..start)
        .find(|n| usable(*n))
        .map(Ipv4Addr::from)
}

/// Why `want` cannot be a pod's address in `subnet`, if it cannot.
fn unusable(want: IpRequest, subnet: Ipv4Net, gateway: Ipv4Addr) -> Option<String> {
    let ip = want.addr;
    if !subnet.contains(&ip) {
        return Some(format!(
            "{ip} is not in this node's pod subnet {subnet}"
        ));
    }
    if let Some(len) = want.prefix_len.filter(|l| *l != subnet.prefix_len()) {
        return Some(format!(
            "{want} has prefix length /{len}, but this node's pod subnet is {subnet}"
        ));
    }
    let what = if ip == subnet.network() {
        "the network address"
    } else if ip == subnet.broadcast() {
        "the broadcast address"
    } else if ip == gateway {
        "the gateway (the bridge's address)"
    } else {
        return None;
    };
    Some(format!("{ip} is {what} of {subnet}"))
}

impl State {
    pub fn find(&self, container_id: &str, ifname: &str) -> Option<&Allocation> {
        self.allocations
            .iter()
            .find(|a| a.container_id == container_id && a.ifname == ifname)
    }

    /// Addresses in use inside `subnet`.
    pub fn used_in(&self, subnet: Ipv4Net) -> BTreeSet<Ipv4Addr> {
        self.allocations
            .iter()
            .map(|a| a.ip)
            .filter(|ip| subnet.contains(ip))
            .collect()
    }

    /// Number of addresses pods can get in `subnet` (all hosts but the gateway).
    pub fn capacity(subnet: Ipv4Net) -> usize {
        let hosts = (1u64 << (32 - u32::from(subnet.prefix_len()))).saturating_sub(2);
        usize::try_from(hosts.saturating_sub(1)).unwrap_or(usize::MAX)
    }

    /// [`State::allocate_around`] with nothing held elsewhere (the tests' shorthand).
    #[cfg(test)]
    pub fn allocate(
        &mut self,
        subnet: Ipv4Net,
        gateway: Ipv4Addr,
        req: &Request<'_>,
    ) -> Result<(Ipv4Addr, [u8; 6]), AllocError> {
        self.allocate_around(subnet, gateway, req, &BTreeSet::new())
    }

    /// Reserves an address (and MAC) for the attachment, never one of `foreign` (held outside
    /// this store, by host-local: see [`host_local_addresses`]).
    pub fn allocate_around(
        &mut self,
        subnet: Ipv4Net,
        gateway: Ipv4Addr,
        req: &Request<'_>,
        foreign: &BTreeSet<Ipv4Addr>,
    ) -> Result<(Ipv4Addr, [u8; 6]), AllocError> {
        if let Some(a) = self.find(req.container_id, req.ifname) {
            return Err(AllocError::AlreadyExists(Box::new(a.clone())));
        }
        if let Some(mac) = req.mac {
            if let Some(a) = self.allocations.iter().find(|a| a.pod_mac() == mac.0) {
                return Err(AllocError::MacHeld(Box::new(a.clone())));
            }
        }
        let ip = match req.ip {
            Some(want) => {
                if let Some(why) = unusable(want, subnet, gateway) {
                    return Err(AllocError::Unusable(why));
                }
                if let Some(a) = self.allocations.iter().find(|a| a.ip == want.addr) {
                    return Err(AllocError::IpHeld(Box::new(a.clone())));
                }
                if foreign.contains(&want.addr) {
                    return Err(AllocError::Unusable(format!("{} is held in a host-local address store (hostLocalDirs)", want.addr)));
                }
                // Not `last_reserved`: the dynamic sequence goes on as before.
                want.addr
            }
            None => {
                let mut used = self.used_in(subnet);
                let in_use = used.len();
                // An address whose derived MAC a pod asked for explicitly
                // would give two interfaces one MAC.
                used.extend(
                    self.allocations
                        .iter()
                        .filter(|a| a.mac.is_some())
                        .filter_map(|a| ip_of_derived_mac(a.pod_mac())),
                );
                if let Some(mac) = req.mac.and_then(|m| ip_of_derived_mac(m.0)) {
                    used.remove(&mac); // our own MAC: no clash with ourselves
                }
                used.extend(foreign.iter().filter(|ip| subnet.contains(*ip)));
                let ip = next_free(subnet, gateway, &used, self.last_reserved)
                    .ok_or(AllocError::Exhausted { subnet, in_use })?;
                self.last_reserved = Some(ip);
                ip
            }
        };
        let mac = match req.mac {
            Some(m) => m.0,
            None => {
                let derived = mac_for_ip(ip);
                if let Some(a) = self.allocations.iter().find(|a| a.pod_mac() == derived) {
                    return Err(AllocError::MacHeld(Box::new(a.clone())));
                }
                derived
            }
        };
        self.allocations.push(Allocation {
            ip,
            container_id: req.container_id.to_string(),
            ifname: req.ifname.to_string(),
            host_veth: req.host_veth.to_string(),
            network: req.network.to_string(),
            mac: req.mac.map(|m| m.to_string()),
        });
        Ok((ip, mac))
    }

    /// Removes the attachment's record, returning it (None if absent).
    /// Whatever network made it: an interface name is unique in a pod.
    pub fn release(&mut self, container_id: &str, ifname: &str) -> Option<Allocation> {
        let pos = self
            .allocations
            .iter()
            .position(|a| a.container_id == container_id && a.ifname == ifname)?;
        Some(self.allocations.remove(pos))
    }

    /// Removes every record of `network` whose attachment is not in `valid`
    /// (other networks' records are theirs to collect).
    pub fn retain_valid(
        &mut self,
        network: &str,
        valid: &BTreeSet<(String, String)>,
    ) -> Vec<Allocation> {
        let (keep, stale): (Vec<_>, Vec<_>) = std::mem::take(&mut self.allocations)
            .into_iter()
            .partition(|a| {
                a.network != network
                    || valid.contains(&(a.container_id.clone(), a.ifname.clone()))
            });
        self.allocations = keep;
        stale
    }

    /// Merges per-network stores of the old layout (`(network name, state)`)
    /// into this one: their records get the network's name; a record for an
    /// attachment already known here is dropped (the node store is newer).
    /// Names already in `migrated` are skipped.
    pub fn merge_legacy(&mut self, legacy: Vec<(String, State)>) {
        for (network, old) in legacy {
            if !self.migrated.insert(network.clone()) {
                continue;
            }
            for mut a in old.allocations {
                if self.find(&a.container_id, &a.ifname).is_some() {
                    continue;
                }
                if a.network.is_empty() {
                    a.network = network.clone();
                }
                self.allocations.push(a);
            }
            if self.last_reserved.is_none() {
                self.last_reserved = old.last_reserved;
            }
        }
    }
}

/// The on-disk store of the node.
#[derive(Debug, Clone)]
pub struct Store {
    data_dir: PathBuf,
    dir: PathBuf,
    lock_timeout: Duration,
}

/// The addresses in use in host-local's stores `dirs` (`<dataDir>/<network>/`: one file named
/// by each address, besides `last_reserved_ip.0` and `lock`). A missing directory holds none.
pub fn host_local_addresses(dirs: &[PathBuf]) -> Result<BTreeSet<Ipv4Addr>, CniError> {
    let mut out = BTreeSet::new();
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("reading host-local's address store", dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_err("reading host-local's address store", dir, e))?;
            if let Some(ip) = entry.file_name().to_str().and_then(|n| n.parse::<Ipv4Addr>().ok()) {
                out.insert(ip);
            }
        }
    }
    Ok(out)
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> CniError {
    CniError::Io(format!("{what} {}: {e}", path.display()))
}

fn euid() -> u32 {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Makes sure an opened file or directory is ours and not accessible to
/// group or others (`mode` is what it should be). A file of another owner
/// is refused: it may be held open by that user, and we cannot fix it.
fn ensure_private(file: &File, path: &Path, mode: u32) -> Result<(), CniError> {
    let meta = file
        .metadata()
        .map_err(|e| io_err("cannot stat", path, e))?;
    let me = euid();
    if meta.uid() != me {
        return Err(CniError::Io(format!(
            "{} is owned by uid {}, not by this plugin's uid {me}: refusing to use it (remove it)",
            path.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| io_err("cannot make private", path, e))?;
        eprintln!(
            "netd-cni: {} had mode {:o}, now {mode:o}",
            path.display(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

/// Creates `dir` (mode 0700) if absent and checks it: a real directory (not
/// a symlink), ours, and private.
fn ensure_private_dir(dir: &Path) -> Result<(), CniError> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| io_err("cannot create IPAM directory", parent, e))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("cannot create IPAM directory", dir, e)),
    }
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(|e| io_err("cannot open IPAM directory (a symlink?)", dir, e))?;
    ensure_private(&f, dir, 0o700)
}

/// The pid holding the lock on (`dev`, `ino`), from `/proc/locks` text:
/// `1: FLOCK  ADVISORY  WRITE 1234 00:2d:56789 0 EOF` (device as hex
/// major:minor; lines with `->` are waiters).
fn lock_holder(proc_locks: &str, dev: u64, ino: u64) -> Option<u32> {
    // glibc's encoding of dev_t.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let want = format!("{major:02x}:{minor:02x}:{ino}");
    proc_locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) == Some(&"->") || fields.get(1) != Some(&"FLOCK") {
            return None;
        }
        (fields.get(5) == Some(&want.as_str()))
            .then(|| fields.get(4)?.parse().ok())
            .flatten()
    })
}

/// An exclusive `flock`, released when the file is closed (on drop).
struct Lock(#[allow(dead_code)] File);

impl Lock {
    /// Opens (creating, 0600) and locks `path`, waiting at most `timeout`.
    /// Polls with LOCK_NB: a blocking flock cannot be given a deadline
    /// without signals.
    fn acquire(path: &Path, timeout: Duration) -> Result<Lock, CniError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| io_err("cannot open lock file", path, e))?;
        ensure_private(&file, path, 0o600)?;
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            // SAFETY: flock(2) on a file descriptor we own and keep open for
            // the duration of the call; it touches no memory of ours.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(Lock(file));
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => {}
                _ => return Err(io_err("cannot lock", path, e)),
            }
            let now = Instant::now();
            if now >= deadline {
                let holder = file
                    .metadata()
                    .ok()
                    .and_then(|m| {
                        let locks = std::fs::read_to_string("/proc/locks").ok()?;
                        lock_holder(&locks, m.dev(), m.ino())
                    })
                    // A flock belongs to the open file, and /proc/locks names
                    // the process that took it, which may have exited since.
                    .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
                    .map(|pid| format!(" by pid {pid}"))
                    .unwrap_or_default();
                return Err(CniError::TryAgainLater(format!(
                    "the IPAM lock {} is held{holder} for more than {:.1}s",
                    path.display(),
                    timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

impl Store {
    pub fn new(data_dir: &Path, lock_timeout: Duration) -> Store {
        Store {
            data_dir: data_dir.to_path_buf(),
            dir: data_dir.join(NODE_DIR),
            lock_timeout,
        }
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    pub fn lock_path(&self) -> PathBuf {
        self.dir.join(LOCK_FILE)
    }

    /// A state file; a missing one is an empty state.
    fn read_file(path: &Path) -> Result<State, CniError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                CniError::Io(format!("IPAM state {} is corrupt: {e}", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(io_err("cannot read IPAM state", path, e)),
        }
    }

    /// The old per-network state files not yet migrated: `(name, path)`.
    fn legacy_files(
        &self,
        migrated: &BTreeSet<String>,
    ) -> Result<Vec<(String, PathBuf)>, CniError> {
        let entries = match std::fs::read_dir(&self.data_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("cannot list IPAM directory", &self.data_dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_err("cannot list IPAM directory", &self.data_dir, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name == NODE_DIR || migrated.contains(&name) {
                continue;
            }
            let path = entry.path().join(STATE_FILE);
            if path.is_file() {
                out.push((name, path));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The node's state with old per-network records merged in, and the
    /// old files merged.
    fn merged(&self, mut state: State) -> Result<(State, Vec<PathBuf>), CniError> {
        let mut legacy = Vec::new();
        let mut paths = Vec::new();
        for (name, path) in self.legacy_files(&state.migrated)? {
            legacy.push((name, Self::read_file(&path)?));
            paths.push(path);
        }
        state.merge_legacy(legacy);
        Ok((state, paths))
    }

    /// Reads the state without locking (writers replace it atomically).
    pub fn read(&self) -> Result<State, CniError> {
        let node = Self::read_file(&self.state_path())?;
        self.merged(node).map(|(s, _)| s)
    }

    /// Runs `f` on the state under the lock and writes the state back if `f`
    /// changed it or old per-network records were migrated.
    pub fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> Result<R, CniError> {
        ensure_private_dir(&self.dir)?;
        let _lock = Lock::acquire(&self.lock_path(), self.lock_timeout)?;
        let on_disk = Self::read_file(&self.state_path())?;
        let (mut state, legacy) = self.merged(on_disk.clone())?;
        let r = f(&mut state);
        if state != on_disk {
            self.write(&state)?;
        }
        // Only now that the node store has their records (and names them
        // in `migrated`): a failure here just leaves a file we ignore.
        for path in legacy {
            let mut to = path.clone().into_os_string();
            to.push(MIGRATED_SUFFIX);
            if let Err(e) = std::fs::rename(&path, &to) {
                eprintln!(
                    "netd-cni: migrated {} but cannot rename it: {e}",
                    path.display()
                );
            }
        }
        Ok(r)
    }

    /// Temp file + rename. No fsync: after a crash of the node every pod is
    /// gone anyway and the runtime garbage-collects; a plugin crash cannot
    /// lose a completed rename.
    fn write(&self, state: &State) -> Result<(), CniError> {
        let path = self.state_path();
        let tmp = self
            .dir
            .join(format!(".{STATE_FILE}.tmp{}", std::process::id()));
        let data = serde_json::to_vec_pretty(state)
            .map_err(|e| CniError::Internal(format!("cannot serialize IPAM state: {e}")))?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| io_err("cannot create", &tmp, e))?;
        f.write_all(&data)
            .map_err(|e| io_err("cannot write", &tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(|e| io_err("cannot replace", &path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    const GW: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 1);
    const T: Duration = Duration::from_secs(10);

    fn req<'a>(cid: &'a str, ifname: &'a str) -> Request<'a> {
        Request {
            network: "netd",
            container_id: cid,
            ifname,
            host_veth: "v",
            ip: None,
            mac: None,
        }
    }

    /// `r` in 10.244.7.0/24.
    fn take(s: &mut State, r: Request<'_>) -> Result<(Ipv4Addr, [u8; 6]), AllocError> {
        s.allocate(net("10.244.7.0/24"), GW, &r)
    }

    fn alloc(s: &mut State, cid: &str, ifname: &str) -> Result<Ipv4Addr, AllocError> {
        take(s, req(cid, ifname)).map(|(ip, _)| ip)
    }

    fn want(s: &str) -> Option<IpRequest> {
        Some(IpRequest::parse(s).unwrap())
    }

    /// Addresses host-local handed out (flannel's pods, after a switch to netd) are skipped and
    /// cannot be asked for; its bookkeeping files and other networks' addresses do not count.
    #[test]
    fn host_local_addresses_are_never_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("cbr0");
        std::fs::create_dir(&store).unwrap();
        for f in ["10.244.7.2", "10.244.7.3", "10.244.7.5", "last_reserved_ip.0", "lock"] {
            std::fs::write(store.join(f), "cid\neth0").unwrap();
        }
        let held = host_local_addresses(&[store, dir.path().join("absent")]).unwrap();
        assert_eq!(held.iter().map(|i| i.to_string()).collect::<Vec<_>>(), ["10.244.7.2", "10.244.7.3", "10.244.7.5"]);
        let mut s = State::default();
        let got: Vec<String> = ["a", "b", "c"]
            .iter()
            .map(|cid| s.allocate_around(net("10.244.7.0/24"), ip("10.244.7.1"), &req(cid, "eth0"), &held).unwrap().0.to_string())
            .collect();
        assert_eq!(got, ["10.244.7.4", "10.244.7.6", "10.244.7.7"]);
        let r = Request { ip: want("10.244.7.5"), ..req("d", "eth0") };
        assert!(matches!(s.allocate_around(net("10.244.7.0/24"), ip("10.244.7.1"), &r, &held), Err(AllocError::Unusable(m)) if m.contains("host-local")));
    }

    #[test]
    fn first_address_skips_network_and_gateway() {
        let used = BTreeSet::new();
        assert_eq!(
            next_free(net("10.244.7.0/24"), GW, &used, None),
            Some(ip("10.244.7.2"))
        );
    }

    #[test]
    fn continues_after_last_and_wraps() {
        let used: BTreeSet<_> = [ip("10.244.7.2")].into();
        assert_eq!(
            next_free(net("10.244.7.0/24"), GW, &used, Some(ip("10.244.7.9"))),
            Some(ip("10.244.7.10"))
        );
        // After the last host address: wrap to the start, skip used + gateway.
        assert_eq!(
            next_free(net("10.244.7.0/24"), GW, &used, Some(ip("10.244.7.254"))),
            Some(ip("10.244.7.3"))
        );
        // A `last` outside the subnet (lease changed) starts from the top.
        assert_eq!(
            next_free(net("10.244.7.0/24"), GW, &used, Some(ip("10.244.3.77"))),
            Some(ip("10.244.7.3"))
        );
    }

    #[test]
    fn never_network_gateway_or_broadcast_and_exhausts() {
        let subnet = net("10.244.7.0/29"); // hosts .1-.6, .1 is the gateway
        let mut used = BTreeSet::new();
        let mut last = None;
        while let Some(a) = next_free(subnet, GW, &used, last) {
            assert!(
                a != subnet.network() && a != subnet.broadcast() && a != GW,
                "{a}"
            );
            assert!(used.insert(a), "{a} handed out twice");
            last = Some(a);
        }
        assert_eq!(used.len(), 5);
        assert_eq!(used.len(), State::capacity(subnet));
    }

    #[test]
    fn gateway_not_first_address() {
        let used = BTreeSet::new();
        let got = next_free(net("10.244.7.0/30"), ip("10.244.7.2"), &used, None);
        assert_eq!(got, Some(ip("10.244.7.1")));
    }

    #[test]
    fn state_allocate_release_gc() {
        let mut s = State::default();
        let a = alloc(&mut s, "c1", "eth0").unwrap();
        let b = alloc(&mut s, "c2", "eth0").unwrap();
        let c = alloc(&mut s, "c1", "net1").unwrap();
        assert_eq!(
            (a, b, c),
            (ip("10.244.7.2"), ip("10.244.7.3"), ip("10.244.7.4"))
        );
        assert!(matches!(
            alloc(&mut s, "c1", "eth0"),
            Err(AllocError::AlreadyExists(x)) if x.ip == a
        ));
        assert_eq!(s.release("c2", "eth0").map(|x| x.ip), Some(b));
        assert_eq!(s.release("c2", "eth0"), None);
        // Released addresses are not reused right away.
        assert_eq!(alloc(&mut s, "c4", "eth0").unwrap(), ip("10.244.7.5"));
        let valid: BTreeSet<_> = [("c1".to_string(), "eth0".to_string())].into();
        let stale: Vec<_> = s
            .retain_valid("netd", &valid)
            .into_iter()
            .map(|x| x.ip)
            .collect();
        assert_eq!(stale, vec![c, ip("10.244.7.5")]);
        assert_eq!(s.allocations.len(), 1);
    }

    #[test]
    fn gc_only_collects_its_own_network() {
        let mut s = State::default();
        let subnet = net("10.244.7.0/24");
        alloc(&mut s, "a", "eth0").unwrap();
        s.allocate(
            subnet,
            GW,
            &Request {
                network: "other",
                ..req("b", "eth0")
            },
        )
        .unwrap();
        let stale = s.retain_valid("other", &BTreeSet::new());
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].container_id, "b");
        assert_eq!(s.allocations.len(), 1);
        assert_eq!(s.allocations[0].network, "netd");
    }

    #[test]
    fn exhaustion_is_reported() {
        let mut s = State::default();
        let subnet = net("10.244.7.0/30");
        s.allocate(subnet, GW, &req("a", "eth0")).unwrap();
        assert_eq!(
            s.allocate(subnet, GW, &req("b", "eth0")),
            Err(AllocError::Exhausted { subnet, in_use: 1 })
        );
    }

    #[test]
    fn requested_address_is_checked_and_recorded() {
        let subnet = net("10.244.7.0/24");
        let mut s = State::default();
        let first = alloc(&mut s, "dyn", "eth0").unwrap();
        let r = Request {
            ip: want("10.244.7.77"),
            ..req("static", "eth0")
        };
        let (got, mac) = s.allocate(subnet, GW, &r).unwrap();
        assert_eq!(got, ip("10.244.7.77"));
        assert_eq!(mac, mac_for_ip(got));
        // The dynamic sequence is not moved by a static request.
        assert_eq!(s.last_reserved, Some(first));
        // Taken: the error names the holder.
        let r2 = Request {
            ip: want("10.244.7.77/24"),
            ..req("other", "eth0")
        };
        match s.allocate(subnet, GW, &r2) {
            Err(AllocError::IpHeld(a)) => {
                assert_eq!(a.holder(), "container static interface eth0 (network netd)")
            }
            other => panic!("{other:?}"),
        }
        for (bad, why) in [
            ("10.244.8.5", "not in this node's pod subnet 10.244.7.0/24"),
            ("10.244.7.5/16", "prefix length /16"),
            ("10.244.7.0", "network address"),
            ("10.244.7.255", "broadcast address"),
            ("10.244.7.1", "gateway"),
        ] {
            let r = Request {
                ip: want(bad),
                ..req("x", "eth0")
            };
            match s.allocate(subnet, GW, &r) {
                Err(AllocError::Unusable(m)) => assert!(m.contains(why), "{bad}: {m}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        // Released like any other.
        assert_eq!(s.release("static", "eth0").map(|a| a.ip), Some(got));
        assert!(s.allocate(subnet, GW, &r2).is_ok());
    }

    #[test]
    fn requested_mac_is_recorded_and_never_shared() {
        let mut s = State::default();
        // A pod asks for the MAC .2 would derive.
        let m = Mac(mac_for_ip(ip("10.244.7.2")));
        let r = Request {
            mac: Some(m),
            ..req("m", "eth0")
        };
        let (got, mac) = take(&mut s, r).unwrap();
        assert_eq!(mac, m.0);
        assert_eq!(got, ip("10.244.7.2"), "its own derived MAC is no clash");
        assert_eq!(s.find("m", "eth0").unwrap().pod_mac(), m.0);
        // .3's MAC on another address: the next dynamic pod skips .3.
        let m3 = Mac(mac_for_ip(ip("10.244.7.3")));
        let r = Request {
            mac: Some(m3),
            ip: want("10.244.7.50"),
            ..req("m3", "eth0")
        };
        let (got, _) = take(&mut s, r).unwrap();
        assert_eq!(got, ip("10.244.7.50"));
        assert_eq!(alloc(&mut s, "d", "eth0").unwrap(), ip("10.244.7.4"));
        // The same MAC again is refused, naming the holder.
        let r = Request {
            mac: Some(m3),
            ..req("again", "eth0")
        };
        let e = take(&mut s, r).unwrap_err();
        assert!(matches!(e, AllocError::MacHeld(a) if a.container_id == "m3"));
    }

    #[test]
    fn legacy_records_are_merged_once() {
        let old = |cid: &str, ip_: &str| State {
            last_reserved: Some(ip(ip_)),
            allocations: vec![Allocation {
                ip: ip(ip_),
                container_id: cid.into(),
                ifname: "eth0".into(),
                host_veth: "v".into(),
                network: String::new(),
                mac: None,
            }],
            migrated: BTreeSet::new(),
        };
        let mut s = State::default();
        s.merge_legacy(vec![
            ("netd".into(), old("a", "10.244.7.2")),
            ("other".into(), old("b", "10.244.7.2")),
        ]);
        // Both pods of the old bug are kept: both hold the address.
        assert_eq!(s.allocations.len(), 2);
        assert_eq!(s.allocations[1].network, "other");
        assert_eq!(s.migrated, ["netd".to_string(), "other".to_string()].into());
        assert_eq!(s.last_reserved, Some(ip("10.244.7.2")));
        // A new pod gets neither.
        assert_eq!(alloc(&mut s, "c", "eth0").unwrap(), ip("10.244.7.3"));
        // Released, then offered again (a crash before the rename): ignored.
        s.release("a", "eth0");
        s.merge_legacy(vec![("netd".into(), old("a", "10.244.7.2"))]);
        assert!(s.find("a", "eth0").is_none());
    }

    #[test]
    fn lock_holder_from_proc_locks() {
        let dev: u64 = 0x2d; // 00:2d
        let text = "1: POSIX  ADVISORY  WRITE 99 00:2d:7 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 00:2d:7 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 4343 00:2d:7 0 EOF\n";
        assert_eq!(lock_holder(text, dev, 7), Some(4242));
        assert_eq!(lock_holder(text, dev, 8), None);
        // major 259, minor 3: 103:03
        let dev = (259u64 << 8) | 3;
        assert_eq!(
            lock_holder("1: FLOCK ADVISORY WRITE 5 103:03:9 0 EOF", dev, 9),
            Some(5)
        );
    }

    #[test]
    fn store_round_trip_private_and_no_temp_left() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), T);
        assert_eq!(store.read().unwrap(), State::default());
        let (got, _) = store
            .update(|s| s.allocate(net("10.244.7.0/24"), GW, &req("c", "eth0")))
            .unwrap()
            .unwrap();
        assert_eq!(got, ip("10.244.7.2"));
        let s = store.read().unwrap();
        assert_eq!(s.find("c", "eth0").map(|a| a.ip), Some(got));
        let node_dir = dir.path().join(NODE_DIR);
        let names: BTreeSet<_> = std::fs::read_dir(&node_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["lock".to_string(), "state.json".to_string()].into());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&node_dir), 0o700);
        assert_eq!(mode(&store.lock_path()), 0o600);
        assert_eq!(mode(&store.state_path()), 0o600);
    }

    #[test]
    fn world_accessible_lock_and_dir_are_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), T);
        let node_dir = dir.path().join(NODE_DIR);
        std::fs::create_dir(&node_dir).unwrap();
        std::fs::set_permissions(&node_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(store.lock_path(), "").unwrap();
        std::fs::set_permissions(store.lock_path(), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        store.update(|_| ()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&node_dir), 0o700);
        assert_eq!(mode(&store.lock_path()), 0o600);
    }

    #[test]
    fn foreign_or_symlinked_lock_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), T);
        store.update(|_| ()).unwrap();
        // A symlink in place of the lock file.
        std::fs::remove_file(store.lock_path()).unwrap();
        let target = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&target, store.lock_path()).unwrap();
        let e = store.update(|_| ()).unwrap_err();
        assert_eq!(e.code(), 5, "{e}");
        assert!(e.to_string().contains("lock"), "{e}");
        assert!(!target.exists(), "the symlink was followed");
        std::fs::remove_file(store.lock_path()).unwrap();
        // A lock file of another user (this test runs as root, as the plugin does).
        if euid() == 0 {
            std::fs::write(store.lock_path(), "").unwrap();
            std::os::unix::fs::chown(store.lock_path(), Some(65534), Some(65534)).unwrap();
            let e = store.update(|_| ()).unwrap_err();
            assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        }
    }

    #[test]
    fn a_held_lock_times_out_with_try_again_later() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), Duration::from_millis(200));
        store.update(|_| ()).unwrap();
        let held = File::open(store.lock_path()).unwrap();
        // SAFETY: flock on a descriptor we own; no memory involved.
        assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
        // On a thread, so that a wait without a bound fails the test
        // instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = store.clone();
        std::thread::spawn(move || tx.send(s2.update(|_| ())));
        let e = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("update still waiting for the lock")
            .unwrap_err();
        assert_eq!(e.code(), 11, "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&store.lock_path().display().to_string()), "{msg}");
        assert!(msg.contains(&format!("by pid {}", std::process::id())), "{msg}");
        drop(held);
        store.update(|_| ()).unwrap();
    }

    #[test]
    fn store_is_safe_across_threads() {
        // flock locks are per open file description, so threads contend like
        // processes do.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), T);
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || {
                    store
                        .update(|s| alloc(s, &format!("c{i}"), "eth0"))
                        .unwrap()
                        .unwrap()
                })
            })
            .collect();
        let ips: BTreeSet<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(ips.len(), 16);
        assert_eq!(store.read().unwrap().allocations.len(), 16);
    }

    #[test]
    fn corrupt_state_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), T);
        std::fs::create_dir_all(dir.path().join(NODE_DIR)).unwrap();
        std::fs::write(store.state_path(), "{garbage").unwrap();
        let e = store.read().unwrap_err();
        assert_eq!(e.code(), 5);
        assert!(e.to_string().contains("state.json"), "{e}");
    }

    #[test]
    fn old_per_network_stores_are_read_then_migrated() {
        let dir = tempfile::tempdir().unwrap();
        // Written by the previous version: one store per network name.
        for (name, cid, addr) in [
            ("netd", "old-a", "10.244.7.2"),
            ("other", "old-b", "10.244.7.3"),
        ] {
            std::fs::create_dir_all(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("lock"), "").unwrap();
            std::fs::write(
                dir.path().join(name).join("state.json"),
                format!(
                    r#"{{"lastReserved":"{addr}","allocations":[{{"ip":"{addr}","containerID":"{cid}","ifname":"eth0","hostVeth":"veth0"}}]}}"#
                ),
            )
            .unwrap();
        }
        let store = Store::new(dir.path(), T);
        // Read before any update: the old records are known.
        let s = store.read().unwrap();
        assert_eq!(s.find("old-a", "eth0").unwrap().network, "netd");
        assert_eq!(s.find("old-b", "eth0").unwrap().ip, ip("10.244.7.3"));
        // The first update moves them; a new pod gets neither address.
        let got = store.update(|s| alloc(s, "new", "eth0")).unwrap().unwrap();
        assert_eq!(got, ip("10.244.7.4"));
        for name in ["netd", "other"] {
            assert!(!dir.path().join(name).join("state.json").exists());
            assert!(dir.path().join(name).join("state.json.migrated").exists());
        }
        let on_disk: State =
            serde_json::from_slice(&std::fs::read(store.state_path()).unwrap()).unwrap();
        assert_eq!(on_disk.allocations.len(), 3);
        // DEL of an old pod releases it for good, even if its old file came
        // back (a crash between the write and the rename).
        store.update(|s| s.release("old-a", "eth0")).unwrap();
        std::fs::rename(
            dir.path().join("netd/state.json.migrated"),
            dir.path().join("netd/state.json"),
        )
        .unwrap();
        assert!(store.read().unwrap().find("old-a", "eth0").is_none());
    }
}
