//! The entropy server's configuration file.
//!
//! Raw TOML is parsed into [`ConfigFile`] (unknown keys refused, so a typo is an error and
//! not a silently ignored setting), then checked into a [`Config`] that the server trusts
//! without further checks. Relative paths are relative to the file's folder, so a config
//! folder can be moved as a whole.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default lifetime of a pool (and of every range carved from it): 300 s.
pub const DEFAULT_POOL_TTL_SECS: u64 = 300;
/// Default age after which a new pool is started: 60 s (at most a fifth of the TTL).
pub const DEFAULT_POOL_ROTATE_SECS: u64 = 60;
/// Default size after which a new pool is started: 256 MiB of offsets.
pub const DEFAULT_POOL_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// Default largest single allocation: 16 MiB.
pub const DEFAULT_MAX_ALLOCATION: u64 = 16 * 1024 * 1024;
/// Default bound on unread range bytes held in memory: 256 MiB.
pub const DEFAULT_MAX_LIVE_BYTES: u64 = 256 * 1024 * 1024;
/// Default quota of one allocating KME, as a fraction of `max_live_bytes`: half. The server
/// does not know how many KMEs the cluster has; half means that one greedy or broken KME
/// can never hold more than half of the server, so another always finds room. For a strict
/// fair share set `max_live_bytes_per_kme = max_live_bytes / number of KMEs`.
pub const DEFAULT_PER_KME_DIVISOR: u64 = 2;
/// Hard upper bound on `max_allocation`: one response body must fit comfortably in memory.
pub const MAX_ALLOCATION_LIMIT: u64 = 1024 * 1024 * 1024;

/// The configuration file, as written in TOML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Cluster name; it is part of every certificate identity (`dqkd://<cluster>/…`).
    pub cluster: String,
    /// This server's ID; its certificate must be `dqkd://<cluster>/entropy/<server_id>`.
    pub server_id: String,
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// Certificates.
    pub tls: TlsFiles,
    /// Seconds a pool and its ranges live (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_ttl_secs: Option<u64>,
    /// Age in seconds after which a new pool is started (default 60, or a fifth of the TTL
    /// if that is shorter). Must be less than `pool_ttl_secs`, so every range has at least
    /// `pool_ttl_secs - pool_rotate_secs` to live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_rotate_secs: Option<u64>,
    /// Offsets after which a new pool is started (default 256 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_max_bytes: Option<u64>,
    /// Largest single allocation in bytes (default 16 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_allocation: Option<u64>,
    /// Most unread range bytes held at once (default 256 MiB); beyond it allocations get 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_live_bytes: Option<u64>,
    /// Most unread bytes held at once for the ranges one KME allocated (default half of
    /// `max_live_bytes`, and at least `max_allocation`); beyond it that KME gets 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_live_bytes_per_kme: Option<u64>,
    /// A device or file (e.g. `/dev/hwrng`) whose bytes are XOR-mixed into the OS CSPRNG's.
    /// A regular file is read once, never rewound, and must hold at least `pool_max_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mix_file: Option<PathBuf>,
    /// Connection limits of the listener; defaults when absent.
    #[serde(default, skip_serializing_if = "ServerLimits::is_default")]
    pub connections: ServerLimits,
}

/// Certificate files (the same shape for every dqkd process).
pub use dqkd_net::TlsFiles;

/// Connection limits of a listener (the same shape for every dqkd server).
pub use dqkd_net::ServerLimits;

/// A problem with the configuration; each names the file and the field at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("{path} is not a valid entropy server config: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation (with line and column).
        message: String,
    },
    /// A field has a value the server cannot work with.
    #[error("{path}: {field}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// The validated configuration of one entropy server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Cluster name.
    pub cluster: String,
    /// This server's ID.
    pub server_id: String,
    /// Listen address.
    pub listen: SocketAddr,
    /// Certificates, with absolute (or caller-relative) paths.
    pub tls: TlsFiles,
    /// Lifetime of a pool and its ranges.
    pub pool_ttl: Duration,
    /// Age after which a new pool is started.
    pub pool_rotate: Duration,
    /// Offsets after which a new pool is started.
    pub pool_max_bytes: u64,
    /// Largest single allocation.
    pub max_allocation: u64,
    /// Most unread range bytes held at once.
    pub max_live_bytes: u64,
    /// Most unread range bytes held at once for the ranges one KME allocated.
    pub max_live_bytes_per_kme: u64,
    /// Optional mixing source.
    pub mix_file: Option<PathBuf>,
    /// Connection limits of the listener.
    pub connections: ServerLimits,
    /// For tests of the confirmation tag only: flips one bit of every range served to
    /// readers (the allocator still gets the true bytes); never enable in production.
    /// Deliberately not a config-file key, so no deployed file can turn it on: a test sets
    /// it on the loaded `Config`. Always `false` from [`Config::load`].
    pub insecure_corrupt_reads: bool,
    /// For tests of the KME's own health check only: every allocation is all zeros (a
    /// stuck source that this server's health tests do not see, like a server gone bad),
    /// and readers get the same zeros. Never enable in production; like
    /// `insecure_corrupt_reads`, not a config-file key, and always `false` from
    /// [`Config::load`].
    pub insecure_stuck_output: bool,
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_owned(),
            cause,
        })?;
        let file: ConfigFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_file(file, path, base)
    }

    /// Checks a parsed file; `path` is named in errors, `base` resolves relative paths.
    pub fn from_file(file: ConfigFile, path: &Path, base: &Path) -> Result<Self, ConfigError> {
        let invalid = |field: &'static str, problem: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            problem,
        };
        dqkd_pki::validate_name("cluster name", &file.cluster)
            .map_err(|e| invalid("cluster", e.to_string()))?;
        dqkd_pki::validate_name("server ID", &file.server_id)
            .map_err(|e| invalid("server_id", e.to_string()))?;

        let ttl = file.pool_ttl_secs.unwrap_or(DEFAULT_POOL_TTL_SECS);
        if ttl == 0 {
            return Err(invalid("pool_ttl_secs", "must be at least 1".into()));
        }
        let rotate = file
            .pool_rotate_secs
            .unwrap_or_else(|| DEFAULT_POOL_ROTATE_SECS.min((ttl / 5).max(1)));
        if rotate == 0 || rotate >= ttl {
            return Err(invalid(
                "pool_rotate_secs",
                format!(
                    "{rotate} must be at least 1 and less than pool_ttl_secs ({ttl}), \
                     or ranges could expire as soon as they are handed out"
                ),
            ));
        }
        let pool_max_bytes = file.pool_max_bytes.unwrap_or(DEFAULT_POOL_MAX_BYTES);
        if pool_max_bytes == 0 {
            return Err(invalid("pool_max_bytes", "must be at least 1".into()));
        }
        let max_allocation = file.max_allocation.unwrap_or(DEFAULT_MAX_ALLOCATION);
        if max_allocation == 0 || max_allocation > MAX_ALLOCATION_LIMIT {
            return Err(invalid(
                "max_allocation",
                format!("{max_allocation} must be between 1 and {MAX_ALLOCATION_LIMIT}"),
            ));
        }
        let max_live_bytes = file.max_live_bytes.unwrap_or(DEFAULT_MAX_LIVE_BYTES);
        if max_live_bytes < max_allocation {
            return Err(invalid(
                "max_live_bytes",
                format!(
                    "{max_live_bytes} is less than max_allocation ({max_allocation}), \
                     so the largest allocations could never be held"
                ),
            ));
        }
        let per_kme = file
            .max_live_bytes_per_kme
            .unwrap_or_else(|| (max_live_bytes / DEFAULT_PER_KME_DIVISOR).max(max_allocation));
        if per_kme < max_allocation || per_kme > max_live_bytes {
            return Err(invalid(
                "max_live_bytes_per_kme",
                format!(
                    "{per_kme} must be between max_allocation ({max_allocation}) and \
                     max_live_bytes ({max_live_bytes})"
                ),
            ));
        }
        if file.tls.peer_key_exchange.is_some() {
            return Err(invalid(
                "tls.peer_key_exchange",
                "only a KME has a peer API; an entropy server's key exchange is tls.key_exchange"
                    .into(),
            ));
        }
        file.connections
            .check()
            .map_err(|problem| invalid("connections", problem))?;
        let abs = |p: &Path| base.join(p);
        Ok(Self {
            cluster: file.cluster,
            server_id: file.server_id,
            listen: file.listen,
            tls: file.tls.relative_to(base),
            pool_ttl: Duration::from_secs(ttl),
            pool_rotate: Duration::from_secs(rotate),
            pool_max_bytes,
            max_allocation,
            max_live_bytes,
            max_live_bytes_per_kme: per_kme,
            mix_file: file.mix_file.as_deref().map(abs),
            connections: file.connections,
            insecure_corrupt_reads: false,
            insecure_stuck_output: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
cluster = "lab"
server_id = "E1"
listen = "127.0.0.1:0"
[tls]
ca = "pki/ca.pem"
cert = "pki/entropy/E1.pem"
key = "pki/entropy/E1.key"
"#;

    fn check(text: &str) -> Result<Config, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "e.toml".into(),
            message: e.to_string(),
        })?;
        Config::from_file(file, Path::new("/etc/dqkd/e.toml"), Path::new("/etc/dqkd"))
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = check(MINIMAL).unwrap();
        assert_eq!(c.pool_ttl, Duration::from_secs(300));
        assert_eq!(c.pool_rotate, Duration::from_secs(60));
        assert_eq!(c.max_allocation, 16 * 1024 * 1024);
        assert_eq!(c.max_live_bytes, 256 * 1024 * 1024);
        assert_eq!(c.max_live_bytes_per_kme, 128 * 1024 * 1024);
        assert_eq!(c.tls.ca, PathBuf::from("/etc/dqkd/pki/ca.pem"));
        assert_eq!(c.mix_file, None);
        assert!(!c.insecure_corrupt_reads);
        assert!(!c.insecure_stuck_output);
    }

    #[test]
    fn per_kme_quota_defaults_to_half_and_at_least_one_allocation() {
        let c = check(&format!(
            "max_live_bytes = 1000\nmax_allocation = 400\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(c.max_live_bytes_per_kme, 500);
        let c = check(&format!(
            "max_live_bytes = 1000\nmax_allocation = 800\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(c.max_live_bytes_per_kme, 800);
        let c = check(&format!(
            "max_live_bytes = 1000\nmax_allocation = 100\nmax_live_bytes_per_kme = 250\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(c.max_live_bytes_per_kme, 250);
    }

    #[test]
    fn key_exchange_is_read_and_the_peer_setting_refused() {
        let c = check(&format!("{MINIMAL}key_exchange = \"prefer-hybrid\"\n")).unwrap();
        assert_eq!(
            c.tls.key_exchange,
            Some(dqkd_pki::KeyExchange::PreferHybrid)
        );
        let err = check(&format!("{MINIMAL}peer_key_exchange = \"hybrid-only\"\n")).unwrap_err();
        assert!(err.to_string().contains("tls.peer_key_exchange"), "{err}");
        let err = check(&format!("{MINIMAL}key_exchange = \"classical\"\n")).unwrap_err();
        assert!(err.to_string().contains("key_exchange"), "{err}");
    }

    #[test]
    fn short_ttl_gets_a_shorter_rotation() {
        let c = check(&format!("pool_ttl_secs = 2\n{MINIMAL}")).unwrap();
        assert_eq!(c.pool_rotate, Duration::from_secs(1));
    }

    #[test]
    fn bad_fields_are_named() {
        for (extra, field) in [
            ("pool_ttl_secs = 0", "pool_ttl_secs"),
            (
                "pool_ttl_secs = 10\npool_rotate_secs = 10",
                "pool_rotate_secs",
            ),
            ("max_allocation = 0", "max_allocation"),
            ("max_live_bytes = 10", "max_live_bytes"),
            ("pool_max_bytes = 0", "pool_max_bytes"),
            (
                "max_allocation = 100\nmax_live_bytes = 1000\nmax_live_bytes_per_kme = 99",
                "max_live_bytes_per_kme",
            ),
            (
                "max_allocation = 100\nmax_live_bytes = 1000\nmax_live_bytes_per_kme = 1001",
                "max_live_bytes_per_kme",
            ),
            ("connections = { max_connections = 0 }", "connections"),
        ] {
            let err = check(&format!("{extra}\n{MINIMAL}")).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { field: f, .. } if *f == field),
                "{extra}: {err}"
            );
            assert!(err.to_string().contains("/etc/dqkd/e.toml"), "{err}");
        }
        let err = check(&MINIMAL.replace("E1\"", "E/1\"")).unwrap_err();
        assert!(err.to_string().contains("server_id"), "{err}");
    }

    #[test]
    fn unknown_keys_refused() {
        let err = check(&format!("pool_size = 3\n{MINIMAL}")).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }
}
