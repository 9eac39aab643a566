//! etcd helpers shared by every etcd client netd has (the subnet leases in `netd`, the service
//! registry here): listing a prefix in pages at one revision, and etcd errors worded for people.
//!
//! Why pages: the client refuses a reply bigger than gRPC's 4 MiB message limit ("decoded message
//! length too large"), so a single `get --prefix` of a big registry (some 4,700 Services with
//! their EndpointSlices, or tens of thousands of subnet leases) fails every time it is tried.

use etcd_client::{Client, GetOptions, KeyValue, KvClient, WatchClient};

/// Keys per page: a few hundred KiB with typical values (a Service or an EndpointSlice is about
/// 1 KiB, a lease 300 B). Pages of bigger values are made smaller until they fit a message.
pub const PAGE_KEYS: i64 = 500;
/// Times a listing starts over because its revision was compacted while it was being read.
const RESTARTS: usize = 3;

/// Largest watch response taken in. A watcher that fell behind (a burst of big transactions)
/// gets up to 1,000 revisions in one response, which easily passes gRPC's default 4 MiB; etcd's
/// own Go client takes up to 2 GiB. Past this limit the watch breaks and the caller lists again.
pub const WATCH_MESSAGE_LIMIT: usize = 256 << 20;

/// The client's watch service, taking responses up to [`WATCH_MESSAGE_LIMIT`].
pub fn watch_client(client: &Client) -> WatchClient {
    client.watch_client().max_decoding_message_size(WATCH_MESSAGE_LIMIT)
}

/// Every key under a prefix, as of one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing<T = KeyValue> {
    /// The revision all pages were read at: a watch continues from `revision + 1`.
    pub revision: i64,
    /// In key order.
    pub kvs: Vec<T>,
}

/// `etcdctl get --prefix PREFIX`, in pages of [`PAGE_KEYS`].
pub async fn list_prefix(client: &Client, prefix: &str) -> Result<Listing, etcd_client::Error> {
    list_prefix_paged(client, prefix, PAGE_KEYS).await
}

/// `etcdctl get --prefix PREFIX`, in pages of `page_keys` keys: the first page is read at the
/// newest revision, every further one at that same revision (continuing after the last key
/// read), so the result is one consistent snapshot. If that revision is compacted meanwhile,
/// the listing starts over at the newest one; a page too big for one message is read again in
/// halves.
pub async fn list_prefix_paged(client: &Client, prefix: &str, page_keys: i64) -> Result<Listing, etcd_client::Error> {
    list(&mut EtcdRange(client.kv_client()), prefix.as_bytes(), page_keys).await
}

/// What one range read returned.
struct Page<T> {
    /// The revision the read was served at (etcd's response header).
    revision: i64,
    items: Vec<T>,
    /// More keys in the range than `limit`.
    more: bool,
}

/// One range read: keys in `[from, end)` as of `revision` (0: the newest), at most `limit`.
trait RangeRead {
    type Item;
    fn key(item: &Self::Item) -> &[u8];
    async fn read(&mut self, from: &[u8], end: &[u8], limit: i64, revision: i64) -> Result<Page<Self::Item>, etcd_client::Error>;
}

struct EtcdRange(KvClient);

impl RangeRead for EtcdRange {
    type Item = KeyValue;

    fn key(item: &KeyValue) -> &[u8] {
        item.key()
    }

    async fn read(&mut self, from: &[u8], end: &[u8], limit: i64, revision: i64) -> Result<Page<KeyValue>, etcd_client::Error> {
        let opts = GetOptions::new().with_range(end).with_limit(limit).with_revision(revision);
        let mut resp = self.0.get(from, Some(opts)).await?;
        Ok(Page { revision: resp.header().map_or(0, |h| h.revision()), more: resp.more(), items: resp.take_kvs() })
    }
}

async fn list<R: RangeRead>(r: &mut R, prefix: &[u8], page_keys: i64) -> Result<Listing<R::Item>, etcd_client::Error> {
    let end = prefix_end(prefix);
    let start = if prefix.is_empty() { vec![0] } else { prefix.to_vec() };
    let mut limit = page_keys.max(1);
    let mut restarts = 0;
    'listing: loop {
        let mut out = Listing { revision: 0, kvs: Vec::new() };
        let mut from = start.clone();
        loop {
            let page = match r.read(&from, &end, limit, out.revision).await {
                Ok(p) => p,
                Err(e) if is_too_large(&e) && limit > 1 => {
                    limit = (limit / 2).max(1);
                    continue;
                }
                Err(e) if is_compacted(&e) && out.revision != 0 && restarts < RESTARTS => {
                    restarts += 1;
                    continue 'listing;
                }
                Err(e) => return Err(e),
            };
            if out.revision == 0 {
                out.revision = page.revision;
            }
            let Some(last) = page.items.last() else { return Ok(out) };
            // The smallest key after `last`.
            from = [R::key(last), &[0]].concat();
            out.kvs.extend(page.items);
            if !page.more {
                return Ok(out);
            }
        }
    }
}

/// The end of the range of keys starting with `prefix` (exclusive): `prefix` with its last byte
/// below 0xff incremented and what follows dropped; `\0` ("to the end of the key space") when
/// there is no such byte.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    match prefix.iter().rposition(|b| *b < 0xff) {
        Some(i) => {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            end
        }
        None => vec![0],
    }
}

fn status(e: &etcd_client::Error) -> Option<&tonic::Status> {
    match e {
        etcd_client::Error::GRpcStatus(s) => Some(s),
        _ => None,
    }
}

/// The revision asked for is gone (etcd's `ErrCompacted`).
fn is_compacted(e: &etcd_client::Error) -> bool {
    status(e).is_some_and(|s| s.code() == tonic::Code::OutOfRange && s.message().contains("compacted"))
}

/// The reply was bigger than the client takes in one message.
fn is_too_large(e: &etcd_client::Error) -> bool {
    status(e).is_some_and(|s| s.code() == tonic::Code::OutOfRange && s.message().contains("message length too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/netd/registry/"), b"/netd/registry0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }

    /// Runs before each read of the fake, with the number of reads so far.
    type Hook = Box<dyn FnMut(&mut Fake, usize)>;

    /// A fake etcd: every key's history (revision, value or deletion), compaction, and a hook
    /// that runs before each read (writes landing between two pages).
    struct Fake {
        history: BTreeMap<Vec<u8>, Vec<(i64, Option<String>)>>,
        revision: i64,
        compacted: i64,
        /// Reads with a bigger limit fail as too large for one message.
        max_limit: i64,
        reads: Vec<(String, i64, i64)>,
        before_read: Hook,
    }

    impl Fake {
        fn new(keys: &[&str]) -> Fake {
            let mut f = Fake { history: BTreeMap::new(), revision: 0, compacted: 0, max_limit: i64::MAX, reads: Vec::new(), before_read: Box::new(|_, _| {}) };
            for k in keys {
                f.put(k, "v1");
            }
            f
        }

        fn put(&mut self, k: &str, v: &str) {
            self.revision += 1;
            self.history.entry(k.as_bytes().to_vec()).or_default().push((self.revision, Some(v.to_string())));
        }

        fn delete(&mut self, k: &str) {
            self.revision += 1;
            self.history.entry(k.as_bytes().to_vec()).or_default().push((self.revision, None));
        }

        /// The whole store as of `revision`.
        fn at(&self, revision: i64) -> Vec<(String, String)> {
            self.history
                .iter()
                .filter_map(|(k, h)| {
                    let (_, v) = h.iter().rev().find(|(r, _)| *r <= revision)?;
                    Some((String::from_utf8(k.clone()).unwrap(), v.clone()?))
                })
                .collect()
        }
    }

    impl RangeRead for Fake {
        type Item = (String, String);

        fn key(item: &(String, String)) -> &[u8] {
            item.0.as_bytes()
        }

        async fn read(&mut self, from: &[u8], end: &[u8], limit: i64, revision: i64) -> Result<Page<(String, String)>, etcd_client::Error> {
            let mut hook = std::mem::replace(&mut self.before_read, Box::new(|_, _| {}));
            hook(self, self.reads.len());
            self.before_read = hook;
            self.reads.push((String::from_utf8_lossy(from).into_owned(), limit, revision));
            let at = if revision == 0 { self.revision } else { revision };
            if at < self.compacted {
                return Err(tonic::Status::out_of_range("etcdserver: mvcc: required revision has been compacted").into());
            }
            if limit > self.max_limit {
                return Err(tonic::Status::out_of_range("Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes").into());
            }
            let inside: Vec<(String, String)> = self.at(at).into_iter().filter(|(k, _)| k.as_bytes() >= from && (end == b"\0" || k.as_bytes() < end)).collect();
            let more = inside.len() as i64 > limit;
            Ok(Page { revision: self.revision, items: inside.into_iter().take(limit as usize).collect(), more })
        }
    }

    fn run(f: &mut Fake, prefix: &str, page: i64) -> Result<Listing<(String, String)>, etcd_client::Error> {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(list(f, prefix.as_bytes(), page))
    }

    fn keys(l: &Listing<(String, String)>) -> Vec<&str> {
        l.kvs.iter().map(|(k, _)| k.as_str()).collect()
    }

    const TEN: [&str; 10] = ["/p/a", "/p/b", "/p/c", "/p/d", "/p/e", "/p/f", "/p/g", "/p/h", "/p/i", "/p/j"];

    #[test]
    fn lists_every_key_across_pages_and_nothing_outside_the_prefix() {
        let mut f = Fake::new(&TEN);
        f.put("/p", "not under /p/");
        f.put("/p0", "after the range");
        f.put("/o/z", "before it");
        let l = run(&mut f, "/p/", 3).unwrap();
        assert_eq!(keys(&l), TEN);
        assert_eq!(l.revision, 13);
        // Four pages, each continuing right after the last key of the one before, all but the
        // first at the first one's revision.
        let reads: Vec<(&str, i64, i64)> = f.reads.iter().map(|(k, l, r)| (k.as_str(), *l, *r)).collect();
        assert_eq!(reads, [("/p/", 3, 0), ("/p/c\0", 3, 13), ("/p/f\0", 3, 13), ("/p/i\0", 3, 13)]);
        // Exactly one page's worth: no empty read after it.
        let mut f = Fake::new(&TEN[..3]);
        assert_eq!(keys(&run(&mut f, "/p/", 3).unwrap()), TEN[..3]);
        assert_eq!(f.reads.len(), 1);
        assert_eq!(run(&mut Fake::new(&[]), "/p/", 3).unwrap(), Listing { revision: 0, kvs: vec![] });
    }

    #[test]
    fn writes_between_pages_do_not_show_one_revision_was_read() {
        let mut f = Fake::new(&TEN);
        f.before_read = Box::new(|f, n| {
            if n == 1 {
                f.put("/p/b", "v2"); // already read
                f.put("/p/h", "v2"); // not yet read
                f.delete("/p/i");
                f.put("/p/zz", "new");
            }
        });
        let l = run(&mut f, "/p/", 3).unwrap();
        assert_eq!(l.revision, 10);
        assert_eq!(l.kvs, f.at(10));
        assert!(l.kvs.iter().all(|(_, v)| v == "v1"));
        assert_eq!(f.at(f.revision).len(), 10, "the store did change meanwhile");
    }

    #[test]
    fn a_compacted_revision_starts_the_listing_over() {
        let mut f = Fake::new(&TEN);
        f.before_read = Box::new(|f, n| {
            if n == 2 {
                f.put("/p/k", "v1");
                f.compacted = f.revision;
            }
        });
        let l = run(&mut f, "/p/", 3).unwrap();
        assert_eq!(l.revision, 11);
        assert_eq!(l.kvs, f.at(11));
        assert_eq!(l.kvs.len(), 11);
        assert_eq!(f.reads[3], ("/p/".to_string(), 3, 0), "started over from the first key at the newest revision");

        // Compacted over and over (a compaction faster than a listing): the error, not a loop.
        let mut f = Fake::new(&TEN);
        f.before_read = Box::new(|f, n| {
            if n > 0 {
                f.put("/p/z", "again");
                f.compacted = f.revision;
            }
        });
        let e = run(&mut f, "/p/", 3).unwrap_err();
        assert!(is_compacted(&e), "{e}");
    }

    #[test]
    fn pages_too_big_for_a_message_are_read_in_halves() {
        let mut f = Fake::new(&TEN);
        f.max_limit = 2;
        let l = run(&mut f, "/p/", 8).unwrap();
        assert_eq!(keys(&l), TEN);
        assert_eq!(f.reads.iter().filter(|r| r.1 == 2).count(), 5);
        // A single key too big: the error.
        let mut f = Fake::new(&TEN);
        f.max_limit = 0;
        assert!(is_too_large(&run(&mut f, "/p/", 8).unwrap_err()));
    }
}
