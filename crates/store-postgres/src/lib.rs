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
//! * An answer leaves only after `COMMIT` returned, which is durable when the server runs with
//!   its defaults (`fsync = on`, `synchronous_commit = on`); a warning is logged at connect if
//!   `synchronous_commit` is off.
//!
//! Schema migrations are applied at connect (see [`SCHEMA_VERSION`] and
//! [`MIGRATION_LOCK_KEY`]); the tables are `dqkd_schema_migrations`, `dqkd_meta` (the KEK check
//! value) and `dqkd_keys`.
//!
//! [`KeyStore::pending`] is answered from memory and is **approximate across replicas**: this
//! process's own commits show at once, other replicas' within one refresh interval (1 s by
//! default, [`Options::refresh`]).
//!
//! Limits: the connection to the database is not encrypted (`NoTls`), so the server must be on
//! a trusted network (key bytes are sealed under the KEK either way, but SAE IDs and the
//! database password are not). Connection parameters come from a `postgres://` URL or a
//! `key=value` string as accepted by `tokio-postgres`.
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

mod counts;
mod error;
mod schema;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use dqkd_store::rules::{check_insert, check_take, KeyMeta};
use dqkd_store::seal::{Cipher, Record};
use dqkd_store::{DeliveredKey, Kek, KeyStore, NewKey, StoreError, TakeError};
use futures_util::future::try_join_all;
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use uuid::Uuid;

use crate::counts::{Counts, Delta};
use crate::error::{db, pool};
pub use crate::schema::{MIGRATION_LOCK_KEY, SCHEMA_VERSION};

/// Tuning of a [`PostgresStore`]; start from [`Options::new`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// Most connections open at once (at least 1). Each in-flight operation holds one for
    /// its transaction.
    pub pool_size: usize,
    /// How often the pending counts are reloaded from the database (default 1 s).
    pub refresh: Duration,
}

impl Options {
    /// `pool_size` connections (0 is treated as 1), counts refreshed every second.
    pub fn new(pool_size: usize) -> Self {
        Options {
            pool_size: pool_size.max(1),
            refresh: Duration::from_secs(1),
        }
    }

    /// Sets the pending-count refresh interval (at least 10 ms).
    pub fn refresh(mut self, every: Duration) -> Self {
        self.refresh = every.max(Duration::from_millis(10));
        self
    }
}

/// Key store on a PostgreSQL database shared by every KME replica of a site.
pub struct PostgresStore {
    pool: Pool,
    cipher: Cipher,
    counts: Arc<Counts>,
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

const INSERT: &str = "INSERT INTO dqkd_keys (id, master, expires_at, remaining, record) \
                      VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING";
const LOCK_FOR_TAKE: &str =
    "SELECT id, record FROM dqkd_keys WHERE id = ANY($1) ORDER BY id FOR UPDATE";
const DELETE_IDS: &str = "DELETE FROM dqkd_keys WHERE id = ANY($1)";
const UPDATE_TAKEN: &str = "UPDATE dqkd_keys SET record = $2, remaining = $3 WHERE id = $1";

/// `expires_at` and `now` are u64 in the API and `bigint` in the table; instants past
/// `i64::MAX` seconds (about 292 billion years) are stored as `i64::MAX`.
fn to_db_time(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
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

/// Creates database `name` on the server of `admin_url` unless it exists. For tools that
/// give each local site its own database (`dqkd up --postgres`, `dqkd bench --postgres`);
/// production databases are made by their operators.
pub async fn create_database_if_missing(admin_url: &str, name: &str) -> Result<(), StoreError> {
    let client = admin_client(admin_url, name).await?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .map_err(db("looking up the database"))?
        .is_some();
    if !exists {
        if let Err(e) = client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
        {
            // Another process may have created it meanwhile.
            if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) {
                return Err(db("creating the database")(e));
            }
        }
    }
    Ok(())
}

/// Drops database `name` on the server of `admin_url`, closing its connections.
pub async fn drop_database(admin_url: &str, name: &str) -> Result<(), StoreError> {
    let client = admin_client(admin_url, name).await?;
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .map_err(db("dropping the database"))
}

/// An administrative connection, after checking that `name` is a plain identifier (it is
/// spliced into DDL, which takes no parameters).
async fn admin_client(admin_url: &str, name: &str) -> Result<tokio_postgres::Client, StoreError> {
    let plain = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if !plain {
        return Err(StoreError::Database {
            context: format!("database name {name:?} must be 1-63 of a-z 0-9 _"),
            source: Box::new(std::io::Error::other("invalid database name")),
        });
    }
    let (client, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .map_err(db("connecting to the PostgreSQL server"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "administrative connection ended");
        }
    });
    Ok(client)
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
        let mut config: tokio_postgres::Config =
            url.parse().map_err(db("parsing the key database URL"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("dqkd");
        }
        let database = describe(&config);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .build()
            .map_err(|e| StoreError::Database {
                context: "building the connection pool".into(),
                source: Box::new(e),
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
        tracing::info!(%database, pool_size = options.pool_size, "key store connected");
        Ok(PostgresStore {
            pool,
            cipher,
            counts,
            refresher,
            database,
        })
    }

    /// Reloads the pending counts from the database now (the background task does this every
    /// refresh interval).
    pub async fn refresh_pending(&self) -> Result<(), StoreError> {
        self.counts.refresh(&self.pool).await
    }

    /// The database, as host, port and name (never a password).
    pub fn database(&self) -> &str {
        &self.database
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(pool("getting a key database connection"))
    }

    /// Commits `txn` and applies `deltas` to the counts, ordered against refresh snapshots.
    async fn commit(
        &self,
        txn: deadpool_postgres::Transaction<'_>,
        deltas: Vec<Delta>,
        context: &'static str,
    ) -> Result<(), StoreError> {
        let _gate = self.counts.commit_gate().await;
        txn.commit().await.map_err(db(context))?;
        self.counts.apply(deltas);
        Ok(())
    }
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

fn decode(id: Uuid, bytes: &[u8]) -> Result<Record, StoreError> {
    Record::decode(bytes).map_err(|reason| StoreError::CorruptRecord { id, reason })
}

#[async_trait::async_trait]
impl KeyStore for PostgresStore {
    async fn insert(&self, keys: Vec<NewKey>) -> Result<(), StoreError> {
        check_insert(&keys, |_| Ok::<_, std::convert::Infallible>(false))
            .unwrap_or_else(|never| match never {})?;
        // Seal and encode everything before touching the database.
        let mut rows = Vec::with_capacity(keys.len());
        for k in &keys {
            let record = Record::seal(&self.cipher, k)?;
            let bytes = record
                .encode()
                .map_err(|reason| StoreError::InvalidKey { id: k.id, reason })?;
            rows.push((k.id, record, bytes));
        }
        drop(keys);
        let mut client = self.client().await?;
        let txn = client
            .transaction()
            .await
            .map_err(db("starting an insert"))?;
        let stmt = txn
            .prepare_cached(INSERT)
            .await
            .map_err(db("preparing an insert"))?;
        let written = try_join_all(rows.iter().map(|(id, record, bytes)| {
            let meta = record.meta();
            let remaining: Vec<&str> = meta.remaining().collect();
            let (txn, stmt) = (&txn, &stmt);
            async move {
                txn.execute(
                    stmt,
                    &[
                        id,
                        &meta.master(),
                        &to_db_time(meta.expires_at()),
                        &remaining,
                        bytes,
                    ],
                )
                .await
            }
        }))
        .await
        .map_err(db("inserting keys"))?;
        if let Some((id, _, _)) = rows
            .iter()
            .zip(&written)
            .find(|(_, n)| **n == 0)
            .map(|(r, _)| r)
        {
            // Dropping the transaction rolls it back: none of the batch is stored.
            return Err(StoreError::DuplicateId { id: *id });
        }
        let deltas = rows
            .into_iter()
            .map(|(_, record, _)| Delta::Add(record.meta().clone()))
            .collect();
        self.commit(txn, deltas, "committing an insert").await
    }

    async fn take(
        &self,
        caller: &str,
        masters: &[String],
        ids: &[Uuid],
        now: u64,
    ) -> Result<Vec<DeliveredKey>, TakeError> {
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(db("starting a take"))?;
        let stmt = txn
            .prepare_cached(LOCK_FOR_TAKE)
            .await
            .map_err(db("preparing a take"))?;
        let locked = txn
            .query(&stmt, &[&ids])
            .await
            .map_err(db("locking keys for a take"))?;
        let mut found = HashMap::with_capacity(locked.len());
        for row in &locked {
            let id: Uuid = row.try_get(0).map_err(db("reading a key record"))?;
            let bytes: &[u8] = row.try_get(1).map_err(db("reading a key record"))?;
            found.insert(id, decode(id, bytes)?);
        }
        let metas: Vec<Option<&KeyMeta>> = ids
            .iter()
            .map(|id| found.get(id).map(Record::meta))
            .collect();
        // On refusal the transaction is dropped, which rolls it back and releases the locks.
        check_take(caller, masters, ids, &metas, now)?;

        let mut delivered = Vec::with_capacity(ids.len());
        let mut deleted = Vec::new();
        let mut updated = Vec::new();
        let mut deltas = Vec::with_capacity(ids.len());
        for id in ids {
            // check_take saw every id present and distinct.
            let mut record = found.remove(id).ok_or(TakeError::NotFound)?;
            delivered.push(DeliveredKey {
                id: *id,
                material: record.open(&self.cipher, *id)?,
            });
            deltas.push(Delta::Taken {
                master: record.meta().master().to_owned(),
                slave: caller.to_owned(),
            });
            if record.meta_mut().mark_taken(caller) {
                deleted.push(*id);
            } else {
                let bytes = record
                    .encode()
                    .map_err(|reason| StoreError::InvalidKey { id: *id, reason })?;
                let remaining: Vec<String> = record.meta().remaining().map(str::to_owned).collect();
                updated.push((*id, bytes, remaining));
            }
        }
        if !deleted.is_empty() {
            let stmt = txn
                .prepare_cached(DELETE_IDS)
                .await
                .map_err(db("preparing a delete"))?;
            txn.execute(&stmt, &[&deleted])
                .await
                .map_err(db("deleting delivered keys"))?;
        }
        if !updated.is_empty() {
            let stmt = txn
                .prepare_cached(UPDATE_TAKEN)
                .await
                .map_err(db("preparing an update"))?;
            try_join_all(updated.iter().map(|(id, bytes, remaining)| {
                let (txn, stmt) = (&txn, &stmt);
                async move { txn.execute(stmt, &[id, bytes, remaining]).await }
            }))
            .await
            .map_err(db("marking keys delivered"))?;
        }
        self.commit(txn, deltas, "committing a take").await?;
        Ok(delivered)
    }

    fn pending(&self, master: &str, slave: &str) -> u64 {
        self.counts.get(master, slave)
    }

    async fn purge_expired(&self, now: u64) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let txn = client.transaction().await.map_err(db("starting a purge"))?;
        // Rows locked by an in-flight take are skipped; the next purge removes them if they
        // are still there.
        let rows = txn
            .query(
                "DELETE FROM dqkd_keys WHERE id IN ( \
                     SELECT id FROM dqkd_keys WHERE expires_at <= $1 \
                     ORDER BY id FOR UPDATE SKIP LOCKED) \
                 RETURNING id, record",
                &[&to_db_time(now)],
            )
            .await
            .map_err(db("purging expired keys"))?;
        let deltas = deleted_deltas(&rows)?;
        self.commit(txn, deltas, "committing a purge").await?;
        Ok(rows.len() as u64)
    }

    async fn destroy(&self, ids: &[Uuid]) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let txn = client
            .transaction()
            .await
            .map_err(db("starting a destroy"))?;
        // Lock in ID order first, like take, so a destroy and a take cannot deadlock.
        txn.query(
            "SELECT id FROM dqkd_keys WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            &[&ids],
        )
        .await
        .map_err(db("locking keys to destroy"))?;
        let rows = txn
            .query(
                "DELETE FROM dqkd_keys WHERE id = ANY($1) RETURNING id, record",
                &[&ids],
            )
            .await
            .map_err(db("destroying keys"))?;
        let deltas = deleted_deltas(&rows)?;
        self.commit(txn, deltas, "committing a destroy").await?;
        Ok(rows.len() as u64)
    }
}

/// Count changes for deleted rows (`id, record`). A record that does not decode is still
/// deleted (it is being shredded) and leaves the counts to the next refresh.
fn deleted_deltas(rows: &[tokio_postgres::Row]) -> Result<Vec<Delta>, StoreError> {
    let mut deltas = Vec::with_capacity(rows.len());
    for row in rows {
        let id: Uuid = row.try_get(0).map_err(db("reading a deleted key"))?;
        let bytes: &[u8] = row.try_get(1).map_err(db("reading a deleted key"))?;
        match Record::decode(bytes) {
            Ok(record) => deltas.push(Delta::Remove(record.meta().clone())),
            Err(reason) => tracing::warn!(key_id = %id, %reason, "deleted a corrupt key record"),
        }
    }
    Ok(deltas)
}
