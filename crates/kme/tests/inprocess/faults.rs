//! Peer faults: a peer that never answers, an answer lost or late, a call that never
//! reaches the peer, a pool the peer no longer holds. Whatever happens, no key is ever at
//! one site and not the other, and no key a master was refused is ever delivered.

use std::time::Duration;

use axum::http::StatusCode;
use dqkd_kme::peer::{DestroyRequest, Peer as _, PeerError};
use dqkd_store::KeyStore as _;
use tokio::time::Instant;

use crate::harness::{eventually, Call, Cluster, Fault, TIMEOUT};

/// Long enough, on the paused clock, for every withdrawal retry to have run.
const SETTLE: Duration = Duration::from_secs(30);

/// B acts and never answers: alice gets 503 exactly at the deadline, and the keys B stored
/// are withdrawn there; A keeps none.
#[tokio::test(start_paused = true)]
async fn a_peer_that_never_answers_is_a_503_by_the_deadline_and_its_keys_go() {
    let cluster = Cluster::new().await;
    cluster.link("A", "B").set(Call::Deliver, Fault::Hang);
    let started = Instant::now();
    let answer = cluster.enc("A", "alice", "bob", r#"{"number":2}"#).await;
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        answer.body
    );
    assert!(answer.message().contains("\"B\""), "{}", answer.message());
    assert_eq!(started.elapsed(), TIMEOUT);
    let (a, b) = (cluster.site("A"), cluster.site("B"));
    assert_eq!(
        cluster.link("A", "B").calls(Call::Deliver),
        1,
        "B was called"
    );
    eventually("B's copies withdrawn", SETTLE, || async {
        b.store.pending("alice", "bob") == 0
    })
    .await;
    assert!(cluster.link("A", "B").calls(Call::Destroy) >= 1);
    assert_eq!(a.store.pending("alice", "bob"), 0);
    eventually("A's in-flight record cleared", SETTLE, || async {
        a.store
            .in_flight("")
            .await
            .map(|r| r.is_empty())
            .unwrap_or(false)
    })
    .await;
}

/// B stores the keys and its answer is lost: 503 at once (no need to wait out the deadline),
/// and the keys are withdrawn at B.
#[tokio::test(start_paused = true)]
async fn a_lost_acknowledgement_withdraws_the_keys() {
    let cluster = Cluster::new().await;
    cluster.link("A", "B").set(Call::Deliver, Fault::DropAck);
    let started = Instant::now();
    let answer = cluster.enc("A", "alice", "bob", "{}").await;
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        answer.body
    );
    assert!(started.elapsed() < TIMEOUT);
    let b = cluster.site("B");
    eventually("B's copy withdrawn", SETTLE, || async {
        b.store.pending("alice", "bob") == 0
    })
    .await;
}

/// B's answer arrives after alice's deadline: alice was answered 503, so the keys are
/// destroyed at both sites and bob can never fetch them.
#[tokio::test(start_paused = true)]
async fn a_late_acknowledgement_never_delivers_the_keys() {
    let cluster = Cluster::new().await;
    let link = cluster.link("A", "B");
    link.set(Call::Deliver, Fault::DelayAck(TIMEOUT * 3));
    let answer = cluster.enc("A", "alice", "bob", "{}").await;
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        answer.body
    );
    let (a, b) = (cluster.site("A"), cluster.site("B"));
    eventually("B's copy withdrawn", SETTLE, || async {
        b.store.pending("alice", "bob") == 0
    })
    .await;
    tokio::time::advance(TIMEOUT * 5).await;
    assert_eq!(b.store.pending("alice", "bob"), 0);
    assert_eq!(a.store.pending("alice", "bob"), 0);
    // The next request, with B answering in time again, is served normally.
    link.heal(Call::Deliver);
    let ids = cluster.enc("A", "alice", "bob", "{}").await.ids();
    assert_eq!(cluster.dec("B", "bob", "alice", &ids).await.ids(), ids);
}

/// A withdrawal that cannot reach B at first is retried until it does.
#[tokio::test(start_paused = true)]
async fn a_withdrawal_is_retried_until_the_peer_takes_it() {
    let cluster = Cluster::new().await;
    let link = cluster.link("A", "B");
    link.set(Call::Deliver, Fault::DropAck);
    link.set(Call::Destroy, Fault::FailBefore);
    let answer = cluster.enc("A", "alice", "bob", "{}").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    let b = cluster.site("B");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(b.store.pending("alice", "bob"), 1, "B still holds it");
    link.heal(Call::Destroy);
    eventually("B's copy withdrawn", SETTLE, || async {
        b.store.pending("alice", "bob") == 0
    })
    .await;
}

/// A deliver that never reaches C fails the multicast: B's copies go too, A keeps none.
#[tokio::test(start_paused = true)]
async fn a_multicast_with_one_site_down_leaves_keys_nowhere() {
    let cluster = Cluster::new().await;
    cluster.link("A", "C").set(Call::Deliver, Fault::FailBefore);
    let answer = cluster
        .enc(
            "A",
            "alice",
            "bob",
            r#"{"additional_slave_SAE_IDs":["dave"]}"#,
        )
        .await;
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        answer.body
    );
    assert_eq!(cluster.link("A", "C").calls(Call::Deliver), 0);
    let (a, b, c) = (cluster.site("A"), cluster.site("B"), cluster.site("C"));
    eventually("B's copy withdrawn", SETTLE, || async {
        b.store.pending("alice", "bob") == 0
    })
    .await;
    assert_eq!(c.store.pending("alice", "dave"), 0);
    assert_eq!(a.store.pending("alice", "bob"), 0);
}

/// B no longer holds A's ready keys: the bind is refused with 409 and the keys are made on
/// demand instead, so alice still gets keys bob can fetch.
#[tokio::test(start_paused = true)]
async fn a_pool_conflict_falls_back_to_keys_made_on_demand() {
    let cluster = Cluster::with_pools("target = 8\nlow_water = 2\nbatch = 8").await;
    let (a, b) = (cluster.site("A"), cluster.site("B"));
    eventually("A's pool toward B filled", SETTLE, || async {
        b.store.pool_list("A>B").await.map(|l| l.len()).unwrap_or(0) == 8
    })
    .await;
    // B loses every ready key of the pool (shredded, say); A still lists them.
    let ready = b.store.pool_list("A>B").await.expect("pool");
    let seqs: Vec<u64> = ready.iter().map(|k| k.slot.seq).collect();
    b.store.pool_remove("A>B", &seqs).await.expect("remove");
    let link = cluster.link("A", "B");
    let binds = link.calls(Call::Bind);
    let delivers = link.calls(Call::Deliver);
    let sent = cluster.enc("A", "alice", "bob", "{}").await.keys();
    assert_eq!(
        link.calls(Call::Bind),
        binds + 1,
        "the pool was tried first"
    );
    assert_eq!(
        link.calls(Call::Deliver),
        delivers + 1,
        "then keys on demand"
    );
    let ids: Vec<String> = sent.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(cluster.dec("B", "bob", "alice", &ids).await.keys(), sent);
    assert_eq!(a.store.pending("alice", "bob"), 0);
}

/// A site may withdraw only keys its own SAEs asked for: C naming A's keys at B is refused
/// with 403 and bob still gets them; A's own withdrawal of them succeeds.
#[tokio::test(start_paused = true)]
async fn a_site_cannot_withdraw_another_sites_keys() {
    let cluster = Cluster::new().await;
    let ids = cluster
        .enc("A", "alice", "bob", r#"{"number":2}"#)
        .await
        .ids();
    let key_ids: Vec<uuid::Uuid> = ids.iter().map(|id| id.parse().expect("uuid")).collect();
    let destroy = DestroyRequest {
        request_id: uuid::Uuid::new_v4(),
        key_ids: key_ids.clone(),
        ready: vec![],
        replica: None,
    };
    match cluster.link("C", "B").destroy(&destroy).await {
        Err(PeerError::Refused { status, .. }) => assert_eq!(status, StatusCode::FORBIDDEN),
        other => panic!("C withdrew A's keys: {other:?}"),
    }
    let b = cluster.site("B");
    assert_eq!(b.store.pending("alice", "bob"), 2, "nothing was shredded");
    let mine = DestroyRequest {
        request_id: uuid::Uuid::new_v4(),
        ..destroy
    };
    let ack = cluster
        .link("A", "B")
        .destroy(&mine)
        .await
        .expect("A's own");
    assert_eq!(ack.destroyed, 2);
    let gone = cluster.dec("B", "bob", "alice", &ids).await;
    assert_eq!(gone.status, StatusCode::BAD_REQUEST);
}
