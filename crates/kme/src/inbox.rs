//! The receiving side of the peer protocol: what this site does when another site's KME
//! delivers keys, fills or binds ready keys of its pool toward this site, or withdraws keys.
//!
//! [`PeerInbox`] knows nothing of HTTP: the peer routes in [`crate::api`] call it over the
//! network, and an in-memory [`crate::peer::Peer`] can call it directly. Every message is
//! idempotent by its request ID, and a withdrawal that overtakes its delivery wins.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use dqkd_store::{KeyStore, NewKey, PoolGrant, PoolKey, Slot, TakeError};
use uuid::Uuid;

use crate::config::Config;
use crate::issuer::{source_error, store_names};
use crate::keysource::KeySource;
use crate::peer::{
    BindAck, BindRequest, DeliverAck, DeliverRequest, DestroyAck, DestroyRequest, FillAck,
    FillRequest, Grant,
};
use crate::scope::PeerScope;
pub use crate::scope::VerifiedKme;
use crate::ApiError;

mod reconcile;

/// How many completed deliver request IDs a site remembers for idempotent retries.
const REMEMBERED_REQUESTS: usize = 65_536;

/// What this site does for its peers, apart from HTTP.
pub struct PeerInbox {
    config: Arc<Config>,
    store: Arc<dyn KeyStore>,
    source: Arc<dyn KeySource>,
    delivered: Mutex<Remembered>,
}

/// Deliver requests this site completed or had withdrawn, oldest first, bounded. Keyed
/// by the requesting site too, so one peer cannot touch another's requests.
#[derive(Default)]
struct Remembered {
    order: VecDeque<(String, Uuid)>,
    outcomes: HashMap<(String, Uuid), Outcome>,
}

/// What became of a deliver request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Stored this many keys.
    Delivered(usize),
    /// The origin withdrew it (destroy): it must never store keys again.
    Withdrawn,
}

impl PeerInbox {
    /// An inbox over this site's store and key source (which regenerates peers' keys).
    pub fn new(config: Arc<Config>, store: Arc<dyn KeyStore>, source: Arc<dyn KeySource>) -> Self {
        Self {
            config,
            store,
            source,
            delivered: Mutex::new(Remembered::default()),
        }
    }

    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Accepts a caller whose certificate names another site of the cluster.
    pub fn verify_kme(
        &self,
        identity: Option<&dqkd_pki::Identity>,
    ) -> Result<VerifiedKme, ApiError> {
        VerifiedKme::check(identity, &self.config)
    }

    /// Peer `deliver`: regenerate the keys another site made and hold them for our SAEs.
    /// Answers only after they are durably stored.
    pub async fn peer_deliver(
        &self,
        peer: &VerifiedKme,
        request: DeliverRequest,
    ) -> Result<DeliverAck, ApiError> {
        let started = tokio::time::Instant::now();
        match self.remembered(peer, request.request_id) {
            Some(Outcome::Delivered(stored)) => {
                return Ok(DeliverAck {
                    request_id: request.request_id,
                    stored,
                })
            }
            Some(Outcome::Withdrawn) => {
                return Err(ApiError::BadRequest(format!(
                    "request {} was withdrawn by its origin",
                    request.request_id
                )))
            }
            None => {}
        }
        PeerScope::new(peer, &self.config).check_grants(
            "deliver",
            request.request_id,
            &request.grants,
        )?;
        self.check_slaves(&request.grants)?;
        let metadata = base64::engine::general_purpose::STANDARD
            .decode(&request.metadata)
            .map_err(|e| ApiError::BadRequest(format!("metadata is not Base64: {e}")))?;
        let mut keys: HashMap<Uuid, _> = self
            .source
            .regenerate(&metadata)
            .await
            .map_err(source_error)?
            .into_iter()
            .collect();
        self.check_sizes(keys.iter().map(|(id, k)| (id, k.as_bytes().len())))?;
        let granted: usize = request.grants.iter().map(|g| g.key_ids.len()).sum();
        let distinct: BTreeSet<&Uuid> = request.grants.iter().flat_map(|g| &g.key_ids).collect();
        if granted != keys.len() || distinct.len() != granted {
            return Err(ApiError::BadRequest(
                "the grants must name every key of the metadata exactly once".into(),
            ));
        }
        self.check_quota(&request.grants)?;
        let expires_at = self
            .config
            .clock
            .unix_now()
            .saturating_add(self.config.key_ttl.as_secs());
        let mut records = Vec::with_capacity(granted);
        for grant in &request.grants {
            for id in &grant.key_ids {
                let material = keys.remove(id).ok_or_else(|| {
                    ApiError::BadRequest(format!("key {id} is not in the metadata"))
                })?;
                records.push(NewKey {
                    id: *id,
                    master: grant.master.to_string(),
                    slaves: store_names(&grant.slaves),
                    material,
                    expires_at,
                });
            }
        }
        let ids: Vec<Uuid> = records.iter().map(|r| r.id).collect();
        self.store.insert(records).await?;
        // The origin gives up after peers.timeout_ms. Keys stored after half of that may
        // reach it too late to count, so they are withdrawn here rather than left for a
        // destroy that may already have passed (or gone to another replica).
        if started.elapsed() > self.config.peer_timeout / 2 {
            self.store.destroy(&ids).await?;
            return Err(ApiError::Unavailable(format!(
                "regenerating request {} took {:?}, too long for the origin to wait",
                request.request_id,
                started.elapsed()
            )));
        }
        // A destroy for this request may have overtaken it while the keys were being
        // regenerated; it marked the request first, so checking after the insert closes
        // the race (either we see the mark, or its destroy runs after our insert).
        if self.remembered(peer, request.request_id) == Some(Outcome::Withdrawn) {
            self.store.destroy(&ids).await?;
            return Err(ApiError::BadRequest(format!(
                "request {} was withdrawn by its origin",
                request.request_id
            )));
        }
        self.remember(peer, request.request_id, Outcome::Delivered(granted));
        tracing::info!(
            target: "dqkd::audit",
            event = "keys_regenerated",
            peer = peer.id(),
            grants = request.grants.len(),
            key_ids = ?ids,
        );
        Ok(DeliverAck {
            request_id: request.request_id,
            stored: granted,
        })
    }

    /// Peer `fill`: regenerate ready keys the peer made for its pool toward this site and
    /// hold them, bound to no SAE, until the peer binds or they expire. Answers only after
    /// they are durably stored.
    pub async fn peer_fill(
        &self,
        peer: &VerifiedKme,
        request: FillRequest,
    ) -> Result<FillAck, ApiError> {
        match self.remembered(peer, request.request_id) {
            Some(Outcome::Delivered(stored)) => {
                return Ok(FillAck {
                    request_id: request.request_id,
                    stored,
                })
            }
            Some(Outcome::Withdrawn) => return Err(withdrawn(request.request_id)),
            None => {}
        }
        let link = PeerScope::new(peer, &self.config).pool(request.replica.as_ref());
        let now = self.config.clock.unix_now();
        if request.expires_at <= now {
            return Err(ApiError::BadRequest(
                "the ready keys of this fill have already expired".into(),
            ));
        }
        let metadata = base64::engine::general_purpose::STANDARD
            .decode(&request.metadata)
            .map_err(|e| ApiError::BadRequest(format!("metadata is not Base64: {e}")))?;
        let keys = self
            .source
            .regenerate(&metadata)
            .await
            .map_err(source_error)?;
        self.check_sizes(keys.iter().map(|(id, k)| (id, k.as_bytes().len())))?;
        // The origin sets the expiry; this site caps it by its own pool TTL so no peer can
        // park keys here for longer than the manifest allows.
        let max_life = self
            .config
            .pools
            .ttl_secs
            .max(self.config.key_ttl.as_secs());
        let expires_at = request.expires_at.min(now.saturating_add(max_life));
        let stored = keys.len();
        if request.first_seq.checked_add(stored as u64).is_none() {
            return Err(ApiError::BadRequest(format!(
                "pool positions from {} for {stored} keys overflow",
                request.first_seq
            )));
        }
        let seqs: Vec<u64> = (request.first_seq..).take(stored).collect();
        let ready = keys
            .into_iter()
            .zip(&seqs)
            .map(|((id, material), &seq)| PoolKey {
                slot: Slot { seq, id },
                material,
                expires_at,
            })
            .collect();
        self.store.pool_insert(&link, ready).await?;
        // As for deliveries: a destroy that overtook this fill marked the request first.
        if self.remembered(peer, request.request_id) == Some(Outcome::Withdrawn) {
            self.store.pool_remove(&link, &seqs).await?;
            return Err(withdrawn(request.request_id));
        }
        self.remember(peer, request.request_id, Outcome::Delivered(stored));
        tracing::debug!(peer = peer.id(), stored, "ready keys regenerated");
        Ok(FillAck {
            request_id: request.request_id,
            stored,
        })
    }

    /// Peer `bind`: ready keys the peer filled leave the pool for the SAEs it names, all or
    /// none. 409 if any is no longer ready here, so the origin makes keys on demand.
    pub async fn peer_bind(
        &self,
        peer: &VerifiedKme,
        request: BindRequest,
    ) -> Result<BindAck, ApiError> {
        let started = tokio::time::Instant::now();
        match self.remembered(peer, request.request_id) {
            Some(Outcome::Delivered(bound)) => {
                return Ok(BindAck {
                    request_id: request.request_id,
                    bound,
                })
            }
            Some(Outcome::Withdrawn) => return Err(withdrawn(request.request_id)),
            None => {}
        }
        let scope = PeerScope::new(peer, &self.config);
        let link = scope.pool(request.replica.as_ref());
        scope.check_grants("bind", request.request_id, &request.grants)?;
        self.check_slaves(&request.grants)?;
        self.check_quota(&request.grants)?;
        let ids: Vec<Uuid> = request
            .grants
            .iter()
            .flat_map(|g| g.key_ids.iter().copied())
            .collect();
        if request.positions.len() != ids.len() {
            return Err(ApiError::BadRequest(format!(
                "{} pool positions for {} keys",
                request.positions.len(),
                ids.len()
            )));
        }
        let now = self.config.clock.unix_now();
        let expires_at = now.saturating_add(self.config.key_ttl.as_secs());
        let mut positions = request.positions.iter();
        let grants: Vec<PoolGrant> = request
            .grants
            .iter()
            .map(|g| PoolGrant {
                slots: g
                    .key_ids
                    .iter()
                    .zip(positions.by_ref())
                    .map(|(&id, &seq)| Slot { seq, id })
                    .collect(),
                master: g.master.to_string(),
                slaves: store_names(&g.slaves),
                expires_at,
            })
            .collect();
        let bound = match self.store.pool_bind(&link, grants, now).await {
            Ok(keys) => keys.len(),
            Err(TakeError::NotFound) => {
                return Err(ApiError::Conflict(format!(
                    "some of these keys are not ready at {:?} (unknown, expired or bound)",
                    self.config.kme_id
                )))
            }
            Err(other) => return Err(other.into()),
        };
        // The same late-answer and overtaking-destroy rules as a delivery.
        if started.elapsed() > self.config.peer_timeout / 2 {
            self.store.destroy(&ids).await?;
            return Err(ApiError::Unavailable(format!(
                "binding request {} took {:?}, too long for the origin to wait",
                request.request_id,
                started.elapsed()
            )));
        }
        if self.remembered(peer, request.request_id) == Some(Outcome::Withdrawn) {
            self.store.destroy(&ids).await?;
            return Err(withdrawn(request.request_id));
        }
        self.remember(peer, request.request_id, Outcome::Delivered(bound));
        tracing::info!(
            target: "dqkd::audit",
            event = "keys_bound",
            peer = peer.id(),
            grants = request.grants.len(),
            key_ids = ?ids,
        );
        Ok(BindAck {
            request_id: request.request_id,
            bound,
        })
    }

    /// Peer `destroy`: shred the keys of a request that failed at its origin.
    ///
    /// Only keys the caller originated: if any key named is held here for another site's
    /// master, 403 and nothing changes (the store checks and destroys atomically). Keys that
    /// are already gone are skipped, so the origin's retries succeed; a caller that names
    /// another site's key learns only that it is still held here, which needs its unguessable
    /// ID. Ready keys are withdrawn from the caller's own pool only.
    pub async fn peer_destroy(
        &self,
        peer: &VerifiedKme,
        request: DestroyRequest,
    ) -> Result<DestroyAck, ApiError> {
        let scope = PeerScope::new(peer, &self.config);
        // Marked before the keys go, so that a delivery of this request still in flight sees
        // it after its insert (see `peer_deliver`); undone if the destroy is refused.
        let before = self.remember(peer, request.request_id, Outcome::Withdrawn);
        let result = self
            .store
            .destroy_of(&scope.masters(), &request.key_ids)
            .await;
        if matches!(result, Err(TakeError::Unauthorized)) {
            self.restore(peer, request.request_id, before);
        }
        let mut destroyed =
            scope.destroyed("destroy", request.request_id, request.key_ids.len(), result)?;
        if !request.ready.is_empty() {
            // Checked after the ordinary keys are gone: a bad name must not keep them.
            let link = scope.pool(request.replica.as_ref());
            destroyed += self.store.pool_remove(&link, &request.ready).await?;
        }
        tracing::info!(
            target: "dqkd::audit",
            event = "keys_destroyed",
            peer = peer.id(),
            request_id = %request.request_id,
            destroyed,
            key_ids = ?request.key_ids,
        );
        Ok(DestroyAck { destroyed })
    }

    /// Every grant names slaves, all SAEs of this site. (Whether its master is the caller's
    /// is [`PeerScope::check_grants`].)
    fn check_slaves(&self, grants: &[Grant]) -> Result<(), ApiError> {
        let own = self.config.own_site();
        for grant in grants {
            if grant.slaves.is_empty() {
                return Err(ApiError::BadRequest("a grant names no slave SAE".into()));
            }
            if let Some(stranger) = grant.slaves.iter().find(|s| !own.saes.contains(s.as_str())) {
                return Err(ApiError::BadRequest(format!(
                    "{stranger:?} is not an SAE of site {:?}",
                    self.config.kme_id
                )));
            }
        }
        Ok(())
    }

    /// No master/slave pair may have more than `max_key_count` keys waiting here.
    fn check_quota(&self, grants: &[Grant]) -> Result<(), ApiError> {
        let limits = &self.config.limits;
        let mut wanted: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for grant in grants {
            for s in &grant.slaves {
                *wanted
                    .entry((grant.master.as_str(), s.as_str()))
                    .or_default() += grant.key_ids.len() as u64;
            }
        }
        for ((master, slave), count) in wanted {
            let pending = self.store.pending(master, slave);
            if pending + count > limits.max_key_count {
                return Err(ApiError::Unavailable(format!(
                    "{pending} keys for {master}→{slave} are waiting at {:?}; max_key_count is {}",
                    self.config.kme_id, limits.max_key_count
                )));
            }
        }
        Ok(())
    }

    /// Every regenerated key has a size this cluster allows.
    fn check_sizes<'a>(
        &self,
        mut keys: impl Iterator<Item = (&'a Uuid, usize)>,
    ) -> Result<(), ApiError> {
        let (min, max) = (
            self.config.limits.min_key_size as usize / 8,
            self.config.limits.max_key_size as usize / 8,
        );
        match keys.find(|(_, len)| !(min..=max).contains(len)) {
            Some((id, _)) => Err(ApiError::BadRequest(format!(
                "key {id} is outside this cluster's key sizes"
            ))),
            None => Ok(()),
        }
    }

    fn remembered(&self, peer: &VerifiedKme, request_id: Uuid) -> Option<Outcome> {
        let guard = self
            .delivered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        guard
            .outcomes
            .get(&(peer.id().to_owned(), request_id))
            .copied()
    }

    /// Records what became of a request; returns what was recorded before.
    fn remember(&self, peer: &VerifiedKme, request_id: Uuid, outcome: Outcome) -> Option<Outcome> {
        let key = (peer.id().to_owned(), request_id);
        let mut guard = self
            .delivered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let before = guard.outcomes.insert(key.clone(), outcome);
        if before.is_none() {
            guard.order.push_back(key);
        }
        while guard.order.len() > REMEMBERED_REQUESTS {
            if let Some(old) = guard.order.pop_front() {
                guard.outcomes.remove(&old);
            }
        }
        before
    }

    /// Puts back what [`PeerInbox::remember`] replaced.
    fn restore(&self, peer: &VerifiedKme, request_id: Uuid, before: Option<Outcome>) {
        let key = (peer.id().to_owned(), request_id);
        let mut guard = self
            .delivered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match before {
            Some(outcome) => {
                guard.outcomes.insert(key, outcome);
            }
            None => {
                guard.outcomes.remove(&key);
                if let Some(at) = guard.order.iter().rposition(|k| *k == key) {
                    guard.order.remove(at);
                }
            }
        }
    }
}

fn withdrawn(request_id: Uuid) -> ApiError {
    ApiError::BadRequest(format!("request {request_id} was withdrawn by its origin"))
}
