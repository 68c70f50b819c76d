//! Process-wide state: where the binaries are, which OS user runs the server,
//! the per-process temp directory and the initdb template every cluster is
//! copied from.

use std::fs;
use std::io;
use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::Duration;

use crate::sys::{self, ServerUser};
use crate::ClusterError;

/// Superuser role created by initdb.
pub(crate) const ROLE: &str = "tidepool";
/// Database every cluster has.
pub(crate) const DBNAME: &str = "postgres";
/// OS user the server runs as when we are root.
const SERVER_OS_USER: &str = "postgres";
/// Prefix of the per-process temp directory.
const ROOT_PREFIX: &str = "tidepool-pg-";
/// Environment variable naming the PostgreSQL bin directory.
pub(crate) const BIN_ENV: &str = "TIDEPOOL_PG_BIN";

/// Settings appended to the template's postgresql.conf: cheap, non-durable,
/// small, loopback only. Per-cluster settings (port, socket dir, builder
/// settings) go in `tidepool.conf`, included last so they win.
const TEMPLATE_CONF: &str = "
# --- tidepool-cluster: throwaway defaults ---
listen_addresses = '127.0.0.1'
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 32MB
max_connections = 100
logging_collector = off
log_min_messages = warning
include_if_exists 'tidepool.conf'
";

/// Process-wide state shared by every cluster of this process.
#[derive(Debug)]
pub(crate) struct Env {
    /// Directory holding initdb, pg_ctl and postgres.
    pub(crate) bin: PathBuf,
    /// Who runs the server: `Some` when we are root.
    pub(crate) user: Option<ServerUser>,
    /// `$TMP/tidepool-pg-<pid>-<random>`: template plus every cluster.
    pub(crate) root: PathBuf,
    /// initdb output, never started; clusters are copies of it.
    pub(crate) template: PathBuf,
    /// Password of [`ROLE`], baked into the template.
    pub(crate) password: String,
    next_id: AtomicU64,
}

static ENV: Mutex<Option<Arc<Env>>> = Mutex::new(None);

/// Data dirs of live clusters, stopped by the exit hook.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Per-process roots, removed by the exit hook.
static ROOTS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Other servers we spawned (PgBouncer): pid and a string its command line
/// contains, terminated by the exit hook.
static CHILDREN: Mutex<Vec<(i32, String)>> = Mutex::new(Vec::new());

/// Name of the file (in a helper's directory) holding the pid of a helper
/// process such as PgBouncer, for cleaning up after a killed test run.
pub(crate) const HELPER_PID_FILE: &str = "helper.pid";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The process-wide environment, running initdb on first use.
///
/// A failure is not cached: the next call tries again.
pub(crate) fn env() -> Result<Arc<Env>, ClusterError> {
    let mut slot = lock(&ENV);
    if let Some(env) = slot.as_ref() {
        return Ok(env.clone());
    }
    let env = Arc::new(Env::init()?);
    *slot = Some(env.clone());
    Ok(env)
}

impl Env {
    fn init() -> Result<Env, ClusterError> {
        let bin = find_bin_dir(std::env::var_os(BIN_ENV).map(PathBuf::from))?;
        let user = if sys::is_root() {
            Some(
                sys::lookup_user(SERVER_OS_USER).ok_or_else(|| ClusterError::NoServerUser {
                    user: SERVER_OS_USER.to_owned(),
                })?,
            )
        } else {
            None
        };
        let base = base_dir();
        if user.is_some() {
            check_traversable(&base)?;
        }

        let root = base.join(format!(
            "{ROOT_PREFIX}{}-{}",
            std::process::id(),
            sys::random_hex(6)
        ));
        fs::create_dir(&root).map_err(|e| io_err(format!("creating {}", root.display()), e))?;
        lock(&ROOTS).push(root.clone());
        register_exit_hook();

        let env = Env {
            bin,
            user,
            template: root.join("template"),
            root,
            password: sys::random_hex(16),
            next_id: AtomicU64::new(1),
        };
        env.remove_stale_roots(&base);
        if base != std::env::temp_dir() {
            env.remove_stale_roots(&std::env::temp_dir());
        }
        match env.make_template() {
            Ok(()) => Ok(env),
            Err(e) => {
                let _ = fs::remove_dir_all(&env.root);
                lock(&ROOTS).retain(|r| r != &env.root);
                Err(e)
            }
        }
    }

    /// Runs initdb into `template` and appends the throwaway defaults.
    fn make_template(&self) -> Result<(), ClusterError> {
        // The server user only needs to traverse the root.
        set_mode(&self.root, 0o755)?;
        self.make_owned_dir(&self.template)?;

        let pwfile = self.root.join("pwfile");
        fs::write(&pwfile, format!("{}\n", self.password))
            .map_err(|e| io_err(format!("writing {}", pwfile.display()), e))?;
        set_mode(&pwfile, 0o600)?;
        self.chown(&pwfile)?;

        let output = self
            .command("initdb")
            .arg("-D")
            .arg(&self.template)
            .arg("-U")
            .arg(ROLE)
            .arg(format!("--pwfile={}", pwfile.display()))
            .args([
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                // 1 MB WAL segments: each cluster copy is ~15 MB smaller.
                "--wal-segsize=1",
            ])
            .output();
        let _ = fs::remove_file(&pwfile);
        let output = output
            .map_err(|e| io_err(format!("running {}", self.bin.join("initdb").display()), e))?;
        if !output.status.success() {
            return Err(ClusterError::Initdb {
                status: output.status.to_string(),
                output: combined(&output),
            });
        }

        let conf = self.template.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf)
            .map_err(|e| io_err(format!("reading {}", conf.display()), e))?;
        text.push_str(TEMPLATE_CONF);
        fs::write(&conf, text).map_err(|e| io_err(format!("writing {}", conf.display()), e))?;
        Ok(())
    }

    /// A fresh cluster directory name and its `cluster_name`.
    pub(crate) fn next_cluster(&self) -> (PathBuf, String) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        (
            self.root.join(format!("cluster-{id}")),
            format!("tidepool-{}-{id}", std::process::id()),
        )
    }

    /// A fresh directory name `ROOT/<prefix>-<n>` (not created).
    pub(crate) fn next_dir(&self, prefix: &str) -> PathBuf {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.root.join(format!("{prefix}-{id}"))
    }

    /// A client tool of the installation (`pg_basebackup`, `psql`): next to
    /// the real `initdb` (the bin dir may hold symlinks, e.g. `/usr/local/bin`),
    /// else in the bin dir, else on `$PATH`.
    pub(crate) fn tool(&self, tool: &'static str) -> Result<PathBuf, ClusterError> {
        let real_bin = fs::canonicalize(self.bin.join("initdb"))
            .ok()
            .and_then(|p| p.parent().map(Path::to_owned));
        real_bin
            .into_iter()
            .chain([self.bin.clone()])
            .chain(
                std::env::var_os("PATH")
                    .into_iter()
                    .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>()),
            )
            .map(|d| d.join(tool))
            .find(|p| is_executable(p))
            .ok_or_else(|| ClusterError::ToolNotFound {
                tool,
                bin_dir: self.bin.clone(),
            })
    }

    /// `(uid, gid)` of the server user, when it differs from us.
    pub(crate) fn owner(&self) -> Option<(u32, u32)> {
        self.user.as_ref().map(|u| (u.uid, u.gid))
    }

    /// Chowns `path` to the server user (no-op when not root).
    pub(crate) fn chown(&self, path: &Path) -> Result<(), ClusterError> {
        if let Some((uid, gid)) = self.owner() {
            chown(path, Some(uid), Some(gid))
                .map_err(|e| io_err(format!("chown {}", path.display()), e))?;
        }
        Ok(())
    }

    /// Writes `text` to a new or truncated file `path` with permission bits
    /// `mode`, owned by the server user.
    pub(crate) fn write_owned(
        &self,
        path: &Path,
        text: &str,
        mode: u32,
    ) -> Result<(), ClusterError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let err = |e| io_err(format!("writing {}", path.display()), e);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .map_err(err)?;
        // `mode` applies only when the file is created (and through the umask).
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(err)?;
        file.write_all(text.as_bytes()).map_err(err)?;
        self.chown(path)
    }

    /// Creates a 0700 directory owned by the server user.
    pub(crate) fn make_owned_dir(&self, path: &Path) -> Result<(), ClusterError> {
        fs::create_dir(path).map_err(|e| io_err(format!("creating {}", path.display()), e))?;
        set_mode(path, 0o700)?;
        self.chown(path)
    }

    /// Reclaims the shared memory of a crashed server (SIGKILLed postmaster
    /// whose data dir is about to be deleted): a System V segment and
    /// `/dev/shm/PostgreSQL.*` files that only a later start on the same data
    /// dir would free. Runs a single-user backend, which recovers, frees them
    /// and exits (no port needed). Best effort, bounded to a few seconds.
    pub(crate) fn reclaim_crashed(&self, data_dir: &Path) {
        if !clear_stale_lock_files(data_dir) {
            return;
        }
        // A single-user backend refuses standby mode; the data dir is about to
        // be removed, so it may as well end recovery instead.
        for signal in ["standby.signal", "recovery.signal"] {
            let _ = fs::remove_file(data_dir.join(signal));
        }
        let child = self
            .command("postgres")
            .arg("--single")
            .arg("-D")
            .arg(data_dir)
            .arg(DBNAME)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = child else {
            return;
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut pause = Duration::from_millis(1);
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if std::time::Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                Ok(None) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
            }
        }
    }

    /// Removes `tidepool-pg-<pid>-*` dirs in `base` left by processes that no
    /// longer exist, first stopping servers (or reclaiming the shared memory
    /// of crashed ones) that a killed test run left behind in them.
    fn remove_stale_roots(&self, base: &Path) {
        let Ok(entries) = fs::read_dir(base) else {
            return;
        };
        // SAFETY: no preconditions.
        let me = unsafe { libc::geteuid() };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(ROOT_PREFIX)
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let owned = fs::symlink_metadata(&path)
                .map(|m| m.is_dir() && m.uid() == me)
                .unwrap_or(false);
            if !owned
                || pid as u32 == std::process::id()
                || sys::proc_state(pid) == sys::ProcState::Alive
            {
                continue;
            }
            for cluster in fs::read_dir(&path).into_iter().flatten().flatten() {
                stop_leftover_helper(&cluster.path());
                let data_dir = cluster.path().join("data");
                stop_leftover(&data_dir);
                self.reclaim_crashed(&data_dir);
            }
            let _ = fs::remove_dir_all(&path);
        }
    }

    /// A command for one of the server binaries, run as the server user, with
    /// no inherited `PG*` variables, stdin closed and a readable cwd.
    pub(crate) fn command(&self, program: &str) -> Command {
        self.command_at(&self.bin.join(program))
    }

    /// [`command`](Env::command) for a program given by path.
    pub(crate) fn command_at(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        cmd.env("LC_ALL", "C")
            .stdin(Stdio::null())
            .current_dir(&self.root);
        if let Some(u) = &self.user {
            cmd.uid(u.uid)
                .gid(u.gid)
                .env("HOME", &u.home)
                .env("USER", &u.name)
                .env("LOGNAME", &u.name);
        }
        cmd
    }
}

/// Registers a cluster's data dir so the exit hook stops it if it is leaked.
pub(crate) fn register_live(data_dir: &Path) {
    lock(&LIVE).push(data_dir.to_owned());
}

/// Forgets a cluster dropped normally.
pub(crate) fn unregister_live(data_dir: &Path) {
    lock(&LIVE).retain(|d| d != data_dir);
}

/// Registers a helper process (PgBouncer) for the exit hook to terminate if
/// it is leaked; `marker` is a string in its command line (its config path).
pub(crate) fn register_child(pid: i32, marker: &str) {
    lock(&CHILDREN).push((pid, marker.to_owned()));
}

/// Forgets a helper process that was stopped normally.
pub(crate) fn unregister_child(pid: i32) {
    lock(&CHILDREN).retain(|(p, _)| *p != pid);
}

/// Terminates the helper process whose pid is in `dir/helper.pid`, if it is
/// still alive and its command line mentions `dir`.
fn stop_leftover_helper(dir: &Path) {
    let pid = fs::read_to_string(dir.join(HELPER_PID_FILE))
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok());
    if let Some(pid) = pid {
        terminate(pid, &dir.to_string_lossy());
    }
}

/// SIGTERM, then SIGKILL after 5 s, to `pid` if it is alive and its command
/// line contains `marker` (guards against a reused pid).
pub(crate) fn terminate(pid: i32, marker: &str) {
    if sys::proc_state(pid) != sys::ProcState::Alive || !sys::cmdline(pid).contains(marker) {
        return;
    }
    let _ = sys::signal(pid, libc::SIGTERM);
    if !sys::wait_dead(&[pid], Duration::from_secs(5)).is_empty() {
        let _ = sys::signal(pid, libc::SIGKILL);
        sys::wait_dead(&[pid], Duration::from_secs(2));
    }
}

pub(crate) fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Finds the directory holding initdb, pg_ctl and postgres.
///
/// Order: `explicit` (from `$TIDEPOOL_PG_BIN`), `$PATH`, `pg_config --bindir`,
/// then the highest `/usr/lib/postgresql/*/bin`.
pub(crate) fn find_bin_dir(explicit: Option<PathBuf>) -> Result<PathBuf, ClusterError> {
    let mut searched = Vec::new();
    if let Some(dir) = explicit.filter(|d| !d.as_os_str().is_empty()) {
        if has_server_binaries(&dir) {
            return Ok(dir);
        }
        return Err(ClusterError::BinariesNotFound {
            searched: format!("{BIN_ENV}={}", dir.display()),
        });
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_server_binaries(&dir) {
                return Ok(dir);
            }
        }
        searched.push("$PATH".to_owned());
    }
    if let Ok(out) = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_server_binaries(&dir) {
                return Ok(dir);
            }
            searched.push(dir.display().to_string());
        }
    }
    let base = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(Vec<u64>, PathBuf)> = fs::read_dir(base)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version: Option<Vec<u64>> = name.split('.').map(|p| p.parse().ok()).collect();
            Some((version?, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions
        .into_iter()
        .rev()
        .find(|(_, d)| has_server_binaries(d))
    {
        return Ok(dir);
    }
    searched.push("/usr/lib/postgresql/*/bin".to_owned());
    Err(ClusterError::BinariesNotFound {
        searched: searched.join(", "),
    })
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|b| is_executable(&dir.join(b)))
}

/// Where the per-process directory goes: `$TMPDIR` when set; otherwise
/// `/dev/shm` when it is a world-writable file system with at least 1 GiB
/// free (copying the ~1000-file template there is about ten times faster
/// than to a busy disk); otherwise `std::env::temp_dir()`.
pub(crate) fn base_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if std::env::var_os("TMPDIR").is_none() && free_bytes(shm) >= (1 << 30) {
        let writable = fs::metadata(shm)
            .map(|m| m.is_dir() && m.permissions().mode() & 0o1777 == 0o1777)
            .unwrap_or(false);
        if writable {
            return shm.to_owned();
        }
    }
    std::env::temp_dir()
}

/// Bytes available to unprivileged users on the file system holding `path` (0 if unknown).
fn free_bytes(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(cpath) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs is plain old data filled by the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(cpath.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    (st.f_bavail as u64).saturating_mul(st.f_frsize as u64)
}

/// When root, the server user must be able to reach the temp dir.
fn check_traversable(dir: &Path) -> Result<(), ClusterError> {
    for ancestor in dir.ancestors() {
        if let Ok(meta) = fs::metadata(ancestor) {
            if meta.permissions().mode() & 0o001 == 0 {
                return Err(ClusterError::TempDirNotAccessible {
                    dir: dir.to_owned(),
                    user: SERVER_OS_USER.to_owned(),
                });
            }
        }
    }
    Ok(())
}

/// Stops (SIGQUIT = immediate shutdown) a postmaster still running in
/// `data_dir`, if its command line confirms it is that server.
pub(crate) fn stop_leftover(data_dir: &Path) {
    let Some(pid) = read_postmaster_pid(data_dir) else {
        return;
    };
    if sys::proc_state(pid) != sys::ProcState::Alive {
        return;
    }
    if !sys::cmdline(pid).contains(&*data_dir.to_string_lossy()) {
        return;
    }
    let _ = sys::signal(pid, libc::SIGQUIT);
    if !sys::wait_dead(&[pid], Duration::from_secs(5)).is_empty() {
        let _ = sys::signal(pid, libc::SIGKILL);
        sys::wait_dead(&[pid], Duration::from_secs(2));
    }
}

/// The postmaster pid from `postmaster.pid` (first line), if the file exists.
pub(crate) fn read_postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines()
        .next()?
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|&p| p > 1)
}

/// Removes the lock files of a postmaster that is dead but may still be a
/// zombie (orphaned postmasters are reaped by init, sometimes seconds later),
/// which PostgreSQL would take for a live server. Its shared memory is left
/// alone: the next server on this data dir finds it (by the data dir's inode)
/// and reclaims it, DSM segments included. Returns whether a crashed
/// server's lock file was found.
pub(crate) fn clear_stale_lock_files(data_dir: &Path) -> bool {
    let Some(pid) = read_postmaster_pid(data_dir) else {
        return false;
    };
    if sys::proc_state(pid) == sys::ProcState::Alive {
        return false;
    }
    let _ = fs::remove_file(data_dir.join("postmaster.pid"));
    for entry in fs::read_dir(data_dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".s.PGSQL.") && name.ends_with(".lock") {
            let _ = fs::remove_file(entry.path());
        }
    }
    true
}

fn register_exit_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: registering a plain extern "C" fn that never unwinds.
        unsafe {
            libc::atexit(exit_hook);
        }
    });
}

/// At normal process exit: stop clusters that were never dropped (e.g. held in
/// a `static`) and remove the per-process directory with the template.
extern "C" fn exit_hook() {
    let _ = std::panic::catch_unwind(|| {
        let live = match LIVE.try_lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(_) => Vec::new(),
        };
        let env = ENV.try_lock().ok().and_then(|g| g.clone());
        let children = match CHILDREN.try_lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(_) => Vec::new(),
        };
        for (pid, marker) in &children {
            terminate(*pid, marker);
        }
        for data_dir in &live {
            stop_leftover(data_dir);
            if let Some(env) = &env {
                env.reclaim_crashed(data_dir);
            }
        }
        let roots = match ROOTS.try_lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(_) => Vec::new(),
        };
        for root in roots {
            let _ = fs::remove_dir_all(root);
        }
    });
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ClusterError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| io_err(format!("chmod {mode:o} {}", path.display()), e))
}

pub(crate) fn io_err(context: String, source: io::Error) -> ClusterError {
    ClusterError::Io { context, source }
}

/// stdout and stderr of a finished command, trimmed.
pub(crate) fn combined(output: &std::process::Output) -> String {
    let mut s = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let err = String::from_utf8_lossy(&output.stderr);
    if !err.trim().is_empty() {
        if !s.is_empty() {
            s.push('\n');
        }
        s.push_str(err.trim());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_bin_dir_without_binaries_is_a_clear_error() {
        let err = find_bin_dir(Some(PathBuf::from("/nonexistent/pg/bin"))).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ClusterError::BinariesNotFound { .. }));
        assert!(msg.contains("apt-get install postgresql"), "{msg}");
        assert!(msg.contains("TIDEPOOL_PG_BIN"), "{msg}");
        assert!(msg.contains("/nonexistent/pg/bin"), "{msg}");
    }

    #[test]
    fn finds_installed_binaries() {
        // This machine has PostgreSQL installed (the integration tests need it).
        let dir = find_bin_dir(None).expect("PostgreSQL binaries");
        assert!(dir.join("initdb").exists());
    }

    #[test]
    fn reads_postmaster_pid_file() {
        let dir =
            std::env::temp_dir().join(format!("tidepool-cluster-unit-{}", std::process::id()));
        let _ = fs::create_dir(&dir);
        fs::write(
            dir.join("postmaster.pid"),
            "4242\n/d\n1700000000\n5432\n/d\n127.0.0.1\n  5432001     32769\nready   \n",
        )
        .unwrap();
        let pid = read_postmaster_pid(&dir);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(pid, Some(4242));
    }
}
