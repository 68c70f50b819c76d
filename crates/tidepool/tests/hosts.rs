//! Beyond one server: a `DATABASE_URL` naming several hosts, the libpq way
//! (`postgresql://u:p@h1:p1,h2:p2/db?target_session_attrs=..&load_balance_hosts=..`, or
//! `?host=a,b&port=1,2`), against real primaries and their streaming standbys.
//!
//! Which server a connection lands on for each `target_session_attrs` (libpq's definitions: a
//! primary with `default_transaction_read_only=on` is read-only but still a primary), random
//! load balancing, a down host passed over, and failover: a pool that follows the primary
//! (`read-write`) replaces its connections on `25006` or a failed connect, its retry policy
//! retries `25006`, and writes under load survive the primary's crash and its standby's promotion
//! with every acknowledged write on the promoted server.
//!
//! Where a connection landed is the server's own answer (`inet_server_port()`,
//! `pg_is_in_recovery()`, `pg_backend_pid()`). Synchronisation is by polling with deadlines.

mod support;

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{blocking, cluster, cluster_with, eventually, observer, server_pids, timeout_cause};
use tidepool::{DatabaseUrl, Error, Pool, RetryPolicy, SessionAttrs, Settings};
use tidepool_cluster::{Cluster, ShutdownMode};

/// Deadline of every poll: long enough never to be the reason a healthy run fails.
const WITHIN: Duration = Duration::from_secs(30);

/// `postgresql://USER:PASSWORD@127.0.0.1:P1,127.0.0.1:P2,.../postgres?QUERY` with `cluster`'s
/// credentials (shared by every cluster of the process) and one host per port.
fn url(cluster: &Cluster, ports: &[u16], query: &str) -> String {
    let hosts: Vec<String> = ports
        .iter()
        .map(|p| format!("{}:{p}", cluster.host()))
        .collect();
    format!(
        "postgresql://{}:{}@{}/{}?{query}",
        cluster.user(),
        cluster.password(),
        hosts.join(","),
        cluster.dbname()
    )
}

/// A port on 127.0.0.1 that nobody listens on (bound a moment ago and released): connecting
/// to it is refused at once.
fn down_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Settings over `url` with `application_name = app` and the given sizes and timeouts.
fn settings_for(
    url: &str,
    app: &str,
    pool_size: usize,
    pool_timeout: Duration,
    connect_timeout: Duration,
) -> Settings {
    Settings {
        database_url: Some(DatabaseUrl::parse(url).expect("the URL parses")),
        pool_size,
        max_overflow: Some(0),
        pool_timeout,
        connect_timeout,
        application_name: Some(app.into()),
        ..Settings::default()
    }
}

/// A one-connection pool over `url` (5 s to check out, 2 s per host to connect).
fn small_pool(url: &str, app: &str) -> Pool {
    Pool::new(settings_for(
        url,
        app,
        1,
        Duration::from_secs(5),
        Duration::from_secs(2),
    ))
    .expect("pool builds")
}

/// Where a checkout of `pool` lands: the server's port and whether it is in recovery.
async fn landing(pool: &Pool) -> Result<(u16, bool), Error> {
    let conn = pool.get().await?;
    let row = conn
        .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
        .await?;
    let port: i32 = row.get(0);
    Ok((u16::try_from(port).expect("a port"), row.get(1)))
}

/// A primary and its streaming standby.
fn primary_and_standby() -> (Cluster, Cluster) {
    let primary = cluster();
    let standby = primary
        .standby()
        .unwrap_or_else(|e| panic!("the standby starts: {e}"));
    (primary, standby)
}

/// Each `target_session_attrs` value with a primary and its standby listed in both orders
/// lands where libpq would: `any` on the first host, `read-write` and `primary` on the
/// primary, `read-only`, `standby` and `prefer-standby` on the standby, whichever comes first.
#[tokio::test]
async fn session_attrs_pick_the_right_server_in_either_order() {
    let (primary, standby) = primary_and_standby();
    let (p, s) = (primary.port(), standby.port());
    let all = [
        SessionAttrs::Any,
        SessionAttrs::ReadWrite,
        SessionAttrs::ReadOnly,
        SessionAttrs::Primary,
        SessionAttrs::Standby,
        SessionAttrs::PreferStandby,
    ];
    let mut wrong = Vec::new();
    for attrs in all {
        for order in [[p, s], [s, p]] {
            let want = match attrs {
                SessionAttrs::Any => order[0],
                SessionAttrs::ReadWrite | SessionAttrs::Primary => p,
                _ => s,
            };
            let text = url(
                &primary,
                &order,
                &format!("target_session_attrs={}", attrs.as_str()),
            );
            let parsed = DatabaseUrl::parse(&text).expect("the URL parses");
            assert_eq!(parsed.session_attrs(), attrs);
            let pool = small_pool(&text, &format!("attrs-{}", attrs.as_str()));
            let got = landing(&pool).await;
            let ok =
                matches!(&got, Ok((port, recovery)) if *port == want && *recovery == (want == s));
            if !ok {
                wrong.push(format!(
                    "{} with hosts {order:?}: wanted port {want}, got {got:?}",
                    attrs.as_str()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "primary {p}, standby {s}:\n{}",
        wrong.join("\n")
    );
}

/// `prefer-standby` takes a primary when no standby is listed: the primary listed twice, the
/// primary after a down host, the primary before one.
#[tokio::test]
async fn prefer_standby_falls_back_to_a_primary() {
    let primary = cluster();
    let p = primary.port();
    for order in [[p, p], [down_port(), p], [p, down_port()]] {
        let pool = small_pool(
            &url(&primary, &order, "target_session_attrs=prefer-standby"),
            "prefer-standby",
        );
        let got = landing(&pool).await;
        assert!(
            matches!(got, Ok((port, false)) if port == p),
            "hosts {order:?}: wanted the primary {p}, got {got:?}"
        );
    }
}

/// `standby` with only primaries listed finds none: the checkout fails (after
/// `DB_POOL_TIMEOUT`, as the role check is transient: a standby may yet appear) with an error
/// whose text names `target_session_attrs`.
#[tokio::test]
async fn standby_without_a_standby_fails_naming_target_session_attrs() {
    let primary = cluster();
    let p = primary.port();
    let pool = Pool::new(settings_for(
        &url(&primary, &[p, p], "target_session_attrs=standby"),
        "standby-none",
        1,
        Duration::from_millis(1500),
        Duration::from_millis(500),
    ))
    .expect("pool builds");
    let started = Instant::now();
    let err = pool.get().await.expect_err("no server is a standby");
    let elapsed = started.elapsed();
    let text = err.to_string();
    assert!(
        text.contains("target_session_attrs"),
        "the error names the setting: {text}"
    );
    assert!(
        timeout_cause(&err).contains("not a standby"),
        "the cause says why the server was passed over: {text}"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "gave up after DB_POOL_TIMEOUT (1.5 s), took {elapsed:?}"
    );
    assert_eq!(pool.status().total_connections, 0);
}

/// libpq's difference between `read-only` and `primary`: a primary whose
/// `default_transaction_read_only` is on counts as read-only (and is not read-write), yet it is
/// still a primary (not a standby).
#[tokio::test]
async fn read_only_primary_is_read_only_and_still_a_primary() {
    let ro = cluster_with(&[("default_transaction_read_only", "on")]);
    let rw = cluster();
    let (r, w) = (ro.port(), rw.port());
    for (order, attrs, want) in [
        ([w, r], "read-only", r),
        ([r, w], "read-only", r),
        ([r, w], "read-write", w),
        ([w, r], "read-write", w),
        ([r, w], "primary", r),
        ([w, r], "primary", w),
        ([r, w], "any", r),
    ] {
        let pool = small_pool(
            &url(&ro, &order, &format!("target_session_attrs={attrs}")),
            &format!("ro-primary-{attrs}"),
        );
        let got = landing(&pool).await;
        assert!(
            matches!(got, Ok((port, false)) if port == want),
            "{attrs} with hosts {order:?} (read-only primary {r}, read-write primary {w}): \
             wanted {want}, got {got:?}"
        );
    }
    // Read-only is not a standby: with only primaries listed, `standby` finds nothing.
    let pool = Pool::new(settings_for(
        &url(&ro, &[r, w], "target_session_attrs=standby"),
        "ro-primary-standby",
        1,
        Duration::from_millis(1500),
        Duration::from_millis(500),
    ))
    .expect("pool builds");
    let err = pool
        .get()
        .await
        .expect_err("a read-only primary is no standby");
    assert!(err.to_string().contains("target_session_attrs"), "{err}");
}

/// `load_balance_hosts=random` spreads fresh connections over the hosts (40 connections, each
/// opened anew, reach both servers); with `disable` every one goes to the first host.
#[tokio::test]
async fn load_balance_random_reaches_every_host_and_disable_only_the_first() {
    const CONNECTIONS: u64 = 40;
    let (primary, standby) = primary_and_standby();
    let (p, s) = (primary.port(), standby.port());
    for (balance, spread) in [("random", true), ("disable", false)] {
        let pool = small_pool(
            &url(&primary, &[p, s], &format!("load_balance_hosts={balance}")),
            &format!("balance-{balance}"),
        );
        let mut seen = HashSet::new();
        for _ in 0..CONNECTIONS {
            let (port, _) = landing(&pool).await.expect("connects");
            seen.insert(port);
            pool.dispose();
        }
        assert_eq!(
            pool.status().connections_created,
            CONNECTIONS,
            "{balance}: each sample was a fresh connection"
        );
        let want: HashSet<u16> = if spread {
            [p, s].into_iter().collect()
        } else {
            [p].into_iter().collect()
        };
        assert_eq!(seen, want, "load_balance_hosts={balance} (hosts {p},{s})");
    }
}

/// A host nobody listens on, listed first, is passed over: the connection lands on the second
/// host, in both spellings of a host list (`h1:p1,h2:p2` and `?host=a,b&port=1,2`).
#[tokio::test]
async fn down_first_host_is_skipped() {
    let primary = cluster();
    let p = primary.port();
    let down = down_port();
    let query_form = format!(
        "postgresql://{}:{}@/{}?host={h},{h}&port={down},{p}",
        primary.user(),
        primary.password(),
        primary.dbname(),
        h = primary.host()
    );
    for text in [url(&primary, &[down, p], ""), query_form] {
        let pool = small_pool(&text, "down-first");
        let started = Instant::now();
        let got = landing(&pool).await;
        assert!(
            matches!(got, Ok((port, false)) if port == p),
            "hosts {down} (down), {p}: got {got:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a refused host costs no timeout: took {:?}",
            started.elapsed()
        );
    }
}

/// The host walk passes over a host that failed, whatever the timeouts: with `DB_POOL_TIMEOUT`
/// (1 s) shorter than `DB_CONNECT_TIMEOUT` (5 s), a down first host is still skipped, and so is
/// a standby listed before the primary under `read-write`. Neither failure is a timeout, so
/// the checkout's deadline is no reason to stop the walk.
#[tokio::test]
async fn host_walk_continues_when_pool_timeout_is_shorter_than_connect_timeout() {
    let (primary, standby) = primary_and_standby();
    let (p, s) = (primary.port(), standby.port());
    let mut wrong = Vec::new();
    for (order, query) in [
        ([down_port(), p], ""),
        ([s, p], "target_session_attrs=read-write"),
    ] {
        let pool = Pool::new(settings_for(
            &url(&primary, &order, query),
            "short-pool-timeout",
            1,
            Duration::from_secs(1),
            Duration::from_secs(5),
        ))
        .expect("pool builds");
        let got = landing(&pool).await;
        if !matches!(&got, Ok((port, false)) if *port == p) {
            wrong.push(format!(
                "hosts {order:?} {query:?}: wanted {p}, got {got:?}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Turns `cluster` read-only for new transactions of every session, as an operator fencing a
/// primary does (`ALTER SYSTEM` + reload), or back; returns once a new session sees it (the
/// postmaster has then signalled every backend, which applies it before its next statement).
async fn fence(cluster: &Cluster, on: bool) {
    let obs = observer(cluster).await;
    let sql = if on {
        "ALTER SYSTEM SET default_transaction_read_only = on"
    } else {
        "ALTER SYSTEM RESET default_transaction_read_only"
    };
    obs.batch_execute(sql).await.expect("ALTER SYSTEM");
    obs.batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    let want = if on { "on" } else { "off" };
    assert!(
        eventually(WITHIN, || async {
            let fresh = observer(cluster).await;
            let row = fresh
                .query_one("SHOW default_transaction_read_only", &[])
                .await
                .expect("SHOW");
            row.get::<_, String>(0) == want
        })
        .await,
        "default_transaction_read_only never became {want}"
    );
}

/// A pool that follows the primary (`read-write`) whose server turns read-only under it (here
/// fenced with `default_transaction_read_only`, as a demoted server would refuse writes):
/// the refused write (`25006`) makes the pool ask the server at return, and the answer
/// replaces every connection: the invalidation is counted, the connection is closed on the
/// server, no new one goes to the read-only server, and once it takes writes again the next
/// checkout is a fresh backend that writes.
#[tokio::test]
async fn a_primary_turned_read_only_invalidates_a_read_write_pool() {
    let (primary, standby) = primary_and_standby();
    let (p, s) = (primary.port(), standby.port());
    let app = "rw-invalidate";
    let pool = Pool::new(settings_for(
        &url(&primary, &[p, s], "target_session_attrs=read-write"),
        app,
        2,
        Duration::from_secs(2),
        Duration::from_secs(2),
    ))
    .expect("pool builds");
    let obs = observer(&primary).await;

    let conn = pool.get().await.expect("checks out");
    let first: i32 = conn
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    fence(&primary, true).await;
    let err = conn
        .batch_execute("CREATE TABLE refused (id int)")
        .await
        .expect_err("a fenced server refuses writes");
    assert_eq!(err.code(), Some("25006"), "{err}");
    drop(conn);
    assert!(
        eventually(WITHIN, || async { pool.status().invalidations == 1 }).await,
        "the read-only server invalidates the pool: {:?}",
        pool.status()
    );
    assert!(
        eventually(WITHIN, || async {
            !server_pids(&obs, app).await.contains(&first)
        })
        .await,
        "the refused connection is closed on the server"
    );
    // Neither server takes writes now: no connection is opened on either.
    let err = pool.get().await.expect_err("no server takes writes");
    assert!(
        timeout_cause(&err).contains("read-only"),
        "{}",
        timeout_cause(&err)
    );

    fence(&primary, false).await;
    let conn = pool.get().await.expect("checks out again");
    let row = conn
        .query_one("SELECT pg_backend_pid(), inet_server_port()", &[])
        .await
        .expect("row");
    let (second, port): (i32, i32) = (row.get(0), row.get(1));
    assert_ne!(second, first, "a fresh backend");
    assert_eq!(i64::from(port), i64::from(p), "on the primary again");
    conn.batch_execute("CREATE TABLE accepted (id int)")
        .await
        .expect("the fresh connection writes");
}

/// A `25006` from the caller's own read-only session or transaction (`SET
/// default_transaction_read_only`, `BEGIN READ ONLY`) is an ordinary statement error, on a pool
/// that follows the primary as on any other: nothing is invalidated and the same connection
/// comes back.
#[tokio::test]
async fn the_callers_own_read_only_refusal_keeps_the_connection() {
    let (primary, standby) = primary_and_standby();
    let (p, s) = (primary.port(), standby.port());
    for query in ["target_session_attrs=read-write", ""] {
        let pool = small_pool(&url(&primary, &[p, s], query), "own-read-only");
        let mut conn = pool.get().await.expect("checks out");
        let first: i32 = conn
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pid")
            .get(0);
        let tx = conn
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .expect("BEGIN READ ONLY");
        let err = tx
            .batch_execute("CREATE TABLE refused (id int)")
            .await
            .expect_err("a read-only transaction refuses writes");
        assert_eq!(err.code(), Some("25006"), "{err}");
        drop(tx);
        conn.batch_execute("SET default_transaction_read_only = on")
            .await
            .expect("SET runs");
        let err = conn
            .batch_execute("CREATE TABLE refused (id int)")
            .await
            .expect_err("a read-only session refuses writes");
        assert_eq!(err.code(), Some("25006"), "{err}");
        drop(conn);
        let conn = pool.get().await.expect("checks out again");
        let second: i32 = conn
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pid")
            .get(0);
        assert_eq!(second, first, "{query:?}: the same connection");
        assert_eq!(pool.status().invalidations, 0, "{query:?}");
    }
}

/// `run_transaction` on a pool that follows the primary: a `READ ONLY` transaction of the
/// caller's own is not retried (its `25006` comes back at once); a server that turned
/// read-only is (the attempts wait it out, here until the primary is unfenced), and the write
/// lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_policy_retries_read_only_refusal_only_when_the_server_turned_read_only() {
    let (primary, standby) = primary_and_standby();
    let primary = Arc::new(primary);
    let (p, s) = (primary.port(), standby.port());
    let obs = observer(&primary).await;
    obs.batch_execute("CREATE TABLE t (id bigint PRIMARY KEY)")
        .await
        .expect("table");
    let pool = small_pool(
        &url(&primary, &[p, s], "target_session_attrs=read-write"),
        "retry-25006",
    );
    let policy = RetryPolicy::new()
        .max_attempts(50)
        .initial_wait(Duration::from_millis(50))
        .max_wait(Duration::from_millis(200));

    // The caller's own read-only transaction: one attempt.
    let attempts = AtomicUsize::new(0);
    let err = pool
        .run_transaction(&policy, async |tx| {
            attempts.fetch_add(1, Ordering::Relaxed);
            tx.batch_execute("SET TRANSACTION READ ONLY").await?;
            tx.execute("INSERT INTO t (id) VALUES (1)", &[]).await?;
            Ok(())
        })
        .await
        .expect_err("the caller's read-only transaction is not retried");
    assert_eq!(err.code(), Some("25006"), "{err}");
    assert_eq!(attempts.load(Ordering::Relaxed), 1);
    assert_eq!(policy.retries(), 0);

    // The server turned read-only while the pool holds a connection to it; it takes writes
    // again once the first retry was made.
    fence(&primary, true).await;
    let unfence = {
        let (primary, policy) = (primary.clone(), policy.clone());
        tokio::spawn(async move {
            assert!(
                eventually(WITHIN, || async { policy.retries() >= 1 }).await,
                "no retry"
            );
            fence(&primary, false).await;
        })
    };
    let attempts = AtomicUsize::new(0);
    pool.run_transaction(&policy, async |tx| {
        attempts.fetch_add(1, Ordering::Relaxed);
        tx.execute("INSERT INTO t (id) VALUES (2)", &[]).await?;
        Ok(())
    })
    .await
    .expect("the write waits out the read-only server");
    unfence.await.expect("unfenced");
    assert!(policy.retries() >= 1);
    assert!(pool.status().invalidations >= 1, "{:?}", pool.status());
    let present: i64 = obs
        .query_one("SELECT count(*) FROM t WHERE id = 2", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(present, 1);
}

/// One write as its worker saw it.
struct Write {
    id: i64,
    started: Instant,
    ended: Instant,
    error: Option<Error>,
}

/// Failover under a write load: 8 tasks insert increasing ids through `run_transaction` on a
/// `read-write` pool over `primary,standby`, with synchronous replication on; the primary is
/// stopped in immediate mode (a crash) mid-load and the standby promoted. No write fails, and
/// every acknowledged id is on the promoted server. Prints the longest single write (the
/// pause a caller saw).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_survive_failover_to_the_promoted_standby() {
    const WORKERS: usize = 8;
    let (primary, standby) = primary_and_standby();
    let (primary, standby) = (Arc::new(primary), Arc::new(standby));
    let (p, s) = (primary.port(), standby.port());

    // Synchronous replication, turned on now the standby streams (before, commits would wait
    // for a standby that is not there; the template has synchronous_commit off).
    let obs = observer(&primary).await;
    for sql in [
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
        "ALTER SYSTEM SET synchronous_commit = on",
        "SELECT pg_reload_conf()",
    ] {
        obs.batch_execute(sql).await.expect(sql);
    }
    assert!(
        eventually(WITHIN, || async {
            let row = obs
                .query_one(
                    "SELECT current_setting('synchronous_commit'), \
                     (SELECT string_agg(sync_state, ',') FROM pg_stat_replication)",
                    &[],
                )
                .await
                .expect("settings readable");
            row.get::<_, String>(0) == "on"
                && row.get::<_, Option<String>>(1).as_deref() == Some("sync")
        })
        .await,
        "the standby became synchronous"
    );
    obs.batch_execute("CREATE TABLE t (id bigint PRIMARY KEY)")
        .await
        .expect("table");
    drop(obs);

    let pool = Pool::new(settings_for(
        &url(&primary, &[p, s], "target_session_attrs=read-write"),
        "failover",
        4,
        Duration::from_secs(10),
        Duration::from_secs(2),
    ))
    .expect("pool builds");
    // Inserts with ON CONFLICT DO NOTHING are idempotent: a commit whose outcome the crash
    // left unknown is safe to repeat (without this, such commits are returned as
    // Error::CommitOutcomeUnknown; see the report).
    let policy = RetryPolicy::new()
        .max_attempts(10)
        .initial_wait(Duration::from_millis(100))
        .max_wait(Duration::from_secs(1))
        .idempotent(true);

    let next_id = Arc::new(AtomicI64::new(1));
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (pool, policy) = (pool.clone(), policy.clone());
            let (next_id, acked, stop) = (next_id.clone(), acked.clone(), stop.clone());
            tokio::spawn(async move {
                let mut writes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    let started = Instant::now();
                    let result = pool
                        .run_transaction(&policy, async move |tx| {
                            tx.execute(
                                "INSERT INTO t (id) VALUES ($1) ON CONFLICT DO NOTHING",
                                &[&id],
                            )
                            .await?;
                            Ok(())
                        })
                        .await;
                    if result.is_ok() {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    writes.push(Write {
                        id,
                        started,
                        ended: Instant::now(),
                        error: result.err(),
                    });
                }
                writes
            })
        })
        .collect();
    let progress = |n: u64| {
        let acked = acked.clone();
        async move {
            let target = acked.load(Ordering::Relaxed) + n;
            eventually(WITHIN, || async { acked.load(Ordering::Relaxed) >= target }).await
        }
    };

    assert!(progress(200).await, "writes flow before the failover");
    let fault = Instant::now();
    {
        let primary = primary.clone();
        blocking(move || primary.stop(ShutdownMode::Immediate))
            .await
            .expect("the primary stops");
    }
    let stopped = fault.elapsed();
    {
        let standby = standby.clone();
        blocking(move || standby.promote())
            .await
            .expect("the standby is promoted");
    }
    let promoted_at = Instant::now();
    let promoted = promoted_at - fault;
    let acked_at_promotion = acked.load(Ordering::Relaxed);
    let resumed = progress(200).await;
    stop.store(true, Ordering::Relaxed);
    let mut writes = Vec::new();
    for w in workers {
        writes.extend(w.await.expect("worker panicked"));
    }
    assert!(resumed, "writes resume on the promoted standby");

    let failed: Vec<&Write> = writes.iter().filter(|w| w.error.is_some()).collect();
    let unknown = failed
        .iter()
        .filter(|w| matches!(w.error, Some(Error::CommitOutcomeUnknown(_))))
        .count();
    let longest = writes
        .iter()
        .map(|w| w.ended - w.started)
        .max()
        .unwrap_or_default();
    let on_promoted = writes
        .iter()
        .filter(|w| w.error.is_none() && w.started > promoted_at)
        .count();
    eprintln!(
        "FAILOVER: {} writes, {} failed ({unknown} commit outcome unknown), {} retries, \
         {acked_at_promotion} acknowledged before the promotion completed, {on_promoted} started \
         and acknowledged after it; \
         primary stopped after {stopped:?}, standby promoted after {promoted:?}; \
         longest write pause {:.0} ms; invalidations {}",
        writes.len(),
        failed.len(),
        policy.retries(),
        longest.as_secs_f64() * 1000.0,
        pool.status().invalidations
    );
    let shown: Vec<String> = failed
        .iter()
        .take(5)
        .map(|w| format!("id {}: {}", w.id, w.error.as_ref().unwrap()))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} writes failed ({unknown} with the commit outcome unknown), e.g.:\n{}",
        failed.len(),
        writes.len(),
        shown.join("\n")
    );
    assert!(
        pool.status().invalidations >= 1,
        "the failover invalidated the pool's connections"
    );

    // Every acknowledged write is on the promoted server.
    let promoted_obs = observer(&standby).await;
    let present: HashSet<i64> = promoted_obs
        .query("SELECT id FROM t", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missing: Vec<i64> = writes
        .iter()
        .filter(|w| w.error.is_none() && !present.contains(&w.id))
        .map(|w| w.id)
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged ids missing on the promoted server, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    // The pool now writes to the promoted server.
    let got = landing(&pool).await;
    assert!(
        matches!(got, Ok((port, false)) if port == s),
        "the pool is on the promoted standby {s}: {got:?}"
    );
}
