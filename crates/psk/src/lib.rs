//! `dqkd psk`: preshared keys that follow the cluster.
//!
//! Two processes, one per end of a tunnel, each an SAE of its own site. The initiator asks
//! its KME for a key shared with the responder's SAE (`enc_keys`) and sends the responder
//! only the key ID, over mutual TLS with cluster certificates; the responder fetches the
//! same key from its own KME (`dec_keys`). Both put it in use (`wg set … preshared-key`,
//! or any command) at the start of the same epoch of a shared, interval-aligned schedule
//! ([`Schedule`]), so nothing but the key ID and the epoch number needs agreeing.
//!
//! The protocol is sans-I/O at heart: [`Initiator`] and [`Responder`] hold the state and
//! reach the world only through [`KeySource`], [`Link`] and [`Apply`], so tests run both
//! ends in one process; [`start`] wires the real KME client, link and appliers.

#![forbid(unsafe_code)]

mod applied;
pub mod apply;
mod initiator;
mod key;
mod kme;
pub mod link;
pub mod metrics;
mod ports;
mod responder;
mod schedule;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

pub use dqkd_net::TlsFiles;
pub use initiator::Initiator;
pub use key::{Psk, Slot, PSK_LEN};
pub use kme::EtsiKeys;
pub use ports::{Apply, KeySource, Link, Reply, Request};
pub use responder::Responder;
pub use schedule::{Epoch, Schedule};

/// What can go wrong at one end.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PskError {
    /// A setting is unusable.
    #[error("{0}")]
    Config(String),
    /// Certificates could not be loaded, or are not this SAE's.
    #[error("TLS setup: {0}")]
    Tls(#[from] dqkd_pki::PkiError),
    /// This end's KME failed or refused.
    #[error("KME: {0}")]
    Kme(#[from] dqkd_client::ClientError),
    /// The KME's answer is not a usable preshared key.
    #[error("{0}")]
    BadKey(String),
    /// The other end could not be reached or answered nonsense.
    #[error("link to the other end: {0}")]
    Link(String),
    /// The other end refused the request.
    #[error("the other end answered {status}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Its message.
        message: String,
    },
    /// The offer's epoch does not fit the responder's clock.
    #[error("clock skew: epoch {offered} offered, the responder is at epoch {ours}")]
    Skew {
        /// The epoch offered.
        offered: Epoch,
        /// The responder's epoch at the time.
        ours: Epoch,
    },
    /// The key could not be put in use.
    #[error("applying the key: {0}")]
    Apply(String),
}

/// Which end this is.
#[derive(Debug, Clone)]
pub enum End {
    /// Makes the keys and offers their IDs to the responding end at this URL
    /// (`https://host:port`).
    Initiator {
        /// The responding end's address.
        peer_url: String,
    },
    /// Takes offers on this address.
    Responder {
        /// Where to listen.
        listen: SocketAddr,
    },
}

/// The settings of one end.
pub struct Config {
    /// The cluster name (part of every identity).
    pub cluster: String,
    /// This end's SAE ID; its certificate is in `tls`.
    pub sae: String,
    /// The other end's SAE ID.
    pub peer_sae: String,
    /// This SAE's certificate files (for its KME and for the link).
    pub tls: dqkd_net::TlsFiles,
    /// This end's KME (`https://host:port`).
    pub kme_url: String,
    /// The shared schedule.
    pub schedule: Schedule,
    /// Initiator or responder.
    pub end: End,
    /// How keys are put in use.
    pub apply: Arc<dyn Apply>,
    /// Plain-HTTP `/metrics` listener, if any.
    pub metrics_listen: Option<SocketAddr>,
}

/// One end, running.
pub struct Rotator {
    listen_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Rotator {
    /// Where the responder listens (the real port when 0 was asked for).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen_addr
    }

    /// Stops this end; the key in use stays in use.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Starts one end: checks its certificate, then runs its end of the protocol until
/// [`Rotator::stop`].
pub async fn start(config: Config) -> Result<Rotator, PskError> {
    dqkd_net::check_own_certificate(
        &config.tls.cert,
        &config.cluster,
        dqkd_pki::Role::Sae,
        &config.sae,
    )
    .map_err(PskError::Config)?;
    let kme_tls = dqkd_pki::client_config(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
    let kme = dqkd_client::Client::new(&config.kme_url, kme_tls)?;
    let keys: Arc<dyn KeySource> = Arc::new(EtsiKeys::new(kme, &config.peer_sae));
    let peer = link::sae(&config.cluster, &config.peer_sae)?;
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    if let Some(addr) = config.metrics_listen {
        let listener = metrics::bind(addr).await?;
        tasks.push(tokio::spawn(metrics::serve(listener, stopped.clone())));
    }
    let mut listen_addr = None;
    match config.end {
        End::Initiator { peer_url } => {
            let outgoing =
                dqkd_net::OutgoingTls::load(&config.tls, dqkd_pki::KeyExchange::HybridOnly)?;
            let client = outgoing.client(
                peer,
                dqkd_net::Versions::Http1,
                Some(std::time::Duration::from_secs(5)),
            )?;
            let link: Arc<dyn Link> = Arc::new(link::HttpsLink::new(&peer_url, client));
            let initiator = Initiator::new(config.schedule, keys, link, config.apply);
            tasks.push(tokio::spawn(drive_initiator(initiator, stopped)));
        }
        End::Responder { listen } => {
            let bound = dqkd_net::bind_mtls(
                &config.tls,
                &config.cluster,
                dqkd_pki::Role::Sae,
                &config.sae,
                listen,
                dqkd_pki::KeyExchange::HybridOnly,
                "psk",
            )
            .await
            .map_err(|e| PskError::Config(e.to_string()))?;
            listen_addr = Some(bound.addr);
            let responder = Arc::new(Mutex::new(Responder::new(
                config.schedule,
                keys,
                config.apply,
            )));
            let app = link::router(link::Served {
                responder: responder.clone(),
                initiator: Arc::new(peer),
            });
            tasks.push(tokio::spawn(dqkd_net::serve_mtls(
                bound.listener,
                bound.tls,
                app,
                Arc::from(config.cluster.as_str()),
                dqkd_net::ServerLimits::default(),
                stopped.clone(),
            )));
            tasks.push(tokio::spawn(drive_responder(responder, stopped)));
        }
    }
    Ok(Rotator {
        listen_addr,
        stop,
        tasks,
    })
}

async fn drive_initiator(mut initiator: Initiator, mut stopped: watch::Receiver<bool>) {
    loop {
        let wake = initiator.step(SystemTime::now()).await;
        if sleep_until(wake, &mut stopped).await {
            return;
        }
    }
}

async fn drive_responder(responder: Arc<Mutex<Responder>>, mut stopped: watch::Receiver<bool>) {
    loop {
        let wake = responder.lock().await.tick(SystemTime::now()).await;
        if sleep_until(wake, &mut stopped).await {
            return;
        }
    }
}

/// Sleeps until the wall-clock time `wake`; true when told to stop instead.
async fn sleep_until(wake: SystemTime, stopped: &mut watch::Receiver<bool>) -> bool {
    let wait = wake
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        // Wall clocks jump: look again at least every second.
        .min(std::time::Duration::from_secs(1));
    tokio::select! {
        _ = tokio::time::sleep(wait) => false,
        _ = stopped.changed() => true,
    }
}
