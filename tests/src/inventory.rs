//! [`Inventory`]: a snapshot of every kernel object (and file) a node's netd could have made, and
//! the difference between two snapshots. An uninstall test takes one before netd starts and one
//! after `netd cleanup`: anything in the second and not the first was left behind.
//!
//! Each section is a multiset of normalised lines: what identifies an object (a link's name and
//! kind, a route, a rule, an nft rule under its table), never what changes while it lives
//! (counters, neighbour reachability, learned FDB entries, program ids).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cmd::{check, command};
use crate::netns::Netns;

/// Where to look besides the namespace's own kernel state.
#[derive(Debug, Clone, Default)]
pub struct InventoryScope {
    /// Directories whose files (recursively) are part of the node: run, state, CNI conf/bin dirs.
    pub dirs: Vec<PathBuf>,
    /// bpffs directories whose pins are listed.
    pub bpffs: Vec<PathBuf>,
    /// cgroup v2 directories whose attached eBPF programs are counted per attach type.
    pub cgroups: Vec<PathBuf>,
}

/// One snapshot: section name → sorted lines.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inventory {
    pub sections: BTreeMap<&'static str, Vec<String>>,
}

/// What one snapshot has more and less than another, per section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InventoryDiff {
    pub added: BTreeMap<&'static str, Vec<String>>,
    pub removed: BTreeMap<&'static str, Vec<String>>,
}

impl InventoryDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }

    /// Drops the lines `ignore` accepts (what the test itself made), from both sides.
    pub fn without(mut self, ignore: impl Fn(&str, &str) -> bool) -> InventoryDiff {
        for side in [&mut self.added, &mut self.removed] {
            for (section, lines) in side.iter_mut() {
                lines.retain(|l| !ignore(section, l));
            }
            side.retain(|_, lines| !lines.is_empty());
        }
        self
    }
}

impl std::fmt::Display for InventoryDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (sign, side) in [("+", &self.added), ("-", &self.removed)] {
            for (section, lines) in side {
                for l in lines {
                    writeln!(f, "{sign} [{section}] {l}")?;
                }
            }
        }
        Ok(())
    }
}

impl Inventory {
    /// Everything in `ns` and `scope`.
    pub fn take(ns: &Netns, scope: &InventoryScope) -> Result<Inventory> {
        let mut inv = Inventory::default();
        let links: serde_json::Value = serde_json::from_str(&ns.run(&["ip", "-j", "-d", "link", "show"])?).context("ip -j link")?;
        let links = links.as_array().cloned().unwrap_or_default();
        inv.put("links", links.iter().map(link_line).collect());
        let addrs: serde_json::Value = serde_json::from_str(&ns.run(&["ip", "-j", "addr", "show"])?).context("ip -j addr")?;
        let mut lines = Vec::new();
        for l in addrs.as_array().into_iter().flatten() {
            for a in l["addr_info"].as_array().into_iter().flatten() {
                lines.push(format!("{} {}/{} label {}", str_of(&l["ifname"]), str_of(&a["local"]), a["prefixlen"], str_of(&a["label"])));
            }
        }
        // IPv6 link-local addresses (and their routes) come and go with their link, some time
        // after it is up (DAD): the link itself is what is compared.
        inv.put("addresses", lines.into_iter().filter(|l| !l.contains(" fe80:")).collect());
        let mut routes = text_lines(&ns.run(&["ip", "-4", "route", "show", "table", "all"])?);
        routes.extend(text_lines(&ns.run(&["ip", "-6", "route", "show", "table", "all"])?));
        let routes = routes.into_iter().filter(|r| !r.contains("fe80:")).map(|r| strip_word_and_value(&r, "expires").replace(" linkdown", ""));
        inv.put("routes", routes.collect());
        let mut rules = text_lines(&ns.run(&["ip", "-4", "rule", "show"])?);
        rules.extend(text_lines(&ns.run(&["ip", "-6", "rule", "show"])?));
        inv.put("rules", rules);
        // Only neighbours made by software: learned ones come and go with traffic.
        let mut neigh = text_lines(&ns.run(&["ip", "-4", "neigh", "show", "nud", "permanent"])?);
        neigh.extend(text_lines(&ns.run(&["ip", "-6", "neigh", "show", "nud", "permanent"])?));
        inv.put("neighbours", neigh);
        let fdb = text_lines(&ns.run(&["bridge", "fdb", "show"])?);
        inv.put("fdb", fdb.into_iter().filter(|l| l.contains("permanent") || l.contains("static") || l.contains(" dst ")).collect());
        inv.put("nft", nft_lines(&ns.run(&["nft", "-s", "list", "ruleset"])?));
        let mut xt = Vec::new();
        for save in ["iptables-save", "ip6tables-save"] {
            xt.extend(iptables_lines(save, &ns.run(&[save])?));
        }
        inv.put("iptables", xt);
        inv.put("qdiscs", text_lines(&ns.run(&["tc", "qdisc", "show"])?));
        let mut filters = Vec::new();
        for l in &links {
            let dev = str_of(&l["ifname"]);
            for dir in ["ingress", "egress"] {
                let out = ns.exec(&["tc", "filter", "show", "dev", &dev, dir])?;
                filters.extend(text_lines(&String::from_utf8_lossy(&out.stdout)).into_iter().map(|f| format!("{dev} {dir}: {f}")));
            }
        }
        let ifindexes: Vec<(u32, String)> =
            links.iter().filter_map(|l| Some((u32::try_from(l["ifindex"].as_u64()?).ok()?, str_of(&l["ifname"])))).collect();
        filters.extend(tcx_attachments(ns, &ifindexes)?);
        inv.put("tc filters", filters);
        let mut pins = Vec::new();
        for dir in &scope.bpffs {
            pins.extend(walk(dir)?.into_iter().map(|p| format!("{}: {p}", dir.display())));
        }
        inv.put("bpf pins", pins);
        let mut cg = Vec::new();
        for dir in &scope.cgroups {
            cg.extend(cgroup_attachments(dir)?.into_iter().map(|a| format!("{}: {a}", dir.display())));
        }
        inv.put("cgroup attachments", cg);
        let mut files = Vec::new();
        for dir in &scope.dirs {
            files.extend(walk(dir)?.into_iter().map(|p| format!("{}: {p}", dir.display())));
        }
        inv.put("files", files);
        Ok(inv)
    }

    fn put(&mut self, section: &'static str, mut lines: Vec<String>) {
        lines.sort();
        self.sections.insert(section, lines);
    }

    /// What `after` has that `self` has not (added), and the other way round (removed), as
    /// multisets of lines per section.
    pub fn diff(&self, after: &Inventory) -> InventoryDiff {
        let mut d = InventoryDiff::default();
        let empty = Vec::new();
        let sections: std::collections::BTreeSet<&'static str> = self.sections.keys().chain(after.sections.keys()).copied().collect();
        for s in sections {
            let (a, b) = (self.sections.get(s).unwrap_or(&empty), after.sections.get(s).unwrap_or(&empty));
            let added = multiset_minus(b, a);
            let removed = multiset_minus(a, b);
            if !added.is_empty() {
                d.added.insert(s, added);
            }
            if !removed.is_empty() {
                d.removed.insert(s, removed);
            }
        }
        d
    }

    /// The lines of one section.
    pub fn section(&self, name: &str) -> &[String] {
        self.sections.get(name).map(Vec::as_slice).unwrap_or(&[])
    }
}

fn multiset_minus(a: &[String], b: &[String]) -> Vec<String> {
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    for l in b {
        *counts.entry(l).or_default() += 1;
    }
    a.iter()
        .filter(|l| {
            let c = counts.entry(l.as_str()).or_default();
            *c -= 1;
            *c < 0
        })
        .cloned()
        .collect()
}

fn str_of(v: &serde_json::Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_default()
}

/// A link as what identifies it: name, kind, master, VXLAN id, attached XDP program (yes/no).
fn link_line(l: &serde_json::Value) -> String {
    let mut s = str_of(&l["ifname"]);
    let kind = str_of(&l["linkinfo"]["info_kind"]);
    if !kind.is_empty() {
        s.push_str(&format!(" kind {kind}"));
    }
    if let Some(id) = l["linkinfo"]["info_data"]["id"].as_u64() {
        s.push_str(&format!(" id {id}"));
    }
    let master = str_of(&l["master"]);
    if !master.is_empty() {
        s.push_str(&format!(" master {master}"));
    }
    if !l["xdp"].is_null() {
        s.push_str(" xdp");
    }
    s
}

fn text_lines(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()
}

fn strip_word_and_value(line: &str, word: &str) -> String {
    let mut out = Vec::new();
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == word {
            it.next();
        } else {
            out.push(w);
        }
    }
    out.join(" ")
}

/// `nft -s list ruleset` lines, each prefixed with its table (a lone `}` says nothing).
fn nft_lines(text: &str) -> Vec<String> {
    let mut table = String::new();
    let mut out = Vec::new();
    for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(t) = l.strip_prefix("table ") {
            table = t.trim_end_matches(" {").to_string();
            out.push(format!("table {table}"));
        } else if l != "}" {
            out.push(format!("{table}: {l}"));
        }
    }
    out
}

/// `iptables-save` lines without comments and counters, prefixed with the command and table.
fn iptables_lines(save: &str, text: &str) -> Vec<String> {
    let mut table = String::new();
    let mut out = Vec::new();
    for l in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#') && *l != "COMMIT") {
        if let Some(t) = l.strip_prefix('*') {
            table = t.to_string();
            continue;
        }
        // `:CHAIN POLICY [packets:bytes]`
        let l = match l.rfind(" [") {
            Some(i) if l.starts_with(':') => &l[..i],
            _ => l,
        };
        out.push(format!("{save} {table}: {l}"));
    }
    out
}

/// Every path under `dir` (relative, directories with a trailing `/`); nothing if it is absent.
fn walk(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    if dir.is_file() {
        return Ok(vec!["(the file itself)".into()]);
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {}", d.display())),
        };
        for e in entries {
            let e = e?;
            let path = e.path();
            let rel = path.strip_prefix(dir).unwrap_or(&path).display().to_string();
            if e.file_type()?.is_dir() {
                out.push(format!("{rel}/"));
                stack.push(path);
            } else {
                out.push(rel);
            }
        }
    }
    Ok(out)
}

const BPF_PROG_QUERY: libc::c_long = 16;
/// The cgroup attach types (BPF_CGROUP_INET_INGRESS .. BPF_CGROUP_UNIX_GETSOCKNAME and the
/// ones around them; the kernel answers EINVAL for a type that is not a cgroup hook).
const CGROUP_ATTACH_TYPES: std::ops::Range<u32> = 0..60;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

#[repr(C)]
#[derive(Default)]
struct ProgQuery {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// How many programs are attached at `target` (a cgroup fd, or an ifindex for TCX) for
/// `attach_type`; `None` if the kernel does not know that hook there.
fn prog_count(target: u32, attach_type: u32) -> Option<u32> {
    let mut q = ProgQuery { target_fd: target, attach_type, ..Default::default() };
    // SAFETY: `q` is a valid, initialised bpf_attr prefix for BPF_PROG_QUERY that lives for the
    // call; its size is passed, and prog_ids is null (count only), so the kernel writes only
    // inside the struct.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, &mut q as *mut ProgQuery, std::mem::size_of::<ProgQuery>() as u32) };
    (r == 0).then_some(q.prog_cnt)
}

fn cgroup_attachments(dir: &Path) -> Result<Vec<String>> {
    let f = match std::fs::File::open(dir) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("opening cgroup {}", dir.display())),
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f) as u32;
    Ok(CGROUP_ATTACH_TYPES.filter_map(|t| prog_count(fd, t).filter(|n| *n > 0).map(|n| format!("attach type {t}: {n} program(s)"))).collect())
}

/// TCX programs (which `tc filter show` does not list) per link, queried from inside `ns`.
fn tcx_attachments(ns: &Netns, links: &[(u32, String)]) -> Result<Vec<String>> {
    let path = format!("/run/netns/{}", ns.name());
    let links = links.to_vec();
    std::thread::spawn(move || -> Result<Vec<String>> {
        let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns on this short-lived thread only (it moves only this thread into the
        // namespace, and the thread ends right after), with a valid namespace fd.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        anyhow::ensure!(r == 0, "setns {path}: {}", std::io::Error::last_os_error());
        let mut out = Vec::new();
        for (ifindex, name) in &links {
            for (t, dir) in [(BPF_TCX_INGRESS, "tcx ingress"), (BPF_TCX_EGRESS, "tcx egress")] {
                if let Some(n) = prog_count(*ifindex, t).filter(|n| *n > 0) {
                    out.push(format!("{name} {dir}: {n} program(s)"));
                }
            }
        }
        Ok(out)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the TCX query thread panicked"))?
}

/// `ip netns list` names (podman makes `netns-*` ones for its pods).
pub fn netns_names() -> Result<Vec<String>> {
    let out = check(&mut command("ip", &["netns", "list"]))?;
    Ok(out.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_is_a_multiset_difference_per_section() {
        let mut a = Inventory::default();
        a.put("nft", vec!["x".into(), "y".into(), "y".into()]);
        let mut b = Inventory::default();
        b.put("nft", vec!["y".into(), "z".into()]);
        b.put("links", vec!["netd.1 kind vxlan id 1".into()]);
        let d = a.diff(&b);
        assert_eq!(d.added["nft"], vec!["z"]);
        assert_eq!(d.added["links"], vec!["netd.1 kind vxlan id 1"]);
        assert_eq!(d.removed["nft"], vec!["x", "y"]);
        assert!(a.diff(&a).is_empty());
        let d = d.without(|s, _| s == "links" || s == "nft");
        assert!(d.is_empty(), "{d}");
    }

    #[test]
    fn normalises_counters_and_context() {
        let xt = iptables_lines("iptables-save", "# Generated\n*nat\n:PREROUTING ACCEPT [3:180]\n:NETD-SVC - [0:0]\n-A PREROUTING -j NETD-SVC\nCOMMIT\n");
        assert_eq!(xt, vec!["iptables-save nat: :PREROUTING ACCEPT", "iptables-save nat: :NETD-SVC -", "iptables-save nat: -A PREROUTING -j NETD-SVC"]);
        let nft = nft_lines("table ip netd {\n\tchain post {\n\t\tmasquerade\n\t}\n}\n");
        assert_eq!(nft, vec!["table ip netd", "ip netd: chain post {", "ip netd: masquerade"]);
        assert_eq!(strip_word_and_value("fe80::/64 dev x expires 20sec pref medium", "expires"), "fe80::/64 dev x pref medium");
    }
}
