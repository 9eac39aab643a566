//! [`EbpfBackend`]: loads the embedded programs, pins maps and links under the bpffs
//! directory, attaches the socket LB to the cgroup, and keeps the maps equal to the Plan.
//!
//! Restart/upgrade: maps are pinned by name and reused as they are (traffic keeps flowing
//! from the old contents until the first sync, which adopts them: it reads the maps and
//! writes only the difference). Links are pinned too; a new netd swaps its programs into
//! the existing links with BPF_LINK_UPDATE, which is atomic.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapError};
use aya::programs::links::{FdLink, LinkOrder};
use aya::programs::tc::TcAttachOptions;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use netd_proxy::dataplane::{ApplyReport, DataplaneError};
use netd_proxy::{Backend, Plan};
use tracing::{debug, info};

use crate::maps::*;
use crate::render::{diff, render, Frontend, MapState, Op};
use crate::{sys, EbpfConfig, EbpfError, NODEPORT_OBJ, SOCK_OBJ};

/// The cgroup sock_addr programs (function names in `bpf/sock.c`).
pub const SOCK_PROGRAMS: [&str; 4] = ["netd_connect4", "netd_sendmsg4", "netd_recvmsg4", "netd_getpeername4"];

/// The tc programs (`bpf/nodeport.c`): ingress and egress, for devices with and without an
/// Ethernet header.
pub const TC_PROGRAMS: [&str; 4] = ["netd_from_outside_l2", "netd_from_outside_l3", "netd_to_outside_l2", "netd_to_outside_l3"];

/// Every map, as pinned.
const MAPS: [&str; 6] = [MAP_SVC, MAP_SLOTS, MAP_AFFINITY, MAP_REVNAT, MAP_CT, MAP_CFG];

pub struct EbpfBackend {
    cfg: EbpfConfig,
    svc: BpfHashMap<MapData, SvcKey, SvcValue>,
    slots: BpfHashMap<MapData, SlotKey, BackendValue>,
    node_cfg: Array<MapData, CfgValue>,
    last: Option<MapState>,
    /// Keep the programs (and with them the non-pinned state) alive.
    _bpf: Ebpf,
    _tc: Ebpf,
}

pub(crate) fn err(what: &str, e: impl std::error::Error) -> EbpfError {
    // aya's errors keep the errno in `source` ("`bpf_map_update_elem` failed" / "Operation not
    // permitted"): print the chain.
    EbpfError::Kernel(format!("{what}: {}", netd_common::report::error_chain(&e)))
}

/// Makes sure `dir` is inside a bpffs, mounting one on its parent if allowed.
pub(crate) fn prepare_bpffs(dir: &Path, mount: bool) -> Result<(), EbpfError> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if sys::fs_magic(parent).map_err(|e| err(&format!("statfs {}", parent.display()), e))? != sys::BPF_FS_MAGIC {
        if !mount {
            return Err(EbpfError::Unsupported(format!("{} is not a bpf filesystem (mount -t bpf bpf {})", parent.display(), parent.display())));
        }
        sys::mount_bpffs(parent).map_err(|e| err(&format!("mount bpffs on {}", parent.display()), e))?;
        info!(dir = %parent.display(), "mounted bpffs");
    }
    std::fs::create_dir_all(dir.join("links")).map_err(|e| err(&format!("mkdir {}", dir.display()), e))?;
    Ok(())
}

impl EbpfBackend {
    pub fn new(cfg: EbpfConfig) -> Result<Self, EbpfError> {
        prepare_bpffs(&cfg.bpffs_dir, cfg.mount_bpffs)?;
        let mut bpf = EbpfLoader::new()
            .default_map_pin_directory(&cfg.bpffs_dir)
            .load(SOCK_OBJ)
            .map_err(|e| err("loading the socket LB object", e))?;
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = bpf
                .program_mut(name)
                .ok_or_else(|| EbpfError::Kernel(format!("{name}: missing from the object")))?
                .try_into()
                .map_err(|e| err(name, e))?;
            prog.load().map_err(|e| err(&format!("loading {name} (verifier)"), e))?;
            if let Some(cgroup) = &cfg.cgroup {
                attach_or_replace(prog, name, cgroup, &cfg.bpffs_dir.join("links"))?;
            }
        }
        // The tc object meets the socket LB's maps through their pins (same directory).
        let mut tc = EbpfLoader::new()
            .default_map_pin_directory(&cfg.bpffs_dir)
            .load(NODEPORT_OBJ)
            .map_err(|e| err("loading the NodePort (tc) object", e))?;
        let links = cfg.bpffs_dir.join("links");
        let mut wanted_tc_pins = Vec::new();
        if !cfg.external_devices.is_empty() || cfg.overlay_device.is_some() {
            for name in TC_PROGRAMS {
                let prog: &mut SchedClassifier = tc
                    .program_mut(name)
                    .ok_or_else(|| EbpfError::Kernel(format!("{name}: missing from the object")))?
                    .try_into()
                    .map_err(|e| err(name, e))?;
                prog.load().map_err(|e| err(&format!("loading {name} (verifier)"), e))?;
            }
            let mut attach = |dev: &str, ingress: bool| -> Result<(), EbpfError> {
                let l2 = sys::has_ethernet_header(dev);
                let name = match (ingress, l2) {
                    (true, true) => TC_PROGRAMS[0],
                    (true, false) => TC_PROGRAMS[1],
                    (false, true) => TC_PROGRAMS[2],
                    (false, false) => TC_PROGRAMS[3],
                };
                let pin = tc_pin_name(dev, ingress);
                let prog: &mut SchedClassifier = tc.program_mut(name).expect("loaded above").try_into().map_err(|e| err(name, e))?;
                attach_tc(prog, name, dev, ingress, &links.join(&pin))?;
                wanted_tc_pins.push(pin);
                Ok(())
            };
            for dev in &cfg.external_devices {
                attach(dev, true)?;
                attach(dev, false)?;
            }
            if let Some(dev) = &cfg.overlay_device {
                attach(dev, true)?;
            }
        }
        // Links of devices no longer configured: unpinning detaches them.
        if let Ok(rd) = std::fs::read_dir(&links) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("tc-") && !wanted_tc_pins.contains(&name) {
                    info!(link = %name, "detaching the tc program of a device no longer configured");
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let svc = BpfHashMap::try_from(bpf.take_map(MAP_SVC).ok_or_else(|| EbpfError::Kernel(format!("{MAP_SVC}: missing")))?).map_err(|e| err(MAP_SVC, e))?;
        let slots = BpfHashMap::try_from(bpf.take_map(MAP_SLOTS).ok_or_else(|| EbpfError::Kernel(format!("{MAP_SLOTS}: missing")))?).map_err(|e| err(MAP_SLOTS, e))?;
        let node_cfg = Array::try_from(tc.take_map(MAP_CFG).ok_or_else(|| EbpfError::Kernel(format!("{MAP_CFG}: missing")))?).map_err(|e| err(MAP_CFG, e))?;
        let cgroup = cfg.cgroup.as_ref().map(|c| c.display().to_string());
        info!(bpffs = %cfg.bpffs_dir.display(), cgroup, external = %cfg.external_devices.join(","), overlay = cfg.overlay_device.as_deref(), "eBPF service dataplane loaded");
        Ok(EbpfBackend { cfg, svc, slots, node_cfg, last: None, _bpf: bpf, _tc: tc })
    }

    /// Reads `netd_svc` and `netd_slots` back.
    pub fn observe(&self) -> Result<MapState, EbpfError> {
        let mut by_id: HashMap<u32, BTreeMap<u32, BackendValue>> = HashMap::new();
        for r in self.slots.iter() {
            let (k, v) = r.map_err(|e| err("reading netd_slots", e))?;
            by_id.entry(k.id).or_default().insert(k.slot, v);
        }
        let mut frontends = BTreeMap::new();
        for r in self.svc.iter() {
            let (k, v) = r.map_err(|e| err("reading netd_svc", e))?;
            let mut backends = Vec::new();
            if let Some(slots) = by_id.get_mut(&v.id) {
                for slot in 1..=v.count {
                    match slots.remove(&slot) {
                        Some(b) => backends.push(b),
                        None => break,
                    }
                }
            }
            frontends.insert(k, std::sync::Arc::new(Frontend { value: v, backends }));
        }
        let mut orphans = Vec::new();
        for (id, slots) in by_id {
            // Slots past a frontend's count or of an id no frontend uses; only the ones that
            // are not rewritten anyway (slot > count of a live frontend is deleted by diff).
            for slot in slots.keys() {
                orphans.push(SlotKey { id, slot: *slot });
            }
        }
        orphans.sort();
        let cfg = self.node_cfg.get(&0, 0).map_err(|e| err("reading netd_cfg", e))?;
        Ok(MapState { frontends, orphans, cfg, ..Default::default() })
    }

    fn apply_ops(&mut self, ops: &[Op]) -> Result<(), EbpfError> {
        let gone = |e: &MapError| matches!(e, MapError::KeyNotFound) || matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT));
        for op in ops {
            let r = match op {
                Op::PutCfg(v) => self.node_cfg.set(0, v, 0),
                Op::PutSlot(k, v) => self.slots.insert(k, v, 0),
                Op::PutSvc(k, v) => self.svc.insert(k, v, 0),
                Op::DelSvc(k) => self.svc.remove(k),
                Op::DelSlot(k) => self.slots.remove(k),
            };
            match r {
                Ok(()) => {}
                Err(e) if matches!(op, Op::DelSvc(_) | Op::DelSlot(_)) && gone(&e) => {}
                Err(e) => return Err(err(&op.to_string(), e)),
            }
        }
        Ok(())
    }

    /// Plan → maps: render, diff against the last state (or the kernel's), apply.
    ///
    /// When the plan says it is the last applied plan with a few services changed
    /// (`Plan::changes_since`), only those services are re-rendered and diffed, in place: the
    /// cost of one endpoint change does not grow with the number of services.
    pub fn sync_plan(&mut self, plan: &Plan, observe: bool) -> Result<ApplyReport, EbpfError> {
        if !observe {
            if let Some(last) = self.last.as_mut().filter(|l| l.node.as_ref() == Some(&plan.node)) {
                if let Some(changed) = plan.changes_since(last.generation) {
                    let ops = crate::render::update(last, plan, changed);
                    debug!(ops = ops.len(), services = changed.len(), "eBPF maps updated in place");
                    if let Err(e) = self.apply_ops(&ops) {
                        self.last = None; // the next sync observes
                        return Err(e);
                    }
                    return Ok(ApplyReport { changed: !ops.is_empty(), size: ops.len(), observed: false });
                }
            }
        }
        let observed = observe || self.last.is_none();
        let base = match self.last.take() {
            Some(last) if !observed => last,
            _ => self.observe()?,
        };
        let new = render(plan, Some(&base));
        let ops = diff(&base, &new);
        debug!(ops = ops.len(), frontends = new.frontends.len(), "eBPF maps diff");
        self.apply_ops(&ops)?; // on error `last` stays None: the next sync observes
        self.last = Some(new);
        Ok(ApplyReport { changed: !ops.is_empty(), size: ops.len(), observed })
    }

    /// The state applied last.
    pub fn last(&self) -> Option<&MapState> {
        self.last.as_ref()
    }

    /// Detaches the programs (unpins the links) and removes the pinned maps and directory.
    pub fn remove_all(&mut self) -> Result<(), EbpfError> {
        self.last = None;
        Self::remove_pins(&self.cfg.bpffs_dir).map(|_| ())
    }

    /// What [`Self::remove_all`] does, without a running backend (`netd cleanup`): unpins the
    /// service dataplane's links (which detaches its programs) and maps under `dir`, and removes
    /// the directory when nothing else is left in it. Returns whether anything was pinned.
    pub fn remove_pins(dir: &Path) -> Result<bool, EbpfError> {
        let links = dir.join("links");
        let mut pins: Vec<String> = SOCK_PROGRAMS.iter().map(|s| s.to_string()).collect();
        if let Ok(rd) = std::fs::read_dir(&links) {
            pins.extend(rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("tc-")));
        }
        let mut any = false;
        for name in pins {
            any |= unpin(&links.join(&name), &format!("unpinning link {name}"))?;
        }
        for m in MAPS {
            any |= unpin(&dir.join(m), &format!("unpinning map {m}"))?;
        }
        let _ = std::fs::remove_dir(&links);
        let _ = std::fs::remove_dir(dir);
        Ok(any)
    }

    pub fn bpffs_dir(&self) -> &Path {
        &self.cfg.bpffs_dir
    }
}

/// Removes the pin at `path`; `Ok(false)` when there was none.
pub(crate) fn unpin(path: &Path, what: &str) -> Result<bool, EbpfError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(err(what, e)),
    }
}

/// Attaches `prog` to `cgroup` through a link pinned at `links/<name>`, or, when that pin
/// exists (netd restarted), swaps `prog` into the existing link atomically.
fn attach_or_replace(prog: &mut CgroupSockAddr, name: &str, cgroup: &Path, links: &Path) -> Result<(), EbpfError> {
    let pin: PathBuf = links.join(name);
    if pin.exists() {
        let link = sys::obj_get(&pin).map_err(|e| err(&format!("opening pinned link {}", pin.display()), e))?;
        let fd = prog.fd().map_err(|e| err(name, e))?;
        sys::link_update(link.as_fd(), fd.as_fd()).map_err(|e| err(&format!("replacing the program of link {}", pin.display()), e))?;
        debug!(link = %pin.display(), "replaced program in pinned link");
        return Ok(());
    }
    let cg = File::open(cgroup).map_err(|e| err(&format!("opening cgroup {}", cgroup.display()), e))?;
    let id = prog.attach(&cg, CgroupAttachMode::Single /* links: flags must be 0, multi-attach implied */).map_err(|e| err(&format!("attaching {name} to {}", cgroup.display()), e))?;
    let link = prog.take_link(id).map_err(|e| err(name, e))?;
    let link: FdLink = link.try_into().map_err(|e| err(&format!("{name}: not a bpf_link"), e))?;
    link.pin(&pin).map_err(|e| err(&format!("pinning link {}", pin.display()), e))?;
    Ok(())
}

/// bpffs refuses names with a dot (`netd.1`): those become `_`.
fn tc_pin_name(dev: &str, ingress: bool) -> String {
    format!("tc-{}-{}", if ingress { "ingress" } else { "egress" }, dev.replace('.', "_"))
}

/// Attaches `prog` to `dev` (TCX, kernel >= 6.6) through a link pinned at `pin`, or swaps it
/// into the pinned link atomically when netd restarted. A pinned link whose device went away
/// (and came back: a recreated VXLAN device) is defunct; it is replaced by a new one.
pub(crate) fn attach_tc(prog: &mut SchedClassifier, name: &str, dev: &str, ingress: bool, pin: &Path) -> Result<(), EbpfError> {
    if pin.exists() {
        let link = sys::obj_get(pin).map_err(|e| err(&format!("opening pinned link {}", pin.display()), e))?;
        let fd = prog.fd().map_err(|e| err(name, e))?;
        match sys::link_update(link.as_fd(), fd.as_fd()) {
            Ok(()) => {
                debug!(link = %pin.display(), "replaced program in pinned tc link");
                return Ok(());
            }
            Err(e) => {
                info!(link = %pin.display(), error = %e, "pinned tc link unusable (device recreated?); attaching anew");
                std::fs::remove_file(pin).map_err(|e| err(&format!("unpinning {}", pin.display()), e))?;
            }
        }
    }
    let at = if ingress { TcAttachType::Ingress } else { TcAttachType::Egress };
    let id = prog
        .attach_with_options(dev, at, TcAttachOptions::TcxOrder(LinkOrder::default()))
        .map_err(|e| err(&format!("attaching {name} to {dev} {at:?} (TCX needs Linux >= 6.6)"), e))?;
    let link = prog.take_link(id).map_err(|e| err(name, e))?;
    let link: FdLink = link.try_into().map_err(|e| err(&format!("{name}: not a bpf_link"), e))?;
    link.pin(pin).map_err(|e| err(&format!("pinning link {}", pin.display()), e))?;
    Ok(())
}

fn dataplane_error(e: EbpfError) -> DataplaneError {
    DataplaneError::Ebpf(Box::new(e))
}

impl Backend for EbpfBackend {
    fn name(&self) -> &'static str {
        "ebpf"
    }
    fn sync(&mut self, plan: &Plan, observe: bool) -> Result<ApplyReport, DataplaneError> {
        self.sync_plan(plan, observe).map_err(dataplane_error)
    }
    fn remove(&mut self) -> Result<(), DataplaneError> {
        self.remove_all().map_err(dataplane_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_errors_name_the_call_and_the_errno_once() {
        let io_error = std::io::Error::from_raw_os_error(libc::EPERM);
        let e = MapError::SyscallError(aya::sys::SyscallError { call: "bpf_map_update_elem", io_error });
        assert_eq!(
            err("writing netd_svc entry 10.96.0.10:53/udp", e).to_string(),
            "eBPF: writing netd_svc entry 10.96.0.10:53/udp: `bpf_map_update_elem` failed: Operation not permitted (os error 1)"
        );
    }
}
