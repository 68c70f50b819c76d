//! `tidepool`: the service and tools over the tidepool pool. A thin shell: every command parses
//! its options, reads the settings from the environment (and `.env`) and hands over to a module.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod doctor;
mod embedded;
mod logging;
mod serve;

/// A PostgreSQL connection pool with SQLAlchemy QueuePool semantics: service and tools.
#[derive(Parser)]
#[command(name = "tidepool", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// HTTP service: /health, /health/database, /metrics.
    Serve(serve::Args),
    /// The seed's load test against a pool built from the settings.
    ///
    /// Exit status: 0 every request succeeded, 1 some failed, 2 could not run, 130/143 stopped
    /// by SIGINT/SIGTERM (the embedded database is removed first).
    Bench(bench::Args),
    /// Checks the connection budget against the live server.
    Doctor(doctor::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::main(args),
        Command::Bench(args) => bench::main(args),
        Command::Doctor(args) => doctor::main(args),
    }
}
