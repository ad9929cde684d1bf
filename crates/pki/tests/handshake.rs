//! In-memory rustls handshakes with the configurations this crate builds.

// Test helpers are plain functions, not #[test]s: an unwrap here is an assertion.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::sync::Arc;

use dqkd_pki::rustls::{self, ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use dqkd_pki::{
    client_config, client_config_from_combined, client_config_with_crl, load_certs,
    load_private_key, peer_identity, provider, root_store, server_config, server_config_with_crl,
    IssueOptions, Revocation, Role,
};
use rustls_pki_types::ServerName;

/// Shuttles TLS records between the two sides until neither has anything to send.
///
/// Returns the first error either side reports while processing records.
fn handshake(
    client: &mut ClientConnection,
    server: &mut ServerConnection,
) -> Result<(), rustls::Error> {
    loop {
        let c2s = transfer(client, server)?;
        let s2c = transfer(server, client)?;
        if !c2s && !s2c {
            return Ok(());
        }
    }
}

/// Moves everything `from` wants to send into `to`; true if anything moved.
fn transfer<A, B>(
    from: &mut rustls::ConnectionCommon<A>,
    to: &mut rustls::ConnectionCommon<B>,
) -> Result<bool, rustls::Error> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).expect("write_tls to a Vec");
    }
    if buf.is_empty() {
        return Ok(false);
    }
    let mut data = &buf[..];
    while !data.is_empty() {
        to.read_tls(&mut data).expect("read_tls");
    }
    to.process_new_packets()?;
    Ok(true)
}

fn connect(
    server: ServerConfig,
    client: ClientConfig,
) -> (
    ClientConnection,
    ServerConnection,
    Result<(), rustls::Error>,
) {
    let mut c = ClientConnection::new(
        Arc::new(client),
        ServerName::try_from("localhost").expect("server name"),
    )
    .expect("client connection");
    let mut s = ServerConnection::new(Arc::new(server)).expect("server connection");
    let result = handshake(&mut c, &mut s);
    (c, s, result)
}

#[test]
fn sae_from_our_ca_is_accepted_and_identified() {
    let c = common::cluster("lab");
    let server = server_config(&c.ca_pem(), &c.kme.cert_chain, &c.kme.key).unwrap();
    let client = client_config(&c.ca_pem(), &c.sae.cert_chain, &c.sae.key).unwrap();
    let (mut client, mut server, result) = connect(server, client);
    result.expect("handshake succeeds");
    assert!(!server.is_handshaking() && !client.is_handshaking());
    assert_eq!(server.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        server.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );

    let sae = peer_identity(&server, "lab").unwrap();
    assert_eq!((sae.role(), sae.id().as_str()), (Role::Sae, "sae-1"));
    let kme = peer_identity(&client, "lab").unwrap();
    assert_eq!((kme.role(), kme.id().as_str()), (Role::Kme, "kme-a"));

    // Application data flows.
    client
        .writer()
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .unwrap();
    handshake(&mut client, &mut server).unwrap();
    let mut got = [0u8; 18];
    server.reader().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"GET / HTTP/1.1\r\n\r\n");
}

#[test]
fn combined_pem_client_and_peer_kme_and_entropy() {
    let c = common::cluster("lab");
    // SAE via the combined file.
    let server = server_config(&c.ca_pem(), &c.kme.cert_chain, &c.kme.key).unwrap();
    let client = client_config_from_combined(&c.ca_pem(), &c.sae.combined).unwrap();
    let (_, s, result) = connect(server, client);
    result.unwrap();
    assert_eq!(peer_identity(&s, "lab").unwrap(), c.sae.identity);

    // A KME as client of an entropy server.
    let server = server_config(&c.ca_pem(), &c.entropy.cert_chain, &c.entropy.key).unwrap();
    let client = client_config(&c.ca_pem(), &c.kme.cert_chain, &c.kme.key).unwrap();
    let (cl, s, result) = connect(server, client);
    result.unwrap();
    assert_eq!(peer_identity(&s, "lab").unwrap(), c.kme.identity);
    assert_eq!(peer_identity(&cl, "lab").unwrap(), c.entropy.identity);
}

#[test]
fn tls12_client_with_certificate_is_accepted() {
    let c = common::cluster("lab");
    let server = server_config(&c.ca_pem(), &c.kme.cert_chain, &c.kme.key).unwrap();
    let client = ClientConfig::builder_with_provider(provider(dqkd_pki::KeyExchange::PreferHybrid))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(root_store(&load_certs(&c.ca_pem()).unwrap()).unwrap())
        .with_client_auth_cert(
            load_certs(&c.sae.cert_chain).unwrap(),
            load_private_key(&c.sae.key).unwrap(),
        )
        .unwrap();
    let (_, s, result) = connect(server, client);
    result.unwrap();
    assert_eq!(s.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    assert_eq!(peer_identity(&s, "lab").unwrap().id(), "sae-1");
}

/// A rejection because the chain does not lead to our CA.
///
/// With a rogue CA of the *same* name webpki finds a name match and fails on
/// the signature; with a differently named one it finds no issuer at all.
fn is_untrusted(result: &Result<(), rustls::Error>) -> bool {
    matches!(
        result,
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature
        ))
    )
}

#[test]
fn client_certificate_from_another_ca_is_rejected() {
    let ours = common::cluster("lab");
    // "lab": same CA name and same IDs, only the CA key differs. "evil": another cluster.
    for rogue in [common::cluster("lab"), common::cluster("evil")] {
        let server = server_config(&ours.ca_pem(), &ours.kme.cert_chain, &ours.kme.key).unwrap();
        // The rogue client trusts our CA (so it accepts the server) but its cert is from its own CA.
        let client = client_config(&ours.ca_pem(), &rogue.sae.cert_chain, &rogue.sae.key).unwrap();
        let (_, s, result) = connect(server, client);
        assert!(is_untrusted(&result), "{result:?}");
        assert!(s.is_handshaking(), "server must not complete the handshake");
        assert!(peer_identity(&s, "lab").is_err());
    }
}

#[test]
fn server_from_another_ca_is_rejected_by_client() {
    let ours = common::cluster("lab");
    for rogue in [common::cluster("lab"), common::cluster("evil")] {
        let server = server_config(&rogue.ca_pem(), &rogue.kme.cert_chain, &rogue.kme.key).unwrap();
        let client = client_config(&ours.ca_pem(), &ours.sae.cert_chain, &ours.sae.key).unwrap();
        let (_, _, result) = connect(server, client);
        assert!(is_untrusted(&result), "{result:?}");
    }
}

#[test]
fn missing_client_certificate_is_rejected() {
    let c = common::cluster("lab");
    let server = server_config(&c.ca_pem(), &c.kme.cert_chain, &c.kme.key).unwrap();
    let client = ClientConfig::builder_with_provider(provider(dqkd_pki::KeyExchange::PreferHybrid))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(root_store(&load_certs(&c.ca_pem()).unwrap()).unwrap())
        .with_no_client_auth();
    let (_, s, result) = connect(server, client);
    assert!(
        matches!(result, Err(rustls::Error::NoCertificatesPresented)),
        "{result:?}"
    );
    assert!(peer_identity(&s, "lab").is_err());
}

#[test]
fn config_errors_name_the_file() {
    let c = common::cluster("lab");
    let missing = c.dir.path().join("nope.pem");
    let err = server_config(&missing, &c.kme.cert_chain, &c.kme.key).unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");
    // A certificate file given where the key is expected.
    let err = client_config(&c.ca_pem(), &c.sae.cert_chain, &c.sae.cert_chain).unwrap_err();
    assert!(
        err.to_string().contains("sae-1.pem") && err.to_string().contains("private key"),
        "{err}"
    );
    // Mismatched key and certificate.
    let err = client_config(&c.ca_pem(), &c.sae.cert_chain, &c.kme.key).unwrap_err();
    assert!(err.to_string().contains("kme-a.key"), "{err}");
}

#[test]
fn revoked_certificates_are_refused_both_ways() {
    let c = common::cluster("lab");
    let opts = IssueOptions {
        out_dir: c.dir.path().join("certs"),
        ..IssueOptions::default()
    };
    let other = c.ca.issue(Role::Sae, "sae-2", &opts).unwrap();
    // A CA that revoked nothing yet writes an empty list, which every certificate passes.
    let crl = c.ca.write_crl().unwrap();
    let with_crl = |client: &dqkd_pki::IssuedPaths| {
        let server =
            server_config_with_crl(&c.ca_pem(), &c.kme.cert_chain, &c.kme.key, Some(&crl)).unwrap();
        let client = client_config(&c.ca_pem(), &client.cert_chain, &client.key).unwrap();
        connect(server, client).2
    };
    with_crl(&c.sae).expect("nothing revoked yet");

    let revoked = c.ca.revoke(&c.sae.cert_chain).unwrap();
    assert!(
        matches!(revoked, Revocation::Added { listed: 1, .. }),
        "{revoked:?}"
    );
    let again = c.ca.revoke(&c.sae.cert_chain).unwrap();
    assert!(
        matches!(again, Revocation::AlreadyRevoked { .. }),
        "{again:?}"
    );
    let result = with_crl(&c.sae);
    assert!(is_revoked(&result), "{result:?}");
    with_crl(&other).expect("another SAE still gets in");

    // A second revocation keeps the first.
    assert!(matches!(
        c.ca.revoke(&other.cert_chain).unwrap(),
        Revocation::Added { listed: 2, .. }
    ));
    assert!(with_crl(&c.sae).is_err() && with_crl(&other).is_err());
    with_crl(&c.entropy).expect("not revoked");

    // A client that checks the CRL refuses a revoked server.
    c.ca.revoke(&c.kme.cert_chain).unwrap();
    let server = server_config(&c.ca_pem(), &c.kme.cert_chain, &c.kme.key).unwrap();
    let client = client_config_with_crl(
        &c.ca_pem(),
        &c.entropy.cert_chain,
        &c.entropy.key,
        Some(&crl),
    )
    .unwrap();
    let result = connect(server, client).2;
    assert!(is_revoked(&result), "{result:?}");
}

#[test]
fn only_certificates_of_this_ca_are_revoked() {
    let ours = common::cluster("lab");
    let rogue = common::cluster("lab");
    let err = ours.ca.revoke(&rogue.sae.cert_chain).unwrap_err();
    assert!(
        err.to_string().contains("was not issued by the CA"),
        "{err}"
    );
    let err = ours.ca.revoke(&ours.ca_pem()).unwrap_err();
    assert!(
        err.to_string().contains("was not issued by the CA"),
        "{err}"
    );
    // A list from another CA covers none of our certificates: callers are refused (this
    // rogue CA even has our CA's name, so its list is found and fails its signature).
    let theirs = rogue.ca.write_crl().unwrap();
    let result = sae_through(&ours, &theirs);
    assert!(
        matches!(
            result,
            Err(rustls::Error::InvalidCertRevocationList(
                rustls::CertRevocationListError::BadSignature
            ))
        ),
        "{result:?}"
    );
    let evil = common::cluster("evil");
    let result = sae_through(&ours, &evil.ca.write_crl().unwrap());
    assert!(
        matches!(
            result,
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownRevocationStatus
            ))
        ),
        "{result:?}"
    );
    // Nothing was recorded: our own SAE is the first revocation.
    assert!(matches!(
        ours.ca.revoke(&ours.sae.cert_chain).unwrap(),
        Revocation::Added { listed: 1, .. }
    ));
}

#[test]
fn the_ledger_survives_failures_and_the_crl_number_only_grows() {
    let c = common::cluster("lab");
    let number = || dqkd_pki::crl_number(&dqkd_pki::load_crls(&c.ca.crl_path()).unwrap());
    c.ca.write_crl().unwrap();
    assert_eq!(number(), Some(1));
    c.ca.revoke(&c.sae.cert_chain).unwrap();
    assert_eq!(number(), Some(2));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(c.ca.crl_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o644,
            "servers running as other users read it"
        );
    }

    // The list was lost after the ledger was written: revoking again writes it again.
    std::fs::remove_file(c.ca.crl_path()).unwrap();
    assert!(matches!(
        c.ca.revoke(&c.sae.cert_chain).unwrap(),
        Revocation::AlreadyRevoked { .. }
    ));
    assert_eq!(number(), Some(3));
    assert!(sae_through(&c, &c.ca.crl_path()).is_err(), "still revoked");

    // Another revocation in progress (its lock file) stops this one; nothing changes.
    let lock = c.ca.crl_path().with_file_name("revoked.lock");
    std::fs::write(&lock, "").unwrap();
    let err = c.ca.revoke(&c.kme.cert_chain).unwrap_err();
    assert!(err.to_string().contains("another revocation"), "{err}");
    assert_eq!(number(), Some(3));
    std::fs::remove_file(&lock).unwrap();
    assert!(matches!(
        c.ca.revoke(&c.kme.cert_chain).unwrap(),
        Revocation::Added { listed: 2, .. }
    ));
    assert!(!lock.exists(), "the lock is released");
}

/// The handshake of `c`'s SAE with `c`'s KME when the KME checks callers against `crl`.
fn sae_through(c: &common::Cluster, crl: &std::path::Path) -> Result<(), rustls::Error> {
    let server =
        server_config_with_crl(&c.ca_pem(), &c.kme.cert_chain, &c.kme.key, Some(crl)).unwrap();
    let client = client_config(&c.ca_pem(), &c.sae.cert_chain, &c.sae.key).unwrap();
    connect(server, client).2
}

/// Whether a handshake failed because a certificate is revoked.
fn is_revoked(result: &Result<(), rustls::Error>) -> bool {
    matches!(
        result,
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Revoked
        ))
    )
}
