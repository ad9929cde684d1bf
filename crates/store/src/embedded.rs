//! The durable default store: one redb file plus its write-ahead log (see `wal`), key bytes
//! sealed under the site KEK, and all writes funnelled through one group-committing writer
//! thread (see `writer`) that keeps recent changes in memory (see `overlay`) until the
//! checkpoint thread (see `checkpoint`) files them in redb.
//!
//! The handle only forwards operations to the writer and answers `pending` from counts kept in
//! memory, so callers never block on disk except through their own awaited oneshot.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use redb::{
    Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::checkpoint::Checkpointer;
use crate::expiry::Seen;
use crate::kek::Cipher;
use crate::meta::PendingCounts;
use crate::record::Record;
use crate::wal::{Change, Recovered, Wal};
use crate::writer::{self, Base, Durable, Request, Stats};
use crate::{
    DeliveredKey, InFlight, Kek, KeyStore, NewKey, PoolGrant, PoolKey, ReadyKey, RecordError, Slot,
    StoreError, TakeError,
};

/// Key records: key ID (as u128) → encoded [`Record`].
pub(crate) const KEYS: TableDefinition<u128, &[u8]> = TableDefinition::new("keys");
/// Ready keys of every pool: (link name, position) → key ID ‖ encoded [`Record`] whose
/// master is the link name and which has no slaves, so the link is bound into the seal like a
/// master would be. Keyed by position so that binds (oldest first) and refills (appended)
/// touch only the ends of each pool.
pub(crate) const READY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("ready");
/// The ready-key table of earlier versions, keyed by key ID; discarded at open (ready keys
/// belong to no SAE, so dropping them loses nothing: the peer's copies expire).
const OLD_POOL: TableDefinition<u128, &[u8]> = TableDefinition::new("pool");
/// Cross-site requests sent and not yet answered: request ID (as u128) → encoded
/// [`crate::InFlight`] (see `inflight`).
pub(crate) const IN_FLIGHT: TableDefinition<u128, &[u8]> = TableDefinition::new("in_flight");
/// Store-wide facts, such as the KEK check value.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const KEK_CHECK: &str = "kek_check";
/// Sequence number of the last write-ahead log record a durable commit covers.
pub(crate) const WAL_SEQ: &str = "wal_seq";

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
    pub fn open(path: &Path, kek: Kek) -> Result<EmbeddedStore, StoreError> {
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
            Checkpointer::start(Arc::clone(&db))?,
        );
        let pending = Arc::new(Mutex::new(prepared.pending));
        let stats = Arc::new(Stats::default());
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

/// A ready key's table value: its ID, then its encoded record.
pub(crate) fn ready_value(id: Uuid, record: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(16 + record.len());
    value.extend_from_slice(id.as_bytes());
    value.extend_from_slice(record);
    value
}

/// Splits a ready key's table value into its ID and encoded record.
pub(crate) fn split_ready(value: &[u8]) -> Result<(Uuid, &[u8]), RecordError> {
    let (id, record) = value.split_at_checked(16).ok_or(RecordError::Truncated)?;
    let id = Uuid::from_slice(id).map_err(|_| RecordError::Truncated)?;
    Ok((id, record))
}

/// Keys found expired by a scan: ordinary keys by ID, ready keys by (link, position).
#[derive(Debug, Default)]
pub(crate) struct Expired {
    pub(crate) keys: Vec<Uuid>,
    pub(crate) ready: Vec<(String, u64)>,
}

/// Records whose `expires_at <= now`, from a consistent snapshot. Only keys with IDs below
/// `keys_end`, and ready keys at positions below `ready_end`, are read where these are given
/// (see `expiry`). A sweep of every ready key also returns what it saw of their lifetimes.
fn expired(
    db: &Database,
    now: u64,
    keys_end: Option<u128>,
    ready_end: Option<u64>,
) -> Result<(Expired, Option<Seen>), StoreError> {
    let Base { keys, ready, .. } = &Base::open(db)?;
    let mut found = Expired::default();
    let scan = |e| StoreError::redb("scanning keys", e);
    let keys = match keys_end {
        Some(end) => keys.range(..end).map_err(scan)?,
        None => keys.range::<u128>(..).map_err(scan)?,
    };
    for entry in keys {
        let (k, v) = entry.map_err(|e| StoreError::redb("scanning keys", e))?;
        let id = Uuid::from_u128(k.value());
        match Record::head(v.value()) {
            Ok((expires_at, _)) if expires_at <= now => found.keys.push(id),
            Ok(_) => {}
            // Keep an undecodable record for inspection rather than guessing its expiry.
            Err(reason) => {
                tracing::warn!(key_id = %id, %reason, "skipping corrupt key record in purge")
            }
        }
    }
    let scan = |e| StoreError::redb("scanning ready keys", e);
    let mut note =
        |link: &str, seq: u64, value: &[u8], seen: Option<&mut Seen>| match split_ready(value)
            .and_then(|(_, record)| Record::head(record))
        {
            Ok((expires_at, _)) => {
                if let Some(seen) = seen {
                    seen.note_position(seq, expires_at);
                }
                if expires_at <= now {
                    found.ready.push((link.to_owned(), seq));
                }
            }
            Err(reason) => {
                tracing::warn!(link, seq, %reason, "skipping corrupt ready-key record in purge")
            }
        };
    let Some(end) = ready_end else {
        let mut seen = Seen::default();
        for entry in ready.iter().map_err(scan)? {
            let (k, v) = entry.map_err(scan)?;
            let (link, seq) = k.value();
            note(link, seq, v.value(), Some(&mut seen));
        }
        return Ok((found, Some(seen)));
    };
    // Each link's positions below `end`, one link after another.
    let mut after: Option<String> = None;
    loop {
        let first = match &after {
            None => ready.range::<(&str, u64)>(..).map_err(scan)?.next(),
            Some(link) => ready
                .range::<(&str, u64)>((
                    std::ops::Bound::Excluded((link.as_str(), u64::MAX)),
                    std::ops::Bound::Unbounded,
                ))
                .map_err(scan)?
                .next(),
        };
        let Some(first) = first else { break };
        let link = first.map_err(scan)?.0.value().0.to_owned();
        for entry in ready
            .range((link.as_str(), 0)..(link.as_str(), end))
            .map_err(scan)?
        {
            let (k, v) = entry.map_err(scan)?;
            note(&link, k.value().1, v.value(), None);
        }
        after = Some(link);
    }
    Ok((found, None))
}

/// A ready key's position, ID and expiry, from its table value (only the record's head is
/// read, so a pool of a million keys lists in well under a second).
pub(crate) fn ready_key(seq: u64, value: &[u8]) -> Result<ReadyKey, StoreError> {
    let (id, record) = split_ready(value).map_err(|reason| StoreError::CorruptRecord {
        id: Uuid::nil(),
        reason,
    })?;
    let (expires_at, _) =
        Record::head(record).map_err(|reason| StoreError::CorruptRecord { id, reason })?;
    Ok(ReadyKey {
        slot: Slot { seq, id },
        expires_at,
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What opening found: pending counts, the lifetimes of the keys stored, log records
/// applied again, and the last log record the store now covers durably.
struct Prepared {
    pending: PendingCounts,
    lifetimes: Seen,
    replayed: u64,
    checkpointed: u64,
}

/// Makes the folder of the store at `path` 0700 and the store's files 0600 (see
/// [`EmbeddedStore::open`]), creating the folder and an empty database file if missing, so
/// that no file of the store is ever readable by others, not even for a moment.
#[cfg(unix)]
fn restrict_files(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let io = |what: &str, at: &Path| {
        let context = format!("{what} {}", at.display());
        move |e| StoreError::io(context, e)
    };
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("creating the key store folder", dir))?,
        Err(e) => return Err(io("reading the key store folder", dir)(e)),
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
            let was = meta.permissions().mode() & 0o7777;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io("making the key store folder private (0700)", dir))?;
            tracing::warn!(
                folder = %dir.display(),
                was = format!("{was:04o}"),
                "made the key store folder private (0700): it lists key IDs and SAE names"
            );
        }
        Ok(_) => {}
    }
    // Created 0600 here, before redb opens it (redb makes a database in an empty file).
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("creating the key store file", path)(e)),
    }
    let log = wal_path(path);
    for file in [
        path.to_owned(),
        crate::wal::previous_path(&log),
        crate::wal::spare_path(&log),
        log,
    ] {
        match std::fs::metadata(&file) {
            Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                    .map_err(io("making a key store file private (0600)", &file))?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("reading", &file)(e)),
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn restrict_files(_path: &Path) -> Result<(), StoreError> {
    Ok(())
}

/// The write-ahead log of the store at `path`: the same name with `.wal` added.
fn wal_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".wal");
    PathBuf::from(name)
}

/// Applies the log records after the last checkpoint (a crash lost them from redb, not from
/// the log). Each change puts or deletes a whole record, so applying one twice is harmless.
fn replay(
    txn: &redb::WriteTransaction,
    checkpointed: u64,
    recovered: Recovered,
    log: &Path,
) -> Result<(u64, u64), StoreError> {
    let mut keys = txn
        .open_table(KEYS)
        .map_err(|e| StoreError::redb("opening the keys table", e))?;
    let mut ready = txn
        .open_table(READY)
        .map_err(|e| StoreError::redb("opening the ready-key table", e))?;
    let mut in_flight = txn
        .open_table(IN_FLIGHT)
        .map_err(|e| StoreError::redb("opening the in-flight table", e))?;
    let write = |e| StoreError::redb("applying the write-ahead log", e);
    let (mut replayed, mut last) = (0, checkpointed);
    for (seq, changes) in recovered {
        if seq <= checkpointed {
            continue;
        }
        if seq != last + 1 {
            return Err(StoreError::io(
                format!(
                    "write-ahead log {}: record {seq} follows {last}; records are missing",
                    log.display()
                ),
                std::io::Error::from(std::io::ErrorKind::InvalidData),
            ));
        }
        for change in changes {
            match change {
                Change::PutKey(id, value) => {
                    keys.insert(id, value.as_slice()).map_err(write)?;
                }
                Change::DelKey(id) => {
                    keys.remove(id).map_err(write)?;
                }
                Change::PutReady(link, seq, value) => {
                    ready
                        .insert((link.as_str(), seq), value.as_slice())
                        .map_err(write)?;
                }
                Change::DelReady(link, seq) => {
                    ready.remove((link.as_str(), seq)).map_err(write)?;
                }
                Change::PutInFlight(id, value) => {
                    in_flight.insert(id, value.as_slice()).map_err(write)?;
                }
                Change::DelInFlight(id) => {
                    in_flight.remove(id).map_err(write)?;
                }
            }
        }
        replayed += 1;
        last = seq;
    }
    Ok((replayed, last))
}

/// Creates the tables, writes or verifies the KEK check value, applies the log and counts
/// pending keys, in one durable transaction.
fn prepare(
    db: &Database,
    cipher: &Cipher,
    path: &Path,
    recovered: Recovered,
) -> Result<Prepared, StoreError> {
    let mut txn = db
        .begin_write()
        .map_err(|e| StoreError::redb("starting the open transaction", e))?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| StoreError::redb("setting durability", e))?;
    let mut prepared = Prepared {
        pending: PendingCounts::default(),
        lifetimes: Seen::default(),
        replayed: 0,
        checkpointed: 0,
    };
    {
        let mut meta = txn
            .open_table(META)
            .map_err(|e| StoreError::redb("opening the meta table", e))?;
        let check = meta
            .get(KEK_CHECK)
            .map_err(|e| StoreError::redb("reading the KEK check value", e))?
            .map(|g| g.value().to_vec());
        match check {
            Some(bytes) => {
                let ok = cipher.verify_kek_check(&bytes);
                if !ok {
                    return Err(StoreError::WrongKek {
                        path: path.to_owned(),
                    });
                }
            }
            None => {
                let value = cipher.kek_check_value()?;
                meta.insert(KEK_CHECK, value.as_slice())
                    .map_err(|e| StoreError::redb("writing the KEK check value", e))?;
            }
        }
        let checkpointed = meta
            .get(WAL_SEQ)
            .map_err(|e| StoreError::redb("reading the checkpoint", e))?
            .and_then(|g| g.value().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        drop(meta);
        txn.open_table(READY)
            .map_err(|e| StoreError::redb("creating the ready-key table", e))?;
        txn.open_table(IN_FLIGHT)
            .map_err(|e| StoreError::redb("creating the in-flight table", e))?;
        discard_old_pool(&txn)?;
        let (replayed, last) = replay(&txn, checkpointed, recovered, &wal_path(path))?;
        crate::writer::write_checkpoint_seq(&txn, last)?;
        prepared.replayed = replayed;
        prepared.checkpointed = last;
        let keys = txn
            .open_table(KEYS)
            .map_err(|e| StoreError::redb("opening the keys table", e))?;
        for entry in keys
            .iter()
            .map_err(|e| StoreError::redb("scanning keys", e))?
        {
            let (k, v) = entry.map_err(|e| StoreError::redb("scanning keys", e))?;
            let id = Uuid::from_u128(k.value());
            let record = Record::decode(v.value())
                .map_err(|reason| StoreError::CorruptRecord { id, reason })?;
            prepared.pending.add_key(&record.meta);
            prepared.lifetimes.note(k.value(), record.meta.expires_at);
        }
    }
    txn.commit()
        .map_err(|e| StoreError::redb("committing the open transaction", e))?;
    Ok(prepared)
}

/// Drops the ready-key table of earlier versions (keyed by ID, which scattered every bind and
/// refill over the whole table), saying how many ready keys went with it.
fn discard_old_pool(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let exists = txn
        .list_tables()
        .map_err(|e| StoreError::redb("listing tables", e))?
        .any(|t| t.name() == OLD_POOL.name());
    if !exists {
        return Ok(());
    }
    let count = txn
        .open_table(OLD_POOL)
        .and_then(|table| Ok(table.len()?))
        .map_err(|e| StoreError::redb("counting old ready keys", e))?;
    txn.delete_table(OLD_POOL)
        .map_err(|e| StoreError::redb("dropping the old pool table", e))?;
    tracing::warn!(
        discarded = count,
        "discarded ready keys stored in the old pool layout; pools refill from scratch"
    );
    Ok(())
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
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn kek() -> Kek {
        Kek::from_bytes([7; crate::KEK_LEN])
    }

    /// A log whose records do not follow the store's last checkpoint (a store file restored
    /// from elsewhere, say) is refused, not applied over a gap.
    #[test]
    fn a_log_with_missing_records_refuses_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.redb");
        drop(EmbeddedStore::open(&path, kek()).unwrap());
        {
            let (mut wal, _) = Wal::open(&wal_path(&path)).unwrap();
            wal.skip_to(5);
            wal.append(&[Change::DelKey(1)]).unwrap();
        }
        let err = EmbeddedStore::open(&path, kek()).unwrap_err();
        assert!(err.to_string().contains("records are missing"), "{err}");
    }

    fn in_flight(owner: &str) -> InFlight {
        InFlight {
            request_id: Uuid::new_v4(),
            owner: owner.into(),
            sites: vec!["KME_B".into()],
            key_ids: vec![Uuid::new_v4()],
            ready: vec![3],
        }
    }

    /// In-flight records survive a restart, whether a checkpoint filed them in redb or only
    /// the write-ahead log holds them, and so do their deletions.
    #[tokio::test]
    async fn in_flight_records_survive_checkpoints_and_log_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.redb");
        let (filed, logged, forgotten) = (in_flight(""), in_flight(""), in_flight("a1"));
        drop(EmbeddedStore::open(&path, kek()).unwrap());
        {
            // What a crash leaves: records only the log holds (checkpoint at 0, record 1 next).
            let (mut wal, _) = Wal::open(&wal_path(&path)).unwrap();
            let put = |r: &InFlight| {
                Change::PutInFlight(r.request_id.as_u128(), crate::inflight::encode(r))
            };
            wal.append(&[put(&logged), put(&forgotten)]).unwrap();
        }
        {
            let store = EmbeddedStore::open(&path, kek()).unwrap();
            assert_eq!(store.replayed_at_open(), 1);
            assert_eq!(store.in_flight("").await.unwrap(), vec![logged.clone()]);
            assert_eq!(
                store.in_flight("a1").await.unwrap(),
                vec![forgotten.clone()]
            );
            store.record_in_flight(filed.clone()).await.unwrap();
            store
                .forget_in_flight(&[forgotten.request_id])
                .await
                .unwrap();
        } // a clean close checkpoints the changes
        let store = EmbeddedStore::open(&path, kek()).unwrap();
        let mut found = store.in_flight("").await.unwrap();
        found.sort_by_key(|r| r.request_id);
        let mut want = vec![filed.clone(), logged.clone()];
        want.sort_by_key(|r| r.request_id);
        assert_eq!(found, want);
        assert!(store.in_flight("a1").await.unwrap().is_empty());
        store
            .insert_answering(Vec::new(), Some(filed.request_id))
            .await
            .unwrap();
        drop(store);
        let store = EmbeddedStore::open(&path, kek()).unwrap();
        assert_eq!(store.in_flight("").await.unwrap(), vec![logged]);
    }

    /// Records the store already covers are skipped; the next one is applied.
    #[test]
    fn records_after_the_checkpoint_are_applied_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.redb");
        drop(EmbeddedStore::open(&path, kek()).unwrap());
        let id = Uuid::new_v4();
        {
            let (mut wal, _) = Wal::open(&wal_path(&path)).unwrap();
            // A clean open and close leave the checkpoint at 0: record 1 is the next.
            wal.append(&[Change::PutReady("A>B".into(), 3, ready_value(id, b"x"))])
                .unwrap();
        }
        let store = EmbeddedStore::open(&path, kek()).unwrap();
        assert_eq!(store.replayed_at_open(), 1);
        drop(store);
        let store = EmbeddedStore::open(&path, kek()).unwrap();
        assert_eq!(
            store.replayed_at_open(),
            0,
            "the log was emptied after applying it"
        );
    }

    /// A crash after the log was rotated but before its checkpoint committed leaves records
    /// in both files: the older file's come first, and both are applied.
    #[test]
    fn a_rotated_log_and_the_current_one_are_both_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.redb");
        drop(EmbeddedStore::open(&path, kek()).unwrap());
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        {
            let (mut wal, _) = Wal::open(&wal_path(&path)).unwrap();
            wal.append(&[Change::PutReady("A>B".into(), 1, ready_value(a, b"x"))])
                .unwrap();
            wal.rotate().unwrap();
            wal.append(&[Change::PutReady("A>B".into(), 2, ready_value(b, b"y"))])
                .unwrap();
        }
        let store = EmbeddedStore::open(&path, kek()).unwrap();
        assert_eq!(store.replayed_at_open(), 2);
        assert!(
            !crate::wal::previous_path(&wal_path(&path)).exists(),
            "the rotated log is deleted once the open commit covers it"
        );
    }

    /// A rotation continues in a checkpointed file, which still holds its old records after
    /// whatever is written over its start. Those are never applied again: a ready key taken
    /// before the checkpoint must not come back after a crash.
    #[tokio::test]
    async fn a_reused_log_file_does_not_bring_back_checkpointed_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.redb");
        let log = wal_path(&path);
        drop(EmbeddedStore::open(&path, kek()).unwrap());
        // Only the head of a ready record is read to list it: the key need not open.
        let value = |id: Uuid| {
            let record = Record {
                meta: crate::meta::KeyMeta::new("A>B", &[], u64::MAX),
                sealing: crate::kek::Sealing::Kek {
                    nonce: [0; crate::kek::NONCE_BYTES],
                },
                sealed: vec![0; 48],
            };
            ready_value(id, &record.encode().unwrap())
        };
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        {
            let (mut wal, _) = Wal::open(&log).unwrap();
            wal.append(&[Change::PutReady("A>B".into(), 1, value(a))])
                .unwrap();
            wal.append(&[Change::DelReady("A>B".into(), 1)]).unwrap();
            wal.rotate().unwrap();
        }
        // Applies records 1 and 2 and keeps their file as the spare.
        drop(EmbeddedStore::open(&path, kek()).unwrap());
        let spare = crate::wal::spare_path(&log);
        assert!(spare.exists(), "the checkpointed file is kept for reuse");
        {
            // A rotation into the spare, then one record of the same length as the old
            // first one, then a crash: the old second record follows it, intact.
            let (mut wal, _) = Wal::open(&log).unwrap();
            wal.skip_to(3);
            wal.rotate().unwrap();
            assert!(!spare.exists());
            wal.append(&[Change::PutReady("A>B".into(), 2, value(b))])
                .unwrap();
        }
        let store = EmbeddedStore::open(&path, kek()).unwrap();
        assert_eq!(store.replayed_at_open(), 1, "only the new record");
        let page = store.pool_page("A>B", None, 10).await.unwrap();
        assert_eq!(seqs(&page), [2]);
    }

    /// Listing a pool that holds a damaged ready key names the damage, and, since a read
    /// writes nothing, the store goes on serving.
    #[tokio::test]
    async fn a_damaged_ready_key_fails_its_page_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.redb");
        drop(EmbeddedStore::open(&path, kek()).unwrap());
        {
            let (mut wal, _) = Wal::open(&wal_path(&path)).unwrap();
            let damaged = ready_value(Uuid::new_v4(), b"not a record");
            wal.append(&[Change::PutReady("A>B".into(), 1, damaged)])
                .unwrap();
        }
        let store = EmbeddedStore::open(&path, kek()).unwrap();
        let err = store.pool_page("A>B", None, 10).await.unwrap_err();
        assert!(matches!(err, StoreError::CorruptRecord { .. }), "{err}");
        store.pool_insert("A>C", vec![ready(1)]).await.unwrap();
        assert_eq!(seqs(&store.pool_page("A>C", None, 10).await.unwrap()), [1]);
    }

    /// A store written by an earlier version holds records sealed under the KEK itself:
    /// they are still delivered, next to new ones sealed under epoch keys.
    #[tokio::test]
    async fn records_of_the_first_format_are_still_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.redb");
        drop(EmbeddedStore::open(&path, kek()).unwrap());
        let id = Uuid::new_v4();
        {
            let cipher = kek().cipher().unwrap();
            let (sealing, sealed) = cipher
                .seal_format_1(&[6; 32], &crate::record::aad(id, "alice", 1))
                .unwrap();
            let record = Record {
                meta: crate::meta::KeyMeta::new("alice", &["bob".to_owned()], u64::MAX),
                sealing,
                sealed,
            };
            let bytes = record.encode().unwrap();
            assert_eq!(bytes[0], 1);
            let (mut wal, _) = Wal::open(&wal_path(&path)).unwrap();
            wal.append(&[Change::PutKey(id.as_u128(), bytes)]).unwrap();
        }
        let store = EmbeddedStore::open(&path, kek()).unwrap();
        assert_eq!(store.pending("alice", "bob"), 1);
        let got = store
            .take("bob", &["alice".to_owned()], &[id], 0)
            .await
            .unwrap();
        assert_eq!(got[0].material.as_bytes(), &[6; 32]);
    }

    fn ready(seq: u64) -> PoolKey {
        PoolKey {
            slot: Slot {
                seq,
                id: Uuid::new_v4(),
            },
            material: crate::KeyMaterial::new(vec![seq as u8; 32]),
            expires_at: u64::MAX,
        }
    }

    fn seqs(page: &[ReadyKey]) -> Vec<u64> {
        page.iter().map(|k| k.slot.seq).collect()
    }

    /// Pages list what the database holds as changed by the changes not yet checkpointed:
    /// removals hide entries, new entries appear in position order, and a page stops at its
    /// limit wherever its entries come from.
    #[tokio::test]
    async fn pages_merge_recent_changes_over_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.redb");
        let store = EmbeddedStore::open(&path, kek()).unwrap();
        store
            .pool_insert("A>B", (1..=6).map(ready).collect())
            .await
            .unwrap();
        drop(store); // a clean close files everything in the database
        let store = EmbeddedStore::open(&path, kek()).unwrap();
        assert_eq!(store.pool_remove("A>B", &[2, 5]).await.unwrap(), 2);
        store
            .pool_insert("A>B", vec![ready(7), ready(8)])
            .await
            .unwrap();
        store.pool_insert("A>C", vec![ready(3)]).await.unwrap();
        assert_eq!(
            seqs(&store.pool_page("A>B", None, 3).await.unwrap()),
            [1, 3, 4]
        );
        assert_eq!(
            seqs(&store.pool_page("A>B", Some(4), 10).await.unwrap()),
            [6, 7, 8]
        );
        assert_eq!(seqs(&store.pool_page("A>C", None, 10).await.unwrap()), [3]);
        // A removed position cannot be bound, whichever layer held it.
        assert_eq!(store.pool_remove("A>B", &[2, 7]).await.unwrap(), 1);
        drop(store);
        let store = EmbeddedStore::open(&path, kek()).unwrap();
        assert_eq!(
            seqs(&store.pool_page("A>B", None, 10).await.unwrap()),
            [1, 3, 4, 6, 8]
        );
    }
}
