//! The key service: what `status`, `enc_keys` and `dec_keys` mean for this site, and what
//! this site does when a peer delivers or withdraws keys, apart from HTTP.
//!
//! It resolves SAE and KME IDs against the cluster manifest, authorises the caller, asks
//! the key source for keys, has every involved site store them durably before the master
//! sees them, and delivers each key once to each slave.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use dqkd_etsi014::{Key, KeyContainer, KeyRequest, Status};
use dqkd_store::{DeliveredKey, KeyStore, NewKey, PoolGrant, PoolKey, Slot, TakeError};
use uuid::Uuid;

use crate::config::Config;
use crate::issuer::{source_error, unix_now, Deadline, Issuer, Order};
use crate::keysource::KeySource;
use crate::peer::{
    BindAck, BindRequest, DeliverAck, DeliverRequest, DestroyAck, DestroyRequest, FillAck,
    FillRequest, Grant, PeerClient,
};
use crate::scope::PeerScope;
use crate::ApiError;

/// How many completed deliver request IDs a site remembers for idempotent retries.
const REMEMBERED_REQUESTS: usize = 65_536;

/// An SAE of this site, as proven by its client certificate.
///
/// Only [`KeyService::verify_sae`] makes one, so no ETSI method can run for a caller whose
/// certificate was not checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSae {
    id: String,
}

impl VerifiedSae {
    /// The SAE ID from the certificate.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// Another site's KME, as proven by its client certificate.
///
/// Only [`KeyService::verify_kme`] makes one, so no peer method can run without it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedKme {
    id: String,
}

impl VerifiedKme {
    /// The peer's KME ID.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// Who a path segment (`{slave_SAE_ID}` or `{master_SAE_ID}`) names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// One SAE, at the given site.
    Sae { sae: String, site: String },
    /// A KME ID: any SAE of that site.
    Site { site: String },
}

/// Serves the ETSI 014 methods and the peer API for one site.
pub struct KeyService {
    config: Arc<Config>,
    store: Arc<dyn KeyStore>,
    source: Arc<dyn KeySource>,
    issuer: Issuer,
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

impl KeyService {
    /// A service over the given store, key source and peer clients (by KME ID).
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn KeyStore>,
        source: Arc<dyn KeySource>,
        peers: BTreeMap<String, PeerClient>,
    ) -> Self {
        Self {
            issuer: Issuer::new(config.clone(), store.clone(), source.clone(), peers),
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

    /// Accepts a caller whose certificate names an SAE of this site.
    pub fn verify_sae(
        &self,
        identity: Option<&dqkd_pki::Identity>,
    ) -> Result<VerifiedSae, ApiError> {
        let identity = identity.ok_or_else(|| {
            ApiError::Unauthorized("the client certificate carries no dqkd identity".into())
        })?;
        if identity.role() != dqkd_pki::Role::Sae {
            return Err(ApiError::Unauthorized(format!(
                "{} is not an SAE certificate; the key delivery API is for SAEs",
                identity.uri()
            )));
        }
        if !self.config.own_site().saes.contains(identity.id()) {
            return Err(ApiError::Unauthorized(format!(
                "SAE {:?} is not registered at KME {:?}",
                identity.id(),
                self.config.kme_id
            )));
        }
        Ok(VerifiedSae {
            id: identity.id().to_owned(),
        })
    }

    /// Accepts a caller whose certificate names another site of the cluster.
    pub fn verify_kme(
        &self,
        identity: Option<&dqkd_pki::Identity>,
    ) -> Result<VerifiedKme, ApiError> {
        let identity = identity.ok_or_else(|| {
            ApiError::Unauthorized("the client certificate carries no dqkd identity".into())
        })?;
        if identity.role() != dqkd_pki::Role::Kme
            || identity.id() == self.config.kme_id
            || !self.config.sites.contains_key(identity.id())
        {
            return Err(ApiError::Unauthorized(format!(
                "{} is not a peer site of KME {:?}",
                identity.uri(),
                self.config.kme_id
            )));
        }
        Ok(VerifiedKme {
            id: identity.id().to_owned(),
        })
    }

    /// `Get status` for the pair (caller, `slave`).
    pub fn status(&self, caller: &VerifiedSae, slave: &str) -> Result<Status, ApiError> {
        let target = self.resolve(slave, "slave")?;
        let slaves = self.slaves_of(caller, &target)?;
        let site = match &target {
            Target::Sae { site, .. } | Target::Site { site } => site.clone(),
        };
        if site != self.config.kme_id && !self.issuer.knows_peer(&site) {
            return Err(self.unreachable(&site));
        }
        let limits = &self.config.limits;
        // With a ready pool toward the slave's site, the keys ready now are its level.
        // Without one keys are made on demand, and what limits a pair is how many of its
        // keys wait here.
        let (stored_key_count, max_key_count) = match self.issuer.pool_level(&site) {
            Some(level) => level,
            None => {
                let pending = slaves
                    .iter()
                    .map(|s| self.store.pending(caller.id(), s))
                    .max()
                    .unwrap_or(0);
                (
                    limits.max_key_count.saturating_sub(pending),
                    limits.max_key_count,
                )
            }
        };
        Ok(Status {
            source_KME_ID: self.config.kme_id.clone(),
            target_KME_ID: site,
            master_SAE_ID: caller.id().to_owned(),
            slave_SAE_ID: slave.to_owned(),
            key_size: limits.default_key_size,
            stored_key_count,
            max_key_count,
            max_key_per_request: limits.max_key_per_request,
            max_key_size: limits.max_key_size,
            min_key_size: limits.min_key_size,
            max_SAE_ID_count: limits.max_sae_id_count,
            status_extension: None,
        })
    }

    /// `Get key`: makes `request.number` keys for the caller and its slaves.
    ///
    /// Every site with a slave stores the keys durably before the master gets them; if any
    /// site fails, the request answers 503 and its keys are destroyed everywhere.
    pub async fn enc_keys(
        &self,
        caller: &VerifiedSae,
        slave: &str,
        request: KeyRequest,
    ) -> Result<KeyContainer, ApiError> {
        // One deadline for everything this request waits for, from its arrival.
        let deadline = Deadline::now() + self.config.peer_timeout;
        let by_site = self.slaves_by_site(caller, slave, &request.additional_slaves)?;
        let own = self.config.kme_id.as_str();
        let mut local: Vec<String> = by_site.get(own).cloned().unwrap_or_default();
        let remote: BTreeMap<String, Vec<String>> = by_site
            .iter()
            .filter(|(site, _)| site.as_str() != own)
            .map(|(site, saes)| (site.clone(), saes.clone()))
            .collect();
        if let Some(site) = remote.keys().find(|s| !self.issuer.knows_peer(s)) {
            return Err(self.unreachable(site));
        }
        let limits = &self.config.limits;
        for s in &local {
            let pending = self.store.pending(caller.id(), s);
            if pending + u64::from(request.number) > limits.max_key_count {
                return Err(ApiError::Unavailable(format!(
                    "{pending} keys for {}→{s} are waiting to be fetched; max_key_count is {}",
                    caller.id(),
                    limits.max_key_count
                )));
            }
        }
        if self.config.master_refetch {
            local.push(caller.id().to_owned());
        }
        let keys = self
            .issuer
            .issue(
                Order {
                    master: caller.id().to_owned(),
                    local,
                    remote,
                    count: request.number as usize,
                    len: (request.size_bits / 8) as usize,
                },
                deadline,
            )
            .await?;
        let ids: Vec<Uuid> = keys.iter().map(|(id, _)| *id).collect();
        tracing::info!(
            target: "dqkd::audit",
            event = "keys_issued",
            master = caller.id(),
            slaves = ?by_site,
            count = ids.len(),
            size_bits = request.size_bits,
            key_ids = ?ids,
        );
        Ok(KeyContainer {
            keys: keys
                .iter()
                .map(|(id, material)| wire_key(*id, material.as_bytes()))
                .collect(),
            key_container_extension: None,
        })
    }

    /// `Get key with key IDs`: delivers the keys once to the calling slave, all or none.
    pub async fn dec_keys(
        &self,
        caller: &VerifiedSae,
        master: &str,
        ids: &[Uuid],
    ) -> Result<KeyContainer, ApiError> {
        if master.trim().is_empty() {
            return Err(ApiError::BadRequest(
                "master SAE ID must not be blank".into(),
            ));
        }
        // A KME ID in the path means "made by any SAE of that site".
        let masters: Vec<String> = match self.config.sites.get(master) {
            Some(site) => site.saes.iter().cloned().collect(),
            None => vec![master.to_owned()],
        };
        let delivered = self
            .store
            .take(caller.id(), &masters, ids, unix_now())
            .await
            .map_err(|e| match e {
                TakeError::NotFound => ApiError::KeysNotFound,
                TakeError::Unauthorized => ApiError::Unauthorized(format!(
                    "SAE {:?} may not fetch these keys from {master:?}",
                    caller.id()
                )),
                TakeError::Store(e) => e.into(),
                other => ApiError::Internal(format!("key store: {other}")),
            })?;
        tracing::info!(
            target: "dqkd::audit",
            event = "keys_delivered",
            slave = caller.id(),
            master,
            key_ids = ?ids,
        );
        Ok(KeyContainer {
            keys: delivered
                .iter()
                .map(|DeliveredKey { id, material }| wire_key(*id, material.as_bytes()))
                .collect(),
            key_container_extension: None,
        })
    }

    /// Peer `deliver`: regenerate the keys another site made and hold them for our SAEs.
    /// Answers only after they are durably stored.
    pub async fn peer_deliver(
        &self,
        peer: &VerifiedKme,
        request: DeliverRequest,
    ) -> Result<DeliverAck, ApiError> {
        let started = std::time::Instant::now();
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
        let expires_at = unix_now().saturating_add(self.config.key_ttl.as_secs());
        let mut records = Vec::with_capacity(granted);
        for grant in &request.grants {
            for id in &grant.key_ids {
                let material = keys.remove(id).ok_or_else(|| {
                    ApiError::BadRequest(format!("key {id} is not in the metadata"))
                })?;
                records.push(NewKey {
                    id: *id,
                    master: grant.master.clone(),
                    slaves: grant.slaves.clone(),
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
        let link = PeerScope::new(peer, &self.config).pool(request.replica.as_deref())?;
        let now = unix_now();
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
        let started = std::time::Instant::now();
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
        let link = scope.pool(request.replica.as_deref())?;
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
        let now = unix_now();
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
                master: g.master.clone(),
                slaves: g.slaves.clone(),
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
            Err(TakeError::Store(e)) => return Err(e.into()),
            Err(other) => return Err(ApiError::Internal(format!("key store: {other}"))),
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

    /// Every grant names slaves, all SAEs of this site. (Whether its master is the caller's
    /// is [`PeerScope::check_grants`].)
    fn check_slaves(&self, grants: &[Grant]) -> Result<(), ApiError> {
        let own = self.config.own_site();
        for grant in grants {
            if grant.slaves.is_empty() {
                return Err(ApiError::BadRequest("a grant names no slave SAE".into()));
            }
            if let Some(stranger) = grant.slaves.iter().find(|s| !own.saes.contains(*s)) {
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
        let mut destroyed = scope.destroyed(request.request_id, request.key_ids.len(), result)?;
        if !request.ready.is_empty() {
            // Checked after the ordinary keys are gone: a bad name must not keep them.
            let link = scope.pool(request.replica.as_deref())?;
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

    /// Reads the ready-key pools back from the store and starts their refill tasks.
    pub async fn start_pools(
        &self,
        stopped: tokio::sync::watch::Receiver<bool>,
    ) -> Result<u64, dqkd_store::StoreError> {
        self.issuer.start_pools(stopped).await
    }

    /// Shreds expired keys; returns how many.
    pub async fn purge_expired(&self) -> Result<u64, ApiError> {
        Ok(self.store.purge_expired(unix_now()).await?)
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

    /// Puts back what [`KeyService::remember`] replaced.
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

    fn resolve(&self, id: &str, role: &str) -> Result<Target, ApiError> {
        if id.trim().is_empty() {
            return Err(ApiError::BadRequest(format!(
                "{role} SAE ID must not be blank"
            )));
        }
        if let Some(site) = self.config.sae_site.get(id) {
            return Ok(Target::Sae {
                sae: id.to_owned(),
                site: site.clone(),
            });
        }
        if self.config.sites.contains_key(id) {
            return Ok(Target::Site {
                site: id.to_owned(),
            });
        }
        Err(ApiError::BadRequest(format!(
            "unknown {role} SAE ID {id:?}: it is neither an SAE nor a KME of cluster {:?}",
            self.config.cluster
        )))
    }

    /// The SAEs entitled to keys addressed to `target` by `caller`.
    fn slaves_of(&self, caller: &VerifiedSae, target: &Target) -> Result<Vec<String>, ApiError> {
        match target {
            Target::Sae { sae, .. } => {
                if sae == caller.id() {
                    return Err(ApiError::BadRequest(
                        "master and slave SAE must differ".into(),
                    ));
                }
                Ok(vec![sae.clone()])
            }
            Target::Site { site } => {
                let others: Vec<String> = self.config.sites[site]
                    .saes
                    .iter()
                    .filter(|s| *s != caller.id())
                    .cloned()
                    .collect();
                if others.is_empty() {
                    return Err(ApiError::BadRequest(format!(
                        "site {site:?} has no SAE other than the master"
                    )));
                }
                Ok(others)
            }
        }
    }

    /// Every slave of a request (the path's and the additional ones), grouped by site.
    fn slaves_by_site(
        &self,
        caller: &VerifiedSae,
        slave: &str,
        additional: &[String],
    ) -> Result<BTreeMap<String, Vec<String>>, ApiError> {
        let target = self.resolve(slave, "slave")?;
        let mut by_site: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let primary_site = match &target {
            Target::Sae { site, .. } | Target::Site { site } => site.clone(),
        };
        by_site.insert(primary_site, self.slaves_of(caller, &target)?);
        for extra in additional {
            let Target::Sae { sae, site } = self.resolve(extra, "additional slave")? else {
                return Err(ApiError::BadRequest(format!(
                    "additional_slave_SAE_IDs must name SAEs, and {extra:?} is a KME ID"
                )));
            };
            if sae == caller.id() {
                return Err(ApiError::BadRequest(
                    "additional_slave_SAE_IDs repeats the master SAE".into(),
                ));
            }
            if by_site.values().flatten().any(|s| *s == sae) {
                return Err(ApiError::BadRequest(format!(
                    "additional_slave_SAE_IDs repeats the slave SAE {sae:?}"
                )));
            }
            by_site.entry(site).or_default().push(sae);
        }
        Ok(by_site)
    }

    fn unreachable(&self, site: &str) -> ApiError {
        ApiError::Unavailable(format!(
            "site {site:?} is not reachable from KME {:?}: it has no peer address",
            self.config.kme_id
        ))
    }
}

fn withdrawn(request_id: Uuid) -> ApiError {
    ApiError::BadRequest(format!("request {request_id} was withdrawn by its origin"))
}

fn wire_key(id: Uuid, bytes: &[u8]) -> Key {
    Key {
        key_ID: id.to_string(),
        key: base64::engine::general_purpose::STANDARD.encode(bytes),
        key_ID_extension: None,
        key_extension: None,
    }
}
