//! Building the API client: the pod's service account, or a kubeconfig file.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::error::KubeError;

/// A client for the API server: with `None`, the in-cluster service account (the token and CA
/// under `/var/run/secrets/kubernetes.io/serviceaccount/`, the server from
/// `KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT`); with a path, that kubeconfig file and its
/// current context.
///
/// Nothing is sent to the server here: a wrong address shows up as connection errors in the
/// sources' status, which retry with back-off.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, KubeError> {
    let config = match kubeconfig {
        None => kube::Config::incluster().map_err(KubeError::InCluster)?,
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig { path: path.to_path_buf(), source })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig { path: path.to_path_buf(), source })?
        }
    };
    client_from_config(config)
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

    #[tokio::test]
    async fn no_service_account_is_a_clear_error() {
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            return;
        }
        let Err(err) = client(None).await else { panic!("a client without a service account") };
        assert!(err.to_string().contains("in-cluster"), "{err}");
    }
}
