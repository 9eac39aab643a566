//! `netd run`: the node daemon's control loop.
//!
//! sources (etcd list + watch) -> `Snapshot` (swapped whole through a watch channel) ->
//! pure planners (`alloc`, `overlay`, `masq`) -> thin appliers (`netlink`, nft).
//! Every reconcile recomputes the desired state from the whole snapshot and applies only the
//! difference from what the kernel has; a periodic resync repairs drift. When etcd is away the
//! last snapshot stays in force and nothing is torn down.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use netd_common::report::millis;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::alloc::{self, Choice};
use crate::cli::{RunArgs, UdpDatapath};
use crate::lease::{LeaseAttrs, Mac, VxlanData};
use crate::masq::{MasqSpec, Masquerade};
use crate::netconf::{BackendKind, NetworkConfig};
use crate::netlink::{self, Netlink, NetlinkError, VxlanSpec};
use crate::overlay::{self, LocalNode, Op, OtherRoutes, OverlayState, RouteConflict, Via};
use crate::overlay_text::Devices;
use crate::registry::{EtcdOptions, EtcdRegistry, Entry, RegistryError, Snapshot};
use crate::server::{self, unix_now, Shared};
use crate::status::{self, NodeStatus, Phase};
use crate::subnet_env::SubnetEnv;
use crate::takeover::Predecessor;


#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("underlay interface: {0}")]
    Underlay(String),
    #[error(transparent)]
    Alloc(#[from] alloc::AllocError),
    #[error("could not acquire a subnet lease: {0}")]
    Acquire(String),
    #[error("writing {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(transparent)]
    SubnetEnv(#[from] crate::subnet_env::SubnetEnvError),
    #[error(transparent)]
    Masq(#[from] crate::masq::MasqError),
    #[error(transparent)]
    Server(#[from] server::ServerError),
    #[error("overlay backend: {0}")]
    Backend(String),
    #[error("Kubernetes API: {0}")]
    Kube(String),
}

/// The underlay this node talks to peers over.
#[derive(Debug, Clone)]
struct Underlay {
    index: u32,
    name: String,
    mtu: u32,
    /// Address encapsulated packets are sent from.
    iface_ip: Ipv4Addr,
    /// Address peers send to (`--public-ip`, else `iface_ip`).
    public_ip: Ipv4Addr,
    prefixes: Vec<Ipv4Net>,
    /// The VTEP MAC taken over from flanneld (`--take-over flannel`): its device's, else the one
    /// in this node's lease, so that peers still on flannel keep reaching this node through
    /// the neighbour and FDB entries they have. `None`: netd's own ([`Mac::for_vtep`]).
    vtep_mac: Option<Mac>,
}

/// Our lease as we last wrote it.
#[derive(Debug, Clone)]
struct Held {
    subnet: Ipv4Net,
    attrs: LeaseAttrs,
    reservation: bool,
    mod_revision: i64,
    renew_at: Option<Instant>,
}

pub struct Daemon {
    args: RunArgs,
    nl: Netlink,
    /// The etcd registry of subnet leases; `None` with `--subnet-manager kube`.
    reg: Option<EtcdRegistry>,
    underlay: Underlay,
    cfg: NetworkConfig,
    held: Held,
    /// The overlay device: the VXLAN device, or the udp backend's TUN device.
    dev_index: u32,
    /// The udp backend's userspace datapath, while that backend is in use.
    udp: Option<netd_udp::UdpDatapath>,
    udp_seen: netd_udp::UdpStats,
    /// The udp backend's kernel fast path (tc eBPF), while it runs.
    udp_fast: Option<netd_ebpf::UdpOverlay>,
    udp_fast_seen: netd_ebpf::UdpOverlayStats,
    /// What the fast path was last started for (config, TUN ifindex, underlay ifindex), also
    /// when starting it failed: it is tried again only when that changes.
    udp_fast_for: Option<(netd_ebpf::UdpOverlayConfig, u32, u32)>,
    /// Where the udp backend's packets are encapsulated, for the status.
    udp_datapath: Option<String>,
    masq: Masquerade,
    last_skipped: Vec<String>,
    shared: Arc<Shared>,
}

/// The VXLAN device: netd's own, or with `--take-over flannel` flanneld's (by the name
/// flanneld gives it), which netd then keeps using.
fn vxlan_name(vni: u32, flannel: bool) -> String {
    if flannel {
        format!("flannel.{vni}")
    } else {
        format!("netd.{vni}")
    }
}

/// The backend's device: the VXLAN device, or the udp backend's TUN device.
fn overlay_device(cfg: &NetworkConfig, flannel: bool) -> String {
    match cfg.backend.kind {
        BackendKind::Vxlan => vxlan_name(cfg.backend.vni, flannel),
        BackendKind::Udp => UDP_DEVICE.to_string(),
    }
}

/// Overlay changes logged one per line in one sync; a node joining a large cluster logs the rest
/// at debug level.
const LOGGED_CHANGES: usize = 50;

/// How long a netd that handed its DNS sockets over waits on SIGTERM for the queries it took.
const DNS_DRAIN: Duration = Duration::from_secs(5);
/// How long a netd stopped while its successor starts waits for the DNS handover.
const SUCCESSOR_WAIT: Duration = Duration::from_secs(30);

/// The inode of a file (`None` when it is gone): tells our status socket from a successor's.
fn inode(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// The udp backend's TUN device.
pub(crate) const UDP_DEVICE: &str = "netd-udp0";

/// Backoff for retries against etcd: quick at first, capped, so a returning etcd is noticed fast.
struct Backoff(Duration);
impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(100))
    }
    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
    }
}

pub async fn run(args: RunArgs) -> Result<(), DaemonError> {
    // Before anything opens a descriptor or runs a command (they are not close-on-exec yet).
    let dns_from_systemd = if args.dns.dns { crate::systemd::take_dns_listen_fds() } else { Vec::new() };
    let node = args.node_name.clone().unwrap_or_else(hostname);
    let shared = Shared::new(NodeStatus {
        node: node.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_at: unix_now(),
        // No etcd at all with Node-based subnets (unless services come from its registry).
        etcd: status::EtcdStatus {
            endpoints: if args.kube.subnet_manager == netd_kube::SubnetManagerKind::Kube { Vec::new() } else { args.etcd.conn.etcd_endpoints.clone() },
            ..Default::default()
        },
        ..Default::default()
    });
    shared.set_ready(|r| r.cni_config = (!args.cni_conf_dir.as_os_str().is_empty()).then_some(false));
    shared.set_ready(|r| r.dns = args.dns.dns.then_some(false));
    let notifier = crate::systemd::Notifier::from_env();
    if let Some(n) = &notifier {
        tokio::spawn(crate::systemd::notify_when_ready(n.clone(), shared.clone()));
    }
    // Up before anything else, so `netd status` can say what a starting node is waiting for.
    let status_socket = args.run_dir.join("netd.sock");
    server::serve_status(status_socket.clone(), shared.clone()).await?;
    let status_inode = inode(&status_socket);
    if !args.metrics_listen.is_empty() {
        server::serve_metrics(args.metrics_listen.clone(), shared.clone()).await?;
    }
    if !args.proxy.healthz_bind_address.is_empty() {
        server::serve_health(&args.proxy.healthz_bind_address, shared.clone()).await?;
    }
    let nl = Netlink::connect()?;
    let mut underlay = resolve_underlay(&nl, &args, &shared).await?;
    info!(%node, iface = %underlay.name, iface_ip = %underlay.iface_ip, public_ip = %underlay.public_ip, mtu = underlay.mtu, "underlay");
    enable_ip_forward();

    let opts = args.etcd.conn.options(&args.etcd.etcd_prefix);
    let (reg, cfg, held, snap, kube_rx) = match args.kube.subnet_manager {
        netd_kube::SubnetManagerKind::Etcd => {
            let reg = connect_etcd(&opts).await?;
            let (cfg, snap) = wait_for_config(&reg, &shared).await;
            underlay.vtep_mac = flannel_vtep_mac(&nl, &args, &cfg, &underlay, &snap).await?;
            let held = acquire(&reg, &cfg, &underlay, &args, &snap, &shared).await?;
            (Some(reg), cfg, held, snap, None)
        }
        netd_kube::SubnetManagerKind::Kube => {
            let (cfg, held, snap, rx) = kube_subnets(&args, &node, &nl, &mut underlay, &shared).await?;
            (None, cfg, held, snap, Some(rx))
        }
    };
    let mut d = Daemon { args, nl, reg, underlay, cfg, held, dev_index: 0, udp: None, udp_seen: Default::default(), udp_fast: None, udp_fast_seen: Default::default(), udp_fast_for: None, udp_datapath: None, masq: Masquerade::new(), last_skipped: Vec::new(), shared };
    d.setup_backend().await?;
    d.sync_host_rules()?;
    if d.takes_over(Predecessor::Flannel) {
        // netd's masquerade and forward rules are in: flanneld's can go.
        let restore = netd_proxy::ProxyConfig::new(netd_proxy::NodeInfo::default(), d.args.proxy_mode).iptables_restore;
        crate::takeover::remove_in_background(Predecessor::Flannel, restore, d.shared.clone()).await;
    }
    d.write_subnet_env()?;
    d.write_cni_conf();
    d.shared.update(|s| s.phase = Phase::Running);
    info!(subnet = %d.held.subnet, backend = %d.cfg.backend.kind.as_str(), "node network ready");

    let mut rx = match (&d.reg, kube_rx) {
        (Some(reg), _) => {
            let (tx, rx) = watch::channel(Arc::new(snap));
            tokio::spawn(watch_registry(reg.clone(), tx, d.shared.clone()));
            rx
        }
        (None, Some(rx)) => rx,
        (None, None) => unreachable!("one subnet manager is chosen"),
    };
    // Before the proxy's first sync, so that two modes never answer for the same Service. With
    // `--proxy-mode ebpf` the proxy does it once it knows which mode runs (eBPF, or its fallback):
    // a restarted node that falls back again keeps its nftables rules meanwhile.
    if d.args.proxy_mode != netd_proxy::ProxyMode::Ebpf || d.args.ebpf_fallback == crate::cli::EbpfFallback::None {
        crate::services::remove_other_modes(d.args.proxy_mode, &d.args.proxy, d.args.ebpf_bpffs.clone(), d.shared.clone()).await;
    }
    let dns_server: Arc<std::sync::OnceLock<Arc<netd_dns::DnsServer>>> = Arc::default();
    if d.args.proxy_mode != netd_proxy::ProxyMode::None || d.args.dns.dns {
        let opts = d.args.etcd.conn.options(&d.args.registry_prefix);
        let node = netd_proxy::NodeInfo {
            name: node.clone(),
            ips: if d.underlay.iface_ip == d.underlay.public_ip { vec![d.underlay.iface_ip] } else { vec![d.underlay.iface_ip, d.underlay.public_ip] },
            pod_cidr: Some(d.held.subnet),
            cluster_cidr: Some(d.cfg.network),
            // The cluster DNS VIP is answered on this node (it is on lo), never load-balanced.
            local_service_ips: match (d.args.dns.dns, d.args.dns.cluster_dns_ip) {
                (true, Some(std::net::IpAddr::V4(ip))) => vec![ip],
                _ => Vec::new(),
            },
        };
        // Not ready until services are programmed: a pod scheduled here may need them at once.
        if d.args.proxy_mode != netd_proxy::ProxyMode::None {
            d.shared.set_ready(|r| r.first_service_sync = Some(false));
        }
        let (dns_args, network) = (d.args.dns.clone(), d.cfg.network);
        let (mode, resync, shared, fallback) = (d.args.proxy_mode, d.args.resync_interval, d.shared.clone(), d.args.ebpf_fallback);
        let proxy_args = d.args.proxy.clone();
        let ebpf = (mode == netd_proxy::ProxyMode::Ebpf).then(|| netd_ebpf::EbpfConfig {
            bpffs_dir: d.args.ebpf_bpffs.clone(),
            mount_bpffs: true,
            cgroup: Some(d.args.ebpf_cgroup.clone().unwrap_or_else(netd_ebpf::default_cgroup)),
            external_devices: match &d.args.ebpf_external_devices {
                None => vec![d.underlay.name.clone()],
                Some(devs) => devs.iter().filter(|x| !x.is_empty() && x.as_str() != "none").cloned().collect(),
            },
            // Replies of connections SNATed to remote backends come back through the overlay
            // (unless NodePort translation is off altogether).
            overlay_device: (d.args.ebpf_external_devices.as_deref() != Some(&["none".to_string()][..])).then(|| overlay_device(&d.cfg, d.takes_over(Predecessor::Flannel))),
        });
        let kube = d.args.kube.clone();
        let take_over_kube_proxy = d.takes_over(Predecessor::KubeProxy);
        let dns_start = dns_args.dns.then(|| crate::services::DnsStart {
            args: dns_args.clone(),
            network,
            run_dir: d.args.run_dir.clone(),
            from_systemd: dns_from_systemd,
            slot: dns_server.clone(),
        });
        let sky_opts = opts.clone();
        tokio::spawn(async move {
            // DNS binds and forwards before the service source is listed, which may take long or
            // fail for as long as etcd or the API server is away. Taking a predecessor's (or
            // systemd's) sockets over waits for the first zone instead: until then the
            // predecessor answers (or the queries wait in the sockets), where we would answer
            // SERVFAIL for every cluster name.
            let (mut dns, mut takes_over) = (None, None);
            match dns_start {
                Some(start) if start.takes_over() => takes_over = Some(start),
                Some(start) => dns = start.start(None, &shared).await,
                None => {}
            }
            if let Some((dns, dns_args)) = &dns {
                crate::skydns::spawn(dns.clone(), dns_args, sky_opts.clone(), shared.clone());
            }
            let snapshots = match kube.source {
                netd_kube::SourceKind::Etcd => crate::services::start_source(opts, shared.clone()).await,
                netd_kube::SourceKind::Kubernetes => match netd_kube::client(&kube).await {
                    Ok((client, api)) => {
                        shared.update(|s| s.api_endpoint = Some(api));
                        crate::services::start_kube_source(client, shared.clone()).await
                    }
                    Err(e) => {
                        error!(error = %e, "cannot build a Kubernetes API client; services are not programmed");
                        shared.update(|s| s.problems.push(format!("Kubernetes API client: {e}")));
                        if let Some(start) = takes_over {
                            start.start(None, &shared).await;
                        }
                        return;
                    }
                },
            };
            if let Some(start) = takes_over {
                // The settings in effect (--dns-config applied); start reports a bad file.
                let zone_cfg = start.args.effective().map(|a| a.zone_config()).unwrap_or_else(|_| start.args.zone_config());
                let zone = crate::services::first_zone(zone_cfg, &snapshots).await;
                dns = start.start(zone, &shared).await;
                if let Some((dns, dns_args)) = &dns {
                    crate::skydns::spawn(dns.clone(), dns_args, sky_opts.clone(), shared.clone());
                }
            }
            if let Some((dns, dns_args)) = dns {
                crate::services::serve_zone(dns, dns_args.zone_config(), snapshots.clone(), shared.clone());
            }
            if mode != netd_proxy::ProxyMode::None {
                crate::services::spawn_proxy(mode, &proxy_args, ebpf.map(|cfg| (cfg, fallback)), node, resync, snapshots, take_over_kube_proxy, shared);
            }
        });
    }

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| DaemonError::Io { path: "SIGTERM handler".into(), source })?;
    let mut resync = tokio::time::interval(d.args.resync_interval);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let renew_at = d.held.renew_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(86400 * 365));
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            changed = rx.changed() => {
                if changed.is_err() { break; }
                let snap = rx.borrow_and_update().clone();
                d.reconcile(&snap, false).await;
            }
            _ = resync.tick() => {
                let snap = rx.borrow().clone();
                d.reconcile(&snap, true).await;
            }
            _ = tokio::time::sleep_until(renew_at.into()) => d.renew().await,
        }
    }
    if let Some(n) = &notifier {
        if let Err(e) = n.send("STOPPING=1", &[]) {
            warn!(error = %e, "cannot tell systemd netd is stopping");
        }
    }
    // Stopped while a successor is starting (it has replaced our status socket, the first thing
    // it does): wait for it to take the DNS sockets over rather than close them under it.
    if let Some(dns) = dns_server.get().filter(|dns| d.args.dns.dns_handover && !dns.retired()).cloned() {
        if inode(&status_socket) != status_inode {
            info!("a successor is starting; waiting for it to take the DNS sockets over");
            let deadline = Instant::now() + SUCCESSOR_WAIT;
            while !dns.retired() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // After a handover the successor reads the DNS sockets; what this process took (forwards in
    // flight, TCP connections it accepted) is answered before it exits.
    if let Some(dns) = dns_server.get().filter(|d| d.retired()).cloned() {
        let drained = tokio::task::spawn_blocking(move || dns.drain(DNS_DRAIN)).await.unwrap_or(false);
        info!(drained, "DNS handed over; queries in flight answered");
    }
    // The dataplane stays as it is: routes, FDB, rules and the device keep carrying traffic
    // while netd is down, and the next netd adopts them.
    info!("shutting down; the dataplane is left in place");
    Ok(())
}

/// `--subnet-manager kube`, flannel's kube subnet manager: the network config from
/// `--net-conf-file`, this node's subnet from its Node's `spec.podCIDR`, our backend data published
/// in the Node's annotations, and the peers from every Node's annotations, turned into the same
/// `Snapshot` the etcd registry produces (so the same planners program the same dataplane).
async fn kube_subnets(
    args: &RunArgs,
    node: &str,
    nl: &Netlink,
    underlay: &mut Underlay,
    shared: &Arc<Shared>,
) -> Result<(NetworkConfig, Held, Snapshot, watch::Receiver<Arc<Snapshot>>), DaemonError> {
    let kube_err = |e: netd_kube::KubeError| DaemonError::Kube(e.to_string());
    let (client, api) = netd_kube::client(&args.kube).await.map_err(kube_err)?;
    info!(url = %api.url, from = %api.from, "Kubernetes API server");
    shared.update(|s| s.api_endpoint = Some(api));
    let path = &args.net_conf_file;
    let mut backoff = Backoff::new();
    let mut last = String::new();
    let (cfg, text) = loop {
        let complaint = match std::fs::read_to_string(path) {
            Err(e) => format!("waiting for the network config file {}: {e}", path.display()),
            Ok(text) => match NetworkConfig::parse(&text) {
                Ok(cfg) => break (cfg, text),
                Err(e) => format!("invalid network config in {}: {e}", path.display()),
            },
        };
        if complaint != last {
            error!("{complaint}");
            shared.update(|s| s.problems = vec![complaint.clone()]);
            last = complaint;
        }
        backoff.wait().await;
    };
    shared.update(|s| s.problems.clear());
    info!(network = %cfg.network, backend = %cfg.backend.kind.as_str(), "network config from {}", path.display());
    let subnet = netd_kube::node_subnet(&client, node).await.map_err(kube_err)?;
    if !cfg.network.contains(&subnet.network()) {
        return Err(DaemonError::Kube(format!("node {node}'s podCIDR {subnet} is outside the network {}", cfg.network)));
    }
    underlay.vtep_mac = flannel_vtep_mac(nl, args, &cfg, underlay, &Snapshot::default()).await?;
    let attrs = our_attrs(&cfg, underlay);
    let names = netd_kube::Annotations::new(&args.kube.kube_annotation_prefix).map_err(kube_err)?;
    let node_attrs = netd_kube::NodeAttrs {
        public_ip: underlay.public_ip,
        backend_type: attrs.backend_type.clone(),
        backend_data: attrs.backend_data.clone(),
    };
    let mut backoff = Backoff::new();
    loop {
        match netd_kube::publish_annotations(&client, node, &names, &node_attrs).await {
            Ok(ip) => {
                info!(%node, %subnet, public_ip = %ip, "node annotations published");
                break;
            }
            Err(e) => {
                warn!(error = %e, %node, "publishing node annotations failed; retrying");
                backoff.wait().await;
            }
        }
    }
    shared.metrics.lease_acquisitions.inc();
    shared.update(|s| {
        s.lease = Some(status::LeaseStatus {
            subnet: subnet.to_string(),
            public_ip: underlay.public_ip.to_string(),
            reservation: true,
            expires_at: None,
            renew_at: None,
            last_renewal: None,
            acquired_at: unix_now(),
        })
    });
    shared.set_ready(|r| r.lease = true);
    let held = Held { subnet, attrs, reservation: true, mod_revision: 0, renew_at: None };

    let (nodes_tx, mut nodes_rx) = watch::channel(Arc::new(Vec::<netd_kube::NodeLease>::new()));
    let (status_tx, mut status_rx) = watch::channel(netd_kube::SourceStatus::default());
    tokio::spawn(netd_kube::run_node_watch(client, names, nodes_tx, status_tx));
    let to_snapshot = move |leases: &[netd_kube::NodeLease]| -> Snapshot {
        let subnets = leases
            .iter()
            .map(|l| {
                let attrs = LeaseAttrs {
                    public_ip: l.public_ip,
                    public_ipv6: None,
                    backend_type: l.backend_type.clone(),
                    backend_data: l.backend_data.clone(),
                    backend_v6_data: None,
                };
                let key = format!("node/{}", l.node);
                (key.clone(), Entry::Lease(crate::lease::Lease { key, subnet: l.subnet, attrs, etcd_lease: None, mod_revision: 0 }))
            })
            .collect();
        Snapshot { config: Some(text.clone()), subnets, revision: 0 }
    };
    let first = to_snapshot(&[]);
    let (tx, rx) = watch::channel(Arc::new(first.clone()));
    let shared2 = shared.clone();
    tokio::spawn(async move {
        while status_rx.changed().await.is_ok() {
            let st = status_rx.borrow_and_update().clone();
            shared2.update(|s| {
                s.api_server = Some(status::ApiServerStatus {
                    connected: st.connected,
                    synced: st.synced,
                    last_error: st.last_error.clone(),
                    objects: st.objects,
                    relists_after_410: st.expired,
                })
            });
        }
    });
    tokio::spawn(async move {
        while nodes_rx.changed().await.is_ok() {
            let leases = nodes_rx.borrow_and_update().clone();
            if tx.send(Arc::new(to_snapshot(&leases))).is_err() {
                return;
            }
        }
    });
    Ok((cfg, held, first, rx))
}

async fn connect_etcd(opts: &EtcdOptions) -> Result<EtcdRegistry, DaemonError> {
    let mut backoff = Backoff::new();
    loop {
        match EtcdRegistry::connect(opts).await {
            Ok(r) => return Ok(r),
            Err(e @ (RegistryError::TlsFile { .. } | RegistryError::Tls(_))) => return Err(e.into()),
            Err(e) => {
                warn!(error = %e, "etcd not reachable yet; retrying");
                backoff.wait().await;
            }
        }
    }
}

/// Waits until `<prefix>/config` exists and is valid, saying what is wrong while it is not.
async fn wait_for_config(reg: &EtcdRegistry, shared: &Shared) -> (NetworkConfig, Snapshot) {
    let mut backoff = Backoff::new();
    let mut last_complaint = String::new();
    loop {
        let res = reg.snapshot().await;
        etcd_result(shared, res.as_ref().map(|s| s.revision).map_err(|e| e.to_string()));
        let complaint = match res {
            Err(e) => format!("cannot read the network config: {e}"),
            Ok(snap) => match snap.config.as_deref().map(NetworkConfig::parse) {
                None => format!("waiting for the network config: no key {} in etcd", reg.config_key()),
                Some(Err(e)) => format!("invalid network config at {}: {e}", reg.config_key()),
                Some(Ok(cfg)) => {
                    info!(network = %cfg.network, subnet_len = cfg.subnet_len, backend = %cfg.backend.kind.as_str(), "network config");
                    shared.update(|s| s.problems.clear());
                    return (cfg, snap);
                }
            },
        };
        if complaint != last_complaint {
            error!("{complaint}");
            shared.update(|s| s.problems = vec![complaint.clone()]);
            last_complaint = complaint;
        }
        backoff.wait().await;
    }
}

fn previous_subnet(args: &RunArgs) -> Option<Ipv4Net> {
    [args.run_dir.join("subnet.env"), args.state_dir.join("subnet.env")]
        .iter()
        .find_map(|p| SubnetEnv::read(p).ok())
        .map(|e| e.subnet)
}

fn our_attrs(cfg: &NetworkConfig, underlay: &Underlay) -> LeaseAttrs {
    match cfg.backend.kind {
        BackendKind::Vxlan => {
            let mac = underlay.vtep_mac.unwrap_or_else(|| Mac::for_vtep(underlay.public_ip, cfg.backend.vni));
            LeaseAttrs::vxlan(underlay.public_ip, &VxlanData { vni: cfg.backend.vni, vtep_mac: mac })
        }
        BackendKind::Udp => LeaseAttrs::udp(underlay.public_ip),
    }
}

/// With `--take-over flannel` and the vxlan backend: the MAC of flanneld's device if it is there,
/// else the `VtepMAC` of this node's lease (same public IP, flannel's reuse rule) in `snap`.
async fn flannel_vtep_mac(nl: &Netlink, args: &RunArgs, cfg: &NetworkConfig, underlay: &Underlay, snap: &Snapshot) -> Result<Option<Mac>, DaemonError> {
    if !args.take_over.contains(&Predecessor::Flannel) || cfg.backend.kind != BackendKind::Vxlan {
        return Ok(None);
    }
    let name = vxlan_name(cfg.backend.vni, true);
    if let Some(mac) = nl.link_by_name(&name).await?.and_then(|l| l.mac) {
        info!(device = %name, %mac, "taking over flanneld's VXLAN device and its MAC");
        return Ok(Some(mac));
    }
    let leased = snap.leases().into_iter().filter(|l| l.attrs.public_ip == underlay.public_ip).find_map(|l| l.attrs.vxlan_data().and_then(Result::ok));
    if let Some(d) = &leased {
        info!(device = %name, mac = %d.vtep_mac, "no flanneld VXLAN device; creating it with the VtepMAC of this node's lease");
    }
    Ok(leased.map(|d| d.vtep_mac))
}

fn renew_deadline(ttl: Option<i64>, margin_min: u32) -> Option<Instant> {
    let ttl = Duration::from_secs(ttl?.max(0) as u64);
    let margin = Duration::from_secs(u64::from(margin_min) * 60);
    // If the lease is shorter than the margin (a small TTL set by hand), renew at half-life.
    Some(Instant::now() + if ttl > margin { ttl - margin } else { ttl / 2 })
}

/// Acquires our subnet: our existing lease or reservation, else the previous subnet, else a random
/// free one; each new key is created in a create-if-absent transaction and retried on a race.
async fn acquire(reg: &EtcdRegistry, cfg: &NetworkConfig, underlay: &Underlay, args: &RunArgs, first: &Snapshot, shared: &Shared) -> Result<Held, DaemonError> {
    let attrs = our_attrs(cfg, underlay);
    let previous = previous_subnet(args);
    let mut snap = first.clone();
    let mut backoff = Backoff::new();
    for attempt in 0.. {
        if attempt > 0 {
            match reg.snapshot().await {
                Ok(s) => snap = s,
                Err(e) => {
                    warn!(error = %e, "listing leases failed; retrying");
                    backoff.wait().await;
                    continue;
                }
            }
        }
        if attempt > 50 {
            return Err(DaemonError::Acquire("lost the create race 50 times in a row".into()));
        }
        for (key, reason) in snap.malformed() {
            warn!(%key, %reason, "skipping malformed subnet key");
        }
        let taken = snap.taken();
        let plan = alloc::choose(cfg, &taken, underlay.public_ip, previous, &mut rand::thread_rng())?;
        for stale in &plan.stale_own {
            warn!(subnet = %stale, "deleting our old lease: it does not fit the network config any more");
            reg.delete(stale).await?;
        }
        let ttl = args.subnet_lease_ttl.as_secs().max(1) as i64;
        let (subnet, res, reservation) = match plan.choice {
            Choice::Existing { subnet, reservation: true } => {
                let lease = snap.leases().into_iter().find(|l| l.subnet == subnet).expect("chosen from snapshot");
                let ok = lease.attrs == attrs || reg.update_reservation(&subnet, &attrs, lease.mod_revision).await?;
                (subnet, ok.then_some(crate::registry::Held { etcd_lease: None, ttl: None }), true)
            }
            Choice::Existing { subnet, reservation: false } => {
                let lease = snap.leases().into_iter().find(|l| l.subnet == subnet).expect("chosen from snapshot");
                info!(%subnet, "found our lease (same public IP); renewing it");
                (subnet, reg.renew(&subnet, &attrs, ttl, lease.mod_revision).await?, false)
            }
            Choice::New(subnet) => (subnet, reg.create(&subnet, &attrs, ttl).await?, false),
        };
        let Some(h) = res else {
            debug!(%subnet, "subnet was taken meanwhile; choosing again");
            continue;
        };
        // Read back the key's revision so the renewal's compare-and-swap has the right base.
        let now = reg.snapshot().await?;
        let mod_revision = match now.subnets.get(&reg.subnet_key(&subnet)) {
            Some(Entry::Lease(l)) if l.attrs == attrs => l.mod_revision,
            _ => continue,
        };
        let kind = if reservation { "reservation" } else { "lease" };
        info!(%subnet, ttl_s = h.ttl, "acquired subnet {kind}");
        let expires_at = h.ttl.map(|t| unix_now() + t.max(0) as u64);
        let renew_in = renew_deadline(h.ttl, args.subnet_lease_renew_margin).map(|at| at.saturating_duration_since(Instant::now()).as_secs());
        shared.metrics.lease_acquisitions.inc();
        shared.metrics.lease_expiry.set(expires_at.unwrap_or(0) as i64);
        shared.update(|s| {
            s.lease = Some(status::LeaseStatus {
                subnet: subnet.to_string(),
                public_ip: underlay.public_ip.to_string(),
                reservation,
                expires_at,
                renew_at: renew_in.map(|r| unix_now() + r),
                last_renewal: None,
                acquired_at: unix_now(),
            })
        });
        shared.set_ready(|r| r.lease = true);
        return Ok(Held { subnet, attrs, reservation, mod_revision, renew_at: renew_deadline(h.ttl, args.subnet_lease_renew_margin) });
    }
    unreachable!("the loop only ends by returning")
}

impl Daemon {
    fn takes_over(&self, who: Predecessor) -> bool {
        self.args.take_over.contains(&who)
    }

    fn local_node(&self) -> LocalNode {
        LocalNode {
            subnet: self.held.subnet,
            public_ip: self.underlay.public_ip,
            vni: self.cfg.backend.vni,
            network: self.cfg.network,
            subnet_len: self.cfg.subnet_len,
            direct_routing: self.cfg.backend.direct_routing,
            underlay_prefixes: self.underlay.prefixes.clone(),
        }
    }

    /// IPv4 addresses the node-local DNS server answers on (none when DNS is off).
    fn dns_ips(&self) -> Vec<Ipv4Addr> {
        if !self.args.dns.dns {
            return Vec::new();
        }
        self.args
            .dns
            .listen_addrs()
            .iter()
            .filter_map(|a| match a.ip() {
                std::net::IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
                _ => None,
            })
            .collect()
    }

    fn overlay_mtu(&self) -> u32 {
        self.cfg.backend.mtu.unwrap_or(self.underlay.mtu) - self.cfg.backend.kind.encap_overhead()
    }

    /// Sets up the configured backend's device (removing the other backend's, after a switch)
    /// and gives it the subnet's network address as a /32.
    async fn setup_backend(&mut self) -> Result<(), DaemonError> {
        let (index, name, mtu) = match self.cfg.backend.kind {
            BackendKind::Vxlan => {
                self.remove_udp_device().await?;
                self.setup_vxlan().await?
            }
            BackendKind::Udp => {
                self.remove_vxlan_devices().await?;
                self.setup_udp().await?
            }
        };
        let want = Ipv4Net::new(self.held.subnet.network(), 32).expect("/32");
        let have = self.nl.addrs_v4(index).await?;
        if !have.contains(&want) {
            self.nl.add_addr(index, want).await?;
        }
        for stale in have.iter().filter(|a| **a != want && self.cfg.network.contains(&a.addr())) {
            info!(device = %name, addr = %stale, "removing stale address");
            self.nl.del_addr(index, *stale).await?;
        }
        self.dev_index = index;
        let (cfg, underlay, datapath) = (&self.cfg, &self.underlay, &self.udp_datapath);
        self.shared.update(|s| {
            s.backend = Some(status::BackendStatus {
                kind: cfg.backend.kind.as_str().into(),
                device: name.clone(),
                device_present: true,
                vni: cfg.backend.vni,
                port: cfg.backend.port,
                mtu,
                underlay: underlay.name.clone(),
                datapath: (cfg.backend.kind == BackendKind::Udp).then(|| datapath.clone()).flatten(),
            })
        });
        Ok(())
    }

    /// Starts the udp datapath (TUN device + sockets) unless it runs with the same parameters.
    async fn setup_udp(&mut self) -> Result<(u32, String, u32), DaemonError> {
        let mtu = self.overlay_mtu();
        let want = netd_udp::UdpConfig {
            tun_name: UDP_DEVICE.into(),
            mtu,
            local_ip: self.underlay.iface_ip,
            port: self.cfg.backend.port,
            // The device outlives netd: a restart adopts it, with its address and route, and
            // traffic resumes as soon as the new datapath runs.
            persist: true,
            nice: self.args.udp_nice,
            ..Default::default()
        };
        let running = self.udp.as_ref().is_some_and(|dp| dp.local_addr().port() == want.port && dp.local_addr().ip() == &want.local_ip);
        let link = self.nl.link_by_name(UDP_DEVICE).await?;
        let up = link.as_ref().is_some_and(|l| l.up && l.mtu == mtu);
        if let (true, Some(l)) = (running, &link) {
            if !up {
                self.nl.set_link(l.index, mtu, None).await?;
                if let Some(dp) = &self.udp {
                    dp.set_mtu(mtu);
                }
            }
        } else {
            if let Some(dp) = self.udp.take() {
                dp.stop();
            }
            let dp = match netd_udp::UdpDatapath::start(want.clone()) {
                Ok(dp) => dp,
                // A device of that name we cannot attach to (not a multi-queue TUN with our
                // flags): replace it.
                Err(netd_udp::UdpError::TunOpen { source, .. }) if link.is_some() => {
                    let l = link.as_ref().expect("checked");
                    warn!(device = %UDP_DEVICE, error = %source, "cannot attach to the existing device; recreating it");
                    self.nl.del_link(l.index, &l.name).await?;
                    netd_udp::UdpDatapath::start(want).map_err(|e| DaemonError::Backend(e.to_string()))?
                }
                Err(e) => return Err(DaemonError::Backend(e.to_string())),
            };
            let f = dp.features();
            let how = if dp.adopted() { "adopted the TUN device" } else { "created the TUN device" };
            info!(device = %UDP_DEVICE, port = self.cfg.backend.port, mtu, workers = f.workers, udp_gso = f.udp_gso, udp_gro = f.udp_gro, "started the udp datapath ({how})");
            self.udp = Some(dp);
        }
        let l = self.nl.link_by_name(UDP_DEVICE).await?.ok_or_else(|| NetlinkError::Other(format!("{UDP_DEVICE} vanished after creation")))?;
        self.setup_udp_fast(l.index)?;
        Ok((l.index, UDP_DEVICE.to_string(), mtu))
    }

    /// Starts the kernel fast path of the udp backend (`--udp-datapath`) unless it runs for
    /// the same devices and parameters. With `auto`, a kernel that cannot run it leaves the
    /// userspace datapath doing everything, and the status says why.
    fn setup_udp_fast(&mut self, tun_index: u32) -> Result<(), DaemonError> {
        let bpffs = self.args.ebpf_bpffs.clone();
        if self.args.udp_datapath == UdpDatapath::Userspace {
            self.udp_fast = None;
            self.udp_fast_for = None;
            if netd_ebpf::UdpOverlay::is_pinned(&bpffs) {
                info!("removing the udp backend's kernel fast path (--udp-datapath userspace)");
                netd_ebpf::UdpOverlay::remove(&bpffs).map_err(|e| DaemonError::Backend(e.to_string()))?;
            }
            self.udp_datapath = Some("userspace (--udp-datapath userspace)".into());
            return Ok(());
        }
        let want = netd_ebpf::UdpOverlayConfig {
            bpffs_dir: bpffs.clone(),
            mount_bpffs: true,
            tun_device: UDP_DEVICE.into(),
            underlay_device: self.underlay.name.clone(),
            local_ip: self.underlay.iface_ip,
            port: self.cfg.backend.port,
        };
        let key = (want.clone(), tun_index, self.underlay.index);
        if self.udp_fast_for.as_ref() == Some(&key) {
            return Ok(());
        }
        self.udp_fast = None;
        self.udp_fast_for = Some(key);
        match netd_ebpf::UdpOverlay::start(want) {
            Ok(fast) => {
                info!(device = %UDP_DEVICE, underlay = %self.underlay.name, "udp backend: packets are encapsulated in the kernel (tc eBPF); the userspace datapath takes the rest");
                // The pinned counters outlive netd: count from here.
                self.udp_fast_seen = fast.stats().unwrap_or_default();
                self.udp_fast = Some(fast);
                self.udp_datapath = Some("kernel (tc eBPF), userspace for the rest".into());
                Ok(())
            }
            Err(e) if self.args.udp_datapath == UdpDatapath::Auto => {
                warn!(error = %e, "udp backend: the kernel fast path cannot run here; the userspace datapath carries everything");
                // Whatever a partial start (or an older netd) left pinned would encapsulate
                // with stale settings.
                if let Err(e) = netd_ebpf::UdpOverlay::remove(&bpffs) {
                    warn!(error = %e, "removing the udp fast path's pins");
                }
                self.udp_datapath = Some(format!("userspace (kernel fast path unavailable: {e})"));
                Ok(())
            }
            Err(e) => {
                // Tried again at the next sync: `ebpf` insists.
                self.udp_fast_for = None;
                self.udp_datapath = Some(format!("userspace (--udp-datapath ebpf, but the kernel fast path failed: {e})"));
                Err(DaemonError::Backend(format!("--udp-datapath ebpf: {e}")))
            }
        }
    }

    /// Stops the udp datapath and removes its (persistent) device, also one left by an earlier
    /// netd run (after a switch to vxlan).
    async fn remove_udp_device(&mut self) -> Result<(), DaemonError> {
        self.udp_fast = None;
        self.udp_fast_for = None;
        self.udp_datapath = None;
        if netd_ebpf::UdpOverlay::is_pinned(&self.args.ebpf_bpffs) {
            info!("removing the udp backend's kernel fast path (backend switched to vxlan)");
            netd_ebpf::UdpOverlay::remove(&self.args.ebpf_bpffs).map_err(|e| DaemonError::Backend(e.to_string()))?;
        }
        if let Some(dp) = self.udp.take() {
            info!(device = %dp.tun_name(), "stopping the udp datapath and removing its device (backend switched to vxlan)");
            if let Err(e) = dp.remove() {
                warn!(error = %e, "clearing the TUN device's persist flag failed; deleting it instead");
            }
        }
        if let Some(l) = self.nl.link_by_name(UDP_DEVICE).await? {
            info!(device = %UDP_DEVICE, "removing the udp backend's device of the previous config");
            match self.nl.del_link(l.index, &l.name).await {
                Err(e) if !e.is_not_found() => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes every `netd.*` VXLAN device (after a switch to the udp backend or a VNI change).
    async fn remove_vxlan_devices(&self) -> Result<(), DaemonError> {
        let keep = (self.cfg.backend.kind == BackendKind::Vxlan).then(|| vxlan_name(self.cfg.backend.vni, self.takes_over(Predecessor::Flannel)));
        for l in self.nl.links().await? {
            if l.name.starts_with("netd.") && l.kind.as_deref() == Some("vxlan") && Some(&l.name) != keep.as_ref() {
                info!(device = %l.name, "removing the VXLAN device of the previous config");
                self.nl.del_link(l.index, &l.name).await?;
            }
        }
        Ok(())
    }

    /// Creates or adopts the VXLAN device.
    async fn setup_vxlan(&mut self) -> Result<(u32, String, u32), DaemonError> {
        let name = vxlan_name(self.cfg.backend.vni, self.takes_over(Predecessor::Flannel));
        let spec = VxlanSpec {
            vni: self.cfg.backend.vni,
            local: Some(self.underlay.iface_ip),
            port: self.cfg.backend.port,
            underlay_index: Some(self.underlay.index),
            learning: false,
        };
        let mac = self.underlay.vtep_mac.unwrap_or_else(|| Mac::for_vtep(self.underlay.public_ip, self.cfg.backend.vni));
        let mtu = self.overlay_mtu();
        let index = match self.nl.link_by_name(&name).await? {
            Some(l) if netlink::vxlan_matches(&l, &spec) => {
                if l.mtu != mtu || l.mac != Some(mac) || !l.up {
                    self.nl.set_link(l.index, mtu, Some(mac)).await?;
                }
                debug!(device = %name, "adopted existing VXLAN device");
                l.index
            }
            other => {
                if let Some(l) = other {
                    let have = l.vxlan.as_ref().map_or_else(|| "not a VXLAN device".to_string(), |v| v.to_string());
                    warn!(device = %name, %have, want = %spec, "VXLAN device has other parameters; recreating it");
                    self.nl.del_link(l.index, &name).await?;
                }
                self.nl.add_vxlan(&name, &spec, mac, mtu).await?;
                let l = self.nl.link_by_name(&name).await?.ok_or_else(|| NetlinkError::Other(format!("{name} vanished after creation")))?;
                info!(device = %name, vni = spec.vni, port = spec.port, %mac, mtu, "created VXLAN device");
                l.index
            }
        };
        Ok((index, name, mtu))
    }

    fn sync_host_rules(&mut self) -> Result<(), DaemonError> {
        let spec = MasqSpec {
            network: self.cfg.network,
            subnet: self.held.subnet,
            masquerade: self.args.ip_masq,
            overlay_port: Some(self.cfg.backend.port),
            dns_ips: self.dns_ips(),
        };
        if self.masq.sync(&spec)? {
            info!(masquerade = spec.masquerade, "programmed nftables table ip netd");
        }
        Ok(())
    }

    fn write_subnet_env(&self) -> Result<(), DaemonError> {
        let env = SubnetEnv { network: self.cfg.network, subnet: self.held.subnet, mtu: self.overlay_mtu(), ipmasq: self.args.ip_masq };
        let path = self.args.run_dir.join("subnet.env");
        if env.write(&path)? {
            info!(path = %path.display(), "wrote subnet.env");
        }
        // A copy in the state dir survives reboots (run dirs are tmpfs): the node asks for the
        // same subnet again so its pods' addresses stay valid.
        env.write(&self.args.state_dir.join("subnet.env"))?;
        self.shared.update(|s| s.files.subnet_env = Some(path.display().to_string()));
        self.shared.set_ready(|r| r.subnet_env = true);
        Ok(())
    }

    /// The CNI config, only now that the lease and subnet.env exist. A failure is reported (and
    /// retried at the next resync) but does not stop the overlay.
    fn write_cni_conf(&self) {
        if self.args.cni_conf_dir.as_os_str().is_empty() {
            return;
        }
        // Pods resolve through this node's DNS: the cluster DNS IP if set, else the listen address.
        let dns_ips = self.dns_ips();
        let nameserver = dns_ips.last().copied();
        let conf = crate::cniconf::CniConf {
            subnet_file: self.args.run_dir.join("subnet.env"),
            data_dir: self.args.state_dir.join("cni"),
            bridge: self.args.cni_bridge.clone(),
            nameserver,
            cluster_domain: self.args.dns.cluster_domain.clone(),
            // Pods made by flannel's CNI plugin keep their host-local addresses.
            host_local_dirs: if self.takes_over(Predecessor::Flannel) { vec![self.args.cni_host_local_dir.clone()] } else { Vec::new() },
        };
        let path = self.args.cni_conf_dir.join(crate::cniconf::CONFLIST_NAME);
        match conf.write(&self.args.cni_conf_dir) {
            Ok(wrote) => {
                if wrote {
                    info!(path = %path.display(), "wrote CNI config");
                }
                self.shared.update(|s| s.files.cni_conflist = Some(path.display().to_string()));
                // netd-cni keeps one IPAM record store per node, for every network name:
                // <dataDir>/_node/state.json.
                let state = conf.data_dir.join("_node").join("state.json");
                *self.shared.cni_state.write().unwrap_or_else(|p| p.into_inner()) = Some((state, self.held.subnet.prefix_len()));
                self.shared.set_ready(|r| r.cni_config = Some(true));
            }
            Err(e) => error!(path = %path.display(), error = %e, "writing the CNI config failed; pods cannot start on this node"),
        }
    }

    /// One level-triggered pass: config, our lease, the overlay, host rules.
    async fn reconcile(&mut self, snap: &Snapshot, full: bool) {
        let started = Instant::now();
        if let Err(e) = self.reconcile_inner(snap, full).await {
            error!(error = %e, "reconcile failed; keeping the current dataplane and retrying at the next resync");
            self.shared.metrics.sync_errors.inc();
            let msg = e.to_string();
            self.shared.update(|s| {
                s.last_sync = Some(status::SyncStatus {
                    at: unix_now(),
                    duration_ms: started.elapsed().as_secs_f64() * 1000.0,
                    changes: 0,
                    errors: vec![msg],
                })
            });
        }
        debug!(elapsed = ?started.elapsed(), full, revision = snap.revision, "reconciled");
    }

    async fn reconcile_inner(&mut self, snap: &Snapshot, full: bool) -> Result<(), DaemonError> {
        // Config: a valid change is taken; an invalid one is reported and the old one kept.
        if let Some(text) = &snap.config {
            match NetworkConfig::parse(text) {
                Ok(cfg) if cfg != self.cfg => {
                    self.shared.update(|s| s.problems.clear());
                    self.config_changed(cfg, snap).await?
                }
                Ok(_) => self.shared.update(|s| s.problems.clear()),
                Err(e) => {
                    let msg = format!("ignoring invalid network config update (keeping the previous one): {e}");
                    if self.shared.snapshot().problems.first() != Some(&msg) {
                        warn!("{msg}");
                    }
                    self.shared.update(|s| s.problems = vec![msg]);
                }
            }
        }
        // Our lease: still there and still ours? If not, take it back, loudly.
        let Some(reg) = &self.reg else {
            // Node-based subnets: the Node's podCIDR is ours for as long as the Node exists.
            self.sync_overlay(snap).await?;
            if full {
                self.sync_host_rules()?;
                self.write_subnet_env()?;
                self.write_cni_conf();
            }
            return Ok(());
        };
        let key = reg.subnet_key(&self.held.subnet);
        match snap.subnets.get(&key) {
            Some(Entry::Lease(l)) if l.attrs == self.held.attrs => {
                if l.mod_revision > self.held.mod_revision {
                    self.held.mod_revision = l.mod_revision;
                }
            }
            _ if snap.revision <= self.held.mod_revision => {} // snapshot older than our last write
            other => {
                let what = match other {
                    None => "was revoked or expired".to_string(),
                    Some(Entry::Lease(l)) => format!("now names {} as its holder", l.attrs.public_ip),
                    Some(Entry::Malformed { reason, .. }) => format!("was overwritten with a malformed value ({reason})"),
                };
                error!(subnet = %self.held.subnet, "our subnet lease {what}; re-acquiring");
                self.reacquire(snap).await?;
            }
        }
        if full {
            // Repairs the device itself: brought down, MTU or address changed by hand.
            self.setup_backend().await?;
        }
        self.sync_overlay(snap).await?;
        if full {
            self.sync_host_rules()?;
            self.write_subnet_env()?;
            self.write_cni_conf();
        }
        Ok(())
    }

    async fn reacquire(&mut self, snap: &Snapshot) -> Result<(), DaemonError> {
        let old = self.held.subnet;
        let Some(reg) = &self.reg else { return Ok(()) };
        self.held = acquire(reg, &self.cfg, &self.underlay, &self.args, snap, &self.shared).await?;
        if self.held.subnet != old {
            warn!(old = %old, new = %self.held.subnet, "this node's subnet changed: pods on it need new addresses");
        } else {
            warn!(subnet = %old, "re-acquired the same subnet");
        }
        self.setup_backend().await?;
        self.sync_host_rules()?;
        self.write_subnet_env()?;
        self.write_cni_conf();
        Ok(())
    }

    async fn config_changed(&mut self, cfg: NetworkConfig, snap: &Snapshot) -> Result<(), DaemonError> {
        info!(backend = %cfg.backend.kind.as_str(), network = %cfg.network, subnet_len = cfg.subnet_len, vni = cfg.backend.vni, "network config changed");
        let lease_fits = cfg.allows(&self.held.subnet);
        self.cfg = cfg;
        self.held.attrs = our_attrs(&self.cfg, &self.underlay);
        if lease_fits {
            // Publish the new attributes (VNI) and adjust the device.
            if let Some(reg) = &self.reg {
            if let Some(Entry::Lease(l)) = snap.subnets.get(&reg.subnet_key(&self.held.subnet)) {
                let ttl = self.args.subnet_lease_ttl.as_secs().max(1) as i64;
                if l.attrs != self.held.attrs
                    && !self.held.reservation
                    && reg.renew(&self.held.subnet, &self.held.attrs, ttl, l.mod_revision).await?.is_some()
                {
                    self.held.mod_revision = reg.snapshot().await?.revision;
                }
            }
            }
            self.setup_backend().await?;
            self.sync_host_rules()?;
            self.write_subnet_env()?;
        } else {
            self.reacquire(snap).await?;
        }
        // A new VNI or backend means a new device; the old one (and its routes) must go.
        self.remove_vxlan_devices().await?;
        Ok(())
    }

    async fn renew(&mut self) {
        let ttl = self.args.subnet_lease_ttl.as_secs().max(1) as i64;
        let h = self.held.clone();
        let Some(reg) = self.reg.clone() else { return };
        match reg.renew(&h.subnet, &h.attrs, ttl, h.mod_revision).await {
            Ok(Some(held)) => {
                info!(subnet = %h.subnet, "renewed subnet lease");
                self.held.renew_at = renew_deadline(held.ttl, self.args.subnet_lease_renew_margin);
                let expires_at = held.ttl.map(|t| unix_now() + t.max(0) as u64);
                let renew_at = self.held.renew_at.map(|at| unix_now() + at.saturating_duration_since(Instant::now()).as_secs());
                self.shared.metrics.renewal("ok");
                self.shared.metrics.lease_expiry.set(expires_at.unwrap_or(0) as i64);
                self.shared.update(|s| {
                    if let Some(l) = &mut s.lease {
                        l.expires_at = expires_at;
                        l.renew_at = renew_at;
                        l.last_renewal = Some(unix_now());
                    }
                });
                if let Ok(s) = reg.snapshot().await {
                    if let Some(Entry::Lease(l)) = s.subnets.get(&reg.subnet_key(&h.subnet)) {
                        self.held.mod_revision = l.mod_revision;
                    }
                }
            }
            Ok(None) => {
                // The watch will show the key gone or changed, and reconcile re-acquires.
                warn!(subnet = %h.subnet, "lease changed under us during renewal");
                self.held.renew_at = Some(Instant::now() + Duration::from_secs(5));
            }
            Err(e) => {
                error!(error = %e, "renewing the subnet lease failed; retrying in 1 minute");
                self.shared.metrics.renewal("error");
                self.held.renew_at = Some(Instant::now() + Duration::from_secs(60));
            }
        }
    }

    /// netd's overlay state as the kernel has it, and the other routes of the main table.
    async fn observe(&self) -> Result<(OverlayState, OtherRoutes), DaemonError> {
        let (routes, others) = self.nl.main_routes(self.dev_index, self.underlay.index, self.takes_over(Predecessor::Flannel)).await?;
        let neighs = self.nl.permanent_neighs(self.dev_index).await?;
        let fdb = self.nl.fdb_entries(self.dev_index).await?;
        Ok((OverlayState { neighs, fdb, routes }, others))
    }

    async fn sync_overlay(&mut self, snap: &Snapshot) -> Result<(), DaemonError> {
        let started = Instant::now();
        let leases = snap.leases();
        let (want, skipped) = match self.cfg.backend.kind {
            BackendKind::Vxlan => overlay::desired(&self.local_node(), &leases),
            BackendKind::Udp => {
                let (want, peers, skipped) = overlay::desired_udp(&self.local_node(), &leases);
                if let Some(dp) = &self.udp {
                    dp.set_peers(&peers);
                }
                if let Some(fast) = &mut self.udp_fast {
                    let takes_super: std::collections::HashSet<Ipv4Net> = leases.iter().filter(|l| l.attrs.udp_super_packets()).map(|l| l.subnet).collect();
                    let entries: Vec<_> = peers.iter().map(|(net, ip)| netd_ebpf::udp::UdpPeerEntry { net: net.network(), prefix_len: net.prefix_len(), ip: *ip, super_packets: takes_super.contains(net) }).collect();
                    if let Err(e) = fast.set_peers(&entries) {
                        // The userspace datapath has the new peers; the kernel's may be stale.
                        // Hand everything to userspace until the next sync starts it again.
                        warn!(error = %e, "udp fast path: updating the peers failed; removing it, the userspace datapath carries everything");
                        self.shared.metrics.sync_errors.inc();
                        self.udp_fast = None;
                        // Started anew at the next sync.
                        self.udp_fast_for = None;
                        if let Err(e) = netd_ebpf::UdpOverlay::remove(&self.args.ebpf_bpffs) {
                            warn!(error = %e, "removing the udp fast path's pins");
                        }
                        self.udp_datapath = Some(format!("userspace (kernel fast path removed: {e})"));
                    }
                }
                self.record_udp_stats();
                (want, skipped)
            }
        };
        let udp_peers: Vec<Ipv4Net> = match self.cfg.backend.kind {
            BackendKind::Udp => leases
                .iter()
                .filter(|l| l.subnet != self.held.subnet && !skipped.iter().any(|s| s.key == l.key))
                .map(|l| l.subnet)
                .collect(),
            BackendKind::Vxlan => Vec::new(),
        };
        let malformed = snap.malformed();
        let (have, others) = match self.observe().await {
            Ok(h) => h,
            Err(DaemonError::Netlink(e)) if e.is_not_found() => {
                warn!("VXLAN device is gone; recreating it");
                self.setup_backend().await?;
                self.observe().await?
            }
            Err(e) => return Err(e),
        };
        let overlay::Changes { ops, conflicts } = overlay::diff(&want, &have, &others);
        let conflicts = self.describe_conflicts(&conflicts).await;
        // Logged once per change (a resync that finds the same leases and routes says nothing).
        let report: Vec<String> = skipped
            .iter()
            .map(|s| format!("skipping subnet key {} ({}): {}", s.key, s.subnet, s.reason))
            .chain(malformed.iter().map(|(k, r)| format!("skipping malformed subnet key {k}: {r}")))
            .chain(conflicts.iter().map(|c| format!("not programming the route to {}: {}", c.subnet, c.reason)))
            .collect();
        if report != self.last_skipped {
            for r in &report {
                warn!("{r}");
            }
            self.last_skipped = report;
        }
        let overlay_dev = overlay_device(&self.cfg, self.takes_over(Predecessor::Flannel));
        let devices = Devices { overlay: &overlay_dev, underlay: &self.underlay.name };
        let mut failed: Vec<(&Op, String)> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            match self.apply(op).await {
                Ok(()) => {
                    self.shared.metrics.change(op_name(op));
                    if i < LOGGED_CHANGES {
                        info!("{}", op.done(devices));
                    } else {
                        debug!("{}", op.done(devices));
                    }
                }
                Err(e) => {
                    error!(error = %e, "cannot {}", op.todo(devices));
                    self.shared.metrics.sync_errors.inc();
                    failed.push((op, e.to_string()));
                }
            }
        }
        if !ops.is_empty() {
            let listed = if ops.len() > LOGGED_CHANGES { format!(" (the first {LOGGED_CHANGES} changes are listed above, all of them with NETD_LOG=netd=debug)") } else { String::new() };
            info!(changes = ops.len(), failed = failed.len(), took_ms = millis(started.elapsed()), "overlay updated{listed}");
        }
        // A peer counts as programmed unless a change for its route, neighbor or FDB entry failed.
        let failed_for = |net: &Ipv4Net, gw: Ipv4Addr| {
            failed.iter().any(|(op, _)| match op {
                Op::AddRoute(n, _) | Op::SetRoute(n, _) => n == net,
                Op::SetNeigh(ip, _) => *ip == gw,
                Op::SetFdb(mac, _) => want.neighs.get(&gw) == Some(mac),
                _ => false,
            })
        };
        let conflicted = |net: &Ipv4Net| conflicts.iter().any(|c| c.subnet == net.to_string());
        let mut peers: Vec<status::PeerStatus> = leases
            .iter()
            .filter(|l| l.subnet != self.held.subnet)
            .map(|l| {
                let skip = skipped.iter().find(|s| s.key == l.key).map(|s| s.reason.clone());
                let programmed = match want.routes.get(&l.subnet) {
                    Some(r) => !failed_for(&l.subnet, r.gateway) && !conflicted(&l.subnet),
                    // udp: the peer is in the datapath's table, reached through the network route.
                    None => udp_peers.contains(&l.subnet) && !failed_for(&self.cfg.network, Ipv4Addr::UNSPECIFIED) && !conflicted(&self.cfg.network),
                };
                status::PeerStatus { key: l.key.clone(), subnet: l.subnet.to_string(), public_ip: l.attrs.public_ip.to_string(), programmed, skipped: skip }
            })
            .collect();
        peers.sort_by(|a, b| a.subnet.cmp(&b.subnet));
        let elapsed = started.elapsed();
        let m = &self.shared.metrics;
        m.sync_duration.observe(elapsed.as_secs_f64());
        let peer_count = if self.cfg.backend.kind == BackendKind::Udp { udp_peers.len() } else { want.routes.len().saturating_sub(conflicts.len()) };
        m.peers.set(peer_count as i64);
        m.peers_skipped.set(skipped.len() as i64);
        m.malformed_keys.set(malformed.len() as i64);
        m.route_conflicts.set(conflicts.len() as i64);
        let errors: Vec<String> = failed.iter().map(|(op, e)| format!("{}: {e}", op.todo(devices))).collect();
        let changes = ops.len();
        self.shared.update(|s| {
            s.peers = peers;
            s.malformed_keys = malformed;
            s.route_conflicts = conflicts;
            if let Some(b) = &mut s.backend {
                b.device_present = true;
            }
            s.last_sync = Some(status::SyncStatus { at: unix_now(), duration_ms: elapsed.as_secs_f64() * 1000.0, changes, errors });
        });
        Ok(())
    }

    /// The conflicts as `netd status` reports them, naming the routes that are in the way by
    /// their interfaces' names.
    async fn describe_conflicts(&self, conflicts: &[RouteConflict]) -> Vec<status::RouteConflictStatus> {
        if conflicts.is_empty() {
            return Vec::new();
        }
        // Names only help the operator; without them the routes are named by interface index.
        let links = self.nl.links().await.unwrap_or_default();
        let name = |i: u32| links.iter().find(|l| l.index == i).map(|l| l.name.clone());
        conflicts
            .iter()
            .map(|c| {
                let existing: Vec<String> = c.existing.iter().map(|r| r.describe(c.net, name)).collect();
                status::RouteConflictStatus {
                    subnet: c.net.to_string(),
                    reason: format!("{} is there and netd did not create it (netd never replaces or removes such a route)", existing.join("; ")),
                }
            })
            .collect()
    }

    async fn apply(&self, op: &Op) -> Result<(), NetlinkError> {
        let dev = self.dev_index;
        let index = |via: Via| if via == Via::Underlay { self.underlay.index } else { dev };
        match *op {
            Op::DelRoute(net, spec) => self.nl.del_route(net, spec.gateway, index(spec.via)).await,
            Op::DelNeigh(ip, _) => self.nl.del_neigh(dev, ip).await,
            Op::DelFdb(mac, dst) => self.nl.del_fdb(dev, mac, dst).await,
            Op::SetNeigh(ip, mac) => self.nl.set_neigh(dev, ip, mac).await,
            Op::SetFdb(mac, dst) => self.nl.set_fdb(dev, mac, dst).await,
            Op::AddRoute(net, spec) => self.nl.set_route(net, spec.gateway, index(spec.via), spec.via == Via::Overlay, false).await,
            Op::SetRoute(net, spec) => self.nl.set_route(net, spec.gateway, index(spec.via), spec.via == Via::Overlay, true).await,
        }
    }
}

impl Daemon {
    /// Adds the udp datapath's counters since the last call to the Prometheus counters.
    fn record_udp_stats(&mut self) {
        let Some(dp) = &self.udp else { return };
        let now = dp.stats();
        let was = std::mem::replace(&mut self.udp_seen, now);
        let m = &self.shared.metrics;
        let d = |a: u64, b: u64| a.saturating_sub(b);
        m.udp("packets", "out", d(now.packets_out, was.packets_out));
        m.udp("packets", "in", d(now.packets_in, was.packets_in));
        m.udp("bytes", "out", d(now.bytes_out, was.bytes_out));
        m.udp("bytes", "in", d(now.bytes_in, was.bytes_in));
        m.udp_drop("unknown_source", d(now.dropped_unknown_source, was.dropped_unknown_source));
        m.udp_drop("no_route", d(now.dropped_no_route, was.dropped_no_route));
        m.udp_drop("malformed", d(now.dropped_malformed, was.dropped_malformed));
        m.udp_drop("ttl", d(now.dropped_ttl, was.dropped_ttl));
        m.udp_drop("error", d(now.errors, was.errors));
        if let Some(fast) = &self.udp_fast {
            match fast.stats() {
                Ok(now) => {
                    let was = std::mem::replace(&mut self.udp_fast_seen, now);
                    m.udp_kernel("packets", "out", d(now.encap_packets, was.encap_packets));
                    m.udp_kernel("bytes", "out", d(now.encap_bytes, was.encap_bytes));
                    m.udp_kernel("packets", "in", d(now.decap_packets, was.decap_packets));
                    m.udp_kernel("bytes", "in", d(now.decap_bytes, was.decap_bytes));
                    m.udp_kernel("packets", "passed_out", d(now.encap_passed, was.encap_passed));
                    m.udp_kernel("packets", "passed_in", d(now.decap_passed, was.decap_passed));
                    m.udp_drop("kernel_error", d(now.encap_errors, was.encap_errors));
                }
                Err(e) => debug!(error = %e, "reading the udp fast path's counters"),
            }
        }
    }
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::DelRoute(..) => "del_route",
        Op::DelNeigh(..) => "del_neigh",
        Op::DelFdb(..) => "del_fdb",
        Op::SetNeigh(..) => "set_neigh",
        Op::SetFdb(..) => "set_fdb",
        Op::AddRoute(..) => "add_route",
        Op::SetRoute(..) => "set_route",
    }
}

/// Records the outcome of an etcd exchange in status and metrics.
fn etcd_result(shared: &Shared, res: Result<i64, String>) {
    match res {
        Ok(rev) => {
            shared.metrics.etcd_up.set(1);
            shared.update(|s| {
                s.etcd.connected = true;
                s.etcd.last_ok = Some(unix_now());
                s.etcd.last_error = None;
                s.etcd.revision = s.etcd.revision.max(rev);
            });
        }
        Err(e) => {
            shared.metrics.etcd_up.set(0);
            shared.metrics.etcd_errors.inc();
            shared.update(|s| {
                s.etcd.connected = false;
                s.etcd.last_error = Some(e);
            });
        }
    }
}

/// Keeps the latest registry snapshot in `tx`: list, then watch from that revision; on any error
/// or compaction, back off and list again. The channel always holds the last good snapshot, so
/// an etcd outage changes nothing downstream.
async fn watch_registry(reg: EtcdRegistry, tx: watch::Sender<Arc<Snapshot>>, shared: Arc<Shared>) {
    let mut backoff = Backoff::new();
    let mut down_since: Option<Instant> = None;
    loop {
        let res = reg.snapshot().await;
        etcd_result(&shared, res.as_ref().map(|s| s.revision).map_err(|e| e.to_string()));
        let mut snap = match res {
            Ok(s) => s,
            Err(e) => {
                if down_since.is_none() {
                    error!(error = %e, "etcd unreachable; keeping the current dataplane");
                    down_since = Some(Instant::now());
                }
                backoff.wait().await;
                continue;
            }
        };
        if let Some(since) = down_since.take() {
            info!(down_ms = millis(since.elapsed()), "etcd reachable again");
        }
        backoff = Backoff::new();
        let rev = snap.revision;
        tx.send_replace(Arc::new(snap.clone()));
        let mut stream = match reg.watch(rev).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "etcd watch failed; relisting");
                backoff.wait().await;
                continue;
            }
        };
        loop {
            match reg.next_event(&mut stream, &mut snap).await {
                Ok(true) => {
                    etcd_result(&shared, Ok(snap.revision));
                    if **tx.borrow() != snap {
                        tx.send_replace(Arc::new(snap.clone()));
                    }
                }
                Ok(false) => {
                    debug!("etcd watch ended (cancelled or compacted); relisting");
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "etcd watch broke; relisting");
                    etcd_result(&shared, Err(e.to_string()));
                    down_since.get_or_insert_with(Instant::now);
                    break;
                }
            }
        }
        backoff.wait().await;
    }
}

async fn resolve_underlay(nl: &Netlink, args: &RunArgs, shared: &Shared) -> Result<Underlay, DaemonError> {
    // The underlay may come up after netd (DHCP, a CNI-less boot): wait for it, saying so.
    let mut backoff = Backoff::new();
    let mut said = false;
    loop {
        match try_underlay(nl, args).await {
            Ok(u) => {
                shared.update(|s| s.problems.clear());
                return Ok(u);
            }
            Err(DaemonError::Underlay(msg)) => {
                shared.update(|s| s.problems = vec![format!("underlay: {msg}")]);
                if !said {
                    warn!("{msg}; waiting");
                    said = true;
                }
                backoff.wait().await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn try_underlay(nl: &Netlink, args: &RunArgs) -> Result<Underlay, DaemonError> {
    let link = match &args.iface {
        Some(spec) => {
            if let Ok(ip) = spec.parse::<Ipv4Addr>() {
                find_link_with_ip(nl, ip).await?.ok_or_else(|| DaemonError::Underlay(format!("no interface has address {ip}")))?
            } else {
                nl.link_by_name(spec).await?.ok_or_else(|| DaemonError::Underlay(format!("no interface named {spec:?}")))?
            }
        }
        None => {
            let idx = nl.default_route_link().await?.ok_or_else(|| DaemonError::Underlay("no IPv4 default route to pick the interface from (set --iface)".into()))?;
            nl.link_by_index(idx).await?.ok_or_else(|| DaemonError::Underlay(format!("default route interface {idx} vanished")))?
        }
    };
    let prefixes = nl.addrs_v4(link.index).await?;
    let iface_ip = match &args.iface {
        Some(spec) if spec.parse::<Ipv4Addr>().is_ok() => spec.parse().expect("checked"),
        _ => netlink_first(&prefixes).ok_or_else(|| DaemonError::Underlay(format!("interface {} has no IPv4 address", link.name)))?,
    };
    Ok(Underlay {
        index: link.index,
        name: link.name.clone(),
        mtu: link.mtu,
        iface_ip,
        public_ip: args.public_ip.unwrap_or(iface_ip),
        prefixes: prefixes.iter().map(|p| p.trunc()).collect(),
        vtep_mac: None,
    })
}

fn netlink_first(prefixes: &[Ipv4Net]) -> Option<Ipv4Addr> {
    prefixes.first().map(|n| n.addr())
}

async fn find_link_with_ip(nl: &Netlink, ip: Ipv4Addr) -> Result<Option<netlink::LinkInfo>, DaemonError> {
    // Interfaces are few; walk indexes until the kernel says there are no more.
    for idx in 1..4096u32 {
        if let Some(l) = nl.link_by_index(idx).await? {
            if nl.addrs_v4(idx).await?.iter().any(|a| a.addr() == ip) {
                return Ok(Some(l));
            }
        }
    }
    Ok(None)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

fn enable_ip_forward() {
    let path = PathBuf::from("/proc/sys/net/ipv4/ip_forward");
    match std::fs::read_to_string(&path) {
        Ok(v) if v.trim() == "1" => {}
        _ => match std::fs::write(&path, "1") {
            Ok(()) => info!("enabled net.ipv4.ip_forward (pods' traffic is routed through this node)"),
            Err(e) => warn!(error = %e, "could not enable net.ipv4.ip_forward; cross-node pod traffic will not flow"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_scheduled_margin_before_expiry() {
        let now = Instant::now();
        let at = renew_deadline(Some(86400), 60).unwrap();
        let d = at - now;
        assert!(d > Duration::from_secs(82790) && d < Duration::from_secs(82801), "{d:?}");
        // A lease shorter than the margin is renewed at half-life rather than at once, forever.
        let d = renew_deadline(Some(600), 60).unwrap() - now;
        assert!(d > Duration::from_secs(299) && d < Duration::from_secs(301), "{d:?}");
        assert!(renew_deadline(None, 60).is_none(), "reservations are not renewed");
    }
}
