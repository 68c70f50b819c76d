//! Statements run on the pool itself (`Pool::query_one`, `Pool::execute`, ...): pipelined on
//! busy connections when the pool is saturated, each answered or failed on its own, never
//! holding a transaction, never starving a checkout, and cancel-safe.

mod support;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use support::{
    cluster, eventually, observer, server_count, server_count_where, settings, terminate_backends,
};
use tidepool::{Error, Pool, Settings};

/// Deadline of every poll: long enough never to be the reason a healthy run fails.
const WITHIN: Duration = Duration::from_secs(60);

/// A pool of exactly `size` connections (no overflow).
fn small_pool(pg: &tidepool_cluster::Cluster, app: &str, size: usize) -> Pool {
    pool_with_timeout(pg, app, size, Settings::default().pool_timeout)
}

/// As [`small_pool`], with its own `DB_POOL_TIMEOUT`.
fn pool_with_timeout(
    pg: &tidepool_cluster::Cluster,
    app: &str,
    size: usize,
    pool_timeout: Duration,
) -> Pool {
    Pool::new(Settings {
        pool_size: size,
        max_overflow: Some(0),
        pool_timeout,
        ..settings(pg, app)
    })
    .unwrap()
}

/// Waits until every connection is back in the pool (lanes drain as their last statement is
/// answered; a reset may run in the background).
async fn all_returned(pool: &Pool) -> bool {
    eventually(WITHIN, || async { pool.status().checked_out == 0 }).await
}

/// Spawns `n` tasks; task `i` runs `work(i, its own handle on the pool)`.
fn spawn_on<T, Fut>(pool: &Pool, n: i32, work: impl Fn(i32, Pool) -> Fut) -> Vec<JoinHandle<T>>
where
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    (0..n)
        .map(|i| tokio::spawn(work(i, pool.clone())))
        .collect()
}

/// Every task's result, in order.
async fn joined<T>(tasks: Vec<JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_pool_pipelines_and_keeps_answers_and_errors_apart() {
    let app = "pipe-answers";
    let pg = cluster();
    let obs = observer(&pg).await;
    let pool = small_pool(&pg, app, 2);
    let tasks = spawn_on(&pool, 32, |task, pool| async move {
        let (mut ok, mut failed) = (0, 0);
        for k in 0..100i32 {
            let n = task * 1000 + k;
            if k % 10 == 3 {
                // Fails on the server; the statements pipelined around it must not.
                let e = pool
                    .query_one("SELECT 1 / $1::int", &[&0i32])
                    .await
                    .expect_err("division by zero");
                let Error::Db(db) = &e else { panic!("{e:?}") };
                assert_eq!(
                    db.code(),
                    Some(&tidepool::tokio_postgres::error::SqlState::DIVISION_BY_ZERO),
                    "{e}"
                );
                failed += 1;
            } else {
                let row = pool.query_one("SELECT $1::int", &[&n]).await.unwrap();
                assert_eq!(
                    row.get::<_, i32>(0),
                    n,
                    "an answer went to the wrong caller"
                );
                ok += 1;
            }
        }
        (ok, failed)
    });
    let (mut ok, mut failed) = (0, 0);
    for (o, f) in joined(tasks).await {
        (ok, failed) = (ok + o, failed + f);
    }
    assert_eq!((ok, failed), (2880, 320));
    let status = pool.status();
    assert!(
        status.pipelined_statements > 0,
        "32 tasks on 2 connections never shared one: {status:?}"
    );
    // Server errors do not cost connections, and the pool never exceeded its capacity.
    assert_eq!(status.connections_created, 2, "{status:?}");
    assert!(server_count(&obs, app).await <= 2);
    assert!(all_returned(&pool).await, "{:?}", pool.status());
    eprintln!(
        "PIPELINE 3200 statements on 2 connections: {} joined a busy connection",
        status.pipelined_statements
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_that_open_a_transaction_get_their_own_connection() {
    let app = "pipe-txn";
    let pg = cluster();
    let obs = observer(&pg).await;
    let pool = small_pool(&pg, app, 1);
    pool.execute("BEGIN", &[]).await.unwrap();
    // The connection came back rolled back: nothing is left idle in a transaction, and the next
    // statement runs in autocommit (its own transaction).
    let clean = eventually(WITHIN, || async {
        server_count_where(&obs, app, "state LIKE 'idle in transaction%'").await == 0
    })
    .await;
    assert!(clean, "a transaction was left open on a pooled connection");
    assert!(all_returned(&pool).await);
    // Had the transaction stayed open, the error would abort it and the next statement fail.
    pool.query_one("SELECT 1 / 0", &[])
        .await
        .expect_err("division by zero");
    pool.query_one("SELECT 1", &[])
        .await
        .expect("the next statement runs in a transaction of its own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkouts_are_not_starved_by_pipelined_statements() {
    let app = "pipe-fair";
    let pg = cluster();
    let pool = pool_with_timeout(&pg, app, 2, Duration::from_secs(10));
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_on(&pool, 24, |_, pool| {
        let stop = stop.clone();
        async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                pool.query_one("SELECT 1", &[]).await.unwrap();
                n += 1;
            }
            n
        }
    });
    // Let the lanes fill up, then check out connections in the middle of the load.
    assert!(
        eventually(WITHIN, || async {
            pool.status().pipelined_statements > 100
        })
        .await,
        "the load never pipelined"
    );
    for _ in 0..5 {
        let conn = pool.get().await.expect("a checkout gets its turn");
        conn.query_one("SELECT 1", &[]).await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let total: u64 = joined(load).await.into_iter().sum();
    assert!(total > 0);
    assert!(all_returned(&pool).await);
    assert_eq!(pool.status().timeouts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_pipelined_statements_leak_nothing() {
    let app = "pipe-cancel";
    let pg = cluster();
    let obs = observer(&pg).await;
    let pool = small_pool(&pg, app, 2);
    let tasks = spawn_on(&pool, 16, |task, pool| async move {
        let mut rng = fastrand::Rng::with_seed(task as u64);
        for _ in 0..50 {
            let budget = Duration::from_micros(rng.u64(0..3000));
            let _ = tokio::time::timeout(
                budget,
                pool.query_one("SELECT pg_sleep(0.001), $1::int", &[&1i32]),
            )
            .await;
        }
    });
    joined(tasks).await;
    assert!(all_returned(&pool).await, "{:?}", pool.status());
    let status = pool.status();
    assert!(status.total_connections <= 2, "{status:?}");
    // The server agrees with the pool, and the pool still answers correctly.
    let agreed = eventually(WITHIN, || async {
        server_count(&obs, app).await == pool.status().total_connections as i64
    })
    .await;
    assert!(agreed, "server and pool disagree: {:?}", pool.status());
    for n in 0..20i32 {
        let row = pool.query_one("SELECT $1::int", &[&n]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_statements_time_out_and_fail_after_close() {
    let app = "pipe-timeout";
    let pg = cluster();
    let pool = pool_with_timeout(&pg, app, 1, Duration::from_millis(300));
    // The only connection is checked out: a statement waits DB_POOL_TIMEOUT, then fails with
    // SQLAlchemy's message.
    let held = pool.get().await.unwrap();
    let e = pool
        .execute("SELECT 1", &[])
        .await
        .expect_err("no connection");
    assert!(matches!(e, Error::Timeout(_)), "{e:?}");
    assert!(
        e.to_string()
            .contains("QueuePool limit of size 1 overflow 0 reached"),
        "{e}"
    );
    drop(held);
    assert_eq!(pool.execute("SELECT 1", &[]).await.unwrap(), 1);
    pool.close();
    let e = pool.query("SELECT 1", &[]).await.expect_err("closed");
    assert!(matches!(e, Error::Closed), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_never_queue_behind_a_slow_one_when_a_connection_comes_back() {
    let app = "pipe-slow";
    let pg = cluster();
    let obs = observer(&pg).await;
    let pool = pool_with_timeout(&pg, app, 2, Duration::from_secs(30));
    // One connection held by a checkout, the other running a slow statement on the pool.
    let held = pool.get().await.unwrap();
    let slow = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.execute("SELECT pg_sleep(2)", &[]).await })
    };
    let running = eventually(WITHIN, || async {
        let busy = "state = 'active' AND query LIKE '%pg_sleep(2)%' \
                    AND now() - query_start > interval '100 ms'";
        server_count_where(&obs, app, busy).await == 1
    })
    .await;
    assert!(running, "the slow statement never started");

    // A quick statement finds no free connection and no lane that answers: it waits.
    let mut quick = Box::pin(pool.query_one("SELECT 1", &[]));
    let first = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::future::Future::poll(quick.as_mut(), cx))
    })
    .await;
    assert!(first.is_pending(), "nothing was free, yet it finished");
    // The checkout gives its connection back: the quick statement takes it at once instead of
    // queueing behind the slow one.
    drop(held);
    tokio::time::timeout(WITHIN, quick)
        .await
        .expect("the quick statement finished")
        .unwrap();
    assert!(
        !slow.is_finished(),
        "the quick statement waited for the slow one"
    );
    assert_eq!(pool.status().pipelined_statements, 0);
    slow.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_backends_under_pipelined_load_give_typed_errors_then_recover() {
    let app = "pipe-terminate";
    let pg = cluster();
    let obs = observer(&pg).await;
    let pool = small_pool(&pg, app, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_on(&pool, 16, |task, pool| {
        let stop = stop.clone();
        async move {
            let (mut ok, mut lost) = (0u64, 0u64);
            let mut n = task * 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                match pool.query_one("SELECT $1::int", &[&n]).await {
                    Ok(row) => {
                        assert_eq!(row.get::<_, i32>(0), n, "wrong answer");
                        ok += 1;
                    }
                    Err(e) => {
                        assert!(e.is_disconnect(), "not a typed disconnect: {e:?}");
                        lost += 1;
                    }
                }
            }
            (ok, lost)
        }
    });
    assert!(
        eventually(WITHIN, || async {
            pool.status().pipelined_statements > 200
        })
        .await,
        "the load never pipelined"
    );
    let killed = terminate_backends(&obs, app).await;
    assert!(killed >= 1);
    // Statements succeed again on fresh connections.
    let before = pool.status().connections_created;
    assert!(
        eventually(WITHIN, || async {
            pool.status().connections_created > before
                && pool.query_one("SELECT 1", &[]).await.is_ok()
        })
        .await,
        "the pool did not recover: {:?}",
        pool.status()
    );
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut lost) = (0, 0);
    for (o, l) in joined(load).await {
        (ok, lost) = (ok + o, lost + l);
    }
    assert!(ok > 0);
    assert!(all_returned(&pool).await, "{:?}", pool.status());
    let status = pool.status();
    assert!(status.total_connections <= 2, "{status:?}");
    assert!(status.invalidations >= 1, "{status:?}");
    eprintln!(
        "PIPELINE terminate: {ok} answered, {lost} lost to the disconnect (typed), {} connections \
         created",
        status.connections_created
    );
}

/// A `Statement` belongs to the connection that prepared it on the server; tidepool's runs
/// anywhere: on another checked-out connection, on the pool, and pipelined on lanes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_prepared_on_one_connection_runs_anywhere() {
    let app = "pipe-prepared";
    let pg = cluster();
    let pool = small_pool(&pg, app, 2);
    let a = pool.get().await.unwrap();
    let stmt = a.prepare("SELECT $1::int + 1").await.unwrap();
    // `a` stays checked out, so the pool runs this on the other connection.
    let row = pool.query_one(&stmt, &[&41i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    let b = pool.get().await.unwrap();
    assert_ne!(a.id(), b.id());
    assert_eq!(
        b.query_one(&stmt, &[&1i32]).await.unwrap().get::<_, i32>(0),
        2
    );
    assert_eq!(
        a.query_one(&stmt, &[&2i32]).await.unwrap().get::<_, i32>(0),
        3
    );
    drop((a, b));
    // Saturated: pipelined on both connections.
    let tasks = spawn_on(&pool, 16, |t, pool| {
        let stmt = stmt.clone();
        async move {
            for k in 0..50i32 {
                let row = pool.query_one(&stmt, &[&(t * 100 + k)]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), t * 100 + k + 1);
            }
        }
    });
    joined(tasks).await;
    assert!(pool.status().pipelined_statements > 0);
}
