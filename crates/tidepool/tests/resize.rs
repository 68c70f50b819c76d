//! Live resize and drain against real PostgreSQL: `Pool::resize` under a load loses no
//! request, never takes a checked-out connection away, and converges to the new size;
//! `Pool::drain` waits for checked-out connections before closing.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{cluster, eventually, observer, server_count, settings};
use tidepool::{Error, Pool, Settings};

const WITHIN: Duration = Duration::from_secs(30);

/// 16 tasks run checkouts with a short statement while the pool goes 4+0 → 8+2 → 2+0 → 6+0:
/// no request fails, the pool's figures follow each size, and the server never holds more
/// backends than the larger of the old and new capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_under_load_loses_no_request() {
    let pg = cluster();
    let obs = observer(&pg).await;
    let app = "resize";
    let pool = Pool::new(Settings {
        pool_size: 4,
        max_overflow: Some(0),
        ..settings(&pg, app)
    })
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (pool, stop, done) = (pool.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures: Vec<Error> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let result = async {
                    let conn = pool.get().await?;
                    conn.query_one("SELECT pg_sleep(0.002)", &[]).await?;
                    Ok::<(), Error>(())
                }
                .await;
                match result {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.push(e),
                }
            }
            failures
        }));
    }
    for (size, overflow) in [(8, Some(2)), (2, Some(0)), (6, Some(0))] {
        let before = done.load(Ordering::Relaxed);
        pool.resize(size, overflow).unwrap();
        let capacity = size + overflow.unwrap_or(0);
        assert!(
            eventually(WITHIN, || async {
                let s = pool.status();
                s.pool_size == size
                    && s.max_overflow == overflow.map_or(-1, |o| o as i64)
                    && s.total_connections <= capacity
                    && done.load(Ordering::Relaxed) > before + 50
            })
            .await,
            "resized to {size}+{overflow:?}: {:?}",
            pool.status()
        );
        assert!(server_count(&obs, app).await <= capacity as i64 + 2);
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for task in tasks {
        failures.extend(task.await.unwrap());
    }
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(
        pool.resize(0, Some(0)).is_err(),
        "a pool_size of 0 is refused"
    );
}

/// `drain` waits for a checked-out connection to come back (here after 300 ms), then closes
/// the pool; with nothing coming back it gives up after its timeout and closes anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_checked_out_connections() {
    let pg = cluster();
    let pool = Pool::new(settings(&pg, "drain")).unwrap();
    let held = pool.get().await.unwrap();
    let returner = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(held);
    });
    assert!(
        pool.drain(Duration::from_secs(10)).await,
        "came back in time"
    );
    returner.await.unwrap();
    assert!(pool.is_closed());
    assert_eq!(pool.status().total_connections, 0);

    let pool = Pool::new(settings(&pg, "drain-late")).unwrap();
    let held = pool.get().await.unwrap();
    assert!(!pool.drain(Duration::from_millis(200)).await, "still held");
    assert!(pool.is_closed());
    drop(held);
    assert!(matches!(pool.get().await, Err(Error::Closed)));
}
