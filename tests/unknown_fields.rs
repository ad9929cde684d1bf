//! A Key request with fields the standard does not define is served, and the KME warns
//! with the field names (never their values), so a misspelt field is found in the log.

mod common;

use std::time::{Duration, Instant};

use common::Site;
use http::{Method, StatusCode};

#[tokio::test(flavor = "multi_thread")]
async fn unknown_key_request_fields_are_logged_by_name_only() {
    let site = Site::start();
    let body = br#"{"number":1,"additional_slave_SAEs_IDs":["carol"],"sise":"VALUE-NOT-LOGGED"}"#;
    let raw = site
        .client("alice")
        .raw(
            Method::POST,
            "/api/v1/keys/bob/enc_keys",
            Some(body.to_vec()),
        )
        .await
        .expect("enc_keys");
    assert_eq!(raw.status, StatusCode::OK);

    // The warning is written before the answer leaves; the poll only covers file buffering.
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let log = site.log();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("additional_slave_SAEs_IDs"))
        {
            break line.to_owned();
        }
        assert!(Instant::now() < deadline, "no warning in the log:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("sise"), "{line}");
    assert!(
        line.contains("alice"),
        "the warning names the caller: {line}"
    );
    assert!(
        !site.log().contains("VALUE-NOT-LOGGED"),
        "a value was logged"
    );

    // A request with only the standard's fields draws no warning.
    let clean = br#"{"number":1,"size":256,"extension_optional":[]}"#;
    let raw = site
        .client("alice")
        .raw(
            Method::POST,
            "/api/v1/keys/bob/enc_keys",
            Some(clean.to_vec()),
        )
        .await
        .expect("enc_keys");
    assert_eq!(raw.status, StatusCode::OK);
    assert_eq!(
        site.log().matches("the standard does not define").count(),
        1,
        "{}",
        site.log()
    );
}
