//! Settling ready keys whose state is in doubt with the peer instead of discarding them: the
//! positions of a bind left unanswered (its holder died, or restarted) and a pool the peer
//! refused a bind from (409). The peer says which it still holds ready; those go back into
//! the pool, the others leave it at both sites. Only when the peer cannot be reached in
//! time are they withdrawn at both sites, as a failed bind's are.

use std::collections::HashSet;

use crate::peer::{ReadySlot, ReconcileRequest, MAX_RECONCILE_SLOTS};

use super::outbound::{remove_ready_here, withdraw, REMOVE_CHUNK};
use super::*;

/// How long a holder keeps asking an unreachable peer before it withdraws the positions in
/// doubt at both sites instead, in multiples of `peers.timeout_ms`.
const PATIENCE_TIMEOUTS: u32 = 5;

/// Asks `site` which of `slots` (of this process's pool toward it) it holds ready, in
/// chunks, each withdrawing the binds `withdrawn`; an unreachable peer is asked again until
/// [`PATIENCE_TIMEOUTS`] have passed. Returns the positions held.
pub(super) async fn held_by_peer(
    shared: &Shared,
    site: &str,
    slots: &[Slot],
    withdrawn: &[Uuid],
) -> Result<HashSet<u64>, PeerError> {
    let Some(client) = shared.peers.get(site) else {
        return Err(PeerError::Unreachable {
            site: site.to_owned(),
            reason: "no peer address".into(),
        });
    };
    let give_up = tokio::time::Instant::now() + shared.config.peer_timeout * PATIENCE_TIMEOUTS;
    let mut held = HashSet::new();
    for chunk in slots.chunks(MAX_RECONCILE_SLOTS) {
        let request = ReconcileRequest {
            request_id: Uuid::new_v4(),
            slots: chunk
                .iter()
                .map(|s| ReadySlot {
                    seq: s.seq,
                    key_id: s.id,
                })
                .collect(),
            withdrawn: withdrawn.to_vec(),
            replica: shared.config.replica.clone(),
        };
        let mut wait = Duration::from_millis(200);
        let ack = loop {
            match client.reconcile(&request).await {
                Ok(ack) => break ack,
                Err(e @ PeerError::Unreachable { .. })
                    if tokio::time::Instant::now() + wait < give_up =>
                {
                    tracing::debug!(site, error = %e, "settling ready keys failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        };
        // Only positions of this chunk count, whatever else the answer names.
        let named: HashSet<u64> = chunk.iter().map(|s| s.seq).collect();
        held.extend(ack.held.into_iter().filter(|seq| named.contains(seq)));
    }
    Ok(held)
}

/// Settles the positions of bind `record` toward `site`, left unanswered: the bind is
/// withdrawn at the peer (keys it stored there are destroyed, a late copy is refused),
/// positions the peer still holds ready are ready here again, the others are removed here;
/// then the record is forgotten. `Ok(false)` when the peer could not be asked: the caller
/// withdraws the record at both sites instead.
pub(super) async fn settle_unanswered_bind(
    shared: &Shared,
    site: &str,
    record: &InFlight,
) -> Result<bool, StoreError> {
    let slots: Vec<Slot> = record
        .ready
        .iter()
        .zip(&record.key_ids)
        .map(|(&seq, &id)| Slot { seq, id })
        .collect();
    let held = match held_by_peer(shared, site, &slots, &[record.request_id]).await {
        Ok(held) => held,
        Err(e) => {
            tracing::warn!(site, request_id = %record.request_id, error = %e, "could not settle an unanswered bind with the peer; withdrawing its keys at both sites");
            return Ok(false);
        }
    };
    let (kept, gone): (Vec<u64>, Vec<u64>) =
        record.ready.iter().partition(|seq| held.contains(seq));
    let name = crate::pools::link_name(&shared.config.kme_id, site, shared.config.replica.as_ref());
    shared.store.pool_remove(&name, &gone).await?;
    shared
        .pools
        .settle(
            site,
            shared.store.as_ref(),
            &kept,
            shared.store.forget_in_flight(&[record.request_id]),
        )
        .await?;
    tracing::info!(
        target: "dqkd::audit",
        event = "unanswered_bind_settled",
        site,
        request_id = %record.request_id,
        ready_again = kept.len(),
        removed = gone.len(),
        "settled the ready keys of a bind left unanswered with the peer"
    );
    Ok(true)
}

/// Settles ready keys of the pool toward `site` taken out after the peer refused a bind
/// (409): those the peer holds go back into the pool, the others are removed at both sites.
/// If the peer cannot be asked, all of them are withdrawn at both sites.
pub(super) async fn settle_pool(shared: Arc<Shared>, site: String, slots: Vec<Slot>) {
    let name =
        crate::pools::link_name(&shared.config.kme_id, &site, shared.config.replica.as_ref());
    let held = match held_by_peer(&shared, &site, &slots, &[]).await {
        Ok(held) => held,
        Err(e) => {
            tracing::warn!(site, count = slots.len(), error = %e, "could not settle ready keys with the peer; discarding them at both sites");
            let seqs: Vec<u64> = slots.iter().map(|s| s.seq).collect();
            for chunk in seqs.chunks(REMOVE_CHUNK) {
                withdraw(
                    &shared,
                    Uuid::new_v4(),
                    std::slice::from_ref(&site),
                    &[],
                    chunk,
                    false,
                );
            }
            remove_ready_here(&shared, &name, seqs);
            return;
        }
    };
    let (kept, gone): (Vec<u64>, Vec<u64>) = slots
        .iter()
        .map(|s| s.seq)
        .partition(|seq| held.contains(seq));
    tracing::warn!(
        site,
        kept = kept.len(),
        removed = gone.len(),
        "settled the ready-key pool with the peer after it refused a bind"
    );
    remove_ready_here(&shared, &name, gone);
    let settled = shared
        .pools
        .settle(&site, shared.store.as_ref(), &kept, async { Ok(()) })
        .await;
    if let Err(e) = settled {
        tracing::warn!(site, error = %e, "could not read settled ready keys back; they are read at the next load");
    }
}
