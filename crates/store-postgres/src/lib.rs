//! A PostgreSQL [`KeyStore`] for sites that run several stateless KME replicas on one
//! database.
//!
//! It keeps exactly the rules of the embedded store (the same pure checks from
//! [`dqkd_store::rules`]) and the same encryption at rest (the same sealed record from
//! [`dqkd_store::seal`]: AES-256-GCM under the site KEK, associated data binding the key ID and
//! master). What changes is who guarantees "exactly once":
//!
//! * `take` locks the requested rows (`SELECT … WHERE id = ANY($1) ORDER BY id FOR UPDATE`),
//!   checks, marks the caller served, deletes keys nobody else may fetch, and commits before it
//!   returns. A concurrent take of the same key, from this process or another replica, waits
//!   for the row lock and then sees the key gone or already served. Locks are taken in ID
//!   order, so two multi-key takes cannot deadlock.
//! * `insert` writes all keys in one transaction (`ON CONFLICT DO NOTHING` tells which ID
//!   already existed, and the transaction is rolled back).
//! * Ready keys (`pool_insert`) live in a table of their own, keyed by link and position
//!   (`seq`), sealed like ordinary keys with the link name in place of the master. A taken
//!   position is found by the primary key (`ON CONFLICT DO NOTHING` again, rows written in
//!   position order so that overlapping batches on two replicas wait for each other instead of
//!   deadlocking). The IDs are looked up among the ordinary keys in the same transaction. No
//!   lock spans both tables, and none is needed: an insert does not check ready keys, so an
//!   insert and a pool insert of one ID that race may both succeed, which is the outcome of
//!   running the pool insert first (and random IDs do not collide in practice).
//! * `pool_bind` deletes the ready keys it names (`DELETE … RETURNING`, rows found by link,
//!   position and ID, locked in position order) and writes the ordinary keys in the same
//!   transaction, so a concurrent bind or `pool_remove` of the same position waits for it and
//!   then finds the key gone; `pool_remove` locks in the same order, so neither can deadlock.
//!   `destroy` reaches ordinary keys only.
//! * An answer leaves only after `COMMIT` returned, which is durable when the server runs with
//!   its defaults (`fsync = on`, `synchronous_commit = on`); a warning is logged at connect if
//!   `synchronous_commit` is off.
//!
//! * A pool is claimed ([`KeyStore::claim_pool`]) with a session-level advisory lock (one
//!   64-bit key per link, [`POOL_CLAIM_KEY_SQL`]) on a connection of its own, outside the pool
//!   and named after [`CLAIM_APPLICATION_NAME`], which this process keeps open: the claim lasts
//!   until the process exits or that connection drops. Every claim is a round trip
//!   (`pg_try_advisory_lock` again, which a session holding the lock always wins) bounded by
//!   [`CLAIM_TIMEOUT`], so a claim is never reported held on the word of a connection that
//!   may be dead; a failed one drops the connection, and the next claim opens a new one.
//!
//! Schema migrations are applied at connect (see [`SCHEMA_VERSION`] and
//! [`MIGRATION_LOCK_KEY`]); the tables are `dqkd_schema_migrations`, `dqkd_meta` (the KEK check
//! value), `dqkd_keys` (keys for SAEs) and `dqkd_pool_keys` (ready keys of every link).
//!
//! [`KeyStore::pending`] is answered from memory and is **approximate across replicas**: this
//! process's own commits show at once, other replicas' within one refresh interval (1 s by
//! default, [`Options::refresh`]).
//!
//! Transport: with [`Options::tls`] every connection (the pool's and the one holding pool
//! claims) is TLS, required and verified by the given rustls configuration (chain and host
//! name); without it, plaintext, which only a trusted network or a loopback connection makes
//! acceptable (key bytes are sealed under the KEK either way, but SAE IDs and the database
//! password are not). [`url_transport`] tells a caller where a URL leads, to refuse plaintext
//! to a remote host. Connection parameters come from a `postgres://` URL or a `key=value`
//! string as accepted by `tokio-postgres` (`sslmode` is `disable`, `prefer` or `require`; one
//! that contradicts the TLS setting is refused). The administrative helpers
//! ([`create_database_if_missing`], [`drop_database`]), made for local tools, are plaintext.
//!
//! ```no_run
//! # async fn demo() -> Result<(), dqkd_store::StoreError> {
//! use dqkd_store::{Kek, KeyStore};
//! use dqkd_store_postgres::PostgresStore;
//!
//! let kek = Kek::generate()?;
//! let store = PostgresStore::connect("postgres://dqkd@db.example/dqkd", kek, 16).await?;
//! println!("{} keys for bob", store.pending("alice", "bob"));
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admin;
mod claims;
mod columns;
mod counts;
mod error;
mod inflight;
mod keys;
mod pools;
mod schema;
mod tables;
mod transport;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod};
use dqkd_store::{
    DeliveredKey, InFlight, Kek, KeyStore, NewKey, PoolGrant, PoolKey, ReadyKey, StoreError,
    TakeError,
};
use tokio::task::JoinHandle;
use uuid::Uuid;

pub use crate::admin::{create_database_if_missing, drop_database};
use crate::claims::Claims;
pub use crate::claims::{CLAIM_APPLICATION_NAME, CLAIM_TIMEOUT, POOL_CLAIM_KEY_SQL};
use crate::counts::Counts;
use crate::error::{db, pool};
pub use crate::schema::{MIGRATION_LOCK_KEY, SCHEMA_VERSION};
use crate::tables::Tables;
use crate::transport::Connector;
pub use crate::transport::{url_tcp_endpoints, url_transport, UrlTransport, WrittenSslMode};
pub use rustls::ClientConfig as TlsConfig;

/// Tuning of a [`PostgresStore`]; start from [`Options::new`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// Most connections open at once (at least 1). Each in-flight operation holds one for
    /// its transaction.
    pub pool_size: usize,
    /// How often the pending counts are reloaded from the database (default 1 s).
    pub refresh: Duration,
    /// TLS for every connection (required, no plaintext fallback), verified by this
    /// configuration; `None`: plaintext. See [`Options::tls`].
    pub tls: Option<Arc<TlsConfig>>,
}

impl Options {
    /// `pool_size` connections (0 is treated as 1), counts refreshed every second.
    pub fn new(pool_size: usize) -> Self {
        Options {
            pool_size: pool_size.max(1),
            refresh: Duration::from_secs(1),
            tls: None,
        }
    }

    /// Connects over TLS only, with `config` verifying the server (build it with
    /// `dqkd_pki::database_client_config`, which checks the chain and the host name). A URL
    /// with `sslmode=disable` or `prefer` is then refused; without TLS, one with
    /// `sslmode=require` is.
    pub fn tls(mut self, config: TlsConfig) -> Self {
        self.tls = Some(Arc::new(config));
        self
    }

    /// Sets the pending-count refresh interval (at least 10 ms).
    pub fn refresh(mut self, every: Duration) -> Self {
        self.refresh = every.max(Duration::from_millis(10));
        self
    }
}

/// Key store on a PostgreSQL database shared by every KME replica of a site.
///
/// The operations live by table: ordinary keys in `keys`, ready keys in `pools`, in-flight
/// records in `inflight`, pool claims in `claims`; this type only connects and dispatches.
pub struct PostgresStore {
    tables: Tables,
    claims: Claims,
    refresher: JoinHandle<()>,
    database: String,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

impl PostgresStore {
    /// Connects with `pool_size` connections and the default [`Options`]. See
    /// [`PostgresStore::connect_with`].
    pub async fn connect(url: &str, kek: Kek, pool_size: usize) -> Result<Self, StoreError> {
        Self::connect_with(url, kek, Options::new(pool_size)).await
    }

    /// Connects to the database at `url`, applies missing schema migrations, checks `kek`
    /// against the KEK check value stored there (writing it on first use), loads the pending
    /// counts and starts their background refresh (so it must run inside a tokio runtime).
    ///
    /// Fails with [`StoreError::WrongKekDatabase`] if the database was set up with another
    /// KEK, [`StoreError::Schema`] if a newer build migrated it, and
    /// [`StoreError::Database`] if the server cannot be reached or refuses.
    pub async fn connect_with(url: &str, kek: Kek, options: Options) -> Result<Self, StoreError> {
        let cipher = kek.cipher()?;
        drop(kek);
        let mut config = transport::parse(url)?;
        let connector = Connector::new(&mut config, url, options.tls.clone())?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("dqkd");
        }
        let database = describe(&config);
        let manager = connector.manager(
            config.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .build()
            .map_err(|e| StoreError::Database {
                context: "building the connection pool".into(),
                cause: Box::new(e),
            })?;
        schema::prepare(&pool, &cipher, &database).await?;
        warn_if_not_durable(&pool, &database).await?;
        let counts = Arc::new(Counts::default());
        counts.refresh(&pool).await?;
        let refresher = tokio::spawn(refresh_loop(
            pool.clone(),
            Arc::clone(&counts),
            options.refresh,
        ));
        tracing::info!(%database, pool_size = options.pool_size, tls = options.tls.is_some(),
            "key store connected");
        Ok(PostgresStore {
            tables: Tables {
                pool,
                cipher,
                counts,
            },
            claims: Claims {
                config,
                connector,
                database: database.clone(),
                client: tokio::sync::Mutex::default(),
            },
            refresher,
            database,
        })
    }

    /// Reloads the pending counts from the database now (the background task does this every
    /// refresh interval).
    pub async fn refresh_pending(&self) -> Result<(), StoreError> {
        self.tables.counts.refresh(&self.tables.pool).await
    }

    /// The database, as host, port and name (never a password).
    pub fn database(&self) -> &str {
        &self.database
    }
}

/// Host, port and database name of a connection configuration, for messages (no password).
fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let name = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("postgres://{host}:{port}/{name}")
}

async fn refresh_loop(pool: Pool, counts: Arc<Counts>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if let Err(e) = counts.refresh(&pool).await {
            tracing::warn!(error = %e, "refreshing pending key counts failed; keeping the old ones");
        }
    }
}

async fn warn_if_not_durable(pool_: &Pool, database: &str) -> Result<(), StoreError> {
    let client = pool_
        .get()
        .await
        .map_err(pool("connecting to the key database"))?;
    let row = client
        .query_one("SELECT current_setting('synchronous_commit')", &[])
        .await
        .map_err(db("reading synchronous_commit"))?;
    let setting: String = row.try_get(0).map_err(db("reading synchronous_commit"))?;
    if setting == "off" {
        tracing::warn!(
            %database,
            "synchronous_commit is off: a committed key delivery can be lost in a server crash"
        );
    }
    Ok(())
}

#[async_trait::async_trait]
impl KeyStore for PostgresStore {
    async fn insert_answering(
        &self,
        keys: Vec<NewKey>,
        answered: Option<Uuid>,
    ) -> Result<(), StoreError> {
        keys::insert(&self.tables, keys, answered).await
    }

    async fn take(
        &self,
        caller: &str,
        masters: &[String],
        ids: &[Uuid],
        now: u64,
    ) -> Result<Vec<DeliveredKey>, TakeError> {
        keys::take(&self.tables, caller, masters, ids, now).await
    }

    fn pending(&self, master: &str, slave: &str) -> u64 {
        self.tables.counts.get(master, slave)
    }

    async fn purge_expired(&self, now: u64) -> Result<u64, StoreError> {
        keys::purge_expired(&self.tables, now).await
    }

    async fn destroy(&self, ids: &[Uuid]) -> Result<u64, StoreError> {
        match keys::destroy(&self.tables, ids, None).await {
            Ok(count) => Ok(count),
            Err(TakeError::Store(e)) => Err(e),
            // Invariant: only a destroy on behalf of masters is checked, so only it is refused.
            Err(refused) => unreachable!("a destroy for any master was refused: {refused}"),
        }
    }

    async fn destroy_of(&self, masters: &[String], ids: &[Uuid]) -> Result<u64, TakeError> {
        keys::destroy(&self.tables, ids, Some(masters)).await
    }

    async fn pool_insert(&self, link: &str, keys: Vec<PoolKey>) -> Result<(), StoreError> {
        pools::insert(&self.tables, link, keys).await
    }

    async fn pool_bind_answering(
        &self,
        link: &str,
        grants: Vec<PoolGrant>,
        now: u64,
        answered: Option<Uuid>,
    ) -> Result<Vec<DeliveredKey>, TakeError> {
        pools::bind(&self.tables, link, grants, now, answered).await
    }

    async fn record_in_flight(&self, request: InFlight) -> Result<(), StoreError> {
        inflight::record(&self.tables, request).await
    }

    async fn in_flight(&self, owner: &str) -> Result<Vec<InFlight>, StoreError> {
        inflight::of_owner(&self.tables, owner).await
    }

    async fn forget_in_flight(&self, request_ids: &[Uuid]) -> Result<(), StoreError> {
        inflight::forget(&self.tables, request_ids).await
    }

    async fn pool_remove(&self, link: &str, seqs: &[u64]) -> Result<u64, StoreError> {
        pools::remove(&self.tables, link, seqs).await
    }

    async fn claim_pool(&self, link: &str) -> Result<bool, StoreError> {
        self.claims.claim(link).await
    }

    async fn pool_page(
        &self,
        link: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<ReadyKey>, StoreError> {
        pools::page(&self.tables, link, after, limit).await
    }
}
