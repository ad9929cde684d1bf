//! The on-disk record of one key: a small versioned binary encoding.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! u8   version: 2 (1 for records sealed under the KEK itself, still read)
//! u64  expires_at (unix seconds)
//! u16  master length, then the master SAE ID (UTF-8)
//! u16  slave count, then per slave: u8 flags (bit 0 = already delivered),
//!      u16 length, the slave SAE ID (UTF-8)
//! [16] epoch ID of the epoch key that sealed it (version 2 only; see `kek`)
//! [12] AES-256-GCM nonce
//! u32  sealed length, then ciphertext ‖ 16-byte tag
//! ```
//!
//! The associated data of the seal is `key ID (16 bytes) ‖ master ‖ version`, so a record
//! moved to another key ID, or edited to name another master, fails to open. Slaves and expiry
//! are not bound in: they change as keys are delivered, and an attacker who can edit the file
//! can delete records anyway. The epoch ID needs no binding: another one derives another key.

use uuid::Uuid;

use crate::error::TOO_LONG;
use crate::kek::{Cipher, Sealing};
use crate::meta::{KeyMeta, SlaveEntry};
use crate::{KeyMaterial, NewKey, RecordError, StoreError};

/// The record format new records are written in.
pub const VERSION: u8 = 2;

const FLAG_TAKEN: u8 = 0x01;

/// A decoded record: metadata in clear, key bytes still sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub(crate) meta: KeyMeta,
    /// How the key bytes were sealed; it also gives the record's format.
    pub(crate) sealing: Sealing,
    pub(crate) sealed: Vec<u8>,
}

/// The associated data binding a sealed key to its ID and master, in record format `format`
/// ([`VERSION`] for a new seal, [`Sealing::format`] to open).
pub fn aad(id: Uuid, master: &str, format: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + master.len() + 1);
    v.extend_from_slice(id.as_bytes());
    v.extend_from_slice(master.as_bytes());
    v.push(format);
    v
}

impl Record {
    /// Seals a new key under `cipher` (AAD = [`aad`] of its ID and master) with every distinct
    /// slave entitled and none served yet. The record is not yet encoded, so a name too long
    /// for the format surfaces only at [`Record::encode`].
    pub fn seal(cipher: &Cipher, key: &NewKey) -> Result<Self, StoreError> {
        let (sealing, sealed) =
            cipher.seal(key.material.as_bytes(), &aad(key.id, &key.master, VERSION))?;
        Ok(Record {
            meta: KeyMeta::new(&key.master, &key.slaves, key.expires_at),
            sealing,
            sealed,
        })
    }

    /// Opens the key bytes of the record stored under `id`; fails if the record does not
    /// authenticate (wrong KEK, or a record moved to another ID or master).
    pub fn open(&self, cipher: &Cipher, id: Uuid) -> Result<KeyMaterial, StoreError> {
        cipher
            .open(&self.sealing, &self.sealed, &self.aad(id))
            .map(|bytes| KeyMaterial::new(bytes.to_vec()))
            .ok_or_else(|| StoreError::Crypto {
                context: format!("opening key {id}: record does not authenticate"),
            })
    }

    /// The associated data this record's key bytes were sealed with, under key ID `id`.
    pub fn aad(&self, id: Uuid) -> Vec<u8> {
        aad(id, &self.meta.master, self.sealing.format())
    }

    /// The metadata (master, expiry, slaves and who was served).
    pub fn meta(&self) -> &KeyMeta {
        &self.meta
    }

    /// The metadata, for [`KeyMeta::mark_taken`].
    pub fn meta_mut(&mut self) -> &mut KeyMeta {
        &mut self.meta
    }

    /// Encodes the record; `Err` if a field exceeds its length prefix.
    pub fn encode(&self) -> Result<Vec<u8>, &'static str> {
        let m = &self.meta;
        let mut out = Vec::with_capacity(
            1 + 8 + 2 + m.master.len() + 2 + m.slaves.len() * 16 + 16 + 12 + 4 + self.sealed.len(),
        );
        out.push(self.sealing.format());
        out.extend_from_slice(&m.expires_at.to_be_bytes());
        put_str(&mut out, &m.master)?;
        let count = u16::try_from(m.slaves.len()).map_err(|_| TOO_LONG)?;
        out.extend_from_slice(&count.to_be_bytes());
        for s in &m.slaves {
            out.push(if s.taken { FLAG_TAKEN } else { 0 });
            put_str(&mut out, &s.sae)?;
        }
        match &self.sealing {
            Sealing::Kek { nonce } => out.extend_from_slice(nonce),
            Sealing::Epoch { epoch, nonce } => {
                out.extend_from_slice(epoch);
                out.extend_from_slice(nonce);
            }
        }
        let len = u32::try_from(self.sealed.len()).map_err(|_| TOO_LONG)?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.sealed);
        Ok(out)
    }

    /// Reads only the expiry and the master (a link name for a ready key) of an encoded
    /// record, without copying, for scans over many records.
    pub fn head(bytes: &[u8]) -> Result<(u64, &str), RecordError> {
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if !matches!(version, 1 | 2) {
            return Err(RecordError::UnknownVersion(version));
        }
        let expires_at = u64::from_be_bytes(r.array()?);
        let len = usize::from(r.u16()?);
        let master = std::str::from_utf8(r.take(len)?).map_err(|_| RecordError::BadName)?;
        Ok((expires_at, master))
    }

    /// Decodes a record, rejecting unknown versions, short input and trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if !matches!(version, 1 | 2) {
            return Err(RecordError::UnknownVersion(version));
        }
        let expires_at = u64::from_be_bytes(r.array()?);
        let master = r.string()?;
        let count = r.u16()?;
        let mut slaves = Vec::with_capacity(usize::from(count).min(r.0.len() / 3));
        for _ in 0..count {
            let flags = r.u8()?;
            if flags & !FLAG_TAKEN != 0 {
                return Err(RecordError::BadFlags(flags));
            }
            slaves.push(SlaveEntry {
                sae: r.string()?,
                taken: flags & FLAG_TAKEN != 0,
            });
        }
        let sealing = match version {
            1 => Sealing::Kek { nonce: r.array()? },
            _ => Sealing::Epoch {
                epoch: r.array()?,
                nonce: r.array()?,
            },
        };
        let len = u32::from_be_bytes(r.array()?);
        let sealed = r.take(usize::try_from(len).map_err(|_| RecordError::Truncated)?)?;
        if !r.0.is_empty() {
            return Err(RecordError::TrailingBytes(r.0.len()));
        }
        Ok(Record {
            meta: KeyMeta {
                master,
                expires_at,
                slaves,
            },
            sealing,
            sealed: sealed.to_vec(),
        })
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) -> Result<(), &'static str> {
    let len = u16::try_from(s.len()).map_err(|_| TOO_LONG)?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// A cursor over the record bytes; every read checks the remaining length.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.0.len() < n {
            return Err(RecordError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RecordError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, RecordError> {
        let len = usize::from(self.u16()?);
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| RecordError::BadName)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            meta: KeyMeta {
                master: "alice".into(),
                expires_at: 1_700_000_000,
                slaves: vec![
                    SlaveEntry {
                        sae: "bob".into(),
                        taken: true,
                    },
                    SlaveEntry {
                        sae: "carol".into(),
                        taken: false,
                    },
                ],
            },
            sealing: Sealing::Epoch {
                epoch: [8; 16],
                nonce: [9; 12],
            },
            sealed: vec![1, 2, 3, 4, 5],
        }
    }

    #[test]
    fn round_trip() {
        let r = sample();
        let bytes = r.encode().unwrap();
        assert_eq!(bytes[0], 2);
        assert_eq!(Record::decode(&bytes).unwrap(), r);
        let first_format = Record {
            sealing: Sealing::Kek { nonce: [9; 12] },
            ..sample()
        };
        let bytes = first_format.encode().unwrap();
        assert_eq!(bytes[0], 1);
        assert_eq!(bytes.len() + 16, r.encode().unwrap().len());
        assert_eq!(Record::decode(&bytes).unwrap(), first_format);
        assert_eq!(
            Record::head(&bytes).unwrap(),
            Record::head(&r.encode().unwrap()).unwrap()
        );
    }

    /// A record of the first format, sealed under the KEK itself, opens; so does a new one;
    /// either moved to another key ID or relabelled as the other format does not.
    #[test]
    fn both_formats_open_and_stay_bound() {
        let cipher = crate::Kek::from_bytes([5; 32]).cipher().unwrap();
        let id = Uuid::from_u128(42);
        let (sealing, sealed) = cipher
            .seal_format_1(&[7; 32], &aad(id, "alice", 1))
            .unwrap();
        let old = Record {
            sealing,
            sealed,
            ..sample()
        };
        let new = Record::seal(
            &cipher,
            &NewKey {
                id,
                master: "alice".into(),
                slaves: vec!["bob".into()],
                material: KeyMaterial::new(vec![7; 32]),
                expires_at: 1,
            },
        )
        .unwrap();
        for r in [&old, &new] {
            let r = Record::decode(&r.encode().unwrap()).unwrap();
            assert_eq!(r.open(&cipher, id).unwrap().as_bytes(), &[7; 32]);
            assert!(r.open(&cipher, Uuid::from_u128(43)).is_err());
        }
        let Sealing::Epoch { nonce, .. } = new.sealing else {
            panic!("new records use epoch keys")
        };
        let relabelled = Record {
            sealing: Sealing::Kek { nonce },
            ..new.clone()
        };
        assert!(relabelled.open(&cipher, id).is_err());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().encode().unwrap();
        for n in 0..bytes.len() {
            assert_eq!(
                Record::decode(&bytes[..n]),
                Err(RecordError::Truncated),
                "n={n}"
            );
        }
    }

    #[test]
    fn malformed_inputs_are_typed_errors() {
        let mut bytes = sample().encode().unwrap();
        bytes.push(0);
        assert_eq!(Record::decode(&bytes), Err(RecordError::TrailingBytes(1)));

        let mut bytes = sample().encode().unwrap();
        bytes[0] = 3;
        assert_eq!(Record::decode(&bytes), Err(RecordError::UnknownVersion(3)));

        let mut bytes = sample().encode().unwrap();
        // first slave's flags byte: version(1) + expiry(8) + len(2) + "alice"(5) + count(2)
        bytes[18] = 0x80;
        assert_eq!(Record::decode(&bytes), Err(RecordError::BadFlags(0x80)));

        let mut bytes = sample().encode().unwrap();
        bytes[11] = 0xff; // first byte of "alice"
        assert_eq!(Record::decode(&bytes), Err(RecordError::BadName));
    }

    #[test]
    fn too_long_names_are_refused() {
        let mut r = sample();
        r.meta.master = "x".repeat(70_000);
        assert!(r.encode().is_err());
    }
}
