//! The CNI commands: ADD, DEL, CHECK, STATUS, GC.
//!
//! Layout on the node (for subnet.env's `FLANNEL_SUBNET=10.244.7.1/24`):
//! ```text
//!   node ns:  netd0 (bridge) 10.244.7.1/24, MTU from subnet.env
//!               └─ vethXXXXXXXXXXX (hairpin on)  ── pod ns: eth0 10.244.7.N/24
//!                                                   default via 10.244.7.1
//!               └─ vethYYYYYYYYYYY (hairpin on)  ── pod ns: net1 10.244.7.M/24
//!                                                   (no second default route)
//! ```
//! The host end's name is derived from `(containerID, ifname)` and recorded
//! in the IPAM state, so DEL and GC find it without the pod's namespace.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;
use netlink_packet_route::link::InfoKind;
use serde_json::Value;

use crate::config::{result_dns, CniEnv, NetConf, Requests};
use crate::error::CniError;
use crate::ipam::{mac_for_ip, AllocError, Request, State, Store};
use crate::net::{fmt_mac, Link, NetError, Nl, VethEnd};
use crate::result::{CniResult, Interface, IpConfig, Route};
use crate::subnet::NodeSubnet;

impl From<NetError> for CniError {
    fn from(e: NetError) -> Self {
        CniError::Internal(e.to_string())
    }
}

/// FNV-1a, 64 bit: stable across builds and Rust versions (unlike std's
/// hasher), because DEL after an upgrade must find the same name.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parts.join("\0").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Host end of the attachment's veth: `veth` + 11 hex digits (15 bytes, the
/// kernel's limit).
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    format!("veth{:011x}", fnv1a(&[container_id, ifname]) >> 20)
}

/// A locally administered unicast MAC for the host end, from the same hash.
fn host_veth_mac(container_id: &str, ifname: &str) -> [u8; 6] {
    let b = fnv1a(&[container_id, ifname, "mac"]).to_be_bytes();
    [(b[0] & 0xfe) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

fn runtime() -> Result<tokio::runtime::Runtime, CniError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| CniError::Internal(format!("cannot start tokio runtime: {e}")))
}

fn open_netns(path: &Path) -> Result<File, CniError> {
    File::open(path).map_err(|e| {
        CniError::invalid_env("CNI_NETNS", format!("cannot open {}: {e}", path.display()))
    })
}

fn pod_netns(env: &CniEnv) -> Result<(&Path, File), CniError> {
    let path = env
        .netns
        .as_deref()
        .ok_or_else(|| CniError::invalid_env("CNI_NETNS", "is not set"))?;
    Ok((path, open_netns(path)?))
}

fn enter_netns(path: &Path, netns: &File) -> Result<Nl, CniError> {
    Nl::in_netns(netns).map_err(|e| match e {
        NetError::Setns(io) => CniError::invalid_env(
            "CNI_NETNS",
            format!("{} is not a network namespace: {io}", path.display()),
        ),
        other => other.into(),
    })
}

/// Sets `net.ipv4.ip_forward=1` in the node namespace if it is off: the
/// bridge is the pods' gateway. A failure is logged, not fatal.
fn ensure_ip_forward() {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    match std::fs::read_to_string(PATH) {
        Ok(v) if v.trim() == "1" => {}
        _ => {
            if let Err(e) = std::fs::write(PATH, "1") {
                eprintln!("netd-cni: warning: cannot enable {PATH}: {e}");
            }
        }
    }
}

fn node_subnet_for_add(conf: &NetConf) -> Result<NodeSubnet, CniError> {
    NodeSubnet::read(&conf.subnet_file)
        .map_err(|e| CniError::TryAgainLater(format!("{e} (is netd running on this node?)")))
}

/// The bridge, created (with the gateway address, MTU, up) if absent.
async fn ensure_bridge(nl: &Nl, name: &str, node: &NodeSubnet) -> Result<Link, CniError> {
    let mut link = nl.link(name).await?;
    if link.is_none() {
        nl.add_bridge(name, mac_for_ip(node.gateway), node.mtu)
            .await?;
        link = nl.link(name).await?;
    }
    let link =
        link.ok_or_else(|| CniError::Internal(format!("bridge {name} vanished after creation")))?;
    let bridge_kind = InfoKind::Bridge.to_string();
    if link.kind.as_deref() != Some(bridge_kind.as_str()) {
        return Err(CniError::InvalidConfig(format!(
            "field \"bridge\": link {name} exists and is not a bridge (kind {})",
            link.kind.as_deref().unwrap_or("none")
        )));
    }
    nl.add_addr(link.index, node.gateway_net(), true).await?;
    if !link.up {
        nl.set_up(link.index).await?;
    }
    Ok(link)
}

struct Plumbed {
    bridge: Link,
    host_mac: [u8; 6],
    /// Whether this interface got the pod's default route (only the first
    /// interface into a pod does).
    default_route: bool,
}

/// One attachment being set up.
struct Attach<'a> {
    netns_path: &'a Path,
    netns: &'a File,
    container_id: &'a str,
    ifname: &'a str,
    host_name: &'a str,
    ip: Ipv4Addr,
    pod_mac: [u8; 6],
}

/// Everything netlink for ADD. On failure after the veth exists, the veth
/// is deleted again (which removes both ends).
async fn plumb(conf: &NetConf, node: &NodeSubnet, at: &Attach<'_>) -> Result<Plumbed, CniError> {
    let Attach {
        netns_path,
        netns,
        container_id,
        ifname,
        host_name,
        ip,
        pod_mac,
    } = *at;
    let host = Nl::current()?;
    let pod = enter_netns(netns_path, netns)?;
    let bridge = ensure_bridge(&host, &conf.bridge, node).await?;

    let host_mac = host_veth_mac(container_id, ifname);
    let host_end = VethEnd {
        name: host_name,
        mac: host_mac,
        mtu: node.mtu,
    };
    let pod_end = VethEnd {
        name: ifname,
        mac: pod_mac,
        mtu: node.mtu,
    };
    match host
        .add_veth(&host_end, &pod_end, netns, bridge.index)
        .await
    {
        Ok(()) => {}
        Err(e) if e.is_exists() => {
            if pod.link(ifname).await?.is_some() {
                return Err(CniError::AlreadyExists(format!(
                    "interface {ifname} is already in {}",
                    netns_path.display()
                )));
            }
            // A host end left behind by an earlier, interrupted attachment.
            eprintln!("netd-cni: removing stale {host_name} before retrying");
            host.del_link(host_name).await?;
            host.add_veth(&host_end, &pod_end, netns, bridge.index)
                .await?;
        }
        Err(e) => return Err(e.into()),
    }

    let addr = Ipv4Net::new(ip, node.subnet.prefix_len())
        .map_err(|e| CniError::Internal(format!("address {ip}: {e}")))?;
    let configure_pod = async {
        let link = pod.link(ifname).await?.ok_or_else(|| {
            NetError::Other(format!(
                "{ifname} missing in the pod namespace after creation"
            ))
        })?;
        pod.set_up(link.index).await?;
        pod.add_addr(link.index, addr, false).await?;
        // Only the pod's first interface gets the default route: a second
        // one (multus' net1, ...) finds it there, whoever made it. EEXIST
        // covers two ADDs into one pod racing past the check.
        let routes = pod.routes_v4().await?;
        if routes.iter().any(|(dst, _, _)| dst.prefix_len() == 0) {
            return Ok(false);
        }
        match pod.add_default_route(link.index, node.gateway).await {
            Ok(()) => Ok(true),
            Err(e) if e.is_exists() => Ok(false),
            Err(e) => Err(e),
        }
    };
    let hairpin = async {
        let link = host
            .link(host_name)
            .await?
            .ok_or_else(|| NetError::Other(format!("{host_name} vanished after creation")))?;
        host.set_hairpin(link.index).await
    };
    let default_route = match futures::try_join!(configure_pod, hairpin) {
        Ok((default_route, ())) => default_route,
        Err(e) => {
            if let Err(del) = host.del_link(host_name).await {
                eprintln!("netd-cni: rollback: cannot delete {host_name}: {del}");
            }
            return Err(e.into());
        }
    };
    Ok(Plumbed {
        bridge,
        host_mac,
        default_route,
    })
}

pub fn add(env: &CniEnv, conf: &NetConf) -> Result<Value, CniError> {
    let (cid, ifname) = (env.container_id(), env.ifname());
    let prev = conf
        .prev_result
        .as_ref()
        .map(CniResult::parse)
        .transpose()?;
    let requests = Requests::merge(env, conf)?;
    let node = node_subnet_for_add(conf)?;
    let (netns_path, netns) = pod_netns(env)?;
    let host_name = host_veth_name(cid, ifname);

    let store = Store::new(&conf.data_dir, conf.lock_timeout);
    let request = Request {
        network: &conf.name,
        container_id: cid,
        ifname,
        host_veth: &host_name,
        ip: requests.ip.map(|r| r.value),
        mac: requests.mac.map(|r| r.value),
    };
    let foreign = crate::ipam::host_local_addresses(&conf.host_local_dirs)?;
    let (ip, pod_mac) = store
        .update(|s| s.allocate_around(node.subnet, node.gateway, &request, &foreign))?
        .map_err(|e| match e {
            AllocError::AlreadyExists(a) => CniError::AlreadyExists(format!(
                "container {cid} interface {ifname} already has address {} (ADD twice without DEL?)",
                a.ip
            )),
            AllocError::Exhausted { subnet, in_use } => CniError::TryAgainLater(format!(
                "no free address in {subnet} ({in_use} in use)"
            )),
            AllocError::Unusable(why) => match requests.ip {
                Some(r) => r.error(why),
                None => CniError::Internal(why),
            },
            AllocError::IpHeld(a) => CniError::AddressInUse(format!(
                "{} (asked for by {}) is held by {}",
                a.ip,
                requests
                    .ip
                    .map_or_else(|| "this ADD".to_string(), |r| r.source.to_string()),
                a.holder()
            )),
            AllocError::MacHeld(a) => CniError::AddressInUse(format!(
                "MAC {} ({}) is held by {}",
                fmt_mac(&a.pod_mac()),
                requests.mac.map_or_else(
                    || "derived from the address".to_string(),
                    |r| format!("asked for by {}", r.source)
                ),
                a.holder()
            )),
        })?;

    let attach = Attach {
        netns_path,
        netns: &netns,
        container_id: cid,
        ifname,
        host_name: &host_name,
        ip,
        pod_mac,
    };
    let plumbed = runtime()?.block_on(plumb(conf, &node, &attach));
    let plumbed = match plumbed {
        Ok(p) => p,
        Err(e) => {
            if let Err(rel) = store.update(|s| s.release(cid, ifname)) {
                eprintln!("netd-cni: rollback: cannot release {ip}: {rel}");
            }
            return Err(e);
        }
    };
    ensure_ip_forward();

    let mtu = Some(node.mtu);
    let ours = CniResult {
        interfaces: vec![
            Interface {
                name: conf.bridge.clone(),
                mac: plumbed.bridge.mac.clone(),
                // Not reported: a bridge's MTU follows its ports.
                ..Default::default()
            },
            Interface {
                name: host_name,
                mac: Some(fmt_mac(&plumbed.host_mac)),
                mtu,
                ..Default::default()
            },
            Interface {
                name: ifname.to_string(),
                mac: Some(fmt_mac(&pod_mac)),
                mtu,
                sandbox: Some(netns_path.display().to_string()),
                ..Default::default()
            },
        ],
        ips: vec![IpConfig {
            address: format!("{ip}/{}", node.subnet.prefix_len()),
            gateway: Some(node.gateway.to_string()),
            interface: Some(2),
            ..Default::default()
        }],
        routes: if plumbed.default_route {
            vec![Route {
                dst: "0.0.0.0/0".into(),
                gw: Some(node.gateway.to_string()),
                ..Default::default()
            }]
        } else {
            Vec::new()
        },
        dns: result_dns(
            &conf.dns,
            &conf.cluster_domain,
            env.arg("K8S_POD_NAMESPACE"),
        ),
    };
    let result = match prev {
        Some(prev) => ours.merged_after(prev),
        None => ours,
    };
    Ok(result.render(conf.cni_version))
}

pub fn del(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let (cid, ifname) = (env.container_id(), env.ifname());
    let store = Store::new(&conf.data_dir, conf.lock_timeout);
    let record = store.read()?.find(cid, ifname).cloned();
    let host_name = record
        .as_ref()
        .map(|r| r.host_veth.clone())
        .unwrap_or_else(|| host_veth_name(cid, ifname));
    // Deleting the host end removes the pod end too; the pod's namespace is
    // not needed (and may be gone).
    runtime()?.block_on(async {
        let nl = Nl::current()?;
        nl.del_link(&host_name).await
    })?;
    // Under the lock whether or not the unlocked read found a record: a read
    // racing the one-time migration of old per-network records can miss
    // one, and the release must not.
    store.update(|s| s.release(cid, ifname))?;
    Ok(())
}

pub fn check(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let (cid, ifname) = (env.container_id(), env.ifname());
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::InvalidConfig("field \"prevResult\" is required for CHECK".into()))
        .and_then(CniResult::parse)?;
    let fail = |m: String| CniError::CheckFailed(m);
    let node = NodeSubnet::read(&conf.subnet_file)
        .map_err(|e| CniError::TryAgainLater(format!("{e} (is netd running on this node?)")))?;
    let record = Store::new(&conf.data_dir, conf.lock_timeout)
        .read()?
        .find(cid, ifname)
        .cloned()
        .ok_or_else(|| {
            fail(format!(
                "no address is recorded for container {cid} interface {ifname}"
            ))
        })?;

    let pod_if = prev
        .interfaces
        .iter()
        .position(|i| i.name == ifname && i.sandbox.as_deref().is_some_and(|s| !s.is_empty()))
        .ok_or_else(|| {
            fail(format!(
                "prevResult lists no interface {ifname} in a sandbox"
            ))
        })?;
    let expected_mac = prev.interfaces[pod_if].mac.clone();
    let mut expected_addrs = Vec::new();
    for ip in prev.ips.iter().filter(|ip| ip.interface == Some(pod_if)) {
        if let Ok(net) = ip.address.parse::<Ipv4Net>() {
            expected_addrs.push(net);
        }
    }
    if !expected_addrs.iter().any(|n| n.addr() == record.ip) {
        return Err(fail(format!(
            "prevResult does not list the recorded address {} for {ifname}",
            record.ip
        )));
    }
    let gw = node.gateway;
    let expects_default = prev
        .routes
        .iter()
        .any(|r| r.dst == "0.0.0.0/0" && r.gw.as_deref().is_none_or(|g| g == gw.to_string()));

    let (netns_path, netns) = pod_netns(env)?;
    runtime()?.block_on(async {
        let pod = enter_netns(netns_path, &netns)?;
        let link = pod
            .link(ifname)
            .await?
            .ok_or_else(|| fail(format!("{ifname} is missing in {}", netns_path.display())))?;
        if let Some(mac) = &expected_mac {
            if link.mac.as_deref().map(str::to_lowercase) != Some(mac.to_lowercase()) {
                return Err(fail(format!(
                    "{ifname} has MAC {}, prevResult says {mac}",
                    link.mac.as_deref().unwrap_or("none")
                )));
            }
        }
        if !link.up {
            return Err(fail(format!("{ifname} is down")));
        }
        let have = pod.addrs_v4(link.index).await?;
        for want in &expected_addrs {
            if !have.contains(want) {
                return Err(fail(format!(
                    "{ifname} lacks address {want} (has {have:?})"
                )));
            }
        }
        if expects_default {
            let routes = pod.routes_v4().await?;
            let found = routes.iter().any(|(dst, via, oif)| {
                dst.prefix_len() == 0 && *via == Some(gw) && *oif == Some(link.index)
            });
            if !found {
                return Err(fail(format!(
                    "default route via {gw} dev {ifname} is missing"
                )));
            }
        }

        let host = Nl::current()?;
        let bridge = host
            .link(&conf.bridge)
            .await?
            .ok_or_else(|| fail(format!("bridge {} is missing", conf.bridge)))?;
        let veth = host
            .link(&record.host_veth)
            .await?
            .ok_or_else(|| fail(format!("host veth {} is missing", record.host_veth)))?;
        if veth.controller != Some(bridge.index) {
            return Err(fail(format!(
                "host veth {} is not attached to bridge {}",
                record.host_veth, conf.bridge
            )));
        }
        let bridge_addrs = host.addrs_v4(bridge.index).await?;
        if !bridge_addrs.contains(&node.gateway_net()) {
            return Err(fail(format!(
                "bridge {} lacks gateway address {}",
                conf.bridge,
                node.gateway_net()
            )));
        }
        Ok(())
    })
}

pub fn status(conf: &NetConf) -> Result<(), CniError> {
    let node = NodeSubnet::read(&conf.subnet_file)
        .map_err(|e| CniError::NotAvailable(format!("{e} (is netd running on this node?)")))?;
    let state = Store::new(&conf.data_dir, conf.lock_timeout)
        .read()
        .map_err(|e| CniError::NotAvailable(e.to_string()))?;
    let used = state.used_in(node.subnet).len();
    if used >= State::capacity(node.subnet) {
        return Err(CniError::NotAvailable(format!(
            "address pool {} is exhausted ({used} in use)",
            node.subnet
        )));
    }
    Ok(())
}

pub fn gc(conf: &NetConf) -> Result<(), CniError> {
    let valid: BTreeSet<(String, String)> = conf
        .valid_attachments
        .as_ref()
        .ok_or_else(|| {
            CniError::InvalidConfig("field \"cni.dev/valid-attachments\" is missing".into())
        })?
        .iter()
        .map(|a| (a.container_id.clone(), a.ifname.clone()))
        .collect();
    let store = Store::new(&conf.data_dir, conf.lock_timeout);
    let mut state = store.read()?;
    let stale = state.retain_valid(&conf.name, &valid);
    if stale.is_empty() {
        return Ok(());
    }
    // Interfaces first, then the addresses whose interface is surely gone:
    // an address must not be reused while a veth with it may still exist.
    let mut errors = Vec::new();
    let mut gone = Vec::new();
    runtime()?.block_on(async {
        let nl = match Nl::current() {
            Ok(nl) => nl,
            Err(e) => {
                errors.push(e.to_string());
                return;
            }
        };
        for a in &stale {
            match nl.del_link(&a.host_veth).await {
                Ok(_) => gone.push((a.container_id.clone(), a.ifname.clone())),
                Err(e) => errors.push(e.to_string()),
            }
        }
    });
    store.update(|s| {
        for (cid, ifname) in &gone {
            s.release(cid, ifname);
        }
    })?;
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CniError::Internal(format!(
            "GC released {} of {} stale attachments; errors: {}",
            gone.len(),
            stale.len(),
            errors.join("; ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_are_stable_and_fit() {
        let a = host_veth_name("c0ffee", "eth0");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("veth"));
        assert_eq!(a, host_veth_name("c0ffee", "eth0"));
        assert_ne!(a, host_veth_name("c0ffee", "eth1"));
        assert_ne!(a, host_veth_name("c0ffe", "eeth0"));
        // Pinned: a change here breaks DEL for pods added by older builds.
        assert_eq!(fnv1a(&["a"]), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn macs_are_local_unicast() {
        let m = host_veth_mac("c", "eth0");
        assert_eq!(m[0] & 0x03, 0x02);
        assert_eq!(
            mac_for_ip(Ipv4Addr::new(10, 244, 7, 5)),
            [0x0a, 0x58, 10, 244, 7, 5]
        );
        assert_eq!(mac_for_ip(Ipv4Addr::new(10, 244, 7, 5))[0] & 0x03, 0x02);
    }
}
