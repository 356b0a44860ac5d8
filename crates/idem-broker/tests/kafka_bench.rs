//! Consumption throughput of idem's Kafka adapter next to a raw rdkafka consumer of the same
//! messages, in the same run. Ignored by default; run with
//!
//! ```sh
//! cargo test --release -p idem-broker --features kafka --test kafka_bench -- --ignored --nocapture
//! ```
//!
//! Settings from the environment: `IDEM_BENCH_MESSAGES` (default 50000), `IDEM_BENCH_ROUNDS`
//! (3), `IDEM_BENCH_PARTITIONS` (4), `IDEM_BENCH_STORES` (`sqlite,redis`), `IDEM_KAFKA_URL`,
//! `IDEM_REDIS_URL`. Prints one JSON object per line.
//!
//! For each round and mode, a fresh topic is filled with 64-byte messages with distinct
//! message ids and no record key (publishing is not timed), then drained by a new group:
//! - `raw` (the baseline of `ratio`): an rdkafka `BaseConsumer` with
//!   `enable.auto.offset.store=false` and `enable.auto.commit=false` that stores each offset
//!   after a no-op handler and commits the stored offsets asynchronously every second, the
//!   interval idem's adapter uses by default;
//! - `idem-sqlite` / `idem-redis`: a [`Consumer`] in store mode with a no-op handler over a
//!   SQLite file in a temporary directory / the Redis store (keys under a prefix of the round,
//!   deleted afterwards), 64 deliveries per batch, 4 batches in flight.
//!
//! The clock starts when the group has assigned the partitions (the join, about 3 s on tansu,
//! is not timed) and stops when the last message is acked (idem) or its offset stored (raw).
#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use idem::{Attempt, Executor, Namespace, Store};
use idem_broker::kafka::admin::KafkaAdmin;
use idem_broker::kafka::{KafkaConfig, KafkaProducer, KafkaSource};
use idem_broker::{Admin, Consumer, Message, Outgoing};
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};

const PAYLOAD: &[u8] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bootstrap(url: &str) -> String {
    url.trim_start_matches("kafka://")
        .trim_end_matches('/')
        .to_owned()
}

/// A fresh topic with `n` messages.
async fn fill(url: &str, topic: &str, partitions: i32, n: usize) {
    // Connecting a source creates the topic.
    let source = KafkaSource::connect(
        url,
        KafkaConfig::new(topic, format!("{topic}.fill")).partitions(partitions),
    )
    .await
    .unwrap();
    idem_broker::Source::close(source).await;
    let producer = KafkaProducer::connect(url).await.unwrap();
    let msgs: Vec<Outgoing> = (0..n).map(|_| Outgoing::new(PAYLOAD)).collect();
    for chunk in msgs.chunks(2000) {
        for r in join_all(chunk.iter().map(|m| producer.publish_once(topic, m))).await {
            r.unwrap();
        }
    }
}

async fn cleanup(url: &str, topic: &str, group: &str) {
    let admin = KafkaAdmin::connect(url, KafkaConfig::new(topic, group))
        .await
        .unwrap();
    let _ = admin.cleanup().await;
}

struct RawContext {
    assigned: Arc<AtomicBool>,
}

impl ClientContext for RawContext {}

impl ConsumerContext for RawContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if matches!(rebalance, Rebalance::Assign(_)) {
            self.assigned.store(true, Ordering::SeqCst);
        }
    }
}

/// The baseline: store each offset after a no-op handler, commit every second.
fn raw(url: &str, topic: &str, group: &str, n: usize) -> Duration {
    let assigned = Arc::new(AtomicBool::new(false));
    let consumer: BaseConsumer<RawContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(url))
        .set("broker.address.family", "v4")
        .set("group.id", group)
        .set("enable.auto.offset.store", "false")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .create_with_context(RawContext {
            assigned: Arc::clone(&assigned),
        })
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut count = 0;
    let mut start = None;
    let mut next_commit = Instant::now() + COMMIT_INTERVAL;
    while count < n {
        let polled = consumer.poll(Duration::from_millis(100));
        if start.is_none() && assigned.load(Ordering::SeqCst) {
            start = Some(Instant::now());
        }
        if let Some(m) = polled {
            let m = m.unwrap();
            std::hint::black_box(rdkafka::Message::payload(&m));
            consumer.store_offset_from_message(&m).unwrap();
            count += 1;
        }
        if Instant::now() >= next_commit {
            let _ = consumer.commit_consumer_state(CommitMode::Async);
            next_commit = Instant::now() + COMMIT_INTERVAL;
        }
    }
    let elapsed = start.unwrap().elapsed();
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    elapsed
}

async fn idem_run<S: Store>(url: &str, topic: &str, group: &str, n: usize, store: S) -> Duration {
    let source = KafkaSource::connect(
        url,
        KafkaConfig::new(topic, group)
            .commit_interval(COMMIT_INTERVAL)
            .max_held(env(
                "IDEM_BENCH_MAX_HELD",
                KafkaConfig::new("t", "g").max_held,
            ))
            .declare(false),
    )
    .await
    .unwrap();
    let consumer = Consumer::new(
        source,
        Executor::new(store),
        Namespace::new("kafka-bench").unwrap(),
        |_m: Message, _a: Attempt| async { Ok::<_, std::io::Error>(()) },
    )
    .batch_size(64)
    .concurrency(4);
    let stats = consumer.stats();
    let start = Instant::now();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(consumer.run(async {
        let _ = stopped.await;
    }));
    while (stats.snapshot().acked as usize) < n {
        assert!(!run.is_finished(), "the consumer stopped early");
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let elapsed = start.elapsed();
    let _ = stop.send(());
    let snap = run.await.unwrap().unwrap();
    assert_eq!(snap.executed as usize, n, "{snap:?}");
    elapsed
}

async fn delete_prefix(store: &idem_redis::RedisStore, prefix: &str) {
    let mut conn = store.connection();
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = idem_redis::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: i64 = idem_redis::redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

fn print(round: usize, mode: &str, n: usize, elapsed: Duration, raw: Option<f64>) -> f64 {
    let rate = n as f64 / elapsed.as_secs_f64();
    let ratio = raw.map_or(String::new(), |r| format!(", \"ratio\": {:.2}", rate / r));
    println!(
        "{{\"broker\": \"kafka\", \"round\": {round}, \"mode\": \"{mode}\", \"messages\": {n}, \
         \"seconds\": {:.3}, \"msgs_per_s\": {rate:.0}{ratio}}}",
        elapsed.as_secs_f64()
    );
    rate
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --ignored --nocapture, in release"]
async fn kafka_consume_bench() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let url = std::env::var("IDEM_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:19092".into());
    let redis = std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let n: usize = env("IDEM_BENCH_MESSAGES", 50_000);
    let rounds: usize = env("IDEM_BENCH_ROUNDS", 3);
    let partitions: i32 = env("IDEM_BENCH_PARTITIONS", 4);
    let stores: String = env("IDEM_BENCH_STORES", "sqlite,redis".to_owned());
    for round in 1..=rounds {
        let name = format!(
            "idem-bench-kafka-{}-{round}-{:06x}",
            std::process::id(),
            fastrand::u32(..0xff_ffff)
        );
        let raw_rate = {
            let topic = format!("{name}-raw");
            let group = format!("{topic}.g");
            fill(&url, &topic, partitions, n).await;
            let (u, t, g) = (url.clone(), topic.clone(), group.clone());
            let elapsed = tokio::task::spawn_blocking(move || raw(&u, &t, &g, n))
                .await
                .unwrap();
            cleanup(&url, &topic, &group).await;
            print(round, "raw", n, elapsed, None)
        };
        for store in stores.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let topic = format!("{name}-{store}");
            let group = format!("{topic}.g");
            fill(&url, &topic, partitions, n).await;
            let elapsed = match store {
                "sqlite" => {
                    let dir = tempfile::tempdir().unwrap();
                    let store =
                        idem_sqlite::SqliteStore::open(dir.path().join("bench.db")).unwrap();
                    idem_run(&url, &topic, &group, n, store).await
                }
                "redis" => {
                    let prefix = format!("{name}:");
                    let store = idem_redis::RedisStore::builder(redis.as_str())
                        .prefix(prefix.as_str())
                        .connect()
                        .await
                        .unwrap();
                    let elapsed = idem_run(&url, &topic, &group, n, store.clone()).await;
                    delete_prefix(&store, &prefix).await;
                    elapsed
                }
                "memory" => idem_run(&url, &topic, &group, n, idem::MemoryStore::new()).await,
                other => panic!("unknown store {other}: sqlite, redis or memory"),
            };
            cleanup(&url, &topic, &group).await;
            print(round, &format!("idem-{store}"), n, elapsed, Some(raw_rate));
        }
    }
}
