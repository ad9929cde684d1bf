//! The key in flight, and the name both ends give it.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::schedule::Epoch;
use crate::PskError;

/// Bytes of a WireGuard preshared key (and of every key the two ends ask for).
pub const PSK_LEN: usize = 32;

/// A key agreed for one epoch: its epoch and its KME key ID, never its bytes. This is all
/// that crosses the link between the two ends and all that is logged.
#[allow(non_snake_case)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// The epoch it is applied at.
    pub epoch: Epoch,
    /// The key ID both KMEs know it by.
    pub key_ID: String,
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "epoch {} key {}", self.epoch, self.key_ID)
    }
}

/// A preshared key: zeroised on drop, redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Psk(Zeroizing<[u8; PSK_LEN]>);

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Psk(<redacted>)")
    }
}

impl Psk {
    /// A key from its bytes.
    pub fn new(bytes: [u8; PSK_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Decodes the Base64 `key` of an ETSI 014 answer; it must be exactly 32 bytes, the
    /// size of a WireGuard preshared key.
    pub fn from_base64(text: &str) -> Result<Self, PskError> {
        let mut bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| PskError::BadKey("the KME's key is not Base64".into()))?,
        );
        if bytes.len() != PSK_LEN {
            let len = bytes.len();
            bytes.zeroize();
            return Err(PskError::BadKey(format!(
                "the KME's key has {len} bytes, a preshared key needs {PSK_LEN}"
            )));
        }
        let mut key = [0u8; PSK_LEN];
        key.copy_from_slice(&bytes);
        let psk = Self::new(key);
        key.zeroize();
        Ok(psk)
    }

    /// The Base64 form WireGuard reads (`wg set … preshared-key FILE`), with a newline.
    pub fn to_base64_line(&self) -> Zeroizing<String> {
        let mut text =
            Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.0.as_slice()));
        text.push('\n');
        text
    }

    /// The key bytes.
    pub fn bytes(&self) -> &[u8; PSK_LEN] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_32_byte_keys_are_accepted() {
        let key = Psk::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
        assert_eq!(key.bytes()[31], 31);
        assert_eq!(
            key.to_base64_line().as_str(),
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n"
        );
        assert!(Psk::from_base64("AAECAwQFBgcICQoLDA0ODw==").is_err());
        assert!(Psk::from_base64("not base64!").is_err());
    }

    #[test]
    fn keys_never_show_in_debug() {
        let key = Psk::new([7; PSK_LEN]);
        assert_eq!(format!("{key:?}"), "Psk(<redacted>)");
    }
}
