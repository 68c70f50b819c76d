//! Read replicas: which one a read goes to, and when one is left out. Pure bookkeeping over the
//! replicas' pools (one single-server pool per host of `DATABASE_REPLICA_URL`); the pools and
//! the read API are the [`crate::read`] module's.
//!
//! Each replica is in one of three states:
//! * **up**: reads go to it, least busy first;
//! * **lagging**: its replay is more than `DB_REPLICA_MAX_LAG` behind the primary; skipped, and
//!   measured again every [`CHECK_EVERY`];
//! * **down**: a connection to it failed; skipped, and probed again after a backoff that doubles
//!   from [`FIRST_BACKOFF`] to [`MAX_BACKOFF`] while the probes keep failing.
//!
//! An up replica's lag is measured every [`CHECK_EVERY`] while reads arrive. A replica starts
//! up (with its lag measured at once), so a read does not wait for the first measurement.
//!
//! The lag is the age of the last replayed transaction while received WAL waits to be replayed
//! (zero when nothing waits). After a quiet spell on the primary, the first write to arrive
//! makes that age the length of the spell until it is replayed a moment later; so one reading
//! over `DB_REPLICA_MAX_LAG` is confirmed by a second, [`CONFIRM_AFTER`] later, before the
//! replica is left out.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// How often an up or lagging replica's lag is measured (while reads arrive).
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How soon a lag reading over the limit is measured again to confirm it.
pub(crate) const CONFIRM_AFTER: Duration = Duration::from_millis(250);
/// The first wait before a down replica is probed again.
pub(crate) const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait between probes of a down replica.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The lag query, run on the replica: zero when the replica is not in recovery (promoted), or
/// has replayed everything it received while its WAL receiver runs (no activity on the primary
/// is no lag, however old the last transaction); else the age of the last replayed transaction
/// (so a replica cut off from the primary, its receiver gone, ages). A replica fed from the WAL
/// archive alone has no receiver: its lag is always that age.
pub(crate) const LAG_QUERY: &str = "SELECT CASE \
     WHEN NOT pg_catalog.pg_is_in_recovery() THEN 0::float8 \
     WHEN pg_catalog.pg_last_wal_receive_lsn() = pg_catalog.pg_last_wal_replay_lsn() \
          AND EXISTS (SELECT 1 FROM pg_catalog.pg_stat_wal_receiver WHERE pid IS NOT NULL) \
          THEN 0::float8 \
     ELSE COALESCE(EXTRACT(EPOCH FROM now() - \
          pg_catalog.pg_last_xact_replay_timestamp())::float8, 0) END";

/// A replica's state, as `status()` and `/health/database` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// Reads go to it.
    Up,
    /// Further behind than `DB_REPLICA_MAX_LAG`: skipped until it catches up.
    Lagging,
    /// Unreachable or failing: skipped until a probe succeeds.
    Down,
}

/// The replicas of one pool, their states and the rule that picks one.
pub(crate) struct Replicas<P> {
    pub(crate) members: Vec<Member<P>>,
    max_lag: Duration,
    /// Reads go to the primary when no replica is usable (`DB_REPLICA_FALLBACK`).
    pub(crate) fallback: bool,
    /// Rotates the starting point among equally busy replicas, so they share the reads.
    turn: AtomicUsize,
}

/// One replica: its pool, its host (for status, logs and metrics) and its health.
pub(crate) struct Member<P> {
    pub(crate) pool: P,
    pub(crate) host: Arc<str>,
    health: Mutex<Health>,
}

struct Health {
    state: ReplicaState,
    /// Seconds of replay lag at the last measurement.
    lag: Option<f64>,
    /// Probes failed in a row (the backoff's exponent).
    failures: u32,
    /// Lag readings over the limit in a row.
    over: u32,
    /// When the next measurement or probe is due.
    due: Instant,
    /// A measurement or probe is running: no second one is started.
    probing: bool,
    /// Why the replica is down or lagging, for status.
    why: Option<String>,
}

/// What [`Replicas::snapshot`] reports of one replica.
pub(crate) struct Snapshot {
    pub(crate) state: ReplicaState,
    pub(crate) lag: Option<f64>,
    pub(crate) why: Option<String>,
}

impl<P> Replicas<P> {
    /// Replicas `(host, pool)`, all up, with their first measurement due now.
    pub(crate) fn new(pools: Vec<(Arc<str>, P)>, max_lag: Duration, fallback: bool) -> Self {
        let now = Instant::now();
        Replicas {
            members: pools
                .into_iter()
                .map(|(host, pool)| Member {
                    pool,
                    host,
                    health: Mutex::new(Health {
                        state: ReplicaState::Up,
                        lag: None,
                        failures: 0,
                        over: 0,
                        due: now,
                        probing: false,
                        why: None,
                    }),
                })
                .collect(),
            max_lag,
            fallback,
            turn: AtomicUsize::new(0),
        }
    }

    /// The up replica with the lowest `load` (ties shared in turn), leaving out `tried`
    /// (a bit set of indices already tried by this read).
    pub(crate) fn pick(&self, load: impl Fn(&P) -> f64, tried: u64) -> Option<usize> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, f64)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if i < 64 && tried & (1 << i) != 0 {
                continue;
            }
            if self.members[i].health().state != ReplicaState::Up {
                continue;
            }
            let l = load(&self.members[i].pool);
            if best.is_none_or(|(_, b)| l < b) {
                best = Some((i, l));
            }
        }
        best.map(|(i, _)| i)
    }

    /// The indices whose measurement or probe is due now, each marked as running: the caller
    /// must report each one back with [`Replicas::measured`].
    pub(crate) fn due(&self, now: Instant) -> Vec<usize> {
        let mut due = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            let mut h = m.health();
            if !h.probing && now >= h.due {
                h.probing = true;
                due.push(i);
            }
        }
        due
    }

    /// A measurement or probe of replica `i` ended: with its lag in seconds, or why it failed.
    /// Returns the state before and after, for logging changes.
    pub(crate) fn measured(
        &self,
        i: usize,
        result: Result<f64, String>,
    ) -> (ReplicaState, ReplicaState) {
        let mut h = self.members[i].health();
        let before = h.state;
        h.probing = false;
        let now = Instant::now();
        match result {
            Ok(lag) => {
                h.failures = 0;
                h.lag = Some(lag);
                h.due = now + CHECK_EVERY;
                let over = lag > self.max_lag.as_secs_f64();
                h.over = if over { h.over + 1 } else { 0 };
                if over && h.over < 2 && h.state == ReplicaState::Up {
                    // Possibly a write just arrived after a quiet spell: look again soon.
                    h.due = now + CONFIRM_AFTER;
                } else if over {
                    h.state = ReplicaState::Lagging;
                    h.why = Some(format!(
                        "replay is {lag:.1} s behind, more than DB_REPLICA_MAX_LAG ({} s)",
                        self.max_lag.as_secs_f64()
                    ));
                } else {
                    h.state = ReplicaState::Up;
                    h.why = None;
                }
            }
            Err(why) => Self::down(&mut h, now, why),
        }
        (before, h.state)
    }

    /// A measurement of replica `i` was skipped (its pool was busy, or the task went away):
    /// the state stays, and the next one is due after [`CHECK_EVERY`].
    pub(crate) fn skipped(&self, i: usize) {
        let mut h = self.members[i].health();
        h.probing = false;
        h.due = Instant::now() + CHECK_EVERY;
    }

    /// A read found replica `i` unusable (its connection failed): it is down until a probe
    /// succeeds. Returns whether it was up before.
    pub(crate) fn failed(&self, i: usize, why: String) -> bool {
        let mut h = self.members[i].health();
        let was_up = h.state != ReplicaState::Down;
        if was_up {
            Self::down(&mut h, Instant::now(), why);
        }
        was_up
    }

    fn down(h: &mut Health, now: Instant, why: String) {
        h.state = ReplicaState::Down;
        h.why = Some(why);
        let exponent = h.failures.min(16);
        h.failures = h.failures.saturating_add(1);
        h.due = now + FIRST_BACKOFF.saturating_mul(1 << exponent).min(MAX_BACKOFF);
    }

    /// Replica `i`'s state now.
    pub(crate) fn snapshot(&self, i: usize) -> Snapshot {
        let h = self.members[i].health();
        Snapshot {
            state: h.state,
            lag: h.lag,
            why: h.why.clone(),
        }
    }
}

impl<P> Member<P> {
    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replicas(n: usize) -> Replicas<f64> {
        Replicas::new(
            (0..n)
                .map(|i| (Arc::from(format!("h{i}")), i as f64))
                .collect(),
            Duration::from_secs(5),
            true,
        )
    }

    #[test]
    fn the_least_busy_up_replica_is_picked() {
        let r = replicas(3);
        // Load is the pool value itself: h0 (0.0) is least busy.
        assert_eq!(r.pick(|p| *p, 0), Some(0));
        assert_eq!(r.pick(|p| *p, 0b1), Some(1));
        r.failed(0, "refused".into());
        assert_eq!(r.pick(|p| *p, 0), Some(1));
        assert_eq!(r.snapshot(0).state, ReplicaState::Down);
        assert_eq!(r.pick(|p| *p, 0b110), None);
    }

    #[test]
    fn a_lone_high_reading_after_a_quiet_spell_does_not_leave_the_replica_out() {
        let r = replicas(1);
        r.due(Instant::now());
        assert_eq!(
            r.measured(0, Ok(600.0)),
            (ReplicaState::Up, ReplicaState::Up)
        );
        r.due(Instant::now() + CONFIRM_AFTER);
        assert_eq!(r.measured(0, Ok(0.0)), (ReplicaState::Up, ReplicaState::Up));
        // The count starts again: one more high reading alone is not enough either.
        r.due(Instant::now() + CHECK_EVERY);
        assert_eq!(
            r.measured(0, Ok(600.0)),
            (ReplicaState::Up, ReplicaState::Up)
        );
        assert_eq!(r.pick(|_| 0.0, 0), Some(0));
    }

    #[test]
    fn equally_busy_replicas_share_reads() {
        let r = replicas(2);
        let picks: Vec<_> = (0..4).map(|_| r.pick(|_| 0.0, 0)).collect();
        assert!(
            picks.contains(&Some(0)) && picks.contains(&Some(1)),
            "{picks:?}"
        );
    }

    #[test]
    fn lag_and_probes_move_the_state() {
        let r = replicas(1);
        assert_eq!(r.due(Instant::now()), vec![0]);
        // A running measurement is not started twice.
        assert!(r.due(Instant::now() + MAX_BACKOFF).is_empty());
        // One reading over the limit is confirmed before the replica is left out.
        assert_eq!(r.measured(0, Ok(7.0)), (ReplicaState::Up, ReplicaState::Up));
        assert!(r.due(Instant::now()).is_empty());
        assert_eq!(r.due(Instant::now() + CONFIRM_AFTER), vec![0]);
        assert_eq!(
            r.measured(0, Ok(7.0)),
            (ReplicaState::Up, ReplicaState::Lagging)
        );
        assert_eq!(r.pick(|_| 0.0, 0), None);
        r.due(Instant::now() + CHECK_EVERY);
        assert_eq!(
            r.measured(0, Ok(0.0)),
            (ReplicaState::Lagging, ReplicaState::Up)
        );
        assert!(r.failed(0, "gone".into()));
        assert!(!r.failed(0, "gone".into()));
        // Backoff: not due at once, due after the first backoff.
        assert!(r.due(Instant::now()).is_empty());
        assert_eq!(r.due(Instant::now() + FIRST_BACKOFF), vec![0]);
        r.measured(0, Err("still gone".into()));
        assert!(r.due(Instant::now() + FIRST_BACKOFF).is_empty());
        assert_eq!(r.due(Instant::now() + FIRST_BACKOFF * 2), vec![0]);
        assert_eq!(
            r.measured(0, Ok(0.0)),
            (ReplicaState::Down, ReplicaState::Up)
        );
    }
}
