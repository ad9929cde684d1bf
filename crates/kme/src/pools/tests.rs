use super::*;

fn pools(target: u64, low_water: u64) -> Pools {
    let settings = PoolSettings {
        target,
        low_water,
        ..PoolSettings::default()
    };
    Pools::new("A", None, settings, 32, &["B".to_owned()])
}

fn fill(p: &Pools, n: usize, expires_at: u64) -> Vec<Slot> {
    let pool = &p.links["B"];
    let first = pool.reserve(n);
    let slots: Vec<Slot> = (0..n as u64)
        .map(|i| Slot {
            seq: first + i,
            id: Uuid::new_v4(),
        })
        .collect();
    pool.push(slots.clone(), expires_at);
    slots
}

#[test]
fn takes_all_or_none_in_order() {
    let p = pools(10, 2);
    let ready = fill(&p, 5, 10_000);
    assert_eq!(p.take("B", 6, 32, 0), None, "not enough: on demand");
    assert_eq!(p.level("B"), Some((5, 10)));
    let got = p.take("B", 3, 32, 0).expect("enough");
    assert_eq!(got, ready[..3]);
    assert_eq!(p.level("B"), Some((2, 10)));
    assert_eq!(
        p.take("B", 1, 16, 0),
        None,
        "other sizes are made on demand"
    );
    assert_eq!(
        p.take("C", 1, 32, 0),
        None,
        "no pool toward an unknown site"
    );
    assert_eq!(p.discard("B"), ready[3..]);
    assert_eq!(p.level("B"), Some((0, 10)));
}

#[test]
fn keys_near_expiry_are_dropped() {
    let p = pools(10, 2);
    fill(&p, 3, 1_000);
    let later = fill(&p, 2, 5_000);
    assert_eq!(
        p.take("B", 1, 32, 1_000 - EXPIRY_MARGIN_SECS),
        Some(later[..1].to_vec())
    );
    assert_eq!(
        p.level("B"),
        Some((1, 10)),
        "three expiring keys were dropped"
    );
}

#[test]
fn takes_across_fills_keep_expiries_aligned() {
    let p = pools(10, 2);
    let first = fill(&p, 3, 1_000);
    let second = fill(&p, 3, 5_000);
    assert_eq!(
        p.take("B", 4, 32, 0),
        Some([&first[..], &second[..1]].concat())
    );
    // The remaining two belong to the second fill: they survive the first's expiry.
    assert_eq!(p.take("B", 2, 32, 2_000), Some(second[1..].to_vec()));
}

#[test]
fn positions_come_back_as_stored() {
    let p = pools(10, 2);
    let pool = &p.links["B"];
    let slots: Vec<Slot> = [3, 4, 9, 10, 11]
        .map(|seq| Slot {
            seq,
            id: Uuid::new_v4(),
        })
        .into();
    pool.push(slots[..4].iter().copied(), 7_000);
    pool.push(slots[4..].iter().copied(), 8_000);
    assert_eq!(p.take("B", 3, 32, 0), Some(slots[..3].to_vec()));
    assert_eq!(p.discard("B"), slots[3..]);
    assert!(pool.reserve(1) > 11, "after every position held");
}

#[test]
fn positions_never_repeat() {
    let p = pools(10, 2);
    let pool = &p.links["B"];
    let a = pool.reserve(5);
    let b = pool.reserve(5);
    assert!(b >= a + 5, "{a} then {b}");
    assert!(
        a >= unix_nanos() - 60_000_000_000,
        "positions start at the clock"
    );
    // A pool loaded with a position from the future continues after it.
    pool.push(
        [Slot {
            seq: u64::MAX / 2,
            id: Uuid::new_v4(),
        }],
        9,
    );
    assert_eq!(pool.reserve(1), u64::MAX / 2 + 1);
}

#[test]
fn each_replica_has_a_pool_name_of_its_own() {
    let r = |s: &str| s.parse::<Name>().expect("name");
    let names = [
        link_name("A", "B", None),
        link_name("A", "B", Some(&r("r1"))),
        link_name("A", "B", Some(&r("r2"))),
        link_name("B", "A", Some(&r("r1"))),
    ];
    for (i, a) in names.iter().enumerate() {
        for b in &names[i + 1..] {
            assert_ne!(a, b);
        }
    }
    assert_eq!(names[1], "A>B@r1");
    // What once had to be refused here cannot be a Name at all.
    for bad in ["", "r1@x", "r1>B", "a b", &"r".repeat(65)] {
        assert!(bad.parse::<Name>().is_err(), "{bad:?}");
    }
}

#[test]
fn a_zero_target_means_no_pools() {
    let p = pools(0, 0);
    assert_eq!(p.level("B"), None);
    assert_eq!(p.take("B", 1, 32, 0), None);
    assert_eq!(p.links().count(), 0);
}

/// A holder killed mid-bind left an in-flight record: the next holder must not hand
/// those positions out (the peer may have bound them), and only those.
#[tokio::test]
async fn positions_of_an_unanswered_bind_are_not_reloaded() {
    use dqkd_store::{InFlight, MemoryStore};
    let store = MemoryStore::new();
    let p = Pools::new(
        "A",
        Some(&"a1".parse().expect("name")),
        pools(10, 2).settings(),
        32,
        &["B".to_owned()],
    );
    let pool = &p.links["B"];
    let slots = stored_ready(&store, pool, 100..110).await;
    let record = |owner: &str, sites: &[&str], ready: &[u64]| InFlight {
        request_id: Uuid::new_v4(),
        owner: owner.into(),
        sites: sites.iter().map(|s| s.to_string()).collect(),
        key_ids: vec![Uuid::new_v4()],
        ready: ready.to_vec(),
    };
    // This replica's bind toward B of 100..=101; another replica's and another site's
    // records do not make positions of this pool doubtful.
    for r in [
        record("a1", &["B"], &[100, 101]),
        record("a2", &["B"], &[102]),
        record("a1", &["C"], &[103]),
    ] {
        store.record_in_flight(r).await.unwrap();
    }
    assert_eq!(p.load(pool, &store).await.unwrap(), 8);
    assert_eq!(p.take("B", 8, 32, 0), Some(slots[2..].to_vec()));
    assert!(pool.reserve(1) > 109, "positions are never reused");
}

/// Positions of an unanswered bind settled as ready after the pool was loaded (a standby
/// that claimed the pool before it recovered the bind) go back in position order, once.
#[tokio::test]
async fn settled_positions_go_back_into_a_loaded_pool() {
    use dqkd_store::{InFlight, MemoryStore};
    let store = MemoryStore::new();
    let p = pools(10, 2);
    let pool = &p.links["B"];
    let slots = stored_ready(&store, pool, 100..106).await;
    let request_id = Uuid::new_v4();
    store
        .record_in_flight(InFlight {
            request_id,
            owner: String::new(),
            sites: vec!["B".into()],
            key_ids: slots[..2].iter().map(|s| s.id).collect(),
            ready: vec![100, 101],
        })
        .await
        .unwrap();
    assert_eq!(p.load(pool, &store).await.unwrap(), 4);
    let answered = [request_id];
    let forget = store.forget_in_flight(&answered);
    p.settle("B", &store, &[100, 101], forget).await.unwrap();
    assert!(store.in_flight("").await.unwrap().is_empty());
    // Settled again (a retried recovery): nothing is held twice.
    p.settle("B", &store, &[100, 101], async { Ok(()) })
        .await
        .unwrap();
    assert_eq!(p.level("B"), Some((6, 10)));
    assert_eq!(p.take("B", 6, 32, 0), Some(slots), "in position order");
}

/// Ready keys at positions `seqs` of `pool`, stored as a fill would have.
async fn stored_ready(
    store: &dqkd_store::MemoryStore,
    pool: &LinkPool,
    seqs: std::ops::Range<u64>,
) -> Vec<Slot> {
    use dqkd_store::{KeyMaterial, KeyStore as _, PoolKey};
    let slots: Vec<Slot> = seqs
        .map(|seq| Slot {
            seq,
            id: Uuid::new_v4(),
        })
        .collect();
    let keys = slots.iter().map(|&slot| PoolKey {
        slot,
        material: KeyMaterial::new(vec![7; 32]),
        expires_at: u64::MAX / 2,
    });
    store
        .pool_insert(pool.name(), keys.collect())
        .await
        .unwrap();
    slots
}
