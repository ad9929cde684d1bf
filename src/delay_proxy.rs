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
//! Release times are kept by one timer thread per relay, not by the async runtime's timer:
//! that timer fires on whole milliseconds, after the due time, so a relay built on it added
//! up to a millisecond each way (about 3 ms per round trip was measured at 40 ms one way).
//! The thread sleeps to the due instant itself (the OS timer's slack is tens of
//! microseconds), so a round trip through the relay costs 2·D plus the wake-ups.
//!
//! What it does not model: the TCP handshake itself (the client's `connect` returns at
//! once; connections are kept alive, so a real link pays that round trip once per
//! connection), loss, jitter and limited bandwidth.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
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
        let timer = PreciseTimer::start()?;
        let accept = tokio::spawn(accept_loop(listener, target, delay, timer));
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

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    delay: Duration,
    timer: PreciseTimer,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((inbound, _)) => {
                    connections.spawn(relay(inbound, target, delay, timer.clone()));
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
async fn relay(inbound: TcpStream, target: SocketAddr, delay: Duration, timer: PreciseTimer) {
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
        pipe(in_read, out_write, delay, timer.clone()),
        pipe(out_read, in_write, delay, timer)
    );
}

/// One direction: a reader stamps each chunk with its release time, a writer releases it
/// then. `None` stands for the close.
async fn pipe(mut from: OwnedReadHalf, to: OwnedWriteHalf, delay: Duration, timer: PreciseTimer) {
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
    let write = release(rx, to, timer);
    tokio::pin!(write);
    tokio::select! {
        () = read => (&mut write).await,
        // The far side stopped taking bytes: stop reading from this one.
        () = &mut write => {}
    }
}

async fn release(
    mut rx: mpsc::Receiver<(Instant, Option<Vec<u8>>)>,
    mut to: OwnedWriteHalf,
    timer: PreciseTimer,
) {
    while let Some((due, chunk)) = rx.recv().await {
        timer.until(due).await;
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

/// A round trip through a relay, measured: a small message to an echo server behind its own
/// relay with the same delay and back. The bench pings it during a run, so the figures it
/// reports can be set against the round trip the link really had on this machine at that
/// time (two delays, plus the wake-ups of a loaded host), not only the nominal 2·D.
pub struct RelayProbe {
    stream: TcpStream,
    _relay: DelayProxy,
    _echo: tokio::task::JoinHandle<()>,
}

impl RelayProbe {
    /// An echo server on loopback behind a relay of `delay`, and a connection to it.
    pub async fn start(delay: Duration) -> std::io::Result<Self> {
        let loopback = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
        let listener = TcpListener::bind(loopback).await?;
        let target = listener.local_addr()?;
        let echo = tokio::spawn(async move {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let _ = stream.set_nodelay(true);
            let mut buf = [0u8; 256];
            while let Ok(n @ 1..) = stream.read(&mut buf).await {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
        let relay = DelayProxy::start(loopback, target, delay).await?;
        let stream = TcpStream::connect(relay.local_addr()).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            _relay: relay,
            _echo: echo,
        })
    }

    /// One round trip of a 64-byte message.
    pub async fn ping(&mut self) -> std::io::Result<Duration> {
        let message = [0x5a_u8; 64];
        let sent = Instant::now();
        self.stream.write_all(&message).await?;
        let mut back = [0u8; 64];
        self.stream.read_exact(&mut back).await?;
        Ok(sent.elapsed())
    }
}

/// Wakes tasks at an instant, to the microsecond rather than the runtime timer's
/// millisecond: one OS thread sleeps until the earliest due wake-up. The thread ends when the
/// last handle is dropped.
#[derive(Clone)]
struct PreciseTimer {
    requests: std_mpsc::Sender<(std::time::Instant, oneshot::Sender<()>)>,
}

impl PreciseTimer {
    fn start() -> std::io::Result<Self> {
        let (requests, incoming) = std_mpsc::channel();
        std::thread::Builder::new()
            .name("delay-relay-timer".into())
            .spawn(move || timer_thread(incoming))?;
        Ok(Self { requests })
    }

    /// Returns at `due` (at once if it has passed).
    async fn until(&self, due: Instant) {
        let due = due.into_std();
        if due <= std::time::Instant::now() {
            return;
        }
        let (wake, woken) = oneshot::channel();
        if self.requests.send((due, wake)).is_err() {
            // The thread is gone (it never ends while a handle lives): fall back.
            tokio::time::sleep_until(due.into()).await;
            return;
        }
        let _ = woken.await;
    }
}

/// Wake-ups waiting for their instant, earliest first (ties in arrival order).
type Due = BinaryHeap<Reverse<(std::time::Instant, u64, WakeUp)>>;

/// A waiting task's wake-up; ordered by nothing (the heap orders by instant and number).
struct WakeUp(oneshot::Sender<()>);

impl PartialEq for WakeUp {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for WakeUp {}
impl PartialOrd for WakeUp {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for WakeUp {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

fn timer_thread(incoming: std_mpsc::Receiver<(std::time::Instant, oneshot::Sender<()>)>) {
    let mut due: Due = BinaryHeap::new();
    let mut number = 0u64;
    loop {
        let now = std::time::Instant::now();
        while let Some(Reverse((at, _, _))) = due.peek() {
            if *at > now {
                break;
            }
            if let Some(Reverse((_, _, WakeUp(wake)))) = due.pop() {
                let _ = wake.send(());
            }
        }
        let next = match due.peek() {
            Some(Reverse((at, _, _))) => incoming.recv_timeout(at.saturating_duration_since(now)),
            None => incoming
                .recv()
                .map_err(|_| std_mpsc::RecvTimeoutError::Disconnected),
        };
        match next {
            Ok((at, wake)) => {
                number += 1;
                due.push(Reverse((at, number, WakeUp(wake))));
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            // Every relay task is gone: nothing can be waiting any more.
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
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

    /// A relay of [`DELAY`] in front of a fresh target, with one connection through it: the
    /// relay (dropping it closes the connection), the caller's end and the target's end.
    async fn relayed() -> (DelayProxy, TcpStream, TcpStream) {
        let (listener, addr) = target().await;
        let proxy = DelayProxy::start("127.0.0.1:0".parse().expect("addr"), addr, DELAY)
            .await
            .expect("start relay");
        let client = TcpStream::connect(proxy.local_addr())
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (proxy, client, server)
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
        let (_proxy, mut client, mut server) = relayed().await;

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
        let (_proxy, mut client, mut server) = relayed().await;

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
    async fn the_timer_wakes_each_waiter_at_its_instant_in_order() {
        let timer = PreciseTimer::start().expect("timer thread");
        let base = Instant::now() + Duration::from_millis(20);
        // Asked for out of order: each must wake no earlier than its instant, earliest first.
        let offsets_ms = [30_u64, 5, 20, 0, 10];
        let (done, mut order) = mpsc::unbounded_channel();
        let mut waiters = JoinSet::new();
        for ms in offsets_ms {
            let (timer, done) = (timer.clone(), done.clone());
            let due = base + Duration::from_millis(ms);
            waiters.spawn(async move {
                timer.until(due).await;
                let woke = Instant::now();
                assert!(woke >= due, "woke {:?} before its instant", due - woke);
                let _ = done.send(ms);
            });
        }
        drop(done);
        while let Some(joined) = within("the waiters", waiters.join_next()).await {
            joined.expect("a waiter failed");
        }
        let mut woken = Vec::new();
        while let Some(ms) = order.recv().await {
            woken.push(ms);
        }
        assert_eq!(woken, [0, 5, 10, 20, 30], "woken out of order");
    }

    #[tokio::test]
    async fn the_probe_measures_at_least_two_delays() {
        let mut probe = RelayProbe::start(DELAY).await.expect("start probe");
        for _ in 0..3 {
            let rtt = within("a ping", probe.ping()).await.expect("ping");
            assert!(
                rtt >= 2 * DELAY,
                "a round trip of {rtt:?} through two {DELAY:?} delays"
            );
        }
    }

    #[tokio::test]
    async fn dropping_the_relay_closes_its_connections() {
        let (proxy, mut client, mut server) = relayed().await;
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
