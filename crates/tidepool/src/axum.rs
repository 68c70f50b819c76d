//! axum integration (cargo feature `axum`): the [`Db`] extractor, which hands a handler a pooled
//! connection the way the seed's FastAPI dependency hands out a session, and the seed's
//! `/health/database` endpoint as a ready-made handler ([`database_health`]).
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use tidepool::axum::{database_health, Db};
//!
//! async fn answer(db: Db) -> Result<String, tidepool::Error> {
//!     let row = db.query_one("SELECT 41 + 1", &[]).await?;
//!     Ok(row.get::<_, i32>(0).to_string())
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = tidepool::Pool::from_env()?;
//! let app = Router::new()
//!     .route("/answer", get(answer))
//!     .route("/health/database", get(database_health))
//!     .with_state(pool);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! Errors become responses without internals: a pool timeout (or a closed pool) is `503` with
//! `Retry-After`, anything else `500`; the body is FastAPI's `{"detail": ...}` with the standard
//! reason phrase. The error itself is logged on target `tidepool::axum`.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::axum::extract::{FromRef, FromRequestParts, State};
use ::axum::http::request::Parts;
use ::axum::http::{header, HeaderValue, StatusCode};
use ::axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::error::ShowError;
use crate::url::redact_loosely;
use crate::{Error, Pool, PooledConnection, Status};

/// Log target of the errors turned into responses here.
pub const TARGET: &str = "tidepool::axum";

/// The `Retry-After` value, in seconds, sent with `503` when no connection was available.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// How long [`database_health`] waits for a connection and the answer to `SELECT 1` before it
/// reports the database unhealthy: well under the 2 s load balancers commonly allow.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection checked out of the state's [`Pool`] for the duration of a request; returned
/// when the handler drops it. Derefs to [`PooledConnection`].
///
/// The router's state must provide a pool (`Pool: FromRef<S>`, e.g. `.with_state(pool)`).
/// Checkout failures reject the request as [`Error`]'s [`IntoResponse`] describes.
#[derive(Debug)]
pub struct Db(pub PooledConnection);

impl Deref for Db {
    type Target = PooledConnection;

    fn deref(&self) -> &PooledConnection {
        &self.0
    }
}

impl DerefMut for Db {
    fn deref_mut(&mut self) -> &mut PooledConnection {
        &mut self.0
    }
}

impl<S> FromRequestParts<S> for Db
where
    Pool: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = Error;

    async fn from_request_parts(_parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Pool::from_ref(state).get().await.map(Db)
    }
}

/// FastAPI's error body.
#[derive(Serialize)]
struct Detail {
    detail: &'static str,
}

impl IntoResponse for Error {
    /// `503 Service Unavailable` with `Retry-After` when no connection could be had in time or
    /// the pool is closed (shutting down); `500 Internal Server Error` for everything else. The
    /// body never carries the error's text; the log does (it never contains a password).
    fn into_response(self) -> Response {
        let status = match &self {
            Error::Timeout(_) | Error::Closed => {
                tracing::warn!(target: TARGET, error = %self, "no database connection: answering 503");
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => {
                match &self {
                    Error::Db(e) => {
                        tracing::error!(target: TARGET, error = %ShowError(e), "database error: answering 500")
                    }
                    other => {
                        tracing::error!(target: TARGET, error = %other, "database error: answering 500")
                    }
                }
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let detail = status.canonical_reason().unwrap_or("Error");
        let mut response = (status, ::axum::Json(Detail { detail })).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }
}

/// The answer of `/health/database`: the seed's JSON.
///
/// Healthy: `{"status": "healthy", "pool_size", "checked_in", "checked_out", "overflow",
/// "total_connections", ...}` with every field of [`Status`] (`max_overflow`, `waiting`,
/// `timeouts`, `checkout_wait_ms: {p50, p95, p99}`, ...). Unhealthy: `{"status": "unhealthy",
/// "error": "...", "cause": "..."}`, the error redacted.
// One value per health check, moved once into the response: boxing the figures would only
// change the public type.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Health {
    /// `SELECT 1` answered; the figures were taken while the check still held its connection,
    /// as the seed's endpoint does.
    Healthy {
        /// Always `"healthy"`.
        status: &'static str,
        /// The pool's figures.
        #[serde(flatten)]
        figures: Status,
    },
    /// No connection or no answer in time, or the check failed.
    Unhealthy {
        /// Always `"unhealthy"`.
        status: &'static str,
        /// What went wrong, with anything that looks like a password masked.
        error: String,
        /// The same, for machines: `pool_exhausted` (every connection checked out, none came
        /// back in time), `database_down` (no connection could be opened, or it was lost, or
        /// opening one ran out of time), `auth_failed` (the server refused the credentials or
        /// the database), `init_failed` (`DB_CONNECT_INIT_SQL` or the `on_connect` hook
        /// failed), `timeout` (the server did not answer in time), or `error` (the check
        /// statement failed otherwise).
        cause: &'static str,
    },
}

impl Health {
    /// Whether the database answered.
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy { .. })
    }
}

impl IntoResponse for Health {
    /// `200` when healthy, `503` otherwise.
    fn into_response(self) -> Response {
        let status = if self.is_healthy() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, ::axum::Json(self)).into_response()
    }
}

/// Checks out a connection, runs `SELECT 1` and takes the pool's figures, all within `timeout`
/// (checkout included, so an exhausted pool or a silent server still gets an answer in time).
pub async fn check_database(pool: &Pool, timeout: Duration) -> Health {
    pool.read().refresh();
    let check = async {
        let conn = pool.get().await?;
        conn.query_one("SELECT 1", &[]).await?;
        let figures = pool.status();
        drop(conn);
        Ok::<_, Error>(figures)
    };
    let (error, cause) = match tokio::time::timeout(timeout, check).await {
        Ok(Ok(figures)) => {
            return Health::Healthy {
                status: "healthy",
                figures,
            }
        }
        Ok(Err(e)) => {
            let cause = cause_of(&e, pool);
            let text = match &e {
                Error::Db(db) => ShowError(db).to_string(),
                e => e.to_string(),
            };
            (redact_loosely(&text), cause)
        }
        Err(_) => unanswered(pool, timeout),
    };
    tracing::warn!(target: TARGET, error = %error, cause, "database health check failed");
    Health::Unhealthy {
        status: "unhealthy",
        error,
        cause,
    }
}

/// The machine-readable cause of a failed check ([`Health::Unhealthy`]'s `cause`).
fn cause_of(e: &Error, pool: &Pool) -> &'static str {
    const AUTH: [&str; 4] = ["28P01", "28000", "3D000", "42501"];
    match e {
        Error::Connect(c) if c.code().is_some_and(|code| AUTH.contains(&code)) => "auth_failed",
        Error::Connect(c) if c.is_set_up() => "init_failed",
        Error::Connect(_) => "database_down",
        Error::Timeout(t) => match t.last_connect_error() {
            Some(c) if c.code().is_some_and(|code| AUTH.contains(&code)) => "auth_failed",
            Some(c) if c.is_set_up() => "init_failed",
            Some(_) => "database_down",
            // No connect failure on record: every connection was checked out, or an attempt
            // was cut short by the wait (a server too slow to connect to).
            None if exhausted(&pool.status()) => "pool_exhausted",
            None => "timeout",
        },
        Error::CommandTimeout { .. } => "timeout",
        e if e.is_disconnect() => "database_down",
        _ => "error",
    }
}

/// The error of a check that got no connection or no answer in time, with the pool's state,
/// and its cause: what opening connections last failed with, if it does; `pool_exhausted` when
/// every connection was checked out; else `timeout`.
fn unanswered(pool: &Pool, timeout: Duration) -> (String, &'static str) {
    let now = pool.status();
    let cause = match pool.last_connect_error() {
        // Opening connections is what fails: the checkout is still trying.
        Some(e) => cause_of(&Error::Connect(e), pool),
        None if exhausted(&now) => "pool_exhausted",
        None => "timeout",
    };
    (unanswered_text(&now, timeout), cause)
}

/// Every connection the pool may open is checked out.
fn exhausted(now: &crate::Status) -> bool {
    now.max_overflow >= 0 && now.checked_out as i64 >= now.pool_size as i64 + now.max_overflow
}

fn unanswered_text(now: &crate::Status, timeout: Duration) -> String {
    let capacity = match now.max_overflow {
        -1 => "unlimited".to_string(),
        overflow => (now.pool_size as i64 + overflow).to_string(),
    };
    format!(
        "no database connection and answer within {} ms ({} of {} connections checked out, {} waiting)",
        timeout.as_millis(),
        now.checked_out,
        capacity,
        now.waiting
    )
}

/// `GET /health/database`: [`check_database`] with [`HEALTH_TIMEOUT`]; `200` healthy, `503`
/// unhealthy. Needs a router state that provides a [`Pool`]. One checkout and one `SELECT 1`
/// per request, as the seed's endpoint; see [`HealthCheck`] for a version that shares checks
/// between concurrent requests.
pub async fn database_health(State(pool): State<Pool>) -> Health {
    check_database(&pool, HEALTH_TIMEOUT).await
}

/// `/health/database` for services that get many probes at once: concurrent requests share
/// checks instead of each taking a connection from the application's pool.
///
/// Every answer still comes from a check ([`check_database`]) that *started after the request
/// arrived*: a request that finds a check in flight waits for the next one, which starts as
/// soon as the current one ends and answers everybody who arrived meanwhile. Each request is
/// still bounded by the timeout from its own arrival, so an exhausted pool or a silent server
/// gets `503` in time. However many probes arrive, health checks hold at most one connection.
///
/// Cheap to clone; clones share checks. As a route:
/// `.route("/health/database", get(move || health.clone().answer()))`.
#[derive(Clone)]
pub struct HealthCheck {
    inner: Arc<HealthInner>,
}

struct HealthInner {
    pool: Pool,
    timeout: Duration,
    batch: Mutex<Batch>,
}

/// Requests waiting for the next check, and whether a checker task is running.
#[derive(Default)]
struct Batch {
    running: bool,
    next: Vec<oneshot::Sender<Health>>,
}

impl HealthCheck {
    /// Checks on `pool`, each request bounded by [`HEALTH_TIMEOUT`].
    pub fn new(pool: Pool) -> HealthCheck {
        HealthCheck::with_timeout(pool, HEALTH_TIMEOUT)
    }

    /// Checks on `pool`, each request bounded by `timeout` from its arrival.
    pub fn with_timeout(pool: Pool, timeout: Duration) -> HealthCheck {
        HealthCheck {
            inner: Arc::new(HealthInner {
                pool,
                timeout,
                batch: Mutex::new(Batch::default()),
            }),
        }
    }

    /// The answer for a request arriving now: the result of the next check to start.
    pub async fn answer(self) -> Health {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut batch = self.inner.batch.lock().unwrap_or_else(|e| e.into_inner());
            batch.next.push(tx);
            !std::mem::replace(&mut batch.running, true)
        };
        if start {
            tokio::spawn(self.inner.clone().run());
        }
        match tokio::time::timeout(self.inner.timeout, rx).await {
            Ok(Ok(health)) => health,
            // The checker ended without answering (the runtime is shutting down), or the check
            // before ours is still waiting for the database.
            _ => {
                let (error, cause) = unanswered(&self.inner.pool, self.inner.timeout);
                tracing::warn!(target: TARGET, error = %error, cause, "database health check failed");
                Health::Unhealthy {
                    status: "unhealthy",
                    error,
                    cause,
                }
            }
        }
    }
}

impl HealthInner {
    /// Runs checks while requests wait for one; each check answers the requests that arrived
    /// before it started.
    async fn run(self: Arc<Self>) {
        let mut running = Running(Some(self));
        loop {
            let inner = running.0.clone().expect("set until the loop ends");
            let waiting = {
                let mut batch = inner.batch.lock().unwrap_or_else(|e| e.into_inner());
                if batch.next.is_empty() {
                    // Lowered under the same lock a request takes to decide whether to start
                    // a checker: no request is left without one.
                    batch.running = false;
                    running.0 = None;
                    return;
                }
                std::mem::take(&mut batch.next)
            };
            let health = check_database(&inner.pool, inner.timeout).await;
            for request in waiting {
                let _ = request.send(health.clone());
            }
        }
    }
}

/// Lowers the `running` flag if the checker is dropped mid-check (a runtime shutting down), so
/// a later request starts a new one.
struct Running(Option<Arc<HealthInner>>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(inner) = self.0.take() {
            inner
                .batch
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .running = false;
        }
    }
}
