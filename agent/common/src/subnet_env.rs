//! The variables of flannel's `subnet.env` (`FLANNEL_NETWORK=10.244.0.0/16`, one per line;
//! blank lines and `#` comments ignored, values possibly quoted). The daemon writes the file and
//! reads it back after a restart; the CNI plugin reads it for every pod. Each makes its own
//! struct from these variables; the reasons in errors name the variable and its value.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;

/// The `KEY=value` pairs of a subnet.env text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vars<'a>(BTreeMap<&'a str, &'a str>);

impl<'a> Vars<'a> {
    pub fn parse(text: &'a str) -> Self {
        Vars(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
                .collect(),
        )
    }

    /// A variable that must be there.
    pub fn get(&self, key: &str) -> Result<&'a str, String> {
        self.0
            .get(key)
            .copied()
            .ok_or_else(|| format!("{key} is missing"))
    }

    /// A variable that may be absent.
    pub fn opt(&self, key: &str) -> Option<&'a str> {
        self.0.get(key).copied()
    }

    /// An IPv4 CIDR, as written (host bits kept: FLANNEL_SUBNET carries the gateway).
    pub fn net(&self, key: &str) -> Result<Ipv4Net, String> {
        let v = self.get(key)?;
        v.parse::<Ipv4Net>()
            .map_err(|_| format!("{key}={v} is not an IPv4 CIDR"))
    }

    /// An MTU (68..=65535).
    pub fn mtu(&self, key: &str) -> Result<u32, String> {
        let v = self.get(key)?;
        v.parse::<u32>()
            .ok()
            .filter(|m| (68..=65535).contains(m))
            .ok_or_else(|| format!("{key}={v} is not an MTU (68..65535)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_and_their_errors() {
        let v = Vars::parse("# netd\nFLANNEL_NETWORK=10.244.0.0/16\n FLANNEL_SUBNET = \"10.244.7.1/24\"\n\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\nJUNK\n");
        assert_eq!(
            v.net("FLANNEL_SUBNET").unwrap().to_string(),
            "10.244.7.1/24"
        );
        assert_eq!(v.mtu("FLANNEL_MTU"), Ok(1450));
        assert_eq!(v.opt("FLANNEL_IPMASQ"), Some("true"));
        assert_eq!(v.get("FLANNEL_X"), Err("FLANNEL_X is missing".into()));
        let bad = Vars::parse("FLANNEL_NETWORK=10.244.0.0\nFLANNEL_MTU=40");
        assert_eq!(
            bad.net("FLANNEL_NETWORK"),
            Err("FLANNEL_NETWORK=10.244.0.0 is not an IPv4 CIDR".into())
        );
        assert_eq!(
            bad.mtu("FLANNEL_MTU"),
            Err("FLANNEL_MTU=40 is not an MTU (68..65535)".into())
        );
    }
}
