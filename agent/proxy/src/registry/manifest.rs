//! `netd apply -f`: Kubernetes manifests (YAML or JSON, several documents, `kind: List`) →
//! validated Services and EndpointSlices. Pure: nothing here talks to etcd.
//!
//! Validation covers the fields netd uses, with the API server's rules and its wording
//! (`spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive`); every
//! error names the document (1-based), the object and the field path.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

use crate::snapshot::SERVICE_NAME_LABEL;

/// Label on EndpointSlices converted from v1 Endpoints.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const CONVERTER: &str = "netd-endpoints-converter";

/// A validated object, ready to store.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    /// The slices one v1 Endpoints object became (`<name>`, `<name>-1`, ...), and its name.
    Endpoints { namespace: String, name: String, slices: Vec<EndpointSlice> },
}

impl Object {
    pub fn describe(&self) -> String {
        match self {
            Object::Service(s) => format!("service/{}", s.metadata.name.as_deref().unwrap_or("")),
            Object::EndpointSlice(s) => format!("endpointslice/{}", s.metadata.name.as_deref().unwrap_or("")),
            Object::Endpoints { name, .. } => format!("endpoints/{name}"),
        }
    }
}

/// One problem with one field of one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// 1-based document number in the input.
    pub document: usize,
    /// `Service default/web`, or what is known of it.
    pub object: String,
    /// `spec.ports[0].port`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {} ({}): {}: {}", self.document, self.object, self.field, self.message)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ApplyError {
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.errors.iter().map(|e| e.to_string()).collect();
        write!(f, "{}", lines.join("\n"))
    }
}

struct Ctx {
    document: usize,
    object: String,
    errors: Vec<FieldError>,
}

impl Ctx {
    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError { document: self.document, object: self.object.clone(), field: field.into(), message: message.into() });
    }
    fn invalid(&mut self, field: impl Into<String>, value: impl fmt::Display, why: &str) {
        self.err(field, format!("Invalid value: {value}: {why}"));
    }
    fn required(&mut self, field: impl Into<String>) {
        self.err(field, "Required value");
    }
    fn unsupported(&mut self, field: impl Into<String>, value: &str, allowed: &[&str]) {
        let list: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
        self.err(field, format!("Unsupported value: \"{value}\": supported values: {}", list.join(", ")));
    }
}

/// Parses and validates every document of `text`. All errors of all documents are reported
/// together; nothing is returned unless every document is valid.
pub fn apply_manifests(text: &str) -> Result<Vec<Object>, ApplyError> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        match serde_yaml::Value::deserialize(de) {
            Ok(serde_yaml::Value::Null) => {}
            Ok(v) => docs.push((i + 1, v)),
            Err(e) => errors.push(FieldError { document: i + 1, object: "?".into(), field: "<document>".into(), message: format!("not valid YAML/JSON: {e}") }),
        }
    }
    for (doc, v) in docs {
        let json = match serde_json::to_value(&v) {
            Ok(j) => j,
            Err(e) => {
                errors.push(FieldError { document: doc, object: "?".into(), field: "<document>".into(), message: e.to_string() });
                continue;
            }
        };
        let items: Vec<serde_json::Value> = if json.get("kind").and_then(|k| k.as_str()) == Some("List") {
            json.get("items").and_then(|i| i.as_array()).cloned().unwrap_or_default()
        } else {
            vec![json]
        };
        for item in items {
            let mut ctx = Ctx { document: doc, object: describe(&item), errors: Vec::new() };
            if let Some(o) = object(&mut ctx, item) {
                out.push(o);
            }
            errors.extend(ctx.errors);
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ApplyError { errors })
    }
}

fn describe(v: &serde_json::Value) -> String {
    let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("<no kind>");
    let meta = v.get("metadata");
    let ns = meta.and_then(|m| m.get("namespace")).and_then(|n| n.as_str()).unwrap_or("default");
    let name = meta.and_then(|m| m.get("name")).and_then(|n| n.as_str()).unwrap_or("<no name>");
    format!("{kind} {ns}/{name}")
}

fn object(ctx: &mut Ctx, v: serde_json::Value) -> Option<Object> {
    let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_string();
    let api = v.get("apiVersion").and_then(|k| k.as_str()).unwrap_or_default().to_string();
    let expect = match kind.as_str() {
        "Service" | "Endpoints" => "v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
        "" => {
            ctx.required("kind");
            return None;
        }
        other => {
            ctx.unsupported("kind", other, &["Service", "EndpointSlice", "Endpoints"]);
            return None;
        }
    };
    if api != expect {
        ctx.invalid("apiVersion", format!("\"{api}\""), &format!("{kind} must be {expect}"));
        return None;
    }
    let parsed = match kind.as_str() {
        "Service" => serde_json::from_value::<Service>(v).map(|s| validate_service(ctx, s).map(Object::Service)),
        "EndpointSlice" => serde_json::from_value::<EndpointSlice>(v).map(|s| validate_slice(ctx, s).map(Object::EndpointSlice)),
        _ => serde_json::from_value::<Endpoints>(v).map(|e| convert_endpoints(ctx, e)),
    };
    match parsed {
        Ok(o) => o,
        Err(e) => {
            ctx.err("<document>", format!("does not match the {kind} schema: {e}"));
            None
        }
    }
}

fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// IANA_SVC_NAME: at most 15 characters, lowercase alphanumerics and '-', at least one letter.
fn is_iana_svc_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn meta(ctx: &mut Ctx, m: &mut ObjectMeta, name_ok: fn(&str) -> bool, rule: &str) {
    match m.name.as_deref() {
        None | Some("") => ctx.required("metadata.name"),
        Some(n) if !name_ok(n) => ctx.invalid("metadata.name", format!("\"{n}\""), rule),
        _ => {}
    }
    match m.namespace.as_deref() {
        None | Some("") => m.namespace = Some("default".into()),
        Some(n) if !is_dns1123_label(n) => ctx.invalid("metadata.namespace", format!("\"{n}\""), DNS1123_LABEL),
        _ => {}
    }
}

const DNS1123_LABEL: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character";
const DNS1035_LABEL: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character";
const DNS1123_SUBDOMAIN: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character";

fn usable_ip(ctx: &mut Ctx, field: &str, s: &str) -> Option<Ipv4Addr> {
    match s.parse::<Ipv4Addr>() {
        Err(_) if s.parse::<std::net::Ipv6Addr>().is_ok() => {
            ctx.invalid(field, format!("\"{s}\""), "netd supports IPv4 only");
            None
        }
        Err(_) => {
            ctx.invalid(field, format!("\"{s}\""), "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)");
            None
        }
        Ok(ip) if ip.is_unspecified() || ip.is_loopback() || ip.is_link_local() || ip.is_multicast() => {
            ctx.invalid(field, format!("\"{s}\""), "may not be unspecified, loopback, link-local or multicast");
            None
        }
        Ok(ip) => Some(ip),
    }
}

/// Validates and defaults a Service the way the API server does for the fields netd uses.
fn validate_service(ctx: &mut Ctx, mut s: Service) -> Option<Service> {
    let before = ctx.errors.len();
    meta(ctx, &mut s.metadata, is_dns1035_label, DNS1035_LABEL);
    let Some(spec) = s.spec.as_mut() else {
        ctx.required("spec");
        return None;
    };
    let typ = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
    if !["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"].contains(&typ.as_str()) {
        ctx.unsupported("spec.type", &typ, &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"]);
    }
    spec.type_ = Some(typ.clone());
    let headless = spec.cluster_ip.as_deref() == Some("None");
    match spec.cluster_ip.as_deref() {
        None | Some("") | Some("None") => {}
        Some(ip) => {
            usable_ip(ctx, "spec.clusterIP", ip);
        }
    }
    if headless && (typ == "NodePort" || typ == "LoadBalancer") {
        ctx.invalid("spec.clusterIP", "\"None\"", &format!("may not be set to 'None' for {typ} services"));
    }
    if typ == "ExternalName" {
        if spec.external_name.as_deref().unwrap_or("").is_empty() {
            ctx.required("spec.externalName");
        }
    } else if spec.ports.as_ref().is_none_or(|p| p.is_empty()) && !headless {
        ctx.required("spec.ports");
    }
    let ports = spec.ports.get_or_insert_with(Vec::new);
    let multi = ports.len() > 1;
    let mut names = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for (i, p) in ports.iter_mut().enumerate() {
        let f = |x: &str| format!("spec.ports[{i}].{x}");
        let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
        if !["TCP", "UDP", "SCTP"].contains(&proto.as_str()) {
            ctx.unsupported(f("protocol"), &proto, &["SCTP", "TCP", "UDP"]);
        }
        p.protocol = Some(proto.clone());
        match p.name.as_deref() {
            None | Some("") if multi => ctx.required(f("name")),
            None | Some("") => {}
            Some(n) if !is_dns1123_label(n) => ctx.invalid(f("name"), format!("\"{n}\""), DNS1123_LABEL),
            Some(n) => {
                if !names.insert(n.to_string()) {
                    ctx.err(f("name"), format!("Duplicate value: \"{n}\""));
                }
            }
        }
        if !(1..=65535).contains(&p.port) {
            ctx.invalid(f("port"), p.port, "must be between 1 and 65535, inclusive");
        }
        if !seen.insert((p.port, proto.clone())) {
            ctx.err(f("port"), format!("Duplicate value: {{\"port\":{},\"protocol\":\"{proto}\"}}", p.port));
        }
        match &p.target_port {
            None => p.target_port = Some(IntOrString::Int(p.port)),
            Some(IntOrString::Int(t)) if !(1..=65535).contains(t) => ctx.invalid(f("targetPort"), t, "must be between 1 and 65535, inclusive"),
            Some(IntOrString::String(t)) if !is_iana_svc_name(t) => {
                ctx.invalid(f("targetPort"), format!("\"{t}\""), "must contain at most 15 characters, only lowercase alphanumerics and '-', and at least one letter")
            }
            _ => {}
        }
        if let Some(np) = p.node_port {
            if typ != "NodePort" && typ != "LoadBalancer" {
                ctx.err(f("nodePort"), "Forbidden: may not be used when `type` is 'ClusterIP'");
            } else if !(1..=65535).contains(&np) {
                ctx.invalid(f("nodePort"), np, "must be between 1 and 65535, inclusive");
            }
        }
    }
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        usable_ip(ctx, &format!("spec.externalIPs[{i}]"), ip);
    }
    let affinity = spec.session_affinity.clone().unwrap_or_else(|| "None".into());
    if !["None", "ClientIP"].contains(&affinity.as_str()) {
        ctx.unsupported("spec.sessionAffinity", &affinity, &["ClientIP", "None"]);
    }
    spec.session_affinity = Some(affinity.clone());
    if affinity == "ClientIP" {
        let t = spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref()).and_then(|c| c.timeout_seconds);
        if let Some(t) = t {
            if !(1..=86400).contains(&t) {
                ctx.invalid("spec.sessionAffinityConfig.clientIP.timeoutSeconds", t, "must be greater than 0 and less than 86400");
            }
        }
    } else if spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref()).is_some() {
        ctx.invalid("spec.sessionAffinityConfig", "{...}", "must not be set when session affinity is None");
    }
    let external = typ == "NodePort" || typ == "LoadBalancer" || spec.external_ips.as_ref().is_some_and(|e| !e.is_empty());
    match spec.external_traffic_policy.as_deref() {
        None | Some("") => {
            if external {
                spec.external_traffic_policy = Some("Cluster".into());
            }
        }
        Some(p) if !external => ctx.invalid("spec.externalTrafficPolicy", format!("\"{p}\""), "may only be set for externally-accessible services"),
        Some("Cluster") | Some("Local") => {}
        Some(p) => ctx.unsupported("spec.externalTrafficPolicy", p, &["Cluster", "Local"]),
    }
    if let Some(h) = spec.health_check_node_port {
        if typ != "LoadBalancer" || spec.external_traffic_policy.as_deref() != Some("Local") {
            ctx.invalid("spec.healthCheckNodePort", h, "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'");
        } else if !(1..=65535).contains(&h) {
            ctx.invalid("spec.healthCheckNodePort", h, "must be between 1 and 65535, inclusive");
        }
    }
    match spec.internal_traffic_policy.as_deref() {
        None | Some("") => spec.internal_traffic_policy = Some("Cluster".into()),
        Some("Cluster") | Some("Local") => {}
        Some(p) => ctx.unsupported("spec.internalTrafficPolicy", p, &["Cluster", "Local"]),
    }
    if let Some(st) = s.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref()) {
        for (i, ing) in st.iter().enumerate() {
            if let Some(ip) = &ing.ip {
                usable_ip(ctx, &format!("status.loadBalancer.ingress[{i}].ip"), ip);
            }
        }
    }
    (ctx.errors.len() == before).then_some(s)
}

fn validate_slice(ctx: &mut Ctx, mut s: EndpointSlice) -> Option<EndpointSlice> {
    let before = ctx.errors.len();
    meta(ctx, &mut s.metadata, is_dns1123_subdomain, DNS1123_SUBDOMAIN);
    match s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) {
        None => ctx.err(format!("metadata.labels[{SERVICE_NAME_LABEL}]"), "Required value: netd files an EndpointSlice under the Service this label names"),
        Some(n) if !is_dns1035_label(n) => ctx.invalid(format!("metadata.labels[{SERVICE_NAME_LABEL}]"), format!("\"{n}\""), DNS1035_LABEL),
        _ => {}
    }
    if !["IPv4", "IPv6", "FQDN"].contains(&s.address_type.as_str()) {
        ctx.unsupported("addressType", &s.address_type, &["FQDN", "IPv4", "IPv6"]);
    }
    if s.endpoints.len() > 1000 {
        ctx.err("endpoints", format!("Too many: {}: must have at most 1000 items", s.endpoints.len()));
    }
    for (i, e) in s.endpoints.iter().enumerate() {
        if e.addresses.is_empty() || e.addresses.len() > 100 {
            ctx.invalid(format!("endpoints[{i}].addresses"), e.addresses.len(), "must contain at least 1 and at most 100 addresses");
        }
        if s.address_type == "IPv4" {
            for (j, a) in e.addresses.iter().enumerate() {
                if a.parse::<Ipv4Addr>().is_err() {
                    ctx.invalid(format!("endpoints[{i}].addresses[{j}]"), format!("\"{a}\""), "must be a valid IPv4 address");
                }
            }
        }
    }
    let mut names = BTreeSet::new();
    for (i, p) in s.ports.iter_mut().flatten().enumerate() {
        let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
        if !["TCP", "UDP", "SCTP"].contains(&proto.as_str()) {
            ctx.unsupported(format!("ports[{i}].protocol"), &proto, &["SCTP", "TCP", "UDP"]);
        }
        p.protocol = Some(proto);
        let name = p.name.clone().unwrap_or_default();
        if !name.is_empty() && !is_dns1123_label(&name) {
            ctx.invalid(format!("ports[{i}].name"), format!("\"{name}\""), DNS1123_LABEL);
        }
        if !names.insert(name.clone()) {
            ctx.err(format!("ports[{i}].name"), format!("Duplicate value: \"{name}\""));
        }
        if let Some(port) = p.port {
            if !(0..=65535).contains(&port) {
                ctx.invalid(format!("ports[{i}].port"), port, "must be between 0 and 65535, inclusive");
            }
        }
    }
    (ctx.errors.len() == before).then_some(s)
}

/// v1 Endpoints → EndpointSlices, one per subset: `<name>`, `<name>-1`, ...
fn convert_endpoints(ctx: &mut Ctx, mut e: Endpoints) -> Option<Object> {
    let before = ctx.errors.len();
    meta(ctx, &mut e.metadata, is_dns1035_label, DNS1035_LABEL);
    let name = e.metadata.name.clone().unwrap_or_default();
    let namespace = e.metadata.namespace.clone().unwrap_or_default();
    let mut slices = Vec::new();
    for (i, subset) in e.subsets.iter().flatten().enumerate() {
        let mut endpoints = Vec::new();
        for (list, ready, field) in [(&subset.addresses, true, "addresses"), (&subset.not_ready_addresses, false, "notReadyAddresses")] {
            for (j, a) in list.iter().flatten().enumerate() {
                if a.ip.parse::<Ipv4Addr>().is_err() {
                    ctx.invalid(format!("subsets[{i}].{field}[{j}].ip"), format!("\"{}\"", a.ip), "must be a valid IPv4 address");
                }
                endpoints.push(Endpoint {
                    addresses: vec![a.ip.clone()],
                    conditions: Some(EndpointConditions { ready: Some(ready), serving: Some(ready), terminating: Some(false) }),
                    hostname: a.hostname.clone(),
                    node_name: a.node_name.clone(),
                    target_ref: a.target_ref.clone(),
                    ..Default::default()
                });
            }
        }
        let mut ports = Vec::new();
        for (j, p) in subset.ports.iter().flatten().enumerate() {
            if !(1..=65535).contains(&p.port) {
                ctx.invalid(format!("subsets[{i}].ports[{j}].port"), p.port, "must be between 1 and 65535, inclusive");
            }
            ports.push(EndpointPort { name: p.name.clone(), port: Some(p.port), protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".into())), app_protocol: p.app_protocol.clone() });
        }
        let slice_name = if i == 0 { name.clone() } else { format!("{name}-{i}") };
        let labels = BTreeMap::from([(SERVICE_NAME_LABEL.to_string(), name.clone()), (MANAGED_BY_LABEL.to_string(), CONVERTER.to_string())]);
        slices.push(EndpointSlice {
            metadata: ObjectMeta { name: Some(slice_name), namespace: Some(namespace.clone()), labels: Some(labels), ..Default::default() },
            address_type: "IPv4".into(),
            endpoints,
            ports: Some(ports),
        });
    }
    (ctx.errors.len() == before).then_some(Object::Endpoints { namespace, name, slices })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_with_defaults() {
        let objs = apply_manifests(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.5]}]
---
{"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "legacy", "namespace": "prod"},
 "subsets": [{"addresses": [{"ip": "10.244.2.2"}], "notReadyAddresses": [{"ip": "10.244.2.3"}], "ports": [{"port": 80}]}]}
"#,
        )
        .unwrap();
        assert_eq!(objs.len(), 3);
        let Object::Service(s) = &objs[0] else { panic!() };
        let spec = s.spec.as_ref().unwrap();
        assert_eq!(s.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.ports.as_ref().unwrap()[0].protocol.as_deref(), Some("TCP"));
        assert_eq!(spec.ports.as_ref().unwrap()[0].target_port, Some(IntOrString::Int(80)));
        let Object::Endpoints { slices, .. } = &objs[2] else { panic!() };
        assert_eq!(slices[0].metadata.name.as_deref(), Some("legacy"));
        assert_eq!(slices[0].endpoints.len(), 2);
        assert_eq!(slices[0].endpoints[1].conditions.as_ref().unwrap().ready, Some(false));
    }

    #[test]
    fn errors_name_document_object_and_field() {
        let err = apply_manifests(
            r#"
apiVersion: v1
kind: Service
metadata: {name: ok}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: Bad_Name, namespace: prod}
spec:
  type: NodePort
  sessionAffinity: Sticky
  ports:
  - {name: http, port: 0}
  - {port: 81, protocol: ICMP}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: x}
"#,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("document 2 (Service prod/Bad_Name): metadata.name: Invalid value: \"Bad_Name\""), "{text}");
        assert!(text.contains("document 2 (Service prod/Bad_Name): spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive"), "{text}");
        assert!(text.contains("spec.ports[1].name: Required value"), "{text}");
        assert!(text.contains("spec.ports[1].protocol: Unsupported value: \"ICMP\""), "{text}");
        assert!(text.contains("spec.sessionAffinity: Unsupported value: \"Sticky\""), "{text}");
        assert!(text.contains("document 3 (ConfigMap default/x): kind: Unsupported value"), "{text}");
        assert!(!text.contains("document 1"), "{text}");
    }

    #[test]
    fn traffic_policies_and_slices_are_checked() {
        let err = apply_manifests(
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"},
                "spec": {"externalTrafficPolicy": "Local", "clusterIP": "::1", "ports": [{"port": 80}]}}
---
{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "s"}, "addressType": "IPv4",
 "endpoints": [{"addresses": ["10.0.0.300"]}]}"#,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("spec.externalTrafficPolicy: Invalid value: \"Local\": may only be set for externally-accessible services"), "{text}");
        assert!(text.contains("spec.clusterIP: Invalid value: \"::1\": netd supports IPv4 only"), "{text}");
        assert!(text.contains("document 2 (EndpointSlice default/s): metadata.labels[kubernetes.io/service-name]: Required value"), "{text}");
        assert!(text.contains("endpoints[0].addresses[0]: Invalid value: \"10.0.0.300\""), "{text}");
    }
}
