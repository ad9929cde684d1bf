//! The mutual-TLS plumbing shared by every dqkd server (KME, entropy server) and client.
//!
//! Servers: [`serve_mtls`] accepts connections, runs each TLS handshake on its own task (a
//! slow client never stalls the accept loop), learns the caller's [`PeerIdentity`] from its
//! certificate, and serves HTTP/1.1 or HTTP/2 with an axum router until told to stop.
//! [`check_own_certificate`] makes a server refuse to start with someone else's certificate.
//! [`ServerLimits`] bounds what each listener holds: connections, and how long each may
//! handshake, idle or send a request head.
//!
//! Clients: [`OutgoingTls`] makes the clients of calls between dqkd processes, each pinned
//! to the one identity it may reach and following the revocation list; [`https_client`]
//! builds a pooled hyper client over a given rustls configuration (an SAE's), and
//! [`error_chain`] turns nested transport errors into one readable line.

#![forbid(unsafe_code)]

mod limits;

pub use limits::ServerLimits;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt as _;

mod crl;
pub mod expiry;
mod malformed;
mod outgoing;
mod server_tls;

pub use crl::CRL_POLL;
pub use dqkd_pki::KeyExchange;
pub use expiry::CertificateExpiry;
pub use outgoing::{OutgoingTls, PinnedClient};
use server_tls::revoked;
pub use server_tls::ServerTls;
/// How long shutdown waits for open requests before closing connections.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The certificate files of a server or client, as written in its config file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA certificate (PEM): the one trust anchor.
    pub ca: PathBuf,
    /// This process's certificate chain (PEM), issued for its role and ID.
    pub cert: PathBuf,
    /// This process's private key (PKCS#8 PEM).
    pub key: PathBuf,
    /// The cluster CA's revocation list (PEM, written by `dqkd pki revoke` or `dqkd pki crl`).
    /// When set, callers whose certificate it revokes are refused, and so are servers this
    /// process calls. The process re-reads it within [`CRL_POLL`] of a change, closes open
    /// connections of callers it now revokes and drops its pooled connections to servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
    /// The key exchange groups this process's own listener accepts: for a KME its ETSI API
    /// (default `prefer-hybrid`, since most SAE stacks lack ML-KEM), for an entropy server
    /// its API (default `hybrid-only`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_exchange: Option<KeyExchange>,
    /// KMEs only: the key exchange of the links between dqkd processes, that is the peer
    /// API and the KME's calls to peers and entropy servers (default `hybrid-only`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_key_exchange: Option<KeyExchange>,
}

impl TlsFiles {
    /// The same files with relative paths taken from `base` (the config file's folder).
    pub fn relative_to(&self, base: &Path) -> Self {
        Self {
            ca: base.join(&self.ca),
            cert: base.join(&self.cert),
            key: base.join(&self.key),
            crl: self.crl.as_ref().map(|crl| base.join(crl)),
            ..self.clone()
        }
    }

    /// Plain certificate files, with no revocation list and default key exchanges.
    pub fn new(ca: PathBuf, cert: PathBuf, key: PathBuf) -> Self {
        Self {
            ca,
            cert,
            key,
            crl: None,
            key_exchange: None,
            peer_key_exchange: None,
        }
    }
}

/// Why a server could not open its mTLS listener.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// Certificates could not be loaded or are not this server's.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {cause}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        cause: std::io::Error,
    },
}

/// An mTLS listener ready for [`serve_mtls`].
pub struct MtlsListener {
    /// Performs the handshakes (client certificate required), with the current CRL.
    pub tls: ServerTls,
    /// The bound socket.
    pub listener: TcpListener,
    /// The bound address (the real port when 0 was asked for).
    pub addr: SocketAddr,
}

/// Loads the server's TLS configuration, checks that its certificate is `role`/`id` of
/// `cluster`, and binds `addr` for a listener called `listener` (in metrics) that accepts
/// `key_exchange`.
pub async fn bind_mtls(
    tls: &TlsFiles,
    cluster: &str,
    role: dqkd_pki::Role,
    id: &str,
    addr: SocketAddr,
    key_exchange: KeyExchange,
    listener: &'static str,
) -> Result<MtlsListener, BindError> {
    let server_tls = ServerTls::load(tls, key_exchange, listener_labels(role, id, listener))
        .map_err(|e| BindError::Tls(e.to_string()))?;
    check_own_certificate(&tls.cert, cluster, role, id).map_err(BindError::Tls)?;
    let listener = bind(addr).await?;
    let addr = listener
        .local_addr()
        .map_err(|cause| BindError::Bind { addr, cause })?;
    Ok(MtlsListener {
        tls: server_tls,
        listener,
        addr,
    })
}

/// The labels of a listener's metrics: the process (`kme` or `entropy` = its ID) and the
/// listener's name.
pub fn listener_labels(
    role: dqkd_pki::Role,
    id: &str,
    listener: &'static str,
) -> Vec<(&'static str, String)> {
    vec![
        (role.as_str(), id.to_owned()),
        ("listener", listener.to_owned()),
    ]
}

/// Binds a plain TCP listener, with the address in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|cause| BindError::Bind { addr, cause })
}

/// The identity a connection's client certificate proved, inserted into every request's
/// extensions before routing. `None`: a CA-signed certificate without a dqkd identity.
#[derive(Debug, Clone)]
pub struct PeerIdentity(pub Option<Arc<dqkd_pki::Identity>>);

impl PeerIdentity {
    /// The caller's identity as [`serve_mtls`] recorded it in a request's extensions.
    pub fn of(extensions: &axum::http::Extensions) -> Option<&dqkd_pki::Identity> {
        extensions.get::<Self>().and_then(|p| p.0.as_deref())
    }
}

/// Serves `app` on `listener` over mutual TLS until `stopped` changes, then stops
/// accepting and lets open requests finish for up to [`DRAIN_TIMEOUT`]. `limits` caps the
/// open connections and bounds how long each may stay idle (see [`ServerLimits`]).
pub async fn serve_mtls(
    listener: TcpListener,
    tls: ServerTls,
    app: Router,
    cluster: Arc<str>,
    limits: ServerLimits,
    mut stopped: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let registry = limits::Registry::new(limits, tls.labels());
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => break,
        };
        let Some(conn) = registry.admit(remote) else {
            continue;
        };
        let tracker = conn.tracker();
        let _ = tcp.set_nodelay(true);
        let acceptor = tls.acceptor();
        let mut updates = tls.updates();
        let tls = tls.clone();
        let app = app.clone();
        let cluster = cluster.clone();
        let watcher = graceful.watcher();
        let bounds = *registry.limits();
        tokio::spawn(conn.run(remote, async move {
            let handshake = tokio::time::timeout(bounds.handshake_timeout(), acceptor.accept(tcp));
            let stream = match handshake.await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            tls.record_handshake(stream.get_ref().1, remote);
            let chain: Vec<CertificateDer<'static>> = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default();
            let identity = chain
                .first()
                .and_then(|leaf| {
                    dqkd_pki::Identity::from_certificate(leaf.as_ref(), &cluster)
                        .map_err(|e| tracing::debug!(%remote, error = %e, "no dqkd identity"))
                        .ok()
                })
                .map(Arc::new);
            let peer = PeerIdentity(identity);
            if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                tracker.http1();
            }
            tracker.touch();
            let service =
                hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                    request.extensions_mut().insert(peer.clone());
                    let in_flight = tracker.request();
                    let response =
                        tokio::time::timeout(bounds.request_timeout(), app.clone().oneshot(request));
                    async move {
                        let response = match response.await {
                            Ok(response) => response?,
                            Err(_) => limits::request_timed_out(remote),
                        };
                        Ok::<_, Infallible>(limits::TrackedBody::wrap(response, in_flight))
                    }
                });
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(malformed::JsonErrors::new(stream)), service);
            tokio::select! {
                // The revocation check first: a list reloaded during the handshake is
                // applied before the connection's first request is read.
                biased;
                () = revoked(&mut updates, &chain) => {
                    tracing::info!(%remote, "closed a connection: its client certificate is now revoked");
                }
                ended = watcher.watch(connection) => {
                    if let Err(e) = ended {
                        tracing::debug!(%remote, error = %e, "connection ended with an error");
                    }
                }
            }
        }));
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain timeout; closing them");
    }
}

/// Checks that the certificate chain in `cert` is `role`/`id` of `cluster`, so a server
/// never starts with a certificate that cannot prove which server it is.
pub fn check_own_certificate(
    cert: &Path,
    cluster: &str,
    role: dqkd_pki::Role,
    id: &str,
) -> Result<(), String> {
    let chain = dqkd_pki::load_certs(cert).map_err(|e| e.to_string())?;
    let leaf = chain
        .first()
        .ok_or_else(|| format!("{} holds no certificate", cert.display()))?;
    let identity = dqkd_pki::Identity::from_certificate(leaf.as_ref(), cluster)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if identity.role() != role || identity.id() != id {
        let what = match role {
            dqkd_pki::Role::Kme => "KME",
            dqkd_pki::Role::Sae => "SAE",
            dqkd_pki::Role::Entropy => "entropy server",
        };
        return Err(format!(
            "{} is the certificate of {}, not of {what} {id:?}",
            cert.display(),
            identity.uri(),
        ));
    }
    Ok(())
}

/// A pooled HTTPS client over `tls` (which carries the caller's certificate).
pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Which HTTP versions a client offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versions {
    /// HTTP/1.1 only, one kept-alive connection per request in flight: the least CPU per
    /// small request (an SAE with its own connections, a KME calling its peers with a few
    /// batches in flight).
    Http1,
    /// HTTP/2 when the server offers it: many requests over one connection (KME-to-entropy
    /// traffic).
    Any,
}

/// Builds a pooled HTTPS client. `connect_timeout` bounds the TCP connect.
pub fn https_client(
    mut tls: rustls::ClientConfig,
    versions: Versions,
    connect_timeout: Option<Duration>,
) -> HttpsClient {
    // The connector sets ALPN itself from the versions it enables (and insists on it).
    tls.alpn_protocols.clear();
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(connect_timeout);
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = match versions {
        Versions::Http1 => builder.enable_http1().wrap_connector(http),
        Versions::Any => builder.enable_all_versions().wrap_connector(http),
    };
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector)
}

/// An error and all its sources, as one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("request failed")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn error_chain_names_every_cause() {
        let e = Outer(std::io::Error::other("connection refused"));
        assert_eq!(error_chain(&e), "request failed: connection refused");
    }
}
