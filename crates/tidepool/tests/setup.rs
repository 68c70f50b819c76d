//! Connection set-up (`DB_CONNECT_INIT_SQL`, the `on_connect` hook): run on every new connection
//! before first use and again after `DISCARD ALL`; a failing step is a connect error naming it,
//! and no half-set-up connection is ever pooled.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{cluster, eventually, observer, server_count, settings};
use tidepool::{ConnectHook, Error, Pool, ResetOnReturn, Settings};

/// The init statements and the hook run on every new connection, visible with `SHOW`, before
/// the first statement; they hold after `DISCARD ALL` (`DB_POOL_RESET_ON_RETURN=discard`, and a
/// statement on the pool that changed session state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_sql_and_hook_set_up_every_connection() {
    let pg = cluster();
    let calls = Arc::new(AtomicUsize::new(0));
    let hook = {
        let calls = calls.clone();
        ConnectHook::new(move |client| {
            let calls = calls.clone();
            Box::pin(async move {
                calls.fetch_add(1, Ordering::Relaxed);
                client
                    .batch_execute("SET application_name = 'hooked'")
                    .await?;
                Ok(())
            })
        })
    };
    for reset in [ResetOnReturn::Rollback, ResetOnReturn::Discard] {
        calls.store(0, Ordering::Relaxed);
        let pool = Pool::new(Settings {
            connect_init_sql: Some(
                "SET statement_timeout = '5s'; SET search_path = app, public;".into(),
            ),
            on_connect: Some(hook.clone()),
            reset_on_return: reset,
            pool_size: 2,
            max_overflow: Some(0),
            ..settings(&pg, "setup")
        })
        .unwrap();
        for round in 0..3 {
            let (a, b) = (pool.get().await.unwrap(), pool.get().await.unwrap());
            for conn in [&a, &b] {
                let row = conn
                    .query_one(
                        "SELECT current_setting('statement_timeout'), \
                         current_setting('search_path'), current_setting('application_name')",
                        &[],
                    )
                    .await
                    .unwrap();
                let got: (String, String, String) = (row.get(0), row.get(1), row.get(2));
                assert_eq!(
                    got,
                    ("5s".into(), "app, public".into(), "hooked".into()),
                    "{reset}, round {round}"
                );
                // Changed by the user: under `discard` the next user gets the set-up again
                // (under `rollback` session state is the user's to keep, as in SQLAlchemy).
                if reset == ResetOnReturn::Discard {
                    conn.batch_execute("SET search_path = other").await.unwrap();
                }
            }
        }
        // On the pool: a `SET` gets a connection of its own, reset with DISCARD ALL after.
        pool.execute("SET statement_timeout = '1s'", &[])
            .await
            .unwrap();
        let timeout: String = pool
            .query_one("SELECT current_setting('statement_timeout')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(timeout, "5s", "{reset}: set up again after DISCARD ALL");
        assert_eq!(
            pool.status().connections_created,
            2,
            "{reset}: the same two connections"
        );
        // The hook ran once per connection, plus once per DISCARD ALL.
        assert!(calls.load(Ordering::Relaxed) >= 2, "{reset}");
    }
}

/// A failing init statement fails the checkout at once with a connect error naming the
/// statement (not a timeout after DB_POOL_TIMEOUT), and leaves no connection open on the
/// server; a failing hook is named the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_set_up_is_a_connect_error_naming_the_step() {
    let pg = cluster();
    let obs = observer(&pg).await;
    let pool = Pool::new(Settings {
        connect_init_sql: Some("SET statement_timeout = '5s'; SET no_such_setting = 1".into()),
        pool_timeout: Duration::from_secs(20),
        ..settings(&pg, "setup-bad-sql")
    })
    .unwrap();
    let started = std::time::Instant::now();
    let err = pool.get().await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "failed at once"
    );
    let Error::Connect(e) = &err else {
        panic!("a connect error, not {err:?}")
    };
    let text = e.to_string();
    assert!(
        text.contains("statement 2 of 2 (SET no_such_setting...)"),
        "{text}"
    );
    assert!(text.contains("no_such_setting"), "{text}");
    assert!(!e.is_transient(), "{text}");
    // Closed: the backend goes once the server has read the Terminate.
    assert!(
        eventually(Duration::from_secs(30), || async {
            server_count(&obs, "setup-bad-sql").await == 0
        })
        .await,
        "nothing left open"
    );
    assert_eq!(pool.status().total_connections, 0);

    let hook = ConnectHook::new(|_client| Box::pin(async { Err("no tenant configured".into()) }));
    let pool = Pool::new(Settings {
        on_connect: Some(hook),
        ..settings(&pg, "setup-bad-hook")
    })
    .unwrap();
    let err = pool.get().await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("on_connect hook") && text.contains("no tenant configured"),
        "{text}"
    );
}

/// `DB_CONNECT_INIT_SQL` comes from the environment as written.
#[test]
fn init_sql_is_read_from_the_environment() {
    let sql = "SET statement_timeout = '5s'; SET search_path = app";
    let settings =
        Settings::from_lookup(|name| (name == "DB_CONNECT_INIT_SQL").then(|| sql.into())).unwrap();
    assert_eq!(settings.connect_init_sql.as_deref(), Some(sql));
    assert!(Settings::from_lookup(|_| None)
        .unwrap()
        .connect_init_sql
        .is_none());
}
