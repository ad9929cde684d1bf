//! The deadline logic on a paused clock: a same-site cluster, a key source that stalls.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use dqkd_store::MemoryStore;
use tokio::time::{sleep, Duration};

use super::*;
use crate::keysource::{Batch, OsRandom};

const TIMEOUT: Duration = Duration::from_millis(1000);

fn config() -> Arc<Config> {
    let manifest = toml::from_str(
        r#"cluster = "c1"
[peers]
timeout_ms = 1000
[[sites]]
kme_id = "A"
api_addr = "127.0.0.1:1"
saes = ["alice", "bob"]
"#,
    )
    .expect("manifest");
    let site = toml::from_str(
        r#"manifest = "cluster.toml"
kme_id = "A"
api_listen = "127.0.0.1:0"
[tls]
ca = "ca.pem"
cert = "kme.pem"
key = "kme.key"
[store]
path = "store.redb"
kek = "kek"
"#,
    )
    .expect("site file");
    let config = Config::from_parts(
        manifest,
        Path::new("cluster.toml"),
        site,
        Path::new("/etc/dqkd/site.toml"),
    )
    .expect("config");
    Arc::new(config)
}

/// Makes keys with the OS RNG after `delay`, counting the batches it was asked for.
struct Stalling {
    delay: Duration,
    batches: AtomicUsize,
}

#[async_trait::async_trait]
impl KeySource for Stalling {
    async fn generate(
        &self,
        count: usize,
        len: usize,
        readers: &[String],
    ) -> Result<Batch, KeySourceError> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        sleep(self.delay).await;
        OsRandom::default().generate(count, len, readers).await
    }

    async fn regenerate(&self, _: &[u8]) -> Result<Issued, KeySourceError> {
        Err(KeySourceError::Unavailable("not in this test".into()))
    }
}

fn issuer(delay: Duration) -> (Issuer, Arc<Stalling>, Arc<MemoryStore>) {
    let source = Arc::new(Stalling {
        delay,
        batches: AtomicUsize::new(0),
    });
    let store = Arc::new(MemoryStore::new());
    let issuer = Issuer::new(config(), store.clone(), source.clone(), BTreeMap::new());
    (issuer, source, store)
}

fn order() -> Order {
    Order {
        master: "alice".parse().expect("name"),
        local: vec!["bob".parse().expect("name")],
        remote: BTreeMap::new(),
        count: 1,
        len: 32,
    }
}

/// Requests arriving 10 ms apart while every batch stalls: the first four fill the batch
/// slots, the later ones queue. Each is answered 503 exactly at its own deadline, not after
/// a slot frees and then a wait of its own.
#[tokio::test(start_paused = true)]
async fn every_request_is_answered_at_its_own_deadline() {
    let (issuer, source, _) = issuer(Duration::from_secs(3600));
    let issuer = Arc::new(issuer);
    let mut requests = Vec::new();
    for _ in 0..16 {
        let issuer = issuer.clone();
        requests.push(tokio::spawn(async move {
            let arrived = Deadline::now();
            let result = issuer.issue(order(), arrived + TIMEOUT).await;
            (result, arrived.elapsed())
        }));
        sleep(Duration::from_millis(10)).await;
    }
    for request in requests {
        let (result, waited) = request.await.expect("request task");
        let message = result.expect_err("no keys").to_string();
        assert!(
            message.contains("deadline") && message.contains("\"A\""),
            "{message}"
        );
        assert_eq!(waited, TIMEOUT);
    }
    // The first batch gives up at its deadline; its slot then takes the twelve queued
    // requests, which still have time left, as one batch.
    assert_eq!(source.batches.load(Ordering::SeqCst), MAX_IN_FLIGHT + 1);
}

/// A batch that finishes after its requests' deadline hands nobody the keys: they are
/// destroyed, so the slave can never fetch them.
#[tokio::test(start_paused = true)]
async fn keys_finished_after_the_deadline_are_destroyed() {
    let (issuer, source, store) = issuer(TIMEOUT + Duration::from_millis(500));
    let result = issuer.issue(order(), Deadline::now() + TIMEOUT).await;
    assert!(
        matches!(result, Err(IssueError::Unavailable(_))),
        "{result:?}"
    );
    sleep(Duration::from_secs(1)).await;
    assert_eq!(source.batches.load(Ordering::SeqCst), 1);
    assert_eq!(store.pending("alice", "bob"), 0);
}

/// A request in time gets its keys, stored for the slave.
#[tokio::test(start_paused = true)]
async fn a_request_in_time_gets_its_keys() {
    let (issuer, _, store) = issuer(TIMEOUT / 2);
    let keys = issuer
        .issue(order(), Deadline::now() + TIMEOUT)
        .await
        .expect("keys");
    assert_eq!(keys.len(), 1);
    assert_eq!(store.pending("alice", "bob"), 1);
}

/// A same-site request needs no in-flight record: none is written.
#[tokio::test(start_paused = true)]
async fn a_same_site_request_records_nothing_in_flight() {
    let (issuer, _, store) = issuer(Duration::ZERO);
    issuer
        .issue(order(), Deadline::now() + TIMEOUT)
        .await
        .expect("keys");
    assert!(store.in_flight("").await.expect("records").is_empty());
}

/// At start, a request left in flight by the previous run is withdrawn: this site's copies go
/// at once, and the record once every peer is done (here there is none to call).
#[tokio::test(start_paused = true)]
async fn requests_left_in_flight_are_withdrawn_at_start() {
    let (issuer, _, store) = issuer(Duration::ZERO);
    let left = NewKey {
        id: Uuid::new_v4(),
        master: "alice".into(),
        slaves: vec!["bob".into()],
        material: KeyMaterial::new(vec![1; 32]),
        expires_at: u64::MAX,
    };
    store.insert(vec![left.clone()]).await.expect("insert");
    let record = |owner: &str| InFlight {
        request_id: Uuid::new_v4(),
        owner: owner.into(),
        sites: vec!["B".into()],
        key_ids: vec![left.id],
        ready: vec![],
    };
    let (mine, sibling) = (record(""), record("r2"));
    store.record_in_flight(mine).await.expect("record");
    store
        .record_in_flight(sibling.clone())
        .await
        .expect("record");
    let (_stop, stopped) = watch::channel(false);
    issuer.start_pools(stopped).await.expect("start");
    assert_eq!(
        store.pending("alice", "bob"),
        0,
        "this site's copy is shredded"
    );
    sleep(Duration::from_millis(10)).await;
    assert!(store.in_flight("").await.expect("records").is_empty());
    assert_eq!(
        store.in_flight("r2").await.expect("records"),
        vec![sibling],
        "another process's records are not touched"
    );
}
