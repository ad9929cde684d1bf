//! Known-answer vectors, made by independent Python implementations written from the docs.
//!
//! * `tests/vectors/extract_v1.txt` (`gen_extract_v1.py`, frozen): the field, the Cauchy
//!   points and the output byte order, which both sites must agree on bit for bit.
//! * `tests/vectors/tag_v2.txt` (`gen_tag_v2.py`, written from docs/keygen-protocol.md):
//!   the confirmation tag (GF(2^128) one-time MAC under a mask), the `key ‖ k_mac ‖ mask`
//!   split of each key's extraction output, and the version-2 metadata encoding of a batch.

// Test helpers are plain functions, not #[test]s: an unwrap here is an assertion.
#![allow(clippy::unwrap_used)]

use dqkd_keygen::confirm::{self, TagKey};
use dqkd_keygen::{metadata, Extractor};

const VECTORS: &str = include_str!("vectors/extract_v1.txt");
const TAG_VECTORS: &str = include_str!("vectors/tag_v2.txt");

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("valid hex in vector file"))
        .collect()
}

#[test]
fn extraction_matches_frozen_vectors() {
    let mut checked = 0;
    for line in VECTORS
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 5, "malformed vector line: {line}");
        let n: usize = f[0].parse().expect("n");
        let c: usize = f[1].parse().expect("c");
        let m: usize = f[2].parse().expect("m");
        let blocks: Vec<Vec<u8>> = f[3].split(',').map(hex).collect();
        let expected = hex(f[4]);
        let e = Extractor::new(n, c).expect("vector parameters are valid");
        let refs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
        let mut out = vec![0u8; m];
        e.extract(&refs, &mut out)
            .expect("vector lengths are consistent");
        assert_eq!(out, expected, "vector n={n} c={c} m={m}");

        // The batch path must agree: two copies of the same blocks give the key twice.
        let l = e.block_len(m).expect("valid");
        let doubled: Vec<Vec<u8>> = blocks.iter().map(|b| [b.as_slice(), b].concat()).collect();
        let refs: Vec<&[u8]> = doubled.iter().map(Vec::as_slice).collect();
        assert_eq!(refs[0].len(), 2 * l);
        let mut batch = vec![0u8; 2 * m];
        e.extract_batch(&refs, m, 2, &mut batch)
            .expect("vector lengths are consistent");
        assert_eq!(&batch[..m], &expected[..]);
        assert_eq!(&batch[m..], &expected[..]);
        checked += 1;
    }
    assert_eq!(checked, 10);
}

#[test]
fn first_vector_by_hand() {
    // n = 1, c = 0: x0 = 0, y0 = 1, so M = [1 / (0 + 1)] = [1] and the key is the block.
    let e = Extractor::new(1, 0).expect("valid");
    let block = hex("789b2b91");
    let mut out = [0u8; 4];
    e.extract(&[&block], &mut out).expect("lengths match");
    assert_eq!(out.to_vec(), block);
}

fn tag_lines(kind: &str) -> impl Iterator<Item = Vec<&'static str>> + '_ {
    TAG_VECTORS
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .filter(move |f| f[0] == kind)
}

fn array<const N: usize>(s: &str) -> [u8; N] {
    hex(s).try_into().expect("field has the right length")
}

#[test]
fn tags_match_vectors() {
    let mut checked = 0;
    for f in tag_lines("tag") {
        assert_eq!(f.len(), 6, "malformed tag line: {f:?}");
        let key = hex(f[1]);
        let key_id: [u8; 16] = array(f[2]);
        let extra = [hex(f[3]), hex(f[4])].concat();
        let tag_key = TagKey::new(&extra.clone().try_into().expect("32 bytes"));
        let expected: [u8; 16] = array(f[5]);
        assert_eq!(tag_key.tag(&key, &key_id), expected, "tag line {f:?}");
        assert!(tag_key.verify(&key, &key_id, &expected));
        // The same through split(), as the KME uses it.
        let material = [key.as_slice(), &extra].concat();
        let (k, tk) = TagKey::split(&material).expect("nonempty key");
        assert_eq!(k, key.as_slice());
        assert!(tk.verify(k, &key_id, &expected));
        checked += 1;
    }
    assert_eq!(checked, 10);
}

#[test]
fn keys_and_tags_from_blocks_match_vectors() {
    let mut checked = 0;
    for f in tag_lines("key") {
        assert_eq!(f.len(), 8, "malformed key line: {f:?}");
        let n: u8 = f[1].parse().expect("n");
        let c: u8 = f[2].parse().expect("c");
        let m: usize = f[3].parse().expect("m");
        let key_id: [u8; 16] = array(f[4]);
        let blocks: Vec<Vec<u8>> = f[5].split(',').map(hex).collect();
        let l = metadata::key_block_len(m, n, c).expect("valid parameters");
        assert!(blocks.iter().all(|b| b.len() == l), "block length of {f:?}");
        let e = Extractor::new(n.into(), c.into()).expect("valid parameters");
        let refs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
        let mut material = vec![0u8; confirm::material_len(m).expect("small")];
        e.extract(&refs, &mut material).expect("lengths match");
        let (key, tag_key) = TagKey::split(&material).expect("nonempty key");
        assert_eq!(key, hex(f[6]).as_slice(), "key of {f:?}");
        let tag: [u8; 16] = array(f[7]);
        assert_eq!(tag_key.tag(key, &key_id), tag, "tag of {f:?}");
        checked += 1;
    }
    assert_eq!(checked, 8);
}

#[test]
fn batch_metadata_v2_matches_vector() {
    let mut checked = 0;
    for f in tag_lines("batch") {
        assert_eq!(f.len(), 4, "malformed batch line");
        let ranges: Vec<Vec<u8>> = f[1].split(',').map(hex).collect();
        let wire = hex(f[2]);
        let keys: Vec<Vec<u8>> = f[3].split(',').map(hex).collect();
        let meta = metadata::decode(&wire).expect("the vector decodes");
        assert_eq!(meta.version, 2);
        assert_eq!(
            (meta.n, meta.c, meta.expires_at_unix),
            (3, 1, 1_800_000_000)
        );
        assert_eq!(meta.encode().expect("valid"), wire, "re-encoding differs");
        assert_eq!(meta.keys.len(), keys.len());
        let e = Extractor::new(meta.n.into(), meta.c.into()).expect("valid");
        for (r, bytes) in meta.ranges.iter().zip(&ranges) {
            assert_eq!(r.len, bytes.len() as u64);
        }
        for (index, (entry, expected)) in meta.keys.iter().zip(&keys).enumerate() {
            let l = meta.block_len(index).expect("key exists");
            let start = entry.block_offset as usize;
            let blocks: Vec<&[u8]> = ranges.iter().map(|r| &r[start..start + l]).collect();
            let mut material = vec![0u8; entry.size_bytes() + confirm::EXTRA_LEN];
            e.extract(&blocks, &mut material).expect("lengths match");
            let (key, tag_key) = TagKey::split(&material).expect("nonempty key");
            assert_eq!(key, expected.as_slice(), "key {index}");
            assert!(
                tag_key.verify(key, &entry.key_id, &entry.confirm),
                "tag {index}"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 1);
}
