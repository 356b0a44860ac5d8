//! `idem verify`: proves, under injected faults, that idem turns at-least-once delivery into
//! exactly-once effects.
//!
//! A bank ledger workload ([`workload`]) goes through an at-least-once delivery harness
//! ([`harness`]) to competing consumers ([`consumer`]) that suffer the faults of [`faults`], in
//! three modes, each on a fresh ledger ([`ledger`]):
//! - `naive`: no deduplication, to show what the faults do;
//! - `store`: [`idem::Executor`] over the store; the ledger lives outside it;
//! - `transactional`: [`idem_sqlite::SqliteStore::run_transactional`]: ledger writes and record
//!   in one transaction.
//!
//! Every application of every transfer is counted in the ledger, so duplicates and losses are
//! measured; [`report`] judges them and prints the table or the JSON. See `docs/verify.md`.
//!
//! With `--broker`, [`broker`] runs the same workload through a real broker instead of the
//! harness, with consumer processes that are really killed, and the same report and checks.

mod broker;
mod consumer;
mod faults;
mod harness;
mod ledger;
mod progress;
mod report;
mod sql;
mod workload;

use std::process::ExitCode;
use std::sync::{Arc, Once};
use std::time::Duration;

use anyhow::{Context, ensure};
use idem::{Backoff, Config, Executor, Namespace, State, Store};
use tokio::time::Instant;

use self::consumer::{Mode, Naive, Shared, Stalls, Stats, StoreMode, TransactionalMode};
use self::faults::{Fault, FaultPlan, FlakyStore, PerFault};
use self::harness::{Broker, HarnessQueue};
use self::ledger::{
    MemoryLedger, Sabotage, SimulatedCrash, Snapshot, SqliteLedger, TransactionalLedger,
};
use self::progress::Progress;
use self::report::{Measured, ModeName, Report, RunReport, check};
use self::sql::{MysqlLedger, PostgresLedger};
use self::workload::Workload;
use crate::store_url::{OpenOptions, Opened, StoreUrl};

/// Default fault rates: high enough that, at the default size, every fault hits many times and
/// the naive consumer certainly applies duplicates; low enough that a run takes seconds.
const DEFAULT_RATES: [(Fault, f64); 8] = [
    (Fault::DupPublish, 0.01),
    (Fault::LostAck, 0.01),
    (Fault::CrashBefore, 0.001),
    (Fault::CrashAfterEffect, 0.001),
    (Fault::CrashAfterComplete, 0.001),
    (Fault::Slow, 0.002),
    (Fault::Pause, 0.0001),
    (Fault::StoreError, 0.01),
];

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Transfer messages per mode [default: 100000; 3000 with --broker].
    #[arg(long)]
    messages: Option<u32>,
    /// Accounts in the ledger.
    #[arg(long, default_value_t = 1_000)]
    accounts: u32,
    /// Competing consumers [default: 8; with --broker: 4 consumer processes].
    #[arg(long)]
    consumers: Option<usize>,
    /// Deliveries each consumer holds and processes at once.
    #[arg(long, default_value_t = 32)]
    prefetch: usize,
    /// Seed of the workload and of every fault decision (default: random; the output shows it).
    #[arg(long)]
    seed: Option<u64>,
    /// Store of the store and transactional modes: `sqlite:PATH`, `postgres://…`, `mysql://…`,
    /// `redis://…` or `memory` (the last two: store mode only). PostgreSQL and MySQL runs work
    /// in a scratch schema or tables of their own, dropped at the end. With --broker: SQLite,
    /// or a networked store (store mode only). Default: a SQLite file in a temporary directory.
    #[arg(long, value_name = "URL")]
    store: Option<StoreUrl>,
    /// Run the workload through a real broker instead of the in-process harness: `amqp`,
    /// `nats`, `mqtt` or `redis` starts a private broker that verify restarts mid-run; a URL
    /// (`amqp://…`, `nats://…`, `mqtt://…`, `redis://…`) uses that server (not restarted).
    #[arg(long, value_name = "KIND|URL")]
    broker: Option<String>,
    /// With --broker: mean time between SIGKILLs of a random consumer process (0: none)
    /// [default: 1500].
    #[arg(long, value_name = "MS")]
    kill_interval_ms: Option<u64>,
    /// With --broker: mean time between cuts of every connection to the broker (0: none)
    /// [default: 2000].
    #[arg(long, value_name = "MS")]
    cut_interval_ms: Option<u64>,
    /// With --broker: restarts of a private broker per mode [default: 1].
    #[arg(long, value_name = "N")]
    broker_restarts: Option<u32>,
    /// With --broker: how a private broker is restarted [default: kill for redis; term for
    /// nats, mqtt and amqp, which lose or break confirmed messages when killed; see
    /// docs/verify.md].
    #[arg(long, value_enum)]
    restart_signal: Option<broker::RestartSignal>,
    /// Start every fault rate at 0; the rate flags given still apply.
    #[arg(long)]
    no_faults: bool,
    /// Producer retries: a message is published again [default: 0.01].
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    dup_publish_rate: Option<f64>,
    /// Acks lost on the way to the broker [default: 0.01].
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    lost_ack_rate: Option<f64>,
    /// Consumer crashes before the handler's effect [default: 0.001].
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    crash_before_rate: Option<f64>,
    /// Consumer crashes after the effect, before `complete` [default: 0.001].
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    crash_after_effect_rate: Option<f64>,
    /// Consumer crashes after `complete`, before the ack [default: 0.001].
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    crash_after_complete_rate: Option<f64>,
    /// Handlers slower than the visibility timeout [default: 0.002].
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    slow_rate: Option<f64>,
    /// Consumers frozen past their lease, with no heartbeat [default: 0.0001].
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pause_rate: Option<f64>,
    /// Transient store errors, before or after the operation [default: 0.01].
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    store_error_rate: Option<f64>,
    /// Lease of store-mode claims, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    lease_ms: u64,
    /// The harness's visibility timeout: an unacked delivery comes back after it; with
    /// --broker, the NATS ack wait and the Redis claim idle time [default: 500; 2000 with
    /// --broker].
    #[arg(long)]
    visibility_timeout_ms: Option<u64>,
    /// How long a slow handler takes [default: twice the visibility timeout or twice the
    /// lease, whichever is longer: only the heartbeat keeps its claim].
    #[arg(long)]
    slow_ms: Option<u64>,
    /// How long a paused consumer freezes [default: the lease plus three visibility timeouts].
    #[arg(long)]
    pause_ms: Option<u64>,
    /// Give up on a mode that has not finished after this many seconds [default: 300; 180
    /// with --broker].
    #[arg(long)]
    timeout_s: Option<u64>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Test hook: a deliberately broken handler in store and transactional modes, to prove
    /// that the checker catches it.
    #[arg(long, value_enum, hide = true)]
    sabotage: Option<Sabotage>,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("{rate} is not a rate between 0 and 1"))
    }
}

impl Args {
    fn rates(&self) -> PerFault<f64> {
        let given = [
            (Fault::DupPublish, self.dup_publish_rate),
            (Fault::LostAck, self.lost_ack_rate),
            (Fault::CrashBefore, self.crash_before_rate),
            (Fault::CrashAfterEffect, self.crash_after_effect_rate),
            (Fault::CrashAfterComplete, self.crash_after_complete_rate),
            (Fault::Slow, self.slow_rate),
            (Fault::Pause, self.pause_rate),
            (Fault::StoreError, self.store_error_rate),
        ];
        let mut rates = PerFault::default();
        for ((fault, rate), (_, default)) in given.into_iter().zip(DEFAULT_RATES) {
            let fallback = if self.no_faults { 0.0 } else { default };
            rates.set(fault, rate.unwrap_or(fallback));
        }
        rates
    }
}

/// Everything the three modes share.
struct Common {
    workload: Arc<Workload>,
    plan: FaultPlan,
    consumers: usize,
    prefetch: usize,
    lease: Duration,
    visibility_timeout: Duration,
    stalls: Stalls,
    timeout: Duration,
    sabotage: Option<Sabotage>,
    /// Makes namespaces and ledger rows of this run unique in a shared store.
    run_id: String,
}

pub(crate) use self::broker::{ChildArgs, run_child};

pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(spec) = args.broker.clone() {
        return broker::run(args, &spec).await;
    }
    for (given, flag) in [
        (args.kill_interval_ms.is_some(), "--kill-interval-ms"),
        (args.cut_interval_ms.is_some(), "--cut-interval-ms"),
        (args.broker_restarts.is_some(), "--broker-restarts"),
        (args.restart_signal.is_some(), "--restart-signal"),
    ] {
        ensure!(!given, "{flag} needs --broker");
    }
    let messages = args.messages.unwrap_or(100_000);
    let consumers = args.consumers.unwrap_or(8);
    let visibility_timeout_ms = args.visibility_timeout_ms.unwrap_or(500);
    ensure!(messages > 0, "--messages must be at least 1");
    ensure!(args.accounts >= 2, "--accounts must be at least 2");
    ensure!(
        consumers > 0 && args.prefetch > 0,
        "--consumers and --prefetch must be at least 1"
    );
    ensure!(
        args.lease_ms > 0 && visibility_timeout_ms > 0,
        "--lease-ms and --visibility-timeout-ms must be positive"
    );
    let lease = Duration::from_millis(args.lease_ms);
    let visibility_timeout = Duration::from_millis(visibility_timeout_ms);
    let stalls = Stalls {
        // Past the lease too, so that only the heartbeat keeps the claim.
        slow: args.slow_ms.map_or(
            (visibility_timeout * 2).max(lease * 2),
            Duration::from_millis,
        ),
        pause: args
            .pause_ms
            .map_or(lease + visibility_timeout * 3, Duration::from_millis),
    };
    ensure!(
        stalls.slow > visibility_timeout,
        "--slow-ms must exceed --visibility-timeout-ms, or slow handlers are not slow"
    );
    ensure!(
        stalls.pause > lease + visibility_timeout,
        "--pause-ms must exceed --lease-ms + --visibility-timeout-ms, or no one can take over \
         from a paused consumer"
    );
    // Below 2^53, so that JSON readers that hold numbers as doubles print it back exactly.
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..1 << 53));
    quiet_simulated_crashes();

    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let url = args
        .store
        .clone()
        .unwrap_or_else(|| StoreUrl::Sqlite(tmp.path().join("verify.db")));
    let run_id = format!("{:012x}", fastrand::u64(..) >> 16);
    let common = Common {
        workload: Arc::new(Workload::generate(seed, messages, args.accounts)),
        plan: FaultPlan::new(seed, args.rates()),
        consumers,
        prefetch: args.prefetch,
        lease,
        visibility_timeout,
        stalls,
        timeout: Duration::from_secs(args.timeout_s.unwrap_or(300)),
        sabotage: args.sabotage,
        run_id,
    };

    let (opened, transactional) = open(&url, &common.run_id).await?;
    let runs = async {
        let mut runs = vec![run_naive(&common).await];
        runs.push(with_store!(opened.clone(), store => run_store(store, &common).await?));
        if let Some(ledger) = transactional {
            runs.push(match ledger {
                Ledger::Sqlite(l) => run_transactional(l, &common).await?,
                Ledger::Postgres(l) => run_transactional(l, &common).await?,
                Ledger::Mysql(l) => run_transactional(l, &common).await?,
            });
        }
        anyhow::Ok(runs)
    }
    .await;
    // Scratch tables on a SQL server go, whatever happened.
    let cleanup = match (&url, &opened) {
        (StoreUrl::Postgres(u), _) => sql::drop_postgres_scratch(u, &common.run_id).await,
        (_, Opened::Mysql(store)) => sql::drop_mysql_scratch(store, &common.run_id).await,
        _ => Ok(()),
    };
    let runs = runs?;
    cleanup?;
    let mut skipped = Vec::new();
    if runs.len() < 3 {
        skipped.push(format!(
            "transactional: the {url} store has no transactional mode (SQLite, PostgreSQL and \
             MySQL have one)"
        ));
    }

    let checks: Vec<_> = runs.iter().map(check).collect();
    let report = Report {
        ok: checks.iter().all(|c| c.ok),
        seed,
        messages: u64::from(messages),
        accounts: args.accounts,
        consumers,
        store: url.to_string(),
        temporary_store: args.store.is_none(),
        runs,
        checks,
        skipped,
        broker: None,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_table());
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The transactional ledger of a store that has a transactional mode.
enum Ledger {
    Sqlite(SqliteLedger),
    Postgres(PostgresLedger),
    Mysql(MysqlLedger),
}

/// Opens the store of the store and transactional modes. PostgreSQL and MySQL get a scratch
/// schema or tables of the run's own (created here, dropped by the caller).
async fn open(url: &StoreUrl, run_id: &str) -> anyhow::Result<(Opened, Option<Ledger>)> {
    let config = Config::default()
        .max_attempts(0)
        .name("verify-transactional");
    Ok(match url {
        StoreUrl::Postgres(u) => {
            let store = sql::postgres_scratch(u, run_id)
                .await
                .with_context(|| format!("opening {url}"))?;
            let ledger = PostgresLedger::new(store.clone(), run_id, config);
            (Opened::Postgres(store), Some(Ledger::Postgres(ledger)))
        }
        StoreUrl::Mysql(u) => {
            let store = sql::mysql_scratch(u, run_id)
                .await
                .with_context(|| format!("opening {url}"))?;
            let ledger = MysqlLedger::new(store.clone(), run_id, config);
            (Opened::Mysql(store), Some(Ledger::Mysql(ledger)))
        }
        _ => {
            let opened = url.open(OpenOptions::default()).await?;
            let ledger = match &opened {
                Opened::Sqlite(s) => Some(Ledger::Sqlite(SqliteLedger::new(
                    s.clone(),
                    run_id,
                    config,
                )?)),
                _ => None,
            };
            (opened, ledger)
        }
    })
}

/// Simulated crashes in transactional mode are panics inside the store's transaction (which
/// rolls it back); the default hook would print each one.
fn quiet_simulated_crashes() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<SimulatedCrash>() {
                default(info);
            }
        }));
    });
}

async fn run_naive(common: &Common) -> RunReport {
    let ledger = Arc::new(MemoryLedger::new(&common.workload));
    let mode = Naive {
        workload: Arc::clone(&common.workload),
        ledger: Arc::clone(&ledger),
        stalls: common.stalls,
    };
    let stats = Arc::new(Stats::new(common.workload.transfers.len()));
    let (elapsed, unacked) = drive(ModeName::Naive, common, mode, &stats).await;
    // Naive's only record is the ack: every suspect is a window event.
    let _ = stats.resolve_windows(|_, _| async { Ok(false) }).await;
    RunReport::new(
        ModeName::Naive,
        &common.workload,
        Measured::of(&stats),
        &ledger.snapshot(),
        elapsed,
        unacked,
    )
}

async fn run_store<S: Store>(store: S, common: &Common) -> anyhow::Result<RunReport> {
    let stats = Arc::new(Stats::new(common.workload.transfers.len()));
    let store = Arc::new(FlakyStore::new(
        store,
        common.plan.seed(),
        common.plan.rate(Fault::StoreError),
        Arc::clone(&stats.faults),
    ));
    // No attempt limit: injected crashes must never exhaust (and dead-letter) a transfer.
    let config = Config::default()
        .lease(common.lease)
        .max_attempts(0)
        .retry_backoff(Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(500),
        ))
        .name("verify-store");
    let ledger = Arc::new(MemoryLedger::new(&common.workload));
    let namespace = Namespace::new(format!("verify-store-{}", common.run_id))?;
    let mode = StoreMode {
        exec: Executor::with_config(Arc::clone(&store), config),
        namespace: namespace.clone(),
        workload: Arc::clone(&common.workload),
        ledger: Arc::clone(&ledger),
        stalls: common.stalls,
        sabotage: common.sabotage,
    };
    let (elapsed, unacked) = drive(ModeName::Store, common, mode, &stats).await;
    // A crashed delivery whose completion reached the store before the crash took effect
    // closed its window after all: only the others can cause a duplicate.
    stats
        .resolve_windows(|message, token| {
            let (store, namespace) = (&store, &namespace);
            async move {
                let key = namespace.key(Workload::message_id(message))?;
                let record = store.get(&key).await?;
                Ok(record.is_some_and(|r| r.state == State::Completed && r.token == Some(token)))
            }
        })
        .await
        .context("reading the store's records back")?;
    Ok(RunReport::new(
        ModeName::Store,
        &common.workload,
        Measured::of(&stats),
        &ledger.snapshot(),
        elapsed,
        unacked,
    ))
}

async fn run_transactional<L: TransactionalLedger>(
    ledger: L,
    common: &Common,
) -> anyhow::Result<RunReport> {
    ledger.create(&common.workload).await?;
    let ledger = Arc::new(ledger);
    let mode = TransactionalMode {
        ledger: Arc::clone(&ledger),
        namespace: Namespace::new(format!("verify-tx-{}", common.run_id))?,
        workload: Arc::clone(&common.workload),
        stalls: common.stalls,
        sabotage: common.sabotage,
    };
    let stats = Arc::new(Stats::new(common.workload.transfers.len()));
    let (elapsed, unacked) = drive(ModeName::Transactional, common, mode, &stats).await;
    let snapshot: Snapshot = ledger.snapshot(&common.workload).await?;
    Ok(RunReport::new(
        ModeName::Transactional,
        &common.workload,
        Measured::of(&stats),
        &snapshot,
        elapsed,
        unacked,
    ))
}

/// Publishes the workload (with the producer's retries) into a fresh harness queue and runs the
/// consumers until it is drained or `--timeout-s` passes. Returns the time taken and how many
/// published copies were left unacked (0 when it drained).
async fn drive<M: Mode>(
    name: ModeName,
    common: &Common,
    mode: M,
    stats: &Arc<Stats>,
) -> (Duration, u64) {
    let queue = Arc::new(HarnessQueue::new(common.visibility_timeout));
    let shared = Arc::new(Shared {
        broker: Arc::clone(&queue),
        mode,
        plan: common.plan.clone(),
        stats: Arc::clone(stats),
        prefetch: common.prefetch,
    });
    let total = common.workload.transfers.len() as u64;
    let progress = Progress::start(name.as_str(), total, Arc::clone(stats));
    let start = Instant::now();
    let producer = tokio::spawn(produce(
        Arc::clone(&queue),
        common.plan.clone(),
        Arc::clone(stats),
        total as u32,
        common.visibility_timeout,
    ));
    let mut consumers = tokio::spawn(consumer::run_consumers(shared, common.consumers));
    if tokio::time::timeout(common.timeout, &mut consumers)
        .await
        .is_err()
    {
        consumers.abort();
    }
    producer.abort();
    let elapsed = start.elapsed();
    progress.finish(elapsed).await;
    (elapsed, queue.unacked() as u64)
}

/// The producer: publishes every transfer once, and again when a retry fault hits it (as after a
/// lost publish confirm: the copy arrives up to one visibility timeout later).
async fn produce(
    queue: Arc<HarnessQueue>,
    plan: FaultPlan,
    stats: Arc<Stats>,
    messages: u32,
    spread: Duration,
) {
    for i in 0..messages {
        queue.publish(i, Duration::ZERO);
        if plan.hits(Fault::DupPublish, i, 0) {
            stats.faults.hit(Fault::DupPublish);
            queue.publish(i, spread.mul_f64(plan.detail(Fault::DupPublish, i, 0)));
        }
        if i % 1024 == 1023 {
            tokio::task::yield_now().await;
        }
    }
    queue.close_publishing();
}

#[cfg(test)]
mod tests {
    use clap::{Args as _, Command};

    use super::*;

    #[test]
    fn help_shows_the_real_default_rates() {
        let cmd = Args::augment_args(Command::new("verify"));
        for (fault, rate) in DEFAULT_RATES {
            let flag = format!("{}-rate", fault.name().replace('_', "-"));
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(flag.as_str()))
                .unwrap_or_else(|| panic!("no --{flag}"));
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            assert!(
                help.contains(&format!("[default: {rate}]")),
                "--{flag}: {help}"
            );
        }
    }

    #[test]
    fn no_faults_zeroes_only_the_rates_not_given() {
        let parse = |args: &[&str]| {
            let cmd = Args::augment_args(Command::new("verify"));
            let m = cmd.try_get_matches_from(args).unwrap();
            <Args as clap::FromArgMatches>::from_arg_matches(&m).unwrap()
        };
        let rates = parse(&["verify"]).rates();
        for (fault, rate) in DEFAULT_RATES {
            assert_eq!(rates.get(fault), rate);
        }
        let rates = parse(&["verify", "--no-faults", "--pause-rate", "0.5"]).rates();
        assert_eq!(rates.get(Fault::Pause), 0.5);
        assert_eq!(rates.get(Fault::LostAck), 0.0);
    }
}
