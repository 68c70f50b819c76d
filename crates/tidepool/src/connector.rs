//! Opening PostgreSQL connections under `DB_CONNECT_TIMEOUT`, with the connection's I/O driven by
//! its own task: through the pool's own handshake (SCRAM keys derived once per pool, see
//! `handshake.rs`) where it covers the configuration, else through tokio-postgres' `connect`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

use crate::error::{ConnectError, ConnectErrorKind};
use crate::handshake::{self, HandshakeError, KeyCache, Route};
use crate::settings::{DatabaseUrl, Settings};

/// Opens connections to one server with fixed settings.
pub(crate) struct Connector {
    config: Config,
    /// `host:port/dbname as user`, for error messages: never the password.
    target: Arc<str>,
    timeout: Duration,
    /// Where the pool's own handshake connects, when it covers the configuration.
    route: Option<Route>,
    keys: KeyCache,
}

impl Connector {
    pub(crate) fn new(url: &DatabaseUrl, settings: &Settings) -> Self {
        let mut config = url.config().clone();
        if let Some(name) = &settings.application_name {
            config.application_name(name.as_str());
        }
        config.connect_timeout(settings.connect_timeout);
        Connector {
            target: describe(&config).into(),
            route: Route::of(&config),
            config,
            timeout: settings.connect_timeout,
            keys: KeyCache::default(),
        }
    }

    /// The redacted description of where connections go.
    pub(crate) fn target(&self) -> &Arc<str> {
        &self.target
    }

    /// Opens one connection, giving up after `DB_CONNECT_TIMEOUT` or `limit`, whichever is
    /// sooner. Dropping the future abandons the attempt and closes its socket.
    pub(crate) async fn connect(&self, limit: Duration) -> Result<Client, ConnectError> {
        let by_pool_timeout = limit < self.timeout;
        let limit = limit.min(self.timeout);
        match tokio::time::timeout(limit, self.attempt()).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(kind)) => Err(ConnectError {
                target: self.target.clone(),
                kind,
            }),
            Err(_) => Err(ConnectError {
                target: self.target.clone(),
                kind: ConnectErrorKind::TimedOut {
                    after: limit,
                    by_pool_timeout,
                },
            }),
        }
    }

    /// One attempt, without the time limit: the pool's handshake where it covers the
    /// configuration, else (or when it could not open a socket) tokio-postgres' `connect`.
    async fn attempt(&self) -> Result<Client, ConnectErrorKind> {
        if let Some(route) = &self.route {
            match handshake::connect(route, &self.config, &self.keys).await {
                Ok(client) => return Ok(client),
                Err(HandshakeError::Postgres(e)) => {
                    return Err(ConnectErrorKind::Postgres(Arc::new(e)));
                }
                Err(HandshakeError::Server(why)) => return Err(ConnectErrorKind::Server(why)),
                // No socket: tokio-postgres tries again and reports the failure in its terms.
                Err(HandshakeError::Socket) => {}
            }
        }
        let (client, connection) = self
            .config
            .connect(NoTls)
            .await
            .map_err(|e| ConnectErrorKind::Postgres(Arc::new(e)))?;
        // The connection future owns the socket; it ends when the client is dropped (after
        // sending Terminate) or the server goes away, which `Client::is_closed` then reports.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }
}

fn describe(config: &Config) -> String {
    let mut s = String::new();
    let ports = config.get_ports();
    for (i, host) in config.get_hosts().iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        match host {
            Host::Tcp(h) => s.push_str(h),
            Host::Unix(p) => s.push_str(&p.display().to_string()),
        }
        let port = ports
            .get(i)
            .or_else(|| ports.first())
            .copied()
            .unwrap_or(5432);
        let _ = write!(s, ":{port}");
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
