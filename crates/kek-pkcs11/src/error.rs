//! Why a token KEK could not be opened, generated or used; each names the token or key.

use std::path::PathBuf;

/// A failure of the token or of its configuration. Never carries the PIN or key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Pkcs11Error {
    /// The module (shared library) did not load or initialise.
    #[error("PKCS#11 module {}: {reason}", path.display())]
    Module {
        /// The module's path.
        path: PathBuf,
        /// What the loader or C_Initialize said.
        reason: String,
    },
    /// No slot holds a token of that label (unplugged, or another label).
    #[error(
        "no PKCS#11 token labelled {token:?} is present (tokens present: {}); refusing to start \
         without the key-encryption key",
        if present.is_empty() { "none".to_owned() } else { format!("{present:?}") }
    )]
    TokenMissing {
        /// The label asked for.
        token: String,
        /// The labels found.
        present: Vec<String>,
    },
    /// The token refused the user PIN.
    #[error("the PIN for PKCS#11 token {token:?} is wrong (check [store] pkcs11_pin or DQKD_PKCS11_PIN)")]
    WrongPin {
        /// The token's label.
        token: String,
    },
    /// The token locked the user PIN after too many wrong tries.
    #[error("the user PIN of PKCS#11 token {token:?} is locked; the token's security officer must reset it")]
    PinLocked {
        /// The token's label.
        token: String,
    },
    /// The token holds no secret key of that label.
    #[error(
        "{uri}: the token holds no such secret key (create one with dqkd pki kek --pkcs11 {uri})"
    )]
    ObjectMissing {
        /// The URI asked for.
        uri: String,
    },
    /// Generating would replace an existing key.
    #[error("{uri}: the token already holds a key of that label; keys sealed under it would become unreadable if it were replaced")]
    ObjectExists {
        /// The URI asked for.
        uri: String,
    },
    /// More than one secret key has that label.
    #[error("{uri}: {count} secret keys have that label; a KEK must be unique")]
    Ambiguous {
        /// The URI asked for.
        uri: String,
        /// How many matched.
        count: usize,
    },
    /// The key is extractable or not sensitive, so its bytes could leave the token.
    #[error("{uri}: the key is extractable or not sensitive; a KEK must never leave the token")]
    KeyExposed {
        /// The URI asked for.
        uri: String,
    },
    /// The token stopped answering for the key (removed, or its session gone).
    #[error("the token is gone ({context}: {reason})")]
    TokenLost {
        /// What was being done.
        context: String,
        /// The PKCS#11 return value.
        reason: String,
    },
    /// Any other PKCS#11 failure.
    #[error("{context}: {reason}")]
    Device {
        /// What was being done.
        context: String,
        /// What the module said.
        reason: String,
    },
}
