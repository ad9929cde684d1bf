//! `dqkd check` on real files from `dqkd pki`: a good site passes, and each kind of problem
//! is one line that names the site file, the entry and what is wrong, with exit status 1.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{dqkd, path_str, BIN};

const SITE: &str = r#"manifest = "cluster.toml"
kme_id = "KME_A"
api_listen = "127.0.0.1:0"
[tls]
ca = "pki/ca.pem"
cert = "pki/kme/KME_A.pem"
key = "pki/kme/KME_A.key"
crl = "pki/ca.crl.pem"
[store]
path = "data/store.redb"
kek = "site.kek"
"#;

/// A one-site cluster's files: its CA with KME_A and KME_B, a second CA ("other") with
/// its own KME_A, a CRL for each, a KEK and a data folder.
fn good_site() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for ca in ["pki", "other"] {
        let ca = path_str(&d.join(ca)).to_owned();
        dqkd(&["pki", "init", "--cluster", "test", "--out", &ca]);
        dqkd(&["pki", "issue", "kme", "KME_A", "--ca", &ca]);
        dqkd(&["pki", "issue", "kme", "KME_B", "--ca", &ca]);
        dqkd(&["pki", "crl", "--ca", &ca]);
    }
    dqkd(&["pki", "kek", "--out", path_str(&d.join("site.kek"))]);
    std::fs::create_dir(d.join("data")).expect("data folder");
    std::fs::write(
        d.join("cluster.toml"),
        "cluster = \"test\"\n[[sites]]\nkme_id = \"KME_A\"\napi_addr = \"127.0.0.1:8443\"\nsaes = [\"alice\"]\n",
    )
    .expect("manifest");
    let site = d.join("site.toml");
    std::fs::write(&site, SITE).expect("site file");
    (dir, site)
}

/// Runs `dqkd check --config site` and returns its exit code and stdout.
fn check(site: &Path) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(site)
        .output()
        .expect("run dqkd check");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Writes the site file with `from` replaced by `to` next to the good one and checks it.
fn check_variant(dir: &Path, from: &str, to: &str) -> (i32, String) {
    assert!(SITE.contains(from), "{from:?} is not in the site file");
    let variant = dir.join("variant.toml");
    std::fs::write(&variant, SITE.replace(from, to)).expect("variant");
    check(&variant)
}

/// Exactly one problem line, naming the variant file and `entry`, containing `what`.
fn assert_one_problem((code, out): (i32, String), entry: &str, what: &str) {
    assert_eq!(code, 1, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "one line per problem: {out}");
    assert!(lines[0].contains("variant.toml: "), "{out}");
    assert!(lines[0].contains(&format!(": {entry}: ")), "{out}");
    assert!(lines[0].contains(what), "{out}");
}

#[test]
fn a_good_site_passes() {
    let (_dir, site) = good_site();
    let (code, out) = check(&site);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok (site KME_A of cluster test)"), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
}

#[test]
fn certificate_problems_name_the_entry() {
    let (dir, _) = good_site();
    let d = dir.path();
    // Another KME's certificate, valid in every other way.
    let (code, out) = check_variant(
        d,
        "kme/KME_A.pem\"\nkey = \"pki/kme/KME_A.key",
        "kme/KME_B.pem\"\nkey = \"pki/kme/KME_B.key",
    );
    assert_one_problem((code, out), "[tls] cert", "not of KME \"KME_A\"");
    // The right identity from another CA.
    let (code, out) = check_variant(
        d,
        "cert = \"pki/kme/KME_A.pem\"\nkey = \"pki/kme/KME_A.key\"",
        "cert = \"other/kme/KME_A.pem\"\nkey = \"other/kme/KME_A.key\"",
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains(": [tls] cert: ") && l.contains("not issued by the CA")),
        "{out}"
    );
    // A key that is not the certificate's.
    assert_one_problem(
        check_variant(
            d,
            "key = \"pki/kme/KME_A.key\"",
            "key = \"pki/kme/KME_B.key\"",
        ),
        "[tls] key",
        "is not the key of the certificate",
    );
    // A CA file that is not there.
    assert_one_problem(
        check_variant(d, "ca = \"pki/ca.pem\"", "ca = \"pki/nothing.pem\""),
        "[tls] ca",
        "nothing.pem",
    );
}

#[test]
fn revocation_list_problems_name_the_entry() {
    let (dir, _) = good_site();
    let d = dir.path();
    assert_one_problem(
        check_variant(
            d,
            "crl = \"pki/ca.crl.pem\"",
            "crl = \"pki/missing.crl.pem\"",
        ),
        "[tls] crl",
        "missing.crl.pem",
    );
    let (code, out) = check_variant(d, "crl = \"pki/ca.crl.pem\"", "crl = \"other/ca.crl.pem\"");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains(": [tls] crl: ") && l.contains("not signed by the cluster CA")),
        "{out}"
    );
}

#[test]
fn a_revoked_certificate_is_a_problem() {
    let (dir, site) = good_site();
    let pki = dir.path().join("pki");
    dqkd(&[
        "pki",
        "revoke",
        path_str(&pki.join("kme/KME_A.pem")),
        "--ca",
        path_str(&pki),
    ]);
    let (code, out) = check(&site);
    assert_eq!(code, 1, "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains(": [tls] cert: ") && out.contains("the certificate is revoked"),
        "{out}"
    );
}

#[test]
fn a_certificate_near_its_end_is_a_warning_only() {
    let (dir, _) = good_site();
    let d = dir.path();
    let ca = dqkd_pki::load_ca(&d.join("pki")).expect("CA");
    let opts = dqkd_pki::IssueOptions {
        out_dir: d.join("soon"),
        validity_days: 10,
        ..Default::default()
    };
    ca.issue(dqkd_pki::Role::Kme, "KME_A", &opts)
        .expect("issue");
    let (code, out) = check_variant(
        d,
        "cert = \"pki/kme/KME_A.pem\"\nkey = \"pki/kme/KME_A.key\"",
        "cert = \"soon/KME_A.pem\"\nkey = \"soon/KME_A.key\"",
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(": [tls] cert: warning: ") && out.contains("expires on"),
        "{out}"
    );
}

#[test]
fn kek_and_store_problems_name_the_entry() {
    let (dir, _) = good_site();
    let d = dir.path();
    assert_one_problem(
        check_variant(d, "kek = \"site.kek\"", "kek = \"missing.kek\""),
        "[store] kek",
        "missing.kek",
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::copy(d.join("site.kek"), d.join("open.kek")).expect("copy");
        std::fs::set_permissions(d.join("open.kek"), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        assert_one_problem(
            check_variant(d, "kek = \"site.kek\"", "kek = \"open.kek\""),
            "[store] kek",
            "mode 0644",
        );
    }
    // A missing folder is made at start; a file where a folder should be is a problem.
    let (code, out) = check_variant(
        d,
        "path = \"data/store.redb\"",
        "path = \"new/a/store.redb\"",
    );
    assert_eq!(code, 0, "{out}");
    assert_one_problem(
        check_variant(
            d,
            "path = \"data/store.redb\"",
            "path = \"site.kek/store.redb\"",
        ),
        "[store] path",
        "is not a folder",
    );
    // A database that answers nowhere; the message names the host, never the URL.
    assert_one_problem(
        check_variant(
            d,
            "path = \"data/store.redb\"",
            "url = \"postgres://postgres:SECRET@127.0.0.1:1/keys\"",
        ),
        "[store] url",
        "127.0.0.1:1",
    );
    let (_, out) = check_variant(
        d,
        "path = \"data/store.redb\"",
        "url = \"postgres://postgres:SECRET@127.0.0.1:1/keys\"",
    );
    assert!(!out.contains("SECRET"), "{out}");
}

#[test]
fn config_problems_come_from_the_loader() {
    let (dir, _) = good_site();
    let (code, out) = check_variant(dir.path(), "kme_id = \"KME_A\"", "kme_id = \"KME_Z\"");
    assert_eq!(code, 1, "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("cluster.toml: "), "{out}");
    assert!(out.contains("\"KME_Z\""), "{out}");
    let (code, out) = check_variant(dir.path(), "[store]", "[store]\nsurprise = 1");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("variant.toml") && out.contains("surprise"),
        "{out}"
    );
}

#[test]
fn an_entropy_server_file_is_checked_as_one() {
    let (dir, _) = good_site();
    let d = dir.path();
    dqkd(&[
        "pki",
        "issue",
        "entropy",
        "E1",
        "--ca",
        path_str(&d.join("pki")),
    ]);
    let file = |cert: &str| {
        format!(
            "cluster = \"test\"\nserver_id = \"E1\"\nlisten = \"127.0.0.1:0\"\n[tls]\nca = \"pki/ca.pem\"\ncert = \"pki/{cert}.pem\"\nkey = \"pki/{cert}.key\"\ncrl = \"pki/ca.crl.pem\"\n"
        )
    };
    let good = d.join("entropy.toml");
    std::fs::write(&good, file("entropy/E1")).expect("write");
    let (code, out) = check(&good);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ok (entropy server E1 of cluster test)"),
        "{out}"
    );
    // A KME's certificate is not this entropy server's.
    std::fs::write(&good, file("kme/KME_A")).expect("write");
    let (code, out) = check(&good);
    assert_eq!(code, 1, "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains("entropy.toml: [tls] cert: ") && out.contains("not of entropy server \"E1\""),
        "{out}"
    );
}
