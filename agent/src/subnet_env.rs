//! `subnet.env`, the file flannel's CNI plugin (and ours) reads to learn the node's subnet:
//!   FLANNEL_NETWORK=10.244.0.0/16
//!   FLANNEL_SUBNET=10.244.1.1/24
//!   FLANNEL_MTU=1450
//!   FLANNEL_IPMASQ=true
//! Written atomically (temp file + rename) so a reader never sees half a file.

use std::io::Write;
use std::path::Path;

use ipnet::Ipv4Net;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Ipv4Net,
    /// The node's subnet (network address form, e.g. 10.244.1.0/24).
    pub subnet: Ipv4Net,
    pub mtu: u32,
    pub ipmasq: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    #[error("writing {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {reason}")]
    Parse { path: String, reason: String },
}

impl SubnetEnv {
    pub fn render(&self) -> String {
        let gw = std::net::Ipv4Addr::from(u32::from(self.subnet.network()) + 1);
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network,
            gw,
            self.subnet.prefix_len(),
            self.mtu,
            self.ipmasq
        )
    }

    pub fn parse(path: &str, text: &str) -> Result<Self, SubnetEnvError> {
        let vars = netd_common::subnet_env::Vars::parse(text);
        let bad = |reason: String| SubnetEnvError::Parse { path: path.to_string(), reason };
        Ok(SubnetEnv {
            network: vars.net("FLANNEL_NETWORK").map_err(bad)?.trunc(),
            subnet: vars.net("FLANNEL_SUBNET").map_err(bad)?.trunc(),
            mtu: vars.mtu("FLANNEL_MTU").map_err(bad)?,
            ipmasq: vars.opt("FLANNEL_IPMASQ") == Some("true"),
        })
    }

    pub fn read(path: &Path) -> Result<Self, SubnetEnvError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SubnetEnvError::Read { path: p.clone(), source })?;
        Self::parse(&p, &text)
    }

    /// Writes the file only if its content changes, atomically.
    pub fn write(&self, path: &Path) -> Result<bool, SubnetEnvError> {
        let text = self.render();
        if std::fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        write_atomic(path, text.as_bytes(), 0o644)
            .map_err(|source| SubnetEnvError::Write { path: path.display().to_string(), source })?;
        Ok(true)
    }
}

/// Writes `data` to `path` through a temp file in the same directory and a rename, so readers see
/// the old or the new content, never a mix. Creates the directory if needed.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_flannels_format_and_reads_it_back() {
        let env = SubnetEnv { network: "10.244.0.0/16".parse().unwrap(), subnet: "10.244.7.0/24".parse().unwrap(), mtu: 1450, ipmasq: true };
        let text = env.render();
        assert_eq!(text, "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n");
        assert_eq!(SubnetEnv::parse("x", &text).unwrap(), env);
    }

    #[test]
    fn parse_errors_name_the_variable() {
        let e = SubnetEnv::parse("/run/netd/subnet.env", "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=nope\nFLANNEL_MTU=1450\n").unwrap_err();
        assert!(e.to_string().contains("FLANNEL_SUBNET=nope"), "{e}");
        let e = SubnetEnv::parse("x", "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\n").unwrap_err();
        assert!(e.to_string().contains("FLANNEL_MTU is missing"), "{e}");
    }

    #[test]
    fn atomic_write_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/subnet.env");
        let env = SubnetEnv { network: "10.244.0.0/16".parse().unwrap(), subnet: "10.244.7.0/24".parse().unwrap(), mtu: 1450, ipmasq: false };
        assert!(env.write(&path).unwrap());
        assert!(!env.write(&path).unwrap());
        assert_eq!(SubnetEnv::read(&path).unwrap(), env);
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1, "no temp file left");
    }
}
