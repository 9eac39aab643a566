//! [`Etcd`]: a real single-member etcd inside a test namespace.
//!
//! A real server (not a mock) because netd's correctness depends on etcd
//! semantics: leases, revisions, watches, and what happens when etcd goes
//! away and comes back. `stop`/`start` reuse the same data dir so a test
//! can simulate an etcd outage without losing state.

use crate::cmd::{self, check, check_output, kill_and_reap, ns_command, output, read_log, terminate};
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

    /// Puts every `(key, value)` in few requests: transactions of at most 128 puts (etcd's
    /// default `--max-txn-ops`) and about 1 MiB (under its 1.5 MiB request limit), all sent by one
    /// curl process to etcd's JSON gateway (`/v3/kv/txn`). For writing registries far too big to
    /// write with one `etcdctl put` per key.
    pub fn put_all(&self, kvs: &[(String, String)]) -> Result<()> {
        const MAX_OPS: usize = 128;
        const MAX_BYTES: usize = 1 << 20;
        let dir = tempdir("etcd-put")?;
        let url = format!("{}/v3/kv/txn", self.endpoint());
        let tls = self.tls.as_ref().map_or(String::new(), |t| {
            format!("cacert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n", t.ca.display(), t.cert.display(), t.key.display())
        });
        let mut config = String::new();
        let mut batches = 0;
        // Keys and values are base64 in the gateway's JSON, so they need no escaping.
        for batch in batches_of(kvs, MAX_OPS, MAX_BYTES) {
            let mut body = b"{\"success\":[".to_vec();
            for (i, (k, v)) in batch.iter().enumerate() {
                body.extend_from_slice(if i == 0 { b"{\"requestPut\":{\"key\":\"" } else { b",{\"requestPut\":{\"key\":\"" });
                base64_encode_into(k.as_bytes(), &mut body);
                body.extend_from_slice(b"\",\"value\":\"");
                base64_encode_into(v.as_bytes(), &mut body);
                body.extend_from_slice(b"\"}}");
            }
            body.extend_from_slice(b"]}");
            let path = dir.path().join(format!("txn{batches}.json"));
            std::fs::write(&path, body)?;
            if batches > 0 {
                config.push_str("next\n");
            }
            // Options after `next` apply to the next transfer only, so each block names all of its own.
            config.push_str(&format!("url = \"{url}\"\ndata-binary = \"@{}\"\noutput = \"/dev/null\"\nwrite-out = \"%{{http_code}}\\n\"\n{tls}", path.display()));
            batches += 1;
        }
        let cfg = dir.path().join("curl.cfg");
        std::fs::write(&cfg, config)?;
        let out = check(&mut ns_command(&self.ns, &["curl", "-sS", "--config", cfg.to_str().context("non-UTF-8 temp dir")?]))?;
        let ok = out.lines().filter(|l| *l == "200").count();
        if ok != batches {
            bail!("etcd accepted {ok} of {batches} transactions: {out}");
        }
        Ok(())
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

/// Consecutive runs of `kvs` of at most `max_ops` pairs and, unless a single pair is bigger,
/// `max_bytes` of base64.
fn batches_of(kvs: &[(String, String)], max_ops: usize, max_bytes: usize) -> Vec<&[(String, String)]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (k, v)) in kvs.iter().enumerate() {
        let size = (k.len() + v.len()) * 4 / 3 + 8;
        if i > start && (i - start == max_ops || bytes + size > max_bytes) {
            out.push(&kvs[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < kvs.len() {
        out.push(&kvs[start..]);
    }
    out
}

/// Appends standard base64 with padding (what etcd's JSON gateway takes for keys and values).
fn base64_encode_into(bytes: &[u8], out: &mut Vec<u8>) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut chunks = bytes.chunks_exact(3);
    for c in &mut chunks {
        let n = u32::from(c[0]) << 16 | u32::from(c[1]) << 8 | u32::from(c[2]);
        out.extend_from_slice(&[ALPHABET[(n >> 18) as usize], ALPHABET[(n >> 12 & 63) as usize], ALPHABET[(n >> 6 & 63) as usize], ALPHABET[(n & 63) as usize]]);
    }
    match *chunks.remainder() {
        [a] => out.extend_from_slice(&[ALPHABET[usize::from(a >> 2)], ALPHABET[usize::from((a & 3) << 4)], b'=', b'=']),
        [a, b] => out.extend_from_slice(&[ALPHABET[usize::from(a >> 2)], ALPHABET[usize::from((a & 3) << 4 | b >> 4)], ALPHABET[usize::from((b & 15) << 2)], b'=']),
        _ => {}
    }
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
        let encode = |b: &[u8]| {
            let mut out = Vec::new();
            base64_encode_into(b, &mut out);
            String::from_utf8(out).unwrap()
        };
        for s in ["", "f", "fo", "foo", "foob", "fooba", "foobar", "{\"ü\":[1,2]}"] {
            assert_eq!(base64_decode(&encode(s.as_bytes())).unwrap(), s.as_bytes(), "{s}");
        }
        assert_eq!(encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(encode(b"fo"), "Zm8=");
    }

    #[test]
    fn batches_respect_the_op_and_size_limits() {
        let kv = |n: usize| (format!("k{n}"), "v".repeat(n));
        let kvs: Vec<(String, String)> = [1, 2, 3, 4, 5].into_iter().map(kv).collect();
        let sizes = |b: Vec<&[(String, String)]>| b.iter().map(|b| b.len()).collect::<Vec<_>>();
        assert_eq!(sizes(batches_of(&kvs, 2, 1000)), [2, 2, 1]);
        assert_eq!(sizes(batches_of(&kvs, 10, 1000)), [5]);
        // Every pair is over the byte limit on its own: one per batch, none dropped.
        assert_eq!(sizes(batches_of(&kvs, 10, 1)), [1, 1, 1, 1, 1]);
        assert!(batches_of(&[], 10, 10).is_empty());
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
