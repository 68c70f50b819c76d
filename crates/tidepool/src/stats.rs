//! The pool's figures: SQLAlchemy's (`size`, `checkedin`, `checkedout`, `overflow`) and ours
//! (waiting, timeouts, connections created and closed by reason, checkout wait percentiles).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

pub use crate::replica::ReplicaState;

/// Why the pool closed a connection; reported in pool events and counted in the figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum CloseReason {
    /// Returned while `pool_size` connections were already idle (a burst ended).
    Overflow = 0,
    /// The connection was found closed or failed with a disconnect.
    Broken,
    /// Opened before a disconnect was seen elsewhere, or before `dispose()`.
    Invalidated,
    /// Older than `DB_POOL_RECYCLE`.
    Recycled,
    /// Did not answer the pre-ping in time, or answered with an error.
    PingFailed,
    /// Its user was cancelled in the middle of a statement, and the server did not settle
    /// after the cancel request (connections that do settle are reused).
    Cancelled,
    /// Rolling back or discarding its state on return failed, or was not allowed.
    ResetFailed,
    /// Closed by `dispose()` or `close()`.
    Disposed,
    /// Idle longer than `DB_POOL_IDLE_TIMEOUT` while more than `DB_POOL_MIN_IDLE` were idle.
    Idle,
}

impl CloseReason {
    /// Every reason, in figure order.
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Overflow,
        CloseReason::Broken,
        CloseReason::Invalidated,
        CloseReason::Recycled,
        CloseReason::PingFailed,
        CloseReason::Cancelled,
        CloseReason::ResetFailed,
        CloseReason::Disposed,
        CloseReason::Idle,
    ];

    /// The reason as a short lowercase label (log field and metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Overflow => "overflow",
            CloseReason::Broken => "broken",
            CloseReason::Invalidated => "invalidated",
            CloseReason::Recycled => "recycled",
            CloseReason::PingFailed => "ping_failed",
            CloseReason::Cancelled => "cancelled",
            CloseReason::ResetFailed => "reset_failed",
            CloseReason::Disposed => "disposed",
            CloseReason::Idle => "idle",
        }
    }
}

/// Counters updated by the pool; read by [`Pool::status`](crate::Pool::status).
pub(crate) struct Stats {
    pub(crate) created: AtomicU64,
    closed: [AtomicU64; CloseReason::ALL.len()],
    pub(crate) timeouts: AtomicU64,
    pub(crate) ping_failures: AtomicU64,
    pub(crate) invalidations: AtomicU64,
    /// Statements stopped on the server with a cancel request because their caller went away.
    pub(crate) cancelled_statements: AtomicU64,
    /// Statements stopped because they ran past their command timeout.
    pub(crate) command_timeouts: AtomicU64,
    /// Checkouts served from the idle set without waiting or a round trip: their wait is zero,
    /// counted here so the common case never takes the histogram's lock.
    immediate: AtomicU64,
    /// Waits of the other checkouts, in microseconds.
    waits: Mutex<Histogram<u64>>,
    /// The `tidepool_checkout_wait_seconds` metric (a no-op handle without a recorder).
    wait_metric: metrics::Histogram,
}

impl Stats {
    /// Counters from zero; checkout waits are also recorded into `wait_metric` (the
    /// `tidepool_checkout_wait_seconds` histogram of the installed recorder).
    pub(crate) fn new(wait_metric: metrics::Histogram) -> Self {
        Stats {
            created: AtomicU64::new(0),
            closed: Default::default(),
            timeouts: AtomicU64::new(0),
            ping_failures: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            cancelled_statements: AtomicU64::new(0),
            command_timeouts: AtomicU64::new(0),
            immediate: AtomicU64::new(0),
            // 1 µs .. 1 h at 2 significant digits: a few kilobytes, allocated once.
            waits: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 2)
                    .expect("constant histogram bounds are valid"),
            ),
            wait_metric,
        }
    }

    pub(crate) fn closed(&self, reason: CloseReason) {
        self.closed[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn checkout_immediate(&self) {
        self.immediate.fetch_add(1, Ordering::Relaxed);
        self.wait_metric.record(0.0);
    }

    pub(crate) fn checkout_waited(&self, wait: Duration) {
        self.wait_metric.record(wait.as_secs_f64());
        let us = (wait.as_micros() as u64).clamp(1, 3_600_000_000);
        let mut h = self.waits.lock().unwrap_or_else(|e| e.into_inner());
        // Within bounds by the clamp above.
        let _ = h.record(us);
    }

    fn wait_percentiles(&self) -> WaitPercentiles {
        let immediate = self.immediate.load(Ordering::Relaxed);
        let h = self.waits.lock().unwrap_or_else(|e| e.into_inner());
        let total = immediate + h.len();
        let at = |q: f64| -> f64 {
            if total == 0 {
                return 0.0;
            }
            // The q-th checkout in wait order; the first `immediate` ones waited zero.
            let rank = (q * total as f64).ceil() as u64;
            if rank <= immediate {
                return 0.0;
            }
            let q_in_hist = (rank - immediate) as f64 / h.len() as f64;
            h.value_at_quantile(q_in_hist.min(1.0)) as f64 / 1000.0
        };
        WaitPercentiles {
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
        }
    }

    pub(crate) fn snapshot(&self) -> (u64, ClosedCounts, u64, u64, u64, WaitPercentiles) {
        let c = |r: CloseReason| self.closed[r as usize].load(Ordering::Relaxed);
        (
            self.created.load(Ordering::Relaxed),
            ClosedCounts {
                overflow: c(CloseReason::Overflow),
                broken: c(CloseReason::Broken),
                invalidated: c(CloseReason::Invalidated),
                recycled: c(CloseReason::Recycled),
                ping_failed: c(CloseReason::PingFailed),
                cancelled: c(CloseReason::Cancelled),
                reset_failed: c(CloseReason::ResetFailed),
                disposed: c(CloseReason::Disposed),
                idle: c(CloseReason::Idle),
            },
            self.timeouts.load(Ordering::Relaxed),
            self.ping_failures.load(Ordering::Relaxed),
            self.invalidations.load(Ordering::Relaxed),
            self.wait_percentiles(),
        )
    }
}

/// Connections closed since the pool started, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClosedCounts {
    /// Returned while `pool_size` were idle: the end of a burst.
    pub overflow: u64,
    /// Found closed, or failed with a disconnect.
    pub broken: u64,
    /// Opened before a disconnect was seen or before `dispose()`.
    pub invalidated: u64,
    /// Older than `DB_POOL_RECYCLE`.
    pub recycled: u64,
    /// Failed the pre-ping.
    pub ping_failed: u64,
    /// Their user was cancelled mid-statement and the server did not settle after the cancel
    /// request (or the pool was interrupted while verifying them).
    pub cancelled: u64,
    /// Could not be cleaned on return.
    pub reset_failed: u64,
    /// Closed by `dispose()` or `close()`.
    pub disposed: u64,
    /// Idle past `DB_POOL_IDLE_TIMEOUT`.
    pub idle: u64,
}

impl ClosedCounts {
    /// All reasons together.
    pub fn total(&self) -> u64 {
        self.overflow
            + self.broken
            + self.invalidated
            + self.recycled
            + self.ping_failed
            + self.cancelled
            + self.reset_failed
            + self.disposed
            + self.idle
    }
}

/// Checkout wait percentiles in milliseconds, since the pool started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct WaitPercentiles {
    /// Median wait.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// A consistent snapshot of the pool. The first five fields are SQLAlchemy's, with its meanings,
/// as the seed's `/health/database` reports them; `checked_in + checked_out == total_connections
/// == pool_size + overflow` always holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// The configured `pool_size` (SQLAlchemy's `size()`).
    pub pool_size: usize,
    /// Idle connections in the pool.
    pub checked_in: usize,
    /// Connections in use, being opened, or being cleaned after return.
    pub checked_out: usize,
    /// Open connections minus `pool_size`: negative while below it (SQLAlchemy's `overflow()`).
    pub overflow: i64,
    /// Open connections (`pool_size + overflow`).
    pub total_connections: usize,
    /// The configured `max_overflow`; -1 for no limit.
    pub max_overflow: i64,
    /// Checkouts waiting for a connection now.
    pub waiting: usize,
    /// Checkouts that timed out since the pool started.
    pub timeouts: u64,
    /// Connections opened since the pool started.
    pub connections_created: u64,
    /// Connections closed since the pool started, by reason.
    pub connections_closed: ClosedCounts,
    /// Pre-pings that found a dead connection.
    pub pre_ping_failures: u64,
    /// Times a disconnect invalidated the connections opened before it.
    pub invalidations: u64,
    /// How long checkouts waited, in milliseconds.
    pub checkout_wait_ms: WaitPercentiles,
    /// Statements run on the pool ([`Pool::execute`](crate::Pool::execute) and friends) that
    /// shared a busy connection, pipelined, instead of waiting for one.
    pub pipelined_statements: u64,
    /// Statements whose caller went away mid-flight (a dropped future), stopped on the server
    /// with a cancel request; their connections are reused once the server is ready again.
    pub cancelled_statements: u64,
    /// Statements that ran past their command timeout (`DB_COMMAND_TIMEOUT`) and were stopped
    /// on the server; not counted in `timeouts`, which are checkouts.
    pub command_timeouts: u64,
    /// The pool's `LISTEN` connection ([`Pool::listener`](crate::Pool::listener)): 1 while it
    /// is open, else 0. Opened outside `pool_size`, and counted here, not in the figures above.
    pub listener_connections: usize,
    /// Checkouts held longer than `DB_POOL_LEAK_THRESHOLD` since the pool started (each
    /// counted once, when first seen past it); 0 when leak detection is off.
    pub leaks_suspected: u64,
    /// With `DB_POOL_LEAK_THRESHOLD` set: the oldest checkouts held now (up to 5), oldest
    /// first, with where they were checked out; empty (and left out of JSON) when leak
    /// detection is off or nothing is checked out.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub longest_checkouts: Vec<Checkout>,
    /// The read replicas (`DATABASE_REPLICA_URL`), each with its own pool's figures; empty
    /// (and left out of JSON) without replicas.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaStatus>,
}

/// One connection held by its user, in [`Status::longest_checkouts`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Checkout {
    /// The connection's id ([`PooledConnection::id`](crate::PooledConnection::id)).
    pub id: u64,
    /// Where it was checked out: `file:line:column` of the call to
    /// [`Pool::get`](crate::Pool::get) (or [`Pool::run`](crate::Pool::run) and friends).
    pub location: String,
    /// How long it has been held, in seconds.
    pub held_s: f64,
}

/// One read replica in [`Status::replicas`]: where it is, whether reads go to it, how far
/// behind it is, and its pool's figures (the same fields as the primary's, flattened in JSON).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaStatus {
    /// `host:port` as the URL gives it.
    pub host: String,
    /// `up` (reads go to it), `lagging` or `down`.
    pub state: ReplicaState,
    /// Replay lag in seconds at the last measurement; `None` before the first.
    pub lag_seconds: Option<f64>,
    /// Why it is lagging or down.
    pub reason: Option<String>,
    /// Its pool's figures.
    #[serde(flatten)]
    pub pool: Box<Status>,
}
