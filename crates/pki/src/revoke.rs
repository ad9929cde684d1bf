//! Revoking certificates: the cluster CA's certificate revocation list (CRL).
//!
//! What this CA has revoked is recorded in [`LEDGER_FILE`] next to its key (a short text
//! file, as trusted as the CA directory itself), and published as the signed CRL
//! [`CRL_FILE`], which KMEs and entropy servers given `[tls] crl` check every caller
//! against and re-read when it changes. Each revocation adds one line to the ledger and
//! writes the CRL again with a CRL number one higher. Both files are replaced atomically, so
//! a server never reads half a list.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    CertificateRevocationListParams, Issuer, KeyIdMethod, RevokedCertParams, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ca::Ca;
use crate::error::{PkiError, Result};

/// File name of the CA's signed revocation list inside the CA directory.
pub const CRL_FILE: &str = "ca.crl.pem";

/// File name of the record of revocations inside the CA directory.
pub const LEDGER_FILE: &str = "revoked.txt";

/// Lock file held while the ledger changes.
const LOCK_FILE: &str = "revoked.lock";

/// What [`Ca::revoke`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// The certificate is now listed; `listed` certificates are revoked in all.
    Added {
        /// The certificate's serial number, hex.
        serial: String,
        /// How many certificates the CRL lists now.
        listed: usize,
    },
    /// The certificate was listed already; nothing changed.
    AlreadyRevoked {
        /// The certificate's serial number, hex.
        serial: String,
    },
}

/// The ledger: the last CRL number used and every revoked certificate.
#[derive(Debug, Default)]
struct Ledger {
    crl_number: u64,
    revoked: Vec<Listed>,
}

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    /// Serial number, lower-case hex of its DER content bytes.
    serial: String,
    revoked_at: OffsetDateTime,
    /// Whose certificate it was (its dqkd URI), for the operator reading the ledger.
    identity: String,
}

impl Ca {
    /// Where this CA's signed revocation list is ([`CRL_FILE`] in the CA directory).
    pub fn crl_path(&self) -> PathBuf {
        self.dir().join(CRL_FILE)
    }

    fn dir(&self) -> &Path {
        self.paths.cert.parent().unwrap_or(Path::new("."))
    }

    /// Revokes the leaf certificate of the PEM file `cert` (its first certificate), which
    /// this CA must have issued, and writes the CRL again.
    pub fn revoke(&self, cert: &Path) -> Result<Revocation> {
        let leaf = crate::pem::load_certs(cert)?
            .into_iter()
            .next()
            .ok_or_else(|| PkiError::MissingPemObject {
                path: cert.to_owned(),
                what: "certificate",
            })?;
        let (serial, identity) = self.issued_here(&leaf, cert)?;
        let _lock = LedgerLock::take(self.dir())?;
        let mut ledger = self.ledger()?;
        if ledger.revoked.iter().any(|l| l.serial == serial) {
            // Published again all the same: an earlier run may have recorded it and then
            // failed to write the list.
            self.publish(&mut ledger)?;
            return Ok(Revocation::AlreadyRevoked { serial });
        }
        ledger.revoked.push(Listed {
            serial: serial.clone(),
            // Whole seconds: the ledger keeps seconds, and the CRL must say the same.
            revoked_at: {
                let now = OffsetDateTime::now_utc();
                now.replace_nanosecond(0).unwrap_or(now)
            },
            identity,
        });
        self.publish(&mut ledger)?;
        Ok(Revocation::Added {
            serial,
            listed: ledger.revoked.len(),
        })
    }

    /// Writes the CRL again with what the ledger lists (nothing at first), signed now;
    /// returns its path. For a CA that has revoked nothing yet, this makes the file that
    /// servers are pointed at.
    pub fn write_crl(&self) -> Result<PathBuf> {
        let _lock = LedgerLock::take(self.dir())?;
        let mut ledger = self.ledger()?;
        self.publish(&mut ledger)?;
        Ok(self.crl_path())
    }

    /// The serial number (hex) and identity of `leaf`, after checking that this CA signed
    /// it and that it is not a CA itself.
    pub(crate) fn issued_here(
        &self,
        leaf: &CertificateDer<'_>,
        path: &Path,
    ) -> Result<(String, String)> {
        fn parse(der: &[u8], context: String) -> Result<X509Certificate<'_>> {
            X509Certificate::from_der(der)
                .map(|(_, cert)| cert)
                .map_err(|e| PkiError::CertificateParse {
                    context,
                    cause: crate::identity::nom_to_x509(e),
                })
        }
        let cert = parse(leaf, path.display().to_string())?;
        let ca = parse(&self.cert_der, self.paths.cert.display().to_string())?;
        let signed_here = cert.issuer().as_raw() == ca.subject().as_raw()
            && cert.verify_signature(Some(ca.public_key())).is_ok();
        if !signed_here || cert.is_ca() {
            return Err(PkiError::NotIssuedHere {
                path: path.to_owned(),
                ca: self.paths.cert.clone(),
            });
        }
        let serial = cert.raw_serial();
        if !canonical_positive(serial) {
            return Err(PkiError::InvalidCrl {
                path: path.to_owned(),
                reason: "its serial number is not a minimal positive integer, which a CRL \
                         cannot name exactly; re-issue the certificate with `dqkd pki issue`"
                    .into(),
            });
        }
        // Only a validated identity goes into the ledger: a line break in a URI would
        // otherwise forge ledger lines.
        let identity = crate::identity::Identity::from_certificate(leaf, &self.cluster)
            .map(|id| id.uri())
            .unwrap_or_else(|_| "-".to_owned());
        Ok((to_hex(serial), identity))
    }

    /// Reads the ledger (empty for a CA that has revoked nothing).
    fn ledger(&self) -> Result<Ledger> {
        let path = self.dir().join(LEDGER_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ledger::default()),
            Err(e) => return Err(PkiError::io("reading", &path, e)),
        };
        let mut ledger = Ledger::default();
        for (n, line) in text.lines().enumerate() {
            let invalid = |reason: &str| PkiError::InvalidCrl {
                path: path.clone(),
                reason: format!("line {}: {reason}", n + 1),
            };
            let mut words = line.split_whitespace();
            match words.next() {
                None => {}
                Some(w) if w.starts_with('#') => {}
                Some("crl_number") => {
                    ledger.crl_number = words
                        .next()
                        .and_then(|w| w.parse().ok())
                        .ok_or_else(|| invalid("crl_number needs a number"))?;
                }
                Some("revoked") => {
                    let (Some(serial), Some(at), identity) =
                        (words.next(), words.next(), words.next())
                    else {
                        return Err(invalid("expected: revoked <serial> <unix seconds> <who>"));
                    };
                    if serial.is_empty()
                        || serial.len() % 2 != 0
                        || !serial.bytes().all(|b| b.is_ascii_hexdigit())
                    {
                        return Err(invalid("the serial number is not hex"));
                    }
                    let revoked_at = at
                        .parse::<i64>()
                        .ok()
                        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
                        .ok_or_else(|| invalid("the time is not unix seconds"))?;
                    ledger.revoked.push(Listed {
                        serial: serial.to_ascii_lowercase(),
                        revoked_at,
                        identity: identity.unwrap_or("-").to_owned(),
                    });
                }
                Some(other) => return Err(invalid(&format!("unknown entry {other:?}"))),
            }
        }
        Ok(ledger)
    }

    /// Signs a CRL of everything in `ledger` with the next CRL number, then writes the
    /// ledger and the CRL (the ledger first: a CRL number is never used twice).
    fn publish(&self, ledger: &mut Ledger) -> Result<()> {
        ledger.crl_number += 1;
        let now = OffsetDateTime::now_utc();
        let mut revoked_certs = Vec::with_capacity(ledger.revoked.len());
        for listed in &ledger.revoked {
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&from_hex(&listed.serial)),
                revocation_time: listed.revoked_at,
                reason_code: None,
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: now,
            // The list stays authoritative for as long as the CA is valid: servers do not
            // treat an old list as expired, they re-read the file when it changes.
            next_update: self.not_after.max(now + time::Duration::days(1)),
            crl_number: SerialNumber::from(ledger.crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)
            .map_err(|e| PkiError::generate("reading the CA certificate", e))?;
        let pem = params
            .signed_by(&issuer)
            .and_then(|crl| crl.pem())
            .map_err(|e| PkiError::generate("signing the revocation list", e))?;
        let mut text = String::from(
            "# Certificates this CA has revoked, kept by `dqkd pki revoke`; ca.crl.pem is made\n\
             # from it. Lines: crl_number <last used>, revoked <serial hex> <unix seconds> <who>.\n",
        );
        text.push_str(&format!("crl_number {}\n", ledger.crl_number));
        for l in &ledger.revoked {
            text.push_str(&format!(
                "revoked {} {} {}\n",
                l.serial,
                l.revoked_at.unix_timestamp(),
                l.identity
            ));
        }
        replace_file(&self.dir().join(LEDGER_FILE), text.as_bytes())?;
        replace_file(&self.crl_path(), pem.as_bytes())
    }
}

/// Loads every CRL in a PEM file.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>> {
    let pem = std::fs::read(path).map_err(|e| PkiError::io("reading", path, e))?;
    parse_crls(&pem, path)
}

/// Every CRL in PEM text read from `path` (named in errors); none is an error.
pub fn parse_crls(pem: &[u8], path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>> {
    let crls = CertificateRevocationListDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|source| PkiError::Pem {
            path: path.to_owned(),
            cause: source,
        })?;
    if crls.is_empty() {
        return Err(PkiError::MissingPemObject {
            path: path.to_owned(),
            what: "certificate revocation list",
        });
    }
    // One cluster, one CA, one list. With several, the certificate checks use the first
    // list of the issuer while the rollback guard reads the highest number of all, so an
    // old list placed before the current one would undo revocations unnoticed.
    if crls.len() > 1 {
        return Err(PkiError::InvalidCrl {
            path: path.to_owned(),
            reason: format!(
                "holds {} revocation lists; dqkd reads exactly one, the cluster CA's",
                crls.len()
            ),
        });
    }
    Ok(crls)
}

/// The highest CRL number among `crls` (`None` when none carries one it can read), so a
/// server can refuse to go back to an older list, which would undo revocations.
pub fn crl_number(crls: &[CertificateRevocationListDer<'_>]) -> Option<u64> {
    crls.iter()
        .filter_map(|der| {
            let (_, crl) =
                x509_parser::prelude::CertificateRevocationList::from_der(der.as_ref()).ok()?;
            match crl.crl_number()?.to_u64_digits().as_slice() {
                [] => Some(0),
                [n] => Some(*n),
                _ => Some(u64::MAX),
            }
        })
        .max()
}

/// Writes `contents` to `path` through a temporary file and a rename, so a reader sees the
/// old file or the new one, never part of one. The file is world-readable whatever the
/// umask: servers running as other users read the list.
fn replace_file(path: &Path, contents: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o644);
        }
        let mut file = options.open(&tmp)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        }
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        PkiError::io("writing", path, e)
    })
}

/// Held while the ledger is read, changed and written, so that two revocations at once
/// cannot lose one: a lock file made with `create_new`, removed when dropped.
struct LedgerLock(PathBuf);

impl LedgerLock {
    fn take(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(_) => Ok(Self(path)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(PkiError::InvalidCrl {
                path: path.clone(),
                reason: "another revocation is being written (if none is, an earlier run \
                         stopped half-way: remove this file and run the command again)"
                    .into(),
            }),
            Err(e) => Err(PkiError::io("creating", &path, e)),
        }
    }
}

impl Drop for LedgerLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Whether `serial` (DER integer content bytes) is a minimal positive integer: the form a
/// CRL writes it in, and so the only one a server can match against the list.
fn canonical_positive(serial: &[u8]) -> bool {
    match serial {
        [] => false,
        [first, ..] if first & 0x80 != 0 => false,
        [0] => false,
        [0, second, ..] => second & 0x80 != 0,
        _ => true,
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex already checked by the ledger's reader (or made by [`to_hex`]).
fn from_hex(hex: &str) -> Vec<u8> {
    hex.as_bytes()
        .chunks(2)
        .map(|pair| {
            let digit = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
            digit(pair[0]) << 4 | digit(pair.get(1).copied().unwrap_or(b'0'))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_minimal_positive_serials_are_revocable() {
        assert!(canonical_positive(&[0x01]));
        assert!(canonical_positive(&[0x7f, 0xff]));
        assert!(canonical_positive(&[0x00, 0x80]));
        assert!(!canonical_positive(&[]));
        assert!(!canonical_positive(&[0x00]));
        assert!(!canonical_positive(&[0x80]), "negative");
        assert!(!canonical_positive(&[0x00, 0x01]), "not minimal");
    }

    #[test]
    fn hex_round_trips() {
        for bytes in [
            vec![0x00, 0x80, 0x01],
            vec![0x7f],
            vec![0x12, 0xab, 0xcd, 0xef],
        ] {
            assert_eq!(from_hex(&to_hex(&bytes)), bytes);
        }
    }
}
