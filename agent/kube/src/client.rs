//! Building the API client: the pod's service account, or a kubeconfig file, at the address
//! `--kube-api-server` gives when it is given.
//!
//! Why the override: in a pod, the API server's address is the `kubernetes` Service's ClusterIP
//! (`KUBERNETES_SERVICE_HOST`/`PORT`, which the kubelet sets). On a node where netd is the
//! service proxy, nothing makes that ClusterIP reachable until netd has programmed it, which
//! needs the Services, which come from the API server: a deadlock on every fresh node. kube-proxy
//! breaks it with a kubeconfig naming the real address; Cilium with k8sServiceHost/Port. netd
//! takes the address alone (`--kube-api-server`, or `NETD_KUBE_API_SERVER` in the ConfigMap)
//! and keeps the service account's credentials.

use std::path::{Path, PathBuf};

use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::{Deserialize, Serialize};

use crate::args::KubeArgs;
use crate::error::KubeError;

/// The environment variables the kubelet sets in every pod (the `kubernetes` Service).
pub const SERVICE_HOST_ENV: &str = "KUBERNETES_SERVICE_HOST";
pub const SERVICE_PORT_ENV: &str = "KUBERNETES_SERVICE_PORT";
/// `--kube-api-server`'s variable.
pub const API_SERVER_ENV: &str = "NETD_KUBE_API_SERVER";

/// Which API server a client talks to and where that address came from, for `netd status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiServer {
    /// The URL requests go to.
    pub url: String,
    /// `--kube-api-server`, `NETD_KUBE_API_SERVER`, `kubeconfig <path>`, or
    /// `in-cluster KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT`.
    pub from: String,
    /// The address is the in-cluster one (the `kubernetes` Service, normally a ClusterIP).
    pub in_cluster: bool,
}

/// A client for the API server `args` name (see [`client_with_env`]), reading the process
/// environment.
pub async fn client(args: &KubeArgs) -> Result<(kube::Client, ApiServer), KubeError> {
    client_with_env(args, |k| std::env::var(k).ok()).await
}

/// A client for the API server: with `--kubeconfig`, that file's current context; without it,
/// the in-cluster service account (token and CA under `--kube-service-account-dir`, the server
/// from `KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT` as `env` gives them). Either way
/// `--kube-api-server` replaces the server address.
///
/// Nothing is sent to the server here: a wrong address shows up as connection errors in the
/// sources' status, which retry with back-off.
pub async fn client_with_env(args: &KubeArgs, env: impl Fn(&str) -> Option<String>) -> Result<(kube::Client, ApiServer), KubeError> {
    let (mut config, mut api) = match &args.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig { path: path.to_path_buf(), source })?;
            let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig { path: path.to_path_buf(), source })?;
            let api = ApiServer { url: display_url(&config.cluster_url), from: format!("kubeconfig {}", path.display()), in_cluster: false };
            (config, api)
        }
        None => {
            // The service's address is not needed (nor required to be set) when it is replaced.
            let (url, in_cluster) = match &args.kube_api_server {
                Some(url) => (url.clone(), false),
                None => (in_cluster_url(env(SERVICE_HOST_ENV).as_deref(), env(SERVICE_PORT_ENV).as_deref())?, true),
            };
            let config = in_cluster_config(&args.kube_service_account_dir, &url).await?;
            (config, ApiServer { url, from: format!("in-cluster {SERVICE_HOST_ENV}/{SERVICE_PORT_ENV}"), in_cluster })
        }
    };
    if let Some(url) = &args.kube_api_server {
        config.cluster_url = url.parse().map_err(|e| KubeError::ApiServerUrl { url: url.clone(), reason: format!("{e}") })?;
        // clap reads the flag first and the variable only without it: equal values mean the
        // variable (or both saying the same).
        let from_env = env(API_SERVER_ENV).is_some_and(|v| v.trim_end_matches('/') == url);
        api = ApiServer { url: url.clone(), from: if from_env { API_SERVER_ENV } else { "--kube-api-server" }.to_string(), in_cluster: false };
    }
    Ok((client_from_config(config)?, api))
}

/// The in-cluster URL from the kubelet's variables, as client-go forms it (both must be set;
/// an IPv6 host in brackets; no port when it is 443).
pub fn in_cluster_url(host: Option<&str>, port: Option<&str>) -> Result<String, KubeError> {
    let missing = |what: &str| KubeError::InClusterEnv(format!("{what} is not set"));
    let host = host.filter(|h| !h.is_empty()).ok_or_else(|| missing(SERVICE_HOST_ENV))?;
    let port = port.filter(|p| !p.is_empty()).ok_or_else(|| missing(SERVICE_PORT_ENV))?;
    let port: u16 = port.parse().map_err(|_| KubeError::InClusterEnv(format!("{SERVICE_PORT_ENV}={port:?} is not a port")))?;
    let host = match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]"),
        _ => host.to_string(),
    };
    Ok(if port == 443 { format!("https://{host}") } else { format!("https://{host}:{port}") })
}

/// The service account's credentials (token file, re-read as the kubelet rotates it; CA) for
/// the server at `url`: written as a kubeconfig, so kube loads and refreshes them as it does a
/// kubeconfig's.
async fn in_cluster_config(dir: &Path, url: &str) -> Result<kube::Config, KubeError> {
    let (token, ca) = (dir.join("token"), dir.join("ca.crt"));
    for f in [&token, &ca] {
        std::fs::metadata(f).map_err(|source| KubeError::ServiceAccountFile { path: f.clone(), source })?;
    }
    let q = |s: &str| serde_json::Value::from(s).to_string();
    let path = |p: &PathBuf| q(&p.display().to_string());
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: in-cluster\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
         contexts:\n- name: in-cluster\n  context:\n    cluster: in-cluster\n    user: service-account\ncurrent-context: in-cluster\n\
         users:\n- name: service-account\n  user:\n    tokenFile: {token}\n",
        server = q(url),
        ca = path(&ca),
        token = path(&token),
    );
    let err = |source| KubeError::ServiceAccount { dir: dir.to_path_buf(), source };
    let kc = Kubeconfig::from_yaml(&yaml).map_err(err)?;
    kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.map_err(err)
}

/// A URL as the operator wrote it: `https://10.0.0.1:6443`, without the `/` an empty path gets.
fn display_url(uri: &http::Uri) -> String {
    uri.to_string().trim_end_matches('/').to_string()
}

/// A client for an already built configuration.
pub fn client_from_config(config: kube::Config) -> Result<kube::Client, KubeError> {
    // rustls needs a process-wide crypto provider; it picks one itself only while exactly one is
    // compiled in, so install ring's explicitly (an error means one is installed already).
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let url = config.cluster_url.to_string();
    kube::Client::try_from(config).map_err(|source| KubeError::Client { url, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_https_client_builds_with_the_ring_provider() {
        let mut config = kube::Config::new("https://127.0.0.1:6443".parse().expect("uri"));
        config.root_cert = Some(Vec::new());
        client_from_config(config).expect("https client");
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }

    fn args(dir: &Path) -> KubeArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            kube: KubeArgs,
        }
        let mut a = Cli::try_parse_from(["netd"]).expect("defaults").kube;
        a.kube_service_account_dir = dir.to_path_buf();
        a
    }

    #[tokio::test]
    async fn no_service_account_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let env = |k: &str| match k {
            SERVICE_HOST_ENV => Some("10.96.0.1".to_string()),
            SERVICE_PORT_ENV => Some("443".to_string()),
            _ => None,
        };
        let Err(err) = client_with_env(&args(dir.path()), env).await else { panic!("a client without a service account") };
        assert!(err.to_string().contains("in-cluster service account") && err.to_string().contains("token"), "{err}");
        // Outside a pod, without the kubelet's variables: the message says what to set.
        let Err(err) = client_with_env(&args(dir.path()), |_| None).await else { panic!("a client without an address") };
        assert!(err.to_string().contains("KUBERNETES_SERVICE_HOST is not set") && err.to_string().contains("--kube-api-server"), "{err}");
    }

    #[test]
    fn in_cluster_url_is_client_go_s() {
        assert_eq!(in_cluster_url(Some("10.96.0.1"), Some("443")).unwrap(), "https://10.96.0.1");
        assert_eq!(in_cluster_url(Some("10.96.0.1"), Some("6443")).unwrap(), "https://10.96.0.1:6443");
        assert_eq!(in_cluster_url(Some("fd00::1"), Some("443")).unwrap(), "https://[fd00::1]");
        assert!(in_cluster_url(Some("10.96.0.1"), Some("https")).unwrap_err().to_string().contains("not a port"));
        assert!(in_cluster_url(Some("10.96.0.1"), None).unwrap_err().to_string().contains("KUBERNETES_SERVICE_PORT is not set"));
    }
}
