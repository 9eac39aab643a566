//! Taking a node over from flanneld and kube-proxy (`netd run --take-over flannel,kube-proxy`),
//! so that a running node can be switched to netd without an interruption:
//!
//! - flannel: netd uses flanneld's VXLAN device `flannel.<VNI>` as its own, keeping its MAC (the
//!   `VtepMAC` of the node's lease, which peers still on flannel have in their neighbour and FDB
//!   entries), and replaces flanneld's routes through it with its own in place (same destination,
//!   gateway and device, `ip route replace`: the kernel swaps the route atomically). flanneld's
//!   iptables chains (masquerade, forward) are removed once netd's own host rules are programmed.
//! - kube-proxy: its iptables chains are removed once netd's service rules are programmed, so that
//!   at every instant one of the two answers for every Service.
//!
//! Pure here: which chains are whose, and the `iptables-restore` input that removes them; the
//! daemon runs it.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use clap::ValueEnum;

/// What `--take-over` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum Predecessor {
    /// flanneld's vxlan backend: its device, routes and iptables rules.
    Flannel,
    /// kube-proxy in iptables mode: its chains.
    KubeProxy,
}

impl Predecessor {
    pub fn name(self) -> &'static str {
        match self {
            Predecessor::Flannel => "flannel",
            Predecessor::KubeProxy => "kube-proxy",
        }
    }

    /// Whether `chain` of `table` is this predecessor's. kube-proxy's are those its own cleanup
    /// (`kube-proxy --cleanup`) removes; KUBE-MARK-DROP, KUBE-FIREWALL and KUBE-KUBELET-CANARY
    /// are the kubelet's and stay.
    pub fn owns(self, table: &str, chain: &str) -> bool {
        match self {
            Predecessor::Flannel => matches!((table, chain), ("nat", "FLANNEL-POSTRTG") | ("filter", "FLANNEL-FWD")),
            Predecessor::KubeProxy => {
                const NAMED: [&str; 8] = [
                    "KUBE-SERVICES",
                    "KUBE-EXTERNAL-SERVICES",
                    "KUBE-NODEPORTS",
                    "KUBE-POSTROUTING",
                    "KUBE-MARK-MASQ",
                    "KUBE-FORWARD",
                    "KUBE-PROXY-FIREWALL",
                    "KUBE-PROXY-CANARY",
                ];
                const PER_SERVICE: [&str; 6] = ["KUBE-SVC-", "KUBE-SEP-", "KUBE-FW-", "KUBE-XLB-", "KUBE-EXT-", "KUBE-SVL-"];
                NAMED.contains(&chain) || (table == "nat" && PER_SERVICE.iter().any(|p| chain.starts_with(p)))
            }
        }
    }
}

/// The tables predecessors put chains in, for `iptables-save -t`.
pub const TABLES: [&str; 3] = ["nat", "filter", "mangle"];

/// The `iptables-restore --noflush` input removing from one table (`save`: `iptables-save -t
/// TABLE` output) the chains `owned` says are the predecessor's and every rule elsewhere that
/// jumps or goes to one of them (the jumps go first: a chain still referenced cannot be deleted).
/// `None` when the table holds none of them. Also returns the chains removed, for the log.
pub fn removal(table: &str, save: &str, owned: impl Fn(&str, &str) -> bool) -> Option<(String, Vec<String>)> {
    let mut chains: BTreeSet<String> = BTreeSet::new();
    let mut rules: Vec<(String, String)> = Vec::new();
    for line in save.lines() {
        if let Some(rest) = line.strip_prefix(':') {
            let name = rest.split_whitespace().next().unwrap_or_default();
            if owned(table, name) {
                chains.insert(name.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let (chain, rule) = rest.split_once(' ').unwrap_or((rest, ""));
            rules.push((chain.to_string(), rule.to_string()));
        }
    }
    if chains.is_empty() {
        return None;
    }
    let target = |rule: &str| {
        let words: Vec<&str> = rule.split_whitespace().collect();
        words.windows(2).find(|w| w[0] == "-j" || w[0] == "-g").map(|w| w[1].to_string())
    };
    let mut out = format!("*{table}\n");
    for (chain, rule) in &rules {
        if !chains.contains(chain) && target(rule).is_some_and(|t| chains.contains(&t)) {
            let _ = writeln!(out, "-D {chain} {rule}");
        }
    }
    // Declaring a chain again flushes it; then none references another and all can go.
    for c in &chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for c in &chains {
        let _ = writeln!(out, "-X {c}");
    }
    out.push_str("COMMIT\n");
    Some((out, chains.into_iter().collect()))
}

#[derive(Debug, thiserror::Error)]
#[error("removing {who}'s iptables chains: {source}")]
pub struct TakeoverError {
    pub who: &'static str,
    #[source]
    pub source: netd_proxy::iptables::IptablesError,
}

/// The `iptables-restore` commands whose tables may hold a predecessor's chains: netd's own
/// (`restore`), and iptables-legacy's when this network namespace has legacy tables
/// (`legacy_tables`: the content of `/proc/net/ip_tables_names`), since kube-proxy and flanneld
/// use whichever backend the node's iptables uses, which need not be netd's.
pub fn backends(restore: &str, legacy_tables: &str) -> Vec<String> {
    let mut out = vec![restore.to_string()];
    if !restore.contains("legacy") && legacy_tables.split_whitespace().any(|t| TABLES.contains(&t)) {
        out.push("iptables-legacy-restore".to_string());
    }
    out
}

/// Removes `who`'s iptables chains, and the jumps into them, from every backend that may hold
/// them ([`backends`]; reading `/proc/net/ip_tables_names` creates no table). Blocking.
/// Returns the chains removed as `table/chain` (none: nothing was there, or no iptables at all).
pub fn remove_iptables(who: Predecessor, restore: &str) -> Result<Vec<String>, TakeoverError> {
    let legacy = std::fs::read_to_string("/proc/net/ip_tables_names").unwrap_or_default();
    let mut removed = Vec::new();
    for restore in backends(restore, &legacy) {
        removed.extend(remove_with(who, &restore)?);
    }
    Ok(removed)
}

/// [`remove_iptables`] through one `iptables-restore` run (`restore`; the matching `-save` reads
/// the tables).
fn remove_with(who: Predecessor, restore: &str) -> Result<Vec<String>, TakeoverError> {
    use netd_proxy::iptables::{run, IptablesError};
    let save = restore.replace("-restore", "-save");
    let err = |source| TakeoverError { who: who.name(), source };
    let mut input = String::new();
    let mut removed = Vec::new();
    for table in TABLES {
        let text = match run(&save, &["-t", table], None) {
            Ok(t) => t,
            Err(IptablesError::Spawn { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            // A table nobody created (mangle, often) cannot hold anything of theirs.
            Err(IptablesError::Failed { .. }) if table == "mangle" => continue,
            Err(e) => return Err(err(e)),
        };
        if let Some((text, chains)) = removal(table, &text, |t, c| who.owns(t, c)) {
            input.push_str(&text);
            removed.extend(chains.into_iter().map(|c| format!("{table}/{c}")));
        }
    }
    if !input.is_empty() {
        run(restore, &["--noflush", "--wait"], Some(&input)).map_err(err)?;
    }
    Ok(removed)
}

/// Removes `who`'s iptables chains off the async runtime, logging what went; a failure is
/// logged and reported in `netd status` (the chains left answer as before, beside netd's).
pub async fn remove_in_background(who: Predecessor, restore: String, shared: std::sync::Arc<crate::server::Shared>) {
    match tokio::task::spawn_blocking(move || remove_iptables(who, &restore)).await {
        Ok(Ok(removed)) if removed.is_empty() => tracing::info!("--take-over {}: no iptables chains of {} on this node", who.name(), who.name()),
        Ok(Ok(removed)) => tracing::info!(chains = removed.len(), "--take-over {}: netd's rules are in; removed {}'s iptables chains: {}", who.name(), who.name(), removed.join(" ")),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "--take-over {}", who.name());
            shared.update(|s| s.problems.push(format!("--take-over {}: {e}", who.name())));
        }
        Err(e) => tracing::error!(error = %e, "--take-over {}: the removal task failed", who.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBE_PROXY_NAT: &str = r#"# Generated by iptables-nft-save v1.8.9 (nf_tables) on Tue Dec  8 01:00:00 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:FLANNEL-POSTRTG - [0:0]
:KUBE-MARK-DROP - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-IT2ZTR26TO4XFPTO - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-TCOU7JCQXEZGVUNU - [0:0]
:OTHER - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A POSTROUTING -s 10.1.0.0/16 -j MASQUERADE
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A KUBE-MARK-DROP -j MARK --set-xmark 0x8000/0x8000
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-SEP-IT2ZTR26TO4XFPTO -s 10.244.3.2/32 -m comment --comment "kube-system/kube-dns:dns" -j KUBE-MARK-MASQ
-A KUBE-SEP-IT2ZTR26TO4XFPTO -p udp -m comment --comment "kube-system/kube-dns:dns" -m udp -j DNAT --to-destination 10.244.3.2:53
-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-TCOU7JCQXEZGVUNU -j KUBE-SEP-IT2ZTR26TO4XFPTO
-A OTHER -j KUBE-MARK-MASQ
-A OTHER -j RETURN
COMMIT
"#;

    /// kube-proxy's chains go with every jump into them, also from a chain that is not
    /// kube-proxy's; the kubelet's KUBE-MARK-DROP, flannel's chain and everything else stay.
    #[test]
    fn kube_proxy_chains_and_the_jumps_into_them() {
        let (input, chains) = removal("nat", KUBE_PROXY_NAT, |t, c| Predecessor::KubeProxy.owns(t, c)).unwrap();
        assert_eq!(
            chains,
            ["KUBE-MARK-MASQ", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-SEP-IT2ZTR26TO4XFPTO", "KUBE-SERVICES", "KUBE-SVC-TCOU7JCQXEZGVUNU"]
        );
        assert_eq!(
            input,
            "*nat\n\
             -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -D OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -D POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
             -D OTHER -j KUBE-MARK-MASQ\n\
             :KUBE-MARK-MASQ - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-SEP-IT2ZTR26TO4XFPTO - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-TCOU7JCQXEZGVUNU - [0:0]\n\
             -X KUBE-MARK-MASQ\n-X KUBE-NODEPORTS\n-X KUBE-POSTROUTING\n-X KUBE-SEP-IT2ZTR26TO4XFPTO\n-X KUBE-SERVICES\n-X KUBE-SVC-TCOU7JCQXEZGVUNU\n\
             COMMIT\n"
        );
    }

    #[test]
    fn flannel_chains_only_and_nothing_when_absent() {
        let (input, chains) = removal("nat", KUBE_PROXY_NAT, |t, c| Predecessor::Flannel.owns(t, c)).unwrap();
        assert_eq!(chains, ["FLANNEL-POSTRTG"]);
        assert_eq!(input, "*nat\n-D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n:FLANNEL-POSTRTG - [0:0]\n-X FLANNEL-POSTRTG\nCOMMIT\n");
        // FLANNEL-FWD is filter's; a nat chain of that name is somebody else's.
        assert!(!Predecessor::Flannel.owns("nat", "FLANNEL-FWD"));
        assert!(Predecessor::Flannel.owns("filter", "FLANNEL-FWD"));
        assert!(removal("filter", "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n", |t, c| Predecessor::KubeProxy.owns(t, c)).is_none());

        // The kubelet's chains are not kube-proxy's.
        for c in ["KUBE-MARK-DROP", "KUBE-FIREWALL", "KUBE-KUBELET-CANARY"] {
            assert!(!Predecessor::KubeProxy.owns("nat", c) && !Predecessor::KubeProxy.owns("filter", c), "{c}");
        }
    }

    /// A node whose kube-proxy wrote legacy iptables (its tables are listed in
    /// /proc/net/ip_tables_names) is searched there too, whatever netd's own iptables is.
    #[test]
    fn legacy_tables_are_searched_too() {
        assert_eq!(backends("iptables-restore", ""), ["iptables-restore"]);
        assert_eq!(backends("iptables-restore", "nat\nfilter\n"), ["iptables-restore", "iptables-legacy-restore"]);
        assert_eq!(backends("iptables-nft-restore", "mangle\n"), ["iptables-nft-restore", "iptables-legacy-restore"]);
        assert_eq!(backends("iptables-legacy-restore", "nat\n"), ["iptables-legacy-restore"]);
    }
}
