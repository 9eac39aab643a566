//! Reading `deploy/kubernetes/netd.yaml` the way a kubelet runs it: a DaemonSet's pod spec turned
//! into `podman run` arguments (command, args, env and envFrom from the ConfigMaps, volume
//! mounts, capabilities or privileged, host network), its probes and its update strategy.
//! What a kubelet does that podman cannot is done by the caller: ConfigMap volumes are written
//! out as files, hostPath directories are created (DirectoryOrCreate/FileOrCreate), probes polled.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The objects of a multi-document manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub docs: Vec<Value>,
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut docs = Vec::new();
        for d in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(d).with_context(|| format!("parsing {}", path.display()))?;
            if !v.is_null() {
                docs.push(v);
            }
        }
        Ok(Manifest { docs })
    }

    /// The first object of `kind` (and `name`, if given).
    pub fn find(&self, kind: &str, name: Option<&str>) -> Option<&Value> {
        self.docs.iter().find(|d| d["kind"] == kind && name.is_none_or(|n| d["metadata"]["name"] == n))
    }

    pub fn daemonset(&self) -> Result<&Value> {
        self.find("DaemonSet", None).context("the manifest has no DaemonSet")
    }
}

/// A volume mount resolved against the pod's volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub volume: String,
    pub mount_path: String,
    pub read_only: bool,
    pub source: VolumeSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    /// hostPath: the node's path and its `type` ("" when unset).
    HostPath { path: String, kind: String },
    /// A ConfigMap's data, as files.
    ConfigMap { name: String },
}

/// An httpGet probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub path: String,
    pub port: u16,
    pub period_seconds: u64,
    pub failure_threshold: u32,
}

/// One container of the pod, as the kubelet would run it.
#[derive(Debug, Clone, Default)]
pub struct Container {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    pub privileged: bool,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub readiness: Option<Probe>,
    pub liveness: Option<Probe>,
    pub startup: Option<Probe>,
}

/// The DaemonSet's pod for one node.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub init: Vec<Container>,
    pub containers: Vec<Container>,
    pub host_network: bool,
    pub dns_policy: String,
    pub grace_seconds: u64,
    /// `updateStrategy.rollingUpdate.maxSurge` (0 when absent: the old pod stops first).
    pub max_surge: String,
    pub max_unavailable: String,
    pub update_type: String,
}

/// What the kubelet knows of the node (fieldRef values).
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub name: String,
    pub ip: String,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
}

fn int_or_string(v: &Value, default: &str) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        _ => default.to_string(),
    }
}

impl PodSpec {
    pub fn from_manifest(m: &Manifest, node: &NodeFacts) -> Result<PodSpec> {
        let ds = m.daemonset()?;
        let spec = &ds["spec"]["template"]["spec"];
        let parse = |list: &Value| -> Result<Vec<Container>> {
            list.as_array().into_iter().flatten().map(|c| container(m, spec, c, node)).collect()
        };
        let strategy = &ds["spec"]["updateStrategy"];
        Ok(PodSpec {
            init: parse(&spec["initContainers"])?,
            containers: parse(&spec["containers"])?,
            host_network: spec["hostNetwork"].as_bool().unwrap_or(false),
            dns_policy: spec["dnsPolicy"].as_str().unwrap_or("ClusterFirst").to_string(),
            grace_seconds: spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30),
            max_surge: int_or_string(&strategy["rollingUpdate"]["maxSurge"], "0"),
            max_unavailable: int_or_string(&strategy["rollingUpdate"]["maxUnavailable"], "1"),
            update_type: strategy["type"].as_str().unwrap_or("RollingUpdate").to_string(),
        })
    }

    /// Whether a rollout starts the new pod before the old one stops (maxSurge > 0).
    pub fn surges(&self) -> bool {
        !matches!(self.max_surge.as_str(), "0" | "0%" | "")
    }

    /// Every volume mount of every container (what `netd cleanup`, run by an operator with the
    /// DaemonSet's volumes, sees), each mount path once.
    pub fn all_mounts(&self) -> Vec<Mount> {
        let mut out: Vec<Mount> = Vec::new();
        for c in self.init.iter().chain(&self.containers) {
            for m in &c.mounts {
                if !out.iter().any(|o| o.mount_path == m.mount_path) {
                    out.push(m.clone());
                }
            }
        }
        out
    }
}

fn probe(c: &Value, which: &str) -> Result<Option<Probe>> {
    let p = &c[which];
    if p.is_null() {
        return Ok(None);
    }
    let get = &p["httpGet"];
    if get.is_null() {
        bail!("{which} of {} is not an httpGet probe (the test polls only those)", c["name"]);
    }
    let port = match &get["port"] {
        Value::Number(n) => n.as_u64().context("probe port")? as u16,
        Value::String(name) => c["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64())
            .with_context(|| format!("{which}: no container port named {name}"))? as u16,
        other => bail!("{which}: port {other}"),
    };
    Ok(Some(Probe {
        path: get["path"].as_str().unwrap_or("/").to_string(),
        port,
        period_seconds: p["periodSeconds"].as_u64().unwrap_or(10),
        failure_threshold: p["failureThreshold"].as_u64().unwrap_or(3) as u32,
    }))
}

fn container(m: &Manifest, spec: &Value, c: &Value, node: &NodeFacts) -> Result<Container> {
    let name = c["name"].as_str().unwrap_or_default().to_string();
    let mut env = Vec::new();
    for from in c["envFrom"].as_array().into_iter().flatten() {
        if let Some(cm) = from["configMapRef"]["name"].as_str() {
            let data = &m.find("ConfigMap", Some(cm)).with_context(|| format!("{name}: envFrom ConfigMap {cm} is not in the manifest"))?["data"];
            let prefix = from["prefix"].as_str().unwrap_or_default();
            for (k, v) in data.as_object().into_iter().flatten() {
                env.push((format!("{prefix}{k}"), v.as_str().unwrap_or_default().to_string()));
            }
        } else {
            bail!("{name}: envFrom {from} (only configMapRef is understood)");
        }
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let k = e["name"].as_str().context("env without a name")?.to_string();
        let v = if let Some(v) = e["value"].as_str() {
            v.to_string()
        } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match path {
                "spec.nodeName" => node.name.clone(),
                // hostNetwork: the pod's IP is the node's.
                "status.hostIP" | "status.podIP" => node.ip.clone(),
                "metadata.namespace" => "kube-system".into(),
                "metadata.name" => format!("netd-{}", node.name),
                other => bail!("{name}: env {k} from fieldRef {other} (not known to the test)"),
            }
        } else if let Some(cm) = e["valueFrom"]["configMapKeyRef"].as_object() {
            let (cm_name, key) = (cm["name"].as_str().unwrap_or_default(), cm["key"].as_str().unwrap_or_default());
            m.find("ConfigMap", Some(cm_name)).and_then(|c| c["data"][key].as_str()).with_context(|| format!("{name}: env {k} from ConfigMap {cm_name} key {key}"))?.to_string()
        } else {
            bail!("{name}: env {k}: {e} (only value, fieldRef and configMapKeyRef are understood)");
        };
        // A later `env` entry overrides envFrom, as in Kubernetes.
        env.retain(|(ek, _)| *ek != k);
        env.push((k, v));
    }
    let mut mounts = Vec::new();
    for vm in c["volumeMounts"].as_array().into_iter().flatten() {
        let vol_name = vm["name"].as_str().context("volumeMount without a name")?;
        let vol = spec["volumes"].as_array().into_iter().flatten().find(|v| v["name"] == vol_name).with_context(|| format!("{name}: volume {vol_name} is not defined"))?;
        let source = if let Some(p) = vol["hostPath"]["path"].as_str() {
            VolumeSource::HostPath { path: p.to_string(), kind: vol["hostPath"]["type"].as_str().unwrap_or_default().to_string() }
        } else if let Some(cm) = vol["configMap"]["name"].as_str() {
            VolumeSource::ConfigMap { name: cm.to_string() }
        } else {
            bail!("{name}: volume {vol_name}: {vol} (only hostPath and configMap are understood)");
        };
        mounts.push(Mount {
            volume: vol_name.to_string(),
            mount_path: vm["mountPath"].as_str().context("mountPath")?.to_string(),
            read_only: vm["readOnly"].as_bool().unwrap_or(false),
            source,
        });
    }
    let sc = &c["securityContext"];
    Ok(Container {
        image: c["image"].as_str().unwrap_or_default().to_string(),
        command: strings(&c["command"]),
        args: strings(&c["args"]),
        env,
        mounts,
        privileged: sc["privileged"].as_bool().unwrap_or(false),
        cap_add: strings(&sc["capabilities"]["add"]),
        cap_drop: strings(&sc["capabilities"]["drop"]),
        readiness: probe(c, "readinessProbe")?,
        liveness: probe(c, "livenessProbe")?,
        startup: probe(c, "startupProbe")?,
        name,
    })
}

/// `podman run` arguments for a container of the pod (before the image), given where each
/// ConfigMap's files were written and the extra environment the test adds.
pub fn podman_args(c: &Container, pod: &PodSpec, configmaps: &dyn Fn(&str) -> PathBuf, extra_env: &[(String, String)], dns: &str) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    if pod.host_network {
        a.extend(["--network".into(), "host".into()]);
    }
    // dnsPolicy Default: the node's resolv.conf; the test's nodes resolve through `dns`.
    a.extend(["--dns".into(), dns.into()]);
    if c.privileged {
        a.push("--privileged".into());
    }
    for cap in &c.cap_add {
        a.extend(["--cap-add".into(), cap.clone()]);
    }
    for cap in &c.cap_drop {
        a.extend(["--cap-drop".into(), cap.clone()]);
    }
    for (k, v) in c.env.iter().chain(extra_env) {
        a.extend(["--env".into(), format!("{k}={v}")]);
    }
    for m in &c.mounts {
        let src = match &m.source {
            VolumeSource::HostPath { path, .. } => path.clone(),
            VolumeSource::ConfigMap { name } => configmaps(name).display().to_string(),
        };
        let ro = m.read_only || matches!(m.source, VolumeSource::ConfigMap { .. });
        a.extend(["--volume".into(), format!("{src}:{}{}", m.mount_path, if ro { ":ro" } else { "" })]);
    }
    if let Some((first, rest)) = c.command.split_first() {
        // Kubernetes' command replaces the image's ENTRYPOINT and drops its CMD.
        a.extend(["--entrypoint".into(), serde_json::to_string(&[first]).unwrap_or_default()]);
        a.push("--".into());
        a.push(c.image.clone());
        a.extend(rest.iter().cloned());
        a.extend(c.args.iter().cloned());
    } else {
        a.push(c.image.clone());
        a.extend(c.args.iter().cloned());
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    const DS: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg}
data: {NETD_A: "1", NETD_B: "2"}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: netd}
spec:
  updateStrategy: {type: RollingUpdate, rollingUpdate: {maxUnavailable: 0, maxSurge: 1}}
  template:
    spec:
      hostNetwork: true
      initContainers:
        - name: init
          image: netd:0.1.0
          command: ["/bin/sh", "-c", "cp a b"]
          volumeMounts: [{name: bin, mountPath: /host/bin}]
      containers:
        - name: netd
          image: netd:0.1.0
          command: ["/usr/local/bin/netd"]
          args: ["run"]
          envFrom: [{configMapRef: {name: cfg}}]
          env:
            - {name: NETD_B, value: "3"}
            - {name: NETD_NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
          securityContext: {capabilities: {add: [NET_ADMIN, NET_RAW]}}
          ports: [{name: health, containerPort: 10256}]
          readinessProbe: {httpGet: {path: /healthz, port: health}, periodSeconds: 5}
          volumeMounts: [{name: run, mountPath: /run/netd}, {name: conf, mountPath: /etc/netd, readOnly: true}]
      volumes:
        - {name: run, hostPath: {path: /run/netd, type: DirectoryOrCreate}}
        - {name: bin, hostPath: {path: /opt/cni/bin}}
        - {name: conf, configMap: {name: cfg}}
"#;

    #[test]
    fn a_daemonset_becomes_podman_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ds.yaml");
        std::fs::write(&path, DS).unwrap();
        let m = Manifest::read(&path).unwrap();
        let pod = PodSpec::from_manifest(&m, &NodeFacts { name: "node1".into(), ip: "198.18.0.11".into() }).unwrap();
        assert!(pod.surges() && pod.host_network);
        let c = &pod.containers[0];
        assert_eq!(c.env, [("NETD_A".into(), "1".into()), ("NETD_B".into(), "3".into()), ("NETD_NODE_NAME".into(), "node1".into())]);
        assert_eq!(c.readiness.as_ref().unwrap().port, 10256);
        let args = podman_args(c, &pod, &|cm| PathBuf::from(format!("/cm/{cm}")), &[], "198.18.0.1");
        let joined = args.join(" ");
        assert!(joined.starts_with("--network host --dns 198.18.0.1 --cap-add NET_ADMIN --cap-add NET_RAW"), "{joined}");
        assert!(joined.contains("--volume /run/netd:/run/netd --volume /cm/cfg:/etc/netd:ro"), "{joined}");
        assert!(joined.ends_with(r#"--entrypoint ["/usr/local/bin/netd"] -- netd:0.1.0 run"#), "{joined}");
        assert_eq!(pod.all_mounts().len(), 3);
    }
}
