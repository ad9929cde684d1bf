//! Statistical smoke test on extracted output. This catches gross bugs (a stuck row, a
//! zero table, a byte-order slip that repeats data); it proves nothing about security.
//!
//! In place of a real compressor (which would need a new dependency) the "compression
//! estimate" is the order-0 Shannon entropy of the byte histogram divided by 8 bits: the
//! best ratio a per-byte entropy coder could reach. It must stay above 0.99.

// Test helpers are plain functions, not #[test]s: an unwrap here is an assertion.
#![allow(clippy::unwrap_used)]

use dqkd_keygen::Extractor;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

const KEYS: usize = 131_072; // 131072 keys × 32 bytes = 4 MiB of output.
const KEY_BYTES: usize = 32;

fn output() -> Vec<u8> {
    let e = Extractor::new(3, 1).expect("valid");
    let l = e.block_len(KEY_BYTES).expect("valid");
    let mut rng = StdRng::seed_from_u64(0x6471_6b64);
    let ranges: Vec<Vec<u8>> = (0..3)
        .map(|_| {
            let mut r = vec![0u8; l * KEYS];
            rng.fill_bytes(&mut r);
            r
        })
        .collect();
    let refs: Vec<&[u8]> = ranges.iter().map(Vec::as_slice).collect();
    let mut out = vec![0u8; KEYS * KEY_BYTES];
    e.extract_batch(&refs, KEY_BYTES, KEYS, &mut out)
        .expect("lengths match");
    out
}

#[test]
fn extracted_bytes_look_uniform() {
    let out = output();
    assert!(out.len() >= 4 << 20);

    let mut hist = [0u64; 256];
    for &b in &out {
        hist[b as usize] += 1;
    }
    let expected = out.len() as f64 / 256.0;
    let chi2: f64 = hist
        .iter()
        .map(|&o| {
            let d = o as f64 - expected;
            d * d / expected
        })
        .sum();
    // 255 degrees of freedom: mean 255, sd ~22.6; 400 is ~6 sd out.
    assert!(chi2 < 400.0, "chi-square {chi2}");

    let total = out.len() as f64;
    let entropy: f64 = hist
        .iter()
        .filter(|&&o| o > 0)
        .map(|&o| {
            let p = o as f64 / total;
            -p * p.log2()
        })
        .sum();
    assert!(
        entropy / 8.0 > 0.99,
        "order-0 compression estimate {}",
        entropy / 8.0
    );

    // Serial correlation coefficient of consecutive bytes (Knuth / ent).
    let n = (out.len() - 1) as f64;
    let (mut sx, mut sy, mut sxx, mut syy, mut sxy) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for w in out.windows(2) {
        let (x, y) = (f64::from(w[0]), f64::from(w[1]));
        sx += x;
        sy += y;
        sxx += x * x;
        syy += y * y;
        sxy += x * y;
    }
    let r = (n * sxy - sx * sy) / ((n * sxx - sx * sx).sqrt() * (n * syy - sy * sy).sqrt());
    assert!(r.abs() < 0.01, "serial correlation {r}");
}
