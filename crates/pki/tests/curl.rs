//! curl (OpenSSL 3) against a rustls server built by `server_config`, with the
//! client identity taken from the `.p12` file: the path an SAE operator follows.

// Test helpers are plain functions, not #[test]s: an unwrap here is an assertion.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use dqkd_pki::rustls::{ServerConnection, StreamOwned};
use dqkd_pki::{peer_identity, server_config};

/// Serves one HTTP/1.1 request on 127.0.0.1 and answers with the client's identity.
///
/// Returns the port and a handle yielding the identity URI or the error text.
fn serve_once(c: &common::Cluster) -> (u16, thread::JoinHandle<Result<String, String>>) {
    let config = Arc::new(server_config(&c.ca_pem(), &c.kme.cert_chain, &c.kme.key).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = thread::spawn(move || {
        let (tcp, _) = listener.accept().map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let conn = ServerConnection::new(config).map_err(|e| e.to_string())?;
        let mut tls = StreamOwned::new(conn, tcp);
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tls.read(&mut buf).map_err(|e| format!("tls: {e}"))?;
            if n == 0 {
                return Err("connection closed".to_owned());
            }
            request.extend_from_slice(&buf[..n]);
        }
        let identity = peer_identity(&tls.conn, "lab").map_err(|e| format!("identity: {e}"))?;
        let body = identity.uri();
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(response.as_bytes())
            .map_err(|e| e.to_string())?;
        tls.conn.send_close_notify();
        tls.flush().map_err(|e| e.to_string())?;
        Ok(body)
    });
    (port, handle)
}

fn curl(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("curl").args(args).output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "!!!!!!!! SKIPPING curl interoperability test: `curl` is not on PATH !!!!!!!!"
            );
            None
        }
        Err(e) => panic!("running curl: {e}"),
    }
}

fn curl_with_p12(password: &str) {
    let c = common::cluster_with_password("lab", password);
    let (port, server) = serve_once(&c);
    let url = format!("https://127.0.0.1:{port}/");
    let cert = format!("{}:{password}", c.sae.p12.display());
    let cert = if password.is_empty() {
        c.sae.p12.display().to_string()
    } else {
        cert
    };
    let ca = c.ca_pem().display().to_string();
    let Some(out) = curl(&[
        "-sS",
        "--http1.1",
        "--max-time",
        "10",
        "--cert",
        &cert,
        "--cert-type",
        "P12",
        "--cacert",
        &ca,
        &url,
    ]) else {
        // Unblock the server thread.
        drop(std::net::TcpStream::connect(("127.0.0.1", port)));
        return;
    };
    let served = server.join().unwrap();
    assert!(
        out.status.success(),
        "curl failed: {}\nserver: {served:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "dqkd://lab/sae/sae-1");
    assert_eq!(served.unwrap(), "dqkd://lab/sae/sae-1");
}

#[test]
fn curl_p12_empty_password() {
    curl_with_p12("");
}

#[test]
fn curl_p12_with_password() {
    curl_with_p12("secret");
}

#[test]
fn curl_without_client_certificate_is_refused() {
    let c = common::cluster("lab");
    let (port, server) = serve_once(&c);
    let url = format!("https://127.0.0.1:{port}/");
    let ca = c.ca_pem().display().to_string();
    let Some(out) = curl(&[
        "-sS",
        "--http1.1",
        "--max-time",
        "10",
        "--cacert",
        &ca,
        &url,
    ]) else {
        drop(std::net::TcpStream::connect(("127.0.0.1", port)));
        return;
    };
    assert!(
        !out.status.success(),
        "curl without a client certificate must fail"
    );
    let served = server.join().unwrap();
    assert!(
        // Refused by the handshake itself, not later for lack of an identity.
        served
            .as_ref()
            .is_err_and(|e| e.starts_with("tls: ") && e.contains("certificate")),
        "{served:?}"
    );
}
