//! The service registry: Services and EndpointSlices in etcd (no Kubernetes API server needed),
//! `netd apply/get/delete/config`, the cluster's service ranges, and the watch that feeds the
//! proxy its snapshots.

pub mod changes;
pub mod cli;
pub mod config;
mod etcd_error;
pub mod manifest;
pub mod store;
pub mod table;

pub use etcd_error::etcd_brief;
pub use cli::{run_cli, CliError, EtcdConnArgs, RegistryArgs, ServiceCommand};
pub use changes::{Applied, Change};
pub use config::{AllocOptions, ClusterConfig};
pub use manifest::{apply_manifests, manifest_refs, ApplyError, FieldError, Kind, Object, ObjectRef};
pub use store::{etcd_client, etcd_tls, RegistryError, RegistryOptions, ServiceRegistry, WatchStatus, DEFAULT_PREFIX};
