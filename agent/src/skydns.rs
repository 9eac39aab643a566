//! The etcd side of cluster DNS's SkyDNS records: the prefix is listed (in pages, at one
//! revision) and watched from that revision on; every watch response is folded into the
//! parsed table ([`netd_dns::skydns::SkyTable`]) and the server is handed a new record set at
//! once, so an `etcdctl put` is answered on every node as soon as the watch delivers it. A
//! malformed value is skipped, logged and listed in `netd status`; it never takes the other
//! records down. While etcd is away the last records stay served, and the prefix is listed
//! again when it is back.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use netd_dns::skydns::SkyTable;
use netd_proxy::etcd::{list_prefix, watch_client};
use netd_proxy::registry::{etcd_brief, etcd_client, RegistryOptions};
use tracing::{info, warn};

use crate::server::Shared;
use crate::status::SkyDnsStatus;

/// Skipped values named in `netd status` (all are logged).
const STATUS_SKIPPED: usize = 10;

/// Follows the SkyDNS records of `args` for `dns` until the server is dropped.
pub fn spawn(dns: Arc<netd_dns::DnsServer>, args: &netd_dns::Args, etcd: RegistryOptions, shared: Arc<Shared>) {
    let zones = args.skydns_zones();
    if zones.is_empty() {
        return;
    }
    let negative_ttl = args.dns_negative_ttl;
    let mut table = SkyTable::new(&args.dns_skydns_prefix);
    let prefix = table.watch_prefix();
    dns.set_skydns(Arc::new(netd_dns::skydns::SkyZone::pending(&zones, negative_ttl)));
    let status = SkyDnsStatus { prefix: prefix.clone(), zones: zones.clone(), ..Default::default() };
    set_status(&shared, status.clone());
    tokio::spawn(async move {
        let mut status = status;
        let mut backoff = Duration::from_millis(200);
        let client = loop {
            match etcd_client(&etcd).await {
                Ok(c) => break c,
                Err(e) => {
                    status.last_error = Some(e.to_string());
                    set_status(&shared, status.clone());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        let publish = |table: &SkyTable, revision: i64, status: &mut SkyDnsStatus| {
            dns.set_skydns(Arc::new(table.zone(&zones, negative_ttl, revision as u32)));
            let skipped = table.skipped();
            (status.records, status.revision, status.skipped_total) = (table.len(), revision, skipped.len());
            status.skipped = skipped.into_iter().take(STATUS_SKIPPED).collect();
            set_status(&shared, status.clone());
        };
        loop {
            let listing = match list_prefix(&client, &prefix).await {
                Ok(l) => l,
                Err(e) => {
                    let e = format!("get --prefix {prefix}: {}", etcd_brief(&e));
                    warn!("listing SkyDNS records failed (keeping the last ones): {e}");
                    status.last_error = Some(e);
                    set_status(&shared, status.clone());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            table.clear();
            for kv in &listing.kvs {
                fold(&mut table, kv.key(), Some(kv.value()));
            }
            let mut revision = listing.revision;
            info!(prefix = %prefix, records = table.len(), skipped = table.skipped().len(), revision, "SkyDNS records listed");
            status.listed = true;
            status.last_error = None;
            publish(&table, revision, &mut status);
            let opts = WatchOptions::new().with_prefix().with_start_revision(revision + 1).with_progress_notify();
            let mut stream = match watch_client(&client).watch(prefix.clone(), Some(opts)).await {
                Ok(s) => s,
                Err(e) => {
                    let e = format!("watch {prefix}: {}", etcd_brief(&e));
                    warn!("watching SkyDNS records failed: {e}");
                    status.last_error = Some(e);
                    set_status(&shared, status.clone());
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            loop {
                match stream.message().await {
                    Ok(Some(resp)) if !resp.canceled() && resp.compact_revision() == 0 => {
                        if resp.events().is_empty() {
                            continue;
                        }
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            match ev.event_type() {
                                EventType::Put => fold(&mut table, kv.key(), Some(kv.value())),
                                EventType::Delete => fold(&mut table, kv.key(), None),
                            }
                            revision = revision.max(kv.mod_revision());
                        }
                        publish(&table, revision, &mut status);
                    }
                    Ok(_) => break,
                    Err(e) => {
                        let e = format!("watch {prefix}: {}", etcd_brief(&e));
                        warn!("SkyDNS watch broke (relisting): {e}");
                        status.last_error = Some(e);
                        set_status(&shared, status.clone());
                        break;
                    }
                }
            }
            tokio::time::sleep(backoff).await;
        }
    });
}

/// One key's new value (`None`: deleted); a malformed one is logged.
fn fold(table: &mut SkyTable, key: &[u8], value: Option<&[u8]>) {
    match value {
        Some(v) => {
            if let Err(why) = table.put(key, v) {
                warn!(key = %String::from_utf8_lossy(key), "skipping malformed SkyDNS value: {why}");
            }
        }
        None => table.delete(key),
    }
}

fn set_status(shared: &Shared, sky: SkyDnsStatus) {
    shared.update(|s| s.dns.get_or_insert_with(Default::default).skydns = Some(sky));
}
