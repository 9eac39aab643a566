//! What `netd status` shows: the node's network health as one serializable model, the verdict
//! derived from it, and its rendering for a terminal. Pure; the daemon fills the model in and the
//! status socket serves it.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub version: String,
    /// Unix seconds when this status was produced.
    pub now: u64,
    pub started_at: u64,
    pub phase: Phase,
    pub lease: Option<LeaseStatus>,
    pub backend: Option<BackendStatus>,
    pub peers: Vec<PeerStatus>,
    /// Keys under `<prefix>/subnets/` that could not be read, with why.
    pub malformed_keys: Vec<(String, String)>,
    /// Peer routes left out because a route netd did not create has their destination.
    #[serde(default)]
    pub route_conflicts: Vec<RouteConflictStatus>,
    pub etcd: EtcdStatus,
    pub last_sync: Option<SyncStatus>,
    pub files: FilesStatus,
    /// Pods set up by netd-cni on this node (from its IPAM state).
    pub cni: Option<CniStatus>,
    /// The service proxy, when one runs.
    #[serde(default)]
    pub services: Option<ServicesStatus>,
    /// Cluster DNS, when it runs.
    #[serde(default)]
    pub dns: Option<DnsStatus>,
    /// The Kubernetes API server, with `--source kubernetes`.
    #[serde(default)]
    pub api_server: Option<ApiServerStatus>,
    /// Which API server netd talks to and where that address came from (`--kube-api-server`,
    /// its env var, a kubeconfig, in-cluster), whenever it uses one.
    #[serde(default)]
    pub api_endpoint: Option<netd_kube::ApiServer>,
    /// The etcd service registry, with `--source etcd` (services or DNS on).
    #[serde(default)]
    pub service_registry: Option<ServiceRegistryStatus>,
    /// Problems that are not tied to one field above (invalid config update, ...).
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for the underlay, etcd or the network config.
    #[default]
    Starting,
    /// Lease held, dataplane programmed.
    Running,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseStatus {
    pub subnet: String,
    pub public_ip: String,
    pub reservation: bool,
    /// Unix seconds; `None` for a reservation.
    pub expires_at: Option<u64>,
    pub renew_at: Option<u64>,
    pub last_renewal: Option<u64>,
    pub acquired_at: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub kind: String,
    pub device: String,
    pub device_present: bool,
    pub vni: u32,
    pub port: u16,
    pub mtu: u32,
    pub underlay: String,
    /// udp backend: where packets are encapsulated ("kernel (tc eBPF), userspace for the
    /// rest", or "userspace" with the reason the kernel path does not run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datapath: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The lease's key (`<prefix>/subnets/10.244.4.0-24`, or `node/<name>`).
    #[serde(default)]
    pub key: String,
    pub subnet: String,
    pub public_ip: String,
    /// Whether the kernel has the route (and neighbor/FDB entries) for it after the last sync.
    pub programmed: bool,
    /// Why it is not programmed, when it was skipped on purpose.
    pub skipped: Option<String>,
}

/// A route netd wants but does not program: its destination has a route netd did not create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConflictStatus {
    pub subnet: String,
    /// The route(s) in the way, as `ip route` shows them, and what netd does about it.
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EtcdStatus {
    pub endpoints: Vec<String>,
    pub connected: bool,
    /// Unix seconds of the last successful exchange.
    pub last_ok: Option<u64>,
    pub last_error: Option<String>,
    pub revision: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub at: u64,
    pub duration_ms: f64,
    pub changes: usize,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FilesStatus {
    pub subnet_env: Option<String>,
    pub cni_conflist: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DnsStatus {
    pub listen: Vec<String>,
    pub upstreams: Vec<String>,
    /// Where the upstreams come from: `--dns-upstream`, or the resolv.conf read.
    #[serde(default)]
    pub upstreams_from: String,
    /// Upstreams given (or in the resolv.conf) that are netd itself, the cluster DNS IP or an
    /// address netd serves DNS on, and so left out: forwarding to them would loop.
    #[serde(default)]
    pub upstreams_self: Vec<String>,
    /// Services in the zone, and records served.
    pub services: usize,
    pub records: usize,
    pub zone_built_at: Option<u64>,
    pub queries: u64,
    pub queries_per_second: f64,
    pub cache_hit_ratio: Option<f64>,
    pub forwards: u64,
    pub forward_failures: u64,
    /// SkyDNS records from etcd (`None`: not served).
    pub skydns: Option<SkyDnsStatus>,
}

/// The SkyDNS records cluster DNS follows in etcd.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SkyDnsStatus {
    /// The key prefix followed (`/skydns/`).
    pub prefix: String,
    pub zones: Vec<String>,
    /// Listed completely at least once.
    pub listed: bool,
    /// Why etcd cannot be followed right now (the last records stay served).
    pub last_error: Option<String>,
    pub records: usize,
    pub revision: i64,
    /// Values left out: `key: reason` (the first few).
    pub skipped: Vec<String>,
    pub skipped_total: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ApiServerStatus {
    pub connected: bool,
    /// Services and EndpointSlices listed completely at least once.
    pub synced: bool,
    pub last_error: Option<String>,
    pub objects: usize,
    pub relists_after_410: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceRegistryStatus {
    /// Its key prefix (`/netd/registry/`).
    pub prefix: String,
    /// The etcd it is read from (named here too: with Node-based subnets no other etcd is used).
    pub endpoints: Vec<String>,
    /// Listed completely at least once: services and DNS have a state to serve.
    pub listed: bool,
    /// Why it cannot be listed or watched right now (the etcd operation and its error); the last
    /// listed state stays in use meanwhile.
    pub last_error: Option<String>,
    pub revision: i64,
    pub services: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServicesStatus {
    /// `nftables`, `iptables`.
    pub mode: String,
    /// Services programmed by the last successful sync.
    pub services: usize,
    /// Registry revision of the last successful sync (`None` before the first).
    pub applied_revision: Option<i64>,
    pub last_sync: Option<u64>,
    /// How long the last sync took.
    #[serde(default)]
    pub last_duration_ms: f64,
    pub last_error: Option<String>,
    pub warnings: Vec<String>,
    /// What keeps the requested dataplane from serving (eBPF unavailable: the fallback, or
    /// nothing at all). Set once at start; the daemon's own `problems` are its to clear.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// healthCheckNodePort servers running (externalTrafficPolicy Local).
    pub health_ports: Vec<u16>,
    /// The cluster's service ranges (`netd config get`), when the registry has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_cluster_ip_range: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_node_port_range: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniStatus {
    pub pods: usize,
    pub addresses_free: usize,
    /// Why the IPAM state could not be read, if it could not.
    pub error: Option<String>,
}

impl CniStatus {
    /// Reads netd-cni's IPAM state file (`{"allocations":[...]}`) for a node subnet of `prefix_len`.
    /// A missing file means no pod was ever set up.
    pub fn read(path: &std::path::Path, prefix_len: u8) -> CniStatus {
        // Network, gateway and broadcast addresses are never handed out.
        let capacity = (1usize << (32 - u32::from(prefix_len.min(30)))) - 3;
        let used = match std::fs::read(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(format!("{}: {e}", path.display())),
            Ok(b) => serde_json::from_slice::<serde_json::Value>(&b)
                .map_err(|e| format!("{}: {e}", path.display()))
                .map(|v| v["allocations"].as_array().map_or(0, Vec::len)),
        };
        match used {
            Ok(n) => CniStatus { pods: n, addresses_free: capacity.saturating_sub(n), error: None },
            Err(e) => CniStatus { pods: 0, addresses_free: 0, error: Some(e) },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Healthy,
    /// Traffic flows, but something needs attention (etcd away, a peer skipped, sync errors).
    Degraded,
    /// This node cannot carry pod traffic as it should.
    Unhealthy,
}

impl Health {
    /// `netd status` exit code.
    pub fn exit_code(self) -> i32 {
        match self {
            Health::Healthy => 0,
            Health::Degraded => 1,
            Health::Unhealthy => 2,
        }
    }
}

/// The verdict and the reasons for it, worst first.
pub fn verdict(s: &NodeStatus) -> (Health, Vec<String>) {
    let mut bad = Vec::new();
    let mut warn = Vec::new();
    match &s.lease {
        None => bad.push(match s.phase {
            Phase::Starting => "no subnet lease yet (starting: see the etcd and config lines)".to_string(),
            Phase::Running => "no subnet lease".to_string(),
        }),
        Some(l) => {
            if let Some(exp) = l.expires_at {
                if exp <= s.now {
                    bad.push(format!("subnet lease {} expired {} ago", l.subnet, ago(s.now - exp)));
                } else if l.renew_at.is_some_and(|r| r + 300 < s.now) {
                    warn.push(format!("subnet lease {} is overdue for renewal (expires in {})", l.subnet, ago(exp - s.now)));
                }
            }
        }
    }
    if let Some(b) = &s.backend {
        if !b.device_present {
            bad.push(format!("{} device {} is missing", b.kind, b.device));
        }
    }
    if s.files.subnet_env.is_none() && s.lease.is_some() {
        bad.push("subnet.env has not been written".into());
    }
    if !s.etcd.connected && !s.etcd.endpoints.is_empty() {
        let since = s.etcd.last_ok.map(|t| format!(" for {}", ago(s.now.saturating_sub(t)))).unwrap_or_default();
        let why = s.etcd.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
        warn.push(format!("etcd unreachable{since}{why}; the dataplane keeps its last known state"));
    }
    // A conflict leaves a peer unreachable: as bad as a route that failed, and said with why.
    for c in &s.route_conflicts {
        bad.push(format!("route to {} not programmed: {}", c.subnet, c.reason));
    }
    let unprogrammed: Vec<&PeerStatus> = s
        .peers
        .iter()
        .filter(|p| !p.programmed && p.skipped.is_none() && !s.route_conflicts.iter().any(|c| c.subnet == p.subnet))
        .collect();
    if !unprogrammed.is_empty() {
        let list: Vec<&str> = unprogrammed.iter().map(|p| p.subnet.as_str()).collect();
        bad.push(format!("{} peer route(s) not programmed: {}", unprogrammed.len(), list.join(", ")));
    }
    // A skipped lease is no peer this node can use; the node itself is fine, but the key needs
    // an operator (removing it, or fixing the config), so it is never HEALTHY.
    for p in s.peers.iter().filter(|p| p.skipped.is_some()) {
        let key = if p.key.is_empty() { String::new() } else { format!(" (key {})", p.key) };
        warn.push(format!("peer {}{key} skipped: {}", p.subnet, p.skipped.as_deref().unwrap_or("")));
    }
    for (k, r) in &s.malformed_keys {
        warn.push(format!("malformed key {k}: {r}"));
    }
    if let Some(cni) = &s.cni {
        if let Some(e) = &cni.error {
            warn.push(format!("CNI IPAM state unreadable: {e}"));
        } else if cni.addresses_free == 0 {
            bad.push(format!("no pod addresses left ({} pods use them all)", cni.pods));
        }
    }
    if let Some(dns) = &s.dns {
        if dns.upstreams.is_empty() && !dns.upstreams_self.is_empty() {
            // ClusterFirstWithHostNet gives netd's pod a resolv.conf naming the cluster DNS IP,
            // which is netd: the one upstream it would forward to is itself.
            warn.push(format!(
                "cluster DNS forwards to itself: the only upstream(s) in {} ({}) are addresses netd answers, so every name outside the cluster domain gets SERVFAIL \
                 (hint: run netd's pod with dnsPolicy: Default, i.e. the node's resolv.conf, or set NETD_DNS_UPSTREAM to the node's resolvers)",
                dns.upstreams_from,
                dns.upstreams_self.join(", ")
            ));
        } else if dns.upstreams.is_empty() {
            warn.push("cluster DNS has no upstream resolvers: names outside the cluster domain fail".into());
        }
        if let Some(sky) = &dns.skydns {
            if let Some(e) = &sky.last_error {
                warn.push(format!("SkyDNS records under {} cannot be followed: {e}", sky.prefix));
            }
            if sky.skipped_total > 0 {
                warn.push(format!("{} malformed SkyDNS value(s) skipped: {}", sky.skipped_total, sky.skipped.join("; ")));
            }
        }
    }
    if let Some(api) = &s.api_server {
        if !api.connected {
            let why = api.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
            let at = s.api_endpoint.as_ref().map(|e| format!(" at {}", e.url)).unwrap_or_default();
            // The in-cluster address is the `kubernetes` Service: on a node where netd is the
            // service proxy nothing serves it before netd has read the Services from it.
            let hint = match &s.api_endpoint {
                Some(e) if e.in_cluster => " (the in-cluster address is the kubernetes Service's ClusterIP, which only a running service proxy makes reachable: \
                                           set NETD_KUBE_API_SERVER to the API server's own https://HOST:PORT)",
                _ => "",
            };
            warn.push(format!("Kubernetes API server{at} unreachable{why}; services keep their last known state{hint}"));
        }
    }
    if let Some(r) = &s.service_registry {
        let what = format!("service registry {} (etcd {})", r.prefix, r.endpoints.join(","));
        match (&r.last_error, r.listed) {
            (Some(e), true) => warn.push(format!("{what} cannot be followed: {e}; services and DNS keep their last known state")),
            (Some(e), false) => warn.push(format!("{what} cannot be listed: {e}; no services are programmed and cluster names get SERVFAIL (other names still resolve)")),
            (None, false) => warn.push(format!("{what} not listed yet")),
            (None, true) => {}
        }
    }
    if let Some(svc) = &s.services {
        match (&svc.last_error, svc.applied_revision) {
            (Some(e), _) => warn.push(format!("service sync failed: {e}")),
            (None, None) => warn.push("services not programmed yet (waiting for the first sync)".into()),
            _ => {}
        }
        warn.extend(svc.warnings.iter().map(|w| format!("services: {w}")));
        warn.extend(svc.problems.iter().cloned());
    }
    if let Some(sync) = &s.last_sync {
        for e in &sync.errors {
            warn.push(format!("last sync: {e}"));
        }
    }
    warn.extend(s.problems.iter().cloned());
    let health = if !bad.is_empty() {
        Health::Unhealthy
    } else if !warn.is_empty() {
        Health::Degraded
    } else {
        Health::Healthy
    };
    bad.extend(warn);
    (health, bad)
}

fn ago(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Seconds from now, signed ("in 23h" / "5m ago").
fn rel(now: u64, t: u64) -> String {
    if t >= now {
        format!("in {}", ago(t - now))
    } else {
        format!("{} ago", ago(now - t))
    }
}

/// The one-screen text rendering. `color` adds ANSI colors (only on a terminal).
pub fn render(s: &NodeStatus, color: bool) -> String {
    let paint = |code: &str, text: &str| if color { format!("\x1b[{code}m{text}\x1b[0m") } else { text.to_string() };
    let (health, reasons) = verdict(s);
    let mut out = String::new();
    let head = match health {
        Health::Healthy => paint("1;32", "HEALTHY"),
        Health::Degraded => paint("1;33", "DEGRADED"),
        Health::Unhealthy => paint("1;31", "UNHEALTHY"),
    };
    let summary = if reasons.is_empty() { "pod network is up".to_string() } else { reasons[0].clone() };
    let _ = writeln!(out, "{head}  {}: {summary}", s.node);
    for r in reasons.iter().skip(1) {
        let _ = writeln!(out, "          {r}");
    }
    let _ = writeln!(out);
    let ok = |b: bool| if b { paint("32", "ok") } else { paint("31", "MISSING") };
    match &s.lease {
        Some(l) => {
            let exp = match l.expires_at {
                Some(e) => format!("expires {}", rel(s.now, e)),
                None => "reservation (never expires)".into(),
            };
            let renewed = l.last_renewal.map(|t| format!(", renewed {}", rel(s.now, t))).unwrap_or_default();
            let _ = writeln!(out, "lease     {} for {} — {exp}{renewed}", l.subnet, l.public_ip);
        }
        None => {
            let _ = writeln!(out, "lease     none");
        }
    }
    if let Some(b) = &s.backend {
        let _ = writeln!(out, "backend   {} on {} (VNI {}, port {}, MTU {}) via {} — device {}", b.kind, b.device, b.vni, b.port, b.mtu, b.underlay, ok(b.device_present));
        if let Some(d) = &b.datapath {
            let _ = writeln!(out, "datapath  {d}");
        }
    }
    let programmed = s.peers.iter().filter(|p| p.programmed).count();
    let _ = writeln!(out, "peers     {programmed}/{} programmed", s.peers.len());
    for p in &s.peers {
        let state = match (&p.skipped, p.programmed) {
            (Some(why), _) => paint("33", &format!("skipped: {why}")),
            (None, _) if s.route_conflicts.iter().any(|c| c.subnet == p.subnet) => paint("31", "route NOT PROGRAMMED (conflict)"),
            (None, true) => paint("32", "route ok"),
            (None, false) => paint("31", "route MISSING"),
        };
        let _ = writeln!(out, "          {:<18} via {:<15} {state}", p.subnet, p.public_ip);
    }
    if let Some(sync) = &s.last_sync {
        let errs = if sync.errors.is_empty() { String::new() } else { paint("31", &format!(", {} error(s)", sync.errors.len())) };
        let _ = writeln!(out, "sync      {} ({:.1} ms, {} change(s){errs})", rel(s.now, sync.at), sync.duration_ms, sync.changes);
    }
    if let Some(svc) = &s.services {
        let when = svc.last_sync.map(|t| format!(", synced {} in {:.1} ms", rel(s.now, t), svc.last_duration_ms)).unwrap_or_default();
        let rev = svc.applied_revision.map(|r| format!(" (revision {r})")).unwrap_or_else(|| " (not synced yet)".into());
        let err = svc.last_error.as_ref().map(|e| paint("31", &format!(" — ERROR: {e}"))).unwrap_or_default();
        let _ = writeln!(out, "services  {} programmed by {}{rev}{when}{err}", svc.services, svc.mode);
        if let (Some(ips), Some(ports)) = (&svc.service_cluster_ip_range, &svc.service_node_port_range) {
            let _ = writeln!(out, "          ClusterIPs from {ips}, nodePorts {ports}");
        }
    }
    if let Some(dns) = &s.dns {
        let hit = dns.cache_hit_ratio.map(|r| format!(", cache hits {:.0}%", r * 100.0)).unwrap_or_default();
        let fails = if dns.forward_failures > 0 { paint("33", &format!(", {} failed forwards", dns.forward_failures)) } else { String::new() };
        let _ = writeln!(
            out,
            "dns       {} records for {} services on {}; {:.0} queries/s{hit}; upstream {}{fails}",
            dns.records,
            dns.services,
            dns.listen.join(","),
            dns.queries_per_second,
            if dns.upstreams.is_empty() { paint("31", "NONE") } else { dns.upstreams.join(",") }
        );
        if !dns.upstreams_self.is_empty() {
            let _ = writeln!(out, "          left out of the upstreams from {} (netd itself): {}", dns.upstreams_from, dns.upstreams_self.join(","));
        }
        if let Some(sky) = &dns.skydns {
            let state = match (&sky.last_error, sky.listed) {
                (None, true) => paint("32", "listed"),
                (None, false) => paint("33", "not listed yet"),
                (Some(e), _) => paint("31", &format!("ERROR: {e}")),
            };
            let skipped = if sky.skipped_total > 0 { paint("33", &format!(", {} skipped", sky.skipped_total)) } else { String::new() };
            let _ = writeln!(out, "skydns    {} for {} {state} ({} records{skipped}, revision {})", sky.prefix, sky.zones.join(","), sky.records, sky.revision);
        }
    }
    if let Some(r) = &s.service_registry {
        let state = match (&r.last_error, r.listed) {
            (None, true) => paint("32", "listed"),
            (None, false) => paint("33", "not listed yet"),
            (Some(e), true) => paint("31", &format!("ERROR: {e}")),
            (Some(e), false) => paint("31", &format!("NOT LISTED: {e}")),
        };
        let _ = writeln!(out, "registry  {} on {} {state} ({} services, revision {})", r.prefix, r.endpoints.join(","), r.services, r.revision);
    }
    let endpoint = s.api_endpoint.as_ref().map(|e| format!(" {} (from {})", e.url, e.from)).unwrap_or_default();
    if let Some(api) = &s.api_server {
        let state = if api.connected { paint("32", "connected") } else { paint("31", "UNREACHABLE") };
        let _ = writeln!(out, "apiserver {state}{endpoint} ({} objects, {} relist(s) after 410 Gone)", api.objects, api.relists_after_410);
    } else if !endpoint.is_empty() {
        let _ = writeln!(out, "apiserver{endpoint}");
    }
    if !s.etcd.endpoints.is_empty() {
        let etcd = if s.etcd.connected { paint("32", "connected") } else { paint("31", "UNREACHABLE") };
        let _ = writeln!(out, "etcd      {etcd} {} (revision {})", s.etcd.endpoints.join(","), s.etcd.revision);
    }
    let file = |f: &Option<String>| f.clone().unwrap_or_else(|| paint("31", "not written"));
    let _ = writeln!(out, "files     subnet.env {}", file(&s.files.subnet_env));
    let _ = writeln!(out, "          CNI config {}", file(&s.files.cni_conflist));
    if let Some(cni) = &s.cni {
        let _ = writeln!(out, "pods      {} on this node, {} addresses free", cni.pods, cni.addresses_free);
    }
    let _ = writeln!(out, "version   {} (up {})", s.version, ago(s.now.saturating_sub(s.started_at)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> NodeStatus {
        NodeStatus {
            node: "node0".into(),
            version: "0.1.0".into(),
            now: 1_000_000,
            started_at: 999_000,
            phase: Phase::Running,
            lease: Some(LeaseStatus {
                subnet: "10.244.3.0/24".into(),
                public_ip: "198.18.0.10".into(),
                reservation: false,
                expires_at: Some(1_000_000 + 80_000),
                renew_at: Some(1_000_000 + 76_400),
                last_renewal: None,
                acquired_at: 999_000,
            }),
            backend: Some(BackendStatus { kind: "vxlan".into(), device: "netd.1".into(), device_present: true, vni: 1, port: 8472, mtu: 1450, underlay: "eth0".into(), datapath: None }),
            peers: vec![PeerStatus { key: "/coreos.com/network/subnets/10.244.4.0-24".into(), subnet: "10.244.4.0/24".into(), public_ip: "198.18.0.11".into(), programmed: true, skipped: None }],
            malformed_keys: vec![],
            route_conflicts: vec![],
            etcd: EtcdStatus { endpoints: vec!["http://198.18.0.1:2379".into()], connected: true, last_ok: Some(1_000_000), last_error: None, revision: 42 },
            last_sync: Some(SyncStatus { at: 999_999, duration_ms: 1.5, changes: 0, errors: vec![] }),
            files: FilesStatus { subnet_env: Some("/run/netd/subnet.env".into()), cni_conflist: Some("/etc/cni/net.d/10-netd.conflist".into()) },
            cni: Some(CniStatus { pods: 2, addresses_free: 251, error: None }),
            services: None,
            dns: None,
            api_server: None,
            api_endpoint: None,
            service_registry: None,
            problems: vec![],
        }
    }

    #[test]
    fn healthy_node() {
        let s = healthy();
        assert_eq!(verdict(&s), (Health::Healthy, vec![]));
        let text = render(&s, false);
        assert!(text.starts_with("HEALTHY  node0: pod network is up\n"), "{text}");
        assert!(text.contains("lease     10.244.3.0/24 for 198.18.0.10 — expires in 22h"), "{text}");
        assert!(text.contains("10.244.4.0/24      via 198.18.0.11     route ok"), "{text}");
        assert!(!text.contains('\x1b'));
        assert!(render(&s, true).contains("\x1b[1;32mHEALTHY"));
    }

    #[test]
    fn etcd_down_is_degraded_not_unhealthy() {
        let mut s = healthy();
        s.etcd.connected = false;
        s.etcd.last_ok = Some(s.now - 300);
        s.etcd.last_error = Some("connection refused".into());
        let (h, why) = verdict(&s);
        assert_eq!(h, Health::Degraded);
        assert_eq!(why, ["etcd unreachable for 5m: connection refused; the dataplane keeps its last known state"]);
        assert_eq!(h.exit_code(), 1);
    }

    #[test]
    fn lost_lease_missing_route_and_device_are_unhealthy() {
        let mut s = healthy();
        s.lease.as_mut().unwrap().expires_at = Some(s.now - 10);
        s.peers[0].programmed = false;
        s.backend.as_mut().unwrap().device_present = false;
        let (h, why) = verdict(&s);
        assert_eq!(h, Health::Unhealthy);
        assert_eq!(h.exit_code(), 2);
        assert_eq!(why.len(), 3, "{why:?}");
        assert!(why[0].contains("expired 10s ago"));
        let text = render(&s, false);
        assert!(text.starts_with("UNHEALTHY"), "{text}");
        assert!(text.contains("route MISSING"));
    }

    #[test]
    fn skipped_peers_and_sync_errors_are_reported() {
        let mut s = healthy();
        s.peers.push(PeerStatus { key: "/coreos.com/network/subnets/10.244.9.0-24".into(), subnet: "10.244.9.0/24".into(), public_ip: "198.18.0.19".into(), programmed: false, skipped: Some("VNI 2 differs from ours (1)".into()) });
        s.last_sync.as_mut().unwrap().errors.push("ip route replace ...: permission denied".into());
        s.malformed_keys.push(("/coreos.com/network/subnets/junk".into(), "bad key".into()));
        let (h, why) = verdict(&s);
        assert_eq!(h, Health::Degraded);
        assert_eq!(why.len(), 3, "{why:?}");
        assert_eq!(why[0], "peer 10.244.9.0/24 (key /coreos.com/network/subnets/10.244.9.0-24) skipped: VNI 2 differs from ours (1)");
        assert_eq!(h.exit_code(), 1);
    }

    /// A peer route not programmed because a route netd did not create has its destination
    /// leaves that peer unreachable: UNHEALTHY, saying which route is in the way, once (not
    /// again in the generic "not programmed" line).
    #[test]
    fn route_conflicts_are_unhealthy_and_name_the_route() {
        let mut s = healthy();
        s.peers[0].programmed = false;
        let reason = "10.244.4.0/24 via 198.18.0.1 dev eth0 proto static is there and netd did not create it (netd never replaces or removes such a route)";
        s.route_conflicts.push(RouteConflictStatus { subnet: "10.244.4.0/24".into(), reason: reason.into() });
        let (h, why) = verdict(&s);
        assert_eq!(h, Health::Unhealthy);
        assert_eq!(h.exit_code(), 2);
        assert_eq!(why, [format!("route to 10.244.4.0/24 not programmed: {reason}")]);
        let text = render(&s, false);
        assert!(text.starts_with("UNHEALTHY  node0: route to 10.244.4.0/24 not programmed: 10.244.4.0/24 via 198.18.0.1"), "{text}");
        assert!(text.contains("10.244.4.0/24      via 198.18.0.11     route NOT PROGRAMMED (conflict)"), "{text}");
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(j["route_conflicts"][0]["subnet"], "10.244.4.0/24");
        assert_eq!(j["peers"][0]["key"], "/coreos.com/network/subnets/10.244.4.0-24");
    }

    #[test]
    fn cni_pods_and_free_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert_eq!(CniStatus::read(&path, 24), CniStatus { pods: 0, addresses_free: 253, error: None });
        std::fs::write(&path, r#"{"lastReserved":"10.244.3.3","allocations":[{"ip":"10.244.3.2"},{"ip":"10.244.3.3"}]}"#).unwrap();
        assert_eq!(CniStatus::read(&path, 24), CniStatus { pods: 2, addresses_free: 251, error: None });
        std::fs::write(&path, "{").unwrap();
        assert!(CniStatus::read(&path, 24).error.unwrap().contains("state.json"));
        let mut s = healthy();
        assert!(render(&s, false).contains("pods      2 on this node, 251 addresses free"));
        s.cni = Some(CniStatus { pods: 253, addresses_free: 0, error: None });
        assert_eq!(verdict(&s).0, Health::Unhealthy);
    }

    #[test]
    fn a_service_dataplane_problem_degrades_and_is_listed() {
        let mut s = healthy();
        s.services = Some(ServicesStatus { mode: "nftables (eBPF unavailable)".into(), applied_revision: Some(3), problems: vec!["eBPF service dataplane unavailable".into()], ..Default::default() });
        assert_eq!(verdict(&s), (Health::Degraded, vec!["eBPF service dataplane unavailable".to_string()]));
    }

    #[test]
    fn services_dns_and_api_server_lines() {
        let mut s = healthy();
        s.services = Some(ServicesStatus {
            mode: "nftables".into(),
            services: 12,
            applied_revision: Some(40),
            last_sync: Some(s.now - 2),
            last_duration_ms: 1.25,
            service_cluster_ip_range: Some("10.96.0.0/12".into()),
            service_node_port_range: Some("30000-32767".into()),
            ..Default::default()
        });
        s.dns = Some(DnsStatus { listen: vec!["169.254.20.10:53".into()], upstreams: vec!["198.18.0.1:53".into()], services: 12, records: 30, queries_per_second: 5.0, cache_hit_ratio: Some(0.5), ..Default::default() });
        s.api_server = Some(ApiServerStatus { connected: true, synced: true, objects: 24, ..Default::default() });
        assert_eq!(verdict(&s).0, Health::Healthy);
        let text = render(&s, false);
        assert!(text.contains("services  12 programmed by nftables (revision 40), synced 2s ago in 1.2 ms\n          ClusterIPs from 10.96.0.0/12, nodePorts 30000-32767\n"), "{text}");
        assert!(text.contains("dns       30 records for 12 services on 169.254.20.10:53; 5 queries/s, cache hits 50%; upstream 198.18.0.1:53"), "{text}");
        assert!(text.contains("apiserver connected (24 objects, 0 relist(s) after 410 Gone)"), "{text}");
        assert!(!text.contains("skydns"), "{text}");
        let sky = SkyDnsStatus { prefix: "/skydns/".into(), zones: vec!["cluster.local".into()], listed: true, records: 2, revision: 9, ..Default::default() };
        s.dns.as_mut().unwrap().skydns = Some(sky);
        assert!(render(&s, false).contains("skydns    /skydns/ for cluster.local listed (2 records, revision 9)"), "{}", render(&s, false));
        assert_eq!(verdict(&s).0, Health::Healthy);
        let sky = s.dns.as_mut().unwrap().skydns.as_mut().unwrap();
        (sky.skipped, sky.skipped_total) = (vec!["/skydns/local/x: not a SkyDNS value".into()], 1);
        let (h, why) = verdict(&s);
        assert_eq!(h, Health::Degraded);
        assert!(why.iter().any(|w| w.contains("1 malformed SkyDNS value(s) skipped: /skydns/local/x: not a SkyDNS value")), "{why:?}");
        s.dns.as_mut().unwrap().skydns = None;
        s.services.as_mut().unwrap().last_error = Some("netlink: EPERM".into());
        s.api_server.as_mut().unwrap().connected = false;
        let (h, why) = verdict(&s);
        assert_eq!(h, Health::Degraded);
        assert!(why.iter().any(|w| w.contains("service sync failed: netlink: EPERM")), "{why:?}");
        assert!(why.iter().any(|w| w.contains("Kubernetes API server unreachable")), "{why:?}");
    }

    /// Which API server netd uses, and where the address came from, is on the apiserver line
    /// and in the JSON; an unreachable in-cluster address gets the hint that breaks the
    /// bootstrap deadlock.
    #[test]
    fn the_api_server_url_and_its_origin_are_shown() {
        let mut s = healthy();
        s.api_endpoint = Some(netd_kube::ApiServer { url: "https://192.168.0.10:6443".into(), from: "NETD_KUBE_API_SERVER".into(), in_cluster: false });
        assert!(render(&s, false).contains("apiserver https://192.168.0.10:6443 (from NETD_KUBE_API_SERVER)\n"), "{}", render(&s, false));
        s.api_server = Some(ApiServerStatus { connected: true, synced: true, objects: 3, ..Default::default() });
        assert!(render(&s, false).contains("apiserver connected https://192.168.0.10:6443 (from NETD_KUBE_API_SERVER) (3 objects"), "{}", render(&s, false));
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(j["api_endpoint"]["url"], "https://192.168.0.10:6443");
        assert_eq!(j["api_endpoint"]["from"], "NETD_KUBE_API_SERVER");
        s.api_server.as_mut().unwrap().connected = false;
        assert!(!verdict(&s).1[0].contains("ClusterIP"), "{:?}", verdict(&s).1);
        s.api_endpoint = Some(netd_kube::ApiServer { url: "https://10.96.0.1".into(), from: "in-cluster KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT".into(), in_cluster: true });
        let (h, why) = verdict(&s);
        assert_eq!(h, Health::Degraded);
        assert!(why[0].starts_with("Kubernetes API server at https://10.96.0.1 unreachable"), "{why:?}");
        assert!(why[0].contains("set NETD_KUBE_API_SERVER"), "{why:?}");
    }

    /// ClusterFirstWithHostNet (or a resolv.conf naming the cluster DNS IP) leaves netd only
    /// itself to forward to: status names the loop and the fix, not just "no upstream".
    #[test]
    fn a_dns_loop_is_named_with_a_hint() {
        let mut s = healthy();
        s.dns = Some(DnsStatus {
            listen: vec!["169.254.20.10:53".into(), "10.96.0.10:53".into()],
            upstreams: vec![],
            upstreams_from: "/etc/resolv.conf".into(),
            upstreams_self: vec!["10.96.0.10:53".into()],
            ..Default::default()
        });
        let (h, why) = verdict(&s);
        assert_eq!(h, Health::Degraded);
        assert!(why[0].starts_with("cluster DNS forwards to itself: the only upstream(s) in /etc/resolv.conf (10.96.0.10:53) are addresses netd answers"), "{why:?}");
        assert!(why[0].contains("dnsPolicy: Default") && why[0].contains("NETD_DNS_UPSTREAM"), "{why:?}");
        let text = render(&s, false);
        assert!(text.starts_with("DEGRADED  node0: cluster DNS forwards to itself"), "{text}");
        assert!(text.contains("upstream NONE\n          left out of the upstreams from /etc/resolv.conf (netd itself): 10.96.0.10:53\n"), "{text}");
        // With a real upstream beside it, the left-out one is only shown.
        s.dns.as_mut().unwrap().upstreams = vec!["198.18.0.1:53".into()];
        assert_eq!(verdict(&s).0, Health::Healthy);
    }

    #[test]
    fn a_service_registry_that_cannot_be_listed_is_not_healthy() {
        let mut s = healthy();
        let listed = ServiceRegistryStatus { prefix: "/netd/registry/".into(), endpoints: vec!["http://198.18.0.1:2379".into()], listed: true, last_error: None, revision: 7, services: 20000 };
        s.service_registry = Some(listed.clone());
        assert_eq!(verdict(&s), (Health::Healthy, vec![]));
        assert!(render(&s, false).contains("registry  /netd/registry/ on http://198.18.0.1:2379 listed (20000 services, revision 7)"), "{}", render(&s, false));

        let err = "etcd get --prefix /netd/registry/: decoded message length too large: found 34757588 bytes, the limit is: 4194304 bytes";
        s.service_registry = Some(ServiceRegistryStatus { listed: false, last_error: Some(err.into()), revision: 0, services: 0, ..listed.clone() });
        let (h, why) = verdict(&s);
        assert_eq!(h, Health::Degraded);
        assert_eq!(why, [format!("service registry /netd/registry/ (etcd http://198.18.0.1:2379) cannot be listed: {err}; no services are programmed and cluster names get SERVFAIL (other names still resolve)")]);
        assert!(render(&s, false).contains(&format!("registry  /netd/registry/ on http://198.18.0.1:2379 NOT LISTED: {err} (0 services, revision 0)")));

        s.service_registry = Some(ServiceRegistryStatus { last_error: Some("etcd watch /netd/registry/: connection refused".into()), ..listed.clone() });
        let (h, why) = verdict(&s);
        assert_eq!(h, Health::Degraded);
        assert!(why[0].contains("cannot be followed: etcd watch /netd/registry/: connection refused; services and DNS keep their last known state"), "{why:?}");

        s.service_registry = Some(ServiceRegistryStatus { listed: false, ..listed });
        assert_eq!(verdict(&s).1, ["service registry /netd/registry/ (etcd http://198.18.0.1:2379) not listed yet"]);
    }

    #[test]
    fn round_trips_as_json() {
        let s = healthy();
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<NodeStatus>(&j).unwrap(), s);
    }
}
