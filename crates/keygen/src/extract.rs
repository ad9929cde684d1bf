//! Key extraction: `n` server blocks in, one key out, by the fixed Cauchy matrix.
//!
//! For a key of `m` bytes each of the `n` blocks has `L = ceil(m / (n − c))` bytes. Byte
//! position `i < L` forms the column `x_i = (b_1[i], …, b_n[i])`; the output column is
//! `y_i = M · x_i` (`n − c` bytes, row 0 first). The key is the first `m` bytes of
//! `y_0 ‖ y_1 ‖ … ‖ y_{L−1}`. This byte order is frozen by the test vectors in
//! `tests/vectors/`.
//!
//! Each matrix entry gets a 256-byte multiplication table when the [`Extractor`] is built,
//! so extracting one output byte costs `n` table loads and XORs.

use crate::cauchy::{self, CauchyMatrix};
use crate::{gf256, KeygenError};

/// Block length `L = ceil(m / (n − c))` each server contributes for an `m`-byte key.
///
/// Exposed as a free function because the metadata codec needs it to check that every
/// key's block fits inside its ranges before any bytes are fetched.
pub fn block_len(key_bytes: usize, n: usize, c: usize) -> Result<usize, KeygenError> {
    cauchy::check_params(n, c)?;
    if key_bytes == 0 {
        return Err(KeygenError::EmptyKey);
    }
    Ok(key_bytes.div_ceil(n - c))
}

/// A precomputed extractor for fixed `(n, c)`; cheap to share (`&self` only) across keys.
#[derive(Clone)]
pub struct Extractor {
    matrix: CauchyMatrix,
    /// `tables[r * n + j][v] = M[r][j] * v`.
    tables: Vec<[u8; 256]>,
}

impl core::fmt::Debug for Extractor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // The tables are public data but 256 bytes each; print only the shape.
        f.debug_struct("Extractor")
            .field("n", &self.n())
            .field("c", &self.c())
            .finish_non_exhaustive()
    }
}

impl Extractor {
    /// Builds the matrix and its multiplication tables for `n` servers tolerating `c`
    /// leaks. See [`crate::cauchy`] for the accepted range.
    pub fn new(n: usize, c: usize) -> Result<Self, KeygenError> {
        let matrix = CauchyMatrix::new(n, c)?;
        let mut tables = Vec::with_capacity(matrix.rows() * n);
        for r in 0..matrix.rows() {
            for j in 0..n {
                let e = matrix
                    .get(r, j)
                    .ok_or(KeygenError::InvalidParameters { n, c })?;
                tables.push(gf256::mul_table(e));
            }
        }
        Ok(Self { matrix, tables })
    }

    /// Number of blocks per key (`n`).
    pub fn n(&self) -> usize {
        self.matrix.cols()
    }

    /// Number of blocks that may leak without affecting the key (`c`).
    pub fn c(&self) -> usize {
        self.matrix.tolerance()
    }

    /// The Cauchy matrix in use.
    pub fn matrix(&self) -> &CauchyMatrix {
        &self.matrix
    }

    /// Block length `L` for an `m`-byte key with this extractor's `(n, c)`.
    pub fn block_len(&self, key_bytes: usize) -> Result<usize, KeygenError> {
        block_len(key_bytes, self.n(), self.c())
    }

    /// Extracts one key of `out.len()` bytes from `n` blocks of exactly `L` bytes each.
    ///
    /// `blocks[j]` is the block from server `j` in the order the metadata lists the ranges.
    pub fn extract(&self, blocks: &[&[u8]], out: &mut [u8]) -> Result<(), KeygenError> {
        let l = self.block_len(out.len())?;
        self.check_inputs(blocks, l)?;
        self.extract_at(blocks, 0, l, out);
        Ok(())
    }

    /// Extracts `count` keys of `key_bytes` bytes each into `out` (`count * key_bytes`
    /// bytes, key `t` at `[t * key_bytes, (t + 1) * key_bytes)`).
    ///
    /// Each of the `n` `ranges` holds `count` consecutive blocks of `L` bytes and must be
    /// exactly `count * L` bytes long; key `t` uses bytes `[t * L, (t + 1) * L)` of every
    /// range. This is how one allocation per server serves a whole batch.
    pub fn extract_batch(
        &self,
        ranges: &[&[u8]],
        key_bytes: usize,
        count: usize,
        out: &mut [u8],
    ) -> Result<(), KeygenError> {
        let l = self.block_len(key_bytes)?;
        let range_len = l.checked_mul(count).ok_or(KeygenError::SizeOverflow)?;
        let out_len = key_bytes
            .checked_mul(count)
            .ok_or(KeygenError::SizeOverflow)?;
        self.check_inputs(ranges, range_len)?;
        if out.len() != out_len {
            return Err(KeygenError::OutputLength {
                expected: out_len,
                got: out.len(),
            });
        }
        if count == 0 {
            return Ok(());
        }
        let rows = self.matrix.rows();
        if key_bytes == l * rows {
            // Keys tile the output exactly: the batch is one long extraction.
            self.extract_at(ranges, 0, range_len, out);
        } else {
            for (t, key) in out.chunks_exact_mut(key_bytes).enumerate() {
                self.extract_at(ranges, t * l, l, key);
            }
        }
        Ok(())
    }

    fn check_inputs(&self, blocks: &[&[u8]], len: usize) -> Result<(), KeygenError> {
        if blocks.len() != self.n() {
            return Err(KeygenError::BlockCount {
                expected: self.n(),
                got: blocks.len(),
            });
        }
        for (index, b) in blocks.iter().enumerate() {
            if b.len() != len {
                return Err(KeygenError::BlockLength {
                    index,
                    expected: len,
                    got: b.len(),
                });
            }
        }
        Ok(())
    }

    /// Core loop: columns `offset .. offset + l` of `blocks` into `out`, where
    /// `out.len() <= l * rows` (the last column may be cut short).
    ///
    /// Callers have checked every length, so slicing cannot fail; the n = 3 fast path is the
    /// production default and avoids the inner loop over blocks.
    fn extract_at(&self, blocks: &[&[u8]], offset: usize, l: usize, out: &mut [u8]) {
        let rows = self.matrix.rows();
        let n = self.n();
        debug_assert!(out.len() <= l * rows && out.len() > (l - 1) * rows);
        if let ([b0, b1, b2], 2) = (blocks, rows) {
            let (t00, t01, t02) = (&self.tables[0], &self.tables[1], &self.tables[2]);
            let (t10, t11, t12) = (&self.tables[3], &self.tables[4], &self.tables[5]);
            let w0 = &b0[offset..offset + l];
            let w1 = &b1[offset..offset + l];
            let w2 = &b2[offset..offset + l];
            let mut pairs = out.chunks_exact_mut(2);
            let mut i = 0;
            for (pair, ((&x0, &x1), &x2)) in (&mut pairs).zip(w0.iter().zip(w1).zip(w2)) {
                let (x0, x1, x2) = (x0 as usize, x1 as usize, x2 as usize);
                pair[0] = t00[x0] ^ t01[x1] ^ t02[x2];
                pair[1] = t10[x0] ^ t11[x1] ^ t12[x2];
                i += 1;
            }
            if let [last] = pairs.into_remainder() {
                *last = t00[w0[i] as usize] ^ t01[w1[i] as usize] ^ t02[w2[i] as usize];
            }
            return;
        }
        for (i, col) in out.chunks_mut(rows).enumerate() {
            let pos = offset + i;
            for (r, o) in col.iter_mut().enumerate() {
                let tabs = &self.tables[r * n..(r + 1) * n];
                *o = tabs
                    .iter()
                    .zip(blocks)
                    .fold(0u8, |acc, (t, b)| acc ^ t[b[pos] as usize]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straight from the definition, with no tables: the reference the fast paths match.
    fn reference(n: usize, c: usize, blocks: &[&[u8]], m: usize) -> Vec<u8> {
        let mat = CauchyMatrix::new(n, c).expect("valid");
        let l = block_len(m, n, c).expect("valid");
        let mut y = Vec::new();
        for i in 0..l {
            for r in 0..mat.rows() {
                let mut acc = 0;
                for (j, b) in blocks.iter().enumerate() {
                    acc ^= gf256::mul(mat.get(r, j).expect("in range"), b[i]);
                }
                y.push(acc);
            }
        }
        y.truncate(m);
        y
    }

    fn pseudo_blocks(n: usize, len: usize, seed: u32) -> Vec<Vec<u8>> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                (0..len)
                    .map(|_| {
                        s ^= s << 13;
                        s ^= s >> 17;
                        s ^= s << 5;
                        (s >> 24) as u8
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn n1_c0_is_identity() {
        // M = [1 / (x0 + y0)] = [1 / (0 ^ 1)] = [1], so the key is the block itself.
        let e = Extractor::new(1, 0).expect("valid");
        let block = [0xDE, 0xAD, 0xBE, 0xEF];
        let mut out = [0u8; 4];
        e.extract(&[&block], &mut out).expect("lengths match");
        assert_eq!(out, block);
    }

    #[test]
    fn n2_c1_by_hand() {
        // x0 = 0, y = {1, 2}: M = [1/1, 1/2] = [0x01, 0x8D]. Key byte i = b0[i] ^ 0x8D*b1[i].
        let e = Extractor::new(2, 1).expect("valid");
        let mut out = [0u8; 2];
        e.extract(&[&[0x10, 0x00], &[0x02, 0x01]], &mut out)
            .expect("lengths match");
        // 0x8D * 0x02 = 0x01 (since 0x8D = 1/2); 0x8D * 0x01 = 0x8D.
        assert_eq!(out, [0x10 ^ 0x01, 0x8D]);
    }

    #[test]
    fn matches_reference_for_many_shapes() {
        for n in 1..=6 {
            for c in 0..n {
                let e = Extractor::new(n, c).expect("valid");
                for m in [1, 2, 3, 5, 16, 31, 32, 33] {
                    let l = e.block_len(m).expect("valid");
                    let blocks = pseudo_blocks(n, l, (n * 100 + c * 10 + m) as u32);
                    let refs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
                    let mut out = vec![0u8; m];
                    e.extract(&refs, &mut out).expect("lengths match");
                    assert_eq!(out, reference(n, c, &refs, m), "n={n} c={c} m={m}");
                }
            }
        }
    }

    #[test]
    fn batch_equals_single_keys() {
        for (n, c) in [(3, 1), (3, 0), (4, 2), (10, 1), (1, 0)] {
            let e = Extractor::new(n, c).expect("valid");
            for m in [1, 7, 16, 32, 33] {
                let count = 9;
                let l = e.block_len(m).expect("valid");
                let ranges = pseudo_blocks(n, l * count, (n + m) as u32);
                let refs: Vec<&[u8]> = ranges.iter().map(Vec::as_slice).collect();
                let mut out = vec![0u8; m * count];
                e.extract_batch(&refs, m, count, &mut out)
                    .expect("lengths match");
                for t in 0..count {
                    let blocks: Vec<&[u8]> = refs.iter().map(|r| &r[t * l..(t + 1) * l]).collect();
                    let mut key = vec![0u8; m];
                    e.extract(&blocks, &mut key).expect("lengths match");
                    assert_eq!(
                        &out[t * m..(t + 1) * m],
                        &key[..],
                        "n={n} c={c} m={m} t={t}"
                    );
                }
            }
        }
    }

    #[test]
    fn rejects_bad_inputs() {
        let e = Extractor::new(3, 1).expect("valid");
        let b = [0u8; 16];
        let mut out = [0u8; 32];
        assert_eq!(
            e.extract(&[&b, &b], &mut out),
            Err(KeygenError::BlockCount {
                expected: 3,
                got: 2
            })
        );
        assert_eq!(
            e.extract(&[&b, &b, &b[..15]], &mut out),
            Err(KeygenError::BlockLength {
                index: 2,
                expected: 16,
                got: 15
            })
        );
        assert_eq!(
            e.extract(&[&b, &b, &b], &mut []),
            Err(KeygenError::EmptyKey)
        );
        let mut small = [0u8; 31];
        assert_eq!(
            e.extract_batch(&[&b, &b, &b], 32, 1, &mut small),
            Err(KeygenError::OutputLength {
                expected: 32,
                got: 31
            })
        );
        assert_eq!(
            e.extract_batch(&[&b, &b, &b], 32, 2, &mut out),
            Err(KeygenError::BlockLength {
                index: 0,
                expected: 32,
                got: 16
            })
        );
        assert!(matches!(
            e.extract_batch(&[&b, &b, &b], usize::MAX, 3, &mut out),
            Err(KeygenError::SizeOverflow)
        ));
        assert!(Extractor::new(3, 3).is_err());
    }
}
