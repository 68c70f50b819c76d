//! `LISTEN`/`NOTIFY` through [`Pool::listener`] against real PostgreSQL: notifications arrive,
//! the listening connection survives `pg_terminate_backend` (reconnects and listens again),
//! the gap is reported, and the connection is counted outside `pool_size`.

mod support;

use std::time::Duration;

use support::{cluster, eventually, observer, settings};
use tidepool::{ListenEvent, Pool};

const WITHIN: Duration = Duration::from_secs(30);

/// The next event within the deadline, skipping nothing.
async fn next(listener: &mut tidepool::Listener) -> ListenEvent {
    tokio::time::timeout(WITHIN, listener.recv())
        .await
        .expect("an event in time")
        .expect("the pool is alive")
}

/// Sends `NOTIFY quoted, 'payload'` until the listener receives a notification on `channel`
/// (the `LISTEN`s may still be on their way); returns it. Other notifications (copies of
/// earlier ones sent while waiting) are skipped.
async fn notify_until(
    obs: &tokio_postgres::Client,
    listener: &mut tidepool::Listener,
    quoted: &str,
    channel: &str,
    payload: &str,
) -> ListenEvent {
    let notify = format!("NOTIFY {quoted}, '{payload}'");
    for _ in 0..300 {
        obs.batch_execute(&notify).await.unwrap();
        while let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_millis(100), listener.recv()).await
        {
            if matches!(&event, ListenEvent::Notification { channel: c, .. } if c == channel) {
                return event;
            }
        }
    }
    panic!("no notification after 300 × {notify:?}")
}

/// Notifications on two channels arrive (one name needing quotes); after
/// `pg_terminate_backend` of the listening connection the listener gets a gap, then
/// notifications again; the connection is counted outside `pool_size`, and `close()` ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_survive_a_terminated_listener_with_the_gap_reported() {
    let pg = cluster();
    let obs = observer(&pg).await;
    let pool = Pool::new(settings(&pg, "listen")).unwrap();
    let mut listener = pool.listener();
    listener.listen("jobs").await.unwrap();
    listener.listen("Mixed Case").await.unwrap();
    // NOTIFY until the LISTEN is in place (the connection opens in the background).
    let listening = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'listen' \
                     AND query LIKE 'LISTEN%'";
    assert!(
        eventually(WITHIN, || async {
            obs.query_one(listening, &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
                >= 1
        })
        .await,
        "the listener connected"
    );
    assert_eq!(pool.status().listener_connections, 1);
    assert_eq!(pool.status().total_connections, 0, "not one of pool_size");
    let first = notify_until(&obs, &mut listener, "jobs", "jobs", "first").await;
    assert!(
        matches!(&first, ListenEvent::Notification { channel, payload, .. }
            if channel == "jobs" && payload == "first"),
        "{first:?}"
    );
    let second = notify_until(
        &obs,
        &mut listener,
        "\"Mixed Case\"",
        "Mixed Case",
        "second",
    )
    .await;
    assert!(
        matches!(&second, ListenEvent::Notification { channel, .. } if channel == "Mixed Case"),
        "{second:?}"
    );

    // The server ends the listening session: a gap, then notifications again.
    obs.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'listen' AND query LIKE 'LISTEN%'",
    )
    .await
    .unwrap();
    // (Copies of earlier notifications may come first.)
    let gap = loop {
        match next(&mut listener).await {
            ListenEvent::Notification { .. } => continue,
            gap => break gap,
        }
    };
    assert!(matches!(gap, ListenEvent::Gap { .. }), "{gap:?}");
    // The LISTENs are issued again once it has reconnected.
    let got = notify_until(&obs, &mut listener, "jobs", "jobs", "after").await;
    assert!(
        matches!(&got, ListenEvent::Notification { payload, .. } if payload == "after"),
        "{got:?}"
    );
    assert_eq!(pool.status().listener_connections, 1);
    pool.close();
    assert!(
        eventually(WITHIN, || async {
            obs.query_one(listening, &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 0
        })
        .await,
        "close() ends the listening connection"
    );
    let end =
        tokio::time::timeout(WITHIN, async { while listener.recv().await.is_some() {} }).await;
    assert!(end.is_ok(), "recv ends after close()");
}

/// A listener made outside a runtime does not panic; its connection opens at the first
/// `listen`, inside one.
#[test]
fn a_listener_made_outside_a_runtime_starts_at_listen() {
    let pg = cluster();
    let pool = Pool::new(settings(&pg, "listen-late")).unwrap();
    let mut listener = pool.listener();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let obs = observer(&pg).await;
        listener.listen("late").await.unwrap();
        let got = notify_until(&obs, &mut listener, "late", "late", "x").await;
        assert!(matches!(got, ListenEvent::Notification { .. }), "{got:?}");
        assert_eq!(pool.status().listener_connections, 1);
    });
}
