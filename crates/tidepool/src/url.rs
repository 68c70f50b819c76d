//! `DATABASE_URL`: parsing the URLs the seed service accepts into a [`tokio_postgres::Config`],
//! and showing them without their password.
//!
//! Accepted schemes are `postgresql://`, `postgres://` and SQLAlchemy's `postgresql+DRIVER://`
//! (`+asyncpg`, `+psycopg`, `+psycopg2`, ...; the driver part is ignored). The URL is split the
//! way libpq splits it: `scheme://[user[:password]@]host[:port][,host[:port]...][/dbname][?k=v&...]`,
//! with percent-decoding of every part. A query parameter overrides the same setting given in the
//! authority (as in libpq).
//!
//! Query parameters:
//! - libpq's, passed to tokio-postgres: `user`, `password`, `dbname`, `host` (a value starting
//!   with `/` is a Unix socket directory), `hostaddr`, `port`, `options`, `application_name`,
//!   `fallback_application_name`, `connect_timeout` (seconds; decimals allowed; zero
//!   or negative means "no timeout from the URL"), `tcp_user_timeout` (milliseconds, as libpq),
//!   `keepalives`, `keepalives_idle`, `keepalives_interval`, `keepalives_retries`,
//!   `target_session_attrs` (libpq's six values, see [`SessionAttrs`]), `channel_binding`,
//!   `load_balance_hosts`, `client_encoding` (only UTF-8, which tokio-postgres always uses) and
//!   `gssencmode` (`disable` or `prefer`: tidepool never uses GSSAPI encryption).
//! - libpq's TLS parameters, read into [`TlsParams`] (the pool makes TLS connections itself,
//!   see [`DatabaseUrl::tls`]): `sslmode` (`disable`, `allow`, `prefer` (the default),
//!   `require`, `verify-ca`, `verify-full`), `sslrootcert` (a PEM file of CA certificates, or
//!   `system` for the operating system's roots, which makes `verify-full` the default and the
//!   only mode allowed), `sslcert` and `sslkey` (a client certificate and its unencrypted PEM
//!   key), `sslsni` (`1`/`0`) and `sslnegotiation` (`postgres` only: PostgreSQL 17's `direct`
//!   is refused rather than silently downgraded).
//! - asyncpg's and SQLAlchemy's: `database` (= `dbname`), `ssl` (= `sslmode`, plus asyncpg's
//!   `true`, which is its `ssl=True`: `verify-full` against the system's roots unless
//!   `sslrootcert` names a file, and `false` = `disable`), `timeout`
//!   (= `connect_timeout`), `prepared_statement_cache_size` / `statement_cache_size` (`0` turns
//!   the statement cache off, see [`DatabaseUrl::statement_cache`]), `command_timeout` (seconds:
//!   the default of `DB_COMMAND_TIMEOUT`, see [`DatabaseUrl::command_timeout`]), and
//!   `max_cached_statement_lifetime` / `max_cacheable_statement_size` (checked to be numbers,
//!   then ignored).
//!
//! Any other parameter is an error naming it. A URL without a host (or an empty entry in a host
//! list) means `localhost`, and without a port `5432`, as with libpq. A user name is required: tokio-postgres has no
//! operating-system user to fall back on.
//!
//! `@` may appear unencoded only in the user-info part (a password like `p@ss` works as is);
//! anywhere after the host it must be written `%40`. That rule is what makes the password's
//! position unambiguous, so it can always be hidden: a password containing `/`, `?` or `@`
//! followed by such characters must be percent-encoded, and a URL that breaks the rule is
//! rejected rather than guessed at.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use tokio_postgres::config::{ChannelBinding, LoadBalanceHosts, TargetSessionAttrs};

/// `target_session_attrs`: which server of the URL's host list a connection may stay on,
/// libpq's values and definitions. Hosts are tried in order (or shuffled with
/// `load_balance_hosts=random`); one that does not qualify is passed over.
///
/// PostgreSQL 14 and later report `in_hot_standby` and `default_transaction_read_only` at
/// start-up, so the check costs nothing; on older servers the pool asks
/// (`SHOW transaction_read_only`, `SELECT pg_is_in_recovery()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SessionAttrs {
    /// Any server (the default).
    #[default]
    Any,
    /// A server whose sessions accept writes by default: not a standby, and
    /// `default_transaction_read_only` off.
    ReadWrite,
    /// A server whose sessions are read-only by default: a standby, or
    /// `default_transaction_read_only` on.
    ReadOnly,
    /// A server that is not in recovery (whatever `default_transaction_read_only` says).
    Primary,
    /// A server in recovery (a hot standby).
    Standby,
    /// A standby if any host is one; otherwise, a second pass over the hosts takes any.
    PreferStandby,
}

impl SessionAttrs {
    /// The URL spelling (`read-write`, `prefer-standby`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            SessionAttrs::Any => "any",
            SessionAttrs::ReadWrite => "read-write",
            SessionAttrs::ReadOnly => "read-only",
            SessionAttrs::Primary => "primary",
            SessionAttrs::Standby => "standby",
            SessionAttrs::PreferStandby => "prefer-standby",
        }
    }

    /// Whether connections must reach the server that takes writes (`read-write`, `primary`):
    /// such a pool follows a failover, replacing its connections when one finds itself on a
    /// read-only server.
    pub fn follows_primary(self) -> bool {
        matches!(self, SessionAttrs::ReadWrite | SessionAttrs::Primary)
    }
}

/// What replaces the password wherever a URL is shown.
const MASK: &str = "***";

/// A database URL that cannot be used. Neither field contains the password; the message reads
/// `database URL "postgresql://u:***@h/db?x=1" is not valid: expected ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("database URL {url:?} is not valid: expected {reason}")]
pub struct UrlError {
    /// The URL with its password replaced by `***`.
    pub url: String,
    /// What was expected instead (completes "expected ...").
    pub reason: String,
}

/// libpq's `sslmode`: whether to use TLS and how much of the server's certificate to check.
/// Over a Unix socket TLS is never used, whatever the mode (as with libpq).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// Plaintext first; TLS only when the server refuses the plaintext connection.
    Allow,
    /// TLS when the server offers it, plaintext otherwise (libpq's default).
    #[default]
    Prefer,
    /// TLS or nothing; the certificate is checked only when a root certificate file is given
    /// (or `~/.postgresql/root.crt` exists), as `verify-ca` then.
    Require,
    /// TLS with a certificate signed by a trusted root (`sslrootcert`), any host name.
    VerifyCa,
    /// TLS with a trusted certificate that names the host connected to.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling: `disable`, `allow`, `prefer`, `require`, `verify-ca`, `verify-full`.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where trusted root certificates come from (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of CA certificates.
    File(PathBuf),
    /// The operating system's trusted roots (`sslrootcert=system`).
    System,
}

/// The URL's TLS parameters (libpq's names). Files are read when the pool is built, so a
/// missing or unreadable one stops start-up with an error naming it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsParams {
    /// `sslmode` (or `ssl`).
    pub mode: SslMode,
    /// `sslrootcert`; when unset, `~/.postgresql/root.crt` if it exists (libpq's default).
    pub root_cert: Option<RootCert>,
    /// `sslcert`; when unset, `~/.postgresql/postgresql.crt` if it exists.
    pub cert: Option<PathBuf>,
    /// `sslkey`; when unset, `~/.postgresql/postgresql.key`.
    pub key: Option<PathBuf>,
    /// `sslsni` (default on): send the host name in the TLS handshake (never an IP address).
    pub sni: bool,
}

/// A parsed `DATABASE_URL`, ready for tokio-postgres. It keeps the URL text only in redacted form,
/// so `Display` and `Debug` can never show the password.
#[derive(Clone)]
pub struct DatabaseUrl {
    config: tokio_postgres::Config,
    tls: TlsParams,
    redacted: String,
    statement_cache: Option<bool>,
    connect_timeout: Option<Duration>,
    command_timeout: Option<Duration>,
    session_attrs: SessionAttrs,
}

impl DatabaseUrl {
    /// Parses a PostgreSQL URL (see the module documentation for what is accepted). Errors carry
    /// the URL with its password hidden and say what was expected.
    pub fn parse(url: &str) -> Result<DatabaseUrl, UrlError> {
        Parser::parse(url.trim())
    }

    /// The connection settings for tokio-postgres: hosts, ports, user, password, database and
    /// every passed-through parameter. Its `ssl_mode` is the nearest of tokio-postgres' three
    /// (for programs that connect with it themselves); the pool uses [`DatabaseUrl::tls`].
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The TLS parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`, `sslsni`).
    pub fn tls(&self) -> &TlsParams {
        &self.tls
    }

    /// The URL text with the password (user-info and any `password=` parameter) replaced by
    /// `***`: safe for logs and error messages.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// `Some(false)` when the URL turned the statement cache off
    /// (`prepared_statement_cache_size=0` or `statement_cache_size=0`, as for asyncpg behind
    /// PgBouncer), `Some(true)` for a positive size, `None` when the URL does not say.
    pub fn statement_cache(&self) -> Option<bool> {
        self.statement_cache
    }

    /// The URL's `connect_timeout` (or asyncpg's `timeout`), when positive.
    pub fn connect_timeout(&self) -> Option<Duration> {
        self.connect_timeout
    }

    /// asyncpg's `command_timeout` from the URL, when given: the default of
    /// `DB_COMMAND_TIMEOUT`, which bounds every statement.
    pub fn command_timeout(&self) -> Option<Duration> {
        self.command_timeout
    }

    /// The URL's `application_name` (or `fallback_application_name`), if any.
    pub fn application_name(&self) -> Option<&str> {
        self.config.get_application_name()
    }

    /// `target_session_attrs` (libpq's six values; `any` when the URL does not say).
    pub fn session_attrs(&self) -> SessionAttrs {
        self.session_attrs
    }
}

impl FromStr for DatabaseUrl {
    type Err = UrlError;

    /// Same as [`DatabaseUrl::parse`], for `"...".parse::<DatabaseUrl>()`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DatabaseUrl::parse(s)
    }
}

impl fmt::Display for DatabaseUrl {
    /// The redacted URL text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for DatabaseUrl {
    /// `DatabaseUrl("postgresql://user:***@host/db")`: the redacted URL text only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DatabaseUrl").field(&self.redacted).finish()
    }
}

/// Hides anything that may be a password in text that could not be parsed as a URL, erring on
/// the side of hiding too much: everything between the first `:` after the scheme and the last
/// `@`, and the value of every `password=` (any case; `&`, `;` or whitespace ends it, a quoted
/// value ends at its closing quote).
pub fn redact_loosely(text: &str) -> String {
    let body_start = match text.find("://") {
        Some(i) if looks_like_scheme(&text[..i]) => i + 3,
        _ => 0,
    };
    let body = &text[body_start..];
    let mut hidden = password_value_ranges(text);
    if let Some(at) = body.rfind('@') {
        if let Some(colon) = body[..at].find(':') {
            hidden.push((body_start + colon + 1, body_start + at));
        }
    }
    mask(text, hidden)
}

/// `text` with each of the byte ranges (merged where they overlap or touch) replaced by `***`.
fn mask(text: &str, mut ranges: Vec<(usize, usize)>) -> String {
    ranges.retain(|(start, end)| start < end);
    ranges.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for (start, end) in merged {
        out.push_str(&text[copied..start]);
        out.push_str(MASK);
        copied = end;
    }
    out.push_str(&text[copied..]);
    out
}

/// The byte ranges of the values after every `password` `=` (case-insensitive, spaces allowed
/// around `=`).
fn password_value_ranges(text: &str) -> Vec<(usize, usize)> {
    const KEY: &str = "password";
    let lower = text.to_ascii_lowercase();
    let mut ranges = Vec::new();
    let mut search = 0;
    while let Some(found) = lower[search..].find(KEY) {
        let key_end = search + found + KEY.len();
        search = key_end;
        let Some(value) = text[key_end..].trim_start().strip_prefix('=') else {
            continue;
        };
        let value = value.trim_start();
        let value_start = text.len() - value.len();
        let value_len = match value.chars().next() {
            Some(q @ ('\'' | '"')) => match value[1..].find(q) {
                Some(close) => close + 2,
                None => value.len(),
            },
            _ => {
                let is_end = |c: char| c == '&' || c == ';' || c.is_whitespace();
                let mut len = value.find(is_end).unwrap_or(value.len());
                // A password with an unencoded '&' or space continues into the pieces that
                // follow without '=' (they cannot be parameters of their own).
                loop {
                    let rest = &value[len..];
                    let next = rest.trim_start_matches(is_end);
                    let piece = next.find(is_end).unwrap_or(next.len());
                    if piece == 0 || next[..piece].contains('=') {
                        break len;
                    }
                    len += rest.len() - next.len() + piece;
                }
            }
        };
        ranges.push((value_start, value_start + value_len));
        search = search.max(value_start + value_len);
    }
    ranges
}

/// `text` with every `password=` value hidden.
fn redact_password_values(text: &str) -> String {
    mask(text, password_value_ranges(text))
}

fn looks_like_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// One host of the URL, before it goes into the Config.
enum HostSpec {
    Tcp(String),
    Unix(PathBuf),
}

/// Builds the Config from the URL's parts; query parameters override the authority.
struct Parser {
    redacted: String,
    user: Option<String>,
    password: Option<Vec<u8>>,
    dbname: Option<String>,
    hosts: Vec<HostSpec>,
    hostaddrs: Vec<IpAddr>,
    ports: Vec<u16>,
    application_name: Option<String>,
    fallback_application_name: Option<String>,
    statement_cache: Option<bool>,
    connect_timeout: Option<Duration>,
    command_timeout: Option<Duration>,
    session_attrs: SessionAttrs,
    /// `sslmode` or `ssl`, when given (the default depends on `sslrootcert`).
    ssl_mode: Option<SslMode>,
    /// asyncpg's `ssl=true`: `verify-full`, against the system's roots unless `sslrootcert`
    /// names a file.
    ssl_true: bool,
    tls: TlsParams,
    /// A `password` parameter came earlier in the query: unknown keys after it may be pieces of
    /// a password cut at an unencoded `&`, so they are neither shown nor named.
    after_password: bool,
    config: tokio_postgres::Config,
}

impl Parser {
    fn parse(text: &str) -> Result<DatabaseUrl, UrlError> {
        let loose = || redact_loosely(text);
        let Some(scheme_end) = text.find("://") else {
            return Err(url_error(
                loose(),
                "a URL starting with postgresql:// or postgres:// (SQLAlchemy's \
                 postgresql+asyncpg:// and other +driver forms also work)",
            ));
        };
        let scheme = &text[..scheme_end];
        if !scheme_is_postgres(scheme) {
            return Err(url_error(
                loose(),
                format!(
                    "a URL starting with postgresql:// or postgres:// (SQLAlchemy's \
                     postgresql+asyncpg:// and other +driver forms also work), not {:?}",
                    // The scheme is shown only when it could be one, never user-info text.
                    if looks_like_scheme(scheme) {
                        scheme
                    } else {
                        "something else"
                    }
                ),
            ));
        }
        let rest = &text[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        if tail.contains('@') {
            return Err(url_error(
                loose(),
                "'@' only before the host: percent-encode it as %40 after the host, and a \
                 password containing '/' or '?' as %2F or %3F",
            ));
        }

        let mut parser = Parser {
            redacted: String::with_capacity(text.len()),
            user: None,
            password: None,
            dbname: None,
            hosts: Vec::new(),
            hostaddrs: Vec::new(),
            ports: Vec::new(),
            application_name: None,
            fallback_application_name: None,
            statement_cache: None,
            connect_timeout: None,
            command_timeout: None,
            session_attrs: SessionAttrs::Any,
            ssl_mode: None,
            ssl_true: false,
            tls: TlsParams {
                sni: true,
                ..TlsParams::default()
            },
            after_password: false,
            config: tokio_postgres::Config::new(),
        };
        parser.redacted.push_str(&text[..scheme_end + 3]);

        // User-info: everything before the last '@' of the authority.
        let host_part = match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                let (user, password) = match userinfo.split_once(':') {
                    Some((user, password)) => (user, Some(password)),
                    None => (userinfo, None),
                };
                parser.redacted.push_str(user);
                if let Some(password) = password {
                    parser.redacted.push(':');
                    if !password.is_empty() {
                        parser.redacted.push_str(MASK);
                    }
                    let bytes: Vec<u8> = percent_decode_str(password).collect();
                    parser.password = (!bytes.is_empty()).then_some(bytes);
                }
                parser.redacted.push_str(&authority[at..]);
                parser.user = parser.decode_text(user, "the user name")?;
                &authority[at + 1..]
            }
            None => {
                parser.redacted.push_str(authority);
                authority
            }
        };

        // The rest of the URL cannot hold the user-info password: redact only `password=`.
        let (path, query) = match tail.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (tail, None),
        };
        parser.redacted.push_str(path);
        if let Some(query) = query {
            parser.redacted.push('?');
            parser.push_redacted_query(query);
        }

        parser.parse_hosts(host_part)?;
        if let Some(dbname) = path.strip_prefix('/') {
            parser.dbname = parser.decode_text(dbname, "the database name")?;
        }
        if let Some(query) = query {
            for pair in query.split('&').filter(|pair| !pair.is_empty()) {
                parser.parse_param(pair)?;
            }
        }
        parser.finish()
    }

    /// Appends the query to the redacted text, hiding every `password` parameter's value, and
    /// the pieces without `=` that follow one (a password with an unencoded `&` splits there).
    fn push_redacted_query(&mut self, query: &str) {
        let mut hiding = false;
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                self.redacted.push('&');
            }
            match pair.split_once('=') {
                Some((key, _)) if decode_lossy(key).trim().eq_ignore_ascii_case("password") => {
                    self.redacted.push_str(key);
                    self.redacted.push('=');
                    self.redacted.push_str(MASK);
                    hiding = true;
                }
                None if hiding && !pair.is_empty() => self.redacted.push_str(MASK),
                // After a password, a piece whose key is no parameter may be the password's
                // tail (`?password=a&b=c`): hidden whole.
                Some((key, _)) if hiding && !is_known_param(&decode_lossy(key)) => {
                    self.redacted.push_str(MASK);
                }
                // Another key, shown as given, with any `password=` inside hidden all the same.
                _ => {
                    hiding = false;
                    self.redacted.push_str(&redact_password_values(pair));
                }
            }
        }
    }

    fn error(&self, reason: impl Into<String>) -> UrlError {
        url_error(self.redacted.clone(), reason)
    }

    /// Percent-decodes a non-secret part that must be UTF-8 text without NUL characters; an empty
    /// part is `None`.
    fn decode_text(&self, raw: &str, what: &str) -> Result<Option<String>, UrlError> {
        let text = percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| self.error(format!("{what} to be UTF-8 once percent-decoded")))?;
        if text.contains('\0') {
            return Err(self.error(format!("{what} without NUL characters")));
        }
        Ok((!text.is_empty()).then(|| text.into_owned()))
    }

    /// `host[:port]` or `[v6addr][:port]`, comma-separated, each with its own port.
    fn parse_hosts(&mut self, host_part: &str) -> Result<(), UrlError> {
        if host_part.is_empty() {
            return Ok(());
        }
        for chunk in host_part.split(',') {
            let (host, port) = if let Some(bracketed) = chunk.strip_prefix('[') {
                let Some((host, after)) = bracketed.split_once(']') else {
                    return Err(self.error("a closing ']' after an IPv6 host address"));
                };
                let port = match after {
                    "" => None,
                    _ => match after.strip_prefix(':') {
                        Some(port) => Some(port),
                        None => {
                            return Err(self.error("':' and a port after an IPv6 ']'"));
                        }
                    },
                };
                (host, port)
            } else {
                match chunk.split_once(':') {
                    Some((host, port)) => (host, Some(port)),
                    None => (chunk, None),
                }
            };
            // An empty entry (`postgresql://:5433`, `h1,`) means the default host, as in libpq.
            let host = if host.is_empty() {
                HostSpec::Tcp("localhost".to_owned())
            } else {
                self.host_spec(host)?
            };
            self.hosts.push(host);
            let port = self.port(port.unwrap_or(""))?;
            self.ports.push(port);
        }
        Ok(())
    }

    /// A host name, IP address, or (starting with `/`, percent-encoded or not) a socket directory.
    fn host_spec(&self, raw: &str) -> Result<HostSpec, UrlError> {
        let bytes: Vec<u8> = percent_decode_str(raw).collect();
        if bytes.first() == Some(&b'/') {
            #[cfg(unix)]
            {
                use std::os::unix::ffi::OsStringExt;
                return Ok(HostSpec::Unix(PathBuf::from(std::ffi::OsString::from_vec(
                    bytes,
                ))));
            }
            #[cfg(not(unix))]
            return Err(self.error("a TCP host: Unix sockets are not available here"));
        }
        match String::from_utf8(bytes) {
            Ok(host) if !host.contains('\0') => Ok(HostSpec::Tcp(host)),
            _ => Err(self.error("a host name that is UTF-8 text once percent-decoded")),
        }
    }

    /// A port number; empty means the default 5432.
    fn port(&self, raw: &str) -> Result<u16, UrlError> {
        let text = decode_lossy(raw);
        if text.is_empty() {
            return Ok(5432);
        }
        match text.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(self.error(format!("a port from 1 to 65535, not {text:?}"))),
        }
    }

    fn parse_param(&mut self, pair: &str) -> Result<(), UrlError> {
        let Some((raw_key, raw_value)) = pair.split_once('=') else {
            // Not quoted: the piece may be the tail of a password cut at an unencoded '&'.
            return Err(self.error(
                "query parameters written key=value, separated by '&' (write an '&' inside a \
                 value as %26)",
            ));
        };
        let key = decode_lossy(raw_key);
        let key = key.as_ref();
        if key == "password" {
            let bytes: Vec<u8> = percent_decode_str(raw_value).collect();
            self.password = (!bytes.is_empty()).then_some(bytes);
            self.after_password = true;
            return Ok(());
        }
        if !is_known_param(key) && self.after_password {
            // Possibly the tail of the password: say so without quoting it.
            return Err(self.error(
                "only known query parameters; one after password= is not (it is not shown, \
                 as it may be part of the password: write an '&' inside a password as %26)",
            ));
        }
        if key == "host" {
            self.hosts.clear();
            for host in raw_value.split(',') {
                if host.is_empty() {
                    return Err(self.error("host= to list host names, without empty entries"));
                }
                let host = self.host_spec(host)?;
                self.hosts.push(host);
            }
            return Ok(());
        }
        let value = percent_decode_str(raw_value).decode_utf8().map_err(|_| {
            self.error(format!(
                "the value of {key:?} to be UTF-8 once percent-decoded"
            ))
        })?;
        let value = value.as_ref();
        let what = |accepted: &str| format!("{key} to be {accepted}, not {value:?}");
        match key {
            "user" => self.user = self.decode_text(raw_value, "the user name")?,
            "dbname" | "database" => {
                self.dbname = self.decode_text(raw_value, "the database name")?;
            }
            "hostaddr" => {
                self.hostaddrs.clear();
                for addr in value.split(',') {
                    let addr = addr
                        .parse::<IpAddr>()
                        .map_err(|_| self.error(what("a comma-separated list of IP addresses")))?;
                    self.hostaddrs.push(addr);
                }
            }
            "port" => {
                self.ports.clear();
                for port in value.split(',') {
                    let port = self.port(port)?;
                    self.ports.push(port);
                }
            }
            "options" => {
                self.config.options(self.no_nul(value, key)?);
            }
            "application_name" => {
                self.application_name = Some(self.no_nul(value, key)?.to_owned());
            }
            "fallback_application_name" => {
                self.fallback_application_name = Some(self.no_nul(value, key)?.to_owned());
            }
            "sslmode" | "ssl" => {
                let lower = value.trim().to_ascii_lowercase();
                let asyncpg = key == "ssl";
                self.ssl_true = false;
                self.ssl_mode = Some(match lower.as_str() {
                    "disable" => SslMode::Disable,
                    "allow" => SslMode::Allow,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    "false" if asyncpg => SslMode::Disable,
                    "true" if asyncpg => {
                        self.ssl_true = true;
                        SslMode::VerifyFull
                    }
                    _ => {
                        return Err(self.error(what(if asyncpg {
                            "disable, allow, prefer, require, verify-ca, verify-full, true or \
                             false"
                        } else {
                            "disable, allow, prefer, require, verify-ca or verify-full"
                        })))
                    }
                });
            }
            "sslrootcert" => {
                self.tls.root_cert = Some(if value == "system" {
                    RootCert::System
                } else {
                    RootCert::File(self.path(raw_value, key)?)
                });
            }
            "sslcert" => self.tls.cert = Some(self.path(raw_value, key)?),
            "sslkey" => self.tls.key = Some(self.path(raw_value, key)?),
            "sslsni" => {
                self.tls.sni = match value.trim() {
                    "1" => true,
                    "0" => false,
                    _ => return Err(self.error(what("1 or 0"))),
                };
            }
            "sslnegotiation" => {
                match value.to_ascii_lowercase().as_str() {
                    "postgres" => {}
                    "direct" => return Err(self.error(
                        "sslnegotiation=postgres: direct TLS negotiation (PostgreSQL 17) is not \
                         supported yet",
                    )),
                    _ => return Err(self.error(what("postgres"))),
                }
            }
            "connect_timeout" | "timeout" => {
                let seconds =
                    finite_number(value).ok_or_else(|| self.error(what("a number of seconds")))?;
                self.connect_timeout = if seconds > 0.0 {
                    Some(
                        Duration::try_from_secs_f64(seconds)
                            .map_err(|_| self.error(what("a smaller number of seconds")))?,
                    )
                } else {
                    None
                };
            }
            "command_timeout" => {
                let seconds = finite_number(value)
                    .filter(|s| *s > 0.0)
                    .ok_or_else(|| self.error(what("a number of seconds greater than 0")))?;
                self.command_timeout = Some(
                    Duration::try_from_secs_f64(seconds)
                        .map_err(|_| self.error(what("a smaller number of seconds")))?,
                );
            }
            "tcp_user_timeout" => {
                let millis = value
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| self.error(what("a whole number of milliseconds")))?;
                if millis > 0 {
                    self.config
                        .tcp_user_timeout(Duration::from_millis(millis as u64));
                }
            }
            "keepalives" => {
                let on = match value.trim().to_ascii_lowercase().as_str() {
                    "1" | "true" | "on" | "yes" => true,
                    "0" | "false" | "off" | "no" => false,
                    _ => return Err(self.error(what("1 or 0"))),
                };
                self.config.keepalives(on);
            }
            "keepalives_idle" | "keepalives_interval" => {
                let seconds = value
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| self.error(what("a whole number of seconds")))?;
                if seconds > 0 {
                    let seconds = Duration::from_secs(seconds as u64);
                    if key == "keepalives_idle" {
                        self.config.keepalives_idle(seconds);
                    } else {
                        self.config.keepalives_interval(seconds);
                    }
                }
            }
            "keepalives_retries" => {
                let retries = value
                    .trim()
                    .parse::<u32>()
                    .map_err(|_| self.error(what("a whole number of at least 0")))?;
                self.config.keepalives_retries(retries);
            }
            "target_session_attrs" => {
                let attrs = match value.to_ascii_lowercase().as_str() {
                    "any" => SessionAttrs::Any,
                    "read-write" => SessionAttrs::ReadWrite,
                    "read-only" => SessionAttrs::ReadOnly,
                    "primary" => SessionAttrs::Primary,
                    "standby" => SessionAttrs::Standby,
                    "prefer-standby" => SessionAttrs::PreferStandby,
                    _ => {
                        return Err(self.error(what(
                            "any, read-write, read-only, primary, standby or prefer-standby",
                        )))
                    }
                };
                self.session_attrs = attrs;
                // For programs that hand `config()` to tokio-postgres: its nearest value.
                self.config.target_session_attrs(match attrs {
                    SessionAttrs::ReadWrite | SessionAttrs::Primary => {
                        TargetSessionAttrs::ReadWrite
                    }
                    SessionAttrs::ReadOnly | SessionAttrs::Standby => TargetSessionAttrs::ReadOnly,
                    SessionAttrs::Any | SessionAttrs::PreferStandby => TargetSessionAttrs::Any,
                });
            }
            "channel_binding" => {
                let binding = match value.to_ascii_lowercase().as_str() {
                    "disable" => ChannelBinding::Disable,
                    "prefer" => ChannelBinding::Prefer,
                    "require" => ChannelBinding::Require,
                    _ => return Err(self.error(what("disable, prefer or require"))),
                };
                self.config.channel_binding(binding);
            }
            "load_balance_hosts" => {
                let balance = match value.to_ascii_lowercase().as_str() {
                    "disable" => LoadBalanceHosts::Disable,
                    "random" => LoadBalanceHosts::Random,
                    _ => return Err(self.error(what("disable or random"))),
                };
                self.config.load_balance_hosts(balance);
            }
            "client_encoding" => {
                let encoding = value.trim().to_ascii_lowercase().replace(['-', '_'], "");
                if encoding != "utf8" && encoding != "unicode" {
                    return Err(self.error(what("UTF8, the only encoding tokio-postgres speaks")));
                }
            }
            "gssencmode" => {
                if !matches!(value.to_ascii_lowercase().as_str(), "disable" | "prefer") {
                    return Err(self.error(what(
                        "disable or prefer (tidepool does not use GSSAPI encryption)",
                    )));
                }
            }
            "prepared_statement_cache_size" | "statement_cache_size" => {
                let size = value
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| self.error(what("a whole number of at least 0")))?;
                self.statement_cache = Some(size > 0);
            }
            "max_cached_statement_lifetime" | "max_cacheable_statement_size" => {
                if !finite_number(value).is_some_and(|n| n >= 0.0) {
                    return Err(self.error(what("a number of at least 0")));
                }
            }
            _ => {
                return Err(self.error(format!(
                    "only known query parameters, and {key:?} is not one (known: {})",
                    KNOWN_PARAMS.join(", ")
                )))
            }
        }
        Ok(())
    }

    /// A file path parameter, percent-decoded (any bytes but NUL).
    fn path(&self, raw: &str, key: &str) -> Result<PathBuf, UrlError> {
        let bytes: Vec<u8> = percent_decode_str(raw).collect();
        if bytes.is_empty() || bytes.contains(&0) {
            return Err(self.error(format!("{key} to be a file path without NUL characters")));
        }
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            Ok(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
        }
        #[cfg(not(unix))]
        match String::from_utf8(bytes) {
            Ok(text) => Ok(PathBuf::from(text)),
            Err(_) => Err(self.error(format!("{key} to be UTF-8 once percent-decoded"))),
        }
    }

    fn no_nul<'v>(&self, value: &'v str, key: &str) -> Result<&'v str, UrlError> {
        if value.contains('\0') {
            Err(self.error(format!("{key} without NUL characters")))
        } else {
            Ok(value)
        }
    }

    fn finish(mut self) -> Result<DatabaseUrl, UrlError> {
        if self.hosts.is_empty() && self.hostaddrs.is_empty() {
            self.hosts.push(HostSpec::Tcp("localhost".to_owned()));
        }
        if !self.hosts.is_empty()
            && !self.hostaddrs.is_empty()
            && self.hosts.len() != self.hostaddrs.len()
        {
            return Err(self.error(format!(
                "as many hostaddr entries as hosts ({}), not {}",
                self.hosts.len(),
                self.hostaddrs.len()
            )));
        }
        let host_count = self.hosts.len().max(self.hostaddrs.len());
        if self.ports.is_empty() {
            self.ports.push(5432);
        }
        if self.ports.len() != 1 && self.ports.len() != host_count {
            return Err(self.error(format!(
                "one port, or one per host ({host_count}), not {}",
                self.ports.len()
            )));
        }
        let Some(user) = self.user.take() else {
            return Err(self.error(
                "a user name, as in postgresql://USER:PASSWORD@host:5432/dbname (or ?user=USER)",
            ));
        };
        let config = &mut self.config;
        config.user(user);
        if let Some(password) = self.password.take() {
            config.password(password);
        }
        if let Some(dbname) = self.dbname.take() {
            config.dbname(dbname);
        }
        for host in self.hosts.drain(..) {
            match host {
                HostSpec::Tcp(host) => config.host(host),
                #[cfg(unix)]
                HostSpec::Unix(path) => config.host_path(path),
                #[cfg(not(unix))]
                HostSpec::Unix(_) => unreachable!("rejected by host_spec"),
            };
        }
        for addr in self.hostaddrs.drain(..) {
            config.hostaddr(addr);
        }
        for port in self.ports.drain(..) {
            config.port(port);
        }
        if let Some(name) = self
            .application_name
            .take()
            .or(self.fallback_application_name.take())
        {
            config.application_name(name);
        }
        if let Some(timeout) = self.connect_timeout {
            config.connect_timeout(timeout);
        }
        let system = self.tls.root_cert == Some(RootCert::System);
        self.tls.mode = match self.ssl_mode {
            // libpq: the system's roots make verify-full the default, and the only mode.
            None if system => SslMode::VerifyFull,
            Some(mode) if system && mode != SslMode::VerifyFull => {
                return Err(self.error(format!(
                    "sslmode=verify-full with sslrootcert=system (a weaker sslmode {:?} would \
                     trust any server)",
                    mode.as_str()
                )));
            }
            Some(mode) => mode,
            None => SslMode::Prefer,
        };
        if self.ssl_true && self.tls.root_cert.is_none() {
            self.tls.root_cert = Some(RootCert::System);
        }
        // For programs that hand `config()` to tokio-postgres themselves: its nearest mode.
        self.config.ssl_mode(match self.tls.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        Ok(DatabaseUrl {
            tls: self.tls,
            config: self.config,
            redacted: self.redacted,
            statement_cache: self.statement_cache,
            connect_timeout: self.connect_timeout,
            command_timeout: self.command_timeout,
            session_attrs: self.session_attrs,
        })
    }
}

fn is_known_param(key: &str) -> bool {
    KNOWN_PARAMS.contains(&key)
}

/// Every query parameter the URL may carry, for the "unknown parameter" message.
const KNOWN_PARAMS: &[&str] = &[
    "application_name",
    "channel_binding",
    "client_encoding",
    "command_timeout",
    "connect_timeout",
    "database",
    "dbname",
    "fallback_application_name",
    "gssencmode",
    "host",
    "hostaddr",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "load_balance_hosts",
    "max_cacheable_statement_size",
    "max_cached_statement_lifetime",
    "options",
    "password",
    "port",
    "prepared_statement_cache_size",
    "ssl",
    "sslcert",
    "sslkey",
    "sslmode",
    "sslnegotiation",
    "sslrootcert",
    "sslsni",
    "statement_cache_size",
    "target_session_attrs",
    "tcp_user_timeout",
    "timeout",
    "user",
];

fn url_error(url: String, reason: impl Into<String>) -> UrlError {
    UrlError {
        url,
        reason: reason.into(),
    }
}

fn decode_lossy(raw: &str) -> std::borrow::Cow<'_, str> {
    percent_decode_str(raw).decode_utf8_lossy()
}

/// `postgresql`, `postgres`, or either with `+driver` (letters, digits, `_`), in any case.
fn scheme_is_postgres(scheme: &str) -> bool {
    let (base, driver) = match scheme.split_once('+') {
        Some((base, driver)) => (base, Some(driver)),
        None => (scheme, None),
    };
    let base_ok = base.eq_ignore_ascii_case("postgresql") || base.eq_ignore_ascii_case("postgres");
    let driver_ok = driver
        .is_none_or(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    base_ok && driver_ok
}

fn finite_number(value: &str) -> Option<f64> {
    value.trim().parse::<f64>().ok().filter(|n| n.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::config::Host;

    fn parse(url: &str) -> DatabaseUrl {
        DatabaseUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn reason(url: &str) -> String {
        match DatabaseUrl::parse(url) {
            Err(UrlError { reason, .. }) => reason,
            Ok(parsed) => panic!("{url}: parsed as {parsed:?}"),
        }
    }

    #[test]
    fn seed_url() {
        let url = parse("postgresql+asyncpg://user:password@localhost:5432/youworker");
        let config = url.config();
        assert_eq!(config.get_user(), Some("user"));
        assert_eq!(config.get_password(), Some(&b"password"[..]));
        assert_eq!(config.get_dbname(), Some("youworker"));
        assert_eq!(config.get_hosts(), &[Host::Tcp("localhost".into())]);
        assert_eq!(config.get_ports(), &[5432]);
        assert_eq!(
            url.redacted(),
            "postgresql+asyncpg://user:***@localhost:5432/youworker"
        );
        assert_eq!(url.to_string(), url.redacted());
        assert_eq!(
            format!("{url:?}"),
            "DatabaseUrl(\"postgresql+asyncpg://user:***@localhost:5432/youworker\")"
        );
        assert_eq!(url.statement_cache(), None);
        assert_eq!(url.connect_timeout(), None);
        assert_eq!(url.application_name(), None);
    }

    #[test]
    fn schemes() {
        for scheme in [
            "postgresql",
            "postgres",
            "postgresql+asyncpg",
            "postgresql+psycopg",
            "postgresql+psycopg2",
            "postgres+pg8000",
            "POSTGRESQL",
        ] {
            let url = parse(&format!("{scheme}://u@h/db"));
            assert_eq!(url.config().get_dbname(), Some("db"), "{scheme}");
        }
        for bad in [
            "mysql://u@h/db",
            "postgresql+://u@h",
            "u@h/db",
            "http://u@h",
            "",
        ] {
            assert!(reason(bad).contains("postgresql://"), "{bad}");
        }
    }

    #[test]
    fn percent_encoded_credentials() {
        let url = parse("postgresql://us%65r:p%40ss%2Fw%3Ard@h/d%62");
        assert_eq!(url.config().get_user(), Some("user"));
        assert_eq!(url.config().get_password(), Some(&b"p@ss/w:rd"[..]));
        assert_eq!(url.config().get_dbname(), Some("db"));
        assert_eq!(url.redacted(), "postgresql://us%65r:***@h/d%62");
    }

    #[test]
    fn raw_at_and_colon_in_password() {
        let url = parse("postgresql://user:p@ss:w@rd@db.example:6432/app");
        assert_eq!(url.config().get_password(), Some(&b"p@ss:w@rd"[..]));
        assert_eq!(url.config().get_hosts(), &[Host::Tcp("db.example".into())]);
        assert_eq!(url.config().get_ports(), &[6432]);
        assert_eq!(url.redacted(), "postgresql://user:***@db.example:6432/app");
    }

    #[test]
    fn ambiguous_at_is_rejected_without_leaking() {
        for url in [
            "postgresql://user:pa/ss@host/db",
            "postgresql://user:12/secret@host/db",
            "postgresql://user:pa?application_name=secret@host/db",
            "postgresql://u@h/db?application_name=a@b",
        ] {
            let err = DatabaseUrl::parse(url).unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("secret"), "{shown}");
            assert!(!shown.contains("pa/ss"), "{shown}");
            assert!(shown.contains("%40"), "{shown}");
        }
    }

    #[test]
    fn defaults_to_localhost() {
        for text in [
            "postgresql://u@",
            "postgresql://u@/db",
            "postgres:///db?user=u",
        ] {
            let url = parse(text);
            assert_eq!(url.config().get_hosts(), &[Host::Tcp("localhost".into())]);
            assert_eq!(url.config().get_ports(), &[5432]);
        }
    }

    #[test]
    fn user_is_required() {
        assert!(reason("postgresql://localhost/db").contains("user name"));
        assert!(reason("postgresql://:secret@localhost/db").contains("user name"));
    }

    #[test]
    fn unix_socket_hosts() {
        let url = parse("postgresql://u@%2Fvar%2Frun%2Fpostgresql/db");
        assert_eq!(
            url.config().get_hosts(),
            &[Host::Unix("/var/run/postgresql".into())]
        );
        let url = parse("postgresql+psycopg://u@/db?host=/tmp/sock&port=5433");
        assert_eq!(url.config().get_hosts(), &[Host::Unix("/tmp/sock".into())]);
        assert_eq!(url.config().get_ports(), &[5433]);
    }

    #[test]
    fn query_overrides_authority() {
        let url = parse("postgresql://u@h:1/db?port=2&host=a&dbname=other&user=v");
        assert_eq!(url.config().get_hosts(), &[Host::Tcp("a".into())]);
        assert_eq!(url.config().get_ports(), &[2]);
        assert_eq!(url.config().get_dbname(), Some("other"));
        assert_eq!(url.config().get_user(), Some("v"));
    }

    #[test]
    fn several_hosts_and_ipv6() {
        let url = parse("postgresql://u@h1:5433,[::1]:5434,h3/db?target_session_attrs=read-write");
        assert_eq!(
            url.config().get_hosts(),
            &[
                Host::Tcp("h1".into()),
                Host::Tcp("::1".into()),
                Host::Tcp("h3".into())
            ]
        );
        assert_eq!(url.config().get_ports(), &[5433, 5434, 5432]);
        assert_eq!(
            url.config().get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        assert!(reason("postgresql://u@[::1/db").contains("']'"));
        assert!(reason("postgresql://u@a,b/db?port=1,2,3").contains("one per host"));
        let url = parse("postgresql://u@:5433,h/db");
        assert_eq!(
            url.config().get_hosts(),
            &[Host::Tcp("localhost".into()), Host::Tcp("h".into())]
        );
        assert_eq!(url.config().get_ports(), &[5433, 5432]);
    }

    #[test]
    fn session_attrs_take_libpq_values() {
        for attrs in [
            SessionAttrs::Any,
            SessionAttrs::ReadWrite,
            SessionAttrs::ReadOnly,
            SessionAttrs::Primary,
            SessionAttrs::Standby,
            SessionAttrs::PreferStandby,
        ] {
            let url = parse(&format!(
                "postgresql://u@a,b/db?target_session_attrs={}",
                attrs.as_str().to_uppercase()
            ));
            assert_eq!(url.session_attrs(), attrs);
        }
        assert_eq!(
            parse("postgresql://u@a/db").session_attrs(),
            SessionAttrs::Any
        );
        assert!(SessionAttrs::Primary.follows_primary());
        assert!(!SessionAttrs::PreferStandby.follows_primary());
        // libpq's other spelling of a host list: host=a,b&port=1,2, Unix directories among them.
        let url = parse("postgresql://u@/db?host=a,/run/pg,b&port=1,2,3");
        assert_eq!(
            url.config().get_hosts(),
            &[
                Host::Tcp("a".into()),
                Host::Unix("/run/pg".into()),
                Host::Tcp("b".into())
            ]
        );
        assert_eq!(url.config().get_ports(), &[1, 2, 3]);
    }

    #[test]
    fn libpq_parameters_pass_through() {
        let url = parse(
            "postgresql://u@h/db?sslmode=require&application_name=api&connect_timeout=7\
             &options=-c%20search_path%3Dapp&keepalives=1&keepalives_idle=30\
             &keepalives_interval=5&keepalives_retries=3&tcp_user_timeout=1500\
             &channel_binding=disable&load_balance_hosts=random&sslnegotiation=postgres\
             &hostaddr=127.0.0.1&client_encoding=UTF8&gssencmode=disable",
        );
        let config = url.config();
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(url.tls().mode, SslMode::Require);
        assert_eq!(config.get_application_name(), Some("api"));
        assert_eq!(url.application_name(), Some("api"));
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(7)));
        assert_eq!(url.connect_timeout(), Some(Duration::from_secs(7)));
        assert_eq!(config.get_options(), Some("-c search_path=app"));
        assert!(config.get_keepalives());
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(
            config.get_keepalives_interval(),
            Some(Duration::from_secs(5))
        );
        assert_eq!(config.get_keepalives_retries(), Some(3));
        assert_eq!(
            config.get_tcp_user_timeout(),
            Some(&Duration::from_millis(1500))
        );
        assert_eq!(config.get_channel_binding(), ChannelBinding::Disable);
        assert_eq!(config.get_load_balance_hosts(), LoadBalanceHosts::Random);
        assert_eq!(
            config.get_hostaddrs(),
            &["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn asyncpg_parameters() {
        let url = parse(
            "postgresql+asyncpg://u@h/x?ssl=disable&prepared_statement_cache_size=0\
             &command_timeout=2.5&timeout=0.5&database=db&max_cached_statement_lifetime=300\
             &max_cacheable_statement_size=15360",
        );
        assert_eq!(url.tls().mode, SslMode::Disable);
        assert_eq!(url.statement_cache(), Some(false));
        assert_eq!(url.command_timeout(), Some(Duration::from_millis(2500)));
        assert_eq!(url.connect_timeout(), Some(Duration::from_millis(500)));
        assert_eq!(url.config().get_dbname(), Some("db"));
        assert_eq!(
            parse("postgresql://u@h?statement_cache_size=0").statement_cache(),
            Some(false)
        );
        assert_eq!(
            parse("postgresql://u@h?statement_cache_size=100").statement_cache(),
            Some(true)
        );
        assert_eq!(
            parse("postgresql://u@h?ssl=prefer").tls().mode,
            SslMode::Prefer
        );
        assert_eq!(
            parse("postgresql://u@h?sslmode=allow").tls().mode,
            SslMode::Allow
        );
        assert_eq!(
            parse("postgresql://u@h?connect_timeout=0").connect_timeout(),
            None
        );
    }

    #[test]
    fn fallback_application_name() {
        let url = parse("postgresql://u@h?fallback_application_name=fb");
        assert_eq!(url.application_name(), Some("fb"));
        let url = parse("postgresql://u@h?fallback_application_name=fb&application_name=app");
        assert_eq!(url.application_name(), Some("app"));
    }

    #[test]
    fn bad_parameters_are_named() {
        let r = reason("postgresql://u@h/db?sslmod=require");
        assert!(r.contains("\"sslmod\" is not one"), "{r}");
        assert!(r.contains("sslmode"), "{r}");
        assert!(reason("postgresql://u@h/db?sslmode=verify-fullest").contains("sslmode"));
        assert!(reason("postgresql://u@h/db?connect_timeout=x").contains("connect_timeout"));
        assert!(reason("postgresql://u@h/db?command_timeout=0").contains("command_timeout"));
        assert!(reason("postgresql://u@h/db?statement_cache_size=-1").contains("at least 0"));
        assert!(reason("postgresql://u@h/db?keepalives=maybe").contains("keepalives"));
        assert!(reason("postgresql://u@h/db?client_encoding=latin1").contains("UTF8"));
        assert!(reason("postgresql://u@h/db?flag").contains("key=value"));
        assert!(reason("postgresql://u@h:99999/db").contains("port"));
        assert!(reason("postgresql://u@h:0/db").contains("port"));
        assert!(reason("postgresql://u@h:abc/db").contains("\"abc\""));
        assert!(reason("postgresql://u@h/db?hostaddr=nope").contains("IP address"));
        assert!(reason("postgresql://u@h/db?application_name=a%00b").contains("NUL"));
        assert!(reason("postgresql://u@h/%FF").contains("UTF-8"));
        assert!(
            reason("postgresql://u@h/db?target_session_attrs=master").contains("prefer-standby")
        );
    }

    #[test]
    fn empty_query_pieces_are_skipped() {
        let url = parse("postgresql://u@h/db?&sslmode=disable&&");
        assert_eq!(url.tls().mode, SslMode::Disable);
    }

    #[test]
    fn password_parameter_is_redacted() {
        let url = parse("postgresql://u@h/db?password=hunter2&sslmode=disable");
        assert_eq!(url.config().get_password(), Some(&b"hunter2"[..]));
        assert_eq!(
            url.redacted(),
            "postgresql://u@h/db?password=***&sslmode=disable"
        );
        let err = DatabaseUrl::parse("postgresql://u@h/db?password=hunter2&bogus=1").unwrap_err();
        assert!(!format!("{err}{err:?}").contains("hunter2"));
        let err = DatabaseUrl::parse("postgresql://u:hunter2@h/db?bogus=1").unwrap_err();
        assert!(!format!("{err}{err:?}").contains("hunter2"));
        let err =
            DatabaseUrl::parse("postgresql://u@h/db?password=hun&ter2&sslmode=x").unwrap_err();
        assert_eq!(
            err,
            UrlError {
                url: "postgresql://u@h/db?password=***&***&sslmode=x".into(),
                reason: "query parameters written key=value, separated by '&' (write an '&' \
                         inside a value as %26)"
                    .into()
            }
        );
    }

    /// `?password=a&b=c`: `b=c` may be the password's tail, so it is never shown or named.
    #[test]
    fn unknown_pieces_after_a_password_are_hidden() {
        let err = DatabaseUrl::parse("postgresql://u@h/db?password=a&b=c").unwrap_err();
        let text = format!("{err}{err:?}");
        assert!(!text.contains("b=c") && !text.contains("\"b\""), "{text}");
        assert_eq!(err.url, "postgresql://u@h/db?password=***&***");
        let url = parse("postgresql://u@h/db?password=a&sslmode=disable");
        assert_eq!(url.tls().mode, SslMode::Disable);
        // Known keys after the password are still shown.
        let url = parse("postgresql://u@h/db?password=a&application_name=b");
        assert_eq!(
            url.redacted(),
            "postgresql://u@h/db?password=***&application_name=b"
        );
    }

    #[test]
    fn tls_parameters() {
        let url = parse(
            "postgresql://u@h/db?sslmode=verify-full&sslrootcert=/etc/ca%20dir/root.pem\
             &sslcert=/c.crt&sslkey=/c.key&sslsni=0",
        );
        let tls = url.tls();
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(
            tls.root_cert,
            Some(RootCert::File("/etc/ca dir/root.pem".into()))
        );
        assert_eq!(tls.cert.as_deref(), Some(std::path::Path::new("/c.crt")));
        assert_eq!(tls.key.as_deref(), Some(std::path::Path::new("/c.key")));
        assert!(!tls.sni);
        assert!(parse("postgresql://u@h").tls().sni);
        assert_eq!(parse("postgresql://u@h").tls().mode, SslMode::Prefer);
        for (text, mode) in [
            ("disable", SslMode::Disable),
            ("allow", SslMode::Allow),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("VERIFY-FULL", SslMode::VerifyFull),
        ] {
            assert_eq!(
                parse(&format!("postgresql://u@h?sslmode={text}"))
                    .tls()
                    .mode,
                mode
            );
            assert_eq!(
                parse(&format!("postgresql://u@h?ssl={text}")).tls().mode,
                mode
            );
        }
        // asyncpg's ssl=True: verify-full against the system's roots, unless a file is given.
        let url = parse("postgresql+asyncpg://u@h?ssl=true");
        assert_eq!(url.tls().mode, SslMode::VerifyFull);
        assert_eq!(url.tls().root_cert, Some(RootCert::System));
        let url = parse("postgresql+asyncpg://u@h?ssl=true&sslrootcert=/ca.pem");
        assert_eq!(url.tls().root_cert, Some(RootCert::File("/ca.pem".into())));
        assert_eq!(
            parse("postgresql://u@h?ssl=false").tls().mode,
            SslMode::Disable
        );
        assert!(reason("postgresql://u@h?sslmode=true").contains("verify-full"));
        // sslrootcert=system: verify-full by default, and nothing weaker.
        let url = parse("postgresql://u@h?sslrootcert=system");
        assert_eq!(url.tls().mode, SslMode::VerifyFull);
        assert_eq!(url.tls().root_cert, Some(RootCert::System));
        let r = reason("postgresql://u@h?sslrootcert=system&sslmode=require");
        assert!(r.contains("verify-full") && r.contains("require"), "{r}");
        assert!(reason("postgresql://u@h?sslnegotiation=direct").contains("not supported"));
        assert!(reason("postgresql://u@h?sslsni=yes").contains("1 or 0"));
        assert!(reason("postgresql://u@h?sslcert=").contains("file path"));
    }

    #[test]
    fn error_mentions_redacted_url() {
        let err = DatabaseUrl::parse("postgresql://u:s3cret@h:abc/db").unwrap_err();
        assert_eq!(
            err,
            UrlError {
                url: "postgresql://u:***@h:abc/db".into(),
                reason: "a port from 1 to 65535, not \"abc\"".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "database URL \"postgresql://u:***@h:abc/db\" is not valid: expected a port from 1 \
             to 65535, not \"abc\""
        );
    }

    #[test]
    fn loose_redaction() {
        assert_eq!(redact_loosely("mysql://u:pw@h/db"), "mysql://u:***@h/db");
        assert_eq!(redact_loosely("u:pa://ss@h"), "u:***@h");
        assert_eq!(redact_loosely("u:p/w@h/x@y"), "u:***@y");
        assert_eq!(
            redact_loosely("host=h password='a b' user=u"),
            "host=h password=*** user=u"
        );
        assert_eq!(
            redact_loosely("x://h/db?PASSWORD = sec&y=1"),
            "x://h/db?PASSWORD = ***&y=1"
        );
        assert_eq!(redact_loosely("no secrets here"), "no secrets here");
        assert_eq!(
            redact_loosely("mysql://@a?password=AAAAA0&000aA0&x=1"),
            "mysql://@a?password=***&x=1"
        );
        assert_eq!(
            redact_loosely("x://@a?password=0aAAaA 00aAaA&&  b;c=1"),
            "x://@a?password=***;c=1"
        );
        assert_eq!(redact_loosely("password"), "password");
        assert_eq!(redact_loosely("password=\"unterminated"), "password=***");
        // A `password=` value holding an '@' and a port colon before it: both rules overlap.
        assert_eq!(
            redact_loosely("postgresql://u@h:1/db?password=Core1@Core2"),
            "postgresql://u@h:***"
        );
        assert_eq!(
            redact_loosely("postgresql://u@h/db?password=Core1@Core2&x=1"),
            "postgresql://u@h/db?password=***&x=1"
        );
    }

    #[test]
    fn from_str_works() {
        let url: DatabaseUrl = "postgres://u@h/db".parse().unwrap();
        assert_eq!(url.config().get_dbname(), Some("db"));
    }
}
