//! An in-memory [`KeyStore`] with exactly the rules of the durable one, for tests of other
//! crates (nothing survives a restart).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use uuid::Uuid;

use crate::meta::{
    check_destroy, check_insert, check_pool_insert, check_take, pool_bind_slots, pool_bound_keys,
    KeyMeta, PendingCounts,
};
use crate::{
    DeliveredKey, InFlight, KeyMaterial, KeyStore, NewKey, PoolGrant, PoolKey, ReadyKey, Slot,
    StoreError, TakeError,
};

/// In-memory key store behind one mutex.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    keys: HashMap<Uuid, (KeyMeta, KeyMaterial)>,
    pending: PendingCounts,
    /// Ready keys: (link, position) → (ID, expiry, bytes).
    pool: BTreeMap<(String, u64), (Uuid, u64, KeyMaterial)>,
    /// In-flight records by request ID.
    in_flight: HashMap<Uuid, InFlight>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every mutation validates before it changes anything, so the state behind a poisoned
    /// lock is still consistent and can be used.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    /// Removes these ordinary keys; returns how many existed.
    fn destroy(&mut self, ids: &[Uuid]) -> u64 {
        let mut count = 0;
        for id in ids {
            if let Some((meta, _)) = self.keys.remove(id) {
                self.pending.remove_key(&meta);
                count += 1;
            }
        }
        count
    }
}

#[async_trait::async_trait]
impl KeyStore for MemoryStore {
    async fn insert_answering(
        &self,
        keys: Vec<NewKey>,
        answered: Option<Uuid>,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        check_insert(&keys, |id| {
            Ok::<_, StoreError>(inner.keys.contains_key(&id))
        })??;
        for k in keys {
            let meta = KeyMeta::new(&k.master, &k.slaves, k.expires_at);
            inner.pending.add_key(&meta);
            inner.keys.insert(k.id, (meta, k.material));
        }
        if let Some(id) = answered {
            inner.in_flight.remove(&id);
        }
        Ok(())
    }

    async fn take(
        &self,
        caller: &str,
        masters: &[String],
        ids: &[Uuid],
        now: u64,
    ) -> Result<Vec<DeliveredKey>, TakeError> {
        let mut inner = self.lock();
        {
            let metas: Vec<Option<&KeyMeta>> = ids
                .iter()
                .map(|id| inner.keys.get(id).map(|(m, _)| m))
                .collect();
            check_take(caller, masters, ids, &metas, now)?;
        }
        let mut out = Vec::with_capacity(ids.len());
        let Inner { keys, pending, .. } = &mut *inner;
        for id in ids {
            let Some((meta, material)) = keys.get_mut(id) else {
                // check_take saw every id present, and we hold the lock.
                return Err(TakeError::NotFound);
            };
            out.push(DeliveredKey {
                id: *id,
                material: material.clone(),
            });
            pending.sub(&meta.master, caller, 1);
            if meta.mark_taken(caller) {
                keys.remove(id);
            }
        }
        Ok(out)
    }

    fn pending(&self, master: &str, slave: &str) -> u64 {
        self.lock().pending.get(master, slave)
    }

    async fn purge_expired(&self, now: u64) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let Inner {
            keys,
            pending,
            pool,
            ..
        } = &mut *inner;
        let before = keys.len() + pool.len();
        keys.retain(|_, (meta, _)| {
            let keep = meta.expires_at > now;
            if !keep {
                pending.remove_key(meta);
            }
            keep
        });
        pool.retain(|_, (_, expires_at, _)| *expires_at > now);
        Ok(u64::try_from(before - keys.len() - pool.len()).unwrap_or(u64::MAX))
    }

    async fn destroy(&self, ids: &[Uuid]) -> Result<u64, StoreError> {
        Ok(self.lock().destroy(ids))
    }

    async fn destroy_of(&self, masters: &[String], ids: &[Uuid]) -> Result<u64, TakeError> {
        let mut inner = self.lock();
        {
            let metas: Vec<Option<&KeyMeta>> = ids
                .iter()
                .map(|id| inner.keys.get(id).map(|(m, _)| m))
                .collect();
            check_destroy(masters, &metas)?;
        }
        Ok(inner.destroy(ids))
    }

    async fn pool_insert(&self, link: &str, keys: Vec<PoolKey>) -> Result<(), StoreError> {
        let mut inner = self.lock();
        check_pool_insert(link, &keys, |slot| {
            Ok::<_, StoreError>(
                inner.keys.contains_key(&slot.id)
                    || inner.pool.contains_key(&(link.to_owned(), slot.seq)),
            )
        })??;
        for k in keys {
            inner.pool.insert(
                (link.to_owned(), k.slot.seq),
                (k.slot.id, k.expires_at, k.material),
            );
        }
        Ok(())
    }

    async fn pool_bind_answering(
        &self,
        link: &str,
        grants: Vec<PoolGrant>,
        now: u64,
        answered: Option<Uuid>,
    ) -> Result<Vec<DeliveredKey>, TakeError> {
        let mut inner = self.lock();
        let slots = pool_bind_slots(&grants)?;
        let mut delivered = Vec::with_capacity(slots.len());
        for slot in &slots {
            match inner.pool.get(&(link.to_owned(), slot.seq)) {
                Some((id, expires_at, material)) if *id == slot.id && *expires_at > now => {
                    delivered.push(DeliveredKey {
                        id: *id,
                        material: material.clone(),
                    })
                }
                _ => return Err(TakeError::NotFound),
            }
        }
        let by_id: HashMap<Uuid, KeyMaterial> = delivered
            .iter()
            .map(|d| (d.id, d.material.clone()))
            .collect();
        let bound = pool_bound_keys(&grants, |id| by_id.get(&id).cloned())?;
        check_insert(&bound, |id| {
            Ok::<_, StoreError>(inner.keys.contains_key(&id))
        })
        .map_err(TakeError::Store)?
        .map_err(TakeError::Store)?;
        for slot in &slots {
            inner.pool.remove(&(link.to_owned(), slot.seq));
        }
        for k in bound {
            let meta = KeyMeta::new(&k.master, &k.slaves, k.expires_at);
            inner.pending.add_key(&meta);
            inner.keys.insert(k.id, (meta, k.material));
        }
        if let Some(id) = answered {
            inner.in_flight.remove(&id);
        }
        Ok(delivered)
    }

    async fn record_in_flight(&self, request: InFlight) -> Result<(), StoreError> {
        self.lock().in_flight.insert(request.request_id, request);
        Ok(())
    }

    async fn in_flight(&self, owner: &str) -> Result<Vec<InFlight>, StoreError> {
        Ok(self
            .lock()
            .in_flight
            .values()
            .filter(|r| r.owner == owner)
            .cloned()
            .collect())
    }

    async fn forget_in_flight(&self, request_ids: &[Uuid]) -> Result<(), StoreError> {
        let mut inner = self.lock();
        for id in request_ids {
            inner.in_flight.remove(id);
        }
        Ok(())
    }

    async fn pool_remove(&self, link: &str, seqs: &[u64]) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let mut count = 0;
        for seq in seqs {
            if inner.pool.remove(&(link.to_owned(), *seq)).is_some() {
                count += 1;
            }
        }
        Ok(count)
    }

    async fn pool_page(
        &self,
        link: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<ReadyKey>, StoreError> {
        let Some(from) = crate::meta::first_position_after(after) else {
            return Ok(Vec::new());
        };
        Ok(self
            .lock()
            .pool
            .range((link.to_owned(), from)..=(link.to_owned(), u64::MAX))
            .take(limit)
            .map(|((_, seq), (id, expires_at, _))| ReadyKey {
                slot: Slot { seq: *seq, id: *id },
                expires_at: *expires_at,
            })
            .collect())
    }
}
