//! One trait for the service dataplanes: render the Plan (pure, golden-tested), apply the
//! difference (thin). nftables and iptables implement it; netd-ebpf implements [`Backend`] directly.

use crate::iptables::{self, IptRuleset, Iptables};
use crate::model::Plan;
use crate::nft::{self, Nftables, Ruleset};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("nftables: {0}")]
    Nftables(#[from] nft::NftError),
    #[error("iptables: {0}")]
    Iptables(#[from] iptables::IptablesError),
    /// The eBPF dataplane (netd-ebpf, which depends on this crate: its error type is carried
    /// boxed, source chain intact).
    #[error("eBPF: {0}")]
    Ebpf(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Whether anything was written to the kernel.
    pub changed: bool,
    /// Backend-specific size of the change (nft: operations; iptables: restore bytes).
    pub size: usize,
    /// Whether the kernel's state was read back and compared (start-up, resync, after errors).
    pub observed: bool,
}

pub trait Dataplane: Send {
    type Artifact: Send + Sync + 'static;
    fn name(&self) -> &'static str;
    /// Plan → artifact. Pure; `prev` only lets unchanged services' parts be reused.
    fn render(&self, plan: &Plan, prev: Option<&Self::Artifact>) -> Self::Artifact;
    /// Makes the kernel hold `artifact`, changing only what differs. `observe`: diff against
    /// the kernel's actual state instead of the last applied artifact.
    fn apply(&mut self, artifact: &Self::Artifact, observe: bool) -> Result<ApplyReport, DataplaneError>;
    /// Removes everything this dataplane programmed.
    fn remove(&mut self) -> Result<(), DataplaneError>;
}

impl Dataplane for Nftables {
    type Artifact = Ruleset;
    fn name(&self) -> &'static str {
        "nftables"
    }
    fn render(&self, plan: &Plan, prev: Option<&Ruleset>) -> Ruleset {
        nft::render(plan, prev)
    }
    fn apply(&mut self, artifact: &Ruleset, observe: bool) -> Result<ApplyReport, DataplaneError> {
        let r = self.sync(artifact, observe)?;
        Ok(ApplyReport { changed: r.ops > 0, size: r.ops, observed: r.observed })
    }
    fn remove(&mut self) -> Result<(), DataplaneError> {
        Nftables::remove(self)?;
        Ok(())
    }
}

impl Dataplane for Iptables {
    type Artifact = IptRuleset;
    fn name(&self) -> &'static str {
        "iptables"
    }
    fn render(&self, plan: &Plan, prev: Option<&IptRuleset>) -> IptRuleset {
        iptables::render(plan, prev)
    }
    fn apply(&mut self, artifact: &IptRuleset, observe: bool) -> Result<ApplyReport, DataplaneError> {
        let r = self.sync(artifact, observe)?;
        Ok(ApplyReport { changed: r.bytes > 0, size: r.bytes, observed: r.observed })
    }
    fn remove(&mut self) -> Result<(), DataplaneError> {
        Iptables::remove(self)?;
        Ok(())
    }
}

/// Object-safe face of a [`Dataplane`] that keeps its last artifact: what the control loop
/// holds, whichever `--proxy-mode` was chosen.
pub trait Backend: Send {
    fn name(&self) -> &'static str;
    fn sync(&mut self, plan: &Plan, observe: bool) -> Result<ApplyReport, DataplaneError>;
    fn remove(&mut self) -> Result<(), DataplaneError>;
}

pub struct Rendered<D: Dataplane> {
    pub dataplane: D,
    last: Option<D::Artifact>,
}

impl<D: Dataplane> Rendered<D> {
    pub fn new(dataplane: D) -> Self {
        Rendered { dataplane, last: None }
    }
}

impl<D: Dataplane> Backend for Rendered<D> {
    fn name(&self) -> &'static str {
        self.dataplane.name()
    }
    fn sync(&mut self, plan: &Plan, observe: bool) -> Result<ApplyReport, DataplaneError> {
        let artifact = self.dataplane.render(plan, self.last.as_ref());
        let r = self.dataplane.apply(&artifact, observe);
        self.last = Some(artifact);
        r
    }
    fn remove(&mut self) -> Result<(), DataplaneError> {
        self.last = None;
        self.dataplane.remove()
    }
}

/// The dataplanes (`nftables`, `iptables`) whose rules are there, which [`remove_leftovers`]
/// with `keep: None` would remove (`netd cleanup --dry-run`).
pub fn leftovers(iptables_restore: &str) -> Result<Vec<&'static str>, DataplaneError> {
    let mut present = Vec::new();
    if Nftables::new().observe()?.table {
        present.push("nftables");
    }
    if Iptables::new(iptables_restore).present()? {
        present.push("iptables");
    }
    Ok(present)
}

/// Removes what the nftables and iptables dataplanes programmed, except `keep`'s: what a switch
/// of `--proxy-mode` leaves behind (as kube-proxy cleans up its other modes' rules at start), and
/// all of it for `netd cleanup` (`keep: None`). Returns the names of the dataplanes whose rules
/// were there. Both are tried even when one fails; the first error is returned.
pub fn remove_leftovers(keep: Option<crate::ProxyMode>, iptables_restore: &str) -> Result<Vec<&'static str>, DataplaneError> {
    use crate::ProxyMode;
    let mut removed = Vec::new();
    let mut first_err = None;
    if keep != Some(ProxyMode::Nftables) {
        match Nftables::new().remove() {
            Ok(true) => removed.push("nftables"),
            Ok(false) => {}
            Err(e) => first_err = first_err.or(Some(DataplaneError::from(e))),
        }
    }
    if keep != Some(ProxyMode::Iptables) {
        match Iptables::new(iptables_restore).remove() {
            Ok(true) => removed.push("iptables"),
            Ok(false) => {}
            Err(e) => first_err = first_err.or(Some(DataplaneError::from(e))),
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}
