//! Connection set-up: `DB_CONNECT_INIT_SQL` and the [`ConnectHook`], run on every new
//! connection before its first use, and again after `DISCARD ALL` resets it
//! (`DB_POOL_RESET_ON_RETURN=discard`, or a statement on the pool that changed session state),
//! so the set-up holds for every user of every connection. A failing step fails the connect
//! with an error naming it: never a half-set-up connection in the pool.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_postgres::Client;

/// What a [`ConnectHook`] may fail with.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// The future a [`ConnectHook`] returns.
pub type HookFuture<'a> = Pin<Box<dyn Future<Output = Result<(), HookError>> + Send + 'a>>;

type HookFn = dyn for<'a> Fn(&'a Client) -> HookFuture<'a> + Send + Sync;

/// Code run on every new connection before first use (deadpool's `post_create`, sqlx's
/// `after_connect`), after `DB_CONNECT_INIT_SQL`, and again after a `DISCARD ALL`. An error
/// fails the connect ([`crate::Error::Connect`], naming the hook). Cheap to clone.
///
/// ```no_run
/// use tidepool::{ConnectHook, Settings};
///
/// let hook = ConnectHook::new(|client| {
///     Box::pin(async move {
///         client.batch_execute("SET TIME ZONE 'UTC'").await?;
///         Ok(())
///     })
/// });
/// let settings = Settings { on_connect: Some(hook), ..Settings::default() };
/// ```
#[derive(Clone)]
pub struct ConnectHook(Arc<HookFn>);

impl ConnectHook {
    /// A hook from a closure given the new connection's client.
    pub fn new<F>(hook: F) -> Self
    where
        F: for<'a> Fn(&'a Client) -> HookFuture<'a> + Send + Sync + 'static,
    {
        ConnectHook(Arc::new(hook))
    }
}

impl fmt::Debug for ConnectHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConnectHook(..)")
    }
}

/// One connection's set-up: the init statements (split once) and the hook.
#[derive(Clone, Default)]
pub(crate) struct SetUp {
    statements: Vec<Arc<str>>,
    hook: Option<ConnectHook>,
}

/// The step of the set-up that failed, and why.
pub(crate) struct Failed {
    /// `DB_CONNECT_INIT_SQL statement "..."`, or `the on_connect hook`.
    pub(crate) step: String,
    pub(crate) error: SetUpError,
}

/// Why a set-up step failed.
pub(crate) enum SetUpError {
    Sql(tokio_postgres::Error),
    Hook(HookError),
}

impl SetUp {
    /// The set-up for `init_sql` (statements separated by `;`) and `hook`.
    pub(crate) fn new(init_sql: Option<&str>, hook: Option<ConnectHook>) -> Self {
        SetUp {
            statements: init_sql
                .map(split)
                .unwrap_or_default()
                .into_iter()
                .map(Arc::from)
                .collect(),
            hook,
        }
    }

    /// Whether there is anything to run.
    pub(crate) fn is_empty(&self) -> bool {
        self.statements.is_empty() && self.hook.is_none()
    }

    /// Runs the statements in order, then the hook.
    pub(crate) async fn run(&self, client: &Client) -> Result<(), Failed> {
        for (i, statement) in self.statements.iter().enumerate() {
            if let Err(e) = client.batch_execute(statement).await {
                return Err(Failed {
                    step: format!(
                        "DB_CONNECT_INIT_SQL statement {} of {} ({}...)",
                        i + 1,
                        self.statements.len(),
                        head(statement)
                    ),
                    error: SetUpError::Sql(e),
                });
            }
        }
        if let Some(hook) = &self.hook {
            if let Err(e) = (hook.0)(client).await {
                return Err(Failed {
                    step: "the on_connect hook".into(),
                    error: SetUpError::Hook(e),
                });
            }
        }
        Ok(())
    }
}

/// The first two words of a statement, cut before any `=` or quote: enough to say which one
/// failed (`SET search_path`) without showing a value that may be a secret.
fn head(statement: &str) -> String {
    let cut = statement
        .find(['=', '\'', '"', '$'])
        .unwrap_or(statement.len());
    statement[..cut]
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `sql` cut into statements at the semicolons outside quotes ('...', "...", dollar quotes)
/// and comments, each trimmed; empty ones dropped.
fn split(sql: &str) -> Vec<&str> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += 1;
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b'$' => {
                // A dollar quote: $tag$ ... $tag$ (the tag may be empty).
                let tag_end = b[i + 1..]
                    .iter()
                    .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
                    .map(|p| i + 1 + p);
                if let Some(end) = tag_end.filter(|&e| b[e] == b'$') {
                    let tag = &sql[i..=end];
                    match sql[end + 1..].find(tag) {
                        Some(close) => i = end + close + tag.len(),
                        None => i = b.len(),
                    }
                }
            }
            b';' => {
                out.push(sql[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(sql[start.min(sql.len())..].trim());
    out.retain(|s| !s.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn a_failing_statement_is_named_without_its_values() {
        assert_eq!(super::head("SET app.key = 'secret'"), "SET app.key");
        assert_eq!(
            super::head("SELECT set_config('a', 'b', false)"),
            "SELECT set_config("
        );
    }

    #[test]
    fn statements_split_at_top_level_semicolons() {
        assert_eq!(
            split("SET a = 1; SET search_path = app;"),
            ["SET a = 1", "SET search_path = app"]
        );
        assert_eq!(
            split("SELECT 'a;b'; SELECT \"c;d\" -- x;y\n; DO $f$ BEGIN; END $f$; /* ; */ SELECT 1"),
            [
                "SELECT 'a;b'",
                "SELECT \"c;d\" -- x;y",
                "DO $f$ BEGIN; END $f$",
                "/* ; */ SELECT 1"
            ]
        );
        assert!(split("  ;; ").is_empty());
        assert_eq!(split("SELECT $1"), ["SELECT $1"]);
    }
}
