//! The nftables dataplane: [`render`] a Plan into a [`Ruleset`], apply the difference from what
//! the kernel has through netlink (`nftnl`), in one atomic batch.
//!
//! After a successful batch the applied ruleset is remembered; the next sync diffs against it
//! fragment by fragment, skipping unchanged services by pointer, so an endpoint change costs the
//! same with 10 services or 10,000. A resync (and the first sync after a start) reads the table
//! back from the kernel instead and repairs whatever differs: rules already right are kept
//! (recognised by the fingerprint in their comment), so a restart neither flushes nor reorders.

pub mod ir;
pub mod netlink;
pub mod render;

use std::collections::{BTreeMap, HashMap, HashSet};

pub use ir::Ruleset;
use ir::*;
use netlink::{BatchBuilder, NetlinkError, Observed, Op, Socket};
pub use render::{render, TABLE};

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Changes applied (0: the kernel already matched).
    pub ops: usize,
    /// Netlink messages in the batch.
    pub messages: usize,
    /// Whether the kernel's state was read back first (start-up, resync, after an error).
    pub observed: bool,
}

/// A set element: key and (for maps) value.
type Element = (ElemKey, Option<Value>);

/// The changes between two states, by phase (see [`Changes::into_ops`] for the order).
#[derive(Default)]
struct Changes<'a> {
    add_table: bool,
    rebuild: bool,
    add_sets: Vec<&'a SetDef>,
    add_chains: Vec<&'a ChainDef>,
    del_elems: BTreeMap<String, (SetKind, Vec<ElemKey>)>,
    add_elems: BTreeMap<String, (SetKind, Vec<Element>)>,
    /// Chains whose rules are (re)written; `true` if the chain existed and is flushed first.
    rewrite: Vec<(&'a ChainDef, bool)>,
    del_chains: Vec<String>,
    del_sets: Vec<String>,
}

impl<'a> Changes<'a> {
    /// Orders the changes so that every reference is valid at every step of the batch:
    /// new objects first, element removals before additions (a frontend may move between
    /// services), rules, new elements, removals of chains and sets last.
    fn into_ops(self) -> Vec<Op<'a>> {
        let mut ops = Vec::new();
        if self.add_table || self.rebuild {
            ops.push(Op::AddTable);
        }
        if self.rebuild {
            ops.push(Op::DelTable);
            ops.push(Op::AddTable);
        }
        ops.extend(self.add_sets.into_iter().map(Op::AddSet));
        ops.extend(self.add_chains.into_iter().map(Op::AddChain));
        for (set, (kind, mut keys)) in self.del_elems {
            keys.sort();
            ops.push(Op::DelElems(set, kind, keys));
        }
        // Rules before new elements: a rule that looks up a map makes the kernel check every
        // element already in it when the rule is added (10,000 rules × 100,000 elements on a
        // full sync otherwise); elements added afterwards are checked one by one.
        for (chain, flush) in self.rewrite {
            if flush {
                ops.push(Op::FlushChain(chain.name.clone()));
            }
            ops.extend(chain.rules.iter().map(|r| Op::AddRule(&chain.name, r)));
        }
        for (set, (kind, mut elems)) in self.add_elems {
            elems.sort_by_key(|a| a.0);
            ops.push(Op::AddElems(set, kind, elems));
        }
        ops.extend(self.del_chains.iter().map(|c| Op::FlushChain(c.clone())));
        ops.extend(self.del_chains.into_iter().map(Op::DelChain));
        ops.extend(self.del_sets.into_iter().map(Op::DelSet));
        ops
    }

    fn set_kind(sets: &HashMap<&str, SetKind>, name: &str) -> SetKind {
        sets.get(name).copied().unwrap_or(SetKind::Addrs)
    }
}

static EMPTY: Fragment = Fragment { sets: Vec::new(), chains: Vec::new(), elements: Vec::new() };

/// Diff between the ruleset applied last and the new one, fragment by fragment.
fn diff_rulesets<'a>(old: &'a Ruleset, new: &'a Ruleset) -> Changes<'a> {
    use std::sync::Arc;
    let mut ch = Changes::default();
    // The fragments to compare: when `new` is `old` with some fragments re-rendered, those
    // (O(changes)); otherwise all: changed or added ones, then removed ones, an unchanged one
    // costing a pointer compare.
    type Pair<'b> = (Option<&'b Arc<Fragment>>, Option<&'b Arc<Fragment>>);
    let pairs: Vec<Pair<'a>> = match &new.delta {
        Some((base, keys)) if *base == old.id && old.id != 0 => {
            keys.iter().map(|k| (old.fragments.get(k), new.fragments.get(k))).collect()
        }
        _ => new
            .fragments
            .iter()
            .map(|(k, n)| (old.fragments.get(k), Some(n)))
            .chain(old.fragments.iter().filter(|(k, _)| !new.fragments.contains_key(*k)).map(|(_, o)| (Some(o), None)))
            .collect(),
    };
    // Set kinds (for element messages): sets are declared in the skeleton or in the fragment
    // whose elements use them, so the skeleton and the fragments compared are enough.
    let kinds: HashMap<&str, SetKind> = [old.fragments.get(""), new.fragments.get("")]
        .into_iter()
        .flatten()
        .chain(pairs.iter().flat_map(|(o, n)| [*o, *n]).flatten())
        .flat_map(|f| f.sets.iter())
        .map(|s| (s.name.as_str(), s.kind))
        .collect();
    for (o, n) in pairs {
        if let (Some(o), Some(n)) = (o, n) {
            if std::sync::Arc::ptr_eq(o, n) || o == n {
                continue;
            }
        }
        let o: &Fragment = o.map(|f| &**f).unwrap_or(&EMPTY);
        let n: &Fragment = n.map(|f| &**f).unwrap_or(&EMPTY);
        let old_sets: HashSet<&str> = o.sets.iter().map(|s| s.name.as_str()).collect();
        let new_sets: HashSet<&str> = n.sets.iter().map(|s| s.name.as_str()).collect();
        ch.add_sets.extend(n.sets.iter().filter(|s| !old_sets.contains(s.name.as_str())));
        ch.del_sets.extend(o.sets.iter().filter(|s| !new_sets.contains(s.name.as_str())).map(|s| s.name.clone()));
        let old_chains: HashMap<&str, &ChainDef> = o.chains.iter().map(|c| (c.name.as_str(), c)).collect();
        let new_chains: HashSet<&str> = n.chains.iter().map(|c| c.name.as_str()).collect();
        for c in &n.chains {
            match old_chains.get(c.name.as_str()) {
                None => {
                    ch.add_chains.push(c);
                    ch.rewrite.push((c, false));
                }
                Some(oc) if oc.rules != c.rules || oc.base != c.base => ch.rewrite.push((c, true)),
                Some(_) => {}
            }
        }
        ch.del_chains.extend(o.chains.iter().filter(|c| !new_chains.contains(c.name.as_str())).map(|c| c.name.clone()));
        let old_el: HashMap<(&str, ElemKey), &Option<Value>> = o.elements.iter().map(|(s, k, v)| ((s.as_str(), *k), v)).collect();
        let new_el: HashMap<(&str, ElemKey), &Option<Value>> = n.elements.iter().map(|(s, k, v)| ((s.as_str(), *k), v)).collect();
        for (s, k, v) in &o.elements {
            if new_el.get(&(s.as_str(), *k)) != Some(&v) {
                ch.del_elems.entry(s.clone()).or_insert_with(|| (Changes::set_kind(&kinds, s), Vec::new())).1.push(*k);
            }
        }
        for (s, k, v) in &n.elements {
            if old_el.get(&(s.as_str(), *k)) != Some(&v) {
                ch.add_elems.entry(s.clone()).or_insert_with(|| (Changes::set_kind(&kinds, s), Vec::new())).1.push((*k, v.clone()));
            }
        }
    }
    ch
}

/// Diff between what the kernel has and the new ruleset.
fn diff_observed<'a>(obs: &Observed, new: &'a Ruleset) -> Changes<'a> {
    let mut ch = Changes { add_table: !obs.table, ..Default::default() };
    let kinds: HashMap<&str, SetKind> = new.sets().map(|s| (s.name.as_str(), s.kind)).collect();
    // A set of the wrong type or a base chain hooked differently cannot be changed in place:
    // rebuild the table (atomically, in the same batch).
    let incompatible = new.sets().any(|s| obs.sets.get(&s.name).is_some_and(|o| o.kind != Some(s.kind)))
        || new.chains().any(|c| obs.chains.get(&c.name).is_some_and(|o| o.base != c.base));
    // No table yet (a node's first start), or one that must be rebuilt: everything is added,
    // nothing needs comparing.
    if incompatible || !obs.table {
        let mut ch = Changes { rebuild: incompatible, add_table: !obs.table, ..Default::default() };
        ch.add_sets.extend(new.sets());
        ch.add_chains.extend(new.chains());
        for (s, k, v) in new.elements() {
            // Looked up by &str first: an owned key per element is 100,000 allocations.
            match ch.add_elems.get_mut(s.as_str()) {
                Some(e) => e.1.push((*k, v.clone())),
                None => {
                    ch.add_elems.insert(s.clone(), (Changes::set_kind(&kinds, s), vec![(*k, v.clone())]));
                }
            }
        }
        ch.rewrite.extend(new.chains().map(|c| (c, false)));
        return ch;
    }
    let mut want_sets = HashSet::new();
    for s in new.sets() {
        want_sets.insert(s.name.as_str());
        if !obs.sets.contains_key(&s.name) {
            ch.add_sets.push(s);
        }
    }
    let mut want_chains = HashSet::new();
    for c in new.chains() {
        want_chains.insert(c.name.as_str());
        match obs.chains.get(&c.name) {
            None => {
                ch.add_chains.push(c);
                ch.rewrite.push((c, false));
            }
            Some(o) => {
                let same = o.rules.len() == c.rules.len() && o.rules.iter().zip(&c.rules).all(|(f, r)| *f == Some(r.fingerprint()));
                if !same {
                    ch.rewrite.push((c, true));
                }
            }
        }
    }
    let mut want_el: HashMap<&str, HashMap<ElemKey, &Option<Value>>> = HashMap::new();
    for (s, k, v) in new.elements() {
        want_el.entry(s.as_str()).or_default().insert(*k, v);
    }
    for s in new.sets() {
        if matches!(s.kind, SetKind::Affinity { .. }) {
            continue;
        }
        let have = obs.sets.get(&s.name).map(|o| &o.elements);
        let want = want_el.remove(s.name.as_str()).unwrap_or_default();
        if let Some(have) = have {
            for (k, v) in have {
                if want.get(k).map(|w| *w != v).unwrap_or(true) {
                    ch.del_elems.entry(s.name.clone()).or_insert_with(|| (s.kind, Vec::new())).1.push(*k);
                }
            }
        }
        for (k, v) in want {
            if have.and_then(|h| h.get(&k)) != Some(v) {
                ch.add_elems.entry(s.name.clone()).or_insert_with(|| (s.kind, Vec::new())).1.push((k, v.clone()));
            }
        }
    }
    let mut stale: Vec<String> = obs.chains.keys().filter(|c| !want_chains.contains(c.as_str())).cloned().collect();
    stale.sort();
    ch.del_chains = stale;
    let mut stale: Vec<String> = obs.sets.keys().filter(|s| !want_sets.contains(s.as_str())).cloned().collect();
    stale.sort();
    ch.del_sets = stale;
    ch
}

/// The same changes as an `nft -f` script (for the `nft -f` benchmark anchor, and for humans:
/// what a sync would do, in nft's own words).
pub fn ops_to_nft(table: &str, ops: &[Op<'_>]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let t = format!("ip {table}");
    for op in ops {
        let _ = match op {
            Op::AddTable => writeln!(s, "add table {t}"),
            Op::DelTable => writeln!(s, "delete table {t}"),
            Op::AddSet(d) => {
                let (word, typ) = match d.kind {
                    SetKind::Addrs => ("set", "ipv4_addr;".to_string()),
                    SetKind::Affinity { timeout_secs } => ("set", format!("ipv4_addr; flags dynamic,timeout; timeout {timeout_secs}s;")),
                            k => {
                        let (w, t) = k.nft_type();
                        (w, format!("{t};"))
                    }
                };
                writeln!(s, "add {word} {t} {} {{ type {typ} }}", d.name)
            }
            Op::DelSet(n) => writeln!(s, "delete set {t} {n}"),
            Op::AddChain(c) => match c.base {
                Some(b) => writeln!(
                    s,
                    "add chain {t} {} {{ type {} hook {} priority {}; policy accept; }}",
                    c.name,
                    if b.nat { "nat" } else { "filter" },
                    b.hook.name(),
                    b.priority
                ),
                None => writeln!(s, "add chain {t} {}", c.name),
            },
            Op::FlushChain(c) => writeln!(s, "flush chain {t} {c}"),
            Op::DelChain(c) => writeln!(s, "delete chain {t} {c}"),
            Op::AddRule(c, r) => writeln!(s, "add rule {t} {c} {}", r.text()),
            Op::AddElems(set, _, e) => {
                let items: Vec<String> = e.iter().map(|(k, v)| match v {
                    Some(v) => format!("{} : {}", k.text(), v.text()),
                    None => k.text(),
                }).collect();
                writeln!(s, "add element {t} {set} {{ {} }}", items.join(", "))
            }
            Op::DelElems(set, _, keys) => {
                let items: Vec<String> = keys.iter().map(|k| k.text()).collect();
                writeln!(s, "delete element {t} {set} {{ {} }}", items.join(", "))
            }
        };
    }
    s
}

/// What syncing from `old` to `new` would do, as an `nft -f` script.
pub fn diff_as_nft(old: &Ruleset, new: &Ruleset) -> String {
    ops_to_nft(&new.table, &diff_rulesets(old, new).into_ops())
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// The nftables dataplane of this network namespace (the one of the thread that first syncs).
pub struct Nftables {
    table: String,
    sock: Option<Socket>,
    last: Option<Ruleset>,
}

impl Default for Nftables {
    fn default() -> Self {
        Self::new()
    }
}

impl Nftables {
    pub fn new() -> Self {
        Nftables { table: TABLE.to_string(), sock: None, last: None }
    }

    fn sock(&mut self) -> Result<&mut Socket, NftError> {
        if self.sock.is_none() {
            self.sock = Some(Socket::open()?);
        }
        Ok(self.sock.as_mut().expect("just opened"))
    }

    /// Reads the table back from the kernel.
    pub fn observe(&mut self) -> Result<Observed, NftError> {
        let table = self.table.clone();
        Ok(netlink::observe(self.sock()?, &table)?)
    }

    /// Makes the kernel hold `desired`. `observe`: compare with the kernel's actual state rather
    /// than with what was applied last (always done on the first sync).
    pub fn sync(&mut self, desired: &Ruleset, observe: bool) -> Result<SyncReport, NftError> {
        let t0 = std::time::Instant::now();
        let last = if observe { None } else { self.last.take() };
        let observed_now = last.is_none();
        let obs;
        let changes = match &last {
            None => {
                obs = self.observe()?;
                diff_observed(&obs, desired)
            }
            Some(last) => diff_rulesets(last, desired),
        };
        let ops = changes.into_ops();
        let t1 = t0.elapsed();
        let mut report = SyncReport { ops: ops.len(), messages: 0, observed: observed_now };
        if !ops.is_empty() {
            let mut b = BatchBuilder::new(&self.table);
            for (i, op) in ops.iter().enumerate() {
                b.push(i as u32, op);
            }
            let batch = b.finish();
            let t2 = t0.elapsed();
            report.messages = batch.messages();
            let result = self.sock()?.send_batch(&batch, |i| ops.get(i as usize).map(|o| o.describe()).unwrap_or_default());
            tracing::debug!(diff = ?t1, encode = ?(t2 - t1), send = ?(t0.elapsed() - t2), bytes = batch.bytes.len(), "nftables batch applied");
            if let Err(e) = result {
                self.last = None;
                return Err(e.into());
            }
        }
        self.last = Some(desired.clone());
        Ok(report)
    }

    /// Removes our table (for `netd cleanup`, a switch of `--proxy-mode`, and tests). Returns
    /// whether it was there.
    pub fn remove(&mut self) -> Result<bool, NftError> {
        self.last = None;
        let obs = self.observe()?;
        if obs.table {
            let mut b = BatchBuilder::new(&self.table);
            b.push(0, &Op::DelTable);
            let batch = b.finish();
            self.sock()?.send_batch(&batch, |_| "delete table".into())?;
        }
        Ok(obs.table)
    }
}

#[cfg(test)]
mod tests;
