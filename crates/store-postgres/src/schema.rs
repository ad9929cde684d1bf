//! Forward-only schema migrations and the KEK check, run once per connect.
//!
//! Every step runs in one transaction that first takes a transaction-scoped advisory lock, so
//! replicas starting at the same moment apply each migration exactly once: the second waits for
//! the first to commit, then finds nothing left to do. A database migrated by a newer build is
//! refused rather than written with an older idea of the schema.

use deadpool_postgres::Pool;
use dqkd_store::seal::Cipher;
use dqkd_store::StoreError;

use crate::error::{db, pool};

/// The advisory lock key serialising migrations (ASCII "dqkd_sch"); any other user of advisory
/// locks in the same database must avoid it.
pub const MIGRATION_LOCK_KEY: i64 = 0x6471_6b64_5f73_6368;

/// One forward-only step.
struct Migration {
    version: i32,
    sql: &'static str,
}

/// Every migration in order; append only, never edit a released one.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../migrations/0001_keys.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../migrations/0002_pool.sql"),
    },
    Migration {
        version: 3,
        sql: include_str!("../migrations/0003_pool_positions.sql"),
    },
    Migration {
        version: 4,
        sql: include_str!("../migrations/0004_in_flight.sql"),
    },
];

/// The schema version this build writes (the version of the last migration).
pub const SCHEMA_VERSION: i32 = 4;

const KEK_CHECK: &str = "kek_check";

/// Applies missing migrations and writes or verifies the KEK check value, atomically.
pub(crate) async fn prepare(
    pool_: &Pool,
    cipher: &Cipher,
    database: &str,
) -> Result<(), StoreError> {
    let mut client = pool_
        .get()
        .await
        .map_err(pool("connecting to the key database"))?;
    let txn = client
        .transaction()
        .await
        .map_err(db("starting the migration transaction"))?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(db("taking the migration lock"))?;
    txn.batch_execute(
        "CREATE TABLE IF NOT EXISTS dqkd_schema_migrations (
             version    integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(db("creating the migrations table"))?;
    let applied: Vec<i32> = txn
        .query(
            "SELECT version FROM dqkd_schema_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(db("reading applied migrations"))?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(db("reading applied migrations"))?;
    if let Some(&newest) = applied.last() {
        if newest > SCHEMA_VERSION {
            return Err(StoreError::Schema {
                reason: format!(
                    "{database} has schema version {newest}, newer than the {SCHEMA_VERSION} this \
                     build supports; upgrade dqkd"
                ),
            });
        }
    }
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        txn.batch_execute(m.sql)
            .await
            .map_err(db("applying a schema migration"))?;
        txn.execute(
            "INSERT INTO dqkd_schema_migrations (version, applied_at) VALUES ($1, now())",
            &[&m.version],
        )
        .await
        .map_err(db("recording a schema migration"))?;
        tracing::info!(version = m.version, %database, "applied key database migration");
    }

    let check = txn
        .query_opt("SELECT value FROM dqkd_meta WHERE name = $1", &[&KEK_CHECK])
        .await
        .map_err(db("reading the KEK check value"))?;
    match check {
        Some(row) => {
            let value: Vec<u8> = row.try_get(0).map_err(db("reading the KEK check value"))?;
            if !cipher.verify_kek_check(&value) {
                return Err(StoreError::WrongKekDatabase {
                    database: database.to_owned(),
                });
            }
        }
        None => {
            let value = cipher.kek_check_value()?;
            txn.execute(
                "INSERT INTO dqkd_meta (name, value) VALUES ($1, $2)",
                &[&KEK_CHECK, &value],
            )
            .await
            .map_err(db("writing the KEK check value"))?;
        }
    }
    txn.commit()
        .await
        .map_err(db("committing the migration transaction"))
}
