//! What only the PostgreSQL store needs: the KEK check, encryption at rest in the table,
//! exactly-once delivery, binding and pool positions across replicas, positions beyond the
//! `bigint` range, racing and upgrading migrations, and cross-replica counts.

// Test helpers: an unwrap here is a failed assertion, not a crash on a request path.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestDb;
use dqkd_store::{
    Kek, KeyMaterial, KeyStore, NewKey, PoolGrant, PoolKey, ReadyKey, Slot, StoreError, TakeError,
    Uuid,
};
use dqkd_store_postgres::{Options, PostgresStore, SCHEMA_VERSION};

fn key(master: &str, slaves: &[&str], bytes: Vec<u8>) -> NewKey {
    NewKey {
        id: Uuid::new_v4(),
        master: master.into(),
        slaves: slaves.iter().map(|s| s.to_string()).collect(),
        material: KeyMaterial::new(bytes),
        expires_at: u64::MAX,
    }
}

fn alice() -> Vec<String> {
    vec!["alice".to_string()]
}

async fn connect(db: &TestDb, pool: usize) -> PostgresStore {
    PostgresStore::connect(&db.url, common::kek(), pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn wrong_kek_is_refused_at_connect() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let first = connect(&db, 2).await;
    drop(first);
    let err = PostgresStore::connect(&db.url, Kek::from_bytes([0x77; 32]), 2)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::WrongKekDatabase { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("different key-encryption key"), "{text}");
    assert!(
        text.contains(&db.url[db.url.rfind('/').unwrap() + 1..]),
        "{text}"
    );
    // The right KEK still opens it.
    connect(&db, 2).await;
}

#[tokio::test]
async fn no_plaintext_key_bytes_in_the_database() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let store = connect(&db, 2).await;
    let secret: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let k = key("alice", &["bob", "carol"], secret.clone());
    let id = k.id;
    store.insert(vec![k]).await.unwrap();
    // After one delivery the rewritten record must still hold only ciphertext.
    store.take("bob", &alice(), &[id], 0).await.unwrap();

    let client = db.client().await;
    let rows = client
        .query("SELECT id, master, remaining, record FROM dqkd_keys", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let row_id: Uuid = rows[0].get(0);
    let master: String = rows[0].get(1);
    let remaining: Vec<String> = rows[0].get(2);
    let record: Vec<u8> = rows[0].get(3);
    assert_eq!((row_id, master.as_str()), (id, "alice"));
    assert_eq!(remaining, vec!["carol".to_string()]);
    for window in [8usize, 16, 32] {
        for chunk in secret.windows(window) {
            assert!(
                !record.windows(window).any(|w| w == chunk),
                "{window} key bytes found in clear"
            );
        }
    }
    // Nothing anywhere else in the schema holds it either.
    let dump: Vec<u8> = client
        .query_one(
            "SELECT convert_to(string_agg(t::text, '|'), 'UTF8') FROM dqkd_meta t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!dump.windows(16).any(|w| secret.windows(16).any(|c| c == w)));

    let got = store.take("carol", &alice(), &[id], 0).await.unwrap();
    assert_eq!(got[0].material.as_bytes(), secret.as_slice());
}

/// Two replicas (two stores, two pools of 8) on one database; 32 concurrent takers per key,
/// half on each replica: exactly one succeeds per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_takes_across_two_replicas_deliver_each_key_once() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let a: Arc<dyn KeyStore> = Arc::new(connect(&db, 8).await);
    let b: Arc<dyn KeyStore> = Arc::new(connect(&db, 8).await);
    let keys: Vec<NewKey> = (0..20u8)
        .map(|i| key("alice", &["bob"], vec![i; 32]))
        .collect();
    let ids: Vec<Uuid> = keys.iter().map(|k| k.id).collect();
    a.insert(keys).await.unwrap();

    let takers = 32;
    let barrier = Arc::new(tokio::sync::Barrier::new(takers * ids.len()));
    let mut tasks = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        for t in 0..takers {
            let store = Arc::clone(if t % 2 == 0 { &a } else { &b });
            let barrier = Arc::clone(&barrier);
            let id = *id;
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                (n, store.take("bob", &alice(), &[id], 0).await)
            }));
        }
    }
    let mut wins = vec![0; ids.len()];
    for t in tasks {
        let (n, r) = t.await.unwrap();
        match r {
            Ok(got) => {
                assert_eq!(got[0].material.as_bytes(), &[n as u8; 32]);
                wins[n] += 1;
            }
            Err(TakeError::NotFound) => {}
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    assert_eq!(wins, vec![1; ids.len()]);
    let left: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM dqkd_keys", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

/// Multi-key takes of the same keys in opposite orders by two slaves, concurrently, must all
/// succeed: rows are locked in ID order, so they never deadlock (a deadlock would surface as
/// a server error, SQLSTATE 40P01, from one of the takes).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_multi_key_takes_do_not_deadlock() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let store: Arc<dyn KeyStore> = Arc::new(connect(&db, 8).await);
    for _round in 0..10 {
        let keys: Vec<NewKey> = (0..8)
            .map(|_| key("alice", &["bob", "carol"], vec![1; 32]))
            .collect();
        let ids: Vec<Uuid> = keys.iter().map(|k| k.id).collect();
        store.insert(keys).await.unwrap();
        let mut reversed = ids.clone();
        reversed.reverse();
        let (s1, s2) = (Arc::clone(&store), Arc::clone(&store));
        let bob = tokio::spawn(async move { s1.take("bob", &alice(), &ids, 0).await });
        let carol = tokio::spawn(async move { s2.take("carol", &alice(), &reversed, 0).await });
        assert_eq!(bob.await.unwrap().unwrap().len(), 8);
        assert_eq!(carol.await.unwrap().unwrap().len(), 8);
    }
    assert_eq!(store.pending("alice", "bob"), 0);
    assert_eq!(store.pending("alice", "carol"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_connects_on_a_fresh_database_migrate_once() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let (one, two) = tokio::join!(
        PostgresStore::connect(&db.url, common::kek(), 2),
        PostgresStore::connect(&db.url, common::kek(), 2),
    );
    let (one, two) = (one.unwrap(), two.unwrap());
    let client = db.client().await;
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM dqkd_schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    let checks: i64 = client
        .query_one(
            "SELECT count(*) FROM dqkd_meta WHERE name = 'kek_check'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(checks, 1);
    // Both work on the shared schema.
    let k = key("alice", &["bob"], vec![3; 32]);
    let id = k.id;
    one.insert(vec![k]).await.unwrap();
    two.take("bob", &alice(), &[id], 0).await.unwrap();
    // Many more racing connects on the now-migrated database change nothing.
    let more: Vec<_> = (0..6)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move { PostgresStore::connect(&url, common::kek(), 1).await })
        })
        .collect();
    for m in more {
        m.await.unwrap().unwrap();
    }
    let rows: i64 = client
        .query_one("SELECT count(*) FROM dqkd_schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, i64::from(SCHEMA_VERSION));
}

#[tokio::test]
async fn newer_schema_is_refused() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    drop(connect(&db, 1).await);
    db.client()
        .await
        .execute(
            "INSERT INTO dqkd_schema_migrations (version) VALUES ($1)",
            &[&(SCHEMA_VERSION + 1)],
        )
        .await
        .unwrap();
    let err = PostgresStore::connect(&db.url, common::kek(), 1)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Schema { .. }), "{err:?}");
    assert!(err.to_string().contains("newer"), "{err}");
}

/// Counts of another replica's writes arrive with the refresh; this replica's own writes
/// during a refresh are neither lost nor counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pending_counts_follow_other_replicas() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let fast = Options::new(4).refresh(Duration::from_millis(50));
    let a = Arc::new(
        PostgresStore::connect_with(&db.url, common::kek(), fast)
            .await
            .unwrap(),
    );
    let b = connect(&db, 4).await;
    let keys: Vec<NewKey> = (0..5)
        .map(|_| key("alice", &["bob"], vec![1; 32]))
        .collect();
    let ids: Vec<Uuid> = keys.iter().map(|k| k.id).collect();
    b.insert(keys).await.unwrap();
    assert_eq!(b.pending("alice", "bob"), 5);
    // `a` learns of them from its background refresh.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while a.pending("alice", "bob") != 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "refresh never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    b.take("bob", &alice(), &ids[..2], 0).await.unwrap();
    a.refresh_pending().await.unwrap();
    assert_eq!(a.pending("alice", "bob"), 3);

    // `a` writes continuously while its refreshes run every 50 ms: after every own write the
    // count is exact, never a refresh's stale or doubled view.
    let mut expected = 3;
    for i in 0..60 {
        let k = key("alice", &["bob"], vec![2; 32]);
        let id = k.id;
        a.insert(vec![k]).await.unwrap();
        expected += 1;
        assert_eq!(a.pending("alice", "bob"), expected, "after insert {i}");
        if i % 2 == 0 {
            a.take("bob", &alice(), &[id], 0).await.unwrap();
            expected -= 1;
            assert_eq!(a.pending("alice", "bob"), expected, "after take {i}");
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    b.refresh_pending().await.unwrap();
    assert_eq!(b.pending("alice", "bob"), expected);
}

#[tokio::test]
async fn connect_errors_name_the_database_but_not_the_password() {
    if std::env::var(common::ENV).is_err() {
        common::skipped();
        return;
    }
    // Nothing listens on port 1.
    let err = PostgresStore::connect(
        "postgres://dqkd:hunter2@127.0.0.1:1/keys?connect_timeout=2",
        common::kek(),
        1,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::Database { .. }), "{err:?}");
    let text = format!("{err} {err:?}");
    assert!(!text.contains("hunter2"), "{text}");
    let err = PostgresStore::connect("postgres://[bad", common::kek(), 1)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Database { .. }), "{err:?}");
}

fn ready(seq: u64, bytes: Vec<u8>, expires_at: u64) -> PoolKey {
    PoolKey {
        slot: Slot {
            seq,
            id: Uuid::new_v4(),
        },
        material: KeyMaterial::new(bytes),
        expires_at,
    }
}

fn grant(slots: &[Slot], slaves: &[&str]) -> PoolGrant {
    PoolGrant {
        slots: slots.to_vec(),
        master: "alice".into(),
        slaves: slaves.iter().map(|s| s.to_string()).collect(),
        expires_at: u64::MAX,
    }
}

fn listed(k: &PoolKey) -> ReadyKey {
    ReadyKey {
        slot: k.slot,
        expires_at: k.expires_at,
    }
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client().await.query_one(sql, &[]).await.unwrap().get(0)
}

/// Ready keys are sealed under the KEK with their link bound in: the table holds no key
/// bytes, and a row moved to another pool in SQL is refused rather than bound.
#[tokio::test]
async fn ready_keys_are_sealed_to_their_link() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let store = connect(&db, 2).await;
    let secret: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(29).wrapping_add(7))
        .collect();
    let (a, b) = (
        ready(20, secret.clone(), u64::MAX),
        ready(10, secret.clone(), 5_000),
    );
    let (sa, sb) = (a.slot, b.slot);
    let listing = vec![listed(&b), listed(&a)];
    store.pool_insert("A>B", vec![a, b]).await.unwrap();
    // Listed in position order; u64::MAX is stored clamped in the column, yet listed exactly.
    assert_eq!(store.pool_list("A>B").await.unwrap(), listing);

    let client = db.client().await;
    for row in client
        .query("SELECT link, record FROM dqkd_pool_keys", &[])
        .await
        .unwrap()
    {
        assert_eq!(row.get::<_, String>(0), "A>B");
        let record: Vec<u8> = row.get(1);
        for chunk in secret.windows(8) {
            assert!(!record.windows(8).any(|w| w == chunk), "key bytes in clear");
        }
    }

    client
        .execute(
            "UPDATE dqkd_pool_keys SET link = 'C>B' WHERE id = $1",
            &[&sa.id],
        )
        .await
        .unwrap();
    let r = store
        .pool_bind("C>B", vec![grant(&[sa], &["bob"])], 0)
        .await;
    assert!(
        matches!(r, Err(TakeError::Store(StoreError::Crypto { .. }))),
        "{r:?}"
    );
    assert_eq!(store.pool_list("C>B").await.unwrap(), vec![listing[1]]);
    assert_eq!(store.pending("alice", "bob"), 0);

    let got = store
        .pool_bind("A>B", vec![grant(&[sb], &["bob"])], 0)
        .await
        .unwrap();
    assert_eq!(got[0].material.as_bytes(), secret.as_slice());
    let got = store.take("bob", &alice(), &[sb.id], 0).await.unwrap();
    assert_eq!(got[0].material.as_bytes(), secret.as_slice());
}

/// Positions are stored as `bigint`: one above `i64::MAX` is refused as invalid rather than
/// wrapped into a negative (and misordered) one, can never be bound, and is skipped by a
/// removal; `i64::MAX` itself round-trips.
#[tokio::test]
async fn positions_beyond_bigint_are_refused_not_wrapped() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let store = connect(&db, 2).await;
    let top = ready(i64::MAX as u64, vec![1; 32], u64::MAX);
    let beyond = ready(i64::MAX as u64 + 1, vec![2; 32], u64::MAX);
    let beyond_slot = beyond.slot;
    let r = store.pool_insert("A>B", vec![top.clone(), beyond]).await;
    assert!(
        matches!(r, Err(StoreError::InvalidKey { id, .. }) if id == beyond_slot.id),
        "{r:?}"
    );
    assert!(store.pool_list("A>B").await.unwrap().is_empty());
    store.pool_insert("A>B", vec![top.clone()]).await.unwrap();
    assert_eq!(store.pool_list("A>B").await.unwrap(), vec![listed(&top)]);
    let r = store
        .pool_bind("A>B", vec![grant(&[top.slot, beyond_slot], &["bob"])], 0)
        .await;
    assert!(matches!(r, Err(TakeError::NotFound)), "{r:?}");
    assert_eq!(
        store
            .pool_remove("A>B", &[beyond_slot.seq, u64::MAX])
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .pool_remove("A>B", &[top.slot.seq, beyond_slot.seq])
            .await
            .unwrap(),
        1
    );
    assert!(store.pool_list("A>B").await.unwrap().is_empty());
}

/// A pool insert finds IDs stored as ordinary keys and positions taken in that pool, all or
/// nothing; positions are per link, and (IDs being random) pools are not searched by ID.
#[tokio::test]
async fn pool_insert_checks_positions_per_link_and_ids_among_keys() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let store = connect(&db, 2).await;
    let k = key("alice", &["bob"], vec![1; 32]);
    let known = k.id;
    store.insert(vec![k]).await.unwrap();
    let first = ready(1, vec![2; 32], u64::MAX);
    let mut clash = ready(2, vec![3; 32], u64::MAX);
    clash.slot.id = known;
    let r = store.pool_insert("A>B", vec![first.clone(), clash]).await;
    assert!(
        matches!(r, Err(StoreError::DuplicateId { id }) if id == known),
        "{r:?}"
    );
    assert!(store.pool_list("A>B").await.unwrap().is_empty());

    store.pool_insert("A>B", vec![first.clone()]).await.unwrap();
    let taken = ready(1, vec![4; 32], u64::MAX);
    let r = store.pool_insert("A>B", vec![taken.clone()]).await;
    assert!(
        matches!(r, Err(StoreError::DuplicateId { id }) if id == taken.slot.id),
        "{r:?}"
    );
    // The same position, and even the same ID, in another link's pool is another key.
    let mut elsewhere = first.clone();
    elsewhere.slot.seq = 7;
    store
        .pool_insert("C>B", vec![ready(1, vec![5; 32], u64::MAX), elsewhere])
        .await
        .unwrap();
    assert_eq!(store.pool_list("A>B").await.unwrap(), vec![listed(&first)]);
    assert_eq!(store.pool_list("C>B").await.unwrap().len(), 2);
    assert_eq!(count(&db, "SELECT count(*) FROM dqkd_keys").await, 1);
}

/// Two replicas insert batches covering the same positions in opposite orders: never a
/// deadlock (rows are written in position order), and exactly one batch is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_pool_inserts_of_one_position_store_it_once() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let a: Arc<dyn KeyStore> = Arc::new(connect(&db, 4).await);
    let b: Arc<dyn KeyStore> = Arc::new(connect(&db, 4).await);
    let rounds: u64 = 100;
    for round in 0..rounds {
        let seqs: Vec<u64> = (0..8).map(|i| round * 8 + i).collect();
        let mine: Vec<PoolKey> = seqs
            .iter()
            .map(|s| ready(*s, vec![1; 32], u64::MAX))
            .collect();
        let theirs: Vec<PoolKey> = seqs
            .iter()
            .rev()
            .map(|s| ready(*s, vec![2; 32], u64::MAX))
            .collect();
        let (one, two) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let (s1, s2) = (Arc::clone(one), Arc::clone(two));
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let (b1, b2) = (Arc::clone(&barrier), barrier);
        let first = tokio::spawn(async move {
            b1.wait().await;
            s1.pool_insert("A>B", mine).await
        });
        let second = tokio::spawn(async move {
            b2.wait().await;
            s2.pool_insert("A>B", theirs).await
        });
        let (first, second) = (first.await.unwrap(), second.await.unwrap());
        match (&first, &second) {
            (Ok(()), Err(StoreError::DuplicateId { .. }))
            | (Err(StoreError::DuplicateId { .. }), Ok(())) => {}
            other => panic!("round {round}: {other:?}"),
        }
    }
    let listing = a.pool_list("A>B").await.unwrap();
    let positions: Vec<u64> = listing.iter().map(|r| r.slot.seq).collect();
    assert_eq!(positions, (0..rounds * 8).collect::<Vec<_>>());
}

/// Binds of overlapping sets of ready keys in opposite orders on two replicas: never a
/// deadlock, and each key bound once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_pool_binds_across_replicas_bind_each_key_once() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let a: Arc<dyn KeyStore> = Arc::new(connect(&db, 8).await);
    let b: Arc<dyn KeyStore> = Arc::new(connect(&db, 8).await);
    for round in 0..10u64 {
        let keys: Vec<PoolKey> = (0..8u8)
            .map(|i| ready(round * 8 + u64::from(i), vec![i; 32], u64::MAX))
            .collect();
        let slots: Vec<Slot> = keys.iter().map(|k| k.slot).collect();
        a.pool_insert("A>B", keys).await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..8 {
            let store = Arc::clone(if t % 2 == 0 { &a } else { &b });
            let mut mine = slots.clone();
            if t % 2 == 1 {
                mine.reverse();
            }
            tasks.push(tokio::spawn(async move {
                store
                    .pool_bind("A>B", vec![grant(&mine, &["bob"])], 0)
                    .await
            }));
        }
        let mut won = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(got) => {
                    assert_eq!(got.len(), 8);
                    won += 1;
                }
                Err(TakeError::NotFound) => {}
                Err(e) => panic!("unexpected error {e:?}"),
            }
        }
        assert_eq!(won, 1);
        assert!(a.pool_list("A>B").await.unwrap().is_empty());
        let ids: Vec<Uuid> = slots.iter().map(|s| s.id).collect();
        a.take("bob", &alice(), &ids, 0).await.unwrap();
    }
}

/// A removal racing a bind of the same ready keys (in the opposite order, on another
/// replica): exactly one of them gets the keys, and a lost bind leaves nothing to deliver.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pool_remove_racing_a_bind_exactly_one_wins() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let a = Arc::new(connect(&db, 4).await);
    let b = Arc::new(connect(&db, 4).await);
    let (mut bound, mut removed) = (0, 0);
    for round in 0..50u64 {
        let keys: Vec<PoolKey> = (0..4)
            .map(|i| ready(round * 4 + i, vec![3; 32], u64::MAX))
            .collect();
        let slots: Vec<Slot> = keys.iter().map(|k| k.slot).collect();
        let seqs: Vec<u64> = slots.iter().rev().map(|s| s.seq).collect();
        a.pool_insert("A>B", keys).await.unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let (b1, b2) = (Arc::clone(&barrier), barrier);
        let (s1, s2) = (Arc::clone(&a), Arc::clone(&b));
        let to_bind = slots.clone();
        let bind = tokio::spawn(async move {
            b1.wait().await;
            s1.pool_bind("A>B", vec![grant(&to_bind, &["bob"])], 0)
                .await
        });
        let remove = tokio::spawn(async move {
            b2.wait().await;
            s2.pool_remove("A>B", &seqs).await
        });
        let (bind, remove) = (bind.await.unwrap(), remove.await.unwrap().unwrap());
        let ids: Vec<Uuid> = slots.iter().map(|s| s.id).collect();
        match (&bind, remove) {
            (Ok(got), 0) => {
                assert_eq!(got.len(), 4, "round {round}");
                a.take("bob", &alice(), &ids, 0).await.unwrap();
                bound += 1;
            }
            (Err(TakeError::NotFound), 4) => {
                let r = a.take("bob", &alice(), &ids, 0).await;
                assert!(
                    matches!(r, Err(TakeError::NotFound)),
                    "round {round}: {r:?}"
                );
                removed += 1;
            }
            other => panic!("round {round}: {other:?}"),
        }
        assert!(a.pool_list("A>B").await.unwrap().is_empty());
    }
    assert_eq!(bound + removed, 50);
    a.refresh_pending().await.unwrap();
    assert_eq!(a.pending("alice", "bob"), 0);
}

/// Asks for the claim until the store answers (a claim on a connection that was just cut
/// fails once, and the next one opens a new connection).
async fn settled_claim(store: &PostgresStore, link: &str) -> bool {
    for _ in 0..50 {
        match store.claim_pool(link).await {
            Ok(held) => return held,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("claiming {link} kept failing");
}

/// One process at a time keeps a pool: a second replica's claim waits until the first lets
/// go (here, by closing its store), pools are claimed one by one, and a claim survives the
/// loss of the connection that held it when nobody else took the pool meanwhile.
#[tokio::test]
async fn one_replica_at_a_time_claims_a_pool() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let first = connect(&db, 2).await;
    let second = connect(&db, 2).await;
    assert!(first.claim_pool("A>B@r1").await.unwrap());
    assert!(first.claim_pool("A>B@r1").await.unwrap(), "held already");
    assert!(!second.claim_pool("A>B@r1").await.unwrap());
    assert!(second.claim_pool("A>B@r2").await.unwrap(), "another pool");
    assert!(!first.claim_pool("A>B@r2").await.unwrap());

    // Both claim connections die: every pool is free, and the next claim takes it again on
    // a new connection (never on the word of the dead one).
    let killed = db
        .client()
        .await
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE starts_with(application_name, $1) AND datname = current_database()",
            &[&dqkd_store_postgres::CLAIM_APPLICATION_NAME],
        )
        .await
        .unwrap();
    assert_eq!(killed, 2, "one claim connection per store");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while count(
        &db,
        "SELECT count(*) FROM pg_stat_activity WHERE starts_with(application_name, 'dqkd pool claims') \
         AND datname = current_database()",
    )
    .await
        > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "claim connections linger"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(settled_claim(&first, "A>B@r2").await, "taken over");
    assert!(!settled_claim(&second, "A>B@r2").await);
    assert!(settled_claim(&second, "A>B@r1").await, "taken over");

    drop(second);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !first.claim_pool("A>B@r1").await.unwrap() {
        assert!(std::time::Instant::now() < deadline, "never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A claim connection that stops answering without closing (a half-open TCP connection)
/// holds no claim this process can count on: the claim fails after its timeout, and a new
/// connection finds the pool still held by the silent session, not by this process.
#[tokio::test]
async fn a_silent_claim_connection_is_not_trusted() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let proxy = common::FreezingProxy::start(&db.url).await;
    let first = PostgresStore::connect(&proxy.url, common::kek(), 1)
        .await
        .unwrap();
    let second = connect(&db, 1).await;
    assert!(first.claim_pool("A>B").await.unwrap());
    proxy.freeze_open_connections();
    let started = std::time::Instant::now();
    assert!(
        first.claim_pool("A>B").await.is_err(),
        "a silent connection"
    );
    assert!(started.elapsed() >= dqkd_store_postgres::CLAIM_TIMEOUT);
    assert!(
        !first.claim_pool("A>B").await.unwrap(),
        "the silent session holds it"
    );
    assert!(!second.claim_pool("A>B").await.unwrap());
    // The silent session ends: the pool is free again.
    proxy.close_frozen_connections();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !settled_claim(&second, "A>B").await {
        assert!(std::time::Instant::now() < deadline, "never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stores one key for alice→bob (bytes `byte`), then takes the schema back to just after
/// migration 1 (keys only), as an older release left it; returns the key's ID.
async fn key_in_version_1_database(db: &TestDb, byte: u8) -> Uuid {
    let store = connect(db, 1).await;
    let k = key("alice", &["bob"], vec![byte; 32]);
    let id = k.id;
    store.insert(vec![k]).await.unwrap();
    drop(store);
    db.client()
        .await
        .batch_execute(
            "DROP TABLE dqkd_pool_keys; DROP TABLE dqkd_in_flight; \
             DELETE FROM dqkd_schema_migrations WHERE version > 1",
        )
        .await
        .unwrap();
    id
}

/// A database of schema version 1 (keys only) gains the pool table at connect and keeps
/// its keys.
#[tokio::test]
async fn version_1_database_is_migrated() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let id = key_in_version_1_database(&db, 4).await;
    let store = connect(&db, 1).await;
    assert_eq!(
        versions(&db).await,
        (1..=SCHEMA_VERSION).collect::<Vec<_>>()
    );
    let r = ready(1, vec![5; 32], u64::MAX);
    let listing = vec![listed(&r)];
    store.pool_insert("A>B", vec![r]).await.unwrap();
    assert_eq!(store.pool_list("A>B").await.unwrap(), listing);
    let got = store.take("bob", &alice(), &[id], 0).await.unwrap();
    assert_eq!(got[0].material.as_bytes(), &[4; 32]);
}

/// A database of schema version 2 (ready keys found by ID) gains pool positions at connect:
/// its ready keys, which have none, are dropped; its keys are kept.
#[tokio::test]
async fn version_2_database_is_migrated_dropping_ready_keys() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let id = key_in_version_1_database(&db, 6).await;
    let client = db.client().await;
    client
        .batch_execute(include_str!("../migrations/0002_pool.sql"))
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO dqkd_schema_migrations (version, applied_at) VALUES (2, now())",
            &[],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO dqkd_pool_keys (id, link, expires_at, record) \
             VALUES ($1, 'A>B', 100, '\\x00')",
            &[&Uuid::new_v4()],
        )
        .await
        .unwrap();
    let store = connect(&db, 1).await;
    assert_eq!(
        versions(&db).await,
        (1..=SCHEMA_VERSION).collect::<Vec<_>>()
    );
    assert_eq!(count(&db, "SELECT count(*) FROM dqkd_pool_keys").await, 0);
    assert!(store.pool_list("A>B").await.unwrap().is_empty());
    let r = ready(1, vec![7; 32], u64::MAX);
    let slot = r.slot;
    store.pool_insert("A>B", vec![r]).await.unwrap();
    store
        .pool_bind("A>B", vec![grant(&[slot], &["bob"])], 0)
        .await
        .unwrap();
    let got = store
        .take("bob", &alice(), &[id, slot.id], 0)
        .await
        .unwrap();
    assert_eq!(got[0].material.as_bytes(), &[6; 32]);
    assert_eq!(got[1].material.as_bytes(), &[7; 32]);
}

async fn versions(db: &TestDb) -> Vec<i32> {
    db.client()
        .await
        .query(
            "SELECT version FROM dqkd_schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}
