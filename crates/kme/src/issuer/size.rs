//! How big a batch may grow: its peer message is bounded in bytes
//! ([`peer::MAX_MESSAGE_BYTES`]), and whether the ready pool serves it depends on the link.

use super::{Job, Order};
use crate::peer;

/// Largest batch served from a ready pool on a near link. A pool saves a batch its
/// generation round trips, which matters for small batches; a large batch amortises
/// generation by itself, while a key from the pool costs each site's store three writes
/// (fill, bind, take) where a fresh one costs two. Measured on 2 cores at 64 connections:
/// 100-key requests ran at 172,474 keys/s through the pool and 193,892 on demand;
/// single-key requests (batches of up to 64) ran at 12,967 pairs/s through the pool and
/// 10,846 on demand; 10-key requests tied.
const POOL_MAX_BATCH_KEYS: usize = 64;

/// On a far link, a batch of any size that fits one `bind` message is served from the
/// ready pool: made on demand, it would add the entropy servers' round trip and the
/// regeneration at the peer to the peer's round trip.
pub(super) fn pool_serves(far: bool, jobs: &[Job], total: usize) -> bool {
    if far {
        message_bytes(jobs, peer::BIND_BYTES_PER_KEY) <= peer::MAX_MESSAGE_BYTES
    } else {
        total <= POOL_MAX_BATCH_KEYS
    }
}

/// Most bytes the peer message of `jobs` takes at `per_key` bytes a key.
pub(super) fn message_bytes(jobs: &[Job], per_key: usize) -> usize {
    peer::MESSAGE_FIXED_BYTES
        + jobs
            .iter()
            .map(|j| j.order.wire_bytes(per_key))
            .sum::<usize>()
}

impl Order {
    /// Most bytes this order adds to a peer message at `per_key` bytes a key: its keys and
    /// its grant to the peer site with the longest list of slaves.
    pub(super) fn wire_bytes(&self, per_key: usize) -> usize {
        let grant = self
            .remote
            .values()
            .map(|slaves| peer::grant_bytes(&self.master, slaves))
            .max()
            .unwrap_or(0);
        grant + self.count * per_key
    }
}
