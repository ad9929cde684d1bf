//! Peer messages name SAEs, KMEs and replicas. Names travel as plain strings, so a site of an
//! older version is understood; a name no site could have been given is refused with a 400
//! that names the field, before the message is acted on.

use axum::http::StatusCode;
use serde_json::json;

use crate::harness::Cluster;

const REQUEST_ID: &str = "4b3c0f3e-8a51-4c36-9a53-0d2f8f1a2b3c";

#[tokio::test(start_paused = true)]
async fn an_old_format_message_is_served() {
    let cluster = Cluster::new().await;
    let body =
        format!(r#"{{"request_id":"{REQUEST_ID}","key_ids":[],"ready":[3],"replica":"a1"}}"#);
    let answer = cluster.peer_post("B", "A", "/peer/v1/destroy", &body).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.body["destroyed"], 0);
}

#[tokio::test(start_paused = true)]
async fn a_message_with_an_invalid_name_is_refused_naming_the_field() {
    let cluster = Cluster::new().await;
    let grants =
        |master: &str, slave: &str| json!([{ "master": master, "slaves": [slave], "key_ids": [] }]);
    let long = "r".repeat(65);
    let cases = [
        (
            "deliver",
            json!({ "request_id": REQUEST_ID, "metadata": "AAEC", "grants": grants("..", "bob") }),
            "grants[0].master",
        ),
        (
            "deliver",
            json!({ "request_id": REQUEST_ID, "metadata": "AAEC", "grants": grants("alice", "a/b") }),
            "grants[0].slaves[0]",
        ),
        (
            "fill",
            json!({ "request_id": REQUEST_ID, "metadata": "AAEC", "expires_at": 7, "first_seq": 0, "replica": "" }),
            "replica",
        ),
        (
            "bind",
            json!({ "request_id": REQUEST_ID, "grants": grants("alice", "bob"), "positions": [0], "replica": long }),
            "replica",
        ),
        (
            "destroy",
            json!({ "request_id": REQUEST_ID, "key_ids": [], "ready": [1], "replica": "a1>B" }),
            "replica",
        ),
    ];
    for (call, body, field) in cases {
        let path = format!("/peer/v1/{call}");
        let answer = cluster.peer_post("B", "A", &path, &body.to_string()).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{call} {body}");
        let message = answer.message();
        assert!(
            message.starts_with(&format!("invalid {call} message: {field}: invalid name")),
            "{call} {body}: {message}"
        );
    }
}
