//! End-to-end tests of the pod network (etcd subnet leases + the vxlan or udp overlay), with the
//! built `netd` in node namespaces, a real etcd and real kernel devices. Nothing here is mocked.
//!
//! Every scenario that is not particular to one backend is a function taking the [`Backend`],
//! run once per backend by [`for_both_backends!`] (test names `SCENARIO::vxlan`, `SCENARIO::udp`).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd_tests::{wait_until, Cluster, Node, Pod};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const UDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;
const SUBNETS: &str = "/coreos.com/network/subnets/";
const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Vxlan,
    Udp,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Vxlan => "vxlan",
            Backend::Udp => "udp",
        }
    }

    /// The standard network config for this backend.
    fn config(self) -> &'static str {
        match self {
            Backend::Vxlan => VXLAN,
            Backend::Udp => UDP,
        }
    }

    /// A network config with other top-level fields (`"SubnetLen":24,...`) and this backend.
    fn config_with(self, network_fields: &str) -> String {
        format!(r#"{{{network_fields},"Backend":{{"Type":"{}"}}}}"#, self.name())
    }

    /// The overlay device netd creates.
    fn device(self) -> &'static str {
        match self {
            Backend::Vxlan => "netd.1",
            Backend::Udp => "netd-udp0",
        }
    }

    /// A well-formed lease of this backend for a node at `public_ip` (a VtepMAC of its own per
    /// address), as flanneld or netd writes it.
    fn lease_json(self, public_ip: Ipv4Addr) -> String {
        match self {
            Backend::Vxlan => {
                let o = public_ip.octets();
                let mac = format!("0e:6e:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
                format!(r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#)
            }
            Backend::Udp => format!(r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"udp"}}"#),
        }
    }

    /// What the log says when netd creates the overlay device (a restart must not).
    fn created_device_log(self) -> &'static str {
        match self {
            Backend::Vxlan => "created VXLAN device",
            Backend::Udp => "created the TUN device",
        }
    }
}

/// One `#[test]` per backend for each scenario `fn NAME(backend: Backend) -> Result<()>`; the
/// udp backend twice, with its default datapath (the kernel fast path where the kernel can run
/// it, as on this machine) and with `--udp-datapath userspace` (`udp_userspace`).
macro_rules! for_both_backends {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[test]
            fn vxlan() -> anyhow::Result<()> {
                super::$scenario(super::Backend::Vxlan)
            }
            #[test]
            fn udp() -> anyhow::Result<()> {
                super::$scenario(super::Backend::Udp)
            }
            #[test]
            fn udp_userspace() -> anyhow::Result<()> {
                netd_tests::set_thread_netd_env(&[("NETD_UDP_DATAPATH", "userspace")]);
                super::$scenario(super::Backend::Udp)
            }
        }
    )*};
}

for_both_backends!(
    three_nodes_lease_distinct_subnets_in_flannels_format,
    pods_reach_each_other_across_nodes_and_masquerade_only_outbound,
    a_removed_nodes_routes_disappear_from_the_others,
    restarting_netd_keeps_the_subnet_and_a_long_tcp_stream,
    etcd_outage_interrupts_nothing_and_new_nodes_converge_after,
    malformed_keys_are_skipped_reported_and_never_handed_out,
    leases_outside_the_network_are_skipped_and_cut_no_node_off,
    drift_is_repaired_by_the_periodic_resync,
    a_revoked_lease_is_reacquired_loudly,
    missing_and_invalid_config_are_waited_out_with_a_clear_message,
    nodes_starting_together_never_share_a_subnet,
    a_reservation_is_honoured_and_stays_a_reservation,
    a_node_whose_lease_vanished_while_down_gets_its_subnet_back_from_subnet_env,
    leases_are_renewed_before_they_expire,
    netd_cni_pods_on_three_nodes_reach_each_other,
);

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

/// Waits until every node has programmed every other node's subnet (the nodes that started last
/// are seen by the others a watch event later): a netd route per peer with vxlan; with udp (one
/// route for the whole network) the peer in the datapath's table, as `netd status` reports it.
fn wait_converged(c: &Cluster) -> Result<()> {
    let subnets: Vec<String> = c.nodes().iter().map(subnet).collect::<Result<_>>()?;
    for node in c.nodes() {
        let udp = node.ns().exec(&["ip", "link", "show", "netd-udp0"])?.status.success();
        for (j, s) in subnets.iter().enumerate() {
            if j != node.index() {
                if udp {
                    wait_until(WAIT, POLL, || Ok(programmed_peers(node)?.contains(s)))?;
                } else {
                    wait_until(WAIT, POLL, || Ok(!route(node, s)?.is_empty()))?;
                }
            }
        }
    }
    Ok(())
}

/// The peer subnets `netd status --json` on a node reports as programmed.
fn programmed_peers(node: &Node) -> Result<BTreeSet<String>> {
    let (_, out) = node.netd_status(&["--json"])?;
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&out) else { return Ok(BTreeSet::new()) };
    Ok(v["status"]["peers"]
        .as_array()
        .map(|peers| {
            peers.iter().filter(|p| p["programmed"] == true).filter_map(|p| p["subnet"].as_str().map(str::to_string)).collect()
        })
        .unwrap_or_default())
}

/// The value of a Prometheus sample (`name{labels}`, exactly) on the node's metrics endpoint.
fn metric(node: &Node, sample: &str) -> Result<f64> {
    let out = node.ns().run(&["curl", "-s", "http://127.0.0.1:9402/metrics"])?;
    let line = out.lines().find(|l| l.split_once(' ').is_some_and(|(k, _)| k == sample)).with_context(|| format!("no {sample} in:\n{out}"))?;
    Ok(line.rsplit(' ').next().unwrap().parse()?)
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

fn three_nodes_lease_distinct_subnets_in_flannels_format(backend: Backend) -> Result<()> {
    let c = start(3, backend.config())?;
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
        assert_eq!(v["PublicIP"], node.ip().to_string());
        assert!(v["PublicIPv6"].is_null());
        assert_eq!(v["BackendType"], backend.name());
        match backend {
            Backend::Vxlan => {
                assert_eq!(obj.keys().cloned().collect::<Vec<_>>(), ["BackendData", "BackendType", "PublicIP", "PublicIPv6"]);
                assert_eq!(v["BackendData"]["VNI"], 1);
                let mac = v["BackendData"]["VtepMAC"].as_str().unwrap();
                let dev = node.ns().run(&["cat", "/sys/class/net/netd.1/address"])?;
                assert_eq!(dev.trim(), mac, "lease MAC is the device's MAC");
            }
            // flanneld's udp backend writes no BackendData (omitempty) and ignores it: netd says
            // there that it takes super-packets, and nothing else.
            Backend::Udp => {
                assert_eq!(obj.keys().cloned().collect::<Vec<_>>(), ["BackendData", "BackendType", "PublicIP", "PublicIPv6"]);
                assert_eq!(v["BackendData"], serde_json::json!({"NetdSuperPackets": true}));
            }
        }
        // Bound to a 24 h etcd lease.
        let kv = c.etcd().ctl(&["get", &key_of(&s), "-w", "json"])?;
        let kv: serde_json::Value = serde_json::from_str(&kv)?;
        let lease_id = kv["kvs"][0]["lease"].as_i64().context("key has no etcd lease")?;
        let ttl = c.etcd().ctl(&["lease", "timetolive", &format!("{lease_id:x}")])?;
        let secs: i64 = ttl.split("remaining(").nth(1).and_then(|r| r.split('s').next()).context(ttl.clone())?.parse()?;
        assert!(secs > 86000 && secs <= 86400, "{ttl}");
        // The device: flannel's parameters (MTU: the underlay's minus the encapsulation).
        let link = node.ns().run(&["ip", "-d", "link", "show", backend.device()])?;
        let mtu = match backend {
            Backend::Vxlan => {
                assert!(link.contains("vxlan id 1") && link.contains("dstport 8472") && link.contains("nolearning"), "{link}");
                "1450"
            }
            Backend::Udp => {
                assert!(link.contains("tun type tun") && link.contains("multi_queue") && link.contains("persist on"), "{link}");
                let sockets = node.ns().run(&["ss", "-uln", "sport", "= :8285"])?;
                assert!(sockets.contains(&format!("{}:8285", node.ip())), "{sockets}");
                // The datapath threads run ahead of ordinary work (--udp-nice, default -10).
                let pid = node.netd_pid().context("netd runs")?.to_string();
                let threads = node.ns().run(&["ps", "-L", "-o", "comm=,ni=", "-p", &pid])?;
                let udp: Vec<&str> = threads.lines().filter(|l| l.trim_start().starts_with("udp-")).collect();
                assert!(!udp.is_empty() && udp.iter().all(|l| l.trim_end().ends_with("-10")), "{threads}");
                "1472"
            }
        };
        assert!(link.contains(&format!("mtu {mtu}")), "{link}");
        let addr = node.ns().run(&["ip", "-4", "-br", "addr", "show", backend.device()])?;
        assert!(addr.contains(&s.replace("/24", "/32")), "{addr}");
        let env = node.subnet_env()?;
        assert_eq!(env["FLANNEL_NETWORK"], "10.244.0.0/16");
        assert_eq!(env["FLANNEL_MTU"], mtu);
        assert_eq!(env["FLANNEL_IPMASQ"], "true");
    }
    if backend == Backend::Udp {
        // One route for the whole network through the TUN device; every peer in the datapath.
        for node in c.nodes() {
            assert_eq!(route(node, "10.244.0.0/16")?, "10.244.0.0/16 dev netd-udp0 proto 110 scope link");
            let routes = node.ns().run(&["ip", "route", "show", "proto", "110"])?;
            assert_eq!(routes.trim(), "10.244.0.0/16 dev netd-udp0 scope link", "no per-peer routes");
            let peers = programmed_peers(node)?;
            let others: BTreeSet<String> = c.nodes().iter().filter(|p| p.index() != node.index()).map(subnet).collect::<Result<_>>()?;
            assert_eq!(peers, others);
        }
        return Ok(());
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

fn pods_reach_each_other_across_nodes_and_masquerade_only_outbound(backend: Backend) -> Result<()> {
    let mut c = start(3, backend.config())?;
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

fn a_removed_nodes_routes_disappear_from_the_others(backend: Backend) -> Result<()> {
    let mut c = start(3, backend.config())?;
    let gone = subnet(c.node(2))?;
    let gone_ip = c.node(2).ip().to_string();
    if backend == Backend::Udp {
        // The udp datapath forgets the peer: its pods become unreachable, the packets to them are
        // dropped (counted) instead of being sent to its old address.
        let a = c.node_mut(0).add_pod("a")?;
        let b = c.node_mut(2).add_pod("b")?;
        wait_ping(&a, b.ip)?;
        c.node_mut(2).stop_netd()?;
        assert_eq!(c.etcd().del(&key_of(&gone))?, 1);
        for n in &c.nodes()[..2] {
            wait_until(WAIT, POLL, || Ok(!programmed_peers(n)?.contains(&gone)))?;
        }
        let sample = r#"netd_udp_dropped_total{reason="no_route"}"#;
        let before = metric(c.node(0), sample)?;
        assert!(!a.ping(b.ip), "the removed node's pod is unreachable");
        wait_until(WAIT, POLL, || Ok(metric(c.node(0), sample)? > before))?;
        return Ok(());
    }
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

/// With udp, the TUN device outlives netd (persistent, with its address and route) and the
/// restarted netd adopts it: the stream only pauses until the new datapath runs (TCP retransmits
/// what was dropped meanwhile), where with VXLAN the kernel carries it throughout.
fn restarting_netd_keeps_the_subnet_and_a_long_tcp_stream(backend: Backend) -> Result<()> {
    let mut c = start(2, backend.config())?;
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
        for changed in [backend.created_device_log(), "overlay updated", "programmed nftables", "wrote subnet.env"] {
            assert!(!log.contains(changed), "restart on node{i} changed something ({changed}):\n{log}");
        }
        if backend == Backend::Udp {
            assert!(log.contains("adopted the TUN device"), "{log}");
        }
    }
    Ok(())
}

fn etcd_outage_interrupts_nothing_and_new_nodes_converge_after(backend: Backend) -> Result<()> {
    let mut c = start(2, backend.config())?;
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

fn malformed_keys_are_skipped_reported_and_never_handed_out(backend: Backend) -> Result<()> {
    let mut c = Cluster::new(3)?;
    c.write_network_config(&backend.config_with(r#""Network":"10.244.0.0/21","SubnetLen":24"#))?;
    let etcd = c.etcd();
    etcd.put(&format!("{SUBNETS}10.244.1.0-24"), "{not json")?;
    // Well-formed JSON this backend cannot use.
    let (unusable, why) = match backend {
        Backend::Vxlan => (r#"{"PublicIP":"198.18.0.99","BackendType":"vxlan"}"#, "(10.244.2.0/24): vxlan lease without BackendData"),
        Backend::Udp => (r#"{"PublicIP":"198.18.0.99","BackendType":"host-gw"}"#, r#"(10.244.2.0/24): backend "host-gw" is not udp"#),
    };
    etcd.put(&format!("{SUBNETS}10.244.2.0-24"), unusable)?;
    etcd.put(&format!("{SUBNETS}garbage"), "{}")?;
    // Host bits set: not a subnet's name, so no peer; but it stands for 10.244.3.0/24, which
    // stays taken (as the report says).
    etcd.put(&format!("{SUBNETS}10.244.3.9-24"), &backend.lease_json(Ipv4Addr::new(198, 18, 0, 98)))?;
    c.start_netd_all(&[])?;
    for i in 0..3 {
        c.node_mut(i).wait_subnet_env(WAIT)?;
        let s = subnet(c.node(i))?;
        assert!(!["10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"].contains(&s.as_str()), "node{i} got the malformed key's subnet {s}");
        assert_eq!(route(c.node(i), "10.244.3.0/24")?, "", "a key with host bits is no peer");
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
        assert!(log.contains(why), "{log}");
        assert!(log.contains("10.244.3.9-24\": address has host bits set (the subnet would be 10.244.3.0/24); skipped, and 10.244.3.0/24 stays taken"), "{log}");
        assert!(log.contains("garbage\": expected <ip>-<prefix length>; skipped, and it names no subnet, so it reserves none"), "{log}");
        let (code, text) = c.node(i).netd_status(&[])?;
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("10.244.3.9-24") && text.contains("10.244.3.0/24 stays taken"), "{text}");
        wait_until(WAIT, POLL, || Ok(c.node(i).log().contains("10.244.9.0-24")))?;
    }
    Ok(())
}

/// A lease key for the underlay's own prefix, or for any range outside `Network` (here the
/// service range), is no peer: every node keeps the kernel's connected route to the underlay as
/// it was and still reaches etcd, the other nodes and their pods, while `netd status` is DEGRADED
/// and names the keys; once they are deleted the status is HEALTHY again, the route unchanged.
fn leases_outside_the_network_are_skipped_and_cut_no_node_off(backend: Backend) -> Result<()> {
    let mut c = start(2, backend.config())?;
    let a = c.node_mut(0).add_pod("a")?;
    let b = c.node_mut(1).add_pod("b")?;
    wait_ping(&a, b.ip)?;
    for n in c.nodes() {
        wait_until(WAIT, POLL, || Ok(n.netd_status(&[])?.0 == 0))?;
    }
    let underlay = "198.18.0.0/24";
    let connected: Vec<String> = c.nodes().iter().map(|n| route(n, underlay)).collect::<Result<_>>()?;
    for (n, r) in c.nodes().iter().zip(&connected) {
        assert_eq!(*r, format!("{underlay} dev eth0 proto kernel scope link src {}", n.ip()));
    }

    let bogus = ["10.96.0.0/12", underlay];
    for (k, ip) in bogus.iter().zip([98, 99]) {
        c.etcd().put(&key_of(k), &backend.lease_json(Ipv4Addr::new(198, 18, 0, ip)))?;
    }
    for n in c.nodes() {
        let reported = || -> Result<bool> {
            let (code, text) = n.netd_status(&[])?;
            Ok(code == 1 && bogus.iter().all(|k| text.contains(&key_of(k))))
        };
        wait_until(WAIT, POLL, reported).with_context(|| format!("{} status:\n{}", n.name(), n.netd_status(&[]).map(|s| s.1).unwrap_or_default()))?;
        let (_, text) = n.netd_status(&[])?;
        assert!(text.starts_with("DEGRADED"), "{text}");
        for k in bogus {
            let line = format!("peer {k} (key {}) skipped: outside the pod network 10.244.0.0/16 (Network in the network config)", key_of(k));
            assert!(text.contains(&line), "{line} in:\n{text}");
        }
        let (code, json) = n.netd_status(&["--json"])?;
        assert_eq!(code, 1);
        let v: serde_json::Value = serde_json::from_str(&json)?;
        let skipped: Vec<&str> = v["status"]["peers"]
            .as_array()
            .context("peers")?
            .iter()
            .filter(|p| p["skipped"].is_string())
            .filter_map(|p| p["key"].as_str())
            .collect();
        assert_eq!(skipped, bogus.map(key_of));

        // The kernel's route to the underlay is untouched, and nothing of netd's goes there.
        assert_eq!(route(n, underlay)?, connected[n.index()]);
        let ours = n.ns().run(&["ip", "route", "show", "proto", "110"])?;
        assert!(!ours.contains("198.18.") && !ours.contains("10.96."), "{ours}");
        // etcd (on the underlay gateway) and the other node answer.
        for ip in [netd_tests::UNDERLAY_GATEWAY, c.node(1 - n.index()).ip()] {
            assert!(n.ns().exec(&["ping", "-c", "1", "-W", "2", &ip.to_string()])?.status.success(), "{} cannot reach {ip}", n.name());
        }
        // Reported once, not at every resync.
        let log = last_run_log(n);
        for k in bogus {
            let said = format!("skipping subnet key {} ({k}): outside the pod network", key_of(k));
            assert!((1..=2).contains(&log.matches(&said).count()), "{said} in:\n{log}");
        }
    }
    assert!(a.ping(b.ip) && b.ping(a.ip));

    for k in bogus {
        assert_eq!(c.etcd().del(&key_of(k))?, 1);
    }
    for n in c.nodes() {
        wait_until(WAIT, POLL, || Ok(n.netd_status(&[])?.0 == 0))?;
        assert!(n.netd_status(&[])?.1.starts_with("HEALTHY"));
        assert_eq!(route(n, underlay)?, connected[n.index()]);
    }
    assert!(a.ping(b.ip));
    Ok(())
}

/// A route netd did not create at a peer's destination (here a static route on node0 to a
/// peer subnet) is neither replaced nor removed: node0 reports the conflict, naming the subnet
/// and the route, as UNHEALTHY, and programs everything else; node1 programs the peer as usual.
/// Once the lease goes, node0 is HEALTHY again and the static route is still there.
#[test]
fn a_route_netd_did_not_create_is_never_replaced_or_removed() -> Result<()> {
    let mut c = start(2, VXLAN)?;
    let a = c.node_mut(0).add_pod("a")?;
    let b = c.node_mut(1).add_pod("b")?;
    let (n0, n1) = (c.node(0), c.node(1));
    let peer = "10.244.200.0/24";
    n0.ns().run(&["ip", "route", "add", peer, "via", "198.18.0.1", "dev", "eth0", "proto", "static"])?;
    let theirs = format!("{peer} via 198.18.0.1 dev eth0 proto static");
    assert_eq!(route(n0, peer)?, theirs);
    c.etcd().put(&key_of(peer), &Backend::Vxlan.lease_json(Ipv4Addr::new(198, 18, 0, 99)))?;

    wait_until(WAIT, POLL, || Ok(route(n1, peer)?.contains("dev netd.1")))?;
    let conflict = format!("route to {peer} not programmed: {peer} via 198.18.0.1 dev eth0 proto static is there and netd did not create it");
    wait_until(WAIT, POLL, || Ok(n0.netd_status(&[])?.1.contains(&conflict)))
        .with_context(|| format!("node0 status:\n{}", n0.netd_status(&[]).map(|s| s.1).unwrap_or_default()))?;
    let (code, text) = n0.netd_status(&[])?;
    assert_eq!(code, 2, "{text}");
    assert!(text.starts_with("UNHEALTHY"), "{text}");
    let (_, json) = n0.netd_status(&["--json"])?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(v["status"]["route_conflicts"][0]["subnet"], peer, "{json}");
    assert_eq!(route(n0, peer)?, theirs);
    // Everything else is programmed: the pods on the two nodes reach each other.
    wait_ping(&a, b.ip)?;
    // Still not touched after resyncs (one per second in the test bed).
    let syncs = last_run_log(n0).matches("reconciled").count();
    wait_until(WAIT, POLL, || Ok(last_run_log(n0).matches("reconciled").count() >= syncs + 3))?;
    assert_eq!(route(n0, peer)?, theirs);

    assert_eq!(c.etcd().del(&key_of(peer))?, 1);
    wait_until(WAIT, POLL, || Ok(route(n1, peer)?.is_empty()))?;
    wait_until(WAIT, POLL, || Ok(n0.netd_status(&[])?.0 == 0))?;
    assert_eq!(route(n0, peer)?, theirs);
    Ok(())
}

fn drift_is_repaired_by_the_periodic_resync(backend: Backend) -> Result<()> {
    let c = start(2, backend.config())?;
    let peer = subnet(c.node(1))?;
    let n = c.node(0);
    if backend == Backend::Udp {
        return udp_drift_is_repaired(&c);
    }
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

/// The udp backend's state in the kernel: the network route through the TUN device, the device
/// itself (up), its address; and the nftables table, as with vxlan.
fn udp_drift_is_repaired(c: &Cluster) -> Result<()> {
    let n = c.node(0);
    let net = "10.244.0.0/16";
    let want = route(n, net)?;
    assert_eq!(want, "10.244.0.0/16 dev netd-udp0 proto 110 scope link");
    n.ns().run(&["ip", "route", "del", net])?;
    wait_until(WAIT, POLL, || Ok(route(n, net)? == want))?;
    // A stale route of ours through the device is removed.
    n.ns().run(&["ip", "route", "add", "10.244.250.0/24", "dev", "netd-udp0", "proto", "110"])?;
    wait_until(WAIT, POLL, || Ok(route(n, "10.244.250.0/24")?.is_empty()))?;
    // Brought down by hand (which drops its routes): up again, with the route and traffic.
    n.ns().run(&["ip", "link", "set", "netd-udp0", "down"])?;
    wait_until(WAIT, POLL, || Ok(n.ns().run(&["ip", "link", "show", "netd-udp0"])?.contains(",UP")))?;
    wait_until(WAIT, POLL, || Ok(route(n, net)? == want))?;
    // Deleted by hand: recreated.
    n.ns().run(&["ip", "link", "del", "netd-udp0"])?;
    wait_until(WAIT, POLL, || Ok(route(n, net)? == want))?;
    let ours = subnet(n)?.replace("/24", "/32");
    wait_until(WAIT, POLL, || Ok(n.ns().run(&["ip", "-4", "-br", "addr", "show", "netd-udp0"])?.contains(&ours)))?;
    n.ns().run(&["nft", "delete", "table", "ip", "netd"])?;
    wait_until(WAIT, POLL, || Ok(n.ns().exec(&["nft", "list", "table", "ip", "netd"])?.status.success()))?;
    // Through all of it the peer stays reachable once repaired.
    let peer = subnet(c.node(1))?;
    let peer_gw: Ipv4Addr = peer.trim_end_matches("/24").parse()?;
    wait_until(WAIT, POLL, || Ok(n.ns().exec(&["ping", "-c", "1", "-W", "1", &peer_gw.to_string()])?.status.success()))?;
    Ok(())
}

fn mac_of(node: &Node) -> Result<String> {
    Ok(node.ns().run(&["cat", "/sys/class/net/netd.1/address"])?.trim().to_string())
}

fn a_revoked_lease_is_reacquired_loudly(backend: Backend) -> Result<()> {
    let mut c = start(2, backend.config())?;
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

fn missing_and_invalid_config_are_waited_out_with_a_clear_message(backend: Backend) -> Result<()> {
    let mut c = Cluster::new(1)?;
    c.node_mut(0).start_netd(&[])?;
    wait_until(WAIT, POLL, || Ok(c.node(0).log().contains("waiting for the network config: no key /coreos.com/network/config")))?;
    c.write_network_config(&backend.config_with(r#""Network":"10.244.0.0/16","SubnetLen":31"#))?;
    wait_until(WAIT, POLL, || Ok(c.node(0).log().contains("network config field `SubnetLen`: /31 must be less than /31")))?;
    assert!(c.node_mut(0).netd_running());
    assert!(c.node(0).subnet_env().is_err(), "no subnet.env before a valid config");
    assert!(!c.node(0).ns().exec(&["ip", "link", "show", backend.device()])?.status.success(), "no device before a valid config");
    c.write_network_config(backend.config())?;
    c.node_mut(0).wait_subnet_env(WAIT)?;
    c.node(0).ns().run(&["ip", "link", "show", backend.device()])?;
    Ok(())
}

fn nodes_starting_together_never_share_a_subnet(backend: Backend) -> Result<()> {
    // Exactly as many subnets as nodes: every create races with the others.
    let mut c = Cluster::new(6)?;
    c.write_network_config(&backend.config_with(r#""Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.15.0""#))?;
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

fn a_reservation_is_honoured_and_stays_a_reservation(backend: Backend) -> Result<()> {
    let mut c = Cluster::new(2)?;
    c.write_network_config(backend.config())?;
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
    assert_eq!(serde_json::from_str::<serde_json::Value>(&c.etcd().get(&key)?.unwrap())?["BackendType"], backend.name());
    wait_converged(&c)?;
    let a = c.node_mut(0).add_pod("a")?;
    let b = c.node_mut(1).add_pod("b")?;
    wait_ping(&a, b.ip)?;
    Ok(())
}

fn a_node_whose_lease_vanished_while_down_gets_its_subnet_back_from_subnet_env(backend: Backend) -> Result<()> {
    let mut c = start(2, backend.config())?;
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

fn leases_are_renewed_before_they_expire(backend: Backend) -> Result<()> {
    // A 6 s lease (the renew margin, at least a minute, exceeds it: renewal happens at half-life).
    let mut c = Cluster::new(2)?;
    c.write_network_config(backend.config())?;
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
fn netd_cni_pods_on_three_nodes_reach_each_other(backend: Backend) -> Result<()> {
    let mut c = start(3, backend.config())?;
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

/// What is particular to the udp backend's datapath: a bulk transfer through it, and datagrams
/// from an address that holds no lease dropped and counted (flannel accepts them from anyone).
/// Run with the kernel fast path (the default here: this kernel has TCX) and with
/// `--udp-datapath userspace`; each checks that its datapath, not the other, carried the bytes.
fn udp_carries_a_bulk_transfer_and_drops_strangers(kernel: bool) -> Result<()> {
    if !kernel {
        netd_tests::set_thread_netd_env(&[("NETD_UDP_DATAPATH", "userspace")]);
    }
    let mut c = start(2, UDP)?;
    let a = c.node_mut(0).add_cni_pod("a")?;
    let b = c.node_mut(1).add_cni_pod("b")?;
    wait_ping(&a, b.ip)?;
    let bin = netd_tests::netd_binary()?;
    let status = c.node(1).ns().run(&[bin.to_str().unwrap(), "status", "--run-dir", c.node(1).run_dir().to_str().unwrap()])?;
    let want = if kernel { "datapath  kernel (tc eBPF)" } else { "datapath  userspace (--udp-datapath userspace)" };
    assert!(status.contains(want), "expected {want:?} in the status:\n{status}");
    let _iperf = b.spawn(&["iperf3", "-s", "-1"], None)?;
    std::thread::sleep(Duration::from_millis(300));
    let out = a.ns.command(&["iperf3", "-c", &b.ip.to_string(), "-t", "2", "-J"]).output()?;
    let intervals = iperf_intervals(&String::from_utf8_lossy(&out.stdout))?;
    assert!(intervals.iter().all(|bps| *bps > 0.0), "{intervals:?}");
    // Counted on the way out (the counters reach Prometheus at each resync), by the datapath
    // that encapsulated them; the other one saw next to nothing. (On the way in, a bulk
    // transfer goes through the userspace datapath either way: see bpf/udp_overlay.c.)
    let n0 = c.node(0);
    let (carried, other) = (r#"netd_udp_kernel_total{unit="bytes",dir="out"}"#, r#"netd_udp_traffic_total{unit="bytes",dir="out"}"#);
    let (carried, other) = if kernel { (carried, other) } else { (other, carried) };
    wait_until(WAIT, POLL, || Ok(metric(n0, carried)? > 1e6))?;
    let seen_by_other = metric(n0, other).unwrap_or(0.0);
    assert!(seen_by_other < 1e5, "{other} = {seen_by_other}: the bulk transfer went through the wrong datapath");
    let n1 = c.node(1);
    wait_until(WAIT, POLL, || Ok(metric(n1, r#"netd_udp_traffic_total{unit="bytes",dir="in"}"#)? > 1e6))?;

    // A datagram to port 8285 from an address that holds no lease is dropped and counted.
    let stranger = c.add_node()?;
    let pkt = "45000054000040004001000000000000000000000800f7ff00000000";
    c.node(stranger).ns().sh(&format!("echo {pkt} | xxd -r -p | socat -u - UDP:{}:8285,sourceport=8285", c.node(0).ip()))?;
    let n0 = c.node(0);
    wait_until(WAIT, POLL, || Ok(metric(n0, r#"netd_udp_dropped_total{reason="unknown_source"}"#)? > 0.0))?;
    Ok(())
}

#[test]
fn udp_kernel_datapath_carries_a_bulk_transfer_and_drops_strangers() -> Result<()> {
    udp_carries_a_bulk_transfer_and_drops_strangers(true)
}

#[test]
fn udp_userspace_datapath_carries_a_bulk_transfer_and_drops_strangers() -> Result<()> {
    udp_carries_a_bulk_transfer_and_drops_strangers(false)
}

/// A node set up by hand the way flanneld's udp backend sets one up: a TUN device `flannel0` with
/// the network route, MTU underlay − 28, a process relaying raw IP packets between it and UDP
/// port 8285 (socat here, with one peer), and a lease written with etcdctl in flannel's JSON.
/// It and a netd node reach each other both ways: the wire format and the lease are flannel's.
#[test]
fn a_flannel_style_udp_node_and_a_netd_node_reach_each_other() -> Result<()> {
    let mut c = start(1, UDP)?;
    let f = c.add_node()?;
    let fsub = "10.244.99.0/24";
    let fip = c.node(f).ip().to_string();
    let netd_ip = c.node(0).ip().to_string();
    let relay = c.node(f).ns().spawn(
        &["socat", "-b", "65536", "TUN:10.244.99.0/16,tun-type=tun,iff-no-pi,iff-up,tun-name=flannel0", &format!("UDP:{netd_ip}:8285,bind={fip}:8285")],
        None,
    )?;
    let _relay = KillOnDrop(relay);
    let fnode = c.node(f).ns();
    wait_until(WAIT, POLL, || Ok(fnode.exec(&["ip", "link", "show", "flannel0"])?.status.success()))?;
    fnode.run(&["ip", "link", "set", "flannel0", "mtu", "1472"])?;
    let lease = c.etcd().ctl(&["lease", "grant", "86400"])?;
    let id = lease.split_whitespace().nth(1).context(lease.clone())?.to_string();
    let value = format!(r#"{{"PublicIP":"{fip}","PublicIPv6":null,"BackendType":"udp"}}"#);
    c.etcd().ctl(&["put", &format!("--lease={id}"), &key_of(fsub), &value])?;
    std::fs::write(c.node(f).run_dir().join("subnet.env"), "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.99.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n")?;
    let fpod = c.node_mut(f).add_pod("flannel-pod")?;
    let a = c.node_mut(0).add_pod("a")?;
    wait_ping(&a, fpod.ip)?;
    wait_ping(&fpod, a.ip)?;
    // TCP both ways through the relay: full-size packets, which netd sends as single datagrams.
    let _srv = fpod.spawn(&["socat", "TCP-LISTEN:8080,fork,reuseaddr", "SYSTEM:head -c 200000 /dev/zero; echo $SOCAT_PEERADDR"], None)?;
    let seen = retry(|| a.run(&["sh", "-c", &format!("socat -T 5 - TCP:{}:8080,connect-timeout=2 | tail -c 20 | tr -d '\\0'", fpod.ip)]))?;
    assert_eq!(seen.trim(), a.ip.to_string());
    Ok(())
}

/// Kills (and reaps) a helper process when a test ends, even by panic.
struct KillOnDrop(std::process::Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `Port` change in a udp network config moves the datapath to the new port on every node
/// without a restart (the analogue of a VNI change for vxlan).
#[test]
fn a_udp_port_change_in_the_config_converges_without_a_restart() -> Result<()> {
    let mut c = start(2, UDP)?;
    let a = c.node_mut(0).add_pod("a")?;
    let b = c.node_mut(1).add_pod("b")?;
    wait_ping(&a, b.ip)?;
    let pid = c.node(0).netd_pid();
    c.write_network_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp","Port":8300}}"#)?;
    for i in 0..2 {
        let n = c.node(i);
        let want = format!("{}:8300", n.ip());
        wait_until(WAIT, POLL, || Ok(n.ns().run(&["ss", "-uln"])?.contains(&want)))?;
        wait_until(WAIT, POLL, || Ok(!n.ns().run(&["ss", "-uln"])?.contains(":8285")))?;
    }
    wait_ping(&a, b.ip)?;
    assert_eq!(c.node(0).netd_pid(), pid, "same netd process");
    assert!(c.node_mut(0).netd_running());
    Ok(())
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
