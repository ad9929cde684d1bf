//! Durability: a key handed to the master survives `kill -9` of the KME and is delivered
//! once after restart; the store file holds no key in plaintext.

mod common;

use common::{base64_decode, Site};
use dqkd_client::{ClientError, KeyRequestBody};
use http::StatusCode;

#[tokio::test(flavor = "multi_thread")]
async fn keys_survive_kill_9_and_are_delivered_once() {
    let mut site = Site::start();
    let alice = site.client("alice");
    let mut issued = Vec::new();
    for _ in 0..5 {
        let keys = alice
            .enc_keys(
                "bob",
                &KeyRequestBody {
                    number: Some(4),
                    ..Default::default()
                },
            )
            .await
            .expect("enc_keys");
        issued.extend(keys.keys.iter().map(|k| (k.key_ID.clone(), k.key.clone())));
    }
    // The last answer has just arrived: kill the process without any chance to flush.
    site.kill9();

    // (The PostgreSQL store has its own test that its rows hold no plaintext key.)
    if common::postgres_backend().is_none() {
        let bytes = std::fs::read(site.store_file()).expect("read store file");
        for (_, key) in &issued {
            let raw = base64_decode(key);
            assert!(
                !bytes.windows(raw.len()).any(|w| w == raw.as_slice()),
                "a key is stored in plaintext"
            );
        }
    }

    site.launch();
    let bob = site.client("bob");
    for (id, key) in &issued {
        let got = bob
            .dec_keys("alice", &[id.as_str()])
            .await
            .expect("key after restart");
        assert_eq!(&got.keys[0].key, key);
    }
    for (id, _) in &issued {
        match bob.dec_keys("alice", &[id.as_str()]).await {
            Err(ClientError::Api { status, .. }) => assert_eq!(status, StatusCode::BAD_REQUEST),
            other => panic!("key {id} delivered twice: {other:?}"),
        }
    }

    // A delivery that was answered is not undone by a crash either.
    let alice = site.client("alice");
    let keys = alice
        .enc_keys("bob", &KeyRequestBody::default())
        .await
        .expect("enc_keys");
    let id = keys.keys[0].key_ID.clone();
    bob.dec_keys("alice", &[id.as_str()])
        .await
        .expect("dec_keys");
    site.kill9();
    site.launch();
    match site.client("bob").dec_keys("alice", &[id.as_str()]).await {
        Err(ClientError::Api { status, .. }) => assert_eq!(status, StatusCode::BAD_REQUEST),
        other => panic!("delivered key came back after a crash: {other:?}"),
    }
}
