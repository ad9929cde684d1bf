//! How the connection to PostgreSQL is protected: plaintext or TLS that verifies the server.
//!
//! With a TLS configuration, every connection (the pool's and the one holding pool claims)
//! must be TLS (`sslmode=require` semantics: no fallback to plaintext), and the rustls
//! configuration verifies the whole chain and the host name, which libpq's `require` does
//! not. Without one, connections are plaintext. Whether plaintext is acceptable for a host is
//! the caller's policy; [`UrlTransport`] tells it where a URL leads.

use std::net::IpAddr;
use std::sync::Arc;

use dqkd_store::StoreError;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::db;

/// What a connection URL says about its transport, for checking it against the
/// configuration before anything connects.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UrlTransport {
    /// The first host (or `hostaddr`) that is neither loopback (127.0.0.0/8, `::1`,
    /// `localhost`) nor a Unix socket; `None` when every one is local.
    pub remote_host: Option<String>,
    /// Whether a host is a Unix socket path (PostgreSQL never encrypts those).
    pub unix_socket: bool,
    /// The `sslmode` written in the URL (`None` when absent).
    pub ssl_mode: Option<WrittenSslMode>,
}

/// An `sslmode` written in a connection URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrittenSslMode {
    /// `sslmode=disable`.
    Disable,
    /// `sslmode=prefer` (plaintext if the server offers no TLS).
    Prefer,
    /// `sslmode=require`.
    Require,
}

impl WrittenSslMode {
    /// The word as written.
    pub fn as_str(self) -> &'static str {
        match self {
            WrittenSslMode::Disable => "disable",
            WrittenSslMode::Prefer => "prefer",
            WrittenSslMode::Require => "require",
        }
    }
}

/// Parses `url` (a `postgres://` URL or `key=value` string) and says where it leads.
pub fn url_transport(url: &str) -> Result<UrlTransport, StoreError> {
    let config = parse(url)?;
    let mut remote_host = None;
    let mut unix_socket = false;
    for host in config.get_hosts() {
        match host {
            Host::Tcp(name) if !is_loopback(name) => {
                remote_host.get_or_insert_with(|| name.clone());
            }
            Host::Tcp(_) => {}
            #[cfg(unix)]
            Host::Unix(_) => unix_socket = true,
        }
    }
    // `hostaddr` is where the connection really goes (`host` then only names the server).
    for addr in config.get_hostaddrs() {
        if !addr.is_loopback() {
            remote_host.get_or_insert_with(|| addr.to_string());
        }
    }
    // tokio-postgres defaults to `prefer` and does not say whether it was written.
    let ssl_mode = url
        .contains("sslmode")
        .then(|| match config.get_ssl_mode() {
            SslMode::Disable => WrittenSslMode::Disable,
            SslMode::Require => WrittenSslMode::Require,
            _ => WrittenSslMode::Prefer,
        });
    Ok(UrlTransport {
        remote_host,
        unix_socket,
        ssl_mode,
    })
}

/// The TCP endpoints (host, port) a connection URL names, in order, so that a check can see
/// whether the database answers without logging in. Unix sockets are left out.
pub fn url_tcp_endpoints(url: &str) -> Result<Vec<(String, u16)>, StoreError> {
    let config = parse(url)?;
    let ports = config.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    Ok(config
        .get_hosts()
        .iter()
        .enumerate()
        .filter_map(|(i, host)| match host {
            Host::Tcp(name) => Some((name.clone(), port(i))),
            #[cfg(unix)]
            Host::Unix(_) => None,
        })
        .collect())
}

/// Parses a connection URL, explaining libpq's verifying modes, which tokio-postgres lacks.
pub(crate) fn parse(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    url.parse().map_err(|e| {
        if url.contains("sslmode=verify-") {
            StoreError::Database {
                context: "parsing the key database URL: sslmode=verify-ca and verify-full are \
                          not understood; write sslmode=require or leave it out (with a TLS \
                          configuration the server's certificate and name are always verified)"
                    .into(),
                cause: Box::new(crate::error::PgFailure::new(e)),
            }
        } else {
            db("parsing the key database URL")(e)
        }
    })
}

/// `localhost`, or an IP address in 127.0.0.0/8 or `::1` (brackets allowed).
fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The connector every connection of a store uses.
#[derive(Clone)]
pub(crate) enum Connector {
    /// No TLS: `sslmode` is forced to `disable`.
    Plain,
    /// TLS required, verified by the configuration.
    Tls(MakeRustlsConnect),
}

impl Connector {
    /// The connector for `tls`, after making `config` demand exactly that: TLS with no
    /// fallback, or none. A URL asking for the other is refused rather than overridden.
    pub(crate) fn new(
        config: &mut tokio_postgres::Config,
        url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, StoreError> {
        let written = url_transport(url)?.ssl_mode;
        let refuse = |problem: &str| StoreError::Database {
            context: format!("key database URL: {problem}"),
            cause: Box::new(std::io::Error::other("sslmode contradicts the TLS setting")),
        };
        match tls {
            Some(tls) => {
                if matches!(
                    written,
                    Some(WrittenSslMode::Disable | WrittenSslMode::Prefer)
                ) {
                    return Err(refuse(
                        "sslmode allows plaintext, but TLS is configured (and then required)",
                    ));
                }
                config.ssl_mode(SslMode::Require);
                Ok(Connector::Tls(MakeRustlsConnect::new((*tls).clone())))
            }
            None => {
                if written == Some(WrittenSslMode::Require) {
                    return Err(refuse(
                        "sslmode=require, but no TLS configuration (no CA to verify the \
                         server with) is given",
                    ));
                }
                config.ssl_mode(SslMode::Disable);
                Ok(Connector::Plain)
            }
        }
    }

    /// Opens one connection, driving it on a task of its own; `on_end` runs with the error
    /// that ended it, if any.
    pub(crate) async fn connect(
        &self,
        config: &tokio_postgres::Config,
        on_end: impl FnOnce(tokio_postgres::Error) + Send + 'static,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        match self {
            Connector::Plain => {
                let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        on_end(e);
                    }
                });
                Ok(client)
            }
            Connector::Tls(tls) => {
                let (client, connection) = config.connect(tls.clone()).await?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        on_end(e);
                    }
                });
                Ok(client)
            }
        }
    }

    /// The pool manager over this connector.
    pub(crate) fn manager(
        &self,
        config: tokio_postgres::Config,
        manager_config: deadpool_postgres::ManagerConfig,
    ) -> deadpool_postgres::Manager {
        match self {
            Connector::Plain => deadpool_postgres::Manager::from_config(
                config,
                tokio_postgres::NoTls,
                manager_config,
            ),
            Connector::Tls(tls) => {
                deadpool_postgres::Manager::from_config(config, tls.clone(), manager_config)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_and_sockets_are_local() {
        for url in [
            "postgres://u@127.0.0.1/db",
            "postgres://u@127.8.9.10:6543/db",
            "postgres://u@localhost/db",
            "postgres://u@[::1]:5432/db",
            "host=/var/run/postgresql user=u",
        ] {
            let t = url_transport(url).expect(url);
            assert_eq!(t.remote_host, None, "{url}");
        }
        assert!(
            url_transport("host=/var/run/postgresql user=u")
                .expect("socket")
                .unix_socket
        );
    }

    #[test]
    fn other_hosts_are_remote() {
        for (url, host) in [
            ("postgres://u@db.example.net/db", "db.example.net"),
            ("postgres://u@10.0.0.5/db", "10.0.0.5"),
            ("postgres://u@[2001:db8::1]/db", "2001:db8::1"),
            ("host=localhost hostaddr=10.1.1.1 user=u", "10.1.1.1"),
            (
                "postgres://u@localhost,db2.example.net/db",
                "db2.example.net",
            ),
        ] {
            let t = url_transport(url).expect(url);
            assert_eq!(t.remote_host.as_deref(), Some(host), "{url}");
        }
    }

    #[test]
    fn a_written_sslmode_is_reported() {
        let mode = |url: &str| url_transport(url).expect(url).ssl_mode;
        assert_eq!(mode("postgres://u@h/db"), None);
        assert_eq!(
            mode("postgres://u@h/db?sslmode=require"),
            Some(WrittenSslMode::Require)
        );
        assert_eq!(
            mode("postgres://u@h/db?sslmode=prefer"),
            Some(WrittenSslMode::Prefer)
        );
        assert_eq!(
            mode("host=h sslmode=disable"),
            Some(WrittenSslMode::Disable)
        );
        let err = url_transport("postgres://u@h/db?sslmode=verify-full").expect_err("verify");
        assert!(err.to_string().contains("sslmode=require"), "{err}");
    }

    #[test]
    fn tcp_endpoints_pair_hosts_with_ports() {
        let endpoints = |url: &str| url_tcp_endpoints(url).expect(url);
        assert_eq!(
            endpoints("postgres://u@db.example.net/db"),
            [("db.example.net".to_owned(), 5432)]
        );
        assert_eq!(
            endpoints("postgres://u@a:6000,b:6001/db"),
            [("a".to_owned(), 6000), ("b".to_owned(), 6001)]
        );
        assert_eq!(
            endpoints("host=a,b port=7000 user=u"),
            [("a".to_owned(), 7000), ("b".to_owned(), 7000)]
        );
        assert!(endpoints("host=/var/run/postgresql user=u").is_empty());
    }
}
