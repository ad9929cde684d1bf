//! Following the cluster's revocation list while a process runs.
//!
//! Servers and clients both re-read the list when its bytes change, and both must never
//! move backwards: a list with a lower CRL number than the one in force would undo
//! revocations, so it is refused. One loop does that for both; what a new list means (a new
//! server configuration, or client verifiers and fresh connection pools) is the
//! [`CrlSubscriber`]'s business.

use std::path::PathBuf;
use std::time::Duration;

/// How often a process looks for a changed revocation list.
pub const CRL_POLL: Duration = Duration::from_secs(2);

/// What a process does with a changed revocation list.
pub(crate) trait CrlSubscriber: Send + 'static {
    /// The list in its loaded form.
    type Loaded: Send;
    /// Whether nobody uses the list any more (the loop then ends).
    fn is_gone(&self) -> bool;
    /// The CRL number of the list in force.
    fn in_force(&self) -> Option<u64>;
    /// Loads the list from its PEM bytes; returns its CRL number with it.
    fn load(&self, pem: &[u8]) -> Result<(Option<u64>, Self::Loaded), dqkd_pki::PkiError>;
    /// Puts a loaded list in force.
    fn install(&mut self, loaded: Self::Loaded);
}

/// Re-reads `crl` every [`CRL_POLL`] and hands every changed, loadable list that is not
/// older than the one in force to `subscriber`, until the subscriber is gone. `seen` is the
/// content in force at start. A list that cannot be read or loaded leaves the one in force.
pub(crate) async fn follow<S: CrlSubscriber>(crl: PathBuf, mut seen: Vec<u8>, mut subscriber: S) {
    let mut unreadable = false;
    loop {
        tokio::time::sleep(CRL_POLL).await;
        if subscriber.is_gone() {
            return;
        }
        let now = match std::fs::read(&crl) {
            Ok(now) => {
                unreadable = false;
                now
            }
            Err(e) => {
                if !unreadable {
                    tracing::error!(crl = %crl.display(), error = %e,
                        "the revocation list cannot be read; the previous one stays in force");
                    unreadable = true;
                }
                continue;
            }
        };
        if now == seen {
            continue;
        }
        let in_force = subscriber.in_force();
        let result = subscriber.load(&now);
        seen = now;
        match result {
            Ok((number, _)) if number < in_force => tracing::error!(
                crl = %crl.display(),
                number = ?number,
                in_force = ?in_force,
                "the revocation list is older than the one in force; it is ignored (it could undo revocations)"
            ),
            Ok((number, loaded)) => {
                tracing::info!(crl = %crl.display(), number = ?number, "revocation list reloaded");
                subscriber.install(loaded);
            }
            Err(e) => tracing::error!(
                crl = %crl.display(),
                error = %e,
                "the revocation list could not be loaded; the previous one stays in force"
            ),
        }
    }
}

/// Reads the list a process is told to use at start: a missing or unreadable list is an
/// error, since a process told to check revocations never runs without.
pub(crate) fn read_at_start(
    crl: Option<&std::path::Path>,
) -> Result<Option<Vec<u8>>, dqkd_pki::PkiError> {
    crl.map(|path| std::fs::read(path).map_err(|e| dqkd_pki::PkiError::io("reading", path, e)))
        .transpose()
}
