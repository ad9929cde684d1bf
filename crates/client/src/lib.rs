//! A client for the ETSI GS QKD 014 API over mutual TLS.
//!
//! One [`Client`] keeps a pool of kept-alive connections to one KME, so a caller pays the
//! TLS handshake once, not per request. The typed methods return the standard's types;
//! [`Client::raw`] sends any request and returns status and body untouched, for tests and
//! for the CLI, which prints exactly what the server sent.
//!
//! ```no_run
//! # async fn demo(tls: rustls::ClientConfig) -> Result<(), dqkd_client::ClientError> {
//! let alice = dqkd_client::Client::new("https://127.0.0.1:8443", tls)?;
//! let keys = alice.enc_keys("bob", &dqkd_client::KeyRequestBody::default()).await?;
//! println!("{}", keys.keys[0].key_ID);
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

use std::time::Duration;

use bytes::Bytes;
use dqkd_etsi014::{ErrorBody, KeyContainer, KeyIdRef, KeyIds, Status};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use serde::Serialize;

/// What can go wrong talking to a KME.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The base URL is not an `https://host:port` URL.
    #[error("invalid KME URL {url:?}: {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// Connecting, the TLS handshake or the HTTP exchange failed.
    #[error("cannot reach the KME: {0}")]
    Transport(String),
    /// The KME answered with an error status.
    #[error("KME answered {status}: {message}")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// The `message` of the Error body (or the raw body if it was not one).
        message: String,
    },
    /// The KME answered 200 with a body that is not the expected JSON.
    #[error("unexpected response body: {0}")]
    Decode(String),
    /// The request did not finish in time.
    #[error("the KME did not answer within {0:?}")]
    Timeout(Duration),
}

/// The body of an enc_keys POST; every field optional as in the standard.
#[allow(non_snake_case)]
#[derive(Debug, Clone, Default, Serialize)]
pub struct KeyRequestBody {
    /// Number of keys (default 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number: Option<u32>,
    /// Key size in bits (default: the KME's `key_size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
    /// Further SAEs that receive the same keys.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub additional_slave_SAE_IDs: Vec<String>,
}

/// A response exactly as received.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// HTTP status.
    pub status: StatusCode,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The body bytes.
    pub body: Bytes,
}

/// A connection pool to one KME's ETSI API.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: dqkd_net::HttpsClient,
    timeout: Duration,
}

impl Client {
    /// A client for the KME at `base_url` (`https://host:port`), authenticating with the
    /// certificate in `tls` (see `dqkd_pki::client_config`).
    pub fn new(base_url: &str, tls: rustls::ClientConfig) -> Result<Self, ClientError> {
        let bad = |reason: &str| ClientError::BadUrl {
            url: base_url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = base_url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the ETSI 014 API is served over https only"));
        }
        if uri.host().is_none() {
            return Err(bad("no host"));
        }
        // HTTP/1.1 with a pool of kept-alive connections: for small request/response
        // pairs it costs less CPU than HTTP/2 on both ends (dqkd bench: about twice the
        // status calls per second).
        let http = dqkd_net::https_client(tls, dqkd_net::Versions::Http1, None);
        Ok(Self {
            base: base_url.trim_end_matches('/').to_owned(),
            http,
            timeout: Duration::from_secs(30),
        })
    }

    /// Sets the per-request timeout (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// `GET /api/v1/keys/{slave}/status`.
    pub async fn status(&self, slave: &str) -> Result<Status, ClientError> {
        let raw = self
            .raw(Method::GET, &keys_path(slave, "status"), None)
            .await?;
        decode(raw)
    }

    /// `POST /api/v1/keys/{slave}/enc_keys`.
    pub async fn enc_keys(
        &self,
        slave: &str,
        request: &KeyRequestBody,
    ) -> Result<KeyContainer, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Decode(e.to_string()))?;
        let raw = self
            .raw(Method::POST, &keys_path(slave, "enc_keys"), Some(body))
            .await?;
        decode(raw)
    }

    /// `GET /api/v1/keys/{slave}/enc_keys?number=&size=`.
    pub async fn enc_keys_get(
        &self,
        slave: &str,
        number: Option<u32>,
        size: Option<u32>,
    ) -> Result<KeyContainer, ClientError> {
        let mut query = Vec::new();
        if let Some(n) = number {
            query.push(format!("number={n}"));
        }
        if let Some(s) = size {
            query.push(format!("size={s}"));
        }
        let mut path = keys_path(slave, "enc_keys");
        if !query.is_empty() {
            path = format!("{path}?{}", query.join("&"));
        }
        decode(self.raw(Method::GET, &path, None).await?)
    }

    /// `POST /api/v1/keys/{master}/dec_keys` with the given key IDs.
    pub async fn dec_keys(
        &self,
        master: &str,
        key_ids: &[&str],
    ) -> Result<KeyContainer, ClientError> {
        let body = KeyIds {
            key_IDs: key_ids
                .iter()
                .map(|id| KeyIdRef {
                    key_ID: (*id).to_owned(),
                    key_ID_extension: None,
                })
                .collect(),
            key_IDs_extension: None,
        };
        let body = serde_json::to_vec(&body).map_err(|e| ClientError::Decode(e.to_string()))?;
        let raw = self
            .raw(Method::POST, &keys_path(master, "dec_keys"), Some(body))
            .await?;
        decode(raw)
    }

    /// `GET /api/v1/keys/{master}/dec_keys?key_ID=`.
    pub async fn dec_keys_get(
        &self,
        master: &str,
        key_id: &str,
    ) -> Result<KeyContainer, ClientError> {
        let path = format!(
            "{}?key_ID={}",
            keys_path(master, "dec_keys"),
            encode_segment(key_id)
        );
        decode(self.raw(Method::GET, &path, None).await?)
    }

    /// Sends `method path_and_query` with an optional JSON body and returns the answer as is.
    pub async fn raw(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        let url = format!("{}{}", self.base, path_and_query);
        let mut request = Request::builder().method(method).uri(&url);
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::BadUrl {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| ClientError::Transport(dqkd_net::error_chain(&e)))?;
            let status = response.status();
            let content_type = response
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Transport(dqkd_net::error_chain(&e)))?
                .to_bytes();
            Ok(RawResponse {
                status,
                content_type,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
    }
}

fn keys_path(sae: &str, method: &str) -> String {
    format!("/api/v1/keys/{}/{method}", encode_segment(sae))
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn encode_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode<T: serde::de::DeserializeOwned>(raw: RawResponse) -> Result<T, ClientError> {
    if raw.status != StatusCode::OK {
        let message = serde_json::from_slice::<ErrorBody>(&raw.body)
            .map(|e| e.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&raw.body).into_owned());
        return Err(ClientError::Api {
            status: raw.status,
            message,
        });
    }
    serde_json::from_slice(&raw.body).map_err(|e| ClientError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(encode_segment("bob"), "bob");
        assert_eq!(encode_segment("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn error_bodies_become_api_errors() {
        let raw = RawResponse {
            status: StatusCode::BAD_REQUEST,
            content_type: None,
            body: Bytes::from_static(br#"{"message":"size shall be a multiple of 8"}"#),
        };
        match decode::<Status>(raw) {
            Err(ClientError::Api { status, message }) => {
                assert_eq!(status, StatusCode::BAD_REQUEST);
                assert_eq!(message, "size shall be a multiple of 8");
            }
            other => panic!("expected an API error, got {other:?}"),
        }
    }
}
