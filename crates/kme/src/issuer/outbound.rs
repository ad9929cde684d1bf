//! What the origin sends: one `deliver` per peer site for a batch made on demand, the
//! withdrawal of a failed request's keys at every site, and the in-flight records that let a
//! restarted process withdraw what it left unanswered (see `recovery`).

use super::*;

/// One grant per job for the slaves at `site`: job `i` gets the next `count` of `ids`.
pub(super) fn grants_for(site: &str, jobs: &[Job], ids: &[Uuid]) -> Vec<Grant> {
    per_job(jobs, ids)
        .map(|(job, ids)| Grant {
            master: job.order.master.clone(),
            slaves: job.order.remote.get(site).cloned().unwrap_or_default(),
            key_ids: ids.to_vec(),
        })
        .collect()
}

/// Proof that every peer site of a batch durably stored its keys. Only a checked
/// acknowledgement makes one (or a batch that involves no other site), and storing this
/// site's copy requires it: that peers store before this site is a type, not statement order.
#[must_use = "this site stores its copy only with the proof that the peers stored theirs"]
pub(super) struct PeersStored(());

impl PeersStored {
    /// The proof for a batch that involves no other site, if `remote` is empty.
    pub(super) fn no_peers(remote: &[String]) -> Option<Self> {
        remote.is_empty().then_some(Self(()))
    }

    /// The proof from the one peer of a fill or bind: only if its acknowledgement is for
    /// `request_id` and covers all `expected` keys.
    pub(super) fn acked(request_id: Uuid, expected: usize, ack: (Uuid, usize)) -> Option<Self> {
        (ack == (request_id, expected)).then_some(Self(()))
    }
}

/// Sends one deliver message per peer site, all at once; every site must acknowledge.
pub(super) async fn deliver(
    shared: &Shared,
    link: &Link,
    jobs: &[Job],
    request_id: Uuid,
    metadata: &[u8],
    ids: &[Uuid],
    deadline: Deadline,
) -> Result<PeersStored, IssueError> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(metadata);
    let mut calls = Vec::with_capacity(link.remote.len());
    for site in &link.remote {
        let Some(client) = shared.peers.get(site).cloned() else {
            return Err(IssueError::Unavailable(format!(
                "site {site:?} has no peer address"
            )));
        };
        let grants = grants_for(site, jobs, ids);
        let message = DeliverRequest {
            request_id,
            metadata: encoded.clone(),
            grants,
        };
        let labels = [
            ("kme", shared.config.kme_id.to_string()),
            ("peer", site.clone()),
        ];
        calls.push((
            site.clone(),
            tokio::spawn(async move {
                let started = Instant::now();
                let result = client.deliver(&message, deadline).await;
                let outcome = if result.is_ok() { "ok" } else { "failed" };
                metrics::histogram!("dqkd_peer_round_trip_seconds", &labels)
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!("dqkd_peer_deliveries_total", &labels).increment(1);
                if outcome == "failed" {
                    metrics::counter!("dqkd_peer_failures_total", &labels).increment(1);
                }
                result
            }),
        ));
    }
    let mut failures: Vec<PeerError> = Vec::new();
    for (site, call) in calls {
        match call.await {
            // The acknowledgement must be for this request and cover every key.
            Ok(Ok(ack)) if ack.request_id == request_id && ack.stored == ids.len() => {}
            Ok(Ok(ack)) => failures.push(PeerError::Refused {
                site,
                status: http::StatusCode::OK,
                message: format!(
                    "acknowledged request {} with {} keys, expected {request_id} with {}",
                    ack.request_id,
                    ack.stored,
                    ids.len()
                ),
            }),
            Ok(Err(e)) => failures.push(e),
            Err(e) => failures.push(PeerError::Unreachable {
                site,
                reason: format!("the delivery task failed: {e}"),
            }),
        }
    }
    if failures.is_empty() {
        return Ok(PeersStored(()));
    }
    // A site that timed out may have stored the keys: withdraw them everywhere.
    withdraw(shared, request_id, &link.remote, ids, &[], true);
    let refused = failures
        .iter()
        .all(|f| matches!(f, PeerError::Refused { .. }));
    let reasons: Vec<String> = failures.iter().map(ToString::to_string).collect();
    tracing::warn!(
        target: "dqkd::audit",
        event = "keys_withdrawn",
        %request_id,
        failures = ?reasons,
        key_ids = ?ids,
        "cross-site key request failed; its keys are destroyed everywhere"
    );
    let reasons = reasons.join("; ");
    Err(if refused {
        IssueError::Refused(reasons)
    } else {
        IssueError::Unavailable(reasons)
    })
}

/// Destroys a failed batch's keys at every peer site (ordinary keys by ID, ready keys of this
/// site's pool toward it by position), retrying in the background until each site confirms
/// or the keys would have expired anyway; then, if the request was `recorded` as in flight,
/// forgets that record (a crash before then withdraws it again at the next start).
pub(super) fn withdraw(
    shared: &Shared,
    request_id: Uuid,
    sites: &[String],
    ids: &[Uuid],
    ready: &[u64],
    recorded: bool,
) {
    let deadline = shared.config.key_ttl;
    let mut calls = Vec::with_capacity(sites.len());
    for site in sites {
        let Some(client) = shared.peers.get(site).cloned() else {
            continue;
        };
        let message = DestroyRequest {
            request_id,
            key_ids: ids.to_vec(),
            ready: ready.to_vec(),
            // Named only where ready keys are withdrawn, so that a withdrawal of ordinary keys
            // reads the same to a peer that predates replica names.
            replica: shared.config.replica.clone().filter(|_| !ready.is_empty()),
        };
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut wait = Duration::from_millis(200);
            loop {
                match client.destroy(&message).await {
                    Ok(ack) => {
                        tracing::info!(site = client.site(), %request_id, destroyed = ack.destroyed, "withdrew keys of a failed request");
                        return;
                    }
                    Err(e) if started.elapsed() < deadline => {
                        tracing::debug!(site = client.site(), error = %e, "withdraw failed; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(10));
                    }
                    Err(e) => {
                        tracing::warn!(site = client.site(), error = %e, "gave up withdrawing keys; they expire by TTL");
                        return;
                    }
                }
            }
        }));
    }
    if recorded {
        let store = shared.store.clone();
        tokio::spawn(async move {
            for call in calls {
                let _ = call.await;
            }
            if let Err(e) = store.forget_in_flight(&[request_id]).await {
                tracing::warn!(%request_id, error = %e, "could not forget a withdrawn request; it is withdrawn again at the next start");
            }
        });
    }
}

/// The owner of this process's in-flight records: its replica name, or none.
pub(super) fn owner(shared: &Shared) -> String {
    shared
        .config
        .replica
        .clone()
        .map(Name::into_string)
        .unwrap_or_default()
}

/// Records durably that request `request_id` is about to reach `sites` (see
/// [`KeyStore::record_in_flight`]), before its first peer message.
pub(super) async fn record_in_flight(
    shared: &Shared,
    request_id: Uuid,
    sites: &[String],
    ids: &[Uuid],
    ready: &[u64],
) -> Result<(), IssueError> {
    shared
        .store
        .record_in_flight(InFlight {
            request_id,
            owner: owner(shared),
            sites: sites.to_vec(),
            key_ids: ids.to_vec(),
            ready: ready.to_vec(),
        })
        .await
        .map_err(IssueError::from)
}

/// Forgets the in-flight record of a request no peer acted on, in the background (a record
/// left behind only costs an idempotent withdrawal at the next start).
pub(super) fn forget_in_flight(shared: &Shared, request_id: Uuid) {
    let store = shared.store.clone();
    tokio::spawn(async move {
        if let Err(e) = store.forget_in_flight(&[request_id]).await {
            tracing::warn!(%request_id, error = %e, "could not forget an in-flight request");
        }
    });
}

/// Ready keys shredded per store call, so discarding a large pool never holds the store's
/// writer for long.
pub(super) const REMOVE_CHUNK: usize = 16_384;

/// Shreds ready keys of pool `link` at this site in the background (they are unusable
/// either way).
pub(super) fn remove_ready_here(shared: &Shared, link: &str, seqs: Vec<u64>) {
    let store = shared.store.clone();
    let link = link.to_owned();
    tokio::spawn(async move {
        for chunk in seqs.chunks(REMOVE_CHUNK) {
            if let Err(e) = store.pool_remove(&link, chunk).await {
                tracing::warn!(error = %e, "could not shred unusable ready keys; they expire by TTL");
                return;
            }
        }
    });
}
