//! The holder of a ready-key pool killed with `kill -9` while it binds under load: the next
//! holder (the restarted process, or a standby under the same replica name on PostgreSQL)
//! keeps the pool. Counted: ready keys discarded (only those of binds in flight at the kill
//! that B had bound, or that A had answered as it died: the next holder settles the positions
//! in doubt with B and keeps those B still holds), keys given twice (0) and keys left at site
//! B that no SAE received (0).

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster::{status_of, wait_level, wait_until, Cluster};
use dqkd_client::{Client, KeyRequestBody};
use http::StatusCode;

const TARGET: u64 = 2000;
/// Low enough that the short load never starts a refill, so the level counts every key.
const POOLS: &str = "[pools]\ntarget = 2000\nlow_water = 100\nbatch = 500\n";
const LOAD_TASKS: usize = 6;
const MAX_PER_REQUEST: u32 = 4;

/// Small requests (all served from the pool) until `stop`, recording what Alice received.
async fn load(alice: Client, received: Arc<Mutex<BTreeSet<String>>>, stop: Arc<AtomicBool>) {
    let mut n = uuid::Uuid::new_v4().as_u128() as u32;
    while !stop.load(Ordering::Relaxed) {
        n = n.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let request = KeyRequestBody {
            number: Some(1 + (n >> 12) % MAX_PER_REQUEST),
            ..Default::default()
        };
        match alice.enc_keys("bob", &request).await {
            Ok(keys) => received
                .lock()
                .expect("received")
                .extend(keys.keys.iter().map(|k| k.key_ID.clone())),
            // The holder is gone: nothing more to send it.
            Err(_) => return,
        }
    }
}

/// Loads `holder`, kills it mid-bind, and checks what `next` (the same process restarted, or
/// a standby) holds afterwards.
async fn kill_the_holder_under_load(cluster: &mut Cluster, holder: &str, next: &str) {
    wait_level(&cluster.client_at("alice", holder), "KME_B", TARGET).await;
    let received = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..LOAD_TASKS)
        .map(|_| {
            let alice = cluster.client_at("alice", holder);
            tokio::spawn(load(alice, received.clone(), stop.clone()))
        })
        .collect();
    wait_until("some keys handed out", || {
        received.lock().expect("received").len() > 200
    })
    .await;
    cluster.site(holder).kill9();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("load task");
    }
    if holder == next {
        cluster.site(holder).launch();
    }
    let received: Vec<String> = received.lock().expect("received").iter().cloned().collect();

    // The next holder has the pool once its level is positive and settled: unchanged for
    // longer than a standby waits to retry its claim on the in-flight records.
    let alice = cluster.client_at("alice", next);
    let (mut last, mut same) = (u64::MAX, 0);
    while same < 6 {
        let level = alice.status("bob").await.expect("status").stored_key_count;
        same = if level > 0 && level == last {
            same + 1
        } else {
            0
        };
        last = level;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let discarded = TARGET - received.len() as u64 - last;
    let in_flight = (LOAD_TASKS as u32 * MAX_PER_REQUEST) as u64;
    let log = cluster.sites[next].log_text();
    let (ready_again, bound_at_b) = settled(&log);
    eprintln!(
        "holder crash ({holder} -> {next}): {} keys received, {last} still ready, \
         {discarded} discarded (at most {in_flight} were in flight); positions in doubt: \
         {ready_again} ready again, {bound_at_b} bound at B and removed",
        received.len()
    );
    assert!(
        !log.contains("could not settle an unanswered bind"),
        "the next holder could not settle the positions in doubt: {log}"
    );
    assert!(
        discarded <= in_flight,
        "{discarded} ready keys discarded, more than the {in_flight} of binds in flight"
    );

    // The next holder's binds meet no key the peer already bound.
    cluster.share_through(next, 3).await;
    let log = cluster.sites[next].log_text();
    assert!(
        !log.contains("does not hold keys this site thought ready"),
        "the next holder discarded its pool: {log}"
    );
    wait_level(&alice, "KME_B", last - 3).await;

    // Every key Alice received is Bob's, once.
    let bob = cluster.client("bob");
    for chunk in received.chunks(500) {
        let ids: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let got = bob
            .dec_keys("alice", &ids)
            .await
            .expect("each received key");
        assert_eq!(got.keys.len(), ids.len());
    }
    let (status, _) = status_of(bob.dec_keys("alice", &[received[0].as_str()]).await);
    assert_eq!(status, StatusCode::BAD_REQUEST, "a key is given once");

    // Nothing at B that no SAE received, once an unanswered request is withdrawn there.
    if log.contains("withdrawing the keys of a request left unanswered") {
        wait_until("B to confirm the withdrawal", || {
            cluster.sites[next]
                .log_text()
                .contains("withdrew keys of a failed request")
        })
        .await;
    }
    // The embedded stores open only once their processes are gone.
    cluster.site("KME_B").kill9();
    cluster.site(next).kill9();
    let at_b = cluster.pending_in_store("KME_B", "alice", "bob").await;
    let at_a = cluster.pending_in_store("KME_A", "alice", "alice").await;
    let answer_lost = at_a
        .checked_sub(received.len() as u64 + 3)
        .expect("A holds a copy of every key Alice received");
    eprintln!("holder crash: {at_b} unreceived keys at B, {answer_lost} answered at A as it died");
    assert_eq!(
        at_b.saturating_sub(answer_lost),
        0,
        "keys at B that no SAE received"
    );
    eprintln!(
        "| {holder} -> {next} | {} | {last} | {discarded} | {bound_at_b} | {answer_lost} | {ready_again} | 0 | {} |",
        received.len(),
        at_b.saturating_sub(answer_lost)
    );
    assert_eq!(
        discarded,
        bound_at_b + answer_lost,
        "discarded ready keys are those B bound for an unanswered bind or A answered as it died"
    );
}

/// Positions of unanswered binds the next holder settled with B, from its log: how many are
/// ready again and how many B had bound (and destroyed).
fn settled(log: &str) -> (u64, u64) {
    let field = |line: &str, name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
            .unwrap_or(0)
    };
    log.lines()
        .filter(|l| l.contains("unanswered_bind_settled"))
        .fold((0, 0), |(ready, bound), line| {
            (
                ready + field(line, "ready_again="),
                bound + field(line, "removed="),
            )
        })
}

/// One test, so that the PostgreSQL runs (which set `DQKD_TEST_STORE` for this process) never
/// overlap the embedded one.
#[tokio::test(flavor = "multi_thread")]
async fn a_pool_survives_kill_9_of_its_holder_mid_bind() {
    // Embedded store, plain restart.
    let mut cluster = Cluster::start_full(&["KME_A", "KME_B"], 3, 2000, POOLS);
    kill_the_holder_under_load(&mut cluster, "KME_A", "KME_A").await;
    drop(cluster);

    if std::env::var_os("DQKD_TEST_POSTGRES_URL").is_none() {
        common::skip(
            "DQKD_TEST_POSTGRES_URL",
            "a pool holder killed mid-bind on PostgreSQL (restart and standby)",
        );
        return;
    }
    std::env::set_var("DQKD_TEST_STORE", "postgres");
    // PostgreSQL, the replica `a1` restarted.
    let mut cluster = Cluster::start_full(&["KME_A", "KME_B"], 3, 2000, POOLS);
    cluster.site("KME_A").relaunch_with(&["--replica", "a1"]);
    kill_the_holder_under_load(&mut cluster, "KME_A", "KME_A").await;
    drop(cluster);

    // PostgreSQL, a standby under the name `a1` takes the pool over.
    let mut cluster = Cluster::start_full(&["KME_A", "KME_B"], 3, 2000, POOLS);
    cluster.site("KME_A").relaunch_with(&["--replica", "a1"]);
    wait_level(&cluster.client_at("alice", "KME_A"), "KME_B", TARGET).await;
    let standby = cluster.add_replica_with("KME_A", &["--replica", "a1"]);
    kill_the_holder_under_load(&mut cluster, "KME_A", &standby).await;
}
