//! The KME side: allocate ranges and read them back over mutual TLS.
//!
//! One [`EntropyClient`] per entropy server keeps a pool of kept-alive connections, so a
//! KME pays the TLS handshake once. Errors say whether the server is worth retrying now
//! ([`EntropyError::is_unavailable`]): a KME choosing `n` servers skips one that is down
//! or full and takes another.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use zeroize::{Zeroize, Zeroizing};

use crate::pool::PoolId;
use crate::service::{AllocateRequest, Health};
use crate::{HEADER_EXPIRES_AT, HEADER_OFFSET, HEADER_POOL_ID, HEADER_SERVER_ID};

/// Default per-request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest error or health body read; anything longer is cut.
const MAX_SMALL_BODY: usize = 64 * 1024;
/// How the server's 503 message for the memory bound starts (see `PoolError::Full`).
const POOL_FULL_PREFIX: &str = "entropy pool full";

/// What can go wrong talking to an entropy server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EntropyError {
    /// The base URL is not an `https://host:port` URL.
    #[error("invalid entropy server URL {url:?}: {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// Connecting, the TLS handshake or the HTTP exchange failed.
    #[error("entropy server {server_id} unreachable: {reason}")]
    Unreachable {
        /// The server.
        server_id: String,
        /// The transport error chain.
        reason: String,
    },
    /// The server did not answer within the timeout.
    #[error("entropy server {server_id} did not answer within {after:?}")]
    Timeout {
        /// The server.
        server_id: String,
        /// The timeout.
        after: Duration,
    },
    /// The server holds as many unread bytes as it may (503): try later or elsewhere.
    #[error("entropy server {server_id} is full: {message}")]
    PoolFull {
        /// The server.
        server_id: String,
        /// The server's message.
        message: String,
    },
    /// The server refused the request (400, 403, 404, 410, or 503 when its entropy source
    /// failed) with this message.
    #[error("entropy server {server_id} refused ({status}): {message}")]
    Refused {
        /// The server.
        server_id: String,
        /// HTTP status.
        status: StatusCode,
        /// The `message` of the JSON error body (or the raw body if it was not one).
        message: String,
    },
    /// The server answered 200 with something other than what was asked for.
    #[error("entropy server {server_id} sent a bad response: {reason}")]
    BadResponse {
        /// The server.
        server_id: String,
        /// What was wrong.
        reason: String,
    },
}

impl EntropyError {
    /// Whether the server is down, slow or full right now, so that a caller should choose
    /// another server rather than give up.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Timeout { .. } | Self::PoolFull { .. } => true,
            Self::Refused { status, .. } => *status == StatusCode::SERVICE_UNAVAILABLE,
            _ => false,
        }
    }
}

/// A range handed out by `allocate`, with its bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The server that allocated it (checked against the expected ID).
    pub server_id: String,
    /// The pool it was carved from.
    pub pool_id: [u8; 16],
    /// Offset in the pool.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// When the server shreds it, in Unix seconds.
    pub expires_at: u64,
    /// The random bytes; zeroised when dropped.
    pub bytes: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Allocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the bytes.
        f.debug_struct("Allocation")
            .field("server_id", &self.server_id)
            .field("pool_id", &PoolId(self.pool_id))
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// A connection pool to one entropy server.
#[derive(Clone)]
pub struct EntropyClient {
    base: String,
    server_id: String,
    http: dqkd_net::PinnedClient,
    timeout: Duration,
}

impl std::fmt::Debug for EntropyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntropyClient")
            .field("base", &self.base)
            .field("server_id", &self.server_id)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl EntropyClient {
    /// A client for the entropy server `server_id` at `base_url` (`https://host:port`),
    /// over `http`, which presents the KME's certificate and accepts only the certificate
    /// of that entropy server (see `dqkd_net::OutgoingTls::client`).
    pub fn new(
        base_url: &str,
        server_id: &str,
        http: dqkd_net::PinnedClient,
    ) -> Result<Self, EntropyError> {
        check_url(base_url)?;
        Ok(Self {
            base: base_url.trim_end_matches('/').to_owned(),
            server_id: server_id.to_owned(),
            http,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Sets the per-request timeout (default 5 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The ID of the server this client talks to.
    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    /// `POST /v1/allocate`: `len` fresh bytes that each of `readers` may read once.
    pub async fn allocate(&self, len: u64, readers: &[String]) -> Result<Allocation, EntropyError> {
        let body = serde_json::to_vec(&AllocateRequest {
            len,
            readers: readers.to_vec(),
        })
        .map_err(|e| self.bad(format!("encoding the request: {e}")))?;
        self.exchange(
            Method::POST,
            "/v1/allocate",
            Some(body),
            |response| async move {
                let headers = response.headers();
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                        .ok_or_else(|| self.bad(format!("missing or invalid {name} header")))
                };
                // Who answered is proven by the pinned TLS handshake, not by this header;
                // a server naming itself otherwise is misconfigured, and refused.
                let server_id = header(HEADER_SERVER_ID)?;
                if server_id != self.server_id {
                    return Err(self.bad(format!(
                        "answered as entropy server {server_id:?}, expected {:?}",
                        self.server_id
                    )));
                }
                let pool_text = header(HEADER_POOL_ID)?;
                let pool_id: PoolId = pool_text
                    .parse()
                    .map_err(|_| self.bad(format!("invalid {HEADER_POOL_ID} {pool_text:?}")))?;
                let number = |name: &str| {
                    let text = header(name)?;
                    text.parse::<u64>()
                        .map_err(|_| self.bad(format!("invalid {name} {text:?}")))
                };
                let offset = number(HEADER_OFFSET)?;
                let expires_at = number(HEADER_EXPIRES_AT)?;
                let bytes = self.read_exact(response.into_body(), len).await?;
                Ok(Allocation {
                    server_id,
                    pool_id: pool_id.0,
                    offset,
                    len,
                    expires_at,
                    bytes,
                })
            },
        )
        .await
    }

    /// `GET /v1/ranges/{pool_id}/{offset}/{len}`: the bytes of a range this KME was named
    /// a reader of. Works once.
    pub async fn read(
        &self,
        pool_id: &[u8; 16],
        offset: u64,
        len: u64,
    ) -> Result<Zeroizing<Vec<u8>>, EntropyError> {
        let path = format!("/v1/ranges/{}/{offset}/{len}", PoolId(*pool_id));
        self.exchange(Method::GET, &path, None, |response| async move {
            self.read_exact(response.into_body(), len).await
        })
        .await
    }

    /// `GET /health`: succeeds when the server answers and accepts this certificate.
    pub async fn health(&self) -> Result<(), EntropyError> {
        self.health_report().await.map(|_| ())
    }

    /// `GET /health` with the server's report (live bytes, pools).
    pub async fn health_report(&self) -> Result<Health, EntropyError> {
        self.exchange(Method::GET, "/health", None, |response| async move {
            let body = self.small_body(response.into_body()).await?;
            serde_json::from_slice(&body).map_err(|e| self.bad(format!("health body: {e}")))
        })
        .await
    }

    /// `GET /metrics`: the Prometheus text.
    pub async fn metrics(&self) -> Result<String, EntropyError> {
        self.exchange(Method::GET, "/metrics", None, |response| async move {
            let body = self.small_body(response.into_body()).await?;
            String::from_utf8(body).map_err(|_| self.bad("metrics are not UTF-8".into()))
        })
        .await
    }

    /// Sends one request under the timeout; a 200 goes to `on_ok`, anything else becomes
    /// the matching error.
    async fn exchange<T, F, Fut>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        on_ok: F,
    ) -> Result<T, EntropyError>
    where
        F: FnOnce(http::Response<Incoming>) -> Fut,
        Fut: std::future::Future<Output = Result<T, EntropyError>>,
    {
        let url = format!("{}{path}", self.base);
        let mut request = Request::builder().method(method).uri(&url);
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| EntropyError::BadUrl {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let work = async {
            let response =
                self.http
                    .request(request)
                    .await
                    .map_err(|e| EntropyError::Unreachable {
                        server_id: self.server_id.clone(),
                        reason: dqkd_net::error_chain(&e),
                    })?;
            let status = response.status();
            if status == StatusCode::OK {
                return on_ok(response).await;
            }
            let body = self.small_body(response.into_body()).await?;
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("message")?.as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            // Only a full pool is PoolFull; any other 503 (a failed entropy source) stays a
            // refusal, which `is_unavailable` still treats as "try another server".
            let full =
                status == StatusCode::SERVICE_UNAVAILABLE && message.starts_with(POOL_FULL_PREFIX);
            Err(if full {
                EntropyError::PoolFull {
                    server_id: self.server_id.clone(),
                    message,
                }
            } else {
                EntropyError::Refused {
                    server_id: self.server_id.clone(),
                    status,
                    message,
                }
            })
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| EntropyError::Timeout {
                server_id: self.server_id.clone(),
                after: self.timeout,
            })?
    }

    /// Reads a body of exactly `len` bytes straight into a zeroising buffer; more or
    /// fewer is a bad response (a server that sends the wrong amount is broken or lying).
    ///
    /// Each frame is copied into the buffer (allocated once at full size, so it never
    /// reallocates and leaves no stale copy) and then wiped if this is its only holder.
    /// What this cannot wipe: a frame that still shares its allocation with the HTTP
    /// library's read buffer (the library reuses or frees that buffer without wiping it),
    /// the TLS library's record buffers, and the kernel's socket buffers.
    async fn read_exact(
        &self,
        mut body: Incoming,
        len: u64,
    ) -> Result<Zeroizing<Vec<u8>>, EntropyError> {
        let want = usize::try_from(len).map_err(|_| self.bad(format!("len {len} too large")))?;
        let mut out = Zeroizing::new(Vec::with_capacity(want));
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.unreachable(&e))?;
            if let Ok(data) = frame.into_data() {
                let fits = out.len() + data.len() <= want;
                if fits {
                    out.extend_from_slice(&data);
                }
                wipe(data);
                if !fits {
                    return Err(self.bad(format!("body longer than the {len} bytes asked for")));
                }
            }
        }
        if out.len() != want {
            return Err(self.bad(format!(
                "body has {} bytes, {len} were asked for",
                out.len()
            )));
        }
        Ok(out)
    }

    /// Reads a short body (errors, health, metrics), cut at a sane size.
    async fn small_body(&self, mut body: Incoming) -> Result<Vec<u8>, EntropyError> {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.unreachable(&e))?;
            if let Ok(data) = frame.into_data() {
                let room = MAX_SMALL_BODY.saturating_sub(out.len());
                out.extend_from_slice(&data[..data.len().min(room)]);
            }
        }
        Ok(out)
    }

    fn bad(&self, reason: String) -> EntropyError {
        EntropyError::BadResponse {
            server_id: self.server_id.clone(),
            reason,
        }
    }

    fn unreachable(&self, error: &dyn std::error::Error) -> EntropyError {
        EntropyError::Unreachable {
            server_id: self.server_id.clone(),
            reason: dqkd_net::error_chain(error),
        }
    }
}

/// Zeroises a body frame if no one else holds its bytes; a shared frame is left to its
/// other holders (see `read_exact`).
fn wipe(frame: Bytes) {
    if let Ok(mut unique) = frame.try_into_mut() {
        unique.as_mut().zeroize();
    }
}

/// Entropy servers are reached over https only, at a URL with a host.
fn check_url(base_url: &str) -> Result<(), EntropyError> {
    let bad = |reason: &str| EntropyError::BadUrl {
        url: base_url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: Uri = base_url.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("entropy servers are reached over https only"));
    }
    if uri.host().is_none() {
        return Err(bad("no host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client of entropy server E1 with a KME certificate from a throwaway CA.
    fn http(dir: &std::path::Path) -> dqkd_net::PinnedClient {
        dqkd_pki::init_ca("test", dir, false).unwrap();
        let ca = dqkd_pki::load_ca(dir).unwrap();
        let options = dqkd_pki::IssueOptions {
            out_dir: dir.join("certs"),
            ..dqkd_pki::IssueOptions::default()
        };
        let kme = ca.issue(dqkd_pki::Role::Kme, "KME_A", &options).unwrap();
        let files = dqkd_net::TlsFiles::new(ca.paths().cert.clone(), kme.cert_chain, kme.key);
        let tls = dqkd_net::OutgoingTls::load(&files, dqkd_pki::KeyExchange::HybridOnly).unwrap();
        let e1 = dqkd_pki::Identity::new("test", dqkd_pki::Role::Entropy, "E1").unwrap();
        tls.client(e1, dqkd_net::Versions::Any, None).unwrap()
    }

    #[test]
    fn urls_checked() {
        assert!(check_url("https://127.0.0.1:1").is_ok());
        for bad in ["http://127.0.0.1:1", "not a url", "/path"] {
            assert!(matches!(check_url(bad), Err(EntropyError::BadUrl { .. })));
        }
    }

    #[test]
    fn pool_full_message_is_recognised() {
        let full = crate::pool::PoolError::Full {
            live: 1,
            len: 2,
            max: 2,
        };
        assert!(full.to_string().starts_with(POOL_FULL_PREFIX));
    }

    #[test]
    fn unique_frames_are_wiped() {
        // A frame that owns its bytes is zeroised in place: observe it through the
        // `BytesMut` it turns back into.
        let frame = Bytes::from(vec![0xA5u8; 64]);
        let ptr = frame.as_ptr();
        let mut unique = frame.try_into_mut().expect("unique");
        unique.as_mut().zeroize();
        assert!(unique.iter().all(|&b| b == 0));
        assert_eq!(unique.as_ptr(), ptr, "wiped in place, not copied");
        // A shared frame is not touched (its other holder still reads its bytes).
        let frame = Bytes::from(vec![0x5Au8; 64]);
        let other = frame.clone();
        wipe(frame);
        assert!(other.iter().all(|&b| b == 0x5A));
    }

    #[tokio::test]
    async fn closed_port_is_unavailable() {
        // Bind then drop to find a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let client =
            EntropyClient::new(&format!("https://127.0.0.1:{port}"), "E1", http(dir.path()))
                .unwrap();
        let err = client.health().await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
    }
}
