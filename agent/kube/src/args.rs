//! Flags for `netd run` (flattened into it by the daemon). Doc comments are the `--help` text;
//! every flag is also an env var.

use std::path::PathBuf;

use crate::nodes::DEFAULT_ANNOTATION_PREFIX;

/// Where Services and EndpointSlices come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// netd's own registry in etcd (`netd apply`, no Kubernetes API server needed).
    Etcd,
    /// The Kubernetes API server: Services and EndpointSlices of every namespace, list and watch.
    Kubernetes,
}

/// Where this node's pod subnet and the other nodes' subnets come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SubnetManagerKind {
    /// Subnet leases in etcd, as flannel's etcd subnet manager keeps them.
    Etcd,
    /// Kubernetes Node objects, as flannel's kube subnet manager uses them: this node's subnet is
    /// its `spec.podCIDR`; peers are read from the flannel annotations on every Node.
    Kube,
}

/// Kubernetes API flags of `netd run`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct KubeArgs {
    /// Where Services and EndpointSlices come from: `etcd` (netd's registry, `netd apply`) or
    /// `kubernetes` (the API server, list and watch).
    #[arg(long = "source", env = "NETD_SOURCE", value_enum, default_value_t = SourceKind::Etcd)]
    pub source: SourceKind,

    /// kubeconfig file for the API server (its current context). Without it, netd uses the pod's
    /// in-cluster service account.
    #[arg(long, env = "NETD_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Where this node's pod subnet and its peers come from: `etcd` (subnet leases) or `kube`
    /// (Node `spec.podCIDR` and flannel's node annotations, like flannel's --kube-subnet-mgr).
    #[arg(long, env = "NETD_SUBNET_MANAGER", value_enum, default_value_t = SubnetManagerKind::Etcd)]
    pub subnet_manager: SubnetManagerKind,

    /// Prefix of the node annotations written and read with `--subnet-manager kube` (flannel's
    /// --kube-annotation-prefix; keep the default to interoperate with flanneld nodes).
    #[arg(long, env = "NETD_KUBE_ANNOTATION_PREFIX", default_value = DEFAULT_ANNOTATION_PREFIX)]
    pub kube_annotation_prefix: String,
}

impl KubeArgs {
    /// Whether anything needs an API client.
    pub fn needs_client(&self) -> bool {
        self.source == SourceKind::Kubernetes || self.subnet_manager == SubnetManagerKind::Kube
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        kube: KubeArgs,
    }

    #[test]
    fn defaults_are_etcd() {
        let cli = Cli::try_parse_from(["netd"]).unwrap();
        assert_eq!(cli.kube.source, SourceKind::Etcd);
        assert_eq!(cli.kube.subnet_manager, SubnetManagerKind::Etcd);
        assert_eq!(cli.kube.kube_annotation_prefix, "flannel.alpha.coreos.com");
        assert!(!cli.kube.needs_client());
    }

    #[test]
    fn kubernetes_flags_parse() {
        let cli = Cli::try_parse_from(["netd", "--source", "kubernetes", "--subnet-manager", "kube", "--kubeconfig", "/etc/k.conf"]).unwrap();
        assert_eq!(cli.kube.source, SourceKind::Kubernetes);
        assert_eq!(cli.kube.subnet_manager, SubnetManagerKind::Kube);
        assert_eq!(cli.kube.kubeconfig.as_deref(), Some(std::path::Path::new("/etc/k.conf")));
        assert!(cli.kube.needs_client());
        assert!(Cli::try_parse_from(["netd", "--source", "consul"]).is_err());
    }

    #[test]
    fn every_flag_has_a_netd_env_var() {
        let cmd = Cli::command();
        for arg in cmd.get_arguments() {
            if arg.get_long().is_some() && !["help", "version"].contains(&arg.get_id().as_str()) {
                let env = arg.get_env().unwrap_or_else(|| panic!("--{} has no env var", arg.get_id()));
                assert!(env.to_string_lossy().starts_with("NETD_"), "{env:?}");
                assert!(arg.get_help().is_some(), "--{} has no help", arg.get_id());
            }
        }
    }
}
