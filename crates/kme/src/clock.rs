//! Wall-clock seconds (key and pool expiry), behind a trait so that tests can move time.
//!
//! Deadlines already run on tokio's clock ([`crate::issuer::Deadline`]); expiry times are
//! Unix seconds because they cross the wire and the store. [`SystemClock`] reads the
//! system time; [`TokioClock`] follows tokio's clock, so a test that pauses time and calls
//! `tokio::time::advance` moves deadlines and expiry together, without waiting.

use std::time::{SystemTime, UNIX_EPOCH};

/// Where a KME reads the current Unix time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Seconds since the Unix epoch.
    fn unix_now(&self) -> u64;
}

/// The system's wall clock: what every server uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn unix_now(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// Unix time that starts at a given second and then moves with tokio's clock, so that a
/// paused runtime's `advance` also moves it. For tests.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start_unix: u64,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock that reads `start_unix` now (on tokio's clock) and moves with it.
    pub fn starting_at(start_unix: u64) -> Self {
        Self {
            start_unix,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn unix_now(&self) -> u64 {
        self.start_unix
            .saturating_add(self.start.elapsed().as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_moves_only_with_tokio_time() {
        let clock = TokioClock::starting_at(1_000);
        assert_eq!(clock.unix_now(), 1_000);
        tokio::time::advance(std::time::Duration::from_millis(2_500)).await;
        assert_eq!(clock.unix_now(), 1_002);
    }

    #[test]
    fn the_system_clock_is_after_2020() {
        assert!(SystemClock.unix_now() > 1_577_836_800);
    }
}
