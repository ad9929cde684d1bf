//! The expiry scan of the embedded store: finds expired keys in a read-only snapshot of
//! redb, off the writer thread, so a large store is swept without stalling commits. The
//! writer re-checks each candidate before removing it (see `ops::purge`).

use redb::{Database, ReadableTable};
use uuid::Uuid;

use crate::expiry::Seen;
use crate::record::Record;
use crate::schema::{split_ready, Base};
use crate::StoreError;

/// Keys found expired by a scan: ordinary keys by ID, ready keys by (link, position).
#[derive(Debug, Default)]
pub(crate) struct Expired {
    pub(crate) keys: Vec<Uuid>,
    pub(crate) ready: Vec<(String, u64)>,
}

/// Records whose `expires_at <= now`, from a consistent snapshot. Only keys with IDs below
/// `keys_end`, and ready keys at positions below `ready_end`, are read where these are given
/// (see `expiry`). A sweep of every ready key also returns what it saw of their lifetimes.
pub(crate) fn expired(
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
