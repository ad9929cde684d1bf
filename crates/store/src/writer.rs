//! The group-commit writer thread of [`crate::EmbeddedStore`].
//!
//! One thread owns the write side of the store. It blocks for the first queued operation,
//! drains whatever else is queued (up to [`MAX_BATCH`]), applies them in arrival order to the
//! in-memory overlay (see `overlay`), appends their changes to the write-ahead log (one fsync
//! for the whole batch, see `wal`), and only then answers each caller. About once a second it
//! freezes the overlay, rotates the log and hands the frozen changes to the checkpoint thread
//! (see `checkpoint`), which files them in redb. Each operation is validated against the state
//! the earlier operations of the batch left behind, before it writes anything, so a failing
//! operation leaves no trace and does not disturb the others, and two takes of the same key
//! can never both succeed. Pending counts change only after the batch is on disk.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redb::{
    Database, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable, WriteTransaction,
};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::checkpoint::{self, Checkpointer};
use crate::embedded::{ready_key, ready_value, split_ready, IN_FLIGHT, KEYS, META, READY, WAL_SEQ};
use crate::expiry::{Lifetimes, Seen};
use crate::kek::Cipher;
use crate::meta::{
    check_insert, check_pool_insert, check_take, pool_bind_slots, pool_bound_keys, KeyMeta,
    PendingCounts,
};
use crate::overlay::Overlay;
use crate::record::{aad, Record, VERSION};
use crate::wal::{Batch, Wal};
use crate::{
    DeliveredKey, InFlight, KeyMaterial, NewKey, PoolGrant, PoolKey, ReadyKey, StoreError,
    TakeError,
};

/// Upper bound on operations per transaction, to bound the latency of the first caller.
const MAX_BATCH: usize = 1024;

/// One operation sent to the writer with the channel for its answer.
pub(crate) enum Request {
    /// Stores keys; deletes the in-flight record `answered` with them.
    Insert {
        keys: Vec<NewKey>,
        answered: Option<Uuid>,
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
    /// Purges the expired keys that only the overlays hold (a scan of redb cannot see them).
    PurgeRecent {
        now: u64,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    /// Destroys `ids`; with `masters`, only if every one that exists was made for one of
    /// them (else nothing changes).
    Destroy {
        ids: Vec<Uuid>,
        masters: Option<Vec<String>>,
        reply: oneshot::Sender<Result<u64, TakeError>>,
    },
    PoolInsert {
        link: String,
        keys: Vec<PoolKey>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Binds ready keys; deletes the in-flight record `answered` with them.
    PoolBind {
        link: String,
        grants: Vec<PoolGrant>,
        now: u64,
        answered: Option<Uuid>,
        reply: oneshot::Sender<Result<Vec<DeliveredKey>, TakeError>>,
    },
    PoolRemove {
        link: String,
        seqs: Vec<u64>,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    /// Writes the encoded in-flight record of request `id`.
    RecordInFlight {
        id: Uuid,
        value: Vec<u8>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Deletes in-flight records.
    ForgetInFlight {
        ids: Vec<Uuid>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// A read of the in-flight records of `owner` (only the writer sees the overlay).
    InFlight {
        owner: String,
        reply: oneshot::Sender<Result<Vec<InFlight>, StoreError>>,
    },
    /// A read, served here because only the writer sees the overlay.
    PoolPage {
        link: String,
        from: u64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<ReadyKey>, StoreError>>,
    },
}

/// Shared group-commit counters, and what the expiry sweeps go by.
#[derive(Debug)]
pub(crate) struct Stats {
    pub(crate) batches: AtomicU64,
    pub(crate) ops: AtomicU64,
    pub(crate) max_batch: AtomicU64,
    /// Of ordinary keys: all read at open.
    pub(crate) lifetimes: Lifetimes,
    /// Of ready keys: known once a whole sweep has read them.
    pub(crate) ready_lifetimes: Lifetimes,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            batches: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            max_batch: AtomicU64::new(0),
            lifetimes: Lifetimes::new(true),
            ready_lifetimes: Lifetimes::new(false),
        }
    }
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
    Page(
        oneshot::Sender<Result<Vec<ReadyKey>, StoreError>>,
        Result<Vec<ReadyKey>, StoreError>,
    ),
    Destroy(
        oneshot::Sender<Result<u64, TakeError>>,
        Result<u64, TakeError>,
    ),
    InFlight(
        oneshot::Sender<Result<Vec<InFlight>, StoreError>>,
        Result<Vec<InFlight>, StoreError>,
    ),
}

impl Outcome {
    /// The answer for an operation the batch never reached.
    fn failed(request: Request, err: &StoreError) -> Self {
        let e = || clone_batch_error(err);
        match request {
            Request::Insert { reply, .. }
            | Request::PoolInsert { reply, .. }
            | Request::RecordInFlight { reply, .. }
            | Request::ForgetInFlight { reply, .. } => Outcome::Insert(reply, Err(e())),
            Request::InFlight { reply, .. } => Outcome::InFlight(reply, Err(e())),
            Request::Take { reply, .. } | Request::PoolBind { reply, .. } => {
                Outcome::Take(reply, Err(TakeError::Store(e())))
            }
            Request::Purge { reply, .. }
            | Request::PurgeRecent { reply, .. }
            | Request::PoolRemove { reply, .. } => Outcome::Purge(reply, Err(e())),
            Request::Destroy { reply, .. } => Outcome::Destroy(reply, Err(TakeError::Store(e()))),
            Request::PoolPage { reply, .. } => Outcome::Page(reply, Err(e())),
        }
    }

    /// Replaces a success with `err` (the commit failed, so nothing of it is on disk).
    fn fail_if_ok(self, err: &StoreError) -> Self {
        let e = || clone_batch_error(err);
        match self {
            Outcome::Insert(tx, Ok(())) => Outcome::Insert(tx, Err(e())),
            Outcome::Take(tx, Ok(_)) => Outcome::Take(tx, Err(TakeError::Store(e()))),
            Outcome::Purge(tx, Ok(_)) => Outcome::Purge(tx, Err(e())),
            Outcome::Page(tx, Ok(_)) => Outcome::Page(tx, Err(e())),
            Outcome::Destroy(tx, Ok(_)) => Outcome::Destroy(tx, Err(TakeError::Store(e()))),
            Outcome::InFlight(tx, Ok(_)) => Outcome::InFlight(tx, Err(e())),
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
            Outcome::Destroy(tx, r) => tx.send(r).is_err(),
            // A reader that went away lost nothing.
            Outcome::Page(tx, r) => {
                let _ = tx.send(r);
                false
            }
            Outcome::InFlight(tx, r) => {
                let _ = tx.send(r);
                false
            }
        };
        if gone {
            tracing::warn!("caller went away before its committed key delivery was answered");
        }
    }
}

/// The error a whole batch failed with, for each of its callers. A redb error is shared
/// (`Arc`); any other stops the store (see `Durable::halt`), which is what every caller is
/// told, with the cause.
fn clone_batch_error(err: &StoreError) -> StoreError {
    match err {
        StoreError::Redb { context, source } => StoreError::Redb {
            context,
            source: Arc::clone(source),
        },
        StoreError::Halted { reason } => StoreError::Halted {
            reason: reason.clone(),
        },
        other => StoreError::Halted {
            reason: other.to_string(),
        },
    }
}

/// A checkpoint (the overlay filed in redb by one durable commit, after which the log's
/// older file is deleted) at least this often while batches arrive, so the log and the
/// overlay stay small and recovery short.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// ... or as soon as the log holds this much (large refills).
const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;
/// While a checkpoint runs, new batches wait for it once the log holds this much, so a
/// store slower than its load pushes back instead of growing the overlay without bound.
const BACKLOG_BYTES: u64 = 4 * CHECKPOINT_BYTES;

/// The write-ahead log, the overlay, the checkpoint thread and the writer's health.
pub(crate) struct Durable {
    wal: Wal,
    /// Changes since the last freeze.
    active: Overlay,
    /// Changes being filed in redb by the checkpoint thread.
    frozen: Option<Arc<Overlay>>,
    checkpointer: Checkpointer,
    last_checkpoint: Instant,
    /// Sequence number of the last record covered by a durable commit.
    checkpointed: u64,
    /// Why the store stopped writing, once a write failed part-way.
    halted: Option<String>,
}

impl Durable {
    pub(crate) fn new(wal: Wal, checkpointed: u64, checkpointer: Checkpointer) -> Self {
        Self {
            wal,
            active: Overlay::default(),
            frozen: None,
            checkpointer,
            last_checkpoint: Instant::now(),
            checkpointed,
            halted: None,
        }
    }

    fn halt(&mut self, reason: String) -> StoreError {
        tracing::error!(%reason, "key store stopped writing; restart the KME to recover from its log");
        self.halted = Some(reason.clone());
        StoreError::Halted { reason }
    }

    /// Takes the result of the checkpoint in flight, if it has one (waiting for it when
    /// `wait`): the frozen overlay is then in redb and the log's older file can go.
    fn collect(&mut self, wait: bool) {
        if self.frozen.is_none() {
            return;
        }
        let result = if wait {
            self.checkpointer.wait()
        } else {
            match self.checkpointer.poll() {
                Some(result) => result,
                None => return,
            }
        };
        self.frozen = None;
        match result {
            Ok(seq) => {
                self.checkpointed = seq;
                if let Err(e) = self.wal.discard_previous() {
                    // Its records are all covered, so recovery skips them.
                    tracing::warn!(path = %self.wal.path().display(), error = %e, "could not delete the checkpointed write-ahead log");
                }
            }
            Err(e) => {
                self.halt(format!("a checkpoint failed: {e}"));
            }
        }
    }

    /// Starts a checkpoint when one is due and none is running; waits for the running one
    /// when the log has grown past [`BACKLOG_BYTES`].
    fn maybe_checkpoint(&mut self) {
        if self.halted.is_some() {
            return;
        }
        self.collect(false);
        if self.frozen.is_some() {
            if self.wal.len() < BACKLOG_BYTES {
                return;
            }
            self.collect(true);
            if self.halted.is_some() {
                return;
            }
        }
        let due = self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY
            || self.wal.len() >= CHECKPOINT_BYTES;
        if !due {
            return;
        }
        self.last_checkpoint = Instant::now();
        let last = self.wal.next_seq() - 1;
        if last <= self.checkpointed {
            return;
        }
        // Even an empty overlay (every change cancelled out) is checkpointed: it moves the
        // recorded log position, so the log's older file can be deleted.
        if let Err(e) = self.wal.rotate() {
            self.halt(format!("rotating the write-ahead log: {e}"));
            return;
        }
        let frozen = Arc::new(std::mem::take(&mut self.active));
        if let Err(e) = self.checkpointer.submit(Arc::clone(&frozen), last) {
            self.halt(format!("starting a checkpoint: {e}"));
            return;
        }
        self.frozen = Some(frozen);
    }

    /// At close: waits for the checkpoint in flight, files the rest of the overlay, and
    /// empties the log.
    fn finish(&mut self, db: &Database) -> Result<(), StoreError> {
        self.collect(true);
        if let Some(reason) = &self.halted {
            return Err(StoreError::Halted {
                reason: reason.clone(),
            });
        }
        let last = self.wal.next_seq() - 1;
        if last > self.checkpointed {
            checkpoint::apply(db, &self.active, last)?;
            self.checkpointed = last;
        }
        self.wal
            .start_over()
            .map_err(|e| StoreError::io(format!("emptying {}", self.wal.path().display()), e))
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
    loop {
        // Wake up now and then even when idle, so the last changes reach redb and the log
        // stays short.
        let first = match requests.recv_timeout(CHECKPOINT_EVERY) {
            Ok(first) => first,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                durable.maybe_checkpoint();
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
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
        durable.collect(false);
        process(&db, &cipher, batch, &pending, &stats, &mut durable);
        durable.maybe_checkpoint();
        metrics::histogram!("dqkd_store_commit_ops").record(n as f64);
        metrics::histogram!("dqkd_store_commit_seconds").record(started.elapsed().as_secs_f64());
    }
    if let Err(e) = durable.finish(&db) {
        tracing::warn!(error = %e, "final checkpoint failed; the log is applied at the next open");
    }
    durable.checkpointer.stop();
    tracing::debug!("key store writer stopped");
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

/// Applies, logs and answers one batch.
fn process(
    db: &Database,
    cipher: &Cipher,
    batch: Vec<Request>,
    pending: &Mutex<PendingCounts>,
    stats: &Stats,
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
    // A snapshot of redb for what the overlays do not hold. Taken after the last collected
    // checkpoint, or else under the frozen overlay that checkpoint filed: correct either way.
    let base = match Base::open(db) {
        Ok(base) => base,
        Err(err) => {
            tracing::error!(error = %err, "key store batch could not start");
            for r in batch {
                Outcome::failed(r, &err).answer();
            }
            return;
        }
    };
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut deltas = Vec::new();
    let mut changes = Batch::default();
    let mut tables = Tables {
        active: &mut durable.active,
        frozen: durable.frozen.as_deref(),
        base: &base,
        changes: &mut changes,
        lifetimes: Seen::default(),
        ready_lifetimes: Seen::default(),
    };
    let applied = apply_all(&mut tables, cipher, batch, &mut outcomes, &mut deltas);
    // Published whatever happens next: a lifetime too short only widens the sweeps.
    stats.lifetimes.publish(tables.lifetimes);
    stats.ready_lifetimes.publish(tables.ready_lifetimes);
    let result = match applied {
        // The overlay may hold part of the batch: stop, and let recovery start from the log.
        Err(e) => Err(durable.halt(format!("a batch failed part-way: {e}"))),
        // Every write records a change, so none means nothing to make durable: no log
        // record, no flush (a batch of only refused takes costs no disk write).
        Ok(()) if changes.is_empty() => Ok(()),
        // Once the record is on disk the batch survives a crash.
        Ok(()) => match durable.wal.append_batch(&mut changes) {
            Ok(_) => Ok(()),
            Err(e) => Err(durable.halt(format!("appending to the write-ahead log: {e}"))),
        },
    };
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

/// redb as of its last checkpoint, read-only: one consistent snapshot of both tables.
pub(crate) struct Base {
    pub(crate) keys: ReadOnlyTable<u128, &'static [u8]>,
    pub(crate) ready: ReadOnlyTable<(&'static str, u64), &'static [u8]>,
    pub(crate) in_flight: ReadOnlyTable<u128, &'static [u8]>,
    // Kept open for the tables' snapshot.
    _txn: ReadTransaction,
}

impl Base {
    pub(crate) fn open(db: &Database) -> Result<Self, StoreError> {
        let txn = db
            .begin_read()
            .map_err(|e| StoreError::redb("starting a read transaction", e))?;
        let keys = txn
            .open_table(KEYS)
            .map_err(|e| StoreError::redb("opening the keys table", e))?;
        let ready = txn
            .open_table(READY)
            .map_err(|e| StoreError::redb("opening the ready-key table", e))?;
        let in_flight = txn
            .open_table(IN_FLIGHT)
            .map_err(|e| StoreError::redb("opening the in-flight table", e))?;
        Ok(Self {
            keys,
            ready,
            in_flight,
            _txn: txn,
        })
    }
}

/// Applies every request in order, recording a delta for every write. An `Err` is a storage
/// failure that makes the whole transaction unusable.
fn apply_all(
    tables: &mut Tables<'_>,
    cipher: &Cipher,
    batch: Vec<Request>,
    outcomes: &mut Vec<Outcome>,
    deltas: &mut Vec<Delta>,
) -> Result<(), StoreError> {
    let mut queue = batch.into_iter();
    while let Some(request) = queue.next() {
        let step = match request {
            Request::Insert {
                keys,
                answered,
                reply,
            } => match insert(tables, cipher, keys, deltas)
                .and_then(|r| answer_in_flight(tables, r, answered))
            {
                Ok(r) => Ok(Outcome::Insert(reply, r)),
                Err(e) => Err((Outcome::Insert(reply, Err(clone_batch_error(&e))), e)),
            },
            Request::RecordInFlight { id, value, reply } => match tables.put_in_flight(id, value) {
                Ok(()) => Ok(Outcome::Insert(reply, Ok(()))),
                Err(e) => Err((Outcome::Insert(reply, Err(clone_batch_error(&e))), e)),
            },
            Request::ForgetInFlight { ids, reply } => {
                match ids.iter().try_for_each(|id| tables.del_in_flight(*id)) {
                    Ok(()) => Ok(Outcome::Insert(reply, Ok(()))),
                    Err(e) => Err((Outcome::Insert(reply, Err(clone_batch_error(&e))), e)),
                }
            }
            // A read writes nothing: its failure is its caller's alone.
            Request::InFlight { owner, reply } => {
                Ok(Outcome::InFlight(reply, in_flight_of(tables, &owner)))
            }
            Request::Take {
                caller,
                masters,
                ids,
                now,
                reply,
            } => match take(tables, cipher, &caller, &masters, &ids, now, deltas) {
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
            } => match purge(tables, now, &ids, &ready, deltas) {
                Ok(r) => Ok(Outcome::Purge(reply, r)),
                Err(e) => Err((Outcome::Purge(reply, Err(clone_batch_error(&e))), e)),
            },
            Request::PurgeRecent { now, reply } => {
                let (ids, ready) = expired_in_overlays(tables, now);
                match purge(tables, now, &ids, &ready, deltas) {
                    Ok(r) => Ok(Outcome::Purge(reply, r)),
                    Err(e) => Err((Outcome::Purge(reply, Err(clone_batch_error(&e))), e)),
                }
            }
            Request::PoolRemove { link, seqs, reply } => {
                match pool_remove(tables, &link, &seqs, deltas) {
                    Ok(r) => Ok(Outcome::Purge(reply, Ok(r))),
                    Err(e) => Err((Outcome::Purge(reply, Err(clone_batch_error(&e))), e)),
                }
            }
            Request::Destroy {
                ids,
                masters,
                reply,
            } => match destroy(tables, &ids, masters.as_deref(), deltas) {
                Ok(r) => Ok(Outcome::Destroy(reply, r)),
                Err(e) => Err((
                    Outcome::Destroy(reply, Err(TakeError::Store(clone_batch_error(&e)))),
                    e,
                )),
            },
            Request::PoolInsert { link, keys, reply } => {
                match pool_insert(tables, cipher, &link, keys, deltas) {
                    Ok(r) => Ok(Outcome::Insert(reply, r)),
                    Err(e) => Err((Outcome::Insert(reply, Err(clone_batch_error(&e))), e)),
                }
            }
            Request::PoolPage {
                link,
                from,
                limit,
                reply,
            } => {
                // A read writes nothing, so its failure (a corrupt ready key, say) is its
                // caller's alone: the batch goes on.
                Ok(Outcome::Page(reply, pool_page(tables, &link, from, limit)))
            }
            Request::PoolBind {
                link,
                grants,
                now,
                answered,
                reply,
            } => match pool_bind(tables, cipher, &link, grants, now, deltas)
                .and_then(|r| answer_in_flight(tables, r, answered))
            {
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

/// The store as one batch sees it: the active overlay it writes to, over the frozen one
/// being checkpointed, over redb. Every write goes through it, so that it is also recorded
/// for the write-ahead log.
struct Tables<'a> {
    active: &'a mut Overlay,
    frozen: Option<&'a Overlay>,
    base: &'a Base,
    changes: &'a mut Batch,
    /// Lifetimes of the keys and ready keys written, for the expiry sweeps (see `expiry`).
    lifetimes: Seen,
    ready_lifetimes: Seen,
}

impl Tables<'_> {
    /// The encoded record of ordinary key `id`, from the newest layer that knows it.
    fn key(&self, id: Uuid) -> Result<Option<Vec<u8>>, StoreError> {
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
    fn has_key(&self, id: Uuid) -> Result<bool, StoreError> {
        self.has_key_with(id, true)
    }

    /// Whether `id` is stored as an ordinary key, reading redb only if `in_base` (the
    /// caller knows redb has none in a range holding `id`).
    fn has_key_with(&self, id: Uuid, in_base: bool) -> Result<bool, StoreError> {
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
    fn base_has_no_key_in(&self, lo: u128, hi: u128) -> Result<bool, StoreError> {
        match self.base.keys.range(lo..=hi).map_err(read_error)?.next() {
            None => Ok(true),
            Some(Ok(_)) => Ok(false),
            Some(Err(e)) => Err(read_error(e)),
        }
    }

    /// The value at position `seq` of the pool of `link`, from the newest layer that
    /// knows it.
    fn ready(&self, link: &str, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
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
    fn put_key(
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
    fn del_key(&mut self, id: Uuid) -> Result<(), StoreError> {
        self.changes.del_key(id.as_u128()).map_err(log_error)?;
        self.active.keys.delete(id.as_u128());
        Ok(())
    }

    /// Writes a ready key (which expires at `expires_at`) into a position the caller found
    /// empty.
    fn put_new_ready(
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
    fn has_in_flight(&self, id: Uuid) -> Result<bool, StoreError> {
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
    fn put_in_flight(&mut self, id: Uuid, value: Vec<u8>) -> Result<(), StoreError> {
        let absent = !self.has_in_flight(id)?;
        self.changes
            .put_in_flight(id.as_u128(), &value)
            .map_err(log_error)?;
        self.active.in_flight.put(id.as_u128(), value, absent);
        Ok(())
    }

    /// Deletes the in-flight record of request `id`, if it has one.
    fn del_in_flight(&mut self, id: Uuid) -> Result<(), StoreError> {
        if self.has_in_flight(id)? {
            self.changes
                .del_in_flight(id.as_u128())
                .map_err(log_error)?;
            self.active.in_flight.delete(id.as_u128());
        }
        Ok(())
    }

    /// Deletes a ready key; whether there was one.
    fn del_ready(&mut self, link: &str, seq: u64) -> Result<bool, StoreError> {
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

fn insert(
    tables: &mut Tables<'_>,
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
    tables: &mut Tables<'_>,
    encoded: Vec<Sealed>,
    deltas: &mut Vec<Delta>,
) -> Result<(), StoreError> {
    for (id, bytes, meta) in encoded {
        tables.put_key(id, bytes, true, meta.expires_at)?;
        deltas.push(Delta::Add(meta));
    }
    Ok(())
}

fn take(
    tables: &mut Tables<'_>,
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
fn purge(
    tables: &mut Tables<'_>,
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
fn expired_in_overlays(tables: &Tables<'_>, now: u64) -> (Vec<Uuid>, Vec<(String, u64)>) {
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
fn destroy(
    tables: &mut Tables<'_>,
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
fn pool_remove(
    tables: &mut Tables<'_>,
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
    tables: &mut Tables<'_>,
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
fn pool_bind(
    tables: &mut Tables<'_>,
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
fn answer_in_flight<T, E>(
    tables: &mut Tables<'_>,
    result: Result<T, E>,
    answered: Option<Uuid>,
) -> Result<Result<T, E>, StoreError> {
    if let (Ok(_), Some(id)) = (&result, answered) {
        tables.del_in_flight(id)?;
    }
    Ok(result)
}

/// The in-flight records of `owner`: redb's, under the overlays' changes.
fn in_flight_of(tables: &Tables<'_>, owner: &str) -> Result<Vec<InFlight>, StoreError> {
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
fn pool_page(
    tables: &Tables<'_>,
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
