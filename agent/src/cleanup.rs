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
    #[error("removing iptables-nft's empty table {table}: {detail}")]
    XtTable { table: String, detail: String },
    #[error("removing {path}: {source}")]
    File { path: String, source: std::io::Error },
}

/// What was removed (or, with `--dry-run`, would be), for the summary.
#[derive(Debug, Default)]
pub struct Removed {
    pub links: Vec<String>,
    /// netd's routes (proto 110), as `DST/LEN [via GW] dev #INDEX`.
    pub routes: Vec<String>,
    pub files: Vec<String>,
    pub nft_table: bool,
    pub udp_fast_path: bool,
    pub ebpf_services: bool,
    /// The eBPF pins under the bpffs directory (maps and links; a pinned link holds a program
    /// on a cgroup or a device, so unpinning it detaches the program).
    pub pins: Vec<String>,
    /// The service dataplanes whose rules were there (`nftables`, `iptables`).
    pub service_rules: Vec<&'static str>,
    /// The DNS listen addresses netd had put on lo.
    pub lo_addresses: Vec<std::net::IpAddr>,
    /// iptables-nft's tables (`nat`, `filter`) that netd's iptables-restore created and that
    /// hold nothing once netd's chains are gone.
    pub xt_tables: Vec<String>,
}

impl Removed {
    /// One line per object, for `netd cleanup --dry-run` (and the log of a real run).
    pub fn objects(&self) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(self.routes.iter().map(|r| format!("route {r} proto 110")));
        out.extend(self.links.iter().map(|l| format!("link {l}")));
        out.extend(self.pins.iter().map(|p| format!("eBPF pin {p}")));
        if self.nft_table {
            out.push(format!("nftables table ip {}", crate::masq::TABLE));
        }
        out.extend(self.service_rules.iter().map(|m| match *m {
            "nftables" => "service rules: nftables table ip netd-proxy".to_string(),
            "iptables" => "service rules: iptables NETD-* chains and their jumps (nat, filter)".to_string(),
            other => format!("service rules: {other}"),
        }));
        out.extend(self.xt_tables.iter().map(|t| format!("nftables table ip {t} (iptables-nft's, empty without netd's chains)")));
        out.extend(self.lo_addresses.iter().map(|a| format!("address {a} on lo")));
        out.extend(self.files.iter().map(|f| format!("file {f}")));
        out
    }
}

/// Where netd's files are, for [`cleanup`].
#[derive(Debug, Clone)]
pub struct Dirs<'a> {
    pub run_dir: &'a Path,
    pub state_dir: &'a Path,
    /// Where netd wrote its conflist (`None`: it did not).
    pub cni_conf_dir: Option<&'a Path>,
    /// Where the DaemonSet's init container installed netd-cni (`None`: leave it).
    pub cni_bin_dir: Option<&'a Path>,
    pub bpffs: &'a Path,
}

/// Removes what netd made on this node; with `dry_run`, only finds it. The run and state
/// directories themselves go too when nothing else is left in them (the DaemonSet's hostPath
/// volumes create them).
pub async fn cleanup(dirs: &Dirs<'_>, bridge: &str, dry_run: bool) -> Result<Removed, CleanupError> {
    let nl = Netlink::connect()?;
    let bpffs = dirs.bpffs;
    let mut removed = Removed { routes: nl.del_routes_by_proto(dry_run).await?, pins: pins_under(bpffs), ..Default::default() };
    // Before the TUN device goes: its encapsulation program is pinned there.
    if netd_ebpf::UdpOverlay::is_pinned(bpffs) {
        if !dry_run {
            netd_ebpf::UdpOverlay::remove(bpffs)?;
            info!(bpffs = %bpffs.display(), "removed the udp overlay's eBPF programs and maps");
        }
        removed.udp_fast_path = true;
    }
    // The eBPF service dataplane (--proxy-mode ebpf): its socket programs on the cgroup and tc
    // programs on the devices are held by pinned links.
    if !dry_run {
        removed.ebpf_services = netd_ebpf::EbpfBackend::remove_pins(bpffs)?;
        if removed.ebpf_services {
            info!(bpffs = %bpffs.display(), "removed the eBPF service dataplane's programs and maps");
        }
        // Whatever else netd pinned there (a map of a newer or older version).
        remove_tree(bpffs, &mut removed)?;
    }
    for l in nl.links().await? {
        let ours = (l.name.starts_with("netd.") && l.kind.as_deref() == Some("vxlan"))
            || (l.name == crate::daemon::UDP_DEVICE && l.kind.as_deref() == Some("tun"))
            || l.name == bridge;
        if ours {
            if !dry_run {
                nl.del_link(l.index, &l.name).await?;
                info!(link = %l.name, "removed");
            }
            removed.links.push(l.name);
        }
    }
    removed.nft_table = crate::masq::remove_if_present(dry_run)?;
    // Every mode's service rules, whichever mode ran last.
    removed.service_rules = if dry_run {
        netd_proxy::dataplane::leftovers("iptables-restore")?
    } else {
        netd_proxy::dataplane::remove_leftovers(None, "iptables-restore")?
    };
    if removed.service_rules.contains(&"iptables") {
        removed.xt_tables = remove_empty_xt_tables(dry_run)?;
    }
    // A cluster DNS IP left on lo would black-hole the next cluster DNS.
    removed.lo_addresses = netd_dns::lo::remove_ours_from_lo(dry_run).await?;
    let mut files = vec![
        dirs.run_dir.join("subnet.env"),
        dirs.run_dir.join("netd.sock"),
        dirs.run_dir.join(netd_dns::handover::SOCKET_NAME),
        dirs.state_dir.join("subnet.env"),
    ];
    if let Some(dir) = dirs.cni_conf_dir {
        files.push(dir.join(crate::cniconf::CONFLIST_NAME));
    }
    if let Some(dir) = dirs.cni_bin_dir {
        files.push(dir.join("netd-cni"));
        // portmap only if it is the copy the init container installed: the same bytes as the
        // image's own (cleanup runs from the image). One the host brought (kubeadm's
        // kubernetes-cni) differs and stays.
        let ours = dir.join("portmap");
        if same_contents(&ours, Path::new(IMAGE_PORTMAP)) {
            files.push(ours);
        }
    }
    for f in files {
        if !f.exists() {
            continue;
        }
        if !dry_run {
            std::fs::remove_file(&f).map_err(|source| CleanupError::File { path: f.display().to_string(), source })?;
        }
        removed.files.push(f.display().to_string());
    }
    // netd-cni's address records (the conflist netd writes puts them under <state-dir>/cni).
    let ipam = dirs.state_dir.join("cni");
    if ipam.exists() {
        if !dry_run {
            std::fs::remove_dir_all(&ipam).map_err(|source| CleanupError::File { path: ipam.display().to_string(), source })?;
        }
        removed.files.push(format!("{}/", ipam.display()));
    }
    for dir in [dirs.run_dir, dirs.state_dir] {
        let empty = std::fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(false);
        // In a dry run the dir is empty once what is listed above is gone.
        let would_be_empty = dry_run && std::fs::read_dir(dir).is_ok_and(|d| {
            d.flatten().all(|e| removed.files.iter().any(|f| f.trim_end_matches('/') == e.path().display().to_string()))
        });
        // A directory that is a mount point (the DaemonSet's hostPath volume, when cleanup runs
        // in its pod) stays: it is the volume's, and the kubelet made it.
        if (empty || would_be_empty) && !is_mount_point(dir) {
            if !dry_run {
                match std::fs::remove_dir(dir) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
                    Err(source) => return Err(CleanupError::File { path: dir.display().to_string(), source }),
                }
            }
            removed.files.push(format!("{}/", dir.display()));
        }
    }
    Ok(removed)
}

/// Whether `dir` is on another file system than its parent (a volume mounted there).
fn is_mount_point(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let parent = dir.parent().unwrap_or(Path::new("/"));
    match (std::fs::metadata(dir), std::fs::metadata(parent)) {
        (Ok(d), Ok(p)) => d.dev() != p.dev(),
        _ => false,
    }
}

/// Every pin under `dir` (files, recursively), for the dry run and the summary.
fn pins_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                _ => out.push(e.path().display().to_string()),
            }
        }
    }
    out.sort();
    out
}

/// Unpins whatever is still under `dir` and removes it (the directory is netd's own:
/// `--ebpf-bpffs`, default /sys/fs/bpf/netd).
fn remove_tree(dir: &Path, removed: &mut Removed) -> Result<(), CleanupError> {
    if !dir.exists() {
        return Ok(());
    }
    std::fs::remove_dir_all(dir).map_err(|source| CleanupError::File { path: dir.display().to_string(), source })?;
    removed.files.push(format!("{}/", dir.display()));
    Ok(())
}

/// iptables-nft creates `table ip nat` and `table ip filter` (with its built-in chains) on the
/// first iptables-restore into them; when netd's restore made them, they are left empty (no
/// rule, every policy ACCEPT) once its chains are gone. Those are deleted so that nothing of
/// netd's is left; a table with anything in it, or the legacy backend's (which always exist),
/// is left alone. Returns the tables (to be) removed.
fn remove_empty_xt_tables(dry_run: bool) -> Result<Vec<String>, CleanupError> {
    let version = std::process::Command::new("iptables-save").arg("--version").output();
    if !version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("nf_tables")) {
        return Ok(Vec::new());
    }
    let mut removed = Vec::new();
    for table in ["nat", "filter"] {
        let out = std::process::Command::new("iptables-save")
            .args(["-t", table])
            .output()
            .map_err(|e| CleanupError::XtTable { table: table.into(), detail: format!("iptables-save -t {table}: {e}") })?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !xt_table_is_empty(&text) {
            continue;
        }
        // iptables-save lists a table it has never seen as empty too: only an existing one goes.
        if std::process::Command::new("nft").args(["list", "table", "ip", table]).output().map_or(true, |o| !o.status.success()) {
            continue;
        }
        if !dry_run {
            let o = std::process::Command::new("nft")
                .args(["delete", "table", "ip", table])
                .output()
                .map_err(|e| CleanupError::XtTable { table: table.into(), detail: e.to_string() })?;
            if !o.status.success() {
                return Err(CleanupError::XtTable { table: table.into(), detail: String::from_utf8_lossy(&o.stderr).trim().to_string() });
            }
            info!(table, "removed iptables-nft's empty table");
        }
        removed.push(table.to_string());
    }
    Ok(removed)
}

/// An `iptables-save -t T` dump with no rule, no chain of anyone's and every policy ACCEPT, once
/// netd's `NETD-*` chains and the jumps to them are gone (they are, except in a dry run).
fn xt_table_is_empty(save: &str) -> bool {
    const BUILTIN: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];
    let ours = |l: &str| l.contains("NETD-");
    save.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('*') && *l != "COMMIT" && !ours(l)).all(|l| {
        let mut w = l.trim_start_matches(':').split_whitespace();
        l.starts_with(':') && w.next().is_some_and(|c| BUILTIN.contains(&c)) && w.next() == Some("ACCEPT")
    })
}


/// Where the image keeps Debian's portmap plugin, which the init container copies to the host.
const IMAGE_PORTMAP: &str = "/usr/lib/cni/portmap";

/// Whether both files exist with the same contents.
fn same_contents(a: &Path, b: &Path) -> bool {
    match (std::fs::read(a), std::fs::read(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_xt_table_is_empty_only_without_rules_chains_or_drop_policies() {
        let empty = "# Generated\n*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [3:180]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";
        assert!(xt_table_is_empty(empty));
        assert!(!xt_table_is_empty(&empty.replace("COMMIT", "-A OUTPUT -j ACCEPT\nCOMMIT")));
        assert!(!xt_table_is_empty(&empty.replace("COMMIT", ":KUBE-SERVICES - [0:0]\nCOMMIT")));
        assert!(!xt_table_is_empty(&empty.replace(":INPUT ACCEPT", ":INPUT DROP")));
        assert!(xt_table_is_empty(&empty.replace("COMMIT", ":NETD-SERVICES - [0:0]\n-A OUTPUT -j NETD-SERVICES\nCOMMIT")));
    }
}
