//! What every operation of the store needs: the connection pool onto the key tables, the
//! cipher that seals their records, and the pending counts their commits update.

use std::sync::Arc;

use deadpool_postgres::Pool;
use dqkd_store::seal::Cipher;
use dqkd_store::StoreError;

use crate::counts::{Counts, Delta};
use crate::error::{db, pool};

/// The tables of one database, as the operations (see `keys`, `pools`, `inflight`) use them.
pub(crate) struct Tables {
    pub(crate) pool: Pool,
    pub(crate) cipher: Cipher,
    pub(crate) counts: Arc<Counts>,
}

impl Tables {
    /// A connection from the pool.
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(pool("getting a key database connection"))
    }

    /// Commits `txn` and applies `deltas` to the counts, ordered against refresh snapshots.
    pub(crate) async fn commit(
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
