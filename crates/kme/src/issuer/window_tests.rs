//! The window on a paused clock: two sites 40 ms apart (a peer that acknowledges after a
//! round trip), a key source that answers at once or after an entropy round trip.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use dqkd_store::MemoryStore;
use tokio::time::{sleep, Duration};

use super::*;
use crate::keysource::{Batch, OsRandom};
use crate::peer::{BindAck, DeliverAck, DestroyAck, FillAck, PeerHealth};

const RTT: Duration = Duration::from_millis(80);
const TIMEOUT: Duration = Duration::from_millis(5000);

fn config(max_in_flight_keys: u32) -> Arc<Config> {
    let manifest = toml::from_str(&format!(
        r#"cluster = "c1"
[peers]
timeout_ms = 5000
max_in_flight_keys = {max_in_flight_keys}
[[sites]]
kme_id = "A"
api_addr = "127.0.0.1:1"
peer_addr = "127.0.0.1:2"
saes = ["alice"]
[[sites]]
kme_id = "B"
api_addr = "127.0.0.1:3"
peer_addr = "127.0.0.1:4"
saes = ["bob"]
"#
    ))
    .expect("manifest");
    let site = toml::from_str(
        r#"manifest = "cluster.toml"
kme_id = "A"
api_listen = "127.0.0.1:0"
peer_listen = "127.0.0.1:0"
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

/// Keys from the OS RNG, with stand-in regeneration metadata so that they may cross sites
/// (the peer here regenerates nothing).
struct Instant0;

#[async_trait::async_trait]
impl KeySource for Instant0 {
    async fn generate(
        &self,
        count: usize,
        len: usize,
        _: &[String],
    ) -> Result<Batch, KeySourceError> {
        let mut batch = OsRandom::default().generate(count, len, &[]).await?;
        batch.metadata = Some(vec![0]);
        Ok(batch)
    }

    async fn regenerate(&self, _: &[u8]) -> Result<Issued, KeySourceError> {
        Err(KeySourceError::Unavailable("not in this test".into()))
    }
}

/// A key source whose entropy servers are a round trip away: counts the generations under
/// way at once.
#[derive(Default)]
struct FarEntropy {
    generating: AtomicUsize,
    most_generating: AtomicUsize,
}

#[async_trait::async_trait]
impl KeySource for FarEntropy {
    async fn generate(
        &self,
        count: usize,
        len: usize,
        readers: &[String],
    ) -> Result<Batch, KeySourceError> {
        let now = self.generating.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_generating.fetch_max(now, Ordering::SeqCst);
        sleep(RTT).await;
        self.generating.fetch_sub(1, Ordering::SeqCst);
        Instant0.generate(count, len, readers).await
    }

    async fn regenerate(&self, _: &[u8]) -> Result<Issued, KeySourceError> {
        Err(KeySourceError::Unavailable("not in this test".into()))
    }
}

/// A key source on a busy machine: each generation takes a few milliseconds of local work.
struct Busy;

/// How long [`Busy`] takes per generation: short of a far entropy server's round trip.
const BUSY: Duration = Duration::from_millis(3);

#[async_trait::async_trait]
impl KeySource for Busy {
    async fn generate(
        &self,
        count: usize,
        len: usize,
        readers: &[String],
    ) -> Result<Batch, KeySourceError> {
        sleep(BUSY).await;
        Instant0.generate(count, len, readers).await
    }

    async fn regenerate(&self, _: &[u8]) -> Result<Issued, KeySourceError> {
        Err(KeySourceError::Unavailable("not in this test".into()))
    }
}

/// Site B, one round trip away: stores every delivery, counting what is in flight at once.
#[derive(Default)]
struct Far {
    sent: AtomicUsize,
    messages: AtomicUsize,
    keys: AtomicUsize,
    most_messages: AtomicUsize,
    most_keys: AtomicUsize,
}

impl Far {
    fn refuse<T>(&self) -> Result<T, PeerError> {
        Err(PeerError::Unreachable {
            site: "B".into(),
            reason: "not in this test".into(),
        })
    }
}

#[async_trait::async_trait]
impl Peer for Far {
    fn site(&self) -> &str {
        "B"
    }

    async fn deliver(
        &self,
        request: &DeliverRequest,
        _: tokio::time::Instant,
    ) -> Result<DeliverAck, PeerError> {
        let keys: usize = request.grants.iter().map(|g| g.key_ids.len()).sum();
        self.sent.fetch_add(1, Ordering::SeqCst);
        let messages = self.messages.fetch_add(1, Ordering::SeqCst) + 1;
        let in_flight = self.keys.fetch_add(keys, Ordering::SeqCst) + keys;
        self.most_messages.fetch_max(messages, Ordering::SeqCst);
        self.most_keys.fetch_max(in_flight, Ordering::SeqCst);
        sleep(RTT).await;
        self.messages.fetch_sub(1, Ordering::SeqCst);
        self.keys.fetch_sub(keys, Ordering::SeqCst);
        Ok(DeliverAck {
            request_id: request.request_id,
            stored: keys,
        })
    }

    async fn fill(&self, _: &FillRequest) -> Result<FillAck, PeerError> {
        self.refuse()
    }

    async fn bind(&self, _: &BindRequest, _: tokio::time::Instant) -> Result<BindAck, PeerError> {
        self.refuse()
    }

    async fn destroy(&self, _: &DestroyRequest) -> Result<DestroyAck, PeerError> {
        self.refuse()
    }

    async fn reconcile(
        &self,
        _: &crate::peer::ReconcileRequest,
    ) -> Result<crate::peer::ReconcileAck, PeerError> {
        self.refuse()
    }

    async fn health(&self) -> Result<PeerHealth, PeerError> {
        self.refuse()
    }
}

fn order() -> Order {
    Order {
        master: "alice".parse().expect("name"),
        local: Vec::new(),
        remote: BTreeMap::from([(
            "B".parse().expect("name"),
            vec!["bob".parse().expect("name")],
        )]),
        count: 1,
        len: 32,
    }
}

/// `n` single-key requests, one every millisecond; how long each waited for its keys.
async fn requests(issuer: &Arc<Issuer>, n: usize) -> Vec<Duration> {
    let mut calls = Vec::new();
    for _ in 0..n {
        let issuer = issuer.clone();
        calls.push(tokio::spawn(async move {
            let arrived = Deadline::now();
            let keys = issuer
                .issue(order(), arrived + TIMEOUT)
                .await
                .expect("keys");
            assert_eq!(keys.len(), 1);
            arrived.elapsed()
        }));
        sleep(Duration::from_millis(1)).await;
    }
    let mut waited = Vec::new();
    for call in calls {
        waited.push(call.await.expect("request task"));
    }
    waited
}

/// Requests one after the other, until the issuer has seen enough acknowledgements to know
/// the round trip.
async fn learn(issuer: &Arc<Issuer>) {
    for _ in 0..16 {
        requests(issuer, 1).await;
    }
}

fn issuer(max_in_flight_keys: u32) -> (Arc<Issuer>, Arc<Far>) {
    issuer_over(max_in_flight_keys, Arc::new(Instant0))
}

fn issuer_over(max_in_flight_keys: u32, source: Arc<dyn KeySource>) -> (Arc<Issuer>, Arc<Far>) {
    let far = Arc::new(Far::default());
    let peers: BTreeMap<String, Arc<dyn Peer>> =
        BTreeMap::from([("B".to_owned(), far.clone() as _)]);
    let issuer = Issuer::new(
        config(max_in_flight_keys),
        Arc::new(MemoryStore::new()),
        source,
        peers,
    );
    (Arc::new(issuer), far)
}

/// Once the link is known to be far, a request does not wait for an earlier batch's
/// acknowledgement: each is answered one round trip after it arrived, with more messages
/// in flight than there are stage slots.
#[tokio::test(start_paused = true)]
async fn a_far_link_keeps_a_round_trip_of_messages_in_flight() {
    let (issuer, far) = issuer(65536);
    learn(&issuer).await;
    let waited = requests(&issuer, 64).await;
    let slowest = waited.iter().max().copied().unwrap_or_default();
    assert!(slowest < RTT + RTT / 4, "a request waited {slowest:?}");
    assert!(
        far.most_messages.load(Ordering::SeqCst) > 4 * MAX_IN_FLIGHT,
        "at most {} messages in flight",
        far.most_messages.load(Ordering::SeqCst)
    );
}

/// On a far link batches form one at a time: requests arriving while one batch does its
/// local work (here 3 ms for one a millisecond) share the next message instead of each
/// taking a stage slot and a message of its own, so a busy far link sends fewer, larger
/// messages, and each request still waits about one round trip.
#[tokio::test(start_paused = true)]
async fn a_far_link_under_load_sends_fewer_larger_messages() {
    let (issuer, far) = issuer_over(65536, Arc::new(Busy));
    learn(&issuer).await;
    let before = far.sent.load(Ordering::SeqCst);
    let waited = requests(&issuer, 60).await;
    let sent = far.sent.load(Ordering::SeqCst) - before;
    assert!(
        sent <= 25,
        "60 requests, one a millisecond, took {sent} messages"
    );
    let slowest = waited.iter().max().copied().unwrap_or_default();
    assert!(slowest < RTT + 4 * BUSY, "a request waited {slowest:?}");
}

/// `[peers] max_in_flight_keys` bounds the keys under way toward the peer, round trip or not.
#[tokio::test(start_paused = true)]
async fn the_keys_in_flight_stay_under_the_ceiling() {
    let (issuer, far) = issuer(8);
    learn(&issuer).await;
    requests(&issuer, 64).await;
    let most = far.most_keys.load(Ordering::SeqCst);
    assert!(most <= 8 && most > 4, "{most} keys in flight at once");
}

/// With entropy servers a round trip away too, a batch waiting for its allocations does not
/// hold a stage slot: many batches' allocations are under way at once, and each request
/// waits one entropy round trip and one peer round trip, not a round trip per four batches.
#[tokio::test(start_paused = true)]
async fn far_entropy_keeps_allocations_of_many_batches_in_flight() {
    let source = Arc::new(FarEntropy::default());
    let (issuer, far) = issuer_over(65536, source.clone());
    learn(&issuer).await;
    let waited = requests(&issuer, 64).await;
    let most = source.most_generating.load(Ordering::SeqCst);
    assert!(
        most > 4 * MAX_IN_FLIGHT,
        "at most {most} generations under way at once"
    );
    let slowest = waited.iter().max().copied().unwrap_or_default();
    assert!(slowest < 2 * RTT + RTT / 4, "a request waited {slowest:?}");
    assert!(far.most_messages.load(Ordering::SeqCst) > 4 * MAX_IN_FLIGHT);
}

/// Generation is learnt like acknowledgements: near until enough generations were timed,
/// far once the shortest recent one is long, near again as soon as a short one is seen.
#[tokio::test(start_paused = true)]
async fn entropy_counts_as_far_only_after_enough_long_generations() {
    let window = Window::new(64);
    for _ in 1..16 {
        window.generated(Duration::from_millis(80));
    }
    assert!(!window.entropy_bound(), "far after 15 generations");
    window.generated(Duration::from_millis(80));
    assert!(window.entropy_bound(), "near after 16 long generations");
    assert!(
        !window.network_bound(),
        "generation taught the peer's round trip"
    );
    window.generated(Duration::from_millis(1));
    assert!(!window.entropy_bound(), "far after a short generation");
}
