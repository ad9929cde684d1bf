//! The peer protocol over mutual TLS, as the origin speaks it: [`PeerClient`], the [`Peer`]
//! this site calls other sites through. The routes that answer it are `api::peer`.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use tokio::time::Instant;

use super::{
    BindAck, BindRequest, DeliverAck, DeliverRequest, DestroyAck, DestroyRequest, FillAck,
    FillRequest, Peer, PeerError, PeerHealth, ReconcileAck, ReconcileRequest,
};

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

    /// Asks which ready keys of this site's pool the peer still holds.
    pub async fn reconcile(&self, request: &ReconcileRequest) -> Result<ReconcileAck, PeerError> {
        self.call("/peer/v1/reconcile", request, None).await
    }

    /// Asks whether the peer's KME answers.
    pub async fn health(&self) -> Result<PeerHealth, PeerError> {
        self.call("/peer/v1/health", &(), None).await
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
        // The one call without a message is the health check, a GET.
        let body = serde_json::to_vec(body).map_err(|e| unreachable(e.to_string()))?;
        let (method, body) = if body == b"null" {
            (Method::GET, Vec::new())
        } else {
            (Method::POST, body)
        };
        let request = Request::builder()
            .method(method)
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

#[async_trait::async_trait]
impl Peer for PeerClient {
    fn site(&self) -> &str {
        &self.site
    }

    async fn deliver(
        &self,
        request: &DeliverRequest,
        deadline: Instant,
    ) -> Result<DeliverAck, PeerError> {
        PeerClient::deliver(self, request, deadline).await
    }

    async fn fill(&self, request: &FillRequest) -> Result<FillAck, PeerError> {
        PeerClient::fill(self, request).await
    }

    async fn bind(&self, request: &BindRequest, deadline: Instant) -> Result<BindAck, PeerError> {
        PeerClient::bind(self, request, deadline).await
    }

    async fn destroy(&self, request: &DestroyRequest) -> Result<DestroyAck, PeerError> {
        PeerClient::destroy(self, request).await
    }

    async fn reconcile(&self, request: &ReconcileRequest) -> Result<ReconcileAck, PeerError> {
        PeerClient::reconcile(self, request).await
    }

    async fn health(&self) -> Result<PeerHealth, PeerError> {
        PeerClient::health(self).await
    }
}
