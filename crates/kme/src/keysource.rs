//! Where key bytes come from.
//!
//! The KME asks a [`KeySource`] for fresh keys and never generates bytes itself, so the
//! BLAST-style generator replaces the operating-system source by changing one line of
//! wiring.

use dqkd_store::KeyMaterial;

/// A failure to produce key material.
#[derive(Debug, thiserror::Error)]
#[error("key source failed: {0}")]
pub struct KeySourceError(pub String);

/// Produces fresh, uniformly random keys.
pub trait KeySource: Send + Sync + 'static {
    /// `count` keys of `len` bytes each.
    fn generate(&self, count: usize, len: usize) -> Result<Vec<KeyMaterial>, KeySourceError>;
}

/// Keys straight from the operating system's CSPRNG (`getrandom`), for single-site pairs
/// and until the entropy-server generator is wired in.
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

impl KeySource for OsRandom {
    fn generate(&self, count: usize, len: usize) -> Result<Vec<KeyMaterial>, KeySourceError> {
        use ring::rand::SecureRandom;
        (0..count)
            .map(|_| {
                let mut bytes = vec![0u8; len];
                self.rng
                    .fill(&mut bytes)
                    .map_err(|_| KeySourceError("the operating system RNG failed".into()))?;
                Ok(KeyMaterial::new(bytes))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_random_gives_distinct_keys_of_the_asked_length() {
        let keys = OsRandom::default().generate(4, 32).expect("rng");
        assert_eq!(keys.len(), 4);
        assert!(keys.iter().all(|k| k.as_bytes().len() == 32));
        assert_ne!(keys[0].as_bytes(), keys[1].as_bytes());
    }
}
