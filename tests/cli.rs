//! The command line as a user meets it: `dqkd demo`, `dqkd pki` refusals, `dqkd keys`.

mod common;

use std::process::Command;

use common::{dqkd, path_str, Site, BIN};

#[test]
fn demo_starts_its_own_cluster_when_none_is_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The demo's cluster uses fixed offsets from its base port (up to +302); this range
    // stays clear of the one the other fixtures draw ports from (15000 and up) and of
    // the kernel's ephemeral ports.
    let port = 10_000 + (uuid::Uuid::new_v4().as_u128() % 4_500) as u16;
    let out = Command::new(BIN)
        .args(["demo", "--dir"])
        .arg(dir.path().join("nothing-here"))
        .args(["--port", &port.to_string()])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run dqkd demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("→ the same key").count(), 2, "{text}");
}

#[test]
fn pki_never_overwrites_silently() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    dqkd(&["pki", "init", "--cluster", "c1", "--out", path_str(&pki)]);
    let again = Command::new(BIN)
        .args(["pki", "init", "--cluster", "c1", "--out", path_str(&pki)])
        .output()
        .expect("run");
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("--force"), "{err}");
    dqkd(&[
        "pki",
        "init",
        "--cluster",
        "c1",
        "--out",
        path_str(&pki),
        "--force",
    ]);

    let kek = dir.path().join("site.kek");
    dqkd(&["pki", "kek", "--out", path_str(&kek)]);
    let again = Command::new(BIN)
        .args(["pki", "kek", "--out", path_str(&kek)])
        .output()
        .expect("run");
    assert!(!again.status.success(), "a second KEK overwrote the first");
}

#[test]
fn keys_prints_what_the_kme_sent_and_fails_on_errors() {
    let site = Site::start();
    let ca = site.ca();
    let alice = site.path("pki/sae/alice.combined.pem");
    let base = [
        "keys",
        "--kme",
        &site.url,
        "--ca",
        path_str(&ca),
        "--identity",
        path_str(&alice),
    ];
    let enc = dqkd(&[&base[..], &["enc", "bob", "--number", "2"]].concat());
    let json: serde_json::Value = serde_json::from_str(enc.trim()).expect("JSON on stdout");
    assert_eq!(json["keys"].as_array().map(Vec::len), Some(2));

    let bad = Command::new(BIN)
        .args([&base[..], &["enc", "bob", "--size", "12"]].concat())
        .output()
        .expect("run");
    assert_eq!(bad.status.code(), Some(1));
    let body: serde_json::Value =
        serde_json::from_slice(&bad.stdout).expect("the error body on stdout");
    assert_eq!(body["message"], "size shall be a multiple of 8");
}

/// A start that fails names its cause once: the I/O error is in the message, not repeated
/// as a source that the top-level report prints again.
#[test]
fn a_taken_port_is_reported_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = 10_000 + (uuid::Uuid::new_v4().as_u128() % 4_500) as u16;
    // Site A's ETSI API port, held by someone else.
    let _taken = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind the port first");
    let out = Command::new(BIN)
        .args(["up", "--no-demo", "--dir"])
        .arg(dir.path().join("local"))
        .args(["--port", &port.to_string()])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run dqkd up");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started on a taken port: {err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert_eq!(
        err.matches("os error").count(),
        1,
        "the cause named more than once: {err}"
    );
}
