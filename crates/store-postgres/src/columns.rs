//! How API values are stored in columns: pool positions and instants are u64 in the API and
//! `bigint` in the tables, and every key's record is the sealed record of `dqkd_store::seal`.

use dqkd_store::seal::Record;
use dqkd_store::StoreError;
use uuid::Uuid;

/// Why a ready key is refused whose position has no `bigint` form.
pub(crate) const SEQ_TOO_LARGE: &str =
    "pool position above i64::MAX, which the PostgreSQL store cannot hold";

/// A pool position as stored. Positions are u64 in the API and `bigint` in the table; real
/// ones (nanoseconds since the Unix epoch, or smaller) are far below `i64::MAX`. A larger one
/// has no stored form: clamping or wrapping it would reorder the pool or merge positions, so
/// `None`, and nothing can be stored there.
pub(crate) fn to_db_seq(seq: u64) -> Option<i64> {
    i64::try_from(seq).ok()
}

/// A stored position back in API form (never negative: the table checks `seq >= 0`).
pub(crate) fn from_db_seq(id: Uuid, seq: i64) -> Result<u64, StoreError> {
    u64::try_from(seq).map_err(|e| StoreError::Database {
        context: format!("reading ready key {id}: negative pool position {seq}"),
        cause: Box::new(e),
    })
}

/// `expires_at` and `now` are u64 in the API and `bigint` in the table; instants past
/// `i64::MAX` seconds (about 292 billion years) are stored as `i64::MAX`.
pub(crate) fn to_db_time(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

/// The record stored for key `id`.
pub(crate) fn decode(id: Uuid, bytes: &[u8]) -> Result<Record, StoreError> {
    Record::decode(bytes).map_err(|reason| StoreError::CorruptRecord { id, reason })
}
