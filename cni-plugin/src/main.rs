//! `netd-cni`: the CNI plugin of netd (CNI spec 1.1.0; accepts 0.3.0 to
//! 1.1.0 configs).
//!
//! ```json
//! {
//!   "cniVersion": "1.1.0", "name": "netd", "type": "netd-cni",
//!   "subnetFile": "/run/netd/subnet.env",   // optional, this default
//!   "bridge": "netd0",                      // optional, this default
//!   "dataDir": "/var/lib/netd/cni",         // optional, IPAM state
//!   "lockTimeoutSeconds": 15,               // optional, wait for the IPAM lock
//!   "dns": {"nameservers": ["10.96.0.10"]}, // optional
//!   "clusterDomain": "cluster.local",       // optional
//!   "hostLocalDirs": ["/var/lib/cni/networks/cbr0"] // optional: host-local
//!                                           // stores whose addresses are
//!                                           // never handed out (pods left
//!                                           // by flannel's CNI plugin)
//! }
//! ```
//!
//! ADD puts the pod on the node bridge (address = `FLANNEL_SUBNET`'s) with a
//! veth, an address from the node's subnet and, for the pod's first
//! interface, a default route via the bridge (a second interface into the
//! same pod, as multus adds, gets an address but leaves the route alone).
//! The result (or the spec's error object) goes to stdout; logs go to
//! stderr.
//!
//! A specific address or MAC for the pod's interface can be asked for with
//! `CNI_ARGS` `IP=10.244.7.9` (or `/24`) and `MAC=0a:58:0a:f4:07:09` (what
//! `podman run --ip/--mac-address` send), `args.cni.ips`/`args.cni.mac`, or
//! `runtimeConfig.ips`/`runtimeConfig.mac` (capabilities `ips` and `mac`).
//! The address must be a free host address of the node's subnet; a taken
//! address or MAC is error 102 naming its holder. Other `CNI_ARGS` keys than
//! those and Kubernetes' `K8S_POD_*` are refused unless `IgnoreUnknown=1`,
//! as the reference plugins do.
//!
//! IPAM records live in one store per node, `<dataDir>/_node/` (0700, only
//! root can open its lock), shared by every network name: see [`ipam`].

mod config;
mod error;
mod ipam;
mod net;
mod plugin;
mod result;
mod subnet;
mod version;

use std::io::{Read, Write};

use config::{command_from_env, parse_stdin, raw_cni_version, CniEnv, Command, NetConf};
use error::CniError;

/// Runs one invocation. `Ok(Some(json))` is printed on stdout.
fn run(
    get: &dyn Fn(&str) -> Option<String>,
    stdin: &mut dyn Read,
    error_version: &mut String,
) -> Result<Option<String>, CniError> {
    let command = command_from_env(get)?;
    let mut input = Vec::new();
    stdin
        .read_to_end(&mut input)
        .map_err(|e| CniError::Io(format!("cannot read the network config from stdin: {e}")))?;

    if command == Command::Version {
        // The input is just {"cniVersion": ...}, and may be absent.
        let requested = parse_stdin(&input).ok();
        let requested = requested.as_ref().and_then(raw_cni_version);
        return Ok(Some(version::version_json(requested)));
    }

    let obj = parse_stdin(&input);
    if let Some(v) = obj.as_ref().ok().and_then(raw_cni_version) {
        if version::Version::parse(v).is_some_and(|v| v.is_supported()) {
            *error_version = v.to_string();
        }
    }
    let env = CniEnv::from_lookup(command, get)?;
    let conf = NetConf::from_object(&obj?, command)?;
    match command {
        Command::Add => plugin::add(&env, &conf).map(|v| Some(v.to_string())),
        Command::Del => plugin::del(&env, &conf).map(|()| None),
        Command::Check => plugin::check(&env, &conf).map(|()| None),
        Command::Status => plugin::status(&conf).map(|()| None),
        Command::Gc => plugin::gc(&conf).map(|()| None),
        Command::Version => Ok(None), // answered above
    }
}

fn main() {
    let get = |k: &str| std::env::var(k).ok();
    let mut error_version = version::CURRENT.to_string();
    let outcome = run(&get, &mut std::io::stdin().lock(), &mut error_version);
    let (text, code) = match outcome {
        Ok(Some(out)) => (out, 0),
        Ok(None) => (String::new(), 0),
        Err(e) => {
            let cmd = std::env::var("CNI_COMMAND").unwrap_or_default();
            let cid = std::env::var("CNI_CONTAINERID").unwrap_or_default();
            eprintln!("netd-cni: {cmd} {cid}: {e} (code {})", e.code());
            (e.to_json(&error_version), 1)
        }
    };
    if !text.is_empty() {
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "{text}").and_then(|()| out.flush()) {
            eprintln!("netd-cni: cannot write to stdout: {e}");
            std::process::exit(1);
        }
    }
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn invoke(env: &[(&str, &str)], stdin: &str) -> (Result<Option<String>, CniError>, String) {
        let map: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let get = move |k: &str| map.get(k).cloned();
        let mut version = version::CURRENT.to_string();
        let r = run(&get, &mut stdin.as_bytes(), &mut version);
        (r, version)
    }

    #[test]
    fn version_needs_no_config() {
        let (r, _) = invoke(&[("CNI_COMMAND", "VERSION")], "");
        let v: serde_json::Value = serde_json::from_str(&r.unwrap().unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
    }

    #[test]
    fn error_version_follows_the_config() {
        let (r, version) = invoke(
            &[("CNI_COMMAND", "ADD")],
            r#"{"cniVersion":"0.4.0","name":"n"}"#,
        );
        assert_eq!(r.unwrap_err().code(), 4);
        assert_eq!(version, "0.4.0");
    }

    #[test]
    fn env_errors_come_before_config_errors() {
        let (r, _) = invoke(&[("CNI_COMMAND", "ADD")], "{broken");
        assert_eq!(r.unwrap_err().code(), 4);
        let (r, _) = invoke(
            &[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", "eth0"),
            ],
            "{broken",
        );
        assert_eq!(r.unwrap_err().code(), 6);
    }

    #[test]
    fn status_and_gc_without_state() {
        let dir = tempfile::tempdir().unwrap();
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"n","subnetFile":"{0}/subnet.env","dataDir":"{0}/ipam","cni.dev/valid-attachments":[]}}"#,
            dir.path().display()
        );
        let (r, _) = invoke(&[("CNI_COMMAND", "STATUS")], &conf);
        assert_eq!(r.unwrap_err().code(), 50);
        std::fs::write(
            dir.path().join("subnet.env"),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\n",
        )
        .unwrap();
        let (r, _) = invoke(&[("CNI_COMMAND", "STATUS")], &conf);
        assert_eq!(r.unwrap(), None);
        let (r, _) = invoke(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/x")], &conf);
        assert_eq!(r.unwrap(), None);
    }
}
