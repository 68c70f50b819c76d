//! tidepool: a PostgreSQL connection pool for tokio with SQLAlchemy QueuePool semantics.
//!
//! Configure it exactly as a SQLAlchemy + asyncpg service is configured (`DATABASE_URL`,
//! `DB_POOL_SIZE`, `DB_MAX_OVERFLOW`, `DB_POOL_PRE_PING`, `DB_POOL_RECYCLE`, ...), then check out
//! connections:
//!
//! ```no_run
//! # async fn run() -> Result<(), tidepool::Error> {
//! let pool = tidepool::Pool::from_env()?;
//! let conn = pool.get().await?;
//! let row = conn.query_one("SELECT $1::int + 1", &[&41i32]).await?;
//! assert_eq!(row.get::<_, i32>(0), 42);
//! # Ok(()) }
//! ```
//!
//! Modules, one concept each:
//! * [`settings`]: the environment variables and the database URL.
//! * [`core`]: capacity, idle set and the FIFO wait queue, independent of PostgreSQL.
//! * [`Pool`] (`pool`): checkout, pre-ping, recycle, invalidation, reset on return, dispose.
//! * [`PooledConnection`] (`connection`): the query API, statement cache and transactions.
//! * `replica`: read replicas' states (up, lagging, down) and which one a read goes to.
//! * [`ReadPool`] (`read`): [`Pool::read`], reads routed to a healthy replica, falling back to
//!   the primary.
//! * `pipeline`: statements run on the pool itself ([`Pool::execute`]), pipelined on shared
//!   connections when every connection is busy.
//! * `order`: the order in which a shared connection's requests reach the server.
//! * `unnamed`: statements without a server-side name when the statement cache is off
//!   (PgBouncer transaction mode), their parameter types told from the Rust values.
//! * `timer`: one timer per pool that times out waiting checkouts (`DB_POOL_TIMEOUT`).
//! * `listen`: `LISTEN`/`NOTIFY` over one dedicated connection per pool ([`Pool::listener`]).
//! * `maintain`: the maintenance task (idle trimming, keepalive, `DB_POOL_MIN_IDLE`).
//! * `init`: connection set-up (`DB_CONNECT_INIT_SQL`, [`ConnectHook`]) before first use.
//! * `leak`: leak detection (`DB_POOL_LEAK_THRESHOLD`): connections held too long, with where
//!   they were checked out.
//! * `connect`: opening connections under `DB_CONNECT_TIMEOUT`: hosts, TLS (`sslmode`),
//!   authentication, the start-up, and cancel requests ([`CancelToken`]).
//! * [`instrument`]: echo, slow-query logging, pool events and metrics.
//! * `axum` (feature `axum`): the request extractor and the `/health/database` handler.
//! * [`Error`] (`error`): what can go wrong, typed, never showing a password.

#[cfg(feature = "axum")]
pub mod axum;
pub mod core;
pub mod instrument;
pub mod retry;
pub mod settings;
pub mod sizing;
pub mod url;

mod connect;
mod connection;
mod error;
mod init;
mod leak;
mod listen;
mod maintain;
mod order;
mod pipeline;
mod pool;
mod read;
mod replica;
mod stats;
mod timer;
mod unnamed;

pub use connect::CancelToken;
pub use connection::{
    PooledConnection, Statement, ToStatement, Transaction, TransactionBuilder, TransactionOptions,
};
pub use error::{ConnectError, Error, TimeoutError};
pub use init::{ConnectHook, HookError, HookFuture};
pub use instrument::CloseReason;
pub use listen::{ListenEvent, Listener};
pub use pool::Pool;
pub use read::ReadPool;
pub use retry::RetryPolicy;
pub use settings::{DatabaseUrl, ResetOnReturn, Settings, SettingsError};
pub use stats::{Checkout, ClosedCounts, ReplicaState, ReplicaStatus, Status, WaitPercentiles};
pub use url::{RootCert, SessionAttrs, SslMode, TlsParams, UrlError};

/// Re-exported so users name the same types the pool returns.
pub use tokio_postgres;
pub use tokio_postgres::{IsolationLevel, Row};
