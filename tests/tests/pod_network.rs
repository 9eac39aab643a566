//! End-to-end tests of the pod network (issue: etcd subnet leases + VXLAN overlay), with the built
//! `netd` in node namespaces, a real etcd and real kernel devices. Nothing here is mocked.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd_tests::{wait_until, Cluster, Node, Pod};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const SUBNETS: &str = "/coreos.com/network/subnets/";
const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

fn start(n: usize, config: &str) -> Result<Cluster> {
    let mut c = Cluster::new(n)?;
    c.write_network_config(config)?;
    c.start_netd_all(&[])?;
    for i in 0..n {
        c.node_mut(i).wait_subnet_env(WAIT)?;
    }
    wait_converged(&c)?;
    Ok(c)
}

/// Waits until every node has a netd route to every other node's subnet (the nodes that
/// started last are seen by the others a watch event later).
fn wait_converged(c: &Cluster) -> Result<()> {
    let subnets: Vec<String> = c.nodes().iter().map(subnet).collect::<Result<_>>()?;
    for node in c.nodes() {
        for (j, s) in subnets.iter().enumerate() {
            if j != node.index() {
                wait_until(WAIT, POLL, || Ok(!route(node, s)?.is_empty()))?;
            }
        }
    }
    Ok(())
}

/// The node's subnet in network form ("10.244.7.0/24") from its subnet.env.
fn subnet(node: &Node) -> Result<String> {
    let env = node.subnet_env()?;
    let s = env.get("FLANNEL_SUBNET").context("FLANNEL_SUBNET missing")?;
    let (ip, len) = s.split_once('/').context("FLANNEL_SUBNET without /")?;
    let ip: Ipv4Addr = ip.parse()?;
    Ok(format!("{}/{len}", Ipv4Addr::from(u32::from(ip) - 1)))
}

fn key_of(subnet: &str) -> String {
    format!("{SUBNETS}{}", subnet.replace('/', "-"))
}

/// `ip route show PREFIX` on a node, trimmed.
fn route(node: &Node, prefix: &str) -> Result<String> {
    Ok(node.ns().run(&["ip", "route", "show", prefix])?.trim().to_string())
}

/// Log lines written by the netd run that started last on this node.
fn last_run_log(node: &Node) -> String {
    let log = node.log();
    log.rsplit("=== netd-tests: starting").next().unwrap_or("").to_string()
}

fn wait_ping(pod: &Pod, ip: Ipv4Addr) -> Result<()> {
    wait_until(WAIT, POLL, || Ok(pod.ping(ip)))
}

#[test]
fn three_nodes_lease_distinct_subnets_in_flannels_format() -> Result<()> {
    let c = start(3, VXLAN)?;
    let leases = c.etcd().get_prefix(SUBNETS)?;
    assert_eq!(leases.len(), 3, "{leases:?}");
    let mut subnets = BTreeSet::new();
    for (i, node) in c.nodes().iter().enumerate() {
        let s = subnet(node)?;
        assert!(subnets.insert(s.clone()), "subnet {s} handed out twice");
        let (_, value) = leases.iter().find(|(k, _)| *k == key_of(&s)).with_context(|| format!("no key for node{i}'s {s}"))?;
        // Byte-for-byte the shape flanneld writes.
        let v: serde_json::Value = serde_json::from_str(value)?;
        let obj = v.as_object().unwrap();
        assert_eq!(obj.keys().cloned().collect::<Vec<_>>(), ["BackendData", "BackendType", "PublicIP", "PublicIPv6"]);
        assert_eq!(v["PublicIP"], node.ip().to_string());
        assert!(v["PublicIPv6"].is_null());
        assert_eq!(v["BackendType"], "vxlan");
        assert_eq!(v["BackendData"]["VNI"], 1);
        let mac = v["BackendData"]["VtepMAC"].as_str().unwrap();
        let dev = node.ns().run(&["cat", "/sys/class/net/netd.1/address"])?;
        assert_eq!(dev.trim(), mac, "lease MAC is the device's MAC");
        // Bound to a 24 h etcd lease.
        let kv = c.etcd().ctl(&["get", &key_of(&s), "-w", "json"])?;
        let kv: serde_json::Value = serde_json::from_str(&kv)?;
        let lease_id = kv["kvs"][0]["lease"].as_i64().context("key has no etcd lease")?;
        let ttl = c.etcd().ctl(&["lease", "timetolive", &format!("{lease_id:x}")])?;
        let secs: i64 = ttl.split("remaining(").nth(1).and_then(|r| r.split('s').next()).context(ttl.clone())?.parse()?;
        assert!(secs > 86000 && secs <= 86400, "{ttl}");
        // The device: flannel's parameters.
        let link = node.ns().run(&["ip", "-d", "link", "show", "netd.1"])?;
        assert!(link.contains("mtu 1450") && link.contains("vxlan id 1") && link.contains("dstport 8472") && link.contains("nolearning"), "{link}");
        let addr = node.ns().run(&["ip", "-4", "-br", "addr", "show", "netd.1"])?;
        assert!(addr.contains(&s.replace("/24", "/32")), "{addr}");
        let env = node.subnet_env()?;
        assert_eq!(env["FLANNEL_NETWORK"], "10.244.0.0/16");
        assert_eq!(env["FLANNEL_MTU"], "1450");
        assert_eq!(env["FLANNEL_IPMASQ"], "true");
    }
    // Every node has an onlink route, a permanent neighbor and an FDB entry per peer.
    for node in c.nodes() {
        let ours = subnet(node)?;
        for peer in c.nodes().iter().filter(|p| p.index() != node.index()) {
            let ps = subnet(peer)?;
            let r = route(node, &ps)?;
            let gw = ps.trim_end_matches("/24");
            assert_eq!(r, format!("{ps} via {gw} dev netd.1 proto 110 onlink"), "on {}", node.name());
            let neigh = node.ns().run(&["ip", "neigh", "show", gw, "dev", "netd.1"])?;
            assert!(neigh.contains("PERMANENT"), "{neigh}");
            let fdb = node.ns().run(&["bridge", "fdb", "show", "dev", "netd.1"])?;
            assert!(fdb.contains(&format!("dst {} self permanent", peer.ip())), "{fdb}");
        }
        assert_eq!(route(node, &ours)?, "", "no route to our own subnet through the overlay");
    }
    Ok(())
}

#[test]
fn pods_reach_each_other_across_nodes_and_masquerade_only_outbound() -> Result<()> {
    let mut c = start(3, VXLAN)?;
    let a = c.node_mut(0).add_pod("a")?;
    let b = c.node_mut(2).add_pod("b")?;
    wait_ping(&a, b.ip)?;
    wait_ping(&b, a.ip)?;

    // TCP pod to pod: the server sees the client pod's own address (no NAT inside the cluster).
    let _srv = b.spawn(&["socat", "TCP-LISTEN:8080,fork,reuseaddr", "SYSTEM:echo $SOCAT_PEERADDR"], None)?;
    let seen = retry(|| a.run(&["socat", "-T", "2", "-", &format!("TCP:{}:8080,connect-timeout=2", b.ip)]))?;
    assert_eq!(seen.trim(), a.ip.to_string());

    // TCP pod to outside (the underlay gateway): masqueraded to the node's address.
    let _out = c.underlay().spawn(&["socat", "TCP-LISTEN:8081,fork,reuseaddr,bind=198.18.0.1", "SYSTEM:echo $SOCAT_PEERADDR"], None)?;
    let seen = retry(|| a.run(&["socat", "-T", "2", "-", "TCP:198.18.0.1:8081,connect-timeout=2"]))?;
    assert_eq!(seen.trim(), c.node(0).ip().to_string());
    Ok(())
}

fn retry(mut f: impl FnMut() -> Result<String>) -> Result<String> {
    let mut last = None;
    for _ in 0..50 {
        match f() {
            Ok(s) if !s.trim().is_empty() => return Ok(s),
            Ok(_) => {}
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("empty answer")))
}

#[test]
fn a_removed_nodes_routes_disappear_from_the_others() -> Result<()> {
    let mut c = start(3, VXLAN)?;
    let gone = subnet(c.node(2))?;
    let gone_ip = c.node(2).ip().to_string();
    for n in &c.nodes()[..2] {
        assert_ne!(route(n, &gone)?, "");
    }
    c.node_mut(2).stop_netd()?;
    assert_eq!(c.etcd().del(&key_of(&gone))?, 1);
    for i in 0..2 {
        let n = c.node(i);
        wait_until(WAIT, POLL, || Ok(route(n, &gone)?.is_empty()))?;
        wait_until(WAIT, POLL, || Ok(!n.ns().run(&["bridge", "fdb", "show", "dev", "netd.1"])?.contains(&gone_ip)))?;
        let neigh = n.ns().run(&["ip", "neigh", "show", "dev", "netd.1"])?;
        assert!(!neigh.contains(gone.trim_end_matches("/24")), "{neigh}");
    }
    Ok(())
}

/// Parses iperf3 -J output: per-interval bits per second.
fn iperf_intervals(json: &str) -> Result<Vec<f64>> {
    let v: serde_json::Value = serde_json::from_str(json).with_context(|| format!("iperf3 output: {json}"))?;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    Ok(v["intervals"].as_array().context("no intervals")?.iter().map(|i| i["sum"]["bits_per_second"].as_f64().unwrap_or(0.0)).collect())
}

#[test]
fn restarting_netd_keeps_the_subnet_and_a_long_tcp_stream() -> Result<()> {
    let mut c = start(2, VXLAN)?;
    let before: Vec<String> = c.nodes().iter().map(subnet).collect::<Result<_>>()?;
    let a = c.node_mut(0).add_pod("a")?;
    let b = c.node_mut(1).add_pod("b")?;
    wait_ping(&a, b.ip)?;
    let _server = b.spawn(&["iperf3", "-s", "-1"], None)?;
    std::thread::sleep(Duration::from_millis(300));
    let client = a.ns.command(&["iperf3", "-c", &b.ip.to_string(), "-t", "10", "-i", "1", "-J", "-b", "200M"]).stdout(std::process::Stdio::piped()).spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..2 {
        let status = c.node_mut(i).stop_netd()?.context("netd was running")?;
        assert!(status.success(), "netd exits cleanly on SIGTERM: {status}");
        c.node_mut(i).start_netd(&[])?;
    }
    let out = client.wait_with_output()?;
    let intervals = iperf_intervals(&String::from_utf8_lossy(&out.stdout))?;
    assert!(intervals.len() >= 9, "{intervals:?}");
    assert!(intervals.iter().all(|bps| *bps > 1e6), "the stream stalled during the restart: {intervals:?}");

    for (i, want) in before.iter().enumerate() {
        let node = c.node_mut(i);
        wait_until(WAIT, POLL, || Ok(last_run_log(node).contains("node network ready")))?;
        assert_eq!(&subnet(node)?, want, "same subnet after restart");
        // The restarted netd found everything right and changed nothing.
        std::thread::sleep(Duration::from_millis(1500)); // at least one resync
        let log = last_run_log(node);
        for changed in ["created VXLAN device", "overlay updated", "programmed nftables", "wrote subnet.env"] {
            assert!(!log.contains(changed), "restart on node{i} changed something ({changed}):\n{log}");
        }
    }
    Ok(())
}

#[test]
fn etcd_outage_interrupts_nothing_and_new_nodes_converge_after() -> Result<()> {
    let mut c = start(2, VXLAN)?;
    let a = c.node_mut(0).add_pod("a")?;
    let b = c.node_mut(1).add_pod("b")?;
    wait_ping(&a, b.ip)?;
    // 5 pings a second for the whole outage.
    let pinger = a.ns.command(&["ping", "-i", "0.2", "-c", "125", "-W", "1", &b.ip.to_string()]).stdout(std::process::Stdio::piped()).spawn()?;
    std::thread::sleep(Duration::from_secs(1));
    c.etcd_mut().stop()?;
    let down = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    for i in 0..2 {
        assert!(c.node_mut(i).netd_running(), "netd on node{i} survives the etcd outage");
    }
    c.etcd_mut().start()?;
    let outage = down.elapsed();
    let out = pinger.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("125 packets transmitted, 125 received"), "lost pings during a {outage:?} etcd outage:\n{text}");

    let n = c.add_node()?;
    c.node_mut(n).start_netd(&[])?;
    c.node_mut(n).wait_subnet_env(WAIT)?;
    let late = c.node_mut(n).add_pod("late")?;
    wait_ping(&late, a.ip)?;
    wait_ping(&b, late.ip)?;
    Ok(())
}

#[test]
fn malformed_keys_are_skipped_reported_and_never_handed_out() -> Result<()> {
    let mut c = Cluster::new(3)?;
    c.write_network_config(r#"{"Network":"10.244.0.0/21","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#)?;
    let etcd = c.etcd();
    etcd.put(&format!("{SUBNETS}10.244.1.0-24"), "{not json")?;
    etcd.put(&format!("{SUBNETS}10.244.2.0-24"), r#"{"PublicIP":"198.18.0.99","BackendType":"vxlan"}"#)?;
    etcd.put(&format!("{SUBNETS}garbage"), "{}")?;
    c.start_netd_all(&[])?;
    for i in 0..3 {
        c.node_mut(i).wait_subnet_env(WAIT)?;
        let s = subnet(c.node(i))?;
        assert!(s != "10.244.1.0/24" && s != "10.244.2.0/24", "node{i} got the malformed key's subnet {s}");
    }
    let a = c.node_mut(0).add_pod("a")?;
    let b = c.node_mut(2).add_pod("b")?;
    wait_ping(&a, b.ip)?;
    // A malformed key written while running is reported too, and breaks nothing.
    c.etcd().put(&format!("{SUBNETS}10.244.9.0-24"), "][")?;
    std::thread::sleep(Duration::from_millis(500));
    assert!(a.ping(b.ip));
    for i in 0..3 {
        assert!(c.node_mut(i).netd_running());
        let log = c.node(i).log();
        assert!(log.contains("10.244.1.0-24") && log.contains("garbage"), "malformed keys are reported:\n{log}");
        assert!(log.contains("10.244.2.0/24: vxlan lease without BackendData"), "{log}");
        wait_until(WAIT, POLL, || Ok(c.node(i).log().contains("10.244.9.0-24")))?;
    }
    Ok(())
}

#[test]
fn drift_is_repaired_by_the_periodic_resync() -> Result<()> {
    let c = start(2, VXLAN)?;
    let peer = subnet(c.node(1))?;
    let n = c.node(0);
    let want = route(n, &peer)?;
    n.ns().run(&["ip", "route", "del", &peer])?;
    n.ns().run(&["bridge", "fdb", "del", &mac_of(c.node(1))?, "dev", "netd.1", "dst", &c.node(1).ip().to_string()])?;
    n.ns().run(&["ip", "neigh", "del", peer.trim_end_matches("/24"), "dev", "netd.1"])?;
    wait_until(WAIT, POLL, || Ok(route(n, &peer)? == want))?;
    let fdb = n.ns().run(&["bridge", "fdb", "show", "dev", "netd.1"])?;
    assert!(fdb.contains(&c.node(1).ip().to_string()), "{fdb}");
    // A stale route of ours to a subnet nobody holds is removed.
    n.ns().run(&["ip", "route", "add", "10.244.250.0/24", "via", "10.244.250.0", "dev", "netd.1", "onlink", "proto", "110"])?;
    wait_until(WAIT, POLL, || Ok(route(n, "10.244.250.0/24")?.is_empty()))?;
    // Our nftables table deleted by hand comes back.
    n.ns().run(&["nft", "delete", "table", "ip", "netd"])?;
    wait_until(WAIT, POLL, || Ok(n.ns().exec(&["nft", "list", "table", "ip", "netd"])?.status.success()))?;
    Ok(())
}

fn mac_of(node: &Node) -> Result<String> {
    Ok(node.ns().run(&["cat", "/sys/class/net/netd.1/address"])?.trim().to_string())
}

#[test]
fn a_revoked_lease_is_reacquired_loudly() -> Result<()> {
    let mut c = start(2, VXLAN)?;
    let s = subnet(c.node(0))?;
    let kv: serde_json::Value = serde_json::from_str(&c.etcd().ctl(&["get", &key_of(&s), "-w", "json"])?)?;
    let lease_id = kv["kvs"][0]["lease"].as_i64().context("no lease")?;
    c.etcd().ctl(&["lease", "revoke", &format!("{lease_id:x}")])?;
    wait_until(WAIT, POLL, || Ok(c.etcd().get(&key_of(&s))?.is_some()))?;
    assert!(c.node(0).log().contains("re-acquiring"), "{}", c.node(0).log());
    assert_eq!(subnet(c.node(0))?, s, "the same subnet comes back");
    let a = c.node_mut(0).add_pod("a")?;
    let b = c.node_mut(1).add_pod("b")?;
    wait_ping(&b, a.ip)?;
    Ok(())
}

#[test]
fn missing_and_invalid_config_are_waited_out_with_a_clear_message() -> Result<()> {
    let mut c = Cluster::new(1)?;
    c.node_mut(0).start_netd(&[])?;
    wait_until(WAIT, POLL, || Ok(c.node(0).log().contains("waiting for the network config: no key /coreos.com/network/config")))?;
    c.write_network_config(r#"{"Network":"10.244.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}"#)?;
    wait_until(WAIT, POLL, || Ok(c.node(0).log().contains("network config field `SubnetLen`: /31 must be less than /31")))?;
    assert!(c.node_mut(0).netd_running());
    assert!(c.node(0).subnet_env().is_err(), "no subnet.env before a valid config");
    c.write_network_config(VXLAN)?;
    c.node_mut(0).wait_subnet_env(WAIT)?;
    Ok(())
}

#[test]
fn nodes_starting_together_never_share_a_subnet() -> Result<()> {
    // Exactly as many subnets as nodes: every create races with the others.
    let mut c = Cluster::new(6)?;
    c.write_network_config(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.15.0","Backend":{"Type":"vxlan"}}"#)?;
    c.start_netd_all(&[])?;
    let mut seen = BTreeSet::new();
    for i in 0..6 {
        c.node_mut(i).wait_subnet_env(Duration::from_secs(40))?;
        assert!(seen.insert(subnet(c.node(i))?));
    }
    assert_eq!(c.etcd().get_prefix(SUBNETS)?.len(), 6);
    Ok(())
}

#[test]
fn direct_routing_uses_the_underlay_for_peers_on_the_same_segment() -> Result<()> {
    let mut c = start(2, r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#)?;
    let peer = subnet(c.node(1))?;
    assert_eq!(route(c.node(0), &peer)?, format!("{peer} via {} dev eth0 proto 110", c.node(1).ip()));
    let a = c.node_mut(0).add_pod("a")?;
    let b = c.node_mut(1).add_pod("b")?;
    wait_ping(&a, b.ip)?;
    Ok(())
}

/// A node set up by hand exactly as flanneld's vxlan backend sets one up (device `flannel.1`, a
/// random MAC, a lease written with etcdctl in flannel's JSON under a 24 h etcd lease) talks to netd
/// nodes in both directions: the wire format and the etcd format are flannel's.
#[test]
fn a_flannel_style_node_and_netd_nodes_reach_each_other() -> Result<()> {
    let mut c = start(2, VXLAN)?;
    let f = c.add_node()?;
    let fsub = "10.244.99.0/24";
    let fmac = "6a:1f:3e:99:00:01";
    let fip = c.node(f).ip().to_string();
    let fnode = c.node(f).ns();
    fnode.sh(&format!(
        "ip link add flannel.1 type vxlan id 1 local {fip} dev eth0 dstport 8472 nolearning && \
         ip link set flannel.1 address {fmac} mtu 1450 up && ip addr add 10.244.99.0/32 dev flannel.1"
    ))?;
    let lease = c.etcd().ctl(&["lease", "grant", "86400"])?;
    let id = lease.split_whitespace().nth(1).context(lease.clone())?.to_string();
    let value = format!(r#"{{"PublicIP":"{fip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{fmac}"}}}}"#);
    c.etcd().ctl(&["put", &format!("--lease={id}"), &key_of(fsub), &value])?;
    // What flanneld would program for each netd peer, from the netd leases in etcd.
    for (key, value) in c.etcd().get_prefix(SUBNETS)? {
        let v: serde_json::Value = serde_json::from_str(&value)?;
        let sub = key.rsplit('/').next().unwrap().replace('-', "/");
        if sub == fsub {
            continue;
        }
        let gw = sub.split('/').next().unwrap();
        let mac = v["BackendData"]["VtepMAC"].as_str().unwrap();
        let pip = v["PublicIP"].as_str().unwrap();
        fnode.sh(&format!(
            "ip neigh replace {gw} lladdr {mac} dev flannel.1 nud permanent && \
             bridge fdb replace {mac} dev flannel.1 dst {pip} self permanent && \
             ip route replace {sub} via {gw} dev flannel.1 onlink"
        ))?;
    }
    std::fs::write(c.node(f).run_dir().join("subnet.env"), "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.99.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")?;
    let fpod = c.node_mut(f).add_pod("flannel-pod")?;
    let a = c.node_mut(0).add_pod("a")?;
    wait_ping(&a, fpod.ip)?;
    wait_ping(&fpod, a.ip)?;
    Ok(())
}

#[test]
fn a_reservation_is_honoured_and_stays_a_reservation() -> Result<()> {
    let mut c = Cluster::new(2)?;
    c.write_network_config(VXLAN)?;
    // An operator reserves 10.244.42.0/24 for node1: a key without an etcd lease.
    let key = key_of("10.244.42.0/24");
    c.etcd().put(&key, &format!(r#"{{"PublicIP":"{}","PublicIPv6":null}}"#, c.node(1).ip()))?;
    c.start_netd_all(&[])?;
    for i in 0..2 {
        c.node_mut(i).wait_subnet_env(WAIT)?;
    }
    assert_eq!(subnet(c.node(1))?, "10.244.42.0/24");
    assert_ne!(subnet(c.node(0))?, "10.244.42.0/24");
    let kv: serde_json::Value = serde_json::from_str(&c.etcd().ctl(&["get", &key, "-w", "json"])?)?;
    assert!(kv["kvs"][0]["lease"].as_i64().unwrap_or(0) == 0, "still a reservation: {kv}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&c.etcd().get(&key)?.unwrap())?["BackendType"], "vxlan");
    let a = c.node_mut(0).add_pod("a")?;
    let b = c.node_mut(1).add_pod("b")?;
    wait_ping(&a, b.ip)?;
    Ok(())
}

#[test]
fn a_node_whose_lease_vanished_while_down_gets_its_subnet_back_from_subnet_env() -> Result<()> {
    let mut c = start(2, VXLAN)?;
    let s = subnet(c.node(0))?;
    c.node_mut(0).stop_netd()?;
    // The lease expired while the node was down.
    c.etcd().del(&key_of(&s))?;
    c.node_mut(0).start_netd(&[])?;
    wait_until(WAIT, POLL, || Ok(c.etcd().get(&key_of(&s))?.is_some()))?;
    assert_eq!(subnet(c.node(0))?, s);
    Ok(())
}

#[test]
fn a_vni_change_in_the_config_converges_without_a_restart() -> Result<()> {
    let mut c = start(2, VXLAN)?;
    let a = c.node_mut(0).add_pod("a")?;
    let b = c.node_mut(1).add_pod("b")?;
    wait_ping(&a, b.ip)?;
    c.write_network_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":7}}"#)?;
    for i in 0..2 {
        let n = c.node(i);
        wait_until(WAIT, POLL, || Ok(n.ns().exec(&["ip", "link", "show", "netd.7"])?.status.success()))?;
        wait_until(WAIT, POLL, || Ok(!n.ns().exec(&["ip", "link", "show", "netd.1"])?.status.success()))?;
    }
    wait_ping(&a, b.ip)?;
    let leases = c.etcd().get_prefix(SUBNETS)?;
    assert!(leases.iter().all(|(_, v)| v.contains(r#""VNI":7"#)), "{leases:?}");
    Ok(())
}

#[test]
fn leases_are_renewed_before_they_expire() -> Result<()> {
    // A 6 s lease (the renew margin, at least a minute, exceeds it: renewal happens at half-life).
    let mut c = Cluster::new(2)?;
    c.write_network_config(VXLAN)?;
    c.start_netd_all(&["--subnet-lease-ttl", "6s"])?;
    for i in 0..2 {
        c.node_mut(i).wait_subnet_env(WAIT)?;
    }
    let s = subnet(c.node(0))?;
    let lease_of = |c: &Cluster| -> Result<i64> {
        let kv: serde_json::Value = serde_json::from_str(&c.etcd().ctl(&["get", &key_of(&s), "-w", "json"])?)?;
        kv["kvs"][0]["lease"].as_i64().context("no lease")
    };
    let first = lease_of(&c)?;
    // Three lifetimes later the key is still there, bound to newer etcd leases, never re-acquired.
    std::thread::sleep(Duration::from_secs(18));
    assert_ne!(lease_of(&c)?, first, "the lease was renewed");
    assert_eq!(subnet(c.node(0))?, s);
    let log = c.node(0).log();
    assert!(log.contains("renewed subnet lease"), "{log}");
    assert!(!log.contains("re-acquiring"), "the key never lapsed:\n{log}");
    Ok(())
}

#[test]
fn json_logs_for_log_pipelines() -> Result<()> {
    let mut c = Cluster::new(1)?;
    c.write_network_config(VXLAN)?;
    c.node_mut(0).start_netd(&["--log-format", "json"])?;
    c.node_mut(0).wait_subnet_env(WAIT)?;
    let log = last_run_log(c.node(0));
    let lines: Vec<&str> = log.lines().skip(1).filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{line}");
    }
    Ok(())
}

#[test]
fn etcd_with_tls_and_client_certificates() -> Result<()> {
    let mut c = Cluster::new_tls(2)?;
    c.write_network_config(VXLAN)?;
    let tls = c.netd_tls_args();
    let args: Vec<&str> = tls.iter().map(String::as_str).collect();
    c.start_netd_all(&args)?;
    for i in 0..2 {
        c.node_mut(i).wait_subnet_env(WAIT)?;
    }
    assert!(c.etcd().endpoint().starts_with("https://"));
    let a = c.node_mut(0).add_pod("a")?;
    let b = c.node_mut(1).add_pod("b")?;
    wait_ping(&a, b.ip)?;
    Ok(())
}

#[test]
fn missing_tls_files_are_a_clear_error() -> Result<()> {
    let mut c = Cluster::new(1)?;
    c.node_mut(0).start_netd(&["--etcd-cafile", "/nonexistent/ca.pem"])?;
    let n = c.node_mut(0);
    wait_until(WAIT, POLL, || Ok(!n.netd_running()))?;
    assert!(n.log().contains("reading etcd TLS file /nonexistent/ca.pem"), "{}", n.log());
    Ok(())
}

/// Pods set up by `netd-cni` (with the conflist netd wrote) on three nodes reach each other.
#[test]
fn netd_cni_pods_on_three_nodes_reach_each_other() -> Result<()> {
    let mut c = start(3, VXLAN)?;
    let mut pods = Vec::new();
    for i in 0..3 {
        let n = c.node(i);
        wait_until(WAIT, POLL, || Ok(n.cni_conf_dir().join("10-netd.conflist").exists()))?;
        pods.push(c.node_mut(i).add_cni_pod(&format!("p{i}"))?);
    }
    for (i, p) in pods.iter().enumerate() {
        let s = subnet(c.node(i))?;
        let net: ipnet::Ipv4Net = s.parse()?;
        assert!(net.contains(&p.ip), "pod {} is in its node's subnet {s}", p.ip);
    }
    for a in &pods {
        for b in &pods {
            if a.ip != b.ip {
                wait_ping(a, b.ip)?;
            }
        }
    }
    // `netd status` counts the pods netd-cni set up.
    let bin = netd_tests::netd_binary()?;
    let out = c.node(1).ns().run(&[bin.to_str().unwrap(), "status", "--run-dir", c.node(1).run_dir().to_str().unwrap()])?;
    assert!(out.contains("pods      1 on this node, 252 addresses free"), "{out}");
    let metrics = c.node(1).ns().run(&["curl", "-s", "http://127.0.0.1:9402/metrics"])?;
    assert!(metrics.contains("netd_cni_pods 1") && metrics.contains("netd_cni_addresses_free 252"), "{metrics}");
    // TCP across nodes, between CNI pods.
    let _srv = pods[2].spawn(&["socat", "TCP-LISTEN:8080,fork,reuseaddr", "SYSTEM:echo $SOCAT_PEERADDR"], None)?;
    let seen = retry(|| pods[0].run(&["socat", "-T", "2", "-", &format!("TCP:{}:8080,connect-timeout=2", pods[2].ip)]))?;
    assert_eq!(seen.trim(), pods[0].ip.to_string());
    Ok(())
}

const UDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;

/// The udp backend: the same end-to-end checks as for vxlan (leases, pods across nodes by ping and
/// TCP, a removed node), and what is particular to it: the TUN device, one route for the network,
/// packets from strangers dropped and counted.
#[test]
fn udp_backend_carries_pods_across_nodes() -> Result<()> {
    let mut c = start_udp(3)?;
    let leases = c.etcd().get_prefix(SUBNETS)?;
    assert_eq!(leases.len(), 3);
    for (_, v) in &leases {
        let v: serde_json::Value = serde_json::from_str(v)?;
        assert_eq!(v["BackendType"], "udp");
    }
    for n in c.nodes() {
        let link = n.ns().run(&["ip", "-d", "link", "show", "netd-udp0"])?;
        assert!(link.contains("mtu 1472") && link.contains("tun"), "{link}");
        assert_eq!(route(n, "10.244.0.0/16")?, "10.244.0.0/16 dev netd-udp0 proto 110 scope link");
        assert_eq!(n.subnet_env()?["FLANNEL_MTU"], "1472");
    }
    let a = c.node_mut(0).add_cni_pod("a")?;
    let b = c.node_mut(2).add_cni_pod("b")?;
    wait_ping(&a, b.ip)?;
    wait_ping(&b, a.ip)?;
    let _srv = b.spawn(&["socat", "TCP-LISTEN:8080,fork,reuseaddr", "SYSTEM:echo $SOCAT_PEERADDR"], None)?;
    let seen = retry(|| a.run(&["socat", "-T", "2", "-", &format!("TCP:{}:8080,connect-timeout=2", b.ip)]))?;
    assert_eq!(seen.trim(), a.ip.to_string());
    // A bulk transfer through the userspace datapath.
    let _iperf = b.spawn(&["iperf3", "-s", "-1"], None)?;
    std::thread::sleep(Duration::from_millis(300));
    let out = a.ns.command(&["iperf3", "-c", &b.ip.to_string(), "-t", "2", "-J"]).output()?;
    let intervals = iperf_intervals(&String::from_utf8_lossy(&out.stdout))?;
    assert!(intervals.iter().all(|bps| *bps > 0.0), "{intervals:?}");

    // A datagram to port 8285 from an address that holds no lease is dropped and counted.
    let stranger = c.add_node()?;
    let pkt = "45000054000040004001000000000000000000000800f7ff00000000";
    c.node(stranger).ns().sh(&format!("echo {pkt} | xxd -r -p | socat -u - UDP:{}:8285,sourceport=8285", c.node(0).ip()))?;
    let n0 = c.node(0);
    wait_until(WAIT, POLL, || {
        let out = n0.ns().run(&["curl", "-s", "http://127.0.0.1:9402/metrics"])?;
        Ok(out.lines().any(|l| l.starts_with("netd_udp_dropped_total{reason=\"unknown_source\"}") && !l.ends_with(" 0")))
    })?;

    // A removed node's subnet leaves the datapath: its pods become unreachable.
    let gone = subnet(c.node(2))?;
    c.node_mut(2).stop_netd()?;
    c.etcd().del(&key_of(&gone))?;
    wait_until(WAIT, POLL, || Ok(!a.ping(b.ip)))?;
    Ok(())
}

fn start_udp(n: usize) -> Result<Cluster> {
    let mut c = Cluster::new(n)?;
    c.write_network_config(UDP)?;
    c.start_netd_all(&[])?;
    for i in 0..n {
        c.node_mut(i).wait_subnet_env(WAIT)?;
    }
    Ok(c)
}

/// Switching a running network between vxlan and udp (a config change) converges without a restart.
#[test]
fn switching_between_vxlan_and_udp_converges_without_a_restart() -> Result<()> {
    let mut c = start(2, VXLAN)?;
    let a = c.node_mut(0).add_cni_pod("a")?;
    let b = c.node_mut(1).add_cni_pod("b")?;
    wait_ping(&a, b.ip)?;
    c.write_network_config(UDP)?;
    for i in 0..2 {
        let n = c.node(i);
        wait_until(WAIT, POLL, || Ok(n.ns().exec(&["ip", "link", "show", "netd-udp0"])?.status.success()))?;
        wait_until(WAIT, POLL, || Ok(!n.ns().exec(&["ip", "link", "show", "netd.1"])?.status.success()))?;
    }
    wait_ping(&a, b.ip)?;
    let leases = c.etcd().get_prefix(SUBNETS)?;
    assert!(leases.iter().all(|(_, v)| v.contains(r#""BackendType":"udp""#)), "{leases:?}");
    c.write_network_config(VXLAN)?;
    for i in 0..2 {
        let n = c.node(i);
        wait_until(WAIT, POLL, || Ok(n.ns().exec(&["ip", "link", "show", "netd.1"])?.status.success()))?;
        wait_until(WAIT, POLL, || Ok(!n.ns().exec(&["ip", "link", "show", "netd-udp0"])?.status.success()))?;
    }
    wait_ping(&a, b.ip)?;
    Ok(())
}
