//! One timer per pool for every waiting checkout's `DB_POOL_TIMEOUT`, instead of one timer per
//! wait: registering and cancelling a tokio timer on each contended checkout cost about as much
//! as the rest of the checkout. A background task sleeps until the earliest deadline in the
//! core's queue, then [`Core::expire`](crate::core::Core::expire)s what is due; a checkout that
//! starts waiting only wakes the task when its deadline is earlier than the one the task sleeps
//! towards (with one timeout for the whole pool, queue order is deadline order, so that happens
//! once per busy period, not per wait).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use crate::pool::Shared;

/// The timer's side shared with its task. The task holds the pool only weakly: it ends when the
/// pool is gone.
pub(crate) struct WaitTimer {
    /// The deadline the task sleeps towards, on the pool's clock; `u64::MAX` while it computes
    /// the next one or has none (a new waiter must then wake it).
    armed_until: AtomicU64,
    /// Wakes the task: an earlier deadline, or the pool going away.
    wake: Notify,
    /// A task is running (cleared when it ends, so that a pool outliving its runtime gets a new
    /// task on the next one).
    running: AtomicBool,
    stopped: AtomicBool,
}

impl WaitTimer {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(WaitTimer {
            armed_until: AtomicU64::new(u64::MAX),
            wake: Notify::new(),
            running: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        })
    }

    /// A checkout of `shared` waits until `deadline` (pool clock ticks): make sure the task
    /// wakes by then. Called after the waiter joined the core's queue.
    pub(crate) fn arm(self: &Arc<Self>, shared: &Arc<Shared>, deadline: u64) {
        if !self.running.load(Ordering::Acquire) && !self.running.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let task = Task {
                        timer: self.clone(),
                    };
                    runtime.spawn(task.run(Arc::downgrade(shared)));
                }
                Err(_) => self.running.store(false, Ordering::Release),
            }
        }
        if deadline < self.armed_until.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// The pool is going away: the task ends.
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// The running task; dropping it (the task ended, or its runtime shut down) lets the next wait
/// start another.
struct Task {
    timer: Arc<WaitTimer>,
}

impl Task {
    async fn run(self, shared: Weak<Shared>) {
        let timer = &self.timer;
        loop {
            // From here until the next deadline is published, a new waiter wakes us: it sees
            // `u64::MAX` and leaves a permit in `wake`.
            timer.armed_until.store(u64::MAX, Ordering::SeqCst);
            if timer.stopped.load(Ordering::SeqCst) {
                return;
            }
            let Some(pool) = shared.upgrade() else {
                return;
            };
            let next = pool.expire_waiters();
            let epoch = pool.epoch();
            drop(pool);
            let notified = timer.wake.notified();
            match next {
                Some(deadline) => {
                    timer.armed_until.fetch_min(deadline, Ordering::SeqCst);
                    let at = epoch + Duration::from_nanos(deadline);
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => {}
                        _ = notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.timer.armed_until.store(u64::MAX, Ordering::SeqCst);
        self.timer.running.store(false, Ordering::Release);
    }
}
