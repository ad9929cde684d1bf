//! Prometheus metrics of one end: rotations, failures by stage, and the epoch in use.

use std::net::SocketAddr;

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

/// Which end a process is; a label on every metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Asks its KME for new keys and offers their IDs.
    Initiator,
    /// Fetches the offered keys from its KME.
    Responder,
}

impl Role {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Initiator => "initiator",
            Role::Responder => "responder",
        }
    }
}

/// Where something failed; the `stage` label of `dqkd_psk_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// This end's KME (`enc_keys`, `dec_keys`).
    Kme,
    /// The link to the other end.
    Link,
    /// Putting the key in use (`wg set`, `--exec`).
    Apply,
    /// The other end's clock is outside the tolerated skew.
    Skew,
    /// The other end did not confirm a key within one interval: the previous one is back.
    Revert,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::Kme => "kme",
            Stage::Link => "link",
            Stage::Apply => "apply",
            Stage::Skew => "skew",
            Stage::Revert => "revert",
        }
    }
}

pub(crate) fn rotated(role: Role, epoch: u64) {
    metrics::counter!("dqkd_psk_rotations_total", "role" => role.as_str()).increment(1);
    metrics::gauge!("dqkd_psk_epoch", "role" => role.as_str()).set(epoch as f64);
}

pub(crate) fn failed(role: Role, stage: Stage) {
    metrics::counter!("dqkd_psk_failures_total", "role" => role.as_str(), "stage" => stage.as_str())
        .increment(1);
}

/// Installs the process-wide Prometheus recorder (once) and serves `GET /metrics` on
/// `listener` in plain HTTP until `stopped` changes; meant for loopback or a scrape network.
pub async fn serve(listener: tokio::net::TcpListener, mut stopped: watch::Receiver<bool>) {
    let handle = recorder();
    let app = Router::new().route("/metrics", get(move || async move { handle.render() }));
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stopped.changed().await;
        })
        .await;
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, crate::PskError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| crate::PskError::Config(format!("cannot listen on {addr}: {e}")))
}

fn recorder() -> PrometheusHandle {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("a metrics recorder is already installed; /metrics will be empty");
    }
    handle
}
