//! Retrying transient failures (DESIGN §5): the seed's tenacity policy
//! (`stop_after_attempt(3)`, `wait_exponential(multiplier=1, min=1, max=10)`), with optional
//! jitter and an overall deadline, and the pool methods that run a closure under it.
//!
//! * [`Pool::run`] runs a closure with a connection; each attempt checks out a fresh one.
//! * [`Pool::run_transaction`] (and [`Pool::run_transaction_with`]) runs it inside a transaction
//!   and commits at the end; the whole transaction is the unit that is retried.
//!
//! Only transient failures are retried: lost or refused connections, `57P01`/`57P02`/`57P03`
//! (server shutting down, crashed, starting up), `53300` (too many clients) and, for whole
//! transactions, `40001` (serialization failure) and `40P01` (deadlock); on a pool that follows
//! the primary (`target_session_attrs=read-write` or `primary`), `25006` when the server itself
//! turned read-only (demoted, or fenced with `default_transaction_read_only`; the pool then
//! replaces its connections), not when the caller's own transaction is `READ ONLY`. Constraint violations,
//! syntax errors, data errors and anything else are returned at once. A connection lost while
//! `COMMIT` was in flight gives [`Error::CommitOutcomeUnknown`], which is returned as it is
//! unless the policy says the transaction is [idempotent](RetryPolicy::idempotent).
//!
//! Each retry logs a warning on target [`RETRY_TARGET`] (fields `attempt`, `max_attempts`,
//! `wait_ms`, `cause`, `error`) and is counted: in the [`RETRIES`] metric (label `cause`) and in
//! [`RetryPolicy::retries`].
//!
//! ```no_run
//! use tidepool::{Error, Pool, RetryPolicy};
//!
//! # async fn run(pool: Pool) -> Result<(), Error> {
//! let policy = RetryPolicy::default(); // 3 attempts, waits of 1 s then 2 s
//!
//! // Reads: the closure gets `&mut PooledConnection`.
//! let n: i64 = pool
//!     .run(&policy, async |conn| {
//!         Ok(conn.query_one("SELECT count(*) FROM orders", &[]).await?.get(0))
//!     })
//!     .await?;
//!
//! // Writes: the closure gets `&mut Transaction`; the commit happens after it returns `Ok`.
//! let key = "order-42";
//! match pool
//!     .run_transaction(&policy, async |tx| {
//!         tx.execute("INSERT INTO orders (key) VALUES ($1)", &[&key]).await?;
//!         Ok(())
//!     })
//!     .await
//! {
//!     Ok(()) => {}
//!     // Committed or not? Look for the key before doing it again.
//!     Err(Error::CommitOutcomeUnknown(_)) => { /* reconcile through `key` */ }
//!     Err(e) => return Err(e),
//! }
//! # Ok(()) }
//! ```
//!
//! The closures are async closures (`async |conn| { ... }`, stable since Rust 1.85): they borrow
//! the connection or transaction for the attempt and may capture the caller's variables by
//! reference. They run once per attempt, so anything they change outside the database must be
//! safe to repeat.
//!
//! # Closures in `Send` futures
//!
//! Inside a future that must be `Send` (`tokio::spawn`, axum handlers), current compilers reject
//! an async closure that captures references (even `&'static str`) with "implementation of
//! `Send` is not general enough", a known compiler limitation with higher-ranked lifetimes.
//! There, write `async move |..|` and move owned values in (clones, `Arc`s, integers); the
//! closure lends them to each attempt:
//!
//! ```no_run
//! # use tidepool::{Pool, RetryPolicy};
//! # fn spawn_it(pool: Pool, policy: RetryPolicy, name: &str) {
//! let name = name.to_owned();
//! tokio::spawn(async move {
//!     pool.run_transaction(&policy, async move |tx| {
//!         tx.execute("INSERT INTO users (name) VALUES ($1)", &[&name]).await?;
//!         Ok(())
//!     })
//!     .await
//! });
//! # }
//! ```

use std::future::Future;
use std::panic::Location;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use crate::connection::{PooledConnection, Transaction, TransactionOptions};
use crate::error::Error;
use crate::pool::Pool;

/// Log target of retry warnings.
pub const RETRY_TARGET: &str = "tidepool::retry";
/// Counter: retries made by [`Pool::run`] and [`Pool::run_transaction`], by `cause` (see
/// [`cause`]).
pub const RETRIES: &str = "tidepool_retries_total";

/// When and how often to try again. The default is the seed's tenacity policy: 3 attempts,
/// exponential waits of 1 s then 2 s (doubling, capped at 10 s), no jitter, no deadline, not
/// idempotent.
///
/// Cheap to clone; clones share the [`retries`](RetryPolicy::retries) counter.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    max_attempts: usize,
    initial_wait: Duration,
    max_wait: Duration,
    factor: f32,
    jitter: bool,
    deadline: Option<Duration>,
    idempotent: bool,
    retries: Arc<AtomicU64>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_wait: Duration::from_secs(1),
            max_wait: Duration::from_secs(10),
            factor: 2.0,
            jitter: false,
            deadline: None,
            idempotent: false,
            retries: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl RetryPolicy {
    /// The seed's policy (same as [`Default`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// One attempt, no retry: the methods behave as if called without a policy.
    pub fn never() -> Self {
        Self::default().max_attempts(1)
    }

    /// Attempts in all, the first included (at least 1). Default 3.
    pub fn max_attempts(mut self, attempts: usize) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Wait before the second attempt (tenacity's `multiplier`/`min`). Default 1 s.
    pub fn initial_wait(mut self, wait: Duration) -> Self {
        self.initial_wait = wait;
        self
    }

    /// Longest wait between two attempts, before jitter. Default 10 s.
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// How much each wait grows over the previous one. Default 2.
    pub fn factor(mut self, factor: f32) -> Self {
        self.factor = factor;
        self
    }

    /// Adds a random extra of up to 100% to each wait, so clients that failed together do not
    /// all come back together. Default off.
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// Time budget for the whole call, counted from its start: no attempt starts after it, and a
    /// wait that would end past it ends the retries instead. An attempt under way is not
    /// interrupted (bound statements with `statement_timeout` for that). Default none.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Marks the work as safe to apply twice, so that [`Error::CommitOutcomeUnknown`] is retried
    /// like any transient failure. Default false: that error is returned to the caller.
    pub fn idempotent(mut self, idempotent: bool) -> Self {
        self.idempotent = idempotent;
        self
    }

    /// Attempts in all, the first included.
    pub fn attempts(&self) -> usize {
        self.max_attempts
    }

    /// The waits between attempts, before any deadline: `[1 s, 2 s]` for the default policy.
    /// With jitter each call draws new ones.
    pub fn waits(&self) -> impl Iterator<Item = Duration> {
        self.backoff()
    }

    /// Retries made under this policy (and its clones) so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    fn backoff(&self) -> ExponentialBackoff {
        let builder = ExponentialBuilder::new()
            .with_min_delay(self.initial_wait)
            .with_max_delay(self.max_wait)
            .with_factor(self.factor)
            .with_max_times(self.max_attempts - 1);
        if self.jitter {
            builder.with_jitter().build()
        } else {
            builder.build()
        }
    }
}

/// What a closure runs in; decides which SQLSTATEs are worth another attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Statements on a connection ([`Pool::run`]).
    Connection,
    /// A whole transaction ([`Pool::run_transaction`]): serialization failures and deadlocks
    /// are transient too, because the transaction is repeated from its start.
    Transaction,
}

/// Whether another attempt on a fresh connection may succeed where `error` failed.
/// [`Error::CommitOutcomeUnknown`] is never transient here: see [`RetryPolicy::idempotent`].
pub fn is_transient(error: &Error, scope: Scope) -> bool {
    match error {
        Error::Db(e) => match e.code().map(|c| c.code()) {
            Some(code) => transient_code(code, scope),
            // No SQLSTATE: lost connection (closed socket, I/O error, unexpected EOF) or a
            // client-side failure such as a conversion error.
            None => error.is_disconnect(),
        },
        Error::Connect(e) => match e.code() {
            Some(code) => transient_code(code, Scope::Connection),
            None => e.is_transient(),
        },
        // A cached statement went stale inside the transaction (a migration, DISCARD ALL): it
        // was evicted, so the transaction run again from its start prepares it afresh.
        Error::StatementInvalidated(_) => scope == Scope::Transaction,
        // A checkout that timed out because opening connections failed (server down or
        // restarting); a pool that is merely busy is not retried.
        Error::Timeout(t) => t.last_connect_error().is_some_and(|e| match e.code() {
            Some(code) => transient_code(code, Scope::Connection),
            None => e.is_transient(),
        }),
        _ => false,
    }
}

fn transient_code(code: &str, scope: Scope) -> bool {
    match code {
        "57P01" | "57P02" | "57P03" | "53300" => true,
        "40001" | "40P01" => scope == Scope::Transaction,
        _ => false,
    }
}

/// A short label for why `error` was retried, as logged and as the [`RETRIES`] metric's `cause`:
/// `admin_shutdown`, `crash_shutdown`, `cannot_connect_now`, `too_many_connections`,
/// `serialization_failure`, `deadlock_detected`, `read_only_server` (a pool that follows the
/// primary met a demoted one), `commit_outcome_unknown`, `connect_failed`
/// (a checkout that could not open a connection), `statement_invalidated` (a cached statement
/// went stale inside a transaction) or `connection_lost`.
pub fn cause(error: &Error) -> &'static str {
    match error.code() {
        Some("57P01") => "admin_shutdown",
        Some("57P02") => "crash_shutdown",
        Some("57P03") => "cannot_connect_now",
        Some("53300") => "too_many_connections",
        Some("40001") => "serialization_failure",
        Some("40P01") => "deadlock_detected",
        Some("25006") => "read_only_server",
        _ => match error {
            Error::CommitOutcomeUnknown(_) => "commit_outcome_unknown",
            Error::StatementInvalidated(_) => "statement_invalidated",
            Error::Timeout(_) | Error::Connect(_) => "connect_failed",
            _ => "connection_lost",
        },
    }
}

/// Attempts of one call: decides after each failure whether to wait and try again.
struct Attempts<'p> {
    policy: &'p RetryPolicy,
    scope: Scope,
    /// The pool the attempts run on. When it follows the primary
    /// (`target_session_attrs=read-write` or `primary`), a statement refused as read-only
    /// (`25006`) is retried if the server itself turned read-only (the pool then replaced its
    /// connections, so the next attempt finds the new primary).
    pool: &'p Pool,
    started: Instant,
    attempt: usize,
    waits: ExponentialBackoff,
}

impl<'p> Attempts<'p> {
    fn new(policy: &'p RetryPolicy, scope: Scope, pool: &'p Pool) -> Self {
        Attempts {
            policy,
            scope,
            pool,
            started: Instant::now(),
            attempt: 1,
            waits: policy.backoff(),
        }
    }

    /// Attempt `self.attempt` failed with `error`: waits before the next one, or gives the error
    /// back when it is not transient, attempts are used up or the deadline would pass.
    async fn failed(&mut self, error: Error) -> Result<(), Error> {
        let retriable = match &error {
            Error::CommitOutcomeUnknown(_) => self.policy.idempotent,
            e if e.code() == Some("25006") => {
                self.pool.follows_primary() && self.pool.turned_read_only().await
            }
            e => is_transient(e, self.scope),
        };
        if !retriable {
            return Err(error);
        }
        let policy = self.policy;
        let cause = cause(&error);
        let wait = self.waits.next().filter(|wait| {
            policy.deadline.is_none_or(|d| {
                self.started
                    .elapsed()
                    .checked_add(*wait)
                    .is_some_and(|t| t <= d)
            })
        });
        let Some(wait) = wait else {
            if policy.max_attempts == 1 {
                return Err(error);
            }
            tracing::warn!(
                target: RETRY_TARGET,
                attempt = self.attempt,
                max_attempts = policy.max_attempts,
                cause,
                error = %Shown(&error),
                "giving up after a transient failure"
            );
            return Err(error);
        };
        tracing::warn!(
            target: RETRY_TARGET,
            attempt = self.attempt,
            max_attempts = policy.max_attempts,
            wait_ms = wait.as_millis() as u64,
            cause,
            error = %Shown(&error),
            "retrying after a transient failure"
        );
        policy.retries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(RETRIES, "cause" => cause).increment(1);
        drop(error);
        tokio::time::sleep(wait).await;
        self.attempt += 1;
        Ok(())
    }
}

/// Shows an error with the server's message (`Error::Db` alone displays as `db error`).
struct Shown<'a>(&'a Error);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Error::Db(e) => crate::error::ShowError(e).fmt(f),
            e => e.fmt(f),
        }
    }
}

/// The location note of the methods that check out on the caller's behalf.
macro_rules! leak_note {
    () => {
        "With `DB_POOL_LEAK_THRESHOLD` set, a leak report names the caller's location (this \
         method is `#[track_caller]`)."
    };
}

impl crate::ReadPool {
    /// [`Pool::run_transaction`] for reads: each attempt checks out through [`Pool::read`] (a
    /// usable replica, else the primary) and runs `f` in a `READ ONLY` transaction.
    ///
    #[doc = leak_note!()]
    #[track_caller]
    pub fn run_transaction<'s, 'p, T, F>(
        &'s self,
        policy: &'p RetryPolicy,
        f: F,
    ) -> impl Future<Output = Result<T, Error>> + use<'s, 'p, T, F>
    where
        F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, Error>,
    {
        // `READ ONLY` comes from `transaction_at`, as for every read transaction.
        self.transaction_at(policy, TransactionOptions::new(), f, Location::caller())
    }

    /// [`ReadPool::run_transaction`] with an isolation level or deferrable mode (`READ ONLY`
    /// unless `options` says otherwise).
    ///
    #[doc = leak_note!()]
    #[track_caller]
    pub fn run_transaction_with<'s, 'p, T, F>(
        &'s self,
        policy: &'p RetryPolicy,
        options: TransactionOptions,
        f: F,
    ) -> impl Future<Output = Result<T, Error>> + use<'s, 'p, T, F>
    where
        F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, Error>,
    {
        self.transaction_at(policy, options, f, Location::caller())
    }

    /// [`ReadPool::run_transaction_with`] on behalf of the code at `location`.
    async fn transaction_at<T, F>(
        &self,
        policy: &RetryPolicy,
        options: TransactionOptions,
        mut f: F,
        location: &'static Location<'static>,
    ) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, Error>,
    {
        let options = options.read_only_unless_set();
        let mut attempts = Attempts::new(policy, Scope::Transaction, self.primary());
        loop {
            let result = async {
                let mut conn = self.get_at(location).await?;
                let mut tx = conn.build_transaction().options(options).start().await?;
                let value = f(&mut tx).await?;
                tx.commit().await?;
                Ok(value)
            }
            .await;
            match result {
                Ok(value) => return Ok(value),
                Err(e) => attempts.failed(e).await?,
            }
        }
    }

    /// [`Pool::run`] for reads: each attempt checks out through [`Pool::read`] (a usable
    /// replica, else the primary), and its transactions are `READ ONLY`.
    ///
    #[doc = leak_note!()]
    #[track_caller]
    pub fn run<'s, 'p, T, F>(
        &'s self,
        policy: &'p RetryPolicy,
        f: F,
    ) -> impl Future<Output = Result<T, Error>> + use<'s, 'p, T, F>
    where
        F: AsyncFnMut(&mut PooledConnection) -> Result<T, Error>,
    {
        self.run_at(policy, f, Location::caller())
    }

    /// [`ReadPool::run`] on behalf of the code at `location`.
    async fn run_at<T, F>(
        &self,
        policy: &RetryPolicy,
        mut f: F,
        location: &'static Location<'static>,
    ) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut PooledConnection) -> Result<T, Error>,
    {
        let mut attempts = Attempts::new(policy, Scope::Connection, self.primary());
        loop {
            let result = async {
                let mut conn = self.get_at(location).await?;
                f(&mut conn).await
            }
            .await;
            match result {
                Ok(value) => return Ok(value),
                Err(e) => attempts.failed(e).await?,
            }
        }
    }
}

impl Pool {
    /// Runs `f` with a connection under `policy`: each attempt checks out a connection (waiting
    /// up to `DB_POOL_TIMEOUT`), and a transient failure of the checkout or of `f` is retried on
    /// a fresh one after the policy's wait. Other errors, and the last one when the policy gives
    /// up, are returned as they are.
    ///
    /// A statement that was running when its connection was lost may have taken effect, and is
    /// sent again: use this for reads and idempotent writes, and [`Pool::run_transaction`] for
    /// other writes.
    ///
    #[doc = leak_note!()]
    #[track_caller]
    pub fn run<'s, 'p, T, F>(
        &'s self,
        policy: &'p RetryPolicy,
        f: F,
    ) -> impl Future<Output = Result<T, Error>> + use<'s, 'p, T, F>
    where
        F: AsyncFnMut(&mut PooledConnection) -> Result<T, Error>,
    {
        self.run_at(policy, f, Location::caller())
    }

    /// [`Pool::run`] on behalf of the code at `location`.
    async fn run_at<T, F>(
        &self,
        policy: &RetryPolicy,
        mut f: F,
        location: &'static Location<'static>,
    ) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut PooledConnection) -> Result<T, Error>,
    {
        let mut attempts = Attempts::new(policy, Scope::Connection, self);
        loop {
            let result = async {
                let mut conn = self.get_at(Some(location)).await?;
                f(&mut conn).await
            }
            .await;
            match result {
                Ok(value) => return Ok(value),
                Err(e) => attempts.failed(e).await?,
            }
        }
    }

    /// Runs `f` inside a transaction under `policy`, and commits when it returns `Ok`. When `f`
    /// fails the transaction rolls back, and a transient failure (including `40001`
    /// serialization failures and `40P01` deadlocks) repeats the whole transaction on a fresh
    /// connection.
    ///
    /// A connection lost while `COMMIT` was in flight gives [`Error::CommitOutcomeUnknown`]
    /// without retrying, unless the policy is [idempotent](RetryPolicy::idempotent).
    ///
    #[doc = leak_note!()]
    #[track_caller]
    pub fn run_transaction<'s, 'p, T, F>(
        &'s self,
        policy: &'p RetryPolicy,
        f: F,
    ) -> impl Future<Output = Result<T, Error>> + use<'s, 'p, T, F>
    where
        F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, Error>,
    {
        self.transaction_at(policy, TransactionOptions::new(), f, Location::caller())
    }

    /// [`Pool::run_transaction`] with an isolation level, read-only or deferrable mode.
    ///
    #[doc = leak_note!()]
    #[track_caller]
    pub fn run_transaction_with<'s, 'p, T, F>(
        &'s self,
        policy: &'p RetryPolicy,
        options: TransactionOptions,
        f: F,
    ) -> impl Future<Output = Result<T, Error>> + use<'s, 'p, T, F>
    where
        F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, Error>,
    {
        self.transaction_at(policy, options, f, Location::caller())
    }

    /// [`Pool::run_transaction_with`] on behalf of the code at `location`.
    async fn transaction_at<T, F>(
        &self,
        policy: &RetryPolicy,
        options: TransactionOptions,
        mut f: F,
        location: &'static Location<'static>,
    ) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, Error>,
    {
        let mut attempts = Attempts::new(policy, Scope::Transaction, self);
        loop {
            let result = async {
                let mut conn = self.get_at(Some(location)).await?;
                let mut tx = conn.build_transaction().options(options).start().await?;
                let value = f(&mut tx).await?;
                tx.commit().await?;
                Ok(value)
            }
            .await;
            match result {
                Ok(value) => return Ok(value),
                Err(e) => attempts.failed(e).await?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_is_the_seeds() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.attempts(), 3);
        let waits: Vec<_> = policy.waits().collect();
        assert_eq!(waits, [Duration::from_secs(1), Duration::from_secs(2)]);
    }

    #[test]
    fn waits_double_up_to_the_cap() {
        let waits: Vec<_> = RetryPolicy::default().max_attempts(7).waits().collect();
        let secs: Vec<_> = waits.iter().map(|w| w.as_secs_f64()).collect();
        assert_eq!(secs, [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]);
        assert_eq!(RetryPolicy::never().waits().count(), 0);
    }

    #[test]
    fn jitter_stays_within_twice_the_wait() {
        let policy = RetryPolicy::default().max_attempts(5).jitter(true);
        for (wait, base) in policy.waits().zip([1.0, 2.0, 4.0, 8.0]) {
            let w = wait.as_secs_f64();
            assert!(w >= base && w < 2.0 * base, "{w} for {base}");
        }
    }

    #[test]
    fn transient_codes_depend_on_scope() {
        for code in ["57P01", "57P02", "57P03", "53300"] {
            assert!(transient_code(code, Scope::Connection), "{code}");
            assert!(transient_code(code, Scope::Transaction), "{code}");
        }
        for code in ["40001", "40P01"] {
            assert!(!transient_code(code, Scope::Connection), "{code}");
            assert!(transient_code(code, Scope::Transaction), "{code}");
        }
        // Constraint violations, syntax errors, data errors, cancellations: never.
        for code in [
            "23505", "23503", "42601", "42P01", "22012", "22P02", "57014", "28P01",
        ] {
            assert!(!transient_code(code, Scope::Transaction), "{code}");
        }
    }

    #[test]
    fn closed_pool_and_settings_errors_are_not_retried() {
        assert!(!is_transient(&Error::Closed, Scope::Transaction));
    }
}
