//! What only the PostgreSQL store needs: the KEK check, encryption at rest in the table,
//! exactly-once delivery and binding across replicas, IDs unique across keys and ready keys,
//! racing and upgrading migrations, and cross-replica counts.

// Test helpers: an unwrap here is a failed assertion, not a crash on a request path.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestDb;
use dqkd_store::{
    Kek, KeyMaterial, KeyStore, NewKey, PoolGrant, PoolKey, StoreError, TakeError, Uuid,
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

fn ready(bytes: Vec<u8>, expires_at: u64) -> PoolKey {
    PoolKey {
        id: Uuid::new_v4(),
        material: KeyMaterial::new(bytes),
        expires_at,
    }
}

fn grant(ids: &[Uuid], slaves: &[&str]) -> PoolGrant {
    PoolGrant {
        ids: ids.to_vec(),
        master: "alice".into(),
        slaves: slaves.iter().map(|s| s.to_string()).collect(),
        expires_at: u64::MAX,
    }
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
        ready(secret.clone(), u64::MAX),
        ready(secret.clone(), 5_000),
    );
    let (ia, ib) = (a.id, b.id);
    store.pool_insert("A>B", vec![a, b]).await.unwrap();
    // u64::MAX is stored clamped in the column, yet listed exactly.
    assert_eq!(
        store.pool_list("A>B").await.unwrap(),
        vec![(ib, 5_000), (ia, u64::MAX)]
    );

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
            &[&ia],
        )
        .await
        .unwrap();
    let r = store
        .pool_bind("C>B", vec![grant(&[ia], &["bob"])], 0)
        .await;
    assert!(
        matches!(r, Err(TakeError::Store(StoreError::Crypto { .. }))),
        "{r:?}"
    );
    assert_eq!(store.pool_list("C>B").await.unwrap(), vec![(ia, u64::MAX)]);
    assert_eq!(store.pending("alice", "bob"), 0);

    let got = store
        .pool_bind("A>B", vec![grant(&[ib], &["bob"])], 0)
        .await
        .unwrap();
    assert_eq!(got[0].material.as_bytes(), secret.as_slice());
    let got = store.take("bob", &alice(), &[ib], 0).await.unwrap();
    assert_eq!(got[0].material.as_bytes(), secret.as_slice());
}

/// No unique index spans the keys and the ready keys, yet an insert and a pool insert of the
/// same ID racing on two replicas never both succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_insert_and_pool_insert_of_one_id_store_it_once() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let a: Arc<dyn KeyStore> = Arc::new(connect(&db, 4).await);
    let b: Arc<dyn KeyStore> = Arc::new(connect(&db, 4).await);
    let rounds = 100;
    for round in 0..rounds {
        let plain: Vec<NewKey> = (0..4)
            .map(|_| key("alice", &["bob"], vec![1; 32]))
            .collect();
        let pooled: Vec<PoolKey> = plain
            .iter()
            .map(|k| PoolKey {
                id: k.id,
                material: KeyMaterial::new(vec![2; 32]),
                expires_at: u64::MAX,
            })
            .collect();
        let (one, two) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let (s1, s2) = (Arc::clone(one), Arc::clone(two));
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let (b1, b2) = (Arc::clone(&barrier), barrier);
        let inserted = tokio::spawn(async move {
            b1.wait().await;
            s1.insert(plain).await
        });
        let pooled = tokio::spawn(async move {
            b2.wait().await;
            s2.pool_insert("A>B", pooled).await
        });
        let (inserted, pooled) = (inserted.await.unwrap(), pooled.await.unwrap());
        match (&inserted, &pooled) {
            (Ok(()), Err(StoreError::DuplicateId { .. }))
            | (Err(StoreError::DuplicateId { .. }), Ok(())) => {}
            other => panic!("round {round}: {other:?}"),
        }
    }
    let client = db.client().await;
    let keys: i64 = client
        .query_one("SELECT count(*) FROM dqkd_keys", &[])
        .await
        .unwrap()
        .get(0);
    let ready: i64 = client
        .query_one("SELECT count(*) FROM dqkd_pool_keys", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(keys + ready, 4 * rounds);
    let both: i64 = client
        .query_one(
            "SELECT count(*) FROM dqkd_keys JOIN dqkd_pool_keys USING (id)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(both, 0);
    let placeholders: i64 = client
        .query_one("SELECT count(*) FROM dqkd_keys WHERE master = ''", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(placeholders, 0);
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
    for _round in 0..10 {
        let keys: Vec<PoolKey> = (0..8).map(|i| ready(vec![i; 32], u64::MAX)).collect();
        let ids: Vec<Uuid> = keys.iter().map(|k| k.id).collect();
        a.pool_insert("A>B", keys).await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..8 {
            let store = Arc::clone(if t % 2 == 0 { &a } else { &b });
            let mut mine = ids.clone();
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
        a.take("bob", &alice(), &ids, 0).await.unwrap();
    }
}

/// A destroy racing a bind of the same ready key leaves nothing to deliver, whichever
/// commits first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn destroy_racing_a_bind_leaves_no_key() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let a = Arc::new(connect(&db, 4).await);
    let b = Arc::new(connect(&db, 4).await);
    for round in 0..50 {
        let k = ready(vec![3; 32], u64::MAX);
        let id = k.id;
        a.pool_insert("A>B", vec![k]).await.unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let (b1, b2) = (Arc::clone(&barrier), barrier);
        let (s1, s2) = (Arc::clone(&a), Arc::clone(&b));
        let bind = tokio::spawn(async move {
            b1.wait().await;
            s1.pool_bind("A>B", vec![grant(&[id], &["bob"])], 0).await
        });
        let destroy = tokio::spawn(async move {
            b2.wait().await;
            s2.destroy(&[id]).await
        });
        let bound = bind.await.unwrap();
        assert_eq!(destroy.await.unwrap().unwrap(), 1, "round {round}");
        assert!(
            matches!(bound, Ok(_) | Err(TakeError::NotFound)),
            "round {round}: {bound:?}"
        );
        let r = a.take("bob", &alice(), &[id], 0).await;
        assert!(
            matches!(r, Err(TakeError::NotFound)),
            "round {round}: {r:?}"
        );
    }
    a.refresh_pending().await.unwrap();
    assert_eq!(a.pending("alice", "bob"), 0);
}

/// A database of schema version 1 (keys only) gains the pool table at connect and keeps
/// its keys.
#[tokio::test]
async fn version_1_database_is_migrated() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let store = connect(&db, 1).await;
    let k = key("alice", &["bob"], vec![4; 32]);
    let id = k.id;
    store.insert(vec![k]).await.unwrap();
    drop(store);
    db.client()
        .await
        .batch_execute(
            "DROP TABLE dqkd_pool_keys; DELETE FROM dqkd_schema_migrations WHERE version > 1",
        )
        .await
        .unwrap();
    let store = connect(&db, 1).await;
    let versions: Vec<i32> = db
        .client()
        .await
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
    let r = ready(vec![5; 32], u64::MAX);
    let ir = r.id;
    store.pool_insert("A>B", vec![r]).await.unwrap();
    assert_eq!(store.pool_list("A>B").await.unwrap(), vec![(ir, u64::MAX)]);
    let got = store.take("bob", &alice(), &[id], 0).await.unwrap();
    assert_eq!(got[0].material.as_bytes(), &[4; 32]);
}
