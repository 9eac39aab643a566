//! [`Pod`]: a workload namespace attached to a node's test bridge.

use crate::netns::Netns;
use anyhow::Result;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Output};

/// A pod: its own namespace with `eth0` on the node's `tbr0` bridge.
///
/// Owns its namespace, so dropping the `Pod` deletes it (and with it the
/// veth pair). Declare pods after the [`crate::Cluster`] so they are
/// dropped first.
#[derive(Debug)]
pub struct Pod {
    /// The pod's network namespace.
    pub ns: Netns,
    /// Its address on `eth0`.
    pub ip: Ipv4Addr,
    /// Its default gateway: the node's `tbr0` address (FLANNEL_SUBNET's
    /// first address).
    pub gateway: Ipv4Addr,
    /// Prefix length of the node's pod subnet.
    pub prefix_len: u8,
    /// Index of the node the pod lives on.
    pub node: usize,
}

impl Pod {
    /// One ICMP echo (`ping -c 1 -W 1 IP`) from inside the pod; true if it
    /// was answered.
    ///
    /// Panics if `ping` cannot be run at all: reporting that as "no
    /// connectivity" would make assertions like `!pod.ping(ip)` pass
    /// vacuously.
    pub fn ping(&self, ip: Ipv4Addr) -> bool {
        let ip = ip.to_string();
        let out = match self
            .ns
            .exec(&["ping", "-n", "-q", "-c", "1", "-W", "1", &ip])
        {
            Ok(out) => out,
            Err(e) => panic!("cannot run ping in {}: {e:#}", self.ns.name()),
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        // `ip netns exec` reports a missing program this way (exit 255).
        if stderr.contains("exec of") {
            panic!(
                "cannot run ping in {} (is iputils-ping installed?): {}",
                self.ns.name(),
                stderr.trim_end()
            );
        }
        out.status.success()
    }

    /// See [`Netns::exec`].
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        self.ns.exec(args)
    }

    /// See [`Netns::run`].
    pub fn run(&self, args: &[&str]) -> Result<String> {
        self.ns.run(args)
    }

    /// See [`Netns::sh`].
    pub fn sh(&self, script: &str) -> Result<String> {
        self.ns.sh(script)
    }

    /// See [`Netns::spawn`].
    pub fn spawn(&self, args: &[&str], log: Option<&Path>) -> Result<Child> {
        self.ns.spawn(args, log)
    }
}
