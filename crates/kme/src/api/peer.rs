//! The peer API's routes: other sites' KMEs reach this site's [`PeerInbox`] through them.
//! Only KME certificates of other sites pass [`PeerKme`]; every message body is parsed by
//! [`PeerMessage`], whose rejection is an [`ApiError`] like every other failure.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, State};
use axum::http::request::Parts;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;

use super::{json, log_request, no_route, wrong_method, Body};
use crate::inbox::{PeerInbox, VerifiedKme};
use crate::peer::{
    BindRequest, DeliverRequest, DestroyRequest, FillRequest, PeerHealth, ReconcileRequest,
};
use crate::ApiError;

/// Largest peer message accepted: regeneration metadata for a large batch of keys.
pub const MAX_PEER_BODY_BYTES: usize = 64 * 1024 * 1024;

/// Builds the peer (KME-to-KME) router; only other sites' KME certificates may use it.
pub fn peer_router(inbox: Arc<PeerInbox>) -> Router {
    Router::new()
        .route("/peer/v1/deliver", post(peer_deliver))
        .route("/peer/v1/destroy", post(peer_destroy))
        .route("/peer/v1/fill", post(peer_fill))
        .route("/peer/v1/bind", post(peer_bind))
        .route("/peer/v1/reconcile", post(peer_reconcile))
        .route("/peer/v1/health", get(peer_health))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_PEER_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            (inbox.config().kme_id.to_string(), "peer"),
            log_request,
        ))
        .with_state(inbox)
}

/// The caller, proven by its certificate to be another site's KME.
struct PeerKme(VerifiedKme);

impl FromRequestParts<Arc<PeerInbox>> for PeerKme {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        inbox: &Arc<PeerInbox>,
    ) -> Result<Self, Self::Rejection> {
        inbox
            .verify_kme(dqkd_net::PeerIdentity::of(&parts.extensions))
            .map(PeerKme)
    }
}

/// A peer message in the request body, parsed as JSON; a bad one is a 400 naming the message
/// and the field at fault (`grants[0].master`), so an operator sees which name was refused.
struct PeerMessage<T>(T);

/// The name a message goes by in errors.
trait Named: serde::de::DeserializeOwned {
    const NAME: &'static str;
}

impl Named for DeliverRequest {
    const NAME: &'static str = "deliver";
}
impl Named for FillRequest {
    const NAME: &'static str = "fill";
}
impl Named for BindRequest {
    const NAME: &'static str = "bind";
}
impl Named for DestroyRequest {
    const NAME: &'static str = "destroy";
}
impl Named for ReconcileRequest {
    const NAME: &'static str = "reconcile";
}

impl<S: Send + Sync, T: Named> FromRequest<S> for PeerMessage<T> {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let Body(body) = Body::from_request(request, state).await?;
        let mut json = serde_json::Deserializer::from_slice(&body);
        let message = serde_path_to_error::deserialize(&mut json)
            .map_err(|e| {
                ApiError::BadRequest(format!(
                    "invalid {} message: {}: {}",
                    T::NAME,
                    e.path(),
                    e.inner()
                ))
            })
            .and_then(|message| {
                json.end()
                    .map(|()| message)
                    .map_err(|e| ApiError::BadRequest(format!("invalid {} message: {e}", T::NAME)))
            })?;
        Ok(PeerMessage(message))
    }
}

async fn peer_deliver(
    State(inbox): State<Arc<PeerInbox>>,
    PeerKme(peer): PeerKme,
    PeerMessage(request): PeerMessage<DeliverRequest>,
) -> Result<Response, ApiError> {
    to_completion("delivery", async move {
        inbox.peer_deliver(&peer, request).await
    })
    .await
}

async fn peer_fill(
    State(inbox): State<Arc<PeerInbox>>,
    PeerKme(peer): PeerKme,
    PeerMessage(request): PeerMessage<FillRequest>,
) -> Result<Response, ApiError> {
    to_completion("fill", async move { inbox.peer_fill(&peer, request).await }).await
}

async fn peer_bind(
    State(inbox): State<Arc<PeerInbox>>,
    PeerKme(peer): PeerKme,
    PeerMessage(request): PeerMessage<BindRequest>,
) -> Result<Response, ApiError> {
    to_completion("bind", async move { inbox.peer_bind(&peer, request).await }).await
}

/// Runs a peer operation that stores keys to completion even if the origin hangs up: a
/// cancelled one could commit keys and skip the checks that follow the commit.
async fn to_completion<A: Serialize + Send + 'static>(
    what: &str,
    operation: impl std::future::Future<Output = Result<A, ApiError>> + Send + 'static,
) -> Result<Response, ApiError> {
    let ack = tokio::spawn(operation)
        .await
        .map_err(|e| ApiError::Internal(format!("{what} task failed: {e}")))??;
    Ok(json(&ack))
}

async fn peer_destroy(
    State(inbox): State<Arc<PeerInbox>>,
    PeerKme(peer): PeerKme,
    PeerMessage(request): PeerMessage<DestroyRequest>,
) -> Result<Response, ApiError> {
    Ok(json(&inbox.peer_destroy(&peer, request).await?))
}

/// Runs to completion like a bind: its destroys and marks must not stop half-way.
async fn peer_reconcile(
    State(inbox): State<Arc<PeerInbox>>,
    PeerKme(peer): PeerKme,
    PeerMessage(request): PeerMessage<ReconcileRequest>,
) -> Result<Response, ApiError> {
    to_completion("reconcile", async move {
        inbox.peer_reconcile(&peer, request).await
    })
    .await
}

async fn peer_health(State(inbox): State<Arc<PeerInbox>>, PeerKme(_peer): PeerKme) -> Response {
    json(&PeerHealth {
        status: "ok".into(),
        kme_id: inbox.config().kme_id.clone(),
    })
}
