use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::testdata::{node, slice, web_snapshot};
use crate::plan::{desired, desired_from};

use crate::testdata::feature_snapshot;

#[test]
fn golden_nftables_ruleset() {
    let plan = desired(&node(), &feature_snapshot());
    crate::golden::check("nftables.nft", &render(&plan, None).to_nft());
}

#[test]
fn nodeports_on_every_local_address_when_node_ips_are_unknown() {
    let mut n = node();
    n.ips.clear();
    let text = render(&desired(&n, &web_snapshot()), None).to_nft();
    assert!(text.contains("fib daddr type local meta l4proto . th dport vmap @service-nodeports"), "{text}");
    assert!(!text.contains("nodeport-ips"));
}

#[test]
fn unchanged_services_keep_their_fragments() {
    let mut snap = feature_snapshot();
    let p1 = desired(&node(), &snap);
    let r1 = render(&p1, None);
    snap.put_slice(Arc::new(slice(json!({"metadata": {"name": "empty-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "empty"}},
        "addressType": "IPv4", "ports": [{"port": 80}], "endpoints": [{"addresses": ["10.244.3.3"]}]}))));
    let p2 = desired_from(&node(), &snap, Some(&p1));
    let r2 = render(&p2, Some(&r1));
    let changed: Vec<&str> = r1.fragments.keys().filter(|k| !Arc::ptr_eq(&r1.fragments[*k], &r2.fragments[*k])).map(|k| &**k).collect();
    assert_eq!(changed, ["default/empty/tcp/80"]);
    // The diff moves the frontend from the no-endpoints map to the service map and adds chains.
    let ops = diff_rulesets(&r1, &r2).into_ops();
    let text: Vec<String> = ops.iter().map(|o| o.describe()).collect();
    assert!(text.iter().any(|t| t.starts_with("delete 1 element(s) from no-endpoint-services")), "{text:#?}");
    assert!(text.iter().any(|t| t.starts_with("add 1 element(s) to endpoints")), "{text:#?}");
    assert!(text.iter().any(|t| t.starts_with("add rule svc-default/empty/tcp/80")), "0 -> 1 endpoint adds the dnat rule: {text:#?}");
    assert!(!text.iter().any(|t| t.contains("web")), "untouched service: {text:#?}");
    // And nothing at all when nothing changed.
    assert!(diff_rulesets(&r2, &render(&p2, Some(&r2))).into_ops().is_empty());
}

#[test]
fn a_kernel_holding_the_same_rules_needs_no_change() {
    let r = render(&desired(&node(), &feature_snapshot()), None);
    let mut obs = netlink::Observed { table: true, ..Default::default() };
    for c in r.chains() {
        obs.chains.insert(c.name.clone(), netlink::ObservedChain { base: c.base, rules: c.rules.iter().map(|r| Some(r.fingerprint())).collect() });
    }
    for s in r.sets() {
        obs.sets.insert(s.name.clone(), netlink::ObservedSet { kind: Some(s.kind), elements: Default::default() });
    }
    for (s, k, v) in r.elements() {
        obs.sets.get_mut(s).unwrap().elements.insert(*k, v.clone());
    }
    assert!(diff_observed(&obs, &r).into_ops().is_empty());
    // A rule changed behind our back: only that chain is rewritten.
    obs.chains.get_mut("services").unwrap().rules[0] = Some(1);
    obs.chains.insert("stale".into(), Default::default());
    let ops: Vec<String> = diff_observed(&obs, &r).into_ops().iter().map(|o| o.describe()).collect();
    assert_eq!(ops.first().map(String::as_str), Some("flush chain services"));
    assert!(ops.ends_with(&["flush chain stale".to_string(), "delete chain stale".to_string()]), "{ops:#?}");
}

#[test]
fn successive_endpoint_changes_cost_the_same() {
    use crate::testdata::{generated_slice, generated_snapshot};
    let mut snap = generated_snapshot(50, 3, 8080);
    let mut plan = desired(&node(), &snap);
    let mut rs = render(&plan, None);
    let mut sizes = Vec::new();
    for g in 1..=4u32 {
        snap.put_slice(Arc::new(generated_slice(g as usize * 7, 3, 8080, g)));
        let p2 = desired_from(&node(), &snap, Some(&plan));
        let r2 = render(&p2, Some(&rs));
        let ops = diff_rulesets(&rs, &r2).into_ops();
        sizes.push(ops.len());
        plan = p2;
        rs = r2;
    }
    assert!(sizes.windows(2).all(|w| w[0] == w[1]), "{sizes:?}");
    // Element changes only: no chain or rule is touched by an endpoint change.
    let mut s2 = snap.clone();
    s2.put_slice(Arc::new(generated_slice(3, 3, 8080, 9)));
    assert_eq!(p3_count(&s2), 3);
    let p3 = desired_from(&node(), &s2, Some(&plan));
    let ops: Vec<String> = diff_rulesets(&rs, &render(&p3, Some(&rs))).into_ops().iter().map(|o| o.describe()).collect();
    assert!(ops.iter().all(|o| o.contains("element(s)")), "{ops:#?}");
}

fn p3_count(s: &crate::snapshot::ServiceSnapshot) -> usize {
    s.slices_of(&crate::NsName::new("bench", "svc-3"))[0].endpoints.len()
}

/// The O(changes) paths (render of the swapped port plans only, diff of those fragments only)
/// give exactly what the full paths give, over a run of endpoint changes, service additions
/// and removals (which take the full path) and no-op passes.
#[test]
fn delta_render_and_diff_equal_the_full_ones() {
    use crate::testdata::{generated_service, generated_slice, generated_snapshot};
    let mut snap = generated_snapshot(40, 3, 8080);
    let mut plan = desired(&node(), &snap);
    let mut rs = render(&plan, None);
    let mut deltas = 0;
    for g in 1..=30u32 {
        let i = (g as usize * 13) % 40;
        match g % 6 {
            0 => snap.put_service(Arc::new(generated_service(100 + g as usize))),
            5 => snap.remove_service(&crate::NsName::new("bench", format!("svc-{}", 100 + g as usize - 5))),
            3 => {}
            _ => snap.put_slice(Arc::new(generated_slice(i, 1 + (g as usize % 4), 8080, g))),
        }
        let p2 = desired_from(&node(), &snap, Some(&plan));
        let r2 = render(&p2, Some(&rs));
        assert_eq!(r2.to_nft(), render(&p2, None).to_nft(), "pass {g}");
        let describe = |ops: Vec<netlink::Op<'_>>| ops.iter().map(|o| o.describe()).collect::<Vec<_>>();
        let fast = describe(diff_rulesets(&rs, &r2).into_ops());
        let mut full_new = r2.clone();
        full_new.delta = None;
        assert_eq!(fast, describe(diff_rulesets(&rs, &full_new).into_ops()), "pass {g}");
        if r2.delta.is_some() {
            deltas += 1;
        }
        plan = p2;
        rs = r2;
    }
    assert!(deltas >= 15, "endpoint changes take the O(changes) path ({deltas} of 30)");
}
