//! Starts real PostgreSQL clusters and checks the lifecycle operations.
//!
//! Run as root these also exercise the "server runs as the postgres user" path.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool_cluster::{Cluster, ClusterError, ShutdownMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, SimpleQueryMessage};

/// Connects with `password` and returns the first column of every row of `sql`.
async fn query_async(
    cluster: &Cluster,
    password: &str,
    sql: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(cluster.host())
        .port(cluster.port())
        .user(cluster.user())
        .password(password)
        .dbname(cluster.dbname())
        .connect_timeout(Duration::from_secs(10));
    let (client, connection) = config.connect(NoTls).await?;
    let conn = tokio::spawn(connection);
    let rows = client.simple_query(sql).await?;
    drop(client);
    let _ = conn.await;
    Ok(rows
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_owned()),
            _ => None,
        })
        .collect())
}

/// Blocking wrapper around [`query_async`] with the cluster's password.
fn query(cluster: &Cluster, sql: &str) -> Result<Vec<String>, tokio_postgres::Error> {
    query_as(cluster, cluster.password(), sql)
}

fn query_as(
    cluster: &Cluster,
    password: &str,
    sql: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(query_async(cluster, password, sql))
}

/// Connects via the URL (exercises `Cluster::url`).
fn query_url(url: &str, sql: &str) -> Result<Vec<String>, tokio_postgres::Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
            let conn = tokio::spawn(connection);
            let rows = client.simple_query(sql).await?;
            drop(client);
            let _ = conn.await;
            Ok(rows
                .into_iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
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
        .expect("a row")
}

/// Whether `pid` is gone (or a zombie awaiting its reaper).
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
fn starts_and_accepts_the_password_over_tcp() {
    let t = Instant::now();
    let cluster = Cluster::start().expect("start");
    eprintln!("cluster start took {:?}", t.elapsed());

    assert_eq!(cluster.host(), "127.0.0.1");
    assert_eq!(cluster.user(), "tidepool");
    assert_eq!(cluster.dbname(), "postgres");
    assert_ne!(cluster.port(), 0);
    assert!(cluster.is_running());
    assert!(cluster.pid().is_some());
    assert_eq!(
        cluster.url(),
        format!(
            "postgresql://tidepool:{}@127.0.0.1:{}/postgres",
            cluster.password(),
            cluster.port()
        )
    );

    assert_eq!(one(&cluster, "SELECT 1"), "1");
    assert_eq!(
        query_url(&cluster.url(), "SELECT current_user").unwrap(),
        ["tidepool"]
    );
    assert_eq!(one(&cluster, "SHOW is_superuser"), "on");
    assert_eq!(one(&cluster, "SHOW listen_addresses"), "127.0.0.1");
    assert_eq!(one(&cluster, "SHOW fsync"), "off");
    assert_eq!(one(&cluster, "SHOW shared_buffers"), "32MB");
    assert_eq!(one(&cluster, "SHOW max_connections"), "100");
    assert_eq!(
        one(&cluster, "SHOW unix_socket_directories"),
        cluster.data_dir().display().to_string()
    );
    assert!(cluster.log_file().exists());
}

#[test]
fn wrong_password_is_rejected_with_28p01() {
    let cluster = Cluster::start().expect("start");
    let err = query_as(&cluster, "not-the-password", "SELECT 1").unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");
    // The right one still works.
    assert_eq!(one(&cluster, "SELECT 1"), "1");
}

#[test]
fn stop_fast_then_start_again_keeps_port_and_data() {
    let cluster = Cluster::start().expect("start");
    let port = cluster.port();
    query(
        &cluster,
        "CREATE TABLE t (v int); INSERT INTO t VALUES (42)",
    )
    .unwrap();
    let pid = cluster.pid().unwrap();

    cluster.stop(ShutdownMode::Fast).expect("stop fast");
    assert!(!cluster.is_running());
    assert_eq!(cluster.pid(), None);
    assert!(process_gone(pid));
    assert!(
        query(&cluster, "SELECT 1").is_err(),
        "connect to a stopped server"
    );
    // Stopping a stopped cluster is a no-op.
    cluster.stop(ShutdownMode::Smart).expect("second stop");

    cluster.start_again().expect("start again");
    assert_eq!(cluster.port(), port);
    assert!(cluster.is_running());
    assert_ne!(cluster.pid(), Some(pid));
    assert_eq!(one(&cluster, "SELECT v FROM t"), "42");
    // Starting a running cluster is a no-op.
    cluster.start_again().expect("second start");
}

#[test]
fn restart_immediate_gives_a_new_postmaster() {
    let cluster = Cluster::start().expect("start");
    let before = cluster.pid().unwrap();
    cluster.restart(ShutdownMode::Immediate).expect("restart");
    let after = cluster.pid().expect("running after restart");
    assert_ne!(before, after);
    assert!(process_gone(before));
    assert_eq!(one(&cluster, "SELECT 1"), "1");
    let log = fs::read_to_string(cluster.log_file()).unwrap();
    assert!(log.contains("automatic recovery in progress"), "{log}");
}

#[test]
fn kill_then_start_again_recovers() {
    let cluster = Cluster::start().expect("start");
    query(&cluster, "CREATE TABLE t (v int); INSERT INTO t VALUES (7)").unwrap();
    // synchronous_commit is off: make the commit durable before the crash.
    query(&cluster, "CHECKPOINT").unwrap();
    let pid = cluster.pid().unwrap();
    let children: Vec<u32> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let after = s[s.rfind(')')? + 1..].to_owned();
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect();
    assert!(!children.is_empty(), "postmaster has no children?");

    let t = Instant::now();
    cluster.kill().expect("kill");
    eprintln!("kill took {:?}", t.elapsed());
    assert!(!cluster.is_running());
    assert_eq!(cluster.pid(), None);
    assert!(process_gone(pid));
    for c in children {
        assert!(
            process_gone(c),
            "child {c} of killed postmaster still alive"
        );
    }
    assert!(
        query(&cluster, "SELECT 1").is_err(),
        "connect to a killed server"
    );
    cluster.kill().expect("killing a dead cluster is a no-op");

    let segment = shmid(&cluster);
    let t = Instant::now();
    cluster.start_again().expect("start after kill");
    assert!(
        !shm_segment_exists(segment),
        "old shared memory not reclaimed"
    );
    eprintln!("start after kill took {:?}", t.elapsed());
    assert_eq!(one(&cluster, "SELECT v FROM t"), "7");
    let log = fs::read_to_string(cluster.log_file()).unwrap();
    assert!(log.contains("not properly shut down"), "{log}");
}

#[test]
fn two_clusters_run_at_once() {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Cluster::start().expect("start a"));
        let b = s.spawn(|| Cluster::start().expect("start b"));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(a.port(), b.port());
    assert_ne!(a.data_dir(), b.data_dir());
    query(&a, "CREATE TABLE only_in_a (v int)").unwrap();
    assert_eq!(
        one(
            &a,
            "SELECT count(*) FROM pg_class WHERE relname = 'only_in_a'"
        ),
        "1"
    );
    assert_eq!(
        one(
            &b,
            "SELECT count(*) FROM pg_class WHERE relname = 'only_in_a'"
        ),
        "0"
    );
    drop(a);
    assert_eq!(one(&b, "SELECT 1"), "1");
}

#[test]
fn drop_stops_the_server_and_removes_the_data_dir() {
    let cluster = Cluster::start().expect("start");
    let data_dir = cluster.data_dir().to_owned();
    let log = cluster.log_file().to_owned();
    let pid = cluster.pid().unwrap();
    assert!(data_dir.join("PG_VERSION").exists());
    drop(cluster);
    assert!(!data_dir.exists());
    assert!(!log.exists());
    assert!(process_gone(pid));
}

/// The System V shared memory id recorded in postmaster.pid (line 7: "key id").
fn shmid(cluster: &Cluster) -> i32 {
    let text = fs::read_to_string(cluster.data_dir().join("postmaster.pid")).unwrap();
    text.lines()
        .nth(6)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

fn shm_segment_exists(shmid: i32) -> bool {
    // SAFETY: shmid_ds is plain old data filled in by the kernel.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    unsafe { libc::shmctl(shmid, libc::IPC_STAT, &mut ds) == 0 }
}

#[test]
fn drop_after_kill_and_after_stop_cleans_up() {
    let killed = Cluster::start().expect("start");
    let segment = shmid(&killed);
    killed.kill().unwrap();
    assert!(
        shm_segment_exists(segment),
        "a crash leaves the segment behind"
    );
    let dir = killed.data_dir().to_owned();
    drop(killed);
    assert!(!dir.exists());
    // Reclaimed (with the /dev/shm/PostgreSQL.* DSM segments), not leaked.
    assert!(
        !shm_segment_exists(segment),
        "shared memory of a crashed cluster leaked"
    );

    let stopped = Cluster::start().expect("start");
    stopped.stop(ShutdownMode::Fast).unwrap();
    let dir = stopped.data_dir().to_owned();
    drop(stopped);
    assert!(!dir.exists());
}

#[test]
fn builder_settings_are_applied() {
    let cluster = Cluster::builder()
        .max_connections(7)
        .setting("idle_session_timeout", "500ms")
        .setting("log_connections", "on")
        .setting("application_name", "it's quoted")
        .start()
        .expect("start");
    assert_eq!(one(&cluster, "SHOW max_connections"), "7");
    assert_eq!(one(&cluster, "SHOW idle_session_timeout"), "500ms");
    assert_eq!(one(&cluster, "SHOW log_connections"), "on");
    // Settings survive a restart.
    cluster.restart(ShutdownMode::Fast).unwrap();
    assert_eq!(one(&cluster, "SHOW max_connections"), "7");
    let log = fs::read_to_string(cluster.log_file()).unwrap();
    assert!(log.contains("connection authorized"), "{log}");
}

#[test]
fn bad_settings_are_clear_errors() {
    let err = Cluster::builder()
        .setting("bad name", "1")
        .start()
        .unwrap_err();
    assert!(matches!(err, ClusterError::InvalidSetting { .. }), "{err}");

    let err = Cluster::builder()
        .setting("shared_buffers", "not-a-size")
        .start()
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ClusterError::Start { .. }), "{msg}");
    assert!(msg.contains("shared_buffers"), "log tail missing: {msg}");
}

#[test]
fn shared_cluster_is_usable_from_threads_and_tokio() {
    let cluster = Arc::new(Cluster::start().expect("start"));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let c = Arc::clone(&cluster);
            std::thread::spawn(move || {
                assert!(c.is_running());
                one(&c, "SELECT 1")
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), "1");
    }

    // Blocking calls from inside a multi-threaded tokio runtime.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = Arc::clone(&cluster);
        tokio::task::spawn_blocking(move || c.restart(ShutdownMode::Fast))
            .await
            .unwrap()
            .unwrap();
        let rows = query_async(&cluster, cluster.password(), "SELECT 2")
            .await
            .unwrap();
        assert_eq!(rows, ["2"]);
        // Directly on a runtime thread too (blocking, but it works).
        let other = Cluster::start().expect("start inside runtime");
        let rows = query_async(&other, other.password(), "SELECT 3")
            .await
            .unwrap();
        assert_eq!(rows, ["3"]);
    });
}

#[test]
fn files_belong_to_the_server_user() {
    use std::os::unix::fs::MetadataExt;
    let cluster = Cluster::start().expect("start");
    let owner = fs::metadata(cluster.data_dir()).unwrap().uid();
    let is_root = fs::metadata("/proc/self").unwrap().uid() == 0;
    let server_uid = fs::metadata(format!("/proc/{}", cluster.pid().unwrap()))
        .unwrap()
        .uid();
    assert_eq!(owner, server_uid);
    if is_root {
        assert_ne!(server_uid, 0, "the server must not run as root");
    }
    let mode = fs::metadata(cluster.data_dir()).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o700);
    assert!(!Path::new("/var/run/postgresql")
        .join(format!(".s.PGSQL.{}", cluster.port()))
        .exists());
    assert!(cluster
        .data_dir()
        .join(format!(".s.PGSQL.{}", cluster.port()))
        .exists());
}

#[test]
fn port_taken_while_stopped_is_reported() {
    let cluster = Cluster::start().expect("start");
    cluster.stop(ShutdownMode::Fast).unwrap();
    let squatter = match std::net::TcpListener::bind(("127.0.0.1", cluster.port())) {
        Ok(l) => l,
        Err(_) => return, // someone else grabbed it first; nothing to check
    };
    let err = cluster.start_again().unwrap_err();
    assert!(matches!(err, ClusterError::PortInUse { .. }), "{err}");
    drop(squatter);
    cluster.start_again().expect("start once the port is free");
    assert_eq!(one(&cluster, "SELECT 1"), "1");
}
