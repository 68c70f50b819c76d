//! Cancel requests: a new socket to the very address the connection reached, inside TLS when
//! the connection used it, carrying the backend's key. The request counts as delivered when the
//! server closes that socket, which it does after signalling the backend.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::socket::Dest;
use super::startup::BackendKey;
use super::tls::TlsResume;
use crate::error::{ConnectError, ConnectErrorKind, Error};

/// Everything needed to cancel what one connection's backend is running.
pub(crate) struct CancelTarget {
    pub(crate) dest: Dest,
    pub(crate) tls: Option<TlsResume>,
    pub(crate) key: BackendKey,
    /// Cancel requests sent in the background and not yet delivered (or given up).
    pending: AtomicU32,
    /// Signalled when `pending` drops to zero.
    idle: tokio::sync::Notify,
}

impl CancelTarget {
    pub(crate) fn new(dest: Dest, tls: Option<TlsResume>, key: BackendKey) -> Self {
        CancelTarget {
            dest,
            tls,
            key,
            pending: AtomicU32::new(0),
            idle: tokio::sync::Notify::new(),
        }
    }

    /// Sends a cancel request from a task of its own, giving up after `limit`. The task holds
    /// only this target, never the connection.
    pub(crate) fn send_in_background(self: &Arc<Self>, limit: Duration) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.pending.fetch_add(1, Ordering::AcqRel);
        let target = self.clone();
        runtime.spawn(async move {
            let _ = tokio::time::timeout(limit, target.send()).await;
            if target.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                target.idle.notify_waiters();
            }
        });
    }

    /// Waits until no background cancel request is under way, so none can reach the server
    /// after the connection has a new user; false when `deadline` came first.
    pub(crate) async fn settled(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.pending.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.pending.load(Ordering::Acquire) == 0;
            }
        }
    }

    /// Sends the cancel request and waits until the server has taken it (closed the socket).
    pub(crate) async fn send(&self) -> io::Result<()> {
        match &self.dest {
            Dest::Tcp(addr) => {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                match &self.tls {
                    Some(tls) => deliver(tls.resume(tcp).await?, self.key).await,
                    None => deliver(tcp, self.key).await,
                }
            }
            Dest::Unix(path) => deliver(UnixStream::connect(path).await?, self.key).await,
        }
    }
}

async fn deliver<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    key: BackendKey,
) -> io::Result<()> {
    let mut request = BytesMut::with_capacity(16);
    frontend::cancel_request(key.pid, key.secret, &mut request);
    stream.write_all(&request).await?;
    stream.flush().await?;
    // The server answers nothing and closes the socket once the backend is signalled. A TLS
    // peer may close without close_notify: that is the same answer.
    let mut rest = [0u8; 16];
    match stream.read(&mut rest).await {
        Ok(0) => Ok(()),
        Ok(_) => Err(io::Error::other(
            "the server answered the cancel request with data",
        )),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
        Err(e) => Err(e),
    }
}

/// Cancels the statement running on one pooled connection, from any task, over the same kind
/// of socket (TCP, Unix, TLS) the connection uses. Cancellation is a request: the statement may
/// finish before it arrives, and then nothing happens.
#[derive(Clone)]
pub struct CancelToken {
    pub(crate) target: Arc<CancelTarget>,
    pub(crate) describe: Arc<str>,
}

impl CancelToken {
    /// Asks the server to cancel the connection's current statement; returns once the server
    /// took the request. Fails only when the request could not be delivered.
    pub async fn cancel_query(&self) -> Result<(), Error> {
        self.target.send().await.map_err(|e| {
            Error::Connect(ConnectError {
                target: self.describe.clone(),
                kind: ConnectErrorKind::Io {
                    during: "sending a cancel request",
                    error: Arc::new(e),
                },
                no_server: false,
            })
        })
    }
}

impl fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelToken")
            .field("server", &self.target.dest.to_string())
            .field("tls", &self.target.tls.is_some())
            .finish()
    }
}
