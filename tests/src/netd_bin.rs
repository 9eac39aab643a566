//! Locating (and if needed building) the binaries under test: `netd` and `netd-cni`.

use crate::cmd::{self, command};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::SystemTime;

/// The workspace root: this crate lives in `<root>/tests`.
pub(crate) fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Path of the netd binary to test: `$NETD_BIN` if set, else
/// `<target>/debug/netd` of this workspace.
///
/// `cargo test -p netd-tests` does not build netd (this crate does not
/// depend on it), so when the binary is missing, or older than a file of
/// the agent crate, `cargo build -p netd` is run first. That happens at
/// most once per test process, whatever the number of parallel tests;
/// the outcome (path or error) is remembered.
pub fn netd_binary() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| resolve("NETD_BIN", "netd", "agent").map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Path of the CNI plugin to test: `$NETD_CNI_BIN`, else `<target>/debug/netd-cni`, built like
/// [`netd_binary`].
pub fn netd_cni_binary() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| resolve("NETD_CNI_BIN", "netd-cni", "cni-plugin").map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The fake Kubernetes API server (`netd-kube`'s `fake-apiserver` example, feature
/// `testserver`), built on first use.
pub fn fake_apiserver_binary() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = workspace_root();
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => root.join(dir),
            None => root.join("target"),
        };
        let bin = target.join("debug").join("examples").join("fake-apiserver");
        if needs_build(&bin, &root.join("agent/kube")) {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut c = command(&cargo, &["build", "-p", "netd-kube", "--features", "testserver", "--example", "fake-apiserver"]);
            c.current_dir(&root);
            let out = cmd::output(&mut c).map_err(|e| format!("{e:#}"))?;
            if !out.status.success() {
                return Err(format!("building fake-apiserver failed:\n{}", cmd::tail(&String::from_utf8_lossy(&out.stderr), 40)));
            }
        }
        Ok(bin)
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

fn resolve(env: &str, package: &str, crate_dir: &str) -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(env) {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("{env}={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    let root = workspace_root();
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir), // join keeps an absolute dir as is
        None => root.join("target"),
    };
    let bin = target.join("debug").join(package);
    if needs_build(&bin, &root.join(crate_dir)) {
        build(&root, package)?;
    }
    if !bin.is_file() {
        bail!(
            "`cargo build -p {package}` succeeded but {} does not exist",
            bin.display()
        );
    }
    Ok(bin)
}

fn needs_build(bin: &Path, agent: &Path) -> bool {
    let Ok(built) = bin.metadata().and_then(|m| m.modified()) else {
        return true;
    };
    newest_mtime(agent).is_some_and(|src| src > built)
}

/// Newest modification time of the agent's sources (`src/`, manifest).
fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = dir
        .join("Cargo.toml")
        .metadata()
        .and_then(|m| m.modified())
        .ok();
    let mut stack = vec![dir.join("src")];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(t) = entry.metadata().and_then(|m| m.modified()) {
                newest = newest.max(Some(t));
            }
        }
    }
    newest
}

fn build(root: &Path, package: &str) -> Result<()> {
    // Cargo sets $CARGO for the processes it runs (tests included).
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("netd-tests: building {package} (`{cargo} build -p {package}`) ...");
    let mut c = command(&cargo, &["build", "-p", package]);
    c.current_dir(root);
    let out = cmd::output(&mut c)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{}",
            cmd::describe(&c),
            out.status,
            cmd::tail(&String::from_utf8_lossy(&out.stderr), 60)
        );
    }
    Ok(())
}
