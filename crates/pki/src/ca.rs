//! The cluster CA: one self-signed ECDSA P-256 certificate per cluster.
//!
//! Every dqkd certificate chains to this CA, which is what lets a KME trust
//! SAEs, peer KMEs and entropy servers with a single root.

use std::fmt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{PkiError, Result};
use crate::files::{self, OutFile, Secrecy};
use crate::identity::{self, SCHEME};
use crate::name::validate_name;

/// File name of the CA certificate inside the CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside the CA directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// How long a cluster CA is valid.
const CA_VALIDITY: Duration = Duration::days(3650);
/// Backdating of `notBefore`, so that hosts with slightly slow clocks accept fresh certificates.
pub(crate) const CLOCK_SKEW: Duration = Duration::minutes(5);

/// Where [`init_ca`] put the CA files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaPaths {
    /// The CA certificate (`ca.pem`).
    pub cert: PathBuf,
    /// The CA private key (`ca.key`, PKCS#8 PEM, mode 0600).
    pub key: PathBuf,
}

impl CaPaths {
    /// The standard file names inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        CaPaths {
            cert: dir.join(CA_CERT_FILE),
            key: dir.join(CA_KEY_FILE),
        }
    }
}

/// A loaded cluster CA, able to issue leaf certificates.
pub struct Ca {
    pub(crate) cluster: String,
    pub(crate) paths: CaPaths,
    pub(crate) cert_pem: String,
    pub(crate) cert_der: CertificateDer<'static>,
    pub(crate) key: KeyPair,
    pub(crate) not_after: OffsetDateTime,
}

impl fmt::Debug for Ca {
    // Hand-written so that the private key can never end up in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("cluster", &self.cluster)
            .field("paths", &self.paths)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// The cluster name, learnt from the CA certificate's `dqkd://<cluster>/ca` URI.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Where the CA was loaded from.
    pub fn paths(&self) -> &CaPaths {
        &self.paths
    }

    /// The CA certificate in PEM form.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate in DER form.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }
}

/// The URI SAN that marks a certificate as the CA of `cluster`.
fn ca_uri(cluster: &str) -> String {
    format!("{SCHEME}{cluster}/ca")
}

/// A random, positive 128-bit serial number.
///
/// Random rather than rcgen's key-derived default so that re-issuing with the
/// same key material never produces two certificates with one serial.
pub(crate) fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| {
            PkiError::tls(
                "generating a serial number",
                rustls::Error::FailedToGetRandomBytes,
            )
        })?;
    // Clear the top bit (DER INTEGERs are signed) and make sure it is non-zero.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Creates a new cluster CA in `dir` (`ca.pem` and `ca.key`).
///
/// Refuses to replace existing files unless `force`, because a new CA
/// invalidates every certificate the old one issued.
pub fn init_ca(cluster: &str, dir: &Path, force: bool) -> Result<CaPaths> {
    validate_name("cluster name", cluster)?;
    let paths = CaPaths::in_dir(dir);
    files::ensure_free([paths.cert.as_path(), paths.key.as_path()], force)?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| PkiError::generate("generating CA key", e))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("dqkd {cluster} cluster CA"));
    params.distinguished_name = dn;
    let uri = ca_uri(cluster)
        .try_into()
        .map_err(|e| PkiError::generate("CA URI", e))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + CA_VALIDITY;
    params.serial_number = Some(random_serial()?);
    let cert = params
        .self_signed(&key)
        .map_err(|e| PkiError::generate("self-signing CA certificate", e))?;

    files::create_dir(dir)?;
    files::write_all(
        &[
            OutFile {
                path: paths.key.clone(),
                contents: zeroize::Zeroizing::new(key.serialize_pem().into_bytes()),
                secrecy: Secrecy::Secret,
            },
            OutFile {
                path: paths.cert.clone(),
                contents: zeroize::Zeroizing::new(cert.pem().into_bytes()),
                secrecy: Secrecy::Public,
            },
        ],
        force,
    )?;
    Ok(paths)
}

/// Loads the CA written by [`init_ca`] from `dir`.
///
/// Checks that the certificate is a CA, that it carries a `dqkd://<cluster>/ca`
/// URI (which is where the cluster name comes from) and that the key matches.
pub fn load_ca(dir: &Path) -> Result<Ca> {
    let paths = CaPaths::in_dir(dir);
    let invalid = |path: &Path, reason: String| PkiError::InvalidCa {
        path: path.to_owned(),
        reason,
    };
    // Exactly one certificate: its PEM text is appended verbatim to every chain we write.
    let [cert_der] = <[CertificateDer<'static>; 1]>::try_from(crate::pem::load_certs(&paths.cert)?)
        .map_err(|certs| {
            invalid(
                &paths.cert,
                format!("expected exactly one certificate, found {}", certs.len()),
            )
        })?;
    let (_, parsed) =
        X509Certificate::from_der(&cert_der).map_err(|e| PkiError::CertificateParse {
            context: paths.cert.display().to_string(),
            cause: identity::nom_to_x509(e),
        })?;
    if !parsed.is_ca() {
        return Err(invalid(&paths.cert, "certificate is not a CA".to_owned()));
    }
    let uri = identity::dqkd_uri(&parsed)?
        .ok_or_else(|| invalid(&paths.cert, "no dqkd://<cluster>/ca URI SAN".to_owned()))?;
    let cluster = uri
        .strip_prefix(SCHEME)
        .and_then(|rest| rest.strip_suffix("/ca"))
        .ok_or_else(|| {
            invalid(
                &paths.cert,
                format!("URI {uri:?} is not dqkd://<cluster>/ca"),
            )
        })?;
    validate_name("cluster name", cluster)?;
    let not_after = parsed.validity().not_after.to_datetime();
    let spki = parsed.public_key().subject_public_key.data.to_vec();
    let cluster = cluster.to_owned();

    let key_pem = files::read_to_string(&paths.key)?;
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| invalid(&paths.key, format!("cannot read private key: {e}")))?;
    if key.public_key_raw() != spki.as_slice() {
        return Err(invalid(
            &paths.key,
            format!("key does not match certificate {}", paths.cert.display()),
        ));
    }
    let mut cert_pem = files::read_to_string(&paths.cert)?.to_string();
    if !cert_pem.ends_with('\n') {
        cert_pem.push('\n');
    }
    Ok(Ca {
        cluster,
        paths,
        cert_pem,
        cert_der,
        key,
        not_after,
    })
}
