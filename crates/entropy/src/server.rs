//! The TLS listener: accepts connections, runs each handshake on its own task (a slow
//! client never stalls the accept loop), learns the caller's identity from its
//! certificate and serves HTTP/1.1 or HTTP/2 on the connection. Also runs the expiry
//! sweep that shreds pools whose TTL has ended.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
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
use crate::service::EntropyService;
use crate::source::{EntropySource, SourceError};

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for open requests before closing connections.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often expired pools are looked for. Reads check expiry themselves, so this only
/// bounds how long expired bytes stay in memory.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Why the entropy server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Certificates could not be loaded or do not fit the configuration.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The configured mix source is unusable.
    #[error("entropy source: {0}")]
    Source(#[from] SourceError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running entropy server. Dropping it without [`Serving::shutdown`] aborts it.
pub struct Serving {
    api_addr: SocketAddr,
    service: Arc<EntropyService>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Serving {
    /// The address the API listens on (with the real port when 0 was configured).
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The service behind the API (for in-process tests and embedding).
    pub fn service(&self) -> &Arc<EntropyService> {
        &self.service
    }

    /// Stops accepting and lets open requests finish (up to a few seconds).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Loads certificates, opens the entropy source, binds the listener and starts serving.
pub async fn run(config: Config) -> Result<Serving, ServeError> {
    let source = match &config.mix_file {
        Some(path) => EntropySource::with_mix_file(path)?,
        None => EntropySource::system(),
    };
    run_with(config, Arc::new(source)).await
}

/// Like [`run`], over a given entropy source.
pub async fn run_with(config: Config, source: Arc<EntropySource>) -> Result<Serving, ServeError> {
    let tls = dqkd_pki::server_config(&config.tls.ca, &config.tls.cert, &config.tls.key)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    check_own_certificate(&config)?;
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let api_addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen,
        source,
    })?;
    let mix = source.mix_path().map(|p| p.display().to_string());
    let config = Arc::new(config);
    let service = Arc::new(EntropyService::new(config.clone(), source));
    let (stop, stopped) = watch::channel(false);

    let sweeper = tokio::spawn(sweep_loop(service.clone(), stopped.clone()));
    let app = router(service.clone());
    let cluster: Arc<str> = config.cluster.as_str().into();
    let task = tokio::spawn(async move {
        accept_loop(listener, acceptor, app, cluster, stopped).await;
        let _ = sweeper.await;
    });
    if config.insecure_corrupt_reads {
        tracing::warn!(
            server_id = %config.server_id,
            "INSECURE: insecure_corrupt_reads is on; every range served to a reader has a \
             flipped bit, so no key regenerated from this server will match. For tests only"
        );
    }
    tracing::info!(
        server_id = %config.server_id,
        %api_addr,
        mix_source = mix.as_deref().unwrap_or("none"),
        pool_ttl_secs = config.pool_ttl.as_secs(),
        "entropy server serving"
    );
    Ok(Serving {
        api_addr,
        service,
        stop,
        task,
    })
}

/// The configured certificate must be this server's entropy identity, or KMEs would be
/// drawing randomness from a server that cannot prove which one it is.
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
    if identity.role() != dqkd_pki::Role::Entropy || identity.id() != config.server_id {
        return Err(ServeError::Tls(format!(
            "{} is the certificate of {}, not of entropy server {:?}",
            config.tls.cert.display(),
            identity.uri(),
            config.server_id
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

async fn sweep_loop(service: Arc<EntropyService>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.changed() => return,
        }
        service.sweep();
    }
}
