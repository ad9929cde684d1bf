//! Where the random bytes come from.
//!
//! Always the operating system's CSPRNG (`ring::rand::SystemRandom`). Optionally a
//! configured device or file (a hardware RNG such as `/dev/hwrng`) is XOR-ed into the
//! output: the XOR of an unpredictable value with anything independent of it is still
//! unpredictable, so a broken or hostile mix source can only fail to add entropy, never
//! take away what the OS provides. An HTTP quantum-entropy service and RDSEED are not
//! implemented yet.
//!
//! Each raw source runs the SP 800-90B continuous health tests ([`crate::health`]) on its
//! own output *before* the XOR (XOR with a good source would hide a dead mix device). A
//! failure latches: every later [`EntropySource::fill`] fails with the same reason, and the
//! server answers allocations with 503 until an operator has looked at the source and
//! restarted it.
//!
//! A mix **file** is read once from its start and never rewound: bytes that were mixed
//! into one range are never mixed into another. When it runs out the source fails
//! (latched, like a failed health test), and a regular file smaller than the configured
//! minimum (one pool, see `server::run`) is refused at start. The file is read from its
//! start again at each start of the server: replace it between starts, or use a device.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, Zeroizing};

use crate::health::{HealthFailure, HealthTests};

/// Bytes read from the mix source per read call.
const MIX_CHUNK: usize = 64 * 1024;

/// The entropy source failed; the server refuses to hand out bytes rather than hand out
/// bytes that were not made as configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The OS CSPRNG reported a failure.
    #[error("the operating system RNG failed")]
    SystemRng,
    /// The mix source could not be opened or read.
    #[error("mix source {path}: {cause}")]
    Mix {
        /// The device or file.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
    /// The mix source is a regular file smaller than the configured minimum.
    #[error(
        "mix source {path} holds {len} bytes, less than the {min} bytes one pool can draw; \
         a mix file is never rewound, so it would run out almost at once"
    )]
    MixTooSmall {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// The minimum.
        min: u64,
    },
    /// The mix source reached its end (a file is read once, never rewound).
    #[error("mix source {0} is exhausted (a mix file is read once, never rewound)")]
    MixExhausted(PathBuf),
    /// A raw source failed a continuous health test.
    #[error("{source_name} failed its health test: {failure}")]
    Unhealthy {
        /// Which raw source: the OS generator or the mix source.
        source_name: String,
        /// The test and the value.
        failure: HealthFailure,
    },
    /// An earlier failure latched; the text is that failure's.
    #[error("{0}")]
    Latched(String),
}

impl SourceError {
    /// Whether this failure stops the source for good (until a restart).
    fn latches(&self) -> bool {
        matches!(self, Self::Unhealthy { .. } | Self::MixExhausted(_))
    }
}

/// Whether each raw source is healthy (its health tests pass and, for a mix file, it is
/// not exhausted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceStatus {
    /// The OS generator.
    pub os_healthy: bool,
    /// The mix source, when one is configured.
    pub mix_healthy: Option<bool>,
}

/// The OS CSPRNG, optionally mixed with a device or file, under continuous health tests.
pub struct EntropySource {
    os: Generator,
    os_health: Mutex<HealthTests>,
    mix: Option<MixFile>,
    /// The first latched failure; set once, never cleared.
    failed: OnceLock<String>,
}

/// The generator every byte starts from.
enum Generator {
    System(SystemRandom),
    /// A broken generator that outputs one value, for the health-test tests.
    #[cfg(test)]
    Stuck(u8),
}

struct MixFile {
    path: PathBuf,
    /// Blocking reads under a blocking lock: [`EntropySource::fill`] runs on a blocking
    /// thread, never on the async executor.
    state: Mutex<MixState>,
}

struct MixState {
    file: File,
    health: HealthTests,
    exhausted: bool,
}

impl std::fmt::Debug for EntropySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntropySource")
            .field("mix", &self.mix.as_ref().map(|m| &m.path))
            .field("failed", &self.failed.get())
            .finish()
    }
}

impl EntropySource {
    /// The OS CSPRNG alone.
    pub fn system() -> Self {
        Self::new(Generator::System(SystemRandom::new()), None)
    }

    fn new(os: Generator, mix: Option<MixFile>) -> Self {
        Self {
            os,
            os_health: Mutex::new(HealthTests::new()),
            mix,
            failed: OnceLock::new(),
        }
    }

    /// A source whose OS generator is stuck at `value`, for tests of what a failure does.
    #[cfg(test)]
    pub(crate) fn stuck(value: u8) -> Self {
        Self::new(Generator::Stuck(value), None)
    }

    /// The OS CSPRNG mixed with `path`. A regular file must hold at least `min_file_len`
    /// bytes (devices have no size and are not checked). The source is opened and read
    /// once here (through the health tests), so that an unreadable, too small or stuck
    /// source is a start-up error rather than a failure on the first request.
    pub fn with_mix_file(path: &Path, min_file_len: u64) -> Result<Self, SourceError> {
        let mix_err = |cause| SourceError::Mix {
            path: path.to_owned(),
            cause,
        };
        let file = File::open(path).map_err(mix_err)?;
        let meta = file.metadata().map_err(mix_err)?;
        if meta.is_file() && meta.len() < min_file_len.max(1) {
            return Err(SourceError::MixTooSmall {
                path: path.to_owned(),
                len: meta.len(),
                min: min_file_len.max(1),
            });
        }
        let source = Self::new(
            Generator::System(SystemRandom::new()),
            Some(MixFile::new(path, file)),
        );
        let mut probe = Zeroizing::new([0u8; 64]);
        source.fill(&mut probe[..])?;
        Ok(source)
    }

    /// The configured mix source, if any.
    pub fn mix_path(&self) -> Option<&Path> {
        self.mix.as_ref().map(|m| m.path.as_path())
    }

    /// The latched failure that stops this source, if any.
    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// Whether each raw source is healthy.
    pub fn status(&self) -> SourceStatus {
        SourceStatus {
            os_healthy: lock(&self.os_health).failure().is_none(),
            mix_healthy: self.mix.as_ref().map(|m| {
                let state = lock(&m.state);
                state.health.failure().is_none() && !state.exhausted
            }),
        }
    }

    /// Fills `out` with fresh random bytes. Blocking (the mix source may be a slow
    /// device): call it from a blocking thread. On any error `out` is zeroised.
    pub fn fill(&self, out: &mut [u8]) -> Result<(), SourceError> {
        if let Some(reason) = self.failed.get() {
            return Err(SourceError::Latched(reason.clone()));
        }
        let result = self.fill_checked(out);
        if let Err(e) = &result {
            out.zeroize();
            if e.latches() && self.failed.set(e.to_string()).is_ok() {
                tracing::error!(
                    reason = %e,
                    "entropy source failed; allocations are refused until a restart"
                );
            }
        }
        result
    }

    fn fill_checked(&self, out: &mut [u8]) -> Result<(), SourceError> {
        self.os.fill(out)?;
        lock(&self.os_health)
            .feed(out)
            .map_err(|failure| SourceError::Unhealthy {
                source_name: "the OS generator".into(),
                failure,
            })?;
        if let Some(mix) = &self.mix {
            mix.xor_into(out)?;
        }
        Ok(())
    }
}

impl Generator {
    fn fill(&self, out: &mut [u8]) -> Result<(), SourceError> {
        match self {
            Self::System(rng) => rng.fill(out).map_err(|_| SourceError::SystemRng),
            #[cfg(test)]
            Self::Stuck(value) => {
                out.fill(*value);
                Ok(())
            }
        }
    }
}

/// A poisoned lock only means another fill panicked; the state is still usable (the health
/// tests and the file position are updated byte by byte).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl MixFile {
    fn new(path: &Path, file: File) -> Self {
        Self {
            path: path.to_owned(),
            state: Mutex::new(MixState {
                file,
                health: HealthTests::new(),
                exhausted: false,
            }),
        }
    }

    fn xor_into(&self, out: &mut [u8]) -> Result<(), SourceError> {
        let err = |cause| SourceError::Mix {
            path: self.path.clone(),
            cause,
        };
        let mut chunk = Zeroizing::new(vec![0u8; MIX_CHUNK.min(out.len()).max(1)]);
        let mut state = lock(&self.state);
        if state.exhausted {
            return Err(SourceError::MixExhausted(self.path.clone()));
        }
        let mut done = 0;
        while done < out.len() {
            let want = chunk.len().min(out.len() - done);
            let got = state.file.read(&mut chunk[..want]).map_err(err)?;
            if got == 0 {
                // Never rewound: repeating mix bytes would correlate ranges.
                state.exhausted = true;
                return Err(SourceError::MixExhausted(self.path.clone()));
            }
            // The raw mix bytes are tested before the XOR hides them.
            state
                .health
                .feed(&chunk[..got])
                .map_err(|failure| SourceError::Unhealthy {
                    source_name: format!("mix source {}", self.path.display()),
                    failure,
                })?;
            for (o, m) in out[done..done + got].iter_mut().zip(&chunk[..got]) {
                *o ^= m;
            }
            done += got;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mix file of `len` good random bytes.
    fn random_file(dir: &Path, len: usize) -> PathBuf {
        let path = dir.join("mix.bin");
        let mut bytes = vec![0u8; len];
        SystemRandom::new().fill(&mut bytes).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn system_source_fills() {
        let source = EntropySource::system();
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        source.fill(&mut a).unwrap();
        source.fill(&mut b).unwrap();
        assert_ne!(a, b);
        assert_eq!(
            source.status(),
            SourceStatus {
                os_healthy: true,
                mix_healthy: None
            }
        );
    }

    #[test]
    fn mix_file_is_read_once_then_exhausted_never_rewound() {
        let dir = tempfile::tempdir().unwrap();
        let path = random_file(dir.path(), 1000);
        let source = EntropySource::with_mix_file(&path, 1000).unwrap();
        assert_eq!(source.mix_path(), Some(path.as_path()));
        // 64 bytes were read by the start-up probe; 936 are left.
        let mut out = vec![0u8; 900];
        source.fill(&mut out).unwrap();
        let err = source.fill(&mut out).unwrap_err();
        assert!(matches!(err, SourceError::MixExhausted(_)), "{err}");
        assert!(out.iter().all(|&b| b == 0), "a failed fill leaves no bytes");
        // Latched: even a fill the file could still serve fails, with the same reason.
        let again = source.fill(&mut [0u8; 1]).unwrap_err();
        assert_eq!(again.to_string(), err.to_string());
        assert_eq!(source.failure(), Some(err.to_string().as_str()));
        assert_eq!(source.status().mix_healthy, Some(false));
        assert!(source.status().os_healthy);
    }

    #[test]
    fn mix_file_smaller_than_the_minimum_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = random_file(dir.path(), 999);
        let err = EntropySource::with_mix_file(&path, 1000).unwrap_err();
        assert!(
            matches!(
                err,
                SourceError::MixTooSmall {
                    len: 999,
                    min: 1000,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn xor_with_mix_bytes() {
        // Check the mixing itself, without the OS part: zeros XOR mix = mix.
        let dir = tempfile::tempdir().unwrap();
        let path = random_file(dir.path(), 100);
        let mix = MixFile::new(&path, File::open(&path).unwrap());
        let mut out = [0u8; 100];
        mix.xor_into(&mut out).unwrap();
        assert_eq!(out.as_slice(), std::fs::read(&path).unwrap());
    }

    #[test]
    fn unreadable_or_empty_mix_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        assert!(matches!(
            EntropySource::with_mix_file(&missing, 1),
            Err(SourceError::Mix { .. })
        ));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            EntropySource::with_mix_file(&empty, 0),
            Err(SourceError::MixTooSmall { len: 0, .. })
        ));
    }

    #[test]
    fn stuck_mix_file_is_refused_at_start() {
        // XOR-ed with the OS output its zeros would look fine: the raw bytes are tested.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zeros.bin");
        std::fs::write(&path, vec![0u8; 1 << 16]).unwrap();
        let err = EntropySource::with_mix_file(&path, 1).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, SourceError::Unhealthy { .. }), "{text}");
        assert!(
            text.contains("mix source") && text.contains("repetition count test"),
            "{text}"
        );
    }

    #[test]
    fn biased_mix_file_fails_the_adaptive_proportion_test() {
        // Every other byte 0x00, the rest random and non-zero: no runs at all, but a window
        // that starts with 0x00 holds 256 of them. The first window (which the start-up
        // probe reads from) starts with a random byte; the later ones with 0x00.
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = vec![0u8; 1 << 16];
        SystemRandom::new().fill(&mut bytes).unwrap();
        for (i, b) in bytes.iter_mut().enumerate() {
            let zero_at = if i < 512 { 1 } else { 0 };
            if i % 2 == zero_at {
                *b = 0;
            } else if *b == 0 {
                *b = 1;
            }
        }
        let path = dir.path().join("biased.bin");
        std::fs::write(&path, &bytes).unwrap();
        let source = EntropySource::with_mix_file(&path, 1).unwrap();
        let mut out = vec![0u8; 4096];
        let err = source.fill(&mut out).unwrap_err();
        assert!(
            err.to_string().contains("adaptive proportion test"),
            "{err}"
        );
        assert_eq!(source.status().mix_healthy, Some(false));
    }

    #[test]
    fn stuck_os_generator_fails_and_latches() {
        let source = EntropySource::new(Generator::Stuck(0x42), None);
        let mut out = [0u8; 64];
        let err = source.fill(&mut out).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("the OS generator failed its health test: repetition count"),
            "{text}"
        );
        assert_eq!(out, [0u8; 64], "the stuck bytes are not handed out");
        assert!(!source.status().os_healthy);
        assert_eq!(source.failure(), Some(text.as_str()));
    }
}
