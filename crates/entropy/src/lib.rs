//! The dqkd entropy server, and the client KMEs use to talk to it.
//!
//! An entropy server holds *pools* of fresh random bytes and hands out byte ranges that
//! are never handed out again. The KME that allocates a range names the KMEs (the
//! *readers*) that may each read it exactly once; those KMEs regenerate the same key from
//! the same bytes (see the key-generation design). A range is shredded (zeroised, then
//! freed) as soon as every reader has read it, and every range of a pool is shredded when
//! the pool's TTL ends, so that random bytes a key was built from do not outlive the need
//! to regenerate it.
//!
//! Layout, one way: [`api`] (HTTP, status codes, mTLS identity) → [`pool`] (ranges,
//! readers, expiry, the memory bound, quotas; no I/O) and [`source`] (the OS CSPRNG,
//! optionally XOR-mixed with a device or file, each checked by the [`health`] tests).
//! [`server::run`] serves a validated [`Config`]; [`client::EntropyClient`] is the KME side.
//!
//! ```no_run
//! # async fn demo(tls: &std::sync::Arc<dqkd_net::OutgoingTls>) -> Result<(), Box<dyn std::error::Error>> {
//! use dqkd_entropy::EntropyClient;
//! // Accepts only the certificate of entropy server E1 of cluster "lab".
//! let only_e1 = dqkd_pki::Identity::new("lab", dqkd_pki::Role::Entropy, "E1")?;
//! let http = tls.client(only_e1, dqkd_net::Versions::Any, None)?;
//! let e1 = EntropyClient::new("https://127.0.0.1:9443", "E1", http)?;
//! let range = e1.allocate(4096, &["KME_B".to_owned()]).await?;
//! // ... send (server_id, pool_id, offset, len) to KME_B, which calls:
//! let same = e1.read(&range.pool_id, range.offset, range.len).await?;
//! # let _ = same; Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod client;
pub mod config;
mod error;
pub mod health;
mod hex;
pub mod metrics;
pub mod pool;
pub mod server;
pub mod service;
pub mod source;

pub use api::ApiError;
pub use client::{Allocation, EntropyClient, EntropyError};
pub use config::{Config, ConfigError, ConfigFile};
pub use pool::PoolId;
pub use server::{run, ServeError, Serving};

/// Response header: the ID of the entropy server that allocated the range.
pub const HEADER_SERVER_ID: &str = "dqkd-server-id";
/// Response header: the pool the range was carved from, 32 lowercase hex characters.
pub const HEADER_POOL_ID: &str = "dqkd-pool-id";
/// Response header: the range's offset in its pool (decimal).
pub const HEADER_OFFSET: &str = "dqkd-offset";
/// Response header: when the range is shredded, in Unix seconds.
pub const HEADER_EXPIRES_AT: &str = "dqkd-expires-at";
/// Most readers one range may name.
pub const MAX_READERS: usize = 16;
