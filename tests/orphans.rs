//! No orphan keys after a crash: when the origin site dies after a peer stored a request's
//! keys but before it answered, the keys are withdrawn at the peer when the origin starts
//! again. Under load, with `kill -9` of site A again and again, every key that site B still
//! holds 10 s after A's last restart is one that Alice received, or one that A had committed
//! as answered when it died (the answer itself was then lost with the process: A keeps its
//! copy, and that moment cannot be closed by any store).

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use dqkd_client::{Client, KeyRequestBody};

/// Ready-key pools on, so that small requests take the bind path and large ones deliver.
const POOLS: &str = "[pools]\ntarget = 2000\nlow_water = 1000\nbatch = 500\n";
const KILLS: usize = 6;
const LOAD_TASKS: usize = 8;

/// One load task: Alice asks A for keys for Bob, again and again, and notes every key ID
/// she receives. Errors (A is down, a request cut by the kill) are expected.
async fn load(alice: Client, received: Arc<Mutex<BTreeSet<String>>>, stop: Arc<AtomicBool>) {
    let mut n: u32 = uuid::Uuid::new_v4().as_u128() as u32;
    while !stop.load(Ordering::Relaxed) {
        n = n.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        // Mostly pool-sized requests (bind), every fourth a large one (deliver).
        let number = if (n >> 8).is_multiple_of(4) {
            100
        } else {
            1 + (n >> 12) % 8
        };
        let request = KeyRequestBody {
            number: Some(number),
            ..Default::default()
        };
        match alice.enc_keys("bob", &request).await {
            Ok(keys) => received
                .lock()
                .expect("received")
                .extend(keys.keys.iter().map(|k| k.key_ID.clone())),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_orphan_keys_at_the_peer_after_kill_9_under_load() {
    let mut cluster = Cluster::start_full(&["KME_A", "KME_B"], 3, 2000, POOLS);
    let received = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    // A restarts on the same addresses, so the clients outlive the processes.
    let tasks: Vec<_> = (0..LOAD_TASKS)
        .map(|_| {
            let alice = cluster.client("alice");
            tokio::spawn(load(alice, received.clone(), stop.clone()))
        })
        .collect();
    let mut restarted = Instant::now();
    for kill in 0..KILLS {
        let pause = 800 + (uuid::Uuid::new_v4().as_u128() % 1200) as u64;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        cluster.site("KME_A").kill9();
        cluster.site("KME_A").launch();
        restarted = Instant::now();
        eprintln!("kill {kill}: A restarted after {pause} ms of load");
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("load task");
    }
    // 10 s after A's last restart, nothing may be left at B that nobody received.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(restarted.elapsed())).await;

    let received: Vec<String> = received.lock().expect("received").iter().cloned().collect();
    assert!(
        received.len() > 1000,
        "only {} keys received",
        received.len()
    );
    let bob = cluster.client("bob");
    for chunk in received.chunks(500) {
        let ids: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let got = bob
            .dec_keys("alice", &ids)
            .await
            .expect("every key Alice received is at B, once");
        assert_eq!(got.keys.len(), ids.len());
    }

    cluster.site("KME_B").kill9();
    cluster.site("KME_A").kill9();
    let at_b = cluster.pending_in_store("KME_B", "alice", "bob").await;
    // A's copies for Alice's refetch: every key she received, plus those A committed as
    // answered when a kill cut the answer itself.
    let at_a = cluster.pending_in_store("KME_A", "alice", "alice").await;
    let answer_lost = at_a
        .checked_sub(received.len() as u64)
        .expect("A holds a copy of every key Alice received");
    let orphans = at_b.saturating_sub(answer_lost);
    eprintln!(
        "orphan test: {KILLS} kills, {} keys received, {at_b} unreceived keys at B, \
         {answer_lost} of them answered at A when it died, {orphans} orphans",
        received.len()
    );
    assert!(
        at_b >= answer_lost,
        "A answered {answer_lost} keys that B does not hold"
    );
    assert_eq!(
        orphans, 0,
        "keys at B that no Alice received and A never answered"
    );
}
