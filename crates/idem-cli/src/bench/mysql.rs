//! The MySQL / MariaDB bench: idem in a fresh table, next to plain statements writing the same
//! rows through `mysql_async` on the same server, in a second fresh table with the same schema.
//! Both tables are dropped at the end, whatever happened. The baseline runs before and after
//! idem, and its time is the mean of the two runs.
//!
//! Baselines, with the same concurrency and batch size as the profile:
//! - store mode: per message a prepared `INSERT` (the claim) and a prepared `UPDATE … WHERE
//!   token = ?` (the completion), each committed on its own (`sequential`); per batch one
//!   multi-row `INSERT` and one `UPDATE … WHERE id IN (…)`, each one commit (`concurrent`);
//! - transactional mode: the completed rows written with `INSERT IGNORE`, one per commit
//!   (`sequential`) or one multi-row statement per batch (`concurrent`): what a hand-written
//!   dedup table costs without idem's claim, savepoint and fenced record.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use idem::{Config, Fingerprint, Key, Namespace, Outcome, Transactional};
use idem_mysql::MysqlStore;
use mysql_async::prelude::Queryable;
use mysql_async::{Params, Pool, Value};

use super::{Args, Counts, Mode, PAYLOAD, Profile, Row, drive, fastrand_u64};

const COLUMNS: &str = "namespace, id, state, fingerprint, token, owner, lease_until, attempts, \
                       result, created_at, updated_at, expires_at";

/// Measures `profile` in `mode` against the server at `url`.
pub(super) async fn measure(
    url: &str,
    display: String,
    profile: Profile,
    mode: Mode,
    args: &Args,
) -> anyhow::Result<Row> {
    ensure!(
        mode != Mode::TransactionalCaller,
        "--mode transactional-caller is measured for postgres:// stores only"
    );
    let run_id = format!("{:x}", fastrand_u64());
    let tables = [
        format!("idem_bench_{run_id}"),
        format!("idem_bench_raw_{run_id}"),
    ];
    let pool = Pool::new(
        mysql_async::OptsBuilder::from_opts(
            mysql_async::Opts::from_url(url).context("parsing the MySQL URL")?,
        )
        .pool_opts(
            mysql_async::PoolOpts::default()
                .with_constraints(
                    mysql_async::PoolConstraints::new(0, args.concurrency.max(1))
                        .context("pool size")?,
                )
                .with_inactive_connection_ttl(Duration::from_secs(60)),
        )
        // The same session settings as idem's own connections.
        .setup(vec![
            "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
        ]),
    );
    let result = run(url, display, profile, mode, args, &run_id, &tables, &pool).await;
    // Clean up even after a failure; a failed clean-up is reported but does not hide the result.
    let cleanup = crate::scratch::drop_mysql_tables(&pool, &tables).await;
    let _ = pool.disconnect().await;
    let row = result?;
    cleanup?;
    Ok(row)
}

#[allow(clippy::too_many_arguments)]
async fn run(
    url: &str,
    display: String,
    profile: Profile,
    mode: Mode,
    args: &Args,
    run_id: &str,
    [table, raw]: &[String; 2],
    pool: &Pool,
) -> anyhow::Result<Row> {
    let store = MysqlStore::builder(url)
        .table(table.as_str())
        .pool_size(args.concurrency.max(1))
        .build()?;
    store.migrate().await.context("creating the bench table")?;
    // The raw table gets idem's schema too, so both sides write the same rows.
    MysqlStore::builder(url)
        .table(raw.as_str())
        .pool_size(1)
        .build()?
        .migrate()
        .await
        .context("creating the baseline table")?;
    let ns = Namespace::new(format!("bench-{}-{run_id}", profile.name()))?;
    let ids: Arc<Vec<String>> = Arc::new(
        (0..args.messages)
            .map(|i| format!("m-{run_id}-{i}"))
            .collect(),
    );
    // The baseline runs on its own table, once before idem and once after (in another
    // namespace, so the rows are new again): the machine's load drifts, and the mean of the two
    // brackets idem's run.
    super::phase("begin baseline");
    let before = baseline(pool, raw, &ns, &ids, profile, mode, args).await?;
    super::phase("end baseline");
    let (new, dup) = match mode {
        Mode::Store => drive(store.clone(), &ns, &ids, profile, args).await?,
        Mode::Transactional | Mode::TransactionalCaller => {
            drive_transactional(&store, &ns, &ids, profile, args).await?
        }
    };
    let again = Namespace::new(format!("{ns}-again"))?;
    super::phase("begin baseline");
    let after = baseline(pool, raw, &again, &ids, profile, mode, args).await?;
    super::phase("end baseline");
    let baseline = (before + after) / 2;
    let _ = store.disconnect().await;
    Ok(Row::new(display, mode, profile, args, (new, dup, baseline)))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// One row's values for the baseline, in `COLUMNS` order: a claim (state 1) or a completed
/// record (state 2).
fn row_values(ns: &Namespace, id: &str, token: i64, state: u8) -> Vec<Value> {
    let now = now_ms();
    let lease = (state == 1).then_some(now + 30_000);
    vec![
        ns.as_str().as_bytes().into(),
        id.as_bytes().into(),
        state.into(),
        Fingerprint::of(PAYLOAD).to_bytes().to_vec().into(),
        token.into(),
        b"baseline".to_vec().into(),
        lease.into(),
        1u32.into(),
        (state == 2).then(Vec::<u8>::new).into(),
        now.into(),
        now.into(),
        (now + 7 * 24 * 3_600_000).into(),
    ]
}

fn placeholders(rows: usize) -> String {
    let one = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
    vec![one; rows].join(", ")
}

/// Writes the profile's rows with plain statements; returns how long that took.
async fn baseline(
    pool: &Pool,
    raw: &str,
    ns: &Namespace,
    ids: &Arc<Vec<String>>,
    profile: Profile,
    mode: Mode,
    args: &Args,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    match profile {
        Profile::Sequential => {
            let mut conn = pool.get_conn().await?;
            for (n, id) in ids.iter().enumerate() {
                let token = i64::try_from(n)? + 1;
                write_group(&mut conn, raw, ns, std::slice::from_ref(id), token, mode).await?;
            }
        }
        Profile::Concurrent => {
            let next = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for _ in 0..args.concurrency {
                let (pool, ids, next, ns, raw) = (
                    pool.clone(),
                    ids.clone(),
                    next.clone(),
                    ns.clone(),
                    raw.to_owned(),
                );
                let batch = args.batch;
                tasks.push(tokio::spawn(async move {
                    let mut conn = pool.get_conn().await?;
                    loop {
                        let start = next.fetch_add(batch, Ordering::Relaxed);
                        if start >= ids.len() {
                            return anyhow::Ok(());
                        }
                        let group = &ids[start..(start + batch).min(ids.len())];
                        let token = i64::try_from(start)? + 1;
                        write_group(&mut conn, &raw, &ns, group, token, mode).await?;
                    }
                }));
            }
            for t in tasks {
                t.await??;
            }
        }
    }
    Ok(start.elapsed())
}

/// The baseline's statements for one message or one batch.
async fn write_group(
    conn: &mut mysql_async::Conn,
    raw: &str,
    ns: &Namespace,
    ids: &[String],
    token: i64,
    mode: Mode,
) -> anyhow::Result<()> {
    let n = ids.len();
    match mode {
        Mode::Store => {
            let values: Vec<Value> = ids
                .iter()
                .flat_map(|id| row_values(ns, id, token, 1))
                .collect();
            conn.exec_drop(
                format!("INSERT INTO `{raw}` ({COLUMNS}) VALUES {}", placeholders(n)),
                Params::Positional(values),
            )
            .await?;
            ensure!(
                conn.affected_rows() == n as u64,
                "baseline claim inserted too few rows"
            );
            let now = now_ms();
            let mut params: Vec<Value> = vec![
                now.into(),
                (now + 7 * 24 * 3_600_000).into(),
                ns.as_str().as_bytes().into(),
                token.into(),
            ];
            params.extend(ids.iter().map(|id| Value::from(id.as_bytes())));
            conn.exec_drop(
                format!(
                    "UPDATE `{raw}` SET state = 2, lease_until = NULL, result = '', \
                     updated_at = ?, expires_at = ? WHERE namespace = ? AND state = 1 \
                     AND token = ? AND id IN ({})",
                    vec!["?"; n].join(", ")
                ),
                Params::Positional(params),
            )
            .await?;
            ensure!(
                conn.affected_rows() == n as u64,
                "baseline completion updated too few rows"
            );
        }
        Mode::Transactional | Mode::TransactionalCaller => {
            let values: Vec<Value> = ids
                .iter()
                .flat_map(|id| row_values(ns, id, token, 2))
                .collect();
            conn.exec_drop(
                format!(
                    "INSERT IGNORE INTO `{raw}` ({COLUMNS}) VALUES {}",
                    placeholders(n)
                ),
                Params::Positional(values),
            )
            .await?;
            ensure!(
                conn.affected_rows() == n as u64,
                "baseline inserted too few rows"
            );
        }
    }
    super::advance(n);
    Ok(())
}

/// Transactional mode: the profile twice over the same ids (new, then duplicates), each
/// message or batch in its own transaction with a no-op handler; checks that the handler ran
/// exactly once per id.
async fn drive_transactional(
    store: &MysqlStore,
    ns: &Namespace,
    ids: &Arc<Vec<String>>,
    profile: Profile,
    args: &Args,
) -> anyhow::Result<(Duration, Duration)> {
    let ran = Arc::new(AtomicUsize::new(0));
    let mut durations = [Duration::ZERO; 2];
    for (pass, expect) in [(0, "executed"), (1, "replayed")] {
        let start = Instant::now();
        let counts = match profile {
            Profile::Sequential => {
                let mut counts = Counts::new();
                for id in ids.iter() {
                    let (ran, key) = (ran.clone(), ns.key(id.as_str())?);
                    let fingerprint = Fingerprint::of(PAYLOAD);
                    let outcome: Outcome<(), Infallible> = store
                        .run_transactional(&key, fingerprint, &Config::default(), move |_| {
                            ran.fetch_add(1, Ordering::Relaxed);
                            Box::pin(async { Ok(()) })
                        })
                        .await?;
                    *counts.entry(outcome.kind()).or_default() += 1;
                    super::advance(1);
                }
                counts
            }
            Profile::Concurrent => transactional_batches(store, ns, ids, args, &ran).await?,
        };
        durations[pass] = start.elapsed();
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

async fn transactional_batches(
    store: &MysqlStore,
    ns: &Namespace,
    ids: &Arc<Vec<String>>,
    args: &Args,
    ran: &Arc<AtomicUsize>,
) -> anyhow::Result<Counts> {
    let next = Arc::new(AtomicUsize::new(0));
    let fp = Fingerprint::of(PAYLOAD);
    let mut handles = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        let (store, ns, ids, next, ran) = (
            store.clone(),
            ns.clone(),
            ids.clone(),
            next.clone(),
            ran.clone(),
        );
        let batch = args.batch;
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
                    .collect::<anyhow::Result<Vec<(Key, Fingerprint)>>>()?;
                let ran = ran.clone();
                let outcomes: Vec<Outcome<(), Infallible>> = store
                    .run_batch_transactional(&items, &Config::default(), move |_, _| {
                        ran.fetch_add(1, Ordering::Relaxed);
                        Box::pin(async { Ok(()) })
                    })
                    .await?;
                super::advance(outcomes.len());
                for outcome in outcomes {
                    *counts.entry(outcome.kind()).or_default() += 1;
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
