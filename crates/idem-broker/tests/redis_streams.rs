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
