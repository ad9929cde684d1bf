//! In-flight records (`dqkd_in_flight`): cross-site requests this site sent and has not
//! answered yet, so that a replica that restarts can withdraw their keys at every site.

use dqkd_store::{InFlight, StoreError};
use uuid::Uuid;

use crate::columns::{from_db_seq, to_db_seq};
use crate::error::db;
use crate::tables::Tables;

const RECORD_IN_FLIGHT: &str =
    "INSERT INTO dqkd_in_flight (request_id, owner, sites, key_ids, ready) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (request_id) DO UPDATE SET owner = EXCLUDED.owner, \
     sites = EXCLUDED.sites, key_ids = EXCLUDED.key_ids, ready = EXCLUDED.ready";
const FORGET_IN_FLIGHT: &str = "DELETE FROM dqkd_in_flight WHERE request_id = $1";

/// Writes (or replaces) the in-flight record of a request.
pub(crate) async fn record(t: &Tables, request: InFlight) -> Result<(), StoreError> {
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
            cause: "position above i64::MAX".into(),
        })?;
    let client = t.client().await?;
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

/// The in-flight records of `owner`.
pub(crate) async fn of_owner(t: &Tables, owner: &str) -> Result<Vec<InFlight>, StoreError> {
    let client = t.client().await?;
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

/// Deletes in-flight records; unknown IDs are skipped.
pub(crate) async fn forget(t: &Tables, request_ids: &[Uuid]) -> Result<(), StoreError> {
    if request_ids.is_empty() {
        return Ok(());
    }
    t.client()
        .await?
        .execute(
            "DELETE FROM dqkd_in_flight WHERE request_id = ANY($1)",
            &[&request_ids],
        )
        .await
        .map_err(db("forgetting in-flight requests"))?;
    Ok(())
}

/// Deletes the in-flight record `answered` inside `txn`, the transaction that stores the
/// origin's copy of its keys.
pub(crate) async fn forget_answered(
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
