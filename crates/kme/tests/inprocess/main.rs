//! The KME core in process: three sites wired through the `Peer` trait in memory, driven
//! through `api::router` with `oneshot`, on tokio's paused clock. No ports, no sleeps: time
//! moves only when every task waits, so deadlines, retries and TTLs pass in milliseconds.

mod far;
mod faults;
mod harness;
mod memory;
mod names;
mod settle;
mod source;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use dqkd_pki::{Identity, Role};
use dqkd_store::KeyStore as _;
use harness::{Cluster, CLUSTER, KEY_TTL};

/// The ETSI validation table of the end-to-end suite: every malformed or forbidden request
/// is a 400 with a JSON Error body, and no peer is called for any of them.
#[tokio::test(start_paused = true)]
async fn every_validation_case_is_a_400_with_an_error_body() {
    let cluster = Cluster::new().await;
    let id = uuid::Uuid::new_v4();
    let (get, post) = (Method::GET, Method::POST);
    let enc = "/api/v1/keys/bob/enc_keys";
    let dec = "/api/v1/keys/bob/dec_keys";
    let cases: Vec<(Method, String, Option<&str>)> = vec![
        (get.clone(), format!("{enc}?number=0"), None),
        (get.clone(), format!("{enc}?number=-1"), None),
        (get.clone(), format!("{enc}?number=abc"), None),
        (get.clone(), format!("{enc}?number=17"), None),
        (get.clone(), format!("{enc}?size=0"), None),
        (get.clone(), format!("{enc}?size=100"), None),
        (get.clone(), format!("{enc}?size=56"), None),
        (get.clone(), format!("{enc}?size=2048"), None),
        (get.clone(), format!("{enc}?size=x"), None),
        (get.clone(), format!("{enc}?colour=red"), None),
        (post.clone(), enc.into(), Some(r#"{"number":0}"#)),
        (post.clone(), enc.into(), Some(r#"{"number":-3}"#)),
        (post.clone(), enc.into(), Some(r#"{"number":"2"}"#)),
        (post.clone(), enc.into(), Some(r#"{"number":17}"#)),
        (post.clone(), enc.into(), Some(r#"{"size":12}"#)),
        (post.clone(), enc.into(), Some(r#"{"size":8}"#)),
        (post.clone(), enc.into(), Some(r#"{"size":1.5}"#)),
        (
            post.clone(),
            enc.into(),
            Some(r#"{"additional_slave_SAE_IDs":[]}"#),
        ),
        (
            post.clone(),
            enc.into(),
            Some(r#"{"additional_slave_SAE_IDs":[""]}"#),
        ),
        (
            post.clone(),
            enc.into(),
            Some(r#"{"additional_slave_SAE_IDs":["carol","carol"]}"#),
        ),
        (
            post.clone(),
            enc.into(),
            Some(r#"{"additional_slave_SAE_IDs":["bob"]}"#),
        ),
        (
            post.clone(),
            enc.into(),
            Some(r#"{"additional_slave_SAE_IDs":["alice"]}"#),
        ),
        (
            post.clone(),
            enc.into(),
            Some(r#"{"additional_slave_SAE_IDs":["zed"]}"#),
        ),
        (
            post.clone(),
            enc.into(),
            Some(r#"{"additional_slave_SAE_IDs":["B"]}"#),
        ),
        (
            post.clone(),
            enc.into(),
            Some(r#"{"additional_slave_SAE_IDs":["carol","dave","amy"]}"#),
        ),
        (
            post.clone(),
            enc.into(),
            Some(r#"{"additional_slave_SAE_IDs":"carol"}"#),
        ),
        (
            post.clone(),
            enc.into(),
            Some(r#"{"extension_mandatory":[{"route":"direct"}]}"#),
        ),
        (post.clone(), enc.into(), Some("{not json")),
        (post.clone(), enc.into(), Some("[1,2]")),
        (get.clone(), "/api/v1/keys/zed/enc_keys".into(), None),
        (get.clone(), "/api/v1/keys/zed/status".into(), None),
        (get.clone(), "/api/v1/keys/alice/enc_keys".into(), None),
        (get.clone(), "/api/v1/keys/%20/enc_keys".into(), None),
        (get.clone(), format!("{dec}?key_ID=not-a-uuid"), None),
        (get.clone(), dec.into(), None),
        (get.clone(), format!("{dec}?key_ID={id}&key_ID={id}"), None),
        (post.clone(), dec.into(), Some(r#"{"key_IDs":[]}"#)),
        (
            post.clone(),
            dec.into(),
            Some(r#"{"key_IDs":[{"key_ID":"nope"}]}"#),
        ),
        (post.clone(), dec.into(), Some(r#"{"key_IDs":"x"}"#)),
        (post.clone(), dec.into(), Some("")),
        (post.clone(), dec.into(), Some("{oops")),
    ];
    for (method, path, body) in cases {
        let answer = cluster
            .call("A", "alice", method.clone(), &path, body)
            .await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{method} {path} {body:?}: {:?}",
            answer.body
        );
        assert!(!answer.message().is_empty(), "{method} {path}: no message");
    }
    let size = cluster
        .call("A", "alice", get, &format!("{enc}?size=100"), None)
        .await;
    assert_eq!(size.message(), "size shall be a multiple of 8");
    for to in ["B", "C"] {
        let link = cluster.link("A", to);
        assert_eq!(link.calls(harness::Call::Deliver), 0, "a peer was called");
    }
}

/// Keys made at A reach B's slave, the same bytes, once.
#[tokio::test(start_paused = true)]
async fn a_key_crosses_sites_and_is_delivered_once() {
    let cluster = Cluster::new().await;
    let sent = cluster
        .enc("A", "alice", "bob", r#"{"number":3}"#)
        .await
        .keys();
    assert_eq!(sent.len(), 3);
    let ids: Vec<String> = sent.iter().map(|(id, _)| id.clone()).collect();
    let got = cluster.dec("B", "bob", "alice", &ids).await.keys();
    assert_eq!(got, sent);
    let again = cluster.dec("B", "bob", "alice", &ids[..1]).await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        again.message(),
        "one or more keys specified are not found on KME"
    );
}

/// One request, slaves at two other sites: each fetches the same keys at its own site,
/// once; the status of a site-wide slave counts the master's keys.
#[tokio::test(start_paused = true)]
async fn multicast_reaches_slaves_at_two_sites() {
    let cluster = Cluster::new().await;
    let sent = cluster
        .enc(
            "A",
            "alice",
            "bob",
            r#"{"number":2,"additional_slave_SAE_IDs":["carol","dave"]}"#,
        )
        .await
        .keys();
    let ids: Vec<String> = sent.iter().map(|(id, _)| id.clone()).collect();
    for (site, slave) in [("B", "bob"), ("B", "carol"), ("C", "dave")] {
        let got = cluster.dec(site, slave, "alice", &ids).await.keys();
        assert_eq!(got, sent, "{slave} at {site}");
        let twice = cluster.dec(site, slave, "alice", &ids).await;
        assert_eq!(
            twice.status,
            StatusCode::BAD_REQUEST,
            "{slave} got a key twice"
        );
    }
    assert_eq!(cluster.link("A", "B").calls(harness::Call::Deliver), 1);
    assert_eq!(cluster.link("A", "C").calls(harness::Call::Deliver), 1);
}

/// Who may not have a key gets 401 and learns nothing; the key is still there for its slave.
#[tokio::test(start_paused = true)]
async fn callers_not_entitled_are_refused() {
    let cluster = Cluster::new().await;
    let ids = cluster.enc("A", "alice", "bob", "{}").await.ids();
    // Another SAE of the slave's site.
    let carol = cluster.dec("B", "carol", "alice", &ids).await;
    assert_eq!(carol.status, StatusCode::UNAUTHORIZED);
    // The right slave naming the wrong master.
    let wrong_master = cluster.dec("B", "bob", "amy", &ids).await;
    assert_eq!(wrong_master.status, StatusCode::UNAUTHORIZED);
    // An SAE of another site, at the slave's site.
    let dave = cluster.dec("B", "dave", "alice", &ids).await;
    assert_eq!(dave.status, StatusCode::UNAUTHORIZED);
    // A KME certificate, an SAE of another site, and no identity at all, on the SAE API.
    let kme = Identity::new(CLUSTER, Role::Kme, "B").expect("identity");
    let stranger = Identity::new(CLUSTER, Role::Sae, "alice").expect("identity");
    for who in [Some(kme), Some(stranger), None] {
        let answer = cluster
            .call_as(
                "B",
                who.clone(),
                Method::GET,
                "/api/v1/keys/bob/status",
                None,
            )
            .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{who:?}");
    }
    // None of that took the key.
    assert_eq!(cluster.dec("B", "bob", "alice", &ids).await.ids(), ids);
}

/// An undelivered key expires after `keys.ttl_secs` at the slave's site, on the injected
/// clock: before, bob gets it; after, it is gone, and a purge shreds it.
#[tokio::test(start_paused = true)]
async fn undelivered_keys_expire_after_their_ttl() {
    let cluster = Cluster::new().await;
    let early = cluster.enc("A", "alice", "bob", "{}").await.ids();
    let late = cluster.enc("A", "alice", "bob", "{}").await.ids();
    tokio::time::advance(KEY_TTL - std::time::Duration::from_secs(2)).await;
    assert_eq!(cluster.dec("B", "bob", "alice", &early).await.ids(), early);
    tokio::time::advance(std::time::Duration::from_secs(3)).await;
    let expired = cluster.dec("B", "bob", "alice", &late).await;
    assert_eq!(
        expired.status,
        StatusCode::BAD_REQUEST,
        "{:?}",
        expired.body
    );
    let b = cluster.site("B");
    assert_eq!(b.service.purge_expired().await.expect("purge"), 1);
    assert_eq!(b.store.pending("alice", "bob"), 0);
}

/// The receiving site regenerates consecutive batches at the same time: a batch that
/// arrives while an earlier one still waits for its entropy is not queued behind it.
#[tokio::test(start_paused = true)]
async fn deliveries_of_consecutive_batches_overlap_at_the_peer() {
    let cluster = Arc::new(Cluster::with_slow_regeneration(Duration::from_millis(80)).await);
    let mut calls = Vec::new();
    for _ in 0..8 {
        let cluster = cluster.clone();
        calls.push(tokio::spawn(async move {
            cluster.enc("A", "alice", "bob", r#"{"number":1}"#).await
        }));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for call in calls {
        assert_eq!(call.await.expect("request").keys().len(), 1);
    }
    let most = cluster.site("B").source.most_regenerating();
    assert!(
        most >= 4,
        "at most {most} deliveries regenerated at once at B"
    );
}
