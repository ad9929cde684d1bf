//! When the certificates and the revocation list a process holds stop being usable, so that
//! servers can publish it and warn before an expiry takes a site off the cluster.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::prelude::{CertificateRevocationList, FromDer, X509Certificate};

use crate::error::{PkiError, Result};
use crate::identity::nom_to_x509;

/// Below this, servers warn at start that a certificate or list needs renewing.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// The `notAfter` of the first certificate of a PEM file (the leaf of a chain).
pub fn certificate_not_after(path: &Path) -> Result<SystemTime> {
    let certs = crate::pem::load_certs(path)?;
    let first = certs.first().ok_or_else(|| PkiError::MissingPemObject {
        path: path.to_owned(),
        what: "certificate",
    })?;
    let (_, cert) = X509Certificate::from_der(first).map_err(|e| PkiError::CertificateParse {
        context: path.display().to_string(),
        cause: nom_to_x509(e),
    })?;
    Ok(unix_time(cert.validity().not_after.timestamp()))
}

/// The `nextUpdate` of the revocation list in a PEM file: after it, a strict verifier may
/// refuse the list, so it must be signed again before then (`dqkd pki crl`). `None` when the
/// list names no next update.
pub fn crl_next_update(path: &Path) -> Result<Option<SystemTime>> {
    let crls = crate::revoke::load_crls(path)?;
    let der = crls.first().ok_or_else(|| PkiError::MissingPemObject {
        path: path.to_owned(),
        what: "certificate revocation list",
    })?;
    let (_, crl) = CertificateRevocationList::from_der(der).map_err(|e| PkiError::InvalidCrl {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(crl.next_update().map(|t| unix_time(t.timestamp())))
}

/// Seconds from `now` until `at`, negative once it has passed.
pub fn seconds_left(at: SystemTime, now: SystemTime) -> i64 {
    match at.duration_since(now) {
        Ok(left) => i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
        Err(past) => -i64::try_from(past.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn unix_time(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(after) => UNIX_EPOCH + Duration::from_secs(after),
        Err(_) => UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
    }
}
