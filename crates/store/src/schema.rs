//! The redb tables of [`crate::EmbeddedStore`]: their definitions, how a ready key's value is
//! laid out, a read-only snapshot of them, and the one function that writes logged changes
//! into them, whether they come from the write-ahead log at open (see `recovery`) or from a
//! frozen overlay at a checkpoint (see `checkpoint`).
//!
//! It sits below every other part of the embedded store, so none of them has to import
//! another to learn the layout.

use redb::{Database, ReadOnlyTable, ReadTransaction, ReadableDatabase, TableDefinition};
use redb::{Table, WriteTransaction};
use uuid::Uuid;

use crate::overlay::Overlay;
use crate::record::Record;
use crate::wal::Change;
use crate::{ReadyKey, RecordError, Slot, StoreError};

/// Key records: key ID (as u128) → encoded [`Record`].
pub(crate) const KEYS: TableDefinition<u128, &[u8]> = TableDefinition::new("keys");
/// Ready keys of every pool: (link name, position) → key ID ‖ encoded [`Record`] whose
/// master is the link name and which has no slaves, so the link is bound into the seal like a
/// master would be. Keyed by position so that binds (oldest first) and refills (appended)
/// touch only the ends of each pool.
pub(crate) const READY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("ready");
/// The ready-key table of earlier versions, keyed by key ID; discarded at open (ready keys
/// belong to no SAE, so dropping them loses nothing: the peer's copies expire).
pub(crate) const OLD_POOL: TableDefinition<u128, &[u8]> = TableDefinition::new("pool");
/// Cross-site requests sent and not yet answered: request ID (as u128) → encoded
/// [`crate::InFlight`] (see `inflight`).
pub(crate) const IN_FLIGHT: TableDefinition<u128, &[u8]> = TableDefinition::new("in_flight");
/// Store-wide facts, such as the KEK check value.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// The [`META`] entry holding the KEK check value.
pub(crate) const KEK_CHECK: &str = "kek_check";
/// The [`META`] entry holding the sequence number of the last write-ahead log record a
/// durable commit covers.
pub(crate) const WAL_SEQ: &str = "wal_seq";

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

/// redb as of its last checkpoint, read-only: one consistent snapshot of the tables.
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

/// Records in `txn` that the log up to `seq` is covered by it.
pub(crate) fn write_checkpoint_seq(txn: &WriteTransaction, seq: u64) -> Result<(), StoreError> {
    txn.open_table(META)
        .and_then(|mut meta| {
            meta.insert(WAL_SEQ, seq.to_be_bytes().as_slice())?;
            Ok(())
        })
        .map_err(|e| StoreError::redb("recording the checkpoint", e))
}

/// One change to one table entry: `None` deletes it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Edit<'a> {
    /// An ordinary key's record, by key ID.
    Key(u128, Option<&'a [u8]>),
    /// A ready key's value, by link and position.
    Ready(&'a str, u64, Option<&'a [u8]>),
    /// An in-flight record, by request ID.
    InFlight(u128, Option<&'a [u8]>),
}

impl<'a> From<&'a Change> for Edit<'a> {
    fn from(change: &'a Change) -> Self {
        match change {
            Change::PutKey(id, value) => Edit::Key(*id, Some(value)),
            Change::DelKey(id) => Edit::Key(*id, None),
            Change::PutReady(link, pos, value) => Edit::Ready(link, *pos, Some(value)),
            Change::DelReady(link, pos) => Edit::Ready(link, *pos, None),
            Change::PutInFlight(id, value) => Edit::InFlight(*id, Some(value)),
            Change::DelInFlight(id) => Edit::InFlight(*id, None),
        }
    }
}

/// The net changes of `overlay`, table by table and in key order, so a checkpoint writes
/// each B-tree page once.
pub(crate) fn edits_of(overlay: &Overlay) -> impl Iterator<Item = Edit<'_>> {
    let keys = overlay.keys.iter().map(|(id, v)| Edit::Key(id, v));
    let ready = overlay.ready.iter().flat_map(|(link, pool)| {
        pool.iter()
            .map(move |(pos, v)| Edit::Ready(link.as_str(), pos, v))
    });
    let in_flight = overlay
        .in_flight
        .iter()
        .map(|(id, v)| Edit::InFlight(id, v));
    keys.chain(ready).chain(in_flight)
}

/// Writes `edits` into the tables of `txn`, in order (`doing` names the work in errors).
/// Each edit puts or deletes a whole entry, so writing one twice is harmless: that is what
/// lets the log be applied again after a crash that came between a checkpoint and the
/// deletion of the log it covered.
pub(crate) fn apply<'a>(
    txn: &WriteTransaction,
    edits: impl IntoIterator<Item = Edit<'a>>,
    doing: &'static str,
) -> Result<(), StoreError> {
    let mut keys = txn
        .open_table(KEYS)
        .map_err(|e| StoreError::redb("opening the keys table", e))?;
    let mut ready = txn
        .open_table(READY)
        .map_err(|e| StoreError::redb("opening the ready-key table", e))?;
    let mut in_flight = txn
        .open_table(IN_FLIGHT)
        .map_err(|e| StoreError::redb("opening the in-flight table", e))?;
    let write = |e| StoreError::redb(doing, e);
    for edit in edits {
        match edit {
            Edit::Key(id, value) => set(&mut keys, id, value).map_err(write)?,
            Edit::Ready(link, pos, value) => set(&mut ready, (link, pos), value).map_err(write)?,
            Edit::InFlight(id, value) => set(&mut in_flight, id, value).map_err(write)?,
        }
    }
    Ok(())
}

/// Puts `value` at `key`, or deletes the entry when `value` is `None`.
fn set<K: redb::Key + 'static>(
    table: &mut Table<'_, K, &'static [u8]>,
    key: K::SelfType<'_>,
    value: Option<&[u8]>,
) -> Result<(), redb::StorageError> {
    match value {
        Some(v) => table.insert(key, v).map(drop),
        None => table.remove(key).map(drop),
    }
}
