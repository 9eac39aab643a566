//! The etcd registry, in flannel's layout: `<prefix>/config` and `<prefix>/subnets/<A.B.C.D-LEN>`.
//! A thin shell around etcd calls; all choices are made by `alloc` and `daemon`.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, PutOptions, Txn, TxnOp, WatchOptions, WatchStream};
use netd_proxy::etcd::list_prefix;
use ipnet::Ipv4Net;

use crate::alloc::Taken;
use crate::lease::{parse_subnet_key, subnet_key_name, Lease, LeaseAttrs, LeaseError};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("etcd {op}: {}", netd_proxy::registry::etcd_brief(source))]
    Etcd { op: String, source: etcd_client::Error },
    #[error("reading etcd TLS file {path}: {source}")]
    TlsFile { path: String, source: std::io::Error },
    #[error("etcd TLS: {0}")]
    Tls(String),
}

fn etcd(op: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> RegistryError {
    let op = op.into();
    move |source| RegistryError::Etcd { op, source }
}

/// How to reach etcd (`--etcd-*` flags): the same options as the service registry's.
pub type EtcdOptions = netd_proxy::registry::RegistryOptions;

/// One key under `<prefix>/subnets/` as last seen: a lease, or why it could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Lease(Lease),
    /// The key or the value is malformed: skipped for routing, reported, and its subnet still
    /// counts as taken when the key names one (a well-formed key with a bad value, or a key with
    /// host bits set such as `10.244.5.7-24`, which keeps 10.244.5.0/24).
    Malformed { subnet: Option<Ipv4Net>, reason: String },
}

/// The registry contents at one etcd revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub config: Option<String>,
    pub subnets: BTreeMap<String, Entry>,
    pub revision: i64,
}

impl Snapshot {
    pub fn leases(&self) -> Vec<Lease> {
        self.subnets.values().filter_map(|e| if let Entry::Lease(l) = e { Some(l.clone()) } else { None }).collect()
    }

    /// Malformed keys with why, and what that means for allocation: a key that names a subnet
    /// keeps it taken, one that names none reserves nothing (reports must not claim otherwise).
    pub fn malformed(&self) -> Vec<(String, String)> {
        self.subnets
            .iter()
            .filter_map(|(k, e)| match e {
                Entry::Malformed { subnet: Some(s), reason } => Some((k.clone(), format!("{reason}; skipped, and {s} stays taken (never handed out while the key exists)"))),
                Entry::Malformed { subnet: None, reason } => Some((k.clone(), format!("{reason}; skipped, and it names no subnet, so it reserves none"))),
                Entry::Lease(_) => None,
            })
            .collect()
    }

    /// What allocation must not hand out: every lease and reservation, and the subnet of every
    /// malformed key that names one (it is somebody's, just unreadable).
    pub fn taken(&self) -> Vec<Taken> {
        self.subnets
            .values()
            .filter_map(|e| match e {
                Entry::Lease(l) => Some(Taken { subnet: l.subnet, public_ip: Some(l.attrs.public_ip), reservation: l.is_reservation() }),
                Entry::Malformed { subnet: Some(s), .. } => Some(Taken { subnet: *s, public_ip: None, reservation: false }),
                Entry::Malformed { subnet: None, .. } => None,
            })
            .collect()
    }
}

/// Folds one key's new state (`None` = deleted) under `prefix` into a snapshot. Pure, so the key
/// and value parsing is unit-tested without etcd.
fn apply_key(prefix: &str, snap: &mut Snapshot, key: &[u8], value: Option<(&[u8], i64, i64)>) {
    let key = String::from_utf8_lossy(key).into_owned();
    if key == format!("{prefix}/config") {
        snap.config = value.map(|(v, _, _)| String::from_utf8_lossy(v).into_owned());
        return;
    }
    if !key.starts_with(&format!("{prefix}/subnets/")) {
        return;
    }
    let Some((value, lease_id, mod_revision)) = value else {
        snap.subnets.remove(&key);
        return;
    };
    let entry = match parse_subnet_key(&key) {
        // `10.244.5.7-24` stands for 10.244.5.0/24 to whoever wrote it: never a peer, but its
        // subnet stays taken, as for any other malformed key that names one.
        Err(e @ LeaseError::HostBits { subnet, .. }) => Entry::Malformed { subnet: Some(subnet), reason: e.to_string() },
        Err(e) => Entry::Malformed { subnet: None, reason: e.to_string() },
        Ok(subnet) => match LeaseAttrs::from_json(&subnet, value) {
            Err(e) => Entry::Malformed { subnet: Some(subnet), reason: e.to_string() },
            Ok(attrs) => Entry::Lease(Lease { key: key.clone(), subnet, attrs, etcd_lease: (lease_id != 0).then_some(lease_id), mod_revision }),
        },
    };
    snap.subnets.insert(key, entry);
}

/// The result of writing our lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// etcd lease the key is bound to; `None` for a reservation.
    pub etcd_lease: Option<i64>,
    /// Seconds the lease lives from now (`None` for a reservation).
    pub ttl: Option<i64>,
}

#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
    prefix: String,
}

/// A bound on every etcd request, so that an unreachable etcd makes calls fail (and netd keep its
/// last good state) instead of hanging.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl EtcdRegistry {
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, RegistryError> {
        let mut co = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if opts.ca_file.is_some() || opts.cert_file.is_some() {
            co = co.with_tls(tls_options(opts)?);
        }
        let client = Client::connect(&opts.endpoints, Some(co)).await.map_err(etcd(format!("connect to {}", opts.endpoints.join(","))))?;
        Ok(EtcdRegistry { client, prefix: opts.prefix.trim_end_matches('/').to_string() })
    }

    pub fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    pub fn subnet_key(&self, subnet: &Ipv4Net) -> String {
        format!("{}{}", self.subnets_prefix(), subnet_key_name(subnet))
    }

    /// Reads config and every subnet key at one revision (`etcdctl get --prefix <prefix>/`), in
    /// pages: thousands of leases are more than one gRPC message.
    pub async fn snapshot(&self) -> Result<Snapshot, RegistryError> {
        let prefix = format!("{}/", self.prefix);
        let listing = list_prefix(&self.client, &prefix).await.map_err(etcd(format!("get --prefix {prefix}")))?;
        let mut snap = Snapshot { revision: listing.revision, ..Default::default() };
        for kv in &listing.kvs {
            self.apply(&mut snap, kv.key(), Some((kv.value(), kv.lease(), kv.mod_revision())));
        }
        Ok(snap)
    }

    /// Applies one key's new state (`None` = deleted) to a snapshot.
    fn apply(&self, snap: &mut Snapshot, key: &[u8], value: Option<(&[u8], i64, i64)>) {
        apply_key(&self.prefix, snap, key, value);
    }

    /// Creates our lease key if and only if it does not exist (one transaction, so two nodes that
    /// pick the same subnet at once cannot both win). `Ok(None)`: somebody else holds it.
    pub async fn create(&self, subnet: &Ipv4Net, attrs: &LeaseAttrs, ttl: i64) -> Result<Option<Held>, RegistryError> {
        let key = self.subnet_key(subnet);
        let mut lc = self.client.lease_client();
        let grant = lc.grant(ttl, None).await.map_err(etcd(format!("lease grant {ttl}s")))?;
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), attrs.to_json(), Some(PutOptions::new().with_lease(grant.id())))]);
        let res = self.client.kv_client().txn(txn).await.map_err(etcd(format!("txn create {key}")));
        match res {
            Ok(r) if r.succeeded() => Ok(Some(Held { etcd_lease: Some(grant.id()), ttl: Some(grant.ttl()) })),
            other => {
                // Not ours after all: do not leave an unused lease behind.
                let _ = lc.revoke(grant.id()).await;
                other.map(|_| None)
            }
        }
    }

    /// Renews our lease with a fresh etcd lease, as flannel does, but only while the key still
    /// holds what we wrote (`mod_revision`): if it was deleted, expired or taken over meanwhile,
    /// `Ok(None)` tells the caller to re-acquire instead of silently resurrecting it.
    pub async fn renew(&self, subnet: &Ipv4Net, attrs: &LeaseAttrs, ttl: i64, mod_revision: i64) -> Result<Option<Held>, RegistryError> {
        let key = self.subnet_key(subnet);
        let mut lc = self.client.lease_client();
        let grant = lc.grant(ttl, None).await.map_err(etcd(format!("lease grant {ttl}s")))?;
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::put(key.clone(), attrs.to_json(), Some(PutOptions::new().with_lease(grant.id())))]);
        let res = self.client.kv_client().txn(txn).await.map_err(etcd(format!("txn renew {key}")));
        match res {
            Ok(r) if r.succeeded() => Ok(Some(Held { etcd_lease: Some(grant.id()), ttl: Some(grant.ttl()) })),
            other => {
                let _ = lc.revoke(grant.id()).await;
                other.map(|_| None)
            }
        }
    }

    /// Updates the value of a reservation we hold (no etcd lease: it stays a reservation).
    pub async fn update_reservation(&self, subnet: &Ipv4Net, attrs: &LeaseAttrs, mod_revision: i64) -> Result<bool, RegistryError> {
        let key = self.subnet_key(subnet);
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::put(key.clone(), attrs.to_json(), None)]);
        let r = self.client.kv_client().txn(txn).await.map_err(etcd(format!("txn update reservation {key}")))?;
        Ok(r.succeeded())
    }

    /// Seconds left on an etcd lease (`etcdctl lease timetolive`); `None` if it is gone.
    pub async fn time_to_live(&self, id: i64) -> Result<Option<i64>, RegistryError> {
        let r = self.client.lease_client().time_to_live(id, None).await.map_err(etcd(format!("lease timetolive {id:x}")))?;
        Ok((r.ttl() > 0).then_some(r.ttl()))
    }

    /// Deletes a subnet key (`etcdctl del`).
    pub async fn delete(&self, subnet: &Ipv4Net) -> Result<(), RegistryError> {
        let key = self.subnet_key(subnet);
        self.client.kv_client().delete(key.clone(), None).await.map_err(etcd(format!("del {key}")))?;
        Ok(())
    }

    /// Watches the whole prefix from `revision + 1` on.
    pub async fn watch(&self, revision: i64) -> Result<WatchStream, RegistryError> {
        let opts = WatchOptions::new().with_prefix().with_start_revision(revision + 1).with_progress_notify();
        self.client.watch_client().watch(format!("{}/", self.prefix), Some(opts)).await.map_err(etcd(format!("watch {}/", self.prefix)))
    }

    /// Waits for the next watch response and folds it into `snap`. `Ok(false)` when the watch was
    /// cancelled or compacted (the caller must take a fresh snapshot).
    pub async fn next_event(&self, stream: &mut WatchStream, snap: &mut Snapshot) -> Result<bool, RegistryError> {
        let resp = stream.message().await.map_err(etcd(format!("watch {}/", self.prefix)))?;
        let Some(resp) = resp else { return Ok(false) };
        if resp.canceled() || resp.compact_revision() > 0 {
            return Ok(false);
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                EventType::Put => self.apply(snap, kv.key(), Some((kv.value(), kv.lease(), kv.mod_revision()))),
                EventType::Delete => self.apply(snap, kv.key(), None),
            }
            snap.revision = snap.revision.max(kv.mod_revision());
        }
        if let Some(h) = resp.header() {
            snap.revision = snap.revision.max(h.revision());
        }
        Ok(true)
    }
}

fn tls_options(opts: &EtcdOptions) -> Result<etcd_client::TlsOptions, RegistryError> {
    use netd_proxy::registry::{etcd_tls, RegistryError as Shared};
    etcd_tls(opts.ca_file.as_deref(), opts.cert_file.as_deref(), opts.key_file.as_deref()).map_err(|e| match e {
        Shared::TlsFile { path, source } => RegistryError::TlsFile { path, source },
        other => RegistryError::Tls(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netconf::NetworkConfig;
    use rand::SeedableRng;

    const P: &str = "/coreos.com/network";
    const VALUE: &[u8] = br#"{"PublicIP":"198.18.0.50","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:32"}}"#;

    fn put(snap: &mut Snapshot, name: &str, value: &[u8]) {
        apply_key(P, snap, format!("{P}/subnets/{name}").as_bytes(), Some((value, 7, 3)));
    }

    #[test]
    fn keys_and_values_are_read_into_leases_or_malformed_entries() {
        let mut snap = Snapshot::default();
        apply_key(P, &mut snap, format!("{P}/config").as_bytes(), Some((b"{}", 0, 1)));
        put(&mut snap, "10.244.1.0-24", VALUE);
        put(&mut snap, "10.244.2.0-24", b"{not json");
        put(&mut snap, "garbage", VALUE);
        apply_key(P, &mut snap, b"/elsewhere/subnets/10.244.3.0-24", Some((VALUE, 7, 3)));
        assert_eq!(snap.config.as_deref(), Some("{}"));
        assert_eq!(snap.subnets.len(), 3);
        let leases = snap.leases();
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].key, format!("{P}/subnets/10.244.1.0-24"));
        assert_eq!(leases[0].etcd_lease, Some(7));
        apply_key(P, &mut snap, format!("{P}/subnets/10.244.1.0-24").as_bytes(), None);
        assert!(snap.leases().is_empty());
    }

    /// A key with host bits set is malformed: never a lease (so never a peer), reported, and the
    /// subnet it stands for stays taken, which the report says (and no more than that).
    #[test]
    fn a_key_with_host_bits_is_malformed_and_keeps_its_subnet_taken() {
        let mut snap = Snapshot::default();
        put(&mut snap, "10.244.2.7-24", VALUE);
        put(&mut snap, "garbage", VALUE);
        assert!(snap.leases().is_empty());
        let m = snap.malformed();
        assert_eq!(m.len(), 2);
        let (key, why) = &m[0];
        assert_eq!(key, &format!("{P}/subnets/10.244.2.7-24"));
        assert!(why.contains("host bits set") && why.contains("10.244.2.0/24 stays taken"), "{why}");
        let (key, why) = &m[1];
        assert_eq!(key, &format!("{P}/subnets/garbage"));
        assert!(why.contains("reserves none") && !why.contains("stays taken"), "{why}");
        let taken = snap.taken();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].subnet, "10.244.2.0/24".parse::<Ipv4Net>().unwrap());

        // Allocation honours it: of .1 .2 .3, with .1 leased, only .3 is ever handed out.
        put(&mut snap, "10.244.1.0-24", VALUE);
        let cfg = NetworkConfig::parse(r#"{"Network":"10.244.0.0/22","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#).unwrap();
        for seed in 0..20 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let plan = crate::alloc::choose(&cfg, &snap.taken(), "198.18.0.10".parse().unwrap(), None, &mut rng).unwrap();
            assert_eq!(plan.choice, crate::alloc::Choice::New("10.244.3.0/24".parse().unwrap()));
        }
    }
}
