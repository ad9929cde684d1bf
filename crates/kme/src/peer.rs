//! The peer API: how one site's KME tells another which keys to regenerate and who may
//! fetch them, how it keeps ready keys at both ends of a link (`fill`, then `bind` when an
//! SAE asks, `reconcile` when a bind's outcome is in doubt), and how it withdraws keys when a
//! request fails.
//!
//! Only KME certificates of the cluster may call it. Every message carries a request ID
//! and the key IDs it concerns, so a retry after a timeout is harmless: `deliver` answers a
//! request it already completed with the same acknowledgement, and `destroy` of keys that
//! are already gone succeeds. A site acts on a message only for keys its caller originated
//! (their master is an SAE of the calling site) and for the caller's own pool; anything else
//! is refused with 403 and changes nothing.
//!
//! This file says what the sites tell each other: the messages and the [`Peer`] trait the
//! origin calls them through ([`PeerClient`] over mutual TLS). [`crate::inbox::PeerInbox`] is
//! what a receiving site does with them.

use dqkd_pki::Name;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use tokio::time::Instant;

mod https;
mod reconcile;

pub use https::PeerClient;
pub use reconcile::{
    ReadySlot, ReconcileAck, ReconcileRequest, MAX_RECONCILE_SLOTS, MAX_RECONCILE_WITHDRAWN,
};

/// Largest peer message an origin builds: far under what a peer accepts
/// ([`crate::api::MAX_PEER_BODY_BYTES`]), so no message is refused for its size, and small
/// enough that one message does not hold a link's bandwidth for long. Batches are bounded by
/// the bytes their message takes, not by a count of keys (a batch may pass it by the one
/// request that closes it).
pub const MAX_MESSAGE_BYTES: usize = 640 * 1024;

/// Most bytes of a message besides its grants and keys: the request ID, the field names,
/// the metadata's header with one range per entropy server, the replica name.
pub const MESSAGE_FIXED_BYTES: usize = 8 * 1024;

/// Most bytes one key adds to a [`DeliverRequest`]: its metadata entry in Base64 (16-byte ID,
/// size, offset and 16-byte tag: 60 characters) and its quoted ID in a grant (39).
pub const DELIVER_BYTES_PER_KEY: usize = 128;

/// Most bytes one key adds to a [`BindRequest`]: its quoted ID in a grant (39) and its pool
/// position (up to 20 digits and a comma).
pub const BIND_BYTES_PER_KEY: usize = 64;

/// Most bytes a [`Grant`] adds to a message besides its keys: the field names and the
/// quoted SAE names.
pub fn grant_bytes(master: &str, slaves: &[Name]) -> usize {
    48 + master.len() + slaves.iter().map(|s| s.len() + 3).sum::<usize>()
}

/// `POST /peer/v1/deliver`: regenerate a batch of keys and hold each for its SAEs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverRequest {
    /// Idempotency key of this message.
    pub request_id: Uuid,
    /// Regeneration metadata of the whole batch (`dqkd-keygen` encoding), standard Base64.
    pub metadata: String,
    /// Who may fetch which keys: every key of the metadata in exactly one grant.
    pub grants: Vec<Grant>,
}

/// The keys of one enc_keys request inside a batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The master SAE (an SAE of the calling site).
    pub master: Name,
    /// The SAEs of the receiving site that may fetch the keys, once each.
    pub slaves: Vec<Name>,
    /// The keys.
    pub key_ids: Vec<Uuid>,
}

/// Answer to [`DeliverRequest`]: the keys are durably stored at the receiving site.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliverAck {
    /// The request acknowledged.
    pub request_id: Uuid,
    /// How many keys are stored.
    pub stored: usize,
}

/// `POST /peer/v1/destroy`: shred these keys of the calling site's SAEs, whoever may fetch
/// them. 403, and nothing shredded, if any of them is another site's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestroyRequest {
    /// Idempotency key of this message.
    pub request_id: Uuid,
    /// The keys to shred.
    pub key_ids: Vec<Uuid>,
    /// Positions of ready keys to shred in the calling site's pool toward this site (a fill
    /// or bind that failed), so that no late bind can ever take them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ready: Vec<u64>,
    /// The replica of the calling site whose pool `ready` belongs to, when its replicas keep one
    /// pool each (`dqkd kme --replica`); absent for a site's only pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<Name>,
}

/// Answer to [`DestroyRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DestroyAck {
    /// How many of the keys still existed.
    pub destroyed: u64,
}

/// `POST /peer/v1/fill`: regenerate a batch of ready keys for the calling site's pool
/// toward this site. They belong to no SAE until a [`BindRequest`] names them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FillRequest {
    /// Idempotency key of this message.
    pub request_id: Uuid,
    /// Regeneration metadata of the batch (`dqkd-keygen` encoding, key IDs included),
    /// standard Base64.
    pub metadata: String,
    /// Unix seconds after which both sites shred the keys if still unbound.
    pub expires_at: u64,
    /// Pool position of the batch's first key; the others follow one by one, in the order
    /// of the metadata. Both sites file each key at the same position.
    pub first_seq: u64,
    /// The replica of the calling site whose pool this is, when its replicas keep one
    /// pool each (`dqkd kme --replica`); absent for a site's only pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<Name>,
}

/// Answer to [`FillRequest`]: the ready keys are durably stored at the receiving site.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FillAck {
    /// The request acknowledged.
    pub request_id: Uuid,
    /// How many ready keys are stored.
    pub stored: usize,
}

/// `POST /peer/v1/bind`: ready keys of the calling site's pool leave it for these SAEs.
/// Refused with 409 (and nothing changed) if any key is no longer ready here.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindRequest {
    /// Idempotency key of this message.
    pub request_id: Uuid,
    /// Who may fetch which ready keys: one grant per enc_keys request.
    pub grants: Vec<Grant>,
    /// The pool position of every key of the grants, in grant order.
    pub positions: Vec<u64>,
    /// The replica of the calling site whose pool this is, when its replicas keep one
    /// pool each (`dqkd kme --replica`); absent for a site's only pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<Name>,
}

/// Answer to [`BindRequest`]: the keys are durably held for their SAEs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BindAck {
    /// The request acknowledged.
    pub request_id: Uuid,
    /// How many keys are bound.
    pub bound: usize,
}

/// Why a peer call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// No answer in time, or no connection: the peer may or may not have acted.
    #[error("site {site:?} is unreachable: {reason}")]
    Unreachable {
        /// The peer's KME ID.
        site: String,
        /// What happened.
        reason: String,
    },
    /// The peer answered and refused.
    #[error("site {site:?} refused ({status}): {message}")]
    Refused {
        /// The peer's KME ID.
        site: String,
        /// HTTP status.
        status: StatusCode,
        /// Its message.
        message: String,
    },
}

/// Answer to a health check: the peer's KME is up and reachable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerHealth {
    /// `"ok"`.
    pub status: String,
    /// The answering KME's ID.
    pub kme_id: Name,
}

/// One peer site as the origin sees it. [`PeerClient`] speaks to it over mutual TLS; an
/// implementation that hands each message to another site's
/// [`PeerInbox`](crate::inbox::PeerInbox) in memory needs no network. Every call answers only
/// once the peer has acted durably, or fails with [`PeerError`]; a call that failed as
/// [`PeerError::Unreachable`] may still have acted.
#[async_trait::async_trait]
pub trait Peer: Send + Sync {
    /// The peer's KME ID.
    fn site(&self) -> &str;

    /// Has the peer regenerate and store a batch of keys for its SAEs, waiting at most until
    /// `deadline` (the latest deadline of the requests it serves).
    async fn deliver(
        &self,
        request: &DeliverRequest,
        deadline: Instant,
    ) -> Result<DeliverAck, PeerError>;

    /// Has the peer regenerate and store a batch of ready keys of this site's pool toward it.
    async fn fill(&self, request: &FillRequest) -> Result<FillAck, PeerError>;

    /// Binds ready keys to SAEs at the peer, waiting at most until `deadline`.
    async fn bind(&self, request: &BindRequest, deadline: Instant) -> Result<BindAck, PeerError>;

    /// Has the peer shred keys of a failed request.
    async fn destroy(&self, request: &DestroyRequest) -> Result<DestroyAck, PeerError>;

    /// Asks the peer which ready keys of this site's pool it still holds (see
    /// [`ReconcileRequest`]).
    async fn reconcile(&self, request: &ReconcileRequest) -> Result<ReconcileAck, PeerError>;

    /// Whether the peer answers at all.
    async fn health(&self) -> Result<PeerHealth, PeerError>;
}

#[cfg(test)]
mod tests {
    //! The byte bounds batches are cut by must hold for the largest messages a site can
    //! build: every key its own single-key request, SAE names of the longest allowed, the
    //! most entropy servers, the largest positions.

    use base64::Engine as _;
    use dqkd_keygen::metadata::{BatchMetadata, KeyEntry, RangeRef, VERSION};

    use super::*;

    const KEYS: usize = 1000;

    fn longest(tag: char) -> String {
        std::iter::repeat_n(tag, dqkd_pki::MAX_NAME_LEN).collect()
    }

    fn longest_name(tag: char) -> Name {
        Name::new("test name", longest(tag)).expect("a valid name")
    }

    /// One grant per key, each to the longest names, with two slaves.
    fn grants() -> Vec<Grant> {
        (0..KEYS)
            .map(|_| Grant {
                master: longest_name('m'),
                slaves: vec![longest_name('s'), longest_name('t')],
                key_ids: vec![Uuid::new_v4()],
            })
            .collect()
    }

    /// What the bounds allow for `grants` at `per_key` bytes a key.
    fn allowed(grants: &[Grant], per_key: usize) -> usize {
        MESSAGE_FIXED_BYTES
            + grants
                .iter()
                .map(|g| grant_bytes(&g.master, &g.slaves) + g.key_ids.len() * per_key)
                .sum::<usize>()
    }

    #[test]
    fn a_deliver_message_fits_its_bound() {
        let metadata = BatchMetadata {
            version: VERSION,
            n: 16,
            c: 5,
            ranges: (0..16_u8)
                .map(|i| RangeRef {
                    server_id: format!("{}{i:02}", &longest('e')[2..]),
                    pool_id: [0xff; 16],
                    offset: u64::MAX / 4,
                    len: u64::MAX / 4,
                })
                .collect(),
            expires_at_unix: u64::MAX,
            keys: (0..KEYS)
                .map(|i| KeyEntry {
                    key_id: *Uuid::new_v4().as_bytes(),
                    size_bits: 8192,
                    block_offset: i as u64 * 1024,
                    confirm: [0xff; 16],
                })
                .collect(),
        };
        let metadata = metadata
            .encode()
            .unwrap_or_else(|e| panic!("metadata: {e}"));
        let request = DeliverRequest {
            request_id: Uuid::new_v4(),
            metadata: base64::engine::general_purpose::STANDARD.encode(metadata),
            grants: grants(),
        };
        let size = serde_json::to_vec(&request).expect("serialises").len();
        let bound = allowed(&request.grants, DELIVER_BYTES_PER_KEY);
        assert!(size <= bound, "a deliver of {size} bytes, bound {bound}");
    }

    #[test]
    fn a_bind_message_fits_its_bound() {
        let request = BindRequest {
            request_id: Uuid::new_v4(),
            grants: grants(),
            positions: vec![u64::MAX; KEYS],
            replica: Some(longest_name('r')),
        };
        let size = serde_json::to_vec(&request).expect("serialises").len();
        let bound = allowed(&request.grants, BIND_BYTES_PER_KEY);
        assert!(size <= bound, "a bind of {size} bytes, bound {bound}");
    }

    /// Names travel as plain strings: a message from a site that predates [`Name`] parses,
    /// and this site's messages are byte for byte what such a site sends and expects.
    #[test]
    fn the_wire_format_is_unchanged() {
        let deliver = r#"{"request_id":"4b3c0f3e-8a51-4c36-9a53-0d2f8f1a2b3c","metadata":"AAEC","grants":[{"master":"alice","slaves":["bob","carol"],"key_ids":["9d7b6c1e-2f43-4a8e-8c1d-3e5f7a9b0c2d"]}]}"#;
        let parsed: DeliverRequest = serde_json::from_str(deliver).expect("old deliver");
        assert_eq!(parsed.grants[0].master, "alice");
        assert_eq!(serde_json::to_string(&parsed).expect("json"), deliver);

        let fill = r#"{"request_id":"4b3c0f3e-8a51-4c36-9a53-0d2f8f1a2b3c","metadata":"AAEC","expires_at":7,"first_seq":0,"replica":"kme-a.2"}"#;
        let parsed: FillRequest = serde_json::from_str(fill).expect("old fill");
        assert_eq!(serde_json::to_string(&parsed).expect("json"), fill);

        let health = r#"{"status":"ok","kme_id":"A"}"#;
        let parsed: PeerHealth = serde_json::from_str(health).expect("old health");
        assert_eq!(serde_json::to_string(&parsed).expect("json"), health);
    }
}
