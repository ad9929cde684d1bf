//! The key service: what `status`, `enc_keys` and `dec_keys` mean for this site, apart
//! from HTTP.
//!
//! It resolves SAE and KME IDs against the cluster manifest, authorises the caller, asks
//! the key source for keys, stores them durably for their slaves before the master sees
//! them, and delivers each key once to each slave.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use dqkd_etsi014::{Key, KeyContainer, KeyRequest, Status};
use dqkd_store::{DeliveredKey, KeyStore, NewKey, TakeError};
use uuid::Uuid;

use crate::config::Config;
use crate::keysource::KeySource;
use crate::ApiError;

/// An SAE of this site, as proven by its client certificate.
///
/// Only [`KeyService::verify_sae`] makes one, so no service method can run for a caller
/// whose certificate was not checked.
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

/// Who a path segment (`{slave_SAE_ID}` or `{master_SAE_ID}`) names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// One SAE, at the given site.
    Sae { sae: String, site: String },
    /// A KME ID: any SAE of that site.
    Site { site: String },
}

/// Serves the ETSI 014 methods for one site.
pub struct KeyService {
    config: Arc<Config>,
    store: Arc<dyn KeyStore>,
    source: Arc<dyn KeySource>,
}

impl KeyService {
    /// A service over the given store and key source.
    pub fn new(config: Arc<Config>, store: Arc<dyn KeyStore>, source: Arc<dyn KeySource>) -> Self {
        Self {
            config,
            store,
            source,
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

    /// `Get status` for the pair (caller, `slave`).
    pub fn status(&self, caller: &VerifiedSae, slave: &str) -> Result<Status, ApiError> {
        let target = self.resolve(slave, "slave")?;
        let slaves = self.slaves_of(caller, &target)?;
        let site = match &target {
            Target::Sae { site, .. } | Target::Site { site } => site.clone(),
        };
        let limits = &self.config.limits;
        let pending = slaves
            .iter()
            .map(|s| self.store.pending(caller.id(), s))
            .max()
            .unwrap_or(0);
        Ok(Status {
            source_KME_ID: self.config.kme_id.clone(),
            target_KME_ID: site,
            master_SAE_ID: caller.id().to_owned(),
            slave_SAE_ID: slave.to_owned(),
            key_size: limits.default_key_size,
            stored_key_count: limits.max_key_count.saturating_sub(pending),
            max_key_count: limits.max_key_count,
            max_key_per_request: limits.max_key_per_request,
            max_key_size: limits.max_key_size,
            min_key_size: limits.min_key_size,
            max_SAE_ID_count: limits.max_sae_id_count,
            status_extension: None,
        })
    }

    /// `Get key`: makes `request.number` keys for the caller and its slaves.
    ///
    /// The keys are durably stored for every slave before they are returned, so a key the
    /// master holds can always be fetched by its slaves.
    pub async fn enc_keys(
        &self,
        caller: &VerifiedSae,
        slave: &str,
        request: KeyRequest,
    ) -> Result<KeyContainer, ApiError> {
        let target = self.resolve(slave, "slave")?;
        let mut slaves = self.slaves_of(caller, &target)?;
        for extra in &request.additional_slaves {
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
            if slaves.contains(&sae) {
                return Err(ApiError::BadRequest(format!(
                    "additional_slave_SAE_IDs repeats the slave SAE {sae:?}"
                )));
            }
            self.require_local(&site)?;
            slaves.push(sae);
        }

        let limits = &self.config.limits;
        for s in &slaves {
            let pending = self.store.pending(caller.id(), s);
            if pending + u64::from(request.number) > limits.max_key_count {
                return Err(ApiError::Unavailable(format!(
                    "{pending} keys for {}→{s} are waiting to be fetched; max_key_count is {}",
                    caller.id(),
                    limits.max_key_count
                )));
            }
        }

        let len = (request.size_bits / 8) as usize;
        let materials = self
            .source
            .generate(request.number as usize, len)
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        let expires_at = unix_now().saturating_add(self.config.key_ttl.as_secs());
        let ids: Vec<Uuid> = materials.iter().map(|_| Uuid::new_v4()).collect();
        let mut keys = Vec::with_capacity(materials.len());
        let mut container = Vec::with_capacity(materials.len());
        for (id, material) in ids.iter().zip(materials) {
            container.push(wire_key(*id, material.as_bytes()));
            keys.push(NewKey {
                id: *id,
                master: caller.id().to_owned(),
                slaves: slaves.clone(),
                material,
                expires_at,
            });
        }
        self.store.insert(keys).await?;
        tracing::info!(
            target: "dqkd::audit",
            event = "keys_issued",
            master = caller.id(),
            slaves = ?slaves,
            count = ids.len(),
            size_bits = request.size_bits,
            key_ids = ?ids,
        );
        Ok(KeyContainer {
            keys: container,
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

    /// Shreds expired keys; returns how many.
    pub async fn purge_expired(&self) -> Result<u64, ApiError> {
        Ok(self.store.purge_expired(unix_now()).await?)
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
            Target::Sae { sae, site } => {
                if sae == caller.id() {
                    return Err(ApiError::BadRequest(
                        "master and slave SAE must differ".into(),
                    ));
                }
                self.require_local(site)?;
                Ok(vec![sae.clone()])
            }
            Target::Site { site } => {
                self.require_local(site)?;
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

    /// Keys can only reach SAEs of this site until peer links exist.
    fn require_local(&self, site: &str) -> Result<(), ApiError> {
        if site == self.config.kme_id {
            Ok(())
        } else {
            Err(ApiError::Unavailable(format!(
                "site {site:?} is not reachable from KME {:?}: this build delivers keys within one site only",
                self.config.kme_id
            )))
        }
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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
