//! An in-memory [`KeyStore`] with exactly the rules of the durable one, for tests of other
//! crates (nothing survives a restart).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use uuid::Uuid;

use crate::meta::{check_insert, check_take, KeyMeta, PendingCounts};
use crate::{DeliveredKey, KeyMaterial, KeyStore, NewKey, StoreError, TakeError};

/// In-memory key store behind one mutex.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    keys: HashMap<Uuid, (KeyMeta, KeyMaterial)>,
    pending: PendingCounts,
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

#[async_trait::async_trait]
impl KeyStore for MemoryStore {
    async fn insert(&self, keys: Vec<NewKey>) -> Result<(), StoreError> {
        let mut inner = self.lock();
        check_insert(&keys, |id| {
            Ok::<_, StoreError>(inner.keys.contains_key(&id))
        })??;
        for k in keys {
            let meta = KeyMeta::new(&k.master, &k.slaves, k.expires_at);
            inner.pending.add_key(&meta);
            inner.keys.insert(k.id, (meta, k.material));
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
        let Inner { keys, pending } = &mut *inner;
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
        let Inner { keys, pending } = &mut *inner;
        let before = keys.len();
        keys.retain(|_, (meta, _)| {
            let keep = meta.expires_at > now;
            if !keep {
                pending.remove_key(meta);
            }
            keep
        });
        Ok(u64::try_from(before - keys.len()).unwrap_or(u64::MAX))
    }

    async fn destroy(&self, ids: &[Uuid]) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let Inner { keys, pending } = &mut *inner;
        let mut count = 0;
        for id in ids {
            if let Some((meta, _)) = keys.remove(id) {
                pending.remove_key(&meta);
                count += 1;
            }
        }
        Ok(count)
    }
}
