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

    /// The API server's real address (e.g. https://192.168.0.10:6443), replacing the in-cluster
    /// one (KUBERNETES_SERVICE_HOST/PORT: the `kubernetes` Service's ClusterIP, which only a
    /// running service proxy makes reachable, and netd is that proxy) or the kubeconfig's server.
    /// The credentials stay the service account's (or the kubeconfig's). Like kube-proxy's
    /// --master and Cilium's k8sServiceHost/k8sServicePort.
    #[arg(long, env = "NETD_KUBE_API_SERVER", value_parser = parse_api_server_url)]
    pub kube_api_server: Option<String>,

    /// Where the in-cluster service account's token, ca.crt and namespace are (without
    /// --kubeconfig).
    #[arg(long, env = "NETD_KUBE_SERVICE_ACCOUNT_DIR", default_value = SERVICE_ACCOUNT_DIR)]
    pub kube_service_account_dir: PathBuf,

    /// Where this node's pod subnet and its peers come from: `etcd` (subnet leases) or `kube`
    /// (Node `spec.podCIDR` and flannel's node annotations, like flannel's --kube-subnet-mgr).
    #[arg(long, env = "NETD_SUBNET_MANAGER", value_enum, default_value_t = SubnetManagerKind::Etcd)]
    pub subnet_manager: SubnetManagerKind,

    /// Prefix of the node annotations written and read with `--subnet-manager kube` (flannel's
    /// --kube-annotation-prefix; keep the default to interoperate with flanneld nodes).
    #[arg(long, env = "NETD_KUBE_ANNOTATION_PREFIX", default_value = DEFAULT_ANNOTATION_PREFIX)]
    pub kube_annotation_prefix: String,
}

/// Where a pod's service account credentials are mounted.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// `--kube-api-server`: an http(s) URL with a host (a bare `host:port` is refused rather than
/// guessed at, since kube-proxy's --master takes a URL too).
pub fn parse_api_server_url(s: &str) -> Result<String, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("https" | "http"), Some(h)) if !h.is_empty() => Ok(s.trim_end_matches('/').to_string()),
        _ => Err(format!("{s:?} is not an https:// (or http://) URL with a host, e.g. https://192.168.0.10:6443")),
    }
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
    fn api_server_override_is_a_url() {
        let cli = Cli::try_parse_from(["netd", "--kube-api-server", "https://192.168.0.10:6443/"]).unwrap();
        assert_eq!(cli.kube.kube_api_server.as_deref(), Some("https://192.168.0.10:6443"));
        assert_eq!(cli.kube.kube_service_account_dir, std::path::Path::new(SERVICE_ACCOUNT_DIR));
        for bad in ["192.168.0.10:6443", "ftp://x", "https://", "not a url"] {
            let e = Cli::try_parse_from(["netd", "--kube-api-server", bad]).unwrap_err().to_string();
            assert!(e.contains("URL"), "{bad}: {e}");
        }
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
