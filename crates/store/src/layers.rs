//! The store as one batch of the writer sees it: the active overlay it writes to, over the
//! frozen overlay being checkpointed, over redb (see `overlay`). Reads ask the newest layer
//! first; every write goes to the active overlay and is recorded for the write-ahead log in
//! the same step, so the two cannot drift apart.

use uuid::Uuid;

use crate::expiry::Seen;
use crate::overlay::Overlay;
use crate::schema::Base;
use crate::wal::Batch;
use crate::StoreError;

/// The store as one batch sees it: the active overlay it writes to, over the frozen one
/// being checkpointed, over redb. Every write goes through it, so that it is also recorded
/// for the write-ahead log.
pub(crate) struct Layers<'a> {
    pub(crate) active: &'a mut Overlay,
    pub(crate) frozen: Option<&'a Overlay>,
    pub(crate) base: &'a Base,
    pub(crate) changes: &'a mut Batch,
    /// Lifetimes of the keys and ready keys written, for the expiry sweeps (see `expiry`).
    pub(crate) lifetimes: Seen,
    pub(crate) ready_lifetimes: Seen,
}

impl Layers<'_> {
    /// The encoded record of ordinary key `id`, from the newest layer that knows it.
    pub(crate) fn key(&self, id: Uuid) -> Result<Option<Vec<u8>>, StoreError> {
        let id = id.as_u128();
        if let Some(v) = self.active.keys.get(id) {
            return Ok(v.map(<[u8]>::to_vec));
        }
        if let Some(v) = self.frozen.and_then(|f| f.keys.get(id)) {
            return Ok(v.map(<[u8]>::to_vec));
        }
        Ok(self
            .base
            .keys
            .get(id)
            .map_err(read_error)?
            .map(|g| g.value().to_vec()))
    }

    /// Whether `id` is stored as an ordinary key.
    pub(crate) fn has_key(&self, id: Uuid) -> Result<bool, StoreError> {
        self.has_key_with(id, true)
    }

    /// Whether `id` is stored as an ordinary key, reading redb only if `in_base` (the
    /// caller knows redb has none in a range holding `id`).
    pub(crate) fn has_key_with(&self, id: Uuid, in_base: bool) -> Result<bool, StoreError> {
        let raw = id.as_u128();
        if let Some(v) = self.active.keys.get(raw) {
            return Ok(v.is_some());
        }
        if let Some(v) = self.frozen.and_then(|f| f.keys.get(raw)) {
            return Ok(v.is_some());
        }
        if !in_base {
            return Ok(false);
        }
        Ok(self.base.keys.get(raw).map_err(read_error)?.is_some())
    }

    /// Whether redb holds no ordinary key with an ID in `lo..=hi`. New version 7 IDs made
    /// together fall past every key already filed, so one lookup answers for a whole batch
    /// that would otherwise take one per key.
    pub(crate) fn base_has_no_key_in(&self, lo: u128, hi: u128) -> Result<bool, StoreError> {
        match self.base.keys.range(lo..=hi).map_err(read_error)?.next() {
            None => Ok(true),
            Some(Ok(_)) => Ok(false),
            Some(Err(e)) => Err(read_error(e)),
        }
    }

    /// The value at position `seq` of the pool of `link`, from the newest layer that
    /// knows it.
    pub(crate) fn ready(&self, link: &str, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.active.pool(link).and_then(|p| p.get(seq)) {
            return Ok(v.map(<[u8]>::to_vec));
        }
        if let Some(v) = self
            .frozen
            .and_then(|f| f.pool(link))
            .and_then(|p| p.get(seq))
        {
            return Ok(v.map(<[u8]>::to_vec));
        }
        Ok(self
            .base
            .ready
            .get((link, seq))
            .map_err(read_error)?
            .map(|g| g.value().to_vec()))
    }

    /// Writes a key record (which expires at `expires_at`); `new` says the caller found no
    /// key `id` stored.
    pub(crate) fn put_key(
        &mut self,
        id: Uuid,
        value: Vec<u8>,
        new: bool,
        expires_at: u64,
    ) -> Result<(), StoreError> {
        self.changes
            .put_key(id.as_u128(), &value)
            .map_err(log_error)?;
        // Every write, rewrites included: a sweep may skip keys only by the expiry stored.
        self.lifetimes.note(id.as_u128(), expires_at);
        self.active.keys.put(id.as_u128(), value, new);
        Ok(())
    }

    /// Deletes a key record the caller just read (every caller has), so no second lookup.
    pub(crate) fn del_key(&mut self, id: Uuid) -> Result<(), StoreError> {
        self.changes.del_key(id.as_u128()).map_err(log_error)?;
        self.active.keys.delete(id.as_u128());
        Ok(())
    }

    /// Writes a ready key (which expires at `expires_at`) into a position the caller found
    /// empty.
    pub(crate) fn put_new_ready(
        &mut self,
        link: &str,
        seq: u64,
        value: Vec<u8>,
        expires_at: u64,
    ) -> Result<(), StoreError> {
        self.changes
            .put_ready(link, seq, &value)
            .map_err(log_error)?;
        self.ready_lifetimes.note_position(seq, expires_at);
        self.active.pool_mut(link).put(seq, value, true);
        Ok(())
    }

    /// Whether request `id` has an in-flight record.
    pub(crate) fn has_in_flight(&self, id: Uuid) -> Result<bool, StoreError> {
        let raw = id.as_u128();
        if let Some(v) = self.active.in_flight.get(raw) {
            return Ok(v.is_some());
        }
        if let Some(v) = self.frozen.and_then(|f| f.in_flight.get(raw)) {
            return Ok(v.is_some());
        }
        Ok(self.base.in_flight.get(raw).map_err(read_error)?.is_some())
    }

    /// Writes the in-flight record of request `id` (replacing one it may have).
    pub(crate) fn put_in_flight(&mut self, id: Uuid, value: Vec<u8>) -> Result<(), StoreError> {
        let absent = !self.has_in_flight(id)?;
        self.changes
            .put_in_flight(id.as_u128(), &value)
            .map_err(log_error)?;
        self.active.in_flight.put(id.as_u128(), value, absent);
        Ok(())
    }

    /// Deletes the in-flight record of request `id`, if it has one.
    pub(crate) fn del_in_flight(&mut self, id: Uuid) -> Result<(), StoreError> {
        if self.has_in_flight(id)? {
            self.changes
                .del_in_flight(id.as_u128())
                .map_err(log_error)?;
            self.active.in_flight.delete(id.as_u128());
        }
        Ok(())
    }

    /// Deletes a ready key; whether there was one.
    pub(crate) fn del_ready(&mut self, link: &str, seq: u64) -> Result<bool, StoreError> {
        let existed = self.ready(link, seq)?.is_some();
        if existed {
            self.changes.del_ready(link, seq).map_err(log_error)?;
            self.active.pool_mut(link).delete(seq);
        }
        Ok(existed)
    }
}

fn log_error(e: std::io::Error) -> StoreError {
    StoreError::io("encoding a write-ahead log record", e)
}

fn read_error(e: redb::StorageError) -> StoreError {
    StoreError::redb("reading a key record", e)
}
