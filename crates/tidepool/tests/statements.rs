//! Statements that stay correct when the server changes under them or when they meet each
//! other: the statement cache heals itself after a migration or a `DISCARD ALL`/`DEALLOCATE`,
//! statements on the pool are bounded by `DB_POOL_TIMEOUT` whatever runs ahead of them (even a
//! lock cycle the server cannot see), session state never leaks from a statement on the pool to
//! the next one, a pre-ping that times out closes only its own connection, and settings built
//! in code cannot panic the pool.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::proxy::Proxy;
use support::{cluster, cluster_addr, eventually, observer, settings, settings_via};
use tidepool::{Error, Pool, ResetOnReturn, RetryPolicy, Settings, SettingsError};
use tidepool_cluster::Cluster;

const SELECT_T: &str = "SELECT * FROM t WHERE id = $1";

fn pool(pg: &Cluster, app: &str, size: usize, pool_timeout: Duration) -> Pool {
    Pool::new(Settings {
        pool_size: size,
        max_overflow: Some(0),
        pool_timeout,
        ..settings(pg, app)
    })
    .expect("settings are valid")
}

async fn make_table(pg: &Cluster) -> tokio_postgres::Client {
    let admin = observer(pg).await;
    admin
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, a int); INSERT INTO t VALUES (1, 10), (2, 20)",
        )
        .await
        .expect("table created");
    admin
}

/// Both connections of a pool hold `SELECT * FROM t WHERE id = $1` prepared; a migration
/// changes its result type. Every following query succeeds (evicted, prepared again, run once
/// more) and sees the new column, on every connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_statements_heal_after_a_migration() {
    let pg = cluster();
    let admin = make_table(&pg).await;
    let pool = pool(&pg, "migrate", 2, Duration::from_secs(5));
    {
        let (a, b) = (pool.get().await.unwrap(), pool.get().await.unwrap());
        for c in [&a, &b] {
            assert_eq!(c.query(SELECT_T, &[&1i32]).await.unwrap()[0].len(), 2);
        }
    }
    admin
        .batch_execute("ALTER TABLE t ADD COLUMN b int")
        .await
        .unwrap();
    for i in 0..10 {
        let conn = pool.get().await.unwrap();
        let rows = conn
            .query(SELECT_T, &[&1i32])
            .await
            .unwrap_or_else(|e| panic!("query {i} after the migration: {e}"));
        assert_eq!(rows[0].len(), 3, "query {i} did not see the new column");
    }
    // Statements on the pool too, and a prepared Statement held across the migration.
    let held = pool.get().await.unwrap().prepare(SELECT_T).await.unwrap();
    admin
        .batch_execute("ALTER TABLE t ADD COLUMN c int")
        .await
        .unwrap();
    for _ in 0..10 {
        assert_eq!(pool.query(SELECT_T, &[&2i32]).await.unwrap()[0].len(), 4);
        assert_eq!(pool.query(&held, &[&2i32]).await.unwrap()[0].len(), 4);
    }
}

/// Inside a transaction the statement cannot be run again (the transaction is aborted): the
/// caller gets a typed error saying so, the statement is evicted, and the next transaction
/// works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_statement_inside_a_transaction_is_a_typed_error() {
    let pg = cluster();
    let admin = make_table(&pg).await;
    let pool = pool(&pg, "migrate-tx", 1, Duration::from_secs(5));
    let mut conn = pool.get().await.unwrap();
    conn.query(SELECT_T, &[&1i32]).await.unwrap();
    admin
        .batch_execute("ALTER TABLE t ADD COLUMN b int")
        .await
        .unwrap();
    let tx = conn.transaction().await.unwrap();
    let err = tx.query(SELECT_T, &[&1i32]).await.unwrap_err();
    assert!(
        matches!(err, Error::StatementInvalidated(_)),
        "not a typed stale-statement error: {err:?}"
    );
    assert_eq!(err.code(), Some("0A000"));
    assert!(err.to_string().contains("transaction"), "{err}");
    tx.rollback().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    assert_eq!(tx.query(SELECT_T, &[&1i32]).await.unwrap()[0].len(), 3);
    tx.commit().await.unwrap();
}

/// The retry policy repeats a whole transaction whose cached statement went stale: the second
/// attempt prepares it afresh and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_transaction_recovers_from_a_stale_statement() {
    let pg = cluster();
    let admin = make_table(&pg).await;
    let pool = pool(&pg, "migrate-retry", 1, Duration::from_secs(5));
    pool.get()
        .await
        .unwrap()
        .query(SELECT_T, &[&1i32])
        .await
        .unwrap();
    admin
        .batch_execute("ALTER TABLE t ADD COLUMN b int")
        .await
        .unwrap();
    let attempts = AtomicUsize::new(0);
    let policy = RetryPolicy::new().initial_wait(Duration::from_millis(10));
    let columns = pool
        .run_transaction(&policy, async |tx| {
            attempts.fetch_add(1, Ordering::Relaxed);
            Ok(tx.query(SELECT_T, &[&1i32]).await?[0].len())
        })
        .await
        .expect("the second attempt succeeds");
    assert_eq!(columns, 3);
    assert_eq!(attempts.load(Ordering::Relaxed), 2);
}

/// A migration seen on one connection spares the others: a transaction on another connection
/// that had the statement cached does not fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_seen_on_one_connection_spares_the_others() {
    let pg = cluster();
    let admin = make_table(&pg).await;
    let pool = pool(&pg, "migrate-spare", 2, Duration::from_secs(5));
    let a = pool.get().await.unwrap();
    let mut b = pool.get().await.unwrap();
    a.query(SELECT_T, &[&1i32]).await.unwrap();
    b.query(SELECT_T, &[&1i32]).await.unwrap();
    admin
        .batch_execute("ALTER TABLE t ADD COLUMN b int")
        .await
        .unwrap();
    // `a` meets the migration outside a transaction and heals.
    assert_eq!(a.query(SELECT_T, &[&1i32]).await.unwrap()[0].len(), 3);
    // `b` would fail inside its transaction with its own stale cache.
    let tx = b.transaction().await.unwrap();
    let rows = tx
        .query(SELECT_T, &[&1i32])
        .await
        .expect("the other connection's cache was cleared");
    assert_eq!(rows[0].len(), 3);
    tx.commit().await.unwrap();
}

/// `DISCARD ALL` (the `discard` reset) deallocates every prepared statement: a `Statement` the
/// user still holds is prepared again by its SQL, even inside a transaction; a user's own
/// `DEALLOCATE ALL` heals the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_survive_discard_all_and_deallocate() {
    let pg = cluster();
    let pool = Pool::new(Settings {
        pool_size: 1,
        max_overflow: Some(0),
        reset_on_return: ResetOnReturn::Discard,
        ..settings(&pg, "discard")
    })
    .unwrap();
    let held = {
        let conn = pool.get().await.unwrap();
        conn.prepare("SELECT $1::int + 1").await.unwrap()
    };
    // Returned through DISCARD ALL; the same (only) connection comes back.
    let mut conn = pool.get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    let v: i32 = tx
        .query_one(&held, &[&41i32])
        .await
        .expect("a held Statement after DISCARD ALL")
        .get(0);
    assert_eq!(v, 42);
    tx.commit().await.unwrap();
    conn.query_one("SELECT 2", &[]).await.unwrap();
    conn.batch_execute("DEALLOCATE ALL").await.unwrap();
    let v: i32 = conn
        .query_one("SELECT 2", &[])
        .await
        .expect("after DEALLOCATE ALL")
        .get(0);
    assert_eq!(v, 2);
    assert_eq!(pool.status().connections_created, 1);
}

/// The lock cycle PostgreSQL cannot see: task A holds a row lock in a transaction; task B's
/// statement on the pool blocks on that row; A then runs `SELECT 1` on the pool, which can only
/// share B's connection. It must not wait forever: within `DB_POOL_TIMEOUT` it answers or fails
/// with a timeout, A rolls back, and B's statement then completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_behind_a_lock_wait_is_bounded_by_the_pool_timeout() {
    let pg = cluster();
    let _admin = make_table(&pg).await;
    let pool_timeout = Duration::from_secs(1);
    let pool = pool(&pg, "cycle", 2, pool_timeout);
    for round in 0..5 {
        let mut a = pool.get().await.unwrap();
        let tx = a.transaction().await.unwrap();
        tx.execute("UPDATE t SET a = a + 1 WHERE id = 1", &[])
            .await
            .unwrap();
        let b = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.execute("UPDATE t SET a = a + 1 WHERE id = 1", &[])
                    .await
            })
        };
        // B's statement is waiting for the lock.
        let obs = observer(&pg).await;
        assert!(
            eventually(Duration::from_secs(5), || async {
                support::server_count_where(&obs, "cycle", "wait_event_type = 'Lock'").await == 1
            })
            .await,
            "round {round}: B never blocked"
        );
        // A text new to the pool every round: it is prepared first (a round trip of its own)
        // on the shared connection, so the bound must hold across that too.
        let select = format!("SELECT {round}");
        let started = Instant::now();
        let outcome = tokio::time::timeout(
            pool_timeout * 3 + Duration::from_secs(2),
            pool.query_one(select.as_str(), &[]),
        )
        .await;
        let took = started.elapsed();
        let result =
            outcome.unwrap_or_else(|_| panic!("round {round}: SELECT 1 hung for {took:?}"));
        match &result {
            Ok(_) => {}
            Err(Error::Timeout(t)) => {
                assert!(
                    t.to_string().starts_with("QueuePool limit of size 2"),
                    "{t}"
                );
            }
            Err(e) => panic!("round {round}: unexpected error {e}"),
        }
        assert!(
            took <= pool_timeout + Duration::from_millis(500),
            "round {round}: took {took:?}, DB_POOL_TIMEOUT is {pool_timeout:?}"
        );
        tx.rollback().await.unwrap();
        drop(a);
        let n = tokio::time::timeout(Duration::from_secs(5), b)
            .await
            .expect("B finished once the lock was released")
            .unwrap()
            .expect("B's update");
        assert_eq!(n, 1);
    }
    // Nothing is left behind: the pool answers at once.
    assert!(
        eventually(Duration::from_secs(5), || async {
            pool.status().checked_out == 0
        })
        .await,
        "{:?}",
        pool.status()
    );
    pool.query_one("SELECT 1", &[]).await.unwrap();
}

/// Session state from a statement on the pool never reaches another statement: `SET` runs on
/// a connection of its own, which is reset (`DISCARD ALL`) before anyone else uses it, while
/// pipelined statements keep seeing the default. A session advisory lock is released the same
/// way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_on_the_pool_never_leaks() {
    let pg = cluster();
    let obs = observer(&pg).await;
    let pool = pool(&pg, "session", 2, Duration::from_secs(10));
    let default: String = pool
        .query_one("SHOW search_path", &[])
        .await
        .unwrap()
        .get(0);
    let stop = Arc::new(AtomicBool::new(false));
    let leaked = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for _ in 0..12 {
        let (pool, stop, leaked, seen, default) = (
            pool.clone(),
            stop.clone(),
            leaked.clone(),
            seen.clone(),
            default.clone(),
        );
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let path: String = pool
                    .query_one("SHOW search_path", &[])
                    .await
                    .expect("SHOW")
                    .get(0);
                seen.fetch_add(1, Ordering::Relaxed);
                if path != default {
                    leaked.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Each advisory lock is taken by a session of its own and must be gone before the next
    // one: a leaked lock makes the next pg_advisory_lock(42) wait for ever.
    let writes = async {
        for _ in 0..20 {
            pool.execute("SET search_path = leaked_schema", &[])
                .await
                .unwrap();
            pool.query_one("SELECT pg_advisory_lock(42)", &[])
                .await
                .unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(20), writes)
        .await
        .expect("a session advisory lock leaked to the next statement on the pool");
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    assert!(seen.load(Ordering::Relaxed) > 100);
    assert_eq!(
        leaked.load(Ordering::Relaxed),
        0,
        "a statement saw another statement's SET"
    );
    assert!(pool.status().pipelined_statements > 0);
    assert!(
        eventually(Duration::from_secs(5), || async {
            obs.query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
                == 0
        })
        .await,
        "a session advisory lock outlived its statement"
    );
    // Reset, not closed: the connections were kept.
    assert_eq!(pool.status().connections_created, 2, "{:?}", pool.status());
}

/// With `DB_POOL_RESET_ON_RETURN=none` nothing is sent on return, so a connection that took
/// session state is closed instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_with_reset_none_closes_the_connection() {
    let pg = cluster();
    let pool = Pool::new(Settings {
        pool_size: 1,
        max_overflow: Some(0),
        reset_on_return: ResetOnReturn::None,
        ..settings(&pg, "session-none")
    })
    .unwrap();
    pool.execute("SET search_path = leaked_schema", &[])
        .await
        .unwrap();
    let path: String = pool
        .query_one("SHOW search_path", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(path, "leaked_schema");
    assert_eq!(pool.status().connections_closed.reset_failed, 1);
}

/// A pre-ping that gets no answer in time closes that connection only: the pool is not
/// invalidated, and the other idle connection is still used once the network is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_timeout_closes_only_its_connection() {
    let pg = cluster();
    let proxy = Proxy::start(cluster_addr(&pg)).await;
    let pool = Pool::new(Settings {
        pool_size: 2,
        max_overflow: Some(0),
        pre_ping_window: Duration::ZERO,
        connect_timeout: Duration::from_millis(300),
        pool_timeout: Duration::from_secs(1),
        ..settings_via(&pg, &proxy, "ping")
    })
    .unwrap();
    assert_eq!(pool.warm_up().await.unwrap(), 2);
    proxy.blackhole();
    let err = pool.get().await.expect_err("nothing answers");
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    let status = pool.status();
    assert_eq!(status.invalidations, 0, "{status:?}");
    assert_eq!(status.connections_closed.invalidated, 0, "{status:?}");
    assert!(status.connections_closed.ping_failed >= 1, "{status:?}");
    proxy.resume();
    let conn = pool
        .get()
        .await
        .expect("the other connection answers again");
    conn.query_one("SELECT 1", &[]).await.unwrap();
}

/// Settings built in code that the environment could never give: timeouts of `Duration::MAX`
/// are capped and work; sizes past PostgreSQL's limit are refused with a typed error naming the
/// variable, never a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_built_in_code_cannot_panic_the_pool() {
    let pg = cluster();
    let pool = Pool::new(Settings {
        pool_timeout: Duration::MAX,
        connect_timeout: Duration::MAX,
        recycle: Some(Duration::MAX),
        pre_ping_window: Duration::MAX,
        slow_query_threshold: Duration::MAX,
        ..settings(&pg, "huge")
    })
    .expect("huge durations are capped");
    pool.query_one("SELECT 1", &[]).await.unwrap();
    pool.get()
        .await
        .unwrap()
        .query_one("SELECT 1", &[])
        .await
        .unwrap();
    for (size, overflow, variable) in [
        (usize::MAX, Some(0), "DB_POOL_SIZE"),
        (0, Some(0), "DB_POOL_SIZE"),
        (5, Some(usize::MAX), "DB_MAX_OVERFLOW"),
    ] {
        let err = Pool::new(Settings {
            pool_size: size,
            max_overflow: overflow,
            ..settings(&pg, "huge")
        })
        .expect_err("refused");
        match err {
            Error::Settings(SettingsError::Invalid { variable: v, .. }) => assert_eq!(v, variable),
            other => panic!("not a settings error: {other:?}"),
        }
    }
    let err = Pool::new(Settings {
        connect_timeout: Duration::ZERO,
        ..settings(&pg, "huge")
    })
    .expect_err("a zero connect timeout is refused");
    assert!(err.to_string().contains("DB_CONNECT_TIMEOUT"), "{err}");
}

/// A Rust type with its own `ToSql` for the server's enum `mood` (sent as its label's text).
#[derive(Debug)]
struct Mood(&'static str);

impl tokio_postgres::types::ToSql for Mood {
    fn to_sql(
        &self,
        _: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(self.0.as_bytes());
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        ty.name() == "mood"
    }

    tokio_postgres::types::to_sql_checked!();
}

/// With the statement cache off (PgBouncer transaction mode), statements are unnamed: no
/// statement the server keeps by name between round trips, with parameters typed from their
/// Rust values, in one round trip. A parameter whose type cannot be named from its value is a
/// typed error outside a transaction (nothing sent) and works inside one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_cache_statements_are_unnamed() {
    let pg = cluster();
    let admin = make_table(&pg).await;
    admin
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('ok', 'happy'); CREATE TABLE m (id bigint, v mood)",
        )
        .await
        .unwrap();
    let pool = Pool::new(Settings {
        statement_cache: false,
        pool_size: 1,
        max_overflow: Some(0),
        ..settings(&pg, "unnamed")
    })
    .unwrap();
    let mut conn = pool.get().await.unwrap();
    // An i32 against an int column, a bigint column, &str, Option, arrays.
    assert_eq!(conn.query(SELECT_T, &[&1i32]).await.unwrap().len(), 1);
    let n: i64 = conn
        .query_one(
            "SELECT count(*) FROM t WHERE id = ANY($1) AND $2::text IS NOT NULL",
            &[&vec![1i64, 2], &Some("x")],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let changed = conn
        .execute("INSERT INTO m (id) VALUES ($1)", &[&7i32])
        .await
        .unwrap();
    assert_eq!(changed, 1);
    assert!(conn
        .query_opt("SELECT 1 FROM t WHERE id = $1", &[&99i64])
        .await
        .unwrap()
        .is_none());
    // Nothing prepared by name on the server, while the connection is still checked out.
    let named: i64 = conn
        .query_one("SELECT count(*) FROM pg_prepared_statements", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(named, 0, "no named statement with the cache off");
    // A custom type: a typed error naming the parameter, and the connection still works.
    let err = conn
        .execute("INSERT INTO m VALUES ($1, $2)", &[&1i64, &Mood("ok")])
        .await
        .unwrap_err();
    match &err {
        Error::ParameterType { index, rust_type } => {
            assert_eq!(*index, 2);
            assert!(rust_type.contains("Mood"), "{rust_type}");
        }
        other => panic!("expected a parameter type error, got {other:?}"),
    }
    assert!(err.to_string().contains("$2"), "{err}");
    // Inside a transaction (one server connection even behind PgBouncer) it is prepared there.
    let tx = conn.transaction().await.unwrap();
    tx.execute("INSERT INTO m VALUES ($1, $2)", &[&2i64, &Mood("happy")])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let moods: i64 = conn
        .query_one("SELECT count(*) FROM m WHERE v = 'happy'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(moods, 1);
    // Text goes untyped, in text format: the server reads it as the type the statement needs
    // (an enum, citext), as with a server-side prepare.
    let moods: i64 = conn
        .query_one("SELECT count(*) FROM m WHERE v = $1", &[&"happy"])
        .await
        .unwrap()
        .get(0);
    assert_eq!(moods, 1, "text compared with an enum column");
    admin
        .batch_execute(
            "CREATE EXTENSION IF NOT EXISTS citext; CREATE TABLE c (v citext); \
             INSERT INTO c VALUES ('Hello')",
        )
        .await
        .unwrap();
    let found: i64 = conn
        .query_one("SELECT count(*) FROM c WHERE v = $1", &[&"hello"])
        .await
        .unwrap()
        .get(0);
    assert_eq!(found, 1, "citext compares without case, as the column says");
    let echoed: String = conn.query_one("SELECT $1", &[&"x"]).await.unwrap().get(0);
    assert_eq!(echoed, "x");
    // A value two server types would read differently is not guessed at.
    let err = conn
        .query_one("SELECT $1::timestamp", &[&std::time::SystemTime::now()])
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::ParameterType { index: 1, .. }),
        "{err:?}"
    );
    // The transaction's own statement was closed with it. What is left is tokio-postgres'
    // cache of type lookups for `mood` (statements on pg_type and pg_enum it names and keeps
    // per client): custom types need session mode behind PgBouncer (README).
    let named: Vec<String> = conn
        .query("SELECT statement FROM pg_prepared_statements", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        !named.is_empty()
            && named
                .iter()
                .all(|n| n.contains("pg_catalog.pg_type") || n.contains("pg_catalog.pg_enum")),
        "only tokio-postgres' type lookups stay: {named:?}"
    );
}
