//! Shared helpers of the integration tests: a throwaway PostgreSQL per test, settings pointing at
//! it, and the server's own view of the pool (`pg_stat_activity`) as the witness.
#![allow(dead_code)]

pub mod proxy;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tidepool::{DatabaseUrl, Error, Settings};
use tidepool_cluster::Cluster;
use tokio_postgres::NoTls;

/// Starts a cluster for one test; fails the test with the cluster crate's message (for example
/// which package to install) when PostgreSQL cannot start.
pub fn cluster() -> Cluster {
    match Cluster::start() {
        Ok(c) => c,
        Err(e) => panic!("these tests need a real PostgreSQL server: {e}"),
    }
}

/// Starts a cluster with extra settings.
pub fn cluster_with(settings: &[(&str, &str)]) -> Cluster {
    let mut b = Cluster::builder();
    for (k, v) in settings {
        b = b.setting(k, v);
    }
    match b.start() {
        Ok(c) => c,
        Err(e) => panic!("these tests need a real PostgreSQL server: {e}"),
    }
}

/// Settings for `cluster`, with the seed's defaults and `application_name = app` so the server's
/// view of this pool can be told apart from the test's own connections.
pub fn settings(cluster: &Cluster, app: &str) -> Settings {
    Settings {
        database_url: Some(DatabaseUrl::parse(&cluster.url()).expect("cluster URL parses")),
        application_name: Some(app.to_string()),
        ..Settings::default()
    }
}

/// A plain connection for the test's own observations (not through the pool).
pub async fn observer(cluster: &Cluster) -> tokio_postgres::Client {
    let url = format!("{} application_name=observer", keyword_config(cluster));
    let (client, conn) = tokio_postgres::connect(&url, NoTls)
        .await
        .expect("observer connects");
    tokio::spawn(conn);
    client
}

fn keyword_config(cluster: &Cluster) -> String {
    format!(
        "host={} port={} user={} password={} dbname={}",
        cluster.host(),
        cluster.port(),
        cluster.user(),
        cluster.password(),
        cluster.dbname()
    )
}

/// Backends the server has for `app`.
pub async fn server_count(observer: &tokio_postgres::Client, app: &str) -> i64 {
    server_count_where(observer, app, "true").await
}

/// Backends the server has for `app` that meet `condition` (SQL over `pg_stat_activity`'s
/// columns, e.g. `state = 'active'`).
pub async fn server_count_where(
    observer: &tokio_postgres::Client,
    app: &str,
    condition: &str,
) -> i64 {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND ({condition})"
    );
    observer
        .query_one(&sql, &[&app])
        .await
        .expect("pg_stat_activity readable")
        .get(0)
}

/// Terminates every backend of `app` (`pg_terminate_backend`); returns how many there were.
pub async fn terminate_backends(observer: &tokio_postgres::Client, app: &str) -> i64 {
    observer
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1) t",
            &[&app],
        )
        .await
        .expect("pg_terminate_backend runs")
        .get(0)
}

/// Backend pids the server has for `app`.
pub async fn server_pids(observer: &tokio_postgres::Client, app: &str) -> Vec<i32> {
    observer
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .expect("pg_stat_activity readable")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Polls `check` until it returns true or `limit` passes; returns whether it became true.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs blocking cluster control (stop, restart) off the async workers.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

/// The address the cluster listens on, for a [`proxy::Proxy`] in front of it.
pub fn cluster_addr(cluster: &Cluster) -> SocketAddr {
    format!("{}:{}", cluster.host(), cluster.port())
        .parse()
        .expect("cluster address parses")
}

/// Like [`settings`], but connecting through `proxy` instead of straight to the cluster.
pub fn settings_via(cluster: &Cluster, proxy: &proxy::Proxy, app: &str) -> Settings {
    let url = format!(
        "postgresql://{}:{}@{}/{}",
        cluster.user(),
        cluster.password(),
        proxy.addr(),
        cluster.dbname()
    );
    Settings {
        database_url: Some(DatabaseUrl::parse(&url).expect("proxy URL parses")),
        ..settings(cluster, app)
    }
}

/// The connection failure a checkout timeout carries, as text; fails the test when `err` is not
/// a timeout or carries none.
pub fn timeout_cause(err: &Error) -> String {
    let Error::Timeout(timeout) = err else {
        panic!("not a timeout: {err:?}")
    };
    timeout
        .last_connect_error()
        .expect("the connect failure is carried")
        .to_string()
}

/// Like [`observer`], but over the cluster's Unix socket (`local all all trust`): for TLS
/// clusters whose TCP connections must be encrypted (`TlsMode::Only`, `TlsMode::ClientCert`),
/// where [`observer`]'s plaintext TCP connection is refused.
pub async fn unix_observer(cluster: &Cluster) -> tokio_postgres::Client {
    let config = format!(
        "host={} port={} user={} dbname={} application_name=observer",
        cluster.data_dir().display(),
        cluster.port(),
        cluster.user(),
        cluster.dbname()
    );
    let (client, conn) = tokio_postgres::connect(&config, NoTls)
        .await
        .expect("observer connects over the Unix socket");
    tokio::spawn(conn);
    client
}
