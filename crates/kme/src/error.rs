//! The one place that turns a failure into an HTTP status and an ETSI `Error` body.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use dqkd_etsi014::{messages, ErrorBody, ValidationError};

/// Every way an ETSI API request can fail, with the status it maps to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The request is malformed or asks for something the KME does not allow (400).
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The request is well-formed but names something the cluster does not have (400).
    #[error("{0}")]
    BadRequest(String),
    /// dec_keys named a key that is unknown, delivered or expired (400, fixed message).
    #[error("{}", messages::KEYS_NOT_FOUND)]
    KeysNotFound,
    /// The caller may not use this API or may not have these keys (401).
    #[error("{0}")]
    Unauthorized(String),
    /// A peer site named keys or pools that it did not originate (403); nothing changed.
    #[error("{0}")]
    Forbidden(String),
    /// The KME cannot serve the request now (503); the message says why.
    #[error("{0}")]
    Unavailable(String),
    /// An internal failure (503). The cause is logged; the client sees a generic message.
    #[error("internal error")]
    Internal(String),
    /// No such route (404).
    #[error("no such endpoint: {0}")]
    NoRoute(String),
    /// The route exists but not for this method (405).
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),
    /// The body is larger than the endpoint's limit (413).
    #[error("request body is too large")]
    BodyTooLarge,
    /// A peer named ready keys this site no longer holds for it (409): the origin falls back
    /// to making the keys on demand.
    #[error("{0}")]
    Conflict(String),
}

impl ApiError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid(_) | Self::BadRequest(_) | Self::KeysNotFound => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Unavailable(_) | Self::Internal(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Conflict(_) => StatusCode::CONFLICT,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let Self::Internal(cause) = &self {
            tracing::error!(%cause, "request failed");
        }
        let body = serde_json::to_vec(&ErrorBody::new(self.to_string()))
            .unwrap_or_else(|_| br#"{"message":"internal error"}"#.to_vec());
        let mut response = (status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

impl From<dqkd_store::StoreError> for ApiError {
    fn from(e: dqkd_store::StoreError) -> Self {
        Self::Internal(format!("key store: {e}"))
    }
}

/// A take that found nothing is the ETSI "keys not found", one the caller may not make is 401.
/// A caller that means something else by either (a peer's bind or destroy) matches it first.
impl From<dqkd_store::TakeError> for ApiError {
    fn from(e: dqkd_store::TakeError) -> Self {
        use dqkd_store::TakeError;
        match e {
            TakeError::NotFound => Self::KeysNotFound,
            TakeError::Unauthorized => Self::Unauthorized(e.to_string()),
            TakeError::Store(e) => e.into(),
            other => Self::Internal(format!("key store: {other}")),
        }
    }
}
