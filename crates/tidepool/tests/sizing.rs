//! The connection budget against real PostgreSQL: what `ServerLimits::read` sees and what the
//! start-up check of `tidepool serve` says.

use std::time::Duration;

use tidepool::sizing::{startup_check, Budget, Deployment, ServerLimits};
use tidepool::{DatabaseUrl, Pool, Settings};
use tidepool_cluster::Cluster;

fn pool(cluster: &Cluster, pool_size: usize, max_overflow: usize, application_name: &str) -> Pool {
    Pool::new(Settings {
        database_url: Some(DatabaseUrl::parse(&cluster.url()).expect("url")),
        pool_size,
        max_overflow: Some(max_overflow),
        application_name: Some(application_name.to_owned()),
        pool_timeout: Duration::from_secs(30),
        ..Settings::default()
    })
    .expect("pool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_the_limits_and_the_connections_of_other_applications() {
    let cluster = Cluster::builder()
        .max_connections(30)
        .setting("superuser_reserved_connections", "4")
        .start()
        .expect("cluster");
    let others = pool(&cluster, 3, 0, "other-app");
    // Three connections of another application, held open while the check runs.
    let held = futures_open(&others, 3).await;
    let mine = pool(&cluster, 2, 0, "my-app");
    let limits = {
        let conn = mine.get().await.expect("checkout");
        ServerLimits::read(&conn).await.expect("read limits")
    };
    assert_eq!(limits.max_connections, 30);
    assert_eq!(limits.superuser_reserved_connections, 4);
    assert_eq!(
        limits.application_slots(),
        26 - limits.reserved_connections.unwrap_or(0)
    );
    assert_eq!(limits.role, cluster.user());
    assert!(limits.role_superuser);
    assert_eq!(limits.role_connection_limit, None);
    assert_eq!(limits.application_name, "my-app");
    assert!(limits.server_version_num >= 90600, "{limits:?}");
    let other = limits
        .connections
        .iter()
        .find(|g| g.application_name == "other-app")
        .expect("other-app's connections");
    assert_eq!(other.count, 3, "{limits:?}");
    // The check's own connection is not listed.
    assert!(
        !limits
            .connections
            .iter()
            .any(|g| g.application_name == "my-app"),
        "{limits:?}"
    );

    let budget = Budget::compute(
        &Deployment {
            instances: 2,
            services: 1,
            buffer: 0,
            pool_size: 3,
            max_overflow: Some(6),
        },
        &limits,
    );
    assert_eq!(budget.other_connections, 3);
    assert_eq!(budget.available, u64::from(limits.application_slots()) - 3);
    assert_eq!(budget.required, Some(18));
    assert!(budget.within_budget);
    drop(held);
}

async fn futures_open(pool: &Pool, n: usize) -> Vec<tidepool::PooledConnection> {
    let mut conns = Vec::new();
    for _ in 0..n {
        conns.push(pool.get().await.expect("checkout"));
    }
    conns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_check_warns_only_when_the_deployment_could_exceed_the_limit() {
    let cluster = Cluster::builder()
        .max_connections(20)
        .start()
        .expect("cluster");
    // 17 application slots; 5 + 10 = 15 per instance.
    let p = pool(&cluster, 5, 10, "serve");
    assert_eq!(startup_check(&p, 1).await.expect("check"), None);
    let warning = startup_check(&p, 2)
        .await
        .expect("check")
        .expect("two instances need 30 connections");
    assert!(warning.contains("= 30 connections"), "{warning}");
    assert!(warning.contains("available 17"), "{warning}");
    assert!(
        warning.contains("DB_POOL_SIZE=2 DB_MAX_OVERFLOW=6"),
        "{warning}"
    );
    assert!(!warning.contains(cluster.password()), "{warning}");
}
