//! HTTP routes of the ETSI GS QKD 014 API.
//!
//! Handlers only extract (caller, path, query, body), call the [`KeyService`] and wrap the
//! answer; every failure is an [`ApiError`], which picks the status and the JSON body.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, Path, RawQuery, Request, State,
};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use dqkd_etsi014::{parse_dec_query, parse_enc_query, parse_key_ids, parse_key_request};
use serde::Serialize;
use zeroize::Zeroizing;

use crate::service::{KeyService, VerifiedSae};
use crate::ApiError;

/// Largest request body accepted. A dec_keys body naming `max_key_per_request` IDs is far
/// smaller; anything larger is refused before it is buffered.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

mod peer;

pub use dqkd_net::PeerIdentity;
pub use peer::{peer_router, MAX_PEER_BODY_BYTES};

/// Builds the router; the server adds the TLS identity, tests may add it themselves.
pub fn router(service: Arc<KeyService>) -> Router {
    Router::new()
        .route("/api/v1/keys/{slave}/status", get(status))
        .route(
            "/api/v1/keys/{slave}/enc_keys",
            get(enc_keys_get).post(enc_keys_post),
        )
        .route(
            "/api/v1/keys/{master}/dec_keys",
            get(dec_keys_get).post(dec_keys_post),
        )
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            (service.config().kme_id.to_string(), "etsi"),
            log_request,
        ))
        .with_state(service)
}

/// The caller, proven by its certificate to be an SAE of this site.
struct Caller(VerifiedSae);

impl FromRequestParts<Arc<KeyService>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        service: &Arc<KeyService>,
    ) -> Result<Self, Self::Rejection> {
        service
            .verify_sae(PeerIdentity::of(&parts.extensions))
            .map(Caller)
    }
}

/// The `{slave_SAE_ID}` or `{master_SAE_ID}` segment, percent-decoded.
struct SaeSegment(String);

impl<S: Send + Sync> FromRequestParts<S> for SaeSegment {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| SaeSegment(id))
            .map_err(|e| ApiError::BadRequest(format!("invalid SAE ID in path: {e}")))
    }
}

async fn status(
    State(service): State<Arc<KeyService>>,
    Caller(caller): Caller,
    SaeSegment(slave): SaeSegment,
) -> Result<Response, ApiError> {
    Ok(json(&service.status(&caller, &slave)?))
}

async fn enc_keys_get(
    State(service): State<Arc<KeyService>>,
    Caller(caller): Caller,
    SaeSegment(slave): SaeSegment,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let request = parse_enc_query(query.as_deref(), &service.config().limits.etsi())?;
    let keys = service.enc_keys(&caller, &slave, request).await?;
    Ok(secret_json(&keys))
}

async fn enc_keys_post(
    State(service): State<Arc<KeyService>>,
    Caller(caller): Caller,
    SaeSegment(slave): SaeSegment,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let request = parse_key_request(&body, &service.config().limits.etsi())?;
    if !request.unknown_fields.is_empty() {
        // A misspelt field (e.g. multicast) otherwise changes the answer silently.
        tracing::warn!(sae = caller.id(), slave = %slave, fields = ?request.unknown_fields,
            "Key request has fields the standard does not define; they were ignored");
    }
    let keys = service.enc_keys(&caller, &slave, request).await?;
    Ok(secret_json(&keys))
}

async fn dec_keys_get(
    State(service): State<Arc<KeyService>>,
    Caller(caller): Caller,
    SaeSegment(master): SaeSegment,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let id = parse_dec_query(query.as_deref())?;
    let keys = service.dec_keys(&caller, &master, &[id]).await?;
    Ok(secret_json(&keys))
}

async fn dec_keys_post(
    State(service): State<Arc<KeyService>>,
    Caller(caller): Caller,
    SaeSegment(master): SaeSegment,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let ids = parse_key_ids(&body, service.config().limits.max_key_per_request)?;
    let keys = service.dec_keys(&caller, &master, &ids).await?;
    Ok(secret_json(&keys))
}

pub(crate) async fn no_route(method: Method, uri: axum::http::Uri) -> ApiError {
    let _ = method;
    ApiError::NoRoute(uri.path().to_owned())
}

pub(crate) async fn wrong_method(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}

/// The whole request body, within the router's limit; a body that is too large or cannot be
/// read is refused as an [`ApiError`], like every other failure.
pub(crate) struct Body(pub(crate) Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(request, state)
            .await
            .map(Body)
            .map_err(body_error)
    }
}

fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::BodyTooLarge
    } else {
        ApiError::BadRequest(format!("cannot read request body: {rejection}"))
    }
}

pub(crate) fn json<T: Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => with_json_type(body.into_response()),
        Err(e) => ApiError::Internal(format!("serialising response: {e}")).into_response(),
    }
}

/// A response body holding key material: the buffer is zeroised when the body is freed.
struct SecretBuffer(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for SecretBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

fn secret_json<T: Serialize>(value: &T) -> Response {
    match secret_json_bytes(value) {
        Ok(buffer) => with_json_type(Bytes::from_owner(SecretBuffer(buffer)).into_response()),
        Err(e) => ApiError::Internal(format!("serialising response: {e}")).into_response(),
    }
}

/// The JSON of `value` in a zeroising buffer sized exactly in a first, counting pass: a
/// buffer that grew while being written would leave its earlier, smaller copies of the
/// keys in freed memory, unwiped.
fn secret_json_bytes<T: Serialize>(value: &T) -> serde_json::Result<Zeroizing<Vec<u8>>> {
    let mut counter = CountingWriter(0);
    serde_json::to_writer(&mut counter, value)?;
    let mut buffer = Zeroizing::new(Vec::with_capacity(counter.0));
    serde_json::to_writer(&mut *buffer, value)?;
    Ok(buffer)
}

/// Counts the bytes written to it and keeps none.
struct CountingWriter(usize);

impl std::io::Write for CountingWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn with_json_type(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// One debug line and the request metrics per request: API, method, status, time.
/// Never bodies (they hold keys).
pub(crate) async fn log_request(
    State((kme, api)): State<(String, &'static str)>,
    request: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let elapsed = start.elapsed();
    let labels = [
        ("kme", kme),
        ("api", api.to_owned()),
        ("call", call_label(&path).to_owned()),
        ("code", response.status().as_u16().to_string()),
    ];
    metrics::counter!("dqkd_requests_total", &labels).increment(1);
    metrics::histogram!("dqkd_request_seconds", &labels).record(elapsed.as_secs_f64());
    tracing::debug!(
        %method,
        %path,
        status = response.status().as_u16(),
        micros = elapsed.as_micros() as u64,
        "request"
    );
    response
}

/// The call a request path names, for the metrics: its last segment if that is a call of
/// the ETSI or peer API, else "other", so that a scanner cannot blow up the number of series.
fn call_label(path: &str) -> &str {
    const CALLS: [&str; 8] = [
        "status", "enc_keys", "dec_keys", "deliver", "destroy", "fill", "bind", "health",
    ];
    path.rsplit('/')
        .next()
        .filter(|c| CALLS.contains(c))
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_peer_call_has_its_own_metrics_label() {
        for call in ["deliver", "destroy", "fill", "bind", "health"] {
            assert_eq!(super::call_label(&format!("/peer/v1/{call}")), call);
        }
        assert_eq!(super::call_label("/api/v1/keys/bob/enc_keys"), "enc_keys");
        assert_eq!(super::call_label("/peer/v1/anything"), "other");
    }

    #[test]
    fn key_json_is_written_into_one_buffer_that_never_grew() {
        let keys: Vec<String> = (0..1000).map(|i| format!("{i:064}")).collect();
        let buffer = super::secret_json_bytes(&keys).unwrap();
        assert_eq!(buffer.len(), buffer.capacity());
        assert_eq!(
            serde_json::from_slice::<Vec<String>>(&buffer).unwrap(),
            keys
        );
    }
}
