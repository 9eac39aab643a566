//! The cluster zone: Services and EndpointSlices turned into DNS records per the Kubernetes
//! DNS-Based Service Discovery specification 1.1.0, and every answer encoded once, up front.
//!
//! [`build_zone`] is pure: it derives a record model from the objects, then encodes one complete
//! response message per (name, type) that has data. [`ZoneBuilder`] does the same incrementally
//! (per Service, see [`builder`]) for a server that follows a changing registry. The server only patches the ID and flags,
//! copies the client's question (to keep its letter case) and appends OPT — see
//! [`crate::answer`]. Names that do not exist, and names that exist without the asked type, are
//! answered NXDOMAIN / NODATA with the zone's SOA, built on the fly (they need no lookup table).
//!
//! What is in the zone (`<zone>` is `--cluster-domain`), following CoreDNS where the
//! specification leaves room:
//!
//! | name | records |
//! | --- | --- |
//! | `<zone>` | SOA, NS `ns.dns.<zone>` |
//! | `ns.dns.<zone>` | A/AAAA of the cluster DNS service IP(s) |
//! | `dns-version.<zone>` | TXT `"1.1.0"` |
//! | `<svc>.<ns>.svc.<zone>` | ClusterIP: A/AAAA of the cluster IPs; headless: A/AAAA of the ready endpoints (no name at all when none is ready); ExternalName: CNAME; SRV for every port |
//! | `_<port>._<proto>.<svc>.<ns>.svc.<zone>` | SRV per named port (per ready endpoint for headless), targets' A/AAAA in the additional section |
//! | `<hostname>.<svc>.<ns>.svc.<zone>` | A/AAAA of a ready endpoint; the hostname is the endpoint's `hostname` or its dashed IP (`10-244-1-5`) |
//! | `<a-b-c-d>.<ns>.pod.<zone>` | A (AAAA for dashed IPv6), answered for any well-formed IP ("pods insecure") |
//! | reverse names of cluster IPs and endpoint IPs | PTR to the service / endpoint name |
//!
//! `svc.<zone>`, `pod.<zone>`, `dns.<zone>` and `<ns>.svc.<zone>` exist without data: NODATA.
//! A namespace exists when netd knows an object in it (a Service or an EndpointSlice; netd does
//! not watch Namespace objects, which is what CoreDNS checks), so `<ns>.svc.<zone>` is NODATA for
//! such a namespace and NXDOMAIN for any other, like CoreDNS; a missing service in an existing
//! namespace is NXDOMAIN too. `<ns>.pod.<zone>` and pod names are answered for any namespace
//! (pods are not known to netd; answering NXDOMAIN for a namespace that has pods but no Service
//! would break lookups that CoreDNS answers). Every other name under `<zone>` is NXDOMAIN.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, OpCode, Query as HQuery, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use rustc_hash::FxBuildHasher;

use crate::wire::{self, ty, RrIter, HEADER_LEN};

mod builder;
mod names;

pub use builder::ZoneBuilder;
pub(crate) use names::{Names, NamesMut};

/// Version of the Kubernetes DNS schema served at `dns-version.<zone>`.
pub const DNS_SCHEMA_VERSION: &str = "1.1.0";
/// TTL of the `dns-version` TXT record (CoreDNS uses the same).
const DNS_VERSION_TTL: u32 = 28800;
/// The label EndpointSlices name their Service with.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the zone is built from besides the objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneConfig {
    /// The cluster domain (`cluster.local`).
    pub domain: String,
    /// TTL of positive answers, seconds.
    pub ttl: u32,
    /// TTL (and SOA minimum) of negative answers, seconds.
    pub negative_ttl: u32,
    /// The cluster DNS service IP(s), served as `ns.dns.<zone>`.
    pub dns_ips: Vec<IpAddr>,
    /// SOA serial; `None` uses the current Unix time (what CoreDNS does).
    pub serial: Option<u32>,
}

impl Default for ZoneConfig {
    fn default() -> Self {
        ZoneConfig {
            domain: "cluster.local".into(),
            ttl: 30,
            negative_ttl: 5,
            dns_ips: Vec::new(),
            serial: None,
        }
    }
}

/// Counts describing a built zone (for logs and status).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ZoneStats {
    pub services: usize,
    pub headless: usize,
    pub external_names: usize,
    /// Distinct ready endpoint addresses published.
    pub endpoints: usize,
    /// Names with precomputed answers or known to exist.
    pub names: usize,
    pub records: usize,
    /// Objects (or parts) left out, with the reason.
    pub skipped: Vec<String>,
}

/// One precomputed response message: ID 0, question in lower case, flags QR|AA|rcode.
#[derive(Debug, Clone)]
pub(crate) struct Packed {
    pub bytes: Box<[u8]>,
    /// End of the question section.
    pub qend: usize,
    /// Length of the message without its additional section (ARCOUNT must then be 0).
    pub no_additional_len: usize,
    /// Answers that may be rotated (round robin): equal-size A/AAAA records.
    pub rotate: Option<Rotate>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Rotate {
    pub start: usize,
    pub rr_len: usize,
    pub count: usize,
}

/// How a name behaves for types without a precomputed answer.
#[derive(Debug, Clone)]
pub(crate) enum Kind {
    /// Inside the cluster zone: NODATA.
    Zone,
    /// A reverse name we know PTRs for: other types go upstream, like CoreDNS's fallthrough.
    Reverse,
    /// ExternalName whose CNAME chain leaves the zone: the target is resolved upstream.
    External(Arc<External>),
}

/// An ExternalName service whose target is outside the cluster zone.
#[derive(Debug)]
pub(crate) struct External {
    /// The CNAME records from the queried name to `target` (one, or more through other
    /// ExternalName services in the zone).
    pub chain: Vec<Record>,
    /// The name resolved upstream, lower-case wire format.
    pub target: Box<[u8]>,
}

/// Kept inline in the name table (one cache miss less per query than behind a pointer);
/// cloning it, when an update copies a shard, only bumps reference counts (but for the
/// ExternalName fallback).
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub answers: Arc<[(u16, Packed)]>,
    pub kind: Kind,
    /// For ExternalName names, the response to types without an answer of their own: the
    /// CNAME chain (with the SOA when the chain ends at an in-zone name without that type).
    pub fallback: Option<Packed>,
    /// The name's records, in type order: for the zone file, and for chasing CNAMEs.
    pub rrs: Arc<[Record]>,
}

impl Entry {
    #[inline]
    pub fn answer(&self, qtype: u16) -> Option<&Packed> {
        self.answers.iter().find(|(t, _)| *t == qtype).map(|(_, p)| p)
    }
}

/// The precomputed cluster zone. Immutable; the server swaps whole zones atomically. Zones
/// made one after the other by a [`ZoneBuilder`] share the parts of their name table that did
/// not change.
pub struct Zone {
    pub(crate) apex: Box<[u8]>,
    pub(crate) names: Names,
    pub(crate) ttl: u32,
    pub(crate) negative_ttl: u32,
    pub(crate) serial: u32,
    pub(crate) synced: bool,
    domain: Name,
    stats: ZoneStats,
}

impl std::fmt::Debug for Zone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zone")
            .field("domain", &self.domain.to_string())
            .field("serial", &self.serial)
            .field("synced", &self.synced)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Zone {
    /// A zone with no data that answers SERVFAIL for every name in the cluster domain: what
    /// the server serves until the first snapshot arrives (rather than NXDOMAINs that clients
    /// would cache).
    pub fn pending(cfg: &ZoneConfig) -> Zone {
        let b = ZoneBuilder::new(cfg.clone());
        Zone {
            apex: b.apex.clone(),
            names: NamesMut::new().snapshot(),
            ttl: cfg.ttl,
            negative_ttl: cfg.negative_ttl,
            serial: b.serial_now(),
            synced: false,
            domain: b.domain.clone(),
            stats: ZoneStats::default(),
        }
    }

    /// The cluster domain, fully qualified (`cluster.local.`).
    pub fn domain(&self) -> String {
        self.domain.to_string()
    }

    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// False for [`Zone::pending`].
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    pub fn stats(&self) -> &ZoneStats {
        &self.stats
    }

    /// The zone in master-file format (RFC 1035 §5): the cluster domain's records, SOA first,
    /// then names in (wire-format) order. Reverse records and pod names (which are computed per
    /// query) are not included. Used to load the same data into other servers for comparison
    /// (bench/dns).
    pub fn to_zone_file(&self) -> String {
        let mut names: Vec<(&[u8], &Entry)> = self.names.iter().collect();
        names.sort_unstable_by_key(|(k, _)| *k);
        let mut s = String::new();
        let _ = writeln!(s, "$ORIGIN {}", self.domain);
        for (_, e) in &names {
            for r in e.rrs.iter().filter(|r| r.record_type() == RecordType::SOA) {
                let _ = writeln!(s, "{r}");
            }
        }
        for (_, e) in &names {
            for r in e.rrs.iter() {
                if r.record_type() != RecordType::SOA && self.domain.zone_of(r.name()) {
                    let _ = writeln!(s, "{r}");
                }
            }
        }
        s
    }
}

/// Builds the zone from Services and EndpointSlices (any order; slices are matched to their
/// Service by the `kubernetes.io/service-name` label). Pure except for the SOA serial when
/// `cfg.serial` is `None`. A server that follows a changing registry keeps a [`ZoneBuilder`]
/// instead, which redoes only the services that changed.
pub fn build_zone(cfg: &ZoneConfig, services: &[Service], slices: &[EndpointSlice]) -> Zone {
    let services: Vec<Arc<Service>> = services.iter().cloned().map(Arc::new).collect();
    let slices: Vec<Arc<EndpointSlice>> = slices.iter().cloned().map(Arc::new).collect();
    let mut b = ZoneBuilder::new(cfg.clone());
    let z = b.update(&services, &slices);
    drop(b);
    Arc::try_unwrap(z).unwrap_or_else(|z| Zone {
        apex: z.apex.clone(),
        names: z.names.clone(),
        ttl: z.ttl,
        negative_ttl: z.negative_ttl,
        serial: z.serial,
        synced: z.synced,
        domain: z.domain.clone(),
        stats: z.stats.clone(),
    })
}

/// What one Service contributes to the zone, before encoding: the names under
/// `<svc>.<ns>.svc.<zone>` (no other service's names can fall there), and what is merged with
/// other services' contributions: PTRs, endpoint addresses, the ExternalName target.
pub(crate) struct Fragment {
    pub model: Model,
    pub reverse: Vec<(IpAddr, Name)>,
    pub endpoints: Vec<IpAddr>,
    pub skipped: Vec<String>,
    /// Counted as a service / headless / ExternalName in [`ZoneStats`].
    pub counted: bool,
    pub headless: bool,
    /// ExternalName: (the service's name, its target).
    pub external: Option<(Name, Name)>,
}

/// The records of one Service (and its EndpointSlices) per the Kubernetes DNS specification.
/// `ns` and `name` are the object's, already checked to be lowercase labels.
pub(crate) fn service_fragment(apex: &Name, ttl: u32, ns: &str, name: &str, svc: &Service, slices: &[&EndpointSlice]) -> Fragment {
    let mut m = Model::new(apex.clone());
    let mut f = Fragment {
        model: Model::new(apex.clone()),
        reverse: Vec::new(),
        endpoints: Vec::new(),
        skipped: Vec::new(),
        counted: false,
        headless: false,
        external: None,
    };
    let Some(spec) = &svc.spec else {
        f.skipped.push(format!("service {ns}/{name}: no spec"));
        return f;
    };
    let svc_name = m.child(&[name, ns, "svc"]);
    f.counted = true;

    if spec.type_.as_deref() == Some("ExternalName") {
        let target = spec.external_name.as_deref().unwrap_or("").trim();
        if target.is_empty() || target.parse::<IpAddr>().is_ok() {
            f.skipped.push(format!("service {ns}/{name}: ExternalName {target:?} is not a host name"));
            f.model = m;
            return f;
        }
        match Name::from_ascii(target) {
            Ok(mut t) if t.num_labels() > 0 => {
                t.set_fqdn(true);
                let t = t.to_lowercase();
                m.add(Record::from_rdata(svc_name.clone(), ttl, RData::CNAME(CNAME(t.clone()))));
                f.external = Some((svc_name, t));
            }
            _ => f.skipped.push(format!("service {ns}/{name}: ExternalName {target:?} is not a valid name")),
        }
        f.model = m;
        return f;
    }

    let ips = cluster_ips(spec);
    let headless = spec.cluster_ip.as_deref() == Some("None")
        || spec.cluster_ips.as_ref().is_some_and(|v| v.iter().any(|s| s == "None"));
    f.headless = headless;
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let eps = endpoints_of(slices, publish_not_ready, &mut f.skipped, ns, name);
    f.endpoints = eps.iter().map(|e| e.ip).collect();

    // Endpoint names and PTRs, for every ready endpoint (CoreDNS serves them for ClusterIP
    // services too).
    let mut ep_names: Vec<Name> = Vec::with_capacity(eps.len());
    for ep in &eps {
        let epn = m.name_under(&ep.label, &svc_name);
        m.add(addr_record(&epn, ttl, ep.ip));
        f.reverse.push((ep.ip, epn.clone()));
        ep_names.push(epn);
    }

    if !headless {
        if ips.is_empty() {
            f.skipped.push(format!("service {ns}/{name}: no cluster IP yet"));
            f.model = m;
            return f;
        }
        for ip in &ips {
            m.add(addr_record(&svc_name, ttl, *ip));
            f.reverse.push((*ip, svc_name.clone()));
        }
        let ports = spec.ports.as_deref().unwrap_or(&[]);
        let mut bare: BTreeSet<u16> = BTreeSet::new();
        for p in ports {
            let Ok(port) = u16::try_from(p.port) else { continue };
            bare.insert(port);
            if let (Some(pname), Some(proto)) = (p.name.as_deref().filter(|n| !n.is_empty()), proto_label(p.protocol.as_deref())) {
                if !valid_label(pname) {
                    f.skipped.push(format!("service {ns}/{name}: port name {pname:?} is not a valid label"));
                    continue;
                }
                let srv_name = m.name_under2(&format!("_{}", pname.to_ascii_lowercase()), &format!("_{proto}"), &svc_name);
                m.add(Record::from_rdata(srv_name, ttl, RData::SRV(SRV::new(0, 100, port, svc_name.clone()))));
            }
        }
        let w = srv_weight(bare.len());
        for port in bare {
            m.add(Record::from_rdata(svc_name.clone(), ttl, RData::SRV(SRV::new(0, w, port, svc_name.clone()))));
        }
    } else {
        if eps.is_empty() {
            // CoreDNS: a headless service without ready endpoints does not exist.
            f.model = m;
            return f;
        }
        for ep in &eps {
            m.add(addr_record(&svc_name, ttl, ep.ip));
        }
        let mut bare: Vec<(u16, &Name)> = Vec::new();
        let mut named: BTreeMap<(String, &'static str), Vec<(u16, &Name)>> = BTreeMap::new();
        for (ep, epn) in eps.iter().zip(&ep_names) {
            for (pname, proto, port) in &ep.ports {
                if !bare.contains(&(*port, epn)) {
                    bare.push((*port, epn));
                }
                if !pname.is_empty() {
                    let v = named.entry((pname.clone(), proto)).or_default();
                    if !v.contains(&(*port, epn)) {
                        v.push((*port, epn));
                    }
                }
            }
        }
        let w = srv_weight(bare.len());
        for (port, target) in &bare {
            m.add(Record::from_rdata(svc_name.clone(), ttl, RData::SRV(SRV::new(0, w, *port, (*target).clone()))));
        }
        for ((pname, proto), targets) in named {
            if !valid_label(&pname) {
                continue;
            }
            let srv_name = m.name_under2(&format!("_{pname}"), &format!("_{proto}"), &svc_name);
            let w = srv_weight(targets.len());
            for (port, target) in targets {
                m.add(Record::from_rdata(srv_name.clone(), ttl, RData::SRV(SRV::new(0, w, port, target.clone()))));
            }
        }
    }
    f.model = m;
    f
}

/// A ready endpoint address of one service, ports merged across slices.
struct Ep {
    ip: IpAddr,
    label: String,
    /// (port name, protocol label, port)
    ports: Vec<(String, &'static str, u16)>,
}

fn endpoints_of(
    slices: &[&EndpointSlice],
    publish_not_ready: bool,
    skipped: &mut Vec<String>,
    ns: &str,
    name: &str,
) -> Vec<Ep> {
    let mut out: BTreeMap<IpAddr, Ep> = BTreeMap::new();
    for s in slices {
        let v6 = match s.address_type.as_str() {
            "IPv4" => false,
            "IPv6" => true,
            _ => continue,
        };
        let ports: Vec<(String, &'static str, u16)> = s
            .ports
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .filter_map(|p| {
                let port = u16::try_from(p.port?).ok()?;
                let proto = proto_label(p.protocol.as_deref())?;
                Some((p.name.clone().unwrap_or_default().to_ascii_lowercase(), proto, port))
            })
            .collect();
        for e in &s.endpoints {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready && !publish_not_ready {
                continue;
            }
            let hostname = e.hostname.as_deref().filter(|h| !h.is_empty());
            if let Some(h) = hostname {
                if !valid_label(h) {
                    skipped.push(format!("service {ns}/{name}: endpoint hostname {h:?} is not a valid label"));
                }
            }
            for a in &e.addresses {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    skipped.push(format!("service {ns}/{name}: endpoint address {a:?} is not an IP"));
                    continue;
                };
                if ip.is_ipv6() != v6 {
                    continue;
                }
                let label = match hostname {
                    Some(h) if valid_label(h) => h.to_ascii_lowercase(),
                    _ => dashed(ip),
                };
                let ep = out.entry(ip).or_insert_with(|| Ep { ip, label, ports: Vec::new() });
                for p in &ports {
                    if !ep.ports.contains(p) {
                        ep.ports.push(p.clone());
                    }
                }
            }
        }
    }
    out.into_values().collect()
}

fn cluster_ips(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().filter_map(|s| s.parse().ok()).collect(),
        _ => spec.cluster_ip.iter().filter_map(|s| s.parse().ok()).collect(),
    };
    v.dedup();
    v
}

/// CoreDNS's SRV weight: 100 shared evenly, at least 1.
fn srv_weight(n: usize) -> u16 {
    if n == 0 {
        return 100;
    }
    ((100 / n) as u16).max(1)
}

fn proto_label(p: Option<&str>) -> Option<&'static str> {
    match p.unwrap_or("TCP") {
        "TCP" => Some("tcp"),
        "UDP" => Some("udp"),
        "SCTP" => Some("sctp"),
        _ => None,
    }
}

/// An RFC 1123 label (letters, digits, hyphens; not starting or ending with a hyphen).
pub(crate) fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// `10.244.1.5` → `10-244-1-5`; `fd00::5` → `fd00--5` (CoreDNS's endpoint names).
pub(crate) fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

fn addr_record(name: &Name, ttl: u32, ip: IpAddr) -> Record {
    match ip {
        IpAddr::V4(v4) => Record::from_rdata(name.clone(), ttl, RData::A(A(v4))),
        IpAddr::V6(v6) => Record::from_rdata(name.clone(), ttl, RData::AAAA(AAAA(v6))),
    }
}

pub(crate) fn soa_record(apex: &Name, negative_ttl: u32, serial: u32) -> Record {
    let mname = Name::from_ascii("ns.dns").expect("static").append_domain(apex).expect("short");
    let rname = Name::from_ascii("hostmaster").expect("static").append_domain(apex).expect("short");
    Record::from_rdata(
        apex.clone(),
        negative_ttl,
        RData::SOA(SOA::new(mname, rname, serial, 7200, 1800, 86400, negative_ttl)),
    )
}

/// The reverse-lookup name of an address (`5.1.244.10.in-addr.arpa.`).
pub(crate) fn reverse_name(ip: IpAddr) -> Name {
    let s = match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(72);
            for b in v6.octets().iter().rev() {
                let _ = write!(s, "{:x}.{:x}.", b & 0xf, b >> 4);
            }
            s.push_str("ip6.arpa.");
            s
        }
    };
    Name::from_ascii(&s).expect("reverse names are valid")
}

/// Lower-case wire form of a name.
pub(crate) fn wire_name(n: &Name) -> Vec<u8> {
    let mut v = Vec::with_capacity(n.len() + 2);
    for l in n.iter() {
        v.push(l.len() as u8);
        v.extend(l.iter().map(|b| b.to_ascii_lowercase()));
    }
    v.push(0);
    v
}

/// A Kubernetes object name that is also a DNS label: RFC 1123, lower case (what the API
/// server enforces for namespaces and Services). Upper case is refused rather than folded so
/// that two objects can never claim the same DNS name.
pub(crate) fn valid_object_label(s: &str) -> bool {
    valid_label(s) && !s.bytes().any(|b| b.is_ascii_uppercase())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameKind {
    Zone,
    Reverse,
}

pub(crate) struct NameData {
    name: Name,
    kind: NameKind,
    rrs: BTreeMap<u16, Vec<Record>>,
    /// For each type with more than [`LINEAR_DEDUP`] records: the [`data_key`]s of its records.
    index: HashMap<u16, HashSet<Box<[u8]>, FxBuildHasher>, FxBuildHasher>,
}

/// Up to this many records of one type, a record being added is compared with each; beyond,
/// it is looked up in an index of their data. One name can have thousands of records (the
/// PTRs of an endpoint address that thousands of services share), and comparing each with all
/// before it made building that name quadratic.
const LINEAR_DEDUP: usize = 8;

impl NameData {
    /// Adds `r` to the set of its type unless a record with equal data is there already; the
    /// set keeps the order records were first added in. Returns how many records it scanned.
    fn insert(&mut self, r: Record) -> usize {
        let t = u16::from(r.record_type());
        let set = self.rrs.entry(t).or_default();
        if set.len() >= LINEAR_DEDUP {
            if let Some(key) = data_key(r.data()) {
                let mut scanned = 1;
                let index = self.index.entry(t).or_insert_with(|| {
                    scanned += set.len();
                    set.iter().filter_map(|x| data_key(x.data())).collect()
                });
                if index.insert(key) {
                    set.push(r);
                }
                return scanned;
            }
        }
        let scanned = set.len();
        if !set.iter().any(|x| x.data() == r.data()) {
            set.push(r);
        }
        scanned
    }
}

/// A record's data as bytes that are equal exactly when the data are by `RData`'s equality
/// (names compare case-insensitively; an absolute name differs from a relative one). `None`
/// for the types the zone has a single record of (SOA, TXT), which are compared directly.
fn data_key(d: &RData) -> Option<Box<[u8]>> {
    fn name(k: &mut Vec<u8>, n: &Name) {
        k.extend_from_slice(&wire_name(n));
        k.push(u8::from(n.is_fqdn()));
    }
    let mut k = Vec::with_capacity(64);
    match d {
        RData::A(a) => k.extend_from_slice(&a.0.octets()),
        RData::AAAA(a) => k.extend_from_slice(&a.0.octets()),
        RData::NS(n) => name(&mut k, &n.0),
        RData::CNAME(n) => name(&mut k, &n.0),
        RData::PTR(n) => name(&mut k, &n.0),
        RData::SRV(srv) => {
            for v in [srv.priority(), srv.weight(), srv.port()] {
                k.extend_from_slice(&v.to_be_bytes());
            }
            name(&mut k, srv.target());
        }
        _ => return None,
    }
    Some(k.into_boxed_slice())
}

/// A record model: names with their record sets, keyed by lower-case wire name. One per
/// Service (and one for the zone's fixed names, one per reverse name); [`Model::encode`] turns
/// it into [`Entry`]s.
pub(crate) struct Model {
    apex: Name,
    names: BTreeMap<Vec<u8>, NameData>,
    /// Records scanned (compared, or looked up or indexed) to find duplicates: the tests bound
    /// it by a constant per record added.
    scanned: usize,
}

impl Model {
    pub fn new(apex: Name) -> Self {
        Model { apex, names: BTreeMap::new(), scanned: 0 }
    }

    /// `labels...` under the apex.
    pub fn child(&self, labels: &[&str]) -> Name {
        let mut n = Name::from_labels(labels.iter().map(|l| l.as_bytes())).expect("valid labels");
        n = n.append_domain(&self.apex).expect("short names");
        n
    }

    fn name_under(&self, label: &str, parent: &Name) -> Name {
        Name::from_labels([label.as_bytes()]).expect("valid label").append_domain(parent).expect("short")
    }

    fn name_under2(&self, l1: &str, l2: &str, parent: &Name) -> Name {
        Name::from_labels([l1.as_bytes(), l2.as_bytes()]).expect("valid labels").append_domain(parent).expect("short")
    }

    pub fn touch(&mut self, name: &Name, kind: NameKind) -> &mut NameData {
        self.names.entry(wire_name(name)).or_insert_with(|| NameData { name: name.to_lowercase(), kind, rrs: BTreeMap::new(), index: HashMap::default() })
    }

    pub fn add(&mut self, r: Record) {
        let scanned = self.touch(&r.name().clone(), NameKind::Zone).insert(r);
        self.scanned += scanned;
    }

    pub fn add_reverse(&mut self, ip: IpAddr, ttl: u32, target: &Name) {
        let rn = reverse_name(ip);
        let r = Record::from_rdata(rn.clone(), ttl, RData::PTR(PTR(target.clone())));
        let scanned = self.touch(&rn, NameKind::Reverse).insert(r);
        self.scanned += scanned;
    }

    /// Records in the model.
    pub fn records(&self) -> usize {
        self.names.values().map(|d| d.rrs.values().map(Vec::len).sum::<usize>()).sum()
    }

    /// A/AAAA records of `name` (for SRV additional sections).
    fn addresses(&self, name: &Name) -> Vec<Record> {
        let Some(d) = self.names.get(&wire_name(name)) else { return Vec::new() };
        let mut v = Vec::new();
        for t in [ty::A, ty::AAAA] {
            if let Some(s) = d.rrs.get(&t) {
                v.extend(s.iter().cloned());
            }
        }
        v
    }

    /// One [`Entry`] per name: a response per record type. SRV targets and the NS target must
    /// be names of this model (their addresses go to the additional section).
    pub fn encode(self, skipped: &mut Vec<String>) -> Vec<(Box<[u8]>, Entry)> {
        let mut answers_of: Vec<Vec<(u16, Packed)>> = Vec::with_capacity(self.names.len());
        for d in self.names.values() {
            let mut answers: Vec<(u16, Packed)> = Vec::new();
            for (t, set) in &d.rrs {
                let mut additional = Vec::new();
                if *t == ty::SRV {
                    let mut seen = BTreeSet::new();
                    for r in set {
                        if let RData::SRV(srv) = r.data() {
                            if seen.insert(srv.target().clone()) {
                                additional.extend(self.addresses(srv.target()));
                            }
                        }
                    }
                } else if *t == ty::NS {
                    additional.extend(self.addresses(&Name::from_ascii("ns.dns").expect("static").append_domain(&self.apex).expect("short")));
                }
                match pack_fast(&d.name, *t, set, &[], &additional, ResponseCode::NoError) {
                    Some(p) => answers.push((*t, p)),
                    None => skipped.push(format!("{} {}: answer does not fit a message", d.name, t)),
                }
            }
            answers_of.push(answers);
        }
        self.names
            .into_iter()
            .zip(answers_of)
            .map(|((key, d), answers)| {
                let kind = match d.kind {
                    NameKind::Zone => Kind::Zone,
                    NameKind::Reverse => Kind::Reverse,
                };
                let rrs: Arc<[Record]> = d.rrs.into_values().flatten().collect();
                (key.into_boxed_slice(), Entry { answers: answers.into(), kind, fallback: None, rrs })
            })
            .collect()
    }
}

/// [`encode_direct`], or hickory-proto for record types it does not know; the answer is
/// shrunk if it would not fit a 64 KiB message.
pub(crate) fn pack_fast(
    owner: &Name,
    qtype: u16,
    answers: &[Record],
    authority: &[Record],
    additional: &[Record],
    rcode: ResponseCode,
) -> Option<Packed> {
    let rc = u16::from(rcode) & 0xf;
    let mut n = answers.len();
    loop {
        let add: &[Record] = if n == answers.len() { additional } else { &[] };
        match encode_direct(owner, qtype, &answers[..n], authority, add, rc) {
            Some(Ok(bytes)) => return Some(packed_from(bytes)),
            Some(Err(TooBig)) if n > 1 => n /= 2,
            Some(Err(TooBig)) => return None,
            None => return pack(owner, qtype, answers, authority, additional, rcode),
        }
    }
}

struct TooBig;

/// A response message writer with name compression (RFC 1035 §4.1.4): every suffix of every
/// name written in full is remembered, later names point at the longest known suffix.
struct Encoder {
    buf: Vec<u8>,
    suffixes: HashMap<Box<[u8]>, u16, FxBuildHasher>,
}

impl Encoder {
    /// Writes `name` (lower-case wire form). SRV targets must not be compressed (RFC 2782) but
    /// may be pointed at.
    fn name(&mut self, name: &[u8], compress: bool) {
        let mut pos = 0;
        let mut starts = Vec::new();
        while pos < name.len() && name[pos] != 0 {
            if compress {
                if let Some(&off) = self.suffixes.get(&name[pos..]) {
                    self.register(name, &starts);
                    self.buf.extend_from_slice(&(0xc000 | off).to_be_bytes());
                    return;
                }
            }
            starts.push((pos, self.buf.len()));
            let len = name[pos] as usize;
            self.buf.extend_from_slice(&name[pos..pos + 1 + len]);
            pos += 1 + len;
        }
        self.buf.push(0);
        self.register(name, &starts);
    }

    fn register(&mut self, name: &[u8], starts: &[(usize, usize)]) {
        for &(at, off) in starts {
            if off < 0x3fff {
                self.suffixes.entry(name[at..].into()).or_insert(off as u16);
            }
        }
    }

    /// Appends one record; `false` for an rdata type this writer does not know.
    fn record(&mut self, r: &Record) -> bool {
        self.name(&wire_name(r.name()), true);
        let t = u16::from(r.record_type());
        self.buf.extend_from_slice(&t.to_be_bytes());
        self.buf.extend_from_slice(&u16::from(r.dns_class()).to_be_bytes());
        self.buf.extend_from_slice(&r.ttl().to_be_bytes());
        let len_at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        match r.data() {
            RData::A(a) => self.buf.extend_from_slice(&a.0.octets()),
            RData::AAAA(a) => self.buf.extend_from_slice(&a.0.octets()),
            RData::NS(n) => self.name(&wire_name(&n.0), true),
            RData::CNAME(n) => self.name(&wire_name(&n.0), true),
            RData::PTR(n) => self.name(&wire_name(&n.0), true),
            RData::SRV(srv) => {
                self.buf.extend_from_slice(&srv.priority().to_be_bytes());
                self.buf.extend_from_slice(&srv.weight().to_be_bytes());
                self.buf.extend_from_slice(&srv.port().to_be_bytes());
                self.name(&wire_name(srv.target()), false);
            }
            RData::TXT(txt) => {
                for part in txt.txt_data() {
                    if part.len() > 255 {
                        return false;
                    }
                    self.buf.push(part.len() as u8);
                    self.buf.extend_from_slice(part);
                }
            }
            RData::SOA(soa) => {
                self.name(&wire_name(soa.mname()), true);
                self.name(&wire_name(soa.rname()), true);
                for v in [soa.serial(), soa.refresh() as u32, soa.retry() as u32, soa.expire() as u32, soa.minimum()] {
                    self.buf.extend_from_slice(&v.to_be_bytes());
                }
            }
            _ => return false,
        }
        let rdlen = self.buf.len() - len_at - 2;
        if rdlen > u16::MAX as usize {
            return false;
        }
        self.buf[len_at..len_at + 2].copy_from_slice(&(rdlen as u16).to_be_bytes());
        true
    }
}

/// Encodes a response (ID 0, QR|AA, `rcode`) without going through hickory's message model:
/// building a zone of ten thousand services is dominated by this. `None`: a record type it
/// does not handle; `Some(Err)`: more than 64 KiB.
fn encode_direct(
    owner: &Name,
    qtype: u16,
    answers: &[Record],
    authority: &[Record],
    additional: &[Record],
    rcode: u16,
) -> Option<Result<Vec<u8>, TooBig>> {
    let mut e = Encoder { buf: Vec::with_capacity(512), suffixes: HashMap::with_hasher(FxBuildHasher) };
    let counts = [1u16, answers.len() as u16, authority.len() as u16, additional.len() as u16];
    e.buf.extend_from_slice(&[0, 0]);
    e.buf.extend_from_slice(&(wire::flag::QR | wire::flag::AA | (rcode & wire::flag::RCODE)).to_be_bytes());
    for c in counts {
        e.buf.extend_from_slice(&c.to_be_bytes());
    }
    e.name(&wire_name(owner), false);
    e.buf.extend_from_slice(&qtype.to_be_bytes());
    e.buf.extend_from_slice(&wire::class::IN.to_be_bytes());
    for r in answers.iter().chain(authority).chain(additional) {
        if !e.record(r) {
            return None;
        }
    }
    Some(if e.buf.len() <= u16::MAX as usize { Ok(e.buf) } else { Err(TooBig) })
}

/// Encodes one response message with hickory-proto, shrinking the answer if it would not fit
/// a 64 KiB message.
pub(crate) fn pack(
    owner: &Name,
    qtype: u16,
    answers: &[Record],
    authority: &[Record],
    additional: &[Record],
    rcode: ResponseCode,
) -> Option<Packed> {
    let mut n = answers.len();
    loop {
        let mut msg = Message::new();
        msg.set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_authoritative(true)
            .set_response_code(rcode);
        msg.add_query(HQuery::query(owner.clone(), RecordType::from(qtype)));
        msg.add_answers(answers[..n].iter().cloned());
        msg.add_name_servers(authority.iter().cloned());
        if n == answers.len() {
            msg.add_additionals(additional.iter().cloned());
        }
        match msg.to_vec() {
            Ok(bytes) if bytes.len() <= u16::MAX as usize => return Some(packed_from(bytes)),
            _ if n > 1 => n /= 2,
            _ => return None,
        }
    }
}

/// Locates the sections of an encoded message to fill in [`Packed`]'s offsets.
pub(crate) fn packed_from(bytes: Vec<u8>) -> Packed {
    let an = wire::get_u16(&bytes, 6).unwrap_or(0);
    let ns = wire::get_u16(&bytes, 8).unwrap_or(0);
    let q_end = wire::skip_name(&bytes, HEADER_LEN).map(|p| p + 4).unwrap_or(bytes.len());
    let mut it = RrIter::new(&bytes, q_end, an, ns, 0);
    let mut rrs = Vec::new();
    for rr in &mut it {
        match rr {
            Ok(rr) => rrs.push(rr),
            Err(()) => break,
        }
    }
    let no_additional_len = it.pos();
    let answers: Vec<_> = rrs.iter().filter(|r| r.section == wire::Section::Answer).collect();
    let rotate = if answers.len() >= 2
        && ns == 0
        && answers.iter().all(|r| {
            (r.rtype == ty::A || r.rtype == ty::AAAA)
                && r.rtype == answers[0].rtype
                && bytes.get(r.name_start..r.name_start + 2) == Some(&[0xc0, 0x0c])
                && r.end - r.name_start == answers[0].end - answers[0].name_start
        }) {
        Some(Rotate {
            start: answers[0].name_start,
            rr_len: answers[0].end - answers[0].name_start,
            count: answers.len(),
        })
    } else {
        None
    };
    Packed { bytes: bytes.into_boxed_slice(), qend: q_end, no_additional_len, rotate }
}

/// Parses a pod name label (`10-244-1-5`, `fd00--5`) into an address, without allocating.
pub(crate) fn parse_dashed_ip(label: &[u8]) -> Option<IpAddr> {
    if label.is_empty() || label.len() > 45 {
        return None;
    }
    let dashes = label.iter().filter(|&&b| b == b'-').count();
    let double = label.windows(2).any(|w| w == b"--");
    let mut buf = [0u8; 45];
    let v4 = dashes == 3 && !double;
    for (d, &s) in buf.iter_mut().zip(label) {
        *d = if s == b'-' {
            if v4 { b'.' } else { b':' }
        } else {
            s
        };
    }
    let s = std::str::from_utf8(&buf[..label.len()]).ok()?;
    if v4 {
        s.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
    } else {
        s.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
    }
}

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod builder_tests;
