//! Turning client, pool and server errors into [`StoreError::Database`] with context.

use dqkd_store::StoreError;

/// A tokio-postgres error whose message includes the server's SQLSTATE and message (the
/// client's own `Display` says only "db error"). The server's `DETAIL` is left out: it can
/// quote row values.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct PgFailure {
    message: String,
    #[source]
    source: tokio_postgres::Error,
}

impl PgFailure {
    pub(crate) fn new(source: tokio_postgres::Error) -> Self {
        let message = match source.as_db_error() {
            Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
            None => match std::error::Error::source(&source) {
                Some(cause) => format!("{source}: {cause}"),
                None => source.to_string(),
            },
        };
        PgFailure { message, source }
    }
}

/// Wraps a client error with what was being done.
pub(crate) fn db(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |e| StoreError::Database {
        context: context.into(),
        source: Box::new(PgFailure::new(e)),
    }
}

/// Wraps a pool error (no free connection could be made) with what was being done.
pub(crate) fn pool(
    context: &'static str,
) -> impl FnOnce(deadpool_postgres::PoolError) -> StoreError {
    move |e| match e {
        deadpool_postgres::PoolError::Backend(e) => db(context)(e),
        other => StoreError::Database {
            context: context.into(),
            source: Box::new(other),
        },
    }
}
