//! The site key-encryption key (KEK) and AES-256-GCM sealing of key material at rest.
//!
//! The KEK lives in a file of 64 hex characters readable only by the KME's user, or in a
//! device that never hands it out (a PKCS#11 token, [`HeldKek`]). Every record is
//! sealed with a fresh random nonce, and the key ID and master are bound in as associated data,
//! so a record copied to another ID or master no longer opens.
//!
//! Records are sealed under *epoch keys*, not under the KEK itself: an epoch key is derived
//! from the KEK with HKDF-SHA256 for a random 128-bit epoch ID, stored with each record, and
//! a new epoch starts every [`SEALS_PER_EPOCH`] seals and at every start. Why: with random
//! 96-bit nonces, NIST SP 800-38D allows at most 2^32 seals under one AES-GCM key, and a busy
//! site seals that many keys in hours. Under epoch keys the bound holds per epoch, so one KEK
//! serves any number of keys. Records of the first format, sealed under the KEK itself, still
//! open.
//!
//! A held KEK computes epoch keys inside its device, as HMAC-SHA256 of the epoch ID: once per
//! epoch (and once per older epoch met when opening), so sealing and opening stay in memory at
//! full speed while the KEK itself never leaves the device.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::StoreError;

/// Length of a KEK in bytes.
pub const KEK_LEN: usize = 32;

/// A site key-encryption key: 32 bytes in memory (zeroized on drop) or a handle to one held
/// in a device. `Debug` hides the bytes.
#[derive(Clone)]
pub struct Kek(Root);

#[derive(Clone)]
enum Root {
    Bytes(KekBytes),
    Held(Arc<dyn HeldKek>),
}

#[derive(Clone, Zeroize, ZeroizeOnDrop)]
struct KekBytes([u8; KEK_LEN]);

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Root::Bytes(_) => f.write_str("Kek(<redacted>)"),
            Root::Held(held) => write!(f, "Kek({})", held.describe()),
        }
    }
}

/// A KEK kept in a device that computes with it but never reveals it (a PKCS#11 token).
/// The store asks it only for HMAC-SHA256 values, once per epoch, and expands those into
/// AES-256-GCM keys in memory.
pub trait HeldKek: Send + Sync {
    /// HMAC-SHA256 of `input` under the KEK, computed inside the device.
    fn hmac_sha256(&self, input: &[u8]) -> Result<Zeroizing<[u8; 32]>, StoreError>;
    /// Where the KEK is held (token and object names; nothing secret), for errors and logs.
    fn describe(&self) -> String;
    /// `Ok` while the device still holds and can use the KEK; otherwise why not.
    fn check(&self) -> Result<(), StoreError>;
}

impl Kek {
    /// Wraps raw KEK bytes (for example from a KMS or an environment variable).
    pub fn from_bytes(bytes: [u8; KEK_LEN]) -> Self {
        Kek(Root::Bytes(KekBytes(bytes)))
    }

    /// A KEK held in a device; epoch keys are computed there (see [`HeldKek`]).
    pub fn held(device: Arc<dyn HeldKek>) -> Self {
        Kek(Root::Held(device))
    }

    /// Whether the KEK is held in a device (and so may go away while running).
    pub fn is_held(&self) -> bool {
        matches!(self.0, Root::Held(_))
    }

    /// `Ok` while the KEK can be used: always for bytes, and while the device answers for a
    /// held KEK. A KME polls it to stop serving keys (and say why) once a token is gone.
    pub fn check(&self) -> Result<(), StoreError> {
        match &self.0 {
            Root::Bytes(_) => Ok(()),
            Root::Held(held) => held.check(),
        }
    }

    /// Makes a fresh random KEK from the operating system's generator.
    pub fn generate() -> Result<Self, StoreError> {
        let mut bytes = [0u8; KEK_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| StoreError::Crypto {
                context: "generating a key-encryption key".into(),
            })?;
        let kek = Kek::from_bytes(bytes);
        bytes.zeroize();
        Ok(kek)
    }

    /// Generates a KEK and writes it to `path` as 64 lowercase hex characters and a newline,
    /// with mode 0600. Refuses to replace an existing file unless `force`, because losing the
    /// old KEK makes every stored key unreadable.
    pub fn generate_file(path: &Path, force: bool) -> Result<(), StoreError> {
        let mut bytes = Zeroizing::new([0u8; KEK_LEN]);
        SystemRandom::new()
            .fill(bytes.as_mut())
            .map_err(|_| crypto("generating a key-encryption key"))?;
        let mut text = Zeroizing::new(String::with_capacity(KEK_LEN * 2 + 1));
        for b in bytes.iter() {
            text.push(hex_digit(b >> 4));
            text.push(hex_digit(b & 0x0f));
        }
        text.push('\n');

        // The folder is made if missing, private to the user like the store's own.
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.exists() {
                let mut builder = std::fs::DirBuilder::new();
                builder.recursive(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::DirBuilderExt;
                    builder.mode(0o700);
                }
                builder.create(parent).map_err(|e| {
                    StoreError::io(format!("creating the folder {}", parent.display()), e)
                })?;
            }
        }
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
    ///
    /// Refuses a file that other users may read or change (any group or other permission
    /// bit): [`StoreError::KekFileExposed`], which names the fix.
    pub fn load(path: &Path) -> Result<Self, StoreError> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(|e| {
                    StoreError::io(
                        format!("reading key-encryption key file {}", path.display()),
                        e,
                    )
                })?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(StoreError::KekFileExposed {
                    path: path.to_owned(),
                    mode: mode & 0o7777,
                });
            }
        }
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
        Ok(Kek::from_bytes(*bytes))
    }

    /// Expands the KEK into a cipher. The expanded AES key schedules are owned by ring and
    /// are not zeroized by it; they live only as long as the store.
    pub fn cipher(&self) -> Result<Cipher, StoreError> {
        Cipher::new(self, SEALS_PER_EPOCH)
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

/// Seals under one epoch key before the next epoch starts: 2^28, so the chance that two of
/// its random nonces collide stays below 2^-41, far inside NIST's 2^-32.
pub const SEALS_PER_EPOCH: u64 = 1 << 28;

/// Length of an epoch ID.
pub const EPOCH_BYTES: usize = 16;

/// Epoch keys kept expanded for opening; past this many the cache starts over (an epoch key
/// is derived again on its next use). Epochs are few: one per start and per 2^28 seals.
const KNOWN_EPOCHS_MAX: usize = 4096;

/// How a record's key bytes were sealed, as stored with the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealing {
    /// Record format 1: under the KEK itself.
    Kek {
        /// The GCM nonce.
        nonce: [u8; NONCE_BYTES],
    },
    /// Record format 2: under the epoch key of `epoch`.
    Epoch {
        /// The epoch ID the key is derived for.
        epoch: [u8; EPOCH_BYTES],
        /// The GCM nonce.
        nonce: [u8; NONCE_BYTES],
    },
}

impl Sealing {
    /// The record format this sealing belongs to (and that the associated data names).
    pub fn format(&self) -> u8 {
        match self {
            Sealing::Kek { .. } => 1,
            Sealing::Epoch { .. } => 2,
        }
    }
}

/// AES-256-GCM under epoch keys derived from the KEK (and under the KEK itself for the KEK
/// check and records of the first format), with a fresh random nonce per seal. `Debug` shows
/// nothing of the keys.
pub struct Cipher {
    /// Seals the KEK check value (and opened records of the first format): the KEK itself,
    /// or for a held KEK a check key the device computed.
    kek: LessSafeKey,
    /// Where epoch keys come from.
    epoch_root: EpochRoot,
    seals_per_epoch: u64,
    epochs: Mutex<Epochs>,
}

enum EpochRoot {
    /// HKDF-SHA256 extract of the KEK bytes: epoch keys are expanded from it.
    Hkdf(hkdf::Prk),
    /// A device that computes each epoch key as an HMAC of the epoch ID.
    Held(Arc<dyn HeldKek>),
}

/// The epoch being sealed under, the nonce supply, and the epoch keys known.
struct Epochs {
    current: Option<Current>,
    nonces: Nonces,
    known: HashMap<[u8; EPOCH_BYTES], Arc<LessSafeKey>>,
}

impl Epochs {
    /// Caches an epoch key for opening, starting the cache over when it is full.
    fn remember(&mut self, epoch: [u8; EPOCH_BYTES], key: Arc<LessSafeKey>) {
        if self.known.len() >= KNOWN_EPOCHS_MAX {
            self.known.clear();
        }
        self.known.insert(epoch, key);
    }
}

struct Current {
    epoch: [u8; EPOCH_BYTES],
    key: Arc<LessSafeKey>,
    /// Seals left before the next epoch.
    left: u64,
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
/// HKDF salt and info label of epoch keys.
const EPOCH_SALT: &[u8] = b"dqkd-store/epoch-keys";
const EPOCH_INFO: &[u8] = b"dqkd-store/epoch-key/v2";
/// HMAC inputs (before the epoch ID) of a held KEK's epoch keys and of its check key.
const HELD_EPOCH_LABEL: &[u8] = b"dqkd-store/held-kek/epoch-key/v1";
const HELD_CHECK_LABEL: &[u8] = b"dqkd-store/held-kek/check-key/v1";

/// Length of the GCM nonce stored with each record.
pub const NONCE_BYTES: usize = NONCE_LEN;

fn crypto(context: &str) -> StoreError {
    StoreError::Crypto {
        context: context.into(),
    }
}

impl Cipher {
    fn new(kek: &Kek, seals_per_epoch: u64) -> Result<Self, StoreError> {
        let (check, epoch_root) = match &kek.0 {
            Root::Bytes(bytes) => (
                UnboundKey::new(&AES_256_GCM, &bytes.0),
                EpochRoot::Hkdf(hkdf::Salt::new(hkdf::HKDF_SHA256, EPOCH_SALT).extract(&bytes.0)),
            ),
            Root::Held(held) => (
                UnboundKey::new(&AES_256_GCM, held.hmac_sha256(HELD_CHECK_LABEL)?.as_slice()),
                EpochRoot::Held(Arc::clone(held)),
            ),
        };
        let check = check.map_err(|_| crypto("loading the key-encryption key"))?;
        Ok(Cipher {
            kek: LessSafeKey::new(check),
            epoch_root,
            seals_per_epoch: seals_per_epoch.max(1),
            epochs: Mutex::new(Epochs {
                current: None,
                nonces: Nonces::default(),
                known: HashMap::new(),
            }),
        })
    }

    /// A cipher that starts a new epoch every `seals` seals, to test epoch changes.
    #[cfg(test)]
    pub(crate) fn with_seals_per_epoch(kek: &Kek, seals: u64) -> Result<Self, StoreError> {
        Self::new(kek, seals)
    }

    fn epochs(&self) -> std::sync::MutexGuard<'_, Epochs> {
        self.epochs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The epoch key of `epoch`.
    fn derive(&self, epoch: &[u8; EPOCH_BYTES]) -> Result<LessSafeKey, StoreError> {
        match &self.epoch_root {
            EpochRoot::Hkdf(prk) => {
                let info = [EPOCH_INFO, epoch.as_slice()];
                let okm = prk
                    .expand(&info, &AES_256_GCM)
                    .map_err(|_| crypto("deriving an epoch key"))?;
                Ok(LessSafeKey::new(UnboundKey::from(okm)))
            }
            EpochRoot::Held(held) => {
                let mut input = [0u8; HELD_EPOCH_LABEL.len() + EPOCH_BYTES];
                input[..HELD_EPOCH_LABEL.len()].copy_from_slice(HELD_EPOCH_LABEL);
                input[HELD_EPOCH_LABEL.len()..].copy_from_slice(epoch);
                let key = held.hmac_sha256(&input)?;
                UnboundKey::new(&AES_256_GCM, key.as_slice())
                    .map(LessSafeKey::new)
                    .map_err(|_| crypto("loading an epoch key"))
            }
        }
    }

    /// The epoch key of `epoch`, from the cache or derived (and cached).
    fn epoch_key(&self, epoch: &[u8; EPOCH_BYTES]) -> Result<Arc<LessSafeKey>, StoreError> {
        if let Some(key) = self.epochs().known.get(epoch) {
            return Ok(Arc::clone(key));
        }
        let key = Arc::new(self.derive(epoch)?);
        self.epochs().remember(*epoch, Arc::clone(&key));
        Ok(key)
    }

    /// Encrypts `plaintext` bound to `aad` under the current epoch key (starting a new epoch
    /// when it is used up); returns how it was sealed and ciphertext‖tag. `aad` must name
    /// format 2 (see [`Sealing::format`]).
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<(Sealing, Vec<u8>), StoreError> {
        let (epoch, key, nonce) = {
            let mut epochs = self.epochs();
            let current = match epochs.current.take() {
                Some(current) if current.left > 0 => current,
                _ => {
                    let mut epoch = [0u8; EPOCH_BYTES];
                    epochs
                        .nonces
                        .rng
                        .fill(&mut epoch)
                        .map_err(|_| crypto("drawing an epoch ID"))?;
                    let key = Arc::new(self.derive(&epoch)?);
                    epochs.remember(epoch, Arc::clone(&key));
                    Current {
                        epoch,
                        key,
                        left: self.seals_per_epoch,
                    }
                }
            };
            let nonce = epochs
                .nonces
                .next()
                .map_err(|_| crypto("drawing a nonce"))?;
            let sealed_under = (current.epoch, Arc::clone(&current.key), nonce);
            epochs.current = Some(Current {
                left: current.left - 1,
                ..current
            });
            sealed_under
        };
        let sealed = seal_with(&key, nonce, plaintext, aad)?;
        Ok((Sealing::Epoch { epoch, nonce }, sealed))
    }

    /// A fresh KEK check value (nonce ‖ sealed fixed text) for a store to keep next to its
    /// keys, so that opening it later with another KEK is refused up front.
    pub fn kek_check_value(&self) -> Result<Vec<u8>, StoreError> {
        let (nonce, sealed) = self.seal_under_kek(KEK_CHECK_PLAINTEXT, KEK_CHECK_AAD)?;
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
            open_with(&self.kek, n, sealed, KEK_CHECK_AAD)
                .is_some_and(|p| p.as_slice() == KEK_CHECK_PLAINTEXT)
        }
    }

    /// Decrypts and authenticates; `None` when the tag does not verify (wrong KEK, moved or
    /// tampered record, or an epoch ID that was altered).
    pub fn open(
        &self,
        sealing: &Sealing,
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Option<Zeroizing<Vec<u8>>> {
        match sealing {
            Sealing::Kek { nonce } => open_with(&self.kek, *nonce, ciphertext, aad),
            Sealing::Epoch { epoch, nonce } => {
                open_with(&*self.epoch_key(epoch).ok()?, *nonce, ciphertext, aad)
            }
        }
    }

    /// Seals under the KEK itself, as records of the first format were.
    #[cfg(test)]
    pub(crate) fn seal_format_1(
        &self,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<(Sealing, Vec<u8>), StoreError> {
        let (nonce, sealed) = self.seal_under_kek(plaintext, aad)?;
        Ok((Sealing::Kek { nonce }, sealed))
    }

    /// Seals under the KEK itself, with a fresh nonce.
    fn seal_under_kek(
        &self,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<([u8; NONCE_BYTES], Vec<u8>), StoreError> {
        let nonce = self
            .epochs()
            .nonces
            .next()
            .map_err(|_| crypto("drawing a nonce"))?;
        Ok((nonce, seal_with(&self.kek, nonce, plaintext, aad)?))
    }
}

fn seal_with(
    key: &LessSafeKey,
    nonce: [u8; NONCE_BYTES],
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let mut buf = Vec::with_capacity(plaintext.len() + AES_256_GCM.tag_len());
    buf.extend_from_slice(plaintext);
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut buf,
    )
    .map_err(|_| crypto("sealing key material"))?;
    Ok(buf)
}

fn open_with(
    key: &LessSafeKey,
    nonce: [u8; NONCE_BYTES],
    ciphertext: &[u8],
    aad: &[u8],
) -> Option<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(ciphertext.to_vec());
    let len = key
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

#[cfg(test)]
mod tests;
