//! Key confirmation: a tag that lets site B check it regenerated site A's key, and that
//! reveals nothing about the key.
//!
//! # Construction (metadata version 2)
//!
//! Besides each `m`-byte key the extractor yields [`EXTRA_LEN`] = 32 more bytes from the
//! same ranges: the extraction output for the key is `E = key ‖ k_mac ‖ mask` with
//! `|k_mac| = |mask| = 16` (see [`crate::metadata`] for the block length this needs). Then
//!
//! ```text
//! tag = GHASH'(k_mac; X_1, …, X_ℓ) ⊕ mask
//! X_1 … X_q   the key, zero-padded on the right to q = ceil(m / 16) blocks of 16 bytes
//! X_{q+1}     key_ID (16 bytes)
//! X_{q+2}     u64be(8·m) ‖ u64be(128)          (bit lengths of key and key_ID)
//! GHASH'(K; X_1..X_ℓ):  h = 0;  for each i: h = (h ⊕ X_i) · K;  result h
//! ```
//!
//! over GF(2^128) with modulus `x^128 + x^7 + x^2 + x + 1`, where a 16-byte string is the
//! element whose coefficient of `x^i` is bit `i` of the string read as a big-endian unsigned
//! integer (byte 0's top bit is the coefficient of `x^127`). Unlike GCM's GHASH there is no
//! bit reflection. The result is written back the same way.
//!
//! # Why
//!
//! * **Hiding.** Given at most `c` leaked blocks, `key ‖ k_mac ‖ mask` is uniform (it is one
//!   extraction output), so `mask` is a one-time pad independent of the key, `k_mac` and the
//!   key ID: the tag is uniform and independent of the key. Testing key candidates against it
//!   is useless however much computing power the adversary has.
//! * **Detection.** If the sites' outputs differ by `Δ ≠ 0` (a broken server, or a malicious
//!   one that knows its own difference but not the other blocks), B's check passes only when
//!   a nonzero polynomial of degree ≤ ℓ in the uniform `k_mac` (or a nonzero linear function
//!   of the uniform key) hits one value: probability at most `ℓ / 2^128 + 2^-min(128, 8m)`.
//!
//! The previous tag, an HMAC keyed with the key itself, was a fixed function of the key and
//! so an offline oracle once a short key had lost bits to `c + 1` leaked servers; it is gone.

use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of the confirmation tag in bytes.
pub const TAG_LEN: usize = 16;

/// Bytes extracted beside every key: the one-time MAC key, then the mask.
pub const EXTRA_LEN: usize = 32;

/// Bytes of extraction output a key of `key_bytes` bytes needs (`key ‖ k_mac ‖ mask`), or
/// `None` on overflow.
pub fn material_len(key_bytes: usize) -> Option<usize> {
    key_bytes.checked_add(EXTRA_LEN)
}

/// The one-time MAC key and mask extracted beside one key. Zeroized on drop; never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct TagKey {
    k_mac: [u8; 16],
    mask: [u8; 16],
}

impl core::fmt::Debug for TagKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("TagKey(..)")
    }
}

impl TagKey {
    /// Builds the tag key from the [`EXTRA_LEN`] bytes extracted after the key
    /// (`k_mac` first, then `mask`).
    pub fn new(extra: &[u8; EXTRA_LEN]) -> Self {
        let mut k_mac = [0u8; 16];
        let mut mask = [0u8; 16];
        k_mac.copy_from_slice(&extra[..16]);
        mask.copy_from_slice(&extra[16..]);
        Self { k_mac, mask }
    }

    /// Splits one key's extraction output `key ‖ k_mac ‖ mask` into the key and its tag
    /// key; `None` unless `material` is longer than [`EXTRA_LEN`].
    pub fn split(material: &[u8]) -> Option<(&[u8], Self)> {
        let key_len = material.len().checked_sub(EXTRA_LEN).filter(|&m| m > 0)?;
        let (key, extra) = material.split_at(key_len);
        let extra: &[u8; EXTRA_LEN] = extra.try_into().ok()?;
        Some((key, Self::new(extra)))
    }

    /// The tag of `key` with identifier `key_id`.
    pub fn tag(&self, key: &[u8], key_id: &[u8; 16]) -> [u8; TAG_LEN] {
        let h = poly_hash(u128::from_be_bytes(self.k_mac), key, key_id);
        (h ^ u128::from_be_bytes(self.mask)).to_be_bytes()
    }

    /// Checks `tag` against the tag of `key`/`key_id` in constant time (no early exit, so
    /// timing does not show how much of a forged tag was right).
    pub fn verify(&self, key: &[u8], key_id: &[u8; 16], tag: &[u8; TAG_LEN]) -> bool {
        let mut expected = self.tag(key, key_id);
        let diff = expected
            .iter()
            .zip(tag.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        expected.zeroize();
        core::hint::black_box(diff) == 0
    }
}

/// `GHASH'(k; key blocks, key_id, lengths)` as defined in the module docs.
fn poly_hash(k: u128, key: &[u8], key_id: &[u8; 16]) -> u128 {
    let mut h = 0u128;
    for chunk in key.chunks(16) {
        let mut block = [0u8; 16];
        block[..chunk.len()].copy_from_slice(chunk);
        h = gf128_mul(h ^ u128::from_be_bytes(block), k);
        block.zeroize();
    }
    h = gf128_mul(h ^ u128::from_be_bytes(*key_id), k);
    // Keys are at most a few MiB, so 8·m fits in u64 (usize is at most 64 bits).
    let bits = (key.len() as u128).wrapping_mul(8) & u128::from(u64::MAX);
    let lengths = (bits << 64) | 128;
    gf128_mul(h ^ lengths, k)
}

/// Multiplication in GF(2^128) modulo `x^128 + x^7 + x^2 + x + 1`, bit `i` of the integer
/// being the coefficient of `x^i`. Branch-free in the operands (the loop count is fixed).
pub fn gf128_mul(a: u128, b: u128) -> u128 {
    let mut acc = 0u128;
    let mut a = a;
    for i in 0..128 {
        let bit = (b >> i) & 1;
        acc ^= a & 0u128.wrapping_sub(bit);
        let carry = a >> 127;
        a = (a << 1) ^ (0x87 & 0u128.wrapping_sub(carry));
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag_key(seed: u8) -> TagKey {
        let mut extra = [0u8; EXTRA_LEN];
        for (i, b) in extra.iter_mut().enumerate() {
            *b = seed.wrapping_mul(31).wrapping_add(i as u8).wrapping_mul(97);
        }
        TagKey::new(&extra)
    }

    #[test]
    fn gf128_by_hand() {
        // x · x^127 = x^128 = x^7 + x^2 + x + 1.
        assert_eq!(gf128_mul(2, 1 << 127), 0x87);
        assert_eq!(gf128_mul(1, 0xDEAD), 0xDEAD);
        assert_eq!(gf128_mul(0, u128::MAX), 0);
        // (x + 1)^2 = x^2 + 1 in characteristic 2.
        assert_eq!(gf128_mul(3, 3), 5);
        let (a, b, c) = (
            0x0123_4567_89AB_CDEF_u128 << 64 | 77,
            u128::MAX / 3,
            1u128 << 100,
        );
        assert_eq!(gf128_mul(a, b), gf128_mul(b, a));
        assert_eq!(gf128_mul(a, b ^ c), gf128_mul(a, b) ^ gf128_mul(a, c));
        assert_eq!(gf128_mul(gf128_mul(a, b), c), gf128_mul(a, gf128_mul(b, c)));
    }

    #[test]
    fn hash_is_the_polynomial_in_k() {
        // One 16-byte key: h = X1·k^3 + id·k^2 + len·k.
        let k = 0x1357_9BDF_2468_ACE0_u128 << 32 | 0xFEED;
        let key = [0x5Au8; 16];
        let id = [0xC3u8; 16];
        let (x1, xid, xlen) = (
            u128::from_be_bytes(key),
            u128::from_be_bytes(id),
            (128u128 << 64) | 128,
        );
        let k2 = gf128_mul(k, k);
        let k3 = gf128_mul(k2, k);
        let expected = gf128_mul(x1, k3) ^ gf128_mul(xid, k2) ^ gf128_mul(xlen, k);
        assert_eq!(poly_hash(k, &key, &id), expected);
    }

    #[test]
    fn verify_accepts_and_rejects() {
        let tk = tag_key(1);
        let key = [7u8; 32];
        let id = [1u8; 16];
        let tag = tk.tag(&key, &id);
        assert!(tk.verify(&key, &id, &tag));
        for i in 0..TAG_LEN * 8 {
            let mut bad = tag;
            bad[i / 8] ^= 1 << (i % 8);
            assert!(!tk.verify(&key, &id, &bad));
        }
        for i in 0..key.len() * 8 {
            let mut other = key;
            other[i / 8] ^= 1 << (i % 8);
            assert!(!tk.verify(&other, &id, &tag), "key bit {i}");
        }
        assert!(!tk.verify(&key, &[2u8; 16], &tag));
        assert!(!tag_key(2).verify(&key, &id, &tag));
        // The length block separates a key from the same key with a zero byte appended.
        let mut longer = key.to_vec();
        longer.push(0);
        assert!(!tk.verify(&longer, &id, &tag));
    }

    #[test]
    fn the_mask_is_a_one_time_pad() {
        // Same key, k_mac and ID; the masks differ by d, so do the tags.
        let mut extra = [0x42u8; EXTRA_LEN];
        let a = TagKey::new(&extra);
        extra[16 + 3] ^= 0xA5;
        let b = TagKey::new(&extra);
        let (ta, tb) = (a.tag(b"k", &[0; 16]), b.tag(b"k", &[0; 16]));
        let mut d = [0u8; 16];
        d[3] = 0xA5;
        let xor: Vec<u8> = ta.iter().zip(tb).map(|(x, y)| x ^ y).collect();
        assert_eq!(xor, d);
    }

    #[test]
    fn split_takes_the_last_32_bytes() {
        let material: Vec<u8> = (0u8..40).collect();
        let (key, tk) = TagKey::split(&material).expect("long enough");
        assert_eq!(key, &material[..8]);
        assert_eq!(tk.k_mac.to_vec(), (8u8..24).collect::<Vec<_>>());
        assert_eq!(tk.mask.to_vec(), (24u8..40).collect::<Vec<_>>());
        assert!(TagKey::split(&material[..32]).is_none());
        assert_eq!(format!("{tk:?}"), "TagKey(..)");
        assert_eq!(material_len(32), Some(64));
        assert_eq!(material_len(usize::MAX), None);
    }
}
