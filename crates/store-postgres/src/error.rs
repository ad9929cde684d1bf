//! Turning client, pool and server errors into [`StoreError::Database`] with context.

use dqkd_store::StoreError;

/// A tokio-postgres error whose message includes the server's SQLSTATE and message (the
/// client's own `Display` says only "db error"). The server's `DETAIL` is left out: it can
/// quote row values.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct PgFailure {
    message: String,
    #[source]
    source: tokio_postgres::Error,
}

impl PgFailure {
    pub(crate) fn new(source: tokio_postgres::Error) -> Self {
        let message = match source.as_db_error() {
            Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
            None => match std::error::Error::source(&source) {
                Some(cause) => match tls_hint(cause) {
                    Some(hint) => format!("{source}: {cause} ({hint})"),
                    None => format!("{source}: {cause}"),
                },
                None => source.to_string(),
            },
        };
        PgFailure { message, source }
    }
}

/// Plain words for the certificate failures an operator meets first, found anywhere in the
/// cause chain (tokio-rustls hands rustls errors over inside `io::Error`).
fn tls_hint(cause: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use rustls::CertificateError;
    let mut next = Some(cause);
    while let Some(e) = next {
        let rustls_error = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(cert)) = rustls_error {
            return match cert {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    Some("the database server's certificate was not issued by the configured CA")
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    Some("the database server's certificate does not name the host in the URL")
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Some("the database server's certificate has expired")
                }
                _ => None,
            };
        }
        next = e.source();
    }
    None
}

/// Wraps a client error with what was being done.
pub(crate) fn db(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |e| StoreError::Database {
        context: context.into(),
        source: Box::new(PgFailure::new(e)),
    }
}

/// Wraps a pool error (no free connection could be made) with what was being done.
pub(crate) fn pool(
    context: &'static str,
) -> impl FnOnce(deadpool_postgres::PoolError) -> StoreError {
    move |e| match e {
        deadpool_postgres::PoolError::Backend(e) => db(context)(e),
        other => StoreError::Database {
            context: context.into(),
            source: Box::new(other),
        },
    }
}
