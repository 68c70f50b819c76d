//! The tools and the library behind PgBouncer in transaction mode (the installed 1.18,
//! `tidepool_cluster::PgBouncer`, `default_pool_size = 2`) in front of a real PostgreSQL: with
//! the statement cache off (`?statement_cache_size=0`, `DB_STATEMENT_CACHE=false` or
//! `Settings.statement_cache = false`) every statement is sent unnamed, so clients sharing two
//! server connections never meet each other's prepared statements. tokio-postgres numbers its
//! statements per process (`s0`, `s1`, ...), so the clients here are separate processes: two
//! `tidepool bench` runs and two copies of this test binary running parameterised statements
//! and transactions (`pgbouncer_client_process`, started by the first test), alongside a pool
//! in the test process itself. Also: `tidepool serve`'s health check through PgBouncer, and
//! `tidepool bench --read` on a standby.
//!
//! Needs PgBouncer installed (Debian: `apt-get install -y pgbouncer`).

mod support;

#[path = "../../tidepool/tests/support/http.rs"]
mod http;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{one_json_line, run_tidepool, Output};
use tidepool::tokio_postgres::{self, NoTls};
use tidepool::{DatabaseUrl, Error, Pool, RetryPolicy, Settings};
use tidepool_cluster::{Cluster, PgBouncer, PoolMode};

/// How long one process may take before the test gives up on it (debug build, tests in
/// parallel).
const RUN_DEADLINE: Duration = Duration::from_secs(120);
/// How long each load (bench, client process, in-process pool) runs.
const LOAD_SECS: &str = "3";
/// PgBouncer's server connections for all clients.
const SERVER_CONNECTIONS: i64 = 2;
/// Where the client process helper takes its orders from.
const CHILD_URL: &str = "TIDEPOOL_PGB_CHILD_URL";
const CHILD_TAG: &str = "TIDEPOOL_PGB_CHILD_TAG";
/// The line the client process prints its report on.
const CHILD_REPORT: &str = "PGB-CHILD-REPORT ";

// ---------------------------------------------------------------------------------------------
// Support

fn start_cluster() -> Cluster {
    Cluster::start().unwrap_or_else(|e| panic!("these tests need a real PostgreSQL server: {e}"))
}

/// PgBouncer in transaction mode with two server connections in front of `cluster`.
fn bouncer(cluster: &Cluster) -> PgBouncer {
    PgBouncer::builder()
        .pool_mode(PoolMode::Transaction)
        .default_pool_size(SERVER_CONNECTIONS as u32)
        .start(cluster)
        .unwrap_or_else(|e| panic!("these tests need PgBouncer: {e}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A plain connection straight to the cluster (not through PgBouncer), for set-up and
/// observations.
async fn direct(cluster: &Cluster) -> tokio_postgres::Client {
    let config = format!(
        "host={} port={} user={} password={} dbname={} application_name=observer",
        cluster.host(),
        cluster.port(),
        cluster.user(),
        cluster.password(),
        cluster.dbname()
    );
    let (client, conn) = tokio_postgres::connect(&config, NoTls)
        .await
        .expect("observer connects");
    tokio::spawn(conn);
    client
}

/// The report of a `tidepool bench --json` run that exited 0.
fn bench_report(out: &Output) -> Value {
    out.assert_code(0);
    one_json_line(out)
}

fn count(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not a count in {v}"))
}

/// `tidepool bench --json --duration SECS ARGS` in a thread of its own.
fn spawn_bench(
    name: &str,
    env: Vec<(&'static str, String)>,
    secs: &str,
    args: &[&str],
) -> thread::JoinHandle<Output> {
    let name = name.to_owned();
    let mut all = vec!["bench", "--json", "--duration", secs];
    all.extend_from_slice(args);
    let all: Vec<String> = all.into_iter().map(str::to_owned).collect();
    thread::spawn(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        run_tidepool(&format!("pgbouncer-{name}"), &env, &args, RUN_DEADLINE)
    })
}

// ---------------------------------------------------------------------------------------------
// The parameterised workload: the same in the test process and in the client processes

/// What one workload did: rounds completed, failures (with the first few messages), and rows
/// inserted (each round inserts three).
#[derive(Debug, Default)]
struct Load {
    rounds: u64,
    failures: u64,
    examples: Vec<String>,
    inserted: u64,
}

impl Load {
    fn to_json(&self) -> Value {
        json!({
            "rounds": self.rounds,
            "failures": self.failures,
            "examples": self.examples,
            "inserted": self.inserted,
        })
    }

    fn from_json(v: &Value) -> Load {
        Load {
            rounds: count(v, "rounds"),
            failures: count(v, "failures"),
            examples: v["examples"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|e| e.as_str().unwrap_or("?").to_owned())
                        .collect()
                })
                .unwrap_or_default(),
            inserted: count(v, "inserted"),
        }
    }
}

/// A round's failure: the library's error, or an answer that was not the expected one.
fn wrong(what: String) -> Error {
    Error::Settings(tidepool::SettingsError::Invalid {
        variable: "answer".into(),
        value: what,
        expected: "the value the statement was given".into(),
    })
}

/// The error with the server's message, for the report.
fn shown(e: &Error) -> String {
    match e {
        Error::Db(db) => match db.as_db_error() {
            Some(d) => format!("{} (SQLSTATE {})", d.message(), d.code().code()),
            None => db.to_string(),
        },
        e => e.to_string(),
    }
}

/// Row ids of workload `tag`: `tag << 40 | worker << 20 | n`.
fn row_id(tag: i64, worker: i64, n: i64) -> i64 {
    (tag << 40) | (worker << 20) | n
}

/// One round of worker `worker` of workload `tag`: a parameterised `SELECT` on the pool, an
/// `INSERT ... VALUES ($1, $2)` with an `i64` and a `&str`, a transaction on a checked-out
/// connection (insert, then read both rows back in it), a `run_transaction` (insert and read
/// back), and a `query_opt` that finds nothing. Every answer is checked.
async fn round(pool: &Pool, tag: i64, worker: i64, n: i64) -> Result<(), Error> {
    let x = i32::try_from(n % 1_000_000).unwrap();
    let y: i32 = pool.query_one("SELECT $1::int + 1", &[&x]).await?.get(0);
    if y != x + 1 {
        return Err(wrong(format!("SELECT {x} + 1 gave {y}")));
    }
    let (a, b, c) = (
        row_id(tag, worker, 3 * n),
        row_id(tag, worker, 3 * n + 1),
        row_id(tag, worker, 3 * n + 2),
    );
    let name = format!("{tag}/{worker}/{n}");
    let inserted = pool
        .execute(
            "INSERT INTO items (id, name) VALUES ($1, $2)",
            &[&a, &name.as_str()],
        )
        .await?;
    if inserted != 1 {
        return Err(wrong(format!("INSERT reported {inserted} rows")));
    }

    let mut conn = pool.get().await?;
    let tx = conn.transaction().await?;
    tx.execute(
        "INSERT INTO items (id, name) VALUES ($1, $2)",
        &[&b, &name.as_str()],
    )
    .await?;
    let seen: i64 = tx
        .query_one(
            "SELECT count(*) FROM items WHERE id IN ($1, $2) AND name = $3",
            &[&a, &b, &name],
        )
        .await?
        .get(0);
    if seen != 2 {
        return Err(wrong(format!("the transaction saw {seen} of its 2 rows")));
    }
    tx.commit().await?;
    drop(conn);

    let expected = name.clone();
    let back: String = pool
        .run_transaction(&RetryPolicy::never(), async move |tx| {
            tx.execute(
                "INSERT INTO items (id, name) VALUES ($1, $2)",
                &[&c, &expected.as_str()],
            )
            .await?;
            let row = tx
                .query_one("SELECT name FROM items WHERE id = $1", &[&c])
                .await?;
            Ok(row.get::<_, String>(0))
        })
        .await?;
    if back != name {
        return Err(wrong(format!("read back {back:?} instead of {name:?}")));
    }
    let missing = pool
        .query_opt("SELECT name FROM items WHERE id = $1", &[&(-a - 1)])
        .await?;
    if missing.is_some() {
        return Err(wrong(format!("found a row for id {}", -a - 1)));
    }
    Ok(())
}

/// `workers` tasks running rounds on `pool` for `secs` seconds.
async fn workload(pool: &Pool, tag: i64, workers: i64, secs: f64) -> Load {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..workers)
        .map(|worker| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut load = Load::default();
                let mut n = 0;
                while Instant::now() < until {
                    match round(&pool, tag, worker, n).await {
                        Ok(()) => {
                            load.rounds += 1;
                            load.inserted += 3;
                        }
                        Err(e) => {
                            load.failures += 1;
                            if load.examples.len() < 3 {
                                load.examples.push(shown(&e));
                            }
                        }
                    }
                    n += 1;
                }
                load
            })
        })
        .collect();
    let mut total = Load::default();
    for task in tasks {
        let load = task.await.expect("workload task panicked");
        total.rounds += load.rounds;
        total.failures += load.failures;
        total.inserted += load.inserted;
        total.examples.extend(load.examples);
    }
    total
}

/// A pool through PgBouncer with the statement cache off in the settings (the URL has no
/// `statement_cache_size`).
fn bouncer_pool(bouncer: &PgBouncer, app: &str, size: usize) -> Pool {
    Pool::new(Settings {
        database_url: Some(DatabaseUrl::parse(&bouncer.url()).unwrap()),
        statement_cache: false,
        pool_size: size,
        max_overflow: Some(0),
        application_name: Some(app.into()),
        ..Settings::default()
    })
    .unwrap()
}

/// Rows of workload `tag` in `items`.
async fn rows_of(client: &tokio_postgres::Client, tag: i64) -> i64 {
    client
        .query_one("SELECT count(*) FROM items WHERE id >> 40 = $1", &[&tag])
        .await
        .expect("count rows")
        .get(0)
}

/// Starts this test binary again as a client process running [`pgbouncer_client_process`].
fn spawn_client_process(url: &str, tag: i64) -> Child {
    Command::new(std::env::current_exe().expect("test binary path"))
        .args([
            "pgbouncer_client_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_URL, url)
        .env(CHILD_TAG, tag.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the client process")
}

/// Waits for a client process (up to `RUN_DEADLINE`) and returns its report.
fn client_report(mut child: Child) -> Load {
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let until = Instant::now() + RUN_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the client process") {
            break status;
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the client process did not finish within {RUN_DEADLINE:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        status.success(),
        "client process: {status}\nstdout:\n{out}\nstderr:\n{err}"
    );
    let line = out
        .lines()
        .find_map(|l| l.split_once(CHILD_REPORT).map(|(_, report)| report))
        .unwrap_or_else(|| panic!("no report from the client process:\n{out}\n{err}"));
    Load::from_json(&serde_json::from_str(line).expect("the report is JSON"))
}

/// Not a test of its own: the client process the first test starts (twice) from this binary.
/// With its orders in the environment, it runs the parameterised workload through PgBouncer
/// for `LOAD_SECS` and prints its report; without them (an `--ignored` run) it does nothing.
#[test]
#[ignore = "a helper process of parameterised_statements_and_benches_share_pgbouncer"]
fn pgbouncer_client_process() {
    let (Ok(url), Ok(tag)) = (std::env::var(CHILD_URL), std::env::var(CHILD_TAG)) else {
        return;
    };
    let tag: i64 = tag.parse().expect("tag is a number");
    let load = runtime().block_on(async {
        let pool = Pool::new(Settings {
            database_url: Some(DatabaseUrl::parse(&url).unwrap()),
            statement_cache: false,
            pool_size: 3,
            max_overflow: Some(0),
            application_name: Some(format!("pgb-client-{tag}")),
            ..Settings::default()
        })
        .unwrap();
        let load = workload(&pool, tag, 3, LOAD_SECS.parse().unwrap()).await;
        pool.close();
        load
    });
    println!("{CHILD_REPORT}{}", load.to_json());
}

// ---------------------------------------------------------------------------------------------
// 1. Many processes through two server connections

/// Through PgBouncer in transaction mode with two server connections, at the same time: two
/// `tidepool bench` processes (cache off by `?statement_cache_size=0` and by
/// `DB_STATEMENT_CACHE=false`), two client processes running parameterised statements and
/// transactions (`SELECT $1::int + 1`, `INSERT ... VALUES ($1, $2)` with `i64` and `&str`,
/// `conn.transaction()`, `pool.run_transaction`) with `Settings.statement_cache = false`, and
/// the same workload from several tasks of a pool in this process. None of them sees an error,
/// every answer is the one expected, every row each of them reported inserting is in the
/// table, and the server never had more than two connections for them: the clients really did
/// share server connections between transactions.
#[test]
fn parameterised_statements_and_benches_share_pgbouncer() {
    let cluster = start_cluster();
    let bouncer = bouncer(&cluster);
    let rt = runtime();
    let observer = rt.block_on(async {
        let client = direct(&cluster).await;
        client
            .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL)")
            .await
            .expect("create table");
        client
    });

    // The server's connections other than the observer's, sampled throughout.
    let sampling = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(AtomicI64::new(0));
    let sampler = rt.spawn({
        let (sampling, peak) = (sampling.clone(), peak.clone());
        let observer = rt.block_on(direct(&cluster));
        async move {
            while sampling.load(Ordering::Relaxed) {
                let n: i64 = observer
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity \
                         WHERE backend_type = 'client backend' \
                         AND application_name IS DISTINCT FROM 'observer'",
                        &[],
                    )
                    .await
                    .expect("pg_stat_activity readable")
                    .get(0);
                peak.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    let cache_off_url = format!("{}?statement_cache_size=0", bouncer.url());
    let bench_a = spawn_bench(
        "bench-a",
        vec![
            ("DATABASE_URL", cache_off_url),
            ("DB_POOL_SIZE", "4".into()),
            ("DB_MAX_OVERFLOW", "0".into()),
        ],
        LOAD_SECS,
        &["--concurrency", "8", "--query", "SELECT 1, pg_sleep(0.001)"],
    );
    let bench_b = spawn_bench(
        "bench-b",
        vec![
            ("DATABASE_URL", bouncer.url()),
            ("DB_STATEMENT_CACHE", "false".into()),
            ("DB_POOL_SIZE", "4".into()),
            ("DB_MAX_OVERFLOW", "0".into()),
        ],
        LOAD_SECS,
        &[
            "--concurrency",
            "8",
            "--query",
            "SELECT count(*) FROM pg_class WHERE relname <> 'x'",
        ],
    );
    let clients = [1, 2].map(|tag| spawn_client_process(&bouncer.url(), tag));

    let pool = bouncer_pool(&bouncer, "pgb-in-process", 4);
    let local = rt.block_on(workload(&pool, 0, 6, LOAD_SECS.parse().unwrap()));
    pool.close();

    let reports: Vec<Load> = clients.into_iter().map(client_report).collect();
    let benches = [
        bench_report(&bench_a.join().unwrap()),
        bench_report(&bench_b.join().unwrap()),
    ];
    sampling.store(false, Ordering::Relaxed);
    rt.block_on(sampler).unwrap();

    eprintln!(
        "PGBOUNCER in-process {local:?}; clients {reports:?}; benches ok {} / {}; peak server \
         connections {}",
        benches[0]["ok"],
        benches[1]["ok"],
        peak.load(Ordering::Relaxed)
    );
    for (name, v) in ["a", "b"].iter().zip(&benches) {
        assert_eq!(count(v, "errors"), 0, "bench {name}: {v}");
        assert!(count(v, "ok") > 0, "bench {name}: {v}");
    }
    assert_eq!(local.failures, 0, "in-process pool: {local:?}");
    assert!(local.rounds > 0, "in-process pool: {local:?}");
    for (tag, r) in (1..).zip(&reports) {
        assert_eq!(r.failures, 0, "client process {tag}: {r:?}");
        assert!(r.rounds > 0, "client process {tag}: {r:?}");
    }
    rt.block_on(async {
        assert_eq!(rows_of(&observer, 0).await as u64, local.inserted);
        for (tag, r) in (1..).zip(&reports) {
            assert_eq!(
                rows_of(&observer, tag).await as u64,
                r.inserted,
                "rows of client process {tag}"
            );
        }
    });
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        (1..=SERVER_CONNECTIONS).contains(&peak),
        "{peak} server connections for 4 + 4 + 3 + 3 + 4 client connections"
    );
}

/// The control of the test above: the same bench through the same kind of PgBouncer, but with
/// the statement cache on (the default), does fail: a statement prepared by name in one
/// transaction is missing on the server connection the next one gets (`26000`). So the zero
/// error counts above are the cache being off, not a load too light to share connections.
#[test]
fn with_the_statement_cache_on_named_statements_break_behind_pgbouncer() {
    let cluster = start_cluster();
    let bouncer = bouncer(&cluster);
    let out = spawn_bench(
        "cache-on",
        vec![
            ("DATABASE_URL", bouncer.url()),
            ("DB_POOL_SIZE", "4".into()),
            ("DB_MAX_OVERFLOW", "0".into()),
        ],
        "1",
        &["--concurrency", "8", "--query", "SELECT 1, pg_sleep(0.001)"],
    );
    let out = out.join().unwrap();
    out.assert_code(1);
    let v = one_json_line(&out);
    assert!(count(&v, "errors") > 0, "{v}");
    assert!(
        v["errors_by_class"]["sqlstate_26"].as_u64() > Some(0),
        "no 'prepared statement does not exist': {v}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. serve

/// A running `tidepool serve` (JSON logs), killed on drop.
struct Service {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Service {
    fn start(env: &[(&str, &str)]) -> Service {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tidepool"))
            .args(["serve", "--bind", "127.0.0.1:0"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOG_FORMAT", "json")
            .envs(env.iter().copied())
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tidepool serve");
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Service {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The address from the "listening" record.
    fn address(&mut self) -> SocketAddr {
        let deadline = Instant::now() + RUN_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let record: Option<Value> = serde_json::from_str(&line).ok();
                    self.seen.push(line);
                    if let Some(r) = record {
                        if r["target"] == "tidepool::serve" {
                            if let Some(a) = r["address"].as_str() {
                                return a.parse().expect("address parses");
                            }
                        }
                    }
                }
                Err(_) => panic!("the service did not start:\n{}", self.seen.join("\n")),
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tidepool serve` with `DATABASE_URL` pointing at PgBouncer (transaction mode, cache off by
/// `DB_STATEMENT_CACHE=false`): `/health/database` answers 200 `healthy` with the pool's
/// figures, request after request (each check its own transaction on whichever server
/// connection PgBouncer gives it).
#[test]
fn serve_through_pgbouncer_is_healthy() {
    let cluster = start_cluster();
    let bouncer = bouncer(&cluster);
    let url = bouncer.url();
    let mut service = Service::start(&[
        ("DATABASE_URL", url.as_str()),
        ("DB_STATEMENT_CACHE", "false"),
    ]);
    let addr = service.address();
    for i in 0..5 {
        let response = http::http_get(addr, "/health/database", Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("GET /health/database: {e}"));
        assert_eq!(response.status, 200, "check {i}: {}", response.body);
        let body = response.json();
        assert_eq!(body["status"], "healthy", "check {i}: {body}");
        assert!(body["pool_size"].is_u64(), "check {i}: {body}");
        assert!(
            body["total_connections"].as_u64() >= Some(1),
            "check {i}: {body}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. bench --read on a standby

/// `tidepool bench --read` with `DATABASE_REPLICA_URL` naming a standby of the cluster (and
/// `DATABASE_URL` the PgBouncer in front of the primary, cache off) runs every request on the
/// standby: its query, `SELECT 1 / pg_is_in_recovery()::int`, divides by zero on the primary,
/// and the run has no error. The same run without `--read` fails every request with that
/// division by zero (`sqlstate_22`), so the query does tell the servers apart.
#[test]
fn bench_read_runs_on_the_standby() {
    let cluster = start_cluster();
    let standby = cluster
        .standby()
        .unwrap_or_else(|e| panic!("these tests need a streaming standby: {e}"));
    let bouncer = bouncer(&cluster);
    let replica_url = standby.url();
    let env = vec![
        ("DATABASE_URL", bouncer.url()),
        ("DB_STATEMENT_CACHE", "false".into()),
        ("DATABASE_REPLICA_URL", replica_url),
    ];
    let query = "SELECT 1 / pg_is_in_recovery()::int";
    let read = bench_report(
        &spawn_bench(
            "read",
            env.clone(),
            "1",
            &["--read", "--concurrency", "4", "--query", query],
        )
        .join()
        .unwrap(),
    );
    assert_eq!(count(&read, "errors"), 0, "{read}");
    assert!(count(&read, "ok") > 0, "{read}");

    let primary = spawn_bench(
        "primary",
        env,
        "1",
        &["--concurrency", "4", "--query", query],
    )
    .join()
    .unwrap();
    // Every request fails there: the run exits 1.
    primary.assert_code(1);
    let primary = one_json_line(&primary);
    assert_eq!(count(&primary, "ok"), 0, "{primary}");
    assert!(count(&primary, "errors") > 0, "{primary}");
    assert_eq!(
        primary["errors_by_class"]["sqlstate_22"], primary["errors"],
        "{primary}"
    );
}
