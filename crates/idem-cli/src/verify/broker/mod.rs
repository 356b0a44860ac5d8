//! `idem verify --broker`: the ledger workload through a real broker, with real faults.
//!
//! For each mode (naive, store, transactional, one after the other, each on its own queue):
//! 1. `verify` declares the mode's queue (stream, group, MQTT sessions) with the adapter;
//! 2. starts `--consumers` consumer **processes** (`idem __verify-consumer`, [`child`]), each
//!    connected through `verify`'s TCP [`proxy`];
//! 3. publishes the transfers through the proxy with the adapter's producer, each with its
//!    message id set once; a failed publish is retried with the same id (a real producer
//!    retry: it may store a duplicate), and a planned share of the transfers is published a
//!    second time later (a retry after a lost confirm, past NATS's dedup window);
//! 4. meanwhile SIGKILLs consumer processes at random times and starts them again
//!    ([`fleet`]), cuts every connection through the proxy at random times, and restarts the
//!    broker (a private one, [`server`]); the consumers also SIGKILL themselves at planned crash
//!    points;
//! 5. once every transfer is acked, nothing has moved for longer than any redelivery delay and
//!    the broker holds nothing more, stops the consumers gracefully and checks that the broker
//!    is empty;
//! 6. counts every effect from durable evidence (the consumers' logs, [`log`], or the SQLite
//!    ledger in transactional mode) and judges the mode with the same rule as the embedded run.

mod child;
mod fleet;
mod log;
mod ops;
mod outbox;
mod proxy;
mod server;
mod spec;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use idem::{AnyStore, Config, Namespace, State, Store, Token};
use idem_broker::{BrokerKind, Outgoing};
use tokio::task::JoinSet;
use tokio::time::Instant;

pub(crate) use self::child::{ChildArgs, run as run_child};
use self::fleet::Fleet;
use self::log::Tally;
use self::ops::Producer;
use self::proxy::Proxy;
use self::server::{PrivateBroker, Stop};
use self::spec::{BrokerSpec, BrokerUrl, ConsumerSpec, Names, Settings};
use super::Args;
use super::faults::{Fault, FaultPlan, PerFault};
use super::ledger::{Snapshot, SqliteLedger, TransactionalLedger};
use super::report::{
    BrokerFaults, BrokerInfo, Measured, ModeName, OutboxFaults, Report, RequiredFaults, RunReport,
    WindowEvents, check,
};
use super::workload::Workload;
use crate::store_url::{OpenOptions, Opened, StoreUrl};

/// Defaults of a run through a broker: small enough for well under a minute per broker on the
/// 2-core development machine, large enough that every fault hits several times.
const DEFAULT_MESSAGES: u32 = 3_000;
const DEFAULT_CONSUMERS: usize = 4;
const DEFAULT_REDELIVERY_MS: u64 = 2_000;
const DEFAULT_KILL_INTERVAL_MS: u64 = 1_500;
/// Kafka: every kill is a rebalance of the group (the dead member keeps its partitions for the
/// session timeout, then everyone rejoins, about 3 s on tansu), so random kills come less often
/// or the group never settles long enough to consume.
const DEFAULT_KAFKA_KILL_INTERVAL_MS: u64 = 10_000;
const DEFAULT_CUT_INTERVAL_MS: u64 = 2_000;
const DEFAULT_TIMEOUT_S: u64 = 180;
/// Concurrent publishers.
const PUBLISHERS: usize = 4;

/// How the parent's monitor looks at the run.
const TICK: Duration = Duration::from_millis(50);

/// Signal that restarts a private broker (`--restart-signal`).
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum RestartSignal {
    /// SIGKILL: a crash.
    Kill,
    /// SIGTERM: a shutdown.
    Term,
}

/// Everything the modes of one run share.
struct Env {
    /// The broker's own URL (verify's declarations and probes go there directly).
    url: BrokerUrl,
    proxy: Proxy,
    /// The broker's URL through the proxy (consumers and producers).
    proxy_url: BrokerUrl,
    private: Option<Arc<Mutex<PrivateBroker>>>,
    workload: Arc<Workload>,
    plan: FaultPlan,
    seed: u64,
    run_id: String,
    dir: PathBuf,
    /// The store URL as given (with its credentials), for the consumer processes.
    store_url: StoreUrl,
    settings: Settings,
    consumers: usize,
    kill_every: Option<Duration>,
    cut_every: Option<Duration>,
    restarts: u32,
    timeout: Duration,
    /// `--outbox`: the transfers go through the transactional outbox and relay processes.
    outbox: bool,
}

impl Env {
    /// No delivery may come back later than this after the last activity: the redelivery
    /// delay (NATS ack wait, Redis claim idle), a lease a dead consumer left behind, plus
    /// slack.
    fn quiet(&self) -> Duration {
        self.settings.redelivery().max(self.settings.lease()) + Duration::from_millis(1500)
    }
}

fn ms(flag: Option<u64>, default: u64, no_faults: bool) -> Option<Duration> {
    match flag {
        Some(0) => None,
        Some(n) => Some(Duration::from_millis(n)),
        None if no_faults => None,
        None => Some(Duration::from_millis(default)),
    }
}

pub(crate) async fn run(args: Args, broker: &str) -> anyhow::Result<ExitCode> {
    // On ctrl-c the run is dropped, and with it the consumer processes (killed on drop) and
    // the private broker (killed on drop): nothing is left running.
    tokio::select! {
        result = run_verify(args, broker) => result,
        _ = tokio::signal::ctrl_c() => {
            bail!("interrupted: the consumer processes and the private broker were stopped")
        }
    }
}

async fn run_verify(args: Args, broker: &str) -> anyhow::Result<ExitCode> {
    let spec = BrokerSpec::parse(broker)?;
    for (given, flag) in [
        (args.lost_ack_rate.is_some(), "--lost-ack-rate"),
        (args.slow_rate.is_some(), "--slow-rate"),
        (args.pause_rate.is_some(), "--pause-rate"),
        (args.store_error_rate.is_some(), "--store-error-rate"),
        (args.slow_ms.is_some(), "--slow-ms"),
        (args.pause_ms.is_some(), "--pause-ms"),
        (args.sabotage.is_some(), "--sabotage"),
    ] {
        ensure!(
            !given,
            "{flag} is a simulated fault of the embedded run; with --broker the faults are \
             real: --kill-interval-ms, --cut-interval-ms, --broker-restarts, \
             --dup-publish-rate and the --crash-*-rate flags"
        );
    }
    ensure!(
        !(args.outbox && args.dup_publish_rate.is_some()),
        "--dup-publish-rate has no effect with --outbox: the relays publish, and a row goes out \
         again only with its own message id (after a relay was killed before its mark)"
    );
    let messages = args.messages.unwrap_or(DEFAULT_MESSAGES);
    let consumers = args.consumers.unwrap_or(DEFAULT_CONSUMERS);
    ensure!(messages > 0, "--messages must be at least 1");
    ensure!(args.accounts >= 2, "--accounts must be at least 2");
    ensure!(
        consumers > 0 && args.prefetch > 0,
        "--consumers and --prefetch must be at least 1"
    );
    let redelivery_ms = args.visibility_timeout_ms.unwrap_or(DEFAULT_REDELIVERY_MS);
    ensure!(
        args.lease_ms > 0 && redelivery_ms >= 100,
        "--lease-ms must be positive and --visibility-timeout-ms at least 100"
    );
    // Below 2^53, so that JSON readers that hold numbers as doubles print it back exactly.
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..1 << 53));
    let rates = args.rates();
    let settings = Settings {
        lease_ms: args.lease_ms,
        redelivery_ms,
        prefetch: args.prefetch,
        crash_before_rate: rates.get(Fault::CrashBefore),
        crash_after_effect_rate: rates.get(Fault::CrashAfterEffect),
        crash_after_complete_rate: rates.get(Fault::CrashAfterComplete),
    };
    let mut plan_rates = PerFault::default();
    for f in [
        Fault::DupPublish,
        Fault::CrashBefore,
        Fault::CrashAfterEffect,
        Fault::CrashAfterComplete,
    ] {
        plan_rates.set(f, rates.get(f));
    }

    let dir = tempfile::Builder::new()
        .prefix("idem-verify-")
        .tempdir()
        .context("creating a temporary directory")?;
    let store_url = args
        .store
        .clone()
        .unwrap_or_else(|| StoreUrl::Sqlite(dir.path().join("verify.db")));
    ensure!(
        store_url != StoreUrl::Memory,
        "--store memory cannot be shared by consumer processes; use a SQLite file or a \
         networked store"
    );
    let opened = store_url.open(OpenOptions::default()).await?;

    let (url, private) = match &spec.url {
        Some(url) => (url.clone(), None),
        None => {
            let (kind, prefetch) = (spec.kind, args.prefetch);
            let b = tokio::task::spawn_blocking(move || PrivateBroker::start(kind, prefetch))
                .await
                .context("starting the broker")??;
            (BrokerUrl::parse(&b.url())?, Some(Arc::new(Mutex::new(b))))
        }
    };
    let restart_signal = args.restart_signal.map(|s| match s {
        RestartSignal::Kill => Stop::Kill,
        RestartSignal::Term => Stop::Term,
    });
    if let (Some(b), Some(stop)) = (&private, restart_signal) {
        b.lock().unwrap_or_else(|e| e.into_inner()).stop = stop;
    }
    let target = proxy::target(url.expose()).await?;
    let advertised = private.as_ref().and_then(|b| {
        b.lock()
            .unwrap_or_else(|e| e.into_inner())
            .advertised_port()
    });
    let proxy = Proxy::start_on(advertised.unwrap_or(0), target)
        .await
        .context("starting the proxy")?;
    let proxy_url = BrokerUrl::parse(&proxy::via(url.expose(), proxy.addr)?)?;
    let memory_only = private
        .as_ref()
        .is_some_and(|b| !b.lock().unwrap_or_else(|e| e.into_inner()).persistent());
    if memory_only && args.broker_restarts.is_some_and(|n| n > 0) {
        bail!(
            "--broker-restarts: the private {} broker keeps everything in memory, so a restart \
             would lose what it confirmed; it is never restarted",
            spec.kind.broker_name()
        );
    }
    let restarts = match (&private, args.broker_restarts) {
        (None, _) => 0,
        (Some(_), _) if memory_only => 0,
        (Some(_), Some(n)) => n,
        (Some(_), None) if args.no_faults => 0,
        (Some(_), None) => 1,
    };
    let env = Env {
        url: url.clone(),
        proxy,
        proxy_url,
        private,
        workload: Arc::new(Workload::generate(seed, messages, args.accounts)),
        plan: FaultPlan::new(seed, plan_rates),
        seed,
        run_id: format!("{:012x}", fastrand::u64(..) >> 16),
        dir: dir.path().to_owned(),
        store_url: store_url.clone(),
        settings,
        consumers,
        kill_every: ms(
            args.kill_interval_ms,
            if spec.kind == BrokerKind::Kafka {
                DEFAULT_KAFKA_KILL_INTERVAL_MS
            } else {
                DEFAULT_KILL_INTERVAL_MS
            },
            args.no_faults,
        ),
        cut_every: ms(
            args.cut_interval_ms,
            DEFAULT_CUT_INTERVAL_MS,
            args.no_faults,
        ),
        restarts,
        timeout: Duration::from_secs(args.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S)),
        outbox: args.outbox,
    };

    let sqlite = match &opened {
        Opened::Sqlite(s) => Some(s.clone()),
        _ => None,
    };
    let store = with_store!(opened, s => AnyStore::new(s));
    let mut runs = Vec::new();
    let mut skipped = Vec::new();
    for mode in [ModeName::Naive, ModeName::Store, ModeName::Transactional] {
        if mode == ModeName::Transactional && sqlite.is_none() {
            skipped.push(format!(
                "transactional: the {store_url} store has no transactional mode"
            ));
            continue;
        }
        let run = run_mode(&env, mode, &store, sqlite.as_ref()).await?;
        if spec.url.is_some() {
            // Not our server: leave nothing behind.
            let names = Names::new(&env.run_id, mode);
            let cleanup = ops::cleanup(&env.url, &names, &env.settings, env.consumers);
            match tokio::time::timeout(Duration::from_secs(30), cleanup).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    eprintln!(
                        "warning: could not remove {} from the broker: {e:#}",
                        names.base
                    );
                }
                Err(_) => eprintln!(
                    "warning: could not remove {} from the broker: no answer in 30 s",
                    names.base
                ),
            }
        }
        runs.push(run);
    }

    let checks: Vec<_> = runs.iter().map(check).collect();
    let total = |f: fn(&BrokerFaults) -> u64| {
        runs.iter()
            .filter_map(|r| r.broker.as_ref())
            .map(f)
            .sum::<u64>()
    };
    let info = BrokerInfo {
        kind: spec.kind.as_str(),
        url: url.to_string(),
        private: env.private.is_some(),
        restart: env
            .private
            .as_ref()
            .filter(|_| env.restarts > 0)
            .map(|b| b.lock().unwrap_or_else(|e| e.into_inner()).stop.name()),
        note: match &env.private {
            Some(b) if memory_only => format!(
                "private {}; it keeps everything in memory, so it is not restarted (no broker \
                 restart in this run: consumer kills, each a rebalance, and connection cuts only)",
                b.lock().unwrap_or_else(|e| e.into_inner()).describe()
            ),
            Some(b) => format!(
                "private {}",
                b.lock().unwrap_or_else(|e| e.into_inner()).describe()
            ),
            None => format!(
                "a running server that verify did not start, so it is not restarted (no \
                 broker restart in this run); `--broker {}` starts a private one that is",
                spec.kind
            ),
        },
        consumer_processes: consumers,
        broker_restarts: total(|b| b.broker_restarts),
        consumer_kills: total(|b| b.consumer_kills),
        connection_drops: total(|b| b.connection_drops),
    };
    let report = Report {
        ok: checks.iter().all(|c| c.ok),
        seed,
        messages: u64::from(messages),
        accounts: args.accounts,
        consumers,
        store: store_url.to_string(),
        temporary_store: args.store.is_none(),
        runs,
        checks,
        skipped,
        broker: Some(info),
        store_failover: None,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_table());
    }
    if !report.ok {
        // Evidence for a post-mortem.
        eprintln!(
            "verify failed: the consumers' logs are kept in {}",
            dir.keep().display()
        );
        if let Some(b) = &env.private {
            let kept = b.lock().unwrap_or_else(|e| e.into_inner()).keep();
            eprintln!(
                "the broker's data and output are kept in {}",
                kept.display()
            );
        }
    }
    // The private broker goes with `env`.
    drop(env);
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Retries `f` for up to 60 s (the broker may be starting).
async fn retrying<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout(Duration::from_secs(20), f()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if Instant::now() >= deadline => return Err(e.context(what.to_owned())),
            Err(_) if Instant::now() >= deadline => bail!("{what}: timed out"),
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// Exponentially distributed delay with mean `mean`: faults at random, memoryless times.
fn exp(rng: &mut fastrand::Rng, mean: Duration) -> Duration {
    mean.mul_f64(-(1.0 - rng.f64()).ln())
        .max(Duration::from_millis(20))
}

async fn run_mode(
    env: &Env,
    mode: ModeName,
    store: &AnyStore,
    sqlite: Option<&idem_sqlite::SqliteStore>,
) -> anyhow::Result<RunReport> {
    let names = Names::new(&env.run_id, mode);
    let workload = &env.workload;
    let messages = workload.transfers.len();
    retrying("declaring the queue on the broker", || async {
        ops::declare(&env.url, &names, &env.settings, env.consumers)
            .await
            .map_err(anyhow::Error::from)
    })
    .await?;
    let ledger = match (mode, sqlite) {
        (ModeName::Transactional, Some(s)) => {
            let ledger = SqliteLedger::new(
                s.clone(),
                &env.run_id,
                Config::default()
                    .max_attempts(0)
                    .name("verify-transactional"),
            )?;
            ledger.create(workload).await?;
            Some(ledger)
        }
        _ => None,
    };
    let store_for_consumers = match (mode, sqlite) {
        (ModeName::Transactional, Some(s)) => s
            .path()
            .context("the transactional ledger needs a SQLite file")?
            .to_string_lossy()
            .into_owned(),
        (ModeName::Store, _) => env.store_url.with_credentials(),
        _ => String::new(),
    };
    let spec = ConsumerSpec {
        url: env.proxy_url.expose().to_owned(),
        names: names.clone(),
        mode,
        store: store_for_consumers,
        run_id: env.run_id.clone(),
        seed: env.seed,
        messages: u32::try_from(messages).unwrap_or(u32::MAX),
        accounts: workload.accounts,
        settings: env.settings,
    };
    let spec_path = env.dir.join(format!("{}.json", mode.as_str()));
    std::fs::write(&spec_path, serde_json::to_vec(&spec)?)
        .with_context(|| format!("writing {}", spec_path.display()))?;

    let mut tally = Tally::new(messages);
    let mode_seed = env.seed.wrapping_add(mode as u64 + 1);
    let mut fleet = Fleet::start(
        &spec_path,
        &spec.store,
        &env.dir,
        mode.as_str(),
        env.consumers,
        mode_seed,
        &mut tally,
    )?;
    let start = Instant::now();
    let deadline = start + env.timeout;
    let counters = Arc::new(ProducerCounters::default());
    let (producer, feed, mut relays) = if env.outbox {
        let feed =
            outbox::Feed::create(&env.dir, mode.as_str(), names.destination(env.url.kind()))?;
        let relays = outbox::Relays::start(
            &feed,
            env.proxy_url.expose(),
            &env.dir,
            mode.as_str(),
            outbox::RELAYS,
            mode_seed ^ 0x5eed,
        )?;
        let producer = tokio::spawn(feed.produce(Arc::clone(workload), mode_seed, deadline));
        (producer, Some(feed), Some(relays))
    } else {
        let producer = tokio::spawn(produce(
            env.proxy_url.clone(),
            names.clone(),
            Arc::clone(workload),
            env.plan.clone(),
            deadline,
            Arc::clone(&counters),
        ));
        (producer, None, None)
    };
    let mut rng = fastrand::Rng::with_seed(mode_seed);
    let mut next_kill = env.kill_every.map(|m| start + exp(&mut rng, m));
    // Acked transfers at the last random kill: the next one waits for progress since, so that
    // kills never come faster than the consumers recover (on Kafka every kill is a rebalance
    // of seconds, and a loaded machine could otherwise keep the group rebalancing forever).
    let mut acked_at_kill = None;
    let mut next_cut = env.cut_every.map(|m| start + exp(&mut rng, m));
    let mut drops = 0u64;
    let mut last_cut = start;
    let mut restarts = 0u64;
    let mut restarting: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
    let mut next_probe = start;
    let mut probe_error = None;
    let mut status = Status::new(mode);
    let mut rounds = 0;
    let mut leftover;
    let timed_out = loop {
        let timed_out = loop {
            tokio::time::sleep(TICK).await;
            fleet.poll(&mut tally)?;
            if let Some(r) = &mut relays {
                r.poll()?;
            }
            tally.read();
            let now = Instant::now();
            if now >= deadline {
                break true;
            }
            if restarting.as_ref().is_some_and(|t| t.is_finished())
                && let Some(task) = restarting.take()
            {
                task.await.context("restarting the broker")??;
                restarts += 1;
                fleet.last_event = Instant::now();
            }
            let progress = tally.acked_count as f64 / messages as f64;
            let work_left = !tally.all_delivered() || !producer.is_finished();
            if env.kill_every.is_some() {
                let forced = fleet.random_kills == 0 && (progress >= 0.5 || !work_left);
                let due = work_left
                    && next_kill.is_some_and(|t| now >= t)
                    && acked_at_kill.is_none_or(|a| tally.acked_count > a);
                // With the outbox, a relay is killed once a quarter of the transfers is
                // committed (the relays are busy then), and random kills hit relays or
                // consumers.
                let relay_forced = match (&relays, &feed) {
                    (Some(r), Some(f)) => {
                        r.kills == 0
                            && f.counters.committed.load(Ordering::Relaxed) * 4 >= messages as u64
                    }
                    _ => false,
                };
                let killed = match relays.as_mut() {
                    Some(r) if relay_forced => r.kill_random(),
                    Some(r) if due && !forced && rng.bool() => r.kill_random(),
                    _ => (forced || due) && fleet.kill_random(),
                };
                if killed && (forced || due) {
                    next_kill = env.kill_every.map(|m| now + exp(&mut rng, m));
                }
                if killed {
                    acked_at_kill = Some(tally.acked_count);
                }
            }
            if env.cut_every.is_some() {
                let forced = drops == 0 && (progress >= 0.25 || !work_left);
                let due = work_left && next_cut.is_some_and(|t| now >= t);
                if forced || due {
                    if env.proxy.cut() > 0 {
                        drops += 1;
                        last_cut = now;
                    }
                    next_cut = env.cut_every.map(|m| now + exp(&mut rng, m));
                }
            }
            if let Some(b) = &env.private
                && restarting.is_none()
                && restarts < u64::from(env.restarts)
            {
                let at = (restarts + 1) as f64 / (f64::from(env.restarts) + 1.0);
                if progress >= at || !work_left {
                    let b = Arc::clone(b);
                    restarting = Some(tokio::task::spawn_blocking(move || {
                        b.lock().unwrap_or_else(|e| e.into_inner()).restart()
                    }));
                }
            }
            status.show(&tally, &fleet, drops, restarts, messages);
            let faults_done = restarting.is_none()
                && restarts >= u64::from(env.restarts)
                && (env.kill_every.is_none() || fleet.random_kills > 0)
                && (env.kill_every.is_none() || relays.as_ref().is_none_or(|r| r.kills > 0))
                && (env.cut_every.is_none() || drops > 0);
            let last = tally.last_activity.max(fleet.last_event).max(last_cut);
            if !work_left
                && faults_done
                && fleet.all_ready(&tally)
                && now.duration_since(last) >= env.quiet()
                && now >= next_probe
            {
                next_probe = now + Duration::from_millis(500);
                match ops::backlog(&env.url, &names, &env.settings).await {
                    Ok(Some(0) | None) => break false,
                    Ok(Some(_)) => {}
                    Err(e) => probe_error = Some(format!("{e:#}")),
                }
            }
        };
        fleet.stop(Duration::from_secs(10)).await;
        tally.read();
        leftover = ops::leftover(
            &env.url,
            &names,
            &env.settings,
            env.consumers,
            Duration::from_secs(1),
        )
        .await;
        match &leftover {
            Ok(0) => break timed_out,
            // Something came back late (or the probe failed): consume on, while time lasts.
            _ if !timed_out && rounds < 3 => {
                rounds += 1;
                fleet.restart_all(&mut tally)?;
            }
            _ => break timed_out,
        }
    };
    status.finish();
    if let Some(r) = &mut relays {
        r.stop(Duration::from_secs(5)).await;
    }
    if let Some(task) = restarting.take() {
        task.abort();
    }
    let elapsed = start.elapsed();
    if !producer.is_finished() {
        producer.abort();
    }
    let produced = producer.await.unwrap_or_default();

    let mut errors = Vec::new();
    errors.extend(produced.errors);
    errors.extend(fleet.errors.iter().cloned());
    let outbox = match (&feed, &relays) {
        (Some(feed), Some(r)) => {
            errors.extend(r.errors.iter().cloned());
            let (sent, left) = match feed.counts().await {
                Ok(counts) => counts,
                Err(e) => {
                    errors.push(format!("reading the outbox at the end: {e:#}"));
                    (0, 0)
                }
            };
            Some(OutboxFaults {
                relays: outbox::RELAYS,
                committed: feed.counters.committed.load(Ordering::Relaxed),
                rolled_back: feed.counters.rolled_back.load(Ordering::Relaxed),
                relay_kills: r.kills,
                sent,
                left,
            })
        }
        _ => None,
    };
    errors.extend(tally.errors.iter().cloned());
    let leftover = match leftover {
        Ok(n) => n,
        Err(e) => {
            errors.push(format!("cannot read what the broker still holds: {e:#}"));
            0
        }
    };
    if timed_out {
        errors.push(format!(
            "the run did not settle within --timeout-s ({} s)",
            env.timeout.as_secs()
        ));
        if let Some(e) = probe_error {
            errors.push(format!("last backlog probe: {e}"));
        }
    }
    let crash_points = tally.crash_points();
    let planned: u64 = crash_points.values().sum();
    if fleet.self_kills > planned {
        errors.push(format!(
            "{} consumer processes died of SIGKILL without reaching a planned crash point",
            fleet.self_kills - planned
        ));
    }

    // Window events: effects whose ack was never logged, unless their own completion is the
    // one the store kept.
    let namespace = Namespace::new(format!("verify-store-{}", env.run_id))?;
    let mut window = WindowEvents::default();
    let mut windows_by_message = BTreeMap::new();
    for s in tally.suspects() {
        let closed = match mode {
            ModeName::Store => {
                let key = namespace.key(Workload::message_id(s.msg))?;
                let record = store
                    .get(&key)
                    .await
                    .context("reading the store's records back")?;
                record.is_some_and(|r| {
                    r.state == State::Completed && r.token == Some(Token::from_raw(s.token))
                })
            }
            _ => false,
        };
        if !closed {
            *windows_by_message.entry(s.msg).or_insert(0) += 1;
            if fleet.killed.contains(&s.incarnation) {
                window.crashes += 1;
            } else {
                window.other += 1;
            }
        }
    }

    let snapshot = match &ledger {
        Some(ledger) => ledger.snapshot(workload).await?,
        None => Snapshot {
            balances: workload.balances(|i| tally.effects[i]),
            applied: tally.effects.clone(),
        },
    };
    let (deliveries, duplicate_deliveries) = tally.delivery_counts();
    let mut faults: BTreeMap<&'static str, u64> = [
        Fault::DupPublish,
        Fault::CrashBefore,
        Fault::CrashAfterEffect,
        Fault::CrashAfterComplete,
    ]
    .into_iter()
    .map(|f| (f.name(), crash_points.get(f.name()).copied().unwrap_or(0)))
    .collect();
    faults.insert(
        Fault::DupPublish.name(),
        counters.dup_publish.load(Ordering::Relaxed),
    );
    let mut outcomes: BTreeMap<&'static str, u64> = BTreeMap::new();
    for (kind, n) in &tally.outcomes {
        let name: &'static str = match kind.as_str() {
            "acked" => "acked",
            "nacked" => "nacked",
            "ack_failed" => "ack_failed",
            "executed" => "executed",
            "replayed" => "replayed",
            "in_progress" => "in_progress",
            "released" => "released",
            "lease_lost" => "lease_lost",
            "store_error" => "store_error",
            _ => "other",
        };
        *outcomes.entry(name).or_default() += n;
    }
    let applied: u64 = tally.effects.iter().map(|&e| u64::from(e)).sum();
    match mode {
        ModeName::Naive => {
            outcomes.insert("applied", applied);
        }
        ModeName::Store => {
            outcomes.insert("executed", applied);
        }
        ModeName::Transactional => {}
    }
    let measured = Measured {
        deliveries,
        duplicate_deliveries,
        window,
        windows_by_message,
        takeovers: tally.takeovers,
        consumer_restarts: fleet.spawned.saturating_sub(env.consumers as u64),
        dead_letters: tally.dead_letters,
        faults,
        outcomes,
        errors,
        broker: Some(BrokerFaults {
            broker_restarts: restarts,
            consumer_kills: fleet.random_kills + fleet.self_kills,
            random_kills: fleet.random_kills,
            connection_drops: drops,
            producer_retries: counters.retries.load(Ordering::Relaxed),
            published: counters.published.load(Ordering::Relaxed),
            broker_dropped_duplicates: counters.dropped.load(Ordering::Relaxed),
            outbox,
            required: RequiredFaults {
                kills: env.kill_every.is_some(),
                restarts: env.restarts > 0,
                drops: env.cut_every.is_some(),
            },
        }),
    };
    let unacked = leftover;
    Ok(RunReport::new(
        mode, workload, measured, &snapshot, elapsed, unacked,
    ))
}

/// What the producer did, readable while it runs.
#[derive(Debug, Default)]
struct ProducerCounters {
    published: AtomicU64,
    retries: AtomicU64,
    dropped: AtomicU64,
    dup_publish: AtomicU64,
}

#[derive(Debug, Default)]
struct Produced {
    errors: Vec<String>,
}

/// Publishes every transfer once, and a planned share of them a second time a little later,
/// with `PUBLISHERS` producers in parallel; every failed attempt is retried with the same
/// message until `deadline`.
async fn produce(
    url: BrokerUrl,
    names: Names,
    workload: Arc<Workload>,
    plan: FaultPlan,
    deadline: Instant,
    counters: Arc<ProducerCounters>,
) -> Produced {
    let messages = workload.transfers.len() as u32;
    let mut tasks = JoinSet::new();
    for first in 0..PUBLISHERS as u32 {
        let (url, names, workload, plan, counters) = (
            url.clone(),
            names.clone(),
            Arc::clone(&workload),
            plan.clone(),
            Arc::clone(&counters),
        );
        tasks.spawn(async move {
            let producer = retrying("connecting the producer", || async {
                Producer::connect(&url, &names)
                    .await
                    .map_err(anyhow::Error::from)
            })
            .await?;
            let mut later = std::collections::BinaryHeap::new();
            let publish = |i: u32| {
                let msg = Outgoing::with_id(Workload::message_id(i), workload.payload(i));
                publish_until_confirmed(&producer, msg, deadline, &counters)
            };
            for i in (first..messages).step_by(PUBLISHERS) {
                publish(i).await?;
                if plan.hits(Fault::DupPublish, i, 0) {
                    counters.dup_publish.fetch_add(1, Ordering::Relaxed);
                    // Past NATS's dedup window, as a retry after a long-lost confirm.
                    let delay = Duration::from_millis(150)
                        + Duration::from_secs(1).mul_f64(plan.detail(Fault::DupPublish, i, 0));
                    later.push(std::cmp::Reverse((Instant::now() + delay, i)));
                }
                while let Some(std::cmp::Reverse((at, i))) = later.peek().copied() {
                    if at > Instant::now() {
                        break;
                    }
                    later.pop();
                    publish(i).await?;
                }
            }
            while let Some(std::cmp::Reverse((at, i))) = later.pop() {
                tokio::time::sleep_until(at).await;
                publish(i).await?;
            }
            anyhow::Ok(())
        });
    }
    let mut produced = Produced::default();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                produced.errors.push(format!("producer: {e:#}"));
            }
            Err(e) => produced.errors.push(format!("producer task: {e}")),
        }
    }
    produced
}

async fn publish_until_confirmed(
    producer: &Producer,
    msg: Outgoing,
    deadline: Instant,
    counters: &ProducerCounters,
) -> anyhow::Result<()> {
    let backoff = idem::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let mut attempts = 0;
    loop {
        match producer.publish_once(&msg).await {
            Ok(p) => {
                counters.published.fetch_add(1, Ordering::Relaxed);
                if p.dropped_as_duplicate {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(());
            }
            Err(e) => {
                attempts += 1;
                if Instant::now() >= deadline || (!e.is_transient() && attempts >= 30) {
                    return Err(anyhow::Error::from(e))
                        .with_context(|| format!("publishing {} ({attempts} attempts)", msg.id()));
                }
                // The same message, same id: if the broker did store the failed attempt, this
                // is a duplicate, as with any producer that retries.
                counters.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff.delay(attempts)).await;
            }
        }
    }
}

/// A status line on stderr while a mode runs, when stderr is a terminal.
struct Status {
    mode: ModeName,
    on: bool,
    next: Instant,
}

impl Status {
    fn new(mode: ModeName) -> Self {
        Self {
            mode,
            on: std::io::stderr().is_terminal(),
            next: Instant::now(),
        }
    }

    fn show(&mut self, tally: &Tally, fleet: &Fleet, drops: u64, restarts: u64, total: usize) {
        if !self.on || Instant::now() < self.next {
            return;
        }
        self.next = Instant::now() + Duration::from_millis(250);
        eprint!(
            "\r\x1b[2K{:<13} {}/{} acked  {} deliveries  kills {}  drops {}  restarts {}",
            self.mode.as_str(),
            tally.acked_count,
            total,
            tally.delivery_counts().0,
            fleet.random_kills + fleet.self_kills,
            drops,
            restarts
        );
    }

    fn finish(&self) {
        if self.on {
            eprint!("\r\x1b[2K");
        }
    }
}
