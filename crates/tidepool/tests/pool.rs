//! The pool against real PostgreSQL: the seed's load and recovery tests, SQLAlchemy's QueuePool
//! semantics, invalidation, recycle, cancel safety and bad input. Every test starts its own
//! throwaway cluster; the server's `pg_stat_activity` is the witness where the pool's own figures
//! could lie.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{
    blocking, cluster, eventually, observer, server_count, server_pids, settings, timeout_cause,
};
use tidepool::{Error, Pool, Settings};
use tidepool_cluster::ShutdownMode;

const WITHIN: Duration = Duration::from_secs(10);

/// Issue test 1: the seed's load test. 100 concurrent `SELECT pg_sleep(0.1), 1` through 5 + 10:
/// no errors, and exactly 15 connections opened (15 distinct backends seen by the server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_load_test_opens_exactly_capacity() {
    let pg = cluster();
    let pool = Pool::new(settings(&pg, "load")).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let conn = pool.get().await?;
            let row = conn
                .query_one("SELECT pg_sleep(0.1), 1, pg_backend_pid()", &[])
                .await?;
            Ok::<(i32, i32), Error>((row.get(1), row.get(2)))
        }));
    }
    let mut errors = Vec::new();
    let mut pids = HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok((one, pid)) => {
                assert_eq!(one, 1);
                pids.insert(pid);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    assert!(errors.is_empty(), "Pool exhausted: {errors:?}");
    assert_eq!(pids.len(), 15, "the server saw {} backends", pids.len());
    let status = pool.status();
    assert_eq!(status.connections_created, 15);
    assert_eq!(status.timeouts, 0);
}

/// Issue test 2: the seed's recovery test. `dispose()`, then a query works on a fresh connection.
#[tokio::test]
async fn dispose_then_query_works() {
    let pg = cluster();
    let pool = Pool::new(settings(&pg, "recovery")).unwrap();
    let before: i32 = pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    pool.dispose();
    let conn = pool.get().await.unwrap();
    let row = conn
        .query_one("SELECT 1, pg_backend_pid()", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    assert_ne!(
        row.get::<_, i32>(1),
        before,
        "dispose must replace the connection"
    );
    drop(conn);
    assert_eq!(pool.status().connections_closed.disposed, 1);
}

/// `dispose()` while a connection is checked out: that one is closed when it comes back, not
/// orphaned (SQLAlchemy's behaviour), and the pool keeps serving meanwhile.
#[tokio::test]
async fn dispose_closes_checked_out_connections_on_return() {
    let pg = cluster();
    let obs = observer(&pg).await;
    let pool = Pool::new(settings(&pg, "dispose-out")).unwrap();
    let held = pool.get().await.unwrap();
    held.query_one("SELECT 1", &[]).await.unwrap();
    pool.dispose();
    pool.get()
        .await
        .unwrap()
        .query_one("SELECT 1", &[])
        .await
        .unwrap();
    drop(held);
    let status = pool.status();
    assert_eq!(status.total_connections, 1, "{status:?}");
    assert!(
        eventually(WITHIN, || async {
            server_count(&obs, "dispose-out").await == 1
        })
        .await
    );
}

/// Issue test 3: after a burst the server sees the pool back at `pool_size` connections, and the
/// pool's figures agree with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_shrinks_back_to_pool_size() {
    let pg = cluster();
    let obs = observer(&pg).await;
    let pool = Pool::new(settings(&pg, "burst")).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let conn = pool.get().await.unwrap();
            conn.execute("SELECT pg_sleep(0.05)", &[]).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let status = pool.status();
    assert_eq!(status.checked_out, 0);
    assert_eq!(status.checked_in, 5);
    assert_eq!(status.total_connections, 5);
    assert_eq!(status.overflow, 0);
    assert_eq!(status.connections_closed.overflow, 10);
    assert!(
        eventually(WITHIN, || async { server_count(&obs, "burst").await == 5 }).await,
        "server still sees {} backends",
        server_count(&obs, "burst").await
    );
}

/// Issue test 4: exhaustion times out with SQLAlchemy's exact message; once a connection comes
/// back, checkouts succeed again.
#[tokio::test]
async fn exhaustion_times_out_with_sqlalchemy_message() {
    let pg = cluster();
    let pool = Pool::new(Settings {
        pool_size: 2,
        max_overflow: Some(1),
        pool_timeout: Duration::from_millis(200),
        ..settings(&pg, "exhaust")
    })
    .unwrap();
    let held: Vec<_> = hold(&pool, 3).await;
    let err = pool.get().await.unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "QueuePool limit of size 2 overflow 1 reached, connection timed out, timeout 0.20"
    );
    assert_eq!(pool.status().timeouts, 1);
    drop(held);
    let conn = pool.get().await.unwrap();
    conn.query_one("SELECT 1", &[]).await.unwrap();
}

/// The pool's one timer for waiting checkouts runs on the runtime of the first wait; a pool that
/// outlives that runtime (a pool kept in a static across `#[tokio::test]`s) still times out
/// checkouts on the next one.
#[test]
fn checkout_timeouts_work_on_a_second_runtime() {
    let pg = cluster();
    let pool = Pool::new(Settings {
        pool_size: 1,
        max_overflow: Some(0),
        pool_timeout: Duration::from_millis(200),
        ..settings(&pg, "two-runtimes")
    })
    .unwrap();
    for round in 0..2 {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let held = pool.get().await.unwrap();
            held.query_one("SELECT 1", &[]).await.unwrap();
            let waited = tokio::time::timeout(WITHIN, pool.get()).await;
            let err = waited
                .unwrap_or_else(|_| panic!("round {round}: the checkout never timed out"))
                .expect_err("the only connection is held");
            assert!(matches!(err, Error::Timeout(_)), "round {round}: {err:?}");
        });
        // Ends the runtime with its tasks: the timer's and the connections'.
        drop(runtime);
    }
    assert_eq!(pool.status().timeouts, 2);
}

async fn hold(pool: &Pool, n: usize) -> Vec<tidepool::PooledConnection> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(pool.get().await.unwrap());
    }
    held
}

/// Issue test 5: waiters are served in arrival order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_in_arrival_order() {
    let pg = cluster();
    let pool = Pool::new(Settings {
        pool_size: 1,
        max_overflow: Some(0),
        ..settings(&pg, "fifo")
    })
    .unwrap();
    let held = pool.get().await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (p, order) = (pool.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let conn = p.get().await.unwrap();
            order.lock().unwrap().push(i);
            conn.query_one("SELECT 1", &[]).await.unwrap();
        }));
        // Queue them one by one so arrival order is known.
        assert!(eventually(WITHIN, || async { pool.status().waiting == i + 1 }).await);
    }
    drop(held);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), (0..20).collect::<Vec<_>>());
    assert_eq!(
        pool.status().connections_created,
        1,
        "handed over, never reopened"
    );
}

/// Issue test 6: every pooled backend terminated by the server, then many checkouts and queries:
/// no error reaches the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_backends_never_reach_the_caller() {
    let pg = cluster();
    let obs = observer(&pg).await;
    let pool = Pool::new(settings(&pg, "terminate")).unwrap();
    // Open five and return them, so five idle connections will be dead.
    let five = hold(&pool, 5).await;
    drop(five);
    assert_eq!(server_count(&obs, "terminate").await, 5);
    let killed: i64 = obs
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'terminate') t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 5);
    assert!(
        eventually(WITHIN, || async {
            server_count(&obs, "terminate").await == 0
        })
        .await
    );
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let conn = pool.get().await?;
            conn.query_one("SELECT 1", &[]).await.map(|_| ())
        }));
    }
    let errors: Vec<String> = futures_collect(tasks).await;
    assert!(
        errors.is_empty(),
        "{} errors reached callers: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    let status = pool.status();
    let dead = status.connections_closed.broken
        + status.connections_closed.ping_failed
        + status.connections_closed.invalidated;
    assert_eq!(dead, 5, "{status:?}");
}

async fn futures_collect(tasks: Vec<tokio::task::JoinHandle<Result<(), Error>>>) -> Vec<String> {
    let mut errors = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            errors.push(e.to_string());
        }
    }
    errors
}

/// Issue test 7: the server restarts while the pool holds idle connections. No checkout returns a
/// dead connection, and the connections older than the restart are replaced through one
/// invalidation instead of each failing in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_invalidates_old_connections_at_once() {
    for mode in [ShutdownMode::Fast, ShutdownMode::Immediate] {
        let pg = Arc::new(cluster());
        let pool = Pool::new(settings(&pg, "restart")).unwrap();
        assert_eq!(pool.warm_up().await.unwrap(), 5);
        let pg2 = pg.clone();
        blocking(move || pg2.restart(mode)).await.unwrap();
        for _ in 0..20 {
            let conn = pool
                .get()
                .await
                .unwrap_or_else(|e| panic!("{mode:?}: checkout failed: {e}"));
            conn.query_one("SELECT 1", &[])
                .await
                .unwrap_or_else(|e| panic!("{mode:?}: a dead connection was handed out: {e}"));
        }
        let s = pool.status();
        let detected = s.connections_closed.broken + s.connections_closed.ping_failed;
        assert_eq!(
            detected, 1,
            "{mode:?}: only the first dead connection is detected one by one: {s:?}"
        );
        assert_eq!(s.connections_closed.invalidated, 4, "{mode:?}: {s:?}");
        assert_eq!(s.invalidations, 1, "{mode:?}: {s:?}");
    }
}

/// Issue test 8: a connection older than `DB_POOL_RECYCLE` is replaced at checkout.
#[tokio::test]
async fn recycle_replaces_old_connections() {
    let pg = cluster();
    let pool = Pool::new(Settings {
        recycle: Some(Duration::from_millis(300)),
        ..settings(&pg, "recycle")
    })
    .unwrap();
    let pid = |c: tidepool::PooledConnection| async move {
        c.query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get::<_, i32>(0)
    };
    let first = pid(pool.get().await.unwrap()).await;
    let again = pid(pool.get().await.unwrap()).await;
    assert_eq!(first, again, "a young connection is reused");
    // Waiting for the connection to age is the point of this test, not synchronisation.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let later = pid(pool.get().await.unwrap()).await;
    assert_ne!(first, later, "an old connection must be replaced");
    assert_eq!(pool.status().connections_closed.recycled, 1);
}

/// Issue test 9: 10,000 checkouts and queries cancelled at random points. Afterwards nothing is
/// checked out, the pool never had more than its capacity open, and the server agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_cancellation_leaks_nothing() {
    let pg = cluster();
    let obs = observer(&pg).await;
    let pool = Pool::new(Settings {
        pool_timeout: Duration::from_secs(5),
        ..settings(&pg, "cancel")
    })
    .unwrap();
    pool.warm_up().await.unwrap();
    let over = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (pool, over, done) = (pool.clone(), over.clone(), done.clone());
        tokio::spawn(async move {
            let mut max = 0;
            while !done.load(Ordering::Relaxed) {
                let s = pool.status();
                max = max.max(s.total_connections);
                if s.total_connections > 15 || s.checked_in + s.checked_out != s.total_connections {
                    over.store(true, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            max
        })
    };
    let completed = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..50u64 {
        let (pool, completed) = (pool.clone(), completed.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(w);
            for _ in 0..200 {
                // Mostly a few milliseconds, cancelling at random points; one in ten gets time
                // to finish, so the pool also does real work while loaded.
                let budget = if rng.u8(0..10) == 0 {
                    Duration::from_secs(2)
                } else {
                    Duration::from_micros(rng.u64(0..3000))
                };
                let kind = rng.u8(0..4);
                let op = async {
                    let mut conn = pool.get().await?;
                    match kind {
                        0 => {
                            conn.query_one("SELECT 1", &[]).await?;
                        }
                        1 => {
                            conn.execute("SELECT pg_sleep(0.002)", &[]).await?;
                        }
                        2 => {
                            let tx = conn.transaction().await?;
                            tx.execute("SELECT pg_sleep(0.001)", &[]).await?;
                            tx.commit().await?;
                        }
                        _ => {
                            conn.batch_execute("BEGIN; SELECT 1").await?;
                        }
                    }
                    Ok::<(), Error>(())
                };
                if let Ok(Ok(())) = tokio::time::timeout(budget, op).await {
                    completed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let max = sampler.await.unwrap();
    assert!(
        !over.load(Ordering::Relaxed),
        "capacity exceeded or figures inconsistent (max {max})"
    );
    // Connections interrupted mid-statement are closed in the background: wait for that.
    assert!(
        eventually(WITHIN, || async { pool.status().checked_out == 0 }).await,
        "still checked out: {:?}",
        pool.status()
    );
    let open = pool.status().total_connections as i64;
    assert!(open <= 5);
    assert!(
        eventually(WITHIN, || async {
            server_count(&obs, "cancel").await == open
        })
        .await,
        "server sees {} backends, pool {open}",
        server_count(&obs, "cancel").await
    );
    // And the pool still works, with clean connections.
    for _ in 0..10 {
        let conn = pool.get().await.unwrap();
        let err = conn.batch_execute("SAVEPOINT probe").await.unwrap_err();
        assert_eq!(
            err.code(),
            Some("25P01"),
            "a connection came back inside a transaction"
        );
    }
    let s = pool.status();
    assert!(
        s.cancelled_statements > 0,
        "the test cancelled nothing mid-statement: {s:?} completed {}",
        completed.load(Ordering::Relaxed)
    );
    assert!(
        completed.load(Ordering::Relaxed) > 0,
        "the test never completed an operation"
    );
}

/// Issue test 10: a task cancelled or dropped inside a transaction. The next user of that
/// connection is not in a transaction and sees none of its writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_transactions_never_leak() {
    let pg = cluster();
    let pool = Pool::new(Settings {
        pool_size: 1,
        max_overflow: Some(0),
        ..settings(&pg, "txn")
    })
    .unwrap();
    pool.get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();

    async fn clean(pool: &Pool, id: i32) {
        let conn = pool.get().await.unwrap();
        let err = conn.batch_execute("SAVEPOINT probe").await.unwrap_err();
        assert_eq!(
            err.code(),
            Some("25P01"),
            "next user is inside a transaction"
        );
        let n: i64 = conn
            .query_one("SELECT count(*) FROM t WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "row {id} of an abandoned transaction is visible");
    }

    // Dropped between statements, Transaction object dropped without commit.
    {
        let mut conn = pool.get().await.unwrap();
        let tx = conn.transaction().await.unwrap();
        tx.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
    }
    clean(&pool, 1).await;

    // Cancelled in the middle of a statement inside the transaction.
    let r = tokio::time::timeout(Duration::from_millis(100), async {
        let mut conn = pool.get().await.unwrap();
        let tx = conn.transaction().await.unwrap();
        tx.execute("INSERT INTO t VALUES (2)", &[]).await.unwrap();
        tx.execute("SELECT pg_sleep(5)", &[]).await.unwrap();
        tx.commit().await.unwrap();
    })
    .await;
    assert!(r.is_err(), "the timeout must have cancelled the task");
    clean(&pool, 2).await;

    // A transaction opened with raw SQL and the connection dropped.
    {
        let conn = pool.get().await.unwrap();
        conn.batch_execute("BEGIN; INSERT INTO t VALUES (3)")
            .await
            .unwrap();
    }
    clean(&pool, 3).await;

    // A failed transaction (error inside), dropped.
    {
        let mut conn = pool.get().await.unwrap();
        let tx = conn.transaction().await.unwrap();
        tx.execute("INSERT INTO t VALUES (4)", &[]).await.unwrap();
        let _ = tx.execute("SELECT 1/0", &[]).await.unwrap_err();
    }
    clean(&pool, 4).await;

    // A task aborted while it holds a transaction.
    let pool2 = pool.clone();
    let task = tokio::spawn(async move {
        let mut conn = pool2.get().await.unwrap();
        let tx = conn.transaction().await.unwrap();
        tx.execute("INSERT INTO t VALUES (5)", &[]).await.unwrap();
        std::future::pending::<()>().await;
    });
    assert!(eventually(WITHIN, || async { pool.status().checked_out == 1 }).await);
    task.abort();
    let _ = task.await;
    clean(&pool, 5).await;

    // A committed transaction is visible, to prove the probe can see rows at all.
    {
        let mut conn = pool.get().await.unwrap();
        let tx = conn.transaction().await.unwrap();
        tx.execute("INSERT INTO t VALUES (6)", &[]).await.unwrap();
        tx.commit().await.unwrap();
    }
    let conn = pool.get().await.unwrap();
    let n: i64 = conn
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

/// Issue test 11: bad settings and URLs are rejected with their messages; a wrong password fails
/// at once with the server's own error; an unreachable host gives up after `DB_CONNECT_TIMEOUT`.
#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let err =
        Settings::from_lookup(|k| (k == "DB_POOL_SIZE").then(|| "lots".to_string())).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("DB_POOL_SIZE") && msg.contains("lots"),
        "{msg}"
    );

    let err = Settings::from_lookup(|k| (k == "DB_POOL_PRE_PING").then(|| "maybe".to_string()))
        .unwrap_err();
    assert!(err.to_string().contains("DB_POOL_PRE_PING"), "{err}");

    let err = Settings::from_lookup(|k| {
        (k == "DATABASE_URL").then(|| "mysql://root:hunter22@localhost/db".to_string())
    })
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("DATABASE_URL") || msg.contains("mysql"),
        "{msg}"
    );
    assert!(!msg.contains("hunter22"), "password leaked: {msg}");

    let pool = Pool::new(Settings::default()).unwrap_err();
    assert!(pool.to_string().contains("DATABASE_URL"), "{pool}");

    // Wrong password: the server's error, at once (Connect, not a Timeout after 30 s).
    let pg = cluster();
    let bad = pg.url().replace(pg.password(), "not-the-password");
    let pool = Pool::new(Settings {
        database_url: Some(bad.parse().unwrap()),
        ..Settings::default()
    })
    .unwrap();
    let err = pool.get().await.unwrap_err();
    assert!(matches!(err, Error::Connect(_)), "{err:?}");
    assert_eq!(err.code(), Some("28P01"));
    let msg = err.to_string();
    assert!(msg.contains("password authentication failed"), "{msg}");
    assert!(!msg.contains("not-the-password") && !format!("{err:?}").contains("not-the-password"));

    // Unknown database: also at once.
    let url = format!("{}_nope", pg.url());
    let pool = Pool::new(Settings {
        database_url: Some(url.parse().unwrap()),
        ..Settings::default()
    })
    .unwrap();
    let err = pool.get().await.unwrap_err();
    assert_eq!(err.code(), Some("3D000"), "{err}");

    // A host that accepts TCP but never answers: each attempt gives up at DB_CONNECT_TIMEOUT and
    // the checkout reports that cause.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let pool = Pool::new(Settings {
        database_url: Some(
            format!("postgresql://u:secret-pw@127.0.0.1:{port}/db")
                .parse()
                .unwrap(),
        ),
        connect_timeout: Duration::from_millis(200),
        pool_timeout: Duration::from_millis(500),
        ..Settings::default()
    })
    .unwrap();
    let err = pool.get().await.unwrap_err();
    let cause = timeout_cause(&err);
    assert!(cause.contains("timed out after 0.20s"), "{cause}");
    assert!(err
        .to_string()
        .starts_with("QueuePool limit of size 5 overflow 10 reached"));
    assert!(!err.to_string().contains("secret-pw") && !format!("{err:?}").contains("secret-pw"));
    drop(silent);
}

/// The statement cache prepares each text once per connection; turning it off still works.
#[tokio::test]
async fn statement_cache_prepares_once() {
    let pg = cluster();
    for cache in [true, false] {
        let pool = Pool::new(Settings {
            statement_cache: cache,
            pool_size: 1,
            ..settings(&pg, "cache")
        })
        .unwrap();
        let conn = pool.get().await.unwrap();
        for i in 0..5i32 {
            let v: i32 = conn
                .query_one("SELECT $1::int", &[&i])
                .await
                .unwrap()
                .get(0);
            assert_eq!(v, i);
        }
        let prepared: i64 = conn
            .query_one(
                "SELECT count(*) FROM pg_prepared_statements WHERE statement = 'SELECT $1::int'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(prepared, if cache { 1 } else { 0 }, "cache={cache}");
        let st = conn.prepare("SELECT $1::text").await.unwrap();
        assert_eq!(st.sql(), "SELECT $1::text");
        let v: String = conn.query_one(&st, &[&"x"]).await.unwrap().get(0);
        assert_eq!(v, "x");
    }
}

/// LIFO hands out the most recently returned connection; FIFO the oldest.
#[tokio::test]
async fn lifo_and_fifo_idle_order() {
    let pg = cluster();
    for lifo in [true, false] {
        let pool = Pool::new(Settings {
            use_lifo: lifo,
            pre_ping: false,
            ..settings(&pg, "order")
        })
        .unwrap();
        let a = pool.get().await.unwrap();
        let b = pool.get().await.unwrap();
        let (ida, idb) = (a.id(), b.id());
        drop(a);
        drop(b);
        let next = pool.get().await.unwrap();
        assert_eq!(next.id(), if lifo { idb } else { ida }, "lifo={lifo}");
    }
}

/// `close()` fails waiting and later checkouts, and closes connections as they come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_fails_waiters_and_later_checkouts() {
    let pg = cluster();
    let pool = Pool::new(Settings {
        pool_size: 1,
        max_overflow: Some(0),
        ..settings(&pg, "close")
    })
    .unwrap();
    let held = pool.get().await.unwrap();
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get().await.map(|_| ()) })
    };
    assert!(eventually(WITHIN, || async { pool.status().waiting == 1 }).await);
    pool.close();
    assert!(matches!(waiter.await.unwrap(), Err(Error::Closed)));
    assert!(matches!(pool.get().await, Err(Error::Closed)));
    drop(held);
    assert_eq!(pool.status().total_connections, 0);
}

/// The server killed and restarted with checkouts waiting: the transient refusals are retried
/// within `DB_POOL_TIMEOUT` and the waiting checkouts succeed once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkouts_ride_out_a_short_outage() {
    let pg = Arc::new(cluster());
    let pool = Pool::new(settings(&pg, "outage")).unwrap();
    pool.get().await.unwrap();
    let pg2 = pg.clone();
    blocking(move || pg2.stop(ShutdownMode::Immediate))
        .await
        .unwrap();
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let conn = pool.get().await?;
            conn.query_one("SELECT 1", &[]).await.map(|_| ())
        })
    };
    // Let the checkout see refusals before the server returns.
    assert!(
        eventually(WITHIN, || async {
            pool.status().connections_closed.broken + pool.status().connections_closed.ping_failed
                > 0
        })
        .await
    );
    let pg3 = pg.clone();
    blocking(move || pg3.start_again()).await.unwrap();
    waiter.await.unwrap().unwrap();
    assert!(server_pids(&observer(&pg).await, "outage").await.len() <= 5);
}
