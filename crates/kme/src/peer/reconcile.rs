//! `POST /peer/v1/reconcile`: how the holder of a pool settles positions it is unsure of
//! with its peer instead of discarding them. After a bind left unanswered (its holder died,
//! or its answer was lost) or refused with 409, the holder cannot tell which of its ready keys
//! the peer still holds ready; the peer can, and says so.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Most slots one reconcile may name; a peer refuses a larger one with 400, so the holder
/// sends its positions in chunks of this many.
pub const MAX_RECONCILE_SLOTS: usize = 8_192;

/// Most request IDs one reconcile may withdraw.
pub const MAX_RECONCILE_WITHDRAWN: usize = 256;

/// Ready keys of the calling site's pool toward the receiving site that the caller holds
/// ready: the peer answers which it holds ready too. For those it does not, it destroys any
/// key with that ID held for the caller's SAEs (a bind the caller never completed stored
/// it), and it refuses the binds `withdrawn` names from now on, so a late copy of one cannot
/// bind a position the caller takes back. 403, and nothing changed, if a key it would
/// destroy is held for another site's SAE. Idempotent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileRequest {
    /// Names this message in logs (not an idempotency key: every copy is answered anew).
    pub request_id: Uuid,
    /// The slots in doubt, at most [`MAX_RECONCILE_SLOTS`].
    pub slots: Vec<ReadySlot>,
    /// Bind requests of the caller to refuse from now on, at most
    /// [`MAX_RECONCILE_WITHDRAWN`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub withdrawn: Vec<Uuid>,
    /// The replica of the calling site whose pool this is, when its replicas keep one
    /// pool each (`dqkd kme --replica`); absent for a site's only pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<dqkd_pki::Name>,
}

/// One ready key: its pool position and ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadySlot {
    /// Pool position.
    pub seq: u64,
    /// Key ID.
    pub key_id: Uuid,
}

/// Answer to [`ReconcileRequest`], given once the peer's destroys are durable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReconcileAck {
    /// The request answered.
    pub request_id: Uuid,
    /// Positions of the named slots the peer holds ready (same position, same ID, not
    /// expired); the caller may hand these out again.
    pub held: Vec<u64>,
    /// How many keys bound from the other slots the peer destroyed.
    pub destroyed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest reconcile the holder sends fits the byte bound of every peer message.
    #[test]
    fn a_full_reconcile_fits_a_message() {
        let request = ReconcileRequest {
            request_id: Uuid::new_v4(),
            slots: (0..MAX_RECONCILE_SLOTS)
                .map(|_| ReadySlot {
                    seq: u64::MAX,
                    key_id: Uuid::new_v4(),
                })
                .collect(),
            withdrawn: (0..MAX_RECONCILE_WITHDRAWN)
                .map(|_| Uuid::new_v4())
                .collect(),
            replica: Some(
                dqkd_pki::Name::new("replica", "r".repeat(dqkd_pki::MAX_NAME_LEN)).expect("name"),
            ),
        };
        let size = serde_json::to_vec(&request).expect("serialises").len();
        assert!(
            size <= super::super::MAX_MESSAGE_BYTES,
            "a reconcile of {size} bytes"
        );
    }
}
