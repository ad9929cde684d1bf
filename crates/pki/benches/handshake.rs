//! The CPU cost of one new mutual-TLS connection: a full handshake in memory (both sides,
//! certificate checks included) with the post-quantum hybrid group, and with X25519 alone
//! as a client without ML-KEM gets it from a prefer-hybrid listener.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use dqkd_pki::rustls::{self, ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use dqkd_pki::{
    client_verifier, init_ca, load_ca, load_certs, load_private_key, pinned_client_config,
    provider, server_config_with_verifier, Identity, IssueOptions, KeyExchange,
    PinnedServerVerifier, Role,
};
use rustls_pki_types::ServerName;

fn transfer<A, B>(
    from: &mut rustls::ConnectionCommon<A>,
    to: &mut rustls::ConnectionCommon<B>,
) -> bool {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).expect("write_tls");
    }
    if buf.is_empty() {
        return false;
    }
    let mut data = &buf[..];
    while !data.is_empty() {
        to.read_tls(&mut data).expect("read_tls");
    }
    to.process_new_packets().expect("handshake");
    true
}

fn handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) {
    let name = ServerName::try_from("localhost").expect("name");
    let mut c = ClientConnection::new(client.clone(), name).expect("client");
    let mut s = ServerConnection::new(server.clone()).expect("server");
    while transfer(&mut c, &mut s) | transfer(&mut s, &mut c) {}
    assert!(!c.is_handshaking() && !s.is_handshaking());
    black_box((c, s));
}

fn handshakes(cr: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    init_ca("bench", &dir.path().join("ca"), false).expect("CA");
    let ca = load_ca(&dir.path().join("ca")).expect("CA");
    let options = IssueOptions {
        out_dir: dir.path().join("certs"),
        ..IssueOptions::default()
    };
    let kme = ca.issue(Role::Kme, "KME_A", &options).expect("KME");
    let peer = ca.issue(Role::Kme, "KME_B", &options).expect("peer");
    let roots = load_certs(&ca.paths().cert).expect("CA");
    let server = |key_exchange| {
        Arc::new(
            server_config_with_verifier(
                client_verifier(&roots, Vec::new()).expect("verifier"),
                load_certs(&kme.cert_chain).expect("chain"),
                load_private_key(&kme.key).expect("key"),
                key_exchange,
            )
            .expect("server"),
        )
    };
    let hybrid_client = Arc::new(
        pinned_client_config(
            PinnedServerVerifier::new(
                &roots,
                Vec::new(),
                Identity::new("bench", Role::Kme, "KME_A").expect("ID"),
            )
            .expect("verifier"),
            KeyExchange::HybridOnly,
            load_certs(&peer.cert_chain).expect("chain"),
            load_private_key(&peer.key).expect("key"),
        )
        .expect("client"),
    );
    let classical_client = Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::CryptoProvider {
            kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
            ..(*provider(KeyExchange::PreferHybrid)).clone()
        }))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_root_certificates(dqkd_pki::root_store(&roots).expect("roots"))
        .with_client_auth_cert(
            load_certs(&peer.cert_chain).expect("chain"),
            load_private_key(&peer.key).expect("key"),
        )
        .expect("client"),
    );

    let mut group = cr.benchmark_group("mutual_tls_handshake");
    let hybrid_server = server(KeyExchange::HybridOnly);
    group.bench_function("X25519MLKEM768", |b| {
        b.iter(|| handshake(&hybrid_server, &hybrid_client))
    });
    let prefer_server = server(KeyExchange::PreferHybrid);
    group.bench_function("X25519", |b| {
        b.iter(|| handshake(&prefer_server, &classical_client))
    });
    group.finish();
}

criterion_group!(benches, handshakes);
criterion_main!(benches);
