//! The nftables backend against the real kernel, in a throw-away namespace: what netlink
//! programs is what the renderer says, a second sync and a restart change nothing.

mod common;

use anyhow::Result;
use common::in_netns;
use netd_proxy::nft::{render, Nftables};
use netd_tests::Netns;

use netd_proxy::testdata;

#[test]
fn netlink_programs_the_rendered_ruleset_and_a_restart_changes_nothing() -> Result<()> {
    let ns = Netns::new("nftk")?;
    let plan = netd_proxy::desired(&testdata::node(), &testdata::feature_snapshot());
    let rs = render(&plan, None);
    let rs2 = rs.clone();
    let reports = in_netns(ns.name(), move || {
        let mut nft = Nftables::new();
        let first = nft.sync(&rs2, false).map_err(|e| e.to_string());
        let again = nft.sync(&rs2, true).map_err(|e| e.to_string());
        let mut restarted = Nftables::new();
        let restart = restarted.sync(&rs2, false).map_err(|e| e.to_string());
        (first, again, restart)
    });
    let (first, again, restart) = reports;
    let first = first.map_err(anyhow::Error::msg)?;
    let listing = ns.run(&["nft", "list", "table", "ip", "netd-proxy"])?;
    println!("{listing}");
    assert!(first.ops > 0);
    assert_eq!(again.map_err(anyhow::Error::msg)?.ops, 0, "second sync against the kernel changes nothing");
    assert_eq!(restart.map_err(anyhow::Error::msg)?.ops, 0, "a restarted proxy adopts the rules");
    // Every rendered rule is in the kernel, spelled the same way by nft.
    let strip = |l: &str| l.split(" comment \"netd:").next().unwrap().trim().to_string();
    let have: std::collections::HashSet<String> = listing.lines().map(strip).collect();
    for line in rs.to_nft().lines().map(str::trim) {
        // nft spells priorities, timeouts and the tcp dependency of reject its own way.
        // nft cannot name the constant frontend in the endpoint-map lookup (it prints it in hex).
        if line.contains("priority") || line.starts_with("timeout") || line.contains("reject with tcp reset") || line.contains("map @endpoints-") || line.contains("map @local-endpoints-") {
            continue;
        }
        if line.starts_with("elements") || line.starts_with("10.") || line.starts_with("198.") || line.starts_with("tcp") || line.starts_with("udp") {
            continue;
        }
        assert!(have.contains(line), "nft does not show {line:?}");
    }
    Ok(())
}

/// Deleting a Service with a TCP and a UDP port of one number, whose endpoint is a pod of this
/// node, is one batch the kernel accepts: each port owns its own hairpin element (the element
/// keyed without the protocol was deleted twice, and the kernel refused the whole batch).
#[test]
fn deleting_a_service_with_tcp_and_udp_on_one_port_is_accepted_at_once() -> Result<()> {
    let ns = Netns::new("nfthp")?;
    let mut snap = testdata::feature_snapshot();
    let with = render(&netd_proxy::desired(&testdata::node(), &snap), None);
    snap.remove_service(&netd_proxy::NsName::new("default", "dual"));
    let without = render(&netd_proxy::desired(&testdata::node(), &snap), Some(&with));
    let (first, delete) = in_netns(ns.name(), move || {
        let mut nft = Nftables::new();
        let first = nft.sync(&with, false).map(|r| r.ops).map_err(|e| e.to_string());
        // No observe, no retry: the diff from the ruleset applied last, as one batch.
        let delete = nft.sync(&without, false).map(|r| r.ops).map_err(|e| e.to_string());
        (first, delete)
    });
    assert!(first.map_err(anyhow::Error::msg)? > 0);
    assert!(delete.map_err(anyhow::Error::msg)? > 0);
    let listing = ns.run(&["nft", "list", "set", "ip", "netd-proxy", "hairpin"])?;
    assert!(!listing.contains("10.96.0.70"), "{listing}");
    assert!(listing.contains("10.244.1.9 . 10.244.1.9 . 10.96.0.50 . tcp . 443"), "{listing}");
    Ok(())
}
