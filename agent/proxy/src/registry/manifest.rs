//! `netd apply -f`: Kubernetes manifests (YAML or JSON, several documents, `kind: List`) →
//! validated Services and EndpointSlices. Pure: nothing here talks to etcd.
//!
//! Validation covers the fields netd uses, with the API server's rules and its wording
//! (`spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive`); every
//! error names the document (1-based), the object and the field path.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Endpoints, Service, ServiceSpec};
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
    let (items, mut errors) = items(text);
    let mut out = Vec::new();
    for (doc, item) in items {
        let mut ctx = Ctx { document: doc, object: describe(&item), errors: Vec::new() };
        if let Some(o) = object(&mut ctx, item) {
            out.push(o);
        }
        errors.extend(ctx.errors);
    }
    finish(out, errors)
}

/// Which object a manifest names (what `netd delete -f` needs: kind, namespace and name only,
/// as `kubectl delete -f` reads no more of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

/// The kinds netd stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    /// v1 Endpoints, stored as the EndpointSlices converted from it.
    Endpoints,
}

impl ObjectRef {
    fn kind_word(&self) -> &'static str {
        match self.kind {
            Kind::Service => "service",
            Kind::EndpointSlice => "endpointslice",
            Kind::Endpoints => "endpoints",
        }
    }

    /// `service "web" in namespace "shop"` (what was not found).
    pub fn not_found(&self) -> String {
        format!("{} \"{}\" in namespace \"{}\"", self.kind_word(), self.name, self.namespace)
    }

    /// `service "web"`, as kubectl names an object it deleted.
    pub fn quoted(&self) -> String {
        format!("{} \"{}\"", self.kind_word(), self.name)
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind_word(), self.name)
    }
}

/// The objects the documents of `text` name, for `netd delete -f`: every document needs a
/// kind netd stores, its apiVersion and a name; nothing else is checked.
pub fn manifest_refs(text: &str) -> Result<Vec<ObjectRef>, ApplyError> {
    let (items, mut errors) = items(text);
    let mut out = Vec::new();
    for (doc, item) in items {
        let mut ctx = Ctx { document: doc, object: describe(&item), errors: Vec::new() };
        if let Some(kind) = kind(&mut ctx, &item) {
            let m: ObjectMeta = serde_json::from_value(item.get("metadata").cloned().unwrap_or_default()).unwrap_or_default();
            let mut m = ObjectMeta { name: m.name, namespace: m.namespace, ..Default::default() };
            let (name_ok, rule): (fn(&str) -> bool, &str) = if kind == Kind::EndpointSlice { (is_dns1123_subdomain, DNS1123_SUBDOMAIN) } else { (is_dns1035_label, DNS1035_LABEL) };
            let before = ctx.errors.len();
            meta(&mut ctx, &mut m, name_ok, rule);
            if ctx.errors.len() == before {
                out.push(ObjectRef { kind, namespace: m.namespace.unwrap_or_default(), name: m.name.unwrap_or_default() });
            }
        }
        errors.extend(ctx.errors);
    }
    finish(out, errors)
}

/// The objects of `text` as JSON, with their 1-based document number (`kind: List` expanded),
/// and the errors of the documents that are not YAML/JSON.
fn items(text: &str) -> (Vec<(usize, serde_json::Value)>, Vec<FieldError>) {
    let mut errors = Vec::new();
    let (docs, syntax) = documents(text);
    let mut out = Vec::new();
    for (doc, v) in docs {
        let json = match serde_json::to_value(&v) {
            Ok(j) => j,
            Err(e) => {
                errors.push(FieldError { document: doc, object: "?".into(), field: "<document>".into(), message: e.to_string() });
                continue;
            }
        };
        if json.get("kind").and_then(|k| k.as_str()) == Some("List") {
            out.extend(json.get("items").and_then(|i| i.as_array()).cloned().unwrap_or_default().into_iter().map(|i| (doc, i)));
        } else {
            out.push((doc, json));
        }
    }
    errors.extend(syntax);
    (out, errors)
}

/// The non-empty YAML documents of `text` with their 1-based numbers, up to the first syntax
/// error (returned too: line and column are in its message).
///
/// The first error ends the parse: serde_yaml's document iterator, once its parser has
/// failed, yields that same error again forever (an `apply` of `{a` collected errors until
/// the OOM killer stopped it), and what follows a syntax error cannot be split into
/// documents reliably anyway. The loop is also capped at one document per line plus one
/// (a document starts on a line of its own), so it ends whatever the parser does.
fn documents(text: &str) -> (Vec<(usize, serde_yaml::Value)>, Option<FieldError>) {
    let mut docs = Vec::new();
    let cap = text.lines().count() + 1;
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate().take(cap) {
        match serde_yaml::Value::deserialize(de) {
            Ok(serde_yaml::Value::Null) => {}
            Ok(v) => docs.push((i + 1, v)),
            Err(e) => {
                let error = FieldError { document: i + 1, object: "?".into(), field: "<document>".into(), message: format!("not valid YAML/JSON: {e}") };
                return (docs, Some(error));
            }
        }
    }
    (docs, None)
}

fn describe(v: &serde_json::Value) -> String {
    let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("<no kind>");
    let meta = v.get("metadata");
    let ns = meta.and_then(|m| m.get("namespace")).and_then(|n| n.as_str()).unwrap_or("default");
    let name = meta.and_then(|m| m.get("name")).and_then(|n| n.as_str()).unwrap_or("<no name>");
    format!("{kind} {ns}/{name}")
}

/// The kind of a manifest object, checked against its apiVersion.
fn kind(ctx: &mut Ctx, v: &serde_json::Value) -> Option<Kind> {
    let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
    let api = v.get("apiVersion").and_then(|k| k.as_str()).unwrap_or_default();
    let (k, expect) = match kind {
        "Service" => (Kind::Service, "v1"),
        "Endpoints" => (Kind::Endpoints, "v1"),
        "EndpointSlice" => (Kind::EndpointSlice, "discovery.k8s.io/v1"),
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
    Some(k)
}

fn object(ctx: &mut Ctx, v: serde_json::Value) -> Option<Object> {
    let kind = kind(ctx, &v)?;
    let parsed = match kind {
        Kind::Service => serde_json::from_value::<Service>(v).map(|s| validate_service(ctx, s).map(Object::Service)),
        Kind::EndpointSlice => serde_json::from_value::<EndpointSlice>(v).map(|s| validate_slice(ctx, s).map(Object::EndpointSlice)),
        Kind::Endpoints => serde_json::from_value::<Endpoints>(v).map(|e| convert_endpoints(ctx, e)),
    };
    match parsed {
        Ok(o) => o,
        Err(e) => {
            ctx.err("<document>", format!("does not match the {kind:?} schema: {e}"));
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
    if typ != "ExternalName" {
        ip_families(ctx, spec);
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

/// `clusterIP`/`clusterIPs`, `ipFamilyPolicy` and `ipFamilies`, checked as the API server of a
/// single-stack IPv4 cluster checks them (netd has no IPv6 service range yet): a Service that
/// requires a second family is refused rather than stored with that family silently dropped.
/// Defaults are filled in as the API server does, so the stored object says what it got.
fn ip_families(ctx: &mut Ctx, spec: &mut ServiceSpec) {
    // The user may set clusterIP or clusterIPs; the API server keeps them in step.
    let ips = spec.cluster_ips.clone().unwrap_or_default();
    let shown = || format!("[{}]", ips.iter().map(|i| format!("\"{i}\"")).collect::<Vec<_>>().join(", "));
    match (spec.cluster_ip.as_deref().filter(|c| !c.is_empty()), ips.first()) {
        (None, Some(first)) => {
            spec.cluster_ip = Some(first.clone());
            match first.as_str() {
                "" | "None" => {}
                ip => {
                    usable_ip(ctx, "spec.clusterIPs[0]", ip);
                }
            }
        }
        (Some(ip), Some(first)) if ip != first => ctx.invalid("spec.clusterIPs", shown(), "first value must match `clusterIP`"),
        _ => {}
    }
    if ips.len() > 2 {
        ctx.invalid("spec.clusterIPs", shown(), "may only hold up to 2 values");
    } else if let Some(second) = ips.get(1) {
        if ips[0] == "None" {
            ctx.invalid("spec.clusterIPs", shown(), "'None' must be the first and only value");
        } else if second.parse::<Ipv4Addr>().is_ok() {
            ctx.invalid("spec.clusterIPs", shown(), "may specify no more than one IP for each IP family");
        } else {
            usable_ip(ctx, "spec.clusterIPs[1]", second);
        }
    }
    // A headless Service without a selector gets no address, so any family goes (as in Kubernetes).
    let selectorless_headless = spec.cluster_ip.as_deref() == Some("None") && spec.selector.as_ref().is_none_or(|s| s.is_empty());
    let policy = spec.ip_family_policy.get_or_insert_with(|| "SingleStack".into()).clone();
    match policy.as_str() {
        "SingleStack" | "PreferDualStack" => {}
        "RequireDualStack" if selectorless_headless => {}
        "RequireDualStack" => ctx.invalid("spec.ipFamilyPolicy", "\"RequireDualStack\"", "this cluster is not configured for dual-stack services"),
        p => ctx.unsupported("spec.ipFamilyPolicy", p, &["PreferDualStack", "RequireDualStack", "SingleStack"]),
    }
    let families = spec.ip_families.get_or_insert_with(Vec::new);
    let mut seen = BTreeSet::new();
    for (i, f) in families.iter().enumerate() {
        match f.as_str() {
            "IPv4" => {}
            "IPv6" if selectorless_headless => {}
            "IPv6" => ctx.invalid(format!("spec.ipFamilies[{i}]"), "\"IPv6\"", "not configured on this cluster"),
            other => ctx.unsupported(format!("spec.ipFamilies[{i}]"), other, &["IPv4", "IPv6"]),
        }
        if !seen.insert(f.clone()) {
            ctx.err(format!("spec.ipFamilies[{i}]"), format!("Duplicate value: \"{f}\""));
        }
    }
    if families.is_empty() {
        families.push("IPv4".into());
    }
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


/// `out`, or every error in document order (the syntax error, which ends the parse, comes last
/// from the document iterator).
fn finish<T>(out: Vec<T>, mut errors: Vec<FieldError>) -> Result<Vec<T>, ApplyError> {
    errors.sort_by_key(|e| e.document);
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ApplyError { errors })
    }
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

    #[test]
    fn a_yaml_syntax_error_ends_the_parse_with_line_and_column() {
        // serde_yaml repeats a syntax error forever; this parse used to collect it until the
        // machine ran out of memory.
        let err = apply_manifests("{a").unwrap_err();
        assert_eq!(err.errors.len(), 1, "{err}");
        assert_eq!(err.to_string(), "document 1 (?): <document>: not valid YAML/JSON: did not find expected ',' or '}' at line 2 column 1, while parsing a flow mapping");
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n---\nmetadata: {name: [b\n---\nkind: Service\n";
        let err = apply_manifests(text).unwrap_err();
        assert_eq!(err.errors.len(), 1, "{err}");
        assert!(err.errors[0].document == 2 && err.errors[0].message.contains("at line 7 column 1"), "{err}");
        let err = manifest_refs("a: b\n  c: d").unwrap_err();
        assert_eq!(err.to_string(), "document 1 (?): <document>: not valid YAML/JSON: mapping values are not allowed in this context at line 2 column 4");
    }

    fn service_errors(spec: &str) -> String {
        let m = format!(r#"{{"apiVersion": "v1", "kind": "Service", "metadata": {{"name": "a"}}, "spec": {spec}}}"#);
        apply_manifests(&m).err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn dual_stack_is_refused_not_half_stored() {
        let text = service_errors(r#"{"ipFamilyPolicy": "RequireDualStack", "selector": {"app": "a"}, "ports": [{"port": 80}]}"#);
        assert_eq!(text, r#"document 1 (Service default/a): spec.ipFamilyPolicy: Invalid value: "RequireDualStack": this cluster is not configured for dual-stack services"#);
        let text = service_errors(r#"{"ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv4", "IPv6"], "ports": [{"port": 80}]}"#);
        assert!(text.contains(r#"spec.ipFamilies[1]: Invalid value: "IPv6": not configured on this cluster"#), "{text}");
        let text = service_errors(r#"{"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"], "ports": [{"port": 80}]}"#);
        assert!(text.contains(r#"spec.clusterIPs[1]: Invalid value: "fd00::10": netd supports IPv4 only"#), "{text}");
        let text = service_errors(r#"{"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.11"], "ports": [{"port": 80}]}"#);
        assert!(text.contains(r#"spec.clusterIPs: Invalid value: ["10.96.0.11"]: first value must match `clusterIP`"#), "{text}");
        let text = service_errors(r#"{"ipFamilyPolicy": "Both", "ipFamilies": ["IPv5"], "ports": [{"port": 80}]}"#);
        assert!(text.contains(r#"spec.ipFamilyPolicy: Unsupported value: "Both""#) && text.contains(r#"spec.ipFamilies[0]: Unsupported value: "IPv5""#), "{text}");
        // Accepted: PreferDualStack (one family here, as on a single-stack cluster), a headless
        // Service without selector (nothing to allocate), and clusterIPs alone.
        let ok = apply_manifests(
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"ipFamilyPolicy": "PreferDualStack", "ports": [{"port": 80}]}}
---
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"}, "spec": {"clusterIP": "None", "ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"]}}
---
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c"}, "spec": {"clusterIPs": ["10.96.0.12"], "ports": [{"port": 80}]}}"#,
        )
        .unwrap();
        let spec = |i: usize| match &ok[i] {
            Object::Service(s) => s.spec.clone().unwrap(),
            _ => panic!(),
        };
        assert_eq!((spec(0).ip_family_policy.as_deref(), spec(0).ip_families), (Some("PreferDualStack"), Some(vec!["IPv4".to_string()])));
        assert_eq!(spec(2).cluster_ip.as_deref(), Some("10.96.0.12"));
        assert_eq!(spec(2).ip_family_policy.as_deref(), Some("SingleStack"));
    }

    #[test]
    fn delete_reads_kind_namespace_and_name_only() {
        let refs = manifest_refs(
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"}, "spec": {"ports": "not checked"}}
---
{"apiVersion": "v1", "kind": "List", "items": [{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "web.1"}},
  {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "legacy"}}]}"#,
        )
        .unwrap();
        let shown: Vec<String> = refs.iter().map(|r| format!("{} {}", r.not_found(), r.quoted())).collect();
        assert_eq!(
            shown,
            [
                r#"service "web" in namespace "shop" service "web""#,
                r#"endpointslice "web.1" in namespace "default" endpointslice "web.1""#,
                r#"endpoints "legacy" in namespace "default" endpoints "legacy""#
            ]
        );
        let err = manifest_refs(r#"{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}
---
{"apiVersion": "v1", "kind": "Service", "metadata": {}}"#)
        .unwrap_err()
        .to_string();
        assert!(err.contains("document 1 (ConfigMap default/x): kind: Unsupported value") && err.contains("document 2 (Service default/<no name>): metadata.name: Required value"), "{err}");
    }
}
