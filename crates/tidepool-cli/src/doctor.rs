//! `tidepool doctor`: the seed's sizing rules checked against the live server (DESIGN §6, §7).
//!
//! Reads `max_connections`, the reserved slots, the role's connection limit and the connections
//! other applications hold, then prints the budget `instances × (pool_size + max_overflow) ×
//! services + buffer` term by term, the headroom, a verdict and per-instance settings that fit
//! (the arithmetic is [`tidepool::sizing`]).
//!
//! Every server the settings name is checked: each host of `DATABASE_URL` and of
//! `DATABASE_REPLICA_URL` (with the replica pool sizes), one report each.
//!
//! With several servers, the JSON report keeps the first one's fields at the top level and adds
//! `hosts` (every server's report, or its `error`), with the verdict of the whole.
//!
//! Exit status: 0 within budget, 1 over budget (on any host), 2 when it could not check (any
//! host; the others are still reported).

use std::fmt::Write as _;
use std::process::ExitCode;

use serde::Serialize;
use tidepool::sizing::{seed_pool_size, Budget, Deployment, ServerLimits};
use tidepool::{Pool, Settings};

/// Options of `tidepool doctor`.
#[derive(clap::Args)]
pub struct Args {
    /// Processes or replicas running this configuration [default: DB_INSTANCES, else 1].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub instances: Option<u32>,
    /// Services using the database with these settings (e.g. API + background tasks = 2).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub services: u32,
    /// Connections kept spare for administration, migrations and tools.
    #[arg(long, default_value_t = 20)]
    pub buffer: u32,
    /// CPU cores of the database server, for the seed's `cores × 2 + spindles` rule of thumb.
    #[arg(long, value_name = "C")]
    pub db_cores: Option<u32>,
    /// Effective spindle count of the database server (1 for an SSD) [default: 1].
    #[arg(long, value_name = "S", requires = "db_cores")]
    pub spindles: Option<u32>,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// The seed's rule of thumb, when `--db-cores` is given.
#[derive(Debug, Serialize)]
struct SeedRule {
    db_cores: u32,
    spindles: u32,
    /// `cores × 2 + spindles`: connections the server serves well, for the whole deployment.
    connections: u32,
    /// That divided among `instances × services`: a per-instance `DB_POOL_SIZE`.
    pool_size_per_instance: u32,
}

/// The JSON report.
#[derive(Debug, Serialize)]
struct Report {
    /// Where the check connected (password hidden).
    target: String,
    verdict: &'static str,
    server: ServerLimits,
    #[serde(flatten)]
    budget: Budget,
    seed_rule: Option<SeedRule>,
}

/// Runs the command.
pub fn main(args: Args) -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => return cannot_check(format!("invalid settings: {e}")),
    };
    if let Err(e) = crate::bench::init_tracing(&settings) {
        return cannot_check(e);
    }
    let Some(url) = settings.database_url.clone() else {
        return cannot_check(
            "DATABASE_URL is not set: point it at the server the deployment uses".to_owned(),
        );
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return cannot_check(format!("cannot start the async runtime: {e}")),
    };
    let check = Settings {
        pool_size: 1,
        max_overflow: Some(0),
        pre_ping: false,
        ..settings.clone()
    };
    let hosts = match Pool::per_host(check) {
        Ok(hosts) => hosts,
        Err(e) => return cannot_check(format!("invalid settings: {e}")),
    };
    let instances = args.instances.or(settings.instances).unwrap_or(1).max(1);
    let several = hosts.len() > 1;
    let mut reports = Vec::new();
    let mut unchecked = Vec::new();
    for (host, replica, pool) in hosts {
        let role = if replica { "replica" } else { "primary" };
        let limits = match runtime.block_on(read_limits(&pool)) {
            Ok(limits) => limits,
            Err(e) if several => {
                // The other hosts are still checked; the run ends with exit 2.
                eprintln!("tidepool doctor: could not check {host} ({role}): {e}");
                unchecked.push(Unchecked {
                    target: format!("{host} ({role})"),
                    error: e.to_string(),
                });
                continue;
            }
            Err(e) => {
                return cannot_check(format!("cannot read the server's limits at {url}: {e}"))
            }
        };
        let (pool_size, max_overflow) = if replica {
            (
                settings.replica_pool_size.unwrap_or(settings.pool_size),
                settings
                    .replica_max_overflow
                    .unwrap_or(settings.max_overflow),
            )
        } else {
            (settings.pool_size, settings.max_overflow)
        };
        let deployment = Deployment {
            instances,
            services: args.services,
            buffer: args.buffer,
            pool_size,
            max_overflow,
        };
        let budget = Budget::compute(&deployment, &limits);
        let seed_rule = args.db_cores.map(|cores| {
            let spindles = args.spindles.unwrap_or(1);
            let connections = seed_pool_size(cores, spindles);
            SeedRule {
                db_cores: cores,
                spindles,
                connections,
                pool_size_per_instance: (connections
                    / instances.saturating_mul(args.services).max(1))
                .max(1),
            }
        });
        reports.push(Report {
            target: if several {
                format!("{host} ({role})")
            } else {
                url.redacted().to_owned()
            },
            verdict: if budget.within_budget {
                "within budget"
            } else {
                "over budget"
            },
            server: limits,
            budget,
            seed_rule,
        });
    }
    let within = reports.iter().all(|r| r.budget.within_budget);
    let verdict = if !unchecked.is_empty() {
        "could not check"
    } else if within {
        "within budget"
    } else {
        "over budget"
    };
    if args.json {
        let text = if several {
            // The first server's report at the top level (as with one server), the verdict of
            // the whole, and every server's report or why it could not be checked.
            let mut top = reports
                .first()
                .and_then(|r| serde_json::to_value(r).ok())
                .unwrap_or_else(|| serde_json::json!({}));
            let mut hosts: Vec<serde_json::Value> = reports
                .iter()
                .filter_map(|r| serde_json::to_value(r).ok())
                .collect();
            hosts.extend(
                unchecked
                    .iter()
                    .filter_map(|u| serde_json::to_value(u).ok()),
            );
            top["verdict"] = verdict.into();
            top["hosts"] = hosts.into();
            serde_json::to_string(&top)
        } else {
            serde_json::to_string(&reports[0])
        };
        match text {
            Ok(text) => println!("{text}"),
            Err(e) => return cannot_check(format!("cannot encode the report: {e}")),
        }
    } else {
        for report in &reports {
            if several {
                println!("== {} ==", report.target);
            }
            print!("{}", report.human());
        }
        for u in &unchecked {
            println!("== {} ==\ncould not check: {}", u.target, u.error);
        }
    }
    if !unchecked.is_empty() {
        ExitCode::from(2)
    } else if within {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// A server that could not be checked, in the report of several.
#[derive(Debug, Serialize)]
struct Unchecked {
    target: String,
    error: String,
}

fn cannot_check(message: String) -> ExitCode {
    eprintln!("tidepool doctor: could not check: {message}");
    ExitCode::from(2)
}

/// Connects once (failing at once when the server is unreachable, instead of waiting out
/// `DB_POOL_TIMEOUT`) and reads the limits.
async fn read_limits(pool: &Pool) -> Result<ServerLimits, tidepool::Error> {
    pool.warm_up().await?;
    let limits = {
        let conn = pool.get().await?;
        ServerLimits::read(&conn).await
    };
    pool.close();
    limits
}

impl Report {
    /// The table for a person.
    fn human(&self) -> String {
        let b = &self.budget;
        let l = &self.server;
        let d = &b.deployment;
        let mut s = String::new();
        let row = |s: &mut String, label: &str, value: &dyn std::fmt::Display| {
            let _ = writeln!(s, "  {label:<42} {value:>10}");
        };
        let _ = writeln!(
            s,
            "tidepool doctor: {} (PostgreSQL {})",
            self.target, l.server_version
        );
        let _ = writeln!(s);
        let _ = writeln!(s, "server");
        row(&mut s, "max_connections", &l.max_connections);
        row(
            &mut s,
            "- superuser_reserved_connections",
            &l.superuser_reserved_connections,
        );
        if let Some(reserved) = l.reserved_connections {
            row(&mut s, "- reserved_connections", &reserved);
        }
        row(&mut s, "= slots for applications", &b.application_slots);
        row(&mut s, "- held by other applications", &b.other_connections);
        for group in l.connections.iter().filter(|g| !l.is_this_application(g)) {
            let name = if group.application_name.is_empty() {
                "(no application_name)"
            } else {
                group.application_name.as_str()
            };
            row(
                &mut s,
                &format!("    {name} (role {})", group.role),
                &group.count,
            );
        }
        let role = format!("role {} connection limit", l.role);
        match b.role_connection_limit {
            Some(limit) => {
                row(&mut s, &role, &limit);
                row(
                    &mut s,
                    "- its connections from other applications",
                    &b.other_connections_same_role,
                );
            }
            None if l.role_superuser => row(&mut s, &role, &"superuser"),
            None => row(&mut s, &role, &"unlimited"),
        }
        row(&mut s, "= available to this deployment", &b.available);
        if b.own_connections > 0 {
            let _ = writeln!(
                s,
                "  ({} connection(s) already open as {:?}: this application's, inside its budget)",
                b.own_connections, l.application_name
            );
        }
        if l.role_superuser {
            let _ = writeln!(
                s,
                "  (a superuser may also take the reserved slots; the budget never counts on them)"
            );
        }
        let _ = writeln!(s);
        let overflow = d
            .max_overflow
            .map_or_else(|| "unlimited".to_owned(), |o| o.to_string());
        let per_instance = b
            .per_instance
            .map_or_else(|| "unbounded".to_owned(), |c| c.to_string());
        let required = b
            .required
            .map_or_else(|| "unbounded".to_owned(), |r| r.to_string());
        let _ = writeln!(
            s,
            "budget: instances × (pool_size + max_overflow) × services + buffer"
        );
        row(&mut s, "instances", &d.instances);
        row(
            &mut s,
            "× (DB_POOL_SIZE + DB_MAX_OVERFLOW)",
            &format!("({} + {overflow})", d.pool_size),
        );
        row(&mut s, "  = per instance", &per_instance);
        row(&mut s, "× services", &d.services);
        row(&mut s, "+ buffer", &d.buffer);
        row(&mut s, "= required", &required);
        let headroom = b.headroom.map_or_else(|| "-".to_owned(), |h| h.to_string());
        row(&mut s, "headroom (available - required)", &headroom);
        let _ = writeln!(s);
        if b.within_budget {
            let _ = writeln!(
                s,
                "verdict: within budget ({required} of {} available connections)",
                b.available
            );
        } else if b.required.is_none() {
            let _ = writeln!(
                s,
                "verdict: OVER BUDGET: DB_MAX_OVERFLOW=-1 lets every instance open any number of \
                 connections; {} available",
                b.available
            );
        } else {
            let _ = writeln!(
                s,
                "verdict: OVER BUDGET: {required} connections required, {} available",
                b.available
            );
        }
        match b.recommended {
            Some(r) if b.within_budget => {
                let _ = writeln!(
                    s,
                    "recommended per instance: keep DB_POOL_SIZE={} DB_MAX_OVERFLOW={} (at most {} per \
                     instance would fit)",
                    r.pool_size, r.max_overflow, b.max_per_instance
                );
            }
            Some(r) => {
                let _ = writeln!(
                    s,
                    "recommended per instance: DB_POOL_SIZE={} DB_MAX_OVERFLOW={} ({} connections, \
                     1 : 2 as in the seed; {} × {} × {} + {} = {} ≤ {})",
                    r.pool_size,
                    r.max_overflow,
                    r.pool_size + r.max_overflow,
                    d.instances,
                    r.pool_size + r.max_overflow,
                    d.services,
                    d.buffer,
                    u64::from(d.instances) * (r.pool_size + r.max_overflow) * u64::from(d.services)
                        + u64::from(d.buffer),
                    b.available
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "recommended: nothing fits; lower --instances, --services or --buffer, free \
                     connections, or raise max_connections"
                );
            }
        }
        if let Some(rule) = &self.seed_rule {
            let _ = writeln!(
                s,
                "seed rule of thumb: cores × 2 + spindles = {} × 2 + {} = {} connections for the \
                 server; per instance (÷ {} × {}): DB_POOL_SIZE={}",
                rule.db_cores,
                rule.spindles,
                rule.connections,
                d.instances,
                d.services,
                rule.pool_size_per_instance
            );
        }
        s
    }
}
