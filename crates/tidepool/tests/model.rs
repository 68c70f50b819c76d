//! Concurrency model test of the pool core under shuttle's randomized and PCT schedulers.
//!
//! Checkout, return, timeout (a checkout given up after a few polls, or expired by the pool's
//! timer through `Core::expire`), overflow close, failed opens, invalidation and dispose race
//! each other. In every explored schedule:
//! * open items never exceed capacity, and the core's count matches what really exists;
//! * when every task is done nothing is checked out, nobody waits and nothing leaked;
//! * every waiter is served or gives up: a lost wakeup or a leaked slot shows as a deadlock,
//!   which shuttle reports as a failure.
//!
//! Run with `cargo test -p tidepool --features shuttle --test model`.
#![cfg(feature = "shuttle")]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use shuttle::future;
use tidepool::core::{Core, Grant, Order};

const POOL_SIZE: usize = 2;
const CAPACITY: usize = 3;

/// Items that exist right now (opened and not yet closed), counted outside the core.
struct World {
    live: AtomicUsize,
    next_id: AtomicUsize,
}

impl World {
    fn open(&self) -> usize {
        let live = self.live.fetch_add(1, Ordering::SeqCst) + 1;
        assert!(live <= CAPACITY, "{live} items open, capacity {CAPACITY}");
        self.next_id.fetch_add(1, Ordering::SeqCst)
    }

    fn close(&self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Polls `fut` at most `budget` times, then drops it: a checkout timing out at an arbitrary point.
struct Budget<F> {
    fut: Option<F>,
    budget: usize,
}

impl<F: Future + Unpin> Future for Budget<F> {
    type Output = Option<F::Output>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(fut) = self.fut.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(fut).poll(cx) {
            Poll::Ready(v) => Poll::Ready(Some(v)),
            Poll::Pending if self.budget == 0 => {
                self.fut = None; // the cancellation under test
                Poll::Ready(None)
            }
            Poll::Pending => {
                self.budget -= 1;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
}

/// One checkout: wait (maybe with a budget), use the item, then return it, close it as broken
/// or fail to open it.
async fn checkout(core: Arc<Core<usize>>, world: Arc<World>, budget: Option<usize>, fate: usize) {
    checkout_until(core, world, budget, fate, u64::MAX).await
}

/// As [`checkout`], with a deadline that the timer task may expire.
async fn checkout_until(
    core: Arc<Core<usize>>,
    world: Arc<World>,
    budget: Option<usize>,
    fate: usize,
    deadline: u64,
) {
    let grant = match budget {
        Some(b) => {
            let wait = Budget {
                fut: Some(core.acquire_until(deadline)),
                budget: b,
            };
            match wait.await {
                Some(g) => g,
                None => return, // timed out
            }
        }
        None => core.acquire_until(deadline).await,
    };
    let Some(grant) = grant else { return };
    let item = match grant {
        Grant::Item(item) => item,
        Grant::Slot if fate == 2 => {
            // Opening failed: the capacity goes back.
            core.release_slot();
            return;
        }
        Grant::Slot => world.open(),
    };
    future::yield_now().await;
    if fate == 1 {
        // Found broken: closed by the caller, capacity released.
        world.close();
        core.release_slot();
    } else {
        core.release(item);
    }
}

fn scenario() {
    let world = Arc::new(World {
        live: AtomicUsize::new(0),
        next_id: AtomicUsize::new(0),
    });
    let closer = world.clone();
    let core = Arc::new(Core::new(
        POOL_SIZE,
        CAPACITY,
        Order::Lifo,
        Box::new(move |_item: usize| closer.close()),
    ));
    let mut tasks = Vec::new();
    // Five checkouts against capacity three: some must wait, some give up (dropped, or expired
    // by the timer), some break.
    const DUE: u64 = 5;
    let plans = [
        (None, 0, u64::MAX),
        (Some(1), 0, DUE),
        (None, 1, DUE),
        (Some(3), 2, u64::MAX),
        (None, 0, DUE),
    ];
    for (budget, fate, deadline) in plans {
        let (core, world) = (core.clone(), world.clone());
        tasks.push(future::spawn(checkout_until(
            core, world, budget, fate, deadline,
        )));
    }
    // The pool's timer: expires whoever is still waiting with a deadline that has passed.
    {
        let core = core.clone();
        tasks.push(future::spawn(async move {
            future::yield_now().await;
            core.expire(DUE);
        }));
    }
    // Dispose and invalidation race the checkouts: idle items are drained and closed.
    {
        let (core, world) = (core.clone(), world.clone());
        tasks.push(future::spawn(async move {
            future::yield_now().await;
            for _ in core.drain_idle() {
                world.close();
                core.release_slot();
            }
            for _ in core.remove_idle(|id| id % 2 == 0) {
                world.close();
                core.release_slot();
            }
        }));
    }
    future::block_on(async move {
        for t in tasks {
            t.await.expect("task panicked");
        }
    });
    let counts = core.counts();
    assert_eq!(counts.waiting, 0, "waiters left behind: {counts:?}");
    assert_eq!(
        counts.open, counts.idle,
        "items still checked out: {counts:?}"
    );
    assert!(
        counts.idle <= POOL_SIZE,
        "idle beyond pool_size: {counts:?}"
    );
    assert_eq!(
        world.live.load(Ordering::SeqCst),
        counts.open,
        "core count disagrees with reality"
    );
}

#[test]
fn core_random_schedules() {
    shuttle::check_random(scenario, 20_000);
}

#[test]
fn core_pct_schedules() {
    shuttle::check_pct(scenario, 20_000, 3);
}

/// Closing the pool while checkouts wait: every waiter resolves, items given back later close.
#[test]
fn close_races_checkouts() {
    shuttle::check_random(
        || {
            let world = Arc::new(World {
                live: AtomicUsize::new(0),
                next_id: AtomicUsize::new(0),
            });
            let closer = world.clone();
            let core = Arc::new(Core::new(
                1,
                2,
                Order::Fifo,
                Box::new(move |_item: usize| closer.close()),
            ));
            let mut tasks = Vec::new();
            for fate in [0, 0, 1, 0] {
                let (core, world) = (core.clone(), world.clone());
                tasks.push(future::spawn(checkout(core, world, None, fate)));
            }
            {
                let (core, world) = (core.clone(), world.clone());
                tasks.push(future::spawn(async move {
                    future::yield_now().await;
                    for _ in core.close() {
                        world.close();
                        core.release_slot();
                    }
                }));
            }
            future::block_on(async move {
                for t in tasks {
                    t.await.expect("task panicked");
                }
            });
            let counts = core.counts();
            assert_eq!(counts.waiting, 0);
            assert_eq!(counts.idle, 0, "a closed pool keeps nothing idle");
            assert_eq!(counts.open, 0);
            assert_eq!(world.live.load(Ordering::SeqCst), 0);
        },
        10_000,
    );
}

/// `Core::resize` races checkouts, returns and give-ups: the pool shrinks to 1 + 0 under them
/// (idle surplus closed, checked-out items closed as they come back) and grows back to
/// 2 + 1 (waiters get the room). Nothing leaks, nobody is left waiting, and no more items
/// ever exist than the larger capacity.
#[test]
fn resize_races_checkouts() {
    shuttle::check_random(
        || {
            let world = Arc::new(World {
                live: AtomicUsize::new(0),
                next_id: AtomicUsize::new(0),
            });
            let closer = world.clone();
            let core = Arc::new(Core::new(
                POOL_SIZE,
                CAPACITY,
                Order::Fifo,
                Box::new(move |_item: usize| closer.close()),
            ));
            let mut tasks = Vec::new();
            for (budget, fate) in [(None, 0), (Some(2), 0), (None, 1), (None, 0), (Some(4), 2)] {
                let (core, world) = (core.clone(), world.clone());
                tasks.push(future::spawn(checkout(core, world, budget, fate)));
            }
            {
                let (core, world) = (core.clone(), world.clone());
                tasks.push(future::spawn(async move {
                    future::yield_now().await;
                    for _ in core.resize(1, 1) {
                        world.close();
                        core.release_slot();
                    }
                    future::yield_now().await;
                    for _ in core.resize(POOL_SIZE, CAPACITY) {
                        world.close();
                        core.release_slot();
                    }
                }));
            }
            future::block_on(async move {
                for t in tasks {
                    t.await.expect("task panicked");
                }
            });
            let counts = core.counts();
            assert_eq!(counts.waiting, 0, "waiters left behind: {counts:?}");
            assert_eq!(
                counts.open, counts.idle,
                "items still checked out: {counts:?}"
            );
            assert!(
                counts.idle <= POOL_SIZE,
                "idle beyond pool_size: {counts:?}"
            );
            assert_eq!(
                world.live.load(Ordering::SeqCst),
                counts.open,
                "core count disagrees with reality"
            );
        },
        20_000,
    );
}
