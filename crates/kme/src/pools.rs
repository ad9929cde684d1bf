//! Ready-key pools: per peer site, keys this site generated ahead of demand and the peer
//! has already regenerated and stored (a `fill`). An enc_keys request for that peer takes
//! keys from the pool and needs one `bind` round trip to name their SAEs, with no entropy
//! server on its path. A refill task per link keeps each pool between its low-water mark
//! and its target, in large batches.
//!
//! The pool's contents live in the key store (so they survive a restart at both sites);
//! this module keeps only the IDs and expiries, in the order they are handed out, so a
//! million ready keys cost about 24 MiB here.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use dqkd_store::{KeyStore, StoreError};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::config::PoolSettings;

/// Ready keys closer than this to their expiry are not handed out: the peer must still
/// hold them when the bind arrives, whatever the clocks and queues in between.
pub const EXPIRY_MARGIN_SECS: u64 = 60;

/// The store's name for the pool of keys `origin` made for `peer`. Both sites use the same
/// name, so a key is filed identically at both ends.
pub fn link_name(origin: &str, peer: &str) -> String {
    format!("{origin}>{peer}")
}

/// The ready-key pools of this site, one per peer site.
pub struct Pools {
    settings: PoolSettings,
    key_len: usize,
    kme: String,
    links: BTreeMap<String, Arc<LinkPool>>,
}

/// The ready keys of one link and the signal that wakes its refill task.
pub struct LinkPool {
    peer: String,
    name: String,
    ready: Mutex<VecDeque<(Uuid, u64)>>,
    wake: Notify,
}

impl LinkPool {
    /// The peer site.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The store's name for this pool.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Ready keys held now.
    pub fn level(&self) -> u64 {
        self.lock().len() as u64
    }

    /// Adds freshly filled keys at the back.
    pub fn push(&self, keys: impl IntoIterator<Item = (Uuid, u64)>) {
        self.lock().extend(keys);
    }

    /// Waits until a take lowers the pool (or another reason to look again).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<(Uuid, u64)>> {
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Pools {
    /// Empty pools for `peers`, or none at all when the settings turn pools off.
    pub fn new<'a>(
        kme: &str,
        settings: PoolSettings,
        key_len: usize,
        peers: impl IntoIterator<Item = &'a String>,
    ) -> Self {
        let links = if settings.target == 0 {
            BTreeMap::new()
        } else {
            peers
                .into_iter()
                .map(|peer| {
                    let pool = LinkPool {
                        peer: peer.clone(),
                        name: link_name(kme, peer),
                        ready: Mutex::new(VecDeque::new()),
                        wake: Notify::new(),
                    };
                    (peer.clone(), Arc::new(pool))
                })
                .collect()
        };
        Self {
            settings,
            key_len,
            kme: kme.to_owned(),
            links,
        }
    }

    /// The settings from the manifest.
    pub fn settings(&self) -> PoolSettings {
        self.settings
    }

    /// Length in bytes of every ready key.
    pub fn key_len(&self) -> usize {
        self.key_len
    }

    /// Every link's pool.
    pub fn links(&self) -> impl Iterator<Item = &Arc<LinkPool>> {
        self.links.values()
    }

    /// `(level, target)` of the pool toward `peer`, or `None` when it has none.
    pub fn level(&self, peer: &str) -> Option<(u64, u64)> {
        self.links
            .get(peer)
            .map(|p| (p.level(), self.settings.target))
    }

    /// Reads every pool's ready keys back from the store, after a restart.
    pub async fn load(&self, store: &dyn KeyStore) -> Result<u64, StoreError> {
        let mut total = 0;
        for pool in self.links.values() {
            let ready = store.pool_list(&pool.name).await?;
            total += ready.len() as u64;
            // Reuses the list's allocation: a million IDs are not held twice.
            *pool.lock() = VecDeque::from(ready);
            self.gauge(pool);
        }
        Ok(total)
    }

    /// Takes `count` ready keys of `len` bytes for `peer`, all or none; `None` means the
    /// request is served on demand. Keys about to expire are dropped on the way (the
    /// store shreds them at both sites).
    pub fn take(&self, peer: &str, count: usize, len: usize, now: u64) -> Option<Vec<Uuid>> {
        let pool = self.links.get(peer)?;
        if len != self.key_len {
            return None;
        }
        let labels = [("kme", self.kme.clone()), ("peer", peer.to_owned())];
        let taken = {
            let mut queue = pool.lock();
            let fresh_after = now.saturating_add(EXPIRY_MARGIN_SECS);
            while queue.front().is_some_and(|(_, exp)| *exp <= fresh_after) {
                queue.pop_front();
            }
            (queue.len() >= count).then(|| queue.drain(..count).map(|(id, _)| id).collect())
        };
        let level = pool.level();
        if level <= self.settings.low_water {
            pool.wake.notify_one();
        }
        self.gauge(pool);
        match &taken {
            Some(_) => metrics::counter!("dqkd_pool_hits_total", &labels).increment(1),
            None => metrics::counter!("dqkd_pool_misses_total", &labels).increment(1),
        }
        taken
    }

    /// Empties the pool toward `peer` and returns what it held: when the peer no longer
    /// holds keys this site thinks are ready (it lost its store, say), the two views of the
    /// pool disagree and the pool starts over from fresh fills.
    pub fn discard(&self, peer: &str) -> Vec<Uuid> {
        let Some(pool) = self.links.get(peer) else {
            return Vec::new();
        };
        let stale: Vec<Uuid> = pool.lock().drain(..).map(|(id, _)| id).collect();
        pool.wake.notify_one();
        self.gauge(pool);
        stale
    }

    /// Publishes a pool's level.
    pub fn gauge(&self, pool: &LinkPool) {
        metrics::gauge!(
            "dqkd_pool_keys",
            "kme" => self.kme.clone(),
            "peer" => pool.peer.clone()
        )
        .set(pool.level() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(target: u64, low_water: u64) -> Pools {
        let settings = PoolSettings {
            target,
            low_water,
            ..PoolSettings::default()
        };
        Pools::new("A", settings, 32, &["B".to_owned()])
    }

    fn ids(n: usize, expires_at: u64) -> Vec<(Uuid, u64)> {
        (0..n).map(|_| (Uuid::new_v4(), expires_at)).collect()
    }

    #[test]
    fn takes_all_or_none_in_order() {
        let p = pools(10, 2);
        let ready = ids(5, 10_000);
        p.links["B"].push(ready.clone());
        assert_eq!(p.take("B", 6, 32, 0), None, "not enough: on demand");
        assert_eq!(p.level("B"), Some((5, 10)));
        let got = p.take("B", 3, 32, 0).expect("enough");
        assert_eq!(
            got,
            ready[..3].iter().map(|(id, _)| *id).collect::<Vec<_>>()
        );
        assert_eq!(p.level("B"), Some((2, 10)));
        assert_eq!(
            p.take("B", 1, 16, 0),
            None,
            "other sizes are made on demand"
        );
        assert_eq!(
            p.take("C", 1, 32, 0),
            None,
            "no pool toward an unknown site"
        );
    }

    #[test]
    fn keys_near_expiry_are_dropped() {
        let p = pools(10, 2);
        p.links["B"].push(ids(3, 1_000));
        p.links["B"].push(ids(2, 5_000));
        assert_eq!(
            p.take("B", 1, 32, 1_000 - EXPIRY_MARGIN_SECS)
                .map(|v| v.len()),
            Some(1)
        );
        assert_eq!(
            p.level("B"),
            Some((1, 10)),
            "three expiring keys were dropped"
        );
    }

    #[test]
    fn a_zero_target_means_no_pools() {
        let p = pools(0, 0);
        assert_eq!(p.level("B"), None);
        assert_eq!(p.take("B", 1, 32, 0), None);
        assert_eq!(p.links().count(), 0);
    }
}
