use super::store::{kek_location, store_location};
use super::*;

fn manifest(sites: &str) -> Manifest {
    toml::from_str(&format!("cluster = \"c1\"\n{sites}")).expect("manifest parses")
}

fn site(kme_id: &str) -> SiteFile {
    SiteFile {
        manifest: "cluster.toml".into(),
        kme_id: kme_id.parse().expect("valid KME ID"),
        api_listen: "127.0.0.1:0".parse().expect("addr"),
        peer_listen: Some("127.0.0.1:0".parse().expect("addr")),
        metrics_listen: None,
        tls: TlsFiles {
            ca: "ca.pem".into(),
            cert: "kme.pem".into(),
            key: "kme.key".into(),
            crl: None,
            key_exchange: None,
            peer_key_exchange: None,
        },
        store: StoreFiles {
            path: Some("store.redb".into()),
            url: None,
            pool_size: None,
            ca: None,
            cert: None,
            key: None,
            insecure_allow_plaintext: false,
            kek: "kek".into(),
            pkcs11_module: None,
            pkcs11_pin: None,
        },
        connections: ServerLimits::default(),
    }
}

fn check(sites: &str, kme: &str) -> Result<Config, ConfigError> {
    Config::from_parts(
        manifest(sites),
        Path::new("cluster.toml"),
        site(kme),
        Path::new("/etc/dqkd/site.toml"),
    )
}

const TWO_SITES: &str = r#"
[[sites]]
kme_id = "A"
api_addr = "127.0.0.1:1"
peer_addr = "127.0.0.1:3"
saes = ["alice", "carol"]
[[sites]]
kme_id = "B"
api_addr = "127.0.0.1:2"
peer_addr = "127.0.0.1:4"
saes = ["bob"]
"#;

#[test]
fn a_consistent_manifest_loads() {
    let config = check(TWO_SITES, "A").expect("valid");
    assert_eq!(config.own_site().saes.len(), 2);
    assert_eq!(config.sae_site["bob"], "B");
    assert_eq!(config.tls.ca, Path::new("/etc/dqkd/ca.pem"));
    assert_eq!(config.limits, ManifestLimits::default());
}

#[test]
fn inconsistencies_are_named() {
    let err = check(TWO_SITES, "C").expect_err("unknown site");
    assert!(err.to_string().contains("\"C\" is not one of"), "{err}");

    let dup_sae = TWO_SITES.replace("[\"bob\"]", "[\"alice\"]");
    let err = check(&dup_sae, "A").expect_err("SAE twice");
    assert!(
        err.to_string().contains("\"alice\" is listed under both"),
        "{err}"
    );

    let clash = TWO_SITES.replace("[\"bob\"]", "[\"A\"]");
    let err = check(&clash, "A").expect_err("KME/SAE clash");
    assert!(
        err.to_string().contains("both a KME ID and an SAE ID"),
        "{err}"
    );

    let bad_name = TWO_SITES.replace("\"bob\"", "\"b o b\"");
    assert!(toml::from_str::<Manifest>(&format!("cluster = \"c1\"\n{bad_name}")).is_err());
}

/// The config takes exactly the names the PKI can issue certificates for ("." and ".." would
/// pass an alphabet check but cannot be file names), and a refusal shows the field at fault.
#[test]
fn names_follow_the_pki_rule() {
    let parse = |text: &str| toml::from_str::<Manifest>(text).map_err(|e| e.to_string());
    let long = "n".repeat(65);
    for bad in [".", "..", "", "a/b", long.as_str()] {
        let cases = [
            (
                "saes = [",
                TWO_SITES.replace("\"bob\"", &format!("\"{bad}\"")),
            ),
            (
                "kme_id = ",
                TWO_SITES.replace("kme_id = \"B\"", &format!("kme_id = \"{bad}\"")),
            ),
            (
                "id = ",
                format!("[[entropy]]\nid = \"{bad}\"\naddr = \"127.0.0.1:5\"\n{TWO_SITES}"),
            ),
        ];
        for (field, sites) in cases {
            let err = parse(&format!("cluster = \"c1\"\n{sites}")).expect_err(bad);
            assert!(err.contains("invalid name"), "{bad:?}: {err}");
            assert!(err.contains(&format!("{field}\"{bad}\"")), "{bad:?}: {err}");
        }
        let err = parse(&format!("cluster = \"{bad}\"\n{TWO_SITES}")).expect_err(bad);
        assert!(err.contains(&format!("cluster = \"{bad}\"")), "{err}");
        let err = check(TWO_SITES, "A")
            .expect("valid")
            .with_replica(bad)
            .expect_err(bad);
        assert!(
            err.to_string()
                .starts_with(&format!("replica name {bad:?}: ")),
            "{err}"
        );
    }
    for name in ["x", "a.b", "a..b", "_-.", &"n".repeat(64)] {
        let sae = TWO_SITES.replace("\"bob\"", &format!("\"{name}\""));
        assert!(check(&sae, "A").is_ok(), "SAE {name:?} refused");
    }
}

#[test]
fn limits_must_make_sense() {
    let mut m = manifest(TWO_SITES);
    m.limits.min_key_size = 12;
    let err = Config::from_parts(m, Path::new("m.toml"), site("A"), Path::new("site.toml"))
        .expect_err("bad limits");
    assert!(err.to_string().contains("multiples of 8"), "{err}");

    let mut m = manifest(TWO_SITES);
    m.limits.default_key_size = 16;
    assert!(Config::from_parts(m, Path::new("m.toml"), site("A"), Path::new("site.toml")).is_err());
}

#[test]
fn multi_site_and_keygen_settings_are_checked() {
    let no_peer = TWO_SITES.replace("peer_addr = \"127.0.0.1:4\"\n", "");
    let err = check(&no_peer, "A").expect_err("missing peer_addr");
    assert!(err.to_string().contains("\"B\" has no peer_addr"), "{err}");

    let mut lonely = site("A");
    lonely.peer_listen = None;
    let err = Config::from_parts(
        manifest(TWO_SITES),
        Path::new("m.toml"),
        lonely,
        Path::new("site.toml"),
    )
    .expect_err("missing peer_listen");
    assert!(err.to_string().contains("needs peer_listen"), "{err}");

    let few = format!("{TWO_SITES}\n[[entropy]]\nid = \"E1\"\naddr = \"127.0.0.1:5\"\n");
    let err = check(&few, "A").expect_err("n > servers");
    assert!(err.to_string().contains("only 1 entropy servers"), "{err}");

    let bad_c = format!("[keygen]\nn = 2\nc = 2\n{TWO_SITES}");
    assert!(check(&bad_c, "A").is_err());
}

#[test]
fn parameters_that_void_the_claim_are_refused() {
    let with = |keygen: &str| format!("[keygen]\n{keygen}\n{TWO_SITES}");
    for (keygen, needle) in [
        ("n = 1\nc = 0", "[keygen] n = 1: at least 2"),
        (
            "n = 1\nc = 0\ninsecure_allow_c0 = true",
            "[keygen] n = 1: at least 2",
        ),
        ("n = 0\nc = 0", "[keygen] n = 0: at least 2"),
        ("n = 3\nc = 0", "[keygen] c = 0"),
        ("n = 2\nc = 0", "insecure_allow_c0 = true"),
        ("n = 3\nc = 3", "c < n"),
    ] {
        let err = check(&with(keygen), "A").expect_err(keygen);
        let text = err.to_string();
        assert!(text.starts_with("cluster.toml: "), "names the file: {text}");
        assert!(text.contains(needle), "{keygen}: {text}");
    }
    let config =
        check(&with("n = 3\nc = 0\ninsecure_allow_c0 = true"), "A").expect("c = 0 with the switch");
    assert_eq!(config.keygen.c, 0);
    let warnings = config.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("insecure_allow_c0"), "{warnings:?}");
    // The switch alone, with c >= 1, weakens nothing and warns about nothing.
    let config = check(&with("n = 3\nc = 1\ninsecure_allow_c0 = true"), "A").expect("valid");
    assert!(config.warnings().is_empty());
    assert!(check(TWO_SITES, "A").expect("valid").warnings().is_empty());
}

#[test]
fn short_keys_between_sites_need_the_switch() {
    assert_eq!(ManifestLimits::default().min_key_size, 128);
    let with = |limits: &str, sites: &str| format!("[limits]\n{limits}\n{sites}");
    let err = check(&with("min_key_size = 64", TWO_SITES), "A").expect_err("64 bits");
    let text = err.to_string();
    assert!(text.starts_with("cluster.toml: "), "{text}");
    assert!(
        text.contains("[limits] min_key_size = 64 bits") && text.contains("allow_short_keys"),
        "{text}"
    );
    assert!(check(&with("min_key_size = 120", TWO_SITES), "A").is_err());
    let config = check(&with("min_key_size = 128", TWO_SITES), "A").expect("128 bits");
    assert!(config.warnings().is_empty());

    let config = check(
        &with("min_key_size = 64\nallow_short_keys = true", TWO_SITES),
        "A",
    )
    .expect("allowed");
    assert_eq!(config.limits.min_key_size, 64);
    let warnings = config.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("allow_short_keys"), "{warnings:?}");

    // One site shares no key with another site: short keys need no switch there.
    let one_site = "[[sites]]\nkme_id = \"A\"\napi_addr = \"127.0.0.1:1\"\nsaes = [\"alice\"]\n";
    let config = check(&with("min_key_size = 64", one_site), "A").expect("one site");
    assert!(config.warnings().is_empty());
}

#[test]
fn only_a_site_on_postgres_names_its_replicas() {
    let embedded = check(TWO_SITES, "A").expect("valid");
    assert_eq!(embedded.replica, None);
    let err = embedded.with_replica("r1").expect_err("embedded store");
    assert!(
        err.to_string().contains("only a site on PostgreSQL"),
        "{err}"
    );

    let mut shared = site("A");
    shared.store.path = None;
    shared.store.url = Some("postgres://db.internal/dqkd".into());
    shared.store.insecure_allow_plaintext = true;
    let on_postgres = || {
        Config::from_parts(
            manifest(TWO_SITES),
            Path::new("m.toml"),
            shared.clone(),
            Path::new("site.toml"),
        )
        .expect("valid")
    };
    let named = on_postgres().with_replica("kme-a.2").expect("valid name");
    assert_eq!(named.replica.as_deref(), Some("kme-a.2"));
    for bad in ["", "r 1", "r1@a", &"r".repeat(65)] {
        let err = on_postgres().with_replica(bad).expect_err(bad);
        assert!(matches!(err, ConfigError::Replica { .. }), "{err}");
    }
}

#[test]
fn pool_settings_are_checked() {
    let entropy = "[[entropy]]\nid = \"E1\"\naddr = \"127.0.0.1:5\"\n\
                   [[entropy]]\nid = \"E2\"\naddr = \"127.0.0.1:6\"\n\
                   [[entropy]]\nid = \"E3\"\naddr = \"127.0.0.1:7\"\n";
    let with = |pools: &str, entropy: &str| format!("[pools]\n{pools}\n{entropy}{TWO_SITES}");
    let config = check(&with("target = 1000\nlow_water = 500", entropy), "A").expect("valid");
    assert_eq!(config.pools.target, 1000);
    assert_eq!(config.pools.batch, PoolSettings::default().batch);
    assert_eq!(check(TWO_SITES, "A").expect("valid").pools.target, 0);

    for (pools, entropy, needle) in [
        ("target = 1000", "", "no [[entropy]] servers"),
        (
            "target = 1000\nlow_water = 1000",
            entropy,
            "must be below pools.target",
        ),
        (
            "target = 10\nbatch = 0",
            entropy,
            "pools.batch must be 1 to",
        ),
        (
            "target = 10\nbatch = 70000",
            entropy,
            "pools.batch must be 1 to",
        ),
        ("target = 10\nttl_secs = 5", entropy, "at least 60"),
    ] {
        let err = check(&with(pools, entropy), "A").expect_err(pools);
        assert!(err.to_string().contains(needle), "{pools}: {err}");
    }
}

#[test]
fn the_store_is_a_file_or_a_postgres_url() {
    let files = |path: Option<&str>, url: Option<&str>| StoreFiles {
        path: path.map(Into::into),
        url: url.map(Into::into),
        pool_size: None,
        ca: None,
        cert: None,
        key: None,
        insecure_allow_plaintext: false,
        kek: "kek".into(),
        pkcs11_module: None,
        pkcs11_pin: None,
    };
    let base = Path::new("/srv");
    let site = Path::new("/srv/site.toml");
    if std::env::var_os("DQKD_STORE_URL").is_none() {
        assert_eq!(
            store_location(&files(Some("k.redb"), None), base, site).expect("file"),
            StoreLocation::Embedded("/srv/k.redb".into())
        );
        assert!(store_location(&files(None, None), base, site).is_err());
        assert!(store_location(&files(None, Some("mysql://x")), base, site).is_err());
    }
    assert_eq!(
        store_location(&files(None, Some("postgres://u@localhost/db")), base, site).expect("pg"),
        StoreLocation::Postgres {
            url: std::env::var("DQKD_STORE_URL")
                .unwrap_or_else(|_| "postgres://u@localhost/db".into()),
            pool_size: 16,
            tls: None,
        }
    );
    let err = store_location(
        &files(Some("k.redb"), Some("postgres://u@h/db")),
        base,
        site,
    )
    .expect_err("both");
    assert!(err.to_string().contains("choose one store"), "{err}");
}

/// `[store]` as written, for the PostgreSQL transport checks.
fn postgres_store(url: &str, extra: &str) -> StoreFiles {
    toml::from_str(&format!("url = {url:?}\nkek = \"kek\"\n{extra}")).expect("[store]")
}

#[test]
fn plaintext_to_a_remote_database_needs_the_insecure_switch() {
    if std::env::var_os("DQKD_STORE_URL").is_some() {
        return;
    }
    let (base, site) = (Path::new("/srv"), Path::new("/srv/site.toml"));
    let check = |url: &str, extra: &str| store_location(&postgres_store(url, extra), base, site);
    for remote in [
        "postgres://dqkd@db.example.net/kme_a",
        "postgres://dqkd@10.0.0.5:5432/kme_a",
        "postgres://dqkd@localhost/kme_a?hostaddr=10.0.0.5",
    ] {
        let err = check(remote, "").expect_err(remote);
        let text = err.to_string();
        assert!(text.contains("/srv/site.toml"), "{text}");
        assert!(text.contains("in plaintext"), "{text}");
        assert!(text.contains("[store] ca"), "{text}");
        assert!(text.contains("insecure_allow_plaintext"), "{text}");
        let allowed = check(remote, "insecure_allow_plaintext = true").expect(remote);
        assert!(
            matches!(allowed, StoreLocation::Postgres { tls: None, .. }),
            "{allowed:?}"
        );
    }
    for local in [
        "postgres://dqkd@127.0.0.1/kme_a",
        "postgres://dqkd@127.0.0.53:5433/kme_a",
        "postgres://dqkd@localhost/kme_a",
        "postgres://dqkd@[::1]/kme_a",
        "postgres://dqkd@localhost/kme_a?host=/run/postgresql",
    ] {
        let ok = check(local, "").expect(local);
        assert!(
            matches!(ok, StoreLocation::Postgres { tls: None, .. }),
            "{ok:?}"
        );
    }
}

#[test]
fn a_ca_makes_postgres_tls_and_contradictions_are_refused() {
    if std::env::var_os("DQKD_STORE_URL").is_some() {
        return;
    }
    let (base, site) = (Path::new("/srv"), Path::new("/srv/site.toml"));
    let check = |url: &str, extra: &str| store_location(&postgres_store(url, extra), base, site);
    let remote = "postgres://dqkd@db.example.net/kme_a";
    assert_eq!(
        check(remote, "ca = \"pki/db-ca.pem\"").expect("tls"),
        StoreLocation::Postgres {
            url: remote.into(),
            pool_size: 16,
            tls: Some(PostgresTls {
                ca: "/srv/pki/db-ca.pem".into(),
                client: None,
            }),
        }
    );
    let with_client = check(
        &format!("{remote}?sslmode=require"),
        "ca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"",
    )
    .expect("client certificate");
    assert!(
        matches!(&with_client, StoreLocation::Postgres { tls: Some(PostgresTls {
            client: Some(ClientCertFiles { cert, key }), .. }), .. }
            if cert == Path::new("/srv/c.pem") && key == Path::new("/srv/c.key")),
        "{with_client:?}"
    );
    for (url, extra, needle) in [
        (
            format!("{remote}?sslmode=disable"),
            "ca = \"ca.pem\"",
            "sslmode=disable, which contradicts [store] ca",
        ),
        (
            format!("{remote}?sslmode=prefer"),
            "ca = \"ca.pem\"",
            "sslmode=prefer, which contradicts [store] ca",
        ),
        (
            "postgres://dqkd@127.0.0.1/kme_a?sslmode=require".into(),
            "",
            "sslmode=require but [store] ca is not set",
        ),
        (
            format!("{remote}?sslmode=verify-full"),
            "ca = \"ca.pem\"",
            "write sslmode=require",
        ),
        (
            remote.into(),
            "ca = \"ca.pem\"\ninsecure_allow_plaintext = true",
            "insecure_allow_plaintext contradicts [store] ca",
        ),
        (
            "postgres://dqkd@localhost/kme_a?host=/run/postgresql".into(),
            "ca = \"ca.pem\"",
            "Unix socket",
        ),
        (
            remote.into(),
            "ca = \"ca.pem\"\ncert = \"c.pem\"",
            "give both or neither",
        ),
        (
            "postgres://dqkd@127.0.0.1/kme_a".into(),
            "cert = \"c.pem\"\nkey = \"c.key\"",
            "need [store] ca",
        ),
    ] {
        let err = check(&url, extra).expect_err(&url);
        let text = err.to_string();
        assert!(text.contains(needle), "{url} {extra}: {text}");
        assert!(text.contains("/srv/site.toml"), "{text}");
    }
    let embedded: StoreFiles =
        toml::from_str("path = \"k.redb\"\nkek = \"kek\"\nca = \"ca.pem\"").expect("[store]");
    let err = store_location(&embedded, base, site).expect_err("ca on a file");
    assert!(err.to_string().contains("PostgreSQL (url) only"), "{err}");
}

#[test]
fn connection_limits_default_and_zero_is_refused() {
    let config = check(TWO_SITES, "A").expect("valid");
    assert_eq!(config.connections, ServerLimits::default());
    let mut file = site("A");
    file.connections.idle_timeout_ms = 0;
    let err = Config::from_parts(
        manifest(TWO_SITES),
        Path::new("cluster.toml"),
        file,
        Path::new("/etc/dqkd/site.toml"),
    )
    .expect_err("zero");
    let text = err.to_string();
    assert!(
        text.contains("/etc/dqkd/site.toml") && text.contains("connections.idle_timeout_ms"),
        "{text}"
    );
    let parsed: SiteFile = toml::from_str(
        "manifest = \"c.toml\"\nkme_id = \"A\"\napi_listen = \"127.0.0.1:0\"\n\
         [tls]\nca = \"ca\"\ncert = \"c\"\nkey = \"k\"\n[store]\npath = \"s\"\nkek = \"k\"\n\
         [connections]\nmax_connections = 64\n",
    )
    .expect("parses");
    assert_eq!(parsed.connections.max_connections, 64);
    assert_eq!(parsed.connections.idle_timeout_ms, 60_000);
}

#[test]
fn unknown_fields_are_refused() {
    let err = toml::from_str::<Manifest>("cluster = \"c\"\nsites = []\ncolour = 1")
        .expect_err("unknown field");
    assert!(err.to_string().contains("colour"), "{err}");
}

/// `[store] kek` is a file, or a `pkcs11:` URI that needs its module and PIN; the PIN never
/// shows in `Debug`.
#[test]
fn a_kek_in_a_token_needs_its_module_and_pin() {
    if std::env::var_os("DQKD_PKCS11_MODULE").is_some()
        || std::env::var_os("DQKD_PKCS11_PIN").is_some()
    {
        return; // The environment would override what this test writes.
    }
    let store = |lines: &str| -> StoreFiles {
        toml::from_str(&format!("path = \"k.redb\"\n{lines}")).expect("[store]")
    };
    let (base, site) = (Path::new("/srv"), Path::new("/srv/site.toml"));
    let kek = |lines: &str| kek_location(&store(lines), base, site);
    let err = |lines: &str| kek(lines).expect_err(lines).to_string();
    assert_eq!(
        kek("kek = \"site.kek\"").expect("file"),
        KekLocation::File("/srv/site.kek".into())
    );
    assert!(err("kek = \"site.kek\"\npkcs11_module = \"p.so\"")
        .contains("only when kek is a pkcs11: URI"));
    let token = "kek = \"pkcs11:token=t;object=k\"";
    assert!(err(token).contains("pkcs11_module"));
    let with_module = format!("{token}\npkcs11_module = \"/usr/lib/p.so\"");
    assert!(err(&with_module).contains("DQKD_PKCS11_PIN"));
    assert!(
        err("kek = \"pkcs11:object=k\"\npkcs11_module = \"p.so\"\npkcs11_pin = \"1\"")
            .contains("token=<label>")
    );
    let location = kek(&format!("{with_module}\npkcs11_pin = \"8642\"")).expect("token");
    assert_eq!(
        location,
        KekLocation::Pkcs11 {
            uri: "pkcs11:token=t;object=k".into(),
            module: "/usr/lib/p.so".into(),
            pin: Secret("8642".into()),
        }
    );
    assert!(!format!("{location:?}").contains("8642"));
    assert_eq!(location.to_string(), "pkcs11:token=t;object=k");
}
