//! Measures inserts + takes per second through [`PostgresStore`] with many concurrent callers.
//!
//! Each caller loops: insert `keys` keys in one call, then take them in one call (as an
//! `enc_keys` at one KME and a `dec_keys` at another would). The run uses a throwaway database
//! created from the admin URL and dropped at the end.
//!
//! ```text
//! DQKD_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run --release -p dqkd-store-postgres --example pg_throughput -- [callers] [pool] [seconds] [keys]
//! ```
//!
//! Defaults: 64 callers, a pool of 16 connections, 5 seconds, 1 key per call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dqkd_store::{Kek, KeyMaterial, KeyStore, NewKey, Uuid};
use dqkd_store_postgres::PostgresStore;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn arg(n: usize, default: u64) -> Result<u64, Error> {
    Ok(match std::env::args().nth(n) {
        Some(a) => a.parse()?,
        None => default,
    })
}

async fn admin(url: &str) -> Result<tokio_postgres::Client, Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let callers = arg(1, 64)?;
    let pool = usize::try_from(arg(2, 16)?)?;
    let seconds = arg(3, 5)?;
    let per_call = usize::try_from(arg(4, 1)?)?;
    let admin_url = std::env::var("DQKD_TEST_POSTGRES_URL")
        .map_err(|_| "set DQKD_TEST_POSTGRES_URL to an admin URL of a PostgreSQL server")?;
    let name = format!("dqkd_bench_{}", &Uuid::new_v4().simple().to_string()[..16]);
    let base = admin_url
        .rsplit_once('/')
        .map_or(admin_url.as_str(), |(b, _)| b);
    let url = format!("{base}/{name}");
    let admin = admin(&admin_url).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;

    let result = run(&url, callers, pool, seconds, per_call).await;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    result
}

async fn run(
    url: &str,
    callers: u64,
    pool: usize,
    seconds: u64,
    per_call: usize,
) -> Result<(), Error> {
    let store: Arc<dyn KeyStore> =
        Arc::new(PostgresStore::connect(url, Kek::generate()?, pool).await?);
    let masters = vec!["alice".to_string()];
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (store, done, masters) = (Arc::clone(&store), Arc::clone(&done), masters.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let keys: Vec<NewKey> = (0..per_call)
                        .map(|_| NewKey {
                            id: Uuid::new_v4(),
                            master: "alice".into(),
                            slaves: vec!["bob".into()],
                            material: KeyMaterial::new(vec![0x42; 32]),
                            expires_at: u64::MAX,
                        })
                        .collect();
                    let ids: Vec<Uuid> = keys.iter().map(|k| k.id).collect();
                    store.insert(keys).await?;
                    let got = store.take("bob", &masters, &ids, 0).await?;
                    assert_eq!(got.len(), per_call);
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let pairs = done.load(Ordering::Relaxed);
    println!(
        "{callers} callers, pool {pool}, {per_call} key(s) per call, {elapsed:.1} s: \
         {pairs} insert+take pairs = {:.0} pairs/s ({:.0} store calls/s, {:.0} keys/s through)",
        pairs as f64 / elapsed,
        2.0 * pairs as f64 / elapsed,
        (pairs as usize * per_call) as f64 / elapsed,
    );
    Ok(())
}
