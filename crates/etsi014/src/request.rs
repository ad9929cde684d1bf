//! Parsing and validation of enc_keys and dec_keys requests.
//!
//! Everything that can be checked without knowing the cluster happens here: types, ranges,
//! blanks, duplicates, limits. Checks that need the site's SAE list (unknown SAE, a slave
//! that repeats the master) belong to the KME.

use std::collections::HashSet;

use serde_json::{Map, Value};
use uuid::Uuid;

use crate::messages;

/// The limits a KME advertises in `status` and enforces on every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Size in bits used when a request names none.
    pub default_key_size: u32,
    /// Smallest key size in bits a request may ask for.
    pub min_key_size: u32,
    /// Largest key size in bits a request may ask for.
    pub max_key_size: u32,
    /// Most keys one request may ask for.
    pub max_key_per_request: u32,
    /// Most `additional_slave_SAE_IDs` one request may name.
    pub max_sae_id_count: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            default_key_size: 256,
            min_key_size: 64,
            max_key_size: 8192,
            max_key_per_request: 1024,
            max_sae_id_count: 8,
        }
    }
}

/// A validated enc_keys request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRequest {
    /// How many keys, `1..=max_key_per_request`.
    pub number: u32,
    /// Key size in bits, a multiple of 8 within `[min_key_size, max_key_size]`.
    pub size_bits: u32,
    /// Further slaves that receive the same keys: non-blank, distinct, at most
    /// `max_sae_id_count`.
    pub additional_slaves: Vec<String>,
    /// Names of body fields the standard does not define, which were ignored (a misspelt
    /// field otherwise changes the result silently). Names only, never values; at most
    /// [`MAX_UNKNOWN_FIELDS`], each cut to [`MAX_FIELD_NAME_CHARS`] characters.
    pub unknown_fields: Vec<String>,
}

/// The fields of a Key request, as the standard spells them.
const KEY_REQUEST_FIELDS: [&str; 5] = [
    "number",
    "size",
    "additional_slave_SAE_IDs",
    "extension_mandatory",
    "extension_optional",
];

/// Most unknown field names kept from one request: enough to find a misspelling, too few
/// for a client to fill a log line.
pub const MAX_UNKNOWN_FIELDS: usize = 8;

/// Longest unknown field name kept, in characters.
pub const MAX_FIELD_NAME_CHARS: usize = 64;

/// Why a request is refused; `Display` is the message sent in the 400 Error body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// The body is not JSON, or not a JSON object.
    #[error("request body is not a valid JSON object: {0}")]
    BadJson(String),
    /// A field has the wrong JSON type.
    #[error("{field} must be {expected}")]
    WrongType {
        /// The JSON field name.
        field: &'static str,
        /// What it should have been.
        expected: &'static str,
    },
    /// `number` outside `1..=max`.
    #[error("number must be between 1 and {max}")]
    NumberOutOfRange {
        /// `max_key_per_request`.
        max: u32,
    },
    /// `size` not a whole number of bytes (fixed message of the standard).
    #[error("{}", messages::SIZE_NOT_MULTIPLE_OF_8)]
    SizeNotMultipleOf8,
    /// `size` outside the KME's range.
    #[error("size must be between {min} and {max} bits")]
    SizeOutOfRange {
        /// `min_key_size`.
        min: u32,
        /// `max_key_size`.
        max: u32,
    },
    /// `additional_slave_SAE_IDs` present but empty.
    #[error("additional_slave_SAE_IDs must not be empty when present")]
    EmptyAdditionalSlaves,
    /// A blank SAE ID.
    #[error("SAE IDs must not be blank")]
    BlankSaeId,
    /// The same SAE twice in `additional_slave_SAE_IDs`.
    #[error("additional_slave_SAE_IDs contains {0:?} more than once")]
    DuplicateSaeId(String),
    /// More additional slaves than `max_SAE_ID_count`.
    #[error("additional_slave_SAE_IDs names {count} SAEs, more than max_SAE_ID_count {max}")]
    TooManySaeIds {
        /// How many were named.
        count: usize,
        /// `max_SAE_ID_count`.
        max: u32,
    },
    /// `extension_mandatory` asks for something we do not support (fixed message).
    #[error("{}", messages::EXTENSION_MANDATORY_UNSUPPORTED)]
    MandatoryExtensionUnsupported,
    /// A query string that is not well-formed percent-encoded UTF-8.
    #[error("malformed query component {0:?}")]
    BadQuery(String),
    /// A query parameter the method does not define.
    #[error("unsupported query parameter {0:?}")]
    UnknownQueryParameter(String),
    /// A query parameter given twice.
    #[error("query parameter {0:?} given more than once")]
    RepeatedQueryParameter(String),
    /// A required query parameter or field is missing.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A key ID that is not a UUID.
    #[error("key_ID {0:?} is not a UUID")]
    BadKeyId(String),
    /// dec_keys with an empty `key_IDs` array.
    #[error("key_IDs must name at least one key")]
    NoKeyIds,
    /// The same key ID twice in one dec_keys request.
    #[error("key_ID {0} is named more than once")]
    DuplicateKeyId(Uuid),
    /// More key IDs than one request may carry.
    #[error("key_IDs names {count} keys, more than the limit of {max}")]
    TooManyKeyIds {
        /// How many were named.
        count: usize,
        /// The limit (`max_key_per_request`).
        max: u32,
    },
}

/// Parses an enc_keys POST body. A zero-length body means `{}` (all defaults).
pub fn parse_key_request(body: &[u8], limits: &Limits) -> Result<KeyRequest, ValidationError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return validate_number_size(None, None, Vec::new(), limits);
    }
    let object = parse_object(body)?;
    let number = match object.get("number") {
        None | Some(Value::Null) => None,
        Some(v) => Some(json_positive_int(v, "number")?),
    };
    let size = match object.get("size") {
        None | Some(Value::Null) => None,
        Some(v) => Some(json_positive_int(v, "size")?),
    };
    let additional = match object.get("additional_slave_SAE_IDs") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => parse_additional_slaves(v, limits)?,
    };
    match object.get("extension_mandatory") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            if !items.iter().all(Value::is_object) {
                return Err(ValidationError::WrongType {
                    field: "extension_mandatory",
                    expected: "an array of objects",
                });
            }
            // We implement no extensions: any non-empty object is unsupported.
            if items
                .iter()
                .any(|item| item.as_object().is_some_and(|o| !o.is_empty()))
            {
                return Err(ValidationError::MandatoryExtensionUnsupported);
            }
        }
        Some(_) => {
            return Err(ValidationError::WrongType {
                field: "extension_mandatory",
                expected: "an array of objects",
            })
        }
    }
    match object.get("extension_optional") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) if items.iter().all(Value::is_object) => {}
        Some(_) => {
            return Err(ValidationError::WrongType {
                field: "extension_optional",
                expected: "an array of objects",
            })
        }
    }
    let mut request = validate_number_size(number, size, additional, limits)?;
    request.unknown_fields = unknown_fields(&object);
    Ok(request)
}

/// The names in `object` that are not Key request fields, bounded in number and length.
fn unknown_fields(object: &Map<String, Value>) -> Vec<String> {
    object
        .keys()
        .filter(|name| !KEY_REQUEST_FIELDS.contains(&name.as_str()))
        .take(MAX_UNKNOWN_FIELDS)
        .map(|name| name.chars().take(MAX_FIELD_NAME_CHARS).collect())
        .collect()
}

/// Parses the query string of an enc_keys GET (`number` and `size` only).
pub fn parse_enc_query(
    query: Option<&str>,
    limits: &Limits,
) -> Result<KeyRequest, ValidationError> {
    let mut number = None;
    let mut size = None;
    for (name, value) in query_pairs(query.unwrap_or(""))? {
        let slot = match name.as_str() {
            "number" => &mut number,
            "size" => &mut size,
            _ => return Err(ValidationError::UnknownQueryParameter(name)),
        };
        if slot.is_some() {
            return Err(ValidationError::RepeatedQueryParameter(name));
        }
        let field = if name == "number" { "number" } else { "size" };
        *slot = Some(text_positive_int(&value, field)?);
    }
    validate_number_size(number, size, Vec::new(), limits)
}

/// Parses a dec_keys POST body (`Key IDs`). `max` bounds how many IDs one call may name.
pub fn parse_key_ids(body: &[u8], max: u32) -> Result<Vec<Uuid>, ValidationError> {
    // The common body, `{"key_IDs":[{"key_ID":"…"},…]}`, is read straight into borrowed
    // strings; anything else (extensions, escapes, wrong types, bad JSON) takes the general
    // path, which alone words the errors, so both paths answer every body alike.
    match plain::key_ids(body) {
        Some(entries) => collect_key_ids(entries.iter().map(|e| e.0), max),
        None => parse_key_ids_general(body, max),
    }
}

/// [`parse_key_ids`] through a `serde_json::Value`: accepts and refuses every body.
fn parse_key_ids_general(body: &[u8], max: u32) -> Result<Vec<Uuid>, ValidationError> {
    let object = parse_object(body)?;
    let entries = match object.get("key_IDs") {
        None | Some(Value::Null) => return Err(ValidationError::Missing("key_IDs")),
        Some(Value::Array(entries)) => entries,
        Some(_) => return Err(KEY_IDS_WRONG_TYPE),
    };
    collect_key_ids(
        entries.iter().map(|entry| {
            entry
                .as_object()
                .and_then(|o| o.get("key_ID"))
                .and_then(Value::as_str)
        }),
        max,
    )
}

const KEY_IDS_WRONG_TYPE: ValidationError = ValidationError::WrongType {
    field: "key_IDs",
    expected: "an array of objects with a key_ID string",
};

/// Checks the `key_ID` of each entry (`None`: the entry is not an object with a `key_ID`
/// string) in order: count, type, UUID form, repeats.
fn collect_key_ids<'a>(
    entries: impl ExactSizeIterator<Item = Option<&'a str>>,
    max: u32,
) -> Result<Vec<Uuid>, ValidationError> {
    if entries.len() == 0 {
        return Err(ValidationError::NoKeyIds);
    }
    if entries.len() > max as usize {
        return Err(ValidationError::TooManyKeyIds {
            count: entries.len(),
            max,
        });
    }
    let mut ids = Vec::with_capacity(entries.len());
    let mut seen = HashSet::with_capacity(entries.len());
    for text in entries {
        let id = parse_uuid(text.ok_or(KEY_IDS_WRONG_TYPE)?)?;
        if !seen.insert(id) {
            return Err(ValidationError::DuplicateKeyId(id));
        }
        ids.push(id);
    }
    Ok(ids)
}

/// The fast path of [`parse_key_ids`]: only bodies whose every part it understands.
mod plain {
    use std::fmt;

    use serde::de::{Deserializer, MapAccess, Visitor};
    use serde::Deserialize;

    /// The body, from a JSON object only (a derived struct would also take an array).
    struct Body<'a>(Vec<Entry<'a>>);

    /// One entry's `key_ID` (`None` when it has none), from a JSON object only.
    pub(super) struct Entry<'a>(pub Option<&'a str>);

    /// The entries of a body that is an object holding a `key_IDs` array of objects, each
    /// with at most string members; `None` for anything else.
    pub(super) fn key_ids(body: &[u8]) -> Option<Vec<Entry<'_>>> {
        serde_json::from_slice::<Body<'_>>(body).ok().map(|b| b.0)
    }

    impl<'de> Deserialize<'de> for Body<'de> {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_map(BodyVisitor)
        }
    }

    struct BodyVisitor;

    impl<'de> Visitor<'de> for BodyVisitor {
        type Value = Body<'de>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a Key IDs object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut entries = None;
            while let Some(name) = map.next_key::<&'de str>()? {
                if name == "key_IDs" {
                    if entries.is_some() {
                        // The general path keeps the last; leave such bodies to it.
                        return Err(serde::de::Error::custom("key_IDs given twice"));
                    }
                    entries = Some(map.next_value::<Vec<Entry<'de>>>()?);
                } else {
                    // Read as the general path reads it, so a member it refuses (a number out
                    // of range, say) is refused here too.
                    map.next_value::<serde_json::Value>()?;
                }
            }
            entries
                .map(Body)
                .ok_or_else(|| serde::de::Error::custom("no key_IDs"))
        }
    }

    impl<'de> Deserialize<'de> for Entry<'de> {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_map(EntryVisitor)
        }
    }

    struct EntryVisitor;

    impl<'de> Visitor<'de> for EntryVisitor {
        type Value = Entry<'de>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a key ID object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut id = None;
            while let Some(name) = map.next_key::<&'de str>()? {
                // Every member a plain string: an extension object goes the general way.
                let value = map.next_value::<&'de str>()?;
                if name == "key_ID" {
                    id = Some(value);
                }
            }
            Ok(Entry(id))
        }
    }
}

/// Parses the query string of a dec_keys GET: exactly one `key_ID`.
pub fn parse_dec_query(query: Option<&str>) -> Result<Uuid, ValidationError> {
    let mut key_id = None;
    for (name, value) in query_pairs(query.unwrap_or(""))? {
        if name != "key_ID" {
            return Err(ValidationError::UnknownQueryParameter(name));
        }
        if key_id.is_some() {
            return Err(ValidationError::RepeatedQueryParameter(name));
        }
        key_id = Some(parse_uuid(&value)?);
    }
    key_id.ok_or(ValidationError::Missing("key_ID"))
}

fn parse_uuid(text: &str) -> Result<Uuid, ValidationError> {
    // Only the hyphenated 36-character form that ETSI examples and clients use; the uuid
    // crate also accepts braces and URNs, which are not key IDs.
    if text.len() != 36 {
        return Err(ValidationError::BadKeyId(text.to_owned()));
    }
    Uuid::try_parse(text).map_err(|_| ValidationError::BadKeyId(text.to_owned()))
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ValidationError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ValidationError::BadJson("expected an object".into())),
        Err(e) => Err(ValidationError::BadJson(e.to_string())),
    }
}

fn parse_additional_slaves(value: &Value, limits: &Limits) -> Result<Vec<String>, ValidationError> {
    let wrong = ValidationError::WrongType {
        field: "additional_slave_SAE_IDs",
        expected: "an array of strings",
    };
    let items = value.as_array().ok_or_else(|| wrong.clone())?;
    if items.is_empty() {
        return Err(ValidationError::EmptyAdditionalSlaves);
    }
    if items.len() > limits.max_sae_id_count as usize {
        return Err(ValidationError::TooManySaeIds {
            count: items.len(),
            max: limits.max_sae_id_count,
        });
    }
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let id = item.as_str().ok_or_else(|| wrong.clone())?;
        if id.trim().is_empty() {
            return Err(ValidationError::BlankSaeId);
        }
        if out.iter().any(|seen| seen == id) {
            return Err(ValidationError::DuplicateSaeId(id.to_owned()));
        }
        out.push(id.to_owned());
    }
    Ok(out)
}

fn validate_number_size(
    number: Option<u64>,
    size: Option<u64>,
    additional_slaves: Vec<String>,
    limits: &Limits,
) -> Result<KeyRequest, ValidationError> {
    let number = number.unwrap_or(1);
    if number == 0 || number > u64::from(limits.max_key_per_request) {
        return Err(ValidationError::NumberOutOfRange {
            max: limits.max_key_per_request,
        });
    }
    let size = size.unwrap_or(u64::from(limits.default_key_size));
    if !size.is_multiple_of(8) {
        return Err(ValidationError::SizeNotMultipleOf8);
    }
    if size < u64::from(limits.min_key_size) || size > u64::from(limits.max_key_size) {
        return Err(ValidationError::SizeOutOfRange {
            min: limits.min_key_size,
            max: limits.max_key_size,
        });
    }
    Ok(KeyRequest {
        // Both fit: they were checked against u32 limits above.
        number: number as u32,
        size_bits: size as u32,
        additional_slaves,
        unknown_fields: Vec::new(),
    })
}

/// A JSON integer ≥ 1; zero is let through to the range check so it gets that message.
fn json_positive_int(value: &Value, field: &'static str) -> Result<u64, ValidationError> {
    let wrong = ValidationError::WrongType {
        field,
        expected: "a positive integer",
    };
    match value {
        Value::Number(n) => n.as_u64().ok_or(wrong),
        _ => Err(wrong),
    }
}

fn text_positive_int(text: &str, field: &'static str) -> Result<u64, ValidationError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ValidationError::WrongType {
            field,
            expected: "a positive integer",
        });
    }
    // Digits only: a parse failure can only be overflow, which is out of range anyway.
    Ok(text.parse::<u64>().unwrap_or(u64::MAX))
}

/// Splits `a=1&b=2`, percent-decoding names and values.
fn query_pairs(query: &str) -> Result<Vec<(String, String)>, ValidationError> {
    let mut pairs = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = part.split_once('=').unwrap_or((part, ""));
        pairs.push((percent_decode(name)?, percent_decode(value)?));
    }
    Ok(pairs)
}

fn percent_decode(text: &str) -> Result<String, ValidationError> {
    let bad = || ValidationError::BadQuery(text.to_owned());
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or_else(bad)?;
                let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests;
