//! Operating netd: `netd status` on healthy and broken nodes, metrics scraped by a real HTTP
//! client (curl), readiness transitions, `netd cleanup`. The built binaries in namespaces.

use std::time::Duration;

use anyhow::{Context, Result};
use netd_tests::{netd_binary, wait_until, Cluster, Node};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);

/// Runs `netd status [args]` in the node's namespace: (exit code, stdout).
fn status(node: &Node, args: &[&str]) -> Result<(i32, String)> {
    node.netd_status(args)
}

/// Two nodes with netd running and their subnets leased.
fn two_nodes() -> Result<Cluster> {
    let mut c = Cluster::new(2)?;
    c.write_network_config(VXLAN)?;
    c.start_netd_all(&[])?;
    for i in 0..2 {
        c.node_mut(i).wait_subnet_env(WAIT)?;
    }
    Ok(c)
}

fn curl(node: &Node, path: &str) -> Result<(String, String)> {
    let out = node.ns().exec(&["curl", "-s", "-w", "\n%{http_code}", &format!("http://127.0.0.1:9402{path}")])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("no status code")?;
    Ok((code.to_string(), body.to_string()))
}

#[test]
fn status_of_a_healthy_node_and_of_one_that_lost_etcd() -> Result<()> {
    let mut c = two_nodes()?;
    let n0 = c.node(0);
    wait_until(WAIT, POLL, || Ok(status(n0, &[])?.0 == 0))?;
    let (code, text) = status(n0, &[])?;
    assert_eq!(code, 0, "{text}");
    assert!(text.starts_with("HEALTHY  node0: pod network is up"), "{text}");
    assert!(!text.contains('\x1b'), "no colors when stdout is not a terminal");
    let env = n0.subnet_env()?;
    let subnet = env["FLANNEL_SUBNET"].replace(".1/24", ".0/24");
    let lease_line = format!("lease     {subnet} for 198.18.0.10 — expires in ");
    assert!(text.contains(&format!("{lease_line}23h")) || text.contains(&format!("{lease_line}24h")), "{text}");
    assert!(text.contains("peers     1/1 programmed"), "{text}");
    assert!(text.contains("via 198.18.0.11     route ok"), "{text}");
    assert!(text.contains("backend   vxlan on netd.1 (VNI 1, port 8472, MTU 1450) via eth0 — device ok"), "{text}");

    let (code, json) = status(n0, &["--json"])?;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(v["health"], "healthy");
    assert_eq!(v["status"]["lease"]["subnet"], subnet);
    assert_eq!(v["status"]["peers"].as_array().unwrap().len(), 1);
    assert_eq!(v["status"]["etcd"]["connected"], true);

    // etcd goes away: degraded (traffic still flows), with the reason, exit code 1.
    c.etcd_mut().stop()?;
    let n0 = c.node(0);
    wait_until(WAIT, POLL, || Ok(status(n0, &[])?.0 == 1))?;
    let (_, text) = status(n0, &[])?;
    assert!(text.starts_with("DEGRADED  node0: etcd unreachable"), "{text}");
    assert!(text.contains("the dataplane keeps its last known state"), "{text}");
    assert!(text.contains("etcd      UNREACHABLE"), "{text}");
    let (_, metrics) = curl(n0, "/metrics")?;
    assert!(metrics.contains("netd_etcd_up 0"), "{metrics}");
    c.etcd_mut().start()?;
    let n0 = c.node(0);
    wait_until(WAIT, POLL, || Ok(status(n0, &[])?.0 == 0))?;
    Ok(())
}

#[test]
fn status_and_readiness_while_waiting_for_config_and_when_not_running() -> Result<()> {
    let mut c = Cluster::new(1)?;
    let (code, text) = status(c.node(0), &[])?;
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("netd is not running on this node"), "{text}");

    c.node_mut(0).start_netd(&[])?;
    let n = c.node(0);
    // Right after the start the status may still say it is connecting to etcd; then it must
    // settle on waiting for the config.
    let settled = |text: &str| {
        text.starts_with("UNHEALTHY  node0: no subnet lease yet") && text.contains("waiting for the network config: no key /coreos.com/network/config")
    };
    let r = wait_until(WAIT, POLL, || Ok(matches!(status(n, &[])?, (2, t) if settled(&t))));
    let (code, text) = status(n, &[])?;
    assert!(r.is_ok() && code == 2 && settled(&text), "exit {code}: {text}");
    wait_until(WAIT, POLL, || Ok(curl(n, "/healthz")?.0 == "200"))?;
    let (code, body) = curl(n, "/readyz")?;
    assert_eq!(code, "503");
    assert_eq!(body.trim(), "not ready: waiting for subnet lease, subnet.env, CNI config, cluster DNS");
    assert!(!n.cni_conf_dir().join("10-netd.conflist").exists(), "no CNI config before the lease");

    c.write_network_config(VXLAN)?;
    c.node_mut(0).wait_subnet_env(WAIT)?;
    let n = c.node(0);
    wait_until(WAIT, POLL, || Ok(curl(n, "/readyz")?.0 == "200"))?;
    let conf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(n.cni_conf_dir().join("10-netd.conflist"))?)?;
    assert_eq!(conf["plugins"][0]["type"], "netd-cni");
    assert_eq!(conf["plugins"][0]["subnetFile"], n.run_dir().join("subnet.env").display().to_string());
    let (_, metrics) = curl(n, "/metrics")?;
    for line in ["netd_ready 1", "netd_lease_acquisitions_total 1", "netd_etcd_up 1", "netd_build_info{version=\"", "netd_sync_duration_seconds_count "] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    // The status socket is for root only.
    let mode = n.ns().run(&["stat", "-c", "%a", n.run_dir().join("netd.sock").to_str().unwrap()])?;
    assert_eq!(mode.trim(), "600");
    Ok(())
}

/// `netd cleanup` on `n`, with its directories; its output.
fn cleanup(n: &Node) -> Result<String> {
    let bin = netd_binary()?;
    let (run, state, conf) = (n.run_dir(), n.state_dir(), n.cni_conf_dir());
    n.ns().run(&[
        bin.to_str().unwrap(), "cleanup", "--run-dir", run.to_str().unwrap(), "--state-dir", state.to_str().unwrap(),
        "--cni-conf-dir", conf.to_str().unwrap(),
    ])
}

#[test]
fn cleanup_removes_everything_netd_created() -> Result<()> {
    let mut c = two_nodes()?;
    let n = c.node(0);
    wait_until(WAIT, POLL, || Ok(!n.ns().run(&["ip", "route", "show", "proto", "110"])?.trim().is_empty()))?;
    c.node_mut(0).stop_netd()?;
    let n = c.node(0);
    let out = cleanup(n)?;
    assert!(out.contains("netd.1") && out.contains("nftables table: yes"), "{out}");
    assert_eq!(n.ns().run(&["ip", "route", "show", "proto", "110"])?.trim(), "");
    assert!(!n.ns().exec(&["ip", "link", "show", "netd.1"])?.status.success());
    assert!(!n.ns().exec(&["nft", "list", "table", "ip", "netd"])?.status.success());
    assert!(!n.run_dir().join("subnet.env").exists() && !n.cni_conf_dir().join("10-netd.conflist").exists());
    // Nothing else was touched: the underlay still works.
    n.ns().run(&["ping", "-c", "1", "-W", "2", "198.18.0.11"])?;
    Ok(())
}

/// A switch of `--proxy-mode` removes the previous mode's rules (two modes must never answer for
/// the same Service), and `netd cleanup` removes the service rules of every mode, the DNS
/// addresses netd put on lo (a cluster DNS IP left there black-holes the next cluster DNS) and
/// netd-cni's address records, and nothing of the operator's.
#[test]
fn proxy_mode_switch_and_cleanup_leave_no_service_rules_dns_addresses_or_ipam_state() -> Result<()> {
    let mut c = Cluster::new(1)?;
    c.write_network_config(VXLAN)?;
    let dns_ip = ["--cluster-dns-ip", "10.96.0.10"];
    c.node_mut(0).start_netd(&[&["--proxy-mode", "iptables"][..], &dns_ip].concat())?;
    c.node_mut(0).wait_subnet_env(WAIT)?;
    let n = c.node(0);
    let netd_chains = |n: &Node| -> Result<usize> {
        let rules = n.ns().run(&["iptables-save", "-t", "nat"])? + &n.ns().run(&["iptables-save", "-t", "filter"])?;
        Ok(rules.lines().filter(|l| l.contains("NETD-")).count())
    };
    let has_proxy_table = |n: &Node| -> Result<bool> { Ok(n.ns().exec(&["nft", "list", "table", "ip", "netd-proxy"])?.status.success()) };
    wait_until(WAIT, POLL, || Ok(netd_chains(n)? > 0))?;
    assert!(!has_proxy_table(n)?);
    let lo = |n: &Node| n.ns().run(&["ip", "-4", "addr", "show", "dev", "lo"]);
    wait_until(WAIT, POLL, || Ok(lo(n)?.contains("169.254.20.10/32") && lo(n)?.contains("10.96.0.10/32")))?;
    assert!(lo(n)?.contains("lo:netd"), "netd's lo addresses carry its label: {}", lo(n)?);
    // An address the operator put on lo is not netd's.
    n.ns().run(&["ip", "addr", "add", "169.254.99.1/32", "dev", "lo"])?;
    wait_until(WAIT, POLL, || Ok(c.node(0).cni_conf_dir().join("10-netd.conflist").exists()))?;
    c.node_mut(0).add_cni_pod("p0")?;
    let ipam = c.node(0).state_dir().join("cni");
    assert!(ipam.exists(), "netd-cni keeps its records under {}", ipam.display());

    // iptables → nftables: the iptables rules go before the nftables ones are relied on.
    c.node_mut(0).stop_netd()?;
    c.node_mut(0).start_netd(&[&["--proxy-mode", "nftables"][..], &dns_ip].concat())?;
    let n = c.node(0);
    wait_until(WAIT, POLL, || Ok(has_proxy_table(n)? && netd_chains(n)? == 0))?;

    c.node_mut(0).stop_netd()?;
    let n = c.node(0);
    let out = cleanup(n)?;
    assert!(out.contains("service rules [nftables]"), "{out}");
    assert!(out.contains("169.254.20.10") && out.contains("10.96.0.10"), "{out}");
    assert!(!has_proxy_table(n)?);
    assert_eq!(netd_chains(n)?, 0);
    let left = lo(n)?;
    assert!(!left.contains("169.254.20.10") && !left.contains("10.96.0.10"), "{left}");
    assert!(left.contains("169.254.99.1/32"), "the operator's address stays: {left}");
    assert!(!ipam.exists(), "netd-cni's records are removed: {out}");
    Ok(())
}

/// The udp backend's TUN device is persistent (it outlives netd, so that a restart keeps traffic
/// flowing): `netd cleanup` removes it like the VXLAN device.
#[test]
fn cleanup_removes_the_udp_backends_persistent_device() -> Result<()> {
    let mut c = Cluster::new(1)?;
    c.write_network_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#)?;
    c.start_netd_all(&[])?;
    c.node_mut(0).wait_subnet_env(WAIT)?;
    c.node_mut(0).stop_netd()?;
    let n = c.node(0);
    assert!(n.ns().run(&["ip", "-d", "link", "show", "netd-udp0"])?.contains("persist on"), "the device outlives netd");
    let out = cleanup(n)?;
    assert!(out.contains("netd-udp0"), "{out}");
    assert!(!n.ns().exec(&["ip", "link", "show", "netd-udp0"])?.status.success());
    assert_eq!(n.ns().run(&["ip", "route", "show", "proto", "110"])?.trim(), "");
    Ok(())
}

#[test]
fn a_device_brought_down_by_hand_is_brought_back() -> Result<()> {
    let c = two_nodes()?;
    let n = c.node(0);
    wait_until(WAIT, POLL, || Ok(status(n, &[])?.0 == 0))?;
    n.ns().run(&["ip", "link", "set", "netd.1", "down"])?;
    wait_until(WAIT, POLL, || Ok(n.ns().run(&["ip", "link", "show", "netd.1"])?.contains(",UP")))?;
    wait_until(WAIT, POLL, || Ok(!n.ns().run(&["ip", "route", "show", "proto", "110"])?.trim().is_empty()))?;
    wait_until(WAIT, POLL, || Ok(status(n, &[])?.0 == 0))?;
    Ok(())
}
