//! The DNS server in network namespaces, queried by real resolvers: `dig`, `nslookup` and the
//! glibc resolver (`getent`) of a "pod" whose resolv.conf is what the kubelet writes, with a
//! Knot DNS upstream in a namespace of its own.
//!
//! ```text
//!   pod      eth0 10.244.1.2/24 ──── p0 10.244.1.1/24 ┐
//!   outsider eth0 198.18.6.2/24 ──── o0 198.18.6.1/24 ├ node: netd-dns-standalone on
//!   upstream eth0 198.18.5.53/24 ─── u0 198.18.5.1/24 ┘   169.254.20.10:53 and 10.96.0.10:53 (lo)
//!   (knotd serving example.com)
//! ```
//!
//! Needs root, iproute2, dig/nslookup (bind9-dnsutils), knotd (knot). Everything lives in
//! `ntb-<pid>-*` namespaces and a `ntb-<pid>-*` temp dir, removed on drop (and reaped by the
//! test bed if the process dies); the pod's resolv.conf is `/etc/netns/<pod ns>/resolv.conf`,
//! which `ip netns exec` bind-mounts over /etc/resolv.conf, removed on drop too.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use netd_tests::{namespace_prefix, reap_stale_namespaces, wait_until, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_netd-dns-standalone");
const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

const EXAMPLE_ZONE: &str = "$ORIGIN example.com.
$TTL 300
@ IN SOA ns.example.com. hostmaster.example.com. 1 3600 900 86400 60
@ IN NS ns
ns IN A 198.18.5.53
www IN A 198.18.5.5
short 1 IN A 198.18.5.6
";

/// `/etc/netns/<ns>/resolv.conf`, removed on drop.
struct NetnsResolvConf {
    dir: PathBuf,
}

impl NetnsResolvConf {
    fn new(ns: &Netns, text: &str) -> Result<Self> {
        let dir = Path::new("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir)?;
        let guard = NetnsResolvConf { dir };
        std::fs::write(guard.dir.join("resolv.conf"), text)?;
        Ok(guard)
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        // Only if no other test uses it any more (remove_dir fails on a non-empty directory).
        let _ = std::fs::remove_dir("/etc/netns");
    }
}

/// The namespaces, the server and knotd. Field order is drop order: processes are killed
/// first, then the namespaces go.
struct Bed {
    procs: Vec<Child>,
    _resolv: NetnsResolvConf,
    pod: Netns,
    outsider: Netns,
    upstream: Netns,
    node: Netns,
    dir: tempfile::TempDir,
}

impl Drop for Bed {
    fn drop(&mut self) {
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for log in ["server.log", "knot.log"] {
                let text = std::fs::read_to_string(self.dir.path().join(log)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("---- {log} (last lines, newest first) ----\n{}", tail.join("\n"));
            }
        }
    }
}

fn veth(a: &Netns, a_if: &str, a_ip: &str, b: &Netns, b_ip: &str, b_gw: Option<&str>) -> Result<()> {
    a.ip(&["link", "add", a_if, "type", "veth", "peer", "name", "eth0", "netns", b.name()])?;
    a.ip(&["addr", "add", a_ip, "dev", a_if])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["addr", "add", b_ip, "dev", "eth0"])?;
    b.ip(&["link", "set", "eth0", "up"])?;
    if let Some(gw) = b_gw {
        b.ip(&["route", "add", "default", "via", gw])?;
    }
    Ok(())
}

impl Bed {
    fn new() -> Result<Bed> {
        Bed::with_config(None)
    }

    /// The bed, with the server reading `config` as its --dns-config file when given.
    fn with_config(config: Option<&str>) -> Result<Bed> {
        reap_stale_namespaces();
        let dir = tempfile::Builder::new().prefix(&format!("{}dns-", namespace_prefix())).tempdir()?;
        let node = Netns::new("dns-node")?;
        let upstream = Netns::new("dns-up")?;
        let outsider = Netns::new("dns-out")?;
        let pod = Netns::new("dns-pod")?;
        veth(&node, "p0", "10.244.1.1/24", &pod, "10.244.1.2/24", Some("10.244.1.1"))?;
        veth(&node, "u0", "198.18.5.1/24", &upstream, "198.18.5.53/24", None)?;
        veth(&node, "o0", "198.18.6.1/24", &outsider, "198.18.6.2/24", Some("198.18.6.1"))?;
        // What the kubelet writes for a pod in namespace "default" with ClusterFirst.
        let resolv = NetnsResolvConf::new(
            &pod,
            "search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n",
        )?;
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        for f in ["services.json", "slices.json"] {
            std::fs::copy(data.join(f), dir.path().join(f))?;
        }
        let mut bed = Bed { procs: Vec::new(), _resolv: resolv, pod, outsider, upstream, node, dir };
        bed.start_knot()?;
        match config {
            Some(text) => {
                std::fs::write(bed.path("netd.yaml"), text)?;
                let conf = bed.p("netd.yaml");
                bed.start_server(&["--dns-config", &conf])?;
            }
            None => bed.start_server(&[])?,
        }
        Ok(bed)
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn p(&self, f: &str) -> String {
        self.path(f).to_string_lossy().into_owned()
    }

    fn start_knot(&mut self) -> Result<()> {
        let mut zone = EXAMPLE_ZONE.to_string();
        // 40 TXT records of 60 bytes: ~3 KB, more than fits our 1232-byte EDNS size.
        for i in 0..40 {
            zone.push_str(&format!("big IN TXT \"{i:02}-{}\"\n", "x".repeat(57)));
        }
        let child = knot(&self.upstream, &self.path("knot"), "198.18.5.53", &[("example.com", &zone)], &self.path("knot.log"))?;
        self.procs.push(child);
        wait_until(WAIT, POLL, || Ok(dig_short(&self.upstream, "198.18.5.53", &["www.example.com"])? == ["198.18.5.5"]))
            .context("knotd did not come up")?;
        Ok(())
    }

    fn start_server(&mut self, extra: &[&str]) -> Result<()> {
        let (svc, eps, metrics) = (self.p("services.json"), self.p("slices.json"), self.p("metrics.json"));
        let mut args = vec![
            BIN,
            "serve",
            "--services",
            &svc,
            "--slices",
            &eps,
            "--metrics-file",
            &metrics,
            "--serial",
            "7",
            "--dns-listen",
            "169.254.20.10:53",
            "--cluster-dns-ip",
            "10.96.0.10",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--dns-upstream",
            "198.18.5.53",
            "--dns-upstream-timeout",
            "700ms",
            "--dns-workers",
            "2",
        ];
        args.extend_from_slice(extra);
        let child = self.node.spawn(&args, Some(&self.path("server.log")))?;
        self.procs.push(child);
        wait_until(WAIT, POLL, || {
            Ok(dig_short(&self.node, "169.254.20.10", &["dns-version.cluster.local", "TXT"])? == ["\"1.1.0\""])
        })
        .context("the DNS server did not come up")?;
        Ok(())
    }

    fn server_alive(&mut self) -> bool {
        self.procs.last_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn metrics(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(&std::fs::read(self.path("metrics.json"))?)?)
    }

    /// Waits until the metrics file shows `field` >= `min`.
    fn wait_metric(&self, field: &str, min: u64) -> Result<()> {
        wait_until(WAIT, POLL, || Ok(self.metrics()?[field].as_u64().unwrap_or(0) >= min))
            .with_context(|| format!("metric {field} never reached {min}"))
    }
}

/// knotd in `ns`, listening on `ip`, serving `zones` (name, master file) from `dir`.
fn knot(ns: &Netns, dir: &Path, ip: &str, zones: &[(&str, &str)], log: &Path) -> Result<Child> {
    std::fs::create_dir_all(dir.join("db"))?;
    let mut zone_list = String::new();
    for (name, text) in zones {
        std::fs::write(dir.join(format!("{name}.zone")), text)?;
        zone_list.push_str(&format!("  - domain: {name}\n"));
    }
    let k = dir.display();
    std::fs::write(
        dir.join("knot.conf"),
        format!(
            "server:\n  rundir: \"{k}\"\n  listen: {ip}@53\n  background-workers: 1\n  udp-workers: 1\n  tcp-workers: 1\n\
             log:\n  - target: stderr\n    any: info\n\
             database:\n  storage: \"{k}/db\"\n\
             template:\n  - id: default\n    storage: \"{k}\"\n    file: \"%s.zone\"\n    journal-content: none\n    zonefile-sync: -1\n\
             zone:\n{zone_list}"
        ),
    )?;
    let conf = dir.join("knot.conf").to_string_lossy().into_owned();
    ns.spawn(&["knotd", "-c", &conf], Some(log))
}

/// `dig` with short timeouts; the whole output.
fn dig(ns: &Netns, server: &str, args: &[&str]) -> Result<String> {
    let at = format!("@{server}");
    let mut full = vec!["dig", "+time=3", "+tries=1", at.as_str()];
    full.extend_from_slice(args);
    let out = ns.exec(&full)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !text.contains("->>HEADER<<-") {
        bail!("dig {args:?} got no answer:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(text)
}

/// The answer's rdata, sorted (`dig +short`).
fn dig_short(ns: &Netns, server: &str, args: &[&str]) -> Result<Vec<String>> {
    let mut full = vec!["+short"];
    full.extend_from_slice(args);
    let at = format!("@{server}");
    let mut cmd = vec!["dig", "+time=3", "+tries=1", at.as_str()];
    cmd.extend_from_slice(&full);
    let out = ns.exec(&cmd)?;
    if !out.status.success() {
        bail!("dig {args:?} failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().to_string()).collect();
    v.retain(|l| !l.is_empty() && !l.starts_with(";;"));
    v.sort();
    Ok(v)
}

fn status(out: &str) -> &str {
    out.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("?")
}

fn section<'a>(out: &'a str, name: &str) -> Vec<&'a str> {
    let head = format!(";; {name} SECTION:");
    let mut lines = out.lines().skip_while(|l| !l.starts_with(&head));
    lines.next();
    lines.take_while(|l| !l.trim().is_empty()).collect()
}

#[test]
fn dig_gets_every_record_type_and_rcode() -> Result<()> {
    let bed = Bed::new()?;
    let pod = &bed.pod;
    for server in ["169.254.20.10", "10.96.0.10"] {
        assert_eq!(dig_short(pod, server, &["web.default.svc.cluster.local"])?, ["10.96.0.20"]);
    }
    let s = "10.96.0.10";
    // Case-insensitive, with the question's case echoed.
    let out = dig(pod, s, &["WeB.DEFAULT.svc.Cluster.Local"])?;
    assert_eq!(status(&out), "NOERROR");
    assert!(out.contains("WeB.DEFAULT.svc.Cluster.Local."), "{out}");
    assert!(out.contains("flags: qr aa rd ra;"), "{out}");
    // Headless service, hostnames, SRV with additional addresses.
    assert_eq!(dig_short(pod, s, &["db.default.svc.cluster.local"])?, ["10.244.1.21", "10.244.2.22"]);
    assert_eq!(dig_short(pod, s, &["db-1.db.default.svc.cluster.local"])?, ["10.244.2.22"]);
    let out = dig(pod, s, &["_postgres._tcp.db.default.svc.cluster.local", "SRV"])?;
    assert_eq!(section(&out, "ANSWER").len(), 2, "{out}");
    assert_eq!(section(&out, "ADDITIONAL").len(), 2, "{out}");
    assert_eq!(
        dig_short(pod, s, &["_https._tcp.kubernetes.default.svc.cluster.local", "SRV"])?,
        ["0 100 443 kubernetes.default.svc.cluster.local."]
    );
    // PTR, ExternalName, TXT, NS, SOA, pod names.
    assert_eq!(dig_short(pod, s, &["-x", "10.96.0.20"])?, ["web.default.svc.cluster.local."]);
    assert_eq!(dig_short(pod, s, &["-x", "10.244.1.21"])?, ["db-0.db.default.svc.cluster.local."]);
    assert_eq!(dig_short(pod, s, &["ext.default.svc.cluster.local", "CNAME"])?, ["www.example.com."]);
    assert_eq!(dig_short(pod, s, &["dns-version.cluster.local", "TXT"])?, ["\"1.1.0\""]);
    assert_eq!(dig_short(pod, s, &["cluster.local", "NS"])?, ["ns.dns.cluster.local."]);
    assert_eq!(dig_short(pod, s, &["ns.dns.cluster.local"])?, ["10.96.0.10"]);
    assert_eq!(
        dig_short(pod, s, &["cluster.local", "SOA"])?,
        ["ns.dns.cluster.local. hostmaster.cluster.local. 7 7200 1800 86400 5"]
    );
    assert_eq!(dig_short(pod, s, &["10-244-1-99.default.pod.cluster.local"])?, ["10.244.1.99"]);
    // NODATA and NXDOMAIN, both with the SOA.
    let out = dig(pod, s, &["web.default.svc.cluster.local", "AAAA"])?;
    assert_eq!(status(&out), "NOERROR");
    assert!(section(&out, "ANSWER").is_empty());
    assert!(section(&out, "AUTHORITY")[0].contains("SOA"), "{out}");
    let out = dig(pod, s, &["nope.default.svc.cluster.local"])?;
    assert_eq!(status(&out), "NXDOMAIN");
    let soa = section(&out, "AUTHORITY");
    assert!(soa[0].starts_with("cluster.local.") && soa[0].contains("\t5\tIN\tSOA"), "{out}");
    // TCP, and truncation: 200 addresses do not fit UDP; dig retries over TCP.
    assert_eq!(dig_short(pod, s, &["+tcp", "web.default.svc.cluster.local"])?, ["10.96.0.20"]);
    let out = dig(pod, s, &["+ignore", "big.many.svc.cluster.local"])?;
    assert!(out.contains("flags: qr aa tc rd ra;"), "{out}");
    let out = dig(pod, s, &["big.many.svc.cluster.local"])?;
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert_eq!(section(&out, "ANSWER").len(), 200);
    // Without EDNS.
    let out = dig(pod, s, &["+noedns", "web.default.svc.cluster.local"])?;
    assert!(!out.contains("OPT PSEUDOSECTION"), "{out}");
    assert_eq!(section(&out, "ANSWER").len(), 1);
    Ok(())
}

#[test]
fn glibc_resolver_and_nslookup_use_the_pod_search_path() -> Result<()> {
    let bed = Bed::new()?;
    let pod = &bed.pod;
    let getent = |args: &[&str]| -> Result<String> {
        let mut full = vec!["getent"];
        full.extend_from_slice(args);
        pod.run(&full)
    };
    // Short names through the search list (ndots:5).
    assert!(getent(&["ahostsv4", "web"])?.starts_with("10.96.0.20"), "{}", getent(&["ahostsv4", "web"])?);
    assert!(getent(&["hosts", "web"])?.starts_with("10.96.0.20 "));
    assert!(getent(&["hosts", "kubernetes.default"])?.starts_with("10.96.0.1 "));
    assert!(getent(&["hosts", "kube-dns.kube-system.svc"])?.starts_with("10.96.0.10 "));
    let db = getent(&["ahostsv4", "db-0.db"])?;
    assert!(db.starts_with("10.244.1.21"), "{db}");
    // Fully qualified, reverse, and a missing name (exit status 2).
    assert!(getent(&["hosts", "web.default.svc.cluster.local."])?.starts_with("10.96.0.20 "));
    let rev = getent(&["hosts", "10.96.0.20"])?;
    assert!(rev.contains("web.default.svc.cluster.local"), "{rev}");
    let miss = pod.exec(&["getent", "hosts", "no-such-service"])?;
    assert_eq!(miss.status.code(), Some(2));
    // Names outside the cluster are forwarded (the last search step is the name itself).
    assert!(getent(&["ahostsv4", "www.example.com"])?.starts_with("198.18.5.5"));
    // nslookup with the pod's resolv.conf (search list) and with an explicit server.
    let out = pod.run(&["nslookup", "web"])?;
    assert!(out.contains("Name:\tweb.default.svc.cluster.local") && out.contains("Address: 10.96.0.20"), "{out}");
    let out = pod.run(&["nslookup", "-type=SRV", "_postgres._tcp.db.default.svc.cluster.local", "169.254.20.10"])?;
    assert!(out.contains("service = 0 50 5432 db-0.db.default.svc.cluster.local."), "{out}");
    let out = pod.exec(&["nslookup", "nope.default.svc.cluster.local", "169.254.20.10"])?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("NXDOMAIN"));
    Ok(())
}

#[test]
fn forwarding_cache_truncation_and_upstream_failure() -> Result<()> {
    let mut bed = Bed::new()?;
    let s = "10.96.0.10";
    // Forwarded to knotd; the answer carries the upstream TTL.
    let out = dig(&bed.pod, s, &["www.example.com"])?;
    assert_eq!(status(&out), "NOERROR");
    assert!(section(&out, "ANSWER")[0].contains("198.18.5.5"), "{out}");
    assert!(!out.contains(" aa "), "forwarded answers are not authoritative: {out}");
    // Negative answer, with knot's SOA.
    let out = dig(&bed.pod, s, &["nx.example.com"])?;
    assert_eq!(status(&out), "NXDOMAIN");
    assert!(section(&out, "AUTHORITY")[0].contains("example.com."), "{out}");
    // A 3 KB answer: knot truncates for our 1232-byte EDNS size, we retry over TCP, and
    // truncate for the client, which retries over TCP too and gets it from the cache.
    let out = dig(&bed.pod, s, &["big.example.com", "TXT"])?;
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert_eq!(section(&out, "ANSWER").len(), 40, "{out}");
    // ExternalName: CNAME, then the target resolved upstream.
    let out = dig(&bed.pod, s, &["ext.default.svc.cluster.local"])?;
    let ans = section(&out, "ANSWER");
    assert_eq!(ans.len(), 2, "{out}");
    assert!(ans[0].contains("CNAME\twww.example.com.") && ans[1].contains("198.18.5.5"), "{out}");
    bed.wait_metric("tcp_fallbacks", 1)?;
    // www, nx, big; the ExternalName target (www) came from the cache.
    bed.wait_metric("forwards", 3)?;

    // Stop knot: cached answers (positive and negative) keep being served, new names fail.
    let mut knot = bed.procs.remove(0);
    let _ = knot.kill();
    knot.wait()?;
    let hits = bed.metrics()?["cache_hits"].as_u64().unwrap_or(0);
    assert_eq!(dig_short(&bed.pod, s, &["www.example.com"])?, ["198.18.5.5"]);
    assert_eq!(status(&dig(&bed.pod, s, &["nx.example.com"])?), "NXDOMAIN");
    assert_eq!(dig_short(&bed.pod, s, &["WWW.EXAMPLE.COM"])?, ["198.18.5.5"]);
    bed.wait_metric("cache_hits", hits + 3)?;
    let out = dig(&bed.pod, s, &["new.example.com"])?;
    assert_eq!(status(&out), "SERVFAIL");
    // An upstream that does not answer at all (link down): SERVFAIL after the timeout.
    bed.upstream.ip(&["link", "set", "eth0", "down"])?;
    let out = dig(&bed.pod, s, &["other.example.com"])?;
    assert_eq!(status(&out), "SERVFAIL");
    bed.wait_metric("forward_failures", 2)?;
    // The cluster zone is unaffected.
    assert_eq!(dig_short(&bed.pod, s, &["web.default.svc.cluster.local"])?, ["10.96.0.20"]);
    Ok(())
}

/// The `dns` section of a config file: its keys win over the flags; a bad file keeps the server
/// from starting with an error naming the line.
#[test]
fn the_dns_section_of_a_config_file() -> Result<()> {
    let bed = Bed::with_config(Some("dns:\n  ttl: 77\n  upstreams: [198.18.5.53]\n"))?;
    let out = dig(&bed.pod, "10.96.0.10", &["web.default.svc.cluster.local"])?;
    let fields: Vec<&str> = section(&out, "ANSWER")[0].split_whitespace().collect();
    assert_eq!(fields, ["web.default.svc.cluster.local.", "77", "IN", "A", "10.96.0.20"], "the file's TTL, not --dns-ttl's default: {out}");
    assert_eq!(dig_short(&bed.pod, "10.96.0.10", &["www.example.com"])?, ["198.18.5.5"]);
    std::fs::write(bed.path("bad.yaml"), "dns:\n  ttl: 77\n  upstreams: [198.18.5.53]\n  cachesize: 10\n")?;
    let out = bed.node.exec(&[BIN, "serve", "--services", &bed.p("services.json"), "--slices", &bed.p("slices.json"), "--dns-listen", "127.0.0.1:0", "--dns-config", &bed.p("bad.yaml")])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("bad.yaml: dns: unknown field `cachesize`") && err.contains("line 4"), "{err}");
    Ok(())
}

/// Serve stale: with the upstream killed, an answer whose TTL ran out is still given (TTL 0,
/// within the bound), a name never cached fails.
#[test]
fn serve_stale_when_every_upstream_fails() -> Result<()> {
    let mut bed = Bed::with_config(Some("dns:\n  serveStale: 10m\n"))?;
    let s = "10.96.0.10";
    assert_eq!(dig_short(&bed.pod, s, &["short.example.com"])?, ["198.18.5.6"]);
    let mut knot = bed.procs.remove(0);
    let _ = knot.kill();
    knot.wait()?;
    // Past the record's 1 s TTL (a wait, not a timing assertion).
    std::thread::sleep(Duration::from_millis(2100));
    let out = dig(&bed.pod, s, &["short.example.com"])?;
    assert_eq!(status(&out), "NOERROR", "{out}");
    let fields: Vec<&str> = section(&out, "ANSWER")[0].split_whitespace().collect();
    assert_eq!(fields, ["short.example.com.", "0", "IN", "A", "198.18.5.6"], "{out}");
    bed.wait_metric("stale_answers", 1)?;
    assert_eq!(status(&dig(&bed.pod, s, &["never.example.com"])?), "SERVFAIL");
    Ok(())
}

/// A hosts file: its names answered first (before Services, as CoreDNS's plugin order gives
/// it), reverse names too, and an edit of the file picked up.
#[test]
fn a_hosts_file_answers_first_and_is_reloaded() -> Result<()> {
    let dir = tempfile::Builder::new().prefix(&format!("{}hosts-", namespace_prefix())).tempdir()?;
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "198.18.9.1 db.corp.test db # comment\n10.9.9.9 web.default.svc.cluster.local\nbogus line\n")?;
    let bed = Bed::with_config(Some(&format!("dns:\n  hostsFile: {}\n", hosts.display())))?;
    let s = "10.96.0.10";
    assert_eq!(dig_short(&bed.pod, s, &["db.corp.test"])?, ["198.18.9.1"]);
    let mut ptr = dig_short(&bed.pod, s, &["-x", "198.18.9.1"])?;
    ptr.sort();
    assert_eq!(ptr, ["db.", "db.corp.test."], "every name of the address, like CoreDNS");
    assert_eq!(dig_short(&bed.pod, s, &["web.default.svc.cluster.local"])?, ["10.9.9.9"], "the hosts file comes first");
    assert_eq!(dig_short(&bed.pod, s, &["kubernetes.default.svc.cluster.local"])?, ["10.96.0.1"], "other names as before");
    assert_eq!(status(&dig(&bed.pod, s, &["db.corp.test", "MX"])?), "NOERROR");
    std::fs::write(&hosts, "198.18.9.2 db.corp.test\n")?;
    wait_until(WAIT, POLL, || Ok(dig_short(&bed.pod, s, &["db.corp.test"])? == ["198.18.9.2"]))?;
    assert_eq!(dig_short(&bed.pod, s, &["web.default.svc.cluster.local"])?, ["10.96.0.20"]);
    Ok(())
}

/// A process killed (and reaped) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stub domains against a second Knot server that alone serves them (the node's upstream
/// refuses them): failover past a dead upstream listed first, which is then tried last (counted
/// in `upstream_errors`, no timing), and `forceTcp` answering while the stub server drops UDP.
#[test]
fn stub_domains_go_to_their_own_upstreams() -> Result<()> {
    let config = "dns:\n  forward:\n    - zone: corp.test\n      upstreams: [198.18.7.99, 198.18.7.53]\n      policy: sequential\n      maxFails: 1\n      healthCheck: 10m\n    - zone: tcp.test\n      upstreams: [198.18.7.53]\n      forceTcp: true\n";
    let bed = Bed::with_config(Some(config))?;
    let stub = Netns::new("dns-stub")?;
    veth(&bed.node, "s0", "198.18.7.1/24", &stub, "198.18.7.53/24", None)?;
    let corp = "$ORIGIN corp.test.\n$TTL 300\n@ IN SOA ns hostmaster 1 3600 900 86400 60\n@ IN NS ns\nns IN A 198.18.7.53\nhost IN A 198.18.7.7\n* IN A 198.18.7.8\n";
    let tcp = "$ORIGIN tcp.test.\n$TTL 300\n@ IN SOA ns hostmaster 1 3600 900 86400 60\n@ IN NS ns\nns IN A 198.18.7.53\nx IN A 198.18.7.9\n";
    let _knot = Killed(knot(&stub, &bed.path("knot-stub"), "198.18.7.53", &[("corp.test", corp), ("tcp.test", tcp)], &bed.path("knot-stub.log"))?);
    wait_until(WAIT, POLL, || Ok(dig_short(&stub, "198.18.7.53", &["host.corp.test"])? == ["198.18.7.7"])).context("the stub knotd did not come up")?;
    let s = "10.96.0.10";
    // The node's upstream does not serve corp.test.
    assert_eq!(status(&dig(&bed.node, "198.18.5.53", &["host.corp.test"])?), "REFUSED");

    // 198.18.7.99 is listed first and answers nothing: the first query fails over to .53 after
    // the timeout, and .99 (down after one failure) goes last: the next names never wait for it.
    assert_eq!(dig_short(&bed.pod, s, &["host.corp.test"])?, ["198.18.7.7"]);
    bed.wait_metric("upstream_errors", 1)?;
    for i in 0..4 {
        assert_eq!(dig_short(&bed.pod, s, &[&format!("n{i}.corp.test")])?, ["198.18.7.8"]);
    }
    bed.wait_metric("forwards", 5)?;
    assert_eq!(bed.metrics()?["upstream_errors"], 1, "the dead upstream was tried once, not per query");
    // Other names still go to the node's upstream.
    assert_eq!(dig_short(&bed.pod, s, &["www.example.com"])?, ["198.18.5.5"]);

    // The stub server drops UDP: forceTcp's zone still answers; the other zone's new names fail.
    stub.run(&["nft", "add table inet stubtest"])?;
    stub.run(&["nft", "add chain inet stubtest in { type filter hook input priority 0 ; }"])?;
    stub.run(&["nft", "add rule inet stubtest in udp dport 53 drop"])?;
    assert_eq!(dig_short(&bed.pod, s, &["x.tcp.test"])?, ["198.18.7.9"]);
    assert_eq!(status(&dig(&bed.pod, s, &["udp-only.corp.test"])?), "SERVFAIL");
    Ok(())
}

#[test]
fn recursion_only_for_the_cluster_network_and_the_node() -> Result<()> {
    let bed = Bed::new()?;
    // A client outside --cluster-cidr: cluster names yes, recursion no.
    let o = &bed.outsider;
    assert_eq!(dig_short(o, "169.254.20.10", &["web.default.svc.cluster.local"])?, ["10.96.0.20"]);
    let out = dig(o, "169.254.20.10", &["www.example.com"])?;
    assert_eq!(status(&out), "REFUSED");
    assert!(out.contains("recursion requested but not available"), "{out}");
    // The node itself (its own addresses) is served.
    assert_eq!(dig_short(&bed.node, "169.254.20.10", &["www.example.com"])?, ["198.18.5.5"]);
    let out = bed.node.run(&["dig", "+time=3", "+tries=1", "-b", "198.18.6.1", "@169.254.20.10", "www.example.com"])?;
    assert_eq!(status(&out), "NOERROR");
    bed.wait_metric("refused_recursion", 1)?;
    Ok(())
}

#[test]
fn registry_changes_are_served() -> Result<()> {
    let bed = Bed::new()?;
    let s = "10.96.0.10";
    assert_eq!(dig_short(&bed.pod, s, &["web.default.svc.cluster.local"])?, ["10.96.0.20"]);
    // The registry's job: rewrite the services file (drop "web", add "fresh").
    let path = bed.path("services.json");
    let mut list: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let items = list["items"].as_array_mut().context("items")?;
    items.retain(|i| i["metadata"]["name"] != "web");
    let mut fresh = items[0].clone();
    fresh["metadata"]["name"] = "fresh".into();
    fresh["spec"]["clusterIP"] = "10.96.0.77".into();
    fresh["spec"]["clusterIPs"] = serde_json::json!(["10.96.0.77"]);
    items.push(fresh);
    let tmp = bed.path("services.json.new");
    std::fs::write(&tmp, serde_json::to_vec(&list)?)?;
    std::fs::rename(&tmp, &path)?;
    wait_until(WAIT, Duration::from_millis(10), || {
        Ok(dig_short(&bed.pod, s, &["fresh.default.svc.cluster.local"])? == ["10.96.0.77"])
    })?;
    assert_eq!(status(&dig(&bed.pod, s, &["web.default.svc.cluster.local"])?), "NXDOMAIN");
    // A file that does not parse keeps the last good zone.
    std::fs::write(&path, b"{ not json")?;
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(dig_short(&bed.pod, s, &["fresh.default.svc.cluster.local"])?, ["10.96.0.77"]);
    Ok(())
}

#[test]
fn garbage_does_not_hurt_the_server() -> Result<()> {
    let mut bed = Bed::new()?;
    // Random datagrams and random TCP streams, then a valid query.
    let script = "for i in $(seq 1 300); do head -c $((i % 700 + 1)) /dev/urandom > /dev/udp/169.254.20.10/53; done; \
                  for i in $(seq 1 20); do head -c $((i * 37)) /dev/urandom > /dev/tcp/169.254.20.10/53 || true; done";
    bed.pod.run(&["bash", "-c", script])?;
    assert_eq!(dig_short(&bed.pod, "169.254.20.10", &["web.default.svc.cluster.local"])?, ["10.96.0.20"]);
    assert!(bed.server_alive(), "the server died");
    bed.wait_metric("dropped", 1)?;
    Ok(())
}
