//! `idem verify`: proves, under injected faults, that idem turns at-least-once delivery into
//! exactly-once effects.
//!
//! The checker itself is the `idem-verify` crate: the bank ledger workload, the fault plan, the
//! in-process at-least-once broker (`idem_broker::memory`) and idem's own consumer runtime
//! (`idem_broker::Consumer`) under the faults, the ledgers that count every effect, and the
//! report. This module gives it its arguments, its stores ([`sql`]: scratch tables on a SQL
//! server; [`faults::FlakyStore`]: store errors), a progress bar ([`progress`]) and the output,
//! in three modes, each on a fresh ledger:
//! - `naive`: no deduplication, to show what the faults do;
//! - `store`: the consumer runtime in store mode over the store; the ledger lives outside it;
//! - `transactional`: the consumer runtime in transactional mode: ledger writes and record in
//!   one transaction (SQLite, PostgreSQL, MySQL).
//!
//! With `--broker`, [`broker`] runs the same workload through a real broker instead, with
//! consumer processes that are really killed, and the same report and checks.

mod broker;
mod failover;
mod faults;
mod ledger;
mod progress;
mod report;
mod sql;
mod workload;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use idem::{Backoff, Config};
use idem_verify::sql::{MysqlLedger, PostgresLedger};
use idem_verify::{
    DEFAULT_RATES, Fault, FaultPlan, Harness, MemoryLedger, PerFault, Report, Sabotage,
    SqliteLedger, Stalls, StoreFailover, Workload, check,
};

use self::failover::Failover;
use self::faults::FlakyStore;
use self::progress::Progress;
use crate::store_url::{OpenOptions, Opened, StoreUrl, redis_wait};

/// A deliberately broken handler (`--sabotage`, a hidden test flag).
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum SabotageArg {
    /// Every 50th message's effect is applied twice by the handler that runs it.
    DoubleApply,
    /// Every 50th message is acked without its effect.
    SkipEffect,
}

impl From<SabotageArg> for Sabotage {
    fn from(s: SabotageArg) -> Self {
        match s {
            SabotageArg::DoubleApply => Sabotage::DoubleApply,
            SabotageArg::SkipEffect => Sabotage::SkipEffect,
        }
    }
}

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
    /// `nats`, `mqtt`, `redis`, `kafka`, `activemq` or `rocketmq` starts a private broker that
    /// verify restarts mid-run (not `kafka`: its quick-to-install brokers keep everything in
    /// memory); a URL (`amqp://…`, `nats://…`, `mqtt://…`, `redis://…`, `kafka://…`,
    /// `stomp://…`, `rocketmq://…`) uses that server (not restarted). Kafka, STOMP and RocketMQ
    /// need idem built with the `kafka`, `stomp` and `rocketmq` features.
    #[arg(long, value_name = "KIND|URL")]
    broker: Option<String>,
    /// With --broker: mean time between SIGKILLs of a random consumer process (0: none)
    /// [default: 1500; 10000 on Kafka, where every kill is a rebalance].
    #[arg(long, value_name = "MS")]
    kill_interval_ms: Option<u64>,
    /// With --broker: mean time between cuts of every connection to the broker (0: none)
    /// [default: 2000].
    #[arg(long, value_name = "MS")]
    cut_interval_ms: Option<u64>,
    /// With --broker: feed the transfers through the transactional outbox instead of a
    /// producer: each message is committed with a business row in a SQLite transaction (a
    /// share rolled back first), and relay processes (`idem relay`), SIGKILLed at random like
    /// the consumers, publish them through the same cuts and broker restarts.
    #[arg(long)]
    outbox: bool,
    /// With --broker: restarts of a private broker per mode [default: 1].
    #[arg(long, value_name = "N")]
    broker_restarts: Option<u32>,
    /// With --broker: how a private broker is restarted [default: kill for redis; term for
    /// nats, mqtt and amqp, which lose or break confirmed messages when killed; see
    /// docs/verify.md].
    #[arg(long, value_enum)]
    restart_signal: Option<broker::RestartSignal>,
    /// With a Redis Cluster store: once a third of store mode's transfers are acked, fail
    /// over the master serving the most slots (`CLUSTER FAILOVER TAKEOVER` on its replica),
    /// then count the completed records the failover lost. Changes the cluster's topology for
    /// good: never against a cluster that serves anything else.
    #[arg(long)]
    failover: bool,
    /// With --failover: first cut the replica off its master (the master refuses its PSYNC
    /// through the default user's ACL, restored after, and drops its replication link) for
    /// this long, and until 30 more transfers were acked (10 s at most): what the master acknowledges
    /// meanwhile never reaches the replica that takes over [default: 0, no cut].
    #[arg(long, value_name = "MS", requires = "failover")]
    failover_lag_ms: Option<u64>,
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
    sabotage: Option<SabotageArg>,
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

pub(crate) use self::broker::{ChildArgs, run_child};

pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("IDEM_LOG") {
        // The runtime's own logs (store errors, nacks...), for a run that needs explaining.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
    if let Some(spec) = args.broker.clone() {
        ensure!(
            !args.failover,
            "--failover fails over the Redis Cluster store of a run without --broker"
        );
        return broker::run(args, &spec).await;
    }
    for (given, flag) in [
        (args.kill_interval_ms.is_some(), "--kill-interval-ms"),
        (args.cut_interval_ms.is_some(), "--cut-interval-ms"),
        (args.broker_restarts.is_some(), "--broker-restarts"),
        (args.restart_signal.is_some(), "--restart-signal"),
        (args.outbox, "--outbox"),
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
    let defaults = Stalls::for_timing(lease, visibility_timeout);
    let stalls = Stalls {
        slow: args.slow_ms.map_or(defaults.slow, Duration::from_millis),
        pause: args.pause_ms.map_or(defaults.pause, Duration::from_millis),
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

    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let url = args
        .store
        .clone()
        .unwrap_or_else(|| StoreUrl::Sqlite(tmp.path().join("verify.db")));
    let mut harness = Harness::new(
        Workload::generate(seed, messages, args.accounts),
        FaultPlan::new(seed, args.rates()),
    );
    harness.consumers = consumers;
    harness.prefetch = args.prefetch;
    harness.lease = lease;
    harness.visibility_timeout = visibility_timeout;
    harness.stalls = stalls;
    harness.timeout = Duration::from_secs(args.timeout_s.unwrap_or(300));
    harness.sabotage = args.sabotage.map(Sabotage::from);
    harness.observer = Some(Arc::new(Progress::default()));

    let (opened, transactional) = open(&url, &harness.run_id).await?;
    let failover = if args.failover {
        Some(Arc::new(failover_plan(&args, &url, &opened)?))
    } else {
        None
    };
    if let Some(f) = &failover {
        harness.observer = Some(Arc::clone(f) as Arc<dyn idem_verify::Observer>);
    }
    let mut store_failover = None;
    let runs = async {
        let mut runs = vec![harness.naive(MemoryLedger::new(&harness.workload)).await?];
        let (seed, rate) = (seed, harness.plan.rate(Fault::StoreError));
        runs.push(with_store!(opened.clone(), store => harness
            .store(store, MemoryLedger::new(&harness.workload), |store, counters| {
                FlakyStore::new(store, seed, rate, counters)
            })
            .await?));
        if let (Some(f), Opened::Redis(store)) = (&failover, &opened) {
            let mut outcome = f.outcome().await.unwrap_or_else(|| StoreFailover {
                error: Some("store mode ended before the failover began".to_owned()),
                ..StoreFailover::default()
            });
            if outcome.error.is_none() {
                let namespace = harness.store_namespace()?;
                outcome.records_lost = failover::records_lost(store, &namespace, messages)
                    .await
                    .context("reading store mode's records back after the failover")?;
            }
            store_failover = Some(outcome);
        }
        if let Some(ledger) = transactional {
            runs.push(match ledger {
                Ledger::Sqlite(l) => harness.transactional(l).await?,
                Ledger::Postgres(l) => harness.transactional(l).await?,
                Ledger::Mysql(l) => harness.transactional(l).await?,
            });
        }
        anyhow::Ok(runs)
    }
    .await;
    // Scratch tables on a SQL server go, whatever happened.
    let cleanup = match (&url, &opened) {
        (StoreUrl::Postgres(u), _) => sql::drop_postgres_scratch(u, &harness.run_id).await,
        (_, Opened::Mysql(store)) => sql::drop_mysql_scratch(store, &harness.run_id).await,
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
        ok: checks.iter().all(|c| c.ok) && store_failover.as_ref().is_none_or(StoreFailover::ok),
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
        store_failover,
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

/// The failover of `--failover`, after checking that the store is a Redis Cluster.
fn failover_plan(args: &Args, url: &StoreUrl, opened: &Opened) -> anyhow::Result<Failover> {
    let cluster = matches!(opened, Opened::Redis(store) if store.is_cluster());
    ensure!(
        cluster,
        "--failover needs a Redis Cluster store (--store redis://HOST:PORT,... of a cluster), \
         not {url}"
    );
    let durability = match redis_wait(&url.with_credentials())? {
        (_, Some((replicas, timeout))) => format!(
            "WAIT {replicas} {} ms after every claim and completion",
            timeout.as_millis()
        ),
        (_, None) => "none (asynchronous replication)".to_owned(),
    };
    Ok(Failover::new(
        url.with_credentials(),
        Duration::from_millis(args.failover_lag_ms.unwrap_or(0)),
        durability,
        Arc::new(Progress::default()),
    ))
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
    // No attempt limit: injected crashes must never exhaust (and dead-letter) a transfer.
    let config = Config::default()
        .max_attempts(0)
        .retry_backoff(Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(500),
        ))
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
