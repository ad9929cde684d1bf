//! The peer API: how one site's KME tells another which keys to regenerate and who may
//! fetch them, how it keeps ready keys at both ends of a link (`fill`, then `bind` when an
//! SAE asks), and how it withdraws keys when a request fails.
//!
//! Only KME certificates of the cluster may call it. Every message carries a request ID
//! and the key IDs it concerns, so a retry after a timeout is harmless: `deliver` answers a
//! request it already completed with the same acknowledgement, and `destroy` of keys that
//! are already gone succeeds. A site acts on a message only for keys its caller originated
//! (their master is an SAE of the calling site) and for the caller's own pool; anything else
//! is refused with 403 and changes nothing.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use uuid::Uuid;

/// `POST /peer/v1/deliver`: regenerate a batch of keys and hold each for its SAEs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverRequest {
    /// Idempotency key of this message.
    pub request_id: Uuid,
    /// Regeneration metadata of the whole batch (`dqkd-keygen` encoding), standard Base64.
    pub metadata: String,
    /// Who may fetch which keys: every key of the metadata in exactly one grant.
    pub grants: Vec<Grant>,
}

/// The keys of one enc_keys request inside a batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The master SAE (an SAE of the calling site).
    pub master: String,
    /// The SAEs of the receiving site that may fetch the keys, once each.
    pub slaves: Vec<String>,
    /// The keys.
    pub key_ids: Vec<Uuid>,
}

/// Answer to [`DeliverRequest`]: the keys are durably stored at the receiving site.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliverAck {
    /// The request acknowledged.
    pub request_id: Uuid,
    /// How many keys are stored.
    pub stored: usize,
}

/// `POST /peer/v1/destroy`: shred these keys of the calling site's SAEs, whoever may fetch
/// them. 403, and nothing shredded, if any of them is another site's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestroyRequest {
    /// Idempotency key of this message.
    pub request_id: Uuid,
    /// The keys to shred.
    pub key_ids: Vec<Uuid>,
    /// Positions of ready keys to shred in the calling site's pool toward this site (a fill
    /// or bind that failed), so that no late bind can ever take them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ready: Vec<u64>,
    /// The replica of the calling site whose pool `ready` belongs to, when its replicas keep one
    /// pool each (`dqkd kme --replica`); absent for a site's only pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// Answer to [`DestroyRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DestroyAck {
    /// How many of the keys still existed.
    pub destroyed: u64,
}

/// `POST /peer/v1/fill`: regenerate a batch of ready keys for the calling site's pool
/// toward this site. They belong to no SAE until a [`BindRequest`] names them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FillRequest {
    /// Idempotency key of this message.
    pub request_id: Uuid,
    /// Regeneration metadata of the batch (`dqkd-keygen` encoding, key IDs included),
    /// standard Base64.
    pub metadata: String,
    /// Unix seconds after which both sites shred the keys if still unbound.
    pub expires_at: u64,
    /// Pool position of the batch's first key; the others follow one by one, in the order
    /// of the metadata. Both sites file each key at the same position.
    pub first_seq: u64,
    /// The replica of the calling site whose pool this is, when its replicas keep one
    /// pool each (`dqkd kme --replica`); absent for a site's only pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// Answer to [`FillRequest`]: the ready keys are durably stored at the receiving site.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FillAck {
    /// The request acknowledged.
    pub request_id: Uuid,
    /// How many ready keys are stored.
    pub stored: usize,
}

/// `POST /peer/v1/bind`: ready keys of the calling site's pool leave it for these SAEs.
/// Refused with 409 (and nothing changed) if any key is no longer ready here.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindRequest {
    /// Idempotency key of this message.
    pub request_id: Uuid,
    /// Who may fetch which ready keys: one grant per enc_keys request.
    pub grants: Vec<Grant>,
    /// The pool position of every key of the grants, in grant order.
    pub positions: Vec<u64>,
    /// The replica of the calling site whose pool this is, when its replicas keep one
    /// pool each (`dqkd kme --replica`); absent for a site's only pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// Answer to [`BindRequest`]: the keys are durably held for their SAEs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BindAck {
    /// The request acknowledged.
    pub request_id: Uuid,
    /// How many keys are bound.
    pub bound: usize,
}

/// Why a peer call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// No answer in time, or no connection: the peer may or may not have acted.
    #[error("site {site:?} is unreachable: {reason}")]
    Unreachable {
        /// The peer's KME ID.
        site: String,
        /// What happened.
        reason: String,
    },
    /// The peer answered and refused.
    #[error("site {site:?} refused ({status}): {message}")]
    Refused {
        /// The peer's KME ID.
        site: String,
        /// HTTP status.
        status: StatusCode,
        /// Its message.
        message: String,
    },
}

/// Largest peer answer accepted.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// A kept-alive connection pool to one peer site's peer API.
#[derive(Clone)]
pub struct PeerClient {
    site: String,
    base: String,
    http: dqkd_net::PinnedClient,
    timeout: Duration,
}

impl PeerClient {
    /// A client for site `site` at `addr` (`host:port`) over `http`, which presents this
    /// KME's certificate and accepts only site `site`'s (see `dqkd_net::OutgoingTls`).
    pub fn new(site: &str, addr: &str, http: dqkd_net::PinnedClient, timeout: Duration) -> Self {
        Self {
            site: site.to_owned(),
            base: format!("https://{addr}"),
            http,
            timeout,
        }
    }

    /// The peer's KME ID.
    pub fn site(&self) -> &str {
        &self.site
    }

    /// Sends a deliver message and waits for the durable acknowledgement, at most until
    /// `deadline` (the deadline of the requests it serves).
    pub async fn deliver(
        &self,
        request: &DeliverRequest,
        deadline: Instant,
    ) -> Result<DeliverAck, PeerError> {
        self.call("/peer/v1/deliver", request, Some(deadline)).await
    }

    /// Sends a batch of ready keys to regenerate and waits for the durable acknowledgement.
    pub async fn fill(&self, request: &FillRequest) -> Result<FillAck, PeerError> {
        self.call("/peer/v1/fill", request, None).await
    }

    /// Binds ready keys to SAEs and waits for the durable acknowledgement, at most until
    /// `deadline` (the deadline of the requests it serves).
    pub async fn bind(
        &self,
        request: &BindRequest,
        deadline: Instant,
    ) -> Result<BindAck, PeerError> {
        self.call("/peer/v1/bind", request, Some(deadline)).await
    }

    /// Sends a destroy message.
    pub async fn destroy(&self, request: &DestroyRequest) -> Result<DestroyAck, PeerError> {
        self.call("/peer/v1/destroy", request, None).await
    }

    /// One exchange, given up after the client's timeout or at `deadline` if that is sooner.
    async fn call<Q: Serialize, A: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &Q,
        deadline: Option<Instant>,
    ) -> Result<A, PeerError> {
        let own_limit = Instant::now() + self.timeout;
        let (until, too_late) = match deadline {
            Some(deadline) if deadline < own_limit => (
                deadline,
                "no answer before the request's deadline".to_owned(),
            ),
            _ => (own_limit, format!("no answer within {:?}", self.timeout)),
        };
        let unreachable = |reason: String| PeerError::Unreachable {
            site: self.site.clone(),
            reason,
        };
        let body = serde_json::to_vec(body).map_err(|e| unreachable(e.to_string()))?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{path}", self.base))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unreachable(e.to_string()))?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| unreachable(dqkd_net::error_chain(&e)))?;
            let status = response.status();
            // Answers are small JSON; a peer cannot make this site buffer more.
            let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            Ok::<_, PeerError>((status, body))
        };
        let (status, body) = tokio::time::timeout_at(until, exchange)
            .await
            .map_err(|_| unreachable(too_late))??;
        if status != StatusCode::OK {
            let message = serde_json::from_slice::<dqkd_etsi014::ErrorBody>(&body)
                .map(|e| e.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(PeerError::Refused {
                site: self.site.clone(),
                status,
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| PeerError::Refused {
            site: self.site.clone(),
            status,
            message: format!("unreadable answer: {e}"),
        })
    }
}
