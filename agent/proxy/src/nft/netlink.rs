//! Netlink side of the nftables dataplane: encoding a list of [`Op`]s into one nf_tables batch
//! (`nftnl` for tables, chains and rules; `nftnl-sys` for what `nftnl` lacks: sets, verdict
//! maps, concatenations, numgen, dynset, fib, reject), sending it, and reading the table back
//! (dumps) so a restarted netd can adopt what is already programmed.
//!
//! No `nft` binary is involved anywhere on this path.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::raw::{c_char, c_void};
use std::ptr::{self, NonNull};

use nftnl::expr::Expression;
use nftnl::nftnl_sys as sys;
use nftnl::{Chain, ChainType, MsgType, NlMsg, Policy, ProtoFamily, Table};

use super::ir::*;

// Kernel constants (linux/netfilter/nf_tables.h and friends) not all exported by libc.
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;
const NFT_REG32_01: u32 = 9;
const NFT_REG32_02: u32 = 10;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_META_MARK: u32 = 3;
const NFT_META_L4PROTO: u32 = 16;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_CT_STATE: u32 = 0;
const NF_CT_STATE_NEW: u32 = 1 << 3;
const NFT_NG_RANDOM: u32 = 1;
const NFT_DYNSET_OP_UPDATE: u32 = 1;
const NFTA_FIB_F_SADDR: u32 = 1;
const NFTA_FIB_F_DADDR: u32 = 2;
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const RTN_LOCAL: u32 = 2;
const NFT_NAT_DNAT: u32 = 1;
const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 1 << 4;
const NFT_REJECT_ICMP_UNREACH: u32 = 0;
const NFT_REJECT_TCP_RST: u32 = 1;
const ICMP_PORT_UNREACH: u32 = 3;
const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_CONSTANT: u32 = 0x2;
const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
const NFT_CT_PROTO_DST: u32 = 12;
const NFT_CT_DST_IP: u32 = 20;
const IP_CT_DIR_ORIGINAL: u32 = 0;
const NFT_REG32_03: u32 = 11;
const NFT_REG32_04: u32 = 12;
const NFT_SET_EVAL: u32 = 0x20;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
const NF_ACCEPT: i32 = 1;
const NF_DROP: i32 = 0;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;
/// The slot part uses nft's `mark` type: a 32-bit integer nft knows the size of (plain
/// `integer` has none, and `nft list` could not print the map).
const TYPE_MARK: u32 = 19;
const ENDPOINTS_TYPE: u32 = (((((TYPE_IPADDR << 6) | TYPE_INET_PROTOCOL) << 6) | TYPE_INET_SERVICE) << 6) | TYPE_MARK;
const HAIRPIN_TYPE: u32 = (((((((TYPE_IPADDR << 6) | TYPE_IPADDR) << 6) | TYPE_IPADDR) << 6) | TYPE_INET_PROTOCOL) << 6) | TYPE_INET_SERVICE;
/// nft's datatype ids, concatenated 6 bits at a time (`ipv4_addr . inet_proto . inet_service`).
const TYPE_INTEGER: u32 = 4;
const TYPE_IPADDR: u32 = 7;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const NFTNL_UDATA_SET_KEYBYTEORDER: u8 = 0;
const NFTNL_UDATA_SET_COMMENT: u8 = 7;
const NFTNL_UDATA_RULE_COMMENT: u8 = 0;
const BYTEORDER_HOST: u32 = 1;
const BYTEORDER_BIG: u32 = 2;
/// Elements per NEWSETELEM message (a netlink attribute nest holds at most 64 KiB).
const ELEMS_PER_MSG: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("nf_tables rejected the batch: {0}")]
    Rejected(String),
    #[error("parsing a netlink dump: {0}")]
    Parse(String),
}

/// One change to the table. A batch is a list of these, in order.
#[derive(Debug, Clone)]
pub enum Op<'a> {
    AddTable,
    DelTable,
    AddSet(&'a SetDef),
    DelSet(String),
    /// Creates the chain (empty; base chains get their hook).
    AddChain(&'a ChainDef),
    FlushChain(String),
    DelChain(String),
    AddRule(&'a str, &'a Rule),
    AddElems(String, SetKind, Vec<(ElemKey, Option<Value>)>),
    DelElems(String, SetKind, Vec<ElemKey>),
}

impl Op<'_> {
    pub fn describe(&self) -> String {
        match self {
            Op::AddTable => "add table".into(),
            Op::DelTable => "delete table".into(),
            Op::AddSet(s) => format!("add set {}", s.name),
            Op::DelSet(s) => format!("delete set {s}"),
            Op::AddChain(c) => format!("add chain {}", c.name),
            Op::FlushChain(c) => format!("flush chain {c}"),
            Op::DelChain(c) => format!("delete chain {c}"),
            Op::AddRule(c, r) => format!("add rule {c} {}", r.text()),
            Op::AddElems(s, _, e) => format!("add {} element(s) to {s} (first {})", e.len(), e.first().map(|e| e.0.text()).unwrap_or_default()),
            Op::DelElems(s, _, e) => format!("delete {} element(s) from {s} (first {})", e.len(), e.first().map(|e| e.text()).unwrap_or_default()),
        }
    }
}

/// A raw `nftnl_expr`: a name and attributes, for everything `nftnl::expr` does not cover.
struct Raw {
    name: &'static CStr,
    attrs: Vec<(u16, Val)>,
}

enum Val {
    U32(u32),
    Str(CString),
    Data(Vec<u8>),
}

impl Raw {
    fn new(name: &'static CStr) -> Self {
        Raw { name, attrs: Vec::new() }
    }
    fn u32(mut self, attr: u32, v: u32) -> Self {
        self.attrs.push((attr as u16, Val::U32(v)));
        self
    }
    fn str(mut self, attr: u32, v: &str) -> Self {
        self.attrs.push((attr as u16, Val::Str(cstring(v))));
        self
    }
    fn data(mut self, attr: u32, v: &[u8]) -> Self {
        self.attrs.push((attr as u16, Val::Data(v.to_vec())));
        self
    }
}

impl Expression for Raw {
    fn to_expr(&self, _rule: &nftnl::Rule) -> NonNull<sys::nftnl_expr> {
        // SAFETY: nftnl_expr_alloc returns an owned expression or NULL (checked); the setters
        // copy the values they are given (strings are NUL-terminated CStrings, data slices are
        // passed with their length). The rule takes ownership of the returned expression.
        unsafe {
            let e = sys::nftnl_expr_alloc(self.name.as_ptr());
            let Some(e) = NonNull::new(e) else { std::process::abort() };
            for (attr, v) in &self.attrs {
                match v {
                    Val::U32(x) => sys::nftnl_expr_set_u32(e.as_ptr(), *attr, *x),
                    Val::Str(s) => {
                        sys::nftnl_expr_set_str(e.as_ptr(), *attr, s.as_ptr());
                    }
                    Val::Data(d) => {
                        sys::nftnl_expr_set(e.as_ptr(), *attr, d.as_ptr() as *const c_void, d.len() as u32);
                    }
                }
            }
            e
        }
    }
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

fn payload(base: u32, offset: u32, len: u32, dreg: u32) -> Raw {
    Raw::new(c"payload")
        .u32(sys::NFTNL_EXPR_PAYLOAD_DREG, dreg)
        .u32(sys::NFTNL_EXPR_PAYLOAD_BASE, base)
        .u32(sys::NFTNL_EXPR_PAYLOAD_OFFSET, offset)
        .u32(sys::NFTNL_EXPR_PAYLOAD_LEN, len)
}

fn meta_load(key: u32, dreg: u32) -> Raw {
    Raw::new(c"meta").u32(sys::NFTNL_EXPR_META_KEY, key).u32(sys::NFTNL_EXPR_META_DREG, dreg)
}

fn cmp(op: u32, data: &[u8]) -> Raw {
    Raw::new(c"cmp").u32(sys::NFTNL_EXPR_CMP_SREG, NFT_REG_1).u32(sys::NFTNL_EXPR_CMP_OP, op).data(sys::NFTNL_EXPR_CMP_DATA, data)
}

fn bitwise(len: u32, mask: &[u8], xor: &[u8]) -> Raw {
    Raw::new(c"bitwise")
        .u32(sys::NFTNL_EXPR_BITWISE_SREG, NFT_REG_1)
        .u32(sys::NFTNL_EXPR_BITWISE_DREG, NFT_REG_1)
        .u32(sys::NFTNL_EXPR_BITWISE_LEN, len)
        .data(sys::NFTNL_EXPR_BITWISE_MASK, mask)
        .data(sys::NFTNL_EXPR_BITWISE_XOR, xor)
}

/// `ip daddr . meta l4proto . th dport` into NFT_REG_1 (12 bytes, each part 4-aligned): the
/// key layout of `ElemKey::AddrProtoPort`.
fn dest_key() -> [Raw; 3] {
    [
        payload(NFT_PAYLOAD_NETWORK_HEADER, 16, 4, NFT_REG_1),
        meta_load(NFT_META_L4PROTO, NFT_REG32_01),
        payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, NFT_REG32_02),
    ]
}

/// With a frontend key in NFT_REG_1: `. numgen random mod N` as its slot, the endpoint looked up
/// in `set`, and `dnat` to it.
fn numgen_dnat(set: &str, n: u32) -> [Raw; 3] {
    [
        Raw::new(c"numgen")
            .u32(sys::NFTNL_EXPR_NG_DREG, NFT_REG32_03)
            .u32(sys::NFTNL_EXPR_NG_MODULUS, n)
            .u32(sys::NFTNL_EXPR_NG_TYPE, NFT_NG_RANDOM)
            .u32(sys::NFTNL_EXPR_NG_OFFSET, 0),
        lookup(set, None, false).u32(sys::NFTNL_EXPR_LOOKUP_DREG, NFT_REG_1),
        Raw::new(c"nat")
            .u32(sys::NFTNL_EXPR_NAT_TYPE, NFT_NAT_DNAT)
            .u32(sys::NFTNL_EXPR_NAT_FAMILY, libc::NFPROTO_IPV4 as u32)
            .u32(sys::NFTNL_EXPR_NAT_REG_ADDR_MIN, NFT_REG_1)
            .u32(sys::NFTNL_EXPR_NAT_REG_PROTO_MIN, NFT_REG32_01),
    ]
}

fn lookup(set: &str, set_id: Option<u32>, verdict: bool) -> Raw {
    let mut r = Raw::new(c"lookup").u32(sys::NFTNL_EXPR_LOOKUP_SREG, NFT_REG_1).str(sys::NFTNL_EXPR_LOOKUP_SET, set);
    if let Some(id) = set_id {
        r = r.u32(sys::NFTNL_EXPR_LOOKUP_SET_ID, id);
    }
    if verdict {
        r = r.u32(sys::NFTNL_EXPR_LOOKUP_DREG, NFT_REG_VERDICT);
    }
    r
}

fn verdict_expr(v: &Verdict) -> Raw {
    let (code, chain) = verdict_code(v);
    let mut r = Raw::new(c"immediate").u32(sys::NFTNL_EXPR_IMM_DREG, NFT_REG_VERDICT).u32(sys::NFTNL_EXPR_IMM_VERDICT, code as u32);
    if let Some(c) = chain {
        r = r.str(sys::NFTNL_EXPR_IMM_CHAIN, c);
    }
    r
}

fn verdict_code(v: &Verdict) -> (i32, Option<&str>) {
    match v {
        Verdict::Accept => (NF_ACCEPT, None),
        Verdict::Drop => (NF_DROP, None),
        Verdict::Return => (NFT_RETURN, None),
        Verdict::Jump(c) => (NFT_JUMP, Some(c)),
        Verdict::Goto(c) => (NFT_GOTO, Some(c)),
    }
}

fn prefix_mask(net: &ipnet::Ipv4Net) -> Vec<u8> {
    net.netmask().octets().to_vec()
}

/// The expressions of one statement. An anonymous map the statement needs is returned too and
/// must be created (with its elements) before the rule, in the same batch.
fn encode_stmt(s: &Stmt, next_set_id: &mut u32) -> (Vec<Raw>, Option<AnonMap>) {
    let addr_match = |offset: u32, net: &ipnet::Ipv4Net, negate: bool| {
        let mut v = vec![payload(NFT_PAYLOAD_NETWORK_HEADER, offset, 4, NFT_REG_1)];
        if net.prefix_len() < 32 {
            v.push(bitwise(4, &prefix_mask(net), &[0; 4]));
        }
        v.push(cmp(if negate { NFT_CMP_NEQ } else { NFT_CMP_EQ }, &net.network().octets()));
        v
    };
    let ne = |x: u32| x.to_ne_bytes();
    let v = match s {
        Stmt::Saddr { net, negate } => addr_match(12, net, *negate),
        Stmt::Daddr { net, negate } => addr_match(16, net, *negate),
        Stmt::SaddrInSet(set) => vec![payload(NFT_PAYLOAD_NETWORK_HEADER, 12, 4, NFT_REG_1), lookup(set, None, false)],
        Stmt::DaddrInSet(set) => vec![payload(NFT_PAYLOAD_NETWORK_HEADER, 16, 4, NFT_REG_1), lookup(set, None, false)],
        Stmt::L4Proto(p) => vec![meta_load(NFT_META_L4PROTO, NFT_REG_1), cmp(NFT_CMP_EQ, &[p.number()])],
        Stmt::CtStateNew => vec![
            Raw::new(c"ct").u32(sys::NFTNL_EXPR_CT_KEY, NFT_CT_STATE).u32(sys::NFTNL_EXPR_CT_DREG, NFT_REG_1),
            bitwise(4, &ne(NF_CT_STATE_NEW), &[0; 4]),
            cmp(NFT_CMP_NEQ, &[0; 4]),
        ],
        Stmt::FibLocal { saddr } => vec![
            Raw::new(c"fib")
                .u32(sys::NFTNL_EXPR_FIB_FLAGS, if *saddr { NFTA_FIB_F_SADDR } else { NFTA_FIB_F_DADDR })
                .u32(sys::NFTNL_EXPR_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE)
                .u32(sys::NFTNL_EXPR_FIB_DREG, NFT_REG_1),
            cmp(NFT_CMP_EQ, &ne(RTN_LOCAL)),
        ],
        Stmt::MarkMatch { mask, value } => {
            vec![meta_load(NFT_META_MARK, NFT_REG_1), bitwise(4, &ne(*mask), &[0; 4]), cmp(NFT_CMP_EQ, &ne(*value))]
        }
        Stmt::MarkOr(b) => vec![
            meta_load(NFT_META_MARK, NFT_REG_1),
            bitwise(4, &ne(!*b), &ne(*b)),
            Raw::new(c"meta").u32(sys::NFTNL_EXPR_META_KEY, NFT_META_MARK).u32(sys::NFTNL_EXPR_META_SREG, NFT_REG_1),
        ],
        Stmt::MarkXor(b) => vec![
            meta_load(NFT_META_MARK, NFT_REG_1),
            bitwise(4, &ne(u32::MAX), &ne(*b)),
            Raw::new(c"meta").u32(sys::NFTNL_EXPR_META_KEY, NFT_META_MARK).u32(sys::NFTNL_EXPR_META_SREG, NFT_REG_1),
        ],
        Stmt::VmapAddrProtoPort(m) => {
            let mut v = Vec::from(dest_key());
            v.push(lookup(m, None, true));
            v
        }
        Stmt::VmapProtoPort(m) => vec![
            meta_load(NFT_META_L4PROTO, NFT_REG_1),
            payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, NFT_REG32_01),
            lookup(m, None, true),
        ],
        Stmt::NumgenVmap(chains) => {
            *next_set_id += 1;
            let id = *next_set_id;
            let map = AnonMap { id, chains: chains.clone() };
            let v = vec![
                Raw::new(c"numgen")
                    .u32(sys::NFTNL_EXPR_NG_DREG, NFT_REG_1)
                    .u32(sys::NFTNL_EXPR_NG_MODULUS, chains.len() as u32)
                    .u32(sys::NFTNL_EXPR_NG_TYPE, NFT_NG_RANDOM)
                    .u32(sys::NFTNL_EXPR_NG_OFFSET, 0),
                lookup("__map%d", Some(id), true),
            ];
            return (v, Some(map));
        }
        Stmt::InAddrProtoPort(set) => vec![
            payload(NFT_PAYLOAD_NETWORK_HEADER, 16, 4, NFT_REG_1),
            meta_load(NFT_META_L4PROTO, NFT_REG32_01),
            payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, NFT_REG32_02),
            lookup(set, None, false),
        ],
        Stmt::InProtoPort(set) => vec![
            meta_load(NFT_META_L4PROTO, NFT_REG_1),
            payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, NFT_REG32_01),
            lookup(set, None, false),
        ],
        Stmt::InHairpin(set) => vec![
            payload(NFT_PAYLOAD_NETWORK_HEADER, 12, 4, NFT_REG_1),
            payload(NFT_PAYLOAD_NETWORK_HEADER, 16, 4, NFT_REG32_01),
            Raw::new(c"ct").u32(sys::NFTNL_EXPR_CT_KEY, NFT_CT_DST_IP).u32(sys::NFTNL_EXPR_CT_DIR, IP_CT_DIR_ORIGINAL).u32(sys::NFTNL_EXPR_CT_DREG, NFT_REG32_02),
            meta_load(NFT_META_L4PROTO, NFT_REG32_03),
            Raw::new(c"ct").u32(sys::NFTNL_EXPR_CT_KEY, NFT_CT_PROTO_DST).u32(sys::NFTNL_EXPR_CT_DIR, IP_CT_DIR_ORIGINAL).u32(sys::NFTNL_EXPR_CT_DREG, NFT_REG32_04),
            lookup(set, None, false),
        ],
        Stmt::DnatNumgenMap { set, frontend: (a, p, port), n } => {
            let key = Raw::new(c"immediate").u32(sys::NFTNL_EXPR_IMM_DREG, NFT_REG_1).data(sys::NFTNL_EXPR_IMM_DATA, &ElemKey::AddrProtoPort(*a, *p, *port).bytes());
            let mut v = vec![key];
            v.extend(numgen_dnat(set, *n));
            v
        }
        Stmt::DnatNumgenMapByDest { set, n } => {
            let mut v = Vec::from(dest_key());
            v.extend(numgen_dnat(set, *n));
            v
        }
        Stmt::UpdateSaddr(set) => vec![
            payload(NFT_PAYLOAD_NETWORK_HEADER, 12, 4, NFT_REG_1),
            Raw::new(c"dynset")
                .u32(sys::NFTNL_EXPR_DYNSET_SREG_KEY, NFT_REG_1)
                .u32(sys::NFTNL_EXPR_DYNSET_OP, NFT_DYNSET_OP_UPDATE)
                .str(sys::NFTNL_EXPR_DYNSET_SET_NAME, set),
        ],
        Stmt::Dnat(addr, port) => vec![
            Raw::new(c"immediate").u32(sys::NFTNL_EXPR_IMM_DREG, NFT_REG_1).data(sys::NFTNL_EXPR_IMM_DATA, &addr.octets()),
            Raw::new(c"immediate").u32(sys::NFTNL_EXPR_IMM_DREG, NFT_REG_2).data(sys::NFTNL_EXPR_IMM_DATA, &port.to_be_bytes()),
            Raw::new(c"nat")
                .u32(sys::NFTNL_EXPR_NAT_TYPE, NFT_NAT_DNAT)
                .u32(sys::NFTNL_EXPR_NAT_FAMILY, libc::NFPROTO_IPV4 as u32)
                .u32(sys::NFTNL_EXPR_NAT_REG_ADDR_MIN, NFT_REG_1)
                .u32(sys::NFTNL_EXPR_NAT_REG_PROTO_MIN, NFT_REG_2),
        ],
        Stmt::Masquerade => vec![Raw::new(c"masq").u32(sys::NFTNL_EXPR_MASQ_FLAGS, NF_NAT_RANGE_PROTO_RANDOM_FULLY)],
        Stmt::RejectTcpReset => vec![Raw::new(c"reject").u32(sys::NFTNL_EXPR_REJECT_TYPE, NFT_REJECT_TCP_RST).u32(sys::NFTNL_EXPR_REJECT_CODE, 0)],
        Stmt::Reject => {
            vec![Raw::new(c"reject").u32(sys::NFTNL_EXPR_REJECT_TYPE, NFT_REJECT_ICMP_UNREACH).u32(sys::NFTNL_EXPR_REJECT_CODE, ICMP_PORT_UNREACH)]
        }
        Stmt::Verdict(v) => vec![verdict_expr(v)],
    };
    (v, None)
}

/// `numgen random mod N vmap { 0 : goto a, ... }`'s anonymous map.
struct AnonMap {
    id: u32,
    chains: Vec<String>,
}

/// A batch being built: begin message, our messages (without per-message ACKs: the kernel
/// reports errors anyway), end message.
pub struct BatchBuilder {
    buf: Vec<u8>,
    scratch: Vec<u8>,
    seq: u32,
    first_seq: u32,
    /// Op index of each message, for error reports.
    owners: Vec<u32>,
    next_set_id: u32,
    table: Table,
}

impl BatchBuilder {
    pub fn new(table: &str) -> Self {
        let max = nftnl::nft_nlmsg_maxsize() as usize;
        let mut b = BatchBuilder {
            buf: Vec::with_capacity(64 * 1024),
            scratch: vec![0u8; max],
            seq: 1,
            first_seq: 1,
            owners: Vec::new(),
            next_set_id: 0,
            table: Table::new(cstring(table), ProtoFamily::Ipv4),
        };
        let seq = b.seq;
        // SAFETY: scratch holds nft_nlmsg_maxsize() bytes, more than a batch begin message.
        b.emit(u32::MAX, |buf| unsafe { sys::nftnl_batch_begin(buf, seq) });
        b
    }

    /// Copies the message just built in `scratch` into the batch.
    fn emit(&mut self, owner: u32, build: impl FnOnce(*mut c_char) -> *mut libc::nlmsghdr) {
        let nlh = build(self.scratch.as_mut_ptr().cast());
        // SAFETY: `build` wrote a complete netlink message at the start of scratch and returned
        // its header; nlmsg_len is its length, within scratch.
        let len = unsafe {
            (*nlh).nlmsg_flags &= !(libc::NLM_F_ACK as u16);
            (*nlh).nlmsg_len as usize
        };
        self.buf.extend_from_slice(&self.scratch[..len]);
        self.owners.push(owner);
        self.seq += 1;
    }

    fn emit_nlmsg(&mut self, owner: u32, msg: &impl NlMsg, typ: MsgType) {
        let seq = self.seq;
        let scratch = self.scratch.as_mut_ptr();
        // SAFETY: scratch holds nft_nlmsg_maxsize() bytes, the most any message can take.
        unsafe { msg.write(scratch.cast(), seq, typ) };
        self.emit(owner, |buf| buf.cast());
    }

    pub fn push(&mut self, owner: u32, op: &Op<'_>) {
        match op {
            Op::AddTable | Op::DelTable => {
                let t = Table::new(self.table.get_name(), ProtoFamily::Ipv4);
                let typ = if matches!(op, Op::AddTable) { MsgType::Add } else { MsgType::Del };
                self.emit_nlmsg(owner, &t, typ);
            }
            Op::AddChain(c) => {
                let name = cstring(&c.name);
                let mut chain = Chain::new(&name, &self.table);
                if let Some(b) = c.base {
                    let hook = match b.hook {
                        Hook::Prerouting => nftnl::Hook::PreRouting,
                        Hook::Input => nftnl::Hook::In,
                        Hook::Forward => nftnl::Hook::Forward,
                        Hook::Output => nftnl::Hook::Out,
                        Hook::Postrouting => nftnl::Hook::PostRouting,
                    };
                    chain.set_hook(hook, b.priority);
                    chain.set_type(if b.nat { ChainType::Nat } else { ChainType::Filter });
                    chain.set_policy(Policy::Accept);
                }
                let chain = chain;
                let seq = self.seq;
                let scratch = self.scratch.as_mut_ptr();
                // SAFETY: see emit_nlmsg; Chain borrows self.table, so write through a local.
                unsafe { chain.write(scratch.cast(), seq, MsgType::Add) };
                drop(chain);
                self.emit(owner, |buf| buf.cast());
            }
            Op::FlushChain(c) | Op::DelChain(c) => {
                let name = cstring(c);
                let chain = Chain::new(&name, &self.table);
                let seq = self.seq;
                let scratch = self.scratch.as_mut_ptr();
                if matches!(op, Op::FlushChain(_)) {
                    // A rule delete without a handle flushes the chain.
                    let r = nftnl::Rule::new(&chain);
                    // SAFETY: see emit_nlmsg.
                    unsafe { r.write(scratch.cast(), seq, MsgType::Del) };
                } else {
                    // SAFETY: see emit_nlmsg.
                    unsafe { chain.write(scratch.cast(), seq, MsgType::Del) };
                }
                drop(chain);
                self.emit(owner, |buf| buf.cast());
            }
            Op::AddRule(chain, rule) => self.push_rule(owner, chain, rule),
            Op::AddSet(def) => self.push_set(owner, def),
            Op::DelSet(name) => {
                let set = RawSet::new(self.table_name(), name);
                let seq = self.seq;
                // SAFETY: set is a valid nftnl_set; the header is built inside scratch.
                self.emit(owner, |buf| unsafe {
                    let nlh = sys::nftnl_nlmsg_build_hdr(buf, NFT_MSG_DELSET, libc::NFPROTO_IPV4 as u16, 0, seq);
                    sys::nftnl_set_nlmsg_build_payload(nlh, set.0.as_ptr());
                    nlh
                });
            }
            Op::AddElems(set, _, elems) => {
                for chunk in elems.chunks(ELEMS_PER_MSG) {
                    let s = RawSet::new(self.table_name(), set);
                    for (k, v) in chunk {
                        s.add_elem(&k.bytes(), v.as_ref(), false);
                    }
                    self.push_elems(owner, NFT_MSG_NEWSETELEM, libc::NLM_F_CREATE as u16, &s);
                }
            }
            Op::DelElems(set, _, keys) => {
                for chunk in keys.chunks(ELEMS_PER_MSG) {
                    let s = RawSet::new(self.table_name(), set);
                    for k in chunk {
                        s.add_elem(&k.bytes(), None, false);
                    }
                    self.push_elems(owner, NFT_MSG_DELSETELEM, 0, &s);
                }
            }
        }
    }

    fn table_name(&self) -> String {
        self.table.get_name().to_string_lossy().into_owned()
    }

    fn push_elems(&mut self, owner: u32, typ: u16, flags: u16, set: &RawSet) {
        let seq = self.seq;
        // SAFETY: set is a valid nftnl_set; at most ELEMS_PER_MSG small elements fit in scratch.
        self.emit(owner, |buf| unsafe {
            let nlh = sys::nftnl_nlmsg_build_hdr(buf, typ, libc::NFPROTO_IPV4 as u16, flags, seq);
            sys::nftnl_set_elems_nlmsg_build_payload(nlh, set.0.as_ptr());
            nlh
        });
    }

    fn push_set(&mut self, owner: u32, def: &SetDef) {
        let set = RawSet::new(self.table_name(), &def.name);
        let (flags, key_type, key_len, map, timeout) = match def.kind {
            SetKind::Addrs => (0, TYPE_IPADDR, 4, false, None),
            SetKind::Affinity { timeout_secs } => (NFT_SET_TIMEOUT | NFT_SET_EVAL, TYPE_IPADDR, 4, false, Some(timeout_secs)),
            SetKind::AddrProtoPortVmap => {
                (NFT_SET_MAP, (((TYPE_IPADDR << 6) | TYPE_INET_PROTOCOL) << 6) | TYPE_INET_SERVICE, 12, true, None)
            }
            SetKind::ProtoPortVmap => (NFT_SET_MAP, (TYPE_INET_PROTOCOL << 6) | TYPE_INET_SERVICE, 8, true, None),
            SetKind::AddrProtoPort => (0, (((TYPE_IPADDR << 6) | TYPE_INET_PROTOCOL) << 6) | TYPE_INET_SERVICE, 12, false, None),
            SetKind::ProtoPort => (0, (TYPE_INET_PROTOCOL << 6) | TYPE_INET_SERVICE, 8, false, None),
            SetKind::Hairpin => (0, HAIRPIN_TYPE, 20, false, None),
            SetKind::Endpoints => (NFT_SET_MAP, ENDPOINTS_TYPE, 16, false, None),
        };
        set.configure(flags, key_type, key_len, map, timeout.map(|t| u64::from(t) * 1000));
        if def.kind == SetKind::Endpoints {
            set.data_type((TYPE_IPADDR << 6) | TYPE_INET_SERVICE, 8);
        }
        // The kernel insists on a set id, even for named sets.
        self.next_set_id += 1;
        set.set_id(self.next_set_id);
        let mut udata = Vec::new();
        udata_u32(&mut udata, NFTNL_UDATA_SET_KEYBYTEORDER, BYTEORDER_BIG);
        if let Some(c) = &def.comment {
            udata_str(&mut udata, NFTNL_UDATA_SET_COMMENT, c);
        }
        set.set_udata(&udata);
        let seq = self.seq;
        // SAFETY: set is a valid nftnl_set; the header is built inside scratch.
        self.emit(owner, |buf| unsafe {
            let nlh = sys::nftnl_nlmsg_build_hdr(buf, NFT_MSG_NEWSET, libc::NFPROTO_IPV4 as u16, libc::NLM_F_CREATE as u16, seq);
            sys::nftnl_set_nlmsg_build_payload(nlh, set.0.as_ptr());
            nlh
        });
    }

    fn push_rule(&mut self, owner: u32, chain_name: &str, rule: &Rule) {
        let mut exprs = Vec::new();
        let mut anon = Vec::new();
        for s in &rule.0 {
            let (e, m) = encode_stmt(s, &mut self.next_set_id);
            exprs.extend(e);
            anon.extend(m);
        }
        for m in anon {
            let set = RawSet::new(self.table_name(), "__map%d");
            set.configure(NFT_SET_ANONYMOUS | NFT_SET_CONSTANT | NFT_SET_MAP, TYPE_INTEGER, 4, true, None);
            set.set_id(m.id);
            let mut udata = Vec::new();
            udata_u32(&mut udata, NFTNL_UDATA_SET_KEYBYTEORDER, BYTEORDER_HOST);
            set.set_udata(&udata);
            let seq = self.seq;
            // SAFETY: as in push_set.
            self.emit(owner, |buf| unsafe {
                let nlh = sys::nftnl_nlmsg_build_hdr(buf, NFT_MSG_NEWSET, libc::NFPROTO_IPV4 as u16, libc::NLM_F_CREATE as u16, seq);
                sys::nftnl_set_nlmsg_build_payload(nlh, set.0.as_ptr());
                nlh
            });
            let elems = RawSet::new(self.table_name(), "__map%d");
            elems.set_id(m.id);
            for (i, c) in m.chains.iter().enumerate() {
                elems.add_elem(&(i as u32).to_ne_bytes(), Some(&Value::Verdict(Verdict::Goto(c.clone()))), false);
            }
            self.push_elems(owner, NFT_MSG_NEWSETELEM, libc::NLM_F_CREATE as u16, &elems);
        }
        let name = cstring(chain_name);
        let chain = Chain::new(&name, &self.table);
        let mut r = nftnl::Rule::new(&chain);
        for e in &exprs {
            r.add_expr(e);
        }
        let _ = r.set_comment(cstring(&rule.tag()));
        let seq = self.seq;
        let scratch = self.scratch.as_mut_ptr();
        // SAFETY: see emit_nlmsg.
        unsafe { r.write(scratch.cast(), seq, MsgType::Add) };
        drop(r);
        drop(chain);
        self.emit(owner, |buf| buf.cast());
    }

    /// Closes the batch; returns the bytes and the op index of each message by sequence number.
    pub fn finish(mut self) -> FinishedBatch {
        let seq = self.seq;
        // SAFETY: scratch is large enough for a batch end message.
        self.emit(u32::MAX, |buf| unsafe { sys::nftnl_batch_end(buf, seq) });
        FinishedBatch { bytes: self.buf, first_seq: self.first_seq, owners: self.owners }
    }
}

pub struct FinishedBatch {
    pub bytes: Vec<u8>,
    first_seq: u32,
    owners: Vec<u32>,
}

impl FinishedBatch {
    /// Number of netlink messages, begin and end included.
    pub fn messages(&self) -> usize {
        self.owners.len()
    }

    fn owner_of(&self, seq: u32) -> Option<u32> {
        self.owners.get(seq.checked_sub(self.first_seq)? as usize).copied().filter(|o| *o != u32::MAX)
    }
}

fn udata_u32(buf: &mut Vec<u8>, typ: u8, v: u32) {
    buf.extend_from_slice(&[typ, 4]);
    buf.extend_from_slice(&v.to_ne_bytes());
}

fn udata_str(buf: &mut Vec<u8>, typ: u8, s: &str) {
    let mut b = s.as_bytes().to_vec();
    b.truncate(120);
    b.push(0);
    buf.extend_from_slice(&[typ, b.len() as u8]);
    buf.extend_from_slice(&b);
}

/// An owned `nftnl_set` (nftnl's `Set` is typed for plain keys only).
struct RawSet(NonNull<sys::nftnl_set>);

impl RawSet {
    fn new(table: String, name: &str) -> Self {
        // SAFETY: nftnl_set_alloc returns an owned set or NULL (checked); setters copy strings.
        unsafe {
            let Some(s) = NonNull::new(sys::nftnl_set_alloc()) else { std::process::abort() };
            let t = cstring(&table);
            let n = cstring(name);
            sys::nftnl_set_set_str(s.as_ptr(), sys::NFTNL_SET_TABLE as u16, t.as_ptr());
            sys::nftnl_set_set_str(s.as_ptr(), sys::NFTNL_SET_NAME as u16, n.as_ptr());
            sys::nftnl_set_set_u32(s.as_ptr(), sys::NFTNL_SET_FAMILY as u16, libc::NFPROTO_IPV4 as u32);
            RawSet(s)
        }
    }

    fn configure(&self, flags: u32, key_type: u32, key_len: u32, map: bool, timeout_ms: Option<u64>) {
        let s = self.0.as_ptr();
        // SAFETY: s is a valid set; these setters store plain integers.
        unsafe {
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FLAGS as u16, flags);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_TYPE as u16, key_type);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_LEN as u16, key_len);
            if map {
                sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DATA_TYPE as u16, NFT_DATA_VERDICT);
                sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DATA_LEN as u16, 0);
            }
            if let Some(t) = timeout_ms {
                sys::nftnl_set_set_u64(s, sys::NFTNL_SET_TIMEOUT as u16, t);
            }
        }
    }

    fn data_type(&self, typ: u32, len: u32) {
        // SAFETY: valid set; plain integers.
        unsafe {
            sys::nftnl_set_set_u32(self.0.as_ptr(), sys::NFTNL_SET_DATA_TYPE as u16, typ);
            sys::nftnl_set_set_u32(self.0.as_ptr(), sys::NFTNL_SET_DATA_LEN as u16, len);
        }
    }

    fn set_id(&self, id: u32) {
        // SAFETY: valid set; plain integer.
        unsafe { sys::nftnl_set_set_u32(self.0.as_ptr(), sys::NFTNL_SET_ID as u16, id) };
    }

    fn set_udata(&self, data: &[u8]) {
        // SAFETY: valid set; the data is copied.
        unsafe { sys::nftnl_set_set_data(self.0.as_ptr(), sys::NFTNL_SET_USERDATA as u16, data.as_ptr() as *const c_void, data.len() as u32) };
    }

    fn add_elem(&self, key: &[u8], value: Option<&Value>, interval_end: bool) {
        // SAFETY: nftnl_set_elem_alloc returns an owned element or NULL (checked); its setters
        // copy; nftnl_set_elem_add hands ownership to the set.
        unsafe {
            let Some(e) = NonNull::new(sys::nftnl_set_elem_alloc()) else { std::process::abort() };
            sys::nftnl_set_elem_set(e.as_ptr(), sys::NFTNL_SET_ELEM_KEY as u16, key.as_ptr() as *const c_void, key.len() as u32);
            if interval_end {
                sys::nftnl_set_elem_set_u32(e.as_ptr(), sys::NFTNL_SET_ELEM_FLAGS as u16, NFT_SET_ELEM_INTERVAL_END);
            }
            if let Some(Value::Target(ip, port)) = value {
                let mut d = ip.octets().to_vec();
                d.extend_from_slice(&port.to_be_bytes());
                d.extend_from_slice(&[0, 0]);
                sys::nftnl_set_elem_set(e.as_ptr(), sys::NFTNL_SET_ELEM_DATA as u16, d.as_ptr() as *const c_void, d.len() as u32);
            }
            if let Some(Value::Verdict(v)) = value {
                let (code, chain) = verdict_code(v);
                sys::nftnl_set_elem_set_u32(e.as_ptr(), sys::NFTNL_SET_ELEM_VERDICT as u16, code as u32);
                if let Some(c) = chain {
                    let c = cstring(c);
                    sys::nftnl_set_elem_set_str(e.as_ptr(), sys::NFTNL_SET_ELEM_CHAIN as u16, c.as_ptr());
                }
            }
            sys::nftnl_set_elem_add(self.0.as_ptr(), e.as_ptr());
        }
    }
}

impl Drop for RawSet {
    fn drop(&mut self) {
        // SAFETY: we own the set (and the elements added to it).
        unsafe { sys::nftnl_set_free(self.0.as_ptr()) };
    }
}

/// A `NETLINK_NETFILTER` socket in the calling thread's network namespace.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    pub fn open() -> Result<Socket, NetlinkError> {
        // SAFETY: plain socket(2); the result is checked and owned from here on.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_NETFILTER) };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_nl is valid (nl_pid 0: the kernel assigns one).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: sa is a valid sockaddr_nl of the given size.
        let r = unsafe { libc::bind(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, std::mem::size_of_val(&sa) as u32) };
        if r < 0 {
            return Err(io::Error::last_os_error().into());
        }
        let s = Socket { fd, seq: 0x4e_0000 };
        s.set_buf(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, 16 << 20);
        Ok(s)
    }

    fn set_buf(&self, force: i32, plain: i32, size: usize) {
        let v = i32::try_from(size).unwrap_or(i32::MAX);
        for opt in [force, plain] {
            // SAFETY: setsockopt with a pointer to an int of the stated size.
            let r = unsafe { libc::setsockopt(self.fd.as_raw_fd(), libc::SOL_SOCKET, opt, &v as *const i32 as *const c_void, 4) };
            if r == 0 {
                return;
            }
        }
    }

    /// Sends a batch. The kernel processes it synchronously inside sendmsg, so every error it
    /// reports is queued on the socket when sendmsg returns.
    pub fn send_batch(&mut self, batch: &FinishedBatch, describe: impl Fn(u32) -> String) -> Result<(), NetlinkError> {
        self.set_buf(libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, batch.bytes.len() + (1 << 16));
        let mut sa: libc::sockaddr_nl = unsafe_zeroed_sockaddr();
        sa.nl_family = libc::AF_NETLINK as u16;
        let mut iov = libc::iovec { iov_base: batch.bytes.as_ptr() as *mut c_void, iov_len: batch.bytes.len() };
        // SAFETY: a zeroed msghdr is valid; we fill in pointers that outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = &mut sa as *mut _ as *mut c_void;
        msg.msg_namelen = std::mem::size_of_val(&sa) as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        // SAFETY: msg points at valid buffers for the duration of the call.
        let r = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, 0) };
        if r < 0 {
            return Err(io::Error::last_os_error().into());
        }
        let mut errors = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: buf is writable for its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr() as *mut c_void, buf.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    break;
                }
                return Err(e.into());
            }
            for (hdr, payload) in messages(&buf[..n as usize]) {
                if hdr.nlmsg_type == libc::NLMSG_ERROR as u16 && payload.len() >= 4 {
                    let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    if code != 0 {
                        let what = batch.owner_of(hdr.nlmsg_seq).map(&describe).unwrap_or_else(|| "commit".into());
                        errors.push(format!("{what}: {}", io::Error::from_raw_os_error(-code)));
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            errors.truncate(5);
            Err(NetlinkError::Rejected(errors.join("; ")))
        }
    }

    /// Runs one dump request; `build` fills the payload. Returns every reply message (header
    /// included). Retries when the dump was interrupted by a concurrent change.
    fn dump(&mut self, typ: u16, build: impl Fn(*mut libc::nlmsghdr)) -> Result<Vec<Vec<u8>>, NetlinkError> {
        'retry: for _ in 0..5 {
            self.seq += 1;
            let seq = self.seq;
            let mut req = vec![0u8; 4096];
            // SAFETY: req has room for a header plus a small payload.
            let len = unsafe {
                let nlh = sys::nftnl_nlmsg_build_hdr(req.as_mut_ptr().cast(), typ, libc::NFPROTO_IPV4 as u16, (libc::NLM_F_DUMP | libc::NLM_F_ACK) as u16, seq);
                build(nlh);
                (*nlh).nlmsg_len as usize
            };
            // SAFETY: req[..len] is the request.
            let r = unsafe { libc::send(self.fd.as_raw_fd(), req.as_ptr() as *const c_void, len, 0) };
            if r < 0 {
                return Err(io::Error::last_os_error().into());
            }
            let mut out = Vec::new();
            let mut buf = vec![0u8; 1 << 17];
            loop {
                // SAFETY: buf is writable for its length.
                let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr() as *mut c_void, buf.len(), 0) };
                if n < 0 {
                    return Err(io::Error::last_os_error().into());
                }
                let mut done = false;
                let mut intr = false;
                for (hdr, payload) in messages(&buf[..n as usize]) {
                    if hdr.nlmsg_seq != seq {
                        continue;
                    }
                    if hdr.nlmsg_flags & libc::NLM_F_DUMP_INTR as u16 != 0 {
                        intr = true;
                    }
                    match hdr.nlmsg_type as i32 {
                        libc::NLMSG_DONE => done = true,
                        libc::NLMSG_ERROR => {
                            let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
                            if code == -libc::ENOENT {
                                return Ok(Vec::new());
                            }
                            if code != 0 {
                                return Err(io::Error::from_raw_os_error(-code).into());
                            }
                            done = true;
                        }
                        _ => {
                            let total = hdr.nlmsg_len as usize;
                            let start = payload.as_ptr() as usize - std::mem::size_of::<libc::nlmsghdr>();
                            // SAFETY: payload lies inside buf right after its header.
                            let whole = unsafe { std::slice::from_raw_parts(start as *const u8, total) };
                            out.push(whole.to_vec());
                        }
                    }
                }
                if done {
                    if intr {
                        continue 'retry;
                    }
                    return Ok(out);
                }
            }
        }
        Err(NetlinkError::Parse("dump kept being interrupted by concurrent changes".into()))
    }
}

fn unsafe_zeroed_sockaddr() -> libc::sockaddr_nl {
    // SAFETY: all-zero is a valid sockaddr_nl.
    unsafe { std::mem::zeroed() }
}

/// Splits a receive buffer into (header, payload) pairs.
fn messages(buf: &[u8]) -> Vec<(libc::nlmsghdr, &[u8])> {
    let mut out = Vec::new();
    let hl = std::mem::size_of::<libc::nlmsghdr>();
    let mut off = 0;
    while off + hl <= buf.len() {
        // SAFETY: at least hl bytes remain; read_unaligned copes with any alignment.
        let hdr: libc::nlmsghdr = unsafe { ptr::read_unaligned(buf[off..].as_ptr() as *const libc::nlmsghdr) };
        let len = hdr.nlmsg_len as usize;
        if len < hl || off + len > buf.len() {
            break;
        }
        out.push((hdr, &buf[off + hl..off + len]));
        off += (len + 3) & !3;
    }
    out
}

/// What the kernel has in our table, as far as the diff needs to know.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub table: bool,
    pub chains: HashMap<String, ObservedChain>,
    pub sets: HashMap<String, ObservedSet>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedChain {
    pub base: Option<BaseChain>,
    /// Each rule's fingerprint from its `netd:` comment (`None`: a rule we did not write).
    pub rules: Vec<Option<u64>>,
}

#[derive(Debug, Clone, Default)]
pub struct ObservedSet {
    pub kind: Option<SetKind>,
    pub elements: HashMap<ElemKey, Option<Value>>,
}

/// Reads our table back from the kernel.
pub fn observe(sock: &mut Socket, table: &str) -> Result<Observed, NetlinkError> {
    let mut obs = Observed::default();
    let tname = cstring(table);
    let tables = sock.dump(NFT_MSG_GETTABLE, |_| {})?;
    for m in &tables {
        // SAFETY: m is a complete NEWTABLE message from the kernel; the parsed object is freed.
        let name = unsafe {
            let t = sys::nftnl_table_alloc();
            let ok = sys::nftnl_table_nlmsg_parse(m.as_ptr() as *const libc::nlmsghdr, t) >= 0;
            let n = ok.then(|| CStr::from_ptr(sys::nftnl_table_get_str(t, sys::NFTNL_TABLE_NAME as u16)).to_owned());
            let fam = sys::nftnl_table_get_u32(t, sys::NFTNL_TABLE_FAMILY as u16);
            sys::nftnl_table_free(t);
            n.filter(|_| fam == libc::NFPROTO_IPV4 as u32)
        };
        if name.as_deref() == Some(tname.as_c_str()) {
            obs.table = true;
        }
    }
    if !obs.table {
        return Ok(obs);
    }
    let with_table = |nlh: *mut libc::nlmsghdr| {
        // SAFETY: appends a NFTA_*_TABLE string attribute (type 1 for chains, rules and sets)
        // to a request built in a 4 KiB buffer.
        unsafe { attr_strz(nlh, 1, &tname) };
    };
    for m in sock.dump(NFT_MSG_GETCHAIN, with_table)? {
        // SAFETY: as above for chains.
        unsafe {
            let c = sys::nftnl_chain_alloc();
            if sys::nftnl_chain_nlmsg_parse(m.as_ptr() as *const libc::nlmsghdr, c) >= 0 {
                let table_ok = CStr::from_ptr(sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_TABLE as u16)) == tname.as_c_str();
                let name = CStr::from_ptr(sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_NAME as u16)).to_string_lossy().into_owned();
                let base = if sys::nftnl_chain_is_set(c, sys::NFTNL_CHAIN_HOOKNUM as u16) {
                    let hook = match sys::nftnl_chain_get_u32(c, sys::NFTNL_CHAIN_HOOKNUM as u16) as i32 {
                        libc::NF_INET_PRE_ROUTING => Some(Hook::Prerouting),
                        libc::NF_INET_LOCAL_IN => Some(Hook::Input),
                        libc::NF_INET_FORWARD => Some(Hook::Forward),
                        libc::NF_INET_LOCAL_OUT => Some(Hook::Output),
                        libc::NF_INET_POST_ROUTING => Some(Hook::Postrouting),
                        _ => None,
                    };
                    let typ = sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_TYPE as u16);
                    let nat = !typ.is_null() && CStr::from_ptr(typ).to_bytes() == b"nat";
                    hook.map(|hook| BaseChain { nat, hook, priority: sys::nftnl_chain_get_s32(c, sys::NFTNL_CHAIN_PRIO as u16) })
                } else {
                    None
                };
                if table_ok {
                    obs.chains.insert(name, ObservedChain { base, rules: Vec::new() });
                }
            }
            sys::nftnl_chain_free(c);
        }
    }
    for m in sock.dump(NFT_MSG_GETRULE, with_table)? {
        // SAFETY: as above for rules; user data is read within its reported length.
        unsafe {
            let r = sys::nftnl_rule_alloc();
            if sys::nftnl_rule_nlmsg_parse(m.as_ptr() as *const libc::nlmsghdr, r) >= 0 {
                let chain = CStr::from_ptr(sys::nftnl_rule_get_str(r, sys::NFTNL_RULE_CHAIN as u16)).to_string_lossy().into_owned();
                let mut fp = None;
                if sys::nftnl_rule_is_set(r, sys::NFTNL_RULE_USERDATA as u16) {
                    let mut len = 0u32;
                    let p = sys::nftnl_rule_get_data(r, sys::NFTNL_RULE_USERDATA as u16, &mut len) as *const u8;
                    let ud = std::slice::from_raw_parts(p, len as usize);
                    fp = rule_fingerprint(ud);
                }
                if let Some(c) = obs.chains.get_mut(&chain) {
                    c.rules.push(fp);
                }
            }
            sys::nftnl_rule_free(r);
        }
    }
    let mut set_names = Vec::new();
    for m in sock.dump(NFT_MSG_GETSET, with_table)? {
        // SAFETY: as above for sets.
        unsafe {
            let s = sys::nftnl_set_alloc();
            if sys::nftnl_set_nlmsg_parse(m.as_ptr() as *const libc::nlmsghdr, s) >= 0 {
                let name = CStr::from_ptr(sys::nftnl_set_get_str(s, sys::NFTNL_SET_NAME as u16)).to_string_lossy().into_owned();
                let flags = sys::nftnl_set_get_u32(s, sys::NFTNL_SET_FLAGS as u16);
                let key_type = sys::nftnl_set_get_u32(s, sys::NFTNL_SET_KEY_TYPE as u16);
                let timeout = if sys::nftnl_set_is_set(s, sys::NFTNL_SET_TIMEOUT as u16) { sys::nftnl_set_get_u64(s, sys::NFTNL_SET_TIMEOUT as u16) } else { 0 };
                if flags & NFT_SET_ANONYMOUS == 0 {
                    let kind = if key_type == (((TYPE_IPADDR << 6) | TYPE_INET_PROTOCOL) << 6) | TYPE_INET_SERVICE && flags & NFT_SET_MAP != 0 {
                        Some(SetKind::AddrProtoPortVmap)
                    } else if key_type == (TYPE_INET_PROTOCOL << 6) | TYPE_INET_SERVICE && flags & NFT_SET_MAP != 0 {
                        Some(SetKind::ProtoPortVmap)
                    } else if key_type == TYPE_IPADDR && flags & NFT_SET_TIMEOUT != 0 {
                        Some(SetKind::Affinity { timeout_secs: (timeout / 1000) as u32 })
                    } else if key_type == TYPE_IPADDR && flags & NFT_SET_MAP == 0 {
                        Some(SetKind::Addrs)
                    } else if key_type == (((TYPE_IPADDR << 6) | TYPE_INET_PROTOCOL) << 6) | TYPE_INET_SERVICE {
                        Some(SetKind::AddrProtoPort)
                    } else if key_type == (TYPE_INET_PROTOCOL << 6) | TYPE_INET_SERVICE {
                        Some(SetKind::ProtoPort)
                    } else if key_type == HAIRPIN_TYPE {
                        Some(SetKind::Hairpin)
                    } else if key_type == ENDPOINTS_TYPE {
                        Some(SetKind::Endpoints)
                    } else {
                        None
                    };
                    set_names.push((name.clone(), kind));
                    obs.sets.insert(name, ObservedSet { kind, elements: HashMap::new() });
                }
            }
            sys::nftnl_set_free(s);
        }
    }
    for (name, kind) in set_names {
        // Affinity sets hold client addresses that come and go: their elements are not ours.
        let Some(kind) = kind.filter(|k| !matches!(k, SetKind::Affinity { .. })) else { continue };
        // A big set comes in many messages, each resuming the kernel's walk of its hash table
        // by count. While the kernel grows that table (in the background, after a big insert)
        // the order changes between messages, and a dump can miss or repeat elements: then it
        // is taken again until two in a row agree.
        let (mut elements, parts) = dump_set_elements(sock, &tname, &name, kind)?;
        if parts > 1 {
            for _ in 0..8 {
                std::thread::sleep(std::time::Duration::from_millis(20));
                let (again, _) = dump_set_elements(sock, &tname, &name, kind)?;
                if again == elements {
                    break;
                }
                elements = again;
            }
        }
        obs.sets.get_mut(&name).expect("inserted above").elements = elements;
    }
    Ok(obs)
}

/// One set's elements, and in how many netlink messages the kernel sent them.
fn dump_set_elements(sock: &mut Socket, tname: &CStr, name: &str, kind: SetKind) -> Result<(HashMap<ElemKey, Option<Value>>, usize), NetlinkError> {
    let cname = cstring(name);
    let msgs = sock.dump(NFT_MSG_GETSETELEM, |nlh| {
        // SAFETY: NFTA_SET_ELEM_LIST_TABLE = 1, NFTA_SET_ELEM_LIST_SET = 2.
        unsafe {
            attr_strz(nlh, 1, tname);
            attr_strz(nlh, 2, &cname);
        }
    })?;
    let mut elements = HashMap::new();
    let parts = msgs.len();
    for m in msgs {
        // SAFETY: as above; iterates the parsed elements and frees everything.
        unsafe {
            let s = sys::nftnl_set_alloc();
            if sys::nftnl_set_elems_nlmsg_parse(m.as_ptr() as *const libc::nlmsghdr, s) >= 0 {
                let it = sys::nftnl_set_elems_iter_create(s);
                let mut e = sys::nftnl_set_elems_iter_next(it);
                while !e.is_null() {
                    let mut len = 0u32;
                    let k = sys::nftnl_set_elem_get(e, sys::NFTNL_SET_ELEM_KEY as u16, &mut len) as *const u8;
                    let key = if k.is_null() { None } else { ElemKey::from_bytes(kind, std::slice::from_raw_parts(k, len as usize)) };
                    let mut dlen = 0u32;
                    let d = if sys::nftnl_set_elem_is_set(e, sys::NFTNL_SET_ELEM_DATA as u16) { sys::nftnl_set_elem_get(e, sys::NFTNL_SET_ELEM_DATA as u16, &mut dlen) as *const u8 } else { std::ptr::null() };
                    let target = if d.is_null() || dlen < 6 {
                        None
                    } else {
                        let d = std::slice::from_raw_parts(d, dlen as usize);
                        Some(Value::Target(std::net::Ipv4Addr::new(d[0], d[1], d[2], d[3]), u16::from_be_bytes([d[4], d[5]])))
                    };
                    let verdict = if sys::nftnl_set_elem_is_set(e, sys::NFTNL_SET_ELEM_VERDICT as u16) {
                        let code = sys::nftnl_set_elem_get_u32(e, sys::NFTNL_SET_ELEM_VERDICT as u16) as i32;
                        let chain = if sys::nftnl_set_elem_is_set(e, sys::NFTNL_SET_ELEM_CHAIN as u16) {
                            CStr::from_ptr(sys::nftnl_set_elem_get_str(e, sys::NFTNL_SET_ELEM_CHAIN as u16)).to_string_lossy().into_owned()
                        } else {
                            String::new()
                        };
                        Some(Value::Verdict(match code {
                            NF_ACCEPT => Verdict::Accept,
                            NF_DROP => Verdict::Drop,
                            NFT_JUMP => Verdict::Jump(chain),
                            NFT_GOTO => Verdict::Goto(chain),
                            _ => Verdict::Return,
                        }))
                    } else {
                        target
                    };
                    if let Some(key) = key {
                        elements.insert(key, verdict);
                    }
                    e = sys::nftnl_set_elems_iter_next(it);
                }
                sys::nftnl_set_elems_iter_destroy(it);
            }
            sys::nftnl_set_free(s);
        }
    }
    Ok((elements, parts))
}


/// Appends a NUL-terminated string attribute to a request.
///
/// # Safety
/// `nlh` must point at a message in a buffer with room for the attribute.
unsafe fn attr_strz(nlh: *mut libc::nlmsghdr, typ: u16, s: &CStr) {
    let bytes = s.to_bytes_with_nul();
    // SAFETY: the caller guarantees room; the attribute is written at the aligned end.
    unsafe {
        let len = (*nlh).nlmsg_len as usize;
        let aligned = (len + 3) & !3;
        let base = (nlh as *mut u8).add(aligned);
        let alen = 4 + bytes.len();
        ptr::write_unaligned(base as *mut u16, alen as u16);
        ptr::write_unaligned(base.add(2) as *mut u16, typ);
        ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(4), bytes.len());
        (*nlh).nlmsg_len = (aligned + ((alen + 3) & !3)) as u32;
    }
}

/// The fingerprint in a rule's user data (`netd:<16 hex digits>` comment), if any.
fn rule_fingerprint(ud: &[u8]) -> Option<u64> {
    let mut i = 0;
    while i + 2 <= ud.len() {
        let (typ, len) = (ud[i], ud[i + 1] as usize);
        let val = ud.get(i + 2..i + 2 + len)?;
        if typ == NFTNL_UDATA_RULE_COMMENT {
            let s = std::str::from_utf8(val).ok()?.trim_end_matches('\0');
            return u64::from_str_radix(s.strip_prefix("netd:")?, 16).ok();
        }
        i += 2 + len;
    }
    None
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_read_back_from_user_data() {
        let tag = b"netd:00000000000000ff\0";
        let mut ud = vec![0u8, tag.len() as u8];
        ud.extend_from_slice(tag);
        assert_eq!(rule_fingerprint(&ud), Some(255));
        assert_eq!(rule_fingerprint(b"\x00\x03ab\0"), None);
    }

    #[test]
    fn batches_encode_without_root() {
        let set = SetDef { name: "service-ips".into(), kind: SetKind::AddrProtoPortVmap, comment: None };
        let chain = ChainDef { name: "svc-a".into(), base: None, rules: vec![] };
        let rule = Rule(vec![Stmt::NumgenVmap(vec!["a".into(), "b".into()])]);
        let ops = [
            Op::AddTable,
            Op::AddSet(&set),
            Op::AddChain(&chain),
            Op::AddRule("svc-a", &rule),
            Op::AddElems("service-ips".into(), SetKind::AddrProtoPortVmap, vec![(ElemKey::AddrProtoPort("10.96.0.1".parse().unwrap(), crate::Proto::Tcp, 80), Some(Value::Verdict(Verdict::Goto("svc-a".into()))))]),
        ];
        let mut b = BatchBuilder::new("t");
        for (i, op) in ops.iter().enumerate() {
            b.push(i as u32, op);
        }
        let fin = b.finish();
        // begin, table, set, chain, anon map, its elements, rule, elements, end
        assert_eq!(fin.messages(), 9);
        assert_eq!(messages(&fin.bytes).len(), 9);
        assert!(messages(&fin.bytes).iter().all(|(h, _)| h.nlmsg_flags & libc::NLM_F_ACK as u16 == 0 || h.nlmsg_type == 0x11));
    }
}
