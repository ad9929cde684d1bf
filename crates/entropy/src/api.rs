//! HTTP routes of the entropy server.
//!
//! | route | caller | answer |
//! |---|---|---|
//! | `POST /v1/allocate` `{"len", "readers"}` | KME | 200 bytes + `dqkd-*` headers |
//! | `GET /v1/ranges/{pool_id}/{offset}/{len}` | a named reader KME, once | 200 bytes |
//! | `GET /health` | KME or entropy server | 200 JSON |
//! | `GET /metrics` | KME or entropy server | 200 Prometheus text |
//!
//! Handlers only extract (caller, path, body), call the [`EntropyService`] and wrap the
//! answer; every failure is an [`ApiError`], which picks the status and the JSON body.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

pub use crate::error::ApiError;
use crate::metrics::Refusal;
use crate::pool::{PoolId, SharedBytes};
use crate::service::{AllocateRequest, EntropyService, VerifiedKme, VerifiedMember};
use crate::{HEADER_EXPIRES_AT, HEADER_OFFSET, HEADER_POOL_ID, HEADER_SERVER_ID};

/// Largest request body accepted: an allocation request with 16 readers is far smaller.
pub const MAX_BODY_BYTES: usize = 4 * 1024;

pub use dqkd_net::PeerIdentity;

/// Builds the router; the server adds the TLS identity, tests may add it themselves.
pub fn router(service: Arc<EntropyService>) -> Router {
    Router::new()
        .route("/v1/allocate", post(allocate))
        .route("/v1/ranges/{pool_id}/{offset}/{len}", get(read_range))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            service.clone(),
            count_and_log,
        ))
        .with_state(service)
}

fn identity(parts: &Parts) -> Option<&dqkd_pki::Identity> {
    PeerIdentity::of(&parts.extensions)
}

/// The caller, proven by its certificate to be a KME of the cluster.
struct Kme(VerifiedKme);

impl FromRequestParts<Arc<EntropyService>> for Kme {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        service: &Arc<EntropyService>,
    ) -> Result<Self, Self::Rejection> {
        service.verify_kme(identity(parts)).map(Kme)
    }
}

/// The caller, proven to be a KME or entropy server of the cluster.
struct Member(VerifiedMember);

impl FromRequestParts<Arc<EntropyService>> for Member {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        service: &Arc<EntropyService>,
    ) -> Result<Self, Self::Rejection> {
        service.verify_member(identity(parts)).map(Member)
    }
}

async fn allocate(
    State(service): State<Arc<EntropyService>>,
    Kme(caller): Kme,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let request: AllocateRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid allocation request: {e}")))?;
    let (granted, bytes) = service.allocate(&caller, request).await?;
    let mut response = octets(bytes);
    let headers = response.headers_mut();
    let mut set = |name: &'static str, value: String| {
        // Server ID, hex and decimal digits are always valid header values.
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    };
    set(HEADER_SERVER_ID, service.config().server_id.clone());
    set(HEADER_POOL_ID, granted.pool_id.to_string());
    set(HEADER_OFFSET, granted.offset.to_string());
    set(HEADER_EXPIRES_AT, granted.expires_at.to_string());
    Ok(response)
}

async fn read_range(
    State(service): State<Arc<EntropyService>>,
    Kme(caller): Kme,
    path: Result<Path<(String, String, String)>, axum::extract::rejection::PathRejection>,
) -> Result<Response, ApiError> {
    let Path((pool_id, offset, len)) =
        path.map_err(|e| ApiError::BadRequest(format!("invalid range path: {e}")))?;
    let pool_id: PoolId = pool_id
        .parse()
        .map_err(|e| ApiError::BadRequest(format!("invalid pool ID {pool_id:?}: {e}")))?;
    let number = |what: &str, text: &str| {
        text.parse::<u64>().map_err(|_| {
            ApiError::BadRequest(format!(
                "invalid {what} {text:?}: expected a decimal number"
            ))
        })
    };
    let offset = number("offset", &offset)?;
    let len = number("len", &len)?;
    let bytes = service.read(&caller, pool_id, offset, len)?;
    Ok(octets(bytes))
}

async fn health(
    State(service): State<Arc<EntropyService>>,
    Member(caller): Member,
) -> Result<Response, ApiError> {
    let body = serde_json::to_vec(&service.health(&caller))
        .map_err(|e| ApiError::Internal(format!("serialising health: {e}")))?;
    Ok(with_type(body.into_response(), "application/json"))
}

async fn metrics(State(service): State<Arc<EntropyService>>, Member(caller): Member) -> Response {
    with_type(
        service.metrics_text(&caller).into_response(),
        "text/plain; version=0.0.4; charset=utf-8",
    )
}

async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError::NoRoute(uri.path().to_owned())
}

async fn wrong_method(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}

fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::BodyTooLarge(MAX_BODY_BYTES)
    } else {
        ApiError::BadRequest(format!("cannot read request body: {rejection}"))
    }
}

/// A response body that shares the range's buffer: no copy of the random bytes is made,
/// and the buffer is zeroised when its last holder (pool or response) drops it.
struct SharedBody(SharedBytes);

impl AsRef<[u8]> for SharedBody {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

fn octets(bytes: SharedBytes) -> Response {
    with_type(
        Bytes::from_owner(SharedBody(bytes)).into_response(),
        "application/octet-stream",
    )
}

fn with_type(mut response: Response, content_type: &'static str) -> Response {
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Counts refusals by reason and logs one debug line per request: method, path, status,
/// time. Never bodies: they are random bytes that keys are made from.
async fn count_and_log(
    State(service): State<Arc<EntropyService>>,
    request: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    if let Some(reason) = response.extensions().get::<Refusal>() {
        service.metrics().refused(*reason);
    }
    tracing::debug!(
        %method,
        %path,
        status = response.status().as_u16(),
        micros = start.elapsed().as_micros() as u64,
        "request"
    );
    response
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use axum::body::Body;
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use super::*;
    use crate::config::{Config, TlsFiles};
    use crate::source::EntropySource;

    fn app() -> Router {
        let config = Config {
            cluster: "test".into(),
            server_id: "E1".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: TlsFiles {
                ca: "ca.pem".into(),
                cert: "e1.pem".into(),
                key: "e1.key".into(),
                crl: None,
                key_exchange: None,
                peer_key_exchange: None,
            },
            pool_ttl: Duration::from_secs(300),
            pool_rotate: Duration::from_secs(60),
            pool_max_bytes: 1 << 20,
            max_allocation: 1 << 16,
            max_live_bytes: 1 << 20,
            max_live_bytes_per_kme: 1 << 19,
            mix_file: None,
            connections: Default::default(),
            insecure_corrupt_reads: false,
            insecure_stuck_output: false,
        };
        router(Arc::new(EntropyService::new(
            Arc::new(config),
            Arc::new(EntropySource::system()),
        )))
    }

    fn as_kme(id: &str) -> PeerIdentity {
        let identity = dqkd_pki::Identity::new("test", dqkd_pki::Role::Kme, id).unwrap();
        PeerIdentity(Some(Arc::new(identity)))
    }

    async fn call(
        app: &Router,
        method: Method,
        uri: &str,
        body: &str,
        peer: PeerIdentity,
    ) -> (StatusCode, String, Vec<u8>) {
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body.to_owned()))
            .unwrap();
        request.extensions_mut().insert(peer);
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, content_type, body.to_vec())
    }

    fn message(body: &[u8]) -> String {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        v["message"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn errors_are_json() {
        let app = app();
        let kme = as_kme("KME_A");
        let (status, ty, body) = call(&app, Method::GET, "/v2/nothing", "", kme.clone()).await;
        assert_eq!(
            (status, ty.as_str()),
            (StatusCode::NOT_FOUND, "application/json")
        );
        assert!(message(&body).contains("/v2/nothing"));
        let (status, ty, _) = call(&app, Method::GET, "/v1/allocate", "", kme.clone()).await;
        assert_eq!(
            (status, ty.as_str()),
            (StatusCode::METHOD_NOT_ALLOWED, "application/json")
        );
        let (status, _, body) = call(&app, Method::POST, "/v1/allocate", "{", kme.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(message(&body).contains("invalid allocation request"));
        let big = format!(r#"{{"len": 1, "readers": ["{}"]}}"#, "x".repeat(5000));
        let (status, _, _) = call(&app, Method::POST, "/v1/allocate", &big, kme.clone()).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        let (status, _, body) =
            call(&app, Method::GET, "/v1/ranges/XYZ/0/1", "", kme.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(message(&body).contains("pool ID"));
        let pool = "0".repeat(32);
        let (status, _, body) = call(
            &app,
            Method::GET,
            &format!("/v1/ranges/{pool}/x/1"),
            "",
            kme,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(message(&body).contains("offset"));
        // No identity at all: 403.
        let (status, ty, _) = call(&app, Method::GET, "/health", "", PeerIdentity(None)).await;
        assert_eq!(
            (status, ty.as_str()),
            (StatusCode::FORBIDDEN, "application/json")
        );
    }

    #[tokio::test]
    async fn allocation_headers() {
        let app = app();
        let (status, ty, body) = call(
            &app,
            Method::POST,
            "/v1/allocate",
            r#"{"len": 33, "readers": []}"#,
            as_kme("KME_A"),
        )
        .await;
        assert_eq!(
            (status, ty.as_str()),
            (StatusCode::OK, "application/octet-stream")
        );
        assert_eq!(body.len(), 33);
        let request = Request::builder()
            .method(Method::POST)
            .uri("/v1/allocate")
            .extension(as_kme("KME_A"))
            .body(Body::from(r#"{"len": 1, "readers": ["KME_B"]}"#))
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        let h = |name: &str| response.headers()[name].to_str().unwrap().to_owned();
        assert_eq!(h("dqkd-server-id"), "E1");
        assert_eq!(h("dqkd-pool-id").len(), 32);
        assert_eq!(h("dqkd-offset"), "33");
        assert!(h("dqkd-expires-at").parse::<u64>().is_ok());
    }
}
