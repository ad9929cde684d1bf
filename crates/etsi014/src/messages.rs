//! Error messages whose wording is fixed by ETSI GS QKD 014 (clients match on them).

/// A requested key size that is not a whole number of bytes.
pub const SIZE_NOT_MULTIPLE_OF_8: &str = "size shall be a multiple of 8";
/// `extension_mandatory` names an extension this KME does not know.
pub const EXTENSION_MANDATORY_UNSUPPORTED: &str =
    "not all extension_mandatory parameters are supported";
/// `extension_mandatory` names a known extension whose request cannot be met.
pub const EXTENSION_MANDATORY_UNMET: &str =
    "not all extension_mandatory request options could be met";
/// dec_keys asked for a key ID that is unknown, already delivered or expired.
pub const KEYS_NOT_FOUND: &str = "one or more keys specified are not found on KME";
