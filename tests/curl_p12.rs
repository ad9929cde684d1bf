//! The mission's curl flow: `curl --cert <sae>.p12 --cert-type P12` against a real KME,
//! with `.p12` bundles from `dqkd pki`.

mod common;

use std::process::Command;

use common::{path_str, Site};

fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["--silent", "--show-error"])
        .args(args)
        .output()
        .expect("curl runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn have_curl() -> bool {
    let found = Command::new("curl").arg("--version").output().is_ok();
    if !found {
        common::skip("curl", "the curl flow");
    }
    found
}

#[test]
fn curl_with_p12_completes_enc_and_dec() {
    if !have_curl() {
        return;
    }
    let site = Site::start();
    let ca = site.ca();
    let alice = site.path("pki/sae/alice.p12");
    let bob = site.path("pki/sae/bob.p12");
    let (ok, out) = curl(&[
        "--cert",
        path_str(&alice),
        "--cert-type",
        "P12",
        "--cacert",
        path_str(&ca),
        &format!("{}/api/v1/keys/bob/enc_keys", site.url),
    ]);
    assert!(ok, "curl enc_keys: {out}");
    let sent: serde_json::Value = serde_json::from_str(&out).expect("JSON from enc_keys");
    let key_id = sent["keys"][0]["key_ID"].as_str().expect("key_ID");
    let key = sent["keys"][0]["key"].as_str().expect("key");

    let body = format!(r#"{{"key_IDs": [{{"key_ID": "{key_id}"}}]}}"#);
    let (ok, out) = curl(&[
        "--cert",
        path_str(&bob),
        "--cert-type",
        "P12",
        "--cacert",
        path_str(&ca),
        &format!("{}/api/v1/keys/alice/dec_keys", site.url),
        "-H",
        "Content-Type: application/json",
        "-d",
        &body,
    ]);
    assert!(ok, "curl dec_keys: {out}");
    let got: serde_json::Value = serde_json::from_str(&out).expect("JSON from dec_keys");
    assert_eq!(got["keys"][0]["key_ID"], key_id);
    assert_eq!(got["keys"][0]["key"], key);

    // Without a client certificate curl cannot even complete the exchange.
    let (ok, out) = curl(&[
        "--cacert",
        path_str(&ca),
        &format!("{}/api/v1/keys/bob/status", site.url),
    ]);
    assert!(
        !ok,
        "a request without a client certificate succeeded: {out}"
    );
}
