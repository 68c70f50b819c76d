//! Command timeouts (`DB_COMMAND_TIMEOUT`, asyncpg's `command_timeout`): a statement running
//! past its bound fails with [`Error::CommandTimeout`] and the server stops it (cancel
//! request); the connection is reused once the server is ready again. Also what
//! `/health/database` says when the credentials are refused.

mod support;

use std::time::{Duration, Instant};

use support::{cluster, eventually, observer, settings};
use tidepool::{DatabaseUrl, Error, Pool, Settings};

const WITHIN: Duration = Duration::from_secs(30);

/// Backends of `app` running `pg_sleep`.
async fn sleeping(obs: &tokio_postgres::Client, app: &str) -> i64 {
    obs.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
         AND state = 'active' AND query LIKE '%pg_sleep%'",
        &[&app],
    )
    .await
    .expect("pg_stat_activity")
    .get(0)
}

/// A 10 s statement under a 1 s command timeout fails with `CommandTimeout` after about 1 s (not
/// 10), is gone from `pg_stat_activity`, and the same backend answers the next statement;
/// on the pool itself and with the statement cache off alike. Counted in
/// `status().command_timeouts`, not in the pool's `timeouts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_past_the_command_timeout_is_stopped_on_the_server() {
    let pg = cluster();
    let obs = observer(&pg).await;
    for cache in [true, false] {
        let app = if cache {
            "cmd-timeout"
        } else {
            "cmd-timeout-unnamed"
        };
        let pool = Pool::new(Settings {
            command_timeout: Some(Duration::from_secs(1)),
            statement_cache: cache,
            pool_size: 1,
            max_overflow: Some(0),
            ..settings(&pg, app)
        })
        .unwrap();
        let conn = pool.get().await.unwrap();
        let pid: i32 = conn
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let started = Instant::now();
        let err = conn
            .query("SELECT pg_sleep($1)", &[&10.0f64])
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(err, Error::CommandTimeout { after, confirmed: true } if after == Duration::from_secs(1)),
            "cache={cache}: {err:?}"
        );
        assert!(
            took < Duration::from_secs(8),
            "cache={cache}: took {took:?}"
        );
        assert!(err.to_string().contains("timed out"), "{err}");
        // Stopped on the server: gone well before the 10 s it asked for.
        assert!(
            eventually(Duration::from_secs(5), || async {
                sleeping(&obs, app).await == 0
            })
            .await,
            "cache={cache}: stopped on the server"
        );
        let again: i32 = conn
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(again, pid, "cache={cache}: the same backend, ready again");
        drop(conn);
        // On the pool (no checkout held), and a simple-protocol statement.
        let err = pool.execute("SELECT pg_sleep(10)", &[]).await.unwrap_err();
        assert!(matches!(err, Error::CommandTimeout { .. }), "{err:?}");
        let conn = pool.get().await.unwrap();
        let err = conn.batch_execute("SELECT pg_sleep(10)").await.unwrap_err();
        assert!(matches!(err, Error::CommandTimeout { .. }), "{err:?}");
        drop(conn);
        let status = pool.status();
        assert_eq!(status.command_timeouts, 3, "cache={cache}: {status:?}");
        assert_eq!(status.timeouts, 0, "cache={cache}: not pool timeouts");
        assert!(
            eventually(WITHIN, || async { sleeping(&obs, app).await == 0 }).await,
            "nothing left running"
        );
        let one: i32 = pool.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
    }
}

/// A checkout's own command timeout overrides the pool's, for that checkout only: `None` lets a
/// statement run past the pool's bound, a shorter one stops it sooner; inside a transaction the
/// timeout aborts the transaction, and the next user gets a clean connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_timeout_can_be_set_per_checkout() {
    let pg = cluster();
    let pool = Pool::new(Settings {
        command_timeout: Some(Duration::from_millis(500)),
        pool_size: 1,
        max_overflow: Some(0),
        ..settings(&pg, "cmd-override")
    })
    .unwrap();
    let mut conn = pool.get().await.unwrap();
    conn.set_command_timeout(None);
    conn.execute("SELECT pg_sleep(0.8)", &[])
        .await
        .expect("no bound for this checkout");
    conn.set_command_timeout(Some(Duration::from_millis(100)));
    let err = conn.execute("SELECT pg_sleep(0.4)", &[]).await.unwrap_err();
    assert!(
        matches!(err, Error::CommandTimeout { after, .. } if after == Duration::from_millis(100)),
        "{err:?}"
    );
    let tx = conn.transaction().await.unwrap();
    let err = tx.execute("SELECT pg_sleep(0.4)", &[]).await.unwrap_err();
    assert!(matches!(err, Error::CommandTimeout { .. }), "{err:?}");
    let aborted = tx.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(
        aborted.code(),
        Some("25P02"),
        "the transaction is aborted: {aborted}"
    );
    drop(tx);
    drop(conn);
    // Back in the pool: its own bound again, and no transaction left open.
    let conn = pool.get().await.unwrap();
    let err = conn.execute("SELECT pg_sleep(0.8)", &[]).await.unwrap_err();
    assert!(
        matches!(err, Error::CommandTimeout { after, .. } if after == Duration::from_millis(500)),
        "{err:?}"
    );
    // Outside a transaction block a savepoint is refused (25P01): nothing was left open.
    let err = conn.batch_execute("SAVEPOINT s").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some("25P01"),
        "not inside a leftover transaction: {err}"
    );
}

/// asyncpg's `command_timeout` in the URL is `DB_COMMAND_TIMEOUT`'s default; the variable wins,
/// and `0` turns it off.
#[test]
fn the_url_gives_the_default_command_timeout() {
    let url = "postgresql+asyncpg://u:p@h/db?command_timeout=2.5";
    let from = |vars: &[(&str, &str)]| {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
            .unwrap()
    };
    assert_eq!(
        from(&[("DATABASE_URL", url)]).command_timeout,
        Some(Duration::from_millis(2500))
    );
    assert_eq!(
        from(&[("DATABASE_URL", url), ("DB_COMMAND_TIMEOUT", "1")]).command_timeout,
        Some(Duration::from_secs(1))
    );
    assert_eq!(
        from(&[("DATABASE_URL", url), ("DB_COMMAND_TIMEOUT", "0")]).command_timeout,
        None
    );
    assert_eq!(from(&[]).command_timeout, None);
    let err = Settings::from_lookup(|name| (name == "DB_COMMAND_TIMEOUT").then(|| "-1".into()))
        .unwrap_err();
    assert!(err.to_string().contains("DB_COMMAND_TIMEOUT"), "{err}");
}

/// `/health/database` tells a refused password (`auth_failed`) from a server that is not there
/// (`database_down`).
#[tokio::test]
async fn health_names_the_cause() {
    let pg = cluster();
    let wrong = format!(
        "postgresql://{}:wrong@{}:{}/{}",
        pg.user(),
        pg.host(),
        pg.port(),
        pg.dbname()
    );
    let pool = Pool::new(Settings {
        database_url: Some(DatabaseUrl::parse(&wrong).unwrap()),
        ..Settings::default()
    })
    .unwrap();
    let health = tidepool::axum::check_database(&pool, Duration::from_secs(2)).await;
    let body = serde_json::to_value(&health).unwrap();
    assert_eq!(body["cause"], "auth_failed", "{body}");
    assert!(!body.to_string().contains("wrong"), "no password: {body}");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let down = format!("postgresql://u:p@127.0.0.1:{port}/db");
    let pool = Pool::new(Settings {
        database_url: Some(DatabaseUrl::parse(&down).unwrap()),
        ..Settings::default()
    })
    .unwrap();
    let health = tidepool::axum::check_database(&pool, Duration::from_secs(2)).await;
    let body = serde_json::to_value(&health).unwrap();
    assert_eq!(body["cause"], "database_down", "{body}");
}
