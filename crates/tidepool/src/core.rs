//! The pool core: capacity accounting, the idle set and the FIFO queue of waiting checkouts.
//!
//! This module knows nothing about PostgreSQL, time or tokio (a waiter's deadline is a number on
//! the caller's clock; the caller's timer calls [`Core::expire`]). It is a small state machine behind
//! one mutex, generic over the pooled item `C`, so that it can be model-checked on its own
//! (`tests/model.rs` runs it under shuttle). The lock is never held across an `.await` and never
//! while a waker runs or an item is closed.
//!
//! # Invariants
//! * `open` counts every item that exists or is being created: idle, checked out, or the slot a
//!   checkout holds while it opens a new item. `open <= capacity`, except after
//!   [`Core::resize`] lowered the capacity under checked-out items: then no slot is granted and
//!   every item given back is closed until `open` is down to it.
//! * While any checkout waits, the idle set is empty and `open >= capacity`: a returned item or
//!   a freed slot goes straight to the longest waiter instead of the idle set.
//! * A grant is owned by exactly one party: the idle set, a waiter's slot, or the caller. A waiter
//!   dropped after it was granted something hands it on, so nothing leaks.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[cfg(feature = "shuttle")]
use shuttle::sync::{Mutex, MutexGuard};
#[cfg(not(feature = "shuttle"))]
use std::sync::{Mutex, MutexGuard};

use slab::Slab;

/// What a checkout receives from the core.
#[derive(Debug)]
pub enum Grant<C> {
    /// An existing item, taken from the idle set or handed over by the task that returned it.
    Item(C),
    /// Capacity for one new item: the holder opens it, or gives the slot back with
    /// [`Core::release_slot`] if it cannot.
    Slot,
}

/// Counts read under the lock, for the pool's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Items in the idle set.
    pub idle: usize,
    /// Items open or being opened.
    pub open: usize,
    /// Checkouts waiting for an item or a slot.
    pub waiting: usize,
    /// The idle items kept (`pool_size`).
    pub pool_size: usize,
    /// The most items open (`pool_size + max_overflow`; `usize::MAX` for no limit).
    pub capacity: usize,
}

/// What a checkout would meet now (see [`Core::availability`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// An idle item or free capacity, and nobody waiting: served at once.
    Free,
    /// Every item checked out and no capacity left, but nobody waiting yet.
    Exhausted,
    /// Others are waiting already: a checkout would queue behind them.
    Contended,
}

/// How idle items are chosen at checkout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Oldest returned first: spreads use over every idle item.
    Fifo,
    /// Most recently returned first: lets surplus items sit unused (and be recycled).
    Lifo,
}

/// Closes an item the core decided to drop (an idle set already holding `pool_size` items, or a
/// closed pool). Called without the lock held.
pub type Closer<C> = Box<dyn Fn(C) + Send + Sync>;

struct Waiter<C> {
    waker: Option<Waker>,
    grant: Option<Grant<C>>,
    closed: bool,
    /// Given up by [`Core::expire`]: out of the queue, resolves to `None`.
    expired: bool,
    /// On the caller's clock; `u64::MAX` for none.
    deadline: u64,
}

struct State<C> {
    idle: VecDeque<C>,
    open: usize,
    /// Keys into `waiters`, in arrival order.
    queue: VecDeque<usize>,
    waiters: Slab<Waiter<C>>,
    closed: bool,
    /// Idle items kept at most (never more than `capacity`).
    pool_size: usize,
    /// Open items allowed.
    capacity: usize,
}

/// The shared state of one pool. See the module docs for its invariants.
pub struct Core<C> {
    state: Mutex<State<C>>,
    order: Order,
    close: Closer<C>,
}

impl<C> Core<C> {
    /// A core that keeps up to `pool_size` idle items and allows `capacity` open ones
    /// (`usize::MAX` for no limit). `close` disposes of items the core turns away.
    pub fn new(pool_size: usize, capacity: usize, order: Order, close: Closer<C>) -> Self {
        let pool_size = pool_size.min(capacity);
        let prealloc = pool_size.min(1024);
        Core {
            state: Mutex::new(State {
                idle: VecDeque::with_capacity(prealloc),
                open: 0,
                queue: VecDeque::with_capacity(64),
                waiters: Slab::with_capacity(64),
                closed: false,
                pool_size,
                capacity,
            }),
            order,
            close,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<C>> {
        // A panic while the lock was held cannot leave the state half-updated: every update is
        // a few plain assignments. Carry on rather than poisoning every later checkout.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Maximum number of open items.
    pub fn capacity(&self) -> usize {
        self.lock().capacity
    }

    /// Changes `pool_size` and `capacity` at run time. Idle items beyond the new `pool_size`
    /// are removed and returned (the caller closes each and releases its slot, as with
    /// [`Core::drain_idle`]); checked-out items are never touched: past a lowered capacity they
    /// are closed as they come back. Waiters that a raised capacity makes room for get slots.
    pub fn resize(&self, pool_size: usize, capacity: usize) -> Vec<C> {
        let mut st = self.lock();
        st.capacity = capacity;
        st.pool_size = pool_size.min(capacity);
        let keep = st.pool_size;
        let surplus: Vec<C> = if st.idle.len() > keep {
            let n = st.idle.len() - keep;
            st.idle.drain(..n).collect()
        } else {
            Vec::new()
        };
        let mut wakers = Vec::new();
        while !st.closed && st.open < st.capacity {
            let Some(key) = st.queue.pop_front() else {
                break;
            };
            st.open += 1;
            let w = &mut st.waiters[key];
            w.grant = Some(Grant::Slot);
            wakers.extend(w.waker.take());
        }
        drop(st);
        for w in wakers {
            w.wake();
        }
        surplus
    }

    /// Checks out without waiting: an idle item, else a slot if capacity allows. `None` when the
    /// caller would have to wait (or the pool is closed).
    pub fn try_acquire(&self) -> Option<Grant<C>> {
        let mut st = self.lock();
        self.take_now(&mut st)
    }

    fn take_now(&self, st: &mut State<C>) -> Option<Grant<C>> {
        if st.closed || !st.queue.is_empty() {
            // Never overtake a waiter: arrival order is the service order.
            return None;
        }
        let item = match self.order {
            Order::Fifo => st.idle.pop_front(),
            Order::Lifo => st.idle.pop_back(),
        };
        if let Some(item) = item {
            return Some(Grant::Item(item));
        }
        if st.open < st.capacity {
            st.open += 1;
            return Some(Grant::Slot);
        }
        None
    }

    /// Reserves capacity for one new item when fewer than `limit` items are open and nobody
    /// waits (for warm-up). The caller opens the item and [`release`](Core::release)s it, or
    /// gives the slot back with [`Core::release_slot`].
    pub fn try_reserve(&self, limit: usize) -> bool {
        let mut st = self.lock();
        if st.closed || !st.queue.is_empty() || st.open >= limit.min(st.capacity) {
            return false;
        }
        st.open += 1;
        true
    }

    /// Checks out, waiting in FIFO order when nothing is free. Resolves to `None` if the pool is
    /// closed. Dropping the future at any point gives back whatever it was granted.
    pub fn acquire(&self) -> Acquire<'_, C> {
        self.acquire_until(u64::MAX)
    }

    /// As [`Core::acquire`], but a waiter whose `deadline` (on the caller's clock) has passed
    /// when [`Core::expire`] runs gives up: it resolves to `None` and
    /// [`Acquire::expired`] tells why.
    pub fn acquire_until(&self, deadline: u64) -> Acquire<'_, C> {
        Acquire {
            core: self,
            key: None,
            done: false,
            expired: false,
            deadline,
        }
    }

    /// Gives up every waiter whose deadline is `now` or earlier (waking it), and returns the
    /// earliest deadline still waiting, for the caller's timer. One timer serves every waiter,
    /// instead of one timer per waiting checkout.
    pub fn expire(&self, now: u64) -> Option<u64> {
        let mut guard = self.lock();
        let mut wakers = Vec::new();
        let mut next: Option<u64> = None;
        let st = &mut *guard;
        let waiters = &mut st.waiters;
        st.queue.retain(|&key| {
            let w = &mut waiters[key];
            if w.deadline <= now {
                w.expired = true;
                wakers.extend(w.waker.take());
                false
            } else {
                if w.deadline != u64::MAX {
                    next = Some(next.map_or(w.deadline, |n| n.min(w.deadline)));
                }
                true
            }
        });
        drop(guard);
        for w in wakers {
            w.wake();
        }
        next
    }

    /// Gives an item back. The longest waiter gets it; otherwise it joins the idle set, unless
    /// `pool_size` items are already idle, in which case it is closed (SQLAlchemy's overflow rule).
    pub fn release(&self, item: C) {
        let mut st = self.lock();
        // Past a lowered capacity every item given back is closed, not handed on.
        if !st.closed && st.open <= st.capacity {
            if let Some(key) = st.queue.pop_front() {
                let w = &mut st.waiters[key];
                w.grant = Some(Grant::Item(item));
                let waker = w.waker.take();
                drop(st);
                if let Some(waker) = waker {
                    waker.wake();
                }
                return;
            }
            if st.idle.len() < st.pool_size {
                st.idle.push_back(item);
                return;
            }
        }
        drop(st);
        // Close first, then free the capacity: the item is gone before anyone can replace it.
        (self.close)(item);
        self.release_slot();
    }

    /// Gives back the capacity of an item that no longer exists (closed, or never opened). The
    /// longest waiter receives it as a [`Grant::Slot`].
    pub fn release_slot(&self) {
        let mut st = self.lock();
        if !st.closed && st.open <= st.capacity {
            if let Some(key) = st.queue.pop_front() {
                let w = &mut st.waiters[key];
                w.grant = Some(Grant::Slot);
                let waker = w.waker.take();
                drop(st);
                if let Some(waker) = waker {
                    waker.wake();
                }
                return;
            }
        }
        st.open -= 1;
    }

    /// Removes every idle item (for `dispose`) and returns them. The caller closes each one and
    /// then calls [`Core::release_slot`] for it, so capacity is never freed before the item is gone.
    pub fn drain_idle(&self) -> Vec<C> {
        let mut st = self.lock();
        st.idle.drain(..).collect()
    }

    /// Removes the idle items `stale` selects and returns them; as with [`Core::drain_idle`], the
    /// caller closes each and releases its slot.
    pub fn remove_idle(&self, mut stale: impl FnMut(&C) -> bool) -> Vec<C> {
        let mut st = self.lock();
        let mut removed = Vec::new();
        let mut i = 0;
        while i < st.idle.len() {
            if stale(&st.idle[i]) {
                if let Some(item) = st.idle.remove(i) {
                    removed.push(item);
                }
            } else {
                i += 1;
            }
        }
        removed
    }

    /// Closes the pool: waiters resolve to `None`, later checkouts fail and items given back
    /// afterwards are closed. Returns the idle items; the caller closes each and releases its
    /// slot, as with [`Core::drain_idle`].
    pub fn close(&self) -> Vec<C> {
        let mut st = self.lock();
        st.closed = true;
        let idle: Vec<C> = st.idle.drain(..).collect();
        let mut wakers = Vec::with_capacity(st.queue.len());
        while let Some(key) = st.queue.pop_front() {
            let w = &mut st.waiters[key];
            w.closed = true;
            if let Some(waker) = w.waker.take() {
                wakers.push(waker);
            }
        }
        drop(st);
        for w in wakers {
            w.wake();
        }
        idle
    }

    /// Whether [`Core::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Whether a checkout would be served now, or would wait behind others or for a release.
    pub fn availability(&self) -> Availability {
        let st = self.lock();
        if st.closed || (st.queue.is_empty() && (!st.idle.is_empty() || st.open < st.capacity)) {
            // Closed counts as free: the checkout then fails at once.
            Availability::Free
        } else if st.queue.is_empty() {
            Availability::Exhausted
        } else {
            Availability::Contended
        }
    }

    /// A consistent snapshot of the counts.
    pub fn counts(&self) -> Counts {
        let st = self.lock();
        Counts {
            idle: st.idle.len(),
            open: st.open,
            waiting: st.queue.len(),
            pool_size: st.pool_size,
            capacity: st.capacity,
        }
    }

    /// Forgets a waiter; returns what it had been granted, if anything, for the caller to hand on.
    fn cancel(&self, key: usize) -> Option<Grant<C>> {
        let mut st = self.lock();
        let w = st.waiters.remove(key);
        if w.grant.is_none() && !w.closed && !w.expired {
            if let Some(pos) = st.queue.iter().position(|&k| k == key) {
                st.queue.remove(pos);
            }
        }
        w.grant
    }
}

/// The future of [`Core::acquire`].
///
/// Cancel-safe: dropped while queued, it leaves the queue; dropped after being granted an item or
/// a slot it has not yet returned, it hands the grant on to the next waiter (or the idle set).
#[must_use = "futures do nothing unless polled"]
pub struct Acquire<'a, C> {
    core: &'a Core<C>,
    key: Option<usize>,
    done: bool,
    expired: bool,
    deadline: u64,
}

impl<C> Acquire<'_, C> {
    /// Whether it resolved to `None` because its deadline passed (rather than a closed core).
    pub fn expired(&self) -> bool {
        self.expired
    }

    /// Sets the deadline of a checkout that is already waiting (or will wait), so that only
    /// checkouts that do wait pay for computing one.
    pub fn set_deadline(&mut self, deadline: u64) {
        self.deadline = deadline;
        if let Some(key) = self.key {
            if let Some(w) = self.core.lock().waiters.get_mut(key) {
                w.deadline = deadline;
            }
        }
    }
}

impl<C> Future for Acquire<'_, C> {
    type Output = Option<Grant<C>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Acquire holds no self-references; Unpin lets us use plain &mut.
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let mut st = this.core.lock();
        match this.key {
            None => {
                if let Some(grant) = this.core.take_now(&mut st) {
                    this.done = true;
                    return Poll::Ready(Some(grant));
                }
                if st.closed {
                    this.done = true;
                    return Poll::Ready(None);
                }
                let key = st.waiters.insert(Waiter {
                    waker: Some(cx.waker().clone()),
                    grant: None,
                    closed: false,
                    expired: false,
                    deadline: this.deadline,
                });
                st.queue.push_back(key);
                this.key = Some(key);
                Poll::Pending
            }
            Some(key) => {
                let w = &mut st.waiters[key];
                if let Some(grant) = w.grant.take() {
                    st.waiters.remove(key);
                    this.key = None;
                    this.done = true;
                    return Poll::Ready(Some(grant));
                }
                if w.closed || w.expired {
                    this.expired = w.expired;
                    st.waiters.remove(key);
                    this.key = None;
                    this.done = true;
                    return Poll::Ready(None);
                }
                match &mut w.waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    slot => *slot = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

impl<C> Unpin for Acquire<'_, C> {}

impl<C> Drop for Acquire<'_, C> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        match self.core.cancel(key) {
            Some(Grant::Item(item)) => self.core.release(item),
            Some(Grant::Slot) => self.core.release_slot(),
            None => {}
        }
    }
}

#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Flag(AtomicUsize);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn core(pool_size: usize, cap: usize) -> (Core<u32>, Arc<AtomicUsize>) {
        let closed = Arc::new(AtomicUsize::new(0));
        let c = closed.clone();
        let core = Core::new(
            pool_size,
            cap,
            Order::Fifo,
            Box::new(move |_| {
                c.fetch_add(1, Ordering::SeqCst);
            }),
        );
        (core, closed)
    }

    fn poll<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        let waker = Waker::from(Arc::new(Flag(AtomicUsize::new(0))));
        Pin::new(f).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn overflow_items_close_on_return_when_pool_size_idle() {
        let (core, closed) = core(1, 2);
        assert!(matches!(core.try_acquire(), Some(Grant::Slot)));
        assert!(matches!(core.try_acquire(), Some(Grant::Slot)));
        assert!(core.try_acquire().is_none());
        core.release(1);
        core.release(2);
        assert_eq!(closed.load(Ordering::SeqCst), 1);
        assert_eq!(
            core.counts(),
            Counts {
                idle: 1,
                open: 1,
                waiting: 0,
                pool_size: 1,
                capacity: 2,
            }
        );
    }

    #[test]
    fn resize_closes_idle_surplus_and_never_a_checked_out_item() {
        let (core, closed) = core(3, 4);
        for _ in 0..4 {
            assert!(matches!(core.try_acquire(), Some(Grant::Slot)));
        }
        core.release(1);
        core.release(2);
        // Down to 1 + 0: one of the two idle items goes now; the two checked out stay.
        let surplus = core.resize(1, 1);
        assert_eq!(surplus.len(), 1);
        for _ in surplus {
            core.release_slot();
        }
        let c = core.counts();
        assert_eq!((c.idle, c.open, c.pool_size, c.capacity), (1, 3, 1, 1));
        // Over capacity: nothing is granted, and items coming back are closed.
        assert!(
            core.try_acquire().is_some(),
            "the idle item is still handed out"
        );
        assert!(core.try_acquire().is_none());
        core.release(3);
        core.release(4);
        assert_eq!(closed.load(Ordering::SeqCst), 2);
        assert_eq!(core.counts().open, 1);
        // Up again: a waiter gets the room at once.
        let mut waiter = core.acquire();
        assert!(poll(&mut waiter).is_pending());
        assert!(core.resize(2, 3).is_empty());
        assert!(matches!(poll(&mut waiter), Poll::Ready(Some(Grant::Slot))));
        assert_eq!(core.counts().open, 2);
    }

    #[test]
    fn returned_item_goes_to_longest_waiter_even_beyond_pool_size() {
        let (core, closed) = core(1, 2);
        let _ = core.try_acquire();
        let _ = core.try_acquire();
        let mut first = core.acquire();
        let mut second = core.acquire();
        assert!(poll(&mut first).is_pending());
        assert!(poll(&mut second).is_pending());
        core.release(7);
        core.release(8);
        assert!(matches!(
            poll(&mut first),
            Poll::Ready(Some(Grant::Item(7)))
        ));
        assert!(matches!(
            poll(&mut second),
            Poll::Ready(Some(Grant::Item(8)))
        ));
        assert_eq!(closed.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn dropped_granted_waiter_hands_on() {
        let (core, _) = core(1, 1);
        let _ = core.try_acquire();
        let mut a = core.acquire();
        let mut b = core.acquire();
        assert!(poll(&mut a).is_pending());
        assert!(poll(&mut b).is_pending());
        core.release_slot();
        drop(a);
        assert!(matches!(poll(&mut b), Poll::Ready(Some(Grant::Slot))));
        assert_eq!(core.counts().open, 1);
    }

    #[test]
    fn expire_gives_up_only_waiters_past_their_deadline() {
        let (core, _) = core(1, 1);
        let _ = core.try_acquire();
        let mut early = core.acquire_until(10);
        let mut late = core.acquire();
        let mut never = core.acquire();
        assert!(poll(&mut early).is_pending());
        assert!(poll(&mut late).is_pending());
        // A deadline set once the checkout waits counts as well.
        late.set_deadline(20);
        assert!(poll(&mut never).is_pending());
        assert_eq!(core.expire(9), Some(10));
        assert_eq!(core.expire(10), Some(20));
        assert!(matches!(poll(&mut early), Poll::Ready(None)));
        assert!(early.expired());
        assert_eq!(core.counts().waiting, 2);
        // The next release skips the expired waiter and goes to the longest remaining one.
        core.release(5);
        assert!(matches!(poll(&mut late), Poll::Ready(Some(Grant::Item(5)))));
        assert!(!late.expired());
        // A waiter without a deadline never expires and never asks for the timer.
        assert_eq!(core.expire(u64::MAX - 1), None);
        assert!(poll(&mut never).is_pending());
        drop((early, late, never));
        assert_eq!(core.counts().waiting, 0);
    }

    #[test]
    fn close_wakes_waiters_with_none() {
        let (core, closed) = core(1, 1);
        let _ = core.try_acquire();
        let mut a = core.acquire();
        assert!(poll(&mut a).is_pending());
        assert!(core.close().is_empty());
        assert!(matches!(poll(&mut a), Poll::Ready(None)));
        core.release(1);
        assert_eq!(closed.load(Ordering::SeqCst), 1);
        assert_eq!(core.counts().open, 0);
    }
}
