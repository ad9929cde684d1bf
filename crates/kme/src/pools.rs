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
    /// Held while a pool is read from the store and while in-doubt positions are settled, so
    /// that a position settled as ready is either read by the load or put back after it.
    settling: tokio::sync::Mutex<()>,
}

/// The ready keys of one link and the signal that wakes its refill task.
pub struct LinkPool {
    peer: String,
    name: String,
    ready: Mutex<Queue>,
    /// Ready keys taken out of the pool to be settled with the peer (see [`Pools::drain`]).
    doubt: Mutex<Vec<Slot>>,
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
    /// Whether this process holds the pool (loaded it and has not discarded it since): only
    /// then may settled positions be put back.
    live: bool,
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

    /// Removes every key, with its expiry.
    fn drain_with_expiry(&mut self) -> Vec<(Slot, u64)> {
        let runs: Vec<Run> = self.runs.iter().copied().collect();
        let slots = self.clear();
        let expiries = runs
            .iter()
            .flat_map(|r| std::iter::repeat_n(r.expires_at, r.count));
        slots.into_iter().zip(expiries).collect()
    }

    /// Puts keys back in position order, skipping positions already held.
    fn merge(&mut self, mut back: Vec<(Slot, u64)>) {
        back.sort_unstable_by_key(|(slot, _)| slot.seq);
        let mut held = self.drain_with_expiry();
        let known: HashSet<u64> = held.iter().map(|(s, _)| s.seq).collect();
        back.retain(|(slot, _)| !known.contains(&slot.seq));
        back.dedup_by_key(|(slot, _)| slot.seq);
        held.extend(back);
        held.sort_unstable_by_key(|(slot, _)| slot.seq);
        for (slot, expires_at) in held {
            self.push([slot], expires_at);
        }
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

    /// The ready keys waiting to be settled with the peer, which leave the list.
    pub fn take_doubt(&self) -> Vec<Slot> {
        std::mem::take(&mut *self.doubt.lock().unwrap_or_else(PoisonError::into_inner))
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
                        doubt: Mutex::new(Vec::new()),
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
            settling: tokio::sync::Mutex::new(()),
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
    /// left out until the claim holder of those records has settled them with the peer
    /// ([`Pools::settle`] puts back those the peer still holds), so no bind names them
    /// meanwhile.
    pub async fn load(&self, pool: &LinkPool, store: &dyn KeyStore) -> Result<u64, StoreError> {
        const PAGE: usize = 65_536;
        let _settling = self.settling.lock().await;
        let doubt: HashSet<u64> = store
            .in_flight(&self.owner)
            .await?
            .into_iter()
            .filter(|r| r.sites.len() == 1 && r.sites[0] == pool.peer)
            .flat_map(|r| r.ready)
            .collect();
        let mut queue = Queue {
            live: true,
            ..Queue::default()
        };
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

    /// Empties the pool toward `peer` and returns what it held, when another process of this
    /// site has taken the pool over: this one stops handing its keys out, and settles none
    /// back into it until it loads the pool again.
    pub fn discard(&self, peer: &str) -> Vec<Slot> {
        let Some(pool) = self.links.get(peer) else {
            return Vec::new();
        };
        let stale = {
            let mut queue = pool.lock();
            queue.live = false;
            queue.clear()
        };
        pool.wake.notify_one();
        self.gauge(pool);
        stale
    }

    /// Takes every ready key toward `peer` out of the pool, with `also` (keys of a bind the
    /// peer refused), into the list its refill task settles with the peer
    /// ([`LinkPool::take_doubt`]); meanwhile no bind can name them, so settling them cannot
    /// undo a bind. Returns how many are in doubt.
    pub fn drain(&self, peer: &str, also: &[Slot]) -> usize {
        let Some(pool) = self.links.get(peer) else {
            return 0;
        };
        let drained = pool.lock().clear();
        let count = {
            let mut doubt = pool.doubt.lock().unwrap_or_else(PoisonError::into_inner);
            doubt.extend(drained);
            doubt.extend_from_slice(also);
            doubt.len()
        };
        pool.wake.notify_one();
        self.gauge(pool);
        count
    }

    /// Returns settled ready keys to the pool toward `peer` in position order, if this
    /// process still holds it (else whoever holds it reads them from the store).
    fn put_back(&self, peer: &str, keys: Vec<(Slot, u64)>) {
        let Some(pool) = self.links.get(peer) else {
            return;
        };
        {
            let mut queue = pool.lock();
            if !queue.live {
                return;
            }
            queue.merge(keys);
        }
        self.gauge(pool);
    }

    /// Settles positions of an unanswered bind toward `peer` as ready: `forget` (which
    /// deletes the bind's in-flight record) runs while no load of the pool is under way, and
    /// the positions go back into the pool if this process holds it; a later load reads them
    /// since no record names them any more.
    pub async fn settle<F>(
        &self,
        peer: &str,
        store: &dyn KeyStore,
        seqs: &[u64],
        forget: F,
    ) -> Result<(), StoreError>
    where
        F: std::future::Future<Output = Result<(), StoreError>>,
    {
        let _settling = self.settling.lock().await;
        forget.await?;
        let (Some(pool), Some(&first), Some(&last)) =
            (self.links.get(peer), seqs.iter().min(), seqs.iter().max())
        else {
            return Ok(());
        };
        if !pool.lock().live {
            return Ok(());
        }
        let wanted: HashSet<u64> = seqs.iter().copied().collect();
        let mut back = Vec::with_capacity(seqs.len());
        let mut after = first.checked_sub(1);
        'pages: loop {
            let page = store.pool_page(&pool.name, after, 4_096).await?;
            for key in &page {
                if key.slot.seq > last {
                    break 'pages;
                }
                if wanted.contains(&key.slot.seq) {
                    back.push((key.slot, key.expires_at));
                }
                after = Some(key.slot.seq);
            }
            if page.len() < 4_096 {
                break;
            }
        }
        self.put_back(peer, back);
        Ok(())
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
mod tests;
