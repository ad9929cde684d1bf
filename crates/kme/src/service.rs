//! The SAE-facing key service: what `status`, `enc_keys` and `dec_keys` mean for this site,
//! apart from HTTP. What this site does for its peers is [`crate::inbox`].
//!
//! It resolves SAE and KME IDs against the cluster manifest, authorises the caller, asks
//! the key source for keys, has every involved site store them durably before the master
//! sees them, and delivers each key once to each slave.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use dqkd_etsi014::{Key, KeyContainer, KeyRequest, Status};
use dqkd_pki::Name;
use dqkd_store::{DeliveredKey, KeyStore, TakeError};
use uuid::Uuid;

use crate::config::Config;
use crate::inbox::PeerInbox;
use crate::issuer::{Deadline, Issuer, Order};
use crate::keysource::KeySource;
use crate::peer::Peer;
use crate::ApiError;

/// An SAE of this site, as proven by its client certificate.
///
/// Only [`KeyService::verify_sae`] makes one, so no ETSI method can run for a caller whose
/// certificate was not checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSae {
    id: Name,
}

impl VerifiedSae {
    /// The SAE ID from the certificate.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The SAE ID, as the checked name.
    pub fn name(&self) -> &Name {
        &self.id
    }
}

/// Who a path segment (`{slave_SAE_ID}` or `{master_SAE_ID}`) names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// One SAE, at the given site.
    Sae { sae: Name, site: Name },
    /// A KME ID: any SAE of that site.
    Site { site: Name },
}

/// Serves the ETSI 014 methods for the SAEs of one site.
pub struct KeyService {
    config: Arc<Config>,
    store: Arc<dyn KeyStore>,
    issuer: Issuer,
    inbox: Arc<PeerInbox>,
}

impl KeyService {
    /// A service over the given store, key source and peer clients (by KME ID).
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn KeyStore>,
        source: Arc<dyn KeySource>,
        peers: BTreeMap<String, Arc<dyn Peer>>,
    ) -> Self {
        Self {
            issuer: Issuer::new(config.clone(), store.clone(), source.clone(), peers),
            inbox: Arc::new(PeerInbox::new(config.clone(), store.clone(), source)),
            config,
            store,
        }
    }

    /// What this site does for its peers (the peer API serves it), over the same store.
    pub fn inbox(&self) -> Arc<PeerInbox> {
        self.inbox.clone()
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
            id: identity.id().clone(),
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
            source_KME_ID: self.config.kme_id.to_string(),
            target_KME_ID: site.to_string(),
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
        let mut local: Vec<Name> = by_site.get(own).cloned().unwrap_or_default();
        let remote: BTreeMap<Name, Vec<Name>> = by_site
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
            local.push(caller.name().clone());
        }
        let keys = self
            .issuer
            .issue(
                Order {
                    master: caller.name().clone(),
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
        let masters = self.masters_named(caller, master);
        let delivered = self
            .store
            .take(caller.id(), &masters, ids, self.config.clock.unix_now())
            .await
            .map_err(|e| match e {
                TakeError::Unauthorized => ApiError::Unauthorized(format!(
                    "SAE {:?} may not fetch these keys from {master:?}",
                    caller.id()
                )),
                other => other.into(),
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

    /// Whose keys a `dec_keys` path segment lets `caller` take: the segment names the key's
    /// other party. For a slave that is the master (the standard's reading); a KME ID means
    /// any SAE of that site. For a master fetching its own key again it may also be a slave of
    /// the key (an SAE ID or its KME ID), as some clients send it; then the caller's own keys
    /// are added. That adds no access: a master reaches the same keys by naming itself, the
    /// store still checks that the caller is entitled to each key, and each copy is delivered
    /// once. A segment naming no SAE or KME of the cluster reads as before.
    fn masters_named(&self, caller: &VerifiedSae, named: &str) -> Vec<String> {
        let mut masters: Vec<String> = match self.config.sites.get(named) {
            Some(site) => site.saes.iter().map(Name::to_string).collect(),
            None => vec![named.to_owned()],
        };
        let names_a_party = self.config.sites.contains_key(named)
            || self
                .config
                .sites
                .values()
                .any(|site| site.saes.contains(named));
        let refetch_naming_other_party = self.config.master_refetch && names_a_party;
        if refetch_naming_other_party && !masters.iter().any(|m| m == caller.id()) {
            masters.push(caller.id().to_owned());
        }
        masters
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
        Ok(self
            .store
            .purge_expired(self.config.clock.unix_now())
            .await?)
    }

    fn resolve(&self, id: &str, role: &str) -> Result<Target, ApiError> {
        if id.trim().is_empty() {
            return Err(ApiError::BadRequest(format!(
                "{role} SAE ID must not be blank"
            )));
        }
        if let Some((sae, site)) = self.config.sae_site.get_key_value(id) {
            return Ok(Target::Sae {
                sae: sae.clone(),
                site: site.clone(),
            });
        }
        if let Some(site) = self.config.sites.get(id) {
            return Ok(Target::Site {
                site: site.kme_id.clone(),
            });
        }
        Err(ApiError::BadRequest(format!(
            "unknown {role} SAE ID {id:?}: it is neither an SAE nor a KME of cluster {:?}",
            self.config.cluster
        )))
    }

    /// The SAEs entitled to keys addressed to `target` by `caller`.
    fn slaves_of(&self, caller: &VerifiedSae, target: &Target) -> Result<Vec<Name>, ApiError> {
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
                let others: Vec<Name> = self.config.sites[site]
                    .saes
                    .iter()
                    .filter(|s| *s != caller.name())
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
    ) -> Result<BTreeMap<Name, Vec<Name>>, ApiError> {
        let target = self.resolve(slave, "slave")?;
        let mut by_site: BTreeMap<Name, Vec<Name>> = BTreeMap::new();
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

fn wire_key(id: Uuid, bytes: &[u8]) -> Key {
    Key {
        key_ID: id.to_string(),
        key: base64::engine::general_purpose::STANDARD.encode(bytes),
        key_ID_extension: None,
        key_extension: None,
    }
}
