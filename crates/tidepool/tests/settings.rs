//! Settings through the public API: `from_lookup` round trips, and `.env` files read by
//! `from_env_in` / `from_env`. Tests that need a process environment of their own run this test
//! binary again as a child process, so no test changes the environment or the current directory
//! of the threads running beside it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tidepool::settings::VARIABLES;
use tidepool::{DatabaseUrl, ResetOnReturn, Settings, SettingsError};

fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| map.get(name).cloned()
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tidepool-settings-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn with_dotenv(text: &str) -> TempDir {
        let dir = TempDir::new();
        std::fs::write(dir.0.join(".env"), text).unwrap();
        dir
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether the process environment sets none of tidepool's variables (in any case), so a test
/// can expect the `.env` file's values. CI and developer shells normally satisfy this.
fn environment_is_clean() -> bool {
    let set: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| VARIABLES.iter().any(|v| v.eq_ignore_ascii_case(k)))
        .collect();
    if !set.is_empty() {
        eprintln!("skipping: the environment sets {set:?}");
    }
    set.is_empty()
}

/// Runs the ignored test `name` of this binary in a child process with `env` added and the
/// current directory `dir`, and checks it passed.
fn run_child(name: &str, dir: &Path, env: &[(&str, &str)]) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .current_dir(dir)
        .env("TIDEPOOL_SETTINGS_CHILD", "1");
    for key in VARIABLES {
        command.env_remove(key);
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child {name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn is_child() -> bool {
    std::env::var_os("TIDEPOOL_SETTINGS_CHILD").is_some()
}

#[test]
fn every_variable_round_trips() {
    let s = Settings::from_lookup(lookup(&[
        (
            "DATABASE_URL",
            "postgresql+asyncpg://app:s3cr%40t@db.internal:6432/orders?ssl=require",
        ),
        ("DB_POOL_SIZE", "8"),
        ("DB_MAX_OVERFLOW", "-1"),
        ("DB_POOL_PRE_PING", "off"),
        ("DB_POOL_RECYCLE", "600.5"),
        ("DB_ECHO", "YES"),
        ("DB_ECHO_POOL", "1"),
        ("DB_SLOW_QUERY_THRESHOLD", "0.25"),
        ("DB_SLOW_QUERY_EXPLAIN", "true"),
        ("DB_POOL_TIMEOUT", "2.5"),
        ("DB_CONNECT_TIMEOUT", "3"),
        ("DB_POOL_USE_LIFO", "on"),
        ("DB_POOL_RESET_ON_RETURN", "discard"),
        ("DB_APPLICATION_NAME", "orders-api"),
        ("DB_STATEMENT_CACHE", "false"),
        ("DB_INSTANCES", "4"),
    ]))
    .unwrap();
    let url = s.database_url.as_ref().unwrap();
    assert_eq!(url.config().get_user(), Some("app"));
    assert_eq!(url.config().get_password(), Some(&b"s3cr@t"[..]));
    assert_eq!(url.config().get_dbname(), Some("orders"));
    assert_eq!(url.config().get_ports(), &[6432]);
    assert_eq!(
        url.redacted(),
        "postgresql+asyncpg://app:***@db.internal:6432/orders?ssl=require"
    );
    assert_eq!(s.pool_size, 8);
    assert_eq!(s.max_overflow, None);
    assert_eq!(s.capacity(), None);
    assert!(!s.pre_ping);
    assert_eq!(s.recycle, Some(Duration::from_millis(600_500)));
    assert!(s.echo);
    assert!(s.echo_pool);
    assert_eq!(s.slow_query_threshold, Duration::from_millis(250));
    assert!(s.slow_query_explain);
    assert_eq!(s.pool_timeout, Duration::from_millis(2500));
    assert_eq!(s.connect_timeout, Duration::from_secs(3));
    assert!(s.use_lifo);
    assert_eq!(s.reset_on_return, ResetOnReturn::Discard);
    assert_eq!(s.application_name.as_deref(), Some("orders-api"));
    assert!(!s.statement_cache);
    assert_eq!(s.instances, Some(4));

    let debug = format!("{s:?}");
    assert!(!debug.contains("s3cr"), "{debug}");
    assert!(debug.contains("app:***@db.internal"), "{debug}");
}

#[test]
fn unset_lookup_gives_defaults() {
    let s = Settings::from_lookup(|_| None).unwrap();
    let d = Settings::default();
    assert_eq!(format!("{s:?}"), format!("{d:?}"));
    assert_eq!(s.capacity(), Some(15));
}

#[test]
fn struct_update_syntax() {
    let s = Settings {
        pool_size: 10,
        max_overflow: Some(0),
        database_url: Some(DatabaseUrl::parse("postgres://u@localhost/db").unwrap()),
        ..Settings::default()
    };
    assert_eq!(s.capacity(), Some(10));
}

#[test]
fn first_bad_variable_is_reported() {
    let err = Settings::from_lookup(lookup(&[("DB_POOL_SIZE", "abc"), ("DB_ECHO", "maybe")]))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "DB_POOL_SIZE=\"abc\" is not valid: expected a whole number of at least 1"
    );
    let err = Settings::from_lookup(lookup(&[("DB_ECHO", "maybe")])).unwrap_err();
    assert_eq!(
        err,
        SettingsError::Invalid {
            variable: "DB_ECHO".into(),
            value: "maybe".into(),
            expected: "true or false (also 1/0, yes/no, on/off)".into(),
        }
    );
}

#[test]
fn seed_dotenv_file() {
    if !environment_is_clean() {
        return;
    }
    let dir = TempDir::with_dotenv(
        "# Database Connection\n\
         DATABASE_URL=postgresql+asyncpg://user:password@localhost:5432/youworker\n\
         \n\
         # Connection Pool Settings\n\
         DB_POOL_SIZE=5              # Number of connections to maintain\n\
         DB_MAX_OVERFLOW=10          # Additional connections allowed beyond pool_size\n\
         DB_POOL_PRE_PING=true       # Test connections before using\n\
         DB_POOL_RECYCLE=3600        # Recycle connections after N seconds\n\
         DB_ECHO=false               # Log all SQL statements (dev only)\n\
         DB_ECHO_POOL=false          # Log pool checkouts/checkins (debug)\n\
         \n\
         # Query Performance Monitoring\n\
         DB_SLOW_QUERY_THRESHOLD=1.0  # Log queries slower than N seconds\n",
    );
    let s = Settings::from_env_in(&dir.0).unwrap();
    let url = s.database_url.as_ref().unwrap();
    assert_eq!(url.config().get_user(), Some("user"));
    assert_eq!(url.config().get_password(), Some(&b"password"[..]));
    assert_eq!(url.config().get_dbname(), Some("youworker"));
    assert_eq!(s.pool_size, 5);
    assert_eq!(s.max_overflow, Some(10));
    assert!(s.pre_ping);
    assert_eq!(s.recycle, Some(Duration::from_secs(3600)));
    assert!(!s.echo && !s.echo_pool);
    assert_eq!(s.slow_query_threshold, Duration::from_secs(1));
}

#[test]
fn dotenv_quoting_and_expansion() {
    if !environment_is_clean() {
        return;
    }
    let dir = TempDir::with_dotenv(
        "export DB_USER=app\n\
         DB_PASS='pa$$ #word'\n\
         DATABASE_URL=\"postgresql://${DB_USER}@db/orders?application_name=${APP:-fallback}\"\n\
         db_pool_size=9\n\
         DB_POOL_RECYCLE=-1\n",
    );
    let s = Settings::from_env_in(&dir.0).unwrap();
    let url = s.database_url.as_ref().unwrap();
    assert_eq!(url.config().get_user(), Some("app"));
    assert_eq!(s.application_name.as_deref(), Some("fallback"));
    assert_eq!(s.pool_size, 9, "names match in any case, as with pydantic");
    assert_eq!(s.recycle, None);
}

#[test]
fn missing_dotenv_is_fine() {
    if !environment_is_clean() {
        return;
    }
    let dir = TempDir::new();
    let s = Settings::from_env_in(&dir.0).unwrap();
    assert_eq!(s.pool_size, 5);
    assert!(s.database_url.is_none());
}

#[test]
fn malformed_dotenv_names_file_and_line() {
    let dir = TempDir::with_dotenv(
        "DB_POOL_SIZE=5\n\
         \n\
         DATABASE_URL=\"postgresql://u:hunter2@h/db\n",
    );
    let err = Settings::from_env_in(&dir.0).unwrap_err();
    let SettingsError::DotEnv { path, reason } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(Path::new(path), dir.0.join(".env"));
    assert!(reason.starts_with("line 3: "), "{reason}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains(".env: line 3"), "{shown}");
}

#[test]
fn bad_value_in_dotenv_is_an_error() {
    if !environment_is_clean() {
        return;
    }
    let dir = TempDir::with_dotenv("DB_POOL_RECYCLE=0\n");
    let err = Settings::from_env_in(&dir.0).unwrap_err();
    assert!(err
        .to_string()
        .starts_with("DB_POOL_RECYCLE=\"0\" is not valid"));
    assert!(err.to_string().contains("-1"));
}

#[test]
fn unreadable_dotenv_is_an_error() {
    let dir = TempDir::new();
    std::fs::create_dir(dir.0.join(".env")).unwrap();
    let err = Settings::from_env_in(&dir.0).unwrap_err();
    assert!(
        matches!(&err, SettingsError::DotEnv { reason, .. } if reason.starts_with("cannot be read")),
        "{err:?}"
    );
}

#[test]
fn process_environment_wins_over_dotenv() {
    let dir = TempDir::with_dotenv(
        "DB_POOL_SIZE=3\n\
         DB_MAX_OVERFLOW=4\n\
         DB_ECHO=false\n\
         DB_POOL_TIMEOUT=9\n",
    );
    run_child(
        "child_process_environment_wins",
        &dir.0,
        &[
            ("DB_POOL_SIZE", "7"),
            // Empty counts as unset: the .env value applies.
            ("DB_MAX_OVERFLOW", ""),
            // Another case still matches, and the process environment still wins.
            ("db_echo", "true"),
        ],
    );
}

#[test]
#[ignore = "run by process_environment_wins_over_dotenv in a child process"]
fn child_process_environment_wins() {
    if !is_child() {
        return;
    }
    // The current directory is the parent's temp dir: this is from_env's own path.
    let s = Settings::from_env().unwrap();
    assert_eq!(s.pool_size, 7);
    assert_eq!(s.max_overflow, Some(4));
    assert!(s.echo);
    assert_eq!(s.pool_timeout, Duration::from_secs(9));
}

#[test]
fn non_utf8_environment_value_is_an_error() {
    let dir = TempDir::new();
    run_child("child_non_utf8_value", &dir.0, &[]);
}

#[test]
#[ignore = "run by non_utf8_environment_value_is_an_error in a child process"]
fn child_non_utf8_value() {
    if !is_child() {
        return;
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        // Single-threaded child (--test-threads=1): changing the environment is safe here.
        std::env::set_var("DB_POOL_SIZE", std::ffi::OsStr::from_bytes(b"5\xff"));
        let err = Settings::from_env().unwrap_err();
        assert!(
            matches!(&err, SettingsError::Invalid { variable, expected, .. }
                if variable == "DB_POOL_SIZE" && expected == "UTF-8 text"),
            "{err:?}"
        );
    }
}
