//! Keeping each link's ready-key pool filled: one task per link that holds the pool's claim,
//! generates batches, has the peer store them, then stores them here.

use super::*;

/// How often a process asks again for a pool another process of its site holds.
pub(super) const CLAIM_RETRY: Duration = Duration::from_secs(2);

/// Keeps one link's pool between its low-water mark and its target: once the level is at
/// or below the low-water mark, fills batch after batch until the target is reached. Only
/// while this process holds the pool's claim: until then (`claimed` false) it asks for the
/// claim every [`CLAIM_RETRY`] and, once it has it, reads the pool from the store; while it
/// holds it, it asks again as often and before every fill, and empties its view of the pool
/// (handing out nothing more) the moment it cannot show the claim is still its own.
pub(super) async fn refill_loop(
    shared: Arc<Shared>,
    pool: Arc<LinkPool>,
    mut stopped: watch::Receiver<bool>,
    mut claimed: bool,
) {
    let settings = shared.pools.settings();
    let mut filling = false;
    let mut backoff = Duration::from_millis(200);
    let mut checked = Instant::now();
    let gauge = metrics::gauge!(
        "dqkd_pool_claimed",
        "kme" => shared.config.kme_id.to_string(),
        "peer" => pool.peer().to_owned()
    );
    gauge.set(if claimed { 1.0 } else { 0.0 });
    loop {
        if *stopped.borrow() {
            return;
        }
        if !claimed {
            match claim_and_load(&shared, &pool).await {
                Ok(Some(loaded)) => {
                    tracing::info!(
                        peer = pool.peer(),
                        ready_keys = loaded,
                        "claimed the ready-key pool"
                    );
                    (claimed, checked) = (true, Instant::now());
                    gauge.set(1.0);
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(peer = pool.peer(), error = %e, "claiming the ready-key pool failed")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(CLAIM_RETRY) => {}
                _ = stopped.changed() => return,
            }
            continue;
        }
        let doubt = pool.take_doubt();
        if !doubt.is_empty() {
            tokio::spawn(super::reconcile::settle_pool(
                shared.clone(),
                pool.peer().to_owned(),
                doubt,
            ));
        }
        let level = pool.level();
        filling = (filling || level <= settings.low_water) && level < settings.target;
        // Still ours? Asked before every fill and every CLAIM_RETRY: a claim lapses with the
        // database connection that held it, and another process may have taken the pool over.
        if filling || checked.elapsed() >= CLAIM_RETRY {
            checked = Instant::now();
            let lost = match shared.store.claim_pool(pool.name()).await {
                Ok(true) => None,
                Ok(false) => {
                    Some("another process of this site took this ready-key pool over".into())
                }
                Err(e) => Some(format!(
                    "this process cannot show it still holds this ready-key pool: {e}"
                )),
            };
            if let Some(why) = lost {
                tracing::warn!(
                    peer = pool.peer(),
                    why,
                    "serving on demand until the pool is claimed again"
                );
                gauge.set(0.0);
                // Not shredded: the process that holds the claim now hands them out.
                let _ = shared.pools.discard(pool.peer());
                (claimed, filling) = (false, false);
                continue;
            }
        }
        if !filling {
            tokio::select! {
                _ = pool.woken() => {}
                // Keys dropped near expiry lower the level without a take's wake-up.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stopped.changed() => return,
            }
            continue;
        }
        let count = (settings.target - level).min(u64::from(settings.batch)) as usize;
        let started = Instant::now();
        let filled = fill_once(&shared, &pool, count).await;
        match filled {
            Ok(()) => {
                backoff = Duration::from_millis(200);
                metrics::histogram!("dqkd_pool_refill_seconds", "kme" => shared.config.kme_id.to_string())
                    .record(started.elapsed().as_secs_f64());
            }
            Err(e) => {
                tracing::warn!(peer = pool.peer(), error = %e, retry_in = ?backoff, "refilling the ready-key pool failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Claims the pool and, when this process now holds it, reads its ready keys from the store;
/// `None` while another process holds it.
pub(super) async fn claim_and_load(
    shared: &Shared,
    pool: &LinkPool,
) -> Result<Option<u64>, StoreError> {
    if !shared.store.claim_pool(pool.name()).await? {
        return Ok(None);
    }
    Ok(Some(shared.pools.load(pool, shared.store.as_ref()).await?))
}

/// One refill batch: generate, have the peer regenerate and store it, then store it here.
/// The peer stores first, so this site never holds a ready key its peer lacks.
pub(super) async fn fill_once(
    shared: &Shared,
    pool: &LinkPool,
    count: usize,
) -> Result<(), IssueError> {
    let peer = pool.peer().to_owned();
    let client = shared
        .peers
        .get(&peer)
        .ok_or_else(|| IssueError::Unavailable(format!("site {peer:?} has no peer address")))?;
    let batch = shared
        .source
        .generate(count, shared.pools.key_len(), std::slice::from_ref(&peer))
        .await?;
    let metadata = batch.metadata.as_deref().ok_or_else(|| {
        IssueError::Internal("the key source gave no regeneration metadata".into())
    })?;
    let ids: Vec<Uuid> = batch.keys.iter().map(|(id, _)| *id).collect();
    let first_seq = pool.reserve(ids.len());
    let slots: Vec<Slot> = ids
        .iter()
        .zip(first_seq..)
        .map(|(&id, seq)| Slot { seq, id })
        .collect();
    let seqs: Vec<u64> = slots.iter().map(|s| s.seq).collect();
    let request_id = Uuid::new_v4();
    let expires_at = shared
        .unix_now()
        .saturating_add(shared.pools.settings().ttl_secs);
    let request = FillRequest {
        request_id,
        metadata: base64::engine::general_purpose::STANDARD.encode(metadata),
        expires_at,
        first_seq,
        replica: shared.config.replica.clone(),
    };
    let labels = [
        ("kme", shared.config.kme_id.to_string()),
        ("peer", peer.clone()),
    ];
    let result = client.fill(&request).await.map(|ack| {
        let stored = PeersStored::acked(request_id, ids.len(), (ack.request_id, ack.stored));
        (stored, ack)
    });
    let stored = match result {
        Ok((Some(stored), _)) => stored,
        other => {
            metrics::counter!("dqkd_peer_failures_total", &labels).increment(1);
            withdraw(
                shared,
                request_id,
                std::slice::from_ref(&peer),
                &[],
                &seqs,
                false,
            );
            return Err(IssueError::Unavailable(match other {
                Err(e) => e.to_string(),
                Ok((_, ack)) => format!(
                    "site {peer:?} acknowledged fill {} of {} keys, expected {request_id} of {}",
                    ack.request_id,
                    ack.stored,
                    ids.len()
                ),
            }));
        }
    };
    let keys = batch
        .keys
        .into_iter()
        .zip(&slots)
        .map(|((_, material), &slot)| PoolKey {
            slot,
            material,
            expires_at,
        })
        .collect();
    if let Err(e) = fill_here(shared, stored, pool, keys).await {
        withdraw(
            shared,
            request_id,
            std::slice::from_ref(&peer),
            &[],
            &seqs,
            false,
        );
        return Err(e.into());
    }
    pool.push(slots, expires_at);
    shared.pools.gauge(pool);
    metrics::counter!("dqkd_pool_filled_keys_total", &labels).increment(ids.len() as u64);
    tracing::debug!(peer, keys = ids.len(), "ready-key pool refilled");
    Ok(())
}

/// Stores a refill batch in this site's pool, which only the proof that the peer stored it
/// first allows: this site never holds a ready key its peer lacks.
async fn fill_here(
    shared: &Shared,
    _stored: PeersStored,
    pool: &LinkPool,
    keys: Vec<PoolKey>,
) -> Result<(), StoreError> {
    shared.store.pool_insert(pool.name(), keys).await
}
