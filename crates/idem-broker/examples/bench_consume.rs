//! Consumption throughput through idem next to raw manual-ack consumption of the same messages
//! on the same broker, in the same run. Prints one JSON object per line.
//!
//! ```sh
//! cargo run --release -p idem-broker --features amqp,nats --example bench_consume -- \
//!     [--messages 20000] [--rounds 3] [--broker amqp|nats|all] [--batch 64] [--concurrency 4] \
//!     [--stores memory,sqlite,redis] [--extras true|false] [--processes 1,2,4,8]
//! ```
//!
//! For each broker and round, a fresh queue (or stream) is filled with `--messages` 64-byte
//! messages with distinct message ids (publishing is not timed), then drained by:
//! - `raw` (the baseline of `ratio`): the broker's client with manual acks, one ack per message,
//!   sent as the message arrives without waiting for the previous acks (RabbitMQ: `basic.ack`
//!   per delivery, up to 256 in flight at once; JetStream: AckSync as a request on the client's
//!   shared reply inbox, as idem's adapter does it, up to 256 in flight), prefetch 256;
//! - extra baselines (skipped with `--extras false`, for profiles):
//!   - `raw-awaited-ack` (RabbitMQ): the usual lapin loop, each `basic.ack` awaited before the
//!     next delivery is taken;
//!   - `raw-double-ack` (JetStream): async-nats's `double_ack`, which subscribes a new inbox for
//!     every ack;
//!   - `raw-multiple-ack` (RabbitMQ): one `basic.ack(multiple = true)` per 64 deliveries;
//!     `raw-async-ack` (JetStream): plain `+ACK`s, not waiting for the server. These are the
//!     cheapest hand-written consumers, with weaker guarantees (a lost `+ACK` is not noticed);
//! - `idem-memory` / `idem-sqlite` / `idem-redis` / `idem-postgres`: [`Consumer`] in store mode
//!   with a no-op handler over `MemoryStore` / a SQLite file in a temporary directory
//!   (`synchronous=NORMAL`) / the Redis store (`IDEM_REDIS_URL`, default
//!   `redis://127.0.0.1:6379`, keys under a prefix of the round, deleted afterwards) / the
//!   PostgreSQL store (`IDEM_POSTGRES_URL`, a schema of the round's own, dropped afterwards),
//!   `--batch` (64) deliveries per batch, `--concurrency` (4) batches in flight, the same
//!   prefetch;
//! - `idem-sqlite-tx` / `idem-postgres-tx`: [`Consumer::transactional`], whose handler inserts
//!   one row per message in the transaction that records it (so it does more than the no-op
//!   handlers above: the effect itself).
//!
//! - with `--processes N,...` (for `sqlite` and `redis`, whose store processes can share): the
//!   same drain by N **consumer processes** (this example started again as children), all on
//!   one queue and one store (one SQLite file; one Redis key prefix), each with `--batch` and
//!   `--concurrency`: mode `idem-<store>-pN`. The children connect, then start together; the
//!   clock runs from that start to the last ack any of them reports, and the parent checks
//!   that the children executed each message exactly once between them.
//!
//! The clock starts once connected (the queue full) and stops when the last message is acked.
//! To profile one mode's drain only (system-wide, the broker included):
//! `mkfifo /tmp/ctl; PERF_CTL_FIFO=/tmp/ctl IDEM_BENCH_PROFILE=idem perf record -a -g -D -1
//! --control fifo:/tmp/ctl -- bench_consume --broker nats --stores sqlite --extras false`.
//! `ratio` is msgs/s over the same round's `raw` msgs/s. To measure another store, build a
//! [`Consumer`] with it in `idem_run` (any `idem::Store` plugs in).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::future::join_all;
use futures_util::{FutureExt, StreamExt};
use idem::{Attempt, Config, Executor, MemoryStore, Namespace, Store, Transactional, TxFuture};
use idem_broker::{Consumer, Message, Source};
use idem_redis::RedisStore;
use idem_sqlite::SqliteStore;

const PAYLOAD: &[u8] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const PREFETCH: u16 = 256;

#[derive(Clone, Copy)]
enum Broker {
    Amqp,
    Nats,
}

impl Broker {
    fn name(self) -> &'static str {
        match self {
            Broker::Amqp => "rabbitmq",
            Broker::Nats => "nats",
        }
    }
}

struct Args {
    messages: usize,
    rounds: usize,
    brokers: Vec<Broker>,
    batch: usize,
    concurrency: usize,
    stores: Vec<String>,
    extras: bool,
    /// Consumer process counts for the multi-process drains (empty: none).
    processes: Vec<usize>,
    /// A child of a multi-process drain: the queue or stream it consumes.
    child_target: Option<String>,
    /// A child's store: a SQLite path, or a Redis key prefix.
    child_store: Option<String>,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args {
        messages: 20_000,
        rounds: 3,
        brokers: vec![Broker::Amqp, Broker::Nats],
        batch: 64,
        concurrency: 4,
        stores: vec!["memory".into(), "sqlite".into(), "redis".into()],
        extras: true,
        processes: Vec::new(),
        child_target: None,
        child_store: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--messages" => args.messages = value.parse()?,
            "--rounds" => args.rounds = value.parse()?,
            "--batch" => args.batch = value.parse()?,
            "--concurrency" => args.concurrency = value.parse()?,
            "--stores" => args.stores = value.split(',').map(str::to_owned).collect(),
            "--extras" => args.extras = value.parse()?,
            "--processes" => {
                args.processes = value.split(',').map(str::parse).collect::<Result<_, _>>()?;
            }
            "--child-target" => args.child_target = Some(value),
            "--child-store" => args.child_store = Some(value),
            "--broker" => {
                args.brokers = match value.as_str() {
                    "amqp" | "rabbitmq" => vec![Broker::Amqp],
                    "nats" => vec![Broker::Nats],
                    "all" => vec![Broker::Amqp, Broker::Nats],
                    other => anyhow::bail!("unknown broker {other}"),
                }
            }
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

fn print(
    broker: Broker,
    round: usize,
    mode: &str,
    n: usize,
    elapsed: Duration,
    raw: Option<f64>,
) -> f64 {
    let rate = n as f64 / elapsed.as_secs_f64();
    let line = serde_json::json!({
        "broker": broker.name(),
        "round": round,
        "mode": mode,
        "messages": n,
        "seconds": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        "msgs_per_s": rate.round(),
        "ratio": raw.map(|r| (rate / r * 100.0).round() / 100.0),
    });
    println!("{line}");
    rate
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    if args.child_target.is_some() {
        return child(&args).await;
    }
    let amqp = std::env::var("IDEM_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let nats =
        std::env::var("IDEM_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let redis =
        std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let postgres = std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    for round in 1..=args.rounds {
        for &broker in &args.brokers {
            let url = match broker {
                Broker::Amqp => &amqp,
                Broker::Nats => &nats,
            };
            let n = args.messages;
            let name = format!(
                "idem-bench-{}-{round}-{:06x}",
                std::process::id(),
                fastrand::u32(..0xffffff)
            );
            let raw_rate = {
                let target = fill(broker, url, &format!("{name}-raw"), n).await?;
                let elapsed = raw(broker, url, &target, n, RawAcks::Pipelined).await?;
                cleanup(broker, url, &target).await;
                print(broker, round, "raw", n, elapsed, None)
            };
            let extra = match broker {
                Broker::Amqp => [
                    (RawAcks::Awaited, "raw-awaited-ack"),
                    (RawAcks::Cheapest, "raw-multiple-ack"),
                ],
                Broker::Nats => [
                    (RawAcks::DoubleAck, "raw-double-ack"),
                    (RawAcks::Cheapest, "raw-async-ack"),
                ],
            };
            for (acks, mode) in extra.into_iter().filter(|_| args.extras) {
                let target = fill(broker, url, &format!("{name}-rawx"), n).await?;
                let elapsed = raw(broker, url, &target, n, acks).await?;
                cleanup(broker, url, &target).await;
                print(broker, round, mode, n, elapsed, Some(raw_rate));
            }
            for store in &args.stores {
                let target = fill(broker, url, &format!("{name}-{store}"), n).await?;
                let elapsed = match store.as_str() {
                    "memory" => idem_run(broker, url, &target, &args, MemoryStore::new()).await?,
                    "sqlite" => {
                        let dir = tempfile::tempdir()?;
                        let store = SqliteStore::open(dir.path().join("bench.db"))?;
                        idem_run(broker, url, &target, &args, store).await?
                    }
                    "redis" => {
                        let prefix = format!("{name}:");
                        let store = RedisStore::builder(redis.as_str())
                            .prefix(prefix.as_str())
                            .connect()
                            .await?;
                        let elapsed = idem_run(broker, url, &target, &args, store.clone()).await;
                        delete_prefix(&store, &prefix).await?;
                        elapsed?
                    }
                    "sqlite-tx" => {
                        let dir = tempfile::tempdir()?;
                        let path = dir.path().join("bench.db");
                        rusqlite::Connection::open(&path)?
                            .execute_batch("CREATE TABLE effects (id TEXT NOT NULL)")?;
                        let store = SqliteStore::open(&path)?;
                        idem_tx_run(
                            broker,
                            url,
                            &target,
                            &args,
                            store,
                            |m: &Message, conn: &mut rusqlite::Connection| {
                                let id = m.message_id().unwrap_or("").to_owned();
                                Box::pin(async move {
                                    conn.prepare_cached("INSERT INTO effects (id) VALUES (?1)")?
                                        .execute([id])
                                        .map(drop)
                                })
                            },
                        )
                        .await?
                    }
                    "postgres" | "postgres-tx" => {
                        let schema = format!("bench_{}", name.replace('-', "_"));
                        let pg = PgSchema::create(&postgres, &schema).await?;
                        let transactional = store == "postgres-tx";
                        let store = idem_postgres::PostgresStore::builder(postgres.as_str())
                            .schema(schema.as_str())
                            .connect()
                            .await?;
                        let insert: Arc<str> =
                            format!("INSERT INTO {schema}.effects (id) VALUES ($1)").into();
                        let elapsed = if transactional {
                            idem_tx_run(
                                broker,
                                url,
                                &target,
                                &args,
                                store,
                                move |m: &Message, tx: &mut idem_postgres::TxClient| {
                                    let id = m.message_id().unwrap_or("").to_owned();
                                    let insert = Arc::clone(&insert);
                                    Box::pin(
                                        async move { tx.execute(&*insert, &[&id]).await.map(drop) },
                                    )
                                },
                            )
                            .await
                        } else {
                            idem_run(broker, url, &target, &args, store).await
                        };
                        pg.drop().await;
                        elapsed?
                    }
                    other => anyhow::bail!(
                        "unknown store {other} (memory, sqlite, redis, postgres, sqlite-tx, \
                         postgres-tx)"
                    ),
                };
                cleanup(broker, url, &target).await;
                let mode = format!("idem-{store}");
                print(broker, round, &mode, n, elapsed, Some(raw_rate));
                if !matches!(store.as_str(), "sqlite" | "redis") {
                    continue;
                }
                for &processes in &args.processes {
                    let target =
                        fill(broker, url, &format!("{name}-{store}-p{processes}"), n).await?;
                    let dir = tempfile::tempdir()?;
                    let shared = match store.as_str() {
                        "sqlite" => dir.path().join("bench.db").display().to_string(),
                        _ => format!("{name}-p{processes}:"),
                    };
                    if store == "sqlite" {
                        // Created (and migrated) once, before the children open it.
                        drop(SqliteStore::open(&shared)?);
                    }
                    let elapsed = multi(broker, &target, store, &shared, processes, &args).await;
                    if store == "redis" {
                        let cleaner = RedisStore::builder(redis.as_str())
                            .prefix(shared.as_str())
                            .connect()
                            .await?;
                        delete_prefix(&cleaner, &shared).await?;
                    }
                    cleanup(broker, url, &target).await;
                    let mode = format!("idem-{store}-p{processes}");
                    print(broker, round, &mode, n, elapsed?, Some(raw_rate));
                }
            }
        }
    }
    Ok(())
}

/// With `PERF_CTL_FIFO` (a `perf record --control fifo:...` FIFO) and `IDEM_BENCH_PROFILE`
/// (`raw` or `idem`), `perf` records only while that mode drains. Returns the start instant.
fn profile(main_raw_or_idem: bool, mode: &str) -> Instant {
    if main_raw_or_idem && std::env::var("IDEM_BENCH_PROFILE").is_ok_and(|m| m == mode) {
        perf_ctl("enable");
    }
    phase("begin drain");
    Instant::now()
}

fn profile_end() {
    phase("end drain");
    if std::env::var("IDEM_BENCH_PROFILE").is_ok() {
        perf_ctl("disable");
    }
}

/// Marks the start and the end of every drain for `valgrind --tool=callgrind
/// --dump-before='*idem_bench_phase'`: callgrind writes one profile (the whole process, every
/// thread; the broker's own process is not counted) per stretch between two calls, so the
/// profile written at an `end drain` call (`callgrind.out.<pid>.<n>`) holds one mode's drain
/// alone, filling and cleaning up left out. The drains come in the order of the JSON lines.
/// With `IDEM_BENCH_PHASES` set, each call prints `idem-bench-phase <n> <label>` on stderr.
fn phase(label: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
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

/// How often [`drain`] looks whether every message was acked: every 500 µs, or
/// `IDEM_BENCH_POLL_US` (under callgrind, which runs the program about 50 times slower, a
/// rarer look keeps the waiting loop's own instructions out of the per-message count).
fn poll_interval() -> Duration {
    let us = std::env::var("IDEM_BENCH_POLL_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    Duration::from_micros(us)
}

fn perf_ctl(command: &str) {
    use std::io::Write;
    if let Ok(path) = std::env::var("PERF_CTL_FIFO")
        && let Ok(mut fifo) = std::fs::OpenOptions::new().write(true).open(path)
    {
        let _ = writeln!(fifo, "{command}");
    }
}

/// Deletes the Redis store's records of a round.
async fn delete_prefix(store: &RedisStore, prefix: &str) -> anyhow::Result<()> {
    let keys = store.scan_keys(&format!("{prefix}*")).await?;
    let conn = store.connection();
    // One key per command, sent concurrently: a Redis Cluster refuses a command over keys of
    // several slots, and sends a pipeline to one node.
    for chunk in keys.chunks(1000) {
        let unlinks = chunk.iter().map(|k| {
            let mut conn = conn.clone();
            async move {
                idem_redis::redis::cmd("UNLINK")
                    .arg(k)
                    .query_async::<i64>(&mut conn)
                    .await
            }
        });
        futures_util::future::try_join_all(unlinks).await?;
    }
    Ok(())
}

/// Fills a new queue or stream with `n` messages; returns its name.
async fn fill(broker: Broker, url: &str, name: &str, n: usize) -> anyhow::Result<String> {
    match broker {
        Broker::Amqp => {
            use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
            // The source declares the queue as idem would use it; the raw run uses it too.
            let source = idem_broker::amqp::AmqpSource::connect(
                url,
                idem_broker::amqp::AmqpConfig::new(name),
            )
            .await?;
            source.close().await;
            let conn =
                lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
                for i in chunk {
                    let props = lapin::BasicProperties::default()
                        .with_message_id(format!("m-{i}").as_str().into())
                        .with_delivery_mode(2);
                    let _confirm = ch
                        .basic_publish(
                            "".into(),
                            name.into(),
                            BasicPublishOptions::default(),
                            PAYLOAD,
                            props,
                        )
                        .await?;
                }
                ch.wait_for_confirms().await?;
            }
            let _ = conn.close(200, "filled".into()).await;
            Ok(name.to_owned())
        }
        Broker::Nats => {
            let stream = name.replace('-', "_").to_uppercase();
            let subject = format!("{}.>", stream.to_lowercase());
            let source = idem_broker::nats::NatsSource::connect(
                url,
                idem_broker::nats::NatsConfig::new(&stream, &subject, "c"),
            )
            .await?;
            source.close().await;
            let js = async_nats::jetstream::new(async_nats::connect(url).await?);
            let subject = subject.replace('>', "m");
            for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
                let mut acks = Vec::with_capacity(chunk.len());
                for i in chunk {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", format!("m-{i}").as_str());
                    acks.push(
                        js.publish_with_headers(subject.clone(), headers, PAYLOAD.into())
                            .await?,
                    );
                }
                for r in join_all(acks.into_iter().map(std::future::IntoFuture::into_future)).await
                {
                    r?;
                }
            }
            Ok(stream)
        }
    }
}

async fn cleanup(broker: Broker, url: &str, target: &str) {
    match broker {
        Broker::Amqp => {
            if let Ok(conn) =
                lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await
                && let Ok(ch) = conn.create_channel().await
            {
                for q in [target.to_owned(), format!("{target}.dlq")] {
                    let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
                }
                let _ = ch
                    .exchange_delete(format!("{target}.dlx").as_str().into(), Default::default())
                    .await;
                let _ = conn.close(200, "bye".into()).await;
            }
        }
        Broker::Nats => {
            if let Ok(client) = async_nats::connect(url).await {
                let js = async_nats::jetstream::new(client);
                let _ = js.delete_stream(target).await;
                let _ = js.delete_stream(format!("{target}_DLQ")).await;
            }
        }
    }
}

/// How the raw consumer acks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RawAcks {
    /// One ack per message, sent as the message arrives without waiting for earlier ones (up to
    /// the prefetch in flight): RabbitMQ `basic.ack`, JetStream AckSync (like idem).
    Pipelined,
    /// RabbitMQ only: each `basic.ack` awaited before the next delivery is taken.
    Awaited,
    /// JetStream only: async-nats's own AckSync, `double_ack`, which subscribes a new inbox for
    /// every ack.
    DoubleAck,
    /// The cheapest a hand-written consumer can do: RabbitMQ `basic.ack(multiple)` once per 64
    /// deliveries; JetStream plain `+ACK` without waiting for the server.
    Cheapest,
}

/// Drains `n` messages with the broker's client and manual acks.
async fn raw(
    broker: Broker,
    url: &str,
    target: &str,
    n: usize,
    acks: RawAcks,
) -> anyhow::Result<Duration> {
    match broker {
        Broker::Amqp => {
            use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
            let conn =
                lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
            let mut consumer = ch
                .basic_consume(
                    target.into(),
                    "raw".into(),
                    BasicConsumeOptions::default(),
                    Default::default(),
                )
                .await?;
            let start = profile(acks == RawAcks::Pipelined, "raw");
            let mut acked = 0;
            let mut unacked = Vec::new();
            if acks == RawAcks::Pipelined {
                // One `basic.ack` per delivery, each sent as its delivery arrives; the frames
                // are written while the next deliveries are taken.
                let mut pending = futures_util::stream::FuturesUnordered::new();
                while acked < n {
                    tokio::select! {
                        Some(r) = pending.next(), if !pending.is_empty() => {
                            let r: Result<(), lapin::Error> = r;
                            r?;
                            acked += 1;
                        }
                        d = consumer.next(), if pending.len() < usize::from(PREFETCH) => {
                            let d = d.context("consumer ended")??;
                            pending.push(async move {
                                d.acker.ack(BasicAckOptions::default()).await.map(drop)
                            });
                        }
                    }
                }
            }
            while acked < n {
                let d = consumer.next().await.context("consumer ended")??;
                if acks == RawAcks::Awaited {
                    d.acker.ack(BasicAckOptions::default()).await?;
                    acked += 1;
                    continue;
                }
                unacked.push(d);
                if unacked.len() >= 64 || acked + unacked.len() == n {
                    if let Some(last) = unacked.last() {
                        last.acker.ack(BasicAckOptions { multiple: true }).await?;
                    }
                    acked += unacked.len();
                    unacked.clear();
                }
            }
            let elapsed = start.elapsed();
            profile_end();
            let _ = conn.close(200, "done".into()).await;
            Ok(elapsed)
        }
        Broker::Nats => {
            let client = async_nats::connect(url).await?;
            let js = async_nats::jetstream::new(client.clone());
            let stream = js.get_stream(target).await?;
            let consumer: async_nats::jetstream::consumer::PullConsumer = stream
                .get_consumer("c")
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut messages = consumer
                .stream()
                .max_messages_per_batch(usize::from(PREFETCH))
                .messages()
                .await?;
            let start = profile(acks == RawAcks::Pipelined, "raw");
            // AckSync like idem's adapter; acks in flight concurrently, as many as the prefetch.
            let mut pending = futures_util::stream::FuturesUnordered::new();
            let mut acked = 0;
            while acked < n {
                tokio::select! {
                    Some(r) = pending.next(), if !pending.is_empty() => {
                        let r: Result<(), async_nats::Error> = r;
                        r.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
                        acked += 1;
                    }
                    m = messages.next(), if pending.len() < usize::from(PREFETCH) => {
                        let m = m.context("pull stream ended")?.map_err(|e| anyhow::anyhow!("{e}"))?;
                        match acks {
                            // AckSync as idem's adapter does it: a request on the shared reply
                            // inbox (`double_ack` subscribes a new inbox per ack, and is slower).
                            RawAcks::Pipelined | RawAcks::Awaited => {
                                let client = client.clone();
                                let reply = m.reply.clone().context("no reply subject")?;
                                pending.push(
                                    async move {
                                        client
                                            .request(reply, bytes::Bytes::from_static(b"+ACK"))
                                            .await
                                            .map(drop)
                                            .map_err(async_nats::Error::from)
                                    }
                                    .boxed(),
                                );
                            }
                            RawAcks::DoubleAck => pending.push(async move { m.double_ack().await }.boxed()),
                            RawAcks::Cheapest => pending.push(async move { m.ack().await }.boxed()),
                        }
                    }
                }
            }
            let elapsed = start.elapsed();
            profile_end();
            Ok(elapsed)
        }
    }
}

/// Drains `n` messages through idem's consumer runtime over `store`.
async fn idem_run<S: Store>(
    broker: Broker,
    url: &str,
    target: &str,
    args: &Args,
    store: S,
) -> anyhow::Result<Duration> {
    let exec = Executor::new(store);
    let ns = Namespace::new("bench")?;
    let handler = |_m: Message, _a: Attempt| async { Ok::<_, std::io::Error>(()) };
    match broker {
        Broker::Amqp => {
            let source = idem_broker::amqp::AmqpSource::connect(
                url,
                idem_broker::amqp::AmqpConfig::new(target).prefetch(PREFETCH),
            )
            .await?;
            drain(Consumer::new(source, exec, ns, handler), args).await
        }
        Broker::Nats => {
            let stream = target.to_owned();
            let subject = format!("{}.>", stream.to_lowercase());
            let mut config = idem_broker::nats::NatsConfig::new(&stream, &subject, "c");
            config.pull_batch = usize::from(PREFETCH);
            let source = idem_broker::nats::NatsSource::connect(url, config).await?;
            drain(Consumer::new(source, exec, ns, handler), args).await
        }
    }
}

/// Transactional mode: `handler` writes one row per message in the transaction that records it.
async fn idem_tx_run<S, H, E>(
    broker: Broker,
    url: &str,
    target: &str,
    args: &Args,
    store: S,
    handler: H,
) -> anyhow::Result<Duration>
where
    S: Transactional,
    H: for<'a> Fn(&'a Message, &'a mut S::Tx) -> TxFuture<'a, (), E> + Send + Sync + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let ns = Namespace::new("bench")?;
    let config = Config::default();
    match broker {
        Broker::Amqp => {
            let source = idem_broker::amqp::AmqpSource::connect(
                url,
                idem_broker::amqp::AmqpConfig::new(target).prefetch(PREFETCH),
            )
            .await?;
            drain(
                Consumer::transactional(source, store, config, ns, handler),
                args,
            )
            .await
        }
        Broker::Nats => {
            let stream = target.to_owned();
            let subject = format!("{}.>", stream.to_lowercase());
            let mut nats = idem_broker::nats::NatsConfig::new(&stream, &subject, "c");
            nats.pull_batch = usize::from(PREFETCH);
            let source = idem_broker::nats::NatsSource::connect(url, nats).await?;
            drain(
                Consumer::transactional(source, store, config, ns, handler),
                args,
            )
            .await
        }
    }
}

/// A PostgreSQL schema of one round: idem's table and an effects table, dropped afterwards.
struct PgSchema {
    client: tokio_postgres::Client,
    schema: String,
}

impl PgSchema {
    async fn create(url: &str, schema: &str) -> anyhow::Result<PgSchema> {
        idem_postgres::PostgresStore::builder(url)
            .schema(schema)
            .migrate()
            .await?;
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE TABLE {schema}.effects (id TEXT NOT NULL)"))
            .await?;
        Ok(PgSchema {
            client,
            schema: schema.to_owned(),
        })
    }

    async fn drop(self) {
        let _ = self
            .client
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .await;
    }
}

async fn drain<Src: Source, P: idem_broker::Processor>(
    consumer: Consumer<Src, P>,
    args: &Args,
) -> anyhow::Result<Duration> {
    let n = args.messages;
    let consumer = consumer
        .batch_size(args.batch)
        .concurrency(args.concurrency);
    if args.child_target.is_some() {
        return child_drain(consumer).await;
    }
    let stats: Arc<idem_broker::Stats> = consumer.stats();
    let start = profile(true, "idem");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(consumer.run(async {
        let _ = stopped.await;
    }));
    let poll = poll_interval();
    while (stats.snapshot().acked as usize) < n {
        anyhow::ensure!(!run.is_finished(), "consumer stopped early");
        tokio::time::sleep(poll).await;
    }
    let elapsed = start.elapsed();
    profile_end();
    let _ = stop.send(());
    let snap = run.await??;
    anyhow::ensure!(
        snap.executed as usize == n,
        "executed {} of {n}",
        snap.executed
    );
    Ok(elapsed)
}

/// Drains `target` with `processes` children of this example sharing the store `shared` (a
/// SQLite path or a Redis prefix); returns the time from their common start to the last ack
/// one of them reported.
async fn multi(
    broker: Broker,
    target: &str,
    store: &str,
    shared: &str,
    processes: usize,
    args: &Args,
) -> anyhow::Result<Duration> {
    use std::io::{BufRead, Write};
    use std::process::{Command, Stdio};

    let n = args.messages;
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for _ in 0..processes {
        let child = Command::new(&exe)
            .args([
                "--broker",
                if matches!(broker, Broker::Amqp) {
                    "amqp"
                } else {
                    "nats"
                },
                "--stores",
                store,
                "--messages",
                &n.to_string(),
                "--batch",
                &args.batch.to_string(),
                "--concurrency",
                &args.concurrency.to_string(),
                "--child-target",
                target,
                "--child-store",
                shared,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        children.push(child);
    }
    // Each child's acked count, as it reports it; its last line is `executed N`.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, String)>();
    for (i, c) in children.iter_mut().enumerate() {
        let out = c.stdout.take().context("child stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((i, line));
            }
        });
    }
    drop(tx);
    let mut ready = 0;
    while ready < processes {
        let (_, line) = rx
            .recv()
            .await
            .context("a child exited before it was ready")?;
        if line == "ready" {
            ready += 1;
        }
    }
    let mut stdins: Vec<_> = children
        .iter_mut()
        .map(|c| c.stdin.take().context("child stdin"))
        .collect::<anyhow::Result<_>>()?;
    let start = Instant::now();
    for s in &mut stdins {
        writeln!(s, "go")?;
        s.flush()?;
    }
    let mut acked = vec![0usize; processes];
    let mut last = start;
    while acked.iter().sum::<usize>() < n {
        let (i, line) = tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .context("no progress from the children in 120 s")?
            .context("the children exited before draining the queue")?;
        if let Some(v) = line.strip_prefix("acked ") {
            acked[i] = v.parse()?;
            last = Instant::now();
        }
    }
    let elapsed = last.duration_since(start);
    drop(stdins); // the children stop
    let mut executed = 0;
    while let Some((_, line)) = rx.recv().await {
        if let Some(v) = line.strip_prefix("executed ") {
            executed += v.parse::<usize>()?;
        }
    }
    for mut c in children {
        anyhow::ensure!(c.wait()?.success(), "a child failed");
    }
    anyhow::ensure!(
        executed == n,
        "{processes} processes executed {executed} of {n} messages"
    );
    Ok(elapsed)
}

/// A child of [`multi`]: connects its source and store, says `ready`, waits for `go`, then
/// consumes, printing `acked N` as acks land, until its standard input closes; then prints
/// `executed N`.
async fn child(args: &Args) -> anyhow::Result<()> {
    let broker = args.brokers[0];
    let url = match broker {
        Broker::Amqp => std::env::var("IDEM_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
        Broker::Nats => {
            std::env::var("IDEM_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
        }
    };
    let target = args.child_target.clone().context("--child-target")?;
    let shared = args.child_store.clone().context("--child-store")?;
    match args.stores.first().map(String::as_str) {
        Some("sqlite") => {
            let store = SqliteStore::open(&shared)?;
            idem_run(broker, &url, &target, args, store).await?;
        }
        Some("redis") => {
            let redis = std::env::var("IDEM_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
            let store = RedisStore::builder(redis.as_str())
                .prefix(shared.as_str())
                .connect()
                .await?;
            idem_run(broker, &url, &target, args, store).await?;
        }
        other => anyhow::bail!("a child runs sqlite or redis, not {other:?}"),
    }
    Ok(())
}

/// The consuming part of [`child`].
async fn child_drain<Src: Source, P: idem_broker::Processor>(
    consumer: Consumer<Src, P>,
) -> anyhow::Result<Duration> {
    use std::io::{BufRead, Write};

    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut lines = std::io::stdin().lock().lines();
        if matches!(lines.next(), Some(Ok(l)) if l == "go") {
            let _ = go_tx.send(());
        }
        for _ in lines.by_ref() {}
        let _ = stop_tx.send(());
    });
    let stats: Arc<idem_broker::Stats> = consumer.stats();
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready")?;
        out.flush()?;
    }
    go_rx.await.context("no go")?;
    let run = tokio::spawn(consumer.run(async {
        let _ = stop_rx.await;
    }));
    let mut reported = 0;
    while !run.is_finished() {
        let acked = stats.snapshot().acked;
        if acked != reported {
            reported = acked;
            let mut out = std::io::stdout().lock();
            writeln!(out, "acked {acked}")?;
            out.flush()?;
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let snap = run.await??;
    let mut out = std::io::stdout().lock();
    writeln!(out, "acked {}", snap.acked)?;
    writeln!(out, "executed {}", snap.executed)?;
    out.flush()?;
    Ok(Duration::ZERO)
}
