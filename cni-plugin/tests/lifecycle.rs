//! ADD / CHECK / DEL / GC against real namespaces: what lands in the kernel,
//! the result per version, IPAM under concurrency, idempotent DEL.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;

use common::{first_ip, with, Env, Node, Pod, GATEWAY};
use serde_json::{json, Value};

fn host_veth(result: &Value) -> String {
    result["interfaces"][1]["name"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn add_check_del_1_1_0() {
    let node = Node::new();
    let pod = Pod::new("c-lifecycle");
    let conf = node.conf("1.1.0");
    let env = pod
        .env("ADD")
        .with_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0");

    let r = node.cni(&env, &conf).ok();
    assert_eq!(r["cniVersion"], "1.1.0");
    // interfaces: bridge, host veth, pod interface (with sandbox).
    let ifs = r["interfaces"].as_array().unwrap();
    assert_eq!(ifs.len(), 3, "{r:#}");
    assert_eq!(ifs[0]["name"], "netd0");
    assert!(ifs[0].get("sandbox").is_none());
    assert!(ifs[1]["name"].as_str().unwrap().starts_with("veth"));
    assert_eq!(ifs[2]["name"], "eth0");
    assert_eq!(ifs[2]["sandbox"], pod.netns_path());
    assert_eq!(ifs[2]["mtu"], 1450);
    let mac = ifs[2]["mac"].as_str().unwrap().to_string();
    // ips: one address of the node's subnet on interface 2, no "version".
    let ip: Ipv4Addr = first_ip(&r).parse().unwrap();
    assert_eq!(r["ips"][0]["interface"], 2);
    assert_eq!(r["ips"][0]["gateway"], GATEWAY);
    assert!(r["ips"][0].get("version").is_none());
    assert_eq!(r["ips"][0]["address"], format!("{ip}/24"));
    let [a, b, c, d] = ip.octets();
    assert_eq!([a, b, c], [10, 244, 7]);
    assert!(d != 0 && d != 1 && d != 255, "{ip}");
    assert_eq!(r["routes"], json!([{"dst": "0.0.0.0/0", "gw": GATEWAY}]));
    assert_eq!(
        r["dns"],
        json!({"nameservers": ["10.96.0.10"],
               "search": ["shop.svc.cluster.local", "svc.cluster.local", "cluster.local"],
               "options": ["ndots:5"]})
    );

    // The kernel agrees.
    let pod_addr = pod.ip(&["-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(pod_addr.contains(&format!("{ip}/24")), "{pod_addr}");
    let pod_link = pod.ip(&["link", "show", "eth0"]);
    assert!(
        pod_link.contains("mtu 1450") && pod_link.contains(&mac) && pod_link.contains(",UP"),
        "{pod_link}"
    );
    let routes = pod.ip(&["-4", "route", "show", "default"]);
    assert!(
        routes.contains(&format!("default via {GATEWAY} dev eth0")),
        "{routes}"
    );
    let bridge = node.ip(&["-4", "-o", "addr", "show", "dev", "netd0"]);
    assert!(bridge.contains("10.244.7.1/24"), "{bridge}");
    let veth = node.ip(&["-d", "link", "show", &host_veth(&r)]);
    assert!(
        veth.contains("master netd0") && veth.contains("hairpin on") && veth.contains("mtu 1450"),
        "{veth}"
    );
    assert!(pod.ping(GATEWAY), "pod cannot reach its gateway");
    assert_eq!(node.allocated(), vec![ip.to_string()]);

    // CHECK against the ADD result.
    node.cni(&pod.env("CHECK"), &with(&conf, json!({"prevResult": r})))
        .ok();

    // A second ADD of the same attachment is refused and changes nothing.
    let msg = node.cni(&pod.env("ADD"), &conf).err(100);
    assert!(msg.contains("already"), "{msg}");
    assert_eq!(node.allocated(), vec![ip.to_string()]);

    // DEL removes everything; a second DEL is fine.
    let del_conf = with(&conf, json!({"prevResult": r}));
    node.cni(&pod.env("DEL"), &del_conf).ok();
    assert!(!node.has_link(&host_veth(&r)));
    assert!(pod
        .ns
        .exec(&["ip", "link", "show", "eth0"])
        .map(|o| !o.status.success())
        .unwrap());
    assert!(node.allocated().is_empty());
    node.cni(&pod.env("DEL"), &del_conf).ok();
    node.cni(&pod.env("DEL"), &conf).ok();

    // CHECK after DEL fails.
    node.cni(&pod.env("CHECK"), &with(&conf, json!({"prevResult": r})))
        .err(101);
}

#[test]
fn older_versions_get_the_older_result_layout() {
    let node = Node::new();
    for (i, version) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0"].into_iter().enumerate() {
        let pod = Pod::new(&format!("c-v{i}"));
        let conf = node.conf(version);
        let r = node.cni(&pod.env("ADD"), &conf).ok();
        assert_eq!(r["cniVersion"], version);
        let legacy = version != "1.0.0";
        assert_eq!(
            r["ips"][0].get("version").is_some(),
            legacy,
            "{version}: {r:#}"
        );
        if legacy {
            assert_eq!(r["ips"][0]["version"], "4");
        }
        assert!(
            r["interfaces"][2].get("mtu").is_none(),
            "mtu is a 1.1.0 field"
        );
        assert_eq!(r["interfaces"][2]["sandbox"], pod.netns_path());
        if version >= "0.4.0" {
            node.cni(&pod.env("CHECK"), &with(&conf, json!({"prevResult": r})))
                .ok();
        }
        node.cni(&pod.env("DEL"), &with(&conf, json!({"prevResult": r})))
            .ok();
    }
    assert!(node.allocated().is_empty());
}

#[test]
fn check_notices_a_broken_attachment() {
    let node = Node::new();
    let pod = Pod::new("c-broken");
    let conf = node.conf("1.1.0");
    let r = node.cni(&pod.env("ADD"), &conf).ok();
    let check = with(&conf, json!({"prevResult": r}));
    node.cni(&pod.env("CHECK"), &check).ok();
    // CHECK without prevResult is a config error.
    node.cni(&pod.env("CHECK"), &conf).err(7);
    // Remove the default route: CHECK must fail and say so.
    pod.ip(&["route", "del", "default"]);
    let msg = node.cni(&pod.env("CHECK"), &check).err(101);
    assert!(msg.contains("default route"), "{msg}");
    // Remove the address.
    pod.ip(&["addr", "flush", "dev", "eth0"]);
    let msg = node.cni(&pod.env("CHECK"), &check).err(101);
    assert!(msg.contains("address"), "{msg}");
    node.cni(&pod.env("DEL"), &conf).ok();
}

#[test]
fn pods_on_one_node_reach_each_other() {
    let node = Node::new();
    let conf = node.conf("1.1.0");
    let a = Pod::new("c-a");
    let b = Pod::new("c-b");
    let ra = node.cni(&a.env("ADD"), &conf).ok();
    let rb = node.cni(&b.env("ADD"), &conf).ok();
    assert_ne!(first_ip(&ra), first_ip(&rb));
    assert!(a.ping(&first_ip(&rb)) && b.ping(&first_ip(&ra)));
    node.cni(&a.env("DEL"), &conf).ok();
    node.cni(&b.env("DEL"), &conf).ok();
}

#[test]
fn interface_already_in_the_pod_is_refused_and_rolled_back() {
    let node = Node::new();
    let pod = Pod::new("c-taken");
    pod.ip(&["link", "add", "eth0", "type", "bridge"]);
    let conf = node.conf("1.1.0");
    let msg = node.cni(&pod.env("ADD"), &conf).err(100);
    assert!(msg.contains("eth0"), "{msg}");
    assert!(node.allocated().is_empty(), "the address must be released");
    assert!(
        pod.ip(&["-d", "link", "show", "eth0"]).contains("bridge"),
        "the existing eth0 must be left alone"
    );
    // Another interface name in the same pod works.
    let env = Env::attach("ADD", &pod.id, &pod.netns_path(), "net1");
    let r = node.cni(&env, &conf).ok();
    assert_eq!(r["interfaces"][2]["name"], "net1");
    node.cni(&env.clone().with_command("DEL"), &conf).ok();
}

#[test]
fn add_passes_a_prev_result_through() {
    let node = Node::new();
    let pod = Pod::new("c-prev");
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "lo", "sandbox": pod.netns_path()}],
        "ips": [{"address": "fd00::5/64", "interface": 0}],
        "dns": {"domain": "prev.example"}
    });
    let conf = with(&node.conf("1.0.0"), json!({"prevResult": prev}));
    let r = node.cni(&pod.env("ADD"), &conf).ok();
    let names: Vec<_> = r["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].clone())
        .collect();
    assert_eq!(names[0], "lo");
    assert_eq!(names[3], "eth0");
    assert_eq!(r["ips"][0]["address"], "fd00::5/64");
    assert_eq!(r["ips"][1]["interface"], 3);
    node.cni(&pod.env("DEL"), &node.conf("1.0.0")).ok();
}

#[test]
fn thirty_two_parallel_adds_get_distinct_addresses() {
    const N: usize = 32;
    let node = Node::new();
    let conf = node.conf("1.1.0");
    let pods: Vec<Pod> = (0..N).map(|i| Pod::new(&format!("c-par{i}"))).collect();

    let results: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|pod| {
                let (node, conf) = (&node, &conf);
                s.spawn(move || node.cni(&pod.env("ADD"), conf).ok())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ips: BTreeSet<String> = results.iter().map(first_ip).collect();
    assert_eq!(ips.len(), N, "duplicate addresses: {ips:?}");
    for ip in &ips {
        let ip: Ipv4Addr = ip.parse().unwrap();
        let [a, b, c, d] = ip.octets();
        assert!([a, b, c] == [10, 244, 7] && d > 1 && d < 255, "{ip}");
    }
    let recorded: BTreeSet<String> = node.allocated().into_iter().collect();
    assert_eq!(recorded, ips, "state file disagrees with the results");
    // Every pod really has its address.
    for (pod, r) in pods.iter().zip(&results) {
        assert!(pod
            .ip(&["-4", "-o", "addr", "show", "eth0"])
            .contains(&first_ip(r)));
    }

    std::thread::scope(|s| {
        for pod in &pods {
            let (node, conf) = (&node, &conf);
            s.spawn(move || node.cni(&pod.env("DEL"), conf).ok());
        }
    });
    assert!(node.allocated().is_empty());
    let links = node.ip(&["-o", "link", "show", "type", "veth"]);
    assert!(links.trim().is_empty(), "veths left: {links}");
}

#[test]
fn del_after_the_netns_is_gone() {
    let node = Node::new();
    let conf = node.conf("1.1.0");
    let pod = Pod::new("c-gone");
    let r = node.cni(&pod.env("ADD"), &conf).ok();
    let env = pod.env("DEL");
    drop(pod); // the namespace (and with it the veth pair) disappears
    node.cni(&env, &with(&conf, json!({"prevResult": r}))).ok();
    assert!(node.allocated().is_empty());
    node.cni(&env, &conf).ok();
    // Without CNI_NETNS at all (optional for DEL).
    node.cni(&Env { netns: None, ..env }, &conf).ok();
}

#[test]
fn addresses_are_not_reused_at_once_and_survive_restarts() {
    let node = Node::new();
    let conf = node.conf("1.1.0");
    let a = Pod::new("c-r1");
    let ip1 = first_ip(&node.cni(&a.env("ADD"), &conf).ok());
    node.cni(&a.env("DEL"), &conf).ok();
    let b = Pod::new("c-r2");
    let ip2 = first_ip(&node.cni(&b.env("ADD"), &conf).ok());
    assert_ne!(ip1, ip2, "a just-released address was reused");
    // State is on disk: another process sees b's address as taken.
    let c = Pod::new("c-r3");
    let ip3 = first_ip(&node.cni(&c.env("ADD"), &conf).ok());
    assert_ne!(ip2, ip3);
    for p in [&b, &c] {
        node.cni(&p.env("DEL"), &conf).ok();
    }
}

#[test]
fn gc_releases_attachments_not_listed() {
    let node = Node::new();
    let conf = node.conf("1.1.0");
    let pods: Vec<Pod> = (0..3).map(|i| Pod::new(&format!("c-gc{i}"))).collect();
    let results: Vec<Value> = pods
        .iter()
        .map(|p| node.cni(&p.env("ADD"), &conf).ok())
        .collect();
    assert_eq!(node.allocated().len(), 3);

    // GC needs the list.
    node.cni(&Env::cmd("GC"), &conf).err(7);
    let gc = with(
        &conf,
        json!({"cni.dev/valid-attachments": [{"containerID": pods[0].id, "ifname": "eth0"}]}),
    );
    node.cni(&Env::cmd("GC"), &gc).ok();
    assert_eq!(node.allocated(), vec![first_ip(&results[0])]);
    assert!(node.has_link(&host_veth(&results[0])));
    for r in &results[1..] {
        assert!(!node.has_link(&host_veth(r)), "GC left {}", host_veth(r));
    }
    // Idempotent.
    node.cni(&Env::cmd("GC"), &gc).ok();
    assert_eq!(node.allocated().len(), 1);
    // An empty list releases everything.
    node.cni(
        &Env::cmd("GC"),
        &with(&conf, json!({"cni.dev/valid-attachments": []})),
    )
    .ok();
    assert!(node.allocated().is_empty());
    // DEL afterwards still succeeds.
    for p in &pods {
        node.cni(&p.env("DEL"), &conf).ok();
    }
}

#[test]
fn exhausted_pool_is_try_again_later_and_status_reports_it() {
    let node = Node::new();
    std::fs::write(
        node.subnet_file(),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/30\nFLANNEL_MTU=1450\n",
    )
    .unwrap();
    let conf = node.conf("1.1.0");
    let a = Pod::new("c-x1");
    let b = Pod::new("c-x2");
    assert_eq!(first_ip(&node.cni(&a.env("ADD"), &conf).ok()), "10.244.7.2");
    let msg = node.cni(&b.env("ADD"), &conf).err(11);
    assert!(msg.contains("no free address"), "{msg}");
    let msg = node.cni(&Env::cmd("STATUS"), &conf).err(50);
    assert!(msg.contains("exhausted"), "{msg}");
    node.cni(&a.env("DEL"), &conf).ok();
    node.cni(&Env::cmd("STATUS"), &conf).ok();
}

#[test]
fn netns_given_as_proc_pid_path() {
    let node = Node::new();
    let pod = Pod::new("c-proc");
    // A process holding the namespace, as a container runtime's pause process does.
    let mut holder = pod.ns.spawn(&["sleep", "60"], None).expect("sleep");
    let netns = format!("/proc/{}/ns/net", holder.id());
    let conf = node.conf("1.1.0");
    let env = Env::attach("ADD", &pod.id, &netns, "eth0");
    let r = node.cni(&env, &conf).ok();
    assert_eq!(r["interfaces"][2]["sandbox"], netns);
    assert!(pod
        .ip(&["-4", "-o", "addr", "show", "eth0"])
        .contains(&first_ip(&r)));
    node.cni(
        &env.clone().with_command("CHECK"),
        &with(&conf, json!({"prevResult": r})),
    )
    .ok();
    node.cni(&env.with_command("DEL"), &conf).ok();
    let _ = holder.kill();
    let _ = holder.wait();
}

/// The pod interface's MAC as the kernel has it.
fn kernel_mac(pod: &Pod, ifname: &str) -> String {
    let link = pod.ip(&["-o", "link", "show", ifname]);
    let after = link.split("link/ether ").nth(1).expect("link/ether");
    after.split_whitespace().next().unwrap().to_string()
}

#[test]
fn ip_and_mac_from_cni_args_are_honoured() {
    let node = Node::new();
    let conf = node.conf("1.1.0");
    let a = Pod::new("c-static-a");
    let env = a
        .env("ADD")
        .with_args("IgnoreUnknown=1;K8S_POD_NAME=a;IP=10.244.7.77;MAC=0A:11:22:33:44:55");
    let r = node.cni(&env, &conf).ok();
    assert_eq!(r["ips"][0]["address"], "10.244.7.77/24", "{r:#}");
    assert_eq!(r["interfaces"][2]["mac"], "0a:11:22:33:44:55");
    assert!(a
        .ip(&["-4", "-o", "addr", "show", "eth0"])
        .contains("10.244.7.77/24"));
    assert_eq!(kernel_mac(&a, "eth0"), "0a:11:22:33:44:55");
    assert!(a.ping(GATEWAY));
    assert_eq!(node.allocated(), vec!["10.244.7.77".to_string()]);
    node.cni(&a.env("CHECK"), &with(&conf, json!({"prevResult": r})))
        .ok();

    // The address and the MAC are a's: another pod asking for either is
    // told who holds them, and gets nothing.
    let b = Pod::new("c-static-b");
    let msg = node
        .cni(&b.env("ADD").with_args("IP=10.244.7.77"), &conf)
        .err(102);
    assert!(
        msg.contains("10.244.7.77") && msg.contains("c-static-a") && msg.contains("CNI_ARGS"),
        "{msg}"
    );
    let msg = node
        .cni(&b.env("ADD").with_args("MAC=0a:11:22:33:44:55"), &conf)
        .err(102);
    assert!(msg.contains("c-static-a"), "{msg}");
    // Outside the node's subnet, the gateway, a malformed MAC: clear errors.
    for (args, needle) in [
        ("IP=10.244.8.5", "10.244.7.0/24"),
        ("IP=10.244.7.1", "gateway"),
        ("IP=10.244.7.80/16", "/16"),
        ("MAC=0a:11:22", "not a MAC address"),
    ] {
        let msg = node.cni(&b.env("ADD").with_args(args), &conf).err(4);
        assert!(msg.contains(needle) && msg.contains("CNI_ARGS"), "{args}: {msg}");
    }
    assert_eq!(node.allocated().len(), 1, "failed ADDs must not keep an address");
    assert!(b.ip(&["-o", "link"]).lines().count() == 1, "only lo in b");

    // DEL frees the address for the next pod that asks.
    node.cni(&a.env("DEL"), &conf).ok();
    assert!(node.allocated().is_empty());
    let r = node
        .cni(&b.env("ADD").with_args("IP=10.244.7.77/24"), &conf)
        .ok();
    assert_eq!(first_ip(&r), "10.244.7.77");
    // A dynamic pod never gets a requested address.
    let c = Pod::new("c-static-c");
    assert_ne!(first_ip(&node.cni(&c.env("ADD"), &conf).ok()), "10.244.7.77");
    node.cni(&b.env("DEL"), &conf).ok();
    node.cni(&c.env("DEL"), &conf).ok();
    assert!(node.allocated().is_empty());
}

#[test]
fn ips_and_mac_capabilities_are_honoured() {
    let node = Node::new();
    let pod = Pod::new("c-caps");
    // What a runtime passes for `"capabilities": {"ips": true, "mac": true}`.
    let conf = with(
        &node.conf("1.1.0"),
        json!({
            "capabilities": {"ips": true, "mac": true},
            "runtimeConfig": {"ips": ["10.244.7.99/24"], "mac": "0a:22:33:44:55:66"}
        }),
    );
    let r = node.cni(&pod.env("ADD"), &conf).ok();
    assert_eq!(r["ips"][0]["address"], "10.244.7.99/24");
    assert_eq!(kernel_mac(&pod, "eth0"), "0a:22:33:44:55:66");
    // CNI_ARGS disagreeing with runtimeConfig is an error, not a guess.
    let other = Pod::new("c-caps2");
    let msg = node
        .cni(&other.env("ADD").with_args("IP=10.244.7.98"), &conf)
        .err(7);
    assert!(msg.contains("runtimeConfig.ips") && msg.contains("10.244.7.98"), "{msg}");
    node.cni(&pod.env("DEL"), &conf).ok();
    assert!(node.allocated().is_empty());
}

#[test]
fn second_interface_into_a_pod() {
    let node = Node::new();
    let conf = node.conf("1.1.0");
    let pod = Pod::new("c-multi");
    let r0 = node.cni(&pod.env("ADD"), &conf).ok();
    // What multus does for an additional network.
    let net1 = Env::attach("ADD", &pod.id, &pod.netns_path(), "net1");
    let r1 = node.cni(&net1, &conf).ok();
    assert_eq!(r1["interfaces"][2]["name"], "net1");
    assert_eq!(r1["ips"][0]["interface"], 2);
    let ip1 = first_ip(&r1);
    assert_ne!(ip1, first_ip(&r0));
    assert!(
        r1.get("routes").is_none(),
        "net1 did not get the default route, so its result lists none: {r1:#}"
    );
    assert!(pod
        .ip(&["-4", "-o", "addr", "show", "net1"])
        .contains(&format!("{ip1}/24")));
    let default = pod.ip(&["-4", "route", "show", "default"]);
    assert_eq!(default.lines().count(), 1, "{default}");
    assert!(
        default.starts_with(&format!("default via {GATEWAY} dev eth0 ")),
        "one default route, via the first interface: {default}"
    );
    for (env, r) in [(pod.env("CHECK"), &r0), (net1.clone().with_command("CHECK"), &r1)] {
        node.cni(&env, &with(&conf, json!({"prevResult": r})))
            .ok();
    }

    // DEL of net1 leaves eth0 as it was.
    node.cni(&net1.clone().with_command("DEL"), &conf).ok();
    assert!(pod
        .ns
        .exec(&["ip", "link", "show", "net1"])
        .map(|o| !o.status.success())
        .unwrap());
    assert_eq!(node.allocated(), vec![first_ip(&r0)]);
    assert!(pod.ping(GATEWAY), "eth0 broken by net1's DEL");
    node.cni(&pod.env("CHECK"), &with(&conf, json!({"prevResult": r0})))
        .ok();
    node.cni(&pod.env("DEL"), &conf).ok();
    assert!(node.allocated().is_empty());
}

#[test]
fn networks_with_different_names_share_the_node_pool() {
    let node = Node::new();
    let netd = node.conf("1.1.0");
    // A second conflist, copied from the first under another name.
    let other = with(&netd, json!({"name": "other"}));
    let a = Pod::new("c-net-a");
    let b = Pod::new("c-net-b");
    let ra = node.cni(&a.env("ADD"), &netd).ok();
    let rb = node.cni(&b.env("ADD"), &other).ok();
    assert_ne!(first_ip(&ra), first_ip(&rb), "one address handed out twice");
    assert_ne!(ra["interfaces"][2]["mac"], rb["interfaces"][2]["mac"]);
    assert!(a.ping(&first_ip(&rb)) && b.ping(&first_ip(&ra)));
    // GC of one network leaves the other's pods alone.
    node.cni(
        &Env::cmd("GC"),
        &with(&other, json!({"cni.dev/valid-attachments": []})),
    )
    .ok();
    assert_eq!(node.allocated(), vec![first_ip(&ra)]);
    assert!(a.ping(GATEWAY));
    node.cni(&a.env("DEL"), &netd).ok();
    node.cni(&b.env("DEL"), &other).ok();
    assert!(node.allocated().is_empty());
}

#[test]
fn pods_of_the_old_per_network_layout_survive_the_upgrade() {
    let node = Node::new();
    let conf = node.conf("1.1.0");
    let old = Pod::new("c-old");
    let r_old = node.cni(&old.env("ADD"), &conf).ok();
    let old_ip = first_ip(&r_old);
    // Rewrite its record the way the previous version kept it:
    // <dataDir>/<network name>/state.json, records without network or mac.
    let mut state = node.state();
    for a in state["allocations"].as_array_mut().unwrap() {
        let a = a.as_object_mut().unwrap();
        a.remove("network");
        a.remove("mac");
    }
    state.as_object_mut().unwrap().remove("migrated");
    std::fs::remove_dir_all(node.state_dir()).unwrap();
    let legacy = node.data_dir().join("netd");
    std::fs::create_dir_all(&legacy).unwrap();
    std::fs::write(legacy.join("lock"), "").unwrap();
    std::fs::write(legacy.join("state.json"), state.to_string()).unwrap();
    // The old pod is still known before anything is migrated ...
    node.cni(&old.env("CHECK"), &with(&conf, json!({"prevResult": r_old})))
        .ok();
    // ... and its address is not handed out again; last_reserved was kept
    // too, so the next address is the one after it.
    let new = Pod::new("c-new");
    let r_new = node.cni(&new.env("ADD"), &conf).ok();
    assert_ne!(first_ip(&r_new), old_ip);
    assert!(!legacy.join("state.json").exists(), "not migrated");
    let mut recorded = node.allocated();
    recorded.sort();
    let mut want = vec![old_ip.clone(), first_ip(&r_new)];
    want.sort();
    assert_eq!(recorded, want);
    // DEL of the old pod removes its interfaces and its record.
    node.cni(&old.env("DEL"), &conf).ok();
    assert!(!node.has_link(&host_veth(&r_old)));
    assert_eq!(node.allocated(), vec![first_ip(&r_new)]);
    node.cni(&new.env("DEL"), &conf).ok();
}

/// Makes the node's temp dir traversable by others, as /var/lib is (a
/// tempdir is 0700, which alone would keep other users out).
fn open_up(node: &Node) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(node.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(node.data_dir()).unwrap();
    std::fs::set_permissions(node.data_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Runs `args` as user nobody; whether it succeeded, and its stderr.
fn as_nobody(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(args)
        .output()
        .expect("setpriv (util-linux)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn only_root_can_open_the_ipam_lock() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let node = Node::new();
    open_up(&node);
    // A store left by an install that made it world-readable.
    let dir = node.state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let lock = dir.join("lock");
    std::fs::write(&lock, "").unwrap();
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Sanity: as it is, nobody could hold the lock (the attack).
    let (held, err) = as_nobody(&["flock", "-n", lock.to_str().unwrap(), "true"]);
    assert!(held, "the test setup is wrong: {err}");

    let conf = node.conf("1.1.0");
    let pod = Pod::new("c-lockmode");
    node.cni(&pod.env("ADD"), &conf).ok();
    let meta = |p: &Path| std::fs::metadata(p).unwrap();
    assert_eq!(meta(&dir).mode() & 0o7777, 0o700);
    assert_eq!(meta(&lock).mode() & 0o7777, 0o600);
    assert_eq!((meta(&lock).uid(), meta(&dir).uid()), (0, 0));
    let (held, err) = as_nobody(&["flock", "-n", lock.to_str().unwrap(), "true"]);
    assert!(!held, "user nobody could open and lock {}", lock.display());
    assert!(err.contains("Permission denied"), "{err}");
    node.cni(&pod.env("DEL"), &conf).ok();
}

#[test]
fn a_held_ipam_lock_is_try_again_later_not_a_hang() {
    let node = Node::new();
    let conf = with(&node.conf("1.1.0"), json!({"lockTimeoutSeconds": 1}));
    let a = Pod::new("c-lock-a");
    node.cni(&a.env("ADD"), &conf).ok();
    let lock = node.state_dir().join("lock");
    // This test process (root: nobody else can open it) holds the lock.
    let held = std::fs::File::open(&lock).unwrap();
    // SAFETY: flock(2) on a descriptor we own; no memory involved.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&held), libc::LOCK_EX) };
    assert_eq!(rc, 0);

    let b = Pod::new("c-lock-b");
    let msg = node.cni(&b.env("ADD"), &conf).err(11);
    drop(held);
    assert!(msg.starts_with("try again later; "), "{msg}");
    assert!(
        msg.contains(lock.to_str().unwrap())
            && msg.contains(&format!("held by pid {}", std::process::id())),
        "{msg}"
    );
    assert_eq!(node.allocated().len(), 1);
    assert!(b.ip(&["-o", "link"]).lines().count() == 1, "only lo in b");
    // Released: the same ADD goes through.
    node.cni(&b.env("ADD"), &conf).ok();
    for p in [&a, &b] {
        node.cni(&p.env("DEL"), &conf).ok();
    }
}
