//! PgBouncer in front of a running [`Cluster`]: builder, process, config.

use std::fmt;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::setup::{self, io_err, Env, DBNAME, ROLE};
use crate::{free_port, log_len, log_tail, sys, Cluster, ClusterError, HOST, PORT_ATTEMPTS};

/// Environment variable naming the PgBouncer binary.
pub(crate) const BIN_ENV: &str = "TIDEPOOL_PGBOUNCER";
/// Where Debian's package installs it (not on an ordinary user's `$PATH`).
const DEFAULT_PATH: &str = "/usr/sbin/pgbouncer";
/// How long PgBouncer may take to accept TCP connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`PgBouncer::stop`] waits after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// When PgBouncer hands a server connection back to the pool (`pool_mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum PoolMode {
    /// When the client disconnects.
    Session,
    /// At the end of each transaction (the default here and in most deployments).
    #[default]
    Transaction,
    /// After each statement; multi-statement transactions are refused.
    Statement,
}

impl PoolMode {
    /// The `pool_mode` value.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
            PoolMode::Statement => "statement",
        }
    }
}

impl fmt::Display for PoolMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Options for a PgBouncer; see [`PgBouncer::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct PgBouncerBuilder {
    pool_mode: PoolMode,
    default_pool_size: u32,
    max_client_conn: u32,
    settings: Vec<(String, String)>,
}

impl Default for PgBouncerBuilder {
    fn default() -> Self {
        PgBouncerBuilder {
            pool_mode: PoolMode::Transaction,
            default_pool_size: 2,
            max_client_conn: 100,
            settings: Vec::new(),
        }
    }
}

impl PgBouncerBuilder {
    /// `pool_mode` (default [`PoolMode::Transaction`]).
    pub fn pool_mode(mut self, mode: PoolMode) -> Self {
        self.pool_mode = mode;
        self
    }

    /// `default_pool_size`: server connections per database and user (default 2).
    pub fn default_pool_size(mut self, n: u32) -> Self {
        self.default_pool_size = n;
        self
    }

    /// `max_client_conn`: client connections accepted in all (default 100).
    pub fn max_client_conn(mut self, n: u32) -> Self {
        self.max_client_conn = n;
        self
    }

    /// Adds a `[pgbouncer]` line `name = value`, e.g.
    /// `("server_login_retry", "1")` or `("verbose", "1")`; later lines win
    /// over earlier ones and over the defaults.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Starts PgBouncer in front of `cluster` (which need not be running yet:
    /// PgBouncer connects on demand), returning once it accepts TCP connections.
    pub fn start(self, cluster: &Cluster) -> Result<PgBouncer, ClusterError> {
        for (name, value) in &self.settings {
            validate(name, value)?;
        }
        let program = find_binary()?;
        let env = cluster.env.clone();
        let dir = env.next_dir("pgbouncer");
        env.make_owned_dir(&dir)?;
        let mut bouncer = PgBouncer {
            env,
            config_file: dir.join("pgbouncer.ini"),
            log_file: dir.join("pgbouncer.log"),
            dir,
            port: 0,
            server_port: cluster.port(),
            pool_mode: self.pool_mode,
            child: Mutex::new(None),
        };
        // From here on, dropping `bouncer` on error cleans up.
        let userlist = format!("\"{ROLE}\" \"{}\"\n", quote(cluster.password()));
        bouncer
            .env
            .write_owned(&bouncer.dir.join("userlist.txt"), &userlist, 0o600)?;
        let mut attempt = 1;
        loop {
            bouncer.port = free_port()?;
            bouncer.write_config(&self, cluster.password())?;
            match bouncer.spawn(&program) {
                Ok(()) => return Ok(bouncer),
                Err(Spawn::PortInUse(_)) if attempt < PORT_ATTEMPTS => attempt += 1,
                Err(Spawn::PortInUse(e) | Spawn::Failed(e)) => return Err(e),
            }
        }
    }
}

/// One PgBouncer process in front of a [`Cluster`], running or stopped.
///
/// Starts the installed PgBouncer (`$TIDEPOOL_PGBOUNCER`, else `pgbouncer` on
/// `$PATH`, else `/usr/sbin/pgbouncer`; tested with Debian's 1.18) in the
/// foreground as a child process, as the `postgres` OS user when root (it
/// refuses to run as root), listening on a free port on 127.0.0.1 only (no
/// unix socket). Its directory `pgbouncer-<n>/` under the clusters' temp
/// directory holds `pgbouncer.ini`, `userlist.txt` (both 0600, owned by the
/// server user) and `pgbouncer.log` (its stdout and stderr).
///
/// Clients log in as [`Cluster::user`] with [`Cluster::password`] over SCRAM
/// (`auth_type = scram-sha-256`; `userlist.txt` holds the plain password,
/// which PgBouncer accepts for SCRAM). Any database name is forwarded
/// (`* = host=127.0.0.1 port=... user=... password=...`), and PgBouncer logs
/// in to the server as that user with SCRAM. The password is only in those
/// two files: not in PgBouncer's arguments, environment or log.
/// `ignore_startup_parameters = extra_float_digits, options`; `admin_users`
/// is the cluster's user, so the `pgbouncer` admin database (`SHOW POOLS`)
/// works. Everything else is PgBouncer's default unless set with
/// [`PgBouncerBuilder::setting`] (e.g. `server_login_retry`, 15 s by default).
///
/// ```no_run
/// use tidepool_cluster::{Cluster, PgBouncer, PoolMode};
///
/// let cluster = Cluster::start()?;
/// let bouncer = PgBouncer::builder()
///     .pool_mode(PoolMode::Transaction)
///     .default_pool_size(2)
///     .start(&cluster)?;
/// println!("connect to {}", bouncer.url());
/// // dropped: PgBouncer terminated and its directory removed
/// # Ok::<(), tidepool_cluster::ClusterError>(())
/// ```
///
/// Dropping it stops PgBouncer (SIGTERM, then SIGKILL after 5 s) and removes
/// its directory; one that is never dropped is terminated when the process
/// exits normally.
pub struct PgBouncer {
    env: Arc<Env>,
    /// Holds the config, userlist and log.
    dir: PathBuf,
    config_file: PathBuf,
    log_file: PathBuf,
    port: u16,
    server_port: u16,
    pool_mode: PoolMode,
    child: Mutex<Option<Child>>,
}

impl fmt::Debug for PgBouncer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgBouncer")
            .field("port", &self.port)
            .field("server_port", &self.server_port)
            .field("pool_mode", &self.pool_mode)
            .field("pid", &self.pid())
            .finish()
    }
}

/// Why one start attempt failed.
enum Spawn {
    /// The port was taken between picking and binding it: try another.
    PortInUse(ClusterError),
    Failed(ClusterError),
}

impl PgBouncer {
    /// Starts PgBouncer in front of `cluster` with the default options
    /// (transaction pooling, `default_pool_size = 2`).
    pub fn start(cluster: &Cluster) -> Result<PgBouncer, ClusterError> {
        PgBouncerBuilder::default().start(cluster)
    }

    /// Options (pool mode, pool size, extra settings).
    pub fn builder() -> PgBouncerBuilder {
        PgBouncerBuilder::default()
    }

    /// The address it listens on: `"127.0.0.1"`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// Its TCP port, fixed for its lifetime.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port of the cluster it forwards to.
    pub fn server_port(&self) -> u16 {
        self.server_port
    }

    /// The role to log in as: the cluster's, `"tidepool"`.
    pub fn user(&self) -> &str {
        ROLE
    }

    /// The password of [`PgBouncer::user`]: the cluster's.
    pub fn password(&self) -> &str {
        &self.env.password
    }

    /// The database to connect to: `"postgres"` (any name is forwarded).
    pub fn dbname(&self) -> &str {
        DBNAME
    }

    /// `postgresql://USER:PASSWORD@127.0.0.1:PORT/postgres`, as [`Cluster::url`].
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

    /// The pool mode it was started with.
    pub fn pool_mode(&self) -> PoolMode {
        self.pool_mode
    }

    /// `pgbouncer.ini`.
    pub fn config_file(&self) -> &Path {
        &self.config_file
    }

    /// Its log (stdout and stderr); every start attempt appends to it.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        let mut child = self.lock_child();
        match child.as_mut()?.try_wait() {
            Ok(None) => child.as_ref().map(Child::id),
            _ => None,
        }
    }

    /// Whether the process is alive.
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// Stops PgBouncer: SIGTERM (immediate shutdown, clients are
    /// disconnected), SIGKILL if it is still alive after 5 s. A no-op if it
    /// is not running.
    pub fn stop(&self) -> Result<(), ClusterError> {
        let Some(mut child) = self.lock_child().take() else {
            return Ok(());
        };
        let pid = child.id() as i32;
        let result = stop_child(&mut child);
        setup::unregister_child(pid);
        let _ = fs::remove_file(self.dir.join(setup::HELPER_PID_FILE));
        result.map_err(|e| io_err(format!("stopping PgBouncer (pid {pid})"), e))
    }

    fn lock_child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `pgbouncer.ini` for the current port.
    fn write_config(&self, options: &PgBouncerBuilder, password: &str) -> Result<(), ClusterError> {
        let userlist = self.dir.join("userlist.txt");
        let mut text = format!(
            "; written by tidepool-cluster\n\
             [databases]\n\
             * = host={HOST} port={} user={ROLE} password={}\n\
             \n\
             [pgbouncer]\n",
            self.server_port,
            conn_value(password),
        );
        let lines = [
            ("listen_addr", HOST.to_owned()),
            ("listen_port", self.port.to_string()),
            ("unix_socket_dir", String::new()),
            ("auth_type", "scram-sha-256".to_owned()),
            ("auth_file", userlist.display().to_string()),
            ("admin_users", ROLE.to_owned()),
            ("pool_mode", options.pool_mode.as_str().to_owned()),
            ("default_pool_size", options.default_pool_size.to_string()),
            ("max_client_conn", options.max_client_conn.to_string()),
            (
                "ignore_startup_parameters",
                "extra_float_digits, options".to_owned(),
            ),
        ];
        for (name, value) in lines.iter().map(|(n, v)| (*n, v.as_str())).chain(
            options
                .settings
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str())),
        ) {
            text.push_str(&format!("{name} = {value}\n"));
        }
        self.env.write_owned(&self.config_file, &text, 0o600)
    }

    /// Spawns PgBouncer and waits until it accepts TCP connections.
    fn spawn(&self, program: &Path) -> Result<(), Spawn> {
        let failed = |e| Spawn::Failed(e);
        let offset = log_len(&self.log_file);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .map_err(|e| failed(io_err(format!("opening {}", self.log_file.display()), e)))?;
        self.env.chown(&self.log_file).map_err(failed)?;
        let stderr = log
            .try_clone()
            .map_err(|e| failed(io_err("duplicating the log file".to_owned(), e)))?;
        let mut child = self
            .env
            .command_at(program)
            .arg(&self.config_file)
            .current_dir(&self.dir)
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .map_err(|e| failed(io_err(format!("running {}", program.display()), e)))?;
        let pid = child.id() as i32;
        setup::register_child(pid, &self.config_file.to_string_lossy());
        let _ = fs::write(self.dir.join(setup::HELPER_PID_FILE), format!("{pid}\n"));

        let err = |reason: String| ClusterError::PgBouncerStart {
            port: self.port,
            reason,
            log_tail: log_tail(&self.log_file, offset),
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + READY_TIMEOUT;
        let result = loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    let e = err(format!("it exited during startup ({status})"));
                    break Err(match &e {
                        ClusterError::PgBouncerStart { log_tail, .. }
                            if log_tail.contains("Address already in use") =>
                        {
                            Spawn::PortInUse(e)
                        }
                        _ => Spawn::Failed(e),
                    });
                }
                Ok(None) => {}
                Err(e) => break Err(failed(io_err(format!("waiting for pid {pid}"), e))),
            }
            let connect = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
            if connect.is_ok() {
                break Ok(());
            }
            if Instant::now() >= deadline {
                break Err(failed(err(format!(
                    "{addr} did not accept connections within {}s",
                    READY_TIMEOUT.as_secs()
                ))));
            }
            thread::sleep(Duration::from_millis(10));
        };
        if result.is_ok() {
            *self.lock_child() = Some(child);
        } else {
            let _ = stop_child(&mut child);
            setup::unregister_child(pid);
        }
        result
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = self.stop();
            let _ = fs::remove_dir_all(&self.dir);
        }));
    }
}

/// SIGTERM, wait up to [`STOP_TIMEOUT`], then SIGKILL; always reaps.
fn stop_child(child: &mut Child) -> std::io::Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    sys::signal(child.id() as i32, libc::SIGTERM)?;
    let deadline = Instant::now() + STOP_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    child.kill()?;
    child.wait().map(drop)
}

/// The PgBouncer binary: `$TIDEPOOL_PGBOUNCER`, `pgbouncer` on `$PATH`, `/usr/sbin/pgbouncer`.
pub(crate) fn find_binary() -> Result<PathBuf, ClusterError> {
    if let Some(path) = std::env::var_os(BIN_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if setup::is_executable(&path) {
            Ok(path)
        } else {
            Err(ClusterError::PgBouncerNotFound {
                searched: format!("{BIN_ENV}={}", path.display()),
            })
        };
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("pgbouncer"))
        .chain([PathBuf::from(DEFAULT_PATH)])
        .find(|p| setup::is_executable(p))
        .ok_or_else(|| ClusterError::PgBouncerNotFound {
            searched: format!("$PATH, {DEFAULT_PATH}"),
        })
}

/// Rejects what cannot be written as a pgbouncer.ini line.
fn validate(name: &str, value: &str) -> Result<(), ClusterError> {
    let reason = if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        Some("names are letters, digits and '_'")
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

/// A userlist.txt field body: `"` doubled.
fn quote(s: &str) -> String {
    s.replace('"', "\"\"")
}

/// A `[databases]` connection-string value, single-quoted (`'` doubled).
fn conn_value(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_names_the_package() {
        let err = ClusterError::PgBouncerNotFound {
            searched: "x".to_owned(),
        };
        assert!(
            err.to_string().contains("apt-get install -y pgbouncer"),
            "{err}"
        );
    }

    #[test]
    fn settings_are_validated() {
        assert!(validate("server_login_retry", "1").is_ok());
        assert!(validate("bad name", "1").is_err());
        assert!(validate("verbose", "1\nlisten_port = 1").is_err());
    }

    #[test]
    fn pool_modes_are_pgbouncer_words() {
        assert_eq!(PoolMode::default(), PoolMode::Transaction);
        assert_eq!(PoolMode::Session.to_string(), "session");
        assert_eq!(PoolMode::Statement.as_str(), "statement");
    }
}
