//! `netd cleanup` as an uninstall, in every mode: an inventory of every kernel object and file of
//! the node is taken before netd starts, netd runs with pods and cross-node traffic, then
//! `netd cleanup --dry-run` must list what is then removed and remove nothing, and after
//! `netd cleanup` the inventory must equal the one from before.

use std::time::Duration;

use anyhow::Result;
use netd_tests::ebpf::{netd_ebpf_probe, EbpfSandbox};
use netd_tests::{netd_binary, wait_until, Cluster, Inventory, InventoryScope, Node};

const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);
const DNS_IP: &str = "10.96.0.10";

/// `netd cleanup [--dry-run]` in the node's namespace, with its directories: stdout.
fn cleanup(n: &Node, bpffs: &str, dry_run: bool) -> Result<String> {
    let bin = netd_binary()?;
    let (run, state, conf) = (n.run_dir(), n.state_dir(), n.cni_conf_dir());
    let mut args = vec![
        bin.to_str().unwrap(), "cleanup", "--run-dir", run.to_str().unwrap(), "--state-dir", state.to_str().unwrap(),
        "--cni-conf-dir", conf.to_str().unwrap(), "--cni-bin-dir", "", "--ebpf-bpffs", bpffs,
    ];
    if dry_run {
        args.push("--dry-run");
    }
    n.ns().run(&args)
}

/// The scope of a node's inventory: its netd directories, pins and cgroup.
fn scope(n: &Node, bpffs: &str, cgroup: Option<&std::path::Path>) -> InventoryScope {
    InventoryScope {
        dirs: vec![n.run_dir(), n.state_dir(), n.cni_conf_dir()],
        bpffs: vec![bpffs.into()],
        cgroups: cgroup.into_iter().map(|c| c.to_path_buf()).collect(),
    }
}

/// Node 0 of a two-node cluster runs netd with `args` (node 1 with the same, as its peer); pods on
/// both exchange traffic; then node 0's netd stops and is uninstalled. `made` names the
/// inventory sections netd must have added something to while it ran (so that the test cannot
/// pass by looking at nothing).
fn uninstall_leaves_nothing(net_conf: &str, args: &[&str], bpffs: &str, cgroup: Option<&std::path::Path>, made: &[&str]) -> Result<()> {
    let mut c = Cluster::new(2)?;
    c.write_network_config(net_conf)?;
    let sc = scope(c.node(0), bpffs, cgroup);
    let before = Inventory::take(c.node(0).ns(), &sc)?;
    let all: Vec<&str> = [args, &["--cluster-dns-ip", DNS_IP]].concat();
    c.node_mut(0).start_netd(&all)?;
    c.node_mut(1).start_netd(&["--cluster-dns-ip", DNS_IP])?;
    for i in 0..2 {
        c.node_mut(i).wait_ready(WAIT)?;
    }
    {
        let a = c.node_mut(0).add_cni_pod("a")?;
        let b = c.node_mut(1).add_cni_pod("b")?;
        wait_until(WAIT, POLL, || Ok(a.ping(b.ip)))?;
        let lo = |n: &Node| n.ns().run(&["ip", "-4", "addr", "show", "dev", "lo"]);
        wait_until(WAIT, POLL, || Ok(lo(c.node(0))?.contains(&format!("{DNS_IP}/32"))))?;
        // The pods go (a drained node) before netd does.
    }
    // The kernel destroys a deleted pod namespace, and with it the host end of its veth,
    // asynchronously: wait for that, or the inventories below would race with it.
    let pod_veths = |n: &Node| -> Result<bool> { Ok(n.ns().run(&["ip", "-o", "link", "show", "type", "veth"])?.lines().any(|l| l.split(": ").nth(1).is_some_and(|name| name.starts_with("veth")))) };
    wait_until(WAIT, POLL, || Ok(!pod_veths(c.node(0))?))?;
    c.node_mut(0).stop_netd()?;
    let n = c.node(0);
    let running = Inventory::take(n.ns(), &sc)?;
    let made_by_netd = before.diff(&running);
    for s in made {
        assert!(made_by_netd.added.contains_key(s), "netd made nothing in [{s}]? what it made:\n{made_by_netd}");
    }

    // --dry-run: removes nothing, and names every object that is then removed.
    let listed = cleanup(n, bpffs, true)?;
    let after_dry = Inventory::take(n.ns(), &sc)?;
    assert!(running.diff(&after_dry).is_empty(), "--dry-run changed the node:\n{}\n{listed}", running.diff(&after_dry));
    let out = cleanup(n, bpffs, false)?;
    let after = Inventory::take(n.ns(), &sc)?;
    let left = before.diff(&after);
    assert!(left.is_empty(), "netd cleanup left (+) or removed (-) these:\n{left}\ncleanup said: {out}");
    // Each object the cleanup removed was on the dry run's list.
    for (section, lines) in &made_by_netd.added {
        for l in lines {
            let key = listed_key(section, l);
            if let Some(k) = key {
                assert!(listed.contains(&k), "--dry-run did not list [{section}] {l} (looked for {k:?}):\n{listed}");
            }
        }
    }
    Ok(())
}

/// What the dry run's line for an inventory line contains: a link's name, a lo address, a
/// file's or pin's name, a table's name, a route's destination. `None` for what goes with
/// another object (a device's addresses, neighbours, FDB entries and routes go with it).
fn listed_key(section: &str, line: &str) -> Option<String> {
    let first = line.split_whitespace().next()?.to_string();
    match section {
        "links" => Some(first),
        "addresses" if first == "lo" => Some(line.split_whitespace().nth(1)?.split('/').next()?.to_string()),
        "files" | "bpf pins" => {
            let (dir, rel) = line.split_once(": ")?;
            // Contents of a directory that is listed go with it.
            let top = rel.split('/').next()?;
            Some(format!("{dir}/{top}"))
        }
        "nft" => line.strip_prefix("table ").map(|t| format!("table {t}")),
        "iptables" if line.contains("NETD-") => Some("iptables NETD-* chains".into()),
        "routes" if line.contains("proto 110") => Some(first),
        _ => None,
    }
}

#[test]
fn uninstall_vxlan_nftables_dns() -> Result<()> {
    let pins = tempfile::tempdir()?;
    let bpffs = pins.path().join("netd");
    uninstall_leaves_nothing(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
        &["--proxy-mode", "nftables"],
        bpffs.to_str().unwrap(),
        None,
        &["links", "routes", "nft", "addresses", "files"],
    )
}

#[test]
fn uninstall_vxlan_iptables_dns() -> Result<()> {
    let pins = tempfile::tempdir()?;
    let bpffs = pins.path().join("netd");
    uninstall_leaves_nothing(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
        &["--proxy-mode", "iptables"],
        bpffs.to_str().unwrap(),
        None,
        &["links", "routes", "nft", "iptables", "addresses", "files"],
    )
}

/// The udp backend: its persistent TUN device, and its eBPF fast path where the kernel has one
/// (pinned under --ebpf-bpffs).
#[test]
fn uninstall_udp_backend() -> Result<()> {
    let pins = tempfile::tempdir()?;
    let bpffs = pins.path().join("netd");
    uninstall_leaves_nothing(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#,
        &["--ebpf-bpffs", bpffs.to_str().unwrap()],
        bpffs.to_str().unwrap(),
        None,
        &["links", "routes", "nft", "addresses", "files"],
    )
}

#[test]
fn uninstall_ebpf_proxy_mode() -> Result<()> {
    if let Err(why) = netd_ebpf_probe() {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let sandbox = EbpfSandbox::new()?;
    let (pins, cgroup) = (sandbox.pins(), sandbox.cgroup());
    uninstall_leaves_nothing(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
        &["--proxy-mode", "ebpf", "--ebpf-cgroup", cgroup.to_str().unwrap(), "--ebpf-bpffs", pins.to_str().unwrap()],
        pins.to_str().unwrap(),
        Some(&cgroup),
        &["links", "routes", "nft", "addresses", "files"],
    )
}
