//! The PKCS#12 and PEM files must be readable by OpenSSL 3 (what curl links)
//! without its legacy provider.

// Test helpers are plain functions, not #[test]s: an unwrap here is an assertion.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn openssl(args: &[&str]) -> Option<Output> {
    match Command::new("openssl").args(args).output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("!!!!!!!! SKIPPING OpenSSL interoperability test: `openssl` is not on PATH !!!!!!!!");
            None
        }
        Err(e) => panic!("running openssl: {e}"),
    }
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

#[test]
fn openssl_reads_p12_with_empty_password() {
    let c = common::cluster("lab");
    let Some(out) = openssl(&[
        "pkcs12",
        "-in",
        path(&c.sae.p12),
        "-passin",
        "pass:",
        "-info",
        "-noout",
    ]) else {
        return;
    };
    let info = ok(&out, "openssl pkcs12 -info") + &String::from_utf8_lossy(&out.stderr);
    assert!(
        info.contains("PBES2") && info.contains("AES-256-CBC"),
        "{info}"
    );
    assert!(info.contains("sha256"), "MAC should be HMAC-SHA256: {info}");

    let out = openssl(&[
        "pkcs12",
        "-in",
        path(&c.sae.p12),
        "-passin",
        "pass:",
        "-nokeys",
    ])
    .unwrap();
    let certs = ok(&out, "openssl pkcs12 -nokeys");
    assert_eq!(
        certs.matches("-----BEGIN CERTIFICATE-----").count(),
        2,
        "{certs}"
    );

    // The key bag carries the ID as friendly name (p12-keystore names certificate bags by subject).
    let out = openssl(&[
        "pkcs12",
        "-in",
        path(&c.sae.p12),
        "-passin",
        "pass:",
        "-nocerts",
        "-nodes",
    ])
    .unwrap();
    let key = ok(&out, "openssl pkcs12 -nocerts");
    assert!(
        key.contains("PRIVATE KEY") && key.contains("friendlyName: sae-1"),
        "{key}"
    );

    let out = openssl(&[
        "pkcs12",
        "-in",
        path(&c.sae.p12),
        "-passin",
        "pass:wrong",
        "-info",
        "-noout",
    ])
    .unwrap();
    assert!(!out.status.success(), "a wrong password must fail");
}

#[test]
fn openssl_reads_p12_with_password() {
    let c = common::cluster_with_password("lab", "s3cret pass");
    let Some(out) = openssl(&[
        "pkcs12",
        "-in",
        path(&c.kme.p12),
        "-passin",
        "pass:s3cret pass",
        "-info",
        "-noout",
    ]) else {
        return;
    };
    ok(&out, "openssl pkcs12 with password");
    let out = openssl(&[
        "pkcs12",
        "-in",
        path(&c.kme.p12),
        "-passin",
        "pass:",
        "-info",
        "-noout",
    ])
    .unwrap();
    assert!(!out.status.success(), "empty password must fail");
}

#[test]
fn openssl_verifies_chains_and_purposes() {
    let c = common::cluster("lab");
    let ca = path(&c.ca.paths().cert).to_owned();
    let Some(out) = openssl(&[
        "verify",
        "-CAfile",
        &ca,
        "-purpose",
        "sslclient",
        path(&c.sae.cert_chain),
    ]) else {
        return;
    };
    ok(&out, "verify sae as client");
    for leaf in [&c.kme, &c.entropy] {
        for purpose in ["sslserver", "sslclient"] {
            let out = openssl(&[
                "verify",
                "-CAfile",
                &ca,
                "-purpose",
                purpose,
                path(&leaf.cert_chain),
            ])
            .unwrap();
            ok(&out, &format!("verify {} as {purpose}", leaf.identity));
        }
    }
    let out = openssl(&[
        "verify",
        "-CAfile",
        &ca,
        "-purpose",
        "sslserver",
        path(&c.sae.cert_chain),
    ])
    .unwrap();
    assert!(
        !out.status.success(),
        "an SAE certificate must not be a server certificate"
    );
    // The key files are PKCS#8 that OpenSSL can parse.
    let out = openssl(&["pkey", "-in", path(&c.kme.key), "-noout"]).unwrap();
    ok(&out, "pkey");
}

#[test]
fn openssl_verifies_the_crl_and_finds_the_revoked_certificate() {
    let c = common::cluster("lab");
    c.ca.revoke(&c.sae.cert_chain).unwrap();
    let crl = c.ca.crl_path();
    let Some(out) = openssl(&[
        "crl",
        "-in",
        path(&crl),
        "-CAfile",
        path(&c.ca_pem()),
        "-noout",
        "-text",
    ]) else {
        return;
    };
    let text = ok(&out, "openssl crl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("verify OK"), "{stderr}");
    assert!(text.contains("X509v3 CRL Number"), "{text}");
    // OpenSSL's own revocation check: the SAE is revoked, the KME is not.
    let verify = |cert: &Path| {
        openssl(&[
            "verify",
            "-crl_check",
            "-CAfile",
            path(&c.ca_pem()),
            "-CRLfile",
            path(&crl),
            path(cert),
        ])
        .unwrap()
    };
    let sae = verify(&c.sae.cert_chain);
    assert!(!sae.status.success());
    assert!(
        String::from_utf8_lossy(&sae.stdout).contains("certificate revoked")
            || String::from_utf8_lossy(&sae.stderr).contains("certificate revoked"),
        "{sae:?}"
    );
    ok(
        &verify(&c.kme.cert_chain),
        "openssl verify of an unrevoked certificate",
    );
}
