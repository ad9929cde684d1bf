//! The links between sites and to entropy servers, attacked as an outsider would.
//!
//! Impostors with valid cluster certificates, as an outsider who stole one would use them.
//! A KME accepts a peer or an entropy server only if its certificate carries the identity
//! the manifest names for that address. Each fake here holds a real certificate of the
//! cluster CA (of another role or another ID) and answers the protocol well enough that a
//! KME trusting it would hand out keys: fake entropy servers serve all-zero ranges, a fake
//! peer acknowledges deliveries it never stored. Every attempt must end in a 503 that names
//! the identity found, with no key handed out; the real links negotiate the post-quantum
//! hybrid group. A server whose certificate is revoked while a KME holds a kept-alive
//! connection to it is not called again.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::Path as UrlPath;
use axum::http::{HeaderMap, HeaderValue};
use axum::routing::{get, post};
use axum::Router;
use common::cluster::{status_of, Cluster};
use dqkd_client::KeyRequestBody;
use dqkd_net::{KeyExchange, TlsFiles};
use dqkd_pki::Role;
use http::StatusCode;
use tokio::sync::watch;

/// The manifest's address for `key` = `id` in the array of tables `table`.
fn manifest_addr(cluster: &Cluster, table: &str, key: &str, id: &str, field: &str) -> SocketAddr {
    let text = std::fs::read_to_string(cluster.dir.path().join("cluster.toml")).expect("manifest");
    let manifest: toml::Value = toml::from_str(&text).expect("manifest TOML");
    manifest[table]
        .as_array()
        .expect("table array")
        .iter()
        .find(|entry| entry[key].as_str() == Some(id))
        .and_then(|entry| entry[field].as_str())
        .expect("address in the manifest")
        .parse()
        .expect("socket address")
}

/// A fake server running in this process.
struct Impostor {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Impostor {
    /// Stops it and waits until its port is free again.
    async fn end(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Serves `app` at `addr` over mutual TLS with the cluster certificate of `role` `id`.
async fn impostor(
    cluster: &Cluster,
    role: Role,
    id: &str,
    addr: SocketAddr,
    app: Router,
) -> Impostor {
    let pki = cluster.dir.path().join("pki");
    let dir = match role {
        Role::Kme => "kme",
        Role::Entropy => "entropy",
        Role::Sae => "sae",
    };
    let files = TlsFiles::new(
        pki.join("ca.pem"),
        pki.join(format!("{dir}/{id}.pem")),
        pki.join(format!("{dir}/{id}.key")),
    );
    let mtls = dqkd_net::bind_mtls(
        &files,
        "test",
        role,
        id,
        addr,
        KeyExchange::PreferHybrid,
        "impostor",
    )
    .await
    .expect("impostor binds the real server's port");
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(dqkd_net::serve_mtls(
        mtls.listener,
        mtls.tls,
        app,
        Arc::from("test"),
        dqkd_net::ServerLimits::default(),
        stopped,
    ));
    Impostor { stop, task }
}

/// An entropy server that hands out all-zero ranges in the name of `server_id`.
fn zero_entropy(server_id: &'static str) -> Router {
    let headers = move |len: usize| {
        let mut headers = HeaderMap::new();
        let mut set = |name: &'static str, value: String| {
            headers.insert(name, HeaderValue::from_str(&value).expect("header"));
        };
        set("dqkd-server-id", server_id.to_owned());
        set("dqkd-pool-id", "0".repeat(32));
        set("dqkd-offset", "0".to_owned());
        set("dqkd-expires-at", "4102444800".to_owned());
        (headers, vec![0u8; len])
    };
    Router::new()
        .route(
            "/v1/allocate",
            post(move |body: Bytes| async move {
                let request: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
                headers(request["len"].as_u64().expect("len") as usize)
            }),
        )
        .route(
            "/v1/ranges/{pool}/{offset}/{len}",
            get(
                |UrlPath((_, _, len)): UrlPath<(String, u64, usize)>| async move { vec![0u8; len] },
            ),
        )
}

/// A peer that acknowledges every delivery without storing anything.
fn acknowledging_peer() -> Router {
    Router::new().route(
        "/peer/v1/deliver",
        post(|body: Bytes| async move {
            let request: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
            let stored: usize = request["grants"]
                .as_array()
                .expect("grants")
                .iter()
                .map(|g| g["key_ids"].as_array().map_or(0, Vec::len))
                .sum();
            axum::Json(serde_json::json!({
                "request_id": request["request_id"],
                "stored": stored,
            }))
        }),
    )
}

async fn enc_keys_for_bob(cluster: &Cluster, number: u32) -> (StatusCode, String) {
    status_of(
        cluster
            .client("alice")
            .enc_keys(
                "bob",
                &KeyRequestBody {
                    number: Some(number),
                    ..Default::default()
                },
            )
            .await,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn entropy_servers_with_a_kme_certificate_get_no_say_in_any_key() {
    let mut cluster = Cluster::start_with(&["KME_A", "KME_B"], 3, 2000);
    cluster.share_through("KME_A", 1).await;

    // Every entropy server is replaced by an impostor holding KME_B's certificate (a
    // wrong role), serving zeros under the real server's name.
    let mut fakes = Vec::new();
    for (index, id) in ["E1", "E2", "E3"].into_iter().enumerate() {
        let addr = manifest_addr(&cluster, "entropy", "id", id, "addr");
        cluster.entropy[index].kill9();
        fakes.push(impostor(&cluster, Role::Kme, "KME_B", addr, zero_entropy(id)).await);
    }
    let (status, message) = enc_keys_for_bob(&cluster, 3).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{message}");
    let log = cluster.sites["KME_A"].log_text();
    assert!(
        log.contains("dqkd://test/kme/KME_B") && log.contains("dqkd://test/entropy/E1"),
        "site A logs the identity found and the one expected: {log}"
    );
    for fake in fakes {
        fake.end().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_with_an_entropy_certificate_cannot_acknowledge_keys() {
    let mut cluster = Cluster::start_with(&["KME_A", "KME_B"], 3, 2000);
    cluster.share_through("KME_A", 1).await;

    // Site B's peer port now answers with entropy server E1's certificate (a valid cluster
    // certificate of another role) and acknowledges every delivery.
    let peer = manifest_addr(&cluster, "sites", "kme_id", "KME_B", "peer_addr");
    cluster.site("KME_B").kill9();
    let fake = impostor(&cluster, Role::Entropy, "E1", peer, acknowledging_peer()).await;
    let (status, message) = enc_keys_for_bob(&cluster, 3).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{message}");
    assert!(
        message.contains("KME_B") && message.contains("dqkd://test/entropy/E1"),
        "the 503 names the site and the identity found: {message}"
    );
    fake.end().await;

    // A KME certificate of the right role but another ID (site A's own) is refused too.
    let fake = impostor(&cluster, Role::Kme, "KME_A", peer, acknowledging_peer()).await;
    let (status, message) = enc_keys_for_bob(&cluster, 1).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{message}");
    assert!(message.contains("dqkd://test/kme/KME_A"), "{message}");
    fake.end().await;

    // The real site B is accepted again, over the hybrid group.
    cluster.site("KME_B").launch();
    cluster.share_through("KME_A", 2).await;
    let metrics = cluster.sites["KME_B"].metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("dqkd_tls_handshakes_total")
                && l.contains("listener=\"peer\"")
                && l.contains("group=\"X25519MLKEM768\"")),
        "site B's peer listener counts hybrid handshakes: {metrics}"
    );
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("dqkd_tls_handshakes_total")
                && l.contains("listener=\"peer\"")
                && !l.contains("group=\"X25519MLKEM768\"")),
        "and no other group: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_revoked_while_connected_is_not_called_again() {
    let cluster = Cluster::start_with(&["KME_A", "KME_B"], 3, 2000);
    // Site A now holds a kept-alive connection to B's peer API.
    cluster.share_through("KME_A", 1).await;

    let pki = cluster.dir.path().join("pki");
    common::dqkd(&[
        "pki",
        "revoke",
        common::path_str(&pki.join("kme/KME_B.pem")),
        "--ca",
        common::path_str(&pki),
    ]);
    // Within a few polls of the list, A refuses B at the handshake: no key for Bob's site.
    // (B's own calls to the entropy servers fail too, since they now refuse B; a 503 for
    // that reason is not what this test looks for.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut last = String::new();
    loop {
        let result = cluster
            .client("alice")
            .enc_keys("bob", &KeyRequestBody::default())
            .await;
        if let Err(e) = result {
            let (status, message) = status_of::<()>(Err(e));
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{message}");
            // A's own refusal, not B's: B answers "refused" when the entropy servers
            // refuse it, A reports B "unreachable" when its handshake with B fails.
            if message.contains("site \"KME_B\" is unreachable")
                && message.contains("invalid peer certificate: Revoked")
            {
                break;
            }
            last = message;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "site A does not refuse the revoked site B (last answer: {last:?}): {}",
            cluster.sites["KME_A"].log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(cluster.sites["KME_A"]
        .log_text()
        .contains("revocation list reloaded"));
}
