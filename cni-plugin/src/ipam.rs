//! Node-local IPAM: addresses from the node's subnet, one record per
//! attachment `(containerID, ifname)`.
//!
//! State lives in `<dataDir>/<network name>/state.json`. Writers hold an
//! exclusive `flock` on `<dataDir>/<network name>/lock` for the whole
//! read-modify-write, and replace the file by rename, so concurrent plugin
//! processes never hand out an address twice and readers never see half a
//! file. The allocation logic itself ([`State`], [`next_free`]) is pure.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::error::CniError;

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
}

/// The whole IPAM state of one network on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// The most recently handed-out address: allocation continues after it,
    /// so a released address is not reused at once (stale ARP/conntrack).
    #[serde(default)]
    pub last_reserved: Option<Ipv4Addr>,
    #[serde(default)]
    pub allocations: Vec<Allocation>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocError {
    AlreadyExists(Allocation),
    Exhausted { subnet: Ipv4Net, in_use: usize },
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

    /// Reserves an address for the attachment.
    pub fn allocate(
        &mut self,
        subnet: Ipv4Net,
        gateway: Ipv4Addr,
        container_id: &str,
        ifname: &str,
        host_veth: &str,
    ) -> Result<Ipv4Addr, AllocError> {
        if let Some(a) = self.find(container_id, ifname) {
            return Err(AllocError::AlreadyExists(a.clone()));
        }
        let used = self.used_in(subnet);
        let ip =
            next_free(subnet, gateway, &used, self.last_reserved).ok_or(AllocError::Exhausted {
                subnet,
                in_use: used.len(),
            })?;
        self.last_reserved = Some(ip);
        self.allocations.push(Allocation {
            ip,
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
            host_veth: host_veth.to_string(),
        });
        Ok(ip)
    }

    /// Removes the attachment's record, returning it (None if absent).
    pub fn release(&mut self, container_id: &str, ifname: &str) -> Option<Allocation> {
        let pos = self
            .allocations
            .iter()
            .position(|a| a.container_id == container_id && a.ifname == ifname)?;
        Some(self.allocations.remove(pos))
    }

    /// Removes every record whose attachment is not in `valid`.
    pub fn retain_valid(&mut self, valid: &BTreeSet<(String, String)>) -> Vec<Allocation> {
        let (keep, stale): (Vec<_>, Vec<_>) = std::mem::take(&mut self.allocations)
            .into_iter()
            .partition(|a| valid.contains(&(a.container_id.clone(), a.ifname.clone())));
        self.allocations = keep;
        stale
    }
}

/// The on-disk store of one network.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> CniError {
    CniError::Io(format!("{what} {}: {e}", path.display()))
}

/// An exclusive `flock`, released when the file is closed (on drop).
struct Lock(#[allow(dead_code)] File);

impl Lock {
    fn acquire(path: &Path) -> Result<Lock, CniError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| io_err("cannot open lock file", path, e))?;
        loop {
            // SAFETY: flock(2) on a file descriptor we own and keep open for
            // the duration of the call; it touches no memory of ours.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(Lock(file));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io_err("cannot lock", path, e));
            }
        }
    }
}

impl Store {
    pub fn new(data_dir: &Path, network: &str) -> Store {
        Store {
            dir: data_dir.join(network),
        }
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Reads the state without locking (writers replace it atomically).
    /// A missing file is an empty state.
    pub fn read(&self) -> Result<State, CniError> {
        let path = self.state_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                CniError::Io(format!("IPAM state {} is corrupt: {e}", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(io_err("cannot read IPAM state", &path, e)),
        }
    }

    /// Runs `f` on the state under the lock and writes the state back if `f`
    /// changed it.
    pub fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> Result<R, CniError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| io_err("cannot create IPAM directory", &self.dir, e))?;
        let _lock = Lock::acquire(&self.dir.join("lock"))?;
        let mut state = self.read()?;
        let before = state.clone();
        let r = f(&mut state);
        if state != before {
            self.write(&state)?;
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
            .join(format!(".state.json.tmp{}", std::process::id()));
        let data = serde_json::to_vec_pretty(state)
            .map_err(|e| CniError::Internal(format!("cannot serialize IPAM state: {e}")))?;
        let mut f = File::create(&tmp).map_err(|e| io_err("cannot create", &tmp, e))?;
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
        let subnet = net("10.244.7.0/24");
        let a = s.allocate(subnet, GW, "c1", "eth0", "veth1").unwrap();
        let b = s.allocate(subnet, GW, "c2", "eth0", "veth2").unwrap();
        let c = s.allocate(subnet, GW, "c1", "net1", "veth3").unwrap();
        assert_eq!(
            (a, b, c),
            (ip("10.244.7.2"), ip("10.244.7.3"), ip("10.244.7.4"))
        );
        assert!(matches!(
            s.allocate(subnet, GW, "c1", "eth0", "veth1"),
            Err(AllocError::AlreadyExists(x)) if x.ip == a
        ));
        assert_eq!(s.release("c2", "eth0").map(|x| x.ip), Some(b));
        assert_eq!(s.release("c2", "eth0"), None);
        // Released addresses are not reused right away.
        assert_eq!(
            s.allocate(subnet, GW, "c4", "eth0", "v").unwrap(),
            ip("10.244.7.5")
        );
        let valid: BTreeSet<_> = [("c1".to_string(), "eth0".to_string())].into();
        let stale: Vec<_> = s.retain_valid(&valid).into_iter().map(|x| x.ip).collect();
        assert_eq!(stale, vec![c, ip("10.244.7.5")]);
        assert_eq!(s.allocations.len(), 1);
    }

    #[test]
    fn exhaustion_is_reported() {
        let mut s = State::default();
        let subnet = net("10.244.7.0/30");
        s.allocate(subnet, GW, "a", "eth0", "v").unwrap();
        assert_eq!(
            s.allocate(subnet, GW, "b", "eth0", "v"),
            Err(AllocError::Exhausted { subnet, in_use: 1 })
        );
    }

    #[test]
    fn store_round_trip_and_no_temp_left() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), "netd");
        assert_eq!(store.read().unwrap(), State::default());
        let got = store
            .update(|s| s.allocate(net("10.244.7.0/24"), GW, "c", "eth0", "v"))
            .unwrap()
            .unwrap();
        assert_eq!(got, ip("10.244.7.2"));
        let s = store.read().unwrap();
        assert_eq!(s.find("c", "eth0").map(|a| a.ip), Some(got));
        let names: BTreeSet<_> = std::fs::read_dir(dir.path().join("netd"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["lock".to_string(), "state.json".to_string()].into());
    }

    #[test]
    fn store_is_safe_across_threads() {
        // flock locks are per open file description, so threads contend like
        // processes do.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), "n");
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || {
                    store
                        .update(|s| {
                            s.allocate(net("10.244.7.0/24"), GW, &format!("c{i}"), "eth0", "v")
                        })
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
        let store = Store::new(dir.path(), "n");
        std::fs::create_dir_all(dir.path().join("n")).unwrap();
        std::fs::write(store.state_path(), "{garbage").unwrap();
        let e = store.read().unwrap_err();
        assert_eq!(e.code(), 5);
        assert!(e.to_string().contains("state.json"), "{e}");
    }
}
