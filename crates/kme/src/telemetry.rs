//! Prometheus metrics: one process-wide recorder, rendered on the site's metrics listener.
//!
//! Every KME metric carries a `kme` label, so a process that runs several sites (as
//! `dqkd up` does) still tells them apart.

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::kekwatch::KekState;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Seconds: from a fraction of a millisecond (a status call) to the peer timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];
/// Counts: keys or operations per batch.
const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// The process-wide handle, installing the recorder on first use. If another recorder is
/// already installed (an embedding program's), metrics go there and this renders nothing.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_keys".into()), SIZE_BUCKETS))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_ops".into()), SIZE_BUCKETS))
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder is already installed; /metrics will be empty");
        }
        handle
    })
}

/// Serves, in plain HTTP until `stopped` changes: `GET /metrics` (Prometheus text
/// format), `GET /health` and `GET /ready` for orchestrators' probes, and the routes of
/// `status` (the status page). The listener only starts once the store is open and the
/// APIs are bound, so both probes answer 200 from then on; a process that cannot serve
/// does not answer at all. The one exception: while the site KEK is unavailable (its token
/// gone), `/ready` answers 503 and says why.
pub async fn serve(
    listener: TcpListener,
    kme_id: String,
    status: Router,
    kek: KekState,
    mut stopped: watch::Receiver<bool>,
) {
    let handle = handle();
    let json = |status: StatusCode, body: String| {
        let mut response = (status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    };
    let ok = format!(r#"{{"status":"ok","kme_id":{kme_id:?}}}"#);
    let health = {
        let ok = ok.clone();
        move || std::future::ready(json(StatusCode::OK, ok.clone()))
    };
    let ready = move || {
        let response = match kek.unavailable() {
            None => json(StatusCode::OK, ok.clone()),
            Some(reason) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({
                    "status": "unavailable",
                    "kme_id": kme_id,
                    "reason": format!("site key-encryption key unavailable: {reason}"),
                })
                .to_string(),
            ),
        };
        std::future::ready(response)
    };
    let app = Router::new()
        .route(
            "/metrics",
            get(move || async move {
                let mut response = handle.render().into_response();
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            }),
        )
        .route("/health", get(health))
        .route("/ready", get(ready))
        .merge(status);
    let shutdown = async move {
        let _ = stopped.changed().await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!(error = %e, "metrics listener stopped");
    }
}

/// The bound address of a metrics listener, for logs and ready files.
pub fn describe(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(|| "off".into(), |a| format!("http://{a}/metrics"))
}
