//! A deterministic key source: what a site's keys are follows from their IDs alone.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use dqkd_kme::keysource::{Batch, KeySource, KeySourceError};
use dqkd_store::KeyMaterial;
use uuid::Uuid;

/// Keys that are a function of their ID: a site's source numbers its keys from its own
/// base, and the metadata is the list of IDs and the key length, so any site regenerates
/// the same bytes. Not random in any way: for tests only.
pub struct DetSource {
    base: u64,
    next: AtomicU64,
    /// How long each regeneration waits, as if for far entropy servers.
    regeneration: Duration,
    regenerating: AtomicUsize,
    most_regenerating: AtomicUsize,
}

impl DetSource {
    /// Site `site`'s source, whose every regeneration takes `regeneration` (zero: none).
    pub fn new(site: u64, regeneration: Duration) -> Self {
        Self {
            base: site << 32,
            next: AtomicU64::new(0),
            regeneration,
            regenerating: AtomicUsize::new(0),
            most_regenerating: AtomicUsize::new(0),
        }
    }

    /// The most regenerations that were under way at once.
    pub fn most_regenerating(&self) -> usize {
        self.most_regenerating.load(Ordering::SeqCst)
    }
}

/// The bytes of key `id`, `len` long.
pub fn key_bytes(id: &Uuid, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut block = 0u32;
    while out.len() < len {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(id.as_bytes());
        ctx.update(&block.to_be_bytes());
        out.extend_from_slice(ctx.finish().as_ref());
        block += 1;
    }
    out.truncate(len);
    out
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    len: usize,
    ids: Vec<Uuid>,
}

#[async_trait::async_trait]
impl KeySource for DetSource {
    async fn generate(
        &self,
        count: usize,
        len: usize,
        _readers: &[String],
    ) -> Result<Batch, KeySourceError> {
        let first = self.next.fetch_add(count as u64, Ordering::SeqCst);
        let ids: Vec<Uuid> = (first..first + count as u64)
            .map(|n| Uuid::from_u128(u128::from(self.base + n) | (0x4000 << 64)))
            .collect();
        let keys = ids
            .iter()
            .map(|id| (*id, KeyMaterial::new(key_bytes(id, len))))
            .collect();
        let metadata = serde_json::to_vec(&Meta { len, ids }).expect("metadata");
        Ok(Batch {
            keys,
            metadata: Some(metadata),
        })
    }

    async fn regenerate(
        &self,
        metadata: &[u8],
    ) -> Result<Vec<(Uuid, KeyMaterial)>, KeySourceError> {
        let meta: Meta = serde_json::from_slice(metadata)
            .map_err(|e| KeySourceError::BadMetadata(e.to_string()))?;
        if !self.regeneration.is_zero() {
            let now = self.regenerating.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_regenerating.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(self.regeneration).await;
            self.regenerating.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(meta
            .ids
            .iter()
            .map(|id| (*id, KeyMaterial::new(key_bytes(id, meta.len))))
            .collect())
    }
}
