//! The TLS listener: accepts connections, runs each handshake on its own task (a slow
//! client never stalls the accept loop), learns the caller's identity from its
//! certificate and serves HTTP/1.1 or HTTP/2 on the connection. Also runs the expiry
//! sweep that shreds pools whose TTL has ended.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dqkd_net::{BindError, MtlsListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::router;
use crate::config::Config;
use crate::service::EntropyService;
use crate::source::{EntropySource, SourceError};

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
        // A mix file is never rewound: one that cannot fill even one pool is refused.
        Some(path) => EntropySource::with_mix_file(path, config.pool_max_bytes)?,
        None => EntropySource::system(),
    };
    run_with(config, Arc::new(source)).await
}

/// Like [`run`], over a given entropy source.
pub async fn run_with(config: Config, source: Arc<EntropySource>) -> Result<Serving, ServeError> {
    let MtlsListener {
        tls,
        listener,
        addr: api_addr,
    } = dqkd_net::bind_mtls(
        &config.tls,
        &config.cluster,
        dqkd_pki::Role::Entropy,
        &config.server_id,
        config.listen,
        config
            .tls
            .key_exchange
            .unwrap_or(dqkd_pki::KeyExchange::HybridOnly),
        "entropy",
    )
    .await?;
    let mix = source.mix_path().map(|p| p.display().to_string());
    let config = Arc::new(config);
    let service = Arc::new(EntropyService::new(config.clone(), source));
    let (stop, stopped) = watch::channel(false);

    let sweeper = tokio::spawn(sweep_loop(service.clone(), stopped.clone()));
    let app = router(service.clone());
    let cluster: Arc<str> = config.cluster.as_str().into();
    let limits = config.connections;
    let task = tokio::spawn(async move {
        dqkd_net::serve_mtls(listener, tls, app, cluster, limits, stopped).await;
        let _ = sweeper.await;
    });
    if config.insecure_corrupt_reads {
        tracing::warn!(
            server_id = %config.server_id,
            "INSECURE: insecure_corrupt_reads is on; every range served to a reader has a \
             flipped bit, so no key regenerated from this server will match. For tests only"
        );
    }
    if config.insecure_stuck_output {
        tracing::warn!(
            server_id = %config.server_id,
            "INSECURE: insecure_stuck_output is on; every range this server hands out is all \
             zeros, past its own health tests. For tests of the KMEs' checks only"
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
