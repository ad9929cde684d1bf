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
//!
//! This file is the loop and the answering; the operations are in `ops`, the layered view
//! they read and write in `layers`, and the log, overlay and checkpoints in `durable`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Instant;

use metrics::Label;
use redb::Database;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::durable::{Durable, CHECKPOINT_EVERY};
use crate::expiry::{Lifetimes, Seen};
use crate::kek::Cipher;
use crate::layers::Layers;
use crate::meta::PendingCounts;
use crate::ops::{self, Delta};
use crate::schema::Base;
use crate::wal::Batch;
use crate::{DeliveredKey, InFlight, NewKey, PoolGrant, PoolKey, ReadyKey, StoreError, TakeError};

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

/// Shared group-commit counters, what the expiry sweeps go by, and the labels of the
/// store's metrics.
#[derive(Debug)]
pub(crate) struct Stats {
    pub(crate) batches: AtomicU64,
    pub(crate) ops: AtomicU64,
    pub(crate) max_batch: AtomicU64,
    /// Of ordinary keys: all read at open.
    pub(crate) lifetimes: Lifetimes,
    /// Of ready keys: known once a whole sweep has read them.
    pub(crate) ready_lifetimes: Lifetimes,
    /// Of every metric the store records (its KME, see `EmbeddedStore::open_for_kme`).
    pub(crate) labels: Arc<[Label]>,
}

impl Stats {
    pub(crate) fn new(labels: Arc<[Label]>) -> Self {
        Self {
            batches: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            max_batch: AtomicU64::new(0),
            lifetimes: Lifetimes::new(true),
            ready_lifetimes: Lifetimes::new(false),
            labels,
        }
    }
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
        StoreError::Redb { context, cause } => StoreError::Redb {
            context,
            cause: Arc::clone(cause),
        },
        StoreError::Halted { reason } => StoreError::Halted {
            reason: reason.clone(),
        },
        other => StoreError::Halted {
            reason: other.to_string(),
        },
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
        metrics::histogram!("dqkd_store_commit_ops", stats.labels.iter()).record(n as f64);
        metrics::histogram!("dqkd_store_commit_seconds", stats.labels.iter())
            .record(started.elapsed().as_secs_f64());
    }
    durable.close(&db);
    tracing::debug!("key store writer stopped");
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
    let mut tables = Layers {
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

/// Applies every request in order, recording a delta for every write. An `Err` is a storage
/// failure that makes the whole transaction unusable.
fn apply_all(
    tables: &mut Layers<'_>,
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
            } => match ops::insert(tables, cipher, keys, deltas)
                .and_then(|r| ops::answer_in_flight(tables, r, answered))
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
                Ok(Outcome::InFlight(reply, ops::in_flight_of(tables, &owner)))
            }
            Request::Take {
                caller,
                masters,
                ids,
                now,
                reply,
            } => match ops::take(tables, cipher, &caller, &masters, &ids, now, deltas) {
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
            } => match ops::purge(tables, now, &ids, &ready, deltas) {
                Ok(r) => Ok(Outcome::Purge(reply, r)),
                Err(e) => Err((Outcome::Purge(reply, Err(clone_batch_error(&e))), e)),
            },
            Request::PurgeRecent { now, reply } => {
                let (ids, ready) = ops::expired_in_overlays(tables, now);
                match ops::purge(tables, now, &ids, &ready, deltas) {
                    Ok(r) => Ok(Outcome::Purge(reply, r)),
                    Err(e) => Err((Outcome::Purge(reply, Err(clone_batch_error(&e))), e)),
                }
            }
            Request::PoolRemove { link, seqs, reply } => {
                match ops::pool_remove(tables, &link, &seqs, deltas) {
                    Ok(r) => Ok(Outcome::Purge(reply, Ok(r))),
                    Err(e) => Err((Outcome::Purge(reply, Err(clone_batch_error(&e))), e)),
                }
            }
            Request::Destroy {
                ids,
                masters,
                reply,
            } => match ops::destroy(tables, &ids, masters.as_deref(), deltas) {
                Ok(r) => Ok(Outcome::Destroy(reply, r)),
                Err(e) => Err((
                    Outcome::Destroy(reply, Err(TakeError::Store(clone_batch_error(&e)))),
                    e,
                )),
            },
            Request::PoolInsert { link, keys, reply } => {
                match ops::pool_insert(tables, cipher, &link, keys, deltas) {
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
                Ok(Outcome::Page(
                    reply,
                    ops::pool_page(tables, &link, from, limit),
                ))
            }
            Request::PoolBind {
                link,
                grants,
                now,
                answered,
                reply,
            } => match ops::pool_bind(tables, cipher, &link, grants, now, deltas)
                .and_then(|r| ops::answer_in_flight(tables, r, answered))
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
