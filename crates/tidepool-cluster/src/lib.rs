//! Throwaway PostgreSQL clusters started from the installed server binaries.
//!
//! Used by the test suite (which stops, restarts and kills servers) and by
//! `tidepool serve` for its embedded default database. Real PostgreSQL only:
//!
//! ```no_run
//! let cluster = tidepool_cluster::Cluster::start()?;
//! println!("connect to {}", cluster.url());
//! // dropped: server stopped (immediate) and its data dir removed
//! # Ok::<(), tidepool_cluster::ClusterError>(())
//! ```
//!
//! How it works:
//! - The binaries come from `$TIDEPOOL_PG_BIN`, `$PATH`, `pg_config --bindir`
//!   or the highest `/usr/lib/postgresql/*/bin`.
//! - `initdb` runs once per process into a template under
//!   `BASE/tidepool-pg-<pid>-<random>/`; every cluster is a copy of it in its
//!   own `cluster-<n>/` subdirectory there. `BASE` is `$TMPDIR` if set, else
//!   `/dev/shm` if it has 1 GiB free (much faster), else `/tmp`. The directory
//!   is removed at process exit, and ones left by dead processes are removed
//!   on next use.
//! - Superuser role `tidepool` with a random per-process password; TCP on
//!   127.0.0.1 only with `scram-sha-256`, unix socket (trust) in the data dir.
//! - Not durable (`fsync`, `synchronous_commit`, `full_page_writes` off) and
//!   small (`shared_buffers = 32MB`).
//! - As root, initdb, pg_ctl and the server run as the `postgres` OS user,
//!   which owns the cluster's files.
//! - With the `tls` feature (off by default: it pulls in rcgen and ring),
//!   `ClusterBuilder::tls` starts a cluster with `ssl = on`, a fresh server
//!   certificate (SANs `localhost`, `127.0.0.1`) signed by a per-process CA,
//!   and a pg_hba.conf for the chosen `tls::TlsMode`: TLS optional, TLS only,
//!   or TLS plus a client certificate. `Cluster::tls` hands out the CA
//!   certificate and client certificates; `tls::Ca` makes other CAs (see the
//!   `tls` module). Without `.tls(..)`, clusters have TLS off.
//! - `Cluster::standby` makes a hot standby of a running cluster with
//!   `pg_basebackup -R -X stream` (its own port, name and log; any number per
//!   primary, each with its own replication slot), returning once it
//!   streams; `Cluster::promote` turns it into a primary (see
//!   [`StandbyBuilder`]). `pg_basebackup` and `psql` are taken from the
//!   server's installation.
//! - [`PgBouncer`] starts the installed PgBouncer in front of a cluster, with
//!   SCRAM for clients and to the server.
//!
//! Everything is blocking (`std::process`); calling it from inside a tokio
//! runtime works but blocks that worker thread while it runs. Linux only.

#![warn(missing_docs)]

mod pgbouncer;
mod setup;
mod standby;
mod sys;
#[cfg(feature = "tls")]
pub mod tls;

use std::fmt;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

pub use pgbouncer::{PgBouncer, PgBouncerBuilder, PoolMode};
use setup::{io_err, Env, DBNAME};
pub use standby::StandbyBuilder;

/// Address the server listens on.
const HOST: &str = "127.0.0.1";
/// Ports tried when the picked one is taken before the server binds it.
const PORT_ATTEMPTS: u32 = 5;
/// `pg_ctl -t` for start and stop.
const PG_CTL_TIMEOUT_SECS: u32 = 30;
/// How long to wait for the TCP port after `pg_ctl start -w` succeeded.
const TCP_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `kill` waits for the postmaster's children before SIGKILLing them.
const CHILD_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of server log quoted in errors.
const LOG_TAIL_LINES: usize = 30;

/// How [`Cluster::stop`] shuts the server down (`pg_ctl stop -m MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShutdownMode {
    /// Wait for every client to disconnect, then shut down cleanly.
    Smart,
    /// Terminate client sessions, then shut down cleanly (checkpoint).
    Fast,
    /// Quit at once without a checkpoint; the next start runs crash recovery.
    Immediate,
}

impl ShutdownMode {
    /// The `pg_ctl -m` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownMode::Smart => "smart",
            ShutdownMode::Fast => "fast",
            ShutdownMode::Immediate => "immediate",
        }
    }
}

impl fmt::Display for ShutdownMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a cluster could not be created, started, stopped or killed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// initdb, pg_ctl or postgres is missing.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install them \
         (Debian: apt-get install postgresql) or set TIDEPOOL_PG_BIN (searched: {searched})"
    )]
    BinariesNotFound {
        /// Where we looked.
        searched: String,
    },
    /// Running as root but the account to run the server as does not exist.
    #[error(
        "running as root, but there is no `{user}` OS user to run PostgreSQL as \
         (initdb and postgres refuse to run as root): create it \
         (Debian: apt-get install postgresql does) or run as an ordinary user"
    )]
    NoServerUser {
        /// The missing account.
        user: String,
    },
    /// Running as root and the server user cannot reach the temp directory.
    #[error(
        "the temp directory {dir} is not reachable by the `{user}` OS user the server runs \
         as: point TMPDIR at a world-searchable directory such as /tmp"
    )]
    TempDirNotAccessible {
        /// `std::env::temp_dir()`.
        dir: PathBuf,
        /// The server user.
        user: String,
    },
    /// A [`ClusterBuilder::setting`] cannot be written to postgresql.conf.
    #[error("invalid setting {name:?} = {value:?}: {reason}")]
    InvalidSetting {
        /// Parameter name.
        name: String,
        /// Parameter value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A file system or process-spawning operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// initdb exited with an error.
    #[error("initdb failed ({status}):\n{output}")]
    Initdb {
        /// Exit status.
        status: String,
        /// Its stdout and stderr.
        output: String,
    },
    /// Another process took the port (a new cluster tries a few ports first).
    #[error(
        "PostgreSQL could not listen on 127.0.0.1:{port}: address already in use\n\
         --- server log (tail) ---\n{log_tail}"
    )]
    PortInUse {
        /// The port.
        port: u16,
        /// End of the server log for this attempt.
        log_tail: String,
    },
    /// The server did not start or did not become ready.
    #[error(
        "PostgreSQL did not start on 127.0.0.1:{port}: {reason}\n\
         --- server log (tail) ---\n{log_tail}"
    )]
    Start {
        /// The port.
        port: u16,
        /// pg_ctl's output or what timed out.
        reason: String,
        /// End of the server log for this attempt.
        log_tail: String,
    },
    /// `pg_ctl stop` failed.
    #[error("pg_ctl stop -m {mode} failed: {output}")]
    Stop {
        /// Requested mode.
        mode: ShutdownMode,
        /// pg_ctl's output.
        output: String,
    },
    /// A client tool of the PostgreSQL installation (pg_basebackup, psql) is missing.
    #[error(
        "`{tool}` not found in {bin_dir} or on $PATH: install the PostgreSQL client tools \
         of the same version as the server (Debian: apt-get install postgresql-client)"
    )]
    ToolNotFound {
        /// The tool.
        tool: &'static str,
        /// The server binaries' directory, searched first.
        bin_dir: PathBuf,
    },
    /// The operation needs a running server.
    #[error("the cluster on 127.0.0.1:{port} is not running ({action} needs it running)")]
    NotRunning {
        /// The cluster's port.
        port: u16,
        /// What was attempted.
        action: &'static str,
    },
    /// `psql` could not run a query on a cluster (over its unix socket).
    #[error("query {sql:?} on the cluster at port {port} failed: {output}")]
    Query {
        /// The cluster's port.
        port: u16,
        /// The query.
        sql: String,
        /// psql's output.
        output: String,
    },
    /// `pg_basebackup` failed while making a standby.
    #[error(
        "pg_basebackup from the primary at 127.0.0.1:{primary_port} failed ({status}):\n{output}"
    )]
    BaseBackup {
        /// The primary's port.
        primary_port: u16,
        /// Exit status.
        status: String,
        /// Its stdout and stderr.
        output: String,
    },
    /// A standby started but did not reach "in recovery and streaming".
    #[error(
        "standby on 127.0.0.1:{port} did not start streaming from the primary: {reason}\n\
         --- standby log (tail) ---\n{log_tail}"
    )]
    Standby {
        /// The standby's port.
        port: u16,
        /// What timed out or failed.
        reason: String,
        /// End of the standby's server log.
        log_tail: String,
    },
    /// [`Cluster::promote`] failed or did not finish in time.
    #[error(
        "promoting the standby on 127.0.0.1:{port} failed: {reason}\n\
         --- server log (tail) ---\n{log_tail}"
    )]
    Promote {
        /// The standby's port.
        port: u16,
        /// pg_ctl's output or what timed out.
        reason: String,
        /// End of the server log since the promote request.
        log_tail: String,
    },
    /// The PgBouncer binary is missing.
    #[error(
        "PgBouncer not found: install it (Debian: apt-get install -y pgbouncer) \
         or set TIDEPOOL_PGBOUNCER to the binary (searched: {searched})"
    )]
    PgBouncerNotFound {
        /// Where we looked.
        searched: String,
    },
    /// PgBouncer did not start or did not accept connections.
    #[error(
        "PgBouncer did not start on 127.0.0.1:{port}: {reason}\n\
         --- pgbouncer log (tail) ---\n{log_tail}"
    )]
    PgBouncerStart {
        /// The port it was to listen on.
        port: u16,
        /// What failed or timed out.
        reason: String,
        /// End of its log for this attempt.
        log_tail: String,
    },
    /// A TLS key or certificate could not be made (feature `tls`).
    #[cfg(feature = "tls")]
    #[error("{context}: {source}")]
    Certificate {
        /// What was being made.
        context: String,
        /// The certificate library's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Some server processes survived [`Cluster::kill`].
    #[error("PostgreSQL processes {pids:?} (postmaster {postmaster}) survived SIGKILL")]
    Kill {
        /// The postmaster that was killed.
        postmaster: u32,
        /// Processes still alive.
        pids: Vec<u32>,
    },
}

/// Options for a new cluster; see [`Cluster::builder`].
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct ClusterBuilder {
    settings: Vec<(String, String)>,
    #[cfg(feature = "tls")]
    tls: Option<tls::TlsMode>,
}

impl ClusterBuilder {
    /// Sets `max_connections` (default 100).
    pub fn max_connections(self, n: u32) -> Self {
        self.setting("max_connections", &n.to_string())
    }

    /// Adds a postgresql.conf line `name = 'value'`, e.g.
    /// `("idle_session_timeout", "500ms")` or `("log_connections", "on")`.
    /// Later settings win over earlier ones and over the defaults.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Serves TLS with a fresh server certificate from [`tls::Ca::shared`] and
    /// the pg_hba.conf of `mode`; see [`Cluster::tls`] for the client side.
    /// Settings from [`setting`](ClusterBuilder::setting) (e.g.
    /// `ssl_min_protocol_version`) still apply on top.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, mode: tls::TlsMode) -> Self {
        self.tls = Some(mode);
        self
    }

    /// Creates the cluster from the template, picks a free port and starts the
    /// server, returning once it accepts TCP connections.
    pub fn start(self) -> Result<Cluster, ClusterError> {
        for (name, value) in &self.settings {
            validate_setting(name, value)?;
        }
        let mut cluster = Cluster::create(setup::env()?, self.settings)?;
        // From here on, dropping `cluster` on error cleans up.
        sys::copy_tree(
            &cluster.env.template,
            &cluster.data_dir,
            cluster.env.owner(),
        )
        .map_err(|e| {
            io_err(
                format!("copying the template to {}", cluster.data_dir.display()),
                e,
            )
        })?;
        setup::register_live(&cluster.data_dir);
        #[cfg(feature = "tls")]
        if let Some(mode) = self.tls {
            cluster.install_tls(mode)?;
        }
        cluster.start_on_free_port()?;
        Ok(cluster)
    }
}

/// One throwaway PostgreSQL cluster, running or stopped.
///
/// Control methods take `&self` and are serialised internally, so a cluster
/// can be shared through `Arc` or a `static OnceLock`. Dropping it stops the
/// server (immediate) and removes its files; a cluster that is never dropped
/// is stopped and removed when the process exits normally.
pub struct Cluster {
    env: Arc<Env>,
    /// `cluster_name`, also marks the server's processes.
    name: String,
    /// Holds `data/` and `server.log`.
    dir: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    port: u16,
    /// Builder settings, written to `tidepool.conf` at every start attempt
    /// (and inherited by standbys).
    settings: Vec<(String, String)>,
    /// For a standby: its replication slot on the primary, dropped with it.
    upstream: Option<standby::Upstream>,
    /// Serialises stop/start/kill/promote.
    op: Mutex<()>,
    #[cfg(feature = "tls")]
    tls: Option<tls::ClusterTls>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("port", &self.port)
            .field("data_dir", &self.data_dir)
            .field("pid", &self.pid())
            .finish()
    }
}

impl Cluster {
    /// Starts a cluster with the default settings.
    pub fn start() -> Result<Cluster, ClusterError> {
        ClusterBuilder::default().start()
    }

    /// Options for a cluster (max_connections, extra settings).
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// The address the server listens on: `"127.0.0.1"`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// The TCP port, fixed for the cluster's lifetime.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser role to connect as: `"tidepool"`.
    pub fn user(&self) -> &str {
        setup::ROLE
    }

    /// The password of [`Cluster::user`] (random, shared by this process's clusters).
    pub fn password(&self) -> &str {
        &self.env.password
    }

    /// The database to connect to: `"postgres"`.
    pub fn dbname(&self) -> &str {
        DBNAME
    }

    /// `postgresql://USER:PASSWORD@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!(
            "postgresql://{}:{}@{}:{}/{}",
            self.user(),
            self.password(),
            HOST,
            self.port,
            DBNAME
        )
    }

    /// The data directory (also holds the unix socket).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log (`pg_ctl -l`); every start appends to it.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// The directory the server binaries (initdb, pg_ctl, postgres) were found
    /// in, for running other tools of the same installation (it may hold
    /// symlinks to them, e.g. `/usr/local/bin`).
    pub fn bin_dir(&self) -> &Path {
        &self.env.bin
    }

    /// The TLS setup (CA certificate, client certificates) of a cluster
    /// started with [`ClusterBuilder::tls`]; `None` for a plaintext one.
    #[cfg(feature = "tls")]
    pub fn tls(&self) -> Option<&tls::ClusterTls> {
        self.tls.as_ref()
    }

    /// Stops the server with `pg_ctl stop -m MODE -w`. A no-op if it is not running.
    ///
    /// `Smart` waits for clients to disconnect (up to 30 s, then errors).
    pub fn stop(&self, mode: ShutdownMode) -> Result<(), ClusterError> {
        let _op = self.lock_op();
        self.stop_locked(mode)
    }

    /// Starts the stopped (or killed) server again on the same port and data
    /// dir, returning once it accepts connections. A no-op if it is running.
    pub fn start_again(&self) -> Result<(), ClusterError> {
        let _op = self.lock_op();
        self.start_again_locked()
    }

    /// [`stop`](Cluster::stop) with `mode`, then [`start_again`](Cluster::start_again).
    pub fn restart(&self, mode: ShutdownMode) -> Result<(), ClusterError> {
        let _op = self.lock_op();
        self.stop_locked(mode)?;
        self.start_again_locked()
    }

    /// Simulates a crash: SIGKILLs the postmaster and waits until it and its
    /// children are gone (children still alive after 10 s are SIGKILLed too).
    /// [`start_again`](Cluster::start_again) then runs crash recovery.
    /// A no-op if the server is not running.
    pub fn kill(&self) -> Result<(), ClusterError> {
        let _op = self.lock_op();
        self.kill_locked()
    }

    /// Whether the postmaster is alive.
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// The postmaster's pid, if it is alive.
    pub fn pid(&self) -> Option<u32> {
        let pid = setup::read_postmaster_pid(&self.data_dir)?;
        (sys::proc_state(pid) == sys::ProcState::Alive).then_some(pid as u32)
    }

    fn lock_op(&self) -> MutexGuard<'_, ()> {
        self.op.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new, not yet started cluster: its directory `cluster-<n>/` exists
    /// (owned by the server user), `data/` does not.
    fn create(env: Arc<Env>, settings: Vec<(String, String)>) -> Result<Cluster, ClusterError> {
        let (dir, name) = env.next_cluster();
        env.make_owned_dir(&dir)?;
        Ok(Cluster {
            log_file: dir.join("server.log"),
            data_dir: dir.join("data"),
            dir,
            name,
            port: 0,
            settings,
            upstream: None,
            op: Mutex::new(()),
            env,
            #[cfg(feature = "tls")]
            tls: None,
        })
    }

    /// Installs the server certificate and pg_hba.conf of `mode` into the data dir.
    #[cfg(feature = "tls")]
    fn install_tls(&mut self, mode: tls::TlsMode) -> Result<(), ClusterError> {
        self.tls = Some(tls::ClusterTls::install(
            mode,
            &self.env,
            &self.dir,
            &self.data_dir,
        )?);
        Ok(())
    }

    /// Picks a free port, writes `tidepool.conf` and starts the server,
    /// trying another port when the picked one was taken meanwhile.
    fn start_on_free_port(&mut self) -> Result<(), ClusterError> {
        let mut attempt = 1;
        loop {
            self.port = free_port()?;
            self.write_conf()?;
            match self.start_server() {
                Ok(()) => return Ok(()),
                Err(ClusterError::PortInUse { .. }) if attempt < PORT_ATTEMPTS => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// postgresql.conf lines turning TLS on: none unless started with `.tls(..)`.
    fn tls_settings(&self) -> &'static [(&'static str, &'static str)] {
        #[cfg(feature = "tls")]
        if self.tls.is_some() {
            return &tls::SERVER_SETTINGS;
        }
        &[]
    }

    /// Writes `tidepool.conf` (included last by postgresql.conf).
    fn write_conf(&self) -> Result<(), ClusterError> {
        let mut text = String::from("# written by tidepool-cluster\n");
        let lines = [
            ("port", self.port.to_string()),
            (
                "unix_socket_directories",
                self.data_dir.display().to_string(),
            ),
            ("cluster_name", self.name.clone()),
        ];
        for (name, value) in lines
            .iter()
            .map(|(n, v)| (*n, v.as_str()))
            .chain(self.tls_settings().iter().copied())
            .chain(self.settings.iter().map(|(n, v)| (n.as_str(), v.as_str())))
        {
            text.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        let path = self.data_dir.join("tidepool.conf");
        fs::write(&path, text).map_err(|e| io_err(format!("writing {}", path.display()), e))?;
        self.env.chown(&path)
    }

    fn stop_locked(&self, mode: ShutdownMode) -> Result<(), ClusterError> {
        if !self.is_running() {
            return Ok(());
        }
        let output = self
            .env
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", mode.as_str(), "-w", "-t"])
            .arg(PG_CTL_TIMEOUT_SECS.to_string())
            .output()
            .map_err(|e| io_err("running pg_ctl stop".to_owned(), e))?;
        if output.status.success() || !self.is_running() {
            Ok(())
        } else {
            Err(ClusterError::Stop {
                mode,
                output: setup::combined(&output),
            })
        }
    }

    fn start_again_locked(&self) -> Result<(), ClusterError> {
        if self.is_running() {
            return Ok(());
        }
        self.start_server()
    }

    /// `pg_ctl start -w`, then waits for the TCP port.
    fn start_server(&self) -> Result<(), ClusterError> {
        setup::clear_stale_lock_files(&self.data_dir);
        let log_offset = log_len(&self.log_file);
        let output = self
            .env
            .command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .args(["-w", "-t"])
            .arg(PG_CTL_TIMEOUT_SECS.to_string())
            .output()
            .map_err(|e| io_err("running pg_ctl start".to_owned(), e))?;
        let result = if output.status.success() {
            self.wait_for_tcp().map_err(|reason| ClusterError::Start {
                port: self.port,
                reason,
                log_tail: self.log_tail(log_offset),
            })
        } else {
            let log_tail = self.log_tail(log_offset);
            if log_tail.contains("Address already in use") {
                Err(ClusterError::PortInUse {
                    port: self.port,
                    log_tail,
                })
            } else {
                Err(ClusterError::Start {
                    port: self.port,
                    reason: setup::combined(&output),
                    log_tail,
                })
            }
        };
        if result.is_err() {
            // e.g. pg_ctl timed out while the server was still starting.
            self.stop_now();
        }
        result
    }

    /// Polls a TCP connect to the port until it succeeds or times out.
    fn wait_for_tcp(&self) -> Result<(), String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + TCP_READY_TIMEOUT;
        loop {
            let err = match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if !self.is_running() {
                return Err(format!("the server exited during startup ({err})"));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "pg_ctl reported it started, but {addr} did not accept connections within {}s: {err}",
                    TCP_READY_TIMEOUT.as_secs()
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill_locked(&self) -> Result<(), ClusterError> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        let pid = pid as i32;
        let marker = format!("postgres: {}: ", self.name);
        let mut pids = sys::find_processes(pid, &marker);
        sys::signal(pid, libc::SIGKILL)
            .map_err(|e| io_err(format!("SIGKILL postmaster {pid}"), e))?;
        sys::wait_dead(&[pid], CHILD_EXIT_TIMEOUT);
        // Children forked just before the kill were reparented: find them by title.
        for p in sys::find_processes(pid, &marker) {
            if !pids.contains(&p) {
                pids.push(p);
            }
        }
        pids.push(pid);
        let mut alive = sys::wait_dead(&pids, CHILD_EXIT_TIMEOUT);
        if !alive.is_empty() {
            for &p in &alive {
                let _ = sys::signal(p, libc::SIGKILL);
            }
            alive = sys::wait_dead(&alive, Duration::from_secs(5));
        }
        if alive.is_empty() {
            Ok(())
        } else {
            Err(ClusterError::Kill {
                postmaster: pid as u32,
                pids: alive.into_iter().map(|p| p as u32).collect(),
            })
        }
    }

    /// Immediate shutdown by signal (what `pg_ctl stop -m immediate` sends),
    /// falling back to kill. Best effort, never fails.
    fn stop_now(&self) {
        let Some(pid) = self.pid() else {
            return;
        };
        let _ = sys::signal(pid as i32, libc::SIGQUIT);
        if !sys::wait_dead(&[pid as i32], Duration::from_secs(10)).is_empty() {
            let _ = self.kill_locked();
        }
    }

    /// End of the server log written since byte `offset`.
    fn log_tail(&self, offset: u64) -> String {
        log_tail(&self.log_file, offset)
    }
}

/// The last [`LOG_TAIL_LINES`] lines of `path` written since byte `offset`.
pub(crate) fn log_tail(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(offset)).is_ok() && f.read_to_end(&mut buf).is_ok() {
            text = String::from_utf8_lossy(&buf).into_owned();
        }
    }
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    if tail.trim().is_empty() {
        format!("(nothing in {})", path.display())
    } else {
        tail
    }
}

/// The current length of `path` (0 if it does not exist): where a new log tail starts.
pub(crate) fn log_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.stop_now();
            self.drop_upstream_slot();
            self.env.reclaim_crashed(&self.data_dir);
            setup::unregister_live(&self.data_dir);
            let _ = fs::remove_dir_all(&self.dir);
        }));
    }
}

/// A port that was free a moment ago (bound to 127.0.0.1:0 and released).
fn free_port() -> Result<u16, ClusterError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| io_err("finding a free port on 127.0.0.1".to_owned(), e))
}

/// Rejects what cannot be written as a postgresql.conf line.
fn validate_setting(name: &str, value: &str) -> Result<(), ClusterError> {
    let reason = if name.is_empty() {
        Some("empty name")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    {
        Some("names are letters, digits, '_' and '.'")
    } else if value.contains(['\n', '\r', '\0']) {
        Some("values cannot contain line breaks or NUL")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ClusterError::InvalidSetting {
            name: name.to_owned(),
            value: value.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_validated() {
        assert!(validate_setting("log_connections", "on").is_ok());
        assert!(validate_setting("plpgsql.extra_warnings", "all").is_ok());
        assert!(validate_setting("search_path", "'a', b").is_ok());
        assert!(validate_setting("", "x").is_err());
        assert!(validate_setting("a = 1\nb", "x").is_err());
        assert!(validate_setting("a", "x\ny = 2").is_err());
    }

    #[test]
    fn cluster_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Cluster>();
        check::<ClusterError>();
    }
}
