//! Tests of the test bed itself (no netd needed): namespaces, underlay,
//! etcd, pods, and above all cleanup.
//!
//! The tests take a process-wide lock so that "no namespace with this
//! process's prefix remains" can be asserted after each one: the harness is
//! safe to use in parallel, but that particular check is not.

use anyhow::Result;
use netd_tests::{namespace_prefix, reap_stale_namespaces, Cluster, Netns, UNDERLAY_GATEWAY};
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn all_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn our_namespaces() -> Vec<String> {
    let prefix = namespace_prefix();
    all_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

fn write_subnet_env(cluster: &Cluster, node: usize, subnet: &str) {
    let text = format!(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={subnet}\nFLANNEL_MTU=1450\n\
         FLANNEL_IPMASQ=false\n"
    );
    std::fs::write(cluster.node(node).run_dir().join("subnet.env"), text).unwrap();
}

#[test]
fn two_node_cluster_smoke() -> Result<()> {
    let _serial = serial();
    {
        let mut cluster = Cluster::new(2)?;
        assert_eq!(cluster.node(0).ip(), Ipv4Addr::new(198, 18, 0, 10));
        assert_eq!(cluster.node(1).ip(), Ipv4Addr::new(198, 18, 0, 11));

        // Underlay: node0 reaches node1 and the gateway; default route set.
        let node0 = cluster.node(0).ns();
        node0.run(&["ping", "-c", "1", "-W", "2", "198.18.0.11"])?;
        node0.run(&["ping", "-c", "1", "-W", "2", &UNDERLAY_GATEWAY.to_string()])?;
        let route = node0.run(&["ip", "route", "show", "default"])?;
        assert!(route.contains("via 198.18.0.1 dev eth0"), "{route}");
        assert_eq!(node0.sh("cat /proc/sys/net/ipv4/ip_forward")?.trim(), "1");
        let mtu = node0.sh("cat /sys/class/net/eth0/mtu")?;
        assert_eq!(mtu.trim(), "1500");

        // etcd helpers, including a multi-line value.
        let etcd = cluster.etcd();
        assert_eq!(etcd.endpoint(), "http://198.18.0.1:2379");
        etcd.put("/ntb/a", "1")?;
        etcd.put("/ntb/b", "two\nlines")?;
        etcd.put("/ntbx", "outside the prefix")?;
        assert_eq!(
            etcd.get_prefix("/ntb/")?,
            vec![
                ("/ntb/a".to_string(), "1".to_string()),
                ("/ntb/b".to_string(), "two\nlines".to_string())
            ]
        );
        assert_eq!(etcd.del("/ntb/a")?, 1);
        assert_eq!(etcd.get("/ntb/a")?, None);
        let config = r#"{ "Network": "10.244.0.0/16", "Backend": { "Type": "vxlan" } }"#;
        cluster.write_network_config(config)?;
        assert_eq!(
            cluster.etcd().get("/coreos.com/network/config")?.as_deref(),
            Some(config)
        );

        // Pods on hand-written subnet.env files (no netd here).
        write_subnet_env(&cluster, 0, "10.244.1.1/24");
        write_subnet_env(&cluster, 1, "10.244.2.1/24");
        let env = cluster
            .node_mut(0)
            .wait_subnet_env(Duration::from_secs(1))?;
        assert_eq!(env["FLANNEL_MTU"], "1450");
        let a = cluster.node_mut(0).add_pod("a")?;
        let b = cluster.node_mut(0).add_pod("b")?;
        let c = cluster.node_mut(1).add_pod("c")?;
        assert_eq!(a.ip, Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(b.ip, Ipv4Addr::new(10, 244, 1, 3));
        assert_eq!(c.ip, Ipv4Addr::new(10, 244, 2, 2));
        assert!(a.ping(a.gateway), "pod a cannot ping its gateway");
        assert!(
            c.ping(Ipv4Addr::new(10, 244, 2, 1)),
            "pod c cannot ping its gateway"
        );
        assert!(a.ping(b.ip), "pods on one bridge cannot talk");
        assert!(!a.ping(c.ip), "no overlay yet, so cross-node must fail");
        assert_eq!(a.sh("cat /sys/class/net/eth0/mtu")?.trim(), "1450");
        let route = a.run(&["ip", "route", "show", "default"])?;
        assert!(route.contains("via 10.244.1.1 dev eth0"), "{route}");

        // Pods declared after the cluster are dropped before it; that is
        // the natural order, but the cluster does not depend on it.
        drop(b);
        let mut names = cluster.namespace_names();
        names.extend([a.ns.name().to_string(), c.ns.name().to_string()]);
        assert!(names.iter().all(|n| n.len() <= 30), "{names:?}");
        assert_eq!(our_namespaces().len(), names.len());
    }
    assert_eq!(our_namespaces(), Vec::<String>::new());
    Ok(())
}

#[test]
fn add_node_later_joins_underlay() -> Result<()> {
    let _serial = serial();
    {
        let mut cluster = Cluster::new(1)?;
        let i = cluster.add_node()?;
        assert_eq!(i, 1);
        cluster
            .node(1)
            .ns()
            .run(&["ping", "-c", "1", "-W", "2", "198.18.0.10"])?;
    }
    assert_eq!(our_namespaces(), Vec::<String>::new());
    Ok(())
}

#[test]
fn etcd_restart_keeps_data() -> Result<()> {
    let _serial = serial();
    {
        let mut cluster = Cluster::new(0)?;
        cluster.etcd().put("/ntb/persist", "yes")?;
        cluster.etcd_mut().stop()?;
        assert!(!cluster.etcd_mut().is_running());
        cluster.etcd_mut().start()?;
        assert_eq!(cluster.etcd().get("/ntb/persist")?.as_deref(), Some("yes"));
        assert!(cluster.etcd().log().contains("starting etcd"));
    }
    assert_eq!(our_namespaces(), Vec::<String>::new());
    Ok(())
}

#[test]
fn panicking_test_still_cleans_up() {
    let _serial = serial();
    let names = Mutex::new(Vec::new());
    let sleeper = Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let cluster = Cluster::new(1).unwrap();
        let ns = Netns::new("extra").unwrap();
        *sleeper.lock().unwrap() = Some(ns.spawn(&["sleep", "600"], None).unwrap());
        let mut n = cluster.namespace_names();
        n.push(ns.name().to_string());
        *names.lock().unwrap() = n;
        panic!("deliberate panic inside a test using the test bed");
    });
    assert!(result.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 3);
    let left: Vec<_> = all_namespaces()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(our_namespaces(), Vec::<String>::new());
    // The process left running in a namespace was killed with it.
    let mut sleeper = sleeper.into_inner().unwrap().unwrap();
    assert!(!sleeper.wait().unwrap().success());
}

#[test]
fn stale_namespaces_of_dead_processes_are_reaped() -> Result<()> {
    let _serial = serial();
    // A pid that certainly existed and is now dead: a reaped child.
    let mut child = Command::new("true").spawn()?;
    child.wait()?;
    let dead = child.id();
    let name = format!("ntb-{dead}-0-stale");
    let status = Command::new("ip").args(["netns", "add", &name]).status()?;
    assert!(status.success());
    // An orphan left running inside it, as a SIGKILLed test run leaves etcd.
    let mut orphan = Command::new("ip")
        .args(["netns", "exec", &name, "sleep", "600"])
        .spawn()?;
    std::thread::sleep(Duration::from_millis(100));

    // A namespace of a live process (ours) must survive.
    let live = Netns::new("live")?;

    let reaped = reap_stale_namespaces();
    assert!(reaped.contains(&name), "{reaped:?}");
    assert!(!all_namespaces().contains(&name));
    assert!(all_namespaces().contains(&live.name().to_string()));
    // The orphan was SIGKILLed.
    let status = orphan.wait()?;
    assert!(!status.success());
    drop(live);
    assert_eq!(our_namespaces(), Vec::<String>::new());
    Ok(())
}
