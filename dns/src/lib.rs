//! netd's cluster DNS: what CoreDNS does for a Kubernetes cluster, on every node.
//!
//! - [`build_zone`] (one-off) and [`ZoneBuilder`] (incremental: only changed services are
//!   encoded again) turn Services and EndpointSlices (the same k8s-openapi types the proxy
//!   consumes) into a [`Zone`]: every answer of the cluster domain encoded once, up front.
//! - [`DnsServer`] serves it: one `SO_REUSEPORT` UDP socket per core with a worker thread
//!   receiving and sending in batches (`recvmmsg`/`sendmmsg`), answering from the current zone
//!   (swapped atomically by [`DnsServer::set_zone`]) without allocating; TCP; names outside
//!   the zone forwarded to the node's resolvers with a TTL-respecting cache, for clients of
//!   the cluster network and the node itself.
//! - [`Args`] are the flags (`--dns-listen`, `--cluster-dns-ip`, ...) to flatten into
//!   `netd run`; [`DnsServer::metrics`] returns plain counters for the agent's registry.
//!
//! ```no_run
//! # fn main() -> Result<(), netd_dns::DnsError> {
//! use std::sync::Arc;
//! let cfg = netd_dns::ServerConfig::default();
//! let zone_cfg = cfg.zone.clone();
//! let server = netd_dns::DnsServer::start(cfg)?;
//! // On every registry snapshot:
//! let (services, slices) = (vec![], vec![]);
//! server.set_zone(Arc::new(netd_dns::build_zone(&zone_cfg, &services, &slices)));
//! # Ok(()) }
//! ```

mod acl;
mod answer;
mod args;
mod cache;
pub mod config;
#[doc(hidden)]
pub mod fixtures;
mod forward;
pub mod hosts;
pub mod handover;
pub mod lo;
mod metrics;
pub mod resolv;
mod server;
pub mod stub;
pub mod skydns;
pub mod wire;
mod zone;

use std::net::{IpAddr, SocketAddr};

pub use args::{parse_duration, Args};
pub use metrics::{DnsMetrics, LatencyHistogram, RequestCount, LATENCY_BOUNDS, QTYPE_NAMES, RCODE_NAMES};
pub use server::{DnsServer, ServerConfig};
pub use zone::{build_zone, Zone, ZoneBuilder, ZoneConfig, ZoneStats, DNS_SCHEMA_VERSION};

/// Errors starting or configuring the server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot bind {addr} ({proto}): {source}")]
    Bind {
        addr: SocketAddr,
        proto: &'static str,
        source: std::io::Error,
    },
    #[error("cannot put {ip} on lo: {reason}")]
    LoAddress { ip: IpAddr, reason: String },
    #[error("{op} {}: {source}", path.display())]
    Handover {
        op: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The request path without sockets, for the fuzz target (`dns/fuzz`) and robustness tests:
/// answers `packet` as a UDP and as a TCP query from an allowed and from a foreign client,
/// against a small fixed zone, and also feeds it to the upstream-response parser. Never
/// panics (that is the property under test).
#[doc(hidden)]
pub mod fuzzing {
    use std::net::IpAddr;
    use std::sync::OnceLock;
    use std::time::Instant;

    use crate::acl::Acl;
    use crate::answer::{handle, Ctx, Transport, MAX_MESSAGE};
    use crate::cache::{entry_from_response, Cache, CachePolicy};
    use crate::metrics::Counters;
    use crate::zone::Zone;

    struct Fixture {
        zone: Zone,
        sky: crate::skydns::SkyZone,
        hosts: crate::hosts::Hosts,
        cache: Cache,
        acl: Acl,
        counters: Counters,
    }

    fn fixture() -> &'static Fixture {
        static F: OnceLock<Fixture> = OnceLock::new();
        F.get_or_init(|| Fixture {
            zone: crate::fixtures::sample_zone(),
            sky: crate::fixtures::sample_skydns(),
            hosts: crate::hosts::Hosts::parse("198.18.9.1 db.corp.test db\nfd00::9 db.corp.test\n"),
            cache: Cache::new(64),
            acl: Acl::new(vec!["10.244.0.0/16".parse().expect("static")]),
            counters: Counters::default(),
        })
    }

    /// Runs `packet` through every entry point of the request path.
    pub fn request_path(packet: &[u8]) {
        let f = fixture();
        let mut out = vec![0u8; MAX_MESSAGE];
        let clients: [IpAddr; 2] = [[10, 244, 1, 2].into(), [198, 51, 100, 1].into()];
        for (i, client) in clients.into_iter().enumerate() {
            for t in [Transport::Udp, Transport::Tcp] {
                let ctx = Ctx {
                    zone: &f.zone,
                    sky: &f.sky,
                    hosts: &f.hosts,
                    cache: &f.cache,
                    acl: &f.acl,
                    counters: &f.counters,
                    udp_cap: 1232,
                    rotation: i as u32,
                };
                let _ = handle(&ctx, packet, client, t, &mut out);
            }
        }
        if let Ok(q) = crate::wire::parse_query(packet) {
            let _ = entry_from_response(packet, q.name(), q.qtype, q.qclass, CachePolicy::default(), Instant::now());
        }
        let name = crate::wire::name_from_str("www.example.com").unwrap_or_default();
        let _ = entry_from_response(packet, &name, 1, 1, CachePolicy::default(), Instant::now());
    }
}
