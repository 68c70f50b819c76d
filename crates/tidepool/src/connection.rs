//! The pooled connection: tokio-postgres' query API with a per-connection statement cache, every
//! statement routed through the instrumentation point, and transactions that roll back when
//! dropped. The connection goes back to the pool when the [`PooledConnection`] is dropped.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::mem::ManuallyDrop;
use std::panic::Location;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, IsolationLevel, Row, SimpleQueryMessage};

use crate::connect::{CancelTarget, CancelToken};
use crate::error::{is_disconnect, Error};
use crate::leak::Holder;
use crate::order::Order;
use crate::pool::Shared;

/// Statements kept per connection before the cache starts evicting (as asyncpg's
/// `statement_cache_size`, which defaults to 100; ours is larger because it costs one map entry).
const STATEMENT_CACHE_CAPACITY: usize = 256;

/// One open connection, behind a pointer so that moving it through the pool (idle set, waiters,
/// guards) copies a pointer rather than the client and its bookkeeping. Shared (`Arc`) because
/// statements run on the pool itself may pipeline on one connection ([`crate::pipeline`]); a
/// connection checked out with [`Pool::get`](crate::Pool::get) has a single owner.
pub(crate) type Conn = Arc<ConnInner>;

/// A connection's prepared statements by SQL text, and the key that tells whether a
/// [`Statement`] was prepared here.
///
/// The rule: a `Statement` whose key is this cache's current key names a statement that exists
/// on the server; any other is resolved by its SQL. Whatever may have deallocated statements
/// (`DISCARD ALL`, a `26000` or `0A000` answer, a migration seen elsewhere in the pool) takes
/// a new key, so no held `Statement` is ever sent under a dead name.
pub(crate) struct StatementCache {
    /// Unique among every connection of every pool in the process, and renewed when the
    /// server-side statements are forgotten.
    key: u64,
    /// The pool's statement epoch ([`Shared::statement_epoch`]) this cache is valid for: a
    /// newer one means a migration was seen on another connection.
    epoch: u64,
    map: HashMap<Arc<str>, tokio_postgres::Statement, foldhash::fast::RandomState>,
}

impl StatementCache {
    fn new(epoch: u64) -> Self {
        StatementCache {
            key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
            epoch,
            map: HashMap::default(),
        }
    }

    /// Forgets every statement (dropping them closes them on the server, harmlessly when they
    /// are gone already) and takes a new key.
    fn forget(&mut self, epoch: u64) {
        self.map.clear();
        self.key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
        self.epoch = epoch;
    }
}

/// One open connection and what the pool knows about it.
pub(crate) struct ConnInner {
    pub(crate) client: Client,
    /// Where to send a cancel request for the statement the backend runs.
    pub(crate) cancel: Arc<CancelTarget>,
    /// The task driving the connection's I/O: it ends when the client is gone and the server
    /// answered what was in flight, or when the server closes the socket.
    pub(crate) io: tokio::task::JoinHandle<()>,
    pub(crate) meta: Meta,
}

/// Bookkeeping of one connection. Flags are atomics because queries take `&self` (tokio-postgres
/// pipelines concurrent statements on one connection) and the connection must stay `Sync`.
pub(crate) struct Meta {
    pub(crate) id: u64,
    /// The pool generation when the connection was opened; older than the pool's current
    /// generation means invalidated (a disconnect was seen, or `dispose()` ran).
    pub(crate) generation: u64,
    /// When the connection must be replaced (`DB_POOL_RECYCLE`, with jitter), if ever.
    pub(crate) expires: Option<Instant>,
    /// Statements sent and not yet answered. Non-zero at return means the user was cancelled
    /// mid-statement: the connection's state is unknown and it is closed.
    in_flight: AtomicU32,
    /// A transaction may be open: the connection is rolled back before reuse.
    pub(crate) in_txn: AtomicBool,
    /// A statement failed with a disconnect.
    pub(crate) broken: AtomicBool,
    /// A statement was refused as read-only (`25006`) on a pool that follows the primary: at
    /// return the server is asked whether it turned read-only (demoted, or fenced with
    /// `default_transaction_read_only`), and if so every connection is replaced.
    pub(crate) read_only_seen: AtomicBool,
    /// A statement run on the pool changed session state (`SET`, `LISTEN`, a temporary table,
    /// a session advisory lock, ...): `DISCARD ALL` (or closing) before anyone else gets it.
    pub(crate) session_changed: AtomicBool,
    /// A statement ran past its command timeout and a cancel request went out: at return the
    /// connection takes the interrupted path (it waits for the cancel to have landed, and for
    /// the server to be ready), so the cancel can never hit the next user's statement.
    timed_out: AtomicBool,
    /// Ends the connection's I/O task: for a statement past its command timeout that the
    /// server did not stop, whose connection can only be closed.
    io: tokio::task::AbortHandle,
    /// This checkout's command timeout in milliseconds, overriding the pool's
    /// (`DB_COMMAND_TIMEOUT`): [`POOL_DEFAULT`] until set, `0` for none. Reset at return.
    command_timeout_ms: AtomicU64,
    /// Cancel requests the pool sent for this connection. A statement that fails with
    /// `57014` (canceled) while this moved on may have been hit by a request meant for another
    /// pipelined statement.
    pub(crate) cancels: AtomicU32,
    /// When the server last answered on this connection, as the pool's clock ticks
    /// ([`Shared::ticks`]): a recent answer makes a pre-ping round trip redundant.
    answered: AtomicU64,
    /// Prepared statements by SQL text. Looked up on every statement: a fast hasher (the keys
    /// are the application's own SQL, not untrusted input).
    statements: Mutex<StatementCache>,
    /// While the connection is shared by pipelined statements: their requests in the order
    /// they were sent ([`crate::pipeline`]). Boxed (allocated once per connection): only
    /// shared connections use it, and inline it would spread this bookkeeping, which every
    /// checkout reads, over several more cache lines.
    order: Box<Mutex<Order>>,
    /// With `DB_POOL_LEAK_THRESHOLD`: who checked the connection out and when, the one record
    /// leak detection reads ([`crate::leak::Holder`], whose doc states its rule). Its own `Arc`
    /// (allocated once per connection, when the connection is opened) so the pool's scan reads
    /// it without holding the connection. `None` when leak detection is off.
    pub(crate) holder: Option<Arc<Holder>>,
}

/// [`Meta::command_timeout_ms`] when the checkout did not set its own.
const POOL_DEFAULT: u64 = u64::MAX;

impl Meta {
    /// Sets this checkout's command timeout (`None`: no timeout).
    fn set_command_timeout(&self, timeout: Option<Duration>) {
        let ms = timeout.map_or(0, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX - 1).max(1)
        });
        self.command_timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// Back to the pool's command timeout (at return).
    pub(crate) fn reset_command_timeout(&self) {
        self.command_timeout_ms
            .store(POOL_DEFAULT, Ordering::Relaxed);
    }

    /// The command timeout that bounds this connection's statements now.
    fn command_timeout(&self, pool: Option<Duration>) -> Option<Duration> {
        match self.command_timeout_ms.load(Ordering::Relaxed) {
            POOL_DEFAULT => pool,
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}

/// SQLSTATE `57014`: the statement was cancelled.
pub(crate) fn is_canceled(e: &Error) -> bool {
    matches!(e, Error::Db(e) if e.code() == Some(&SqlState::QUERY_CANCELED))
}

/// Source of [`Meta::key`].
static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

impl Meta {
    /// Bookkeeping of a connection opened at `answered` (pool clock ticks); `holder`: its leak
    /// detection record, when that is on.
    pub(crate) fn new(
        id: u64,
        generation: u64,
        expires: Option<Instant>,
        answered: u64,
        statement_epoch: u64,
        holder: Option<Arc<Holder>>,
        io: tokio::task::AbortHandle,
    ) -> Self {
        Meta {
            id,
            generation,
            expires,
            in_flight: AtomicU32::new(0),
            in_txn: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            read_only_seen: AtomicBool::new(false),
            command_timeout_ms: AtomicU64::new(POOL_DEFAULT),
            timed_out: AtomicBool::new(false),
            io,
            session_changed: AtomicBool::new(false),
            cancels: AtomicU32::new(0),
            answered: AtomicU64::new(answered),
            statements: Mutex::new(StatementCache::new(statement_epoch)),
            order: Box::default(),
            holder,
        }
    }

    /// Records that the server answered at `ticks` (the pool's clock).
    pub(crate) fn answered(&self, ticks: u64) {
        self.answered.store(ticks, Ordering::Relaxed);
    }

    /// When the server last answered, in the pool's clock ticks.
    pub(crate) fn answered_at(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// True when a statement was still running when the connection's user went away.
    pub(crate) fn interrupted(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) != 0 || self.timed_out.load(Ordering::Relaxed)
    }

    /// The server answered everything that was in flight (a round trip sent after them came
    /// back): nothing is running any more.
    pub(crate) fn settled(&self) {
        self.in_flight.store(0, Ordering::Relaxed);
        self.timed_out.store(false, Ordering::Relaxed);
        self.order().clear();
    }

    /// The send order of the connection's pipelined requests.
    pub(crate) fn order(&self) -> std::sync::MutexGuard<'_, Order> {
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets cached statements (after `DISCARD ALL` deallocated them on the server), so that
    /// no held [`Statement`] is sent under a name the server no longer knows.
    pub(crate) fn clear_statements(&self) {
        let mut cache = self.cache();
        let epoch = cache.epoch;
        cache.forget(epoch);
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, StatementCache> {
        self.statements.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A prepared statement with its SQL text (kept for echo and slow-query logs).
///
/// A server-side prepared statement belongs to the connection that prepared it. This one can be
/// used anywhere: on its own connection it runs as prepared; on any other connection, or on the
/// pool itself ([`Pool::query`](crate::Pool::query) and friends), it is looked up by its SQL in
/// that connection's statement cache and prepared there once if needed.
#[derive(Clone)]
pub struct Statement {
    inner: tokio_postgres::Statement,
    sql: Arc<str>,
    /// The statement cache key of the connection it was prepared on ([`StatementCache`]).
    conn: u64,
}

impl Statement {
    /// The SQL text the statement was prepared from.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// Parameter types as the server inferred them.
    pub fn params(&self) -> &[tokio_postgres::types::Type] {
        self.inner.params()
    }

    /// Result columns.
    pub fn columns(&self) -> &[tokio_postgres::Column] {
        self.inner.columns()
    }
}

impl fmt::Debug for Statement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Statement").field("sql", &self.sql).finish()
    }
}

/// SQL text or a prepared [`Statement`]: what the query methods accept. Text is prepared once per
/// connection and cached (unless the statement cache is off).
pub trait ToStatement: Sync {
    #[doc(hidden)]
    fn to_statement(&self) -> StatementRef<'_>;
}

#[doc(hidden)]
#[derive(Clone, Copy)]
pub enum StatementRef<'a> {
    Text(&'a str),
    Prepared(&'a Statement),
}

impl StatementRef<'_> {
    pub(crate) fn sql(&self) -> &str {
        match self {
            StatementRef::Text(s) => s,
            StatementRef::Prepared(s) => s.sql(),
        }
    }
}

impl ToStatement for str {
    fn to_statement(&self) -> StatementRef<'_> {
        StatementRef::Text(self)
    }
}

impl ToStatement for String {
    fn to_statement(&self) -> StatementRef<'_> {
        StatementRef::Text(self)
    }
}

impl ToStatement for Statement {
    fn to_statement(&self) -> StatementRef<'_> {
        StatementRef::Prepared(self)
    }
}

/// What a statement method does with a prepared statement: `query`, `query_one`, `query_opt`
/// or `execute`, as a value rather than a closure, so a statement can run again after being
/// prepared anew (see [`Session::run`]).
pub(crate) trait Op: Copy {
    /// What the method returns.
    type Output: Send;

    /// Runs `st` with `params` on `client`.
    fn call<'a>(
        self,
        client: &'a Client,
        st: &'a tokio_postgres::Statement,
        params: &'a [&'a (dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Self::Output, tokio_postgres::Error>> + Send + 'a;

    /// Runs `sql` as the unnamed statement, in one round trip ([`crate::unnamed`]).
    fn call_unnamed<'a>(
        self,
        client: &'a Client,
        sql: &'a str,
        params: &'a [(&'a (dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Self::Output, tokio_postgres::Error>> + Send + 'a;
}

/// The four statement methods as [`Op`]s.
pub(crate) mod ops {
    use super::*;

    macro_rules! op {
        ($name:ident, $method:ident, $typed:ident, $output:ty) => {
            #[derive(Clone, Copy)]
            pub(crate) struct $name;

            impl Op for $name {
                type Output = $output;

                fn call<'a>(
                    self,
                    client: &'a Client,
                    st: &'a tokio_postgres::Statement,
                    params: &'a [&'a (dyn ToSql + Sync)],
                ) -> impl Future<Output = Result<$output, tokio_postgres::Error>> + Send + 'a {
                    client.$method(st, params)
                }

                fn call_unnamed<'a>(
                    self,
                    client: &'a Client,
                    sql: &'a str,
                    params: &'a [(&'a (dyn ToSql + Sync), Type)],
                ) -> impl Future<Output = Result<$output, tokio_postgres::Error>> + Send + 'a {
                    client.$typed(sql, params)
                }
            }
        };
    }

    op!(Query, query, query_typed, Vec<Row>);
    op!(QueryOne, query_one, query_typed_one, Row);
    op!(QueryOpt, query_opt, query_typed_opt, Option<Row>);
    op!(Execute, execute, execute_typed, u64);
}

/// What a statement on a shared connection needs to send its request in the connection's
/// recorded order ([`crate::order`]) and to have it cancelled should its caller go away.
pub(crate) struct LaneRequest<'a> {
    pub(crate) conn: &'a ConnInner,
    pub(crate) shared: &'a Shared,
    /// The request's sequence number once sent ([`NOT_SENT`] until then).
    pub(crate) seq: AtomicU64,
}

/// [`LaneRequest::seq`] before the request is sent.
pub(crate) const NOT_SENT: u64 = u64::MAX;

impl LaneRequest<'_> {
    /// Whether the request was sent and is the oldest the server has not answered.
    pub(crate) fn started(&self) -> bool {
        let seq = self.seq.load(Ordering::Relaxed);
        seq != NOT_SENT && self.conn.meta.order().started(seq)
    }
}

/// A request on its way: on a connection of its own it is just awaited; on a shared one it is
/// recorded in the connection's send order under the order lock while tokio-postgres enqueues
/// it (its first poll), so the record is the wire order. The answer removes the record; dropped
/// before the answer, it leaves the request abandoned, cancelled when it is the one running.
struct Dispatched<'r, 'a, F> {
    request: Pin<&'r mut F>,
    lane: Option<&'a LaneRequest<'a>>,
    /// Set once sent on a shared connection, taken when answered.
    seq: Option<u64>,
}

impl<F: Future> Future for Dispatched<'_, '_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let Some(lane) = this.lane else {
            return this.request.as_mut().poll(cx);
        };
        let polled = match this.seq {
            Some(_) => this.request.as_mut().poll(cx),
            None => {
                let mut order = lane.conn.meta.order();
                let seq = order.sent();
                this.seq = Some(seq);
                lane.seq.store(seq, Ordering::Relaxed);
                this.request.as_mut().poll(cx)
            }
        };
        if polled.is_ready() {
            if let Some(seq) = this.seq.take() {
                if lane.conn.meta.order().answered(seq) {
                    lane.shared.cancel_now(lane.conn);
                }
            }
        }
        polled
    }
}

impl<F> Drop for Dispatched<'_, '_, F> {
    fn drop(&mut self) {
        if let (Some(lane), Some(seq)) = (self.lane, self.seq.take()) {
            if lane.conn.meta.order().abandoned(seq) {
                lane.shared.cancel_now(lane.conn);
            }
        }
    }
}

/// Executes statements on one connection on behalf of a [`PooledConnection`] or a
/// [`Transaction`]: the instrumentation point and the statement cache live here.
pub(crate) struct Session<'a> {
    client: &'a Client,
    meta: &'a Meta,
    /// Where a statement past its command timeout is cancelled.
    cancel: &'a Arc<CancelTarget>,
    shared: &'a Shared,
}

/// How a statement under a command timeout ended.
enum Timed<T> {
    /// Answered in time (or no timeout applies).
    Answered(Result<T, tokio_postgres::Error>),
    /// Past the timeout a cancel request went out, and this is the answer that followed
    /// (usually `57014`; a result when the statement finished first).
    AfterCancel(Result<T, tokio_postgres::Error>, Duration),
    /// Past the timeout, and no answer followed within the round-trip limit (or the request
    /// had not started on a shared connection): the caller gives up on it; the pool stops it
    /// and settles the connection at return (or when its turn comes).
    GaveUp(Duration),
}

/// Started before a statement is sent; finished when its answer came back. A dropped future
/// never finishes, which leaves `in_flight` raised: exactly the signal the pool needs (and the
/// statement is counted as cancelled: the pool stops it on the server).
struct Started<'a> {
    at: Instant,
    shared: &'a Shared,
    answered: bool,
}

impl<'a> Started<'a> {
    /// Marks a statement as sent on the connection of `meta`.
    fn now(meta: &Meta, shared: &'a Shared) -> Started<'a> {
        meta.in_flight.fetch_add(1, Ordering::Relaxed);
        Started {
            at: Instant::now(),
            shared,
            answered: false,
        }
    }

    /// The statement's answer came back: record it, and turn a disconnect into invalidation.
    /// `invalidated`: the error is a cached statement that went stale inside a transaction.
    fn complete<T>(
        mut self,
        meta: &Meta,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        result: Result<T, tokio_postgres::Error>,
        invalidated: bool,
    ) -> Result<T, Error> {
        self.answered = true;
        let shared = self.shared;
        let now = Instant::now();
        meta.in_flight.fetch_sub(1, Ordering::Relaxed);
        shared.instrument.statement(
            sql,
            params,
            now.saturating_duration_since(self.at),
            result.as_ref().err(),
        );
        match result {
            Ok(value) => {
                meta.answered(shared.ticks(now));
                Ok(value)
            }
            Err(e) => {
                if is_disconnect(&e) {
                    meta.broken.store(true, Ordering::Relaxed);
                    shared.invalidate(meta);
                } else {
                    if shared.follows_primary
                        && e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION)
                    {
                        // Perhaps the server was demoted, perhaps the user's own transaction
                        // is read-only: the server's role is checked when the connection
                        // comes back ([`crate::pool`]).
                        meta.read_only_seen.store(true, Ordering::Relaxed);
                    }
                    // An error the server sent is an answer too: the connection is alive.
                    meta.answered(shared.ticks(now));
                }
                Err(if invalidated {
                    Error::StatementInvalidated(e)
                } else {
                    Error::Db(e)
                })
            }
        }
    }
}

impl Drop for Started<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.shared.statement_abandoned();
        }
    }
}

impl<'a> Session<'a> {
    /// The session of `conn` on behalf of the pool `shared`.
    pub(crate) fn new(conn: &'a ConnInner, shared: &'a Shared) -> Self {
        Session {
            client: &conn.client,
            meta: &conn.meta,
            cancel: &conn.cancel,
            shared,
        }
    }
}

impl Session<'_> {
    /// A statement on the pool is about to change session state: the connection is reset
    /// (`DISCARD ALL`) or closed before anyone else gets it.
    pub(crate) fn session_changed(&self) {
        self.meta.session_changed.store(true, Ordering::Relaxed);
    }

    /// Marks a statement as sent; `opens_txn` when it may leave a transaction open (see
    /// [`may_open_transaction`]), so the connection is rolled back before reuse.
    fn start(&self, opens_txn: bool) -> Started<'_> {
        if opens_txn {
            self.meta.in_txn.store(true, Ordering::Relaxed);
        }
        Started::now(self.meta, self.shared)
    }

    fn finish<T>(
        &self,
        started: Started<'_>,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        result: Result<T, tokio_postgres::Error>,
    ) -> Result<T, Error> {
        started.complete(self.meta, sql, params, result, false)
    }

    /// Runs `op` with the resolved statement, timed and tracked as one statement. The caller
    /// says whether it `opens_txn` ([`may_open_transaction`]), having decided it once.
    ///
    /// A cached statement the server no longer accepts (`0A000` after a migration changed its
    /// result type, `26000` after `DISCARD ALL` or `DEALLOCATE`) is evicted; outside a
    /// transaction it is prepared again and run once more, inside one the caller gets
    /// [`Error::StatementInvalidated`] (the transaction is aborted either way).
    pub(crate) async fn run<O: Op>(
        &self,
        statement: StatementRef<'_>,
        params: &[&(dyn ToSql + Sync)],
        opens_txn: bool,
        op: O,
        lane: Option<&LaneRequest<'_>>,
    ) -> Result<O::Output, Error> {
        let sql = statement.sql();
        if !self.shared.statement_cache {
            if let Some(typed) = self.unnamed(statement, params)? {
                // Boxed: with the cache on (the common case) this future is never built, and
                // inline it would grow every statement's future.
                return Box::pin(self.run_unnamed(statement, params, &typed, opens_txn, op, lane))
                    .await;
            }
        }
        let started = self.start(opens_txn);
        let at = started.at;
        let mut timed_out = None;
        let mut result = match self.command_timeout() {
            None => match self.resolve(statement).await {
                Ok(st) => self.send(op, &st, params, lane).await,
                Err(e) => Err(e),
            },
            // Preparing counts too: it can wait behind a lock as long as the statement.
            Some(limit) => {
                let request = async {
                    let st = self.resolve(statement).await?;
                    self.send(op, &st, params, lane).await
                };
                match self.timed(request, limit, lane).await {
                    Timed::Answered(r) => r,
                    Timed::AfterCancel(r, after) => {
                        timed_out = Some(after);
                        r
                    }
                    Timed::GaveUp(after) => {
                        drop(started);
                        return Err(self.shared.command_timed_out(after, false));
                    }
                }
            }
        };
        let mut invalidated = false;
        if let (None, Err(e)) = (timed_out, &result) {
            if let Some(migration) = stale_statement(e) {
                self.forget_statements(migration);
                if self.meta.in_txn.load(Ordering::Relaxed) {
                    invalidated = true;
                } else {
                    result = match self.resolve(statement).await {
                        Ok(st) => self.send(op, &st, params, lane).await,
                        Err(e) => Err(e),
                    };
                }
            }
        }
        let result = self.timed_out(
            timed_out,
            started.complete(self.meta, sql, params, result, invalidated),
        );
        if self.shared.instrument.explain_due(at, result.is_err()) {
            Box::pin(self.explain(statement, params)).await;
        }
        result
    }

    /// The command timeout that bounds statements on this connection now.
    #[inline]
    fn command_timeout(&self) -> Option<Duration> {
        self.meta.command_timeout(self.shared.command_timeout)
    }

    /// `request` within `limit`; past it, a cancel request stops it on the server (unless it
    /// is a pipelined request whose turn has not come: then it is left to be cancelled when it
    /// starts) and its answer is awaited within the round-trip limit.
    async fn timed<T>(
        &self,
        request: impl Future<Output = Result<T, tokio_postgres::Error>>,
        limit: Duration,
        lane: Option<&LaneRequest<'_>>,
    ) -> Timed<T> {
        let mut request = std::pin::pin!(request);
        if let Ok(result) = tokio::time::timeout(limit, &mut request).await {
            return Timed::Answered(result);
        }
        if !lane.is_none_or(LaneRequest::started) {
            return Timed::GaveUp(limit);
        }
        // Counted, so a pipelined neighbour that gets "canceling statement due to user
        // request" instead of ours is run again ([`crate::pipeline`]); and the connection goes
        // through the interrupted path at return, which waits for this cancel to have landed.
        self.meta.cancels.fetch_add(1, Ordering::Relaxed);
        self.meta.timed_out.store(true, Ordering::Relaxed);
        let wait = self.shared.round_trip_limit;
        self.cancel.send_in_background(wait);
        match tokio::time::timeout(wait, &mut request).await {
            Ok(result) => Timed::AfterCancel(result, limit),
            Err(_) => {
                if lane.is_none() {
                    // The server did not stop it: the statement's outcome is unknown, and
                    // anything sent after it (a COMMIT) would run behind it. The connection
                    // ends here; everything after fails as on a lost connection.
                    self.meta.broken.store(true, Ordering::Relaxed);
                    self.meta.io.abort();
                }
                Timed::GaveUp(limit)
            }
        }
    }

    /// A statement cancelled because it ran past its command timeout (`timed_out`) comes back
    /// as [`Error::CommandTimeout`]; anything else as it is.
    fn timed_out<T>(
        &self,
        timed_out: Option<Duration>,
        result: Result<T, Error>,
    ) -> Result<T, Error> {
        match (timed_out, result) {
            (Some(after), Err(Error::Db(e))) if e.code() == Some(&SqlState::QUERY_CANCELED) => {
                Err(self.shared.command_timed_out(after, true))
            }
            (_, result) => result,
        }
    }

    /// Runs `statement` as the unnamed statement with `typed` parameters, timed and tracked as
    /// one statement (the statement cache is off).
    async fn run_unnamed<O: Op>(
        &self,
        statement: StatementRef<'_>,
        params: &[&(dyn ToSql + Sync)],
        typed: &crate::unnamed::Typed<'_>,
        opens_txn: bool,
        op: O,
        lane: Option<&LaneRequest<'_>>,
    ) -> Result<O::Output, Error> {
        let sql = statement.sql();
        let params_as_sent: Vec<(&(dyn ToSql + Sync), Type)> = typed
            .iter()
            .map(|(p, ty)| (p as &(dyn ToSql + Sync), ty.clone()))
            .collect();
        let started = self.start(opens_txn);
        let at = started.at;
        let request = async {
            let request = std::pin::pin!(op.call_unnamed(self.client, sql, &params_as_sent));
            Dispatched {
                request,
                lane,
                seq: None,
            }
            .await
        };
        let mut timed_out = None;
        let result = match self.command_timeout() {
            None => request.await,
            Some(limit) => match self.timed(request, limit, lane).await {
                Timed::Answered(r) => r,
                Timed::AfterCancel(r, after) => {
                    timed_out = Some(after);
                    r
                }
                Timed::GaveUp(after) => {
                    drop(started);
                    return Err(self.shared.command_timed_out(after, false));
                }
            },
        };
        let result = self.timed_out(
            timed_out,
            started.complete(self.meta, sql, params, result, false),
        );
        if self.shared.instrument.explain_due(at, result.is_err())
            && crate::instrument::explainable(first_keyword(sql))
        {
            // As sent: unnamed, with the same declared types (nothing prepared by name).
            self.meta.in_flight.fetch_add(1, Ordering::Relaxed);
            if crate::instrument::explain_typed(self.client, sql, &params_as_sent).await {
                self.meta.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// With the statement cache off: `params` with the types the unnamed statement declares
    /// ([`crate::unnamed`]), or `None` to prepare by name after all — a statement prepared on
    /// this very connection, or, inside a transaction (where PgBouncer keeps one server
    /// connection), one whose parameter types cannot be told from the values.
    fn unnamed<'p>(
        &self,
        statement: StatementRef<'_>,
        params: &[&'p (dyn ToSql + Sync)],
    ) -> Result<Option<crate::unnamed::Typed<'p>>, Error> {
        if let StatementRef::Prepared(s) = statement {
            if s.conn == self.meta.cache().key {
                return Ok(None);
            }
            // Prepared elsewhere: the server's own parameter types are known.
            if s.params().len() == params.len() {
                return Ok(Some(
                    params
                        .iter()
                        .map(|&p| crate::unnamed::Param::binary(p))
                        .zip(s.params().iter().cloned())
                        .collect(),
                ));
            }
        }
        match crate::unnamed::typed(params) {
            Ok(typed) => Ok(Some(typed)),
            Err(_) if self.meta.in_txn.load(Ordering::Relaxed) => Ok(None),
            Err(e) => Err(Error::ParameterType {
                index: e.index,
                rust_type: e.rust_type,
            }),
        }
    }

    /// Sends one prepared statement and waits for its answer (see [`Dispatched`]).
    async fn send<O: Op>(
        &self,
        op: O,
        st: &tokio_postgres::Statement,
        params: &[&(dyn ToSql + Sync)],
        lane: Option<&LaneRequest<'_>>,
    ) -> Result<O::Output, tokio_postgres::Error> {
        let request = std::pin::pin!(op.call(self.client, st, params));
        Dispatched {
            request,
            lane,
            seq: None,
        }
        .await
    }

    /// Forgets this connection's statements; after a migration (`0A000`) every other
    /// connection of the pool forgets its own before their next statement.
    fn forget_statements(&self, migration: bool) {
        let epoch = if migration {
            self.shared.statement_epoch.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.shared.statement_epoch.load(Ordering::Acquire)
        };
        self.meta.cache().forget(epoch);
    }

    /// `DB_SLOW_QUERY_EXPLAIN`: logs the plan of a slow statement, on this connection (same
    /// session, same transaction), with the statement's own parameter types.
    #[cold]
    async fn explain(&self, statement: StatementRef<'_>, params: &[&(dyn ToSql + Sync)]) {
        let sql = statement.sql();
        if !crate::instrument::explainable(first_keyword(sql)) {
            return;
        }
        self.meta.in_flight.fetch_add(1, Ordering::Relaxed);
        let answered = match self.resolve(statement).await {
            Ok(st) => crate::instrument::explain(self.client, sql, st.params(), params).await,
            Err(_) => true,
        };
        // Not answered in time: left in flight, so the connection is closed on return.
        if answered {
            self.meta.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The prepared form of `statement`: its own when it was prepared on this connection (and
    /// the cache's key has not changed since), else from the cache by its SQL, or prepared now
    /// (and cached).
    async fn resolve(
        &self,
        statement: StatementRef<'_>,
    ) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        let (sql, key) = {
            let mut cache = self.meta.cache();
            let epoch = self.shared.statement_epoch.load(Ordering::Acquire);
            if cache.epoch != epoch {
                // A migration was seen on another connection of the pool.
                cache.forget(epoch);
            }
            let sql = match statement {
                StatementRef::Prepared(s) if s.conn == cache.key => return Ok(s.inner.clone()),
                // Prepared on another connection, or before the cache was cleared: its name
                // means nothing here.
                StatementRef::Prepared(s) => &s.sql,
                StatementRef::Text(sql) => sql,
            };
            if self.shared.statement_cache {
                if let Some(st) = cache.map.get(sql) {
                    return Ok(st.clone());
                }
            }
            (sql, cache.key)
        };
        // Preparing is boxed: its future is large, and inline it would grow every statement's
        // future, though with the cache nearly every statement skips it.
        let st = Box::pin(self.client.prepare(sql)).await?;
        if !self.shared.statement_cache {
            return Ok(st);
        }
        let mut cache = self.meta.cache();
        // Not when the cache was cleared meanwhile: the statement may already be gone.
        if cache.key == key {
            if cache.map.len() >= STATEMENT_CACHE_CAPACITY {
                // Evict an arbitrary entry; dropping it closes the statement on the server.
                if let Some(old) = cache.map.keys().next().cloned() {
                    cache.map.remove(&old);
                }
            }
            cache.map.insert(Arc::from(sql), st.clone());
        }
        Ok(st)
    }

    async fn prepare(&self, sql: &str) -> Result<Statement, Error> {
        let started = self.start(may_open_transaction(sql, false));
        let key = self.meta.cache().key;
        let result = self.resolve(StatementRef::Text(sql)).await;
        let inner = self.finish(started, sql, &[], result)?;
        Ok(Statement {
            inner,
            sql: Arc::from(sql),
            // The key it was prepared under: if the cache was cleared meanwhile, the statement
            // is resolved by its SQL when used.
            conn: key,
        })
    }

    async fn simple_query(&self, sql: &str) -> Result<Vec<SimpleQueryMessage>, Error> {
        let started = self.start(may_open_transaction(sql, true));
        self.simple(started, sql, self.client.simple_query(sql))
            .await
    }

    async fn batch_execute(&self, sql: &str) -> Result<(), Error> {
        let started = self.start(may_open_transaction(sql, true));
        self.simple(started, sql, self.client.batch_execute(sql))
            .await
    }

    /// A simple-protocol request, under the command timeout.
    async fn simple<T>(
        &self,
        started: Started<'_>,
        sql: &str,
        request: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, Error> {
        let Some(limit) = self.command_timeout() else {
            let result = request.await;
            return self.finish(started, sql, &[], result);
        };
        match self.timed(request, limit, None).await {
            Timed::Answered(result) => self.finish(started, sql, &[], result),
            Timed::AfterCancel(result, after) => {
                self.timed_out(Some(after), self.finish(started, sql, &[], result))
            }
            Timed::GaveUp(after) => {
                drop(started);
                Err(self.shared.command_timed_out(after, false))
            }
        }
    }
}

/// Whether `sql` could leave a transaction open. Extended-protocol statements are single
/// statements: look at the first keyword. Simple-protocol text may hold several statements: any
/// BEGIN or START anywhere counts (a false positive costs one ROLLBACK at return).
pub(crate) fn may_open_transaction(sql: &str, simple: bool) -> bool {
    if simple {
        let b = sql.as_bytes();
        return contains_ci(b, b"begin") || contains_ci(b, b"start");
    }
    let word = first_keyword(sql);
    word.eq_ignore_ascii_case("begin") || word.eq_ignore_ascii_case("start")
}

/// Whether `e` says a cached prepared statement no longer matches the server: `Some(true)` for a
/// changed result type after a migration (`0A000` from `RevalidateCachedQuery`, as asyncpg
/// tells it apart), `Some(false)` for a statement name the server no longer knows (`26000`).
fn stale_statement(e: &tokio_postgres::Error) -> Option<bool> {
    let db = e.as_db_error()?;
    if *db.code() == SqlState::FEATURE_NOT_SUPPORTED
        && db.routine() == Some("RevalidateCachedQuery")
    {
        Some(true)
    } else if *db.code() == SqlState::INVALID_SQL_STATEMENT_NAME {
        Some(false)
    } else {
        None
    }
}

/// Whether a statement run on the pool may change the state of its session: `SET` (not `SET
/// LOCAL` or `SET TRANSACTION`), `RESET`, `LISTEN`/`UNLISTEN`, `PREPARE`/`DEALLOCATE`,
/// `DECLARE`, `DISCARD`, `LOAD`, `DO` blocks, temporary objects (`CREATE TEMP`, `SELECT ...
/// INTO TEMP`), session advisory locks and `set_config`. Errs towards yes: a false positive
/// costs a connection of its own and a `DISCARD ALL`, a false negative would leak the state to
/// the next statement.
pub(crate) fn changes_session(sql: &str) -> bool {
    let word = first_keyword(sql);
    let is = |w: &str| word.eq_ignore_ascii_case(w);
    let b = sql.as_bytes();
    if is("set") {
        let second = first_keyword(after_first_keyword(sql));
        return !(second.eq_ignore_ascii_case("local")
            || second.eq_ignore_ascii_case("transaction"));
    }
    if [
        "reset",
        "listen",
        "unlisten",
        "prepare",
        "deallocate",
        "declare",
        "discard",
        "load",
        "do",
    ]
    .iter()
    .any(|w| is(w))
    {
        return true;
    }
    if is("create") {
        return contains_ci(b, b"temp");
    }
    if (is("select") || is("with")) && contains_ci(b, b"into") && contains_ci(b, b"temp") {
        return true;
    }
    calls_session_function(b)
}

/// `sql` after its first keyword (see [`first_keyword`], which returns a slice of `sql`).
fn after_first_keyword(sql: &str) -> &str {
    let word = first_keyword(sql);
    let end = word.as_ptr() as usize - sql.as_ptr() as usize + word.len();
    &sql[end..]
}

/// Whether `hay` contains `needle` (lowercase ASCII), in any ASCII case: a scan for the first
/// byte, then a comparison where it occurs (statements are checked on every call, so no window
/// comparison at every position).
fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    let upper = first.to_ascii_uppercase();
    let mut from = 0;
    while let Some(found) = hay[from..].iter().position(|&b| b == first || b == upper) {
        let at = from + found;
        match hay.get(at + 1..at + needle.len()) {
            Some(tail) if tail.eq_ignore_ascii_case(rest) => return true,
            Some(_) => from = at + 1,
            None => return false,
        }
    }
    false
}

/// Whether `sql` calls a function that keeps session state: a session advisory lock
/// (`pg_advisory_lock`, `pg_try_advisory_lock`, their `_shared` forms, `pg_advisory_unlock*`)
/// or `set_config`. Each name has an `_` right after `advisory` or `set`, and underscores are
/// rare in SQL, so only they are looked at.
fn calls_session_function(sql: &[u8]) -> bool {
    let ends =
        |s: &[u8], w: &[u8]| s.len() >= w.len() && s[s.len() - w.len()..].eq_ignore_ascii_case(w);
    let starts = |s: &[u8], w: &[u8]| s.len() >= w.len() && s[..w.len()].eq_ignore_ascii_case(w);
    sql.iter().enumerate().any(|(i, &b)| {
        if b != b'_' {
            return false;
        }
        let (before, after) = (&sql[..i], &sql[i + 1..]);
        (ends(before, b"advisory") && (starts(after, b"lock") || starts(after, b"unlock")))
            || (ends(before, b"set") && starts(after, b"config"))
    })
}

/// The first keyword of a statement, skipping whitespace, comments and opening parentheses:
/// always a slice of `sql` (empty at its end when there is none).
fn first_keyword(sql: &str) -> &str {
    fn letters(s: &str) -> &str {
        let end = s
            .bytes()
            .position(|c| !c.is_ascii_alphabetic())
            .unwrap_or(s.len());
        // ASCII letters end on a character boundary.
        &s[..end]
    }
    // Most statements start with their keyword: no whitespace or comment to skip.
    if sql.as_bytes().first().is_some_and(u8::is_ascii_alphabetic) {
        return letters(sql);
    }
    let mut s = sql;
    loop {
        s = s.trim_start_matches(|c: char| c.is_whitespace() || c == '(');
        if let Some(rest) = s.strip_prefix("--") {
            s = rest.find('\n').map_or(&rest[rest.len()..], |i| &rest[i..]);
        } else if let Some(rest) = s.strip_prefix("/*") {
            s = rest
                .find("*/")
                .map_or(&rest[rest.len()..], |i| &rest[i + 2..]);
        } else {
            break;
        }
    }
    letters(s)
}

/// `query`, `query_one`, `query_opt` and `execute` for every type that runs statements
/// ([`PooledConnection`], [`Transaction`], [`Pool`](crate::Pool)): each forwards to the type's
/// own `run_statement`, so the four exist once. An optional note is added to each method's docs.
macro_rules! statement_api {
    ($($note:literal)?) => {
        /// Runs a statement and returns every row. Text statements are prepared once per
        /// connection and cached.
        $(#[doc = ""] #[doc = $note])?
        pub async fn query<S: ?Sized + ToStatement>(
            &self,
            statement: &S,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<Vec<Row>, Error> {
            self.run_statement(statement.to_statement(), params, $crate::connection::ops::Query)
                .await
        }

        /// Runs a statement that must return exactly one row.
        $(#[doc = ""] #[doc = $note])?
        pub async fn query_one<S: ?Sized + ToStatement>(
            &self,
            statement: &S,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<Row, Error> {
            self.run_statement(statement.to_statement(), params, $crate::connection::ops::QueryOne)
                .await
        }

        /// Runs a statement that returns at most one row.
        $(#[doc = ""] #[doc = $note])?
        pub async fn query_opt<S: ?Sized + ToStatement>(
            &self,
            statement: &S,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<Option<Row>, Error> {
            self.run_statement(statement.to_statement(), params, $crate::connection::ops::QueryOpt)
                .await
        }

        /// Runs a statement and returns the number of rows it changed.
        $(#[doc = ""] #[doc = $note])?
        pub async fn execute<S: ?Sized + ToStatement>(
            &self,
            statement: &S,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<u64, Error> {
            self.run_statement(statement.to_statement(), params, $crate::connection::ops::Execute)
                .await
        }
    };
}
pub(crate) use statement_api;

/// The query methods of [`PooledConnection`] and [`Transaction`]; each forwards to the
/// [`Session`] so that the instrumentation point exists once.
macro_rules! query_api {
    () => {
        /// Runs `op` for one statement on this connection, through its instrumentation point.
        async fn run_statement<O: Op>(
            &self,
            statement: StatementRef<'_>,
            params: &[&(dyn ToSql + Sync)],
            op: O,
        ) -> Result<O::Output, Error> {
            let opens_txn = may_open_transaction(statement.sql(), false);
            self.session()
                .run(statement, params, opens_txn, op, None)
                .await
        }

        statement_api!();

        /// Prepares a statement, or returns it from this connection's cache.
        pub async fn prepare(&self, sql: &str) -> Result<Statement, Error> {
            self.session().prepare(sql).await
        }

        /// Runs one or more statements with the simple protocol and returns their rows as text.
        /// No parameters: never build this text from user input.
        pub async fn simple_query(&self, sql: &str) -> Result<Vec<SimpleQueryMessage>, Error> {
            self.session().simple_query(sql).await
        }

        /// Runs one or more statements with the simple protocol, discarding rows (migrations,
        /// `SET`, DDL). No parameters: never build this text from user input.
        pub async fn batch_execute(&self, sql: &str) -> Result<(), Error> {
            self.session().batch_execute(sql).await
        }
    };
}

/// A connection checked out of the pool. Dropping it returns the connection: rolled back first if
/// a transaction may be open, closed instead if it broke, was invalidated, or its user was
/// cancelled mid-statement.
pub struct PooledConnection {
    conn: ManuallyDrop<Conn>,
    shared: Arc<Shared>,
    /// Checked out through [`Pool::read`](crate::Pool::read): its transactions are
    /// `READ ONLY` unless the builder says otherwise.
    reads: bool,
}

impl PooledConnection {
    /// Hands `conn` to its user: the code at `location` (`None` for the pool's own checkouts,
    /// which leak detection leaves out).
    #[inline]
    pub(crate) fn new(
        conn: Conn,
        shared: Arc<Shared>,
        location: Option<&'static Location<'static>>,
    ) -> Self {
        // Leak detection off: this one test.
        if let Some(leaks) = shared.leaks() {
            if let (Some(holder), Some(location)) = (&conn.meta.holder, location) {
                crate::leak::checked_out(&shared, leaks, holder, location);
            }
        }
        PooledConnection {
            conn: ManuallyDrop::new(conn),
            shared,
            reads: false,
        }
    }

    /// Marks a connection handed out for reads ([`crate::read`]).
    pub(crate) fn for_reads(mut self) -> Self {
        self.reads = true;
        self
    }

    pub(crate) fn session(&self) -> Session<'_> {
        Session::new(&self.conn, &self.shared)
    }

    query_api!();

    /// Starts a transaction (`BEGIN`). It rolls back when dropped without [`Transaction::commit`].
    pub async fn transaction(&mut self) -> Result<Transaction<'_>, Error> {
        self.build_transaction().start().await
    }

    /// A transaction with an isolation level, read-only or deferrable mode. On a connection
    /// from [`Pool::read`](crate::Pool::read) it is `READ ONLY` unless set otherwise.
    pub fn build_transaction(&mut self) -> TransactionBuilder<'_> {
        let options = TransactionOptions::default();
        TransactionBuilder {
            conn: &mut self.conn,
            shared: &self.shared,
            options: if self.reads {
                options.read_only(true)
            } else {
                options
            },
        }
    }

    /// True when the client already knows the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.conn.client.is_closed()
    }

    /// Bounds this checkout's statements (and its transactions') by `timeout` instead of
    /// `DB_COMMAND_TIMEOUT`; `None` for no bound. A statement past it fails with
    /// [`Error::CommandTimeout`] and is cancelled on the server. The pool's own applies again
    /// once the connection is returned.
    pub fn set_command_timeout(&self, timeout: Option<Duration>) {
        self.conn.meta.set_command_timeout(timeout);
    }

    /// A token that cancels the statement running on this connection, from any task, over the
    /// same kind of socket (TCP, Unix, TLS) the connection uses.
    pub fn cancel_token(&self) -> CancelToken {
        CancelToken {
            target: self.conn.cancel.clone(),
            describe: self.shared.target().clone(),
        }
    }

    /// The pool's identifier of this connection (stable for its lifetime; appears in pool logs).
    pub fn id(&self) -> u64 {
        self.conn.meta.id
    }

    /// The underlying tokio-postgres client, for what the pooled API does not cover (COPY,
    /// portals, typed queries). Statements sent through it bypass echo, slow-query logging and
    /// the statement cache; because the pool cannot see what they did, the connection is rolled
    /// back when it is returned.
    pub fn client(&self) -> &Client {
        self.conn.meta.in_txn.store(true, Ordering::Relaxed);
        &self.conn.client
    }
}

impl Drop for PooledConnection {
    fn drop(&mut self) {
        // SAFETY: `conn` is taken exactly once, here, and never used afterwards.
        let conn = unsafe { ManuallyDrop::take(&mut self.conn) };
        Shared::check_in(&self.shared, conn);
    }
}

impl fmt::Debug for PooledConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledConnection")
            .field("id", &self.conn.meta.id)
            .field("closed", &self.conn.client.is_closed())
            .finish()
    }
}

/// A transaction's isolation level, read-only and deferrable modes; unset ones are the
/// server's defaults (`BEGIN` alone). Used by [`PooledConnection::build_transaction`] and
/// [`Pool::run_transaction_with`](crate::Pool::run_transaction_with).
#[derive(Debug, Clone, Copy, Default)]
pub struct TransactionOptions {
    isolation: Option<IsolationLevel>,
    read_only: Option<bool>,
    deferrable: Option<bool>,
}

impl TransactionOptions {
    /// The server's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// `READ ONLY` when read-only mode was not set either way (reads through
    /// [`Pool::read`](crate::Pool::read)).
    pub(crate) fn read_only_unless_set(mut self) -> Self {
        self.read_only.get_or_insert(true);
        self
    }

    /// Sets the isolation level (`Serializable` is where retrying `40001` matters).
    pub fn isolation_level(mut self, level: IsolationLevel) -> Self {
        self.isolation = Some(level);
        self
    }

    /// Makes the transaction read-only (or explicitly read-write).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = Some(read_only);
        self
    }

    /// Makes a serializable read-only transaction deferrable.
    pub fn deferrable(mut self, deferrable: bool) -> Self {
        self.deferrable = Some(deferrable);
        self
    }
}

/// A transaction about to start; see [`PooledConnection::build_transaction`].
pub struct TransactionBuilder<'a> {
    conn: &'a mut Conn,
    shared: &'a Shared,
    options: TransactionOptions,
}

impl<'a> TransactionBuilder<'a> {
    /// Sets every option at once.
    pub fn options(mut self, options: TransactionOptions) -> Self {
        self.options = options;
        self
    }

    /// Sets the isolation level.
    pub fn isolation_level(self, level: IsolationLevel) -> Self {
        let options = self.options.isolation_level(level);
        self.options(options)
    }

    /// Makes the transaction read-only (or explicitly read-write).
    pub fn read_only(self, read_only: bool) -> Self {
        let options = self.options.read_only(read_only);
        self.options(options)
    }

    /// Makes a serializable read-only transaction deferrable.
    pub fn deferrable(self, deferrable: bool) -> Self {
        let options = self.options.deferrable(deferrable);
        self.options(options)
    }

    /// Sends `BEGIN` with the chosen options.
    pub async fn start(self) -> Result<Transaction<'a>, Error> {
        // A checked-out connection has one owner (only the pool's lanes share connections,
        // and they never hand one to a checkout while shared): tokio-postgres needs `&mut`.
        let conn: &'a mut ConnInner =
            Arc::get_mut(self.conn).expect("a checked-out connection has a single owner");
        let ConnInner {
            client,
            meta,
            cancel,
            ..
        } = conn;
        let meta: &'a Meta = meta;
        let cancel: &'a Arc<CancelTarget> = cancel;
        let TransactionOptions {
            isolation,
            read_only,
            deferrable,
        } = self.options;
        let mut builder = client.build_transaction();
        if let Some(level) = isolation {
            builder = builder.isolation_level(level);
        }
        if let Some(ro) = read_only {
            builder = builder.read_only(ro);
        }
        if let Some(d) = deferrable {
            builder = builder.deferrable(d);
        }
        meta.in_txn.store(true, Ordering::Relaxed);
        let started = Started::now(meta, self.shared);
        let inner = started.complete(meta, "BEGIN", &[], builder.start().await, false)?;
        Ok(Transaction {
            inner: Some(inner),
            meta,
            cancel,
            shared: self.shared,
            depth: 0,
        })
    }
}

/// A transaction (or, nested, a savepoint). Dropped without [`commit`](Transaction::commit) it
/// rolls back: the `ROLLBACK` is queued on the connection before anything else can be sent.
pub struct Transaction<'a> {
    inner: Option<tokio_postgres::Transaction<'a>>,
    meta: &'a Meta,
    cancel: &'a Arc<CancelTarget>,
    shared: &'a Shared,
    depth: u32,
}

impl<'a> Transaction<'a> {
    fn session(&self) -> Session<'_> {
        Session {
            client: self.client_ref(),
            meta: self.meta,
            cancel: self.cancel,
            shared: self.shared,
        }
    }

    fn client_ref(&self) -> &Client {
        match &self.inner {
            Some(t) => t.client(),
            // `inner` is only taken by commit/rollback, which consume the transaction.
            None => unreachable!("transaction used after commit or rollback"),
        }
    }

    query_api!();

    /// [`PooledConnection::set_command_timeout`] from inside a transaction: bounds the rest of
    /// this checkout's statements.
    pub fn set_command_timeout(&self, timeout: Option<Duration>) {
        self.meta.set_command_timeout(timeout);
    }

    /// Commits (or, for a savepoint, releases it).
    ///
    /// Fails with [`Error::CommitOutcomeUnknown`] when the connection is lost while `COMMIT` is
    /// in flight: the server may have committed before it went away.
    pub async fn commit(mut self) -> Result<(), Error> {
        let Some(inner) = self.inner.take() else {
            return Ok(());
        };
        if self.depth > 0 {
            return self.finish_with("RELEASE SAVEPOINT", inner.commit()).await;
        }
        // Already closed: COMMIT never reaches the server, so the transaction surely rolled back.
        let sent = !inner.client().is_closed();
        match self.finish_with("COMMIT", inner.commit()).await {
            Err(Error::Db(e)) if sent && is_disconnect(&e) => Err(Error::CommitOutcomeUnknown(e)),
            result => result,
        }
    }

    /// Rolls back (or, for a savepoint, rolls back to it).
    pub async fn rollback(mut self) -> Result<(), Error> {
        let Some(inner) = self.inner.take() else {
            return Ok(());
        };
        let sql = if self.depth == 0 {
            "ROLLBACK"
        } else {
            "ROLLBACK TO SAVEPOINT"
        };
        self.finish_with(sql, inner.rollback()).await
    }

    async fn finish_with(
        &self,
        sql: &str,
        fut: impl Future<Output = Result<(), tokio_postgres::Error>>,
    ) -> Result<(), Error> {
        let started = Started::now(self.meta, self.shared);
        started.complete(self.meta, sql, &[], fut.await, false)?;
        if self.depth == 0 {
            self.meta.in_txn.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Starts a nested transaction as a savepoint.
    pub async fn transaction(&mut self) -> Result<Transaction<'_>, Error> {
        let (meta, cancel, shared, depth) = (self.meta, self.cancel, self.shared, self.depth + 1);
        let Some(inner) = self.inner.as_mut() else {
            return Err(Error::Closed);
        };
        let started = Started::now(meta, shared);
        let t = started.complete(meta, "SAVEPOINT", &[], inner.transaction().await, false)?;
        Ok(Transaction {
            inner: Some(t),
            meta,
            cancel,
            shared,
            depth,
        })
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        // tokio-postgres queues the ROLLBACK when `inner` drops, ahead of any later statement,
        // so the connection is clean for its next statement without a round trip here.
        if self.inner.take().is_some() && self.depth == 0 {
            self.meta.in_txn.store(false, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_keyword_skips_comments_and_space() {
        assert_eq!(first_keyword("  -- hi\n /* x */ (SELECT 1)"), "SELECT");
        assert_eq!(first_keyword("begin;"), "begin");
        assert_eq!(first_keyword("/* unterminated"), "");
        for sql in ["/* unterminated", "-- only", "", "  SET x"] {
            let word = first_keyword(sql);
            let start = word.as_ptr() as usize - sql.as_ptr() as usize;
            assert!(start + word.len() <= sql.len(), "{sql:?}");
        }
        assert_eq!(after_first_keyword("/* SET */ SET x = 1"), " x = 1");
    }

    #[test]
    fn case_insensitive_search() {
        assert!(contains_ci(b"xxBeGiN", b"begin"));
        assert!(contains_ci(b"bbegin", b"begin"));
        assert!(!contains_ci(b"begi", b"begin"));
        assert!(!contains_ci(b"", b"begin"));
        assert!(contains_ci(b"SELECT PG_ADVISORY_LOCK(1)", b"advisory"));
        assert!(calls_session_function(b"select PG_Advisory_Lock_Shared(1)"));
        assert!(calls_session_function(b"SELECT set_config('a','b',false)"));
        assert!(!calls_session_function(
            b"SELECT user_id, set_at FROM advisory_notes"
        ));
        assert!(!calls_session_function(b"SELECT pg_advisory_xact_lock(1)"));
    }

    #[test]
    fn session_state_statements_are_seen() {
        for sql in [
            "SET search_path = app",
            "set role app",
            "SET SESSION AUTHORIZATION app",
            "SET SESSION statement_timeout = 5",
            "/* SET LOCAL */ SET search_path = app",
            "-- SET TRANSACTION\nSET role admin",
            "/* x */ RESET ALL",
            "LISTEN ch",
            "UNLISTEN *",
            "PREPARE p AS SELECT 1",
            "DEALLOCATE ALL",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "DISCARD ALL",
            "CREATE TEMP TABLE t (a int)",
            "create temporary table t (a int)",
            "CREATE LOCAL TEMPORARY VIEW v AS SELECT 1",
            "SELECT * INTO TEMP t FROM x",
            "SELECT pg_advisory_lock(1)",
            "SELECT pg_try_advisory_lock_shared(1)",
            "SELECT pg_advisory_unlock_all()",
            "SELECT set_config('app.user', 'x', false)",
            "LOAD 'auto_explain'",
            "DO $$ BEGIN PERFORM 1; END $$",
        ] {
            assert!(changes_session(sql), "{sql}");
        }
        for sql in [
            "SELECT 1",
            "SET LOCAL statement_timeout = 5",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "UPDATE t SET a = 1",
            "SELECT pg_advisory_xact_lock(1)",
            "INSERT INTO t VALUES (1)",
            "CREATE TABLE t (a int)",
            "WITH x AS (SELECT 1) SELECT * FROM x",
        ] {
            assert!(!changes_session(sql), "{sql}");
        }
    }

    #[test]
    fn transaction_openers_are_seen() {
        assert!(may_open_transaction("BEGIN", false));
        assert!(may_open_transaction(" start transaction", false));
        assert!(!may_open_transaction("SELECT begin_date FROM t", false));
        assert!(may_open_transaction("begin;", false));
        assert!(may_open_transaction("Start Transaction", false));
        assert!(may_open_transaction("/* tag */ BEGIN", false));
        assert!(!may_open_transaction("BEGINNING", false));
        assert!(!may_open_transaction("STARTS", false));
        assert!(!may_open_transaction("BEG", false));
        assert!(!may_open_transaction("", false));
        assert!(may_open_transaction("SELECT 1; BEGIN; SELECT 2", true));
        assert!(!may_open_transaction("SELECT 1", true));
    }
}
