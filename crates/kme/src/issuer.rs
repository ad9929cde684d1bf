//! Issuing keys: coalesces concurrent enc_keys requests into batches, serves them from the
//! ready-key pools when it can, and keeps those pools filled.
//!
//! Requests that go to the same set of peer sites with the same key size share one
//! generation (one entropy allocation per server), one `deliver` message per peer site and
//! one local store commit. Throughput therefore grows with concurrency, while every
//! request still waits for the durable writes that cover its own keys. There is no
//! artificial delay: a batch is whatever queued while earlier batches were in flight.
//!
//! Each request carries one [`Deadline`], fixed when enc_keys arrives. Every wait on its
//! behalf — for a batch slot, for entropy, for the peer, for keys made on demand after a pool
//! miss — ends by then: a request still queued at its deadline is answered 503 and never
//! sent; a batch under way works until the latest deadline among its requests, and each
//! request whose own deadline passes first is answered 503 at that moment, its keys then
//! destroyed at every site like those of a caller that left.
//!
//! A cross-site request is recorded in the store as *in flight* before its first peer
//! message, and the record leaves in the commit that stores this site's own copy of its keys
//! (the moment it is answered). A record still there when the process starts again is a
//! request whose keys a peer may hold but nobody received: [`Issuer::start_pools`] withdraws
//! them at every site first.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use dqkd_store::{InFlight, KeyMaterial, KeyStore, NewKey, PoolGrant, PoolKey, Slot, StoreError};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use uuid::Uuid;

use crate::config::Config;
use crate::keysource::{KeySource, KeySourceError};
use crate::peer::{
    BindRequest, DeliverRequest, DestroyRequest, FillRequest, Grant, PeerClient, PeerError,
};
use crate::pools::{LinkPool, Pools};
use crate::ApiError;

/// Most keys one batch carries (a single request may exceed it alone).
const MAX_BATCH_KEYS: usize = 4096;
/// Batches of one link in flight at once: enough to overlap generation, the peer round
/// trip and the commit of consecutive batches.
const MAX_IN_FLIGHT: usize = 4;

/// Largest batch served from a ready pool. A pool saves a batch its generation round trips,
/// which matters for small batches; a large batch amortises generation by itself, while a
/// key from the pool costs each site's store three writes (fill, bind, take) where a fresh
/// one costs two. Measured on 2 cores at 64 connections: 100-key requests ran at 172,474
/// keys/s through the pool and 193,892 on demand; single-key requests (batches of up to
/// 64) ran at 12,967 pairs/s through the pool and 10,846 on demand; 10-key requests tied.
const POOL_MAX_BATCH_KEYS: usize = 64;

/// What one enc_keys request needs issued.
#[derive(Debug, Clone)]
pub struct Order {
    /// The master SAE.
    pub master: String,
    /// SAEs of this site entitled to fetch the keys here (slaves, and the master itself
    /// when it may fetch again).
    pub local: Vec<String>,
    /// Slaves at other sites, by KME ID.
    pub remote: BTreeMap<String, Vec<String>>,
    /// Number of keys.
    pub count: usize,
    /// Key length in bytes.
    pub len: usize,
}

/// Keys issued for one order.
pub type Issued = Vec<(Uuid, KeyMaterial)>;

/// When an enc_keys request must be answered: its arrival plus `peers.timeout_ms`. On
/// tokio's clock, so that tests can pause time.
pub type Deadline = tokio::time::Instant;

struct Job {
    order: Order,
    deadline: Deadline,
    reply: oneshot::Sender<Result<Issued, ApiError>>,
}

impl Job {
    /// The job, unless nothing should be made for it any more: its caller has had its
    /// answer (at its deadline) or left, or its deadline has passed (it is answered now).
    fn live(self, shared: &Shared, link: &Link) -> Option<Self> {
        if self.reply.is_closed() {
            return None;
        }
        if self.deadline <= Deadline::now() {
            let _ = self
                .reply
                .send(Err(deadline_passed(shared, &link.remote, None)));
            return None;
        }
        Some(self)
    }
}

/// Requests that can share a batch: same peer sites, same key length.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Link {
    remote: Vec<String>,
    len: usize,
}

/// Everything a batch needs.
struct Shared {
    config: Arc<Config>,
    store: Arc<dyn KeyStore>,
    source: Arc<dyn KeySource>,
    peers: BTreeMap<String, PeerClient>,
    pools: Pools,
}

/// Coalesces enc_keys requests per link.
pub struct Issuer {
    shared: Arc<Shared>,
    queues: Mutex<HashMap<Link, mpsc::UnboundedSender<Job>>>,
}

impl Issuer {
    /// An issuer over the given store, key source and peer clients.
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn KeyStore>,
        source: Arc<dyn KeySource>,
        peers: BTreeMap<String, PeerClient>,
    ) -> Self {
        let pools = Pools::new(
            &config.kme_id,
            config.replica.as_deref(),
            config.pools,
            (config.limits.default_key_size / 8) as usize,
            peers.keys(),
        );
        Self {
            shared: Arc::new(Shared {
                config,
                store,
                source,
                peers,
                pools,
            }),
            queues: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a peer client exists for `site`.
    pub fn knows_peer(&self, site: &str) -> bool {
        self.shared.peers.contains_key(site)
    }

    /// `(level, target)` of the ready-key pool toward `site`, if there is one.
    pub fn pool_level(&self, site: &str) -> Option<(u64, u64)> {
        self.shared.pools.level(site)
    }

    /// Claims each link's pool, reads back the pools this process now holds, and starts one
    /// refill task per link (which keeps trying to claim a pool another process holds), all
    /// stopping when `stopped` turns true. Returns how many ready keys were loaded.
    pub async fn start_pools(&self, stopped: watch::Receiver<bool>) -> Result<u64, StoreError> {
        let shared = &self.shared;
        // Before the pools are read, so that ready keys of an unanswered bind are gone here.
        recover_in_flight(shared).await?;
        let mut loaded = 0;
        for pool in shared.pools.links() {
            let claimed = match shared.store.claim_pool(pool.name()).await {
                Ok(claimed) => claimed,
                Err(e) => {
                    tracing::warn!(
                        peer = pool.peer(),
                        error = %e,
                        "claiming the ready-key pool failed; serving on demand until a claim succeeds"
                    );
                    false
                }
            };
            if claimed {
                loaded += shared.pools.load(pool, shared.store.as_ref()).await?;
            } else {
                tracing::warn!(
                    peer = pool.peer(),
                    pool = pool.name(),
                    "another running process of this site keeps this ready-key pool (two \
                     replicas started with one --replica name?); serving on demand until it is \
                     released"
                );
            }
            tokio::spawn(refill_loop(
                shared.clone(),
                pool.clone(),
                stopped.clone(),
                claimed,
            ));
        }
        Ok(loaded)
    }

    /// Issues the order's keys: returns once every involved site has stored them durably,
    /// or with 503 at `deadline` at the latest (and then no site ever delivers them).
    pub async fn issue(&self, order: Order, deadline: Deadline) -> Result<Issued, ApiError> {
        let link = Link {
            remote: order.remote.keys().cloned().collect(),
            len: order.len,
        };
        let (reply, answer) = oneshot::channel();
        let mut job = Job {
            order,
            deadline,
            reply,
        };
        // A queue whose loop ended (it never does while the issuer lives) is replaced.
        for _ in 0..2 {
            let sender = self.queue(&link);
            match sender.send(job) {
                Ok(()) => return self.wait(answer, deadline, &link.remote).await,
                Err(mpsc::error::SendError(returned)) => {
                    job = returned;
                    self.queues
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&link);
                }
            }
        }
        Err(ApiError::Internal("cannot queue the key request".into()))
    }

    /// The batch's answer, or 503 once `deadline` passes. Closing the channel then makes a
    /// later answer fail to arrive, so its batch destroys the keys at every site.
    async fn wait(
        &self,
        mut answer: oneshot::Receiver<Result<Issued, ApiError>>,
        deadline: Deadline,
        remote: &[String],
    ) -> Result<Issued, ApiError> {
        let dropped = || Err(ApiError::Internal("the key batch was dropped".into()));
        tokio::select! {
            result = &mut answer => result.unwrap_or_else(|_| dropped()),
            () = tokio::time::sleep_until(deadline) => {
                answer.close();
                match answer.try_recv() {
                    // Answered in the same instant: the keys are stored everywhere.
                    Ok(result) => result,
                    Err(_) => Err(deadline_passed(&self.shared, remote, None)),
                }
            }
        }
    }

    fn queue(&self, link: &Link) -> mpsc::UnboundedSender<Job> {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        queues
            .entry(link.clone())
            .or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(batch_loop(rx, self.shared.clone(), link.clone()));
                tx
            })
            .clone()
    }
}

async fn batch_loop(mut rx: mpsc::UnboundedReceiver<Job>, shared: Arc<Shared>, link: Link) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        // Requests whose deadline passed while they queued are not sent.
        let mut jobs: Vec<Job> = first.live(&shared, &link).into_iter().collect();
        let mut keys: usize = jobs.iter().map(|j| j.order.count).sum();
        while keys < MAX_BATCH_KEYS {
            match rx.try_recv() {
                Ok(job) => {
                    if let Some(job) = job.live(&shared, &link) {
                        keys += job.order.count;
                        jobs.push(job);
                    }
                }
                Err(_) => break,
            }
        }
        if jobs.is_empty() {
            continue;
        }
        let shared = shared.clone();
        let link = link.clone();
        tokio::spawn(async move {
            run_batch(&shared, &link, jobs).await;
            drop(permit);
        });
    }
}

/// Issues one batch. It works until the latest deadline among its requests, so that no
/// request fails for an older one batched with it; a request whose own deadline comes first
/// has its answer by then (see [`Issuer::wait`]).
async fn run_batch(shared: &Shared, link: &Link, jobs: Vec<Job>) {
    let total: usize = jobs.iter().map(|j| j.order.count).sum();
    let started = Instant::now();
    let deadline = jobs
        .iter()
        .map(|j| j.deadline)
        .max()
        .unwrap_or_else(Deadline::now);
    let result = issue_batch(shared, link, &jobs, total, deadline).await;
    let kme = shared.config.kme_id.clone();
    metrics::histogram!("dqkd_issue_batch_keys", "kme" => kme.clone()).record(total as f64);
    metrics::histogram!("dqkd_issue_batch_requests_ops", "kme" => kme.clone())
        .record(jobs.len() as f64);
    metrics::histogram!("dqkd_issue_batch_seconds", "kme" => kme)
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(keys) => {
            tracing::debug!(
                requests = jobs.len(),
                keys = total,
                micros = started.elapsed().as_micros() as u64,
                "key batch issued"
            );
            answer(shared, link, jobs, keys).await;
        }
        // A peer that answered and refused may have refused one request of the batch
        // (its pair over quota, say): each request is tried alone, so the refusal lands
        // only where it belongs. An unreachable peer fails everyone alike.
        Err(BatchError::Refused(_)) if jobs.len() > 1 => {
            for job in jobs {
                let Some(job) = job.live(shared, link) else {
                    continue;
                };
                let single = std::slice::from_ref(&job);
                match issue_batch(shared, link, single, job.order.count, job.deadline).await {
                    Ok(keys) => answer(shared, link, vec![job], keys).await,
                    Err(e) => {
                        let _ = job.reply.send(Err(e.into_api()));
                    }
                }
            }
        }
        Err(e) => {
            let e = e.into_api();
            if let ApiError::Internal(cause) = &e {
                tracing::error!(%cause, "issuing a key batch failed");
            }
            let message = e.to_string();
            let bad_request = matches!(e, ApiError::BadRequest(_));
            for job in jobs {
                let error = if bad_request {
                    ApiError::BadRequest(message.clone())
                } else {
                    ApiError::Unavailable(message.clone())
                };
                let _ = job.reply.send(Err(error));
            }
        }
    }
}

/// Hands each job its keys, in order. A job whose caller went away (its connection
/// closed) never gets them: they are destroyed at every site so no one else can.
async fn answer(shared: &Shared, link: &Link, jobs: Vec<Job>, mut keys: Issued) {
    for job in jobs {
        let rest = keys.split_off(job.order.count.min(keys.len()));
        let mine = std::mem::replace(&mut keys, rest);
        let ids: Vec<Uuid> = mine.iter().map(|(id, _)| *id).collect();
        if job.reply.send(Ok(mine)).is_err() {
            tracing::warn!(
                count = ids.len(),
                "caller left before its keys were handed over; destroying them"
            );
            let request_id = Uuid::new_v4();
            let recorded = !link.remote.is_empty()
                && record_in_flight(shared, request_id, &link.remote, &ids, &[])
                    .await
                    .is_ok();
            withdraw(shared, request_id, &link.remote, &ids, &[], recorded);
            let store = shared.store.clone();
            tokio::spawn(async move {
                if let Err(e) = store.destroy(&ids).await {
                    tracing::warn!(error = %e, "could not destroy keys of a departed caller");
                }
            });
        }
    }
}

/// Why a batch failed.
enum BatchError {
    /// A peer answered and refused the delivery.
    Refused(ApiError),
    /// Anything else: the key source, an unreachable peer, the local store.
    Other(ApiError),
}

impl BatchError {
    fn into_api(self) -> ApiError {
        match self {
            Self::Refused(e) | Self::Other(e) => e,
        }
    }
}

impl From<ApiError> for BatchError {
    fn from(e: ApiError) -> Self {
        Self::Other(e)
    }
}

/// Issues one batch from the ready pool when it covers it, else generates, delivers and
/// stores it now, waiting for entropy and peers until `deadline` at most (a pool miss
/// leaves the keys made on demand only the time that remains); returns the keys in job
/// order.
async fn issue_batch(
    shared: &Shared,
    link: &Link,
    jobs: &[Job],
    total: usize,
    deadline: Deadline,
) -> Result<Issued, BatchError> {
    if let ([site], true) = (link.remote.as_slice(), total <= POOL_MAX_BATCH_KEYS) {
        if let Some(slots) = shared.pools.take(site, total, link.len, unix_now()) {
            match bind_ready(shared, site, jobs, &slots, deadline).await {
                Ok(keys) => return Ok(keys),
                Err(Bound::Missed) => {}
                Err(Bound::Failed(e)) => return Err(e),
            }
        }
    }
    let batch = shared
        .source
        .generate_by(total, link.len, &link.remote, deadline)
        .await
        .map_err(|e| {
            BatchError::Other(if Deadline::now() >= deadline {
                deadline_passed(shared, &link.remote, Some(&e.to_string()))
            } else {
                source_error(e)
            })
        })?;
    let ids: Vec<Uuid> = batch.keys.iter().map(|(id, _)| *id).collect();
    let request_id = Uuid::new_v4();

    if !link.remote.is_empty() {
        let metadata = batch.metadata.as_deref().ok_or_else(|| {
            ApiError::Internal("the key source gave no regeneration metadata".into())
        })?;
        record_in_flight(shared, request_id, &link.remote, &ids, &[]).await?;
        deliver(shared, link, jobs, request_id, metadata, &ids, deadline).await?;
    }

    let now = unix_now();
    let mut records = Vec::new();
    let mut offset = 0;
    for job in jobs {
        let keys = &batch.keys[offset..offset + job.order.count];
        offset += job.order.count;
        if job.order.local.is_empty() {
            continue;
        }
        let expires_at = local_expiry(shared, &job.order, now);
        for (id, material) in keys {
            records.push(NewKey {
                id: *id,
                master: job.order.master.clone(),
                slaves: job.order.local.clone(),
                material: material.clone(),
                expires_at,
            });
        }
    }
    if link.remote.is_empty() {
        // Same-site: no peer holds anything, so no record to answer.
        if !records.is_empty() {
            shared.store.insert(records).await.map_err(ApiError::from)?;
        }
    } else if let Err(e) = shared
        .store
        .insert_answering(records, Some(request_id))
        .await
    {
        withdraw(shared, request_id, &link.remote, &ids, &[], true);
        return Err(BatchError::Other(e.into()));
    }
    Ok(batch.keys)
}

/// One grant per job for the slaves at `site`: job `i` gets the next `count` of `ids`.
fn grants_for(site: &str, jobs: &[Job], ids: &[Uuid]) -> Vec<Grant> {
    let mut grants = Vec::with_capacity(jobs.len());
    let mut offset = 0;
    for job in jobs {
        grants.push(Grant {
            master: job.order.master.clone(),
            slaves: job.order.remote.get(site).cloned().unwrap_or_default(),
            key_ids: ids[offset..offset + job.order.count].to_vec(),
        });
        offset += job.order.count;
    }
    grants
}

/// Why ready keys could not be bound.
enum Bound {
    /// They were no longer ready at one of the sites (nothing was bound): make keys on demand.
    Missed,
    /// The peer refused or did not answer; the keys are withdrawn.
    Failed(BatchError),
}

/// Binds ready keys toward `site` to the batch's SAEs: at the peer first (one round trip),
/// then here; returns the keys in job order. On any failure the keys are shredded at both
/// sites, so a ready key is bound once or never.
async fn bind_ready(
    shared: &Shared,
    site: &str,
    jobs: &[Job],
    slots: &[Slot],
    deadline: Deadline,
) -> Result<Issued, Bound> {
    let Some(client) = shared.peers.get(site) else {
        return Err(Bound::Missed);
    };
    let name = crate::pools::link_name(
        &shared.config.kme_id,
        site,
        shared.config.replica.as_deref(),
    );
    let request_id = Uuid::new_v4();
    let ids: Vec<Uuid> = slots.iter().map(|s| s.id).collect();
    let seqs: Vec<u64> = slots.iter().map(|s| s.seq).collect();
    let grants = grants_for(site, jobs, &ids);
    let labels = [
        ("kme", shared.config.kme_id.clone()),
        ("peer", site.to_owned()),
    ];
    if let Err(e) = record_in_flight(shared, request_id, &[site.to_owned()], &ids, &seqs).await {
        // Nothing was sent, but the keys have left this site's pool: shred them at both.
        withdraw(shared, request_id, &[site.to_owned()], &[], &seqs, false);
        remove_ready_here(shared, &name, seqs);
        return Err(Bound::Failed(BatchError::Other(e)));
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
    match result {
        Ok(ack) if ack.request_id == request_id && ack.bound == ids.len() => {}
        Err(PeerError::Refused { status, .. }) if status == http::StatusCode::CONFLICT => {
            // The peer refused the whole bind: nothing of it is stored there to withdraw.
            forget_in_flight(shared, request_id);
            shred("the peer no longer holds them");
            let stale: Vec<u64> = shared.pools.discard(site).iter().map(|s| s.seq).collect();
            tracing::warn!(
                site,
                discarded = stale.len(),
                "the peer does not hold keys this site thought ready; refilling the pool from scratch"
            );
            // The peer may still hold some of them: shred those there too.
            for chunk in stale.chunks(REMOVE_CHUNK) {
                withdraw(
                    shared,
                    Uuid::new_v4(),
                    &[site.to_owned()],
                    &[],
                    chunk,
                    false,
                );
            }
            remove_ready_here(shared, &name, stale);
            return Err(Bound::Missed);
        }
        other => {
            metrics::counter!("dqkd_peer_failures_total", &labels).increment(1);
            withdraw(shared, request_id, &[site.to_owned()], &ids, &seqs, true);
            shred("the bind failed");
            let (refused, reason) = match other {
                Err(e @ PeerError::Refused { .. }) => (true, e.to_string()),
                Err(e) => (false, e.to_string()),
                Ok(ack) => (
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
            let error = ApiError::Unavailable(reason);
            return Err(Bound::Failed(if refused {
                BatchError::Refused(error)
            } else {
                BatchError::Other(error)
            }));
        }
    }
    let now = unix_now();
    let mut local = Vec::with_capacity(jobs.len());
    let mut offset = 0;
    for job in jobs {
        local.push(PoolGrant {
            slots: slots[offset..offset + job.order.count].to_vec(),
            master: job.order.master.clone(),
            slaves: job.order.local.clone(),
            expires_at: local_expiry(shared, &job.order, now),
        });
        offset += job.order.count;
    }
    match shared
        .store
        .pool_bind_answering(&name, local, now, Some(request_id))
        .await
    {
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

/// When this site's copy of a job's keys expires: the master's own copy only for the
/// (shorter) refetch window, copies for slaves of this site for the full TTL.
fn local_expiry(shared: &Shared, order: &Order, now: u64) -> u64 {
    if order.local.iter().all(|s| *s == order.master) {
        now.saturating_add(shared.config.master_refetch_window.as_secs())
    } else {
        now.saturating_add(shared.config.key_ttl.as_secs())
    }
}

/// Ready keys shredded per store call, so discarding a large pool never holds the store's
/// writer for long.
const REMOVE_CHUNK: usize = 16_384;

/// Shreds ready keys of pool `link` at this site in the background (they are unusable
/// either way).
fn remove_ready_here(shared: &Shared, link: &str, seqs: Vec<u64>) {
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

/// How often a process asks again for a pool another process of its site holds.
const CLAIM_RETRY: Duration = Duration::from_secs(2);

/// Keeps one link's pool between its low-water mark and its target: once the level is at
/// or below the low-water mark, fills batch after batch until the target is reached. Only
/// while this process holds the pool's claim: until then (`claimed` false) it asks for the
/// claim every [`CLAIM_RETRY`] and, once it has it, reads the pool from the store; while it
/// holds it, it asks again as often and before every fill, and empties its view of the pool
/// (handing out nothing more) the moment it cannot show the claim is still its own.
async fn refill_loop(
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
        "kme" => shared.config.kme_id.clone(),
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
                metrics::histogram!("dqkd_pool_refill_seconds", "kme" => shared.config.kme_id.clone())
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
async fn claim_and_load(shared: &Shared, pool: &LinkPool) -> Result<Option<u64>, StoreError> {
    if !shared.store.claim_pool(pool.name()).await? {
        return Ok(None);
    }
    Ok(Some(shared.pools.load(pool, shared.store.as_ref()).await?))
}

/// One refill batch: generate, have the peer regenerate and store it, then store it here.
/// The peer stores first, so this site never holds a ready key its peer lacks.
async fn fill_once(shared: &Shared, pool: &LinkPool, count: usize) -> Result<(), ApiError> {
    let peer = pool.peer().to_owned();
    let client = shared
        .peers
        .get(&peer)
        .ok_or_else(|| ApiError::Unavailable(format!("site {peer:?} has no peer address")))?;
    let batch = shared
        .source
        .generate(count, shared.pools.key_len(), std::slice::from_ref(&peer))
        .await
        .map_err(source_error)?;
    let metadata = batch
        .metadata
        .as_deref()
        .ok_or_else(|| ApiError::Internal("the key source gave no regeneration metadata".into()))?;
    let ids: Vec<Uuid> = batch.keys.iter().map(|(id, _)| *id).collect();
    let first_seq = pool.reserve(ids.len());
    let slots: Vec<Slot> = ids
        .iter()
        .zip(first_seq..)
        .map(|(&id, seq)| Slot { seq, id })
        .collect();
    let seqs: Vec<u64> = slots.iter().map(|s| s.seq).collect();
    let request_id = Uuid::new_v4();
    let expires_at = unix_now().saturating_add(shared.pools.settings().ttl_secs);
    let request = FillRequest {
        request_id,
        metadata: base64::engine::general_purpose::STANDARD.encode(metadata),
        expires_at,
        first_seq,
        replica: shared.config.replica.clone(),
    };
    let labels = [
        ("kme", shared.config.kme_id.clone()),
        ("peer", peer.clone()),
    ];
    match client.fill(&request).await {
        Ok(ack) if ack.request_id == request_id && ack.stored == ids.len() => {}
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
            return Err(ApiError::Unavailable(match other {
                Err(e) => e.to_string(),
                Ok(ack) => format!(
                    "site {peer:?} acknowledged fill {} of {} keys, expected {request_id} of {}",
                    ack.request_id,
                    ack.stored,
                    ids.len()
                ),
            }));
        }
    }
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
    if let Err(e) = shared.store.pool_insert(pool.name(), keys).await {
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

/// Sends one deliver message per peer site, all at once; every site must acknowledge.
async fn deliver(
    shared: &Shared,
    link: &Link,
    jobs: &[Job],
    request_id: Uuid,
    metadata: &[u8],
    ids: &[Uuid],
    deadline: Deadline,
) -> Result<(), BatchError> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(metadata);
    let mut calls = Vec::with_capacity(link.remote.len());
    for site in &link.remote {
        let Some(client) = shared.peers.get(site).cloned() else {
            return Err(BatchError::Other(ApiError::Unavailable(format!(
                "site {site:?} has no peer address"
            ))));
        };
        let grants = grants_for(site, jobs, ids);
        let message = DeliverRequest {
            request_id,
            metadata: encoded.clone(),
            grants,
        };
        let labels = [
            ("kme", shared.config.kme_id.clone()),
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
        return Ok(());
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
    let error = ApiError::Unavailable(reasons.join("; "));
    Err(if refused {
        BatchError::Refused(error)
    } else {
        BatchError::Other(error)
    })
}

/// Destroys a failed batch's keys at every peer site (ordinary keys by ID, ready keys of this
/// site's pool toward it by position), retrying in the background until each site confirms
/// or the keys would have expired anyway; then, if the request was `recorded` as in flight,
/// forgets that record (a crash before then withdraws it again at the next start).
fn withdraw(
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
fn owner(shared: &Shared) -> String {
    shared.config.replica.clone().unwrap_or_default()
}

/// Records durably that request `request_id` is about to reach `sites` (see
/// [`KeyStore::record_in_flight`]), before its first peer message.
async fn record_in_flight(
    shared: &Shared,
    request_id: Uuid,
    sites: &[String],
    ids: &[Uuid],
    ready: &[u64],
) -> Result<(), ApiError> {
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
        .map_err(ApiError::from)
}

/// Forgets the in-flight record of a request no peer acted on, in the background (a record
/// left behind only costs an idempotent withdrawal at the next start).
fn forget_in_flight(shared: &Shared, request_id: Uuid) {
    let store = shared.store.clone();
    tokio::spawn(async move {
        if let Err(e) = store.forget_in_flight(&[request_id]).await {
            tracing::warn!(%request_id, error = %e, "could not forget an in-flight request");
        }
    });
}

/// How often a process asks again for the claim on its in-flight records while another live
/// process of its site (started with the same replica name) holds it.
const IN_FLIGHT_CLAIM_RETRY: Duration = Duration::from_secs(2);

/// Withdraws every request this process (by its replica name) left unanswered when it last
/// stopped: shreds this site's copies (ready keys of an unanswered bind, keys of a caller
/// that left) now, and the peers' in the background, retrying until each confirms; each
/// record is forgotten once its peers have. Only the process that holds the claim on these
/// records does it, so a live process started with the same replica name is never undone.
async fn recover_in_flight(shared: &Arc<Shared>) -> Result<(), StoreError> {
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

async fn withdraw_unanswered(shared: &Shared) -> Result<(), StoreError> {
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
        "withdrawing the keys of requests left unanswered when this process stopped"
    );
    for record in records {
        shared.store.destroy(&record.key_ids).await?;
        if let [site] = record.sites.as_slice() {
            if !record.ready.is_empty() {
                let name = crate::pools::link_name(
                    &shared.config.kme_id,
                    site,
                    shared.config.replica.as_deref(),
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

/// The answer to a request whose deadline passed before every site had stored its keys
/// (`cause`: what it was waiting for, when known).
fn deadline_passed(shared: &Shared, remote: &[String], cause: Option<&str>) -> ApiError {
    let sites: Vec<String> = remote.iter().map(|s| format!("{s:?}")).collect();
    let whom = match sites.as_slice() {
        [] => format!("site {:?}", shared.config.kme_id),
        [one] => format!("site {one}"),
        many => format!("sites {}", many.join(", ")),
    };
    let cause = cause.map(|c| format!(" ({c})")).unwrap_or_default();
    ApiError::Unavailable(format!(
        "the request's deadline passed ({} ms after it arrived) before {whom} stored its keys{cause}",
        shared.config.peer_timeout.as_millis()
    ))
}

/// Maps a key-source failure to the answer the caller (SAE or peer) gets.
pub(crate) fn source_error(e: KeySourceError) -> ApiError {
    match e {
        KeySourceError::BadMetadata(_) => ApiError::BadRequest(e.to_string()),
        other => ApiError::Unavailable(other.to_string()),
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
