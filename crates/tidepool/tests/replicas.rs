//! Read replicas (`DATABASE_REPLICA_URL`, [`Pool::read`]) against real PostgreSQL: a primary and
//! one or two hot standbys of it (`Cluster::standby`, streaming replication on loopback). Where
//! reads land is read back from the server that answered them (`pg_is_in_recovery()`,
//! `inet_server_port()`), the replicas' states from `status()` and `/health/database`'s JSON.
//! Faults are real: a standby stopped in immediate mode under a read load and started again,
//! WAL replay paused on a standby while the primary writes. Synchronisation is by polling with
//! deadlines (`eventually`); no assertion depends on how fast the machine is.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{blocking, cluster, eventually, observer, settings};
use tidepool::{DatabaseUrl, Error, Pool, ReplicaState, ReplicaStatus, RetryPolicy, Settings};
use tidepool_cluster::{Cluster, ShutdownMode};

/// Deadline of every poll: long enough never to be the reason a healthy run fails.
const WITHIN: Duration = Duration::from_secs(30);
/// Where a read ran: whether that server is in recovery (a standby) and its port.
const WHERE: &str = "SELECT pg_is_in_recovery(), inet_server_port()";

// ---------------------------------------------------------------------------------------------
// Support

/// A standby of `primary`, streaming; fails the test with the cluster crate's message.
fn standby(primary: &Cluster) -> Cluster {
    primary
        .standby()
        .unwrap_or_else(|e| panic!("these tests need a streaming standby: {e}"))
}

/// `DATABASE_REPLICA_URL` naming `replicas`, one host each, as a user writes it:
/// `postgresql://USER:PASSWORD@127.0.0.1:P1,127.0.0.1:P2/DB`.
fn replica_url(replicas: &[&Cluster]) -> DatabaseUrl {
    let first = replicas[0];
    let hosts: Vec<String> = replicas
        .iter()
        .map(|r| format!("{}:{}", r.host(), r.port()))
        .collect();
    let url = format!(
        "postgresql://{}:{}@{}/{}",
        first.user(),
        first.password(),
        hosts.join(","),
        first.dbname()
    );
    DatabaseUrl::parse(&url).expect("replica URL parses")
}

/// Settings for a pool on `primary` reading from `replicas`.
fn read_settings(primary: &Cluster, replicas: &[&Cluster], app: &str) -> Settings {
    Settings {
        replica_url: Some(replica_url(replicas)),
        ..settings(primary, app)
    }
}

/// The `host` a replica has in `status()`.
fn host_of(replica: &Cluster) -> String {
    format!("{}:{}", replica.host(), replica.port())
}

/// `replica`'s entry in `pool.status().replicas`; fails the test when it is missing.
fn replica_status(pool: &Pool, replica: &Cluster) -> ReplicaStatus {
    let host = host_of(replica);
    let status = pool.status();
    status
        .replicas
        .iter()
        .find(|r| r.host == host)
        .cloned()
        .unwrap_or_else(|| panic!("{host} is not in status().replicas: {:?}", status.replicas))
}

fn state_of(pool: &Pool, replica: &Cluster) -> ReplicaState {
    replica_status(pool, replica).state
}

/// Polls until `replica` is in `state`, reading through `pool.read()` and calling `refresh()`
/// meanwhile (measurements and probes are driven by reads); returns whether it got there.
async fn reaches(pool: &Pool, replica: &Cluster, state: ReplicaState) -> bool {
    eventually(WITHIN, || async {
        pool.read().refresh();
        let _ = pool.read().query_one("SELECT 1", &[]).await;
        state_of(pool, replica) == state
    })
    .await
}

/// Where one read through `pool.read()` ran: (in recovery, port).
async fn read_where(pool: &Pool) -> (bool, i32) {
    let row = pool
        .read()
        .query_one(WHERE, &[])
        .await
        .expect("a read succeeds");
    (row.get(0), row.get(1))
}

/// `SHOW transaction_read_only` inside a transaction of `conn`, rolled back.
async fn read_only_in_transaction(conn: &mut tidepool::PooledConnection) -> String {
    let tx = conn.transaction().await.expect("transaction starts");
    let value: String = tx
        .query_one("SHOW transaction_read_only", &[])
        .await
        .expect("SHOW runs")
        .get(0);
    tx.rollback().await.expect("rollback");
    value
}

// ---------------------------------------------------------------------------------------------
// 1. Routing, read-only transactions, status and health

/// With one replica configured, `pool.read()` runs on the standby (`pg_is_in_recovery()` true,
/// its port) while the pool itself stays on the primary; a connection from `read().get()` runs
/// its transactions READ ONLY; `status().replicas` lists the replica by `host:port`, up, with
/// its lag measured and its own pool's figures sized by `replica_pool_size` /
/// `replica_max_overflow` (a checkout held through `read()` counts on the replica's pool, not
/// the primary's); a statement failing on the replica is returned as it is, leaving the replica
/// up; and `/health/database`'s JSON carries the same in a `replicas` array.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_land_on_the_replica_and_status_shows_it() {
    let primary = cluster();
    let replica = standby(&primary);
    let pool = Pool::new(Settings {
        replica_pool_size: Some(3),
        replica_max_overflow: Some(Some(1)),
        ..read_settings(&primary, &[&replica], "replica-routing")
    })
    .unwrap();

    let (recovery, port) = read_where(&pool).await;
    assert!(recovery, "a read through read() ran on the primary");
    assert_eq!(port, i32::from(replica.port()), "the read ran elsewhere");
    let row = pool.query_one(WHERE, &[]).await.unwrap();
    assert!(!row.get::<_, bool>(0), "the pool itself ran on a standby");
    assert_eq!(row.get::<_, i32>(1), i32::from(primary.port()));

    // A checkout through read(): on the replica, READ ONLY in transactions.
    let mut conn = pool.read().get().await.unwrap();
    let in_recovery: bool = conn
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery, "read().get() gave a connection to the primary");
    // (Always on for a hot standby; where it matters, on the primary, the tests without
    // replicas and with a replica down check it.)
    assert_eq!(read_only_in_transaction(&mut conn).await, "on");

    // `read().run(policy, f)`: the same, under a retry policy.
    let (recovery, read_only) = pool
        .read()
        .run(&RetryPolicy::default(), async |conn| {
            let tx = conn.transaction().await?;
            let row = tx
                .query_one(
                    "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')",
                    &[],
                )
                .await?;
            tx.rollback().await?;
            Ok((row.get::<_, bool>(0), row.get::<_, String>(1)))
        })
        .await
        .unwrap();
    assert!(recovery, "read().run() ran on the primary");
    assert_eq!(read_only, "on");

    // While it is held: counted on the replica's pool, not on the primary's.
    let status = pool.status();
    assert_eq!(status.replicas.len(), 1, "{:?}", status.replicas);
    assert_eq!(status.checked_out, 0, "{status:?}");
    let r = &status.replicas[0];
    assert_eq!(r.host, host_of(&replica));
    assert_eq!(r.state, ReplicaState::Up, "{r:?}");
    assert_eq!(r.reason, None, "{r:?}");
    assert_eq!(r.pool.pool_size, 3, "DB_REPLICA_POOL_SIZE: {r:?}");
    assert_eq!(r.pool.max_overflow, 1, "DB_REPLICA_MAX_OVERFLOW: {r:?}");
    assert_eq!(r.pool.checked_out, 1, "{r:?}");
    assert!(r.pool.connections_created >= 1, "{r:?}");
    assert!(
        r.pool.replicas.is_empty(),
        "a replica has no replicas: {r:?}"
    );
    drop(conn);

    // The first measurement (started by the first read) reports an idle standby as not behind.
    assert!(
        eventually(WITHIN, || async {
            replica_status(&pool, &replica).lag_seconds.is_some()
        })
        .await,
        "the replica's lag was never measured: {:?}",
        pool.status().replicas
    );
    let lag = replica_status(&pool, &replica).lag_seconds.unwrap();
    assert!(
        (0.0..10.0).contains(&lag),
        "an idle standby lags {lag} s (max lag 10 s)"
    );

    // A statement's own failure on the replica is the caller's: returned as it is, not run
    // again on the primary, and the replica stays up.
    let err = pool
        .read()
        .query_one(
            "SELECT 1 / (inet_server_port() - $1)",
            &[&i32::from(replica.port())],
        )
        .await
        .expect_err("division by zero on the replica succeeded");
    assert_eq!(err.code(), Some("22012"), "{err:?}");
    assert_eq!(state_of(&pool, &replica), ReplicaState::Up);

    // /health/database: the primary's figures, and the replicas.
    let health = tidepool::axum::check_database(&pool, Duration::from_secs(10)).await;
    assert!(health.is_healthy(), "{health:?}");
    let json = serde_json::to_value(&health).unwrap();
    assert_eq!(json["status"], "healthy", "{json}");
    assert!(json["checked_out"].is_u64(), "{json}");
    let replicas = json["replicas"]
        .as_array()
        .unwrap_or_else(|| panic!("no replicas array: {json}"));
    assert_eq!(replicas.len(), 1, "{json}");
    let r = &replicas[0];
    assert_eq!(r["host"], host_of(&replica).as_str(), "{json}");
    assert_eq!(r["state"], "up", "{json}");
    assert!(r["lag_seconds"].is_f64(), "{json}");
    assert!(r["reason"].is_null(), "{json}");
    assert_eq!(r["pool_size"], 3, "{json}");
    assert_eq!(r["max_overflow"], 1, "{json}");
    for key in ["checked_in", "checked_out", "total_connections", "overflow"] {
        assert!(r[key].is_u64() || r[key].is_i64(), "{key} missing: {json}");
    }
    assert_eq!(r["checked_out"], 0, "{json}");
    assert!(r.get("replicas").is_none(), "{json}");
}

/// Without `replica_url`, `pool.read()` runs on the primary (code written for replicas works
/// without them), and its connections' transactions are still READ ONLY: a write in one fails
/// with `25006`, while a transaction of `pool.get()` on the same connection afterwards is
/// read-write (the mode does not stick to the connection). Status
/// and health have no replicas (the JSON leaves the key out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replicas_reads_use_the_primary_read_only() {
    let primary = cluster();
    // One connection: the read-only one is the very connection `pool.get()` gets next.
    let pool = Pool::new(Settings {
        pool_size: 1,
        max_overflow: Some(0),
        ..settings(&primary, "no-replicas")
    })
    .unwrap();
    pool.execute("CREATE TABLE t (id int)", &[]).await.unwrap();

    let (recovery, port) = read_where(&pool).await;
    assert!(!recovery);
    assert_eq!(port, i32::from(primary.port()));

    let mut conn = pool.read().get().await.unwrap();
    assert_eq!(read_only_in_transaction(&mut conn).await, "on");
    let tx = conn.transaction().await.unwrap();
    let err = tx
        .execute("INSERT INTO t VALUES (1)", &[])
        .await
        .expect_err("a write in a read() transaction succeeded");
    assert_eq!(err.code(), Some("25006"), "{err:?}");
    drop(tx);
    drop(conn);

    let mut conn = pool.get().await.unwrap();
    assert_eq!(read_only_in_transaction(&mut conn).await, "off");
    let tx = conn.transaction().await.unwrap();
    tx.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
    tx.commit().await.unwrap();
    drop(conn);
    assert_eq!(pool.status().connections_created, 1, "{:?}", pool.status());

    assert!(pool.status().replicas.is_empty());
    let health = tidepool::axum::check_database(&pool, Duration::from_secs(10)).await;
    let json = serde_json::to_value(&health).unwrap();
    assert_eq!(json["status"], "healthy", "{json}");
    assert!(json.get("replicas").is_none(), "{json}");
}

// ---------------------------------------------------------------------------------------------
// 2. Two replicas share the reads

/// With two replicas in the URL, concurrent reads are spread over both (each answers some,
/// by `inet_server_port()`), none goes to the primary, and both show up in status. With one of
/// them stopped, every read goes to the other (still not to the primary), and status shows
/// which one is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_spread_over_two_replicas() {
    let primary = cluster();
    let (a, b) = (standby(&primary), standby(&primary));
    let pool = Pool::new(read_settings(&primary, &[&a, &b], "two-replicas")).unwrap();

    let reads: Vec<_> = (0..50)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let row = pool
                    .read()
                    .query_one("SELECT inet_server_port(), pg_sleep(0.01)::text", &[])
                    .await
                    .expect("a read succeeds");
                row.get::<_, i32>(0)
            })
        })
        .collect();
    let mut by_port: HashMap<i32, usize> = HashMap::new();
    for r in reads {
        *by_port.entry(r.await.unwrap()).or_default() += 1;
    }
    let (pa, pb) = (i32::from(a.port()), i32::from(b.port()));
    assert!(
        by_port.get(&pa).is_some_and(|&n| n > 0) && by_port.get(&pb).is_some_and(|&n| n > 0),
        "reads per port (replicas {pa}, {pb}): {by_port:?}"
    );
    assert_eq!(
        by_port[&pa] + by_port[&pb],
        50,
        "reads outside the replicas: {by_port:?}"
    );

    // One read at a time too: equally idle replicas take turns.
    let mut sequential = HashSet::new();
    for _ in 0..10 {
        sequential.insert(read_where(&pool).await.1);
    }
    assert_eq!(sequential, HashSet::from([pa, pb]), "sequential reads");

    let status = pool.status();
    let hosts: HashSet<&str> = status.replicas.iter().map(|r| r.host.as_str()).collect();
    assert_eq!(
        hosts,
        HashSet::from([host_of(&a).as_str(), host_of(&b).as_str()])
    );
    assert!(
        status.replicas.iter().all(|r| r.state == ReplicaState::Up),
        "{:?}",
        status.replicas
    );

    // One of them stopped: its reads move on to the other replica, not to the primary.
    let b = Arc::new(b);
    let stopped = b.clone();
    blocking(move || stopped.stop(ShutdownMode::Immediate))
        .await
        .unwrap();
    for i in 0..20 {
        let (recovery, port) = read_where(&pool).await;
        assert!(
            recovery && port == pa,
            "read {i} after the stop ran on port {port}"
        );
    }
    assert_eq!(state_of(&pool, &b), ReplicaState::Down);
    assert_eq!(state_of(&pool, &a), ReplicaState::Up);
}

// ---------------------------------------------------------------------------------------------
// 3. A replica stopped under load, and back

/// Readers looping through `pool.read()` while the standby is stopped (immediate) and started
/// again: no read fails (those the replica could not answer move on to the primary), the
/// replica shows `down` in status once stopped, with a reason, and reads meanwhile land on the
/// primary; once it runs again it comes back `up` while the reads continue, and reads land on it
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_stopped_under_read_load_costs_no_read() {
    let primary = cluster();
    let replica = Arc::new(standby(&primary));
    let pool = Pool::new(read_settings(&primary, &[&replica], "replica-stop")).unwrap();

    /// Every read: when it ended, and where it ran or how it failed.
    type Log = Arc<Mutex<Vec<(Instant, Result<(bool, i32), Error>)>>>;
    let log: Log = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..6)
        .map(|_| {
            let (pool, log, stop, done) = (pool.clone(), log.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let result = pool
                        .read()
                        .query_one("SELECT pg_is_in_recovery(), inet_server_port()", &[])
                        .await
                        .map(|row| (row.get(0), row.get(1)));
                    log.lock().unwrap().push((Instant::now(), result));
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let progress = |n: u64| {
        let target = done.load(Ordering::Relaxed) + n;
        let done = done.clone();
        async move { eventually(WITHIN, || async { done.load(Ordering::Relaxed) >= target }).await }
    };
    assert!(progress(100).await, "no reads before the stop");

    let r = replica.clone();
    blocking(move || r.stop(ShutdownMode::Immediate))
        .await
        .unwrap();
    let stopped = Instant::now();
    assert!(
        eventually(WITHIN, || async {
            state_of(&pool, &replica) == ReplicaState::Down
        })
        .await,
        "the stopped replica is not down: {:?}",
        pool.status().replicas
    );
    let down = replica_status(&pool, &replica);
    assert!(
        down.reason.as_deref().is_some_and(|r| !r.is_empty()),
        "{down:?}"
    );
    assert!(progress(100).await, "no reads while the replica is down");
    let restarting = Instant::now();

    let r = replica.clone();
    blocking(move || r.start_again()).await.unwrap();
    assert!(
        eventually(WITHIN, || async {
            state_of(&pool, &replica) == ReplicaState::Up
        })
        .await,
        "the restarted replica did not come back up: {:?}",
        pool.status().replicas
    );
    let up = Instant::now();
    let port = i32::from(replica.port());
    assert!(
        eventually(WITHIN, || async {
            log.lock()
                .unwrap()
                .iter()
                .any(|(t, r)| *t > up && matches!(r, Ok((true, p)) if *p == port))
        })
        .await,
        "no read landed on the replica after it came back"
    );
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.expect("reader panicked");
    }

    let log = log.lock().unwrap();
    let failed: Vec<_> = log.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    let on_replica_before = log
        .iter()
        .filter(|(t, r)| *t < stopped && matches!(r, Ok((true, _))))
        .count();
    let on_primary_while_down = log
        .iter()
        .filter(|(t, r)| *t > stopped && *t < restarting && matches!(r, Ok((false, _))))
        .count();
    eprintln!(
        "REPLICA stop: {} reads, {} failed; {on_replica_before} on the replica before the stop, \
         {on_primary_while_down} on the primary while it was down",
        log.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} reads failed, e.g. {:?}",
        failed.len(),
        log.len(),
        failed.first()
    );
    assert!(on_replica_before > 0, "no read ran on the replica at first");
    assert!(on_primary_while_down > 0, "no read ran on the primary");
}

// ---------------------------------------------------------------------------------------------
// 4. Lag

/// With `replica_max_lag` 1 s, a standby whose replay is paused (`pg_wal_replay_pause()`) while
/// the primary keeps committing becomes `lagging` (lag above 1 s, the reason naming
/// `DB_REPLICA_MAX_LAG`) and reads go to the primary meanwhile; after `pg_wal_replay_resume()`
/// it is `up` again, reads are back on it, and they see the rows written meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_is_skipped_until_it_catches_up() {
    let primary = cluster();
    let replica = standby(&primary);
    let pool = Pool::new(Settings {
        replica_max_lag: Duration::from_secs(1),
        ..read_settings(&primary, &[&replica], "replica-lag")
    })
    .unwrap();
    let on_replica = observer(&replica).await;
    pool.execute("CREATE TABLE writes (id serial PRIMARY KEY)", &[])
        .await
        .unwrap();
    pool.execute("INSERT INTO writes DEFAULT VALUES", &[])
        .await
        .unwrap();
    // The standby has replayed a commit (the lag is the age of the last one replayed).
    assert!(
        eventually(WITHIN, || async {
            on_replica
                .query_one("SELECT count(*) FROM writes", &[])
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) == 1)
        })
        .await,
        "the standby never replayed the first write"
    );
    assert!(reaches(&pool, &replica, ReplicaState::Up).await);
    assert!(read_where(&pool).await.0, "reads are not on the replica");

    on_replica
        .execute("SELECT pg_wal_replay_pause()", &[])
        .await
        .unwrap();
    let paused = Instant::now();
    let mut written = 1i64;
    let lagging = eventually(WITHIN, || {
        let pool = &pool;
        let replica = &replica;
        written += 1;
        async move {
            pool.execute("INSERT INTO writes DEFAULT VALUES", &[])
                .await
                .unwrap();
            pool.read().refresh();
            let _ = pool.read().query_one("SELECT 1", &[]).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            state_of(pool, replica) == ReplicaState::Lagging
        }
    })
    .await;
    assert!(
        lagging,
        "not lagging {:?} after replay was paused: {:?}",
        paused.elapsed(),
        pool.status().replicas
    );
    let status = replica_status(&pool, &replica);
    assert!(
        status.lag_seconds.is_some_and(|l| l > 1.0),
        "lagging with a lag of at most 1 s: {status:?}"
    );
    assert!(
        status
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("DB_REPLICA_MAX_LAG")),
        "{status:?}"
    );
    for _ in 0..5 {
        let (recovery, port) = read_where(&pool).await;
        assert!(!recovery, "a read went to the lagging replica");
        assert_eq!(port, i32::from(primary.port()));
    }

    on_replica
        .execute("SELECT pg_wal_replay_resume()", &[])
        .await
        .unwrap();
    assert!(
        reaches(&pool, &replica, ReplicaState::Up).await,
        "the replica did not come back up after replay resumed: {:?}",
        pool.status().replicas
    );
    let row = pool
        .read()
        .query_one(
            "SELECT pg_is_in_recovery(), inet_server_port(), count(*) FROM writes",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "reads are not back on the replica");
    assert_eq!(row.get::<_, i32>(1), i32::from(replica.port()));
    assert_eq!(
        row.get::<_, i64>(2),
        written,
        "the replica has not replayed the writes made while it lagged"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Fallback off

/// With `replica_fallback: false` and the only replica stopped, a read (statement or checkout)
/// fails with `Error::NoReplica`, whose message names the replica's host and
/// `DB_REPLICA_FALLBACK`, instead of running on the primary; a pool on the same servers with
/// fallback on (the default) answers the same read from the primary (its transactions still
/// READ ONLY there), and its health check
/// stays healthy with the replica `down`. Once the replica runs again, `refresh()` alone (no
/// reads) probes it back `up`, and the strict pool's reads succeed on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fallback_reads_fail_when_no_replica_is_usable() {
    let primary = cluster();
    let replica = Arc::new(standby(&primary));
    let strict = Pool::new(Settings {
        replica_fallback: false,
        ..read_settings(&primary, &[&replica], "no-fallback")
    })
    .unwrap();
    let lenient = Pool::new(read_settings(&primary, &[&replica], "fallback")).unwrap();
    lenient
        .execute("CREATE TABLE t (id int)", &[])
        .await
        .unwrap();
    assert!(read_where(&strict).await.0, "reads are not on the replica");
    assert!(read_where(&lenient).await.0, "reads are not on the replica");

    let r = replica.clone();
    blocking(move || r.stop(ShutdownMode::Immediate))
        .await
        .unwrap();
    let host = host_of(&replica);
    for attempt in 0..3 {
        let err = strict
            .read()
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .expect_err("a read without fallback succeeded with its replica stopped");
        assert!(
            matches!(err, Error::NoReplica { .. }),
            "read {attempt}: not NoReplica: {err:?}"
        );
        let message = err.to_string();
        assert!(message.contains(&host), "read {attempt}: {message}");
        assert!(
            message.contains("DB_REPLICA_FALLBACK"),
            "read {attempt}: {message}"
        );
    }
    let Err(err) = strict.read().get().await else {
        panic!("a checkout without fallback succeeded with its replica stopped");
    };
    assert!(matches!(err, Error::NoReplica { .. }), "{err:?}");
    assert_eq!(state_of(&strict, &replica), ReplicaState::Down);

    let (recovery, port) = read_where(&lenient).await;
    assert!(
        !recovery,
        "with fallback, the read did not go to the primary"
    );
    assert_eq!(port, i32::from(primary.port()));
    assert_eq!(state_of(&lenient, &replica), ReplicaState::Down);
    // A checkout that fell back to the primary still runs READ ONLY transactions.
    let mut conn = lenient.read().get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    let row = tx.query_one(WHERE, &[]).await.unwrap();
    assert!(
        !row.get::<_, bool>(0),
        "the fallback checkout is not on the primary"
    );
    let err = tx
        .execute("INSERT INTO t VALUES (1)", &[])
        .await
        .expect_err("a write in a read() transaction on the primary succeeded");
    assert_eq!(err.code(), Some("25006"), "{err:?}");
    drop(tx);
    drop(conn);
    // The primary still answers: healthy, with the replica down and why.
    let health = tidepool::axum::check_database(&lenient, Duration::from_secs(10)).await;
    let json = serde_json::to_value(&health).unwrap();
    assert_eq!(json["status"], "healthy", "{json}");
    assert_eq!(json["replicas"][0]["host"], host.as_str(), "{json}");
    assert_eq!(json["replicas"][0]["state"], "down", "{json}");
    assert!(json["replicas"][0]["reason"].is_string(), "{json}");

    // Started again, with no reads at all: `refresh()` alone probes it back up, and the
    // strict pool reads from it again.
    let r = replica.clone();
    blocking(move || r.start_again()).await.unwrap();
    assert!(
        eventually(WITHIN, || async {
            strict.read().refresh();
            state_of(&strict, &replica) == ReplicaState::Up
        })
        .await,
        "refresh() did not bring the replica back: {:?}",
        strict.status().replicas
    );
    let (recovery, port) = read_where(&strict).await;
    assert!(recovery, "the read did not go to the replica");
    assert_eq!(port, i32::from(replica.port()));
}

/// A replica whose pool is busy (every connection checked out) is serving, not down: its lag
/// measurement is skipped while the pool is full, and it stays up, however long the
/// measurements would have had to wait for a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_replica_stays_up() {
    let primary = cluster();
    let replica = standby(&primary);
    let pool = Pool::new(Settings {
        replica_pool_size: Some(1),
        replica_max_overflow: Some(Some(0)),
        pool_timeout: Duration::from_millis(300),
        ..read_settings(&primary, &[&replica], "busy-replica")
    })
    .expect("pool builds");
    assert!(reaches(&pool, &replica, ReplicaState::Up).await);
    let held = pool
        .read()
        .get()
        .await
        .expect("the replica's one connection");
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        pool.read().refresh();
        assert_eq!(
            state_of(&pool, &replica),
            ReplicaState::Up,
            "a busy replica is not down: {:?}",
            replica_status(&pool, &replica)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    let (standby, port) = read_where(&pool).await;
    assert!(standby, "reads go to the replica again");
    assert_eq!(i64::from(port), i64::from(replica.port()));
}
