//! TLS to PostgreSQL: every connection of the store is TLS with the right CA, and a server
//! whose certificate another CA signed, or that does not name the host connected to, is
//! refused. Needs `DQKD_TEST_POSTGRES_URL` and `DQKD_TEST_POSTGRES_CA` (`.ci/run` sets both
//! up); skips loudly without them unless `DQKD_TEST_REQUIRE` is set.

// Test helpers: an unwrap here is a failed assertion, not a crash on a request path.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::TestDb;
use dqkd_store::KeyStore;
use dqkd_store_postgres::{Options, PostgresStore, TlsConfig};

const WHAT: &str = "TLS to PostgreSQL";

/// The client configuration the KME builds from `[store] ca`.
fn tls_trusting(ca_pem: &Path) -> TlsConfig {
    let ca = dqkd_pki::load_certs(ca_pem).unwrap();
    dqkd_pki::database_client_config(&ca, None).unwrap()
}

/// The test server's CA, and a fresh database on it (`None`: skipped).
async fn setup() -> Option<(TlsConfig, TestDb)> {
    let ca = common::required_env(common::CA_ENV, WHAT)?;
    let db = TestDb::create_required(WHAT).await?;
    Some((tls_trusting(Path::new(&ca)), db))
}

async fn connect(url: &str, tls: TlsConfig) -> Result<PostgresStore, dqkd_store::StoreError> {
    PostgresStore::connect_with(url, common::kek(), Options::new(2).tls(tls)).await
}

#[tokio::test]
async fn every_connection_is_tls_with_the_servers_ca() {
    let Some((tls, db)) = setup().await else {
        return;
    };
    let store = connect(&db.url, tls).await.unwrap();
    // The pool's connections, and the separate one that holds pool claims.
    assert!(store.claim_pool("A->B").await.unwrap());
    store.refresh_pending().await.unwrap();

    let admin = db.client().await;
    let rows = admin
        .query(
            "SELECT a.application_name, s.ssl, s.version FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) \
             WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    let seen: Vec<(String, bool, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(
        seen.iter().any(|(app, ..)| app == "dqkd"),
        "no pool connection: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|(app, ..)| app.starts_with(dqkd_store_postgres::CLAIM_APPLICATION_NAME)),
        "no claim connection: {seen:?}"
    );
    assert!(
        seen.iter().all(|(_, ssl, _)| *ssl),
        "a store connection is not TLS: {seen:?}"
    );
    drop(store);

    // The check from inside one session, over the configuration the store was given.
    let ca = std::env::var(common::CA_ENV).unwrap();
    let mut config: tokio_postgres::Config = db.url.parse().unwrap();
    config.ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, connection) = config
        .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls_trusting(
            Path::new(&ca),
        )))
        .await
        .unwrap();
    tokio::spawn(connection);
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the session is not TLS");
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused() {
    let Some((_, db)) = setup().await else {
        return;
    };
    let other = tempfile::tempdir().unwrap();
    dqkd_pki::init_ca("other", other.path(), false).unwrap();
    let err = connect(&db.url, tls_trusting(&other.path().join("ca.pem")))
        .await
        .expect_err("a server the CA did not sign");
    let text = err.to_string();
    assert!(
        text.contains("not issued by the configured CA"),
        "unclear refusal: {text}"
    );
}

#[tokio::test]
async fn a_server_certificate_for_another_name_is_refused() {
    let Some((tls, db)) = setup().await else {
        return;
    };
    // Connect to the test server (hostaddr) while naming it by a host its certificate
    // does not list.
    let config: tokio_postgres::Config = db.url.parse().unwrap();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let url = format!(
        "host=wrong-name.invalid hostaddr=127.0.0.1 port={port} user={} dbname={}",
        config.get_user().unwrap_or("postgres"),
        config.get_dbname().unwrap(),
    );
    let err = connect(&url, tls)
        .await
        .expect_err("a certificate for other names");
    let text = err.to_string();
    assert!(
        text.contains("does not name the host") && text.contains("wrong-name.invalid"),
        "unclear refusal: {text}"
    );
}

#[tokio::test]
async fn an_sslmode_that_contradicts_the_tls_setting_is_refused() {
    // Refused before connecting: no server needed.
    let ca = tempfile::tempdir().unwrap();
    dqkd_pki::init_ca("c", ca.path(), false).unwrap();
    for mode in ["disable", "prefer"] {
        let url = format!("postgres://dqkd@192.0.2.1/db?sslmode={mode}");
        let err = connect(&url, tls_trusting(&ca.path().join("ca.pem")))
            .await
            .expect_err(mode);
        assert!(
            err.to_string().contains("sslmode allows plaintext"),
            "{err}"
        );
    }
    let err = PostgresStore::connect(
        "postgres://dqkd@192.0.2.1/db?sslmode=require",
        common::kek(),
        1,
    )
    .await
    .expect_err("require without TLS");
    assert!(err.to_string().contains("no TLS configuration"), "{err}");
}
