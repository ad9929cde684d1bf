//! Key IDs: version 7 UUIDs (RFC 9562): 48 bits of Unix time in milliseconds, then 74 bits
//! from the system's secure random generator.
//!
//! Why time-ordered: every store files keys by ID. Random (version 4) IDs scatter new keys
//! over the whole key table, so each write and each duplicate check touches its own B-tree
//! page, and once the table outgrows the cache (a master's refetch copies alone add every
//! key it asks for) each one reads a page from disk. IDs made in the same second sit
//! together, so new keys and their checks stay on the newest pages. The cost: an ID tells
//! whoever sees it (SAEs and KMEs, over TLS) the millisecond it was made. IDs stay
//! unguessable and unique: 74 random bits each, and every store refuses a duplicate.

use std::time::{SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use uuid::{Builder, Uuid};

/// Random bytes per ID (the version and variant bits overwrite 2 of the 80 bits).
const RANDOM_BYTES: usize = 10;

/// `count` new key IDs, from one call to the random generator.
pub fn new_key_ids(count: usize) -> Result<Vec<Uuid>, ring::error::Unspecified> {
    let mut random = vec![0u8; count * RANDOM_BYTES];
    SystemRandom::new().fill(&mut random)?;
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Ok(random
        .chunks_exact(RANDOM_BYTES)
        .map(|bytes| {
            let mut r = [0u8; RANDOM_BYTES];
            r.copy_from_slice(bytes);
            Builder::from_unix_timestamp_millis(millis, &r).into_uuid()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ids_are_version_7_distinct_and_carry_the_time() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let ids = new_key_ids(1000).unwrap();
        assert_eq!(ids.len(), 1000);
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 1000);
        for id in &ids {
            assert_eq!(id.get_version_num(), 7);
            let (secs, nanos) = id.get_timestamp().unwrap().to_unix();
            let ms = secs * 1000 + u64::from(nanos) / 1_000_000;
            assert!(ms >= before && ms < before + 60_000, "{ms} vs {before}");
        }
        // Later IDs sort after earlier ones once the millisecond has moved on.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later = new_key_ids(1).unwrap()[0];
        assert!(ids.iter().all(|id| *id < later));
    }
}
