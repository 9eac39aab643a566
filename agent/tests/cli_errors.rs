//! A failing `netd` command says its error once, on one line (`netd: ...`), and exits 1; not
//! anyhow's report (`Error: X`, then `Caused by: X`, then a backtrace when RUST_BACKTRACE is set).
//! Errors that need etcd or a namespace are in tests/tests/logs.rs.

use std::process::Command;

#[test]
fn a_missing_manifest_is_reported_once() {
    let out = Command::new(env!("CARGO_BIN_EXE_netd"))
        .args(["apply", "-f", "/nonexistent/svc.yaml"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "netd: reading /nonexistent/svc.yaml: No such file or directory (os error 2)\n");
    assert!(out.stdout.is_empty());
}
