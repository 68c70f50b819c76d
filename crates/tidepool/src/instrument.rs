//! The one instrumentation point every statement passes through: echo logging (`DB_ECHO`), the
//! slow-query warning (`DB_SLOW_QUERY_THRESHOLD`) with its optional plan
//! (`DB_SLOW_QUERY_EXPLAIN`), pool event logging (`DB_ECHO_POOL`) and metrics through the
//! [`metrics`] facade (DESIGN §4).
//!
//! Cost when everything is off: a statement costs a few flag tests, one comparison of its elapsed
//! time against the threshold and a call on a no-op metrics handle (an `Option` test); a pool
//! event costs one flag test. Nothing allocates and nothing locks.
//!
//! # Metrics
//!
//! Handles are registered with the global recorder when a pool is built, so install a recorder
//! (e.g. `metrics-exporter-prometheus`) **before** building the pool; with no recorder the handles
//! are no-ops. Two kinds of figures:
//!
//! * Recorded as they happen: [`QUERY_DURATION`], [`CHECKOUT_WAIT`], [`SLOW_QUERIES`],
//!   [`ERRORS`] (label `class`).
//! * Published from [`Pool::status`] by [`record_pool_metrics`], which the exporter's owner
//!   calls before each scrape (or periodically): [`CONNECTIONS`] (label `state` = `idle` |
//!   `in_use`), [`CONNECTIONS_OPEN`], [`POOL_SIZE`], [`MAX_OVERFLOW`], [`OVERFLOW`], [`WAITING`],
//!   [`TIMEOUTS`], [`CONNECTIONS_CREATED`], [`CONNECTIONS_CLOSED`] (label `reason`, see
//!   [`CloseReason::as_str`]), [`PRE_PING_FAILURES`], [`INVALIDATIONS`], [`PIPELINED`],
//!   [`CANCELLED_STATEMENTS`], [`LEAKS_SUSPECTED`]. They cost the pool
//!   nothing: the pool keeps these counts anyway for [`Pool::status`].
//!
//! Several pools in one process share the same series.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{Counter, Histogram};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use crate::error::{is_disconnect, ConnectError, ShowError};
use crate::settings::Settings;
use crate::stats::Status;
use crate::Pool;

/// Log target of statement echo, slow-query warnings and slow-query plans.
pub const SQL_TARGET: &str = "tidepool::sql";
/// Log target of pool events.
pub const POOL_TARGET: &str = "tidepool::pool";

/// Histogram: statement duration in seconds (every statement, successful or not).
pub const QUERY_DURATION: &str = "tidepool_query_duration_seconds";
/// Histogram: how long checkouts waited for a connection, in seconds (pre-ping included).
pub const CHECKOUT_WAIT: &str = "tidepool_checkout_wait_seconds";
/// Counter: statements slower than `DB_SLOW_QUERY_THRESHOLD`.
pub const SLOW_QUERIES: &str = "tidepool_slow_queries_total";
/// Counter: failed statements and failed connection attempts, by `class` (see [`ErrorClass`]).
pub const ERRORS: &str = "tidepool_errors_total";
/// Gauge: open connections by `state`: `idle` (checked in) or `in_use` (checked out).
pub const CONNECTIONS: &str = "tidepool_connections";
/// Gauge: open connections (`pool_size + overflow`).
pub const CONNECTIONS_OPEN: &str = "tidepool_connections_open";
/// Gauge: the configured `pool_size`.
pub const POOL_SIZE: &str = "tidepool_pool_size";
/// Gauge: the configured `max_overflow` (-1: no limit).
pub const MAX_OVERFLOW: &str = "tidepool_pool_max_overflow";
/// Gauge: SQLAlchemy's `overflow()`: open connections minus `pool_size` (negative below it).
pub const OVERFLOW: &str = "tidepool_pool_overflow";
/// Gauge: checkouts waiting for a connection.
pub const WAITING: &str = "tidepool_pool_waiting";
/// Counter: checkouts that timed out (`DB_POOL_TIMEOUT`).
pub const TIMEOUTS: &str = "tidepool_pool_timeouts_total";
/// Counter: connections opened.
pub const CONNECTIONS_CREATED: &str = "tidepool_connections_created_total";
/// Counter: connections closed, by `reason`.
pub const CONNECTIONS_CLOSED: &str = "tidepool_connections_closed_total";
/// Counter: pre-pings that found a dead connection.
pub const PRE_PING_FAILURES: &str = "tidepool_pre_ping_failures_total";
/// Counter: disconnects that invalidated the connections opened before them.
pub const INVALIDATIONS: &str = "tidepool_invalidations_total";
/// Counter: statements run on the pool that shared a busy connection (pipelined).
pub const PIPELINED: &str = "tidepool_pipelined_statements_total";
/// Counter: statements stopped on the server because their caller went away.
pub const CANCELLED_STATEMENTS: &str = "tidepool_cancelled_statements_total";
/// Counter: statements stopped because they ran past their command timeout.
pub const COMMAND_TIMEOUTS: &str = "tidepool_command_timeouts_total";
/// Counter: checkouts held longer than `DB_POOL_LEAK_THRESHOLD` (possible leaks).
pub const LEAKS_SUSPECTED: &str = "tidepool_leaks_suspected_total";
/// Gauge: 1 while reads go to a read replica (label `host`), 0 while it is down or lagging.
pub const REPLICA_UP: &str = "tidepool_replica_up";
/// Gauge: a read replica's replay lag in seconds (label `host`).
pub const REPLICA_LAG: &str = "tidepool_replica_lag_seconds";

/// Longest the `EXPLAIN` of a slow statement may take. Past it the connection is closed on
/// return (its state is unknown) rather than handed to someone else.
const EXPLAIN_LIMIT: Duration = Duration::from_secs(2);

/// What the pool does with each statement and pool event, decided once from the settings.
#[derive(Debug, Clone)]
pub(crate) struct Instrument {
    echo: bool,
    echo_pool: bool,
    explain: bool,
    slow: Duration,
    metrics: Arc<Metrics>,
}

/// Metric handles, registered once per pool (no-ops without a recorder), and what echo pool
/// needs to tell overflow connections apart.
#[derive(Debug)]
struct Metrics {
    query_duration: Histogram,
    slow_queries: Counter,
    errors: [Counter; ErrorClass::ALL.len()],
    /// `DB_POOL_SIZE`.
    pool_size: i64,
    /// Connections created minus closed; kept only with `DB_ECHO_POOL` (on create and close
    /// events, never per checkout).
    open: AtomicI64,
}

pub use crate::stats::CloseReason;

/// The `class` label of [`ERRORS`]: the SQLSTATE class of a server error by its PostgreSQL name,
/// or what went wrong when the server did not answer with one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum ErrorClass {
    /// The connection was lost (closed socket, I/O error) or the server is going away.
    Connection = 0,
    /// Opening a connection failed.
    Connect,
    /// SQLSTATE class 0A.
    FeatureNotSupported,
    /// SQLSTATE class 22.
    DataException,
    /// SQLSTATE class 23.
    IntegrityConstraintViolation,
    /// SQLSTATE class 25.
    InvalidTransactionState,
    /// SQLSTATE class 28.
    InvalidAuthorization,
    /// SQLSTATE class 3D.
    InvalidCatalogName,
    /// SQLSTATE class 40 (serialization failures, deadlocks).
    TransactionRollback,
    /// SQLSTATE class 42 (syntax errors, missing objects, permissions).
    SyntaxErrorOrAccessRuleViolation,
    /// SQLSTATE class 53 (too many connections, out of memory or disk).
    InsufficientResources,
    /// SQLSTATE class 54.
    ProgramLimitExceeded,
    /// SQLSTATE class 55 (lock not available, ...).
    ObjectNotInPrerequisiteState,
    /// SQLSTATE class 57 (statement cancelled or timed out, server shutting down).
    OperatorIntervention,
    /// SQLSTATE class P0 (PL/pgSQL `RAISE`).
    PlpgsqlError,
    /// SQLSTATE class XX.
    InternalError,
    /// Any other SQLSTATE class.
    OtherServerError,
    /// Failed in the client without a server error: a type conversion, or an unexpected
    /// number of rows for `query_one`.
    Client,
}

impl ErrorClass {
    /// Every class, in label order.
    pub const ALL: [ErrorClass; 18] = [
        ErrorClass::Connection,
        ErrorClass::Connect,
        ErrorClass::FeatureNotSupported,
        ErrorClass::DataException,
        ErrorClass::IntegrityConstraintViolation,
        ErrorClass::InvalidTransactionState,
        ErrorClass::InvalidAuthorization,
        ErrorClass::InvalidCatalogName,
        ErrorClass::TransactionRollback,
        ErrorClass::SyntaxErrorOrAccessRuleViolation,
        ErrorClass::InsufficientResources,
        ErrorClass::ProgramLimitExceeded,
        ErrorClass::ObjectNotInPrerequisiteState,
        ErrorClass::OperatorIntervention,
        ErrorClass::PlpgsqlError,
        ErrorClass::InternalError,
        ErrorClass::OtherServerError,
        ErrorClass::Client,
    ];

    /// The class of a statement's error.
    pub fn of(e: &tokio_postgres::Error) -> ErrorClass {
        if let Some(code) = e.code() {
            return ErrorClass::of_sqlstate(code.code());
        }
        if is_disconnect(e) {
            ErrorClass::Connection
        } else {
            ErrorClass::Client
        }
    }

    /// The class of a SQLSTATE code such as `"23505"`.
    pub fn of_sqlstate(code: &str) -> ErrorClass {
        match code.get(..2).unwrap_or("") {
            "08" => ErrorClass::Connection,
            "0A" => ErrorClass::FeatureNotSupported,
            "22" => ErrorClass::DataException,
            "23" => ErrorClass::IntegrityConstraintViolation,
            "25" => ErrorClass::InvalidTransactionState,
            "28" => ErrorClass::InvalidAuthorization,
            "3D" => ErrorClass::InvalidCatalogName,
            "40" => ErrorClass::TransactionRollback,
            "42" => ErrorClass::SyntaxErrorOrAccessRuleViolation,
            "53" => ErrorClass::InsufficientResources,
            "54" => ErrorClass::ProgramLimitExceeded,
            "55" => ErrorClass::ObjectNotInPrerequisiteState,
            // 57P01..57P03: the backend is going away, which is a lost connection to the caller.
            "57" if code.starts_with("57P") => ErrorClass::Connection,
            "57" => ErrorClass::OperatorIntervention,
            "P0" => ErrorClass::PlpgsqlError,
            "XX" => ErrorClass::InternalError,
            _ => ErrorClass::OtherServerError,
        }
    }

    /// The label value, e.g. `integrity_constraint_violation`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Connection => "connection",
            ErrorClass::Connect => "connect",
            ErrorClass::FeatureNotSupported => "feature_not_supported",
            ErrorClass::DataException => "data_exception",
            ErrorClass::IntegrityConstraintViolation => "integrity_constraint_violation",
            ErrorClass::InvalidTransactionState => "invalid_transaction_state",
            ErrorClass::InvalidAuthorization => "invalid_authorization_specification",
            ErrorClass::InvalidCatalogName => "invalid_catalog_name",
            ErrorClass::TransactionRollback => "transaction_rollback",
            ErrorClass::SyntaxErrorOrAccessRuleViolation => "syntax_error_or_access_rule_violation",
            ErrorClass::InsufficientResources => "insufficient_resources",
            ErrorClass::ProgramLimitExceeded => "program_limit_exceeded",
            ErrorClass::ObjectNotInPrerequisiteState => "object_not_in_prerequisite_state",
            ErrorClass::OperatorIntervention => "operator_intervention",
            ErrorClass::PlpgsqlError => "plpgsql_error",
            ErrorClass::InternalError => "internal_error",
            ErrorClass::OtherServerError => "other_server_error",
            ErrorClass::Client => "client",
        }
    }
}

/// A pool event for `DB_ECHO_POOL`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PoolEvent {
    Checkout,
    Checkin,
    Create,
    Close(CloseReason),
    Invalidate,
    Dispose,
}

/// The labels of one pool's series: `role="primary"`, or `role="replica"` and `host`.
pub(crate) type PoolLabels = Vec<(&'static str, String)>;

/// `base` plus one more label, as the metrics macros take them.
fn labels_with(
    base: &[(&'static str, String)],
    more: Option<(&'static str, &'static str)>,
) -> Vec<metrics::Label> {
    let mut labels: Vec<metrics::Label> = base
        .iter()
        .map(|(k, v)| metrics::Label::new(*k, v.clone()))
        .collect();
    if let Some((k, v)) = more {
        labels.push(metrics::Label::new(k, v));
    }
    labels
}

impl Instrument {
    /// The instrumentation of one pool, its series labelled with `labels`.
    pub(crate) fn new(settings: &Settings, labels: &[(&'static str, String)]) -> Self {
        let errors = ErrorClass::ALL.map(|class| {
            metrics::counter!(ERRORS, labels_with(labels, Some(("class", class.as_str()))))
        });
        Instrument {
            echo: settings.echo,
            echo_pool: settings.echo_pool,
            explain: settings.slow_query_explain,
            slow: settings.slow_query_threshold,
            metrics: Arc::new(Metrics {
                query_duration: metrics::histogram!(QUERY_DURATION, labels_with(labels, None)),
                slow_queries: metrics::counter!(SLOW_QUERIES, labels_with(labels, None)),
                errors,
                pool_size: settings.pool_size as i64,
                open: AtomicI64::new(0),
            }),
        }
    }

    /// Called once per statement, after it finished (successfully or not).
    #[inline]
    pub(crate) fn statement(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        elapsed: Duration,
        error: Option<&tokio_postgres::Error>,
    ) {
        self.metrics.query_duration.record(elapsed.as_secs_f64());
        if let Some(e) = error {
            self.metrics.errors[ErrorClass::of(e) as usize].increment(1);
        }
        if self.echo {
            echo(sql, params, elapsed, error);
        }
        if elapsed > self.slow {
            self.metrics.slow_queries.increment(1);
            slow(sql, elapsed, self.slow);
        }
    }

    /// Whether the statement that started at `started` (and failed or not) should have its plan
    /// logged: `DB_SLOW_QUERY_EXPLAIN` is on, it succeeded and it was slow. One flag test when
    /// the setting is off.
    #[inline]
    pub(crate) fn explain_due(&self, started: Instant, failed: bool) -> bool {
        self.explain && !failed && started.elapsed() > self.slow
    }

    /// A connection attempt failed: counted under [`ErrorClass::Connect`] and, with
    /// `DB_ECHO_POOL`, logged.
    pub(crate) fn connect_failed(&self, error: &ConnectError) {
        self.metrics.errors[ErrorClass::Connect as usize].increment(1);
        if self.echo_pool {
            tracing::debug!(target: POOL_TARGET, error = %error, "connection attempt failed");
        }
    }

    /// Logs a pool event: routine ones at DEBUG, invalidation, recycling and disposal at INFO.
    #[inline]
    pub(crate) fn pool_event(&self, event: PoolEvent, connection: u64) {
        if self.echo_pool {
            let open = &self.metrics.open;
            let now_open = match event {
                PoolEvent::Create => open.fetch_add(1, Ordering::Relaxed) + 1,
                PoolEvent::Close(_) => open.fetch_sub(1, Ordering::Relaxed) - 1,
                _ => open.load(Ordering::Relaxed),
            };
            pool_event(event, connection, now_open - self.metrics.pool_size);
        }
    }
}

#[cold]
fn echo(
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    elapsed: Duration,
    error: Option<&tokio_postgres::Error>,
) {
    let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
    match error {
        None => tracing::info!(target: SQL_TARGET, sql, ?params, elapsed_ms, "statement"),
        Some(e) => {
            tracing::info!(target: SQL_TARGET, sql, ?params, elapsed_ms, error = %ShowError(e), "statement failed")
        }
    }
}

#[cold]
fn slow(sql: &str, elapsed: Duration, threshold: Duration) {
    // The seed's record: `int(seconds * 1000)` for both figures.
    tracing::warn!(
        target: SQL_TARGET,
        query = sql,
        duration_ms = elapsed.as_millis() as u64,
        threshold_ms = threshold.as_millis() as u64,
        "Slow query detected"
    );
}

#[cold]
/// Logs a pool event; `overflow` is SQLAlchemy's figure after it (open connections minus
/// `pool_size`).
fn pool_event(event: PoolEvent, connection: u64, overflow: i64) {
    match event {
        PoolEvent::Checkout => {
            tracing::debug!(target: POOL_TARGET, connection, "checked out from pool")
        }
        PoolEvent::Checkin => {
            tracing::debug!(target: POOL_TARGET, connection, "being returned to pool")
        }
        PoolEvent::Create if overflow > 0 => tracing::debug!(
            target: POOL_TARGET,
            connection,
            overflow,
            "created overflow connection (beyond pool_size)"
        ),
        PoolEvent::Create => {
            tracing::debug!(target: POOL_TARGET, connection, overflow, "created new connection")
        }
        PoolEvent::Close(
            reason @ (CloseReason::Recycled
            | CloseReason::Invalidated
            | CloseReason::Disposed
            | CloseReason::Idle),
        ) => {
            tracing::info!(target: POOL_TARGET, connection, reason = reason.as_str(), "closed")
        }
        PoolEvent::Close(CloseReason::Overflow) => tracing::debug!(
            target: POOL_TARGET,
            connection,
            reason = "overflow",
            "closed (overflow: pool_size connections already idle)"
        ),
        PoolEvent::Close(reason) => {
            tracing::debug!(target: POOL_TARGET, connection, reason = reason.as_str(), "closed")
        }
        PoolEvent::Invalidate => tracing::info!(
            target: POOL_TARGET,
            connection,
            "invalidated: disconnect seen, connections opened before now will be replaced"
        ),
        PoolEvent::Dispose => tracing::info!(target: POOL_TARGET, "pool disposed"),
    }
}

/// Whether a statement starting with `keyword` can be given to `EXPLAIN`.
pub(crate) fn explainable(keyword: &str) -> bool {
    const WORDS: [&str; 8] = [
        "select", "insert", "update", "delete", "merge", "values", "with", "table",
    ];
    WORDS.iter().any(|w| keyword.eq_ignore_ascii_case(w))
}

/// Logs the plan of a slow statement (`EXPLAIN`, never `ANALYZE`: nothing runs twice) on the
/// connection that ran it, with the same parameters and types, as one unnamed statement. Returns
/// false when the server did not answer within [`EXPLAIN_LIMIT`]: the caller must then treat the
/// connection as interrupted.
pub(crate) async fn explain(
    client: &Client,
    sql: &str,
    types: &[Type],
    params: &[&(dyn ToSql + Sync)],
) -> bool {
    if types.len() != params.len() {
        return true;
    }
    let typed: Vec<(&(dyn ToSql + Sync), Type)> =
        params.iter().copied().zip(types.iter().cloned()).collect();
    explain_typed(client, sql, &typed).await
}

/// [`explain`] with the parameters as sent, each with the type it was declared as (the
/// unnamed statements of a pool without statement cache).
pub(crate) async fn explain_typed(
    client: &Client,
    sql: &str,
    typed: &[(&(dyn ToSql + Sync), Type)],
) -> bool {
    let text = format!("EXPLAIN {sql}");
    match tokio::time::timeout(EXPLAIN_LIMIT, client.query_typed(&text, typed)).await {
        Ok(Ok(rows)) => {
            let plan = rows
                .iter()
                .filter_map(|row| row.try_get::<_, &str>(0).ok())
                .collect::<Vec<_>>()
                .join("\n");
            tracing::warn!(target: SQL_TARGET, query = sql, plan = %plan, "Slow query plan");
            true
        }
        Ok(Err(e)) => {
            tracing::warn!(target: SQL_TARGET, query = sql, error = %ShowError(&e), "Slow query plan unavailable");
            true
        }
        Err(_) => {
            tracing::warn!(
                target: SQL_TARGET,
                query = sql,
                "Slow query plan unavailable: EXPLAIN timed out"
            );
            false
        }
    }
}

/// The checkout wait histogram's handle ([`CHECKOUT_WAIT`]), registered once per pool.
pub(crate) fn checkout_wait_histogram(labels: &[(&'static str, String)]) -> Histogram {
    metrics::histogram!(CHECKOUT_WAIT, labels_with(labels, None))
}

/// Publishes `pool`'s figures ([`Pool::status`]) as gauges and counters: call it before each
/// scrape, or periodically for push-based recorders.
pub fn record_pool_metrics(pool: &Pool) {
    pool.read().refresh();
    record_status(&pool.status());
}

/// Publishes figures already taken with [`Pool::status`]; see [`record_pool_metrics`]. The
/// primary's series carry `role="primary"`; each read replica's the same series with
/// `role="replica"` and `host`, plus [`REPLICA_UP`] and [`REPLICA_LAG`].
pub fn record_status(status: &Status) {
    record_figures(status, &[("role", "primary".to_owned())]);
    for replica in &status.replicas {
        let labels = [
            ("role", "replica".to_owned()),
            ("host", replica.host.clone()),
        ];
        record_figures(&replica.pool, &labels);
        let up = matches!(replica.state, crate::stats::ReplicaState::Up);
        metrics::gauge!(REPLICA_UP, &labels[1..]).set(if up { 1.0 } else { 0.0 });
        if let Some(lag) = replica.lag_seconds {
            metrics::gauge!(REPLICA_LAG, &labels[1..]).set(lag);
        }
    }
}

/// One pool's series, with `base` labels (`role`, and `host` for a replica).
fn record_figures(status: &Status, base: &[(&'static str, String)]) {
    let with = |name: &'static str, value: &'static str| labels_with(base, Some((name, value)));
    metrics::gauge!(CONNECTIONS, with("state", "idle")).set(status.checked_in as f64);
    metrics::gauge!(CONNECTIONS, with("state", "in_use")).set(status.checked_out as f64);
    metrics::gauge!(CONNECTIONS_OPEN, base).set(status.total_connections as f64);
    metrics::gauge!(POOL_SIZE, base).set(status.pool_size as f64);
    metrics::gauge!(MAX_OVERFLOW, base).set(status.max_overflow as f64);
    metrics::gauge!(OVERFLOW, base).set(status.overflow as f64);
    metrics::gauge!(WAITING, base).set(status.waiting as f64);
    metrics::counter!(TIMEOUTS, base).absolute(status.timeouts);
    metrics::counter!(CONNECTIONS_CREATED, base).absolute(status.connections_created);
    let closed = &status.connections_closed;
    for reason in CloseReason::ALL {
        let n = match reason {
            CloseReason::Overflow => closed.overflow,
            CloseReason::Broken => closed.broken,
            CloseReason::Invalidated => closed.invalidated,
            CloseReason::Recycled => closed.recycled,
            CloseReason::PingFailed => closed.ping_failed,
            CloseReason::Cancelled => closed.cancelled,
            CloseReason::ResetFailed => closed.reset_failed,
            CloseReason::Disposed => closed.disposed,
            CloseReason::Idle => closed.idle,
        };
        metrics::counter!(CONNECTIONS_CLOSED, with("reason", reason.as_str())).absolute(n);
    }
    metrics::counter!(PRE_PING_FAILURES, base).absolute(status.pre_ping_failures);
    metrics::counter!(INVALIDATIONS, base).absolute(status.invalidations);
    metrics::counter!(PIPELINED, base).absolute(status.pipelined_statements);
    metrics::counter!(CANCELLED_STATEMENTS, base).absolute(status.cancelled_statements);
    metrics::counter!(COMMAND_TIMEOUTS, base).absolute(status.command_timeouts);
    metrics::counter!(LEAKS_SUSPECTED, base).absolute(status.leaks_suspected);
}

/// Registers the help text and units of every tidepool metric with the installed recorder
/// (Prometheus `# HELP` lines). Call once, after installing it.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(
        QUERY_DURATION,
        Unit::Seconds,
        "Statement duration, successful or not."
    );
    describe_histogram!(
        CHECKOUT_WAIT,
        Unit::Seconds,
        "Time a checkout took to get a verified connection (pre-ping included)."
    );
    describe_counter!(
        SLOW_QUERIES,
        "Statements slower than DB_SLOW_QUERY_THRESHOLD."
    );
    describe_counter!(
        ERRORS,
        "Failed statements and connection attempts, by class."
    );
    describe_gauge!(
        CONNECTIONS,
        "Open connections by state (idle = checked in, in_use = checked out)."
    );
    describe_gauge!(CONNECTIONS_OPEN, "Open connections (pool_size + overflow).");
    describe_gauge!(POOL_SIZE, "The configured pool_size.");
    describe_gauge!(MAX_OVERFLOW, "The configured max_overflow (-1: no limit).");
    describe_gauge!(
        OVERFLOW,
        "Open connections minus pool_size (negative below it)."
    );
    describe_gauge!(WAITING, "Checkouts waiting for a connection.");
    describe_counter!(TIMEOUTS, "Checkouts that timed out after DB_POOL_TIMEOUT.");
    describe_counter!(CONNECTIONS_CREATED, "Connections opened.");
    describe_counter!(CONNECTIONS_CLOSED, "Connections closed, by reason.");
    describe_counter!(PRE_PING_FAILURES, "Pre-pings that found a dead connection.");
    describe_counter!(
        INVALIDATIONS,
        "Disconnects that invalidated older connections."
    );
    describe_counter!(
        PIPELINED,
        "Statements run on the pool that shared a busy connection."
    );
    describe_counter!(
        COMMAND_TIMEOUTS,
        "Statements that ran past DB_COMMAND_TIMEOUT and were cancelled on the server."
    );
    describe_gauge!(
        REPLICA_UP,
        "1 when reads go to the read replica (host), 0 while it is down or lagging."
    );
    describe_gauge!(
        REPLICA_LAG,
        Unit::Seconds,
        "The read replica's replay lag at the last measurement."
    );
    describe_counter!(
        CANCELLED_STATEMENTS,
        "Statements stopped on the server (cancel request) because their caller went away."
    );
    describe_counter!(
        LEAKS_SUSPECTED,
        "Checkouts held longer than DB_POOL_LEAK_THRESHOLD (possible leaks)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstate_classes() {
        assert_eq!(
            ErrorClass::of_sqlstate("23505"),
            ErrorClass::IntegrityConstraintViolation
        );
        assert_eq!(
            ErrorClass::of_sqlstate("40001"),
            ErrorClass::TransactionRollback
        );
        assert_eq!(
            ErrorClass::of_sqlstate("57014"),
            ErrorClass::OperatorIntervention
        );
        assert_eq!(ErrorClass::of_sqlstate("57P01"), ErrorClass::Connection);
        assert_eq!(
            ErrorClass::of_sqlstate("42601"),
            ErrorClass::SyntaxErrorOrAccessRuleViolation
        );
        assert_eq!(
            ErrorClass::of_sqlstate("ZZ000"),
            ErrorClass::OtherServerError
        );
        assert_eq!(ErrorClass::of_sqlstate(""), ErrorClass::OtherServerError);
        for (i, class) in ErrorClass::ALL.iter().enumerate() {
            assert_eq!(*class as usize, i, "ALL is in discriminant order");
        }
    }

    #[test]
    fn explainable_statements() {
        assert!(explainable("SELECT"));
        assert!(explainable("with"));
        assert!(!explainable("CREATE"));
        assert!(!explainable("EXPLAIN"));
        assert!(!explainable(""));
    }
}
