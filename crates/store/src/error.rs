//! Error types of the key store.
//!
//! One `#[non_exhaustive]` enum per audience: [`StoreError`] for operators (what failed and
//! where, never key bytes), and [`TakeError`] for the ETSI layer, which must map "not found" and
//! "unauthorised" to different answers without parsing messages.
//!
//! A message names its cause itself, because the KME logs errors with their `Display` alone;
//! so no variant also returns that cause from `source()`, or a report of the whole chain
//! (anyhow's `{:#}`) would print it twice.

use std::path::PathBuf;

use uuid::Uuid;

/// Why a key cannot be stored as given (the reason of [`StoreError::InvalidKey`]) when a
/// field is too long for the length prefix of the record format.
pub const TOO_LONG: &str = "a name, the slave list or the key is too long to store";

/// Everything that can go wrong inside a key store.
///
/// Each variant carries enough context (a path, an operation, a key ID) to act on the log line
/// alone. None of them ever contains key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file system operation failed.
    #[error("{context}: {cause}")]
    Io {
        /// What was being done, including the path.
        context: String,
        /// The underlying I/O error.
        cause: std::io::Error,
    },
    /// The embedded database reported an error.
    #[error("key database: {context}: {cause}")]
    Redb {
        /// What was being done.
        context: &'static str,
        /// The underlying redb error (shared: one failed commit answers every operation in
        /// its batch with the same cause).
        cause: std::sync::Arc<redb::Error>,
    },
    /// Sealing or opening with the key-encryption key failed.
    #[error("encryption at rest: {context}")]
    Crypto {
        /// What was being sealed or opened. ring deliberately gives no further detail.
        context: String,
    },
    /// A stored record could not be decoded; the file is damaged or was written by an
    /// incompatible version.
    #[error("corrupt key record {id}: {reason}")]
    CorruptRecord {
        /// The key ID of the record.
        id: Uuid,
        /// What was wrong with the bytes.
        reason: RecordError,
    },
    /// A key with this ID is already stored; the insert that carried it was not applied.
    #[error("key {id} already exists")]
    DuplicateId {
        /// The key ID that was already present (or repeated within the request).
        id: Uuid,
    },
    /// A key cannot be stored as given (for example no slaves, or a name too long to encode).
    #[error("invalid key {id}: {reason}")]
    InvalidKey {
        /// The offending key ID.
        id: Uuid,
        /// Why it was refused.
        reason: &'static str,
    },
    /// `Kek::generate_file` refused to overwrite an existing file.
    #[error("key-encryption key file {} already exists (use force to overwrite)", path.display())]
    KekFileExists {
        /// The file that exists.
        path: PathBuf,
    },
    /// A key-encryption key file does not hold 64 hex characters.
    #[error("key-encryption key file {}: {reason}", path.display())]
    KekFileInvalid {
        /// The file that was read.
        path: PathBuf,
        /// What was wrong with its contents.
        reason: &'static str,
    },
    /// A key-encryption key file that users other than its owner may read or change.
    #[error(
        "key-encryption key file {} is open to other users (mode {mode:04o}); \
         run `chmod 600 {}` and start again",
        path.display(),
        path.display()
    )]
    KekFileExposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key store was written with a different key-encryption key.
    #[error("key store {} was created with a different key-encryption key", path.display())]
    WrongKek {
        /// The database file.
        path: PathBuf,
    },
    /// A database server (for example PostgreSQL) reported an error, or could not be reached.
    #[error("key database: {context}: {cause}")]
    Database {
        /// What was being done.
        context: String,
        /// The underlying client or server error.
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The database schema cannot be used by this build (for example it was migrated by a
    /// newer version).
    #[error("key database schema: {reason}")]
    Schema {
        /// What is wrong, with the versions involved.
        reason: String,
    },
    /// The key database on a server was created with a different key-encryption key.
    #[error("key database {database} was created with a different key-encryption key")]
    WrongKekDatabase {
        /// The database (host, port and name; never a password).
        database: String,
    },
    /// The store has been closed (or its writer thread stopped); no more operations are accepted.
    #[error("key store is closed")]
    Closed,
    /// A write to the log or the database failed part-way, so the store stopped writing rather
    /// than let memory and disk disagree; a restart recovers from the log.
    #[error(
        "key store stopped writing after a failed write ({reason}); restart the KME to recover"
    )]
    Halted {
        /// The failure that stopped it.
        reason: String,
    },
}

impl StoreError {
    /// Wraps any redb error with what was being done when it happened.
    pub(crate) fn redb(context: &'static str, cause: impl Into<redb::Error>) -> Self {
        StoreError::Redb {
            context,
            cause: std::sync::Arc::new(cause.into()),
        }
    }

    /// Wraps an I/O error with its context.
    pub(crate) fn io(context: impl Into<String>, cause: std::io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            cause,
        }
    }
}

/// Why a stored record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The record ended before a field was complete.
    #[error("truncated record")]
    Truncated,
    /// The record declares a format version this build does not know.
    #[error("unknown record version {0}")]
    UnknownVersion(u8),
    /// Bytes remain after the last field.
    #[error("{0} trailing bytes after record")]
    TrailingBytes(usize),
    /// A name field is not UTF-8.
    #[error("name is not valid UTF-8")]
    BadName,
    /// A slave entry has flag bits this version does not define.
    #[error("unknown slave flags {0:#04x}")]
    BadFlags(u8),
}

/// Why a `take` (ETSI `dec_keys`) request was refused.
///
/// Requests are all-or-nothing: on any error, no key was delivered or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TakeError {
    /// At least one key ID is unknown, expired, repeated in the request, or already delivered
    /// to this caller.
    #[error("key not found")]
    NotFound,
    /// At least one key exists but was not made for this caller, or not by one of the given masters.
    #[error("caller is not authorised for this key")]
    Unauthorized,
    /// The store failed; the request may be retried.
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    /// The error and its sources, as anyhow's `{:#}` prints them.
    fn report(error: &dyn Error) -> String {
        let mut text = error.to_string();
        let mut next = error.source();
        while let Some(cause) = next {
            text = format!("{text}: {cause}");
            next = cause.source();
        }
        text
    }

    #[test]
    fn an_io_error_names_its_path_and_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("site.kek");
        let error = crate::Kek::load(&missing).unwrap_err();
        let text = report(&error);
        assert!(matches!(error, StoreError::Io { .. }), "{error:?}");
        assert_eq!(text.matches("(os error 2)").count(), 1, "{text}");
        assert_eq!(
            text.matches(&*missing.to_string_lossy()).count(),
            1,
            "{text}"
        );
    }

    #[test]
    fn every_wrapped_cause_is_printed_once() {
        let errors = [
            StoreError::io("writing x", std::io::Error::other("disk on fire")),
            StoreError::Database {
                context: "committing".into(),
                cause: Box::new(std::io::Error::other("disk on fire")),
            },
            StoreError::redb(
                "committing",
                redb::StorageError::Io(std::io::Error::other("disk on fire")),
            ),
        ];
        for error in errors {
            let text = report(&error);
            assert_eq!(text.matches("disk on fire").count(), 1, "{text}");
        }
        let corrupt = StoreError::CorruptRecord {
            id: Uuid::nil(),
            reason: RecordError::Truncated,
        };
        let text = report(&TakeError::Store(corrupt));
        assert_eq!(text.matches("truncated record").count(), 1, "{text}");
    }
}
