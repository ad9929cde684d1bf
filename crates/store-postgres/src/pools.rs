//! Ready keys (`dqkd_pool_keys`): refilled, bound, withdrawn and listed by link and
//! position. Each ready key is sealed like an ordinary key whose master is the link, so a
//! record moved to another pool does not open.

use std::collections::{HashMap, HashSet};

use dqkd_store::rules::{check_insert, check_pool_insert, pool_bind_slots, pool_bound_keys};
use dqkd_store::seal::{Cipher, Record};
use dqkd_store::{
    DeliveredKey, KeyMaterial, NewKey, PoolGrant, PoolKey, ReadyKey, Slot, StoreError, TakeError,
};
use futures_util::future::try_join;
use uuid::Uuid;

use crate::columns::{decode, from_db_seq, to_db_seq, to_db_time, SEQ_TOO_LARGE};
use crate::counts::Delta;
use crate::error::db;
use crate::inflight::forget_answered;
use crate::keys::{seal_keys, write_keys, KEY_IDS};
use crate::tables::Tables;

/// Stores ready keys of link `$1`; returns the positions written (the others were taken).
/// Rows go in position order, so two overlapping batches wait for each other's positions in
/// the same order and cannot deadlock.
const POOL_INSERT: &str = "INSERT INTO dqkd_pool_keys (link, seq, id, expires_at, record) \
                           SELECT $1::text, seq, id, expires_at, record \
                           FROM unnest($2::bigint[], $3::uuid[], $4::bigint[], $5::bytea[]) \
                               AS k (seq, id, expires_at, record) \
                           ORDER BY seq \
                           ON CONFLICT (link, seq) DO NOTHING RETURNING seq";
/// Moves the ready keys of link `$1` at positions `$2` with IDs `$3` (pairwise) and unexpired
/// at `$4` out of the pool, locking them in position order first (like take) so that
/// overlapping binds and removals cannot deadlock. A position holding another ID is not
/// returned, which refuses the bind.
const POOL_TAKE: &str = "DELETE FROM dqkd_pool_keys WHERE link = $1 AND seq IN ( \
                             SELECT p.seq FROM dqkd_pool_keys p \
                             JOIN unnest($2::bigint[], $3::uuid[]) AS s (seq, id) \
                                 ON p.seq = s.seq AND p.id = s.id \
                             WHERE p.link = $1 AND p.expires_at > $4 \
                             ORDER BY p.seq FOR UPDATE OF p) \
                         RETURNING id, record";
/// Deletes the ready keys of link `$1` at positions `$2`, locked in position order like a bind.
const POOL_REMOVE: &str = "DELETE FROM dqkd_pool_keys WHERE link = $1 AND seq IN ( \
                               SELECT seq FROM dqkd_pool_keys \
                               WHERE link = $1 AND seq = ANY($2) \
                               ORDER BY seq FOR UPDATE)";
/// At most `$4` ready keys of link `$1` after position `$3`, in position order (the primary
/// key's). The record is fetched only for expiries stored clamped (`$2` = `i64::MAX`), whose
/// exact value only the record holds.
const POOL_LIST: &str = "SELECT seq, id, expires_at, CASE WHEN expires_at = $2 THEN record END \
                         FROM dqkd_pool_keys WHERE link = $1 AND seq > $3 \
                         ORDER BY seq LIMIT $4";

/// Stores ready keys at their positions of the pool of `link`, all or none.
pub(crate) async fn insert(t: &Tables, link: &str, keys: Vec<PoolKey>) -> Result<(), StoreError> {
    // Valid keys with distinct positions and IDs here; taken positions and IDs that are
    // keys are found by the database, in the same transaction as the write.
    check_pool_insert(link, &keys, |_| Ok::<_, std::convert::Infallible>(false))
        .unwrap_or_else(|never| match never {})?;
    if keys.is_empty() {
        return Ok(());
    }
    let batch = seal_ready(&t.cipher, link, keys)?;
    let mut client = t.client().await?;
    let txn = client
        .transaction()
        .await
        .map_err(db("starting a pool insert"))?;
    let insert = txn
        .prepare_cached(POOL_INSERT)
        .await
        .map_err(db("preparing a pool insert"))?;
    let lookup = txn
        .prepare_cached(KEY_IDS)
        .await
        .map_err(db("preparing a key lookup"))?;
    // Pipelined: the lookup does not depend on the insert, and both count only at commit.
    let (written, keys_found) = try_join(
        async {
            txn.query(
                &insert,
                &[
                    &link,
                    &batch.seqs,
                    &batch.ids,
                    &batch.expiries,
                    &batch.records,
                ],
            )
            .await
            .map_err(db("inserting ready keys"))
        },
        async {
            txn.query(&lookup, &[&batch.ids])
                .await
                .map_err(db("looking up ready key IDs among the keys"))
        },
    )
    .await?;
    let written = seqs_of(&written)?;
    let keys_found = ids_of(&keys_found, "looking up ready key IDs among the keys")?;
    if let Some((id, _)) = batch
        .ids
        .iter()
        .zip(&batch.seqs)
        .find(|(id, seq)| !written.contains(seq) || keys_found.contains(id))
    {
        // Dropping the transaction rolls it back: none of the batch is stored.
        return Err(StoreError::DuplicateId { id: *id });
    }
    // Ready keys change no pending count, so the count gate is not needed.
    txn.commit().await.map_err(db("committing a pool insert"))
}

/// Moves ready keys out of the pool of `link` into ordinary keys (or shreds them) and
/// forgets the in-flight record `answered`, in one transaction.
pub(crate) async fn bind(
    t: &Tables,
    link: &str,
    grants: Vec<PoolGrant>,
    now: u64,
    answered: Option<Uuid>,
) -> Result<Vec<DeliveredKey>, TakeError> {
    let slots = pool_bind_slots(&grants)?;
    // A position with no `bigint` form can hold no key.
    let seqs: Vec<i64> = slots
        .iter()
        .map(|slot| to_db_seq(slot.seq))
        .collect::<Option<_>>()
        .ok_or(TakeError::NotFound)?;
    let ids: Vec<Uuid> = slots.iter().map(|slot| slot.id).collect();
    let mut client = t.client().await?;
    let txn = client
        .transaction()
        .await
        .map_err(db("starting a pool bind"))?;
    let stmt = txn
        .prepare_cached(POOL_TAKE)
        .await
        .map_err(db("preparing a pool bind"))?;
    // The row locks of this DELETE make a concurrent bind or removal of the same positions
    // wait for this transaction, then find the rows gone (or, after a rollback, take them
    // itself): two binds of one key never both succeed.
    let rows = txn
        .query(&stmt, &[&link, &seqs, &ids, &to_db_time(now)])
        .await
        .map_err(db("taking ready keys out of a pool"))?;
    // On refusal the transaction is dropped, which rolls it back and restores the pool.
    if rows.len() != slots.len() {
        return Err(TakeError::NotFound);
    }
    let mut material = open_ready(&t.cipher, link, &rows, now)?;
    let bound = pool_bound_keys(&grants, |id| material.get(&id).cloned())?;
    check_insert(&bound, |_| Ok::<_, std::convert::Infallible>(false))
        .unwrap_or_else(|never| match never {})?;
    let sealed = seal_keys(&t.cipher, &bound)?;
    drop(bound);
    write_keys(&txn, &sealed).await?;
    forget_answered(&txn, answered).await?;
    let delivered = ids
        .iter()
        .map(|id| {
            material
                .remove(id)
                .map(|material| DeliveredKey { id: *id, material })
        })
        .collect::<Option<Vec<_>>>()
        // Every slot was returned by the DELETE, as the length check showed.
        .ok_or(TakeError::NotFound)?;
    let deltas = sealed
        .into_iter()
        .map(|row| Delta::Add(row.record.meta().clone()))
        .collect();
    t.commit(txn, deltas, "committing a pool bind").await?;
    Ok(delivered)
}

/// Shreds the ready keys at positions `seqs` of the pool of `link`.
pub(crate) async fn remove(t: &Tables, link: &str, seqs: &[u64]) -> Result<u64, StoreError> {
    // A position with no `bigint` form holds nothing, so it is skipped like any empty one.
    let seqs: Vec<i64> = seqs.iter().copied().filter_map(to_db_seq).collect();
    if seqs.is_empty() {
        return Ok(0);
    }
    let client = t.client().await?;
    let stmt = client
        .prepare_cached(POOL_REMOVE)
        .await
        .map_err(db("preparing a pool removal"))?;
    // One statement, committed on its own before `execute` returns, as durably as every
    // commit here. Ready keys change no pending count, so the count gate is not needed.
    client
        .execute(&stmt, &[&link, &seqs])
        .await
        .map_err(db("removing ready keys"))
}

/// At most `limit` ready keys of the pool of `link` after position `after`.
pub(crate) async fn page(
    t: &Tables,
    link: &str,
    after: Option<u64>,
    limit: usize,
) -> Result<Vec<ReadyKey>, StoreError> {
    // Stored positions are never negative, so -1 starts at the beginning; a position
    // past i64::MAX has nothing after it.
    let after = match after {
        None => -1,
        Some(seq) => match to_db_seq(seq) {
            Some(seq) => seq,
            None => return Ok(Vec::new()),
        },
    };
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let client = t.client().await?;
    let stmt = client
        .prepare_cached(POOL_LIST)
        .await
        .map_err(db("preparing a pool listing"))?;
    let rows = client
        .query(&stmt, &[&link, &i64::MAX, &after, &limit])
        .await
        .map_err(db("listing ready keys"))?;
    rows.iter().map(ready_key).collect()
}

/// Ready keys sealed for [`POOL_INSERT`], one array per column, in batch order.
struct ReadyBatch {
    seqs: Vec<i64>,
    ids: Vec<Uuid>,
    expiries: Vec<i64>,
    /// Sealed records: ciphertext only, so they need no wiping.
    records: Vec<Vec<u8>>,
}

/// Seals and encodes ready keys that passed [`check_pool_insert`] as columns for
/// [`POOL_INSERT`], all before the database is touched. Each is sealed like an ordinary
/// key whose master is the link and which has no slaves, so the link is bound into the
/// seal and a record moved to another pool does not open.
fn seal_ready(cipher: &Cipher, link: &str, keys: Vec<PoolKey>) -> Result<ReadyBatch, StoreError> {
    let mut batch = ReadyBatch {
        seqs: Vec::with_capacity(keys.len()),
        ids: Vec::with_capacity(keys.len()),
        expiries: Vec::with_capacity(keys.len()),
        records: Vec::with_capacity(keys.len()),
    };
    for k in keys {
        let id = k.slot.id;
        let seq = to_db_seq(k.slot.seq).ok_or(StoreError::InvalidKey {
            id,
            reason: SEQ_TOO_LARGE,
        })?;
        let key = NewKey {
            id,
            master: link.to_owned(),
            slaves: Vec::new(),
            material: k.material,
            expires_at: k.expires_at,
        };
        let bytes = Record::seal(cipher, &key)?
            .encode()
            .map_err(|reason| StoreError::InvalidKey { id, reason })?;
        batch.seqs.push(seq);
        batch.ids.push(id);
        batch.expiries.push(to_db_time(key.expires_at));
        batch.records.push(bytes);
    }
    Ok(batch)
}

/// Opens the ready keys a bind took out of the pool of `link` (rows of [`POOL_TAKE`]),
/// by ID. The record, sealed with its link, is the authority; the columns only found it.
fn open_ready(
    cipher: &Cipher,
    link: &str,
    rows: &[tokio_postgres::Row],
    now: u64,
) -> Result<HashMap<Uuid, KeyMaterial>, TakeError> {
    let mut material = HashMap::with_capacity(rows.len());
    for row in rows {
        let id: Uuid = row.try_get(0).map_err(db("reading a ready key record"))?;
        let bytes: &[u8] = row.try_get(1).map_err(db("reading a ready key record"))?;
        let record = decode(id, bytes)?;
        if record.meta().master() != link {
            return Err(StoreError::Crypto {
                context: format!("opening ready key {id}: it was sealed for another pool"),
            }
            .into());
        }
        if record.meta().expires_at() <= now {
            return Err(TakeError::NotFound);
        }
        material.insert(id, record.open(cipher, id)?);
    }
    Ok(material)
}

/// One row of [`POOL_LIST`] as a [`ReadyKey`].
fn ready_key(row: &tokio_postgres::Row) -> Result<ReadyKey, StoreError> {
    let seq: i64 = row.try_get(0).map_err(db("reading a ready key"))?;
    let id: Uuid = row.try_get(1).map_err(db("reading a ready key"))?;
    let stored: i64 = row.try_get(2).map_err(db("reading a ready key"))?;
    let record: Option<&[u8]> = row.try_get(3).map_err(db("reading a ready key"))?;
    let expires_at = match record {
        // Stored clamped: the record holds the exact expiry.
        Some(bytes) => decode(id, bytes)?.meta().expires_at(),
        None => u64::try_from(stored).unwrap_or(0),
    };
    Ok(ReadyKey {
        slot: Slot {
            seq: from_db_seq(id, seq)?,
            id,
        },
        expires_at,
    })
}

/// The positions in the first column of `rows` (as stored).
fn seqs_of(rows: &[tokio_postgres::Row]) -> Result<HashSet<i64>, StoreError> {
    rows.iter()
        .map(|row| row.try_get::<_, i64>(0))
        .collect::<Result<_, _>>()
        .map_err(db("inserting ready keys"))
}

/// The key IDs in the first column of `rows`.
fn ids_of(
    rows: &[tokio_postgres::Row],
    context: &'static str,
) -> Result<HashSet<Uuid>, StoreError> {
    rows.iter()
        .map(|row| row.try_get::<_, Uuid>(0))
        .collect::<Result<_, _>>()
        .map_err(db(context))
}
