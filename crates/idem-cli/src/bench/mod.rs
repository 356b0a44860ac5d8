//! `idem bench`: throughput of the executor over a store, next to a raw baseline measured in
//! the same run.
//!
//! Profiles (the handler is a no-op; the payload is 64 bytes):
//! - `sequential`: one message at a time on one task: claim, handler, complete; then the same
//!   ids again, all duplicates.
//! - `concurrent`: `--concurrency` tasks, each taking `--batch` messages at a time through
//!   `Executor::run_batch` (one claim round trip and one completion round trip per batch).
//!
//! Modes: `store` (the default: `idem::Executor` over the store), and for SQL servers
//! `transactional` (the record written in the handler's own transaction, begun and committed by
//! idem) and `transactional-caller` (PostgreSQL: inside a transaction the caller owns); see
//! `postgres` and `mysql`.
//!
//! Baselines write the same rows without idem: for PostgreSQL and MySQL, see their modules; for
//! SQLite, plain SQL on a second database with
//! the same schema and settings (an `INSERT ... ON CONFLICT DO NOTHING` for the claim and an
//! `UPDATE` for the completion, committed one statement at a time in `sequential`, `--batch`
//! rows per transaction in `concurrent`); for memory, a hand-written sharded `HashMap`; for
//! MySQL, plain statements through `mysql_async` on the same server (see `bench/mysql.rs`).
//! Redis, the naive `SET NX` claim + `SET` completion loop on the store's own connection
//! (pipelined in batches in `concurrent`). Redis runs delete what they wrote afterwards.
//!
//! When stderr is not a terminal (CI), a line every `--heartbeat` (10 s) says which store and
//! profile run and how many messages they measured so far, so that logs never stay silent for
//! the minutes a run can take.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use idem::{Executor, Fingerprint, Namespace, Outcome, Store};
use idem_sqlite::Synchronous;
use serde::Serialize;

use crate::duration;
use crate::store_url::{Location, OpenOptions, Opened, StoreUrl};

mod memory;
mod mysql;
mod postgres;
mod redis;
mod sqlite;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Store to measure (repeatable): `memory`, `sqlite:PATH`, `redis://HOST[:PORT]/DB` (use a
    /// scratch database), `postgres://USER@HOST/DB` or `mysql://USER@HOST/DB` (SQL servers are
    /// measured in a schema or tables of their own, dropped afterwards). Default: memory and a
    /// SQLite file in a temporary directory.
    #[arg(long = "store", value_name = "URL")]
    stores: Vec<StoreUrl>,
    /// Which profile to run.
    #[arg(long, value_enum, default_value_t = ProfileArg::All)]
    profile: ProfileArg,
    /// Messages per profile (each is then delivered again as a duplicate).
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Concurrent tasks in the `concurrent` profile.
    #[arg(long, default_value_t = 32)]
    pub(crate) concurrency: usize,
    /// Messages per batch in the `concurrent` profile.
    #[arg(long, default_value_t = 128)]
    pub(crate) batch: usize,
    /// SQLite durability: `normal` or `full`.
    #[arg(long, default_value = "normal")]
    synchronous: Synchronous,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// `store` (the executor over the store), `transactional` (the record in the handler's own
    /// transaction, which idem begins and commits) or `transactional-caller` (the same inside a
    /// transaction the caller began); `transactional` for PostgreSQL and MySQL,
    /// `transactional-caller` for PostgreSQL.
    #[arg(long, value_enum, default_value_t = Mode::Store)]
    mode: Mode,
    /// Redis: the prefix of idem's keys [default: idem:]. SQL servers are measured in tables
    /// of the run's own, so they take no --schema or --table.
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
    /// How often a progress line goes to stderr when stderr is not a terminal (CI logs): the
    /// store and profile running, and the messages measured so far.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "10s",
        value_parser = crate::consume::parse_duration
    )]
    heartbeat: Duration,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Store,
    Transactional,
    TransactionalCaller,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Store => "store",
            Mode::Transactional => "transactional",
            Mode::TransactionalCaller => "transactional-caller",
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ProfileArg {
    Sequential,
    Concurrent,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Profile {
    Sequential,
    Concurrent,
}

impl Profile {
    fn name(self) -> &'static str {
        match self {
            Profile::Sequential => "sequential",
            Profile::Concurrent => "concurrent",
        }
    }
}

/// One line of `--json` output.
#[derive(Serialize, Debug)]
pub(crate) struct Row {
    store: String,
    mode: &'static str,
    profile: &'static str,
    messages: usize,
    new_msgs_per_s: f64,
    dup_msgs_per_s: f64,
    baseline_msgs_per_s: f64,
    ratio: f64,
}

impl Row {
    /// A row from the durations of the new pass, the duplicate pass and the baseline.
    fn new(
        store: String,
        mode: Mode,
        profile: Profile,
        args: &Args,
        (new, dup, baseline): (Duration, Duration, Duration),
    ) -> Self {
        let rate = |d: Duration| args.messages as f64 / d.as_secs_f64();
        Row {
            store,
            mode: mode.name(),
            profile: profile.name(),
            messages: args.messages,
            new_msgs_per_s: rate(new).round(),
            dup_msgs_per_s: rate(dup).round(),
            baseline_msgs_per_s: rate(baseline).round(),
            ratio: (baseline.as_secs_f64() / new.as_secs_f64() * 100.0).round() / 100.0,
        }
    }
}

pub(crate) const PAYLOAD: &[u8] =
    b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// What is being measured, for the heartbeat: every pass (baselines, idem's new and duplicate
/// passes) adds the messages it went through with [`advance`], a batch or a message at a time
/// (never inside a tighter loop, so counting costs nothing next to what is measured).
struct Progress {
    running: Mutex<Option<(String, Instant)>>,
    done: AtomicU64,
}

static PROGRESS: Progress = Progress {
    running: Mutex::new(None),
    done: AtomicU64::new(0),
};

/// Marks a boundary between the bench's passes for `valgrind --tool=callgrind
/// --dump-before='*idem_bench_phase'`: callgrind then writes one profile per stretch between two
/// calls (the whole process, every thread), so the instructions of the baseline, idem's new
/// pass and its duplicate pass are counted apart. With `IDEM_BENCH_PHASES` set, each call first
/// prints `idem-bench-phase <n> <label>` on stderr: the profile written at the `n`th call
/// (`callgrind.out.<pid>.<n>`) holds what ran since the call before, so an `end ...` label
/// names the pass it measured. Costs nothing otherwise (one call per pass).
pub(crate) fn phase(label: &str) {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let n = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
    if std::env::var_os("IDEM_BENCH_PHASES").is_some() {
        eprintln!("idem-bench-phase {n} {label}");
    }
    idem_bench_phase(n);
}

/// The function callgrind's `--dump-before='*idem_bench_phase'` names (never inlined).
#[inline(never)]
fn idem_bench_phase(n: u64) {
    std::hint::black_box(n);
}

/// `n` more messages went through a pass of the run being measured.
pub(crate) fn advance(n: usize) {
    PROGRESS.done.fetch_add(n as u64, Ordering::Relaxed);
}

/// A new store and profile start: `what` names them.
fn begin(what: String) {
    PROGRESS.done.store(0, Ordering::Relaxed);
    *PROGRESS.running.lock().unwrap_or_else(|e| e.into_inner()) = Some((what, Instant::now()));
}

/// Prints a progress line on stderr every `every`.
async fn heartbeat(every: Duration, messages: usize) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let running = PROGRESS
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some((what, since)) = running {
            eprintln!(
                "idem bench: {what}: running for {}, {} messages measured so far (baseline, new \
                 and duplicate passes of {messages} each)",
                duration::approx(since.elapsed()),
                PROGRESS.done.load(Ordering::Relaxed),
            );
        }
    }
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    ensure!(args.messages > 0, "--messages must be at least 1");
    ensure!(
        args.concurrency > 0 && args.batch > 0,
        "--concurrency and --batch must be at least 1"
    );
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let stores = if args.stores.is_empty() {
        vec![
            StoreUrl::Memory,
            StoreUrl::Sqlite(tmp.path().join("bench.db")),
        ]
    } else {
        args.stores.clone()
    };
    anyhow::ensure!(
        args.prefix.is_none() || stores.iter().any(|s| matches!(s, StoreUrl::Redis(_))),
        "--prefix is for redis:// stores, and none is measured"
    );
    let profiles = match args.profile {
        ProfileArg::Sequential => vec![Profile::Sequential],
        ProfileArg::Concurrent => vec![Profile::Concurrent],
        ProfileArg::All => vec![Profile::Sequential, Profile::Concurrent],
    };
    // CI logs: a line now and then, so that minutes of measuring are not taken for a hang.
    let beat = (!std::io::stderr().is_terminal())
        .then(|| tokio::spawn(heartbeat(args.heartbeat, args.messages)));
    let rows = measure_all(&stores, &profiles, &args, tmp.path()).await;
    if let Some(beat) = beat {
        beat.abort();
    }
    if !args.json {
        print_table(&rows?);
    }
    Ok(())
}

/// Measures every profile on every store, printing each row as it comes (`--json`: the row
/// itself).
async fn measure_all(
    stores: &[StoreUrl],
    profiles: &[Profile],
    args: &Args,
    tmp: &Path,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for url in stores {
        for &profile in profiles {
            begin(format!("{url} {} {}", args.mode.name(), profile.name()));
            let row = match url {
                StoreUrl::Mysql(mysql_url) => {
                    mysql::measure(mysql_url, url.to_string(), profile, args.mode, args).await
                }
                _ => measure(url, profile, args, tmp).await,
            }
            .with_context(|| format!("bench {} {}", url, profile.name()))?;
            if args.json {
                println!("{}", serde_json::to_string(&row)?);
            } else {
                eprintln!(
                    "{} {} {}: {:.0} new msg/s ({:.2}x baseline)",
                    row.store, row.mode, row.profile, row.new_msgs_per_s, row.ratio
                );
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

async fn measure(url: &StoreUrl, profile: Profile, args: &Args, tmp: &Path) -> anyhow::Result<Row> {
    if let StoreUrl::Postgres(pg) = url {
        return postgres::measure(pg, url, profile, args).await;
    }
    ensure!(
        args.mode == Mode::Store,
        "--mode {} is measured for postgres:// and mysql:// stores only",
        args.mode.name()
    );
    let opts = OpenOptions {
        synchronous: args.synchronous,
        must_exist: false,
    };
    let location = match url {
        StoreUrl::Redis(_) => Location {
            prefix: args.prefix.clone(),
            ..Location::default()
        },
        _ => Location::default(),
    };
    let opened = url.open_in(&location, opts).await?;
    let (run_id, ns, ids) = workload(profile, args)?;

    // The baseline runs first, on its own database, so it does not share the store's cache.
    // Redis alternates its baseline and idem in rounds instead (see bench/redis.rs).
    let (baseline, new, dup) = match &opened {
        Opened::Memory(s) => {
            phase("begin baseline");
            let baseline = memory::baseline(&ids, profile, args).await;
            phase("end baseline");
            let (new, dup) = drive(s.clone(), &ns, &ids, profile, args).await?;
            (baseline, new, dup)
        }
        Opened::Sqlite(s) => {
            let path = tmp.join(format!("baseline-{run_id}.db"));
            let (ids2, batch, sync) = (Arc::clone(&ids), args.batch, args.synchronous);
            phase("begin baseline");
            let baseline = tokio::task::spawn_blocking(move || {
                sqlite::baseline(&path, &ids2, profile, batch, sync)
            })
            .await??;
            phase("end baseline");
            let (new, dup) = drive(s.clone(), &ns, &ids, profile, args).await?;
            (baseline, new, dup)
        }
        Opened::Redis(s) => redis::measure(s, &ns, &ids, profile, args, &run_id).await?,
        Opened::Mysql(_) | Opened::Postgres(_) => {
            anyhow::bail!("{url} is measured by its own bench module")
        }
    };
    Ok(Row::new(
        url.to_string(),
        Mode::Store,
        profile,
        args,
        (new, dup, baseline),
    ))
}

/// A run id, the profile's namespace and `--messages` fresh ids.
fn workload(
    profile: Profile,
    args: &Args,
) -> anyhow::Result<(String, Namespace, Arc<Vec<String>>)> {
    let run_id = format!("{:x}", fastrand_u64());
    let ns = Namespace::new(format!("bench-{}-{run_id}", profile.name()))?;
    let ids: Arc<Vec<String>> = Arc::new(
        (0..args.messages)
            .map(|i| format!("m-{run_id}-{i}"))
            .collect(),
    );
    Ok((run_id, ns, ids))
}

fn fastrand_u64() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()) << 32
}

/// Runs the profile twice over the same ids (new, then duplicates); returns both durations and
/// checks that the handler ran exactly once per id.
async fn drive<S: Store + Clone>(
    store: S,
    ns: &Namespace,
    ids: &Arc<Vec<String>>,
    profile: Profile,
    args: &Args,
) -> anyhow::Result<(Duration, Duration)> {
    let exec = Executor::new(store);
    let ran = Arc::new(AtomicUsize::new(0));
    let mut durations = [Duration::ZERO; 2];
    for (pass, expect) in [(0, "executed"), (1, "replayed")] {
        let label = ["idem-new", "idem-dup"][pass];
        phase(&format!("begin {label}"));
        let start = Instant::now();
        let counts = match profile {
            Profile::Sequential => sequential(&exec, ns, ids, &ran).await?,
            Profile::Concurrent => {
                concurrent(&exec, ns, ids, args.concurrency, args.batch, &ran).await?
            }
        };
        durations[pass] = start.elapsed();
        phase(&format!("end {label}"));
        ensure!(
            counts.get(expect) == Some(&ids.len()),
            "pass {pass}: expected {} {expect} outcomes, got {counts:?}",
            ids.len()
        );
    }
    ensure!(
        ran.load(Ordering::Relaxed) == ids.len(),
        "the handler ran {} times for {} messages",
        ran.load(Ordering::Relaxed),
        ids.len()
    );
    Ok((durations[0], durations[1]))
}

type Counts = HashMap<&'static str, usize>;

async fn sequential<S: Store>(
    exec: &Executor<S>,
    ns: &Namespace,
    ids: &[String],
    ran: &AtomicUsize,
) -> anyhow::Result<Counts> {
    let mut counts = Counts::new();
    for id in ids {
        let outcome: Outcome<(), Infallible> = exec
            .run(ns.key(id.as_str())?, PAYLOAD, |_| async {
                ran.fetch_add(1, Ordering::Relaxed);
                Ok(())
            })
            .await?;
        *counts.entry(outcome.kind()).or_default() += 1;
        advance(1);
    }
    Ok(counts)
}

async fn concurrent<S: Store + Clone>(
    exec: &Executor<S>,
    ns: &Namespace,
    ids: &Arc<Vec<String>>,
    tasks: usize,
    batch: usize,
    ran: &Arc<AtomicUsize>,
) -> anyhow::Result<Counts> {
    let next = Arc::new(AtomicUsize::new(0));
    let fp = Fingerprint::of(PAYLOAD);
    let mut handles = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let (exec, ns, ids, next, ran) = (
            exec.clone(),
            ns.clone(),
            ids.clone(),
            next.clone(),
            ran.clone(),
        );
        handles.push(tokio::spawn(async move {
            let mut counts = Counts::new();
            loop {
                let start = next.fetch_add(batch, Ordering::Relaxed);
                if start >= ids.len() {
                    return anyhow::Ok(counts);
                }
                let items = ids[start..(start + batch).min(ids.len())]
                    .iter()
                    .map(|id| Ok((ns.key(id.as_str())?, fp)))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let ran = &ran;
                let outcomes = exec
                    .run_batch(items, |_, _| async move {
                        ran.fetch_add(1, Ordering::Relaxed);
                        Ok::<(), Infallible>(())
                    })
                    .await?;
                advance(outcomes.len());
                for outcome in outcomes {
                    *counts.entry(outcome?.kind()).or_default() += 1;
                }
            }
        }));
    }
    let mut total = Counts::new();
    for h in handles {
        for (k, v) in h.await?? {
            *total.entry(k).or_default() += v;
        }
    }
    Ok(total)
}

fn print_table(rows: &[Row]) {
    let w = rows.iter().map(|r| r.store.len()).max().unwrap_or(5).max(5);
    println!(
        "{:<w$} {:<20} {:<11} {:>9} {:>12} {:>12} {:>14} {:>6}",
        "store", "mode", "profile", "messages", "new msg/s", "dup msg/s", "baseline msg/s", "ratio"
    );
    for r in rows {
        println!(
            "{:<w$} {:<20} {:<11} {:>9} {:>12.0} {:>12.0} {:>14.0} {:>6.2}",
            r.store,
            r.mode,
            r.profile,
            r.messages,
            r.new_msgs_per_s,
            r.dup_msgs_per_s,
            r.baseline_msgs_per_s,
            r.ratio
        );
    }
    println!(
        "\nnew msg/s = messages processed for the first time (claim, handler, completion). \
         dup msg/s = the same messages delivered again: duplicates answered from the store \
         (the stored outcome replayed, the handler not run).\n\
         ratio = idem new msg/s / baseline msg/s, same run. Baselines: plain SQL on a database with \
         the same schema and settings (sqlite), a hand-written sharded HashMap (memory), SET NX + \
         SET on the same connection (redis), plain statements of the same rows on the same server \
         (postgres, mysql)."
    );
}
