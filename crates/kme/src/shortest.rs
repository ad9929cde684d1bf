//! The shortest of recent waits, which tells a far link from a busy near one: a queue
//! lengthens waits, it never shortens them. Used for peer acknowledgements, generations and
//! entropy allocations alike.

use std::time::Duration;

use tokio::time::Instant;

/// A wait at least this long means the round trip, not the local work, bounds the link.
/// Measured on 2 cores: at 8 ms a loopback link at 256 connections, whose acknowledgements
/// queue behind the CPU, counted as far and lost 40% of its pairs/s; at 20 ms it did not,
/// while links 10 ms or more away one way (RTT 20 ms) still count as far.
pub(crate) const FAR: Duration = Duration::from_millis(20);

/// Waits a link must have had before it may count as far: the first ones also pay for new
/// connections (TCP and TLS handshakes), which says nothing about the route.
pub(crate) const MIN_SAMPLES: u32 = 16;

/// How long a shortest wait is remembered, so that a route that got longer is noticed.
pub(crate) const MIN_WINDOW: Duration = Duration::from_secs(10);

/// The shortest wait of the current and the previous [`MIN_WINDOW`].
pub(crate) struct Shortest {
    samples: u32,
    since: Instant,
    current: Option<Duration>,
    previous: Option<Duration>,
}

impl Default for Shortest {
    fn default() -> Self {
        Self {
            samples: 0,
            since: Instant::now(),
            current: None,
            previous: None,
        }
    }
}

impl Shortest {
    /// Records one wait.
    pub(crate) fn record(&mut self, took: Duration) {
        if self.since.elapsed() >= MIN_WINDOW {
            self.previous = self.current.take();
            self.since = Instant::now();
        }
        self.samples = self.samples.saturating_add(1);
        self.current = Some(self.current.map_or(took, |shortest| shortest.min(took)));
    }

    /// At least [`MIN_SAMPLES`] waits, and the shortest recent one is [`FAR`] or longer.
    /// Unknown counts as near.
    pub(crate) fn far(&self) -> bool {
        if self.samples < MIN_SAMPLES {
            return false;
        }
        let shortest = match (self.current, self.previous) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(one) => one,
                None => return false,
            },
        };
        shortest >= FAR
    }
}
