//! Watches a site KEK held in a device (a PKCS#11 token). Once the device stops answering,
//! the KME keeps running but serves no keys (503, saying why) and `/ready` reports it; when
//! the device answers again, both resume. A KEK file never goes away, so it is not watched.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dqkd_store::Kek;
use tokio::sync::watch;

use crate::ApiError;

/// How often a held KEK is asked whether it still answers: one HMAC in the token.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Whether the site KEK can be used: `None` while it can, else why not.
#[derive(Clone)]
pub struct KekState(watch::Receiver<Option<String>>);

impl KekState {
    /// A KEK that is always there (a file, or a store opened by the caller).
    pub fn always() -> Self {
        KekState(watch::channel(None).1)
    }

    /// Why the KEK cannot be used, if it cannot.
    pub fn unavailable(&self) -> Option<String> {
        self.0.borrow().clone()
    }
}

/// Starts watching `kek` when it is held in a device; stops when `stopped` changes.
pub fn watch(kek: Kek, kme_id: &str, mut stopped: watch::Receiver<bool>) -> KekState {
    if !kek.is_held() {
        return KekState::always();
    }
    let (tx, rx) = watch::channel(None);
    let kme = kme_id.to_owned();
    metrics::gauge!("dqkd_kek_available", "kme" => kme.clone()).set(1.0);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped.changed() => return,
            }
            let probe = kek.clone();
            let now = match tokio::task::spawn_blocking(move || probe.check()).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(format!("checking the key-encryption key failed: {e}")),
            };
            let was = tx.borrow().clone();
            match (&was, &now) {
                (None, Some(reason)) => tracing::error!(
                    %reason,
                    "the site key-encryption key is unavailable; serving no keys until it is back"
                ),
                (Some(_), None) => {
                    tracing::info!("the site key-encryption key is available again; serving keys")
                }
                _ => {}
            }
            let up = if now.is_none() { 1.0 } else { 0.0 };
            metrics::gauge!("dqkd_kek_available", "kme" => kme.clone()).set(up);
            if was != now {
                tx.send_replace(now);
            }
        }
    });
    KekState(rx)
}

/// Middleware: refuses every request but status and health calls while the KEK is
/// unavailable, so no key is handed out or accepted for storage.
pub async fn gate(State(state): State<KekState>, request: Request, next: Next) -> Response {
    if let Some(reason) = state.unavailable() {
        let path = request.uri().path();
        if !(path.ends_with("/status") || path.ends_with("/health")) {
            return ApiError::Unavailable(format!(
                "the site key-encryption key is unavailable ({reason}); no keys are served \
                 until it is back"
            ))
            .into_response();
        }
    }
    next.run(request).await
}
