//! Incremental zone building: a [`ZoneBuilder`] is handed the complete set of Services and
//! EndpointSlices on every change (level-triggered: a lost event cannot leave stale names),
//! finds the services whose objects changed (pointer equality of the shared objects first, then
//! value equality), and re-encodes only those. What one service contributes is confined to
//! names under `<svc>.<ns>.svc.<zone>`; the parts merged across services are kept with
//! reference lists and redone for what they touch: reverse names (an endpoint address may back
//! several services), the `<ns>.svc` names of namespaces that have objects, the endpoint count,
//! and ExternalName services whose CNAME points into the zone (their answers include the
//! target's records). The zone is published by sharing the unchanged shards of the name table
//! ([`super::names`]), so one changed service costs O(its names) plus a pass over the
//! snapshot's objects to compare them, not O(all names).
//!
//! Invariant, checked by the property tests: the zone after any sequence of updates equals
//! the zone a fresh builder makes from the last snapshot alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{NS, TXT};
use hickory_proto::rr::{Name, RData, Record};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use rustc_hash::FxBuildHasher;

use super::{
    addr_record, pack_fast, reverse_name, service_fragment, soa_record, valid_object_label, wire_name, Entry, External,
    Kind, Model, NameKind, NamesMut, Zone, ZoneConfig, ZoneStats, DNS_SCHEMA_VERSION, DNS_VERSION_TTL,
    SERVICE_NAME_LABEL,
};
use crate::wire::ty;

type FxMap<K, V> = HashMap<K, V, FxBuildHasher>;

/// Keeps the zone of a changing set of Services and EndpointSlices. See the module docs.
pub struct ZoneBuilder {
    cfg: ZoneConfig,
    pub(super) domain: Name,
    pub(super) apex: Box<[u8]>,
    /// Messages about the configuration (an invalid cluster domain).
    config_skipped: Vec<String>,
    names: NamesMut,
    /// The fixed names (apex, `ns.dns`, `dns-version`, `svc`, `pod`, `dns`).
    fixed: Option<Fixed>,
    soa: Option<Record>,
    /// Keyed `<ns>/<name>`.
    services: FxMap<Box<str>, SvcState>,
    /// Reverse address → the services naming it, with their PTR targets.
    reverse: FxMap<IpAddr, BTreeMap<Box<str>, Vec<Name>>>,
    /// PTR records currently published per reverse address.
    ptr_records: usize,
    endpoint_refs: FxMap<IpAddr, u32>,
    /// Namespaces whose `<ns>.svc` name is published.
    namespaces: HashSet<Box<str>, FxBuildHasher>,
    /// ExternalName services with a valid target: key → (name, target, target in the zone).
    externals: BTreeMap<Box<str>, (Name, Name, bool)>,
    skipped: BTreeMap<Box<str>, Vec<String>>,
    totals: Totals,
    generation: u64,
    zone: Option<Arc<Zone>>,
    last_loose: Vec<String>,
}

/// The fixed names as published: for which serial, their keys, their record count.
struct Fixed {
    serial: u32,
    keys: Vec<Box<[u8]>>,
    records: usize,
}

/// A service to encode again: its key, its Service, its slices.
type Changed<'a> = (Box<str>, &'a Arc<Service>, Vec<&'a Arc<EndpointSlice>>);

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    services: usize,
    headless: usize,
    external_names: usize,
    records: usize,
}

struct SvcState {
    service: Arc<Service>,
    slices: Vec<Arc<EndpointSlice>>,
    /// The update that last saw this service in its snapshot.
    seen: u64,
    keys: Vec<Box<[u8]>>,
    reverse: Vec<(IpAddr, Name)>,
    endpoints: Vec<IpAddr>,
    records: usize,
    counted: bool,
    headless: bool,
    external: bool,
}

impl std::fmt::Debug for ZoneBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZoneBuilder").field("domain", &self.domain.to_string()).field("services", &self.services.len()).finish()
    }
}

fn same_slices(a: &[Arc<EndpointSlice>], b: &[&Arc<EndpointSlice>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y) || **x == ***y)
}

impl ZoneBuilder {
    pub fn new(cfg: ZoneConfig) -> ZoneBuilder {
        let mut config_skipped = Vec::new();
        let domain = match Name::from_ascii(&cfg.domain).map(|n| n.to_lowercase()) {
            Ok(mut n) if !n.is_root() && cfg.domain.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') => {
                n.set_fqdn(true);
                n
            }
            _ => {
                config_skipped.push(format!("cluster domain {:?} is not a valid name; using cluster.local", cfg.domain));
                Name::from_ascii("cluster.local.").expect("static name")
            }
        };
        ZoneBuilder {
            apex: wire_name(&domain).into_boxed_slice(),
            domain,
            cfg,
            config_skipped,
            names: NamesMut::new(),
            fixed: None,
            soa: None,
            services: FxMap::default(),
            reverse: FxMap::default(),
            ptr_records: 0,
            endpoint_refs: FxMap::default(),
            namespaces: HashSet::default(),
            externals: BTreeMap::new(),
            skipped: BTreeMap::new(),
            totals: Totals::default(),
            generation: 0,
            zone: None,
            last_loose: Vec::new(),
        }
    }

    pub(super) fn serial_now(&self) -> u32 {
        self.cfg.serial.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as u32)
                .unwrap_or(1)
        })
    }

    /// The zone last returned by [`ZoneBuilder::update`].
    pub fn zone(&self) -> Option<Arc<Zone>> {
        self.zone.clone()
    }

    /// Takes the complete current set of objects (any order; slices are matched to their
    /// Service by the `kubernetes.io/service-name` label) and returns the zone for it. Objects
    /// shared with the previous call (same `Arc`) or equal to it cost a comparison; only the
    /// services whose Service or slices changed are encoded again. Returns the previous zone
    /// itself when nothing that shows in the zone changed.
    pub fn update<'a>(
        &mut self,
        services: impl IntoIterator<Item = &'a Arc<Service>>,
        slices: impl IntoIterator<Item = &'a Arc<EndpointSlice>>,
    ) -> Arc<Zone> {
        self.generation += 1;
        let generation = self.generation;
        let mut namespaces: HashSet<&str, FxBuildHasher> = HashSet::default();
        let mut by_service: FxMap<(&str, &str), Vec<&Arc<EndpointSlice>>> = FxMap::default();
        for s in slices {
            let ns = s.metadata.namespace.as_deref().unwrap_or("default");
            namespaces.insert(ns);
            let Some(svc) = s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
                continue;
            };
            by_service.entry((ns, svc.as_str())).or_default().push(s);
        }

        // Which services are new or changed; the others are marked seen.
        let mut loose: Vec<String> = Vec::new();
        let mut changed: Vec<Changed<'a>> = Vec::new();
        let mut key = String::new();
        let mut fresh: HashSet<Box<str>, FxBuildHasher> = HashSet::default();
        for svc in services {
            let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
            namespaces.insert(ns);
            let Some(name) = svc.metadata.name.as_deref() else {
                loose.push("a Service without a name".into());
                continue;
            };
            key.clear();
            key.push_str(ns);
            key.push('/');
            key.push_str(name);
            let group = by_service.get(&(ns, name)).map(Vec::as_slice).unwrap_or(&[]);
            match self.services.get_mut(key.as_str()) {
                Some(st) if st.seen == generation => continue, // listed twice: the first counts
                Some(st) => {
                    st.seen = generation;
                    if (Arc::ptr_eq(&st.service, svc) || *st.service == **svc) && same_slices(&st.slices, group) {
                        continue;
                    }
                    changed.push((key.as_str().into(), svc, group.to_vec()));
                }
                None => {
                    if !fresh.insert(key.as_str().into()) {
                        continue;
                    }
                    changed.push((key.as_str().into(), svc, group.to_vec()));
                }
            }
        }
        let removed: Vec<Box<str>> =
            self.services.iter().filter(|(_, st)| st.seen != generation).map(|(k, _)| k.clone()).collect();

        let serial = self.serial_now();
        let namespaces_same =
            namespaces.len() == self.namespaces.len() && namespaces.iter().all(|n| self.namespaces.contains(*n));
        if let Some(z) = &self.zone {
            if changed.is_empty() && removed.is_empty() && namespaces_same && loose == self.last_loose && z.serial == serial {
                return z.clone();
            }
        }

        let mut dirty_ips: Vec<IpAddr> = Vec::new();
        for k in &removed {
            if let Some(st) = self.services.remove(k) {
                self.retract(k, &st, &mut dirty_ips);
            }
        }
        let mut external_todo: Vec<Box<str>> = Vec::new();
        for (k, svc, group) in changed {
            if let Some(st) = self.services.remove(&k) {
                self.retract(&k, &st, &mut dirty_ips);
            }
            let st = self.apply(&k, svc, group, generation, &mut dirty_ips);
            if st.external {
                external_todo.push(k.clone());
            }
            self.services.insert(k, st);
        }
        self.refresh_fixed(serial);
        dirty_ips.sort_unstable();
        dirty_ips.dedup();
        for ip in dirty_ips {
            self.refresh_reverse(ip);
        }
        if !namespaces_same {
            self.refresh_namespaces(&namespaces);
        }
        // ExternalName answers that include in-zone records are redone on every change (there
        // are few; each costs a handful of lookups).
        let chased: Vec<Box<str>> = self
            .externals
            .iter()
            .filter(|(k, (_, _, in_zone))| *in_zone || external_todo.contains(k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in chased {
            self.refresh_external(&k);
        }
        self.last_loose = loose;
        self.publish(serial)
    }

    /// Removes what a service contributed.
    fn retract(&mut self, key: &str, st: &SvcState, dirty_ips: &mut Vec<IpAddr>) {
        for k in &st.keys {
            self.names.remove(k);
        }
        for (ip, _) in &st.reverse {
            if let Some(m) = self.reverse.get_mut(ip) {
                m.remove(key);
                if m.is_empty() {
                    self.reverse.remove(ip);
                }
            }
            dirty_ips.push(*ip);
        }
        for ip in &st.endpoints {
            if let Some(n) = self.endpoint_refs.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    self.endpoint_refs.remove(ip);
                }
            }
        }
        self.totals.records -= st.records;
        self.totals.services -= usize::from(st.counted);
        self.totals.headless -= usize::from(st.counted && st.headless);
        self.totals.external_names -= usize::from(st.external);
        self.skipped.remove(key);
        self.externals.remove(key);
    }

    /// Encodes one service and adds what it contributes.
    fn apply(
        &mut self,
        key: &str,
        svc: &Arc<Service>,
        group: Vec<&Arc<EndpointSlice>>,
        generation: u64,
        dirty_ips: &mut Vec<IpAddr>,
    ) -> SvcState {
        let slices: Vec<Arc<EndpointSlice>> = group.iter().map(|s| (*s).clone()).collect();
        let mut st = SvcState {
            service: svc.clone(),
            slices,
            seen: generation,
            keys: Vec::new(),
            reverse: Vec::new(),
            endpoints: Vec::new(),
            records: 0,
            counted: false,
            headless: false,
            external: false,
        };
        let (ns, name) = key.split_once('/').unwrap_or(("default", key));
        if !valid_object_label(ns) || !valid_object_label(name) {
            self.skipped.insert(key.into(), vec![format!("service {ns}/{name}: not a valid DNS label")]);
            return st;
        }
        let plain: Vec<&EndpointSlice> = group.iter().map(|s| &***s).collect();
        let f = service_fragment(&self.domain, self.cfg.ttl, ns, name, svc, &plain);
        let mut skipped = f.skipped;
        st.records = f.model.records();
        st.counted = f.counted;
        st.headless = f.headless;
        for (k, e) in f.model.encode(&mut skipped) {
            st.keys.push(k.clone());
            self.names.insert(k, e);
        }
        for (ip, target) in &f.reverse {
            let v = self.reverse.entry(*ip).or_default().entry(key.into()).or_default();
            v.push(target.clone());
            dirty_ips.push(*ip);
        }
        st.reverse = f.reverse;
        for ip in &f.endpoints {
            *self.endpoint_refs.entry(*ip).or_default() += 1;
        }
        st.endpoints = f.endpoints;
        if let Some((owner, target)) = f.external {
            let in_zone = self.domain.zone_of(&target);
            self.externals.insert(key.into(), (owner, target, in_zone));
            st.external = true;
        }
        self.totals.records += st.records;
        self.totals.services += usize::from(st.counted);
        self.totals.headless += usize::from(st.counted && st.headless);
        self.totals.external_names += usize::from(st.external);
        if !skipped.is_empty() {
            self.skipped.insert(key.into(), skipped);
        }
        st
    }

    /// The apex (SOA, NS), `ns.dns` (the cluster DNS IPs), `dns-version`, and the empty
    /// non-terminals `svc`, `pod` and `dns`: redone when the serial changes.
    fn refresh_fixed(&mut self, serial: u32) {
        if self.fixed.as_ref().is_some_and(|f| f.serial == serial) {
            return;
        }
        if let Some(Fixed { keys, .. }) = self.fixed.take() {
            for k in &keys {
                self.names.remove(k);
            }
        }
        let ttl = self.cfg.ttl;
        let mut m = Model::new(self.domain.clone());
        m.touch(&self.domain.clone(), NameKind::Zone);
        let ns_name = m.child(&["ns", "dns"]);
        let soa = soa_record(&self.domain, self.cfg.negative_ttl, serial);
        m.add(soa.clone());
        m.add(Record::from_rdata(self.domain.clone(), ttl, RData::NS(NS(ns_name.clone()))));
        m.touch(&ns_name, NameKind::Zone);
        for ip in &self.cfg.dns_ips {
            m.add(addr_record(&ns_name, ttl, *ip));
        }
        m.add(Record::from_rdata(
            m.child(&["dns-version"]),
            DNS_VERSION_TTL,
            RData::TXT(TXT::new(vec![DNS_SCHEMA_VERSION.to_string()])),
        ));
        for ent in ["svc", "pod", "dns"] {
            let n = m.child(&[ent]);
            m.touch(&n, NameKind::Zone);
        }
        let records = m.records();
        let mut skipped = Vec::new();
        let mut keys = Vec::new();
        for (k, e) in m.encode(&mut skipped) {
            keys.push(k.clone());
            self.names.insert(k, e);
        }
        self.fixed = Some(Fixed { serial, keys, records });
        self.soa = Some(soa);
    }

    /// The PTRs of one address: every service naming it, in service order.
    fn refresh_reverse(&mut self, ip: IpAddr) {
        let key = wire_name(&reverse_name(ip));
        if let Some(old) = self.names.get(&key) {
            self.ptr_records -= old.rrs.len();
        }
        let Some(targets) = self.reverse.get(&ip) else {
            self.names.remove(&key);
            return;
        };
        let mut m = Model::new(self.domain.clone());
        for t in targets.values().flatten() {
            m.add_reverse(ip, self.cfg.ttl, t);
        }
        self.ptr_records += m.records();
        let mut skipped = Vec::new();
        for (k, e) in m.encode(&mut skipped) {
            self.names.insert(k, e);
        }
    }

    /// `<ns>.svc.<zone>` exists (NODATA) for every namespace that has a Service or an
    /// EndpointSlice; other namespaces' names are NXDOMAIN.
    fn refresh_namespaces(&mut self, now: &HashSet<&str, FxBuildHasher>) {
        let gone: Vec<Box<str>> = self.namespaces.iter().filter(|n| !now.contains(&***n)).cloned().collect();
        for ns in gone {
            self.namespaces.remove(&ns);
            if valid_object_label(&ns) {
                let n = Model::new(self.domain.clone()).child(&[&ns, "svc"]);
                self.names.remove(&wire_name(&n));
            }
        }
        for ns in now {
            if self.namespaces.contains(*ns) {
                continue;
            }
            self.namespaces.insert((*ns).into());
            if !valid_object_label(ns) {
                continue;
            }
            let mut m = Model::new(self.domain.clone());
            let n = m.child(&[ns, "svc"]);
            m.touch(&n, NameKind::Zone);
            let mut skipped = Vec::new();
            for (k, e) in m.encode(&mut skipped) {
                self.names.insert(k, e);
            }
        }
    }

    /// The CNAME record at `name`, if it has one.
    fn cname_at(&self, name: &Name) -> Option<Record> {
        let e = self.names.get(&wire_name(name))?;
        e.rrs.iter().find(|r| u16::from(r.record_type()) == ty::CNAME).cloned()
    }

    /// An ExternalName service's answers: its CNAME, followed through other ExternalName
    /// services in the zone. A chain that leaves the zone is resolved upstream at query time;
    /// one that ends at an in-zone name is answered with that name's records.
    fn refresh_external(&mut self, key: &str) {
        let Some((owner, first, _)) = self.externals.get(key).cloned() else { return };
        let owner_key = wire_name(&owner);
        let Some(cname) = self.cname_at(&owner) else { return };
        let rrs: Arc<[Record]> = Arc::new([cname.clone()]);
        let mut answers = Vec::new();
        if let Some(p) = pack_fast(&owner, ty::CNAME, &rrs, &[], &[], ResponseCode::NoError) {
            answers.push((ty::CNAME, p));
        }
        let mut entry = Entry { answers: Arc::new([]), kind: Kind::Zone, fallback: None, rrs };
        let mut chain = vec![cname];
        let mut target = first;
        let mut outcome = None;
        for _ in 0..8 {
            if !self.domain.zone_of(&target) {
                outcome = Some((true, target));
                break;
            }
            match self.cname_at(&target) {
                Some(r) => {
                    let RData::CNAME(c) = r.data() else { break };
                    target = c.0.clone();
                    chain.push(r);
                }
                None => {
                    outcome = Some((false, target));
                    break;
                }
            }
        }
        match outcome {
            Some((true, target)) => {
                entry.fallback = pack_fast(&owner, ty::A, &chain, &[], &[], ResponseCode::NoError);
                entry.kind = Kind::External(Arc::new(External { chain, target: wire_name(&target).into_boxed_slice() }));
            }
            Some((false, target)) => {
                // Every type the final target has: the chain plus its records of that type.
                if let Some(fin) = self.names.get(&wire_name(&target)) {
                    let mut i = 0;
                    let rrs = &fin.rrs;
                    while i < rrs.len() {
                        let t = u16::from(rrs[i].record_type());
                        let mut j = i;
                        while j < rrs.len() && u16::from(rrs[j].record_type()) == t {
                            j += 1;
                        }
                        if t != ty::CNAME && !answers.iter().any(|(have, _)| *have == t) {
                            let mut ans = chain.clone();
                            ans.extend(rrs[i..j].iter().cloned());
                            if let Some(p) = pack_fast(&owner, t, &ans, &[], &[], ResponseCode::NoError) {
                                answers.push((t, p));
                            }
                        }
                        i = j;
                    }
                }
                // Other types: the chain alone, with the SOA (NODATA at the target).
                entry.fallback = pack_fast(&owner, ty::A, &chain, self.soa.as_slice(), &[], ResponseCode::NoError);
            }
            // A loop or a chain too long: only the CNAME is served.
            None => {}
        }
        entry.answers = answers.into();
        self.names.insert(owner_key.into_boxed_slice(), entry);
    }

    fn publish(&mut self, serial: u32) -> Arc<Zone> {
        let mut skipped = self.config_skipped.clone();
        skipped.extend(self.last_loose.iter().cloned());
        skipped.extend(self.skipped.values().flatten().cloned());
        let fixed_records = self.fixed.as_ref().map_or(0, |f| f.records);
        let stats = ZoneStats {
            services: self.totals.services,
            headless: self.totals.headless,
            external_names: self.totals.external_names,
            endpoints: self.endpoint_refs.len(),
            names: self.names.len(),
            records: fixed_records + self.totals.records + self.ptr_records,
            skipped,
        };
        let z = Arc::new(Zone {
            apex: self.apex.clone(),
            names: self.names.snapshot(),
            ttl: self.cfg.ttl,
            negative_ttl: self.cfg.negative_ttl,
            serial,
            synced: true,
            domain: self.domain.clone(),
            stats,
        });
        self.zone = Some(z.clone());
        z
    }
}
