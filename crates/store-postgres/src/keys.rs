//! Ordinary keys (`dqkd_keys`): insert, take, purge and destroy, each one transaction that
//! locks the rows it checks, so replicas sharing the database never deliver a key twice.

use std::collections::HashMap;

use dqkd_store::rules::{check_destroy, check_insert, check_take, KeyMeta};
use dqkd_store::seal::{Cipher, Record};
use dqkd_store::{DeliveredKey, NewKey, StoreError, TakeError};
use futures_util::future::try_join_all;
use uuid::Uuid;

use crate::columns::{decode, to_db_time};
use crate::counts::Delta;
use crate::error::db;
use crate::inflight::forget_answered;
use crate::tables::Tables;

const INSERT: &str = "INSERT INTO dqkd_keys (id, master, expires_at, remaining, record) \
                      VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING";
const LOCK_FOR_TAKE: &str =
    "SELECT id, record FROM dqkd_keys WHERE id = ANY($1) ORDER BY id FOR UPDATE";
const DELETE_IDS: &str = "DELETE FROM dqkd_keys WHERE id = ANY($1)";
const UPDATE_TAKEN: &str = "UPDATE dqkd_keys SET record = $2, remaining = $3 WHERE id = $1";
/// Which of the IDs `$1` are ordinary keys.
pub(crate) const KEY_IDS: &str = "SELECT id FROM dqkd_keys WHERE id = ANY($1)";

/// Stores `keys` and forgets the in-flight record `answered` in one transaction (see
/// [`dqkd_store::KeyStore::insert_answering`]).
pub(crate) async fn insert(
    t: &Tables,
    keys: Vec<NewKey>,
    answered: Option<Uuid>,
) -> Result<(), StoreError> {
    check_insert(&keys, |_| Ok::<_, std::convert::Infallible>(false))
        .unwrap_or_else(|never| match never {})?;
    let rows = seal_keys(&t.cipher, &keys)?;
    drop(keys);
    let mut client = t.client().await?;
    let txn = client
        .transaction()
        .await
        .map_err(db("starting an insert"))?;
    write_keys(&txn, &rows).await?;
    forget_answered(&txn, answered).await?;
    let deltas = rows
        .into_iter()
        .map(|row| Delta::Add(row.record.meta().clone()))
        .collect();
    t.commit(txn, deltas, "committing an insert").await
}

/// Delivers `ids` to `caller` (see [`dqkd_store::KeyStore::take`]): the rows are locked in
/// ID order, checked, and deleted or marked in the same transaction.
pub(crate) async fn take(
    t: &Tables,
    caller: &str,
    masters: &[String],
    ids: &[Uuid],
    now: u64,
) -> Result<Vec<DeliveredKey>, TakeError> {
    let mut client = t.client().await?;
    let txn = client.transaction().await.map_err(db("starting a take"))?;
    let stmt = txn
        .prepare_cached(LOCK_FOR_TAKE)
        .await
        .map_err(db("preparing a take"))?;
    let locked = txn
        .query(&stmt, &[&ids])
        .await
        .map_err(db("locking keys for a take"))?;
    let mut found = HashMap::with_capacity(locked.len());
    for row in &locked {
        let id: Uuid = row.try_get(0).map_err(db("reading a key record"))?;
        let bytes: &[u8] = row.try_get(1).map_err(db("reading a key record"))?;
        found.insert(id, decode(id, bytes)?);
    }
    let metas: Vec<Option<&KeyMeta>> = ids
        .iter()
        .map(|id| found.get(id).map(Record::meta))
        .collect();
    // On refusal the transaction is dropped, which rolls it back and releases the locks.
    check_take(caller, masters, ids, &metas, now)?;

    let mut delivered = Vec::with_capacity(ids.len());
    let mut deleted = Vec::new();
    let mut updated = Vec::new();
    let mut deltas = Vec::with_capacity(ids.len());
    for id in ids {
        // check_take saw every id present and distinct.
        let mut record = found.remove(id).ok_or(TakeError::NotFound)?;
        delivered.push(DeliveredKey {
            id: *id,
            material: record.open(&t.cipher, *id)?,
        });
        deltas.push(Delta::Taken {
            master: record.meta().master().to_owned(),
            slave: caller.to_owned(),
        });
        if record.meta_mut().mark_taken(caller) {
            deleted.push(*id);
        } else {
            let bytes = record
                .encode()
                .map_err(|reason| StoreError::InvalidKey { id: *id, reason })?;
            let remaining: Vec<String> = record.meta().remaining().map(str::to_owned).collect();
            updated.push((*id, bytes, remaining));
        }
    }
    if !deleted.is_empty() {
        let stmt = txn
            .prepare_cached(DELETE_IDS)
            .await
            .map_err(db("preparing a delete"))?;
        txn.execute(&stmt, &[&deleted])
            .await
            .map_err(db("deleting delivered keys"))?;
    }
    if !updated.is_empty() {
        let stmt = txn
            .prepare_cached(UPDATE_TAKEN)
            .await
            .map_err(db("preparing an update"))?;
        try_join_all(updated.iter().map(|(id, bytes, remaining)| {
            let (txn, stmt) = (&txn, &stmt);
            async move { txn.execute(stmt, &[id, bytes, remaining]).await }
        }))
        .await
        .map_err(db("marking keys delivered"))?;
    }
    t.commit(txn, deltas, "committing a take").await?;
    Ok(delivered)
}

/// Deletes keys and ready keys expired at `now`.
pub(crate) async fn purge_expired(t: &Tables, now: u64) -> Result<u64, StoreError> {
    let mut client = t.client().await?;
    let txn = client.transaction().await.map_err(db("starting a purge"))?;
    // Rows locked by an in-flight take or bind are skipped; the next purge removes them if
    // they are still there.
    let rows = txn
        .query(
            "DELETE FROM dqkd_keys WHERE id IN ( \
                 SELECT id FROM dqkd_keys WHERE expires_at <= $1 \
                 ORDER BY id FOR UPDATE SKIP LOCKED) \
             RETURNING id, record",
            &[&to_db_time(now)],
        )
        .await
        .map_err(db("purging expired keys"))?;
    let ready = txn
        .execute(
            "DELETE FROM dqkd_pool_keys WHERE (link, seq) IN ( \
                 SELECT link, seq FROM dqkd_pool_keys WHERE expires_at <= $1 \
                 ORDER BY link, seq FOR UPDATE SKIP LOCKED)",
            &[&to_db_time(now)],
        )
        .await
        .map_err(db("purging expired ready keys"))?;
    let deltas = deleted_deltas(&rows)?;
    t.commit(txn, deltas, "committing a purge").await?;
    Ok(rows.len() as u64 + ready)
}

/// Destroys `ids` (unknown ones skipped); with `masters`, only if every one that exists
/// was made for one of them (`check_destroy`), checked on the locked rows in the same
/// transaction, so nothing changes on a refusal.
pub(crate) async fn destroy(
    t: &Tables,
    ids: &[Uuid],
    masters: Option<&[String]>,
) -> Result<u64, TakeError> {
    let mut client = t.client().await?;
    let txn = client
        .transaction()
        .await
        .map_err(db("starting a destroy"))?;
    // Lock in ID order first, like take, so a destroy and a take cannot deadlock.
    let locked = txn
        .query(
            "SELECT id, record FROM dqkd_keys WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            &[&ids],
        )
        .await
        .map_err(db("locking keys to destroy"))?;
    let mut locked_ids = Vec::with_capacity(locked.len());
    let mut records = Vec::with_capacity(locked.len());
    for row in &locked {
        let id: Uuid = row.try_get(0).map_err(db("reading a key record"))?;
        locked_ids.push(id);
        if masters.is_some() {
            let bytes: &[u8] = row.try_get(1).map_err(db("reading a key record"))?;
            records.push(decode(id, bytes)?);
        }
    }
    if let Some(masters) = masters {
        let metas: Vec<Option<&KeyMeta>> = records.iter().map(|r| Some(r.meta())).collect();
        // On refusal the transaction is dropped, which rolls it back.
        check_destroy(masters, &metas)?;
    }
    // Only the rows locked and checked above: under READ COMMITTED a DELETE by the
    // requested IDs would also see keys committed since, which were never checked.
    let rows = txn
        .query(
            "DELETE FROM dqkd_keys WHERE id = ANY($1) RETURNING id, record",
            &[&locked_ids],
        )
        .await
        .map_err(db("destroying keys"))?;
    let deltas = deleted_deltas(&rows)?;
    t.commit(txn, deltas, "committing a destroy").await?;
    Ok(rows.len() as u64)
}

/// Seals and encodes keys that passed [`check_insert`], all before the database is
/// touched, so a key that cannot be stored fails the batch without a round trip.
pub(crate) fn seal_keys(cipher: &Cipher, keys: &[NewKey]) -> Result<Vec<Sealed>, StoreError> {
    keys.iter()
        .map(|k| {
            let record = Record::seal(cipher, k)?;
            let bytes = record
                .encode()
                .map_err(|reason| StoreError::InvalidKey { id: k.id, reason })?;
            Ok(Sealed {
                id: k.id,
                record,
                bytes,
            })
        })
        .collect()
}

/// A key sealed and encoded for `dqkd_keys`; the record is kept for the count deltas.
pub(crate) struct Sealed {
    pub(crate) id: Uuid,
    pub(crate) record: Record,
    pub(crate) bytes: Vec<u8>,
}

/// Writes sealed keys into `dqkd_keys` inside `txn`. On [`StoreError::DuplicateId`] (the first
/// key, in batch order, whose ID is already a key) the caller drops `txn`, which rolls it
/// back: none of the batch is stored.
///
/// `ON CONFLICT DO NOTHING` tells which ID already was a key; a concurrent write of the same
/// ID waits for this transaction on the primary key and then finds it taken (or, after a
/// rollback, writes it itself). Ready keys are not consulted: IDs are not checked across the
/// two tables any more (see the crate docs).
pub(crate) async fn write_keys(
    txn: &deadpool_postgres::Transaction<'_>,
    rows: &[Sealed],
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let stmt = txn
        .prepare_cached(INSERT)
        .await
        .map_err(db("preparing an insert"))?;
    let written = try_join_all(rows.iter().map(|row| {
        let meta = row.record.meta();
        let remaining: Vec<&str> = meta.remaining().collect();
        let stmt = &stmt;
        async move {
            txn.execute(
                stmt,
                &[
                    &row.id,
                    &meta.master(),
                    &to_db_time(meta.expires_at()),
                    &remaining,
                    &row.bytes,
                ],
            )
            .await
        }
    }))
    .await
    .map_err(db("inserting keys"))?;
    match rows.iter().zip(&written).find(|(_, n)| **n == 0) {
        Some((row, _)) => Err(StoreError::DuplicateId { id: row.id }),
        None => Ok(()),
    }
}

/// Count changes for deleted rows (`id, record`). A record that does not decode is still
/// deleted (it is being shredded) and leaves the counts to the next refresh.
fn deleted_deltas(rows: &[tokio_postgres::Row]) -> Result<Vec<Delta>, StoreError> {
    let mut deltas = Vec::with_capacity(rows.len());
    for row in rows {
        let id: Uuid = row.try_get(0).map_err(db("reading a deleted key"))?;
        let bytes: &[u8] = row.try_get(1).map_err(db("reading a deleted key"))?;
        match Record::decode(bytes) {
            Ok(record) => deltas.push(Delta::Remove(record.meta().clone())),
            Err(reason) => tracing::warn!(key_id = %id, %reason, "deleted a corrupt key record"),
        }
    }
    Ok(deltas)
}
