//! The links between dqkd processes: post-quantum hybrid key exchange, and clients that
//! accept exactly one server identity. In-memory rustls handshakes.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::sync::Arc;

use dqkd_pki::rustls::{self, ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use dqkd_pki::{
    client_verifier, load_certs, load_private_key, negotiated_group, pinned_client_config,
    provider, server_config_with_verifier, Identity, IdentityMismatch, IssueOptions, IssuedPaths,
    KeyExchange, PinnedServerVerifier, Revocation, Role,
};
use rustls_pki_types::ServerName;

/// Runs a handshake between `client` and `server` in memory and, when it succeeds, one
/// byte each way; returns the group both sides agreed on.
fn handshake(server: ServerConfig, client: ClientConfig) -> Result<String, rustls::Error> {
    let mut c = ClientConnection::new(Arc::new(client), ServerName::try_from("localhost").unwrap())
        .unwrap();
    let mut s = ServerConnection::new(Arc::new(server)).unwrap();
    loop {
        let c2s = transfer(&mut c, &mut s)?;
        let s2c = transfer(&mut s, &mut c)?;
        if !c2s && !s2c {
            break;
        }
    }
    assert!(!c.is_handshaking() && !s.is_handshaking());
    c.writer().write_all(b"k").unwrap();
    transfer(&mut c, &mut s)?;
    let mut byte = [0u8; 1];
    s.reader().read_exact(&mut byte).unwrap();
    assert_eq!(&byte, b"k");
    let (client_group, server_group) = (negotiated_group(&c), negotiated_group(&s));
    assert_eq!(client_group, server_group);
    Ok(client_group.unwrap())
}

fn transfer<A, B>(
    from: &mut rustls::ConnectionCommon<A>,
    to: &mut rustls::ConnectionCommon<B>,
) -> Result<bool, rustls::Error> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    if buf.is_empty() {
        return Ok(false);
    }
    let mut data = &buf[..];
    while !data.is_empty() {
        to.read_tls(&mut data).unwrap();
    }
    to.process_new_packets()?;
    Ok(true)
}

fn server(c: &common::Cluster, who: &IssuedPaths, key_exchange: KeyExchange) -> ServerConfig {
    let verifier = client_verifier(&load_certs(&c.ca_pem()).unwrap(), Vec::new()).unwrap();
    server_config_with_verifier(
        verifier,
        load_certs(&who.cert_chain).unwrap(),
        load_private_key(&who.key).unwrap(),
        key_exchange,
    )
    .unwrap()
}

/// A client presenting `who` that accepts only `expected`.
fn pinned(
    c: &common::Cluster,
    who: &IssuedPaths,
    expected: Identity,
    key_exchange: KeyExchange,
) -> ClientConfig {
    let verifier =
        PinnedServerVerifier::new(&load_certs(&c.ca_pem()).unwrap(), Vec::new(), expected).unwrap();
    pinned_client_config(
        verifier,
        key_exchange,
        load_certs(&who.cert_chain).unwrap(),
        load_private_key(&who.key).unwrap(),
    )
    .unwrap()
}

/// A client without ML-KEM (X25519, P-256 and P-384 only), as OpenSSL 3.0 and most ETSI
/// 014 clients are today.
fn classical_client(c: &common::Cluster, who: &IssuedPaths) -> ClientConfig {
    let classical = rustls::crypto::CryptoProvider {
        kx_groups: vec![
            rustls::crypto::aws_lc_rs::kx_group::X25519,
            rustls::crypto::aws_lc_rs::kx_group::SECP256R1,
            rustls::crypto::aws_lc_rs::kx_group::SECP384R1,
        ],
        ..(*provider(KeyExchange::PreferHybrid)).clone()
    };
    ClientConfig::builder_with_provider(Arc::new(classical))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(dqkd_pki::root_store(&load_certs(&c.ca_pem()).unwrap()).unwrap())
        .with_client_auth_cert(
            load_certs(&who.cert_chain).unwrap(),
            load_private_key(&who.key).unwrap(),
        )
        .unwrap()
}

fn kme(cluster: &str, id: &str) -> Identity {
    Identity::new(cluster, Role::Kme, id).unwrap()
}

fn mismatch(result: &Result<String, rustls::Error>) -> Option<IdentityMismatch> {
    match result {
        Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) => {
            other.0.downcast_ref::<IdentityMismatch>().cloned()
        }
        _ => None,
    }
}

#[test]
fn links_between_dqkd_processes_negotiate_the_hybrid_group() {
    let c = common::cluster("lab");
    for server_side in [KeyExchange::HybridOnly, KeyExchange::PreferHybrid] {
        for client_side in [KeyExchange::HybridOnly, KeyExchange::PreferHybrid] {
            let group = handshake(
                server(&c, &c.kme, server_side),
                pinned(&c, &c.entropy, kme("lab", "kme-a"), client_side),
            )
            .unwrap();
            assert_eq!(
                group, "X25519MLKEM768",
                "{server_side} server, {client_side} client"
            );
        }
    }
}

#[test]
fn a_hybrid_only_listener_refuses_a_classical_client() {
    let c = common::cluster("lab");
    let refused = handshake(
        server(&c, &c.kme, KeyExchange::HybridOnly),
        classical_client(&c, &c.entropy),
    );
    assert!(
        refused.is_err(),
        "a client without ML-KEM got in: {refused:?}"
    );
}

#[test]
fn a_prefer_hybrid_listener_still_serves_a_classical_client() {
    let c = common::cluster("lab");
    let group = handshake(
        server(&c, &c.kme, KeyExchange::PreferHybrid),
        classical_client(&c, &c.sae),
    )
    .unwrap();
    assert_eq!(group, "X25519");
}

#[test]
fn a_hybrid_only_client_refuses_a_classical_server() {
    // A server that cannot do ML-KEM (a man in the middle that downgrades) gets no
    // connection from a hybrid-only client.
    let c = common::cluster("lab");
    let verifier = client_verifier(&load_certs(&c.ca_pem()).unwrap(), Vec::new()).unwrap();
    let classical_server =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::CryptoProvider {
            kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
            ..(*provider(KeyExchange::PreferHybrid)).clone()
        }))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            load_certs(&c.kme.cert_chain).unwrap(),
            load_private_key(&c.kme.key).unwrap(),
        )
        .unwrap();
    let refused = handshake(
        classical_server,
        pinned(&c, &c.entropy, kme("lab", "kme-a"), KeyExchange::HybridOnly),
    );
    assert!(refused.is_err(), "{refused:?}");
}

#[test]
fn a_pinned_client_accepts_only_the_identity_it_expects() {
    let c = common::cluster("lab");
    // The right server.
    handshake(
        server(&c, &c.kme, KeyExchange::HybridOnly),
        pinned(&c, &c.entropy, kme("lab", "kme-a"), KeyExchange::HybridOnly),
    )
    .unwrap();
    // A valid cluster certificate of another role: an entropy server where a KME is expected.
    let wrong_role = handshake(
        server(&c, &c.entropy, KeyExchange::HybridOnly),
        pinned(&c, &c.kme, kme("lab", "kme-a"), KeyExchange::HybridOnly),
    );
    let found = mismatch(&wrong_role).expect("refused as the wrong identity");
    assert_eq!(found.found, "dqkd://lab/entropy/ent.0");
    assert_eq!(found.expected, "dqkd://lab/kme/kme-a");
    // The right role with another ID.
    let wrong_id = handshake(
        server(&c, &c.kme, KeyExchange::HybridOnly),
        pinned(&c, &c.entropy, kme("lab", "kme-b"), KeyExchange::HybridOnly),
    );
    assert_eq!(
        mismatch(&wrong_id).expect("wrong ID").found,
        "dqkd://lab/kme/kme-a"
    );
    // An SAE certificate (no server role at all): refused before its identity is read.
    let sae = handshake(
        server(&c, &c.sae, KeyExchange::HybridOnly),
        pinned(&c, &c.kme, kme("lab", "kme-a"), KeyExchange::HybridOnly),
    );
    assert!(sae.is_err(), "{sae:?}");
}

#[test]
fn the_right_id_from_another_cluster_is_refused_even_when_its_ca_is_trusted() {
    // An operator whose trust file holds two clusters' CAs: staging's KME "kme-a" chains to
    // a trusted CA and carries the right role and ID, but not the right cluster.
    let prod = common::cluster("prod");
    let staging = common::cluster("staging");
    let both = prod.dir.path().join("both-cas.pem");
    let mut pem = std::fs::read(prod.ca_pem()).unwrap();
    pem.extend(std::fs::read(staging.ca_pem()).unwrap());
    std::fs::write(&both, pem).unwrap();
    let trusted = load_certs(&both).unwrap();
    let verifier = PinnedServerVerifier::new(&trusted, Vec::new(), kme("prod", "kme-a")).unwrap();
    let client = pinned_client_config(
        verifier,
        KeyExchange::HybridOnly,
        load_certs(&prod.entropy.cert_chain).unwrap(),
        load_private_key(&prod.entropy.key).unwrap(),
    )
    .unwrap();
    let server_verifier = client_verifier(&trusted, Vec::new()).unwrap();
    let staging_kme = server_config_with_verifier(
        server_verifier,
        load_certs(&staging.kme.cert_chain).unwrap(),
        load_private_key(&staging.kme.key).unwrap(),
        KeyExchange::HybridOnly,
    )
    .unwrap();
    let refused = handshake(staging_kme, client);
    assert_eq!(
        mismatch(&refused)
            .expect("refused as the wrong identity")
            .found,
        "dqkd://staging/kme/kme-a"
    );
}

#[test]
fn a_pinned_client_follows_a_new_revocation_list() {
    let c = common::cluster("lab");
    let ca = load_certs(&c.ca_pem()).unwrap();
    let verifier = PinnedServerVerifier::new(&ca, Vec::new(), kme("lab", "kme-a")).unwrap();
    let client = || {
        pinned_client_config(
            verifier.clone(),
            KeyExchange::HybridOnly,
            load_certs(&c.entropy.cert_chain).unwrap(),
            load_private_key(&c.entropy.key).unwrap(),
        )
        .unwrap()
    };
    handshake(server(&c, &c.kme, KeyExchange::HybridOnly), client()).unwrap();

    assert!(matches!(
        c.ca.revoke(&c.kme.cert_chain).unwrap(),
        Revocation::Added { .. }
    ));
    let crls = dqkd_pki::load_crls(&c.ca.crl_path()).unwrap();
    verifier.set_crls(crls).unwrap();
    let refused = handshake(server(&c, &c.kme, KeyExchange::HybridOnly), client());
    assert!(
        matches!(
            refused,
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked
            ))
        ),
        "{refused:?}"
    );
    // Reissued under the same identity, the server is accepted again.
    let reissued =
        c.ca.issue(
            Role::Kme,
            "kme-a",
            &IssueOptions {
                out_dir: c.dir.path().join("reissued"),
                ..IssueOptions::default()
            },
        )
        .unwrap();
    handshake(server(&c, &reissued, KeyExchange::HybridOnly), client()).unwrap();
}

#[test]
fn a_file_with_two_revocation_lists_is_refused() {
    // An old list placed before the current one would be the one certificates are checked
    // against, while its higher-numbered neighbour passed the rollback guard.
    let c = common::cluster("lab");
    let old = std::fs::read(c.ca.write_crl().unwrap()).unwrap();
    c.ca.revoke(&c.sae.cert_chain).unwrap();
    let mut both = old;
    both.extend(std::fs::read(c.ca.crl_path()).unwrap());
    let path = c.dir.path().join("two.crl.pem");
    std::fs::write(&path, both).unwrap();
    let err = dqkd_pki::load_crls(&path).unwrap_err();
    assert!(
        err.to_string().contains("holds 2 revocation lists"),
        "{err}"
    );
}
