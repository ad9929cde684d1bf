//! The `[store]` section of a site file: where the keys are kept and how the KME reaches
//! PostgreSQL (TLS, verified, unless the host is loopback or plaintext is explicitly allowed).

use std::path::Path;

use super::{
    ClientCertFiles, ConfigError, KekLocation, PostgresTls, Secret, StoreFiles, StoreLocation,
};

/// The KEK file, or a `pkcs11:` URI with its module and PIN (`DQKD_PKCS11_MODULE` and
/// `DQKD_PKCS11_PIN` override the file's).
pub(super) fn kek_location(
    store: &StoreFiles,
    base: &Path,
    site_path: &Path,
) -> Result<KekLocation, ConfigError> {
    let invalid = |problem: String| ConfigError::Invalid {
        path: site_path.to_owned(),
        problem,
    };
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let Some(uri) = store.kek.to_str().filter(|k| k.starts_with("pkcs11:")) else {
        if store.pkcs11_module.is_some() || store.pkcs11_pin.is_some() {
            return Err(invalid(
                "[store] pkcs11_module and pkcs11_pin apply only when kek is a pkcs11: URI".into(),
            ));
        }
        return Ok(KekLocation::File(base.join(&store.kek)));
    };
    dqkd_kek_pkcs11::KekUri::parse(uri)
        .map_err(|e| invalid(format!("[store] kek {uri:?}: {e}")))?;
    let module = env("DQKD_PKCS11_MODULE")
        .map(Into::into)
        .or_else(|| store.pkcs11_module.as_ref().map(|m| base.join(m)))
        .ok_or_else(|| {
            invalid(
                "[store] kek is in a PKCS#11 token: set pkcs11_module (or DQKD_PKCS11_MODULE)"
                    .into(),
            )
        })?;
    let pin = env("DQKD_PKCS11_PIN")
        .map(Secret)
        .or_else(|| store.pkcs11_pin.clone())
        .ok_or_else(|| {
            invalid("[store] kek is in a PKCS#11 token: set DQKD_PKCS11_PIN (or pkcs11_pin)".into())
        })?;
    Ok(KekLocation::Pkcs11 {
        uri: uri.to_owned(),
        module,
        pin,
    })
}

/// Exactly one of `path` and `url`; `DQKD_STORE_URL` overrides the URL.
pub(super) fn store_location(
    store: &StoreFiles,
    base: &Path,
    site_path: &Path,
) -> Result<StoreLocation, ConfigError> {
    let invalid = |problem: &str| ConfigError::Invalid {
        path: site_path.to_owned(),
        problem: problem.to_owned(),
    };
    let url = std::env::var("DQKD_STORE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| store.url.clone());
    match (&store.path, url) {
        (Some(path), None) => {
            if store.ca.is_some()
                || store.cert.is_some()
                || store.key.is_some()
                || store.insecure_allow_plaintext
            {
                return Err(invalid(
                    "[store] ca, cert, key and insecure_allow_plaintext apply to PostgreSQL \
                     (url) only, not to the embedded store (path)",
                ));
            }
            Ok(StoreLocation::Embedded(base.join(path)))
        }
        (None, Some(url)) => {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(invalid("[store] url must be a postgres:// URL"));
            }
            let pool_size = store.pool_size.unwrap_or(16);
            if pool_size == 0 {
                return Err(invalid("[store] pool_size must be at least 1"));
            }
            let tls = postgres_tls(store, &url, base).map_err(|p| invalid(&p))?;
            Ok(StoreLocation::Postgres {
                url,
                pool_size,
                tls,
            })
        }
        (Some(_), Some(_)) => Err(invalid(
            "[store] names both path and url (or DQKD_STORE_URL is set): choose one store",
        )),
        (None, None) => Err(invalid(
            "[store] needs path (embedded store) or url (PostgreSQL)",
        )),
    }
}

/// TLS to PostgreSQL from `[store] ca`, `cert` and `key`, checked against what `url` says:
/// with `ca`, TLS is required (an `sslmode` allowing plaintext, or a Unix socket, contradicts
/// it); without, the connection is plaintext, which a host other than loopback gets only with
/// `insecure_allow_plaintext`.
fn postgres_tls(store: &StoreFiles, url: &str, base: &Path) -> Result<Option<PostgresTls>, String> {
    let facts = dqkd_store_postgres::url_transport(url)
        .map_err(|e| format!("[store] url (or DQKD_STORE_URL): {e}"))?;
    let client = match (&store.cert, &store.key) {
        (Some(cert), Some(key)) => Some(ClientCertFiles {
            cert: base.join(cert),
            key: base.join(key),
        }),
        (None, None) => None,
        _ => {
            return Err(
                "[store] cert and key (the client certificate for PostgreSQL) go \
                        together: give both or neither"
                    .into(),
            )
        }
    };
    let Some(ca) = &store.ca else {
        if client.is_some() {
            return Err(
                "[store] cert and key need [store] ca: a client certificate is sent only over \
                 TLS, and TLS needs the CA that signed the server's certificate"
                    .into(),
            );
        }
        if facts.ssl_mode == Some(dqkd_store_postgres::WrittenSslMode::Require) {
            return Err(
                "[store] url asks for sslmode=require but [store] ca is not set: dqkd verifies \
                 the database server's certificate (chain and host name), so name the CA that \
                 signed it in [store] ca"
                    .into(),
            );
        }
        if let Some(host) = facts.remote_host {
            if !store.insecure_allow_plaintext {
                return Err(format!(
                    "[store] url connects to {host} in plaintext: set [store] ca to the CA that \
                     signed the database server's certificate (TLS), or \
                     insecure_allow_plaintext = true to accept an unencrypted connection on a \
                     trusted network"
                ));
            }
        }
        return Ok(None);
    };
    if store.insecure_allow_plaintext {
        return Err(
            "[store] insecure_allow_plaintext contradicts [store] ca: with a CA the connection \
             is always TLS; remove one of them"
                .into(),
        );
    }
    if facts.unix_socket {
        return Err(
            "[store] ca is set but the url connects through a Unix socket, which PostgreSQL \
             never encrypts: connect to a TCP host, or remove ca"
                .into(),
        );
    }
    if let Some(
        mode @ (dqkd_store_postgres::WrittenSslMode::Disable
        | dqkd_store_postgres::WrittenSslMode::Prefer),
    ) = facts.ssl_mode
    {
        return Err(format!(
            "[store] url has sslmode={}, which contradicts [store] ca (with a CA the connection \
             is TLS, required and verified): remove sslmode from the url or write \
             sslmode=require",
            mode.as_str()
        ));
    }
    Ok(Some(PostgresTls {
        ca: base.join(ca),
        client,
    }))
}
