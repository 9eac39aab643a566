//! Multi-node test bed for netd.
//!
//! Every "machine" is a Linux network namespace created by this crate:
//!
//! ```text
//!   underlay ns:  br0 198.18.0.1/24, etcd on 198.18.0.1:2379
//!        |  n0      |  n1      ...   (veth, host ends enslaved to br0)
//!   node0 ns: eth0 198.18.0.10/24    node1 ns: eth0 198.18.0.11/24
//!        |  tbr0 = FLANNEL_SUBNET gateway (only once a pod is added)
//!   pod ns: eth0 10.244.x.2/24 ...
//! ```
//!
//! Nothing is ever created in, or changed in, the root namespace: links are
//! created from inside the namespaces (`ip -n NS link add ... netns OTHER`),
//! so a crashed test can at worst leave namespaces behind, and those are
//! reaped by [`reap_stale_namespaces`] at the start of the next
//! [`Cluster::new`].
//!
//! Every resource is an RAII guard: processes are killed and namespaces
//! deleted on `Drop`, including while unwinding from a failed assertion.
//! A [`Cluster`] dropped during a panic first prints the netd and etcd log
//! tails (see [`Cluster::dump_logs`]), because those are what explain a
//! failure.

mod apiserver;
mod cluster;
pub mod daemonset;
mod cmd;
mod dnsload;
mod etcd;
pub mod ebpf;
pub mod flannel;
pub mod inventory;
mod netd_bin;
mod netns;
mod node;
mod pod;
mod systemd;
pub mod upgrade;
pub mod podman;
mod wait;

pub use inventory::{Inventory, InventoryDiff, InventoryScope};
pub use apiserver::{kube_node, FakeApiServer};
pub use podman::NodeHost;
pub use cluster::{Cluster, DEFAULT_ETCD_PREFIX, UNDERLAY_GATEWAY};
pub use dnsload::{dns_query, DnsLoad, DnsLoadReport, LOSS_TIMEOUT};
pub use etcd::{Etcd, TlsFiles};
pub use netd_bin::{fake_apiserver_binary, netd_binary, netd_cni_binary};
pub use netns::{namespace_prefix, reap_stale_namespaces, thread_in_netns, Netns};
pub use node::{set_thread_netd_env, Node};
pub use pod::Pod;
pub use systemd::FakeSystemd;
pub use wait::wait_until;
