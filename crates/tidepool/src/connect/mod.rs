//! Opening connections, the whole way: hosts and addresses, TLS (`sslmode`), authentication,
//! the start-up up to `ReadyForQuery`, then the socket handed to tokio-postgres for the query
//! protocol. Nothing outside this module knows how a socket was made; what a connection needs
//! later (its cancel request) comes out of here with it.
//!
//! One concept per file:
//! * `socket`: TCP (with tokio-postgres' socket options), Unix sockets, TLS, behind one type.
//! * `tls`: libpq's `sslmode` rules over rustls, certificate checks and their errors.
//! * `auth`: trust, password, md5 and SCRAM-SHA-256(-PLUS), with the pool's derived-once keys.
//! * `startup`: the start-up message, reading to `ReadyForQuery`, the hand-over.
//! * `cancel`: cancel requests to the same address, over TLS when the connection used it.
//!
//! Hosts are tried in the URL's order (shuffled with `load_balance_hosts=random`), each of a
//! host's addresses in turn; a host whose server refused the credentials ends the walk (libpq's
//! rule), one that could not be reached or is not what `target_session_attrs` asks for passes
//! to the next. `prefer-standby` walks twice: for a standby, then for any server.

mod auth;
mod cancel;
mod socket;
mod startup;
mod tls;

use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UnixStream;
use tokio_postgres::config::{ChannelBinding, Host, LoadBalanceHosts};
use tokio_postgres::{Client, Config, NoTls};

pub(crate) use cancel::CancelTarget;
pub use cancel::CancelToken;

use crate::error::{ConnectError, ConnectErrorKind};
use crate::settings::{DatabaseUrl, Settings, SettingsError};
use crate::url::{SessionAttrs, SslMode};
use auth::{Channel, Credentials, KeyCache};
use socket::{Dest, Socket};
use startup::{Exchange, Handover};
use tls::{Negotiated, TlsPolicy, TlsResume};

/// Opens connections to the URL's server(s) with fixed settings.
pub(crate) struct Connector {
    /// What tokio-postgres builds clients from: the URL's configuration with TLS and channel
    /// binding off, since both are done by the time it sees the socket.
    config: Config,
    /// tokio-postgres' start-up message for `config`, captured once.
    startup: Bytes,
    hosts: Vec<HostSpec>,
    tls: TlsPolicy,
    user: String,
    password: Option<Vec<u8>>,
    channel_binding: ChannelBinding,
    session_attrs: SessionAttrs,
    load_balance: bool,
    /// `host:port/dbname as user`, for error messages: never the password.
    target: Arc<str>,
    timeout: Duration,
    keys: KeyCache,
}

/// One entry of the URL's host list.
struct HostSpec {
    /// The host name as given: what `verify-full` checks and SNI sends; `None` when the URL
    /// gives only `hostaddr`.
    name: Option<String>,
    addr: HostAddr,
}

enum HostAddr {
    /// An address to connect to as is (`hostaddr`, or a host written as an IP address).
    Ip(IpAddr, u16),
    /// A name to resolve.
    Name(String, u16),
    /// A Unix socket file.
    Unix(PathBuf),
}

/// A freshly opened connection, what it takes to cancel its statements, and the task that
/// drives its I/O.
pub(crate) struct Opened {
    pub(crate) client: Client,
    pub(crate) cancel: Arc<CancelTarget>,
    pub(crate) io: tokio::task::JoinHandle<()>,
    /// The connection's `NOTIFY` messages (for a `LISTEN`ing connection, [`crate::listen`]);
    /// ends when the connection does. Pool connections drop it, and with it what arrives.
    pub(crate) notifications: tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
}

/// Why one attempt failed, before it becomes a [`ConnectErrorKind`].
pub(crate) enum Failure {
    /// The transport failed (refused, reset, unresolvable): another address, host or later
    /// attempt may work.
    Io {
        during: &'static str,
        error: io::Error,
    },
    /// The server's `ErrorResponse` is at the front of the exchange's input (decoded next).
    Refused,
    /// The server refused, as tokio-postgres decoded it.
    Rejected(tokio_postgres::Error),
    /// TLS could not be set up as the `sslmode` demands (certificates, a server without TLS).
    Tls(String),
    /// The peer did not behave as a PostgreSQL server should, or authentication cannot be done
    /// as configured.
    Protocol(String),
    /// The server is not what `target_session_attrs` asks for.
    Role(&'static str),
    /// A host did not complete the start-up in time: `DB_CONNECT_TIMEOUT` (per host, as with
    /// libpq), or what was left of the checkout's `DB_POOL_TIMEOUT` when that was shorter.
    TimedOut {
        after: Duration,
        by_pool_timeout: bool,
    },
}

impl Failure {
    /// A failed read or write. Under TLS 1.3 the server judges the client's certificate after
    /// the client's side of the handshake is done, so its refusal (an alert) arrives as the
    /// first read fails: that is final, not a transport hiccup.
    pub(crate) fn io(during: &'static str, error: io::Error) -> Failure {
        match error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::AlertReceived(alert)) => Failure::Tls(format!(
                "the server refused the TLS connection ({alert:?}): if it requires a client \
                 certificate, check sslcert and sslkey (a certificate its CA issued, for this \
                 user)"
            )),
            Some(tls) => Failure::Tls(format!("the TLS connection failed: {tls}")),
            None => Failure::Io { during, error },
        }
    }

    pub(crate) fn tls(why: String) -> Failure {
        Failure::Tls(why)
    }

    pub(crate) fn protocol(why: String) -> Failure {
        Failure::Protocol(why)
    }

    /// A refusal after which libpq would try without (or with) TLS: any server error before
    /// the start-up ended, except "starting up" (the server is not ready, in either mode).
    fn retry_other_tls(&self) -> bool {
        match self {
            Failure::Rejected(e) => e.code().is_some_and(|c| c.code() != "57P03"),
            _ => false,
        }
    }

    /// The server refused the credentials or the database: the walk through the host list
    /// stops here (libpq's rule), unless the refusal is about load.
    fn ends_host_walk(&self) -> bool {
        match self {
            // No SQLSTATE: the transport failed (say, during the role query), not a refusal.
            Failure::Rejected(e) => e
                .code()
                .is_some_and(|c| !matches!(c.code(), "57P03" | "53300")),
            _ => false,
        }
    }

    fn into_kind(self) -> ConnectErrorKind {
        match self {
            Failure::Io { during, error } => ConnectErrorKind::Io {
                during,
                error: Arc::new(error),
            },
            Failure::Rejected(e) => ConnectErrorKind::Postgres(Arc::new(e)),
            Failure::Refused => ConnectErrorKind::Protocol("the server refused".into()),
            Failure::Tls(why) => ConnectErrorKind::Tls(why.into()),
            Failure::Protocol(why) => ConnectErrorKind::Protocol(why.into()),
            Failure::Role(why) => ConnectErrorKind::Role(why),
            Failure::TimedOut {
                after,
                by_pool_timeout,
            } => ConnectErrorKind::TimedOut {
                after,
                by_pool_timeout,
            },
        }
    }
}

/// How much TLS one attempt asks for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    Plain,
    /// TLS if the server offers it, else plaintext on the same socket.
    TryTls,
    RequireTls,
}

impl Connector {
    /// A connector for `url` with `settings`' application name and connect timeout (to the
    /// URL's host `only` when given: one read replica's pool). Reads the TLS files the URL
    /// names, so a missing or unreadable one is an error here.
    pub(crate) fn new(
        url: &DatabaseUrl,
        settings: &Settings,
        only: Option<usize>,
    ) -> Result<Self, SettingsError> {
        let mut config = url.config().clone();
        if let Some(name) = &settings.application_name {
            config.application_name(name.as_str());
        }
        config.connect_timeout(settings.connect_timeout);
        let channel_binding = config.get_channel_binding();
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        config.channel_binding(ChannelBinding::Disable);
        let startup = startup::capture_startup(&config).ok_or_else(|| SettingsError::Invalid {
            variable: "DATABASE_URL".into(),
            value: url.redacted().into(),
            expected: "settings tokio-postgres can start a connection with".into(),
        })?;
        let mut hosts = hosts(&config);
        let target = match only {
            Some(i) if i < hosts.len() => {
                hosts = vec![hosts.swap_remove(i)];
                let mut target = describe_host(&config, i);
                if let Some(db) = config.get_dbname() {
                    let _ = write!(target, "/{db}");
                }
                if let Some(user) = config.get_user() {
                    let _ = write!(target, " as {user}");
                }
                target
            }
            _ => describe(&config),
        };
        Ok(Connector {
            target: target.into(),
            hosts,
            tls: TlsPolicy::new(url.tls())?,
            user: config.get_user().unwrap_or_default().to_owned(),
            password: config.get_password().map(<[u8]>::to_vec),
            channel_binding,
            session_attrs: url.session_attrs(),
            load_balance: config.get_load_balance_hosts() == LoadBalanceHosts::Random,
            timeout: settings.connect_timeout,
            startup,
            config,
            keys: KeyCache::default(),
        })
    }

    /// The redacted description of where connections go.
    pub(crate) fn target(&self) -> &Arc<str> {
        &self.target
    }

    /// Opens one connection within `limit`, each host of the URL getting `DB_CONNECT_TIMEOUT`
    /// (or what is left of `limit`, when less). Dropping the future abandons the attempt and
    /// closes its socket.
    pub(crate) async fn connect(&self, limit: Duration) -> Result<Opened, ConnectError> {
        let deadline = tokio::time::Instant::now() + limit;
        match self.attempt(deadline).await {
            Ok(opened) => Ok(opened),
            Err((failure, no_server)) => Err(ConnectError {
                target: self.target.clone(),
                kind: failure.into_kind(),
                no_server,
            }),
        }
    }

    /// The same connector taking whatever server its hosts lead to (`target_session_attrs=any`).
    pub(crate) fn any_server(mut self) -> Self {
        self.session_attrs = SessionAttrs::Any;
        self
    }

    /// Whether connections must be on the server that takes writes (`read-write`, `primary`).
    pub(crate) fn follows_primary(&self) -> bool {
        self.session_attrs.follows_primary()
    }

    /// Walks the host list until one host gives a connection, or `deadline`;
    /// `prefer-standby` walks it for a standby first, then for any server (libpq's rule). A
    /// failure says whether no host answered as a usable server at all
    /// ([`ConnectError::no_server`]).
    async fn attempt(&self, deadline: tokio::time::Instant) -> Result<Opened, (Failure, bool)> {
        let passes: &[SessionAttrs] = match self.session_attrs {
            SessionAttrs::PreferStandby => &[SessionAttrs::Standby, SessionAttrs::Any],
            ref attrs => std::slice::from_ref(attrs),
        };
        let mut last = Failure::protocol("the URL names no host".into());
        // No host answered as a server that could take the pool's connections, and at least
        // one answered as the wrong kind (a standby, a read-only server): what a failover
        // looks like from here. Unreachable hosts alone may be a network hiccup.
        let mut no_server = true;
        let mut wrong_role = false;
        let mut attempted = false;
        for &wants in passes {
            let mut order: Vec<usize> = (0..self.hosts.len()).collect();
            if self.load_balance {
                fastrand::shuffle(&mut order);
            }
            for i in order {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    // Out of time after a quick failure: that failure is the news.
                    let failure = if attempted {
                        last
                    } else {
                        Failure::TimedOut {
                            after: Duration::ZERO,
                            by_pool_timeout: true,
                        }
                    };
                    return Err((failure, false));
                }
                attempted = true;
                let by_pool_timeout = left < self.timeout;
                let limit = left.min(self.timeout);
                let failure =
                    match tokio::time::timeout(limit, self.attempt_host(&self.hosts[i], wants))
                        .await
                    {
                        Ok(Ok(opened)) => return Ok(opened),
                        Ok(Err(failure)) => failure,
                        Err(_) => Failure::TimedOut {
                            after: limit,
                            by_pool_timeout,
                        },
                    };
                // Out of time only when this host was cut short by the checkout's deadline; a
                // host that failed quickly leaves the rest of the time to the next one.
                let cut_short = matches!(
                    failure,
                    Failure::TimedOut {
                        by_pool_timeout: true,
                        ..
                    }
                );
                no_server &= !cut_short
                    && matches!(
                        failure,
                        Failure::Io { .. } | Failure::Role(_) | Failure::TimedOut { .. }
                    );
                wrong_role |= matches!(failure, Failure::Role(_));
                let stop = failure.ends_host_walk() || cut_short;
                last = failure;
                if stop {
                    return Err((last, no_server && wrong_role));
                }
            }
        }
        Err((last, no_server && wrong_role))
    }

    /// Tries each address of one host until one gives a connection or a failure that is not
    /// about reaching it.
    async fn attempt_host(&self, host: &HostSpec, wants: SessionAttrs) -> Result<Opened, Failure> {
        let dests = match &host.addr {
            HostAddr::Ip(ip, port) => vec![Dest::Tcp(SocketAddr::new(*ip, *port))],
            HostAddr::Unix(path) => vec![Dest::Unix(path.clone())],
            HostAddr::Name(name, port) => {
                let mut found: Vec<Dest> = tokio::net::lookup_host((name.as_str(), *port))
                    .await
                    .map_err(|e| Failure::io("resolving the host name", e))?
                    .map(Dest::Tcp)
                    .collect();
                if self.load_balance {
                    fastrand::shuffle(&mut found);
                }
                found
            }
        };
        let mut last = Failure::io(
            "resolving the host name",
            io::Error::new(io::ErrorKind::NotFound, "no address found"),
        );
        for dest in dests {
            match self.attempt_dest(host, dest, wants).await {
                Ok(opened) => return Ok(opened),
                Err(failure @ Failure::Io { .. }) => last = failure,
                Err(failure) => return Err(failure),
            }
        }
        Err(last)
    }

    /// One address, with the `sslmode`'s fallbacks (libpq's): `allow` tries plaintext first and
    /// TLS when the server refuses it; `prefer` tries TLS first and plaintext when the handshake
    /// fails or the server refuses the TLS connection. Never TLS over a Unix socket.
    async fn attempt_dest(
        &self,
        host: &HostSpec,
        dest: Dest,
        wants: SessionAttrs,
    ) -> Result<Opened, Failure> {
        let addr = match dest {
            Dest::Tcp(addr) => addr,
            Dest::Unix(path) => {
                let stream = UnixStream::connect(&path)
                    .await
                    .map_err(|e| Failure::io("connecting to the Unix socket", e))?;
                return self
                    .session(
                        Socket::Unix(stream),
                        Dest::Unix(path),
                        None,
                        Channel::Plain,
                        wants,
                    )
                    .await;
            }
        };
        match self.tls.mode {
            SslMode::Disable => self
                .over_tcp(host, addr, wants, Want::Plain)
                .await
                .map_err(|f| f.0),
            SslMode::Allow => match self.over_tcp(host, addr, wants, Want::Plain).await {
                Err((refused, _)) if refused.retry_other_tls() => {
                    match self.over_tcp(host, addr, wants, Want::TryTls).await {
                        // The server does TLS no more than plaintext: its refusal is the news.
                        Err((_, false)) => Err(refused),
                        other => other.map_err(|f| f.0),
                    }
                }
                other => other.map_err(|f| f.0),
            },
            SslMode::Prefer => match self.over_tcp(host, addr, wants, Want::TryTls).await {
                Err((failure, true))
                    if failure.retry_other_tls()
                        || matches!(failure, Failure::Tls(_) | Failure::Io { .. }) =>
                {
                    self.over_tcp(host, addr, wants, Want::Plain)
                        .await
                        .map_err(|f| f.0)
                }
                other => other.map_err(|f| f.0),
            },
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => self
                .over_tcp(host, addr, wants, Want::RequireTls)
                .await
                .map_err(|f| f.0),
        }
    }

    /// One TCP connection to `addr`, with TLS as `want` says. A failure says whether TLS was
    /// under way (the server agreed to it), which is when `prefer` tries again without.
    async fn over_tcp(
        &self,
        host: &HostSpec,
        addr: SocketAddr,
        wants: SessionAttrs,
        want: Want,
    ) -> Result<Opened, (Failure, bool)> {
        let tcp = socket::tcp(addr, &self.config)
            .await
            .map_err(|e| (Failure::io("connecting", e), false))?;
        let (socket, resume, channel) = match want {
            Want::Plain => (Socket::Tcp(tcp), None, Channel::Plain),
            Want::TryTls | Want::RequireTls => {
                match self
                    .tls
                    .negotiate(tcp, host.name.as_deref(), addr.ip())
                    .await
                {
                    Ok((Negotiated::Tls(stream), resume)) => {
                        let end_point = (self.channel_binding != ChannelBinding::Disable)
                            .then(|| tls::server_end_point(&stream))
                            .flatten();
                        (Socket::Tls(stream), resume, Channel::Tls(end_point))
                    }
                    Ok((Negotiated::Refused(tcp), _)) if want == Want::TryTls => {
                        (Socket::Tcp(tcp), None, Channel::Plain)
                    }
                    Ok((Negotiated::Refused(_), _)) => {
                        return Err((
                            Failure::tls(format!(
                                "the server does not support TLS, but sslmode={} requires it",
                                self.tls.mode.as_str()
                            )),
                            false,
                        ))
                    }
                    // The handshake itself failed (a refused certificate, a reset).
                    Err(failure @ (Failure::Tls(_) | Failure::Io { .. })) => {
                        return Err((failure, true))
                    }
                    Err(failure) => return Err((failure, false)),
                }
            }
        };
        let tls = resume.is_some();
        self.session(socket, Dest::Tcp(addr), resume, channel, wants)
            .await
            .map_err(|f| (f, tls))
    }

    /// The start-up on an open socket: start-up message, authentication, reading to
    /// `ReadyForQuery`, hand-over to tokio-postgres, and the `target_session_attrs` check.
    async fn session(
        &self,
        socket: Socket,
        dest: Dest,
        tls: Option<TlsResume>,
        channel: Channel,
        wants: SessionAttrs,
    ) -> Result<Opened, Failure> {
        let mut ex = Exchange::new(socket);
        ex.output.extend_from_slice(&self.startup);
        ex.send().await?;
        let creds = Credentials {
            user: &self.user,
            password: self.password.as_deref(),
            channel_binding: self.channel_binding,
            keys: &self.keys,
        };
        match auth::authenticate(&mut ex, &creds, &channel).await {
            Ok(()) => {}
            Err(Failure::Refused) => return Err(startup::decode(&self.config, ex.input)),
            Err(failure) => return Err(failure),
        }
        let Some(key) = ex.read_to_ready().await? else {
            return Err(startup::decode(&self.config, ex.input));
        };
        let Exchange { stream, input, .. } = ex;
        let handover = Handover::new(stream, input, self.startup.len());
        let (client, connection) = self
            .config
            .connect_raw(handover, NoTls)
            .await
            .map_err(Failure::Rejected)?;
        // Reported at start-up by PostgreSQL 14 and later; asked for below otherwise.
        let reported = ServerRole {
            read_only: connection
                .parameter("default_transaction_read_only")
                .map(|v| v == "on"),
            standby: connection.parameter("in_hot_standby").map(|v| v == "on"),
        };
        // The connection future owns the socket; it ends when the client is dropped (after
        // the server answered everything in flight, then Terminate) or the server goes away,
        // which `Client::is_closed` then reports.
        let (notify, notifications) = tokio::sync::mpsc::unbounded_channel();
        let io = tokio::spawn(async move {
            let mut connection = connection;
            // As the connection's own future, which drops notifications: here they are
            // forwarded (to nobody, unless the connection listens).
            while let Some(Ok(message)) =
                std::future::poll_fn(|cx| connection.poll_message(cx)).await
            {
                if let tokio_postgres::AsyncMessage::Notification(n) = message {
                    let _ = notify.send(n);
                }
            }
        });
        let opened = |client| Opened {
            notifications,
            client,
            cancel: Arc::new(CancelTarget::new(dest, tls, key)),
            io,
        };
        if wants == SessionAttrs::Any {
            return Ok(opened(client));
        }
        let role = reported.complete(&client, wants).await?;
        if let Some(why) = role.refuses(wants) {
            return Err(Failure::Role(why));
        }
        Ok(opened(client))
    }
}

/// What a server is, as far as `target_session_attrs` cares. `None`: not known yet.
#[derive(Clone, Copy)]
struct ServerRole {
    /// Sessions start read-only: a standby, or `default_transaction_read_only` on.
    read_only: Option<bool>,
    /// The server is in recovery.
    standby: Option<bool>,
}

impl ServerRole {
    /// Asks a server older than PostgreSQL 14 what it did not report at start-up, and only what
    /// `wants` needs (libpq's queries).
    async fn complete(mut self, client: &Client, wants: SessionAttrs) -> Result<Self, Failure> {
        let ask = |sql: &'static str| async move {
            let rows = client.simple_query(sql).await.map_err(Failure::Rejected)?;
            Ok::<bool, Failure>(rows.iter().any(|m| {
                matches!(m, tokio_postgres::SimpleQueryMessage::Row(r)
                    if matches!(r.get(0), Some("on" | "t")))
            }))
        };
        match wants {
            SessionAttrs::ReadWrite | SessionAttrs::ReadOnly => {
                if self.read_only.is_none() || self.standby.is_none() {
                    self.read_only = Some(ask("SHOW transaction_read_only").await?);
                    self.standby = Some(false);
                }
            }
            _ => {
                if self.standby.is_none() {
                    self.standby = Some(ask("SELECT pg_catalog.pg_is_in_recovery()").await?);
                }
            }
        }
        Ok(self)
    }

    /// Why a server with this role does not do for `wants`; `None` when it does.
    fn refuses(self, wants: SessionAttrs) -> Option<&'static str> {
        let read_only = self.read_only.unwrap_or(false) || self.standby.unwrap_or(false);
        let standby = self.standby.unwrap_or(false);
        match wants {
            SessionAttrs::ReadWrite if read_only => {
                Some("the server is read-only, and target_session_attrs=read-write")
            }
            SessionAttrs::ReadOnly if !read_only => {
                Some("the server is not read-only, and target_session_attrs=read-only")
            }
            SessionAttrs::Primary if standby => {
                Some("the server is a standby, and target_session_attrs=primary")
            }
            SessionAttrs::Standby if !standby => Some(
                "the server is not a standby, and target_session_attrs=standby (or \
                 prefer-standby, before any server is taken)",
            ),
            _ => None,
        }
    }
}

/// The URL's hosts as tokio-postgres' `Config` holds them: names, `hostaddr`s, ports (one for
/// all, or one each), Unix socket directories.
fn hosts(config: &Config) -> Vec<HostSpec> {
    let names = config.get_hosts();
    let addrs = config.get_hostaddrs();
    let ports = config.get_ports();
    let count = names.len().max(addrs.len()).max(1);
    (0..count)
        .map(|i| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            let name = names.get(i);
            let addr = match (addrs.get(i), name) {
                (Some(ip), _) => HostAddr::Ip(*ip, port),
                (None, Some(Host::Unix(dir))) => {
                    HostAddr::Unix(dir.join(format!(".s.PGSQL.{port}")))
                }
                (None, Some(Host::Tcp(host))) => match host.parse::<IpAddr>() {
                    Ok(ip) => HostAddr::Ip(ip, port),
                    Err(_) => HostAddr::Name(host.clone(), port),
                },
                (None, None) => HostAddr::Name("localhost".into(), port),
            };
            let name = match name {
                Some(Host::Tcp(host)) => Some(host.clone()),
                Some(Host::Unix(_)) => None,
                None if addrs.is_empty() => Some("localhost".into()),
                None => None,
            };
            HostSpec { name, addr }
        })
        .collect()
}

/// How many hosts `url` lists (each a read replica, for `DATABASE_REPLICA_URL`).
pub(crate) fn host_count(url: &DatabaseUrl) -> usize {
    hosts(url.config()).len()
}

/// Host `i` of the URL as `host:port` (or the `hostaddr`, or the Unix socket directory).
pub(crate) fn describe_host(config: &Config, i: usize) -> String {
    let ports = config.get_ports();
    let port = ports
        .get(i)
        .or_else(|| ports.first())
        .copied()
        .unwrap_or(5432);
    match (config.get_hosts().get(i), config.get_hostaddrs().get(i)) {
        (Some(Host::Tcp(h)), _) => format!("{h}:{port}"),
        (Some(Host::Unix(p)), _) => format!("{}:{port}", p.display()),
        (None, Some(ip)) => format!("{ip}:{port}"),
        (None, None) => format!("localhost:{port}"),
    }
}

fn describe(config: &Config) -> String {
    let mut s = String::new();
    for i in 0..config.get_hosts().len().max(config.get_hostaddrs().len()) {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&describe_host(config, i));
    }
    if s.is_empty() {
        s.push_str("localhost:5432");
    }
    if let Some(db) = config.get_dbname() {
        let _ = write!(s, "/{db}");
    }
    if let Some(user) = config.get_user() {
        let _ = write!(s, " as {user}");
    }
    s
}
