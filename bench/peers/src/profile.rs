//! `peers profile checkout|query`: a small fixed workload for callgrind.
//!
//! Runs on a current_thread runtime, so every instruction the client spends (pool, tokio
//! scheduler and I/O driver, tokio-postgres' connection task) runs on the main thread. Setup
//! (cluster, connecting with SCRAM, warm-up that opens every connection and prepares the
//! statement) happens outside [`peers_measured_region`]; run callgrind with
//! `--toggle-collect=peers_measured_region` and the totals cover exactly the `--ops` timed
//! operations. Instructions per operation = total Ir / ops (the `profile` script does that).

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;

use crate::driver::{drive, Op, Outcome};
use crate::systems::{Handle, Sizing, System, Target};

const NO_CAP: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(clap::Args)]
pub struct Args {
    /// `checkout` (acquire + release, no query) or `query` (`SELECT 1` through the pool).
    what: String,
    /// System to profile (tidepool, tidepool-preping, deadpool, bb8, sqlx, raw-10, ...).
    #[arg(long, default_value = "tidepool")]
    system: String,
    /// Timed operations (default: 100000 for checkout, 20000 for query).
    #[arg(long)]
    ops: Option<u64>,
    /// Tasks (default: 1 for checkout, the uncontended path; 64 for query, W2's shape).
    #[arg(long)]
    tasks: Option<usize>,
    /// Pool size (connections).
    #[arg(long, default_value_t = 10)]
    conns: usize,
    /// Checkout: `none` (release at once) or `yield` (hold across one yield, W3's shape).
    #[arg(long, default_value = "none")]
    hold: String,
    /// Untimed operations before the measured region.
    #[arg(long, default_value_t = 2_000)]
    warmup: u64,
    /// Use this server instead of starting a throwaway cluster
    /// (postgresql://user:password@127.0.0.1:port/db).
    #[arg(long)]
    url: Option<String>,
}

/// The measured part. Not inlined and not mangled, so callgrind's `--toggle-collect` can name it.
#[no_mangle]
#[inline(never)]
pub fn peers_measured_region(
    rt: &tokio::runtime::Runtime,
    fut: Pin<Box<dyn Future<Output = Outcome> + '_>>,
) -> Outcome {
    rt.block_on(fut)
}

pub fn target_from_url(url: &str) -> Result<Target, String> {
    let c = tokio_postgres::Config::from_str(url).map_err(|e| e.to_string())?;
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => return Err("--url needs a TCP host".into()),
    };
    Ok(Target {
        host,
        port: c.get_ports().first().copied().unwrap_or(5432),
        user: c.get_user().unwrap_or("postgres").to_owned(),
        password: c
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default(),
        dbname: c.get_dbname().unwrap_or("postgres").to_owned(),
        tls: None,
    })
}

pub fn main(args: Args) -> ExitCode {
    let Some(system) = System::parse(&args.system) else {
        eprintln!("unknown system {:?}", args.system);
        return ExitCode::from(2);
    };
    let (op, default_ops, default_tasks) = match args.what.as_str() {
        "checkout" => {
            let hold = match args.hold.as_str() {
                "none" => false,
                "yield" => true,
                h => {
                    eprintln!("--hold must be none or yield, not {h:?}");
                    return ExitCode::from(2);
                }
            };
            if system.is_raw() {
                eprintln!("raw-10 has no checkout");
                return ExitCode::from(2);
            }
            (Op::Checkout { hold }, 100_000, 1)
        }
        "query" => (Op::Select1, 20_000, 64),
        w => {
            eprintln!("what to profile: checkout or query, not {w:?}");
            return ExitCode::from(2);
        }
    };
    let ops = args.ops.unwrap_or(default_ops);
    let tasks = args.tasks.unwrap_or(default_tasks);

    let cluster;
    let target = match &args.url {
        Some(url) => match target_from_url(url) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("bad --url: {e}");
                return ExitCode::from(2);
            }
        },
        None => {
            cluster = match tidepool_cluster::Cluster::builder().start() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("cannot start the cluster: {e}");
                    return ExitCode::from(2);
                }
            };
            Target {
                host: cluster.host().to_owned(),
                port: cluster.port(),
                user: cluster.user().to_owned(),
                password: cluster.password().to_owned(),
                dbname: cluster.dbname().to_owned(),
                tls: None,
            }
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let sizing = Sizing {
        size: args.conns,
        overflow: 0,
    };
    let app = format!("peers-profile-{}", system.name());
    let handle = match rt.block_on(Handle::build(system, &target, &app, sizing)) {
        Ok(h) => Arc::new(h),
        Err(e) => {
            eprintln!("cannot build the pool: {e}");
            return ExitCode::from(2);
        }
    };
    // Warm-up with as many tasks as connections (at least): every connection opened, and the
    // statement prepared on each, before the measured region.
    let warm_tasks = tasks.max(args.conns);
    let w = rt.block_on(drive(
        handle.clone(),
        op,
        warm_tasks,
        args.warmup.max(args.conns as u64),
        NO_CAP,
    ));
    if w.errors > 0 {
        eprintln!("warm-up failed: {:?}", w.first_error);
        return ExitCode::from(1);
    }

    if let Handle::Tidepool(pool) = &*handle {
        // Sizes of what the checkout and query paths move around (memcpy in the profile).
        let (get_fut, conn, query_fut) = rt.block_on(async {
            let get_fut = std::mem::size_of_val(&pool.get());
            let c = pool.get().await.expect("checkout");
            let q = std::mem::size_of_val(&c.query_one(crate::systems::SELECT1_SQL, &[]));
            (get_fut, std::mem::size_of_val(&c), q)
        });
        eprintln!(
            "sizes: Pool::get future {get_fut} B, PooledConnection {conn} B, query_one future {query_fut} B, tokio_postgres::Client {} B",
            std::mem::size_of::<tokio_postgres::Client>()
        );
    }
    let outcome =
        peers_measured_region(&rt, Box::pin(drive(handle.clone(), op, tasks, ops, NO_CAP)));

    println!(
        "{}",
        serde_json::json!({
            "system": system.name(),
            "what": args.what,
            "ops": outcome.ops,
            "tasks": tasks,
            "conns": args.conns,
            "hold": args.hold,
            "errors": outcome.errors,
            "wall_s": outcome.wall.as_secs_f64(),
        })
    );
    if let Some(e) = &outcome.first_error {
        eprintln!("errors: {} (first: {e})", outcome.errors);
    }
    if let Ok(h) = Arc::try_unwrap(handle) {
        rt.block_on(h.close());
    }
    drop(rt);
    if outcome.errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
