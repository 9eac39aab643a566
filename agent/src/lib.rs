//! netd: one daemon per Kubernetes node for the whole node network.
//!
//! Pure planners (`netconf`, `lease`, `alloc`, `overlay`, `masq` rendering, `subnet_env`) decide
//! what the node must look like; thin shells (`registry` for etcd, `netlink` for the kernel) read
//! and write; `daemon` runs the loop between them.

pub mod alloc;
pub mod cleanup;
pub mod cli;
pub mod cniconf;
pub mod daemon;
pub mod lease;
pub mod logging;
pub mod masq;
pub mod metrics;
pub mod netconf;
pub mod netlink;
pub mod overlay;
pub mod overlay_text;
pub mod registry;
pub mod server;
pub mod services;
pub mod skydns;
pub mod status;
pub mod subnet_env;
pub mod systemd;
pub mod takeover;
