//! The site key-encryption key (KEK) and AES-256-GCM sealing of key material at rest.
//!
//! The KEK lives in a file of 64 hex characters readable only by the KME's user. Every record is
//! sealed under it with a fresh random nonce, and the key ID and master are bound in as
//! associated data, so a record copied to another ID or master no longer opens.

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::StoreError;

/// Length of a KEK in bytes.
pub const KEK_LEN: usize = 32;

/// A 32-byte site key-encryption key. Zeroized on drop; `Debug` hides the bytes.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Kek([u8; KEK_LEN]);

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

impl Kek {
    /// Wraps raw KEK bytes (for example from a KMS or an environment variable).
    pub fn from_bytes(bytes: [u8; KEK_LEN]) -> Self {
        Kek(bytes)
    }

    /// Makes a fresh random KEK from the operating system's generator.
    pub fn generate() -> Result<Self, StoreError> {
        let mut bytes = [0u8; KEK_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| StoreError::Crypto {
                context: "generating a key-encryption key".into(),
            })?;
        let kek = Kek(bytes);
        bytes.zeroize();
        Ok(kek)
    }

    /// Generates a KEK and writes it to `path` as 64 lowercase hex characters and a newline,
    /// with mode 0600. Refuses to replace an existing file unless `force`, because losing the
    /// old KEK makes every stored key unreadable.
    pub fn generate_file(path: &Path, force: bool) -> Result<(), StoreError> {
        let kek = Self::generate()?;
        let mut text = Zeroizing::new(String::with_capacity(KEK_LEN * 2 + 1));
        for b in kek.0.iter() {
            text.push(hex_digit(b >> 4));
            text.push(hex_digit(b & 0x0f));
        }
        text.push('\n');

        let mut opts = std::fs::OpenOptions::new();
        opts.write(true);
        if force {
            opts.create(true).truncate(true);
        } else {
            opts.create_new(true);
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = opts.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                StoreError::KekFileExists {
                    path: path.to_owned(),
                }
            } else {
                StoreError::io(
                    format!("creating key-encryption key file {}", path.display()),
                    e,
                )
            }
        })?;
        // `mode` applies only to newly created files; an overwritten one keeps its old mode.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|e| {
                    StoreError::io(format!("restricting permissions of {}", path.display()), e)
                })?;
        }
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| {
                StoreError::io(
                    format!("writing key-encryption key file {}", path.display()),
                    e,
                )
            })
    }

    /// Reads a KEK written by [`Kek::generate_file`]. Surrounding whitespace is ignored.
    pub fn load(path: &Path) -> Result<Self, StoreError> {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            StoreError::io(
                format!("reading key-encryption key file {}", path.display()),
                e,
            )
        })?);
        let invalid = |reason| StoreError::KekFileInvalid {
            path: path.to_owned(),
            reason,
        };
        let hex = text.trim().as_bytes();
        if hex.len() != KEK_LEN * 2 {
            return Err(invalid("expected exactly 64 hex characters"));
        }
        let mut bytes = Zeroizing::new([0u8; KEK_LEN]);
        for (out, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
            let hi = hex_value(pair[0]).ok_or_else(|| invalid("contains a non-hex character"))?;
            let lo = hex_value(pair[1]).ok_or_else(|| invalid("contains a non-hex character"))?;
            *out = (hi << 4) | lo;
        }
        Ok(Kek(*bytes))
    }

    /// Expands the KEK into a cipher. The expanded AES key schedule is owned by ring and is
    /// not zeroized by it; it lives only as long as the store.
    pub fn cipher(&self) -> Result<Cipher, StoreError> {
        let key = UnboundKey::new(&AES_256_GCM, &self.0).map_err(|_| StoreError::Crypto {
            context: "loading the key-encryption key".into(),
        })?;
        Ok(Cipher {
            key: LessSafeKey::new(key),
            nonces: Mutex::new(Nonces::default()),
        })
    }
}

fn hex_digit(v: u8) -> char {
    char::from(b"0123456789abcdef"[usize::from(v & 0x0f)])
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// AES-256-GCM under the KEK, with a fresh random nonce per seal. `Debug` shows nothing of
/// the key.
pub struct Cipher {
    key: LessSafeKey,
    nonces: Mutex<Nonces>,
}

/// Random bytes for nonces, drawn from the system generator a block at a time: one
/// `getrandom` call per key cost the store's writer thread more than the encryption.
/// Nonces are not secret; they must only never repeat, which 96 random bits ensure.
struct Nonces {
    block: [u8; NONCE_BLOCK],
    used: usize,
    rng: SystemRandom,
}

/// Nonces per draw from the system generator.
const NONCES_PER_BLOCK: usize = 256;
const NONCE_BLOCK: usize = NONCES_PER_BLOCK * NONCE_LEN;

impl Default for Nonces {
    fn default() -> Self {
        Self {
            block: [0; NONCE_BLOCK],
            used: NONCE_BLOCK,
            rng: SystemRandom::new(),
        }
    }
}

impl Nonces {
    /// The next nonce; each block byte is handed out once.
    fn next(&mut self) -> Result<[u8; NONCE_LEN], ring::error::Unspecified> {
        if self.used == NONCE_BLOCK {
            self.rng.fill(&mut self.block)?;
            self.used = 0;
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&self.block[self.used..self.used + NONCE_LEN]);
        self.used += NONCE_LEN;
        Ok(nonce)
    }
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cipher(<redacted>)")
    }
}

const KEK_CHECK_PLAINTEXT: &[u8] = b"dqkd-store key-encryption key check";
const KEK_CHECK_AAD: &[u8] = b"dqkd-store/kek-check/v1";

/// Length of the GCM nonce stored with each record.
pub const NONCE_BYTES: usize = NONCE_LEN;

impl Cipher {
    /// Encrypts `plaintext` bound to `aad`; returns the nonce and ciphertext‖tag.
    pub fn seal(
        &self,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<([u8; NONCE_BYTES], Vec<u8>), StoreError> {
        let nonce = self
            .nonces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next()
            .map_err(|_| StoreError::Crypto {
                context: "drawing a nonce".into(),
            })?;
        let mut buf = Vec::with_capacity(plaintext.len() + AES_256_GCM.tag_len());
        buf.extend_from_slice(plaintext);
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| StoreError::Crypto {
                context: "sealing key material".into(),
            })?;
        Ok((nonce, buf))
    }

    /// A fresh KEK check value (nonce ‖ sealed fixed text) for a store to keep next to its
    /// keys, so that opening it later with another KEK is refused up front.
    pub fn kek_check_value(&self) -> Result<Vec<u8>, StoreError> {
        let (nonce, sealed) = self.seal(KEK_CHECK_PLAINTEXT, KEK_CHECK_AAD)?;
        let mut value = nonce.to_vec();
        value.extend_from_slice(&sealed);
        Ok(value)
    }

    /// Whether `value` (from [`Cipher::kek_check_value`]) was made with this KEK.
    pub fn verify_kek_check(&self, value: &[u8]) -> bool {
        value.len() > NONCE_BYTES && {
            let (nonce, sealed) = value.split_at(NONCE_BYTES);
            let mut n = [0u8; NONCE_BYTES];
            n.copy_from_slice(nonce);
            self.open(n, sealed, KEK_CHECK_AAD)
                .is_some_and(|p| p.as_slice() == KEK_CHECK_PLAINTEXT)
        }
    }

    /// Decrypts and authenticates; `None` when the tag does not verify (wrong KEK, moved or
    /// tampered record).
    pub fn open(
        &self,
        nonce: [u8; NONCE_BYTES],
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Option<Zeroizing<Vec<u8>>> {
        let mut buf = Zeroizing::new(ciphertext.to_vec());
        let len = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .ok()?
            .len();
        buf.truncate(len);
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek.hex");
        Kek::generate_file(&path, false).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 65);
        assert!(text.ends_with('\n'));
        assert!(text[..64]
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let a = Kek::load(&path).unwrap();
        let err = Kek::generate_file(&path, false).unwrap_err();
        assert!(matches!(err, StoreError::KekFileExists { .. }));
        assert!(err.to_string().contains("kek.hex"));
        Kek::generate_file(&path, true).unwrap();
        let b = Kek::load(&path).unwrap();
        assert_ne!(a.0, b.0);
        assert_eq!(format!("{a:?}"), "Kek(<redacted>)");
    }

    #[test]
    fn load_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = Kek::load(&missing).unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }));
        assert!(err.to_string().contains("missing"));

        let short = dir.path().join("short");
        std::fs::write(&short, "abcd\n").unwrap();
        assert!(matches!(
            Kek::load(&short).unwrap_err(),
            StoreError::KekFileInvalid { .. }
        ));

        let nonhex = dir.path().join("nonhex");
        std::fs::write(&nonhex, format!("{}\n", "g".repeat(64))).unwrap();
        let err = Kek::load(&nonhex).unwrap_err();
        assert!(err.to_string().contains("non-hex"));

        let upper = dir.path().join("upper");
        std::fs::write(&upper, "AB".repeat(32)).unwrap();
        assert_eq!(Kek::load(&upper).unwrap().0, [0xab; 32]);
    }

    /// Nonces come from blocks of system randomness, never the same bytes twice, across
    /// block boundaries too.
    #[test]
    fn nonces_never_repeat() {
        let c = Kek::from_bytes([7; 32]).cipher().unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 * NONCES_PER_BLOCK + 5 {
            let (nonce, _) = c.seal(b"k", b"a").unwrap();
            assert!(seen.insert(nonce), "nonce repeated");
        }
    }

    #[test]
    fn seal_open_binds_aad() {
        let c = Kek::from_bytes([7; 32]).cipher().unwrap();
        let (n, ct) = c.seal(b"secret", b"aad-1").unwrap();
        assert_eq!(c.open(n, &ct, b"aad-1").unwrap().as_slice(), b"secret");
        assert!(c.open(n, &ct, b"aad-2").is_none());
        let other = Kek::from_bytes([8; 32]).cipher().unwrap();
        assert!(other.open(n, &ct, b"aad-1").is_none());
    }
}
