//! `netd apply`, `netd get`, `netd delete`, `netd config`: clap definitions (doc comments are the help text,
//! every flag is also a `NETD_*` environment variable) and [`run_cli`].

use std::io::{Read as _, Write};
use std::ops::RangeInclusive;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::config::{parse_port_range, AllocOptions};
use super::manifest::{apply_manifests, manifest_refs, ApplyError, Kind, ObjectRef};
use super::store::{RegistryError, RegistryOptions, ServiceRegistry, DEFAULT_PREFIX};
use super::table::{self, Output};

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
    /// Delete a Service (releasing its ClusterIP and nodePorts, with its EndpointSlices), endpoints, or what a manifest names.
    Delete(DeleteArgs),
    /// Show or set the cluster's service ranges (kept in etcd beside the registry: every `netd apply` allocates from them, every node reads them).
    Config(ConfigArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ApplyArgs {
    /// Manifest file (YAML or JSON, several documents); `-` reads standard input.
    #[arg(short = 'f', long = "filename", env = "NETD_APPLY_FILENAME")]
    pub filename: PathBuf,
    /// Range ClusterIPs are allocated from, when the cluster has none yet (default 10.96.0.0/12); otherwise it must be the cluster's (`netd config get`).
    #[arg(long, env = "NETD_SERVICE_CIDR", value_parser = parse_service_cidr)]
    pub service_cidr: Option<Ipv4Net>,
    /// Range nodePorts are allocated from (FIRST-LAST), when the cluster has none yet (default 30000-32767); otherwise it must be the cluster's.
    #[arg(long, env = "NETD_SERVICE_NODE_PORT_RANGE", value_parser = parse_port_range)]
    pub service_node_port_range: Option<RangeInclusive<u16>>,
    /// Only validate; write nothing (and read nothing from etcd).
    #[arg(long, env = "NETD_DRY_RUN")]
    pub dry_run: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// Kinds, with the same names and aliases for every verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Resource {
    #[value(name = "services", alias = "service", alias = "svc")]
    Services,
    /// v1 Endpoints: `get` shows the EndpointSlices of the Service of that name (or the slice of
    /// that name); `delete` removes the slices a v1 Endpoints was converted to.
    #[value(name = "endpoints", alias = "ep")]
    Endpoints,
    #[value(name = "endpointslices", alias = "endpointslice")]
    EndpointSlices,
}

#[derive(Debug, Clone, Args)]
pub struct GetArgs {
    /// What to list: services (svc), endpoints (ep), endpointslices.
    pub resource: Resource,
    /// Only this object (not found: exit 1). With -o json/yaml: the object itself, not a List.
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

#[derive(Debug, Clone, Args)]
pub struct DeleteArgs {
    /// services (svc), endpoints (ep) or endpointslices.
    #[arg(required_unless_present = "filename", requires = "name")]
    pub resource: Option<Resource>,
    /// Name of the object.
    pub name: Option<String>,
    /// Delete the objects this manifest names (`-`: standard input), as `kubectl delete -f`.
    #[arg(short = 'f', long = "filename", env = "NETD_DELETE_FILENAME", conflicts_with = "resource")]
    pub filename: Option<PathBuf>,
    /// Namespace (of an object named on the command line).
    #[arg(short = 'n', long, env = "NETD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ConfigCommand {
    /// Print the cluster's service ranges (exit 1 while none are set: the first `netd apply` sets them).
    Get(ConfigGetArgs),
    /// Set the cluster's service ranges; a range not given keeps its value. Refused while a Service holds a ClusterIP or nodePort outside the new ranges.
    Set(ConfigSetArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ConfigGetArgs {
    /// Output format: yaml or json.
    #[arg(short = 'o', long, env = "NETD_OUTPUT", value_enum, default_value_t = Output::Yaml)]
    pub output: Output,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Clone, Args)]
#[group(id = "ranges", required = true, multiple = true)]
pub struct ConfigSetArgs {
    /// Range ClusterIPs are allocated from (kube-apiserver's --service-cluster-ip-range), /12 to /30.
    #[arg(long, env = "NETD_SERVICE_CIDR", value_parser = parse_service_cidr, group = "ranges")]
    pub service_cidr: Option<Ipv4Net>,
    /// Range nodePorts are allocated from, FIRST-LAST (kube-apiserver's --service-node-port-range).
    #[arg(long, env = "NETD_SERVICE_NODE_PORT_RANGE", value_parser = parse_port_range, group = "ranges")]
    pub service_node_port_range: Option<RangeInclusive<u16>>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

fn parse_service_cidr(s: &str) -> Result<Ipv4Net, String> {
    super::config::parse_service_cidr(s)
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    // Transparent: the errors are the message (with "{0}" and #[from] they were printed twice,
    // once more as the cause).
    #[error(transparent)]
    Invalid(#[from] ApplyError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("writing the output: {0}")]
    Output(#[source] std::io::Error),
}

fn read_manifest(path: &std::path::Path) -> Result<String, CliError> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(|source| CliError::Read { path: "-".into(), source })?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).map_err(|source| CliError::Read { path: path.display().to_string(), source })
    }
}

/// Runs one registry subcommand, printing to stdout.
pub async fn run_cli(cmd: ServiceCommand) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    run_cli_to(cmd, &mut out).await
}

/// Runs one registry subcommand, printing to `out`.
pub async fn run_cli_to(cmd: ServiceCommand, out: &mut dyn Write) -> Result<(), CliError> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let mut print = |s: &str| out.write_all(s.as_bytes()).map_err(CliError::Output);
    match cmd {
        ServiceCommand::Apply(a) => {
            let objects = apply_manifests(&read_manifest(&a.filename)?)?;
            if a.dry_run {
                for o in &objects {
                    print(&format!("{} valid (dry run)\n", o.describe()))?;
                }
                return Ok(());
            }
            let reg = ServiceRegistry::connect(&a.registry.options()).await?;
            let flags = AllocOptions { service_cidr: a.service_cidr, node_ports: a.service_node_port_range };
            match reg.apply(objects, &flags).await {
                Ok(done) => {
                    for r in done {
                        print(&format!("{r}\n"))?;
                    }
                }
                Err(RegistryError::Partial { done, total, source }) => {
                    // What was written is said before the error, as kubectl does.
                    for r in &done {
                        print(&format!("{r}\n"))?;
                    }
                    return Err(RegistryError::Partial { done, total, source }.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
        ServiceCommand::Get(g) => {
            let reg = ServiceRegistry::connect(&g.registry.options()).await?;
            let snap = reg.snapshot().await?;
            let ns_ok = |ns: &str| g.all_namespaces || ns == g.namespace;
            let name_ok = |n: &str| g.name.as_deref().is_none_or(|want| want == n);
            let not_found = |kind: &str| RegistryError::NotFound(format!("{kind} \"{}\" in namespace \"{}\"", g.name.clone().unwrap_or_default(), g.namespace));
            let yaml = g.output == Output::Yaml;
            match g.resource {
                Resource::Services => {
                    let items: Vec<Service> = snap.services().iter().filter(|(k, _)| ns_ok(&k.namespace) && name_ok(&k.name)).map(|(_, s)| (**s).clone()).collect();
                    if items.is_empty() && g.name.is_some() {
                        return Err(not_found("service").into());
                    }
                    print(&match g.output {
                        Output::Json | Output::Yaml if g.name.is_some() && items.len() == 1 => table::object(&items[0], "v1", "Service", yaml),
                        Output::Json | Output::Yaml => table::list(&items, "v1", "Service", yaml),
                        o => table::services_table(&items, g.all_namespaces, o == Output::Wide, now),
                    })?;
                }
                Resource::Endpoints | Resource::EndpointSlices => {
                    // endpoints NAME: the slices of that Service (as kubectl get endpoints NAME), or
                    // the slice of that name; endpointslices NAME: that slice.
                    let by_service = g.resource == Resource::Endpoints;
                    let items: Vec<EndpointSlice> = snap
                        .all_slices()
                        .filter(|(k, s)| {
                            let svc = s.metadata.labels.as_ref().and_then(|l| l.get(crate::snapshot::SERVICE_NAME_LABEL)).cloned().unwrap_or_default();
                            ns_ok(&k.namespace) && (name_ok(&k.name) || (by_service && name_ok(&svc)))
                        })
                        .map(|(_, s)| (**s).clone())
                        .collect();
                    if items.is_empty() && g.name.is_some() {
                        return Err(not_found(if by_service { "endpoints" } else { "endpointslice" }).into());
                    }
                    print(&match g.output {
                        Output::Json | Output::Yaml if g.name.is_some() && items.len() == 1 => table::object(&items[0], "discovery.k8s.io/v1", "EndpointSlice", yaml),
                        Output::Json | Output::Yaml => table::list(&items, "discovery.k8s.io/v1", "EndpointSlice", yaml),
                        o => table::endpoints_table(&items, g.all_namespaces, o == Output::Wide, now),
                    })?;
                }
            }
        }
        ServiceCommand::Delete(d) => {
            let refs = match (&d.filename, d.resource, &d.name) {
                (Some(f), _, _) => manifest_refs(&read_manifest(f)?)?,
                (None, Some(r), Some(name)) => {
                    let kind = match r {
                        Resource::Services => Kind::Service,
                        Resource::Endpoints => Kind::Endpoints,
                        Resource::EndpointSlices => Kind::EndpointSlice,
                    };
                    vec![ObjectRef { kind, namespace: d.namespace.clone(), name: name.clone() }]
                }
                _ => unreachable!("clap requires a resource and a name, or -f"),
            };
            let reg = ServiceRegistry::connect(&d.registry.options()).await?;
            let (deleted, missing) = reg.delete(&refs).await?;
            for r in deleted {
                print(&format!("{r}\n"))?;
            }
            if !missing.is_empty() {
                // One error naming every missing object: `A not found, B not found`.
                return Err(RegistryError::NotFound(missing.iter().map(ObjectRef::not_found).collect::<Vec<_>>().join(" not found, ")).into());
            }
        }
        ServiceCommand::Config(c) => match c.command {
            ConfigCommand::Get(g) => {
                let reg = ServiceRegistry::connect(&g.registry.options()).await?;
                let Some(config) = reg.cluster_config().await? else {
                    return Err(RegistryError::NotFound(format!("cluster config ({}/config; `netd config set` or the first `netd apply` sets it)", g.registry.registry_prefix.trim_end_matches('/'))).into());
                };
                print(&if g.output == Output::Json { config.to_json() + "\n" } else { config.to_yaml() })?;
            }
            ConfigCommand::Set(s) => {
                let reg = ServiceRegistry::connect(&s.registry.options()).await?;
                let flags = AllocOptions { service_cidr: s.service_cidr, node_ports: s.service_node_port_range };
                print(&reg.set_cluster_config(&flags).await?.to_yaml())?;
            }
        },
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
        let cmd = Cli::command();
        let subs: Vec<&clap::Command> = cmd.get_subcommands().flat_map(|s| std::iter::once(s).chain(s.get_subcommands())).collect();
        for sub in subs {
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
        assert_eq!((d.resource, d.name.as_deref(), d.namespace.as_str()), (Some(Resource::Services), Some("web"), "prod"));
        let c = Cli::try_parse_from(["netd", "apply", "-f", "-", "--service-node-port-range", "31000-31010"]).unwrap();
        let ServiceCommand::Apply(a) = c.cmd else { panic!() };
        assert_eq!((a.service_node_port_range, a.service_cidr), (Some(31000..=31010), None));
        assert!(Cli::try_parse_from(["netd", "apply", "-f", "-", "--service-cidr", "10.96.0.1/12"]).is_err());
        let c = Cli::try_parse_from(["netd", "delete", "-f", "web.yaml"]).unwrap();
        let ServiceCommand::Delete(d) = c.cmd else { panic!() };
        assert_eq!((d.filename.as_deref(), d.resource), (Some(std::path::Path::new("web.yaml")), None));
        assert!(Cli::try_parse_from(["netd", "delete", "svc"]).is_err(), "a kind needs a name");
        assert!(Cli::try_parse_from(["netd", "delete"]).is_err());
        assert!(Cli::try_parse_from(["netd", "delete", "svc", "web", "-f", "x.yaml"]).is_err());
        let c = Cli::try_parse_from(["netd", "config", "set", "--service-cidr", "10.100.0.0/16"]).unwrap();
        let ServiceCommand::Config(ConfigArgs { command: ConfigCommand::Set(s) }) = c.cmd else { panic!() };
        assert_eq!((s.service_cidr, s.service_node_port_range), (Some("10.100.0.0/16".parse().unwrap()), None));
        assert!(Cli::try_parse_from(["netd", "config", "set"]).is_err(), "nothing to set");
    }

    #[test]
    fn every_verb_takes_the_same_kind_names() {
        for word in ["services", "service", "svc", "endpoints", "ep", "endpointslices", "endpointslice"] {
            assert!(Cli::try_parse_from(["netd", "get", word]).is_ok(), "get {word}");
            assert!(Cli::try_parse_from(["netd", "delete", word, "x"]).is_ok(), "delete {word}");
        }
    }
}
