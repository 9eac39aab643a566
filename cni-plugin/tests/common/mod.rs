//! Shared harness: runs the built `netd-cni` the way a container runtime
//! does (CNI_* environment, config on stdin) inside a "node" namespace made
//! with the netd-tests bed, against pod namespaces made the same way.
//!
//! Everything is an RAII guard: namespaces are deleted and temp dirs removed
//! on drop, also when an assertion fails. Addresses: pods 10.244.0.0/16,
//! underlay 198.18.0.0/15; nothing is created in the root namespace.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use netd_tests::Netns;
use serde_json::{json, Value};

/// The plugin under test: `$NETD_CNI_BIN` when set (e.g. the static build the image ships,
/// `target/<triple>/release/netd-cni`), else the one cargo built for these tests.
pub fn bin() -> String {
    std::env::var("NETD_CNI_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_netd-cni").to_string())
}
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
pub const SUBNET_ENV: &str =
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
pub const GATEWAY: &str = "10.244.7.1";

static REAP: Once = Once::new();

/// A temp dir named like the bed's namespaces (`ntb-<pid>-...`), so a
/// killed test run's leftovers are reaped by the next one.
pub fn tempdir(role: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("{}{role}-", netd_tests::namespace_prefix()))
        .tempdir()
        .expect("temp dir")
}

/// What one plugin run produced.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Stdout as JSON (panics with the whole outcome if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }

    /// Asserts success and returns stdout as JSON (Null when empty).
    pub fn ok(&self) -> Value {
        assert!(self.success(), "plugin failed: {self:#?}");
        if self.stdout.trim().is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }

    /// Asserts a spec error result with `code`, and returns what a runtime
    /// shows of it: `msg; details` (libcni's `Error()`).
    pub fn err(&self, code: u64) -> String {
        assert!(
            !self.success(),
            "expected error {code}, got success: {self:#?}"
        );
        let v = self.json();
        assert_eq!(v["code"], code, "wrong error code: {self:#?}");
        assert!(v["cniVersion"].is_string(), "{self:#?}");
        let msg = v["msg"].as_str().expect("msg");
        let details = v["details"].as_str().expect("details");
        assert!(
            !details.contains(msg),
            "details repeat msg \"{msg}\": {self:#?}"
        );
        format!("{msg}; {details}")
    }
}

/// The `CNI_*` variables of one invocation; `None` leaves a variable unset.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

impl Env {
    pub fn cmd(command: &str) -> Env {
        Env {
            command: Some(command.into()),
            path: Some(REFERENCE_PLUGINS.into()),
            ..Default::default()
        }
    }

    /// A full attachment invocation.
    pub fn attach(command: &str, container_id: &str, netns: &str, ifname: &str) -> Env {
        Env {
            container_id: Some(container_id.into()),
            netns: Some(netns.into()),
            ifname: Some(ifname.into()),
            ..Env::cmd(command)
        }
    }

    pub fn with_command(mut self, command: &str) -> Env {
        self.command = Some(command.into());
        self
    }

    pub fn with_args(mut self, args: &str) -> Env {
        self.args = Some(args.into());
        self
    }

    fn apply(&self, cmd: &mut Command) {
        for (k, v) in [
            ("CNI_COMMAND", &self.command),
            ("CNI_CONTAINERID", &self.container_id),
            ("CNI_NETNS", &self.netns),
            ("CNI_IFNAME", &self.ifname),
            ("CNI_ARGS", &self.args),
            ("CNI_PATH", &self.path),
        ] {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
    }
}

/// How long a plugin run may take before the harness calls it hung, kills
/// it and fails the test (a guard against a test that never ends, not a
/// timing assertion: every run normally takes well under a second).
const HUNG_AFTER: Duration = Duration::from_secs(120);

/// Runs `cmd` with `env`, `stdin` piped in, and collects the outcome.
pub fn run_with_stdin(mut cmd: Command, env: &Env, stdin: &[u8]) -> Outcome {
    env.apply(&mut cmd);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    {
        let mut input = child.stdin.take().expect("stdin");
        // A plugin may exit before reading (e.g. env errors): ignore EPIPE.
        let _ = input.write_all(stdin);
    }
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + HUNG_AFTER;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {HUNG_AFTER:?} (hung?); stderr: {}",
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Outcome {
        code: status.code(),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Runs the plugin outside any namespace of ours: only for invocations that
/// fail (or answer) before touching the network.
pub fn run_bare(env: &Env, stdin: &str) -> Outcome {
    run_with_stdin(Command::new(bin()), env, stdin.as_bytes())
}

/// A "node": its own namespace, a temp dir with subnet.env and IPAM data.
pub struct Node {
    pub ns: Netns,
    pub dir: tempfile::TempDir,
}

impl Node {
    /// A node whose subnet.env says 10.244.7.1/24, MTU 1450.
    pub fn new() -> Node {
        REAP.call_once(|| {
            netd_tests::reap_stale_namespaces();
        });
        let ns = Netns::new("node").expect("node namespace");
        let dir = tempdir("cni");
        std::fs::write(dir.path().join("subnet.env"), SUBNET_ENV).unwrap();
        Node { ns, dir }
    }

    pub fn subnet_file(&self) -> PathBuf {
        self.dir.path().join("subnet.env")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    /// The node's IPAM record store (every network's records).
    pub fn state_dir(&self) -> PathBuf {
        self.data_dir().join("_node")
    }

    /// The IPAM state file of the node.
    pub fn state(&self) -> Value {
        let path = self.state_dir().join("state.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).expect("state JSON"),
            Err(_) => json!({"allocations": []}),
        }
    }

    pub fn allocated(&self) -> Vec<String> {
        self.state()["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["ip"].as_str().unwrap().to_string())
            .collect()
    }

    /// Our plugin config for `version`.
    pub fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "netd",
            "type": "netd-cni",
            "subnetFile": self.subnet_file(),
            "dataDir": self.data_dir(),
            "dns": {"nameservers": ["10.96.0.10"]},
        })
    }

    /// `ip netns exec NODE program` with the invocation's environment.
    pub fn run_program(&self, program: &str, env: &Env, conf: &Value) -> Outcome {
        let cmd = self.ns.command(&[program]);
        run_with_stdin(cmd, env, conf.to_string().as_bytes())
    }

    /// Runs netd-cni inside the node namespace.
    pub fn cni(&self, env: &Env, conf: &Value) -> Outcome {
        self.run_program(&bin(), env, conf)
    }

    /// Runs a Debian reference plugin inside the node namespace.
    pub fn reference(&self, plugin: &str, env: &Env, conf: &Value) -> Outcome {
        let path = Path::new(REFERENCE_PLUGINS).join(plugin);
        assert!(
            path.exists(),
            "{} missing: apt-get install containernetworking-plugins",
            path.display()
        );
        self.run_program(path.to_str().unwrap(), env, conf)
    }

    /// `ip -n NODE args...` output.
    pub fn ip(&self, args: &[&str]) -> String {
        self.ns.ip(args).expect("ip")
    }

    /// Whether a link named `name` exists in the node namespace.
    pub fn has_link(&self, name: &str) -> bool {
        self.ns
            .exec(&["ip", "link", "show", name])
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

/// A pod: a namespace and the container ID the runtime gave it.
pub struct Pod {
    pub ns: Netns,
    pub id: String,
}

impl Pod {
    pub fn new(id: &str) -> Pod {
        Pod {
            ns: Netns::new("pod").expect("pod namespace"),
            id: id.to_string(),
        }
    }

    pub fn netns_path(&self) -> String {
        format!("/var/run/netns/{}", self.ns.name())
    }

    pub fn env(&self, command: &str) -> Env {
        Env::attach(command, &self.id, &self.netns_path(), "eth0")
    }

    pub fn ip(&self, args: &[&str]) -> String {
        self.ns.ip(args).expect("ip")
    }

    pub fn ping(&self, target: &str) -> bool {
        self.ns
            .exec(&["ping", "-n", "-q", "-c", "1", "-W", "2", target])
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

/// The address (without prefix) of `ips[0]`.
pub fn first_ip(result: &Value) -> String {
    let cidr = result["ips"][0]["address"]
        .as_str()
        .expect("ips[0].address");
    cidr.split('/').next().unwrap().to_string()
}

/// `conf` with `prevResult` (and anything else) merged in.
pub fn with(conf: &Value, extra: Value) -> Value {
    let mut c = conf.clone();
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}
