//! The one place that turns a failure into an HTTP status and a JSON `{"message": …}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::metrics::Refusal;
use crate::pool::PoolError;

/// Every way an entropy API request can fail, with the status it maps to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// Malformed request, or a length or reader list out of bounds (400).
    #[error("{0}")]
    BadRequest(String),
    /// The caller may not do this (403): not a KME, or not a reader of the range.
    #[error("{0}")]
    Forbidden(String),
    /// The range is unknown or expired (404).
    #[error("{0}")]
    NotFound(String),
    /// The caller already read the range (410).
    #[error("{0}")]
    Gone(String),
    /// The memory bound is reached; try again later or another server (503).
    #[error("{0}")]
    PoolFull(String),
    /// The calling KME holds as many unread bytes as its quota allows (503); the message
    /// names the quota.
    #[error("{0}")]
    QuotaExceeded(String),
    /// The entropy source failed a health test or ran out, and stays failed until a
    /// restart (503); the message gives the reason.
    #[error("entropy source failed, allocation stopped until the server is restarted: {0}")]
    SourceFailed(String),
    /// The entropy source or the server failed (503). The cause is logged; the client
    /// sees a generic message.
    #[error("entropy source unavailable")]
    Internal(String),
    /// No such route (404).
    #[error("no such endpoint: {0}")]
    NoRoute(String),
    /// The route exists but not for this method (405).
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),
    /// The body is larger than the limit (413).
    #[error("request body is larger than {0} bytes")]
    BodyTooLarge(usize),
}

impl ApiError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) | Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::Gone(_) => StatusCode::GONE,
            Self::PoolFull(_)
            | Self::QuotaExceeded(_)
            | Self::SourceFailed(_)
            | Self::Internal(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// The metrics label for this refusal.
    pub fn refusal(&self) -> Refusal {
        match self {
            Self::BadRequest(_) => Refusal::BadRequest,
            Self::Forbidden(_) => Refusal::Forbidden,
            Self::NotFound(_) | Self::NoRoute(_) => Refusal::NotFound,
            Self::Gone(_) => Refusal::AlreadyRead,
            Self::PoolFull(_) => Refusal::PoolFull,
            Self::QuotaExceeded(_) => Refusal::Quota,
            Self::SourceFailed(_) => Refusal::SourceFailed,
            Self::Internal(_) => Refusal::Internal,
            Self::MethodNotAllowed(_) => Refusal::MethodNotAllowed,
            Self::BodyTooLarge(_) => Refusal::TooLarge,
        }
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        let message = e.to_string();
        match e {
            PoolError::Full { .. } => Self::PoolFull(message),
            PoolError::Quota { .. } => Self::QuotaExceeded(message),
            PoolError::NotFound => Self::NotFound(message),
            PoolError::NotReader(_) => Self::Forbidden(message),
            PoolError::AlreadyRead(_) => Self::Gone(message),
        }
    }
}

/// JSON error body, `{"message": …}`.
#[derive(serde::Serialize)]
struct ErrorBody<'a> {
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let Self::Internal(cause) = &self {
            tracing::error!(%cause, "request failed");
        }
        let message = self.to_string();
        let body = serde_json::to_vec(&ErrorBody { message: &message })
            .unwrap_or_else(|_| br#"{"message":"internal error"}"#.to_vec());
        let mut response = (status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        // Picked up by the metrics middleware, which counts refusals by reason.
        response.extensions_mut().insert(self.refusal());
        response
    }
}
