//! A TCP proxy for tests whose link can be switched at run time: pass, black hole, refuse
//! (reset), latency, or one direction dropped; and every open connection reset at once.
//!
//! It sits between the relay and PostgreSQL (a database URL naming the proxy's port
//! carries both the SQL and the replication connections) or a Kafka broker (the broker
//! advertises the proxy's port: `KafkaOptions::advertised_ports`). What it fakes is what
//! an application sees: its own kernel still acknowledges the relay's packets and answers
//! keepalives, so it cannot stand for a partition (that is [`super::netfault`]'s); it
//! stands for a peer or middlebox that stops answering, resets, or is slow.
//!
//! A black hole (or a dropped direction) reads and discards what arrives, never answers
//! and never closes. The bytes are gone, so when the link heals a connection that lost any
//! is reset: it could not go on, as a real connection would have after the kernel's
//! retransmits. Connections accepted during a black hole are never forwarded.
//!
//! The proxy runs on a thread and runtime of its own (so a test's runtime, blocking or
//! not, cannot stall it) and stops, closing every connection, when dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Which way bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client (the relay) to the server.
    ToServer,
    /// From the server to the client.
    ToClient,
}

/// What the link does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    /// Accepts, reads and discards, never answers, never closes.
    BlackHole,
    /// Resets every open connection and each new one as soon as it is accepted.
    Refuse,
    /// Holds every chunk this long before passing it on, each way (order kept).
    Latency(Duration),
    /// Discards what flows one way; the other way passes.
    Drop(Direction),
}

impl Fault {
    /// How long a chunk flowing `dir` waits, or `None` when it is discarded.
    fn delay(self, dir: Direction) -> Option<Duration> {
        match self {
            Fault::Pass | Fault::Refuse => Some(Duration::ZERO),
            Fault::Latency(d) => Some(d),
            Fault::BlackHole => None,
            Fault::Drop(dropped) => (dropped != dir).then_some(Duration::ZERO),
        }
    }

    fn loses_bytes(self) -> bool {
        matches!(self, Fault::BlackHole | Fault::Drop(_))
    }
}

struct Shared {
    fault: watch::Sender<Fault>,
    upstream: watch::Sender<Option<SocketAddr>>,
    /// Bumped to reset every open connection.
    resets: watch::Sender<u64>,
    accepted: AtomicUsize,
}

/// A proxy on `127.0.0.1:<port>`; stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Proxy {
    /// Listens on a free port and forwards to `upstream` (or, while it is `None`, holds
    /// new connections until [`Proxy::set_upstream`] names it).
    pub fn start(upstream: Option<SocketAddr>) -> std::io::Result<Proxy> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            fault: watch::channel(Fault::Pass).0,
            upstream: watch::channel(upstream).0,
            resets: watch::channel(0).0,
            accepted: AtomicUsize::new(0),
        });
        let stop = CancellationToken::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (s, token) = (shared.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("proxy-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("tokio listener");
                    tokio::select! {
                        _ = accept(listener, s) => {}
                        _ = token.cancelled() => {}
                    }
                });
                // Dropping the runtime drops every connection's task, closing its sockets.
            })?;
        Ok(Proxy { addr, shared, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn set_upstream(&self, upstream: SocketAddr) {
        self.shared.upstream.send_replace(Some(upstream));
    }

    /// Switches the link; open connections follow at once.
    pub fn set(&self, fault: Fault) {
        self.shared.fault.send_replace(fault);
    }

    pub fn fault(&self) -> Fault {
        *self.shared.fault.borrow()
    }

    /// Resets (RST) every connection open now; new ones are served as usual.
    pub fn reset_all(&self) {
        self.shared.resets.send_modify(|n| *n += 1);
    }

    /// How many connections were accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        if *shared.fault.borrow() == Fault::Refuse {
            reset(client);
            continue;
        }
        tokio::spawn(serve(client, shared.clone()));
    }
}

/// Closes with RST rather than FIN: what a peer that lost the connection's state sends.
fn reset(stream: TcpStream) {
    // A zero linger does not block on close (tokio deprecates SO_LINGER for the others).
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

async fn serve(mut client: TcpStream, shared: Arc<Shared>) {
    let mut faults = shared.fault.subscribe();
    let mut resets = shared.resets.subscribe();
    let _ = client.set_nodelay(true);
    if faults.borrow_and_update().loses_bytes() {
        // Never forwarded: swallow until the link changes, then reset.
        swallow(&mut client, &mut faults, &mut resets).await;
        reset(client);
        return;
    }
    let mut upstream = shared.upstream.subscribe();
    let Ok(Some(to)) = upstream.wait_for(Option::is_some).await.map(|a| *a) else {
        return;
    };
    let Ok(mut server) = TcpStream::connect(to).await else {
        reset(client);
        return;
    };
    let _ = server.set_nodelay(true);
    let lost = AtomicBool::new(false);
    let must_reset = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let up = pump(&mut cr, &mut sw, Direction::ToServer, faults.clone(), &lost);
        let down = pump(&mut sr, &mut cw, Direction::ToClient, faults.clone(), &lost);
        tokio::select! {
            _ = futures::future::join(up, down) => false,
            _ = until_reset(&mut faults, &mut resets, &lost) => true,
        }
    };
    if must_reset {
        reset(client);
        reset(server);
    }
}

async fn swallow(
    client: &mut TcpStream,
    faults: &mut watch::Receiver<Fault>,
    resets: &mut watch::Receiver<u64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            read = client.read(&mut buf) => if matches!(read, Ok(0) | Err(_)) { return },
            _ = faults.changed() => if !faults.borrow_and_update().loses_bytes() { return },
            _ = resets.changed() => return,
        }
    }
}

/// Returns when the connection must be reset: all were, the link refuses, or it heals
/// after this connection lost bytes.
async fn until_reset(
    faults: &mut watch::Receiver<Fault>,
    resets: &mut watch::Receiver<u64>,
    lost: &AtomicBool,
) {
    loop {
        tokio::select! {
            _ = resets.changed() => return,
            changed = faults.changed() => {
                if changed.is_err() {
                    return;
                }
                let fault = *faults.borrow_and_update();
                if fault == Fault::Refuse || (!fault.loses_bytes() && lost.load(Ordering::Relaxed)) {
                    return;
                }
            }
        }
    }
}

/// Copies `from` to `to` as the link allows: a reader that stamps each chunk with when it
/// may go, and a writer that waits for that moment (so latency delays, not throttles).
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    dir: Direction,
    faults: watch::Receiver<Fault>,
    lost: &AtomicBool,
) where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            let fault = *faults.borrow();
            if n == 0 {
                // The sender closed: a link that drops this way drops the FIN too.
                if fault.delay(dir).is_none() {
                    lost.store(true, Ordering::Relaxed);
                }
                break;
            }
            match fault.delay(dir) {
                Some(d) => {
                    let _ = tx.send((Instant::now() + d, buf[..n].to_vec()));
                }
                None => lost.store(true, Ordering::Relaxed),
            }
        }
    };
    let write = async {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // The sender closed its side: pass the FIN on, unless bytes were lost (a black
        // hole passes nothing, not even that).
        if !lost.load(Ordering::Relaxed) {
            let _ = to.shutdown().await;
        }
    };
    futures::future::join(read, write).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, within: Duration) -> std::io::Result<Duration> {
        let start = Instant::now();
        stream.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(within, stream.read_exact(&mut buf))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        assert_eq!(&buf, b"ping");
        Ok(start.elapsed())
    }

    #[tokio::test]
    async fn each_fault_does_what_it_says() {
        let proxy = Proxy::start(Some(echo_server().await)).unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let short = Duration::from_millis(300);
        assert!(round_trip(&mut s, short).await.unwrap() < short);

        proxy.set(Fault::Latency(Duration::from_millis(100)));
        let took = round_trip(&mut s, Duration::from_secs(2)).await.unwrap();
        assert!(
            took >= Duration::from_millis(200),
            "100 ms each way: {took:?}"
        );

        // Dropping the answers only: the request is still read (the echo sees it).
        proxy.set(Fault::Drop(Direction::ToClient));
        let e = round_trip(&mut s, short).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        // Healed, the connection that lost bytes is reset; a new one passes.
        proxy.set(Fault::Pass);
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Err(_)) | Ok(Ok(0))), "{closed:?}");
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut s, short).await.unwrap();

        // A black hole accepts but never answers, and never closes.
        proxy.set(Fault::BlackHole);
        let mut held = TcpStream::connect(proxy.addr()).await.unwrap();
        let e = round_trip(&mut held, short).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        proxy.set(Fault::Pass);

        // Reset all: the open connection gets RST.
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut s, short).await.unwrap();
        proxy.reset_all();
        let e = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .unwrap();
        assert_eq!(e.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);

        // Refuse: accepted, then reset at once.
        proxy.set(Fault::Refuse);
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(round_trip(&mut s, short).await.is_err());
        assert!(proxy.accepted() >= 5);
    }
}
