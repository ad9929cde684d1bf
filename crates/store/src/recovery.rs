//! Opening the embedded store's files: their permissions, the tables, the KEK check, and
//! the write-ahead log applied again after an unclean stop, all in one durable transaction
//! before the writer starts.

use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableHandle};
use uuid::Uuid;

use crate::expiry::Seen;
use crate::kek::Cipher;
use crate::meta::PendingCounts;
use crate::record::Record;
use crate::schema::{self, Edit, IN_FLIGHT, KEK_CHECK, KEYS, META, OLD_POOL, READY, WAL_SEQ};
use crate::wal::Recovered;
use crate::StoreError;

/// What opening found: pending counts, the lifetimes of the keys stored, log records
/// applied again, and the last log record the store now covers durably.
pub(crate) struct Prepared {
    pub(crate) pending: PendingCounts,
    pub(crate) lifetimes: Seen,
    pub(crate) replayed: u64,
    pub(crate) checkpointed: u64,
}

/// Makes the folder of the store at `path` 0700 and the store's files 0600 (see
/// [`EmbeddedStore::open`]), creating the folder and an empty database file if missing, so
/// that no file of the store is ever readable by others, not even for a moment.
#[cfg(unix)]
pub(crate) fn restrict_files(path: &Path) -> Result<(), StoreError> {
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
pub(crate) fn restrict_files(_path: &Path) -> Result<(), StoreError> {
    Ok(())
}

/// The write-ahead log of the store at `path`: the same name with `.wal` added.
pub(crate) fn wal_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".wal");
    PathBuf::from(name)
}

/// Applies the log records after the last checkpoint (a crash lost them from redb, not from
/// the log), with the same edits a checkpoint writes (see `schema::apply`). Returns how many
/// records were applied and the last one the store now covers.
pub(crate) fn replay(
    txn: &redb::WriteTransaction,
    checkpointed: u64,
    recovered: &Recovered,
    log: &Path,
) -> Result<(u64, u64), StoreError> {
    let mut last = checkpointed;
    let mut records = Vec::new();
    for (seq, changes) in recovered {
        if *seq <= checkpointed {
            continue;
        }
        if *seq != last + 1 {
            return Err(StoreError::io(
                format!(
                    "write-ahead log {}: record {seq} follows {last}; records are missing",
                    log.display()
                ),
                std::io::Error::from(std::io::ErrorKind::InvalidData),
            ));
        }
        records.push(changes);
        last = *seq;
    }
    let edits = records.iter().flat_map(|c| c.iter().map(Edit::from));
    schema::apply(txn, edits, "applying the write-ahead log")?;
    Ok((records.len() as u64, last))
}

/// Creates the tables, writes or verifies the KEK check value, applies the log and counts
/// pending keys, in one durable transaction.
pub(crate) fn prepare(
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
        let (replayed, last) = replay(&txn, checkpointed, &recovered, &wal_path(path))?;
        schema::write_checkpoint_seq(&txn, last)?;
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
