//! A service registry far bigger than one gRPC message (4 MiB): 20,000 Services, each with an
//! EndpointSlice, written straight into etcd. A restarted node programs and resolves all of them,
//! `netd get services` lists them, and after an etcd restart the node lists the registry again
//! and follows it (issue: "More than 4 MiB of registry and a node serves nothing").

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use netd_tests::{netd_binary, wait_until, Cluster, Node, Pod};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(200);
const SERVICES: usize = 20_000;
const PREFIX: &str = "/netd/registry";
/// gRPC's default limit on a received message, which one unpaged list of this registry exceeds.
const GRPC_LIMIT: usize = 4 << 20;
/// The services the test connects to: one from the middle, the last, and one added later.
const ANSWERING: [usize; 3] = [SERVICES / 2, SERVICES - 1, SERVICES];

fn ns_of(i: usize) -> String {
    format!("team-{:02}", i % 20)
}

fn name_of(i: usize) -> String {
    format!("svc-{i:05}")
}

fn ip_of(i: usize) -> String {
    format!("10.100.{}.{}", i / 250, 1 + i % 250)
}

/// Service `i` and its EndpointSlice as `netd apply` stores them (with labels, two ports, and
/// three endpoints of which only the first is ready), plus the ClusterIP's allocation key. The
/// ready endpoint is `pod_ip` for the services the test talks to, an address of its own for the
/// others (each service its own pods, as usual).
fn objects(i: usize, pod_ip: &str) -> [(String, String); 3] {
    let ready = if ANSWERING.contains(&i) { pod_ip.to_string() } else { format!("10.244.{}.{}", 128 + i / 250, 1 + i % 250) };
    let (ns, name, ip) = (ns_of(i), name_of(i), ip_of(i));
    // Written out rather than with `serde_json::json!`, which is slow in a debug build.
    let svc = format!(
        r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"{ns}","uid":"{i:032x}","creationTimestamp":"2025-01-01T00:00:00Z","labels":{{"app":"{name}","tier":"backend","app.kubernetes.io/part-of":"shop"}}}},"spec":{{"type":"ClusterIP","clusterIP":"{ip}","clusterIPs":["{ip}"],"selector":{{"app":"{name}"}},"sessionAffinity":"None","ports":[{{"name":"http","protocol":"TCP","port":80,"targetPort":8080}},{{"name":"metrics","protocol":"TCP","port":9090,"targetPort":9090}}]}}}}"#
    );
    let endpoint = |addr: &str, ready: bool, k: usize| {
        format!(
            r#"{{"addresses":["{addr}"],"conditions":{{"ready":{ready},"serving":{ready},"terminating":{}}},"nodeName":"node0","targetRef":{{"kind":"Pod","namespace":"{ns}","name":"{name}-7d9f8-{k}"}}}}"#,
            !ready
        )
    };
    let endpoints = [
        endpoint(&ready, true, 0),
        endpoint(&format!("10.244.250.{}", 1 + i % 250), false, 1),
        endpoint(&format!("10.244.251.{}", 1 + i % 250), false, 2),
    ]
    .join(",");
    let slice = format!(
        r#"{{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{{"name":"{name}-x7k2p","namespace":"{ns}","creationTimestamp":"2025-01-01T00:00:00Z","labels":{{"kubernetes.io/service-name":"{name}","endpointslice.kubernetes.io/managed-by":"endpointslice-controller.k8s.io"}}}},"addressType":"IPv4","ports":[{{"name":"http","protocol":"TCP","port":8080}},{{"name":"metrics","protocol":"TCP","port":9090}}],"endpoints":[{endpoints}]}}"#
    );
    [
        (format!("{PREFIX}/services/{ns}/{name}"), svc),
        (format!("{PREFIX}/endpointslices/{ns}/{name}-x7k2p"), slice),
        (format!("{PREFIX}/allocations/clusterips/{ip}"), format!("{ns}/{name}")),
    ]
}

#[test]
fn objects_are_valid_json() {
    for part in objects(7, "10.244.1.2") {
        if !part.0.contains("/allocations/") {
            serde_json::from_str::<serde_json::Value>(&part.1).with_context(|| part.1.clone()).unwrap();
        }
    }
}

fn ask(pod: &Pod, addr: &str) -> Result<String> {
    let out = pod.exec(&["socat", "-T", "3", "-", &format!("TCP:{addr},connect-timeout=3")])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn dig(pod: &Pod, name: &str) -> Result<String> {
    let out = pod.exec(&["dig", "+time=2", "+tries=1", "+short", "@10.96.0.10", name])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `netd status --json` on the node.
fn status(n: &Node) -> Result<serde_json::Value> {
    let bin = netd_binary()?;
    let out = n.ns().exec(&[bin.to_str().unwrap(), "status", "--json", "--run-dir", n.run_dir().to_str().unwrap()])?;
    serde_json::from_slice(&out.stdout).with_context(|| format!("netd status --json: {}", String::from_utf8_lossy(&out.stderr)))
}

/// netd's log without its debug lines (the failure dump shows only the last lines, and with a
/// registry this size those are all debug).
fn log_summary(n: &Node) -> String {
    n.log().lines().filter(|l| !l.contains("DEBUG")).collect::<Vec<_>>().join("\n")
}

/// Services programmed (`netd status` counts service ports: two per service here) and services
/// in the DNS zone.
fn counts(n: &Node) -> Result<(u64, u64)> {
    let s = status(n)?;
    Ok((s["status"]["services"]["services"].as_u64().unwrap_or(0) / 2, s["status"]["dns"]["services"].as_u64().unwrap_or(0)))
}

#[test]
fn twenty_thousand_services() -> Result<()> {
    let started = Instant::now();
    let mut c = Cluster::new(1)?;
    c.write_network_config(VXLAN)?;
    let args = ["--cluster-dns-ip", "10.96.0.10", "--dns-upstream", "198.18.0.1:53"];
    c.node_mut(0).start_netd(&args)?;
    c.node_mut(0).wait_subnet_env(WAIT)?;
    let n = c.node(0);
    wait_until(WAIT, POLL, || Ok(n.cni_conf_dir().join("10-netd.conflist").exists()))?;
    let a = c.node_mut(0).add_cni_pod("a")?;
    let b = c.node_mut(0).add_cni_pod("b")?;
    let _server = b.spawn(&["socat", "TCP-LISTEN:8080,fork,reuseaddr", "SYSTEM:echo b"], None)?;

    // The node restarts while the registry is written (pods keep their network meanwhile).
    c.node_mut(0).stop_netd()?;
    let pod_ip = b.ip.to_string();
    eprintln!("node and pods ready after {:?}", started.elapsed());
    let kvs: Vec<(String, String)> = (0..SERVICES).flat_map(|i| objects(i, &pod_ip)).collect();
    let bytes: usize = kvs.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert!(bytes > 4 * GRPC_LIMIT, "the registry ({bytes} bytes) must be well over one gRPC message");
    eprintln!("objects made after {:?}", started.elapsed());
    c.etcd().put_all(&kvs)?;
    eprintln!("registry of {SERVICES} services, {bytes} bytes, written after {:?}", started.elapsed());

    // (a) The restarted node programs every service and serves them all in DNS.
    c.node_mut(0).start_netd(&args)?;
    let n = c.node(0);
    let want = SERVICES as u64;
    let r = wait_until(WAIT, POLL, || Ok(counts(n)? == (want, want)));
    assert!(r.is_ok(), "services and DNS should have all {SERVICES} services: {}\n{}", serde_json::to_string_pretty(&status(n)?)?, log_summary(n));
    eprintln!("all programmed after {:?}", started.elapsed());
    for i in ANSWERING[..2].iter().copied() {
        wait_until(WAIT, POLL, || Ok(ask(&a, &format!("{}:80", ip_of(i)))? == "b"))?;
    }
    let last = format!("{}.{}.svc.cluster.local", name_of(SERVICES - 1), ns_of(SERVICES - 1));
    assert_eq!(dig(&a, &last)?, ip_of(SERVICES - 1));
    assert_eq!(status(n)?["health"], "healthy", "{}", serde_json::to_string_pretty(&status(n)?)?);

    eprintln!("answered after {:?}", started.elapsed());
    // (b) `netd get services -A` lists them all (one header line).
    let bin = netd_binary()?;
    let get = c.underlay().run(&[bin.to_str().unwrap(), "get", "services", "-A", "--etcd-endpoints", &c.etcd().endpoint()])?;
    assert_eq!(get.lines().count(), SERVICES + 1, "{}", get.lines().take(3).collect::<Vec<_>>().join("\n"));
    assert!(get.lines().any(|l| l.starts_with("team-19") && l.contains(&name_of(SERVICES - 1))));

    eprintln!("listed by netd get after {:?}", started.elapsed());
    // (c) etcd restarts. Meanwhile the node keeps serving what it has and says it cannot list
    // the registry; afterwards it lists it again and follows new changes.
    c.etcd_mut().stop()?;
    let n = c.node(0);
    let registry_down = |v: &serde_json::Value| {
        v["reasons"].as_array().is_some_and(|r| r.iter().any(|r| r.as_str().is_some_and(|r| r.starts_with("service registry /netd/registry/ (etcd http://198.18.0.1:2379) cannot be followed: etcd "))))
    };
    let r = wait_until(WAIT, POLL, || Ok(registry_down(&status(n)?)));
    assert!(r.is_ok(), "status should say the registry cannot be followed: {}", serde_json::to_string_pretty(&status(n)?)?);
    assert_eq!(dig(&a, &last)?, ip_of(SERVICES - 1), "DNS keeps the last state while etcd is away");
    assert_eq!(ask(&a, &format!("{}:80", ip_of(SERVICES - 1)))?, "b", "so does the proxy");
    c.etcd_mut().start()?;
    let added = SERVICES;
    c.etcd().put_all(&objects(added, &pod_ip))?;
    let n = c.node(0);
    let r = wait_until(WAIT, POLL, || Ok(counts(n)? == (want + 1, want + 1)));
    assert!(r.is_ok(), "the node should follow the registry after etcd's restart: {}\n{}", serde_json::to_string_pretty(&status(n)?)?, log_summary(n));
    wait_until(WAIT, POLL, || Ok(ask(&a, &format!("{}:80", ip_of(added)))? == "b"))?;
    assert_eq!(dig(&a, &format!("{}.{}.svc.cluster.local", name_of(added), ns_of(added)))?, ip_of(added));
    wait_until(WAIT, POLL, || Ok(status(n)?["health"] == "healthy"))?;
    eprintln!("done after {:?}", started.elapsed());
    Ok(())
}
