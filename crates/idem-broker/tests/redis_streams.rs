//! Redis Streams adapter against the live server (`IDEM_REDIS_URL`), and against a private
//! `redis-server` for the restart test. Each test uses its own stream keys and deletes them.
#![cfg(feature = "redis-streams")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{
    Ledger, ServerProcess, free_port, numbered, sqlite_store, start, start_slow, unique, until,
};
use idem::{Attempt, Executor, MemoryStore, Namespace};
use idem_broker::redis_streams::{RedisStreamConfig, RedisStreamProducer, RedisStreamSource};
use idem_broker::{Acker, Consumer, Message, Outgoing, Source, header};
use idem_conformance::server;

fn url() -> Option<String> {
    server::url(server::REDIS)
}

fn ns() -> Namespace {
    Namespace::new("redis-test").unwrap()
}

fn config(stream: &str, consumer: &str) -> RedisStreamConfig {
    let mut c = RedisStreamConfig::new(stream, "g")
        .consumer(consumer)
        .claim_idle(Duration::from_secs(1));
    c.claim_interval = Duration::from_millis(100);
    c.block = Duration::from_millis(200);
    c
}

async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn cleanup(url: &str, stream: &str) {
    let _: () = redis::cmd("DEL")
        .arg(stream)
        .arg(format!("{stream}:dead-letter"))
        .query_async(&mut conn(url).await)
        .await
        .unwrap();
}

/// Entries of the group not acked yet.
async fn pending(url: &str, stream: &str) -> i64 {
    let v: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg("g")
        .query_async(&mut conn(url).await)
        .await
        .unwrap();
    match v {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            other => panic!("XPENDING: {other:?}"),
        },
        other => panic!("XPENDING: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_retries_are_applied_once() {
    // Redis has no publish dedup: a producer retry appends the message again. The store
    // recognises the copies by their message id.
    let Some(url) = url() else { return };
    let stream = unique("dups");
    let source = RedisStreamSource::connect(&url, config(&stream, "c1"))
        .await
        .unwrap();
    let producer = RedisStreamProducer::connect(&url).await.unwrap();
    let msgs: Vec<Outgoing> = (0..100)
        .map(|i| Outgoing::new(format!("{i}").into_bytes()))
        .collect();
    for _ in 0..3 {
        for m in &msgs {
            producer.publish_once(&stream, m).await.unwrap();
        }
    }
    let ledger = Ledger::default();
    let (store, _dir) = sqlite_store();
    let (stats, running) =
        start(Consumer::new(source, Executor::new(store), ns(), ledger.handler()).batch_size(32));
    until(30, "300 acks", || stats.snapshot().acked == 300).await;
    let snap = running.stop().await;
    ledger.assert_exactly_once(msgs.iter().map(Outgoing::id));
    assert_eq!((snap.executed, snap.replayed), (100, 200));
    assert_eq!(pending(&url, &stream).await, 0);
    cleanup(&url, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_go_to_the_dead_letter_stream_atomically_with_the_ack() {
    let Some(url) = url() else { return };
    let stream = unique("poison");
    let source = RedisStreamSource::connect(&url, config(&stream, "c1"))
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("payload")
        .arg("no id")
        .query_async(&mut conn(&url).await)
        .await
        .unwrap();
    let producer = RedisStreamProducer::connect(&url).await.unwrap();
    let good = Outgoing::new(&b"fine"[..]);
    producer.publish(&stream, &good).await.unwrap();
    let ledger = Ledger::default();
    let (stats, running) = start(Consumer::new(
        source,
        Executor::new(MemoryStore::new()),
        ns(),
        ledger.handler(),
    ));
    until(30, "settled", || {
        let s = stats.snapshot();
        s.acked == 1 && s.dead_lettered == 1
    })
    .await;
    running.stop().await;
    ledger.assert_exactly_once([good.id()]);
    let dead: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("{stream}:dead-letter"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn(&url).await)
        .await
        .unwrap();
    assert_eq!(dead.ids.len(), 1);
    let entry = &dead.ids[0];
    let reason: String = entry.get(header::DEAD_LETTER_REASON).unwrap();
    assert!(reason.contains("no message id"), "{reason}");
    let payload: String = entry.get("payload").unwrap();
    assert_eq!(payload, "no id");
    assert_eq!(pending(&url, &stream).await, 0);
    cleanup(&url, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacked_entries_come_back_after_the_delay_with_a_count() {
    let Some(url) = url() else { return };
    let stream = unique("nack");
    let mut source = RedisStreamSource::connect(&url, config(&stream, "c1"))
        .await
        .unwrap();
    let producer = RedisStreamProducer::connect(&url).await.unwrap();
    producer
        .publish(&stream, &Outgoing::with_id("m", &b"x"[..]))
        .await
        .unwrap();
    let acker = source.acker();
    let mut first = Vec::new();
    while first.is_empty() {
        first = source.receive(10).await.unwrap();
    }
    let first = first.pop().unwrap();
    assert_eq!(first.message.delivery_count(), 1);
    assert_eq!(first.message.message_id(), Some("m"));
    let nacked = Instant::now();
    acker
        .nack(first.delivery, Duration::from_millis(500))
        .await
        .unwrap();
    let mut again = Vec::new();
    while again.is_empty() {
        again = source.receive(10).await.unwrap();
    }
    assert!(
        nacked.elapsed() >= Duration::from_millis(450),
        "{:?}",
        nacked.elapsed()
    );
    let again = again.pop().unwrap();
    assert_eq!(again.message.delivery_count(), 2);
    acker.ack(vec![again.delivery]).await.unwrap();
    assert_eq!(pending(&url, &stream).await, 0);
    cleanup(&url, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_keeps_a_long_handler_from_being_claimed() {
    // The handler runs three times `claim_idle`; XCLAIM progress keeps its entry from being
    // claimed again (by this consumer's own XAUTOCLAIM, or another's).
    let Some(url) = url() else { return };
    let stream = unique("wpi");
    let source = RedisStreamSource::connect(&url, config(&stream, "c1"))
        .await
        .unwrap();
    let other = RedisStreamSource::connect(&url, config(&stream, "c2"))
        .await
        .unwrap();
    let producer = RedisStreamProducer::connect(&url).await.unwrap();
    let msg = Outgoing::new(&b"slow"[..]);
    producer.publish(&stream, &msg).await.unwrap();
    let ledger = Ledger::default();
    let l = ledger.clone();
    let (stats, running) = start(Consumer::new(
        source,
        Executor::new(MemoryStore::new()),
        ns(),
        move |m: Message, _: Attempt| {
            let l = l.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(3000)).await;
                l.apply(&m);
                Ok::<_, std::io::Error>(())
            }
        },
    ));
    until(10, "received", || stats.snapshot().received == 1).await;
    let (other_stats, other) = start(Consumer::new(
        other,
        Executor::new(MemoryStore::new()),
        ns(),
        ledger.handler(),
    ));
    until(30, "acked", || stats.snapshot().acked == 1).await;
    let snap = running.stop().await;
    other.stop().await;
    assert_eq!(snap.received, 1, "{snap:?}");
    assert_eq!(other_stats.snapshot().received, 0, "claimed while in hand");
    ledger.assert_exactly_once([msg.id()]);
    cleanup(&url, &stream).await;
}

#[test]
fn consumer_killed_mid_batch_is_claimed_by_another_and_applied_once() {
    // The dead consumer's entries stay in the group's PEL; the next consumer (another name)
    // XAUTOCLAIMs them after claim_idle (1 s).
    let Some(url) = url() else { return };
    let main = tokio::runtime::Runtime::new().unwrap();
    let stream = unique("kill");
    let producer = main.block_on(RedisStreamProducer::connect(&url)).unwrap();
    let consumers = std::sync::atomic::AtomicUsize::new(0);
    common::killed_mid_batch(
        &main,
        || {
            let name = format!("c{}", consumers.fetch_add(1, Ordering::SeqCst));
            let (url, stream) = (&url, &stream);
            async move {
                RedisStreamSource::connect(url, config(stream, &name))
                    .await
                    .unwrap()
            }
        },
        |m| {
            let (producer, stream) = (&producer, &stream);
            async move {
                producer.publish(stream, &m).await.unwrap();
            }
        },
        || async { pending(&url, &stream).await == 0 },
        || async { pending(&url, &stream).await == 0 },
    );
    main.block_on(cleanup(&url, &stream));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_stream_loses_nothing_and_applies_once() {
    // A private redis-server (append-only file) is SIGKILLed mid-stream and restarted on the
    // same port and directory. The connection managers reconnect; entries read but not acked
    // before the crash are claimed again; every message is applied once.
    if url().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = dir.path().to_string_lossy().into_owned();
    let p = port.to_string();
    let args = [
        "--port",
        &p,
        "--bind",
        "127.0.0.1",
        "--dir",
        &d,
        "--appendonly",
        "yes",
        "--save",
        "",
    ];
    let Some(mut server) = ServerProcess::start("redis-server", &args, port) else {
        return;
    };
    let url = format!("redis://127.0.0.1:{port}");
    let stream = unique("restart");
    let producer = RedisStreamProducer::connect(&url).await.unwrap();
    let msgs = numbered(200);
    for m in &msgs {
        producer.publish(&stream, m).await.unwrap();
    }
    let source = RedisStreamSource::connect(&url, config(&stream, "c1"))
        .await
        .unwrap();
    let ledger = Ledger::default();
    let (stats, running, _store_dir) = start_slow(source, &ledger, 20);
    until(30, "some progress", || stats.snapshot().acked >= 40).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let Some(_server) = ServerProcess::start("redis-server", &args, port) else {
        return;
    };
    until(90, "all applied", || ledger.len() == 200).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while pending(&url, &stream).await > 0 {
        assert!(
            Instant::now() < deadline,
            "pending left: {:?}",
            stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    running.stop().await;
    ledger.assert_exactly_once(msgs.iter().map(Outgoing::id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_entries_get_their_own_delivery_counts() {
    // The bug: delivery counts of claimed entries came from one `XPENDING first last COUNT n`
    // over the claimed ids' range; other entries pending for this consumer inside that range
    // took up the count, and claimed entries past it were reported as delivered twice. Here
    // entries 1, 3 and 5 are claimed back twice (count 3) while 2 and 4 stay in hand.
    let Some(url) = url() else { return };
    let stream = unique("counts");
    // A long claim_idle: entries in hand are never idle enough to be claimed; a nack with no
    // delay makes an entry claimable at once.
    let mut c = config(&stream, "c1").claim_idle(Duration::from_secs(60));
    c.claim_interval = Duration::from_millis(50);
    let mut source = RedisStreamSource::connect(&url, c).await.unwrap();
    let producer = RedisStreamProducer::connect(&url).await.unwrap();
    for i in 1..=5 {
        producer
            .publish(&stream, &Outgoing::with_id(format!("m-{i}"), &b"x"[..]))
            .await
            .unwrap();
    }
    let acker = source.acker();
    let mut got = Vec::new();
    while got.len() < 5 {
        got.extend(source.receive(5).await.unwrap());
    }
    let (odd, even): (Vec<_>, Vec<_>) = got.into_iter().partition(|d| {
        d.message.message_id() != Some("m-2") && d.message.message_id() != Some("m-4")
    });
    let mut back = odd;
    for expected in [2, 3] {
        for d in back {
            acker.nack(d.delivery, Duration::ZERO).await.unwrap();
        }
        back = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while back.len() < 3 {
            assert!(Instant::now() < deadline, "claimed only {}", back.len());
            back.extend(source.receive(5).await.unwrap());
        }
        let counts: Vec<(String, u32)> = back
            .iter()
            .map(|d| {
                (
                    d.message.message_id().unwrap().to_owned(),
                    d.message.delivery_count(),
                )
            })
            .collect();
        assert!(
            counts.iter().all(|(_, n)| *n == expected),
            "expected {expected} for each: {counts:?}"
        );
    }
    acker
        .ack(back.into_iter().chain(even).map(|d| d.delivery).collect())
        .await
        .unwrap();
    assert_eq!(pending(&url, &stream).await, 0);
    cleanup(&url, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_covers_deliveries_deferred_to_a_later_round() {
    // The bug: only the round running got progress reports. Two copies of one message in one
    // batch are processed in two rounds (the second replays the first's result); while the
    // first copy's handler ran (three times `claim_idle`), the second copy sat idle in the PEL
    // and another consumer claimed it.
    let Some(url) = url() else { return };
    let stream = unique("wpi-later");
    let source = RedisStreamSource::connect(&url, config(&stream, "c1"))
        .await
        .unwrap();
    let other = RedisStreamSource::connect(&url, config(&stream, "c2"))
        .await
        .unwrap();
    let producer = RedisStreamProducer::connect(&url).await.unwrap();
    let msg = Outgoing::new(&b"slow"[..]);
    // A producer retry: both copies land in the consumer's first batch.
    producer.publish_once(&stream, &msg).await.unwrap();
    producer.publish_once(&stream, &msg).await.unwrap();
    let ledger = Ledger::default();
    let l = ledger.clone();
    let (stats, running) = start(Consumer::new(
        source,
        Executor::new(MemoryStore::new()),
        ns(),
        move |m: Message, _: Attempt| {
            let l = l.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(3000)).await;
                l.apply(&m);
                Ok::<_, std::io::Error>(())
            }
        },
    ));
    until(10, "received", || stats.snapshot().received == 2).await;
    let (other_stats, other) = start(Consumer::new(
        other,
        Executor::new(MemoryStore::new()),
        ns(),
        ledger.handler(),
    ));
    until(30, "acked", || stats.snapshot().acked == 2).await;
    let snap = running.stop().await;
    other.stop().await;
    assert_eq!((snap.executed, snap.replayed), (1, 1), "{snap:?}");
    assert_eq!(other_stats.snapshot().received, 0, "claimed while in hand");
    ledger.assert_exactly_once([msg.id()]);
    assert_eq!(pending(&url, &stream).await, 0);
    cleanup(&url, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_stream_does_not_stop_the_consumer() {
    // The bug: once the stream was deleted (or flushed, or the group destroyed), XREADGROUP
    // answered NOGROUP, taken as a configuration error: the consumer stopped for good. It now
    // creates the group again and goes on with what is published next.
    let Some(url) = url() else { return };
    let stream = unique("nogroup");
    let source = RedisStreamSource::connect(&url, config(&stream, "c1"))
        .await
        .unwrap();
    let producer = RedisStreamProducer::connect(&url).await.unwrap();
    let before = numbered(10);
    for m in &before {
        producer.publish(&stream, m).await.unwrap();
    }
    let ledger = Ledger::default();
    let (store, _dir) = sqlite_store();
    let (stats, running) = start(Consumer::new(
        source,
        Executor::new(store),
        ns(),
        ledger.handler(),
    ));
    until(30, "the first ten", || stats.snapshot().acked == 10).await;
    cleanup(&url, &stream).await;
    // Let the consumer meet the missing group.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after: Vec<Outgoing> = (10..20)
        .map(|i| Outgoing::with_id(format!("m-{i}"), format!("{i}").into_bytes()))
        .collect();
    for m in &after {
        producer.publish(&stream, m).await.unwrap();
    }
    until(30, "the next ten", || ledger.len() == 20).await;
    let snap = running.stop().await;
    ledger.assert_exactly_once(before.iter().chain(&after).map(Outgoing::id));
    assert_eq!(snap.acked, 20, "{snap:?}");
    assert_eq!(pending(&url, &stream).await, 0);
    cleanup(&url, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_destroyed_over_a_kept_stream_stops_the_consumer_clearly() {
    // Re-creating the group at the start of a kept stream would read every entry again, and
    // entries older than the store's retention would run their effects twice: the consumer
    // must stop with a configuration error that says so, not re-read.
    let Some(url) = url() else { return };
    let stream = unique("destroyed");
    let source = RedisStreamSource::connect(&url, config(&stream, "c1"))
        .await
        .unwrap();
    let producer = RedisStreamProducer::connect(&url).await.unwrap();
    for m in &numbered(5) {
        producer.publish(&stream, m).await.unwrap();
    }
    let ledger = Ledger::default();
    let (store, _dir) = sqlite_store();
    let (stats, running) = start(Consumer::new(
        source,
        Executor::new(store),
        ns(),
        ledger.handler(),
    ));
    until(30, "the five", || stats.snapshot().acked == 5).await;
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&stream)
        .arg(config(&stream, "c1").group)
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = running.ended_within(30).await.unwrap_err();
    assert_eq!(err.kind(), idem_broker::BrokerErrorKind::Config, "{err}");
    assert!(err.to_string().contains("destroyed"), "{err}");
    assert_eq!(ledger.len(), 5, "nothing was read again");
    cleanup(&url, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_loading_its_dataset_after_a_restart_does_not_stop_the_consumer() {
    // The bug: while a restarted Redis loads its dataset it answers `LOADING` (and during a
    // failover `MASTERDOWN`, `READONLY`, ...); these were mapped to a non-transient protocol
    // error, so the consumer stopped for good after a restart with a dataset to load. A private
    // redis-server is restarted with a slow load (20,000 keys, 100 µs each) mid-stream.
    if url().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = dir.path().to_string_lossy().into_owned();
    let p = port.to_string();
    let args = [
        "--port",
        &p,
        "--bind",
        "127.0.0.1",
        "--dir",
        &d,
        "--appendonly",
        "no",
        "--save",
        "",
        "--enable-debug-command",
        "yes",
        // Only the load after the restart is slowed down; clients are answered (`LOADING`)
        // every kilobyte loaded.
        "--key-load-delay",
        "100",
        "--loading-process-events-interval-bytes",
        "1024",
    ];
    let Some(mut server) = ServerProcess::start("redis-server", &args, port) else {
        return;
    };
    let url = format!("redis://127.0.0.1:{port}");
    let stream = unique("loading");
    let producer = RedisStreamProducer::connect(&url).await.unwrap();
    let msgs = numbered(100);
    for m in &msgs {
        producer.publish(&stream, m).await.unwrap();
    }
    let _: () = redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(20_000)
        .query_async(&mut conn(&url).await)
        .await
        .unwrap();
    let source = RedisStreamSource::connect(&url, config(&stream, "c1"))
        .await
        .unwrap();
    let ledger = Ledger::default();
    let (stats, running, _store_dir) = start_slow(source, &ledger, 20);
    until(30, "some progress", || stats.snapshot().acked >= 20).await;
    let _: () = redis::cmd("SAVE")
        .query_async(&mut conn(&url).await)
        .await
        .unwrap();
    server.kill();
    let Some(_server) = ServerProcess::start("redis-server", &args, port) else {
        return;
    };
    // The dataset takes about 2 s to load: the consumer meets `LOADING` meanwhile.
    let loading: Result<(), redis::RedisError> =
        redis::cmd("PING").query_async(&mut conn(&url).await).await;
    assert_eq!(
        loading
            .err()
            .and_then(|e| e.code().map(str::to_owned))
            .as_deref(),
        Some("LOADING"),
        "the restarted server was not loading"
    );
    until(90, "all applied", || ledger.len() == 100).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while pending(&url, &stream).await > 0 {
        assert!(
            Instant::now() < deadline,
            "pending left: {:?}",
            stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    running.stop().await;
    ledger.assert_exactly_once(msgs.iter().map(Outgoing::id));
}
