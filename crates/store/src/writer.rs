//! The group-commit writer thread of [`crate::EmbeddedStore`].
//!
//! One thread owns the write side of the database. It blocks for the first queued operation,
//! drains whatever else is queued (up to [`MAX_BATCH`]), applies them in arrival order inside
//! one write transaction, appends its changes to the write-ahead log (one fsync for the whole
//! batch, see `wal`), commits, and only then answers each caller. Each operation is validated against the state the earlier
//! operations of the batch left behind, before it writes anything, so a failing operation
//! leaves no trace and does not disturb the others, and two takes of the same key can never
//! both succeed. Pending counts change only after the commit succeeded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableTable, Table, WriteTransaction};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::embedded::{ready_value, split_ready, KEYS, META, READY, WAL_SEQ};
use crate::kek::Cipher;
use crate::meta::{
    check_insert, check_pool_insert, check_take, pool_bind_slots, pool_bound_keys, KeyMeta,
    PendingCounts,
};
use crate::record::{aad, Record};
use crate::wal::{Change, Wal};
use crate::{DeliveredKey, KeyMaterial, NewKey, PoolGrant, PoolKey, StoreError, TakeError};

/// Upper bound on operations per transaction, to bound the latency of the first caller.
const MAX_BATCH: usize = 1024;

/// One operation sent to the writer with the channel for its answer.
pub(crate) enum Request {
    Insert {
        keys: Vec<NewKey>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Take {
        caller: String,
        masters: Vec<String>,
        ids: Vec<Uuid>,
        now: u64,
        reply: oneshot::Sender<Result<Vec<DeliveredKey>, TakeError>>,
    },
    Purge {
        now: u64,
        ids: Vec<Uuid>,
        /// Ready keys, by (link, position).
        ready: Vec<(String, u64)>,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    Destroy {
        ids: Vec<Uuid>,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    PoolInsert {
        link: String,
        keys: Vec<PoolKey>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    PoolBind {
        link: String,
        grants: Vec<PoolGrant>,
        now: u64,
        reply: oneshot::Sender<Result<Vec<DeliveredKey>, TakeError>>,
    },
    PoolRemove {
        link: String,
        seqs: Vec<u64>,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
}

/// Shared group-commit counters.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) batches: AtomicU64,
    pub(crate) ops: AtomicU64,
    pub(crate) max_batch: AtomicU64,
}

/// A change to the pending counts, applied only once the batch is on disk.
enum Delta {
    Add(KeyMeta),
    Remove(KeyMeta),
    Taken {
        master: String,
        slave: String,
    },
    /// A write that changes no count (a corrupt record removed): the batch must still commit.
    Wrote,
}

/// The result of one operation, held until the commit decides whether it stands.
enum Outcome {
    Insert(
        oneshot::Sender<Result<(), StoreError>>,
        Result<(), StoreError>,
    ),
    Take(
        oneshot::Sender<Result<Vec<DeliveredKey>, TakeError>>,
        Result<Vec<DeliveredKey>, TakeError>,
    ),
    Purge(
        oneshot::Sender<Result<u64, StoreError>>,
        Result<u64, StoreError>,
    ),
}

impl Outcome {
    /// The answer for an operation the batch never reached.
    fn failed(request: Request, err: &StoreError) -> Self {
        let e = || clone_batch_error(err);
        match request {
            Request::Insert { reply, .. } | Request::PoolInsert { reply, .. } => {
                Outcome::Insert(reply, Err(e()))
            }
            Request::Take { reply, .. } | Request::PoolBind { reply, .. } => {
                Outcome::Take(reply, Err(TakeError::Store(e())))
            }
            Request::Purge { reply, .. }
            | Request::Destroy { reply, .. }
            | Request::PoolRemove { reply, .. } => Outcome::Purge(reply, Err(e())),
        }
    }

    /// Replaces a success with `err` (the commit failed, so nothing of it is on disk).
    fn fail_if_ok(self, err: &StoreError) -> Self {
        let e = || clone_batch_error(err);
        match self {
            Outcome::Insert(tx, Ok(())) => Outcome::Insert(tx, Err(e())),
            Outcome::Take(tx, Ok(_)) => Outcome::Take(tx, Err(TakeError::Store(e()))),
            Outcome::Purge(tx, Ok(_)) => Outcome::Purge(tx, Err(e())),
            other => other,
        }
    }

    fn answer(self) {
        // A send fails only if the caller stopped waiting (e.g. its request was cancelled).
        let gone = match self {
            Outcome::Insert(tx, r) => tx.send(r).is_err(),
            Outcome::Take(tx, r) => {
                let delivered = r.is_ok();
                tx.send(r).is_err() && delivered
            }
            Outcome::Purge(tx, r) => tx.send(r).is_err(),
        };
        if gone {
            tracing::warn!("caller went away before its committed key delivery was answered");
        }
    }
}

/// Errors that fail a whole batch are redb errors (shared by `Arc`) or I/O-free variants.
fn clone_batch_error(err: &StoreError) -> StoreError {
    match err {
        StoreError::Redb { context, source } => StoreError::Redb {
            context,
            source: Arc::clone(source),
        },
        StoreError::Halted { reason } => StoreError::Halted {
            reason: reason.clone(),
        },
        _ => StoreError::Closed,
    }
}

/// A checkpoint (a durable redb commit, after which the log starts over) at least this
/// often while batches arrive, so the log stays short and so does recovery.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// ... or as soon as the log holds this much (large refills).
const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;

/// The write-ahead log and the writer's health.
pub(crate) struct Durable {
    wal: Wal,
    last_checkpoint: Instant,
    /// Sequence number of the last record covered by a durable commit.
    checkpointed: u64,
    /// Why the store stopped writing, once a write failed part-way.
    halted: Option<String>,
}

impl Durable {
    pub(crate) fn new(wal: Wal, checkpointed: u64) -> Self {
        Self {
            wal,
            last_checkpoint: Instant::now(),
            checkpointed,
            halted: None,
        }
    }

    fn checkpoint_due(&self) -> bool {
        self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY || self.wal.len() >= CHECKPOINT_BYTES
    }

    fn halt(&mut self, reason: String) -> StoreError {
        tracing::error!(%reason, "key store stopped writing; restart the KME to recover from its log");
        self.halted = Some(reason.clone());
        StoreError::Halted { reason }
    }

    /// Empties the log after a durable commit covered record `seq`.
    fn checkpointed(&mut self, seq: u64) {
        self.checkpointed = seq;
        self.last_checkpoint = Instant::now();
        if let Err(e) = self.wal.start_over() {
            // Its records are all covered, so recovery skips them; retried next time.
            tracing::warn!(path = %self.wal.path().display(), error = %e, "could not empty the write-ahead log");
        }
    }
}

/// The writer loop; returns when every sender is gone and the queue is drained, after a
/// final checkpoint.
pub(crate) fn run(
    db: Arc<Database>,
    cipher: Cipher,
    requests: mpsc::Receiver<Request>,
    pending: Arc<Mutex<PendingCounts>>,
    stats: Arc<Stats>,
    mut durable: Durable,
) {
    while let Ok(first) = requests.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        // Counted before answering, so a caller that saw its answer also sees its batch counted.
        let n = batch.len() as u64;
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.ops.fetch_add(n, Ordering::Relaxed);
        stats.max_batch.fetch_max(n, Ordering::Relaxed);
        let started = Instant::now();
        process(&db, &cipher, batch, &pending, &mut durable);
        metrics::histogram!("dqkd_store_commit_ops").record(n as f64);
        metrics::histogram!("dqkd_store_commit_seconds").record(started.elapsed().as_secs_f64());
    }
    if durable.halted.is_none() {
        if let Err(e) = final_checkpoint(&db, &mut durable) {
            tracing::warn!(error = %e, "final checkpoint failed; the log is applied at the next open");
        }
    }
    tracing::debug!("key store writer stopped");
}

/// Commits durably whatever the log holds beyond the last checkpoint, and empties the log.
fn final_checkpoint(db: &Database, durable: &mut Durable) -> Result<(), StoreError> {
    let last = durable.wal.next_seq() - 1;
    if last <= durable.checkpointed {
        return Ok(());
    }
    let mut txn = begin(db)?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| StoreError::redb("setting durability", e))?;
    write_checkpoint_seq(&txn, last)?;
    txn.commit()
        .map_err(|e| StoreError::redb("committing the final checkpoint", e))?;
    durable.checkpointed(last);
    Ok(())
}

/// Records in `txn` that the log up to `seq` is covered by it.
pub(crate) fn write_checkpoint_seq(txn: &WriteTransaction, seq: u64) -> Result<(), StoreError> {
    txn.open_table(META)
        .and_then(|mut meta| {
            meta.insert(WAL_SEQ, seq.to_be_bytes().as_slice())?;
            Ok(())
        })
        .map_err(|e| StoreError::redb("recording the checkpoint", e))
}

/// Applies, logs, commits and answers one batch.
fn process(
    db: &Database,
    cipher: &Cipher,
    batch: Vec<Request>,
    pending: &Mutex<PendingCounts>,
    durable: &mut Durable,
) {
    if let Some(reason) = &durable.halted {
        let err = StoreError::Halted {
            reason: reason.clone(),
        };
        for r in batch {
            Outcome::failed(r, &err).answer();
        }
        return;
    }
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut deltas = Vec::new();
    let mut changes = Vec::new();
    let mut txn = match begin(db) {
        Ok(txn) => txn,
        Err(err) => {
            tracing::error!(error = %err, "key store batch could not start");
            for r in batch {
                Outcome::failed(r, &err).answer();
            }
            return;
        }
    };
    let result = apply_all(
        &txn,
        cipher,
        batch,
        &mut outcomes,
        &mut deltas,
        &mut changes,
    )
    .and_then(|()| {
        // Every write records a change, so none means nothing to make durable: no log
        // record, no flush (a batch of only refused takes costs no disk write).
        if changes.is_empty() {
            return txn
                .abort()
                .map_err(|e| StoreError::redb("aborting a read-only batch", e));
        }
        // The log first: once the record is on disk the batch survives a crash, and
        // the commit below only makes it visible (and, at a checkpoint, durable in redb).
        let seq = durable
            .wal
            .append(&changes)
            .map_err(|e| durable.halt(format!("appending to the write-ahead log: {e}")))?;
        let checkpoint = durable.checkpoint_due();
        let committed = (|| {
            if checkpoint {
                txn.set_durability(Durability::Immediate)
                    .map_err(|e| StoreError::redb("setting durability", e))?;
                write_checkpoint_seq(&txn, seq)?;
            }
            txn.commit()
                .map_err(|e| StoreError::redb("committing a batch", e))
        })();
        if let Err(e) = committed {
            // The log holds a batch the database refused: stop, and let recovery apply it.
            return Err(durable.halt(format!("the database refused a logged batch: {e}")));
        }
        if checkpoint {
            durable.checkpointed(seq);
        }
        Ok(())
    });
    match result {
        Ok(()) => {
            let mut counts = pending.lock().unwrap_or_else(PoisonError::into_inner);
            for d in &deltas {
                match d {
                    Delta::Add(meta) => counts.add_key(meta),
                    Delta::Remove(meta) => counts.remove_key(meta),
                    Delta::Taken { master, slave } => counts.sub(master, slave, 1),
                    Delta::Wrote => {}
                }
            }
            drop(counts);
            outcomes.into_iter().for_each(Outcome::answer);
        }
        Err(err) => {
            tracing::error!(error = %err, "key store batch failed; nothing of it was written");
            // Successes become the batch error; operations that failed on their own keep
            // their own answer, since nothing of them was written either way.
            for o in outcomes {
                o.fail_if_ok(&err).answer();
            }
        }
    }
}

/// A write transaction that commits without durability unless a checkpoint asks for it:
/// the write-ahead log makes each batch durable.
fn begin(db: &Database) -> Result<WriteTransaction, StoreError> {
    let mut txn = db
        .begin_write()
        .map_err(|e| StoreError::redb("starting a write transaction", e))?;
    txn.set_durability(Durability::None)
        .map_err(|e| StoreError::redb("setting durability", e))?;
    Ok(txn)
}

/// Applies every request in order, recording a delta for every write. An `Err` is a storage
/// failure that makes the whole transaction unusable.
fn apply_all(
    txn: &WriteTransaction,
    cipher: &Cipher,
    batch: Vec<Request>,
    outcomes: &mut Vec<Outcome>,
    deltas: &mut Vec<Delta>,
    changes: &mut Vec<Change>,
) -> Result<(), StoreError> {
    let mut table = txn
        .open_table(KEYS)
        .map_err(|e| StoreError::redb("opening the keys table", e))?;
    let mut ready = txn
        .open_table(READY)
        .map_err(|e| StoreError::redb("opening the ready-key table", e))?;
    let mut queue = batch.into_iter();
    while let Some(request) = queue.next() {
        let mut tables = Tables {
            keys: &mut table,
            ready: &mut ready,
            changes: &mut *changes,
        };
        let step = match request {
            Request::Insert { keys, reply } => match insert(&mut tables, cipher, keys, deltas) {
                Ok(r) => Ok(Outcome::Insert(reply, r)),
                Err(e) => Err((Outcome::Insert(reply, Err(clone_batch_error(&e))), e)),
            },
            Request::Take {
                caller,
                masters,
                ids,
                now,
                reply,
            } => match take(&mut tables, cipher, &caller, &masters, &ids, now, deltas) {
                Ok(r) => Ok(Outcome::Take(reply, r)),
                Err(e) => Err((
                    Outcome::Take(reply, Err(TakeError::Store(clone_batch_error(&e)))),
                    e,
                )),
            },
            Request::Purge {
                now,
                ids,
                ready,
                reply,
            } => match purge(&mut tables, now, &ids, &ready, deltas) {
                Ok(r) => Ok(Outcome::Purge(reply, r)),
                Err(e) => Err((Outcome::Purge(reply, Err(clone_batch_error(&e))), e)),
            },
            Request::PoolRemove { link, seqs, reply } => {
                match pool_remove(&mut tables, &link, &seqs, deltas) {
                    Ok(r) => Ok(Outcome::Purge(reply, Ok(r))),
                    Err(e) => Err((Outcome::Purge(reply, Err(clone_batch_error(&e))), e)),
                }
            }
            Request::Destroy { ids, reply } => match destroy(&mut tables, &ids, deltas) {
                Ok(r) => Ok(Outcome::Purge(reply, Ok(r))),
                Err(e) => Err((Outcome::Purge(reply, Err(clone_batch_error(&e))), e)),
            },
            Request::PoolInsert { link, keys, reply } => {
                match pool_insert(&mut tables, cipher, &link, keys, deltas) {
                    Ok(r) => Ok(Outcome::Insert(reply, r)),
                    Err(e) => Err((Outcome::Insert(reply, Err(clone_batch_error(&e))), e)),
                }
            }
            Request::PoolBind {
                link,
                grants,
                now,
                reply,
            } => match pool_bind(&mut tables, cipher, &link, grants, now, deltas) {
                Ok(r) => Ok(Outcome::Take(reply, r)),
                Err(e) => Err((
                    Outcome::Take(reply, Err(TakeError::Store(clone_batch_error(&e)))),
                    e,
                )),
            },
        };
        match step {
            Ok(outcome) => {
                outcomes.push(outcome);
            }
            Err((failed, err)) => {
                // The transaction is unusable: every operation of the batch, reached or not,
                // is answered with this error and nothing is committed.
                outcomes.push(failed);
                outcomes.extend(queue.map(|r| Outcome::failed(r, &err)));
                return Err(err);
            }
        }
    }
    Ok(())
}

type KeysTable<'t> = Table<'t, u128, &'static [u8]>;
type ReadyTable<'t> = Table<'t, (&'static str, u64), &'static [u8]>;

/// The tables of one write transaction: ordinary keys and ready (pool) keys. Every write
/// goes through it, so that it is also recorded for the write-ahead log.
struct Tables<'a, 't> {
    keys: &'a mut KeysTable<'t>,
    ready: &'a mut ReadyTable<'t>,
    changes: &'a mut Vec<Change>,
}

impl Tables<'_, '_> {
    /// Whether `id` is stored as an ordinary key.
    fn has_key(&self, id: Uuid) -> Result<bool, StoreError> {
        Ok(self.keys.get(id.as_u128()).map_err(read_error)?.is_some())
    }

    fn put_key(&mut self, id: Uuid, value: Vec<u8>) -> Result<(), StoreError> {
        self.keys
            .insert(id.as_u128(), value.as_slice())
            .map_err(write_error)?;
        self.changes.push(Change::PutKey(id.as_u128(), value));
        Ok(())
    }

    /// Deletes a key record; whether there was one.
    fn del_key(&mut self, id: Uuid) -> Result<bool, StoreError> {
        let existed = self
            .keys
            .remove(id.as_u128())
            .map_err(write_error)?
            .is_some();
        if existed {
            self.changes.push(Change::DelKey(id.as_u128()));
        }
        Ok(existed)
    }

    fn put_ready(&mut self, link: &str, seq: u64, value: Vec<u8>) -> Result<(), StoreError> {
        self.ready
            .insert((link, seq), value.as_slice())
            .map_err(write_error)?;
        self.changes
            .push(Change::PutReady(link.to_owned(), seq, value));
        Ok(())
    }

    /// Deletes a ready key; whether there was one.
    fn del_ready(&mut self, link: &str, seq: u64) -> Result<bool, StoreError> {
        let existed = self
            .ready
            .remove((link, seq))
            .map_err(write_error)?
            .is_some();
        if existed {
            self.changes.push(Change::DelReady(link.to_owned(), seq));
        }
        Ok(existed)
    }
}

fn read_error(e: redb::StorageError) -> StoreError {
    StoreError::redb("reading a key record", e)
}

fn write_error(e: redb::StorageError) -> StoreError {
    StoreError::redb("writing a key record", e)
}

fn insert(
    tables: &mut Tables<'_, '_>,
    cipher: &Cipher,
    keys: Vec<NewKey>,
    deltas: &mut Vec<Delta>,
) -> Result<Result<(), StoreError>, StoreError> {
    let checked = check_insert(&keys, |id| tables.has_key(id))?;
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
        let (nonce, sealed) = cipher.seal(k.material.as_bytes(), &aad(k.id, &k.master))?;
        let record = Record {
            meta,
            nonce,
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
    tables: &mut Tables<'_, '_>,
    encoded: Vec<Sealed>,
    deltas: &mut Vec<Delta>,
) -> Result<(), StoreError> {
    for (id, bytes, meta) in encoded {
        tables.put_key(id, bytes)?;
        deltas.push(Delta::Add(meta));
    }
    Ok(())
}

fn take(
    tables: &mut Tables<'_, '_>,
    cipher: &Cipher,
    caller: &str,
    masters: &[String],
    ids: &[Uuid],
    now: u64,
    deltas: &mut Vec<Delta>,
) -> Result<Result<Vec<DeliveredKey>, TakeError>, StoreError> {
    let mut records = Vec::with_capacity(ids.len());
    for id in ids {
        let raw = tables.keys.get(id.as_u128()).map_err(read_error)?;
        let record = match raw.map(|v| Record::decode(v.value())).transpose() {
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
        let Some(bytes) = cipher.open(record.nonce, &record.sealed, &aad(*id, &record.meta.master))
        else {
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
        updates.push((*id, value, master));
    }
    for (id, value, master) in updates {
        match value {
            None => {
                tables.del_key(id)?;
            }
            Some(v) => tables.put_key(id, v)?,
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
fn purge(
    tables: &mut Tables<'_, '_>,
    now: u64,
    ids: &[Uuid],
    ready: &[(String, u64)],
    deltas: &mut Vec<Delta>,
) -> Result<Result<u64, StoreError>, StoreError> {
    let mut expired = Vec::new();
    for id in ids {
        if let Some(raw) = tables.keys.get(id.as_u128()).map_err(read_error)? {
            if let Ok(r) = Record::decode(raw.value()) {
                if r.meta.expires_at <= now {
                    expired.push((*id, r.meta));
                }
            }
        }
    }
    let mut expired_ready = Vec::new();
    for (link, seq) in ready {
        if let Some(raw) = tables
            .ready
            .get((link.as_str(), *seq))
            .map_err(read_error)?
        {
            let head = split_ready(raw.value()).and_then(|(_, record)| Record::head(record));
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

/// Removes the given ordinary keys whatever their entitlements; unknown IDs are skipped.
fn destroy(
    tables: &mut Tables<'_, '_>,
    ids: &[Uuid],
    deltas: &mut Vec<Delta>,
) -> Result<u64, StoreError> {
    let mut count = 0;
    for id in ids {
        // Read before deleting, for the pending counts (a rare path: failed requests).
        let Some(raw) = tables
            .keys
            .get(id.as_u128())
            .map_err(read_error)?
            .map(|v| v.value().to_vec())
        else {
            continue;
        };
        tables.del_key(*id)?;
        count += 1;
        match Record::decode(&raw) {
            Ok(record) => deltas.push(Delta::Remove(record.meta)),
            Err(reason) => {
                tracing::warn!(key_id = %id, %reason, "destroyed a corrupt key record");
                deltas.push(Delta::Wrote);
            }
        }
    }
    Ok(count)
}

/// Removes the ready keys at these positions of `link`; empty positions are skipped.
fn pool_remove(
    tables: &mut Tables<'_, '_>,
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
fn pool_insert(
    tables: &mut Tables<'_, '_>,
    cipher: &Cipher,
    link: &str,
    keys: Vec<PoolKey>,
    deltas: &mut Vec<Delta>,
) -> Result<Result<(), StoreError>, StoreError> {
    let taken = |slot: crate::Slot| -> Result<bool, StoreError> {
        Ok(tables.has_key(slot.id)?
            || tables
                .ready
                .get((link, slot.seq))
                .map_err(read_error)?
                .is_some())
    };
    if let Err(e) = check_pool_insert(link, &keys, taken)? {
        return Ok(Err(e));
    }
    let mut encoded = Vec::with_capacity(keys.len());
    for k in &keys {
        let id = k.slot.id;
        let (nonce, sealed) = match cipher.seal(k.material.as_bytes(), &aad(id, link)) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let record = Record {
            meta: KeyMeta::new(link, &[], k.expires_at),
            nonce,
            sealed,
        };
        match record.encode() {
            Ok(bytes) => encoded.push((k.slot.seq, ready_value(id, &bytes))),
            Err(reason) => return Ok(Err(StoreError::InvalidKey { id, reason })),
        }
    }
    for (seq, value) in encoded {
        tables.put_ready(link, seq, value)?;
    }
    deltas.push(Delta::Wrote);
    Ok(Ok(()))
}

/// Moves ready keys of `link` out of the pool: checks and opens every one before writing,
/// then deletes them and stores the bound ones as ordinary keys.
fn pool_bind(
    tables: &mut Tables<'_, '_>,
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
        let Some(raw) = tables.ready.get((link, slot.seq)).map_err(read_error)? else {
            return Ok(Err(TakeError::NotFound));
        };
        let corrupt = |reason| {
            Ok(Err(TakeError::Store(StoreError::CorruptRecord {
                id: slot.id,
                reason,
            })))
        };
        let (id, record) = match split_ready(raw.value()) {
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
