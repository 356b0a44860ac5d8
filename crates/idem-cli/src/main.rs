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
mod duration;
mod exit;
mod migrate;
mod observe;
mod operator;
mod proxy;
mod relay;
mod scratch;
mod url_arg;
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
    /// Show a store's records by state, in-progress claims and stuck ones, or failed keys with
    /// their reasons.
    Inspect(operator::InspectArgs),
    /// Show the record of one key (`namespace:id`).
    Get(operator::GetArgs),
    /// Remove the record of one key, so that its next delivery is processed again.
    Evict(operator::EvictArgs),
    /// Delete records whose retention has ended.
    Purge(operator::PurgeArgs),
    /// Create or upgrade a store's schema (PostgreSQL, MySQL); connecting never does it. Other
    /// stores have nothing to migrate: it says so and succeeds.
    Migrate(migrate::Args),
    /// Consume a queue, subject, topic or stream and run a command or POST to a URL once per
    /// key: exactly-once effects for consumers written in any language (a sidecar).
    Consume(Box<consume::Args>),
    /// Send dead letters back to be processed again once their handler is fixed: clears the
    /// failed record of each one's key and republishes it with the same message id.
    Redrive(Box<consume::RedriveArgs>),
    /// The transactional outbox's relay: publishes the rows applications enqueued in their own
    /// transactions, with their message ids, and marks them sent.
    Relay(Box<relay::RelayArgs>),
    /// Operator commands over an outbox table: stats, dead rows, requeue, migrate.
    Outbox(relay::OutboxArgs),
    /// A reverse proxy that gives an HTTP service in any language `Idempotency-Key` semantics:
    /// a request with a key runs once upstream; retries get the recorded response.
    Proxy(Box<proxy::Args>),
    /// The watchdog of one `idem consume --exec` command (started by consume itself).
    #[command(name = "__exec-guard", hide = true)]
    ExecGuard(consume::GuardArgs),
    /// One consumer process of `idem verify --broker` (started by verify itself).
    #[command(name = "__verify-consumer", hide = true)]
    VerifyConsumer(verify::ChildArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One per running command: no async runtime, no threads it does not need.
    let cli = match cli.command {
        Command::ExecGuard(args) => return consume::run_guard(args),
        command => Cli { command, ..cli },
    };
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
            Command::Redrive(args) => consume::run_redrive(*args).await,
            Command::Relay(args) => relay::run_relay(*args).await,
            Command::Outbox(args) => relay::run_outbox(args).await,
            Command::Proxy(args) => proxy::run(*args).await.map(|()| ExitCode::SUCCESS),
            Command::VerifyConsumer(args) => verify::run_child(args).await,
            Command::ExecGuard(args) => Ok(consume::run_guard(args)),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit::status(&e)
        }
    }
}
