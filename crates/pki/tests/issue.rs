//! CA creation, issuance, overwrite protection and identities of issued certificates.

// Test helpers are plain functions, not #[test]s: an unwrap here is an assertion.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::net::{IpAddr, Ipv4Addr};

use dqkd_pki::{
    init_ca, load_ca, load_certs, load_private_key, Identity, IssueOptions, PkiError, Role,
};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

fn leaf_der(path: &std::path::Path) -> Vec<u8> {
    load_certs(path).expect("load certs")[0].to_vec()
}

#[test]
fn init_ca_writes_a_dqkd_ca() {
    let dir = tempfile::tempdir().unwrap();
    let paths = init_ca("lab", dir.path(), false).unwrap();
    assert_eq!(paths.cert, dir.path().join("ca.pem"));
    assert_eq!(paths.key, dir.path().join("ca.key"));
    let key_pem = fs::read_to_string(&paths.key).unwrap();
    assert!(
        key_pem.starts_with("-----BEGIN PRIVATE KEY-----"),
        "PKCS#8 expected"
    );

    let der = leaf_der(&paths.cert);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert!(cert.is_ca());
    assert_eq!(
        cert.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        "dqkd lab cluster CA"
    );
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI("dqkd://lab/ca")]
    );
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    let validity = cert.validity().time_to_expiration().unwrap();
    assert!(
        validity.whole_days() >= 3649,
        "about 10 years, got {validity}"
    );
    assert_eq!(load_ca(dir.path()).unwrap().cluster(), "lab");
}

#[cfg(unix)]
#[test]
fn secret_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let c = common::cluster("lab");
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&c.ca.paths().key), 0o600);
    for issued in [&c.kme, &c.sae, &c.entropy] {
        assert_eq!(mode(&issued.key), 0o600);
        assert_eq!(mode(&issued.combined), 0o600);
        assert_eq!(mode(&issued.p12), 0o600);
        assert_eq!(mode(&issued.cert_chain), 0o644);
    }
}

#[test]
fn init_ca_refuses_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    init_ca("lab", dir.path(), false).unwrap();
    let before = fs::read(dir.path().join("ca.pem")).unwrap();
    match init_ca("lab", dir.path(), false) {
        Err(PkiError::AlreadyExists { path }) => {
            assert!(path.ends_with("ca.pem") || path.ends_with("ca.key"));
        }
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    let msg = init_ca("lab", dir.path(), false).unwrap_err().to_string();
    assert!(msg.contains("--force") && msg.contains("ca."), "{msg}");
    assert_eq!(fs::read(dir.path().join("ca.pem")).unwrap(), before);

    // Only the key left behind still blocks.
    fs::remove_file(dir.path().join("ca.pem")).unwrap();
    assert!(matches!(
        init_ca("lab", dir.path(), false),
        Err(PkiError::AlreadyExists { path }) if path.ends_with("ca.key")
    ));

    init_ca("lab2", dir.path(), true).unwrap();
    assert_ne!(fs::read(dir.path().join("ca.pem")).unwrap(), before);
    assert_eq!(load_ca(dir.path()).unwrap().cluster(), "lab2");
}

#[test]
fn issue_refuses_overwrite_without_force() {
    let c = common::cluster("lab");
    let opts = IssueOptions {
        out_dir: c.dir.path().join("certs"),
        ..IssueOptions::default()
    };
    let old = fs::read(&c.sae.key).unwrap();
    let err = c.ca.issue(Role::Sae, "sae-1", &opts).unwrap_err();
    assert!(matches!(err, PkiError::AlreadyExists { ref path } if path.ends_with("sae-1.pem")));
    assert!(err.to_string().contains("--force"));
    assert_eq!(fs::read(&c.sae.key).unwrap(), old, "nothing may be written");

    // Any one of the four files blocks the whole issue, and nothing new appears.
    let fresh = c.dir.path().join("fresh");
    fs::create_dir(&fresh).unwrap();
    fs::write(fresh.join("x.p12"), b"keep").unwrap();
    let opts_fresh = IssueOptions {
        out_dir: fresh.clone(),
        ..IssueOptions::default()
    };
    assert!(matches!(
        c.ca.issue(Role::Sae, "x", &opts_fresh),
        Err(PkiError::AlreadyExists { path }) if path.ends_with("x.p12")
    ));
    assert_eq!(fs::read_dir(&fresh).unwrap().count(), 1);

    let forced = IssueOptions {
        force: true,
        ..opts
    };
    let again = c.ca.issue(Role::Sae, "sae-1", &forced).unwrap();
    assert_ne!(
        fs::read(&again.key).unwrap(),
        old,
        "force must replace the key"
    );
}

#[test]
fn issued_files_have_the_documented_layout() {
    let c = common::cluster("lab");
    let certs = c.dir.path().join("certs");
    for (issued, id) in [(&c.kme, "kme-a"), (&c.sae, "sae-1"), (&c.entropy, "ent.0")] {
        assert_eq!(issued.cert_chain, certs.join(format!("{id}.pem")));
        assert_eq!(issued.key, certs.join(format!("{id}.key")));
        assert_eq!(issued.combined, certs.join(format!("{id}.combined.pem")));
        assert_eq!(issued.p12, certs.join(format!("{id}.p12")));

        let chain = load_certs(&issued.cert_chain).unwrap();
        assert_eq!(chain.len(), 2, "leaf then CA");
        assert_eq!(chain[1], *c.ca.cert_der());

        // Combined: key first, then the same chain.
        let combined = fs::read_to_string(&issued.combined).unwrap();
        assert!(combined.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(load_certs(&issued.combined).unwrap(), chain);
        assert_eq!(
            load_private_key(&issued.combined).unwrap().secret_der(),
            load_private_key(&issued.key).unwrap().secret_der()
        );
    }
}

#[test]
fn identities_round_trip_from_issued_certificates() {
    let c = common::cluster("lab");
    for (issued, role, id) in [
        (&c.kme, Role::Kme, "kme-a"),
        (&c.sae, Role::Sae, "sae-1"),
        (&c.entropy, Role::Entropy, "ent.0"),
    ] {
        let identity = Identity::from_certificate(&leaf_der(&issued.cert_chain), "lab").unwrap();
        assert_eq!(identity.role(), role);
        assert_eq!(identity.id(), id);
        assert_eq!(identity.cluster(), "lab");
        assert_eq!(identity, issued.identity);
        // The wrong cluster is refused.
        assert!(matches!(
            Identity::from_certificate(&leaf_der(&issued.cert_chain), "other"),
            Err(PkiError::ClusterMismatch { .. })
        ));
    }
    // The CA certificate is not an entity.
    assert!(Identity::from_certificate(c.ca.cert_der(), "lab").is_err());
}

#[test]
fn leaf_extensions_match_roles() {
    let c = common::cluster("lab");
    let check = |path: &std::path::Path, server: bool, default_names: bool, cn: &str| {
        let der = leaf_der(path);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth);
        assert_eq!(eku.server_auth, server);
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            cn
        );
        let names = &cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(
            names.contains(&GeneralName::DNSName("localhost")),
            default_names
        );
        assert_eq!(
            names.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])),
            default_names
        );
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        assert_eq!(names.contains(&GeneralName::IPAddress(&v6)), default_names);
        let days = cert.validity().time_to_expiration().unwrap().whole_days();
        assert!((823..=825).contains(&days), "825-day default, got {days}");
    };
    check(&c.kme.cert_chain, true, true, "dqkd kme kme-a");
    check(&c.entropy.cert_chain, true, true, "dqkd entropy ent.0");
    check(&c.sae.cert_chain, false, false, "sae-1");
}

#[test]
fn an_sae_with_names_may_also_serve() {
    let c = common::cluster("lab");
    let opts = IssueOptions {
        out_dir: c.dir.path().join("serving"),
        ip_addresses: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        ..IssueOptions::default()
    };
    let issued = c.ca.issue(Role::Sae, "bob", &opts).unwrap();
    let der = leaf_der(&issued.cert_chain);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && eku.server_auth);
}

#[test]
fn explicit_names_replace_defaults() {
    let c = common::cluster("lab");
    let opts = IssueOptions {
        out_dir: c.dir.path().join("named"),
        dns_names: vec!["kme-b.example".to_owned()],
        ip_addresses: vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))],
        validity_days: 30,
        ..IssueOptions::default()
    };
    let issued = c.ca.issue(Role::Kme, "kme-b", &opts).unwrap();
    let der = leaf_der(&issued.cert_chain);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let names = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(
        *names,
        vec![
            GeneralName::URI("dqkd://lab/kme/kme-b"),
            GeneralName::DNSName("kme-b.example"),
            GeneralName::IPAddress(&[127, 0, 0, 2]),
        ]
    );
    assert!(cert.validity().time_to_expiration().unwrap().whole_days() <= 30);
}

#[test]
fn bad_ids_and_options_are_rejected() {
    let c = common::cluster("lab");
    let opts = IssueOptions {
        out_dir: c.dir.path().join("bad"),
        ..IssueOptions::default()
    };
    for id in ["", "../escape", "a/b", "with space", &"x".repeat(65)] {
        assert!(
            matches!(
                c.ca.issue(Role::Sae, id, &opts),
                Err(PkiError::InvalidName { .. })
            ),
            "{id:?} accepted"
        );
    }
    let zero = IssueOptions {
        validity_days: 0,
        ..opts.clone()
    };
    assert!(matches!(
        c.ca.issue(Role::Sae, "z", &zero),
        Err(PkiError::InvalidValidity(_))
    ));
    assert!(
        !c.dir.path().join("bad").exists(),
        "nothing written on error"
    );
    assert!(matches!(
        init_ca("no/slash", &c.dir.path().join("x"), false),
        Err(PkiError::InvalidName { .. })
    ));
}

#[test]
fn load_ca_checks_its_files() {
    let dir = tempfile::tempdir().unwrap();
    // Missing files name the path.
    let err = load_ca(dir.path()).unwrap_err();
    assert!(err.to_string().contains("ca.pem"), "{err}");

    // A key that does not belong to the certificate.
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    init_ca("lab", &a, false).unwrap();
    init_ca("lab", &b, false).unwrap();
    fs::copy(b.join("ca.key"), a.join("ca.key")).unwrap();
    assert!(matches!(load_ca(&a), Err(PkiError::InvalidCa { .. })));

    // A leaf certificate is not a CA.
    let c = common::cluster("lab");
    let d = dir.path().join("d");
    fs::create_dir(&d).unwrap();
    fs::copy(&c.kme.cert_chain, d.join("ca.pem")).unwrap();
    fs::copy(&c.kme.key, d.join("ca.key")).unwrap();
    assert!(matches!(load_ca(&d), Err(PkiError::InvalidCa { .. })));
}

/// Certificates from other tools: no dqkd URI but a CN means an SAE with that ID.
#[test]
fn foreign_certificates() {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
    let key = KeyPair::generate().unwrap();

    let mut params = CertificateParams::new(vec!["app.example".to_owned()]).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "legacy-sae");
    params.distinguished_name = dn;
    let cert = params.self_signed(&key).unwrap();
    let id = Identity::from_certificate(cert.der(), "lab").unwrap();
    assert_eq!(
        (id.role(), id.id().as_str(), id.cluster().as_str()),
        (Role::Sae, "legacy-sae", "lab")
    );

    // A CN that is not a valid ID is refused, not sanitised.
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "My App / prod");
    params.distinguished_name = dn;
    let cert = params.self_signed(&key).unwrap();
    assert!(matches!(
        Identity::from_certificate(cert.der(), "lab"),
        Err(PkiError::InvalidName { .. })
    ));

    // Neither URI nor CN.
    let mut params = CertificateParams::new(vec!["app.example".to_owned()]).unwrap();
    params.distinguished_name = DistinguishedName::new();
    let cert = params.self_signed(&key).unwrap();
    assert!(matches!(
        Identity::from_certificate(cert.der(), "lab"),
        Err(PkiError::NoIdentity { .. })
    ));

    // A dqkd URI wins over the CN; an unknown role is an error, not a CN fallback.
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI("dqkd://lab/admin/x".try_into().unwrap())];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "x");
    params.distinguished_name = dn;
    let cert = params.self_signed(&key).unwrap();
    assert!(matches!(
        Identity::from_certificate(cert.der(), "lab"),
        Err(PkiError::InvalidUri { .. })
    ));

    // Garbage.
    assert!(matches!(
        Identity::from_certificate(b"not a certificate", "lab"),
        Err(PkiError::CertificateParse { .. })
    ));
}
