//! A TCP proxy on loopback whose connections can be frozen (they stay open and carry
//! nothing more, like a host that stopped answering), refused (closed at once, like a host
//! that is down) and thawed again.
//!
//! It runs on its own thread and runtime, so tests may block their own threads (start
//! processes, sleep) without stalling it. Shared by the end-to-end tests and the PostgreSQL
//! store tests.

// Test helper: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A proxy from a free loopback port (or a given one) to `upstream`.
pub struct FreezingProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    state: Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    next_id: AtomicU64,
    /// Connections numbered below this carry nothing more.
    frozen_below: AtomicU64,
    /// Connections numbered below this are closed.
    closed_below: AtomicU64,
    /// Every connection, open or new, carries nothing.
    frozen: AtomicBool,
    /// New connections are closed at once.
    refusing: AtomicBool,
    stopped: AtomicBool,
}

impl FreezingProxy {
    /// Listens on a free loopback port and forwards to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Self {
        Self::start_on(0, upstream)
    }

    /// Listens on loopback `port` and forwards to `upstream` (`host:port`).
    pub fn start_on(port: u16, upstream: &str) -> Self {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("proxy port");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(ProxyState::default());
        let shared = state.clone();
        let upstream = upstream.to_owned();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            runtime.block_on(accept_loop(listener, upstream, shared));
        });
        Self { addr, state }
    }

    /// Every connection open now stops carrying bytes but stays open; new ones still pass.
    pub fn freeze_open_connections(&self) {
        self.state
            .frozen_below
            .store(self.state.next_id.load(SeqCst), SeqCst);
    }

    /// Every connection frozen by [`Self::freeze_open_connections`] is closed at both ends.
    pub fn close_frozen_connections(&self) {
        self.state
            .closed_below
            .store(self.state.frozen_below.load(SeqCst), SeqCst);
    }

    /// Every connection, open or new, stops carrying bytes but stays open.
    pub fn freeze(&self) {
        self.state.frozen.store(true, SeqCst);
    }

    /// Open connections are closed and new ones closed as soon as they are accepted.
    pub fn refuse(&self) {
        self.state.refusing.store(true, SeqCst);
        self.close_open_connections();
    }

    /// Back to forwarding. Connections that were frozen or refused are closed (a frozen one
    /// dropped bytes, so its stream is broken); clients connect again. Returns once clients
    /// have had time to see their old connections closed.
    pub fn thaw(&self) {
        self.close_open_connections();
        self.state.frozen.store(false, SeqCst);
        self.state.refusing.store(false, SeqCst);
        std::thread::sleep(Duration::from_millis(200));
    }

    fn close_open_connections(&self) {
        self.state
            .closed_below
            .store(self.state.next_id.load(SeqCst), SeqCst);
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        self.state.stopped.store(true, SeqCst);
        self.close_open_connections();
    }
}

async fn accept_loop(listener: std::net::TcpListener, upstream: String, state: Arc<ProxyState>) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    while !state.stopped.load(SeqCst) {
        let Ok(Ok((client, _))) =
            tokio::time::timeout(Duration::from_millis(50), listener.accept()).await
        else {
            continue;
        };
        let id = state.next_id.fetch_add(1, SeqCst);
        if state.refusing.load(SeqCst) {
            drop(client);
            continue;
        }
        let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
            continue;
        };
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = server.into_split();
        tokio::spawn(pump(client_read, server_write, id, state.clone()));
        tokio::spawn(pump(server_read, client_write, id, state.clone()));
    }
}

/// Copies one direction of connection `id` until either end closes or the proxy closes it;
/// bytes read while it is frozen are dropped.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    id: u64,
    state: Arc<ProxyState>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if id < state.closed_below.load(SeqCst) {
            return;
        }
        let read = tokio::time::timeout(Duration::from_millis(20), from.read(&mut buf)).await;
        match read {
            Err(_) => continue,
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(n)) => {
                // Closed while reading: a thaw must not resume a stream that dropped bytes.
                if id < state.closed_below.load(SeqCst) {
                    return;
                }
                if state.frozen.load(SeqCst) || id < state.frozen_below.load(SeqCst) {
                    continue;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
