//! What the entropy server does, independent of HTTP: who may call, allocation, reads,
//! expiry, health. The [`api`](crate::api) module only maps HTTP onto these calls.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use dqkd_pki::{Identity, Role};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::config::Config;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::pool::{Granted, PoolId, PoolLimits, Pools, SharedBytes, Sweep};
use crate::source::EntropySource;
use crate::MAX_READERS;

/// The body of `POST /v1/allocate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocateRequest {
    /// Bytes wanted, 1 ..= `max_allocation`.
    pub len: u64,
    /// KME IDs that may each read the range once (at most [`MAX_READERS`], no repeats).
    pub readers: Vec<String>,
}

/// The body of `GET /health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `"ok"`, or `"failed"` once an entropy source has failed (allocation stopped).
    pub status: String,
    /// This server's ID.
    pub server_id: String,
    /// Unread range bytes held in memory.
    pub live_bytes: u64,
    /// Live pools.
    pub pools: usize,
    /// Why the entropy source failed (a health test, or a mix file run out): allocations
    /// answer 503 with this reason until the server is restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy_failure: Option<String>,
}

/// A caller proven by its certificate to be a KME of this cluster. Only
/// [`EntropyService::verify_kme`] makes one, so allocation and reads cannot be reached
/// without the check.
#[derive(Debug, Clone)]
pub struct VerifiedKme {
    id: dqkd_pki::Name,
}

impl VerifiedKme {
    /// The KME ID.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// A caller proven to be a KME or entropy server of this cluster (health and metrics).
#[derive(Debug, Clone)]
pub struct VerifiedMember {
    _private: (),
}

/// The entropy server's state and rules.
#[derive(Debug)]
pub struct EntropyService {
    config: Arc<Config>,
    pools: Mutex<Pools>,
    source: Arc<EntropySource>,
    rng: SystemRandom,
    metrics: Metrics,
    expiry: dqkd_net::CertificateExpiry,
}

impl EntropyService {
    /// A service with empty pools.
    pub fn new(config: Arc<Config>, source: Arc<EntropySource>) -> Self {
        let limits = PoolLimits {
            ttl: config.pool_ttl,
            rotate: config.pool_rotate,
            pool_max_bytes: config.pool_max_bytes,
            max_live_bytes: config.max_live_bytes,
            max_live_bytes_per_kme: config.max_live_bytes_per_kme,
        };
        // Read (and warned about) once, at start: the certificates this server now holds.
        let expiry = dqkd_net::CertificateExpiry::load(
            &config.tls,
            vec![("entropy", config.server_id.clone())],
        );
        Self {
            config,
            pools: Mutex::new(Pools::new(limits)),
            source,
            rng: SystemRandom::new(),
            metrics: Metrics::default(),
            expiry,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Checks that the caller's certificate is a KME's: only KMEs allocate and read.
    pub fn verify_kme(&self, identity: Option<&Identity>) -> Result<VerifiedKme, ApiError> {
        match identity {
            Some(id) if id.role() == Role::Kme => Ok(VerifiedKme {
                id: id.id().clone(),
            }),
            Some(id) => Err(ApiError::Forbidden(format!(
                "{} may not use the entropy API: only KMEs may",
                id.uri()
            ))),
            None => Err(no_identity()),
        }
    }

    /// Checks that the caller is a KME or an entropy server (SAEs have no business here).
    pub fn verify_member(&self, identity: Option<&Identity>) -> Result<VerifiedMember, ApiError> {
        match identity {
            Some(id) if matches!(id.role(), Role::Kme | Role::Entropy) => {
                Ok(VerifiedMember { _private: () })
            }
            Some(id) => Err(ApiError::Forbidden(format!(
                "{} may not use the entropy server",
                id.uri()
            ))),
            None => Err(no_identity()),
        }
    }

    /// Hands out `request.len` fresh random bytes as a never-reused range that each named
    /// reader may read once. Refused (503) once the entropy source has failed, or when the
    /// bytes would exceed the caller's quota or the server's memory bound.
    pub async fn allocate(
        &self,
        caller: &VerifiedKme,
        request: AllocateRequest,
    ) -> Result<(Granted, SharedBytes), ApiError> {
        let max = self.config.max_allocation;
        if request.len == 0 || request.len > max {
            return Err(ApiError::BadRequest(format!(
                "len {} is out of range: 1 to {max} bytes",
                request.len
            )));
        }
        check_readers(&request.readers)?;
        let len = usize::try_from(request.len)
            .map_err(|_| ApiError::BadRequest(format!("len {} is too large", request.len)))?;
        if let Some(reason) = self.source.failure() {
            return Err(ApiError::SourceFailed(reason.to_owned()));
        }
        let holds = !request.readers.is_empty();
        self.lock().check_room(caller.id(), request.len, holds)?;

        let bytes = self.generate(len).await?;
        let mut fresh = [0u8; 16];
        self.rng
            .fill(&mut fresh)
            .map_err(|_| ApiError::Internal("the operating system RNG failed".into()))?;
        let reader_count = request.readers.len();
        let granted = self.lock().allocate(
            Instant::now(),
            unix_now(),
            PoolId(fresh),
            caller.id(),
            request.readers,
            bytes.clone(),
        )?;
        self.metrics.allocated(granted.len);
        tracing::debug!(
            kme = caller.id(),
            pool = %granted.pool_id,
            offset = granted.offset,
            len = granted.len,
            readers = reader_count,
            "range allocated"
        );
        Ok((granted, bytes))
    }

    /// The bytes of a range, for one of its readers, once.
    pub fn read(
        &self,
        caller: &VerifiedKme,
        pool_id: PoolId,
        offset: u64,
        len: u64,
    ) -> Result<SharedBytes, ApiError> {
        let outcome = self
            .lock()
            .read(Instant::now(), pool_id, offset, len, caller.id())?;
        self.metrics.served(len);
        self.metrics.shredded(outcome.shredded);
        tracing::debug!(
            kme = caller.id(),
            pool = %pool_id,
            offset,
            len,
            last_reader = outcome.shredded > 0,
            "range read"
        );
        if self.config.insecure_corrupt_reads {
            return Ok(corrupted(&outcome.bytes));
        }
        Ok(outcome.bytes)
    }

    /// Shreds every expired pool; called about once a second by the server.
    pub fn sweep(&self) -> Sweep {
        let sweep = self.lock().expire(Instant::now());
        self.metrics.shredded(sweep.bytes);
        if sweep.pools > 0 {
            tracing::debug!(
                pools = sweep.pools,
                unread_bytes = sweep.bytes,
                "expired pools shredded"
            );
        }
        sweep
    }

    /// Health for `GET /health`.
    pub fn health(&self, _caller: &VerifiedMember) -> Health {
        let failure = self.source.failure().map(str::to_owned);
        let pools = self.lock();
        Health {
            status: if failure.is_some() { "failed" } else { "ok" }.into(),
            server_id: self.config.server_id.clone(),
            live_bytes: pools.live_bytes(),
            pools: pools.pool_count(),
            entropy_failure: failure,
        }
    }

    /// Prometheus text for `GET /metrics`.
    pub fn metrics_text(&self, _caller: &VerifiedMember) -> String {
        let live = self.lock().live_bytes();
        let mut text = self.metrics.render(live, self.source.status());
        text.push_str(&self.expiry.prometheus_text());
        text
    }

    /// Fills a fresh buffer on a blocking thread: megabytes of CSPRNG output (and reads
    /// from a possibly slow device) must not stall the async workers.
    async fn generate(&self, len: usize) -> Result<SharedBytes, ApiError> {
        if self.config.insecure_stuck_output {
            return Ok(Arc::new(Zeroizing::new(vec![0u8; len])));
        }
        let source = self.source.clone();
        let filled = tokio::task::spawn_blocking(move || {
            let mut buffer = Zeroizing::new(vec![0u8; len]);
            source.fill(&mut buffer).map(|()| buffer)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("entropy task failed: {e}")))?
        .map_err(|e| match self.source.failure() {
            Some(reason) => ApiError::SourceFailed(reason.to_owned()),
            None => ApiError::Internal(e.to_string()),
        })?;
        Ok(Arc::new(filled))
    }

    /// The pools. The lock is never held across an await; a poisoned lock means a panic
    /// mid-update, after which the bookkeeping cannot be trusted, but refusing every later
    /// request would not make it better: the pool code does not panic between updates.
    fn lock(&self) -> MutexGuard<'_, Pools> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn no_identity() -> ApiError {
    ApiError::Forbidden("the client certificate carries no dqkd identity of this cluster".into())
}

fn check_readers(readers: &[String]) -> Result<(), ApiError> {
    if readers.len() > MAX_READERS {
        return Err(ApiError::BadRequest(format!(
            "{} readers named; at most {MAX_READERS}",
            readers.len()
        )));
    }
    let mut seen = BTreeSet::new();
    for reader in readers {
        dqkd_pki::validate_name("reader KME ID", reader)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if !seen.insert(reader.as_str()) {
            return Err(ApiError::BadRequest(format!(
                "reader {reader:?} is named twice"
            )));
        }
    }
    Ok(())
}

/// A copy of `bytes` with the lowest bit of the first byte flipped, for
/// [`Config::insecure_corrupt_reads`]. A copy: the pool's buffer stays true for the other
/// readers, so each reader gets exactly one flipped bit.
fn corrupted(bytes: &SharedBytes) -> SharedBytes {
    let mut copy = Zeroizing::new(bytes.to_vec());
    if let Some(first) = copy.first_mut() {
        *first ^= 1;
    }
    Arc::new(copy)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigFile, TlsFiles};
    use std::path::Path;

    fn service(corrupt: bool) -> EntropyService {
        service_with(corrupt, EntropySource::system(), None)
    }

    fn service_with(
        corrupt: bool,
        source: EntropySource,
        // (max_live_bytes, max_allocation)
        limits: Option<(u64, u64)>,
    ) -> EntropyService {
        let file = ConfigFile {
            cluster: "test".into(),
            server_id: "E1".into(),
            listen: ([127, 0, 0, 1], 0).into(),
            tls: TlsFiles {
                ca: "ca.pem".into(),
                cert: "E1.pem".into(),
                key: "E1.key".into(),
                crl: None,
                key_exchange: None,
                peer_key_exchange: None,
            },
            pool_ttl_secs: None,
            pool_rotate_secs: None,
            pool_max_bytes: None,
            max_allocation: limits.map(|(_, max_allocation)| max_allocation),
            max_live_bytes: limits.map(|(max, _)| max),
            max_live_bytes_per_kme: None,
            mix_file: None,
            connections: Default::default(),
        };
        let mut config = Config::from_file(file, Path::new("e.toml"), Path::new(".")).unwrap();
        config.insecure_corrupt_reads = corrupt;
        EntropyService::new(Arc::new(config), Arc::new(source))
    }

    fn kme(service: &EntropyService, id: &str) -> VerifiedKme {
        let identity = Identity::new("test", Role::Kme, id).unwrap();
        service.verify_kme(Some(&identity)).unwrap()
    }

    /// Bits in which `a` and `b` differ.
    fn bit_distance(a: &[u8], b: &[u8]) -> u32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
    }

    #[tokio::test]
    async fn corrupt_reads_flip_one_bit_for_each_reader_only() {
        for corrupt in [false, true] {
            let service = service(corrupt);
            let request = AllocateRequest {
                len: 256,
                readers: vec!["KME_B".into(), "KME_C".into()],
            };
            let (granted, allocated) = service
                .allocate(&kme(&service, "KME_A"), request)
                .await
                .unwrap();
            let read = |id: &str| {
                service
                    .read(&kme(&service, id), granted.pool_id, granted.offset, 256)
                    .unwrap()
            };
            let (b, c) = (read("KME_B"), read("KME_C"));
            let want = u32::from(corrupt);
            // One flipped bit per reader, not one more per read: the pool stays true.
            assert_eq!(bit_distance(&allocated, &b), want, "corrupt = {corrupt}");
            assert_eq!(bit_distance(&allocated, &c), want, "corrupt = {corrupt}");
        }
    }

    fn request(len: u64, readers: &[&str]) -> AllocateRequest {
        AllocateRequest {
            len,
            readers: readers.iter().map(|r| (*r).to_owned()).collect(),
        }
    }

    #[tokio::test]
    async fn a_greedy_kme_cannot_stop_another() {
        // 4000 bytes in all, 2000 per KME (the default: half).
        let service = service_with(false, EntropySource::system(), Some((4000, 1000)));
        assert_eq!(service.config().max_live_bytes_per_kme, 2000);
        let (a, b) = (kme(&service, "KME_A"), kme(&service, "KME_B"));
        // A names a reader that never reads, until it is refused.
        for _ in 0..2 {
            service
                .allocate(&a, request(1000, &["KME_X"]))
                .await
                .unwrap();
        }
        let err = service
            .allocate(&a, request(1000, &["KME_X"]))
            .await
            .unwrap_err();
        assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        let text = err.to_string();
        assert!(
            text.contains("entropy quota of KME_A exceeded") && text.contains("(2000)"),
            "{text}"
        );
        // B is not affected.
        for _ in 0..2 {
            service
                .allocate(&b, request(1000, &["KME_X"]))
                .await
                .unwrap();
        }
        assert!(service
            .metrics_text(&VerifiedMember { _private: () })
            .contains("dqkd_entropy_live_bytes 4000\n"));
    }

    #[tokio::test]
    async fn a_failed_source_stops_allocation_with_the_reason() {
        let service = service_with(false, EntropySource::stuck(0), None);
        let a = kme(&service, "KME_A");
        let member = VerifiedMember { _private: () };
        assert_eq!(service.health(&member).status, "ok");
        for _ in 0..2 {
            let err = service
                .allocate(&a, request(64, &["KME_B"]))
                .await
                .unwrap_err();
            assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
            let text = err.to_string();
            assert!(
                text.contains("the OS generator failed its health test: repetition count"),
                "{text}"
            );
        }
        let health = service.health(&member);
        assert_eq!(health.status, "failed");
        assert!(health
            .entropy_failure
            .as_deref()
            .is_some_and(|r| r.contains("repetition count test failed")));
        assert!(service
            .metrics_text(&member)
            .contains("dqkd_entropy_source_healthy{source=\"os\"} 0\n"));
        assert_eq!(service.lock().live_bytes(), 0);
    }

    #[tokio::test]
    async fn stuck_output_serves_zeros() {
        let mut config = service(false).config().clone();
        config.insecure_stuck_output = true;
        let service = EntropyService::new(Arc::new(config), Arc::new(EntropySource::system()));
        let (granted, bytes) = service
            .allocate(&kme(&service, "KME_A"), request(64, &["KME_B"]))
            .await
            .unwrap();
        assert_eq!(**bytes, vec![0u8; 64]);
        let read = service
            .read(&kme(&service, "KME_B"), granted.pool_id, granted.offset, 64)
            .unwrap();
        assert_eq!(**read, vec![0u8; 64]);
    }

    #[test]
    fn readers_checked() {
        assert!(check_readers(&[]).is_ok());
        assert!(check_readers(&["KME_B".into(), "KME_C".into()]).is_ok());
        assert!(check_readers(&["KME_B".into(), "KME_B".into()]).is_err());
        assert!(check_readers(&["a/b".into()]).is_err());
        let many: Vec<String> = (0..17).map(|i| format!("K{i}")).collect();
        assert!(check_readers(&many).is_err());
    }
}
