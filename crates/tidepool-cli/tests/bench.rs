//! `tidepool bench` against real PostgreSQL: the built binary is run with `DATABASE_URL` pointing
//! at a throwaway cluster. No assertion depends on how fast the machine is.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{one_json_line, run_tidepool, Output};
use tidepool_cluster::Cluster;

/// How long one run of the binary may take before the test gives up on it (generous: debug
/// build, two cores, tests in parallel).
const RUN_DEADLINE: Duration = Duration::from_secs(180);

/// Runs `tidepool ARGS` with only `env` among tidepool's variables, waiting up to
/// [`RUN_DEADLINE`].
fn tidepool(name: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    run_tidepool(&format!("bench-{name}"), env, args, RUN_DEADLINE)
}

fn json(out: &Output) -> Value {
    out.assert_code(0);
    one_json_line(out)
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not a count in {v}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing or not a number in {v}"))
}

/// "connection authorized" lines the server logged for `application_name`.
fn authorized(cluster: &Cluster, application_name: &str) -> usize {
    let log = std::fs::read_to_string(cluster.log_file()).unwrap_or_default();
    let needle = format!("application_name={application_name}");
    log.lines()
        .filter(|l| l.contains("connection authorized") && l.contains(&needle))
        .count()
}

/// The seed's load test: 100 concurrent `SELECT pg_sleep(0.1), 1` through 5 + 10 connections.
/// Zero errors, and the server saw exactly 15 connections.
#[test]
fn seed_load_test_opens_exactly_fifteen_connections() {
    let cluster = Cluster::builder()
        .setting("log_connections", "on")
        .start()
        .expect("start cluster");
    let url = cluster.url();
    let out = tidepool(
        "seed",
        &[
            ("DATABASE_URL", &url),
            ("DB_POOL_SIZE", "5"),
            ("DB_MAX_OVERFLOW", "10"),
            ("DB_APPLICATION_NAME", "bench-seed"),
        ],
        &["bench", "--json"],
    );
    let v = json(&out);
    assert_eq!(u(&v, "requests"), 100, "{v}");
    assert_eq!(u(&v, "ok"), 100, "{v}");
    assert_eq!(u(&v, "errors"), 0, "{v}");
    assert_eq!(u(&v, "connections_opened"), 15, "{v}");
    assert_eq!(v["peak_overflow"].as_i64(), Some(10), "{v}");
    assert!((f(&v, "floor_s") - 0.7).abs() < 1e-9, "{v}");
    for key in [
        "wall_s",
        "throughput",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "checkout_wait_p99_ms",
    ] {
        assert!(f(&v, key) > 0.0, "{key} in {v}");
    }
    // Each request sleeps 0.1 s on the server, so the run cannot be quicker than the floor.
    assert!(f(&v, "wall_s") >= 0.7, "{v}");

    // The server's own witness: one "connection authorized" line per connection opened. Each
    // line is written before the connection is usable, so they are all there by now; poll
    // anyway in case the log is written late.
    let deadline = Instant::now() + Duration::from_secs(30);
    while authorized(&cluster, "bench-seed") < 15 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        authorized(&cluster, "bench-seed"),
        15,
        "server log:\n{}",
        std::fs::read_to_string(cluster.log_file()).unwrap_or_default()
    );
}

/// `--warmup` opens `pool_size` connections before the clock starts; the run still needs only
/// 15 in all.
#[test]
fn warmup_opens_pool_size_first() {
    let cluster = Cluster::start().expect("start cluster");
    let url = cluster.url();
    let out = tidepool(
        "warmup",
        &[
            ("DATABASE_URL", &url),
            ("DB_POOL_SIZE", "5"),
            ("DB_MAX_OVERFLOW", "10"),
        ],
        &["bench", "--warmup", "--json"],
    );
    let v = json(&out);
    assert_eq!(u(&v, "warmup_opened"), 5, "{v}");
    assert_eq!(u(&v, "ok"), 100, "{v}");
    assert_eq!(u(&v, "connections_opened"), 15, "{v}");
}

/// `--duration` stops taking requests on time and reports at least the requested duration.
#[test]
fn duration_stops_on_time() {
    let cluster = Cluster::start().expect("start cluster");
    let url = cluster.url();
    let out = tidepool(
        "duration",
        &[("DATABASE_URL", &url)],
        &[
            "bench",
            "--duration",
            "1",
            "--concurrency",
            "4",
            "--query",
            "SELECT 1",
            "--json",
        ],
    );
    let v = json(&out);
    assert_eq!(f(&v, "duration_s"), 1.0, "{v}");
    assert!(f(&v, "wall_s") >= 1.0, "{v}");
    assert!(u(&v, "requests") > 0, "{v}");
    assert_eq!(u(&v, "ok"), u(&v, "requests"), "{v}");
    assert!(v["floor_s"].is_null(), "no pg_sleep, no floor: {v}");
}

/// A failing statement is counted by SQLSTATE class, the summary says the run failed, and it
/// exits 1.
#[test]
fn failing_query_counts_errors_by_class() {
    let cluster = Cluster::start().expect("start cluster");
    let url = cluster.url();
    let out = tidepool(
        "failing",
        &[("DATABASE_URL", &url)],
        &[
            "bench",
            "--query",
            "SELECT 1/0",
            "--requests",
            "20",
            "--concurrency",
            "5",
            "--json",
        ],
    );
    out.assert_code(1);
    let v = one_json_line(&out);
    assert_eq!(u(&v, "requests"), 20, "{v}");
    assert_eq!(u(&v, "ok"), 0, "{v}");
    assert_eq!(u(&v, "errors"), 20, "{v}");
    // 22012 division_by_zero: class 22, data exception.
    assert_eq!(
        v["errors_by_class"]["sqlstate_22"].as_u64(),
        Some(20),
        "{v}"
    );
    let example = v["error_examples"]["sqlstate_22"]
        .as_str()
        .unwrap_or_default();
    assert!(example.contains("division by zero"), "{v}");
}

/// Without `--json` a summary for people: throughput, percentiles, the floor.
#[test]
fn human_summary() {
    let cluster = Cluster::start().expect("start cluster");
    let url = cluster.url();
    let out = tidepool(
        "human",
        &[
            ("DATABASE_URL", &url),
            ("DB_POOL_SIZE", "2"),
            ("DB_MAX_OVERFLOW", "2"),
        ],
        &[
            "bench",
            "--requests",
            "12",
            "--concurrency",
            "6",
            "--query",
            "SELECT pg_sleep(0.01), 1",
        ],
    );
    assert_eq!(out.code, Some(0), "stderr:\n{}", out.stderr);
    for needle in [
        "requests       12 (ok 12, errors 0)",
        "throughput",
        "p99",
        "checkout wait",
        "opened 4",
        "floor 0.030 s (ceil(12 / 4) × 0.01 s",
    ] {
        assert!(
            out.stdout.contains(needle),
            "{needle:?} missing from:\n{}",
            out.stdout
        );
    }
}

/// A server that is not there: requests fail with timeouts (counted, exit 0); `--warmup` cannot
/// run at all (exit 2, a message, no panic).
#[test]
fn unreachable_server() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("postgresql://nobody:secret@127.0.0.1:{port}/none");
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("DB_POOL_TIMEOUT", "0.5"),
        ("DB_CONNECT_TIMEOUT", "1"),
    ];
    let out = tidepool(
        "unreachable",
        &env,
        &[
            "bench",
            "--requests",
            "3",
            "--concurrency",
            "3",
            "--query",
            "SELECT 1",
            "--json",
        ],
    );
    out.assert_code(1);
    let v = one_json_line(&out);
    assert_eq!(u(&v, "errors"), 3, "{v}");
    assert_eq!(v["errors_by_class"]["timeout"].as_u64(), Some(3), "{v}");
    assert!(!out.stdout.contains("secret") && !out.stderr.contains("secret"));

    let out = tidepool("unreachable-warmup", &env, &["bench", "--warmup", "--json"]);
    out.assert_code(2);
    assert!(out.stderr.contains("warm-up failed"), "{}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert!(!out.stderr.contains("secret"), "{}", out.stderr);
}

/// No `DATABASE_URL`: the bench runs against an embedded throwaway server.
#[test]
fn embedded_default() {
    let out = tidepool(
        "embedded",
        &[],
        &[
            "bench",
            "--requests",
            "5",
            "--concurrency",
            "5",
            "--query",
            "SELECT 1",
            "--json",
        ],
    );
    let v = json(&out);
    assert_eq!(u(&v, "ok"), 5, "{v}");
}

/// Logs (here every statement, `DB_ECHO=true`) go to standard error: `--json` output stays one
/// object.
#[test]
fn logs_stay_off_stdout() {
    let cluster = Cluster::start().expect("start cluster");
    let url = cluster.url();
    let out = tidepool(
        "echo",
        &[("DATABASE_URL", &url), ("DB_ECHO", "true")],
        &[
            "bench",
            "--requests",
            "3",
            "--concurrency",
            "1",
            "--query",
            "SELECT 41 + 1",
            "--json",
        ],
    );
    let v = json(&out);
    assert_eq!(u(&v, "ok"), 3, "{v}");
    assert!(
        out.stderr.contains("SELECT 41 + 1"),
        "echo missing from stderr:\n{}",
        out.stderr
    );
}

/// `DATABASE_URL` with `sslmode=verify-full&sslrootcert=CA` against a TLS-only server (which
/// refuses plaintext TCP): every request succeeds, and every connection the server authorized
/// for the run was encrypted (`log_connections`: "SSL enabled").
#[test]
fn tls_verify_full_against_a_tls_only_server() {
    let cluster = support::tls_only_cluster(true);
    let url = support::verify_full_url_own_ca(&cluster);
    let out = tidepool(
        "tls",
        &[("DATABASE_URL", &url), ("DB_APPLICATION_NAME", "bench-tls")],
        &[
            "bench",
            "--requests",
            "50",
            "--concurrency",
            "5",
            "--query",
            "SELECT 1",
            "--json",
        ],
    );
    let v = json(&out);
    assert_eq!(u(&v, "requests"), 50, "{v}");
    assert_eq!(u(&v, "ok"), 50, "{v}");
    assert_eq!(u(&v, "errors"), 0, "{v}");
    let opened = u(&v, "connections_opened");
    assert!((1..=5).contains(&opened), "{v}");
    assert!(
        !out.stdout.contains(cluster.password()) && !out.stderr.contains(cluster.password()),
        "password shown"
    );

    // The server's witness: one "connection authorized" line per connection opened, each
    // saying the connection is encrypted.
    let deadline = Instant::now() + Duration::from_secs(30);
    while (support::authorized_lines(&cluster, "bench-tls").len() as u64) < opened
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let lines = support::authorized_lines(&cluster, "bench-tls");
    assert_eq!(lines.len() as u64, opened, "{lines:#?}");
    assert!(
        lines.iter().all(|l| l.contains("SSL enabled")),
        "a connection without TLS: {lines:#?}"
    );
}

/// `sslrootcert` of a CA that did not sign the server's certificate: verification fails at
/// once, naming the untrusted certificate, well before the checkout timeout (10 s) — for the
/// run (every request an error; the exit status is not asserted) and for `--warmup` (cannot run:
/// exit 2).
#[test]
fn tls_certificate_from_another_ca_fails_at_once() {
    let cluster = support::tls_only_cluster(false);
    let dir = support::TempDir::new("bench-other-ca");
    let url = support::verify_full_url(&cluster, &support::other_ca_cert(&dir));
    let env = [("DATABASE_URL", url.as_str()), ("DB_POOL_TIMEOUT", "10")];
    let args = [
        "bench",
        "--requests",
        "50",
        "--concurrency",
        "5",
        "--query",
        "SELECT 1",
        "--json",
    ];

    let started = Instant::now();
    let out = tidepool("other-ca", &env, &args);
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(5),
        "took {elapsed:?}\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    let all = format!("{}\n{}", out.stdout, out.stderr);
    assert!(all.contains("not trusted"), "{all}");
    assert!(!all.contains(cluster.password()), "password shown:\n{all}");
    // Not the exit status: bench documents 0 "when the run happened, whatever the error count",
    // so a run whose every request failed exits 0 today; whether it should is an open question.
    // Whatever it decides, a report on stdout must count every request as an error.
    if let Ok(v) = serde_json::from_str::<Value>(out.stdout.trim()) {
        assert_eq!(u(&v, "ok"), 0, "{v}");
        assert_eq!(u(&v, "errors"), 50, "{v}");
        assert!(
            v["error_examples"].to_string().contains("not trusted"),
            "{v}"
        );
    }

    // With --warmup the connections are opened first: that fails, so the run cannot happen.
    let mut warmup = args.to_vec();
    warmup.insert(1, "--warmup");
    let started = Instant::now();
    let out = tidepool("other-ca-warmup", &env, &warmup);
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    out.assert_code(2);
    assert!(out.stderr.contains("warm-up failed"), "{}", out.stderr);
    assert!(out.stderr.contains("not trusted"), "{}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert!(out.stdout.trim().is_empty(), "{}", out.stdout);
}

/// The human summary of a run with failures says so, and the exit status is 1.
#[test]
fn a_failing_run_says_so_and_exits_one() {
    let cluster = Cluster::start().expect("start cluster");
    let url = cluster.url();
    let out = tidepool(
        "failing-human",
        &[("DATABASE_URL", &url)],
        &[
            "bench",
            "--query",
            "SELECT 1/0",
            "--requests",
            "5",
            "--concurrency",
            "2",
        ],
    );
    out.assert_code(1);
    assert!(
        out.stdout.contains("FAILED         5 of 5 requests failed"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("division by zero"), "{}", out.stdout);
}

/// SIGINT or SIGTERM during a run on the embedded database: the bench stops (exit 130 or 143),
/// and the embedded PostgreSQL is stopped and its data directory removed.
#[test]
fn a_signal_stops_bench_and_removes_the_embedded_database() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    for (signal, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let dir = std::env::temp_dir().join(format!(
            "tidepool-cli-test-{}-signal-{signal}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidepool"));
        cmd.args([
            "bench",
            "--duration",
            "60",
            "--query",
            "SELECT pg_sleep(0.01)",
        ])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "info")
        .env("LOG_FORMAT", "json");
        for var in tidepool::settings::VARIABLES {
            cmd.env_remove(var);
        }
        let mut child = cmd.spawn().expect("spawn tidepool");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // The embedded database's data directory, from its log line.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let data_dir = loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                .expect("the embedded database starts");
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if let Some(d) = v["data_dir"].as_str() {
                    break std::path::PathBuf::from(d);
                }
            }
        };
        assert!(data_dir.exists());
        // Requests under way: the first progress or pool line after start is not needed; the
        // run lasts 60 s, so the signal lands mid-run.
        unsafe { libc::kill(child.id() as i32, signal) };
        let until = std::time::Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(std::time::Instant::now() < until, "bench did not stop");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(code), "signal {signal}");
        assert!(!data_dir.exists(), "{} left behind", data_dir.display());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
