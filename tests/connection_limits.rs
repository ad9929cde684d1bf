//! Bounded resources on the ETSI listener, end to end against the real `dqkd kme` process:
//! a flood of idle and half-open connections must not keep an SAE from its keys
//! (regression test for "Connection floods starve SAEs").

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Site, LIMITS};
use dqkd_pki::rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The connection cap of the listener under attack.
const CAP: usize = 64;
/// Descriptors the KME process may open: room for `CAP` connections and its own files,
/// but not for the `2 * CAP` idle connections of the attack, let alone all `4 * CAP`.
const DESCRIPTORS: u32 = 128;
/// Bounds each step of the test, so that a starved server fails it quickly.
const STEP: Duration = Duration::from_secs(3);
/// The HTTP/1 request-head timeout of the listener.
const HEADER_TIMEOUT: Duration = Duration::from_millis(2000);

fn api_addr(site: &Site) -> SocketAddr {
    site.url
        .trim_start_matches("https://")
        .parse()
        .expect("api address")
}

/// A connection that completes its TLS handshake as `sae` and then sends half a request
/// head; `None` if the server closed it before that (it was evicted at once).
async fn half_header(addr: SocketAddr, tls: &TlsConnector) -> Option<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    let server = ServerName::IpAddress(addr.ip().into());
    let mut stream = tls.connect(server, tcp).await.ok()?;
    stream
        .write_all(b"GET /api/v1/keys/bob/status HTTP/1.1\r\nHost: kme\r\nX-Slow: ")
        .await
        .ok()?;
    stream.flush().await.ok()?;
    Some(stream)
}

/// Waits up to `limit` for the server to close `stream`; returns how long that took.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {} // e.g. an error response: keep reading until closed
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_flood_does_not_starve_saes() {
    let site = Site::start_configured(
        LIMITS,
        &format!(
            "[connections]\nmax_connections = {CAP}\nheader_timeout_ms = {}\n",
            HEADER_TIMEOUT.as_millis()
        ),
        Some(DESCRIPTORS),
    );
    let addr = api_addr(&site);
    let mut tls =
        dqkd_pki::client_config_from_combined(&site.ca(), &site.path("pki/sae/carol.combined.pem"))
            .expect("client TLS config");
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = TlsConnector::from(Arc::new(tls));

    // 2 × CAP connections that never start TLS, then 2 × CAP that finish the handshake
    // and stall in the middle of a request head; all held open by this side.
    let mut idle = Vec::new();
    for _ in 0..2 * CAP {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    let mut slow = Vec::new();
    for _ in 0..2 * CAP {
        match tokio::time::timeout(STEP, half_header(addr, &connector)).await {
            Ok(Some(stream)) => slow.push(stream),
            // The server no longer accepts: the SAE below will show it.
            _ => break,
        }
    }
    let last_slow_sent = Instant::now();

    // An SAE now gets its status and a key, each within a second, over a new connection.
    let alice = site.client("alice");
    let start = Instant::now();
    let status = tokio::time::timeout(STEP, alice.status("bob"))
        .await
        .expect("status answered during the flood")
        .expect("status during the flood");
    let status_took = start.elapsed();
    assert_eq!(status.slave_SAE_ID, "bob");
    let start = Instant::now();
    let keys = tokio::time::timeout(STEP, alice.enc_keys_get("bob", Some(1), None))
        .await
        .expect("enc_keys answered during the flood")
        .expect("a key during the flood");
    let key_took = start.elapsed();
    assert_eq!(keys.keys.len(), 1);
    assert!(
        status_took < Duration::from_secs(1) && key_took < Duration::from_secs(1),
        "status took {status_took:?}, enc_keys {key_took:?}"
    );
    assert_eq!(
        slow.len(),
        2 * CAP,
        "every attacking connection got through its handshake: the listener kept accepting"
    );

    // The connections that never started TLS were evicted to make room.
    for (i, stream) in idle.iter_mut().enumerate() {
        assert!(
            closed_within(stream, Duration::from_millis(500))
                .await
                .is_some(),
            "idle connection {i} is still open"
        );
    }
    // The newest half-header connection was not evicted: the header timeout closes it,
    // and not long before.
    let mut newest = slow.pop().expect("newest half-header connection");
    closed_within(&mut newest, HEADER_TIMEOUT + Duration::from_secs(3))
        .await
        .expect("a half-header connection is closed after the header timeout");
    let open_for = last_slow_sent.elapsed();
    assert!(
        open_for >= HEADER_TIMEOUT / 2,
        "closed after {open_for:?}: sooner than the header timeout"
    );
    // And so is every other one, by eviction or by the timeout.
    for (i, stream) in slow.iter_mut().enumerate() {
        assert!(
            closed_within(stream, HEADER_TIMEOUT + Duration::from_secs(1))
                .await
                .is_some(),
            "half-header connection {i} is still open"
        );
    }
    let log = site.log();
    assert!(
        log.contains("connection limit reached"),
        "the eviction is logged: {log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_sent_too_slowly_is_answered_408_and_frees_the_connection() {
    // An SAE that announces a body and trickles it keeps its connection "busy" (out of reach
    // of eviction) only until the request timeout.
    let site = Site::start_configured(LIMITS, "[connections]\nrequest_timeout_ms = 1000\n", None);
    let addr = api_addr(&site);
    let mut tls =
        dqkd_pki::client_config_from_combined(&site.ca(), &site.path("pki/sae/carol.combined.pem"))
            .expect("client TLS config");
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = TlsConnector::from(Arc::new(tls));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut stream = tls
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .expect("TLS");
    let start = Instant::now();
    stream
        .write_all(
            b"POST /api/v1/keys/bob/enc_keys HTTP/1.1\r\nhost: kme\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"num",
        )
        .await
        .expect("write");
    stream.flush().await.expect("flush");
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut answer))
        .await
        .expect("answered and closed before the step bound")
        .ok();
    let took = start.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{answer:?}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "answered after {took:?}"
    );
}
