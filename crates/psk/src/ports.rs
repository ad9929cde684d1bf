//! What the protocol needs from the world: keys from this end's KME, the link to the
//! other end, and a way to put a key in use. Tests supply in-process versions.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::key::{Psk, Slot};
use crate::PskError;

/// This end's KME, called as this end's SAE.
#[async_trait]
pub trait KeySource: Send + Sync {
    /// A new key shared with the peer SAE (`enc_keys`): its ID and bytes.
    async fn new_key(&self) -> Result<(String, Psk), PskError>;
    /// The key with `key_id` that the peer SAE made (`dec_keys`).
    async fn key_by_id(&self, key_id: &str) -> Result<Psk, PskError>;
}

/// The initiator's side of the link to the responder.
#[async_trait]
pub trait Link: Send + Sync {
    /// Sends `request` and returns the responder's answer.
    async fn exchange(&self, request: &Request) -> Result<Reply, PskError>;
}

/// Puts a key in use (WireGuard, a command).
#[async_trait]
pub trait Apply: Send + Sync {
    /// Makes `key` the one in use from now on.
    async fn apply(&self, slot: &Slot, key: &Psk) -> Result<(), PskError>;
}

/// The one message of the link, initiator to responder: what the initiator has in use,
/// and optionally the key it offers for an epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The key the initiator has in use (`None` before its first).
    pub current: Option<Slot>,
    /// A key for the responder to fetch and hold for its epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer: Option<Slot>,
}

/// The responder's answer: what it has in use after handling the request (an offer it
/// answers is held: fetched from its KME).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The key the responder has in use.
    pub current: Option<Slot>,
}
