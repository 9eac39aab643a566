//! The data paths under comparison, each a two-pod test-bed cluster: pod
//! `a` on node0, pod `b` on node1.

use anyhow::{Context, Result};
use netd_tests::{Cluster, Pod};
use std::time::Duration;

pub const NETWORK_CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// netd's userspace udp backend (flannel's `udp`, TUN + UDP port 8285).
const UDP_NETWORK_CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;
/// flannel's VXLAN MTU on a 1500-byte underlay.
const VXLAN_MTU: u32 = 1450;
/// The hand-made device is named like flannel's, so it is never mistaken
/// for netd's `netd.1`.
const HAND_DEV: &str = "flannel.1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// netd with its defaults (`--ip-masq true`: nftables nat hook, so
    /// conntrack, as flannel's iptables masquerade has too).
    Netd,
    /// netd `--ip-masq false`: the overlay alone.
    NetdNoMasq,
    /// netd with the udp backend and its defaults (the same masquerade as
    /// [`Kind::Netd`]): TUN device + the netd-udp datapath, MTU 1472.
    NetdUdp,
    /// The udp backend again with `--udp-variant-args` added: an A/B of a
    /// datapath knob in the same run (only measured when asked for).
    NetdUdpVariant,
    /// `ip link add ... type vxlan` + `ip neigh` + `bridge fdb` +
    /// `ip route ... onlink`, flannel's recipe, MTU 1450.
    HandVxlan,
    /// No encapsulation: routes to the peer's pod subnet via its underlay
    /// address (flannel's host-gw), pod MTU 1500.
    Bare,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Netd,
        Kind::NetdNoMasq,
        Kind::NetdUdp,
        Kind::NetdUdpVariant,
        Kind::HandVxlan,
        Kind::Bare,
    ];

    /// Short name for `--configs`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Netd => "vxlan",
            Kind::NetdNoMasq => "vxlan-nomasq",
            Kind::NetdUdp => "udp",
            Kind::NetdUdpVariant => "udp-variant",
            Kind::HandVxlan => "hand",
            Kind::Bare => "bare",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Netd => "netd vxlan (defaults)",
            Kind::NetdNoMasq => "netd vxlan --ip-masq=false",
            Kind::NetdUdp => "netd udp (defaults)",
            Kind::NetdUdpVariant => "netd udp (variant)",
            Kind::HandVxlan => "hand-made kernel vxlan",
            Kind::Bare => "bare underlay (no encap)",
        }
    }
}

/// One data path ready for traffic. Field order is drop order: pods go
/// before the cluster that hosts them.
pub struct Setup {
    pub kind: Kind,
    pub a: Pod,
    pub b: Pod,
    pub cluster: Cluster,
}

impl Setup {
    /// `nodes` >= 2; pods go on node0 and node1.
    pub fn build(kind: Kind, nodes: usize) -> Result<Setup> {
        Setup::build_with(kind, nodes, &[])
    }

    /// [`Setup::build`] with extra `netd run` arguments for the netd kinds.
    pub fn build_with(kind: Kind, nodes: usize, netd_args: &[&str]) -> Result<Setup> {
        let mut cluster = Cluster::new(nodes)?;
        match kind {
            Kind::NetdUdp | Kind::NetdUdpVariant => {
                cluster.write_network_config(UDP_NETWORK_CONFIG)?;
                cluster.start_netd_all(netd_args)?;
                for node in cluster.nodes_mut() {
                    node.wait_subnet_env(Duration::from_secs(30))?;
                }
                // Peers are in the datapath's table (one network route, not a
                // route per peer): the first pings below wait for them.
            }
            Kind::Netd | Kind::NetdNoMasq => {
                cluster.write_network_config(NETWORK_CONFIG)?;
                let masq = if kind == Kind::Netd { "true" } else { "false" };
                let mut args = vec!["--ip-masq", masq];
                args.extend_from_slice(netd_args);
                cluster.start_netd_all(&args)?;
                for node in cluster.nodes_mut() {
                    node.wait_subnet_env(Duration::from_secs(30))?;
                }
                // Every node must know every other before traffic flows.
                let peers = nodes - 1;
                for node in cluster.nodes() {
                    let ns = node.ns();
                    netd_tests::wait_until(
                        Duration::from_secs(30),
                        Duration::from_millis(20),
                        || Ok(ns.ip(&["route", "show", "proto", "110"])?.lines().count() == peers),
                    )
                    .with_context(|| {
                        format!("netd did not program {peers} routes on {}", node.name())
                    })?;
                }
            }
            Kind::HandVxlan => {
                for i in 0..2 {
                    write_subnet_env(&cluster, i, VXLAN_MTU)?;
                }
                hand_vxlan(&cluster)?;
            }
            Kind::Bare => {
                for i in 0..2 {
                    write_subnet_env(&cluster, i, 1500)?;
                }
                for (i, j) in [(0, 1), (1, 0)] {
                    let peer = cluster.node(j).ip().to_string();
                    cluster.node(i).ns().ip(&[
                        "route",
                        "add",
                        &pod_subnet(j),
                        "via",
                        &peer,
                        "dev",
                        "eth0",
                    ])?;
                }
            }
        }
        let a = cluster.node_mut(0).add_pod("a")?;
        let b = cluster.node_mut(1).add_pod("b")?;
        let reach =
            netd_tests::wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
                Ok(a.ping(b.ip))
            });
        if reach.is_err() {
            anyhow::bail!(
                "{}: pod a ({}) cannot ping pod b ({})",
                kind.label(),
                a.ip,
                b.ip
            );
        }
        Ok(Setup {
            kind,
            a,
            b,
            cluster,
        })
    }
}

/// Node `i`'s pod subnet in the hand-made setups: 10.244.(i+1).0/24.
fn pod_subnet(i: usize) -> String {
    format!("10.244.{}.0/24", i + 1)
}

fn write_subnet_env(cluster: &Cluster, i: usize, mtu: u32) -> Result<()> {
    let text = format!(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{}.1/24\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=false\n",
        i + 1
    );
    let path = cluster.node(i).run_dir().join("subnet.env");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// flannel's VXLAN recipe, by hand, on node0 and node1: the device with the
/// subnet's network address as a /32, and per peer a permanent neighbour
/// (peer VTEP address -> peer VTEP MAC), an FDB entry (peer VTEP MAC ->
/// peer underlay IP) and an onlink route to the peer subnet via its VTEP
/// address.
fn hand_vxlan(cluster: &Cluster) -> Result<()> {
    let mac = |i: usize| format!("0e:00:00:00:00:{:02x}", i + 1);
    let vtep = |i: usize| format!("10.244.{}.0", i + 1);
    for (i, j) in [(0, 1), (1, 0)] {
        let ns = cluster.node(i).ns();
        let local = cluster.node(i).ip().to_string();
        let mtu = VXLAN_MTU.to_string();
        #[rustfmt::skip]
        ns.ip(&["link", "add", HAND_DEV, "address", &mac(i), "mtu", &mtu, "type", "vxlan",
                "id", "1", "local", &local, "dev", "eth0", "dstport", "8472", "nolearning"])?;
        ns.ip(&["addr", "add", &format!("{}/32", vtep(i)), "dev", HAND_DEV])?;
        ns.ip(&["link", "set", HAND_DEV, "up"])?;
        #[rustfmt::skip]
        ns.ip(&["neigh", "replace", &vtep(j), "lladdr", &mac(j), "dev", HAND_DEV, "nud", "permanent"])?;
        let peer = cluster.node(j).ip().to_string();
        ns.run(&[
            "bridge",
            "fdb",
            "append",
            &mac(j),
            "dev",
            HAND_DEV,
            "dst",
            &peer,
            "self",
            "permanent",
        ])?;
        #[rustfmt::skip]
        ns.ip(&["route", "replace", &pod_subnet(j), "via", &vtep(j), "dev", HAND_DEV, "onlink"])?;
    }
    Ok(())
}

/// `ip -d link show` of the VXLAN device on node0, for the report (so the
/// reader can check that both devices have the same parameters).
pub fn vxlan_details(setup: &Setup) -> Option<String> {
    let dev = match setup.kind {
        Kind::Netd | Kind::NetdNoMasq => "netd.1",
        Kind::HandVxlan => HAND_DEV,
        Kind::NetdUdp | Kind::NetdUdpVariant => {
            let out = setup
                .cluster
                .node(0)
                .ns()
                .ip(&["-d", "link", "show", "netd-udp0"])
                .ok()?;
            let line = out
                .lines()
                .find(|l| l.trim_start().starts_with("tun"))?
                .trim();
            let mtu = out.split(" mtu ").nth(1)?.split_whitespace().next()?;
            return Some(format!(
                "mtu {mtu} {}",
                line.split(" addrgenmode").next().unwrap_or(line)
            ));
        }
        Kind::Bare => return None,
    };
    let out = setup
        .cluster
        .node(0)
        .ns()
        .ip(&["-d", "link", "show", dev])
        .ok()?;
    let line = out.lines().find(|l| l.trim_start().starts_with("vxlan"))?;
    // Up to "addrgenmode": the rest is generic link detail.
    let line = line.trim();
    Some(
        line.split(" addrgenmode")
            .next()
            .unwrap_or(line)
            .to_string(),
    )
}
