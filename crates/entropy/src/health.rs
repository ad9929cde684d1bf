//! Continuous health tests of a noise source: NIST SP 800-90B §4.4.1 Repetition Count Test
//! (RCT) and §4.4.2 Adaptive Proportion Test (APT), over bytes (8-bit samples).
//!
//! No I/O and no clock: bytes in, a verdict out. The entropy server runs both tests on each
//! raw source separately (the OS generator's output, and the mix device or file *before*
//! it is XOR-ed in: XOR with a good source would hide a dead mix device); a KME runs the
//! RCT on every block it receives from an entropy server.
//!
//! # Cutoffs and the arithmetic behind them
//!
//! The standard computes both cutoffs from the assessed min-entropy per sample `H` and a
//! false-positive probability `α`:
//!
//! - RCT: `C = 1 + ⌈−log2(α) / H⌉`; it fails when one value repeats `C` times in a row.
//!   An honest source repeats a value `C − 1` more times with probability `2^(−H·(C−1)) ≤ α`
//!   per sample.
//! - APT: window `W = 512` (non-binary samples), `C = 1 + CRITBINOM(W, 2^−H, 1 − α)`, the
//!   smallest `C` with `P(Binomial(W, 2^−H) ≥ C) ≤ α`; it fails when the window's first
//!   value appears `C` times in the window. `α` is then per window.
//!
//! Every source here is claimed to be full entropy: `H = 8`. The standard's example
//! `α = 2^−20` gives `C = 4` (RCT) and `C = 13` (APT), but that `α` is per sample: an honest
//! source would trip the RCT about once every 2^24 bytes (16 MiB), i.e. many times a day on
//! a busy server, and a latched failure would stop it. So `α = 2^−80`
//! ([`ALPHA_LOG2`]):
//!
//! - RCT cutoff [`RCT_CUTOFF`] `= 1 + ⌈80 / 8⌉ = 11`;
//! - APT cutoff [`APT_CUTOFF`] `= 1 + CRITBINOM(512, 1/256, 1 − 2^−80) = 30`; the exact
//!   per-window false-alarm probability with the `W − 1 = 511` samples that follow the
//!   first is `2^−77.7` (both are recomputed by the tests of this module).
//!
//! Over `10^15 ≈ 2^49.8` bytes of honest output the expected number of false alarms is
//! `2^49.8 · 2^−80 ≈ 2^−30` for the RCT plus `2^49.8 / 512 · 2^−77.7 ≈ 2^−37` for the APT:
//! negligible. Detection stays fast:
//!
//! - a stuck source (one value) fails the RCT at its 11th byte;
//! - a source that emits one value with probability 1/2 fails the APT in every window that
//!   starts with that value (each does with probability 1/2; one that does then passes
//!   with probability `2^−360`), so it fails within `k` windows (`512·k` bytes) with
//!   probability `1 − 2^−k`, and usually earlier through the RCT.
//!
//! Sources with less than full entropy per byte (a raw, unconditioned hardware noise
//! source) are not what `H = 8` describes; feed such a source through its own conditioning
//! before mixing it in.

/// Assessed min-entropy per 8-bit sample, in bits: the sources are claimed full entropy.
pub const MIN_ENTROPY_BITS: u32 = 8;
/// `−log2(α)`: the false-positive probability of each test is `2^−80` (per sample for the
/// RCT, per window for the APT).
pub const ALPHA_LOG2: u32 = 80;
/// RCT cutoff: `1 + ⌈ALPHA_LOG2 / MIN_ENTROPY_BITS⌉`.
pub const RCT_CUTOFF: u32 = 1 + ALPHA_LOG2.div_ceil(MIN_ENTROPY_BITS);
/// APT window for non-binary samples (SP 800-90B §4.4.2).
pub const APT_WINDOW: u32 = 512;
/// APT cutoff: `1 + CRITBINOM(512, 2^−8, 1 − 2^−80)` (computed in this module's tests).
pub const APT_CUTOFF: u32 = 30;

/// Which test failed, and on what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HealthFailure {
    /// One value repeated `cutoff` times in a row.
    #[error(
        "repetition count test failed: byte {value:#04x} repeated {cutoff} times in a row \
         (SP 800-90B 4.4.1)"
    )]
    RepetitionCount {
        /// The repeated value.
        value: u8,
        /// The cutoff reached.
        cutoff: u32,
    },
    /// The first value of a window appeared `cutoff` times in it.
    #[error(
        "adaptive proportion test failed: byte {value:#04x} appeared {cutoff} times in a \
         window of {window} (SP 800-90B 4.4.2)"
    )]
    AdaptiveProportion {
        /// The over-represented value.
        value: u8,
        /// The cutoff reached.
        cutoff: u32,
        /// The window size.
        window: u32,
    },
}

/// The Repetition Count Test over a stream of bytes.
#[derive(Debug, Clone)]
pub struct RepetitionCount {
    cutoff: u32,
    last: Option<u8>,
    run: u32,
}

impl Default for RepetitionCount {
    fn default() -> Self {
        Self::with_cutoff(RCT_CUTOFF)
    }
}

impl RepetitionCount {
    /// A test with the cutoff of this module ([`RCT_CUTOFF`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// A test with another cutoff (at least 2).
    pub fn with_cutoff(cutoff: u32) -> Self {
        Self {
            cutoff: cutoff.max(2),
            last: None,
            run: 0,
        }
    }

    /// Runs the test over the next `bytes` of the stream.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), HealthFailure> {
        for &b in bytes {
            if self.last == Some(b) {
                self.run += 1;
                if self.run >= self.cutoff {
                    return Err(HealthFailure::RepetitionCount {
                        value: b,
                        cutoff: self.cutoff,
                    });
                }
            } else {
                self.last = Some(b);
                self.run = 1;
            }
        }
        Ok(())
    }
}

/// The Adaptive Proportion Test over a stream of bytes, in consecutive windows.
#[derive(Debug, Clone)]
pub struct AdaptiveProportion {
    cutoff: u32,
    window: u32,
    /// The window's first value.
    first: u8,
    /// Occurrences of `first` in the window so far.
    count: u32,
    /// Samples of the window seen so far; 0 means the next sample starts a window.
    seen: u32,
}

impl Default for AdaptiveProportion {
    fn default() -> Self {
        Self::with_cutoff(APT_CUTOFF, APT_WINDOW)
    }
}

impl AdaptiveProportion {
    /// A test with the cutoff and window of this module.
    pub fn new() -> Self {
        Self::default()
    }

    /// A test with another cutoff (at least 2) and window (at least the cutoff).
    pub fn with_cutoff(cutoff: u32, window: u32) -> Self {
        let cutoff = cutoff.max(2);
        Self {
            cutoff,
            window: window.max(cutoff),
            first: 0,
            count: 0,
            seen: 0,
        }
    }

    /// Runs the test over the next `bytes` of the stream.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), HealthFailure> {
        for &b in bytes {
            if self.seen == 0 {
                self.first = b;
                self.count = 1;
            } else if b == self.first {
                self.count += 1;
                if self.count >= self.cutoff {
                    return Err(HealthFailure::AdaptiveProportion {
                        value: b,
                        cutoff: self.cutoff,
                        window: self.window,
                    });
                }
            }
            self.seen += 1;
            if self.seen == self.window {
                self.seen = 0;
            }
        }
        Ok(())
    }
}

/// Both tests over one source, latched: after the first failure every later call fails
/// with it, whatever the bytes.
#[derive(Debug, Clone, Default)]
pub struct HealthTests {
    rct: RepetitionCount,
    apt: AdaptiveProportion,
    failure: Option<HealthFailure>,
}

impl HealthTests {
    /// Both tests with the cutoffs of this module.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs both tests over the next `bytes` of the source.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), HealthFailure> {
        if let Some(failure) = self.failure {
            return Err(failure);
        }
        let verdict = self.rct.feed(bytes).and_then(|()| self.apt.feed(bytes));
        if let Err(failure) = verdict {
            self.failure = Some(failure);
        }
        verdict
    }

    /// The latched failure, if any.
    pub fn failure(&self) -> Option<HealthFailure> {
        self.failure
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `P(Binomial(n, p) > k)` for every `k`, summed from the top so that tiny tails keep
    /// their precision.
    fn upper_tails(n: u32, p: f64) -> Vec<f64> {
        let mut terms = Vec::with_capacity(n as usize + 1);
        let mut t = (1.0 - p).powi(n as i32);
        for k in 0..=n {
            terms.push(t);
            t *= f64::from(n - k) / f64::from(k + 1) * p / (1.0 - p);
        }
        let mut tails = vec![0.0; n as usize + 1];
        let mut above = 0.0;
        for k in (0..=n as usize).rev() {
            tails[k] = above;
            above += terms[k];
        }
        tails
    }

    /// SP 800-90B's APT cutoff `1 + CRITBINOM(W, 2^−H, 1 − α)`: CRITBINOM is the smallest
    /// `k` with `P(X ≤ k) ≥ 1 − α`, i.e. `P(X > k) ≤ α`.
    fn apt_cutoff(window: u32, h_bits: u32, alpha_log2: u32) -> u32 {
        let alpha = 2f64.powi(-(alpha_log2 as i32));
        let tails = upper_tails(window, 2f64.powi(-(h_bits as i32)));
        let k = tails.iter().position(|&t| t <= alpha).expect("some k") as u32;
        1 + k
    }

    fn rct_cutoff(h_bits: u32, alpha_log2: u32) -> u32 {
        1 + alpha_log2.div_ceil(h_bits)
    }

    #[test]
    fn cutoffs_follow_the_standard_formulas() {
        // The standard's example, alpha = 2^-20 with H = 8: C = 4 (RCT) and 13 (APT, as
        // in its table of APT cutoffs for W = 512).
        assert_eq!(rct_cutoff(8, 20), 4);
        assert_eq!(apt_cutoff(512, 8, 20), 13);
        // Ours.
        assert_eq!(RCT_CUTOFF, rct_cutoff(MIN_ENTROPY_BITS, ALPHA_LOG2));
        assert_eq!(RCT_CUTOFF, 11);
        assert_eq!(
            APT_CUTOFF,
            apt_cutoff(APT_WINDOW, MIN_ENTROPY_BITS, ALPHA_LOG2)
        );
        // The false alarm per window, over the W - 1 samples after the first:
        // P(Binomial(511, 1/256) >= C - 1) is below alpha.
        let tails = upper_tails(APT_WINDOW - 1, 1.0 / 256.0);
        let per_window = tails[(APT_CUTOFF - 2) as usize];
        assert!(per_window < 2f64.powi(-77), "{per_window:e}");
    }

    /// A deterministic stand-in for a good generator: SHA-256 in counter mode.
    fn good_stream(len: usize, seed: u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 32);
        let mut counter = 0u64;
        while out.len() < len {
            let mut input = [0u8; 9];
            input[0] = seed;
            input[1..].copy_from_slice(&counter.to_le_bytes());
            out.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, &input).as_ref());
            counter += 1;
        }
        out.truncate(len);
        out
    }

    #[test]
    fn stuck_source_fails_the_rct_at_the_cutoff() {
        let mut rct = RepetitionCount::new();
        assert!(rct.feed(&[7; 10]).is_ok());
        assert_eq!(
            rct.feed(&[7]),
            Err(HealthFailure::RepetitionCount {
                value: 7,
                cutoff: 11
            })
        );
        // Runs split across calls count as one run; a different value resets it.
        let mut rct = RepetitionCount::new();
        for _ in 0..5 {
            rct.feed(&[0, 0, 1, 1]).unwrap();
        }
        let mut tests = HealthTests::new();
        let failure = tests.feed(&[0u8; 4096]).unwrap_err();
        assert!(matches!(
            failure,
            HealthFailure::RepetitionCount { value: 0, .. }
        ));
        // Latched: good bytes do not clear it.
        assert_eq!(tests.feed(&good_stream(1024, 1)), Err(failure));
        assert_eq!(tests.failure(), Some(failure));
    }

    #[test]
    fn apt_counts_the_first_value_of_each_window() {
        let mut apt = AdaptiveProportion::with_cutoff(3, 8);
        // Window 1: first 5, two more 5s would trip; only one.
        apt.feed(&[5, 1, 5, 2, 3, 4, 6, 7]).unwrap();
        // Window 2 starts with 9: three 5s no longer count, a third 9 does.
        apt.feed(&[9, 5, 5, 5, 1, 2, 9]).unwrap();
        assert_eq!(
            apt.feed(&[9]),
            Err(HealthFailure::AdaptiveProportion {
                value: 9,
                cutoff: 3,
                window: 8
            })
        );
    }

    /// One value (0xAA) with probability 1/2, the rest from the good stream; no runs long
    /// enough for the RCT, so the APT must catch it.
    #[test]
    fn biased_source_fails_the_apt_within_a_few_windows() {
        let noise = good_stream(1 << 16, 2);
        let mut biased = Vec::with_capacity(noise.len());
        let mut run = 0;
        for pair in noise.chunks_exact(2) {
            let pick_aa = pair[0] & 1 == 0 && run < 5;
            if pick_aa {
                run += 1;
                biased.push(0xAA);
            } else {
                run = 0;
                biased.push(if pair[1] == 0xAA { 0x55 } else { pair[1] });
            }
        }
        let mut rct = RepetitionCount::new();
        rct.feed(&biased).expect("no long runs by construction");
        let mut apt = AdaptiveProportion::new();
        let mut tripped_at = None;
        for (i, chunk) in biased.chunks(512).enumerate() {
            if apt.feed(chunk).is_err() {
                tripped_at = Some(i);
                break;
            }
        }
        let windows = tripped_at.expect("the APT must trip");
        assert!(windows < 16, "tripped only in window {windows}");
    }

    #[test]
    fn long_good_stream_passes() {
        // 64 MiB of a good deterministic stream: no false alarm with our cutoffs...
        let stream = good_stream(64 << 20, 3);
        let mut tests = HealthTests::new();
        for chunk in stream.chunks(1 << 16) {
            tests.feed(chunk).expect("honest bytes must pass");
        }
        // ...while the standard's example cutoff (alpha = 2^-20 per sample, C = 4) fires on
        // the very same honest bytes, as the arithmetic in the module doc predicts.
        let mut example = RepetitionCount::with_cutoff(4);
        assert!(example.feed(&stream).is_err());
    }

    #[test]
    fn os_generator_passes() {
        use ring::rand::SecureRandom as _;
        let rng = ring::rand::SystemRandom::new();
        let mut tests = HealthTests::new();
        let mut buffer = vec![0u8; 1 << 20];
        for _ in 0..32 {
            rng.fill(&mut buffer).unwrap();
            tests.feed(&buffer).expect("the OS generator must pass");
        }
    }
}
