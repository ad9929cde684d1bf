//! Who is on the other end of a connection.
//!
//! The identity of every dqkd entity is a URI SAN `dqkd://<cluster>/<role>/<id>`
//! in its certificate. The role decides which API a connection may use, so it
//! is parsed into a closed enum rather than passed around as a string.

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{PkiError, Result};
#[cfg(test)]
use crate::name::validate_name;
use crate::name::Name;

/// URI scheme prefix of every dqkd identity.
pub(crate) const SCHEME: &str = "dqkd://";

/// The kind of entity a certificate belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A Key Management Entity: serves SAEs, talks to peer KMEs and entropy servers.
    Kme,
    /// A Secure Application Entity: a client of the ETSI GS QKD 014 API.
    Sae,
    /// An entropy server, from which KMEs draw randomness.
    Entropy,
}

impl Role {
    /// The word used for this role in identity URIs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Kme => "kme",
            Role::Sae => "sae",
            Role::Entropy => "entropy",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kme" => Ok(Role::Kme),
            "sae" => Ok(Role::Sae),
            "entropy" => Ok(Role::Entropy),
            _ => Err(PkiError::InvalidName {
                what: "role",
                value: s.to_owned(),
                reason: "expected kme, sae or entropy",
            }),
        }
    }
}

/// A validated identity: cluster, role and ID.
///
/// Its names are [`Name`]s, so an `Identity` never holds one that could escape a directory
/// or a URI segment; IDs end up as file names, so this is a safety property.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    cluster: Name,
    role: Role,
    id: Name,
}

impl Identity {
    /// Builds an identity, validating the cluster name and ID.
    pub fn new(cluster: &str, role: Role, id: &str) -> Result<Self> {
        Ok(Identity {
            cluster: Name::new("cluster name", cluster)?,
            role,
            id: Name::new("ID", id)?,
        })
    }

    /// The cluster this identity belongs to.
    pub fn cluster(&self) -> &Name {
        &self.cluster
    }

    /// The entity's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The entity's ID (KME ID, SAE ID or entropy server ID).
    pub fn id(&self) -> &Name {
        &self.id
    }

    /// The URI form, `dqkd://<cluster>/<role>/<id>`.
    pub fn uri(&self) -> String {
        format!("{SCHEME}{}/{}/{}", self.cluster, self.role, self.id)
    }

    /// Parses the URI form produced by [`Identity::uri`].
    pub fn from_uri(uri: &str) -> Result<Self> {
        let bad = |reason| PkiError::InvalidUri {
            uri: uri.to_owned(),
            reason,
        };
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("does not start with dqkd://"))?;
        let mut parts = rest.split('/');
        let (Some(cluster), Some(role), Some(id), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected dqkd://<cluster>/<role>/<id>"));
        };
        let role = role.parse().map_err(|_| bad("unknown role"))?;
        Identity::new(cluster, role, id)
    }

    /// Derives the identity of a peer from its (already verified) certificate.
    ///
    /// This does **not** verify the certificate; call it only on certificates
    /// that the TLS handshake has checked against the cluster CA.
    ///
    /// Rules, from the architecture's *Identity* section:
    /// * a `dqkd://` URI SAN wins, and its cluster must be `expected_cluster`;
    /// * without one, a subject CN makes the peer an SAE whose ID is the CN, so
    ///   that SAE certificates made by other tools still work;
    /// * anything else is an error.
    pub fn from_certificate(der: &[u8], expected_cluster: &str) -> Result<Self> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::CertificateParse {
            context: "peer certificate".to_owned(),
            cause: nom_to_x509(e),
        })?;
        if let Some(uri) = dqkd_uri(&cert)? {
            let identity = Identity::from_uri(uri)?;
            if identity.cluster != expected_cluster {
                return Err(PkiError::ClusterMismatch {
                    expected: expected_cluster.to_owned(),
                    found: identity.cluster.into_string(),
                });
            }
            return Ok(identity);
        }
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .ok_or(PkiError::NoIdentity {
                reason: "no dqkd:// URI SAN and no subject CN",
            })?;
        let cn = cn.as_str().map_err(|_| PkiError::NoIdentity {
            reason: "subject CN is not a string",
        })?;
        Identity::new(expected_cluster, Role::Sae, cn)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}/{}", self.cluster, self.role, self.id)
    }
}

/// Returns the single `dqkd://` URI SAN of a certificate, if any.
///
/// Two dqkd URIs would make the identity ambiguous, so that is an error.
pub(crate) fn dqkd_uri<'a>(cert: &'a X509Certificate<'_>) -> Result<Option<&'a str>> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::CertificateParse {
            context: "subject alternative name".to_owned(),
            cause: e,
        })?;
    let mut found = None;
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        if let GeneralName::URI(uri) = name {
            if uri.starts_with(SCHEME) {
                if found.is_some() {
                    return Err(PkiError::NoIdentity {
                        reason: "more than one dqkd:// URI SAN",
                    });
                }
                found = Some(*uri);
            }
        }
    }
    Ok(found)
}

/// Flattens x509-parser's nom wrapper into its plain error.
pub(crate) fn nom_to_x509(
    e: x509_parser::nom::Err<x509_parser::error::X509Error>,
) -> x509_parser::error::X509Error {
    match e {
        x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
        x509_parser::nom::Err::Incomplete(_) => x509_parser::error::X509Error::InvalidCertificate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trip() {
        let id = Identity::new("lab", Role::Entropy, "e-1.a_b").unwrap();
        assert_eq!(id.uri(), "dqkd://lab/entropy/e-1.a_b");
        assert_eq!(Identity::from_uri(&id.uri()).unwrap(), id);
        assert_eq!(id.to_string(), id.uri());
    }

    #[test]
    fn bad_uris_rejected() {
        for uri in [
            "https://lab/kme/a",
            "dqkd://lab/kme",
            "dqkd://lab/kme/a/b",
            "dqkd://lab/ca",
            "dqkd://lab/admin/a",
            "dqkd:///kme/a",
            "dqkd://lab/kme/..",
        ] {
            assert!(Identity::from_uri(uri).is_err(), "{uri} accepted");
        }
    }

    #[test]
    fn names_validated() {
        assert!(validate_name("ID", "A-z_0.9").is_ok());
        assert!(validate_name("ID", &"a".repeat(64)).is_ok());
        for bad in ["", "a/b", "..", ".", "a b", "é", &"a".repeat(65)] {
            let err = validate_name("ID", bad).unwrap_err();
            assert!(matches!(err, PkiError::InvalidName { what: "ID", .. }));
        }
        assert!(Identity::new("bad/cluster", Role::Kme, "a").is_err());
    }

    #[test]
    fn role_words() {
        for role in [Role::Kme, Role::Sae, Role::Entropy] {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
        assert!("ca".parse::<Role>().is_err());
    }
}
