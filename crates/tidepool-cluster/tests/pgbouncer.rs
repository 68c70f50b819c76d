//! PgBouncer in front of a cluster: SCRAM through it, the extended protocol
//! in transaction mode, options, start errors and cleanup.
//!
//! Needs PgBouncer installed (Debian: apt-get install -y pgbouncer); without
//! it every test fails with that hint. Run as root these also exercise the
//! "PgBouncer runs as the postgres user" path.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use tidepool_cluster::{Cluster, ClusterError, PgBouncer, PoolMode};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// `expect` for this crate's results that panics with the error's message
/// (which names what to install), not its `Debug` form.
trait Must<T> {
    fn must(self, what: &str) -> T;
}

impl<T> Must<T> for Result<T, ClusterError> {
    fn must(self, what: &str) -> T {
        self.unwrap_or_else(|e| panic!("{what}: {e}"))
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Connects to `bouncer` (database `dbname`) as tokio-postgres does, with an
/// application_name (a startup parameter PgBouncer must accept).
async fn connect(
    bouncer: &PgBouncer,
    password: &str,
    dbname: &str,
) -> Result<Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(bouncer.host())
        .port(bouncer.port())
        .user(bouncer.user())
        .password(password)
        .dbname(dbname)
        .application_name("tidepool-cluster-test")
        .connect_timeout(Duration::from_secs(10));
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The first column of every row of `sql` (simple protocol).
async fn column(client: &Client, sql: &str) -> Vec<String> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_owned()),
            _ => None,
        })
        .collect()
}

/// The server's (here: PgBouncer's) error message.
fn db_message(err: &tokio_postgres::Error) -> String {
    err.as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_else(|| err.to_string())
}

fn process_gone(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let after = &stat[stat.rfind(')').unwrap() + 1..];
            matches!(after.split_whitespace().next(), Some("Z") | Some("X"))
        }
    }
}

#[test]
fn transaction_mode_serves_scram_clients_and_unnamed_statements() {
    let cluster = Cluster::start().must("start cluster");
    let t = Instant::now();
    let bouncer = PgBouncer::start(&cluster).must("start PgBouncer");
    eprintln!("PgBouncer start took {:?}", t.elapsed());

    assert_eq!(bouncer.host(), "127.0.0.1");
    assert_ne!(bouncer.port(), cluster.port());
    assert_eq!(bouncer.server_port(), cluster.port());
    assert_eq!(bouncer.pool_mode(), PoolMode::Transaction);
    assert_eq!(
        bouncer.url(),
        format!(
            "postgresql://tidepool:{}@127.0.0.1:{}/postgres",
            cluster.password(),
            bouncer.port()
        )
    );

    runtime().block_on(async {
        let client = connect(&bouncer, cluster.password(), "postgres")
            .await
            .expect("connect through PgBouncer");
        assert_eq!(column(&client, "SELECT 1").await, ["1"]);
        // Parse/Bind/Execute of an unnamed statement in one round trip.
        let rows = client
            .query_typed("SELECT $1::int4 + 1", &[(&41i32, Type::INT4)])
            .await
            .expect("query_typed");
        assert_eq!(rows[0].get::<_, i32>(0), 42);
        // The startup parameter reached the server connection.
        assert_eq!(
            column(&client, "SHOW application_name").await,
            ["tidepool-cluster-test"]
        );
        // Through PgBouncer to this very cluster.
        assert_eq!(
            column(&client, "SHOW port").await,
            [cluster.port().to_string()]
        );

        // The URL works as is.
        let (by_url, connection) = tokio_postgres::connect(&bouncer.url(), NoTls)
            .await
            .expect("connect by URL");
        tokio::spawn(connection);
        assert_eq!(column(&by_url, "SELECT current_user").await, ["tidepool"]);

        let err = connect(&bouncer, "not-the-password", "postgres")
            .await
            .expect_err("a wrong password is refused");
        // PgBouncer 1.18: "SASL authentication failed" (08P01).
        assert!(
            db_message(&err).contains("authentication failed"),
            "{err:?}"
        );
    });

    // The password is in the 0600 config files only.
    for file in [
        bouncer.config_file().to_owned(),
        bouncer.log_file().to_owned(),
    ] {
        let meta = fs::metadata(&file).unwrap();
        assert_eq!(meta.uid(), fs::metadata(cluster.data_dir()).unwrap().uid());
        if file == bouncer.config_file() {
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        }
    }
    let log = fs::read_to_string(bouncer.log_file()).unwrap();
    assert!(
        !log.contains(cluster.password()),
        "password in the log:\n{log}"
    );
    let pid = bouncer.pid().expect("running");
    let cmdline = fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(!cmdline.contains(cluster.password()), "{cmdline}");
    // Never as root.
    let uid = fs::metadata(format!("/proc/{pid}")).unwrap().uid();
    assert_ne!(uid, 0, "PgBouncer runs as root");
}

#[test]
fn options_reach_the_config() {
    let cluster = Cluster::start().must("start cluster");
    let bouncer = PgBouncer::builder()
        .pool_mode(PoolMode::Session)
        .default_pool_size(1)
        .max_client_conn(2)
        .setting("server_login_retry", "1")
        .start(&cluster)
        .must("start PgBouncer");
    assert_eq!(bouncer.pool_mode(), PoolMode::Session);
    runtime().block_on(async {
        // The admin console (admin_users = tidepool) shows the effective config.
        let admin = connect(&bouncer, cluster.password(), "pgbouncer")
            .await
            .expect("admin console");
        let config = admin.simple_query("SHOW CONFIG").await.unwrap();
        let value = |key: &str| {
            config
                .iter()
                .find_map(|m| match m {
                    SimpleQueryMessage::Row(r) if r.get(0) == Some(key) => {
                        r.get(1).map(str::to_owned)
                    }
                    _ => None,
                })
                .unwrap_or_else(|| panic!("no {key} in SHOW CONFIG"))
        };
        assert_eq!(value("pool_mode"), "session");
        assert_eq!(value("default_pool_size"), "1");
        assert_eq!(value("max_client_conn"), "2");
        assert_eq!(value("server_login_retry"), "1");

        // max_client_conn = 2: the admin connection and one more.
        let client = connect(&bouncer, cluster.password(), "postgres")
            .await
            .expect("second client");
        assert_eq!(column(&client, "SELECT 1").await, ["1"]);
        let err = connect(&bouncer, cluster.password(), "postgres")
            .await
            .expect_err("a third client is refused");
        assert!(db_message(&err).contains("max_client_conn"), "{err:?}");
    });
}

#[test]
fn stop_and_drop_clean_up() {
    let cluster = Cluster::start().must("start cluster");
    let bouncer = PgBouncer::start(&cluster).must("start PgBouncer");
    let pid = bouncer.pid().unwrap();
    let port = bouncer.port();
    bouncer.stop().unwrap();
    assert!(!bouncer.is_running());
    assert_eq!(bouncer.pid(), None);
    assert!(process_gone(pid));
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    bouncer
        .stop()
        .must("stopping a stopped PgBouncer is a no-op");
    let dir = bouncer.config_file().parent().unwrap().to_owned();
    drop(bouncer);
    assert!(!dir.exists());

    let bouncer = PgBouncer::start(&cluster).must("start PgBouncer");
    let pid = bouncer.pid().unwrap();
    let dir = bouncer.config_file().parent().unwrap().to_owned();
    drop(bouncer);
    assert!(process_gone(pid));
    assert!(!dir.exists());
}

#[test]
fn a_bad_setting_fails_with_the_log_tail() {
    let cluster = Cluster::start().must("start cluster");
    let err = PgBouncer::builder()
        .setting("pool_mode", "bogus")
        .start(&cluster)
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ClusterError::PgBouncerStart { .. }), "{msg}");
    assert!(msg.contains("bogus"), "log tail missing: {msg}");

    let err = PgBouncer::builder()
        .setting("listen_port", "1\nx = y")
        .start(&cluster)
        .unwrap_err();
    assert!(matches!(err, ClusterError::InvalidSetting { .. }), "{err}");
}
