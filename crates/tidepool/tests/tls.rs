//! TLS connections the pool makes itself, against real servers, judged by libpq's rules: every
//! `sslmode` (and asyncpg's `ssl=` spellings) against a TLS-only, a TLS-optional and a
//! plaintext-only server, with the server's own `pg_stat_ssl` as the witness of encryption;
//! certificate verification (wrong CA, wrong host name, missing root file); client
//! certificates; SCRAM channel binding; cancel requests over TLS; many TLS connections at once.
//! Every failure is checked to be final (`Error::Connect`, not transient, well before the
//! checkout timeout) and never to show the password.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{eventually, server_count_where, settings, unix_observer};
use tidepool::{ConnectError, DatabaseUrl, Error, Pool, PooledConnection, Settings, SettingsError};
use tidepool_cluster::tls::{url_path, Ca, TlsMode};
use tidepool_cluster::Cluster;

/// The checkout timeout of every pool here; final failures must come well before it.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);
/// How soon a final failure must be reported.
const FAST: Duration = Duration::from_millis(2500);

fn tls_cluster(mode: TlsMode) -> Cluster {
    match Cluster::builder().tls(mode).start() {
        Ok(c) => c,
        Err(e) => panic!("these tests need a real PostgreSQL server with TLS: {e}"),
    }
}

/// A directory of this test's own, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "tidepool-tls-test-{name}-{}-{n}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating a temp dir");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The cluster's CA certificate file, as a query value.
fn ca(cluster: &Cluster) -> String {
    url_path(cluster.tls().expect("a TLS cluster").ca_cert_path())
}

/// The cluster's URL (its role and password, TCP to 127.0.0.1) with `query` appended.
fn url(cluster: &Cluster, query: &str) -> String {
    if query.is_empty() {
        cluster.url()
    } else {
        format!("{}?{query}", cluster.url())
    }
}

/// A pool for `url`, or why it could not be built.
fn try_pool(cluster: &Cluster, url: &str, app: &str) -> Result<Pool, Error> {
    Pool::new(Settings {
        database_url: Some(DatabaseUrl::parse(url).expect("URL parses")),
        pool_timeout: POOL_TIMEOUT,
        ..settings(cluster, app)
    })
}

fn pool(cluster: &Cluster, url: &str, app: &str) -> Pool {
    try_pool(cluster, url, app).unwrap_or_else(|e| panic!("{url}: pool not built: {e}"))
}

/// Whether the server says the connection is encrypted.
async fn ssl_in_use(conn: &PooledConnection) -> bool {
    conn.query_one(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .expect("pg_stat_ssl readable")
    .get(0)
}

/// Checks out a connection and reports whether it is encrypted, or why it failed.
async fn connect_ssl(pool: &Pool) -> Result<bool, String> {
    match pool.get().await {
        Ok(conn) => Ok(ssl_in_use(&conn).await),
        Err(e) => Err(e.to_string()),
    }
}

/// Checks out a connection through `pool`, expecting a final failure: `Error::Connect`, not
/// transient, reported well before the checkout timeout, and none of `secrets` in its
/// `Display` or `Debug`. Says what happened instead otherwise.
async fn final_failure(pool: &Pool, secrets: &[&str]) -> Result<ConnectError, String> {
    let started = Instant::now();
    let result = pool.get().await;
    let elapsed = started.elapsed();
    let err = match result {
        Ok(conn) => {
            return Err(format!(
                "connected (ssl = {}), expected a failure",
                ssl_in_use(&conn).await
            ))
        }
        Err(e) => e,
    };
    let mut shown = format!("{err} / {err:?}");
    let mut leaked = false;
    for secret in secrets {
        leaked |= shown.contains(secret);
        shown = shown.replace(secret, "<SECRET>");
    }
    if leaked {
        return Err(format!("a password appears in the error: {shown}"));
    }
    let Error::Connect(e) = err else {
        return Err(format!(
            "not Error::Connect (after {elapsed:.2?}): {}",
            shown.split(" / ").next().unwrap_or_default()
        ));
    };
    if e.is_transient() {
        return Err(format!("reported as transient: {e}"));
    }
    if elapsed > FAST {
        return Err(format!("took {elapsed:.2?}: {e}"));
    }
    Ok(e)
}

/// [`final_failure`] that fails the test when the failure is not final.
async fn must_fail(pool: &Pool, secrets: &[&str], what: &str) -> ConnectError {
    final_failure(pool, secrets)
        .await
        .unwrap_or_else(|why| panic!("{what}: {why}"))
}

/// What one URL should do against one server.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Connects, encrypted.
    Tls,
    /// Connects, in plaintext.
    Plain,
    /// The server refuses at once, with this SQLSTATE and text in its message.
    Refused(&'static str, &'static str),
    /// The client's TLS rules refuse at once (`is_tls()`), with this text in the message.
    TlsError(&'static str),
}

/// Connects with `query` added to the cluster's URL and compares the outcome with `expect`.
async fn check(cluster: &Cluster, query: &str, expect: Expect) -> Result<(), String> {
    let url = url(cluster, query);
    let pool = try_pool(cluster, &url, "tls-matrix").map_err(|e| format!("pool not built: {e}"))?;
    let secrets = [cluster.password()];
    match expect {
        Expect::Tls | Expect::Plain => {
            let want = matches!(expect, Expect::Tls);
            match connect_ssl(&pool).await {
                Ok(ssl) if ssl == want => Ok(()),
                Ok(ssl) => Err(format!("connected with ssl = {ssl}, expected {want}")),
                Err(e) => Err(format!(
                    "failed: {}, expected to connect with ssl = {want}",
                    e.replace(cluster.password(), "<PASSWORD>")
                )),
            }
        }
        Expect::Refused(code, text) => {
            let e = final_failure(&pool, &secrets).await?;
            let shown = e.to_string();
            if e.code() != Some(code) || !shown.contains(text) || e.is_tls() {
                return Err(format!(
                    "expected the server's SQLSTATE {code} with {text:?}, got code {:?} \
                     (is_tls = {}): {shown}",
                    e.code(),
                    e.is_tls()
                ));
            }
            Ok(())
        }
        Expect::TlsError(text) => {
            let e = final_failure(&pool, &secrets).await?;
            let shown = e.to_string();
            if !e.is_tls() || !shown.contains(text) {
                return Err(format!(
                    "expected a TLS error with {text:?}, got (is_tls = {}): {shown}",
                    e.is_tls()
                ));
            }
            Ok(())
        }
    }
}

/// Runs every case and fails the test listing all mismatches at once.
async fn check_all(cluster: &Cluster, server: &str, cases: &[(String, Expect)]) {
    let mut wrong = Vec::new();
    for (query, expect) in cases {
        if let Err(why) = check(cluster, query, *expect).await {
            wrong.push(format!("  ?{query} ({expect:?}): {why}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "against the {server} server, {} of {} cases are not as libpq does them:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
}

/// The server's answer to a plaintext connection to a `hostssl`-only server.
const NO_ENCRYPTION: Expect = Expect::Refused("28000", "no encryption");
/// A certificate from the test CA, checked against the system's roots.
const NOT_TRUSTED: Expect = Expect::TlsError("not trusted");
const NO_TLS: Expect = Expect::TlsError("does not support TLS");

/// TLS-only server (`hostssl`): `disable` is refused by the server in its own words, `allow`
/// retries with TLS after that refusal, every other mode is encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sslmode_against_a_tls_only_server() {
    let cluster = tls_cluster(TlsMode::Only);
    let ca = ca(&cluster);
    let cases = [
        ("sslmode=disable".to_owned(), NO_ENCRYPTION),
        ("sslmode=allow".to_owned(), Expect::Tls),
        ("sslmode=prefer".to_owned(), Expect::Tls),
        (String::new(), Expect::Tls),
        ("sslmode=require".to_owned(), Expect::Tls),
        (format!("sslmode=require&sslrootcert={ca}"), Expect::Tls),
        (format!("sslmode=verify-ca&sslrootcert={ca}"), Expect::Tls),
        (format!("sslmode=verify-full&sslrootcert={ca}"), Expect::Tls),
        (
            format!("sslmode=verify-full&sslrootcert={ca}&host=localhost"),
            Expect::Tls,
        ),
        ("ssl=require".to_owned(), Expect::Tls),
        ("ssl=disable".to_owned(), NO_ENCRYPTION),
        ("ssl=false".to_owned(), NO_ENCRYPTION),
        (format!("ssl=true&sslrootcert={ca}"), Expect::Tls),
        ("ssl=true".to_owned(), NOT_TRUSTED),
    ];
    check_all(&cluster, "TLS-only", &cases).await;
}

/// TLS-optional server: `disable` and `allow` stay in plaintext, `prefer` (the default) and
/// stronger modes are encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sslmode_against_a_tls_optional_server() {
    let cluster = tls_cluster(TlsMode::Optional);
    let ca = ca(&cluster);
    let cases = [
        ("sslmode=disable".to_owned(), Expect::Plain),
        ("sslmode=allow".to_owned(), Expect::Plain),
        ("sslmode=prefer".to_owned(), Expect::Tls),
        (String::new(), Expect::Tls),
        ("sslmode=require".to_owned(), Expect::Tls),
        (format!("sslmode=verify-ca&sslrootcert={ca}"), Expect::Tls),
        (format!("sslmode=verify-full&sslrootcert={ca}"), Expect::Tls),
        (
            format!("sslmode=verify-full&sslrootcert={ca}&host=localhost"),
            Expect::Tls,
        ),
        ("ssl=require".to_owned(), Expect::Tls),
        ("ssl=disable".to_owned(), Expect::Plain),
        ("ssl=false".to_owned(), Expect::Plain),
        (format!("ssl=true&sslrootcert={ca}"), Expect::Tls),
        ("ssl=true".to_owned(), NOT_TRUSTED),
    ];
    check_all(&cluster, "TLS-optional", &cases).await;
}

/// Plaintext-only server (`ssl = off`): the modes that may do without TLS connect in
/// plaintext; those that require it fail at once, saying the server does not support TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sslmode_against_a_plaintext_only_server() {
    let cluster = support::cluster();
    let dir = TempDir::new("plain");
    let ca_path = dir.path().join("ca.crt");
    Ca::shared()
        .expect("the shared CA")
        .write_cert(&ca_path)
        .expect("CA written");
    let ca = url_path(&ca_path);
    let cases = [
        ("sslmode=disable".to_owned(), Expect::Plain),
        ("sslmode=allow".to_owned(), Expect::Plain),
        ("sslmode=prefer".to_owned(), Expect::Plain),
        (String::new(), Expect::Plain),
        ("sslmode=require".to_owned(), NO_TLS),
        (format!("sslmode=verify-ca&sslrootcert={ca}"), NO_TLS),
        (format!("sslmode=verify-full&sslrootcert={ca}"), NO_TLS),
        ("ssl=require".to_owned(), NO_TLS),
        ("ssl=disable".to_owned(), Expect::Plain),
        ("ssl=false".to_owned(), Expect::Plain),
        (format!("ssl=true&sslrootcert={ca}"), NO_TLS),
    ];
    check_all(&cluster, "plaintext-only", &cases).await;
}

/// A root file of another CA: verify-ca, verify-full and require (a root file makes libpq's
/// `require` verify the chain) fail at once, naming the untrusted certificate; `prefer`
/// retries without TLS after the failed handshake, as libpq does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_not_trusted() {
    let cluster = tls_cluster(TlsMode::Optional);
    let dir = TempDir::new("other-ca");
    let other = dir.path().join("other.crt");
    Ca::new("other")
        .expect("a CA")
        .write_cert(&other)
        .expect("CA written");
    let other = url_path(&other);
    for mode in ["verify-ca", "verify-full", "require"] {
        let url = url(&cluster, &format!("sslmode={mode}&sslrootcert={other}"));
        let pool = pool(&cluster, &url, "other-ca");
        let e = must_fail(&pool, &[cluster.password()], mode).await;
        assert!(e.is_tls(), "{mode}: not a TLS error: {e}");
        assert!(
            e.to_string().contains("not trusted"),
            "{mode}: does not say the certificate is not trusted: {e}"
        );
    }
    let url = url(&cluster, &format!("sslmode=prefer&sslrootcert={other}"));
    let pool = pool(&cluster, &url, "other-ca-prefer");
    assert_eq!(
        connect_ssl(&pool).await,
        Ok(false),
        "sslmode=prefer falls back to plaintext when the certificate is not trusted"
    );
}

/// verify-full checks the host name (the URL's `host`, while connecting to `hostaddr`);
/// verify-ca checks only the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
    let cluster = tls_cluster(TlsMode::Only);
    let ca = ca(&cluster);
    let query = |mode: &str| {
        format!("host=wrong.example.invalid&hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={ca}")
    };
    let pool_full = pool(
        &cluster,
        &url(&cluster, &query("verify-full")),
        "wrong-host",
    );
    let e = must_fail(&pool_full, &[cluster.password()], "verify-full").await;
    assert!(e.is_tls(), "not a TLS error: {e}");
    assert!(
        e.to_string()
            .contains("does not match host name \"wrong.example.invalid\""),
        "does not name the mismatched host: {e}"
    );
    let pool_ca = pool(&cluster, &url(&cluster, &query("verify-ca")), "wrong-host");
    assert_eq!(
        connect_ssl(&pool_ca).await,
        Ok(true),
        "verify-ca accepts a certificate for another name"
    );
}

/// The `SettingsError::File` of a pool that could not be built, as (parameter, path, reason).
fn file_error(result: Result<Pool, Error>, what: &str) -> (String, String, String) {
    match result {
        Ok(_) => panic!("{what}: the pool was built"),
        Err(Error::Settings(SettingsError::File {
            parameter,
            path,
            reason,
        })) => (parameter, path, reason),
        Err(e) => panic!("{what}: not a SettingsError::File: {e}"),
    }
}

/// A pool for `url` without a cluster (nothing connects before the first checkout).
fn pool_without_server(url: &str) -> Result<Pool, Error> {
    Pool::new(Settings {
        database_url: Some(DatabaseUrl::parse(url).expect("URL parses")),
        pool_timeout: POOL_TIMEOUT,
        ..Settings::default()
    })
}

/// verify-ca and verify-full need a root certificate: with none (no sslrootcert and no
/// `~/.postgresql/root.crt`), or a nonexistent sslrootcert, the pool is not built.
#[test]
fn a_missing_root_certificate_stops_the_pool_from_being_built() {
    const URL: &str = "postgresql://someone:hunter2-secret@127.0.0.1:1/postgres";
    let default_root = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".postgresql").join("root.crt"))
        .filter(|p| p.exists());
    match default_root {
        Some(path) => println!(
            "note: {} exists, so the no-sslrootcert case is not checked",
            path.display()
        ),
        None => {
            for mode in ["verify-full", "verify-ca"] {
                let (parameter, path, reason) =
                    file_error(pool_without_server(&format!("{URL}?sslmode={mode}")), mode);
                assert_eq!(parameter, "sslrootcert", "{mode}: {path}: {reason}");
                assert!(path.ends_with("root.crt"), "{mode}: {path}: {reason}");
            }
        }
    }
    let (parameter, path, reason) = file_error(
        pool_without_server(&format!(
            "{URL}?sslmode=verify-full&sslrootcert=/nonexistent/ca.crt"
        )),
        "nonexistent sslrootcert",
    );
    assert_eq!(parameter, "sslrootcert", "{path}: {reason}");
    assert_eq!(path, "/nonexistent/ca.crt", "{reason}");
    let Err(err) = pool_without_server(&format!(
        "{URL}?sslmode=verify-full&sslrootcert=/nonexistent/ca.crt"
    )) else {
        panic!("the pool was built")
    };
    let shown = format!("{err} / {err:?}");
    assert!(
        !shown.contains("hunter2-secret"),
        "the password appears: {shown}"
    );
}

/// The cluster's URL with verify-full against its CA and, when given, a client certificate.
fn client_cert_url(cluster: &Cluster, cert: Option<(&Path, &Path)>) -> String {
    let mut query = format!("sslmode=verify-full&sslrootcert={}", ca(cluster));
    if let Some((cert, key)) = cert {
        query.push_str(&format!(
            "&sslcert={}&sslkey={}",
            url_path(cert),
            url_path(key)
        ));
    }
    url(cluster, &query)
}

/// A server that requires client certificates (`clientcert=verify-full`): without one the
/// server refuses (28000) at once; the cluster CA's certificate for the role gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_requiring_a_client_certificate_gets_one() {
    let cluster = tls_cluster(TlsMode::ClientCert);
    let none = pool(&cluster, &client_cert_url(&cluster, None), "no-cert");
    let e = must_fail(&none, &[cluster.password()], "no client certificate").await;
    assert_eq!(e.code(), Some("28000"), "{e}");
    assert!(
        e.to_string().contains("certificate"),
        "does not say a certificate is required: {e}"
    );

    let (cert, key) = cluster
        .tls()
        .expect("a TLS cluster")
        .client_cert(cluster.user())
        .expect("client certificate");
    let url = client_cert_url(&cluster, Some((&cert, &key)));
    assert_eq!(
        connect_ssl(&pool(&cluster, &url, "cert")).await,
        Ok(true),
        "the cluster CA's certificate for the role is accepted"
    );
}

/// A client certificate from another CA: the server rejects it with a TLS alert, which is
/// final (libpq: `SSL error: tlsv1 alert unknown ca`, at once).
/// Under TLS 1.3 the server judges the client's certificate after the client's side of the
/// handshake is done, so its alert arrives with the first read of the start-up: still final.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused_at_once() {
    let cluster = tls_cluster(TlsMode::ClientCert);
    let dir = TempDir::new("client-other-ca");
    let (cert, key) = Ca::new("other")
        .expect("a CA")
        .client_cert(cluster.user())
        .expect("client certificate")
        .write(dir.path(), "client")
        .expect("written");
    let url = client_cert_url(&cluster, Some((&cert, &key)));
    let pool = pool(&cluster, &url, "other-ca-cert");
    let e = must_fail(
        &pool,
        &[cluster.password()],
        "client certificate from another CA",
    )
    .await;
    assert!(e.is_tls(), "not reported as a TLS error: {e}");
}

/// A client key file others can read stops the pool from being built (libpq's rule: at most
/// 0600, or 0640 when the file is owned by root).
#[test]
fn a_client_key_others_can_read_stops_the_pool() {
    let dir = TempDir::new("client-key");
    let (cert, key) = Ca::new("keys")
        .expect("a CA")
        .client_cert("someone")
        .expect("client certificate")
        .write(dir.path(), "client")
        .expect("written");
    let url = |mode: u32| {
        fs::set_permissions(&key, fs::Permissions::from_mode(mode)).expect("chmod");
        format!(
            "postgresql://someone:hunter2-secret@127.0.0.1:1/postgres?sslmode=require\
             &sslcert={}&sslkey={}",
            url_path(&cert),
            url_path(&key)
        )
    };
    let (parameter, path, reason) = file_error(pool_without_server(&url(0o644)), "key 0644");
    assert_eq!(parameter, "sslkey", "{path}: {reason}");
    assert_eq!(Path::new(&path), key, "{reason}");
    assert!(pool_without_server(&url(0o600)).is_ok(), "key 0600 refused");
    let owned_by_root = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&key).expect("stat").uid() == 0
    };
    let group_readable = pool_without_server(&url(0o640));
    if owned_by_root {
        assert!(group_readable.is_ok(), "key 0640 owned by root refused");
    } else {
        let (parameter, ..) = file_error(group_readable, "key 0640 not owned by root");
        assert_eq!(parameter, "sslkey");
    }
}

/// channel_binding over verified TLS: disable, prefer and require all connect (require only
/// with SCRAM-SHA-256-PLUS, which the client insists on); require without TLS cannot bind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_over_tls() {
    let cluster = tls_cluster(TlsMode::Optional);
    let verified = format!("sslmode=verify-full&sslrootcert={}", ca(&cluster));
    for binding in ["disable", "prefer", "require"] {
        let url = url(&cluster, &format!("{verified}&channel_binding={binding}"));
        let pool = pool(&cluster, &url, "binding");
        assert_eq!(
            connect_ssl(&pool).await,
            Ok(true),
            "channel_binding={binding}"
        );
    }
    let url = url(&cluster, "sslmode=disable&channel_binding=require");
    let pool = pool(&cluster, &url, "binding-plain");
    let e = must_fail(
        &pool,
        &[cluster.password()],
        "channel_binding=require in plaintext",
    )
    .await;
    assert!(
        mentions_channel_binding(&e),
        "does not mention channel binding: {e}"
    );
}

fn mentions_channel_binding(e: &ConnectError) -> bool {
    e.to_string()
        .to_lowercase()
        .replace(['_', '-'], " ")
        .contains("channel binding")
}

/// channel_binding=require refuses a server that authenticates without SCRAM over TLS (md5,
/// trust), while channel_binding=prefer lets the same roles in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_require_refuses_md5_and_trust() {
    let cluster = tls_cluster(TlsMode::Optional);
    let admin = unix_observer(&cluster).await;
    admin
        .batch_execute(
            "SET password_encryption = 'md5'; CREATE ROLE md5_role LOGIN PASSWORD 'md5-secret';
             SET password_encryption = 'scram-sha-256'; CREATE ROLE trust_role LOGIN;",
        )
        .await
        .expect("roles created");
    set_hba(
        &cluster,
        &admin,
        &format!(
            "hostssl all md5_role 127.0.0.1/32 md5\n\
             hostssl all trust_role 127.0.0.1/32 trust\n\
             local all all trust\n\
             host all {} 127.0.0.1/32 scram-sha-256\n",
            cluster.user()
        ),
    )
    .await;
    let (port, db) = (cluster.port(), cluster.dbname());
    let verified = format!("sslmode=verify-full&sslrootcert={}", ca(&cluster));
    for (name, userinfo, secret) in [
        ("md5", "md5_role:md5-secret", "md5-secret"),
        ("trust", "trust_role:unused-secret", "unused-secret"),
    ] {
        let url = |binding: &str| {
            format!(
                "postgresql://{userinfo}@127.0.0.1:{port}/{db}?{verified}&channel_binding={binding}"
            )
        };
        let prefer = pool(&cluster, &url("prefer"), name);
        assert_eq!(
            connect_ssl(&prefer).await,
            Ok(true),
            "{name} with channel_binding=prefer"
        );
        let require = pool(&cluster, &url("require"), name);
        let e = must_fail(
            &require,
            &[secret],
            &format!("{name} with channel_binding=require"),
        )
        .await;
        assert!(
            mentions_channel_binding(&e),
            "{name}: does not mention channel binding: {e}"
        );
    }
}

/// Replaces the cluster's pg_hba.conf and waits until the server has loaded it (its first rule
/// and the number of rules match).
async fn set_hba(cluster: &Cluster, admin: &tokio_postgres::Client, rules: &str) {
    let path = cluster.data_dir().join("pg_hba.conf");
    // Rewritten in place: the file keeps the server's ownership when the tests run as root.
    fs::write(&path, rules).expect("pg_hba.conf writable");
    admin
        .execute("SELECT pg_reload_conf()", &[])
        .await
        .expect("reload");
    let lines: Vec<&str> = rules.lines().filter(|l| !l.trim().is_empty()).collect();
    let method = lines[0].split_whitespace().last().unwrap_or("").to_owned();
    let count = lines.len() as i64;
    let loaded = eventually(Duration::from_secs(10), || {
        let method = method.clone();
        async move {
            admin
                .query_one(
                    "SELECT (SELECT auth_method FROM pg_hba_file_rules ORDER BY line_number \
                     LIMIT 1), (SELECT count(*) FROM pg_hba_file_rules)",
                    &[],
                )
                .await
                .is_ok_and(|r| r.get::<_, String>(0) == method && r.get::<_, i64>(1) == count)
        }
    })
    .await;
    assert!(loaded, "the server did not load the new pg_hba.conf");
}

/// A verified TLS pool on a TLS-only cluster, and an observer over the Unix socket.
async fn verified_only(app: &str) -> (Cluster, Pool, tokio_postgres::Client) {
    let cluster = tls_cluster(TlsMode::Only);
    let url = url(
        &cluster,
        &format!("sslmode=verify-full&sslrootcert={}", ca(&cluster)),
    );
    let pool = pool(&cluster, &url, app);
    let observer = unix_observer(&cluster).await;
    (cluster, pool, observer)
}

const SLEEPING: &str = "state = 'active' AND query LIKE '%pg_sleep%'";

/// A cancel token of a TLS connection cancels its statement (SQLSTATE 57014) over TLS; the
/// connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_token_cancels_over_tls() {
    let app = "cancel-token";
    let (_cluster, pool, observer) = verified_only(app).await;
    let conn = pool.get().await.expect("connects");
    assert!(ssl_in_use(&conn).await, "the connection is encrypted");
    let token = conn.cancel_token();
    assert!(
        format!("{token:?}").contains("tls: true"),
        "the cancel request would not use TLS: {token:?}"
    );
    let sleeper = tokio::spawn(async move {
        let result = conn.query_one("SELECT pg_sleep(30)", &[]).await;
        (result.err(), conn)
    });
    let started = eventually(Duration::from_secs(5), || async {
        server_count_where(&observer, app, SLEEPING).await == 1
    })
    .await;
    assert!(started, "the statement never started");
    token
        .cancel_query()
        .await
        .expect("cancel request delivered");
    let (err, conn) = tokio::time::timeout(Duration::from_secs(5), sleeper)
        .await
        .expect("the statement ended soon after the cancel request")
        .expect("task");
    let err = err.expect("the statement was cancelled, not completed");
    assert_eq!(err.code(), Some("57014"), "{err}");
    let v: i32 = conn
        .query_one("SELECT 1", &[])
        .await
        .expect("usable after the cancel")
        .get(0);
    assert_eq!(v, 1);
}

/// A statement whose future is dropped on a TLS connection is stopped on the server once the
/// connection is returned (the pool's cancel request over TLS), within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_statement_is_cancelled_over_tls() {
    let app = "cancel-dropped";
    let (_cluster, pool, observer) = verified_only(app).await;
    let conn = pool.get().await.expect("connects");
    assert!(ssl_in_use(&conn).await, "the connection is encrypted");
    let abandoned = tokio::time::timeout(
        Duration::from_millis(500),
        conn.query_one("SELECT pg_sleep(30)", &[]),
    )
    .await;
    assert!(abandoned.is_err(), "pg_sleep(30) returned early");
    assert_eq!(
        server_count_where(&observer, app, SLEEPING).await,
        1,
        "the statement runs on the server"
    );
    drop(conn);
    let stopped = eventually(Duration::from_secs(1), || async {
        server_count_where(&observer, app, SLEEPING).await == 0
    })
    .await;
    assert!(
        stopped,
        "pg_sleep still runs a second after the connection was returned"
    );
    let conn = pool.get().await.expect("the pool still gives connections");
    assert!(ssl_in_use(&conn).await);
}

/// Fifteen TLS connections opened at once all succeed, all encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tls_connections_at_once() {
    const N: usize = 15;
    let app = "many";
    let cluster = tls_cluster(TlsMode::Only);
    let url = url(
        &cluster,
        &format!("sslmode=verify-full&sslrootcert={}", ca(&cluster)),
    );
    let pool = Pool::new(Settings {
        database_url: Some(DatabaseUrl::parse(&url).expect("URL parses")),
        pool_size: N,
        max_overflow: Some(0),
        pool_timeout: Duration::from_secs(15),
        ..settings(&cluster, app)
    })
    .expect("pool built");
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let (pool, barrier) = (pool.clone(), barrier.clone());
            tokio::spawn(async move {
                let conn = pool.get().await.map_err(|e| e.to_string())?;
                let ssl = ssl_in_use(&conn).await;
                let pid: i32 = conn
                    .query_one("SELECT pg_backend_pid()", &[])
                    .await
                    .map_err(|e| e.to_string())?
                    .get(0);
                // Held until all N are out, so each has its own connection.
                barrier.wait().await;
                Ok::<_, String>((ssl, pid))
            })
        })
        .collect();
    let results = tokio::time::timeout(Duration::from_secs(20), async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    })
    .await
    .expect("all checkouts finished (a failed one leaves the others at the barrier)");
    let mut pids = Vec::new();
    for r in results {
        let (ssl, pid) = r.unwrap_or_else(|e| panic!("a checkout failed: {e}"));
        assert!(ssl, "a connection is not encrypted");
        pids.push(pid);
    }
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), N, "distinct backends");
    assert_eq!(pool.status().total_connections, N);
    let observer = unix_observer(&cluster).await;
    assert_eq!(
        server_count_where(
            &observer,
            app,
            "pid IN (SELECT pid FROM pg_stat_ssl WHERE ssl)"
        )
        .await,
        N as i64,
        "the server sees every connection encrypted"
    );
}
