//! The durability side of the embedded store's writer: the write-ahead log that makes each
//! batch survive a crash, the overlay that holds what the log holds and redb does not yet,
//! and when to hand the overlay to the checkpoint thread (see `checkpoint`).
//!
//! A failure here that leaves the overlay and the log out of step halts the store: every
//! later batch is refused, and the next open recovers from the log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::Database;

use crate::checkpoint::{self, Checkpointer};
use crate::overlay::Overlay;
use crate::wal::Wal;
use crate::StoreError;

/// A checkpoint (the overlay filed in redb by one durable commit, after which the log's
/// older file is deleted) at least this often while batches arrive, so the log and the
/// overlay stay small and recovery short.
pub(crate) const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// ... or as soon as the log holds this much (large refills).
const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;
/// While a checkpoint runs, new batches wait for it once the log holds this much, so a
/// store slower than its load pushes back instead of growing the overlay without bound.
const BACKLOG_BYTES: u64 = 4 * CHECKPOINT_BYTES;

/// The write-ahead log, the overlay, the checkpoint thread and the writer's health.
pub(crate) struct Durable {
    pub(crate) wal: Wal,
    /// Changes since the last freeze.
    pub(crate) active: Overlay,
    /// Changes being filed in redb by the checkpoint thread.
    pub(crate) frozen: Option<Arc<Overlay>>,
    checkpointer: Checkpointer,
    last_checkpoint: Instant,
    /// Sequence number of the last record covered by a durable commit.
    checkpointed: u64,
    /// Why the store stopped writing, once a write failed part-way.
    pub(crate) halted: Option<String>,
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

    pub(crate) fn halt(&mut self, reason: String) -> StoreError {
        tracing::error!(%reason, "key store stopped writing; restart the KME to recover from its log");
        self.halted = Some(reason.clone());
        StoreError::Halted { reason }
    }

    /// Takes the result of the checkpoint in flight, if it has one (waiting for it when
    /// `wait`): the frozen overlay is then in redb and the log's older file can go.
    pub(crate) fn collect(&mut self, wait: bool) {
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
    pub(crate) fn maybe_checkpoint(&mut self) {
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
            checkpoint::apply(db, &self.active, last, self.checkpointer.labels())?;
            self.checkpointed = last;
        }
        self.wal
            .start_over()
            .map_err(|e| StoreError::io(format!("emptying {}", self.wal.path().display()), e))
    }

    /// At the writer's end: the final checkpoint, then the checkpoint thread stops.
    pub(crate) fn close(mut self, db: &Database) {
        if let Err(e) = self.finish(db) {
            tracing::warn!(error = %e, "final checkpoint failed; the log is applied at the next open");
        }
        self.checkpointer.stop();
    }
}
