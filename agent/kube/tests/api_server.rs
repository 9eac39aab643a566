//! The API server's address: in a pod, the in-cluster one is the `kubernetes` Service's
//! ClusterIP, unreachable on a node where netd itself is the service proxy and has not
//! programmed it yet; `--kube-api-server` replaces it (and a kubeconfig's) and keeps the service
//! account's credentials. Against the fake API server on 127.0.0.1; the "unreachable" in-cluster
//! address is a port of 127.0.0.1 nothing listens on.

mod common;

use std::path::Path;
use std::time::Duration;

use clap::Parser;
use common::*;
use netd_kube::testserver::{FakeApiServer, Kind};
use netd_kube::{client_with_env, node_subnet_with, KubeArgs};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    kube: KubeArgs,
}

/// A service account directory as the kubelet mounts it.
fn service_account(dir: &Path) {
    std::fs::write(dir.join("token"), "sa-token-1").unwrap();
    std::fs::copy(format!("{}/testdata/ca.crt", env!("CARGO_MANIFEST_DIR")), dir.join("ca.crt")).unwrap();
    std::fs::write(dir.join("namespace"), "kube-system").unwrap();
}

/// A port of 127.0.0.1 that refuses connections (bound once, then closed).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One request: GET the Node `worker-1`.
async fn get_node(client: &kube::Client) -> Result<k8s_openapi::api::core::v1::Node, kube::Error> {
    kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone()).get("worker-1").await
}

fn args(argv: &[&str], sa: &Path) -> KubeArgs {
    let mut a = Cli::try_parse_from(std::iter::once("netd").chain(argv.iter().copied())).unwrap().kube;
    a.kube_service_account_dir = sa.to_path_buf();
    a
}

#[tokio::test]
async fn the_override_reaches_the_api_server_the_in_cluster_address_does_not() {
    let server = FakeApiServer::start().await.unwrap();
    server.load(&fixture("node-flannel.json")).unwrap();
    let sa = tempfile::tempdir().unwrap();
    service_account(sa.path());
    let dead = closed_port();
    let env = move |k: &str| match k {
        "KUBERNETES_SERVICE_HOST" => Some("127.0.0.1".to_string()),
        "KUBERNETES_SERVICE_PORT" => Some(dead.to_string()),
        _ => None,
    };

    // In-cluster alone: the address the kubelet gave, which nothing answers.
    let (client, api) = client_with_env(&args(&[], sa.path()), env).await.unwrap();
    assert_eq!(api.url, format!("https://127.0.0.1:{dead}"));
    assert_eq!(api.from, "in-cluster KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT");
    assert!(api.in_cluster);
    let err = get_node(&client).await.expect_err("the in-cluster address answered");
    assert!(netd_common::report::error_chain(&err).contains("Connection refused"), "{err}");
    assert!(server.requests().is_empty());

    // With the override: the fake server, with the service account's token.
    let url = server.url();
    let (client, api) = client_with_env(&args(&["--kube-api-server", &url], sa.path()), env).await.unwrap();
    assert_eq!((api.url.as_str(), api.from.as_str(), api.in_cluster), (url.as_str(), "--kube-api-server", false));
    get_node(&client).await.unwrap();
    let net = guard("podCIDR", node_subnet_with(&client, "worker-1", Duration::from_millis(10))).await.unwrap();
    assert_eq!(net.to_string(), "10.244.1.0/24");
    let gets = server.requests_of("get", Kind::Node);
    assert_eq!(gets.len(), 2);
    assert_eq!(gets[0].authorization.as_deref(), Some("Bearer sa-token-1"));

    // The same from the ConfigMap's variable: status names the variable.
    let env_too = move |k: &str| if k == "NETD_KUBE_API_SERVER" { Some(format!("{}/", server.url())) } else { env(k) };
    let (_, api) = client_with_env(&args(&["--kube-api-server", &url], sa.path()), env_too).await.unwrap();
    assert_eq!(api.from, "NETD_KUBE_API_SERVER");
}

#[tokio::test]
async fn the_override_replaces_a_kubeconfig_s_server_and_keeps_its_credentials() {
    let server = FakeApiServer::start().await.unwrap();
    server.load(&fixture("node-flannel.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let dead = format!("http://127.0.0.1:{}", closed_port());
    std::fs::write(&kubeconfig, server.kubeconfig().replace(&server.url(), &dead)).unwrap();
    let kc = kubeconfig.to_str().unwrap();

    let (_, api) = client_with_env(&args(&["--kubeconfig", kc], dir.path()), |_| None).await.unwrap();
    assert_eq!((api.url.as_str(), api.from.clone()), (dead.as_str(), format!("kubeconfig {kc}")));

    let url = server.url();
    let (client, api) = client_with_env(&args(&["--kubeconfig", kc, "--kube-api-server", &url], dir.path()), |_| None).await.unwrap();
    assert_eq!(api.url, url);
    guard("podCIDR", node_subnet_with(&client, "worker-1", Duration::from_millis(10))).await.unwrap();
    assert_eq!(server.requests_of("get", Kind::Node)[0].authorization.as_deref(), Some("Bearer fake-token"));
}
