#![allow(clippy::unwrap_used)]
use super::*;
use crate::record::Record;
use crate::schema::ready_value;
use crate::wal::Change;
use crate::Slot;

fn kek() -> Kek {
    Kek::from_bytes([7; crate::KEK_LEN])
}

/// A log whose records do not follow the store's last checkpoint (a store file restored
/// from elsewhere, say) is refused, not applied over a gap.
#[test]
fn a_log_with_missing_records_refuses_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    drop(EmbeddedStore::open(&path, kek()).unwrap());
    {
        let (mut wal, _) = Wal::open(&wal_path(&path)).unwrap();
        wal.skip_to(5);
        wal.append(&[Change::DelKey(1)]).unwrap();
    }
    let err = EmbeddedStore::open(&path, kek()).unwrap_err();
    assert!(err.to_string().contains("records are missing"), "{err}");
}

fn in_flight(owner: &str) -> InFlight {
    InFlight {
        request_id: Uuid::new_v4(),
        owner: owner.into(),
        sites: vec!["KME_B".into()],
        key_ids: vec![Uuid::new_v4()],
        ready: vec![3],
    }
}

/// In-flight records survive a restart, whether a checkpoint filed them in redb or only
/// the write-ahead log holds them, and so do their deletions.
#[tokio::test]
async fn in_flight_records_survive_checkpoints_and_log_replay() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let (filed, logged, forgotten) = (in_flight(""), in_flight(""), in_flight("a1"));
    drop(EmbeddedStore::open(&path, kek()).unwrap());
    {
        // What a crash leaves: records only the log holds (checkpoint at 0, record 1 next).
        let (mut wal, _) = Wal::open(&wal_path(&path)).unwrap();
        let put =
            |r: &InFlight| Change::PutInFlight(r.request_id.as_u128(), crate::inflight::encode(r));
        wal.append(&[put(&logged), put(&forgotten)]).unwrap();
    }
    {
        let store = EmbeddedStore::open(&path, kek()).unwrap();
        assert_eq!(store.replayed_at_open(), 1);
        assert_eq!(store.in_flight("").await.unwrap(), vec![logged.clone()]);
        assert_eq!(
            store.in_flight("a1").await.unwrap(),
            vec![forgotten.clone()]
        );
        store.record_in_flight(filed.clone()).await.unwrap();
        store
            .forget_in_flight(&[forgotten.request_id])
            .await
            .unwrap();
    } // a clean close checkpoints the changes
    let store = EmbeddedStore::open(&path, kek()).unwrap();
    let mut found = store.in_flight("").await.unwrap();
    found.sort_by_key(|r| r.request_id);
    let mut want = vec![filed.clone(), logged.clone()];
    want.sort_by_key(|r| r.request_id);
    assert_eq!(found, want);
    assert!(store.in_flight("a1").await.unwrap().is_empty());
    store
        .insert_answering(Vec::new(), Some(filed.request_id))
        .await
        .unwrap();
    drop(store);
    let store = EmbeddedStore::open(&path, kek()).unwrap();
    assert_eq!(store.in_flight("").await.unwrap(), vec![logged]);
}

/// Records the store already covers are skipped; the next one is applied.
#[test]
fn records_after_the_checkpoint_are_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    drop(EmbeddedStore::open(&path, kek()).unwrap());
    let id = Uuid::new_v4();
    {
        let (mut wal, _) = Wal::open(&wal_path(&path)).unwrap();
        // A clean open and close leave the checkpoint at 0: record 1 is the next.
        wal.append(&[Change::PutReady("A>B".into(), 3, ready_value(id, b"x"))])
            .unwrap();
    }
    let store = EmbeddedStore::open(&path, kek()).unwrap();
    assert_eq!(store.replayed_at_open(), 1);
    drop(store);
    let store = EmbeddedStore::open(&path, kek()).unwrap();
    assert_eq!(
        store.replayed_at_open(),
        0,
        "the log was emptied after applying it"
    );
}

/// A crash after the log was rotated but before its checkpoint committed leaves records
/// in both files: the older file's come first, and both are applied.
#[test]
fn a_rotated_log_and_the_current_one_are_both_applied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    drop(EmbeddedStore::open(&path, kek()).unwrap());
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    {
        let (mut wal, _) = Wal::open(&wal_path(&path)).unwrap();
        wal.append(&[Change::PutReady("A>B".into(), 1, ready_value(a, b"x"))])
            .unwrap();
        wal.rotate().unwrap();
        wal.append(&[Change::PutReady("A>B".into(), 2, ready_value(b, b"y"))])
            .unwrap();
    }
    let store = EmbeddedStore::open(&path, kek()).unwrap();
    assert_eq!(store.replayed_at_open(), 2);
    assert!(
        !crate::wal::previous_path(&wal_path(&path)).exists(),
        "the rotated log is deleted once the open commit covers it"
    );
}

/// A rotation continues in a checkpointed file, which still holds its old records after
/// whatever is written over its start. Those are never applied again: a ready key taken
/// before the checkpoint must not come back after a crash.
#[tokio::test]
async fn a_reused_log_file_does_not_bring_back_checkpointed_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let log = wal_path(&path);
    drop(EmbeddedStore::open(&path, kek()).unwrap());
    // Only the head of a ready record is read to list it: the key need not open.
    let value = |id: Uuid| {
        let record = Record {
            meta: crate::meta::KeyMeta::new("A>B", &[], u64::MAX),
            sealing: crate::kek::Sealing::Kek {
                nonce: [0; crate::kek::NONCE_BYTES],
            },
            sealed: vec![0; 48],
        };
        ready_value(id, &record.encode().unwrap())
    };
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    {
        let (mut wal, _) = Wal::open(&log).unwrap();
        wal.append(&[Change::PutReady("A>B".into(), 1, value(a))])
            .unwrap();
        wal.append(&[Change::DelReady("A>B".into(), 1)]).unwrap();
        wal.rotate().unwrap();
    }
    // Applies records 1 and 2 and keeps their file as the spare.
    drop(EmbeddedStore::open(&path, kek()).unwrap());
    let spare = crate::wal::spare_path(&log);
    assert!(spare.exists(), "the checkpointed file is kept for reuse");
    {
        // A rotation into the spare, then one record of the same length as the old
        // first one, then a crash: the old second record follows it, intact.
        let (mut wal, _) = Wal::open(&log).unwrap();
        wal.skip_to(3);
        wal.rotate().unwrap();
        assert!(!spare.exists());
        wal.append(&[Change::PutReady("A>B".into(), 2, value(b))])
            .unwrap();
    }
    let store = EmbeddedStore::open(&path, kek()).unwrap();
    assert_eq!(store.replayed_at_open(), 1, "only the new record");
    let page = store.pool_page("A>B", None, 10).await.unwrap();
    assert_eq!(seqs(&page), [2]);
}

/// Listing a pool that holds a damaged ready key names the damage, and, since a read
/// writes nothing, the store goes on serving.
#[tokio::test]
async fn a_damaged_ready_key_fails_its_page_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    drop(EmbeddedStore::open(&path, kek()).unwrap());
    {
        let (mut wal, _) = Wal::open(&wal_path(&path)).unwrap();
        let damaged = ready_value(Uuid::new_v4(), b"not a record");
        wal.append(&[Change::PutReady("A>B".into(), 1, damaged)])
            .unwrap();
    }
    let store = EmbeddedStore::open(&path, kek()).unwrap();
    let err = store.pool_page("A>B", None, 10).await.unwrap_err();
    assert!(matches!(err, StoreError::CorruptRecord { .. }), "{err}");
    store.pool_insert("A>C", vec![ready(1)]).await.unwrap();
    assert_eq!(seqs(&store.pool_page("A>C", None, 10).await.unwrap()), [1]);
}

/// A store written by an earlier version holds records sealed under the KEK itself:
/// they are still delivered, next to new ones sealed under epoch keys.
#[tokio::test]
async fn records_of_the_first_format_are_still_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    drop(EmbeddedStore::open(&path, kek()).unwrap());
    let id = Uuid::new_v4();
    {
        let cipher = kek().cipher().unwrap();
        let (sealing, sealed) = cipher
            .seal_format_1(&[6; 32], &crate::record::aad(id, "alice", 1))
            .unwrap();
        let record = Record {
            meta: crate::meta::KeyMeta::new("alice", &["bob".to_owned()], u64::MAX),
            sealing,
            sealed,
        };
        let bytes = record.encode().unwrap();
        assert_eq!(bytes[0], 1);
        let (mut wal, _) = Wal::open(&wal_path(&path)).unwrap();
        wal.append(&[Change::PutKey(id.as_u128(), bytes)]).unwrap();
    }
    let store = EmbeddedStore::open(&path, kek()).unwrap();
    assert_eq!(store.pending("alice", "bob"), 1);
    let got = store
        .take("bob", &["alice".to_owned()], &[id], 0)
        .await
        .unwrap();
    assert_eq!(got[0].material.as_bytes(), &[6; 32]);
}

fn ready(seq: u64) -> PoolKey {
    PoolKey {
        slot: Slot {
            seq,
            id: Uuid::new_v4(),
        },
        material: crate::KeyMaterial::new(vec![seq as u8; 32]),
        expires_at: u64::MAX,
    }
}

fn seqs(page: &[ReadyKey]) -> Vec<u64> {
    page.iter().map(|k| k.slot.seq).collect()
}

/// Pages list what the database holds as changed by the changes not yet checkpointed:
/// removals hide entries, new entries appear in position order, and a page stops at its
/// limit wherever its entries come from.
#[tokio::test]
async fn pages_merge_recent_changes_over_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let store = EmbeddedStore::open(&path, kek()).unwrap();
    store
        .pool_insert("A>B", (1..=6).map(ready).collect())
        .await
        .unwrap();
    drop(store); // a clean close files everything in the database
    let store = EmbeddedStore::open(&path, kek()).unwrap();
    assert_eq!(store.pool_remove("A>B", &[2, 5]).await.unwrap(), 2);
    store
        .pool_insert("A>B", vec![ready(7), ready(8)])
        .await
        .unwrap();
    store.pool_insert("A>C", vec![ready(3)]).await.unwrap();
    assert_eq!(
        seqs(&store.pool_page("A>B", None, 3).await.unwrap()),
        [1, 3, 4]
    );
    assert_eq!(
        seqs(&store.pool_page("A>B", Some(4), 10).await.unwrap()),
        [6, 7, 8]
    );
    assert_eq!(seqs(&store.pool_page("A>C", None, 10).await.unwrap()), [3]);
    // A removed position cannot be bound, whichever layer held it.
    assert_eq!(store.pool_remove("A>B", &[2, 7]).await.unwrap(), 1);
    drop(store);
    let store = EmbeddedStore::open(&path, kek()).unwrap();
    assert_eq!(
        seqs(&store.pool_page("A>B", None, 10).await.unwrap()),
        [1, 3, 4, 6, 8]
    );
}
