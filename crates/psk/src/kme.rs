//! This end's KME, called over the ETSI 014 API as this end's SAE.

use async_trait::async_trait;
use dqkd_client::{Client, KeyRequestBody};

use crate::key::{Psk, PSK_LEN};
use crate::ports::KeySource;
use crate::PskError;

/// Keys shared with one peer SAE, from one KME.
pub struct EtsiKeys {
    client: Client,
    peer_sae: String,
}

impl EtsiKeys {
    /// Keys shared with `peer_sae` through `client` (this SAE's client of its own KME).
    pub fn new(client: Client, peer_sae: &str) -> Self {
        Self {
            client,
            peer_sae: peer_sae.to_owned(),
        }
    }
}

#[async_trait]
impl KeySource for EtsiKeys {
    async fn new_key(&self) -> Result<(String, Psk), PskError> {
        let request = KeyRequestBody {
            number: Some(1),
            size: Some((PSK_LEN * 8) as u32),
            ..KeyRequestBody::default()
        };
        let mut container = self.client.enc_keys(&self.peer_sae, &request).await?;
        let key = container
            .keys
            .pop()
            .ok_or_else(|| PskError::BadKey("the KME answered no key".into()))?;
        Ok((key.key_ID.clone(), Psk::from_base64(&key.key)?))
    }

    async fn key_by_id(&self, key_id: &str) -> Result<Psk, PskError> {
        let mut container = self.client.dec_keys(&self.peer_sae, &[key_id]).await?;
        let key = container
            .keys
            .pop()
            .filter(|k| k.key_ID == key_id)
            .ok_or_else(|| PskError::BadKey(format!("the KME did not answer key {key_id}")))?;
        Psk::from_base64(&key.key)
    }
}
