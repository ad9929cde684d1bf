//! The link between the two ends: one JSON request over mutual TLS with cluster
//! certificates, post-quantum hybrid key exchange only, each end pinned to the other's SAE
//! identity. Only key IDs and epochs cross it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use axum::extract::State;
use axum::http::{Extensions, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use dqkd_pki::{Identity, Role};
use http_body_util::{BodyExt as _, Full};
use tokio::sync::Mutex;

use crate::ports::{Link, Reply, Request};
use crate::responder::Responder;
use crate::PskError;

/// The path of the one call.
pub const PATH: &str = "/psk/v1/exchange";

/// How long the initiator waits for an answer (the responder may be waiting on its KME).
const TIMEOUT: Duration = Duration::from_secs(15);

/// The initiator's client, pinned to the responder's SAE identity.
pub struct HttpsLink {
    base: String,
    client: dqkd_net::PinnedClient,
}

impl HttpsLink {
    /// A link to the responder at `base` (`https://host:port`) over `client`.
    pub fn new(base: &str, client: dqkd_net::PinnedClient) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            client,
        }
    }
}

#[async_trait]
impl Link for HttpsLink {
    async fn exchange(&self, request: &Request) -> Result<Reply, PskError> {
        let body = serde_json::to_vec(request).map_err(|e| PskError::Link(e.to_string()))?;
        let http_request = hyper::Request::post(format!("{}{PATH}", self.base))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| PskError::Link(e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(http_request)
                .await
                .map_err(|e| PskError::Link(dqkd_net::error_chain(&e)))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| PskError::Link(dqkd_net::error_chain(&e)))?
                .to_bytes();
            Ok::<_, PskError>((status, body))
        };
        let (status, body) = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| PskError::Link(format!("no answer within {TIMEOUT:?}")))??;
        if status == StatusCode::CONFLICT {
            if let Ok(skew) = serde_json::from_slice::<SkewBody>(&body) {
                return Err(PskError::Skew {
                    offered: skew.offered,
                    ours: skew.ours,
                });
            }
        }
        if !status.is_success() {
            return Err(PskError::Refused {
                status: status.as_u16(),
                message: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        serde_json::from_slice(&body).map_err(|e| PskError::Link(format!("bad answer: {e}")))
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SkewBody {
    offered: crate::schedule::Epoch,
    ours: crate::schedule::Epoch,
}

/// What the responder's handler needs.
#[derive(Clone)]
pub struct Served {
    /// The responder's state, shared with its clock task.
    pub responder: Arc<Mutex<Responder>>,
    /// The only identity allowed to call: the initiator's SAE.
    pub initiator: Arc<Identity>,
}

/// The responder's router: one call, allowed to the initiator's SAE alone.
pub fn router(served: Served) -> Router {
    Router::new().route(PATH, post(exchange)).with_state(served)
}

async fn exchange(
    State(served): State<Served>,
    extensions: Extensions,
    Json(request): Json<Request>,
) -> Response {
    let caller = dqkd_net::PeerIdentity::of(&extensions);
    if caller != Some(&*served.initiator) {
        tracing::warn!(caller = ?caller.map(Identity::uri), "refused a caller that is not the initiator's SAE");
        return (StatusCode::FORBIDDEN, "only the initiating SAE may call").into_response();
    }
    let mut responder = served.responder.lock().await;
    match responder.handle(request, SystemTime::now()).await {
        Ok(reply) => Json(reply).into_response(),
        Err(PskError::Skew { offered, ours }) => {
            (StatusCode::CONFLICT, Json(SkewBody { offered, ours })).into_response()
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

/// The identity of an SAE of `cluster`.
pub fn sae(cluster: &str, id: &str) -> Result<Identity, PskError> {
    Identity::new(cluster, Role::Sae, id).map_err(PskError::Tls)
}
