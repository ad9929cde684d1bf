//! The behavioural suite every [`KeyStore`] implementation must pass, shared by the tests of
//! `dqkd-store` (memory and embedded stores) and `dqkd-store-postgres`, so no implementation
//! can drift from the others.
//!
//! Each case is a plain async function taking a fresh, empty store. [`suite!`] turns them into
//! one `#[tokio::test]` each for a store built by an async maker:
//!
//! ```text
//! async fn memory() -> Option<(Arc<dyn KeyStore>, ())> {
//!     Some((Arc::new(MemoryStore::new()), ()))
//! }
//! dqkd_store_tests::suite!(memory_store, memory);
//! ```
//!
//! The maker returns the store and a guard that must outlive it (a temp dir, a throwaway
//! database), or `None` when the backend is unavailable: it must then say so loudly itself,
//! and every generated test returns without checking anything.

// The cases are assertions: an unwrap here is a failed check, not a crash on a request path.
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::sync::Arc;

use dqkd_store::{
    InFlight, KeyMaterial, KeyStore, NewKey, PoolGrant, PoolKey, ReadyKey, Slot, StoreError,
    TakeError, Uuid,
};

/// The clock the cases pass to `take`; keys expire relative to it.
pub const NOW: u64 = 1_000;

/// A fresh key with a random ID.
pub fn key(master: &str, slaves: &[&str], bytes: &[u8], expires_at: u64) -> NewKey {
    NewKey {
        id: Uuid::new_v4(),
        master: master.into(),
        slaves: slaves.iter().map(|s| s.to_string()).collect(),
        material: KeyMaterial::new(bytes.to_vec()),
        expires_at,
    }
}

/// Owned master SAE IDs.
pub fn masters(m: &[&str]) -> Vec<String> {
    m.iter().map(|s| s.to_string()).collect()
}

/// Keys come back in the order asked, once only.
pub async fn round_trip(s: Arc<dyn KeyStore>) {
    let a = key("alice", &["bob"], &[1; 32], NOW + 60);
    let b = key("alice", &["bob"], &[2; 16], NOW + 60);
    let (ia, ib) = (a.id, b.id);
    s.insert(vec![a, b]).await.unwrap();
    let got = s
        .take("bob", &masters(&["alice"]), &[ib, ia], NOW)
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].id, ib);
    assert_eq!(got[0].material.as_bytes(), &[2; 16]);
    assert_eq!(got[1].id, ia);
    assert_eq!(got[1].material.as_bytes(), &[1; 32]);
    // Delivered once only.
    let again = s.take("bob", &masters(&["alice"]), &[ia], NOW).await;
    assert!(matches!(again, Err(TakeError::NotFound)), "{again:?}");
}

/// Strangers and wrong masters are unauthorised, and unauthorised wins over unknown.
pub async fn wrong_caller_and_master(s: Arc<dyn KeyStore>) {
    let k = key("alice", &["bob"], &[3; 32], NOW + 60);
    let id = k.id;
    s.insert(vec![k]).await.unwrap();
    let r = s.take("mallory", &masters(&["alice"]), &[id], NOW).await;
    assert!(matches!(r, Err(TakeError::Unauthorized)), "{r:?}");
    let r = s.take("bob", &masters(&["eve"]), &[id], NOW).await;
    assert!(matches!(r, Err(TakeError::Unauthorized)), "{r:?}");
    // Unauthorized wins over an unknown id in the same request.
    let r = s
        .take("mallory", &masters(&["alice"]), &[Uuid::new_v4(), id], NOW)
        .await;
    assert!(matches!(r, Err(TakeError::Unauthorized)), "{r:?}");
    // A master set containing the right master works, and the failures changed nothing.
    let got = s
        .take("bob", &masters(&["eve", "alice"]), &[id], NOW)
        .await
        .unwrap();
    assert_eq!(got[0].material.as_bytes(), &[3; 32]);
}

/// Unknown and repeated IDs are not found and change nothing.
pub async fn unknown_and_duplicate_ids(s: Arc<dyn KeyStore>) {
    let r = s
        .take("bob", &masters(&["alice"]), &[Uuid::new_v4()], NOW)
        .await;
    assert!(matches!(r, Err(TakeError::NotFound)), "{r:?}");
    let k = key("alice", &["bob"], &[4; 32], NOW + 60);
    let id = k.id;
    s.insert(vec![k]).await.unwrap();
    let r = s.take("bob", &masters(&["alice"]), &[id, id], NOW).await;
    assert!(matches!(r, Err(TakeError::NotFound)), "{r:?}");
    assert_eq!(s.pending("alice", "bob"), 1);
    s.take("bob", &masters(&["alice"]), &[id], NOW)
        .await
        .unwrap();
}

/// One bad ID (unknown, expired, foreign) fails the whole take.
pub async fn all_or_nothing(s: Arc<dyn KeyStore>) {
    let good: Vec<NewKey> = (0..3u8)
        .map(|i| key("alice", &["bob"], &[i + 10; 32], NOW + 60))
        .collect();
    let ids: Vec<Uuid> = good.iter().map(|k| k.id).collect();
    let expired = key("alice", &["bob"], &[9; 32], NOW);
    let expired_id = expired.id;
    let other = key("alice", &["carol"], &[8; 32], NOW + 60);
    let other_id = other.id;
    s.insert(good).await.unwrap();
    s.insert(vec![expired, other]).await.unwrap();

    let mut with_unknown = ids.clone();
    with_unknown.insert(1, Uuid::new_v4());
    let r = s
        .take("bob", &masters(&["alice"]), &with_unknown, NOW)
        .await;
    assert!(matches!(r, Err(TakeError::NotFound)), "{r:?}");

    let mut with_expired = ids.clone();
    with_expired.push(expired_id);
    let r = s
        .take("bob", &masters(&["alice"]), &with_expired, NOW)
        .await;
    assert!(matches!(r, Err(TakeError::NotFound)), "{r:?}");

    let mut with_foreign = ids.clone();
    with_foreign.push(other_id);
    let r = s
        .take("bob", &masters(&["alice"]), &with_foreign, NOW)
        .await;
    assert!(matches!(r, Err(TakeError::Unauthorized)), "{r:?}");

    assert_eq!(s.pending("alice", "bob"), 4);
    let got = s
        .take("bob", &masters(&["alice"]), &ids, NOW)
        .await
        .unwrap();
    let bytes: Vec<u8> = got.iter().map(|k| k.material.as_bytes()[0]).collect();
    assert_eq!(bytes, vec![10, 11, 12]);
}

/// Each slave fetches a key once; the key goes when the last slave has it.
pub async fn multi_slave(s: Arc<dyn KeyStore>) {
    let k = key("alice", &["bob", "carol"], &[5; 32], NOW + 60);
    let id = k.id;
    s.insert(vec![k]).await.unwrap();
    assert_eq!(s.pending("alice", "bob"), 1);
    assert_eq!(s.pending("alice", "carol"), 1);
    s.take("bob", &masters(&["alice"]), &[id], NOW)
        .await
        .unwrap();
    assert_eq!(s.pending("alice", "bob"), 0);
    assert_eq!(s.pending("alice", "carol"), 1);
    // Bob already has it: not found, not unauthorised.
    let r = s.take("bob", &masters(&["alice"]), &[id], NOW).await;
    assert!(matches!(r, Err(TakeError::NotFound)), "{r:?}");
    let got = s
        .take("carol", &masters(&["alice"]), &[id], NOW)
        .await
        .unwrap();
    assert_eq!(got[0].material.as_bytes(), &[5; 32]);
    assert_eq!(s.pending("alice", "carol"), 0);
    // Gone for everyone now.
    let r = s.take("carol", &masters(&["alice"]), &[id], NOW).await;
    assert!(matches!(r, Err(TakeError::NotFound)), "{r:?}");
    assert_eq!(s.purge_expired(u64::MAX).await.unwrap(), 0);
}

/// Expired keys are not found for anyone and are purged at `expires_at <= now`.
pub async fn expiry_and_purge(s: Arc<dyn KeyStore>) {
    let soon = key("alice", &["bob", "carol"], &[6; 32], NOW + 10);
    let late = key("alice", &["bob"], &[7; 32], NOW + 100);
    let (soon_id, late_id) = (soon.id, late.id);
    s.insert(vec![soon, late]).await.unwrap();
    // expires_at <= now is expired.
    let r = s
        .take("bob", &masters(&["alice"]), &[soon_id], NOW + 10)
        .await;
    assert!(matches!(r, Err(TakeError::NotFound)), "{r:?}");
    // An expired key is not-found even for a stranger.
    let r = s
        .take("mallory", &masters(&["alice"]), &[soon_id], NOW + 10)
        .await;
    assert!(matches!(r, Err(TakeError::NotFound)), "{r:?}");
    assert_eq!(s.pending("alice", "bob"), 2);
    assert_eq!(s.purge_expired(NOW + 9).await.unwrap(), 0);
    assert_eq!(s.purge_expired(NOW + 10).await.unwrap(), 1);
    assert_eq!(s.pending("alice", "bob"), 1);
    assert_eq!(s.pending("alice", "carol"), 0);
    // The purged key is gone even at an earlier clock.
    let r = s.take("bob", &masters(&["alice"]), &[soon_id], NOW).await;
    assert!(matches!(r, Err(TakeError::NotFound)), "{r:?}");
    s.take("bob", &masters(&["alice"]), &[late_id], NOW + 99)
        .await
        .unwrap();
}

/// Pending counts per (master, slave) follow inserts and takes.
pub async fn pending_counts(s: Arc<dyn KeyStore>) {
    let mut keys = Vec::new();
    for _ in 0..5 {
        keys.push(key("alice", &["bob"], &[1; 32], NOW + 60));
    }
    for _ in 0..3 {
        keys.push(key("alice", &["bob", "carol"], &[1; 32], NOW + 60));
    }
    keys.push(key("dave", &["bob"], &[1; 32], NOW + 60));
    let first = keys[0].id;
    s.insert(keys).await.unwrap();
    assert_eq!(s.pending("alice", "bob"), 8);
    assert_eq!(s.pending("alice", "carol"), 3);
    assert_eq!(s.pending("dave", "bob"), 1);
    assert_eq!(s.pending("bob", "alice"), 0);
    s.take("bob", &masters(&["alice"]), &[first], NOW)
        .await
        .unwrap();
    assert_eq!(s.pending("alice", "bob"), 7);
    // A failed take changes no count.
    let _ = s
        .take("bob", &masters(&["alice"]), &[Uuid::new_v4()], NOW)
        .await;
    assert_eq!(s.pending("alice", "bob"), 7);
}

/// A duplicate or invalid key fails the whole insert.
pub async fn insert_is_all_or_nothing(s: Arc<dyn KeyStore>) {
    let existing = key("alice", &["bob"], &[1; 32], NOW + 60);
    let existing_id = existing.id;
    s.insert(vec![existing]).await.unwrap();
    let fresh = key("alice", &["bob"], &[2; 32], NOW + 60);
    let fresh_id = fresh.id;
    let mut dup = key("alice", &["bob"], &[3; 32], NOW + 60);
    dup.id = existing_id;
    let r = s.insert(vec![fresh, dup]).await;
    assert!(
        matches!(r, Err(StoreError::DuplicateId { id }) if id == existing_id),
        "{r:?}"
    );
    assert_eq!(s.pending("alice", "bob"), 1);
    let r = s.take("bob", &masters(&["alice"]), &[fresh_id], NOW).await;
    assert!(matches!(r, Err(TakeError::NotFound)), "{r:?}");
    // The original key is untouched.
    let got = s
        .take("bob", &masters(&["alice"]), &[existing_id], NOW)
        .await
        .unwrap();
    assert_eq!(got[0].material.as_bytes(), &[1; 32]);

    let r = s.insert(vec![key("alice", &[], &[1; 32], NOW + 60)]).await;
    assert!(matches!(r, Err(StoreError::InvalidKey { .. })), "{r:?}");
}

/// 64 concurrent takes of one key: exactly one succeeds.
pub async fn concurrent_takes(s: Arc<dyn KeyStore>) {
    let k = key("alice", &["bob"], &[0xAA; 32], NOW + 60);
    let id = k.id;
    s.insert(vec![k]).await.unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let s = Arc::clone(&s);
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                s.take("bob", &["alice".to_string()], &[id], NOW).await
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(keys) => {
                assert_eq!(keys[0].material.as_bytes(), &[0xAA; 32]);
                ok += 1;
            }
            Err(TakeError::NotFound) => {}
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(s.pending("alice", "bob"), 0);
}

/// `destroy` removes keys whatever their entitlements and is idempotent.
pub async fn destroy_removes_whatever_the_entitlements(s: Arc<dyn KeyStore>) {
    let a = key("alice", &["bob", "carol"], &[8; 32], NOW + 100);
    let b = key("alice", &["bob"], &[9; 32], NOW + 100);
    let (ia, ib) = (a.id, b.id);
    s.insert(vec![a, b]).await.unwrap();
    let unknown = Uuid::new_v4();
    assert_eq!(s.destroy(&[ia, unknown]).await.unwrap(), 1);
    assert_eq!(s.destroy(&[ia]).await.unwrap(), 0, "destroy is idempotent");
    for slave in ["bob", "carol"] {
        let r = s.take(slave, &masters(&["alice"]), &[ia], NOW).await;
        assert!(matches!(r, Err(TakeError::NotFound)), "{r:?}");
    }
    assert_eq!(s.pending("alice", "bob"), 1);
    assert_eq!(s.pending("alice", "carol"), 0);
    s.take("bob", &masters(&["alice"]), &[ib], NOW)
        .await
        .unwrap();
}

/// A fresh ready key at position `seq` with a random ID (its bytes are `seq` repeated).
pub fn ready(seq: u64, expires_at: u64) -> PoolKey {
    PoolKey {
        slot: Slot {
            seq,
            id: Uuid::new_v4(),
        },
        material: KeyMaterial::new(vec![seq as u8; 32]),
        expires_at,
    }
}

fn grant(slots: &[Slot], master: &str, slaves: &[&str]) -> PoolGrant {
    PoolGrant {
        slots: slots.to_vec(),
        master: master.into(),
        slaves: slaves.iter().map(|s| s.to_string()).collect(),
        expires_at: NOW + 60,
    }
}

fn listed(k: &PoolKey) -> ReadyKey {
    ReadyKey {
        slot: k.slot,
        expires_at: k.expires_at,
    }
}

/// Ready keys belong to no one until bound; binding makes them ordinary keys (or shreds
/// them when the grant has no slaves) and returns their bytes in grant order. Pools list in
/// position order, whatever the order of insertion.
pub async fn pool_keys_are_bound_once(s: Arc<dyn KeyStore>) {
    let (a, b, c) = (
        ready(11, NOW + 100),
        ready(12, NOW + 100),
        ready(13, NOW + 50),
    );
    let (sa, sb) = (a.slot, b.slot);
    s.pool_insert("A>B", vec![c.clone(), a.clone()])
        .await
        .unwrap();
    s.pool_insert("A>B", vec![b.clone()]).await.unwrap();
    assert_eq!(
        s.pool_list("A>B").await.unwrap(),
        vec![listed(&a), listed(&b), listed(&c)],
        "position order"
    );
    assert!(s.pool_list("B>A").await.unwrap().is_empty());
    assert_eq!(s.pending("alice", "bob"), 0, "ready keys are nobody's");
    let r = s.take("bob", &masters(&["alice"]), &[sa.id], NOW).await;
    assert!(matches!(r, Err(TakeError::NotFound)), "{r:?}");

    let got = s
        .pool_bind(
            "A>B",
            vec![grant(&[sb], "alice", &["bob"]), grant(&[sa], "alice", &[])],
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(
        (got[0].id, got[0].material.as_bytes()),
        (sb.id, &[12u8; 32][..])
    );
    assert_eq!(
        (got[1].id, got[1].material.as_bytes()),
        (sa.id, &[11u8; 32][..])
    );
    assert_eq!(s.pool_list("A>B").await.unwrap(), vec![listed(&c)]);
    assert_eq!(s.pending("alice", "bob"), 1);

    let r = s
        .pool_bind("A>B", vec![grant(&[sb], "alice", &["bob"])], NOW)
        .await;
    assert!(matches!(r, Err(TakeError::NotFound)), "bound twice: {r:?}");
    let r = s.take("bob", &masters(&["alice"]), &[sa.id], NOW).await;
    assert!(matches!(r, Err(TakeError::NotFound)), "shredded: {r:?}");
    let got = s
        .take("bob", &masters(&["alice"]), &[sb.id], NOW)
        .await
        .unwrap();
    assert_eq!(got[0].material.as_bytes(), &[12; 32]);
}

/// A bind that names a slot of another pool, a position holding another ID, an expired,
/// empty or repeated slot changes nothing.
pub async fn pool_bind_is_all_or_nothing(s: Arc<dyn KeyStore>) {
    let (a, b, other) = (ready(1, NOW + 100), ready(2, NOW), ready(1, NOW + 100));
    let (sa, sb, so) = (a.slot, b.slot, other.slot);
    s.pool_insert("A>B", vec![a, b]).await.unwrap();
    s.pool_insert("C>B", vec![other.clone()]).await.unwrap();
    let wrong_id = Slot {
        seq: sa.seq,
        id: so.id,
    };
    let empty = Slot {
        seq: 99,
        id: Uuid::new_v4(),
    };
    for bad in [
        vec![sa, so],
        vec![sb, sa],
        vec![wrong_id],
        vec![sa, empty],
        vec![sa, sa],
    ] {
        let r = s
            .pool_bind("A>B", vec![grant(&bad, "alice", &["bob"])], NOW)
            .await;
        assert!(matches!(r, Err(TakeError::NotFound)), "{bad:?}: {r:?}");
    }
    let r = s
        .pool_bind(
            "A>B",
            vec![grant(&[sa], "alice", &["bob"]), grant(&[sa], "alice", &[])],
            NOW,
        )
        .await;
    assert!(matches!(r, Err(TakeError::NotFound)), "{r:?}");
    assert_eq!(s.pending("alice", "bob"), 0);
    assert_eq!(s.pool_list("A>B").await.unwrap().len(), 2);
    assert_eq!(s.pool_list("C>B").await.unwrap(), vec![listed(&other)]);
    s.pool_bind("A>B", vec![grant(&[sa], "alice", &["bob"])], NOW)
        .await
        .unwrap();
}

/// Positions are unique per pool, IDs of ready keys never match ordinary keys; bad key bytes
/// are refused; `pool_remove` shreds by position, `destroy` reaches only ordinary keys, and
/// `purge_expired` reaches ready keys too.
pub async fn pool_positions_remove_and_purge(s: Arc<dyn KeyStore>) {
    let a = ready(5, NOW + 100);
    let sa = a.slot;
    s.pool_insert("A>B", vec![a.clone()]).await.unwrap();
    let r = s.pool_insert("A>B", vec![ready(5, NOW + 100)]).await;
    assert!(matches!(r, Err(StoreError::DuplicateId { .. })), "{r:?}");
    let same_place = ready(5, NOW + 100);
    s.pool_insert("C>B", vec![same_place.clone()])
        .await
        .expect("positions are per pool");

    let plain = key("alice", &["bob"], &[5; 32], NOW + 100);
    s.insert(vec![plain.clone()]).await.unwrap();
    let mut clash = ready(6, NOW + 100);
    clash.slot.id = plain.id;
    let r = s.pool_insert("A>B", vec![clash]).await;
    assert!(matches!(r, Err(StoreError::DuplicateId { .. })), "{r:?}");
    let (x, mut y) = (ready(7, NOW + 100), ready(8, NOW + 100));
    y.slot.id = x.slot.id;
    let r = s.pool_insert("A>B", vec![x, y]).await;
    assert!(matches!(r, Err(StoreError::DuplicateId { .. })), "{r:?}");
    let mut empty = ready(9, NOW + 100);
    empty.material = KeyMaterial::new(Vec::new());
    let r = s.pool_insert("A>B", vec![empty]).await;
    assert!(matches!(r, Err(StoreError::InvalidKey { .. })), "{r:?}");
    assert_eq!(s.pool_list("A>B").await.unwrap(), vec![listed(&a)]);

    assert_eq!(s.destroy(&[sa.id]).await.unwrap(), 0, "not an ordinary key");
    assert_eq!(s.pool_list("A>B").await.unwrap().len(), 1);
    assert_eq!(s.pool_remove("A>B", &[sa.seq, 77]).await.unwrap(), 1);
    assert_eq!(s.pool_remove("A>B", &[sa.seq]).await.unwrap(), 0);
    assert!(s.pool_list("A>B").await.unwrap().is_empty());
    assert_eq!(
        s.pool_list("C>B").await.unwrap(),
        vec![listed(&same_place)],
        "another pool's position is untouched"
    );
    let r = s
        .pool_bind("A>B", vec![grant(&[sa], "alice", &["bob"])], NOW)
        .await;
    assert!(matches!(r, Err(TakeError::NotFound)), "removed: {r:?}");

    let (old, young) = (ready(20, NOW + 10), ready(21, NOW + 100));
    s.pool_insert("A>B", vec![old, young.clone()])
        .await
        .unwrap();
    assert_eq!(s.purge_expired(NOW + 10).await.unwrap(), 1);
    assert_eq!(s.pool_list("A>B").await.unwrap(), vec![listed(&young)]);
    s.pool_bind("A>B", vec![grant(&[young.slot], "alice", &["bob"])], NOW)
        .await
        .unwrap();
    assert_eq!(
        s.destroy(&[young.slot.id]).await.unwrap(),
        1,
        "bound keys are ordinary"
    );
    assert_eq!(s.pending("alice", "bob"), 1);
}

/// A pool lists a page at a time, in position order, from just after a given position.
pub async fn pool_pages_in_position_order(s: Arc<dyn KeyStore>) {
    let keys: Vec<PoolKey> = [40, 10, 30, 20, 50].map(|seq| ready(seq, NOW + 100)).into();
    s.pool_insert("A>B", keys.clone()).await.unwrap();
    s.pool_insert("B>A", vec![ready(15, NOW + 100)])
        .await
        .unwrap();
    let seqs = |page: Vec<ReadyKey>| page.iter().map(|k| k.slot.seq).collect::<Vec<_>>();
    assert_eq!(seqs(s.pool_page("A>B", None, 2).await.unwrap()), [10, 20]);
    assert_eq!(
        seqs(s.pool_page("A>B", Some(20), 2).await.unwrap()),
        [30, 40]
    );
    assert_eq!(
        seqs(s.pool_page("A>B", Some(25), 10).await.unwrap()),
        [30, 40, 50]
    );
    assert!(s.pool_page("A>B", Some(50), 10).await.unwrap().is_empty());
    assert!(s
        .pool_page("A>B", Some(u64::MAX), 10)
        .await
        .unwrap()
        .is_empty());
    let all = s.pool_list("A>B").await.unwrap();
    assert_eq!(seqs(all.clone()), [10, 20, 30, 40, 50]);
    let by_seq = |seq| keys.iter().find(|k| k.slot.seq == seq).map(listed);
    assert_eq!(
        Some(all[0]),
        by_seq(10),
        "IDs and expiries come with their positions"
    );
}

/// Two binds racing for the same ready keys: exactly one wins.
pub async fn concurrent_pool_binds(s: Arc<dyn KeyStore>) {
    let keys: Vec<PoolKey> = (0..8).map(|i| ready(i, NOW + 100)).collect();
    let slots: Vec<Slot> = keys.iter().map(|k| k.slot).collect();
    s.pool_insert("A>B", keys).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (s, slots) = (s.clone(), slots.clone());
        tasks.push(tokio::spawn(async move {
            s.pool_bind("A>B", vec![grant(&slots, "alice", &["bob"])], NOW)
                .await
        }));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(keys) => {
                assert_eq!(keys.len(), 8);
                won += 1;
            }
            Err(TakeError::NotFound) => {}
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(s.pending("alice", "bob"), 8);
}

/// `destroy_of` shreds only keys made for the given masters: one key of another master (even
/// an expired one) refuses the whole request and nothing changes; unknown IDs are skipped, so
/// a retry succeeds.
pub async fn destroy_of_reaches_only_the_given_masters(s: Arc<dyn KeyStore>) {
    let own = key("alice", &["bob"], &[1; 32], NOW + 100);
    let foreign = key("bob", &["bob2"], &[2; 32], NOW + 100);
    let stale = key("carol", &["bob"], &[3; 32], NOW - 1);
    let (io, i_f, is) = (own.id, foreign.id, stale.id);
    s.insert(vec![own, foreign, stale]).await.unwrap();
    let site_a = masters(&["alice", "alice2"]);
    let unknown = Uuid::new_v4();
    for ids in [vec![io, i_f], vec![i_f], vec![unknown, is, io]] {
        let r = s.destroy_of(&site_a, &ids).await;
        assert!(matches!(r, Err(TakeError::Unauthorized)), "{ids:?}: {r:?}");
    }
    assert_eq!(
        s.pending("alice", "bob"),
        1,
        "a refused destroy changes nothing"
    );
    assert_eq!(s.pending("bob", "bob2"), 1);
    assert_eq!(s.destroy_of(&site_a, &[io, unknown, io]).await.unwrap(), 1);
    assert_eq!(s.destroy_of(&site_a, &[io]).await.unwrap(), 0, "idempotent");
    assert_eq!(s.pending("alice", "bob"), 0);
    let r = s.take("bob", &masters(&["alice"]), &[io], NOW).await;
    assert!(matches!(r, Err(TakeError::NotFound)), "{r:?}");
    let got = s
        .take("bob2", &masters(&["bob"]), &[i_f], NOW)
        .await
        .unwrap();
    assert_eq!(got[0].material.as_bytes(), &[2; 32]);
    assert_eq!(s.destroy_of(&masters(&["carol"]), &[is]).await.unwrap(), 1);
}

fn in_flight(owner: &str, key_ids: &[Uuid], ready: &[u64]) -> InFlight {
    InFlight {
        request_id: Uuid::new_v4(),
        owner: owner.into(),
        sites: vec!["KME_B".into(), "KME_C".into()],
        key_ids: key_ids.to_vec(),
        ready: ready.to_vec(),
    }
}

fn sorted(mut records: Vec<InFlight>) -> Vec<InFlight> {
    records.sort_by_key(|r| r.request_id);
    records
}

/// In-flight records are kept per owner until the commit that answers them (an insert or a
/// bind that succeeds) or until they are forgotten; a failed insert or bind keeps its
/// record. Recording again replaces a record; forgetting is idempotent.
pub async fn in_flight_records_leave_with_the_answering_commit(s: Arc<dyn KeyStore>) {
    let k = key("alice", &["alice"], &[1; 32], NOW + 60);
    let delivered = in_flight("", &[k.id], &[]);
    let bound = in_flight("", &[Uuid::new_v4()], &[21]);
    let empty = in_flight("", &[Uuid::new_v4()], &[]);
    let other = in_flight("a2", &[Uuid::new_v4()], &[]);
    for r in [&delivered, &bound, &empty, &other] {
        s.record_in_flight(r.clone()).await.unwrap();
    }
    assert_eq!(
        sorted(s.in_flight("").await.unwrap()),
        sorted(vec![delivered.clone(), bound.clone(), empty.clone()])
    );
    assert_eq!(s.in_flight("a2").await.unwrap(), vec![other.clone()]);
    assert!(s.in_flight("a3").await.unwrap().is_empty());
    let mut replaced = bound.clone();
    replaced.ready = vec![21, 22];
    s.record_in_flight(replaced.clone()).await.unwrap();

    // A failed insert (a duplicate ID) leaves the record: nothing was answered.
    s.insert(vec![k.clone()]).await.unwrap();
    let r = s
        .insert_answering(vec![k.clone()], Some(delivered.request_id))
        .await;
    assert!(matches!(r, Err(StoreError::DuplicateId { .. })), "{r:?}");
    assert!(s.in_flight("").await.unwrap().contains(&delivered));
    let mut fresh = key("alice", &["alice"], &[2; 32], NOW + 60);
    fresh.id = Uuid::new_v4();
    s.insert_answering(vec![fresh.clone()], Some(delivered.request_id))
        .await
        .unwrap();
    // An origin that keeps no copy still answers with a commit.
    s.insert_answering(Vec::new(), Some(empty.request_id))
        .await
        .unwrap();
    assert_eq!(s.in_flight("").await.unwrap(), vec![replaced.clone()]);
    let got = s
        .take("alice", &masters(&["alice"]), &[fresh.id], NOW)
        .await
        .unwrap();
    assert_eq!(got[0].material.as_bytes(), &[2; 32]);

    // A bind that fails keeps the record; one that succeeds takes it away.
    let (a, b) = (ready(21, NOW + 100), ready(22, NOW + 100));
    s.pool_insert("A>B", vec![a.clone(), b.clone()])
        .await
        .unwrap();
    let missing = Slot {
        seq: 23,
        id: Uuid::new_v4(),
    };
    let r = s
        .pool_bind_answering(
            "A>B",
            vec![grant(&[a.slot, missing], "alice", &["alice"])],
            NOW,
            Some(replaced.request_id),
        )
        .await;
    assert!(matches!(r, Err(TakeError::NotFound)), "{r:?}");
    assert_eq!(s.in_flight("").await.unwrap(), vec![replaced.clone()]);
    s.pool_bind_answering(
        "A>B",
        vec![grant(&[a.slot, b.slot], "alice", &["alice"])],
        NOW,
        Some(replaced.request_id),
    )
    .await
    .unwrap();
    assert!(s.in_flight("").await.unwrap().is_empty());

    // Forgetting: unknown IDs skipped, and again is harmless.
    s.forget_in_flight(&[other.request_id, Uuid::new_v4()])
        .await
        .unwrap();
    s.forget_in_flight(&[other.request_id]).await.unwrap();
    assert!(s.in_flight("a2").await.unwrap().is_empty());
    assert_eq!(
        s.pending("alice", "alice"),
        3,
        "the first insert and two bound keys"
    );
}

/// Generates one `#[tokio::test]` per case in a module `$module`, for stores made by the async
/// function `$make` (in scope where the macro is used), which returns
/// `Option<(Arc<dyn KeyStore>, Guard)>`. The calling crate needs `tokio` with `macros` and
/// `rt-multi-thread`.
#[macro_export]
macro_rules! suite {
    ($module:ident, $make:ident) => {
        mod $module {
            $crate::suite!(@case $make; round_trip, wrong_caller_and_master,
                unknown_and_duplicate_ids, all_or_nothing, multi_slave, expiry_and_purge,
                pending_counts, insert_is_all_or_nothing, concurrent_takes,
                destroy_removes_whatever_the_entitlements,
                destroy_of_reaches_only_the_given_masters, pool_keys_are_bound_once,
                pool_bind_is_all_or_nothing, pool_positions_remove_and_purge, concurrent_pool_binds,
                pool_pages_in_position_order, in_flight_records_leave_with_the_answering_commit);
        }
    };
    (@case $make:ident; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let Some((store, guard)) = super::$make().await else {
                    return;
                };
                $crate::$case(store).await;
                drop(guard);
            }
        )*
    };
}
