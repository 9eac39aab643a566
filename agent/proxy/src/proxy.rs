//! `run_proxy`: the service proxy's control loop.
//!
//! Level-triggered: every pass recomputes the Plan from the whole current snapshot (reusing
//! unchanged services' results), renders it, and applies only the difference from what was
//! applied last; every `resync_interval` the difference is taken from the kernel's actual state
//! instead, which repairs drift. Errors keep the last good state in the kernel and are retried.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::conntrack;
use crate::dataplane::{Backend, Rendered};
use crate::health::{HealthServers, ProxierHealth};
use crate::iptables::Iptables;
use crate::model::{NodeInfo, Plan};
use crate::nft::Nftables;
use crate::plan::{desired_from, desired_from_all};
use crate::snapshot::ServiceSnapshot;

/// `--proxy-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ProxyMode {
    /// nf_tables through netlink: verdict maps, constant cost per packet.
    #[default]
    Nftables,
    /// iptables-restore with kube-proxy-like chains, for nodes without nftables.
    Iptables,
    /// eBPF: socket-level load balancing for ClusterIPs (cgroup connect/sendmsg/recvmsg hooks)
    /// and tc programs for NodePort/externalIP/LB traffic from outside; the backend comes from
    /// the netd-ebpf crate (see `run_proxy_with`).
    Ebpf,
    /// Do not program services (another proxy does).
    None,
}

/// The `--proxy-mode` value: `nftables`, `iptables`, `ebpf`, `none`.
impl std::fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum;
        match self.to_possible_value() {
            Some(v) => f.write_str(v.get_name()),
            None => write!(f, "{self:?}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub node: NodeInfo,
    pub mode: ProxyMode,
    /// The iptables-restore binary for `ProxyMode::Iptables`.
    pub iptables_restore: String,
    /// How often the dataplane is compared with the kernel and repaired.
    pub resync_interval: Duration,
    /// Address the healthCheckNodePort servers listen on (`None`: no health servers).
    pub health_bind: Option<Ipv4Addr>,
    /// Delete stale UDP conntrack entries (needs the `conntrack` tool).
    pub conntrack: bool,
    /// Published after every pass (for a status API, and tests).
    pub status: Option<watch::Sender<ProxyStatus>>,
    /// Kept current with every snapshot published and every pass (`/healthz`).
    pub proxier_health: Option<Arc<Mutex<ProxierHealth>>>,
}

impl ProxyConfig {
    pub fn new(node: NodeInfo, mode: ProxyMode) -> Self {
        ProxyConfig {
            node,
            mode,
            iptables_restore: "iptables-restore".into(),
            resync_interval: Duration::from_secs(30),
            health_bind: Some(Ipv4Addr::UNSPECIFIED),
            conntrack: true,
            status: None,
            proxier_health: None,
        }
    }
}

/// `netd run` flags of the service proxy (flattened into the daemon's `RunArgs`, which has
/// `--proxy-mode` itself). The registry's etcd connection is [`crate::registry::RegistryArgs`].
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// iptables-restore binary for --proxy-mode iptables (iptables-restore, iptables-legacy-restore, iptables-nft-restore).
    #[arg(long, env = "NETD_IPTABLES_RESTORE", default_value = "iptables-restore")]
    pub iptables_restore: String,
    /// Addresses NodePorts are served on, comma-separated (default: the node's address; empty list = every local address).
    #[arg(long, env = "NETD_NODEPORT_ADDRESSES", value_parser = parse_addresses)]
    pub nodeport_addresses: Option<Addresses>,
    /// Address and port of the health listener, kube-proxy's: /healthz (200 while the service
    /// rules are fresh, 503 once an update has waited more than twice --resync-interval, with
    /// kube-proxy's JSON body), /livez and /readyz ("" to disable). On all addresses by default,
    /// for the kubelet's probes and load balancers' node checks.
    #[arg(long, env = "NETD_HEALTHZ_BIND_ADDRESS", default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: String,
    /// Delete stale UDP conntrack entries when endpoints go away (needs the `conntrack` tool).
    #[arg(long, env = "NETD_CONNTRACK_CLEANUP", default_value_t = true, action = clap::ArgAction::Set)]
    pub conntrack_cleanup: bool,
}

/// A comma-separated list of IPv4 addresses, possibly empty (`""`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addresses(pub Vec<Ipv4Addr>);

fn parse_addresses(s: &str) -> Result<Addresses, String> {
    s.split(',').map(str::trim).filter(|a| !a.is_empty()).map(|a| a.parse().map_err(|_| format!("{a:?} is not an IPv4 address"))).collect::<Result<_, _>>().map(Addresses)
}

impl ProxyArgs {
    /// The proxy configuration for this node. `node.ips` is replaced by --nodeport-addresses
    /// when given. healthCheckNodePorts are served on every address, as kube-proxy does without
    /// --nodeport-addresses.
    pub fn config(&self, mut node: NodeInfo, mode: ProxyMode, resync_interval: Duration) -> ProxyConfig {
        if let Some(ips) = &self.nodeport_addresses {
            node.ips = ips.0.clone();
        }
        ProxyConfig {
            node,
            mode,
            iptables_restore: self.iptables_restore.clone(),
            resync_interval,
            health_bind: Some(Ipv4Addr::UNSPECIFIED),
            conntrack: self.conntrack_cleanup,
            status: None,
            proxier_health: None,
        }
    }
}

/// What the loop did last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyStatus {
    /// Registry revision of the snapshot applied last (`None` before the first success).
    pub applied_revision: Option<i64>,
    pub services: usize,
    pub syncs: u64,
    /// How long the last pass took (planning and programming the kernel).
    pub last_duration: std::time::Duration,
    pub last_error: Option<String>,
    pub warnings: Vec<String>,
    pub health_ports: Vec<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Dataplane(#[from] crate::dataplane::DataplaneError),
}

/// The backend for a mode (`None` for `ProxyMode::None`).
pub fn backend(cfg: &ProxyConfig) -> Option<Box<dyn Backend>> {
    match cfg.mode {
        ProxyMode::Nftables => Some(Box::new(Rendered::new(Nftables::new()))),
        ProxyMode::Iptables => Some(Box::new(Rendered::new(Iptables::new(&cfg.iptables_restore)))),
        // Built by the caller (netd-ebpf depends on this crate) and passed to `run_proxy_with`.
        ProxyMode::Ebpf | ProxyMode::None => None,
    }
}

/// Runs until the snapshot sender is dropped. Programs the network namespace of the thread(s)
/// the runtime runs on. Returns an error only for what retrying cannot fix.
pub async fn run_proxy(cfg: ProxyConfig, snapshots: watch::Receiver<Arc<ServiceSnapshot>>) -> Result<(), ProxyError> {
    let backend = backend(&cfg);
    run_proxy_with(cfg, backend, snapshots).await
}

/// [`run_proxy`] with a backend built by the caller (the eBPF one lives in another crate).
pub async fn run_proxy_with(cfg: ProxyConfig, mut backend: Option<Box<dyn Backend>>, mut snapshots: watch::Receiver<Arc<ServiceSnapshot>>) -> Result<(), ProxyError> {
    info!(mode = %cfg.mode, node = %cfg.node.name, "service proxy starting");
    let mut health = cfg.health_bind.map(HealthServers::new);
    if let Some(h) = cfg.proxier_health.clone() {
        // Every snapshot published is an update queued, noticed even while a pass runs.
        let mut published = snapshots.clone();
        tokio::spawn(async move {
            loop {
                let revision = published.borrow_and_update().revision;
                h.lock().unwrap_or_else(|p| p.into_inner()).queued(revision, Instant::now());
                if published.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    let mut plan: Option<Plan> = None;
    let mut status = ProxyStatus::default();
    let mut next_resync = Instant::now() + cfg.resync_interval;
    let mut observe = true; // the first pass adopts what the kernel has
    let mut failures = 0u32;
    loop {
        let snap = snapshots.borrow_and_update().clone();
        let started = Instant::now();
        let resync = observe;
        // A resync (observe) plans from the whole snapshot, not its change log: the repair
        // then rests on the full state alone.
        let new_plan = if observe { desired_from_all(&cfg.node, &snap, plan.as_ref()) } else { desired_from(&cfg.node, &snap, plan.as_ref()) };
        let result = match backend.as_mut() {
            Some(b) => b.sync(&new_plan, observe).map(Some),
            None => Ok(None),
        };
        status.syncs += 1;
        status.last_duration = started.elapsed();
        if let Some(h) = &cfg.proxier_health {
            let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
            match &result {
                Ok(_) => h.updated(snap.revision, SystemTime::now()),
                Err(e) => h.failed(snap.revision, e.to_string(), Instant::now()),
            }
        }
        match result {
            Ok(report) => {
                if let Some(r) = &report {
                    if r.changed {
                        info!(revision = snap.revision, services = new_plan.services.len(), size = r.size, observed = r.observed, took_ms = netd_common::report::millis(started.elapsed()), "service dataplane updated");
                    } else {
                        debug!(revision = snap.revision, observed = r.observed, "service dataplane already up to date");
                    }
                }
                if cfg.conntrack && cfg.mode != ProxyMode::None {
                    let empty = Plan::default();
                    let flushes = conntrack::stale_udp(plan.as_ref().unwrap_or(&empty), &new_plan);
                    if !flushes.is_empty() {
                        conntrack::flush(&flushes);
                    }
                }
                for w in new_plan.warnings.iter().filter(|w| !status.warnings.contains(w)) {
                    warn!("{w}");
                }
                status.warnings = new_plan.warnings.clone();
                status.applied_revision = Some(snap.revision);
                status.services = new_plan.services.len();
                status.last_error = None;
                failures = 0;
                observe = false;
                if let Some(h) = health.as_mut() {
                    h.update(&new_plan.health_checks).await;
                    status.health_ports = h.ports();
                }
                plan = Some(new_plan);
            }
            Err(e) => {
                failures += 1;
                error!("programming services failed (attempt {failures}); the previous rules stay in place: {e}");
                status.last_error = Some(e.to_string());
                observe = true;
            }
        }
        if let Some(tx) = &cfg.status {
            let _ = tx.send(status.clone());
        }
        if resync {
            // The next resync is an interval after this one ended: a pass longer than the interval
            // (20,000 services in a debug build) would otherwise start the next one at once.
            next_resync = Instant::now() + cfg.resync_interval;
        }
        // A pass is long synchronous work, and the tasks it woke (the status mirror) wait in this
        // worker's LIFO slot, which no other worker may take: let them run now. A deadline that
        // has passed does not yield (the timer fires at once), so without this a proxy whose
        // passes outlast the resync interval starved them for as long as its coop budget lasted
        // (a minute with 20,000 services: `netd status` said none were programmed).
        tokio::task::yield_now().await;
        let wait_until = if failures > 0 {
            Instant::now() + Duration::from_millis(200 * u64::from(failures.min(25)))
        } else {
            next_resync
        };
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    info!("snapshot source closed; service proxy stopping (rules stay in place)");
                    return Ok(());
                }
            }
            _ = tokio::time::sleep_until(wait_until.into()) => {
                if failures == 0 {
                    observe = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        proxy: ProxyArgs,
    }

    /// A backend whose passes take longer than the resync interval, recording how many status
    /// updates had been mirrored by each pass.
    struct Slow {
        mirrored: Arc<std::sync::atomic::AtomicUsize>,
        seen: Arc<std::sync::Mutex<Vec<usize>>>,
    }

    impl Backend for Slow {
        fn name(&self) -> &'static str {
            "slow"
        }
        fn sync(&mut self, _: &Plan, observe: bool) -> Result<crate::dataplane::ApplyReport, crate::dataplane::DataplaneError> {
            std::thread::sleep(Duration::from_millis(20));
            self.seen.lock().unwrap().push(self.mirrored.load(std::sync::atomic::Ordering::SeqCst));
            Ok(crate::dataplane::ApplyReport { changed: false, size: 0, observed: observe })
        }
        fn remove(&mut self) -> Result<(), crate::dataplane::DataplaneError> {
            Ok(())
        }
    }

    /// The daemon's shape: the proxy on a two-worker runtime with other timers running (so the
    /// timer wheel is current and a passed deadline fires at once), and a task mirroring its
    /// status, which the proxy wakes and so queues on its own worker.
    #[test]
    fn passes_longer_than_the_resync_interval_let_the_status_mirror_run() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let seen = rt.block_on(async {
            for ms in [3, 5, 7] {
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                });
            }
            let mirrored = Arc::new(AtomicUsize::new(0));
            let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
            let (_tx, rx) = watch::channel(Arc::new(ServiceSnapshot::new()));
            let (status_tx, mut status_rx) = watch::channel(ProxyStatus::default());
            let mut cfg = ProxyConfig::new(NodeInfo::default(), ProxyMode::Nftables);
            cfg.resync_interval = Duration::from_millis(1);
            cfg.health_bind = None;
            cfg.conntrack = false;
            cfg.status = Some(status_tx);
            let backend = Slow { mirrored: mirrored.clone(), seen: seen.clone() };
            let proxy = tokio::spawn(run_proxy_with(cfg, Some(Box::new(backend)), rx));
            let m = mirrored.clone();
            let mirror = tokio::spawn(async move {
                while status_rx.changed().await.is_ok() {
                    m.fetch_add(1, Ordering::SeqCst);
                }
            });
            while seen.lock().unwrap().len() < 20 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            proxy.abort();
            mirror.abort();
            let seen = seen.lock().unwrap().clone();
            seen
        });
        // Each pass sends a status; by the last of 20 passes most must have been mirrored.
        assert!(seen[19] >= 10, "status updates mirrored by each pass: {seen:?}");
    }

    #[test]
    fn proxy_mode_reads_as_its_flag_value() {
        let all: Vec<String> = [ProxyMode::Nftables, ProxyMode::Iptables, ProxyMode::Ebpf, ProxyMode::None].iter().map(|m| m.to_string()).collect();
        assert_eq!(all, ["nftables", "iptables", "ebpf", "none"]);
    }

    #[test]
    fn proxy_flags_have_env_vars_and_defaults() {
        Cli::command().debug_assert();
        for arg in Cli::command().get_arguments() {
            if arg.get_long().is_some() && arg.get_id() != "help" {
                assert!(arg.get_env().is_some_and(|e| e.to_string_lossy().starts_with("NETD_")), "--{}", arg.get_id());
            }
        }
        let c = Cli::try_parse_from(["x"]).unwrap();
        assert!(c.proxy.conntrack_cleanup && c.proxy.iptables_restore == "iptables-restore" && c.proxy.nodeport_addresses.is_none());
        let args = ["x", "--iptables-restore", "iptables-legacy-restore", "--conntrack-cleanup", "false", "--nodeport-addresses", "198.18.0.10,198.18.0.11"];
        let cfg = Cli::try_parse_from(args).unwrap().proxy.config(NodeInfo::default(), ProxyMode::Iptables, Duration::from_secs(5));
        assert_eq!(cfg.mode, ProxyMode::Iptables);
        assert_eq!(cfg.node.ips.len(), 2);
        assert_eq!(cfg.iptables_restore, "iptables-legacy-restore");
        assert!(!cfg.conntrack);
        assert_eq!(c.proxy.healthz_bind_address, "0.0.0.0:10256");
    }
}
