//! Malformed HTTP that hyper refuses before routing still gets an ETSI `Error` body, end to
//! end against the real `dqkd kme` over TLS: a client sending garbage learns what was wrong
//! in the same JSON shape as every other failure.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::Site;
use dqkd_pki::rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Sends `request` as an SAE over a fresh TLS connection and reads the whole answer (the
/// server closes the connection after it).
async fn raw(addr: SocketAddr, tls: &TlsConnector, request: &[u8]) -> String {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut stream = tls
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .expect("TLS");
    stream.write_all(request).await.expect("write");
    stream.flush().await.expect("flush");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_get_json_errors() {
    let site = Site::start();
    let addr: SocketAddr = site
        .url
        .trim_start_matches("https://")
        .parse()
        .expect("address");
    let mut config =
        dqkd_pki::client_config_from_combined(&site.ca(), &site.path("pki/sae/alice.combined.pem"))
            .expect("client TLS");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = TlsConnector::from(Arc::new(config));

    let many_headers: String = (0..1000).map(|i| format!("x-h{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "Content-Length that is not a number",
            b"POST /api/v1/keys/bob/enc_keys HTTP/1.1\r\nhost: kme\r\ncontent-length: abc\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "two different Content-Lengths",
            b"POST /api/v1/keys/bob/enc_keys HTTP/1.1\r\nhost: kme\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}".to_vec(),
            "400",
        ),
        (
            "a control byte in a header",
            b"GET /api/v1/keys/bob/status HTTP/1.1\r\nhost: kme\r\nx-a: b\x01c\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "HTTP/1.2",
            b"GET /api/v1/keys/bob/status HTTP/1.2\r\nhost: kme\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "1,000 headers",
            format!("GET /api/v1/keys/bob/status HTTP/1.1\r\nhost: kme\r\n{many_headers}\r\n")
                .into_bytes(),
            "431",
        ),
    ];
    for (what, request, status) in cases {
        let answer = raw(addr, &tls, &request).await;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        let head = head.to_ascii_lowercase();
        assert!(
            head.starts_with(&format!("http/1.1 {status} ")),
            "{what}: {answer:?}"
        );
        assert!(
            head.contains("\r\ncontent-type: application/json"),
            "{what}: {answer:?}"
        );
        let json: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {answer:?}"));
        assert!(json["message"].is_string(), "{what}: {answer:?}");
    }

    // A good request on a fresh connection is served as before.
    let answer = raw(
        addr,
        &tls,
        b"GET /api/v1/keys/bob/status HTTP/1.1\r\nhost: kme\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
}
