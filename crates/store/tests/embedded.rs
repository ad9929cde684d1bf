//! Tests only the durable store needs: persistence, the KEK, encryption at rest, group-commit
//! isolation and crash safety under a real `SIGKILL`.

// Shared test bodies are plain functions, not #[test]s: an unwrap here is an assertion.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use dqkd_store::{
    EmbeddedStore, Kek, KeyMaterial, KeyStore, NewKey, PoolGrant, PoolKey, Slot, StoreError,
    TakeError, Uuid,
};
use redb::ReadableTable;
use ring::rand::{SecureRandom, SystemRandom};

const KEK: [u8; 32] = [0x11; 32];

fn open(path: &Path) -> EmbeddedStore {
    EmbeddedStore::open(path, Kek::from_bytes(KEK)).unwrap()
}

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

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    SystemRandom::new().fill(&mut v).unwrap();
    v
}

#[tokio::test]
async fn reopen_keeps_keys_and_rebuilds_counts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let k1 = key("alice", &["bob", "carol"], vec![1; 32]);
    let k2 = key("alice", &["bob"], vec![2; 32]);
    let (i1, i2) = (k1.id, k2.id);
    {
        let s = open(&path);
        s.insert(vec![k1, k2]).await.unwrap();
        s.take("bob", &alice(), &[i1], 0).await.unwrap();
    }
    let s = open(&path);
    assert_eq!(
        s.replayed_at_open(),
        0,
        "a clean close leaves no log to apply"
    );
    assert_eq!(s.pending("alice", "bob"), 1);
    assert_eq!(s.pending("alice", "carol"), 1);
    let r = s.take("bob", &alice(), &[i1], 0).await;
    assert!(matches!(r, Err(TakeError::NotFound)), "{r:?}");
    let got = s.take("carol", &alice(), &[i1], 0).await.unwrap();
    assert_eq!(got[0].material.as_bytes(), &[1; 32]);
    let got = s.take("bob", &alice(), &[i2], 0).await.unwrap();
    assert_eq!(got[0].material.as_bytes(), &[2; 32]);
}

/// A version 7 key ID made at Unix second `secs` (random low bits).
fn v7_made_at(secs: u64) -> Uuid {
    let low = u128::from_be_bytes(random_bytes(16).try_into().unwrap()) & ((1 << 76) - 1);
    Uuid::from_u128((u128::from(secs * 1000) << 80) | (0x7 << 76) | low)
}

fn key_made_at(id: Uuid, expires_at: u64) -> NewKey {
    NewKey {
        id,
        expires_at,
        ..key("alice", &["bob"], vec![3; 32])
    }
}

/// A sweep reads only keys old enough to have expired (by the shortest lifetime stored):
/// every expired key is still found, whatever its age and lifetime, in the database and
/// in memory, and a key whose ID carries no creation time makes the sweep read everything.
#[tokio::test]
async fn expiry_sweeps_find_every_expired_key() {
    const NOW: u64 = 2_000_000_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    // Short-lived and expired; long-lived, old and not expired; long-lived and expired.
    let short = key_made_at(v7_made_at(NOW - 50), NOW - 5);
    let old = key_made_at(v7_made_at(NOW - 1_000), NOW + 2_600);
    let long = key_made_at(v7_made_at(NOW - 4_000), NOW - 400);
    let (short_id, old_id) = (short.id, old.id);
    {
        let s = open(&path);
        s.insert(vec![short, old, long]).await.unwrap();
    }
    let s = open(&path); // all three in the database now
    assert_eq!(s.purge_expired(NOW).await.unwrap(), 2);
    let r = s.take("bob", &alice(), &[short_id], 0).await;
    assert!(matches!(r, Err(TakeError::NotFound)), "{r:?}");
    assert_eq!(
        s.pending("alice", "bob"),
        1,
        "only the unexpired key is left"
    );
    // A key made just now, still only in memory, that expired.
    let fresh = key_made_at(v7_made_at(NOW - 3), NOW - 1);
    s.insert(vec![fresh]).await.unwrap();
    assert_eq!(s.purge_expired(NOW).await.unwrap(), 1);
    drop(s);
    // An expired key whose version 4 ID sorts after every version 7 one.
    let mut untimed = key("alice", &["bob"], vec![4; 32]);
    untimed.id = Uuid::from_u128(!(0xF << 76) | (0x4 << 76));
    untimed.expires_at = NOW - 1;
    {
        let s = open(&path);
        s.insert(vec![untimed]).await.unwrap();
    }
    let s = open(&path);
    assert_eq!(s.purge_expired(NOW).await.unwrap(), 1);
    let got = s.take("bob", &alice(), &[old_id], 0).await.unwrap();
    assert_eq!(got[0].material.as_bytes(), &[3; 32]);
}

/// Ready keys expire by the same rule, by pool position: the first sweep after a start
/// reads every ready key and learns their lifetimes, and later sweeps read only positions
/// old enough to have expired, on every link, and still find each expired key.
#[tokio::test]
async fn expiry_sweeps_find_every_expired_ready_key() {
    const NOW: u64 = 2_000_000_000;
    const NS: u64 = 1_000_000_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let ready = |secs: u64, expires_at: u64| PoolKey {
        slot: Slot {
            seq: secs * NS,
            id: Uuid::new_v4(),
        },
        material: KeyMaterial::new(vec![5; 32]),
        expires_at,
    };
    {
        let s = open(&path);
        // Short-lived and long-lived on one link; short-lived on another.
        s.pool_insert(
            "A>B",
            vec![ready(NOW - 1_000, NOW + 2_600), ready(NOW - 50, NOW - 5)],
        )
        .await
        .unwrap();
        s.pool_insert("A>C", vec![ready(NOW - 60, NOW - 10)])
            .await
            .unwrap();
    }
    let s = open(&path); // all in the database now
    assert_eq!(
        s.purge_expired(NOW - 100).await.unwrap(),
        0,
        "the whole sweep"
    );
    assert_eq!(s.purge_expired(NOW).await.unwrap(), 2, "a bounded sweep");
    assert_eq!(s.pool_page("A>B", None, 10).await.unwrap().len(), 1);
    assert!(s.pool_page("A>C", None, 10).await.unwrap().is_empty());
}

/// A new key's ID is refused when the database already holds it, whether the batch's IDs
/// surround it or it comes alone, and a batch whose IDs only surround stored ones is stored.
#[tokio::test]
async fn an_id_filed_in_the_database_is_refused_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let (before, stored, after) = (
        v7_made_at(1_000_000),
        v7_made_at(1_000_001),
        v7_made_at(1_000_002),
    );
    {
        let s = open(&path);
        s.insert(vec![key_made_at(stored, u64::MAX)]).await.unwrap();
    }
    let s = open(&path); // `stored` is in the database, not in memory
    for batch in [vec![before, stored, after], vec![stored]] {
        let keys = batch.iter().map(|&id| key_made_at(id, u64::MAX)).collect();
        let r = s.insert(keys).await;
        assert!(
            matches!(r, Err(StoreError::DuplicateId { id }) if id == stored),
            "{r:?}"
        );
    }
    let keys = [before, after].map(|id| key_made_at(id, u64::MAX));
    s.insert(keys.to_vec()).await.unwrap();
    assert_eq!(s.pending("alice", "bob"), 3);
}

/// Ready keys survive a restart sealed (never in clear in the file) and bind afterwards.
#[tokio::test]
async fn ready_keys_survive_reopen_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let ready: Vec<PoolKey> = (0..200)
        .map(|seq| PoolKey {
            slot: Slot {
                seq,
                id: Uuid::new_v4(),
            },
            material: KeyMaterial::new(random_bytes(32)),
            expires_at: u64::MAX,
        })
        .collect();
    let secrets: HashSet<Vec<u8>> = ready
        .iter()
        .map(|k| k.material.as_bytes().to_vec())
        .collect();
    {
        let s = open(&path);
        s.pool_insert("site-a>site-b", ready.clone()).await.unwrap();
    }
    let file = std::fs::read(&path).unwrap();
    let found = file.windows(32).filter(|w| secrets.contains(*w)).count();
    assert_eq!(found, 0, "ready key bytes found in clear in the store file");

    let s = open(&path);
    let listed = s.pool_list("site-a>site-b").await.unwrap();
    assert_eq!(listed.len(), 200);
    assert_eq!(listed[0].slot, ready[0].slot);
    let first = ready[0].slot.id;
    let got = s
        .pool_bind(
            "site-a>site-b",
            vec![PoolGrant {
                slots: vec![ready[0].slot],
                master: "alice".into(),
                slaves: vec!["bob".into()],
                expires_at: u64::MAX,
            }],
            0,
        )
        .await
        .unwrap();
    assert_eq!(got[0].material.as_bytes(), ready[0].material.as_bytes());
    drop(s);
    let s = open(&path);
    assert_eq!(s.pool_list("site-a>site-b").await.unwrap().len(), 199);
    assert_eq!(
        s.pending("alice", "bob"),
        1,
        "the bound key survives as an ordinary key"
    );
    let got = s.take("bob", &alice(), &[first], 0).await.unwrap();
    assert_eq!(got[0].material.as_bytes(), ready[0].material.as_bytes());
}

/// Stores of earlier versions kept ready keys in a table keyed by ID; opening one drops that
/// table (ready keys belong to no one) and keeps every ordinary key.
#[tokio::test]
async fn old_pool_layout_is_discarded_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let kept = key("alice", &["bob"], vec![4; 32]);
    {
        let s = open(&path);
        s.insert(vec![kept.clone()]).await.unwrap();
    }
    const OLD: redb::TableDefinition<u128, &[u8]> = redb::TableDefinition::new("pool");
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(OLD)
            .unwrap()
            .insert(7u128, &b"stale"[..])
            .unwrap();
        txn.commit().unwrap();
    }
    let s = open(&path);
    assert_eq!(s.pending("alice", "bob"), 1);
    drop(s);
    let db = redb::Database::open(&path).unwrap();
    let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
    assert!(
        matches!(
            txn.open_table(OLD),
            Err(redb::TableError::TableDoesNotExist(_))
        ),
        "the old pool table is dropped"
    );
}

/// The store holds key IDs and SAE names in clear: its folder is 0700 and its files (database,
/// log, spare log) 0600, for a new store and for one an earlier version left readable.
#[cfg(unix)]
#[tokio::test]
async fn store_files_are_private_to_the_kme_user() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("data");
    let path = folder.join("keys.redb");
    let file = |suffix: &str| folder.join(format!("keys.redb{suffix}"));
    {
        let s = open(&path);
        // A checkpoint (about once a second) moves the log aside; once it is on disk the
        // old log is kept as the spare.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !file(".wal.spare").exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "no spare log appeared"
            );
            s.insert(vec![key("alice", &["bob"], vec![7; 32])])
                .await
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(mode(&folder), 0o700);
        for f in [path.clone(), file(".wal"), file(".wal.spare")] {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
    }
    // As an earlier version left them: everything readable.
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in [path.clone(), file(".wal"), file(".wal.spare")] {
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let _s = open(&path);
    assert_eq!(mode(&folder), 0o700);
    for f in [path.clone(), file(".wal"), file(".wal.spare")] {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
}

#[tokio::test]
async fn wrong_kek_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    {
        let s = open(&path);
        s.insert(vec![key("alice", &["bob"], vec![3; 32])])
            .await
            .unwrap();
    }
    let err = EmbeddedStore::open(&path, Kek::from_bytes([0x22; 32])).unwrap_err();
    assert!(matches!(err, StoreError::WrongKek { .. }), "{err:?}");
    assert!(err.to_string().contains("keys.redb"), "{err}");
    // The right KEK still opens it.
    let s = open(&path);
    assert_eq!(s.pending("alice", "bob"), 1);
}

#[tokio::test]
async fn kek_file_opens_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let kek_path = dir.path().join("site.kek");
    Kek::generate_file(&kek_path, false).unwrap();
    let path = dir.path().join("keys.redb");
    let k = key("alice", &["bob"], vec![4; 32]);
    let id = k.id;
    {
        let s = EmbeddedStore::open(&path, Kek::load(&kek_path).unwrap()).unwrap();
        s.insert(vec![k]).await.unwrap();
    }
    let s = EmbeddedStore::open(&path, Kek::load(&kek_path).unwrap()).unwrap();
    let got = s.take("bob", &alice(), &[id], 0).await.unwrap();
    assert_eq!(got[0].material.as_bytes(), &[4; 32]);
}

#[tokio::test]
async fn file_holds_no_plaintext_key_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let marker = "alice-plaintext-marker";
    let keys: Vec<NewKey> = (0..1000)
        .map(|_| key(marker, &["bob"], random_bytes(32)))
        .collect();
    let secrets: HashSet<Vec<u8>> = keys
        .iter()
        .map(|k| k.material.as_bytes().to_vec())
        .collect();
    assert_eq!(secrets.len(), 1000);
    {
        let s = open(&path);
        for chunk in keys.chunks(100) {
            s.insert(chunk.to_vec()).await.unwrap();
        }
    }
    let file = std::fs::read(&path).unwrap();
    // The scan can see clear text: metadata (the master name) is stored unencrypted.
    assert!(file.windows(marker.len()).any(|w| w == marker.as_bytes()));
    let found = file.windows(32).filter(|w| secrets.contains(*w)).count();
    assert_eq!(found, 0, "key bytes found in clear in the store file");
}

#[tokio::test]
async fn record_moved_to_another_id_does_not_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let k = key("alice", &["bob"], vec![5; 32]);
    let id = k.id;
    {
        let s = open(&path);
        s.insert(vec![k]).await.unwrap();
    }
    let moved = Uuid::new_v4();
    {
        let table: redb::TableDefinition<u128, &[u8]> = redb::TableDefinition::new("keys");
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(table).unwrap();
            let value = t.get(id.as_u128()).unwrap().unwrap().value().to_vec();
            t.insert(moved.as_u128(), value.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let s = open(&path);
    let r = s.take("bob", &alice(), &[moved], 0).await;
    assert!(
        matches!(r, Err(TakeError::Store(StoreError::Crypto { .. }))),
        "{r:?}"
    );
    // The failed take changed nothing; the original still opens.
    let got = s.take("bob", &alice(), &[id], 0).await.unwrap();
    assert_eq!(got[0].material.as_bytes(), &[5; 32]);
}

#[tokio::test]
async fn corrupt_record_is_reported_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    drop(open(&path));
    let bad = Uuid::new_v4();
    {
        let table: redb::TableDefinition<u128, &[u8]> = redb::TableDefinition::new("keys");
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(table)
            .unwrap()
            .insert(bad.as_u128(), &[1u8, 0, 0][..])
            .unwrap();
        txn.commit().unwrap();
    }
    let err = EmbeddedStore::open(&path, Kek::from_bytes(KEK)).unwrap_err();
    assert!(
        matches!(err, StoreError::CorruptRecord { id, .. } if id == bad),
        "{err:?}"
    );
    assert!(err.to_string().contains(&bad.to_string()), "{err}");
}

#[tokio::test]
async fn closed_store_refuses_operations() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir.path().join("keys.redb"));
    s.close().unwrap();
    let r = s.insert(vec![key("alice", &["bob"], vec![6; 32])]).await;
    assert!(matches!(r, Err(StoreError::Closed)), "{r:?}");
    s.close().unwrap();
}

/// Many concurrent single-key inserts, some re-using one ID: the duplicates fail alone and
/// every other insert of the same batches lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_op_does_not_abort_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(open(&dir.path().join("keys.redb")));
    let shared = Uuid::new_v4();
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64u8)
        .map(|i| {
            let s = Arc::clone(&s);
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                let mut k = key("alice", &["bob"], vec![i; 32]);
                if i % 4 == 0 {
                    k.id = shared;
                }
                let id = k.id;
                barrier.wait().await;
                (i, id, s.insert(vec![k]).await)
            })
        })
        .collect();
    let mut stored = HashMap::new();
    let mut duplicates = 0;
    for t in tasks {
        let (i, id, r) = t.await.unwrap();
        match r {
            Ok(()) => {
                stored.insert(id, i);
            }
            Err(StoreError::DuplicateId { id: dup }) => {
                assert_eq!(dup, shared);
                duplicates += 1;
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(
        duplicates, 15,
        "exactly one of the 16 inserts of the shared id wins"
    );
    assert_eq!(stored.len(), 49);
    assert_eq!(s.pending("alice", "bob"), 49);
    let ids: Vec<Uuid> = stored.keys().copied().collect();
    let got = s.take("bob", &alice(), &ids, 0).await.unwrap();
    for k in got {
        assert_eq!(k.material.as_bytes(), &[stored[&k.id]; 32]);
    }
    let stats = s.commit_stats();
    assert!(stats.ops >= 65 && stats.batches <= stats.ops, "{stats:?}");
    println!("group commit: {stats:?}");
}

const CHILD_ENV: &str = "DQKD_STORE_CRASH_CHILD";
const CRASH_TEST: &str = "crash_after_answer_loses_nothing";

/// Child side: inserts keys from several tasks and takes some of them, printing each only
/// after the store answered, until the parent kills it.
fn crash_child(path: &Path) -> ! {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = Arc::new(open(path));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    for n in 0u64.. {
                        let bytes = random_bytes(32);
                        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                        let k = key("alice", &["bob"], bytes);
                        let id = k.id;
                        let will_take = n % 3 == 0;
                        s.insert(vec![k]).await.unwrap();
                        println!("KEY {id} {hex} {}", if will_take { "take" } else { "keep" });
                        if will_take {
                            s.take("bob", &alice(), &[id], 0).await.unwrap();
                            println!("TAKEN {id}");
                        }
                    }
                })
            })
            .collect();
        tokio::task::spawn_blocking(|| std::thread::sleep(std::time::Duration::from_secs(60)))
            .await
            .unwrap();
        drop(tasks);
    });
    // The parent should have killed us long ago.
    std::process::abort()
}

#[test]
fn crash_after_answer_loses_nothing() {
    if let Some(path) = std::env::var_os(CHILD_ENV) {
        crash_child(Path::new(&path));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([CRASH_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut output = Vec::new();
    let mut acknowledged = 0;
    while acknowledged < 300 {
        match lines.next() {
            Some(Ok(line)) => {
                acknowledged += usize::from(line.starts_with("KEY "));
                output.push(line);
            }
            _ => break,
        }
    }
    child.kill().unwrap(); // SIGKILL: no destructors, no flush of anything unanswered
    child.wait().unwrap();
    // Lines the child printed before it died are still in the pipe.
    output.extend(lines.map_while(Result::ok));

    // id -> (bytes, whether the child went on to take it)
    let mut inserted: HashMap<Uuid, (Vec<u8>, bool)> = HashMap::new();
    let mut taken: HashSet<Uuid> = HashSet::new();
    for line in &output {
        let parts: Vec<&str> = line.split(' ').collect();
        match parts.as_slice() {
            ["KEY", id, hex, intent @ ("take" | "keep")] => {
                let bytes = (0..32)
                    .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                    .collect();
                inserted.insert(id.parse().unwrap(), (bytes, *intent == "take"));
            }
            ["TAKEN", id] if id.len() == 36 => {
                taken.insert(id.parse().unwrap());
            }
            _ => {} // harness chatter, or a line cut by the kill
        }
    }
    assert!(
        inserted.len() >= 300,
        "child answered only {} inserts",
        inserted.len()
    );
    assert!(!taken.is_empty());

    // The write-ahead log the child left holds sealed records only.
    let log = std::fs::read(dir.path().join("keys.redb.wal")).unwrap();
    for (id, (bytes, _)) in &inserted {
        assert!(
            !log.windows(32).any(|w| w == bytes.as_slice()),
            "key {id} in clear in the write-ahead log"
        );
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = open(&path);
        // Killed between checkpoints: what came after the last one is applied from the log.
        assert!(s.replayed_at_open() > 0, "nothing to replay after kill -9");
        let mut in_flight = 0;
        for (id, (bytes, will_take)) in &inserted {
            let r = s.take("bob", &alice(), &[*id], 0).await;
            if taken.contains(id) {
                assert!(
                    matches!(r, Err(TakeError::NotFound)),
                    "{id} delivered twice: {r:?}"
                );
            } else if *will_take && matches!(r, Err(TakeError::NotFound)) {
                // The child's take of this key committed but was killed before it printed.
                in_flight += 1;
            } else {
                let got = r.unwrap_or_else(|e| panic!("acknowledged key {id} lost: {e:?}"));
                assert_eq!(got[0].material.as_bytes(), bytes.as_slice());
                let again = s.take("bob", &alice(), &[*id], 0).await;
                assert!(matches!(again, Err(TakeError::NotFound)), "{again:?}");
            }
        }
        assert!(in_flight <= 8, "at most one take in flight per child task");
        println!(
            "crash test: {} acknowledged inserts, {} acknowledged takes verified, \
             {in_flight} takes committed but unacknowledged",
            inserted.len(),
            taken.len()
        );
    });
}
