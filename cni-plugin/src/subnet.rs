//! netd's `subnet.env` (flannel's format), as the plugin reads it:
//! ```text
//! FLANNEL_NETWORK=10.244.0.0/16
//! FLANNEL_SUBNET=10.244.7.1/24
//! FLANNEL_MTU=1450
//! FLANNEL_IPMASQ=true
//! ```
//! `FLANNEL_SUBNET`'s address is the node's gateway (the bridge address).

use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSubnet {
    /// The cluster's pod network (FLANNEL_NETWORK).
    pub network: Ipv4Net,
    /// The node's pod subnet in network form, e.g. 10.244.7.0/24.
    pub subnet: Ipv4Net,
    /// The bridge address / pods' default gateway, e.g. 10.244.7.1.
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

impl NodeSubnet {
    /// The gateway with the subnet's prefix length (the bridge address).
    pub fn gateway_net(&self) -> Ipv4Net {
        // The prefix length comes from a valid Ipv4Net, so this cannot fail.
        Ipv4Net::new(self.gateway, self.subnet.prefix_len()).unwrap_or(self.subnet)
    }

    pub fn parse(text: &str) -> Result<NodeSubnet, String> {
        let vars = netd_common::subnet_env::Vars::parse(text);
        let net = |k: &str| vars.net(k);
        let network = net("FLANNEL_NETWORK")?.trunc();
        let with_gw = net("FLANNEL_SUBNET")?;
        let subnet = with_gw.trunc();
        if subnet.prefix_len() > 30 {
            return Err(format!(
                "FLANNEL_SUBNET={with_gw} leaves no room for pods (need /30 or larger)"
            ));
        }
        // Flannel writes the gateway (network + 1); accept the bare network too.
        let gateway = if with_gw.addr() == subnet.network() {
            Ipv4Addr::from(u32::from(subnet.network()) + 1)
        } else {
            with_gw.addr()
        };
        if gateway == subnet.broadcast() {
            return Err(format!(
                "FLANNEL_SUBNET={with_gw}: the gateway cannot be the broadcast address"
            ));
        }
        let mtu = vars.mtu("FLANNEL_MTU")?;
        Ok(NodeSubnet {
            network,
            subnet,
            gateway,
            mtu,
        })
    }

    /// Reads and parses the file; the error names the path.
    pub fn read(path: &Path) -> Result<NodeSubnet, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        NodeSubnet::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLANNEL: &str =
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    #[test]
    fn parses_flannels_format() {
        let s = NodeSubnet::parse(FLANNEL).unwrap();
        assert_eq!(s.network, "10.244.0.0/16".parse().unwrap());
        assert_eq!(s.subnet, "10.244.7.0/24".parse().unwrap());
        assert_eq!(s.gateway, Ipv4Addr::new(10, 244, 7, 1));
        assert_eq!(s.gateway_net().to_string(), "10.244.7.1/24");
        assert_eq!(s.mtu, 1450);
    }

    #[test]
    fn tolerates_quotes_comments_and_bare_network() {
        let s = NodeSubnet::parse(
            "# written by netd\nFLANNEL_NETWORK=\"10.244.0.0/16\"\n FLANNEL_SUBNET = 10.244.9.0/24\nFLANNEL_MTU=1500\n",
        )
        .unwrap();
        assert_eq!(s.gateway, Ipv4Addr::new(10, 244, 9, 1));
    }

    #[test]
    fn errors_name_the_variable() {
        for (text, needle) in [
            (
                "FLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\n",
                "FLANNEL_NETWORK is missing",
            ),
            (
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=x\nFLANNEL_MTU=1450\n",
                "FLANNEL_SUBNET=x",
            ),
            (
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=big\n",
                "FLANNEL_MTU=big",
            ),
            (
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/31\nFLANNEL_MTU=1450\n",
                "no room",
            ),
            (
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.255/24\nFLANNEL_MTU=1450\n",
                "broadcast",
            ),
        ] {
            let e = NodeSubnet::parse(text).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn read_names_the_path() {
        let e = NodeSubnet::read(Path::new("/nonexistent/subnet.env")).unwrap_err();
        assert!(e.contains("/nonexistent/subnet.env"), "{e}");
    }
}
