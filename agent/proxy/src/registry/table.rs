//! `netd get` output: kubectl-like tables, or JSON/YAML lists.

use std::fmt::Write as _;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// `-o` formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// A table (the default).
    #[default]
    Table,
    /// A table with more columns.
    Wide,
    Json,
    Yaml,
}

/// kubectl's age format: 45s, 12m, 3h, 5d.
pub fn age(t: Option<&Time>, now_secs: i64) -> String {
    let Some(t) = t else { return "<unknown>".into() };
    let d = (now_secs - t.0.as_second()).max(0);
    match d {
        0..=119 => format!("{d}s"),
        120..=7199 => format!("{}m", d / 60),
        7200..=172_799 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86400),
    }
}

fn pad(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    let mut s = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, v)| if i + 1 == cols { v.clone() } else { format!("{v:<w$}", w = widths[i]) }).collect();
        let _ = writeln!(s, "{}", line.join("   ").trim_end());
    }
    s
}

/// `netd get services`.
pub fn services_table(items: &[Service], all_namespaces: bool, wide: bool, now_secs: i64) -> String {
    let mut rows = vec![];
    let mut head: Vec<String> = ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"].iter().map(|s| s.to_string()).collect();
    if all_namespaces {
        head.insert(0, "NAMESPACE".into());
    }
    if wide {
        head.push("SELECTOR".into());
    }
    rows.push(head);
    for s in items {
        let spec = s.spec.clone().unwrap_or_default();
        let typ = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
        let mut ext: Vec<String> = spec.external_ips.clone().unwrap_or_default();
        ext.extend(s.status.as_ref().and_then(|st| st.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref()).into_iter().flatten().filter_map(|i| i.ip.clone()));
        let ext = if ext.is_empty() {
            if typ == "LoadBalancer" { "<pending>".into() } else if typ == "ExternalName" { spec.external_name.clone().unwrap_or_default() } else { "<none>".into() }
        } else {
            ext.join(",")
        };
        let ports: Vec<String> = spec
            .ports
            .iter()
            .flatten()
            .map(|p| match p.node_port {
                Some(np) => format!("{}:{np}/{}", p.port, p.protocol.as_deref().unwrap_or("TCP")),
                None => format!("{}/{}", p.port, p.protocol.as_deref().unwrap_or("TCP")),
            })
            .collect();
        let mut row = vec![
            s.metadata.name.clone().unwrap_or_default(),
            typ,
            spec.cluster_ip.clone().filter(|c| !c.is_empty()).unwrap_or_else(|| "<none>".into()),
            ext,
            if ports.is_empty() { "<none>".into() } else { ports.join(",") },
            age(s.metadata.creation_timestamp.as_ref(), now_secs),
        ];
        if all_namespaces {
            row.insert(0, s.metadata.namespace.clone().unwrap_or_default());
        }
        if wide {
            let sel = spec.selector.unwrap_or_default().iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
            row.push(if sel.is_empty() { "<none>".into() } else { sel });
        }
        rows.push(row);
    }
    pad(&rows)
}

/// `netd get endpoints`: one row per EndpointSlice (wide: with address type and ports).
pub fn endpoints_table(items: &[EndpointSlice], all_namespaces: bool, wide: bool, now_secs: i64) -> String {
    let mut head: Vec<String> = ["NAME", "SERVICE", "ENDPOINTS", "AGE"].iter().map(|s| s.to_string()).collect();
    if all_namespaces {
        head.insert(0, "NAMESPACE".into());
    }
    if wide {
        head.insert(head.len() - 1, "ADDRESSTYPE".into());
        head.insert(head.len() - 1, "PORTS".into());
    }
    let mut rows = vec![head];
    for s in items {
        let ports: Vec<i32> = s.ports.iter().flatten().filter_map(|p| p.port).collect();
        let mut eps: Vec<String> = Vec::new();
        for e in &s.endpoints {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            for a in e.addresses.iter().take(1) {
                let mark = if ready { "" } else { " (not ready)" };
                if ports.is_empty() {
                    eps.push(format!("{a}{mark}"));
                } else {
                    eps.extend(ports.iter().map(|p| format!("{a}:{p}{mark}")));
                }
            }
        }
        let shown = if eps.is_empty() {
            "<none>".to_string()
        } else if eps.len() > 3 && !wide {
            format!("{} + {} more...", eps[..3].join(","), eps.len() - 3)
        } else {
            eps.join(",")
        };
        let svc = s.metadata.labels.as_ref().and_then(|l| l.get(crate::snapshot::SERVICE_NAME_LABEL)).cloned().unwrap_or_else(|| "<none>".into());
        let mut row = vec![s.metadata.name.clone().unwrap_or_default(), svc, shown, age(s.metadata.creation_timestamp.as_ref(), now_secs)];
        if all_namespaces {
            row.insert(0, s.metadata.namespace.clone().unwrap_or_default());
        }
        if wide {
            row.insert(row.len() - 1, s.address_type.clone());
            row.insert(row.len() - 1, ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(","));
        }
        rows.push(row);
    }
    pad(&rows)
}

/// An object as JSON, with apiVersion and kind filled in (the stored objects omit them).
fn typed<T: serde::Serialize>(item: &T, api_version: &str, kind: &str) -> serde_json::Value {
    let mut v = serde_json::to_value(item).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("apiVersion".into(), api_version.into());
        o.insert("kind".into(), kind.into());
    }
    v
}

fn render(v: &serde_json::Value, yaml: bool) -> String {
    if yaml {
        serde_yaml::to_string(v).unwrap_or_default()
    } else {
        serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
    }
}

/// A `kind: List` of objects, as JSON or YAML.
pub fn list<T: serde::Serialize>(items: &[T], api_version: &str, kind: &str, yaml: bool) -> String {
    let items: Vec<serde_json::Value> = items.iter().map(|i| typed(i, api_version, kind)).collect();
    render(&serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}), yaml)
}

/// One object, as JSON or YAML (`get svc NAME -o yaml`, as kubectl prints it).
pub fn object<T: serde::Serialize>(item: &T, api_version: &str, kind: &str, yaml: bool) -> String {
    render(&typed(item, api_version, kind), yaml)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::{feature_snapshot, web_snapshot};

    #[test]
    fn golden_tables() {
        let snap = feature_snapshot();
        let svcs: Vec<Service> = snap.services().values().map(|s| (**s).clone()).collect();
        let slices: Vec<EndpointSlice> = snap.all_slices().map(|(_, s)| (**s).clone()).collect();
        let mut out = services_table(&svcs, true, false, 0);
        out.push_str(&endpoints_table(&slices, true, true, 0));
        crate::golden::check("get.txt", &out);
        let web: Vec<Service> = web_snapshot().services().values().map(|s| (**s).clone()).collect();
        let y = list(&web, "v1", "Service", true);
        assert!(y.contains("kind: List") && y.contains("kind: Service") && y.contains("clusterIP: 10.96.0.10"), "{y}");
        let one = object(&web[0], "v1", "Service", true);
        assert!(one.starts_with("apiVersion: v1\n") && one.contains("\nkind: Service\n") && !one.contains("List"), "{one}");
        let j: serde_json::Value = serde_json::from_str(&object(&web[0], "v1", "Service", false)).unwrap();
        assert_eq!((j["kind"].as_str(), j["metadata"]["name"].as_str()), (Some("Service"), web[0].metadata.name.as_deref()));
    }
}
