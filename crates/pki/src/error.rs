//! The crate's single error type.
//!
//! Every variant that concerns a file carries its path, because the operator
//! who reads the message has to know *which* of the many PEM files is wrong.

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
    #[error("cannot parse certificate ({context}): {source}")]
    CertificateParse {
        /// Where the certificate came from.
        context: String,
        /// Parser error.
        #[source]
        source: x509_parser::error::X509Error,
    },

    /// Refusing to overwrite an existing file.
    #[error("{path} already exists; pass --force to overwrite it")]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },

    /// Reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// "reading", "writing", ...
        action: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A PEM file could not be read or decoded.
    #[error("reading PEM file {path}: {source}")]
    Pem {
        /// The file concerned.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: rustls_pki_types::pem::Error,
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
    #[error("{context}: {source}")]
    Generate {
        /// What was being generated.
        context: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },

    /// The requested validity cannot be honoured.
    #[error("invalid validity: {0}")]
    InvalidValidity(&'static str),

    /// Building the PKCS#12 bundle failed.
    #[error("building PKCS#12 file {path}: {source}")]
    Pkcs12 {
        /// The bundle being built.
        path: PathBuf,
        /// p12-keystore's error.
        #[source]
        source: p12_keystore::error::Error,
    },

    /// rustls rejected the configuration (bad key, unsupported versions, ...).
    #[error("{context}: {source}")]
    Tls {
        /// What was being configured.
        context: String,
        /// rustls's error.
        #[source]
        source: rustls::Error,
    },

    /// The client-certificate verifier could not be built.
    #[error("building the certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Shorthand used throughout the crate.
pub type Result<T, E = PkiError> = std::result::Result<T, E>;

impl PkiError {
    /// A failed file operation (`action` is "reading", "writing", …) on `path`.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PkiError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn generate(context: impl Into<String>, source: rcgen::Error) -> Self {
        PkiError::Generate {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn tls(context: impl Into<String>, source: rustls::Error) -> Self {
        PkiError::Tls {
            context: context.into(),
            source,
        }
    }
}
