//! Streaming standbys of a running cluster, promotion, and the `psql` calls
//! both need.

use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use crate::setup::{self, combined, io_err, DBNAME, ROLE};
use crate::{log_len, validate_setting, Cluster, ClusterError, HOST, PG_CTL_TIMEOUT_SECS};

/// How long a new standby may take from "accepts connections" to "streaming".
const STREAMING_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Cluster::promote`] waits for `pg_is_in_recovery()` to turn false
/// after `pg_ctl promote -w` returned.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connect timeout of every `psql` call (seconds, `PGCONNECT_TIMEOUT`).
const PSQL_CONNECT_TIMEOUT_SECS: &str = "5";
/// Pause between polls.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Settings every standby gets before the primary's and the builder's:
/// reconnect to a restarted primary within a fraction of a second (default 5 s).
const STANDBY_DEFAULTS: [(&str, &str); 1] = [("wal_retrieve_retry_interval", "200ms")];

/// A standby's replication slot on its primary, dropped with the standby.
#[derive(Debug)]
pub(crate) struct Upstream {
    /// The primary's unix socket directory (its data dir).
    socket_dir: PathBuf,
    port: u16,
    slot: String,
}

/// Options for a standby; see [`Cluster::standby_builder`].
///
/// A standby is an ordinary [`Cluster`] (its own directory, port,
/// `cluster_name`, log file; stopped and removed on drop) made with
/// `pg_basebackup -R -X stream` over TCP from the primary, authenticating as
/// `tidepool` with SCRAM. The password reaches pg_basebackup in `PGPASSWORD`,
/// never in its arguments; `-R` writes it into the standby's
/// `postgresql.auto.conf` (`primary_conninfo`, in the 0700 data dir), where
/// the walreceiver reads it. Each standby streams through its own permanent
/// replication slot on the primary (named after its `cluster_name`), so a
/// stopped standby can catch up after the primary checkpointed; the slot is
/// dropped when the standby is dropped, if the primary still runs.
///
/// The primary's pg_hba.conf (initdb's, or that of its
/// TLS mode, feature `tls`) lets replication connections from
/// 127.0.0.1 in with scram-sha-256. A TLS primary's standby is a TLS cluster
/// of the same mode and replicates over TLS; for `ClientCert` it presents a
/// client certificate for `tidepool` kept in its own directory.
///
/// ```no_run
/// let primary = tidepool_cluster::Cluster::start()?;
/// let standby = primary.standby()?; // in recovery and streaming
/// assert!(standby.is_in_recovery()?);
/// standby.promote()?; // now a primary of its own, on a new timeline
/// # Ok::<(), tidepool_cluster::ClusterError>(())
/// ```
#[derive(Debug)]
#[must_use]
pub struct StandbyBuilder<'a> {
    primary: &'a Cluster,
    settings: Vec<(String, String)>,
}

impl StandbyBuilder<'_> {
    /// Adds a postgresql.conf line for the standby only, e.g.
    /// `("hot_standby_feedback", "on")`. The standby starts with the
    /// primary's [`ClusterBuilder::setting`](crate::ClusterBuilder::setting)s
    /// (a hot standby needs `max_connections` and a few others at least as
    /// high as the primary's) and `wal_retrieve_retry_interval = 200ms`;
    /// these come after them and win.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Takes a base backup of the running primary into a new cluster
    /// directory, starts it as a hot standby on a free port and returns once
    /// it accepts connections, is in recovery and its walreceiver is streaming.
    pub fn start(self) -> Result<Cluster, ClusterError> {
        for (name, value) in &self.settings {
            validate_setting(name, value)?;
        }
        let primary = self.primary;
        let env = primary.env.clone();
        let basebackup = env.tool("pg_basebackup")?;
        env.tool("psql")?; // polled below: fail before copying anything

        let settings = STANDBY_DEFAULTS
            .iter()
            .map(|&(n, v)| (n.to_owned(), v.to_owned()))
            .chain(primary.settings.iter().cloned())
            .chain(self.settings)
            .collect();
        let mut standby = Cluster::create(env.clone(), settings)?;
        // From here on, dropping `standby` on error cleans up (slot included).
        env.make_owned_dir(&standby.data_dir)?;
        setup::register_live(&standby.data_dir);
        let slot = standby.name.replace('-', "_");
        standby.upstream = Some(Upstream {
            socket_dir: primary.data_dir.clone(),
            port: primary.port,
            slot: slot.clone(),
        });

        #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
        let mut conninfo = format!("host={HOST} port={} user={ROLE}", primary.port);
        #[cfg(feature = "tls")]
        if let Some(tls) = &primary.tls {
            conninfo.push_str(&standby.replication_tls(tls)?);
        }
        {
            let _op = primary.lock_op();
            if !primary.is_running() {
                return Err(ClusterError::NotRunning {
                    port: primary.port,
                    action: "making a standby",
                });
            }
            let output = env
                .command_at(&basebackup)
                .arg("--pgdata")
                .arg(&standby.data_dir)
                .arg("--dbname")
                .arg(&conninfo)
                .args([
                    "--wal-method=stream",
                    "--write-recovery-conf",
                    "--create-slot",
                    "--slot",
                    &slot,
                    "--checkpoint=fast",
                    "--no-sync",
                    "--no-manifest",
                    "--no-password",
                ])
                .env("PGPASSWORD", primary.password())
                .env("PGCONNECT_TIMEOUT", PSQL_CONNECT_TIMEOUT_SECS)
                .output()
                .map_err(|e| io_err(format!("running {}", basebackup.display()), e))?;
            if !output.status.success() {
                return Err(ClusterError::BaseBackup {
                    primary_port: primary.port,
                    status: output.status.to_string(),
                    output: combined(&output),
                });
            }
        }
        // The primary's socket lock file came along (sockets themselves are skipped).
        for entry in fs::read_dir(&standby.data_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with(".s.PGSQL.") {
                let _ = fs::remove_file(entry.path());
            }
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = &primary.tls {
            standby.install_tls(tls.mode())?;
        }
        standby.start_on_free_port()?;
        standby.wait_for_streaming()?;
        Ok(standby)
    }
}

impl Cluster {
    /// A hot standby of this running cluster, streaming from it; see
    /// [`StandbyBuilder`] for how, and [`StandbyBuilder::start`]. Call it
    /// again for more standbys.
    pub fn standby(&self) -> Result<Cluster, ClusterError> {
        self.standby_builder().start()
    }

    /// Options for a standby of this cluster (extra settings).
    pub fn standby_builder(&self) -> StandbyBuilder<'_> {
        StandbyBuilder {
            primary: self,
            settings: Vec::new(),
        }
    }

    /// `SELECT pg_is_in_recovery()`: true for a standby that has not been promoted.
    pub fn is_in_recovery(&self) -> Result<bool, ClusterError> {
        Ok(self.psql("SELECT pg_is_in_recovery()")? == "t")
    }

    /// Waits until the server is in recovery and its walreceiver is
    /// streaming (`pg_stat_wal_receiver.status`), e.g. after a standby was
    /// restarted; errors after 30 s or if the server stops.
    pub fn wait_for_streaming(&self) -> Result<(), ClusterError> {
        const SQL: &str = "SELECT pg_is_in_recovery()::text || ' ' || \
                           coalesce((SELECT status FROM pg_stat_wal_receiver), 'no walreceiver')";
        let deadline = Instant::now() + STREAMING_TIMEOUT;
        loop {
            let last = match self.psql(SQL) {
                Ok(state) if state == "true streaming" => return Ok(()),
                Ok(state) if state.starts_with("false") => {
                    return Err(self.standby_err("the server is not in recovery".into()))
                }
                Ok(state) => state,
                Err(e) => e.to_string(),
            };
            if !self.is_running() {
                return Err(self.standby_err(format!("the server exited ({last})")));
            }
            if Instant::now() >= deadline {
                return Err(self.standby_err(format!(
                    "not streaming after {}s (last: {last})",
                    STREAMING_TIMEOUT.as_secs()
                )));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Promotes a standby to a primary (`pg_ctl promote -w`), returning once
    /// `pg_is_in_recovery()` is false. Errors (with the log tail) if the server
    /// is not a running standby or promotion takes more than 30 s.
    pub fn promote(&self) -> Result<(), ClusterError> {
        let _op = self.lock_op();
        let offset = log_len(&self.log_file);
        let err = |reason: String| ClusterError::Promote {
            port: self.port,
            reason,
            log_tail: self.log_tail(offset),
        };
        let output = self
            .env
            .command("pg_ctl")
            .arg("promote")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-w", "-t"])
            .arg(PG_CTL_TIMEOUT_SECS.to_string())
            .output()
            .map_err(|e| io_err("running pg_ctl promote".to_owned(), e))?;
        if !output.status.success() {
            return Err(err(combined(&output)));
        }
        let deadline = Instant::now() + PROMOTE_TIMEOUT;
        loop {
            let last = match self.is_in_recovery() {
                Ok(false) => return Ok(()),
                Ok(true) => "still in recovery".to_owned(),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(err(format!(
                    "pg_ctl promote returned, but after {}s: {last}",
                    PROMOTE_TIMEOUT.as_secs()
                )));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Runs `sql` with `psql` over the unix socket (trust) and returns its
    /// unaligned, tuples-only output, trimmed.
    pub(crate) fn psql(&self, sql: &str) -> Result<String, ClusterError> {
        let output = psql_command(self, &self.data_dir, self.port, sql)?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        } else {
            Err(ClusterError::Query {
                port: self.port,
                sql: sql.to_owned(),
                output: combined(&output),
            })
        }
    }

    /// A [`ClusterError::Standby`] quoting the end of the whole log (the
    /// standby's start is part of the story).
    fn standby_err(&self, reason: String) -> ClusterError {
        ClusterError::Standby {
            port: self.port,
            reason,
            log_tail: self.log_tail(0),
        }
    }

    /// Drops this standby's replication slot on its primary, waiting (up to
    /// 5 s) for the walsender to let go of it. Best effort: a primary that is
    /// gone or stopped keeps (or never had) the slot.
    pub(crate) fn drop_upstream_slot(&self) {
        let Some(up) = &self.upstream else {
            return;
        };
        let sql = format!(
            "DO $$ BEGIN FOR i IN 1..500 LOOP BEGIN \
               PERFORM pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = '{}'; \
               RETURN; \
             EXCEPTION WHEN object_in_use THEN PERFORM pg_sleep(0.01); END; \
             END LOOP; END $$",
            up.slot
        );
        if !up.socket_dir.exists() {
            return;
        }
        let _ = psql_command(self, &up.socket_dir, up.port, &sql);
    }

    /// Writes the client certificate a standby of a `ClientCert` primary
    /// replicates with into the standby's directory (owned by the server
    /// user, who runs the walreceiver) and returns the conninfo options for it.
    #[cfg(feature = "tls")]
    fn replication_tls(&self, primary: &crate::tls::ClusterTls) -> Result<String, ClusterError> {
        use crate::tls::TlsMode;
        Ok(match primary.mode() {
            TlsMode::Optional => String::new(),
            TlsMode::Only => " sslmode=require".to_owned(),
            TlsMode::ClientCert => {
                let (cert, key) = primary
                    .ca()
                    .client_cert(ROLE)?
                    .write(&self.dir, "replication")?;
                let root = self.dir.join("replication-ca.crt");
                primary.ca().write_cert(&root)?;
                for path in [&cert, &key, &root] {
                    self.env.chown(path)?;
                }
                format!(
                    " sslmode=verify-ca sslrootcert={} sslcert={} sslkey={}",
                    conninfo_value(&root),
                    conninfo_value(&cert),
                    conninfo_value(&key)
                )
            }
        })
    }
}

/// `psql -XAtq` on `socket_dir`:`port` as the server user, with connect and
/// statement timeouts. Only the output is returned; the caller judges it.
fn psql_command(
    cluster: &Cluster,
    socket_dir: &std::path::Path,
    port: u16,
    sql: &str,
) -> Result<std::process::Output, ClusterError> {
    let psql = cluster.env.tool("psql")?;
    cluster
        .env
        .command_at(&psql)
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(socket_dir)
        .arg("-p")
        .arg(port.to_string())
        .args(["-U", ROLE, "-d", DBNAME, "-c", sql])
        .env("PGCONNECT_TIMEOUT", PSQL_CONNECT_TIMEOUT_SECS)
        .env("PGOPTIONS", "-c statement_timeout=10s")
        .output()
        .map_err(|e| io_err(format!("running {}", psql.display()), e))
}

/// A path as a single-quoted conninfo value.
#[cfg(feature = "tls")]
fn conninfo_value(path: &std::path::Path) -> String {
    let s = path.display().to_string();
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}
