//! Serving a batch from a ready-key pool: the peer binds the ready keys to the batch's SAEs
//! first, then this site; on any failure the keys are shredded at both, so a ready key is
//! bound once or never. A 409 (the peer lacks keys this site thought ready) is settled with
//! the peer by the link's refill task (see `reconcile`).

use dqkd_store::{DeliveredKey, TakeError};

use super::outbound::{forget_in_flight, grants_for, remove_ready_here};
use super::*;

/// Why ready keys could not be bound.
pub(super) enum Bound {
    /// They were no longer ready at one of the sites (nothing was bound): make keys on demand.
    Missed,
    /// The peer refused or did not answer; the keys are withdrawn.
    Failed(IssueError),
}

/// Binds ready keys toward `site` to the batch's SAEs: at the peer first (one round trip),
/// then here; returns the keys in job order. On any failure the keys are shredded at both
/// sites, so a ready key is bound once or never.
pub(super) async fn bind_ready(
    shared: &Shared,
    site: &str,
    jobs: &[Job],
    slots: &[Slot],
    deadline: Deadline,
) -> Result<Issued, Bound> {
    let Some(client) = shared.peers.get(site) else {
        return Err(Bound::Missed);
    };
    let name = crate::pools::link_name(&shared.config.kme_id, site, shared.config.replica.as_ref());
    let request_id = Uuid::new_v4();
    let ids: Vec<Uuid> = slots.iter().map(|s| s.id).collect();
    let seqs: Vec<u64> = slots.iter().map(|s| s.seq).collect();
    let grants = grants_for(site, jobs, &ids);
    let labels = [
        ("kme", shared.config.kme_id.to_string()),
        ("peer", site.to_owned()),
    ];
    if let Err(e) = record_in_flight(shared, request_id, &[site.to_owned()], &ids, &seqs).await {
        // Nothing was sent, but the keys have left this site's pool: shred them at both.
        withdraw(shared, request_id, &[site.to_owned()], &[], &seqs, false);
        remove_ready_here(shared, &name, seqs);
        return Err(Bound::Failed(e));
    }
    let started = Instant::now();
    let result = client
        .bind(
            &BindRequest {
                request_id,
                grants,
                positions: seqs.clone(),
                replica: shared.config.replica.clone(),
            },
            deadline,
        )
        .await;
    metrics::histogram!("dqkd_peer_round_trip_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("dqkd_peer_binds_total", &labels).increment(1);
    let shred = |why: &str| {
        tracing::debug!(site, count = ids.len(), why, "shredding ready keys");
        remove_ready_here(shared, &name, seqs.clone());
    };
    let result = result.map(|ack| {
        (
            PeersStored::acked(request_id, ids.len(), (ack.request_id, ack.bound)),
            ack,
        )
    });
    let stored = match result {
        Ok((Some(stored), _)) => stored,
        Err(PeerError::Refused { status, .. }) if status == http::StatusCode::CONFLICT => {
            // The peer refused the whole bind: nothing of it is stored there to withdraw.
            // Which ready keys it still holds, it says when asked: the pool's keys and these
            // leave the pool until its refill task has settled them with the peer.
            forget_in_flight(shared, request_id);
            let doubt = shared.pools.drain(site, slots);
            tracing::warn!(
                site,
                doubt,
                "the peer does not hold keys this site thought ready; settling the pool with it"
            );
            return Err(Bound::Missed);
        }
        other => {
            metrics::counter!("dqkd_peer_failures_total", &labels).increment(1);
            withdraw(shared, request_id, &[site.to_owned()], &ids, &seqs, true);
            shred("the bind failed");
            let (refused, reason) = match other {
                Err(e @ PeerError::Refused { .. }) => (true, e.to_string()),
                Err(e) => (false, e.to_string()),
                Ok((_, ack)) => (
                    true,
                    format!(
                        "site {site:?} acknowledged bind {} of {} keys, expected {request_id} of {}",
                        ack.request_id,
                        ack.bound,
                        ids.len()
                    ),
                ),
            };
            tracing::warn!(
                target: "dqkd::audit",
                event = "keys_withdrawn",
                %request_id,
                failure = %reason,
                key_ids = ?ids,
                "binding ready keys failed; they are destroyed at both sites"
            );
            return Err(Bound::Failed(if refused {
                IssueError::Refused(reason)
            } else {
                IssueError::Unavailable(reason)
            }));
        }
    };
    let now = shared.unix_now();
    let local = per_job(jobs, slots)
        .map(|(job, slots)| PoolGrant {
            slots: slots.to_vec(),
            master: job.order.master.to_string(),
            slaves: store_names(&job.order.local),
            expires_at: local_expiry(shared, &job.order, now),
        })
        .collect();
    match bind_here(shared, stored, &name, local, now, request_id).await {
        Ok(keys) => Ok(keys.into_iter().map(|k| (k.id, k.material)).collect()),
        Err(e) => {
            // Bound at the peer but not here (shredded as expired, say): undo the peer's
            // side and make the keys on demand instead.
            tracing::warn!(site, error = %e, "ready keys could not be bound here; withdrawing them");
            withdraw(shared, request_id, &[site.to_owned()], &ids, &seqs, true);
            shred("the local bind failed");
            Err(Bound::Missed)
        }
    }
}

/// Binds the ready keys here, which only the proof that the peer bound them first allows;
/// the bind's in-flight record leaves in the same commit.
async fn bind_here(
    shared: &Shared,
    _stored: PeersStored,
    link: &str,
    grants: Vec<PoolGrant>,
    now: u64,
    request_id: Uuid,
) -> Result<Vec<DeliveredKey>, TakeError> {
    shared
        .store
        .pool_bind_answering(link, grants, now, Some(request_id))
        .await
}
