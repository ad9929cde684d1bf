//! The pending counts behind the synchronous [`dqkd_store::KeyStore::pending`].
//!
//! Each replica keeps counts in memory. Its own commits update them at once; a background task
//! replaces them with a fresh `GROUP BY` over the database every refresh interval, which brings
//! in other replicas' inserts, takes and purges (and heals any drift, such as a commit whose
//! caller went away before the counts were updated).
//!
//! The refresh must not lose or double-count this replica's own changes that land while its
//! query runs. So the refresh takes its snapshot while holding the write side of `gate`, and
//! every write holds the read side from just before `COMMIT` until its deltas are applied.
//! Changes committed before the snapshot are therefore already in it; changes committed after
//! are journaled and replayed on top of it. Only other replicas' changes can be up to one
//! interval stale.

use std::sync::{Mutex, MutexGuard, PoisonError};

use deadpool_postgres::Pool;
use dqkd_store::rules::{KeyMeta, PendingCounts};
use dqkd_store::StoreError;
use tokio::sync::{RwLock, RwLockReadGuard};
use tokio_postgres::IsolationLevel;

use crate::error::{db, pool};

/// A change to the counts made by one committed write of this replica.
#[derive(Debug)]
pub(crate) enum Delta {
    /// A key was inserted: each of its slaves may fetch one more.
    Add(KeyMeta),
    /// A key was deleted (purged or destroyed): its remaining slaves may fetch one fewer.
    Remove(KeyMeta),
    /// `slave` fetched a key of `master`.
    Taken { master: String, slave: String },
}

#[derive(Debug, Default)]
struct State {
    counts: PendingCounts,
    /// `Some` while a refresh query runs: deltas committed after its snapshot.
    journal: Option<Vec<Delta>>,
}

/// Counts plus the gate that orders commits against refresh snapshots.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    gate: RwLock<()>,
    /// One refresh at a time (the journal belongs to one snapshot).
    refreshing: tokio::sync::Mutex<()>,
    state: Mutex<State>,
}

fn apply(counts: &mut PendingCounts, d: &Delta) {
    match d {
        Delta::Add(meta) => counts.add_key(meta),
        Delta::Remove(meta) => counts.remove_key(meta),
        Delta::Taken { master, slave } => counts.sub(master, slave, 1),
    }
}

impl Counts {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn get(&self, master: &str, slave: &str) -> u64 {
        self.lock().counts.get(master, slave)
    }

    /// Held by a write from just before `COMMIT` until [`Counts::apply`].
    pub(crate) async fn commit_gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }

    /// Applies the deltas of a committed write (call while holding [`Counts::commit_gate`]).
    pub(crate) fn apply(&self, deltas: Vec<Delta>) {
        let mut state = self.lock();
        let State { counts, journal } = &mut *state;
        for d in &deltas {
            apply(counts, d);
        }
        if let Some(journal) = journal {
            journal.extend(deltas);
        }
    }

    /// Replaces the counts with the database's, keeping this replica's later commits.
    pub(crate) async fn refresh(&self, pool_: &Pool) -> Result<(), StoreError> {
        let _one = self.refreshing.lock().await;
        let mut client = pool_
            .get()
            .await
            .map_err(pool("connecting to refresh pending counts"))?;
        let txn = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db("starting the pending-count refresh"))?;
        {
            let _exclusive = self.gate.write().await;
            // The first statement of a REPEATABLE READ transaction fixes its snapshot.
            txn.batch_execute("SELECT 1")
                .await
                .map_err(db("taking the pending-count snapshot"))?;
            self.lock().journal = Some(Vec::new());
        }
        let result = async {
            let rows = txn
                .query(
                    "SELECT master, slave, count(*) FROM dqkd_keys \
                     CROSS JOIN LATERAL unnest(remaining) AS slave GROUP BY master, slave",
                    &[],
                )
                .await
                .map_err(db("counting pending keys"))?;
            let mut fresh = PendingCounts::default();
            for row in rows {
                let master: &str = row.try_get(0).map_err(db("counting pending keys"))?;
                let slave: &str = row.try_get(1).map_err(db("counting pending keys"))?;
                let n: i64 = row.try_get(2).map_err(db("counting pending keys"))?;
                fresh.add(master, slave, u64::try_from(n).unwrap_or(0));
            }
            txn.commit()
                .await
                .map_err(db("ending the pending-count refresh"))?;
            Ok(fresh)
        }
        .await;
        let mut state = self.lock();
        let journal = state.journal.take().unwrap_or_default();
        let mut fresh = result?;
        for d in &journal {
            apply(&mut fresh, d);
        }
        state.counts = fresh;
        Ok(())
    }
}
