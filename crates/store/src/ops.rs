//! The operations of the embedded store's writer, one function per [`crate::KeyStore`]
//! write (and the reads only the writer can serve, since only it sees the overlays).
//!
//! Each checks everything against the state the earlier operations of its batch left
//! behind before it writes anything, so a refused operation leaves no trace. The outer
//! `Result` of each is a storage failure that spoils the whole batch; the inner one is the
//! caller's own answer. Pending counts change through [`Delta`]s, applied by the writer only
//! once the batch is on disk.

use std::collections::HashMap;

use redb::ReadableTable;
use uuid::Uuid;

use crate::kek::Cipher;
use crate::layers::Layers;
use crate::meta::{
    check_insert, check_pool_insert, check_take, pool_bind_slots, pool_bound_keys, KeyMeta,
};
use crate::record::{aad, Record, VERSION};
use crate::schema::{ready_key, ready_value, split_ready};
use crate::{
    DeliveredKey, InFlight, KeyMaterial, NewKey, PoolGrant, PoolKey, ReadyKey, StoreError,
    TakeError,
};

/// A change to the pending counts, applied only once the batch is on disk.
pub(crate) enum Delta {
    Add(KeyMeta),
    Remove(KeyMeta),
    Taken {
        master: String,
        slave: String,
    },
    /// A write that changes no count (a corrupt record removed): the batch must still commit.
    Wrote,
}

pub(crate) fn insert(
    tables: &mut Layers<'_>,
    cipher: &Cipher,
    keys: Vec<NewKey>,
    deltas: &mut Vec<Delta>,
) -> Result<Result<(), StoreError>, StoreError> {
    let ids = keys.iter().map(|k| k.id.as_u128());
    let base_clear = match (ids.clone().min(), ids.max()) {
        (Some(lo), Some(hi)) => tables.base_has_no_key_in(lo, hi)?,
        _ => false,
    };
    let checked = check_insert(&keys, |id| tables.has_key_with(id, !base_clear))?;
    if let Err(e) = checked {
        return Ok(Err(e));
    }
    match seal_keys(cipher, &keys) {
        Ok(encoded) => write_sealed(tables, encoded, deltas).map(Ok),
        Err(e) => Ok(Err(e)),
    }
}

/// A key sealed and encoded, ready to write.
type Sealed = (Uuid, Vec<u8>, KeyMeta);

/// Seals and encodes keys that passed [`check_insert`], all before any is written.
fn seal_keys(cipher: &Cipher, keys: &[NewKey]) -> Result<Vec<Sealed>, StoreError> {
    let mut encoded = Vec::with_capacity(keys.len());
    for k in keys {
        let meta = KeyMeta::new(&k.master, &k.slaves, k.expires_at);
        let (sealing, sealed) =
            cipher.seal(k.material.as_bytes(), &aad(k.id, &k.master, VERSION))?;
        let record = Record {
            meta,
            sealing,
            sealed,
        };
        match record.encode() {
            Ok(bytes) => encoded.push((k.id, bytes, record.meta)),
            Err(reason) => return Err(StoreError::InvalidKey { id: k.id, reason }),
        }
    }
    Ok(encoded)
}

/// Writes sealed keys; an `Err` is a storage failure that spoils the transaction.
fn write_sealed(
    tables: &mut Layers<'_>,
    encoded: Vec<Sealed>,
    deltas: &mut Vec<Delta>,
) -> Result<(), StoreError> {
    for (id, bytes, meta) in encoded {
        tables.put_key(id, bytes, true, meta.expires_at)?;
        deltas.push(Delta::Add(meta));
    }
    Ok(())
}

pub(crate) fn take(
    tables: &mut Layers<'_>,
    cipher: &Cipher,
    caller: &str,
    masters: &[String],
    ids: &[Uuid],
    now: u64,
    deltas: &mut Vec<Delta>,
) -> Result<Result<Vec<DeliveredKey>, TakeError>, StoreError> {
    let mut records = Vec::with_capacity(ids.len());
    for id in ids {
        let raw = tables.key(*id)?;
        let record = match raw.map(|v| Record::decode(&v)).transpose() {
            Ok(r) => r,
            Err(reason) => {
                return Ok(Err(TakeError::Store(StoreError::CorruptRecord {
                    id: *id,
                    reason,
                })))
            }
        };
        records.push(record);
    }
    let metas: Vec<Option<&KeyMeta>> = records
        .iter()
        .map(|r| r.as_ref().map(|r| &r.meta))
        .collect();
    if let Err(e) = check_take(caller, masters, ids, &metas, now) {
        return Ok(Err(e));
    }
    // Every record is present (check_take passed); open and re-encode all before writing any.
    let mut delivered = Vec::with_capacity(ids.len());
    let mut updates = Vec::with_capacity(ids.len());
    for (id, record) in ids.iter().zip(records.into_iter().flatten()) {
        let Some(bytes) = cipher.open(&record.sealing, &record.sealed, &record.aad(*id)) else {
            return Ok(Err(TakeError::Store(StoreError::Crypto {
                context: format!("opening key {id}: record does not authenticate"),
            })));
        };
        delivered.push(DeliveredKey {
            id: *id,
            material: KeyMaterial::new(bytes.to_vec()),
        });
        let mut record = record;
        let master = record.meta.master.clone();
        let value = if record.meta.mark_taken(caller) {
            None
        } else {
            match record.encode() {
                Ok(v) => Some(v),
                Err(reason) => {
                    return Ok(Err(TakeError::Store(StoreError::InvalidKey {
                        id: *id,
                        reason,
                    })))
                }
            }
        };
        updates.push((*id, value, master, record.meta.expires_at));
    }
    for (id, value, master, expires_at) in updates {
        match value {
            None => {
                tables.del_key(id)?;
            }
            Some(v) => tables.put_key(id, v, false, expires_at)?,
        }
        deltas.push(Delta::Taken {
            master,
            slave: caller.to_owned(),
        });
    }
    Ok(Ok(delivered))
}

/// Removes those of `ids` and `ready` that are still present and expired at `now` (a take
/// may have removed or a re-check may keep some since the scan that found them).
pub(crate) fn purge(
    tables: &mut Layers<'_>,
    now: u64,
    ids: &[Uuid],
    ready: &[(String, u64)],
    deltas: &mut Vec<Delta>,
) -> Result<Result<u64, StoreError>, StoreError> {
    let mut expired = Vec::new();
    for id in ids {
        if let Some(raw) = tables.key(*id)? {
            if let Ok(r) = Record::decode(&raw) {
                if r.meta.expires_at <= now {
                    expired.push((*id, r.meta));
                }
            }
        }
    }
    let mut expired_ready = Vec::new();
    for (link, seq) in ready {
        if let Some(raw) = tables.ready(link, *seq)? {
            let head = split_ready(&raw).and_then(|(_, record)| Record::head(record));
            if head.is_ok_and(|(expires_at, _)| expires_at <= now) {
                expired_ready.push((link.as_str(), *seq));
            }
        }
    }
    let count = (expired.len() + expired_ready.len()) as u64;
    for (id, meta) in expired {
        tables.del_key(id)?;
        deltas.push(Delta::Remove(meta));
    }
    for (link, seq) in expired_ready {
        tables.del_ready(link, seq)?;
        deltas.push(Delta::Wrote);
    }
    Ok(Ok(count))
}

/// Candidates for [`purge`] among the keys the overlays hold: those written with an
/// expiry at or before `now` (the purge re-checks each against the newest layer).
pub(crate) fn expired_in_overlays(
    tables: &Layers<'_>,
    now: u64,
) -> (Vec<Uuid>, Vec<(String, u64)>) {
    let expired = |value: &[u8]| Record::head(value).is_ok_and(|(at, _)| at <= now);
    let mut ids = Vec::new();
    let mut ready = Vec::new();
    for layer in [tables.frozen, Some(&*tables.active)].into_iter().flatten() {
        for (id, value) in layer.keys.iter() {
            if value.is_some_and(expired) {
                ids.push(Uuid::from_u128(id));
            }
        }
        for (link, pool) in &layer.ready {
            for (seq, value) in pool.iter() {
                let value = value.and_then(|v| split_ready(v).ok()).map(|(_, r)| r);
                if value.is_some_and(expired) {
                    ready.push((link.clone(), seq));
                }
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ready.sort_unstable();
    ready.dedup();
    (ids, ready)
}

/// Removes the given ordinary keys whatever their entitlements; unknown IDs are skipped.
/// With `masters`, first checks that every one that exists was made for one of them
/// (`check_destroy`); a record that cannot be read then refuses the whole request, since
/// whose it is cannot be told.
pub(crate) fn destroy(
    tables: &mut Layers<'_>,
    ids: &[Uuid],
    masters: Option<&[String]>,
    deltas: &mut Vec<Delta>,
) -> Result<Result<u64, TakeError>, StoreError> {
    // Read before deleting, for the pending counts and the check (a rare path: failed
    // requests).
    let mut found = Vec::with_capacity(ids.len());
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    for id in ids {
        if !seen.insert(*id) {
            continue;
        }
        if let Some(raw) = tables.key(*id)? {
            found.push((*id, Record::decode(&raw)));
        }
    }
    if let Some(masters) = masters {
        let mut metas = Vec::with_capacity(found.len());
        for (id, record) in &found {
            match record {
                Ok(record) => metas.push(Some(&record.meta)),
                Err(reason) => {
                    return Ok(Err(TakeError::Store(StoreError::CorruptRecord {
                        id: *id,
                        reason: reason.clone(),
                    })))
                }
            }
        }
        if let Err(refused) = crate::meta::check_destroy(masters, &metas) {
            return Ok(Err(refused));
        }
    }
    let mut count = 0;
    for (id, record) in found {
        tables.del_key(id)?;
        count += 1;
        match record {
            Ok(record) => deltas.push(Delta::Remove(record.meta)),
            Err(reason) => {
                tracing::warn!(key_id = %id, %reason, "destroyed a corrupt key record");
                deltas.push(Delta::Wrote);
            }
        }
    }
    Ok(Ok(count))
}

/// Removes the ready keys at these positions of `link`; empty positions are skipped.
pub(crate) fn pool_remove(
    tables: &mut Layers<'_>,
    link: &str,
    seqs: &[u64],
    deltas: &mut Vec<Delta>,
) -> Result<u64, StoreError> {
    let mut count = 0;
    for seq in seqs {
        if tables.del_ready(link, *seq)? {
            count += 1;
        }
    }
    if count > 0 {
        deltas.push(Delta::Wrote);
    }
    Ok(count)
}

/// Seals ready keys into their link's positions (the link in the AAD, as a master would be),
/// after checking the whole batch.
pub(crate) fn pool_insert(
    tables: &mut Layers<'_>,
    cipher: &Cipher,
    link: &str,
    keys: Vec<PoolKey>,
    deltas: &mut Vec<Delta>,
) -> Result<Result<(), StoreError>, StoreError> {
    let taken = |slot: crate::Slot| -> Result<bool, StoreError> {
        Ok(tables.has_key(slot.id)? || tables.ready(link, slot.seq)?.is_some())
    };
    if let Err(e) = check_pool_insert(link, &keys, taken)? {
        return Ok(Err(e));
    }
    let mut encoded = Vec::with_capacity(keys.len());
    for k in &keys {
        let id = k.slot.id;
        let (sealing, sealed) = match cipher.seal(k.material.as_bytes(), &aad(id, link, VERSION)) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let record = Record {
            meta: KeyMeta::new(link, &[], k.expires_at),
            sealing,
            sealed,
        };
        match record.encode() {
            Ok(bytes) => encoded.push((k.slot.seq, ready_value(id, &bytes), k.expires_at)),
            Err(reason) => return Ok(Err(StoreError::InvalidKey { id, reason })),
        }
    }
    for (seq, value, expires_at) in encoded {
        tables.put_new_ready(link, seq, value, expires_at)?;
    }
    deltas.push(Delta::Wrote);
    Ok(Ok(()))
}

/// Moves ready keys of `link` out of the pool: checks and opens every one before writing,
/// then deletes them and stores the bound ones as ordinary keys.
pub(crate) fn pool_bind(
    tables: &mut Layers<'_>,
    cipher: &Cipher,
    link: &str,
    grants: Vec<PoolGrant>,
    now: u64,
    deltas: &mut Vec<Delta>,
) -> Result<Result<Vec<DeliveredKey>, TakeError>, StoreError> {
    let slots = match pool_bind_slots(&grants) {
        Ok(slots) => slots,
        Err(e) => return Ok(Err(e)),
    };
    let mut delivered = Vec::with_capacity(slots.len());
    for slot in &slots {
        let Some(raw) = tables.ready(link, slot.seq)? else {
            return Ok(Err(TakeError::NotFound));
        };
        let corrupt = |reason| {
            Ok(Err(TakeError::Store(StoreError::CorruptRecord {
                id: slot.id,
                reason,
            })))
        };
        let (id, record) = match split_ready(&raw) {
            Ok((id, bytes)) => match Record::decode(bytes) {
                Ok(record) => (id, record),
                Err(reason) => return corrupt(reason),
            },
            Err(reason) => return corrupt(reason),
        };
        if id != slot.id || record.meta.master != link || record.meta.expires_at <= now {
            return Ok(Err(TakeError::NotFound));
        }
        match record.open(cipher, id) {
            Ok(material) => delivered.push(DeliveredKey { id, material }),
            Err(e) => return Ok(Err(TakeError::Store(e))),
        }
    }
    let by_id: HashMap<Uuid, &KeyMaterial> =
        delivered.iter().map(|d| (d.id, &d.material)).collect();
    let bound = match pool_bound_keys(&grants, |id| by_id.get(&id).map(|m| (*m).clone())) {
        Ok(keys) => keys,
        Err(e) => return Ok(Err(e)),
    };
    if let Err(e) = check_insert(&bound, |id| tables.has_key(id))? {
        return Ok(Err(TakeError::Store(e)));
    }
    let encoded = match seal_keys(cipher, &bound) {
        Ok(encoded) => encoded,
        Err(e) => return Ok(Err(TakeError::Store(e))),
    };
    drop(by_id);
    for slot in &slots {
        tables.del_ready(link, slot.seq)?;
    }
    deltas.push(Delta::Wrote);
    write_sealed(tables, encoded, deltas)?;
    Ok(Ok(delivered))
}

/// After an insert or a bind `result`: deletes the in-flight record `answered` if the
/// operation succeeded, so both land in the same log record or neither does.
pub(crate) fn answer_in_flight<T, E>(
    tables: &mut Layers<'_>,
    result: Result<T, E>,
    answered: Option<Uuid>,
) -> Result<Result<T, E>, StoreError> {
    if let (Ok(_), Some(id)) = (&result, answered) {
        tables.del_in_flight(id)?;
    }
    Ok(result)
}

/// The in-flight records of `owner`: redb's, under the overlays' changes.
pub(crate) fn in_flight_of(tables: &Layers<'_>, owner: &str) -> Result<Vec<InFlight>, StoreError> {
    let scan = |e| StoreError::redb("reading in-flight records", e);
    let mut all: std::collections::BTreeMap<u128, Option<Vec<u8>>> = Default::default();
    for entry in tables.base.in_flight.iter().map_err(scan)? {
        let (k, v) = entry.map_err(scan)?;
        all.insert(k.value(), Some(v.value().to_vec()));
    }
    for layer in [tables.frozen, Some(&*tables.active)].into_iter().flatten() {
        for (id, value) in layer.in_flight.iter() {
            all.insert(id, value.map(<[u8]>::to_vec));
        }
    }
    let mut found = Vec::new();
    for (id, value) in all {
        let Some(value) = value else { continue };
        let id = Uuid::from_u128(id);
        match crate::inflight::decode(id, &value) {
            Some(record) if record.owner == owner => found.push(record),
            Some(_) => {}
            None => {
                return Err(StoreError::CorruptRecord {
                    id,
                    reason: crate::RecordError::Truncated,
                })
            }
        }
    }
    Ok(found)
}

/// Up to `limit` ready keys of `link` from position `from` on, in position order: redb's
/// entries merged with the overlays', the newest layer winning.
pub(crate) fn pool_page(
    tables: &Layers<'_>,
    link: &str,
    from: u64,
    limit: usize,
) -> Result<Vec<ReadyKey>, StoreError> {
    // The overlays hold at most a few seconds of changes: merge them first.
    let mut newer: std::collections::BTreeMap<u64, Option<&[u8]>> = Default::default();
    for layer in [tables.frozen, Some(&*tables.active)].into_iter().flatten() {
        if let Some(pool) = layer.pool(link) {
            newer.extend(pool.iter_from(from));
        }
    }
    let mut newer = newer.into_iter().peekable();
    let scan = |e| StoreError::redb("scanning ready keys", e);
    let mut range = tables
        .base
        .ready
        .range((link, from)..=(link, u64::MAX))
        .map_err(scan)?;
    let mut next_base = || -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        match range.next() {
            Some(Ok((k, v))) => Ok(Some((k.value().1, v.value().to_vec()))),
            Some(Err(e)) => Err(scan(e)),
            None => Ok(None),
        }
    };
    let mut base = next_base()?;
    let mut page = Vec::new();
    while page.len() < limit {
        let newer_seq = newer.peek().map(|(seq, _)| *seq);
        let from_base = match (&base, newer_seq) {
            (None, None) => break,
            (Some((b, _)), Some(n)) => *b < n,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        if from_base {
            if let Some((seq, value)) = base.take() {
                page.push(ready_key(seq, &value)?);
            }
            base = next_base()?;
            continue;
        }
        if let Some((seq, value)) = newer.next() {
            if base.as_ref().is_some_and(|(b, _)| *b == seq) {
                base = next_base()?; // the overlay's entry replaces redb's
            }
            if let Some(value) = value {
                page.push(ready_key(seq, value)?);
            }
        }
    }
    Ok(page)
}
