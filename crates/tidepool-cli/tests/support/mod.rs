//! Running the built `tidepool` binary in the command tests: a clean environment, an empty
//! working directory (no `.env`), captured output and a deadline.
#![allow(dead_code)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tidepool_cluster::tls::url_path;

/// What a run of the binary left behind.
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Fails the test, showing both streams, unless the process exited with `code`.
    pub fn assert_code(&self, code: i32) {
        assert_eq!(
            self.code,
            Some(code),
            "exit status; stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
    }
}

/// Runs `tidepool ARGS` in a fresh empty directory with only `env` among tidepool's variables,
/// killing it and failing the test after `deadline`.
pub fn run_tidepool(name: &str, env: &[(&str, &str)], args: &[&str], deadline: Duration) -> Output {
    let dir = std::env::temp_dir().join(format!("tidepool-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create work dir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidepool"));
    cmd.args(args)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "warn");
    for var in tidepool::settings::VARIABLES {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn tidepool");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let until = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for tidepool") {
            break status;
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tidepool {args:?} did not finish within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = std::fs::remove_dir_all(&dir);
    Output {
        code: status.code(),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// The one JSON object a `--json` run prints on stdout.
pub fn one_json_line(out: &Output) -> Value {
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "--json prints one line:\n{}", out.stdout);
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", out.stdout))
}

// ---------------------------------------------------------------------------------------------
// TLS: TLS-only clusters, URLs carrying libpq's TLS parameters, the server's witnesses

/// A TLS-only cluster (pg_hba `hostssl`: plaintext TCP is refused with "no encryption"; the Unix
/// socket stays plaintext `trust`, for observers), optionally with `log_connections` on.
pub fn tls_only_cluster(log_connections: bool) -> tidepool_cluster::Cluster {
    let mut builder =
        tidepool_cluster::Cluster::builder().tls(tidepool_cluster::tls::TlsMode::Only);
    if log_connections {
        builder = builder.setting("log_connections", "on");
    }
    builder
        .start()
        .unwrap_or_else(|e| panic!("these tests need a real PostgreSQL server with TLS: {e}"))
}

/// The cluster's URL (its role and password, TCP to 127.0.0.1) with
/// `?sslmode=verify-full&sslrootcert=ROOT`: what a user puts in `DATABASE_URL`.
pub fn verify_full_url(cluster: &tidepool_cluster::Cluster, root: &std::path::Path) -> String {
    format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        cluster.url(),
        url_path(root)
    )
}

/// [`verify_full_url`] with the cluster's own CA certificate.
pub fn verify_full_url_own_ca(cluster: &tidepool_cluster::Cluster) -> String {
    let tls = cluster.tls().expect("a TLS cluster");
    verify_full_url(cluster, tls.ca_cert_path())
}

/// Backends of `application_name` on the server, as (all, encrypted per `pg_stat_ssl`), read by
/// an observer over the Unix socket (plaintext, `trust`).
pub fn backends_by_ssl(cluster: &tidepool_cluster::Cluster, application_name: &str) -> (i64, i64) {
    use tidepool::tokio_postgres::{Config, NoTls};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut config = Config::new();
        config
            .host_path(cluster.data_dir())
            .port(cluster.port())
            .user(cluster.user())
            .dbname(cluster.dbname())
            .application_name("observer")
            .connect_timeout(Duration::from_secs(10));
        let (client, connection) = config
            .connect(NoTls)
            .await
            .expect("observer connects over the Unix socket");
        let driver = tokio::spawn(connection);
        let row = client
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE s.ssl) \
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.application_name = $1",
                &[&application_name],
            )
            .await
            .expect("pg_stat_ssl readable");
        drop(client);
        let _ = driver.await;
        (row.get(0), row.get(1))
    })
}

/// The server log's "connection authorized" lines for `application_name` (`log_connections`).
pub fn authorized_lines(
    cluster: &tidepool_cluster::Cluster,
    application_name: &str,
) -> Vec<String> {
    let log = std::fs::read_to_string(cluster.log_file()).unwrap_or_default();
    let needle = format!("application_name={application_name}");
    log.lines()
        .filter(|l| l.contains("connection authorized") && l.contains(&needle))
        .map(str::to_owned)
        .collect()
}

/// A directory of the test's own, removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "tidepool-cli-test-{}-{name}-files",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA certificate file of a CA that signed nothing of the clusters' (`Ca::new("other")`),
/// written in `dir`.
pub fn other_ca_cert(dir: &TempDir) -> std::path::PathBuf {
    let path = dir.0.join("other-ca.crt");
    tidepool_cluster::tls::Ca::new("other")
        .expect("a CA")
        .write_cert(&path)
        .expect("CA certificate written");
    path
}
