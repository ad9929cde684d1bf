//! A throwaway database per test, made from the admin URL in `DQKD_TEST_POSTGRES_URL`.

// Test helpers: a panic here is a failed test, not a crash on a request path.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use dqkd_store::Kek;

/// The environment variable naming an admin URL of a PostgreSQL server for the tests, in URL
/// form (`postgres://user@host:port/db`); the user must be allowed to create databases.
pub const ENV: &str = "DQKD_TEST_POSTGRES_URL";

pub const KEK: [u8; 32] = [0x5a; 32];

pub fn kek() -> Kek {
    Kek::from_bytes(KEK)
}

/// Says loudly that a test checked nothing. The test harness captures (and hides) both
/// `eprintln!` and the process's stderr handle for passing tests, so the notice is written to
/// a fresh handle on `/dev/stderr`, with `eprintln!` as the fallback where that cannot be opened.
pub fn skipped() {
    notice("!!! SKIPPED: DQKD_TEST_POSTGRES_URL is not set; PostgreSQL store NOT tested !!!");
}

/// Set (to anything but empty or `0`) where every test must run: a test whose environment
/// variable is missing then fails instead of skipping.
pub const REQUIRE: &str = "DQKD_TEST_REQUIRE";

/// The environment variable naming the PEM file of the CA that signed the test server's
/// certificate (TLS on, certificate for `localhost`, `127.0.0.1` and `::1`).
pub const CA_ENV: &str = "DQKD_TEST_POSTGRES_CA";

/// The value of `var`, or `None` after a loud SKIPPED notice naming `what` went untested;
/// a failure instead when [`REQUIRE`] is set.
pub fn required_env(var: &str, what: &str) -> Option<String> {
    if let Some(value) = std::env::var(var).ok().filter(|v| !v.is_empty()) {
        return Some(value);
    }
    let required = std::env::var(REQUIRE).is_ok_and(|v| !v.is_empty() && v != "0");
    assert!(
        !required,
        "{var} is not set but {REQUIRE} is: {what} must be tested here"
    );
    notice(&format!(
        "!!! SKIPPED: {var} is not set; {what} NOT tested !!!"
    ));
    None
}

fn notice(text: &str) {
    use std::io::Write;
    let direct = std::fs::OpenOptions::new()
        .append(true)
        .open("/dev/stderr")
        .and_then(|mut f| writeln!(f, "{text}"));
    if direct.is_err() {
        eprintln!("{text}");
    }
}

/// A database `dqkd_test_<random hex>` created for one test and dropped (best effort, with
/// `FORCE` so lingering pool connections do not block it) when this guard goes.
pub struct TestDb {
    admin_url: String,
    name: String,
    /// URL of the throwaway database.
    pub url: String,
}

impl TestDb {
    /// Creates a fresh database, or returns `None` after a loud warning if `ENV` is unset.
    pub async fn create() -> Option<TestDb> {
        let Ok(admin_url) = std::env::var(ENV) else {
            skipped();
            return None;
        };
        Some(Self::create_on(admin_url).await)
    }

    /// Like [`TestDb::create`], but a missing `ENV` fails the test when [`REQUIRE`] is set.
    pub async fn create_required(what: &str) -> Option<TestDb> {
        let admin_url = required_env(ENV, what)?;
        Some(Self::create_on(admin_url).await)
    }

    async fn create_on(admin_url: String) -> TestDb {
        let name = format!(
            "dqkd_test_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..16]
        );
        let admin = admin(&admin_url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("creating the test database");
        let url = with_database(&admin_url, &name);
        TestDb {
            admin_url,
            name,
            url,
        }
    }

    /// A plain client on the test database, for looking at what the store wrote.
    pub async fn client(&self) -> tokio_postgres::Client {
        admin(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on: use a thread with
        // its own runtime.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime for dropping the test database");
            rt.block_on(async {
                let admin = admin(&url).await;
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })
        })
        .join();
        if !matches!(done, Ok(Ok(()))) {
            eprintln!("warning: could not drop test database {}", self.name);
        }
    }
}

/// Connects a plain client and drives its connection in the background.
pub async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connecting to the test PostgreSQL server");
    tokio::spawn(conn);
    client
}

#[path = "../../../../tests/common/proxy.rs"]
mod proxy;

/// A TCP proxy in front of the test server whose open connections can be frozen and closed.
pub struct FreezingProxy {
    /// The test database's URL, through the proxy.
    pub url: String,
    proxy: proxy::FreezingProxy,
}

impl FreezingProxy {
    /// Listens on a free loopback port and forwards to the server of `url`.
    pub async fn start(url: &str) -> FreezingProxy {
        let after_scheme = url.find("://").map_or(0, |i| i + 3);
        let authority_end = url[after_scheme..]
            .find('/')
            .map_or(url.len(), |i| after_scheme + i);
        let host_start = url[after_scheme..authority_end]
            .rfind('@')
            .map_or(after_scheme, |i| after_scheme + i + 1);
        let proxy = proxy::FreezingProxy::start(&url[host_start..authority_end]);
        FreezingProxy {
            url: format!(
                "{}{}{}",
                &url[..host_start],
                proxy.addr,
                &url[authority_end..]
            ),
            proxy,
        }
    }

    /// Every connection open now stops carrying bytes but stays open.
    pub fn freeze_open_connections(&self) {
        self.proxy.freeze_open_connections();
    }

    /// Every frozen connection is closed at both ends.
    pub fn close_frozen_connections(&self) {
        self.proxy.close_frozen_connections();
    }
}

/// `url` with its database name replaced by `name` (URL form only).
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    let mut out = format!("{}/{name}", &base[..authority_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[test]
fn database_name_is_replaced() {
    assert_eq!(
        with_database("postgres://u@h:5432/postgres", "x"),
        "postgres://u@h:5432/x"
    );
    assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
    assert_eq!(
        with_database("postgresql://u@h/db?sslmode=disable", "x"),
        "postgresql://u@h/x?sslmode=disable"
    );
}
