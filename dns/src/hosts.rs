//! A hosts file (CoreDNS's `hosts` plugin): `/etc/hosts` lines (`address name [aliases...]`,
//! `#` comments) answered for A, AAAA and the addresses' reverse names (PTR), with TTL 3600.
//! As in CoreDNS's plugin order (`hosts` before `kubernetes`), a name in the file is answered
//! from it before anything else, and other types of it get an empty NOERROR answer; every other
//! name goes on as if there were no file. Lines that do not parse are skipped and reported. The
//! server reloads the file when its modification time changes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::SystemTime;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{Name, RData, Record};

use crate::wire::ty;
use crate::zone::{pack, reverse_name, wire_name, Packed};

/// TTL of hosts answers (CoreDNS's default).
const HOSTS_TTL: u32 = 3600;

/// The answers of one name of the file.
#[derive(Debug, Default)]
struct HostEntry {
    answers: Vec<(u16, Packed)>,
    /// For other types: NOERROR, no records.
    empty: Option<Packed>,
}

/// A parsed hosts file, every answer encoded.
#[derive(Debug, Default)]
pub struct Hosts {
    names: HashMap<Box<[u8]>, HostEntry>,
    /// `line N: reason` for lines left out.
    pub skipped: Vec<String>,
    /// The file's modification time when read.
    pub(crate) modified: Option<SystemTime>,
}

impl Hosts {
    /// Parses hosts-file text.
    pub fn parse(text: &str) -> Hosts {
        let mut records: HashMap<Vec<u8>, (Name, Vec<Record>)> = HashMap::new();
        let mut skipped = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("");
            let mut words = line.split_whitespace();
            let Some(addr) = words.next() else { continue };
            let Ok(ip) = addr.split('%').next().unwrap_or(addr).parse::<IpAddr>() else {
                skipped.push(format!("line {}: {addr:?} is not an address", i + 1));
                continue;
            };
            let mut any = false;
            for host in words {
                let Some(name) = Name::from_ascii(host).ok().filter(|n| n.num_labels() > 0).map(|mut n| {
                    n.set_fqdn(true);
                    n.to_lowercase()
                }) else {
                    skipped.push(format!("line {}: {host:?} is not a name", i + 1));
                    continue;
                };
                let rdata = match ip {
                    IpAddr::V4(v4) => RData::A(A(v4)),
                    IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
                };
                let r = Record::from_rdata(name.clone(), HOSTS_TTL, rdata);
                let slot = &mut records.entry(wire_name(&name)).or_insert_with(|| (name.clone(), Vec::new())).1;
                if !slot.contains(&r) {
                    slot.push(r);
                }
                let rev = reverse_name(ip);
                let ptr = Record::from_rdata(rev.clone(), HOSTS_TTL, RData::PTR(PTR(name)));
                let slot = &mut records.entry(wire_name(&rev)).or_insert_with(|| (rev.clone(), Vec::new())).1;
                if !slot.contains(&ptr) {
                    slot.push(ptr);
                }
                any = true;
            }
            if !any && !skipped.last().is_some_and(|s| s.starts_with(&format!("line {}:", i + 1))) {
                skipped.push(format!("line {}: no name after {addr}", i + 1));
            }
        }
        let mut names = HashMap::new();
        for (key, (owner, rrs)) in records {
            let mut e = HostEntry::default();
            for t in [ty::A, ty::AAAA, ty::PTR] {
                let set: Vec<Record> = rrs.iter().filter(|r| u16::from(r.record_type()) == t).cloned().collect();
                if let Some(p) = (!set.is_empty()).then(|| pack(&owner, t, &set, &[], &[], ResponseCode::NoError)).flatten() {
                    e.answers.push((t, p));
                }
            }
            e.empty = pack(&owner, 0, &[], &[], &[], ResponseCode::NoError);
            names.insert(key.into_boxed_slice(), e);
        }
        Hosts { names, skipped, modified: None }
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> std::io::Result<Hosts> {
        let modified = std::fs::metadata(path)?.modified().ok();
        let mut h = Hosts::parse(&std::fs::read_to_string(path)?);
        h.modified = modified;
        Ok(h)
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The answer for `name` (lower-case wire form), when the file has the name.
    pub(crate) fn answer(&self, name: &[u8], qtype: u16) -> Option<&Packed> {
        let e = self.names.get(name)?;
        e.answers.iter().find(|(t, _)| *t == qtype).map(|(_, p)| p).or(e.empty.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_names_aliases_and_reverse() {
        let h = Hosts::parse("# comment\n198.18.9.1 db.corp.test db # primary\n198.18.9.2\tDB.corp.test\nfd00::9 db.corp.test\nnot-an-ip x\n198.18.9.3\n198.18.9.4 bad..name\n");
        assert_eq!(h.skipped, ["line 5: \"not-an-ip\" is not an address", "line 6: no name after 198.18.9.3", "line 7: \"bad..name\" is not a name"]);
        let n = |s: &str| crate::wire::name_from_str(s).unwrap();
        let a = h.answer(&n("db.corp.test"), ty::A).unwrap();
        assert_eq!(crate::wire::get_u16(&a.bytes, 6), Some(2), "two A records");
        let aaaa = h.answer(&n("db.corp.test"), ty::AAAA).unwrap();
        assert_eq!(crate::wire::get_u16(&aaaa.bytes, 6), Some(1));
        assert_eq!(crate::wire::get_u16(&h.answer(&n("db"), ty::A).unwrap().bytes, 6), Some(1), "an alias");
        let mx = h.answer(&n("db.corp.test"), ty::MX).unwrap();
        assert_eq!(crate::wire::get_u16(&mx.bytes, 6), Some(0), "other types: empty NOERROR");
        assert!(h.answer(&n("1.9.18.198.in-addr.arpa"), ty::PTR).is_some());
        assert!(h.answer(&n("other.corp.test"), ty::A).is_none());
    }
}
