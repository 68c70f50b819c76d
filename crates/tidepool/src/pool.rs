//! The pool: checkout with pre-ping, recycle and invalidation; return with reset; dispose and
//! close; figures. Capacity and waiting are the core's job ([`crate::core`]); this module decides
//! what a connection must go through on its way out and back.

use std::future::Future;
use std::panic::Location;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::connect::{Connector, Opened};
use crate::connection::{Conn, ConnInner, Meta, PooledConnection};
use crate::core::{Availability, Core, Grant, Order};
use crate::error::{ConnectError, ConnectErrorKind, Error, TimeoutError};
use crate::init::{Failed, SetUp, SetUpError};
use crate::instrument::{CloseReason, Instrument, PoolEvent, PoolLabels};
use crate::leak::Leaks;
use crate::maintain::Plan;
use crate::pipeline::Lanes;
use crate::replica::Replicas;
use crate::settings::{
    DatabaseUrl, ResetOnReturn, Settings, SettingsError, MAX_CONNECTIONS, MAX_SECONDS,
};
use crate::stats::{ReplicaStatus, Stats, Status};
use crate::timer::WaitTimer;

/// Longest a pre-ping, a reset or a cancel request may take before the connection is given up.
const MAX_ROUND_TRIP: Duration = Duration::from_secs(2);

/// After a user went away mid-statement: how often the cancel request is repeated while the
/// server has not answered the round trip queued behind the statement (each request stops the
/// statement running at that moment, so a queue of abandoned pipelined statements is stopped
/// one after another).
const CANCEL_REPEAT: Duration = Duration::from_millis(250);

/// Whether sessions on a server start read-only now: it is in recovery, or
/// `default_transaction_read_only` is on from its configuration (not from a session's own
/// `SET`, nor a `READ ONLY` transaction). Rolls back first, so it also works on a connection
/// whose transaction the refusal aborted.
const READ_ONLY_CHECK: &str = "ROLLBACK; SELECT pg_catalog.pg_is_in_recovery() \
     OR (setting = 'on' AND source <> 'session') \
     FROM pg_catalog.pg_settings WHERE name = 'default_transaction_read_only'";

/// [`READ_ONLY_CHECK`] on a client.
async fn server_read_only(client: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
    let rows = client.simple_query(READ_ONLY_CHECK).await?;
    Ok(rows
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("t"))))
}

/// `max_overflow` from `pool_size` and the core's capacity (`None`: no limit).
fn overflow_of(pool_size: usize, capacity: usize) -> Option<usize> {
    (capacity != usize::MAX).then(|| capacity.saturating_sub(pool_size))
}

/// A reset step failed: the connection is closed rather than reused.
struct ResetFailed;

impl From<tokio_postgres::Error> for ResetFailed {
    fn from(_: tokio_postgres::Error) -> Self {
        ResetFailed
    }
}

/// Fraction of `DB_POOL_RECYCLE` by which a connection's age limit is shortened at random, so
/// connections opened together are not all replaced together.
const RECYCLE_JITTER: f64 = 0.1;

/// A pool of PostgreSQL connections with SQLAlchemy QueuePool semantics. Cheap to clone: clones
/// share one pool.
///
/// * At most `pool_size + max_overflow` connections are open; they are opened on demand.
/// * A checkout that finds nothing free waits in FIFO order up to `DB_POOL_TIMEOUT`; a connection
///   returned meanwhile goes straight to the longest waiter.
/// * A returned connection stays idle unless `pool_size` are idle already; then it is closed.
/// * Checkout verifies the connection (pre-ping: a round trip, unless the server answered on it
///   within `DB_POOL_PRE_PING_WINDOW`), replaces it if it is dead, too old
///   (`DB_POOL_RECYCLE`) or older than a disconnect the pool has seen.
/// * Every future is cancel-safe: dropping it never leaks a connection or capacity, and the next
///   user never receives an open transaction or a connection interrupted mid-statement.
///
/// # Statements on the pool
///
/// [`Pool::query`], [`Pool::query_one`], [`Pool::query_opt`] and [`Pool::execute`] run one
/// statement in autocommit mode without holding a connection. They take a free connection while
/// there is one. When every connection is checked out and no checkout waits, they share
/// connections already running such statements, pipelined (PgBouncer's statement mode): more
/// statements in flight than connections, each answered or failed on its own. A statement that
/// shares a connection and whose turn has not come within `DB_POOL_TIMEOUT` fails with
/// [`Error::Timeout`] (and is cancelled should its turn come later). A statement that may open a
/// transaction (`BEGIN`, `START`) or change session state (`SET`, `LISTEN`, temporary tables,
/// session advisory locks, ...) gets a connection of its own, which is rolled back or reset
/// (`DISCARD ALL`) before anyone else uses it. Checkouts keep their FIFO turn: while one waits,
/// statements wait with it.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
    /// The read replicas' pools (`DATABASE_REPLICA_URL`), for [`Pool::read`].
    pub(crate) replicas: Option<Arc<Replicas<Pool>>>,
}

/// State shared by the pool handles and every checked-out connection.
pub(crate) struct Shared {
    pub(crate) core: Core<Conn>,
    /// Connections shared by statements run on the pool ([`crate::pipeline`]).
    pub(crate) lanes: Lanes,
    /// Times out waiting checkouts ([`crate::timer`]).
    timer: Arc<WaitTimer>,
    connector: Connector,
    pub(crate) instrument: Instrument,
    pub(crate) stats: Arc<Stats>,
    pub(crate) statement_cache: bool,
    pre_ping: bool,
    /// `DB_POOL_PRE_PING_WINDOW` in clock ticks: an answer this recent makes the ping redundant.
    pre_ping_window: u64,
    recycle: Option<Duration>,
    pool_timeout: Duration,
    /// `pool_timeout` in clock ticks ([`Shared::ticks`]).
    pool_timeout_ticks: u64,
    pub(crate) round_trip_limit: Duration,
    /// `DB_COMMAND_TIMEOUT`: the default bound of every statement.
    pub(crate) command_timeout: Option<Duration>,
    /// `DB_CONNECT_INIT_SQL` and the `on_connect` hook, for every new connection.
    set_up: SetUp,
    /// What the maintenance task does ([`crate::maintain`]); `None`: no task.
    pub(crate) maintenance: Option<Plan>,
    /// The maintenance task was started.
    pub(crate) maintaining: AtomicBool,
    /// The `LISTEN` connection and its listeners ([`crate::listen`]), once one was asked for.
    pub(crate) listener: std::sync::OnceLock<Arc<crate::listen::Hub>>,
    reset: ResetOnReturn,
    /// Connections opened in an earlier generation are stale.
    generation: AtomicU64,
    /// `target_session_attrs` is `read-write` or `primary`: a connection that finds its server
    /// read-only (`25006`), or a failed connect, replaces every connection, so the pool
    /// follows a promoted standby (DESIGN §7).
    pub(crate) follows_primary: bool,
    /// A read replica's pool: a failed connect is returned at once, however transient, so the
    /// read goes elsewhere rather than waiting out `DB_POOL_TIMEOUT` ([`crate::read`]).
    fail_fast: bool,
    /// Moves on when a connection sees a migration invalidate a cached statement (`0A000`):
    /// every connection's statement cache is cleared before its next statement, so one
    /// connection's failure spares the others ([`crate::connection`]).
    pub(crate) statement_epoch: AtomicU64,
    next_id: AtomicU64,
    /// Zero of the pool's clock ([`Shared::ticks`]).
    epoch: Instant,
    /// Why the last attempt to open a connection failed (cleared by a success); reported by
    /// checkouts that time out meanwhile.
    last_connect_error: Mutex<Option<ConnectError>>,
    /// `DB_POOL_LEAK_THRESHOLD`'s leak detection ([`crate::leak`]); `None` when off.
    leaks: Option<Leaks>,
    pub(crate) settings: Settings,
}

impl Pool {
    /// A pool over `settings.database_url`, with a pool per read replica when
    /// `settings.replica_url` is set ([`Pool::read`]). Opens no connection yet (see
    /// [`Pool::warm_up`]).
    pub fn new(settings: Settings) -> Result<Pool, Error> {
        let settings = checked(settings)?;
        let Some(url) = settings.database_url.clone() else {
            return Err(Error::Settings(SettingsError::Invalid {
                variable: "DATABASE_URL".into(),
                value: String::new(),
                expected: "a PostgreSQL URL such as postgresql://user:password@host:5432/dbname"
                    .into(),
            }));
        };
        let replicas = match &settings.replica_url {
            Some(replica_url) => Some(Arc::new(replica_pools(&settings, replica_url)?)),
            None => None,
        };
        let connector = Connector::new(&url, &settings, None)?;
        Ok(Pool {
            shared: Shared::build(settings, connector, false, primary_labels()),
            replicas,
        })
    }

    /// One small pool per server `settings` names: each host of `DATABASE_URL`, then each of
    /// `DATABASE_REPLICA_URL`, with the host (`host:port`) and whether it is a replica. Each
    /// connects to its host only, whatever `target_session_attrs` says, and fails at once when
    /// the host cannot be reached: for tools that check every server (`tidepool doctor`).
    pub fn per_host(settings: Settings) -> Result<Vec<(String, bool, Pool)>, Error> {
        let settings = checked(settings)?;
        let mut pools = Vec::new();
        let urls = [
            (settings.database_url.clone(), false),
            (settings.replica_url.clone(), true),
        ];
        for (url, replica) in urls {
            let Some(url) = url else { continue };
            let one = Settings {
                database_url: Some(url.clone()),
                replica_url: None,
                ..settings.clone()
            };
            for i in 0..crate::connect::host_count(&url) {
                let connector = Connector::new(&url, &one, Some(i))?.any_server();
                pools.push((
                    crate::connect::describe_host(url.config(), i),
                    replica,
                    Pool {
                        shared: Shared::build(one.clone(), connector, true, primary_labels()),
                        replicas: None,
                    },
                ));
            }
        }
        Ok(pools)
    }

    /// A pool from the process environment and `.env` (see [`Settings::from_env`]).
    pub fn from_env() -> Result<Pool, Error> {
        Pool::new(Settings::from_env()?)
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The settings the pool was built with.
    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// Checks out a connection, waiting up to `DB_POOL_TIMEOUT`.
    ///
    /// Fails with [`Error::Timeout`] (SQLAlchemy's message, plus the last connection error when
    /// opening connections is what failed), at once with [`Error::Connect`] when the server
    /// rejects the credentials or the database, or with [`Error::Closed`] after
    /// [`Pool::close`].
    ///
    /// With `DB_POOL_LEAK_THRESHOLD` set, the caller's location is what a leak report names.
    #[track_caller]
    pub fn get(&self) -> impl Future<Output = Result<PooledConnection, Error>> + Send + '_ {
        self.get_at(Some(Location::caller()))
    }

    /// [`Pool::get`] on behalf of the code at `location`, or (`None`) for the pool itself,
    /// which leak detection leaves out.
    pub(crate) async fn get_at(
        &self,
        location: Option<&'static Location<'static>>,
    ) -> Result<PooledConnection, Error> {
        let conn = self.shared.checkout().await?;
        Ok(PooledConnection::new(conn, self.shared.clone(), location))
    }

    /// Opens connections until `pool_size` are open, on the primary and on each read replica,
    /// so the first requests do not pay for connecting. Returns how many it opened. A replica
    /// that cannot be reached is marked down rather than failing the call.
    pub async fn warm_up(&self) -> Result<usize, Error> {
        let shared = &self.shared;
        // Opened connections join the pool when this is dropped, even if the future is.
        let mut batch = Batch {
            shared,
            conns: Vec::new(),
        };
        while shared.core.try_reserve(shared.pool_size()) {
            let mut held = Held {
                shared,
                conn: None,
                slot: true,
            };
            let conn = shared.open(shared.settings.connect_timeout).await?;
            batch.conns.push(held.hand_out(conn));
        }
        let mut opened = batch.conns.len();
        drop(batch);
        // Each replica's pool too; one that cannot be reached is marked down (reads go
        // elsewhere, and it is probed back in), not an error of the whole pool.
        if let Some(replicas) = &self.replicas {
            for (i, replica) in replicas.members.iter().enumerate() {
                match Box::pin(replica.pool.warm_up()).await {
                    Ok(n) => opened += n,
                    Err(e) => {
                        replicas.failed(i, e.to_string());
                    }
                }
            }
        }
        Ok(opened)
    }

    /// Closes idle connections now and checked-out ones when they come back; the pool stays
    /// usable and opens fresh connections afterwards (SQLAlchemy's `dispose()`, without its
    /// orphaned connections).
    pub fn dispose(&self) {
        let shared = &self.shared;
        shared.generation.fetch_add(1, Ordering::AcqRel);
        shared.instrument.pool_event(PoolEvent::Dispose, 0);
        for conn in shared.core.drain_idle() {
            shared.discard(conn, CloseReason::Disposed);
        }
        for replica in self.replicas.iter().flat_map(|r| &r.members) {
            replica.pool.dispose();
        }
    }

    /// Closes the pool for good: idle connections now, checked-out ones when they come back.
    /// Waiting and later checkouts fail with [`Error::Closed`].
    pub fn close(&self) {
        let shared = &self.shared;
        for conn in shared.core.close() {
            shared.discard(conn, CloseReason::Disposed);
        }
        // The listening connection goes too; its task sees the pool closed and ends.
        if let Some(hub) = shared.listener.get() {
            hub.close();
        }
        for replica in self.replicas.iter().flat_map(|r| &r.members) {
            replica.pool.close();
        }
    }

    /// Changes `pool_size` and `max_overflow` (`None`: no limit) while the pool runs, as
    /// `DB_POOL_SIZE`/`DB_MAX_OVERFLOW` would. Idle connections beyond the new `pool_size` are
    /// closed now; a checked-out one is never taken away: past a lowered limit, connections
    /// are closed as they come back. Checkouts waiting get the room a raised limit makes.
    /// Read replicas keep their own sizes.
    pub fn resize(&self, pool_size: usize, max_overflow: Option<usize>) -> Result<(), Error> {
        let sized = checked(Settings {
            pool_size,
            max_overflow,
            min_idle: 0,
            ..Settings::default()
        })?;
        let capacity = sized.capacity().unwrap_or(usize::MAX);
        let shared = &self.shared;
        for conn in shared.core.resize(pool_size, capacity) {
            shared.discard(conn, CloseReason::Overflow);
        }
        Ok(())
    }

    /// Waits up to `timeout` for every checked-out connection to come back, then closes the
    /// pool ([`Pool::close`]): for a graceful shutdown, where requests in flight finish on
    /// their connections. Returns whether every one came back in time. New checkouts meanwhile
    /// still work; call it once nothing new should start.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        let drained = loop {
            let counts = self.shared.core.counts();
            if counts.open == counts.idle {
                break true;
            }
            if tokio::time::Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(
                pause.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
            )
            .await;
            pause = (pause * 2).min(Duration::from_millis(50));
        };
        self.close();
        drained
    }

    /// Whether [`Pool::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.shared.core.is_closed()
    }

    /// After a statement was refused as read-only (`25006`) on a pool that follows the
    /// primary: whether the server itself turned read-only (rather than the user's own
    /// transaction being read-only). If so, every connection is replaced. A checkout that
    /// fails to find a server taking writes counts as yes: a failover is under way.
    pub(crate) async fn turned_read_only(&self) -> bool {
        let check = async {
            let conn = self.get_at(None).await?;
            // Through the raw client: the check rolls back, which the return then repeats.
            Ok::<bool, Error>(server_read_only(conn.client()).await?)
        };
        match tokio::time::timeout(self.shared.pool_timeout, check).await {
            Ok(Ok(true)) => {
                let shared = &self.shared;
                shared.invalidate_generation(shared.generation.load(Ordering::Acquire), 0);
                true
            }
            Ok(Ok(false)) => false,
            Ok(Err(Error::Connect(_) | Error::Timeout(_))) | Err(_) => true,
            Ok(Err(e)) => e.is_disconnect(),
        }
    }

    /// Why the last attempt to open a connection failed, unless one succeeded since.
    #[cfg(feature = "axum")]
    pub(crate) fn last_connect_error(&self) -> Option<ConnectError> {
        self.shared
            .last_connect_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How busy the pool is, from 0 (nothing checked out) up: connections in use plus
    /// checkouts waiting, over the pool's capacity. Picks the least busy replica.
    pub(crate) fn load(&self) -> f64 {
        let shared = &self.shared;
        let counts = shared.core.counts();
        let capacity = counts.capacity.min(counts.pool_size.max(1) * 1000);
        (counts.open - counts.idle + counts.waiting) as f64 / capacity.max(1) as f64
    }

    /// Whether the pool follows the primary across a failover (`target_session_attrs` is
    /// `read-write` or `primary`; see [`Pool`]).
    pub(crate) fn follows_primary(&self) -> bool {
        self.shared.follows_primary
    }

    /// The pool's figures now.
    pub fn status(&self) -> Status {
        let shared = &self.shared;
        let counts = shared.core.counts();
        let (created, closed, timeouts, ping_failures, invalidations, waits) =
            shared.stats.snapshot();
        Status {
            pool_size: counts.pool_size,
            checked_in: counts.idle,
            checked_out: counts.open - counts.idle,
            overflow: counts.open as i64 - counts.pool_size as i64,
            total_connections: counts.open,
            max_overflow: overflow_of(counts.pool_size, counts.capacity).map_or(-1, |o| o as i64),
            waiting: counts.waiting,
            timeouts,
            connections_created: created,
            connections_closed: closed,
            pre_ping_failures: ping_failures,
            invalidations,
            checkout_wait_ms: waits,
            pipelined_statements: shared.lanes.joined(),
            cancelled_statements: shared.stats.cancelled_statements.load(Ordering::Relaxed),
            command_timeouts: shared.stats.command_timeouts.load(Ordering::Relaxed),
            listener_connections: shared
                .listener
                .get()
                .map_or(0, |hub| usize::from(hub.connected())),
            leaks_suspected: shared.leaks.as_ref().map_or(0, Leaks::suspected),
            longest_checkouts: shared.leaks.as_ref().map_or_else(Vec::new, |leaks| {
                leaks.longest(shared.ticks(Instant::now()))
            }),
            replicas: self.replica_status(),
        }
    }

    /// Each replica's host, state, lag and figures (empty without `DATABASE_REPLICA_URL`).
    fn replica_status(&self) -> Vec<ReplicaStatus> {
        let Some(replicas) = &self.replicas else {
            return Vec::new();
        };
        (0..replicas.members.len())
            .map(|i| {
                let member = &replicas.members[i];
                let health = replicas.snapshot(i);
                ReplicaStatus {
                    host: member.host.to_string(),
                    state: health.state,
                    lag_seconds: health.lag,
                    reason: health.why,
                    pool: Box::new(member.pool.status()),
                }
            })
            .collect()
    }
}

impl Shared {
    /// One single-server pool: the primary's, or one replica's.
    /// `labels`: the pool's metric labels (`role`, and `host` for a replica).
    fn build(
        settings: Settings,
        connector: Connector,
        fail_fast: bool,
        labels: PoolLabels,
    ) -> Arc<Shared> {
        let follows_primary = connector.follows_primary();
        let capacity = settings.capacity().unwrap_or(usize::MAX);
        let instrument = Instrument::new(&settings, &labels);
        let stats = Arc::new(Stats::new(crate::instrument::checkout_wait_histogram(
            &labels,
        )));
        let order = if settings.use_lifo {
            Order::Lifo
        } else {
            Order::Fifo
        };
        let close = {
            let (stats, instrument) = (stats.clone(), instrument.clone());
            Box::new(move |conn: Conn| {
                stats.closed(CloseReason::Overflow);
                instrument.pool_event(PoolEvent::Close(CloseReason::Overflow), conn.meta.id);
            })
        };
        let statement_cache = settings.statement_cache
            && settings
                .database_url
                .as_ref()
                .and_then(DatabaseUrl::statement_cache)
                != Some(false);
        let shared = Arc::new(Shared {
            core: Core::new(settings.pool_size, capacity, order, close),
            lanes: Lanes::new(capacity.min(settings.pool_size).min(64)),
            timer: WaitTimer::new(),
            connector,
            instrument,
            stats,
            statement_cache,
            pre_ping: settings.pre_ping,
            pre_ping_window: u64::try_from(settings.pre_ping_window.as_nanos()).unwrap_or(u64::MAX),
            recycle: settings.recycle,
            pool_timeout: settings.pool_timeout,
            pool_timeout_ticks: u64::try_from(settings.pool_timeout.as_nanos()).unwrap_or(u64::MAX),
            round_trip_limit: settings.connect_timeout.min(MAX_ROUND_TRIP),
            command_timeout: settings.command_timeout,
            maintenance: Plan::new(settings.idle_timeout, settings.keepalive, settings.min_idle),
            maintaining: AtomicBool::new(false),
            listener: std::sync::OnceLock::new(),
            set_up: SetUp::new(
                settings.connect_init_sql.as_deref(),
                settings.on_connect.clone(),
            ),
            reset: settings.reset_on_return,
            generation: AtomicU64::new(0),
            follows_primary,
            fail_fast,
            statement_epoch: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            epoch: Instant::now(),
            last_connect_error: Mutex::new(None),
            leaks: Leaks::new(settings.leak_threshold),
            settings,
        });
        // Idle trimming, keepalive, min idle: at once when built inside a runtime, else at
        // the first checkout.
        shared.start_maintenance();
        shared
    }
}

fn primary_labels() -> PoolLabels {
    vec![("role", "primary".to_owned())]
}

/// The pools of `DATABASE_REPLICA_URL`'s hosts, one each, sized by `DB_REPLICA_POOL_SIZE` and
/// `DB_REPLICA_MAX_OVERFLOW` (else the primary's sizes).
fn replica_pools(settings: &Settings, url: &DatabaseUrl) -> Result<Replicas<Pool>, Error> {
    let replica = checked(Settings {
        database_url: Some(url.clone()),
        replica_url: None,
        pool_size: settings.replica_pool_size.unwrap_or(settings.pool_size),
        max_overflow: settings
            .replica_max_overflow
            .unwrap_or(settings.max_overflow),
        ..settings.clone()
    })
    .map_err(|e| match e {
        SettingsError::Invalid {
            variable,
            value,
            expected,
        } => SettingsError::Invalid {
            variable: variable.replace("DB_", "DB_REPLICA_"),
            value,
            expected,
        },
        e => e,
    })?;
    let mut pools = Vec::new();
    for i in 0..crate::connect::host_count(url) {
        let connector = Connector::new(url, &replica, Some(i))?;
        let host: Arc<str> = crate::connect::describe_host(url.config(), i).into();
        let labels = vec![("role", "replica".to_owned()), ("host", host.to_string())];
        pools.push((
            host,
            Pool {
                shared: Shared::build(replica.clone(), connector, true, labels),
                replicas: None,
            },
        ));
    }
    Ok(Replicas::new(
        pools,
        settings.replica_max_lag,
        settings.replica_fallback,
    ))
}

/// Settings built in code may hold what the environment never could: sizes past PostgreSQL's
/// own limit, timeouts so long that adding them to the clock would overflow. Sizes are refused
/// (with the variable they stand for), durations are capped at [`MAX_SECONDS`], which means
/// "practically forever" all the same.
fn checked(mut settings: Settings) -> Result<Settings, SettingsError> {
    let too_many = |variable: &str, value: usize| SettingsError::Invalid {
        variable: variable.into(),
        value: value.to_string(),
        expected: format!("a whole number from 1 to {MAX_CONNECTIONS}"),
    };
    if settings.pool_size == 0 || settings.pool_size > MAX_CONNECTIONS {
        return Err(too_many("DB_POOL_SIZE", settings.pool_size));
    }
    if let Some(overflow) = settings.max_overflow {
        if overflow > MAX_CONNECTIONS {
            return Err(SettingsError::Invalid {
                variable: "DB_MAX_OVERFLOW".into(),
                value: overflow.to_string(),
                expected: format!("a whole number from 0 to {MAX_CONNECTIONS}, or -1 (None)"),
            });
        }
    }
    if settings.min_idle > settings.pool_size {
        return Err(SettingsError::Invalid {
            variable: "DB_POOL_MIN_IDLE".into(),
            value: settings.min_idle.to_string(),
            expected: format!(
                "a whole number from 0 to DB_POOL_SIZE ({})",
                settings.pool_size
            ),
        });
    }
    if settings.connect_timeout.is_zero() {
        return Err(SettingsError::Invalid {
            variable: "DB_CONNECT_TIMEOUT".into(),
            value: "0".into(),
            expected: "a number of seconds greater than 0".into(),
        });
    }
    let cap = Duration::from_secs(MAX_SECONDS);
    for d in [
        &mut settings.pool_timeout,
        &mut settings.connect_timeout,
        &mut settings.pre_ping_window,
        &mut settings.slow_query_threshold,
    ] {
        *d = (*d).min(cap);
    }
    // Zero is off, as in the environment.
    settings.leak_threshold = settings
        .leak_threshold
        .filter(|t| !t.is_zero())
        .map(|t| t.min(cap));
    if let Some(recycle) = &mut settings.recycle {
        if recycle.is_zero() {
            return Err(SettingsError::Invalid {
                variable: "DB_POOL_RECYCLE".into(),
                value: "0".into(),
                expected: "a number of seconds greater than 0, or -1 (None) to never recycle"
                    .into(),
            });
        }
        *recycle = (*recycle).min(cap);
    }
    Ok(settings)
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("target", &self.shared.connector.target())
            .field("status", &self.status())
            .finish()
    }
}

/// What a checkout holds while it prepares a connection: capacity, and possibly a connection.
/// Dropped before [`Held::hand_out`] (the checkout was cancelled or failed), it gives both back.
struct Held<'a> {
    shared: &'a Shared,
    conn: Option<Conn>,
    slot: bool,
}

impl Held<'_> {
    /// Gives up ownership: the connection and its capacity now belong to the caller.
    fn hand_out(&mut self, conn: Conn) -> Conn {
        self.slot = false;
        conn
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        match self.conn.take() {
            // Interrupted while verifying it: its state is unknown, so close rather than reuse.
            Some(conn) => self.shared.discard(conn, CloseReason::Cancelled),
            None if self.slot => self.shared.release_slot(),
            None => {}
        }
    }
}

/// Connections opened by [`Pool::warm_up`], released into the pool on drop.
struct Batch<'a> {
    shared: &'a Shared,
    conns: Vec<Conn>,
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        for conn in self.conns.drain(..) {
            self.shared.release(conn);
        }
    }
}

impl Shared {
    /// Checks out a connection (see [`Pool::get`]): the caller owns it and its capacity.
    pub(crate) async fn checkout(self: &Arc<Self>) -> Result<Conn, Error> {
        if self.maintenance.is_some() && !self.maintaining.load(Ordering::Relaxed) {
            self.start_maintenance();
        }
        let start = Instant::now();
        let deadline = start + self.pool_timeout;
        let mut acquire = self.core.acquire();
        // The first poll takes an idle connection or a slot, or joins the queue, under one lock;
        // only a checkout that has to wait involves the pool's timer.
        let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut acquire).poll(cx))).await;
        let (grant, waited) = match first {
            Poll::Ready(Some(grant)) => (grant, false),
            Poll::Ready(None) => return Err(Error::Closed),
            // No time to wait: dropping the waiter hands on anything granted meanwhile.
            Poll::Pending if self.pool_timeout.is_zero() => return Err(self.timed_out()),
            Poll::Pending => {
                let deadline_ticks = self.ticks(start).saturating_add(self.pool_timeout_ticks);
                acquire.set_deadline(deadline_ticks);
                self.timer.arm(self, deadline_ticks);
                match (&mut acquire).await {
                    Some(grant) => (grant, true),
                    None if acquire.expired() => return Err(self.timed_out()),
                    None => return Err(Error::Closed),
                }
            }
        };
        let now = if waited { Instant::now() } else { start };
        let (conn, fresh) = self.ready(grant, now, deadline).await?;
        if fresh {
            self.stats.checkout_waited(start.elapsed());
        } else if waited {
            self.stats.checkout_waited(now - start);
        } else {
            self.stats.checkout_immediate();
        }
        self.instrument
            .pool_event(PoolEvent::Checkout, conn.meta.id);
        Ok(conn)
    }

    /// Turns a grant into a verified connection, replacing dead or stale ones within the same
    /// checkout, until `deadline`.
    /// Also tells whether the connection was opened for this checkout.
    async fn ready(
        &self,
        grant: Grant<Conn>,
        now: Instant,
        deadline: Instant,
    ) -> Result<(Conn, bool), Error> {
        let mut held = Held {
            shared: self,
            conn: None,
            slot: true,
        };
        if let Grant::Item(conn) = grant {
            let conn = &*held.conn.insert(conn);
            let verdict = self.verify(conn, now).await;
            if let Some(conn) = held.conn.take() {
                match verdict {
                    Ok(()) => return Ok((held.hand_out(conn), false)),
                    // Dead or stale: replace it within this checkout, on the same capacity.
                    Err(reason) => self.close(conn, reason),
                }
            }
        }
        let mut backoff = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            // Boxed: the handshake's future is kilobytes, and inline it would make every
            // checkout's future (and every statement's, which nests one) that large, though
            // almost all of them never connect.
            match Box::pin(self.open(remaining)).await {
                Ok(conn) => return Ok((held.hand_out(conn), true)),
                Err(e) if !e.is_transient() || (self.fail_fast && !e.by_pool_timeout()) => {
                    return Err(Error::Connect(e))
                }
                Err(e) => {
                    if Instant::now() >= deadline || e.by_pool_timeout() {
                        self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                        let cause = (!e.by_pool_timeout()).then_some(e);
                        return Err(Error::Timeout(self.timeout_error(cause)));
                    }
                    // Transient (refused, too many clients, starting up): try again shortly,
                    // keeping the capacity, until the checkout's deadline.
                    let delay = backoff
                        .get_or_insert_with(|| {
                            ExponentialBuilder::default()
                                .with_min_delay(Duration::from_millis(20))
                                .with_max_delay(Duration::from_secs(1))
                                .with_jitter()
                                .without_max_times()
                                .build()
                        })
                        .next()
                        .unwrap_or(Duration::from_secs(1));
                    tokio::time::sleep_until((Instant::now() + delay).min(deadline).into()).await;
                }
            }
        }
    }

    /// Whether an idle connection may be handed out; the reason to replace it otherwise.
    async fn verify(&self, conn: &Conn, now: Instant) -> Result<(), CloseReason> {
        let meta = &conn.meta;
        if let Some(reason) = self.stale(conn) {
            return Err(reason);
        }
        if meta.expires.is_some_and(|at| now >= at) {
            return Err(CloseReason::Recycled);
        }
        if !self.pre_ping {
            return Ok(());
        }
        // The server answered on this connection moments ago and the client has not seen the
        // socket close since: as good as just opened, so no round trip (HikariCP's bypass).
        if self.ticks(now).saturating_sub(meta.answered_at()) < self.pre_ping_window {
            return Ok(());
        }
        // A Sync message: the cheapest round trip the protocol has (no parse, no plan), under a
        // bound of its own: a ping started late in the checkout's wait still gets its full time
        // rather than failing a healthy connection for want of the checkout's remaining time.
        match tokio::time::timeout(self.round_trip_limit, conn.client.check_connection()).await {
            Ok(Ok(())) => {
                meta.answered(self.ticks(Instant::now()));
                Ok(())
            }
            // The server went away: older connections are as dead as this one.
            Ok(Err(e)) if crate::error::is_disconnect(&e) => {
                self.stats.ping_failures.fetch_add(1, Ordering::Relaxed);
                self.invalidate(meta);
                Err(CloseReason::PingFailed)
            }
            // No answer in time (a silent network, a stalled backend) or a refusal: this
            // connection only. The others may be fine, and their own pings will tell.
            _ => {
                self.stats.ping_failures.fetch_add(1, Ordering::Relaxed);
                Err(CloseReason::PingFailed)
            }
        }
    }

    /// What a checkout would meet now.
    pub(crate) fn availability(&self) -> Availability {
        self.core.availability()
    }

    /// `DB_POOL_TIMEOUT`.
    pub(crate) fn pool_timeout(&self) -> Duration {
        self.pool_timeout
    }

    /// Why a connection must not take more work, if it must not: the client saw its socket
    /// close or a statement on it failed with a disconnect (`Broken`), or it was opened before a
    /// disconnect or `dispose()` (`Invalidated`). The one staleness rule of checkout, return and
    /// the pipelined lanes.
    pub(crate) fn unusable(&self, conn: &Conn) -> Option<CloseReason> {
        let meta = &conn.meta;
        if conn.client.is_closed() || meta.broken.load(Ordering::Relaxed) {
            Some(CloseReason::Broken)
        } else if meta.generation < self.generation.load(Ordering::Acquire) {
            Some(CloseReason::Invalidated)
        } else {
            None
        }
    }

    /// [`Shared::unusable`] for a connection leaving or entering the pool: a `Broken` one also
    /// invalidates every connection opened before it (the client saw a socket close: a
    /// terminated backend or a restarted server, found without a round trip).
    fn stale(&self, conn: &Conn) -> Option<CloseReason> {
        let reason = self.unusable(conn)?;
        if reason == CloseReason::Broken {
            self.invalidate(&conn.meta);
        }
        Some(reason)
    }

    /// Opens a connection (capacity already reserved by the caller).
    pub(crate) async fn open(&self, limit: Duration) -> Result<Conn, ConnectError> {
        let generation = self.generation.load(Ordering::Acquire);
        match self.connect_and_set_up(limit).await {
            Ok(opened) => {
                *self
                    .last_connect_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let at = Instant::now();
                let expires = self.recycle.map(|age| {
                    let jitter = 1.0 - RECYCLE_JITTER * fastrand::f64();
                    at + age.mul_f64(jitter)
                });
                self.stats.created.fetch_add(1, Ordering::Relaxed);
                self.instrument.pool_event(PoolEvent::Create, id);
                let io_abort = opened.io.abort_handle();
                Ok(Arc::new(ConnInner {
                    client: opened.client,
                    cancel: opened.cancel,
                    io: opened.io,
                    meta: Meta::new(
                        id,
                        generation,
                        expires,
                        self.ticks(at),
                        self.statement_epoch.load(Ordering::Acquire),
                        self.leaks.as_ref().map(|leaks| leaks.register(id)),
                        io_abort,
                    ),
                }))
            }
            Err(e) => {
                self.instrument.connect_failed(&e);
                // No host answered as a server that takes writes: the one the pool's
                // connections are on is gone or demoted, and after a failover none of them
                // should be used again. (A primary refusing for load keeps its connections.)
                if self.follows_primary && e.no_server {
                    self.invalidate_generation(generation, 0);
                }
                // An attempt cut short by the checkout's deadline says nothing about the server.
                if !e.by_pool_timeout() {
                    *self
                        .last_connect_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
                }
                Err(e)
            }
        }
    }

    /// Opens a connection and runs its set-up ([`crate::init`]) within `limit`. A connection
    /// whose set-up fails is closed, never pooled.
    pub(crate) async fn connect_and_set_up(&self, limit: Duration) -> Result<Opened, ConnectError> {
        let start = Instant::now();
        let opened = self.connector.connect(limit).await?;
        if self.set_up.is_empty() {
            return Ok(opened);
        }
        let left = limit.saturating_sub(start.elapsed());
        let failed = |step: String, why: String, transient: bool| ConnectError {
            target: self.connector.target().clone(),
            kind: ConnectErrorKind::Init {
                step: step.into(),
                why: why.into(),
                transient,
            },
            no_server: false,
        };
        match tokio::time::timeout(left, self.set_up.run(&opened.client)).await {
            Ok(Ok(())) => Ok(opened),
            Ok(Err(Failed { step, error })) => Err(match error {
                SetUpError::Sql(e) => {
                    let transient = crate::error::is_disconnect(&e);
                    failed(step, crate::error::ShowError(&e).to_string(), transient)
                }
                SetUpError::Hook(e) => failed(step, e.to_string(), false),
            }),
            Err(_) => Err(failed(
                "the connection's set-up".into(),
                format!(
                    "no answer within what was left of the connect timeout ({:.2}s)",
                    left.as_secs_f64()
                ),
                true,
            )),
        }
    }

    /// The `pool_size` now (see [`Pool::resize`]).
    pub(crate) fn pool_size(&self) -> usize {
        self.core.counts().pool_size
    }

    /// Gives up the checkouts whose `DB_POOL_TIMEOUT` has passed; the earliest deadline still
    /// waiting, for the pool's timer.
    pub(crate) fn expire_waiters(&self) -> Option<u64> {
        self.core.expire(self.ticks(Instant::now()))
    }

    /// Leak detection, when `DB_POOL_LEAK_THRESHOLD` is set.
    #[inline]
    pub(crate) fn leaks(&self) -> Option<&Leaks> {
        self.leaks.as_ref()
    }

    /// Whether the pool was closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.core.is_closed()
    }

    /// Zero of the pool's clock.
    pub(crate) fn epoch(&self) -> Instant {
        self.epoch
    }

    /// `at` on the pool's clock: nanoseconds since the pool was built. Fits an atomic, unlike
    /// an `Instant`.
    pub(crate) fn ticks(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn timeout_error(&self, cause: Option<ConnectError>) -> TimeoutError {
        let cause = cause.or_else(|| {
            self.last_connect_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        });
        TimeoutError {
            pool_size: self.pool_size(),
            max_overflow: overflow_of(self.pool_size(), self.core.capacity()),
            timeout: self.pool_timeout,
            last_connect_error: cause,
            behind_shared: false,
        }
    }

    pub(crate) fn timed_out(&self) -> Error {
        self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
        Error::Timeout(self.timeout_error(None))
    }

    /// A statement on the pool waited `DB_POOL_TIMEOUT` behind another on a shared connection
    /// without starting: counted and worded as a pool timeout, saying where it waited.
    pub(crate) fn timed_out_behind(&self) -> Error {
        self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
        let mut e = self.timeout_error(None);
        e.behind_shared = true;
        Error::Timeout(e)
    }

    /// A statement ran past its command timeout `after`: counted, and the error for it.
    pub(crate) fn command_timed_out(&self, after: Duration, confirmed: bool) -> Error {
        self.stats.command_timeouts.fetch_add(1, Ordering::Relaxed);
        Error::CommandTimeout { after, confirmed }
    }

    /// A statement's caller went away before its answer (its future was dropped): counted in
    /// [`Status::cancelled_statements`]; the pool stops it on the server.
    pub(crate) fn statement_abandoned(&self) {
        self.stats
            .cancelled_statements
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The redacted description of where connections go.
    pub(crate) fn target(&self) -> &Arc<str> {
        self.connector.target()
    }

    /// Sends a cancel request for the statement `conn`'s server runs now, in the background
    /// (an abandoned statement on a lane that others still use). The task holds only the
    /// cancel target, never the connection, which may be checked out next.
    pub(crate) fn cancel_now(&self, conn: &ConnInner) {
        conn.meta.cancels.fetch_add(1, Ordering::Relaxed);
        conn.cancel.send_in_background(self.round_trip_limit);
    }

    /// A disconnect was seen on `meta`'s connection: every connection opened in its generation
    /// or before is replaced at its next checkout, and idle ones are closed now.
    pub(crate) fn invalidate(&self, meta: &Meta) {
        self.invalidate_generation(meta.generation, meta.id);
    }

    /// Every connection opened in `generation` or before is replaced (see [`Shared::invalidate`]).
    /// `id`: the connection that saw why (0 for a failed connect).
    fn invalidate_generation(&self, generation: u64, id: u64) {
        let next = generation + 1;
        if self.generation.fetch_max(next, Ordering::AcqRel) >= next {
            return; // Someone already invalidated this generation.
        }
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        self.instrument.pool_event(PoolEvent::Invalidate, id);
        for conn in self.core.remove_idle(|c| c.meta.generation < next) {
            self.discard(conn, CloseReason::Invalidated);
        }
    }

    /// Closes a connection whose capacity the caller already gave back (or never held).
    fn close(&self, conn: Conn, reason: CloseReason) {
        self.stats.closed(reason);
        self.instrument
            .pool_event(PoolEvent::Close(reason), conn.meta.id);
        drop(conn);
    }

    /// Closes a connection and frees its capacity for the next waiter.
    pub(crate) fn discard(&self, conn: Conn, reason: CloseReason) {
        self.close(conn, reason);
        self.release_slot();
    }

    /// Gives a connection back to the core (the longest waiter, the idle set, or closed), then
    /// tells statements waiting for room on the pool ([`crate::pipeline`]).
    pub(crate) fn release(&self, conn: Conn) {
        self.core.release(conn);
        self.lanes.wake_waiting();
    }

    /// Frees the capacity of a connection that is gone (or was never opened), as
    /// [`Shared::release`] does for a connection.
    pub(crate) fn release_slot(&self) {
        self.core.release_slot();
        self.lanes.wake_waiting();
    }

    /// Takes a connection back from its user (on `PooledConnection` drop, or when a lane's
    /// last statement leaves).
    pub(crate) fn check_in(self: &Arc<Self>, conn: Conn) {
        self.instrument.pool_event(PoolEvent::Checkin, conn.meta.id);
        let meta = &conn.meta;
        meta.reset_command_timeout();
        // Leak detection off: this one test. (A lane's connection was never marked checked
        // out: its record says so, and nothing is logged.)
        if let Some(holder) = &meta.holder {
            crate::leak::checked_in(self, holder);
        }
        if meta.interrupted() {
            return self.recover_interrupted(conn);
        }
        if let Some(reason) = self.stale(&conn) {
            return self.discard(conn, reason);
        }
        let dirty = meta.in_txn.load(Ordering::Relaxed);
        let session = meta.session_changed.load(Ordering::Relaxed);
        // Refused as read-only on a pool that follows the primary: the reset asks the server.
        let read_only = meta.read_only_seen.load(Ordering::Relaxed);
        match self.reset {
            // `none` never sends anything; a connection that may hold a transaction or session
            // state is closed rather than handed to someone else.
            ResetOnReturn::None if dirty || session || read_only => {
                self.discard(conn, CloseReason::ResetFailed)
            }
            ResetOnReturn::Discard => self.reset_then_release(conn, dirty, true),
            _ if dirty || session || read_only => self.reset_then_release(conn, dirty, session),
            _ => self.release(conn),
        }
    }

    /// Rolls back and/or discards session state in the background, then returns the
    /// connection. Capacity stays held meanwhile, so the figures count it as checked out.
    fn reset_then_release(self: &Arc<Self>, conn: Conn, rollback: bool, discard_all: bool) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return self.discard(conn, CloseReason::ResetFailed);
        };
        let returning = Returning {
            shared: self.clone(),
            conn: Some(conn),
        };
        runtime.spawn(returning.reset(rollback, discard_all));
    }

    /// The user went away mid-statement: stop the statement on the server (cancel request),
    /// wait until the server answered everything in flight, then return the connection
    /// through a rollback (and `DISCARD ALL` when the reset or a session change asks for it).
    /// When the server does not settle within the round-trip limit the connection is closed,
    /// and its capacity is freed once the server let go of the socket. Capacity stays held
    /// throughout: the pool never has more backends than it counts.
    fn recover_interrupted(self: &Arc<Self>, conn: Conn) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return self.discard(conn, CloseReason::Cancelled);
        };
        let mut returning = Returning {
            shared: self.clone(),
            conn: Some(conn),
        };
        let limit = self.round_trip_limit;
        runtime.spawn(async move {
            let Some(conn) = returning.conn.as_ref() else {
                return;
            };
            if quiesce(conn, limit).await {
                conn.meta.settled();
                let shared = &returning.shared;
                let session = conn.meta.session_changed.load(Ordering::Relaxed);
                if shared.reset == ResetOnReturn::None || shared.stale(conn).is_some() {
                    let Some(conn) = returning.conn.take() else {
                        return;
                    };
                    return returning.shared.discard(conn, CloseReason::Cancelled);
                }
                // What the cancelled statement left is unknown: roll back whatever may be open.
                let discard_all = shared.reset == ResetOnReturn::Discard || session;
                return returning.reset(true, discard_all).await;
            }
            let Some(conn) = returning.conn.take() else {
                return;
            };
            let shared = returning.shared.clone();
            shared
                .close_when_let_go(conn, CloseReason::Cancelled, limit)
                .await;
        });
    }

    /// Closes a connection whose server did not settle, and frees its capacity when the
    /// connection's I/O task has ended (the server answered what was in flight and took the
    /// Terminate, or closed the socket), or `limit` later at most, when the socket is dropped.
    async fn close_when_let_go(&self, conn: Conn, reason: CloseReason, limit: Duration) {
        self.stats.closed(reason);
        self.instrument
            .pool_event(PoolEvent::Close(reason), conn.meta.id);
        let _slot = SlotGuard(self);
        if let Ok(inner) = Arc::try_unwrap(conn) {
            let ConnInner { client, mut io, .. } = inner;
            drop(client);
            if tokio::time::timeout(limit, &mut io).await.is_err() {
                io.abort();
            }
        }
    }
}

/// Frees one slot of capacity when dropped, however the task holding it ends.
struct SlotGuard<'a>(&'a Shared);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.0.release_slot();
    }
}

/// Stops what runs on `conn` and waits for the server to be ready: a round trip (`Sync`) is
/// queued behind whatever is in flight, and a cancel request sent, then repeated every
/// [`CANCEL_REPEAT`] while that round trip has not come back, until `limit`. True when it came
/// back: the server answered everything before it, and the connection is idle.
async fn quiesce(conn: &ConnInner, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let ready = conn.client.check_connection();
    tokio::pin!(ready);
    loop {
        conn.meta.cancels.fetch_add(1, Ordering::Relaxed);
        let _ = tokio::time::timeout_at(deadline, conn.cancel.send()).await;
        let next = (tokio::time::Instant::now() + CANCEL_REPEAT).min(deadline);
        match tokio::time::timeout_at(next, &mut ready).await {
            // Ready; and no cancel request sent in the background for a pipelined statement
            // may still arrive and hit the next user.
            Ok(result) => return result.is_ok() && conn.cancel.settled(deadline).await,
            Err(_) if tokio::time::Instant::now() >= deadline => return false,
            Err(_) => {}
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.timer.stop();
        // Listeners hold the hub, not the pool: its connection must not outlive the pool.
        if let Some(hub) = self.listener.get() {
            hub.close();
        }
    }
}

/// A connection on its way back through a background task. If the runtime drops the task before
/// it finishes, the connection is still closed and its capacity freed.
struct Returning {
    shared: Arc<Shared>,
    conn: Option<Conn>,
}

impl Returning {
    /// Rolls back and/or discards session state, then returns the connection; closes it when
    /// that fails or takes longer than the round-trip limit.
    async fn reset(mut self, rollback: bool, discard_all: bool) {
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        let reset = async {
            if rollback {
                conn.client.batch_execute("ROLLBACK").await?;
            }
            if discard_all {
                conn.meta.clear_statements();
                conn.client.batch_execute("DISCARD ALL").await?;
                // The set-up was discarded with the rest of the session: run it again.
                self.shared
                    .set_up
                    .run(&conn.client)
                    .await
                    .map_err(|_| ResetFailed)?;
            }
            if conn.meta.read_only_seen.load(Ordering::Relaxed) {
                return Ok(server_read_only(&conn.client).await?);
            }
            Ok::<bool, ResetFailed>(false)
        };
        let limit = self.shared.round_trip_limit;
        let outcome = tokio::time::timeout(limit, reset).await;
        let Some(conn) = self.conn.take() else {
            return;
        };
        match outcome {
            // The server turned read-only under a pool that follows the primary: every
            // connection goes, and new ones walk the host list to the new primary.
            Ok(Ok(true)) => {
                self.shared.invalidate(&conn.meta);
                self.shared.discard(conn, CloseReason::Invalidated);
            }
            Ok(Ok(false)) => {
                conn.meta.read_only_seen.store(false, Ordering::Relaxed);
                conn.meta.in_txn.store(false, Ordering::Relaxed);
                conn.meta.session_changed.store(false, Ordering::Relaxed);
                self.shared.release(conn);
            }
            Ok(Err(_)) => self.shared.discard(conn, CloseReason::ResetFailed),
            // No answer: something still runs ahead of the reset (a statement sent through
            // `client()`, which the pool cannot track). Stop it, and keep the capacity until
            // the server let go of the connection.
            Err(_) => {
                let _ = tokio::time::timeout(limit, conn.cancel.send()).await;
                let shared = self.shared.clone();
                shared
                    .close_when_let_go(conn, CloseReason::ResetFailed, limit)
                    .await;
            }
        }
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.shared.discard(conn, CloseReason::ResetFailed);
        }
    }
}
