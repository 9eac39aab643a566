//! The nftables artifact: a table as data (chains of rules, sets, verdict maps), grouped into
//! fragments (one per service port plus one for the fixed skeleton) so that unchanged services
//! can be recognised by pointer and skipped.
//!
//! The same value renders to `nft -f` syntax ([`Ruleset::to_nft`], golden-tested) and encodes
//! to netlink messages (`netlink.rs`); both are driven by [`Stmt`], the small vocabulary of
//! statements the proxy needs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;

use crate::model::{Proto, ServicePortPlan};

/// Where a base chain hooks in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        }
    }
}

/// Type, hook and priority of a base chain (policy is always accept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseChain {
    pub nat: bool,
    pub hook: Hook,
    pub priority: i32,
}

/// A verdict, in a rule or as the value of a verdict-map element.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

impl Verdict {
    pub fn text(&self) -> String {
        match self {
            Verdict::Accept => "accept".into(),
            Verdict::Drop => "drop".into(),
            Verdict::Return => "return".into(),
            Verdict::Jump(c) => format!("jump {c}"),
            Verdict::Goto(c) => format!("goto {c}"),
        }
    }

    pub fn chain(&self) -> Option<&str> {
        match self {
            Verdict::Jump(c) | Verdict::Goto(c) => Some(c),
            _ => None,
        }
    }
}

/// The value of a map element: a verdict (verdict maps) or a DNAT target (endpoint maps).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Value {
    Verdict(Verdict),
    Target(Ipv4Addr, u16),
}

impl Value {
    pub fn text(&self) -> String {
        match self {
            Value::Verdict(v) => v.text(),
            Value::Target(a, p) => format!("{a} . {p}"),
        }
    }
}


/// The kinds of sets and maps the proxy uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKind {
    /// `type ipv4_addr` (node addresses).
    Addrs,
    /// `type ipv4_addr . inet_proto . inet_service : verdict`.
    AddrProtoPortVmap,
    /// `type inet_proto . inet_service : verdict`.
    ProtoPortVmap,
    /// `type ipv4_addr; flags dynamic,timeout; timeout Ns` (session affinity).
    Affinity { timeout_secs: u32 },
    /// `type ipv4_addr . inet_proto . inet_service` (frontends without endpoints).
    AddrProtoPort,
    /// `type inet_proto . inet_service` (NodePorts without endpoints).
    ProtoPort,
    /// `type ipv4_addr . ipv4_addr . ipv4_addr . inet_proto . inet_service`: client . endpoint .
    /// ClusterIP . protocol . port of hairpin connections (a pod reaching itself through its
    /// service). With the protocol, a TCP and a UDP port of one number are two elements, each
    /// owned by its own service port (one element in two parts would be deleted twice).
    Hairpin,
    /// `type ipv4_addr . inet_proto . inet_service . mark : ipv4_addr . inet_service`:
    /// (service frontend, `numgen random mod N` slot) → endpoint. One map for every service, so
    /// an endpoint change only changes elements.
    Endpoints,
}

impl SetKind {
    pub fn is_map(self) -> bool {
        matches!(self, SetKind::AddrProtoPortVmap | SetKind::ProtoPortVmap | SetKind::Endpoints)
    }

    /// nft's spelling: `set` or `map`, and the type line.
    pub fn nft_type(self) -> (&'static str, String) {
        match self {
            SetKind::Addrs => ("set", "ipv4_addr".into()),
            SetKind::Affinity { .. } => ("set", "ipv4_addr".into()),
            SetKind::AddrProtoPortVmap => ("map", "ipv4_addr . inet_proto . inet_service : verdict".into()),
            SetKind::ProtoPortVmap => ("map", "inet_proto . inet_service : verdict".into()),
            SetKind::AddrProtoPort => ("set", "ipv4_addr . inet_proto . inet_service".into()),
            SetKind::ProtoPort => ("set", "inet_proto . inet_service".into()),
            SetKind::Hairpin => ("set", "ipv4_addr . ipv4_addr . ipv4_addr . inet_proto . inet_service".into()),
            SetKind::Endpoints => ("map", "ipv4_addr . inet_proto . inet_service . mark : ipv4_addr . inet_service".into()),
        }
    }
}

/// The key of a set or map element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ElemKey {
    Addr(Ipv4Addr),
    AddrProtoPort(Ipv4Addr, Proto, u16),
    ProtoPort(Proto, u16),
    /// client . endpoint . ClusterIP . protocol . port.
    Hairpin(Ipv4Addr, Ipv4Addr, Ipv4Addr, Proto, u16),
    /// Service frontend . slot, the key of the endpoint maps.
    Slot(Ipv4Addr, Proto, u16, u32),
}

impl ElemKey {
    pub fn text(&self) -> String {
        match self {
            ElemKey::Addr(a) => a.to_string(),
            ElemKey::AddrProtoPort(a, p, port) => format!("{a} . {p} . {port}"),
            ElemKey::ProtoPort(p, port) => format!("{p} . {port}"),
            ElemKey::Hairpin(c, e, v, proto, p) => format!("{c} . {e} . {v} . {proto} . {p}"),
            ElemKey::Slot(a, p, port, i) => format!("{a} . {p} . {port} . {i}"),
        }
    }

    /// The key as the kernel stores it: each part of a concatenation padded to 4 bytes,
    /// addresses and ports in network byte order.
    pub fn bytes(&self) -> Vec<u8> {
        match *self {
            ElemKey::Addr(a) => a.octets().to_vec(),
            ElemKey::AddrProtoPort(a, p, port) => {
                let mut v = a.octets().to_vec();
                v.extend_from_slice(&[p.number(), 0, 0, 0]);
                v.extend_from_slice(&port.to_be_bytes());
                v.extend_from_slice(&[0, 0]);
                v
            }
            ElemKey::ProtoPort(p, port) => {
                let mut v = vec![p.number(), 0, 0, 0];
                v.extend_from_slice(&port.to_be_bytes());
                v.extend_from_slice(&[0, 0]);
                v
            }
            ElemKey::Hairpin(c, e, vip, p, port) => {
                let mut v = c.octets().to_vec();
                v.extend_from_slice(&e.octets());
                v.extend_from_slice(&vip.octets());
                v.extend_from_slice(&[p.number(), 0, 0, 0]);
                v.extend_from_slice(&port.to_be_bytes());
                v.extend_from_slice(&[0, 0]);
                v
            }
            ElemKey::Slot(a, p, port, i) => {
                let mut v = ElemKey::AddrProtoPort(a, p, port).bytes();
                v.extend_from_slice(&i.to_ne_bytes());
                v
            }
        }
    }

    /// Inverse of [`ElemKey::bytes`] for a set of the given kind.
    pub fn from_bytes(kind: SetKind, b: &[u8]) -> Option<ElemKey> {
        let addr = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
        match kind {
            SetKind::Addrs | SetKind::Affinity { .. } if b.len() == 4 => Some(ElemKey::Addr(addr(b))),
            SetKind::AddrProtoPortVmap if b.len() >= 10 => {
                Some(ElemKey::AddrProtoPort(addr(b), Proto::from_number(b[4])?, u16::from_be_bytes([b[8], b[9]])))
            }
            SetKind::ProtoPortVmap | SetKind::ProtoPort if b.len() >= 6 => Some(ElemKey::ProtoPort(Proto::from_number(b[0])?, u16::from_be_bytes([b[4], b[5]]))),
            SetKind::AddrProtoPort if b.len() >= 10 => Some(ElemKey::AddrProtoPort(addr(b), Proto::from_number(b[4])?, u16::from_be_bytes([b[8], b[9]]))),
            SetKind::Hairpin if b.len() >= 18 => {
                Some(ElemKey::Hairpin(addr(b), addr(&b[4..]), addr(&b[8..]), Proto::from_number(b[12])?, u16::from_be_bytes([b[16], b[17]])))
            }
            SetKind::Endpoints if b.len() >= 16 => Some(ElemKey::Slot(
                addr(b),
                Proto::from_number(b[4])?,
                u16::from_be_bytes([b[8], b[9]]),
                u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
            )),
            _ => None,
        }
    }
}

/// A set or map declaration (its elements live in fragments, see [`Fragment::elements`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetDef {
    pub name: String,
    pub kind: SetKind,
    pub comment: Option<String>,
}

/// One statement of a rule. Each has one `nft` spelling and one expression sequence.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Stmt {
    /// `ip saddr 10.0.0.0/8` or `ip saddr != ...` (a /32 prints as a plain address).
    Saddr { net: Ipv4Net, negate: bool },
    Daddr { net: Ipv4Net, negate: bool },
    /// `ip saddr @set`.
    SaddrInSet(String),
    /// `ip daddr @set`.
    DaddrInSet(String),
    /// `meta l4proto tcp`.
    L4Proto(Proto),
    /// `ct state new`.
    CtStateNew,
    /// `fib saddr type local` / `fib daddr type local`.
    FibLocal { saddr: bool },
    /// `meta mark & MASK == VALUE`.
    MarkMatch { mask: u32, value: u32 },
    /// `meta mark set meta mark | BITS`.
    MarkOr(u32),
    /// `meta mark set meta mark ^ BITS`.
    MarkXor(u32),
    /// `ip daddr . meta l4proto . th dport vmap @map`.
    VmapAddrProtoPort(String),
    /// `meta l4proto . th dport vmap @map`.
    VmapProtoPort(String),
    /// `numgen random mod N vmap { 0 : goto a, 1 : goto b, ... }`.
    NumgenVmap(Vec<String>),
    /// `ip daddr . meta l4proto . th dport @set`.
    InAddrProtoPort(String),
    /// `meta l4proto . th dport @set`.
    InProtoPort(String),
    /// `ip saddr . ip daddr . ct original ip daddr . meta l4proto . ct original proto-dst @set`.
    InHairpin(String),
    /// `dnat to FRONTEND . numgen random mod N map @set`: the endpoint map picks the endpoint
    /// of slot `numgen` of this service (frontend = ClusterIP . proto . port; nft has no
    /// syntax for the constant part and lists it in hex).
    DnatNumgenMap { set: String, frontend: (Ipv4Addr, Proto, u16), n: u32 },
    /// `dnat ip to ip daddr . meta l4proto . th dport . numgen random mod N map @set`: the same,
    /// keyed by the packet's own destination (one rule serves every ClusterIP with N endpoints).
    DnatNumgenMapByDest { set: String, n: u32 },
    /// `update @set { ip saddr }`.
    UpdateSaddr(String),
    /// `dnat to ADDR:PORT` (needs an `L4Proto` before it).
    Dnat(Ipv4Addr, u16),
    /// `masquerade fully-random`.
    Masquerade,
    /// `reject with tcp reset` (needs `L4Proto(Tcp)` before it).
    RejectTcpReset,
    /// `reject` (ICMP port unreachable).
    Reject,
    Verdict(Verdict),
}

fn net_text(n: &Ipv4Net) -> String {
    if n.prefix_len() == 32 {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

impl Stmt {
    pub fn text(&self) -> String {
        let neg = |n: bool| if n { "!= " } else { "" };
        match self {
            Stmt::Saddr { net, negate } => format!("ip saddr {}{}", neg(*negate), net_text(net)),
            Stmt::Daddr { net, negate } => format!("ip daddr {}{}", neg(*negate), net_text(net)),
            Stmt::SaddrInSet(s) => format!("ip saddr @{s}"),
            Stmt::DaddrInSet(s) => format!("ip daddr @{s}"),
            Stmt::L4Proto(p) => format!("meta l4proto {p}"),
            Stmt::CtStateNew => "ct state new".into(),
            Stmt::FibLocal { saddr } => format!("fib {} type local", if *saddr { "saddr" } else { "daddr" }),
            Stmt::MarkMatch { mask, value } => format!("meta mark & {mask:#010x} == {value:#010x}"),
            Stmt::MarkOr(b) => format!("meta mark set meta mark | {b:#010x}"),
            Stmt::MarkXor(b) => format!("meta mark set meta mark ^ {b:#010x}"),
            Stmt::VmapAddrProtoPort(m) => format!("ip daddr . meta l4proto . th dport vmap @{m}"),
            Stmt::VmapProtoPort(m) => format!("meta l4proto . th dport vmap @{m}"),
            Stmt::NumgenVmap(chains) => {
                let elems: Vec<String> = chains.iter().enumerate().map(|(i, c)| format!("{i} : goto {c}")).collect();
                format!("numgen random mod {} vmap {{ {} }}", chains.len(), elems.join(", "))
            }
            Stmt::UpdateSaddr(s) => format!("update @{s} {{ ip saddr }}"),
            Stmt::InAddrProtoPort(s) => format!("ip daddr . meta l4proto . th dport @{s}"),
            Stmt::InProtoPort(s) => format!("meta l4proto . th dport @{s}"),
            Stmt::InHairpin(s) => format!("ip saddr . ip daddr . ct original ip daddr . meta l4proto . ct original proto-dst @{s}"),
            Stmt::DnatNumgenMap { set, frontend: (a, p, port), n } => format!("dnat to {a} . {p} . {port} . numgen random mod {n} map @{set}"),
            Stmt::DnatNumgenMapByDest { set, n } => format!("dnat ip to ip daddr . meta l4proto . th dport . numgen random mod {n} map @{set}"),
            Stmt::Dnat(a, p) => format!("dnat to {a}:{p}"),
            Stmt::Masquerade => "masquerade fully-random".into(),
            Stmt::RejectTcpReset => "reject with tcp reset".into(),
            Stmt::Reject => "reject".into(),
            Stmt::Verdict(v) => v.text(),
        }
    }
}

/// A rule: statements evaluated left to right.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule(pub Vec<Stmt>);

impl Rule {
    pub fn text(&self) -> String {
        self.0.iter().map(Stmt::text).collect::<Vec<_>>().join(" ")
    }

    /// A stable 64-bit fingerprint of the rule (FNV-1a of its text), stored in the rule's
    /// comment so a restarted netd can recognise rules that are already right.
    pub fn fingerprint(&self) -> u64 {
        fnv1a(self.text().as_bytes())
    }

    /// The comment the netlink encoder attaches to the rule.
    pub fn tag(&self) -> String {
        format!("netd:{:016x}", self.fingerprint())
    }
}

pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// A chain and its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainDef {
    pub name: String,
    pub base: Option<BaseChain>,
    pub rules: Vec<Rule>,
}

/// Part of the table that changes as a unit: the skeleton, or everything one service port
/// contributes (its chains, affinity sets, and map elements).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fragment {
    pub sets: Vec<SetDef>,
    pub chains: Vec<ChainDef>,
    /// (set or map name, key, verdict for maps).
    pub elements: Vec<(String, ElemKey, Option<Value>)>,
}

/// The whole table as the proxy wants it.
///
/// Persistent maps: a ruleset that differs from the previous one in a few fragments is made
/// (and remembered as "applied") in O(changes), sharing the rest.
#[derive(Debug, Clone, Default)]
pub struct Ruleset {
    pub table: String,
    /// Fragment key ("" for the skeleton, else the service port's slug) → fragment.
    pub fragments: imbl::OrdMap<Arc<str>, Arc<Fragment>>,
    /// The service port plan each service fragment was rendered from (for reuse by pointer).
    pub(crate) sources: imbl::OrdMap<Arc<str>, Arc<ServicePortPlan>>,
    /// This ruleset's identity (0: none).
    pub(crate) id: u64,
    /// The plan it was rendered from ([`crate::model::Plan::id`]).
    pub(crate) plan_id: u64,
    /// When it was made from another ruleset by re-rendering some fragments: that ruleset's id
    /// and the fragment keys that may differ from it. The diff then looks at those only.
    pub(crate) delta: Option<(u64, Arc<[Arc<str>]>)>,
}

impl Ruleset {
    /// Every set declaration.
    pub fn sets(&self) -> impl Iterator<Item = &SetDef> {
        self.fragments.values().flat_map(|f| f.sets.iter())
    }

    pub fn chains(&self) -> impl Iterator<Item = &ChainDef> {
        self.fragments.values().flat_map(|f| f.chains.iter())
    }

    pub fn elements(&self) -> impl Iterator<Item = &(String, ElemKey, Option<Value>)> {
        self.fragments.values().flat_map(|f| f.elements.iter())
    }

    /// The table in `nft -f` syntax, deterministic (sets, then chains, each in name order;
    /// elements sorted): what `nft list table` would show, minus handles and the fingerprint
    /// comments. Golden tests compare this.
    pub fn to_nft(&self) -> String {
        let mut sets: Vec<&SetDef> = self.sets().collect();
        sets.sort_by(|a, b| a.name.cmp(&b.name));
        let mut elems: BTreeMap<&str, Vec<(ElemKey, Option<&Value>)>> = BTreeMap::new();
        for (set, key, v) in self.elements() {
            elems.entry(set.as_str()).or_default().push((*key, v.as_ref()));
        }
        let mut chains: Vec<&ChainDef> = self.chains().collect();
        chains.sort_by(|a, b| a.name.cmp(&b.name));
        let mut s = format!("table ip {} {{\n", self.table);
        for set in sets {
            let (word, typ) = set.kind.nft_type();
            let _ = writeln!(s, "\t{word} {} {{\n\t\ttype {typ}", set.name);
            if let SetKind::Affinity { timeout_secs } = set.kind {
                let _ = writeln!(s, "\t\tflags dynamic,timeout\n\t\ttimeout {timeout_secs}s");
            }
            if let Some(c) = &set.comment {
                let _ = writeln!(s, "\t\tcomment \"{c}\"");
            }
            if let Some(list) = elems.get_mut(set.name.as_str()) {
                list.sort();
                let items: Vec<String> = list
                    .iter()
                    .map(|(k, v)| match v {
                        Some(v) => format!("{} : {}", k.text(), v.text()),
                        None => k.text(),
                    })
                    .collect();
                let _ = writeln!(s, "\t\telements = {{ {} }}", items.join(",\n\t\t\t     "));
            }
            s.push_str("\t}\n");
        }
        for chain in chains {
            let _ = writeln!(s, "\tchain {} {{", chain.name);
            if let Some(b) = chain.base {
                let _ = writeln!(
                    s,
                    "\t\ttype {} hook {} priority {}; policy accept;",
                    if b.nat { "nat" } else { "filter" },
                    b.hook.name(),
                    b.priority
                );
            }
            for r in &chain.rules {
                let _ = writeln!(s, "\t\t{}", r.text());
            }
            s.push_str("\t}\n");
        }
        s.push_str("}\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_kernel_bytes() {
        for (kind, key) in [
            (SetKind::Addrs, ElemKey::Addr("198.18.0.10".parse().unwrap())),
            (SetKind::AddrProtoPortVmap, ElemKey::AddrProtoPort("10.96.0.1".parse().unwrap(), Proto::Udp, 53)),
            (SetKind::ProtoPortVmap, ElemKey::ProtoPort(Proto::Sctp, 30000)),
            (SetKind::Hairpin, ElemKey::Hairpin("10.244.1.5".parse().unwrap(), "10.244.1.5".parse().unwrap(), "10.96.0.1".parse().unwrap(), Proto::Udp, 53)),
        ] {
            assert_eq!(ElemKey::from_bytes(kind, &key.bytes()), Some(key));
        }
        assert_eq!(ElemKey::AddrProtoPort("10.96.0.1".parse().unwrap(), Proto::Tcp, 80).bytes(), [10, 96, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0]);
    }

    #[test]
    fn statements_spell_like_nft() {
        let r = Rule(vec![
            Stmt::Daddr { net: "10.96.0.1/32".parse().unwrap(), negate: false },
            Stmt::Saddr { net: "10.244.0.0/16".parse().unwrap(), negate: true },
            Stmt::Verdict(Verdict::Jump("mark-for-masquerade".into())),
        ]);
        assert_eq!(r.text(), "ip daddr 10.96.0.1 ip saddr != 10.244.0.0/16 jump mark-for-masquerade");
        assert_eq!(Stmt::NumgenVmap(vec!["a".into(), "b".into()]).text(), "numgen random mod 2 vmap { 0 : goto a, 1 : goto b }");
        assert_ne!(r.fingerprint(), Rule(vec![]).fingerprint());
    }
}
