//! The confirmation tag end to end: site A extracts `key ‖ k_mac ‖ mask` from the blocks and
//! sends the tag; site B, reading the same blocks, accepts, and reading blocks in which any
//! server changed anything, refuses.

// Test helpers are plain functions, not #[test]s: an unwrap here is an assertion.
#![allow(clippy::unwrap_used)]

use dqkd_keygen::confirm::{self, TagKey};
use dqkd_keygen::{metadata, Extractor};
use proptest::prelude::*;

/// Extracts one key's material `key ‖ k_mac ‖ mask` from `blocks`.
fn material(e: &Extractor, blocks: &[Vec<u8>], m: usize) -> Vec<u8> {
    let refs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
    let mut out = vec![0u8; confirm::material_len(m).unwrap()];
    e.extract(&refs, &mut out).unwrap();
    out
}

fn params() -> impl Strategy<Value = (u8, u8, usize)> {
    (2u8..=6)
        .prop_flat_map(|n| (Just(n), 0..n, 1usize..=80))
        .prop_map(|(n, c, m)| (n, c, m))
}

proptest! {
    #[test]
    fn same_blocks_confirm_and_any_changed_block_is_refused(
        (n, c, m) in params(),
        seed in any::<[u8; 32]>(),
        server in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        delta in 1u8..=255,
        key_id in any::<[u8; 16]>(),
    ) {
        let l = metadata::key_block_len(m, n, c).unwrap();
        let blocks: Vec<Vec<u8>> = (0..usize::from(n))
            .map(|j| (0..l).map(|i| seed[(i * 7 + j * 13) % 32] ^ (i as u8).wrapping_mul(j as u8 + 1)).collect())
            .collect();
        let e = Extractor::new(n.into(), c.into()).unwrap();

        let at_a = material(&e, &blocks, m);
        let (key_a, tag_key_a) = TagKey::split(&at_a).unwrap();
        let tag = tag_key_a.tag(key_a, &key_id);

        let at_b = material(&e, &blocks, m);
        let (key_b, tag_key_b) = TagKey::split(&at_b).unwrap();
        prop_assert!(tag_key_b.verify(key_b, &key_id, &tag));

        // One server answers B differently in one byte.
        let mut lied = blocks.clone();
        let j = server.index(lied.len());
        let i = at.index(l);
        lied[j][i] ^= delta;
        let at_b = material(&e, &lied, m);
        let (key_b, tag_key_b) = TagKey::split(&at_b).unwrap();
        prop_assert!(!tag_key_b.verify(key_b, &key_id, &tag));
    }
}

/// The tag of one key does not depend on the key when the mask is uniform: for a fixed
/// `k_mac` and key ID, every tag value is reached by exactly one mask whatever the key, so
/// the tag's distribution is the same for two different keys. Checked on the first byte
/// over all 256 values of the mask's first byte.
#[test]
fn the_tag_distribution_does_not_depend_on_the_key() {
    let key_id = [9u8; 16];
    let histogram = |key: &[u8]| {
        let mut seen = [0u32; 256];
        for v in 0..=255u8 {
            let mut extra = [0x5Cu8; confirm::EXTRA_LEN];
            extra[16] = v;
            seen[usize::from(TagKey::new(&extra).tag(key, &key_id)[0])] += 1;
        }
        seen
    };
    assert_eq!(histogram(&[0u8; 16]), [1u32; 256]);
    assert_eq!(histogram(&[0xFFu8; 16]), [1u32; 256]);
}
