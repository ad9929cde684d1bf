//! Peer `reconcile`: the holder of a pool toward this site asks which of its ready keys this
//! site still holds ready, so that it keeps those and drops only the others.

use std::collections::{BTreeMap, HashSet};

use dqkd_store::TakeError;
use uuid::Uuid;

use super::{Outcome, PeerInbox, VerifiedKme};
use crate::peer::{ReconcileAck, ReconcileRequest, MAX_RECONCILE_SLOTS, MAX_RECONCILE_WITHDRAWN};
use crate::scope::PeerScope;
use crate::ApiError;

/// Ready keys read per store call while looking positions up.
const PAGE: usize = 4_096;

impl PeerInbox {
    /// Peer `reconcile`: answers which named slots of the caller's pool are still ready here;
    /// destroys keys bound from the others (held for the caller's SAEs only: 403 and nothing
    /// changed otherwise), and refuses the withdrawn binds from now on. Idempotent.
    pub async fn peer_reconcile(
        &self,
        peer: &VerifiedKme,
        request: ReconcileRequest,
    ) -> Result<ReconcileAck, ApiError> {
        if request.slots.len() > MAX_RECONCILE_SLOTS
            || request.withdrawn.len() > MAX_RECONCILE_WITHDRAWN
        {
            return Err(ApiError::BadRequest(format!(
                "a reconcile names at most {MAX_RECONCILE_SLOTS} slots and \
                 {MAX_RECONCILE_WITHDRAWN} withdrawn requests"
            )));
        }
        let scope = PeerScope::new(peer, &self.config);
        let link = scope.pool(request.replica.as_ref());
        // Marked before anything is read, as a destroy marks: a withdrawn bind still in
        // flight either sees the mark after its commit (and undoes itself) or committed
        // before the positions are read below (and its keys are destroyed here).
        let before: Vec<(Uuid, Option<Outcome>)> = request
            .withdrawn
            .iter()
            .map(|&id| (id, self.remember(peer, id, Outcome::Withdrawn)))
            .collect();
        let undo = || {
            for (id, outcome) in before.iter().rev() {
                self.restore(peer, *id, *outcome);
            }
        };
        let held = match self.held(&link, &request).await {
            Ok(held) => held,
            Err(e) => {
                undo();
                return Err(e);
            }
        };
        let gone: Vec<Uuid> = request
            .slots
            .iter()
            .filter(|s| !held.contains(&s.seq))
            .map(|s| s.key_id)
            .collect();
        let result = self.store.destroy_of(&scope.masters(), &gone).await;
        if matches!(result, Err(TakeError::Unauthorized)) {
            undo();
        }
        let destroyed = scope.destroyed("reconcile", request.request_id, gone.len(), result)?;
        tracing::info!(
            target: "dqkd::audit",
            event = "ready_keys_reconciled",
            peer = peer.id(),
            request_id = %request.request_id,
            named = request.slots.len(),
            held = held.len(),
            destroyed,
            withdrawn = ?request.withdrawn,
            key_ids = ?gone,
        );
        let mut held: Vec<u64> = held.into_iter().collect();
        held.sort_unstable();
        Ok(ReconcileAck {
            request_id: request.request_id,
            held,
            destroyed,
        })
    }

    /// The named positions of pool `link` that hold the named key, unexpired: the pool is
    /// read in position order from the lowest named position to the highest.
    async fn held(&self, link: &str, request: &ReconcileRequest) -> Result<HashSet<u64>, ApiError> {
        let wanted: BTreeMap<u64, Uuid> = request.slots.iter().map(|s| (s.seq, s.key_id)).collect();
        let mut held = HashSet::new();
        let (Some((&first, _)), Some((&last, _))) =
            (wanted.first_key_value(), wanted.last_key_value())
        else {
            return Ok(held);
        };
        let now = self.config.clock.unix_now();
        let mut after = first.checked_sub(1);
        loop {
            let page = self.store.pool_page(link, after, PAGE).await?;
            for key in &page {
                if key.slot.seq > last {
                    return Ok(held);
                }
                if wanted.get(&key.slot.seq) == Some(&key.slot.id) && key.expires_at > now {
                    held.insert(key.slot.seq);
                }
            }
            match page.last() {
                Some(key) if page.len() == PAGE => after = Some(key.slot.seq),
                _ => return Ok(held),
            }
        }
    }
}
