//! The pool's own start-up handshake (SCRAM-SHA-256 keys derived once per pool) against a real
//! server: every authentication method the server may ask for still works, the keys follow a
//! new salt, and a server that cannot prove it knows the password is refused.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::{cluster, cluster_addr, eventually, observer, settings};
use tidepool::{DatabaseUrl, Error, Pool, Settings};
use tidepool_cluster::Cluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn pool_at(cluster: &Cluster, url: &str, app: &str) -> Pool {
    Pool::new(Settings {
        database_url: Some(DatabaseUrl::parse(url).expect("URL parses")),
        pool_timeout: Duration::from_secs(5),
        ..settings(cluster, app)
    })
    .expect("settings are valid")
}

async fn one(pool: &Pool) -> Result<i32, Error> {
    Ok(pool.get().await?.query_one("SELECT 1", &[]).await?.get(0))
}

/// Replaces the cluster's pg_hba.conf and waits until the server has loaded it.
async fn set_hba(cluster: &Cluster, rules: &str) {
    let path = cluster.data_dir().join("pg_hba.conf");
    // Rewritten in place: the file keeps the server's ownership when the tests run as root.
    std::fs::write(&path, rules).expect("pg_hba.conf writable");
    let admin = observer(cluster).await;
    admin
        .execute("SELECT pg_reload_conf()", &[])
        .await
        .expect("reload");
    let first = rules.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let method = first.split_whitespace().last().unwrap_or("").to_owned();
    let loaded = eventually(Duration::from_secs(10), || {
        let admin = &admin;
        let method = method.clone();
        async move {
            admin
                .query_one(
                    "SELECT auth_method FROM pg_hba_file_rules ORDER BY line_number LIMIT 1",
                    &[],
                )
                .await
                .is_ok_and(|r| r.get::<_, String>(0) == method)
        }
    })
    .await;
    assert!(loaded, "the server did not load the new pg_hba.conf");
}

/// SCRAM, md5, cleartext password and trust (over the Unix socket) all open working
/// connections; a wrong password is refused at once with the server's SQLSTATE under each
/// password method.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_authentication_method_the_server_asks_for_works() {
    let cluster = cluster();
    let admin = observer(&cluster).await;
    // md5 needs a role whose stored password is an md5 hash.
    admin
        .batch_execute(
            "SET password_encryption = 'md5'; CREATE ROLE md5_role LOGIN PASSWORD 'md5-secret';
             SET password_encryption = 'scram-sha-256';
             CREATE ROLE clear_role LOGIN PASSWORD 'clear-secret';",
        )
        .await
        .expect("roles created");
    set_hba(
        &cluster,
        &format!(
            "host all md5_role 127.0.0.1/32 md5\n\
             host all clear_role 127.0.0.1/32 password\n\
             host all {} 127.0.0.1/32 scram-sha-256\n\
             local all all trust\n",
            cluster.user()
        ),
    )
    .await;
    let (host, port, db) = (cluster.host(), cluster.port(), cluster.dbname());
    let scram = cluster.url();
    let md5 = format!("postgresql://md5_role:md5-secret@{host}:{port}/{db}");
    let clear = format!("postgresql://clear_role:clear-secret@{host}:{port}/{db}");
    let trust = format!(
        "postgresql://{}:ignored@/{db}?host={}&port={port}",
        cluster.user(),
        cluster.data_dir().display()
    );
    for (name, url) in [
        ("scram", &scram),
        ("md5", &md5),
        ("password", &clear),
        ("trust", &trust),
    ] {
        let pool = pool_at(&cluster, url, name);
        // Several at once: the first ones to reach the SCRAM exchange share one key derivation.
        let mut conns = Vec::new();
        for _ in 0..3 {
            conns.push(pool.get().await.unwrap_or_else(|e| panic!("{name}: {e}")));
        }
        for c in &conns {
            let v: i32 = c.query_one("SELECT 1", &[]).await.expect(name).get(0);
            assert_eq!(v, 1, "{name}");
        }
    }
    for (name, url) in [
        ("scram", scram.replace(cluster.password(), "wrong")),
        ("md5", md5.replace("md5-secret", "wrong")),
        ("password", clear.replace("clear-secret", "wrong")),
    ] {
        let pool = pool_at(&cluster, &url, name);
        let started = Instant::now();
        let err = one(&pool).await.expect_err(name);
        let Error::Connect(e) = &err else {
            panic!("{name}: not a connect error: {err:?}")
        };
        assert_eq!(e.code(), Some("28P01"), "{name}: {e}");
        assert!(!e.is_transient(), "{name}");
        assert!(started.elapsed() < Duration::from_secs(4), "{name}: waited");
    }
}

/// A new salt (the same password set again) makes the pool derive new keys: new connections
/// still authenticate, and ones opened before keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_follow_a_new_salt() {
    let cluster = cluster();
    let admin = observer(&cluster).await;
    let pool = pool_at(&cluster, &cluster.url(), "salt");
    let held = pool.get().await.expect("first connection");
    let before = salt(&admin, cluster.user()).await;
    admin
        .batch_execute(&format!(
            "ALTER ROLE {} PASSWORD '{}'",
            cluster.user(),
            cluster.password()
        ))
        .await
        .expect("password set again");
    let after = salt(&admin, cluster.user()).await;
    assert_ne!(before, after, "setting the password again picks a new salt");
    // A second connection while the first is held: opened with the new salt.
    let second = pool.get().await.expect("connects after the salt changed");
    let v: i32 = second.query_one("SELECT 2", &[]).await.unwrap().get(0);
    assert_eq!(v, 2);
    let v: i32 = held.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(v, 1);
}

/// The salt of `user`'s stored SCRAM verifier (`SCRAM-SHA-256$<rounds>:<salt>$...`).
async fn salt(admin: &tokio_postgres::Client, user: &str) -> String {
    admin
        .query_one(
            "SELECT split_part(rolpassword, '$', 2) FROM pg_authid WHERE rolname = $1",
            &[&user],
        )
        .await
        .expect("pg_authid readable")
        .get(0)
}

/// A server that does not prove it knows the password (here: the real server's final SCRAM
/// message altered on the way) is refused at once, with an error that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_cannot_prove_the_password_is_refused() {
    let cluster = cluster();
    let proxy = tampering_proxy(cluster_addr(&cluster)).await;
    let url = format!(
        "postgresql://{}:{}@{proxy}/{}",
        cluster.user(),
        cluster.password(),
        cluster.dbname()
    );
    let pool = pool_at(&cluster, &url, "tampered");
    let started = Instant::now();
    let err = one(&pool).await.expect_err("tampered handshake");
    let Error::Connect(e) = &err else {
        panic!("not a connect error: {err:?}")
    };
    assert!(!e.is_transient(), "{e}");
    let text = e.to_string();
    assert!(text.contains("signature"), "{text}");
    assert!(!text.contains(cluster.password()), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "waited for the timeout"
    );
}

/// A proxy to `upstream` that flips one character of the server's SCRAM signature (the `v=` of
/// AuthenticationSASLFinal) and forwards everything else as it is.
async fn tampering_proxy(upstream: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (mut client_rx, mut client_tx) = client.into_split();
            let (mut server_rx, mut server_tx) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut done = false;
                while let Ok(n) = server_rx.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    // 'R', a length, auth code 12 (SASLFinal), "v=", the signature.
                    let chunk = &mut buf[..n];
                    if !done {
                        if let Some(at) = chunk.windows(12).position(|w| {
                            w[0] == b'R' && w[5..9] == [0, 0, 0, 12] && &w[9..11] == b"v="
                        }) {
                            let v = at + 11;
                            chunk[v] = if chunk[v] == b'A' { b'B' } else { b'A' };
                            done = true;
                        }
                    }
                    if client_tx.write_all(chunk).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// libpq's `connect_timeout` is per host: a first host that swallows packets costs
/// `DB_CONNECT_TIMEOUT`, then the next host in the URL is tried, within the same checkout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_first_host_costs_one_connect_timeout_then_the_next_is_used() {
    let cluster = cluster();
    let silent = support::proxy::Proxy::start(cluster_addr(&cluster)).await;
    silent.blackhole();
    let url = format!(
        "postgresql://{}:{}@{},{}/{}",
        cluster.user(),
        cluster.password(),
        silent.addr(),
        cluster_addr(&cluster),
        cluster.dbname()
    );
    let pool = Pool::new(Settings {
        database_url: Some(DatabaseUrl::parse(&url).expect("URL parses")),
        connect_timeout: Duration::from_millis(300),
        pool_timeout: Duration::from_secs(5),
        ..settings(&cluster, "two-hosts")
    })
    .expect("settings are valid");
    let started = Instant::now();
    assert_eq!(one(&pool).await.expect("the second host answers"), 1);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "took {took:?}"
    );
    assert_eq!(silent.accepted(), 1);
}
