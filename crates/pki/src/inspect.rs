//! Checks of a process's certificate files before it starts (`dqkd check`). The chain is
//! judged by the same verifier the servers use ([`client_verifier`]), so a set of files
//! this accepts is one a server accepts, and the findings name the file at fault.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustls::pki_types::{CertificateRevocationListDer, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, Error as TlsError, InconsistentKeys};
use x509_parser::prelude::{FromDer as _, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::expiry::EXPIRY_WARNING;
use crate::{client_verifier, load_certs, load_crls, load_private_key, provider, KeyExchange};

/// The files one process uses for mutual TLS.
#[derive(Debug, Clone, Copy)]
pub struct CertificateFiles<'a> {
    /// The cluster CA certificate (PEM).
    pub ca: &'a Path,
    /// The process's certificate chain (PEM).
    pub cert: &'a Path,
    /// The process's private key (PEM).
    pub key: &'a Path,
    /// The cluster's revocation list, when the process follows one.
    pub crl: Option<&'a Path>,
}

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The process would refuse to start, or peers would refuse it.
    Problem,
    /// Works today, needs attention soon.
    Warning,
}

/// One thing wrong with one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The file at fault.
    pub file: PathBuf,
    /// Problem or warning.
    pub severity: Severity,
    /// What is wrong, in one line.
    pub message: String,
}

impl Finding {
    fn problem(file: &Path, message: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            severity: Severity::Problem,
            message: message.into(),
        }
    }

    fn warning(file: &Path, message: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            severity: Severity::Warning,
            message: message.into(),
        }
    }
}

/// Checks `files` as of `now`: the CA certificate is readable and valid; the revocation list
/// (if any) is readable, signed by that CA and not past its next update; the certificate
/// chains to the CA, is within its validity and is not revoked; the key is the
/// certificate's. Does not check whose certificate it is (see `dqkd_net`'s own-certificate
/// check).
pub fn inspect_certificates(files: CertificateFiles<'_>, now: SystemTime) -> Vec<Finding> {
    let mut out = Vec::new();
    let ca_certs = match load_certs(files.ca) {
        Ok(certs) => certs,
        Err(e) => {
            out.push(Finding::problem(files.ca, e.to_string()));
            return out;
        }
    };
    let ca = ca_certs
        .first()
        .map(|c| X509Certificate::from_der(c.as_ref()));
    let ca = match ca {
        Some(Ok((_, ca))) => ca,
        _ => {
            out.push(Finding::problem(
                files.ca,
                "the CA certificate cannot be parsed",
            ));
            return out;
        }
    };
    out.extend(validity(files.ca, "the CA certificate", &ca, now));
    let crls = match files.crl {
        Some(path) => match load_crls(path) {
            Ok(crls) => {
                out.extend(
                    crls.iter()
                        .flat_map(|crl| crl_findings(path, crl, &ca, now)),
                );
                crls
            }
            Err(e) => {
                out.push(Finding::problem(path, e.to_string()));
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    let chain = match load_certs(files.cert) {
        Ok(chain) => chain,
        Err(e) => {
            out.push(Finding::problem(files.cert, e.to_string()));
            return out;
        }
    };
    let verifier = match client_verifier(&ca_certs, crls) {
        Ok(verifier) => verifier,
        Err(e) => {
            out.push(Finding::problem(files.ca, e.to_string()));
            return out;
        }
    };
    // `load_certs` never returns an empty chain, so `chain[0]` is the leaf.
    let since_epoch = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    if let Err(e) = verifier.verify_client_cert(
        &chain[0],
        &chain[1..],
        UnixTime::since_unix_epoch(since_epoch),
    ) {
        out.push(Finding::problem(files.cert, chain_problem(&e, &files)));
    } else if let Ok((_, leaf)) = X509Certificate::from_der(chain[0].as_ref()) {
        // Only the warning: expiry itself was the verifier's finding.
        out.extend(
            validity(files.cert, "the certificate", &leaf, now)
                .into_iter()
                .filter(|f| f.severity == Severity::Warning),
        );
    }
    let key = match load_private_key(files.key) {
        Ok(key) => key,
        Err(e) => {
            out.push(Finding::problem(files.key, e.to_string()));
            return out;
        }
    };
    match CertifiedKey::from_der(chain, key, &provider(KeyExchange::PreferHybrid)) {
        Ok(_) => {}
        Err(TlsError::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            out.push(Finding::problem(
                files.key,
                format!(
                    "is not the key of the certificate in {}",
                    files.cert.display()
                ),
            ));
        }
        Err(e) => out.push(Finding::problem(files.key, format!("unusable key: {e}"))),
    }
    out
}

/// Expired, not yet valid, or expiring within [`EXPIRY_WARNING`].
fn validity(file: &Path, what: &str, cert: &X509Certificate<'_>, now: SystemTime) -> Vec<Finding> {
    let now = unix_seconds(now);
    let v = cert.validity();
    if now > v.not_after.timestamp() {
        return vec![Finding::problem(
            file,
            format!("{what} expired on {}", v.not_after),
        )];
    }
    if now < v.not_before.timestamp() {
        return vec![Finding::problem(
            file,
            format!("{what} is not valid before {}", v.not_before),
        )];
    }
    let left = v.not_after.timestamp() - now;
    if left < EXPIRY_WARNING.as_secs() as i64 {
        return vec![Finding::warning(
            file,
            format!(
                "{what} expires on {} (in {} days)",
                v.not_after,
                left / 86_400
            ),
        )];
    }
    Vec::new()
}

/// A revocation list must be the CA's and current: a list from another CA makes every
/// connection fail, and one past its next update is no longer being kept up to date.
fn crl_findings(
    path: &Path,
    der: &CertificateRevocationListDer<'_>,
    ca: &X509Certificate<'_>,
    now: SystemTime,
) -> Vec<Finding> {
    let crl = match CertificateRevocationList::from_der(der.as_ref()) {
        Ok((_, crl)) => crl,
        Err(e) => {
            return vec![Finding::problem(
                path,
                format!("cannot parse the list: {e}"),
            )]
        }
    };
    if crl.verify_signature(ca.public_key()).is_err() {
        return vec![Finding::problem(
            path,
            "is not signed by the cluster CA (the [tls] ca certificate)",
        )];
    }
    match crl.next_update() {
        Some(next) if next.timestamp() < unix_seconds(now) => vec![Finding::warning(
            path,
            format!("its next update was due on {next}; write it again with `dqkd pki crl`"),
        )],
        _ => Vec::new(),
    }
}

/// The verifier's refusal, said for an operator.
fn chain_problem(e: &TlsError, files: &CertificateFiles<'_>) -> String {
    let ca = files.ca.display();
    let crl = files
        .crl
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    match e {
        TlsError::InvalidCertificate(cert) => match cert {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the certificate has expired; issue a new one".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the certificate is not valid yet (check the clock)".into()
            }
            CertificateError::UnknownIssuer => {
                format!("the certificate was not issued by the CA in {ca}")
            }
            CertificateError::BadSignature => {
                format!("the certificate was not issued by the CA in {ca} (its signature does not verify)")
            }
            CertificateError::Revoked => format!("the certificate is revoked by {crl}"),
            CertificateError::UnknownRevocationStatus => {
                format!("{crl} holds no revocation list of the CA in {ca}")
            }
            other => format!("the certificate is refused: {other:?}"),
        },
        other => format!("the certificate is refused: {other}"),
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
