//! `netd cleanup`: removes everything netd created on this node, for uninstall: routes, devices,
//! the masquerade table, the service rules of every proxy mode, eBPF pins, the DNS addresses on
//! lo, the files netd wrote and netd-cni's address records. The etcd lease is
//! left to expire (or delete `<prefix>/subnets/<subnet>` by hand) so that cleanup needs no etcd.

use std::path::Path;

use tracing::info;

use crate::netlink::Netlink;

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error(transparent)]
    Netlink(#[from] crate::netlink::NetlinkError),
    #[error(transparent)]
    Masq(#[from] crate::masq::MasqError),
    #[error("removing netd's eBPF programs: {0}")]
    Ebpf(#[from] netd_ebpf::EbpfError),
    #[error("removing the service rules: {0}")]
    Services(#[from] netd_proxy::dataplane::DataplaneError),
    #[error("removing the DNS addresses from lo: {0}")]
    Dns(#[from] netd_dns::DnsError),
    #[error("removing {path}: {source}")]
    File { path: String, source: std::io::Error },
}

/// What was removed, for the summary line.
#[derive(Debug, Default)]
pub struct Removed {
    pub links: Vec<String>,
    pub routes: usize,
    pub files: Vec<String>,
    pub nft_table: bool,
    pub udp_fast_path: bool,
    pub ebpf_services: bool,
    /// The service dataplanes whose rules were there (`nftables`, `iptables`).
    pub service_rules: Vec<&'static str>,
    /// The DNS listen addresses netd had put on lo.
    pub lo_addresses: Vec<std::net::IpAddr>,
}

pub async fn cleanup(run_dir: &Path, state_dir: &Path, cni_conf_dir: Option<&Path>, bridge: &str, bpffs: &Path) -> Result<Removed, CleanupError> {
    let nl = Netlink::connect()?;
    let mut removed = Removed { routes: nl.del_routes_by_proto().await?, ..Default::default() };
    // Before the TUN device goes: its encapsulation program is pinned there.
    if netd_ebpf::UdpOverlay::is_pinned(bpffs) {
        netd_ebpf::UdpOverlay::remove(bpffs)?;
        info!(bpffs = %bpffs.display(), "removed the udp overlay's eBPF programs and maps");
        removed.udp_fast_path = true;
    }
    // The eBPF service dataplane (--proxy-mode ebpf): its socket programs on the cgroup and tc
    // programs on the devices are held by pinned links.
    removed.ebpf_services = netd_ebpf::EbpfBackend::remove_pins(bpffs)?;
    if removed.ebpf_services {
        info!(bpffs = %bpffs.display(), "removed the eBPF service dataplane's programs and maps");
    }
    for l in nl.links().await? {
        let ours = (l.name.starts_with("netd.") && l.kind.as_deref() == Some("vxlan"))
            || (l.name == crate::daemon::UDP_DEVICE && l.kind.as_deref() == Some("tun"))
            || l.name == bridge;
        if ours {
            nl.del_link(l.index, &l.name).await?;
            info!(link = %l.name, "removed");
            removed.links.push(l.name);
        }
    }
    removed.nft_table = crate::masq::remove_if_present()?;
    // Every mode's service rules, whichever mode ran last.
    removed.service_rules = netd_proxy::dataplane::remove_leftovers(None, "iptables-restore")?;
    // A cluster DNS IP left on lo would black-hole the next cluster DNS.
    removed.lo_addresses = netd_dns::lo::remove_ours_from_lo().await?;
    let mut files = vec![run_dir.join("subnet.env"), run_dir.join("netd.sock"), state_dir.join("subnet.env")];
    if let Some(dir) = cni_conf_dir {
        files.push(dir.join(crate::cniconf::CONFLIST_NAME));
    }
    for f in files {
        match std::fs::remove_file(&f) {
            Ok(()) => removed.files.push(f.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CleanupError::File { path: f.display().to_string(), source }),
        }
    }
    // netd-cni's address records (the conflist netd writes puts them under <state-dir>/cni).
    let ipam = state_dir.join("cni");
    match std::fs::remove_dir_all(&ipam) {
        Ok(()) => removed.files.push(ipam.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(CleanupError::File { path: ipam.display().to_string(), source }),
    }
    Ok(removed)
}
