//! The name table of a [`super::Zone`]: a hash map split into a fixed number of shards, each
//! behind an `Arc`. A zone snapshot shares every shard with the builder's working copy; an
//! update copies only the shards whose names changed (a few dozen entries each at ten thousand
//! services), so publishing a new zone costs O(changed names), not O(all names). A lookup is
//! one hash to pick the shard and one hash-map probe.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use rustc_hash::FxBuildHasher;

use super::Entry;

const SHARD_BITS: u32 = 10;
const SHARDS: usize = 1 << SHARD_BITS;

type Shard = HashMap<Box<[u8]>, Entry, FxBuildHasher>;

#[inline]
fn shard_of(key: &[u8]) -> usize {
    // Bits well above those hashbrown uses for the bucket index of a shard-sized table and
    // below the 7 it keeps as the control byte.
    (FxBuildHasher.hash_one(key) >> 40) as usize & (SHARDS - 1)
}

/// Lower-case wire name → what is known about it. Immutable once published.
#[derive(Clone)]
pub(crate) struct Names {
    shards: Arc<[Arc<Shard>]>,
    len: usize,
}

impl std::fmt::Debug for Names {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Names").field("len", &self.len).finish()
    }
}

impl Names {
    #[inline]
    pub fn get(&self, key: &[u8]) -> Option<&Entry> {
        self.shards[shard_of(key)].get(key)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Entry)> {
        self.shards.iter().flat_map(|s| s.iter().map(|(k, v)| (&**k, v)))
    }
}

/// The builder's working copy; [`NamesMut::snapshot`] publishes it.
pub(crate) struct NamesMut {
    shards: Vec<Arc<Shard>>,
    len: usize,
    published: Option<Names>,
}

impl NamesMut {
    pub fn new() -> Self {
        let empty = Arc::new(Shard::default());
        NamesMut { shards: vec![empty; SHARDS], len: 0, published: None }
    }

    pub fn get(&self, key: &[u8]) -> Option<&Entry> {
        self.shards[shard_of(key)].get(key)
    }

    pub fn insert(&mut self, key: Box<[u8]>, e: Entry) {
        let s = Arc::make_mut(&mut self.shards[shard_of(&key)]);
        if s.insert(key, e).is_none() {
            self.len += 1;
        }
        self.published = None;
    }

    pub fn remove(&mut self, key: &[u8]) {
        let i = shard_of(key);
        if !self.shards[i].contains_key(key) {
            return;
        }
        if Arc::make_mut(&mut self.shards[i]).remove(key).is_some() {
            self.len -= 1;
        }
        self.published = None;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The table as it is now; shares every shard with `self` (copied on the next write).
    pub fn snapshot(&mut self) -> Names {
        if let Some(n) = &self.published {
            return n.clone();
        }
        let n = Names { shards: self.shards.iter().cloned().collect(), len: self.len };
        self.published = Some(n.clone());
        n
    }
}
