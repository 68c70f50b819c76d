//! The load driver: `tasks` tokio tasks take operations from a shared counter until `total` have
//! been taken; each operation is timed into the task's own histogram (nanoseconds), merged at the
//! end. The counter is the only shared state the driver adds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::systems::{Handle, OpResult};

/// 1 ns .. 120 s, 3 significant digits.
const HIST_MAX_NS: u64 = 120_000_000_000;

/// What each operation does.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// W3: acquire + release (`hold`: yield once while holding).
    Checkout { hold: bool },
    /// W2: `SELECT 1`.
    Select1,
    /// W1: `SELECT pg_sleep(0.1), 1`.
    Sleep,
}

/// What one run measured.
pub struct Outcome {
    pub ops: u64,
    pub wall: Duration,
    pub hist: Histogram<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl Outcome {
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.hist.is_empty() {
            return f64::NAN;
        }
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("valid bounds")
}

#[inline(always)]
async fn one(handle: &Handle, op: Op, task: usize) -> OpResult {
    match op {
        Op::Checkout { hold } => handle.checkout(hold).await,
        Op::Select1 => handle.select1(task).await,
        Op::Sleep => handle.sleep_request().await,
    }
}

/// Runs `total` operations over `tasks` tasks on the current runtime; tasks take no new operation
/// once `cap` has passed since the start.
pub async fn drive(
    handle: Arc<Handle>,
    op: Op,
    tasks: usize,
    total: u64,
    cap: Duration,
) -> Outcome {
    let counter = Arc::new(AtomicU64::new(0));
    // Histograms are allocated (and zeroed) before the clock starts and merged after it stops:
    // both cost milliseconds, which W1 would otherwise count.
    let mut hists: Vec<Histogram<u64>> = (0..tasks).map(|_| new_hist()).collect();
    let start = Instant::now();
    let deadline = start + cap;
    let mut joins = Vec::with_capacity(tasks);
    for task in 0..tasks {
        let handle = handle.clone();
        let counter = counter.clone();
        let mut hist = hists.pop().expect("one histogram per task");
        joins.push(tokio::spawn(async move {
            let mut errors = 0u64;
            let mut first_error = None;
            while counter.fetch_add(1, Ordering::Relaxed) < total {
                let t0 = Instant::now();
                if t0 >= deadline {
                    break;
                }
                let r = one(&handle, op, task).await;
                let ns = t0.elapsed().as_nanos() as u64;
                hist.saturating_record(ns.clamp(1, HIST_MAX_NS));
                if let Err(e) = r {
                    errors += 1;
                    first_error.get_or_insert(e);
                }
            }
            (hist, errors, first_error)
        }));
    }
    let mut done = Vec::with_capacity(tasks);
    for j in joins {
        done.push(j.await);
    }
    let wall = start.elapsed();
    let mut hist = new_hist();
    let mut errors = 0;
    let mut first_error = None;
    for d in done {
        match d {
            Ok((h, e, f)) => {
                let _ = hist.add(&h);
                errors += e;
                if first_error.is_none() {
                    first_error = f;
                }
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(format!("task panicked: {e}"));
            }
        }
    }
    Outcome {
        ops: hist.len(),
        wall,
        hist,
        errors,
        first_error,
    }
}
