//! The iptables dataplane, for nodes without nftables: kube-proxy's chain layout with netd's
//! names (`NETD-SERVICES`, `NETD-SVC-*`, `NETD-SEP-*`, `NETD-EXT-*`, `NETD-SVL-*`, ...), applied
//! with `iptables-restore --noflush` touching only the chains that changed.
//!
//! Rules are rendered exactly as `iptables-save` prints them, so the chains read back from the
//! kernel compare equal to the rendering: a restart, or a resync, rewrites nothing that is
//! already right. Per-packet cost is linear in the number of services here (iptables has no
//! verdict maps); that is what the nftables backend is for.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;

use ipnet::Ipv4Net;

use crate::model::{Endpoint, NoEndpoints, NodeInfo, Plan, Proto, ServicePortPlan};
use crate::nft::ir::fnv1a;

pub const MASQ_MARK: u32 = 0x4000;
const SERVICES: &str = "NETD-SERVICES";
const NODEPORTS: &str = "NETD-NODEPORTS";
const POSTROUTING: &str = "NETD-POSTROUTING";
const MARK_MASQ: &str = "NETD-MARK-MASQ";

/// Which table a chain lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Nat,
    Filter,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Nat => "nat",
            Table::Filter => "filter",
        }
    }
}

/// The jumps from the built-in chains into ours: (table, built-in chain, rule).
pub fn hooks() -> Vec<(Table, &'static str, String)> {
    let portals = format!("-m comment --comment \"netd service portals\" -j {SERVICES}");
    let firewall = format!("-m conntrack --ctstate NEW -m comment --comment \"netd service portals\" -j {SERVICES}");
    vec![
        (Table::Nat, "PREROUTING", portals.clone()),
        (Table::Nat, "OUTPUT", portals),
        (Table::Nat, "POSTROUTING", format!("-m comment --comment \"netd postrouting rules\" -j {POSTROUTING}")),
        (Table::Filter, "INPUT", firewall.clone()),
        (Table::Filter, "FORWARD", firewall.clone()),
        (Table::Filter, "OUTPUT", firewall),
    ]
}

/// What one service port contributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fragment {
    /// Its own nat chains, with their rules (each without the leading `-A CHAIN`).
    pub chains: Vec<(String, Vec<String>)>,
    /// Its rules in nat `NETD-SERVICES`.
    pub services: Vec<String>,
    /// Its rules in nat `NETD-NODEPORTS`.
    pub nodeports: Vec<String>,
    /// Its rules in filter `NETD-SERVICES` (rejecting or dropping frontends without endpoints).
    pub filter: Vec<String>,
    /// Its rule rejecting the other ports of its ClusterIP (after every service's `filter`).
    pub cluster_ip: Vec<String>,
}

/// The iptables artifact: per-service fragments plus the node-level parts.
#[derive(Debug, Clone, Default)]
pub struct IptRuleset {
    pub fragments: BTreeMap<String, Arc<Fragment>>,
    sources: BTreeMap<String, Arc<ServicePortPlan>>,
    /// How NETD-SERVICES reaches NETD-NODEPORTS (one rule per node address).
    nodeport_jumps: Vec<String>,
    /// How filter NETD-SERVICES matches a NodePort destination.
    nodeport_dst: Vec<String>,
    /// The service range: what is left of it after the ClusterIPs is dropped.
    service_cidr: Option<Ipv4Net>,
}

impl IptRuleset {
    /// Every chain of ours with its rules, the shared chains assembled from the fragments.
    pub fn chains(&self) -> BTreeMap<(Table, String), Vec<String>> {
        let mut m = BTreeMap::new();
        let mut services = Vec::new();
        let mut nodeports = Vec::new();
        let mut filter = Vec::new();
        let mut cluster_ips = Vec::new();
        for f in self.fragments.values() {
            for (name, rules) in &f.chains {
                m.insert((Table::Nat, name.clone()), rules.clone());
            }
            services.extend(f.services.iter().cloned());
            nodeports.extend(f.nodeports.iter().cloned());
            filter.extend(f.filter.iter().cloned());
            cluster_ips.extend(f.cluster_ip.iter().cloned());
        }
        // Still addressed to a ClusterIP or the service range once the nat rules are done: no
        // service port took it. Addresses of the node itself (the cluster DNS VIP) are not ours.
        if !cluster_ips.is_empty() || self.service_cidr.is_some() {
            filter.push("-m addrtype --dst-type LOCAL -j RETURN".into());
        }
        filter.extend(cluster_ips);
        if let Some(cidr) = self.service_cidr {
            filter.push(format!("-d {cidr} -m comment --comment \"netd unallocated service IPs\" -j DROP"));
        }
        services.extend(self.nodeport_jumps.iter().cloned());
        m.insert((Table::Nat, SERVICES.into()), services);
        m.insert((Table::Nat, NODEPORTS.into()), nodeports);
        m.insert(
            (Table::Nat, POSTROUTING.into()),
            vec![
                format!("-m mark ! --mark {MASQ_MARK:#x}/{MASQ_MARK:#x} -j RETURN"),
                format!("-j MARK --set-xmark {MASQ_MARK:#x}/0x0"),
                "-m comment --comment \"netd service traffic requiring SNAT\" -j MASQUERADE --random-fully".into(),
            ],
        );
        m.insert((Table::Nat, MARK_MASQ.into()), vec![format!("-j MARK --set-xmark {MASQ_MARK:#x}/{MASQ_MARK:#x}")]);
        m.insert((Table::Filter, SERVICES.into()), filter);
        m
    }

    /// The whole ruleset as `iptables-restore` input (golden-tested).
    pub fn to_restore(&self) -> String {
        let chains = self.chains();
        let mut s = String::new();
        for table in [Table::Nat, Table::Filter] {
            let _ = writeln!(s, "*{}", table.name());
            for ((t, c), _) in chains.iter().filter(|((t, _), _)| *t == table) {
                let _ = t;
                let _ = writeln!(s, ":{c} - [0:0]");
            }
            for (t, chain, rule) in hooks().iter().filter(|(t, _, _)| *t == table) {
                let _ = t;
                let _ = writeln!(s, "-A {chain} {rule}");
            }
            for ((_, c), rules) in chains.iter().filter(|((t, _), _)| *t == table) {
                for r in rules {
                    let _ = writeln!(s, "-A {c} {r}");
                }
            }
            s.push_str("COMMIT\n");
        }
        s
    }
}

/// A 16-character base32 hash, as kube-proxy names its chains.
fn hash16(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let a = fnv1a(s.as_bytes());
    let b = fnv1a(format!("netd:{s}").as_bytes());
    let mut out = String::with_capacity(16);
    for i in 0..8 {
        out.push(ALPHABET[((a >> (i * 5)) & 31) as usize] as char);
        out.push(ALPHABET[((b >> (i * 5)) & 31) as usize] as char);
    }
    out
}

struct Names {
    id: String,
    comment: String,
}

impl Names {
    fn new(sp: &ServicePortPlan) -> Self {
        let id = sp.key.slug(sp.port);
        let comment = if sp.key.port_name.is_empty() { sp.key.service.to_string() } else { format!("{}:{}", sp.key.service, sp.key.port_name) };
        Names { id, comment }
    }
    fn svc(&self) -> String {
        format!("NETD-SVC-{}", hash16(&self.id))
    }
    fn svl(&self) -> String {
        format!("NETD-SVL-{}", hash16(&self.id))
    }
    fn ext(&self) -> String {
        format!("NETD-EXT-{}", hash16(&self.id))
    }
    fn fw(&self) -> String {
        format!("NETD-FW-{}", hash16(&self.id))
    }
    fn sep(&self, e: &Endpoint) -> String {
        format!("NETD-SEP-{}", hash16(&format!("{}__{}", self.id, e.addr())))
    }
}

/// The probability as `iptables-save` prints it (stored as a 31-bit fraction).
fn probability(n: usize) -> String {
    let p = 1.0 / n as f64;
    let stored = (p * 2147483648.0).round();
    format!("{:.11}", stored / 2147483648.0)
}

fn dport(proto: Proto, port: u16) -> String {
    format!("-m {proto} --dport {port}")
}

/// Rules that pick an endpoint in an SVC or SVL chain.
fn balance(sp: &ServicePortPlan, n: &Names, eps: &[Endpoint]) -> Vec<String> {
    let mut rules = Vec::new();
    if let Some(t) = sp.affinity_timeout {
        for e in eps {
            let sep = n.sep(e);
            rules.push(format!(
                "-m comment --comment \"{} -> {}\" -m recent --rcheck --seconds {t} --reap --name {sep} --mask 255.255.255.255 --rsource -j {sep}",
                n.comment,
                e.addr()
            ));
        }
    }
    for (i, e) in eps.iter().enumerate() {
        let left = eps.len() - i;
        if left > 1 {
            rules.push(format!("-m comment --comment \"{} -> {}\" -m statistic --mode random --probability {} -j {}", n.comment, e.addr(), probability(left), n.sep(e)));
        } else {
            rules.push(format!("-m comment --comment \"{} -> {}\" -j {}", n.comment, e.addr(), n.sep(e)));
        }
    }
    rules
}

fn no_endpoints(v: NoEndpoints, proto: Proto) -> &'static str {
    match (v, proto) {
        (NoEndpoints::Drop, _) => "-j DROP",
        (NoEndpoints::Reject, Proto::Tcp) => "-j REJECT --reject-with tcp-reset",
        (NoEndpoints::Reject, _) => "-j REJECT --reject-with icmp-port-unreachable",
    }
}

/// One service port's chains and rules (kube-proxy's iptables layout).
pub fn service_fragment(sp: &ServicePortPlan, node: &NodeInfo, nodeport_dst: &[String]) -> Fragment {
    let cluster_cidr = node.cluster_cidr;
    let n = Names::new(sp);
    let p = sp.key.proto;
    let mut f = Fragment::default();
    let internal = sp.internal_endpoints();
    let external = sp.external_endpoints();
    let need_local = !sp.local_endpoints.is_empty() && (sp.internal_local || (sp.external_local && sp.has_external()));
    // With externalTrafficPolicy Local, pods and the node reach the cluster's endpoints through
    // the external frontends even when this node has none (kube-proxy's short-circuit).
    let short_circuit = sp.external_local && sp.has_external();
    let need_cluster = !sp.cluster_endpoints.is_empty() && (!sp.internal_local || (sp.has_external() && (!external.is_empty() || short_circuit)));
    let mut used: BTreeMap<(std::net::Ipv4Addr, u16), &Endpoint> = BTreeMap::new();
    if need_cluster {
        used.extend(sp.cluster_endpoints.iter().map(|e| ((e.ip, e.port), e)));
    }
    if need_local {
        used.extend(sp.local_endpoints.iter().map(|e| ((e.ip, e.port), e)));
    }
    for e in used.values() {
        let sep = n.sep(e);
        let recent = if sp.affinity_timeout.is_some() { format!(" -m recent --set --name {sep} --mask 255.255.255.255 --rsource") } else { String::new() };
        f.chains.push((
            sep.clone(),
            vec![
                format!("-s {}/32 -m comment --comment \"{}\" -j {MARK_MASQ}", e.ip, n.comment),
                format!("-p {p} -m comment --comment \"{}\"{recent} -m {p} -j DNAT --to-destination {}", n.comment, e.addr()),
            ],
        ));
    }
    if need_cluster {
        let mut rules = Vec::new();
        if let (Some(vip), Some(cidr)) = (sp.cluster_ip, cluster_cidr) {
            rules.push(format!("! -s {cidr} -d {vip}/32 -p {p} -m comment --comment \"{} cluster IP\" {} -j {MARK_MASQ}", n.comment, dport(p, sp.port)));
        }
        rules.extend(balance(sp, &n, &sp.cluster_endpoints));
        f.chains.push((n.svc(), rules));
    }
    if need_local {
        let mut rules = Vec::new();
        // internalTrafficPolicy Local still masquerades the node and off-cluster clients.
        if let (true, Some(vip), Some(cidr)) = (sp.internal_local, sp.cluster_ip, cluster_cidr) {
            rules.push(format!("! -s {cidr} -d {vip}/32 -p {p} -m comment --comment \"{} cluster IP\" {} -j {MARK_MASQ}", n.comment, dport(p, sp.port)));
        }
        rules.extend(balance(sp, &n, &sp.local_endpoints));
        f.chains.push((n.svl(), rules));
    }
    if let Some(vip) = sp.cluster_ip {
        if sp.lists_cluster_ip {
            f.cluster_ip.push(format!("-d {vip}/32 -m comment --comment \"{} has no such port\" -j REJECT --reject-with icmp-port-unreachable", sp.key.service));
        }
        if internal.is_empty() {
            f.filter.push(format!(
                "-d {vip}/32 -p {p} -m comment --comment \"{} has no {}endpoints\" {} {}",
                n.comment,
                if sp.internal_fallback() == NoEndpoints::Drop { "local " } else { "" },
                dport(p, sp.port),
                no_endpoints(sp.internal_fallback(), p)
            ));
        } else {
            let target = if sp.internal_local { n.svl() } else { n.svc() };
            f.services.push(format!("-d {vip}/32 -p {p} -m comment --comment \"{} cluster IP\" {} -j {target}", n.comment, dport(p, sp.port)));
        }
    }
    if sp.has_external() {
        let ok = !external.is_empty();
        // Pods and the node still go to the cluster's endpoints (the rest is dropped in filter).
        let nat = ok || (short_circuit && need_cluster);
        if nat {
            let mut rules = Vec::new();
            if sp.external_local {
                if let Some(cidr) = cluster_cidr {
                    rules.push(format!("-s {cidr} -m comment --comment \"pod traffic for {} external destinations\" -j {}", n.comment, n.svc()));
                }
                rules.push(format!("-m comment --comment \"masquerade LOCAL traffic for {} external destinations\" -m addrtype --src-type LOCAL -j {MARK_MASQ}", n.comment));
                rules.push(format!("-m comment --comment \"route LOCAL traffic for {} external destinations\" -m addrtype --src-type LOCAL -j {}", n.comment, n.svc()));
                if ok {
                    rules.push(format!("-j {}", n.svl()));
                }
            } else {
                rules.push(format!("-m comment --comment \"masquerade traffic for {} external destinations\" -j {MARK_MASQ}", n.comment));
                rules.push(format!("-j {}", n.svc()));
            }
            f.chains.push((n.ext(), rules));
        }
        let fallback = no_endpoints(sp.external_fallback(), p);
        let what = if sp.external_fallback() == NoEndpoints::Drop { "local " } else { "" };
        // loadBalancerSourceRanges: the LB IPs go through a firewall chain that passes allowed
        // clients on; the others leave nat untranslated and are dropped in filter.
        let firewall = sp.firewall(node).filter(|_| nat);
        if let Some(allowed) = &firewall {
            let rules = allowed.iter().map(|net| format!("-s {net} -m comment --comment \"{} loadbalancer IP\" -j {}", n.comment, n.ext())).collect();
            f.chains.push((n.fw(), rules));
        }
        for (ip, kind) in sp.external_ips.iter().map(|i| (i, "external IP")).chain(sp.lb_ips.iter().map(|i| (i, "loadbalancer IP"))) {
            if nat {
                let target = if firewall.is_some() && kind == "loadbalancer IP" { n.fw() } else { n.ext() };
                f.services.push(format!("-d {ip}/32 -p {p} -m comment --comment \"{} {kind}\" {} -j {target}", n.comment, dport(p, sp.port)));
                if firewall.is_some() && kind == "loadbalancer IP" {
                    f.filter.push(format!("-d {ip}/32 -p {p} -m comment --comment \"{} not allowed by loadBalancerSourceRanges\" {} -j DROP", n.comment, dport(p, sp.port)));
                }
            }
            if !ok {
                f.filter.push(format!("-d {ip}/32 -p {p} -m comment --comment \"{} has no {what}endpoints\" {} {fallback}", n.comment, dport(p, sp.port)));
            }
        }
        if let Some(np) = sp.node_port {
            if nat {
                f.nodeports.push(format!("-p {p} -m comment --comment \"{}\" {} -j {}", n.comment, dport(p, np), n.ext()));
            }
            if !ok {
                for dst in nodeport_dst {
                    f.filter.push(format!("{dst}-p {p} -m comment --comment \"{} has no {what}endpoints\" {}{} {fallback}", n.comment, addrtype_if(dst), dport(p, np)));
                }
            }
        }
    }
    f
}

/// With no node addresses known, NodePorts match `-m addrtype --dst-type LOCAL` (placed after
/// the comment, where iptables-save prints it).
fn addrtype_if(dst: &str) -> &'static str {
    if dst.is_empty() {
        "-m addrtype --dst-type LOCAL "
    } else {
        ""
    }
}

/// Renders the plan, reusing `prev`'s fragments for unchanged service ports.
pub fn render(plan: &Plan, prev: Option<&IptRuleset>) -> IptRuleset {
    let nodeport_dst: Vec<String> = if plan.node.ips.is_empty() { vec![String::new()] } else { plan.node.ips.iter().map(|ip| format!("-d {ip}/32 ")).collect() };
    let nodeport_jumps = if plan.node.ips.is_empty() {
        vec![format!("-m comment --comment \"netd service nodeports\" -m addrtype --dst-type LOCAL -j {NODEPORTS}")]
    } else {
        plan.node.ips.iter().map(|ip| format!("-d {ip}/32 -m comment --comment \"netd service nodeports\" -j {NODEPORTS}")).collect()
    };
    let same_node = prev.is_some_and(|p| p.nodeport_dst == nodeport_dst);
    let mut rs = IptRuleset { nodeport_jumps, nodeport_dst: nodeport_dst.clone(), service_cidr: plan.service_cidr, ..Default::default() };
    for sp in plan.services.values() {
        let key = sp.key.slug(sp.port);
        let reuse = prev
            .filter(|_| same_node)
            .and_then(|p| Some((p.sources.get(&key)?, p.fragments.get(&key)?)))
            .filter(|(src, _)| Arc::ptr_eq(src, sp))
            .map(|(_, f)| f.clone());
        let frag = reuse.unwrap_or_else(|| Arc::new(service_fragment(sp, &plan.node, &nodeport_dst)));
        rs.fragments.insert(key.clone(), frag);
        rs.sources.insert(key, sp.clone());
    }
    rs
}

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("running {cmd}: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("{cmd} failed: {stderr}")]
    Failed { cmd: String, stderr: String },
}

/// What `iptables-save` shows of ours: chain → rules, and the built-in chains' rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub chains: BTreeMap<(Table, String), Vec<String>>,
    pub builtin: BTreeMap<(Table, String), Vec<String>>,
}

/// Parses `iptables-save -t TABLE` output.
pub fn parse_save(table: Table, text: &str, obs: &mut Observed) {
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(':') {
            let name = rest.split_whitespace().next().unwrap_or_default();
            if name.starts_with("NETD-") {
                obs.chains.entry((table, name.to_string())).or_default();
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let (chain, rule) = rest.split_once(' ').unwrap_or((rest, ""));
            let key = (table, chain.to_string());
            if chain.starts_with("NETD-") {
                obs.chains.entry(key).or_default().push(rule.to_string());
            } else {
                obs.builtin.entry(key).or_default().push(rule.to_string());
            }
        }
    }
}

/// The `iptables-restore --noflush` input that turns `have` into `want`: changed chains are
/// redeclared (which flushes them) and refilled; stale chains are flushed and deleted; missing
/// jumps from the built-in chains are inserted at the top. `None` when nothing differs.
pub fn diff(have: &Observed, want: &BTreeMap<(Table, String), Vec<String>>) -> Option<String> {
    let mut out = String::new();
    for table in [Table::Nat, Table::Filter] {
        let mut decl = String::new();
        let mut body = String::new();
        for ((t, chain), rules) in want.iter().filter(|((t, _), _)| *t == table) {
            let _ = t;
            if have.chains.get(&(table, chain.clone())) != Some(rules) {
                let _ = writeln!(decl, ":{chain} - [0:0]");
                for r in rules {
                    let _ = writeln!(body, "-A {chain} {r}");
                }
            }
        }
        for (t, chain, rule) in hooks() {
            if t == table && !have.builtin.get(&(t, chain.to_string())).is_some_and(|rs| rs.contains(&rule)) {
                let _ = writeln!(body, "-I {chain} 1 {rule}");
            }
        }
        let stale: BTreeSet<&String> = have.chains.keys().filter(|(t, c)| *t == table && !want.contains_key(&(table, c.clone()))).map(|(_, c)| c).collect();
        for c in &stale {
            let _ = writeln!(decl, ":{c} - [0:0]");
        }
        for c in &stale {
            let _ = writeln!(body, "-X {c}");
        }
        if !decl.is_empty() || !body.is_empty() {
            let _ = write!(out, "*{}\n{decl}{body}COMMIT\n", table.name());
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Applies [`IptRuleset`]s through `iptables-restore` in the calling thread's namespace.
pub struct Iptables {
    restore: String,
    save: String,
    last: Option<BTreeMap<(Table, String), Vec<String>>>,
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Bytes of iptables-restore input written (0: nothing to do).
    pub bytes: usize,
    pub observed: bool,
}

impl Iptables {
    /// `restore`: the iptables-restore binary (`iptables-restore`, `iptables-legacy-restore`,
    /// `iptables-nft-restore`); the matching `-save` is derived from it.
    pub fn new(restore: &str) -> Self {
        Iptables { restore: restore.to_string(), save: restore.replace("-restore", "-save"), last: None }
    }

    pub fn observe(&self) -> Result<Observed, IptablesError> {
        let mut obs = Observed::default();
        for t in [Table::Nat, Table::Filter] {
            let out = run(&self.save, &["-t", t.name()], None)?;
            parse_save(t, &out, &mut obs);
        }
        Ok(obs)
    }

    pub fn sync(&mut self, rs: &IptRuleset, observe: bool) -> Result<SyncReport, IptablesError> {
        let want = rs.chains();
        let (have, observed) = match self.last.take().filter(|_| !observe) {
            Some(last) => {
                let mut o = Observed { chains: last, builtin: BTreeMap::new() };
                // Our hooks were there after the last apply.
                for (t, c, r) in hooks() {
                    o.builtin.entry((t, c.to_string())).or_default().push(r);
                }
                (o, false)
            }
            None => (self.observe()?, true),
        };
        let mut report = SyncReport { bytes: 0, observed };
        if let Some(input) = diff(&have, &want) {
            report.bytes = input.len();
            run(&self.restore, &["--noflush", "--wait"], Some(&input))?;
        }
        self.last = Some(want);
        Ok(report)
    }

    /// Whether any chain or hook of ours is there (what [`Self::remove`] would remove).
    pub fn present(&self) -> Result<bool, IptablesError> {
        Ok(self.observe_ours()?.is_some())
    }

    /// The observed tables if a chain or hook of ours is in them. An absent `iptables-save` (no
    /// iptables on the node) means there is nothing of ours.
    fn observe_ours(&self) -> Result<Option<Observed>, IptablesError> {
        let obs = match self.observe() {
            Ok(obs) => obs,
            Err(IptablesError::Spawn { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let hooked = hooks().into_iter().any(|(t, chain, rule)| obs.builtin.get(&(t, chain.to_string())).is_some_and(|rs| rs.contains(&rule)));
        Ok((!obs.chains.is_empty() || hooked).then_some(obs))
    }

    /// Removes every chain and hook of ours. Returns whether there was any. An absent
    /// `iptables-save` (no iptables on the node) means there is nothing of ours.
    pub fn remove(&mut self) -> Result<bool, IptablesError> {
        self.last = None;
        let Some(obs) = self.observe_ours()? else { return Ok(false) };
        let mut input = String::new();
        for table in [Table::Nat, Table::Filter] {
            let _ = writeln!(input, "*{}", table.name());
            for (t, chain, rule) in hooks() {
                if t == table && obs.builtin.get(&(t, chain.to_string())).is_some_and(|rs| rs.contains(&rule)) {
                    let _ = writeln!(input, "-D {chain} {rule}");
                }
            }
            for (_, c) in obs.chains.keys().filter(|(t, _)| *t == table) {
                let _ = writeln!(input, ":{c} - [0:0]");
            }
            for (_, c) in obs.chains.keys().filter(|(t, _)| *t == table) {
                let _ = writeln!(input, "-X {c}");
            }
            input.push_str("COMMIT\n");
        }
        run(&self.restore, &["--noflush", "--wait"], Some(&input))?;
        Ok(true)
    }
}

/// Runs an iptables tool (`iptables-save`, `iptables-restore`) with `stdin` as its input; its output.
pub fn run(bin: &str, args: &[&str], stdin: Option<&str>) -> Result<String, IptablesError> {
    let cmd = format!("{bin} {}", args.join(" "));
    let mut child = Command::new(bin)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| IptablesError::Spawn { cmd: cmd.clone(), source })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(|source| IptablesError::Spawn { cmd: cmd.clone(), source })?;
    }
    let out = child.wait_with_output().map_err(|source| IptablesError::Spawn { cmd: cmd.clone(), source })?;
    if !out.status.success() {
        return Err(IptablesError::Failed { cmd, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::desired;
    use crate::testdata::{feature_snapshot, node};

    #[test]
    fn golden_iptables_ruleset() {
        let rs = render(&desired(&node(), &feature_snapshot()), None);
        crate::golden::check("iptables.rules", &rs.to_restore());
    }

    #[test]
    fn probabilities_print_like_iptables_save() {
        assert_eq!(probability(2), "0.50000000000");
        assert_eq!(probability(3), "0.33333333349");
    }

    #[test]
    fn diff_touches_only_changed_chains() {
        let rs = render(&desired(&node(), &feature_snapshot()), None);
        let want = rs.chains();
        let mut have = Observed { chains: want.clone(), builtin: BTreeMap::new() };
        for (t, c, r) in hooks() {
            have.builtin.entry((t, c.to_string())).or_default().push(r);
        }
        assert_eq!(diff(&have, &want), None);
        let key = (Table::Nat, SERVICES.to_string());
        have.chains.get_mut(&key).unwrap().pop();
        have.chains.insert((Table::Nat, "NETD-SEP-STALE".into()), vec![]);
        have.builtin.get_mut(&(Table::Filter, "INPUT".to_string())).unwrap().clear();
        let d = diff(&have, &want).unwrap();
        assert!(d.contains(":NETD-SERVICES - [0:0]") && d.contains("-X NETD-SEP-STALE") && d.contains("-I INPUT 1 "), "{d}");
        assert_eq!(d.matches(" - [0:0]").count(), 2, "{d}");
    }

    #[test]
    fn save_output_parses_into_ours_and_builtin() {
        let mut obs = Observed::default();
        parse_save(Table::Nat, ":PREROUTING ACCEPT [0:0]\n:NETD-SVC-X - [0:0]\n:NETD-EMPTY - [0:0]\n-A PREROUTING -j NETD-SERVICES\n-A NETD-SVC-X -j NETD-SEP-Y\n", &mut obs);
        assert_eq!(obs.chains[&(Table::Nat, "NETD-SVC-X".into())], ["-j NETD-SEP-Y"]);
        assert!(obs.chains[&(Table::Nat, "NETD-EMPTY".into())].is_empty());
        assert_eq!(obs.builtin[&(Table::Nat, "PREROUTING".into())], ["-j NETD-SERVICES"]);
    }
}
