//! Where key bytes come from.
//!
//! The KME asks a [`KeySource`] for fresh keys and never generates bytes itself. Two
//! sources exist: [`OsRandom`] (the operating system's CSPRNG; same-site pairs only, for a
//! cluster without entropy servers) and [`crate::blast::Blast`], the BLAST-style generator
//! whose metadata lets a peer site regenerate the same keys.

use dqkd_store::KeyMaterial;
use uuid::Uuid;

/// A failure to produce or regenerate key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeySourceError {
    /// Not enough entropy servers answered (or none are configured for a cross-site key).
    #[error("{0}")]
    Unavailable(String),
    /// The metadata could not be decoded or does not fit this cluster.
    #[error("invalid key metadata: {0}")]
    BadMetadata(String),
    /// Regeneration read bytes that do not give the keys the peer made: a server answered
    /// the two sites differently, or the ranges were altered.
    #[error("key confirmation failed for key {key_id}: an entropy server answered the sites differently")]
    Confirmation {
        /// The first key whose tag did not match.
        key_id: Uuid,
    },
    /// The ranges can no longer be read (expired, shredded or already read).
    #[error("cannot regenerate: {0}")]
    Regenerate(String),
    /// The operating system RNG failed.
    #[error("the operating system RNG failed")]
    Rng,
}

/// A batch of fresh keys and what a peer needs to regenerate them.
pub struct Batch {
    /// Key IDs and bytes, in order.
    pub keys: Vec<(Uuid, KeyMaterial)>,
    /// Encoded regeneration metadata (`None` for keys no other site can regenerate).
    pub metadata: Option<Vec<u8>>,
}

/// Produces fresh, uniformly random keys.
#[async_trait::async_trait]
pub trait KeySource: Send + Sync + 'static {
    /// `count` keys of `len` bytes each, regenerable by the KMEs in `readers` (empty for a
    /// same-site batch).
    async fn generate(
        &self,
        count: usize,
        len: usize,
        readers: &[String],
    ) -> Result<Batch, KeySourceError>;

    /// Like [`generate`](Self::generate), but gives up at `deadline` (the deadline of the
    /// requests the keys are for).
    async fn generate_by(
        &self,
        count: usize,
        len: usize,
        readers: &[String],
        deadline: tokio::time::Instant,
    ) -> Result<Batch, KeySourceError> {
        tokio::time::timeout_at(deadline, self.generate(count, len, readers))
            .await
            .unwrap_or_else(|_| {
                Err(KeySourceError::Unavailable(
                    "no keys were made before the request's deadline".into(),
                ))
            })
    }

    /// Rebuilds the keys another site generated, from its metadata; checks every key's
    /// confirmation tag.
    async fn regenerate(&self, metadata: &[u8])
        -> Result<Vec<(Uuid, KeyMaterial)>, KeySourceError>;
}

/// Keys straight from the operating system's CSPRNG (`getrandom`). No other site can
/// regenerate them, so it serves same-site pairs only.
#[derive(Debug)]
pub struct OsRandom {
    rng: ring::rand::SystemRandom,
}

impl Default for OsRandom {
    fn default() -> Self {
        Self {
            rng: ring::rand::SystemRandom::new(),
        }
    }
}

#[async_trait::async_trait]
impl KeySource for OsRandom {
    async fn generate(
        &self,
        count: usize,
        len: usize,
        readers: &[String],
    ) -> Result<Batch, KeySourceError> {
        use ring::rand::SecureRandom;
        if !readers.is_empty() {
            return Err(KeySourceError::Unavailable(
                "keys shared with another site need entropy servers, and the manifest lists none"
                    .into(),
            ));
        }
        let ids = crate::keyid::new_key_ids(count).map_err(|_| KeySourceError::Rng)?;
        let keys = ids
            .into_iter()
            .map(|id| {
                let mut bytes = vec![0u8; len];
                self.rng.fill(&mut bytes).map_err(|_| KeySourceError::Rng)?;
                Ok((id, KeyMaterial::new(bytes)))
            })
            .collect::<Result<_, KeySourceError>>()?;
        Ok(Batch {
            keys,
            metadata: None,
        })
    }

    async fn regenerate(
        &self,
        _metadata: &[u8],
    ) -> Result<Vec<(Uuid, KeyMaterial)>, KeySourceError> {
        Err(KeySourceError::Unavailable(
            "this site has no entropy servers configured and cannot regenerate keys".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn os_random_gives_distinct_keys_of_the_asked_length() {
        let batch = OsRandom::default().generate(4, 32, &[]).await.expect("rng");
        assert_eq!(batch.keys.len(), 4);
        assert!(batch.keys.iter().all(|(_, k)| k.as_bytes().len() == 32));
        assert_ne!(batch.keys[0].1.as_bytes(), batch.keys[1].1.as_bytes());
        assert_ne!(batch.keys[0].0, batch.keys[1].0);
    }

    #[tokio::test]
    async fn os_random_refuses_cross_site_keys() {
        let err = OsRandom::default()
            .generate(1, 32, &["KME_B".into()])
            .await
            .err()
            .expect("refused");
        assert!(matches!(err, KeySourceError::Unavailable(_)));
    }
}
