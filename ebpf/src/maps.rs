//! Map keys and values: the Rust side of `bpf/maps.h` and `bpf/udp_overlay.h` (the one definition; `tests` in this
//! module compile the header with the host C compiler and compare every size and offset).
//!
//! Addresses and ports are in network byte order, as the BPF programs see them.

use std::net::Ipv4Addr;

pub const SCOPE_INTERNAL: u8 = 0;
pub const SCOPE_EXTERNAL: u8 = 1;

pub const SVC_F_REJECT: u32 = 1 << 0;
pub const SVC_F_AFFINITY: u32 = 1 << 1;
pub const SVC_F_LOCAL: u32 = 1 << 2;

/// Map names (as pinned under the bpffs directory).
pub const MAP_SVC: &str = "netd_svc";
pub const MAP_SLOTS: &str = "netd_slots";
pub const MAP_AFFINITY: &str = "netd_affinity";
pub const MAP_REVNAT: &str = "netd_revnat";
pub const MAP_CT: &str = "netd_ct";
pub const MAP_CFG: &str = "netd_cfg";

pub const SNAT_PORT_MIN: u16 = 1024;
pub const SNAT_PORT_MAX: u16 = 32767;

pub const CT_FORWARD: u8 = 0;
pub const CT_REPLY: u8 = 1;
pub const CT_F_SNAT: u32 = 1 << 0;
pub const CT_F_CLOSING: u32 = 1 << 1;

/// `struct netd_svc_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SvcKey {
    pub vip: u32,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

impl SvcKey {
    pub fn new(vip: Ipv4Addr, port: u16, proto: u8, scope: u8) -> Self {
        SvcKey { vip: ip_be(vip), port: port.to_be(), proto, scope }
    }
    pub fn ip(&self) -> Ipv4Addr {
        ip_from_be(self.vip)
    }
    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

/// `struct netd_svc_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SvcValue {
    pub id: u32,
    pub count: u32,
    pub flags: u32,
    pub affinity_timeout: u32,
}

/// `struct netd_slot_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SlotKey {
    pub id: u32,
    pub slot: u32,
}

/// `struct netd_backend`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BackendValue {
    pub ip: u32,
    pub port: u16,
    pub local: u8,
    pub pad: u8,
}

impl BackendValue {
    pub fn new(ip: Ipv4Addr, port: u16, local: bool) -> Self {
        BackendValue { ip: ip_be(ip), port: port.to_be(), local: local as u8, pad: 0 }
    }
    pub fn ip(&self) -> Ipv4Addr {
        ip_from_be(self.ip)
    }
    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

/// `struct netd_affinity_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AffinityKey {
    pub netns: u64,
    pub id: u32,
    pub client_ip: u32,
}

/// `struct netd_affinity_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AffinityValue {
    pub last_ns: u64,
    pub backend: BackendValue,
    pub slot: u32,
    pub pad: u32,
}

/// `struct netd_revnat_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RevnatKey {
    pub cookie: u64,
    pub ip: u32,
    pub port: u16,
    pub pad: u16,
}

/// `struct netd_revnat_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RevnatValue {
    pub vip: u32,
    pub port: u16,
    pub pad: u16,
}

/// `struct netd_ct_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub pad: u16,
}

/// `struct netd_ct_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CtValue {
    pub last_ns: u64,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub flags: u32,
}

/// `struct netd_cfg`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CfgValue {
    pub snat_ip: u32,
    pub snat_port_min: u16,
    pub snat_port_max: u16,
}

macro_rules! pod {
    ($($t:ty),*) => {$(
        // SAFETY: #[repr(C)] structs of plain integers with explicit padding fields: every
        // bit pattern is valid and there are no implicit padding bytes (checked by `layout`).
        unsafe impl aya::Pod for $t {}
    )*};
}
/// `struct netd_udp_cfg` (`bpf/udp_overlay.h`): the udp overlay fast path's settings.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UdpCfg {
    pub local_ip: u32,
    pub port: u16,
    pub enabled: u16,
    pub underlay_ifindex: u32,
    pub tun_ifindex: u32,
}

/// `struct netd_udp_peer_key`: aya's `lpm_trie::Key<u32>` has this layout (prefix length,
/// then the address in network byte order); kept here for the layout test.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UdpPeerKey {
    pub prefixlen: u32,
    pub addr: u32,
}

/// `struct netd_udp_peer`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UdpPeer {
    pub ip: u32,
    pub flags: u32,
}

pub const UDP_PEER_F_SUPER: u32 = 1 << 0;

/// `struct netd_udp_flow` (only the programs use it; here for the layout test).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UdpFlow {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u32,
}

pub const MAP_UDP_CFG: &str = "netd_udp_cfg";
pub const MAP_UDP_PEERS: &str = "netd_udp_peers";
pub const MAP_UDP_SRCS: &str = "netd_udp_srcs";
pub const MAP_UDP_STATS: &str = "netd_udp_stats";

pub const UDP_ENCAP_PACKETS: u32 = 0;
pub const UDP_ENCAP_BYTES: u32 = 1;
pub const UDP_DECAP_PACKETS: u32 = 2;
pub const UDP_DECAP_BYTES: u32 = 3;
pub const UDP_ENCAP_PASSED: u32 = 4;
pub const UDP_DECAP_PASSED: u32 = 5;
pub const UDP_ENCAP_ERRORS: u32 = 6;
pub const UDP_DECAP_BULK: u32 = 7;
pub const UDP_STATS: u32 = 8;
pub const MAP_UDP_BULK: &str = "netd_udp_bulk";
/// How long a flow seen in bulk (super-packets, UDP GRO batches) keeps being left to the
/// userspace datapath on receive (`NETD_UDP_BULK_STICKY_MS`).
pub const UDP_BULK_STICKY_MS: u64 = 100;

pod!(SvcKey, SvcValue, SlotKey, BackendValue, AffinityKey, AffinityValue, RevnatKey, RevnatValue, CtKey, CtValue, CfgValue, UdpCfg, UdpPeer);

/// An address as the BPF programs store it (network byte order in a host-order load).
pub fn ip_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn ip_from_be(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use std::process::Command;

    /// `(C expression, Rust value)` for every size and offset of every shared type.
    fn rust_layout() -> Vec<(String, usize)> {
        let mut v = Vec::new();
        macro_rules! layout {
            ($c:literal, $t:ty, [$($f:ident),*]) => {
                v.push((format!("sizeof(struct {})", $c), size_of::<$t>()));
                $( v.push((format!("offsetof(struct {}, {})", $c, stringify!($f)), offset_of!($t, $f))); )*
            };
        }
        layout!("netd_svc_key", SvcKey, [vip, port, proto, scope]);
        layout!("netd_svc_value", SvcValue, [id, count, flags, affinity_timeout]);
        layout!("netd_slot_key", SlotKey, [id, slot]);
        layout!("netd_backend", BackendValue, [ip, port, local, pad]);
        layout!("netd_affinity_key", AffinityKey, [netns, id, client_ip]);
        layout!("netd_affinity_value", AffinityValue, [last_ns, backend, slot, pad]);
        layout!("netd_revnat_key", RevnatKey, [cookie, ip, port, pad]);
        layout!("netd_revnat_value", RevnatValue, [vip, port, pad]);
        layout!("netd_ct_key", CtKey, [saddr, daddr, sport, dport, proto, dir, pad]);
        layout!("netd_ct_value", CtValue, [last_ns, saddr, daddr, sport, dport, flags]);
        layout!("netd_cfg", CfgValue, [snat_ip, snat_port_min, snat_port_max]);
        layout!("netd_udp_cfg", UdpCfg, [local_ip, port, enabled, underlay_ifindex, tun_ifindex]);
        layout!("netd_udp_peer_key", UdpPeerKey, [prefixlen, addr]);
        layout!("netd_udp_peer", UdpPeer, [ip, flags]);
        layout!("netd_udp_flow", UdpFlow, [saddr, daddr, sport, dport, proto]);
        for (c, r) in [
            ("NETD_SCOPE_INTERNAL", SCOPE_INTERNAL as usize),
            ("NETD_SCOPE_EXTERNAL", SCOPE_EXTERNAL as usize),
            ("NETD_SVC_F_REJECT", SVC_F_REJECT as usize),
            ("NETD_SVC_F_AFFINITY", SVC_F_AFFINITY as usize),
            ("NETD_SVC_F_LOCAL", SVC_F_LOCAL as usize),
            ("NETD_CT_FORWARD", CT_FORWARD as usize),
            ("NETD_CT_REPLY", CT_REPLY as usize),
            ("NETD_CT_F_SNAT", CT_F_SNAT as usize),
            ("NETD_CT_F_CLOSING", CT_F_CLOSING as usize),
            ("NETD_SNAT_PORT_MIN", SNAT_PORT_MIN as usize),
            ("NETD_SNAT_PORT_MAX", SNAT_PORT_MAX as usize),
            ("NETD_UDP_ENCAP_PACKETS", UDP_ENCAP_PACKETS as usize),
            ("NETD_UDP_ENCAP_BYTES", UDP_ENCAP_BYTES as usize),
            ("NETD_UDP_DECAP_PACKETS", UDP_DECAP_PACKETS as usize),
            ("NETD_UDP_DECAP_BYTES", UDP_DECAP_BYTES as usize),
            ("NETD_UDP_ENCAP_PASSED", UDP_ENCAP_PASSED as usize),
            ("NETD_UDP_DECAP_PASSED", UDP_DECAP_PASSED as usize),
            ("NETD_UDP_ENCAP_ERRORS", UDP_ENCAP_ERRORS as usize),
            ("NETD_UDP_DECAP_BULK", UDP_DECAP_BULK as usize),
            ("NETD_UDP_STATS", UDP_STATS as usize),
            ("NETD_UDP_PEER_F_SUPER", UDP_PEER_F_SUPER as usize),
            ("NETD_UDP_BULK_STICKY_MS", UDP_BULK_STICKY_MS as usize),
            ("sizeof(struct netd_udp_peer_key)", std::mem::size_of::<aya::maps::lpm_trie::Key<u32>>()),
        ] {
            v.push(((c.to_string()), r));
        }
        v
    }

    /// Compiles `bpf/maps.h` into a host program printing the same expressions.
    #[test]
    fn layout_matches_c_header() {
        let layout = rust_layout();
        let dir = std::env::temp_dir().join(format!("netd-ebpf-layout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut src = String::from("#include <stdio.h>\n#include <stddef.h>\n#include \"maps.h\"\n#include \"udp_overlay.h\"\nint main(void) {\n");
        for (expr, _) in &layout {
            src.push_str(&format!("  printf(\"%zu\\n\", (size_t)({expr}));\n"));
        }
        src.push_str("  return 0;\n}\n");
        let c = dir.join("layout.c");
        let exe = dir.join("layout");
        std::fs::write(&c, src).unwrap();
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let header_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/bpf");
        let st = Command::new(&cc).arg(format!("-I{header_dir}")).arg(&c).arg("-o").arg(&exe).status().unwrap();
        assert!(st.success(), "{cc} failed on the layout program");
        let out = Command::new(&exe).output().unwrap();
        std::fs::remove_dir_all(&dir).ok();
        let got: Vec<usize> = String::from_utf8(out.stdout).unwrap().lines().map(|l| l.parse().unwrap()).collect();
        assert_eq!(got.len(), layout.len());
        let mismatches: Vec<String> = layout
            .iter()
            .zip(&got)
            .filter(|((_, r), c)| r != *c)
            .map(|((e, r), c)| format!("{e}: C {c}, Rust {r}"))
            .collect();
        assert!(mismatches.is_empty(), "maps.h and maps.rs disagree: {mismatches:#?}");
    }

    #[test]
    fn byte_order() {
        let k = SvcKey::new(Ipv4Addr::new(10, 96, 0, 1), 80, 6, 0);
        // SAFETY: SvcKey is repr(C), 8 bytes, no padding.
        let bytes: [u8; 8] = unsafe { std::mem::transmute(k) };
        assert_eq!(bytes, [10, 96, 0, 1, 0, 80, 6, 0]);
        assert_eq!(k.ip(), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(k.host_port(), 80);
    }
}
