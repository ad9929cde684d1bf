//! The multi-site cluster end to end: three sites and four entropy servers as real
//! processes on loopback; keys made at one site, regenerated at another from metadata.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{status_of, wait_until, withdrawals_confirmed, withdrawn_key_ids, Cluster};
use dqkd_client::{ClientError, KeyRequestBody};
use dqkd_kme::peer::{BindRequest, DeliverRequest, DestroyRequest, Grant, PeerError};
use http::StatusCode;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread")]
async fn alice_and_bob_share_keys_across_sites_in_every_form() {
    let cluster = Cluster::start_with(&["KME_A", "KME_B"], 3, 2000);
    let alice = cluster.client("alice");
    let bob = cluster.client("bob");

    let status = alice.status("KME_B").await.expect("status by KME ID");
    assert_eq!(status.source_KME_ID, "KME_A");
    assert_eq!(status.target_KME_ID, "KME_B");
    let status = alice.status("bob").await.expect("status by SAE ID");
    assert_eq!(status.target_KME_ID, "KME_B");

    // The mission's addressing: slave = Bob's KME ID, master = Alice's KME ID.
    let get = alice
        .enc_keys_get("KME_B", None, None)
        .await
        .expect("GET enc_keys");
    let got = bob
        .dec_keys("KME_A", &[get.keys[0].key_ID.as_str()])
        .await
        .expect("dec");
    assert_eq!(got.keys[0].key, get.keys[0].key);

    // POST with number and size, fetched by SAE ID, with GET and POST dec_keys.
    let post = alice
        .enc_keys(
            "bob",
            &KeyRequestBody {
                number: Some(5),
                size: Some(1024),
                ..Default::default()
            },
        )
        .await
        .expect("POST enc_keys");
    assert_eq!(post.keys.len(), 5);
    let first = bob
        .dec_keys_get("alice", &post.keys[0].key_ID)
        .await
        .expect("GET dec");
    assert_eq!(first.keys[0].key, post.keys[0].key);
    let rest: Vec<&str> = post.keys[1..].iter().map(|k| k.key_ID.as_str()).collect();
    let got = bob.dec_keys("alice", &rest).await.expect("POST dec");
    for (sent, received) in post.keys[1..].iter().zip(&got.keys) {
        assert_eq!(sent.key_ID, received.key_ID);
        assert_eq!(sent.key, received.key);
        assert_eq!(common::base64_decode(&received.key).len(), 128);
    }
    // Once for Bob; Alice may fetch her copy at her own site (master_refetch).
    let (status, message) = status_of(bob.dec_keys("alice", &rest).await);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(message, "one or more keys specified are not found on KME");
    let mine = alice
        .dec_keys("alice", &rest[..2])
        .await
        .expect("refetch at A");
    assert_eq!(mine.keys[0].key, post.keys[1].key);
    // Naming the key's other party, as some clients do: the slave, then the slave's site.
    let mine = alice
        .dec_keys("bob", &rest[2..3])
        .await
        .expect("refetch naming bob");
    assert_eq!(mine.keys[0].key, post.keys[3].key);
    let mine = alice
        .dec_keys("KME_B", &rest[3..])
        .await
        .expect("refetch naming KME_B");
    assert_eq!(mine.keys[0].key, post.keys[4].key);
    let (status, _) = status_of(alice.dec_keys("bob", &rest[..1]).await);
    assert_eq!(status, StatusCode::BAD_REQUEST, "a second refetch");
}

#[tokio::test(flavor = "multi_thread")]
async fn multicast_reaches_three_sites() {
    let cluster = Cluster::start();
    let keys = cluster
        .client("alice")
        .enc_keys(
            "bob",
            &KeyRequestBody {
                number: Some(3),
                additional_slave_SAE_IDs: vec!["carol".into(), "dave".into()],
                ..Default::default()
            },
        )
        .await
        .expect("multicast enc_keys");
    let ids: Vec<&str> = keys.keys.iter().map(|k| k.key_ID.as_str()).collect();
    for slave in ["bob", "dave", "carol"] {
        let client = cluster.client(slave);
        let got = client.dec_keys("alice", &ids).await.expect(slave);
        for (sent, received) in keys.keys.iter().zip(&got.keys) {
            assert_eq!(sent.key, received.key, "{slave}");
        }
        let (status, _) = status_of(client.dec_keys("alice", &ids).await);
        assert_eq!(status, StatusCode::BAD_REQUEST, "{slave} got a key twice");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_site_and_wrong_sae_get_401() {
    let cluster = Cluster::start();
    let keys = cluster
        .client("alice")
        .enc_keys("bob", &KeyRequestBody::default())
        .await
        .expect("enc");
    let id = keys.keys[0].key_ID.as_str();
    // Bob at the wrong site: not an SAE of KME_A.
    let (status, _) = status_of(
        cluster
            .client_at("bob", "KME_A")
            .dec_keys("alice", &[id])
            .await,
    );
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = status_of(cluster.client_at("bob", "KME_C").status("alice").await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Dave at the right site, but the key is Bob's.
    let (status, _) = status_of(cluster.client("dave").dec_keys("alice", &[id]).await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Carol's site never had the key.
    let (status, _) = status_of(cluster.client("carol").dec_keys("alice", &[id]).await);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Nothing was consumed.
    cluster
        .client("bob")
        .dec_keys("alice", &[id])
        .await
        .expect("bob's key");
}

/// Regression, "a peer can destroy keys it never made": KME_A's `destroy` removed a key at B
/// that bob made for bob2 (here dave), who then got 400. A site now acts on a peer's
/// `destroy`, `deliver` and `bind` only for keys of that peer's own SAEs: anything else is
/// 403 and changes nothing, while the origin's own destroys (and their retries) still work.
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_cannot_destroy_keys_it_never_made() {
    let cluster = Cluster::start();
    let made = cluster
        .client("bob")
        .enc_keys("dave", &KeyRequestBody::default())
        .await
        .expect("bob's key for dave");
    let bobs: Uuid = made.keys[0].key_ID.parse().expect("UUID");
    let sent = cluster
        .client("alice")
        .enc_keys(
            "bob",
            &KeyRequestBody {
                number: Some(2),
                ..Default::default()
            },
        )
        .await
        .expect("alice's keys for bob");
    let alices: Vec<Uuid> = sent
        .keys
        .iter()
        .map(|k| k.key_ID.parse().expect("UUID"))
        .collect();
    let destroy = |key_ids: Vec<Uuid>| DestroyRequest {
        request_id: Uuid::new_v4(),
        key_ids,
        ready: Vec::new(),
        replica: None,
    };
    fn forbidden<T: std::fmt::Debug>(result: Result<T, PeerError>, what: &str) {
        match result {
            Err(PeerError::Refused {
                status, message, ..
            }) => {
                assert_eq!(status, StatusCode::FORBIDDEN, "{what}: {message}");
                assert!(message.contains("may act only on keys and pools it originated"));
            }
            other => panic!("{what}: expected 403, got {other:?}"),
        }
    }

    let from_a = cluster.peer_client("KME_A", "KME_B");
    let from_c = cluster.peer_client("KME_C", "KME_B");
    // KME_A names bob's key, alone or with a key of its own: refused, whole.
    forbidden(
        from_a.destroy(&destroy(vec![bobs])).await,
        "A destroys B's key",
    );
    forbidden(
        from_a.destroy(&destroy(vec![alices[0], bobs])).await,
        "A destroys its key and B's",
    );
    // KME_C names alice's keys: refused.
    forbidden(
        from_c.destroy(&destroy(alices.clone())).await,
        "C destroys A's keys",
    );
    // KME_C makes (deliver) or binds keys for alice: refused before anything is read.
    let grant = Grant {
        master: "alice".parse().expect("name"),
        slaves: vec!["bob".parse().expect("name")],
        key_ids: vec![Uuid::new_v4()],
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    forbidden(
        from_c
            .deliver(
                &DeliverRequest {
                    request_id: Uuid::new_v4(),
                    metadata: String::new(),
                    grants: vec![grant.clone()],
                },
                deadline,
            )
            .await,
        "C delivers for alice",
    );
    forbidden(
        from_c
            .bind(
                &BindRequest {
                    request_id: Uuid::new_v4(),
                    grants: vec![grant],
                    positions: vec![1],
                    replica: None,
                },
                deadline,
            )
            .await,
        "C binds for alice",
    );

    // Nothing changed: dave gets bob's key, bob gets alice's first key.
    let got = cluster
        .client("dave")
        .dec_keys("bob", &[&made.keys[0].key_ID])
        .await
        .expect("dave still gets bob's key");
    assert_eq!(got.keys[0].key, made.keys[0].key);
    let got = cluster
        .client("bob")
        .dec_keys("alice", &[&sent.keys[0].key_ID])
        .await
        .expect("bob still gets alice's key");
    assert_eq!(got.keys[0].key, sent.keys[0].key);
    // The origin still destroys its own key, and a retry after it is gone succeeds.
    let retry = destroy(vec![alices[1]]);
    let ack = from_a.destroy(&retry).await.expect("A destroys its key");
    assert_eq!(ack.destroyed, 1);
    let ack = from_a.destroy(&retry).await.expect("A's retry");
    assert_eq!(ack.destroyed, 0);
    let (status, _) = status_of(
        cluster
            .client("bob")
            .dec_keys("alice", &[&sent.keys[1].key_ID])
            .await,
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let log = cluster.sites["KME_B"].log_text();
    assert_eq!(
        log.matches("refused a peer message").count(),
        5,
        "each refusal is logged: {log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unresponsive_peer_gives_503_in_time_and_leaves_no_orphan_key() {
    let mut cluster = Cluster::start_with(&["KME_A", "KME_B"], 3, 1500);
    let alice = cluster.client("alice");

    // B is alive but frozen: A must give up within its timeout.
    cluster.site("KME_B").signal("-STOP");
    let started = Instant::now();
    let (status, message) = status_of(
        alice
            .enc_keys(
                "bob",
                &KeyRequestBody {
                    number: Some(2),
                    ..Default::default()
                },
            )
            .await,
    );
    let waited = started.elapsed();
    cluster.site("KME_B").signal("-CONT");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(message.contains("KME_B"), "{message}");
    assert!(
        waited < Duration::from_millis(1500 + 1500),
        "waited {waited:?}"
    );

    // B wakes up and may finish the old request, but A withdraws it: once B confirms the
    // withdrawal none of its keys is deliverable at either site.
    wait_until("B to confirm the withdrawal", || {
        withdrawals_confirmed(&cluster.sites["KME_A"].log_text())
    })
    .await;
    let ids = withdrawn_key_ids(&cluster.sites["KME_A"].log_text());
    assert_eq!(ids.len(), 2, "A logs the withdrawn key IDs: {ids:?}");
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (status, _) = status_of(cluster.client("bob").dec_keys("alice", &id_refs).await);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = status_of(alice.dec_keys("alice", &id_refs).await);
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // A dead peer: refused at once; after it restarts, no manual repair is needed.
    cluster.site("KME_B").kill9();
    let (status, message) = status_of(alice.enc_keys("bob", &KeyRequestBody::default()).await);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(message.contains("KME_B"), "{message}");
    cluster.site("KME_B").launch();
    let keys = alice
        .enc_keys("bob", &KeyRequestBody::default())
        .await
        .expect("after recovery");
    let got = cluster
        .client("bob")
        .dec_keys("alice", &[keys.keys[0].key_ID.as_str()])
        .await
        .expect("dec after recovery");
    assert_eq!(got.keys[0].key, keys.keys[0].key);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_entropy_server_down_is_routed_around() {
    let mut cluster = Cluster::start_with(&["KME_A", "KME_B"], 4, 2000);
    cluster.entropy[0].kill9();
    for _ in 0..4 {
        let keys = cluster
            .client("alice")
            .enc_keys("bob", &KeyRequestBody::default())
            .await
            .expect("enc_keys with E1 down");
        let got = cluster
            .client("bob")
            .dec_keys("alice", &[keys.keys[0].key_ID.as_str()])
            .await
            .expect("dec");
        assert_eq!(got.keys[0].key, keys.keys[0].key);
    }
    // With two of four down, three servers cannot be found: a clear 503.
    cluster.entropy[1].kill9();
    let (status, message) = status_of(
        cluster
            .client("alice")
            .enc_keys("bob", &KeyRequestBody::default())
            .await,
    );
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(message.contains("entropy servers"), "{message}");
}

/// Streams enc_keys at A while `victim` is killed and restarted; then checks that every
/// key Alice was given reaches Bob exactly once.
async fn crash_during_stream(victim: &str) {
    let mut cluster = Cluster::start_with(&["KME_A", "KME_B"], 3, 1500);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stop = Arc::new(AtomicBool::new(false));
    // Keys issued and requests failed so far, to tell when the stream ran in each phase.
    let issued_count = Arc::new(AtomicUsize::new(0));
    let failed_count = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let alice = cluster.client("alice");
        let tx = tx.clone();
        let stop = stop.clone();
        let (issued_count, failed_count) = (issued_count.clone(), failed_count.clone());
        workers.push(tokio::spawn(async move {
            let mut errors = 0u32;
            while !stop.load(Ordering::Relaxed) {
                match alice
                    .enc_keys(
                        "bob",
                        &KeyRequestBody {
                            number: Some(2),
                            ..Default::default()
                        },
                    )
                    .await
                {
                    Ok(keys) => {
                        issued_count.fetch_add(keys.keys.len(), Ordering::Relaxed);
                        for k in keys.keys {
                            let _ = tx.send((k.key_ID.clone(), k.key.clone()));
                        }
                    }
                    Err(_) => {
                        failed_count.fetch_add(1, Ordering::Relaxed);
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            errors
        }));
    }
    drop(tx);
    // Keys flow, then the victim dies mid-stream; requests fail while it is down, and keys
    // flow again once it is back.
    let issued = || issued_count.load(Ordering::Relaxed);
    wait_until("keys before the crash", || issued() >= 10).await;
    let failed_before = failed_count.load(Ordering::Relaxed);
    cluster.site(victim).kill9();
    wait_until("a request to fail during the crash", || {
        failed_count.load(Ordering::Relaxed) > failed_before
    })
    .await;
    cluster.site(victim).launch();
    let after_restart = issued();
    wait_until("keys after the restart", || issued() >= after_restart + 10).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    let mut issued = BTreeMap::new();
    while let Some((id, key)) = rx.recv().await {
        assert!(
            issued.insert(id, key).is_none(),
            "a key ID was issued twice"
        );
    }
    assert!(
        issued.len() > 10,
        "too few keys issued to prove anything: {}",
        issued.len()
    );

    let bob = cluster.client("bob");
    let ids: Vec<&String> = issued.keys().collect();
    for chunk in ids.chunks(16) {
        let refs: Vec<&str> = chunk.iter().map(|s| s.as_str()).collect();
        let got = bob
            .dec_keys("alice", &refs)
            .await
            .expect("every issued key is at B");
        for k in &got.keys {
            assert_eq!(
                &issued[&k.key_ID], &k.key,
                "B has another key under {}",
                k.key_ID
            );
        }
        let (status, _) = status_of(bob.dec_keys("alice", &refs).await);
        assert_eq!(status, StatusCode::BAD_REQUEST, "delivered twice");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_the_master_site_mid_stream_loses_nothing() {
    crash_during_stream("KME_A").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_the_slave_site_mid_stream_loses_nothing() {
    crash_during_stream("KME_B").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_pair_does_not_fail_other_requests_batched_with_it() {
    let cluster = Cluster::start_full(
        &["KME_A", "KME_B"],
        3,
        3000,
        "[limits]\nmax_key_per_request = 8\nmax_key_count = 8\n",
    );
    let alice = cluster.client("alice");
    // Bob never fetches: the pair alice→bob is full at site B.
    alice
        .enc_keys(
            "bob",
            &KeyRequestBody {
                number: Some(8),
                ..Default::default()
            },
        )
        .await
        .expect("fill alice→bob");
    let mut calls = Vec::new();
    for i in 0..16 {
        let client = cluster.client("alice");
        let slave = if i % 2 == 0 { "bob" } else { "dave" };
        calls.push(tokio::spawn(async move {
            (
                slave,
                client.enc_keys(slave, &KeyRequestBody::default()).await,
            )
        }));
    }
    let mut dave_keys = Vec::new();
    for call in calls {
        let (slave, result) = call.await.expect("task");
        match (slave, result) {
            ("bob", Err(ClientError::Api { status, message })) => {
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
                assert!(message.contains("bob"), "{message}");
            }
            ("dave", Ok(keys)) => dave_keys.push(keys.keys[0].clone()),
            (slave, other) => panic!("{slave}: unexpected {other:?}"),
        }
    }
    assert_eq!(dave_keys.len(), 8);
    let dave = cluster.client("dave");
    for key in dave_keys {
        let got = dave
            .dec_keys("alice", &[key.key_ID.as_str()])
            .await
            .expect("dave's key");
        assert_eq!(got.keys[0].key, key.key);
    }
}
