//! The shared behavioural suite (`dqkd-store-tests`) run against [`PostgresStore`], each case
//! on its own throwaway database and a pool of 8 connections.

mod common;

use std::sync::Arc;

use dqkd_store::KeyStore;
use dqkd_store_postgres::PostgresStore;

async fn postgres() -> Option<(Arc<dyn KeyStore>, common::TestDb)> {
    let db = common::TestDb::create().await?;
    let store = PostgresStore::connect(&db.url, common::kek(), 8)
        .await
        .expect("connecting the store");
    Some((Arc::new(store), db))
}

dqkd_store_tests::suite!(postgres_store, postgres);
