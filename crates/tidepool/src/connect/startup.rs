//! The start-up conversation up to `ReadyForQuery`, done by the pool, and the hand-over of the
//! socket to tokio-postgres.
//!
//! The pool sends tokio-postgres' own start-up message (captured once per pool from its
//! `Config`, so the parameters are exactly tokio-postgres'), authenticates ([`super::auth`]),
//! and reads on until `ReadyForQuery`, learning the backend's cancel key on the way. Then it hands
//! the socket to `Config::connect_raw` behind [`Handover`], which swallows tokio-postgres' copy of
//! the start-up message and replays what the pool read from `AuthenticationOk` on, so
//! tokio-postgres sees an ordinary trust start-up and builds its client without a round trip.
//!
//! A server error at any point is decoded by tokio-postgres itself, from the bytes the server
//! sent ([`decode`]), so it keeps its type, SQLSTATE and message.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt as _;
use postgres_protocol::message::backend::{Header, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_postgres::{Config, NoTls};

use super::Failure;

/// The socket during the start-up: what was read and not yet consumed stays in `input`, which
/// is what tokio-postgres gets to read first.
pub(crate) struct Exchange<S> {
    pub(crate) stream: S,
    pub(crate) input: BytesMut,
    pub(crate) output: BytesMut,
}

/// The backend's identity for cancel requests, from `BackendKeyData`. The secret is what lets
/// anyone cancel this backend's statements: no `Debug`.
#[derive(Clone, Copy)]
pub(crate) struct BackendKey {
    pub(crate) pid: i32,
    pub(crate) secret: i32,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Exchange<S> {
    pub(crate) fn new(stream: S) -> Self {
        Exchange {
            stream,
            input: BytesMut::with_capacity(1024),
            output: BytesMut::with_capacity(256),
        }
    }

    /// Writes `output`.
    pub(crate) async fn send(&mut self) -> Result<(), Failure> {
        let result = self.stream.write_all(&self.output).await;
        self.output.clear();
        result.map_err(|e| Failure::io("during authentication", e))
    }

    /// The next whole message, left at the front of `input`. A socket that ends first is a
    /// transport failure; bytes that are not a message mean the peer is not PostgreSQL.
    pub(crate) async fn peek(&mut self) -> Result<Message, Failure> {
        self.message_at(0).await.map(|(message, _)| message)
    }

    /// The whole message starting at byte `at` of `input` and its length, reading more as
    /// needed. Only messages a server sends during the start-up are accepted, and only of a
    /// plausible length: a port that answers something else (HTTP, SSH) is not PostgreSQL, and
    /// must not make the pool wait for, or reserve, the gigabyte its bytes seem to announce.
    async fn message_at(&mut self, at: usize) -> Result<(Message, usize), Failure> {
        loop {
            match Header::parse(&self.input[at..]) {
                Ok(Some(header)) if !plausible(header.tag(), header.len()) => {
                    return Err(not_postgres())
                }
                Ok(Some(header)) => {
                    let len = 1 + header.len() as usize;
                    if self.input.len() >= at + len {
                        let mut copy = BytesMut::from(&self.input[at..at + len]);
                        return match Message::parse(&mut copy) {
                            Ok(Some(message)) => Ok((message, len)),
                            _ => Err(not_postgres()),
                        };
                    }
                    self.input.reserve(at + len - self.input.len());
                }
                Err(_) => return Err(not_postgres()),
                Ok(None) => {}
            }
            match self.stream.read_buf(&mut self.input).await {
                Ok(0) => {
                    return Err(Failure::io(
                        "during the start-up",
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the server closed the connection",
                        ),
                    ))
                }
                Ok(_) => {}
                Err(e) => return Err(Failure::io("during the start-up", e)),
            }
        }
    }

    /// Drops the message [`Exchange::peek`] returned: it was for the pool, not tokio-postgres.
    pub(crate) fn consume(&mut self) {
        if let Ok(Some(header)) = Header::parse(&self.input) {
            self.input.advance(1 + header.len() as usize);
        }
    }

    /// After `AuthenticationOk` (left at the front of `input`): reads on, keeping everything,
    /// until `ReadyForQuery`. Returns the cancel key, or `None` when the server sent an error
    /// instead (too many clients, no such database): [`decode`] then reads it from `input`.
    pub(crate) async fn read_to_ready(&mut self) -> Result<Option<BackendKey>, Failure> {
        let mut at = 0;
        let mut key = None;
        loop {
            let (message, len) = self.message_at(at).await?;
            at += len;
            match message {
                Message::BackendKeyData(body) => {
                    key = Some(BackendKey {
                        pid: body.process_id(),
                        secret: body.secret_key(),
                    });
                }
                Message::ReadyForQuery(_) => {
                    return key.map(Some).ok_or_else(|| {
                        Failure::protocol("the server sent no cancel key at start-up".into())
                    })
                }
                Message::ErrorResponse(_) => return Ok(None),
                Message::AuthenticationOk
                | Message::ParameterStatus(_)
                | Message::NoticeResponse(_) => {}
                _ => {
                    return Err(Failure::protocol(
                        "the server sent an unexpected message during start-up".into(),
                    ))
                }
            }
        }
    }
}

/// Whether a message with `tag` and `len` (as the header counts it) can come from a server
/// during the start-up: authentication, errors and notices, parameters, the cancel key, ready.
fn plausible(tag: u8, len: i32) -> bool {
    let len = len as usize;
    match tag {
        b'E' | b'N' => (4..=1 << 20).contains(&len),
        b'R' | b'S' | b'K' | b'Z' => (4..=1 << 16).contains(&len),
        _ => false,
    }
}

fn not_postgres() -> Failure {
    Failure::protocol(
        "the server's answer is not the PostgreSQL protocol: is this port a PostgreSQL server?"
            .into(),
    )
}

/// The start-up message tokio-postgres sends for `config`, captured by running its start-up on
/// a socket in memory. `None` only if tokio-postgres changed so that it sends none.
pub(crate) fn capture_startup(config: &Config) -> Option<Bytes> {
    let mut memory = Memory::default();
    let _ = config.connect_raw(&mut memory, NoTls).now_or_never();
    (!memory.output.is_empty()).then(|| Bytes::from(memory.output))
}

/// The error tokio-postgres makes of the server's answer in `input` (an `ErrorResponse`,
/// possibly after `AuthenticationOk` and parameters): its own error type, SQLSTATE and message.
pub(crate) fn decode(config: &Config, input: BytesMut) -> Failure {
    let mut memory = Memory {
        input: input.freeze(),
        output: Vec::new(),
    };
    match config.connect_raw(&mut memory, NoTls).now_or_never() {
        Some(Err(e)) => Failure::Rejected(e),
        _ => Failure::protocol("the server's error could not be read".into()),
    }
}

/// A socket in memory: reads come from `input` (then end), writes go to `output`.
#[derive(Default)]
struct Memory {
    input: Bytes,
    output: Vec<u8>,
}

impl AsyncRead for &mut Memory {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let n = this.input.len().min(buf.remaining());
        buf.put_slice(&this.input[..n]);
        this.input.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for &mut Memory {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().output.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The authenticated socket as tokio-postgres gets it: the first `discard` bytes it writes (its
/// start-up message, which the server already has) are dropped, and it first reads what the pool
/// read but did not consume.
pub(crate) struct Handover<S> {
    inner: S,
    replay: BytesMut,
    discard: usize,
}

impl<S> Handover<S> {
    pub(crate) fn new(inner: S, replay: BytesMut, discard: usize) -> Self {
        Handover {
            inner,
            replay,
            discard,
        }
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
        if self.discard > 0 && !buf.is_empty() {
            let n = self.discard.min(buf.len());
            self.discard -= n;
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.discard > 0 {
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

    #[test]
    fn the_captured_startup_is_tokio_postgres_own() {
        let mut config = Config::new();
        config
            .user("u")
            .dbname("d")
            .application_name("app")
            .options("-c x=1");
        let startup = capture_startup(&config).expect("a start-up message");
        let mut expected = BytesMut::new();
        postgres_protocol::message::frontend::startup_message(
            [
                ("client_encoding", "UTF8"),
                ("user", "u"),
                ("database", "d"),
                ("options", "-c x=1"),
                ("application_name", "app"),
            ],
            &mut expected,
        )
        .unwrap();
        assert_eq!(&startup[..], &expected[..]);
    }

    #[tokio::test]
    async fn handover_swallows_exactly_the_startup_and_replays_first() {
        let (client, mut server) = tokio::io::duplex(1024);
        let mut handover = Handover::new(client, BytesMut::from(&b"replayed"[..]), 5);
        // Written in pieces: the first 5 bytes vanish, the rest go through.
        handover.write_all(b"abc").await.unwrap();
        handover.write_all(b"deFGH").await.unwrap();
        handover.flush().await.unwrap();
        let mut got = [0u8; 3];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"FGH");
        server.write_all(b"-live").await.unwrap();
        let mut read = vec![0u8; 13];
        handover.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"replayed-live");
    }

    /// A port answering HTTP or SSH is refused at the first bytes, without reserving what
    /// their "length" would announce.
    #[tokio::test]
    async fn other_protocols_are_not_postgres() {
        for answer in [
            &b"HTTP/1.1 400 Bad Request\r\n"[..],
            b"SSH-2.0-OpenSSH_9.2\r\n",
        ] {
            let (client, mut server) = tokio::io::duplex(1024);
            server.write_all(answer).await.unwrap();
            let mut ex = Exchange::new(client);
            match ex.peek().await {
                Err(Failure::Protocol(why)) => assert!(why.contains("PostgreSQL"), "{why}"),
                _ => panic!("{answer:?} was taken for PostgreSQL"),
            }
            assert!(ex.input.capacity() < 1 << 20);
        }
    }

    #[test]
    fn a_server_error_keeps_tokio_postgres_type_and_sqlstate() {
        let mut config = Config::new();
        config.user("u");
        let mut body = BytesMut::new();
        for (field, value) in [(b'S', "FATAL"), (b'C', "28P01"), (b'M', "bad password")] {
            body.extend_from_slice(&[field]);
            body.extend_from_slice(value.as_bytes());
            body.extend_from_slice(&[0]);
        }
        body.extend_from_slice(&[0]);
        let mut message = BytesMut::new();
        message.extend_from_slice(b"E");
        message.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        message.extend_from_slice(&body);
        match decode(&config, message) {
            Failure::Rejected(e) => {
                assert_eq!(e.code().map(|c| c.code()), Some("28P01"));
                assert!(e.as_db_error().unwrap().message().contains("bad password"));
            }
            _ => panic!("not decoded as the server's error"),
        }
    }
}
