//! The status page as an operator sees it: headless Chromium loads it from a running
//! cluster's metrics listener and the test reads what the browser shows; `dqkd status` and
//! `/status.json` report the same, flag a stopped entropy server, and never show a key ID.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::BIN;

/// Ready keys per link: small, so the pools fill within a second or two.
const POOLS: &str = "[pools]\ntarget = 2000\nlow_water = 1000\nbatch = 1000\n";

/// The headless browser, or `None` (loudly) when it is missing and not required.
fn chromium() -> Option<&'static str> {
    let found = ["chromium", "chromium-browser"].into_iter().find(|name| {
        Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        assert!(
            std::env::var("DQKD_TEST_REQUIRE").as_deref() != Ok("1"),
            "chromium is not installed and DQKD_TEST_REQUIRE=1: install Debian's chromium"
        );
        eprintln!("!!! SKIPPED: chromium is not installed; the status page was NOT tested in a browser !!!");
    }
    found
}

/// The browser, headless, with a fresh profile in `profile` and nothing that reaches beyond
/// the page.
fn headless(browser: &str, profile: &Path) -> Command {
    let mut command = Command::new(browser);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()));
    command
}

/// The page's DOM after the browser loaded it.
fn dump_dom(browser: &str, url: &str) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let out = headless(browser, profile.path())
        .args(["--dump-dom", url])
        .output()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        dom.contains("</html>"),
        "chromium showed no page: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

/// The row of the DOM whose attributes contain `marker`.
fn row<'a>(dom: &'a str, marker: &str) -> &'a str {
    let start = dom
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker} in the page:\n{dom}"));
    let end = dom[start..].find("</tr>").map_or(dom.len(), |e| start + e);
    &dom[start..end]
}

fn metrics_url(cluster: &Cluster, kme: &str) -> String {
    let addr = cluster.sites[kme]
        .metrics_addr
        .as_deref()
        .expect("a metrics listener");
    format!("http://{addr}")
}

/// Polls `/status.json` until `ready` holds (pools fill in the background).
fn wait_for_json(url: &str, ready: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(BIN)
            .args(["status", "--json", "--url", url])
            .output()
            .expect("run dqkd status");
        let all: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let site = all.get(0).cloned().unwrap_or(serde_json::Value::Null);
        if ready(&site) {
            return site;
        }
        assert!(
            Instant::now() < deadline,
            "status never got there: {site:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Pools full, and every peer and entropy server answering (their connections are then
/// open, so a busy machine does not make a later probe time out).
fn settled(site: &serde_json::Value) -> bool {
    let all = |field: &str, flag: &str| {
        site[field]
            .as_array()
            .is_some_and(|rows| !rows.is_empty() && rows.iter().all(|r| r[flag] == true))
    };
    site["pools"]
        .as_array()
        .is_some_and(|p| !p.is_empty() && p.iter().all(|p| p["ready"] == 2000))
        && all("peers", "reachable")
        && all("entropy", "healthy")
}

/// Alice asks site A for one key for Bob and leaves it at site B; returns its ID.
fn leave_a_key_waiting(cluster: &Cluster) -> String {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let sent = runtime
        .block_on(
            cluster
                .client("alice")
                .enc_keys("bob", &dqkd_client::KeyRequestBody::default()),
        )
        .expect("enc_keys");
    sent.keys[0].key_ID.clone()
}

#[test]
fn a_browser_shows_the_site_at_a_glance() {
    let Some(browser) = chromium() else { return };
    let mut cluster = Cluster::start_full(&["KME_A", "KME_B"], 3, 2000, POOLS);
    let (a, b) = (
        metrics_url(&cluster, "KME_A"),
        metrics_url(&cluster, "KME_B"),
    );
    wait_for_json(&format!("{a}/"), settled);
    let key_id = leave_a_key_waiting(&cluster);
    // One entropy server down: the page must say so, and keep showing the others.
    cluster.entropy[2].kill9();
    // The page shows what the site last sampled: wait until it has seen E3 go.
    wait_for_json(&format!("{a}/"), |site| {
        site["entropy"].as_array().is_some_and(|servers| {
            servers
                .iter()
                .any(|s| s["id"] == "E3" && s["healthy"] == false)
        })
    });

    let dom = dump_dom(browser, &format!("{a}/status"));
    assert!(dom.contains("<h1>dqkd site KME_A</h1>"), "{dom}");
    assert!(
        row(&dom, "data-site=\"KME_B\"").contains("127.0.0.1:"),
        "{dom}"
    );
    let peer = row(&dom, "data-peer=\"KME_B\"");
    assert!(peer.contains("data-reachable=\"true\""), "{peer}");
    assert!(peer.contains(" ms</td>"), "a round trip: {peer}");
    let pool = row(&dom, "data-pool=\"KME_B\"");
    // Full, less Alice's key if it came from the pool.
    assert!(
        pool.contains("data-ready=\"2000\"") || pool.contains("data-ready=\"1999\""),
        "{pool}"
    );
    for healthy in ["E1", "E2"] {
        let server = row(&dom, &format!("data-entropy=\"{healthy}\""));
        assert!(server.contains("data-healthy=\"true\""), "{server}");
    }
    let down = row(&dom, "data-entropy=\"E3\"");
    assert!(down.contains("data-healthy=\"false\""), "{down}");
    assert!(down.contains(">unhealthy<"), "{down}");
    for certificate in ["own", "ca", "crl_next_update"] {
        let cert = row(&dom, &format!("data-certificate=\"{certificate}\""));
        assert!(cert.contains("class=\"ok\""), "{cert}");
    }
    // Alice's handshake, and the peer links' hybrid key exchange.
    assert!(
        row(&dom, "data-listener=\"etsi\"").contains("<td>etsi</td>"),
        "{dom}"
    );
    assert!(
        row(&dom, "data-listener=\"peer\"").contains("X25519MLKEM768"),
        "{dom}"
    );
    // Aggregates only.
    assert!(
        !dom.to_lowercase().contains(&key_id.to_lowercase()),
        "{dom}"
    );

    // Site B holds the key for Bob, and counts it without naming it.
    let dom = dump_dom(browser, &format!("{b}/status"));
    assert!(
        row(&dom, "data-keys=\"waiting\"").contains(">1</td>"),
        "{dom}"
    );
    assert!(
        !dom.to_lowercase().contains(&key_id.to_lowercase()),
        "{dom}"
    );
    save_screenshot(browser, &format!("{a}/status"));
}

/// With `DQKD_STATUS_SCREENSHOT=<file.png>`, keeps a picture of the page (how the one in
/// docs/ is made).
fn save_screenshot(browser: &str, url: &str) {
    let Ok(path) = std::env::var("DQKD_STATUS_SCREENSHOT") else {
        return;
    };
    let profile = tempfile::tempdir().expect("profile dir");
    let status = headless(browser, profile.path())
        .args(["--hide-scrollbars", "--window-size=1000,940"])
        .arg(format!("--screenshot={path}"))
        .arg(url)
        .status()
        .expect("run chromium");
    assert!(status.success() && Path::new(&path).exists());
}

#[test]
fn dqkd_status_reads_every_site_and_flags_problems() {
    let mut cluster = Cluster::start_full(&["KME_A", "KME_B"], 3, 2000, POOLS);
    let (a, b) = (
        metrics_url(&cluster, "KME_A"),
        metrics_url(&cluster, "KME_B"),
    );
    let site = wait_for_json(&a, settled);
    assert_eq!(site["kme_id"], "KME_A");
    assert_eq!(site["peers"][0]["reachable"], true);
    let key_id = leave_a_key_waiting(&cluster);

    let out = Command::new(BIN)
        .args(["status", "--url", &a, "--url", &b])
        .output()
        .expect("run dqkd status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("KME_B reachable"), "{text}");
    // Alice's key may have come from the pool.
    assert!(
        text.contains("→KME_B 2000/2000 ready") || text.contains("→KME_B 1999/2000 ready"),
        "{text}"
    );
    assert!(text.contains("E1 healthy"), "{text}");
    assert!(text.contains("1 waiting for SAEs"), "{text}");
    assert_eq!(text.matches("=> ok").count(), 2, "{text}");

    // The certificate gauge the page reads is on /metrics too, for alerting.
    let metrics = cluster.site("KME_A").metrics();
    for certificate in ["own", "ca", "crl_next_update"] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("dqkd_certificate_expiry_seconds{")
                    && l.contains(&format!("certificate=\"{certificate}\""))
            })
            .unwrap_or_else(|| panic!("no {certificate} expiry in:\n{metrics}"));
        let seconds: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("value");
        assert!(seconds > 30.0 * 86_400.0, "{line}");
    }

    cluster.entropy[0].kill9();
    // The page's figures may be up to a second old.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (out, text) = loop {
        let out = Command::new(BIN)
            .args(["status", "--url", &a])
            .output()
            .expect("run dqkd status");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.code() != Some(0) || Instant::now() > deadline {
            break (out, text);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("E1 UNHEALTHY"), "{text}");
    assert!(
        text.contains("NEEDS ATTENTION: entropy server E1 unhealthy"),
        "{text}"
    );
    let json = Command::new(BIN)
        .args(["status", "--json", "--url", &a, "--url", &b])
        .output()
        .expect("run dqkd status --json");
    let json = String::from_utf8_lossy(&json.stdout);
    assert!(
        !json.to_lowercase().contains(&key_id.to_lowercase()),
        "{json}"
    );
}
