//! TLS clusters checked with the real server through `psql` and `openssl`.
//!
//! Run as root these also exercise the "server runs as the postgres user"
//! path (key files chowned to it, client files readable by root).

#![cfg(feature = "tls")]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tidepool_cluster::tls::{Ca, TlsMode};
use tidepool_cluster::{Cluster, ShutdownMode};

/// Reports whether the session is encrypted: `t|TLSv1.3` or `f|`.
const SSL_QUERY: &str =
    "select ssl, coalesce(version, '') from pg_stat_ssl where pid = pg_backend_pid()";

/// psql from the server's installation: next to the real `initdb` (the bin
/// dir found may hold symlinks, e.g. /usr/local/bin), else from `$PATH`.
fn psql_path(cluster: &Cluster) -> PathBuf {
    let initdb = fs::canonicalize(cluster.bin_dir().join("initdb")).expect("initdb");
    let psql = initdb.with_file_name("psql");
    if psql.exists() {
        psql
    } else {
        PathBuf::from("psql")
    }
}

/// Runs `psql` against the cluster as its role with its password, adding
/// `conninfo` (host, sslmode, ...). Returns psql's output or its error text.
///
/// The environment is cleared so no `PG*` variable or `~/.postgresql` file
/// (default client certificate, root.crt) changes what is tested.
fn psql(cluster: &Cluster, conninfo: &str) -> Result<String, String> {
    psql_sql(cluster, conninfo, SSL_QUERY)
}

/// [`psql`] with another query.
fn psql_sql(cluster: &Cluster, conninfo: &str, sql: &str) -> Result<String, String> {
    let output = Command::new(psql_path(cluster))
        .arg(format!(
            "port={} user={} dbname={} connect_timeout=10 {conninfo}",
            cluster.port(),
            cluster.user(),
            cluster.dbname()
        ))
        .args(["-X", "-A", "-t", "-c", sql])
        .env_clear()
        .env("PGPASSWORD", cluster.password())
        .env("HOME", "/nonexistent")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .expect("running psql");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

/// [`psql`] that must succeed over TLS.
fn assert_tls(cluster: &Cluster, conninfo: &str) {
    match psql(cluster, conninfo) {
        Ok(out) => assert!(out.starts_with("t|TLS"), "{conninfo}: {out}"),
        Err(e) => panic!("{conninfo}: {e}"),
    }
}

/// [`psql`] that must fail with `expected` in the error.
fn assert_rejected(cluster: &Cluster, conninfo: &str, expected: &str) {
    match psql(cluster, conninfo) {
        Ok(out) => panic!("{conninfo}: connected ({out}), expected {expected:?}"),
        Err(e) => assert!(e.contains(expected), "{conninfo}: {e}"),
    }
}

/// Verifies hostname `localhost` while connecting to 127.0.0.1 only (the server does not listen on ::1).
fn verify_full(ca: &Path) -> String {
    format!(
        "host=localhost hostaddr=127.0.0.1 sslmode=verify-full sslrootcert={}",
        ca.display()
    )
}

/// A directory of this test's own, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("tidepool-tls-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).expect("creating a temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn plain_cluster_has_tls_off() {
    let cluster = Cluster::start().expect("start");
    assert!(cluster.tls().is_none());
    assert_eq!(
        psql(&cluster, "host=127.0.0.1 sslmode=prefer"),
        Ok("f|".to_owned())
    );
    assert_rejected(
        &cluster,
        "host=127.0.0.1 sslmode=require",
        "server does not support SSL",
    );
}

#[test]
fn optional_accepts_plaintext_and_verified_tls() {
    let cluster = Cluster::builder()
        .tls(TlsMode::Optional)
        .start()
        .expect("start");
    let tls = cluster.tls().expect("TLS cluster");
    assert_eq!(tls.mode(), TlsMode::Optional);
    assert_eq!(tls.ca().cert_pem(), Ca::shared().unwrap().cert_pem());
    assert_eq!(
        fs::read_to_string(tls.ca_cert_path()).unwrap(),
        tls.ca().cert_pem()
    );
    let ca = tls.ca_cert_path();

    assert_eq!(
        psql(&cluster, "host=127.0.0.1 sslmode=disable"),
        Ok("f|".to_owned())
    );
    assert_eq!(
        psql(&cluster, "host=127.0.0.1 sslmode=allow"),
        Ok("f|".to_owned())
    );
    assert_tls(&cluster, "host=127.0.0.1 sslmode=prefer");
    assert_tls(&cluster, "host=127.0.0.1 sslmode=require");
    assert_tls(&cluster, &verify_full(ca));
    // The certificate's IP SAN matches a numeric host.
    assert_tls(
        &cluster,
        &format!(
            "host=127.0.0.1 sslmode=verify-full sslrootcert={}",
            ca.display()
        ),
    );
    // SCRAM-SHA-256-PLUS over TLS; plaintext cannot bind.
    assert_tls(
        &cluster,
        "host=127.0.0.1 sslmode=require channel_binding=require",
    );
    assert_rejected(
        &cluster,
        "host=127.0.0.1 sslmode=disable channel_binding=require",
        "channel binding",
    );

    // The certificate files in the data dir survive a restart.
    cluster.restart(ShutdownMode::Fast).expect("restart");
    assert_tls(&cluster, &verify_full(ca));
}

#[test]
fn only_rejects_plaintext() {
    let cluster = Cluster::builder()
        .tls(TlsMode::Only)
        .start()
        .expect("start");
    let ca = cluster.tls().expect("TLS cluster").ca_cert_path();
    assert_rejected(&cluster, "host=127.0.0.1 sslmode=disable", "no encryption");
    // `allow` tries plaintext first, is refused, and retries with TLS.
    assert_tls(&cluster, "host=127.0.0.1 sslmode=allow");
    assert_tls(&cluster, "host=127.0.0.1 sslmode=prefer");
    assert_tls(&cluster, &verify_full(ca));
    assert_tls(
        &cluster,
        &format!("{} channel_binding=require", verify_full(ca)),
    );
}

#[test]
fn client_cert_mode_requires_a_certificate_for_the_role() {
    let cluster = Cluster::builder()
        .tls(TlsMode::ClientCert)
        .start()
        .expect("start");
    let tls = cluster.tls().expect("TLS cluster");
    let verified = verify_full(tls.ca_cert_path());

    assert_rejected(
        &cluster,
        &verified,
        "connection requires a valid client certificate",
    );

    let (cert, key) = tls.client_cert(cluster.user()).expect("client cert");
    assert_eq!(mode_of(&key), 0o600);
    let with_cert = |cert: &Path, key: &Path| {
        format!(
            "{verified} sslcert={} sslkey={}",
            cert.display(),
            key.display()
        )
    };
    assert_tls(&cluster, &with_cert(&cert, &key));

    // Right CA, wrong role: the client is told only that authentication
    // failed (reported under the password method), the log says why.
    let (cert, key) = tls.client_cert("someone_else").expect("client cert");
    assert_rejected(&cluster, &with_cert(&cert, &key), "authentication failed");
    let log = fs::read_to_string(cluster.log_file()).unwrap();
    assert!(log.contains("CN mismatch"), "{log}");

    // Right role, wrong CA: the server refuses the handshake.
    let dir = TempDir::new("client-other-ca");
    let (cert, key) = Ca::new("other")
        .unwrap()
        .client_cert(cluster.user())
        .unwrap()
        .write(&dir.0, "client")
        .unwrap();
    assert!(psql(&cluster, &with_cert(&cert, &key)).is_err());
    let log = fs::read_to_string(cluster.log_file()).unwrap();
    assert!(log.contains("certificate verify failed"), "{log}");

    // The password is still required.
    let (cert, key) = tls.client_cert(cluster.user()).expect("client cert");
    let output = Command::new(psql_path(&cluster))
        .arg(format!(
            "port={} user={} dbname={} password=wrong {}",
            cluster.port(),
            cluster.user(),
            cluster.dbname(),
            with_cert(&cert, &key)
        ))
        .args(["-X", "-w", "-c", "select 1"])
        .env_clear()
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("password authentication failed"), "{err}");
}

#[test]
fn another_ca_fails_verification() {
    let cluster = Cluster::builder()
        .tls(TlsMode::Only)
        .start()
        .expect("start");
    let dir = TempDir::new("other-ca");
    let other = dir.0.join("other.crt");
    Ca::new("other").unwrap().write_cert(&other).unwrap();
    assert_rejected(
        &cluster,
        &format!(
            "host=127.0.0.1 sslmode=verify-ca sslrootcert={}",
            other.display()
        ),
        "certificate verify failed",
    );
    // Not verifying, the same connection works.
    assert_tls(
        &cluster,
        "host=127.0.0.1 sslmode=require sslrootcert=/nonexistent",
    );
}

#[test]
fn openssl_verifies_the_server_certificate() {
    let cluster = Cluster::builder()
        .tls(TlsMode::Only)
        .start()
        .expect("start");
    let s_client = |ca: &Path| {
        Command::new("openssl")
            .args(["s_client", "-starttls", "postgres", "-connect"])
            .arg(format!("127.0.0.1:{}", cluster.port()))
            .arg("-CAfile")
            .arg(ca)
            .args([
                "-verify_return_error",
                "-verify_hostname",
                "localhost",
                "-brief",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("running openssl")
    };
    let out = s_client(cluster.tls().unwrap().ca_cert_path());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Verification: OK"), "{text}");

    let dir = TempDir::new("openssl-other-ca");
    let other = dir.0.join("other.crt");
    Ca::new("other").unwrap().write_cert(&other).unwrap();
    let out = s_client(&other);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn issued_certificates_have_the_requested_names() {
    let ca = Ca::new("unit test CA").unwrap();
    let dir = TempDir::new("issued");
    let ca_path = dir.0.join("ca.crt");
    ca.write_cert(&ca_path).unwrap();
    let (server, server_key) = ca
        .server_cert(&["db.test", "127.0.0.2", "::1"])
        .unwrap()
        .write(&dir.0, "server")
        .unwrap();
    let (client, _) = ca
        .client_cert("alice")
        .unwrap()
        .write(&dir.0, "client")
        .unwrap();
    assert_eq!(mode_of(&server_key), 0o600);

    let openssl = |args: &[&str], file: &Path| {
        let out = Command::new("openssl")
            .args(args)
            .arg(file)
            .output()
            .expect("running openssl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {text}");
        text
    };
    for (purpose, cert) in [("sslserver", &server), ("sslclient", &client)] {
        let out = Command::new("openssl")
            .args(["verify", "-purpose", purpose, "-CAfile"])
            .arg(&ca_path)
            .arg(cert)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let sans = openssl(
        &["x509", "-noout", "-ext", "subjectAltName", "-in"],
        &server,
    );
    assert!(sans.contains("DNS:db.test"), "{sans}");
    assert!(sans.contains("IP Address:127.0.0.2"), "{sans}");
    assert!(sans.contains("IP Address:0:0:0:0:0:0:0:1"), "{sans}");
    let subject = openssl(&["x509", "-noout", "-subject", "-in"], &client);
    assert!(subject.contains("CN = alice"), "{subject}");
}

#[test]
fn standbys_of_tls_clusters_replicate_over_tls() {
    for mode in [TlsMode::Only, TlsMode::ClientCert] {
        let primary = Cluster::builder().tls(mode).start().expect("start");
        let standby = primary.standby().expect("standby");
        let tls = standby.tls().expect("a TLS standby");
        assert_eq!(tls.mode(), mode);
        assert!(standby.is_in_recovery().unwrap());

        let (cert, key) = tls.client_cert(standby.user()).expect("client cert");
        let conninfo = format!(
            "{} sslcert={} sslkey={}",
            verify_full(tls.ca_cert_path()),
            cert.display(),
            key.display()
        );
        // The standby serves TLS of its own; the walreceiver's connection to
        // the primary is encrypted too.
        assert_tls(&standby, &conninfo);
        assert_eq!(
            psql_sql(
                &primary,
                &conninfo,
                "select s.ssl from pg_stat_replication r join pg_stat_ssl s using (pid)"
            ),
            Ok("t".to_owned()),
            "{mode:?}"
        );
    }
}
