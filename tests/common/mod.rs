//! Test fixtures: a real cluster made with the real `dqkd` binary, on loopback.
//!
//! Every fixture lives in its own temporary folder: certificates come from `dqkd pki`,
//! the KME is a child process started with `dqkd kme`, and clients speak mTLS to it.

#![allow(dead_code)]

pub mod cluster;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dqkd_client::Client;

pub const BIN: &str = env!("CARGO_BIN_EXE_dqkd");

/// Set (to anything but empty or `0`) where every test must run, as in CI: a test that would
/// skip for a missing tool or setting fails instead.
pub const REQUIRE: &str = "DQKD_TEST_REQUIRE";

/// Says loudly that `what` went untested because `missing` is missing; a failure instead when
/// [`REQUIRE`] is set. Written to a fresh `/dev/stderr` handle, which the test harness does
/// not capture, with `eprintln!` as the fallback.
pub fn skip(missing: &str, what: &str) {
    let required = std::env::var(REQUIRE).is_ok_and(|v| !v.is_empty() && v != "0");
    assert!(
        !required,
        "{missing} is missing but {REQUIRE} is set: {what} must be tested here"
    );
    let text = format!("!!! SKIPPED: {missing} is missing; {what} NOT tested !!!");
    use std::io::Write;
    let direct = std::fs::OpenOptions::new()
        .append(true)
        .open("/dev/stderr")
        .and_then(|mut f| writeln!(f, "{text}"));
    if direct.is_err() {
        eprintln!("{text}");
    }
}

/// Which key store the end-to-end tests run on: the embedded file store by default, or
/// PostgreSQL when `DQKD_TEST_STORE=postgres` (with `DQKD_TEST_POSTGRES_URL` naming an
/// admin connection; each site then gets a throwaway database).
pub fn postgres_backend() -> Option<String> {
    match std::env::var("DQKD_TEST_STORE").as_deref() {
        Ok("postgres") => Some(
            std::env::var("DQKD_TEST_POSTGRES_URL")
                .expect("DQKD_TEST_STORE=postgres needs DQKD_TEST_POSTGRES_URL (an admin URL)"),
        ),
        _ => None,
    }
}

/// A throwaway PostgreSQL database, dropped with this guard.
pub struct TempDatabase {
    admin: String,
    name: String,
    pub url: String,
}

impl TempDatabase {
    pub fn create(admin: &str) -> Self {
        let name = format!("dqkd_e2e_{}", uuid::Uuid::new_v4().simple());
        psql(admin, &format!("CREATE DATABASE {name}"));
        let base = admin.rsplit_once('/').map_or(admin, |(b, _)| b);
        Self {
            admin: admin.to_owned(),
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                &self.admin,
                "-qc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .output();
    }
}

/// Runs `sql` on the database at `url`, which must succeed.
pub fn psql(url: &str, sql: &str) {
    let out = Command::new("psql")
        .args([url, "-qc", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `[store]` table of a site file: embedded by default, else a fresh database.
pub fn store_section(file: &str, kek: &str, databases: &mut Vec<TempDatabase>) -> String {
    match postgres_backend() {
        Some(admin) => {
            let db = TempDatabase::create(&admin);
            let section = format!(
                "[store]\nurl = \"{}\"\npool_size = 8\nkek = \"{kek}\"\n",
                db.url
            );
            databases.push(db);
            section
        }
        None => format!("[store]\npath = \"{file}\"\nkek = \"{kek}\"\n"),
    }
}

/// Runs `dqkd args…` to completion and returns stdout, failing the test on a non-zero exit.
pub fn dqkd(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("run dqkd");
    assert!(
        out.status.success(),
        "dqkd {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A one-site cluster: site KME_A with SAEs alice, bob, carol and dave; plus
/// `mallory`, an SAE certificate from the cluster CA that no site lists, and `eve`, an SAE
/// certificate from a different CA.
pub struct Site {
    pub databases: Vec<TempDatabase>,
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub url: String,
    pub metrics_url: String,
    pub limits: &'static str,
    /// The open-descriptor limit (soft and hard) the KME process starts under, if lowered.
    pub descriptor_limit: Option<u32>,
}

pub const LIMITS: &str = r#"
[limits]
default_key_size = 256
min_key_size = 64
max_key_size = 1024
max_key_per_request = 16
max_key_count = 40
max_sae_id_count = 2
"#;

impl Site {
    pub fn start() -> Self {
        Self::start_with(LIMITS)
    }

    pub fn start_with(limits: &'static str) -> Self {
        Self::start_configured(limits, "", None)
    }

    /// A site whose manifest has `limits`, whose site file ends with `site_extra` (e.g. a
    /// `[connections]` section), and whose process may open at most `descriptor_limit`
    /// descriptors.
    pub fn start_configured(
        limits: &'static str,
        site_extra: &str,
        descriptor_limit: Option<u32>,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let pki = d.join("pki");
        let pki_s = pki.to_str().expect("utf-8 path");
        dqkd(&["pki", "init", "--cluster", "test", "--out", pki_s]);
        dqkd(&["pki", "issue", "kme", "KME_A", "--ca", pki_s]);
        for sae in ["alice", "bob", "carol", "dave", "mallory"] {
            dqkd(&["pki", "issue", "sae", sae, "--ca", pki_s]);
        }
        // An empty revocation list, so that every test runs with revocation checks on.
        dqkd(&["pki", "crl", "--ca", pki_s]);
        let other = d.join("other-ca");
        let other_s = other.to_str().expect("utf-8 path");
        dqkd(&["pki", "init", "--cluster", "test", "--out", other_s]);
        dqkd(&["pki", "issue", "sae", "eve", "--ca", other_s]);
        dqkd(&[
            "pki",
            "kek",
            "--out",
            d.join("site.kek").to_str().expect("path"),
        ]);
        std::fs::write(
            d.join("cluster.toml"),
            format!(
                r#"cluster = "test"
{limits}
[[sites]]
kme_id = "KME_A"
api_addr = "127.0.0.1:0"
saes = ["alice", "bob", "carol", "dave"]
"#
            ),
        )
        .expect("write manifest");
        let mut databases = Vec::new();
        let store = store_section("store.redb", "site.kek", &mut databases);
        std::fs::write(
            d.join("site.toml"),
            format!(
                r#"manifest = "cluster.toml"
kme_id = "KME_A"
api_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
[tls]
ca = "pki/ca.pem"
cert = "pki/kme/KME_A.pem"
key = "pki/kme/KME_A.key"
crl = "pki/ca.crl.pem"
{store}
{site_extra}"#
            ),
        )
        .expect("write site file");
        let mut site = Site {
            databases,
            dir,
            child: None,
            url: String::new(),
            metrics_url: String::new(),
            limits,
            descriptor_limit,
        };
        site.launch();
        site
    }

    /// Starts (or restarts) the KME process and waits until it accepts connections.
    pub fn launch(&mut self) {
        let ready = self.dir.path().join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::File::create(self.dir.path().join("kme.log")).expect("log file");
        let mut command = match self.descriptor_limit {
            // Both limits, so that the process cannot raise its soft limit past it.
            Some(limit) => {
                let mut sh = Command::new("sh");
                sh.args([
                    "-c",
                    &format!("ulimit -n {limit} && exec \"$0\" \"$@\""),
                    BIN,
                ]);
                sh
            }
            None => Command::new(BIN),
        };
        let child = command
            .args(["kme", "--config"])
            .arg(self.dir.path().join("site.toml"))
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn dqkd kme");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                let v: serde_json::Value = serde_json::from_str(&text).expect("ready file JSON");
                self.url = format!("https://{}", v["api_addr"].as_str().expect("api_addr"));
                self.metrics_url = format!(
                    "http://{}/metrics",
                    v["metrics_addr"].as_str().expect("metrics_addr")
                );
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("dqkd kme exited with {status}: {}", self.log());
            }
            assert!(Instant::now() < deadline, "KME not ready: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kme.log")).unwrap_or_default()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn ca(&self) -> PathBuf {
        self.path("pki/ca.pem")
    }

    /// A client presenting `sae`'s certificate from the cluster CA.
    pub fn client(&self, sae: &str) -> Client {
        let tls = dqkd_pki::client_config_from_combined(
            &self.ca(),
            &self.path(&format!("pki/sae/{sae}.combined.pem")),
        )
        .expect("client TLS config");
        Client::new(&self.url, tls).expect("client")
    }

    /// A client presenting `eve`'s certificate from a foreign CA (trusting our CA).
    pub fn foreign_client(&self) -> Client {
        let tls = dqkd_pki::client_config(
            &self.ca(),
            &self.path("other-ca/sae/eve.pem"),
            &self.path("other-ca/sae/eve.key"),
        )
        .expect("client TLS config");
        Client::new(&self.url, tls).expect("client")
    }

    /// A client that presents no certificate at all.
    pub fn anonymous_client(&self) -> Client {
        let roots =
            dqkd_pki::root_store(&dqkd_pki::load_certs(&self.ca()).expect("ca")).expect("roots");
        let tls = dqkd_pki::rustls::ClientConfig::builder_with_provider(dqkd_pki::provider(
            dqkd_pki::KeyExchange::PreferHybrid,
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Client::new(&self.url, tls).expect("client")
    }

    pub fn store_file(&self) -> PathBuf {
        self.path("store.redb")
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("standard base64")
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
