//! `tidepool serve` end to end: the built binary against real PostgreSQL servers
//! (`tidepool_cluster`), real HTTP over loopback. Each test starts its own service on a free port
//! (`--bind 127.0.0.1:0`, the port read back from the log) with a clean environment and working
//! directory, and reads its JSON log lines.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use http::{http_get, Response};
use serde_json::Value;
use tidepool_cluster::{Cluster, ShutdownMode};

#[path = "../../tidepool/tests/support/http.rs"]
mod http;

/// The endpoint's contract: an answer within 2 s, whatever the database does.
const CONTRACT: Duration = Duration::from_secs(2);
/// Deadline for things that take their own time (start-up, a server coming back).
const PATIENCE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Support: the service process

/// Lines written by the service on stdout and stderr, in arrival order.
#[derive(Clone, Default)]
struct Output(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Output {
    fn push(&self, line: String) {
        let (lines, changed) = &*self.0;
        lines.lock().unwrap().push(line);
        changed.notify_all();
    }

    fn lines(&self) -> Vec<String> {
        self.0 .0.lock().unwrap().clone()
    }

    fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// The JSON log records (lines that parse as JSON objects).
    fn records(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(Value::is_object)
            .collect()
    }

    /// Waits until a record satisfies `pred`, up to `within`.
    fn wait_record(&self, within: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + within;
        let (lines, changed) = &*self.0;
        let mut guard = lines.lock().unwrap();
        loop {
            let found = guard
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|r| pred(r));
            if found.is_some() {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            guard = changed.wait_timeout(guard, left).unwrap().0;
        }
    }
}

fn message_is(record: &Value, message: &str) -> bool {
    record["message"].as_str() == Some(message)
}

/// A fresh, empty working directory (no `.env`), removed on drop.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> WorkDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tidepool-serve-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        WorkDir(dir)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `tidepool serve`. Killed (SIGKILL) on drop if still running.
struct Service {
    pid: i32,
    output: Output,
    exit: mpsc::Receiver<ExitStatus>,
    exited: Option<ExitStatus>,
    _dir: WorkDir,
}

impl Service {
    /// Starts the binary with only `PATH` and `env` in its environment.
    fn spawn(env: &[(&str, &str)]) -> Service {
        Service::spawn_as(env, None)
    }

    /// As [`Service::spawn`], with more `serve` arguments.
    fn spawn_with_args(env: &[(&str, &str)], args: &[&str]) -> Service {
        Service::start(env, args, None)
    }

    /// As [`Service::spawn`], optionally as another OS user (uid, gid).
    fn spawn_as(env: &[(&str, &str)], user: Option<(u32, u32)>) -> Service {
        Service::start(env, &[], user)
    }

    fn start(env: &[(&str, &str)], args: &[&str], user: Option<(u32, u32)>) -> Service {
        let dir = WorkDir::new();
        let mut command = Command::new(env!("CARGO_BIN_EXE_tidepool"));
        command
            .args(["serve", "--bind", "127.0.0.1:0"])
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().copied())
            .current_dir(&dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = user {
            use std::os::unix::fs::PermissionsExt;
            use std::os::unix::process::CommandExt;
            std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777)).unwrap();
            // std drops supplementary groups too when root sets a uid.
            command.uid(uid).gid(gid);
        }
        let mut child = command.spawn().expect("spawn tidepool");
        let output = Output::default();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    output.push(line);
                }
            });
        }
        let pid = child.id() as i32;
        let (tx, exit) = mpsc::channel();
        thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = tx.send(status);
            }
        });
        Service {
            pid,
            output,
            exit,
            exited: None,
            _dir: dir,
        }
    }

    /// Waits for the "listening" record and returns the address.
    fn address(&self) -> SocketAddr {
        let record = self
            .output
            .wait_record(PATIENCE, |r| {
                r["address"].is_string() && r["target"] == "tidepool::serve"
            })
            .unwrap_or_else(|| panic!("the service did not start:\n{}", self.output.text()));
        record["address"].as_str().unwrap().parse().unwrap()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid, signal) };
    }

    /// Waits for the process to exit, up to `within`.
    fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.exit.recv_timeout(within).ok();
        }
        self.exited
    }

    /// SIGTERM, then the exit status (the test fails if it takes longer than `PATIENCE`).
    fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(PATIENCE)
            .unwrap_or_else(|| panic!("no exit after SIGTERM:\n{}", self.output.text()))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.wait(Duration::ZERO).is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.wait(PATIENCE);
        }
    }
}

/// The environment of a service using `cluster`, JSON logs.
fn env_for(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", url.to_string()),
        ("LOG_FORMAT", "json".to_string()),
    ]
}

fn spawn_with(base: Vec<(&'static str, String)>, extra: &[(&str, &str)]) -> Service {
    let mut env: Vec<(&str, &str)> = base.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.extend_from_slice(extra);
    Service::spawn(&env)
}

// ---------------------------------------------------------------------------------------------
// Support: HTTP

fn get(addr: SocketAddr, path: &str) -> Response {
    http_get(addr, path, CONTRACT).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Polls `path` until it answers `status`, up to `within`.
fn wait_status(addr: SocketAddr, path: &str, status: u16, within: Duration) -> Response {
    let deadline = Instant::now() + within;
    loop {
        let last = http_get(addr, path, CONTRACT);
        match last {
            Ok(r) if r.status == status => return r,
            other if Instant::now() >= deadline => {
                panic!(
                    "{path} did not answer {status} within {within:?}; last: {:?}",
                    other.map(|r| (r.status, r.body))
                )
            }
            _ => thread::sleep(Duration::from_millis(50)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Support: Prometheus text

/// One sample: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text exposition format strictly enough to reject anything malformed:
/// `# HELP` / `# TYPE` comments, and `name{label="value",...} value` samples whose family was
/// declared by a `# TYPE` line first.
fn parse_prometheus(text: &str) -> Result<Vec<Sample>, String> {
    let valid_name = |s: &str| {
        !s.is_empty()
            && s.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = |what: &str| format!("line {}: {what}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !valid_name(name)
                        || !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind)
                    {
                        return Err(at("bad TYPE"));
                    }
                    types.insert(name.to_string(), kind.to_string());
                }
                (Some("HELP"), Some(name), _) if valid_name(name) => {}
                _ => return Err(at("bad comment")),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| at("no value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| at("bad value"))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .ok_or_else(|| at("unclosed labels"))?;
                let mut labels = BTreeMap::new();
                for pair in body.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').ok_or_else(|| at("bad label"))?;
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .ok_or_else(|| at("unquoted label value"))?;
                    if !valid_name(k) {
                        return Err(at("bad label name"));
                    }
                    labels.insert(k.to_string(), v.to_string());
                }
                (name, labels)
            }
        };
        if !valid_name(name) {
            return Err(at("bad metric name"));
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains_key(*f)))
            .unwrap_or(name);
        if !types.contains_key(family) {
            return Err(at("sample before its TYPE"));
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(samples)
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
        .value
}

fn scrape(addr: SocketAddr) -> Vec<Sample> {
    let response = get(addr, "/metrics");
    assert_eq!(response.status, 200);
    assert!(response
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    parse_prometheus(&response.body).unwrap_or_else(|e| panic!("{e}\n{}", response.body))
}

// ---------------------------------------------------------------------------------------------
// Support: a TCP proxy that can freeze

/// Forwards TCP connections to `target`; while frozen, it holds every byte (and every new
/// connection's start-up) without answering: a database that stopped responding.
struct Proxy {
    addr: SocketAddr,
    gate: Arc<Gate>,
}

/// Whether the proxy is frozen, and how many messages it is holding.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    frozen: bool,
    held: usize,
}

impl Proxy {
    fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Arc::new(Gate::default());
        let shared = gate.clone();
        thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let gate = shared.clone();
                    thread::spawn(move || pump(from, to, &gate));
                }
            }
        });
        Proxy { addr, gate }
    }

    fn set_frozen(&self, frozen: bool) {
        self.gate.state.lock().unwrap().frozen = frozen;
        self.gate.changed.notify_all();
    }

    /// Waits until the frozen proxy holds at least one message (someone is waiting on the
    /// database), up to `within`.
    fn wait_held(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut state = self.gate.state.lock().unwrap();
        while state.held == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self.gate.changed.wait_timeout(state, left).unwrap().0;
        }
        true
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, gate: &Gate) {
    let mut buf = [0u8; 16384];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut state = gate.state.lock().unwrap();
        if state.frozen {
            state.held += 1;
            gate.changed.notify_all();
            while state.frozen {
                state = gate.changed.wait(state).unwrap();
            }
            state.held -= 1;
        }
        drop(state);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

fn seed_fields_consistent(body: &Value) {
    let n = |k: &str| {
        body[k]
            .as_i64()
            .unwrap_or_else(|| panic!("{k} missing in {body}"))
    };
    assert_eq!(
        n("checked_in") + n("checked_out"),
        n("total_connections"),
        "{body}"
    );
    assert_eq!(
        n("total_connections"),
        n("pool_size") + n("overflow"),
        "{body}"
    );
}

// ---------------------------------------------------------------------------------------------
// 1. Healthy, with the seed's fields and consistent figures

#[test]
fn health_database_answers_the_seeds_fields_with_consistent_figures() {
    let cluster = Cluster::start().expect("start PostgreSQL");
    let mut service = spawn_with(
        env_for(&cluster.url()),
        &[("DB_POOL_SIZE", "3"), ("DB_MAX_OVERFLOW", "4")],
    );
    let addr = service.address();

    let live = get(addr, "/health");
    assert_eq!(live.status, 200);
    assert_eq!(live.json(), serde_json::json!({"status": "ok"}));

    for _ in 0..3 {
        let response = get(addr, "/health/database");
        assert_eq!(response.status, 200, "{}", response.body);
        assert_eq!(response.header("content-type"), Some("application/json"));
        let body = response.json();
        assert_eq!(body["status"], "healthy");
        for field in [
            "pool_size",
            "checked_in",
            "checked_out",
            "overflow",
            "total_connections",
        ] {
            assert!(body[field].is_i64(), "seed field {field} in {body}");
        }
        assert_eq!(body["pool_size"], 3);
        assert_eq!(body["max_overflow"], 4);
        assert_eq!(body["waiting"], 0);
        assert_eq!(body["timeouts"], 0);
        seed_fields_consistent(&body);
        // The check holds its connection while it reads the figures, as the seed's does.
        assert!(body["checked_out"].as_i64().unwrap() >= 1, "{body}");
        let total = body["total_connections"].as_i64().unwrap();
        assert!((1..=7).contains(&total), "{body}");
        let wait = &body["checkout_wait_ms"];
        let (p50, p95, p99) = (
            wait["p50"].as_f64().unwrap(),
            wait["p95"].as_f64().unwrap(),
            wait["p99"].as_f64().unwrap(),
        );
        assert!(0.0 <= p50 && p50 <= p95 && p95 <= p99, "{wait}");
    }
    assert!(service.terminate().success());
}

// ---------------------------------------------------------------------------------------------
// 2. The database stopped, then back

#[test]
fn stopped_database_is_503_within_2s_without_password_then_healthy_again() {
    let cluster = Cluster::start().expect("start PostgreSQL");
    let password = cluster.password().to_string();
    // Everything logged, pool events included, to look for the password everywhere.
    let mut service = spawn_with(
        env_for(&cluster.url()),
        &[
            ("RUST_LOG", "debug"),
            ("DB_ECHO", "true"),
            ("DB_ECHO_POOL", "true"),
        ],
    );
    let addr = service.address();
    assert_eq!(
        wait_status(addr, "/health/database", 200, PATIENCE).json()["status"],
        "healthy"
    );

    cluster.stop(ShutdownMode::Fast).expect("stop PostgreSQL");
    for _ in 0..3 {
        // `get` fails unless the answer arrives within the 2 s contract.
        let down = get(addr, "/health/database");
        assert_eq!(down.status, 503, "{}", down.body);
        let body = down.json();
        assert_eq!(body["status"], "unhealthy");
        assert!(!body["error"].as_str().unwrap().is_empty());
        assert_eq!(body["cause"], "database_down", "{body}");
        assert!(!down.body.contains(&password), "password in {}", down.body);
    }
    // Liveness does not depend on the database.
    assert_eq!(get(addr, "/health").status, 200);
    let samples = scrape(addr);
    assert!(value(&samples, "tidepool_errors_total", &[("class", "connect")]) >= 1.0);

    cluster.start_again().expect("start PostgreSQL again");
    let back = wait_status(addr, "/health/database", 200, PATIENCE).json();
    assert_eq!(back["status"], "healthy");
    seed_fields_consistent(&back);

    assert!(service.terminate().success());
    let logs = service.output.text();
    assert!(
        logs.contains("unhealthy") || logs.contains("health check failed"),
        "{logs}"
    );
    assert!(
        !logs.contains(&password),
        "the password appears in the logs"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. The pool exhausted by held connections

/// A fault proxy in front of `cluster`, and the database URL that goes through it.
fn behind_proxy(cluster: &Cluster) -> (Proxy, String) {
    let proxy = Proxy::start(format!("127.0.0.1:{}", cluster.port()).parse().unwrap());
    let url = format!(
        "postgresql://{}:{}@{}/{}",
        cluster.user(),
        cluster.password(),
        proxy.addr,
        cluster.dbname()
    );
    (proxy, url)
}

/// Starts a service through a proxy, freezes the proxy (the database stops answering while the
/// service's checks hold connections on it), sends `requests` concurrent checks and expects
/// every one to answer 503 within 2 s, at least one reporting all `capacity` connections
/// checked out; then thaws the proxy and expects the service to recover.
fn exhausted_pool_round_trip(
    capacity: usize,
    requests: usize,
    args: &[(&str, &str)],
    per_request: bool,
) {
    let cluster = Cluster::start().expect("start PostgreSQL");
    let (proxy, url) = behind_proxy(&cluster);
    let size = capacity.to_string();
    let mut env: Vec<(&str, &str)> = vec![
        ("DATABASE_URL", &url),
        ("LOG_FORMAT", "json"),
        ("DB_POOL_SIZE", &size),
        ("DB_MAX_OVERFLOW", "0"),
    ];
    env.extend_from_slice(args);
    let mut service = Service::spawn_with_args(
        &env,
        if per_request {
            &["--health-per-request"]
        } else {
            &[]
        },
    );
    let addr = service.address();
    assert_eq!(
        wait_status(addr, "/health/database", 200, PATIENCE).status,
        200
    );

    proxy.set_frozen(true);
    let checks: Vec<_> = (0..requests)
        .map(|_| thread::spawn(move || http_get(addr, "/health/database", CONTRACT)))
        .collect();
    let answers: Vec<Response> = checks
        .into_iter()
        .map(|c| {
            c.join()
                .unwrap()
                .unwrap_or_else(|e| panic!("no answer within 2 s: {e}"))
        })
        .collect();
    let full = format!("{capacity} of {capacity} connections checked out");
    let mut saw_exhausted = false;
    for answer in &answers {
        assert_eq!(answer.status, 503, "{}", answer.body);
        let body = answer.json();
        assert_eq!(body["status"], "unhealthy");
        saw_exhausted |=
            body["error"].as_str().unwrap().contains(&full) && body["cause"] == "pool_exhausted";
    }
    assert!(
        saw_exhausted,
        "{:?}",
        answers.iter().map(|a| &a.body).collect::<Vec<_>>()
    );

    proxy.set_frozen(false);
    assert_eq!(
        wait_status(addr, "/health/database", 200, PATIENCE).status,
        200
    );
    assert!(service.terminate().success());
}

#[test]
fn exhausted_pool_still_answers_within_2s() {
    // Shared checks (the default): the one connection is held by a check stuck on the silent
    // database; the next check finds the pool exhausted.
    exhausted_pool_round_trip(1, 6, &[], false);
}

#[test]
fn exhausted_pool_still_answers_within_2s_with_a_check_per_request() {
    // A checkout per request: the first two hold both connections, the others queue for one.
    exhausted_pool_round_trip(2, 6, &[], true);
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown

#[test]
fn sigterm_stops_accepting_and_lets_requests_in_flight_finish() {
    let cluster = Cluster::start().expect("start PostgreSQL");
    let (proxy, url) = behind_proxy(&cluster);
    let mut service = spawn_with(env_for(&url), &[]);
    let addr = service.address();
    // Start-up opens pool_size connections, then checks the connection budget, in the
    // background: let both finish, so that the only traffic the frozen proxy will hold is the
    // check below.
    let deadline = Instant::now() + PATIENCE;
    while wait_status(addr, "/health/database", 200, PATIENCE).json()["connections_created"] != 5 {
        assert!(Instant::now() < deadline, "the pool never warmed up");
        thread::sleep(Duration::from_millis(20));
    }
    service
        .output
        .wait_record(PATIENCE, |r| {
            message_is(r, "connection budget fits the server")
        })
        .expect("the start-up budget check finished");

    // A check in flight, stuck on the database, when SIGTERM arrives.
    proxy.set_frozen(true);
    let in_flight = thread::spawn(move || http_get(addr, "/health/database", CONTRACT));
    assert!(
        proxy.wait_held(PATIENCE),
        "the check never reached the database"
    );
    service.signal(libc::SIGTERM);
    service
        .output
        .wait_record(PATIENCE, |r| message_is(r, "stopped accepting connections"))
        .expect("the listening socket closed");

    // No new connections...
    assert!(
        TcpStream::connect_timeout(&addr, CONTRACT).is_err(),
        "still accepting"
    );
    // ...but the request in flight gets its answer.
    let answer = in_flight
        .join()
        .unwrap()
        .expect("the request in flight was answered");
    assert_eq!(answer.status, 503);
    assert_eq!(answer.json()["status"], "unhealthy");

    let status = service.wait(PATIENCE).expect("exit after shutdown");
    assert!(status.success(), "{status:?}");
    proxy.set_frozen(false);
}

// ---------------------------------------------------------------------------------------------
// 4. Echo, echo pool, slow query, plan; nothing when off

#[test]
fn echo_echo_pool_slow_query_and_plan_are_logged_when_on() {
    let cluster = Cluster::start().expect("start PostgreSQL");
    let mut service = spawn_with(
        env_for(&cluster.url()),
        &[
            ("DB_ECHO", "true"),
            ("DB_ECHO_POOL", "true"),
            ("DB_SLOW_QUERY_THRESHOLD", "0"),
            ("DB_SLOW_QUERY_EXPLAIN", "true"),
        ],
    );
    let addr = service.address();
    assert_eq!(get(addr, "/health/database").status, 200);
    let out = &service.output;
    let within = Duration::from_secs(10);

    let warning = out
        .wait_record(within, |r| {
            r["level"] == "WARN"
                && r["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("DB_ECHO=true"))
        })
        .expect("start-up warning about DB_ECHO");
    assert!(warning["message"]
        .as_str()
        .unwrap()
        .contains("not for production"));

    // The health check's own records: the start-up budget check's statements may come first.
    let echo = out
        .wait_record(within, |r| {
            r["target"] == "tidepool::sql" && message_is(r, "statement") && r["sql"] == "SELECT 1"
        })
        .expect("echo record");
    assert_eq!(echo["level"], "INFO");
    assert_eq!(echo["sql"], "SELECT 1");
    assert_eq!(echo["params"], "[]");
    assert!(echo["elapsed_ms"].as_f64().unwrap() >= 0.0);

    for message in [
        "created new connection",
        "checked out from pool",
        "being returned to pool",
    ] {
        let record = out
            .wait_record(within, |r| {
                r["target"] == "tidepool::pool" && message_is(r, message)
            })
            .unwrap_or_else(|| panic!("pool record {message:?}"));
        assert_eq!(record["level"], "DEBUG");
        assert!(record["connection"].is_u64());
    }

    let slow = out
        .wait_record(within, |r| {
            r["target"] == "tidepool::sql"
                && message_is(r, "Slow query detected")
                && r["query"] == "SELECT 1"
        })
        .expect("slow-query warning");
    assert_eq!(slow["level"], "WARN");
    assert_eq!(slow["query"], "SELECT 1");
    assert!(slow["duration_ms"].is_u64());
    assert_eq!(slow["threshold_ms"], 0);

    let plan = out
        .wait_record(within, |r| {
            r["target"] == "tidepool::sql"
                && message_is(r, "Slow query plan")
                && r["query"] == "SELECT 1"
        })
        .expect("slow-query plan");
    assert_eq!(plan["level"], "WARN");
    assert_eq!(plan["query"], "SELECT 1");
    assert!(
        plan["plan"].as_str().unwrap().starts_with("Result"),
        "{plan}"
    );

    // Closing the pool at shutdown closes its connections: INFO, reason disposed.
    assert!(service.terminate().success());
    assert!(service
        .output
        .wait_record(PATIENCE, |r| r["target"] == "tidepool::pool"
            && r["level"] == "INFO"
            && r["reason"] == "disposed")
        .is_some());
}

#[test]
fn nothing_is_logged_for_sql_or_pool_when_off() {
    let cluster = Cluster::start().expect("start PostgreSQL");
    // RUST_LOG=debug: even DEBUG records would show if there were any.
    let mut service = spawn_with(env_for(&cluster.url()), &[("RUST_LOG", "debug")]);
    let addr = service.address();
    for _ in 0..3 {
        assert_eq!(get(addr, "/health/database").status, 200);
    }
    assert!(service.terminate().success());
    // The reader of the service's output may still be catching up with its last lines.
    assert!(
        service
            .output
            .wait_record(PATIENCE, |r| message_is(r, "stopped"))
            .is_some(),
        "the log is captured"
    );
    let records = service.output.records();
    let ours: Vec<&Value> = records
        .iter()
        .filter(|r| {
            let target = r["target"].as_str().unwrap_or("");
            target == "tidepool::sql" || target == "tidepool::pool"
        })
        .collect();
    assert!(ours.is_empty(), "{ours:?}");
    assert!(!service.output.text().contains("not for production"));
}

// ---------------------------------------------------------------------------------------------
// 5. /metrics

#[test]
fn metrics_parse_as_prometheus_text_and_move_with_traffic() {
    let cluster = Cluster::start().expect("start PostgreSQL");
    let mut service = spawn_with(env_for(&cluster.url()), &[("DB_SLOW_QUERY_THRESHOLD", "0")]);
    let addr = service.address();
    assert_eq!(get(addr, "/health/database").status, 200);

    let before = scrape(addr);
    for _ in 0..5 {
        assert_eq!(get(addr, "/health/database").status, 200);
    }
    let after = scrape(addr);

    for name in [
        "tidepool_query_duration_seconds_count",
        "tidepool_checkout_wait_seconds_count",
        "tidepool_slow_queries_total",
    ] {
        let (a, b) = (value(&before, name, &[]), value(&after, name, &[]));
        assert!(b >= a + 5.0, "{name}: {a} -> {b}");
    }
    assert!(value(&after, "tidepool_connections_created_total", &[]) >= 1.0);
    assert_eq!(value(&after, "tidepool_pool_size", &[]), 5.0);
    assert_eq!(value(&after, "tidepool_pool_max_overflow", &[]), 10.0);
    let idle = value(&after, "tidepool_connections", &[("state", "idle")]);
    let in_use = value(&after, "tidepool_connections", &[("state", "in_use")]);
    assert_eq!(
        idle + in_use,
        value(&after, "tidepool_connections_open", &[])
    );
    assert_eq!(
        value(&after, "tidepool_connections_open", &[]),
        5.0 + value(&after, "tidepool_pool_overflow", &[])
    );
    assert_eq!(value(&after, "tidepool_pool_waiting", &[]), 0.0);
    assert_eq!(value(&after, "tidepool_pool_timeouts_total", &[]), 0.0);
    assert_eq!(value(&after, "tidepool_pre_ping_failures_total", &[]), 0.0);
    assert_eq!(
        value(
            &after,
            "tidepool_connections_closed_total",
            &[("reason", "overflow")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &after,
            "tidepool_errors_total",
            &[("class", "syntax_error_or_access_rule_violation")]
        ),
        0.0
    );

    // Histogram buckets are cumulative and end with +Inf == count.
    let buckets: Vec<&Sample> = after
        .iter()
        .filter(|s| s.name == "tidepool_query_duration_seconds_bucket")
        .collect();
    assert!(buckets.len() > 2);
    assert!(buckets.windows(2).all(|w| w[0].value <= w[1].value));
    let inf = buckets
        .iter()
        .find(|s| s.labels["le"] == "+Inf")
        .expect("+Inf bucket");
    assert_eq!(
        inf.value,
        value(&after, "tidepool_query_duration_seconds_count", &[])
    );
    assert!(service.terminate().success());
}

/// SIGHUP reads the settings again and resizes the pool: `DB_POOL_SIZE`/`DB_MAX_OVERFLOW`
/// changed in `.env` while the service runs show in `/health/database` after the signal, and
/// the service keeps answering.
#[test]
fn sighup_resizes_the_pool_from_dotenv() {
    let cluster = Cluster::start().expect("start PostgreSQL");
    let service = spawn_with(env_for(&cluster.url()), &[]);
    let addr = service.address();
    let before = wait_status(addr, "/health/database", 200, PATIENCE).json();
    assert_eq!(before["pool_size"], 5);
    std::fs::write(
        service._dir.0.join(".env"),
        "DB_POOL_SIZE=2\nDB_MAX_OVERFLOW=1\n",
    )
    .unwrap();
    service.signal(libc::SIGHUP);
    service
        .output
        .wait_record(PATIENCE, |r| message_is(r, "SIGHUP: pool resized"))
        .expect("the resize is logged");
    let after = wait_status(addr, "/health/database", 200, PATIENCE).json();
    assert_eq!(after["pool_size"], 2, "{after}");
    assert_eq!(after["max_overflow"], 1, "{after}");
    // Connections the start-up warm-up was still opening are closed as they come back.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = wait_status(addr, "/health/database", 200, PATIENCE).json();
        if now["total_connections"].as_u64().unwrap() <= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "never down to 2 + 1: {now}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// With a read replica, `/metrics` shows each pool: the primary's series with
/// `role="primary"`, the replica's with `role="replica"` and its `host` (the figures of its own
/// pool, statements timed on it), plus `tidepool_replica_up` and `tidepool_replica_lag_seconds`;
/// and `/health/database` lists it.
#[test]
fn metrics_and_health_show_each_replica() {
    let cluster = Cluster::start().expect("start PostgreSQL");
    let standby = cluster.standby().expect("start a standby");
    let host = format!("127.0.0.1:{}", standby.port());
    let mut service = spawn_with(
        env_for(&cluster.url()),
        &[
            ("DATABASE_REPLICA_URL", standby.url().as_str()),
            ("DB_REPLICA_POOL_SIZE", "3"),
        ],
    );
    let addr = service.address();
    let health = wait_status(addr, "/health/database", 200, Duration::from_secs(30)).json();
    let replicas = health["replicas"].as_array().expect("a replicas list");
    assert_eq!(replicas.len(), 1, "{health}");
    assert_eq!(replicas[0]["host"], host.as_str());
    assert_eq!(replicas[0]["pool_size"], 3);
    // The first lag measurement runs in the background: poll until the replica is measured.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let samples = loop {
        let samples = scrape(addr);
        let up = samples
            .iter()
            .any(|s| s.name == "tidepool_replica_up" && s.labels.get("host") == Some(&host));
        let lag = samples.iter().any(|s| {
            s.name == "tidepool_replica_lag_seconds" && s.labels.get("host") == Some(&host)
        });
        if up && lag {
            break samples;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replica never measured"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        value(&samples, "tidepool_replica_up", &[("host", &host)]),
        1.0
    );
    let replica = [("role", "replica"), ("host", host.as_str())];
    assert_eq!(value(&samples, "tidepool_pool_size", &replica), 3.0);
    assert_eq!(
        value(&samples, "tidepool_pool_size", &[("role", "primary")]),
        5.0
    );
    // The lag measurements ran on the replica's pool: its statements are counted there.
    assert!(value(&samples, "tidepool_query_duration_seconds_count", &replica) >= 1.0);
    assert!(service.terminate().success());
}

// ---------------------------------------------------------------------------------------------
// 6. The embedded default

/// Runs `tidepool serve` without `DATABASE_URL` (optionally as `user`), checks it becomes
/// healthy, then that SIGTERM makes it exit 0 leaving no server process and no data directory.
fn embedded_default_round_trip(user: Option<(u32, u32)>) {
    let mut service = Service::spawn_as(&[("LOG_FORMAT", "json")], user);
    let started = service
        .output
        .wait_record(PATIENCE, |r| {
            r["data_dir"].is_string() && r["target"] == "tidepool::embedded"
        })
        .unwrap_or_else(|| panic!("no embedded database:\n{}", service.output.text()));
    let data_dir = PathBuf::from(started["data_dir"].as_str().unwrap());
    assert!(
        started["url"].as_str().unwrap().contains(":***@"),
        "{started}"
    );
    let addr = service.address();
    let body = wait_status(addr, "/health/database", 200, PATIENCE).json();
    assert_eq!(body["status"], "healthy");
    seed_fields_consistent(&body);

    let postmaster =
        std::fs::read_to_string(data_dir.join("postmaster.pid")).expect("postmaster.pid");
    let pid: i32 = postmaster.lines().next().unwrap().trim().parse().unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists());

    let status = service.terminate();
    assert!(status.success(), "{status:?}\n{}", service.output.text());
    assert!(!data_dir.exists(), "{} left behind", data_dir.display());
    // The per-process directory holding the template and the cluster is gone too.
    let process_dir = data_dir
        .ancestors()
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("tidepool-pg-"))
        })
        .expect("the cluster lives under a tidepool-pg-* directory");
    assert!(
        !process_dir.exists(),
        "{} left behind",
        process_dir.display()
    );
    assert!(
        !postgres_running(pid, &data_dir),
        "PostgreSQL still running"
    );
}

/// Whether the postmaster `pid` still runs, or any process still names `data_dir`.
fn postgres_running(pid: i32, data_dir: &Path) -> bool {
    let needle = data_dir.to_string_lossy().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.filter_map(Result::ok).any(|e| {
        let name = e.file_name().to_string_lossy().to_string();
        let Ok(p) = name.parse::<i32>() else {
            return false;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        !zombie && ((p == pid && cmdline.contains("postgres")) || cmdline.contains(&needle))
    })
}

#[test]
fn embedded_default_is_healthy_and_sigterm_removes_it() {
    embedded_default_round_trip(None);
}

#[test]
fn embedded_default_works_as_an_ordinary_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Already an ordinary user: the test above covers it.
        return embedded_default_round_trip(None);
    }
    // As root: run the service as `nobody`, which then runs PostgreSQL itself.
    embedded_default_round_trip(Some((65534, 65534)));
}

// ---------------------------------------------------------------------------------------------
// 7. Bad settings

#[test]
fn bad_settings_exit_non_zero_naming_the_variable() {
    let cases: [(&str, &str); 7] = [
        ("DB_POOL_SIZE", "abc"),
        ("DB_MAX_OVERFLOW", "-5"),
        ("DB_POOL_PRE_PING", "maybe"),
        ("DB_SLOW_QUERY_THRESHOLD", "soon"),
        ("DATABASE_URL", "mysql://app:hunter2@db.example/app"),
        ("LOG_FORMAT", "xml"),
        ("RUST_LOG", "tidepool=loudest"),
    ];
    for (variable, bad) in cases {
        let mut env = vec![("RUST_BACKTRACE", "1"), (variable, bad)];
        if variable != "DATABASE_URL" {
            // Never reached: settings are checked before any database is started.
            env.push(("DATABASE_URL", "postgresql://app:hunter2@127.0.0.1:1/app"));
        }
        let mut service = Service::spawn(&env);
        let status = service.wait(PATIENCE).unwrap_or_else(|| {
            panic!(
                "{variable}={bad}: still running:\n{}",
                service.output.text()
            )
        });
        // The readers may still be draining the pipes: wait for the message itself.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !service.output.text().contains(variable) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let text = service.output.text();
        assert!(!status.success(), "{variable}={bad}: exit {status:?}");
        assert!(
            status.code().is_some(),
            "{variable}={bad}: killed by a signal: {status:?}"
        );
        assert!(
            text.contains(variable),
            "{variable}={bad}: message does not name it:\n{text}"
        );
        assert!(
            !text.contains("panicked"),
            "{variable}={bad}: panic:\n{text}"
        );
        assert!(
            !text.to_lowercase().contains("backtrace"),
            "{variable}={bad}:\n{text}"
        );
        assert!(
            !text.contains("hunter2"),
            "{variable}={bad}: password shown:\n{text}"
        );
        assert!(
            !text.contains("listening"),
            "{variable}={bad}: started anyway:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 8. TLS: DATABASE_URL with libpq's TLS parameters, against a TLS-only server

mod support;

#[test]
fn health_database_over_tls_and_refused_in_the_servers_words_without_it() {
    let cluster = support::tls_only_cluster(false);
    let password = cluster.password().to_string();

    // verify-full with the cluster's CA: healthy, and every backend of the service encrypted.
    let url = support::verify_full_url_own_ca(&cluster);
    let mut service = spawn_with(env_for(&url), &[("DB_APPLICATION_NAME", "serve-tls")]);
    let addr = service.address();
    for _ in 0..3 {
        let response = get(addr, "/health/database");
        assert_eq!(response.status, 200, "{}", response.body);
        let body = response.json();
        assert_eq!(body["status"], "healthy", "{body}");
        seed_fields_consistent(&body);
    }
    let (all, encrypted) = support::backends_by_ssl(&cluster, "serve-tls");
    assert!(
        encrypted > 0,
        "no encrypted backend of serve-tls ({all} in all)"
    );
    assert_eq!(encrypted, all, "backends of serve-tls without TLS");
    assert!(service.terminate().success());
    assert!(
        !service.output.text().contains(&password),
        "the password appears in the logs"
    );

    // sslmode=disable against the same server: serve starts anyway (a database that is not
    // reachable is only a start-up warning), and the check answers 503 with the server's own
    // refusal (pg_hba: "no encryption").
    let plain = format!("{}?sslmode=disable", cluster.url());
    let mut service = spawn_with(env_for(&plain), &[("DB_APPLICATION_NAME", "serve-plain")]);
    let addr = service.address();
    let started = Instant::now();
    let down = get(addr, "/health/database");
    assert!(started.elapsed() < CONTRACT);
    assert_eq!(down.status, 503, "{}", down.body);
    let body = down.json();
    assert_eq!(body["status"], "unhealthy", "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("no encryption"), "{body}");
    assert!(!down.body.contains(&password), "password in {}", down.body);
    assert_eq!(get(addr, "/health").status, 200);
    let warning = service
        .output
        .wait_record(PATIENCE, |r| {
            message_is(r, "could not open connections at start-up")
        })
        .unwrap_or_else(|| panic!("no start-up warning:\n{}", service.output.text()));
    assert!(
        warning["error"]
            .as_str()
            .is_some_and(|e| e.contains("no encryption")),
        "{warning}"
    );
    assert_eq!(support::backends_by_ssl(&cluster, "serve-plain"), (0, 0));
    assert!(service.terminate().success());
    assert!(
        !service.output.text().contains(&password),
        "the password appears in the logs"
    );
}
