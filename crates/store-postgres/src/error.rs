//! Turning client, pool and server errors into [`StoreError::Database`] with context.

use dqkd_store::StoreError;

/// A tokio-postgres error whose message includes the server's SQLSTATE and message (the
/// client's own `Display` says only "db error"). The server's `DETAIL` is left out: it can
/// quote row values. The message already names the client error and its cause, so they are
/// not returned again from `source()` (a report of the chain would repeat them).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct PgFailure {
    message: String,
    /// Kept for `Debug`.
    error: tokio_postgres::Error,
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
        PgFailure {
            message,
            error: source,
        }
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
        cause: Box::new(PgFailure::new(e)),
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
            cause: Box::new(other),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    /// The error and its sources, as anyhow's `{:#}` prints them.
    fn report(error: &dyn Error) -> String {
        let mut text = error.to_string();
        let mut next = error.source();
        while let Some(cause) = next {
            text = format!("{text}: {cause}");
            next = cause.source();
        }
        text
    }

    #[tokio::test]
    async fn a_failed_connection_names_its_cause_once() {
        // Nothing listens on port 1 of the loopback address.
        let refused = tokio_postgres::connect(
            "host=127.0.0.1 port=1 user=dqkd connect_timeout=5",
            tokio_postgres::NoTls,
        )
        .await
        .err()
        .unwrap();
        let cause = refused.source().unwrap().to_string();
        let failure = PgFailure::new(refused);
        let text = report(&failure);
        assert_eq!(text.matches(&cause).count(), 1, "{text}");
        assert_eq!(text.matches("error connecting").count(), 1, "{text}");
        let error = StoreError::Database {
            context: "connecting to the PostgreSQL server".into(),
            cause: Box::new(failure),
        };
        let text = report(&error);
        assert_eq!(text.matches(&cause).count(), 1, "{text}");
    }
}
