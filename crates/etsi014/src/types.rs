//! The JSON data formats of ETSI GS QKD 014 section 6, with the standard's exact names.

use serde::{Deserialize, Serialize};

/// `Status` (section 6.1): what the caller may request for one master/slave pair.
#[allow(non_snake_case, missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub source_KME_ID: String,
    pub target_KME_ID: String,
    pub master_SAE_ID: String,
    pub slave_SAE_ID: String,
    /// Default key size in bits.
    pub key_size: u32,
    /// Keys ready to hand out for this pair now.
    pub stored_key_count: u64,
    pub max_key_count: u64,
    pub max_key_per_request: u32,
    /// Bits.
    pub max_key_size: u32,
    /// Bits.
    pub min_key_size: u32,
    pub max_SAE_ID_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_extension: Option<serde_json::Value>,
}

/// One key of a `Key container` (section 6.3). `key` is standard Base64 with padding.
///
/// The Base64 text is itself secret; callers should serialise the container straight into
/// a buffer they zeroise, and drop this value promptly.
#[allow(non_snake_case, missing_docs)]
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    pub key_ID: String,
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_ID_extension: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_extension: Option<serde_json::Value>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("key_ID", &self.key_ID)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        // The Base64 text is as secret as the key bytes: overwrite it before freeing.
        let mut bytes = std::mem::take(&mut self.key).into_bytes();
        bytes.iter_mut().for_each(|b| *b = 0);
        std::hint::black_box(&bytes);
    }
}

/// `Key container` (section 6.3). The standard's table spells the array `Keys`; its example
/// and every client in the field use `keys`, and so do we.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyContainer {
    pub keys: Vec<Key>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_container_extension: Option<serde_json::Value>,
}

/// One entry of `Key IDs` (section 6.4).
#[allow(non_snake_case, missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyIdRef {
    pub key_ID: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_ID_extension: Option<serde_json::Value>,
}

/// `Key IDs` (section 6.4), the dec_keys POST body.
#[allow(non_snake_case, missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyIds {
    pub key_IDs: Vec<KeyIdRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_IDs_extension: Option<serde_json::Value>,
}

/// `Error` (section 6.5): the body of every 400, 401 and 503 we send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable reason; for the cases the standard fixes, its exact text.
    pub message: String,
    /// Optional machine-readable details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<serde_json::Value>>,
}

impl ErrorBody {
    /// An error body with only a message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            details: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_uses_the_standard_names() {
        let status = Status {
            source_KME_ID: "A".into(),
            target_KME_ID: "B".into(),
            master_SAE_ID: "alice".into(),
            slave_SAE_ID: "bob".into(),
            key_size: 256,
            stored_key_count: 5,
            max_key_count: 10,
            max_key_per_request: 128,
            max_key_size: 1024,
            min_key_size: 64,
            max_SAE_ID_count: 2,
            status_extension: None,
        };
        let json = serde_json::to_value(&status).expect("serialise");
        for name in [
            "source_KME_ID",
            "target_KME_ID",
            "master_SAE_ID",
            "slave_SAE_ID",
            "key_size",
            "stored_key_count",
            "max_key_count",
            "max_key_per_request",
            "max_key_size",
            "min_key_size",
            "max_SAE_ID_count",
        ] {
            assert!(json.get(name).is_some(), "missing {name}");
        }
        assert!(json.get("status_extension").is_none());
    }

    #[test]
    fn key_debug_hides_material() {
        let key = Key {
            key_ID: "id".into(),
            key: "c2VjcmV0".into(),
            key_ID_extension: None,
            key_extension: None,
        };
        assert!(!format!("{key:?}").contains("c2VjcmV0"));
    }

    #[test]
    fn container_field_is_lower_case_keys() {
        let c = KeyContainer {
            keys: vec![],
            key_container_extension: None,
        };
        assert_eq!(
            serde_json::to_string(&c).expect("serialise"),
            r#"{"keys":[]}"#
        );
    }
}
