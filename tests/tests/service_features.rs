//! Every Service feature of the kube-proxy dataplane, end to end, on each backend: external
//! IPs and load-balancer IPs reached from the underlay, session affinity, externalTrafficPolicy
//! Local (client IP kept, other nodes drop, the healthCheckNodePort answers 200/503),
//! internalTrafficPolicy Local, terminating endpoints as a fallback only, hairpin, UDP services
//! and the flush of stale UDP conntrack entries. Manifests go through `netd apply` into the etcd
//! registry; clients are socat and curl in pod namespaces and in the underlay namespace, which
//! plays the part of the world outside the cluster (198.18.0.1).
//!
//! SCTP is not exercised end to end: this VM's kernel has no SCTP module. The renderers'
//! golden tests cover its rules.

use std::time::Duration;

use anyhow::{Context, Result};
use netd_tests::ebpf::{netd_ebpf_probe, netd_ebpf_tc_probe, EbpfSandbox};
use netd_tests::{netd_binary, wait_until, Cluster, Netns, Pod};
use serde_json::{json, Value};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);
/// The underlay namespace's address: the "outside" client.
const OUTSIDE: &str = "198.18.0.1";

/// The cluster, and for `--proxy-mode ebpf` the per-node cgroups the socket load balancers are
/// attached to (clients in pods run inside their node's cgroup; never the host's root cgroup).
struct Bed {
    c: Cluster,
    sandbox: Option<EbpfSandbox>,
}

/// Who sends: the outside world (the underlay namespace) or a pod on node `usize`.
#[derive(Clone, Copy)]
enum From<'a> {
    Outside,
    Pod(&'a Pod, usize),
}

impl Bed {
    /// A shell command as `from`.
    fn sh(&self, from: From<'_>, script: &str) -> Result<std::process::Output> {
        match (from, &self.sandbox) {
            (From::Outside, _) => self.c.underlay().exec(&["sh", "-c", script]),
            (From::Pod(pod, node), Some(sb)) => {
                // Into the node's cgroup first (with the host's /sys), then into the pod.
                let wrapped = format!(
                    "echo $$ > {}/cgroup.procs && exec ip netns exec {} sh -c '{}'",
                    sb.node_cgroup(node).display(),
                    pod.ns.name(),
                    script.replace('\'', "'\\''")
                );
                Ok(std::process::Command::new("sh").args(["-c", &wrapped]).stdin(std::process::Stdio::null()).output()?)
            }
            (From::Pod(pod, _), None) => pod.ns.exec(&["sh", "-c", script]),
        }
    }
}

fn cluster(n: usize, mode: &str) -> Result<Bed> {
    let mut c = Cluster::new(n)?;
    c.write_network_config(VXLAN)?;
    let sandbox = if mode == "ebpf" { Some(EbpfSandbox::new_for_nodes(n)?) } else { None };
    for i in 0..n {
        let mut args = vec!["--proxy-mode".to_string(), mode.to_string()];
        if let Some(sb) = &sandbox {
            args.extend(["--ebpf-cgroup".into(), sb.node_cgroup(i).display().to_string(), "--ebpf-bpffs".into(), sb.node_pins(i).display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        c.node_mut(i).start_netd(&args)?;
    }
    for i in 0..n {
        c.node_mut(i).wait_subnet_env(WAIT)?;
        let n = c.node(i);
        wait_until(WAIT, POLL, || Ok(n.cni_conf_dir().join("10-netd.conflist").exists()))?;
    }
    Ok(Bed { c, sandbox })
}

/// `netd apply -f -` on the underlay, with JSON documents.
fn apply(c: &Cluster, docs: &[Value]) -> Result<()> {
    let manifest: Vec<String> = docs.iter().map(|d| d.to_string()).collect();
    let bin = netd_binary()?;
    let mut cmd = c.underlay().command(&[bin.to_str().unwrap(), "apply", "-f", "-", "--etcd-endpoints", &c.etcd().endpoint()]);
    cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    use std::io::Write;
    child.stdin.take().context("stdin")?.write_all(manifest.join("\n---\n").as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "netd apply failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// A Service with one port `proto` `port` → 8080 (TCP) or 5353 (UDP); `spec` is merged in.
fn service(name: &str, ip: &str, proto: &str, port: u16, spec: Value, status: Value) -> Value {
    let target = if proto == "UDP" { 5353 } else { 8080 };
    let mut s = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "selector": {"app": name},
                 "ports": [{"name": "p", "protocol": proto, "port": port, "targetPort": target}]},
        "status": status,
    });
    for (k, v) in spec.as_object().cloned().unwrap_or_default() {
        s["spec"][k] = v;
    }
    s
}

/// An endpoint of a slice: the pod, its node, and its (ready, serving, terminating) conditions.
struct Ep<'a>(&'a Pod, &'a str, (bool, bool, bool));

fn ready<'a>(pod: &'a Pod, node: &'a str) -> Ep<'a> {
    Ep(pod, node, (true, true, false))
}

fn slice(name: &str, proto: &str, eps: &[Ep]) -> Value {
    let port = if proto == "UDP" { 5353 } else { 8080 };
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|Ep(pod, node, (r, s, t))| {
            json!({"addresses": [pod.ip.to_string()], "nodeName": node,
                   "conditions": {"ready": r, "serving": s, "terminating": t}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "protocol": proto, "port": port}],
        "endpoints": endpoints,
    })
}

/// TCP 8080 answering "<name> <client address as the pod sees it>", and UDP 5353 answering
/// "<name>" to every datagram.
fn serve(pod: &Pod, name: &str) -> Result<Vec<std::process::Child>> {
    Ok(vec![
        pod.spawn(&["socat", "TCP-LISTEN:8080,fork,reuseaddr", &format!("SYSTEM:echo {name} $SOCAT_PEERADDR")], None)?,
        pod.spawn(&["socat", "UDP-RECVFROM:5353,fork,reuseaddr", &format!("SYSTEM:echo {name}")], None)?,
    ])
}

/// One TCP exchange: the answer, or "ERROR …".
fn ask(bed: &Bed, from: From<'_>, addr: &str) -> Result<String> {
    let out = bed.sh(from, &format!("socat -T 3 - TCP:{addr},connect-timeout=2"))?;
    Ok(if out.status.success() {
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    } else {
        format!("ERROR {}", String::from_utf8_lossy(&out.stderr).trim())
    })
}

/// The name of the pod that answered (first word), or "ERROR …".
fn who(bed: &Bed, from: From<'_>, addr: &str) -> Result<String> {
    let a = ask(bed, from, addr)?;
    Ok(if a.starts_with("ERROR") { a } else { a.split_whitespace().next().unwrap_or_default().to_string() })
}

/// One UDP datagram from a fixed source port, so that every call is the same conntrack flow.
fn ask_udp(bed: &Bed, from: From<'_>, addr: &str, sport: u16) -> Result<String> {
    let out = bed.sh(from, &format!("echo q | socat -T 1 -t 1 - UDP:{addr},sourceport={sport},reuseaddr 2>&1 || true"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The answers of `n` connections.
fn answers(bed: &Bed, from: From<'_>, addr: &str, n: usize) -> Result<std::collections::BTreeSet<String>> {
    (0..n).map(|_| who(bed, from, addr)).collect()
}

fn http_status(ns: &Netns, url: &str) -> Result<(String, String)> {
    let out = ns.exec(&["curl", "-s", "-m", "3", "-w", "\n%{http_code}", url])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    Ok((code.to_string(), body.to_string()))
}

fn features(mode: &str) -> Result<()> {
    let mut bed = cluster(3, mode)?;
    let (n0, n1, n2) = (bed.c.node(0).ip(), bed.c.node(1).ip(), bed.c.node(2).ip());
    let (name1, name2) = (bed.c.node(1).name(), bed.c.node(2).name());
    let a = bed.c.node_mut(0).add_cni_pod("a")?;
    let b = bed.c.node_mut(1).add_cni_pod("b")?;
    let e = bed.c.node_mut(1).add_cni_pod("e")?;
    let d = bed.c.node_mut(2).add_cni_pod("d")?;
    let bed = bed;
    let c = &bed.c;
    let (out, pa, pb, pe) = (From::Outside, From::Pod(&a, 0), From::Pod(&b, 1), From::Pod(&e, 1));
    let _servers: Vec<_> = [serve(&b, "b")?, serve(&d, "d")?, serve(&e, "e")?].into_iter().flatten().collect();
    // The outside world reaches external and load-balancer IPs through a node, as a router
    // or a cloud load balancer would send them.
    c.underlay().ip(&["route", "add", "198.18.0.200/32", "via", &n0.to_string()])?;
    c.underlay().ip(&["route", "add", "198.18.0.201/32", "via", &n2.to_string()])?;

    let none = json!({});
    apply(
        c,
        &[
            // An external IP and a load-balancer ingress IP, backends on another node.
            service("ext", "10.96.1.1", "TCP", 80, json!({"externalIPs": ["198.18.0.200"]}), none.clone()),
            slice("ext", "TCP", &[ready(&b, &name1)]),
            service("lb", "10.96.1.2", "TCP", 80, json!({"type": "LoadBalancer"}), json!({"loadBalancer": {"ingress": [{"ip": "198.18.0.201"}]}})),
            slice("lb", "TCP", &[ready(&b, &name1)]),
            // Two endpoints with and without ClientIP affinity.
            service("sticky", "10.96.1.3", "TCP", 80, json!({"sessionAffinity": "ClientIP"}), none.clone()),
            slice("sticky", "TCP", &[ready(&b, &name1), ready(&d, &name2)]),
            service("spread", "10.96.1.4", "TCP", 80, none.clone(), none.clone()),
            slice("spread", "TCP", &[ready(&b, &name1), ready(&d, &name2)]),
            // externalTrafficPolicy Local (a LoadBalancer without an ingress IP yet): only node1 has an endpoint.
            service("local", "10.96.1.5", "TCP", 80,
                json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 31090,
                       "ports": [{"name": "p", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30090}]}), none.clone()),
            slice("local", "TCP", &[ready(&b, &name1)]),
            // externalTrafficPolicy Cluster for contrast: the client address is masqueraded.
            service("cluster", "10.96.1.6", "TCP", 80,
                json!({"type": "NodePort", "ports": [{"name": "p", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30091}]}), none.clone()),
            slice("cluster", "TCP", &[ready(&b, &name1)]),
            // internalTrafficPolicy Local: endpoints on node1 and node2, none on node0.
            service("itp", "10.96.1.7", "TCP", 80, json!({"internalTrafficPolicy": "Local"}), none.clone()),
            slice("itp", "TCP", &[ready(&b, &name1), ready(&d, &name2)]),
            // Only a terminating (still serving) endpoint: used as the fallback.
            service("term", "10.96.1.8", "TCP", 80, none.clone(), none.clone()),
            slice("term", "TCP", &[Ep(&b, &name1, (false, true, true)), Ep(&d, &name2, (false, false, true))]),
            // Hairpin: b's only service endpoint is b itself.
            service("hairpin", "10.96.1.9", "TCP", 80, none.clone(), none.clone()),
            slice("hairpin", "TCP", &[ready(&b, &name1)]),
            // A UDP service.
            service("dnsish", "10.96.1.10", "UDP", 53, none.clone(), none.clone()),
            slice("dnsish", "UDP", &[ready(&b, &name1)]),
        ],
    )?;

    // External IP, from outside, through node0 (the backend is on node1).
    wait_until(WAIT, POLL, || Ok(who(&bed, out, "198.18.0.200:80")? == "b"))?;
    // Load-balancer ingress IP, from outside, through node2.
    wait_until(WAIT, POLL, || Ok(who(&bed, out, "198.18.0.201:80")? == "b"))?;
    // ...and the cluster IPs of both from a pod.
    wait_until(WAIT, POLL, || Ok(who(&bed, pa, "10.96.1.2:80")? == "b"))?;

    // Affinity: every connection from one client lands on the same endpoint; without it, both
    // endpoints answer (the chance of 24 connections all on one of two endpoints is 2^-23).
    wait_until(WAIT, POLL, || Ok(who(&bed, pa, "10.96.1.3:80")?.len() == 1))?;
    let sticky = answers(&bed, pa, "10.96.1.3:80", 12)?;
    assert_eq!(sticky.len(), 1, "ClientIP affinity: one client reached {sticky:?}");
    let spread = answers(&bed, pa, "10.96.1.4:80", 24)?;
    assert_eq!(spread, ["b".to_string(), "d".to_string()].into(), "no affinity: both endpoints answer");

    // externalTrafficPolicy Local: node1 serves and keeps the client's address...
    wait_until(WAIT, POLL, || Ok(ask(&bed, out, &format!("{n1}:30090"))? == format!("b {OUTSIDE}")))?;
    // ...node0 has no local endpoint: the connection is dropped, not sent elsewhere.
    let dropped = ask(&bed, out, &format!("{n0}:30090"))?;
    assert!(dropped.starts_with("ERROR"), "ETP Local on a node without endpoints answered: {dropped}");
    // The healthCheckNodePort tells a load balancer which nodes to use.
    wait_until(WAIT, POLL, || Ok(http_status(c.underlay(), &format!("http://{n1}:31090/healthz"))?.0 == "200"))?;
    let (code, body) = http_status(c.underlay(), &format!("http://{n1}:31090/healthz"))?;
    assert!(code == "200" && body.contains("\"localEndpoints\":1"), "{code} {body}");
    wait_until(WAIT, POLL, || Ok(http_status(c.underlay(), &format!("http://{n0}:31090/healthz"))?.0 == "503"))?;
    // externalTrafficPolicy Cluster through a node without the backend: masqueraded, so the
    // reply comes back the same way.
    wait_until(WAIT, POLL, || Ok(who(&bed, out, &format!("{n0}:30091"))? == "b"))?;
    let seen = ask(&bed, out, &format!("{n0}:30091"))?;
    assert!(seen.starts_with("b ") && !seen.ends_with(OUTSIDE), "ETP Cluster via another node must be masqueraded: {seen}");

    // internalTrafficPolicy Local: a client on node1 gets node1's endpoint, always...
    wait_until(WAIT, POLL, || Ok(who(&bed, pe, "10.96.1.7:80")? == "b"))?;
    assert_eq!(answers(&bed, pe, "10.96.1.7:80", 8)?, ["b".to_string()].into());
    // ...and node0, without a local endpoint, drops it.
    let itp = who(&bed, pa, "10.96.1.7:80")?;
    assert!(itp.starts_with("ERROR"), "ITP Local without a local endpoint answered: {itp}");

    // Terminating endpoints: the serving one is used while nothing is ready...
    wait_until(WAIT, POLL, || Ok(who(&bed, pa, "10.96.1.8:80")? == "b"))?;
    assert_eq!(answers(&bed, pa, "10.96.1.8:80", 6)?, ["b".to_string()].into(), "the non-serving one is never used");
    // ...and never once a ready one exists.
    apply(c, &[slice("term", "TCP", &[Ep(&b, &name1, (false, true, true)), ready(&d, &name2)])])?;
    wait_until(WAIT, POLL, || Ok(who(&bed, pa, "10.96.1.8:80")? == "d"))?;
    assert_eq!(answers(&bed, pa, "10.96.1.8:80", 8)?, ["d".to_string()].into());

    // Hairpin: b reaches itself through its service.
    wait_until(WAIT, POLL, || Ok(who(&bed, pb, "10.96.1.9:80")? == "b"))?;

    // UDP, and the stale conntrack flush: the same client flow (fixed source port) keeps
    // sending while the endpoint moves from b to d. Without the flush the flow's conntrack
    // entry would keep it on b for as long as it keeps sending.
    wait_until(WAIT, POLL, || Ok(ask_udp(&bed, pa, "10.96.1.10:53", 41000)? == "b"))?;
    apply(c, &[slice("dnsish", "UDP", &[ready(&d, &name2)])])?;
    wait_until(WAIT, POLL, || Ok(ask_udp(&bed, pa, "10.96.1.10:53", 41000)? == "d"))?;
    Ok(())
}

#[test]
fn service_features_with_nftables() -> Result<()> {
    features("nftables")
}

#[test]
fn service_features_with_iptables() -> Result<()> {
    features("iptables")
}

/// The same suite on `--proxy-mode ebpf`: the socket load balancer for clients in pods (run in
/// their node's cgroup), the tc programs for traffic from outside.
#[test]
fn service_features_with_ebpf() -> Result<()> {
    if let Err(why) = netd_ebpf_probe().and_then(|()| netd_ebpf_tc_probe()) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    features("ebpf")
}
