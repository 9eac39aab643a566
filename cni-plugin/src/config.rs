//! Plugin inputs: the `CNI_*` environment and the network config on stdin.
//! Everything here is pure (the environment is passed in as a lookup
//! function) so it is unit-tested without a process around it.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::CniError;
use crate::result::Dns;
use crate::version::{self, Version};

pub const DEFAULT_SUBNET_FILE: &str = "/run/netd/subnet.env";
pub const DEFAULT_BRIDGE: &str = "netd0";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/netd/cni";
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// How long ADD waits for the IPAM lock before answering "try again later".
/// The lock is held only for a read-modify-write of a small file, so a long
/// wait means a stuck or hostile holder, not load.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_LOCK_TIMEOUT_SECS: f64 = 600.0;

/// `CNI_ARGS` keys netd-cni understands: the address and MAC requests (the
/// `IP=`/`MAC=` convention of host-local, static, bridge and tuning, which
/// `podman run --ip/--mac-address` uses) and the pod identity Kubernetes
/// runtimes send. Others are refused unless `IgnoreUnknown=1`, as the
/// reference plugins do.
const KNOWN_ARGS: [&str; 7] = [
    "IgnoreUnknown",
    "IP",
    "MAC",
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
];

/// Longest Linux interface name (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        })
    }
}

/// The `CNI_*` variables, validated for the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    /// `CNI_ARGS` split into pairs, in order.
    pub args: Vec<(String, String)>,
    pub path: Option<String>,
    /// `IP=` of `CNI_ARGS` (ADD only; empty otherwise).
    pub ip_requests: Vec<Requested<IpRequest>>,
    /// `MAC=` of `CNI_ARGS` (ADD only).
    pub mac_requests: Vec<Requested<Mac>>,
}

/// Reads `CNI_COMMAND` alone (needed before anything else).
pub fn command_from_env(get: &dyn Fn(&str) -> Option<String>) -> Result<Command, CniError> {
    let raw = get("CNI_COMMAND")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| CniError::invalid_env("CNI_COMMAND", "is not set"))?;
    Command::parse(&raw).ok_or_else(|| {
        CniError::invalid_env(
            "CNI_COMMAND",
            format!("\"{raw}\" is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"),
        )
    })
}

impl CniEnv {
    /// Reads and validates the variables the spec requires for `command`
    /// (an empty value counts as unset, as in the reference implementation).
    pub fn from_lookup(
        command: Command,
        get: &dyn Fn(&str) -> Option<String>,
    ) -> Result<CniEnv, CniError> {
        let var = |name: &str| get(name).filter(|s| !s.is_empty());
        let needs_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        let needs_netns = matches!(command, Command::Add | Command::Check);

        let container_id = var("CNI_CONTAINERID");
        if needs_attachment {
            match &container_id {
                None => return Err(CniError::invalid_env("CNI_CONTAINERID", "is not set")),
                Some(id) => validate_container_id(id)?,
            }
        }
        let netns = var("CNI_NETNS").map(PathBuf::from);
        if needs_netns && netns.is_none() {
            return Err(CniError::invalid_env("CNI_NETNS", "is not set"));
        }
        let ifname = var("CNI_IFNAME");
        if needs_attachment {
            match &ifname {
                None => return Err(CniError::invalid_env("CNI_IFNAME", "is not set")),
                Some(name) => {
                    validate_ifname(name).map_err(|r| CniError::invalid_env("CNI_IFNAME", r))?
                }
            }
        }
        let args = match var("CNI_ARGS") {
            Some(raw) => parse_cni_args(&raw)?,
            None => Vec::new(),
        };
        // DEL must clean up whatever the arguments say; only the commands
        // that act on them refuse what they do not understand.
        let (mut ip_requests, mut mac_requests) = (Vec::new(), Vec::new());
        if matches!(command, Command::Add | Command::Check) {
            check_unknown_args(&args)?;
        }
        if command == Command::Add {
            for (k, v) in &args {
                let bad = |r: String| CniError::invalid_env("CNI_ARGS", format!("{k}={v}: {r}"));
                match k.as_str() {
                    // An empty value asks for nothing (runtimes template these).
                    "IP" => {
                        for one in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                            ip_requests.push(Requested {
                                value: IpRequest::parse(one).map_err(bad)?,
                                source: Source::CniArgs("IP"),
                            });
                        }
                    }
                    "MAC" if !v.is_empty() => mac_requests.push(Requested {
                        value: Mac::parse(v).map_err(bad)?,
                        source: Source::CniArgs("MAC"),
                    }),
                    _ => {}
                }
            }
        }
        let path = var("CNI_PATH");
        if command == Command::Gc && path.is_none() {
            return Err(CniError::invalid_env(
                "CNI_PATH",
                "is not set (required for GC)",
            ));
        }
        Ok(CniEnv {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
            ip_requests,
            mac_requests,
        })
    }

    /// The value of `key` in `CNI_ARGS`, if present.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `CNI_CONTAINERID`; validated present for ADD/DEL/CHECK.
    pub fn container_id(&self) -> &str {
        self.container_id.as_deref().unwrap_or_default()
    }

    /// `CNI_IFNAME`; validated present for ADD/DEL/CHECK.
    pub fn ifname(&self) -> &str {
        self.ifname.as_deref().unwrap_or_default()
    }
}

/// The spec: alphanumeric first, then alphanumerics, `_`, `.`, `-`.
fn is_spec_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn validate_container_id(id: &str) -> Result<(), CniError> {
    if is_spec_identifier(id) {
        Ok(())
    } else {
        Err(CniError::invalid_env(
            "CNI_CONTAINERID",
            format!(
                "\"{id}\" must start with an alphanumeric character, followed by alphanumerics, '_', '.' or '-'"
            ),
        ))
    }
}

/// A name the kernel accepts for a network interface.
pub fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_IFNAME {
        return Err(format!("\"{name}\" must be 1 to {MAX_IFNAME} bytes long"));
    }
    if name == "." || name == ".." {
        return Err(format!("\"{name}\" is not a valid interface name"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "\"{name}\" contains a character not allowed in interface names"
        ));
    }
    Ok(())
}

/// `K=V;K2=V2`. Empty segments are ignored; a segment without `=` or with an
/// empty key is an error.
pub fn parse_cni_args(raw: &str) -> Result<Vec<(String, String)>, CniError> {
    let mut out = Vec::new();
    for seg in raw.split(';').filter(|s| !s.is_empty()) {
        match seg.split_once('=') {
            Some((k, v)) if !k.is_empty() => out.push((k.to_string(), v.to_string())),
            _ => {
                return Err(CniError::invalid_env(
                    "CNI_ARGS",
                    format!("\"{seg}\" is not a KEY=VALUE pair"),
                ))
            }
        }
    }
    Ok(out)
}

/// `IgnoreUnknown`'s value, as the reference plugins read it.
fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// Refuses `CNI_ARGS` keys we do not understand unless `IgnoreUnknown` is
/// true, and a key we act on given twice with different values.
fn check_unknown_args(args: &[(String, String)]) -> Result<(), CniError> {
    let mut ignore = false;
    for (k, v) in args.iter().filter(|(k, _)| k == "IgnoreUnknown") {
        ignore = parse_bool(v).ok_or_else(|| {
            CniError::invalid_env(
                "CNI_ARGS",
                format!("{k}={v}: expected 1, true, 0 or false"),
            )
        })?;
    }
    for key in ["IP", "MAC"] {
        let mut values = args.iter().filter(|(k, _)| k == key).map(|(_, v)| v);
        if let Some(first) = values.next() {
            if let Some(other) = values.find(|v| *v != first) {
                return Err(CniError::invalid_env(
                    "CNI_ARGS",
                    format!("{key} is given twice ({key}={first}, {key}={other})"),
                ));
            }
        }
    }
    let unknown: Vec<&str> = args
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !KNOWN_ARGS.contains(k))
        .collect();
    if unknown.is_empty() || ignore {
        return Ok(());
    }
    Err(CniError::invalid_env(
        "CNI_ARGS",
        format!(
            "unknown keys {} (netd-cni understands {}; add IgnoreUnknown=1 to ignore the others)",
            unknown.join(", "),
            KNOWN_ARGS[1..].join(", ")
        ),
    ))
}

/// Where a requested address or MAC came from: named in errors, and it
/// decides the error code (a bad `CNI_ARGS` is code 4, a bad config 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `CNI_ARGS` key.
    CniArgs(&'static str),
    /// A path in the config: `runtimeConfig.ips`, `args.cni.mac`, ...
    Config(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::CniArgs(k) => write!(f, "CNI_ARGS {k}"),
            Source::Config(path) => f.write_str(path),
        }
    }
}

/// A value the runtime asked for, with where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requested<T> {
    pub value: T,
    pub source: Source,
}

impl<T: fmt::Display> Requested<T> {
    /// An error about this request, with the code its source calls for.
    pub fn error(&self, reason: impl fmt::Display) -> CniError {
        match self.source {
            Source::CniArgs(k) => {
                CniError::invalid_env("CNI_ARGS", format!("{k}={}: {reason}", self.value))
            }
            Source::Config(path) => {
                CniError::InvalidConfig(format!("field \"{path}\": {reason}"))
            }
        }
    }
}

/// A requested address: `10.244.7.9` or `10.244.7.9/24` (the static-IP
/// convention carries the prefix length; it must then be the node subnet's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRequest {
    pub addr: Ipv4Addr,
    pub prefix_len: Option<u8>,
}

impl IpRequest {
    pub fn parse(s: &str) -> Result<IpRequest, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        if addr.contains(':') {
            return Err(format!(
                "\"{s}\" is an IPv6 address; netd-cni assigns IPv4 addresses only"
            ));
        }
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("\"{s}\" is not an IPv4 address"))?;
        let prefix_len = match len {
            None => None,
            Some(l) => Some(
                l.parse::<u8>()
                    .ok()
                    .filter(|l| *l <= 32)
                    .ok_or_else(|| format!("\"{s}\" has an invalid prefix length"))?,
            ),
        };
        Ok(IpRequest { addr, prefix_len })
    }
}

impl fmt::Display for IpRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix_len {
            Some(l) => write!(f, "{}/{l}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// A unicast Ethernet address for the pod's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// `aa:bb:cc:dd:ee:ff` (or with `-`), case-insensitive.
    pub fn parse(s: &str) -> Result<Mac, String> {
        let bad = || {
            format!("\"{s}\" is not a MAC address (want six hex octets like 0a:58:0a:f4:07:09)")
        };
        let sep = if s.contains('-') { '-' } else { ':' };
        let parts: Vec<&str> = s.split(sep).collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (b, p) in mac.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if mac[0] & 1 == 1 {
            return Err(format!(
                "\"{s}\" is a multicast address; an interface needs a unicast one"
            ));
        }
        if mac == [0; 6] {
            return Err(format!("\"{s}\" is the all-zero address"));
        }
        Ok(Mac(mac))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// What ADD was asked to assign, from every source at once: `CNI_ARGS`
/// (`IP=`, `MAC=`), `args.cni.{ips,mac}` and `runtimeConfig.{ips,mac}`
/// (capabilities `ips`/`mac`). The sources must agree: the pod gets one
/// interface with one IPv4 address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requests {
    pub ip: Option<Requested<IpRequest>>,
    pub mac: Option<Requested<Mac>>,
}

impl Requests {
    pub fn merge(env: &CniEnv, conf: &NetConf) -> Result<Requests, CniError> {
        let ips = env.ip_requests.iter().chain(&conf.ip_requests);
        let mut ip: Option<Requested<IpRequest>> = None;
        for r in ips {
            match &mut ip {
                None => ip = Some(*r),
                Some(first) if first.value.addr != r.value.addr => {
                    return Err(r.error(format!(
                        "{} conflicts with {} {} (a pod interface gets one IPv4 address)",
                        r.value, first.source, first.value
                    )))
                }
                Some(first) => match (first.value.prefix_len, r.value.prefix_len) {
                    (Some(a), Some(b)) if a != b => {
                        return Err(r.error(format!(
                            "{} conflicts with {} {}",
                            r.value, first.source, first.value
                        )))
                    }
                    (None, Some(_)) => *first = *r,
                    _ => {}
                },
            }
        }
        let mut mac: Option<Requested<Mac>> = None;
        for r in env.mac_requests.iter().chain(&conf.mac_requests) {
            match &mac {
                None => mac = Some(*r),
                Some(first) if first.value != r.value => {
                    return Err(r.error(format!(
                        "{} conflicts with {} {}",
                        r.value, first.source, first.value
                    )))
                }
                Some(_) => {}
            }
        }
        Ok(Requests { ip, mac })
    }
}

/// The config's `dns` block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct DnsConf {
    pub nameservers: Vec<String>,
    pub domain: Option<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

/// One `cni.dev/valid-attachments` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The validated plugin configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: Version,
    pub name: String,
    pub subnet_file: PathBuf,
    pub bridge: String,
    pub data_dir: PathBuf,
    pub dns: DnsConf,
    pub cluster_domain: String,
    /// Kept as JSON: it is passed through (ADD) or compared (CHECK), and may
    /// be in either result layout.
    pub prev_result: Option<Value>,
    pub valid_attachments: Option<Vec<Attachment>>,
    /// How long to wait for the IPAM lock (`lockTimeoutSeconds`).
    pub lock_timeout: Duration,
    /// `hostLocalDirs`: address stores of the reference `host-local` IPAM (one file named by
    /// each address in use), e.g. flannel's network's while its pods remain after a switch to
    /// netd; their addresses are never handed out.
    pub host_local_dirs: Vec<PathBuf>,
    /// `runtimeConfig.ips` and `args.cni.ips` (ADD only).
    pub ip_requests: Vec<Requested<IpRequest>>,
    /// `runtimeConfig.mac` and `args.cni.mac` (ADD only).
    pub mac_requests: Vec<Requested<Mac>>,
}

/// Stdin as a JSON object. Syntax errors (and non-objects) are code 6.
pub fn parse_stdin(bytes: &[u8]) -> Result<Map<String, Value>, CniError> {
    let decode = |reason: String| CniError::Decode {
        what: "network config from stdin",
        reason,
    };
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(decode(format!(
            "expected a JSON object, got {}",
            json_kind(&other)
        ))),
        Err(e) => Err(decode(e.to_string())),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The `cniVersion` string, if it is one (used for error results even when
/// the rest of the config is broken).
pub fn raw_cni_version(obj: &Map<String, Value>) -> Option<&str> {
    obj.get("cniVersion").and_then(Value::as_str)
}

/// Field `key` as a `T`; null counts as absent. A wrong type is code 7 and
/// names the field.
fn field<T: DeserializeOwned>(obj: &Map<String, Value>, key: &str) -> Result<Option<T>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => T::deserialize(v)
            .map(Some)
            .map_err(|e| CniError::InvalidConfig(format!("field \"{key}\": {e}"))),
    }
}

impl NetConf {
    /// Validates the config object for `cmd`. Unknown fields are ignored
    /// (runtimes add `runtimeConfig`, `args`, `capabilities`, ...).
    pub fn from_object(obj: &Map<String, Value>, cmd: Command) -> Result<NetConf, CniError> {
        let raw_version: Option<String> = field(obj, "cniVersion")?;
        let cni_version = version::negotiate(raw_version.as_deref(), cmd)?;

        let name: String = field(obj, "name")?
            .ok_or_else(|| CniError::InvalidConfig("field \"name\" is missing".into()))?;
        if !is_spec_identifier(&name) || name.len() > 200 {
            return Err(CniError::InvalidConfig(format!(
                "field \"name\": \"{name}\" must start with an alphanumeric character, followed by alphanumerics, '_', '.' or '-'"
            )));
        }
        let bridge: String = field(obj, "bridge")?.unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
        validate_ifname(&bridge)
            .map_err(|r| CniError::InvalidConfig(format!("field \"bridge\": {r}")))?;
        let path_field = |key: &str, default: &str| -> Result<PathBuf, CniError> {
            let p: PathBuf = field(obj, key)?.unwrap_or_else(|| PathBuf::from(default));
            if p.as_os_str().is_empty() {
                return Err(CniError::InvalidConfig(format!("field \"{key}\" is empty")));
            }
            Ok(p)
        };
        let subnet_file = path_field("subnetFile", DEFAULT_SUBNET_FILE)?;
        let data_dir = path_field("dataDir", DEFAULT_DATA_DIR)?;
        let dns: DnsConf = field(obj, "dns")?.unwrap_or_default();
        let cluster_domain: String = field::<String>(obj, "clusterDomain")?
            .map(|d| d.trim_matches('.').to_string())
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| DEFAULT_CLUSTER_DOMAIN.to_string());
        let prev_result = match obj.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(v) => {
                return Err(CniError::InvalidConfig(format!(
                    "field \"prevResult\": expected an object, got {}",
                    json_kind(v)
                )))
            }
        };
        let valid_attachments = field(obj, "cni.dev/valid-attachments")?;
        let lock_timeout = match field::<f64>(obj, "lockTimeoutSeconds")? {
            None => DEFAULT_LOCK_TIMEOUT,
            Some(s) if s > 0.0 && s <= MAX_LOCK_TIMEOUT_SECS => Duration::from_secs_f64(s),
            Some(s) => {
                return Err(CniError::InvalidConfig(format!(
                    "field \"lockTimeoutSeconds\": {s} is not in (0, {MAX_LOCK_TIMEOUT_SECS}]"
                )))
            }
        };
        let host_local_dirs: Vec<PathBuf> = field(obj, "hostLocalDirs")?.unwrap_or_default();
        let (mut ip_requests, mut mac_requests) = (Vec::new(), Vec::new());
        if cmd == Command::Add {
            for (outer, inner, path_ips, path_mac) in [
                ("args", Some("cni"), "args.cni.ips", "args.cni.mac"),
                ("runtimeConfig", None, "runtimeConfig.ips", "runtimeConfig.mac"),
            ] {
                let mut section = obj.get(outer);
                if let Some(inner) = inner {
                    section = section.and_then(|v| v.get(inner));
                }
                let Some(Value::Object(section)) = section else {
                    continue;
                };
                let bad = |path: &str, r: String| {
                    CniError::InvalidConfig(format!("field \"{path}\": {r}"))
                };
                if let Some(ips) = field::<Vec<String>>(section, "ips")
                    .map_err(|_| bad(path_ips, "expected an array of strings".into()))?
                {
                    for ip in ips {
                        ip_requests.push(Requested {
                            value: IpRequest::parse(&ip).map_err(|r| bad(path_ips, r))?,
                            source: Source::Config(path_ips),
                        });
                    }
                }
                if let Some(mac) = field::<String>(section, "mac")
                    .map_err(|_| bad(path_mac, "expected a string".into()))?
                    .filter(|m| !m.is_empty())
                {
                    mac_requests.push(Requested {
                        value: Mac::parse(&mac).map_err(|r| bad(path_mac, r))?,
                        source: Source::Config(path_mac),
                    });
                }
            }
        }
        Ok(NetConf {
            cni_version,
            name,
            subnet_file,
            bridge,
            data_dir,
            dns,
            cluster_domain,
            prev_result,
            valid_attachments,
            lock_timeout,
            host_local_dirs,
            ip_requests,
            mac_requests,
        })
    }
}

/// The `dns` of an ADD result. With `K8S_POD_NAMESPACE` (from CNI_ARGS) the
/// search list is Kubernetes' `<ns>.svc.<domain> svc.<domain> <domain>` with
/// `ndots:5`; without it, the config's search list and options.
pub fn result_dns(conf: &DnsConf, cluster_domain: &str, pod_namespace: Option<&str>) -> Dns {
    let (search, options) = match pod_namespace.filter(|ns| !ns.is_empty()) {
        Some(ns) => {
            let mut options = vec!["ndots:5".to_string()];
            options.extend(
                conf.options
                    .iter()
                    .filter(|o| !o.starts_with("ndots:"))
                    .cloned(),
            );
            (
                vec![
                    format!("{ns}.svc.{cluster_domain}"),
                    format!("svc.{cluster_domain}"),
                    cluster_domain.to_string(),
                ],
                options,
            )
        }
        None => (conf.search.clone(), conf.options.clone()),
    };
    Dns {
        nameservers: conf.nameservers.clone(),
        domain: conf.domain.clone(),
        search,
        options,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    const FULL: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
        ),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    #[test]
    fn command_is_required_and_known() {
        assert_eq!(command_from_env(&env_of(&[])).unwrap_err().code(), 4);
        let e = command_from_env(&env_of(&[("CNI_COMMAND", "FROB")])).unwrap_err();
        assert_eq!(e.code(), 4);
        assert!(e.to_string().contains("CNI_COMMAND") && e.to_string().contains("FROB"));
        for c in ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"] {
            let cmd = command_from_env(&env_of(&[("CNI_COMMAND", c)])).unwrap();
            assert_eq!(cmd.to_string(), c);
        }
    }

    #[test]
    fn full_env_parses() {
        let env = CniEnv::from_lookup(Command::Add, &env_of(FULL)).unwrap();
        assert_eq!(env.container_id(), "abc123");
        assert_eq!(env.ifname(), "eth0");
        assert_eq!(env.netns, Some(PathBuf::from("/var/run/netns/x")));
        assert_eq!(env.arg("K8S_POD_NAMESPACE"), Some("default"));
        assert_eq!(env.arg("nope"), None);
    }

    #[test]
    fn each_missing_variable_is_named() {
        for (cmd, var) in [
            (Command::Add, "CNI_CONTAINERID"),
            (Command::Add, "CNI_NETNS"),
            (Command::Add, "CNI_IFNAME"),
            (Command::Check, "CNI_NETNS"),
            (Command::Del, "CNI_CONTAINERID"),
            (Command::Del, "CNI_IFNAME"),
            (Command::Gc, "CNI_PATH"),
        ] {
            let pairs: Vec<_> = FULL.iter().copied().filter(|(k, _)| *k != var).collect();
            let e = CniEnv::from_lookup(cmd, &env_of(&pairs)).unwrap_err();
            assert_eq!(e.code(), 4, "{cmd} without {var}");
            assert!(e.to_string().contains(var), "{e}");
            // Empty is the same as unset.
            let mut pairs: Vec<_> = pairs;
            pairs.push((var, ""));
            assert_eq!(
                CniEnv::from_lookup(cmd, &env_of(&pairs))
                    .unwrap_err()
                    .code(),
                4
            );
        }
    }

    #[test]
    fn del_and_status_need_less() {
        let pairs: Vec<_> = FULL
            .iter()
            .copied()
            .filter(|(k, _)| *k != "CNI_NETNS")
            .collect();
        assert!(CniEnv::from_lookup(Command::Del, &env_of(&pairs)).is_ok());
        assert!(CniEnv::from_lookup(Command::Status, &env_of(&[])).is_ok());
    }

    #[test]
    fn bad_container_id_and_ifname() {
        for (var, bad) in [
            ("CNI_CONTAINERID", "-abc"),
            ("CNI_CONTAINERID", "a/b"),
            ("CNI_IFNAME", "a-very-long-interface-name"),
            ("CNI_IFNAME", "eth/0"),
            ("CNI_IFNAME", ".."),
        ] {
            let mut pairs: Vec<_> = FULL.iter().copied().filter(|(k, _)| *k != var).collect();
            pairs.push((var, bad));
            let e = CniEnv::from_lookup(Command::Add, &env_of(&pairs)).unwrap_err();
            assert_eq!(e.code(), 4);
            assert!(e.to_string().contains(var), "{e}");
        }
    }

    #[test]
    fn cni_args_pairs() {
        assert_eq!(
            parse_cni_args("A=1;;B=x=y;C=").unwrap(),
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "x=y".into()),
                ("C".into(), String::new())
            ]
        );
        let e = parse_cni_args("A=1;oops").unwrap_err();
        assert_eq!(e.code(), 4);
        assert!(e.to_string().contains("CNI_ARGS") && e.to_string().contains("oops"));
        assert_eq!(parse_cni_args("=1").unwrap_err().code(), 4);
    }

    fn add_env(args: &str) -> Result<CniEnv, CniError> {
        let mut pairs: Vec<_> = FULL
            .iter()
            .copied()
            .filter(|(k, _)| *k != "CNI_ARGS")
            .collect();
        pairs.push(("CNI_ARGS", args));
        CniEnv::from_lookup(Command::Add, &env_of(&pairs))
    }

    #[test]
    fn unknown_cni_args_need_ignore_unknown() {
        // What Kubernetes runtimes send is understood without it.
        add_env("K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;K8S_POD_INFRA_CONTAINER_ID=c;K8S_POD_UID=d")
            .unwrap();
        let e = add_env("K8S_POD_NAME=b;FOO=1;BAR=2").unwrap_err();
        assert_eq!(e.code(), 4);
        let m = e.to_string();
        assert!(
            m.contains("CNI_ARGS") && m.contains("FOO, BAR") && m.contains("IgnoreUnknown=1"),
            "{m}"
        );
        for yes in ["1", "true", "TRUE", "True"] {
            add_env(&format!("FOO=1;IgnoreUnknown={yes}")).unwrap();
        }
        for no in ["0", "false"] {
            assert_eq!(add_env(&format!("IgnoreUnknown={no};FOO=1")).unwrap_err().code(), 4);
        }
        let e = add_env("IgnoreUnknown=yes").unwrap_err();
        assert!(e.to_string().contains("IgnoreUnknown=yes"), "{e}");
        // DEL cleans up whatever the arguments say.
        let pairs: Vec<_> = FULL
            .iter()
            .copied()
            .map(|(k, v)| if k == "CNI_ARGS" { (k, "FOO=1") } else { (k, v) })
            .collect();
        CniEnv::from_lookup(Command::Del, &env_of(&pairs)).unwrap();
    }

    #[test]
    fn ip_and_mac_from_cni_args() {
        let env = add_env("IP=10.244.7.9;MAC=0A:58:0a:f4:07:09").unwrap();
        assert_eq!(
            env.ip_requests,
            vec![Requested {
                value: IpRequest {
                    addr: Ipv4Addr::new(10, 244, 7, 9),
                    prefix_len: None
                },
                source: Source::CniArgs("IP")
            }]
        );
        assert_eq!(env.mac_requests[0].value, Mac([0x0a, 0x58, 10, 244, 7, 9]));
        assert_eq!(
            add_env("IP=10.244.7.9/24").unwrap().ip_requests[0].value.prefix_len,
            Some(24)
        );
        // Empty values ask for nothing.
        let env = add_env("IP=;MAC=").unwrap();
        assert!(env.ip_requests.is_empty() && env.mac_requests.is_empty());
        for (args, needle) in [
            ("IP=10.244.7", "not an IPv4 address"),
            ("IP=fd00::5", "IPv6"),
            ("IP=10.244.7.9/33", "prefix length"),
            ("MAC=0a:58:0a:f4:07", "not a MAC"),
            ("MAC=01:00:5e:00:00:01", "multicast"),
            ("MAC=00:00:00:00:00:00", "all-zero"),
            ("MAC=0a:58:0a:f4:07:0g", "not a MAC"),
            ("IP=10.244.7.9;IP=10.244.7.10", "given twice"),
        ] {
            let e = add_env(args).unwrap_err();
            assert_eq!(e.code(), 4, "{args}");
            assert!(e.to_string().contains(needle), "{args}: {e}");
            assert!(e.to_string().contains("CNI_ARGS"), "{args}: {e}");
        }
    }

    #[test]
    fn ips_and_mac_from_runtime_config_and_args() {
        let c = NetConf::from_object(
            &obj(r#"{"cniVersion":"1.1.0","name":"n",
                "capabilities":{"ips":true,"mac":true},
                "runtimeConfig":{"ips":["10.244.7.9/24"],"mac":"0a:58:0a:f4:07:09"},
                "args":{"cni":{"ips":["10.244.7.9"]}}}"#),
            Command::Add,
        )
        .unwrap();
        assert_eq!(c.ip_requests.len(), 2);
        assert_eq!(c.ip_requests[0].source, Source::Config("args.cni.ips"));
        assert_eq!(c.mac_requests[0].source, Source::Config("runtimeConfig.mac"));
        let env = add_env("IgnoreUnknown=1").unwrap();
        let r = Requests::merge(&env, &c).unwrap();
        // The request that carries the prefix length is kept (it is checked).
        assert_eq!(r.ip.unwrap().value.to_string(), "10.244.7.9/24");
        assert_eq!(r.mac.unwrap().value.to_string(), "0a:58:0a:f4:07:09");
        // Disagreeing sources are an error naming both.
        let env = add_env("IP=10.244.7.10").unwrap();
        let e = Requests::merge(&env, &c).unwrap_err();
        assert_eq!(e.code(), 7, "{e}");
        let m = e.to_string();
        assert!(
            m.contains("args.cni.ips") && m.contains("CNI_ARGS IP 10.244.7.10"),
            "{m}"
        );
        let env = add_env("MAC=0a:58:0a:f4:07:10").unwrap();
        let m = Requests::merge(&env, &c).unwrap_err().to_string();
        assert!(m.contains("runtimeConfig.mac") && m.contains("CNI_ARGS MAC"), "{m}");
        // Bad values in the config are code 7 naming the field.
        for (json, field) in [
            (r#""runtimeConfig":{"ips":"10.244.7.9"}"#, "runtimeConfig.ips"),
            (r#""runtimeConfig":{"ips":["x"]}"#, "runtimeConfig.ips"),
            (r#""runtimeConfig":{"mac":"zz"}"#, "runtimeConfig.mac"),
            (r#""args":{"cni":{"ips":["fd00::1/64"]}}"#, "args.cni.ips"),
            (r#""args":{"cni":{"mac":5}}"#, "args.cni.mac"),
        ] {
            let text = format!(r#"{{"cniVersion":"1.1.0","name":"n",{json}}}"#);
            let e = NetConf::from_object(&obj(&text), Command::Add).unwrap_err();
            assert_eq!(e.code(), 7, "{json}");
            assert!(e.to_string().contains(field), "{json}: {e}");
            // Only ADD looks at them: DEL must not fail on them.
            NetConf::from_object(&obj(&text), Command::Del).unwrap();
        }
    }

    #[test]
    fn lock_timeout() {
        let c = |extra: &str| {
            NetConf::from_object(
                &obj(&format!(r#"{{"cniVersion":"1.1.0","name":"n"{extra}}}"#)),
                Command::Add,
            )
        };
        assert_eq!(c("").unwrap().lock_timeout, DEFAULT_LOCK_TIMEOUT);
        assert_eq!(
            c(r#","lockTimeoutSeconds":0.5"#).unwrap().lock_timeout,
            Duration::from_millis(500)
        );
        for bad in ["0", "-1", "100000", "\"5\""] {
            let e = c(&format!(r#","lockTimeoutSeconds":{bad}"#)).unwrap_err();
            assert!(e.to_string().contains("lockTimeoutSeconds"), "{bad}: {e}");
        }
    }

    fn obj(json: &str) -> Map<String, Value> {
        parse_stdin(json.as_bytes()).unwrap()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = NetConf::from_object(
            &obj(r#"{"cniVersion":"1.1.0","name":"netd","type":"netd-cni"}"#),
            Command::Add,
        )
        .unwrap();
        assert_eq!(c.cni_version, Version(1, 1, 0));
        assert_eq!(c.bridge, "netd0");
        assert_eq!(c.subnet_file, PathBuf::from("/run/netd/subnet.env"));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/netd/cni"));
        assert_eq!(c.cluster_domain, "cluster.local");
        assert_eq!(c.dns, DnsConf::default());
        assert!(c.prev_result.is_none() && c.valid_attachments.is_none());
    }

    #[test]
    fn full_config_with_unknown_fields() {
        let c = NetConf::from_object(
            &obj(r#"{
                "cniVersion":"0.4.0","name":"k8s-pod-network","type":"netd-cni",
                "subnetFile":"/tmp/s.env","bridge":"br9","dataDir":"/tmp/ipam",
                "dns":{"nameservers":["10.96.0.10"],"search":["a"],"options":["edns0"]},
                "clusterDomain":"corp.example.",
                "runtimeConfig":{"portMappings":[]},"capabilities":{"portMappings":true},
                "args":{"labels":{}},"ipMasq":true,"somethingNew":[1,2,3],
                "prevResult":{"cniVersion":"0.4.0","ips":[]}
            }"#),
            Command::Add,
        )
        .unwrap();
        assert_eq!(c.bridge, "br9");
        assert_eq!(c.subnet_file, PathBuf::from("/tmp/s.env"));
        assert_eq!(c.data_dir, PathBuf::from("/tmp/ipam"));
        assert_eq!(c.dns.nameservers, vec!["10.96.0.10"]);
        assert_eq!(c.cluster_domain, "corp.example");
        assert!(c.prev_result.is_some());
    }

    #[test]
    fn config_errors_name_the_field() {
        let cases = [
            (r#"{"cniVersion":"1.1.0"}"#, 7, "name"),
            (r#"{"cniVersion":"1.1.0","name":"-x"}"#, 7, "name"),
            (
                r#"{"cniVersion":"1.1.0","name":"n","bridge":5}"#,
                7,
                "bridge",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","bridge":"way-too-long-bridge"}"#,
                7,
                "bridge",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","dns":{"nameservers":"x"}}"#,
                7,
                "dns",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","dataDir":""}"#,
                7,
                "dataDir",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","prevResult":[]}"#,
                7,
                "prevResult",
            ),
            (r#"{"name":"n"}"#, 7, "cniVersion"),
            (r#"{"cniVersion":"0.2.0","name":"n"}"#, 1, "0.2.0"),
            (r#"{"cniVersion":1,"name":"n"}"#, 7, "cniVersion"),
        ];
        for (json, code, needle) in cases {
            let e = NetConf::from_object(&obj(json), Command::Add).unwrap_err();
            assert_eq!(e.code(), code, "{json}: {e}");
            assert!(e.to_string().contains(needle), "{json}: {e}");
        }
    }

    #[test]
    fn stdin_must_be_a_json_object() {
        assert_eq!(parse_stdin(b"{not json").unwrap_err().code(), 6);
        assert_eq!(parse_stdin(b"").unwrap_err().code(), 6);
        let e = parse_stdin(b"[1]").unwrap_err();
        assert_eq!(e.code(), 6);
        assert!(e.to_string().contains("an array"), "{e}");
    }

    #[test]
    fn gc_attachments_parse() {
        let c = NetConf::from_object(
            &obj(r#"{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#),
            Command::Gc,
        )
        .unwrap();
        assert_eq!(
            c.valid_attachments,
            Some(vec![Attachment {
                container_id: "a".into(),
                ifname: "eth0".into()
            }])
        );
    }

    #[test]
    fn kubernetes_dns() {
        let conf = DnsConf {
            nameservers: vec!["10.96.0.10".into()],
            domain: None,
            search: vec!["ignored".into()],
            options: vec!["ndots:2".into(), "edns0".into()],
        };
        let d = result_dns(&conf, "cluster.local", Some("shop"));
        assert_eq!(d.nameservers, vec!["10.96.0.10"]);
        assert_eq!(
            d.search,
            vec![
                "shop.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        assert_eq!(d.options, vec!["ndots:5", "edns0"]);
        let d = result_dns(&conf, "cluster.local", None);
        assert_eq!(d.search, vec!["ignored"]);
        assert_eq!(d.options, vec!["ndots:2", "edns0"]);
    }
}
