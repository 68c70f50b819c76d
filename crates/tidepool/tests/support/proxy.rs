//! A fault proxy on loopback for the fault-injection tests: forwards TCP between clients and one
//! upstream server, and on command
//! * stops forwarding without closing anything ([`Proxy::blackhole`]): bytes sent either way are
//!   held, as a silent network failure holds them, until [`Proxy::resume`] delivers them;
//!   new connections are accepted (as the kernel would) but not connected upstream meanwhile;
//!   [`Proxy::hold_replies`] does the same for the server's side only (requests still arrive);
//! * resets every connection it carries ([`Proxy::reset_all`]): both sides get a TCP RST;
//! * delays every chunk of data it forwards ([`Proxy::set_latency`]).
//!
//! Dropping the proxy stops listening and resets what it still carries.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What every connection of the proxy does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mode {
    /// Client to server.
    up: bool,
    /// Server to client.
    down: bool,
    latency: Duration,
    /// Bumped by `reset_all`: connections older than this epoch reset themselves.
    resets: u64,
}

struct Inner {
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    accepted: AtomicU64,
    accepted_at: Mutex<Vec<Instant>>,
    open: AtomicUsize,
    /// Chunks read and waiting for the proxy to forward again.
    held: AtomicUsize,
}

/// A TCP proxy from a loopback port of its own to `upstream`. See the module docs.
pub struct Proxy {
    addr: SocketAddr,
    inner: Arc<Inner>,
    listener: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy binds a loopback port");
        let addr = listener.local_addr().expect("proxy address");
        let (mode, _) = watch::channel(Mode {
            up: true,
            down: true,
            latency: Duration::ZERO,
            resets: 0,
        });
        let inner = Arc::new(Inner {
            upstream,
            mode,
            accepted: AtomicU64::new(0),
            accepted_at: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
        });
        let accept = {
            let inner = inner.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    inner.accepted.fetch_add(1, Ordering::Relaxed);
                    inner.accepted_at.lock().unwrap().push(Instant::now());
                    tokio::spawn(carry(inner.clone(), client));
                }
            })
        };
        Proxy {
            addr,
            inner,
            listener: accept,
        }
    }

    /// The proxy's own address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops forwarding; sockets stay open and bytes are held.
    pub fn blackhole(&self) {
        self.inner
            .mode
            .send_modify(|m| (m.up, m.down) = (false, false));
    }

    /// Stops forwarding from the server to clients only: requests still reach the server, its
    /// answers are held.
    pub fn hold_replies(&self) {
        self.inner.mode.send_modify(|m| m.down = false);
    }

    /// Forwards again, delivering what was held.
    pub fn resume(&self) {
        self.inner
            .mode
            .send_modify(|m| (m.up, m.down) = (true, true));
    }

    /// Delays each chunk of data by `latency` in each direction (zero: none).
    pub fn set_latency(&self, latency: Duration) {
        self.inner.mode.send_modify(|m| m.latency = latency);
    }

    /// Resets every connection the proxy carries now (RST to both sides); later connections
    /// are not affected.
    pub fn reset_all(&self) {
        self.inner.mode.send_modify(|m| m.resets += 1);
    }

    /// Client connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.inner.accepted.load(Ordering::Relaxed)
    }

    /// When each client connection was accepted.
    pub fn accepted_at(&self) -> Vec<Instant> {
        self.inner.accepted_at.lock().unwrap().clone()
    }

    /// Chunks of data held now (read from one side, not yet forwarded to the other).
    pub fn held(&self) -> usize {
        self.inner.held.load(Ordering::Relaxed)
    }

    /// Client connections open now.
    pub fn open_connections(&self) -> usize {
        self.inner.open.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.listener.abort();
        self.reset_all();
    }
}

/// Counts a connection as open while it lives.
struct OpenGuard(Arc<Inner>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a chunk as held while it lives (also when the pump is dropped by a reset).
struct Held<'a>(&'a Inner);

impl<'a> Held<'a> {
    fn new(inner: &'a Inner) -> Self {
        inner.held.fetch_add(1, Ordering::Relaxed);
        Held(inner)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Carries one client connection until either side closes it or `reset_all` is called.
async fn carry(inner: Arc<Inner>, client: TcpStream) {
    inner.open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(inner.clone());
    let mut mode = inner.mode.subscribe();
    let epoch = mode.borrow().resets;
    let reset = |m: &Mode| m.resets != epoch;
    let _ = client.set_nodelay(true);

    // Connect upstream only while forwarding: a blackholed network connects nowhere.
    let upstream = async {
        if mode.wait_for(|m| m.up || reset(m)).await.is_err() || reset(&mode.borrow()) {
            return None;
        }
        TcpStream::connect(inner.upstream).await.ok()
    }
    .await;
    let Some(upstream) = upstream else {
        let _ = client.set_zero_linger();
        return;
    };
    let _ = upstream.set_nodelay(true);
    let (mut client_r, mut client_w) = client.into_split();
    let (mut upstream_r, mut upstream_w) = upstream.into_split();
    let mut watch_reset = inner.mode.subscribe();
    let was_reset = tokio::select! {
        _ = async {
            tokio::join!(
                pump(&inner, &mut client_r, &mut upstream_w, epoch, true),
                pump(&inner, &mut upstream_r, &mut client_w, epoch, false),
            )
        } => false,
        _ = watch_reset.wait_for(|m| reset(m)) => true,
    };
    if was_reset {
        // SO_LINGER 0: closing sends RST instead of FIN.
        let _ = client_w.as_ref().set_zero_linger();
        let _ = upstream_w.as_ref().set_zero_linger();
    }
}

/// Copies `from` to `to` chunk by chunk (`up`: client to server), holding each chunk while that
/// direction is blackholed and delaying it by the latency. On EOF or an error, shuts down `to`'s
/// writing side.
async fn pump(
    inner: &Inner,
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    epoch: u64,
    up: bool,
) {
    let open = move |m: &Mode| if up { m.up } else { m.down };
    let mut mode = inner.mode.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let held = Held::new(inner);
        let current = mode
            .wait_for(|m| open(m) || m.resets != epoch)
            .await
            .map(|m| *m);
        drop(held);
        let Ok(current) = current else { break };
        if current.resets != epoch {
            // Parked here until the reset closes the sockets.
            std::future::pending::<()>().await;
        }
        if !current.latency.is_zero() {
            tokio::time::sleep(current.latency).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // The end of the stream is held too while the proxy blackholes.
    let _ = mode.wait_for(|m| open(m) || m.resets != epoch).await;
    let _ = to.shutdown().await;
}
