//! Pools, ranges and readers: the bookkeeping that guarantees a range is handed out once
//! and read at most once by each named reader, and that its bytes are shredded when no
//! longer needed.
//!
//! No I/O and no clock: the caller passes the time and the bytes in, so every rule here is
//! tested without sockets or sleeps. The server keeps one [`Pools`] behind a mutex.
//!
//! Two bounds on the unread bytes held: all of them ([`PoolLimits::max_live_bytes`]) and
//! those allocated by any one KME ([`PoolLimits::max_live_bytes_per_kme`]), so that a KME
//! that names readers who never read fills only its own quota, not the server.
//!
//! A range's bytes are held as one [`SharedBytes`] buffer: the allocator's response body
//! and each reader's response body share it instead of copying it. The pool drops its
//! handle as soon as the last reader has read the range (or the pool expires); the buffer
//! is zeroised and freed when the last response body holding it is dropped.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

/// Random bytes shared between the pool and response bodies; zeroised when the last
/// holder drops it.
pub type SharedBytes = Arc<Zeroizing<Vec<u8>>>;

/// A new pool is also started after this many ranges, so that a flood of tiny allocations
/// cannot grow one pool's bookkeeping without bound.
pub const MAX_RANGES_PER_POOL: usize = 65_536;

/// The 16-byte random ID of a pool; written as 32 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolId(pub [u8; 16]);

impl fmt::Display for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::hex::encode(&self.0))
    }
}

impl fmt::Debug for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PoolId({self})")
    }
}

/// The text is not 32 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a pool ID is 32 lowercase hex characters")]
pub struct BadPoolId;

impl FromStr for PoolId {
    type Err = BadPoolId;

    fn from_str(s: &str) -> Result<Self, BadPoolId> {
        crate::hex::decode::<16>(s).map(PoolId).ok_or(BadPoolId)
    }
}

/// The pool rules from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLimits {
    /// Lifetime of a pool and of its ranges.
    pub ttl: Duration,
    /// Age after which a new pool is started.
    pub rotate: Duration,
    /// Offsets after which a new pool is started.
    pub pool_max_bytes: u64,
    /// Most unread range bytes held at once.
    pub max_live_bytes: u64,
    /// Most unread range bytes held at once for ranges one KME allocated.
    pub max_live_bytes_per_kme: u64,
}

/// Why a pool operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// Holding the range would exceed the memory bound.
    #[error("entropy pool full: {live} unread bytes held, {len} more would exceed {max}")]
    Full {
        /// Unread bytes held now.
        live: u64,
        /// Bytes asked for.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// Holding the range would exceed the allocating KME's quota.
    #[error(
        "entropy quota of {kme} exceeded: {live} unread bytes held for its ranges, {len} more \
         would exceed max_live_bytes_per_kme ({quota})"
    )]
    Quota {
        /// The allocating KME.
        kme: String,
        /// Unread bytes held for its ranges now.
        live: u64,
        /// Bytes asked for.
        len: u64,
        /// Its quota.
        quota: u64,
    },
    /// No such range: unknown pool, expired pool, or no range with this offset and length.
    #[error("range unknown or expired (shredded)")]
    NotFound,
    /// The caller is not one of the range's readers.
    #[error("{0} is not a reader of this range")]
    NotReader(String),
    /// The caller has already read the range.
    #[error("range already read by {0}")]
    AlreadyRead(String),
}

/// What an allocation was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// The pool the range was carved from.
    pub pool_id: PoolId,
    /// Offset of the range in the pool.
    pub offset: u64,
    /// Length of the range.
    pub len: u64,
    /// When the range is shredded, in Unix seconds.
    pub expires_at: u64,
}

/// A successful read.
#[derive(Debug)]
pub struct ReadOutcome {
    /// The range's bytes.
    pub bytes: SharedBytes,
    /// Bytes released for shredding because this was the last reader (0 otherwise).
    pub shredded: u64,
}

/// What an expiry sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Pools removed.
    pub pools: usize,
    /// Unread bytes released for shredding.
    pub bytes: u64,
}

/// Every live pool of one server.
#[derive(Debug)]
pub struct Pools {
    limits: PoolLimits,
    current: Option<PoolId>,
    pools: HashMap<PoolId, Pool>,
    live_bytes: u64,
    /// Unread bytes held per allocating KME; no entry means 0.
    live_by_kme: HashMap<String, u64>,
}

#[derive(Debug)]
struct Pool {
    created: Instant,
    expires: Instant,
    expires_at_unix: u64,
    next_offset: u64,
    ranges: BTreeMap<u64, Range>,
}

/// One allocated range. Its bookkeeping outlives its bytes until the pool expires, so
/// that a second read is told "already read" (410), not "unknown" (404).
struct Range {
    len: u64,
    /// The KME that allocated it; its quota holds the unread bytes.
    owner: String,
    readers: Vec<Reader>,
    bytes: Option<SharedBytes>,
}

impl fmt::Debug for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the bytes.
        f.debug_struct("Range")
            .field("len", &self.len)
            .field("owner", &self.owner)
            .field("readers", &self.readers)
            .field("held", &self.bytes.is_some())
            .finish()
    }
}

#[derive(Debug)]
struct Reader {
    id: String,
    read: bool,
}

impl Pools {
    /// No pools yet; the first allocation starts one.
    pub fn new(limits: PoolLimits) -> Self {
        Self {
            limits,
            current: None,
            pools: HashMap::new(),
            live_bytes: 0,
            live_by_kme: HashMap::new(),
        }
    }

    /// Unread range bytes held now.
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Unread bytes held now for ranges `kme` allocated.
    pub fn live_bytes_of(&self, kme: &str) -> u64 {
        self.live_by_kme.get(kme).copied().unwrap_or(0)
    }

    /// Pools alive now (including expired ones the sweep has not removed yet).
    pub fn pool_count(&self) -> usize {
        self.pools.len()
    }

    /// Whether `len` more unread bytes allocated by `kme` would fit, in the server's bound
    /// and in its quota; checked before generating the bytes so that a full server does
    /// not burn CPU on bytes it will refuse to hold.
    pub fn check_room(&self, kme: &str, len: u64, holds_bytes: bool) -> Result<(), PoolError> {
        if !holds_bytes {
            return Ok(());
        }
        if self.live_bytes.saturating_add(len) > self.limits.max_live_bytes {
            return Err(PoolError::Full {
                live: self.live_bytes,
                len,
                max: self.limits.max_live_bytes,
            });
        }
        let mine = self.live_bytes_of(kme);
        if mine.saturating_add(len) > self.limits.max_live_bytes_per_kme {
            return Err(PoolError::Quota {
                kme: kme.to_owned(),
                live: mine,
                len,
                quota: self.limits.max_live_bytes_per_kme,
            });
        }
        Ok(())
    }

    /// Carves a range of `bytes.len()` bytes for `readers` out of the current pool on
    /// behalf of `kme`, starting a new pool (with ID `fresh_id`) when the current one is too
    /// old, too big or has too many ranges. With no readers the bytes are not kept at all.
    pub fn allocate(
        &mut self,
        now: Instant,
        now_unix: u64,
        fresh_id: PoolId,
        kme: &str,
        readers: Vec<String>,
        bytes: SharedBytes,
    ) -> Result<Granted, PoolError> {
        let len = bytes.len() as u64;
        let holds = !readers.is_empty();
        self.check_room(kme, len, holds)?;
        let pool_id = self.current_pool(now, now_unix, fresh_id, len);
        let pool = self.pools.get_mut(&pool_id).ok_or(PoolError::NotFound)?;
        let offset = pool.next_offset;
        pool.next_offset = offset.saturating_add(len);
        pool.ranges.insert(
            offset,
            Range {
                len,
                owner: kme.to_owned(),
                readers: readers
                    .into_iter()
                    .map(|id| Reader { id, read: false })
                    .collect(),
                bytes: holds.then_some(bytes),
            },
        );
        if holds {
            self.live_bytes += len;
            *self.live_by_kme.entry(kme.to_owned()).or_insert(0) += len;
        }
        Ok(Granted {
            pool_id,
            offset,
            len,
            expires_at: pool.expires_at_unix,
        })
    }

    /// The pool to carve `len` bytes from, starting a new one if needed.
    fn current_pool(&mut self, now: Instant, now_unix: u64, fresh_id: PoolId, len: u64) -> PoolId {
        if let Some(id) = self.current {
            if let Some(pool) = self.pools.get(&id) {
                let young = now.saturating_duration_since(pool.created) < self.limits.rotate;
                let fits = pool.next_offset == 0
                    || pool.next_offset.saturating_add(len) <= self.limits.pool_max_bytes;
                if young && fits && pool.ranges.len() < MAX_RANGES_PER_POOL {
                    return id;
                }
            }
        }
        let ttl = self.limits.ttl;
        self.pools.insert(
            fresh_id,
            Pool {
                created: now,
                expires: now + ttl,
                expires_at_unix: now_unix.saturating_add(ttl.as_secs()),
                next_offset: 0,
                ranges: BTreeMap::new(),
            },
        );
        self.current = Some(fresh_id);
        fresh_id
    }

    /// Reads a range as `reader`: allowed once per named reader, before the pool expires.
    /// The last allowed read releases the range's bytes.
    pub fn read(
        &mut self,
        now: Instant,
        pool_id: PoolId,
        offset: u64,
        len: u64,
        reader: &str,
    ) -> Result<ReadOutcome, PoolError> {
        let pool = self.pools.get_mut(&pool_id).ok_or(PoolError::NotFound)?;
        if now >= pool.expires {
            return Err(PoolError::NotFound);
        }
        let range = pool
            .ranges
            .get_mut(&offset)
            .filter(|r| r.len == len)
            .ok_or(PoolError::NotFound)?;
        let entry = range
            .readers
            .iter_mut()
            .find(|r| r.id == reader)
            .ok_or_else(|| PoolError::NotReader(reader.to_owned()))?;
        if entry.read {
            return Err(PoolError::AlreadyRead(reader.to_owned()));
        }
        // Invariant: a range with readers keeps its bytes until every reader has read it.
        let bytes = range.bytes.clone().ok_or(PoolError::NotFound)?;
        entry.read = true;
        let mut shredded = 0;
        if range.readers.iter().all(|r| r.read) {
            range.bytes = None;
            self.live_bytes -= len;
            release(&mut self.live_by_kme, &range.owner, len);
            shredded = len;
        }
        Ok(ReadOutcome { bytes, shredded })
    }

    /// Removes every pool whose TTL has ended, with all its ranges' bytes and bookkeeping.
    pub fn expire(&mut self, now: Instant) -> Sweep {
        let mut sweep = Sweep::default();
        let live = &mut self.live_bytes;
        let by_kme = &mut self.live_by_kme;
        self.pools.retain(|_, pool| {
            if now < pool.expires {
                return true;
            }
            let mut held = 0;
            for range in pool.ranges.values().filter(|r| r.bytes.is_some()) {
                held += range.len;
                release(by_kme, &range.owner, range.len);
            }
            *live -= held;
            sweep.bytes += held;
            sweep.pools += 1;
            false
        });
        if self.current.is_some_and(|id| !self.pools.contains_key(&id)) {
            self.current = None;
        }
        sweep
    }
}

/// Takes `len` released bytes off `kme`'s count, dropping the entry at zero so that KMEs
/// that come and go leave nothing behind.
fn release(by_kme: &mut HashMap<String, u64>, kme: &str, len: u64) {
    if let Some(held) = by_kme.get_mut(kme) {
        *held = held.saturating_sub(len);
        if *held == 0 {
            by_kme.remove(kme);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: PoolLimits = PoolLimits {
        ttl: Duration::from_secs(10),
        rotate: Duration::from_secs(5),
        pool_max_bytes: 100,
        max_live_bytes: 64,
        max_live_bytes_per_kme: 64,
    };

    fn bytes(len: usize, fill: u8) -> SharedBytes {
        Arc::new(Zeroizing::new(vec![fill; len]))
    }

    fn id(n: u8) -> PoolId {
        PoolId([n; 16])
    }

    fn readers(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn pool_id_text() {
        let id: PoolId = "000102030405060708090a0b0c0d0e0f".parse().unwrap();
        assert_eq!(id.0[15], 15);
        assert_eq!(id.to_string(), "000102030405060708090a0b0c0d0e0f");
        assert!("00".parse::<PoolId>().is_err());
    }

    #[test]
    fn ranges_never_overlap_and_pools_rotate() {
        let t0 = Instant::now();
        let mut pools = Pools::new(LIMITS);
        let a = pools
            .allocate(t0, 1000, id(1), "A", vec![], bytes(40, 1))
            .unwrap();
        let b = pools
            .allocate(t0, 1000, id(2), "A", vec![], bytes(40, 2))
            .unwrap();
        assert_eq!((a.pool_id, a.offset, a.expires_at), (id(1), 0, 1010));
        assert_eq!((b.pool_id, b.offset), (id(1), 40));
        // 80 + 40 > pool_max_bytes: new pool.
        let c = pools
            .allocate(t0, 1000, id(3), "A", vec![], bytes(40, 3))
            .unwrap();
        assert_eq!((c.pool_id, c.offset), (id(3), 0));
        // Older than `rotate`: new pool.
        let later = t0 + Duration::from_secs(6);
        let d = pools
            .allocate(later, 1006, id(4), "A", vec![], bytes(1, 4))
            .unwrap();
        assert_eq!((d.pool_id, d.offset, d.expires_at), (id(4), 0, 1016));
        // Larger than pool_max_bytes still works in a fresh pool.
        let mut big = Pools::new(PoolLimits {
            max_live_bytes: 1000,
            max_live_bytes_per_kme: 1000,
            ..LIMITS
        });
        let e = big
            .allocate(t0, 0, id(5), "A", vec![], bytes(500, 5))
            .unwrap();
        assert_eq!(e.offset, 0);
    }

    #[test]
    fn each_reader_reads_once_then_bytes_are_released() {
        let t0 = Instant::now();
        let mut pools = Pools::new(LIMITS);
        let g = pools
            .allocate(t0, 0, id(1), "A", readers(&["B", "C"]), bytes(8, 7))
            .unwrap();
        assert_eq!(pools.live_bytes(), 8);
        let read = |p: &mut Pools, who: &str| p.read(t0, g.pool_id, g.offset, g.len, who);
        assert_eq!(
            read(&mut pools, "D").unwrap_err(),
            PoolError::NotReader("D".into())
        );
        let first = read(&mut pools, "B").unwrap();
        assert_eq!(**first.bytes, vec![7u8; 8]);
        assert_eq!(first.shredded, 0);
        assert_eq!(
            read(&mut pools, "B").unwrap_err(),
            PoolError::AlreadyRead("B".into())
        );
        let second = read(&mut pools, "C").unwrap();
        assert_eq!(second.shredded, 8);
        assert_eq!(pools.live_bytes(), 0);
        assert_eq!(
            read(&mut pools, "C").unwrap_err(),
            PoolError::AlreadyRead("C".into())
        );
        // Wrong offset or length: unknown.
        assert_eq!(
            pools.read(t0, g.pool_id, g.offset, 7, "B").unwrap_err(),
            PoolError::NotFound
        );
        assert_eq!(
            pools.read(t0, g.pool_id, 1, 8, "B").unwrap_err(),
            PoolError::NotFound
        );
        assert_eq!(
            pools.read(t0, id(9), 0, 8, "B").unwrap_err(),
            PoolError::NotFound
        );
    }

    #[test]
    fn no_readers_keeps_no_bytes() {
        let t0 = Instant::now();
        let mut pools = Pools::new(LIMITS);
        let g = pools
            .allocate(t0, 0, id(1), "A", vec![], bytes(60, 1))
            .unwrap();
        assert_eq!(pools.live_bytes(), 0);
        assert_eq!(
            pools.read(t0, g.pool_id, 0, 60, "A").unwrap_err(),
            PoolError::NotReader("A".into())
        );
    }

    #[test]
    fn memory_bound_refuses_then_recovers() {
        let t0 = Instant::now();
        let mut pools = Pools::new(LIMITS);
        let g = pools
            .allocate(t0, 0, id(1), "A", readers(&["B"]), bytes(60, 1))
            .unwrap();
        let err = pools
            .allocate(t0, 0, id(2), "C", readers(&["B"]), bytes(5, 1))
            .unwrap_err();
        assert!(matches!(
            err,
            PoolError::Full {
                live: 60,
                len: 5,
                max: 64
            }
        ));
        pools.read(t0, g.pool_id, 0, 60, "B").unwrap();
        pools
            .allocate(t0, 0, id(2), "C", readers(&["B"]), bytes(5, 1))
            .unwrap();
    }

    #[test]
    fn expiry_removes_pools_and_bytes() {
        let t0 = Instant::now();
        let mut pools = Pools::new(LIMITS);
        let g = pools
            .allocate(t0, 0, id(1), "A", readers(&["B"]), bytes(10, 1))
            .unwrap();
        assert_eq!(pools.expire(t0 + Duration::from_secs(9)), Sweep::default());
        let at_ttl = t0 + Duration::from_secs(10);
        // A read at expiry is refused even before the sweep runs.
        assert_eq!(
            pools.read(at_ttl, g.pool_id, 0, 10, "B").unwrap_err(),
            PoolError::NotFound
        );
        assert_eq!(
            pools.expire(at_ttl),
            Sweep {
                pools: 1,
                bytes: 10
            }
        );
        assert_eq!(pools.live_bytes(), 0);
        assert_eq!(pools.pool_count(), 0);
        // The next allocation starts a fresh pool.
        let h = pools
            .allocate(at_ttl, 10, id(2), "A", vec![], bytes(1, 1))
            .unwrap();
        assert_eq!(h.pool_id, id(2));
    }

    #[test]
    fn shared_buffer_outlives_the_pool_handle() {
        let t0 = Instant::now();
        let mut pools = Pools::new(LIMITS);
        let original = bytes(4, 9);
        let g = pools
            .allocate(t0, 0, id(1), "A", readers(&["B"]), original.clone())
            .unwrap();
        let out = pools.read(t0, g.pool_id, 0, 4, "B").unwrap();
        // Pool released its handle; the allocator's and the reader's remain.
        assert_eq!(Arc::strong_count(&original), 2);
        drop(out);
        assert_eq!(Arc::strong_count(&original), 1);
    }

    #[test]
    fn one_greedy_kme_cannot_stop_another() {
        let t0 = Instant::now();
        let mut pools = Pools::new(PoolLimits {
            max_live_bytes: 64,
            max_live_bytes_per_kme: 32,
            ..LIMITS
        });
        // A names a reader that never reads, until its quota is used up.
        for n in 0..4 {
            pools
                .allocate(t0, 0, id(1), "A", readers(&["Z"]), bytes(8, n))
                .unwrap();
        }
        let err = pools
            .allocate(t0, 0, id(1), "A", readers(&["Z"]), bytes(1, 9))
            .unwrap_err();
        assert_eq!(
            err,
            PoolError::Quota {
                kme: "A".into(),
                live: 32,
                len: 1,
                quota: 32
            }
        );
        assert!(err.to_string().contains("max_live_bytes_per_kme"), "{err}");
        // Allocations without readers hold nothing and stay allowed.
        pools
            .allocate(t0, 0, id(1), "A", vec![], bytes(8, 1))
            .unwrap();
        // B still allocates, up to its own quota.
        let g = pools
            .allocate(t0, 0, id(1), "B", readers(&["A"]), bytes(32, 2))
            .unwrap();
        assert_eq!(
            (pools.live_bytes_of("A"), pools.live_bytes_of("B")),
            (32, 32)
        );
        // Reading B's range frees B's quota, not A's.
        pools.read(t0, g.pool_id, g.offset, 32, "A").unwrap();
        assert_eq!(
            (pools.live_bytes_of("A"), pools.live_bytes_of("B")),
            (32, 0)
        );
        // Expiry frees A's.
        pools.expire(t0 + LIMITS.ttl);
        assert_eq!(pools.live_bytes_of("A"), 0);
        assert!(pools.live_by_kme.is_empty());
        pools
            .allocate(
                t0 + LIMITS.ttl,
                10,
                id(2),
                "A",
                readers(&["Z"]),
                bytes(32, 3),
            )
            .unwrap();
    }
}
