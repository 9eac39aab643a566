//! The CNI network configuration netd installs for container runtimes:
//! `<cni-conf-dir>/10-netd.conflist`, `netd-cni` first, then the reference `portmap` plugin.
//! Written atomically and only once the node holds its lease and has written subnet.env, so a
//! runtime never sees a config for a node that cannot serve pods.

use std::path::{Path, PathBuf};

use serde_json::json;

pub const CONFLIST_NAME: &str = "10-netd.conflist";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniConf {
    pub subnet_file: PathBuf,
    pub data_dir: PathBuf,
    pub bridge: String,
    /// The node-local DNS server pods are pointed at (result `dns` of netd-cni).
    pub nameserver: Option<std::net::Ipv4Addr>,
    pub cluster_domain: String,
    /// host-local address stores (flannel's CNI network's, with `--take-over flannel`) whose
    /// addresses netd-cni must not hand out.
    pub host_local_dirs: Vec<PathBuf>,
}

impl CniConf {
    pub fn render(&self) -> String {
        let mut plugin = json!({
            "type": "netd-cni",
            "subnetFile": self.subnet_file,
            "dataDir": self.data_dir,
            "bridge": self.bridge,
            "clusterDomain": self.cluster_domain,
        });
        if !self.host_local_dirs.is_empty() {
            plugin["hostLocalDirs"] = json!(self.host_local_dirs);
        }
        if let Some(ns) = self.nameserver {
            plugin["dns"] = json!({ "nameservers": [ns.to_string()], "options": ["ndots:5"] });
        }
        let v = json!({
            "cniVersion": "1.0.0",
            "name": "netd",
            "plugins": [
                plugin,
                {
                    "type": "portmap",
                    "capabilities": { "portMappings": true },
                    "snat": true,
                },
            ],
        });
        let mut s = serde_json::to_string_pretty(&v).expect("plain JSON");
        s.push('\n');
        s
    }

    /// Writes the conflist if its content differs. Returns whether it wrote.
    pub fn write(&self, dir: &Path) -> std::io::Result<bool> {
        let path = dir.join(CONFLIST_NAME);
        let text = self.render();
        if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        crate::subnet_env::write_atomic(&path, text.as_bytes(), 0o644)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netd_cni_first_then_portmap() {
        let c = CniConf {
            subnet_file: "/run/netd/subnet.env".into(),
            data_dir: "/var/lib/netd/cni".into(),
            bridge: "netd0".into(),
            nameserver: Some("10.96.0.10".parse().unwrap()),
            cluster_domain: "cluster.local".into(),
            host_local_dirs: Vec::new(),
        };
        let v: serde_json::Value = serde_json::from_str(&c.render()).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0", "Debian's portmap speaks up to 1.0.0");
        assert_eq!(v["plugins"][0]["type"], "netd-cni");
        assert_eq!(v["plugins"][0]["subnetFile"], "/run/netd/subnet.env");
        assert_eq!(v["plugins"][0]["dns"]["nameservers"][0], "10.96.0.10");
        assert_eq!(v["plugins"][1]["type"], "portmap");
        assert_eq!(v["plugins"][1]["capabilities"]["portMappings"], true);
        let dir = tempfile::tempdir().unwrap();
        assert!(c.write(dir.path()).unwrap());
        assert!(!c.write(dir.path()).unwrap());
        assert!(v["plugins"][0].get("hostLocalDirs").is_none());
        let c = CniConf { host_local_dirs: vec!["/var/lib/cni/networks/cbr0".into()], ..c };
        let v: serde_json::Value = serde_json::from_str(&c.render()).unwrap();
        assert_eq!(v["plugins"][0]["hostLocalDirs"][0], "/var/lib/cni/networks/cbr0");
    }
}
