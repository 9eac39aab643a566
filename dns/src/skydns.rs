//! SkyDNS records from etcd: the layout SkyDNS introduced and CoreDNS's `etcd` plugin serves,
//! which operators write by hand for names outside Kubernetes.
//!
//! A key `<prefix>/local/cluster/svc/default/date` (the domain, reversed, one label per path
//! segment) holds a JSON value `{"host", "port", "priority", "weight", "text", "mail", "ttl",
//! "targetstrip", "group"}`. A query for a name returns every value *under* its path (a name is
//! a directory of records) or, when there is none below, the value at the path itself. What is
//! answered, as CoreDNS does:
//!
//! - A/AAAA: a `host` that is an address; a `host` that is a name gives a CNAME, followed
//!   (chased) when the target is in a zone we serve: the cluster zone first (Services win),
//!   then the SkyDNS zones; a target elsewhere is resolved upstream, like an ExternalName.
//! - SRV: one record per value with priority (default 10), weight (default 100, normalised so
//!   that the weights of one priority add up to about 100), port and target: the `host` when it
//!   is a name (less `targetstrip` leading labels), the key's own name when it is an address
//!   (whose A/AAAA then goes in the additional section). `port: -1` means no SRV.
//! - TXT: `text` (split into 255-byte strings); CNAME, PTR (exact name only), MX (`mail`).
//! - Wildcards: a label `*` or `any` matches any one label at its place (`*.svc.cluster.local`).
//! - `group`: where values of a directory carry groups, only those of the group of the
//!   shallowest value are returned (SkyDNS's `msg.Group`).
//! - TTL: `ttl`, default 300 s. No records under a name: NXDOMAIN; records, but none of the
//!   asked type: NODATA (both with the zone's SOA).
//!
//! Where the cluster zone and a SkyDNS zone overlap (the default: SkyDNS records in the cluster
//! domain), Services win, as with CoreDNS's plugin order (`kubernetes` runs before `etcd`, and
//! hands over only names it answers NXDOMAIN for, with `fallthrough`): a name the cluster zone
//! has (with data or NODATA, including `<ns>.svc` of a known namespace and pod names) is
//! answered from it; a name it would answer NXDOMAIN is looked up here.
//!
//! [`SkyTable`] is the parsed content of the prefix (kept by the etcd watcher, updated per
//! event, malformed values skipped and listed); [`SkyTable::zone`] makes the immutable
//! [`SkyZone`] the server answers from. Answers are computed per query (the data is small and
//! the lookups are the rare case beside Services), never on the Services fast path: a server
//! without SkyDNS records answers the cluster zone exactly as before.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, NS, PTR, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record};
use serde::Deserialize;

use crate::wire::{self, ty};
use crate::zone::{pack, soa_record, wire_name, External, Packed, Zone};

/// The key prefix SkyDNS and CoreDNS use.
pub const DEFAULT_PREFIX: &str = "/skydns";
/// TTL of a value without `ttl` (CoreDNS's etcd plugin).
const DEFAULT_TTL: u32 = 300;
/// SRV priority of a value without `priority`.
const DEFAULT_PRIORITY: u16 = 10;
/// CNAMEs followed at most (CoreDNS's `maxCnameChainLength`).
const MAX_CNAME_CHAIN: usize = 10;

/// What the host of a value is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Host {
    Addr(IpAddr),
    /// A name: CNAME (or the target of SRV/MX/PTR), unless the value has `text` (then TXT).
    Name(Name),
    None,
}

/// One value, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkyRecord {
    /// The key relative to the prefix, lower case (`local/cluster/svc/default/date`).
    key: String,
    host: Host,
    port: Option<u16>,
    priority: u16,
    weight: u16,
    text: String,
    mail: bool,
    ttl: u32,
    targetstrip: usize,
    group: String,
}

/// The value as written; integers wide enough to report out-of-range ones instead of
/// failing with serde's message.
#[derive(Debug, Deserialize)]
struct RawValue {
    #[serde(default)]
    host: String,
    #[serde(default)]
    port: i64,
    #[serde(default)]
    priority: i64,
    #[serde(default)]
    weight: i64,
    #[serde(default)]
    text: String,
    #[serde(default)]
    mail: bool,
    #[serde(default)]
    ttl: i64,
    #[serde(default)]
    targetstrip: i64,
    #[serde(default)]
    group: String,
}

/// The domain labels of a key, in path order (`local/cluster/svc/default/date`), lower case,
/// relative to `prefix`.
pub fn key_path(prefix: &str, key: &str) -> Result<String, String> {
    let prefix = prefix.trim_end_matches('/');
    let rest = key.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')).ok_or_else(|| format!("not under {prefix}/"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Err("no name below the prefix".into());
    }
    for seg in rest.split('/') {
        if seg.is_empty() {
            return Err("empty path segment".into());
        }
        if seg.len() > 63 || seg.contains('.') || !seg.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("path segment {seg:?} is not a DNS label"));
        }
    }
    if rest.len() > 250 {
        return Err("name too long".into());
    }
    Ok(rest.to_ascii_lowercase())
}

/// The name a relative key stands for: `local/cluster/svc/default/date` →
/// `date.default.svc.cluster.local.` (SkyDNS's `msg.Domain`).
fn key_domain(path: &str) -> Option<Name> {
    let labels: Vec<&str> = path.split('/').rev().collect();
    Name::from_labels(labels.iter().map(|l| l.as_bytes())).ok()
}

/// Parses one value (SkyDNS JSON). `path` is from [`key_path`].
pub fn parse_value(path: &str, value: &[u8]) -> Result<SkyRecord, String> {
    let raw: RawValue = serde_json::from_slice(value).map_err(|e| format!("not a SkyDNS value: {e}"))?;
    let host = raw.host.trim();
    let host = if host.is_empty() {
        Host::None
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        Host::Addr(ip)
    } else {
        match Name::from_ascii(host) {
            Ok(mut n) if n.num_labels() > 0 && host.bytes().all(|b| b.is_ascii_graphic()) => {
                n.set_fqdn(true);
                Host::Name(n.to_lowercase())
            }
            _ => return Err(format!("host {host:?} is neither an address nor a name")),
        }
    };
    let port = match raw.port {
        -1 => None,
        p => Some(u16::try_from(p).map_err(|_| format!("port {p} is out of range (0-65535, or -1 for no SRV)"))?),
    };
    let u16_field = |what: &str, v: i64| u16::try_from(v).map_err(|_| format!("{what} {v} is out of range (0-65535)"));
    let priority = match u16_field("priority", raw.priority)? {
        0 => DEFAULT_PRIORITY,
        p => p,
    };
    let weight = u16_field("weight", raw.weight)?;
    let ttl = match u32::try_from(raw.ttl).map_err(|_| format!("ttl {} is out of range", raw.ttl))? {
        0 => DEFAULT_TTL,
        t => t,
    };
    let targetstrip = usize::try_from(raw.targetstrip).map_err(|_| format!("targetstrip {} is negative", raw.targetstrip))?;
    if host == Host::None && raw.text.is_empty() {
        return Err("neither host nor text: nothing to serve".into());
    }
    Ok(SkyRecord { key: path.to_string(), host, port, priority, weight, text: raw.text, mail: raw.mail, ttl, targetstrip, group: raw.group })
}

/// The parsed content of the SkyDNS prefix, updated key by key by the watcher.
#[derive(Debug, Clone, Default)]
pub struct SkyTable {
    prefix: String,
    records: BTreeMap<String, Arc<SkyRecord>>,
    /// Keys whose value was left out, with the reason.
    skipped: BTreeMap<String, String>,
}

impl SkyTable {
    pub fn new(prefix: &str) -> SkyTable {
        SkyTable { prefix: prefix.trim_end_matches('/').to_string(), ..SkyTable::default() }
    }

    /// The prefix watched, with its trailing slash (`/skydns/`).
    pub fn watch_prefix(&self) -> String {
        format!("{}/", self.prefix)
    }

    /// A key's new value. A malformed one is skipped (and the key's previous value dropped: it
    /// is not what the key says any more) and returned as the reason.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        let key = String::from_utf8_lossy(key);
        let parsed = key_path(&self.prefix, &key).and_then(|path| {
            self.records.remove(&path);
            parse_value(&path, value).map(|r| (path, r))
        });
        match parsed {
            Ok((path, r)) => {
                self.skipped.remove(key.as_ref());
                self.records.insert(path, Arc::new(r));
                Ok(())
            }
            Err(e) => {
                self.skipped.insert(key.into_owned(), e.clone());
                Err(e)
            }
        }
    }

    pub fn delete(&mut self, key: &[u8]) {
        let key = String::from_utf8_lossy(key);
        self.skipped.remove(key.as_ref());
        if let Ok(path) = key_path(&self.prefix, &key) {
            self.records.remove(&path);
        }
    }

    /// Forgets everything (before a new listing).
    pub fn clear(&mut self) {
        self.records.clear();
        self.skipped.clear();
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// `key: reason` for every value left out.
    pub fn skipped(&self) -> Vec<String> {
        self.skipped.iter().map(|(k, why)| format!("{k}: {why}")).collect()
    }

    /// The zone to serve for `zones` (domain names; records outside them are not served).
    pub fn zone(&self, zones: &[String], negative_ttl: u32, serial: u32) -> SkyZone {
        let mut z = SkyZone::pending(zones, negative_ttl);
        z.records = Arc::new(self.records.clone());
        z.synced = true;
        z.serial = serial;
        z
    }
}

/// One zone served from SkyDNS records.
#[derive(Debug, Clone)]
struct SkyApex {
    name: Name,
    wire: Box<[u8]>,
}

/// The SkyDNS records the server answers from (immutable; swapped whole).
#[derive(Debug, Clone, Default)]
pub struct SkyZone {
    zones: Vec<SkyApex>,
    records: Arc<BTreeMap<String, Arc<SkyRecord>>>,
    /// Listed from etcd at least once. Before, names of a SkyDNS zone get SERVFAIL (rather than
    /// NXDOMAINs clients would cache); names of the cluster zone get its own answer.
    synced: bool,
    negative_ttl: u32,
    serial: u32,
}

/// What the SkyDNS records say about a query.
#[derive(Debug)]
pub(crate) enum SkyAnswer {
    /// The name has no records here.
    NameError,
    /// A complete response (NOERROR with answers, or NODATA with the SOA).
    Reply(Packed),
    /// A CNAME to a name outside our zones: resolved upstream (for clients allowed recursion),
    /// or answered with the chain alone (`fallback`).
    Forward { ext: Arc<External>, fallback: Packed },
    /// Not listed yet, or a value that cannot be answered (an NS host that is a name).
    ServFail,
}

/// Records found for a name; `None` from the lookups is a name error.
#[derive(Debug, Default)]
struct Found {
    records: Vec<Record>,
    /// A CNAME chain that leaves our zones, and its target.
    external: Option<(Vec<Record>, Name)>,
}

impl SkyZone {
    /// No records yet for `zones` (names in them answered SERVFAIL until [`SkyTable::zone`]).
    pub fn pending(zones: &[String], negative_ttl: u32) -> SkyZone {
        let zones = zones
            .iter()
            .filter_map(|z| {
                let mut n = Name::from_ascii(z.trim_end_matches('.')).ok()?;
                n.set_fqdn(true);
                let n = n.to_lowercase();
                Some(SkyApex { wire: wire_name(&n).into_boxed_slice(), name: n })
            })
            .collect();
        SkyZone { zones, records: Arc::default(), synced: false, negative_ttl, serial: 0 }
    }

    /// Records served.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// The longest of our zones `name` (lower-case wire form) is in.
    fn zone_index(&self, name: &[u8]) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, z) in self.zones.iter().enumerate() {
            if wire::strip_zone(name, &z.wire).is_some() && best.is_none_or(|b| self.zones[b].wire.len() < z.wire.len()) {
                best = Some(i);
            }
        }
        best
    }

    /// True when `name` is in one of the SkyDNS zones.
    pub(crate) fn serves(&self, name: &[u8]) -> bool {
        self.zone_index(name).is_some()
    }

    /// Answers `qtype` for `name` (lower-case wire form), or `None` when the name is in no
    /// SkyDNS zone. `cluster` is the cluster zone, for CNAME targets in it.
    pub(crate) fn answer(&self, name: &[u8], qtype: u16, cluster: &Zone) -> Option<SkyAnswer> {
        let zi = self.zone_index(name)?;
        if !self.synced {
            return Some(SkyAnswer::ServFail);
        }
        if self.records.is_empty() {
            return Some(SkyAnswer::NameError);
        }
        let owner = Name::from_labels(wire::labels(name)).ok()?;
        let apex = &self.zones[zi].name;
        let found = match qtype {
            ty::A | ty::AAAA | ty::TXT => {
                let f = self.addresses(&owner, apex, qtype, &[], cluster);
                return Some(match f {
                    None => SkyAnswer::NameError,
                    Some(f) if f.records.is_empty() && f.external.is_some() => {
                        let (chain, target) = f.external.expect("checked");
                        let fallback = self.packed(&owner, qtype, chain.clone(), Vec::new(), zi);
                        SkyAnswer::Forward { ext: Arc::new(External { chain, target: wire_name(&target).into_boxed_slice() }), fallback }
                    }
                    Some(f) => SkyAnswer::Reply(self.packed(&owner, qtype, f.records, Vec::new(), zi)),
                });
            }
            ty::SRV | ty::MX => self.targets(&owner, qtype, cluster),
            ty::CNAME => self.lookup(&owner, true, qtype).map(|s| {
                let r = s.first().and_then(|s| match &s.host {
                    Host::Name(t) => Some(Record::from_rdata(owner.clone(), s.ttl, RData::CNAME(CNAME(t.clone())))),
                    _ => None,
                });
                (r.into_iter().collect(), Vec::new())
            }),
            ty::PTR => self.lookup(&owner, true, qtype).map(|s| {
                let mut seen = HashSet::new();
                let rs = s
                    .iter()
                    .filter_map(|s| match &s.host {
                        Host::Name(t) if seen.insert(t.clone()) => Some(Record::from_rdata(owner.clone(), s.ttl, RData::PTR(PTR(t.clone())))),
                        _ => None,
                    })
                    .collect();
                (rs, Vec::new())
            }),
            ty::NS if owner == *apex => match self.name_servers(&owner, apex) {
                Ok(x) => Some(x),
                Err(()) => return Some(SkyAnswer::ServFail),
            },
            ty::SOA if owner == *apex => Some((vec![soa_record(apex, self.negative_ttl, self.serial)], Vec::new())),
            // Other types: the name exists when it has records (NODATA), else NXDOMAIN.
            _ => self.addresses(&owner, apex, ty::A, &[], cluster).map(|_| (Vec::new(), Vec::new())),
        };
        Some(match found {
            None => SkyAnswer::NameError,
            Some((answers, additional)) => SkyAnswer::Reply(self.packed(&owner, qtype, answers, additional, zi)),
        })
    }

    /// NXDOMAIN for `name` in its SkyDNS zone, with the zone's SOA.
    pub(crate) fn name_error(&self, name: &[u8], qtype: u16) -> Option<Packed> {
        let zi = self.zone_index(name)?;
        let owner = Name::from_labels(wire::labels(name)).ok()?;
        let soa = soa_record(&self.zones[zi].name, self.negative_ttl, self.serial);
        pack(&owner, qtype, &[], &[soa], &[], ResponseCode::NXDomain)
    }

    /// A response: the answers, or NODATA with the SOA when there are none.
    fn packed(&self, owner: &Name, qtype: u16, answers: Vec<Record>, additional: Vec<Record>, zi: usize) -> Packed {
        let soa = if answers.is_empty() { vec![soa_record(&self.zones[zi].name, self.negative_ttl, self.serial)] } else { Vec::new() };
        pack(owner, qtype, &answers, &soa, &additional, ResponseCode::NoError)
            .or_else(|| pack(owner, qtype, &[], &[], &[], ResponseCode::ServFail))
            .unwrap_or_else(|| crate::zone::packed_from(Vec::new()))
    }

    /// The values for `name` (SkyDNS's `Records` + `Group`): every value under its path, or
    /// the value at the path when there is none under it (`exact`: only that one); wildcard
    /// labels match any label. Values that cannot answer `qtype` are left out. `None`: no value
    /// at or under the path at all (a name error).
    fn lookup(&self, name: &Name, exact: bool, qtype: u16) -> Option<Vec<Arc<SkyRecord>>> {
        let mut labels: Vec<String> = name.iter().map(|l| String::from_utf8_lossy(l).to_ascii_lowercase()).collect();
        labels.reverse();
        if labels.iter().any(|l| l.contains('/')) {
            return None;
        }
        let star = labels.iter().position(|l| l == "*" || l == "any");
        let base = labels[..star.unwrap_or(labels.len())].join("/");
        let matched: Vec<&Arc<SkyRecord>> = if exact { self.records.get(&base).into_iter().collect() } else { self.under(&base) };
        if matched.is_empty() {
            return None;
        }
        let mut out: Vec<Arc<SkyRecord>> = matched
            .into_iter()
            .filter(|r| {
                star.is_none() || {
                    let segs: Vec<&str> = r.key.split('/').collect();
                    segs.len() >= labels.len() && labels.iter().zip(&segs).all(|(l, s)| l == "*" || l == "any" || l == s)
                }
            })
            .filter(|r| r.host != Host::None || (qtype == ty::TXT && !r.text.is_empty()))
            .cloned()
            .collect();
        group(&mut out);
        Some(out)
    }

    /// Values strictly under `path`, or the one at it when there are none under it.
    fn under(&self, path: &str) -> Vec<&Arc<SkyRecord>> {
        let below: Vec<&Arc<SkyRecord>> = if path.is_empty() {
            self.records.values().collect()
        } else {
            let from = format!("{path}/");
            self.records.range(from.clone()..).take_while(|(k, _)| k.starts_with(&from)).map(|(_, v)| v).collect()
        };
        if !below.is_empty() {
            return below;
        }
        self.records.get(path).into_iter().collect()
    }

    /// A, AAAA or TXT records of `name`, CNAMEs chased (`chain`: the CNAMEs that led here).
    /// At the zone apex the values of `apex.dns.<zone>` are used when there are any (CoreDNS).
    fn addresses(&self, name: &Name, apex: &Name, qtype: u16, chain: &[Record], cluster: &Zone) -> Option<Found> {
        let services = if name == apex && qtype != ty::TXT {
            let alias = Name::from_ascii("apex.dns").ok()?.append_domain(apex).ok()?;
            self.lookup(&alias, false, qtype).or_else(|| self.lookup(name, false, qtype))
        } else {
            self.lookup(name, false, qtype)
        }?;
        let mut found = Found::default();
        let mut seen = HashSet::new();
        let mut texts = HashSet::new();
        for s in &services {
            match (&s.host, qtype) {
                (Host::Name(target), _) if s.text.is_empty() => {
                    if target == name || chain.len() > MAX_CNAME_CHAIN {
                        continue;
                    }
                    let cname = Record::from_rdata(name.clone(), s.ttl, RData::CNAME(CNAME(target.clone())));
                    if chain.contains(&cname) {
                        continue;
                    }
                    let mut next_chain = chain.to_vec();
                    next_chain.push(cname.clone());
                    match self.chase(target, qtype, &next_chain, cluster) {
                        Chased::Records(next) => {
                            if !next.records.is_empty() {
                                found.records.push(cname.clone());
                                found.records.extend(next.records);
                            }
                            if found.external.is_none() {
                                found.external = next.external.map(|(c, t)| ([vec![cname.clone()], c].concat(), t));
                            }
                        }
                        Chased::Outside => {
                            if found.external.is_none() {
                                found.external = Some((vec![cname], target.clone()));
                            }
                        }
                        Chased::Nothing => {}
                    }
                }
                (Host::Addr(IpAddr::V4(ip)), ty::A) if seen.insert(s.host.clone()) => {
                    found.records.push(Record::from_rdata(name.clone(), s.ttl, RData::A(A(*ip))));
                }
                (Host::Addr(IpAddr::V6(ip)), ty::AAAA) if seen.insert(s.host.clone()) => {
                    found.records.push(Record::from_rdata(name.clone(), s.ttl, RData::AAAA(AAAA(*ip))));
                }
                (Host::Name(_) | Host::None, ty::TXT) if !s.text.is_empty() && texts.insert(s.text.as_str()) => {
                    found.records.push(txt_record(name, s));
                }
                _ => {}
            }
        }
        Some(found)
    }

    /// Follows a CNAME target: the cluster zone has it (Services win), or a SkyDNS zone, or
    /// it is outside every zone we serve.
    fn chase(&self, target: &Name, qtype: u16, chain: &[Record], cluster: &Zone) -> Chased {
        let wire = wire_name(target);
        if let Some(entry) = cluster.names.get(&wire) {
            let mut f = Found::default();
            for r in entry.rrs.iter() {
                if u16::from(r.record_type()) == qtype {
                    f.records.push(r.clone());
                } else if let RData::CNAME(next) = r.data() {
                    if chain.len() <= MAX_CNAME_CHAIN && !chain.contains(r) {
                        let mut c = chain.to_vec();
                        c.push(r.clone());
                        match self.chase(&next.0, qtype, &c, cluster) {
                            Chased::Records(n) if !n.records.is_empty() => {
                                f.records.push(r.clone());
                                f.records.extend(n.records);
                            }
                            Chased::Records(n) => f.external = n.external.map(|(ch, t)| ([vec![r.clone()], ch].concat(), t)),
                            Chased::Outside => f.external = Some((vec![r.clone()], next.0.clone())),
                            Chased::Nothing => {}
                        }
                    }
                }
            }
            return Chased::Records(f);
        }
        if let Some(zi) = self.zone_index(&wire) {
            return match self.addresses(target, &self.zones[zi].name.clone(), qtype, chain, cluster) {
                Some(f) => Chased::Records(f),
                None => Chased::Nothing,
            };
        }
        if wire::strip_zone(&wire, &cluster.apex).is_some() {
            return Chased::Nothing;
        }
        Chased::Outside
    }

    /// SRV or MX records of `name`, with the targets' addresses as additional records.
    fn targets(&self, name: &Name, qtype: u16, cluster: &Zone) -> Option<(Vec<Record>, Vec<Record>)> {
        let services = self.lookup(name, false, qtype)?;
        let services: Vec<&Arc<SkyRecord>> = services.iter().filter(|s| if qtype == ty::MX { s.mail } else { s.port.is_some() }).collect();
        let mut total: HashMap<u16, u32> = HashMap::new();
        for s in &services {
            *total.entry(s.priority).or_default() += if s.weight == 0 { 100 } else { u32::from(s.weight) };
        }
        let (mut answers, mut additional) = (Vec::new(), Vec::new());
        let mut seen_targets = HashSet::new();
        let mut dup = HashSet::new();
        for s in services {
            let share = 100.0 / f64::from(total[&s.priority]) * if s.weight == 0 { 100.0 } else { f64::from(s.weight) };
            let weight = (share.floor() as u16).max(1);
            let rdata = |target: Name| match qtype {
                ty::MX => RData::MX(MX::new(s.priority, target)),
                _ => RData::SRV(SRV::new(s.priority, weight, s.port.unwrap_or(0), target)),
            };
            match &s.host {
                Host::Name(host) if s.text.is_empty() => {
                    let target = strip_labels(host, s.targetstrip);
                    answers.push(Record::from_rdata(name.clone(), s.ttl, rdata(target.clone())));
                    if seen_targets.insert(target.clone()) {
                        if let Chased::Records(f) = self.chase(&target, ty::A, &[], cluster) {
                            additional.extend(f.records);
                        }
                    }
                }
                Host::Addr(ip) => {
                    let Some(own) = key_domain(&s.key) else { continue };
                    let target = strip_labels(&own, s.targetstrip);
                    if dup.insert((target.clone(), s.port, None)) {
                        answers.push(Record::from_rdata(name.clone(), s.ttl, rdata(target.clone())));
                    }
                    if dup.insert((target.clone(), None, Some(*ip))) {
                        additional.push(address(&target, s.ttl, *ip));
                    }
                }
                _ => {}
            }
        }
        Some((answers, additional))
    }

    /// NS at the apex: the values of `ns.dns.<zone>`, which must be addresses.
    fn name_servers(&self, owner: &Name, apex: &Name) -> Result<(Vec<Record>, Vec<Record>), ()> {
        let ns = Name::from_ascii("ns.dns").map_err(|_| ())?.append_domain(apex).map_err(|_| ())?;
        let (mut answers, mut additional) = (Vec::new(), Vec::new());
        for s in self.lookup(&ns, false, ty::NS).unwrap_or_default() {
            let Host::Addr(ip) = s.host else { return Err(()) };
            let Some(target) = key_domain(&s.key).map(|n| strip_labels(&n, s.targetstrip)) else { continue };
            additional.push(address(&target, s.ttl, ip));
            let r = Record::from_rdata(owner.clone(), s.ttl, RData::NS(NS(target)));
            if !answers.contains(&r) {
                answers.push(r);
            }
        }
        Ok((answers, additional))
    }
}

enum Chased {
    Records(Found),
    /// The target is in no zone we serve.
    Outside,
    /// In one of our zones, but without records.
    Nothing,
}

/// SkyDNS's `msg.Group`: when the shallowest values carry a group, only values of that group
/// (and values without one) are kept; values of one depth in different groups keep everything.
fn group(sx: &mut Vec<Arc<SkyRecord>>) {
    let Some(first) = sx.first() else { return };
    let depth = |s: &SkyRecord| s.key.matches('/').count();
    let mut grp = first.group.clone();
    let mut slashes = depth(first);
    for s in sx.iter() {
        let d = depth(s);
        if d < slashes {
            if s.group.is_empty() {
                break;
            }
            slashes = d;
            grp = s.group.clone();
        }
    }
    if grp.is_empty() {
        return;
    }
    let mut kept = Vec::with_capacity(sx.len());
    for s in sx.iter() {
        if s.group.is_empty() || s.group == grp {
            kept.push(s.clone());
        } else if depth(s) == slashes {
            return;
        }
    }
    *sx = kept;
}

/// `name` without its first `n` labels (all of it when it has no more than `n`).
fn strip_labels(name: &Name, n: usize) -> Name {
    if n == 0 || n >= name.num_labels() as usize {
        return name.clone();
    }
    Name::from_labels(name.iter().skip(n)).unwrap_or_else(|_| name.clone())
}

fn address(name: &Name, ttl: u32, ip: IpAddr) -> Record {
    match ip {
        IpAddr::V4(v4) => Record::from_rdata(name.clone(), ttl, RData::A(A(v4))),
        IpAddr::V6(v6) => Record::from_rdata(name.clone(), ttl, RData::AAAA(AAAA(v6))),
    }
}

fn txt_record(name: &Name, s: &SkyRecord) -> Record {
    let parts: Vec<&[u8]> = s.text.as_bytes().chunks(255).collect();
    Record::from_rdata(name.clone(), s.ttl, RData::TXT(TXT::from_bytes(parts)))
}

#[cfg(test)]
mod tests;
