//! Prometheus metrics (`prometheus-client`), scraped from `--metrics-listen` at `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    pub lease_expiry: Gauge,
    pub lease_acquisitions: Counter,
    pub lease_renewals: Family<Labels, Counter>,
    pub peers: Gauge,
    pub peers_skipped: Gauge,
    pub malformed_keys: Gauge,
    pub route_conflicts: Gauge,
    pub sync_duration: Histogram,
    pub sync_errors: Counter,
    pub overlay_changes: Family<Labels, Counter>,
    pub etcd_up: Gauge,
    pub etcd_errors: Counter,
    pub ready: Gauge,
    pub udp_traffic: Family<Labels, Counter>,
    pub udp_dropped: Family<Labels, Counter>,
    pub udp_kernel: Family<Labels, Counter>,
    pub dns_requests: Family<Labels, Counter>,
    pub dns_cache: Family<Labels, Counter>,
    pub dns_forwards: Family<Labels, Counter>,
    pub cni_pods: Gauge,
    pub cni_addresses_free: Gauge,
    pub proxy_fallback: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("netd");
        let m = Metrics {
            lease_expiry: Gauge::default(),
            lease_acquisitions: Counter::default(),
            lease_renewals: Family::default(),
            peers: Gauge::default(),
            peers_skipped: Gauge::default(),
            malformed_keys: Gauge::default(),
            route_conflicts: Gauge::default(),
            sync_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            sync_errors: Counter::default(),
            overlay_changes: Family::default(),
            etcd_up: Gauge::default(),
            etcd_errors: Counter::default(),
            ready: Gauge::default(),
            udp_traffic: Family::default(),
            udp_dropped: Family::default(),
            udp_kernel: Family::default(),
            dns_requests: Family::default(),
            dns_cache: Family::default(),
            dns_forwards: Family::default(),
            cni_pods: Gauge::default(),
            cni_addresses_free: Gauge::default(),
            proxy_fallback: Gauge::default(),
            registry: Registry::default(),
        };
        r.register("build", "netd build information", Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]));
        r.register("lease_expiry_timestamp_seconds", "When this node's subnet lease expires (0 for a reservation)", m.lease_expiry.clone());
        r.register("lease_acquisitions", "Subnet leases acquired (more than one means the lease was lost or the config changed)", m.lease_acquisitions.clone());
        r.register("lease_renewals", "Subnet lease renewals by result", m.lease_renewals.clone());
        r.register("peers", "Peer subnets programmed into the overlay", m.peers.clone());
        r.register("peers_skipped", "Peer leases skipped (outside the network, bad data, other backend, overlaps)", m.peers_skipped.clone());
        r.register("malformed_keys", "Keys under <prefix>/subnets/ that could not be parsed", m.malformed_keys.clone());
        r.register("route_conflicts", "Peer routes not programmed because a route netd did not create has their destination", m.route_conflicts.clone());
        r.register("sync_duration_seconds", "Time to reconcile the dataplane with the desired state", m.sync_duration.clone());
        r.register("sync_errors", "Dataplane changes that failed", m.sync_errors.clone());
        r.register("overlay_changes", "Overlay changes applied, by operation", m.overlay_changes.clone());
        r.register("etcd_up", "1 while etcd answers", m.etcd_up.clone());
        r.register("etcd_errors", "Failed etcd requests and broken watches", m.etcd_errors.clone());
        r.register("ready", "1 once the node can serve pods (/readyz)", m.ready.clone());
        r.register("udp_traffic", "udp backend: packets and bytes through the datapath, by unit and direction", m.udp_traffic.clone());
        r.register("dns_requests", "Cluster DNS requests by query type and response code", m.dns_requests.clone());
        r.register("dns_cache_lookups", "Cluster DNS forward-cache lookups by result (hit, miss)", m.dns_cache.clone());
        r.register("dns_forwards", "Queries forwarded upstream by result (ok, failed)", m.dns_forwards.clone());
        r.register("cni_pods", "Pods netd-cni has set up on this node (addresses in use)", m.cni_pods.clone());
        r.register("cni_addresses_free", "Pod addresses still free in this node's subnet", m.cni_addresses_free.clone());
        r.register(
            "service_proxy_fallback",
            "1 while --proxy-mode ebpf cannot run on this node and services are programmed by the fallback (--ebpf-fallback) or not at all",
            m.proxy_fallback.clone(),
        );
        r.register("udp_dropped", "udp backend: packets dropped, by reason (unknown_source: not from a peer's public IP)", m.udp_dropped.clone());
        r.register(
            "udp_kernel",
            "udp backend: what the kernel fast path (tc eBPF) did, by unit (packets: a GSO super-packet counts once; bytes: inner) and direction (out: encapsulated, in: decapsulated, passed_out/passed_in: left to the userspace datapath)",
            m.udp_kernel.clone(),
        );
        Metrics { registry: r, ..m }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    pub fn change(&self, op: &'static str) {
        self.overlay_changes.get_or_create(&vec![("op", op.to_string())]).inc();
    }

    pub fn udp(&self, unit: &'static str, dir: &'static str, n: u64) {
        self.udp_traffic.get_or_create(&vec![("unit", unit.to_string()), ("dir", dir.to_string())]).inc_by(n);
    }

    pub fn udp_kernel(&self, unit: &'static str, dir: &'static str, n: u64) {
        self.udp_kernel.get_or_create(&vec![("unit", unit.to_string()), ("dir", dir.to_string())]).inc_by(n);
    }

    pub fn udp_drop(&self, reason: &'static str, n: u64) {
        self.udp_dropped.get_or_create(&vec![("reason", reason.to_string())]).inc_by(n);
    }

    pub fn dns_request(&self, qtype: &str, rcode: &str, n: u64) {
        self.dns_requests.get_or_create(&vec![("qtype", qtype.to_string()), ("rcode", rcode.to_string())]).inc_by(n);
    }

    pub fn dns_cache(&self, hits: u64, misses: u64) {
        self.dns_cache.get_or_create(&vec![("result", "hit".to_string())]).inc_by(hits);
        self.dns_cache.get_or_create(&vec![("result", "miss".to_string())]).inc_by(misses);
    }

    pub fn dns_forwards(&self, all: u64, failed: u64) {
        self.dns_forwards.get_or_create(&vec![("result", "ok".to_string())]).inc_by(all.saturating_sub(failed));
        self.dns_forwards.get_or_create(&vec![("result", "failed".to_string())]).inc_by(failed);
    }

    pub fn renewal(&self, result: &'static str) {
        self.lease_renewals.get_or_create(&vec![("result", result.to_string())]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_documented_names() {
        let m = Metrics::new();
        m.change("set_route");
        m.renewal("ok");
        m.peers.set(3);
        m.sync_duration.observe(0.002);
        let text = m.encode();
        for name in [
            "netd_build_info{version=",
            "netd_lease_expiry_timestamp_seconds ",
            "netd_lease_renewals_total{result=\"ok\"} 1",
            "netd_peers 3",
            "netd_overlay_changes_total{op=\"set_route\"} 1",
            "netd_sync_duration_seconds_count 1",
            "netd_etcd_up 0",
            "netd_ready 0",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
