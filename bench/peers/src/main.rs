//! `bench/peers`: tidepool side by side with deadpool-postgres, bb8, sqlx and ten dedicated
//! tokio-postgres connections (issue 6, DESIGN §8 and §10), plus pgbench for the server's ceiling.
//!
//! Workloads:
//! * `w1`: the seed's load test: 100 tasks × one `SELECT pg_sleep(0.1), 1`, size 5 + overflow 10
//!   (max 15 for pools without overflow), a fresh pool per round, median of `--w1-runs` rounds.
//!   Rounds interleave the systems, after one untimed round that warms the server. With raw-10
//!   selected, `raw-15` runs W1 without a pool (15 dedicated connections opened at once, each
//!   running requests back to back): the reference for any pool that connects on demand; its
//!   row carries `sleep7_s`, one open connection's 7 back-to-back sleeps (the server's floor).
//! * `connect`: 15 tokio-postgres connections opened at once (and one alone): what any pool that
//!   connects on demand pays on top of W1's 0.70 s floor. With `--tls` the opener is
//!   tokio-postgres + tokio-postgres-rustls (row `tokio-postgres+rustls`) against a tidepool
//!   pool with `sslmode=verify-full`: TLS handshake, SCRAM-SHA-256-PLUS and backend start.
//! * `w2`: `SELECT 1` through the pool: 64 tasks, 10 connections, 50,000 queries (after an
//!   untimed warm-up that opens the connections and prepares the statement on each). Also
//!   `raw-10` (64 tasks pipelining over 10 dedicated connections) and `raw-10-serial` (10 tasks,
//!   one per connection: one query in flight per connection, as through a pool).
//!   `tidepool` checks out and queries; `tidepool-pipelined` runs the statement on the pool
//!   (`Pool::query_one`), which pipelines statements on busy connections when all are busy.
//!   `tidepool-preping` uses the default pre-ping window (no round trip for a connection the
//!   server answered on within 0.5 s); `tidepool-preping-every` pings on every checkout.
//! * `w3`: acquire and release, no query: 64 tasks, 10 connections, 1,000,000 operations, the
//!   connection released at once. On 2 worker threads at most 2 tasks hold connections, so this
//!   measures the checkout path itself (and the pool's lock shared by the two workers); a pool
//!   whose `get()` never returns `Pending` lets one task per worker run its loop undisturbed.
//! * `w3-hold`: the same, but each task yields once while holding the connection (as a handler
//!   holds it across an await): 64 tasks really contend for 10 connections, so waiting, wake-up
//!   and FIFO fairness are measured too.
//! * `pgbench`: `pgbench -n -c 10 -j 2 -T S -M simple|prepared` with a `SELECT 1` script.
//!
//! W2, W3 and W3-hold run `--rounds` rounds (systems interleaved, a fresh pool each) and report
//! the median round by ops/s; a run stops taking new operations after `--max-secs`. Rows carry
//! the load average, and for W2/W3 the client's user and system CPU and the whole machine's busy
//! CPU per operation: the machine is shared, so compare systems within one run.
//!
//! Connections opened are witnessed by the server: the cluster runs with `log_connections = on`
//! and every pool has its own `application_name`; the count is the number of
//! `connection authorized` lines naming it.
//!
//! The runtime is tokio's multi-thread scheduler with 2 workers (the machine has 2 cores, which
//! the PostgreSQL server shares).
//!
//! `--tls` runs everything over verified TLS: the cluster accepts TCP connections over TLS only
//! (`TlsMode::Only`, `hostssl` in pg_hba.conf), tidepool gets `sslmode=verify-full` and the
//! cluster's CA as `sslrootcert`, tokio-postgres (the `connect` opener, deadpool, bb8, raw-N)
//! goes through tokio-postgres-rustls with a rustls config that trusts that CA only, and sqlx
//! uses `PgSslMode::VerifyFull` with it; all of them rustls over ring. Every row then carries
//! `tls: true`, and the server log's `connection authorized ... SSL enabled` lines are counted
//! at the end as the witness.
//!
//! `peers profile ...` is the callgrind harness and `peers annotate ...` reads its output per
//! source line (see `profile.rs`, `annotate.rs` and the `profile` script).

mod annotate;
mod driver;
mod pgbench;
mod profile;
mod systems;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::json;

use driver::{drive, Op, Outcome};
use systems::{Handle, Sizing, System, Target};

#[derive(Parser)]
#[command(
    name = "peers",
    about = "tidepool vs deadpool, bb8, sqlx and raw tokio-postgres",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    bench: BenchArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Callgrind harness: a small fixed workload on a current_thread runtime, the measured part
    /// inside `peers_measured_region` (use the `profile` script beside Cargo.toml).
    Profile(profile::Args),
    /// Instructions per operation by source line of crates/tidepool/src, from a callgrind.out
    /// file (the `profile` script runs it).
    Annotate(annotate::Args),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// One JSON line per system × workload on stdout (the table then goes to stderr).
    #[arg(long)]
    json: bool,
    /// Systems to run, comma-separated (default: all). Names: tidepool, tidepool-preping,
    /// tidepool-preping-every, tidepool-pipelined, deadpool, deadpool-verified, bb8, bb8-tested,
    /// sqlx, sqlx-tested, raw-10, raw-10-serial. The `connect` workload always compares
    /// tokio-postgres (with `--tls`, tokio-postgres + rustls) and tidepool, whatever is selected.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Workloads to run, comma-separated: w1, connect, w2, w3, w3-hold, pgbench (default: all).
    #[arg(long, value_delimiter = ',')]
    workload: Vec<String>,
    /// W1 runs per system (the median is reported).
    #[arg(long, default_value_t = 3)]
    w1_runs: usize,
    /// W2 queries.
    #[arg(long, default_value_t = 50_000)]
    w2_ops: u64,
    /// W3 and W3-hold acquire/release operations.
    #[arg(long, default_value_t = 1_000_000)]
    w3_ops: u64,
    /// Rounds of W2, W3 and W3-hold; the systems are interleaved round by round and each row
    /// reports the median round (by ops/s), with latencies over every round. Five, because the
    /// 2-core machine is shared by client and server and single rounds swing by ±5%.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// A W2/W3 run stops taking new operations after this many seconds (a slow system then
    /// reports fewer operations; ops/s stays comparable).
    #[arg(long, default_value_t = 6.0)]
    max_secs: f64,
    /// Tasks for W2 and W3.
    #[arg(long, default_value_t = 64)]
    tasks: usize,
    /// Connections for W2 and W3.
    #[arg(long, default_value_t = 10)]
    conns: usize,
    /// Also run the health-checking variants in W3 (each checkout is then a round trip).
    #[arg(long)]
    w3_tested: bool,
    /// Seconds per pgbench run.
    #[arg(long, default_value_t = 5)]
    pgbench_secs: u32,
    /// Start the throwaway cluster with `trust` authentication on loopback instead of
    /// SCRAM-SHA-256: shows what the password handshake costs (W1 opens 15 connections).
    #[arg(long)]
    trust: bool,
    /// Use this server instead of starting a throwaway cluster
    /// (postgresql://user:password@127.0.0.1:port/db). Connections opened are then not counted
    /// (the count reads the throwaway cluster's log).
    #[arg(long)]
    url: Option<String>,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Every connection over verified TLS: the throwaway cluster then accepts TCP connections
    /// over TLS only (a plaintext connection is refused), and every system verifies the
    /// server's certificate (chain and host name, libpq's verify-full) against its CA. Rows
    /// carry `tls: true`.
    #[arg(long)]
    tls: bool,
    /// With `--url` and `--tls`: the PEM file of the CA that signed the server's certificate,
    /// trusted by every system (tidepool gets it as `sslrootcert`). The URL itself must not
    /// carry TLS parameters; the host in it must be in the certificate's names.
    #[arg(long, value_name = "PATH")]
    tls_ca: Option<std::path::PathBuf>,
}

/// One line of the table.
struct Row {
    system: String,
    workload: &'static str,
    ops: u64,
    wall_s: f64,
    ops_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    errors: u64,
    connections_opened: Option<u64>,
    load1: f64,
    /// Measured over TLS (`--tls`).
    tls: bool,
    extra: serde_json::Map<String, serde_json::Value>,
}

impl Row {
    fn from_outcome(
        system: System,
        workload: &'static str,
        o: &Outcome,
        conns: Option<u64>,
        load1: f64,
    ) -> Row {
        let wall_s = o.wall.as_secs_f64();
        Row {
            system: system.name().into(),
            workload,
            ops: o.ops,
            wall_s,
            ops_per_s: o.ops as f64 / wall_s,
            p50_us: o.quantile_us(0.50),
            p99_us: o.quantile_us(0.99),
            p999_us: o.quantile_us(0.999),
            errors: o.errors,
            connections_opened: conns,
            load1,
            tls: false,
            extra: Default::default(),
        }
    }

    fn json(&self) -> serde_json::Value {
        let num = |v: f64| {
            if v.is_finite() {
                json!((v * 1000.0).round() / 1000.0)
            } else {
                serde_json::Value::Null
            }
        };
        let mut m = serde_json::Map::new();
        m.insert("system".into(), json!(self.system));
        m.insert("workload".into(), json!(self.workload));
        m.insert("ops".into(), json!(self.ops));
        m.insert("wall_s".into(), num(self.wall_s));
        m.insert("ops_per_s".into(), json!(self.ops_per_s.round()));
        m.insert("p50_us".into(), num(self.p50_us));
        m.insert("p99_us".into(), num(self.p99_us));
        m.insert("p999_us".into(), num(self.p999_us));
        m.insert("errors".into(), json!(self.errors));
        m.insert("connections_opened".into(), json!(self.connections_opened));
        m.insert("load1".into(), json!(self.load1));
        m.insert("tls".into(), json!(self.tls));
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        serde_json::Value::Object(m)
    }
}

/// A `connect` row's figures beyond the table's: median wall time, client CPU per connection,
/// one connection alone.
fn connect_detail(row: &Row) -> Option<String> {
    if row.workload != "connect" {
        return None;
    }
    let get = |k: &str| row.extra.get(k).and_then(|v| v.as_f64());
    Some(format!(
        "wall {:.3} s, client CPU {} ms/connection, one alone {} ms",
        row.wall_s,
        get("client_cpu_ms_per_connection").map_or("-".into(), |v| format!("{v:.2}")),
        get("single_connect_ms").map_or("-".into(), |v| format!("{v:.2}")),
    ))
}

fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// `connection authorized` lines for `app` in the server log. The application name ends the
/// line, or is followed by ` SSL enabled (...)` for a TLS connection.
fn connections_opened(log: &std::path::Path, app: &str) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    let needle = format!("application_name={app}");
    Some(
        text.lines()
            .filter(|l| {
                l.contains("connection authorized")
                    && l.split_once(&needle).is_some_and(|(_, rest)| {
                        rest.trim_end().is_empty() || rest.starts_with(' ')
                    })
            })
            .count() as u64,
    )
}

/// The server log's witness of a TLS run: TCP connections authorized from `peers-*`
/// application names, how many of them were TLS, and each distinct `SSL enabled (...)` detail
/// with its count.
fn tls_witness(log: &std::path::Path) -> Option<(u64, u64, BTreeMap<String, u64>)> {
    let text = std::fs::read_to_string(log).ok()?;
    let (mut all, mut tls) = (0, 0);
    let mut kinds = BTreeMap::new();
    for l in text.lines() {
        if !l.contains("connection authorized") || !l.contains("application_name=peers-") {
            continue;
        }
        all += 1;
        if let Some((_, rest)) = l.split_once(" SSL enabled ") {
            tls += 1;
            *kinds.entry(rest.trim().to_owned()).or_insert(0) += 1;
        }
    }
    Some((all, tls, kinds))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Profile(args)) => profile::main(args),
        Some(Cmd::Annotate(args)) => annotate::main(args),
        None => bench(cli.bench),
    }
}

fn eprint_flush(s: &str) {
    eprintln!("{s}");
    let _ = std::io::stderr().flush();
}

fn bench(args: BenchArgs) -> ExitCode {
    let systems: Vec<System> = if args.only.is_empty() {
        System::ALL.to_vec()
    } else {
        let mut v = Vec::new();
        for name in &args.only {
            match System::parse(name.trim()) {
                Some(s) => v.push(s),
                None => {
                    eprintln!(
                        "unknown system {name:?}; known: {}",
                        System::ALL.map(|s| s.name()).join(", ")
                    );
                    return ExitCode::from(2);
                }
            }
        }
        v
    };
    let all_workloads = ["w1", "connect", "w2", "w3", "w3-hold", "pgbench"];
    let workloads: Vec<&'static str> = if args.workload.is_empty() {
        all_workloads.to_vec()
    } else {
        let mut v = Vec::new();
        for w in &args.workload {
            match all_workloads
                .iter()
                .find(|x| x.eq_ignore_ascii_case(w.trim()))
            {
                Some(x) => v.push(*x),
                None => {
                    eprintln!(
                        "unknown workload {w:?}; known: {}",
                        all_workloads.join(", ")
                    );
                    return ExitCode::from(2);
                }
            }
        }
        v
    };

    if args.tls_ca.is_some() && (!args.tls || args.url.is_none()) {
        eprintln!(
            "--tls-ca is for --url with --tls (the throwaway cluster's CA is used otherwise)"
        );
        return ExitCode::from(2);
    }
    let mut cluster = None;
    // With --trust: the pg_hba.conf the cluster reads, removed at the end.
    let mut hba: Option<std::path::PathBuf> = None;
    let (target, log) = match &args.url {
        Some(url) => {
            let mut t = match profile::target_from_url(url) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("bad --url: {e}");
                    return ExitCode::from(2);
                }
            };
            if args.tls {
                let Some(ca) = &args.tls_ca else {
                    eprintln!(
                        "--url with --tls needs --tls-ca PATH: the CA every system verifies the server against (the URL must not carry sslmode or sslrootcert)"
                    );
                    return ExitCode::from(2);
                };
                match systems::TargetTls::load(ca) {
                    Ok(tls) => t.tls = Some(Arc::new(tls)),
                    Err(e) => {
                        eprintln!("--tls-ca: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
            (t, std::path::PathBuf::new())
        }
        None => {
            eprint_flush(&format!(
                "starting a throwaway PostgreSQL cluster (fsync off, log_connections on, {} on loopback{}) ...",
                if args.trust { "trust" } else { "scram-sha-256" },
                if args.tls { ", TCP over TLS only" } else { "" }
            ));
            let mut builder = tidepool_cluster::Cluster::builder()
                .max_connections(200)
                .setting("log_connections", "on");
            if args.tls {
                builder = builder.tls(tidepool_cluster::tls::TlsMode::Only);
            }
            if args.trust {
                let path = hba.insert(
                    std::env::temp_dir()
                        .join(format!("peers-trust-hba-{}.conf", std::process::id())),
                );
                // With --tls, `hostssl`: plaintext TCP stays impossible.
                let lines = if args.tls {
                    "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n"
                } else {
                    "local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n"
                };
                if let Err(e) = std::fs::write(&*path, lines) {
                    eprintln!("cannot write {}: {e}", path.display());
                    return ExitCode::from(2);
                }
                builder = builder.setting("hba_file", &path.display().to_string());
            }
            let c = match builder.start() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("cannot start the cluster: {e}");
                    if let Some(path) = &hba {
                        let _ = std::fs::remove_file(path);
                    }
                    return ExitCode::from(2);
                }
            };
            let tls = match c.tls() {
                None => None,
                Some(t) => match systems::TargetTls::load(t.ca_cert_path()) {
                    Ok(t) => Some(Arc::new(t)),
                    Err(e) => {
                        eprintln!("the cluster's CA: {e}");
                        return ExitCode::from(2);
                    }
                },
            };
            let target = Target {
                host: c.host().to_owned(),
                port: c.port(),
                user: c.user().to_owned(),
                password: c.password().to_owned(),
                dbname: c.dbname().to_owned(),
                tls,
            };
            let log = c.log_file().to_owned();
            cluster = Some(c);
            (target, log)
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers)
        .enable_all()
        .build()
        .expect("tokio runtime");
    eprint_flush(&format!(
        "server on {}:{}; tokio multi-thread runtime, {} workers; {} cores (shared with the server); load average now {:.2}",
        target.host,
        target.port,
        args.workers,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load1()
    ));
    if let Some(t) = &target.tls {
        eprint_flush(&format!(
            "TLS: {}; every system verifies the server's certificate (chain + host name) against {}: tidepool sslmode=verify-full, tokio-postgres/deadpool/bb8/raw via tokio-postgres-rustls, sqlx PgSslMode::VerifyFull, all rustls over ring{}",
            if cluster.is_some() {
                "the cluster accepts TCP connections over TLS only (hostssl), plaintext is refused"
            } else {
                "server given by --url; every client requires TLS (sslmode require/verify-full)"
            },
            t.ca_path.display(),
            if workloads.contains(&"pgbench") { "; pgbench: libpq (OpenSSL), PGSSLMODE=verify-full" } else { "" }
        ));
    }

    let mut rows: Vec<Row> = Vec::new();
    let tls_run = target.tls.is_some();
    let emit = |row: &mut Row, json: bool| {
        row.tls = tls_run;
        if json {
            println!("{}", row.json());
            let _ = std::io::stdout().flush();
        }
        eprint_flush(&format!(
            "  {:<22} {:<7} {:>9.0} ops/s  p50 {:>9.1} µs  p99 {:>9.1} µs  p99.9 {:>9.1} µs  errors {}  conns {}  (load {:.2}){}{}",
            row.system,
            row.workload,
            row.ops_per_s,
            row.p50_us,
            row.p99_us,
            row.p999_us,
            row.errors,
            row.connections_opened.map_or("-".into(), |c| c.to_string()),
            row.load1,
            connect_detail(row).map_or(String::new(), |d| format!("  {d}")),
            if row.tls { "  [TLS]" } else { "" }
        ));
    };

    for &workload in &workloads {
        eprint_flush(&format!("== {workload} =="));
        match workload {
            "w1" => {
                let w1_systems: Vec<System> =
                    systems.iter().copied().filter(|s| !s.is_raw()).collect();
                // Rounds interleave the systems (round 1 of every system, then round 2, ...) so
                // drift in the machine's load hits every system alike; an untimed round first
                // warms the server (backend start-up caches, the pg_sleep plan).
                let _ = runtime.block_on(w1_round(System::Tidepool, &target, &log, 0));
                let mut results: Vec<Vec<(Outcome, Option<u64>)>> =
                    w1_systems.iter().map(|_| Vec::new()).collect();
                let load = load1();
                // The no-pool reference runs when raw-10 is selected: 15 dedicated connections.
                let reference = systems.contains(&System::Raw10);
                let mut no_pool = Vec::new();
                for round in 1..=args.w1_runs.max(1) {
                    for (i, &system) in w1_systems.iter().enumerate() {
                        match runtime.block_on(w1_round(system, &target, &log, round)) {
                            Ok(r) => results[i].push(r),
                            Err(e) => eprint_flush(&format!(
                                "  {} w1 round {round} failed: {e}",
                                system.name()
                            )),
                        }
                    }
                    if reference {
                        match runtime.block_on(w1_no_pool_round(&target, &log, round)) {
                            Ok(r) => no_pool.push(r),
                            Err(e) => {
                                eprint_flush(&format!("  raw-15 w1 round {round} failed: {e}"))
                            }
                        }
                    }
                }
                for (i, &system) in w1_systems.iter().enumerate() {
                    if let Some(mut row) = w1_row(system, std::mem::take(&mut results[i]), load) {
                        emit(&mut row, args.json);
                        rows.push(row);
                    }
                }
                if let Some(mut row) = w1_row(System::Raw10, no_pool, load) {
                    row.system = "raw-15".into();
                    match runtime.block_on(sleep_floor(&target, args.w1_runs)) {
                        Ok(s) => {
                            row.extra
                                .insert("sleep7_s".into(), json!((s * 1e4).round() / 1e4));
                        }
                        Err(e) => eprint_flush(&format!("  w1 sleep floor failed: {e}")),
                    }
                    emit(&mut row, args.json);
                    rows.push(row);
                }
            }
            "w2" | "w3" | "w3-hold" => {
                let (op, total, warm) = match workload {
                    "w2" => (Op::Select1, args.w2_ops, 5_000),
                    "w3" => (Op::Checkout { hold: false }, args.w3_ops, 20_000),
                    _ => (Op::Checkout { hold: true }, args.w3_ops, 20_000),
                };
                let run_systems: Vec<System> = systems
                    .iter()
                    .copied()
                    .filter(|s| {
                        workload == "w2" || !(s.no_checkout() || (s.pings() && !args.w3_tested))
                    })
                    .collect();
                let sizing = Sizing {
                    size: args.conns,
                    overflow: 0,
                };
                let cap = Duration::from_secs_f64(args.max_secs.max(0.1));
                let mut results: Vec<Vec<Round>> = run_systems.iter().map(|_| Vec::new()).collect();
                for round in 1..=args.rounds.max(1) {
                    eprint_flush(&format!(
                        "  round {round}/{} (load {:.2})",
                        args.rounds.max(1),
                        load1()
                    ));
                    for (i, &system) in run_systems.iter().enumerate() {
                        let r = runtime.block_on(steady_round(
                            system, workload, op, &target, &log, sizing, args.tasks, warm, total,
                            cap, round,
                        ));
                        match r {
                            Ok(r) => results[i].push(r),
                            Err(e) => eprint_flush(&format!(
                                "  {} {workload} round {round} failed: {e}",
                                system.name()
                            )),
                        }
                    }
                }
                for (i, &system) in run_systems.iter().enumerate() {
                    if let Some(mut row) =
                        steady_row(system, workload, std::mem::take(&mut results[i]))
                    {
                        emit(&mut row, args.json);
                        rows.push(row);
                    }
                }
            }
            "connect" => match runtime.block_on(connect15(&target, &log, args.w1_runs)) {
                Ok(new) => {
                    for mut row in new {
                        emit(&mut row, args.json);
                        rows.push(row);
                    }
                }
                Err(e) => eprint_flush(&format!("  connect failed: {e}")),
            },
            "pgbench" => {
                for mode in ["simple", "prepared"] {
                    let app = format!("peers-pgbench-{mode}");
                    let load = load1();
                    match pgbench::run(&target, mode, args.conns as u32, args.pgbench_secs, &app) {
                        Ok(r) => {
                            let mut extra = serde_json::Map::new();
                            extra.insert(
                                "latency_avg_us".into(),
                                json!((r.latency_avg_us * 10.0).round() / 10.0),
                            );
                            let mut row = Row {
                                system: format!("pgbench-{mode}"),
                                workload: "pgbench",
                                ops: r.ops,
                                wall_s: r.wall_s,
                                ops_per_s: r.tps,
                                p50_us: f64::NAN,
                                p99_us: f64::NAN,
                                p999_us: f64::NAN,
                                errors: 0,
                                connections_opened: connections_opened(&log, &app),
                                load1: load,
                                tls: false,
                                extra,
                            };
                            emit(&mut row, args.json);
                            rows.push(row);
                        }
                        Err(e) => eprint_flush(&format!("  pgbench {mode} failed: {e}")),
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
            _ => unreachable!(),
        }
    }
    drop(runtime);

    let mut table = render_table(&rows);
    if let Some(t) = &target.tls {
        let witness = match tls_witness(&log) {
            Some((all, tls, kinds)) => format!(
                "; the server log: {tls} of {all} connections authorized were TLS ({})",
                kinds
                    .iter()
                    .map(|(k, n)| format!("{n} × {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => String::new(),
        };
        table.insert_str(
            0,
            &format!(
                "\nOVER TLS (--tls): every row below was measured over verified TLS ({}; CA {}){witness}; do not compare with plaintext figures.",
                if cluster.is_some() {
                    "server accepts TCP over TLS only"
                } else {
                    "server from --url, every client requires TLS"
                },
                t.ca_path.display()
            ),
        );
    }
    let verdicts = render_verdicts(&rows);
    if args.json {
        eprint!("{table}{verdicts}");
    } else {
        print!("{table}{verdicts}");
    }
    drop(cluster);
    if let Some(path) = hba {
        let _ = std::fs::remove_file(path);
    }
    ExitCode::SUCCESS
}

/// W1 for one system: `runs` fresh pools, the median wall time.
/// One W1 round for one system: a fresh pool, 100 tasks × one request.
async fn w1_round(
    system: System,
    target: &Target,
    log: &std::path::Path,
    round: usize,
) -> Result<(Outcome, Option<u64>), String> {
    let sizing = Sizing {
        size: 5,
        overflow: 10,
    };
    let app = format!("peers-w1-{}-r{round}", system.name());
    let handle = Arc::new(Handle::build(system, target, &app, sizing).await?);
    let outcome = drive(handle.clone(), Op::Sleep, 100, 100, Duration::from_secs(60)).await;
    let conns = connections_opened(log, &app);
    if let Some(first) = &outcome.first_error {
        eprint_flush(&format!(
            "  {} w1 round {round}: {} errors, first: {first}",
            system.name(),
            outcome.errors
        ));
    }
    if let Ok(h) = Arc::try_unwrap(handle) {
        h.close().await;
    }
    // Let the server reap the backends before the next pool connects.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok((outcome, conns))
}

/// W1 without a pool, the reference for what any pool that connects on demand can reach: 15
/// connections opened at once, each running requests back to back from a shared count of 100
/// until none is left. Latencies are completion times since the start, as for the pools.
async fn w1_no_pool_round(
    target: &Target,
    log: &std::path::Path,
    round: usize,
) -> Result<(Outcome, Option<u64>), String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let app = format!("peers-w1-raw-15-r{round}");
    let config = target.pg_config(&app);
    let connector = target.connector();
    let left = Arc::new(AtomicU64::new(100));
    let start = std::time::Instant::now();
    let mut joins = Vec::new();
    for _ in 0..15 {
        let (config, left, connector) = (config.clone(), left.clone(), connector.clone());
        joins.push(tokio::spawn(async move {
            let client = connector.connect(&config).await?;
            let st = client.prepare(systems::SLEEP_SQL).await?;
            let mut done = Vec::new();
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                client.query_one(&st, &[]).await?;
                done.push(start.elapsed());
            }
            Ok::<_, tokio_postgres::Error>(done)
        }));
    }
    let mut hist = driver::new_hist();
    let mut ops = 0;
    for j in joins {
        let done = j
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        for d in done {
            hist.saturating_record(d.as_nanos() as u64);
            ops += 1;
        }
    }
    let wall = start.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcome = Outcome {
        ops,
        wall,
        hist,
        errors: 100 - ops,
        first_error: None,
    };
    Ok((outcome, connections_opened(log, &app)))
}

/// The server's own W1 floor: 7 back-to-back `pg_sleep(0.1)` on one open connection (the most
/// any of 15 connections runs for 100 requests), median of `runs`. `pg_sleep` overshoots its
/// argument, so this is above 7 × 0.1 s.
async fn sleep_floor(target: &Target, runs: usize) -> Result<f64, String> {
    let client = target
        .connector()
        .connect(&target.pg_config("peers-w1-floor"))
        .await
        .map_err(|e| e.to_string())?;
    let st = client
        .prepare(systems::SLEEP_SQL)
        .await
        .map_err(|e| e.to_string())?;
    let mut walls = Vec::new();
    for _ in 0..runs.max(1) {
        let t0 = std::time::Instant::now();
        for _ in 0..7 {
            client
                .query_one(&st, &[])
                .await
                .map_err(|e| e.to_string())?;
        }
        walls.push(t0.elapsed().as_secs_f64());
    }
    walls.sort_by(f64::total_cmp);
    Ok(walls[walls.len() / 2])
}

/// W1's row: the median round's wall time and connections, latencies over every round.
fn w1_row(system: System, results: Vec<(Outcome, Option<u64>)>, load: f64) -> Option<Row> {
    if results.is_empty() {
        return None;
    }
    let mut order: Vec<usize> = (0..results.len()).collect();
    order.sort_by(|&a, &b| results[a].0.wall.cmp(&results[b].0.wall));
    let median = order[order.len() / 2];
    let mut hist = driver::new_hist();
    let mut errors = 0;
    for (o, _) in &results {
        let _ = hist.add(&o.hist);
        errors += o.errors;
    }
    let (m, conns) = &results[median];
    let merged = Outcome {
        ops: m.ops,
        wall: m.wall,
        hist,
        errors,
        first_error: None,
    };
    let mut row = Row::from_outcome(system, "w1", &merged, *conns, load);
    // Every request starts at once, so the sorted latencies are the completion timeline: the
    // 15th is the end of the first wave (connecting + first query), the rest are handoffs.
    let ms = |v: u64| json!((v as f64 / 1e4).round() / 100.0);
    row.extra.insert(
        "first_wave_done_ms".into(),
        ms(m.hist.value_at_quantile(0.15)),
    );
    row.extra.insert("first_done_ms".into(), ms(m.hist.min()));
    row.extra.insert("last_done_ms".into(), ms(m.hist.max()));
    row.extra.insert(
        "runs_wall_s".into(),
        json!(results
            .iter()
            .map(|(o, _)| (o.wall.as_secs_f64() * 10000.0).round() / 10000.0)
            .collect::<Vec<_>>()),
    );
    row.extra.insert(
        "runs_connections_opened".into(),
        json!(results.iter().map(|(_, c)| *c).collect::<Vec<_>>()),
    );
    Some(row)
}

/// Who opens the connections of the `connect` workload.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Opener {
    /// `tokio_postgres::Config::connect`, as deadpool and bb8 do.
    TokioPostgres,
    /// A tidepool pool (its own handshake: SCRAM keys derived once per pool).
    Tidepool,
}

/// Connections held open by one `connect` round.
enum Opened {
    Clients(Vec<tokio_postgres::Client>),
    Pool(tidepool::Pool, Vec<tidepool::PooledConnection>),
}

impl Opener {
    fn name(self) -> &'static str {
        match self {
            Opener::TokioPostgres => "tokio-postgres",
            Opener::Tidepool => "tidepool",
        }
    }

    /// Opens `n` connections at once; returns them with each one's time to open.
    async fn open(
        self,
        target: &Target,
        app: &str,
        n: usize,
    ) -> Result<(Opened, Vec<Duration>), String> {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        match self {
            Opener::TokioPostgres => {
                // One connector (with --tls, one rustls ClientConfig) per opening, as a tidepool
                // pool has its own.
                let config = target.pg_config(app);
                let connector = target.connector();
                let joins: Vec<_> = (0..n)
                    .map(|_| {
                        let (config, connector) = (config.clone(), connector.clone());
                        tokio::spawn(async move {
                            let t0 = std::time::Instant::now();
                            let client = connector.connect(&config).await?;
                            let took = t0.elapsed();
                            Ok::<_, tokio_postgres::Error>((client, took))
                        })
                    })
                    .collect();
                let (clients, took) = joined(joins).await?;
                Ok((Opened::Clients(clients), took))
            }
            Opener::Tidepool => {
                let settings = tidepool::Settings {
                    database_url: Some(
                        tidepool::DatabaseUrl::parse(&target.url(app)).map_err(|e| err(&e))?,
                    ),
                    pool_size: n,
                    max_overflow: Some(0),
                    application_name: Some(app.to_owned()),
                    ..tidepool::Settings::default()
                };
                let pool = tidepool::Pool::new(settings).map_err(|e| err(&e))?;
                let joins: Vec<_> = (0..n)
                    .map(|_| {
                        let pool = pool.clone();
                        tokio::spawn(async move {
                            let t0 = std::time::Instant::now();
                            let conn = pool.get().await?;
                            Ok::<_, tidepool::Error>((conn, t0.elapsed()))
                        })
                    })
                    .collect();
                let (conns, took) = joined(joins).await?;
                Ok((Opened::Pool(pool, conns), took))
            }
        }
    }
}

/// Waits for every opening task: the connections, and each one's time to open.
async fn joined<C, E: std::fmt::Display>(
    joins: Vec<tokio::task::JoinHandle<Result<(C, Duration), E>>>,
) -> Result<(Vec<C>, Vec<Duration>), String> {
    let (mut conns, mut took) = (Vec::new(), Vec::new());
    for j in joins {
        let (c, t) = j
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        conns.push(c);
        took.push(t);
    }
    Ok((conns, took))
}

impl Opened {
    fn close(self) {
        match self {
            Opened::Clients(clients) => drop(clients),
            Opened::Pool(pool, conns) => {
                drop(conns);
                pool.close();
            }
        }
    }
}

/// What W1 pays before its first query on a fresh pool: 15 connections opened at once (TCP,
/// with `--tls` the TLS handshake, startup, SCRAM-SHA-256(-PLUS), backend start) by
/// tokio-postgres and by a tidepool pool, median wall time of `runs` rounds, and the client CPU
/// each connection costs. A pool that opens
/// connections on demand pays about the wall time on top of W1's 0.70 s floor.
async fn connect15(
    target: &Target,
    log: &std::path::Path,
    runs: usize,
) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for opener in [Opener::TokioPostgres, Opener::Tidepool] {
        let load = load1();
        let cpu0 = cpu_times();
        let mut walls = Vec::new();
        let mut hist = driver::new_hist();
        let mut opened = Vec::new();
        for run in 1..=runs.max(1) {
            let app = format!("peers-connect-{}-r{run}", opener.name());
            let start = std::time::Instant::now();
            let (conns, took) = opener.open(target, &app, 15).await?;
            walls.push(start.elapsed());
            for t in took {
                hist.saturating_record(t.as_nanos() as u64);
            }
            opened.push(connections_opened(log, &app));
            conns.close();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let cpu1 = cpu_times();
        walls.sort();
        let wall = walls[walls.len() / 2];
        // One connection at a time: what a single connect costs when it has the machine to
        // itself (for tidepool, in a pool that has derived its keys already).
        let mut single = Vec::new();
        let (keep, _) = opener.open(target, "peers-connect-single", 1).await?;
        for _ in 0..5 {
            let (conns, took) = opener.open(target, "peers-connect-single", 1).await?;
            single.push(took[0]);
            conns.close();
        }
        keep.close();
        single.sort();
        let o = Outcome {
            ops: 15,
            wall,
            hist,
            errors: 0,
            first_error: None,
        };
        let mut row = Row::from_outcome(
            System::Raw10,
            "connect",
            &o,
            opened.last().copied().flatten(),
            load,
        );
        row.system = match (opener, target.tls.is_some()) {
            (Opener::TokioPostgres, true) => "tokio-postgres+rustls".into(),
            _ => opener.name().into(),
        };
        row.extra.insert(
            "single_connect_ms".into(),
            json!((single[single.len() / 2].as_secs_f64() * 1e5).round() / 100.0),
        );
        let per_conn = ((cpu1.0 + cpu1.1) - (cpu0.0 + cpu0.1)) / (15 * runs.max(1)) as f64;
        row.extra.insert(
            "client_cpu_ms_per_connection".into(),
            json!((per_conn * 1e5).round() / 100.0),
        );
        row.extra.insert(
            "runs_wall_s".into(),
            json!(walls
                .iter()
                .map(|w| (w.as_secs_f64() * 10000.0).round() / 10000.0)
                .collect::<Vec<_>>()),
        );
        rows.push(row);
    }
    Ok(rows)
}

/// W2 or W3 for one system: warm-up, then the timed run, on one pool.
#[allow(clippy::too_many_arguments)]
/// One W2/W3 round of one system.
struct Round {
    outcome: Outcome,
    conns: Option<u64>,
    /// Client user, client system and machine busy CPU seconds during the timed run.
    cpu: (f64, f64, f64),
    /// Load average when the round started.
    load1: f64,
}

/// One round of W2 or W3 for one system: a fresh pool, an untimed warm-up (opens the
/// connections, prepares the statement on each), then the timed run.
#[allow(clippy::too_many_arguments)]
async fn steady_round(
    system: System,
    workload: &'static str,
    op: Op,
    target: &Target,
    log: &std::path::Path,
    sizing: Sizing,
    tasks: usize,
    warm: u64,
    total: u64,
    cap: Duration,
    round: usize,
) -> Result<Round, String> {
    // raw-10-serial: one task per connection, so each has one query in flight at a time.
    let tasks = if system == System::Raw10Serial {
        sizing.max()
    } else {
        tasks
    };
    let load1 = load1();
    let app = format!("peers-{workload}-{}-r{round}", system.name());
    let handle = Arc::new(Handle::build(system, target, &app, sizing).await?);
    let w = drive(handle.clone(), op, tasks, warm, cap).await;
    if let Some(e) = &w.first_error {
        eprint_flush(&format!(
            "  {} {workload} warm-up: {} errors, first: {e}",
            system.name(),
            w.errors
        ));
    }
    let cpu0 = cpu_times();
    let outcome = drive(handle.clone(), op, tasks, total, cap).await;
    let cpu1 = cpu_times();
    if let Some(e) = &outcome.first_error {
        eprint_flush(&format!(
            "  {} {workload}: {} errors, first: {e}",
            system.name(),
            outcome.errors
        ));
    }
    let conns = connections_opened(log, &app);
    if let Ok(h) = Arc::try_unwrap(handle) {
        h.close().await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(Round {
        outcome,
        conns,
        cpu: (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1, cpu1.2 - cpu0.2),
        load1,
    })
}

/// The row of one system: the median round by ops/s; latencies over every round.
fn steady_row(system: System, workload: &'static str, rounds: Vec<Round>) -> Option<Row> {
    if rounds.is_empty() {
        return None;
    }
    let rate = |r: &Round| r.outcome.ops as f64 / r.outcome.wall.as_secs_f64();
    let mut order: Vec<usize> = (0..rounds.len()).collect();
    order.sort_by(|&a, &b| rate(&rounds[a]).total_cmp(&rate(&rounds[b])));
    let m = &rounds[order[order.len() / 2]];
    let mut hist = driver::new_hist();
    let mut errors = 0;
    for r in &rounds {
        let _ = hist.add(&r.outcome.hist);
        errors += r.outcome.errors;
    }
    let merged = Outcome {
        ops: m.outcome.ops,
        wall: m.outcome.wall,
        hist,
        errors,
        first_error: None,
    };
    let mut row = Row::from_outcome(system, workload, &merged, m.conns, m.load1);
    row.extra.insert(
        "rounds_load1".into(),
        json!(rounds.iter().map(|r| r.load1).collect::<Vec<_>>()),
    );
    row.extra.insert(
        "rounds_ops_per_s".into(),
        json!(rounds.iter().map(|r| rate(r).round()).collect::<Vec<_>>()),
    );
    let per_op =
        |secs: f64| json!((secs * 1e6 / m.outcome.ops.max(1) as f64 * 100.0).round() / 100.0);
    // CPU spent by this process (pool + tokio + driver) and by the whole machine (this process,
    // the server, the kernel, and anyone else's work) per operation, in the median round.
    row.extra
        .insert("client_user_us_per_op".into(), per_op(m.cpu.0));
    row.extra
        .insert("client_sys_us_per_op".into(), per_op(m.cpu.1));
    row.extra
        .insert("machine_cpu_us_per_op".into(), per_op(m.cpu.2));
    Some(row)
}

/// (user and system CPU seconds used by this process, busy CPU seconds of the whole machine),
/// from /proc (clock-tick resolution, 10 ms).
fn cpu_times() -> (f64, f64, f64) {
    let tick = 100.0;
    let own = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_owned();
            let f: Vec<&str> = rest.split_whitespace().collect();
            // After the command name: state is field 3; utime and stime are fields 14 and 15.
            let ut: f64 = f.get(11)?.parse().ok()?;
            let st: f64 = f.get(12)?.parse().ok()?;
            Some((ut / tick, st / tick))
        })
        .unwrap_or((f64::NAN, f64::NAN));
    let machine = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?;
            let v: Vec<f64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal ...
            let busy = v.iter().take(8).sum::<f64>() - v.get(3)? - v.get(4)?;
            Some(busy / tick)
        })
        .unwrap_or(f64::NAN);
    (own.0, own.1, machine)
}

fn render_table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "\n{:<22} {:<8} {:>9} {:>8} {:>10} {:>9} {:>9} {:>10} {:>6} {:>6} {:>5}\n",
        "system",
        "workload",
        "ops",
        "wall_s",
        "ops/s",
        "p50_us",
        "p99_us",
        "p99.9_us",
        "errors",
        "conns",
        "load"
    ));
    let f = |v: f64, d: usize| {
        if v.is_finite() {
            format!("{v:.d$}")
        } else {
            "-".into()
        }
    };
    for r in rows {
        s.push_str(&format!(
            "{:<22} {:<8} {:>9} {:>8} {:>10} {:>9} {:>9} {:>10} {:>6} {:>6} {:>5}\n",
            r.system,
            r.workload,
            r.ops,
            f(r.wall_s, 3),
            f(r.ops_per_s, 0),
            f(r.p50_us, 1),
            f(r.p99_us, 1),
            f(r.p999_us, 1),
            r.errors,
            r.connections_opened.map_or("-".into(), |c| c.to_string()),
            f(r.load1, 2),
        ));
        if r.tls {
            // Before the newline: every row of a TLS run says so.
            s.insert_str(s.len() - 1, "  TLS");
        }
    }
    s
}

/// The issue-6 targets, judged from this run's rows (only those whose rows exist).
fn render_verdicts(rows: &[Row]) -> String {
    let get = |sys: &str, w: &str| rows.iter().find(|r| r.system == sys && r.workload == w);
    let peers = |w: &str| -> Vec<&Row> {
        rows.iter()
            .filter(|r| {
                r.workload == w
                    && !r.system.starts_with("tidepool")
                    && !r.system.starts_with("raw-")
            })
            .collect()
    };
    let mark = |ok: bool| if ok { "MET    " } else { "NOT MET" };
    let mut out: BTreeMap<u8, String> = BTreeMap::new();
    if let Some(t) = get("tidepool", "w1") {
        let floor = 0.70;
        let best_peer = peers("w1")
            .into_iter()
            .min_by(|a, b| a.wall_s.total_cmp(&b.wall_s));
        let within = t.wall_s <= floor * 1.03;
        let below = best_peer.is_none_or(|p| t.wall_s < p.wall_s);
        if let Some(r) = get("raw-15", "w1") {
            let sleep7 = r.extra.get("sleep7_s").and_then(|v| v.as_f64());
            out.insert(0, format!(
                "note    W1 without a pool: 15 dedicated connections opened at once take {:.3} s (median); {}\n",
                r.wall_s,
                sleep7.map_or("-".into(), |s| format!(
                    "7 back-to-back pg_sleep(0.1) on one open connection take {s:.3} s, the server's own floor (limit {:.3} s)",
                    floor * 1.03
                ))
            ));
        }
        if let (Some(c), Some(ours)) = (
            get("tokio-postgres", "connect").or(get("tokio-postgres+rustls", "connect")),
            get("tidepool", "connect"),
        ) {
            // The server's floor when measured (pg_sleep overshoots 0.1 s), else the nominal one.
            let sleeps = get("raw-15", "w1")
                .and_then(|r| r.extra.get("sleep7_s"))
                .and_then(|v| v.as_f64())
                .unwrap_or(floor);
            out.insert(1, format!(
                "note    W1: opening 15 connections at once takes {:.3} s here with {}, {:.3} s through tidepool (median of runs); a pool that connects on demand ends W1 at about the floor plus that: {:.3} s\n",
                c.wall_s,
                c.system,
                ours.wall_s,
                sleeps + ours.wall_s
            ));
        }
        // The two halves of the target, judged apart: a pool can beat every peer while the
        // server's own floor and connecting keep everyone above 0.70 s + 3%.
        let clean = t.errors == 0 && t.connections_opened == Some(15);
        out.insert(
            2,
            format!(
            "{} W1 vs peers: tidepool median {:.3} s; fastest peer {}; errors {}; connections {}\n",
            mark(below && clean),
            t.wall_s,
            best_peer.map_or("-".into(), |p| format!("{} {:.3} s", p.system, p.wall_s)),
            t.errors,
            t.connections_opened.map_or("-".into(), |c| c.to_string())
        ),
        );
        out.insert(
            3,
            format!(
                "{} W1 floor: tidepool median {:.3} s (limit {:.3} s = floor 0.70 s + 3%)\n",
                mark(within && clean),
                t.wall_s,
                floor * 1.03,
            ),
        );
    }
    // `connect`: 15 at once, by tokio-postgres alone and by tidepool, with the client's CPU.
    {
        let lines: Vec<String> = rows
            .iter()
            .filter(|r| r.workload == "connect")
            .filter_map(|r| connect_detail(r).map(|d| format!("{} {d}", r.system)))
            .collect();
        if !lines.is_empty() {
            out.insert(
                4,
                format!(
                    "note    connect, 15 at once{}: {}\n",
                    if rows.iter().any(|r| r.tls) {
                        " over TLS"
                    } else {
                        ""
                    },
                    lines.join("; ")
                ),
            );
        }
    }
    // W2 for checkout + query (`tidepool`) and for the statement API (`tidepool-pipelined`).
    let w2_line = |t: &Row| -> String {
        let best_peer = peers("w2")
            .into_iter()
            .max_by(|a, b| a.ops_per_s.total_cmp(&b.ops_per_s));
        let raw = get("raw-10", "w2");
        let serial = get("raw-10-serial", "w2");
        let above = best_peer.is_none_or(|p| t.ops_per_s > p.ops_per_s);
        let raw_ok = raw.is_none_or(|r| t.ops_per_s >= 0.95 * r.ops_per_s);
        let ok = above && raw_ok && t.p999_us < 5000.0 && t.errors == 0;
        format!(
            "{} W2: {} {:.0}/s, p99.9 {:.0} µs (< 5000); fastest peer {}; raw-10 {}; raw-10-serial {}\n",
            mark(ok),
            t.system,
            t.ops_per_s,
            t.p999_us,
            best_peer.map_or("-".into(), |p| format!("{} {:.0}/s", p.system, p.ops_per_s)),
            raw.map_or("-".into(), |r| format!("{:.0}/s ({} = {:.1}%, needs 95%)", r.ops_per_s, t.system, 100.0 * t.ops_per_s / r.ops_per_s)),
            serial.map_or("-".into(), |r| format!("{:.0}/s ({} = {:.1}%)", r.ops_per_s, t.system, 100.0 * t.ops_per_s / r.ops_per_s))
        )
    };
    if let Some(t) = get("tidepool-pipelined", "w2") {
        out.insert(15, w2_line(t));
        if let Some(pg) = get("pgbench-simple", "pgbench") {
            out.insert(16, format!(
                "{} W2 stretch: tidepool-pipelined {:.0}/s vs pgbench simple {:.0}/s (prepared {})\n",
                mark(t.ops_per_s > pg.ops_per_s),
                t.ops_per_s,
                pg.ops_per_s,
                get("pgbench-prepared", "pgbench").map_or("-".into(), |r| format!("{:.0}/s", r.ops_per_s))
            ));
        }
    }
    if let Some(t) = get("tidepool", "w2") {
        out.insert(10, w2_line(t));
        if let Some(p) = get("tidepool-preping", "w2") {
            let ratio = p.ops_per_s / t.ops_per_s;
            out.insert(11, format!(
                "{} W2 pre-ping: tidepool-preping {:.0}/s = {:.1}% of pre-ping off (needs 95%), p99.9 {:.0} µs{}\n",
                mark(ratio >= 0.95),
                p.ops_per_s,
                ratio * 100.0,
                p.p999_us,
                get("tidepool-preping-every", "w2").map_or(String::new(), |e| format!(
                    "; pinging every checkout (window 0) {:.0}/s = {:.1}%",
                    e.ops_per_s,
                    100.0 * e.ops_per_s / t.ops_per_s
                ))
            ));
        }
        if let Some(pg) = get("pgbench-simple", "pgbench") {
            out.insert(
                12,
                format!(
                    "{} W2 stretch: tidepool {:.0}/s vs pgbench simple {:.0}/s (prepared {})\n",
                    mark(t.ops_per_s > pg.ops_per_s),
                    t.ops_per_s,
                    pg.ops_per_s,
                    get("pgbench-prepared", "pgbench")
                        .map_or("-".into(), |r| format!("{:.0}/s", r.ops_per_s))
                ),
            );
        }
    }
    for (key, w) in [(13u8, "w3"), (14u8, "w3-hold")] {
        let Some(t) = get("tidepool", w) else {
            continue;
        };
        let best_peer = peers(w)
            .into_iter()
            .filter(|r| !System::parse(&r.system).is_some_and(|s| s.pings()))
            .max_by(|a, b| a.ops_per_s.total_cmp(&b.ops_per_s));
        let ratio = best_peer.map(|p| t.ops_per_s / p.ops_per_s);
        let ok = ratio.is_none_or(|r| r >= 1.3) && t.p999_us < 1000.0 && t.errors == 0;
        out.insert(
            key,
            format!(
                "{} {}: tidepool {:.0}/s, p99.9 {:.0} µs (< 1000); fastest peer {}{}\n",
                mark(ok),
                w.to_uppercase(),
                t.ops_per_s,
                t.p999_us,
                best_peer.map_or("-".into(), |p| format!(
                    "{} {:.0}/s (p99.9 {:.0} µs)",
                    p.system, p.ops_per_s, p.p999_us
                )),
                ratio.map_or("".into(), |r| format!(", ratio {r:.2}× (needs 1.30×)"))
            ),
        );
    }
    if out.is_empty() {
        return String::new();
    }
    let mut s = format!(
        "\nissue 6 targets, this run{}:\n",
        if rows.iter().any(|r| r.tls) {
            " (OVER TLS)"
        } else {
            ""
        }
    );
    for v in out.values() {
        s.push_str(v);
    }
    s
}
