//! Issuing leaf certificates for KMEs, SAEs and entropy servers.
//!
//! Each issue writes the same four files, so that whatever the client stack
//! (rustls, reqwest, curl, Java, browsers) there is a form it can load.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use p12_keystore::{
    Certificate as P12Certificate, EncryptionAlgorithm, KeyStore, KeyStoreEntry, MacAlgorithm,
    PrivateKey as P12PrivateKey, PrivateKeyChain,
};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use crate::ca::{random_serial, Ca, CLOCK_SKEW};
use crate::error::{PkiError, Result};
use crate::files::{self, OutFile, Secrecy};
use crate::identity::{Identity, Role};

/// Default leaf validity: 825 days, the longest that Apple platforms accept for TLS server certificates.
pub const DEFAULT_VALIDITY_DAYS: u32 = 825;

/// PBKDF2 / MAC iteration count for PKCS#12 files (OpenSSL 3's own default is 2048).
const P12_ITERATIONS: u32 = 10_000;

/// Options for [`Ca::issue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueOptions {
    /// Directory to write the files into (created if missing).
    pub out_dir: PathBuf,
    /// DNS names for KME and entropy server certificates.
    ///
    /// When both this and `ip_addresses` are empty, KME and entropy certificates
    /// get `localhost`, `127.0.0.1` and `::1` so a single-host test cluster works.
    /// For SAEs they are added only if given.
    pub dns_names: Vec<String>,
    /// IP address SANs; see `dns_names`.
    pub ip_addresses: Vec<IpAddr>,
    /// Password of the `.p12` file; empty by default, as curl and many tools expect.
    pub p12_password: String,
    /// Replace existing files instead of refusing.
    pub force: bool,
    /// Validity in days (capped at the CA's own expiry).
    pub validity_days: u32,
}

impl Default for IssueOptions {
    fn default() -> Self {
        IssueOptions {
            out_dir: PathBuf::from("."),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            p12_password: String::new(),
            force: false,
            validity_days: DEFAULT_VALIDITY_DAYS,
        }
    }
}

/// What [`Ca::issue`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedPaths {
    /// The identity in the certificate.
    pub identity: Identity,
    /// `<id>.pem`: leaf certificate then CA certificate.
    pub cert_chain: PathBuf,
    /// `<id>.key`: PKCS#8 PEM private key, mode 0600.
    pub key: PathBuf,
    /// `<id>.combined.pem`: key, leaf, CA, as one file (reqwest `Identity::from_pem`).
    pub combined: PathBuf,
    /// `<id>.p12`: PKCS#12 (PBES2/AES-256-CBC, HMAC-SHA256), mode 0600.
    pub p12: PathBuf,
}

impl IssuedPaths {
    fn new(identity: Identity, dir: &Path) -> Self {
        let id = identity.id();
        IssuedPaths {
            cert_chain: dir.join(format!("{id}.pem")),
            key: dir.join(format!("{id}.key")),
            combined: dir.join(format!("{id}.combined.pem")),
            p12: dir.join(format!("{id}.p12")),
            identity,
        }
    }
}

impl Ca {
    /// Issues a certificate for `role`/`id` and writes it in all four forms.
    ///
    /// Nothing is written if any target file exists and `opts.force` is false,
    /// nor if any step of building the files fails.
    pub fn issue(&self, role: Role, id: &str, opts: &IssueOptions) -> Result<IssuedPaths> {
        let identity = Identity::new(&self.cluster, role, id)?;
        if opts.validity_days == 0 {
            return Err(PkiError::InvalidValidity(
                "validity_days must be at least 1",
            ));
        }
        let paths = IssuedPaths::new(identity, &opts.out_dir);
        files::ensure_free(
            [
                paths.cert_chain.as_path(),
                paths.key.as_path(),
                paths.combined.as_path(),
                paths.p12.as_path(),
            ],
            opts.force,
        )?;

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| PkiError::generate("generating leaf key", e))?;
        let params = self.leaf_params(&paths.identity, opts)?;
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)
            .map_err(|e| PkiError::generate("reading CA certificate", e))?;
        let leaf = params.signed_by(&key, &issuer).map_err(|e| {
            PkiError::generate(format!("signing certificate for {}", paths.identity), e)
        })?;

        let key_pem = Zeroizing::new(key.serialize_pem());
        let leaf_pem = leaf.pem();
        let chain_pem = format!("{leaf_pem}{}", self.cert_pem);
        let combined = Zeroizing::new(format!("{}{chain_pem}", key_pem.as_str()));
        let p12 = build_p12(
            &paths,
            &key,
            leaf.der(),
            &self.cert_der,
            &params.key_identifier(&key),
            &opts.p12_password,
        )?;

        files::create_dir(&opts.out_dir)?;
        files::write_all(
            &[
                OutFile {
                    path: paths.key.clone(),
                    contents: Zeroizing::new(key_pem.as_bytes().to_vec()),
                    secrecy: Secrecy::Secret,
                },
                OutFile {
                    path: paths.cert_chain.clone(),
                    contents: Zeroizing::new(chain_pem.into_bytes()),
                    secrecy: Secrecy::Public,
                },
                OutFile {
                    path: paths.combined.clone(),
                    contents: Zeroizing::new(combined.as_bytes().to_vec()),
                    secrecy: Secrecy::Secret,
                },
                OutFile {
                    path: paths.p12.clone(),
                    contents: p12,
                    secrecy: Secrecy::Secret,
                },
            ],
            opts.force,
        )?;
        Ok(paths)
    }

    fn leaf_params(&self, identity: &Identity, opts: &IssueOptions) -> Result<CertificateParams> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // SAEs: the CN *is* the SAE ID (the fallback identity for foreign certificates).
        // Others: a human-readable label; their identity comes only from the URI SAN.
        dn.push(
            DnType::CommonName,
            match identity.role() {
                Role::Sae => identity.id().to_string(),
                role => format!("dqkd {role} {}", identity.id()),
            },
        );
        params.distinguished_name = dn;

        let uri = identity
            .uri()
            .try_into()
            .map_err(|e| PkiError::generate("identity URI", e))?;
        let mut sans = vec![SanType::URI(uri)];
        let (dns_names, ips) = match identity.role() {
            Role::Kme | Role::Entropy
                if opts.dns_names.is_empty() && opts.ip_addresses.is_empty() =>
            {
                (
                    vec!["localhost".to_owned()],
                    vec![
                        IpAddr::V4(Ipv4Addr::LOCALHOST),
                        IpAddr::V6(Ipv6Addr::LOCALHOST),
                    ],
                )
            }
            _ => (opts.dns_names.clone(), opts.ip_addresses.clone()),
        };
        for name in dns_names {
            let name = name
                .clone()
                .try_into()
                .map_err(|e| PkiError::generate(format!("DNS name {name:?}"), e))?;
            sans.push(SanType::DnsName(name));
        }
        sans.extend(ips.into_iter().map(SanType::IpAddress));
        params.subject_alt_names = sans;

        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match identity.role() {
            // An SAE issued with names also serves on them: the responding end of
            // `dqkd psk` takes the key IDs its peer SAE sends over mutual TLS.
            Role::Sae if !opts.dns_names.is_empty() || !opts.ip_addresses.is_empty() => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Role::Sae => vec![ExtendedKeyUsagePurpose::ClientAuth],
            // KMEs serve SAEs and are clients of peer KMEs and entropy servers;
            // entropy servers serve KMEs and may in turn be clients.
            Role::Kme | Role::Entropy => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        params.use_authority_key_identifier_extension = true;

        self.set_validity(&mut params, opts)?;
        Ok(params)
    }
}

/// What [`Ca::issue_server`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerCertPaths {
    /// `<name>.pem`: leaf certificate then CA certificate.
    pub cert_chain: PathBuf,
    /// `<name>.key`: PKCS#8 PEM private key, mode 0600.
    pub key: PathBuf,
}

impl Ca {
    /// Issues a plain TLS server certificate for a service outside the cluster's identities
    /// (a PostgreSQL server, say): the given DNS names and IP addresses, `serverAuth` only,
    /// and no `dqkd://` identity, so its key can never act as a KME, SAE or entropy server.
    /// Writes `<name>.pem` (leaf then CA) and `<name>.key`. At least one DNS name or IP
    /// address is required: the client checks the server's name against them.
    pub fn issue_server(&self, name: &str, opts: &IssueOptions) -> Result<ServerCertPaths> {
        crate::name::validate_name("server name", name)?;
        if opts.validity_days == 0 {
            return Err(PkiError::InvalidValidity(
                "validity_days must be at least 1",
            ));
        }
        if opts.dns_names.is_empty() && opts.ip_addresses.is_empty() {
            return Err(PkiError::InvalidName {
                what: "server certificate",
                value: name.to_owned(),
                reason: "needs at least one DNS name or IP address (--dns, --ip)",
            });
        }
        let paths = ServerCertPaths {
            cert_chain: opts.out_dir.join(format!("{name}.pem")),
            key: opts.out_dir.join(format!("{name}.key")),
        };
        files::ensure_free(
            [paths.cert_chain.as_path(), paths.key.as_path()],
            opts.force,
        )?;

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| PkiError::generate("generating leaf key", e))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // A label with spaces: never mistaken for an SAE ID (an SAE's CN is its ID).
        dn.push(DnType::CommonName, format!("dqkd server {name}"));
        params.distinguished_name = dn;
        let mut sans = Vec::new();
        for dns in &opts.dns_names {
            let san = dns
                .clone()
                .try_into()
                .map_err(|e| PkiError::generate(format!("DNS name {dns:?}"), e))?;
            sans.push(SanType::DnsName(san));
        }
        sans.extend(opts.ip_addresses.iter().copied().map(SanType::IpAddress));
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        self.set_validity(&mut params, opts)?;

        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)
            .map_err(|e| PkiError::generate("reading CA certificate", e))?;
        let leaf = params
            .signed_by(&key, &issuer)
            .map_err(|e| PkiError::generate(format!("signing certificate for server {name}"), e))?;
        files::create_dir(&opts.out_dir)?;
        files::write_all(
            &[
                OutFile {
                    path: paths.key.clone(),
                    contents: Zeroizing::new(key.serialize_pem().into_bytes()),
                    secrecy: Secrecy::Secret,
                },
                OutFile {
                    path: paths.cert_chain.clone(),
                    contents: Zeroizing::new(
                        format!("{}{}", leaf.pem(), self.cert_pem).into_bytes(),
                    ),
                    secrecy: Secrecy::Public,
                },
            ],
            opts.force,
        )?;
        Ok(paths)
    }

    /// Validity from now (less clock skew) for `opts.validity_days`, capped at the CA's
    /// expiry, and a random serial number.
    fn set_validity(&self, params: &mut CertificateParams, opts: &IssueOptions) -> Result<()> {
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        // A leaf outliving its CA would only fail later and more confusingly.
        params.not_after =
            (now + Duration::days(i64::from(opts.validity_days))).min(self.not_after);
        if params.not_after <= now {
            return Err(PkiError::InvalidValidity("the CA certificate has expired"));
        }
        params.serial_number = Some(random_serial()?);
        Ok(())
    }
}

/// Builds the PKCS#12 bundle: key plus leaf and CA certificates, friendly name = ID.
///
/// PBES2 with AES-256-CBC and an HMAC-SHA256 MAC are chosen explicitly (not
/// left to the library default) because OpenSSL 3 refuses the legacy RC2/3DES
/// schemes without its legacy provider, and curl links OpenSSL.
fn build_p12(
    paths: &IssuedPaths,
    key: &KeyPair,
    leaf_der: &[u8],
    ca_der: &[u8],
    local_key_id: &[u8],
    password: &str,
) -> Result<Zeroizing<Vec<u8>>> {
    let p12_err = |source| PkiError::Pkcs12 {
        path: paths.p12.clone(),
        cause: source,
    };
    let private_key = P12PrivateKey::from_der(key.serialized_der()).map_err(p12_err)?;
    let certs = [
        P12Certificate::from_der(leaf_der).map_err(p12_err)?,
        P12Certificate::from_der(ca_der).map_err(p12_err)?,
    ];
    let chain = PrivateKeyChain::new(local_key_id, private_key, certs);
    let mut store = KeyStore::new();
    store.add_entry(paths.identity.id(), KeyStoreEntry::PrivateKeyChain(chain));
    store
        .writer(password)
        .encryption_algorithm(EncryptionAlgorithm::PbeWithHmacSha256AndAes256)
        .encryption_iterations(P12_ITERATIONS)
        .mac_algorithm(MacAlgorithm::HmacSha256)
        .mac_iterations(P12_ITERATIONS)
        .write()
        .map(Zeroizing::new)
        .map_err(p12_err)
}
