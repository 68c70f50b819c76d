//! The maintenance task against real PostgreSQL: idle trimming (`DB_POOL_IDLE_TIMEOUT` down to
//! `DB_POOL_MIN_IDLE`), keepalive pings that beat a server's `idle_session_timeout`, and
//! `DB_POOL_MIN_IDLE` refilled after the server killed the connections.

mod support;

use std::time::{Duration, Instant};

use support::{
    cluster, cluster_with, eventually, observer, server_count, settings, terminate_backends,
};
use tidepool::{Pool, Settings};

const WITHIN: Duration = Duration::from_secs(30);

/// After a burst of 5 connections, an idle timeout of 0.5 s brings them down to
/// `DB_POOL_MIN_IDLE` (1), on the pool's figures and on the server, counted as closed `idle`;
/// without the setting (the seed's behaviour) all 5 stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_trimmed_down_to_min_idle() {
    let pg = cluster();
    let obs = observer(&pg).await;
    for trim in [true, false] {
        let app = if trim { "trim" } else { "no-trim" };
        let pool = Pool::new(Settings {
            pool_size: 5,
            max_overflow: Some(0),
            idle_timeout: trim.then_some(Duration::from_millis(500)),
            min_idle: 1,
            ..settings(&pg, app)
        })
        .unwrap();
        {
            let mut held = Vec::new();
            for _ in 0..5 {
                held.push(pool.get().await.unwrap());
            }
        }
        assert_eq!(pool.status().checked_in, 5);
        let released = Instant::now();
        if trim {
            assert!(
                eventually(WITHIN, || async { pool.status().total_connections == 1 }).await,
                "trimmed to min idle: {:?}",
                pool.status()
            );
            // Idle timeout plus a round of the task (a quarter of a second), with slack.
            eprintln!("trimmed after {:?}", released.elapsed());
            assert!(
                eventually(WITHIN, || async { server_count(&obs, app).await == 1 }).await,
                "closed on the server"
            );
            assert_eq!(pool.status().connections_closed.idle, 4);
        } else {
            // Give a trimming task (were there one) several idle timeouts' worth of time.
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_eq!(pool.status().total_connections, 5);
            assert_eq!(pool.status().connections_closed.idle, 0);
        }
    }
}

/// A server that ends idle sessions after 1 s (`idle_session_timeout`), pre-ping off: with a
/// keepalive of 0.3 s the connection is still alive after 3 s idle and answers the next
/// request on the same backend; without it the server ended the session meanwhile (the
/// checkout sees the closed socket and opens a new one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_beats_the_servers_idle_session_timeout() {
    let pg = cluster_with(&[("idle_session_timeout", "1s")]);
    for keepalive in [true, false] {
        let app = if keepalive {
            "keepalive"
        } else {
            "no-keepalive"
        };
        let pool = Pool::new(Settings {
            pool_size: 1,
            max_overflow: Some(0),
            pre_ping: false,
            keepalive: keepalive.then_some(Duration::from_millis(300)),
            ..settings(&pg, app)
        })
        .unwrap();
        let pid: i32 = {
            let conn = pool.get().await.unwrap();
            conn.query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0)
        };
        // The idle spell itself is the scenario: three of the server's idle timeouts.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let conn = pool.get().await.unwrap();
        let answer = conn.query_one("SELECT pg_backend_pid()", &[]).await;
        if keepalive {
            let again: i32 = answer.expect("alive after the idle spell").get(0);
            assert_eq!(again, pid, "the same backend, kept alive");
        } else {
            // The server ended the session; the checkout saw the closed socket and opened a
            // new connection.
            let again: i32 = answer.expect("a replacement connection").get(0);
            assert_ne!(again, pid, "the idle session was ended by the server");
            assert_eq!(pool.status().connections_created, 2);
        }
    }
}

/// `DB_POOL_MIN_IDLE` connections are opened in the background and refilled after the server
/// terminates them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_idle_is_refilled_after_connections_die() {
    let pg = cluster();
    let obs = observer(&pg).await;
    let app = "min-idle";
    let pool = Pool::new(Settings {
        pool_size: 3,
        min_idle: 2,
        ..settings(&pg, app)
    })
    .unwrap();
    assert!(
        eventually(WITHIN, || async { server_count(&obs, app).await == 2 }).await,
        "two idle connections opened in the background: {:?}",
        pool.status()
    );
    let before = pool.status().connections_created;
    assert_eq!(terminate_backends(&obs, app).await, 2);
    // The task notices the dead ones and replaces them, with no checkout to find them.
    assert!(
        eventually(WITHIN, || async {
            server_count(&obs, app).await == 2 && pool.status().checked_in == 2
        })
        .await,
        "refilled: {:?}",
        pool.status()
    );
    assert!(pool.status().connections_created >= before + 2);
}
