//! A TCP relay on loopback that adds a fixed one-way delay, so that `dqkd bench` can put an
//! ocean between two sites on one machine.
//!
//! Every chunk read from one side is written to the other side `delay` after it was read,
//! in order, in both directions. It is a pipe, not stop-and-wait: chunks read while earlier
//! ones wait are queued behind them with their own release times, so the delay is paid once
//! per chunk, not once per chunk in a row, and there is no bandwidth cap. The relay sees
//! only bytes: TLS runs end to end through it, and each side still checks the other's
//! certificate. A close (or a read error) on one side is passed on after the same delay as
//! a write shutdown, so half-closed connections stay half-closed.
//!
//! What it does not model: the TCP handshake itself (the client's `connect` returns at
//! once; connections are kept alive, so a real link pays that round trip once per
//! connection), loss, jitter and limited bandwidth.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Largest chunk read at once.
const CHUNK: usize = 64 * 1024;
/// Chunks queued per direction before the relay stops reading (bounds memory, not rate:
/// 1,024 chunks of up to 64 KiB is far more than any link here keeps in flight).
const QUEUED_CHUNKS: usize = 1024;

/// A running relay; it stops, closing every connection it carries, when dropped.
pub struct DelayProxy {
    addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

impl DelayProxy {
    /// Listens on `listen` (port 0: any free port) and relays every connection to
    /// `target`, delaying each direction by `delay`.
    pub async fn start(
        listen: SocketAddr,
        target: SocketAddr,
        delay: Duration,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let accept = tokio::spawn(accept_loop(listener, target, delay));
        Ok(Self { addr, accept })
    }

    /// Where callers connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        // The accept task owns the connections' JoinSet: aborting it closes them all.
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, delay: Duration) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((inbound, _)) => {
                    connections.spawn(relay(inbound, target, delay));
                }
                Err(e) => {
                    // Out of descriptors, say: the callers see refused connections and retry.
                    tracing::warn!(error = %e, "delay relay: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Carries one connection: the two directions run independently until each has passed on
/// its close.
async fn relay(inbound: TcpStream, target: SocketAddr, delay: Duration) {
    let outbound = match TcpStream::connect(target).await {
        Ok(s) => s,
        // The caller sees its connection closed, as it would a refused one.
        Err(_) => return,
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    tokio::join!(
        pipe(in_read, out_write, delay),
        pipe(out_read, in_write, delay)
    );
}

/// One direction: a reader stamps each chunk with its release time, a writer releases it
/// then. `None` stands for the close.
async fn pipe(mut from: OwnedReadHalf, to: OwnedWriteHalf, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(QUEUED_CHUNKS);
    let read = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let chunk = match from.read(&mut buf).await {
                Ok(0) | Err(_) => None,
                Ok(n) => Some(buf[..n].to_vec()),
            };
            let closing = chunk.is_none();
            if tx.send((Instant::now() + delay, chunk)).await.is_err() || closing {
                return;
            }
        }
    };
    let write = release(rx, to);
    tokio::pin!(write);
    tokio::select! {
        () = read => (&mut write).await,
        // The far side stopped taking bytes: stop reading from this one.
        () = &mut write => {}
    }
}

async fn release(mut rx: mpsc::Receiver<(Instant, Option<Vec<u8>>)>, mut to: OwnedWriteHalf) {
    while let Some((due, chunk)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        match chunk {
            Some(bytes) => {
                if to.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            None => {
                let _ = to.shutdown().await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Correctness of the relay over real loopback sockets. Timing is checked only as a
    //! lower bound (nothing arrives before its delay); how fast it runs is the bench's job.

    use super::*;

    const DELAY: Duration = Duration::from_millis(40);

    /// A failure here must fail the test, not hang it.
    async fn within<T>(what: &str, work: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), work)
            .await
            .unwrap_or_else(|_| panic!("{what}: nothing happened within 10 s"))
    }

    /// An echo-free sink: the target side of each accepted connection, handed to the test.
    async fn target() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
        let addr = listener.local_addr().expect("target addr");
        (listener, addr)
    }

    /// Reads exactly `len` bytes, returning them and when the first byte arrived.
    async fn read_exact_timed(stream: &mut TcpStream, len: usize) -> (Vec<u8>, Instant) {
        let mut out = Vec::with_capacity(len);
        let mut first = None;
        let mut buf = vec![0u8; CHUNK];
        while out.len() < len {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed after {} of {len} bytes", out.len());
            first.get_or_insert_with(Instant::now);
            out.extend_from_slice(&buf[..n]);
        }
        (out, first.expect("some bytes"))
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn bytes_arrive_intact_in_order_and_not_before_the_delay_both_ways() {
        let (listener, addr) = target().await;
        let proxy = DelayProxy::start("127.0.0.1:0".parse().expect("addr"), addr, DELAY)
            .await
            .expect("start relay");
        let mut client = TcpStream::connect(proxy.local_addr())
            .await
            .expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");

        // Several writes larger than one chunk, so order across chunks is checked.
        let up = pattern(300_000, 7);
        let sent = Instant::now();
        for part in up.chunks(70_000) {
            client.write_all(part).await.expect("write up");
        }
        let (got, first) = within("client→server", read_exact_timed(&mut server, up.len())).await;
        assert!(got == up, "client→server bytes changed or reordered");
        assert!(
            first.duration_since(sent) >= DELAY,
            "client→server bytes arrived after {:?}, before the {DELAY:?} delay",
            first.duration_since(sent)
        );

        let down = pattern(200_000, 99);
        let sent = Instant::now();
        server.write_all(&down).await.expect("write down");
        let (got, first) = within("server→client", read_exact_timed(&mut client, down.len())).await;
        assert!(got == down, "server→client bytes changed or reordered");
        assert!(
            first.duration_since(sent) >= DELAY,
            "server→client bytes arrived after {:?}, before the {DELAY:?} delay",
            first.duration_since(sent)
        );
    }

    #[tokio::test]
    async fn a_close_is_passed_on_each_way_after_the_bytes_before_it() {
        let (listener, addr) = target().await;
        let proxy = DelayProxy::start("127.0.0.1:0".parse().expect("addr"), addr, DELAY)
            .await
            .expect("start relay");
        let mut client = TcpStream::connect(proxy.local_addr())
            .await
            .expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");

        // The client half-closes: the server reads the bytes, then end of stream…
        client.write_all(b"last words").await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        within("the client's close", server.read_to_end(&mut got))
            .await
            .expect("read to end");
        assert_eq!(got, b"last words");

        // …while the other direction still carries bytes, and then its own close.
        server.write_all(b"reply").await.expect("write reply");
        drop(server);
        let mut got = Vec::new();
        within("the server's close", client.read_to_end(&mut got))
            .await
            .expect("client read to end");
        assert_eq!(got, b"reply");
    }

    #[tokio::test]
    async fn many_connections_are_relayed_independently() {
        let (listener, addr) = target().await;
        let proxy = DelayProxy::start("127.0.0.1:0".parse().expect("addr"), addr, DELAY)
            .await
            .expect("start relay");
        let mut pairs = Vec::new();
        for _ in 0..8 {
            let client = TcpStream::connect(proxy.local_addr())
                .await
                .expect("connect");
            let (server, _) = listener.accept().await.expect("accept");
            pairs.push((client, server));
        }
        for (i, (client, _)) in pairs.iter_mut().enumerate() {
            client
                .write_all(&pattern(10_000, i as u8))
                .await
                .expect("write");
        }
        for (i, (_, server)) in pairs.iter_mut().enumerate() {
            let (got, _) = within("a connection", read_exact_timed(server, 10_000)).await;
            assert!(got == pattern(10_000, i as u8), "connection {i} mixed up");
        }
    }

    #[tokio::test]
    async fn dropping_the_relay_closes_its_connections() {
        let (listener, addr) = target().await;
        let proxy = DelayProxy::start("127.0.0.1:0".parse().expect("addr"), addr, DELAY)
            .await
            .expect("start relay");
        let mut client = TcpStream::connect(proxy.local_addr())
            .await
            .expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");
        drop(proxy);
        let mut buf = [0u8; 16];
        let n = within("the target's close", server.read(&mut buf))
            .await
            .unwrap_or(0);
        assert_eq!(n, 0, "the target still connected after the relay stopped");
        let n = within("the caller's close", client.read(&mut buf))
            .await
            .unwrap_or(0);
        assert_eq!(n, 0, "the caller still connected after the relay stopped");
    }
}
