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

mod counts;
mod error;
mod schema;
mod transport;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod};
use dqkd_store::rules::{
    check_destroy, check_insert, check_pool_insert, check_take, pool_bind_slots, pool_bound_keys,
    KeyMeta,
};
use dqkd_store::seal::{Cipher, Record};
use dqkd_store::{
    DeliveredKey, InFlight, Kek, KeyMaterial, KeyStore, NewKey, PoolGrant, PoolKey, ReadyKey, Slot,
    StoreError, TakeError,
};
use futures_util::future::{try_join, try_join_all};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::counts::{Counts, Delta};
use crate::error::{db, pool, PgFailure};
pub use crate::schema::{MIGRATION_LOCK_KEY, SCHEMA_VERSION};
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

/// The advisory lock key of the pool named `$1`: the first 64 bits of
/// SHA-256("dqkd pool claim:" ‖ link), so that distinct pools practically never share a lock.
pub const POOL_CLAIM_KEY_SQL: &str = "('x' || left(encode(sha256(convert_to('dqkd pool claim:' \
     || $1, 'UTF8')), 'hex'), 16))::bit(64)::bigint";

/// `application_name` of the connection that holds this process's pool claims, followed by
/// ` (pid <process ID>)`.
pub const CLAIM_APPLICATION_NAME: &str = "dqkd pool claims";

/// Longest a claim may take (connecting included) before it fails and its connection is
/// dropped: a connection that does not answer holds no claim this process can count on.
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);

/// Key store on a PostgreSQL database shared by every KME replica of a site.
pub struct PostgresStore {
    pool: Pool,
    /// Where and how to open the connection that holds pool claims.
    config: tokio_postgres::Config,
    connector: Connector,
    claims: tokio::sync::Mutex<Claims>,
    cipher: Cipher,
    counts: Arc<Counts>,
    refresher: JoinHandle<()>,
    database: String,
}

/// The connection holding this process's pool claims (`None` until the first claim and
/// after a failed one): a session-level lock lives exactly as long as its connection.
#[derive(Default)]
struct Claims {
    client: Option<tokio_postgres::Client>,
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
/// Which of the IDs `$1` are ordinary keys.
const KEY_IDS: &str = "SELECT id FROM dqkd_keys WHERE id = ANY($1)";
/// Stores ready keys of link `$1`; returns the positions written (the others were taken).
/// Rows go in position order, so two overlapping batches wait for each other's positions in
/// the same order and cannot deadlock.
const POOL_INSERT: &str = "INSERT INTO dqkd_pool_keys (link, seq, id, expires_at, record) \
                           SELECT $1::text, seq, id, expires_at, record \
                           FROM unnest($2::bigint[], $3::uuid[], $4::bigint[], $5::bytea[]) \
                               AS k (seq, id, expires_at, record) \
                           ORDER BY seq \
                           ON CONFLICT (link, seq) DO NOTHING RETURNING seq";
/// Moves the ready keys of link `$1` at positions `$2` with IDs `$3` (pairwise) and unexpired
/// at `$4` out of the pool, locking them in position order first (like take) so that
/// overlapping binds and removals cannot deadlock. A position holding another ID is not
/// returned, which refuses the bind.
const POOL_TAKE: &str = "DELETE FROM dqkd_pool_keys WHERE link = $1 AND seq IN ( \
                             SELECT p.seq FROM dqkd_pool_keys p \
                             JOIN unnest($2::bigint[], $3::uuid[]) AS s (seq, id) \
                                 ON p.seq = s.seq AND p.id = s.id \
                             WHERE p.link = $1 AND p.expires_at > $4 \
                             ORDER BY p.seq FOR UPDATE OF p) \
                         RETURNING id, record";
/// Deletes the ready keys of link `$1` at positions `$2`, locked in position order like a bind.
const POOL_REMOVE: &str = "DELETE FROM dqkd_pool_keys WHERE link = $1 AND seq IN ( \
                               SELECT seq FROM dqkd_pool_keys \
                               WHERE link = $1 AND seq = ANY($2) \
                               ORDER BY seq FOR UPDATE)";
/// At most `$4` ready keys of link `$1` after position `$3`, in position order (the primary
/// key's). The record is fetched only for expiries stored clamped (`$2` = `i64::MAX`), whose
/// exact value only the record holds.
const POOL_LIST: &str = "SELECT seq, id, expires_at, CASE WHEN expires_at = $2 THEN record END \
                         FROM dqkd_pool_keys WHERE link = $1 AND seq > $3 \
                         ORDER BY seq LIMIT $4";

/// Why a ready key is refused whose position has no `bigint` form.
const RECORD_IN_FLIGHT: &str =
    "INSERT INTO dqkd_in_flight (request_id, owner, sites, key_ids, ready) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (request_id) DO UPDATE SET owner = EXCLUDED.owner, \
     sites = EXCLUDED.sites, key_ids = EXCLUDED.key_ids, ready = EXCLUDED.ready";
const FORGET_IN_FLIGHT: &str = "DELETE FROM dqkd_in_flight WHERE request_id = $1";
const SEQ_TOO_LARGE: &str = "pool position above i64::MAX, which the PostgreSQL store cannot hold";

/// A pool position as stored. Positions are u64 in the API and `bigint` in the table; real
/// ones (nanoseconds since the Unix epoch, or smaller) are far below `i64::MAX`. A larger one
/// has no stored form: clamping or wrapping it would reorder the pool or merge positions, so
/// `None`, and nothing can be stored there.
fn to_db_seq(seq: u64) -> Option<i64> {
    i64::try_from(seq).ok()
}

/// A stored position back in API form (never negative: the table checks `seq >= 0`).
fn from_db_seq(id: Uuid, seq: i64) -> Result<u64, StoreError> {
    u64::try_from(seq).map_err(|e| StoreError::Database {
        context: format!("reading ready key {id}: negative pool position {seq}"),
        source: Box::new(e),
    })
}

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
        tracing::info!(%database, pool_size = options.pool_size, tls = options.tls.is_some(),
            "key store connected");
        Ok(PostgresStore {
            pool,
            config,
            connector,
            claims: tokio::sync::Mutex::default(),
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

    /// Opens the connection that holds this process's pool claims.
    async fn claim_connection(&self) -> Result<tokio_postgres::Client, StoreError> {
        let mut config = self.config.clone();
        config.application_name(format!(
            "{CLAIM_APPLICATION_NAME} (pid {})",
            std::process::id()
        ));
        let database = self.database.clone();
        let on_end = move |e| {
            tracing::warn!(%database, error = %PgFailure::new(e),
                "the connection holding this process's ready-key pool claims ended; \
                 they lapse until the next claim");
        };
        tokio::time::timeout(CLAIM_TIMEOUT, self.connector.connect(&config, on_end))
            .await
            .map_err(|_| claim_timed_out("connecting to hold ready-key pool claims"))?
            .map_err(db("connecting to hold ready-key pool claims"))
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

    /// Destroys `ids` (unknown ones skipped); with `masters`, only if every one that exists
    /// was made for one of them (`check_destroy`), checked on the locked rows in the same
    /// transaction, so nothing changes on a refusal.
    async fn destroy_checked(
        &self,
        ids: &[Uuid],
        masters: Option<&[String]>,
    ) -> Result<u64, TakeError> {
        let mut client = self.client().await?;
        let txn = client
            .transaction()
            .await
            .map_err(db("starting a destroy"))?;
        // Lock in ID order first, like take, so a destroy and a take cannot deadlock.
        let locked = txn
            .query(
                "SELECT id, record FROM dqkd_keys WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                &[&ids],
            )
            .await
            .map_err(db("locking keys to destroy"))?;
        let mut locked_ids = Vec::with_capacity(locked.len());
        let mut records = Vec::with_capacity(locked.len());
        for row in &locked {
            let id: Uuid = row.try_get(0).map_err(db("reading a key record"))?;
            locked_ids.push(id);
            if masters.is_some() {
                let bytes: &[u8] = row.try_get(1).map_err(db("reading a key record"))?;
                records.push(decode(id, bytes)?);
            }
        }
        if let Some(masters) = masters {
            let metas: Vec<Option<&KeyMeta>> = records.iter().map(|r| Some(r.meta())).collect();
            // On refusal the transaction is dropped, which rolls it back.
            check_destroy(masters, &metas)?;
        }
        // Only the rows locked and checked above: under READ COMMITTED a DELETE by the
        // requested IDs would also see keys committed since, which were never checked.
        let rows = txn
            .query(
                "DELETE FROM dqkd_keys WHERE id = ANY($1) RETURNING id, record",
                &[&locked_ids],
            )
            .await
            .map_err(db("destroying keys"))?;
        let deltas = deleted_deltas(&rows)?;
        self.commit(txn, deltas, "committing a destroy").await?;
        Ok(rows.len() as u64)
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

    /// Seals and encodes ready keys that passed [`check_pool_insert`] as columns for
    /// [`POOL_INSERT`], all before the database is touched. Each is sealed like an ordinary
    /// key whose master is the link and which has no slaves, so the link is bound into the
    /// seal and a record moved to another pool does not open.
    fn seal_ready(&self, link: &str, keys: Vec<PoolKey>) -> Result<ReadyBatch, StoreError> {
        let mut batch = ReadyBatch {
            seqs: Vec::with_capacity(keys.len()),
            ids: Vec::with_capacity(keys.len()),
            expiries: Vec::with_capacity(keys.len()),
            records: Vec::with_capacity(keys.len()),
        };
        for k in keys {
            let id = k.slot.id;
            let seq = to_db_seq(k.slot.seq).ok_or(StoreError::InvalidKey {
                id,
                reason: SEQ_TOO_LARGE,
            })?;
            let key = NewKey {
                id,
                master: link.to_owned(),
                slaves: Vec::new(),
                material: k.material,
                expires_at: k.expires_at,
            };
            let bytes = Record::seal(&self.cipher, &key)?
                .encode()
                .map_err(|reason| StoreError::InvalidKey { id, reason })?;
            batch.seqs.push(seq);
            batch.ids.push(id);
            batch.expiries.push(to_db_time(key.expires_at));
            batch.records.push(bytes);
        }
        Ok(batch)
    }

    /// Opens the ready keys a bind took out of the pool of `link` (rows of [`POOL_TAKE`]),
    /// by ID. The record, sealed with its link, is the authority; the columns only found it.
    fn open_ready(
        &self,
        link: &str,
        rows: &[tokio_postgres::Row],
        now: u64,
    ) -> Result<HashMap<Uuid, KeyMaterial>, TakeError> {
        let mut material = HashMap::with_capacity(rows.len());
        for row in rows {
            let id: Uuid = row.try_get(0).map_err(db("reading a ready key record"))?;
            let bytes: &[u8] = row.try_get(1).map_err(db("reading a ready key record"))?;
            let record = decode(id, bytes)?;
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
        Ok(material)
    }
}

/// Ready keys sealed for [`POOL_INSERT`], one array per column, in batch order.
struct ReadyBatch {
    seqs: Vec<i64>,
    ids: Vec<Uuid>,
    expiries: Vec<i64>,
    /// Sealed records: ciphertext only, so they need no wiping.
    records: Vec<Vec<u8>>,
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

/// Deletes the in-flight record `answered` inside `txn`, the transaction that stores the
/// origin's copy of its keys.
async fn forget_answered(
    txn: &deadpool_postgres::Transaction<'_>,
    answered: Option<Uuid>,
) -> Result<(), StoreError> {
    let Some(id) = answered else {
        return Ok(());
    };
    let stmt = txn
        .prepare_cached(FORGET_IN_FLIGHT)
        .await
        .map_err(db("preparing an answer"))?;
    txn.execute(&stmt, &[&id])
        .await
        .map_err(db("marking a request answered"))?;
    Ok(())
}

/// Writes sealed keys into `dqkd_keys` inside `txn`. On [`StoreError::DuplicateId`] (the first
/// key, in batch order, whose ID is already a key) the caller drops `txn`, which rolls it
/// back: none of the batch is stored.
///
/// `ON CONFLICT DO NOTHING` tells which ID already was a key; a concurrent write of the same
/// ID waits for this transaction on the primary key and then finds it taken (or, after a
/// rollback, writes it itself). Ready keys are not consulted: IDs are not checked across the
/// two tables any more (see the crate docs).
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
    match rows.iter().zip(&written).find(|(_, n)| **n == 0) {
        Some((row, _)) => Err(StoreError::DuplicateId { id: row.id }),
        None => Ok(()),
    }
}

#[async_trait::async_trait]
impl KeyStore for PostgresStore {
    async fn insert_answering(
        &self,
        keys: Vec<NewKey>,
        answered: Option<Uuid>,
    ) -> Result<(), StoreError> {
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
        forget_answered(&txn, answered).await?;
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
                "DELETE FROM dqkd_pool_keys WHERE (link, seq) IN ( \
                     SELECT link, seq FROM dqkd_pool_keys WHERE expires_at <= $1 \
                     ORDER BY link, seq FOR UPDATE SKIP LOCKED)",
                &[&to_db_time(now)],
            )
            .await
            .map_err(db("purging expired ready keys"))?;
        let deltas = deleted_deltas(&rows)?;
        self.commit(txn, deltas, "committing a purge").await?;
        Ok(rows.len() as u64 + ready)
    }

    async fn destroy(&self, ids: &[Uuid]) -> Result<u64, StoreError> {
        match self.destroy_checked(ids, None).await {
            Ok(count) => Ok(count),
            Err(TakeError::Store(e)) => Err(e),
            // Invariant: only a destroy on behalf of masters is checked, so only it is refused.
            Err(refused) => unreachable!("a destroy for any master was refused: {refused}"),
        }
    }

    async fn destroy_of(&self, masters: &[String], ids: &[Uuid]) -> Result<u64, TakeError> {
        self.destroy_checked(ids, Some(masters)).await
    }

    async fn pool_insert(&self, link: &str, keys: Vec<PoolKey>) -> Result<(), StoreError> {
        // Valid keys with distinct positions and IDs here; taken positions and IDs that are
        // keys are found by the database, in the same transaction as the write.
        check_pool_insert(link, &keys, |_| Ok::<_, std::convert::Infallible>(false))
            .unwrap_or_else(|never| match never {})?;
        if keys.is_empty() {
            return Ok(());
        }
        let batch = self.seal_ready(link, keys)?;
        let mut client = self.client().await?;
        let txn = client
            .transaction()
            .await
            .map_err(db("starting a pool insert"))?;
        let insert = txn
            .prepare_cached(POOL_INSERT)
            .await
            .map_err(db("preparing a pool insert"))?;
        let lookup = txn
            .prepare_cached(KEY_IDS)
            .await
            .map_err(db("preparing a key lookup"))?;
        // Pipelined: the lookup does not depend on the insert, and both count only at commit.
        let (written, keys_found) = try_join(
            async {
                txn.query(
                    &insert,
                    &[
                        &link,
                        &batch.seqs,
                        &batch.ids,
                        &batch.expiries,
                        &batch.records,
                    ],
                )
                .await
                .map_err(db("inserting ready keys"))
            },
            async {
                txn.query(&lookup, &[&batch.ids])
                    .await
                    .map_err(db("looking up ready key IDs among the keys"))
            },
        )
        .await?;
        let written = seqs_of(&written)?;
        let keys_found = ids_of(&keys_found, "looking up ready key IDs among the keys")?;
        if let Some((id, _)) = batch
            .ids
            .iter()
            .zip(&batch.seqs)
            .find(|(id, seq)| !written.contains(seq) || keys_found.contains(id))
        {
            // Dropping the transaction rolls it back: none of the batch is stored.
            return Err(StoreError::DuplicateId { id: *id });
        }
        // Ready keys change no pending count, so the count gate is not needed.
        txn.commit().await.map_err(db("committing a pool insert"))
    }

    async fn pool_bind_answering(
        &self,
        link: &str,
        grants: Vec<PoolGrant>,
        now: u64,
        answered: Option<Uuid>,
    ) -> Result<Vec<DeliveredKey>, TakeError> {
        let slots = pool_bind_slots(&grants)?;
        // A position with no `bigint` form can hold no key.
        let seqs: Vec<i64> = slots
            .iter()
            .map(|slot| to_db_seq(slot.seq))
            .collect::<Option<_>>()
            .ok_or(TakeError::NotFound)?;
        let ids: Vec<Uuid> = slots.iter().map(|slot| slot.id).collect();
        let mut client = self.client().await?;
        let txn = client
            .transaction()
            .await
            .map_err(db("starting a pool bind"))?;
        let stmt = txn
            .prepare_cached(POOL_TAKE)
            .await
            .map_err(db("preparing a pool bind"))?;
        // The row locks of this DELETE make a concurrent bind or removal of the same positions
        // wait for this transaction, then find the rows gone (or, after a rollback, take them
        // itself): two binds of one key never both succeed.
        let rows = txn
            .query(&stmt, &[&link, &seqs, &ids, &to_db_time(now)])
            .await
            .map_err(db("taking ready keys out of a pool"))?;
        // On refusal the transaction is dropped, which rolls it back and restores the pool.
        if rows.len() != slots.len() {
            return Err(TakeError::NotFound);
        }
        let mut material = self.open_ready(link, &rows, now)?;
        let bound = pool_bound_keys(&grants, |id| material.get(&id).cloned())?;
        check_insert(&bound, |_| Ok::<_, std::convert::Infallible>(false))
            .unwrap_or_else(|never| match never {})?;
        let sealed = self.seal_keys(&bound)?;
        drop(bound);
        write_keys(&txn, &sealed).await?;
        forget_answered(&txn, answered).await?;
        let delivered = ids
            .iter()
            .map(|id| {
                material
                    .remove(id)
                    .map(|material| DeliveredKey { id: *id, material })
            })
            .collect::<Option<Vec<_>>>()
            // Every slot was returned by the DELETE, as the length check showed.
            .ok_or(TakeError::NotFound)?;
        let deltas = sealed
            .into_iter()
            .map(|row| Delta::Add(row.record.meta().clone()))
            .collect();
        self.commit(txn, deltas, "committing a pool bind").await?;
        Ok(delivered)
    }

    async fn record_in_flight(&self, request: InFlight) -> Result<(), StoreError> {
        let ready: Vec<i64> = request
            .ready
            .iter()
            .map(|&seq| to_db_seq(seq))
            .collect::<Option<_>>()
            .ok_or_else(|| StoreError::Database {
                context: format!(
                    "recording request {}: a ready-key position has no stored form",
                    request.request_id
                ),
                source: "position above i64::MAX".into(),
            })?;
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(RECORD_IN_FLIGHT)
            .await
            .map_err(db("preparing an in-flight record"))?;
        client
            .execute(
                &stmt,
                &[
                    &request.request_id,
                    &request.owner,
                    &request.sites,
                    &request.key_ids,
                    &ready,
                ],
            )
            .await
            .map_err(db("recording an in-flight request"))?;
        Ok(())
    }

    async fn in_flight(&self, owner: &str) -> Result<Vec<InFlight>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT request_id, sites, key_ids, ready FROM dqkd_in_flight WHERE owner = $1",
                &[&owner],
            )
            .await
            .map_err(db("reading in-flight requests"))?;
        let read = |e| db("reading an in-flight request")(e);
        rows.iter()
            .map(|row| {
                let request_id: Uuid = row.try_get(0).map_err(read)?;
                let ready: Vec<i64> = row.try_get(3).map_err(read)?;
                Ok(InFlight {
                    request_id,
                    owner: owner.to_owned(),
                    sites: row.try_get(1).map_err(read)?,
                    key_ids: row.try_get(2).map_err(read)?,
                    ready: ready
                        .into_iter()
                        .map(|seq| from_db_seq(request_id, seq))
                        .collect::<Result<_, _>>()?,
                })
            })
            .collect()
    }

    async fn forget_in_flight(&self, request_ids: &[Uuid]) -> Result<(), StoreError> {
        if request_ids.is_empty() {
            return Ok(());
        }
        self.client()
            .await?
            .execute(
                "DELETE FROM dqkd_in_flight WHERE request_id = ANY($1)",
                &[&request_ids],
            )
            .await
            .map_err(db("forgetting in-flight requests"))?;
        Ok(())
    }

    async fn pool_remove(&self, link: &str, seqs: &[u64]) -> Result<u64, StoreError> {
        // A position with no `bigint` form holds nothing, so it is skipped like any empty one.
        let seqs: Vec<i64> = seqs.iter().copied().filter_map(to_db_seq).collect();
        if seqs.is_empty() {
            return Ok(0);
        }
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(POOL_REMOVE)
            .await
            .map_err(db("preparing a pool removal"))?;
        // One statement, committed on its own before `execute` returns, as durably as every
        // commit here. Ready keys change no pending count, so the count gate is not needed.
        client
            .execute(&stmt, &[&link, &seqs])
            .await
            .map_err(db("removing ready keys"))
    }

    async fn claim_pool(&self, link: &str) -> Result<bool, StoreError> {
        let mut claims = self.claims.lock().await;
        let client = match claims.client.take().filter(|c| !c.is_closed()) {
            Some(client) => client,
            None => self.claim_connection().await?,
        };
        let sql = format!("SELECT pg_try_advisory_lock({POOL_CLAIM_KEY_SQL})");
        let answer = tokio::time::timeout(CLAIM_TIMEOUT, client.query_one(&sql, &[&link])).await;
        match answer {
            Ok(answer) => {
                let held = answer.and_then(|row| row.try_get::<_, bool>(0));
                // A refused statement leaves the session, and the claims it holds, alive.
                if !client.is_closed() {
                    claims.client = Some(client);
                }
                held.map_err(db("claiming a ready-key pool"))
            }
            // The connection may be dead without knowing it: drop it (releasing whatever it
            // still holds on the server) and let the next claim start afresh.
            Err(_) => Err(claim_timed_out("claiming a ready-key pool")),
        }
    }

    async fn pool_page(
        &self,
        link: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<ReadyKey>, StoreError> {
        // Stored positions are never negative, so -1 starts at the beginning; a position
        // past i64::MAX has nothing after it.
        let after = match after {
            None => -1,
            Some(seq) => match to_db_seq(seq) {
                Some(seq) => seq,
                None => return Ok(Vec::new()),
            },
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(POOL_LIST)
            .await
            .map_err(db("preparing a pool listing"))?;
        let rows = client
            .query(&stmt, &[&link, &i64::MAX, &after, &limit])
            .await
            .map_err(db("listing ready keys"))?;
        rows.iter().map(ready_key).collect()
    }
}

/// A claim round trip that took longer than [`CLAIM_TIMEOUT`].
fn claim_timed_out(context: &str) -> StoreError {
    StoreError::Database {
        context: context.into(),
        source: Box::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {CLAIM_TIMEOUT:?}"),
        )),
    }
}

/// One row of [`POOL_LIST`] as a [`ReadyKey`].
fn ready_key(row: &tokio_postgres::Row) -> Result<ReadyKey, StoreError> {
    let seq: i64 = row.try_get(0).map_err(db("reading a ready key"))?;
    let id: Uuid = row.try_get(1).map_err(db("reading a ready key"))?;
    let stored: i64 = row.try_get(2).map_err(db("reading a ready key"))?;
    let record: Option<&[u8]> = row.try_get(3).map_err(db("reading a ready key"))?;
    let expires_at = match record {
        // Stored clamped: the record holds the exact expiry.
        Some(bytes) => decode(id, bytes)?.meta().expires_at(),
        None => u64::try_from(stored).unwrap_or(0),
    };
    Ok(ReadyKey {
        slot: Slot {
            seq: from_db_seq(id, seq)?,
            id,
        },
        expires_at,
    })
}

/// The positions in the first column of `rows` (as stored).
fn seqs_of(rows: &[tokio_postgres::Row]) -> Result<HashSet<i64>, StoreError> {
    rows.iter()
        .map(|row| row.try_get::<_, i64>(0))
        .collect::<Result<_, _>>()
        .map_err(db("inserting ready keys"))
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
