//! `tidepool doctor` against real PostgreSQL with a small `max_connections`: the built binary is
//! run with `DATABASE_URL` pointing at a throwaway cluster (each test has its own).

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{one_json_line, run_tidepool, Output};
use tidepool::tokio_postgres::{self, NoTls};
use tidepool_cluster::Cluster;

const RUN_DEADLINE: Duration = Duration::from_secs(120);

/// `max_connections` of the test clusters; 3 of them are superuser-reserved (the default).
const MAX_CONNECTIONS: u32 = 20;
const APPLICATION_SLOTS: u64 = 17;

/// Runs `tidepool doctor ARGS` with only `env` among tidepool's variables. The check connects as
/// application `doctor-test`, so backends of earlier runs still exiting count as this
/// application's, never as another's.
fn doctor(name: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut all_env = vec![("DB_APPLICATION_NAME", "doctor-test")];
    all_env.extend_from_slice(env);
    let mut all_args = vec!["doctor"];
    all_args.extend_from_slice(args);
    run_tidepool(&format!("doctor-{name}"), &all_env, &all_args, RUN_DEADLINE)
}

fn json(out: &Output) -> Value {
    assert!(
        matches!(out.code, Some(0 | 1)),
        "exit status {:?}; stderr:\n{}\nstdout:\n{}",
        out.code,
        out.stderr,
        out.stdout
    );
    one_json_line(out)
}

fn small_cluster() -> Cluster {
    Cluster::builder()
        .max_connections(MAX_CONNECTIONS)
        .start()
        .expect("start cluster")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Opens `n` connections as `user`/`password` with `application_name`, kept open until the
/// clients are dropped.
fn hold_connections(
    rt: &tokio::runtime::Runtime,
    cluster: &Cluster,
    user: &str,
    password: &str,
    application_name: &str,
    n: usize,
) -> Vec<tokio_postgres::Client> {
    rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..n {
            let mut config = tokio_postgres::Config::new();
            config
                .host(cluster.host())
                .port(cluster.port())
                .user(user)
                .password(password)
                .dbname(cluster.dbname())
                .application_name(application_name)
                .connect_timeout(Duration::from_secs(10));
            let (client, connection) = config.connect(NoTls).await.expect("connect");
            tokio::spawn(connection);
            clients.push(client);
        }
        clients
    })
}

/// The seed's defaults (5 + 10, buffer 20) need 35 connections; a server with 17 application
/// slots cannot give them: exit 1, with the numbers.
#[test]
fn over_budget_exits_one_with_the_numbers() {
    let cluster = small_cluster();
    let url = cluster.url();
    let out = doctor("over", &[("DATABASE_URL", &url)], &[]);
    out.assert_code(1);
    let text = &out.stdout;
    for needle in [
        "max_connections",
        &format!("{MAX_CONNECTIONS}"),
        "superuser_reserved_connections",
        "= slots for applications",
        &format!("{APPLICATION_SLOTS}"),
        "(5 + 10)",
        "= required",
        "35",
        "-18",
        "OVER BUDGET: 35 connections required, 17 available",
        // (17 − 20 buffer) leaves nothing per instance.
        "recommended: nothing fits",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    assert!(
        !text.contains(cluster.password()),
        "password shown:\n{text}"
    );

    // With a smaller buffer something fits: 1 : 2 as in the seed.
    let out = doctor("over-buffer", &[("DATABASE_URL", &url)], &["--buffer", "5"]);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    // (17 − 5) / 1 = 12 per instance: 4 + 8.
    assert!(
        out.stdout
            .contains("recommended per instance: DB_POOL_SIZE=4 DB_MAX_OVERFLOW=8"),
        "{}",
        out.stdout
    );
}

/// A deployment that fits exits 0.
#[test]
fn within_budget_exits_zero() {
    let cluster = small_cluster();
    let url = cluster.url();
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("DB_POOL_SIZE", "2"),
        ("DB_MAX_OVERFLOW", "4"),
    ];
    // 2 × (2 + 4) × 1 + 5 = 17 ≤ 17.
    let out = doctor("within", &env, &["--instances", "2", "--buffer", "5"]);
    out.assert_code(0);
    assert!(
        out.stdout.contains("verdict: within budget (17 of 17"),
        "{}",
        out.stdout
    );
    // One more instance does not fit.
    let out = doctor("within-3", &env, &["--instances", "3", "--buffer", "5"]);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    // DB_INSTANCES is the default for --instances.
    let env3 = [env[0], env[1], env[2], ("DB_INSTANCES", "3")];
    let out = doctor("within-env", &env3, &["--buffer", "5"]);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
}

/// Connections another application holds come off the budget.
#[test]
fn other_applications_shrink_the_budget() {
    let cluster = small_cluster();
    let url = cluster.url();
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("DB_POOL_SIZE", "2"),
        ("DB_MAX_OVERFLOW", "4"),
    ];
    let args = ["--buffer", "5", "--json"];
    let before = json(&doctor("others-before", &env, &args));
    assert_eq!(before["other_connections"], 0, "{before}");
    assert_eq!(before["available"], APPLICATION_SLOTS, "{before}");
    assert_eq!(before["within_budget"], true, "{before}");

    let rt = runtime();
    let held = hold_connections(
        &rt,
        &cluster,
        cluster.user(),
        cluster.password(),
        "other",
        8,
    );
    let out = doctor("others-after", &env, &args);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let after = json(&out);
    assert_eq!(after["other_connections"], 8, "{after}");
    assert_eq!(after["available"], APPLICATION_SLOTS - 8, "{after}");
    assert_eq!(after["required"], 11, "{after}");
    assert_eq!(after["headroom"], -2, "{after}");
    assert_eq!(after["verdict"], "over budget", "{after}");
    let groups = after["server"]["connections"]
        .as_array()
        .expect("connections");
    let other = groups
        .iter()
        .find(|g| g["application_name"] == "other")
        .unwrap_or_else(|| panic!("no group for application other: {after}"));
    assert_eq!(other["count"], 8, "{after}");
    // The table names them too.
    let out = doctor("others-table", &env, &["--buffer", "5"]);
    assert!(
        out.stdout.contains("other (role tidepool)"),
        "{}",
        out.stdout
    );
    drop(held);
}

/// A role's connection limit caps the budget; other applications under the role count against it.
#[test]
fn role_connection_limit_caps_the_budget() {
    let cluster = small_cluster();
    let rt = runtime();
    let admin = hold_connections(
        &rt,
        &cluster,
        cluster.user(),
        cluster.password(),
        "setup",
        1,
    );
    rt.block_on(
        admin[0]
            .batch_execute("CREATE ROLE limited LOGIN PASSWORD 'limited-pw' CONNECTION LIMIT 6"),
    )
    .expect("create role");
    drop(admin);
    let held = hold_connections(&rt, &cluster, "limited", "limited-pw", "cron", 2);
    let url = format!(
        "postgresql://limited:limited-pw@{}:{}/{}",
        cluster.host(),
        cluster.port(),
        cluster.dbname()
    );
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("DB_POOL_SIZE", "1"),
        ("DB_MAX_OVERFLOW", "2"),
    ];
    let out = doctor("role-limit", &env, &["--buffer", "0", "--json"]);
    let v = json(&out);
    assert_eq!(v["server"]["role"], "limited", "{v}");
    assert_eq!(v["server"]["role_superuser"], false, "{v}");
    assert_eq!(v["role_connection_limit"], 6, "{v}");
    assert_eq!(v["other_connections_same_role"], 2, "{v}");
    // min(17 − 2 others, 6 − 2 of the role's) = 4 ≥ 3 required.
    assert_eq!(v["available"], 4, "{v}");
    assert_eq!(out.code, Some(0), "{v}");
    drop(held);
}

/// `--json` is one object with the figures; `--db-cores` adds the seed's rule of thumb.
#[test]
fn json_report() {
    let cluster = small_cluster();
    let url = cluster.url();
    let out = doctor(
        "json",
        &[("DATABASE_URL", &url)],
        &[
            "--json",
            "--instances",
            "2",
            "--services",
            "2",
            "--buffer",
            "1",
            "--db-cores",
            "4",
        ],
    );
    let v = json(&out);
    assert_eq!(v["max_connections"], MAX_CONNECTIONS, "{v}");
    assert_eq!(v["superuser_reserved_connections"], 3, "{v}");
    assert_eq!(v["application_slots"], APPLICATION_SLOTS, "{v}");
    assert_eq!(v["deployment"]["instances"], 2, "{v}");
    assert_eq!(v["deployment"]["services"], 2, "{v}");
    // 2 × (5 + 10) × 2 + 1 = 61.
    assert_eq!(v["required"], 61, "{v}");
    assert_eq!(v["within_budget"], false, "{v}");
    // (17 − 1) / 4 = 4 per instance: 1 + 3.
    assert_eq!(v["max_per_instance"], 4, "{v}");
    assert_eq!(v["recommended"]["pool_size"], 1, "{v}");
    assert_eq!(v["recommended"]["max_overflow"], 3, "{v}");
    assert_eq!(v["server"]["role"], "tidepool", "{v}");
    assert_eq!(v["server"]["role_superuser"], true, "{v}");
    assert_eq!(v["seed_rule"]["connections"], 9, "{v}");
    assert_eq!(v["seed_rule"]["spindles"], 1, "{v}");
    assert!(
        v["server"]["server_version_num"].as_i64().unwrap_or(0) >= 90600,
        "{v}"
    );
    assert!(
        !out.stdout.contains(cluster.password()),
        "password shown: {v}"
    );
}

/// Nothing to check against: exit 2 with a clear message, no panic.
#[test]
fn cannot_check_exits_two() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("postgresql://nobody:secret@127.0.0.1:{port}/none");
    let out = doctor("unreachable", &[("DATABASE_URL", &url)], &[]);
    out.assert_code(2);
    assert!(out.stderr.contains("could not check"), "{}", out.stderr);
    assert!(out.stderr.contains(&port.to_string()), "{}", out.stderr);
    assert!(
        !out.stderr.contains("secret") && !out.stderr.contains("panicked"),
        "{}",
        out.stderr
    );

    let out = doctor("no-url", &[], &[]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("DATABASE_URL is not set"),
        "{}",
        out.stderr
    );
}

/// `DATABASE_URL` with `sslmode=verify-full&sslrootcert=CA` against a TLS-only server: the check
/// connects over TLS (the server's log says so) and reports the server's limits; the same URL
/// with `sslmode=disable` cannot check (exit 2), in the server's own words.
#[test]
fn tls_verify_full_against_a_tls_only_server() {
    let cluster = Cluster::builder()
        .max_connections(MAX_CONNECTIONS)
        .tls(tidepool_cluster::tls::TlsMode::Only)
        .setting("log_connections", "on")
        .start()
        .expect("start a TLS cluster");
    let url = support::verify_full_url_own_ca(&cluster);
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("DB_POOL_SIZE", "2"),
        ("DB_MAX_OVERFLOW", "4"),
    ];
    // 6 + 5 = 11 ≤ 17.
    let out = doctor("tls", &env, &["--buffer", "5", "--json"]);
    out.assert_code(0);
    let v = json(&out);
    assert_eq!(v["max_connections"], MAX_CONNECTIONS, "{v}");
    assert_eq!(v["application_slots"], APPLICATION_SLOTS, "{v}");
    assert_eq!(v["required"], 11, "{v}");
    assert_eq!(v["within_budget"], true, "{v}");
    assert_eq!(v["server"]["role"], "tidepool", "{v}");
    assert!(
        v["target"]
            .as_str()
            .unwrap_or_default()
            .contains("sslmode=verify-full"),
        "{v}"
    );
    assert!(
        !out.stdout.contains(cluster.password()) && !out.stderr.contains(cluster.password()),
        "password shown"
    );
    let lines = support::authorized_lines(&cluster, "doctor-test");
    assert!(
        !lines.is_empty(),
        "no connection authorized for doctor-test"
    );
    assert!(
        lines.iter().all(|l| l.contains("SSL enabled")),
        "a connection without TLS: {lines:#?}"
    );

    let plain = format!("{}?sslmode=disable", cluster.url());
    let out = doctor("tls-disable", &[("DATABASE_URL", &plain)], &[]);
    out.assert_code(2);
    assert!(out.stderr.contains("could not check"), "{}", out.stderr);
    assert!(out.stderr.contains("no encryption"), "{}", out.stderr);
    assert!(
        !out.stderr.contains(cluster.password()) && !out.stderr.contains("panicked"),
        "{}",
        out.stderr
    );
}

/// With read replicas, every server is checked with the sizes that apply to it: the primary
/// with `DB_POOL_SIZE`/`DB_MAX_OVERFLOW`, each replica with `DB_REPLICA_POOL_SIZE`/
/// `DB_REPLICA_MAX_OVERFLOW`. One over budget makes the whole verdict "over budget" (exit 1),
/// and the report names each host.
#[test]
fn every_host_is_checked() {
    let primary = small_cluster();
    let standby = primary.standby().expect("start a standby");
    let (url, replica_url) = (primary.url(), standby.url());
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("DATABASE_REPLICA_URL", replica_url.as_str()),
        ("DB_POOL_SIZE", "2"),
        ("DB_MAX_OVERFLOW", "4"),
        ("DB_REPLICA_POOL_SIZE", "5"),
    ];
    // Primary: 2 × (2 + 4) + 5 = 17 ≤ 17. Replica: 2 × (5 + 4) + 5 = 23 > 17.
    let args = ["--instances", "2", "--buffer", "5"];
    let out = doctor("hosts", &env, &args);
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    let primary_host = format!("127.0.0.1:{} (primary)", primary.port());
    let replica_host = format!("127.0.0.1:{} (replica)", standby.port());
    assert!(
        out.stdout.contains(&format!("== {primary_host} ==")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!("== {replica_host} ==")),
        "{}",
        out.stdout
    );
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let report = json(&doctor("hosts-json", &env, &json_args));
    assert_eq!(report["verdict"], "over budget");
    let hosts = report["hosts"].as_array().expect("a hosts list");
    assert_eq!(hosts.len(), 2, "{report}");
    assert_eq!(hosts[0]["target"], primary_host.as_str());
    assert_eq!(hosts[0]["verdict"], "within budget");
    assert_eq!(hosts[1]["target"], replica_host.as_str());
    assert_eq!(hosts[1]["verdict"], "over budget");
    // The first server's report stays at the top level, as with one server.
    assert_eq!(report["target"], primary_host.as_str());
    assert!(
        report["max_connections"].is_number() || report["server"].is_object(),
        "{report}"
    );
    // Within budget everywhere: exit 0.
    let env_fits = [
        env[0],
        env[1],
        env[2],
        env[3],
        ("DB_REPLICA_POOL_SIZE", "2"),
    ];
    doctor("hosts-fit", &env_fits, &args).assert_code(0);
    // A server that cannot be checked: exit 2, the others still reported.
    standby
        .stop(tidepool_cluster::ShutdownMode::Immediate)
        .expect("stop the standby");
    let out = doctor("hosts-down", &env_fits, &json_args);
    assert_eq!(out.code, Some(2), "{}\n{}", out.stdout, out.stderr);
    let report = one_json_line(&out);
    assert_eq!(report["verdict"], "could not check");
    let hosts = report["hosts"].as_array().expect("a hosts list");
    assert_eq!(hosts[0]["verdict"], "within budget");
    assert_eq!(hosts[1]["target"], replica_host.as_str());
    assert!(hosts[1]["error"].is_string(), "{report}");
}
