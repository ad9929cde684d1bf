//! ETSI GS QKD 014 conformance of one site, end to end: the real `dqkd kme` process,
//! certificates from `dqkd pki`, mutual TLS on loopback.

mod common;

use common::{base64_decode, Site};
use dqkd_client::{ClientError, KeyRequestBody};
use http::{Method, StatusCode};

fn api_status(result: Result<impl std::fmt::Debug, ClientError>) -> (StatusCode, String) {
    match result {
        Err(ClientError::Api { status, message }) => (status, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_the_configured_limits() {
    let site = Site::start();
    let status = site.client("alice").status("bob").await.expect("status");
    assert_eq!(status.source_KME_ID, "KME_A");
    assert_eq!(status.target_KME_ID, "KME_A");
    assert_eq!(status.master_SAE_ID, "alice");
    assert_eq!(status.slave_SAE_ID, "bob");
    assert_eq!(status.key_size, 256);
    assert_eq!(status.min_key_size, 64);
    assert_eq!(status.max_key_size, 1024);
    assert_eq!(status.max_key_per_request, 16);
    assert_eq!(status.max_key_count, 40);
    assert_eq!(status.max_SAE_ID_count, 2);
    assert_eq!(status.stored_key_count, 40);

    // Undelivered keys use up the pair's capacity, and delivery frees it.
    let alice = site.client("alice");
    let keys = alice
        .enc_keys(
            "bob",
            &KeyRequestBody {
                number: Some(3),
                ..Default::default()
            },
        )
        .await
        .expect("enc_keys");
    assert_eq!(
        alice.status("bob").await.expect("status").stored_key_count,
        37
    );
    let ids: Vec<&str> = keys.keys.iter().map(|k| k.key_ID.as_str()).collect();
    site.client("bob")
        .dec_keys("alice", &ids)
        .await
        .expect("dec_keys");
    assert_eq!(
        alice.status("bob").await.expect("status").stored_key_count,
        40
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn enc_and_dec_in_every_form_give_the_same_keys() {
    let site = Site::start();
    let alice = site.client("alice");
    let bob = site.client("bob");

    // GET without a query: defaults, which must match status.
    let status = alice.status("bob").await.expect("status");
    let one = alice
        .enc_keys_get("bob", None, None)
        .await
        .expect("GET enc_keys");
    assert_eq!(one.keys.len(), 1);
    assert_eq!(
        base64_decode(&one.keys[0].key).len() * 8,
        status.key_size as usize
    );

    // GET with number and size.
    let two = alice
        .enc_keys_get("bob", Some(2), Some(512))
        .await
        .expect("GET enc_keys n/s");
    assert_eq!(two.keys.len(), 2);
    assert!(two.keys.iter().all(|k| base64_decode(&k.key).len() == 64));

    // POST with an empty body, with `{}`, and with fields.
    let raw = alice
        .raw(Method::POST, "/api/v1/keys/bob/enc_keys", Some(Vec::new()))
        .await
        .expect("POST empty");
    assert_eq!(raw.status, StatusCode::OK);
    assert_eq!(raw.content_type.as_deref(), Some("application/json"));
    let empty: dqkd_etsi014::KeyContainer = serde_json::from_slice(&raw.body).expect("container");
    let braces = alice
        .enc_keys("bob", &KeyRequestBody::default())
        .await
        .expect("POST {}");
    let three = alice
        .enc_keys(
            "bob",
            &KeyRequestBody {
                number: Some(3),
                size: Some(128),
                ..Default::default()
            },
        )
        .await
        .expect("POST fields");
    assert_eq!(three.keys.len(), 3);
    assert!(three.keys.iter().all(|k| base64_decode(&k.key).len() == 16));

    // Every key ID is a distinct UUID.
    let all: Vec<&dqkd_etsi014::Key> = one
        .keys
        .iter()
        .chain(&two.keys)
        .chain(&empty.keys)
        .chain(&braces.keys)
        .chain(&three.keys)
        .collect();
    let mut ids: Vec<uuid::Uuid> = all
        .iter()
        .map(|k| uuid::Uuid::parse_str(&k.key_ID).expect("UUID key_ID"))
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), all.len());

    // dec_keys GET (single ID, upper case accepted) and POST (several IDs, order kept).
    let got = bob
        .dec_keys_get("alice", &one.keys[0].key_ID.to_uppercase())
        .await
        .expect("GET dec_keys");
    assert_eq!(got.keys[0].key, one.keys[0].key);
    let rest: Vec<&dqkd_etsi014::Key> = all[1..].to_vec();
    let rest_ids: Vec<&str> = rest.iter().rev().map(|k| k.key_ID.as_str()).collect();
    let got = bob
        .dec_keys("alice", &rest_ids)
        .await
        .expect("POST dec_keys");
    assert_eq!(got.keys.len(), rest.len());
    for (sent, received) in rest.iter().rev().zip(&got.keys) {
        assert_eq!(sent.key_ID, received.key_ID);
        assert_eq!(sent.key, received.key);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_is_delivered_once() {
    let site = Site::start();
    let keys = site
        .client("alice")
        .enc_keys("bob", &KeyRequestBody::default())
        .await
        .expect("enc");
    let id = keys.keys[0].key_ID.as_str();
    let bob = site.client("bob");
    bob.dec_keys("alice", &[id]).await.expect("first dec_keys");
    let (status, message) = api_status(bob.dec_keys("alice", &[id]).await);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(message, "one or more keys specified are not found on KME");
    let (status, _) = api_status(bob.dec_keys_get("alice", id).await);
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread")]
async fn dec_keys_is_all_or_nothing() {
    let site = Site::start();
    let keys = site
        .client("alice")
        .enc_keys(
            "bob",
            &KeyRequestBody {
                number: Some(2),
                ..Default::default()
            },
        )
        .await
        .expect("enc");
    let bob = site.client("bob");
    let unknown = uuid::Uuid::new_v4().to_string();
    let (status, _) = api_status(
        bob.dec_keys("alice", &[keys.keys[0].key_ID.as_str(), unknown.as_str()])
            .await,
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Nothing was consumed by the failed call.
    let ids: Vec<&str> = keys.keys.iter().map(|k| k.key_ID.as_str()).collect();
    assert_eq!(
        bob.dec_keys("alice", &ids).await.expect("dec").keys.len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn multicast_reaches_every_slave_once() {
    let site = Site::start();
    let keys = site
        .client("alice")
        .enc_keys(
            "bob",
            &KeyRequestBody {
                number: Some(2),
                additional_slave_SAE_IDs: vec!["carol".into()],
                ..Default::default()
            },
        )
        .await
        .expect("multicast enc_keys");
    let ids: Vec<&str> = keys.keys.iter().map(|k| k.key_ID.as_str()).collect();
    for slave in ["bob", "carol"] {
        let got = site
            .client(slave)
            .dec_keys("alice", &ids)
            .await
            .expect("dec_keys");
        for (sent, received) in keys.keys.iter().zip(&got.keys) {
            assert_eq!(sent.key, received.key, "{slave} got another key");
        }
        let (status, _) = api_status(site.client(slave).dec_keys("alice", &ids).await);
        assert_eq!(status, StatusCode::BAD_REQUEST, "{slave} got a key twice");
    }
    // dave was not named: 401.
    let fresh = site
        .client("alice")
        .enc_keys(
            "bob",
            &KeyRequestBody {
                additional_slave_SAE_IDs: vec!["carol".into()],
                ..Default::default()
            },
        )
        .await
        .expect("enc");
    let id = fresh.keys[0].key_ID.as_str();
    let (status, _) = api_status(site.client("dave").dec_keys("alice", &[id]).await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_master_may_fetch_its_own_keys_again_once() {
    let site = Site::start();
    let alice = site.client("alice");
    let keys = alice
        .enc_keys("bob", &KeyRequestBody::default())
        .await
        .expect("enc");
    let id = keys.keys[0].key_ID.as_str();
    // By its own SAE ID or by its site's KME ID.
    let again = alice
        .dec_keys("KME_A", &[id])
        .await
        .expect("master refetch");
    assert_eq!(again.keys[0].key, keys.keys[0].key);
    let (status, _) = api_status(alice.dec_keys("alice", &[id]).await);
    assert_eq!(status, StatusCode::BAD_REQUEST, "a second refetch");
    // Bob's copy is independent of Alice's.
    site.client("bob")
        .dec_keys("alice", &[id])
        .await
        .expect("bob's copy");
}

/// Some clients name the key's other party in the `dec_keys` path: a master fetching its
/// key again names the slave (SAE or KME ID). That reads as the master's own key; every
/// refusal of the standard's reading stays.
#[tokio::test(flavor = "multi_thread")]
async fn a_master_refetching_may_name_the_slave() {
    let site = Site::start();
    let alice = site.client("alice");
    let request = KeyRequestBody {
        number: Some(2),
        ..Default::default()
    };
    let keys = alice.enc_keys("bob", &request).await.expect("enc");
    let (first, second) = (keys.keys[0].key_ID.as_str(), keys.keys[1].key_ID.as_str());
    // Another SAE naming the slave gets nothing: the keys are not its own.
    let (status, _) = api_status(site.client("carol").dec_keys("bob", &[first]).await);
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "another SAE naming the slave"
    );
    // The master names the slave's SAE ID, then its KME ID.
    let again = alice
        .dec_keys("bob", &[first])
        .await
        .expect("refetch naming bob");
    assert_eq!(again.keys[0].key, keys.keys[0].key);
    let again = alice
        .dec_keys("KME_A", &[second])
        .await
        .expect("refetch naming the slave's KME");
    assert_eq!(again.keys[0].key, keys.keys[1].key);
    // Once only, whichever party the path names.
    let (status, _) = api_status(alice.dec_keys("bob", &[first]).await);
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a second refetch naming the slave"
    );
    let (status, _) = api_status(alice.dec_keys("alice", &[second]).await);
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a second refetch naming itself"
    );
    // A name that is no party of the cluster reads as before: not this master's keys.
    let fresh = alice
        .enc_keys("bob", &KeyRequestBody::default())
        .await
        .expect("enc");
    let id = fresh.keys[0].key_ID.as_str();
    let (status, _) = api_status(alice.dec_keys("mallory", &[id]).await);
    assert_ne!(status, StatusCode::OK, "an unknown name in the path");
    // The slave's own copy is untouched by all of it.
    let bob = site.client("bob");
    let mine = bob
        .dec_keys("alice", &[first, second])
        .await
        .expect("bob's copies");
    assert_eq!(mine.keys.len(), 2);
}

const DELIVER_ONCE: &str = r#"
[limits]
max_key_per_request = 16
max_key_count = 40
[keys]
master_refetch = false
"#;

#[tokio::test(flavor = "multi_thread")]
async fn deliver_once_policy_refuses_the_master() {
    let site = Site::start_with(DELIVER_ONCE);
    let alice = site.client("alice");
    let keys = alice
        .enc_keys("bob", &KeyRequestBody::default())
        .await
        .expect("enc");
    let id = keys.keys[0].key_ID.as_str();
    let (status, _) = api_status(alice.dec_keys("alice", &[id]).await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = api_status(alice.dec_keys("bob", &[id]).await);
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "naming the slave changes nothing"
    );
    site.client("bob")
        .dec_keys("alice", &[id])
        .await
        .expect("bob still gets it");
}

#[tokio::test(flavor = "multi_thread")]
async fn callers_not_entitled_get_401() {
    let site = Site::start();
    let keys = site
        .client("alice")
        .enc_keys("bob", &KeyRequestBody::default())
        .await
        .expect("enc");
    let id = keys.keys[0].key_ID.as_str();

    // Another SAE of the site may not take Bob's key.
    let (status, _) = api_status(site.client("carol").dec_keys("alice", &[id]).await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Bob naming the wrong master.
    let (status, _) = api_status(site.client("bob").dec_keys("carol", &[id]).await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A certificate of the cluster that no site lists may use nothing.
    let mallory = site.client("mallory");
    let (status, _) = api_status(mallory.status("bob").await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = api_status(mallory.enc_keys("bob", &KeyRequestBody::default()).await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = api_status(mallory.dec_keys("alice", &[id]).await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A KME certificate is not an SAE.
    let kme = dqkd_pki::client_config(
        &site.ca(),
        &site.path("pki/kme/KME_A.pem"),
        &site.path("pki/kme/KME_A.key"),
    )
    .expect("tls");
    let kme = dqkd_client::Client::new(&site.url, kme).expect("client");
    let (status, _) = api_status(kme.status("bob").await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The failed attempts consumed nothing.
    site.client("bob")
        .dec_keys("alice", &[id])
        .await
        .expect("bob still gets it");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_validation_case_is_a_400_with_an_error_body() {
    let site = Site::start();
    let alice = site.client("alice");
    let id = uuid::Uuid::new_v4();
    let cases: Vec<(Method, String, Option<&str>)> = vec![
        (
            Method::GET,
            "/api/v1/keys/bob/enc_keys?number=0".into(),
            None,
        ),
        (
            Method::GET,
            "/api/v1/keys/bob/enc_keys?number=-1".into(),
            None,
        ),
        (
            Method::GET,
            "/api/v1/keys/bob/enc_keys?number=abc".into(),
            None,
        ),
        (
            Method::GET,
            "/api/v1/keys/bob/enc_keys?number=17".into(),
            None,
        ),
        (Method::GET, "/api/v1/keys/bob/enc_keys?size=0".into(), None),
        (
            Method::GET,
            "/api/v1/keys/bob/enc_keys?size=100".into(),
            None,
        ),
        (
            Method::GET,
            "/api/v1/keys/bob/enc_keys?size=56".into(),
            None,
        ),
        (
            Method::GET,
            "/api/v1/keys/bob/enc_keys?size=2048".into(),
            None,
        ),
        (Method::GET, "/api/v1/keys/bob/enc_keys?size=x".into(), None),
        (
            Method::GET,
            "/api/v1/keys/bob/enc_keys?colour=red".into(),
            None,
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/enc_keys".into(),
            Some(r#"{"number":0}"#),
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/enc_keys".into(),
            Some(r#"{"number":-3}"#),
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/enc_keys".into(),
            Some(r#"{"number":"2"}"#),
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/enc_keys".into(),
            Some(r#"{"number":17}"#),
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/enc_keys".into(),
            Some(r#"{"size":12}"#),
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/enc_keys".into(),
            Some(r#"{"size":8}"#),
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/enc_keys".into(),
            Some(r#"{"size":1.5}"#),
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/enc_keys".into(),
            Some(r#"{"additional_slave_SAE_IDs":[]}"#),
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/enc_keys".into(),
            Some(r#"{"additional_slave_SAE_IDs":[""]}"#),
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/enc_keys".into(),
            Some(r#"{"additional_slave_SAE_IDs":["carol","carol"]}"#),
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/enc_keys".into(),
            Some(r#"{"additional_slave_SAE_IDs":["bob"]}"#),
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/enc_keys".into(),
            Some(r#"{"additional_slave_SAE_IDs":["alice"]}"#),
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/enc_keys".into(),
            Some(r#"{"additional_slave_SAE_IDs":["zed"]}"#),
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/enc_keys".into(),
            Some(r#"{"additional_slave_SAE_IDs":["carol","dave","mallory"]}"#),
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/enc_keys".into(),
            Some(r#"{"additional_slave_SAE_IDs":"carol"}"#),
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/enc_keys".into(),
            Some(r#"{"extension_mandatory":[{"route":"direct"}]}"#),
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/enc_keys".into(),
            Some("{not json"),
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/enc_keys".into(),
            Some("[1,2]"),
        ),
        (Method::GET, "/api/v1/keys/zed/enc_keys".into(), None),
        (Method::GET, "/api/v1/keys/zed/status".into(), None),
        (Method::GET, "/api/v1/keys/alice/enc_keys".into(), None),
        (Method::GET, "/api/v1/keys/%20/enc_keys".into(), None),
        (
            Method::GET,
            "/api/v1/keys/bob/dec_keys?key_ID=not-a-uuid".into(),
            None,
        ),
        (Method::GET, "/api/v1/keys/bob/dec_keys".into(), None),
        (
            Method::GET,
            format!("/api/v1/keys/bob/dec_keys?key_ID={id}&key_ID={id}"),
            None,
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/dec_keys".into(),
            Some(r#"{"key_IDs":[]}"#),
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/dec_keys".into(),
            Some(r#"{"key_IDs":[{"key_ID":"nope"}]}"#),
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/dec_keys".into(),
            Some(r#"{"key_IDs":"x"}"#),
        ),
        (Method::POST, "/api/v1/keys/bob/dec_keys".into(), Some("")),
        (
            Method::POST,
            "/api/v1/keys/bob/dec_keys".into(),
            Some("{oops"),
        ),
    ];
    for (method, path, body) in cases {
        let response = alice
            .raw(method.clone(), &path, body.map(|b| b.as_bytes().to_vec()))
            .await
            .expect("request");
        assert_eq!(
            response.status,
            StatusCode::BAD_REQUEST,
            "{method} {path} {body:?}"
        );
        assert_eq!(
            response.content_type.as_deref(),
            Some("application/json"),
            "{path}"
        );
        let error: dqkd_etsi014::ErrorBody =
            serde_json::from_slice(&response.body).expect("Error body");
        assert!(!error.message.is_empty(), "{path}");
    }
    // The fixed messages of the standard, verbatim.
    let (_, message) = api_status(alice.enc_keys_get("bob", None, Some(100)).await);
    assert_eq!(message, "size shall be a multiple of 8");
    let raw = alice
        .raw(
            Method::POST,
            "/api/v1/keys/bob/enc_keys",
            Some(br#"{"extension_mandatory":[{"x":1}]}"#.to_vec()),
        )
        .await
        .expect("request");
    let error: dqkd_etsi014::ErrorBody = serde_json::from_slice(&raw.body).expect("Error body");
    assert_eq!(
        error.message,
        "not all extension_mandatory parameters are supported"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http_level_errors_are_json_too() {
    let site = Site::start();
    let alice = site.client("alice");
    let checks = [
        (Method::GET, "/", None, StatusCode::NOT_FOUND),
        (
            Method::GET,
            "/api/v1/keys/bob/other",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::DELETE,
            "/api/v1/keys/bob/enc_keys",
            None,
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/status",
            Some(b"{}".to_vec()),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Method::POST,
            "/api/v1/keys/bob/enc_keys",
            // Just over the limit, so the client has sent it all before the server answers
            // and closes (with far more, HTTP/1.1 clients may see the reset instead).
            Some(vec![b' '; dqkd_kme::api::MAX_BODY_BYTES + 1024]),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (method, path, body, expected) in checks {
        let response = alice
            .raw(method.clone(), path, body)
            .await
            .expect("request");
        assert_eq!(response.status, expected, "{method} {path}");
        assert_eq!(
            response.content_type.as_deref(),
            Some("application/json"),
            "{path}"
        );
        let error: dqkd_etsi014::ErrorBody =
            serde_json::from_slice(&response.body).expect("Error body");
        assert!(!error.message.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pair_capacity_is_enforced() {
    let site = Site::start();
    let alice = site.client("alice");
    for _ in 0..2 {
        alice
            .enc_keys(
                "bob",
                &KeyRequestBody {
                    number: Some(16),
                    ..Default::default()
                },
            )
            .await
            .expect("within max_key_count");
    }
    let (status, message) = api_status(
        alice
            .enc_keys(
                "bob",
                &KeyRequestBody {
                    number: Some(16),
                    ..Default::default()
                },
            )
            .await,
    );
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(message.contains("max_key_count"), "{message}");
    assert_eq!(
        alice.status("bob").await.expect("status").stored_key_count,
        8
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_and_missing_client_certificates_are_refused_at_the_handshake() {
    let site = Site::start();
    for (who, client) in [
        ("eve", site.foreign_client()),
        ("anonymous", site.anonymous_client()),
    ] {
        match client.status("bob").await {
            Err(ClientError::Transport(_)) => {}
            other => panic!("{who}: expected a refused handshake, got {other:?}"),
        }
    }
    // The server is still serving the cluster's SAEs.
    site.client("alice").status("bob").await.expect("status");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_sae_is_cut_off_without_a_restart() {
    let site = Site::start();
    let bob = site.client("bob");
    let alice = site.client("alice");
    bob.status("alice").await.expect("bob before revocation");
    let pki = site.path("pki");
    let unrevoked = std::fs::read(site.path("pki/ca.crl.pem")).expect("the empty list");
    common::dqkd(&[
        "pki",
        "revoke",
        site.path("pki/sae/bob.pem").to_str().expect("utf-8"),
        "--ca",
        pki.to_str().expect("utf-8"),
    ]);
    // The KME notices within its poll interval and closes bob's open connection; every
    // new handshake of bob's is refused.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        match bob.status("alice").await {
            Err(ClientError::Transport(_)) => break,
            other => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "bob still served: {other:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    wait_for_log(&site, "revocation list reloaded").await;
    wait_for_log(
        &site,
        "closed a connection: its client certificate is now revoked",
    )
    .await;
    alice.status("bob").await.expect("alice is not revoked");

    // An older list (a lower CRL number) would undo the revocation: it is refused.
    std::fs::write(site.path("pki/ca.crl.pem"), &unrevoked).expect("put back the old list");
    wait_for_log(&site, "older than the one in force").await;
    // A damaged list leaves the last good one in force too.
    std::fs::write(site.path("pki/ca.crl.pem"), "not a CRL").expect("damage the CRL");
    wait_for_log(&site, "the revocation list could not be loaded").await;
    assert!(matches!(
        site.client("bob").status("alice").await,
        Err(ClientError::Transport(_))
    ));
    alice.status("bob").await.expect("alice still served");
}

/// Waits until the site's log contains `needle`.
async fn wait_for_log(site: &Site, needle: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !site.log().contains(needle) {
        assert!(
            std::time::Instant::now() < deadline,
            "no {needle:?} in the log: {}",
            site.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kme_id_in_the_path_means_any_sae_of_the_site() {
    let site = Site::start();
    let keys = site
        .client("alice")
        .enc_keys("bob", &KeyRequestBody::default())
        .await
        .expect("enc");
    let got = site
        .client("bob")
        .dec_keys("KME_A", &[keys.keys[0].key_ID.as_str()])
        .await
        .expect("dec_keys naming the master's KME");
    assert_eq!(got.keys[0].key, keys.keys[0].key);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_requests_by_call_and_code() {
    let site = Site::start();
    let alice = site.client("alice");
    let keys = alice
        .enc_keys("bob", &KeyRequestBody::default())
        .await
        .expect("enc");
    let _ = alice.enc_keys_get("bob", None, Some(12)).await;
    site.client("bob")
        .dec_keys("alice", &[keys.keys[0].key_ID.as_str()])
        .await
        .expect("dec");
    let out = std::process::Command::new("curl")
        .args(["--silent", "--show-error", &site.metrics_url])
        .output()
        .expect("curl the metrics listener");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |call: &str, code: &str| {
        text.lines().any(|l| {
            l.starts_with("dqkd_requests_total")
                && l.contains(&format!("call=\"{call}\""))
                && l.contains(&format!("code=\"{code}\""))
                && l.ends_with(" 1")
        })
    };
    assert!(line("enc_keys", "200"), "{text}");
    assert!(line("enc_keys", "400"), "{text}");
    assert!(line("dec_keys", "200"), "{text}");
    if common::postgres_backend().is_none() {
        assert!(text.contains("dqkd_store_commit_seconds_bucket"), "{text}");
    }
    for probe in ["health", "ready"] {
        let url = site.metrics_url.replace("/metrics", &format!("/{probe}"));
        let out = std::process::Command::new("curl")
            .args(["--silent", "--show-error", "--fail", &url])
            .output()
            .expect("curl the probe");
        let body: serde_json::Value = serde_json::from_slice(&out.stdout).expect("probe JSON");
        assert_eq!(body["status"], "ok", "{probe}");
        assert_eq!(body["kme_id"], "KME_A", "{probe}");
    }
    assert!(text.contains("dqkd_issue_batch_keys_bucket"), "{text}");
}
