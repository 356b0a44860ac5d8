//! PostgreSQL: the store through the executor (`--mode store`), or the record written in the
//! handler's own transaction (`--mode transactional`), each next to a baseline of plain
//! tokio-postgres statements on the same server, run in a schema of its own that is dropped
//! afterwards.
//!
//! Baselines, on a table of idem's schema, same batch size, same concurrency, same pool size:
//! - store mode: the claim as `INSERT ... ON CONFLICT DO NOTHING` and the completion as an
//!   `UPDATE`, one autocommitted statement each per message (`sequential`), or one statement
//!   of `--batch` rows each per batch (`concurrent`);
//! - transactional mode: only the raw batched `INSERT ... ON CONFLICT DO NOTHING` of the same
//!   keys, one autocommitted statement per batch (the baseline), or per message in
//!   `sequential`.
//!
//! Durability is the server's `synchronous_commit`, reported with the results; the issue's
//! target is for `on`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use idem::{Config, Executor, Fingerprint, Key, Namespace, Outcome};
use idem_postgres::PostgresStore;

use super::{Args, Counts, Mode, PAYLOAD, Profile, Row, concurrent, sequential, workload};
use crate::store_url::StoreUrl;

pub(super) async fn measure(
    url: &str,
    shown: &StoreUrl,
    profile: Profile,
    args: &Args,
) -> anyhow::Result<Row> {
    let (run_id, ns, ids) = workload(profile, args)?;
    let schema = format!("idem_bench_{run_id}");
    let builder = PostgresStore::builder(url)
        .schema(schema.clone())
        .pool_size(args.concurrency.min(64));
    builder
        .migrate()
        .await
        .with_context(|| format!("creating the bench schema {schema} on {shown}"))?;
    let out = async {
        let store = builder.clone().connect().await?;
        let sync = synchronous_commit(&store).await?;
        // The baseline's table: idem's schema under another name, so rows are the same width
        // and the indexes the same.
        let base = builder.clone().table("baseline_records");
        base.migrate().await?;
        let base = base.connect().await?;
        // The baseline and idem's first pass alternate over slices of the messages, so that a
        // change in the machine's load (other processes, checkpoints) hits both alike.
        let exec = Executor::new(store.clone());
        let ran = Arc::new(AtomicUsize::new(0));
        let (mut baseline_time, mut new) = (Duration::ZERO, Duration::ZERO);
        for slice in ids.chunks(ids.len().div_ceil(SLICES)) {
            let slice = Arc::new(slice.to_vec());
            super::phase("begin baseline");
            baseline_time += baseline(&base, &slice, profile, args).await?;
            super::phase("end baseline");
            super::phase("begin idem-new");
            new += pass(&exec, &ns, &slice, profile, args, &ran, "executed").await?;
            super::phase("end idem-new");
        }
        super::phase("begin idem-dup");
        let dup = pass(&exec, &ns, &ids, profile, args, &ran, "replayed").await?;
        super::phase("end idem-dup");
        ensure!(
            ran.load(Ordering::Relaxed) == ids.len(),
            "the handler ran {} times for {} messages",
            ran.load(Ordering::Relaxed),
            ids.len()
        );
        let baseline = baseline_time;
        let row = Row::new(
            shown.to_string(),
            args.mode,
            profile,
            args,
            (new, dup, baseline),
        );
        if !args.json {
            eprintln!("{shown}: synchronous_commit={sync}");
        }
        anyhow::Ok(row)
    }
    .await;
    // Clean up whatever happened, on a connection of its own.
    let dropped = crate::scratch::drop_postgres_schema(url, &schema).await;
    let row = out?;
    dropped?;
    Ok(row)
}

async fn synchronous_commit(store: &PostgresStore) -> anyhow::Result<String> {
    let client = store.pool().get().await?;
    Ok(client
        .query_one("SHOW synchronous_commit", &[])
        .await?
        .try_get(0)?)
}

/// How many slices the baseline and idem's first pass alternate over.
const SLICES: usize = 4;

/// One pass of the profile over `ids` in the bench's mode, with a no-op handler; checks that
/// every outcome is `expect` and returns how long it took.
///
/// Transactional modes use one transaction per message (`sequential`) or per batch
/// (`concurrent`): one that idem begins and commits (`Transactional::run_batch_transactional`),
/// or one the bench begins and commits around `run_batch_in_transaction`
/// (`transactional-caller`).
async fn pass(
    exec: &Executor<PostgresStore>,
    ns: &Namespace,
    ids: &Arc<Vec<String>>,
    profile: Profile,
    args: &Args,
    ran: &Arc<AtomicUsize>,
    expect: &str,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let counts = match (args.mode, profile) {
        (Mode::Store, Profile::Sequential) => sequential(exec, ns, ids, ran).await?,
        (Mode::Store, Profile::Concurrent) => {
            concurrent(exec, ns, ids, args.concurrency, args.batch, ran).await?
        }
        (mode, Profile::Sequential) => {
            transactional(exec.store(), ns, ids, 1, 1, mode, ran).await?
        }
        (mode, Profile::Concurrent) => {
            let (tasks, batch) = (args.concurrency, args.batch);
            transactional(exec.store(), ns, ids, tasks, batch, mode, ran).await?
        }
    };
    let took = start.elapsed();
    ensure!(
        counts.get(expect) == Some(&ids.len()),
        "expected {} {expect} outcomes, got {counts:?}",
        ids.len()
    );
    Ok(took)
}

async fn transactional(
    store: &PostgresStore,
    ns: &Namespace,
    ids: &Arc<Vec<String>>,
    tasks: usize,
    batch: usize,
    mode: Mode,
    ran: &Arc<AtomicUsize>,
) -> anyhow::Result<Counts> {
    let owned = mode == Mode::Transactional;
    let next = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let (store, ns, ids, next, ran) = (
            store.clone(),
            ns.clone(),
            ids.clone(),
            next.clone(),
            ran.clone(),
        );
        handles.push(tokio::spawn(async move {
            let fp = Fingerprint::of(PAYLOAD);
            let config = Config::default();
            let mut counts = Counts::new();
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= ids.len() {
                    return anyhow::Ok(counts);
                }
                let items = ids[from..(from + batch).min(ids.len())]
                    .iter()
                    .map(|id| Ok((ns.key(id.as_str())?, fp)))
                    .collect::<anyhow::Result<Vec<(Key, Fingerprint)>>>()?;
                let outcomes: Vec<Outcome<(), Infallible>> = if owned {
                    use idem::Transactional as _;
                    let ran = ran.clone();
                    store
                        .run_batch_transactional(&items, &config, move |_, _| {
                            ran.fetch_add(1, Ordering::Relaxed);
                            Box::pin(async { Ok(()) })
                        })
                        .await?
                } else {
                    let mut client = store.pool().get().await?;
                    let tx = client.transaction().await?;
                    let outcomes = idem_postgres::run_batch_in_transaction(
                        &tx,
                        store.table(),
                        &items,
                        &config,
                        idem::Store::max_result_bytes(&store),
                        |_, _| {
                            ran.fetch_add(1, Ordering::Relaxed);
                            Box::pin(async { Ok(()) })
                        },
                    )
                    .await?;
                    tx.commit().await?;
                    outcomes
                };
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

/// Plain statements writing the same rows; see the module docs.
async fn baseline(
    base: &PostgresStore,
    ids: &Arc<Vec<String>>,
    profile: Profile,
    args: &Args,
) -> anyhow::Result<Duration> {
    let t = base.table().qualified().to_owned();
    let claim = format!(
        "INSERT INTO {t} (namespace, id, state, fingerprint, token, owner, lease_until, \
         attempts, result, created_at, updated_at, expires_at) \
         SELECT 'bench', u.id, 1, $2, $3, 'baseline', now() + interval '30 s', 1, NULL, now(), \
         now(), now() + interval '7 days' FROM unnest($1::text[]) AS u(id) \
         ON CONFLICT (namespace, id) DO NOTHING"
    );
    let complete = format!(
        "UPDATE {t} SET state = 2, lease_until = NULL, result = '\\x'::bytea, \
         updated_at = now(), expires_at = now() + interval '7 days' \
         FROM unnest($1::text[]) AS u(id) \
         WHERE {t}.namespace = 'bench' AND {t}.id = u.id AND {t}.token = $2"
    );
    let with_update = args.mode == Mode::Store;
    let (tasks, batch) = match profile {
        Profile::Sequential => (1, 1),
        Profile::Concurrent => (args.concurrency, args.batch),
    };
    let (claim, complete) = (Arc::new(claim), Arc::new(complete));
    let next = Arc::new(AtomicUsize::new(0));
    let fp = Fingerprint::of(PAYLOAD).to_bytes().to_vec();
    let start = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let (pool, ids, next, claim, complete, fp) = (
            base.pool().clone(),
            ids.clone(),
            next.clone(),
            claim.clone(),
            complete.clone(),
            fp.clone(),
        );
        handles.push(tokio::spawn(async move {
            let client = pool.get().await?;
            let claim = client.prepare_cached(&claim).await?;
            let complete = client.prepare_cached(&complete).await?;
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= ids.len() {
                    return anyhow::Ok(());
                }
                let group = &ids[from..(from + batch).min(ids.len())];
                let token = i64::try_from(from).unwrap_or(i64::MAX);
                let n = client.execute(&claim, &[&group, &fp, &token]).await?;
                if n != group.len() as u64 {
                    bail!("baseline claim inserted {n} of {} rows", group.len());
                }
                if with_update {
                    let n = client.execute(&complete, &[&group, &token]).await?;
                    if n != group.len() as u64 {
                        bail!("baseline complete updated {n} of {} rows", group.len());
                    }
                }
                super::advance(group.len());
            }
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(start.elapsed())
}
