//! The shared behavioural suite (`dqkd-store-tests`) run against the in-memory and the
//! embedded store, so the in-memory store used by other crates' tests cannot drift from the
//! durable one.

// Test helpers: an unwrap here is an assertion.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use dqkd_store::{EmbeddedStore, Kek, KeyStore, MemoryStore};

async fn memory() -> Option<(Arc<dyn KeyStore>, ())> {
    Some((Arc::new(MemoryStore::new()), ()))
}

async fn embedded() -> Option<(Arc<dyn KeyStore>, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let store =
        EmbeddedStore::open(&dir.path().join("keys.redb"), Kek::from_bytes([0x5a; 32])).unwrap();
    Some((Arc::new(store), dir))
}

dqkd_store_tests::suite!(memory_store, memory);
dqkd_store_tests::suite!(embedded_store, embedded);
