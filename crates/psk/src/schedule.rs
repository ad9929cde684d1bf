//! The shared schedule: wall-clock time cut into epochs of one interval, aligned to the
//! Unix epoch, so that both ends name the same moment without talking about it.
//!
//! The key for epoch `E` is agreed during the half interval before `E` starts and applied
//! by each end when its own clock reaches the start of `E`. Clocks that differ by less
//! than the tolerated skew only shift that moment by the difference.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::PskError;

/// The number of an interval since the Unix epoch: the name both ends give a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Interval-aligned epochs with a tolerance for clock skew between the two ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    interval: Duration,
    max_skew: Duration,
}

impl Schedule {
    /// A schedule rotating every `interval` between ends whose clocks differ by at most
    /// `max_skew`. The skew must stay under a quarter interval: the agreement window is half
    /// an interval, and a larger skew would let one end apply before the other agreed.
    pub fn new(interval: Duration, max_skew: Duration) -> Result<Self, PskError> {
        if interval < Duration::from_millis(100) {
            return Err(PskError::Config(format!(
                "the interval must be at least 100 ms, not {interval:?}"
            )));
        }
        if max_skew.saturating_mul(4) >= interval {
            return Err(PskError::Config(format!(
                "the tolerated clock skew ({max_skew:?}) must be under a quarter of the interval ({interval:?})"
            )));
        }
        Ok(Self { interval, max_skew })
    }

    /// The rotation interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The epoch that `now` falls in.
    pub fn epoch_at(&self, now: SystemTime) -> Epoch {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        Epoch((since.as_nanos() / self.interval.as_nanos()) as u64)
    }

    /// When `epoch` starts: the moment its key is applied.
    pub fn start_of(&self, epoch: Epoch) -> SystemTime {
        let nanos = u128::from(epoch.0) * self.interval.as_nanos();
        let secs = (nanos / 1_000_000_000) as u64;
        UNIX_EPOCH + Duration::new(secs, (nanos % 1_000_000_000) as u32)
    }

    /// When the initiator starts agreeing the key of `epoch`: half an interval before it
    /// starts, which leaves the other half for retries (a KME or the peer briefly down).
    pub fn prepare_from(&self, epoch: Epoch) -> SystemTime {
        self.start_of(epoch) - self.interval / 2
    }

    /// Whether an offer for `epoch` received at `now` fits this end's clock: from the
    /// start of its agreement window to the end of the epoch itself (a late agreement),
    /// widened by the tolerated skew. Anything else means the clocks disagree.
    pub fn plausible(&self, epoch: Epoch, now: SystemTime) -> bool {
        let earliest = self.prepare_from(epoch) - self.max_skew;
        let latest = self.start_of(Epoch(epoch.0 + 1)) + self.max_skew;
        earliest <= now && now < latest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: f64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs_f64(secs)
    }

    fn schedule() -> Schedule {
        Schedule::new(Duration::from_secs(120), Duration::from_secs(10)).unwrap()
    }

    #[test]
    fn epochs_are_aligned_to_the_interval() {
        let s = schedule();
        assert_eq!(s.epoch_at(at(0.0)), Epoch(0));
        assert_eq!(s.epoch_at(at(119.999)), Epoch(0));
        assert_eq!(s.epoch_at(at(120.0)), Epoch(1));
        assert_eq!(s.start_of(Epoch(14_000_000)), at(1_680_000_000.0));
        // Two ends started at different times agree on the number and its start.
        let e = s.epoch_at(at(1_764_561_234.5));
        assert_eq!(s.epoch_at(s.start_of(e)), e);
        assert_eq!(s.start_of(e), at(1_764_561_120.0));
    }

    #[test]
    fn sub_second_intervals_keep_their_precision() {
        let s = Schedule::new(Duration::from_millis(250), Duration::ZERO).unwrap();
        assert_eq!(s.epoch_at(at(1.3)), Epoch(5));
        assert_eq!(s.start_of(Epoch(5)), at(1.25));
        assert_eq!(s.prepare_from(Epoch(5)), at(1.125));
    }

    #[test]
    fn agreement_starts_half_an_interval_before() {
        let s = schedule();
        assert_eq!(s.prepare_from(Epoch(10)), at(1140.0));
    }

    #[test]
    fn offers_are_plausible_only_within_the_window_and_skew() {
        let s = schedule();
        let e = Epoch(10); // starts at 1200 s; agreement from 1140 s
        assert!(
            !s.plausible(e, at(1129.9)),
            "earlier than the window minus skew"
        );
        assert!(s.plausible(e, at(1130.0)), "a clock 10 s behind");
        assert!(s.plausible(e, at(1200.0)));
        assert!(
            s.plausible(e, at(1329.9)),
            "late, within the epoch plus skew"
        );
        assert!(!s.plausible(e, at(1330.0)));
    }

    #[test]
    fn a_skew_of_a_quarter_interval_is_refused() {
        assert!(Schedule::new(Duration::from_secs(120), Duration::from_secs(30)).is_err());
        assert!(Schedule::new(Duration::from_secs(120), Duration::from_secs(29)).is_ok());
        assert!(Schedule::new(Duration::from_millis(50), Duration::ZERO).is_err());
    }
}
