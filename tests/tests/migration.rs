//! Migration of a live node from flanneld (vxlan) + kube-proxy (iptables) + a cluster DNS
//! Service to netd (`--take-over flannel,kube-proxy`), measured under load: pods keep their
//! addresses and stay reachable from nodes still on flannel during and after the switch, no DNS
//! query is lost, flannel's and kube-proxy's rules are gone afterwards. Counts, never timings.
//!
//! Three nodes set up by [`netd_tests::flannel`] exactly as flanneld, flannel's CNI plugin
//! (bridge + host-local) and kube-proxy leave them; the cluster DNS is knotd in a pod on node2
//! behind the Service 10.96.0.10. node0 is switched; node1 and node2 stay on "flannel".

use std::collections::BTreeSet;
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use netd_tests::flannel::{self, add_flannel_pod, host_local_data_dir, iptables_chains, kube_proxy_rules, KubeServicePort};
use netd_tests::{wait_until, Cluster, Netns, Node, Pod};

const WAIT: Duration = Duration::from_secs(40);
const POLL: Duration = Duration::from_millis(100);
const DNS_IP: &str = "10.96.0.10";
const WEB_IP: &str = "10.96.0.50";
const NAME: &str = "web.default.svc.cluster.local";
/// Pod traffic: one echo request per millisecond.
const PING_INTERVAL: &str = "0.001";
/// Echo requests in one second at that rate: the most the switch may cost (goal: under 1 s).
const PINGS_PER_SECOND: u64 = 1000;

/// The Services as kube-proxy programmed them on every node, and as the registry holds them.
fn service_ports(dns: &Pod, web: &Pod) -> Vec<KubeServicePort> {
    let port = |id: &str, hash: &str, ip: &str, proto, port, node_port, ep: &Pod, ep_port| KubeServicePort {
        id: id.into(),
        hash: hash.into(),
        cluster_ip: ip.parse().unwrap(),
        proto,
        port,
        node_port,
        endpoint: (ep.ip, ep_port),
    };
    vec![
        port("kube-system/kube-dns:dns", "TCOU7JCQXEZGVUNU", DNS_IP, "udp", 53, None, dns, 53),
        port("kube-system/kube-dns:dns-tcp", "ERIFXISQEP7F7OF4", DNS_IP, "tcp", 53, None, dns, 53),
        port("default/web:http", "WEBHTTP000000000", WEB_IP, "tcp", 80, Some(30080), web, 8080),
    ]
}

fn registry_manifest(dns: &Pod, web: &Pod) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: kube-dns\n  namespace: kube-system\nspec:\n  clusterIP: {DNS_IP}\n  selector:\n    k8s-app: kube-dns\n  ports:\n  - name: dns\n    protocol: UDP\n    port: 53\n  - name: dns-tcp\n    protocol: TCP\n    port: 53\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: kube-dns-1\n  namespace: kube-system\n  labels:\n    kubernetes.io/service-name: kube-dns\naddressType: IPv4\nports:\n- name: dns\n  protocol: UDP\n  port: 53\n- name: dns-tcp\n  protocol: TCP\n  port: 53\nendpoints:\n- addresses: [\"{dns}\"]\n  conditions:\n    ready: true\n  nodeName: node2\n---\n\
         apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  type: NodePort\n  clusterIP: {WEB_IP}\n  selector:\n    app: web\n  ports:\n  - name: http\n    protocol: TCP\n    port: 80\n    targetPort: 8080\n    nodePort: 30080\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nports:\n- name: http\n  protocol: TCP\n  port: 8080\nendpoints:\n- addresses: [\"{web}\"]\n  conditions:\n    ready: true\n  nodeName: node1\n---\n",
        dns = dns.ip,
        web = web.ip
    )
}

/// knotd in `pod` serving cluster.local (what CoreDNS answers for the two Services).
fn start_cluster_dns(node: &Node, pod: &Pod) -> Result<Child> {
    let dir = flannel::flannel_dir(node).join("knot");
    std::fs::create_dir_all(dir.join("db"))?;
    std::fs::write(
        dir.join("cluster.local.zone"),
        format!(
            "$ORIGIN cluster.local.\n$TTL 30\n@ IN SOA ns.dns hostmaster 1 3600 900 86400 30\n@ IN NS ns.dns\nns.dns IN A {}\nweb.default.svc IN A {WEB_IP}\nkube-dns.kube-system.svc IN A {DNS_IP}\n",
            pod.ip
        ),
    )?;
    let d = dir.display();
    std::fs::write(
        dir.join("knot.conf"),
        format!(
            "server:\n  rundir: \"{d}\"\n  listen: 0.0.0.0@53\n  background-workers: 1\n  udp-workers: 2\n  tcp-workers: 1\n\
             log:\n  - target: stderr\n    any: info\n\
             database:\n  storage: \"{d}/db\"\n\
             template:\n  - id: default\n    storage: \"{d}\"\n    file: \"%s.zone\"\n    journal-content: none\n    zonefile-sync: -1\n\
             zone:\n  - domain: cluster.local\n"
        ),
    )?;
    pod.spawn(&["knotd", "-c", &dir.join("knot.conf").to_string_lossy()], Some(&dir.join("knot.log")))
}

/// One `dig` of NAME at the cluster DNS IP from `pod`: the answer's address, or what dig said.
fn dig(pod: &Pod) -> Result<String> {
    let out = pod.exec(&["dig", "+short", "+time=1", "+tries=1", &format!("@{DNS_IP}"), NAME])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One TCP exchange from `pod` to `addr`: the answer, or the error socat printed.
fn ask(pod: &Pod, addr: &str) -> Result<String> {
    ask_ns(&pod.ns, addr)
}

fn ask_ns(ns: &Netns, addr: &str) -> Result<String> {
    let out = ns.exec(&["socat", "-T", "3", "-", &format!("TCP:{addr},connect-timeout=3")])?;
    Ok(if out.status.success() { String::from_utf8_lossy(&out.stdout).trim().to_string() } else { format!("ERROR {}", String::from_utf8_lossy(&out.stderr).trim()) })
}

/// A load running in a pod, its stdout captured into a file, stopped with SIGINT (ping and
/// dnsperf print their summaries then).
struct Load {
    child: Child,
    out: std::path::PathBuf,
}

impl Load {
    fn start(pod: &Pod, dir: &std::path::Path, name: &str, args: &[&str]) -> Result<Load> {
        let out = dir.join(format!("{name}.out"));
        let mut cmd = pod.ns.command(args);
        cmd.stdout(std::fs::File::create(&out)?).stderr(std::fs::File::create(dir.join(format!("{name}.err")))?).stdin(Stdio::null());
        Ok(Load { child: cmd.spawn().with_context(|| format!("starting {args:?}"))?, out })
    }

    /// SIGINT to the load's processes (`ip netns exec` passes it on: same process group), then
    /// its output.
    fn stop(mut self) -> Result<String> {
        // SAFETY: kill(2) on the process group of a child we spawned and have not reaped.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGINT) };
        // SAFETY: as above, to the process itself in case it is no group leader.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.child.wait()?;
        Ok(std::fs::read_to_string(&self.out)?)
    }
}

/// What a `ping -D -i` run saw: requests sent, replies, the longest run of requests without a
/// reply between two answered ones (by icmp_seq), the first and last reply's time (`-D`: Unix
/// time) and the longest time between two replies, for the report.
#[derive(Debug)]
struct PingCount {
    sent: u64,
    received: u64,
    longest_gap: u64,
    first: f64,
    last: f64,
    longest_gap_ms: f64,
}

fn ping_count(out: &str) -> Result<PingCount> {
    // "[1765158127.123456] 64 bytes from 10.244.1.2: icmp_seq=17 ttl=62 time=0.1 ms"
    let replies: Vec<(f64, u64)> = out
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| {
            let at = l.strip_prefix('[')?.split(']').next()?.parse().ok()?;
            let seq = l.split_whitespace().find_map(|w| w.strip_prefix("icmp_seq="))?.parse().ok()?;
            Some((at, seq))
        })
        .collect();
    let seqs: BTreeSet<u64> = replies.iter().map(|r| r.1).collect();
    let first = replies.first().map_or(0.0, |r| r.0);
    let last = replies.last().map_or(0.0, |r| r.0);
    let longest_gap_ms = replies.windows(2).map(|w| (w[1].0 - w[0].0) * 1000.0).fold(0.0, f64::max);
    let summary = out.lines().find(|l| l.contains("packets transmitted")).with_context(|| format!("no ping summary in {}", netd_tests_tail(out)))?;
    // "N packets transmitted, M received, ..."
    let words: Vec<&str> = summary.split_whitespace().collect();
    let received = words.iter().position(|w| *w == "received,").and_then(|i| words[i - 1].parse().ok()).with_context(|| summary.to_string())?;
    let sent = words[0].parse().with_context(|| summary.to_string())?;
    let longest_gap = seqs.iter().zip(seqs.iter().skip(1)).map(|(a, b)| b - a - 1).max().unwrap_or(0);
    Ok(PingCount { sent, received, longest_gap, first, last, longest_gap_ms })
}

fn netd_tests_tail(out: &str) -> String {
    let lines: Vec<&str> = out.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// `Queries sent:` and `Queries lost:` of a dnsperf summary.
fn dnsperf_count(out: &str) -> Result<(u64, u64)> {
    let field = |name: &str| -> Result<u64> {
        let line = out.lines().find(|l| l.trim_start().starts_with(name)).with_context(|| format!("no {name:?} in dnsperf output:\n{out}"))?;
        Ok(line.trim_start()[name.len()..].split_whitespace().next().context("empty")?.parse()?)
    };
    Ok((field("Queries sent:")?, field("Queries lost:")?))
}

#[test]
fn a_flannel_and_kube_proxy_node_is_switched_to_netd_nftables_without_losing_pod_traffic_or_dns() -> Result<()> {
    switch_to_netd("nftables", "iptables-restore")
}

/// netd's own iptables chains beside kube-proxy's until these go (the same mark, 0x4000, for
/// masquerading): only kube-proxy's are removed. Here kube-proxy used the legacy iptables (a
/// node whose iptables is iptables-legacy), netd the nf_tables one: its chains are found there.
#[test]
fn a_flannel_and_legacy_kube_proxy_node_is_switched_to_netd_iptables_without_losing_pod_traffic_or_dns() -> Result<()> {
    switch_to_netd("iptables", "iptables-legacy-restore")
}

/// `kube_proxy_restore`: the `iptables-restore` kube-proxy wrote its rules with.
fn switch_to_netd(proxy_mode: &str, kube_proxy_restore: &str) -> Result<()> {
    let mut c = Cluster::new(3)?;
    let fl = flannel::install(&c)?;
    let p0 = add_flannel_pod(c.node(0), &fl[0], "p0")?;
    let p0b = add_flannel_pod(c.node(0), &fl[0], "p0b")?;
    let p1 = add_flannel_pod(c.node(1), &fl[1], "p1")?;
    let dns = add_flannel_pod(c.node(2), &fl[2], "dns")?;
    let _knot = start_cluster_dns(c.node(2), &dns)?;
    let _web = p1.spawn(&["socat", "TCP-LISTEN:8080,fork,reuseaddr", "SYSTEM:echo p1"], None)?;
    let ports = service_ports(&dns, &p1);
    for n in c.nodes() {
        flannel::restore_with(n, kube_proxy_restore, &kube_proxy_rules(&ports, "10.244.0.0/16"))?;
    }
    // The flannel + kube-proxy cluster works.
    assert!(p1.ping(p0.ip) && p0.ping(p1.ip), "flannel overlay");
    wait_until(WAIT, POLL, || Ok(dig(&p0)? == WEB_IP)).context("cluster DNS through kube-proxy's rules")?;
    assert_eq!(ask(&p0, &format!("{WEB_IP}:80"))?, "p1");
    // The Services in netd's registry (from the API server in a real cluster).
    c.netd_apply(&registry_manifest(&dns, &p1))?;

    let n0 = c.node(0);
    let link = |n: &Node| -> Result<String> { Ok(n.ns().run(&["ip", "-o", "link", "show", "flannel.1"])?.split_whitespace().take(2).collect::<Vec<_>>().join(" ")) };
    let before_link = link(n0)?;
    let lease_key = fl[0].lease_key(c.etcd_prefix());
    assert_eq!(c.etcd().get(&lease_key)?.as_deref(), Some(fl[0].lease_value().as_str()));

    // Load across the switch: pod traffic from a node still on flannel to the switched node's
    // pod and back, 1,000 echo requests a second; DNS from the switched node's pod at 1,000
    // queries a second (dnsperf: a few long-lived sockets), and dig after dig (a new socket, a
    // new conntrack entry, each query).
    let dir = flannel::flannel_dir(n0);
    let ping = Load::start(&p1, &dir, "ping", &["ping", "-D", "-n", "-i", PING_INTERVAL, "-W", "1", &p0.ip.to_string()])?;
    let ping_back = Load::start(&p0b, &dir, "ping-back", &["ping", "-D", "-n", "-i", PING_INTERVAL, "-W", "1", &dns.ip.to_string()])?;
    std::fs::write(dir.join("queries"), format!("{NAME} A\n"))?;
    let queries = dir.join("queries").display().to_string();
    let dnsperf = Load::start(&p0, &dir, "dnsperf", &["dnsperf", "-s", DNS_IP, "-d", &queries, "-Q", "1000", "-l", "600", "-t", "2"])?;
    let digs = Load::start(
        &p0,
        &dir,
        "digs",
        &["sh", "-c", &format!("while :; do dig +short +time=2 +tries=1 @{DNS_IP} {NAME} | tr '\\n' ' '; echo; done")],
    )?;
    std::thread::sleep(Duration::from_secs(1));

    // The switch. flanneld and kube-proxy are gone from the node (their DaemonSets no longer
    // schedule there); what they programmed is still in the kernel, and carries the traffic
    // until netd has taken over.
    let host_local = host_local_data_dir(n0).join(flannel::FLANNEL_CNI_NETWORK);
    let host_local = host_local.to_str().context("path")?.to_string();
    let switch_started = unix_now();
    let args = ["--take-over", "flannel,kube-proxy", "--cni-bridge", "cni0", "--cni-host-local-dir", &host_local, "--proxy-mode", proxy_mode];
    c.node_mut(0).start_netd(&args)?;
    let n0 = c.node(0);
    wait_until(WAIT, POLL, || {
        let left = [iptables_chains(n0, "nat", &["KUBE-", "FLANNEL-"])?, iptables_chains(n0, "filter", &["KUBE-", "FLANNEL-"])?].concat();
        let routes = n0.ns().run(&["ip", "route", "show", "dev", "flannel.1"])?;
        Ok(left.is_empty() && routes.lines().count() == 2 && routes.lines().all(|l| l.contains("proto 110")))
    })
    .context("netd did not take over (kube-proxy's and flannel's chains removed, flannel's routes replaced)")?;
    wait_until(WAIT, POLL, || Ok(n0.netd_status(&[])?.0 == 0)).context("netd not healthy after the take-over")?;
    let switch_done = unix_now();
    // A new pod, through netd-cni on flannel's bridge: an address host-local did not hand out.
    let fresh = c.node_mut(0).add_cni_pod("fresh")?;
    std::thread::sleep(Duration::from_secs(2));
    let ping = ping_count(&ping.stop()?)?;
    let ping_back = ping_count(&ping_back.stop()?)?;
    let dnsperf_out = dnsperf.stop()?;
    let digs_out = digs.stop()?;

    let n0 = c.node(0);
    eprintln!("netd log:\n{}", n0.log().lines().filter(|l| ["take", "route", "fdb", "neigh", "VXLAN"].iter().any(|w| l.contains(w))).collect::<Vec<_>>().join("\n"));
    // Pods kept their addresses, the node its subnet, lease and VXLAN device (same index, same
    // MAC): peers still on flannel needed no change.
    assert_eq!(link(n0)?, before_link, "flannel.1 was kept as it was");
    assert_eq!(c.etcd().get(&lease_key)?.as_deref(), Some(fl[0].lease_value().as_str()), "the lease still says what flanneld wrote");
    assert_eq!(n0.subnet_env()?["FLANNEL_SUBNET"], "10.244.1.1/24");
    assert!(!n0.ns().run(&["ip", "link", "show"])?.contains("netd.1"), "no second VXLAN device");
    // flanneld's neighbour and FDB entries were already right: netd saw them as they are and
    // left them alone (the routes were its only change to the overlay).
    let log = n0.log();
    // Each predecessor's rules went only once netd's own were in.
    let at = |what: &str| log.find(what).with_context(|| format!("no {what:?} in netd's log"));
    assert!(at("programmed nftables table ip netd")? < at("removed flannel's iptables chains")?);
    assert!(at("service dataplane updated")? < at("removed kube-proxy's iptables chains")?);
    let rewrites: Vec<&str> = log.lines().filter(|l| [" fdb ", " neigh "].iter().any(|w| l.contains(w))).collect();
    assert!(rewrites.is_empty(), "netd rewrote flanneld's entries: {rewrites:#?}");
    // flannel's pods and the new one, both ways, across the overlay; the Services through netd.
    assert!(fresh.ip.to_string().starts_with("10.244.1.") && fresh.ip != p0.ip && fresh.ip != p0b.ip, "{} clashes with a flannel pod", fresh.ip);
    for (from, to) in [(&p1, p0.ip), (&p1, fresh.ip), (&fresh, p1.ip), (&p0, dns.ip)] {
        assert!(from.ping(to), "{} -> {to}", from.ip);
    }
    assert_eq!(ask(&p0, &format!("{WEB_IP}:80"))?, "p1");
    assert_eq!(ask(&fresh, &format!("{WEB_IP}:80"))?, "p1");
    assert_eq!(ask_ns(c.underlay(), &format!("{}:30080", n0.ip()))?, "p1", "NodePort from outside the cluster");
    if proxy_mode == "iptables" {
        assert!(!iptables_chains(n0, "nat", &["NETD-"])?.is_empty(), "netd's own chains stay");
    }
    assert_eq!(dig(&fresh)?, WEB_IP);

    // netd keeps `--take-over flannel` after the switch (its device is flannel.1): a restart
    // adopts everything as it is.
    c.node_mut(0).stop_netd()?;
    let log_before = c.node(0).log().len();
    c.node_mut(0).start_netd(&args)?;
    let n0 = c.node(0);
    wait_until(WAIT, POLL, || Ok(n0.netd_status(&[])?.0 == 0)).context("netd not healthy after a restart")?;
    assert_eq!(link(n0)?, before_link);
    assert_eq!(c.etcd().get(&lease_key)?.as_deref(), Some(fl[0].lease_value().as_str()));
    let restarted = &n0.log()[log_before..];
    let changes: Vec<&str> = restarted.lines().filter(|l| [" fdb ", " neigh ", " route "].iter().any(|w| l.contains(w))).collect();
    assert!(changes.is_empty(), "a restart changed the overlay: {changes:#?}");
    assert!(p1.ping(p0.ip) && p1.ping(fresh.ip));

    // The counts.
    let (dns_sent, dns_lost) = dnsperf_count(&dnsperf_out)?;
    let dig_lines: Vec<&str> = digs_out.lines().collect();
    // The last line may be a dig cut off by the SIGINT.
    let dig_answers = &dig_lines[..dig_lines.len().saturating_sub(1)];
    let dig_lost = dig_answers.iter().filter(|l| l.trim() != WEB_IP).count();
    eprintln!(
        "migration interruption ({proxy_mode}; switch took {:.2} s): pod traffic node1->node0 {} of {} echo requests lost, longest gap {} requests / {:.1} ms between replies; \
         node0->node2 {} of {} lost, longest gap {} / {:.1} ms; DNS dnsperf {dns_lost} of {dns_sent} queries lost; dig {dig_lost} of {} lost",
        switch_done - switch_started,
        ping.sent - ping.received,
        ping.sent,
        ping.longest_gap,
        ping.longest_gap_ms,
        ping_back.sent - ping_back.received,
        ping_back.sent,
        ping_back.longest_gap,
        ping_back.longest_gap_ms,
        dig_answers.len()
    );
    let fdb = n0.ns().run(&["bridge", "fdb", "show", "dev", "flannel.1"])?;
    assert_eq!(fdb.lines().filter(|l| l.contains(" dst ")).count(), 2, "one FDB entry per peer:\n{fdb}");
    // The loads ran across the whole switch (the machine is shared: how many requests went out
    // in that time is not asserted, only that there were replies on both sides of it).
    for p in [&ping, &ping_back] {
        assert!(p.first < switch_started && p.last > switch_done, "the load did not span the switch ({switch_started}..{switch_done}): {p:?}");
    }
    assert!(dns_sent > 0 && dig_answers.len() > 1, "DNS load: {dns_sent} {}", dig_answers.len());
    assert_eq!(dns_lost, 0, "DNS queries lost (dnsperf)");
    assert_eq!(dig_lost, 0, "DNS queries lost (dig): {:?}", dig_answers.iter().filter(|l| l.trim() != WEB_IP).take(5).collect::<Vec<_>>());
    // The last request may be cut off by the SIGINT.
    for p in [&ping, &ping_back] {
        assert!(p.sent - p.received < PINGS_PER_SECOND, "pod traffic lost for a second or more: {p:?}");
        assert!(p.longest_gap < PINGS_PER_SECOND, "{p:?}");
    }
    if proxy_mode == "nftables" {
        roll_back(&mut c, &fl, &ports, &p0, &p1, fresh)?;
    }
    Ok(())
}

/// The README's rollback, under the same load: the pod netd-cni made goes, netd stops, flanneld
/// and kube-proxy come back on the node (what they program at start), `netd cleanup` removes
/// netd's tables and files. Pods keep their addresses and stay reachable, no DNS query is lost,
/// and nothing of netd is left but the routes' and entries' new owner.
fn roll_back(c: &mut Cluster, fl: &[flannel::FlannelNode], ports: &[KubeServicePort], p0: &Pod, p1: &Pod, fresh: Pod) -> Result<()> {
    drop(fresh);
    let dir = flannel::flannel_dir(c.node(0));
    let ping = Load::start(p1, &dir, "ping-rollback", &["ping", "-D", "-n", "-i", PING_INTERVAL, "-W", "1", &p0.ip.to_string()])?;
    let digs = Load::start(p0, &dir, "digs-rollback", &["sh", "-c", &format!("while :; do dig +short +time=2 +tries=1 @{DNS_IP} {NAME} | tr '\\n' ' '; echo; done")])?;
    std::thread::sleep(Duration::from_secs(1));
    let started = unix_now();
    c.node_mut(0).stop_netd()?;
    let n0 = c.node(0);
    flannel::flanneld_programs(n0, &fl[0], fl)?;
    flannel::restore(n0, &kube_proxy_rules(ports, "10.244.0.0/16"))?;
    let bin = netd_tests::netd_binary()?;
    let (run, state, conf) = (n0.run_dir(), n0.state_dir(), n0.cni_conf_dir());
    let out = n0.ns().run(&[
        bin.to_str().context("path")?,
        "cleanup",
        "--run-dir",
        run.to_str().context("path")?,
        "--state-dir",
        state.to_str().context("path")?,
        "--cni-conf-dir",
        conf.to_str().context("path")?,
    ])?;
    let done = unix_now();
    std::thread::sleep(Duration::from_secs(2));
    let ping = ping_count(&ping.stop()?)?;
    let digs_out = digs.stop()?;
    let dig_lines: Vec<&str> = digs_out.lines().collect();
    let dig_answers = &dig_lines[..dig_lines.len().saturating_sub(1)];
    let dig_lost = dig_answers.iter().filter(|l| l.trim() != WEB_IP).count();
    eprintln!(
        "rollback interruption (took {:.2} s): pod traffic node1->node0 {} of {} echo requests lost, longest gap {} / {:.1} ms; DNS dig {dig_lost} of {} lost",
        done - started,
        ping.sent - ping.received,
        ping.sent,
        ping.longest_gap,
        ping.longest_gap_ms,
        dig_answers.len()
    );
    // flannel's and kube-proxy's state again, nothing of netd's.
    let routes = n0.ns().run(&["ip", "route", "show", "dev", "flannel.1"])?;
    assert!(routes.lines().count() == 2 && !routes.contains("proto 110"), "{routes}\n{out}");
    assert!(!iptables_chains(n0, "nat", &["KUBE-SVC-"])?.is_empty() && !iptables_chains(n0, "nat", &["FLANNEL-"])?.is_empty());
    let tables = n0.ns().run(&["nft", "list", "tables"])?;
    assert!(!tables.contains("netd"), "{tables}");
    assert!(p1.ping(p0.ip) && p0.ping(p1.ip));
    assert_eq!(dig(p0)?, WEB_IP);
    assert!(ping.first < started && ping.last > done, "the load did not span the rollback: {ping:?}");
    assert_eq!(dig_lost, 0, "DNS queries lost in the rollback");
    assert!(ping.sent - ping.received < PINGS_PER_SECOND && ping.longest_gap < PINGS_PER_SECOND, "{ping:?}");
    Ok(())
}

/// kube-proxy's chains stay for as long as netd has not programmed the Services itself: here its
/// service source (an API server) cannot be reached, so they must stay, and the cluster DNS keeps
/// answering through them, while the overlay is taken over from flannel all the same.
#[test]
fn kube_proxy_rules_stay_until_netd_has_programmed_the_services() -> Result<()> {
    let c = Cluster::new(2)?;
    let fl = flannel::install(&c)?;
    let p0 = add_flannel_pod(c.node(0), &fl[0], "p0")?;
    let dns = add_flannel_pod(c.node(1), &fl[1], "dns")?;
    let _knot = start_cluster_dns(c.node(1), &dns)?;
    for n in c.nodes() {
        flannel::restore(n, &kube_proxy_rules(&service_ports(&dns, &dns), "10.244.0.0/16"))?;
    }
    wait_until(WAIT, POLL, || Ok(dig(&p0)? == WEB_IP)).context("cluster DNS through kube-proxy's rules")?;
    let kube_chains = |n: &Node| -> Result<Vec<String>> { Ok([iptables_chains(n, "nat", &["KUBE-"])?, iptables_chains(n, "filter", &["KUBE-"])?].concat()) };
    let before = kube_chains(c.node(0))?;
    // An API server nobody listens on (the underlay gateway, port 1: refused at once).
    let kubeconfig = flannel::flannel_dir(c.node(0)).join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: x\n  cluster:\n    server: http://198.18.0.1:1\ncontexts:\n- name: x\n  context:\n    cluster: x\n    user: x\ncurrent-context: x\nusers:\n- name: x\n  user:\n    token: x\n",
    )?;
    let mut c = c;
    let kubeconfig = kubeconfig.to_str().context("path")?.to_string();
    c.node_mut(0).start_netd(&["--take-over", "flannel,kube-proxy", "--cni-bridge", "cni0", "--source", "kubernetes", "--kubeconfig", &kubeconfig])?;
    let n0 = c.node(0);
    wait_until(WAIT, POLL, || Ok(iptables_chains(n0, "nat", &["FLANNEL-"])?.is_empty() && n0.log().contains("node network ready")))?;
    // Several resyncs and retries of the service source later.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(kube_chains(n0)?, before, "kube-proxy's chains went before netd programmed any Service");
    assert_eq!(dig(&p0)?, WEB_IP);
    let (code, out) = n0.netd_status(&[])?;
    assert_ne!(code, 0, "not ready without its services: {out}");
    Ok(())
}
