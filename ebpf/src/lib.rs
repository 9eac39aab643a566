//! netd's eBPF service dataplane (`--proxy-mode ebpf`).
//!
//! ```text
//! Plan ──render (pure)──► MapState ──diff──► ordered map ops ──► pinned maps (/sys/fs/bpf/netd)
//!                                                                  │
//!        cgroup sock_addr programs (bpf/sock.c) on --ebpf-cgroup ◄─┤
//!        connect4/sendmsg4: VIP:port → backend (socket-level LB, no per-packet NAT)
//!        recvmsg4/getpeername4: backend → VIP:port                  │
//!                                                                   │
//!        tc programs (bpf/nodeport.c, TCX links) ◄──────────────────┘
//!        external device ingress: NodePort / externalIP / LB IP, and ClusterIPs routed to this
//!          node from outside → DNAT (+ SNAT to the node's overlay address when the backend is
//!          on another node, redirected with bpf_redirect_neigh); connections in the LRU map
//!          netd_ct; a frontend without endpoints answered with ICMP port unreachable
//!        overlay device ingress: replies of SNATed connections → reverse NAT, redirected
//!        external device egress: replies of local backends → source back to the frontend
//! ```
//!
//! One endpoint change: the planner says which services changed since the plan applied
//! last (`Plan::changes_since`); only their map entries are rendered, diffed and written.
//!
//! The BPF programs are C (`bpf/*.c`), compiled by `build.rs` with clang and embedded here;
//! map layouts are defined once in `bpf/maps.h` and mirrored in [`maps`] (a test compares them).

pub mod backend;
pub mod maps;
pub mod render;
mod sys;
pub mod udp;

use std::path::PathBuf;

pub use backend::EbpfBackend;
pub use render::{render, MapState};
pub use udp::{UdpOverlay, UdpOverlayConfig, UdpOverlayStats, UdpPeerEntry};

/// The socket LB object (`bpf/sock.c`).
pub static SOCK_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock.o"));
/// The tc NodePort/externalIP object (`bpf/nodeport.c`).
pub static NODEPORT_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodeport.o"));

/// The udp overlay fast path object (`bpf/udp_overlay.c`), see [`udp`].
pub static UDP_OVERLAY_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/udp_overlay.o"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The kernel or the host lacks something the eBPF dataplane needs.
    #[error("eBPF dataplane unsupported here: {0}")]
    Unsupported(String),
    #[error("eBPF: {0}")]
    Kernel(String),
}

/// `--ebpf-*` settings.
#[derive(Debug, Clone)]
pub struct EbpfConfig {
    /// Where maps and links are pinned (`--ebpf-bpffs`, default `/sys/fs/bpf/netd`).
    pub bpffs_dir: PathBuf,
    /// Mount a bpffs on the pin directory's parent when it is not one already.
    pub mount_bpffs: bool,
    /// The cgroup v2 directory the socket LB is attached to (`--ebpf-cgroup`, default the
    /// cgroup v2 root). Everything in that cgroup's subtree is load-balanced. `None`:
    /// maps only, nothing attached.
    pub cgroup: Option<PathBuf>,
    /// Devices traffic from outside the node arrives on (the underlay): NodePort, externalIP
    /// and LB IP translation on their tc ingress, local backends' replies on their egress.
    pub external_devices: Vec<String>,
    /// The overlay device, where replies of connections SNATed to remote backends come back
    /// (tc ingress).
    pub overlay_device: Option<String>,
}

impl Default for EbpfConfig {
    fn default() -> Self {
        EbpfConfig {
            bpffs_dir: "/sys/fs/bpf/netd".into(),
            mount_bpffs: true,
            cgroup: Some(default_cgroup()),
            external_devices: Vec::new(),
            overlay_device: None,
        }
    }
}

/// The cgroup v2 root: `/sys/fs/cgroup` on unified hosts, the cgroup2 mount on hybrid ones.
pub fn default_cgroup() -> PathBuf {
    sys::cgroup2_mount().unwrap_or_else(|| "/sys/fs/cgroup".into())
}

/// The `--proxy-mode ebpf` backend.
pub fn ebpf_backend(cfg: EbpfConfig) -> Result<Box<dyn netd_proxy::Backend>, EbpfError> {
    Ok(Box::new(EbpfBackend::new(cfg)?))
}

/// Whether this kernel/host can run the eBPF dataplane: a cgroup v2 hierarchy, and the
/// programs pass the verifier (loads them, attaches nothing, pins nothing).
/// `Err` is a human-readable reason, for a skip message or a start-up error.
pub fn probe() -> Result<(), String> {
    if sys::cgroup2_mount().is_none() {
        return Err("no cgroup v2 hierarchy mounted (the socket load balancer needs cgroup v2)".into());
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err("kernel without BTF (/sys/kernel/btf/vmlinux)".into());
    }
    with_probe_bpffs("sock", probe_load)
}

/// Whether this kernel can run the tc NodePort programs: TCX links (Linux >= 6.6) and the
/// programs pass the verifier. Same throwaway bpffs as [`probe`].
pub fn probe_tc() -> Result<(), String> {
    if !has_tcx() {
        return Err("the tc NodePort programs need TCX links (Linux >= 6.6)".into());
    }
    with_probe_bpffs("tc", probe_load_tc)
}

/// Whether this kernel has TCX links (Linux >= 6.6), which every tc program here is attached
/// with.
pub fn has_tcx() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}

/// Runs `f` with a private, throwaway bpffs instance (maps are pinned by name: a probe must not
/// meet the live ones).
pub(crate) fn with_probe_bpffs(what: &str, f: impl FnOnce(&std::path::Path) -> Result<(), String>) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("netd-ebpf-probe-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let r = sys::mount_bpffs(&dir)
        .map_err(|e| format!("cannot mount a bpf filesystem (needs CAP_SYS_ADMIN): {e}"))
        .and_then(|()| {
            let r = f(&dir);
            sys::umount(&dir);
            r
        });
    let _ = std::fs::remove_dir(&dir);
    r
}

fn probe_load_tc(pin_dir: &std::path::Path) -> Result<(), String> {
    let mut bpf = aya::EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(NODEPORT_OBJ)
        .map_err(|e| format!("cannot load the tc object: {e}"))?;
    for name in backend::TC_PROGRAMS {
        let prog: &mut aya::programs::SchedClassifier = bpf
            .program_mut(name)
            .ok_or_else(|| format!("{name} missing"))?
            .try_into()
            .map_err(|e| format!("{name}: {e}"))?;
        prog.load().map_err(|e| format!("kernel rejects {name} (needs bpf_redirect_neigh, BPF_FIB_LOOKUP_SKIP_NEIGH: Linux >= 6.5): {}", netd_common::report::error_chain(&e)))?;
    }
    Ok(())
}

fn probe_load(pin_dir: &std::path::Path) -> Result<(), String> {
    let mut bpf = aya::EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(SOCK_OBJ)
        .map_err(|e| format!("cannot load the BPF object (kernel too old or no CAP_BPF?): {e}"))?;
    for name in backend::SOCK_PROGRAMS {
        let prog: &mut aya::programs::CgroupSockAddr = bpf
            .program_mut(name)
            .ok_or_else(|| format!("{name} missing"))?
            .try_into()
            .map_err(|e| format!("{name}: {e}"))?;
        prog.load().map_err(|e| format!("kernel rejects {name} (needs cgroup sock_addr hooks, bpf_set_retval: Linux >= 5.18): {e}"))?;
    }
    Ok(())
}
