//! Errors of this crate: each names the operation and the object it was about.

use std::path::PathBuf;

/// An error talking to (or about something from) the Kubernetes API server.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("the in-cluster API server address: {0} (is netd running in a pod? set --kube-api-server / NETD_KUBE_API_SERVER to the API server's address, or pass --kubeconfig)")]
    InClusterEnv(String),
    #[error("the in-cluster service account's {}: {source} (is netd running in a pod with a service account? otherwise pass --kubeconfig)", path.display())]
    ServiceAccountFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the in-cluster service account from {}: {source}", dir.display())]
    ServiceAccount {
        dir: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("API server URL {url:?}: {reason}")]
    ApiServerUrl { url: String, reason: String },
    #[error("building the Kubernetes client for {url}: {}", brief(source))]
    Client {
        url: String,
        #[source]
        source: kube::Error,
    },
    /// An API call failed; `op` is the verb and resource ("get node", "patch node status"),
    /// `object` the name it was about.
    #[error("{op} {object}: {}", brief(source))]
    Api {
        op: &'static str,
        object: String,
        #[source]
        source: kube::Error,
    },
    /// A Node object is not usable (no podCIDR, malformed annotation, ...).
    #[error("node {node}: {reason}")]
    Node { node: String, reason: String },
    #[error("annotation prefix {prefix:?}: {reason}")]
    AnnotationPrefix { prefix: String, reason: String },
    #[error("encoding {what}: {source}")]
    Encode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

impl KubeError {
    pub(crate) fn api(op: &'static str, object: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeError {
        let object = object.into();
        move |source| KubeError::Api { op, object, source }
    }

    /// The HTTP status code the API server answered with, if it answered at all.
    pub fn status_code(&self) -> Option<u16> {
        match self {
            KubeError::Api { source: kube::Error::Api(s), .. } | KubeError::Client { source: kube::Error::Api(s), .. } => Some(s.code),
            _ => None,
        }
    }
}

/// A one-line description of a client error: for an API error the code, reason and message of the
/// `Status` the server returned, otherwise the error and its causes.
pub fn brief(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => {
            let mut out = format!("{} {}", s.code, if s.reason.is_empty() { "Failure" } else { s.reason.as_str() });
            if !s.message.is_empty() {
                out.push_str(": ");
                out.push_str(&s.message);
            }
            out
        }
        other => netd_common::report::error_chain(other),
    }
}
