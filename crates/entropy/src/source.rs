//! Where the random bytes come from.
//!
//! Always the operating system's CSPRNG (`ring::rand::SystemRandom`). Optionally a
//! configured device or file (a hardware RNG such as `/dev/hwrng`) is XOR-ed into the
//! output: the XOR of an unpredictable value with anything independent of it is still
//! unpredictable, so a broken or hostile mix source can only fail to add entropy, never
//! take away what the OS provides. An HTTP quantum-entropy service and RDSEED are not
//! implemented yet.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, Zeroizing};

/// Bytes read from the mix source per read call.
const MIX_CHUNK: usize = 64 * 1024;

/// The entropy source failed; the server refuses to hand out bytes rather than hand out
/// bytes that were not mixed as configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The OS CSPRNG reported a failure.
    #[error("the operating system RNG failed")]
    SystemRng,
    /// The mix source could not be opened or read.
    #[error("mix source {path}: {source}")]
    Mix {
        /// The device or file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The mix source is a file with nothing in it.
    #[error("mix source {0} is empty")]
    MixEmpty(PathBuf),
}

/// The OS CSPRNG, optionally mixed with a device or file.
pub struct EntropySource {
    rng: SystemRandom,
    mix: Option<MixFile>,
}

struct MixFile {
    path: PathBuf,
    /// Blocking reads under a blocking lock: [`EntropySource::fill`] runs on a blocking
    /// thread, never on the async executor.
    file: Mutex<File>,
}

impl std::fmt::Debug for EntropySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntropySource")
            .field("mix", &self.mix.as_ref().map(|m| &m.path))
            .finish()
    }
}

impl EntropySource {
    /// The OS CSPRNG alone.
    pub fn system() -> Self {
        Self {
            rng: SystemRandom::new(),
            mix: None,
        }
    }

    /// The OS CSPRNG mixed with `path`. The source is opened and read once here, so that an
    /// unreadable device is a start-up error rather than a failure on the first request.
    pub fn with_mix_file(path: &Path) -> Result<Self, SourceError> {
        let mix_err = |source| SourceError::Mix {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(mix_err)?;
        let source = Self {
            rng: SystemRandom::new(),
            mix: Some(MixFile {
                path: path.to_owned(),
                file: Mutex::new(file),
            }),
        };
        let mut probe = Zeroizing::new([0u8; 32]);
        source.fill(&mut probe[..])?;
        Ok(source)
    }

    /// The configured mix source, if any.
    pub fn mix_path(&self) -> Option<&Path> {
        self.mix.as_ref().map(|m| m.path.as_path())
    }

    /// Fills `out` with fresh random bytes. Blocking (the mix source may be a slow
    /// device): call it from a blocking thread.
    pub fn fill(&self, out: &mut [u8]) -> Result<(), SourceError> {
        self.rng.fill(out).map_err(|_| SourceError::SystemRng)?;
        if let Some(mix) = &self.mix {
            mix.xor_into(out)?;
        }
        Ok(())
    }
}

impl MixFile {
    fn xor_into(&self, out: &mut [u8]) -> Result<(), SourceError> {
        let err = |source| SourceError::Mix {
            path: self.path.clone(),
            source,
        };
        let mut chunk = Zeroizing::new(vec![0u8; MIX_CHUNK.min(out.len()).max(1)]);
        // A poisoned lock only means another fill panicked; the file handle is still usable.
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let mut done = 0;
        let mut rewound = false;
        while done < out.len() {
            let want = chunk.len().min(out.len() - done);
            let got = file.read(&mut chunk[..want]).map_err(err)?;
            if got == 0 {
                // End of a regular file: start over. Repeating mix bytes adds nothing but
                // cannot remove the OS CSPRNG's entropy either. A second EOF in a row means
                // the file is empty.
                if rewound {
                    return Err(SourceError::MixEmpty(self.path.clone()));
                }
                file.seek(SeekFrom::Start(0)).map_err(err)?;
                rewound = true;
                continue;
            }
            rewound = false;
            for (o, m) in out[done..done + got].iter_mut().zip(&chunk[..got]) {
                *o ^= m;
            }
            done += got;
        }
        chunk.zeroize();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_source_fills() {
        let source = EntropySource::system();
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        source.fill(&mut a).unwrap();
        source.fill(&mut b).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn mix_file_is_read_and_wraps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mix.bin");
        std::fs::write(&path, [0xffu8; 10]).unwrap();
        let source = EntropySource::with_mix_file(&path).unwrap();
        let mut out = vec![0u8; 1000];
        source.fill(&mut out).unwrap();
        assert_eq!(source.mix_path(), Some(path.as_path()));
    }

    #[test]
    fn xor_with_mix_bytes() {
        // Check the mixing itself, without the OS part: zeros XOR mix = mix.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mix.bin");
        std::fs::write(&path, [1u8, 2, 3]).unwrap();
        let mix = MixFile {
            path: path.clone(),
            file: Mutex::new(File::open(&path).unwrap()),
        };
        let mut out = [0u8; 7];
        mix.xor_into(&mut out).unwrap();
        assert_eq!(out, [1, 2, 3, 1, 2, 3, 1]);
    }

    #[test]
    fn unreadable_or_empty_mix_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        assert!(matches!(
            EntropySource::with_mix_file(&missing),
            Err(SourceError::Mix { .. })
        ));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            EntropySource::with_mix_file(&empty),
            Err(SourceError::MixEmpty(_))
        ));
    }
}
