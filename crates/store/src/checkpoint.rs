//! The checkpoint thread of [`crate::EmbeddedStore`]: writes a frozen overlay (see
//! `overlay`) to redb in one durable commit, off the writer thread, so batches keep being
//! logged and answered while redb files a second's worth of changes.

use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use metrics::Label;
use redb::{Database, Durability};

use crate::overlay::Overlay;
use crate::schema::{self, write_checkpoint_seq};
use crate::StoreError;

/// A frozen overlay and the sequence number of the last log record it holds.
struct Job {
    overlay: Arc<Overlay>,
    seq: u64,
}

/// The handle the writer keeps: one checkpoint in flight at a time.
pub(crate) struct Checkpointer {
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Result<u64, StoreError>>,
    handle: Option<JoinHandle<()>>,
    /// Of the store's metrics (its KME, see `EmbeddedStore::open_for_kme`).
    labels: Arc<[Label]>,
}

impl Checkpointer {
    /// Starts the checkpoint thread for `db`, its metrics labelled with `labels`.
    pub(crate) fn start(db: Arc<Database>, labels: Arc<[Label]>) -> Result<Self, StoreError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (report, done) = mpsc::channel();
        let thread_labels = Arc::clone(&labels);
        let handle = std::thread::Builder::new()
            .name("dqkd-store-checkpoint".into())
            .spawn(move || {
                for job in queue {
                    let result =
                        apply(&db, &job.overlay, job.seq, &thread_labels).map(|()| job.seq);
                    if report.send(result).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| StoreError::io("starting the key store checkpoint thread", e))?;
        Ok(Self {
            jobs: Some(jobs),
            done,
            handle: Some(handle),
            labels,
        })
    }

    /// The labels of the store's metrics.
    pub(crate) fn labels(&self) -> &[Label] {
        &self.labels
    }

    /// Hands a frozen overlay to the thread.
    pub(crate) fn submit(&self, overlay: Arc<Overlay>, seq: u64) -> Result<(), StoreError> {
        self.jobs
            .as_ref()
            .and_then(|jobs| jobs.send(Job { overlay, seq }).ok())
            .ok_or_else(thread_gone)
    }

    /// The outcome of the checkpoint in flight: `None` while it runs, else the sequence
    /// number it covers.
    pub(crate) fn poll(&self) -> Option<Result<u64, StoreError>> {
        match self.done.try_recv() {
            Ok(result) => Some(result),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => Some(Err(thread_gone())),
        }
    }

    /// Waits for the checkpoint in flight.
    pub(crate) fn wait(&self) -> Result<u64, StoreError> {
        self.done.recv().unwrap_or_else(|_| Err(thread_gone()))
    }

    /// Lets the thread finish and waits for it.
    pub(crate) fn stop(&mut self) {
        drop(self.jobs.take());
        if let Some(handle) = self.handle.take() {
            if handle.join().is_err() {
                tracing::error!("key store checkpoint thread panicked");
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn thread_gone() -> StoreError {
    StoreError::Halted {
        reason: "the checkpoint thread stopped".into(),
    }
}

/// Writes every change of `overlay` to redb, with the log position `seq` it covers, in one
/// durable commit.
pub(crate) fn apply(
    db: &Database,
    overlay: &Overlay,
    seq: u64,
    labels: &[Label],
) -> Result<(), StoreError> {
    let started = Instant::now();
    let mut txn = db
        .begin_write()
        .map_err(|e| StoreError::redb("starting a checkpoint", e))?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| StoreError::redb("setting durability", e))?;
    schema::apply(&txn, schema::edits_of(overlay), "writing a checkpoint")?;
    write_checkpoint_seq(&txn, seq)?;
    txn.commit()
        .map_err(|e| StoreError::redb("committing a checkpoint", e))?;
    metrics::histogram!("dqkd_store_checkpoint_seconds", labels.iter())
        .record(started.elapsed().as_secs_f64());
    metrics::histogram!("dqkd_store_checkpoint_entries", labels.iter())
        .record(overlay.len() as f64);
    Ok(())
}
