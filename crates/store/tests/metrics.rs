//! The embedded store's metrics carry the `kme` label of the KME that opened it, so a process
//! that runs several sites (as `dqkd up` does) keeps their store figures apart.
//!
//! A test binary of its own: it installs the process-wide metrics recorder.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use dqkd_store::{EmbeddedStore, Kek, KeyMaterial, KeyStore, NewKey, Uuid};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// Name and labels of a metric.
type Registered = BTreeSet<(String, Vec<(String, String)>)>;

/// Remembers the name and labels of every histogram registered.
#[derive(Default, Clone)]
struct Seen(Arc<Mutex<Registered>>);

impl Recorder for Seen {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let labels = key
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((key.name().to_owned(), labels));
        Histogram::noop()
    }
}

fn key() -> NewKey {
    NewKey {
        id: Uuid::new_v4(),
        master: "alice".into(),
        slaves: vec!["bob".into()],
        material: KeyMaterial::new(vec![7; 32]),
        expires_at: u64::MAX,
    }
}

#[tokio::test]
async fn store_metrics_carry_the_kme_of_the_store() {
    let seen = Seen::default();
    metrics::set_global_recorder(seen.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for kme in ["KME-A", "KME-B"] {
        let path = dir.path().join(format!("{kme}.redb"));
        let store = EmbeddedStore::open_for_kme(&path, Kek::from_bytes([3; 32]), kme).unwrap();
        store.insert(vec![key()]).await.unwrap();
        // Closing checkpoints what the log holds, which records the checkpoint metrics too.
        store.close().unwrap();
    }
    let seen = seen
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    for name in [
        "dqkd_store_commit_ops",
        "dqkd_store_commit_seconds",
        "dqkd_store_checkpoint_seconds",
        "dqkd_store_checkpoint_entries",
    ] {
        for kme in ["KME-A", "KME-B"] {
            let labels = vec![("kme".to_owned(), kme.to_owned())];
            assert!(
                seen.contains(&(name.to_owned(), labels)),
                "{name} for {kme} missing from {seen:?}"
            );
        }
    }
    let unlabelled: Vec<_> = seen
        .iter()
        .filter(|(_, labels)| !labels.iter().any(|(k, _)| k == "kme"))
        .collect();
    assert!(
        unlabelled.is_empty(),
        "metrics without a kme label: {unlabelled:?}"
    );
}
