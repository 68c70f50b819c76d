//! `tidepool bench`: the seed's load test as a tool (DESIGN §6).
//!
//! `concurrency` tasks share one pool built from the same settings as `serve` (the embedded
//! database when `DATABASE_URL` is unset). Each takes the next request, checks out a connection,
//! runs the query and returns the connection, until `--requests` have been taken or
//! `--duration` has passed (requests in flight then finish). The measured loop does nothing
//! else: timings go to a small per-task buffer flushed into shared histograms every
//! [`BATCH`] requests, errors are counted by class, and a separate task samples the pool's
//! figures (peak overflow) and drives the progress bar.
//!
//! Exit status: 0 when every request succeeded; 1 when any failed (the summary says how many
//! and shows an example); 2 when it could not run (bad settings, no database, warm-up failed);
//! 130/143 when stopped by SIGINT/SIGTERM, after the embedded database (if any) was stopped
//! and removed.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tidepool::{Error, Pool, RetryPolicy, Settings};

/// Requests a task times before it flushes them into the shared histograms.
const BATCH: usize = 256;
/// How often the pool's figures are sampled and the progress bar redrawn.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);
/// Histogram range in microseconds: 1 µs to 1 hour.
const HIST_MAX_US: u64 = 3_600_000_000;

/// Options of `tidepool bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Requests in flight at once (tasks sharing the pool).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// Total requests to run.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "duration")]
    pub requests: u64,
    /// Run for this many seconds instead of a number of requests (requests in flight at the
    /// end finish).
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub duration: Option<f64>,
    /// The statement each request runs.
    #[arg(long, default_value = "SELECT pg_sleep(0.1), 1")]
    pub query: String,
    /// Open `DB_POOL_SIZE` connections before the clock starts.
    #[arg(long)]
    pub warmup: bool,
    /// Print one JSON object on stdout instead of the summary (no progress bar).
    #[arg(long)]
    pub json: bool,
    /// Run every request under the seed's retry policy (3 attempts, waits of 1 s then 2 s,
    /// transient failures only); each retry is logged at WARN on `tidepool::retry`.
    #[arg(long)]
    pub retry: bool,
    /// Run the queries through `pool.read()`: on the read replicas of `DATABASE_REPLICA_URL`
    /// (least busy first, falling back to the primary), in `READ ONLY` mode.
    #[arg(long)]
    pub read: bool,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1e9 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds greater than 0")),
    }
}

/// Runs the command.
pub fn main(args: Args) -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => return cannot_run(format!("invalid settings: {e}")),
    };
    if let Err(e) = init_tracing(&settings) {
        return cannot_run(e);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return cannot_run(format!("cannot start the async runtime: {e}")),
    };
    // SIGINT/SIGTERM stop the run, and the embedded database (if any) is still stopped and
    // removed: signals are handled from before it starts until after it is gone.
    let (database, result) = runtime.block_on(async {
        let mut stop = match Stop::new() {
            Ok(stop) => stop,
            Err(e) => return (None, Err(Interrupted::Error(e))),
        };
        // Holds the embedded cluster (if any) for the whole run; dropped last.
        let starting = tokio::task::spawn_blocking(move || crate::embedded::resolve(settings));
        let database = tokio::select! {
            started = starting => match started {
                Ok(Ok(db)) => db,
                Ok(Err(message)) => return (None, Err(Interrupted::Error(message))),
                Err(e) => return (None, Err(Interrupted::Error(format!("starting the database failed: {e}")))),
            },
            signal = stop.wait() => return (None, Err(Interrupted::Signal(signal))),
        };
        let embedded = database.cluster.is_some();
        let settings = database.settings.clone();
        let outcome = tokio::select! {
            result = async {
                if embedded {
                    prime(&settings).await;
                }
                run(&args, settings.clone()).await
            } => result.map_err(Interrupted::Error),
            signal = stop.wait() => Err(Interrupted::Signal(signal)),
        };
        (Some(database), outcome)
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    if let Some(database) = database {
        if let Some(cluster) = &database.cluster {
            tracing::info!(data_dir = %cluster.data_dir().display(), "embedded PostgreSQL stopped and removed");
        }
        drop(database);
    }
    let result = match result {
        Err(Interrupted::Signal(signal)) => {
            eprintln!("tidepool bench: stopped by {}", signal.name());
            return ExitCode::from(signal.exit_code());
        }
        Err(Interrupted::Error(message)) => Err(message),
        Ok(report) => Ok(report),
    };
    match result {
        Ok(report) => {
            if args.json {
                match serde_json::to_string(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => return cannot_run(format!("cannot encode the report: {e}")),
                }
            } else {
                print!("{}", report.human());
            }
            // Any failed request fails the run (the summary says which and why).
            if report.errors > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(message) => cannot_run(message),
    }
}

/// Why a run ended early.
enum Interrupted {
    Signal(StopSignal),
    Error(String),
}

/// The signal that stopped a run.
#[derive(Clone, Copy)]
enum StopSignal {
    Interrupt,
    Terminate,
}

impl StopSignal {
    fn name(self) -> &'static str {
        match self {
            StopSignal::Interrupt => "SIGINT",
            StopSignal::Terminate => "SIGTERM",
        }
    }

    /// 128 + the signal number, as a shell reports a process the signal ended.
    fn exit_code(self) -> u8 {
        match self {
            StopSignal::Interrupt => 130,
            StopSignal::Terminate => 143,
        }
    }
}

/// SIGINT and SIGTERM, handled instead of ending the process at once.
struct Stop {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Stop {
    fn new() -> Result<Stop, String> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Stop {
            interrupt: signal(SignalKind::interrupt())
                .map_err(|e| format!("cannot handle SIGINT: {e}"))?,
            terminate: signal(SignalKind::terminate())
                .map_err(|e| format!("cannot handle SIGTERM: {e}"))?,
        })
    }

    async fn wait(&mut self) -> StopSignal {
        tokio::select! {
            _ = self.interrupt.recv() => StopSignal::Interrupt,
            _ = self.terminate.recv() => StopSignal::Terminate,
        }
    }
}

fn cannot_run(message: String) -> ExitCode {
    eprintln!("tidepool bench: {message}");
    ExitCode::from(2)
}

/// Logging for the tools: the shared set-up's format (`LOG_FORMAT`) and filter (`RUST_LOG`,
/// `DB_ECHO`, `DB_ECHO_POOL`), written to standard error so that standard output carries only the
/// report (`--json` stays one parseable object). Does nothing if a subscriber is installed.
pub(crate) fn init_tracing(settings: &Settings) -> Result<(), String> {
    let format = crate::logging::Format::from_env()?;
    let filter = crate::logging::filter(settings)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true);
    let _ = match format {
        crate::logging::Format::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        crate::logging::Format::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    Ok(())
}

/// Connects once, outside the pool, to a server that has just started: its first backends
/// rebuild the relation cache from the catalogs (a freshly started server has no cache file),
/// which a long-running server never makes its clients pay. Without this the embedded default
/// would measure a cold server rather than the pool. Failures are left for the run to report.
async fn prime(settings: &Settings) {
    // One connection through the pool's own connect path, so TLS and every URL form work.
    let Ok(pool) = Pool::new(Settings {
        pool_size: 1,
        max_overflow: Some(0),
        application_name: Some("tidepool-bench-prime".into()),
        ..settings.clone()
    }) else {
        return;
    };
    let _ = tokio::time::timeout(settings.connect_timeout, pool.query_one("SELECT 1", &[])).await;
    pool.close();
}

/// When the run stops taking requests.
#[derive(Clone, Copy)]
enum Limit {
    Requests(u64),
    Until(Instant),
}

/// What the tasks share during the run.
struct Run {
    pool: Pool,
    query: String,
    /// `--retry`: the policy every request runs under.
    retry: Option<RetryPolicy>,
    /// `--read`: requests check out through `pool.read()`.
    read: bool,
    limit: Limit,
    /// Requests taken so far (for `Limit::Requests`).
    taken: AtomicU64,
    /// Requests finished so far (progress).
    finished: AtomicU64,
    timings: Mutex<Timings>,
}

/// Latency and checkout wait of successful requests, in microseconds.
struct Timings {
    latency: Histogram<u64>,
    wait: Histogram<u64>,
}

impl Timings {
    fn new() -> Timings {
        let h = || {
            Histogram::new_with_bounds(1, HIST_MAX_US, 3)
                .expect("constant histogram bounds are valid")
        };
        Timings {
            latency: h(),
            wait: h(),
        }
    }
}

/// Errors of one task: count and first message per class.
type Errors = BTreeMap<String, (u64, String)>;

/// What one task did.
#[derive(Default)]
struct TaskResult {
    ok: u64,
    errors: Errors,
}

/// One request under `--retry`: the checkout and the query inside [`Pool::run`], each attempt on
/// a fresh checkout.
/// Returns when the last attempt's checkout completed.
async fn request_with_retry(run: &Arc<Run>, policy: &RetryPolicy) -> Result<Instant, Error> {
    // Owned capture: the future must be `Send` (see `tidepool::retry`).
    let r = run.clone();
    run.pool
        .run(policy, async move |conn| {
            let checked_out = Instant::now();
            conn.query(r.query.as_str(), &[]).await?;
            Ok(checked_out)
        })
        .await
}

/// One request: check out, run the query, return the connection. Returns when the checkout
/// completed.
async fn request(pool: &Pool, query: &str) -> Result<Instant, Error> {
    let conn = pool.get().await?;
    let checked_out = Instant::now();
    conn.query(query, &[]).await?;
    Ok(checked_out)
}

/// [`request`] through `pool.read()`: a replica, or the primary when none is usable.
async fn read_request(pool: &Pool, query: &str) -> Result<Instant, Error> {
    let conn = pool.read().get().await?;
    let checked_out = Instant::now();
    conn.query(query, &[]).await?;
    Ok(checked_out)
}

/// [`read_request`] under `policy`: each attempt checks out through `pool.read()`.
async fn read_with_retry(run: &Arc<Run>, policy: &RetryPolicy) -> Result<Instant, Error> {
    let r = run.clone();
    run.pool
        .read()
        .run(policy, async move |conn| {
            let checked_out = Instant::now();
            conn.query(r.query.as_str(), &[]).await?;
            Ok(checked_out)
        })
        .await
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, HIST_MAX_US)
}

/// The measured loop of one task.
async fn worker(run: Arc<Run>) -> TaskResult {
    let mut result = TaskResult::default();
    let mut batch: Vec<(u64, u64)> = Vec::new();
    loop {
        match run.limit {
            Limit::Requests(n) => {
                if run.taken.fetch_add(1, Ordering::Relaxed) >= n {
                    break;
                }
            }
            Limit::Until(end) => {
                if Instant::now() >= end {
                    break;
                }
            }
        }
        let start = Instant::now();
        let outcome = match &run.retry {
            Some(policy) if run.read => read_with_retry(&run, policy).await,
            Some(policy) => request_with_retry(&run, policy).await,
            None if run.read => read_request(&run.pool, &run.query).await,
            None => request(&run.pool, &run.query).await,
        };
        match outcome {
            Ok(checked_out) => {
                let end = Instant::now();
                result.ok += 1;
                batch.push((micros(end - start), micros(checked_out - start)));
                if batch.len() >= BATCH {
                    flush(&run, &mut batch);
                }
            }
            Err(e) => {
                let entry = result
                    .errors
                    .entry(classify(&e))
                    .or_insert_with(|| (0, describe(&e)));
                entry.0 += 1;
            }
        }
        run.finished.fetch_add(1, Ordering::Relaxed);
    }
    flush(&run, &mut batch);
    result
}

fn flush(run: &Run, batch: &mut Vec<(u64, u64)>) {
    if batch.is_empty() {
        return;
    }
    let mut t = run.timings.lock().unwrap_or_else(|e| e.into_inner());
    for &(latency, wait) in batch.iter() {
        t.latency.saturating_record(latency);
        t.wait.saturating_record(wait);
    }
    batch.clear();
}

/// The error's class: `sqlstate_XX` (the SQLSTATE class, e.g. `sqlstate_22` for data
/// exceptions), `timeout` (no connection within `DB_POOL_TIMEOUT`), `connect` (could not
/// connect, or the connection was lost) or `other`.
fn classify(e: &Error) -> String {
    match e {
        Error::Timeout(_) => "timeout".to_owned(),
        Error::Connect(_) => "connect".to_owned(),
        _ => match e.code() {
            Some(code) if code.len() >= 2 && code.is_char_boundary(2) => {
                format!("sqlstate_{}", &code[..2])
            }
            _ if e.is_disconnect() => "connect".to_owned(),
            _ => "other".to_owned(),
        },
    }
}

/// The error with its causes, e.g. `ERROR: division by zero (SQLSTATE 22012)` rather than
/// tokio-postgres' bare `db error`.
fn describe(e: &Error) -> String {
    if let Error::Db(db) = e {
        if let Some(d) = db.as_db_error() {
            return format!(
                "{}: {} (SQLSTATE {})",
                d.severity(),
                d.message(),
                d.code().code()
            );
        }
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// The figures sampled during the run.
#[derive(Default)]
struct Peaks {
    overflow: Option<i64>,
    connections: usize,
}

/// The report, printed as JSON with `--json`.
#[derive(Debug, Serialize)]
struct Report {
    query: String,
    concurrency: u32,
    pool_size: usize,
    /// -1 for unlimited.
    max_overflow: i64,
    warmup: bool,
    /// Requests that can run at once: `min(pool_size + max_overflow, concurrency)`.
    capacity: u64,
    /// Connections the warm-up opened.
    warmup_opened: usize,
    /// `--duration`, when given.
    duration_s: Option<f64>,
    requests: u64,
    ok: u64,
    errors: u64,
    errors_by_class: BTreeMap<String, u64>,
    /// The first message seen in each class.
    error_examples: BTreeMap<String, String>,
    wall_s: f64,
    throughput: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    checkout_wait_p50_ms: f64,
    checkout_wait_p99_ms: f64,
    connections_opened: u64,
    connections_closed: u64,
    peak_connections: usize,
    peak_overflow: i64,
    /// `pg_sleep(x)`'s argument, when the query has one.
    sleep_s: Option<f64>,
    /// `ceil(requests / capacity) × x`: the least wall time the run can take.
    floor_s: Option<f64>,
}

async fn run(args: &Args, settings: Settings) -> Result<Report, String> {
    let pool = Pool::new(settings).map_err(|e| format!("cannot build the pool: {e}"))?;
    let warmup_opened = if args.warmup {
        pool.warm_up()
            .await
            .map_err(|e| format!("warm-up failed: {e}"))?
    } else {
        0
    };
    let progress = progress_bar(args);
    let timings = Timings::new();
    let start = Instant::now();
    let limit = match args.duration {
        Some(s) => Limit::Until(start + Duration::from_secs_f64(s)),
        None => Limit::Requests(args.requests),
    };
    let run = Arc::new(Run {
        pool: pool.clone(),
        query: args.query.clone(),
        retry: args.retry.then(RetryPolicy::default),
        read: args.read,
        limit,
        taken: AtomicU64::new(0),
        finished: AtomicU64::new(0),
        timings: Mutex::new(timings),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn(sample(
        run.clone(),
        progress.clone(),
        start,
        args.duration,
        stopped,
    ));
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|_| tokio::spawn(worker(run.clone())))
        .collect();
    let mut ok = 0;
    let mut errors = Errors::new();
    for task in tasks {
        let r = task
            .await
            .map_err(|e| format!("a bench task failed: {e}"))?;
        ok += r.ok;
        for (class, (n, example)) in r.errors {
            errors.entry(class).or_insert((0, example)).0 += n;
        }
    }
    let wall = start.elapsed();
    let _ = stop.send(());
    let mut peaks = sampler.await.unwrap_or_default();
    if let Some(pb) = &progress {
        pb.finish_and_clear();
    }
    let status = pool.status();
    peaks.connections = peaks.connections.max(status.total_connections);
    let peak_overflow = peaks
        .overflow
        .unwrap_or(status.overflow)
        .max(status.overflow);
    pool.close();

    let timings = run.timings.lock().unwrap_or_else(|e| e.into_inner());
    let ms = |h: &Histogram<u64>, q: f64| {
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(q) as f64 / 1000.0
        }
    };
    let error_count: u64 = errors.values().map(|(n, _)| n).sum();
    let requests = ok + error_count;
    let sleep_s = pg_sleep_seconds(&args.query);
    // Requests that can run at once: the pool's capacity, or the concurrency if lower.
    let pool_capacity =
        u64::try_from(status.max_overflow).map_or(u64::MAX, |o| status.pool_size as u64 + o);
    let capacity = pool_capacity.min(u64::from(args.concurrency)).max(1);
    let floor_s = sleep_s.map(|x| requests.div_ceil(capacity) as f64 * x);
    let wall_s = wall.as_secs_f64();
    Ok(Report {
        query: args.query.clone(),
        concurrency: args.concurrency,
        pool_size: status.pool_size,
        max_overflow: status.max_overflow,
        warmup: args.warmup,
        capacity,
        warmup_opened,
        duration_s: args.duration,
        requests,
        ok,
        errors: error_count,
        errors_by_class: errors.iter().map(|(k, (n, _))| (k.clone(), *n)).collect(),
        error_examples: errors.into_iter().map(|(k, (_, m))| (k, m)).collect(),
        wall_s,
        throughput: if wall_s > 0.0 {
            requests as f64 / wall_s
        } else {
            0.0
        },
        p50_ms: ms(&timings.latency, 0.50),
        p95_ms: ms(&timings.latency, 0.95),
        p99_ms: ms(&timings.latency, 0.99),
        max_ms: ms(&timings.latency, 1.0),
        checkout_wait_p50_ms: ms(&timings.wait, 0.50),
        checkout_wait_p99_ms: ms(&timings.wait, 0.99),
        connections_opened: status.connections_created,
        connections_closed: status.connections_closed.total(),
        peak_connections: peaks.connections,
        peak_overflow,
        sleep_s,
        floor_s,
    })
}

fn progress_bar(args: &Args) -> Option<ProgressBar> {
    if args.json || !std::io::stderr().is_terminal() {
        return None;
    }
    let (len, template) = match args.duration {
        Some(s) => (
            (s * 1000.0) as u64,
            "{bar:40.cyan/blue} {elapsed_precise} {msg}",
        ),
        None => (
            args.requests,
            "{bar:40.cyan/blue} {pos}/{len} requests {msg}",
        ),
    };
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    Some(pb)
}

/// Samples the pool's figures and redraws the progress bar until told to stop.
async fn sample(
    run: Arc<Run>,
    progress: Option<ProgressBar>,
    start: Instant,
    duration: Option<f64>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Peaks {
    let mut peaks = Peaks::default();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        let status = run.pool.status();
        peaks.overflow = Some(
            peaks
                .overflow
                .map_or(status.overflow, |p| p.max(status.overflow)),
        );
        peaks.connections = peaks.connections.max(status.total_connections);
        if let Some(pb) = &progress {
            let finished = run.finished.load(Ordering::Relaxed);
            match duration {
                Some(_) => {
                    pb.set_position(start.elapsed().as_millis() as u64);
                    pb.set_message(format!("{finished} requests"));
                }
                None => pb.set_position(finished),
            }
        }
    }
    peaks
}

/// `x` when the query calls `pg_sleep(x)` with a literal number.
fn pg_sleep_seconds(query: &str) -> Option<f64> {
    let lower = query.to_ascii_lowercase();
    let at = lower.find("pg_sleep(")? + "pg_sleep(".len();
    let rest = &lower[at..];
    let arg = &rest[..rest.find(')')?];
    let arg = arg.trim().trim_matches('\'');
    let arg = arg
        .split("::")
        .next()
        .unwrap_or(arg)
        .trim()
        .trim_matches('\'');
    arg.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite() && *x >= 0.0)
}

impl Report {
    /// The summary for a person.
    fn human(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let overflow = if self.max_overflow < 0 {
            "unlimited".to_owned()
        } else {
            self.max_overflow.to_string()
        };
        let _ = writeln!(
            s,
            "tidepool bench: {:?}, concurrency {}, pool {} + {overflow}{}",
            self.query,
            self.concurrency,
            self.pool_size,
            if self.warmup {
                format!(" (warm-up opened {})", self.warmup_opened)
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            s,
            "  requests       {} (ok {}, errors {})",
            self.requests, self.ok, self.errors
        );
        if self.errors > 0 {
            let (class, example) = self
                .error_examples
                .iter()
                .next()
                .map_or(("", ""), |(c, m)| (c.as_str(), m.as_str()));
            let _ = writeln!(
                s,
                "  FAILED         {} of {} requests failed (e.g. {class}: {example}); the \
                 figures below cover the successful ones",
                self.errors, self.requests
            );
        }
        let mut wall = format!("  wall time      {:.3} s", self.wall_s);
        if let Some(d) = self.duration_s {
            let _ = write!(wall, " (--duration {d} s)");
        }
        if let (Some(floor), Some(x)) = (self.floor_s, self.sleep_s) {
            let over = if floor > 0.0 {
                format!(", {:+.1}%", (self.wall_s / floor - 1.0) * 100.0)
            } else {
                String::new()
            };
            let _ = write!(
                wall,
                "   floor {floor:.3} s (ceil({} / {}) × {x} s{over})",
                self.requests, self.capacity
            );
        }
        let _ = writeln!(s, "{wall}");
        let _ = writeln!(s, "  throughput     {:.1} requests/s", self.throughput);
        let _ = writeln!(
            s,
            "  latency        p50 {:.2} ms   p95 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
            self.p50_ms, self.p95_ms, self.p99_ms, self.max_ms
        );
        let _ = writeln!(
            s,
            "  checkout wait  p50 {:.2} ms   p99 {:.2} ms",
            self.checkout_wait_p50_ms, self.checkout_wait_p99_ms
        );
        let _ = writeln!(
            s,
            "  connections    opened {}, closed {}, peak {} (peak overflow {})",
            self.connections_opened,
            self.connections_closed,
            self.peak_connections,
            self.peak_overflow
        );
        if !self.errors_by_class.is_empty() {
            let _ = writeln!(s, "  errors by class");
            for (class, n) in &self.errors_by_class {
                let example = self.error_examples.get(class).map_or("", String::as_str);
                let _ = writeln!(s, "    {class:<14} {n:>8}   e.g. {example}");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::pg_sleep_seconds;

    #[test]
    fn finds_the_sleep() {
        assert_eq!(pg_sleep_seconds("SELECT pg_sleep(0.1), 1"), Some(0.1));
        assert_eq!(pg_sleep_seconds("select PG_SLEEP( 2 )"), Some(2.0));
        assert_eq!(
            pg_sleep_seconds("select pg_sleep('0.5'::float8)"),
            Some(0.5)
        );
        assert_eq!(pg_sleep_seconds("SELECT 1"), None);
        assert_eq!(pg_sleep_seconds("SELECT pg_sleep($1)"), None);
    }
}
