//! A site whose KEK lives in a PKCS#11 token (SoftHSM2), as an operator runs it: the key is
//! made with `dqkd pki kek --pkcs11`, the KME refuses to start without the token or with a
//! wrong PIN, keys survive a restart, and when the token goes away while it runs the KME
//! stays up, serves no keys and `/ready` says why. Skips loudly without softhsm2 unless
//! `DQKD_TEST_REQUIRE` is set, which makes it fail instead.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{dqkd, path_str, BIN};
use dqkd_client::{Client, ClientError};

const PIN: &str = "27182818";
const URI: &str = "pkcs11:token=site;object=site-kek";

/// A temporary SoftHSM2 (its own configuration and token folder) with the token `site`,
/// and a one-site cluster whose KEK is `URI` in it.
struct HsmSite {
    dir: tempfile::TempDir,
    module: PathBuf,
    child: Option<Child>,
    api: String,
    metrics: String,
}

fn module() -> Option<PathBuf> {
    std::env::var_os("DQKD_TEST_PKCS11_MODULE")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/usr/lib/softhsm/libsofthsm2.so",
                "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
            ]
            .map(PathBuf::from),
        )
        .find(|p| p.exists())
}

impl HsmSite {
    fn new() -> Option<Self> {
        let util = Command::new("softhsm2-util").arg("--version").output();
        let (Some(module), Ok(_)) = (module(), util) else {
            let why = "softhsm2 (softhsm2-util and libsofthsm2.so) is not installed";
            if std::env::var_os("DQKD_TEST_REQUIRE").is_some() {
                panic!("{why}, and DQKD_TEST_REQUIRE is set");
            }
            eprintln!("SKIPPED: PKCS#11 KEK end-to-end tests: {why} (apt-get install softhsm2)");
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_owned();
        std::fs::create_dir(d.join("tokens")).expect("token folder");
        std::fs::write(
            d.join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                d.join("tokens").display()
            ),
        )
        .expect("softhsm2.conf");
        let site = HsmSite {
            dir,
            module,
            child: None,
            api: String::new(),
            metrics: String::new(),
        };
        let out = site
            .command("softhsm2-util")
            .args(["--init-token", "--free", "--label", "site"])
            .args(["--so-pin", "11235813", "--pin", PIN])
            .output()
            .expect("softhsm2-util");
        assert!(out.status.success(), "{out:?}");

        let pki = d.join("pki");
        dqkd(&["pki", "init", "--cluster", "test", "--out", path_str(&pki)]);
        dqkd(&["pki", "issue", "kme", "KME_A", "--ca", path_str(&pki)]);
        for sae in ["alice", "bob"] {
            dqkd(&["pki", "issue", "sae", sae, "--ca", path_str(&pki)]);
        }
        std::fs::write(
            d.join("cluster.toml"),
            "cluster = \"test\"\n[[sites]]\nkme_id = \"KME_A\"\napi_addr = \"127.0.0.1:0\"\n\
             saes = [\"alice\", \"bob\"]\n",
        )
        .expect("manifest");
        site.write_site(URI);
        Some(site)
    }

    /// A command that sees this SoftHSM2 and the PIN (from the environment, as operators
    /// are told to pass it).
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env("SOFTHSM2_CONF", self.dir.path().join("softhsm2.conf"))
            .env("DQKD_PKCS11_PIN", PIN)
            .env_remove("DQKD_PKCS11_MODULE");
        command
    }

    fn write_site(&self, kek: &str) {
        std::fs::write(
            self.dir.path().join("site.toml"),
            format!(
                "manifest = \"cluster.toml\"\nkme_id = \"KME_A\"\napi_listen = \"127.0.0.1:0\"\n\
                 metrics_listen = \"127.0.0.1:0\"\n[tls]\nca = \"pki/ca.pem\"\n\
                 cert = \"pki/kme/KME_A.pem\"\nkey = \"pki/kme/KME_A.key\"\n[store]\n\
                 path = \"store.redb\"\nkek = \"{kek}\"\npkcs11_module = \"{}\"\n",
                self.module.display()
            ),
        )
        .expect("site file");
    }

    fn make_kek(&self) -> Output {
        self.command(BIN)
            .args(["pki", "kek", "--pkcs11", URI, "--module"])
            .arg(&self.module)
            .output()
            .expect("dqkd pki kek")
    }

    fn kme(&self, pin: &str) -> Command {
        let mut command = self.command(BIN);
        command
            .env("DQKD_PKCS11_PIN", pin)
            .env("RUST_LOG", "info")
            .args(["kme", "--config"])
            .arg(self.dir.path().join("site.toml"))
            .arg("--ready-file")
            .arg(self.dir.path().join("ready.json"));
        command
    }

    /// Starts the KME and waits for its ready file.
    fn launch(&mut self) {
        let ready = self.dir.path().join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::File::create(self.dir.path().join("kme.log")).expect("log");
        let child = self
            .kme(PIN)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn dqkd kme");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                let v: serde_json::Value = serde_json::from_str(&text).expect("ready JSON");
                self.api = format!("https://{}", v["api_addr"].as_str().expect("api_addr"));
                self.metrics = v["metrics_addr"].as_str().expect("metrics").to_owned();
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

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kme.log")).unwrap_or_default()
    }

    fn client(&self, sae: &str) -> Client {
        let pki = self.dir.path().join("pki");
        let tls = dqkd_pki::client_config_from_combined(
            &pki.join("ca.pem"),
            &pki.join(format!("sae/{sae}.combined.pem")),
        )
        .expect("client TLS");
        Client::new(&self.api, tls).expect("client")
    }

    /// `(status, body)` of a GET on the metrics listener.
    fn probe(&self, path: &str) -> (u16, String) {
        let out = Command::new("curl")
            .args(["--silent", "--write-out", "\n%{http_code}"])
            .arg(format!("http://{}{path}", self.metrics))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').expect("status line");
        (code.trim().parse().expect("status"), body.to_owned())
    }
}

impl Drop for HsmSite {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A failed start: the exit status and what the KME printed.
fn refused(mut command: Command) -> String {
    let out = command.output().expect("run dqkd kme");
    assert!(!out.status.success(), "the KME started: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn keys_sealed_through_the_token_survive_a_restart() {
    let Some(mut site) = HsmSite::new() else {
        return;
    };
    let made = site.make_kek();
    assert!(made.status.success(), "{made:?}");
    assert!(String::from_utf8_lossy(&made.stdout).contains("not extractable"));
    let again = site.make_kek();
    assert!(!again.status.success(), "a second KEK replaced the first");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds"));

    site.launch();
    let keys = site
        .client("alice")
        .enc_keys_get("bob", Some(3), None)
        .await
        .expect("enc_keys");
    site.stop();
    site.launch();
    for key in &keys.keys {
        let got = site
            .client("bob")
            .dec_keys_get("alice", &key.key_ID)
            .await
            .expect("dec_keys after a restart");
        assert_eq!(got.keys[0].key, key.key);
    }
    assert!(!site.log().contains(PIN), "the PIN was logged");
}

#[test]
fn the_kme_refuses_to_start_without_its_token_or_with_a_wrong_pin() {
    let Some(site) = HsmSite::new() else { return };
    let made = site.make_kek();
    assert!(made.status.success(), "{made:?}");

    let err = refused(site.kme("00000000"));
    assert!(err.contains("PIN") && err.contains("wrong"), "{err}");
    assert!(!err.contains("00000000"), "the PIN was printed: {err}");

    site.write_site("pkcs11:token=site;object=no-such-key");
    let err = refused(site.kme(PIN));
    assert!(
        err.contains("no such secret key") && err.contains("no-such-key"),
        "{err}"
    );

    site.write_site("pkcs11:token=unplugged;object=site-kek");
    let err = refused(site.kme(PIN));
    assert!(
        err.contains("no PKCS#11 token labelled \"unplugged\""),
        "{err}"
    );
    assert!(err.contains("refusing to start"), "{err}");
}

#[tokio::test]
async fn losing_the_token_stops_key_service_but_not_the_process() {
    let Some(mut site) = HsmSite::new() else {
        return;
    };
    let made = site.make_kek();
    assert!(made.status.success(), "{made:?}");
    site.launch();
    let alice = site.client("alice");
    alice.enc_keys_get("bob", None, None).await.expect("served");
    assert_eq!(site.probe("/ready").0, 200);

    // The token's files vanish, as a removed token does for SoftHSM2.
    let tokens = site.dir.path().join("tokens");
    let away = site.dir.path().join("tokens-away");
    std::fs::rename(&tokens, &away).expect("take the token away");
    let deadline = Instant::now() + Duration::from_secs(20);
    let (status, body) = loop {
        let (status, body) = site.probe("/ready");
        if status != 200 || Instant::now() > deadline {
            break (status, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status, 503, "{body}\n{}", site.log());
    assert!(body.contains("key-encryption key unavailable"), "{body}");
    match alice.enc_keys_get("bob", None, None).await {
        Err(ClientError::Api { status, message }) => {
            assert_eq!(status.as_u16(), 503);
            assert!(
                message.contains("key-encryption key is unavailable"),
                "{message}"
            );
        }
        other => panic!("keys served without the token: {other:?}"),
    }
    assert_eq!(site.probe("/health").0, 200);
    assert!(site.running(), "the KME exited: {}", site.log());
    assert!(site.log().contains("serving no keys"), "{}", site.log());
}
