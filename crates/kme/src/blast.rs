//! The BLAST-style key source: ranges from `n` entropy servers, Cauchy extraction, and
//! metadata a peer site uses to regenerate the same keys (docs/keygen-protocol.md).
//!
//! One batch costs one allocation per server, however many keys it holds. A server that
//! does not answer is skipped for another (any `n` healthy servers of those configured),
//! and is tried last for a while so that one dead server does not slow every request.
//! When allocations take a long round trip (servers tens of milliseconds away), a few
//! are made ahead per reader set ([`stock`]), so that a small batch usually finds its
//! ranges here.
//!
//! Every block received from a server runs the SP 800-90B repetition count test
//! ([`dqkd_entropy::health`], cutoff 11 equal bytes in a row) before it is used. A server
//! whose block fails is treated like a server that is down: logged at error, tried last
//! for a while, and replaced by a spare; with fewer than `n` healthy blocks the request
//! fails rather than issue keys. This catches a real server gone bad (say one serving
//! zeros); keeping impostors out is the pinned server identity's job. Blocks shorter than
//! the cutoff cannot fail the test.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dqkd_entropy::client::{Allocation, EntropyClient};
use dqkd_entropy::health::{HealthFailure, RepetitionCount};
use dqkd_keygen::confirm::{self, TagKey};
use dqkd_keygen::metadata::{self, BatchMetadata, KeyEntry, RangeRef};
use dqkd_keygen::Extractor;
use dqkd_store::KeyMaterial;
use tokio::task::JoinSet;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::keysource::{Batch, KeySource, KeySourceError};

mod stock;

use stock::{Set, Stock};

/// How long a server that failed is tried only after the others.
const PENALTY: Duration = Duration::from_secs(10);

/// One configured entropy server.
struct Server {
    id: String,
    client: EntropyClient,
    failed_at: Mutex<Option<Instant>>,
}

/// The BLAST-style generator of one KME.
pub struct Blast {
    servers: Arc<Servers>,
    stock: Arc<Stock>,
    extractor: Extractor,
    n: u8,
    c: u8,
}

/// The configured servers and how to choose `n` of them; shared with the tasks that
/// allocate ahead.
struct Servers {
    servers: Vec<Server>,
    n: u8,
    /// Rotates the first choice so that load spreads over all servers.
    next: AtomicUsize,
}

impl Blast {
    /// A generator drawing `n` blocks per key (tolerating `c` leaked ones) from `servers`
    /// (ID and client). Needs at least `n` servers.
    pub fn new(
        servers: Vec<(String, EntropyClient)>,
        n: u8,
        c: u8,
    ) -> Result<Self, KeySourceError> {
        let extractor = Extractor::new(n.into(), c.into())
            .map_err(|e| KeySourceError::Unavailable(format!("keygen parameters: {e}")))?;
        if servers.len() < usize::from(n) {
            return Err(KeySourceError::Unavailable(format!(
                "n = {n} entropy servers are needed per key but only {} are configured",
                servers.len()
            )));
        }
        let servers = servers
            .into_iter()
            .map(|(id, client)| Server {
                id,
                client,
                failed_at: Mutex::new(None),
            })
            .collect();
        Ok(Self {
            servers: Arc::new(Servers {
                servers,
                n,
                next: AtomicUsize::new(0),
            }),
            stock: Arc::new(Stock::default()),
            extractor,
            n,
            c,
        })
    }

    /// Makes allocations ahead whatever their round trip, not only when they are slow:
    /// lets tests exercise stocked ranges with servers on loopback.
    #[doc(hidden)]
    pub fn allocating_ahead_always(mut self) -> Self {
        self.stock = Arc::new(Stock::always());
        self
    }
}

impl Servers {
    /// Server indices in the order to try them: a rotating start, recently failed ones last.
    fn candidates(&self) -> Vec<usize> {
        let count = self.servers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count;
        let mut order: Vec<usize> = (0..count).map(|i| (start + i) % count).collect();
        order.sort_by_key(|&i| self.penalised(i));
        order
    }

    fn penalised(&self, index: usize) -> bool {
        let guard = self.servers[index]
            .failed_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.is_some_and(|at| at.elapsed() < PENALTY)
    }

    fn mark(&self, index: usize, failed: bool) {
        let mut guard = self.servers[index]
            .failed_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *guard = failed.then(Instant::now);
    }

    /// Allocates `len` bytes on `n` servers, replacing any that fail by the next candidate.
    /// At `deadline` it gives up; servers still silent then while others answered are tried
    /// last for a while, like servers that failed.
    async fn allocate(
        &self,
        len: u64,
        readers: &[String],
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Vec<Allocation>, KeySourceError> {
        let mut order = self.candidates().into_iter();
        let mut running = JoinSet::new();
        let mut waiting_for: Vec<usize> = Vec::with_capacity(usize::from(self.n));
        let start = |index: usize, running: &mut JoinSet<_>, waiting_for: &mut Vec<usize>| {
            let client = self.servers[index].client.clone();
            let readers = readers.to_vec();
            waiting_for.push(index);
            running.spawn(async move { (index, client.allocate(len, &readers).await) });
        };
        for index in order.by_ref().take(usize::from(self.n)) {
            start(index, &mut running, &mut waiting_for);
        }
        let expired = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expired);
        let mut got: Vec<(usize, Allocation)> = Vec::with_capacity(usize::from(self.n));
        let mut failures = Vec::new();
        loop {
            let joined = tokio::select! {
                joined = running.join_next() => joined,
                () = &mut expired => {
                    // Dropping `running` aborts the calls still waiting. Servers slower than
                    // those that answered are tried last for a while; when none answered, the
                    // time left was too short to judge them.
                    if !got.is_empty() {
                        for &index in &waiting_for {
                            self.mark(index, true);
                        }
                    }
                    let silent: Vec<&str> = waiting_for
                        .iter()
                        .map(|&index| self.servers[index].id.as_str())
                        .collect();
                    tracing::warn!(servers = ?silent, "entropy servers did not answer before the request's deadline");
                    return Err(KeySourceError::Unavailable(format!(
                        "entropy servers {} did not answer before the request's deadline",
                        silent.join(", ")
                    )));
                }
            };
            let Some(joined) = joined else { break };
            let (index, result) = joined
                .map_err(|e| KeySourceError::Unavailable(format!("allocation task failed: {e}")))?;
            waiting_for.retain(|&i| i != index);
            let server = self.servers[index].id.clone();
            // A block that fails the health test counts as a failed allocation.
            let result = result.map_err(|e| e.to_string()).and_then(|allocation| {
                match repetition_count(&allocation.bytes) {
                    Ok(()) => Ok(allocation),
                    Err(failure) => {
                        tracing::error!(
                            server = %server,
                            %failure,
                            "entropy server sent a block that failed the health test; routing around it"
                        );
                        Err(unhealthy(&server, failure))
                    }
                }
            });
            let outcome = match &result {
                Ok(_) => "ok",
                Err(_) => "failed",
            };
            metrics::counter!("dqkd_entropy_allocations_total", "server" => server, "result" => outcome)
                .increment(1);
            match result {
                Ok(allocation) => {
                    self.mark(index, false);
                    got.push((index, allocation));
                }
                Err(e) => {
                    tracing::warn!(server = %self.servers[index].id, error = %e, "entropy allocation failed");
                    self.mark(index, true);
                    failures.push(format!("{}: {e}", self.servers[index].id));
                    if let Some(next) = order.next() {
                        start(next, &mut running, &mut waiting_for);
                    }
                }
            }
        }
        if got.len() < usize::from(self.n) {
            return Err(KeySourceError::Unavailable(format!(
                "only {} of the {} entropy servers needed answered ({})",
                got.len(),
                self.n,
                failures.join("; ")
            )));
        }
        got.sort_by_key(|(index, _)| *index);
        Ok(got.into_iter().map(|(_, a)| a).collect())
    }
}

impl Blast {
    /// `n` ranges of at least `len` bytes for `readers`: a stocked set when one fits, else
    /// allocated now (giving up at `deadline`). Either way a set is made ahead to replace it
    /// while allocations are slow.
    async fn ranges(
        &self,
        len: u64,
        readers: &[String],
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Vec<Allocation>, KeySourceError> {
        let servers = &self.servers;
        let stocked = self.stock.take(readers, len, unix_now(), |a| {
            !servers
                .servers
                .iter()
                .position(|s| s.id == a.server_id)
                .is_some_and(|index| servers.penalised(index))
        });
        let allocations = match stocked {
            Some(set) => Ok(set.allocations),
            None => {
                let asked = tokio::time::Instant::now();
                let allocated = self.servers.allocate(len, readers, deadline).await;
                if allocated.is_ok() {
                    self.stock.allocated(asked.elapsed());
                }
                allocated
            }
        };
        self.restock(readers);
        allocations
    }

    /// Starts making a set ahead for `readers` when allocations are slow and the stock has
    /// room. It goes through the same allocation as a batch's own: health test on every
    /// block, failed servers replaced by spares.
    fn restock(&self, readers: &[String]) {
        if !self.stock.far() {
            return;
        }
        let Some(len) = self.stock.reserve(readers) else {
            return;
        };
        let (servers, stock, readers) =
            (self.servers.clone(), self.stock.clone(), readers.to_vec());
        tokio::spawn(async move {
            let asked = tokio::time::Instant::now();
            let set = match servers.allocate(len, &readers, None).await {
                Ok(allocations) => {
                    stock.allocated(asked.elapsed());
                    Some(Set::new(allocations))
                }
                Err(e) => {
                    tracing::debug!(error = %e, "allocating ahead failed");
                    None
                }
            };
            stock.put(&readers, set);
        });
    }

    /// `count` keys of `len` bytes for `readers`; allocation gives up at `deadline`.
    async fn generate_until(
        &self,
        count: usize,
        len: usize,
        readers: &[String],
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Batch, KeySourceError> {
        let bad =
            |e: dqkd_keygen::KeygenError| KeySourceError::Unavailable(format!("extraction: {e}"));
        // Each key comes with 32 more bytes from the same ranges that key its confirmation
        // tag (docs/keygen-protocol.md): `key ‖ k_mac ‖ mask`.
        let material = confirm::material_len(len)
            .ok_or_else(|| KeySourceError::Unavailable("key too large".into()))?;
        let block = metadata::key_block_len(len, self.n, self.c).map_err(bad)?;
        let range_len = block
            .checked_mul(count)
            .ok_or_else(|| KeySourceError::Unavailable("batch too large".into()))?;
        let allocations = self.ranges(range_len as u64, readers, deadline).await?;
        // A stocked range may be longer than this batch needs: its keys use the front. Each
        // holds at least `range_len` bytes (the stock checks a set's length, and the client
        // checks that a body is as long as its range).
        let ranges: Vec<&[u8]> = allocations.iter().map(|a| &a.bytes[..range_len]).collect();
        let mut out = Zeroizing::new(vec![0u8; material * count]);
        self.extractor
            .extract_batch(&ranges, material, count, &mut out)
            .map_err(bad)?;

        let ids = crate::keyid::new_key_ids(count).map_err(|_| KeySourceError::Rng)?;
        let mut keys = Vec::with_capacity(count);
        let mut entries = Vec::with_capacity(count);
        for ((t, material), id) in out.chunks_exact(material).enumerate().zip(ids) {
            let (bytes, tag_key) = TagKey::split(material)
                .ok_or_else(|| KeySourceError::Unavailable("empty key".into()))?;
            entries.push(KeyEntry {
                key_id: *id.as_bytes(),
                size_bits: (len * 8) as u32,
                block_offset: (t * block) as u64,
                confirm: tag_key.tag(bytes, id.as_bytes()),
            });
            keys.push((id, KeyMaterial::new(bytes.to_vec())));
        }
        let metadata = BatchMetadata {
            version: metadata::VERSION,
            n: self.n,
            c: self.c,
            ranges: allocations
                .iter()
                .map(|a| RangeRef {
                    server_id: a.server_id.clone(),
                    pool_id: a.pool_id,
                    offset: a.offset,
                    len: a.len,
                })
                .collect(),
            expires_at_unix: allocations.iter().map(|a| a.expires_at).min().unwrap_or(0),
            keys: entries,
        };
        let metadata = metadata
            .encode()
            .map_err(|e| KeySourceError::BadMetadata(e.to_string()))?;
        Ok(Batch {
            keys,
            metadata: Some(metadata),
        })
    }
}

#[async_trait::async_trait]
impl KeySource for Blast {
    async fn generate(
        &self,
        count: usize,
        len: usize,
        readers: &[String],
    ) -> Result<Batch, KeySourceError> {
        self.generate_until(count, len, readers, None).await
    }

    async fn generate_by(
        &self,
        count: usize,
        len: usize,
        readers: &[String],
        deadline: tokio::time::Instant,
    ) -> Result<Batch, KeySourceError> {
        self.generate_until(count, len, readers, Some(deadline))
            .await
    }

    async fn regenerate(&self, bytes: &[u8]) -> Result<Vec<(Uuid, KeyMaterial)>, KeySourceError> {
        let meta =
            metadata::decode(bytes).map_err(|e| KeySourceError::BadMetadata(e.to_string()))?;
        // A peer must not weaken the cluster's parameters (say n = 1, c = 0: one server).
        if (meta.n, meta.c) != (self.n, self.c) {
            return Err(KeySourceError::BadMetadata(format!(
                "keys made with n = {}, c = {}; this cluster uses n = {}, c = {}",
                meta.n, meta.c, self.n, self.c
            )));
        }
        let extractor = &self.extractor;

        let mut reads = JoinSet::new();
        for (j, range) in meta.ranges.iter().enumerate() {
            let server = self
                .servers
                .servers
                .iter()
                .find(|s| s.id == range.server_id)
                .ok_or_else(|| {
                    KeySourceError::BadMetadata(format!(
                        "entropy server {:?} is not in the cluster manifest",
                        range.server_id
                    ))
                })?;
            let client = server.client.clone();
            let (pool, offset, len) = (range.pool_id, range.offset, range.len);
            reads.spawn(async move { (j, client.read(&pool, offset, len).await) });
        }
        let mut blocks: Vec<Option<Zeroizing<Vec<u8>>>> = vec![None; meta.ranges.len()];
        while let Some(joined) = reads.join_next().await {
            let (j, result) =
                joined.map_err(|e| KeySourceError::Regenerate(format!("read task failed: {e}")))?;
            let range = &meta.ranges[j];
            match result {
                Ok(bytes) if bytes.len() as u64 == range.len => {
                    if let Err(failure) = repetition_count(&bytes) {
                        tracing::error!(
                            server = %range.server_id,
                            %failure,
                            "entropy server sent a block that failed the health test"
                        );
                        return Err(KeySourceError::Regenerate(unhealthy(
                            &range.server_id,
                            failure,
                        )));
                    }
                    blocks[j] = Some(bytes)
                }
                Ok(bytes) => {
                    return Err(KeySourceError::Regenerate(format!(
                        "entropy server {:?} returned {} bytes for a range of {}",
                        range.server_id,
                        bytes.len(),
                        range.len
                    )))
                }
                Err(e) if e.is_unavailable() => {
                    return Err(KeySourceError::Unavailable(format!(
                        "{}: {e}",
                        range.server_id
                    )))
                }
                Err(e) => {
                    return Err(KeySourceError::Regenerate(format!(
                        "{}: {e}",
                        range.server_id
                    )))
                }
            }
        }
        let blocks: Vec<Zeroizing<Vec<u8>>> = blocks.into_iter().flatten().collect();

        let mut keys = Vec::with_capacity(meta.keys.len());
        for (index, entry) in meta.keys.iter().enumerate() {
            let block = meta
                .block_len(index)
                .ok_or_else(|| KeySourceError::BadMetadata("key without a block length".into()))?;
            let start = entry.block_offset as usize;
            let slices: Vec<&[u8]> = blocks.iter().map(|b| &b[start..start + block]).collect();
            let material_len = confirm::material_len(entry.size_bytes())
                .ok_or_else(|| KeySourceError::BadMetadata("key too large".into()))?;
            let mut material = Zeroizing::new(vec![0u8; material_len]);
            extractor
                .extract(&slices, &mut material)
                .map_err(|e| KeySourceError::BadMetadata(e.to_string()))?;
            let (key, tag_key) = TagKey::split(&material)
                .ok_or_else(|| KeySourceError::BadMetadata("empty key".into()))?;
            let id = Uuid::from_bytes(entry.key_id);
            if !tag_key.verify(key, &entry.key_id, &entry.confirm) {
                return Err(KeySourceError::Confirmation { key_id: id });
            }
            keys.push((id, KeyMaterial::new(key.to_vec())));
        }
        Ok(keys)
    }
}

/// The SP 800-90B repetition count test over one block, fresh for each block.
fn repetition_count(block: &[u8]) -> Result<(), HealthFailure> {
    RepetitionCount::new().feed(block)
}

/// The Unix time on this machine, to compare with the servers' expiry times.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unhealthy(server: &str, failure: HealthFailure) -> String {
    format!("entropy server {server} sent a block that failed its health test: {failure}")
}
