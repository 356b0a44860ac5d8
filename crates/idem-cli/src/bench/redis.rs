//! Redis in `idem bench`: the store next to the naive dedup loop people write by hand, on the
//! store's own connection. Per new message the baseline sends one
//! `SET key IN_PROGRESS NX PX <lease>` (the claim) and one `SET key <result> PX <retention>` (the
//! completion): the same two round trips as idem's claim and complete. `sequential` sends them
//! one at a time; `concurrent` pipelines `--batch` of each per round trip, from `--concurrency`
//! tasks.
//!
//! Both run in a task on the runtime, as a consumer's loop does, not on the thread that
//! blocks on the runtime: there every round trip would cross threads twice, which costs more
//! than Redis's own work. A shared server on a shared machine drifts by tens of percent within
//! seconds, so the two alternate: the messages are split into rounds, and each round runs the baseline and idem on
//! its own ids, in alternating order. Both then see the same conditions, and the ratio holds
//! even when the absolute numbers move. Everything a run writes is deleted afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use idem::{Executor, Namespace};
use idem_redis::redis::{self, Value};
use idem_redis::{RedisConnection, RedisStore};

use super::{Args, Counts, Profile, concurrent, sequential};

/// Most rounds a run is split into.
const ROUNDS: usize = 10;

/// Measures the baseline and idem in alternating rounds, then the duplicates; returns the
/// baseline's, idem's new-message and idem's duplicate durations. Checks that the handler ran
/// once per id and every duplicate was replayed, and deletes what the run wrote.
pub(super) async fn measure(
    store: &RedisStore,
    ns: &Namespace,
    ids: &Arc<Vec<String>>,
    profile: Profile,
    args: &Args,
    run_id: &str,
) -> anyhow::Result<(Duration, Duration, Duration)> {
    let prefix = baseline_prefix(run_id);
    let shape = Shape {
        concurrency: args.concurrency,
        batch: args.batch,
    };
    let (store2, ns2, ids2, prefix2) = (store.clone(), ns.clone(), Arc::clone(ids), prefix.clone());
    let measured =
        tokio::spawn(
            async move { alternate(&store2, &ns2, &ids2, profile, shape, &prefix2).await },
        )
        .await
        .context("the benchmark task failed")?;
    cleanup(store, &prefix_pattern(&prefix)).await?;
    cleanup(store, &namespace_pattern(store, ns)).await?;
    measured
}

/// The part of [`Args`] a measurement needs, to move into its task.
#[derive(Clone, Copy)]
struct Shape {
    concurrency: usize,
    batch: usize,
}

async fn alternate(
    store: &RedisStore,
    ns: &Namespace,
    ids: &Arc<Vec<String>>,
    profile: Profile,
    args: Shape,
    prefix: &str,
) -> anyhow::Result<(Duration, Duration, Duration)> {
    // Rounds big enough that every concurrent task gets batches in each.
    let per_round = match profile {
        Profile::Sequential => 1,
        Profile::Concurrent => args.concurrency * args.batch * 2,
    };
    let rounds = (ids.len() / per_round).clamp(1, ROUNDS);
    let exec = Executor::new(store.clone());
    let ran = Arc::new(AtomicUsize::new(0));
    let (mut base, mut new) = (Duration::ZERO, Duration::ZERO);
    for (round, part) in ids.chunks(ids.len().div_ceil(rounds)).enumerate() {
        let part = Arc::new(part.to_vec());
        for idem_first in [round % 2 == 1, round % 2 == 0] {
            if idem_first {
                super::phase("begin idem-new");
                let start = Instant::now();
                let counts = pass(&exec, ns, &part, profile, args, &ran).await?;
                new += start.elapsed();
                super::phase("end idem-new");
                expect(&counts, "executed", part.len())?;
            } else {
                super::phase("begin baseline");
                base += baseline(store, &part, profile, args, prefix).await?;
                super::phase("end baseline");
            }
        }
    }
    super::phase("begin idem-dup");
    let start = Instant::now();
    let counts = pass(&exec, ns, ids, profile, args, &ran).await?;
    let dup = start.elapsed();
    super::phase("end idem-dup");
    expect(&counts, "replayed", ids.len())?;
    let ran = ran.load(Ordering::Relaxed);
    ensure!(
        ran == ids.len(),
        "the handler ran {ran} times for {} messages",
        ids.len()
    );
    Ok((base, new, dup))
}

async fn pass(
    exec: &Executor<RedisStore>,
    ns: &Namespace,
    ids: &Arc<Vec<String>>,
    profile: Profile,
    args: Shape,
    ran: &Arc<AtomicUsize>,
) -> anyhow::Result<Counts> {
    match profile {
        Profile::Sequential => sequential(exec, ns, ids, ran).await,
        Profile::Concurrent => concurrent(exec, ns, ids, args.concurrency, args.batch, ran).await,
    }
}

fn expect(counts: &Counts, kind: &str, n: usize) -> anyhow::Result<()> {
    ensure!(
        counts.get(kind) == Some(&n),
        "expected {n} {kind} outcomes, got {counts:?}"
    );
    Ok(())
}

const LEASE_MS: u64 = 30_000;
const RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;

/// Where the baseline writes: a prefix of its own, removed by [`cleanup`].
fn baseline_prefix(run_id: &str) -> String {
    format!("idem-bench-baseline:{run_id}:")
}

async fn baseline(
    store: &RedisStore,
    ids: &Arc<Vec<String>>,
    profile: Profile,
    args: Shape,
    prefix: &str,
) -> anyhow::Result<Duration> {
    let conn = store.connection();
    let start = Instant::now();
    match profile {
        Profile::Sequential => {
            let mut conn = conn;
            for id in ids.iter() {
                let key = format!("{prefix}{id}");
                let claimed = redis::cmd("SET")
                    .arg(&key)
                    .arg("IN_PROGRESS")
                    .arg("NX")
                    .arg("PX")
                    .arg(LEASE_MS)
                    .query_async::<Value>(&mut conn)
                    .await?;
                ensure!(
                    claimed == Value::Okay,
                    "baseline claim of {key}: {claimed:?}"
                );
                redis::cmd("SET")
                    .arg(&key)
                    .arg("C:")
                    .arg("PX")
                    .arg(RETENTION_MS)
                    .exec_async(&mut conn)
                    .await?;
                super::advance(1);
            }
        }
        Profile::Concurrent => {
            let next = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::with_capacity(args.concurrency);
            for _ in 0..args.concurrency {
                let (mut conn, ids, next, batch) =
                    (conn.clone(), Arc::clone(ids), Arc::clone(&next), args.batch);
                let prefix = prefix.to_owned();
                tasks.push(tokio::spawn(async move {
                    loop {
                        let start = next.fetch_add(batch, Ordering::Relaxed);
                        if start >= ids.len() {
                            return anyhow::Ok(());
                        }
                        let group = &ids[start..(start + batch).min(ids.len())];
                        batch_round_trips(&mut conn, &prefix, group).await?;
                        super::advance(group.len());
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

/// One pipelined round trip of claims, then one of completions (on a Redis Cluster, whose
/// pipelines go to one node, the commands of a round are sent concurrently instead).
async fn batch_round_trips(
    conn: &mut RedisConnection,
    prefix: &str,
    group: &[String],
) -> anyhow::Result<()> {
    let keys: Vec<String> = group.iter().map(|id| format!("{prefix}{id}")).collect();
    let claims = keys.iter().map(|k| {
        let mut c = redis::cmd("SET");
        c.arg(k)
            .arg("IN_PROGRESS")
            .arg("NX")
            .arg("PX")
            .arg(LEASE_MS);
        c
    });
    let claimed = round_trip(conn, claims).await?;
    ensure!(
        claimed.iter().all(|v| *v == Value::Okay),
        "a baseline claim did not insert"
    );
    let completions = keys.iter().map(|k| {
        let mut c = redis::cmd("SET");
        c.arg(k).arg("C:").arg("PX").arg(RETENTION_MS);
        c
    });
    round_trip(conn, completions).await?;
    Ok(())
}

/// Sends `cmds` at once: one pipeline on a single server, concurrent commands on a cluster.
async fn round_trip(
    conn: &mut RedisConnection,
    cmds: impl Iterator<Item = redis::Cmd>,
) -> redis::RedisResult<Vec<Value>> {
    if let RedisConnection::Cluster(_) = conn {
        let sends = cmds.map(|c| {
            let mut conn = conn.clone();
            async move { c.query_async::<Value>(&mut conn).await }
        });
        return futures_util::future::try_join_all(sends).await;
    }
    let mut pipe = redis::pipe();
    for c in cmds {
        pipe.add_command(c);
    }
    pipe.query_async(conn).await
}

/// The `SCAN` pattern of the idem records of namespace `ns`.
fn namespace_pattern(store: &RedisStore, ns: &Namespace) -> String {
    format!("{}{{{}:*", glob_escape(store.prefix()), ns)
}

/// The `SCAN` pattern of every key under `prefix`.
fn prefix_pattern(prefix: &str) -> String {
    format!("{}*", glob_escape(prefix))
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Deletes every key matching `pattern` (what a run wrote), so that benchmarks leave nothing
/// behind in the scratch database.
async fn cleanup(store: &RedisStore, pattern: &str) -> anyhow::Result<usize> {
    let keys = store
        .scan_keys(pattern)
        .await
        .context("cleaning up the benchmark's keys")?;
    unlink(store, &keys)
        .await
        .context("cleaning up the benchmark's keys")
}

/// Deletes `keys`, one `UNLINK` per key (a Redis Cluster refuses one command over keys of
/// several slots); returns how many existed.
async fn unlink(store: &RedisStore, keys: &[Vec<u8>]) -> redis::RedisResult<usize> {
    let mut conn = store.connection();
    let mut deleted = 0;
    for chunk in keys.chunks(1_000) {
        let cmds = chunk.iter().map(|k| {
            let mut c = redis::cmd("UNLINK");
            c.arg(k);
            c
        });
        for v in round_trip(&mut conn, cmds).await? {
            deleted += usize::from(v == Value::Int(1));
        }
    }
    Ok(deleted)
}
