//! Statements run on the pool itself ([`Pool::query`] and friends): one statement each, in
//! autocommit mode, with no connection to hold. While a free connection exists (idle, or capacity
//! to open one) a statement takes one, as a checkout would. When every connection is checked out
//! and nobody waits, a statement instead joins a connection that is already running such
//! statements: tokio-postgres pipelines it behind them, each with its own `Sync`, so one
//! statement's error never touches another's. That is PgBouncer's statement mode, inside the
//! process, and it lets ten connections carry more than ten statements at a time.
//!
//! A shared connection is a *lane*. Lanes never hold a transaction (statements that may open one
//! take a connection of their own), a lane whose server has not answered for [`STALL`] takes no
//! more statements (nothing queues behind a slow one), and a lane goes back to the pool, through
//! the usual reset and checks, as soon as its last statement is answered.

use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

use crate::connection::{
    may_open_transaction, statement_api, Conn, Session, StatementRef, ToStatement,
};
use crate::core::Availability;
use crate::error::Error;
use crate::pool::{Pool, Shared};

/// Statements in flight on one lane at most. Deep enough for the pipelining to pay (a batch of
/// statements per write and per wakeup), shallow enough that a lane's last statement waits for
/// at most this many answers before its own.
const MAX_DEPTH: u32 = 16;

/// A lane whose server has not answered for this long is running something slow: later
/// statements take another lane or wait for a connection instead of queueing behind it.
const STALL: Duration = Duration::from_millis(5);
const STALL_TICKS: u64 = STALL.as_nanos() as u64;

/// The lanes of one pool.
pub(crate) struct Lanes {
    lanes: Mutex<LaneSet>,
    /// Signalled when a lane answers or closes, or a connection or capacity is given back:
    /// statements waiting for room look again.
    changed: Notify,
    /// Statements waiting on `changed`: returning a connection only signals when there are some.
    waiting: AtomicUsize,
}

/// The lanes, and how many statements joined one (counted here, under the lock a join holds
/// anyway, rather than in a counter both workers would write).
struct LaneSet {
    lanes: Vec<Lane>,
    joined: u64,
}

/// A checked-out connection shared by pipelined statements.
struct Lane {
    conn: Conn,
    in_flight: u32,
    /// When the server last answered a statement of this lane (or when the lane opened), in the
    /// pool's clock ticks.
    progress: u64,
    /// A statement was abandoned mid-flight: the lane takes no more, and the connection is
    /// closed once the others are answered (as for an interrupted checkout).
    draining: bool,
}

impl Lanes {
    /// No lanes; room for `expected` without allocating.
    pub(crate) fn new(expected: usize) -> Self {
        Lanes {
            lanes: Mutex::new(LaneSet {
                lanes: Vec::with_capacity(expected),
                joined: 0,
            }),
            changed: Notify::new(),
            waiting: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LaneSet> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Statements that joined a busy connection, for [`Status`](crate::Status).
    pub(crate) fn joined(&self) -> u64 {
        self.lock().joined
    }

    /// Joins the least busy lane that is answering, healthy and current (`now` in the pool's
    /// clock ticks). `Err` when no lane exists at all (a statement then waits for a connection
    /// like a checkout).
    fn join(&self, shared: &Shared, now: u64) -> Result<Option<Conn>, NoLanes> {
        let mut set = self.lock();
        let set = &mut *set;
        if set.lanes.is_empty() {
            return Err(NoLanes);
        }
        loop {
            let lane = set
                .lanes
                .iter_mut()
                .filter(|l| {
                    !l.draining
                        && l.in_flight < MAX_DEPTH
                        && now.saturating_sub(l.progress) < STALL_TICKS
                })
                .min_by_key(|l| l.in_flight);
            let Some(lane) = lane else {
                return Ok(None);
            };
            if shared.unusable(&lane.conn).is_some() {
                // Broken or invalidated: it takes nothing more and goes back when drained.
                lane.draining = true;
                continue;
            }
            lane.in_flight += 1;
            set.joined += 1;
            return Ok(Some(lane.conn.clone()));
        }
    }

    /// Makes a freshly checked-out connection a lane with one statement in flight.
    fn open(&self, conn: &Conn, now: u64) {
        self.lock().lanes.push(Lane {
            conn: conn.clone(),
            in_flight: 1,
            progress: now,
            draining: false,
        });
    }

    /// A statement of the lane of `conn` is over (`answered`) or was abandoned. Returns the
    /// connection when that was the lane's last statement: the caller gives it back to the pool.
    fn leave(&self, conn: Conn, answered: Option<u64>) -> Option<Conn> {
        let mut set = self.lock();
        let i = set.lanes.iter().position(|l| Arc::ptr_eq(&l.conn, &conn))?;
        let lane = &mut set.lanes[i];
        lane.in_flight -= 1;
        match answered {
            Some(at) => lane.progress = lane.progress.max(at),
            None => lane.draining = true,
        }
        if lane.in_flight > 0 {
            // A statement waiting for room counts itself before it looks at the lanes under
            // this lock: either its look comes after this section and sees the room made here,
            // or this load sees its count. The lock orders both, so no fence is needed.
            let waiting = self.waiting.load(Ordering::Relaxed) > 0;
            drop(set);
            if waiting {
                self.changed.notify_waiters();
            }
            return None;
        }
        drop(set.lanes.swap_remove(i));
        Some(conn)
    }

    /// Whether any lane exists.
    fn exist(&self) -> bool {
        !self.lock().lanes.is_empty()
    }

    /// Wakes statements waiting for room, if any: called after a connection or capacity went
    /// back to the pool's core.
    pub(crate) fn wake_waiting(&self) {
        // Pairs with the increment in `Ticket::take`: either that statement's next look sees
        // what was given back, or this load sees the statement.
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }
}

/// No lane exists.
struct NoLanes;

/// Counts a statement as waiting for room while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where a statement can run now.
enum Room {
    /// On this lane, joined already.
    Lane(Conn),
    /// On a connection of its own: one is free, or none is shared (wait for one like a checkout).
    Connection,
    /// Nowhere yet: every lane is full or stalled, or checkouts wait for the lanes to drain.
    Wait,
}

/// Where a statement can run now (`now` in the pool's clock ticks).
fn room(shared: &Shared, now: u64) -> Room {
    match shared.availability() {
        Availability::Free => Room::Connection,
        Availability::Exhausted => match shared.lanes.join(shared, now) {
            Ok(Some(conn)) => Room::Lane(conn),
            Ok(None) => Room::Wait,
            Err(NoLanes) => Room::Connection,
        },
        // Checkouts are waiting: let the lanes drain to them rather than queue behind them,
        // which would keep their queue from ever emptying.
        Availability::Contended if shared.lanes.exist() => Room::Wait,
        Availability::Contended => Room::Connection,
    }
}

/// One statement's place on a lane. Dropping it leaves the lane; the last to leave returns the
/// connection to the pool. A future dropped mid-statement leaves it unanswered, which drains the
/// lane and closes the connection.
struct Ticket<'a> {
    shared: &'a Arc<Shared>,
    conn: Option<Conn>,
    /// When the statement took its place.
    at: Instant,
    /// When the statement was answered (pool clock ticks); `None` while it is not.
    answered: Option<u64>,
}

impl<'a> Ticket<'a> {
    /// A place for one statement: a free connection of its own when there is one (and no
    /// checkout waits), else room on a busy lane, else a connection once one is free (FIFO with
    /// every other checkout), all within `DB_POOL_TIMEOUT`.
    async fn take(shared: &'a Arc<Shared>) -> Result<Ticket<'a>, Error> {
        let mut deadline = None;
        loop {
            let at = Instant::now();
            match room(shared, shared.ticks(at)) {
                Room::Lane(conn) => return Ok(Ticket::new(shared, conn, at)),
                Room::Connection => return Ticket::own(shared).await,
                Room::Wait => {}
            }
            // Registered before looking again, so a lane answering or a connection coming back
            // in between is not missed.
            let changed = shared.lanes.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let _waiting = Waiting::new(&shared.lanes.waiting);
            let at = Instant::now();
            match room(shared, shared.ticks(at)) {
                Room::Lane(conn) => return Ok(Ticket::new(shared, conn, at)),
                Room::Connection => return Ticket::own(shared).await,
                Room::Wait => {}
            }
            let deadline = *deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + shared.pool_timeout());
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(shared.timed_out());
            }
        }
    }

    fn new(shared: &'a Arc<Shared>, conn: Conn, at: Instant) -> Self {
        Ticket {
            shared,
            conn: Some(conn),
            at,
            answered: None,
        }
    }

    /// Checks out a connection and makes it a new lane.
    async fn own(shared: &'a Arc<Shared>) -> Result<Ticket<'a>, Error> {
        let conn = shared.checkout().await?;
        let at = Instant::now();
        shared.lanes.open(&conn, shared.ticks(at));
        Ok(Ticket::new(shared, conn, at))
    }

    fn conn(&self) -> &Conn {
        self.conn
            .as_ref()
            .expect("a ticket holds its connection until dropped")
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.answered.is_none() {
                // Abandoned mid-statement: the connection's state is unknown.
                conn.meta.mark_interrupted();
            }
            if let Some(last) = self.shared.lanes.leave(conn, self.answered) {
                // Returning it wakes statements waiting for room.
                Shared::check_in(self.shared, last);
            }
        }
    }
}

impl Pool {
    statement_api!(
        "On the pool: one statement in autocommit mode, without holding a connection; it may be \
         pipelined with others when every connection is busy (see \
         [statements on the pool](Pool#statements-on-the-pool))."
    );

    /// Runs `op` for one statement on a lane, through the connection's instrumentation point.
    async fn run_statement<T>(
        &self,
        statement: StatementRef<'_>,
        params: &[&(dyn ToSql + Sync)],
        op: impl AsyncFnOnce(&Client, tokio_postgres::Statement) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, Error> {
        let shared = self.shared();
        if may_open_transaction(statement.sql(), false) {
            // A transaction cannot share its connection: run it as a checkout would, so the
            // connection is rolled back on return.
            let conn = self.get().await?;
            return conn
                .session()
                .run(statement, params, true, |c, st| op(c, st))
                .await;
        }
        let mut ticket = Ticket::take(shared).await?;
        let result = Session::lane(ticket.conn(), shared, ticket.at)
            .run(statement, params, false, |c, st| op(c, st))
            .await;
        // The instrumentation point has just recorded when the server answered.
        ticket.answered = Some(ticket.conn().meta.answered_at());
        result
    }
}
