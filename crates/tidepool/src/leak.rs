//! Leak detection (`DB_POOL_LEAK_THRESHOLD`, HikariCP's `leakDetectionThreshold`): a connection
//! checked out for longer than the threshold is logged once at WARN on [`POOL_TARGET`] with
//! where it was checked out, counted ([`LEAKS_SUSPECTED`](crate::instrument::LEAKS_SUSPECTED)),
//! and logged again at INFO when it finally comes back. [`Pool::status`](crate::Pool::status)
//! lists the oldest checkouts.
//!
//! # Cost
//!
//! Off (the default), a checkout and its return each test one `Option` and do nothing else.
//! On, a checkout reads the clock and makes two atomic stores, its return one atomic swap; no
//! lock, no allocation, no timer per checkout. The checkout location is the
//! `&'static Location` of `#[track_caller]` (no allocation either).
//!
//! # How leaks are found
//!
//! One background task per pool, started at the first checkout (inside a tokio runtime), wakes
//! every half threshold (between [`MIN_SCAN`] and [`MAX_SCAN`]) and scans the pool's
//! connections. It holds the pool only weakly: it ends at its next wake once the pool is dropped
//! or closed.
//!
//! The pool's core keeps no list of checked-out connections, so the scan needs one. It is a list
//! of every open connection's [`Holder`] record, not of checkouts: registered when a connection
//! is opened (a push under a lock, on a path that has just spent a network handshake) and
//! dropped from the list by the scan once the connection is gone. Checkout and return then
//! touch only the connection's own record, with atomics: no lock that every checkout of the
//! pool would take. The record is behind its own `Arc` (one allocation per connection, not per
//! checkout) so the scan never holds the connection itself: a checked-out connection has a
//! single owner (transactions need `&mut`), and a scan holding a second reference, even
//! briefly, would break that.

use std::panic::Location;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::instrument::POOL_TARGET;
use crate::pool::Shared;
use crate::stats::Checkout;

/// The scan never runs more often than this, however small the threshold.
pub(crate) const MIN_SCAN: Duration = Duration::from_millis(50);
/// Nor less often than this: a leak is reported at most this long after it passed the threshold.
pub(crate) const MAX_SCAN: Duration = Duration::from_secs(30);
/// How many checkouts [`Status::longest_checkouts`](crate::Status::longest_checkouts) lists.
pub(crate) const LISTED: usize = 5;

/// [`Holder::state`]: checked out (through a [`PooledConnection`](crate::PooledConnection)).
const OUT: u64 = 1;
/// [`Holder::state`]: reported as a possible leak during this checkout.
const WARNED: u64 = 2;
/// [`Holder::state`]: the checkout's tick is kept above these two bits.
const TICK_SHIFT: u32 = 2;

/// Who holds one connection and since when: the leak detection record of one connection, kept
/// in its [`Meta`](crate::connection::Meta) (and in the pool's [`Leaks::holders`] list).
///
/// The rule: `state` is 0 while the connection is not checked out; otherwise it is the pool's
/// clock tick ([`Shared::ticks`]) of the checkout shifted left by [`TICK_SHIFT`], with [`OUT`]
/// set and [`WARNED`] once the scan reported it. Only the connection's owner writes it at
/// checkout and return (a store, a swap); the scan only sets `WARNED`, by compare-exchange
/// against the state it read, so it can never mark a later checkout. `location` is written
/// before `state` (both release) and read after it (both acquire): a reader that finds the
/// same `state` after reading `location` (or whose compare-exchange succeeds) read the
/// location of that very checkout.
pub(crate) struct Holder {
    /// The connection's id ([`Meta::id`](crate::connection::Meta)).
    id: u64,
    state: AtomicU64,
    /// Where the current (or last) checkout was made: always null or a `&'static Location`.
    location: AtomicPtr<Location<'static>>,
}

impl Holder {
    fn new(id: u64) -> Self {
        Holder {
            id,
            state: AtomicU64::new(0),
            location: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// Checked out at `tick` by the code at `location`.
    fn checked_out(&self, tick: u64, location: &'static Location<'static>) {
        let ptr = location as *const Location<'static> as *mut Location<'static>;
        self.location.store(ptr, Ordering::Release);
        let tick = tick.min(u64::MAX >> TICK_SHIFT);
        self.state
            .store((tick << TICK_SHIFT) | OUT, Ordering::Release);
    }

    /// The checkout's location.
    fn location(&self) -> Option<&'static Location<'static>> {
        let ptr = self.location.load(Ordering::Acquire);
        // SAFETY: only pointers made from a `&'static Location<'static>` are stored
        // ([`Holder::checked_out`]); such a location lives for the whole program and is never
        // written through.
        unsafe { ptr.as_ref() }
    }
}

/// The checkout tick of a `state` ([`Holder`]'s rule).
fn tick_of(state: u64) -> u64 {
    state >> TICK_SHIFT
}

/// One pool's leak detection, when `DB_POOL_LEAK_THRESHOLD` is set.
pub(crate) struct Leaks {
    threshold: Duration,
    /// `threshold` in the pool's clock ticks.
    threshold_ticks: u64,
    /// The record of every open connection (and of closed ones until the next scan drops
    /// them: a record whose only reference is this list belongs to a connection that is gone).
    holders: Mutex<Vec<Arc<Holder>>>,
    /// The scan task was started.
    started: AtomicBool,
    /// Checkouts reported as possible leaks since the pool started.
    suspected: AtomicU64,
}

impl Leaks {
    /// Leak detection at `threshold`, or `None` when it is off.
    pub(crate) fn new(threshold: Option<Duration>) -> Option<Leaks> {
        let threshold = threshold.filter(|t| !t.is_zero())?;
        Some(Leaks {
            threshold,
            threshold_ticks: u64::try_from(threshold.as_nanos()).unwrap_or(u64::MAX),
            holders: Mutex::new(Vec::new()),
            started: AtomicBool::new(false),
            suspected: AtomicU64::new(0),
        })
    }

    fn holders(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Holder>>> {
        self.holders.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The record of a connection just opened, registered for the scan.
    pub(crate) fn register(&self, id: u64) -> Arc<Holder> {
        let holder = Arc::new(Holder::new(id));
        self.holders().push(holder.clone());
        holder
    }

    /// Checkouts reported as possible leaks so far.
    pub(crate) fn suspected(&self) -> u64 {
        self.suspected.load(Ordering::Relaxed)
    }

    /// How often the scan runs.
    fn interval(&self) -> Duration {
        (self.threshold / 2).clamp(MIN_SCAN, MAX_SCAN)
    }

    /// Reports the checkouts held past the threshold that were not reported yet, and drops the
    /// records of closed connections. `now`: the pool's clock tick.
    fn scan(&self, now: u64) {
        let mut found: Vec<(u64, &'static Location<'static>, u64)> = Vec::new();
        {
            let mut holders = self.holders();
            holders.retain(|h| Arc::strong_count(h) > 1);
            for h in holders.iter() {
                let state = h.state.load(Ordering::Acquire);
                if state & OUT == 0 || state & WARNED != 0 {
                    continue;
                }
                let held = now.saturating_sub(tick_of(state));
                if held < self.threshold_ticks {
                    continue;
                }
                let Some(location) = h.location() else {
                    continue;
                };
                // Only this very checkout: it may have come back (and gone out again) since.
                if h.state
                    .compare_exchange(state, state | WARNED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    found.push((h.id, location, held));
                }
            }
        }
        for (connection, location, held) in found {
            self.suspected.fetch_add(1, Ordering::Relaxed);
            suspected(connection, location, held, self.threshold);
        }
    }

    /// The [`LISTED`] oldest checkouts now, oldest first. `now`: the pool's clock tick.
    pub(crate) fn longest(&self, now: u64) -> Vec<Checkout> {
        let mut out: Vec<(u64, u64, &'static Location<'static>)> = {
            let holders = self.holders();
            holders
                .iter()
                .filter_map(|h| {
                    let state = h.state.load(Ordering::Acquire);
                    if state & OUT == 0 {
                        return None;
                    }
                    let location = h.location()?;
                    // The same checkout still: the location is its own.
                    (h.state.load(Ordering::Acquire) == state).then_some((
                        tick_of(state),
                        h.id,
                        location,
                    ))
                })
                .collect()
        };
        out.sort_unstable_by_key(|&(tick, id, _)| (tick, id));
        out.truncate(LISTED);
        out.into_iter()
            .map(|(tick, id, location)| Checkout {
                id,
                location: location.to_string(),
                held_s: seconds(now.saturating_sub(tick)),
            })
            .collect()
    }
}

/// Ticks (nanoseconds) as seconds.
fn seconds(ticks: u64) -> f64 {
    ticks as f64 / 1e9
}

/// A connection is handed to the code at `location` (the pool has leak detection on): records
/// the checkout, and starts the pool's scan task the first time.
pub(crate) fn checked_out(
    shared: &Arc<Shared>,
    leaks: &Leaks,
    holder: &Holder,
    location: &'static Location<'static>,
) {
    if !leaks.started.load(Ordering::Relaxed) {
        start(shared, leaks);
    }
    holder.checked_out(shared.ticks(Instant::now()), location);
}

/// The connection of `holder` comes back from its user: logs it at INFO if it was reported as
/// a possible leak.
#[inline]
pub(crate) fn checked_in(shared: &Shared, holder: &Holder) {
    let state = holder.state.swap(0, Ordering::AcqRel);
    if state & WARNED != 0 {
        returned(shared, holder, state);
    }
}

#[cold]
fn returned(shared: &Shared, holder: &Holder, state: u64) {
    let held = shared.ticks(Instant::now()).saturating_sub(tick_of(state));
    let location = holder.location();
    tracing::info!(
        target: POOL_TARGET,
        connection = holder.id,
        location = %DisplayLocation(location),
        held_s = seconds(held),
        "connection reported as a possible leak returned to pool"
    );
}

#[cold]
fn suspected(
    connection: u64,
    location: &'static Location<'static>,
    held: u64,
    threshold: Duration,
) {
    tracing::warn!(
        target: POOL_TARGET,
        connection,
        location = %location,
        held_s = seconds(held),
        threshold_s = threshold.as_secs_f64(),
        "connection held longer than DB_POOL_LEAK_THRESHOLD: possible leak"
    );
}

/// A location, or `unknown`.
struct DisplayLocation(Option<&'static Location<'static>>);

impl std::fmt::Display for DisplayLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(l) => l.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

/// Starts the pool's scan task, once, if there is a tokio runtime (else the next checkout tries
/// again).
#[cold]
fn start(shared: &Arc<Shared>, leaks: &Leaks) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if leaks.started.swap(true, Ordering::AcqRel) {
        return;
    }
    let pool = Arc::downgrade(shared);
    runtime.spawn(watch(pool, leaks.interval()));
}

/// The scan task: ends once the pool is dropped or closed.
async fn watch(pool: Weak<Shared>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let Some(shared) = pool.upgrade() else {
            return;
        };
        if shared.is_closed() {
            return;
        }
        if let Some(leaks) = shared.leaks() {
            leaks.scan(shared.ticks(Instant::now()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_rule() {
        let leaks = Leaks::new(Some(Duration::from_millis(200))).unwrap();
        assert!(Leaks::new(Some(Duration::ZERO)).is_none());
        assert!(Leaks::new(None).is_none());
        assert_eq!(leaks.interval(), Duration::from_millis(100));
        let conn = leaks.register(7);
        let here = Location::caller();
        conn.checked_out(1_000, here);
        // Under the threshold: nothing.
        leaks.scan(1_000 + 199_999_999);
        assert_eq!(leaks.suspected(), 0);
        let listed = leaks.longest(1_000 + 500_000_000);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, 7);
        assert_eq!(listed[0].location, here.to_string());
        assert!((listed[0].held_s - 0.5).abs() < 1e-9);
        // Past it: reported once.
        leaks.scan(1_000 + 200_000_000);
        leaks.scan(1_000 + 900_000_000);
        assert_eq!(leaks.suspected(), 1);
        let state = conn.state.swap(0, Ordering::AcqRel);
        assert_eq!(state & (OUT | WARNED), OUT | WARNED);
        assert_eq!(tick_of(state), 1_000);
        assert!(leaks.longest(u64::MAX).is_empty());
        // A record whose connection is gone leaves the list at the next scan.
        drop(conn);
        leaks.scan(0);
        assert!(leaks.holders().is_empty());
    }
}
