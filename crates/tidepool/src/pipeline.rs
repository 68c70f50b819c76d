//! Statements run on the pool itself ([`Pool::query`] and friends): one statement each, in
//! autocommit mode, with no connection to hold. While a free connection exists (idle, or capacity
//! to open one) a statement takes one, as a checkout would. When every connection is checked out
//! and nobody waits, a statement instead joins a connection that is already running such
//! statements: tokio-postgres pipelines it behind them, each with its own `Sync`, so one
//! statement's error never touches another's. That is PgBouncer's statement mode, inside the
//! process, and it lets ten connections carry more than ten statements at a time.
//!
//! A shared connection is a *lane*. Lanes never hold a transaction or session state (statements
//! that may open one, or change the session, take a connection of their own, reset before it is
//! reused), a lane whose server has not answered for [`STALL`] takes no more statements (nothing
//! queues behind a slow one), and a lane goes back to the pool, through the usual reset and
//! checks, as soon as its last statement is answered.
//!
//! Every statement on a lane is bounded: one that joined a busy lane and has not reached the
//! server's turn within `DB_POOL_TIMEOUT` gives up with a timeout, whatever runs ahead of it.
//! A statement whose future is dropped is *abandoned*: the lane takes nothing more, and when the
//! abandoned statement is the one the server runs ([`crate::order`]) a cancel request stops it, so it
//! never runs for nobody and never holds the others up. Should that request reach a neighbour
//! instead (answers and requests cross), the neighbour, alone in autocommit and so without
//! effect, runs once more.
//!
//! Which lane a statement joins ([`choose`]): the fullest of the lanes running cheap statements
//! (answering at least every [`CHEAP`]), else the least busy. Cheap statements gain from deep
//! pipelines on few connections (fewer wake-ups and system calls per statement for the client
//! and the server); lanes that get nothing new drain and go back to the pool, where the next
//! statement takes them as a connection of its own. Slower statements are spread, so none waits
//! behind many others. Either way a free connection is taken first: a statement never queues
//! while a connection sits idle.

use std::pin::pin;
use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::connection::{
    changes_session, is_canceled, may_open_transaction, statement_api, Conn, LaneRequest, Op,
    Session, StatementRef, ToStatement, NOT_SENT,
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

/// A lane that answers at least this often, on average, runs cheap statements: statements pack
/// onto the fullest such lane (see the module docs). At [`MAX_DEPTH`] that is a wait of at most
/// a few milliseconds behind the others.
const CHEAP: Duration = Duration::from_micros(250);
const CHEAP_TICKS: u64 = CHEAP.as_nanos() as u64;

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
    state: LaneState,
}

/// What the choice of a lane looks at.
#[derive(Debug, Clone, Copy)]
struct LaneState {
    in_flight: u32,
    /// When the server last answered a statement of this lane (or when the lane opened), in the
    /// pool's clock ticks.
    progress: u64,
    /// Moving average of the ticks between answers while the lane is busy: a round trip with
    /// one statement at a time, the server's time per statement when many are queued. `None`
    /// until a statement is answered.
    per_answer: Option<u64>,
    /// A statement was abandoned mid-flight: the lane takes no more, and the connection is
    /// closed once the others are answered (as for an interrupted checkout).
    draining: bool,
}

impl LaneState {
    /// A lane opened at `now` with its first statement in flight.
    fn opened(now: u64) -> Self {
        LaneState {
            in_flight: 1,
            progress: now,
            per_answer: None,
            draining: false,
        }
    }

    /// Takes statements at `now`: not draining, not full, and answering.
    fn open_to(&self, now: u64) -> bool {
        !self.draining
            && self.in_flight < MAX_DEPTH
            && now.saturating_sub(self.progress) < STALL_TICKS
    }

    fn cheap(&self) -> bool {
        self.per_answer.is_some_and(|p| p < CHEAP_TICKS)
    }

    /// A statement sent at `sent` was answered at `at`. The sample is the busy time since the
    /// previous answer (or since it was sent, if the lane had nothing to answer before): over a
    /// busy period the samples add up to its length, so they average to the time per answer.
    fn answered(&mut self, sent: u64, at: u64) {
        let gap = at.saturating_sub(self.progress.max(sent));
        self.per_answer = Some(match self.per_answer {
            None => gap,
            // Weight 1/8 for the newest sample.
            Some(old) => old - old / 8 + gap / 8,
        });
        self.progress = self.progress.max(at);
    }
}

/// The lane a statement joins at `now` when no connection is free: the fullest cheap one, else
/// the least busy one, among those that take statements. `None` when none does.
fn choose<'a>(lanes: impl Iterator<Item = &'a LaneState> + Clone, now: u64) -> Option<usize> {
    let open = || lanes.clone().enumerate().filter(|(_, l)| l.open_to(now));
    open()
        .filter(|(_, l)| l.cheap())
        .max_by_key(|(_, l)| l.in_flight)
        .or_else(|| open().min_by_key(|(_, l)| l.in_flight))
        .map(|(i, _)| i)
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

    /// Joins the lane [`choose`] picks among those that are healthy and current (`now` in the
    /// pool's clock ticks). `Err` when no lane exists at all (a statement then waits for a
    /// connection like a checkout).
    fn join(&self, shared: &Shared, now: u64) -> Result<Option<Conn>, NoLanes> {
        let mut set = self.lock();
        let set = &mut *set;
        if set.lanes.is_empty() {
            return Err(NoLanes);
        }
        loop {
            let Some(i) = choose(set.lanes.iter().map(|l| &l.state), now) else {
                return Ok(None);
            };
            let lane = &mut set.lanes[i];
            if shared.unusable(&lane.conn).is_some() {
                // Broken or invalidated: it takes nothing more and goes back when drained.
                lane.state.draining = true;
                continue;
            }
            lane.state.in_flight += 1;
            set.joined += 1;
            return Ok(Some(lane.conn.clone()));
        }
    }

    /// Makes a freshly checked-out connection a lane with one statement in flight.
    fn open(&self, conn: &Conn, now: u64) {
        self.lock().lanes.push(Lane {
            conn: conn.clone(),
            state: LaneState::opened(now),
        });
    }

    /// A statement of the lane of `conn`, sent at `sent`, is over (`answered`) or was abandoned.
    /// Returns the connection when that was the lane's last statement: the caller gives it back
    /// to the pool. Otherwise the caller's handle is dropped here, under the lock, so that
    /// whoever leaves last holds the only handle (a checked-out connection has one owner).
    fn leave(&self, conn: Conn, sent: u64, answered: Option<u64>) -> Option<Conn> {
        let mut set = self.lock();
        let i = set.lanes.iter().position(|l| Arc::ptr_eq(&l.conn, &conn))?;
        let lane = &mut set.lanes[i].state;
        lane.in_flight -= 1;
        match answered {
            Some(at) => lane.answered(sent, at),
            None => lane.draining = true,
        }
        if lane.in_flight > 0 {
            drop(conn);
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
        // Joining a lane means waiting behind its statements, and there is no time to wait.
        Availability::Exhausted if shared.pool_timeout().is_zero() => Room::Wait,
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
/// lane; the statement is cancelled once the server runs it ([`crate::order`]), and the connection is
/// reused only after the server answered everything (see `Shared::check_in`).
struct Ticket<'a> {
    shared: &'a Arc<Shared>,
    conn: Option<Conn>,
    /// It joined a busy lane (rather than opening one): it waits behind others.
    joined: bool,
    /// When the statement took its place (pool clock ticks).
    sent: u64,
    /// When the statement was answered (pool clock ticks); `None` while it is not.
    answered: Option<u64>,
}

impl<'a> Ticket<'a> {
    /// A place for one statement: a free connection of its own when there is one (and no
    /// checkout waits), else room on a busy lane, else a connection once one is free (FIFO with
    /// every other checkout), waiting until `DB_POOL_TIMEOUT` after `start` at most. `start`
    /// (pool clock ticks) is the call's first look, set here when `None`.
    async fn take(shared: &'a Arc<Shared>, start: &mut Option<u64>) -> Result<Ticket<'a>, Error> {
        loop {
            if let Some(placed) = Ticket::look(shared, start).await {
                return placed;
            }
            // Registered before looking again, so a lane answering or a connection coming back
            // in between is not missed.
            let changed = shared.lanes.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let _waiting = Waiting::new(&shared.lanes.waiting);
            if let Some(placed) = Ticket::look(shared, start).await {
                return placed;
            }
            let deadline = call_deadline(shared, start.unwrap_or(0));
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(shared.timed_out());
            }
        }
    }

    /// One look for room: a place on a lane, or a connection of its own (waited for like a
    /// checkout), or `None` when the statement must wait for room.
    async fn look(
        shared: &'a Arc<Shared>,
        start: &mut Option<u64>,
    ) -> Option<Result<Ticket<'a>, Error>> {
        let sent = shared.ticks(Instant::now());
        start.get_or_insert(sent);
        match room(shared, sent) {
            Room::Lane(conn) => Some(Ok(Ticket::new(shared, conn, true, sent))),
            Room::Connection => Some(Ticket::own(shared).await),
            Room::Wait => None,
        }
    }

    fn new(shared: &'a Arc<Shared>, conn: Conn, joined: bool, sent: u64) -> Self {
        Ticket {
            shared,
            conn: Some(conn),
            joined,
            sent,
            answered: None,
        }
    }

    /// Checks out a connection and makes it a new lane.
    async fn own(shared: &'a Arc<Shared>) -> Result<Ticket<'a>, Error> {
        let conn = shared.checkout().await?;
        let sent = shared.ticks(Instant::now());
        shared.lanes.open(&conn, sent);
        Ok(Ticket::new(shared, conn, false, sent))
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
            if let Some(last) = self.shared.lanes.leave(conn, self.sent, self.answered) {
                // Returning it wakes statements waiting for room.
                Shared::check_in(self.shared, last);
            }
        }
    }
}

/// `DB_POOL_TIMEOUT` after `start` (pool clock ticks): when a statement on the pool gives up,
/// whether it waits for room or for its turn behind others.
fn call_deadline(shared: &Shared, start: u64) -> tokio::time::Instant {
    let wait = Duration::from_nanos(start) + shared.pool_timeout();
    tokio::time::Instant::from_std(shared.epoch() + wait)
}

impl Pool {
    statement_api!(
        "On the pool: one statement in autocommit mode, without holding a connection; it may be \
         pipelined with others when every connection is busy (see \
         [statements on the pool](Pool#statements-on-the-pool))."
    );

    /// Runs `op` for one statement on a lane, through the connection's instrumentation point.
    pub(crate) async fn run_statement<O: Op>(
        &self,
        statement: StatementRef<'_>,
        params: &[&(dyn ToSql + Sync)],
        op: O,
    ) -> Result<O::Output, Error> {
        let shared = self.shared();
        let sql = statement.sql();
        let opens_txn = may_open_transaction(sql, false);
        if opens_txn || changes_session(sql) {
            // A transaction or session state cannot share its connection: run it as a
            // checkout would. The connection is rolled back, or reset with `DISCARD ALL`,
            // before anyone else gets it.
            let conn = self.get_at(None).await?;
            let session = conn.session();
            if !opens_txn {
                session.session_changed();
            }
            return session.run(statement, params, opens_txn, op, None).await;
        }
        let mut retried = false;
        let mut start = None;
        loop {
            let mut ticket = Ticket::take(shared, &mut start).await?;
            let cancels = ticket.conn().meta.cancels.load(Ordering::Relaxed);
            let result = {
                let conn = ticket.conn();
                let lane = LaneRequest {
                    shared,
                    conn,
                    seq: AtomicU64::new(NOT_SENT),
                };
                let session = Session::new(conn, shared);
                let mut run = pin!(session.run(statement, params, false, op, Some(&lane)));
                if ticket.joined {
                    // A statement behind others gives up when its turn has not come within
                    // DB_POOL_TIMEOUT of the call: whatever runs ahead of it (a lock wait, a
                    // long statement, a task waiting for this very statement) cannot hold it
                    // longer than a checkout would wait. Given up, it is abandoned: cancelled
                    // when its turn comes, so it never runs for nobody.
                    let deadline = call_deadline(shared, start.unwrap_or(ticket.sent));
                    match tokio::time::timeout_at(deadline, &mut run).await {
                        Ok(result) => result,
                        Err(_) if lane.started() => run.await,
                        Err(_) => return Err(shared.timed_out_behind()),
                    }
                } else {
                    run.await
                }
            };
            // The instrumentation point has just recorded when the server answered.
            ticket.answered = Some(ticket.conn().meta.answered_at());
            // Cancelled by a request the pool sent for an abandoned neighbour on this lane
            // (answers and requests cross): this statement then did nothing (it ran alone, in
            // autocommit). Once more, elsewhere: the lane takes nothing new.
            let hit = matches!(&result, Err(e) if cancelled_by_request(e))
                && ticket.conn().meta.cancels.load(Ordering::Relaxed) != cancels;
            if hit && !retried {
                retried = true;
                continue;
            }
            return result;
        }
    }
}

/// SQLSTATE `57014` with the message of a cancel request (not `statement_timeout` or another
/// cause of the same code, which running again would not cure).
fn cancelled_by_request(e: &Error) -> bool {
    is_canceled(e)
        && matches!(e, Error::Db(db) if db.as_db_error()
            .is_some_and(|d| d.message() == "canceling statement due to user request"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: u64 = 1_000;

    fn lane(in_flight: u32, per_answer_us: Option<u64>) -> LaneState {
        LaneState {
            in_flight,
            progress: 0,
            per_answer: per_answer_us.map(|p| p * US),
            draining: false,
        }
    }

    #[test]
    fn cheap_lanes_pack_onto_the_fullest() {
        let lanes = [lane(3, Some(50)), lane(9, Some(50)), lane(1, Some(50))];
        assert_eq!(choose(lanes.iter(), 0), Some(1));
    }

    #[test]
    fn slower_lanes_spread_onto_the_least_busy() {
        let lanes = [lane(3, Some(800)), lane(9, Some(800)), lane(2, None)];
        assert_eq!(choose(lanes.iter(), 0), Some(2));
    }

    #[test]
    fn a_cheap_lane_wins_over_a_less_busy_slow_one() {
        let lanes = [lane(1, Some(2_000)), lane(6, Some(40))];
        assert_eq!(choose(lanes.iter(), 0), Some(1));
    }

    #[test]
    fn full_stalled_and_draining_lanes_take_nothing() {
        let full = lane(MAX_DEPTH, Some(10));
        let mut draining = lane(1, Some(10));
        draining.draining = true;
        let stalled = lane(1, Some(10)); // progress 0, asked at STALL
        assert_eq!(choose([full, draining].iter(), 0), None);
        assert_eq!(choose([stalled].iter(), STALL_TICKS), None);
        assert_eq!(
            choose([full, draining, lane(5, Some(900))].iter(), 0),
            Some(2)
        );
        assert_eq!(choose([].iter(), 0), None);
    }

    #[test]
    fn time_per_answer_averages_busy_time_not_idle_time() {
        let mut l = LaneState::opened(0);
        // Alone on the lane: the sample is the round trip.
        l.answered(0, 300 * US);
        assert_eq!(l.per_answer, Some(300 * US));
        assert_eq!(l.progress, 300 * US);
        // Sent long after the last answer: idle time before it does not count.
        l.answered(10_000 * US, 10_300 * US);
        assert_eq!(l.per_answer, Some(300 * US));
        // Queued behind it: answered 40 µs after the previous answer.
        for k in 1..=40 {
            l.answered(10_000 * US, 10_300 * US + k * 40 * US);
        }
        assert!(l.per_answer.unwrap() < 45 * US, "{:?}", l.per_answer);
        assert!(l.cheap());
    }
}
