//! Reads on replicas: [`Pool::read`] and the [`ReadPool`] it returns, with the same API as the
//! pool (checkout, statements, transactions), routed to a usable replica ([`crate::replica`]):
//! the least busy up one; on to the next when its connection fails; to the primary when none
//! is usable (unless `DB_REPLICA_FALLBACK=false`). A replica found unusable is marked down and
//! probed back in the background; up and lagging ones have their lag measured while reads
//! arrive.

use std::future::Future;
use std::panic::Location;
use std::sync::Arc;
use std::time::Instant;

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::connection::{statement_api, Op, PooledConnection, StatementRef, ToStatement};
use crate::error::{is_disconnect, Error};
use crate::pool::Pool;
use crate::replica::{ReplicaState, Replicas, LAG_QUERY};

/// How long a replica may take to answer the lag query once connected.
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Log target of replica state changes.
pub const REPLICA_TARGET: &str = "tidepool::replica";

/// Reads routed to the pool's read replicas (`DATABASE_REPLICA_URL`), falling back to the
/// primary. Cheap to clone; made by [`Pool::read`].
///
/// * Statements and checkouts go to the least busy replica that is up: not down (its last
///   connection failed) and not lagging (replay more than `DB_REPLICA_MAX_LAG` behind).
/// * A replica whose connection fails (refused, lost mid-statement, shutting down) is marked
///   down and the same call moves on to the next replica, then to the primary: a read does
///   not fail because one replica went away. Only such failures move on, and a replica cannot
///   have written anything, so nothing runs twice with effect. On the primary, a statement that
///   fails is returned as it is.
/// * Transactions of connections checked out here are `READ ONLY`, on a replica and on the
///   primary alike.
/// * Without replicas configured, everything goes to the primary: code written against
///   `read()` works with or without them.
#[derive(Clone)]
pub struct ReadPool {
    primary: Pool,
}

impl Pool {
    /// A handle for reads: on a read replica when one is usable, else on this pool (see
    /// [`ReadPool`]).
    pub fn read(&self) -> ReadPool {
        ReadPool {
            primary: self.clone(),
        }
    }
}

impl ReadPool {
    /// Checks out a connection on a usable replica (or the primary), waiting up to
    /// `DB_POOL_TIMEOUT`. Its transactions are `READ ONLY`.
    ///
    /// With `DB_POOL_LEAK_THRESHOLD` set, the caller's location is what a leak report names.
    #[track_caller]
    pub fn get(&self) -> impl Future<Output = Result<PooledConnection, Error>> + Send + '_ {
        self.get_at(Location::caller())
    }

    /// [`ReadPool::get`] on behalf of the code at `location`.
    pub(crate) async fn get_at(
        &self,
        location: &'static Location<'static>,
    ) -> Result<PooledConnection, Error> {
        self.route(|pool| pool.get_at(Some(location)))
            .await
            .map(PooledConnection::for_reads)
    }

    /// The pool this handle reads for.
    pub(crate) fn primary(&self) -> &Pool {
        &self.primary
    }

    /// Starts the replicas' lag measurements and probes that are due, in the background, so
    /// figures stay fresh while no reads arrive: `/health/database` and metric scrapes call
    /// it. Reads do it by themselves.
    pub fn refresh(&self) {
        if let Some(replicas) = &self.primary.replicas {
            measure_due(replicas);
        }
    }

    statement_api!(
        "Through [`Pool::read`]: on the least busy usable replica, moving on to the next (and \
         then the primary) when a replica's connection fails."
    );

    async fn run_statement<O: Op>(
        &self,
        statement: StatementRef<'_>,
        params: &[&(dyn ToSql + Sync)],
        op: O,
    ) -> Result<O::Output, Error> {
        self.route(|pool| pool.run_statement(statement, params, op))
            .await
    }

    /// Runs `call` on a usable replica, moving on while replicas' connections fail, and on the
    /// primary when no replica is left (if fallback is on).
    async fn route<'a, T, F, Fut>(&'a self, call: F) -> Result<T, Error>
    where
        F: Fn(&'a Pool) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let Some(replicas) = self.primary.replicas.as_ref() else {
            return call(&self.primary).await;
        };
        measure_due(replicas);
        let mut tried = 0u64;
        let mut last = None;
        while let Some(i) = replicas.pick(Pool::load, tried) {
            if i < 64 {
                tried |= 1 << i;
            }
            let member = &replicas.members[i];
            match call(&member.pool).await {
                Err(e) if unusable(&e) => {
                    let why = e.to_string();
                    if replicas.failed(i, why.clone()) {
                        tracing::warn!(
                            target: REPLICA_TARGET,
                            host = %member.host,
                            error = %why,
                            "read replica down; reads go elsewhere until it answers again"
                        );
                    }
                    last = Some(e);
                }
                // A recovery conflict cancelled the read (`40001`): the replica is fine, the
                // read runs elsewhere.
                Err(e) if e.code() == Some("40001") => last = Some(e),
                other => return other,
            }
        }
        if replicas.fallback {
            return call(&self.primary).await;
        }
        Err(Error::NoReplica {
            replicas: describe(replicas),
            last: last.map(|e| Box::new(e) as Box<Error>),
        })
    }
}

/// Whether `e` says the replica cannot serve reads now (as opposed to a statement's own
/// failure): its connection could not be opened, was lost, or the server is shutting down or
/// starting up.
fn unusable(e: &Error) -> bool {
    match e {
        // A replica's pool fails a connect at once; its timeouts are a busy pool, not a
        // down server.
        Error::Connect(_) => true,
        Error::Db(db) => {
            is_disconnect(db)
                || db
                    .code()
                    .is_some_and(|c| matches!(c.code(), "57P01" | "57P02" | "57P03"))
        }
        _ => false,
    }
}

/// Every replica's host and state, for an error that none could serve.
fn describe(replicas: &Replicas<Pool>) -> String {
    (0..replicas.members.len())
        .map(|i| {
            let s = replicas.snapshot(i);
            let state = match s.state {
                ReplicaState::Up => "up",
                ReplicaState::Lagging => "lagging",
                ReplicaState::Down => "down",
            };
            match s.why {
                Some(why) => format!("{} {state}: {why}", replicas.members[i].host),
                None => format!("{} {state}", replicas.members[i].host),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Starts the lag measurements and probes that are due, each in a task of its own, so the read
/// (or status call) that noticed does not wait for them. Outside a tokio runtime nothing starts.
fn measure_due(replicas: &Arc<Replicas<Pool>>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let due = replicas.due(Instant::now());
    for i in due {
        let mut probe = Probe {
            replicas: replicas.clone(),
            i,
            done: false,
        };
        runtime.spawn(async move {
            let member = &probe.replicas.members[i];
            let result = match measure(&member.pool).await {
                Measure::Lag(lag) => Ok(lag),
                Measure::Failed(why) => Err(why),
                Measure::Busy => return, // the probe's drop reschedules it
            };
            probe.done = true;
            let (before, after) = probe.replicas.measured(i, result);
            if before != after {
                let snapshot = probe.replicas.snapshot(i);
                tracing::info!(
                    target: REPLICA_TARGET,
                    host = %member.host,
                    from = ?before,
                    to = ?after,
                    lag_seconds = snapshot.lag,
                    reason = snapshot.why.as_deref().unwrap_or(""),
                    "read replica state changed"
                );
            }
        });
    }
}

/// A running measurement of one replica. Dropped unfinished (its pool was busy, or the task
/// was dropped with its runtime), it marks the measurement skipped, so another one starts
/// later instead of none ever again.
struct Probe {
    replicas: Arc<Replicas<Pool>>,
    i: usize,
    done: bool,
}

impl Drop for Probe {
    fn drop(&mut self) {
        if !self.done {
            self.replicas.skipped(self.i);
        }
    }
}

/// What one measurement found.
enum Measure {
    /// Replay lag, in seconds.
    Lag(f64),
    /// The replica's pool has every connection in use: it is serving, and not measured now.
    Busy,
    /// No connection, or no answer in time: the replica is down.
    Failed(String),
}

/// One lag measurement (and, for a down replica, the probe that brings it back), within the
/// pool's connect timeout plus [`ANSWER_WITHIN`].
async fn measure(pool: &Pool) -> Measure {
    if pool.load() >= 1.0 {
        return Measure::Busy;
    }
    let limit = pool.settings().connect_timeout + ANSWER_WITHIN;
    let check = async {
        let conn = pool.get_at(None).await.map_err(|e| e.to_string())?;
        let row = conn
            .query_one(LAG_QUERY, &[])
            .await
            .map_err(|e| e.to_string())?;
        row.try_get::<_, f64>(0).map_err(|e| e.to_string())
    };
    match tokio::time::timeout(limit, check).await {
        Ok(Ok(lag)) => Measure::Lag(lag),
        Ok(Err(why)) => Measure::Failed(why),
        Err(_) => Measure::Failed(format!(
            "no answer to the lag query within {} s",
            limit.as_secs_f64()
        )),
    }
}
