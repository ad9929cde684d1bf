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
//! * Ready keys (`pool_insert`) live in a table of their own, sealed like ordinary keys with
//!   the link name in place of the master. No unique index spans both tables, so a pool insert
//!   also claims its IDs in `dqkd_keys` with placeholder rows that it deletes before `COMMIT`,
//!   and `insert` looks its IDs up among the ready keys after writing them: an insert and a pool
//!   insert of one ID, even on two replicas, never both succeed.
//! * `pool_bind` deletes the ready keys (`DELETE … RETURNING`, rows locked in ID order) and
//!   writes the ordinary keys in the same transaction, so a concurrent bind of the same key
//!   waits for it and then finds the key gone. `destroy` deletes ready keys before ordinary
//!   ones, so a bind racing it either loses or has made a key that `destroy` then deletes.
//! * An answer leaves only after `COMMIT` returned, which is durable when the server runs with
//!   its defaults (`fsync = on`, `synchronous_commit = on`); a warning is logged at connect if
//!   `synchronous_commit` is off.
//!
//! Schema migrations are applied at connect (see [`SCHEMA_VERSION`] and
//! [`MIGRATION_LOCK_KEY`]); the tables are `dqkd_schema_migrations`, `dqkd_meta` (the KEK check
//! value), `dqkd_keys` (keys for SAEs) and `dqkd_pool_keys` (ready keys of every link).
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

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use dqkd_store::rules::{
    check_insert, check_pool_insert, check_take, pool_bind_ids, pool_bound_keys, KeyMeta,
};
use dqkd_store::seal::{Cipher, Record};
use dqkd_store::{DeliveredKey, Kek, KeyStore, NewKey, PoolGrant, PoolKey, StoreError, TakeError};
use futures_util::future::{try_join, try_join_all};
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
/// Which of the IDs `$1` are ready keys (an ID is never both a key and a ready key).
const IN_POOLS: &str = "SELECT id FROM dqkd_pool_keys WHERE id = ANY($1)";
/// Stores ready keys of link `$1`; returns the IDs written (the others already were ready).
const POOL_INSERT: &str = "INSERT INTO dqkd_pool_keys (id, link, expires_at, record) \
                           SELECT id, $1::text, expires_at, record \
                           FROM unnest($2::uuid[], $3::bigint[], $4::bytea[]) \
                               AS k (id, expires_at, record) \
                           ON CONFLICT (id) DO NOTHING RETURNING id";
/// Claims IDs `$1` in `dqkd_keys` with placeholder rows (deleted again before commit); returns
/// the IDs claimed (the others are keys, or being inserted as keys by a transaction that
/// then committed).
const CLAIM_KEY_IDS: &str = "INSERT INTO dqkd_keys (id, master, expires_at, remaining, record) \
                             SELECT id, '', 0, '{}', '' FROM unnest($1::uuid[]) AS id \
                             ON CONFLICT (id) DO NOTHING RETURNING id";
/// Moves ready keys `$2` of link `$1` unexpired at `$3` out of the pool, locking them in ID
/// order first (like take) so that overlapping binds cannot deadlock.
const POOL_TAKE: &str = "DELETE FROM dqkd_pool_keys WHERE id IN ( \
                             SELECT id FROM dqkd_pool_keys \
                             WHERE id = ANY($2) AND link = $1 AND expires_at > $3 \
                             ORDER BY id FOR UPDATE) \
                         RETURNING id, record";
/// The ready keys of link `$1`, soonest expiry first (then by ID, which PostgreSQL compares
/// bytewise like [`Uuid`]'s `Ord`). The record is fetched only for expiries stored clamped
/// (`$2` = `i64::MAX`), whose exact value only the record holds.
const POOL_LIST: &str = "SELECT id, expires_at, CASE WHEN expires_at = $2 THEN record END \
                         FROM dqkd_pool_keys WHERE link = $1 ORDER BY expires_at, id";

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

    /// Seals and encodes keys that passed [`check_insert`], all before the database is
    /// touched, so a key that cannot be stored fails the batch without a round trip.
    fn seal_keys(&self, keys: &[NewKey]) -> Result<Vec<Sealed>, StoreError> {
        keys.iter()
            .map(|k| {
                let record = Record::seal(&self.cipher, k)?;
                let bytes = record
                    .encode()
                    .map_err(|reason| StoreError::InvalidKey { id: k.id, reason })?;
                Ok(Sealed {
                    id: k.id,
                    record,
                    bytes,
                })
            })
            .collect()
    }
}

/// A key sealed and encoded for `dqkd_keys`; the record is kept for the count deltas.
struct Sealed {
    id: Uuid,
    record: Record,
    bytes: Vec<u8>,
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

/// Writes sealed keys into `dqkd_keys` inside `txn`. On [`StoreError::DuplicateId`] (the first
/// key, in batch order, whose ID is already a key or a ready key) the caller drops `txn`,
/// which rolls it back: none of the batch is stored.
///
/// `ON CONFLICT DO NOTHING` tells which ID already was a key. Ready keys live in another
/// table, so they are looked up separately, and only after every insert finished: an insert
/// racing a `pool_insert` of the same ID waits on that transaction's claim of the ID in
/// `dqkd_keys` (see [`CLAIM_KEY_IDS`]), and this later statement, with a fresh snapshot, then
/// sees its ready key committed. One of the two always fails.
async fn write_keys(
    txn: &deadpool_postgres::Transaction<'_>,
    rows: &[Sealed],
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let stmt = txn
        .prepare_cached(INSERT)
        .await
        .map_err(db("preparing an insert"))?;
    let written = try_join_all(rows.iter().map(|row| {
        let meta = row.record.meta();
        let remaining: Vec<&str> = meta.remaining().collect();
        let stmt = &stmt;
        async move {
            txn.execute(
                stmt,
                &[
                    &row.id,
                    &meta.master(),
                    &to_db_time(meta.expires_at()),
                    &remaining,
                    &row.bytes,
                ],
            )
            .await
        }
    }))
    .await
    .map_err(db("inserting keys"))?;
    let stmt = txn
        .prepare_cached(IN_POOLS)
        .await
        .map_err(db("preparing a pool lookup"))?;
    let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
    let ready = txn
        .query(&stmt, &[&ids])
        .await
        .map_err(db("looking up new key IDs among the ready keys"))?;
    let ready = ids_of(&ready, "looking up new key IDs among the ready keys")?;
    match rows
        .iter()
        .zip(&written)
        .find(|(row, n)| **n == 0 || ready.contains(&row.id))
    {
        Some((row, _)) => Err(StoreError::DuplicateId { id: row.id }),
        None => Ok(()),
    }
}

#[async_trait::async_trait]
impl KeyStore for PostgresStore {
    async fn insert(&self, keys: Vec<NewKey>) -> Result<(), StoreError> {
        check_insert(&keys, |_| Ok::<_, std::convert::Infallible>(false))
            .unwrap_or_else(|never| match never {})?;
        let rows = self.seal_keys(&keys)?;
        drop(keys);
        let mut client = self.client().await?;
        let txn = client
            .transaction()
            .await
            .map_err(db("starting an insert"))?;
        write_keys(&txn, &rows).await?;
        let deltas = rows
            .into_iter()
            .map(|row| Delta::Add(row.record.meta().clone()))
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
        // Rows locked by an in-flight take or bind are skipped; the next purge removes them if
        // they are still there.
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
        let ready = txn
            .execute(
                "DELETE FROM dqkd_pool_keys WHERE id IN ( \
                     SELECT id FROM dqkd_pool_keys WHERE expires_at <= $1 \
                     ORDER BY id FOR UPDATE SKIP LOCKED)",
                &[&to_db_time(now)],
            )
            .await
            .map_err(db("purging expired ready keys"))?;
        let deltas = deleted_deltas(&rows)?;
        self.commit(txn, deltas, "committing a purge").await?;
        Ok(rows.len() as u64 + ready)
    }

    async fn destroy(&self, ids: &[Uuid]) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let txn = client
            .transaction()
            .await
            .map_err(db("starting a destroy"))?;
        // Ready keys first: a bind of one of these IDs that holds its row either commits
        // before this statement goes on, and the key it made is a row the statements below
        // see (each takes a fresh snapshot), or finds the row gone. Either way no key of
        // `ids` survives. Locked in ID order, like a bind, so the two cannot deadlock.
        let ready = txn
            .execute(
                "DELETE FROM dqkd_pool_keys WHERE id IN ( \
                     SELECT id FROM dqkd_pool_keys WHERE id = ANY($1) ORDER BY id FOR UPDATE)",
                &[&ids],
            )
            .await
            .map_err(db("destroying ready keys"))?;
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
        Ok(rows.len() as u64 + ready)
    }

    async fn pool_insert(&self, link: &str, keys: Vec<PoolKey>) -> Result<(), StoreError> {
        // Distinct IDs and valid keys here; IDs already stored are found by the database,
        // in the same transaction as the write, like `insert` does.
        check_pool_insert(link, &keys, |_| Ok::<_, std::convert::Infallible>(false))
            .unwrap_or_else(|never| match never {})?;
        if keys.is_empty() {
            return Ok(());
        }
        // Sealed like an ordinary key whose master is the link and which has no slaves, so
        // the link is bound into the seal and a record moved to another pool does not open.
        let mut ids = Vec::with_capacity(keys.len());
        let mut expiries = Vec::with_capacity(keys.len());
        let mut records = Vec::with_capacity(keys.len());
        for k in keys {
            let key = NewKey {
                id: k.id,
                master: link.to_owned(),
                slaves: Vec::new(),
                material: k.material,
                expires_at: k.expires_at,
            };
            let bytes = Record::seal(&self.cipher, &key)?
                .encode()
                .map_err(|reason| StoreError::InvalidKey { id: key.id, reason })?;
            ids.push(key.id);
            expiries.push(to_db_time(key.expires_at));
            records.push(bytes);
        }
        let mut client = self.client().await?;
        let txn = client
            .transaction()
            .await
            .map_err(db("starting a pool insert"))?;
        let insert = txn
            .prepare_cached(POOL_INSERT)
            .await
            .map_err(db("preparing a pool insert"))?;
        let claim = txn
            .prepare_cached(CLAIM_KEY_IDS)
            .await
            .map_err(db("preparing a pool insert"))?;
        // No unique index spans both tables, so the IDs are also claimed in `dqkd_keys`: that
        // finds the IDs that are keys, and makes a concurrent insert of the same ID wait for
        // this transaction (see `write_keys`). Both statements are pipelined; their order
        // does not matter, as both take effect only at commit.
        let (written, claimed) = try_join(
            async {
                txn.query(&insert, &[&link, &ids, &expiries, &records])
                    .await
                    .map_err(db("inserting ready keys"))
            },
            async {
                txn.query(&claim, &[&ids])
                    .await
                    .map_err(db("claiming ready key IDs among the keys"))
            },
        )
        .await?;
        drop(records);
        let written = ids_of(&written, "inserting ready keys")?;
        let claimed = ids_of(&claimed, "claiming ready key IDs among the keys")?;
        if let Some(id) = ids
            .iter()
            .find(|id| !written.contains(id) || !claimed.contains(id))
        {
            // Dropping the transaction rolls it back: none of the batch is stored.
            return Err(StoreError::DuplicateId { id: *id });
        }
        // Every row with these IDs in `dqkd_keys` is a placeholder of this transaction.
        let release = txn
            .prepare_cached(DELETE_IDS)
            .await
            .map_err(db("preparing a delete"))?;
        txn.execute(&release, &[&ids])
            .await
            .map_err(db("releasing ready key IDs among the keys"))?;
        // Ready keys change no pending count, so the count gate is not needed.
        txn.commit().await.map_err(db("committing a pool insert"))
    }

    async fn pool_bind(
        &self,
        link: &str,
        grants: Vec<PoolGrant>,
        now: u64,
    ) -> Result<Vec<DeliveredKey>, TakeError> {
        let ids = pool_bind_ids(&grants)?;
        let mut client = self.client().await?;
        let txn = client
            .transaction()
            .await
            .map_err(db("starting a pool bind"))?;
        let stmt = txn
            .prepare_cached(POOL_TAKE)
            .await
            .map_err(db("preparing a pool bind"))?;
        // The row locks of this DELETE make a concurrent bind of the same IDs wait for this
        // transaction, then find the rows gone (or, after a rollback, take them itself): two
        // binds of one key never both succeed.
        let rows = txn
            .query(&stmt, &[&link, &ids, &to_db_time(now)])
            .await
            .map_err(db("taking ready keys out of a pool"))?;
        // On refusal the transaction is dropped, which rolls it back and restores the pool.
        if rows.len() != ids.len() {
            return Err(TakeError::NotFound);
        }
        let mut material = HashMap::with_capacity(rows.len());
        for row in &rows {
            let id: Uuid = row.try_get(0).map_err(db("reading a ready key record"))?;
            let bytes: &[u8] = row.try_get(1).map_err(db("reading a ready key record"))?;
            let record = decode(id, bytes)?;
            // The record, sealed with its link, is the authority; the columns only find it.
            if record.meta().master() != link {
                return Err(StoreError::Crypto {
                    context: format!("opening ready key {id}: it was sealed for another pool"),
                }
                .into());
            }
            if record.meta().expires_at() <= now {
                return Err(TakeError::NotFound);
            }
            material.insert(id, record.open(&self.cipher, id)?);
        }
        let bound = pool_bound_keys(&grants, |id| material.get(&id).cloned())?;
        check_insert(&bound, |_| Ok::<_, std::convert::Infallible>(false))
            .unwrap_or_else(|never| match never {})?;
        let sealed = self.seal_keys(&bound)?;
        drop(bound);
        write_keys(&txn, &sealed).await?;
        let delivered = ids
            .iter()
            .map(|id| {
                material
                    .remove(id)
                    .map(|material| DeliveredKey { id: *id, material })
            })
            .collect::<Option<Vec<_>>>()
            // Every ID was returned by the DELETE, as the length check showed.
            .ok_or(TakeError::NotFound)?;
        let deltas = sealed
            .into_iter()
            .map(|row| Delta::Add(row.record.meta().clone()))
            .collect();
        self.commit(txn, deltas, "committing a pool bind").await?;
        Ok(delivered)
    }

    async fn pool_list(&self, link: &str) -> Result<Vec<(Uuid, u64)>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(POOL_LIST)
            .await
            .map_err(db("preparing a pool listing"))?;
        let rows = client
            .query(&stmt, &[&link, &i64::MAX])
            .await
            .map_err(db("listing ready keys"))?;
        let mut ready = Vec::with_capacity(rows.len());
        let mut clamped = false;
        for row in &rows {
            let id: Uuid = row.try_get(0).map_err(db("reading a ready key"))?;
            let stored: i64 = row.try_get(1).map_err(db("reading a ready key"))?;
            let record: Option<&[u8]> = row.try_get(2).map_err(db("reading a ready key"))?;
            let expires_at = match record {
                Some(bytes) => {
                    clamped = true;
                    decode(id, bytes)?.meta().expires_at()
                }
                None => u64::try_from(stored).unwrap_or(0),
            };
            ready.push((id, expires_at));
        }
        if clamped {
            // Clamped expiries sort last in SQL but may differ in the records.
            ready.sort_unstable_by_key(|(id, expires_at)| (*expires_at, *id));
        }
        Ok(ready)
    }
}

/// The key IDs in the first column of `rows`.
fn ids_of(
    rows: &[tokio_postgres::Row],
    context: &'static str,
) -> Result<HashSet<Uuid>, StoreError> {
    rows.iter()
        .map(|row| row.try_get::<_, Uuid>(0))
        .collect::<Result<_, _>>()
        .map_err(db(context))
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
