//! Why the issuer could not issue keys, apart from HTTP: [`ApiError`] is made from an
//! [`IssueError`] once, where the key service answers the SAE.

use dqkd_store::StoreError;

use crate::keysource::KeySourceError;
use crate::ApiError;

/// Why a batch, and so each request in it, failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// A peer site answered and refused the keys (its pair over quota, say). A batch of
    /// several requests is then tried request by request, so the refusal lands where it
    /// belongs.
    #[error("{0}")]
    Refused(String),
    /// Not now: a peer that did not answer in time, no entropy, a passed deadline.
    #[error("{0}")]
    Unavailable(String),
    /// The key source refused what it was asked for.
    #[error("{0}")]
    BadRequest(String),
    /// A failure inside this site (the store, a lost task); logged, answered without detail.
    #[error("internal error")]
    Internal(String),
}

impl From<IssueError> for ApiError {
    fn from(e: IssueError) -> Self {
        match e {
            IssueError::Refused(m) | IssueError::Unavailable(m) => Self::Unavailable(m),
            IssueError::BadRequest(m) => Self::BadRequest(m),
            IssueError::Internal(cause) => Self::Internal(cause),
        }
    }
}

impl From<StoreError> for IssueError {
    fn from(e: StoreError) -> Self {
        Self::Internal(format!("key store: {e}"))
    }
}

/// Bad regeneration metadata is the asker's fault; anything else is the key source's.
impl From<KeySourceError> for IssueError {
    fn from(e: KeySourceError) -> Self {
        match e {
            KeySourceError::BadMetadata(_) => Self::BadRequest(e.to_string()),
            other => Self::Unavailable(other.to_string()),
        }
    }
}
