//! Ready-key pools: per peer site, keys this site generated ahead of demand and the peer
//! has already regenerated and stored (a `fill`). An enc_keys request for that peer takes
//! keys from the pool and needs one `bind` round trip to name their SAEs, with no entropy
//! server on its path. A refill task per link keeps each pool between its low-water mark
//! and its target, in large batches.
//!
//! Every ready key has a position in its link's fill order, chosen here and stored at both
//! sites, and keys leave in that order: both stores keep pools by position, so a bind takes
//! from one end of the table and a refill appends at the other.
//!
//! The pool's contents live in the key store (so they survive a restart at both sites);
//! this module keeps only the IDs in the order they are handed out, plus the first position
//! and the expiry of each fill, so a million ready keys cost about 16 MiB here.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use dqkd_pki::Name;
use dqkd_store::{KeyStore, Slot, StoreError};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::config::PoolSettings;

/// Ready keys closer than this to their expiry are not handed out: the peer must still
/// hold them when the bind arrives, whatever the clocks and queues in between.
pub const EXPIRY_MARGIN_SECS: u64 = 60;

/// The store's name for the pool of keys `origin` made for `peer`, or, when `origin` runs
/// several replicas that each keep a pool, for the pool of its replica `replica`. Both sites
/// use the same name, so a key is filed identically at both ends. `replica` is a [`Name`]
/// (a peer's message is refused before it gets here otherwise), and neither `>` nor `@` can
/// occur in one, so a peer cannot name a pool that mimics another.
pub fn link_name(origin: &str, peer: &str, replica: Option<&Name>) -> String {
    match replica {
        None => format!("{origin}>{peer}"),
        Some(replica) => format!("{origin}>{peer}@{replica}"),
    }
}

/// The ready-key pools of this site, one per peer site.
pub struct Pools {
    settings: PoolSettings,
    key_len: usize,
    kme: String,
    /// Owner of this process's in-flight records (its replica name, or empty).
    owner: String,
    links: BTreeMap<String, Arc<LinkPool>>,
}

/// The ready keys of one link and the signal that wakes its refill task.
pub struct LinkPool {
    peer: String,
    name: String,
    ready: Mutex<Queue>,
    wake: Notify,
}

/// Ready keys in the order they are handed out (position order). A fill's keys have
/// consecutive positions and one expiry, so positions and expiries are kept once per run of
/// such keys and only the IDs per key: 16 bytes a key.
#[derive(Default)]
struct Queue {
    ids: VecDeque<Uuid>,
    /// Runs covering `ids` front to back.
    runs: VecDeque<Run>,
    /// The lowest position the next fill may use: past every position ever used here.
    next_seq: u64,
}

/// Keys with consecutive positions from `first_seq` and one expiry.
#[derive(Debug, Clone, Copy)]
struct Run {
    first_seq: u64,
    count: usize,
    expires_at: u64,
}

impl Queue {
    fn len(&self) -> usize {
        self.ids.len()
    }

    fn push(&mut self, slots: impl IntoIterator<Item = Slot>, expires_at: u64) {
        for slot in slots {
            self.next_seq = self.next_seq.max(slot.seq.saturating_add(1));
            self.ids.push_back(slot.id);
            match self.runs.back_mut() {
                Some(run)
                    if run.expires_at == expires_at
                        && run.first_seq.checked_add(run.count as u64) == Some(slot.seq) =>
                {
                    run.count += 1
                }
                _ => self.runs.push_back(Run {
                    first_seq: slot.seq,
                    count: 1,
                    expires_at,
                }),
            }
        }
    }

    /// Drops keys from the front while they expire at or before `deadline`.
    fn drop_expiring(&mut self, deadline: u64) {
        while let Some(run) = self.runs.front() {
            if run.expires_at > deadline {
                break;
            }
            self.ids.drain(..run.count.min(self.ids.len()));
            self.runs.pop_front();
        }
    }

    /// Removes the first `count` keys (there must be that many).
    fn take_front(&mut self, count: usize) -> Vec<Slot> {
        let mut taken = Vec::with_capacity(count);
        while taken.len() < count {
            let Some(run) = self.runs.front_mut() else {
                break;
            };
            let n = run.count.min(count - taken.len());
            for (i, id) in self.ids.drain(..n).enumerate() {
                taken.push(Slot {
                    seq: run.first_seq + i as u64,
                    id,
                });
            }
            run.first_seq += n as u64;
            run.count -= n;
            if run.count == 0 {
                self.runs.pop_front();
            }
        }
        taken
    }

    fn clear(&mut self) -> Vec<Slot> {
        let count = self.len();
        self.take_front(count)
    }
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

    /// Reserves `count` positions for a fill: they follow every position used so far and
    /// are at least the current time in nanoseconds, so a site that lost its pool (and its
    /// memory of positions) still never reuses a position its peer may hold.
    pub fn reserve(&self, count: usize) -> u64 {
        let mut queue = self.lock();
        let first = queue.next_seq.max(unix_nanos());
        queue.next_seq = first.saturating_add(count as u64);
        first
    }

    /// Adds freshly filled keys, all expiring at `expires_at`, at the back.
    pub fn push(&self, slots: impl IntoIterator<Item = Slot>, expires_at: u64) {
        self.lock().push(slots, expires_at);
    }

    /// Waits until a take lowers the pool (or another reason to look again).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Pools {
    /// Empty pools for `peers`, or none at all when the settings turn pools off. With a
    /// `replica` name the pools are this replica's own (see [`link_name`]).
    pub fn new<'a>(
        kme: &str,
        replica: Option<&Name>,
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
                        name: link_name(kme, peer, replica),
                        ready: Mutex::new(Queue::default()),
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
            owner: replica.map(Name::to_string).unwrap_or_default(),
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

    /// Reads one pool's ready keys back from the store (after a restart, or once this
    /// process claims the pool), a page at a time: a full listing of a million keys would
    /// briefly cost more than the pool. Returns how many.
    ///
    /// Positions named by an in-flight bind of this process's name are in doubt: a holder
    /// killed mid-bind may have had them bound at the peer, which commits first. They are
    /// left out (the claim holder of those records withdraws them at both sites), so the
    /// next bind never names them, meets a 409 and discards the whole pool.
    pub async fn load(&self, pool: &LinkPool, store: &dyn KeyStore) -> Result<u64, StoreError> {
        const PAGE: usize = 65_536;
        let doubt: HashSet<u64> = store
            .in_flight(&self.owner)
            .await?
            .into_iter()
            .filter(|r| r.sites.len() == 1 && r.sites[0] == pool.peer)
            .flat_map(|r| r.ready)
            .collect();
        let mut queue = Queue::default();
        let mut after = None;
        let mut skipped = 0u64;
        loop {
            let page = store.pool_page(&pool.name, after, PAGE).await?;
            for key in &page {
                after = Some(key.slot.seq);
                if doubt.contains(&key.slot.seq) {
                    // Never reused by a refill either.
                    queue.next_seq = queue.next_seq.max(key.slot.seq.saturating_add(1));
                    skipped += 1;
                } else {
                    queue.push([key.slot], key.expires_at);
                }
            }
            if page.len() < PAGE {
                break;
            }
        }
        if skipped > 0 {
            tracing::warn!(
                peer = pool.peer,
                skipped,
                "ready keys of a bind left unanswered are in doubt; not handing them out"
            );
        }
        let total = queue.len() as u64;
        *pool.lock() = queue;
        self.gauge(pool);
        Ok(total)
    }

    /// Takes `count` ready keys of `len` bytes for `peer`, oldest first, all or none; `None`
    /// means the request is served on demand. Keys about to expire are dropped on the way
    /// (the store shreds them at both sites).
    pub fn take(&self, peer: &str, count: usize, len: usize, now: u64) -> Option<Vec<Slot>> {
        let pool = self.links.get(peer)?;
        if len != self.key_len {
            return None;
        }
        let labels = [("kme", self.kme.clone()), ("peer", peer.to_owned())];
        let taken = {
            let mut queue = pool.lock();
            queue.drop_expiring(now.saturating_add(EXPIRY_MARGIN_SECS));
            (queue.len() >= count).then(|| queue.take_front(count))
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
    /// pool disagree and the pool starts over from fresh fills; and when another process of
    /// this site has taken the pool over, this one stops handing its keys out.
    pub fn discard(&self, peer: &str) -> Vec<Slot> {
        let Some(pool) = self.links.get(peer) else {
            return Vec::new();
        };
        let stale = pool.lock().clear();
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
        Pools::new("A", None, settings, 32, &["B".to_owned()])
    }

    fn fill(p: &Pools, n: usize, expires_at: u64) -> Vec<Slot> {
        let pool = &p.links["B"];
        let first = pool.reserve(n);
        let slots: Vec<Slot> = (0..n as u64)
            .map(|i| Slot {
                seq: first + i,
                id: Uuid::new_v4(),
            })
            .collect();
        pool.push(slots.clone(), expires_at);
        slots
    }

    #[test]
    fn takes_all_or_none_in_order() {
        let p = pools(10, 2);
        let ready = fill(&p, 5, 10_000);
        assert_eq!(p.take("B", 6, 32, 0), None, "not enough: on demand");
        assert_eq!(p.level("B"), Some((5, 10)));
        let got = p.take("B", 3, 32, 0).expect("enough");
        assert_eq!(got, ready[..3]);
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
        assert_eq!(p.discard("B"), ready[3..]);
        assert_eq!(p.level("B"), Some((0, 10)));
    }

    #[test]
    fn keys_near_expiry_are_dropped() {
        let p = pools(10, 2);
        fill(&p, 3, 1_000);
        let later = fill(&p, 2, 5_000);
        assert_eq!(
            p.take("B", 1, 32, 1_000 - EXPIRY_MARGIN_SECS),
            Some(later[..1].to_vec())
        );
        assert_eq!(
            p.level("B"),
            Some((1, 10)),
            "three expiring keys were dropped"
        );
    }

    #[test]
    fn takes_across_fills_keep_expiries_aligned() {
        let p = pools(10, 2);
        let first = fill(&p, 3, 1_000);
        let second = fill(&p, 3, 5_000);
        assert_eq!(
            p.take("B", 4, 32, 0),
            Some([&first[..], &second[..1]].concat())
        );
        // The remaining two belong to the second fill: they survive the first's expiry.
        assert_eq!(p.take("B", 2, 32, 2_000), Some(second[1..].to_vec()));
    }

    #[test]
    fn positions_come_back_as_stored() {
        let p = pools(10, 2);
        let pool = &p.links["B"];
        let slots: Vec<Slot> = [3, 4, 9, 10, 11]
            .map(|seq| Slot {
                seq,
                id: Uuid::new_v4(),
            })
            .into();
        pool.push(slots[..4].iter().copied(), 7_000);
        pool.push(slots[4..].iter().copied(), 8_000);
        assert_eq!(p.take("B", 3, 32, 0), Some(slots[..3].to_vec()));
        assert_eq!(p.discard("B"), slots[3..]);
        assert!(pool.reserve(1) > 11, "after every position held");
    }

    #[test]
    fn positions_never_repeat() {
        let p = pools(10, 2);
        let pool = &p.links["B"];
        let a = pool.reserve(5);
        let b = pool.reserve(5);
        assert!(b >= a + 5, "{a} then {b}");
        assert!(
            a >= unix_nanos() - 60_000_000_000,
            "positions start at the clock"
        );
        // A pool loaded with a position from the future continues after it.
        pool.push(
            [Slot {
                seq: u64::MAX / 2,
                id: Uuid::new_v4(),
            }],
            9,
        );
        assert_eq!(pool.reserve(1), u64::MAX / 2 + 1);
    }

    #[test]
    fn each_replica_has_a_pool_name_of_its_own() {
        let r = |s: &str| s.parse::<Name>().expect("name");
        let names = [
            link_name("A", "B", None),
            link_name("A", "B", Some(&r("r1"))),
            link_name("A", "B", Some(&r("r2"))),
            link_name("B", "A", Some(&r("r1"))),
        ];
        for (i, a) in names.iter().enumerate() {
            for b in &names[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(names[1], "A>B@r1");
        // What once had to be refused here cannot be a Name at all.
        for bad in ["", "r1@x", "r1>B", "a b", &"r".repeat(65)] {
            assert!(bad.parse::<Name>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_zero_target_means_no_pools() {
        let p = pools(0, 0);
        assert_eq!(p.level("B"), None);
        assert_eq!(p.take("B", 1, 32, 0), None);
        assert_eq!(p.links().count(), 0);
    }

    /// A holder killed mid-bind left an in-flight record: the next holder must not hand
    /// those positions out (the peer may have bound them), and only those.
    #[tokio::test]
    async fn positions_of_an_unanswered_bind_are_not_reloaded() {
        use dqkd_store::{InFlight, KeyMaterial, MemoryStore, PoolKey};
        let store = MemoryStore::new();
        let p = Pools::new(
            "A",
            Some(&"a1".parse().expect("name")),
            pools(10, 2).settings(),
            32,
            &["B".to_owned()],
        );
        let pool = &p.links["B"];
        let slots: Vec<Slot> = (100..110)
            .map(|seq| Slot {
                seq,
                id: Uuid::new_v4(),
            })
            .collect();
        let keys = slots.iter().map(|&slot| PoolKey {
            slot,
            material: KeyMaterial::new(vec![7; 32]),
            expires_at: u64::MAX / 2,
        });
        store
            .pool_insert(pool.name(), keys.collect())
            .await
            .unwrap();
        let record = |owner: &str, sites: &[&str], ready: &[u64]| InFlight {
            request_id: Uuid::new_v4(),
            owner: owner.into(),
            sites: sites.iter().map(|s| s.to_string()).collect(),
            key_ids: vec![Uuid::new_v4()],
            ready: ready.to_vec(),
        };
        // This replica's bind toward B of 100..=101; another replica's and another site's
        // records do not make positions of this pool doubtful.
        for r in [
            record("a1", &["B"], &[100, 101]),
            record("a2", &["B"], &[102]),
            record("a1", &["C"], &[103]),
        ] {
            store.record_in_flight(r).await.unwrap();
        }
        assert_eq!(p.load(pool, &store).await.unwrap(), 8);
        assert_eq!(p.take("B", 8, 32, 0), Some(slots[2..].to_vec()));
        assert!(pool.reserve(1) > 109, "positions are never reused");
    }
}
