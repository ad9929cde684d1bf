//! The entropy server over real mutual TLS on 127.0.0.1: real certificates from a fresh
//! cluster CA, the server started in-process on port 0, KMEs and an SAE as clients.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dqkd_entropy::{Config, EntropyClient, EntropyError, ServeError, Serving};
use dqkd_net::{KeyExchange, Versions};
use dqkd_pki::{init_ca, load_ca, IssueOptions, Role};
use http::StatusCode;

const KMES: [&str; 3] = ["KME_A", "KME_B", "KME_C"];

/// A cluster CA with three KMEs, an SAE and the entropy server E1, plus a foreign CA with
/// a KME of the same name; and a running server.
struct Fixture {
    dir: tempfile::TempDir,
    serving: Option<Serving>,
}

fn make_pki(dir: &Path) {
    let opts = |sub: &str| IssueOptions {
        out_dir: dir.join(sub),
        ..IssueOptions::default()
    };
    init_ca("test", &dir.join("pki"), false).expect("init CA");
    let ca = load_ca(&dir.join("pki")).expect("load CA");
    for kme in KMES {
        ca.issue(Role::Kme, kme, &opts("pki/kme"))
            .expect("issue KME");
    }
    ca.issue(Role::Sae, "alice", &opts("pki/sae"))
        .expect("issue SAE");
    ca.issue(Role::Entropy, "E1", &opts("pki/entropy"))
        .expect("issue entropy");
    init_ca("test", &dir.join("other"), false).expect("init other CA");
    let other = load_ca(&dir.join("other")).expect("load other CA");
    other
        .issue(Role::Kme, "KME_A", &opts("other/kme"))
        .expect("issue foreign KME");
}

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("entropy.toml");
    std::fs::write(
        &path,
        format!(
            r#"cluster = "test"
server_id = "E1"
listen = "127.0.0.1:0"
{extra}
[tls]
ca = "pki/ca.pem"
cert = "pki/entropy/E1.pem"
key = "pki/entropy/E1.key"
"#
        ),
    )
    .expect("write config");
    path
}

impl Fixture {
    async fn start(extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        make_pki(dir.path());
        let config = Config::load(&write_config(dir.path(), extra)).expect("config");
        let serving = dqkd_entropy::run(config).await.expect("start server");
        Self {
            dir,
            serving: Some(serving),
        }
    }

    fn url(&self) -> String {
        let serving = self.serving.as_ref().expect("server running");
        format!("https://{}", serving.api_addr())
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A client presenting `pki/<role>/<id>` from the cluster CA.
    fn client(&self, role: &str, id: &str) -> EntropyClient {
        let tls = pinned(
            &self.path("pki/ca.pem"),
            &self.path(&format!("pki/{role}/{id}.pem")),
            &self.path(&format!("pki/{role}/{id}.key")),
            "E1",
        );
        EntropyClient::new(&self.url(), "E1", tls).expect("client")
    }

    fn kme(&self, id: &str) -> EntropyClient {
        self.client("kme", id)
    }

    async fn stop(mut self) {
        if let Some(serving) = self.serving.take() {
            serving.shutdown().await;
        }
    }
}

fn readers(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

/// Asserts a refusal with this status and message.
fn assert_refused(
    result: Result<impl std::fmt::Debug, EntropyError>,
    want: StatusCode,
    text: &str,
) {
    match result {
        Err(EntropyError::Refused {
            status, message, ..
        }) => {
            assert_eq!(status, want, "{message}");
            assert!(message.contains(text), "{message:?} lacks {text:?}");
        }
        other => panic!("expected {want} refusal, got {other:?}"),
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
}

#[tokio::test]
async fn reader_gets_the_same_bytes_exactly_once() {
    let fx = Fixture::start("").await;
    let (a, b, c) = (fx.kme("KME_A"), fx.kme("KME_B"), fx.kme("KME_C"));
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let range = a.allocate(4096, &readers(&["KME_B"])).await.unwrap();
    assert_eq!(range.server_id, "E1");
    assert_eq!(range.len, 4096);
    assert_eq!(range.bytes.len(), 4096);
    assert!(range.expires_at >= before + 299 && range.expires_at <= before + 301);
    assert!(range.bytes.iter().any(|&x| x != 0));

    let copy = b
        .read(&range.pool_id, range.offset, range.len)
        .await
        .unwrap();
    assert_eq!(*copy, *range.bytes);

    assert_refused(
        b.read(&range.pool_id, range.offset, range.len).await,
        StatusCode::GONE,
        "range already read by KME_B",
    );
    assert_refused(
        c.read(&range.pool_id, range.offset, range.len).await,
        StatusCode::FORBIDDEN,
        "KME_C is not a reader of this range",
    );
    // Naming readers does not make the allocator one.
    assert_refused(
        a.read(&range.pool_id, range.offset, range.len).await,
        StatusCode::FORBIDDEN,
        "KME_A is not a reader of this range",
    );
    // The next range never overlaps the first.
    let next = a.allocate(10, &[]).await.unwrap();
    assert!(next.pool_id != range.pool_id || next.offset >= range.offset + range.len);
    fx.stop().await;
}

#[tokio::test]
async fn wrong_offset_or_length_is_unknown() {
    let fx = Fixture::start("").await;
    let (a, b) = (fx.kme("KME_A"), fx.kme("KME_B"));
    let range = a.allocate(64, &readers(&["KME_B"])).await.unwrap();
    for (offset, len) in [(range.offset, 63), (range.offset + 1, 64)] {
        assert_refused(
            b.read(&range.pool_id, offset, len).await,
            StatusCode::NOT_FOUND,
            "range unknown or expired (shredded)",
        );
    }
    assert_refused(
        b.read(&[0u8; 16], 0, 64).await,
        StatusCode::NOT_FOUND,
        "range unknown or expired",
    );
    // The failed attempts did not use up B's read.
    let copy = b.read(&range.pool_id, range.offset, 64).await.unwrap();
    assert_eq!(*copy, *range.bytes);
    fx.stop().await;
}

#[tokio::test]
async fn two_readers_read_once_each() {
    let fx = Fixture::start("").await;
    let (a, b, c) = (fx.kme("KME_A"), fx.kme("KME_B"), fx.kme("KME_C"));
    let range = a
        .allocate(1000, &readers(&["KME_B", "KME_C"]))
        .await
        .unwrap();
    let from_b = b.read(&range.pool_id, range.offset, 1000).await.unwrap();
    assert_eq!(a.health_report().await.unwrap().live_bytes, 1000);
    let from_c = c.read(&range.pool_id, range.offset, 1000).await.unwrap();
    assert_eq!(*from_b, *range.bytes);
    assert_eq!(*from_c, *range.bytes);
    assert_eq!(a.health_report().await.unwrap().live_bytes, 0);
    for reader in [&b, &c] {
        assert_refused(
            reader.read(&range.pool_id, range.offset, 1000).await,
            StatusCode::GONE,
            "already read",
        );
    }
    fx.stop().await;
}

#[tokio::test]
async fn saes_are_refused_everywhere() {
    let fx = Fixture::start("").await;
    let sae = fx.client("sae", "alice");
    let range = fx
        .kme("KME_A")
        .allocate(16, &readers(&["alice"]))
        .await
        .unwrap();
    assert_refused(
        sae.allocate(16, &[]).await,
        StatusCode::FORBIDDEN,
        "only KMEs",
    );
    assert_refused(
        sae.read(&range.pool_id, range.offset, 16).await,
        StatusCode::FORBIDDEN,
        "only KMEs",
    );
    assert_refused(
        sae.health().await,
        StatusCode::FORBIDDEN,
        "dqkd://test/sae/alice",
    );
    assert_refused(
        sae.metrics().await,
        StatusCode::FORBIDDEN,
        "dqkd://test/sae/alice",
    );
    // The entropy server's own certificate may look at health but not allocate.
    let own = fx.client("entropy", "E1");
    own.health().await.unwrap();
    assert_refused(
        own.allocate(16, &[]).await,
        StatusCode::FORBIDDEN,
        "only KMEs",
    );
    fx.stop().await;
}

#[tokio::test]
async fn bad_requests_are_400() {
    let fx = Fixture::start("max_allocation = 1000").await;
    let a = fx.kme("KME_A");
    assert_refused(a.allocate(0, &[]).await, StatusCode::BAD_REQUEST, "len 0");
    assert_refused(
        a.allocate(1001, &[]).await,
        StatusCode::BAD_REQUEST,
        "1 to 1000",
    );
    a.allocate(1000, &[]).await.unwrap();
    let many: Vec<String> = (0..17).map(|i| format!("K{i}")).collect();
    assert_refused(
        a.allocate(8, &many).await,
        StatusCode::BAD_REQUEST,
        "at most 16",
    );
    assert_refused(
        a.allocate(8, &readers(&["KME_B", "KME_B"])).await,
        StatusCode::BAD_REQUEST,
        "named twice",
    );
    assert_refused(
        a.allocate(8, &readers(&["../x"])).await,
        StatusCode::BAD_REQUEST,
        "reader KME ID",
    );
    fx.stop().await;
}

#[tokio::test]
async fn ranges_expire_with_their_pool() {
    let fx = Fixture::start("pool_ttl_secs = 2\npool_rotate_secs = 1").await;
    let (a, b) = (fx.kme("KME_A"), fx.kme("KME_B"));
    let range = a.allocate(5000, &readers(&["KME_B"])).await.unwrap();
    let health = a.health_report().await.unwrap();
    assert_eq!((health.live_bytes, health.pools), (5000, 1));

    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_refused(
        b.read(&range.pool_id, range.offset, range.len).await,
        StatusCode::NOT_FOUND,
        "range unknown or expired (shredded)",
    );
    // The sweep runs every second: the bytes are released soon after the TTL.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let health = a.health_report().await.unwrap();
        if health.live_bytes == 0 && health.pools == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "not swept: {health:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = a.metrics().await.unwrap();
    assert_eq!(metric(&text, "dqkd_entropy_bytes_shredded_total"), 5000);
    fx.stop().await;
}

#[tokio::test]
async fn memory_bound_pushes_back_then_recovers() {
    let fx = Fixture::start(
        "max_allocation = 1024\nmax_live_bytes = 2048\nmax_live_bytes_per_kme = 2048",
    )
    .await;
    let (a, b) = (fx.kme("KME_A"), fx.kme("KME_B"));
    let first = a.allocate(1024, &readers(&["KME_B"])).await.unwrap();
    let _second = a.allocate(1024, &readers(&["KME_B"])).await.unwrap();
    let err = a.allocate(1, &readers(&["KME_B"])).await.unwrap_err();
    assert!(
        matches!(&err, EntropyError::PoolFull { message, .. } if message.contains("entropy pool full")),
        "{err:?}"
    );
    assert!(err.is_unavailable());
    // Ranges without readers hold nothing, so they are still served.
    a.allocate(1024, &[]).await.unwrap();
    b.read(&first.pool_id, first.offset, 1024).await.unwrap();
    a.allocate(1024, &readers(&["KME_B"])).await.unwrap();
    let text = a.metrics().await.unwrap();
    assert!(
        text.contains("dqkd_entropy_refusals_total{reason=\"pool_full\"} 1\n"),
        "{text}"
    );
    fx.stop().await;
}

#[tokio::test]
async fn a_greedy_kme_cannot_stop_another() {
    // Quota: the default, half of max_live_bytes.
    let fx = Fixture::start("max_allocation = 1024\nmax_live_bytes = 4096").await;
    let (a, b) = (fx.kme("KME_A"), fx.kme("KME_B"));
    // A names a reader that never reads, until it is refused.
    for _ in 0..2 {
        a.allocate(1024, &readers(&["KME_C"])).await.unwrap();
    }
    let err = a.allocate(1024, &readers(&["KME_C"])).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_refused(
        Err::<(), _>(err),
        StatusCode::SERVICE_UNAVAILABLE,
        "entropy quota of KME_A exceeded: 2048 unread bytes held for its ranges, 1024 more \
         would exceed max_live_bytes_per_kme (2048)",
    );
    // B still allocates, its whole quota.
    for _ in 0..2 {
        b.allocate(1024, &readers(&["KME_C"])).await.unwrap();
    }
    let text = a.metrics().await.unwrap();
    assert!(
        text.contains("dqkd_entropy_refusals_total{reason=\"quota_exceeded\"} 1\n"),
        "{text}"
    );
    fx.stop().await;
}

#[tokio::test]
async fn foreign_ca_fails_the_handshake() {
    let fx = Fixture::start("").await;
    let tls = pinned(
        &fx.path("pki/ca.pem"),
        &fx.path("other/kme/KME_A.pem"),
        &fx.path("other/kme/KME_A.key"),
        "E1",
    );
    let eve = EntropyClient::new(&fx.url(), "E1", tls).unwrap();
    let err = eve.allocate(16, &[]).await.unwrap_err();
    assert!(matches!(err, EntropyError::Unreachable { .. }), "{err:?}");
    fx.stop().await;
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let fx = Fixture::start("").await;
    let (a, b, c) = (fx.kme("KME_A"), fx.kme("KME_B"), fx.kme("KME_C"));
    let range = a.allocate(300, &readers(&["KME_B"])).await.unwrap();
    a.allocate(200, &[]).await.unwrap();
    b.read(&range.pool_id, range.offset, 300).await.unwrap();
    let _ = b.read(&range.pool_id, range.offset, 300).await;
    let _ = c.read(&range.pool_id, range.offset, 300).await;
    let _ = a.allocate(0, &[]).await;
    let text = a.metrics().await.unwrap();
    assert_eq!(metric(&text, "dqkd_entropy_bytes_allocated_total"), 500);
    assert_eq!(metric(&text, "dqkd_entropy_allocations_total"), 2);
    assert_eq!(metric(&text, "dqkd_entropy_bytes_served_total"), 300);
    assert_eq!(metric(&text, "dqkd_entropy_bytes_shredded_total"), 300);
    assert_eq!(metric(&text, "dqkd_entropy_live_bytes"), 0);
    for (reason, n) in [("already_read", 1), ("forbidden", 1), ("bad_request", 1)] {
        let line = format!("dqkd_entropy_refusals_total{{reason=\"{reason}\"}} {n}\n");
        assert!(text.contains(&line), "{line} missing in\n{text}");
    }
    fx.stop().await;
}

#[tokio::test]
async fn client_accepts_only_the_pinned_server() {
    // E1 answers where the client expects E2: a valid certificate of the cluster, but not
    // the identity the manifest names for that address. Refused at the handshake; no range.
    let fx = Fixture::start("").await;
    let tls = pinned(
        &fx.path("pki/ca.pem"),
        &fx.path("pki/kme/KME_A.pem"),
        &fx.path("pki/kme/KME_A.key"),
        "E2",
    );
    let wrong = EntropyClient::new(&fx.url(), "E2", tls).unwrap();
    let err = wrong.allocate(8, &[]).await.unwrap_err();
    assert!(matches!(err, EntropyError::Unreachable { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("dqkd://test/entropy/E1") && text.contains("dqkd://test/entropy/E2"),
        "the error names the identity found and the one expected: {text}"
    );
    fx.stop().await;
}

#[tokio::test]
async fn timeout_is_unavailable() {
    // A listener that accepts and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let p = |rel: &str| dir.path().join(rel);
    let tls = pinned(
        &p("pki/ca.pem"),
        &p("pki/kme/KME_A.pem"),
        &p("pki/kme/KME_A.key"),
        "E1",
    );
    let client = EntropyClient::new(&format!("https://{addr}"), "E1", tls)
        .unwrap()
        .with_timeout(Duration::from_millis(300));
    let err = client.allocate(8, &[]).await.unwrap_err();
    assert!(matches!(err, EntropyError::Timeout { .. }), "{err:?}");
    assert!(err.is_unavailable());
    hold.abort();
}

#[tokio::test]
async fn start_up_checks() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    // A KME certificate is not this entropy server's identity.
    let path = write_config(dir.path(), "");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("pki/entropy/E1", "pki/kme/KME_A");
    std::fs::write(&path, text).unwrap();
    let err = dqkd_entropy::run(Config::load(&path).unwrap())
        .await
        .err()
        .expect("must refuse a KME certificate");
    assert!(
        matches!(&err, ServeError::Tls(m) if m.contains("not of entropy server")),
        "{err}"
    );

    // An unreadable mix source is a start-up error.
    let path = write_config(dir.path(), "mix_file = \"no-such-device\"");
    let err = dqkd_entropy::run(Config::load(&path).unwrap())
        .await
        .err()
        .expect("must refuse a missing mix source");
    assert!(matches!(err, ServeError::Source(_)), "{err}");

    // A stuck one fails its health test at start, although XOR-ed with the OS output it
    // would look random.
    std::fs::write(dir.path().join("mix.bin"), [0x5au8; 65_536]).unwrap();
    let path = write_config(dir.path(), "mix_file = \"mix.bin\"\npool_max_bytes = 65536");
    let err = dqkd_entropy::run(Config::load(&path).unwrap())
        .await
        .err()
        .expect("must refuse a stuck mix source");
    assert!(
        err.to_string().contains("repetition count test failed"),
        "{err}"
    );

    // A mix file smaller than one pool would have to wrap around: refused.
    std::fs::write(dir.path().join("mix.bin"), random_bytes(65_535)).unwrap();
    let err = dqkd_entropy::run(Config::load(&path).unwrap())
        .await
        .err()
        .expect("must refuse a mix file smaller than a pool");
    assert!(
        err.to_string()
            .contains("holds 65535 bytes, less than the 65536 bytes one pool can draw"),
        "{err}"
    );

    // A good one is mixed in and the server works, until the file is used up: then
    // allocation stops with the reason, and /health and the metrics say so.
    std::fs::write(dir.path().join("mix.bin"), random_bytes(65_536)).unwrap();
    let serving = dqkd_entropy::run(Config::load(&path).unwrap())
        .await
        .unwrap();
    let tls = pinned(
        &dir.path().join("pki/ca.pem"),
        &dir.path().join("pki/kme/KME_A.pem"),
        &dir.path().join("pki/kme/KME_A.key"),
        "E1",
    );
    let a = EntropyClient::new(&format!("https://{}", serving.api_addr()), "E1", tls).unwrap();
    let range = a.allocate(10_000, &[]).await.unwrap();
    assert_eq!(range.bytes.len(), 10_000);
    assert_eq!(a.health_report().await.unwrap().status, "ok");
    for _ in 0..5 {
        a.allocate(10_000, &[]).await.unwrap();
    }
    let err = a.allocate(10_000, &[]).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_refused(
        Err::<(), _>(err),
        StatusCode::SERVICE_UNAVAILABLE,
        "is exhausted (a mix file is read once, never rewound)",
    );
    // Latched: even a byte is refused now.
    assert!(a.allocate(1, &[]).await.is_err());
    let health = a.health_report().await.unwrap();
    assert_eq!(health.status, "failed");
    assert!(
        health
            .entropy_failure
            .as_deref()
            .is_some_and(|r| r.contains("exhausted")),
        "{health:?}"
    );
    let text = a.metrics().await.unwrap();
    assert!(
        text.contains("dqkd_entropy_source_healthy{source=\"mix\"} 0\n"),
        "{text}"
    );
    assert!(
        text.contains("dqkd_entropy_source_healthy{source=\"os\"} 1\n"),
        "{text}"
    );
    serving.shutdown().await;

    // Unknown config keys name the file.
    let path = write_config(dir.path(), "pool_size = 1");
    let err = Config::load(&path).unwrap_err();
    assert!(err.to_string().contains("entropy.toml"), "{err}");
}

fn random_bytes(len: usize) -> Vec<u8> {
    use ring::rand::SecureRandom as _;
    let mut bytes = vec![0u8; len];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("OS RNG");
    bytes
}

/// A client presenting the KME certificate `cert`/`key` that accepts only entropy server
/// `server`.
fn pinned(ca: &Path, cert: &Path, key: &Path, server: &str) -> dqkd_net::PinnedClient {
    let files = dqkd_net::TlsFiles::new(ca.to_owned(), cert.to_owned(), key.to_owned());
    let server = dqkd_pki::Identity::new("test", dqkd_pki::Role::Entropy, server).expect("ID");
    dqkd_net::OutgoingTls::single(&files, KeyExchange::HybridOnly, server, Versions::Any)
        .expect("client")
}
