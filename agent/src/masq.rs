//! Pod-network masquerade and forward-accept rules, flannel's semantics in one nftables table
//! (`table ip netd`). Rendering is pure and golden-tested; applying is one atomic `nft -f`
//! transaction, skipped when the kernel already has exactly this ruleset (so a restart changes
//! nothing and interrupts nothing).

use std::io::Write;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;

pub const TABLE: &str = "netd";

/// kube-proxy marks packets it masquerades itself with 0x4000; leave those alone, as flannel does.
const KUBE_PROXY_MASQ_MARK: u32 = 0x4000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasqSpec {
    pub network: Ipv4Net,
    pub subnet: Ipv4Net,
    /// Masquerade pod traffic that leaves the cluster network (`--ip-masq`).
    pub masquerade: bool,
    /// UDP port of the overlay's encapsulated packets: exempted from connection tracking, which
    /// they do not need (no NAT applies to node-to-node tunnel packets) and which costs a lookup
    /// per packet in each direction.
    pub overlay_port: Option<u16>,
    /// Addresses the node-local DNS server answers on (its listen address, the cluster DNS IP):
    /// their port 53 is exempt from connection tracking, so DNS never races in conntrack (the
    /// problem NodeLocal DNSCache exists for) and never fills its table.
    pub dns_ips: Vec<std::net::Ipv4Addr>,
}

/// The whole table as an `nft -f` script. The table is declared, deleted and declared again in
/// one transaction: the kernel swaps old for new atomically, packets see one or the other.
pub fn render(spec: &MasqSpec) -> String {
    let body = render_body(spec);
    let gen = fnv1a(body.as_bytes());
    format!(
        "table ip {TABLE} {{}}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n\tcomment \"{}\"\n{body}}}\n",
        generation_comment(gen)
    )
}

fn render_body(spec: &MasqSpec) -> String {
    let (net, sub) = (spec.network, spec.subnet);
    let mut s = String::new();
    if spec.masquerade {
        s.push_str("\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n");
        s.push_str(&format!("\t\tmeta mark & {KUBE_PROXY_MASQ_MARK:#x} == {KUBE_PROXY_MASQ_MARK:#x} return comment \"masqueraded by the service proxy\"\n"));
        s.push_str(&format!("\t\tip saddr {sub} ip daddr {net} return comment \"pod to pod: no NAT\"\n"));
        s.push_str(&format!("\t\tip saddr {net} ip daddr {sub} return comment \"pod to pod: no NAT\"\n"));
        s.push_str(&format!("\t\tip saddr != {net} ip daddr {sub} return comment \"outside to a local pod: keep the client address\"\n"));
        s.push_str(&format!("\t\tip saddr {net} ip daddr != 224.0.0.0/4 masquerade fully-random comment \"pods to outside the cluster\"\n"));
        s.push_str(&format!("\t\tip saddr != {net} ip daddr {net} masquerade fully-random comment \"host to remote pods\"\n"));
        s.push_str("\t}\n");
    }
    if spec.overlay_port.is_some() || !spec.dns_ips.is_empty() {
        let dns = spec.dns_ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>().join(", ");
        for (chain, hook, dns_match) in [("raw_prerouting", "prerouting", "ip daddr"), ("raw_output", "output", "ip saddr")] {
            s.push_str(&format!("\tchain {chain} {{\n\t\ttype filter hook {hook} priority raw; policy accept;\n"));
            if let Some(port) = spec.overlay_port {
                s.push_str(&format!("\t\tudp dport {port} notrack comment \"overlay packets need no connection tracking\"\n"));
            }
            if !dns.is_empty() {
                let port = if hook == "prerouting" { "dport" } else { "sport" };
                s.push_str(&format!("\t\t{dns_match} {{ {dns} }} meta l4proto {{ tcp, udp }} th {port} 53 notrack comment \"node-local DNS\"\n"));
            }
            s.push_str("\t}\n");
        }
    }
    s.push_str("\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n");
    s.push_str(&format!("\t\tip saddr {net} accept\n\t\tip daddr {net} accept\n\t}}\n"));
    s
}

fn generation_comment(gen: u64) -> String {
    format!("netd pod network rules, generation {gen:016x}")
}

/// A stable hash of the rendered rules (FNV-1a): the generation written into the table comment,
/// by which a restarted netd recognises rules that are already right.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    #[error("running `nft {args}`: {source}")]
    Spawn { args: String, source: std::io::Error },
    #[error("`nft {args}` failed: {stderr}")]
    Nft { args: String, stderr: String },
}

/// Keeps `table ip netd` equal to the rendered spec.
pub struct Masquerade {
    /// What `nft list table` printed right after our last apply (or adoption): any other listing
    /// is drift and is repaired on the next sync.
    last_listing: Option<String>,
}

impl Default for Masquerade {
    fn default() -> Self {
        Self::new()
    }
}

impl Masquerade {
    pub fn new() -> Self {
        Masquerade { last_listing: None }
    }

    /// Makes the kernel hold `spec`'s rules. Returns whether anything was written.
    pub fn sync(&mut self, spec: &MasqSpec) -> Result<bool, MasqError> {
        let script = render(spec);
        let want_comment = generation_comment(fnv1a(render_body(spec).as_bytes()));
        let listing = list_table()?;
        if let Some(listing) = &listing {
            let adopted = self.last_listing.is_none() && listing.contains(&want_comment);
            if adopted || self.last_listing.as_deref() == Some(listing.as_str()) {
                self.last_listing = Some(listing.clone());
                return Ok(false);
            }
        }
        nft(&["-f", "-"], Some(&script))?;
        self.last_listing = list_table()?;
        Ok(true)
    }
}

/// `nft list table ip netd`, or `None` when the table does not exist.
fn list_table() -> Result<Option<String>, MasqError> {
    match nft(&["list", "table", "ip", TABLE], None) {
        Ok(out) => Ok(Some(out)),
        Err(MasqError::Nft { stderr, .. }) if stderr.contains("No such file") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes `table ip netd` (for `netd cleanup`; with `dry_run` only looks). Returns whether it existed.
pub fn remove_if_present(dry_run: bool) -> Result<bool, MasqError> {
    if list_table()?.is_none() {
        return Ok(false);
    }
    if dry_run {
        return Ok(true);
    }
    nft(&["delete", "table", "ip", TABLE], None)?;
    Ok(true)
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, MasqError> {
    let joined = args.join(" ");
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| MasqError::Spawn { args: joined.clone(), source })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(|source| MasqError::Spawn { args: joined.clone(), source })?;
    }
    let out = child.wait_with_output().map_err(|source| MasqError::Spawn { args: joined.clone(), source })?;
    if !out.status.success() {
        return Err(MasqError::Nft { args: joined, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(masquerade: bool) -> MasqSpec {
        MasqSpec { network: "10.244.0.0/16".parse().unwrap(), subnet: "10.244.3.0/24".parse().unwrap(), masquerade, overlay_port: Some(8472), dns_ips: vec![] }
    }

    #[test]
    fn golden_ruleset() {
        let got = render(&spec(true));
        let want = "table ip netd {}
delete table ip netd
table ip netd {
\tcomment \"netd pod network rules, generation GEN\"
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta mark & 0x4000 == 0x4000 return comment \"masqueraded by the service proxy\"
\t\tip saddr 10.244.3.0/24 ip daddr 10.244.0.0/16 return comment \"pod to pod: no NAT\"
\t\tip saddr 10.244.0.0/16 ip daddr 10.244.3.0/24 return comment \"pod to pod: no NAT\"
\t\tip saddr != 10.244.0.0/16 ip daddr 10.244.3.0/24 return comment \"outside to a local pod: keep the client address\"
\t\tip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random comment \"pods to outside the cluster\"
\t\tip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random comment \"host to remote pods\"
\t}
\tchain raw_prerouting {
\t\ttype filter hook prerouting priority raw; policy accept;
\t\tudp dport 8472 notrack comment \"overlay packets need no connection tracking\"
\t}
\tchain raw_output {
\t\ttype filter hook output priority raw; policy accept;
\t\tudp dport 8472 notrack comment \"overlay packets need no connection tracking\"
\t}
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tip saddr 10.244.0.0/16 accept
\t\tip daddr 10.244.0.0/16 accept
\t}
}
";
        let gen = format!("{:016x}", fnv1a(render_body(&spec(true)).as_bytes()));
        assert_eq!(got, want.replace("GEN", &gen));
    }

    #[test]
    fn node_local_dns_is_untracked() {
        let mut sp = spec(true);
        sp.dns_ips = vec!["169.254.20.10".parse().unwrap(), "10.96.0.10".parse().unwrap()];
        let got = render(&sp);
        assert!(got.contains("\t\tip daddr { 169.254.20.10, 10.96.0.10 } meta l4proto { tcp, udp } th dport 53 notrack comment \"node-local DNS\"\n"), "{got}");
        assert!(got.contains("\t\tip saddr { 169.254.20.10, 10.96.0.10 } meta l4proto { tcp, udp } th sport 53 notrack comment \"node-local DNS\"\n"), "{got}");
    }

    #[test]
    fn without_masquerade_only_forwarding_is_accepted() {
        let got = render(&spec(false));
        assert!(!got.contains("postrouting"));
        assert!(got.contains("ip saddr 10.244.0.0/16 accept"));
        assert_ne!(render(&spec(false)), render(&spec(true)));
    }
}
