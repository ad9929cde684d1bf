//! Expiry of the certificates a server holds, as the gauge
//! `dqkd_certificate_expiry_seconds{<server labels>, certificate}`: seconds left on its own
//! certificate (`own`), the cluster CA (`ca`) and until the revocation list's next update
//! (`crl_next_update`), negative once passed. An expired certificate takes a site off the
//! cluster, so servers also warn at start when less than
//! [`EXPIRY_WARNING`](dqkd_pki::EXPIRY_WARNING) is left.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::TlsFiles;

/// How often the gauges are brought up to date (and the revocation list re-read).
const REFRESH: Duration = Duration::from_secs(60);

/// The gauge's name.
pub const EXPIRY_METRIC: &str = "dqkd_certificate_expiry_seconds";

/// One certificate or list a server holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// `own`, `ca` or `crl_next_update`.
    pub certificate: &'static str,
    /// The file it was read from.
    pub path: PathBuf,
    /// When it stops being valid; `None` if the file could not be read (or the list names
    /// no next update).
    pub expires_at: Option<SystemTime>,
}

/// The expiry dates of a server's certificates, published as gauges.
#[derive(Debug, Clone)]
pub struct CertificateExpiry {
    crl: Option<PathBuf>,
    labels: Vec<(&'static str, String)>,
    held: Arc<Mutex<Vec<Held>>>,
}

impl CertificateExpiry {
    /// Reads the dates of the certificates in `files` (the ones the server has just
    /// loaded) and warns about any that end within the warning period; `labels` (`kme` or
    /// `entropy` = the server's ID) go on the gauges.
    pub fn load(files: &TlsFiles, labels: Vec<(&'static str, String)>) -> Self {
        let read = |certificate: &'static str, path: &Path| Held {
            certificate,
            path: path.to_owned(),
            expires_at: dqkd_pki::certificate_not_after(path).ok(),
        };
        let mut held = vec![read("own", &files.cert), read("ca", &files.ca)];
        if let Some(crl) = &files.crl {
            held.push(read_crl(crl));
        }
        let now = SystemTime::now();
        for entry in &held {
            warn_if_close(entry, now, &labels);
        }
        Self {
            crl: files.crl.clone(),
            labels,
            held: Arc::new(Mutex::new(held)),
        }
    }

    /// What the server holds now.
    pub fn held(&self) -> Vec<Held> {
        self.held.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Re-reads the revocation list (servers reload it when it changes).
    pub fn refresh(&self) {
        if let Some(crl) = &self.crl {
            let fresh = read_crl(crl);
            if let Ok(mut held) = self.held.lock() {
                if let Some(entry) = held.iter_mut().find(|h| h.certificate == "crl_next_update") {
                    *entry = fresh;
                }
            }
        }
    }

    /// Publishes the gauges to the process's `metrics` recorder now and every minute
    /// until `stopped` changes.
    pub async fn run(self, mut stopped: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(REFRESH);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.refresh();
                    self.publish(SystemTime::now());
                }
                _ = stopped.changed() => return,
            }
        }
    }

    /// The gauges in the Prometheus text format, for servers that write their metrics by
    /// hand; re-reads the revocation list first.
    pub fn prometheus_text(&self) -> String {
        use std::fmt::Write as _;
        self.refresh();
        let now = SystemTime::now();
        let mut out = format!(
            "# HELP {EXPIRY_METRIC} Seconds until a certificate this server holds expires \
             (or its revocation list's next update), negative once passed.\n\
             # TYPE {EXPIRY_METRIC} gauge\n"
        );
        for entry in self.held() {
            let Some(at) = entry.expires_at else { continue };
            let labels: String = self
                .labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{v}\","))
                .collect();
            let _ = writeln!(
                out,
                "{EXPIRY_METRIC}{{{labels}certificate=\"{}\"}} {}",
                entry.certificate,
                dqkd_pki::seconds_left(at, now)
            );
        }
        out
    }

    fn publish(&self, now: SystemTime) {
        for entry in self.held() {
            let Some(at) = entry.expires_at else { continue };
            let mut labels = self.labels.clone();
            labels.push(("certificate", entry.certificate.to_owned()));
            metrics::gauge!(EXPIRY_METRIC, &labels).set(dqkd_pki::seconds_left(at, now) as f64);
        }
    }
}

fn read_crl(path: &Path) -> Held {
    Held {
        certificate: "crl_next_update",
        path: path.to_owned(),
        expires_at: dqkd_pki::crl_next_update(path).ok().flatten(),
    }
}

fn warn_if_close(entry: &Held, now: SystemTime, labels: &[(&'static str, String)]) {
    let Some(at) = entry.expires_at else {
        tracing::warn!(
            certificate = entry.certificate,
            path = %entry.path.display(),
            "cannot read the expiry date"
        );
        return;
    };
    let left = dqkd_pki::seconds_left(at, now);
    if left >= dqkd_pki::EXPIRY_WARNING.as_secs() as i64 {
        return;
    }
    let server = labels
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let days = left as f64 / 86_400.0;
    let what = match entry.certificate {
        "crl_next_update" => "the revocation list needs signing again (dqkd pki crl)",
        _ => "the certificate needs renewing (dqkd pki renew)",
    };
    tracing::warn!(
        %server,
        certificate = entry.certificate,
        path = %entry.path.display(),
        days_left = format!("{days:.1}"),
        "{what}"
    );
}
