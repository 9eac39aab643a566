//! netd's logs and error messages as the people reading them get them: text logs written to a
//! file have no colour escapes and read as sentences (no Rust `Debug`), JSON logs have each
//! event's fields at the top level with durations as numbers, and a failing command says its
//! error once, on one line. The built binaries, in namespaces, with a real etcd.

use std::time::Duration;

use anyhow::{Context, Result};
use netd_tests::{netd_binary, wait_until, Cluster, Node};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);

/// Two nodes running netd with `extra_args`, their subnets leased, and node0's overlay programmed
/// for node1 and its services synced (both logged). Returns the cluster and node1's subnet.
fn two_nodes(extra_args: &[&str]) -> Result<(Cluster, String)> {
    let mut c = Cluster::new(2)?;
    c.write_network_config(VXLAN)?;
    c.start_netd_all(extra_args)?;
    for i in 0..2 {
        c.node_mut(i).wait_subnet_env(WAIT)?;
    }
    let peer = c.node(1).subnet_env()?["FLANNEL_SUBNET"].replace(".1/24", ".0/24");
    let n0 = c.node(0);
    let logged = |log: &str| log.contains(&peer) && log.contains("overlay updated") && log.contains("service dataplane updated");
    if let Err(e) = wait_until(WAIT, POLL, || Ok(logged(&n0.log()))) {
        c.dump_logs();
        return Err(e);
    }
    Ok((c, peer))
}

/// The lines netd logged at INFO, WARN or ERROR (debug lines may show `Debug` forms).
fn operator_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| [" INFO ", " WARN ", " ERROR "].iter().any(|lvl| l.contains(lvl))).collect()
}

#[test]
fn text_logs_in_a_file_have_no_colour_and_read_as_sentences() -> Result<()> {
    let (c, peer) = two_nodes(&[])?;
    let log = c.node(0).log();
    assert!(!log.contains('\x1b'), "ANSI escapes in a log file:\n{log}");

    // The overlay changes, in `ip`'s words with the device names.
    let gw = peer.trim_end_matches("/24");
    for change in [
        format!("added neigh {gw} lladdr "),
        "dst 198.18.0.11 dev netd.1".to_string(),
        format!("added route {peer} via {gw} dev netd.1"),
    ] {
        assert!(log.contains(&change), "{change:?} not logged:\n{log}");
    }
    let lines = operator_lines(&log);
    let line = |what: &str| lines.iter().find(|l| l.contains(what)).copied().with_context(|| format!("no {what:?} line:\n{log}"));
    assert!(line("acquired subnet lease")?.contains("ttl_s=86400"), "{}", line("acquired subnet lease")?);
    let took = line("service dataplane updated")?.split("took_ms=").nth(1).context("no took_ms")?;
    let took: f64 = took.split_whitespace().next().unwrap_or_default().parse().with_context(|| format!("took_ms is not a number: {took}"))?;
    assert!(took >= 0.0);
    assert!(line("service proxy starting")?.contains("mode=nftables"));
    // No Rust Debug forms in what an operator reads.
    for l in &lines {
        for debug in ["Some(", "None", "SetRoute(", "SetNeigh(", "RouteSpec", "Overlay", "Nftables", "ms\"", "µs", "[\"", "=\""] {
            assert!(!l.contains(debug), "{debug:?} in {l}");
        }
    }
    Ok(())
}

#[test]
fn json_logs_have_the_event_fields_at_the_top_level() -> Result<()> {
    let (c, peer) = two_nodes(&["--log-format", "json"])?;
    let log = c.node(0).log();
    let events: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.starts_with("=== netd-tests"))
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect::<Result<_>>()?;
    let event = |message: &str| {
        events.iter().find(|e| e["message"].as_str().is_some_and(|m| m.starts_with(message))).with_context(|| format!("no {message:?} event:\n{log}"))
    };
    assert!(events.iter().all(|e| e.get("fields").is_none()), "fields nested:\n{log}");

    let lease = event("acquired subnet lease")?;
    assert_eq!(lease["ttl_s"], 86400, "{lease}");
    assert_eq!(lease["level"], "INFO");
    assert!(lease["subnet"].is_string(), "{lease}");
    let overlay = event("overlay updated")?;
    assert!(overlay["changes"].as_u64().is_some_and(|n| n >= 3), "{overlay}");
    assert!(overlay["took_ms"].is_f64(), "{overlay}");
    assert!(event("service dataplane updated")?["took_ms"].is_f64());
    let route = event(&format!("added route {peer} "))?;
    assert_eq!(route["target"], "netd::daemon");
    Ok(())
}

/// `netd ARGS` in the node's namespace, with backtraces on as in the test bed's netd: (exit code,
/// stdout, stderr).
fn netd(node: &Node, args: &[&str]) -> Result<(i32, String, String)> {
    let bin = netd_binary()?;
    let mut argv = vec![bin.to_str().context("non-UTF-8 path")?];
    argv.extend_from_slice(args);
    let mut cmd = node.ns().command(&argv);
    cmd.env("RUST_BACKTRACE", "1");
    let out = cmd.output()?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok((out.status.code().context("killed by a signal")?, text(&out.stdout), text(&out.stderr)))
}

#[test]
fn a_failing_command_says_its_error_once_on_one_line() -> Result<()> {
    let mut c = Cluster::new(1)?;
    let endpoint = c.etcd().endpoint();
    let n = c.node(0);
    let (code, out, err) = netd(n, &["get", "services", "nope", "--etcd-endpoints", &endpoint])?;
    assert_eq!((code, out.as_str(), err.as_str()), (1, "", "netd: service \"nope\" in namespace \"default\" not found\n"));

    // etcd down: the gRPC error, said once, without the client library's Debug forms.
    c.etcd_mut().stop()?;
    let n = c.node(0);
    let (code, _, err) = netd(n, &["get", "services", "--etcd-endpoints", &endpoint])?;
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("netd: etcd get --prefix /netd/registry/: tcp connect error: "), "{err}");
    assert_eq!(err.matches("Connection refused").count(), 1, "{err}");
    for debug in ["Caused by", "tonic", "source:", "Os {", "backtrace"] {
        assert!(!err.contains(debug), "{debug:?} in {err}");
    }
    Ok(())
}
