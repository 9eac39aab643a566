//! CNI errors and their wire form: the spec's error result
//! `{"cniVersion","code","msg","details"}` printed on stdout, with a non-zero
//! exit status.
//!
//! Codes 1–99 are the spec's well-known ones; 100+ are ours:
//!
//! | code | meaning |
//! |------|---------|
//! | 1    | incompatible CNI version |
//! | 4    | invalid necessary environment variable (message names it) |
//! | 5    | I/O failure (stdin, IPAM state files) |
//! | 6    | failed to decode content (stdin is not a JSON object) |
//! | 7    | invalid network config (message names the field) |
//! | 11   | try again later (subnet.env missing, address pool exhausted, IPAM lock busy) |
//! | 50   | plugin not available (STATUS) |
//! | 100  | attachment already exists (ADD twice, interface already in the netns) |
//! | 101  | CHECK found the attachment not as expected |
//! | 102  | the requested address or MAC is held by another attachment |
//! | 999  | internal error (a netlink operation failed) |

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CniError {
    /// Code 1. The string says which version and why.
    #[error("incompatible CNI version: {0}")]
    IncompatibleVersion(String),
    /// Code 4.
    #[error("invalid environment variable {var}: {reason}")]
    InvalidEnv { var: &'static str, reason: String },
    /// Code 5.
    #[error("I/O failure: {0}")]
    Io(String),
    /// Code 6.
    #[error("failed to decode {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    /// Code 7.
    #[error("invalid network config: {0}")]
    InvalidConfig(String),
    /// Code 11.
    #[error("try again later: {0}")]
    TryAgainLater(String),
    /// Code 50.
    #[error("plugin not available: {0}")]
    NotAvailable(String),
    /// Code 100.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// Code 101.
    #[error("check failed: {0}")]
    CheckFailed(String),
    /// Code 102.
    #[error("address in use: {0}")]
    AddressInUse(String),
    /// Code 999.
    #[error("{0}")]
    Internal(String),
}

pub const ERR_INCOMPATIBLE_VERSION: u32 = 1;
pub const ERR_INVALID_ENV: u32 = 4;
pub const ERR_IO: u32 = 5;
pub const ERR_DECODE: u32 = 6;
pub const ERR_INVALID_CONFIG: u32 = 7;
pub const ERR_TRY_AGAIN_LATER: u32 = 11;
pub const ERR_NOT_AVAILABLE: u32 = 50;
pub const ERR_ALREADY_EXISTS: u32 = 100;
pub const ERR_CHECK_FAILED: u32 = 101;
pub const ERR_ADDRESS_IN_USE: u32 = 102;
pub const ERR_INTERNAL: u32 = 999;

impl CniError {
    pub fn code(&self) -> u32 {
        match self {
            CniError::IncompatibleVersion(_) => ERR_INCOMPATIBLE_VERSION,
            CniError::InvalidEnv { .. } => ERR_INVALID_ENV,
            CniError::Io(_) => ERR_IO,
            CniError::Decode { .. } => ERR_DECODE,
            CniError::InvalidConfig(_) => ERR_INVALID_CONFIG,
            CniError::TryAgainLater(_) => ERR_TRY_AGAIN_LATER,
            CniError::NotAvailable(_) => ERR_NOT_AVAILABLE,
            CniError::AlreadyExists(_) => ERR_ALREADY_EXISTS,
            CniError::CheckFailed(_) => ERR_CHECK_FAILED,
            CniError::AddressInUse(_) => ERR_ADDRESS_IN_USE,
            CniError::Internal(_) => ERR_INTERNAL,
        }
    }

    /// The short, fixed description of the code (the spec's `msg`); the
    /// specific problem goes in `details`.
    fn summary(&self) -> &'static str {
        match self {
            CniError::IncompatibleVersion(_) => "incompatible CNI version",
            CniError::InvalidEnv { .. } => "invalid environment variable",
            CniError::Io(_) => "I/O failure",
            CniError::Decode { .. } => "failed to decode content",
            CniError::InvalidConfig(_) => "invalid network config",
            CniError::TryAgainLater(_) => "try again later",
            CniError::NotAvailable(_) => "plugin not available",
            CniError::AlreadyExists(_) => "already exists",
            CniError::CheckFailed(_) => "check failed",
            CniError::AddressInUse(_) => "address in use",
            CniError::Internal(_) => "internal error",
        }
    }

    /// The specific problem without the code's summary (the spec's
    /// `details`).
    fn details(&self) -> String {
        match self {
            CniError::InvalidEnv { var, reason } => format!("{var}: {reason}"),
            CniError::Decode { what, reason } => format!("{what}: {reason}"),
            CniError::IncompatibleVersion(s)
            | CniError::Io(s)
            | CniError::InvalidConfig(s)
            | CniError::TryAgainLater(s)
            | CniError::NotAvailable(s)
            | CniError::AlreadyExists(s)
            | CniError::CheckFailed(s)
            | CniError::AddressInUse(s)
            | CniError::Internal(s) => s.clone(),
        }
    }

    pub fn invalid_env(var: &'static str, reason: impl Into<String>) -> Self {
        CniError::InvalidEnv {
            var,
            reason: reason.into(),
        }
    }

    /// The error result JSON (one line, no trailing newline).
    ///
    /// As the spec says: `msg` is the short message (the code's summary),
    /// `details` the longer one naming what was wrong. Runtimes print
    /// `msg; details` (libcni's `Error()`), so neither repeats the other.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: &'a str,
            code: u32,
            msg: String,
            details: String,
        }
        let wire = Wire {
            cni_version,
            code: self.code(),
            msg: self.summary().to_string(),
            details: self.details(),
        };
        // Serializing a struct of strings and integers cannot fail.
        serde_json::to_string(&wire).unwrap_or_else(|_| {
            format!(
                r#"{{"cniVersion":"{cni_version}","code":{},"msg":"internal error"}}"#,
                self.code()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_keys() {
        let e = CniError::invalid_env("CNI_CONTAINERID", "is missing");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.1.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["code"], 4);
        assert_eq!(v["msg"], "invalid environment variable");
        assert_eq!(v["details"], "CNI_CONTAINERID: is missing");
    }

    #[test]
    fn msg_is_short_and_details_long_as_in_the_spec() {
        // The spec's example error, rebuilt from our type.
        let e =
            CniError::InvalidConfig("Network 192.168.0.0/31 too small to allocate from.".into());
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.1.0")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "cniVersion": "1.1.0",
                "code": 7,
                "msg": "invalid network config",
                "details": "Network 192.168.0.0/31 too small to allocate from."
            })
        );
        // What a runtime prints (`msg; details`) says "try again later" once.
        let e = CniError::TryAgainLater("no free address in 10.244.7.0/30 (1 in use)".into());
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.1.0")).unwrap();
        let shown = format!("{}; {}", v["msg"].as_str().unwrap(), v["details"].as_str().unwrap());
        assert_eq!(shown.matches("try again later").count(), 1, "{shown}");
    }

    #[test]
    fn codes_match_the_spec_table() {
        let cases = [
            (CniError::IncompatibleVersion(String::new()), 1),
            (CniError::invalid_env("CNI_IFNAME", ""), 4),
            (CniError::Io(String::new()), 5),
            (
                CniError::Decode {
                    what: "x",
                    reason: String::new(),
                },
                6,
            ),
            (CniError::InvalidConfig(String::new()), 7),
            (CniError::TryAgainLater(String::new()), 11),
            (CniError::NotAvailable(String::new()), 50),
            (CniError::AlreadyExists(String::new()), 100),
            (CniError::CheckFailed(String::new()), 101),
            (CniError::AddressInUse(String::new()), 102),
            (CniError::Internal(String::new()), 999),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code, "{e:?}");
        }
    }

    #[test]
    fn messages_are_escaped_json() {
        let e = CniError::InvalidConfig("name \"a\\b\" is invalid".into());
        let v: serde_json::Value = serde_json::from_str(&e.to_json("0.4.0")).unwrap();
        assert_eq!(v["details"], "name \"a\\b\" is invalid");
    }
}
