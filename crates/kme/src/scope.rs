//! What a peer site may act on here: the keys it originated and its own ready-key pools.
//!
//! A key's origin is the site of its master SAE (the cluster manifest lists every SAE under
//! exactly one site): ordinary and multicast keys, keys bound from a pool, same-site keys and
//! masters' own copies all store their master, and a peer can only deliver or bind keys for
//! masters of its own site. A pool's origin is the first part of its name
//! (`<origin>><peer>[@replica]`), and the name is made here from the caller's certificate, so a
//! message cannot name another site's pool at all. Every peer message that changes keys or
//! pools is held to this before anything changes; a refusal is 403, logged with the caller and
//! what it named.

use dqkd_pki::Name;
use dqkd_store::TakeError;

use crate::config::Config;
use crate::peer::Grant;
use crate::ApiError;

/// Another site's KME, as proven by its client certificate.
///
/// Only [`PeerInbox::verify_kme`](crate::inbox::PeerInbox::verify_kme) makes one, so no peer
/// method can run without it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedKme {
    id: Name,
}

impl VerifiedKme {
    /// The caller, if its certificate names another site of the cluster.
    pub(crate) fn check(
        identity: Option<&dqkd_pki::Identity>,
        config: &Config,
    ) -> Result<Self, ApiError> {
        let identity = identity.ok_or_else(|| {
            ApiError::Unauthorized("the client certificate carries no dqkd identity".into())
        })?;
        if identity.role() != dqkd_pki::Role::Kme
            || *identity.id() == config.kme_id
            || !config.sites.contains_key(identity.id())
        {
            return Err(ApiError::Unauthorized(format!(
                "{} is not a peer site of KME {:?}",
                identity.uri(),
                config.kme_id
            )));
        }
        Ok(Self {
            id: identity.id().clone(),
        })
    }

    /// The peer's KME ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The peer's KME ID, as the checked name.
    pub fn name(&self) -> &Name {
        &self.id
    }
}

/// The keys and pools of one calling site.
pub(crate) struct PeerScope<'a> {
    peer: &'a VerifiedKme,
    config: &'a Config,
}

impl<'a> PeerScope<'a> {
    /// The scope of `peer`, by this site's manifest.
    pub(crate) fn new(peer: &'a VerifiedKme, config: &'a Config) -> Self {
        Self { peer, config }
    }

    /// The masters whose keys the caller originated: the SAEs of its site.
    pub(crate) fn masters(&self) -> Vec<String> {
        // Invariant: `verify_kme` accepts only sites of the manifest.
        self.config.sites[self.peer.id()]
            .saes
            .iter()
            .map(Name::to_string)
            .collect()
    }

    /// The store's name for the caller's pool toward this site (that of one of its replicas
    /// when the message names one).
    pub(crate) fn pool(&self, replica: Option<&Name>) -> String {
        crate::pools::link_name(self.peer.id(), &self.config.kme_id, replica)
    }

    /// Every grant of a `deliver` or `bind` is for a master of the calling site: a site
    /// makes keys only for its own SAEs.
    pub(crate) fn check_grants(
        &self,
        call: &'static str,
        request_id: uuid::Uuid,
        grants: &[Grant],
    ) -> Result<(), ApiError> {
        let site = &self.config.sites[self.peer.id()];
        match grants
            .iter()
            .find(|g| !site.saes.contains(g.master.as_str()))
        {
            Some(foreign) => Err(self.refuse(
                call,
                request_id,
                &format!(
                    "grants keys of master {:?}, not an SAE of the calling site",
                    foreign.master
                ),
            )),
            None => Ok(()),
        }
    }

    /// Maps the store's answer to a destroy on the caller's behalf
    /// ([`dqkd_store::KeyStore::destroy_of`]) in message `call`.
    pub(crate) fn destroyed(
        &self,
        call: &'static str,
        request_id: uuid::Uuid,
        named: usize,
        result: Result<u64, TakeError>,
    ) -> Result<u64, ApiError> {
        match result {
            Ok(count) => Ok(count),
            Err(TakeError::Unauthorized) => Err(self.refuse(
                call,
                request_id,
                &format!("names keys (of {named}) made by another site's SAEs"),
            )),
            Err(other) => Err(other.into()),
        }
    }

    /// Logs a refusal and makes its answer. The answer names neither the keys nor who made
    /// them: the caller learns only that its message was not within its own keys and pools.
    fn refuse(&self, call: &'static str, request_id: uuid::Uuid, what: &str) -> ApiError {
        tracing::warn!(
            peer = self.peer.id(),
            call,
            %request_id,
            refused = what,
            "refused a peer message outside the caller's own keys and pools; nothing changed"
        );
        ApiError::Forbidden(format!(
            "{call} {request_id} refused: site {:?} may act only on keys and pools it originated",
            self.peer.id()
        ))
    }
}
