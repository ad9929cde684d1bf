//! The security property, tested: with any `c` blocks known, the key is a bijection of the
//! other `n − c` blocks. We show it constructively by recovering the unknown blocks from the
//! key and the known blocks (Gaussian elimination over GF(2^8)) and getting the originals.

// Test helpers are plain functions, not #[test]s: an unwrap here is an assertion.
#![allow(clippy::unwrap_used)]

use dqkd_keygen::{gf256, Extractor};
use proptest::prelude::*;

/// Solves `A · u = rhs` for square `A` over GF(2^8); `None` if `A` is singular.
fn solve(mut a: Vec<Vec<u8>>, mut rhs: Vec<u8>) -> Option<Vec<u8>> {
    let k = a.len();
    for col in 0..k {
        let p = (col..k).find(|&r| a[r][col] != 0)?;
        a.swap(col, p);
        rhs.swap(col, p);
        let ip = gf256::inv(a[col][col])?;
        for v in a[col].iter_mut() {
            *v = gf256::mul(*v, ip);
        }
        rhs[col] = gf256::mul(rhs[col], ip);
        let pivot = a[col].clone();
        let pivot_rhs = rhs[col];
        for (r, (row, b)) in a.iter_mut().zip(rhs.iter_mut()).enumerate() {
            let f = row[col];
            if r != col && f != 0 {
                for (v, p) in row.iter_mut().zip(&pivot) {
                    *v ^= gf256::mul(f, *p);
                }
                *b ^= gf256::mul(f, pivot_rhs);
            }
        }
    }
    Some(rhs)
}

fn case() -> impl Strategy<Value = (usize, usize, usize, Vec<bool>, Vec<Vec<u8>>)> {
    (1usize..=8)
        .prop_flat_map(|n| (Just(n), 0..n, 1usize..=12))
        .prop_flat_map(|(n, c, l)| {
            let known = Just(()).prop_perturb(move |_, mut rng| {
                // Choose exactly c known blocks.
                let mut idx: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    let j = (rng.next_u32() as usize) % (i + 1);
                    idx.swap(i, j);
                }
                let mut known = vec![false; n];
                for &i in &idx[..c] {
                    known[i] = true;
                }
                known
            });
            (
                Just(n),
                Just(c),
                Just(l),
                known,
                proptest::collection::vec(proptest::collection::vec(any::<u8>(), l), n),
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn unknown_blocks_are_recoverable_from_key_and_known_blocks(
        (n, c, l, known, blocks) in case()
    ) {
        let e = Extractor::new(n, c).expect("n <= 8 is valid");
        let rows = n - c;
        let m = l * rows;
        let refs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
        let mut key = vec![0u8; m];
        e.extract(&refs, &mut key).expect("lengths match");

        let unknown: Vec<usize> = (0..n).filter(|&j| !known[j]).collect();
        prop_assert_eq!(unknown.len(), rows);
        let mat = e.matrix();
        // Square system on the unknown columns.
        let a: Vec<Vec<u8>> = (0..rows)
            .map(|r| unknown.iter().map(|&j| mat.get(r, j).expect("in range")).collect())
            .collect();
        for i in 0..l {
            // rhs = y_i minus the known blocks' contribution.
            let rhs: Vec<u8> = (0..rows)
                .map(|r| {
                    (0..n).filter(|&j| known[j]).fold(key[i * rows + r], |acc, j| {
                        acc ^ gf256::mul(mat.get(r, j).expect("in range"), blocks[j][i])
                    })
                })
                .collect();
            let solved = solve(a.clone(), rhs);
            prop_assert!(solved.is_some(), "submatrix singular: n={} c={} known={:?}", n, c, known);
            let solved = solved.expect("checked above");
            for (s, &j) in solved.iter().zip(&unknown) {
                prop_assert_eq!(*s, blocks[j][i]);
            }
        }
    }
}
