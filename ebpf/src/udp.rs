//! The udp overlay fast path: flannel's `udp` wire format encapsulated and decapsulated by
//! tc programs (`bpf/udp_overlay.c`) instead of by the userspace datapath (`netd-udp`).
//!
//! ```text
//!  pod ─► route 10.244.0.0/16 dev netd-udp0 ─► tc egress (netd_udp_encap):
//!         peer subnet? outer IPv4+UDP, bpf_redirect_neigh ─► underlay ─► peer
//!         otherwise ─► TUN queue ─► userspace datapath (drops and counts "no route")
//!  peer ─► underlay tc ingress (netd_udp_decap):
//!         to us, our port, a known peer, one inner packet? strip, received on netd-udp0
//!         otherwise ─► UDP socket ─► userspace datapath (its source check; bulk: UDP GRO
//!         batches, TCP super-packets, and for 100 ms the rest of their flows)
//! ```
//!
//! The userspace datapath keeps running beside it, for what the programs leave to it, and
//! as the whole datapath on kernels without TCX (Linux < 6.6). The programs never copy a
//! packet to user space and wake no thread: a round trip costs what the kernel's VXLAN costs.
//!
//! Restart: maps and links are pinned under the bpffs directory, so packets keep flowing
//! through the programs while netd is away; a new netd swaps its programs into the pinned
//! links (atomically) and rewrites the maps.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::SchedClassifier;
use aya::{Ebpf, EbpfLoader};
use tracing::info;

use crate::backend::{attach_tc, err, prepare_bpffs, unpin};
use crate::maps::*;
use crate::{EbpfError, UDP_OVERLAY_OBJ};

/// The tc programs of `bpf/udp_overlay.c`.
pub const UDP_PROGRAMS: [&str; 2] = ["netd_udp_encap", "netd_udp_decap"];
const UDP_MAPS: [&str; 5] = [MAP_UDP_CFG, MAP_UDP_PEERS, MAP_UDP_SRCS, MAP_UDP_STATS, MAP_UDP_BULK];
/// Pinned links of this fast path start with this (`links/udp-encap-<tun>`,
/// `links/udp-decap-<underlay>`); the service dataplane's are `tc-*`.
const LINK_PREFIX: &str = "udp-";

/// Where and for what the fast path runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpOverlayConfig {
    /// Pin directory (`--ebpf-bpffs`, shared with the eBPF service dataplane: the names differ).
    pub bpffs_dir: PathBuf,
    /// Mount a bpffs on the pin directory's parent when it is not one already.
    pub mount_bpffs: bool,
    /// The udp backend's TUN device (`netd-udp0`): encapsulation on its tc egress.
    pub tun_device: String,
    /// The underlay device: decapsulation on its tc ingress, encapsulated packets leave by it.
    pub underlay_device: String,
    /// This node's public IP: the outer source, and where inbound datagrams must be sent to.
    pub local_ip: Ipv4Addr,
    /// The overlay UDP port (flannel's `Port`, 8285 by default).
    pub port: u16,
}

/// One peer for [`UdpOverlay::set_peers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpPeerEntry {
    /// The peer's pod subnet.
    pub net: Ipv4Addr,
    pub prefix_len: u8,
    /// The peer's public IP.
    pub ip: Ipv4Addr,
    /// The peer takes a TCP super-packet in one datagram (its lease says so: every netd
    /// does): packets to it are encapsulated here, GSO ones whole; to other peers (flanneld)
    /// everything goes through the userspace datapath, which sends proper datagrams.
    pub super_packets: bool,
}

/// The programs' counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpOverlayStats {
    /// Packets encapsulated in the kernel (a GSO super-packet counts once).
    pub encap_packets: u64,
    /// Their inner bytes.
    pub encap_bytes: u64,
    pub decap_packets: u64,
    pub decap_bytes: u64,
    /// Packets the encapsulation left to the userspace datapath (no peer for the destination).
    pub encap_passed: u64,
    /// Overlay datagrams the decapsulation left to the userspace datapath (unknown source,
    /// a UDP GRO batch, a fragment, IP options).
    pub decap_passed: u64,
    /// Packets dropped half-way through the encapsulation (out of memory).
    pub encap_errors: u64,
    /// Of `decap_passed`: bulk (UDP GRO batches, super-packets, and the single datagrams of
    /// flows seen in bulk in the last 100 ms) left to the userspace datapath on purpose.
    pub decap_bulk: u64,
}

/// The loaded and attached fast path. Dropping it leaves the pinned programs running (a
/// restart must not interrupt traffic); [`UdpOverlay::remove`] detaches them.
pub struct UdpOverlay {
    cfg: UdpOverlayConfig,
    peers: LpmTrie<MapData, u32, UdpPeer>,
    srcs: BpfHashMap<MapData, u32, u8>,
    stats: PerCpuArray<MapData, u64>,
    /// Keeps the loaded programs (and with them the non-pinned state) alive.
    _obj: Ebpf,
}

fn ifindex(dev: &str) -> Result<u32, EbpfError> {
    let c = std::ffi::CString::new(dev).map_err(|e| err(&format!("device name {dev:?}"), e))?;
    // SAFETY: a valid NUL-terminated string; if_nametoindex only reads it.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(err(&format!("looking up device {dev}"), std::io::Error::last_os_error()));
    }
    Ok(i)
}

fn link_pins(cfg: &UdpOverlayConfig) -> [(String, &str, bool); 2] {
    // bpffs refuses names with a dot.
    [
        (format!("{LINK_PREFIX}encap-{}", cfg.tun_device.replace('.', "_")), cfg.tun_device.as_str(), false),
        (format!("{LINK_PREFIX}decap-{}", cfg.underlay_device.replace('.', "_")), cfg.underlay_device.as_str(), true),
    ]
}

impl UdpOverlay {
    /// Loads the programs, writes the configuration, and attaches them (TCX, Linux >= 6.6) to
    /// the TUN device's egress and the underlay's ingress, or swaps them into the links a
    /// previous netd pinned. Peers already in the pinned maps stay until [`Self::set_peers`].
    pub fn start(cfg: UdpOverlayConfig) -> Result<Self, EbpfError> {
        if !crate::has_tcx() {
            return Err(EbpfError::Unsupported("the udp overlay fast path needs TCX links (Linux >= 6.6)".into()));
        }
        prepare_bpffs(&cfg.bpffs_dir, cfg.mount_bpffs)?;
        let want = UdpCfg {
            local_ip: ip_be(cfg.local_ip),
            port: cfg.port.to_be(),
            enabled: 1,
            underlay_ifindex: ifindex(&cfg.underlay_device)?,
            tun_ifindex: ifindex(&cfg.tun_device)?,
        };
        let mut obj = EbpfLoader::new()
            .default_map_pin_directory(&cfg.bpffs_dir)
            .load(UDP_OVERLAY_OBJ)
            .map_err(|e| err("loading the udp overlay object", e))?;
        let mut conf: Array<MapData, UdpCfg> = Array::try_from(obj.take_map(MAP_UDP_CFG).ok_or_else(|| EbpfError::Kernel(format!("{MAP_UDP_CFG}: missing")))?).map_err(|e| err(MAP_UDP_CFG, e))?;
        // Before the programs run: a restarted netd's may already read it (ifindexes change
        // when a device is recreated).
        conf.set(0, want, 0).map_err(|e| err(&format!("writing {MAP_UDP_CFG}"), e))?;
        for name in UDP_PROGRAMS {
            let prog: &mut SchedClassifier = obj.program_mut(name).ok_or_else(|| EbpfError::Kernel(format!("{name}: missing from the object")))?.try_into().map_err(|e| err(name, e))?;
            prog.load().map_err(|e| err(&format!("loading {name} (verifier)"), e))?;
        }
        let links = cfg.bpffs_dir.join("links");
        let pins = link_pins(&cfg);
        for ((pin, dev, ingress), name) in pins.iter().zip(UDP_PROGRAMS) {
            let prog: &mut SchedClassifier = obj.program_mut(name).expect("loaded above").try_into().map_err(|e| err(name, e))?;
            attach_tc(prog, name, dev, *ingress, &links.join(pin))?;
        }
        // Links of devices no longer used (the underlay changed): unpinning detaches them.
        if let Ok(rd) = std::fs::read_dir(&links) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(LINK_PREFIX) && !pins.iter().any(|(p, _, _)| *p == name) {
                    info!(link = %name, "detaching the udp overlay program of a device no longer used");
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let take = |obj: &mut Ebpf, name: &str| obj.take_map(name).ok_or_else(|| EbpfError::Kernel(format!("{name}: missing")));
        let peers = LpmTrie::try_from(take(&mut obj, MAP_UDP_PEERS)?).map_err(|e| err(MAP_UDP_PEERS, e))?;
        let srcs = BpfHashMap::try_from(take(&mut obj, MAP_UDP_SRCS)?).map_err(|e| err(MAP_UDP_SRCS, e))?;
        let stats = PerCpuArray::try_from(take(&mut obj, MAP_UDP_STATS)?).map_err(|e| err(MAP_UDP_STATS, e))?;
        info!(tun = %cfg.tun_device, underlay = %cfg.underlay_device, port = cfg.port, "udp overlay fast path (tc) attached");
        Ok(UdpOverlay { cfg, peers, srcs, stats, _obj: obj })
    }

    /// Makes the maps say exactly `peers`: subnets to encapsulate for, and the sources to
    /// accept. Our own public IP and unspecified ones are skipped (as the userspace peer table
    /// does); of two entries for one subnet the first wins. Returns how many map entries were
    /// written or deleted.
    pub fn set_peers(&mut self, peers: &[UdpPeerEntry]) -> Result<usize, EbpfError> {
        let mut want: BTreeMap<(u32, u8), UdpPeer> = BTreeMap::new();
        for p in peers {
            let len = p.prefix_len;
            if p.ip == self.cfg.local_ip || p.ip.is_unspecified() || len > 32 {
                continue;
            }
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
            let net = Ipv4Addr::from(u32::from(p.net) & mask);
            let flags = if p.super_packets { UDP_PEER_F_SUPER } else { 0 };
            want.entry((ip_be(net), len)).or_insert(UdpPeer { ip: ip_be(p.ip), flags });
        }
        let want_srcs: BTreeSet<u32> = want.values().map(|p| p.ip).collect();
        let have: BTreeMap<(u32, u8), UdpPeer> = self
            .peers
            .iter()
            .map(|r| r.map(|(k, v)| ((k.data(), k.prefix_len() as u8), v)))
            .collect::<Result<_, _>>()
            .map_err(|e| err(&format!("reading {MAP_UDP_PEERS}"), e))?;
        let have_srcs: BTreeSet<u32> = self.srcs.keys().collect::<Result<_, _>>().map_err(|e| err(&format!("reading {MAP_UDP_SRCS}"), e))?;
        let mut ops = 0;
        // Sources first and stale ones last: a datagram of a new peer is never refused for a
        // moment in between.
        for s in want_srcs.difference(&have_srcs) {
            self.srcs.insert(s, 1u8, 0).map_err(|e| err(&format!("adding source {} to {MAP_UDP_SRCS}", ip_from_be(*s)), e))?;
            ops += 1;
        }
        for (&(net, len), &peer) in &want {
            if have.get(&(net, len)) != Some(&peer) {
                self.peers
                    .insert(&Key::new(u32::from(len), net), peer, 0)
                    .map_err(|e| err(&format!("adding peer {}/{len} via {} to {MAP_UDP_PEERS}", ip_from_be(net), ip_from_be(peer.ip)), e))?;
                ops += 1;
            }
        }
        for &(net, len) in have.keys().filter(|k| !want.contains_key(k)) {
            self.peers.remove(&Key::new(u32::from(len), net)).map_err(|e| err(&format!("removing peer {}/{len} from {MAP_UDP_PEERS}", ip_from_be(net)), e))?;
            ops += 1;
        }
        for s in have_srcs.difference(&want_srcs) {
            self.srcs.remove(s).map_err(|e| err(&format!("removing source {} from {MAP_UDP_SRCS}", ip_from_be(*s)), e))?;
            ops += 1;
        }
        Ok(ops)
    }

    /// The programs' counters, summed over CPUs (they count since the maps were created, so
    /// across netd restarts).
    pub fn stats(&self) -> Result<UdpOverlayStats, EbpfError> {
        let get = |i: u32| -> Result<u64, EbpfError> {
            let v = self.stats.get(&i, 0).map_err(|e| err(&format!("reading {MAP_UDP_STATS}[{i}]"), e))?;
            Ok(v.iter().copied().fold(0u64, u64::wrapping_add))
        };
        Ok(UdpOverlayStats {
            encap_packets: get(UDP_ENCAP_PACKETS)?,
            encap_bytes: get(UDP_ENCAP_BYTES)?,
            decap_packets: get(UDP_DECAP_PACKETS)?,
            decap_bytes: get(UDP_DECAP_BYTES)?,
            encap_passed: get(UDP_ENCAP_PASSED)?,
            decap_passed: get(UDP_DECAP_PASSED)?,
            encap_errors: get(UDP_ENCAP_ERRORS)?,
            decap_bulk: get(UDP_DECAP_BULK)?,
        })
    }

    /// Detaches the fast path (unpins its links) and removes its pinned maps, also those an
    /// earlier netd left; the userspace datapath then carries everything. Nothing pinned:
    /// nothing to do.
    pub fn remove(bpffs_dir: &Path) -> Result<(), EbpfError> {
        let links = bpffs_dir.join("links");
        if let Ok(rd) = std::fs::read_dir(&links) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(LINK_PREFIX) {
                    std::fs::remove_file(e.path()).map_err(|x| err(&format!("unpinning {}", e.path().display()), x))?;
                }
            }
        }
        for m in UDP_MAPS {
            unpin(&bpffs_dir.join(m), &format!("unpinning map {m}"))?;
        }
        // Empty now unless the service dataplane uses it too.
        let _ = std::fs::remove_dir(&links);
        let _ = std::fs::remove_dir(bpffs_dir);
        Ok(())
    }

    /// Whether a fast path is pinned under `bpffs_dir` (left by this or an earlier netd).
    pub fn is_pinned(bpffs_dir: &Path) -> bool {
        bpffs_dir.join(MAP_UDP_CFG).exists()
    }
}
