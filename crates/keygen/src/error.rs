//! The crate's error type for extraction and parameter problems.
//!
//! Metadata decoding has its own, more detailed [`MetadataError`], nested here so a caller
//! that does both can use one `?`-friendly type.

use crate::metadata::MetadataError;

/// Everything that can go wrong in key extraction (and, nested, metadata handling).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeygenError {
    /// `n` and `c` do not describe a usable Cauchy matrix: we need `1 <= n <= 255`,
    /// `c < n`, and `n + (n - c) <= 256` distinct field elements.
    #[error("unsupported extraction parameters n={n}, c={c}")]
    InvalidParameters {
        /// Number of servers (blocks per key).
        n: usize,
        /// Number of servers tolerated to leak.
        c: usize,
    },
    /// The number of blocks or ranges passed does not equal `n`.
    #[error("expected {expected} blocks, got {got}")]
    BlockCount {
        /// `n` of the extractor.
        expected: usize,
        /// Number actually passed.
        got: usize,
    },
    /// A block or range has the wrong length for the requested key size.
    #[error("block {index} has {got} bytes, expected {expected}")]
    BlockLength {
        /// Index of the offending block.
        index: usize,
        /// Required length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// The output buffer has the wrong length.
    #[error("output buffer has {got} bytes, expected {expected}")]
    OutputLength {
        /// Required length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// A zero-length key was requested; it would carry no secret and is always a bug.
    #[error("key length must be at least one byte")]
    EmptyKey,
    /// A size computation overflowed `usize` (absurd key size or batch count).
    #[error("size overflow")]
    SizeOverflow,
    /// Metadata could not be encoded or decoded.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
}
