//! Key storage for a dqkd KME.
//!
//! A master SAE's `enc_keys` request stores keys here for its slave SAEs; each slave later
//! fetches each key exactly once with `dec_keys`. Everything else in the KME talks to storage
//! only through the [`KeyStore`] trait (held as `Arc<dyn KeyStore>`), with two implementations:
//!
//! * [`EmbeddedStore`]: the durable default, one redb file per site. Key bytes are sealed with
//!   the site key-encryption key ([`Kek`]), and writes from all callers are group-committed by
//!   one writer thread, so every answer that depends on a write leaves only after an fsync.
//! * [`MemoryStore`]: the same rules in memory, for tests of other crates.
//!
//! Sites that run several KME replicas use `dqkd-store-postgres`, which implements the same
//! trait with the same rules ([`rules`]) and the same sealed records ([`seal`]). Every
//! implementation must pass the shared behavioural suite in `dqkd-store-tests`.
//!
//! ```
//! # use dqkd_store::*;
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = MemoryStore::new();
//! let id = uuid::Uuid::new_v4();
//! store
//!     .insert(vec![NewKey {
//!         id,
//!         master: "alice".into(),
//!         slaves: vec!["bob".into()],
//!         material: KeyMaterial::new(vec![0x42; 32]),
//!         expires_at: u64::MAX,
//!     }])
//!     .await?;
//! assert_eq!(store.pending("alice", "bob"), 1);
//! let keys = store.take("bob", &["alice".into()], &[id], 0).await?;
//! assert_eq!(keys[0].material.as_bytes(), &[0x42; 32]);
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod checkpoint;
mod durable;
mod embedded;
mod error;
mod expiry;
mod inflight;
mod kek;
mod key;
mod layers;
mod memory;
mod meta;
mod ops;
mod overlay;
mod record;
mod recovery;
mod schema;
mod sweep;
mod wal;
mod writer;

pub use embedded::{CommitStats, EmbeddedStore};
pub use error::{RecordError, StoreError, TakeError};
pub use kek::{Kek, KEK_LEN};
pub use key::{DeliveredKey, InFlight, KeyMaterial, NewKey, PoolGrant, PoolKey, ReadyKey, Slot};
pub use memory::MemoryStore;
pub use uuid::Uuid;

/// The pure delivery rules every store applies, for implementations outside this crate (such
/// as `dqkd-store-postgres`), so all stores refuse and accept exactly the same requests.
///
/// A store keeps a [`rules::KeyMeta`] per key, checks a batch with [`rules::check_insert`]
/// before writing it, checks a take with [`rules::check_take`] (and a destroy on behalf of a
/// peer site with [`rules::check_destroy`]) against the current metadata of
/// every requested key (with those keys locked), then calls [`rules::KeyMeta::mark_taken`] on
/// each and deletes the keys it reports finished. [`rules::PendingCounts`] backs
/// [`KeyStore::pending`].
pub mod rules {
    pub use crate::meta::{
        check_destroy, check_insert, check_pool_insert, check_take, first_position_after,
        pool_bind_slots, pool_bound_keys, KeyMeta, PendingCounts,
    };
}

/// Encryption at rest, for implementations outside this crate: the AES-256-GCM cipher under
/// epoch keys derived from the site KEK ([`Kek::cipher`]), the KEK check value, and the
/// versioned record (metadata in clear, key bytes sealed with associated data binding the key
/// ID and master) that every durable store keeps per key.
pub mod seal {
    pub use crate::error::TOO_LONG;
    pub use crate::kek::{Cipher, Sealing, EPOCH_BYTES, NONCE_BYTES, SEALS_PER_EPOCH};
    pub use crate::record::{aad, Record, VERSION};
}

/// Where a KME keeps keys between `enc_keys` and `dec_keys`.
///
/// Implementations must make [`KeyStore::insert`] and [`KeyStore::take`] durable before they
/// return, because the KME answers SAEs (and peer KMEs) on the strength of them.
#[async_trait::async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Stores the keys durably; every slave in `slaves` becomes entitled to fetch the key once.
    /// Returns only after the write is committed to disk (fsync). All keys or none.
    async fn insert(&self, keys: Vec<NewKey>) -> Result<(), StoreError> {
        self.insert_answering(keys, None).await
    }

    /// [`KeyStore::insert`] that also deletes the in-flight record `answered` (if any), in the
    /// same atomic commit: the origin of a cross-site request stores its own copy of the keys
    /// and marks the request answered at once, so that a crash can leave either both or
    /// neither. `keys` may be empty (the origin keeps no copy). On failure neither happens.
    async fn insert_answering(
        &self,
        keys: Vec<NewKey>,
        answered: Option<Uuid>,
    ) -> Result<(), StoreError>;

    /// All-or-nothing delivery to slave SAE `caller` of the keys `ids`, each of which must have
    /// been made for a master in `masters` (a set because a KME ID in the URL means "any SAE of
    /// that site").
    ///
    /// If any id exists (and is not expired) but `caller` is not among its slaves, or its master
    /// is not in `masters`: [`TakeError::Unauthorized`]. Else if any id is unknown, already
    /// delivered to this caller, expired (`expires_at <= now`) or repeated in the request:
    /// [`TakeError::NotFound`]. Else removes `caller` from each key's remaining slaves (deleting
    /// the key when none remain), commits durably, and returns the keys in the order asked.
    async fn take(
        &self,
        caller: &str,
        masters: &[String],
        ids: &[Uuid],
        now: u64,
    ) -> Result<Vec<DeliveredKey>, TakeError>;

    /// Number of keys stored for `master` that `slave` may still fetch (used for status counts
    /// and limits). Expired keys count until [`KeyStore::purge_expired`] removes them.
    fn pending(&self, master: &str, slave: &str) -> u64;

    /// Deletes (shreds) keys whose `expires_at <= now`, ready keys of every pool included;
    /// returns how many.
    async fn purge_expired(&self, now: u64) -> Result<u64, StoreError>;

    /// Deletes (shreds) these ordinary keys whatever their entitlements; unknown IDs are
    /// skipped. Returns how many existed. A KME uses it when a cross-site request fails, so
    /// that no key of that request can ever be delivered. Ready keys are not reached (a pool
    /// is found by position, not ID): see [`KeyStore::pool_remove`]. Durable before it
    /// returns.
    async fn destroy(&self, ids: &[Uuid]) -> Result<u64, StoreError>;

    /// [`KeyStore::destroy`] on behalf of the site whose SAEs are `masters`: if any of `ids`
    /// is held for a master not in `masters` (expired or not), [`TakeError::Unauthorized`]
    /// and nothing is destroyed; else exactly as `destroy` (unknown IDs skipped). Checked and
    /// applied atomically, so a key cannot appear in between. A KME uses it for a peer
    /// site's `destroy`: a site may shred only keys its own SAEs made.
    async fn destroy_of(&self, masters: &[String], ids: &[Uuid]) -> Result<u64, TakeError>;

    /// Stores ready keys at their positions in the pool of `link` (a name the KME chooses per
    /// pair of sites), durably, all or none. Ready keys belong to no SAE: `take` never finds
    /// them and `pending` never counts them. A position already taken in that pool, or an ID
    /// already stored as an ordinary key or repeated in the batch, refuses the whole batch
    /// with [`StoreError::DuplicateId`]. (IDs are random: the pools themselves are not
    /// searched by ID.)
    async fn pool_insert(&self, link: &str, keys: Vec<PoolKey>) -> Result<(), StoreError>;

    /// Moves keys out of the pool of `link`, all or nothing, and returns their bytes in grant
    /// order. The keys of a grant with slaves become ordinary keys of `grant.master` for those
    /// slaves, exactly as [`KeyStore::insert`] would store them; the keys of a grant without
    /// slaves are shredded. If any slot is not in that pool (no key at its position, or one
    /// with another ID), is expired at `now` or appears twice: [`TakeError::NotFound`], and
    /// nothing changes. Durable before it returns.
    async fn pool_bind(
        &self,
        link: &str,
        grants: Vec<PoolGrant>,
        now: u64,
    ) -> Result<Vec<DeliveredKey>, TakeError> {
        self.pool_bind_answering(link, grants, now, None).await
    }

    /// [`KeyStore::pool_bind`] that also deletes the in-flight record `answered` (if any), in
    /// the same atomic commit (see [`KeyStore::insert_answering`]). On failure neither
    /// happens.
    async fn pool_bind_answering(
        &self,
        link: &str,
        grants: Vec<PoolGrant>,
        now: u64,
        answered: Option<Uuid>,
    ) -> Result<Vec<DeliveredKey>, TakeError>;

    /// Shreds the ready keys at these positions of the pool of `link`; positions that hold
    /// nothing are skipped. Returns how many existed. A KME uses it to withdraw ready keys
    /// whose bind failed, so a bind that arrives late can never succeed, and to discard a
    /// pool it no longer trusts. Durable before it returns.
    async fn pool_remove(&self, link: &str, seqs: &[u64]) -> Result<u64, StoreError>;

    /// At most `limit` ready keys of the pool of `link` at positions after `after` (from the
    /// start when `None`), in position order, so a KME can rebuild its view of a large pool
    /// after a restart a page at a time, never holding the whole listing twice.
    async fn pool_page(
        &self,
        link: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<ReadyKey>, StoreError>;

    /// Records durably, before the first peer message of a cross-site request, that this site
    /// has not answered it yet (a record with the same request ID is replaced). The record
    /// leaves with the commit that stores the origin's own copy
    /// ([`KeyStore::insert_answering`], [`KeyStore::pool_bind_answering`]), or with
    /// [`KeyStore::forget_in_flight`] once a failed request is withdrawn everywhere. A record
    /// still present after a restart is a request nobody was answered: its keys must be
    /// withdrawn at its sites. Durable before it returns.
    async fn record_in_flight(&self, request: InFlight) -> Result<(), StoreError>;

    /// The in-flight records of `owner` ([`InFlight::owner`]), in no particular order.
    async fn in_flight(&self, owner: &str) -> Result<Vec<InFlight>, StoreError>;

    /// Deletes these in-flight records; unknown IDs are skipped. Durable before it returns.
    async fn forget_in_flight(&self, request_ids: &[Uuid]) -> Result<(), StoreError>;

    /// Makes sure this process alone keeps the pool of `link` among the processes that
    /// share this store: `Ok(true)` when it holds the claim (just taken or already held),
    /// `Ok(false)` while another live process holds it. A claim lasts as long as the process
    /// (or its hold on the store) does. A store that one process alone can open claims every
    /// pool for it. Claims only decide which process refills a pool and hands its keys out; a
    /// ready key is bound at most once whoever tries. A KME claims the name
    /// `in-flight:<replica name>` the same way before it recovers its in-flight records
    /// ([`KeyStore::in_flight`]), so that it never withdraws a live sibling's requests.
    async fn claim_pool(&self, link: &str) -> Result<bool, StoreError> {
        let _ = link;
        Ok(true)
    }

    /// Every ready key of the pool of `link`, in position order ([`KeyStore::pool_page`]
    /// until the end).
    async fn pool_list(&self, link: &str) -> Result<Vec<ReadyKey>, StoreError> {
        const PAGE: usize = 65_536;
        let mut all: Vec<ReadyKey> = Vec::new();
        loop {
            let after = all.last().map(|k| k.slot.seq);
            let page = self.pool_page(link, after, PAGE).await?;
            let done = page.len() < PAGE;
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }
}
