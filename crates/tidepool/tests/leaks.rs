//! Leak detection (`DB_POOL_LEAK_THRESHOLD`) against a real PostgreSQL: a connection held past
//! the threshold is logged once at WARN with where it was checked out (this file and the line
//! of the call), at INFO when it comes back, counted in the figures and the metric, and listed
//! in `status().longest_checkouts` while held; a connection returned in time logs nothing; with
//! the setting off nothing is logged or listed.
//!
//! Log records are captured with a thread-local subscriber; every test runs on a current-thread
//! runtime so the pool's scan task logs on the capturing thread too.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tidepool::instrument::{self, POOL_TARGET};
use tidepool::{DatabaseUrl, Pool, PooledConnection, RetryPolicy, Settings, Status};
use tidepool_cluster::Cluster;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

const WARNING: &str = "connection held longer than DB_POOL_LEAK_THRESHOLD: possible leak";
const RETURNED: &str = "connection reported as a possible leak returned to pool";
const THRESHOLD: Duration = Duration::from_millis(200);

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| Cluster::start().expect("start PostgreSQL"))
}

fn settings(leak_threshold: Option<Duration>) -> Settings {
    Settings {
        database_url: Some(DatabaseUrl::parse(&cluster().url()).expect("cluster URL")),
        leak_threshold,
        ..Settings::default()
    }
}

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

    fn held_s(&self) -> f64 {
        self.field("held_s").parse().expect("held_s is a number")
    }
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Record>>>);

impl Capture {
    /// Records on the pool's target.
    fn pool(&self) -> Vec<Record> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.target == POOL_TARGET)
            .cloned()
            .collect()
    }

    fn find(&self, message: &str) -> Vec<Record> {
        self.pool()
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

/// Counters by rendered key (`name{label=value,...}`): what `record_pool_metrics` publishes.
#[derive(Default, Clone)]
struct Counters(Arc<Mutex<BTreeMap<String, Arc<AtomicU64>>>>);

impl metrics::Recorder for Counters {
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
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        let c = self.0.lock().unwrap().entry(name).or_default().clone();
        metrics::Counter::from_arc(c)
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

impl Counters {
    fn get(&self, key: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(key)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// `file:line:column` split into the file and the line.
fn file_and_line(location: &str) -> (&str, u32) {
    let mut parts = location.rsplitn(3, ':');
    let _column = parts.next();
    let line = parts.next().and_then(|l| l.parse().ok());
    let file = parts.next();
    match (file, line) {
        (Some(file), Some(line)) => (file, line),
        _ => panic!("not file:line:column: {location:?}"),
    }
}

/// Asserts that `location` is this file at `line`.
fn assert_here(location: &str, line: u32) {
    let (file, at) = file_and_line(location);
    assert!(
        file.ends_with("leaks.rs") && file.contains("tests"),
        "{location}"
    );
    assert_eq!(at, line, "{location}");
}

fn held_now(status: &Status, id: u64) -> Option<&tidepool::Checkout> {
    status.longest_checkouts.iter().find(|c| c.id == id)
}

#[tokio::test(flavor = "current_thread")]
async fn held_past_the_threshold_is_reported_once_with_where_it_was_checked_out() {
    let (logs, _guard) = capture();
    let pool = Pool::new(settings(Some(THRESHOLD))).unwrap();
    let (conn, line) = (pool.get().await.unwrap(), line!());
    conn.query_one("SELECT 1", &[]).await.unwrap();
    let id = conn.id();
    let checked_out = Instant::now();

    // Listed while held, before and after the threshold.
    let status = pool.status();
    let listed = held_now(&status, id).expect("listed while held");
    assert_here(&listed.location, line);
    assert!(listed.held_s < THRESHOLD.as_secs_f64(), "{listed:?}");

    assert!(
        eventually(Duration::from_secs(5), || !logs.find(WARNING).is_empty()).await,
        "no leak warning: {:?}",
        logs.pool()
    );
    assert!(
        checked_out.elapsed() >= THRESHOLD,
        "not before the threshold"
    );
    let warning = logs.find(WARNING).remove(0);
    assert_eq!(warning.level, Level::WARN);
    assert_eq!(warning.field("connection"), id.to_string());
    assert_here(warning.field("location"), line);
    assert!(warning.held_s() >= THRESHOLD.as_secs_f64(), "{warning:?}");
    assert_eq!(warning.field("threshold_s"), "0.2");

    // Held on for several more scans (the scenario itself): still one warning, one count.
    tokio::time::sleep(THRESHOLD * 2).await;
    assert_eq!(logs.find(WARNING).len(), 1, "{:?}", logs.pool());
    let status = pool.status();
    assert_eq!(status.leaks_suspected, 1);
    let listed = held_now(&status, id).expect("still listed");
    assert_here(&listed.location, line);
    assert!(listed.held_s >= 3.0 * THRESHOLD.as_secs_f64(), "{listed:?}");
    let counters = Counters::default();
    metrics::with_local_recorder(&counters, || instrument::record_pool_metrics(&pool));
    let key = format!("{}{{role=primary}}", instrument::LEAKS_SUSPECTED);
    assert_eq!(counters.get(&key), 1, "{key}");
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["leaks_suspected"], 1);
    assert_eq!(json["longest_checkouts"][0]["id"], id);

    // Coming back: INFO with how long it was held; no longer listed.
    drop(conn);
    let returned = logs.find(RETURNED);
    assert_eq!(returned.len(), 1, "{:?}", logs.pool());
    assert_eq!(returned[0].level, Level::INFO);
    assert_eq!(returned[0].field("connection"), id.to_string());
    assert_here(returned[0].field("location"), line);
    assert!(returned[0].held_s() >= 3.0 * THRESHOLD.as_secs_f64());
    assert!(pool.status().longest_checkouts.is_empty());

    // The same connection checked out again and returned quickly: nothing more.
    let again = pool.get().await.unwrap();
    assert_eq!(again.id(), id, "the idle connection is reused");
    drop(again);
    tokio::time::sleep(THRESHOLD).await;
    assert_eq!(logs.find(WARNING).len(), 1);
    assert_eq!(logs.find(RETURNED).len(), 1);
    assert_eq!(pool.status().leaks_suspected, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn returned_before_the_threshold_logs_nothing() {
    let (logs, _guard) = capture();
    let threshold = Duration::from_millis(400);
    let pool = Pool::new(settings(Some(threshold))).unwrap();
    for _ in 0..3 {
        let conn = pool.get().await.unwrap();
        assert!(held_now(&pool.status(), conn.id()).is_some());
        // Held through at least one scan (every 200 ms), returned in time.
        tokio::time::sleep(Duration::from_millis(250)).await;
        drop(conn);
    }
    // Scans after the returns find nothing held.
    tokio::time::sleep(threshold).await;
    let status = pool.status();
    assert_eq!(status.leaks_suspected, 0);
    assert!(status.longest_checkouts.is_empty());
    assert!(logs.pool().is_empty(), "{:?}", logs.pool());
}

#[tokio::test(flavor = "current_thread")]
async fn off_logs_and_lists_nothing() {
    let (logs, _guard) = capture();
    for off in [None, Some(Duration::ZERO)] {
        let pool = Pool::new(settings(off)).unwrap();
        assert_eq!(pool.settings().leak_threshold, None);
        let conn = pool.get().await.unwrap();
        tokio::time::sleep(THRESHOLD + Duration::from_millis(100)).await;
        let status = pool.status();
        assert!(status.longest_checkouts.is_empty(), "{status:?}");
        assert_eq!(status.leaks_suspected, 0);
        let json = serde_json::to_value(&status).unwrap();
        assert!(json.get("longest_checkouts").is_none(), "{json}");
        drop(conn);
    }
    assert!(logs.pool().is_empty(), "{:?}", logs.pool());
}

/// `read().get()`, `run` and `run_transaction` name their caller, not a line inside tidepool.
#[tokio::test(flavor = "current_thread")]
async fn other_checkouts_name_their_caller() {
    let (logs, _guard) = capture();
    let pool = Pool::new(settings(Some(THRESHOLD))).unwrap();
    let hold = THRESHOLD + Duration::from_millis(200);
    let warned_at = |n: usize| {
        let logs = logs.clone();
        async move {
            assert!(
                eventually(Duration::from_secs(5), || logs.find(WARNING).len() >= n).await,
                "no warning {n}: {:?}",
                logs.pool()
            );
            logs.find(WARNING)[n - 1].field("location").to_owned()
        }
    };

    let (read, line) = (pool.read().get().await.unwrap(), line!());
    assert_here(&warned_at(1).await, line);
    drop(read);

    let policy = RetryPolicy::never();
    let work = async |conn: &mut PooledConnection| {
        tokio::time::sleep(hold).await;
        conn.query_one("SELECT 1", &[]).await.map(|_| ())
    };
    let (run, line) = (pool.run(&policy, work), line!());
    run.await.unwrap();
    assert_here(&warned_at(2).await, line);

    let work = async |tx: &mut tidepool::Transaction<'_>| {
        tokio::time::sleep(hold).await;
        tx.execute("SELECT 1", &[]).await.map(|_| ())
    };
    let (run, line) = (pool.run_transaction(&policy, work), line!());
    run.await.unwrap();
    assert_here(&warned_at(3).await, line);

    assert_eq!(logs.find(RETURNED).len(), 3, "{:?}", logs.pool());
    assert_eq!(pool.status().leaks_suspected, 3);
}

/// The scan task ends on `close()`, and when the pool is dropped (it holds the pool weakly).
#[tokio::test(flavor = "current_thread")]
async fn the_scan_ends_with_the_pool() {
    let runtime = tokio::runtime::Handle::current();
    let tasks = move || runtime.metrics().num_alive_tasks();
    assert_eq!(tasks(), 0);

    let pool = Pool::new(settings(Some(THRESHOLD))).unwrap();
    drop(pool.get().await.unwrap());
    assert!(tasks() >= 2, "the connection's and the scan's");
    pool.close();
    assert!(
        eventually(Duration::from_secs(5), || tasks() == 0).await,
        "closed: {} tasks left",
        tasks()
    );
    assert!(pool.get().await.is_err());

    let pool = Pool::new(settings(Some(THRESHOLD))).unwrap();
    let conn = pool.get().await.unwrap();
    drop(pool);
    // The connection keeps the pool alive, and the scan with it.
    tokio::time::sleep(THRESHOLD * 2).await;
    assert!(tasks() >= 2);
    drop(conn);
    assert!(
        eventually(Duration::from_secs(5), || tasks() == 0).await,
        "dropped: {} tasks left",
        tasks()
    );
}
