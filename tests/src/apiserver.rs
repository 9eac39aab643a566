//! [`FakeApiServer`]: netd-kube's Kubernetes API server stand-in as a process on the underlay.

use anyhow::{Context, Result};

use crate::Cluster;

/// The fake API server (netd-kube's test server: list and watch semantics, 410 Gone, bookmarks,
/// an "unreachable" switch) running on the underlay, driven through its stdin. No real API
/// server can run on these machines; its objects are written in the API server's shape.
pub struct FakeApiServer {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    dir: tempfile::TempDir,
}

impl FakeApiServer {
    /// Starts it on the underlay at 198.18.0.1:6443 (where every node reaches it).
    pub fn start(c: &Cluster) -> Result<FakeApiServer> {
        use std::io::BufRead;
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        let bin = crate::fake_apiserver_binary()?;
        let mut child = c
            .underlay()
            .command(&[bin.to_str().context("non-UTF-8 path")?, "--listen", "198.18.0.1:6443", "--kubeconfig-out", kubeconfig.to_str().context("non-UTF-8 path")?])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = std::io::BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        anyhow::ensure!(line.starts_with("listening"), "fake-apiserver said {line:?}");
        Ok(FakeApiServer { child, stdin, stdout, dir })
    }

    /// A kubeconfig file pointing at it.
    /// The server's scratch directory (its kubeconfig lives there).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn kubeconfig(&self) -> String {
        self.dir.path().join("kubeconfig").display().to_string()
    }

    /// One stdin command (see the example's doc); its `ok ...` answer.
    pub fn cmd(&mut self, line: &str) -> Result<String> {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{line}")?;
        let mut answer = String::new();
        self.stdout.read_line(&mut answer)?;
        anyhow::ensure!(answer.starts_with("ok"), "fake-apiserver `{line}`: {answer}");
        Ok(answer)
    }

    /// Creates or replaces the objects (a JSON array).
    pub fn load(&mut self, objects: serde_json::Value) -> Result<()> {
        let path = self.dir.path().join("objects.json");
        std::fs::write(&path, serde_json::to_string(&serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects}))?)?;
        self.cmd(&format!("load {}", path.display())).map(|_| ())
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Node object as the API server returns it: `podCIDR` and the InternalIP address.
pub fn kube_node(name: &str, cidr: &str, ip: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "uid": format!("00000000-0000-4000-8000-{:012}", name.len()), "labels": {"kubernetes.io/hostname": name},
                     "annotations": {"node.alpha.kubernetes.io/ttl": "0"}},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}
    })
}

