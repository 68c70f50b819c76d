//! Log set-up: human-readable lines by default, JSON lines with `LOG_FORMAT=json`; `RUST_LOG`
//! respected. Logs go to standard output.
//!
//! The filter is `RUST_LOG` when set, `info` otherwise. `DB_ECHO` and `DB_ECHO_POOL` are explicit
//! requests for their records, so they also enable `tidepool::sql=info` and
//! `tidepool::pool=debug` unless `RUST_LOG` says something about those targets itself.

use std::io::IsTerminal;

use tidepool::instrument::{POOL_TARGET, SQL_TARGET};
use tidepool::Settings;
use tracing_subscriber::EnvFilter;

/// How log records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One human-readable line per record (the default; `LOG_FORMAT=text`).
    Text,
    /// One JSON object per line, the event's fields at the top level (`LOG_FORMAT=json`).
    Json,
}

impl Format {
    /// Reads `LOG_FORMAT` (unset or empty: text). The error names the variable.
    pub fn from_env() -> Result<Format, String> {
        let raw = std::env::var("LOG_FORMAT").unwrap_or_default();
        match raw.trim().to_ascii_lowercase().as_str() {
            "" | "text" | "human" | "pretty" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            _ => Err(format!(
                "LOG_FORMAT={raw:?} is not valid: expected text or json"
            )),
        }
    }
}

/// The filter: `RUST_LOG` (or `info`), plus the targets `DB_ECHO` / `DB_ECHO_POOL` ask for. The
/// error names `RUST_LOG`.
pub fn filter(settings: &Settings) -> Result<EnvFilter, String> {
    let rust_log = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let mut directives = rust_log.clone().unwrap_or_else(|| "info".to_string());
    let mentions = |target: &str| rust_log.as_deref().is_some_and(|r| r.contains(target));
    if settings.echo && !mentions(SQL_TARGET) {
        directives.push_str(&format!(",{SQL_TARGET}=info"));
    }
    if settings.echo_pool && !mentions(POOL_TARGET) {
        directives.push_str(&format!(",{POOL_TARGET}=debug"));
    }
    EnvFilter::builder().parse(&directives).map_err(|e| {
        format!(
            "RUST_LOG={:?} is not valid: {e}",
            rust_log.unwrap_or_default()
        )
    })
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(format: Format, filter: EnvFilter) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_target(true);
    // `try_init` only fails when a subscriber is already set (then the first one stays).
    let _ = match format {
        Format::Text => builder
            .with_ansi(std::io::stdout().is_terminal())
            .try_init(),
        Format::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
}
