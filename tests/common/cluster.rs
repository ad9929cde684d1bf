//! A multi-site cluster of real processes on loopback: entropy servers started with
//! `dqkd entropy`, sites started with `dqkd kme`, certificates from `dqkd pki`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dqkd_client::{Client, ClientError};
use http::StatusCode;

use super::proxy::FreezingProxy;
use super::{dqkd, store_section, TempDatabase, BIN};

/// One child process with its config, ready file and log.
pub struct Proc {
    pub name: String,
    args: Vec<String>,
    ready: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    pub addr: String,
    /// The metrics listener, for processes that have one.
    pub metrics_addr: Option<String>,
    /// The peer API listener, for sites.
    pub peer_addr: Option<String>,
}

impl Proc {
    fn new(dir: &Path, name: &str, args: Vec<String>) -> Self {
        Self {
            name: name.to_owned(),
            args,
            ready: dir.join(format!("{name}.ready")),
            log: dir.join(format!("{name}.log")),
            child: None,
            addr: String::new(),
            metrics_addr: None,
            peer_addr: None,
        }
    }

    /// Starts the process and waits until it accepts connections.
    pub fn launch(&mut self) {
        let _ = std::fs::remove_file(&self.ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(BIN)
            .args(&self.args)
            .arg("--ready-file")
            .arg(&self.ready)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn dqkd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.ready) {
                let v: serde_json::Value = serde_json::from_str(&text).expect("ready JSON");
                self.addr = v["api_addr"].as_str().expect("api_addr").to_owned();
                self.metrics_addr = v["metrics_addr"].as_str().map(str::to_owned);
                self.peer_addr = v["peer_addr"].as_str().map(str::to_owned);
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("{} exited with {status}: {}", self.name, self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready: {}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process (SIGKILL) and starts it again with `extra` arguments added.
    pub fn relaunch_with(&mut self, extra: &[&str]) {
        self.kill9();
        self.args.extend(extra.iter().map(|a| (*a).to_owned()));
        self.launch();
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
        }
    }

    /// The Prometheus text its metrics listener serves now.
    pub fn metrics(&self) -> String {
        let addr = self.metrics_addr.as_deref().expect("a metrics listener");
        let out = Command::new("curl")
            .args([
                "--silent",
                "--show-error",
                "--fail",
                &format!("http://{addr}/metrics"),
            ])
            .output()
            .expect("curl the metrics listener");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The process ID, while it runs.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGSTOP / SIGCONT: a peer that is alive but does not answer.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sites `KME_A`, `KME_B`, `KME_C` with SAEs alice (A), bob and dave (B), carol (C), and
/// four entropy servers E1..E4 of which each key uses three (`n = 3`, `c = 1`).
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub sites: BTreeMap<String, Proc>,
    pub entropy: Vec<Proc>,
    pub sae_site: BTreeMap<&'static str, &'static str>,
    pub timeout_ms: u64,
    /// Proxies in front of the peer API of a site or an entropy server, by KME or server ID:
    /// every other process reaches it through the proxy (see `start_proxied`).
    pub proxies: BTreeMap<String, FreezingProxy>,
    /// Last, so that it is dropped after the processes that use it.
    pub databases: Vec<TempDatabase>,
}

/// A free port on 127.0.0.1 (released before use: the manifest must name peer ports).
///
/// Chosen at random below the kernel's ephemeral range (32768 and up), so that the many
/// outgoing connections of parallel tests cannot take it between release and use. Every
/// port handed out is remembered for the life of the test binary: tests in one binary run
/// in parallel, and a port released by one cluster's probe could otherwise be drawn again
/// for another process before the first one binds it.
fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = 15_000 + (uuid::Uuid::new_v4().as_u128() % 17_000) as u16;
        if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
}

impl Cluster {
    pub fn start() -> Self {
        Self::start_with(&["KME_A", "KME_B", "KME_C"], 4, 2000)
    }

    pub fn start_with(site_ids: &[&str], entropy_count: usize, timeout_ms: u64) -> Self {
        Self::start_full(site_ids, entropy_count, timeout_ms, "")
    }

    /// Like `start_with`, with `extra` TOML (e.g. a `[limits]` table) in the manifest.
    pub fn start_full(
        site_ids: &[&str],
        entropy_count: usize,
        timeout_ms: u64,
        extra: &str,
    ) -> Self {
        Self::start_proxied(site_ids, entropy_count, timeout_ms, extra, &[])
    }

    /// Like `start_full`, with a [`FreezingProxy`] in front of each process named in
    /// `proxied` (a KME ID: its peer API; an entropy server ID: its API). The manifest names
    /// the proxy's address, so every site reaches that process through it.
    pub fn start_proxied(
        site_ids: &[&str],
        entropy_count: usize,
        timeout_ms: u64,
        extra: &str,
        proxied: &[&str],
    ) -> Self {
        let mut proxies = BTreeMap::new();
        // The address the manifest names for `name`, which listens on `port`.
        let mut public = |name: &str, port: u16| -> u16 {
            if !proxied.contains(&name) {
                return port;
            }
            let proxy = FreezingProxy::start(&format!("127.0.0.1:{port}"));
            let port = proxy.addr.port();
            proxies.insert(name.to_owned(), proxy);
            port
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let pki = d.join("pki");
        let pki_s = pki.to_str().expect("utf-8");
        dqkd(&["pki", "init", "--cluster", "test", "--out", pki_s]);
        // Every process checks the cluster's revocation list, as `dqkd up` sets them up.
        dqkd(&["pki", "crl", "--ca", pki_s]);
        let all_saes: [(&str, &str); 4] = [
            ("alice", "KME_A"),
            ("bob", "KME_B"),
            ("dave", "KME_B"),
            ("carol", "KME_C"),
        ];
        let sae_site: BTreeMap<&str, &str> = all_saes
            .iter()
            .filter(|(_, site)| site_ids.contains(site))
            .copied()
            .collect();
        for kme in site_ids {
            dqkd(&["pki", "issue", "kme", kme, "--ca", pki_s]);
            dqkd(&[
                "pki",
                "kek",
                "--out",
                d.join(format!("{kme}.kek")).to_str().expect("utf-8"),
            ]);
        }
        for sae in sae_site.keys() {
            dqkd(&["pki", "issue", "sae", sae, "--ca", pki_s]);
        }
        let entropy_ids: Vec<String> = (1..=entropy_count).map(|j| format!("E{j}")).collect();
        let mut manifest = format!(
            "cluster = \"test\"\n[peers]\ntimeout_ms = {timeout_ms}\n[keygen]\nn = 3\nc = 1\n{extra}\n"
        );
        let mut entropy = Vec::new();
        for id in &entropy_ids {
            dqkd(&["pki", "issue", "entropy", id, "--ca", pki_s]);
            let port = free_port();
            manifest.push_str(&format!(
                "[[entropy]]\nid = \"{id}\"\naddr = \"127.0.0.1:{}\"\n",
                public(id, port)
            ));
            let config = d.join(format!("{id}.toml"));
            std::fs::write(
                &config,
                format!(
                    "cluster = \"test\"\nserver_id = \"{id}\"\nlisten = \"127.0.0.1:{port}\"\n\
                     [tls]\nca = \"pki/ca.pem\"\ncert = \"pki/entropy/{id}.pem\"\nkey = \"pki/entropy/{id}.key\"\n\
                     crl = \"pki/ca.crl.pem\"\n"
                ),
            )
            .expect("entropy config");
            entropy.push(Proc::new(
                d,
                id,
                vec![
                    "entropy".into(),
                    "--config".into(),
                    config.display().to_string(),
                ],
            ));
        }
        let mut sites = BTreeMap::new();
        let mut databases = Vec::new();
        for kme in site_ids {
            let (api, peer, metrics) = (free_port(), free_port(), free_port());
            let saes: Vec<String> = sae_site
                .iter()
                .filter(|(_, s)| *s == kme)
                .map(|(sae, _)| format!("\"{sae}\""))
                .collect();
            manifest.push_str(&format!(
                "[[sites]]\nkme_id = \"{kme}\"\napi_addr = \"127.0.0.1:{api}\"\npeer_addr = \"127.0.0.1:{}\"\nsaes = [{}]\n",
                public(kme, peer),
                saes.join(", ")
            ));
            let config = d.join(format!("site-{kme}.toml"));
            let store = store_section(
                &format!("{kme}.redb"),
                &format!("{kme}.kek"),
                &mut databases,
            );
            std::fs::write(
                &config,
                format!(
                    "manifest = \"cluster.toml\"\nkme_id = \"{kme}\"\napi_listen = \"127.0.0.1:{api}\"\n\
                     peer_listen = \"127.0.0.1:{peer}\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\n[tls]\nca = \"pki/ca.pem\"\n\
                     cert = \"pki/kme/{kme}.pem\"\nkey = \"pki/kme/{kme}.key\"\ncrl = \"pki/ca.crl.pem\"\n{store}"
                ),
            )
            .expect("site config");
            sites.insert(
                (*kme).to_owned(),
                Proc::new(
                    d,
                    kme,
                    vec![
                        "kme".into(),
                        "--config".into(),
                        config.display().to_string(),
                    ],
                ),
            );
        }
        std::fs::write(d.join("cluster.toml"), manifest).expect("manifest");
        let mut cluster = Self {
            databases,
            dir,
            sites,
            entropy,
            sae_site,
            timeout_ms,
            proxies,
        };
        for server in &mut cluster.entropy {
            server.launch();
        }
        for site in cluster.sites.values_mut() {
            site.launch();
        }
        cluster
    }

    /// Starts a second KME process for site `kme` on the same store (a PostgreSQL
    /// database), with its own API and peer ports; it is reachable as `"<kme>-r2"`.
    pub fn add_replica(&mut self, kme: &str) -> String {
        self.add_replica_with(kme, &[])
    }

    /// Like `add_replica`, with `extra` arguments for the new process.
    pub fn add_replica_with(&mut self, kme: &str, extra: &[&str]) -> String {
        let d = self.dir.path();
        let primary =
            std::fs::read_to_string(d.join(format!("site-{kme}.toml"))).expect("primary site file");
        let name = format!("{kme}-r2");
        let replica: String = primary
            .lines()
            .map(|line| {
                if line.starts_with("api_listen") {
                    format!("api_listen = \"127.0.0.1:{}\"", free_port())
                } else if line.starts_with("peer_listen") {
                    format!("peer_listen = \"127.0.0.1:{}\"", free_port())
                } else if line.starts_with("metrics_listen") {
                    format!("metrics_listen = \"127.0.0.1:{}\"", free_port())
                } else {
                    line.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let config = d.join(format!("site-{name}.toml"));
        std::fs::write(&config, replica).expect("replica site file");
        let mut proc = Proc::new(
            d,
            &name,
            ["kme", "--config", &config.display().to_string()]
                .iter()
                .chain(extra)
                .map(|a| (*a).to_owned())
                .collect(),
        );
        proc.launch();
        self.sites.insert(name.clone(), proc);
        name
    }

    /// The PostgreSQL URL in site `kme`'s file (panics for an embedded store).
    pub fn store_url(&self, kme: &str) -> String {
        let site = std::fs::read_to_string(self.dir.path().join(format!("site-{kme}.toml")))
            .expect("site file");
        let line = site
            .lines()
            .find(|l| l.starts_with("url = "))
            .expect("a PostgreSQL store");
        line["url = ".len()..].trim_matches('"').to_owned()
    }

    /// The proxy in front of `name` (started with `start_proxied`).
    pub fn proxy(&self, name: &str) -> &FreezingProxy {
        self.proxies.get(name).expect("a proxied process")
    }

    pub fn site(&mut self, kme: &str) -> &mut Proc {
        self.sites.get_mut(kme).expect("site")
    }

    /// A client for `sae` at its own site.
    pub fn client(&self, sae: &str) -> Client {
        let site = self.sae_site[sae];
        self.client_at(sae, site)
    }

    /// A client for `sae` talking to site `kme` (which may not be its own).
    pub fn client_at(&self, sae: &str, kme: &str) -> Client {
        let d = self.dir.path();
        let tls = dqkd_pki::client_config_from_combined(
            &d.join("pki/ca.pem"),
            &d.join(format!("pki/sae/{sae}.combined.pem")),
        )
        .expect("client TLS");
        Client::new(&format!("https://{}", self.sites[kme].addr), tls)
            .expect("client")
            .with_timeout(Duration::from_secs(20))
    }
}

impl Cluster {
    /// A peer API client for site `to`, presenting site `from`'s KME certificate: what a
    /// site (or anyone holding its key) can send another.
    pub fn peer_client(&self, from: &str, to: &str) -> dqkd_kme::peer::PeerClient {
        let d = self.dir.path();
        let files = dqkd_net::TlsFiles::new(
            d.join("pki/ca.pem"),
            d.join(format!("pki/kme/{from}.pem")),
            d.join(format!("pki/kme/{from}.key")),
        );
        let tls = dqkd_net::OutgoingTls::load(&files, dqkd_net::KeyExchange::HybridOnly)
            .expect("KME client TLS");
        let site = dqkd_pki::Identity::new("test", dqkd_pki::Role::Kme, to).expect("KME ID");
        let http = tls
            .client(site, dqkd_net::Versions::Http1, None)
            .expect("KME client");
        let addr = self.sites[to]
            .peer_addr
            .as_deref()
            .expect("a peer listener");
        dqkd_kme::peer::PeerClient::new(to, addr, http, Duration::from_secs(20))
    }

    /// Alice asks site process `at` for `number` keys for Bob, and Bob must get exactly the
    /// same ones at his site; returns their IDs.
    pub async fn share_through(&self, at: &str, number: u32) -> Vec<String> {
        let sent = self
            .client_at("alice", at)
            .enc_keys(
                "bob",
                &dqkd_client::KeyRequestBody {
                    number: Some(number),
                    ..Default::default()
                },
            )
            .await
            .expect("enc_keys");
        assert_eq!(sent.keys.len(), number as usize);
        let ids: Vec<&str> = sent.keys.iter().map(|k| k.key_ID.as_str()).collect();
        let got = self
            .client("bob")
            .dec_keys("alice", &ids)
            .await
            .expect("dec_keys");
        for (s, g) in sent.keys.iter().zip(&got.keys) {
            assert_eq!((&s.key_ID, &s.key), (&g.key_ID, &g.key));
        }
        ids.into_iter().map(str::to_owned).collect()
    }
}

/// Waits until `condition` holds, asking every 20 ms; fails naming `what` after 30 s.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < deadline, "still waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether the origin withdrew a request (its audit log says so) and a peer confirmed each
/// withdrawal it logged.
pub fn withdrawals_confirmed(log: &str) -> bool {
    let mut requests = log
        .lines()
        .filter(|l| l.contains("keys_withdrawn"))
        .filter_map(|l| l.split("request_id=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .peekable();
    requests.peek().is_some()
        && requests.all(|id| {
            log.lines()
                .any(|l| l.contains("withdrew keys of a failed request") && l.contains(id))
        })
}

/// Waits until `client`'s status toward `target` reports `want` ready keys exactly.
pub async fn wait_level(client: &Client, target: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let level = client
            .status(target)
            .await
            .expect("status")
            .stored_key_count;
        if level == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pool toward {target} at {level}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The status and message of an API error (panics on anything else).
pub fn status_of<T: std::fmt::Debug>(result: Result<T, ClientError>) -> (StatusCode, String) {
    match result {
        Err(ClientError::Api { status, message }) => (status, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Key IDs of requests the origin site withdrew, from its audit log.
pub fn withdrawn_key_ids(log: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for line in log.lines().filter(|l| l.contains("keys_withdrawn")) {
        let Some(start) = line.find("key_ids=[") else {
            continue;
        };
        let rest = &line[start + 9..];
        let end = rest.find(']').unwrap_or(rest.len());
        ids.extend(
            rest[..end]
                .split(", ")
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        );
    }
    ids
}

impl Cluster {
    /// Keys of `master` that `slave` may still fetch at site `kme`, read from its store
    /// directly (the site must be stopped): what a crash test counts as left behind.
    pub async fn pending_in_store(&self, kme: &str, master: &str, slave: &str) -> u64 {
        use dqkd_store::{Kek, KeyStore};
        let dir = self.dir.path();
        let kek = Kek::load(&dir.join(format!("{kme}.kek"))).expect("site KEK");
        let store: Box<dyn KeyStore> = match super::postgres_backend() {
            Some(_) => Box::new(
                dqkd_store_postgres::PostgresStore::connect(&self.store_url(kme), kek, 2)
                    .await
                    .expect("site database"),
            ),
            None => Box::new(
                dqkd_store::EmbeddedStore::open(&dir.join(format!("{kme}.redb")), kek)
                    .expect("site store"),
            ),
        };
        store.pending(master, slave)
    }
}
