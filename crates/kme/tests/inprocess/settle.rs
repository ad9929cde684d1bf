//! Ready keys in doubt are settled with the peer, not discarded: after a 409 the pool keeps
//! every position the peer still holds; a bind left unanswered by a holder that died is
//! withdrawn at the peer (its keys destroyed there, a late copy refused) and its positions
//! the peer still holds are ready again at both sites; and a site can settle only its own.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::http::StatusCode;
use dqkd_kme::peer::{
    BindRequest, Grant, Peer as _, PeerError, ReadySlot, ReconcileRequest, MAX_RECONCILE_SLOTS,
};
use dqkd_store::{InFlight, KeyStore as _, MemoryStore, Slot};
use tokio::time::Instant;
use uuid::Uuid;

use crate::harness::{eventually, Call, Cluster, Fault, TIMEOUT};

/// Long enough, on the paused clock, for every background task to have run.
const SETTLE: Duration = Duration::from_secs(30);

const POOLS: &str = "target = 16\nlow_water = 2\nbatch = 16";

async fn slots(store: &MemoryStore, link: &str) -> BTreeSet<Slot> {
    let keys = store.pool_list(link).await.expect("pool");
    keys.into_iter().map(|k| k.slot).collect()
}

/// Both sites hold A's full pool toward B; its slots.
async fn filled(cluster: &Cluster) -> BTreeSet<Slot> {
    let (a, b) = (cluster.site("A"), cluster.site("B"));
    eventually("A's pool toward B filled", SETTLE, || async {
        slots(&a.store, "A>B").await.len() == 16 && slots(&b.store, "A>B").await.len() == 16
    })
    .await;
    slots(&a.store, "A>B").await
}

fn refused(result: Result<impl std::fmt::Debug, PeerError>) -> StatusCode {
    match result {
        Err(PeerError::Refused { status, .. }) => status,
        other => panic!("not refused: {other:?}"),
    }
}

/// B lost 4 of A's 16 ready keys, those the next bind names: the bind meets 409 and alice
/// gets keys made on demand; then the 12 B still holds stay ready at both sites (not the
/// whole pool discarded) and serve the next requests, and the 4 are gone at both.
#[tokio::test(start_paused = true)]
async fn a_conflict_keeps_every_position_the_peer_still_holds() {
    let cluster = Cluster::with_pools(POOLS).await;
    let (a, b) = (cluster.site("A"), cluster.site("B"));
    let before = filled(&cluster).await;
    let lost: Vec<Slot> = before.iter().take(4).copied().collect();
    let seqs: Vec<u64> = lost.iter().map(|s| s.seq).collect();
    b.store.pool_remove("A>B", &seqs).await.expect("remove");
    let link = cluster.link("A", "B");
    let delivers = link.calls(Call::Deliver);
    let sent = cluster.enc("A", "alice", "bob", "{}").await.keys();
    assert_eq!(link.calls(Call::Deliver), delivers + 1, "made on demand");
    let ids: Vec<String> = sent.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(cluster.dec("B", "bob", "alice", &ids).await.keys(), sent);
    let kept: BTreeSet<Slot> = before.iter().skip(4).copied().collect();
    eventually("the pool settled with B", SETTLE, || async {
        link.calls(Call::Reconcile) > 0
            && slots(&a.store, "A>B").await.intersection(&before).count() == kept.len()
    })
    .await;
    for store in [&a.store, &b.store] {
        let now: BTreeSet<Slot> = slots(store, "A>B").await;
        let old: BTreeSet<Slot> = now.intersection(&before).copied().collect();
        assert_eq!(
            old, kept,
            "every position B holds is kept, the others removed"
        );
    }
    // The kept keys serve the next requests from the pool: no more 409, no keys on demand.
    let delivers = link.calls(Call::Deliver);
    for _ in 0..kept.len() {
        let sent = cluster.enc("A", "alice", "bob", "{}").await.keys();
        let ids: Vec<String> = sent.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(cluster.dec("B", "bob", "alice", &ids).await.keys(), sent);
    }
    assert_eq!(link.calls(Call::Deliver), delivers, "all from the pool");
    for store in [&a.store, &b.store] {
        assert_eq!(slots(store, "A>B").await.intersection(&kept).count(), 0);
    }
}

/// The in-flight record of a bind of A's first two ready keys for alice and bob, as a holder
/// leaves it when killed after sending it.
async fn unanswered_bind(cluster: &Cluster, ready: &BTreeSet<Slot>) -> (BindRequest, InFlight) {
    let doubt: Vec<Slot> = ready.iter().take(2).copied().collect();
    let record = InFlight {
        request_id: Uuid::new_v4(),
        owner: String::new(),
        sites: vec!["B".into()],
        key_ids: doubt.iter().map(|s| s.id).collect(),
        ready: doubt.iter().map(|s| s.seq).collect(),
    };
    let bind = BindRequest {
        request_id: record.request_id,
        grants: vec![Grant {
            master: "alice".parse().expect("name"),
            slaves: vec!["bob".parse().expect("name")],
            key_ids: record.key_ids.clone(),
        }],
        positions: record.ready.clone(),
        replica: None,
    };
    cluster
        .site("A")
        .store
        .record_in_flight(record.clone())
        .await
        .expect("record");
    (bind, record)
}

/// The holder died after B bound its request: the restarted A has B destroy the two keys
/// (nobody was answered for them), removes their positions at both sites, keeps the other
/// 14 ready, and a late copy of the bind is refused.
#[tokio::test(start_paused = true)]
async fn an_unanswered_bind_the_peer_did_bind_is_destroyed_there() {
    let mut cluster = Cluster::with_pools(POOLS).await;
    let ready = filled(&cluster).await;
    let (bind, record) = unanswered_bind(&cluster, &ready).await;
    let deadline = Instant::now() + Duration::from_secs(1);
    cluster
        .link("A", "B")
        .bind(&bind, deadline)
        .await
        .expect("B binds");
    assert_eq!(cluster.site("B").store.pending("alice", "bob"), 2);
    cluster.restart("A").await;
    let (a, b) = (cluster.site("A"), cluster.site("B"));
    assert_eq!(b.store.pending("alice", "bob"), 0, "B's copies destroyed");
    let rest: BTreeSet<Slot> = ready.iter().skip(2).copied().collect();
    assert_eq!(slots(&a.store, "A>B").await, rest);
    assert_eq!(slots(&b.store, "A>B").await, rest);
    assert!(a.store.in_flight("").await.expect("records").is_empty());
    let late = BindRequest {
        positions: record.ready.clone(),
        ..bind
    };
    let deadline = Instant::now() + Duration::from_secs(1);
    assert_eq!(
        refused(cluster.link("A", "B").bind(&late, deadline).await),
        StatusCode::BAD_REQUEST
    );
}

/// The holder died before B acted on its bind: the restarted A finds both positions still
/// ready at B, so they are ready again at both sites and the next request binds them; a
/// copy of the bind arriving late is refused and binds nothing.
#[tokio::test(start_paused = true)]
async fn an_unanswered_bind_the_peer_never_saw_is_ready_again() {
    let mut cluster = Cluster::with_pools(POOLS).await;
    let ready = filled(&cluster).await;
    let (bind, _) = unanswered_bind(&cluster, &ready).await;
    cluster.restart("A").await;
    let (a, b) = (cluster.site("A"), cluster.site("B"));
    assert_eq!(slots(&a.store, "A>B").await, ready, "all 16 ready at A");
    assert_eq!(slots(&b.store, "A>B").await, ready, "all 16 ready at B");
    assert!(a.store.in_flight("").await.expect("records").is_empty());
    let deadline = Instant::now() + Duration::from_secs(1);
    assert_eq!(
        refused(cluster.link("A", "B").bind(&bind, deadline).await),
        StatusCode::BAD_REQUEST,
        "the late bind is refused"
    );
    assert_eq!(slots(&b.store, "A>B").await, ready, "and bound nothing");
    let link = cluster.link("A", "B");
    let delivers = link.calls(Call::Deliver);
    let sent = cluster.enc("A", "alice", "bob", "{}").await.keys();
    assert_eq!(link.calls(Call::Deliver), delivers, "served from the pool");
    let first = ready.first().expect("ready");
    assert_eq!(
        sent[0].0,
        first.id.to_string(),
        "by the first position in doubt"
    );
    let ids = vec![sent[0].0.clone()];
    assert_eq!(cluster.dec("B", "bob", "alice", &ids).await.keys(), sent);
}

fn reconcile(slots: impl IntoIterator<Item = Slot>, replica: Option<&str>) -> ReconcileRequest {
    ReconcileRequest {
        request_id: Uuid::new_v4(),
        slots: slots
            .into_iter()
            .map(|s| ReadySlot {
                seq: s.seq,
                key_id: s.id,
            })
            .collect(),
        withdrawn: vec![Uuid::new_v4()],
        replica: replica.map(|r| r.parse().expect("name")),
    }
}

/// C names keys A's SAEs received at B: 403 and they are still there. C and another
/// replica name reach no position of A's pool: answered as not held there, A's pool untouched.
/// An oversized message is refused with 400.
#[tokio::test(start_paused = true)]
async fn a_site_settles_only_its_own_pool_and_keys() {
    let cluster = Cluster::with_pools(POOLS).await;
    filled(&cluster).await;
    let b = cluster.site("B");
    // Two keys of amy's held at B for carol, named as if they were C's ready keys.
    let ids = cluster
        .enc("A", "amy", "carol", r#"{"number":2}"#)
        .await
        .ids();
    let bound: Vec<Slot> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Slot {
            seq: i as u64,
            id: id.parse().expect("uuid"),
        })
        .collect();
    assert_eq!(b.store.pending("amy", "carol"), 2);
    let pool = slots(&b.store, "A>B").await;
    assert_eq!(
        refused(
            cluster
                .link("C", "B")
                .reconcile(&reconcile(bound, None))
                .await
        ),
        StatusCode::FORBIDDEN
    );
    assert_eq!(b.store.pending("amy", "carol"), 2, "nothing destroyed");
    for (from, replica) in [("C", None), ("A", Some("a2"))] {
        let ack = cluster
            .link(from, "B")
            .reconcile(&reconcile(pool.iter().copied(), replica))
            .await
            .expect("answered");
        assert!(ack.held.is_empty(), "{from} {replica:?}: {:?}", ack.held);
        assert_eq!(ack.destroyed, 0);
    }
    assert_eq!(slots(&b.store, "A>B").await, pool, "A's pool untouched");
    let ack = cluster
        .link("A", "B")
        .reconcile(&reconcile(pool.iter().copied(), None))
        .await
        .expect("A's own");
    assert_eq!(ack.held.len(), pool.len(), "A's own pool is held");
    let many = (0..=MAX_RECONCILE_SLOTS as u64).map(|seq| Slot {
        seq,
        id: Uuid::new_v4(),
    });
    assert_eq!(
        refused(
            cluster
                .link("A", "B")
                .reconcile(&reconcile(many, None))
                .await
        ),
        StatusCode::BAD_REQUEST
    );
}

/// B cannot be asked: the restarted A does not wait for it forever; it withdraws the bind
/// as before, the two positions in doubt at both sites and only those.
#[tokio::test(start_paused = true)]
async fn an_unreachable_peer_falls_back_to_withdrawing_the_positions_in_doubt() {
    let mut cluster = Cluster::with_pools(POOLS).await;
    let ready = filled(&cluster).await;
    unanswered_bind(&cluster, &ready).await;
    cluster
        .link("A", "B")
        .set(Call::Reconcile, Fault::FailBefore);
    let started = Instant::now();
    cluster.restart("A").await;
    assert!(started.elapsed() <= 5 * TIMEOUT, "{:?}", started.elapsed());
    let (a, b) = (cluster.site("A"), cluster.site("B"));
    let rest: BTreeSet<Slot> = ready.iter().skip(2).copied().collect();
    assert_eq!(slots(&a.store, "A>B").await, rest);
    eventually("B's positions in doubt withdrawn", SETTLE, || async {
        slots(&b.store, "A>B").await == rest
    })
    .await;
}
