//! The TLS listener: accepts connections, runs each handshake on its own task (a slow
//! client never stalls the accept loop), learns the caller's identity from its
//! certificate and serves HTTP/1.1 or HTTP/2 on the connection.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use dqkd_store::{EmbeddedStore, Kek, KeyStore};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::api::{router, PeerIdentity};
use crate::config::Config;
use crate::keysource::{KeySource, OsRandom};
use crate::service::KeyService;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for open requests before closing connections.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the KME could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Certificates could not be loaded or do not fit the configuration.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The key store could not be opened.
    #[error("key store {path}: {source}")]
    Store {
        /// The store file.
        path: PathBuf,
        /// Why.
        source: dqkd_store::StoreError,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running KME. Dropping it without [`Serving::shutdown`] aborts it.
pub struct Serving {
    api_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Serving {
    /// The address the ETSI API listens on (with the real port when 0 was configured).
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// Stops accepting, lets open requests finish (up to a few seconds), and closes the
    /// store after its queued writes are committed.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Opens the store, loads certificates, binds the listener and starts serving.
pub async fn run(config: Config) -> Result<Serving, ServeError> {
    let kek = Kek::load(&config.store.kek).map_err(|source| ServeError::Store {
        path: config.store.kek.clone(),
        source,
    })?;
    let store =
        EmbeddedStore::open(&config.store.path, kek).map_err(|source| ServeError::Store {
            path: config.store.path.clone(),
            source,
        })?;
    run_with(config, Arc::new(store), Arc::new(OsRandom::default())).await
}

/// Like [`run`], over a given store and key source.
pub async fn run_with(
    config: Config,
    store: Arc<dyn KeyStore>,
    source: Arc<dyn KeySource>,
) -> Result<Serving, ServeError> {
    let tls = dqkd_pki::server_config(&config.tls.ca, &config.tls.cert, &config.tls.key)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    check_own_certificate(&config)?;
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(config.api_listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.api_listen,
            source,
        })?;
    let api_addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.api_listen,
        source,
    })?;
    let config = Arc::new(config);
    let service = Arc::new(KeyService::new(config.clone(), store, source));
    let (stop, stopped) = watch::channel(false);

    let purge = tokio::spawn(purge_loop(service.clone(), stopped.clone()));
    let app = router(service);
    let cluster: Arc<str> = config.cluster.as_str().into();
    let task = tokio::spawn(async move {
        accept_loop(listener, acceptor, app, cluster, stopped).await;
        let _ = purge.await;
    });
    tracing::info!(kme_id = %config.kme_id, %api_addr, "KME serving the ETSI 014 API");
    Ok(Serving {
        api_addr,
        stop,
        task,
    })
}

/// The configured certificate must be this site's KME identity, or SAEs would be talking
/// to a server that cannot prove which site it is.
fn check_own_certificate(config: &Config) -> Result<(), ServeError> {
    let chain =
        dqkd_pki::load_certs(&config.tls.cert).map_err(|e| ServeError::Tls(e.to_string()))?;
    let leaf = chain.first().ok_or_else(|| {
        ServeError::Tls(format!(
            "{} holds no certificate",
            config.tls.cert.display()
        ))
    })?;
    let identity = dqkd_pki::Identity::from_certificate(leaf.as_ref(), &config.cluster)
        .map_err(|e| ServeError::Tls(format!("{}: {e}", config.tls.cert.display())))?;
    if identity.role() != dqkd_pki::Role::Kme || identity.id() != config.kme_id {
        return Err(ServeError::Tls(format!(
            "{} is the certificate of {}, not of KME {:?}",
            config.tls.cert.display(),
            identity.uri(),
            config.kme_id
        )));
    }
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Router,
    cluster: Arc<str>,
    mut stopped: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
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
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let cluster = cluster.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
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
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| {
                    dqkd_pki::Identity::from_certificate(leaf.as_ref(), &cluster)
                        .map_err(|e| tracing::debug!(%remote, error = %e, "no dqkd identity"))
                        .ok()
                })
                .map(Arc::new);
            let peer = PeerIdentity(identity);
            let service =
                hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                    request.extensions_mut().insert(peer.clone());
                    app.clone().oneshot(request)
                });
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain timeout; closing them");
    }
}

async fn purge_loop(service: Arc<KeyService>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(service.config().purge_interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.changed() => return,
        }
        match service.purge_expired().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(target: "dqkd::audit", event = "keys_expired", count = n),
            Err(e) => tracing::warn!(error = %e, "purging expired keys failed"),
        }
    }
}
