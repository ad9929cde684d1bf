//! The durable default store: one redb file plus its write-ahead log (see `wal`), key bytes
//! sealed under the site KEK, and all writes funnelled through one group-committing writer
//! thread (see `writer`) that keeps recent changes in memory (see `overlay`) until the
//! checkpoint thread (see `checkpoint`) files them in redb.
//!
//! The handle only forwards operations to the writer and answers `pending` from counts kept in
//! memory, so callers never block on disk except through their own awaited oneshot. Opening
//! the files is in `recovery`, the expiry scan in `sweep`, the table layout in `schema`.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use metrics::Label;
use redb::Database;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::checkpoint::Checkpointer;
use crate::durable::Durable;
use crate::meta::PendingCounts;
use crate::recovery::{prepare, restrict_files, wal_path};
use crate::sweep::expired;
use crate::wal::Wal;
use crate::writer::{self, Request, Stats};
use crate::{
    DeliveredKey, InFlight, Kek, KeyStore, NewKey, PoolGrant, PoolKey, ReadyKey, StoreError,
    TakeError,
};

/// redb's page cache. Its default (1 GiB) would keep every page a start-up scan touched,
/// so a site with a million ready keys would hold half a gigabyte; pages beyond this stay
/// in the operating system's file cache, a copy away.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

/// Counters of the group commit, for metrics and tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CommitStats {
    /// Batches taken from the queue (one write transaction, and at most one fsync, each).
    pub batches: u64,
    /// Operations processed.
    pub ops: u64,
    /// Largest number of operations in one batch so far.
    pub max_batch: u64,
}

/// Durable, encrypted key store in a single redb file.
///
/// Crash safety: `insert` and `take` answer only after their batch is in the write-ahead
/// log on disk (`fdatasync`); a take that returned can never deliver the same
/// key to the same slave again, even after `kill -9`, because the log is applied at open.
pub struct EmbeddedStore {
    /// Shared with the writer; read transactions (the expiry scan) never block its commits.
    db: Arc<Database>,
    sender: Mutex<Option<mpsc::Sender<Request>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    pending: Arc<Mutex<PendingCounts>>,
    stats: Arc<Stats>,
    path: PathBuf,
    replayed: u64,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store at `path`.
    ///
    /// On first open the KEK check value is written; on later opens it must verify, so a wrong
    /// KEK is refused here rather than at the first `dec_keys`. Pending counts are rebuilt by
    /// scanning every record, which also surfaces a corrupt record at start-up.
    ///
    /// The store holds key IDs and SAE names in clear (only the keys are sealed), so its
    /// folder is made private to this user (0700, created so if missing) and the database and
    /// its logs 0600, including files an earlier version left readable.
    ///
    /// Its metrics carry no `kme` label; a KME opens its store with
    /// [`EmbeddedStore::open_for_kme`].
    pub fn open(path: &Path, kek: Kek) -> Result<EmbeddedStore, StoreError> {
        Self::open_labelled(path, kek, Arc::new([]))
    }

    /// [`EmbeddedStore::open`] for the KME `kme_id`: every metric of the store carries the
    /// label `kme="<kme_id>"`, like the KME's own, so a process that runs several sites (as
    /// `dqkd up` does) keeps their store figures apart.
    pub fn open_for_kme(path: &Path, kek: Kek, kme_id: &str) -> Result<EmbeddedStore, StoreError> {
        Self::open_labelled(path, kek, Arc::new([Label::new("kme", kme_id.to_owned())]))
    }

    fn open_labelled(
        path: &Path,
        kek: Kek,
        labels: Arc<[Label]>,
    ) -> Result<EmbeddedStore, StoreError> {
        let cipher = kek.cipher()?;
        drop(kek);
        restrict_files(path)?;
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| StoreError::redb("opening the database file", e))?;
        let log = wal_path(path);
        let (mut wal, recovered) = Wal::open(&log)?;
        let prepared = prepare(&db, &cipher, path, recovered)?;
        if prepared.replayed > 0 {
            tracing::info!(
                path = %log.display(),
                records = prepared.replayed,
                "applied the write-ahead log after an unclean stop"
            );
        }
        // Everything in the log is now in a durable commit.
        wal.start_over()
            .map_err(|e| StoreError::io(format!("emptying {}", log.display()), e))?;
        wal.skip_to(prepared.checkpointed + 1);
        let replayed = prepared.replayed;
        let db = Arc::new(db);
        let durable = Durable::new(
            wal,
            prepared.checkpointed,
            Checkpointer::start(Arc::clone(&db), Arc::clone(&labels))?,
        );
        let pending = Arc::new(Mutex::new(prepared.pending));
        let stats = Arc::new(Stats::new(labels));
        stats.lifetimes.publish(prepared.lifetimes);
        let (sender, receiver) = mpsc::channel();
        let handle = {
            let pending = Arc::clone(&pending);
            let stats = Arc::clone(&stats);
            let db = Arc::clone(&db);
            std::thread::Builder::new()
                .name("dqkd-store-writer".into())
                .spawn(move || writer::run(db, cipher, receiver, pending, stats, durable))
                .map_err(|e| StoreError::io("starting the key store writer thread", e))?
        };
        tracing::info!(path = %path.display(), "key store opened");
        Ok(EmbeddedStore {
            db,
            sender: Mutex::new(Some(sender)),
            writer: Mutex::new(Some(handle)),
            pending,
            stats,
            path: path.to_owned(),
            replayed,
        })
    }

    /// Stops accepting operations, lets the writer finish everything already queued, and waits
    /// for it. Later calls on the store fail with [`StoreError::Closed`]. Dropping the store
    /// does the same.
    pub fn close(&self) -> Result<(), StoreError> {
        drop(lock(&self.sender).take());
        let Some(handle) = lock(&self.writer).take() else {
            return Ok(());
        };
        handle.join().map_err(|_| {
            tracing::error!("key store writer thread panicked");
            StoreError::Closed
        })
    }

    /// Write-ahead log records applied again at open: non-zero after an unclean stop
    /// (a crash, `kill -9`) that came before the store's last checkpoint.
    pub fn replayed_at_open(&self) -> u64 {
        self.replayed
    }

    /// Group-commit counters since open.
    pub fn commit_stats(&self) -> CommitStats {
        CommitStats {
            batches: self.stats.batches.load(Ordering::Relaxed),
            ops: self.stats.ops.load(Ordering::Relaxed),
            max_batch: self.stats.max_batch.load(Ordering::Relaxed),
        }
    }

    /// Hands one operation to the writer and waits for its answer.
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        {
            let guard = lock(&self.sender);
            let sender = guard.as_ref().ok_or(StoreError::Closed)?;
            sender.send(make(tx)).map_err(|_| StoreError::Closed)?;
        }
        rx.await.map_err(|_| StoreError::Closed)
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %e, "closing key store");
        }
    }
}

/// Expired keys removed per writer operation, so one purge never holds the writer long.
const PURGE_CHUNK: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[async_trait::async_trait]
impl KeyStore for EmbeddedStore {
    async fn insert_answering(
        &self,
        keys: Vec<NewKey>,
        answered: Option<Uuid>,
    ) -> Result<(), StoreError> {
        self.call(|reply| Request::Insert {
            keys,
            answered,
            reply,
        })
        .await?
    }

    async fn take(
        &self,
        caller: &str,
        masters: &[String],
        ids: &[Uuid],
        now: u64,
    ) -> Result<Vec<DeliveredKey>, TakeError> {
        self.call(|reply| Request::Take {
            caller: caller.to_owned(),
            masters: masters.to_vec(),
            ids: ids.to_vec(),
            now,
            reply,
        })
        .await?
    }

    fn pending(&self, master: &str, slave: &str) -> u64 {
        lock(&self.pending).get(master, slave)
    }

    async fn purge_expired(&self, now: u64) -> Result<u64, StoreError> {
        // Find candidates in a read transaction, off the writer thread, so a large store is
        // scanned without stalling commits; the writer re-checks each before removing it.
        let db = Arc::clone(&self.db);
        let keys_end = self.stats.lifetimes.sweep_end(now);
        let ready_end = self.stats.ready_lifetimes.sweep_end_position(now);
        let (found, ready_seen) =
            tokio::task::spawn_blocking(move || expired(&db, now, keys_end, ready_end))
                .await
                .map_err(|e| {
                    StoreError::io("scanning for expired keys", std::io::Error::other(e))
                })??;
        if let Some(seen) = ready_seen {
            self.stats.ready_lifetimes.learned(seen);
        }
        let mut purged = 0;
        for chunk in found.keys.chunks(PURGE_CHUNK) {
            let ids = chunk.to_vec();
            purged += self
                .call(|reply| Request::Purge {
                    now,
                    ids,
                    ready: Vec::new(),
                    reply,
                })
                .await??;
        }
        for chunk in found.ready.chunks(PURGE_CHUNK) {
            let ready = chunk.to_vec();
            purged += self
                .call(|reply| Request::Purge {
                    now,
                    ids: Vec::new(),
                    ready,
                    reply,
                })
                .await??;
        }
        // Keys written since the last checkpoint are not in the snapshot scanned above.
        purged += self
            .call(|reply| Request::PurgeRecent { now, reply })
            .await??;
        Ok(purged)
    }

    async fn destroy(&self, ids: &[Uuid]) -> Result<u64, StoreError> {
        let ids = ids.to_vec();
        match self
            .call(|reply| Request::Destroy {
                ids,
                masters: None,
                reply,
            })
            .await?
        {
            Ok(count) => Ok(count),
            Err(TakeError::Store(e)) => Err(e),
            // Invariant: only a destroy on behalf of masters is checked, so only it is refused.
            Err(refused) => unreachable!("a destroy for any master was refused: {refused}"),
        }
    }

    async fn destroy_of(&self, masters: &[String], ids: &[Uuid]) -> Result<u64, TakeError> {
        let ids = ids.to_vec();
        let masters = Some(masters.to_vec());
        self.call(|reply| Request::Destroy {
            ids,
            masters,
            reply,
        })
        .await?
    }

    async fn pool_insert(&self, link: &str, keys: Vec<PoolKey>) -> Result<(), StoreError> {
        let link = link.to_owned();
        self.call(|reply| Request::PoolInsert { link, keys, reply })
            .await?
    }

    async fn pool_bind_answering(
        &self,
        link: &str,
        grants: Vec<PoolGrant>,
        now: u64,
        answered: Option<Uuid>,
    ) -> Result<Vec<DeliveredKey>, TakeError> {
        let link = link.to_owned();
        self.call(|reply| Request::PoolBind {
            link,
            grants,
            now,
            answered,
            reply,
        })
        .await?
    }

    async fn record_in_flight(&self, request: InFlight) -> Result<(), StoreError> {
        let value = crate::inflight::encode(&request);
        let id = request.request_id;
        self.call(|reply| Request::RecordInFlight { id, value, reply })
            .await?
    }

    async fn in_flight(&self, owner: &str) -> Result<Vec<InFlight>, StoreError> {
        let owner = owner.to_owned();
        self.call(|reply| Request::InFlight { owner, reply })
            .await?
    }

    async fn forget_in_flight(&self, request_ids: &[Uuid]) -> Result<(), StoreError> {
        let ids = request_ids.to_vec();
        self.call(|reply| Request::ForgetInFlight { ids, reply })
            .await?
    }

    async fn pool_remove(&self, link: &str, seqs: &[u64]) -> Result<u64, StoreError> {
        let link = link.to_owned();
        let seqs = seqs.to_vec();
        self.call(|reply| Request::PoolRemove { link, seqs, reply })
            .await?
    }

    async fn pool_page(
        &self,
        link: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<ReadyKey>, StoreError> {
        let Some(from) = crate::meta::first_position_after(after) else {
            return Ok(Vec::new());
        };
        let link = link.to_owned();
        self.call(|reply| Request::PoolPage {
            link,
            from,
            limit,
            reply,
        })
        .await?
    }
}

#[cfg(test)]
mod tests;
