//! The window of one link: how many batches may be under way toward its peer sites.
//!
//! Two bounds, for two different costs. *Stage* slots bound the batches in their local,
//! CPU-bound stages (generation, the bind or deliver, the local commit): few, so that
//! requests arriving meanwhile queue and share the next batch, which is what makes a busy
//! loopback link fast. A *key* budget bounds the keys of all batches under way, which is
//! memory (and the keys a caller waits on), set by `[peers] max_in_flight_keys`.
//!
//! On a link whose round trip is longer than the local stages take (another site tens of
//! milliseconds away), a batch waiting for the peer's acknowledgement gives its stage slot
//! back: the next batch forms and leaves at once, so the batches in flight grow with the
//! bandwidth-delay product, up to the key budget, instead of four per round trip. There a
//! batch forms only once the one before it is waiting (it takes every stage slot), so that
//! under load batches grow rather than the messages each site must answer. Whether a
//! link is such a link is learnt from its acknowledgements: the shortest of the last 10 to
//! 20 s (a queue at the peer lengthens acknowledgements, never shortens them).
//!
//! Generation is the same kind of wait when the entropy servers are far: a batch spends
//! their round trip waiting for its allocations. It is learnt the same way, from how long
//! generations take, and a batch on a link whose entropy is far gives its slot back while
//! it waits for entropy, so the allocations of consecutive batches overlap.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::shortest::Shortest;

/// Batches of one link in their local stages at once: enough to overlap generation, the
/// peer's part and the commit of consecutive batches.
pub(super) const MAX_IN_FLIGHT: usize = 4;

/// The window of one link, shared by its batches.
pub(super) struct Window {
    stages: Arc<Semaphore>,
    keys: Arc<Semaphore>,
    ceiling: usize,
    ack: Mutex<Shortest>,
    entropy: Mutex<Shortest>,
}

/// What a batch holds while it is under way.
pub(super) struct Admission {
    stage: Option<OwnedSemaphorePermit>,
    _keys: OwnedSemaphorePermit,
}

impl Window {
    /// A window of [`MAX_IN_FLIGHT`] stage slots and `max_keys` keys in flight.
    pub(super) fn new(max_keys: usize) -> Self {
        let ceiling = max_keys.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            stages: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            keys: Arc::new(Semaphore::new(ceiling)),
            ceiling,
            ack: Mutex::new(Shortest::default()),
            entropy: Mutex::new(Shortest::default()),
        }
    }

    /// The key budget: also the most keys one batch gathers, so that a batch fits in it.
    pub(super) fn max_keys(&self) -> usize {
        self.ceiling
    }

    /// Waits for a stage slot (before a batch forms, so that requests queue meanwhile).
    ///
    /// On a far link a batch takes every slot: batches form one at a time, each as soon as
    /// the one before starts waiting (for the peer or for entropy) and gives its slots back.
    /// Messages in flight still grow with the round trip, but under load the requests that
    /// arrive during one batch's local stage all join the next, so batches grow with the
    /// load instead of the messages (each costing both sites a TLS request and a commit).
    pub(super) async fn stage(&self) -> Option<OwnedSemaphorePermit> {
        let slots = if self.network_bound() || self.entropy_bound() {
            MAX_IN_FLIGHT
        } else {
            1
        };
        self.stages
            .clone()
            .acquire_many_owned(slots as u32)
            .await
            .ok()
    }

    /// Waits until `keys` more keys fit in the budget (a batch larger than the whole budget
    /// waits for all of it), and returns the batch's slot.
    pub(super) async fn admit(
        &self,
        stage: OwnedSemaphorePermit,
        keys: usize,
    ) -> Option<Admission> {
        let wanted = u32::try_from(keys.clamp(1, self.ceiling)).unwrap_or(u32::MAX);
        let keys = self.keys.clone().acquire_many_owned(wanted).await.ok()?;
        Some(Admission {
            stage: Some(stage),
            _keys: keys,
        })
    }

    /// Called as a batch starts waiting for its peers: gives its stage slot back when the
    /// link's round trip is long, so the next batch need not wait for this acknowledgement.
    pub(super) fn awaiting_peer(&self, slot: &mut Admission) {
        if self.network_bound() {
            slot.stage = None;
        }
    }

    /// Called as a batch starts generating: gives its stage slot back when the link's
    /// entropy servers are far, so the next batch's allocations need not wait for these.
    pub(super) fn awaiting_entropy(&self, slot: &mut Admission) {
        if self.entropy_bound() {
            slot.stage = None;
        }
    }

    /// Records how long a peer took to acknowledge a batch.
    pub(super) fn acknowledged(&self, took: Duration) {
        lock(&self.ack).record(took);
    }

    /// Records how long a batch's generation took (entropy allocations and extraction).
    pub(super) fn generated(&self, took: Duration) {
        lock(&self.entropy).record(took);
    }

    /// Whether the link's shortest recent acknowledgement shows a long round trip. Unknown
    /// (fewer than 16 acknowledgements yet) counts as short: the batch keeps
    /// its slot, as on loopback.
    pub(super) fn network_bound(&self) -> bool {
        lock(&self.ack).far()
    }

    /// Whether the link's shortest recent generation shows far entropy servers; unknown
    /// counts as near, as for acknowledgements.
    pub(super) fn entropy_bound(&self) -> bool {
        lock(&self.entropy).far()
    }
}

fn lock(shortest: &Mutex<Shortest>) -> std::sync::MutexGuard<'_, Shortest> {
    shortest.lock().unwrap_or_else(PoisonError::into_inner)
}
