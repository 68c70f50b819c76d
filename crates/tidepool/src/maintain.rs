//! The pool's maintenance task: idle trimming (`DB_POOL_IDLE_TIMEOUT` down to
//! `DB_POOL_MIN_IDLE`), keepalive pings of idle connections (`DB_POOL_KEEPALIVE`) and refilling
//! `DB_POOL_MIN_IDLE` after connections die. One task per pool, started the first time the
//! pool is used inside a tokio runtime, and only when one of the settings asks for it; it
//! holds the pool weakly, so it ends when the pool is dropped, and it ends on
//! [`Pool::close`](crate::Pool::close). Its rounds are jittered (±10%), so pools started
//! together do not ping or reconnect in step.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::instrument::CloseReason;
use crate::pool::Shared;

/// Bounds of the time between rounds.
const MIN_ROUND: Duration = Duration::from_millis(50);
const MAX_ROUND: Duration = Duration::from_secs(30);
/// Between refills of `DB_POOL_MIN_IDLE` when nothing else sets the pace.
const REFILL_ROUND: Duration = Duration::from_secs(1);

/// What the maintenance task does for one pool, from its settings.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    idle_timeout: Option<Duration>,
    keepalive: Option<Duration>,
    min_idle: usize,
    /// Time between rounds: half the shortest period asked for.
    round: Duration,
}

impl Plan {
    /// The plan for these settings; `None` when none of them asks for a task.
    pub(crate) fn new(
        idle_timeout: Option<Duration>,
        keepalive: Option<Duration>,
        min_idle: usize,
    ) -> Option<Plan> {
        let periods = [
            idle_timeout.map(|d| d / 2),
            keepalive.map(|d| d / 2),
            (min_idle > 0).then_some(REFILL_ROUND),
        ];
        let round = periods.into_iter().flatten().min()?;
        Some(Plan {
            idle_timeout,
            keepalive,
            min_idle,
            round: round.clamp(MIN_ROUND, MAX_ROUND),
        })
    }
}

impl Shared {
    /// Starts the maintenance task if the pool has a plan, none runs yet and a runtime is
    /// there to run it.
    pub(crate) fn start_maintenance(self: &Arc<Self>) {
        let Some(plan) = self.maintenance else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.maintaining.swap(true, Ordering::AcqRel) {
            return;
        }
        runtime.spawn(run(Arc::downgrade(self), plan));
    }

    /// Closes the idle connections whose socket the client knows is closed (the server ended
    /// the session, or went away), so `min_idle` counts only live ones.
    fn drop_dead_idle(&self) {
        for conn in self.core.remove_idle(|c| c.client.is_closed()) {
            self.discard(conn, CloseReason::Broken);
        }
    }

    /// Closes connections idle past the idle timeout, keeping `min_idle` of them.
    fn trim_idle(&self, plan: &Plan, now: u64) {
        let Some(timeout) = plan.idle_timeout else {
            return;
        };
        let limit = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        let idle = self.core.counts().idle;
        let mut surplus = idle.saturating_sub(plan.min_idle);
        let stale = self.core.remove_idle(|c| {
            let expired = surplus > 0 && now.saturating_sub(c.meta.answered_at()) > limit;
            if expired {
                surplus -= 1;
            }
            expired
        });
        for conn in stale {
            self.discard(conn, CloseReason::Idle);
        }
    }

    /// Pings the idle connections the server has not answered on within the keepalive
    /// period; those that answer go back, the others are closed.
    async fn keep_alive(&self, plan: &Plan, now: u64) {
        let Some(period) = plan.keepalive else {
            return;
        };
        let limit = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX);
        // One at a time: the others stay idle, ready for checkouts, while one is pinged.
        // Each is taken at most once a round (a pinged one has just answered).
        loop {
            let mut taken = false;
            let due = self.core.remove_idle(|c| {
                let pick = !taken && now.saturating_sub(c.meta.answered_at()) > limit;
                taken |= pick;
                pick
            });
            let Some(conn) = due.into_iter().next() else {
                return;
            };
            let ping = tokio::time::timeout(self.round_trip_limit, conn.client.check_connection());
            match ping.await {
                Ok(Ok(())) => {
                    conn.meta.answered(self.ticks(Instant::now()));
                    self.release(conn);
                }
                _ => {
                    self.stats.ping_failures.fetch_add(1, Ordering::Relaxed);
                    self.discard(conn, CloseReason::PingFailed);
                }
            }
        }
    }

    /// Opens connections until `min_idle` are idle (never more than `pool_size` open).
    async fn refill(&self, plan: &Plan) {
        while self.core.counts().idle < plan.min_idle && self.core.try_reserve(self.pool_size()) {
            match self.open(self.settings.connect_timeout).await {
                Ok(conn) => self.release(conn),
                Err(_) => {
                    // Logged and recorded by `open`; tried again next round.
                    self.release_slot();
                    return;
                }
            }
        }
    }
}

/// The task: a round every `plan.round` (jittered) until the pool is gone or closed.
async fn run(pool: Weak<Shared>, plan: Plan) {
    loop {
        let jitter = 0.9 + 0.2 * fastrand::f64();
        tokio::time::sleep(plan.round.mul_f64(jitter)).await;
        let Some(shared) = pool.upgrade() else {
            return;
        };
        if shared.core.is_closed() {
            return;
        }
        let now = shared.ticks(Instant::now());
        shared.drop_dead_idle();
        shared.trim_idle(&plan, now);
        shared.keep_alive(&plan, now).await;
        shared.refill(&plan).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_runs_when_the_settings_are_off() {
        assert!(Plan::new(None, None, 0).is_none());
        let plan = Plan::new(
            Some(Duration::from_secs(10)),
            Some(Duration::from_secs(2)),
            0,
        )
        .expect("a plan");
        assert_eq!(plan.round, Duration::from_secs(1));
        let plan = Plan::new(None, None, 2).expect("a plan for min idle");
        assert_eq!(plan.round, REFILL_ROUND);
        let plan = Plan::new(Some(Duration::from_millis(10)), None, 0).unwrap();
        assert_eq!(plan.round, MIN_ROUND);
    }
}
