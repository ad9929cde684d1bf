//! Key metadata and the delivery rules shared by every store implementation.
//!
//! Keeping the authorisation and all-or-nothing checks in one pure function means the memory
//! store used by other crates' tests and the durable store cannot drift apart. Other store
//! implementations (such as the PostgreSQL one) use them through [`crate::rules`].

use std::collections::HashSet;

use uuid::Uuid;

use crate::TakeError;

/// One entitled slave and whether it already fetched the key.
///
/// The original slave list is kept (not just the remaining ones) so a second fetch by the same
/// slave is answered "not found" while a stranger is answered "unauthorised".
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlaveEntry {
    pub(crate) sae: String,
    pub(crate) taken: bool,
}

/// Everything about a stored key except its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMeta {
    pub(crate) master: String,
    pub(crate) expires_at: u64,
    pub(crate) slaves: Vec<SlaveEntry>,
}

impl KeyMeta {
    /// Builds the metadata of a fresh key: every distinct slave entitled, none served yet.
    pub fn new(master: &str, slaves: &[String], expires_at: u64) -> Self {
        // A key has a handful of slaves at most: a scan beats hashing, per key, on the
        // store's busiest path.
        let mut entries: Vec<SlaveEntry> = Vec::with_capacity(slaves.len());
        for s in slaves {
            if !entries.iter().any(|e| e.sae == *s) {
                entries.push(SlaveEntry {
                    sae: s.clone(),
                    taken: false,
                });
            }
        }
        let slaves = entries;
        KeyMeta {
            master: master.to_owned(),
            expires_at,
            slaves,
        }
    }

    /// SAE ID of the master the key was made for.
    pub fn master(&self) -> &str {
        &self.master
    }

    /// Unix seconds at which the key expires (`expires_at <= now` is expired).
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }

    /// Slaves that may still fetch the key.
    pub fn remaining(&self) -> impl Iterator<Item = &str> {
        self.slaves
            .iter()
            .filter(|s| !s.taken)
            .map(|s| s.sae.as_str())
    }

    /// Marks `caller` served; returns true when nobody is left and the key must be deleted.
    pub fn mark_taken(&mut self, caller: &str) -> bool {
        for s in &mut self.slaves {
            if s.sae == caller {
                s.taken = true;
            }
        }
        self.remaining().next().is_none()
    }
}

/// Decides a take request against the current metadata of each requested key (`metas[i]`
/// belongs to `ids[i]`; `None` = unknown). Nothing is changed here; the caller applies the
/// outcome only if this returns `Ok`.
///
/// Unauthorised wins over not-found so that a caller probing IDs it was never given learns
/// nothing about which of them were already delivered.
pub fn check_take(
    caller: &str,
    masters: &[String],
    ids: &[Uuid],
    metas: &[Option<&KeyMeta>],
    now: u64,
) -> Result<(), TakeError> {
    debug_assert_eq!(ids.len(), metas.len());
    for meta in metas.iter().flatten() {
        if meta.expires_at <= now {
            continue;
        }
        let master_ok = masters.contains(&meta.master);
        let slave_ok = meta.slaves.iter().any(|s| s.sae == caller);
        if !master_ok || !slave_ok {
            return Err(TakeError::Unauthorized);
        }
    }
    let mut seen = HashSet::with_capacity(ids.len());
    for (id, meta) in ids.iter().zip(metas) {
        if !seen.insert(id) {
            return Err(TakeError::NotFound);
        }
        let Some(meta) = meta else {
            return Err(TakeError::NotFound);
        };
        if meta.expires_at <= now {
            return Err(TakeError::NotFound);
        }
        if !meta.remaining().any(|s| s == caller) {
            return Err(TakeError::NotFound);
        }
    }
    Ok(())
}

/// Decides a destroy on behalf of the site whose SAEs are `masters`, against the current
/// metadata of each key it names (`None` = unknown): [`TakeError::Unauthorized`] if any key
/// is held for another master, expired or not, so that a site can shred only what its own
/// SAEs made. Unknown keys are skipped (a retry after they are gone succeeds).
pub fn check_destroy(masters: &[String], metas: &[Option<&KeyMeta>]) -> Result<(), TakeError> {
    if metas
        .iter()
        .flatten()
        .any(|meta| !masters.contains(&meta.master))
    {
        return Err(TakeError::Unauthorized);
    }
    Ok(())
}

/// Per-(master, slave) counts of keys the slave may still fetch.
///
/// Nested maps so a lookup needs no allocation.
#[derive(Debug, Default)]
pub struct PendingCounts {
    by_master: std::collections::HashMap<String, std::collections::HashMap<String, u64>>,
}

impl PendingCounts {
    /// Keys `slave` may still fetch from `master`.
    pub fn get(&self, master: &str, slave: &str) -> u64 {
        self.by_master
            .get(master)
            .and_then(|m| m.get(slave))
            .copied()
            .unwrap_or(0)
    }

    /// Counts every remaining slave of `meta` once more.
    pub fn add_key(&mut self, meta: &KeyMeta) {
        for s in meta.remaining() {
            self.add(&meta.master, s, 1);
        }
    }

    /// Forgets every remaining slave of `meta` (the key was deleted).
    pub fn remove_key(&mut self, meta: &KeyMeta) {
        for s in meta.remaining() {
            self.sub(&meta.master, s, 1);
        }
    }

    /// Adds `n` keys that `slave` may fetch from `master`. Allocates only for a pair not
    /// yet counted: this runs once per stored key, on the writer thread.
    pub fn add(&mut self, master: &str, slave: &str, n: u64) {
        let inner = match self.by_master.get_mut(master) {
            Some(inner) => inner,
            None => self.by_master.entry(master.to_owned()).or_default(),
        };
        match inner.get_mut(slave) {
            Some(count) => *count += n,
            None => {
                inner.insert(slave.to_owned(), n);
            }
        }
    }

    /// Removes `n` keys that `slave` may fetch from `master` (never below zero).
    pub fn sub(&mut self, master: &str, slave: &str, n: u64) {
        if let Some(inner) = self.by_master.get_mut(master) {
            if let Some(c) = inner.get_mut(slave) {
                *c = c.saturating_sub(n);
                if *c == 0 {
                    inner.remove(slave);
                }
            }
            if inner.is_empty() {
                self.by_master.remove(master);
            }
        }
    }
}

/// Checks a batch of new keys before anything is written: IDs unique within the batch and not
/// yet stored (`exists`), at least one slave, and every field small enough for the record
/// format, so both stores refuse exactly the same inputs.
pub fn check_insert<E>(
    keys: &[crate::NewKey],
    mut exists: impl FnMut(Uuid) -> Result<bool, E>,
) -> Result<Result<(), crate::StoreError>, E> {
    use crate::StoreError;
    let mut seen = HashSet::with_capacity(keys.len());
    for k in keys {
        let invalid = |reason| Ok(Err(StoreError::InvalidKey { id: k.id, reason }));
        if k.master.is_empty() {
            return invalid("empty master SAE ID");
        }
        if k.slaves.is_empty() || k.slaves.iter().any(String::is_empty) {
            return invalid("no slave SAE, or an empty slave SAE ID");
        }
        if k.material.is_empty() {
            return invalid("empty key material");
        }
        let max = usize::from(u16::MAX);
        if k.master.len() > max || k.slaves.len() > max || k.slaves.iter().any(|s| s.len() > max) {
            return invalid(crate::error::TOO_LONG);
        }
        if !seen.insert(k.id) || exists(k.id)? {
            return Ok(Err(StoreError::DuplicateId { id: k.id }));
        }
    }
    Ok(Ok(()))
}

/// Checks a batch of ready keys for the pool `link` before any is written: a non-empty link
/// name that fits the record format, non-empty key bytes, and slots whose positions and IDs
/// are distinct and new (`exists` says whether a slot's position is taken in that pool or its
/// ID is stored as an ordinary key).
pub fn check_pool_insert<E>(
    link: &str,
    keys: &[crate::PoolKey],
    mut exists: impl FnMut(crate::Slot) -> Result<bool, E>,
) -> Result<Result<(), crate::StoreError>, E> {
    use crate::StoreError;
    let mut seqs = HashSet::with_capacity(keys.len());
    let mut ids = HashSet::with_capacity(keys.len());
    for k in keys {
        let id = k.slot.id;
        let invalid = |reason| Ok(Err(StoreError::InvalidKey { id, reason }));
        if link.is_empty() {
            return invalid("empty pool link name");
        }
        if link.len() > usize::from(u16::MAX) {
            return invalid(crate::error::TOO_LONG);
        }
        if k.material.is_empty() {
            return invalid("empty key material");
        }
        if !seqs.insert(k.slot.seq) || !ids.insert(id) || exists(k.slot)? {
            return Ok(Err(StoreError::DuplicateId { id }));
        }
    }
    Ok(Ok(()))
}

/// Every slot a pool bind moves, in grant order; [`TakeError::NotFound`] if a position or an
/// ID repeats, so a store can check each against its pool and answer in this order.
pub fn pool_bind_slots(grants: &[crate::PoolGrant]) -> Result<Vec<crate::Slot>, TakeError> {
    let mut seqs = HashSet::new();
    let mut ids = HashSet::new();
    let mut slots = Vec::new();
    for slot in grants.iter().flat_map(|g| &g.slots) {
        if !seqs.insert(slot.seq) || !ids.insert(slot.id) {
            return Err(TakeError::NotFound);
        }
        slots.push(*slot);
    }
    Ok(slots)
}

/// The ordinary keys a pool bind creates (grants with slaves), given each moved key's bytes.
pub fn pool_bound_keys(
    grants: &[crate::PoolGrant],
    mut material: impl FnMut(Uuid) -> Option<crate::KeyMaterial>,
) -> Result<Vec<crate::NewKey>, TakeError> {
    let mut keys = Vec::new();
    for g in grants.iter().filter(|g| !g.slaves.is_empty()) {
        for slot in &g.slots {
            keys.push(crate::NewKey {
                id: slot.id,
                master: g.master.clone(),
                slaves: g.slaves.clone(),
                material: material(slot.id).ok_or(TakeError::NotFound)?,
                expires_at: g.expires_at,
            });
        }
    }
    Ok(keys)
}

/// The first position a pool page starting after `after` may hold (`None`: nothing can
/// follow `after`).
pub fn first_position_after(after: Option<u64>) -> Option<u64> {
    after.map_or(Some(0), |seq| seq.checked_add(1))
}
