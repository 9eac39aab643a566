//! Services on this node: the service registry (etcd) feeds one snapshot channel, which the
//! proxy (and the cluster DNS) consume. The channel is handed out only once the registry has been
//! listed completely, so a starting or restarting netd never programs an empty service table
//! over rules that are right (traffic is not interrupted). The DNS server does not wait for it:
//! it binds and forwards at once, and serves the cluster zone from the first snapshot on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use netd_proxy::registry::{RegistryOptions, ServiceRegistry, WatchStatus};
use netd_proxy::{NodeInfo, ProxyConfig, ProxyMode, ProxyStatus, ServiceSnapshot};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::cli::EbpfFallback;
use crate::server::{unix_now, Shared};
use crate::status::{ServiceRegistryStatus, ServicesStatus};

/// Connects to the registry and keeps the returned channel current (list, watch, relist; the
/// last good snapshot kept while etcd is away or the registry cannot be listed), mirroring how
/// that goes into `netd status`. Returns once the registry has been listed completely.
pub async fn start_source(opts: RegistryOptions, shared: Arc<Shared>) -> watch::Receiver<Arc<ServiceSnapshot>> {
    let (prefix, endpoints) = (format!("{}/", opts.prefix.trim_end_matches('/')), opts.endpoints.clone());
    let (status_tx, mut status_rx) = watch::channel(WatchStatus::default());
    let status = move |st: WatchStatus| ServiceRegistryStatus { prefix: prefix.clone(), endpoints: endpoints.clone(), listed: st.listed, last_error: st.error, revision: st.revision, services: st.services };
    shared.update(|s| s.service_registry = Some(status(WatchStatus::default())));
    tokio::spawn(async move {
        while status_rx.changed().await.is_ok() {
            let st = status_rx.borrow_and_update().clone();
            shared.update(|s| s.service_registry = Some(status(st)));
        }
    });
    let (tx, mut rx) = watch::channel(Arc::new(ServiceSnapshot::default()));
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        let registry = loop {
            match ServiceRegistry::connect(&opts).await {
                Ok(r) => break r,
                Err(e) => {
                    if status_tx.borrow().error.is_none() {
                        warn!(error = %e, "cannot connect to the service registry yet; services wait for it");
                    }
                    status_tx.send_modify(|s| s.error = Some(e.to_string()));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        registry.run_watch(tx, &status_tx).await;
    });
    // run_watch publishes only complete lists; the first one is what services start from.
    let _ = rx.changed().await;
    rx.mark_changed();
    rx
}

/// The same channel fed from the Kubernetes API server (`--source kubernetes`): handed out only
/// once Services and EndpointSlices have been listed completely. The source's connectivity is
/// mirrored into `netd status`.
pub async fn start_kube_source(client: kube::Client, shared: Arc<Shared>) -> watch::Receiver<Arc<ServiceSnapshot>> {
    let (tx, mut rx) = watch::channel(Arc::new(ServiceSnapshot::default()));
    let (status_tx, mut status_rx) = watch::channel(netd_kube::SourceStatus::default());
    tokio::spawn(netd_kube::run_service_source(client, tx, status_tx));
    tokio::spawn(async move {
        while status_rx.changed().await.is_ok() {
            let st = status_rx.borrow_and_update().clone();
            shared.update(|s| {
                s.api_server = Some(crate::status::ApiServerStatus {
                    connected: st.connected,
                    synced: st.synced,
                    last_error: st.last_error.clone(),
                    objects: st.objects,
                    relists_after_410: st.expired,
                })
            });
        }
    });
    // The source publishes only after its first complete list; wait for that.
    let _ = rx.changed().await;
    rx.mark_changed();
    rx
}

/// Removes what the service dataplanes other than `mode`'s left on this node (a switch of
/// `--proxy-mode`, or `none` after netd proxied services): stale rules of another mode would
/// keep answering for Services beside the new one. Blocking (netlink, iptables-save/restore),
/// so it runs off the async runtime; failures are reported and do not stop the proxy.
pub async fn remove_other_modes(mode: ProxyMode, proxy: &netd_proxy::ProxyArgs, bpffs: std::path::PathBuf, shared: Arc<Shared>) {
    let cfg = proxy.config(NodeInfo::default(), mode, Duration::from_secs(30));
    let removed = tokio::task::spawn_blocking(move || {
        let mut removed = netd_proxy::dataplane::remove_leftovers(Some(mode), &cfg.iptables_restore).map_err(|e| e.to_string())?;
        if mode != ProxyMode::Ebpf && netd_ebpf::EbpfBackend::remove_pins(&bpffs).map_err(|e| e.to_string())? {
            removed.push("eBPF");
        }
        Ok::<_, String>(removed)
    })
    .await
    .unwrap_or_else(|e| Err(format!("task failed: {e}")));
    match removed {
        Ok(r) if r.is_empty() => {}
        Ok(r) => info!("removed the {} service rules a previous --proxy-mode left", r.join(" and ")),
        Err(e) => {
            error!("cannot remove the service rules of a previous --proxy-mode: {e}");
            shared.update(|s| s.problems.push(format!("service rules of a previous --proxy-mode not removed: {e}")));
        }
    }
}

/// Runs the proxy on `snapshots` and mirrors its status into `netd status`, metrics and readiness.
/// `ebpf`: the eBPF dataplane's settings with `--proxy-mode ebpf`, and what serves services when
/// it cannot run here.
pub fn spawn_proxy(
    mode: ProxyMode,
    proxy: &netd_proxy::ProxyArgs,
    ebpf: Option<(netd_ebpf::EbpfConfig, EbpfFallback)>,
    node: NodeInfo,
    resync: Duration,
    snapshots: watch::Receiver<Arc<ServiceSnapshot>>,
    take_over_kube_proxy: bool,
    shared: Arc<Shared>,
) {
    // The eBPF backend is built here (it lives in its own crate). A node where it cannot run
    // falls back to nftables, loudly, unless the operator asked for eBPF only: then services are
    // left unprogrammed rather than half-programmed.
    let mut problems = Vec::new();
    // `cleanup`: with `--ebpf-fallback nftables`, the other modes' rules are removed here (not at
    // start), once the mode that runs is known: the eBPF pins a failed load left included, which
    // would answer beside nftables.
    let (mode, backend, fallen_back, cleanup) = match (mode, ebpf) {
        (ProxyMode::Ebpf, Some((cfg, fallback))) => {
            let cleanup = (fallback == EbpfFallback::Nftables).then(|| cfg.bpffs_dir.clone());
            match netd_ebpf::probe().map_err(|e| e.to_string()).and_then(|()| ebpf_backend_or_cluster_ip_only(cfg, &mut problems)) {
                Ok(b) => (mode, Some(b), false, cleanup),
                Err(e) => {
                    shared.metrics.proxy_fallback.set(1);
                    if fallback == EbpfFallback::None {
                        error!(error = %e, "--proxy-mode ebpf is not available on this node; services are not programmed (--ebpf-fallback none)");
                        problems.push(format!("eBPF service dataplane unavailable, services not programmed (--ebpf-fallback none): {e}"));
                        shared.update(|s| s.services = Some(ServicesStatus { mode: mode.to_string(), problems, ..Default::default() }));
                        return;
                    }
                    error!(error = %e, "--proxy-mode ebpf is not available on this node; services are programmed by nftables instead (--ebpf-fallback none: eBPF only)");
                    problems.push(format!("eBPF service dataplane unavailable, services programmed by nftables instead: {e}"));
                    (ProxyMode::Nftables, None, true, cleanup)
                }
            }
        }
        _ => (mode, None, false, None),
    };
    let cfg = proxy.config(node, mode, resync);
    // kube-proxy's chains go once netd's rules for the complete service list are in, so that
    // one of the two answers for every Service at every instant.
    let kube_proxy_restore = take_over_kube_proxy.then(|| cfg.iptables_restore.clone());
    let shown = if fallen_back { format!("{mode} (eBPF unavailable)") } else { mode.to_string() };
    let cleanup = cleanup.map(|bpffs| (proxy.clone(), bpffs));
    spawn_proxy_with(cfg, backend, snapshots, shared, ProxyExtras { shown, problems, cleanup, kube_proxy_restore });
}

/// What [`spawn_proxy_with`] does besides running the proxy.
#[derive(Default)]
pub struct ProxyExtras {
    /// The mode as `netd status` shows it.
    pub shown: String,
    /// Problems found while choosing the dataplane.
    pub problems: Vec<String>,
    /// Remove the other modes' rules (and eBPF pins under this bpffs) before the first sync.
    pub cleanup: Option<(netd_proxy::ProxyArgs, std::path::PathBuf)>,
    /// Remove kube-proxy's chains (with this iptables-restore) after the first complete sync.
    pub kube_proxy_restore: Option<String>,
}

/// [`spawn_proxy`] with the backend built (`None`: the one for `cfg.mode`). The proxy's
/// freshness (`/healthz`) goes to `shared.proxier_health`, with kube-proxy's limit: an update
/// unapplied for twice the resync interval.
pub fn spawn_proxy_with(mut cfg: ProxyConfig, backend: Option<Box<dyn netd_proxy::Backend>>, snapshots: watch::Receiver<Arc<ServiceSnapshot>>, shared: Arc<Shared>, extras: ProxyExtras) {
    let mode = cfg.mode;
    let ProxyExtras { shown, problems, cleanup, mut kube_proxy_restore } = extras;
    let shown = if shown.is_empty() { mode.to_string() } else { shown };
    let (status_tx, mut status_rx) = watch::channel(ProxyStatus::default());
    cfg.status = Some(status_tx);
    let health = Arc::new(std::sync::Mutex::new(netd_proxy::health::ProxierHealth::new(cfg.resync_interval * 2)));
    cfg.proxier_health = Some(health.clone());
    *shared.proxier_health.write().unwrap_or_else(|p| p.into_inner()) = Some(health);
    shared.update(|s| s.services = Some(ServicesStatus { mode: shown, problems, ..Default::default() }));
    // The cluster's service ranges (`netd config`) come with the registry's snapshots.
    let mut ranges = snapshots.clone();
    let shared_ranges = shared.clone();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let config = ranges.borrow_and_update().cluster_config.clone();
            if config != last {
                shared_ranges.update(|s| {
                    if let Some(svc) = &mut s.services {
                        svc.service_cluster_ip_range = config.as_ref().map(|c| c.service_cluster_ip_range.to_string());
                        svc.service_node_port_range = config.as_ref().map(|c| format!("{}-{}", c.service_node_port_range.start(), c.service_node_port_range.end()));
                    }
                });
                last = config;
            }
            if ranges.changed().await.is_err() {
                return;
            }
        }
    });
    let shared_cleanup = shared.clone();
    tokio::spawn(async move {
        if let Some((proxy, bpffs)) = cleanup {
            remove_other_modes(mode, &proxy, bpffs, shared_cleanup).await;
        }
        let run = match backend {
            Some(b) => netd_proxy::run_proxy_with(cfg, Some(b), snapshots).await,
            None => netd_proxy::run_proxy(cfg, snapshots).await,
        };
        if let Err(e) = run {
            error!(error = %e, "the service proxy stopped");
        }
    });
    tokio::spawn(async move {
        let mut last_syncs = 0;
        while status_rx.changed().await.is_ok() {
            let st = status_rx.borrow_and_update().clone();
            if st.applied_revision.is_some() {
                shared.set_ready(|r| r.first_service_sync = Some(true));
                if let Some(restore) = kube_proxy_restore.take() {
                    tokio::spawn(crate::takeover::remove_in_background(crate::takeover::Predecessor::KubeProxy, restore, shared.clone()));
                }
            }
            if st.syncs > last_syncs && st.last_error.is_some() {
                shared.metrics.sync_errors.inc();
            }
            last_syncs = st.syncs;
            shared.update(|s| {
                if let Some(svc) = &mut s.services {
                    svc.services = st.services;
                    svc.applied_revision = st.applied_revision;
                    svc.last_sync = Some(unix_now());
                    svc.last_error = st.last_error.clone();
                    svc.warnings = st.warnings.clone();
                    svc.health_ports = st.health_ports.clone();
                    svc.last_duration_ms = st.last_duration.as_secs_f64() * 1000.0;
                }
            });
        }
    });
}

/// The eBPF backend; when only its tc part (NodePort from outside) cannot run here (a kernel
/// without TCX, a missing device), ClusterIPs are still served by the socket load balancer and
/// the problem is reported.
fn ebpf_backend_or_cluster_ip_only(cfg: netd_ebpf::EbpfConfig, problems: &mut Vec<String>) -> Result<Box<dyn netd_proxy::Backend>, String> {
    let tc = !cfg.external_devices.is_empty() || cfg.overlay_device.is_some();
    let tc_problem = if tc { netd_ebpf::probe_tc().err() } else { None };
    let cfg = match tc_problem {
        Some(why) => {
            warn!(reason = %why, "eBPF NodePort/externalIP translation unavailable; ClusterIPs only");
            problems.push(format!("eBPF NodePort/externalIP translation unavailable: {why}"));
            netd_ebpf::EbpfConfig { external_devices: Vec::new(), overlay_device: None, ..cfg }
        }
        None => cfg,
    };
    netd_ebpf::ebpf_backend(cfg).map_err(|e| e.to_string())
}

/// What starting cluster DNS needs, gathered when netd starts.
pub struct DnsStart {
    pub args: netd_dns::Args,
    pub network: ipnet::Ipv4Net,
    pub run_dir: std::path::PathBuf,
    /// Sockets systemd passed (its file descriptor store).
    pub from_systemd: Vec<std::os::fd::OwnedFd>,
    /// Where the started server goes (for the shutdown).
    pub slot: Arc<std::sync::OnceLock<Arc<netd_dns::DnsServer>>>,
}

impl DnsStart {
    /// Whether DNS will serve sockets that already receive queries: systemd's, or a running
    /// predecessor's (its handover socket is there; a stale one means fresh sockets after all).
    pub fn takes_over(&self) -> bool {
        !self.from_systemd.is_empty() || (self.args.dns_handover && self.run_dir.join(netd_dns::handover::SOCKET_NAME).exists())
    }

    /// [`start_dns`] off the async runtime, serving `zone` from the first query on (if given);
    /// readiness says DNS serves (or, when it could not start, waits no more for it).
    pub async fn start(self, zone: Option<Arc<netd_dns::Zone>>, shared: &Arc<Shared>) -> Option<(Arc<netd_dns::DnsServer>, netd_dns::Args)> {
        let status = shared.clone();
        let DnsStart { args, network, run_dir, from_systemd, slot } = self;
        let started = tokio::task::spawn_blocking(move || start_dns(&args, network, status, &run_dir, from_systemd, zone));
        let dns = started.await.unwrap_or(None);
        shared.set_ready(|r| r.dns = dns.is_some().then_some(true));
        if let Some((dns, _)) = &dns {
            let _ = slot.set(dns.clone());
        }
        dns
    }
}

/// The zone of the current snapshot (built off the async runtime).
pub async fn first_zone(zone_cfg: netd_dns::ZoneConfig, snapshots: &watch::Receiver<Arc<ServiceSnapshot>>) -> Option<Arc<netd_dns::Zone>> {
    let snap = snapshots.borrow().clone();
    let built = tokio::task::spawn_blocking(move || {
        netd_dns::ZoneBuilder::new(zone_cfg).update(snap.services().values(), snap.slice_groups().values().flat_map(|g| g.values()))
    });
    built.await.map_err(|e| error!(error = %e, "building the first cluster DNS zone failed")).ok()
}

/// Starts cluster DNS: bound and forwarding at once (names outside the cluster resolve even while
/// the service registry cannot be listed), cluster names answered SERVFAIL until [`serve_zone`]
/// hands it a snapshot. The server's counters go to `netd status` and Prometheus every few seconds.
///
/// The listening sockets are, in this order: `from_systemd` (its file descriptor store, after a
/// `systemctl restart`), a running predecessor's (`--dns-handover`: taken over through
/// `<run_dir>/dns-handover.sock`, the predecessor stops reading them once we serve), or fresh.
/// They are handed on the same way, and stored with systemd when netd runs under it. Blocking.
/// Returns the server and the DNS settings in effect (the flags with --dns-config applied).
pub fn start_dns(
    args: &netd_dns::Args,
    network: ipnet::Ipv4Net,
    shared: Arc<Shared>,
    run_dir: &std::path::Path,
    from_systemd: Vec<std::os::fd::OwnedFd>,
    zone: Option<Arc<netd_dns::Zone>>,
) -> Option<(Arc<netd_dns::DnsServer>, netd_dns::Args)> {
    let (cfg, args) = match args.effective().and_then(|a| Ok((a.server_config(Some(ipnet::IpNet::V4(network)))?, a))) {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "cluster DNS not started");
            shared.update(|s| s.problems.push(format!("cluster DNS: {e}")));
            return None;
        }
    };
    let listen: Vec<String> = cfg.listen.iter().map(|a| a.to_string()).collect();
    let upstreams: Vec<String> = cfg.upstreams.iter().map(|a| a.to_string()).collect();
    let (upstreams_from, upstreams_self) = upstreams_left_out(&args, &cfg.upstreams);
    if cfg.upstreams.is_empty() && !upstreams_self.is_empty() {
        error!(upstreams = %upstreams_self.join(","), from = %upstreams_from, "cluster DNS has no upstream but itself (dnsPolicy ClusterFirstWithHostNet?): names outside the cluster will fail; use dnsPolicy: Default or --dns-upstream");
    }
    let handover = run_dir.join(netd_dns::handover::SOCKET_NAME);
    let mut predecessor = None;
    if args.dns_handover && from_systemd.is_empty() {
        match netd_dns::handover::take_over(&handover) {
            Ok(p) => predecessor = p,
            // The predecessor (if any) keeps serving; fresh sockets join its SO_REUSEPORT group.
            Err(e) => warn!(error = %e, "cannot take the DNS sockets over from the running netd; binding fresh ones"),
        }
    }
    let inherited = match predecessor.as_mut() {
        Some(p) => p.take_sockets(),
        None => from_systemd,
    };
    let server = match netd_dns::DnsServer::start_with(cfg, inherited, zone) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            error!(error = %e, "cluster DNS not started");
            shared.update(|s| s.problems.push(format!("cluster DNS: {e}")));
            return None;
        }
    };
    if args.dns_handover {
        if let Err(e) = netd_dns::handover::serve(&handover, server.clone()) {
            warn!(error = %e, "the DNS sockets cannot be handed over to the next netd; an upgrade will lose queries");
            shared.update(|s| s.problems.push(format!("DNS handover: {e}")));
        }
    }
    if let Some(p) = predecessor {
        match p.confirm() {
            Ok(()) => info!("took the DNS sockets over from the running netd"),
            Err(e) => warn!(error = %e, "the running netd was not told we serve DNS; it serves on the same sockets until it stops"),
        }
    }
    if let Some(notifier) = crate::systemd::Notifier::from_env() {
        if let Err(e) = crate::systemd::store_dns_sockets(&notifier, &server.listen_sockets()) {
            warn!(error = %e, "cannot store the DNS sockets with systemd; a restart will lose queries");
        }
    }
    info!(listen = %listen.join(","), upstreams = %upstreams.join(","), "cluster DNS serving");
    let dns = server.clone();
    tokio::spawn(async move {
        let mut last: Option<(Instant, u64)> = None;
        let mut seen = netd_dns::DnsMetrics::default();
        loop {
            let m = server.metrics();
            let total: u64 = m.requests.iter().map(|r| r.count).sum();
            let qps = last.map(|(t, n)| (total.saturating_sub(n)) as f64 / t.elapsed().as_secs_f64().max(0.001)).unwrap_or(0.0);
            last = Some((Instant::now(), total));
            for r in &m.requests {
                let before = seen.requests.iter().find(|b| b.qtype == r.qtype && b.rcode == r.rcode).map_or(0, |b| b.count);
                shared.metrics.dns_request(r.qtype, r.rcode, r.count.saturating_sub(before));
            }
            shared.metrics.dns_cache(m.cache_hits.saturating_sub(seen.cache_hits), m.cache_misses.saturating_sub(seen.cache_misses));
            shared.metrics.dns_forwards(m.forwards.saturating_sub(seen.forwards), m.forward_failures.saturating_sub(seen.forward_failures));
            let lookups = m.cache_hits + m.cache_misses;
            shared.update(|s| {
                let d = s.dns.get_or_insert_with(Default::default);
                d.listen = listen.clone();
                d.upstreams = upstreams.clone();
                d.upstreams_from = upstreams_from.clone();
                d.upstreams_self = upstreams_self.clone();
                d.queries = total;
                d.queries_per_second = qps;
                d.cache_hit_ratio = if lookups == 0 { None } else { Some(m.cache_hits as f64 / lookups as f64) };
                d.forwards = m.forwards;
                d.forward_failures = m.forward_failures;
            });
            seen = m;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
    Some((dns, args))
}

/// Where DNS's upstreams come from (`--dns-upstream` or the resolv.conf) and which of them the
/// server left out of `kept` because they are netd itself (see `netd_dns::resolv::without_self`).
pub fn upstreams_left_out(args: &netd_dns::Args, kept: &[std::net::SocketAddr]) -> (String, Vec<String>) {
    let (from, given) = if args.dns_upstream.is_empty() {
        let given = netd_dns::resolv::upstreams_from_resolv_conf(&args.dns_resolv_conf, netd_dns::resolv::SYSTEMD_RESOLV_CONF.as_ref()).unwrap_or_default();
        (args.dns_resolv_conf.display().to_string(), given)
    } else {
        ("--dns-upstream".to_string(), args.dns_upstream.clone())
    };
    (from, given.iter().filter(|u| !kept.contains(u)).map(|u| u.to_string()).collect())
}

/// Serves the cluster zone of `dns` from the snapshots: the zone is updated and swapped in on
/// every change.
pub fn serve_zone(dns: Arc<netd_dns::DnsServer>, zone_cfg: netd_dns::ZoneConfig, mut snapshots: watch::Receiver<Arc<ServiceSnapshot>>, shared: Arc<Shared>) {
    tokio::spawn(async move {
        // The snapshots share unchanged objects (`Arc`s) from one to the next: the builder
        // re-encodes only the services whose objects changed. The first build of a big registry
        // takes a while (seconds for 20,000 services), so it runs off the async runtime.
        let mut builder = netd_dns::ZoneBuilder::new(zone_cfg);
        loop {
            let snap = snapshots.borrow_and_update().clone();
            let started = Instant::now();
            let built = tokio::task::spawn_blocking(move || {
                let zone = builder.update(snap.services().values(), snap.slice_groups().values().flat_map(|g| g.values()));
                (builder, zone)
            });
            let zone = match built.await {
                Ok((b, zone)) => {
                    builder = b;
                    zone
                }
                Err(e) => {
                    error!(error = %e, "building the cluster DNS zone failed; DNS keeps its last zone");
                    shared.update(|s| s.problems.push(format!("cluster DNS zone: {e}")));
                    return;
                }
            };
            let stats = zone.stats().clone();
            dns.set_zone(zone);
            tracing::debug!(services = stats.services, records = stats.records, took = ?started.elapsed(), "cluster DNS zone updated");
            shared.update(|s| {
                let d = s.dns.get_or_insert_with(Default::default);
                d.services = stats.services;
                d.records = stats.records;
                d.zone_built_at = Some(unix_now());
            });
            if snapshots.changed().await.is_err() {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        dns: netd_dns::Args,
    }

    /// A resolv.conf as ClusterFirstWithHostNet writes it for netd's own pod: the cluster DNS
    /// IP, which netd answers, is its only nameserver.
    #[test]
    fn upstreams_that_are_netd_itself_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(&resolv, "search kube-system.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n").unwrap();
        let args = Cli::try_parse_from(["x", "--cluster-dns-ip", "10.96.0.10", "--dns-resolv-conf", resolv.to_str().unwrap()]).unwrap().dns;
        let cfg = args.server_config(None).unwrap();
        assert!(cfg.upstreams.is_empty());
        let (from, left_out) = super::upstreams_left_out(&args, &cfg.upstreams);
        assert_eq!((from.as_str(), left_out), (resolv.to_str().unwrap(), vec!["10.96.0.10:53".to_string()]));

        // The node's resolv.conf (dnsPolicy: Default): nothing left out.
        std::fs::write(&resolv, "nameserver 198.18.0.1\nnameserver 169.254.20.10\n").unwrap();
        let cfg = args.server_config(None).unwrap();
        let (_, left_out) = super::upstreams_left_out(&args, &cfg.upstreams);
        assert_eq!(cfg.upstreams.len(), 1);
        assert_eq!(left_out, ["169.254.20.10:53"], "the node-local address is netd too");
        let args = Cli::try_parse_from(["x", "--dns-upstream", "198.18.0.1,10.96.0.10", "--cluster-dns-ip", "10.96.0.10"]).unwrap().dns;
        let cfg = args.server_config(None).unwrap();
        assert_eq!(super::upstreams_left_out(&args, &cfg.upstreams), ("--dns-upstream".to_string(), vec!["10.96.0.10:53".to_string()]));
    }
}
