//! Opening a connection with the pool's own SCRAM-SHA-256 exchange, so that the password's
//! key derivation runs once per pool rather than once per connection.
//!
//! SCRAM makes the client derive `SaltedPassword = PBKDF2-HMAC-SHA-256(password, salt, 4096)`.
//! The salt and round count are the server's, fixed for a role until its password changes, so
//! every connection a pool opens derives the same keys. tokio-postgres derives them afresh for
//! each connection (about 1.25 ms of CPU here, most of a connection's client-side cost, paid by
//! a runtime worker). The pool instead does the exchange itself on the socket with keys derived
//! once ([`KeyCache`]), then hands the authenticated socket to tokio-postgres, which sees the
//! server's `AuthenticationOk` as after trust authentication and reads the rest of the start-up
//! (parameters, backend key) itself.
//!
//! Only SCRAM-SHA-256 without channel binding is done here. Any other answer of the server
//! (trust, md5, password, an error) is replayed to tokio-postgres untouched, so it authenticates
//! and reports errors exactly as it always does; a transport failure in the middle is left for
//! tokio-postgres to meet on the same socket. The one failure this module reports itself is a
//! server whose SCRAM proof does not verify: that server does not know the password.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::{Buf, BytesMut};
use fallible_iterator::FallibleIterator as _;
use hmac::{Hmac, KeyInit, Mac};
use postgres_protocol::authentication::sasl::SCRAM_SHA_256;
use postgres_protocol::message::backend::{Header, Message};
use postgres_protocol::message::frontend;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::{ChannelBinding, Host, SslMode, TargetSessionAttrs};
use tokio_postgres::{Client, Config, NoTls};

type HmacSha256 = Hmac<Sha256>;

/// Why the pool's own handshake could not open a connection.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    /// The socket could not be opened: the caller retries through tokio-postgres, which reports
    /// the failure in its own terms.
    Socket,
    /// tokio-postgres failed the start-up (a server error, a closed socket).
    Postgres(tokio_postgres::Error),
    /// The server's side of the SCRAM exchange was malformed or its proof did not verify.
    Server(&'static str),
}

/// Where the pool's handshake can connect: one server, by TCP or Unix socket. Configurations
/// it does not cover (several hosts, `target_session_attrs`, required channel binding or TLS, no
/// password) go through tokio-postgres' own `connect`.
pub(crate) enum Route {
    Tcp { host: String, port: u16 },
    Unix(std::path::PathBuf),
}

impl Route {
    /// The route for `config`, when the pool's handshake covers it.
    pub(crate) fn of(config: &Config) -> Option<Route> {
        let covered = config.get_password().is_some()
            && config.get_user().is_some()
            && config.get_hosts().len() <= 1
            && config.get_hostaddrs().len() <= 1
            && config.get_ports().len() <= 1
            && config.get_target_session_attrs() == TargetSessionAttrs::Any
            && matches!(
                config.get_channel_binding(),
                ChannelBinding::Disable | ChannelBinding::Prefer
            )
            && matches!(config.get_ssl_mode(), SslMode::Disable | SslMode::Prefer);
        if !covered {
            return None;
        }
        let port = config.get_ports().first().copied().unwrap_or(5432);
        if let Some(addr) = config.get_hostaddrs().first() {
            return Some(Route::Tcp {
                host: addr.to_string(),
                port,
            });
        }
        match config.get_hosts().first()? {
            Host::Tcp(host) => Some(Route::Tcp {
                host: host.clone(),
                port,
            }),
            Host::Unix(dir) => Some(Route::Unix(dir.join(format!(".s.PGSQL.{port}")))),
        }
    }
}

/// The SCRAM keys of one password for one (salt, rounds), derived once per pool. Worth as much
/// as the password, which the pool holds anyway; never logged or shown.
struct Keys {
    salt: Vec<u8>,
    rounds: u32,
    client_key: [u8; 32],
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl Keys {
    fn derive(password: &[u8], salt: Vec<u8>, rounds: u32) -> Keys {
        // SASLprep as PostgreSQL does: a password that is not valid UTF-8 or not preparable is
        // used as it is.
        let prepared = std::str::from_utf8(password)
            .ok()
            .and_then(|p| stringprep::saslprep(p).ok());
        let password = prepared.as_deref().map_or(password, str::as_bytes);
        let salted: [u8; 32] = pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password, &salt, rounds);
        let client_key = hmac(&salted, b"Client Key");
        Keys {
            salt,
            rounds,
            stored_key: Sha256::digest(client_key).into(),
            client_key,
            server_key: hmac(&salted, b"Server Key"),
        }
    }
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// The pool's derived SCRAM keys. Connections opened at once wait for the first derivation
/// rather than each doing it; a server that changes the salt (a new password) gets new keys.
#[derive(Default)]
pub(crate) struct KeyCache(tokio::sync::Mutex<Option<Arc<Keys>>>);

impl KeyCache {
    async fn get(&self, password: &[u8], salt: &[u8], rounds: u32) -> Arc<Keys> {
        let mut slot = self.0.lock().await;
        match &*slot {
            Some(keys) if keys.salt == salt && keys.rounds == rounds => keys.clone(),
            _ => {
                let keys = Arc::new(Keys::derive(password, salt.to_vec(), rounds));
                *slot = Some(keys.clone());
                keys
            }
        }
    }
}

/// Opens a connection on `route`: the start-up and SCRAM exchange here, the rest in
/// tokio-postgres. The connection's I/O runs on its own task.
pub(crate) async fn connect(
    route: &Route,
    config: &Config,
    keys: &KeyCache,
) -> Result<Client, HandshakeError> {
    match route {
        Route::Tcp { host, port } => {
            let addrs = tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(|_| HandshakeError::Socket)?;
            for addr in addrs {
                if let Ok(stream) = tcp(addr, config).await {
                    return finish(stream, config, keys).await;
                }
            }
            Err(HandshakeError::Socket)
        }
        Route::Unix(path) => {
            let stream = UnixStream::connect(path)
                .await
                .map_err(|_| HandshakeError::Socket)?;
            finish(stream, config, keys).await
        }
    }
}

/// A TCP connection with tokio-postgres' socket options: no Nagle delay, keepalives as
/// configured, `tcp_user_timeout`.
async fn tcp(addr: SocketAddr, config: &Config) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let sock = socket2::SockRef::from(&stream);
    if let Some(timeout) = config.get_tcp_user_timeout() {
        sock.set_tcp_user_timeout(Some(*timeout))?;
    }
    if config.get_keepalives() {
        let mut keepalive = socket2::TcpKeepalive::new().with_time(config.get_keepalives_idle());
        if let Some(interval) = config.get_keepalives_interval() {
            keepalive = keepalive.with_interval(interval);
        }
        if let Some(retries) = config.get_keepalives_retries() {
            keepalive = keepalive.with_retries(retries);
        }
        sock.set_tcp_keepalive(&keepalive)?;
    }
    Ok(stream)
}

/// Authenticates on a freshly opened `stream`, then hands it to tokio-postgres for the rest of
/// the start-up; the connection's I/O runs on its own task.
async fn finish<S>(
    mut stream: S,
    config: &Config,
    keys: &KeyCache,
) -> Result<Client, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (started, replay) = {
        let mut conn = Exchange {
            stream: &mut stream,
            input: BytesMut::with_capacity(1024),
            output: BytesMut::with_capacity(256),
        };
        let started = conn.start(config).await;
        if started {
            authenticate(&mut conn, config, keys).await?;
        }
        (started, conn.input)
    };
    let stream = Handover {
        inner: stream,
        replay,
        // tokio-postgres' own start-up message goes to the server only if the pool sent none.
        startup: started.then(Discard::default),
    };
    let (client, connection) = config
        .connect_raw(stream, NoTls)
        .await
        .map_err(HandshakeError::Postgres)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// After the start-up message, authenticates when the server asks for SCRAM-SHA-256. What the
/// server sent that tokio-postgres must still read stays in `conn.input`: `AuthenticationOk` and
/// what follows after a SCRAM exchange, or the server's first answer otherwise.
async fn authenticate<S>(
    conn: &mut Exchange<'_, S>,
    config: &Config,
    keys: &KeyCache,
) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(Message::AuthenticationSasl(body)) = conn.peek().await else {
        return Ok(());
    };
    if !body
        .mechanisms()
        .any(|m| Ok(m == SCRAM_SHA_256))
        .unwrap_or(false)
    {
        return Ok(());
    }
    // 18 random bytes, as libpq uses. Without randomness, tokio-postgres does the exchange.
    let mut raw = [0u8; 18];
    if getrandom::fill(&mut raw).is_err() {
        return Ok(());
    }
    let nonce = B64.encode(raw);
    conn.consume();
    // The user name goes in the start-up message; PostgreSQL ignores the one in SCRAM.
    let client_first_bare = format!("n=,r={nonce}");
    let initial = format!("n,,{client_first_bare}");
    if frontend::sasl_initial_response(SCRAM_SHA_256, initial.as_bytes(), &mut conn.output).is_err()
        || !conn.send().await
    {
        return Ok(());
    }

    let Some(Message::AuthenticationSaslContinue(body)) = conn.peek().await else {
        return Ok(());
    };
    let server_first = std::str::from_utf8(body.data())
        .map_err(|_| HandshakeError::Server("the server's SCRAM message is not UTF-8"))?
        .to_owned();
    conn.consume();
    let first = ServerFirst::parse(&server_first, &nonce)?;
    let password = config.get_password().unwrap_or_default();
    let keys = keys.get(password, &first.salt, first.rounds).await;

    let client_final_bare = format!("c=biws,r={}", first.nonce);
    let auth_message = format!("{client_first_bare},{server_first},{client_final_bare}");
    let signature = hmac(&keys.stored_key, auth_message.as_bytes());
    let mut proof = keys.client_key;
    for (p, s) in proof.iter_mut().zip(signature) {
        *p ^= s;
    }
    let client_final = format!("{client_final_bare},p={}", B64.encode(proof));
    if frontend::sasl_response(client_final.as_bytes(), &mut conn.output).is_err()
        || !conn.send().await
    {
        return Ok(());
    }

    let Some(Message::AuthenticationSaslFinal(body)) = conn.peek().await else {
        // An ErrorResponse (wrong password): tokio-postgres reports it.
        return Ok(());
    };
    let verified = body
        .data()
        .strip_prefix(b"v=")
        .and_then(|v| B64.decode(v).ok())
        .is_some_and(|v| {
            let mut mac = HmacSha256::new_from_slice(&keys.server_key)
                .expect("HMAC takes keys of any length");
            mac.update(auth_message.as_bytes());
            mac.verify_slice(&v).is_ok()
        });
    if !verified {
        return Err(HandshakeError::Server(
            "the server's SCRAM-SHA-256 signature did not verify",
        ));
    }
    conn.consume();
    Ok(())
}

/// The server's first SCRAM message: `r=<nonce>,s=<salt>,i=<rounds>`.
struct ServerFirst<'a> {
    nonce: &'a str,
    salt: Vec<u8>,
    rounds: u32,
}

impl<'a> ServerFirst<'a> {
    fn parse(message: &'a str, client_nonce: &str) -> Result<Self, HandshakeError> {
        let malformed = HandshakeError::Server("the server's SCRAM-SHA-256 message is malformed");
        let mut parts = message.split(',');
        let (Some(r), Some(s), Some(i)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(malformed);
        };
        let (Some(nonce), Some(salt), Some(rounds)) = (
            r.strip_prefix("r="),
            s.strip_prefix("s=").and_then(|s| B64.decode(s).ok()),
            i.strip_prefix("i=").and_then(|i| i.parse::<u32>().ok()),
        ) else {
            return Err(malformed);
        };
        // The server's nonce extends ours; a bare echo or another nonce is not a SCRAM server.
        if nonce.len() <= client_nonce.len() || !nonce.starts_with(client_nonce) || rounds == 0 {
            return Err(malformed);
        }
        Ok(ServerFirst {
            nonce,
            salt,
            rounds,
        })
    }
}

/// The socket during the exchange: what was read and not yet consumed stays in `input`, which is
/// what tokio-postgres gets to read first.
struct Exchange<'a, S> {
    stream: &'a mut S,
    input: BytesMut,
    output: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Exchange<'_, S> {
    /// Sends the start-up message tokio-postgres itself would send; false when it could not be
    /// built or sent (tokio-postgres then sends its own and meets the failure).
    async fn start(&mut self, config: &Config) -> bool {
        let Some(user) = config.get_user() else {
            return false;
        };
        let mut params = vec![("client_encoding", "UTF8"), ("user", user)];
        if let Some(db) = config.get_dbname() {
            params.push(("database", db));
        }
        if let Some(options) = config.get_options() {
            params.push(("options", options));
        }
        if let Some(name) = config.get_application_name() {
            params.push(("application_name", name));
        }
        frontend::startup_message(params, &mut self.output).is_ok() && self.send().await
    }

    /// Writes `output`; false when the socket failed (left for tokio-postgres to meet).
    async fn send(&mut self) -> bool {
        let ok = self.stream.write_all(&self.output).await.is_ok();
        self.output.clear();
        ok
    }

    /// The next whole message, left in `input`; `None` when the socket ends or fails first.
    async fn peek(&mut self) -> Option<Message> {
        loop {
            match Header::parse(&self.input) {
                Ok(Some(header)) => {
                    let len = 1 + header.len() as usize;
                    if self.input.len() >= len {
                        let mut copy = BytesMut::from(&self.input[..len]);
                        return Message::parse(&mut copy).ok().flatten();
                    }
                    self.input.reserve(len - self.input.len());
                }
                Ok(None) => {}
                Err(_) => return None,
            }
            match self.stream.read_buf(&mut self.input).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Drops the message [`Exchange::peek`] returned: it was for the pool, not tokio-postgres.
    fn consume(&mut self) {
        if let Ok(Some(header)) = Header::parse(&self.input) {
            self.input.advance(1 + header.len() as usize);
        }
    }
}

/// The authenticated socket as tokio-postgres gets it: its start-up message (the server already
/// has the pool's) is discarded, and it first reads what the pool read but did not consume.
struct Handover<S> {
    inner: S,
    replay: BytesMut,
    startup: Option<Discard>,
}

/// Progress through discarding one start-up message: its length, then its body.
#[derive(Default)]
struct Discard {
    header: [u8; 4],
    seen: usize,
}

impl Discard {
    /// Takes what of `buf` belongs to the message: the bytes taken, and whether the message is
    /// now whole.
    fn take(&mut self, buf: &[u8]) -> (usize, bool) {
        let mut used = 0;
        while self.seen < 4 && used < buf.len() {
            self.header[self.seen] = buf[used];
            self.seen += 1;
            used += 1;
        }
        if self.seen < 4 {
            return (used, false);
        }
        let total = (u32::from_be_bytes(self.header) as usize).max(4);
        let more = (total - self.seen).min(buf.len() - used);
        self.seen += more;
        used += more;
        (used, self.seen >= total)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Handover<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.replay.is_empty() {
            let n = self.replay.len().min(buf.remaining());
            buf.put_slice(&self.replay[..n]);
            self.replay.advance(n);
            if self.replay.is_empty() {
                // Handed over: the connection keeps no buffer of its own from here on.
                self.replay = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Handover<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(discard) = &mut self.startup {
            let (used, done) = discard.take(buf);
            if done {
                self.startup = None;
            }
            if used > 0 {
                return Poll::Ready(Ok(used));
            }
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.startup.is_some() {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &**b);
            return self.poll_write(cx, first);
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's test vector: user "user", password "pencil".
    #[test]
    fn rfc7677_proof_and_server_signature() {
        let client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO";
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let first =
            ServerFirst::parse(server_first, "rOprNGfwEbeRWgbNEkqO").expect("valid server-first");
        let keys = Keys::derive(b"pencil", first.salt, first.rounds);
        let client_final_bare = format!("c=biws,r={}", first.nonce);
        let auth = format!("{client_first_bare},{server_first},{client_final_bare}");
        let mut proof = keys.client_key;
        for (p, s) in proof
            .iter_mut()
            .zip(hmac(&keys.stored_key, auth.as_bytes()))
        {
            *p ^= s;
        }
        assert_eq!(
            B64.encode(proof),
            "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert_eq!(
            B64.encode(hmac(&keys.server_key, auth.as_bytes())),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[tokio::test]
    async fn keys_are_derived_once_per_salt_and_rounds() {
        let cache = KeyCache::default();
        let a = cache.get(b"pw", b"salt-1", 4096).await;
        assert!(Arc::ptr_eq(&a, &cache.get(b"pw", b"salt-1", 4096).await));
        let b = cache.get(b"pw", b"salt-2", 4096).await;
        assert!(!Arc::ptr_eq(&a, &b));
        assert_ne!(a.client_key, b.client_key);
        let c = cache.get(b"pw", b"salt-2", 8192).await;
        assert_ne!(b.client_key, c.client_key);
        assert_eq!(format!("{c:?}"), "Keys(..)");
    }

    #[test]
    fn server_first_must_extend_our_nonce() {
        let ok = "r=abcXYZ,s=c2FsdA==,i=4096";
        assert!(ServerFirst::parse(ok, "abc").is_ok());
        for bad in [
            "r=abc,s=c2FsdA==,i=4096",
            "r=xyzXYZ,s=c2FsdA==,i=4096",
            "r=abcXYZ,s=!!,i=4096",
            "r=abcXYZ,s=c2FsdA==,i=0",
            "r=abcXYZ,s=c2FsdA==",
        ] {
            assert!(ServerFirst::parse(bad, "abc").is_err(), "{bad}");
        }
    }

    #[test]
    fn discards_exactly_one_startup_message_split_anywhere() {
        let mut msg = BytesMut::new();
        frontend::startup_message([("user", "u"), ("database", "d")], &mut msg).unwrap();
        let tail = b"Qnext";
        let mut all = msg.to_vec();
        all.extend_from_slice(tail);
        for split in 0..=all.len() {
            let mut d = Discard::default();
            let (a, done_a) = d.take(&all[..split]);
            let (b, done_b) = if done_a { (0, true) } else { d.take(&all[a..]) };
            assert_eq!(a + b, msg.len(), "split at {split}");
            assert!(done_b);
        }
    }
}
