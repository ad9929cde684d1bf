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
//! them at every site first (a bind's ready keys the peer still holds are kept: `reconcile`).
//!
//! The jobs are split by module: this file batches requests and runs a batch; `outbound`
//! delivers to peers and withdraws; `bind` serves a batch from a ready pool; `refill` keeps
//! the pools filled. A batch stores this site's copy only with the `PeersStored`
//! proof that every peer stored theirs first.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use dqkd_pki::Name;
use dqkd_store::{InFlight, KeyMaterial, KeyStore, NewKey, PoolGrant, PoolKey, Slot, StoreError};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::config::Config;
use crate::keysource::{KeySource, KeySourceError};
use crate::peer::{
    self, BindRequest, DeliverRequest, DestroyRequest, FillRequest, Grant, Peer, PeerError,
};
use crate::pools::{LinkPool, Pools};
use crate::ApiError;

mod bind;
mod error;
mod outbound;
mod reconcile;
mod recovery;
mod refill;
mod size;
#[cfg(test)]
mod tests;
mod window;
#[cfg(test)]
mod window_tests;

use bind::{bind_ready, Bound};
use outbound::{deliver, record_in_flight, withdraw, PeersStored};
use recovery::recover_in_flight;
use refill::refill_loop;
use size::{message_bytes, pool_serves};
#[cfg(test)]
use window::MAX_IN_FLIGHT;
use window::{Admission, Window};

pub use error::IssueError;

/// What one enc_keys request needs issued.
#[derive(Debug, Clone)]
pub struct Order {
    /// The master SAE.
    pub master: Name,
    /// SAEs of this site entitled to fetch the keys here (slaves, and the master itself
    /// when it may fetch again).
    pub local: Vec<Name>,
    /// Slaves at other sites, by KME ID.
    pub remote: BTreeMap<Name, Vec<Name>>,
    /// Number of keys.
    pub count: usize,
    /// Key length in bytes.
    pub len: usize,
}

/// The store keeps SAE IDs as plain strings (its columns and indexes predate [`Name`]); this
/// is where names leave for it.
pub(crate) fn store_names(names: &[Name]) -> Vec<String> {
    names.iter().map(Name::to_string).collect()
}

/// Keys issued for one order.
pub type Issued = Vec<(Uuid, KeyMaterial)>;

/// When an enc_keys request must be answered: its arrival plus `peers.timeout_ms`. On
/// tokio's clock, so that tests can pause time.
pub type Deadline = tokio::time::Instant;

struct Job {
    order: Order,
    deadline: Deadline,
    reply: oneshot::Sender<Result<Issued, IssueError>>,
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
    peers: BTreeMap<String, Arc<dyn Peer>>,
    pools: Pools,
}

impl Shared {
    /// The Unix time on the configured clock.
    fn unix_now(&self) -> u64 {
        self.config.clock.unix_now()
    }
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
        peers: BTreeMap<String, Arc<dyn Peer>>,
    ) -> Self {
        let pools = Pools::new(
            &config.kme_id,
            config.replica.as_ref(),
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
    pub async fn issue(&self, order: Order, deadline: Deadline) -> Result<Issued, IssueError> {
        let link = Link {
            remote: order.remote.keys().map(Name::to_string).collect(),
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
        Err(IssueError::Internal("cannot queue the key request".into()))
    }

    /// The batch's answer, or 503 once `deadline` passes. Closing the channel then makes a
    /// later answer fail to arrive, so its batch destroys the keys at every site.
    async fn wait(
        &self,
        mut answer: oneshot::Receiver<Result<Issued, IssueError>>,
        deadline: Deadline,
        remote: &[String],
    ) -> Result<Issued, IssueError> {
        let dropped = || Err(IssueError::Internal("the key batch was dropped".into()));
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
    let window = Arc::new(Window::new(shared.config.peer_window_keys));
    loop {
        let Some(stage) = window.stage().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        // Requests whose deadline passed while they queued are not sent.
        let mut jobs: Vec<Job> = first.live(&shared, &link).into_iter().collect();
        let mut keys: usize = jobs.iter().map(|j| j.order.count).sum();
        let mut bytes = message_bytes(&jobs, peer::DELIVER_BYTES_PER_KEY);
        while keys < window.max_keys() && bytes < peer::MAX_MESSAGE_BYTES {
            match rx.try_recv() {
                Ok(job) => {
                    if let Some(job) = job.live(&shared, &link) {
                        keys += job.order.count;
                        bytes += job.order.wire_bytes(peer::DELIVER_BYTES_PER_KEY);
                        jobs.push(job);
                    }
                }
                Err(_) => break,
            }
        }
        if jobs.is_empty() {
            continue;
        }
        // Meanwhile new requests queue, and join the next batch.
        let Some(slot) = window.admit(stage, keys).await else {
            return;
        };
        let shared = shared.clone();
        let link = link.clone();
        let window = window.clone();
        tokio::spawn(async move {
            run_batch(&shared, &link, jobs, &window, slot).await;
        });
    }
}

/// Issues one batch. It works until the latest deadline among its requests, so that no
/// request fails for an older one batched with it; a request whose own deadline comes first
/// has its answer by then (see [`Issuer::wait`]).
async fn run_batch(
    shared: &Shared,
    link: &Link,
    jobs: Vec<Job>,
    window: &Window,
    mut slot: Admission,
) {
    let total: usize = jobs.iter().map(|j| j.order.count).sum();
    let started = Instant::now();
    let deadline = jobs
        .iter()
        .map(|j| j.deadline)
        .max()
        .unwrap_or_else(Deadline::now);
    let result = issue_batch(shared, link, &jobs, total, deadline, window, &mut slot).await;
    let kme = shared.config.kme_id.to_string();
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
        Err(IssueError::Refused(_)) if jobs.len() > 1 => {
            for job in jobs {
                let Some(job) = job.live(shared, link) else {
                    continue;
                };
                let single = std::slice::from_ref(&job);
                let count = job.order.count;
                match issue_batch(shared, link, single, count, job.deadline, window, &mut slot)
                    .await
                {
                    Ok(keys) => answer(shared, link, vec![job], keys).await,
                    Err(e) => {
                        let _ = job.reply.send(Err(e));
                    }
                }
            }
        }
        Err(e) => {
            if let IssueError::Internal(cause) = &e {
                tracing::error!(%cause, "issuing a key batch failed");
            }
            let message = e.to_string();
            let bad_request = matches!(e, IssueError::BadRequest(_));
            for job in jobs {
                let error = if bad_request {
                    IssueError::BadRequest(message.clone())
                } else {
                    IssueError::Unavailable(message.clone())
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
    window: &Window,
    slot: &mut Admission,
) -> Result<Issued, IssueError> {
    let pooled = pool_serves(window.network_bound(), jobs, total);
    if let ([site], true) = (link.remote.as_slice(), pooled) {
        if let Some(slots) = shared.pools.take(site, total, link.len, shared.unix_now()) {
            window.awaiting_peer(slot);
            let sent = tokio::time::Instant::now();
            let bound = bind_ready(shared, site, jobs, &slots, deadline).await;
            if bound.is_ok() {
                window.acknowledged(sent.elapsed());
            }
            match bound {
                Ok(keys) => return Ok(keys),
                Err(Bound::Missed) => {}
                Err(Bound::Failed(e)) => return Err(e),
            }
        }
    }
    window.awaiting_entropy(slot);
    let asked = tokio::time::Instant::now();
    let batch = shared
        .source
        .generate_by(total, link.len, &link.remote, deadline)
        .await
        .map_err(|e| {
            if Deadline::now() >= deadline {
                deadline_passed(shared, &link.remote, Some(&e.to_string()))
            } else {
                e.into()
            }
        })?;
    window.generated(asked.elapsed());
    let ids: Vec<Uuid> = batch.keys.iter().map(|(id, _)| *id).collect();
    let request_id = Uuid::new_v4();
    let stored = match PeersStored::no_peers(&link.remote) {
        Some(none_needed) => none_needed,
        None => {
            let metadata = batch.metadata.as_deref().ok_or_else(|| {
                IssueError::Internal("the key source gave no regeneration metadata".into())
            })?;
            record_in_flight(shared, request_id, &link.remote, &ids, &[]).await?;
            window.awaiting_peer(slot);
            let sent = tokio::time::Instant::now();
            let stored = deliver(shared, link, jobs, request_id, metadata, &ids, deadline).await?;
            window.acknowledged(sent.elapsed());
            stored
        }
    };

    let now = shared.unix_now();
    let mut records = Vec::new();
    for (job, keys) in per_job(jobs, &batch.keys) {
        if job.order.local.is_empty() {
            continue;
        }
        let expires_at = local_expiry(shared, &job.order, now);
        for (id, material) in keys {
            records.push(NewKey {
                id: *id,
                master: job.order.master.to_string(),
                slaves: store_names(&job.order.local),
                material: material.clone(),
                expires_at,
            });
        }
    }
    if let Err(e) = store_here(shared, stored, link, records, request_id).await {
        if !link.remote.is_empty() {
            withdraw(shared, request_id, &link.remote, &ids, &[], true);
        }
        return Err(e.into());
    }
    Ok(batch.keys)
}

/// Stores this site's copy of a batch's keys, which only the proof that every peer site
/// stored them first allows. A cross-site batch's in-flight record leaves in the same commit.
async fn store_here(
    shared: &Shared,
    _stored: PeersStored,
    link: &Link,
    records: Vec<NewKey>,
    request_id: Uuid,
) -> Result<(), StoreError> {
    if !link.remote.is_empty() {
        return shared
            .store
            .insert_answering(records, Some(request_id))
            .await;
    }
    // Same-site: no peer holds anything, so no record to answer.
    if records.is_empty() {
        return Ok(());
    }
    shared.store.insert(records).await
}

/// Each job with its share of `items` (the batch's keys, IDs or pool slots, in job order):
/// job `i` gets the next `count` of them. The one place keys are matched to requests.
fn per_job<'a, T>(jobs: &'a [Job], items: &'a [T]) -> impl Iterator<Item = (&'a Job, &'a [T])> {
    let mut rest = items;
    jobs.iter().map(move |job| {
        let (mine, others) = rest.split_at(job.order.count.min(rest.len()));
        rest = others;
        (job, mine)
    })
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

/// The answer to a request whose deadline passed before every site had stored its keys
/// (`cause`: what it was waiting for, when known).
fn deadline_passed(shared: &Shared, remote: &[String], cause: Option<&str>) -> IssueError {
    let sites: Vec<String> = remote.iter().map(|s| format!("{s:?}")).collect();
    let whom = match sites.as_slice() {
        [] => format!("site {:?}", shared.config.kme_id),
        [one] => format!("site {one}"),
        many => format!("sites {}", many.join(", ")),
    };
    let cause = cause.map(|c| format!(" ({c})")).unwrap_or_default();
    IssueError::Unavailable(format!(
        "the request's deadline passed ({} ms after it arrived) before {whom} stored its keys{cause}",
        shared.config.peer_timeout.as_millis()
    ))
}

/// Maps a key-source failure to the answer the caller (SAE or peer) gets.
pub(crate) fn source_error(e: KeySourceError) -> ApiError {
    IssueError::from(e).into()
}
