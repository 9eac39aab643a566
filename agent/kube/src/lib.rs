//! netd inside Kubernetes: the API server as a source.
//!
//! ```text
//!  API server ──list+watch──► services::run_service_source ──► watch<Arc<ServiceSnapshot>> ──► proxy, DNS
//!      │      ──list+watch──► nodes::run_node_watch       ──► watch<Arc<Vec<NodeLease>>>   ──► overlay
//!      │      ◄──get, patch── nodes::node_subnet / publish_annotations  (this node: podCIDR, annotations)
//! ```
//!
//! - `--source kubernetes`: Services and EndpointSlices of all namespaces feed the same
//!   [`ServiceSnapshot`](netd_proxy::snapshot::ServiceSnapshot) the etcd registry feeds.
//! - `--subnet-manager kube`: flannel's kube subnet manager (Node `spec.podCIDR`, flannel's node
//!   annotations), interoperable with flanneld nodes in kube mode.
//!
//! Sources never touch the kernel. They keep the last good state while the API server is
//! unreachable, relist on 410 Gone and publish only complete states.
//!
//! RBAC (ClusterRole): `services`, `endpointslices.discovery.k8s.io`: list, watch;
//! `nodes`: get, list, watch; `nodes/status`: patch.

pub mod args;
pub mod client;
pub mod error;
mod listwatch;
pub mod nodes;
pub mod services;
pub mod status;
#[cfg(feature = "testserver")]
pub mod testserver;

pub use args::{KubeArgs, SourceKind, SubnetManagerKind};
pub use client::{client, client_from_config, client_with_env, ApiServer};
pub use error::KubeError;
pub use listwatch::WatchConfig;
pub use nodes::{
    node_subnet, node_subnet_with, node_to_lease, pod_cidr, publish_annotations, run_node_watch, run_node_watch_with, Annotations, NodeAttrs, NodeLease,
    DEFAULT_ANNOTATION_PREFIX,
};
pub use services::{run_service_source, run_service_source_with};
pub use status::SourceStatus;
