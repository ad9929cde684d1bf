//! The site at a glance, on the metrics listener: `GET /status` (a plain HTML page that
//! refreshes itself) and `GET /status.json` (the same figures, for `dqkd status` and
//! scripts). Aggregates only: counts, levels, health, dates and round trips, never a key or
//! a key ID. The listener is plain HTTP with no client certificate, so it belongs on
//! loopback or an operators' network, like `/metrics`.
//!
//! Figures the KME already counts (pool levels and fills, requests, handshakes) are read
//! back from its own Prometheus registry; peers and entropy servers are asked directly
//! (their health calls, over the same pinned mutual TLS as real traffic), so the page shows
//! whether they answer now.

mod page;
mod prom;
mod recent;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use dqkd_net::{CertificateExpiry, OutgoingTls, PinnedClient};
use dqkd_pki::{Identity, Role};
use dqkd_store::KeyStore;
use futures_util::future::join_all;
use http_body_util::Full;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use recent::{recent, RecentError, RecentErrors};

use crate::config::Config;

/// Longest wait for one peer's or entropy server's health answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A snapshot younger than this is served again: a page left open in many browsers must
/// not multiply the probes.
const REUSE: Duration = Duration::from_secs(1);
/// How often pool fills are sampled, and over how long the refill rate is taken.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Everything the status page shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The cluster's name.
    pub cluster: String,
    /// This site.
    pub kme_id: String,
    /// When the snapshot was taken (Unix seconds).
    pub generated_at: u64,
    /// Seconds since this KME started.
    pub uptime_secs: u64,
    /// Every site of the manifest.
    pub sites: Vec<SiteRow>,
    /// The other sites, as this one reaches them now.
    pub peers: Vec<PeerRow>,
    /// Key exchange groups negotiated by this site's listeners.
    pub tls: Vec<TlsRow>,
    /// Ready-key pools, one per peer site.
    pub pools: Vec<PoolRow>,
    /// Entropy servers, as this site reaches them now.
    pub entropy: Vec<EntropyRow>,
    /// Keys this site holds.
    pub keys: KeysHeld,
    /// Certificates this KME holds and when they end.
    pub certificates: Vec<CertificateRow>,
    /// Requests served since start.
    pub requests: Requests,
    /// The last warnings and errors of this process, newest first.
    pub recent_errors: Vec<RecentError>,
}

/// A site of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRow {
    /// KME ID.
    pub kme_id: String,
    /// ETSI API address.
    pub api_addr: String,
    /// Peer API address.
    pub peer_addr: Option<String>,
    /// Number of SAEs.
    pub saes: usize,
    /// Whether it is the site serving this page.
    pub this_site: bool,
}

/// A peer site's reachability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerRow {
    /// KME ID.
    pub kme_id: String,
    /// Whether its peer API answered its health call.
    pub reachable: bool,
    /// How long that took, milliseconds.
    pub round_trip_ms: Option<f64>,
    /// Why it did not answer.
    pub error: Option<String>,
}

/// Handshakes of one listener by negotiated group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsRow {
    /// `etsi` (SAEs) or `peer` (other sites).
    pub listener: String,
    /// The key exchange group, e.g. `X25519MLKEM768`.
    pub group: String,
    /// Handshakes since start.
    pub handshakes: u64,
}

/// A ready-key pool toward one peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolRow {
    /// The peer site.
    pub peer: String,
    /// Ready keys now.
    pub ready: u64,
    /// What the pool is filled up to.
    pub target: u64,
    /// Keys added per second over the last minute (none until two samples exist).
    pub refill_per_sec: Option<f64>,
}

/// An entropy server's health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntropyRow {
    /// Server ID.
    pub id: String,
    /// Whether it answered and reports its source healthy.
    pub healthy: bool,
    /// How long its health call took, milliseconds.
    pub round_trip_ms: Option<f64>,
    /// Why it is not healthy.
    pub error: Option<String>,
}

/// Keys this site holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KeysHeld {
    /// Keys waiting for this site's SAEs to fetch them (dec_keys).
    pub waiting: u64,
    /// Keys ready in the pools toward peers.
    pub ready: u64,
}

/// A certificate (or the revocation list) this KME holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertificateRow {
    /// `own`, `ca` or `crl_next_update`.
    pub certificate: String,
    /// Its file.
    pub path: String,
    /// When it ends (Unix seconds); none if unreadable.
    pub expires_at: Option<u64>,
    /// Days left, negative once passed.
    pub days_left: Option<f64>,
}

/// Requests served since start, by outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Requests {
    /// All requests on the ETSI and peer APIs.
    pub total: u64,
    /// Answered 4xx.
    pub client_errors: u64,
    /// Answered 5xx.
    pub server_errors: u64,
}

/// What the status page reads from, made once per KME.
pub struct Board {
    config: Arc<Config>,
    store: Arc<dyn KeyStore>,
    expiry: CertificateExpiry,
    peers: Vec<(String, String, PinnedClient)>,
    entropy: Vec<(String, dqkd_entropy::client::EntropyClient)>,
    started: Instant,
    fills: Mutex<VecDeque<(Instant, BTreeMap<String, f64>)>>,
    cached: tokio::sync::Mutex<Option<(Instant, Arc<Snapshot>)>>,
}

impl Board {
    /// Clients of its own for the health calls, pinned like the KME's.
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn KeyStore>,
        outgoing: &Arc<OutgoingTls>,
        expiry: CertificateExpiry,
    ) -> Result<Self, String> {
        let pinned = |role: Role, id: &str| {
            let expected = Identity::new(&config.cluster, role, id).map_err(|e| e.to_string())?;
            outgoing
                .client(expected, dqkd_net::Versions::Http1, Some(PROBE_TIMEOUT))
                .map_err(|e| e.to_string())
        };
        let mut peers = Vec::new();
        for site in config.sites.values() {
            if let (Some(addr), false) = (&site.peer_addr, site.kme_id == config.kme_id) {
                peers.push((
                    site.kme_id.to_string(),
                    addr.clone(),
                    pinned(Role::Kme, &site.kme_id)?,
                ));
            }
        }
        let mut entropy = Vec::new();
        for server in &config.entropy {
            let client = dqkd_entropy::client::EntropyClient::new(
                &format!("https://{}", server.addr),
                &server.id,
                pinned(Role::Entropy, &server.id)?,
            )
            .map_err(|e| e.to_string())?
            .with_timeout(PROBE_TIMEOUT);
            entropy.push((server.id.to_string(), client));
        }
        Ok(Self {
            config,
            store,
            expiry,
            peers,
            entropy,
            started: Instant::now(),
            fills: Mutex::new(VecDeque::new()),
            cached: tokio::sync::Mutex::new(None),
        })
    }

    /// The figures now (or from the last second).
    pub async fn snapshot(&self) -> Arc<Snapshot> {
        let mut cached = self.cached.lock().await;
        if let Some((at, snapshot)) = cached.as_ref() {
            if at.elapsed() < REUSE {
                return snapshot.clone();
            }
        }
        let snapshot = Arc::new(self.take().await);
        *cached = Some((Instant::now(), snapshot.clone()));
        snapshot
    }

    /// Samples the pools' fill counters until `stopped` changes, for the refill rate.
    pub async fn sample(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let filled = self.filled(&crate::telemetry::handle().render());
                    let mut fills = self.fills.lock().unwrap_or_else(|e| e.into_inner());
                    fills.push_back((Instant::now(), filled));
                    while fills.front().is_some_and(|(at, _)| at.elapsed() > RATE_WINDOW) {
                        fills.pop_front();
                    }
                }
                _ = stopped.changed() => return,
            }
        }
    }

    async fn take(&self) -> Snapshot {
        let config = &self.config;
        let text = crate::telemetry::handle().render();
        let (peers, entropy) = tokio::join!(
            join_all(
                self.peers
                    .iter()
                    .map(|(id, addr, http)| probe_peer(id, addr, http))
            ),
            join_all(
                self.entropy
                    .iter()
                    .map(|(id, client)| probe_entropy(id, client))
            ),
        );
        let pools = self.pools(&text);
        let slaves = config
            .sites
            .get(&config.kme_id)
            .map(|site| site.saes.iter().collect::<Vec<_>>())
            .unwrap_or_default();
        let waiting = config
            .sae_site
            .keys()
            .flat_map(|master| slaves.iter().map(move |slave| (master, *slave)))
            .map(|(master, slave)| self.store.pending(master, slave))
            .sum();
        let now = SystemTime::now();
        Snapshot {
            cluster: config.cluster.to_string(),
            kme_id: config.kme_id.to_string(),
            generated_at: unix_now(),
            uptime_secs: self.started.elapsed().as_secs(),
            sites: config
                .sites
                .values()
                .map(|site| SiteRow {
                    kme_id: site.kme_id.to_string(),
                    api_addr: site.api_addr.clone(),
                    peer_addr: site.peer_addr.clone(),
                    saes: site.saes.len(),
                    this_site: site.kme_id == config.kme_id,
                })
                .collect(),
            peers,
            tls: self.tls(&text),
            keys: KeysHeld {
                waiting,
                ready: pools.iter().map(|p| p.ready).sum(),
            },
            pools,
            entropy,
            certificates: self
                .expiry
                .held()
                .into_iter()
                .map(|held| CertificateRow {
                    certificate: held.certificate.to_owned(),
                    path: held.path.display().to_string(),
                    expires_at: held
                        .expires_at
                        .map(|at| at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())),
                    days_left: held
                        .expires_at
                        .map(|at| dqkd_pki::seconds_left(at, now) as f64 / 86_400.0),
                })
                .collect(),
            requests: self.requests(&text),
            recent_errors: recent(),
        }
    }

    /// This site's samples of the named metrics.
    fn own(&self, text: &str, names: &[&str]) -> Vec<prom::Sample> {
        prom::samples(text, names)
            .into_iter()
            .filter(|s| s.label("kme") == self.config.kme_id)
            .collect()
    }

    fn filled(&self, text: &str) -> BTreeMap<String, f64> {
        let mut filled = BTreeMap::new();
        for s in self.own(text, &["dqkd_pool_filled_keys_total"]) {
            *filled.entry(s.label("peer").to_owned()).or_default() += s.value;
        }
        filled
    }

    fn pools(&self, text: &str) -> Vec<PoolRow> {
        let now = (Instant::now(), self.filled(text));
        let oldest = {
            let fills = self.fills.lock().unwrap_or_else(|e| e.into_inner());
            fills.front().cloned()
        };
        let rate = |peer: &str| {
            let (then, before) = oldest.as_ref()?;
            let seconds = now.0.duration_since(*then).as_secs_f64();
            (seconds >= 1.0).then(|| {
                let delta = now.1.get(peer).copied().unwrap_or(0.0)
                    - before.get(peer).copied().unwrap_or(0.0);
                delta.max(0.0) / seconds
            })
        };
        self.own(text, &["dqkd_pool_keys"])
            .into_iter()
            .map(|s| PoolRow {
                peer: s.label("peer").to_owned(),
                ready: s.value.max(0.0) as u64,
                target: self.config.pools.target,
                refill_per_sec: rate(s.label("peer")),
            })
            .collect()
    }

    fn tls(&self, text: &str) -> Vec<TlsRow> {
        let mut rows = BTreeMap::<(String, String), u64>::new();
        for s in self.own(text, &["dqkd_tls_handshakes_total"]) {
            *rows
                .entry((s.label("listener").to_owned(), s.label("group").to_owned()))
                .or_default() += s.value as u64;
        }
        rows.into_iter()
            .map(|((listener, group), handshakes)| TlsRow {
                listener,
                group,
                handshakes,
            })
            .collect()
    }

    fn requests(&self, text: &str) -> Requests {
        let mut requests = Requests::default();
        for s in self.own(text, &["dqkd_requests_total"]) {
            let n = s.value as u64;
            requests.total += n;
            match s.label("code").as_bytes().first() {
                Some(b'4') => requests.client_errors += n,
                Some(b'5') => requests.server_errors += n,
                _ => {}
            }
        }
        requests
    }
}

async fn probe_peer(id: &str, addr: &str, http: &PinnedClient) -> PeerRow {
    let started = Instant::now();
    let call = async {
        let request = http::Request::get(format!("https://{addr}/peer/v1/health"))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let response = http
            .request(request)
            .await
            .map_err(|e| dqkd_net::error_chain(&e))?;
        match response.status() {
            http::StatusCode::OK => Ok(()),
            status => Err(format!("answered {status}")),
        }
    };
    let result = match tokio::time::timeout(PROBE_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    };
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    PeerRow {
        kme_id: id.to_owned(),
        reachable: result.is_ok(),
        round_trip_ms: result.is_ok().then_some(elapsed),
        error: result.err().map(|e| recent::scrub(&e)),
    }
}

async fn probe_entropy(id: &str, client: &dqkd_entropy::client::EntropyClient) -> EntropyRow {
    let started = Instant::now();
    let result = client.health_report().await;
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    let (healthy, error) = match result {
        Ok(health) if health.status == "ok" => (true, None),
        Ok(health) => (
            false,
            Some(
                health
                    .entropy_failure
                    .unwrap_or_else(|| format!("status {}", health.status)),
            ),
        ),
        Err(e) => (false, Some(e.to_string())),
    };
    EntropyRow {
        id: id.to_owned(),
        healthy,
        round_trip_ms: healthy.then_some(elapsed),
        error: error.map(|e| recent::scrub(&e)),
    }
}

/// `GET /status` and `GET /status.json`, for the metrics listener.
pub fn router(board: Arc<Board>) -> Router {
    Router::new()
        .route("/status", get(html))
        .route("/status.json", get(json))
        .with_state(board)
}

async fn html(State(board): State<Arc<Board>>) -> Response {
    let snapshot = board.snapshot().await;
    with_type(page::render(&snapshot), "text/html; charset=utf-8")
}

async fn json(State(board): State<Arc<Board>>) -> Response {
    let snapshot = board.snapshot().await;
    let body = serde_json::to_string(&*snapshot).unwrap_or_else(|_| "{}".to_owned());
    with_type(body, "application/json")
}

fn with_type(body: String, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
