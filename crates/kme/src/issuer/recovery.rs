//! What a process does first: the requests it left unanswered when it last stopped are
//! settled with their peers (ready keys of a bind) or withdrawn at every site.

use super::outbound::{owner, withdraw};
use super::*;

/// How often a process asks again for the claim on its in-flight records while another live
/// process of its site (started with the same replica name) holds it.
pub(super) const IN_FLIGHT_CLAIM_RETRY: Duration = Duration::from_secs(2);

/// Withdraws every request this process (by its replica name) left unanswered when it last
/// stopped. The positions of an unanswered bind are settled with its peer (those it still
/// holds ready are ready again; see `reconcile`); everything else, and a bind whose peer
/// cannot be reached in time, is withdrawn: this site's copies (keys of a caller that left,
/// ready keys of the bind) shredded now, and the peers' in the background, retrying until
/// each confirms; each record is forgotten once its peers have. Only the process that holds the claim on these
/// records does it, so a live process started with the same replica name is never undone.
pub(super) async fn recover_in_flight(shared: &Arc<Shared>) -> Result<(), StoreError> {
    let claim = format!("in-flight:{}", owner(shared));
    if !shared.store.claim_pool(&claim).await.unwrap_or(false) {
        tracing::warn!(
            claim,
            "another running process of this site holds these in-flight records (two \
             replicas started with one --replica name?); recovering them once it is released"
        );
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(IN_FLIGHT_CLAIM_RETRY).await;
                if shared.store.claim_pool(&claim).await.unwrap_or(false) {
                    if let Err(e) = withdraw_unanswered(&shared).await {
                        tracing::warn!(error = %e, "could not read unanswered requests");
                    }
                    return;
                }
            }
        });
        return Ok(());
    }
    withdraw_unanswered(shared).await
}

pub(super) async fn withdraw_unanswered(shared: &Shared) -> Result<(), StoreError> {
    let records = shared.store.in_flight(&owner(shared)).await?;
    if records.is_empty() {
        return Ok(());
    }
    let keys: usize = records.iter().map(|r| r.key_ids.len()).sum();
    tracing::warn!(
        target: "dqkd::audit",
        event = "unanswered_withdrawn",
        requests = records.len(),
        keys,
        "settling or withdrawing the keys of requests left unanswered when this process stopped"
    );
    // A peer that could not be asked to settle one bind is not waited for again.
    let mut unreachable: Vec<String> = Vec::new();
    for record in records {
        if let Some(site) = bind_site(shared, &record) {
            if !unreachable.contains(&site)
                && super::reconcile::settle_unanswered_bind(shared, &site, &record).await?
            {
                continue;
            }
            unreachable.push(site);
        }
        shared.store.destroy(&record.key_ids).await?;
        if let [site] = record.sites.as_slice() {
            if !record.ready.is_empty() {
                let name = crate::pools::link_name(
                    &shared.config.kme_id,
                    site,
                    shared.config.replica.as_ref(),
                );
                shared.store.pool_remove(&name, &record.ready).await?;
            }
        }
        tracing::info!(
            target: "dqkd::audit",
            event = "keys_withdrawn",
            request_id = %record.request_id,
            key_ids = ?record.key_ids,
            "withdrawing the keys of a request left unanswered"
        );
        withdraw(
            shared,
            record.request_id,
            &record.sites,
            &record.key_ids,
            &record.ready,
            true,
        );
    }
    Ok(())
}

/// The peer site of `record` if it is a bind of ready keys (one site, one position per key)
/// whose positions can be settled with the peer rather than withdrawn.
fn bind_site(shared: &Shared, record: &InFlight) -> Option<String> {
    match record.sites.as_slice() {
        [site]
            if !record.ready.is_empty()
                && record.ready.len() == record.key_ids.len()
                && shared.peers.contains_key(site) =>
        {
            Some(site.clone())
        }
        _ => None,
    }
}
