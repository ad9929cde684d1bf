//! The KEK in a real PKCS#11 token (SoftHSM2): generated inside it and never readable, a
//! store sealed through it opens only with it, a restart derives the same epoch keys, and
//! each way of getting it wrong is named. Skips loudly without `softhsm2-util` unless
//! `DQKD_TEST_REQUIRE` is set, which makes it fail instead.

// Test bodies: an unwrap here is an assertion.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use dqkd_kek_pkcs11::{generate, KekUri, Pin, Pkcs11Error, TokenKek, TokenKekConfig};
use dqkd_store::{EmbeddedStore, HeldKek, Kek, KeyMaterial, KeyStore, NewKey, StoreError, Uuid};

const PIN: &str = "31415926";
/// Tokens of this process's SoftHSM2: two sites, and one used only for the wrong PIN (PKCS#11
/// logs a whole process in per token, so a good login elsewhere would hide a bad one).
const TOKENS: [&str; 3] = ["site-a", "site-b", "pin-check"];

struct SoftHsm {
    _dir: tempfile::TempDir,
    module: PathBuf,
}

/// This process's SoftHSM2 with its tokens, made once: a module reads its configuration
/// only when first initialised.
fn softhsm() -> Option<&'static SoftHsm> {
    static HSM: OnceLock<Option<SoftHsm>> = OnceLock::new();
    HSM.get_or_init(|| {
        let module = module();
        let util = Command::new("softhsm2-util").arg("--version").output();
        let (Some(module), Ok(_)) = (module, util) else {
            let why = "softhsm2 (softhsm2-util and libsofthsm2.so) is not installed";
            if std::env::var_os("DQKD_TEST_REQUIRE").is_some() {
                panic!("{why}, and DQKD_TEST_REQUIRE is set");
            }
            eprintln!("SKIPPED: PKCS#11 KEK tests: {why} (apt-get install softhsm2)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        // Before the module is first loaded in this process, so it reads this file.
        std::env::set_var("SOFTHSM2_CONF", &conf);
        for label in TOKENS {
            let out = Command::new("softhsm2-util")
                .args(["--init-token", "--free", "--label", label])
                .args(["--so-pin", "27182818", "--pin", PIN])
                .env("SOFTHSM2_CONF", &conf)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
        Some(SoftHsm { _dir: dir, module })
    })
    .as_ref()
}

fn module() -> Option<PathBuf> {
    std::env::var_os("DQKD_TEST_PKCS11_MODULE")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/usr/lib/softhsm/libsofthsm2.so",
                "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
                "/usr/local/lib/softhsm/libsofthsm2.so",
            ]
            .map(PathBuf::from),
        )
        .find(|p| p.exists())
}

fn config(hsm: &SoftHsm, uri: &str, pin: &str) -> TokenKekConfig {
    TokenKekConfig {
        module: hsm.module.clone(),
        uri: KekUri::parse(uri).unwrap(),
        pin: Pin::new(pin.into()),
    }
}

/// A fresh object label, so tests sharing a token never meet each other's keys.
fn object(token: &str, name: &str) -> String {
    format!(
        "pkcs11:token={token};object={name}-{}",
        Uuid::new_v4().simple()
    )
}

fn key(bytes: [u8; 32]) -> NewKey {
    NewKey {
        id: Uuid::new_v4(),
        master: "alice".into(),
        slaves: vec!["bob".into()],
        material: KeyMaterial::new(bytes.to_vec()),
        expires_at: u64::MAX,
    }
}

fn open(path: &Path, kek: Kek) -> Result<EmbeddedStore, StoreError> {
    EmbeddedStore::open(path, kek)
}

#[test]
fn the_kek_is_made_in_the_token_and_never_leaves_it() {
    let Some(hsm) = softhsm() else { return };
    let uri = object("site-a", "kek");
    let cfg = config(hsm, &uri, PIN);
    generate(&cfg).unwrap();
    let err = generate(&cfg).unwrap_err();
    assert!(matches!(err, Pkcs11Error::ObjectExists { .. }), "{err}");
    assert!(err.to_string().contains(&uri), "{err}");

    // The same input gives the same value on every open; another key, another value.
    let a = TokenKek::open(&cfg).unwrap();
    let b = TokenKek::open(&cfg).unwrap();
    let x = a.hmac_sha256(b"epoch 1").unwrap();
    assert_eq!(*x, *b.hmac_sha256(b"epoch 1").unwrap());
    assert_ne!(*x, *a.hmac_sha256(b"epoch 2").unwrap());
    let other = config(hsm, &object("site-a", "other"), PIN);
    generate(&other).unwrap();
    assert_ne!(
        *x,
        *TokenKek::open(&other)
            .unwrap()
            .hmac_sha256(b"epoch 1")
            .unwrap()
    );
    a.check().unwrap();
    assert!(format!("{a:?}").contains("site-a"));

    // The token refuses to reveal the key's value.
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    let p11 = Pkcs11::new(&hsm.module).unwrap();
    let _ = p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = p11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| p11.get_token_info(*s).unwrap().label() == "site-a")
        .unwrap();
    let session = p11.open_ro_session(slot).unwrap();
    let _ = session.login(
        cryptoki::session::UserType::User,
        Some(&cryptoki::types::AuthPin::from(PIN)),
    );
    let label = KekUri::parse(&uri).unwrap().object().as_bytes().to_vec();
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label),
        ])
        .unwrap();
    assert_eq!(found.len(), 1);
    let attrs = session
        .get_attributes(
            found[0],
            &[
                AttributeType::Extractable,
                AttributeType::Sensitive,
                AttributeType::Value,
            ],
        )
        .unwrap_or_default();
    assert!(attrs.contains(&Attribute::Extractable(false)), "{attrs:?}");
    assert!(attrs.contains(&Attribute::Sensitive(true)), "{attrs:?}");
    assert!(
        !attrs.iter().any(|a| matches!(a, Attribute::Value(_))),
        "the token revealed the key"
    );
}

#[tokio::test]
async fn a_store_sealed_through_the_token_opens_only_with_it() {
    let Some(hsm) = softhsm() else { return };
    let uri = object("site-a", "store");
    let cfg = config(hsm, &uri, PIN);
    generate(&cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let keys: Vec<_> = (0..5u8).map(|i| key([i; 32])).collect();
    let ids: Vec<_> = keys.iter().map(|k| k.id).collect();
    {
        let store = open(&path, TokenKek::open_kek(&cfg).unwrap()).unwrap();
        store.insert(keys).await.unwrap();
    }
    // Never with a file KEK, nor with a key of the same label in another token.
    let err = open(&path, Kek::from_bytes([0x5a; 32])).unwrap_err();
    assert!(matches!(err, StoreError::WrongKek { .. }), "{err}");
    let same_label_elsewhere = config(hsm, &uri.replace("site-a", "site-b"), PIN);
    generate(&same_label_elsewhere).unwrap();
    let err = open(&path, TokenKek::open_kek(&same_label_elsewhere).unwrap()).unwrap_err();
    assert!(matches!(err, StoreError::WrongKek { .. }), "{err}");

    // A restart through the same token derives the same epoch keys: every key opens.
    let store = open(&path, TokenKek::open_kek(&cfg).unwrap()).unwrap();
    let alice = vec!["alice".to_string()];
    let got = store.take("bob", &alice, &ids, 0).await.unwrap();
    let bytes: Vec<_> = got.iter().map(|k| k.material.as_bytes()[0]).collect();
    assert_eq!(bytes, vec![0, 1, 2, 3, 4]);
}

#[test]
fn a_wrong_pin_is_named() {
    let Some(hsm) = softhsm() else { return };
    let err =
        TokenKek::open(&config(hsm, "pkcs11:token=pin-check;object=kek", "0000")).unwrap_err();
    assert!(matches!(err, Pkcs11Error::WrongPin { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("PIN") && text.contains("pin-check"), "{text}");
    assert!(!text.contains("0000"), "the PIN leaked into {text}");
}

#[test]
fn a_missing_key_or_token_is_named() {
    let Some(hsm) = softhsm() else { return };
    let uri = object("site-b", "never-made");
    let err = TokenKek::open(&config(hsm, &uri, PIN)).unwrap_err();
    assert!(matches!(err, Pkcs11Error::ObjectMissing { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&uri) && text.contains("dqkd pki kek --pkcs11"),
        "{text}"
    );

    let err = TokenKek::open(&config(hsm, "pkcs11:token=unplugged;object=kek", PIN)).unwrap_err();
    assert!(matches!(err, Pkcs11Error::TokenMissing { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("unplugged") && text.contains("site-a"),
        "{text}"
    );

    let mut cfg = config(hsm, "pkcs11:token=site-a;object=kek", PIN);
    cfg.module = PathBuf::from("/nonexistent/libpkcs11.so");
    let err = TokenKek::open(&cfg).unwrap_err();
    assert!(matches!(err, Pkcs11Error::Module { .. }), "{err}");
}
