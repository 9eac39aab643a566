//! Command-line interface. Doc comments are the `--help` text; every flag is also an env var.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "netd", version, about = "One daemon for the whole Kubernetes node network: pod overlay, services, DNS")]
pub struct Cli {
    /// Log format: text (coloured only on a terminal; NO_COLOR turns colour off) or one JSON
    /// object per line for log pipelines (the event's fields at the top level, durations as
    /// numbers: took_ms).
    #[arg(long, env = "NETD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the udp backend encapsulates packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UdpDatapath {
    /// In the kernel when it can (tc eBPF, Linux >= 6.6), else in userspace.
    Auto,
    /// In the kernel; netd fails to start the backend when it cannot.
    Ebpf,
    /// Only netd's userspace threads (TUN + UDP sockets), as flannel does.
    Userspace,
}

/// What `--proxy-mode ebpf` does on a node where the eBPF dataplane cannot run (the kernel or the
/// host lacks the hooks, the programs fail to load or attach).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EbpfFallback {
    /// Program services with nftables instead, and say so (log, `netd status`, the
    /// `netd_service_proxy_fallback` metric).
    Nftables,
    /// eBPF only: services stay unprogrammed, and that is reported the same way.
    None,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon: lease this node's pod subnet and keep the overlay programmed.
    Run(Box<RunArgs>),
    /// Say whether this node's network is healthy and, if not, why (exit 0 healthy, 1 degraded,
    /// 2 unhealthy, 3 netd not reachable).
    Status(StatusArgs),
    /// Remove everything netd created on this node (devices, routes, rules, CNI config), for uninstall.
    Cleanup(CleanupArgs),
    #[command(flatten)]
    Services(netd_proxy::registry::cli::ServiceCommand),
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// netd's runtime directory (where its status socket netd.sock lives).
    #[arg(long, env = "NETD_RUN_DIR", default_value = "/run/netd")]
    pub run_dir: PathBuf,
    /// Print the full status as JSON, for scripts.
    #[arg(long, env = "NETD_STATUS_JSON")]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct CleanupArgs {
    /// netd's runtime directory.
    #[arg(long, env = "NETD_RUN_DIR", default_value = "/run/netd")]
    pub run_dir: PathBuf,
    /// netd's state directory.
    #[arg(long, env = "NETD_STATE_DIR", default_value = "/var/lib/netd")]
    pub state_dir: PathBuf,
    /// Where netd wrote its CNI config ("" if it did not).
    #[arg(long, env = "NETD_CNI_CONF_DIR", default_value = "/etc/cni/net.d", value_parser = possibly_empty_path())]
    pub cni_conf_dir: PathBuf,
    /// The pod bridge netd-cni created.
    #[arg(long, env = "NETD_CNI_BRIDGE", default_value = "netd0")]
    pub cni_bridge: String,
    /// Where netd pinned its eBPF programs and maps.
    #[arg(long, env = "NETD_EBPF_BPFFS", default_value = "/sys/fs/bpf/netd")]
    pub ebpf_bpffs: PathBuf,
    /// Where the DaemonSet's init container installed netd-cni ("" to leave it).
    #[arg(long, env = "NETD_CNI_BIN_DIR", default_value = "/opt/cni/bin", value_parser = possibly_empty_path())]
    pub cni_bin_dir: PathBuf,
    /// List every object that would be removed, one a line, and remove nothing.
    #[arg(long, env = "NETD_CLEANUP_DRY_RUN")]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    #[command(flatten)]
    pub conn: netd_proxy::registry::EtcdConnArgs,
    /// etcd key prefix of the network (flannel's layout: <prefix>/config, <prefix>/subnets/).
    #[arg(long, env = "NETD_ETCD_PREFIX", default_value = "/coreos.com/network")]
    pub etcd_prefix: String,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// IP address other nodes reach this node at (default: the first address of --iface).
    #[arg(long, env = "NETD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// Underlay interface, by name or by IPv4 address (default: the interface of the default route).
    #[arg(long, env = "NETD_IFACE")]
    pub iface: Option<String>,
    /// This node's name (default: the hostname).
    #[arg(long, env = "NETD_NODE_NAME")]
    pub node_name: Option<String>,
    /// Runtime directory: subnet.env, the status socket.
    #[arg(long, env = "NETD_RUN_DIR", default_value = "/run/netd")]
    pub run_dir: PathBuf,
    /// Persistent state directory: the last subnet (kept across reboots).
    #[arg(long, env = "NETD_STATE_DIR", default_value = "/var/lib/netd")]
    pub state_dir: PathBuf,
    /// Renew the subnet lease this many minutes before it expires (1-1439).
    #[arg(long, env = "NETD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60,
          value_parser = clap::value_parser!(u32).range(1..=1439))]
    pub subnet_lease_renew_margin: u32,
    #[command(flatten)]
    pub kube: netd_kube::KubeArgs,
    /// The network config (flannel's net-conf.json) with `--subnet-manager kube`, where there is
    /// no etcd to hold it.
    #[arg(long, env = "NETD_NET_CONF_FILE", default_value = "/etc/netd/net-conf.json")]
    pub net_conf_file: PathBuf,
    #[command(flatten)]
    pub dns: netd_dns::Args,
    /// How this node load-balances Services: nftables (verdict maps, constant cost per packet),
    /// iptables (kube-proxy-like chains) or none (another proxy does it).
    #[arg(long, env = "NETD_PROXY_MODE", value_enum, default_value_t = netd_proxy::ProxyMode::Nftables)]
    pub proxy_mode: netd_proxy::ProxyMode,
    /// `--nodeport-addresses`, `--iptables-restore`, `--conntrack-cleanup`, `--healthz-bind-address`.
    #[command(flatten)]
    pub proxy: netd_proxy::ProxyArgs,
    /// With `--proxy-mode ebpf`: where BPF maps and links are pinned (a bpffs is mounted on its
    /// parent if needed), so a restart or upgrade adopts them without interrupting traffic.
    #[arg(long, env = "NETD_EBPF_BPFFS", default_value = "/sys/fs/bpf/netd")]
    pub ebpf_bpffs: PathBuf,
    /// With `--proxy-mode ebpf`: the cgroup v2 directory the socket load balancer is attached to
    /// (default: the cgroup v2 root, i.e. every process on the node).
    #[arg(long, env = "NETD_EBPF_CGROUP")]
    pub ebpf_cgroup: Option<PathBuf>,
    /// With `--proxy-mode ebpf`: devices NodePort/externalIP/LoadBalancer traffic from outside
    /// arrives on, comma-separated (tc programs; default: the underlay interface; `none`: no
    /// NodePort translation, ClusterIP only).
    #[arg(long, env = "NETD_EBPF_EXTERNAL_DEVICES", value_delimiter = ',')]
    pub ebpf_external_devices: Option<Vec<String>>,
    /// With `--proxy-mode ebpf`: what serves Services when eBPF cannot run on this node
    /// (`nftables`, or `none` for eBPF only).
    #[arg(long, env = "NETD_EBPF_FALLBACK", value_enum, default_value_t = EbpfFallback::Nftables)]
    pub ebpf_fallback: EbpfFallback,
    /// etcd key prefix of the service registry (<prefix>/services/<ns>/<name>, <prefix>/endpointslices/<ns>/<name>).
    #[arg(long, env = "NETD_REGISTRY_PREFIX", default_value = netd_proxy::registry::DEFAULT_PREFIX)]
    pub registry_prefix: String,
    /// Lifetime of the subnet lease in etcd (flannel's is 24h). Only for testing renewal.
    #[arg(long, env = "NETD_SUBNET_LEASE_TTL", default_value = "24h", value_parser = parse_duration, hide = true)]
    pub subnet_lease_ttl: Duration,
    /// udp backend: nice value of the datapath threads (-20..19; 0 = netd's own). Negative puts
    /// the encapsulation ahead of ordinary work on a busy node, as the kernel's VXLAN is.
    #[arg(long, env = "NETD_UDP_NICE", default_value_t = -10, allow_hyphen_values = true, value_parser = clap::value_parser!(i32).range(-20..=19))]
    pub udp_nice: i32,
    /// udp backend: encapsulate in the kernel (tc eBPF programs on the TUN device and the
    /// underlay: no copy to userspace, no thread wake-up per packet) or in userspace. The
    /// userspace datapath always runs too, for what the kernel path leaves to it (packets
    /// without a peer, datagrams from strangers, UDP GRO batches) and as the fallback.
    #[arg(long, env = "NETD_UDP_DATAPATH", value_enum, default_value_t = UdpDatapath::Auto)]
    pub udp_datapath: UdpDatapath,
    /// Masquerade pod traffic that leaves the cluster network.
    #[arg(long, env = "NETD_IP_MASQ", default_value_t = true, action = clap::ArgAction::Set)]
    pub ip_masq: bool,
    /// Directory for the CNI config 10-netd.conflist, written once the node can serve pods
    /// ("" to not write one).
    #[arg(long, env = "NETD_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Name of the pod bridge netd-cni creates on this node.
    #[arg(long, env = "NETD_CNI_BRIDGE", default_value = "netd0")]
    pub cni_bridge: String,
    /// Take a running node over from its previous network daemons without interrupting it,
    /// comma-separated: `flannel` (use flanneld's VXLAN device flannel.<VNI> with its MAC, take
    /// its routes over in place, remove its iptables chains once netd's rules are in), `kube-proxy`
    /// (remove kube-proxy's iptables chains once netd's service rules are programmed). Keep it
    /// set after the switch: netd's VXLAN device is then flannel.<VNI>. See README, Migration.
    #[arg(long, env = "NETD_TAKE_OVER", value_enum, value_delimiter = ',')]
    pub take_over: Vec<crate::takeover::Predecessor>,
    /// With `--take-over flannel`: host-local's address store of flannel's CNI network (one file
    /// per address in use), whose addresses netd-cni never hands out while pods made by
    /// flannel's CNI plugin still hold them.
    #[arg(long, env = "NETD_CNI_HOST_LOCAL_DIR", default_value = "/var/lib/cni/networks/cbr0")]
    pub cni_host_local_dir: PathBuf,
    /// Address for /metrics, /healthz and /readyz ("" to disable); localhost by default (the
    /// kubelet's probes go to the health listener, --healthz-bind-address).
    #[arg(long, env = "NETD_METRICS_LISTEN", default_value = "127.0.0.1:9402")]
    pub metrics_listen: String,
    /// How often the whole dataplane is compared against the kernel and repaired (e.g. 30s, 500ms).
    #[arg(long, env = "NETD_RESYNC_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub resync_interval: Duration,
}

/// Parses `500ms`, `30s`, `5m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 30s, 5m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("{s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A path that may be given as "" (clap's own path parser refuses an empty value).
fn possibly_empty_path() -> impl clap::builder::TypedValueParser<Value = PathBuf> {
    use clap::builder::TypedValueParser;
    clap::builder::OsStringValueParser::new().map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_run_flag_has_an_env_var() {
        let cmd = Cli::command();
        for arg in cmd.get_subcommands().flat_map(|s| s.get_arguments()) {
            if arg.get_long().is_some() && !["help", "version"].contains(&arg.get_id().as_str()) {
                let env = arg.get_env().unwrap_or_else(|| panic!("--{} has no env var", arg.get_id()));
                assert!(env.to_string_lossy().starts_with("NETD_"), "{env:?}");
            }
        }
    }

    /// Every flag the README's `netd run` table names (in any column) is a visible flag of
    /// `netd run` (what `netd run --help` lists), so the documentation cannot promise a flag
    /// the daemon lacks.
    #[test]
    fn every_flag_the_readme_documents_is_in_netd_run_help() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let table: Vec<&str> = readme.lines().skip_while(|l| !l.starts_with("| flag | default | meaning |")).take_while(|l| l.starts_with('|')).collect();
        assert!(table.len() > 10, "the README's flag table was not found");
        let mut cmd = Cli::command();
        cmd.build();
        let run = cmd.find_subcommand("run").unwrap();
        let flags: std::collections::HashSet<String> =
            run.get_arguments().filter(|a| !a.is_hide_set()).filter_map(|a| a.get_long()).map(|l| format!("--{l}")).collect();
        let mut documented = 0;
        for row in table {
            for word in row.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).filter(|w| w.starts_with("--") && w[2..].starts_with(|c: char| c.is_ascii_alphabetic())) {
                documented += 1;
                assert!(flags.contains(word), "the README documents {word}, which `netd run --help` does not list");
            }
        }
        assert!(documented > 30, "{documented}");
        for f in ["--nodeport-addresses", "--iptables-restore", "--conntrack-cleanup"] {
            assert!(readme.contains(&format!("| `{f}`")), "{f} is not in the README's table");
        }
    }

    #[test]
    fn proxy_flags_reach_netd_run() {
        let cli = Cli::try_parse_from(["netd", "run", "--nodeport-addresses", "198.18.0.10", "--iptables-restore", "iptables-nft-restore", "--conntrack-cleanup", "false"]).unwrap();
        let Command::Run(r) = cli.command else { panic!() };
        assert_eq!(r.proxy.nodeport_addresses, Some(netd_proxy::proxy::Addresses(vec![Ipv4Addr::new(198, 18, 0, 10)])));
        assert_eq!(r.proxy.iptables_restore, "iptables-nft-restore");
        assert!(!r.proxy.conntrack_cleanup);
        let cli = Cli::try_parse_from(["netd", "run", "--nodeport-addresses", ""]).unwrap();
        let Command::Run(r) = cli.command else { panic!() };
        assert_eq!(r.proxy.nodeport_addresses, Some(netd_proxy::proxy::Addresses(vec![])), "empty: every local address");
        assert!(Cli::try_parse_from(["netd", "run", "--nodeport-addresses", "198.18.0.300"]).is_err());
    }

    #[test]
    fn cleanup_takes_an_empty_dir_as_none_and_a_dry_run() {
        let cli = Cli::try_parse_from(["netd", "cleanup", "--cni-bin-dir", "", "--cni-conf-dir", "", "--dry-run"]).unwrap();
        let Command::Cleanup(c) = cli.command else { panic!() };
        assert!(c.dry_run && c.cni_bin_dir.as_os_str().is_empty() && c.cni_conf_dir.as_os_str().is_empty());
        let cli = Cli::try_parse_from(["netd", "cleanup"]).unwrap();
        let Command::Cleanup(c) = cli.command else { panic!() };
        assert!(!c.dry_run);
        assert_eq!(c.cni_bin_dir, PathBuf::from("/opt/cni/bin"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("5x").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("0s").is_err());
    }

    #[test]
    fn defaults_match_flannel() {
        let cli = Cli::try_parse_from(["netd", "run"]).unwrap();
        let Command::Run(r) = cli.command else { panic!() };
        assert_eq!(r.etcd.conn.etcd_endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(r.metrics_listen, "127.0.0.1:9402");
        assert_eq!(r.etcd.etcd_prefix, "/coreos.com/network");
        assert_eq!(r.subnet_lease_renew_margin, 60);
        assert!(Cli::try_parse_from(["netd", "run", "--subnet-lease-renew-margin", "1440"]).is_err());
        let cli = Cli::try_parse_from(["netd", "run", "--etcd-endpoints", "http://a:1,http://b:2"]).unwrap();
        let Command::Run(r) = cli.command else { panic!() };
        assert_eq!(r.etcd.conn.etcd_endpoints.len(), 2);
        let cli = Cli::try_parse_from(["netd", "run", "--take-over", "flannel,kube-proxy"]).unwrap();
        let Command::Run(r) = cli.command else { panic!() };
        assert_eq!(r.take_over, [crate::takeover::Predecessor::Flannel, crate::takeover::Predecessor::KubeProxy]);
        assert!(Cli::try_parse_from(["netd", "run", "--take-over", "calico"]).is_err());
    }
}
