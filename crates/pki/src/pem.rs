//! Loading PEM files, with errors that name the file.

use std::path::Path;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{PkiError, Result};

/// Loads every certificate in a PEM file, in file order (leaf first for chains).
///
/// Other PEM sections (such as a private key in a combined file) are skipped.
/// An empty result is an error, since no caller can do anything with it.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem_err = |source| PkiError::Pem {
        path: path.to_owned(),
        cause: source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    if certs.is_empty() {
        return Err(PkiError::MissingPemObject {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Loads the first private key (PKCS#8, SEC1 or PKCS#1) from a PEM file.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| match source {
        pem::Error::NoItemsFound => PkiError::MissingPemObject {
            path: path.to_owned(),
            what: "private key",
        },
        cause => PkiError::Pem {
            path: path.to_owned(),
            cause,
        },
    })
}
