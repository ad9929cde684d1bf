//! Which part of each table an expiry sweep must read.
//!
//! Key IDs are version 7 UUIDs: their top 48 bits are the Unix millisecond they were made,
//! so the keys table, ordered by ID, is ordered by age. A key made at second `t` with
//! `expires_at = t + lifetime` cannot have expired before `t + shortest`, where `shortest` is
//! the shortest lifetime of any key stored. So a sweep at `now` reads only IDs made at or
//! before `now - shortest`; the younger end of the table, where a busy site keeps its
//! masters' copies for a refetch, is never read. Without this, each sweep read every key,
//! and a site that keeps minutes of copies read millions of records every few seconds.
//! Ready keys go the same way by position: a pool position is never below the filling
//! clock in nanoseconds, so it orders a link's ready keys by age too.
//!
//! The bound is exact, not a heuristic: both numbers come from the stored key, whatever the
//! clocks of the sites. A key whose ID is not version 7 (stores of earlier versions), or
//! whose expiry comes before its creation time, has no lifetime to go by: while the store
//! holds one, sweeps read the whole table. So do sweeps before the lifetimes of a table's
//! stored keys are known (for ready keys, until the first whole sweep has read them).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Lifetimes of the keys of one table stored since open (and of those read at open or by a
/// whole-table sweep).
#[derive(Debug)]
pub(crate) struct Lifetimes {
    /// Shortest `expires_at - creation second` of any key with a creation time; `u64::MAX`
    /// for none.
    shortest: AtomicU64,
    /// Whether a key without a usable creation time was stored.
    untimed: AtomicBool,
    /// Whether every key stored before open has been read (at open or by a whole sweep).
    known: AtomicBool,
}

impl Lifetimes {
    /// Lifetimes of a table whose stored keys are read at open (`known`) or not yet.
    pub(crate) fn new(known: bool) -> Self {
        Self {
            shortest: AtomicU64::new(u64::MAX),
            untimed: AtomicBool::new(false),
            known: AtomicBool::new(known),
        }
    }
}

/// What one batch (or the scan at open) saw, published to [`Lifetimes`] at once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seen {
    shortest: u64,
    untimed: bool,
}

impl Default for Seen {
    fn default() -> Self {
        Self {
            shortest: u64::MAX,
            untimed: false,
        }
    }
}

/// The Unix second a version 7 ID was made in, or `None` for another version.
fn created_secs(id: u128) -> Option<u64> {
    let version = (id >> 76) & 0xF;
    (version == 7).then_some(((id >> 80) as u64) / 1000)
}

const NANOS: u64 = 1_000_000_000;

impl Seen {
    /// Notes a key stored with ID `id` and expiry `expires_at` (Unix seconds).
    pub(crate) fn note(&mut self, id: u128, expires_at: u64) {
        self.note_lifetime(created_secs(id), expires_at);
    }

    /// Notes a ready key stored at pool position `seq` with expiry `expires_at`.
    pub(crate) fn note_position(&mut self, seq: u64, expires_at: u64) {
        self.note_lifetime(Some(seq / NANOS), expires_at);
    }

    fn note_lifetime(&mut self, created: Option<u64>, expires_at: u64) {
        match created.and_then(|t| expires_at.checked_sub(t)) {
            Some(lifetime) => self.shortest = self.shortest.min(lifetime),
            None => self.untimed = true,
        }
    }
}

impl Lifetimes {
    pub(crate) fn publish(&self, seen: Seen) {
        self.shortest.fetch_min(seen.shortest, Ordering::Relaxed);
        if seen.untimed {
            self.untimed.store(true, Ordering::Relaxed);
        }
    }

    /// After a whole-table sweep that saw `seen`: every key stored before open is now known.
    /// Keys stored meanwhile were published as they were written.
    pub(crate) fn learned(&self, seen: Seen) {
        self.publish(seen);
        self.known.store(true, Ordering::Relaxed);
    }

    /// The first second whose keys a sweep at `now` need not read (every key made in it or
    /// later is younger than the shortest lifetime), or `None` when it must read the whole
    /// table.
    fn sweep_end_secs(&self, now: u64) -> Option<u64> {
        if !self.known.load(Ordering::Relaxed) || self.untimed.load(Ordering::Relaxed) {
            return None;
        }
        // Keys made in seconds up to `now - shortest` are read. No key at all
        // (`u64::MAX`) reads nothing.
        let shortest = self.shortest.load(Ordering::Relaxed);
        Some(now.saturating_add(1).saturating_sub(shortest))
    }

    /// The first key ID a sweep at `now` need not read, or `None` for the whole table.
    pub(crate) fn sweep_end(&self, now: u64) -> Option<u128> {
        let end_ms = self
            .sweep_end_secs(now)?
            .saturating_mul(1000)
            .min((1 << 48) - 1);
        Some(u128::from(end_ms) << 80)
    }

    /// The first pool position a sweep at `now` need not read, or `None` for every one.
    pub(crate) fn sweep_end_position(&self, now: u64) -> Option<u64> {
        Some(self.sweep_end_secs(now)?.saturating_mul(NANOS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 7 ID made at `secs` (plus `ms`), with random-looking low bits.
    fn v7(secs: u64, ms: u64) -> u128 {
        let millis = u128::from(secs * 1000 + ms);
        (millis << 80) | (0x7 << 76) | 0x0123_4567_89ab_cdef
    }

    fn lifetimes(keys: &[(u128, u64)]) -> Lifetimes {
        let mut seen = Seen::default();
        for &(id, expires_at) in keys {
            seen.note(id, expires_at);
        }
        let l = Lifetimes::new(true);
        l.publish(seen);
        l
    }

    #[test]
    fn a_sweep_reads_only_keys_old_enough_to_have_expired() {
        // Copies kept 300 s and keys kept 3600 s.
        let l = lifetimes(&[(v7(1_000, 0), 1_300), (v7(1_000, 500), 4_600)]);
        let end = l.sweep_end(2_000).unwrap();
        // Made at or before second 1700: read. From second 1701 on, a key lives at least
        // until 1701 + 300 > 2000: not read.
        assert!(v7(1_700, 999) < end);
        assert!(v7(1_701, 0) >= end);
    }

    #[test]
    fn ready_keys_are_bounded_by_position_once_known() {
        let mut seen = Seen::default();
        seen.note_position(1_000 * NANOS + 7, 1_300);
        let l = Lifetimes::new(false);
        l.publish(seen);
        assert_eq!(
            l.sweep_end_position(2_000),
            None,
            "not known before a whole sweep"
        );
        l.learned(Seen::default());
        assert_eq!(l.sweep_end_position(2_000), Some(1_701 * NANOS));
    }

    #[test]
    fn an_empty_store_reads_nothing_and_a_young_clock_nothing_either() {
        assert_eq!(Lifetimes::new(true).sweep_end(2_000), Some(0));
        let l = lifetimes(&[(v7(1_000, 0), 1_300)]);
        assert_eq!(l.sweep_end(100), Some(0));
    }

    #[test]
    fn keys_without_a_usable_creation_time_mean_whole_table_sweeps() {
        let v4 = (0xdead_beef_u128 << 80) | (0x4 << 76);
        assert_eq!(lifetimes(&[(v4, 10)]).sweep_end(2_000), None);
        // Expiring before its ID's second: no lifetime to go by.
        assert_eq!(lifetimes(&[(v7(1_000, 0), 999)]).sweep_end(2_000), None);
    }
}
