//! `tidepool serve`: the seed's service. `GET /health` (liveness, no database),
//! `GET /health/database` (the seed's JSON, bounded so it answers within 2 s) and `GET /metrics`
//! (Prometheus text).
//!
//! Start-up: settings (a bad one stops here, naming the variable), logs, the metrics recorder,
//! the listening socket, then the database (`DATABASE_URL`, or an embedded PostgreSQL when it is
//! unset) and the pool. SIGINT or SIGTERM: stop accepting, let in-flight requests finish (at
//! most `--shutdown-timeout` seconds), close the pool, stop and remove the embedded database,
//! exit 0. A second signal exits at once (status 1), still removing the embedded database.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tidepool::axum::HealthCheck;
use tidepool::instrument::{self, CHECKOUT_WAIT, QUERY_DURATION};
use tidepool::{Pool, Settings};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::{embedded, logging};

/// Options of `tidepool serve`.
#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on. Port 0 picks a free port (the address is logged).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8000")]
    pub bind: SocketAddr,
    /// Give every /health/database request its own checkout and SELECT 1 instead of sharing
    /// checks between concurrent requests (each answer comes from a check started after the
    /// request arrived either way).
    #[arg(long)]
    pub health_per_request: bool,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub shutdown_timeout: f64,
}

/// Histogram buckets, in seconds: 100 µs to 30 s.
const BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// How often histogram samples are folded into their buckets, so memory stays flat between
/// scrapes (or with no scraper at all).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// What the handlers share.
#[derive(Clone)]
struct App {
    pool: Pool,
    metrics: PrometheusHandle,
}

impl axum::extract::FromRef<App> for Pool {
    fn from_ref(app: &App) -> Pool {
        app.pool.clone()
    }
}

/// Runs the command.
pub fn main(args: Args) -> ExitCode {
    match run(args) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("tidepool serve: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Everything up to the runtime; errors before logging is set up are returned as messages.
fn run(args: Args) -> Result<ExitCode, String> {
    if !(args.shutdown_timeout.is_finite() && args.shutdown_timeout >= 0.0) {
        return Err(format!(
            "--shutdown-timeout={} is not valid: expected a number of seconds of at least 0",
            args.shutdown_timeout
        ));
    }
    let drain = Duration::from_secs_f64(args.shutdown_timeout.min(86_400.0));
    let settings = Settings::from_env().map_err(|e| e.to_string())?;
    let format = logging::Format::from_env()?;
    logging::init(format, logging::filter(&settings)?);
    if settings.echo {
        tracing::warn!(
            "DB_ECHO=true: every statement is logged with its parameters; this is for development, not for production"
        );
    }
    let metrics = install_metrics()?;
    let listener = std::net::TcpListener::bind(args.bind)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| format!("cannot listen on {}: {e}", args.bind))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let code = runtime.block_on(serve(
        settings,
        listener,
        metrics,
        drain,
        args.health_per_request,
    ));
    // Tasks still running (connection drivers, a request past the drain bound) are dropped.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// Installs the Prometheus recorder. Must happen before the pool is built: the pool registers
/// its metric handles then.
fn install_metrics() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(QUERY_DURATION.into()), &BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(CHECKOUT_WAIT.into()), &BUCKETS))
        .and_then(|b| b.install_recorder())
        .map_err(|e| format!("cannot set up metrics: {e}"))?;
    instrument::describe_metrics();
    Ok(handle)
}

async fn serve(
    settings: Settings,
    listener: std::net::TcpListener,
    metrics: PrometheusHandle,
    drain: Duration,
    per_request: bool,
) -> Result<ExitCode, String> {
    // Signals first, so one that arrives while the embedded database starts is not lost.
    let stop = shutdown_signals()?;

    let database = tokio::task::spawn_blocking(move || embedded::resolve(settings))
        .await
        .map_err(|e| format!("starting the database failed: {e}"))??;
    let result = serve_with(
        &database.settings,
        listener,
        metrics,
        drain,
        per_request,
        stop,
    )
    .await;
    if let Some(cluster) = database.cluster {
        let data_dir = cluster.data_dir().to_path_buf();
        tokio::task::spawn_blocking(move || drop(cluster))
            .await
            .ok();
        tracing::info!(data_dir = %data_dir.display(), "embedded PostgreSQL stopped and removed");
    }
    result.map(|()| {
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

async fn serve_with(
    settings: &Settings,
    listener: std::net::TcpListener,
    metrics: PrometheusHandle,
    drain: Duration,
    per_request: bool,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    if *stop.borrow() {
        return Ok(());
    }
    let pool = Pool::new(settings.clone()).map_err(|e| e.to_string())?;
    log_settings(settings);
    tokio::spawn(warm_up(pool.clone()));
    let upkeep = tokio::spawn(upkeep(metrics.clone()));
    let reload = tokio::spawn(reload_on_hangup(pool.clone()));

    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(|e| format!("cannot listen: {e}"))?;
    let address = listener
        .local_addr()
        .map_err(|e| format!("cannot listen: {e}"))?;
    let listener = Stoppable {
        inner: Some(listener),
        address,
        stop: stop.clone(),
    };
    let database_health = if per_request {
        get(tidepool::axum::database_health)
    } else {
        let check = HealthCheck::new(pool.clone());
        get(move || check.clone().answer())
    };
    let app = Router::new()
        .route("/health", get(health))
        .route("/health/database", database_health)
        .route("/metrics", get(render_metrics))
        .with_state(App {
            pool: pool.clone(),
            metrics,
        });
    let graceful = {
        let mut stop = stop.clone();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    };
    let mut server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(graceful)
            .into_future(),
    );
    tracing::info!(address = %address, "listening on http://{address}");

    let outcome = tokio::select! {
        ended = &mut server => Some(ended),
        _ = stop.wait_for(|s| *s) => None,
    };
    // What is left of the shutdown timeout once the server stopped.
    let mut left = Duration::ZERO;
    let result = match outcome {
        // The server ended without being asked to: an accept error.
        Some(ended) => match ended {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("the HTTP server failed: {e}")),
            Err(e) => Err(format!("the HTTP server failed: {e}")),
        },
        None => {
            tracing::info!(
                drain_s = drain.as_secs_f64(),
                "shutting down: waiting for requests in flight"
            );
            let deadline = tokio::time::Instant::now() + drain;
            match tokio::time::timeout(drain, &mut server).await {
                Ok(_) => {
                    left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    tracing::info!("requests in flight finished")
                }
                Err(_) => {
                    server.abort();
                    tracing::warn!(
                        drain_s = drain.as_secs_f64(),
                        "requests still running after the shutdown timeout: abandoned"
                    );
                }
            }
            Ok(())
        }
    };
    upkeep.abort();
    reload.abort();
    // Connections still checked out (a request the server abandoned) get what is left of the
    // shutdown timeout to come back; then the pool closes.
    if !pool.drain(left).await {
        tracing::warn!("connections still checked out at shutdown: closed anyway");
    }
    // Closed connections send Terminate from their driver tasks: give them a moment to flush it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    tracing::info!("pool closed");
    result
}

/// The listening socket, closed as soon as shutdown is requested: from then on connection
/// attempts are refused by the kernel instead of queueing in a backlog nobody accepts from.
/// Accepted connections get `TCP_NODELAY` (small responses, no Nagle delay).
struct Stoppable {
    inner: Option<tokio::net::TcpListener>,
    address: SocketAddr,
    stop: watch::Receiver<bool>,
}

impl axum::serve::Listener for Stoppable {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let Stoppable {
            inner,
            address,
            stop,
        } = self;
        if let Some(listener) = inner.as_mut() {
            let accepted = tokio::select! {
                accepted = axum::serve::Listener::accept(listener) => Some(accepted),
                _ = stop.wait_for(|s| *s) => None,
            };
            if let Some((io, peer)) = accepted {
                let _ = io.set_nodelay(true);
                return (io, peer);
            }
            close(inner, address);
        }
        // Closed: the server stops calling `accept` once it sees the same shutdown signal.
        std::future::pending().await
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.address)
    }
}

impl Drop for Stoppable {
    /// The server drops its listener when it stops accepting (it may see the signal first).
    fn drop(&mut self) {
        close(&mut self.inner, &self.address);
    }
}

/// Closes the listening socket once.
fn close(listener: &mut Option<tokio::net::TcpListener>, address: &SocketAddr) {
    if listener.take().is_some() {
        tracing::info!(address = %address, "stopped accepting connections");
    }
}

/// A flag raised by the first SIGINT or SIGTERM. A second one exits at once with status 1;
/// `exit` still runs the embedded database's clean-up.
fn shutdown_signals() -> Result<watch::Receiver<bool>, String> {
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot handle SIGINT: {e}"))?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut received = 0;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            received += 1;
            if received == 1 {
                tracing::info!(signal = name, "shutdown requested");
                let _ = tx.send(true);
            } else {
                tracing::warn!(signal = name, "second signal: exiting now");
                std::process::exit(1);
            }
        }
    });
    Ok(rx)
}

fn log_settings(settings: &Settings) {
    let url = settings
        .database_url
        .as_ref()
        .map_or_else(String::new, |u| u.to_string());
    tracing::info!(
        database = %url,
        pool_size = settings.pool_size,
        max_overflow = settings.max_overflow.map_or(-1, |o| o as i64),
        pre_ping = settings.pre_ping,
        pre_ping_window_s = settings.pre_ping_window.as_secs_f64(),
        recycle_s = settings.recycle.map_or(-1.0, |r| r.as_secs_f64()),
        pool_timeout_s = settings.pool_timeout.as_secs_f64(),
        echo = settings.echo,
        echo_pool = settings.echo_pool,
        slow_query_threshold_s = settings.slow_query_threshold.as_secs_f64(),
        slow_query_explain = settings.slow_query_explain,
        leak_threshold_s = settings.leak_threshold.map_or(0.0, |t| t.as_secs_f64()),
        "pool configured"
    );
}

/// Opens `pool_size` connections in the background so the first requests do not pay for them,
/// then checks the connection budget (`tidepool doctor`'s rule, for `DB_INSTANCES` instances of
/// this configuration). A database that is not there yet is only worth a warning (the health
/// endpoint reports it).
async fn warm_up(pool: Pool) {
    match pool.warm_up().await {
        Ok(n) => tracing::debug!(opened = n, "pool warmed up"),
        Err(e) => {
            tracing::warn!(error = %e, "could not open connections at start-up");
            return;
        }
    }
    let instances = pool.settings().instances.unwrap_or(1);
    match tidepool::sizing::startup_check(&pool, instances).await {
        Ok(Some(warning)) => tracing::warn!("{warning}"),
        Ok(None) => tracing::info!(instances, "connection budget fits the server"),
        Err(e) => tracing::warn!(error = %e, "could not check the connection budget"),
    }
}

/// On SIGHUP, reads the settings again (process environment, then `.env`) and resizes the pool
/// to the new `DB_POOL_SIZE`/`DB_MAX_OVERFLOW`. Other settings need a restart.
async fn reload_on_hangup(pool: Pool) {
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot handle SIGHUP: the pool cannot be resized at run time");
        return;
    };
    while hangup.recv().await.is_some() {
        let settings = match Settings::from_env() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "SIGHUP: settings not reloaded");
                continue;
            }
        };
        let before = pool.status();
        match pool.resize(settings.pool_size, settings.max_overflow) {
            Ok(()) => tracing::info!(
                pool_size = settings.pool_size,
                max_overflow = settings.max_overflow.map_or(-1, |o| o as i64),
                was_pool_size = before.pool_size,
                was_max_overflow = before.max_overflow,
                "SIGHUP: pool resized"
            ),
            Err(e) => tracing::warn!(error = %e, "SIGHUP: pool not resized"),
        }
    }
}

async fn upkeep(metrics: PrometheusHandle) {
    let mut every = tokio::time::interval(UPKEEP_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        metrics.run_upkeep();
    }
}

/// `GET /health`: the process is up. Does not touch the database.
async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

/// `GET /metrics`: the pool's figures as of now, plus the histograms and counters recorded as
/// statements ran, in Prometheus text format.
async fn render_metrics(State(app): State<App>) -> impl IntoResponse {
    instrument::record_pool_metrics(&app.pool);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
}
