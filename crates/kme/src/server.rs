//! Starting a KME: opens the key store, makes the pinned clients for peer sites, binds the
//! ETSI, peer and metrics listeners (`dqkd_net` accepts the connections and checks the
//! certificates), reads the ready-key pools back, and runs it all until shutdown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use dqkd_net::{BindError, KeyExchange, MtlsListener};
use dqkd_pki::Role;
use dqkd_store::{EmbeddedStore, Kek, KeyStore};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{peer_router, router};
use crate::blast::Blast;
use crate::config::{Config, KekLocation, PostgresTls, StoreLocation};
use crate::keysource::{KeySource, OsRandom};
use crate::peer::{Peer, PeerClient};
use crate::service::KeyService;

/// Why the KME could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Certificates could not be loaded or do not fit the configuration.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The key store could not be opened.
    #[error("key store {path}: {cause}")]
    Store {
        /// The store file or database (without password).
        path: String,
        /// Why.
        cause: dqkd_store::StoreError,
    },
    /// The key-encryption key in a PKCS#11 token could not be opened.
    #[error("key-encryption key {uri}: {cause}")]
    Token {
        /// The `pkcs11:` URI.
        uri: String,
        /// Why.
        cause: dqkd_kek_pkcs11::Pkcs11Error,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {cause}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        cause: std::io::Error,
    },
}

impl From<BindError> for ServeError {
    fn from(e: BindError) -> Self {
        match e {
            BindError::Bind { addr, cause } => Self::Bind { addr, cause },
            other => Self::Tls(other.to_string()),
        }
    }
}

/// A running KME. Dropping it without [`Serving::shutdown`] aborts it.
pub struct Serving {
    api_addr: SocketAddr,
    peer_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Serving {
    /// The address the ETSI API listens on (with the real port when 0 was configured).
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The address the peer API listens on, in a multi-site cluster.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }

    /// The address of the Prometheus listener, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
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
    for warning in config.warnings() {
        tracing::warn!(kme_id = %config.kme_id, "insecure configuration: {warning}");
    }
    let kek = open_kek(&config.store.kek)?;
    let watched = kek.clone();
    let store: Arc<dyn KeyStore> = match &config.store.location {
        StoreLocation::Embedded(path) => Arc::new(
            EmbeddedStore::open_for_kme(path, kek, &config.kme_id).map_err(|cause| {
                ServeError::Store {
                    path: path.display().to_string(),
                    cause,
                }
            })?,
        ),
        StoreLocation::Postgres {
            url,
            pool_size,
            tls,
        } => {
            let mut options = dqkd_store_postgres::Options::new(*pool_size);
            if let Some(tls) = tls {
                options = options.tls(postgres_tls(tls)?);
            }
            Arc::new(
                dqkd_store_postgres::PostgresStore::connect_with(url, kek, options)
                    .await
                    .map_err(|cause| ServeError::Store {
                        path: redact_url(url),
                        cause,
                    })?,
            )
        }
    };
    // One client setup (and one revocation-list follower) for peers and entropy servers.
    let outgoing = outgoing_tls(&config)?;
    let source = key_source(&config, &outgoing)?;
    serve(config, store, source, outgoing, Some(watched)).await
}

/// The site KEK from its file, or opened in its token (refusing to start without it).
/// `dqkd check` opens it the same way.
pub fn open_kek(location: &KekLocation) -> Result<Kek, ServeError> {
    match location {
        KekLocation::File(path) => Kek::load(path).map_err(|cause| ServeError::Store {
            path: path.display().to_string(),
            cause,
        }),
        KekLocation::Pkcs11 { uri, module, pin } => {
            let token = |cause| ServeError::Token {
                uri: uri.clone(),
                cause,
            };
            let config = dqkd_kek_pkcs11::TokenKekConfig {
                module: module.clone(),
                uri: dqkd_kek_pkcs11::KekUri::parse(uri).map_err(|reason| {
                    token(dqkd_kek_pkcs11::Pkcs11Error::Device {
                        context: "reading the URI".into(),
                        reason,
                    })
                })?,
                pin: dqkd_kek_pkcs11::Pin::new(pin.0.clone()),
            };
            let kek = dqkd_kek_pkcs11::TokenKek::open_kek(&config).map_err(token)?;
            tracing::info!(kek = %uri, "site key-encryption key held in a PKCS#11 token");
            Ok(kek)
        }
    }
}

/// The TLS client configuration for PostgreSQL from `[store] ca` (and `cert`/`key`).
fn postgres_tls(tls: &PostgresTls) -> Result<dqkd_pki::rustls::ClientConfig, ServeError> {
    let fail = |what: &str, e: dqkd_pki::PkiError| ServeError::Tls(format!("[store] {what}: {e}"));
    let ca = dqkd_pki::load_certs(&tls.ca).map_err(|e| fail("ca", e))?;
    let client = match &tls.client {
        Some(files) => Some((
            dqkd_pki::load_certs(&files.cert).map_err(|e| fail("cert", e))?,
            dqkd_pki::load_private_key(&files.key).map_err(|e| fail("key", e))?,
        )),
        None => None,
    };
    dqkd_pki::database_client_config(&ca, client)
        .map_err(|e| fail(&format!("ca {} / cert / key", tls.ca.display()), e))
}

/// A database URL without its password, for messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user = &url[scheme + 3..at];
            let user = user.split(':').next().unwrap_or("");
            format!("{}{user}@{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// The BLAST-style generator when the manifest lists entropy servers, else the OS CSPRNG.
fn key_source(
    config: &Config,
    outgoing: &Arc<dqkd_net::OutgoingTls>,
) -> Result<Arc<dyn KeySource>, ServeError> {
    if config.entropy.is_empty() {
        return Ok(Arc::new(OsRandom::default()));
    }
    let mut servers = Vec::with_capacity(config.entropy.len());
    for server in &config.entropy {
        let http = pinned_client(
            outgoing,
            config,
            Role::Entropy,
            &server.id,
            // HTTP/2: many small allocations and reads share one connection.
            dqkd_net::Versions::Any,
        )?;
        let client = dqkd_entropy::client::EntropyClient::new(
            &format!("https://{}", server.addr),
            &server.id,
            http,
        )
        .map_err(|e| ServeError::Tls(format!("entropy server {}: {e}", server.id)))?
        .with_timeout(config.peer_timeout);
        servers.push((server.id.to_string(), client));
    }
    let blast = Blast::new(servers, config.keygen.n, config.keygen.c)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    Ok(Arc::new(blast))
}

/// The key exchange of links between dqkd processes: the peer API and this KME's calls.
fn peer_key_exchange(config: &Config) -> KeyExchange {
    config
        .tls
        .peer_key_exchange
        .unwrap_or(KeyExchange::HybridOnly)
}

/// This KME's certificate as a TLS client (to peers and entropy servers), following the
/// cluster's revocation list.
fn outgoing_tls(config: &Config) -> Result<Arc<dqkd_net::OutgoingTls>, ServeError> {
    dqkd_net::OutgoingTls::load(&config.tls, peer_key_exchange(config))
        .map_err(|e| ServeError::Tls(e.to_string()))
}

/// A client that accepts only the server the manifest names `role` `id`.
fn pinned_client(
    outgoing: &Arc<dqkd_net::OutgoingTls>,
    config: &Config,
    role: Role,
    id: &str,
    versions: dqkd_net::Versions,
) -> Result<dqkd_net::PinnedClient, ServeError> {
    let expected = dqkd_pki::Identity::new(&config.cluster, role, id)
        .map_err(|e| ServeError::Tls(format!("{role} {id}: {e}")))?;
    outgoing
        .client(expected, versions, Some(config.peer_timeout))
        .map_err(|e| ServeError::Tls(e.to_string()))
}

fn peer_clients(
    config: &Config,
    outgoing: &Arc<dqkd_net::OutgoingTls>,
) -> Result<BTreeMap<String, Arc<dyn Peer>>, ServeError> {
    let mut peers = BTreeMap::new();
    for site in config.sites.values() {
        if site.kme_id == config.kme_id {
            continue;
        }
        if let Some(addr) = &site.peer_addr {
            // HTTP/1.1: a link carries a few large batched messages at a time, and HTTP/2's
            // stream bookkeeping cost more CPU than one kept-alive connection per message
            // in flight.
            let http = pinned_client(
                outgoing,
                config,
                Role::Kme,
                &site.kme_id,
                dqkd_net::Versions::Http1,
            )?;
            let client = PeerClient::new(&site.kme_id, addr, http, config.peer_timeout);
            peers.insert(site.kme_id.to_string(), Arc::new(client) as Arc<dyn Peer>);
        }
    }
    Ok(peers)
}

/// Like [`run`], over a given store and key source.
pub async fn run_with(
    config: Config,
    store: Arc<dyn KeyStore>,
    source: Arc<dyn KeySource>,
) -> Result<Serving, ServeError> {
    let outgoing = outgoing_tls(&config)?;
    serve(config, store, source, outgoing, None).await
}

/// [`run_with`], with this KME's client setup for its calls to peers already made.
async fn serve(
    config: Config,
    store: Arc<dyn KeyStore>,
    source: Arc<dyn KeySource>,
    outgoing: Arc<dqkd_net::OutgoingTls>,
    kek: Option<Kek>,
) -> Result<Serving, ServeError> {
    let MtlsListener {
        tls,
        listener,
        addr: api_addr,
    } = dqkd_net::bind_mtls(
        &config.tls,
        &config.cluster,
        Role::Kme,
        &config.kme_id,
        config.api_listen,
        config.tls.key_exchange.unwrap_or(KeyExchange::PreferHybrid),
        "etsi",
    )
    .await?;
    // The peer API shares the TLS configuration (same certificate, trust anchor and CRL)
    // but has a key exchange of its own: hybrid only, by default.
    let peer_tls = tls.for_listener(
        peer_key_exchange(&config),
        dqkd_net::listener_labels(Role::Kme, &config.kme_id, "peer"),
    );
    let peer_listener = match config.peer_listen {
        Some(addr) => Some(dqkd_net::bind(addr).await?),
        None => None,
    };
    let peer_addr = peer_listener.as_ref().and_then(|l| l.local_addr().ok());
    crate::telemetry::handle();
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(dqkd_net::bind(addr).await?),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    let peers = peer_clients(&config, &outgoing)?;
    let expiry =
        dqkd_net::CertificateExpiry::load(&config.tls, vec![("kme", config.kme_id.to_string())]);
    let config = Arc::new(config);
    let board = crate::status::Board::new(config.clone(), store.clone(), &outgoing, expiry.clone())
        .map(Arc::new)
        .map_err(ServeError::Tls)?;
    let service = Arc::new(KeyService::new(config.clone(), store, source, peers));
    let (stop, stopped) = watch::channel(false);
    let kek_state = match kek {
        Some(kek) => crate::kekwatch::watch(kek, &config.kme_id, stopped.clone()),
        None => crate::kekwatch::KekState::always(),
    };
    let loaded = service
        .start_pools(stopped.clone())
        .await
        .map_err(|cause| ServeError::Store {
            path: "reading the ready-key pools".into(),
            cause,
        })?;
    if config.pools.target > 0 {
        tracing::info!(
            ready_keys = loaded,
            target = config.pools.target,
            replica = config.replica.as_deref().unwrap_or("none"),
            "ready-key pools loaded"
        );
    }

    let purge = tokio::spawn(purge_loop(service.clone(), stopped.clone()));
    let cluster: Arc<str> = config.cluster.as_str().into();
    let peer_task = peer_listener.map(|listener| {
        tokio::spawn(dqkd_net::serve_mtls(
            listener,
            peer_tls,
            peer_router(service.inbox()).layer(axum::middleware::from_fn_with_state(
                kek_state.clone(),
                crate::kekwatch::gate,
            )),
            cluster.clone(),
            config.connections,
            stopped.clone(),
        ))
    });
    tokio::spawn(expiry.run(stopped.clone()));
    if metrics_listener.is_some() {
        tokio::spawn(board.clone().sample(stopped.clone()));
    }
    let metrics_task = metrics_listener.map(|listener| {
        tokio::spawn(crate::telemetry::serve(
            listener,
            config.kme_id.to_string(),
            crate::status::router(board),
            kek_state.clone(),
            stopped.clone(),
        ))
    });
    let app = router(service).layer(axum::middleware::from_fn_with_state(
        kek_state,
        crate::kekwatch::gate,
    ));
    let api_limits = config.connections;
    let task = tokio::spawn(async move {
        dqkd_net::serve_mtls(listener, tls, app, cluster, api_limits, stopped).await;
        if let Some(peer_task) = peer_task {
            let _ = peer_task.await;
        }
        if let Some(metrics_task) = metrics_task {
            let _ = metrics_task.await;
        }
        let _ = purge.await;
    });
    tracing::info!(
        kme_id = %config.kme_id,
        %api_addr,
        ?peer_addr,
        metrics = %crate::telemetry::describe(metrics_addr),
        "KME serving"
    );
    Ok(Serving {
        api_addr,
        peer_addr,
        metrics_addr,
        stop,
        task,
    })
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
