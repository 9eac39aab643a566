//! CNI spec versions: what we support, negotiation of the configuration's
//! `cniVersion`, and the VERSION command's answer.

use std::fmt;

use crate::config::Command;
use crate::error::CniError;

/// The version this plugin implements.
pub const CURRENT: Version = Version(1, 1, 0);

/// Every version we accept in a configuration. 0.1.0/0.2.0 (the `ip4`/`ip6`
/// result layout) are not supported.
pub const SUPPORTED: [Version; 5] = [
    Version(0, 3, 0),
    Version(0, 3, 1),
    Version(0, 4, 0),
    Version(1, 0, 0),
    Version(1, 1, 0),
];

/// A `major.minor.patch` CNI spec version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    /// Parses `1.1.0`; anything else (missing parts, suffixes) is `None`.
    pub fn parse(s: &str) -> Option<Version> {
        let mut it = s.split('.');
        let mut part = || -> Option<u32> {
            let p = it.next()?;
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            p.parse().ok()
        };
        let v = Version(part()?, part()?, part()?);
        if it.next().is_some() {
            return None;
        }
        Some(v)
    }

    /// Whether results use the pre-1.0 layout (`ips[].version`).
    pub fn is_legacy(self) -> bool {
        self < Version(1, 0, 0)
    }

    pub fn is_supported(self) -> bool {
        SUPPORTED.contains(&self)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

fn supported_list() -> String {
    SUPPORTED
        .iter()
        .map(Version::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks the configuration's `cniVersion` for `cmd`: it must be one we
/// support, and new enough for the command (CHECK appeared in 0.4.0, STATUS
/// and GC in 1.1.0).
pub fn negotiate(cni_version: Option<&str>, cmd: Command) -> Result<Version, CniError> {
    let raw = match cni_version {
        Some(s) if !s.is_empty() => s,
        _ => {
            return Err(CniError::InvalidConfig(
                "cniVersion is missing from the network config".into(),
            ))
        }
    };
    let v = Version::parse(raw).ok_or_else(|| {
        CniError::IncompatibleVersion(format!(
            "cniVersion \"{raw}\" is not a version; supported: {}",
            supported_list()
        ))
    })?;
    if !v.is_supported() {
        return Err(CniError::IncompatibleVersion(format!(
            "cniVersion {v} is not supported; supported: {}",
            supported_list()
        )));
    }
    let min = match cmd {
        Command::Check => Some(Version(0, 4, 0)),
        Command::Status | Command::Gc => Some(Version(1, 1, 0)),
        _ => None,
    };
    if let Some(min) = min {
        if v < min {
            return Err(CniError::IncompatibleVersion(format!(
                "cniVersion {v} does not allow {cmd} (needs {min} or later)"
            )));
        }
    }
    Ok(v)
}

/// The VERSION answer: `cniVersion` echoes the input's when it is one we
/// support (as the spec asks), else ours.
pub fn version_json(input_version: Option<&str>) -> String {
    let echo = input_version
        .and_then(Version::parse)
        .filter(|v| v.is_supported())
        .unwrap_or(CURRENT);
    let supported: Vec<String> = SUPPORTED.iter().map(Version::to_string).collect();
    serde_json::json!({
        "cniVersion": echo.to_string(),
        "supportedVersions": supported,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_three_numeric_parts() {
        assert_eq!(Version::parse("1.1.0"), Some(Version(1, 1, 0)));
        assert_eq!(Version::parse("0.3.1"), Some(Version(0, 3, 1)));
        for bad in [
            "",
            "1",
            "1.0",
            "1.0.0.0",
            "1.x.0",
            "v1.0.0",
            "1.0.0-rc1",
            "1..0",
        ] {
            assert_eq!(Version::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn negotiation_accepts_supported_versions() {
        for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            assert!(negotiate(Some(v), Command::Add).is_ok(), "{v}");
            assert!(negotiate(Some(v), Command::Del).is_ok(), "{v}");
        }
    }

    #[test]
    fn negotiation_rejects_unsupported_with_code_1() {
        for v in ["0.1.0", "0.2.0", "1.2.0", "2.0.0", "banana"] {
            let e = negotiate(Some(v), Command::Add).unwrap_err();
            assert_eq!(e.code(), 1, "{v}: {e}");
            assert!(e.to_string().contains("supported: 0.3.0"), "{e}");
        }
    }

    #[test]
    fn missing_version_is_invalid_config() {
        assert_eq!(negotiate(None, Command::Add).unwrap_err().code(), 7);
        assert_eq!(negotiate(Some(""), Command::Add).unwrap_err().code(), 7);
    }

    #[test]
    fn commands_need_a_recent_enough_version() {
        assert_eq!(
            negotiate(Some("0.3.1"), Command::Check).unwrap_err().code(),
            1
        );
        assert!(negotiate(Some("0.4.0"), Command::Check).is_ok());
        for cmd in [Command::Status, Command::Gc] {
            let e = negotiate(Some("1.0.0"), cmd).unwrap_err();
            assert_eq!(e.code(), 1);
            assert!(e.to_string().contains(&cmd.to_string()), "{e}");
            assert!(negotiate(Some("1.1.0"), cmd).is_ok());
        }
    }

    #[test]
    fn legacy_layout_below_1_0() {
        assert!(Version(0, 4, 0).is_legacy());
        assert!(Version(0, 3, 0).is_legacy());
        assert!(!Version(1, 0, 0).is_legacy());
    }

    #[test]
    fn version_answer() {
        let v: serde_json::Value = serde_json::from_str(&version_json(None)).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        let v: serde_json::Value = serde_json::from_str(&version_json(Some("0.4.0"))).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        let v: serde_json::Value = serde_json::from_str(&version_json(Some("9.9.9"))).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
    }
}
