//! The versioned binary metadata site A sends site B so B can regenerate a batch of keys.
//!
//! One batch shares one allocation (a byte range) per entropy server; each key names the
//! offset of its `L`-byte block, which sits at the same offset inside every range.
//!
//! # Wire format, version 2 (all integers big-endian)
//!
//! ```text
//! u8   version (= 2)
//! u8   n                       number of servers / ranges, 2..=255
//! u8   c                       leak tolerance, c < n and 2n − c <= 256
//! u64  expires_at_unix         seconds; after this the ranges are shredded
//! n ×  range:
//!        u8   server_id length (1..=64)
//!        ...  server_id (UTF-8)
//!        [16] pool_id
//!        u64  offset           of the range inside the pool
//!        u64  len              of the range
//! u32  key count (1..=MAX_KEYS)
//! count × key (44 bytes):
//!        [16] key_id
//!        u32  size_bits        multiple of 8, 8..=MAX_KEY_BYTES*8
//!        u64  block_offset     of this key's block inside every range
//!        [16] confirm          see crate::confirm
//! ```
//!
//! A key of `m = size_bits / 8` bytes uses a block of `L = ceil((m + 32) / (n − c))` bytes
//! at `block_offset` in every range: the extraction output is `key ‖ k_mac ‖ mask`, the last
//! 32 bytes keying the confirmation tag ([`crate::confirm`]).
//!
//! # Versions
//!
//! Version 1 had the same layout with `L = ceil(m / (n − c))` and a tag that was an HMAC keyed
//! with the key, an offline oracle for short keys. It is retired: [`decode`] recognises it
//! and fails with [`MetadataError::RetiredVersion`], so a site still running an older dqkd
//! gets a clear refusal, and no key is ever accepted under the old tag. Metadata lives only
//! in flight (the receiving site stores the regenerated keys, not the metadata), so nothing
//! stored needs the old version.
//!
//! Nothing may follow the last key. Decoding is "parse, don't validate": [`decode`] only
//! returns a [`BatchMetadata`] that passes every check in [`BatchMetadata::validate`], and
//! [`BatchMetadata::encode`] refuses to write one that does not.
//!
//! # Limits against hostile input
//!
//! * at most [`MAX_KEYS`] keys per batch, and the decoder checks that the input actually
//!   holds `count × 44` more bytes before reserving memory, so allocation is bounded by the
//!   input length (never more than about 1.1× it, plus the `n` ranges);
//! * keys are at most [`MAX_KEY_BYTES`] (10 MiB), server IDs at most [`MAX_SERVER_ID_LEN`]
//!   bytes, and `n ≤ 255` by construction (one byte).

use std::collections::HashSet;

use crate::extract::block_len;
use crate::{cauchy, confirm};

/// The only version this crate writes and reads.
pub const VERSION: u8 = 2;
/// The retired version 1 (HMAC tag keyed with the key); refused with a clear error.
pub const RETIRED_VERSION: u8 = 1;
/// Fewest servers per key: with one, the key would be that server's block.
pub const MIN_SERVERS: u8 = 2;
/// Longest accepted server ID in bytes.
pub const MAX_SERVER_ID_LEN: usize = 64;
/// Most keys in one batch (2^20). A batch of 256-bit keys this size needs 16 MiB per
/// server for n = 3; larger batches should be split.
pub const MAX_KEYS: usize = 1 << 20;
/// Largest key in bytes (10 MiB, the upper end the design supports).
pub const MAX_KEY_BYTES: usize = 10 * 1024 * 1024;
/// Encoded size of one key entry.
const KEY_ENTRY_LEN: usize = 16 + 4 + 8 + 16;

/// Why a metadata message was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataError {
    /// The input ended in the middle of a field.
    #[error("metadata truncated")]
    Truncated,
    /// The version byte is not one this crate understands.
    #[error("unsupported metadata version {0}")]
    UnsupportedVersion(u8),
    /// The version byte names a retired version (the sender runs an older dqkd).
    #[error(
        "metadata version {0} is retired (its confirmation tag was a function of the key); \
         the sending site runs an older dqkd and must be upgraded"
    )]
    RetiredVersion(u8),
    /// `n` and `c` are not usable (see [`crate::cauchy`]), or `n` < [`MIN_SERVERS`].
    #[error("bad extraction parameters n={n}, c={c}")]
    BadParameters {
        /// Number of servers.
        n: u8,
        /// Leak tolerance.
        c: u8,
    },
    /// The number of ranges differs from `n` (only possible when encoding).
    #[error("expected {expected} ranges, got {got}")]
    RangeCount {
        /// `n`.
        expected: usize,
        /// Ranges given.
        got: usize,
    },
    /// Bytes remain after the last key.
    #[error("trailing bytes after metadata")]
    TrailingBytes,
    /// A server ID is not valid UTF-8.
    #[error("server id is not UTF-8")]
    InvalidUtf8,
    /// A server ID is empty or longer than [`MAX_SERVER_ID_LEN`].
    #[error("server id length {0} out of range")]
    ServerIdLength(usize),
    /// Two ranges name the same server; the blocks would not be independent.
    #[error("range {index} repeats a server id")]
    DuplicateServer {
        /// Index of the second occurrence.
        index: usize,
    },
    /// A range's `offset + len` overflows `u64`.
    #[error("range {index} overflows")]
    RangeOverflow {
        /// Index of the range.
        index: usize,
    },
    /// The batch has no keys or more than [`MAX_KEYS`].
    #[error("key count {0} out of range")]
    KeyCount(usize),
    /// A key size is zero, not a multiple of 8 bits, or above [`MAX_KEY_BYTES`].
    #[error("key {index} has bad size {size_bits} bits")]
    BadKeySize {
        /// Index of the key.
        index: usize,
        /// The size given.
        size_bits: u32,
    },
    /// A key's block does not fit inside a range.
    #[error("key {key} block does not fit in range {range}")]
    RangeOutOfBounds {
        /// Index of the key.
        key: usize,
        /// Index of the first range it does not fit.
        range: usize,
    },
    /// Two keys' blocks overlap; their keys would share randomness.
    #[error("key {index} block overlaps another key's block")]
    OverlappingBlocks {
        /// Index of one of the overlapping keys.
        index: usize,
    },
    /// Two keys share a key ID.
    #[error("key {index} repeats a key id")]
    DuplicateKeyId {
        /// Index of the second occurrence.
        index: usize,
    },
}

/// One server's allocation that every key of the batch draws its block from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeRef {
    /// Entropy server identifier (1..=64 bytes of UTF-8).
    pub server_id: String,
    /// Pool on that server.
    pub pool_id: [u8; 16],
    /// Offset of the range in the pool.
    pub offset: u64,
    /// Length of the range in bytes.
    pub len: u64,
}

/// One key of the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// The key's ID (shared with the SAEs as a UUID).
    pub key_id: [u8; 16],
    /// Key size in bits; a positive multiple of 8.
    pub size_bits: u32,
    /// Offset of this key's `L`-byte block inside every range.
    pub block_offset: u64,
    /// Confirmation tag, see [`crate::confirm`].
    pub confirm: [u8; 16],
}

impl KeyEntry {
    /// Key size in bytes.
    pub fn size_bytes(&self) -> usize {
        (self.size_bits / 8) as usize
    }
}

/// Everything B needs to regenerate a batch of keys. Contains no key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchMetadata {
    /// Format version; [`VERSION`].
    pub version: u8,
    /// Number of servers.
    pub n: u8,
    /// Leak tolerance.
    pub c: u8,
    /// One range per server, in matrix column order.
    pub ranges: Vec<RangeRef>,
    /// Unix time (seconds) after which the ranges are gone.
    pub expires_at_unix: u64,
    /// The keys of the batch.
    pub keys: Vec<KeyEntry>,
}

impl BatchMetadata {
    /// Block length `L` of key `index` (it yields the key and its tag key), or `None` if
    /// there is no such key.
    pub fn block_len(&self, index: usize) -> Option<usize> {
        let k = self.keys.get(index)?;
        key_block_len(k.size_bytes(), self.n, self.c).ok()
    }

    /// Checks every semantic rule of the format (see the module docs).
    pub fn validate(&self) -> Result<(), MetadataError> {
        check_version(self.version)?;
        check_params(self.n, self.c)?;
        let n = usize::from(self.n);
        if self.ranges.len() != n {
            return Err(MetadataError::RangeCount {
                expected: n,
                got: self.ranges.len(),
            });
        }
        let mut servers = HashSet::with_capacity(n);
        for (index, r) in self.ranges.iter().enumerate() {
            let len = r.server_id.len();
            if len == 0 || len > MAX_SERVER_ID_LEN {
                return Err(MetadataError::ServerIdLength(len));
            }
            if !servers.insert(r.server_id.as_str()) {
                return Err(MetadataError::DuplicateServer { index });
            }
            if r.offset.checked_add(r.len).is_none() {
                return Err(MetadataError::RangeOverflow { index });
            }
        }
        if self.keys.is_empty() || self.keys.len() > MAX_KEYS {
            return Err(MetadataError::KeyCount(self.keys.len()));
        }
        let mut ids = HashSet::with_capacity(self.keys.len());
        // (start, end, index) of every key's block, to check they are disjoint.
        let mut spans = Vec::with_capacity(self.keys.len());
        for (index, k) in self.keys.iter().enumerate() {
            let bad_size = MetadataError::BadKeySize {
                index,
                size_bits: k.size_bits,
            };
            if k.size_bits == 0 || k.size_bits % 8 != 0 || k.size_bytes() > MAX_KEY_BYTES {
                return Err(bad_size);
            }
            let l = key_block_len(k.size_bytes(), self.n, self.c).map_err(|_| bad_size)? as u64;
            let end = k.block_offset.checked_add(l);
            for (range, r) in self.ranges.iter().enumerate() {
                if end.is_none_or(|e| e > r.len) {
                    return Err(MetadataError::RangeOutOfBounds { key: index, range });
                }
            }
            if !ids.insert(k.key_id) {
                return Err(MetadataError::DuplicateKeyId { index });
            }
            spans.push((k.block_offset, k.block_offset + l, index));
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            if let [(_, end_a, _), (start_b, _, index)] = w {
                if start_b < end_a {
                    return Err(MetadataError::OverlappingBlocks { index: *index });
                }
            }
        }
        Ok(())
    }

    /// Encodes to the version-2 wire format after validating.
    pub fn encode(&self) -> Result<Vec<u8>, MetadataError> {
        self.validate()?;
        let ranges_len: usize = self.ranges.iter().map(|r| 1 + r.server_id.len() + 32).sum();
        let mut out = Vec::with_capacity(11 + ranges_len + 4 + self.keys.len() * KEY_ENTRY_LEN);
        out.push(self.version);
        out.push(self.n);
        out.push(self.c);
        out.extend_from_slice(&self.expires_at_unix.to_be_bytes());
        for r in &self.ranges {
            // validate() bounded the length by MAX_SERVER_ID_LEN (64), so it fits in u8.
            out.push(r.server_id.len() as u8);
            out.extend_from_slice(r.server_id.as_bytes());
            out.extend_from_slice(&r.pool_id);
            out.extend_from_slice(&r.offset.to_be_bytes());
            out.extend_from_slice(&r.len.to_be_bytes());
        }
        // validate() bounded the count by MAX_KEYS (2^20), so it fits in u32.
        out.extend_from_slice(&(self.keys.len() as u32).to_be_bytes());
        for k in &self.keys {
            out.extend_from_slice(&k.key_id);
            out.extend_from_slice(&k.size_bits.to_be_bytes());
            out.extend_from_slice(&k.block_offset.to_be_bytes());
            out.extend_from_slice(&k.confirm);
        }
        Ok(out)
    }
}

/// Block length `L = ceil((m + 32) / (n − c))` of an `m`-byte key: its block yields the key
/// and the 32 bytes that key its confirmation tag.
pub fn key_block_len(key_bytes: usize, n: u8, c: u8) -> Result<usize, crate::KeygenError> {
    if key_bytes == 0 {
        return Err(crate::KeygenError::EmptyKey);
    }
    let material = confirm::material_len(key_bytes).ok_or(crate::KeygenError::SizeOverflow)?;
    block_len(material, n.into(), c.into())
}

fn check_version(version: u8) -> Result<(), MetadataError> {
    match version {
        VERSION => Ok(()),
        RETIRED_VERSION => Err(MetadataError::RetiredVersion(version)),
        other => Err(MetadataError::UnsupportedVersion(other)),
    }
}

fn check_params(n: u8, c: u8) -> Result<(), MetadataError> {
    if n < MIN_SERVERS || cauchy::check_params(n.into(), c.into()).is_err() {
        return Err(MetadataError::BadParameters { n, c });
    }
    Ok(())
}

/// Decodes and validates version-2 metadata; rejects truncated input, trailing bytes and
/// other versions (the retired version 1 with [`MetadataError::RetiredVersion`]).
pub fn decode(bytes: &[u8]) -> Result<BatchMetadata, MetadataError> {
    let mut r = Reader { rest: bytes };
    let version = r.u8()?;
    check_version(version)?;
    let n = r.u8()?;
    let c = r.u8()?;
    check_params(n, c)?;
    let expires_at_unix = r.u64()?;
    let mut ranges = Vec::with_capacity(n.into());
    for _ in 0..n {
        let id_len = usize::from(r.u8()?);
        if id_len == 0 || id_len > MAX_SERVER_ID_LEN {
            return Err(MetadataError::ServerIdLength(id_len));
        }
        let server_id = std::str::from_utf8(r.take(id_len)?)
            .map_err(|_| MetadataError::InvalidUtf8)?
            .to_owned();
        ranges.push(RangeRef {
            server_id,
            pool_id: r.array()?,
            offset: r.u64()?,
            len: r.u64()?,
        });
    }
    let count = r.u32()? as usize;
    if count == 0 || count > MAX_KEYS {
        return Err(MetadataError::KeyCount(count));
    }
    // Refuse before allocating if the input cannot hold that many entries.
    if r.rest.len() < count * KEY_ENTRY_LEN {
        return Err(MetadataError::Truncated);
    }
    let mut keys = Vec::with_capacity(count);
    for _ in 0..count {
        keys.push(KeyEntry {
            key_id: r.array()?,
            size_bits: r.u32()?,
            block_offset: r.u64()?,
            confirm: r.array()?,
        });
    }
    if !r.rest.is_empty() {
        return Err(MetadataError::TrailingBytes);
    }
    let meta = BatchMetadata {
        version,
        n,
        c,
        ranges,
        expires_at_unix,
        keys,
    };
    meta.validate()?;
    Ok(meta)
}

/// A cursor over the input; every read either takes exactly what it needs or fails with
/// [`MetadataError::Truncated`].
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], MetadataError> {
        if self.rest.len() < len {
            return Err(MetadataError::Truncated);
        }
        let (head, tail) = self.rest.split_at(len);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], MetadataError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, MetadataError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, MetadataError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, MetadataError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests;
