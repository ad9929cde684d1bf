//! End to end: `dqkd entropy` as a real process, configured by file, with certificates
//! made by `dqkd pki`; one KME allocates a range for another, which reads the same bytes.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dqkd_entropy::EntropyClient;
use dqkd_net::{KeyExchange, Versions};

const BIN: &str = env!("CARGO_BIN_EXE_dqkd");

fn dqkd(args: &[&str]) {
    let out = Command::new(BIN).args(args).output().expect("run dqkd");
    assert!(
        out.status.success(),
        "dqkd {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills the server when the test ends, pass or fail.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &Path) -> (Server, String) {
    let ready = dir.join("ready.json");
    let log_path = dir.join("entropy.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let child = Command::new(BIN)
        .args(["entropy", "--config"])
        .arg(dir.join("entropy.toml"))
        .arg("--ready-file")
        .arg(&ready)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn dqkd entropy");
    let mut server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            let v: serde_json::Value = serde_json::from_str(&text).expect("ready file JSON");
            let url = format!("https://{}", v["api_addr"].as_str().expect("api_addr"));
            return (server, url);
        }
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        if let Some(status) = server.0.try_wait().expect("try_wait") {
            panic!("dqkd entropy exited with {status}: {}", log());
        }
        assert!(
            Instant::now() < deadline,
            "entropy server not ready: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kme_client(dir: &Path, url: &str, kme: &str) -> EntropyClient {
    let tls = pinned(
        &dir.join("pki/ca.pem"),
        &dir.join(format!("pki/kme/{kme}.pem")),
        &dir.join(format!("pki/kme/{kme}.key")),
        "E1",
    );
    EntropyClient::new(url, "E1", tls).expect("client")
}

#[tokio::test]
async fn binary_serves_allocate_and_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pki = d.join("pki");
    let pki_s = pki.to_str().expect("utf-8 path");
    dqkd(&["pki", "init", "--cluster", "test", "--out", pki_s]);
    for kme in ["KME_A", "KME_B"] {
        dqkd(&["pki", "issue", "kme", kme, "--ca", pki_s]);
    }
    dqkd(&["pki", "issue", "entropy", "E1", "--ca", pki_s]);
    std::fs::write(
        d.join("entropy.toml"),
        r#"cluster = "test"
server_id = "E1"
listen = "127.0.0.1:0"
pool_ttl_secs = 120
[tls]
ca = "pki/ca.pem"
cert = "pki/entropy/E1.pem"
key = "pki/entropy/E1.key"
"#,
    )
    .expect("write config");
    let (_server, url) = start(d);

    let a = kme_client(d, &url, "KME_A");
    let b = kme_client(d, &url, "KME_B");
    a.health().await.expect("health");
    let range = a
        .allocate(1 << 20, &["KME_B".to_owned()])
        .await
        .expect("allocate");
    let copy = b
        .read(&range.pool_id, range.offset, range.len)
        .await
        .expect("read");
    assert_eq!(*copy, *range.bytes);
    let again = b.read(&range.pool_id, range.offset, range.len).await;
    assert!(
        matches!(again, Err(dqkd_entropy::EntropyError::Refused { status, .. }) if status == 410),
        "{again:?}"
    );
}

/// A client presenting the KME certificate `cert`/`key` that accepts only entropy server
/// `server`.
fn pinned(ca: &Path, cert: &Path, key: &Path, server: &str) -> dqkd_net::PinnedClient {
    let files = dqkd_net::TlsFiles::new(ca.to_owned(), cert.to_owned(), key.to_owned());
    let server = dqkd_pki::Identity::new("test", dqkd_pki::Role::Entropy, server).expect("ID");
    dqkd_net::OutgoingTls::single(&files, KeyExchange::HybridOnly, server, Versions::Any)
        .expect("client")
}
