//! The mutual-TLS plumbing shared by every dqkd server (KME, entropy server) and client.
//!
//! Servers: [`serve_mtls`] accepts connections, runs each TLS handshake on its own task (a
//! slow client never stalls the accept loop), learns the caller's [`PeerIdentity`] from its
//! certificate, and serves HTTP/1.1 or HTTP/2 with an axum router until told to stop.
//! [`check_own_certificate`] makes a server refuse to start with someone else's certificate.
//! [`ServerLimits`] bounds what each listener holds: connections, and how long each may
//! handshake, idle or send a request head.
//!
//! Clients: [`https_client`] builds a pooled hyper client over a given rustls
//! configuration (the caller's certificate and the cluster CA), and [`error_chain`] turns
//! nested transport errors into one readable line.

#![forbid(unsafe_code)]

mod limits;

pub use limits::{ListenerLimits, ServerLimits};

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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

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
    /// process calls. A server re-reads it within [`CRL_POLL`] of a change and closes open
    /// connections of callers it now revokes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

impl TlsFiles {
    /// The same files with relative paths taken from `base` (the config file's folder).
    pub fn relative_to(&self, base: &Path) -> Self {
        Self {
            ca: base.join(&self.ca),
            cert: base.join(&self.cert),
            key: base.join(&self.key),
            crl: self.crl.as_ref().map(|crl| base.join(crl)),
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
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// How often a server looks for a changed revocation list.
pub const CRL_POLL: Duration = Duration::from_secs(2);

/// A server's TLS configuration as it stands now: replaced whenever its revocation list
/// changes, and watched by every open connection so that a caller revoked meanwhile is cut
/// off.
#[derive(Clone)]
pub struct ServerTls {
    current: watch::Receiver<Arc<LoadedTls>>,
}

/// One loaded configuration, the verifier inside it, and the number of its CRL.
struct LoadedTls {
    config: Arc<rustls::ServerConfig>,
    verifier: Arc<dyn ClientCertVerifier>,
    crl_number: Option<u64>,
}

impl LoadedTls {
    /// Loads the configuration of `tls`, with the revocation list read as `crl_pem` (the
    /// bytes of `tls.crl`, read once by the caller so that it knows exactly what is in force).
    fn load(tls: &TlsFiles, crl_pem: Option<&[u8]>) -> Result<Self, dqkd_pki::PkiError> {
        let crls = match (&tls.crl, crl_pem) {
            (Some(path), Some(pem)) => dqkd_pki::parse_crls(pem, path)?,
            _ => Vec::new(),
        };
        let crl_number = dqkd_pki::crl_number(&crls);
        let verifier = dqkd_pki::client_verifier(&dqkd_pki::load_certs(&tls.ca)?, crls)?;
        let config = dqkd_pki::server_config_with_verifier(
            verifier.clone(),
            dqkd_pki::load_certs(&tls.cert)?,
            dqkd_pki::load_private_key(&tls.key)?,
        )?;
        Ok(Self {
            config: Arc::new(config),
            verifier,
            crl_number,
        })
    }
}

impl ServerTls {
    /// Loads the server's configuration from `tls` and, when it names a revocation list,
    /// starts re-reading that list every [`CRL_POLL`] for as long as the returned value (or
    /// a clone) lives. A list that is missing or unreadable at start is an error: a server
    /// told to check revocations never starts without.
    pub fn load(tls: &TlsFiles) -> Result<Self, dqkd_pki::PkiError> {
        let crl_pem = match &tls.crl {
            Some(path) => {
                Some(std::fs::read(path).map_err(|e| dqkd_pki::PkiError::io("reading", path, e))?)
            }
            None => None,
        };
        let loaded = LoadedTls::load(tls, crl_pem.as_deref())?;
        let (sender, current) = watch::channel(Arc::new(loaded));
        if let (Some(crl), Some(seen)) = (tls.crl.clone(), crl_pem) {
            tokio::spawn(reload_on_change(tls.clone(), crl, seen, sender));
        }
        Ok(Self { current })
    }

    /// The configuration for the next handshake.
    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.borrow().config.clone())
    }
}

/// Re-reads the revocation list whenever its bytes differ from `seen` (what is in force),
/// until no server uses it. A list that cannot be loaded, or that is older than the one in
/// force (a lower CRL number, which would undo revocations), leaves the one in force.
async fn reload_on_change(
    tls: TlsFiles,
    crl: PathBuf,
    mut seen: Vec<u8>,
    sender: watch::Sender<Arc<LoadedTls>>,
) {
    let mut unreadable = false;
    loop {
        tokio::time::sleep(CRL_POLL).await;
        if sender.is_closed() {
            return;
        }
        let now = match std::fs::read(&crl) {
            Ok(now) => {
                unreadable = false;
                now
            }
            Err(e) => {
                if !unreadable {
                    tracing::error!(crl = %crl.display(), error = %e,
                        "the revocation list cannot be read; callers are still checked against the previous one");
                    unreadable = true;
                }
                continue;
            }
        };
        if now == seen {
            continue;
        }
        let in_force = sender.borrow().crl_number;
        let result = LoadedTls::load(&tls, Some(&now));
        seen = now;
        match result {
            Ok(loaded) if loaded.crl_number < in_force => tracing::error!(
                crl = %crl.display(),
                number = ?loaded.crl_number,
                in_force = ?in_force,
                "the revocation list is older than the one in force; it is ignored (it could undo revocations)"
            ),
            Ok(loaded) => {
                tracing::info!(crl = %crl.display(), number = ?loaded.crl_number, "revocation list reloaded");
                sender.send_replace(Arc::new(loaded));
            }
            Err(e) => tracing::error!(
                crl = %crl.display(),
                error = %e,
                "the revocation list could not be loaded; callers are still checked against the previous one"
            ),
        }
    }
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
/// `cluster`, and binds `addr`.
pub async fn bind_mtls(
    tls: &TlsFiles,
    cluster: &str,
    role: dqkd_pki::Role,
    id: &str,
    addr: SocketAddr,
) -> Result<MtlsListener, BindError> {
    let server_tls = ServerTls::load(tls).map_err(|e| BindError::Tls(e.to_string()))?;
    check_own_certificate(&tls.cert, cluster, role, id).map_err(BindError::Tls)?;
    let listener = bind(addr).await?;
    let addr = listener
        .local_addr()
        .map_err(|source| BindError::Bind { addr, source })?;
    Ok(MtlsListener {
        tls: server_tls,
        listener,
        addr,
    })
}

/// Binds a plain TCP listener, with the address in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError::Bind { addr, source })
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
    limits: ListenerLimits,
    mut stopped: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let registry = limits::Registry::new(&limits);
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
        // A clone starts as "changed" after any reload, so a connection accepted just
        // before one is checked against the new list too (once more than needed, harmless).
        let mut updates = tls.current.clone();
        let app = app.clone();
        let cluster = cluster.clone();
        let watcher = graceful.watcher();
        let bounds = *registry.limits();
        tokio::spawn(conn.run(remote, async move {
            let handshake = tokio::time::timeout(bounds.handshake_timeout(), acceptor.accept(tcp));
            let tls = match handshake.await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let chain: Vec<CertificateDer<'static>> = tls
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
            tracker.touch();
            let service =
                hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                    request.extensions_mut().insert(peer.clone());
                    let in_flight = tracker.request();
                    let response = app.clone().oneshot(request);
                    async move {
                        let response = response.await?;
                        Ok::<_, Infallible>(limits::TrackedBody::wrap(response, in_flight))
                    }
                });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(bounds.header_timeout());
            let connection = builder.serve_connection(TokioIo::new(tls), service);
            tokio::select! {
                ended = watcher.watch(connection) => {
                    if let Err(e) = ended {
                        tracing::debug!(%remote, error = %e, "connection ended with an error");
                    }
                }
                () = revoked(&mut updates, &chain) => {
                    tracing::info!(%remote, "closed a connection: its client certificate is now revoked");
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

/// Returns once a new configuration refuses the client certificate chain `chain` (never,
/// while the configuration stays as it is).
async fn revoked(updates: &mut watch::Receiver<Arc<LoadedTls>>, chain: &[CertificateDer<'static>]) {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return std::future::pending().await;
    };
    while updates.changed().await.is_ok() {
        let verifier = updates.borrow_and_update().verifier.clone();
        if verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .is_err()
        {
            return;
        }
    }
    std::future::pending().await
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
