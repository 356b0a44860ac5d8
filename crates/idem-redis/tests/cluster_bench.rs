//! What a Redis Cluster costs against one server, measured (ignored by default: a benchmark,
//! not a check; it asserts only that every message was claimed and completed once):
//!
//! ```text
//! CI=1 cargo test --release -p idem-redis --test cluster_bench -- --ignored --nocapture
//! ```
//!
//! Two profiles, each on the shared standalone Redis (`IDEM_REDIS_URL`, default
//! `redis://127.0.0.1:6379`) in both batching modes and on the shared cluster
//! (`IDEM_REDIS_CLUSTER_URL`, default `redis://127.0.0.1:7000`) without and with `WAIT 1`:
//! - `sequential`: one task, `claim` then `complete` per message (two round trips each);
//! - `batched`: `IDEM_BENCH_TASKS` tasks (default 8), each `claim_many` then `complete_many`
//!   of `IDEM_BENCH_BATCH` messages (default 64).
//!
//! The configurations alternate in rounds (each on its own keys), so that the drift of a
//! shared machine falls on all of them alike; the ratios are against the standalone server
//! with `Batching::Script`, measured in the same rounds. Everything written is evicted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use idem::{Claim, ClaimRequest, Completion, Fingerprint, Key, Namespace, Store, WriteOutcome};
use idem_conformance::server;
use idem_redis::{Batching, RedisStore};

const ROUNDS: usize = 5;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn req(k: &Key) -> ClaimRequest {
    ClaimRequest::new(k.clone(), Fingerprint::of(b"payload"))
        .lease(Duration::from_secs(60))
        .retention(Duration::from_secs(600))
}

async fn sequential(store: &RedisStore, keys: &[Key]) -> Duration {
    let start = Instant::now();
    for k in keys {
        let r = req(k);
        assert!(matches!(store.claim(&r).await.unwrap(), Claim::Acquired(_)));
        let done = Completion::new(k.clone(), r.token, Bytes::from_static(b"ok"));
        assert_eq!(store.complete(&done).await.unwrap(), WriteOutcome::Applied);
    }
    start.elapsed()
}

async fn batched(store: &RedisStore, keys: &[Key], tasks: usize, batch: usize) -> Duration {
    let keys = Arc::new(keys.to_vec());
    let start = Instant::now();
    let per_task = keys.len().div_ceil(tasks);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (store, keys) = (store.clone(), Arc::clone(&keys));
        handles.push(tokio::spawn(async move {
            let mine = &keys[(t * per_task).min(keys.len())..((t + 1) * per_task).min(keys.len())];
            for chunk in mine.chunks(batch) {
                let reqs: Vec<ClaimRequest> = chunk.iter().map(req).collect();
                let claims = store.claim_many(&reqs).await.unwrap();
                assert!(claims.iter().all(|c| matches!(c, Claim::Acquired(_))));
                let done: Vec<Completion> = reqs
                    .iter()
                    .map(|r| Completion::new(r.key.clone(), r.token, Bytes::from_static(b"ok")))
                    .collect();
                let w = store.complete_many(&done).await.unwrap();
                assert!(w.iter().all(|w| *w == WriteOutcome::Applied));
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    start.elapsed()
}

async fn evict(store: &RedisStore, keys: &[Key]) {
    for chunk in keys.chunks(256) {
        let evictions = chunk.iter().map(|k| store.evict(k));
        for gone in futures_util::future::join_all(evictions).await {
            assert!(gone.unwrap());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --release -- --ignored --nocapture"]
async fn cluster_against_one_server() {
    let Some(single) = server::url(server::REDIS) else {
        return;
    };
    let Some(cluster) = server::url(("IDEM_REDIS_CLUSTER_URL", "redis://127.0.0.1:7000")) else {
        return;
    };
    let prefix = format!("idem-bench-cluster:{:016x}:", fastrand::u64(..));
    let connect = async |url: &str, batching: Batching, wait: bool| {
        let mut b = RedisStore::builder(url)
            .prefix(prefix.as_str())
            .batching(batching);
        if wait {
            b = b.wait_for_replicas(1, Duration::from_millis(500));
        }
        b.connect().await.unwrap()
    };
    let configs: Vec<(&str, RedisStore)> = vec![
        (
            "standalone, Batching::Script",
            connect(&single, Batching::Script, false).await,
        ),
        (
            "standalone, Batching::Pipeline",
            connect(&single, Batching::Pipeline, false).await,
        ),
        (
            "cluster (3 masters)",
            connect(&cluster, Batching::Script, false).await,
        ),
        (
            "cluster, WAIT 1",
            connect(&cluster, Batching::Script, true).await,
        ),
    ];
    assert!(configs[2].1.is_cluster());
    let (tasks, batch) = (env("IDEM_BENCH_TASKS", 8), env("IDEM_BENCH_BATCH", 64));
    let seq_n = env("IDEM_BENCH_SEQUENTIAL", 2_000);
    let batch_n = env("IDEM_BENCH_BATCHED", 20_000);
    let ns = Namespace::new(format!("b{:08x}", fastrand::u32(..))).unwrap();
    let mut seq = vec![Duration::ZERO; configs.len()];
    let mut bat = vec![Duration::ZERO; configs.len()];
    for round in 0..ROUNDS {
        for j in 0..configs.len() {
            // Alternate the order: every configuration runs first in some rounds.
            let i = (j + round) % configs.len();
            let store = &configs[i].1;
            let keys: Vec<Key> = (0..seq_n)
                .map(|n| ns.key(format!("s{round}-{i}-{n}")).unwrap())
                .collect();
            seq[i] += sequential(store, &keys).await;
            evict(store, &keys).await;
            let keys: Vec<Key> = (0..batch_n)
                .map(|n| ns.key(format!("b{round}-{i}-{n}")).unwrap())
                .collect();
            bat[i] += batched(store, &keys, tasks, batch).await;
            evict(store, &keys).await;
        }
    }
    let rate = |n: usize, d: Duration| (n * ROUNDS) as f64 / d.as_secs_f64();
    eprintln!(
        "messages/s (claim + complete each), {ROUNDS} alternating rounds; sequential: \
         {seq_n} per round, one task; batched: {batch_n} per round, {tasks} tasks x {batch}"
    );
    eprintln!("| configuration | sequential | ratio | batched | ratio |\n|---|---|---|---|---|");
    let (s0, b0) = (rate(seq_n, seq[0]), rate(batch_n, bat[0]));
    for (i, (name, _)) in configs.iter().enumerate() {
        let (s, b) = (rate(seq_n, seq[i]), rate(batch_n, bat[i]));
        eprintln!(
            "| {name} | {s:.0} | {:.2} | {b:.0} | {:.2} |",
            s / s0,
            b / b0
        );
    }
}
