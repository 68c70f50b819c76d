//! Pool settings from environment variables, drop-in with the seed service's `.env` (DESIGN §1).
//!
//! Every variable of the seed keeps its name and default; tidepool adds a few of its own. Rules
//! that apply to all of them:
//! - The process environment is read first, then a `.env` file in the working directory: the
//!   process environment wins. Names are matched exactly first and then, as pydantic-settings
//!   does, without regard to case (`db_pool_size` works too).
//! - An empty (or all-whitespace) value counts as unset, as if the line were not there, so
//!   `DB_POOL_SIZE=` in a compose file means "the default" (or the `.env` value), not an error.
//!   Values are trimmed.
//! - Booleans accept `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off` (and pydantic's `t`/`f`,
//!   `y`/`n`), in any case.
//! - Durations are seconds with decimals allowed (`0.5`), finite and at most
//!   [`MAX_SECONDS`].
//! - A bad value is an error naming the variable, the value (with any password hidden) and what
//!   is accepted; never a panic and never a silent default.
//!
//! The `.env` file is read with python-dotenv's rules (what the seed used): `export` prefixes,
//! single and double quotes (multi-line allowed, escapes as python-dotenv decodes them),
//! comments after ` #`, and `${VAR}` / `${VAR:-default}` expansion (earlier lines of the file
//! first, then the process environment). `$VAR` without braces is left as is, so a password
//! containing `$` survives. Where python-dotenv would skip a line it cannot parse with a warning,
//! tidepool stops with an error naming the file and line.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::url::redact_loosely;
pub use crate::url::DatabaseUrl;

/// The longest duration any setting accepts, in seconds (about 31 years): far enough to mean
/// "practically forever", near enough that adding it to `Instant::now()` cannot overflow.
pub const MAX_SECONDS: u64 = 1_000_000_000;

/// The most connections a pool setting may ask for: PostgreSQL's own ceiling on
/// `max_connections` (2^18 - 1), so a larger figure can only be a mistake.
pub const MAX_CONNECTIONS: usize = 262_143;

/// How a connection is cleaned when it comes back to the pool (`DB_POOL_RESET_ON_RETURN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResetOnReturn {
    /// Roll back whatever the last user left open (SQLAlchemy's default): the next user never
    /// inherits a transaction.
    #[default]
    Rollback,
    /// Also reset session state (`DISCARD ALL`): settings, prepared statements, temp tables.
    Discard,
    /// No reset round trip: a connection returned inside a transaction is closed, not reused.
    None,
}

impl fmt::Display for ResetOnReturn {
    /// The variable's spelling: `rollback`, `discard` or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResetOnReturn::Rollback => "rollback",
            ResetOnReturn::Discard => "discard",
            ResetOnReturn::None => "none",
        })
    }
}

/// Every pool setting, with the seed's defaults. Plain pub fields so programs can write
/// `Settings { pool_size: 10, ..Settings::default() }`. `Debug` shows the URL redacted.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `DATABASE_URL`: where to connect. `None` when unset (the service then starts its own
    /// throwaway server, DESIGN §6).
    pub database_url: Option<DatabaseUrl>,
    /// `DB_POOL_SIZE` (5): connections kept open in the pool; at least 1.
    pub pool_size: usize,
    /// `DB_MAX_OVERFLOW` (10): extra connections allowed in bursts; `-1` gives `None`, no limit,
    /// as in SQLAlchemy.
    pub max_overflow: Option<usize>,
    /// `DB_POOL_PRE_PING` (true): verify a connection is alive before handing it out.
    pub pre_ping: bool,
    /// `DB_POOL_PRE_PING_WINDOW` (0.5 s, 0 = ping every checkout): a connection the server
    /// answered within this long is handed out without a ping round trip (HikariCP's bypass
    /// window); a socket the client knows is closed is still caught.
    pub pre_ping_window: Duration,
    /// `DB_POOL_RECYCLE` (3600 s): replace connections older than this at checkout; `-1` gives
    /// `None`, never. Zero is rejected (the seed never meant "recycle on every checkout").
    pub recycle: Option<Duration>,
    /// `DB_ECHO` (false): log every statement with its parameters and time.
    pub echo: bool,
    /// `DB_ECHO_POOL` (false): log pool events.
    pub echo_pool: bool,
    /// `DB_SLOW_QUERY_THRESHOLD` (1.0 s): slower statements are logged as warnings.
    pub slow_query_threshold: Duration,
    /// `DB_SLOW_QUERY_EXPLAIN` (false): also log the plan of slow statements.
    pub slow_query_explain: bool,
    /// `DB_POOL_TIMEOUT` (30 s): how long a checkout waits for a connection.
    pub pool_timeout: Duration,
    /// `DB_CONNECT_TIMEOUT` (10 s, greater than 0): how long opening a connection may take.
    /// When unset, the URL's `connect_timeout` if it has one.
    pub connect_timeout: Duration,
    /// `DB_POOL_USE_LIFO` (false): hand out the most recently returned connection first, so
    /// idle ones age out.
    pub use_lifo: bool,
    /// `DB_POOL_RESET_ON_RETURN` (`rollback`): how a returned connection is cleaned.
    pub reset_on_return: ResetOnReturn,
    /// `DB_APPLICATION_NAME`: shown in `pg_stat_activity`. When unset, the URL's
    /// `application_name` if any.
    pub application_name: Option<String>,
    /// `DB_STATEMENT_CACHE` (true): prepare each statement once per connection. `false` uses
    /// unnamed statements only (PgBouncer in transaction mode). When unset, the URL decides
    /// (`prepared_statement_cache_size=0` or `statement_cache_size=0` turn it off).
    pub statement_cache: bool,
    /// `DB_INSTANCES` (unset): how many processes run with this configuration, for the
    /// connection-budget checks.
    pub instances: Option<u32>,
    /// `DB_COMMAND_TIMEOUT` (unset: the URL's asyncpg `command_timeout`, else none; `0` =
    /// none): a statement running longer fails with [`Error::CommandTimeout`](crate::Error)
    /// and is cancelled on the server. Overridden per checkout with
    /// [`PooledConnection::set_command_timeout`](crate::PooledConnection::set_command_timeout).
    pub command_timeout: Option<Duration>,
    /// `DB_CONNECT_INIT_SQL` (unset): statements (separated by `;`) run on every new connection
    /// before first use, e.g. `SET statement_timeout = '5s'; SET search_path = app`, and again
    /// after `DISCARD ALL`. A failing one fails the connect, naming it.
    pub connect_init_sql: Option<String>,
    /// `DB_POOL_IDLE_TIMEOUT` (unset: off, the seed keeps `pool_size` open): connections idle
    /// longer are closed, down to `min_idle`.
    pub idle_timeout: Option<Duration>,
    /// `DB_POOL_MIN_IDLE` (0; at most `DB_POOL_SIZE`): idle connections kept through idle
    /// trimming, and refilled in the background after connections die.
    pub min_idle: usize,
    /// `DB_POOL_KEEPALIVE` (unset: off): idle connections the server has not answered on for
    /// this long are pinged in the background, so a firewall or `idle_session_timeout` never
    /// hands the next request a dead socket (HikariCP's `keepaliveTime`).
    pub keepalive: Option<Duration>,
    /// Code run on every new connection after `connect_init_sql` (set in code; see
    /// [`ConnectHook`](crate::ConnectHook)).
    pub on_connect: Option<crate::init::ConnectHook>,
    /// `DATABASE_REPLICA_URL` (unset): read replicas, one per host of the URL (same syntax as
    /// `DATABASE_URL`); [`Pool::read`](crate::Pool::read) routes to them.
    pub replica_url: Option<DatabaseUrl>,
    /// `DB_REPLICA_POOL_SIZE` (unset: `DB_POOL_SIZE`): `pool_size` of each replica's pool.
    pub replica_pool_size: Option<usize>,
    /// `DB_REPLICA_MAX_OVERFLOW` (unset: `DB_MAX_OVERFLOW`): `max_overflow` of each replica's
    /// pool; `Some(None)` is `-1`, no limit.
    pub replica_max_overflow: Option<Option<usize>>,
    /// `DB_REPLICA_MAX_LAG` (10 s): a replica whose replay is further behind than this is
    /// skipped until it catches up.
    pub replica_max_lag: Duration,
    /// `DB_REPLICA_FALLBACK` (true): with no usable replica, reads go to the primary; `false`
    /// fails them instead (with the replicas' state in the error).
    pub replica_fallback: bool,
    /// `DB_POOL_LEAK_THRESHOLD` (unset: off; `0` is off too): a connection checked out for
    /// longer than this is logged once as a possible leak, with where it was checked out, and
    /// again when it comes back (HikariCP's `leakDetectionThreshold`).
    pub leak_threshold: Option<Duration>,
}

impl Default for Settings {
    /// The seed's defaults, without a database URL.
    fn default() -> Self {
        Settings {
            database_url: None,
            pool_size: 5,
            max_overflow: Some(10),
            pre_ping: true,
            pre_ping_window: Duration::from_millis(500),
            recycle: Some(Duration::from_secs(3600)),
            echo: false,
            echo_pool: false,
            slow_query_threshold: Duration::from_secs(1),
            slow_query_explain: false,
            pool_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            use_lifo: false,
            reset_on_return: ResetOnReturn::Rollback,
            application_name: None,
            statement_cache: true,
            instances: None,
            command_timeout: None,
            connect_init_sql: None,
            on_connect: None,
            idle_timeout: None,
            min_idle: 0,
            keepalive: None,
            replica_url: None,
            replica_pool_size: None,
            replica_max_overflow: None,
            replica_max_lag: Duration::from_secs(10),
            replica_fallback: true,
            leak_threshold: None,
        }
    }
}

/// A setting that could not be used. The messages name the variable, the value (with any
/// password replaced by `***`) and what is accepted, e.g.
/// `DB_POOL_SIZE="abc" is not valid: expected a whole number of at least 1`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// An environment variable's value is not acceptable. `expected` completes the sentence
    /// "expected ..."; for `DATABASE_URL` the value is already redacted.
    #[error("{variable}={value:?} is not valid: expected {expected}")]
    Invalid {
        /// The variable's name, e.g. `DB_POOL_SIZE`.
        variable: String,
        /// The value as given (trimmed; redacted for `DATABASE_URL`).
        value: String,
        /// What the variable accepts.
        expected: String,
    },
    /// A database URL that cannot be used. Neither field contains the password.
    #[error("database URL {url:?} is not valid: expected {reason}")]
    Url {
        /// The URL with its password replaced by `***`.
        url: String,
        /// What was expected instead (completes "expected ...").
        reason: String,
    },
    /// A file the settings name (a certificate or key from the URL's `sslrootcert`, `sslcert`
    /// or `sslkey`) cannot be used.
    #[error("{parameter}={path:?} cannot be used: {reason}")]
    File {
        /// The parameter that names the file, e.g. `sslrootcert`.
        parameter: String,
        /// The file's path.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The `.env` file exists but cannot be read or parsed. The reason names the line but never
    /// quotes it (it may hold a password).
    #[error("{path}: {reason}")]
    DotEnv {
        /// The file's path.
        path: String,
        /// What is wrong, with the line number.
        reason: String,
    },
}

impl From<crate::url::UrlError> for SettingsError {
    fn from(e: crate::url::UrlError) -> Self {
        SettingsError::Url {
            url: e.url,
            reason: e.reason,
        }
    }
}

const BOOL: &str = "true or false (also 1/0, yes/no, on/off)";
const AT_LEAST_ONE: &str = "a whole number of at least 1";
const OVERFLOW: &str = "a whole number of at least 0, or -1 for no limit";
const RECYCLE: &str =
    "a number of seconds greater than 0 (decimals allowed), or -1 to never recycle";
const SECONDS: &str = "a number of seconds of at least 0 (decimals allowed)";
const POSITIVE_SECONDS: &str = "a number of seconds greater than 0 (decimals allowed)";
const RESET: &str = "rollback, discard or none";
const LEAK: &str = "a number of seconds of at least 0 (decimals allowed; 0 = off)";
const TEXT: &str = "text without NUL characters";

/// The variables tidepool reads, for tools that list or check them.
pub const VARIABLES: &[&str] = &[
    "DATABASE_URL",
    "DB_POOL_SIZE",
    "DB_MAX_OVERFLOW",
    "DB_POOL_PRE_PING",
    "DB_POOL_PRE_PING_WINDOW",
    "DB_POOL_RECYCLE",
    "DB_ECHO",
    "DB_ECHO_POOL",
    "DB_SLOW_QUERY_THRESHOLD",
    "DB_SLOW_QUERY_EXPLAIN",
    "DB_POOL_TIMEOUT",
    "DB_CONNECT_TIMEOUT",
    "DB_POOL_USE_LIFO",
    "DB_POOL_RESET_ON_RETURN",
    "DB_APPLICATION_NAME",
    "DB_STATEMENT_CACHE",
    "DB_INSTANCES",
    "DB_COMMAND_TIMEOUT",
    "DB_CONNECT_INIT_SQL",
    "DB_POOL_IDLE_TIMEOUT",
    "DB_POOL_MIN_IDLE",
    "DB_POOL_KEEPALIVE",
    "DATABASE_REPLICA_URL",
    "DB_REPLICA_POOL_SIZE",
    "DB_REPLICA_MAX_OVERFLOW",
    "DB_REPLICA_MAX_LAG",
    "DB_REPLICA_FALLBACK",
    "DB_POOL_LEAK_THRESHOLD",
];

impl Settings {
    /// Reads the settings from the process environment, then from `.env` in the current
    /// directory (the process environment wins; a missing `.env` is fine; a malformed one is an
    /// error naming the file and line).
    pub fn from_env() -> Result<Settings, SettingsError> {
        let dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        Settings::from_env_in(&dir)
    }

    /// [`Settings::from_env`] with the `.env` file looked for in `dir` instead of the current
    /// directory: for tests and for programs that keep their configuration elsewhere.
    pub fn from_env_in(dir: &Path) -> Result<Settings, SettingsError> {
        let path = dir.join(".env");
        let dotenv = match std::fs::read(&path) {
            Ok(bytes) => read_dotenv(&path, &bytes, process_var)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => {
                return Err(SettingsError::DotEnv {
                    path: path.display().to_string(),
                    reason: format!("cannot be read: {e}"),
                })
            }
        };
        Settings::from_source(|name| {
            if let Some(value) = env_exact(name)? {
                return Ok(Some(value));
            }
            if let Some(value) = env_any_case(name)? {
                return Ok(Some(value));
            }
            let from_file = dotenv.get(name).cloned().flatten().filter(|v| is_set(v));
            Ok(from_file.or_else(|| {
                dotenv
                    .iter()
                    .filter(|(key, _)| key.eq_ignore_ascii_case(name))
                    .find_map(|(_, value)| value.clone().filter(|v| is_set(v)))
            }))
        })
    }

    /// Reads the settings with the same rules from any lookup, e.g. a map in a test:
    /// `lookup("DB_POOL_SIZE")` returns the variable's value, or `None` when it is unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings, SettingsError> {
        Settings::from_source(|name| Ok(lookup(name)))
    }

    /// The most connections the pool may open: `pool_size + max_overflow`, or `None` when
    /// overflow is unlimited.
    pub fn capacity(&self) -> Option<usize> {
        self.max_overflow
            .map(|overflow| self.pool_size.saturating_add(overflow))
    }

    fn from_source(
        source: impl Fn(&str) -> Result<Option<String>, SettingsError>,
    ) -> Result<Settings, SettingsError> {
        let get = |name: &str| -> Result<Option<Value>, SettingsError> {
            Ok(source(name)?
                .filter(|raw| is_set(raw))
                .map(|raw| Value::new(name, &raw)))
        };
        let defaults = Settings::default();

        let parse_url = |variable: &str| -> Result<Option<DatabaseUrl>, SettingsError> {
            match get(variable)? {
                Some(value) => Ok(Some(DatabaseUrl::parse(&value.text).map_err(|e| {
                    SettingsError::Invalid {
                        variable: variable.into(),
                        value: e.url,
                        expected: e.reason,
                    }
                })?)),
                None => Ok(None),
            }
        };
        let database_url = parse_url("DATABASE_URL")?;
        let replica_url = parse_url("DATABASE_REPLICA_URL")?;
        let url = database_url.as_ref();

        let pool_size = match get("DB_POOL_SIZE")? {
            Some(v) => v.count(1, AT_LEAST_ONE)?,
            None => defaults.pool_size,
        };
        let max_overflow = match get("DB_MAX_OVERFLOW")? {
            Some(v) if v.text == "-1" => None,
            Some(v) => Some(v.count(0, OVERFLOW)?),
            None => defaults.max_overflow,
        };
        let recycle = match get("DB_POOL_RECYCLE")? {
            Some(v) => match v.seconds(RECYCLE)? {
                Seconds::Negative(-1.0) => None,
                Seconds::Duration(d) if !d.is_zero() => Some(d),
                Seconds::Duration(_) => {
                    return Err(v.invalid(
                        "a number of seconds greater than 0 (decimals allowed); \
                         use -1 to never recycle",
                    ))
                }
                Seconds::Negative(_) => return Err(v.invalid(RECYCLE)),
            },
            None => defaults.recycle,
        };
        let connect_timeout = match get("DB_CONNECT_TIMEOUT")? {
            Some(v) => match v.seconds(POSITIVE_SECONDS)? {
                Seconds::Duration(d) if !d.is_zero() => d,
                _ => return Err(v.invalid(POSITIVE_SECONDS)),
            },
            None => url
                .and_then(DatabaseUrl::connect_timeout)
                .unwrap_or(defaults.connect_timeout),
        };
        let application_name = match get("DB_APPLICATION_NAME")? {
            Some(v) if v.text.contains('\0') => return Err(v.invalid(TEXT)),
            Some(v) => Some(v.text),
            None => url
                .and_then(DatabaseUrl::application_name)
                .map(str::to_owned),
        };
        let statement_cache = match get("DB_STATEMENT_CACHE")? {
            Some(v) => v.boolean()?,
            None => url
                .and_then(DatabaseUrl::statement_cache)
                .unwrap_or(defaults.statement_cache),
        };
        let reset_on_return = match get("DB_POOL_RESET_ON_RETURN")? {
            Some(v) => match v.text.to_ascii_lowercase().as_str() {
                "rollback" => ResetOnReturn::Rollback,
                "discard" => ResetOnReturn::Discard,
                "none" => ResetOnReturn::None,
                _ => return Err(v.invalid(RESET)),
            },
            None => defaults.reset_on_return,
        };
        let instances = match get("DB_INSTANCES")? {
            Some(v) => match v.text.parse::<u32>() {
                Ok(n) if n >= 1 => Some(n),
                _ => return Err(v.invalid(AT_LEAST_ONE)),
            },
            None => defaults.instances,
        };
        let command_timeout = match get("DB_COMMAND_TIMEOUT")? {
            Some(v) => match v.seconds(SECONDS)? {
                Seconds::Duration(d) if d.is_zero() => None,
                Seconds::Duration(d) => Some(d),
                Seconds::Negative(_) => return Err(v.invalid(SECONDS)),
            },
            None => url.and_then(DatabaseUrl::command_timeout),
        };
        let connect_init_sql = match get("DB_CONNECT_INIT_SQL")? {
            Some(v) if v.text.contains('\0') => return Err(v.invalid(TEXT)),
            Some(v) => Some(v.text),
            None => None,
        };
        let optional_seconds = |name: &str| -> Result<Option<Duration>, SettingsError> {
            match get(name)? {
                Some(v) => match v.seconds(SECONDS)? {
                    Seconds::Duration(d) if d.is_zero() => Ok(None),
                    Seconds::Duration(d) => Ok(Some(d)),
                    Seconds::Negative(_) => Err(v.invalid(SECONDS)),
                },
                None => Ok(None),
            }
        };
        let idle_timeout = optional_seconds("DB_POOL_IDLE_TIMEOUT")?;
        let keepalive = optional_seconds("DB_POOL_KEEPALIVE")?;
        let min_idle = match get("DB_POOL_MIN_IDLE")? {
            Some(v) => {
                let n = v.count(0, "a whole number of at least 0")?;
                if n > pool_size {
                    return Err(v.invalid(format!(
                        "a whole number from 0 to DB_POOL_SIZE ({pool_size})"
                    )));
                }
                n
            }
            None => defaults.min_idle,
        };
        let replica_pool_size = match get("DB_REPLICA_POOL_SIZE")? {
            Some(v) => Some(v.count(1, AT_LEAST_ONE)?),
            None => defaults.replica_pool_size,
        };
        let replica_max_overflow = match get("DB_REPLICA_MAX_OVERFLOW")? {
            Some(v) if v.text == "-1" => Some(None),
            Some(v) => Some(Some(v.count(0, OVERFLOW)?)),
            None => defaults.replica_max_overflow,
        };
        let leak_threshold = match get("DB_POOL_LEAK_THRESHOLD")? {
            Some(v) => match v.seconds(LEAK)? {
                Seconds::Duration(d) if d.is_zero() => None,
                Seconds::Duration(d) => Some(d),
                Seconds::Negative(_) => return Err(v.invalid(LEAK)),
            },
            None => defaults.leak_threshold,
        };
        let boolean = |name: &str, default: bool| -> Result<bool, SettingsError> {
            get(name)?.map_or(Ok(default), |v| v.boolean())
        };
        let duration = |name: &str, default: Duration| -> Result<Duration, SettingsError> {
            match get(name)? {
                Some(v) => match v.seconds(SECONDS)? {
                    Seconds::Duration(d) => Ok(d),
                    Seconds::Negative(_) => Err(v.invalid(SECONDS)),
                },
                None => Ok(default),
            }
        };

        Ok(Settings {
            pool_size,
            max_overflow,
            pre_ping: boolean("DB_POOL_PRE_PING", defaults.pre_ping)?,
            pre_ping_window: duration("DB_POOL_PRE_PING_WINDOW", defaults.pre_ping_window)?,
            recycle,
            echo: boolean("DB_ECHO", defaults.echo)?,
            echo_pool: boolean("DB_ECHO_POOL", defaults.echo_pool)?,
            slow_query_threshold: duration(
                "DB_SLOW_QUERY_THRESHOLD",
                defaults.slow_query_threshold,
            )?,
            slow_query_explain: boolean("DB_SLOW_QUERY_EXPLAIN", defaults.slow_query_explain)?,
            pool_timeout: duration("DB_POOL_TIMEOUT", defaults.pool_timeout)?,
            connect_timeout,
            use_lifo: boolean("DB_POOL_USE_LIFO", defaults.use_lifo)?,
            reset_on_return,
            application_name,
            statement_cache,
            instances,
            command_timeout,
            connect_init_sql,
            on_connect: None,
            idle_timeout,
            min_idle,
            keepalive,
            database_url,
            replica_url,
            replica_pool_size,
            replica_max_overflow,
            replica_max_lag: duration("DB_REPLICA_MAX_LAG", defaults.replica_max_lag)?,
            replica_fallback: boolean("DB_REPLICA_FALLBACK", defaults.replica_fallback)?,
            leak_threshold,
        })
    }
}

/// Whether a raw value counts as set: empty and all-whitespace values do not.
fn is_set(raw: &str) -> bool {
    !raw.trim().is_empty()
}

/// A set variable's trimmed value, with what is needed to report it.
struct Value {
    variable: String,
    text: String,
}

enum Seconds {
    Negative(f64),
    Duration(Duration),
}

impl Value {
    fn new(variable: &str, raw: &str) -> Value {
        Value {
            variable: variable.to_owned(),
            text: raw.trim().to_owned(),
        }
    }

    fn invalid(&self, expected: impl Into<String>) -> SettingsError {
        let value = if self.variable == "DATABASE_URL" {
            redact_loosely(&self.text)
        } else {
            self.text.clone()
        };
        SettingsError::Invalid {
            variable: self.variable.clone(),
            value,
            expected: expected.into(),
        }
    }

    fn boolean(&self) -> Result<bool, SettingsError> {
        match self.text.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" | "t" | "y" => Ok(true),
            "false" | "0" | "no" | "off" | "f" | "n" => Ok(false),
            _ => Err(self.invalid(BOOL)),
        }
    }

    /// A connection count of at least `min`, at most [`MAX_CONNECTIONS`].
    fn count(&self, min: usize, expected: &str) -> Result<usize, SettingsError> {
        match self.text.parse::<u64>() {
            Ok(n) if n > MAX_CONNECTIONS as u64 => Err(self.invalid(format!(
                "a whole number of at most {MAX_CONNECTIONS} (PostgreSQL's connection limit)"
            ))),
            Ok(n) if n as usize >= min => Ok(n as usize),
            _ => Err(self.invalid(expected)),
        }
    }

    /// Seconds, decimals allowed: negative numbers are returned for the caller to judge.
    fn seconds(&self, expected: &str) -> Result<Seconds, SettingsError> {
        let Some(number) = self.text.parse::<f64>().ok().filter(|n| n.is_finite()) else {
            return Err(self.invalid(expected));
        };
        if number < 0.0 {
            return Ok(Seconds::Negative(number));
        }
        if number > MAX_SECONDS as f64 {
            return Err(self.invalid(format!("{expected}, at most {MAX_SECONDS}")));
        }
        Ok(Seconds::Duration(
            exact_seconds(&self.text).unwrap_or_else(|| Duration::from_secs_f64(number)),
        ))
    }
}

/// `12`, `+0.5`, `3.`, `.25` as an exact Duration (no binary rounding); `None` for other forms
/// (exponents), which the caller converts through `f64`.
fn exact_seconds(text: &str) -> Option<Duration> {
    let text = text.strip_prefix('+').unwrap_or(text);
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
        return None;
    }
    let secs = if whole.is_empty() {
        0
    } else {
        whole.parse::<u64>().ok()?
    };
    let mut nanos = 0u32;
    for (i, b) in fraction.bytes().take(9).enumerate() {
        nanos += u32::from(b - b'0') * 10u32.pow(8 - i as u32);
    }
    Some(Duration::new(secs, nanos))
}

/// A process environment variable, lossily decoded (for `${VAR}` expansion in `.env`).
fn process_var(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
}

fn decode_env(name: &str, value: OsString) -> Result<String, SettingsError> {
    value.into_string().map_err(|raw| SettingsError::Invalid {
        variable: name.to_owned(),
        value: if name.eq_ignore_ascii_case("DATABASE_URL") {
            redact_loosely(&raw.to_string_lossy())
        } else {
            raw.to_string_lossy().into_owned()
        },
        expected: "UTF-8 text".into(),
    })
}

/// The process environment's value for exactly `name`, when set and not empty.
fn env_exact(name: &str) -> Result<Option<String>, SettingsError> {
    match std::env::var_os(name) {
        Some(value) => Ok(Some(decode_env(name, value)?).filter(|v| is_set(v))),
        None => Ok(None),
    }
}

/// The process environment's value for `name` in another case (`db_pool_size`), when set.
fn env_any_case(name: &str) -> Result<Option<String>, SettingsError> {
    for (key, value) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key != name && key.eq_ignore_ascii_case(name) {
            let value = decode_env(key, value)?;
            if is_set(&value) {
                return Ok(Some(value));
            }
        }
    }
    Ok(None)
}

/// Parses a `.env` file's bytes with python-dotenv's rules and expands `${VAR}` references.
/// A key given without `=` maps to `None`.
fn read_dotenv(
    path: &Path,
    bytes: &[u8],
    environment: impl Fn(&str) -> Option<String>,
) -> Result<HashMap<String, Option<String>>, SettingsError> {
    let error = |reason: String| SettingsError::DotEnv {
        path: path.display().to_string(),
        reason,
    };
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = dotenv::line_at(
            &String::from_utf8_lossy(&bytes[..e.valid_up_to()]),
            usize::MAX,
        );
        error(format!("line {line}: not valid UTF-8 text"))
    })?;
    // Python reads the file in text mode, which turns `\r\n` and a lone `\r` into `\n`.
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let bindings =
        dotenv::parse(&text).map_err(|e| error(format!("line {}: {}", e.line, e.reason)))?;
    let mut values: HashMap<String, Option<String>> = HashMap::new();
    for (key, value) in bindings {
        let resolved = value.map(|value| {
            dotenv::expand(&value, |name| match values.get(name) {
                Some(earlier) => Some(earlier.clone().unwrap_or_default()),
                None => environment(name),
            })
        });
        values.insert(key, resolved);
    }
    Ok(values)
}

/// A python-dotenv compatible `.env` parser (python-dotenv 1.x `parser.py` and
/// `variables.py`), reporting errors by line without quoting the line.
mod dotenv {
    /// Where and why a statement could not be parsed.
    #[derive(Debug, PartialEq)]
    pub(super) struct ParseError {
        pub line: usize,
        pub reason: &'static str,
    }

    /// Python's `str.isspace`, which its regex `\s` follows.
    fn py_space(c: char) -> bool {
        c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
    }

    /// `[^\S\r\n]`: whitespace within a line.
    fn inline_space(c: char) -> bool {
        py_space(c) && c != '\r' && c != '\n'
    }

    /// The 1-based line number of byte `pos` (clamped to the text); `\r\n`, `\n` and `\r` each end
    /// a line.
    pub(super) fn line_at(text: &str, pos: usize) -> usize {
        let head = &text.as_bytes()[..pos.min(text.len())];
        let mut line = 1;
        let mut i = 0;
        while i < head.len() {
            match head[i] {
                b'\r' => {
                    line += 1;
                    if head.get(i + 1) == Some(&b'\n') {
                        i += 1;
                    }
                }
                b'\n' => line += 1,
                _ => {}
            }
            i += 1;
        }
        line
    }

    struct Reader<'a> {
        text: &'a str,
        pos: usize,
    }

    impl<'a> Reader<'a> {
        fn rest(&self) -> &'a str {
            &self.text[self.pos..]
        }

        fn peek(&self) -> Option<char> {
            self.rest().chars().next()
        }

        fn skip_while(&mut self, f: impl Fn(char) -> bool) -> &'a str {
            let rest = self.rest();
            let len = rest.find(|c| !f(c)).unwrap_or(rest.len());
            self.pos += len;
            &rest[..len]
        }

        /// A quoted value's body: python-dotenv's `'((?:\\'|[^'])*)'` (or with `"`), including
        /// its backtracking: the value ends at the first quote not preceded by a backslash, or
        /// failing that, at the quote of the last `\'` pair.
        fn quoted(&mut self, quote: char) -> Option<&'a str> {
            let body = &self.rest()[1..];
            let bytes = body.as_bytes();
            let q = quote as u8;
            let mut i = 0;
            let mut last_pair_quote = None;
            while i < bytes.len() {
                if bytes[i] == b'\\' && bytes.get(i + 1) == Some(&q) {
                    last_pair_quote = Some(i + 1);
                    i += 2;
                } else if bytes[i] == q {
                    self.pos += 1 + i + 1;
                    return Some(&body[..i]);
                } else {
                    i += 1;
                }
            }
            let end = last_pair_quote?;
            self.pos += 1 + end + 1;
            Some(&body[..end])
        }
    }

    /// Decodes backslash escapes: in single quotes only `\\` and `\'`; in double quotes also
    /// `\"`, `\a`, `\b`, `\f`, `\n`, `\r`, `\t`, `\v`.
    fn unescape(body: &str, double: bool) -> String {
        let mut out = String::with_capacity(body.len());
        let mut chars = body.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            let decoded = match chars.peek() {
                Some('\\') => Some('\\'),
                Some('\'') => Some('\''),
                Some('"') if double => Some('"'),
                Some('a') if double => Some('\u{7}'),
                Some('b') if double => Some('\u{8}'),
                Some('f') if double => Some('\u{c}'),
                Some('n') if double => Some('\n'),
                Some('r') if double => Some('\r'),
                Some('t') if double => Some('\t'),
                Some('v') if double => Some('\u{b}'),
                _ => None,
            };
            match decoded {
                Some(d) => {
                    out.push(d);
                    chars.next();
                }
                None => out.push('\\'),
            }
        }
        out
    }

    /// An unquoted value: up to the end of the line, cut at the first whitespace followed by
    /// `#`, right-trimmed.
    fn unquoted(line: &str) -> String {
        let mut cut = line.len();
        let mut run_start = None;
        for (i, c) in line.char_indices() {
            if py_space(c) {
                run_start.get_or_insert(i);
            } else {
                if c == '#' {
                    if let Some(start) = run_start {
                        cut = start;
                        break;
                    }
                }
                run_start = None;
            }
        }
        line[..cut].trim_end_matches(py_space).to_owned()
    }

    /// Every `KEY=value` (or bare `KEY`, as `None`) binding, in file order, unexpanded.
    pub(super) fn parse(text: &str) -> Result<Vec<(String, Option<String>)>, ParseError> {
        let mut r = Reader { text, pos: 0 };
        let mut bindings = Vec::new();
        loop {
            r.skip_while(py_space);
            if r.rest().is_empty() {
                return Ok(bindings);
            }
            let line = line_at(text, r.pos);
            let fail = |reason| Err(ParseError { line, reason });
            // `(?:export[^\S\r\n]+)?`
            if let Some(after) = r.rest().strip_prefix("export") {
                if after.starts_with(inline_space) {
                    r.pos += "export".len();
                    r.skip_while(inline_space);
                }
            }
            let key = match r.peek() {
                Some('#') => None,
                Some('\'') => {
                    let body = &r.rest()[1..];
                    match body.find('\'') {
                        Some(end) if end > 0 => {
                            r.pos += end + 2;
                            Some(body[..end].to_owned())
                        }
                        _ => return fail("expected NAME=value (a quoted name is not closed)"),
                    }
                }
                _ => {
                    let key = r.skip_while(|c| c != '=' && c != '#' && !py_space(c));
                    if key.is_empty() {
                        return fail("expected NAME=value (the name is missing)");
                    }
                    Some(key.to_owned())
                }
            };
            r.skip_while(inline_space);
            let value = if r.peek() == Some('=') {
                r.pos += 1;
                r.skip_while(inline_space);
                Some(match r.peek() {
                    Some(q @ ('\'' | '"')) => match r.quoted(q) {
                        Some(body) => unescape(body, q == '"'),
                        None => return fail("a quoted value is never closed"),
                    },
                    None | Some('\r' | '\n') => String::new(),
                    Some(_) => unquoted(r.skip_while(|c| c != '\r' && c != '\n')),
                })
            } else {
                None
            };
            // `(?:[^\S\r\n]*#[^\r\n]*)?` then `[^\S\r\n]*(?:\r\n|\n|\r|$)`
            let before_comment = r.pos;
            r.skip_while(inline_space);
            if r.peek() == Some('#') {
                r.skip_while(|c| c != '\r' && c != '\n');
            } else {
                r.pos = before_comment;
                r.skip_while(inline_space);
            }
            match r.peek() {
                None => {}
                Some('\r') => {
                    r.pos += 1;
                    if r.peek() == Some('\n') {
                        r.pos += 1;
                    }
                }
                Some('\n') => r.pos += 1,
                Some(_) => {
                    return fail(if value.is_some() {
                        "unexpected text after the value (quote values containing spaces \
                         followed by other text)"
                    } else {
                        "expected NAME=value"
                    })
                }
            }
            if let Some(key) = key {
                bindings.push((key, value));
            }
        }
    }

    /// Expands `${NAME}` and `${NAME:-default}` as python-dotenv does: a name that `lookup` knows
    /// gives its value (even when empty), otherwise the default or nothing. `$NAME` without
    /// braces stays as written.
    pub(super) fn expand(value: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
        let mut out = String::with_capacity(value.len());
        let mut copied = 0;
        let mut search = 0;
        while let Some(found) = value[search..].find("${") {
            let start = search + found;
            let inner = &value[start + 2..];
            let name_end = inner.find(['}', ':']);
            let matched = match name_end {
                Some(end) if inner.as_bytes()[end] == b'}' => Some((&inner[..end], None, end + 1)),
                Some(end) if inner[end + 1..].starts_with('-') => {
                    inner[end + 2..].find('}').map(|close| {
                        let default = &inner[end + 2..end + 2 + close];
                        (&inner[..end], Some(default), end + 2 + close + 1)
                    })
                }
                _ => None,
            };
            match matched {
                Some((name, default, len)) => {
                    out.push_str(&value[copied..start]);
                    match lookup(name) {
                        Some(v) => out.push_str(&v),
                        None => out.push_str(default.unwrap_or("")),
                    }
                    copied = start + 2 + len;
                    search = copied;
                }
                None => search = start + 1,
            }
        }
        out.push_str(&value[copied..]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(pairs: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|name| map.get(name).cloned())
    }

    fn ok(pairs: &[(&str, &str)]) -> Settings {
        from(pairs).unwrap_or_else(|e| panic!("{pairs:?}: {e}"))
    }

    /// The error for one variable set to `value`, checking it names both.
    fn invalid(variable: &str, value: &str) -> String {
        match from(&[(variable, value)]) {
            Err(e @ SettingsError::Invalid { .. }) => {
                let message = e.to_string();
                assert!(message.starts_with(&format!("{variable}=")), "{message}");
                message
            }
            other => panic!("{variable}={value:?}: {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_seed() {
        let s = ok(&[]);
        assert!(s.database_url.is_none());
        assert_eq!(s.pool_size, 5);
        assert_eq!(s.max_overflow, Some(10));
        assert!(s.pre_ping);
        assert_eq!(s.recycle, Some(Duration::from_secs(3600)));
        assert!(!s.echo);
        assert!(!s.echo_pool);
        assert_eq!(s.slow_query_threshold, Duration::from_secs(1));
        assert!(!s.slow_query_explain);
        assert_eq!(s.pool_timeout, Duration::from_secs(30));
        assert_eq!(s.connect_timeout, Duration::from_secs(10));
        assert!(!s.use_lifo);
        assert_eq!(s.reset_on_return, ResetOnReturn::Rollback);
        assert_eq!(s.application_name, None);
        assert!(s.statement_cache);
        assert_eq!(s.instances, None);
        assert_eq!(s.capacity(), Some(15));
        let d = Settings::default();
        assert_eq!(format!("{d:?}"), format!("{s:?}"));
    }

    #[test]
    fn error_message_format() {
        assert_eq!(
            invalid("DB_POOL_SIZE", "abc"),
            "DB_POOL_SIZE=\"abc\" is not valid: expected a whole number of at least 1"
        );
        assert_eq!(
            from(&[("DB_POOL_SIZE", "abc")]).unwrap_err(),
            SettingsError::Invalid {
                variable: "DB_POOL_SIZE".into(),
                value: "abc".into(),
                expected: AT_LEAST_ONE.into()
            }
        );
    }

    #[test]
    fn pool_size() {
        assert_eq!(ok(&[("DB_POOL_SIZE", "12")]).pool_size, 12);
        assert_eq!(ok(&[("DB_POOL_SIZE", " 7 ")]).pool_size, 7);
        assert_eq!(ok(&[("DB_POOL_SIZE", "262143")]).pool_size, 262_143);
        for bad in ["0", "-1", "1.5", "abc", "5 workers", "0x10"] {
            assert!(invalid("DB_POOL_SIZE", bad).contains("at least 1"), "{bad}");
        }
        assert!(invalid("DB_POOL_SIZE", "262144").contains("at most 262143"));
        assert!(invalid("DB_POOL_SIZE", "99999999999999999999999").contains("at least 1"));
    }

    #[test]
    fn max_overflow() {
        assert_eq!(ok(&[("DB_MAX_OVERFLOW", "0")]).max_overflow, Some(0));
        assert_eq!(ok(&[("DB_MAX_OVERFLOW", "20")]).max_overflow, Some(20));
        let unlimited = ok(&[("DB_MAX_OVERFLOW", "-1")]);
        assert_eq!(unlimited.max_overflow, None);
        assert_eq!(unlimited.capacity(), None);
        for bad in ["-2", "x", "1.0", "-1.5"] {
            assert!(
                invalid("DB_MAX_OVERFLOW", bad).contains("-1 for no limit"),
                "{bad}"
            );
        }
        assert!(invalid("DB_MAX_OVERFLOW", "300000").contains("at most"));
    }

    #[test]
    fn booleans() {
        for name in [
            "DB_POOL_PRE_PING",
            "DB_ECHO",
            "DB_ECHO_POOL",
            "DB_SLOW_QUERY_EXPLAIN",
            "DB_POOL_USE_LIFO",
            "DB_STATEMENT_CACHE",
        ] {
            let get = |s: &Settings| match name {
                "DB_POOL_PRE_PING" => s.pre_ping,
                "DB_ECHO" => s.echo,
                "DB_ECHO_POOL" => s.echo_pool,
                "DB_SLOW_QUERY_EXPLAIN" => s.slow_query_explain,
                "DB_POOL_USE_LIFO" => s.use_lifo,
                _ => s.statement_cache,
            };
            for yes in [
                "true", "TRUE", "True", "1", "yes", "YES", "on", "On", " true ",
            ] {
                assert!(get(&ok(&[(name, yes)])), "{name}={yes}");
            }
            for no in ["false", "FALSE", "0", "no", "No", "off", "OFF"] {
                assert!(!get(&ok(&[(name, no)])), "{name}={no}");
            }
            for bad in ["2", "maybe", "enabled", "truee", "-1"] {
                let message = invalid(name, bad);
                assert!(message.ends_with(&format!("expected {BOOL}")), "{message}");
            }
        }
    }

    #[test]
    fn recycle() {
        assert_eq!(
            ok(&[("DB_POOL_RECYCLE", "600")]).recycle,
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            ok(&[("DB_POOL_RECYCLE", "0.5")]).recycle,
            Some(Duration::from_millis(500))
        );
        assert_eq!(ok(&[("DB_POOL_RECYCLE", "-1")]).recycle, None);
        assert_eq!(ok(&[("DB_POOL_RECYCLE", "-1.0")]).recycle, None);
        let zero = invalid("DB_POOL_RECYCLE", "0");
        assert!(zero.contains("use -1 to never recycle"), "{zero}");
        for bad in ["-2", "-0.5", "soon", "NaN", "inf", "1h"] {
            assert!(
                invalid("DB_POOL_RECYCLE", bad).contains("-1 to never"),
                "{bad}"
            );
        }
        assert!(invalid("DB_POOL_RECYCLE", "1e30").contains("at most 1000000000"));
    }

    #[test]
    fn durations() {
        type Field = fn(&Settings) -> Duration;
        let cases: [(&str, Field); 4] = [
            ("DB_SLOW_QUERY_THRESHOLD", |s| s.slow_query_threshold),
            ("DB_POOL_PRE_PING_WINDOW", |s| s.pre_ping_window),
            ("DB_POOL_TIMEOUT", |s| s.pool_timeout),
            ("DB_CONNECT_TIMEOUT", |s| s.connect_timeout),
        ];
        for (name, field) in cases {
            assert_eq!(field(&ok(&[(name, "2")])), Duration::from_secs(2));
            assert_eq!(field(&ok(&[(name, "0.25")])), Duration::from_millis(250));
            assert_eq!(field(&ok(&[(name, ".1")])), Duration::from_millis(100));
            assert_eq!(field(&ok(&[(name, "3.")])), Duration::from_secs(3));
            assert_eq!(field(&ok(&[(name, "+1.5")])), Duration::from_millis(1500));
            assert_eq!(field(&ok(&[(name, "1e1")])), Duration::from_secs(10));
            assert_eq!(
                field(&ok(&[(name, "0.0000000019")])),
                Duration::from_nanos(1)
            );
            for bad in ["-1", "-0.5", "x", "1s", "nan", "inf", "-inf", "1,5"] {
                assert!(
                    invalid(name, bad).contains("number of seconds"),
                    "{name}={bad}"
                );
            }
            assert!(invalid(name, "1e10").contains("at most 1000000000"));
        }
        assert_eq!(
            ok(&[("DB_SLOW_QUERY_THRESHOLD", "0")]).slow_query_threshold,
            Duration::ZERO
        );
        assert_eq!(ok(&[("DB_POOL_TIMEOUT", "0")]).pool_timeout, Duration::ZERO);
        assert_eq!(
            ok(&[("DB_POOL_PRE_PING_WINDOW", "0")]).pre_ping_window,
            Duration::ZERO
        );
        assert_eq!(ok(&[]).pre_ping_window, Duration::from_millis(500));
        assert!(invalid("DB_CONNECT_TIMEOUT", "0").contains("greater than 0"));
    }

    #[test]
    fn leak_threshold() {
        let get = |v| ok(&[("DB_POOL_LEAK_THRESHOLD", v)]).leak_threshold;
        assert_eq!(ok(&[]).leak_threshold, None, "off by default");
        assert_eq!(get("60"), Some(Duration::from_secs(60)));
        assert_eq!(get("0.2"), Some(Duration::from_millis(200)));
        assert_eq!(get(" 2.5 "), Some(Duration::from_millis(2500)));
        assert_eq!(get("0"), None, "0 is off");
        assert_eq!(get("0.0"), None);
        assert_eq!(ok(&[("DB_POOL_LEAK_THRESHOLD", "")]).leak_threshold, None);
        for bad in ["-1", "-0.5", "soon", "1s", "nan", "inf"] {
            let message = invalid("DB_POOL_LEAK_THRESHOLD", bad);
            assert!(message.ends_with(&format!("expected {LEAK}")), "{message}");
        }
        assert_eq!(
            from(&[("DB_POOL_LEAK_THRESHOLD", "x")]).unwrap_err(),
            SettingsError::Invalid {
                variable: "DB_POOL_LEAK_THRESHOLD".into(),
                value: "x".into(),
                expected: LEAK.into(),
            }
        );
        assert!(invalid("DB_POOL_LEAK_THRESHOLD", "1e10").contains("at most 1000000000"));
        assert!(VARIABLES.contains(&"DB_POOL_LEAK_THRESHOLD"));
    }

    #[test]
    fn reset_on_return() {
        let get = |v| ok(&[("DB_POOL_RESET_ON_RETURN", v)]).reset_on_return;
        assert_eq!(get("rollback"), ResetOnReturn::Rollback);
        assert_eq!(get("DISCARD"), ResetOnReturn::Discard);
        assert_eq!(get("None"), ResetOnReturn::None);
        assert_eq!(ResetOnReturn::Discard.to_string(), "discard");
        for bad in ["commit", "true", "0"] {
            assert!(invalid("DB_POOL_RESET_ON_RETURN", bad).contains(RESET));
        }
    }

    #[test]
    fn instances() {
        assert_eq!(ok(&[("DB_INSTANCES", "4")]).instances, Some(4));
        for bad in ["0", "-1", "four", "4294967296"] {
            assert!(invalid("DB_INSTANCES", bad).contains("at least 1"), "{bad}");
        }
    }

    #[test]
    fn application_name() {
        assert_eq!(
            ok(&[("DB_APPLICATION_NAME", "api")])
                .application_name
                .as_deref(),
            Some("api")
        );
        assert!(invalid("DB_APPLICATION_NAME", "a\0b").contains("NUL"));
        let url = "postgresql://u@h/db?application_name=from_url";
        assert_eq!(
            ok(&[("DATABASE_URL", url)]).application_name.as_deref(),
            Some("from_url")
        );
        assert_eq!(
            ok(&[("DATABASE_URL", url), ("DB_APPLICATION_NAME", "env")])
                .application_name
                .as_deref(),
            Some("env")
        );
    }

    #[test]
    fn connect_timeout_from_url() {
        let url = "postgresql://u@h/db?connect_timeout=3";
        assert_eq!(
            ok(&[("DATABASE_URL", url)]).connect_timeout,
            Duration::from_secs(3)
        );
        assert_eq!(
            ok(&[("DATABASE_URL", url), ("DB_CONNECT_TIMEOUT", "4")]).connect_timeout,
            Duration::from_secs(4)
        );
        let no_timeout = "postgresql://u@h/db?connect_timeout=0";
        assert_eq!(
            ok(&[("DATABASE_URL", no_timeout)]).connect_timeout,
            Duration::from_secs(10)
        );
    }

    #[test]
    fn statement_cache_from_url() {
        let url = "postgresql+asyncpg://u@h/db?prepared_statement_cache_size=0";
        assert!(!ok(&[("DATABASE_URL", url)]).statement_cache);
        assert!(ok(&[("DATABASE_URL", url), ("DB_STATEMENT_CACHE", "true")]).statement_cache);
        assert!(!ok(&[("DB_STATEMENT_CACHE", "off")]).statement_cache);
    }

    #[test]
    fn database_url() {
        let s = ok(&[(
            "DATABASE_URL",
            " postgresql+asyncpg://user:password@localhost:5432/youworker ",
        )]);
        let url = s.database_url.as_ref().unwrap();
        assert_eq!(url.config().get_dbname(), Some("youworker"));
        let debug = format!("{s:?}");
        assert!(!debug.contains("password@"), "{debug}");
        assert!(debug.contains("user:***@localhost"), "{debug}");

        let err = from(&[("DATABASE_URL", "postgresql://u:hunter2@h/db?bogus=1")]).unwrap_err();
        let SettingsError::Invalid {
            variable,
            value,
            expected,
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(variable, "DATABASE_URL");
        assert_eq!(value, "postgresql://u:***@h/db?bogus=1");
        assert!(expected.contains("\"bogus\""), "{expected}");
        assert!(!format!("{err}{err:?}").contains("hunter2"));
        assert!(err
            .to_string()
            .starts_with("DATABASE_URL=\"postgresql://u:***@h/db?bogus=1\""));

        let err = from(&[("DATABASE_URL", "mysql://u:hunter2@h/db")]).unwrap_err();
        assert!(!format!("{err}{err:?}").contains("hunter2"), "{err}");
    }

    #[test]
    fn empty_values_are_unset() {
        let s = ok(&[
            ("DATABASE_URL", ""),
            ("DB_POOL_SIZE", ""),
            ("DB_MAX_OVERFLOW", "  "),
            ("DB_POOL_PRE_PING", "\t"),
            ("DB_POOL_RECYCLE", ""),
            ("DB_APPLICATION_NAME", " "),
            ("DB_INSTANCES", ""),
        ]);
        assert!(s.database_url.is_none());
        assert_eq!(s.pool_size, 5);
        assert_eq!(s.max_overflow, Some(10));
        assert!(s.pre_ping);
        assert_eq!(s.recycle, Some(Duration::from_secs(3600)));
        assert_eq!(s.application_name, None);
    }

    #[test]
    fn capacity_saturates() {
        let s = Settings {
            pool_size: usize::MAX,
            max_overflow: Some(1),
            ..Settings::default()
        };
        assert_eq!(s.capacity(), Some(usize::MAX));
    }

    fn dotenv_map(text: &str) -> HashMap<String, Option<String>> {
        read_dotenv(Path::new("/x/.env"), text.as_bytes(), |name| {
            (name == "HOME").then(|| "/home/me".to_owned())
        })
        .unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    fn dotenv_error(text: &str) -> String {
        match read_dotenv(Path::new("/x/.env"), text.as_bytes(), |_| None) {
            Err(e @ SettingsError::DotEnv { .. }) => e.to_string(),
            other => panic!("{text:?}: {other:?}"),
        }
    }

    fn get<'a>(map: &'a HashMap<String, Option<String>>, key: &str) -> Option<&'a str> {
        map.get(key).and_then(|v| v.as_deref())
    }

    #[test]
    fn dotenv_seed_file() {
        let seed = "# Database Connection\n\
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
            DB_SLOW_QUERY_THRESHOLD=1.0  # Log queries slower than N seconds\n";
        let map = dotenv_map(seed);
        assert_eq!(
            get(&map, "DATABASE_URL"),
            Some("postgresql+asyncpg://user:password@localhost:5432/youworker")
        );
        assert_eq!(get(&map, "DB_POOL_SIZE"), Some("5"));
        assert_eq!(get(&map, "DB_ECHO_POOL"), Some("false"));
        assert_eq!(get(&map, "DB_SLOW_QUERY_THRESHOLD"), Some("1.0"));
        assert_eq!(map.len(), 8);
    }

    #[test]
    fn dotenv_syntax() {
        let map = dotenv_map(
            "export A=1\n\
             B = 2 \n\
             C='single $HOME ${HOME} \\' \\n'\n\
             D=\"double \\\"q\\\" \\n \\t \\\\ \\x\"\n\
             E=\"multi\nline\" # comment\n\
             F=a#b\n\
             G=a #b\n\
             H=\n\
             I\n\
             'J K'=quoted key\n\
             L=${HOME}/x ${MISSING:-dflt} ${A} ${B:-unused} ${UNSET}|\n\
             M=pa$word\n\
             N=${A:x}\n\
             \r\n\
             O=crlf\r\n\
             P= #only comment\n\
             exportQ=1\n\
             A=override",
        );
        assert_eq!(get(&map, "A"), Some("override"));
        assert_eq!(get(&map, "B"), Some("2"));
        assert_eq!(get(&map, "C"), Some("single $HOME /home/me ' \\n"));
        assert_eq!(get(&map, "D"), Some("double \"q\" \n \t \\ \\x"));
        assert_eq!(get(&map, "E"), Some("multi\nline"));
        assert_eq!(get(&map, "F"), Some("a#b"));
        assert_eq!(get(&map, "G"), Some("a"));
        assert_eq!(get(&map, "H"), Some(""));
        assert_eq!(map.get("I"), Some(&None));
        assert_eq!(get(&map, "J K"), Some("quoted key"));
        assert_eq!(get(&map, "L"), Some("/home/me/x dflt 1 2 |"));
        assert_eq!(get(&map, "M"), Some("pa$word"));
        assert_eq!(get(&map, "N"), Some("${A:x}"));
        assert_eq!(get(&map, "O"), Some("crlf"));
        assert_eq!(get(&map, "P"), Some("#only comment"));
        assert_eq!(get(&map, "exportQ"), Some("1"));
    }

    #[test]
    fn dotenv_errors_name_the_line_without_quoting_it() {
        let e = dotenv_error("A=1\nDATABASE_URL=\"postgresql://u:hunter2@h/db\n");
        assert!(e.starts_with("/x/.env: line 2: "), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = dotenv_error("A=1\n\nB=\"x\"hunter2\n");
        assert!(e.starts_with("/x/.env: line 3: unexpected text"), "{e}");
        assert!(!e.contains("hunter2"));
        assert!(dotenv_error("=value\n").starts_with("/x/.env: line 1: expected NAME=value"));
        assert!(dotenv_error("A=1\r\nKEY value\n").contains("line 2"));
        assert!(dotenv_error("'unterminated=1\n").contains("line 1"));
        let e = match read_dotenv(Path::new("/x/.env"), b"A=1\nB=\xff\n", |_| None) {
            Err(e) => e.to_string(),
            Ok(map) => panic!("{map:?}"),
        };
        assert_eq!(e, "/x/.env: line 2: not valid UTF-8 text");
    }

    #[test]
    fn dotenv_quote_backtracking() {
        // python-dotenv's regex falls back to the quote of the last `\'` pair.
        assert_eq!(get(&dotenv_map("A='a\\'b\\'\n"), "A"), Some("a'b\\"));
        assert_eq!(get(&dotenv_map("A=\"x\\\"\n"), "A"), Some("x\\"));
    }

    #[test]
    fn dotenv_bom_is_skipped() {
        let map = read_dotenv(Path::new(".env"), b"\xEF\xBB\xBFA=1\n", |_| None).unwrap();
        assert_eq!(get(&map, "A"), Some("1"));
    }

    #[test]
    fn exact_seconds_parsing() {
        assert_eq!(
            exact_seconds("1.123456789999"),
            Some(Duration::new(1, 123_456_789))
        );
        assert_eq!(exact_seconds("."), None);
        assert_eq!(exact_seconds("1e3"), None);
        assert_eq!(exact_seconds("-1"), None);
    }
}
