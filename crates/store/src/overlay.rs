//! Changes the write-ahead log holds that redb does not yet: the embedded store's memtable.
//!
//! Updating redb's B-trees per batch made the writer thread the busiest thread of a loaded
//! site: every key is filed under a random ID, so every batch copied a page per key, and
//! most keys are deleted again within milliseconds (a slave fetches its key, a bind empties
//! a ready slot). So a batch only appends its changes to the log and applies them here;
//! about once a second the writer freezes this overlay and a checkpoint thread writes the
//! net changes to redb in one durable commit (see `checkpoint`). A key written and deleted
//! between two checkpoints never reaches redb at all.
//!
//! Reads look at the newest layer first: the active overlay, the frozen one being
//! checkpointed, then redb. Values are sealed records, never key bytes in clear.

use std::collections::btree_map::{self, BTreeMap};
use std::collections::HashMap;

/// The newest state of one entry, as far as this layer knows.
#[derive(Debug)]
struct Entry {
    /// `None`: deleted (a tombstone over the layers below).
    value: Option<Vec<u8>>,
    /// No layer below holds this entry, so deleting it leaves no tombstone.
    fresh: bool,
}

/// One table's changes, in key order (so a checkpoint writes each B-tree page once).
#[derive(Debug)]
pub(crate) struct Layer<K> {
    map: BTreeMap<K, Entry>,
}

impl<K> Default for Layer<K> {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Copy> Layer<K> {
    /// `None`: this layer does not know the entry (ask the one below); `Some(None)`: it
    /// was deleted; `Some(Some(v))`: its value.
    pub(crate) fn get(&self, key: K) -> Option<Option<&[u8]>> {
        self.map.get(&key).map(|e| e.value.as_deref())
    }

    /// Writes `value`; `absent_below` says whether the caller found the entry missing in
    /// every lower layer (it matters only when this layer has no entry yet).
    pub(crate) fn put(&mut self, key: K, value: Vec<u8>, absent_below: bool) {
        match self.map.entry(key) {
            btree_map::Entry::Occupied(mut e) => e.get_mut().value = Some(value),
            btree_map::Entry::Vacant(e) => {
                e.insert(Entry {
                    value: Some(value),
                    fresh: absent_below,
                });
            }
        }
    }

    /// Deletes an entry the caller found present (in this layer or below).
    pub(crate) fn delete(&mut self, key: K) {
        match self.map.entry(key) {
            btree_map::Entry::Occupied(e) if e.get().fresh => {
                e.remove();
            }
            btree_map::Entry::Occupied(mut e) => e.get_mut().value = None,
            btree_map::Entry::Vacant(e) => {
                e.insert(Entry {
                    value: None,
                    fresh: false,
                });
            }
        }
    }

    /// Every change in key order: `None` deletes.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (K, Option<&[u8]>)> {
        self.map.iter().map(|(k, e)| (*k, e.value.as_deref()))
    }

    /// The changes at keys `from` and after, in key order.
    pub(crate) fn iter_from(&self, from: K) -> impl Iterator<Item = (K, Option<&[u8]>)> {
        self.map
            .range(from..)
            .map(|(k, e)| (*k, e.value.as_deref()))
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// The changes to the tables since the layer below was frozen.
#[derive(Debug, Default)]
pub(crate) struct Overlay {
    /// Ordinary keys by ID.
    pub(crate) keys: Layer<u128>,
    /// Ready keys per link, by position.
    pub(crate) ready: HashMap<String, Layer<u64>>,
    /// In-flight records by request ID.
    pub(crate) in_flight: Layer<u128>,
}

impl Overlay {
    /// The ready-key changes of `link`, if any.
    pub(crate) fn pool(&self, link: &str) -> Option<&Layer<u64>> {
        self.ready.get(link)
    }

    /// The ready-key changes of `link`, created on first use.
    pub(crate) fn pool_mut(&mut self, link: &str) -> &mut Layer<u64> {
        self.ready.entry(link.to_owned()).or_default()
    }

    /// Entries held (puts and tombstones), for metrics.
    pub(crate) fn len(&self) -> usize {
        self.keys.len() + self.in_flight.len() + self.ready.values().map(Layer::len).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_entry_deleted_leaves_nothing() {
        let mut layer = Layer::default();
        layer.put(1u64, vec![1], true);
        assert_eq!(layer.get(1), Some(Some(&[1u8][..])));
        layer.delete(1);
        assert_eq!(layer.get(1), None, "nothing below held it: no tombstone");
        assert_eq!(layer.len(), 0);
    }

    #[test]
    fn an_entry_held_below_leaves_a_tombstone() {
        let mut layer = Layer::default();
        layer.put(1u64, vec![1], false);
        layer.put(1, vec![2], true); // an update keeps what was known first
        layer.delete(1);
        assert_eq!(layer.get(1), Some(None));
        layer.delete(2);
        assert_eq!(layer.get(2), Some(None));
        layer.put(2, vec![3], true);
        assert_eq!(layer.get(2), Some(Some(&[3u8][..])));
        layer.delete(2);
        assert_eq!(layer.get(2), Some(None), "still deleted below");
        let all: Vec<_> = layer.iter().collect();
        assert_eq!(all, vec![(1, None), (2, None)]);
    }

    #[test]
    fn pools_are_kept_apart_and_in_order() {
        let mut overlay = Overlay::default();
        overlay.pool_mut("A>B").put(9, vec![9], true);
        overlay.pool_mut("A>B").put(3, vec![3], true);
        overlay.pool_mut("A>C").put(5, vec![5], true);
        let from_4: Vec<_> = overlay
            .pool("A>B")
            .map(|p| p.iter_from(4).collect())
            .unwrap_or_default();
        assert_eq!(from_4, vec![(9, Some(&[9u8][..]))]);
        assert!(overlay.pool("B>A").is_none());
        assert_eq!(overlay.len(), 3);
    }
}
