//! Bounded resources per listener: how many connections one listener holds at once and how
//! long a connection may stay without doing useful work.
//!
//! Every connection [`serve_mtls`](crate::serve_mtls) accepts is entered in its listener's
//! [`Registry`] before the TLS handshake starts, so half-open and handshaking connections
//! count against the cap like any other. When the listener is full, a new connection evicts
//! the connection that has been idle longest (no request in flight; one still in its
//! handshake, or that has sent no request yet, counts as idle). When every connection has a
//! request in flight, the new one is closed at once. Either way the listener keeps
//! accepting, so a flood of idle or slow connections cannot keep an SAE out, and the
//! process never runs out of descriptors through one listener.
//!
//! The choice of whom to evict is pure logic over millisecond timestamps ([`Table`]), so it
//! is tested without sockets or clocks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Default cap on open connections per listener.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4096;
/// Default time a client has to finish its TLS handshake, in milliseconds.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Default time a connection may stay without a request in flight, in milliseconds.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Default time an HTTP/1 client has to send a complete request head, in milliseconds.
pub const DEFAULT_HEADER_TIMEOUT_MS: u64 = 10_000;
/// Default time from a request head to its answer, body upload included, in milliseconds:
/// well above any request's own deadline (`peers.timeout_ms`), so it cuts only requests
/// whose body trickles in.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;

/// Connection limits of a listener, as written in a config file (`[connections]`). Every
/// field is optional in the file; the defaults suit a site serving thousands of SAEs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerLimits {
    /// Most connections open at once on one listener, handshaking ones included
    /// (default 4096). A new connection beyond it evicts the longest-idle one.
    pub max_connections: u32,
    /// Time a client has from connecting to finishing its TLS handshake (default 10 s).
    pub handshake_timeout_ms: u64,
    /// Time a connection may stay open with no request in flight before it is closed
    /// (default 60 s): bounds idle keep-alive connections and connections that never send
    /// a request.
    pub idle_timeout_ms: u64,
    /// Time an HTTP/1 client has to send a complete request head, counted from when the
    /// server starts waiting for it (default 10 s). It cuts slowly sent headers, and it
    /// also closes a kept-alive HTTP/1 connection that sends no new request for that long.
    pub header_timeout_ms: u64,
    /// Time from a request head to the head of its answer, reading the request body
    /// included (default 30 s): a client that sends its body slowly cannot keep a
    /// connection busy, and so out of reach of eviction, for longer. Answered 408.
    pub request_timeout_ms: u64,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            header_timeout_ms: DEFAULT_HEADER_TIMEOUT_MS,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
        }
    }
}

impl ServerLimits {
    /// Refuses values no listener can work with, naming the key (as written under
    /// `[connections]`).
    pub fn check(&self) -> Result<(), String> {
        for (key, value) in [
            ("max_connections", u64::from(self.max_connections)),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("header_timeout_ms", self.header_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
        ] {
            if value == 0 {
                return Err(format!("connections.{key} must be at least 1"));
            }
        }
        Ok(())
    }

    /// Whether these are the defaults (so config writers can leave the section out).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The TLS handshake timeout.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// The idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// The HTTP/1 request-head timeout.
    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }

    /// The time a request may take to its answer, body upload included.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// What one open connection shares with its registry.
#[derive(Debug, Default)]
pub(crate) struct ConnState {
    /// Requests whose response has not been fully sent.
    in_flight: AtomicU32,
    /// When the connection last started or finished a request (or was opened), in
    /// milliseconds since the registry started.
    last_active_ms: AtomicU64,
    /// Woken when the registry evicts the connection.
    evicted: Notify,
    /// Whether a request has been served on it (so its client proved its certificate and
    /// used it): such connections are evicted only after those that never served one.
    served: AtomicBool,
    /// How long it may stay without a request in flight, in milliseconds (0: the
    /// listener's idle timeout). HTTP/1 connections get the shorter header timeout.
    idle_limit_ms: AtomicU64,
}

impl ConnState {
    fn new(now_ms: u64) -> Self {
        Self {
            last_active_ms: AtomicU64::new(now_ms),
            ..Self::default()
        }
    }

    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    fn last_active_ms(&self) -> u64 {
        self.last_active_ms.load(Ordering::Acquire)
    }

    fn has_served(&self) -> bool {
        self.served.load(Ordering::Acquire)
    }
}

/// The outcome of [`Table::admit`].
#[derive(Debug)]
pub(crate) enum Admission {
    /// The connection is in, with this ID; `evicted` made room for it.
    Admitted {
        id: u64,
        state: Arc<ConnState>,
        evicted: Option<Arc<ConnState>>,
    },
    /// The listener is full of connections with requests in flight.
    Refused,
}

/// The open connections of one listener: pure bookkeeping, times passed in.
#[derive(Debug)]
pub(crate) struct Table {
    cap: usize,
    next_id: u64,
    open: HashMap<u64, Arc<ConnState>>,
}

impl Table {
    pub(crate) fn new(cap: u32) -> Self {
        Self {
            cap: usize::try_from(cap).unwrap_or(usize::MAX).max(1),
            next_id: 0,
            open: HashMap::new(),
        }
    }

    /// Enters a new connection opened at `now_ms`, evicting a connection without a request
    /// in flight if the table is full, or refusing it if none is idle. The victim is the
    /// longest-idle connection that never served a request (still handshaking, or silent
    /// since), and only when there is none the longest-idle of the others: a flood of new
    /// connections evicts itself before it reaches the kept-alive connections of SAEs.
    pub(crate) fn admit(&mut self, now_ms: u64) -> Admission {
        let evicted = if self.open.len() >= self.cap {
            let victim = self
                .open
                .iter()
                .filter(|(_, state)| state.is_idle())
                .min_by_key(|(id, state)| (state.has_served(), state.last_active_ms(), **id))
                .map(|(id, _)| *id);
            match victim {
                Some(id) => self.open.remove(&id),
                None => return Admission::Refused,
            }
        } else {
            None
        };
        let id = self.next_id;
        self.next_id += 1;
        let state = Arc::new(ConnState::new(now_ms));
        self.open.insert(id, state.clone());
        Admission::Admitted { id, state, evicted }
    }

    /// Forgets a connection that closed (a no-op for one already evicted).
    pub(crate) fn remove(&mut self, id: u64) {
        self.open.remove(&id);
    }

    pub(crate) fn len(&self) -> usize {
        self.open.len()
    }
}

/// Logs a frequent event at most once per interval, with how many happened since.
#[derive(Debug, Default)]
pub(crate) struct LogLimiter {
    last_ms: Option<u64>,
    unlogged: u64,
}

impl LogLimiter {
    /// At most one log line a second.
    const INTERVAL_MS: u64 = 1000;

    /// Counts one event at `now_ms`; returns how many to report if a line is due now.
    pub(crate) fn event(&mut self, now_ms: u64) -> Option<u64> {
        self.unlogged += 1;
        match self.last_ms {
            Some(last) if now_ms.saturating_sub(last) < Self::INTERVAL_MS => None,
            _ => {
                self.last_ms = Some(now_ms);
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }
}

#[derive(Debug, Default)]
struct Logs {
    evicted: LogLimiter,
    refused: LogLimiter,
}

/// The connection registry of one listener.
pub(crate) struct Registry {
    /// The listener in log lines, e.g. `KME_A/peer`.
    name: Arc<str>,
    /// The labels of its metrics (the process and the listener).
    labels: Arc<[(&'static str, String)]>,
    limits: ServerLimits,
    epoch: Instant,
    table: Mutex<Table>,
    logs: Mutex<Logs>,
}

impl Registry {
    pub(crate) fn new(limits: ServerLimits, labels: Arc<[(&'static str, String)]>) -> Arc<Self> {
        let name = labels
            .iter()
            .map(|(_, value)| value.as_str())
            .collect::<Vec<_>>()
            .join("/");
        Arc::new(Self {
            name: name.into(),
            labels,
            limits,
            epoch: Instant::now(),
            table: Mutex::new(Table::new(limits.max_connections)),
            logs: Mutex::new(Logs::default()),
        })
    }

    pub(crate) fn limits(&self) -> &ServerLimits {
        &self.limits
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn labels(&self) -> Vec<(&'static str, String)> {
        self.labels.to_vec()
    }

    /// Enters a connection just accepted from `remote`; `None` means close it at once.
    pub(crate) fn admit(self: &Arc<Self>, remote: SocketAddr) -> Option<Connection> {
        let now_ms = self.now_ms();
        let admission = lock(&self.table).admit(now_ms);
        match admission {
            Admission::Admitted { id, state, evicted } => {
                if let Some(victim) = evicted {
                    victim.evicted.notify_one();
                    metrics::counter!("dqkd_connections_evicted_total", &self.labels())
                        .increment(1);
                    if let Some(count) = lock(&self.logs).evicted.event(now_ms) {
                        tracing::warn!(listener = %self.name, max_connections = self.limits.max_connections,
                            evicted = count,
                            "connection limit reached: closed the longest-idle connections to admit new ones");
                    }
                } else {
                    metrics::gauge!("dqkd_connections_open", &self.labels()).increment(1.0);
                }
                Some(Connection {
                    registry: self.clone(),
                    id,
                    state,
                })
            }
            Admission::Refused => {
                metrics::counter!("dqkd_connections_refused_total", &self.labels()).increment(1);
                if let Some(count) = lock(&self.logs).refused.event(now_ms) {
                    tracing::warn!(listener = %self.name, %remote, max_connections = self.limits.max_connections,
                        refused = count,
                        "connection limit reached and every connection has a request in flight: refused new connections");
                }
                None
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The tables hold no invariant a panicking holder could break half-way.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One admitted connection; dropping it takes it out of the registry.
pub(crate) struct Connection {
    registry: Arc<Registry>,
    id: u64,
    state: Arc<ConnState>,
}

impl Connection {
    /// Runs `serve` (the connection's whole life: handshake, then HTTP) until it ends, the
    /// registry evicts the connection, or it stays idle for the idle timeout.
    pub(crate) async fn run(
        self,
        remote: SocketAddr,
        serve: impl std::future::Future<Output = ()>,
    ) {
        tokio::select! {
            () = serve => {}
            () = self.state.evicted.notified() => {
                tracing::debug!(listener = %self.registry.name, %remote, "closed an idle connection to make room");
            }
            () = self.idle() => {
                metrics::counter!("dqkd_connections_idle_closed_total", &self.registry.labels())
                    .increment(1);
                tracing::debug!(listener = %self.registry.name, %remote, "closed an idle connection");
            }
        }
    }

    /// What the connection's tasks use to report activity.
    pub(crate) fn tracker(&self) -> Tracker {
        Tracker {
            registry: self.registry.clone(),
            state: self.state.clone(),
        }
    }

    /// Completes once the connection has had no request in flight for its idle limit.
    async fn idle(&self) {
        loop {
            let timeout = match self.state.idle_limit_ms.load(Ordering::Acquire) {
                0 => self.registry.limits.idle_timeout_ms,
                limit => limit,
            };
            let now = self.registry.now_ms();
            let since = now.saturating_sub(self.state.last_active_ms());
            let wait = if self.state.is_idle() {
                if since >= timeout {
                    return;
                }
                timeout - since
            } else {
                timeout
            };
            // The limit can shrink once the handshake tells HTTP/1 from HTTP/2: never sleep
            // past the shortest one without looking again.
            let limits = &self.registry.limits;
            let recheck = limits.header_timeout_ms.min(limits.idle_timeout_ms);
            tokio::time::sleep(Duration::from_millis(wait.min(recheck))).await;
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut table = lock(&self.registry.table);
        let before = table.len();
        table.remove(self.id);
        if table.len() < before {
            metrics::gauge!("dqkd_connections_open", &self.registry.labels()).decrement(1.0);
        }
    }
}

/// Reports a connection's activity to its registry.
#[derive(Clone)]
pub(crate) struct Tracker {
    registry: Arc<Registry>,
    state: Arc<ConnState>,
}

impl Tracker {
    /// Marks the connection active now (e.g. its handshake finished).
    pub(crate) fn touch(&self) {
        self.state
            .last_active_ms
            .store(self.registry.now_ms(), Ordering::Release);
    }

    /// The connection speaks HTTP/1: between requests it waits for a request head, which
    /// must arrive within the header timeout. One timer per connection does what hyper's
    /// header timeout does with one per request: a head trickling in has no request in
    /// flight, and neither has a kept-alive connection waiting for its next one.
    pub(crate) fn http1(&self) {
        let limits = &self.registry.limits;
        let limit = limits.header_timeout_ms.min(limits.idle_timeout_ms);
        self.state.idle_limit_ms.store(limit, Ordering::Release);
    }

    /// A request begins; the returned guard ends it when dropped.
    pub(crate) fn request(&self) -> InFlight {
        self.state.in_flight.fetch_add(1, Ordering::AcqRel);
        self.state.served.store(true, Ordering::Release);
        self.touch();
        InFlight {
            registry: self.registry.clone(),
            state: self.state.clone(),
        }
    }
}

/// A request in flight on a connection: from the call of the service until its response
/// body has been sent (or dropped).
pub(crate) struct InFlight {
    registry: Arc<Registry>,
    state: Arc<ConnState>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state
            .last_active_ms
            .store(self.registry.now_ms(), Ordering::Release);
        self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The answer to a request that did not get its own answer within
/// [`ServerLimits::request_timeout`] (most often: its body arrived too slowly): 408 with a
/// JSON `Error` body, and the connection closed after it.
pub(crate) fn request_timed_out(remote: SocketAddr) -> axum::response::Response {
    tracing::warn!(%remote, "a request took longer than connections.request_timeout_ms; answered 408 and closed");
    let mut response = axum::response::Response::new(axum::body::Body::from(
        r#"{"message":"the request was not received in time"}"#,
    ));
    *response.status_mut() = axum::http::StatusCode::REQUEST_TIMEOUT;
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}

/// A response body that keeps its request in flight until it is sent.
pub(crate) struct TrackedBody {
    body: axum::body::Body,
    _request: InFlight,
}

impl TrackedBody {
    pub(crate) fn wrap(
        response: axum::response::Response,
        request: InFlight,
    ) -> axum::response::Response {
        response.map(|body| {
            axum::body::Body::new(Self {
                body,
                _request: request,
            })
        })
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
#[path = "limits_tests.rs"]
mod tests;
