//! Allocations made ahead, so that a batch whose entropy servers are far often finds its
//! ranges already here instead of waiting a round trip for them.
//!
//! A *set* is one allocation from each of `n` servers, for one set of readers, all of the
//! same length. A batch takes a whole set or none (a reader may read only the exact range
//! it was given, never a part of it); it uses the front of each range, and the metadata
//! names the whole range, which the peer reads and checks whole. What a batch leaves
//! unused is never used by another: a set leaves the stock when taken, under the lock.
//!
//! The stock is small and short-lived: [`DEPTH`] sets per reader set, each range at most
//! [`MAX_RANGE`] bytes, none kept past [`MAX_HOLD`] or closer than [`MARGIN_SECS`] to its
//! expiry at the server. Its bytes are zeroised when a set is dropped, used or not.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use dqkd_entropy::client::Allocation;
use tokio::time::Instant;

use crate::shortest::Shortest;

/// Sets kept (or being made) ahead per reader set: about the batches that start in one
/// entropy round trip on a busy link, so that most of them find a set.
pub(super) const DEPTH: usize = 32;
/// Largest range a stocked set holds: larger batches allocate for themselves. With
/// [`DEPTH`], at most 2 MiB per server and reader set.
pub(super) const MAX_RANGE: u64 = 64 * 1024;
/// Smallest range a stocked set holds, so that batches of a few keys, whose sizes vary
/// with the load, can use each other's sets; any batch up to this size may take one.
pub(super) const MIN_RANGE: u64 = 2 * 1024;
/// How long a set may wait in the stock before it is dropped unused.
pub(super) const MAX_HOLD: Duration = Duration::from_secs(10);
/// A set is used only while its ranges live at least this long at their servers, so that
/// the peer reads them well before they are shredded.
pub(super) const MARGIN_SECS: u64 = 30;

/// One allocation per server, made ahead.
pub(super) struct Set {
    pub(super) allocations: Vec<Allocation>,
    made: Instant,
}

impl Set {
    pub(super) fn new(allocations: Vec<Allocation>) -> Self {
        Self {
            allocations,
            made: Instant::now(),
        }
    }

    fn len(&self) -> u64 {
        self.allocations.iter().map(|a| a.len).min().unwrap_or(0)
    }

    /// Still fit to hand out at Unix time `now_unix`.
    fn fresh(&self, now_unix: u64) -> bool {
        let expires = self.allocations.iter().map(|a| a.expires_at).min();
        self.made.elapsed() < MAX_HOLD
            && expires.is_some_and(|at| at >= now_unix.saturating_add(MARGIN_SECS))
    }
}

#[derive(Default)]
struct Shelf {
    sets: Vec<Set>,
    /// Sets being allocated for this shelf now.
    coming: usize,
    /// The range length the last batch needed, rounded up to a power of two.
    want: u64,
}

/// The stock of one KME, by reader set.
#[derive(Default)]
pub(super) struct Stock {
    shelves: Mutex<HashMap<Vec<String>, Shelf>>,
    allocations: Mutex<Shortest>,
    /// Makes sets ahead whatever the round trip (tests of the stocked path).
    always: bool,
    /// What [`Stock::far`] last said, to log when it changes.
    was_far: AtomicBool,
}

impl Stock {
    /// A stock that makes sets ahead even when allocations are quick.
    pub(super) fn always() -> Self {
        Self {
            always: true,
            ..Self::default()
        }
    }

    /// Records how long an allocation of `n` ranges took.
    pub(super) fn allocated(&self, took: Duration) {
        lock(&self.allocations).record(took);
    }

    /// Whether allocations take a long round trip, so that making them ahead pays.
    pub(super) fn far(&self) -> bool {
        let far = self.always || lock(&self.allocations).far();
        if self.was_far.swap(far, Ordering::Relaxed) != far {
            if far {
                tracing::info!("entropy allocations take 20 ms or more: allocating ranges ahead");
            } else {
                tracing::info!("entropy allocations are quick again: no ranges allocated ahead");
            }
        }
        far
    }

    /// Takes a set for `readers` whose ranges hold `need` to `4 × need` bytes (or up to
    /// [`MIN_RANGE`] for a smaller need), dropping
    /// stale sets, and sets from a server `usable` refuses (one failing now), on the way.
    /// The set leaves the stock: no other batch can have it.
    pub(super) fn take(
        &self,
        readers: &[String],
        need: u64,
        now_unix: u64,
        usable: impl Fn(&Allocation) -> bool,
    ) -> Option<Set> {
        let mut shelves = lock(&self.shelves);
        let shelf = shelves.entry(readers.to_vec()).or_default();
        shelf.want = need
            .checked_next_power_of_two()
            .unwrap_or(u64::MAX)
            .max(MIN_RANGE);
        shelf
            .sets
            .retain(|set| set.fresh(now_unix) && set.allocations.iter().all(&usable));
        let fits = need..=need.saturating_mul(4).max(MIN_RANGE);
        let index = shelf
            .sets
            .iter()
            .position(|set| fits.contains(&set.len()))?;
        Some(shelf.sets.swap_remove(index))
    }

    /// The range length of a set to make ahead for `readers`, if the shelf has room (and
    /// counts it as coming); `None` when full or when its batches are too large to stock.
    pub(super) fn reserve(&self, readers: &[String]) -> Option<u64> {
        let mut shelves = lock(&self.shelves);
        let shelf = shelves.get_mut(readers)?;
        if shelf.want == 0 || shelf.want > MAX_RANGE || shelf.sets.len() + shelf.coming >= DEPTH {
            return None;
        }
        shelf.coming += 1;
        Some(shelf.want)
    }

    /// Shelves a set made after [`Stock::reserve`] (or nothing, if making it failed).
    pub(super) fn put(&self, readers: &[String], set: Option<Set>) {
        let mut shelves = lock(&self.shelves);
        let Some(shelf) = shelves.get_mut(readers) else {
            return;
        };
        shelf.coming = shelf.coming.saturating_sub(1);
        if let Some(set) = set {
            if shelf.sets.len() < DEPTH {
                shelf.sets.push(set);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
#[path = "stock_tests.rs"]
mod tests;
