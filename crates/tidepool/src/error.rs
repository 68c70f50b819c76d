//! The errors the pool returns, typed so callers can tell a full pool from a dead server from a
//! bad statement. None of them ever contains a password: connection targets are shown redacted
//! and server messages carry no credentials.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::settings::SettingsError;

/// Everything a pool operation can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No connection became available within `DB_POOL_TIMEOUT`. The message keeps SQLAlchemy's
    /// text so existing alerts still match.
    #[error(transparent)]
    Timeout(#[from] TimeoutError),
    /// Opening a connection failed for a reason waiting will not fix (wrong password, unknown
    /// database or role, unusable TLS settings); returned at once rather than after the timeout.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The server or the connection failed a statement. Displays the server's own message and
    /// SQLSTATE (tokio-postgres alone displays just `db error`).
    #[error("{}", ShowError(.0))]
    Db(#[from] tokio_postgres::Error),
    /// Inside a transaction, a cached prepared statement stopped matching the server: the
    /// schema changed under it (`0A000`, cached plan must not change result type) or its name
    /// is gone (`26000`, after `DISCARD ALL` or `DEALLOCATE`). The statement was evicted from the
    /// cache, but the transaction is aborted: roll it back and run it again (asyncpg's
    /// `InvalidCachedStatementError`). Outside a transaction the pool re-prepares and retries
    /// once by itself, so this is never seen there.
    #[error(
        "a cached prepared statement became invalid inside a transaction (the schema changed, \
         or DISCARD/DEALLOCATE ran); it was evicted, but the transaction is aborted: roll back \
         and retry it ({})",
        ShowError(.0)
    )]
    StatementInvalidated(#[source] tokio_postgres::Error),
    /// The pool was closed with [`Pool::close`](crate::Pool::close).
    #[error("the pool is closed")]
    Closed,
    /// The settings could not be used.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The connection was lost while `COMMIT` was in flight: the transaction may or may not have
    /// been committed. Never retried blindly; check through the data (e.g. a unique key).
    #[error(
        "commit outcome unknown: the connection was lost while COMMIT was in flight ({})",
        ShowError(.0)
    )]
    CommitOutcomeUnknown(#[source] tokio_postgres::Error),
    /// A statement ran longer than its command timeout (`DB_COMMAND_TIMEOUT`, or the
    /// checkout's own, see
    /// [`PooledConnection::set_command_timeout`](crate::PooledConnection::set_command_timeout)):
    /// a cancel request stopped it on the server. Inside a transaction the transaction is
    /// aborted. Not a pool timeout ([`Error::Timeout`]): the statement had its connection.
    #[error(
        "statement timed out after {} s (command timeout); {}",
        .after.as_secs_f64(),
        if *.confirmed {
            "it was cancelled on the server"
        } else {
            "the server did not confirm the cancel, so its outcome is unknown and the \
             connection was closed"
        }
    )]
    CommandTimeout {
        /// The timeout that elapsed.
        after: Duration,
        /// The server answered the cancel (the statement stopped, or had just finished
        /// failing). `false`: no answer in time; the connection was closed, and the statement
        /// may or may not have taken effect.
        confirmed: bool,
    },
    /// A read through [`Pool::read`](crate::Pool::read) found no usable replica and
    /// `DB_REPLICA_FALLBACK=false` keeps it off the primary.
    #[error(
        "no read replica is usable ({replicas}) and DB_REPLICA_FALLBACK=false keeps reads off \
         the primary{}",
        .last.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
    )]
    NoReplica {
        /// Each replica's host and state.
        replicas: String,
        /// The last replica's failure, when one was tried.
        last: Option<Box<Error>>,
    },
    /// With the statement cache off, statements are sent unnamed with their parameter types
    /// told from the Rust values (so they work through PgBouncer in transaction mode); this
    /// parameter's Rust type maps to no built-in PostgreSQL type. Nothing was sent.
    #[error(
        "with the statement cache off (as behind PgBouncer in transaction mode), parameter \
         ${index} has a Rust type whose PostgreSQL type tidepool cannot name ({rust_type}): run \
         the statement inside a transaction, or turn the statement cache on \
         (DB_STATEMENT_CACHE=true, with PgBouncer in session mode or no PgBouncer)"
    )]
    ParameterType {
        /// The parameter's position, as in `$1`.
        index: usize,
        /// The Rust type, as tokio-postgres names it.
        rust_type: String,
    },
}

impl Error {
    /// The SQLSTATE code when the server reported the error (`"40001"`, `"57P01"`, ...).
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Db(e) | Error::CommitOutcomeUnknown(e) | Error::StatementInvalidated(e) => {
                e.code().map(|c| c.code())
            }
            Error::Connect(e) => e.code(),
            Error::Timeout(t) => t.last_connect_error().and_then(|e| e.code()),
            _ => None,
        }
    }

    /// True when the connection to the server was lost or could not be made: the kind of
    /// failure a later attempt on a fresh connection may not see. False for
    /// [`Error::CommitOutcomeUnknown`]: repeating that transaction could apply it twice.
    pub fn is_disconnect(&self) -> bool {
        match self {
            Error::Db(e) => is_disconnect(e),
            Error::Timeout(t) => t.last_connect_error().is_some(),
            _ => false,
        }
    }
}

/// Shows a tokio-postgres error with the server's message (its own `Display` says only
/// `db error`), or with its cause when the client raised it.
pub(crate) struct ShowError<'a>(pub(crate) &'a tokio_postgres::Error);

impl std::fmt::Display for ShowError<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(db) = self.0.as_db_error() {
            return write!(
                f,
                "{}: {} (SQLSTATE {})",
                db.severity(),
                db.message(),
                db.code().code()
            );
        }
        write!(f, "{}", self.0)?;
        if let Some(source) = std::error::Error::source(self.0) {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

/// True when `e` means the connection is gone rather than that the statement failed.
pub(crate) fn is_disconnect(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        // admin_shutdown, crash_shutdown, cannot_connect_now: the backend is going away.
        return matches!(code.code(), "57P01" | "57P02" | "57P03");
    }
    // No SQLSTATE: an I/O error, an unexpected EOF or a protocol failure. Walk the source chain
    // for an io::Error to be sure it is the transport and not, say, a conversion error.
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// The checkout timed out. Displays as SQLAlchemy's
/// `QueuePool limit of size 5 overflow 10 reached, connection timed out, timeout 30.00`, followed
/// by the last connection error when opening connections is what failed.
#[derive(Debug, Clone)]
pub struct TimeoutError {
    pub(crate) pool_size: usize,
    pub(crate) max_overflow: Option<usize>,
    pub(crate) timeout: Duration,
    pub(crate) last_connect_error: Option<ConnectError>,
    /// A statement on the pool waited behind another on a shared connection, rather than for
    /// a connection.
    pub(crate) behind_shared: bool,
}

impl TimeoutError {
    /// The timeout that expired.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Why the most recent attempt to open a connection failed, when one did during the wait.
    pub fn last_connect_error(&self) -> Option<&ConnectError> {
        self.last_connect_error.as_ref()
    }
}

impl fmt::Display for TimeoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let overflow = self.max_overflow.map_or(-1, |o| o as i64);
        write!(
            f,
            "QueuePool limit of size {} overflow {} reached, connection timed out, timeout {:.2}",
            self.pool_size,
            overflow,
            self.timeout.as_secs_f64()
        )?;
        if self.behind_shared {
            f.write_str(" (the statement waited behind another on a shared connection)")?;
        }
        if let Some(e) = &self.last_connect_error {
            write!(f, " (last connection error: {e})")?;
        }
        Ok(())
    }
}

impl std::error::Error for TimeoutError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.last_connect_error
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Opening a connection failed. Names the (redacted) target and carries the server's own
/// message, e.g. `could not connect to 127.0.0.1:5432/app as app: password authentication failed`.
#[derive(Debug, Clone)]
pub struct ConnectError {
    pub(crate) target: Arc<str>,
    pub(crate) kind: ConnectErrorKind,
    /// Every host was unreachable, timed out on its own or not what `target_session_attrs`
    /// asks for, and at least one was the wrong kind (a standby where a primary is wanted): a
    /// failover under way. A server refusing for load or credentials is not that, nor are
    /// unreachable hosts alone.
    pub(crate) no_server: bool,
}

#[derive(Debug, Clone)]
pub(crate) enum ConnectErrorKind {
    /// The server refused, in its own words (tokio-postgres' decoding of its `ErrorResponse`).
    Postgres(Arc<tokio_postgres::Error>),
    /// The transport failed: refused, reset, unreachable, a host name that does not resolve.
    /// Carries the operating system's cause.
    Io {
        during: &'static str,
        error: Arc<std::io::Error>,
    },
    /// TLS could not be set up as the `sslmode` demands: an untrusted certificate, a host name
    /// mismatch, a server without TLS.
    Tls(Arc<str>),
    /// The peer is not a PostgreSQL server that authenticated properly (a SCRAM proof that does
    /// not verify, channel binding refused, unknown bytes), or authentication cannot be done
    /// as configured (no password).
    Protocol(Arc<str>),
    /// The server is not what `target_session_attrs` asks for (e.g. read-only).
    Role(&'static str),
    /// The connection opened, but its set-up (`DB_CONNECT_INIT_SQL`, the `on_connect` hook)
    /// failed: `step` names which, `why` says how.
    Init {
        step: Arc<str>,
        why: Arc<str>,
        /// The failure was the connection going away, not the step itself.
        transient: bool,
    },
    /// The attempt ran out of time: `DB_CONNECT_TIMEOUT`, or what was left of the checkout's
    /// `DB_POOL_TIMEOUT` when that was shorter.
    TimedOut {
        after: Duration,
        by_pool_timeout: bool,
    },
}

impl ConnectError {
    /// Whether a later attempt may succeed (refused, too many clients, server starting, timed
    /// out) as opposed to a configuration error that will fail the same way every time.
    pub fn is_transient(&self) -> bool {
        match &self.kind {
            ConnectErrorKind::TimedOut { .. } | ConnectErrorKind::Io { .. } => true,
            // A standby being promoted, or a primary demoted, may be what the next attempt finds.
            ConnectErrorKind::Role(_) => true,
            ConnectErrorKind::Tls(_) | ConnectErrorKind::Protocol(_) => false,
            ConnectErrorKind::Init { transient, .. } => *transient,
            ConnectErrorKind::Postgres(e) => match e.code().map(|c| c.code()) {
                // invalid_password, invalid_authorization_specification (no such role, pg_hba
                // rejection), invalid_catalog_name (no such database), insufficient_privilege.
                Some("28P01" | "28000" | "3D000" | "42501") => false,
                Some(_) => true,
                // No SQLSTATE: transport failures are transient, but a failure the client raised
                // before talking to the server (a TLS mode it cannot do) is not.
                None => is_disconnect(e),
            },
        }
    }

    /// The connection opened but its set-up (`DB_CONNECT_INIT_SQL`, `on_connect`) failed.
    #[cfg(feature = "axum")]
    pub(crate) fn is_set_up(&self) -> bool {
        matches!(self.kind, ConnectErrorKind::Init { .. })
    }

    /// The server's SQLSTATE, when it answered.
    pub fn code(&self) -> Option<&str> {
        match &self.kind {
            ConnectErrorKind::Postgres(e) => e.code().map(|c| c.code()),
            _ => None,
        }
    }

    /// True when the attempt was cut short by the checkout's own deadline rather than failing.
    pub(crate) fn by_pool_timeout(&self) -> bool {
        matches!(
            self.kind,
            ConnectErrorKind::TimedOut {
                by_pool_timeout: true,
                ..
            }
        )
    }

    /// The underlying tokio-postgres error, when there is one.
    pub fn postgres_error(&self) -> Option<&tokio_postgres::Error> {
        match &self.kind {
            ConnectErrorKind::Postgres(e) => Some(e),
            _ => None,
        }
    }

    /// True when the connection could not be set up as the TLS settings demand (untrusted
    /// certificate, host name mismatch, server without TLS): fix the settings or the server.
    pub fn is_tls(&self) -> bool {
        matches!(self.kind, ConnectErrorKind::Tls(_))
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "could not connect to {}: ", self.target)?;
        match &self.kind {
            ConnectErrorKind::Postgres(e) => match e.as_db_error() {
                // The server's own words, without tokio-postgres' "db error: " prefix.
                Some(db) => write!(
                    f,
                    "{}: {} (SQLSTATE {})",
                    db.severity(),
                    db.message(),
                    db.code().code()
                ),
                None => write!(f, "{e}"),
            },
            ConnectErrorKind::TimedOut {
                after,
                by_pool_timeout,
            } => {
                let limit = if *by_pool_timeout {
                    "DB_POOL_TIMEOUT"
                } else {
                    "DB_CONNECT_TIMEOUT"
                };
                write!(f, "timed out after {:.2}s ({limit})", after.as_secs_f64())
            }
            ConnectErrorKind::Io { during, error } => write!(f, "{error} ({during})"),
            ConnectErrorKind::Tls(why) | ConnectErrorKind::Protocol(why) => f.write_str(why),
            ConnectErrorKind::Role(why) => f.write_str(why),
            ConnectErrorKind::Init { step, why, .. } => {
                write!(f, "setting up the connection failed in {step}: {why}")
            }
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ConnectErrorKind::Postgres(e) => Some(&**e),
            ConnectErrorKind::Io { error, .. } => Some(&**error),
            _ => None,
        }
    }
}
