//! Protocol conformance of the built binary: VERSION, environment
//! validation (code 4), version negotiation (code 1), decoding (6), config
//! validation (7), STATUS (50), subnet.env missing on ADD (11), error JSON.

mod common;

use common::{run_bare, Env, Node, Pod};
use serde_json::json;

fn conf(version: &str) -> String {
    json!({"cniVersion": version, "name": "netd", "type": "netd-cni",
           "subnetFile": "/nonexistent/subnet.env", "dataDir": "/nonexistent/ipam"})
    .to_string()
}

#[test]
fn version_reports_spec_1_1_0_and_supported_versions() {
    for stdin in ["", r#"{"cniVersion":"1.1.0"}"#] {
        let out = run_bare(&Env::cmd("VERSION"), stdin);
        let v = out.ok();
        assert_eq!(v["cniVersion"], "1.1.0", "{out:?}");
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }
    // The spec: cniVersion echoes the input's.
    let v = run_bare(&Env::cmd("VERSION"), r#"{"cniVersion":"0.4.0"}"#).ok();
    assert_eq!(v["cniVersion"], "0.4.0");
}

#[test]
fn missing_or_unknown_command_is_code_4() {
    let mut env = Env::cmd("ADD");
    env.command = None;
    let msg = run_bare(&env, &conf("1.1.0")).err(4);
    assert!(msg.contains("CNI_COMMAND"), "{msg}");
    let msg = run_bare(&Env::cmd("FROBNICATE"), &conf("1.1.0")).err(4);
    assert!(
        msg.contains("CNI_COMMAND") && msg.contains("FROBNICATE"),
        "{msg}"
    );
}

#[test]
fn each_required_variable_is_checked_with_code_4() {
    let full = Env::attach("ADD", "c1", "/var/run/netns/none", "eth0");
    let cases: Vec<(&str, &str, Env)> = vec![
        (
            "ADD",
            "CNI_CONTAINERID",
            Env {
                container_id: None,
                ..full.clone()
            },
        ),
        (
            "ADD",
            "CNI_NETNS",
            Env {
                netns: None,
                ..full.clone()
            },
        ),
        (
            "ADD",
            "CNI_IFNAME",
            Env {
                ifname: None,
                ..full.clone()
            },
        ),
        (
            "CHECK",
            "CNI_NETNS",
            Env {
                netns: None,
                ..full.clone()
            },
        ),
        (
            "DEL",
            "CNI_CONTAINERID",
            Env {
                container_id: None,
                ..full.clone()
            },
        ),
        (
            "DEL",
            "CNI_IFNAME",
            Env {
                ifname: None,
                ..full.clone()
            },
        ),
        (
            "ADD",
            "CNI_CONTAINERID",
            Env {
                container_id: Some("-bad/id".into()),
                ..full.clone()
            },
        ),
        (
            "ADD",
            "CNI_IFNAME",
            Env {
                ifname: Some("much-too-long-ifname".into()),
                ..full.clone()
            },
        ),
        (
            "ADD",
            "CNI_ARGS",
            full.clone().with_args("K8S_POD_NAMESPACE=x;garbage"),
        ),
        (
            "GC",
            "CNI_PATH",
            Env {
                path: None,
                ..Env::cmd("GC")
            },
        ),
    ];
    for (command, var, env) in cases {
        let env = env.with_command(command);
        let out = run_bare(&env, &conf("1.1.0"));
        let msg = out.err(4);
        assert!(msg.contains(var), "{command} / {var}: {msg}");
        assert!(
            out.stderr.contains(var),
            "the error is logged on stderr too: {out:?}"
        );
    }
}

#[test]
fn bad_netns_is_code_4() {
    let node = Node::new();
    let not_a_netns = node.subnet_file();
    for netns in [
        "/var/run/netns/does-not-exist",
        not_a_netns.to_str().unwrap(),
    ] {
        let env = Env::attach("ADD", "c1", netns, "eth0");
        let msg = node.cni(&env, &node.conf("1.1.0")).err(4);
        assert!(msg.contains("CNI_NETNS") && msg.contains(netns), "{msg}");
    }
    assert!(
        node.allocated().is_empty(),
        "a failed ADD must not keep its address"
    );
}

#[test]
fn unsupported_versions_are_code_1() {
    let env = Env::attach("ADD", "c1", "/var/run/netns/none", "eth0");
    for v in ["0.1.0", "0.2.0", "1.2.0", "2.0.0", "not-a-version"] {
        let msg = run_bare(&env, &conf(v)).err(1);
        assert!(msg.contains(v) && msg.contains("supported"), "{msg}");
    }
    // CHECK needs 0.4.0+, STATUS and GC need 1.1.0.
    let check = Env::attach("CHECK", "c1", "/var/run/netns/none", "eth0");
    assert!(run_bare(&check, &conf("0.3.1")).err(1).contains("CHECK"));
    assert!(run_bare(&Env::cmd("STATUS"), &conf("1.0.0"))
        .err(1)
        .contains("STATUS"));
    assert!(run_bare(&Env::cmd("GC"), &conf("1.0.0"))
        .err(1)
        .contains("GC"));
}

#[test]
fn bad_json_is_code_6_and_bad_fields_code_7() {
    let env = Env::attach("DEL", "c1", "/var/run/netns/none", "eth0");
    for stdin in ["{\"cniVersion\": \"1.1.0\",", "", "[1,2]", "null"] {
        run_bare(&env, stdin).err(6);
    }
    for (stdin, field) in [
        (r#"{"cniVersion":"1.1.0","type":"netd-cni"}"#, "name"),
        (
            r#"{"cniVersion":"1.1.0","name":"netd","bridge":7}"#,
            "bridge",
        ),
        (
            r#"{"cniVersion":"1.1.0","name":"netd","dns":{"nameservers":"x"}}"#,
            "dns",
        ),
        (r#"{"name":"netd"}"#, "cniVersion"),
    ] {
        let msg = run_bare(&env, stdin).err(7);
        assert!(msg.contains(field), "{stdin}: {msg}");
    }
}

#[test]
fn error_json_carries_the_config_version() {
    let env = Env::attach("ADD", "c1", "/var/run/netns/none", "eth0");
    let out = run_bare(
        &Env {
            container_id: None,
            ..env
        },
        &conf("0.4.0"),
    );
    out.err(4);
    assert_eq!(out.json()["cniVersion"], "0.4.0");
    assert!(out.json()["details"].is_string());
}

#[test]
fn status_follows_subnet_env() {
    let node = Node::new();
    let conf = node.conf("1.1.0");
    assert_eq!(
        node.cni(&Env::cmd("STATUS"), &conf).ok(),
        serde_json::Value::Null
    );
    std::fs::remove_file(node.subnet_file()).unwrap();
    let msg = node.cni(&Env::cmd("STATUS"), &conf).err(50);
    assert!(msg.contains("subnet.env"), "{msg}");
    std::fs::write(node.subnet_file(), "FLANNEL_NETWORK=garbage\n").unwrap();
    node.cni(&Env::cmd("STATUS"), &conf).err(50);
    std::fs::write(node.subnet_file(), common::SUBNET_ENV).unwrap();
    node.cni(&Env::cmd("STATUS"), &conf).ok();
}

#[test]
fn add_without_subnet_env_is_try_again_later() {
    let node = Node::new();
    let pod = Pod::new("c-nosubnet");
    std::fs::remove_file(node.subnet_file()).unwrap();
    let msg = node.cni(&pod.env("ADD"), &node.conf("1.1.0")).err(11);
    assert!(msg.contains("subnet.env"), "{msg}");
    assert!(!node.has_link("netd0"), "nothing may be created");
    assert!(node.allocated().is_empty());
    // DEL still works (best effort, nothing to do).
    node.cni(&pod.env("DEL"), &node.conf("1.1.0")).ok();
}

#[test]
fn unknown_fields_are_tolerated() {
    let node = Node::new();
    let pod = Pod::new("c-extra");
    let conf = common::with(
        &node.conf("1.1.0"),
        json!({
            "runtimeConfig": {"portMappings": [], "bandwidth": {}},
            "capabilities": {"portMappings": true},
            "args": {"cni": {"labels": []}},
            "ipMasq": true,
            "cni.dev/some-future-key": {"x": 1},
            "futureField": [1, "two", null]
        }),
    );
    let r = node.cni(&pod.env("ADD"), &conf).ok();
    assert_eq!(r["cniVersion"], "1.1.0");
    node.cni(&pod.env("DEL"), &conf).ok();
}

#[test]
fn error_msg_is_short_and_details_say_what_was_wrong() {
    // The spec: "msg": short error message, "details": longer error message.
    let env = Env::attach("ADD", "c1", "/var/run/netns/none", "eth0");
    let out = run_bare(
        &Env {
            container_id: None,
            ..env
        },
        &conf("1.1.0"),
    );
    out.err(4);
    let v = out.json();
    assert_eq!(v["msg"], "invalid environment variable");
    assert_eq!(v["details"], "CNI_CONTAINERID: is not set");

    // What a runtime prints for code 11 says "try again later" once.
    let node = Node::new();
    let pod = Pod::new("c-errjson");
    std::fs::remove_file(node.subnet_file()).unwrap();
    let out = node.cni(&pod.env("ADD"), &node.conf("1.1.0"));
    let shown = out.err(11);
    assert_eq!(out.json()["msg"], "try again later");
    assert_eq!(shown.matches("try again later").count(), 1, "{shown}");
    assert!(shown.contains("subnet.env"), "{shown}");
}

#[test]
fn unknown_cni_args_are_refused_unless_ignore_unknown() {
    let node = Node::new();
    let conf = node.conf("1.1.0");
    let pod = Pod::new("c-args");
    let msg = node
        .cni(&pod.env("ADD").with_args("K8S_POD_NAME=x;FROB=1"), &conf)
        .err(4);
    assert!(
        msg.contains("CNI_ARGS") && msg.contains("FROB") && msg.contains("IgnoreUnknown=1"),
        "{msg}"
    );
    assert!(node.allocated().is_empty());
    // The reference plugins refuse them too.
    let ipam = json!({"cniVersion": "1.0.0", "name": "ref", "type": "host-local",
        "ipam": {"type": "host-local", "subnet": "10.244.99.0/24",
                 "dataDir": node.dir.path().join("host-local")}});
    let reference = node.reference("host-local", &pod.env("ADD").with_args("FROB=1"), &ipam);
    assert!(!reference.success(), "{reference:?}");
    assert!(reference.stdout.contains("unknown args"), "{reference:?}");
    // With IgnoreUnknown=1 (what runtimes send) they are ignored; the
    // Kubernetes keys need no such flag.
    let r = node
        .cni(&pod.env("ADD").with_args("IgnoreUnknown=1;FROB=1"), &conf)
        .ok();
    node.cni(&pod.env("DEL").with_args("FROB=1"), &conf).ok();
    let r2 = node
        .cni(
            &pod.env("ADD").with_args(
                "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;K8S_POD_INFRA_CONTAINER_ID=c;K8S_POD_UID=d",
            ),
            &conf,
        )
        .ok();
    assert_eq!(r["cniVersion"], r2["cniVersion"]);
    node.cni(&pod.env("DEL"), &conf).ok();
}
