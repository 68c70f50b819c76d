//! Cancellation reaches the server on every path: a 30 s statement whose future is dropped after
//! 0.5 s is gone from `pg_stat_activity` within 1 s, on SCRAM, md5, trust (Unix socket) and TLS
//! connections alike, whether it ran on a checked-out connection, inside a transaction, as a
//! statement on the pool, or pipelined behind others on a shared connection. Meanwhile the
//! server never has more of the pool's backends than its capacity, and the connection is
//! reused only once the server is ready again: the next user gets a clean, idle connection.

mod support;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{eventually, server_count, server_count_where};
use tidepool::{DatabaseUrl, Error, Pool, Settings};
use tidepool_cluster::tls::TlsMode;
use tidepool_cluster::Cluster;

/// How long the dropped statement would run.
const SLEEP: &str = "SELECT pg_sleep(30)";
/// When its future is dropped.
const DROP_AFTER: Duration = Duration::from_millis(500);
/// The promise: the server stops it within this long of the drop.
const STOPPED_WITHIN: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
enum Path {
    Checkout,
    Transaction,
    PoolStatement,
}

/// A cluster and a way to reach it: the pool's URL and an observer that works whatever
/// pg_hba allows over TCP (the Unix socket, trust).
struct Target {
    cluster: Cluster,
    url: String,
}

impl Target {
    async fn observer(&self) -> tokio_postgres::Client {
        support::unix_observer(&self.cluster).await
    }

    fn pool(&self, app: &str, pool_size: usize, max_overflow: usize) -> Pool {
        Pool::new(Settings {
            database_url: Some(DatabaseUrl::parse(&self.url).expect("URL parses")),
            application_name: Some(app.into()),
            pool_size,
            max_overflow: Some(max_overflow),
            pool_timeout: Duration::from_secs(10),
            ..Settings::default()
        })
        .expect("settings are valid")
    }
}

fn start(builder: tidepool_cluster::ClusterBuilder) -> Cluster {
    builder
        .start()
        .unwrap_or_else(|e| panic!("these tests need a real PostgreSQL server: {e}"))
}

fn scram() -> Target {
    let cluster = start(Cluster::builder());
    let url = cluster.url();
    Target { cluster, url }
}

fn tls() -> Target {
    let cluster = start(Cluster::builder().tls(TlsMode::Only));
    let ca = cluster
        .tls()
        .expect("a TLS cluster")
        .ca_cert_path()
        .to_owned();
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        cluster.url(),
        ca.display()
    );
    Target { cluster, url }
}

fn trust_over_unix_socket() -> Target {
    let cluster = start(Cluster::builder());
    let url = format!(
        "postgresql://{}@/{}?host={}&port={}",
        cluster.user(),
        cluster.dbname(),
        cluster.data_dir().display(),
        cluster.port()
    );
    Target { cluster, url }
}

/// A role whose password is stored as md5, and a pg_hba.conf that makes the server ask it for
/// md5.
async fn md5() -> Target {
    let target = scram();
    let admin = target.observer().await;
    admin
        .batch_execute(
            "SET password_encryption = 'md5'; CREATE ROLE md5_role LOGIN SUPERUSER PASSWORD 'md5-pw'",
        )
        .await
        .expect("md5 role created");
    let hba = target.cluster.data_dir().join("pg_hba.conf");
    std::fs::write(
        &hba,
        format!(
            "local all all trust\nhost all md5_role 127.0.0.1/32 md5\nhost all {} 127.0.0.1/32 scram-sha-256\n",
            target.cluster.user()
        ),
    )
    .expect("pg_hba.conf writable");
    admin
        .execute("SELECT pg_reload_conf()", &[])
        .await
        .expect("reload");
    let loaded = eventually(Duration::from_secs(10), || async {
        admin
            .query_one(
                "SELECT count(*) FROM pg_hba_file_rules WHERE auth_method = 'md5'",
                &[],
            )
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) == 1)
    })
    .await;
    assert!(loaded, "the server did not load the md5 pg_hba.conf");
    let url = format!(
        "postgresql://md5_role:md5-pw@127.0.0.1:{}/{}",
        target.cluster.port(),
        target.cluster.dbname()
    );
    Target { url, ..target }
}

/// Backends of `app` running the 30 s sleep.
async fn sleeping(observer: &tokio_postgres::Client, app: &str) -> i64 {
    server_count_where(
        observer,
        app,
        "state = 'active' AND query LIKE '%pg_sleep(30)%'",
    )
    .await
}

/// Runs `statement` (which runs the 30 s sleep) in a task, and once the server shows the sleep
/// running and [`DROP_AFTER`] has passed, drops it (aborts the task). Returns when it dropped.
async fn run_then_drop<F>(observer: &tokio_postgres::Client, app: &str, statement: F) -> Instant
where
    F: std::future::Future<Output = Result<(), Error>> + Send + 'static,
{
    let started = Instant::now();
    let task = tokio::spawn(statement);
    let running = eventually(Duration::from_secs(5), || async {
        sleeping(observer, app).await == 1
    })
    .await;
    assert!(running, "{app}: the 30 s statement never ran on the server");
    tokio::time::sleep_until((started + DROP_AFTER).into()).await;
    assert!(!task.is_finished(), "{app}: the statement finished early");
    task.abort();
    let _ = task.await;
    Instant::now()
}

/// Runs the 30 s statement on `path`, drops its future after [`DROP_AFTER`], and checks the
/// promise: stopped on the server within [`STOPPED_WITHIN`], the next user gets a clean
/// connection, and the connection was reused (the server was ready again) rather than closed.
async fn dropped_statement_stops(target: &Target, path: Path, app: &str) {
    let pool = target.pool(app, 2, 0);
    let observer = target.observer().await;
    let p = pool.clone();
    let run = async move {
        let pool = p;
        match path {
            Path::Checkout => {
                let conn = pool.get().await?;
                conn.execute(SLEEP, &[]).await?;
            }
            Path::Transaction => {
                let mut conn = pool.get().await?;
                let tx = conn.transaction().await?;
                tx.execute("CREATE TEMP TABLE IF NOT EXISTS t (a int)", &[])
                    .await?;
                tx.execute(SLEEP, &[]).await?;
                tx.commit().await?;
            }
            Path::PoolStatement => {
                pool.execute(SLEEP, &[]).await?;
            }
        }
        Ok::<(), Error>(())
    };
    let dropped = run_then_drop(&observer, app, run).await;
    let stopped = eventually(Duration::from_secs(5), || async {
        sleeping(&observer, app).await == 0
    })
    .await;
    let took = dropped.elapsed();
    assert!(
        stopped,
        "{path:?}: still running on the server 5 s after the drop"
    );
    assert!(
        took <= STOPPED_WITHIN,
        "{path:?}: stopped {took:?} after the drop (promise: {STOPPED_WITHIN:?})"
    );
    // Back in the pool once the server was ready: reused, not closed.
    assert!(
        eventually(Duration::from_secs(5), || async {
            pool.status().checked_out == 0
        })
        .await,
        "{path:?}: the connection never came back: {:?}",
        pool.status()
    );
    let status = pool.status();
    assert_eq!(status.cancelled_statements, 1, "{path:?}: {status:?}");
    assert_eq!(
        status.connections_closed.total(),
        0,
        "{path:?}: the connection was closed instead of reused: {status:?}"
    );
    assert!(server_count(&observer, app).await <= 2);
    // The next user: idle, not inside a transaction, no temp table left by the aborted one.
    let conn = pool.get().await.expect("checkout after the cancel");
    let err = conn.batch_execute("SAVEPOINT probe").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some("25P01"),
        "{path:?}: handed out inside a transaction"
    );
    let v: i32 = conn
        .query_one("SELECT 7", &[])
        .await
        .expect("the connection works")
        .get(0);
    assert_eq!(v, 7);
}

async fn every_path(target: &Target, name: &str) {
    for path in [Path::Checkout, Path::Transaction, Path::PoolStatement] {
        dropped_statement_stops(target, path, &format!("{name}-{path:?}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_statements_stop_on_scram_connections() {
    every_path(&scram(), "scram").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_statements_stop_on_tls_connections() {
    every_path(&tls(), "tls").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_statements_stop_on_md5_connections() {
    every_path(&md5().await, "md5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_statements_stop_on_trust_unix_socket_connections() {
    every_path(&trust_over_unix_socket(), "trust").await;
}

/// A cancel token from a checked-out connection cancels its statement over TLS: the statement
/// fails with 57014 (query_canceled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cancel_token_works_over_tls() {
    let target = tls();
    let pool = target.pool("token", 1, 0);
    let conn = pool.get().await.expect("checkout");
    let token = conn.cancel_token();
    let observer = target.observer().await;
    let canceller = tokio::spawn(async move {
        let running = eventually(Duration::from_secs(5), || async {
            sleeping(&observer, "token").await == 1
        })
        .await;
        assert!(running, "the statement never started");
        token.cancel_query().await
    });
    let started = Instant::now();
    let err = conn.execute(SLEEP, &[]).await.unwrap_err();
    assert_eq!(err.code(), Some("57014"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    canceller
        .await
        .expect("canceller ran")
        .expect("cancel delivered");
}

/// A pipelined statement: with the pool's two connections busy with a stream of cheap
/// statements from many tasks, a 30 s statement joins one of those shared connections; dropped after
/// 0.5 s it stops within 1 s, and the cheap statements around it all succeed (a cancel request
/// that hits a neighbour instead is absorbed by running that neighbour again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_pipelined_statements_stop_and_spare_their_neighbours() {
    for target in [scram(), tls()] {
        let app = "pipelined";
        let pool = target.pool(app, 2, 0);
        let observer = target.observer().await;
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let mut load = Vec::new();
        for _ in 0..16 {
            let (pool, stop, ok, failed) = (pool.clone(), stop.clone(), ok.clone(), failed.clone());
            load.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match pool.query_one("SELECT 1", &[]).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("cheap statement failed: {e}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }));
        }
        // The load has made the connection a busy lane.
        assert!(
            eventually(Duration::from_secs(5), || async {
                pool.status().pipelined_statements > 50
            })
            .await
        );
        let joined_before = pool.status().pipelined_statements;
        let p = pool.clone();
        let dropped = run_then_drop(&observer, app, async move {
            p.execute(SLEEP, &[]).await.map(|_| ())
        })
        .await;
        let stopped = eventually(Duration::from_secs(5), || async {
            sleeping(&observer, app).await == 0
        })
        .await;
        let took = dropped.elapsed();
        assert!(stopped, "still running 5 s after the drop");
        assert!(took <= STOPPED_WITHIN, "stopped {took:?} after the drop");
        assert!(pool.status().pipelined_statements > joined_before);
        // The load goes on after the cancel.
        let after = ok.load(Ordering::Relaxed);
        assert!(
            eventually(Duration::from_secs(5), || async {
                ok.load(Ordering::Relaxed) > after + 100
            })
            .await,
            "the cheap statements stopped after the cancel"
        );
        stop.store(true, Ordering::Relaxed);
        for task in load {
            task.await.expect("load task");
        }
        assert_eq!(failed.load(Ordering::Relaxed), 0, "a neighbour failed");
        assert!(server_count(&observer, app).await <= 2);
        assert!(pool.status().cancelled_statements >= 1);
    }
}

/// Many statements dropped at random points on a small pool: the server never holds more of the
/// pool's backends than its capacity for longer than the cancel bound, nothing stays running,
/// and the pool keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_drops_never_grow_backends_past_capacity() {
    let target = scram();
    let app = "capacity";
    let pool = target.pool(app, 2, 1);
    let observer = target.observer().await;
    let done = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (done, max_seen) = (done.clone(), max_seen.clone());
        let observer = target.observer().await;
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let n = server_count(&observer, app).await;
                max_seen.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for i in 0..6u64 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..8u64 {
                let budget = Duration::from_millis(20 + (i * 37 + j * 53) % 120);
                let run = async {
                    if (i + j) % 2 == 0 {
                        pool.execute("SELECT pg_sleep(0.3)", &[]).await?;
                    } else {
                        let conn = pool.get().await?;
                        conn.execute("SELECT pg_sleep(0.3)", &[]).await?;
                    }
                    Ok::<(), Error>(())
                };
                let _ = tokio::time::timeout(budget, run).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            server_count_where(&observer, app, "state = 'active'").await == 0
                && pool.status().checked_out == 0
        })
        .await,
        "statements still running: {:?}",
        pool.status()
    );
    done.store(true, Ordering::Relaxed);
    sampler.await.expect("sampler");
    let max = max_seen.load(Ordering::Relaxed);
    assert!(
        max <= 3,
        "the server had {max} backends for a pool of capacity 3"
    );
    assert!(pool.status().cancelled_statements > 0);
    let v: i32 = pool
        .query_one("SELECT 5", &[])
        .await
        .expect("pool works")
        .get(0);
    assert_eq!(v, 5);
}

/// A statement sent through the raw client (`PooledConnection::client`, which the pool cannot
/// track) and dropped: the reset on return waits behind it, gives up after its bound, cancels it
/// and keeps the capacity until the server let go, so the pool never has more backends than its
/// capacity, and the statement does not run on for nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_raw_client_statement_is_stopped_too() {
    let target = scram();
    let app = "raw-client";
    let pool = Pool::new(Settings {
        database_url: Some(DatabaseUrl::parse(&target.url).expect("URL parses")),
        application_name: Some(app.into()),
        pool_size: 1,
        max_overflow: Some(0),
        // The reset's bound is the smaller of this and 2 s.
        connect_timeout: Duration::from_millis(500),
        pool_timeout: Duration::from_secs(10),
        ..Settings::default()
    })
    .expect("settings are valid");
    let observer = target.observer().await;
    let p = pool.clone();
    let dropped = run_then_drop(&observer, app, async move {
        let conn = p.get().await?;
        conn.client().execute(SLEEP, &[]).await?;
        Ok(())
    })
    .await;
    let stopped = eventually(Duration::from_secs(5), || async {
        sleeping(&observer, app).await == 0
    })
    .await;
    assert!(stopped, "still running 5 s after the drop");
    assert!(
        dropped.elapsed() <= Duration::from_secs(2),
        "stopped {:?} after the drop",
        dropped.elapsed()
    );
    // The next checkout gets a fresh connection; the server never had two for this pool.
    let conn = pool.get().await.expect("checkout after the raw statement");
    conn.query_one("SELECT 1", &[]).await.unwrap();
    assert!(server_count(&observer, app).await <= 1);
    assert_eq!(pool.status().connections_closed.reset_failed, 1);
}
