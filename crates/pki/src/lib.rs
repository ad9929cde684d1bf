//! Public-key infrastructure for dqkd.
//!
//! Every certificate in a dqkd cluster comes from one cluster CA, and every
//! entity's identity is a URI SAN `dqkd://<cluster>/<role>/<id>` (see the
//! architecture's *Identity* section). This crate:
//!
//! * creates and loads the cluster CA ([`init_ca`], [`load_ca`]);
//! * issues KME, SAE and entropy-server certificates in the forms the various
//!   client stacks need ([`Ca::issue`]): PEM chain, PKCS#8 key, combined PEM
//!   and PKCS#12;
//! * turns a verified peer certificate into an [`Identity`];
//! * builds the rustls mutual-TLS configurations ([`server_config`],
//!   [`client_config`]).
//!
//! ```
//! use dqkd_pki::{init_ca, load_ca, IssueOptions, Role};
//!
//! # fn main() -> Result<(), dqkd_pki::PkiError> {
//! let dir = tempfile::tempdir().expect("tempdir");
//! init_ca("lab", dir.path(), false)?;
//! let ca = load_ca(dir.path())?;
//! let opts = IssueOptions { out_dir: dir.path().join("certs"), ..IssueOptions::default() };
//! let kme = ca.issue(Role::Kme, "kme-a", &opts)?;
//! let sae = ca.issue(Role::Sae, "sae-1", &opts)?;
//!
//! let ca_pem = &ca.paths().cert;
//! let _server = dqkd_pki::server_config(ca_pem, &kme.cert_chain, &kme.key)?;
//! let _client = dqkd_pki::client_config_from_combined(ca_pem, &sae.combined)?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod ca;
mod error;
mod expiry;
mod files;
mod identity;
mod inspect;
mod issue;
mod name;
mod pem;
mod pinned;
mod renew;
mod revoke;
mod tls;

pub use ca::{init_ca, load_ca, Ca, CaPaths, CA_CERT_FILE, CA_KEY_FILE};
pub use error::{PkiError, Result};
pub use expiry::{certificate_not_after, crl_next_update, seconds_left, EXPIRY_WARNING};
pub use identity::{Identity, Role};
pub use inspect::{inspect_certificates, CertificateFiles, Finding, Severity};
pub use issue::{IssueOptions, IssuedPaths, ServerCertPaths, DEFAULT_VALIDITY_DAYS};
pub use name::{validate_name, Name, MAX_NAME_LEN};
pub use pem::{load_certs, load_private_key};
pub use pinned::{pinned_client_config, IdentityMismatch, PinnedServerVerifier};
pub use renew::Renewed;
pub use revoke::{crl_number, load_crls, parse_crls, Revocation, CRL_FILE, LEDGER_FILE};
pub use tls::{
    client_config, client_config_from_combined, client_config_from_der, client_config_with_crl,
    client_config_with_crls, client_verifier, database_client_config, negotiated_group,
    peer_identity, provider, root_store, server_config, server_config_from_der,
    server_config_with_crl, server_config_with_verifier, KeyExchange,
};

/// Re-exported so callers can name the configuration types without adding rustls themselves.
pub use rustls;
