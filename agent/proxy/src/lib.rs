//! netd's service proxy: what kube-proxy does, as a library the netd daemon runs.
//!
//! ```text
//! registry (etcd: Services, EndpointSlices) ──► ServiceSnapshot ──► plan::desired ──► Plan
//!                                                                                 │
//!                         ┌───────────────────────────────────────────────────────┤
//!                         ▼                                                       ▼
//!          nft::Nftables (netlink, verdict maps)            iptables::Iptables (iptables-restore)
//! ```
//!
//! Sources never touch the kernel, appliers never read etcd; everything in between is pure.

pub mod etcd;
#[cfg(test)]
mod golden;
pub mod iptables;
pub mod model;
pub mod plan;
pub mod registry;
pub mod snapshot;
pub mod testdata;

pub use model::{Endpoint, NodeInfo, Plan, Proto, ServicePortKey, ServicePortPlan};
pub use plan::desired;
pub use snapshot::{NsName, ServiceSnapshot};
pub mod nft;
pub mod conntrack;
pub mod dataplane;
pub mod health;
pub mod proxy;

pub use dataplane::{Backend, Dataplane};
pub use proxy::{run_proxy, run_proxy_with, ProxyArgs, ProxyConfig, ProxyMode, ProxyStatus};
