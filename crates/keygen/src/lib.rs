//! Key generation for dqkd: two sites derive the same key from the same public positions in
//! the random pools of `n` independent entropy servers, without key material ever crossing
//! the site-to-site link.
//!
//! This crate is pure (sans-I/O): bytes in, bytes out. It provides
//!
//! * [`gf256`]: arithmetic in GF(2^8) with the AES polynomial;
//! * [`cauchy`]: the fixed `(n − c) × n` Cauchy matrix both sites use;
//! * [`extract`]: the [`Extractor`] that turns `n` server blocks into a key, singly or in
//!   batches;
//! * [`metadata`]: the versioned binary message site A sends site B to regenerate a batch;
//! * [`confirm`]: the key-confirmation tag, a one-time MAC under a one-time pad extracted
//!   beside each key, that catches servers that answered the two sites differently and
//!   reveals nothing about the key.
//!
//! # The protocol in brief
//!
//! For an `m`-byte key each of the `n` servers contributes a block of
//! `L = ceil(m / (n − c))` bytes. Byte position `i` of all blocks forms a vector over GF(2^8);
//! multiplying it by the Cauchy matrix gives `n − c` output bytes, and the key is the first
//! `m` bytes of all outputs in order.
//!
//! **What an adversary must break.** To learn anything about a key, it must obtain the
//! blocks of more than `c` of the `n` servers for that key, while they exist.
//!
//! **What `c` buys.** Every square submatrix of a Cauchy matrix is invertible. With any `c`
//! blocks known, the key is an invertible linear map of the `n − c` unknown blocks plus a
//! known constant, so uniform unknown blocks give a uniform key independent of everything
//! the adversary knows. This holds against unbounded computation (information-theoretic),
//! for the key and, since metadata version 2, for the confirmation tag sent beside it. The
//! links that carry the blocks are TLS, which is computational (see the protocol doc).
//!
//! **What the TTL buys.** Servers shred each range after the named KMEs have read it, and
//! unused pool bytes when the pool's TTL ends. Afterwards the bytes exist nowhere, so a later
//! compromise of a server, or recorded metadata, reveals nothing about earlier keys.
//!
//! **Honest limits.** The guarantee assumes the servers produce independent uniform bytes,
//! that at most `c` servers or their links leak, and that the A–B link is authenticated
//! (an adversary who rewrites metadata could point B elsewhere). The confirmation tag catches
//! a server that answers A and B differently, not one that feeds both sides the same chosen
//! bytes: such a server simply counts as one of the `c` leaked ones. The statistical tests
//! in `tests/` are a smoke test, not a proof. `docs/keygen-protocol.md` says all this at length.
//!
//! # Example
//!
//! ```
//! use dqkd_keygen::confirm::{self, TagKey};
//! use dqkd_keygen::{metadata, Extractor};
//!
//! # fn main() -> Result<(), dqkd_keygen::KeygenError> {
//! let ex = Extractor::new(3, 1)?;
//! // A 256-bit key and the 32 bytes that key its tag: (32 + 32) / 2 = 32 bytes per server.
//! let l = metadata::key_block_len(32, 3, 1)?;
//! // In production these come from three entropy servers; both sites read the same bytes.
//! let blocks = [[0x11u8; 32], [0x22; 32], [0x33; 32]];
//! let refs: Vec<&[u8]> = blocks.iter().map(|b| &b[..l]).collect();
//!
//! let mut material_a = [0u8; 32 + confirm::EXTRA_LEN];
//! ex.extract(&refs, &mut material_a)?;
//! let (key_a, tag_key) = TagKey::split(&material_a).expect("longer than 32 bytes");
//! let key_id = [7u8; 16];
//! let tag = tag_key.tag(key_a, &key_id);
//!
//! let meta = metadata::BatchMetadata {
//!     version: metadata::VERSION,
//!     n: 3,
//!     c: 1,
//!     ranges: (0..3)
//!         .map(|j| metadata::RangeRef {
//!             server_id: format!("entropy-{j}"),
//!             pool_id: [j; 16],
//!             offset: 0,
//!             len: 32,
//!         })
//!         .collect(),
//!     expires_at_unix: 1_800_000_000,
//!     keys: vec![metadata::KeyEntry { key_id, size_bits: 256, block_offset: 0, confirm: tag }],
//! };
//! let wire = meta.encode()?;
//!
//! // Site B: decode, fetch the same blocks, extract, confirm.
//! let got = metadata::decode(&wire)?;
//! let entry = &got.keys[0];
//! let mut material_b = [0u8; 32 + confirm::EXTRA_LEN];
//! ex.extract(&refs, &mut material_b)?;
//! let (key_b, tag_key_b) = TagKey::split(&material_b).expect("longer than 32 bytes");
//! assert!(tag_key_b.verify(key_b, &entry.key_id, &entry.confirm));
//! assert_eq!(key_a, key_b);
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cauchy;
pub mod confirm;
mod error;
pub mod extract;
pub mod gf256;
pub mod metadata;

pub use error::KeygenError;
pub use extract::Extractor;
