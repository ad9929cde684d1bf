//! ETSI GS QKD 014 V1.1.1 wire types and request validation.
//!
//! This crate is the single place that knows the standard's JSON names, its fixed error
//! messages and the validation rules dqkd applies (see `etsi014.md` in the design notes).
//! It performs no I/O: the KME feeds it request bytes and query strings and gets back
//! validated values or a [`ValidationError`] whose `Display` is the message sent to the
//! client.
//!
//! ```
//! use dqkd_etsi014::{parse_key_request, Limits};
//! let limits = Limits::default();
//! let req = parse_key_request(br#"{"number": 2, "size": 256}"#, &limits).unwrap();
//! assert_eq!((req.number, req.size_bits), (2, 256));
//! ```

#![forbid(unsafe_code)]

pub mod messages;
mod request;
mod types;

pub use request::{
    parse_dec_query, parse_enc_query, parse_key_ids, parse_key_request, KeyRequest, Limits,
    ValidationError, MAX_FIELD_NAME_CHARS, MAX_UNKNOWN_FIELDS,
};
pub use types::{ErrorBody, Key, KeyContainer, KeyIdRef, KeyIds, Status};
