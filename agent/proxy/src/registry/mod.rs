//! The service registry: Services and EndpointSlices in etcd (no Kubernetes API server needed),
//! `netd apply/get/delete`, and the watch that feeds the proxy its snapshots.

pub mod cli;
pub mod manifest;
pub mod store;
pub mod table;

pub use cli::{run_cli, CliError, EtcdConnArgs, RegistryArgs, ServiceCommand};
pub use manifest::{apply_manifests, ApplyError, FieldError, Object};
pub use store::{etcd_tls, AllocOptions, Applied, RegistryError, RegistryOptions, ServiceRegistry, WatchStatus, DEFAULT_PREFIX};
