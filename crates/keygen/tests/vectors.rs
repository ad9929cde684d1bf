//! Known-answer vectors for extraction, frozen in `tests/vectors/extract_v1.txt`.
//!
//! The vectors were produced once by an independent Python implementation
//! (`tests/vectors/gen_extract_v1.py`). They pin the field, the Cauchy points and the output
//! byte order, which both sites must agree on bit for bit.

// Test helpers are plain functions, not #[test]s: an unwrap here is an assertion.
#![allow(clippy::unwrap_used)]

use dqkd_keygen::Extractor;

const VECTORS: &str = include_str!("vectors/extract_v1.txt");

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
