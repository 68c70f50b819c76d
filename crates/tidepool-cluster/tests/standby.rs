//! Streaming standbys: replication, read-only refusal, promotion, several
//! standbys of one primary, stop/start and drop in either order.
//!
//! Run as root these also exercise the "pg_basebackup and the standby run as
//! the postgres user" path.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use tidepool_cluster::{Cluster, ClusterError, ShutdownMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, SimpleQueryMessage};

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

/// Runs `sql` (simple protocol) on `cluster` and returns the first column of every row.
fn query(cluster: &Cluster, sql: &str) -> Result<Vec<String>, tokio_postgres::Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let mut config = tokio_postgres::Config::new();
            config
                .host(cluster.host())
                .port(cluster.port())
                .user(cluster.user())
                .password(cluster.password())
                .dbname(cluster.dbname())
                .connect_timeout(Duration::from_secs(10));
            let (client, connection) = config.connect(NoTls).await?;
            let conn = tokio::spawn(connection);
            let rows = client.simple_query(sql).await;
            drop(client);
            let _ = conn.await;
            Ok(rows?
                .into_iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_owned()),
                    _ => None,
                })
                .collect())
        })
}

fn one(cluster: &Cluster, sql: &str) -> String {
    query(cluster, sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}: {:?}", e.as_db_error()))
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

/// Polls `sql` on `cluster` until it returns `want` (10 s deadline).
fn wait_for(cluster: &Cluster, sql: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = query(cluster, sql).map(|rows| rows.into_iter().next());
        if matches!(&got, Ok(Some(v)) if v == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql} on port {} did not return {want:?} within 10s (last: {got:?})",
            cluster.port()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
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
fn standby_streams_rows_and_refuses_writes() {
    let primary = Cluster::start().must("start primary");
    query(&primary, "CREATE TABLE t (v int); INSERT INTO t VALUES (1)").unwrap();

    // initdb's pg_hba.conf lets replication in over TCP with the password.
    let hba = fs::read_to_string(primary.data_dir().join("pg_hba.conf")).unwrap();
    assert!(
        hba.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
            == [
                "host",
                "replication",
                "all",
                "127.0.0.1/32",
                "scram-sha-256"
            ]),
        "{hba}"
    );

    let t = Instant::now();
    let standby = primary.standby().must("standby");
    eprintln!("standby took {:?}", t.elapsed());

    assert_ne!(standby.port(), primary.port());
    assert_ne!(standby.data_dir(), primary.data_dir());
    assert_ne!(standby.log_file(), primary.log_file());
    assert!(standby.is_running());
    assert!(standby.is_in_recovery().unwrap());
    assert!(!primary.is_in_recovery().unwrap());
    assert_eq!(one(&standby, "SELECT pg_is_in_recovery()"), "t");
    assert_eq!(
        one(&standby, "SELECT status FROM pg_stat_wal_receiver"),
        "streaming"
    );
    // Its own name, the primary's throwaway settings.
    let name = one(&standby, "SHOW cluster_name");
    assert_ne!(name, one(&primary, "SHOW cluster_name"));
    assert_eq!(one(&standby, "SHOW fsync"), "off");
    assert_eq!(one(&standby, "SHOW synchronous_commit"), "off");
    assert_eq!(one(&standby, "SHOW port"), standby.port().to_string());
    assert_eq!(
        one(&standby, "SHOW unix_socket_directories"),
        standby.data_dir().display().to_string()
    );
    assert_eq!(
        one(
            &primary,
            "SELECT application_name || ' ' || state FROM pg_stat_replication"
        ),
        format!("{name} streaming")
    );

    // Data from before the backup, and written after it.
    assert_eq!(one(&standby, "SELECT v FROM t"), "1");
    query(&primary, "INSERT INTO t VALUES (2)").unwrap();
    wait_for(&standby, "SELECT count(*) FROM t", "2");

    let err = query(&standby, "INSERT INTO t VALUES (3)").unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
        "{err}"
    );

    // The password is where the walreceiver reads it, and nowhere in the logs.
    let conninfo = one(&standby, "SELECT conninfo FROM pg_stat_wal_receiver");
    assert!(conninfo.contains("password=********"), "{conninfo}");
    assert!(!conninfo.contains(primary.password()), "{conninfo}");
    let auto_conf = standby.data_dir().join("postgresql.auto.conf");
    let text = fs::read_to_string(&auto_conf).unwrap();
    assert!(text.contains("primary_conninfo"), "{text}");
    assert!(text.contains("primary_slot_name"), "{text}");
    let mode = fs::metadata(&auto_conf).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{auto_conf:?}");
    for log in [standby.log_file(), primary.log_file()] {
        let text = fs::read_to_string(log).unwrap();
        assert!(!text.contains(primary.password()), "password in {log:?}");
    }
}

#[test]
fn promote_makes_the_standby_writable() {
    let primary = Cluster::start().must("start primary");
    query(&primary, "CREATE TABLE t (v int); INSERT INTO t VALUES (1)").unwrap();
    let standby = primary.standby().must("standby");

    // Failover: the primary crashes, the standby takes over.
    primary.kill().unwrap();
    let t = Instant::now();
    standby.promote().must("promote");
    eprintln!("promote took {:?}", t.elapsed());
    assert!(!standby.is_in_recovery().unwrap());
    assert_eq!(one(&standby, "SELECT pg_is_in_recovery()"), "f");
    query(&standby, "INSERT INTO t VALUES (2)").expect("write after promote");
    assert_eq!(one(&standby, "SELECT sum(v) FROM t"), "3");

    // It is a primary now: promoting again is a clear error.
    let err = standby.promote().unwrap_err();
    assert!(matches!(err, ClusterError::Promote { .. }), "{err}");
    assert!(err.to_string().contains("not in standby mode"), "{err}");

    // And it survives a restart as a primary.
    standby.restart(ShutdownMode::Fast).unwrap();
    assert!(!standby.is_in_recovery().unwrap());
    assert_eq!(one(&standby, "SELECT sum(v) FROM t"), "3");
}

#[test]
fn several_standbys_and_either_drop_order() {
    let primary = Cluster::builder()
        .max_connections(120)
        .start()
        .must("start primary");
    query(&primary, "CREATE TABLE t (v int)").unwrap();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| primary.standby().must("standby a"));
        let b = s.spawn(|| {
            primary
                .standby_builder()
                .setting("work_mem", "5MB")
                .start()
                .must("standby b")
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(a.port(), b.port());
    // The primary's settings carry over (a hot standby needs max_connections
    // at least as high), the builder's apply on top.
    assert_eq!(one(&a, "SHOW max_connections"), "120");
    assert_eq!(one(&b, "SHOW work_mem"), "5MB");
    assert_eq!(one(&a, "SHOW work_mem"), "4MB");
    assert_eq!(
        one(&primary, "SELECT count(*) FROM pg_stat_replication"),
        "2"
    );
    assert_eq!(
        one(&primary, "SELECT count(*) FROM pg_replication_slots"),
        "2"
    );

    query(&primary, "INSERT INTO t VALUES (1)").unwrap();
    wait_for(&a, "SELECT count(*) FROM t", "1");
    wait_for(&b, "SELECT count(*) FROM t", "1");

    // Standby first: its slot on the primary goes with it.
    let dir = a.data_dir().to_owned();
    drop(a);
    assert!(!dir.exists());
    assert_eq!(
        one(&primary, "SELECT count(*) FROM pg_replication_slots"),
        "1"
    );

    // Primary first: the standby keeps running (and retrying), then drops cleanly.
    let primary_dir = primary.data_dir().to_owned();
    drop(primary);
    assert!(!primary_dir.exists());
    assert!(b.is_running());
    assert!(b.is_in_recovery().unwrap());
    assert_eq!(one(&b, "SELECT count(*) FROM t"), "1");
    b.restart(ShutdownMode::Fast).unwrap();
    assert!(b.is_in_recovery().unwrap());
    let (dir, pid) = (b.data_dir().to_owned(), b.pid().unwrap());
    drop(b);
    assert!(!dir.exists());
    assert!(process_gone(pid));
}

#[test]
fn stopped_standby_catches_up_after_checkpoints() {
    let primary = Cluster::start().must("start primary");
    query(&primary, "CREATE TABLE t (v int)").unwrap();
    let standby = primary.standby().must("standby");
    let pid = standby.pid().unwrap();

    standby.stop(ShutdownMode::Fast).unwrap();
    assert!(process_gone(pid));
    // Several WAL segments (1 MB each) written and checkpointed away while it
    // is down: its replication slot keeps them for it.
    for _ in 0..3 {
        query(
            &primary,
            "INSERT INTO t SELECT generate_series(1, 10000); SELECT pg_switch_wal(); CHECKPOINT",
        )
        .unwrap();
    }
    standby.start_again().unwrap();
    assert!(standby.is_in_recovery().unwrap());
    standby.wait_for_streaming().must("streaming again");
    wait_for(&standby, "SELECT count(*) FROM t", "30000");

    // Crash the standby, then drop it: cleaned up like any cluster.
    standby.kill().unwrap();
    let dir = standby.data_dir().to_owned();
    drop(standby);
    assert!(!dir.exists());
    assert_eq!(
        one(&primary, "SELECT count(*) FROM pg_replication_slots"),
        "0"
    );
}

#[test]
fn standby_of_a_stopped_primary_is_a_clear_error() {
    let primary = Cluster::start().must("start primary");
    primary.stop(ShutdownMode::Fast).unwrap();
    let err = primary.standby().unwrap_err();
    assert!(matches!(err, ClusterError::NotRunning { .. }), "{err}");
    // A primary (never a standby) cannot be promoted.
    primary.start_again().unwrap();
    let err = primary.promote().unwrap_err();
    assert!(err.to_string().contains("not in standby mode"), "{err}");
    let err = primary.wait_for_streaming().unwrap_err();
    assert!(matches!(err, ClusterError::Standby { .. }), "{err}");
}
