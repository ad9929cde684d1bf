//! The BLAST-style key source against real entropy servers: a fresh cluster CA, entropy
//! servers started in-process on 127.0.0.1:0 over mutual TLS, and one `Blast` per KME,
//! each with its own KME certificate. Site A generates; B (and C) only get the metadata.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dqkd_entropy::{Config, EntropyClient, Serving};
use dqkd_kme::blast::Blast;
use dqkd_kme::keysource::{Batch, KeySource, KeySourceError};
use dqkd_net::{KeyExchange, Versions};
use dqkd_pki::{init_ca, load_ca, IssueOptions, Role};
use uuid::Uuid;

const CLUSTER: &str = "test";
const KMES: [&str; 3] = ["KME_A", "KME_B", "KME_C"];
/// Blocks per key and leaked blocks tolerated, as in the local cluster.
const N: u8 = 3;
const C: u8 = 1;

/// A cluster CA, KME certificates and `count` running entropy servers `E1 … E<count>`.
struct Cluster {
    dir: tempfile::TempDir,
    ids: Vec<String>,
    urls: Vec<String>,
    serving: Vec<Option<Serving>>,
}

impl Cluster {
    /// Starts `count` servers; `extra` is added to every server's TOML, and the servers
    /// whose index is in `liars` flip a bit of every range they serve to readers.
    async fn start(count: usize, extra: &str, liars: &[usize]) -> Self {
        Self::start_configured(count, extra, |j, config| {
            config.insecure_corrupt_reads = liars.contains(&j);
        })
        .await
    }

    /// Starts `count` servers; `extra` is added to every server's TOML, and `adjust` may
    /// change server `j`'s loaded configuration (the test-only switches).
    async fn start_configured(
        count: usize,
        extra: &str,
        adjust: impl Fn(usize, &mut Config),
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids: Vec<String> = (1..=count).map(|j| format!("E{j}")).collect();
        make_pki(dir.path(), &ids);
        let (mut urls, mut serving) = (Vec::new(), Vec::new());
        for (j, id) in ids.iter().enumerate() {
            let mut config = Config::load(&write_config(dir.path(), id, extra)).expect("config");
            adjust(j, &mut config);
            let server = dqkd_entropy::run(config)
                .await
                .expect("start entropy server");
            urls.push(format!("https://{}", server.api_addr()));
            serving.push(Some(server));
        }
        Self {
            dir,
            ids,
            urls,
            serving,
        }
    }

    /// The key source of `kme`, knowing every server of the cluster (up or not).
    fn blast(&self, kme: &str) -> Blast {
        let path = |rel: String| self.dir.path().join(rel);
        let servers = self
            .ids
            .iter()
            .zip(&self.urls)
            .map(|(id, url)| {
                let tls = pinned(
                    &path("pki/ca.pem".into()),
                    &path(format!("pki/kme/{kme}.pem")),
                    &path(format!("pki/kme/{kme}.key")),
                    id,
                );
                let client = EntropyClient::new(url, id, tls).expect("entropy client");
                (id.clone(), client)
            })
            .collect();
        Blast::new(servers, N, C).expect("blast")
    }

    /// Stops server `index` (0-based: `E<index + 1>`); its port then refuses connections.
    async fn kill(&mut self, index: usize) {
        let server = self.serving[index].take().expect("server running");
        server.shutdown().await;
    }

    async fn stop(mut self) {
        for server in self.serving.iter_mut().filter_map(Option::take) {
            server.shutdown().await;
        }
    }
}

fn make_pki(dir: &Path, entropy: &[String]) {
    let opts = |sub: &str| IssueOptions {
        out_dir: dir.join(sub),
        ..IssueOptions::default()
    };
    init_ca(CLUSTER, &dir.join("pki"), false).expect("init CA");
    let ca = load_ca(&dir.join("pki")).expect("load CA");
    for kme in KMES {
        ca.issue(Role::Kme, kme, &opts("pki/kme"))
            .expect("issue KME");
    }
    for id in entropy {
        ca.issue(Role::Entropy, id, &opts("pki/entropy"))
            .expect("issue entropy");
    }
}

fn write_config(dir: &Path, id: &str, extra: &str) -> PathBuf {
    let path = dir.join(format!("entropy-{id}.toml"));
    let text = format!(
        r#"cluster = "{CLUSTER}"
server_id = "{id}"
listen = "127.0.0.1:0"
{extra}
[tls]
ca = "pki/ca.pem"
cert = "pki/entropy/{id}.pem"
key = "pki/entropy/{id}.key"
"#
    );
    std::fs::write(&path, text).expect("write entropy config");
    path
}

fn to_b() -> Vec<String> {
    vec!["KME_B".into()]
}

fn metadata(batch: &Batch) -> &[u8] {
    batch
        .metadata
        .as_deref()
        .expect("cross-site batch has metadata")
}

/// The entropy servers a batch drew its blocks from.
fn servers_used(batch: &Batch) -> Vec<String> {
    let meta = dqkd_keygen::metadata::decode(metadata(batch)).expect("decode metadata");
    meta.ranges.into_iter().map(|r| r.server_id).collect()
}

fn assert_same_keys(ours: &Batch, theirs: &[(Uuid, dqkd_store::KeyMaterial)]) {
    assert_eq!(ours.keys.len(), theirs.len());
    for ((id_a, key_a), (id_b, key_b)) in ours.keys.iter().zip(theirs) {
        assert_eq!(id_a, id_b);
        assert_eq!(key_a.as_bytes(), key_b.as_bytes(), "key {id_a}");
    }
}

/// Asserts a `Regenerate` error whose text names one of the servers and contains `reason`.
fn assert_regenerate_refused(result: Result<impl Sized, KeySourceError>, reason: &str) {
    let err = result.err().expect("regeneration must be refused");
    let text = err.to_string();
    assert!(matches!(err, KeySourceError::Regenerate(_)), "{err:?}");
    assert!(text.contains(reason), "{text:?} lacks {reason:?}");
    assert!(
        (1..=4).any(|j| text.contains(&format!("entropy server E{j} "))),
        "{text:?} names no server"
    );
}

#[tokio::test]
async fn peers_sharing_only_metadata_derive_identical_keys() {
    let cluster = Cluster::start(3, "", &[]).await;
    let (a, b) = (cluster.blast("KME_A"), cluster.blast("KME_B"));
    // Whole and partial last columns of the extraction (32 = 2 * 16, 17 odd, 1 byte).
    for (count, len) in [(4, 32), (3, 17), (1, 1)] {
        let batch = a.generate(count, len, &to_b()).await.unwrap();
        assert_eq!(batch.keys.len(), count);
        assert!(batch.keys.iter().all(|(_, k)| k.as_bytes().len() == len));
        assert_eq!(servers_used(&batch), ["E1", "E2", "E3"]);
        let regenerated = b.regenerate(metadata(&batch)).await.unwrap();
        assert_same_keys(&batch, &regenerated);
    }
    let batch = a.generate(2, 32, &to_b()).await.unwrap();
    assert_ne!(batch.keys[0].1.as_bytes(), batch.keys[1].1.as_bytes());
    assert_ne!(batch.keys[0].1.as_bytes(), [0u8; 32]);
    cluster.stop().await;
}

#[tokio::test]
async fn kme_not_named_as_reader_is_refused() {
    let cluster = Cluster::start(3, "", &[]).await;
    let a = cluster.blast("KME_A");
    let batch = a.generate(2, 32, &to_b()).await.unwrap();
    assert_regenerate_refused(
        cluster.blast("KME_C").regenerate(metadata(&batch)).await,
        "KME_C is not a reader of this range",
    );
    // Nor is the allocator a reader unless it names itself.
    assert_regenerate_refused(
        a.regenerate(metadata(&batch)).await,
        "KME_A is not a reader of this range",
    );
    // The refusals did not use up B's read.
    let regenerated = cluster
        .blast("KME_B")
        .regenerate(metadata(&batch))
        .await
        .unwrap();
    assert_same_keys(&batch, &regenerated);
    cluster.stop().await;
}

#[tokio::test]
async fn second_regeneration_is_refused_as_already_read() {
    let cluster = Cluster::start(3, "", &[]).await;
    let b = cluster.blast("KME_B");
    let batch = cluster
        .blast("KME_A")
        .generate(2, 32, &to_b())
        .await
        .unwrap();
    b.regenerate(metadata(&batch)).await.unwrap();
    assert_regenerate_refused(
        b.regenerate(metadata(&batch)).await,
        "range already read by KME_B",
    );
    cluster.stop().await;
}

#[tokio::test]
async fn regeneration_after_the_pool_ttl_fails_as_expired() {
    let cluster = Cluster::start(3, "pool_ttl_secs = 2\npool_rotate_secs = 1", &[]).await;
    let (a, b) = (cluster.blast("KME_A"), cluster.blast("KME_B"));
    let early = a.generate(1, 32, &to_b()).await.unwrap();
    let late = a.generate(1, 32, &to_b()).await.unwrap();
    // Within the TTL the same servers serve the ranges.
    b.regenerate(metadata(&early)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_regenerate_refused(
        b.regenerate(metadata(&late)).await,
        "range unknown or expired (shredded)",
    );
    cluster.stop().await;
}

#[tokio::test]
async fn metadata_from_a_site_running_the_retired_version_is_refused_clearly() {
    let cluster = Cluster::start(3, "", &[]).await;
    let batch = cluster
        .blast("KME_A")
        .generate(1, 32, &to_b())
        .await
        .unwrap();
    // Version 1 (HMAC tag keyed with the key) had the same layout but for the version byte.
    let mut v1 = metadata(&batch).to_vec();
    assert_eq!(v1[0], dqkd_keygen::metadata::VERSION);
    v1[0] = 1;
    let b = cluster.blast("KME_B");
    let err = b.regenerate(&v1).await.expect_err("version 1 is retired");
    let text = err.to_string();
    assert!(matches!(err, KeySourceError::BadMetadata(_)), "{err:?}");
    assert!(
        text.contains("version 1 is retired") && text.contains("older dqkd"),
        "{text}"
    );
    // Refusing it read nothing: the version-2 metadata still regenerates the key.
    let regenerated = b.regenerate(metadata(&batch)).await.unwrap();
    assert_same_keys(&batch, &regenerated);
    cluster.stop().await;
}

#[tokio::test]
async fn altered_bytes_are_caught_by_the_confirmation_tag() {
    // E2 gives the allocator true bytes and readers bytes with one bit flipped.
    let cluster = Cluster::start(3, "", &[1]).await;
    let batch = cluster
        .blast("KME_A")
        .generate(3, 32, &to_b())
        .await
        .unwrap();
    assert!(servers_used(&batch).contains(&"E2".to_owned()));
    let err = cluster
        .blast("KME_B")
        .regenerate(metadata(&batch))
        .await
        .expect_err("altered bytes must not give keys");
    // The flipped bit is in the first byte of the range, so the first key is wrong.
    let first = batch.keys[0].0;
    assert!(
        matches!(err, KeySourceError::Confirmation { key_id } if key_id == first),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&first.to_string()) && text.contains("answered the sites differently"),
        "{text}"
    );
    cluster.stop().await;
}

#[tokio::test]
async fn a_server_down_is_replaced_by_another() {
    let mut cluster = Cluster::start(4, "", &[]).await;
    // E2 is among the first three a fresh generator tries.
    cluster.kill(1).await;
    let (a, b) = (cluster.blast("KME_A"), cluster.blast("KME_B"));
    for _ in 0..2 {
        let batch = a.generate(2, 32, &to_b()).await.unwrap();
        let used = servers_used(&batch);
        assert_eq!(used.len(), usize::from(N));
        assert!(!used.contains(&"E2".to_owned()), "{used:?}");
        let regenerated = b.regenerate(metadata(&batch)).await.unwrap();
        assert_same_keys(&batch, &regenerated);
    }
    cluster.stop().await;
}

#[tokio::test]
async fn fewer_than_n_servers_up_is_unavailable_naming_the_failures() {
    let mut cluster = Cluster::start(4, "", &[]).await;
    cluster.kill(1).await;
    cluster.kill(3).await;
    let err = cluster
        .blast("KME_A")
        .generate(1, 32, &to_b())
        .await
        .err()
        .expect("two of four servers cannot give n = 3 blocks");
    let text = err.to_string();
    assert!(matches!(err, KeySourceError::Unavailable(_)), "{err:?}");
    assert!(
        text.contains("only 2 of the 3 entropy servers needed answered"),
        "{text}"
    );
    for dead in ["E2", "E4"] {
        assert!(
            text.contains(&format!("entropy server {dead} unreachable")),
            "{text:?} does not name {dead}"
        );
    }
    assert!(!text.contains("E1:") && !text.contains("E3:"), "{text}");
    cluster.stop().await;
}

#[tokio::test]
async fn regeneration_with_a_server_down_is_unavailable() {
    let mut cluster = Cluster::start(3, "", &[]).await;
    let batch = cluster
        .blast("KME_A")
        .generate(1, 32, &to_b())
        .await
        .unwrap();
    cluster.kill(2).await;
    let err = cluster
        .blast("KME_B")
        .regenerate(metadata(&batch))
        .await
        .expect_err("a block is missing");
    let text = err.to_string();
    assert!(matches!(err, KeySourceError::Unavailable(_)), "{err:?}");
    assert!(text.contains("entropy server E3 unreachable"), "{text}");
    cluster.stop().await;
}

/// Starts `count` servers of which server `stuck` (0-based) hands out all-zero ranges, as a
/// server whose source died unnoticed (or a fake) would.
async fn with_a_stuck_server(count: usize, stuck: usize) -> Cluster {
    Cluster::start_configured(count, "", |j, config| {
        config.insecure_stuck_output = j == stuck;
    })
    .await
}

#[tokio::test]
async fn a_server_serving_stuck_bytes_is_routed_around() {
    // E2 is among the first three a fresh generator tries.
    let cluster = with_a_stuck_server(4, 1).await;
    let (a, b) = (cluster.blast("KME_A"), cluster.blast("KME_B"));
    for _ in 0..3 {
        let batch = a.generate(4, 32, &to_b()).await.unwrap();
        let used = servers_used(&batch);
        assert_eq!(used.len(), usize::from(N));
        assert!(!used.contains(&"E2".to_owned()), "{used:?}");
        assert!(batch.keys.iter().all(|(_, k)| k.as_bytes() != [0u8; 32]));
        let regenerated = b.regenerate(metadata(&batch)).await.unwrap();
        assert_same_keys(&batch, &regenerated);
    }
    cluster.stop().await;
}

#[tokio::test]
async fn with_fewer_than_n_healthy_servers_no_keys_are_issued() {
    let cluster = with_a_stuck_server(3, 1).await;
    let err = cluster
        .blast("KME_A")
        .generate(4, 32, &to_b())
        .await
        .err()
        .expect("two healthy servers cannot give n = 3 blocks");
    let text = err.to_string();
    assert!(matches!(err, KeySourceError::Unavailable(_)), "{err:?}");
    assert!(
        text.contains("only 2 of the 3 entropy servers needed answered")
            && text.contains("entropy server E2 sent a block that failed its health test")
            && text.contains("repetition count test failed: byte 0x00"),
        "{text}"
    );
    cluster.stop().await;
}

/// A client presenting the KME certificate `cert`/`key` that accepts only entropy server
/// `server`.
fn pinned(ca: &Path, cert: &Path, key: &Path, server: &str) -> dqkd_net::PinnedClient {
    let files = dqkd_net::TlsFiles::new(ca.to_owned(), cert.to_owned(), key.to_owned());
    let server = dqkd_pki::Identity::new(CLUSTER, dqkd_pki::Role::Entropy, server).expect("ID");
    dqkd_net::OutgoingTls::single(&files, KeyExchange::HybridOnly, server, Versions::Any)
        .expect("client")
}

/// With allocations made ahead, a small batch soon finds its ranges already here: each a
/// range longer than the batch needs, which the peer reads whole and derives the same keys
/// from. No range serves two batches.
#[tokio::test]
async fn a_batch_uses_ranges_made_ahead_and_the_peer_derives_the_same_keys() {
    let cluster = Cluster::start(3, "", &[]).await;
    let a = cluster.blast("KME_A").allocating_ahead_always();
    let b = cluster.blast("KME_B");
    let len = 32;
    let need = dqkd_keygen::metadata::key_block_len(len, N, C).expect("block") as u64;
    let mut seen = std::collections::HashSet::new();
    let mut from_stock = 0;
    for _ in 0..50 {
        let batch = a.generate(1, len, &to_b()).await.unwrap();
        let meta = dqkd_keygen::metadata::decode(metadata(&batch)).expect("metadata");
        for range in &meta.ranges {
            let fresh = seen.insert((range.server_id.clone(), range.pool_id, range.offset));
            assert!(fresh, "range {range:?} served two batches");
        }
        // A range allocated for the batch is exactly its size; a stocked one is longer.
        if meta.ranges.iter().all(|r| r.len > need) {
            from_stock += 1;
        }
        let regenerated = b.regenerate(metadata(&batch)).await.unwrap();
        assert_same_keys(&batch, &regenerated);
        if from_stock == 3 {
            break;
        }
    }
    assert_eq!(from_stock, 3, "batches that found their ranges made ahead");
    cluster.stop().await;
}
