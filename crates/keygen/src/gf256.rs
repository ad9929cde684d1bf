//! Arithmetic in GF(2^8) with the AES reduction polynomial x^8 + x^4 + x^3 + x + 1 (0x11B).
//!
//! Both sites must compute bit-identical keys, so the field is fixed here once: the AES
//! polynomial, the usual bit order (bit 0 of a byte is the coefficient of x^0), and the
//! generator 0x03 for the log/exp tables. The tables are built at compile time by `const fn`,
//! so there is no lazy initialisation, no `unsafe`, and no runtime cost.
//!
//! Elements are plain `u8`. Addition and subtraction are both XOR.

/// The reduction polynomial x^8 + x^4 + x^3 + x + 1, written with its x^8 bit.
pub const POLY: u16 = 0x11B;

/// Multiplicative generator used to build the tables (0x03 = x + 1 generates the whole
/// multiplicative group for the AES polynomial; 0x02 does not).
const GENERATOR: u8 = 0x03;

/// `EXP[i] = g^i` for `i < 510`, doubled in length so `EXP[log a + log b]` needs no modulo.
static EXP: [u8; 512] = TABLES.0;
/// `LOG[a]` for `a != 0` is the `i < 255` with `g^i = a`; `LOG[0]` is unused (0).
static LOG: [u8; 256] = TABLES.1;

const TABLES: ([u8; 512], [u8; 256]) = build_tables();

/// Carry-less "Russian peasant" multiplication with reduction; slow but table-free, so it
/// can build the tables and cross-check them in tests.
pub const fn mul_slow(mut a: u8, mut b: u8) -> u8 {
    let mut p: u8 = 0;
    while b != 0 {
        if b & 1 != 0 {
            p ^= a;
        }
        let carry = a & 0x80 != 0;
        a <<= 1;
        if carry {
            // Reduce by the low byte of POLY; the x^8 term is the bit that fell off.
            a ^= (POLY & 0xFF) as u8;
        }
        b >>= 1;
    }
    p
}

const fn build_tables() -> ([u8; 512], [u8; 256]) {
    let mut exp = [0u8; 512];
    let mut log = [0u8; 256];
    let mut x: u8 = 1;
    let mut i = 0;
    while i < 255 {
        exp[i] = x;
        exp[i + 255] = x;
        log[x as usize] = i as u8;
        x = mul_slow(x, GENERATOR);
        i += 1;
    }
    // Indices 510 and 511 are never reached (max log sum is 254 + 254 = 508) but keep them
    // defined as the cycle continues.
    exp[510] = exp[0];
    exp[511] = exp[1];
    (exp, log)
}

/// Field addition (and subtraction): bitwise XOR.
#[inline]
pub const fn add(a: u8, b: u8) -> u8 {
    a ^ b
}

/// Field multiplication via log/exp tables.
#[inline]
pub fn mul(a: u8, b: u8) -> u8 {
    if a == 0 || b == 0 {
        return 0;
    }
    EXP[LOG[a as usize] as usize + LOG[b as usize] as usize]
}

/// Multiplicative inverse. Zero has no inverse, so `inv(0)` is `None`: callers must decide
/// what that means rather than silently getting 0.
#[inline]
pub fn inv(a: u8) -> Option<u8> {
    if a == 0 {
        return None;
    }
    Some(EXP[255 - LOG[a as usize] as usize])
}

/// Division `a / b`; `None` when `b == 0`.
#[inline]
pub fn div(a: u8, b: u8) -> Option<u8> {
    inv(b).map(|ib| mul(a, ib))
}

/// The 256-entry multiplication table of a fixed element `c`: `table[v] = c * v`.
///
/// Extraction multiplies by a few fixed matrix entries billions of times; a per-entry table
/// turns each product into one load.
pub fn mul_table(c: u8) -> [u8; 256] {
    let mut t = [0u8; 256];
    for (v, slot) in t.iter_mut().enumerate() {
        *slot = mul(c, v as u8);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_answers() {
        // FIPS-197 section 4.2 examples.
        assert_eq!(mul(0x57, 0x83), 0xC1);
        assert_eq!(mul(0x57, 0x13), 0xFE);
        assert_eq!(mul(0x57, 0x02), 0xAE);
        assert_eq!(mul(0x57, 0x04), 0x47);
        assert_eq!(mul(0x57, 0x08), 0x8E);
        assert_eq!(mul(0x57, 0x10), 0x07);
        assert_eq!(add(0x57, 0x83), 0xD4);
        // The inverse used in the AES S-box derivation.
        assert_eq!(inv(0x53), Some(0xCA));
        assert_eq!(inv(0x01), Some(0x01));
        assert_eq!(inv(0x00), None);
        assert_eq!(div(0xC1, 0x83), Some(0x57));
        assert_eq!(div(1, 0), None);
    }

    #[test]
    fn tables_match_slow_multiplication_exhaustively() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                assert_eq!(mul(a, b), mul_slow(a, b), "{a:#04x} * {b:#04x}");
            }
        }
    }

    #[test]
    fn generator_generates_everything() {
        let mut seen = [false; 256];
        for &e in &EXP[..255] {
            assert!(!seen[e as usize], "generator cycle shorter than 255");
            seen[e as usize] = true;
        }
        assert!(!seen[0]);
    }

    #[test]
    fn every_nonzero_element_has_an_inverse() {
        for a in 1..=255u8 {
            let ia = inv(a).expect("nonzero has an inverse");
            assert_eq!(mul(a, ia), 1);
        }
    }

    #[test]
    fn mul_table_matches_mul() {
        let t = mul_table(0x57);
        assert_eq!(t[0x83], 0xC1);
        assert_eq!(t[0], 0);
    }

    proptest! {
        #[test]
        fn field_axioms(a: u8, b: u8, c: u8) {
            prop_assert_eq!(add(a, b), add(b, a));
            prop_assert_eq!(mul(a, b), mul(b, a));
            prop_assert_eq!(add(add(a, b), c), add(a, add(b, c)));
            prop_assert_eq!(mul(mul(a, b), c), mul(a, mul(b, c)));
            prop_assert_eq!(mul(a, add(b, c)), add(mul(a, b), mul(a, c)));
            prop_assert_eq!(add(a, 0), a);
            prop_assert_eq!(mul(a, 1), a);
            prop_assert_eq!(add(a, a), 0);
            if a != 0 {
                prop_assert_eq!(mul(a, inv(a).expect("nonzero")), 1);
                prop_assert_eq!(div(mul(a, b), a), Some(b));
            }
        }
    }
}
