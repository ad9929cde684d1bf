//! The crate's single error type.
//!
//! Every variant that concerns a file carries its path, because the operator
//! who reads the message has to know *which* of the many PEM files is wrong.
//!
//! A message names its cause itself (logs print errors with `Display` alone), so no variant
//! also returns that cause from `source()`: a report of the chain (anyhow's `{:#}`) would
//! print it twice.

use std::path::PathBuf;

/// Everything that can go wrong in `dqkd-pki`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A cluster name or entity ID is not usable (they become file names and URI parts).
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// What was being validated ("cluster name", "ID", ...).
        what: &'static str,
        /// The rejected value.
        value: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// A `dqkd://` URI could not be parsed into an identity.
    #[error("invalid dqkd identity URI {uri:?}: {reason}")]
    InvalidUri {
        /// The rejected URI.
        uri: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// A certificate names a different cluster than the one we serve.
    #[error("certificate belongs to cluster {found:?}, expected {expected:?}")]
    ClusterMismatch {
        /// Cluster we expected.
        expected: String,
        /// Cluster found in the certificate.
        found: String,
    },

    /// A certificate carries no usable identity.
    #[error("certificate carries no dqkd identity: {reason}")]
    NoIdentity {
        /// Why no identity could be derived.
        reason: &'static str,
    },

    /// A certificate could not be parsed as X.509.
    #[error("cannot parse certificate ({context}): {cause}")]
    CertificateParse {
        /// Where the certificate came from.
        context: String,
        /// Parser error.
        cause: x509_parser::error::X509Error,
    },

    /// Refusing to overwrite an existing file.
    #[error("{path} already exists; pass --force to overwrite it")]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },

    /// Reading or writing a file failed.
    #[error("{action} {path}: {cause}")]
    Io {
        /// "reading", "writing", ...
        action: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        cause: std::io::Error,
    },

    /// A PEM file could not be read or decoded.
    #[error("reading PEM file {path}: {cause}")]
    Pem {
        /// The file concerned.
        path: PathBuf,
        /// The decoder's error.
        cause: rustls_pki_types::pem::Error,
    },

    /// A PEM file lacks the object we need from it.
    #[error("{path} contains no {what}")]
    MissingPemObject {
        /// The file concerned.
        path: PathBuf,
        /// What was missing ("certificate", "private key", ...).
        what: &'static str,
    },

    /// A certificate to revoke was not issued by this CA.
    #[error("{path} was not issued by the CA in {ca} (or is a CA certificate itself)")]
    NotIssuedHere {
        /// The certificate file.
        path: PathBuf,
        /// The CA certificate file.
        ca: PathBuf,
    },

    /// The revocation list next to the CA cannot be used.
    #[error("revocation list {path}: {reason}")]
    InvalidCrl {
        /// The CRL file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// The CA files are inconsistent or not a dqkd CA.
    #[error("CA in {path}: {reason}")]
    InvalidCa {
        /// The CA certificate or key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// Certificate or key generation failed.
    #[error("{context}: {cause}")]
    Generate {
        /// What was being generated.
        context: String,
        /// rcgen's error.
        cause: rcgen::Error,
    },

    /// The requested validity cannot be honoured.
    #[error("invalid validity: {0}")]
    InvalidValidity(&'static str),

    /// Building the PKCS#12 bundle failed.
    #[error("building PKCS#12 file {path}: {cause}")]
    Pkcs12 {
        /// The bundle being built.
        path: PathBuf,
        /// p12-keystore's error.
        cause: p12_keystore::error::Error,
    },

    /// rustls rejected the configuration (bad key, unsupported versions, ...).
    #[error("{context}: {cause}")]
    Tls {
        /// What was being configured.
        context: String,
        /// rustls's error.
        cause: rustls::Error,
    },

    /// The client-certificate verifier could not be built.
    #[error("building the certificate verifier: {0}")]
    Verifier(rustls::server::VerifierBuilderError),
}

impl From<rustls::server::VerifierBuilderError> for PkiError {
    fn from(e: rustls::server::VerifierBuilderError) -> Self {
        PkiError::Verifier(e)
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = PkiError> = std::result::Result<T, E>;

impl PkiError {
    /// A failed file operation (`action` is "reading", "writing", …) on `path`.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        PkiError::Io {
            action,
            path: path.into(),
            cause,
        }
    }

    pub(crate) fn generate(context: impl Into<String>, cause: rcgen::Error) -> Self {
        PkiError::Generate {
            context: context.into(),
            cause,
        }
    }

    pub(crate) fn tls(context: impl Into<String>, cause: rustls::Error) -> Self {
        PkiError::Tls {
            context: context.into(),
            cause,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    /// The error and its sources, as anyhow's `{:#}` prints them.
    fn report(error: &dyn Error) -> String {
        let mut text = error.to_string();
        let mut next = error.source();
        while let Some(cause) = next {
            text = format!("{text}: {cause}");
            next = cause.source();
        }
        text
    }

    #[test]
    fn a_missing_file_is_named_once_with_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("ca.pem");
        let error = crate::load_certs(&missing).unwrap_err();
        let text = report(&error);
        assert_eq!(text.matches("(os error 2)").count(), 1, "{text}");
        assert_eq!(
            text.matches(&*missing.to_string_lossy()).count(),
            1,
            "{text}"
        );
    }

    #[test]
    fn every_wrapped_cause_is_printed_once() {
        let io = || std::io::Error::other("disk on fire");
        let errors = [
            PkiError::io("writing", "/x/ca.pem", io()),
            PkiError::tls("loading", rustls::Error::General("disk on fire".into())),
            PkiError::Pem {
                path: "/x/ca.pem".into(),
                cause: rustls_pki_types::pem::Error::Io(io()),
            },
        ];
        for error in errors {
            let text = report(&error);
            assert_eq!(text.matches("disk on fire").count(), 1, "{text}");
        }
    }
}
