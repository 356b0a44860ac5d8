//! `idem`: exactly-once effects on top of at-least-once message brokers.
//!
//! Commands: `verify` (the exactly-once checker with fault injection), `bench` (throughput
//! against a same-run baseline), the operator commands `inspect`, `get`, `evict`, `purge`,
//! `migrate` (create or upgrade a store's schema), and `consume` (a sidecar that runs a command
//! or POSTs to a URL once per message key, for consumers in any language).

#[macro_use]
mod store_url;

mod bench;
mod consume;
mod migrate;
mod operator;
mod scratch;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "idem",
    version,
    about = "Exactly-once effects on top of at-least-once message brokers",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Worker threads of the async runtime (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Prove exactly-once effects under injected faults: a bank ledger through an at-least-once
    /// queue, with duplicates, crashes, pauses and store errors, in naive, store and
    /// transactional modes. Exits 0 only if idem kept its guarantees.
    Verify(Box<verify::Args>),
    /// Measure throughput of stores through the executor, next to a raw baseline of the same run.
    Bench(bench::Args),
    /// Show a store's records by state, in-progress claims and stuck ones.
    Inspect(operator::InspectArgs),
    /// Show the record of one key (`namespace:id`).
    Get(operator::GetArgs),
    /// Remove the record of one key, so that its next delivery is processed again.
    Evict(operator::EvictArgs),
    /// Delete records whose retention has ended.
    Purge(operator::PurgeArgs),
    /// Create or upgrade a store's schema (PostgreSQL, MySQL); connecting never does it.
    Migrate(migrate::Args),
    /// Consume a queue, subject, topic or stream and run a command or POST to a URL once per
    /// key: exactly-once effects for consumers written in any language (a sidecar).
    Consume(Box<consume::Args>),
    /// One consumer process of `idem verify --broker` (started by verify itself).
    #[command(name = "__verify-consumer", hide = true)]
    VerifyConsumer(verify::ChildArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = cli.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Verify(args) => verify::run(*args).await,
            Command::Bench(args) => bench::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Inspect(args) => operator::inspect(args).await,
            Command::Get(args) => operator::get(args).await,
            Command::Evict(args) => operator::evict(args).await,
            Command::Purge(args) => operator::purge(args).await,
            Command::Migrate(args) => migrate::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Consume(args) => consume::run(*args).await,
            Command::VerifyConsumer(args) => verify::run_child(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
