//! A site scaled out: two KME processes of site B on one PostgreSQL database. Needs
//! `DQKD_TEST_POSTGRES_URL` (an admin URL); without it every test says loudly that it
//! was skipped.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster::Cluster;
use dqkd_client::{Client, KeyRequestBody};

/// Sites A and B on PostgreSQL, with `extra` in the manifest; B runs a second replica.
fn postgres_cluster() -> Option<Cluster> {
    let mut cluster = postgres_cluster_full("")?;
    cluster.add_replica("KME_B");
    Some(cluster)
}

/// Sites A and B on PostgreSQL, one process each, with `extra` in the manifest.
fn postgres_cluster_full(extra: &str) -> Option<Cluster> {
    if std::env::var_os("DQKD_TEST_POSTGRES_URL").is_none() {
        common::skip("DQKD_TEST_POSTGRES_URL", "replicated sites");
        return None;
    }
    // Every test of this file runs on PostgreSQL: replicas need a shared store.
    std::env::set_var("DQKD_TEST_STORE", "postgres");
    Some(Cluster::start_full(&["KME_A", "KME_B"], 3, 3000, extra))
}

/// Alice's keys, by ID.
async fn issue(cluster: &Cluster, requests: usize, number: u32) -> BTreeMap<String, String> {
    let alice = cluster.client("alice");
    let mut issued = BTreeMap::new();
    for _ in 0..requests {
        let keys = alice
            .enc_keys(
                "bob",
                &KeyRequestBody {
                    number: Some(number),
                    ..Default::default()
                },
            )
            .await
            .expect("enc_keys");
        for k in keys.keys {
            issued.insert(k.key_ID.clone(), k.key.clone());
        }
    }
    issued
}

#[tokio::test(flavor = "multi_thread")]
async fn racing_bobs_on_two_replicas_get_each_key_exactly_once() {
    let Some(cluster) = postgres_cluster() else {
        return;
    };
    let issued = issue(&cluster, 10, 4).await;
    let ids: Vec<String> = issued.keys().cloned().collect();
    let wins: Arc<Mutex<BTreeMap<String, Vec<String>>>> = Arc::default();
    let mut bobs = Vec::new();
    for b in 0..32 {
        let replica = if b % 2 == 0 { "KME_B" } else { "KME_B-r2" };
        let client = cluster.client_at("bob", replica);
        let mut order = ids.clone();
        order.rotate_left(b * 3 % ids.len());
        let wins = wins.clone();
        bobs.push(tokio::spawn(async move {
            for id in order {
                if let Ok(got) = client.dec_keys("alice", &[id.as_str()]).await {
                    let mut wins = wins.lock().expect("lock");
                    wins.entry(id).or_default().push(got.keys[0].key.clone());
                }
            }
        }));
    }
    for bob in bobs {
        bob.await.expect("bob");
    }
    let wins = wins.lock().expect("lock");
    for (id, key) in &issued {
        let got = wins.get(id).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(got.len(), 1, "key {id} was delivered {} times", got.len());
        assert_eq!(&got[0], key, "key {id} differs");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_one_replica_under_load_loses_no_key() {
    let Some(mut cluster) = postgres_cluster() else {
        return;
    };
    let issued = issue(&cluster, 30, 2).await;
    let ids: Vec<String> = issued.keys().cloned().collect();
    let delivered: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let mut bobs = Vec::new();
    for b in 0..8 {
        let replicas = [
            cluster.client_at("bob", "KME_B-r2"),
            cluster.client_at("bob", "KME_B"),
        ];
        let mine: Vec<String> = ids.iter().skip(b).step_by(8).cloned().collect();
        let delivered = delivered.clone();
        bobs.push(tokio::spawn(async move {
            for id in mine {
                // Try the second replica first; when it is gone, the first one serves.
                for client in &replicas {
                    match client.dec_keys("alice", &[id.as_str()]).await {
                        Ok(_) => {
                            *delivered
                                .lock()
                                .expect("lock")
                                .entry(id.clone())
                                .or_default() += 1;
                            break;
                        }
                        Err(dqkd_client::ClientError::Api { .. }) => break,
                        Err(_) => continue,
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    cluster.site("KME_B-r2").kill9();
    for bob in bobs {
        bob.await.expect("bob");
    }
    {
        let delivered = delivered.lock().expect("lock");
        // A take that the dead replica committed but never answered is gone without being
        // delivered (as after any crash); every other key was delivered exactly once.
        let lost = ids.iter().filter(|id| !delivered.contains_key(*id)).count();
        assert!(lost <= 8, "too many keys lost with the replica: {lost}");
        assert!(
            delivered.values().all(|n| *n == 1),
            "a key was delivered twice"
        );
    }
    // The surviving replica still serves new keys.
    let fresh = issue(&cluster, 1, 1).await;
    let (id, key) = fresh.iter().next().expect("a key");
    let got = cluster
        .client_at("bob", "KME_B")
        .dec_keys("alice", &[id.as_str()])
        .await
        .expect("survivor serves");
    assert_eq!(&got.keys[0].key, key);
}

/// Sites A and B on PostgreSQL with ready-key pools, site A's process named replica `a1`.
fn pooled_cluster_with_replica_a1() -> Option<Cluster> {
    let mut cluster =
        postgres_cluster_full("[pools]\ntarget = 2000\nlow_water = 1000\nbatch = 500\n")?;
    cluster.site("KME_A").relaunch_with(&["--replica", "a1"]);
    Some(cluster)
}

/// Waits until `client`'s status toward Bob reports `want` ready keys exactly.
async fn wait_level(client: &Client, want: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let level = client.status("bob").await.expect("status").stored_key_count;
        if level == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pool toward bob at {level}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `dqkd_pool_claimed` of process `at` for its pool toward KME_B.
fn pool_claimed(cluster: &Cluster, at: &str) -> Option<f64> {
    cluster.sites[at].metrics().lines().find_map(|line| {
        let rest = line.strip_prefix("dqkd_pool_claimed{")?;
        let (labels, value) = rest.split_once("} ")?;
        labels
            .contains("peer=\"KME_B\"")
            .then(|| value.trim().parse().ok())?
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn named_replicas_keep_ready_key_pools_of_their_own() {
    let Some(mut cluster) = pooled_cluster_with_replica_a1() else {
        return;
    };
    let second = cluster.add_replica_with("KME_A", &["--replica", "a2"]);
    let replicas = ["KME_A", second.as_str()];
    for at in replicas {
        wait_level(&cluster.client_at("alice", at), 2000).await;
    }

    // Each replica serves from its own pool: its level drops by exactly what it handed out.
    for round in 0..10 {
        cluster.share_through(replicas[round % 2], 5).await;
    }
    for at in replicas {
        wait_level(&cluster.client_at("alice", at), 1975).await;
    }

    // A restarted replica reads back its own pool, not the other's.
    cluster.site(&second).kill9();
    cluster.site(&second).launch();
    wait_level(&cluster.client_at("alice", &second), 1975).await;
    for round in 0..6 {
        cluster.share_through(replicas[round % 2], 4).await;
    }
    for at in replicas {
        wait_level(&cluster.client_at("alice", at), 1963).await;
        let log = cluster.sites[at].log_text();
        assert!(
            !log.contains("does not hold keys this site thought ready"),
            "{at} met keys another replica had bound: {log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_name_in_use_waits_and_takes_the_pool_over() {
    let Some(mut cluster) = pooled_cluster_with_replica_a1() else {
        return;
    };
    wait_level(&cluster.client_at("alice", "KME_A"), 2000).await;
    // A second process under the same name: the pool stays with the first one, and the
    // second serves on demand.
    let standby = cluster.add_replica_with("KME_A", &["--replica", "a1"]);
    cluster.share_through(&standby, 3).await;
    cluster.share_through("KME_A", 5).await;
    wait_level(&cluster.client_at("alice", "KME_A"), 1995).await;
    let standby_alice = cluster.client_at("alice", &standby);
    let level = standby_alice
        .status("bob")
        .await
        .expect("status")
        .stored_key_count;
    assert_eq!(level, 0, "the second process filled a pool of its own");
    assert!(
        cluster.sites[standby.as_str()]
            .log_text()
            .contains("another running process of this site keeps this ready-key pool"),
        "the second process says why it has no pool"
    );
    assert_eq!(pool_claimed(&cluster, "KME_A"), Some(1.0));
    assert_eq!(pool_claimed(&cluster, &standby), Some(0.0));

    // The first one loses its claim while frozen: the second claims the pool, and the first,
    // once it runs again, finds the claim gone and hands out nothing more.
    let holder = cluster.sites["KME_A"].pid();
    cluster.sites["KME_A"].signal("-STOP");
    common::psql(
        &cluster.store_url("KME_A"),
        &format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'dqkd pool claims (pid {holder})'"
        ),
    );
    wait_level(&standby_alice, 1995).await;
    cluster.sites["KME_A"].signal("-CONT");
    let first_alice = cluster.client_at("alice", "KME_A");
    wait_level(&first_alice, 0).await;
    assert_eq!(pool_claimed(&cluster, "KME_A"), Some(0.0));
    assert_eq!(pool_claimed(&cluster, &standby), Some(1.0));
    cluster.share_through(&standby, 5).await;
    wait_level(&standby_alice, 1990).await;
    cluster.share_through("KME_A", 2).await;
    wait_level(&standby_alice, 1990).await;

    // The second one dies: the first claims the pool back and hands out its keys.
    cluster.site(&standby).kill9();
    wait_level(&first_alice, 1990).await;
    cluster.share_through("KME_A", 5).await;
    wait_level(&first_alice, 1985).await;
}
