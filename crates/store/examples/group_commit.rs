//! Measures group commit: single-key inserts from many concurrent callers, each answered only
//! after an fsync'd commit. Prints throughput and batch sizes; asserts nothing about timing.
//!
//! ```text
//! cargo run --release --example group_commit -- [callers] [inserts-per-caller] [dir]
//! ```

use std::sync::Arc;
use std::time::Instant;

use dqkd_store::{EmbeddedStore, Kek, KeyMaterial, KeyStore, NewKey, Uuid};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let callers: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
    let per_caller: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);
    let dir = match args.next() {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().build()?;
    rt.block_on(async {
        for callers in [1, callers] {
            let path = dir.path().join(format!("bench-{callers}.redb"));
            let store = Arc::new(EmbeddedStore::open(&path, Kek::generate()?)?);
            let start = Instant::now();
            let tasks: Vec<_> = (0..callers)
                .map(|_| {
                    let store = Arc::clone(&store);
                    tokio::spawn(async move {
                        for _ in 0..per_caller {
                            let key = NewKey {
                                id: Uuid::new_v4(),
                                master: "alice".into(),
                                slaves: vec!["bob".into()],
                                material: KeyMaterial::new(vec![0x5a; 32]),
                                expires_at: u64::MAX,
                            };
                            store.insert(vec![key]).await?;
                        }
                        Ok::<_, dqkd_store::StoreError>(())
                    })
                })
                .collect();
            for t in tasks {
                t.await??;
            }
            let elapsed = start.elapsed();
            let stats = store.commit_stats();
            let total = callers * per_caller;
            println!(
                "{callers:>3} callers: {total} single-key inserts in {:.2?} = {:.0} inserts/s; \
                 {} commits, mean batch {:.1}, max batch {}",
                elapsed,
                total as f64 / elapsed.as_secs_f64(),
                stats.batches,
                stats.ops as f64 / stats.batches as f64,
                stats.max_batch,
            );
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
