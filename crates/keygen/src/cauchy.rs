//! The fixed `(n − c) × n` Cauchy matrix over GF(2^8) that both sites use.
//!
//! A Cauchy matrix `M[i][j] = 1 / (x_i + y_j)` with all `x_i` distinct, all `y_j` distinct
//! and no `x_i` equal to any `y_j` has the property that *every* square submatrix is
//! invertible. That is exactly what extraction needs: whichever `c` of the `n` blocks an
//! adversary knows, the remaining `(n − c) × (n − c)` submatrix is invertible, so the key is
//! a bijection of the unknown blocks.
//!
//! # The fixed choice of points
//!
//! Both sites must build the identical matrix, so the points are part of the protocol:
//!
//! * rows `i = 0 .. n − c` use `x_i = i`;
//! * columns `j = 0 .. n` use `y_j = (n − c) + j`.
//!
//! The sets `{0, …, n−c−1}` and `{n−c, …, 2n−c−1}` are disjoint, so `x_i + y_j = x_i XOR y_j`
//! is never zero and every entry is defined. Since GF(2^8) has only 256 elements, this (like
//! any Cauchy construction) needs `(n − c) + n ≤ 256` distinct points. With `c = 0` that
//! caps `n` at 128; with `c = 1`, at 128 too (`2n − 1 ≤ 256`); larger `c` allows more.
//! Combinations that do not fit are rejected with [`KeygenError::InvalidParameters`].

use crate::{gf256, KeygenError};

/// Largest `n` accepted: one byte holds it on the wire and GF(2^8) has 255 nonzero points.
pub const MAX_SERVERS: usize = 255;

/// A validated `(n − c) × n` Cauchy matrix, stored row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CauchyMatrix {
    n: usize,
    c: usize,
    entries: Vec<u8>,
}

impl CauchyMatrix {
    /// Builds the protocol's matrix for `n` servers tolerating `c` leaks.
    ///
    /// Fails unless `1 ≤ n ≤ 255`, `c < n` and `2n − c ≤ 256`.
    pub fn new(n: usize, c: usize) -> Result<Self, KeygenError> {
        check_params(n, c)?;
        let rows = n - c;
        let mut entries = Vec::with_capacity(rows * n);
        for i in 0..rows {
            for j in 0..n {
                // Both fit in u8 because check_params ensured rows + n <= 256.
                let x = i as u8;
                let y = (rows + j) as u8;
                let entry =
                    gf256::inv(gf256::add(x, y)).ok_or(KeygenError::InvalidParameters { n, c })?;
                entries.push(entry);
            }
        }
        Ok(Self { n, c, entries })
    }

    /// Number of rows, `n − c` (output bytes per column of input).
    pub fn rows(&self) -> usize {
        self.n - self.c
    }

    /// Number of columns, `n` (one per server block).
    pub fn cols(&self) -> usize {
        self.n
    }

    /// Tolerance `c` the matrix was built for.
    pub fn tolerance(&self) -> usize {
        self.c
    }

    /// Entry at row `i`, column `j`; `None` when out of range.
    pub fn get(&self, i: usize, j: usize) -> Option<u8> {
        if i < self.rows() && j < self.n {
            self.entries.get(i * self.n + j).copied()
        } else {
            None
        }
    }
}

/// Validates `(n, c)` against the limits documented on this module.
pub(crate) fn check_params(n: usize, c: usize) -> Result<(), KeygenError> {
    let ok = (1..=MAX_SERVERS).contains(&n) && c < n && (n - c) + n <= 256;
    if ok {
        Ok(())
    } else {
        Err(KeygenError::InvalidParameters { n, c })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Determinant-free invertibility check: Gaussian elimination over GF(2^8).
    fn is_invertible(mut m: Vec<Vec<u8>>) -> bool {
        let k = m.len();
        for col in 0..k {
            let Some(p) = (col..k).find(|&r| m[r][col] != 0) else {
                return false;
            };
            m.swap(col, p);
            let ip = gf256::inv(m[col][col]).expect("pivot is nonzero");
            let pivot = m[col].clone();
            for (r, row) in m.iter_mut().enumerate() {
                if r != col && row[col] != 0 {
                    let f = gf256::mul(row[col], ip);
                    for (v, p) in row.iter_mut().zip(&pivot) {
                        *v ^= gf256::mul(f, *p);
                    }
                }
            }
        }
        true
    }

    /// All subsets of `0..n` of size `k`, as index vectors.
    fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
        (0u32..(1 << n))
            .filter(|mask| mask.count_ones() as usize == k)
            .map(|mask| (0..n).filter(|b| mask & (1 << b) != 0).collect())
            .collect()
    }

    #[test]
    fn every_square_submatrix_of_small_matrices_is_invertible() {
        for n in 1..=7 {
            for c in 0..n {
                let m = CauchyMatrix::new(n, c).expect("small params are valid");
                let rows = m.rows();
                for k in 1..=rows {
                    for rs in subsets(rows, k) {
                        for cs in subsets(n, k) {
                            let sub = rs
                                .iter()
                                .map(|&i| {
                                    cs.iter().map(|&j| m.get(i, j).expect("in range")).collect()
                                })
                                .collect();
                            assert!(is_invertible(sub), "n={n} c={c} rows={rs:?} cols={cs:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn known_entries() {
        // n=1, c=0: x0 = 0, y0 = 1, M = [1/1] = [1].
        let m = CauchyMatrix::new(1, 0).expect("valid");
        assert_eq!(m.get(0, 0), Some(1));
        // n=3, c=1: x = {0, 1}, y = {2, 3, 4}.
        let m = CauchyMatrix::new(3, 1).expect("valid");
        assert_eq!(m.get(0, 0), gf256::inv(2));
        assert_eq!(m.get(0, 2), gf256::inv(4));
        assert_eq!(m.get(1, 0), gf256::inv(3)); // 1 ^ 2
        assert_eq!(m.get(1, 1), gf256::inv(2)); // 1 ^ 3
        assert_eq!(m.get(1, 2), gf256::inv(5)); // 1 ^ 4
        assert_eq!(m.get(2, 0), None);
        // Frozen values (AES field): 1/2 = 0x8D, 1/3 = 0xF6, 1/4 = 0xCB, 1/5 = 0x52.
        assert_eq!(m.get(0, 0), Some(0x8D));
        assert_eq!(m.get(1, 0), Some(0xF6));
        assert_eq!(m.get(0, 2), Some(0xCB));
        assert_eq!(m.get(1, 2), Some(0x52));
    }

    #[test]
    fn parameter_limits() {
        assert!(CauchyMatrix::new(0, 0).is_err());
        assert!(CauchyMatrix::new(3, 3).is_err());
        assert!(CauchyMatrix::new(128, 0).is_ok());
        assert!(CauchyMatrix::new(129, 0).is_err());
        assert!(CauchyMatrix::new(128, 1).is_ok()); // 127 + 128 = 255
        assert!(CauchyMatrix::new(129, 2).is_ok()); // 127 + 129 = 256
        assert!(CauchyMatrix::new(255, 254).is_ok()); // 1 + 255 = 256
        assert!(CauchyMatrix::new(255, 253).is_err());
        assert!(CauchyMatrix::new(256, 255).is_err());
        // Every accepted combination builds with all entries nonzero.
        for n in 1..=255usize {
            // The smallest valid c gives the largest matrix for this n.
            let c = (2 * n).saturating_sub(256usize);
            let m = CauchyMatrix::new(n, c).expect("smallest c fits");
            assert!(m.entries.iter().all(|&e| e != 0));
            if c > 0 {
                assert!(CauchyMatrix::new(n, c - 1).is_err());
            }
        }
    }
}
