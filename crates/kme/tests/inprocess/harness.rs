//! A cluster in memory: three sites whose KMEs reach each other through the `Peer` trait,
//! each with a memory store, a deterministic key source and a clock that follows tokio's
//! (paused) time. Callers reach a site through `api::router` with `oneshot`, presented the
//! way the TLS server presents them: as the identity from their certificate, in the
//! request's extensions.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use dqkd_kme::api::{peer_router, router, PeerIdentity};
use dqkd_kme::clock::TokioClock;
use dqkd_kme::peer::Peer;
use dqkd_kme::service::KeyService;
use dqkd_kme::Config;
use dqkd_pki::{Identity, Role};
use dqkd_store::MemoryStore;
use http_body_util::BodyExt as _;
use tokio::time::Instant;
use tower::ServiceExt as _;

pub use crate::memory::{Call, Fault, Faulty};
use crate::memory::{InboxSlot, MemoryPeer};
use crate::source::DetSource;

pub const CLUSTER: &str = "c1";
/// How long a site waits for its peers (`peers.timeout_ms`).
pub const TIMEOUT: Duration = Duration::from_millis(1000);
/// How long undelivered keys live (`keys.ttl_secs`).
pub const KEY_TTL: Duration = Duration::from_secs(60);
/// Unix time at which every site's clock starts.
pub const EPOCH: u64 = 1_800_000_000;

/// Site A (alice, amy), site B (bob, carol), site C (dave).
const MANIFEST: &str = r#"cluster = "c1"
[limits]
default_key_size = 256
min_key_size = 128
max_key_size = 1024
max_key_per_request = 16
max_key_count = 40
max_sae_id_count = 2
[keys]
ttl_secs = 60
[peers]
timeout_ms = 1000
[[entropy]]
id = "e1"
addr = "127.0.0.1:7"
[[entropy]]
id = "e2"
addr = "127.0.0.1:8"
[[entropy]]
id = "e3"
addr = "127.0.0.1:9"
[[sites]]
kme_id = "A"
api_addr = "127.0.0.1:1"
peer_addr = "127.0.0.1:2"
saes = ["alice", "amy"]
[[sites]]
kme_id = "B"
api_addr = "127.0.0.1:3"
peer_addr = "127.0.0.1:4"
saes = ["bob", "carol"]
[[sites]]
kme_id = "C"
api_addr = "127.0.0.1:5"
peer_addr = "127.0.0.1:6"
saes = ["dave"]
"#;

fn config(kme_id: &str, pools: Option<&str>, max_keys: Option<u32>) -> Config {
    let mut manifest = match pools {
        Some(section) => format!("{MANIFEST}[pools]\n{section}\n"),
        None => MANIFEST.to_owned(),
    };
    if let Some(max) = max_keys {
        manifest = manifest
            .replace(
                "max_key_per_request = 16",
                &format!("max_key_per_request = {max}"),
            )
            .replace(
                "max_key_count = 40",
                &format!("max_key_count = {}", 10 * max),
            );
    }
    let manifest = toml::from_str(&manifest).expect("manifest");
    let site = toml::from_str(&format!(
        r#"manifest = "cluster.toml"
kme_id = "{kme_id}"
api_listen = "127.0.0.1:0"
peer_listen = "127.0.0.1:0"
[tls]
ca = "ca.pem"
cert = "kme.pem"
key = "kme.key"
[store]
path = "store.redb"
kek = "kek"
"#
    ))
    .expect("site file");
    Config::from_parts(
        manifest,
        Path::new("cluster.toml"),
        site,
        Path::new("/etc/dqkd/site.toml"),
    )
    .expect("config")
}

/// One site: its service and store, and the fault wrappers of its peers.
pub struct Site {
    pub service: Arc<KeyService>,
    pub store: Arc<MemoryStore>,
    pub source: Arc<DetSource>,
    /// This site's view of each peer, by KME ID.
    pub peers: BTreeMap<String, Arc<Faulty>>,
}

/// Three sites wired to each other in memory.
pub struct Cluster {
    pub sites: BTreeMap<String, Site>,
    stop: tokio::sync::watch::Sender<bool>,
    /// What `restart` needs to build a site again.
    clock: Arc<TokioClock>,
    pools: Option<String>,
    max_keys: Option<u32>,
    regeneration: Duration,
    inboxes: BTreeMap<String, Arc<InboxSlot>>,
}

impl Cluster {
    /// Three sites making keys on demand.
    pub async fn new() -> Self {
        Self::build(None, None, Duration::ZERO).await
    }

    /// Three sites keeping ready-key pools as `section` (the manifest's `[pools]`) says.
    pub async fn with_pools(section: &str) -> Self {
        Self::build(Some(section), None, Duration::ZERO).await
    }

    /// Pools as `section` says, requests of up to `max_keys` keys and ten times that many
    /// waiting per pair of SAEs.
    pub async fn with_pools_and_max_keys(section: &str, max_keys: u32) -> Self {
        Self::build(Some(section), Some(max_keys), Duration::ZERO).await
    }

    /// Three sites whose every regeneration of a peer's keys takes `regeneration`.
    pub async fn with_slow_regeneration(regeneration: Duration) -> Self {
        Self::build(None, None, regeneration).await
    }

    async fn build(pools: Option<&str>, max_keys: Option<u32>, regeneration: Duration) -> Self {
        let ids = ["A", "B", "C"];
        let clock = Arc::new(TokioClock::starting_at(EPOCH));
        // Inboxes exist before the services that use them: each site's peers call into the
        // other sites' inboxes, so every inbox is reached through a late-bound slot.
        let slots: BTreeMap<&str, Arc<InboxSlot>> =
            ids.iter().map(|id| (*id, Arc::default())).collect();
        let mut sites = BTreeMap::new();
        for (n, id) in ids.iter().enumerate() {
            let config = Arc::new(config(id, pools, max_keys).with_clock(clock.clone()));
            let store = Arc::new(MemoryStore::new());
            let mut peers = BTreeMap::new();
            for other in ids.iter().filter(|o| *o != id) {
                let memory = MemoryPeer {
                    site: (*other).to_owned(),
                    caller: Identity::new(CLUSTER, Role::Kme, id).expect("identity"),
                    inbox: slots[other].clone(),
                };
                peers.insert((*other).to_owned(), Arc::new(Faulty::new(Arc::new(memory))));
            }
            let as_peers = peers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone() as Arc<dyn Peer>))
                .collect();
            let source = Arc::new(DetSource::new(n as u64 + 1, regeneration));
            let service = Arc::new(KeyService::new(
                config,
                store.clone(),
                source.clone(),
                as_peers,
            ));
            let inbox = service.inbox();
            *slots[id].0.lock().unwrap_or_else(PoisonError::into_inner) = Some(inbox.clone());
            sites.insert(
                (*id).to_owned(),
                Site {
                    service,
                    store,
                    source,
                    peers,
                },
            );
        }
        let (stop, stopped) = tokio::sync::watch::channel(false);
        for site in sites.values() {
            site.service
                .start_pools(stopped.clone())
                .await
                .expect("pools start");
        }
        Self {
            sites,
            stop,
            clock,
            pools: pools.map(str::to_owned),
            max_keys,
            regeneration,
            inboxes: slots
                .into_iter()
                .map(|(id, slot)| (id.to_owned(), slot))
                .collect(),
        }
    }

    /// Starts site `id` again over its store, as a process started after the last one was
    /// killed: it recovers its in-flight records and reads its pools back, and from now on
    /// callers and peers reach it instead (the old one's tasks run on, unreached).
    pub async fn restart(&mut self, id: &str) {
        let config =
            config(id, self.pools.as_deref(), self.max_keys).with_clock(self.clock.clone());
        let site = &self.sites[id];
        let peers = site
            .peers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone() as Arc<dyn Peer>))
            .collect();
        // Another numbering than the first process's, as a new process's random IDs would be.
        let source = Arc::new(DetSource::new(
            0x100 + id.as_bytes()[0] as u64,
            self.regeneration,
        ));
        let service = Arc::new(KeyService::new(
            Arc::new(config),
            site.store.clone(),
            source,
            peers,
        ));
        *self.inboxes[id]
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(service.inbox());
        service
            .start_pools(self.stop.subscribe())
            .await
            .expect("pools start");
        if let Some(site) = self.sites.get_mut(id) {
            site.service = service;
        }
    }

    pub fn site(&self, id: &str) -> &Site {
        &self.sites[id]
    }

    /// The fault wrapper site `from` calls site `to` through.
    pub fn link(&self, from: &str, to: &str) -> &Faulty {
        &self.sites[from].peers[to]
    }

    /// Sends one request to `site`'s ETSI router as SAE `sae`.
    pub async fn call(
        &self,
        site: &str,
        sae: &str,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> Answer {
        let identity = Identity::new(CLUSTER, Role::Sae, sae).expect("sae identity");
        self.call_as(site, Some(identity), method, path, body).await
    }

    /// Sends one request as whoever `identity` names (or nobody).
    pub async fn call_as(
        &self,
        site: &str,
        identity: Option<Identity>,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> Answer {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .body(match body {
                Some(b) => Body::from(b.to_owned()),
                None => Body::empty(),
            })
            .expect("request");
        request
            .extensions_mut()
            .insert(PeerIdentity(identity.map(Arc::new)));
        let response = router(self.sites[site].service.clone())
            .oneshot(request)
            .await
            .expect("infallible");
        answer(response).await
    }

    /// POSTs `body` to `site`'s peer router as the KME of site `from`.
    pub async fn peer_post(&self, site: &str, from: &str, path: &str, body: &str) -> Answer {
        let identity = Identity::new(CLUSTER, Role::Kme, from).expect("kme identity");
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .expect("request");
        request
            .extensions_mut()
            .insert(PeerIdentity(Some(Arc::new(identity))));
        let response = peer_router(self.sites[site].service.inbox())
            .oneshot(request)
            .await
            .expect("infallible");
        answer(response).await
    }

    /// `enc_keys` by POST; the answer.
    pub async fn enc(&self, site: &str, master: &str, slave: &str, body: &str) -> Answer {
        let path = format!("/api/v1/keys/{slave}/enc_keys");
        self.call(site, master, Method::POST, &path, Some(body))
            .await
    }

    /// `dec_keys` by POST for `ids`; the answer.
    pub async fn dec(&self, site: &str, slave: &str, master: &str, ids: &[String]) -> Answer {
        let list: Vec<_> = ids
            .iter()
            .map(|id| serde_json::json!({ "key_ID": id }))
            .collect();
        let body = serde_json::json!({ "key_IDs": list }).to_string();
        let path = format!("/api/v1/keys/{master}/dec_keys");
        self.call(site, slave, Method::POST, &path, Some(&body))
            .await
    }
}

async fn answer(response: axum::response::Response) -> Answer {
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Answer {
        status,
        body: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    }
}

/// An HTTP answer with its JSON body (`Null` when it had none).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: serde_json::Value,
}

impl Answer {
    /// The `(key_ID, key)` pairs of a key container.
    pub fn keys(&self) -> Vec<(String, String)> {
        assert_eq!(self.status, StatusCode::OK, "{:?}", self.body);
        self.body["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| {
                (
                    k["key_ID"].as_str().expect("key_ID").to_owned(),
                    k["key"].as_str().expect("key").to_owned(),
                )
            })
            .collect()
    }

    /// The key IDs of a key container.
    pub fn ids(&self) -> Vec<String> {
        self.keys().into_iter().map(|(id, _)| id).collect()
    }

    /// The Error body's message.
    pub fn message(&self) -> &str {
        self.body["message"].as_str().unwrap_or("")
    }
}

/// Waits on tokio's (paused) clock until `done` holds, for at most `limit` of virtual
/// time; panics naming `what` if it never does.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let give_up = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < give_up, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
