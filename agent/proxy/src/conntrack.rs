//! Stale UDP conntrack entries: UDP has no connection teardown, so a flow to an endpoint that
//! went away (or a flow that was rejected while the service had no endpoints) would keep
//! pointing at nothing. Like kube-proxy, we delete those entries with the `conntrack` tool
//! (Debian package `conntrack`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use tracing::{debug, warn};

use crate::model::Plan;

/// One `conntrack -D` to run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Flush {
    /// Entries to `frontend:port` DNATed to `endpoint` (the endpoint is gone).
    Endpoint { frontend: Ipv4Addr, port: u16, endpoint: Ipv4Addr },
    /// Every entry to `frontend:port` (it had no endpoints and now has some).
    Frontend { frontend: Ipv4Addr, port: u16 },
}

impl Flush {
    pub fn args(&self) -> Vec<String> {
        match self {
            Flush::Endpoint { frontend, port, endpoint } => vec![
                "-D".into(), "-p".into(), "udp".into(), "--orig-dst".into(), frontend.to_string(),
                "--orig-port-dst".into(), port.to_string(), "--dst-nat".into(), endpoint.to_string(),
            ],
            Flush::Frontend { frontend, port } => vec![
                "-D".into(), "-p".into(), "udp".into(), "--orig-dst".into(), frontend.to_string(), "--orig-port-dst".into(), port.to_string(),
            ],
        }
    }
}

/// The flushes needed going from `old` to `new` (pure).
pub fn stale_udp(old: &Plan, new: &Plan) -> BTreeSet<Flush> {
    let index = |frontends: Vec<(Ipv4Addr, u16, Vec<crate::model::Endpoint>)>| -> BTreeMap<(Ipv4Addr, u16), BTreeSet<Ipv4Addr>> {
        frontends.into_iter().map(|(ip, port, eps)| ((ip, port), eps.iter().map(|e| e.ip).collect())).collect()
    };
    // When `new` is `old` with a few port plans swapped (same frontends), only those can need
    // a flush: O(changes) instead of every UDP service on every pass.
    let (o, n) = match new.changes_since(old.id()) {
        Some(keys) => (
            index(old.udp_frontends_of(keys.iter().filter_map(|k| old.services.get(k)))),
            index(new.udp_frontends_of(keys.iter().filter_map(|k| new.services.get(k)))),
        ),
        None => (index(old.udp_frontends()), index(new.udp_frontends())),
    };
    let mut out = BTreeSet::new();
    for ((frontend, port), old_eps) in &o {
        let new_eps = n.get(&(*frontend, *port));
        for ep in old_eps {
            if !new_eps.is_some_and(|s| s.contains(ep)) {
                out.insert(Flush::Endpoint { frontend: *frontend, port: *port, endpoint: *ep });
            }
        }
    }
    for ((frontend, port), new_eps) in &n {
        let had = o.get(&(*frontend, *port)).is_some_and(|s| !s.is_empty());
        if !had && !new_eps.is_empty() {
            out.insert(Flush::Frontend { frontend: *frontend, port: *port });
        }
    }
    out
}

/// Runs the flushes (exit status 1, "no entries", is not an error). Returns how many ran.
pub fn flush(flushes: &BTreeSet<Flush>) -> usize {
    let mut n = 0;
    for f in flushes {
        match Command::new("conntrack").args(f.args()).stdout(Stdio::null()).stderr(Stdio::null()).status() {
            Ok(_) => {
                n += 1;
                debug!(?f, "flushed UDP conntrack entries");
            }
            Err(e) => {
                warn!("cannot run conntrack (install Debian package `conntrack`): {e}");
                break;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::desired;
    use crate::testdata::{node, web_snapshot};
    use std::sync::Arc;

    #[test]
    fn removed_udp_endpoints_and_revived_frontends_are_flushed() {
        let snap = web_snapshot();
        let full = desired(&node(), &snap);
        let mut empty_snap = snap.clone();
        empty_snap.remove_slice(&crate::NsName::new("default", "web-1"));
        let empty = desired(&node(), &empty_snap);
        let gone = stale_udp(&full, &empty);
        assert!(gone.contains(&Flush::Endpoint { frontend: "10.96.0.10".parse().unwrap(), port: 53, endpoint: "10.244.2.7".parse().unwrap() }));
        assert!(gone.iter().all(|f| matches!(f, Flush::Endpoint { .. })));
        let back = stale_udp(&empty, &full);
        assert!(back.contains(&Flush::Frontend { frontend: "10.96.0.10".parse().unwrap(), port: 53 }));
        assert!(stale_udp(&full, &full).is_empty());
        // The same through the O(changes) path (the new plan made from the old one).
        let incremental = crate::plan::desired_from(&node(), &empty_snap, Some(&full));
        assert!(incremental.changes_since(full.id()).is_some());
        assert_eq!(stale_udp(&full, &incremental), gone);
        let _ = Arc::new(());
    }
}
