//! [`Etcd`]: a real single-member etcd inside a test namespace.
//!
//! A real server (not a mock) because netd's correctness depends on etcd
//! semantics: leases, revisions, watches, and what happens when etcd goes
//! away and comes back. `stop`/`start` reuse the same data dir so a test
//! can simulate an etcd outage without losing state.

use crate::cmd::{self, check_output, kill_and_reap, ns_command, output, read_log, terminate};
use crate::netns::{tempdir, Netns};
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long `start` waits for etcd to report healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running (or stopped) etcd bound to `ADDR:2379`/`ADDR:2380` inside a
/// namespace. Killed on drop; its data dir and log live in a temp dir
/// removed on drop.
#[derive(Debug)]
pub struct Etcd {
    ns: String,
    addr: Ipv4Addr,
    dir: tempfile::TempDir,
    child: Option<Child>,
    tls: Option<TlsFiles>,
}

/// PEM files of a TLS etcd: the CA, and one client certificate and key (signed by the CA) that
/// both netd and etcdctl use.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

/// Makes a CA, a server certificate for `addr` (as an IP SAN) and a client certificate.
fn make_certs(dir: &Path, addr: Ipv4Addr) -> Result<TlsFiles> {
    let p = |n: &str| dir.join(n).display().to_string();
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl").args(args).output().context("running openssl (is it installed?)")?;
        if !out.status.success() {
            bail!("openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    run(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=netd-test-ca", "-keyout", &p("ca.key"), "-out", &p("ca.crt")])?;
    for (name, ext) in [
        ("server", format!("subjectAltName=IP:{addr}\nextendedKeyUsage=serverAuth")),
        ("client", "extendedKeyUsage=clientAuth".to_string()),
    ] {
        run(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", &format!("/CN=netd-test-{name}"), "-keyout", &p(&format!("{name}.key")), "-out", &p(&format!("{name}.csr"))])?;
        std::fs::write(dir.join(format!("{name}.ext")), ext)?;
        run(&[
            "x509", "-req", "-in", &p(&format!("{name}.csr")), "-CA", &p("ca.crt"), "-CAkey", &p("ca.key"), "-CAcreateserial", "-days", "2",
            "-extfile", &p(&format!("{name}.ext")), "-out", &p(&format!("{name}.crt")),
        ])?;
    }
    Ok(TlsFiles {
        ca: dir.join("ca.crt"),
        cert: dir.join("client.crt"),
        key: dir.join("client.key"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
    })
}

impl Etcd {
    /// Starts etcd inside `ns`, listening on `addr`, and waits until it is
    /// healthy. `addr` must already be configured in `ns`.
    ///
    /// The `Etcd` refers to the namespace by name; it must be dropped
    /// before the namespace (the namespace's drop kills it anyway).
    pub fn new(ns: &Netns, addr: Ipv4Addr) -> Result<Etcd> {
        let dir = tempdir("etcd")?;
        // 0700: what etcd wants (it warns about anything more open).
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir.path().join("data"))?;
        let mut etcd = Etcd {
            ns: ns.name().to_string(),
            addr,
            dir,
            child: None,
            tls: None,
        };
        etcd.start()?;
        Ok(etcd)
    }

    /// Like [`Etcd::new`], but serving TLS only, with client certificate authentication.
    pub fn new_tls(ns: &Netns, addr: Ipv4Addr) -> Result<Etcd> {
        let dir = tempdir("etcd")?;
        std::fs::DirBuilder::new().mode(0o700).create(dir.path().join("data"))?;
        std::fs::create_dir(dir.path().join("tls"))?;
        let tls = make_certs(&dir.path().join("tls"), addr)?;
        let mut etcd = Etcd { ns: ns.name().to_string(), addr, dir, child: None, tls: Some(tls) };
        etcd.start()?;
        Ok(etcd)
    }

    /// The TLS files, for a TLS etcd.
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// `http://ADDR:2379` (`https://` for a TLS etcd).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:2379", self.addr)
    }

    /// The etcd log (all runs, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Contents of the etcd log.
    pub fn log(&self) -> String {
        read_log(&self.log_path())
    }

    /// The data dir, kept across `stop`/`start`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// True while the etcd process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// (Re)starts etcd with the same data dir and waits until healthy.
    /// No-op if it is already running.
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let client = self.endpoint();
        let peer = format!("http://{}:2380", self.addr);
        let data = self.data_dir();
        let data = data.to_str().context("non-UTF-8 temp dir")?;
        let cluster = format!("default={peer}");
        let log = self.log_path();
        writeln!(cmd::append_file(&log)?, "=== netd-tests: starting etcd ===")?;
        let mut args = vec![
            "etcd",
            "--name",
            "default",
            "--data-dir",
            data,
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &cluster,
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ];
        let tls = self.tls.clone();
        let tls_paths: Vec<String> = tls
            .iter()
            .flat_map(|t| [&t.server_cert, &t.server_key, &t.ca].map(|p| p.display().to_string()))
            .collect();
        if tls.is_some() {
            args.extend_from_slice(&["--cert-file", &tls_paths[0], "--key-file", &tls_paths[1], "--trusted-ca-file", &tls_paths[2], "--client-cert-auth"]);
        }
        let mut command = ns_command(&self.ns, &args);
        cmd::log_stdio(&mut command, Some(&log))?;
        let child = command
            .spawn()
            .with_context(|| format!("cannot spawn `{}`", cmd::describe(&command)))?;
        self.child = Some(child);
        self.wait_healthy()
    }

    /// SIGTERM, wait (SIGKILL after 10 s). No-op if not running.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(10))?;
        }
        Ok(())
    }

    fn wait_healthy(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!(
                        "etcd exited during startup ({status}); log tail:\n{}",
                        cmd::tail(&self.log(), 30)
                    );
                }
            }
            let out = output(&mut self.etcdctl(&["endpoint", "health"]))?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd not healthy after {START_TIMEOUT:?}: {}\nlog tail:\n{}",
                    String::from_utf8_lossy(&out.stderr).trim_end(),
                    cmd::tail(&self.log(), 30)
                );
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// `etcdctl --endpoints ENDPOINT args...` inside the namespace (the
    /// root namespace has no route to the underlay).
    pub fn etcdctl(&self, args: &[&str]) -> Command {
        let endpoint = self.endpoint();
        let mut full = vec![
            "etcdctl",
            "--endpoints",
            &endpoint,
            "--dial-timeout",
            "2s",
            "--command-timeout",
            "5s",
        ];
        let tls: Vec<String> = self.tls.iter().flat_map(|t| [&t.ca, &t.cert, &t.key].map(|p| p.display().to_string())).collect();
        if !tls.is_empty() {
            full.extend_from_slice(&["--cacert", &tls[0], "--cert", &tls[1], "--key", &tls[2]]);
        }
        full.extend_from_slice(args);
        let mut command = ns_command(&self.ns, &full);
        command.env("ETCDCTL_API", "3");
        command
    }

    /// Runs an etcdctl command, failing on non-zero exit; returns stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let mut command = self.etcdctl(args);
        let out = output(&mut command)?;
        check_output(&command, out)
    }

    /// Puts `key = value`. The value goes through stdin, so multi-line JSON
    /// and values starting with `-` are passed verbatim.
    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        let mut command = self.etcdctl(&["put", key]);
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot run `{}`", cmd::describe(&command)))?;
        // etcdctl reads the whole of stdin as the value; a trailing newline
        // would become part of it, so write the value exactly.
        child
            .stdin
            .take()
            .context("no stdin")?
            .write_all(value.as_bytes())?;
        let out = child.wait_with_output()?;
        check_output(&command, out).map(drop)
    }

    /// All keys under `prefix`, sorted by key, with their values.
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        // JSON output base64-encodes keys and values, so values containing
        // newlines (JSON configs) cannot be confused with the key/value
        // line structure of the default output.
        let out = self.ctl(&["get", "--prefix", "-w", "json", prefix])?;
        parse_get_json(&out)
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Result<Option<String>> {
        let out = self.ctl(&["get", "-w", "json", key])?;
        Ok(parse_get_json(&out)?
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v))
    }

    /// Deletes `key`; returns how many keys were deleted (0 or 1).
    pub fn del(&self, key: &str) -> Result<u64> {
        let out = self.ctl(&["del", key])?;
        Ok(out.trim().parse().unwrap_or(0))
    }

    /// The namespace etcd runs in.
    pub fn netns_name(&self) -> &str {
        &self.ns
    }

    /// Where the data dir lives, for tests that want to inspect it.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Err(e) = kill_and_reap(&mut child) {
                eprintln!("netd-tests: cannot kill etcd: {e:#}");
            }
        }
    }
}

fn parse_get_json(out: &str) -> Result<Vec<(String, String)>> {
    let v: serde_json::Value =
        serde_json::from_str(out).with_context(|| format!("bad etcdctl JSON: {out}"))?;
    let mut kvs = Vec::new();
    for kv in v["kvs"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let field = |name: &str| -> Result<String> {
            let raw = base64_decode(kv[name].as_str().unwrap_or(""))?;
            Ok(String::from_utf8_lossy(&raw).into_owned())
        };
        kvs.push((field("key")?, field("value")?));
    }
    kvs.sort();
    Ok(kvs)
}

/// Standard base64 (with padding), enough for etcdctl's JSON output; not
/// worth a dependency.
fn base64_decode(s: &str) -> Result<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in bytes {
        let v = val(c).with_context(|| format!("bad base64 {s:?}"))?;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_roundtrips_known_values() {
        assert_eq!(base64_decode("").unwrap(), b"");
        assert_eq!(base64_decode("Zg==").unwrap(), b"f");
        assert_eq!(base64_decode("Zm8=").unwrap(), b"fo");
        assert_eq!(base64_decode("Zm9vYmFy").unwrap(), b"foobar");
        assert!(base64_decode("Zm9v!").is_err());
    }

    #[test]
    fn parses_empty_and_full_get() {
        assert!(parse_get_json(r#"{"header":{},"count":0}"#)
            .unwrap()
            .is_empty());
        let out = r#"{"kvs":[{"key":"L2I=","value":"Mg=="},{"key":"L2E=","value":"MQ=="}]}"#;
        assert_eq!(
            parse_get_json(out).unwrap(),
            vec![("/a".into(), "1".into()), ("/b".into(), "2".into())]
        );
    }
}
