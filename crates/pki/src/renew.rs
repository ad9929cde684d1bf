//! Renewing a certificate: the same identity and names, a fresh key and a fresh validity,
//! so an operator replaces an expiring certificate without retyping how it was issued.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ca::Ca;
use crate::error::{PkiError, Result};
use crate::identity::{dqkd_uri, nom_to_x509, Identity};
use crate::issue::IssueOptions;

/// What [`Ca::renew`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewed {
    /// A KME, SAE or entropy-server certificate, in all four forms.
    Identity(crate::issue::IssuedPaths),
    /// A plain TLS server certificate (`dqkd pki issue server`).
    Server(crate::issue::ServerCertPaths),
}

impl Renewed {
    /// The certificate chain written.
    pub fn cert_chain(&self) -> &Path {
        match self {
            Self::Identity(paths) => &paths.cert_chain,
            Self::Server(paths) => &paths.cert_chain,
        }
    }
}

impl Ca {
    /// Issues the certificate of the PEM file `cert` again, which this CA must have issued:
    /// the same identity (or, for a plain server certificate, the same file name), the same
    /// DNS and IP names, a new key, and `validity_days` from now. The files are replaced in
    /// the certificate's own folder; `p12_password` protects the new `.p12`.
    pub fn renew(&self, cert: &Path, p12_password: &str, validity_days: u32) -> Result<Renewed> {
        let leaf = crate::pem::load_certs(cert)?
            .into_iter()
            .next()
            .ok_or_else(|| PkiError::MissingPemObject {
                path: cert.to_owned(),
                what: "certificate",
            })?;
        self.issued_here(&leaf, cert)?;
        let (_, parsed) =
            X509Certificate::from_der(&leaf).map_err(|e| PkiError::CertificateParse {
                context: cert.display().to_string(),
                cause: nom_to_x509(e),
            })?;
        let (dns_names, ip_addresses) = names(&parsed, cert)?;
        let options = IssueOptions {
            out_dir: cert
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
            dns_names,
            ip_addresses,
            p12_password: p12_password.to_owned(),
            force: true,
            validity_days,
        };
        if dqkd_uri(&parsed)?.is_some() {
            let identity = Identity::from_certificate(&leaf, &self.cluster)?;
            return Ok(Renewed::Identity(self.issue(
                identity.role(),
                identity.id(),
                &options,
            )?));
        }
        // No dqkd identity: a server certificate, named after its file.
        let name = cert
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".pem"))
            .ok_or_else(|| PkiError::NoIdentity {
                reason: "no dqkd:// URI SAN, and the file name is not <name>.pem",
            })?;
        Ok(Renewed::Server(self.issue_server(name, &options)?))
    }
}

/// The DNS names and IP addresses among a certificate's subject alternative names.
fn names(cert: &X509Certificate<'_>, path: &Path) -> Result<(Vec<String>, Vec<IpAddr>)> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::CertificateParse {
            context: path.display().to_string(),
            cause: e,
        })?;
    let (mut dns, mut ips) = (Vec::new(), Vec::new());
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        match name {
            GeneralName::DNSName(d) => dns.push((*d).to_owned()),
            GeneralName::IPAddress(bytes) => {
                if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                    ips.push(IpAddr::from(v4));
                } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                    ips.push(IpAddr::from(v6));
                }
            }
            _ => {}
        }
    }
    Ok((dns, ips))
}
