//! The values that cross the store boundary: key bytes and the keys going in and coming out.
//!
//! Key bytes live only in [`KeyMaterial`], which wipes them on drop and prints only its length,
//! so a stray `{:?}` or `tracing` field can never leak a key.

use std::fmt;

use uuid::Uuid;
use zeroize::Zeroizing;

/// Key bytes; zeroized on drop; `Debug` prints only the length.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyMaterial(Zeroizing<Vec<u8>>);

impl KeyMaterial {
    /// Takes ownership of `bytes`; they are wiped when the returned value is dropped.
    pub fn new(bytes: Vec<u8>) -> Self {
        KeyMaterial(Zeroizing::new(bytes))
    }

    /// The key bytes. Copy them only into other zeroizing buffers.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Length of the key in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the key has no bytes (never true for real keys).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyMaterial({} bytes)", self.0.len())
    }
}

/// A key to store for later delivery to its slave SAEs.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// Key ID (unique across the store).
    pub id: Uuid,
    /// SAE ID of the master that asked for the key (ETSI `enc_keys`).
    pub master: String,
    /// SAE IDs that may each fetch the key once (ETSI `dec_keys`).
    pub slaves: Vec<String>,
    /// The key bytes.
    pub material: KeyMaterial,
    /// Unix seconds after which the key can no longer be delivered and is shredded.
    pub expires_at: u64,
}

/// A key handed to a slave SAE.
#[derive(Debug, Clone)]
pub struct DeliveredKey {
    /// Key ID as requested.
    pub id: Uuid,
    /// The key bytes.
    pub material: KeyMaterial,
}

/// Where a ready key sits in the pool of its link: its position in fill order, which the
/// filling site chooses and both sites store, and its ID.
///
/// Pools are kept in position order, so taking the oldest ready keys and appending a refill
/// touch only the ends of the pool: a bind or a refill writes a few pages, however large the
/// pool grows, where random IDs would scatter it over the whole table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot {
    /// Position in the link's fill order (unique per link, increasing with each fill).
    pub seq: u64,
    /// Key ID, the same at both sites.
    pub id: Uuid,
}

/// A ready key: generated for the link between two sites and held at both of them before
/// any SAE is named, so that `enc_keys` needs only to bind it (see [`crate::KeyStore::pool_bind`]).
#[derive(Debug, Clone)]
pub struct PoolKey {
    /// Position and ID.
    pub slot: Slot,
    /// The key bytes.
    pub material: KeyMaterial,
    /// Unix seconds after which the key is never bound and may be shredded.
    pub expires_at: u64,
}

/// A ready key as a pool lists it: where it is and when it expires, never its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyKey {
    /// Position and ID.
    pub slot: Slot,
    /// Unix seconds after which the key is never bound.
    pub expires_at: u64,
}

/// Who may fetch ready keys once they leave a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolGrant {
    /// The keys, all from the same pool.
    pub slots: Vec<Slot>,
    /// The master SAE the keys are issued to.
    pub master: String,
    /// SAEs of this site that may fetch each key once. Empty: this site keeps no copy.
    pub slaves: Vec<String>,
    /// Unix seconds after which undelivered copies expire.
    pub expires_at: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_only_the_length() {
        let k = NewKey {
            id: Uuid::nil(),
            master: "a".into(),
            slaves: vec!["b".into()],
            material: KeyMaterial::new(vec![0xde, 0xad, 0xbe, 0xef]),
            expires_at: 0,
        };
        let text = format!("{k:?} {:?}", k.material);
        assert!(text.contains("KeyMaterial(4 bytes)"), "{text}");
        for needle in ["222", "173", "190", "239", "de", "ad", "be", "ef"] {
            assert!(!text.contains(&format!("[{needle}")), "{text}");
        }
    }
}

/// A cross-site request that this site has sent (or is about to send) to peer sites and has
/// not answered yet: what must be withdrawn at those sites if this process dies before it
/// answers. See [`crate::KeyStore::record_in_flight`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// The request ID of the peer messages (`deliver` or `bind`); unique per record.
    pub request_id: Uuid,
    /// The process of this site that sent it: its replica name, empty for a site run by one
    /// process. A process recovers only its own records, never those of a live sibling.
    pub owner: String,
    /// The peer sites the request goes to.
    pub sites: Vec<String>,
    /// Ordinary keys the peers may store (or bind) for it.
    pub key_ids: Vec<Uuid>,
    /// Positions of this site's ready keys toward the one site in `sites` that the request
    /// binds (empty for a `deliver`).
    pub ready: Vec<u64>,
}
