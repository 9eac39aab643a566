//! `netd apply` of many Services (+ one EndpointSlice each) into a real etcd (bench/registry),
//! run as root:
//!
//!     cargo run --release -p netd-proxy --example apply_bench [-- --services 10000]
//!
//! etcd runs in a test-bed namespace (`netd-tests`, removed at the end). Every 10th Service is
//! a NodePort (the default range has 2,768 ports); the others are ClusterIP. Prints the
//! seconds for parsing + validating the manifest and for writing it (what `netd apply -f`
//! spends), then the seconds for re-applying the same file (everything unchanged), and checks
//! the counts: every Service stored with a ClusterIP of its own.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use netd_proxy::registry::{apply_manifests, AllocOptions, RegistryOptions, ServiceRegistry};
use netd_tests::Cluster;

fn manifest(services: usize) -> String {
    let mut s = String::new();
    for i in 0..services {
        let typ = if i % 10 == 0 { "NodePort" } else { "ClusterIP" };
        let (a, b) = ((i / 250) % 250, i % 250 + 1);
        let _ = writeln!(
            s,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec:\n  type: {typ}\n  selector: {{app: svc-{i}}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-abcde, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n- addresses: [10.244.{a}.{b}]\n- addresses: [10.245.{a}.{b}]"
        );
    }
    s
}

fn main() -> Result<()> {
    let mut services = 10_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--services" => services = args.next().context("--services N")?.parse()?,
            other => anyhow::bail!("unknown argument {other} (usage: apply_bench [--services N])"),
        }
    }
    println!("load average at start: {}", std::fs::read_to_string("/proc/loadavg")?.trim());
    let cluster = Cluster::new(0)?;
    let text = manifest(services);
    let opts = RegistryOptions::new(vec![cluster.etcd().endpoint()]);
    let underlay = format!("/run/netns/{}", cluster.underlay().name());
    // The client runs on a thread inside the underlay namespace, where etcd listens.
    let (parse, apply, reapply) = std::thread::spawn(move || -> Result<_> {
        let f = std::fs::File::open(&underlay)?;
        // SAFETY: setns(2) on a descriptor we own; only this thread moves.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        ensure!(r == 0, "setns {underlay}: {}", std::io::Error::last_os_error());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let reg = ServiceRegistry::connect(&opts).await?;
            let t = Instant::now();
            let objects = apply_manifests(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
            let parse = t.elapsed();
            let t = Instant::now();
            let applied = reg.apply(objects.clone(), &AllocOptions::default()).await?;
            let apply = t.elapsed();
            ensure!(applied.len() == 2 * services, "{} results", applied.len());
            let t = Instant::now();
            reg.apply(objects, &AllocOptions::default()).await?;
            let reapply = t.elapsed();
            Ok((parse, apply, reapply))
        })
    })
    .join()
    .expect("bench thread panicked")?;
    let count = |prefix: &str| -> Result<usize> {
        Ok(cluster.etcd().ctl(&["get", prefix, "--prefix", "--keys-only"])?.lines().filter(|l| !l.is_empty()).count())
    };
    let (count, ips) = (count("/netd/registry/services/")?, count("/netd/registry/allocations/clusterips/")?);
    println!("services: {services} (+ {services} EndpointSlices), stored Services: {count}, allocated ClusterIPs: {ips}");
    println!("parse + validate: {:.2} s", parse.as_secs_f64());
    println!("netd apply (write): {:.2} s", apply.as_secs_f64());
    println!("netd apply again (unchanged): {:.2} s", reapply.as_secs_f64());
    println!("load average at end: {}", std::fs::read_to_string("/proc/loadavg")?.trim());
    ensure!(count == services && ips == services, "not every Service was stored with its own ClusterIP");
    Ok(())
}
