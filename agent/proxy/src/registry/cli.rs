//! `netd apply`, `netd get`, `netd delete`: clap definitions (doc comments are the help text,
//! every flag is also a `NETD_*` environment variable) and [`run_cli`].

use std::io::Read as _;
use std::ops::RangeInclusive;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::manifest::{apply_manifests, ApplyError};
use super::store::{AllocOptions, RegistryError, RegistryOptions, ServiceRegistry, DEFAULT_PREFIX};
use super::table::{self, Output};
use crate::snapshot::NsName;

/// How to reach etcd: its endpoints and TLS files (the same flags for `netd run` and the
/// registry commands).
#[derive(Debug, Clone, Args)]
pub struct EtcdConnArgs {
    /// etcd endpoints, comma-separated.
    #[arg(long, env = "NETD_ETCD_ENDPOINTS", value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub etcd_endpoints: Vec<String>,
    /// CA certificate (PEM) to verify etcd's TLS certificate.
    #[arg(long, env = "NETD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,
    /// Client certificate (PEM) for etcd TLS.
    #[arg(long, env = "NETD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,
    /// Client key (PEM) for etcd TLS.
    #[arg(long, env = "NETD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,
}

impl EtcdConnArgs {
    /// The connection, for keys under `prefix`.
    pub fn options(&self, prefix: &str) -> RegistryOptions {
        RegistryOptions {
            endpoints: self.etcd_endpoints.clone(),
            prefix: prefix.to_string(),
            ca_file: self.etcd_cafile.clone(),
            cert_file: self.etcd_certfile.clone(),
            key_file: self.etcd_keyfile.clone(),
        }
    }
}

/// Where the registry is (shared by every registry subcommand).
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    #[command(flatten)]
    pub etcd: EtcdConnArgs,
    /// etcd key prefix of the service registry (<prefix>/services/<ns>/<name>, <prefix>/endpointslices/<ns>/<name>).
    #[arg(long, env = "NETD_REGISTRY_PREFIX", default_value = DEFAULT_PREFIX)]
    pub registry_prefix: String,
}

impl RegistryArgs {
    pub fn options(&self) -> RegistryOptions {
        self.etcd.options(&self.registry_prefix)
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum ServiceCommand {
    /// Create or update Services and EndpointSlices (and v1 Endpoints, stored as EndpointSlices) from Kubernetes manifests.
    Apply(ApplyArgs),
    /// List Services or their endpoints.
    Get(GetArgs),
    /// Delete a Service (releasing its ClusterIP and nodePorts) or an EndpointSlice.
    Delete(DeleteArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ApplyArgs {
    /// Manifest file (YAML or JSON, several documents); `-` reads standard input.
    #[arg(short = 'f', long = "filename", env = "NETD_APPLY_FILENAME")]
    pub filename: PathBuf,
    /// Range ClusterIPs are allocated from.
    #[arg(long, env = "NETD_SERVICE_CIDR", default_value = "10.96.0.0/12")]
    pub service_cidr: Ipv4Net,
    /// Range nodePorts are allocated from (FIRST-LAST).
    #[arg(long, env = "NETD_SERVICE_NODE_PORT_RANGE", default_value = "30000-32767", value_parser = parse_port_range)]
    pub service_node_port_range: RangeInclusive<u16>,
    /// Only validate; write nothing.
    #[arg(long, env = "NETD_DRY_RUN")]
    pub dry_run: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Resource {
    #[value(alias = "service", alias = "svc")]
    Services,
    #[value(alias = "ep", alias = "endpointslices", alias = "endpointslice")]
    Endpoints,
}

#[derive(Debug, Clone, Args)]
pub struct GetArgs {
    /// What to list: services (svc) or endpoints (ep, endpointslices).
    pub resource: Resource,
    /// Only this object.
    pub name: Option<String>,
    /// Namespace.
    #[arg(short = 'n', long, env = "NETD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Every namespace.
    #[arg(short = 'A', long, env = "NETD_ALL_NAMESPACES")]
    pub all_namespaces: bool,
    /// Output format.
    #[arg(short = 'o', long, env = "NETD_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeleteKind {
    #[value(alias = "svc", alias = "services")]
    Service,
    #[value(alias = "endpointslices")]
    Endpointslice,
}

#[derive(Debug, Clone, Args)]
pub struct DeleteArgs {
    /// service (svc) or endpointslice.
    pub kind: DeleteKind,
    /// Name of the object.
    pub name: String,
    /// Namespace.
    #[arg(short = 'n', long, env = "NETD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// Parses `30000-32767`.
pub fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?} is not FIRST-LAST"))?;
    let (a, b): (u16, u16) = (a.trim().parse().map_err(|_| format!("{a:?} is not a port"))?, b.trim().parse().map_err(|_| format!("{b:?} is not a port"))?);
    if a == 0 || a > b {
        return Err(format!("{s:?} is not a valid port range"));
    }
    Ok(a..=b)
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{0}")]
    Invalid(#[from] ApplyError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Runs one registry subcommand, printing to stdout.
pub async fn run_cli(cmd: ServiceCommand) -> Result<(), CliError> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    match cmd {
        ServiceCommand::Apply(a) => {
            let text = if a.filename.as_os_str() == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s).map_err(|source| CliError::Read { path: "-".into(), source })?;
                s
            } else {
                std::fs::read_to_string(&a.filename).map_err(|source| CliError::Read { path: a.filename.display().to_string(), source })?
            };
            let objects = apply_manifests(&text)?;
            if a.dry_run {
                for o in &objects {
                    println!("{} valid (dry run)", o.describe());
                }
                return Ok(());
            }
            let reg = ServiceRegistry::connect(&a.registry.options()).await?;
            let alloc = AllocOptions { service_cidr: a.service_cidr, node_ports: a.service_node_port_range };
            for r in reg.apply(objects, &alloc).await? {
                println!("{r}");
            }
        }
        ServiceCommand::Get(g) => {
            let reg = ServiceRegistry::connect(&g.registry.options()).await?;
            let snap = reg.snapshot().await?;
            let ns_ok = |ns: &str| g.all_namespaces || ns == g.namespace;
            let name_ok = |n: &str| g.name.as_deref().is_none_or(|want| want == n);
            match g.resource {
                Resource::Services => {
                    let items: Vec<Service> = snap.services().iter().filter(|(k, _)| ns_ok(&k.namespace) && name_ok(&k.name)).map(|(_, s)| (**s).clone()).collect();
                    if items.is_empty() && g.name.is_some() {
                        return Err(RegistryError::NotFound(format!("service \"{}\"", g.name.unwrap_or_default())).into());
                    }
                    print!("{}", match g.output {
                        Output::Json | Output::Yaml => table::list(&items, "v1", "Service", g.output == Output::Yaml),
                        o => table::services_table(&items, g.all_namespaces, o == Output::Wide, now),
                    });
                }
                Resource::Endpoints => {
                    // By service name (as kubectl get endpoints NAME) or by slice name.
                    let items: Vec<EndpointSlice> = snap
                        .all_slices()
                        .filter(|(k, s)| {
                            let svc = s.metadata.labels.as_ref().and_then(|l| l.get(crate::snapshot::SERVICE_NAME_LABEL)).cloned().unwrap_or_default();
                            ns_ok(&k.namespace) && (name_ok(&k.name) || name_ok(&svc))
                        })
                        .map(|(_, s)| (**s).clone())
                        .collect();
                    print!("{}", match g.output {
                        Output::Json | Output::Yaml => table::list(&items, "discovery.k8s.io/v1", "EndpointSlice", g.output == Output::Yaml),
                        o => table::endpoints_table(&items, g.all_namespaces, o == Output::Wide, now),
                    });
                }
            }
        }
        ServiceCommand::Delete(d) => {
            let reg = ServiceRegistry::connect(&d.registry.options()).await?;
            let id = NsName::new(d.namespace.clone(), d.name.clone());
            match d.kind {
                DeleteKind::Service => {
                    reg.delete_service(&id).await?;
                    println!("service \"{}\" deleted", d.name);
                }
                DeleteKind::Endpointslice => {
                    reg.delete_slice(&id).await?;
                    println!("endpointslice \"{}\" deleted", d.name);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: ServiceCommand,
    }

    #[test]
    fn cli_is_well_formed_and_every_flag_has_an_env_var() {
        Cli::command().debug_assert();
        for sub in Cli::command().get_subcommands() {
            for arg in sub.get_arguments() {
                if arg.get_long().is_some() && !["help", "version"].contains(&arg.get_id().as_str()) {
                    let env = arg.get_env().unwrap_or_else(|| panic!("{} --{} has no env var", sub.get_name(), arg.get_id()));
                    assert!(env.to_string_lossy().starts_with("NETD_"), "{env:?}");
                }
            }
        }
    }

    #[test]
    fn parses_kubectl_like_commands() {
        let c = Cli::try_parse_from(["netd", "get", "svc", "-A", "-o", "wide"]).unwrap();
        let ServiceCommand::Get(g) = c.cmd else { panic!() };
        assert!(g.all_namespaces && g.output == Output::Wide && g.resource == Resource::Services);
        let c = Cli::try_parse_from(["netd", "delete", "service", "web", "-n", "prod"]).unwrap();
        let ServiceCommand::Delete(d) = c.cmd else { panic!() };
        assert_eq!((d.kind, d.name.as_str(), d.namespace.as_str()), (DeleteKind::Service, "web", "prod"));
        let c = Cli::try_parse_from(["netd", "apply", "-f", "-", "--service-node-port-range", "31000-31010"]).unwrap();
        let ServiceCommand::Apply(a) = c.cmd else { panic!() };
        assert_eq!(a.service_node_port_range, 31000..=31010);
        assert!(parse_port_range("5-1").is_err());
    }
}
