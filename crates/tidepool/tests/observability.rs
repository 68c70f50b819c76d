//! Observability (DESIGN §4) through the public API against a real PostgreSQL: echo, echo pool,
//! the slow-query warning and its plan, nothing at all when they are off, metrics through the
//! `metrics` facade, and the axum extractor and `/health/database` handler over real HTTP.
//!
//! Log records are captured with a thread-local subscriber; every test runs on a current-thread
//! runtime so the pool's own tasks log on the capturing thread too.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tidepool::instrument::{self, POOL_TARGET, SQL_TARGET};
use tidepool::{DatabaseUrl, Pool, Settings};
use tidepool_cluster::Cluster;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

#[path = "support/http.rs"]
mod http;
use http::{http_get, Response};

// ---------------------------------------------------------------------------------------------
// Support

/// One cluster for the whole file: every test uses its own pool (and, where it matters, its own
/// `application_name`).
fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| Cluster::start().expect("start PostgreSQL"))
}

fn settings() -> Settings {
    Settings {
        database_url: Some(DatabaseUrl::parse(&cluster().url()).expect("cluster URL")),
        ..Settings::default()
    }
}

/// A captured log record: level, target, and every field as text (`message` included).
#[derive(Debug, Clone)]
struct Record {
    level: Level,
    target: String,
    fields: BTreeMap<String, String>,
}

impl Record {
    fn message(&self) -> &str {
        self.fields.get("message").map_or("", String::as_str)
    }

    fn field(&self, name: &str) -> &str {
        self.fields
            .get(name)
            .unwrap_or_else(|| panic!("record {self:?} has no field {name}"))
    }
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Record>>>);

impl Capture {
    fn records(&self) -> Vec<Record> {
        self.0.lock().unwrap().clone()
    }

    fn on(&self, target: &str) -> Vec<Record> {
        self.records()
            .into_iter()
            .filter(|r| r.target == target)
            .collect()
    }

    fn find(&self, target: &str, message: &str) -> Vec<Record> {
        self.on(target)
            .into_iter()
            .filter(|r| r.message() == message)
            .collect()
    }
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        self.0.lock().unwrap().push(Record {
            level: *event.metadata().level(),
            target: event.metadata().target().to_string(),
            fields,
        });
    }
}

/// Captures every record (all levels) logged on this thread until the guard drops.
fn capture() -> (Capture, tracing::subscriber::DefaultGuard) {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    let guard = tracing::subscriber::set_default(subscriber);
    (capture, guard)
}

/// Polls `check` until it holds or `within` has passed.
async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Logs

#[tokio::test(flavor = "current_thread")]
async fn echo_logs_each_statement_with_params_and_elapsed() {
    let (logs, _guard) = capture();
    let pool = Pool::new(Settings {
        echo: true,
        ..settings()
    })
    .unwrap();
    let conn = pool.get().await.unwrap();
    let row = conn
        .query_one("SELECT $1::int + 1", &[&41i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert!(conn.query_one("SELECT nope", &[]).await.is_err());

    let echoed = logs.find(SQL_TARGET, "statement");
    let select = echoed
        .iter()
        .find(|r| r.field("sql") == "SELECT $1::int + 1")
        .expect("the statement is echoed");
    assert_eq!(select.level, Level::INFO);
    assert_eq!(select.field("params"), "[41]");
    let elapsed: f64 = select.field("elapsed_ms").parse().unwrap();
    assert!(elapsed >= 0.0);

    let failed = logs.find(SQL_TARGET, "statement failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].level, Level::INFO);
    assert_eq!(failed[0].field("sql"), "SELECT nope");
    assert!(failed[0].field("error").contains("nope"), "{:?}", failed[0]);
}

#[tokio::test(flavor = "current_thread")]
async fn echo_pool_logs_pool_events_with_their_levels() {
    let (logs, _guard) = capture();
    let pool = Pool::new(Settings {
        echo_pool: true,
        pool_size: 1,
        max_overflow: Some(1),
        application_name: Some("tidepool-echo-pool".into()),
        ..settings()
    })
    .unwrap();

    // Two at once: the second is an overflow connection, closed when it comes back while the
    // first is idle.
    let a = pool.get().await.unwrap();
    let b = pool.get().await.unwrap();
    let (a_id, b_id) = (a.id(), b.id());
    drop(a);
    drop(b);
    let pool_records = |message: &str| logs.find(POOL_TARGET, message);
    assert!(
        eventually(Duration::from_secs(5), || !pool_records(
            "closed (overflow: pool_size connections already idle)"
        )
        .is_empty())
        .await
    );
    let overflow = &pool_records("closed (overflow: pool_size connections already idle)")[0];
    assert_eq!(overflow.level, Level::DEBUG);
    assert_eq!(overflow.field("reason"), "overflow");
    assert_eq!(overflow.field("connection"), b_id.to_string());
    let created = pool_records("created new connection");
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(created[0].field("connection"), a_id.to_string());
    assert_eq!(created[0].field("overflow"), "0");
    let overflowed = pool_records("created overflow connection (beyond pool_size)");
    assert_eq!(overflowed.len(), 1, "{overflowed:?}");
    assert_eq!(overflowed[0].level, Level::DEBUG);
    assert_eq!(overflowed[0].field("connection"), b_id.to_string());
    assert_eq!(overflowed[0].field("overflow"), "1");
    for message in ["checked out from pool", "being returned to pool"] {
        let records = pool_records(message);
        assert!(records.len() >= 2, "{message}: {records:?}");
        assert!(records.iter().all(|r| r.level == Level::DEBUG));
    }

    // A terminated backend: seen at the next checkout, every older connection invalidated.
    let killer = tokio_postgres_connect().await;
    killer
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'tidepool-echo-pool'",
            &[],
        )
        .await
        .unwrap();
    let invalidated = || {
        logs.on(POOL_TARGET)
            .into_iter()
            .filter(|r| r.message().starts_with("invalidated"))
            .collect::<Vec<_>>()
    };
    // The next checkouts find the connection closed (or failing its pre-ping).
    let deadline = Instant::now() + Duration::from_secs(10);
    while invalidated().is_empty() && Instant::now() < deadline {
        drop(pool.get().await.unwrap());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let invalidated = invalidated();
    assert!(!invalidated.is_empty(), "no invalidation within 10 s");
    assert_eq!(invalidated[0].level, Level::INFO);
    assert_eq!(invalidated[0].field("connection"), a_id.to_string());

    // dispose(): INFO for the disposal and for each connection it closes.
    let c = pool.get().await.unwrap();
    drop(c);
    pool.dispose();
    let disposed = pool_records("pool disposed");
    assert_eq!(disposed.len(), 1);
    assert_eq!(disposed[0].level, Level::INFO);
    let closed: Vec<_> = pool_records("closed")
        .into_iter()
        .filter(|r| r.field("reason") == "disposed")
        .collect();
    assert!(!closed.is_empty());
    assert!(closed.iter().all(|r| r.level == Level::INFO));
}

/// A plain connection outside any pool (for server-side actions in tests).
async fn tokio_postgres_connect() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&cluster().url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

#[tokio::test(flavor = "current_thread")]
async fn recycled_connections_are_logged_at_info() {
    let (logs, _guard) = capture();
    let pool = Pool::new(Settings {
        echo_pool: true,
        pool_size: 1,
        recycle: Some(Duration::from_millis(50)),
        ..settings()
    })
    .unwrap();
    let recycled = || {
        logs.find(POOL_TARGET, "closed")
            .into_iter()
            .any(|r| r.field("reason") == "recycled")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !recycled() && Instant::now() < deadline {
        drop(pool.get().await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let records: Vec<_> = logs
        .find(POOL_TARGET, "closed")
        .into_iter()
        .filter(|r| r.field("reason") == "recycled")
        .collect();
    assert!(!records.is_empty(), "no recycle within 10 s");
    assert_eq!(records[0].level, Level::INFO);
}

#[tokio::test(flavor = "current_thread")]
async fn slow_query_warning_carries_the_seed_fields() {
    let (logs, _guard) = capture();
    let pool = Pool::new(Settings {
        slow_query_threshold: Duration::from_millis(100),
        ..settings()
    })
    .unwrap();
    let conn = pool.get().await.unwrap();
    conn.query_one("SELECT 1", &[]).await.unwrap();
    conn.execute("SELECT pg_sleep(0.25)", &[]).await.unwrap();

    let slow = logs.find(SQL_TARGET, "Slow query detected");
    assert_eq!(slow.len(), 1, "only the slow statement: {slow:?}");
    let record = &slow[0];
    assert_eq!(record.level, Level::WARN);
    let names: Vec<&str> = record.fields.keys().map(String::as_str).collect();
    assert_eq!(names, ["duration_ms", "message", "query", "threshold_ms"]);
    assert_eq!(record.field("query"), "SELECT pg_sleep(0.25)");
    let duration: u64 = record.field("duration_ms").parse().unwrap();
    assert!(duration >= 250, "{duration}");
    assert_eq!(record.field("threshold_ms"), "100");
    assert!(
        logs.find(SQL_TARGET, "Slow query plan").is_empty(),
        "EXPLAIN is off by default"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn slow_query_explain_logs_the_plan_without_running_it_again() {
    let (logs, _guard) = capture();
    let pool = Pool::new(Settings {
        slow_query_threshold: Duration::from_millis(100),
        slow_query_explain: true,
        ..settings()
    })
    .unwrap();
    let mut conn = pool.get().await.unwrap();
    conn.batch_execute("CREATE TEMP TABLE explained (n int)")
        .await
        .unwrap();

    // Inside a transaction, on a temp table, with a parameter: the plan comes from the same
    // session, and the transaction carries on afterwards.
    let tx = conn.transaction().await.unwrap();
    let inserted = tx
        .execute(
            "INSERT INTO explained SELECT $1::int FROM pg_sleep(0.2)",
            &[&7i32],
        )
        .await
        .unwrap();
    assert_eq!(inserted, 1);
    let count: i64 = tx
        .query_one("SELECT count(*) FROM explained", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1, "EXPLAIN without ANALYZE does not insert again");
    tx.commit().await.unwrap();

    let plans = logs.find(SQL_TARGET, "Slow query plan");
    assert_eq!(plans.len(), 1, "{plans:?}");
    let plan = &plans[0];
    assert_eq!(plan.level, Level::WARN);
    assert_eq!(
        plan.field("query"),
        "INSERT INTO explained SELECT $1::int FROM pg_sleep(0.2)"
    );
    let text = plan.field("plan");
    assert!(text.contains("Insert on explained"), "{text}");
    assert!(text.contains("Function Scan on pg_sleep"), "{text}");
    assert!(!text.contains("actual time"), "never ANALYZE: {text}");
    assert_eq!(logs.find(SQL_TARGET, "Slow query detected").len(), 1);

    // Statements EXPLAIN cannot take are left alone.
    conn.execute("DO $$ BEGIN PERFORM pg_sleep(0.15); END $$", &[])
        .await
        .unwrap();
    assert_eq!(logs.find(SQL_TARGET, "Slow query plan").len(), 1);
    assert_eq!(logs.find(SQL_TARGET, "Slow query detected").len(), 2);
    // The connection is still in a usable state.
    let one: i32 = conn.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn nothing_is_logged_when_observability_is_off() {
    let (logs, _guard) = capture();
    let pool = Pool::new(Settings {
        pool_size: 1,
        max_overflow: Some(1),
        slow_query_explain: false,
        ..settings()
    })
    .unwrap();
    let a = pool.get().await.unwrap();
    let b = pool.get().await.unwrap();
    a.query_one("SELECT $1::int", &[&1i32]).await.unwrap();
    assert!(b.query_one("SELECT nope", &[]).await.is_err());
    b.execute("SELECT pg_sleep(0.05)", &[]).await.unwrap();
    drop(a);
    drop(b);
    pool.dispose();
    drop(pool.get().await.unwrap());
    pool.close();
    let ours: Vec<_> = logs
        .records()
        .into_iter()
        .filter(|r| r.target.starts_with("tidepool"))
        .collect();
    assert!(ours.is_empty(), "{ours:?}");
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// A minimal recorder: counters, gauges and histogram sample counts by rendered key.
#[derive(Default, Clone)]
struct TestRecorder {
    counters: Arc<Mutex<BTreeMap<String, Arc<AtomicU64>>>>,
    gauges: Arc<Mutex<BTreeMap<String, Arc<AtomicU64>>>>,
    histograms: Arc<Mutex<BTreeMap<String, Arc<Samples>>>>,
}

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl metrics::HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

fn render(key: &metrics::Key) -> String {
    let labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    if labels.is_empty() {
        key.name().to_string()
    } else {
        format!("{}{{{}}}", key.name(), labels.join(","))
    }
}

impl metrics::Recorder for TestRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let c = self
            .counters
            .lock()
            .unwrap()
            .entry(render(key))
            .or_default()
            .clone();
        metrics::Counter::from_arc(c)
    }

    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        let g = self
            .gauges
            .lock()
            .unwrap()
            .entry(render(key))
            .or_default()
            .clone();
        metrics::Gauge::from_arc(g)
    }

    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        let h = self
            .histograms
            .lock()
            .unwrap()
            .entry(render(key))
            .or_default()
            .clone();
        metrics::Histogram::from_arc(h)
    }
}

impl TestRecorder {
    fn counter(&self, key: &str) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .get(key)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn gauge(&self, key: &str) -> f64 {
        let bits = self
            .gauges
            .lock()
            .unwrap()
            .get(key)
            .map(|g| g.load(Ordering::Relaxed));
        f64::from_bits(bits.unwrap_or_else(|| panic!("no gauge {key}")))
    }

    fn samples(&self, key: &str) -> Vec<f64> {
        self.histograms
            .lock()
            .unwrap()
            .get(key)
            .map_or_else(Vec::new, |h| h.0.lock().unwrap().clone())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn metrics_are_recorded_through_the_facade() {
    let recorder = TestRecorder::default();
    // Handles are registered when the pool is built: with this recorder in place.
    let pool = metrics::with_local_recorder(&recorder, || {
        Pool::new(Settings {
            pool_size: 2,
            max_overflow: Some(0),
            slow_query_threshold: Duration::from_millis(50),
            pool_timeout: Duration::from_millis(200),
            ..settings()
        })
    })
    .unwrap();

    let conn = pool.get().await.unwrap();
    conn.query_one("SELECT 1", &[]).await.unwrap();
    conn.execute("SELECT pg_sleep(0.1)", &[]).await.unwrap();
    assert!(conn.query_one("SELECT nope", &[]).await.is_err());
    assert!(conn.query_one("SELECT 1/0", &[]).await.is_err());
    let held = pool.get().await.unwrap();
    assert!(pool.get().await.is_err(), "2 of 2 held: times out");

    let durations = recorder.samples(&format!("{}{{role=primary}}", instrument::QUERY_DURATION));
    assert_eq!(durations.len(), 4, "{durations:?}");
    assert!(durations.iter().any(|d| *d >= 0.1));
    assert_eq!(
        recorder
            .samples(&format!("{}{{role=primary}}", instrument::CHECKOUT_WAIT))
            .len(),
        2
    );
    assert_eq!(
        recorder.counter(&format!("{}{{role=primary}}", instrument::SLOW_QUERIES)),
        1
    );
    assert_eq!(
        recorder.counter(
            "tidepool_errors_total{role=primary,class=syntax_error_or_access_rule_violation}"
        ),
        1
    );
    assert_eq!(
        recorder.counter("tidepool_errors_total{role=primary,class=data_exception}"),
        1
    );
    assert_eq!(
        recorder.counter("tidepool_errors_total{role=primary,class=connect}"),
        0
    );

    // The pool's figures, published on demand.
    metrics::with_local_recorder(&recorder, || instrument::record_pool_metrics(&pool));
    assert_eq!(
        recorder.gauge("tidepool_connections{role=primary,state=in_use}"),
        2.0
    );
    assert_eq!(
        recorder.gauge("tidepool_connections{role=primary,state=idle}"),
        0.0
    );
    assert_eq!(
        recorder.gauge(&format!("{}{{role=primary}}", instrument::CONNECTIONS_OPEN)),
        2.0
    );
    assert_eq!(
        recorder.gauge(&format!("{}{{role=primary}}", instrument::POOL_SIZE)),
        2.0
    );
    assert_eq!(
        recorder.gauge(&format!("{}{{role=primary}}", instrument::MAX_OVERFLOW)),
        0.0
    );
    assert_eq!(
        recorder.gauge(&format!("{}{{role=primary}}", instrument::OVERFLOW)),
        0.0
    );
    assert_eq!(
        recorder.gauge(&format!("{}{{role=primary}}", instrument::WAITING)),
        0.0
    );
    assert_eq!(
        recorder.counter(&format!("{}{{role=primary}}", instrument::TIMEOUTS)),
        1
    );
    assert_eq!(
        recorder.counter(&format!(
            "{}{{role=primary}}",
            instrument::CONNECTIONS_CREATED
        )),
        2
    );
    drop(conn);
    drop(held);
    pool.dispose();
    metrics::with_local_recorder(&recorder, || instrument::record_pool_metrics(&pool));
    assert_eq!(
        recorder.counter("tidepool_connections_closed_total{role=primary,reason=disposed}"),
        2
    );
    assert_eq!(
        recorder.counter("tidepool_connections_closed_total{role=primary,reason=overflow}"),
        0
    );
    assert_eq!(
        recorder.gauge(&format!("{}{{role=primary}}", instrument::CONNECTIONS_OPEN)),
        0.0
    );

    // A server that refuses connections counts as a connect error.
    let refused = metrics::with_local_recorder(&recorder, || {
        Pool::new(Settings {
            database_url: Some(DatabaseUrl::parse("postgresql://u:p@127.0.0.1:1/db").unwrap()),
            pool_timeout: Duration::from_millis(200),
            ..Settings::default()
        })
    })
    .unwrap();
    assert!(refused.get().await.is_err());
    assert!(recorder.counter("tidepool_errors_total{role=primary,class=connect}") >= 1);
}

// ---------------------------------------------------------------------------------------------
// axum

/// Serves `app` on a free loopback port in the background.
async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Runs a blocking HTTP call off the runtime thread.
async fn get(addr: SocketAddr, path: &str) -> Response {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || http_get(addr, &path, Duration::from_secs(2)))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("GET: {e}"))
}

async fn answer(db: tidepool::axum::Db) -> Result<String, tidepool::Error> {
    let row = db.query_one("SELECT 41 + 1", &[]).await?;
    Ok(row.get::<_, i32>(0).to_string())
}

async fn broken(db: tidepool::axum::Db) -> Result<String, tidepool::Error> {
    db.query_one("SELECT * FROM no_such_table_here", &[])
        .await?;
    Ok(String::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extractor_hands_out_connections_and_maps_errors() {
    use axum::routing::get as route;
    let pool = Pool::new(Settings {
        pool_size: 1,
        max_overflow: Some(0),
        pool_timeout: Duration::from_millis(200),
        ..settings()
    })
    .unwrap();
    let app = axum::Router::new()
        .route("/answer", route(answer))
        .route("/broken", route(broken))
        .with_state(pool.clone());
    let addr = serve(app).await;

    let ok = get(addr, "/answer").await;
    assert_eq!((ok.status, ok.body.as_str()), (200, "42"));

    // A database error: 500, a generic body, nothing of the statement or the server's message.
    let failed = get(addr, "/broken").await;
    assert_eq!(failed.status, 500);
    assert_eq!(
        failed.json(),
        serde_json::json!({"detail": "Internal Server Error"})
    );
    assert!(!failed.body.contains("no_such_table_here"));
    assert!(!failed.body.contains(cluster().password()));

    // The pool exhausted: the checkout times out, 503 with Retry-After.
    let held = pool.get().await.unwrap();
    let busy = get(addr, "/answer").await;
    assert_eq!(busy.status, 503);
    assert_eq!(busy.header("retry-after"), Some("1"));
    assert_eq!(
        busy.json(),
        serde_json::json!({"detail": "Service Unavailable"})
    );
    drop(held);
    assert_eq!(get(addr, "/answer").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_within_2s_when_held_connections_exhaust_the_pool() {
    use axum::routing::get as route;
    let pool = Pool::new(Settings {
        pool_size: 1,
        max_overflow: Some(1),
        ..settings()
    })
    .unwrap();
    assert_eq!(pool.settings().pool_timeout, Duration::from_secs(30));
    let app = axum::Router::new()
        .route("/health/database", route(tidepool::axum::database_health))
        .with_state(pool.clone());
    let addr = serve(app).await;

    let healthy = get(addr, "/health/database").await;
    assert_eq!(healthy.status, 200);
    assert_eq!(healthy.json()["status"], "healthy");

    let held = [pool.get().await.unwrap(), pool.get().await.unwrap()];
    // `get` fails if no answer came within its 2 s client timeout.
    let exhausted = get(addr, "/health/database").await;
    assert_eq!(exhausted.status, 503);
    let body = exhausted.json();
    assert_eq!(body["status"], "unhealthy");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("2 of 2 connections checked out"), "{error}");
    assert_eq!(body["cause"], "pool_exhausted", "{body}");
    assert_eq!(body.as_object().unwrap().len(), 3, "{body}");

    drop(held);
    assert_eq!(get(addr, "/health/database").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_health_checks_answer_in_time_and_hold_one_connection() {
    use axum::routing::get as route;
    let pool = Pool::new(Settings {
        pool_size: 1,
        max_overflow: Some(0),
        ..settings()
    })
    .unwrap();
    let check = tidepool::axum::HealthCheck::new(pool.clone());
    let app = axum::Router::new().route("/health/database", route(move || check.clone().answer()));
    let addr = serve(app).await;

    // Many probes at once: all healthy, and health checks never needed a second connection.
    let answers =
        futures_util::future::join_all((0..20).map(|_| get(addr, "/health/database"))).await;
    for answer in &answers {
        assert_eq!(answer.status, 200, "{}", answer.body);
        let body = answer.json();
        assert_eq!(body["status"], "healthy");
        assert_eq!(
            body["checked_in"].as_i64().unwrap() + body["checked_out"].as_i64().unwrap(),
            body["total_connections"].as_i64().unwrap()
        );
    }
    assert_eq!(pool.status().connections_created, 1);

    // The only connection held elsewhere: every probe still answers within 2 s, 503.
    let held = pool.get().await.unwrap();
    let answers =
        futures_util::future::join_all((0..5).map(|_| get(addr, "/health/database"))).await;
    for answer in &answers {
        assert_eq!(answer.status, 503, "{}", answer.body);
        assert!(answer.json()["error"]
            .as_str()
            .unwrap()
            .contains("1 of 1 connections checked out"));
    }
    drop(held);
    assert_eq!(get(addr, "/health/database").await.status, 200);
}
