//! One deadline per enc_keys request: whatever stalls — a frozen or refusing peer site,
//! requests queued behind stuck batches, frozen entropy servers, a pool miss that leads to
//! keys made on demand — the SAE is answered within `peers.timeout_ms` of its request's
//! arrival (plus a margin for the trip), and the site serves normally once the stall ends.
//!
//! Stalls come from a `FreezingProxy` between the sites (or in front of entropy servers):
//! real processes, real mutual TLS with certificates from `dqkd pki`, loopback only. The time
//! bounds are correctness limits, not benchmarks.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{status_of, wait_level, withdrawn_key_ids, Cluster};
use dqkd_client::{Client, ClientError, KeyRequestBody};
use dqkd_etsi014::KeyContainer;
use http::StatusCode;

/// `peers.timeout_ms` of every cluster here.
const TIMEOUT_MS: u64 = 1000;

/// Every enc_keys must be answered within this of its own start.
const BOUND: Duration = Duration::from_millis(TIMEOUT_MS + 500);

const POOLS: &str = "[pools]\ntarget = 2000\nlow_water = 1000\nbatch = 500\n";

/// Asks for one key for Bob and measures how long the answer took.
async fn timed_enc_keys(alice: &Client) -> (Result<KeyContainer, ClientError>, Duration) {
    let started = Instant::now();
    let result = alice
        .enc_keys(
            "bob",
            &KeyRequestBody {
                number: Some(1),
                ..Default::default()
            },
        )
        .await;
    (result, started.elapsed())
}

/// The answer is a 503 within [`BOUND`] whose message names `culprit` and says the
/// request's deadline passed.
fn assert_deadline_503(
    (result, took): (Result<KeyContainer, ClientError>, Duration),
    culprit: &str,
    what: &str,
) {
    let (status, message) = status_of(result);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{what}: {message}");
    assert!(
        message.contains(culprit) && message.contains("deadline"),
        "{what}: {message}"
    );
    assert!(took < BOUND, "{what} answered after {took:?}: {message}");
}

/// After a stall: a key flows A→B and Bob gets it, and none of the keys A withdrew is
/// fetchable at B.
async fn serves_again_and_withdrawn_keys_stay_gone(cluster: &Cluster) {
    cluster.share_through("KME_A", 1).await;
    let ids = withdrawn_key_ids(&cluster.sites["KME_A"].log_text());
    if !ids.is_empty() {
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let (status, _) = status_of(cluster.client("bob").dec_keys("alice", &refs).await);
        assert_eq!(status, StatusCode::BAD_REQUEST, "withdrawn keys at B");
    }
}

/// Site B's peer API freezes (connections open, nothing answered). Sequential requests each
/// get their own deadline, and 64 concurrent ones are all answered by their own deadline
/// although only a few batches per link can be in flight: requests queued behind the stuck
/// batches do not wait for a slot and then a timeout of their own.
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_peer_answers_every_request_by_its_own_deadline() {
    let cluster = Cluster::start_proxied(&["KME_A", "KME_B"], 3, TIMEOUT_MS, "", &["KME_B"]);
    let alice = cluster.client("alice");
    cluster.share_through("KME_A", 1).await;
    cluster.proxy("KME_B").freeze();

    let mut slowest = Duration::ZERO;
    for i in 0..16 {
        let answer = timed_enc_keys(&alice).await;
        slowest = slowest.max(answer.1);
        assert_deadline_503(answer, "KME_B", &format!("sequential request {i}"));
    }
    eprintln!("16 sequential requests, frozen peer: slowest answer after {slowest:?}");

    let requests: Vec<_> = (0..64)
        .map(|_| {
            let alice = alice.clone();
            tokio::spawn(async move { timed_enc_keys(&alice).await })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for (i, request) in requests.into_iter().enumerate() {
        let answer = request.await.expect("request task");
        slowest = slowest.max(answer.1);
        assert_deadline_503(answer, "KME_B", &format!("concurrent request {i}"));
    }
    eprintln!("64 concurrent requests, frozen peer: slowest answer after {slowest:?}");

    cluster.proxy("KME_B").thaw();
    serves_again_and_withdrawn_keys_stay_gone(&cluster).await;
}

/// Site B's peer API refuses connections: every request fails at once, naming B.
#[tokio::test(flavor = "multi_thread")]
async fn a_refusing_peer_answers_at_once() {
    let cluster = Cluster::start_proxied(&["KME_A", "KME_B"], 3, TIMEOUT_MS, "", &["KME_B"]);
    let alice = cluster.client("alice");
    cluster.share_through("KME_A", 1).await;
    cluster.proxy("KME_B").refuse();
    let mut slowest = Duration::ZERO;
    for i in 0..8 {
        let (result, took) = timed_enc_keys(&alice).await;
        let (status, message) = status_of(result);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{message}");
        assert!(message.contains("KME_B"), "request {i}: {message}");
        assert!(
            took < Duration::from_millis(TIMEOUT_MS / 2),
            "request {i} answered after {took:?}: {message}"
        );
        slowest = slowest.max(took);
    }
    eprintln!("8 sequential requests, refusing peer: slowest answer after {slowest:?}");
    cluster.proxy("KME_B").thaw();
    serves_again_and_withdrawn_keys_stay_gone(&cluster).await;
}

/// Two of four entropy servers freeze, so no key can be made (n = 3): each request is
/// answered by its deadline, not after waiting for a frozen server and then for a frozen
/// replacement.
#[tokio::test(flavor = "multi_thread")]
async fn frozen_entropy_servers_answer_by_the_deadline() {
    let cluster = Cluster::start_proxied(&["KME_A", "KME_B"], 4, TIMEOUT_MS, "", &["E1", "E2"]);
    let alice = cluster.client("alice");
    cluster.share_through("KME_A", 1).await;
    cluster.proxy("E1").freeze();
    cluster.proxy("E2").freeze();
    let mut slowest = Duration::ZERO;
    for i in 0..8 {
        let answer = timed_enc_keys(&alice).await;
        slowest = slowest.max(answer.1);
        assert_deadline_503(answer, "KME_B", &format!("request {i}"));
    }
    eprintln!(
        "8 sequential requests, 2 of 4 entropy servers frozen: slowest answer after {slowest:?}"
    );
    cluster.proxy("E1").thaw();
    cluster.proxy("E2").thaw();
    serves_again_and_withdrawn_keys_stay_gone(&cluster).await;
}

/// A request meets a ready-key pool its peer no longer holds: the bind is answered late
/// (site B is stopped for most of the deadline) with a refusal, and the keys made on demand
/// instead cannot be generated (an entropy server is frozen). The retry gets what remains of
/// the request's deadline, not a timeout of its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_pool_miss_retries_on_demand_within_the_same_deadline() {
    if std::env::var("DQKD_TEST_STORE").as_deref() == Ok("postgres") {
        eprintln!(
            "SKIPPED: this test deletes site B's embedded store file, and this run keeps its \
             keys in PostgreSQL"
        );
        return;
    }
    let mut cluster = Cluster::start_proxied(&["KME_A", "KME_B"], 3, TIMEOUT_MS, POOLS, &["E1"]);
    let alice = cluster.client("alice");
    wait_level(&alice, "KME_B", 2000).await;

    // B loses its store: A's ready keys toward B are no longer ready there.
    cluster.site("KME_B").kill9();
    for file in ["KME_B.redb", "KME_B.redb.wal"] {
        let path = cluster.dir.path().join(file);
        if path.exists() {
            std::fs::remove_file(path).expect("B's store");
        }
    }
    cluster.site("KME_B").launch();

    cluster.proxy("E1").freeze();
    cluster.site("KME_B").signal("-STOP");
    let request = {
        let alice = alice.clone();
        tokio::spawn(async move { timed_enc_keys(&alice).await })
    };
    tokio::time::sleep(Duration::from_millis(TIMEOUT_MS * 7 / 10)).await;
    cluster.site("KME_B").signal("-CONT");
    let answer = request.await.expect("request task");
    let took = answer.1;
    assert_deadline_503(answer, "KME_B", "the request after a pool miss");
    eprintln!("pool miss, then on demand with an entropy server frozen: answered after {took:?}");
    let log = cluster.sites["KME_A"].log_text();
    assert!(
        log.contains("does not hold keys this site thought ready"),
        "the request met the stale pool: {log}"
    );

    cluster.proxy("E1").thaw();
    serves_again_and_withdrawn_keys_stay_gone(&cluster).await;
}
