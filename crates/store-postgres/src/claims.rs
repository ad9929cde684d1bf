//! Pool claims: which replica refills a ready-key pool and hands its keys out. A claim is an
//! advisory lock held by a connection of its own outside the pool, so it lasts exactly as
//! long as that connection.

use std::time::Duration;

use dqkd_store::StoreError;

use crate::error::{db, PgFailure};
use crate::transport::Connector;

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

/// The connection holding this process's pool claims (`None` until the first claim and
/// after a failed one), and where and how to open it.
pub(crate) struct Claims {
    pub(crate) config: tokio_postgres::Config,
    pub(crate) connector: Connector,
    /// The database, for messages.
    pub(crate) database: String,
    pub(crate) client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl Claims {
    /// Claims the pool of `link` for this process (see [`dqkd_store::KeyStore::claim_pool`]).
    pub(crate) async fn claim(&self, link: &str) -> Result<bool, StoreError> {
        let mut slot = self.client.lock().await;
        let client = match slot.take().filter(|c| !c.is_closed()) {
            Some(client) => client,
            None => self.connect().await?,
        };
        let sql = format!("SELECT pg_try_advisory_lock({POOL_CLAIM_KEY_SQL})");
        let answer = tokio::time::timeout(CLAIM_TIMEOUT, client.query_one(&sql, &[&link])).await;
        match answer {
            Ok(answer) => {
                let held = answer.and_then(|row| row.try_get::<_, bool>(0));
                // A refused statement leaves the session, and the claims it holds, alive.
                if !client.is_closed() {
                    *slot = Some(client);
                }
                held.map_err(db("claiming a ready-key pool"))
            }
            // The connection may be dead without knowing it: drop it (releasing whatever it
            // still holds on the server) and let the next claim start afresh.
            Err(_) => Err(claim_timed_out("claiming a ready-key pool")),
        }
    }

    /// Opens the connection that holds this process's pool claims.
    async fn connect(&self) -> Result<tokio_postgres::Client, StoreError> {
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
}

/// A claim round trip that took longer than [`CLAIM_TIMEOUT`].
fn claim_timed_out(context: &str) -> StoreError {
    StoreError::Database {
        context: context.into(),
        cause: Box::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {CLAIM_TIMEOUT:?}"),
        )),
    }
}
