//! RabbitMQ adapter against the live broker (`IDEM_AMQP_URL`, default the local one). Each test
//! uses its own queues and deletes them at the end.
#![cfg(feature = "amqp")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{
    Ledger, Proxy, numbered, socket_addr, sqlite_store, start, start_slow, unique, until, via,
};
use futures_util::StreamExt;
use idem::{Executor, Namespace};
use idem_broker::amqp::{AmqpConfig, AmqpProducer, AmqpSource};
use idem_broker::{Acker, Consumer, Outgoing, Source, header};
use idem_conformance::server;
use lapin::options::{BasicGetOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};

fn url() -> Option<String> {
    server::url(server::AMQP)
}

/// Deletes a test's queues and exchange.
async fn cleanup(url: &str, queue: &str) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for q in [queue.to_owned(), format!("{queue}.dlq")] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(format!("{queue}.dlx").as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
}

/// Gets everything in `queue` without consuming it for good (basic.get, then ack).
async fn drain(url: &str, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        out.push(m);
    }
    let _ = conn.close(200, "bye".into()).await;
    out
}

fn ns() -> Namespace {
    Namespace::new("amqp-test").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_retries_are_applied_once() {
    // A producer that lost its confirms publishes every message three times (same message id):
    // the effect happens once per message and every copy is acked.
    let Some(url) = url() else { return };
    let queue = unique("dups");
    let source = AmqpSource::connect(&url, AmqpConfig::new(&queue))
        .await
        .unwrap();
    let producer = AmqpProducer::connect(&url).await.unwrap();
    let msgs: Vec<Outgoing> = (0..100)
        .map(|i| Outgoing::new(format!("{{\"n\": {i}}}").into_bytes()))
        .collect();
    for round in 0..3 {
        for m in &msgs {
            producer.publish_once("", &queue, m).await.unwrap();
        }
        let _ = round;
    }
    let ledger = Ledger::default();
    let (store, _dir) = sqlite_store();
    let consumer =
        Consumer::new(source, Executor::new(store), ns(), ledger.handler()).batch_size(32);
    let (stats, running) = start(consumer);
    until(30, "300 acks", || stats.snapshot().acked == 300).await;
    let snap = running.stop().await;
    ledger.assert_exactly_once(msgs.iter().map(Outgoing::id));
    assert_eq!((snap.executed, snap.replayed), (100, 200));
    assert!(drain(&url, &queue).await.is_empty(), "every copy acked");
    cleanup(&url, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_go_to_the_dead_letter_queue_with_the_reason() {
    let Some(url) = url() else { return };
    let queue = unique("poison");
    let source = AmqpSource::connect(&url, AmqpConfig::new(&queue))
        .await
        .unwrap();
    // A message without a message id, published raw.
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        queue.as_str().into(),
        Default::default(),
        b"no id here",
        lapin::BasicProperties::default(),
    )
    .await
    .unwrap();
    let producer = AmqpProducer::connect(&url).await.unwrap();
    let good = Outgoing::new(&b"fine"[..]);
    producer.publish("", &queue, &good).await.unwrap();

    let ledger = Ledger::default();
    let consumer = Consumer::new(
        source,
        Executor::new(idem::MemoryStore::new()),
        ns(),
        ledger.handler(),
    );
    let (stats, running) = start(consumer);
    until(30, "settled", || {
        let s = stats.snapshot();
        s.acked == 1 && s.dead_lettered == 1
    })
    .await;
    running.stop().await;
    ledger.assert_exactly_once([good.id()]);
    let dead = drain(&url, &format!("{queue}.dlq")).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].delivery.data, b"no id here");
    let headers = dead[0].delivery.properties.headers().clone().unwrap();
    let reason = headers.inner().get(header::DEAD_LETTER_REASON).unwrap();
    let lapin::types::AMQPValue::LongString(reason) = reason else {
        panic!("reason is {reason:?}")
    };
    let reason = String::from_utf8_lossy(reason.as_bytes());
    assert!(reason.contains("no message id"), "{reason}");
    assert!(drain(&url, &queue).await.is_empty());
    let _ = conn.close(200, "bye".into()).await;
    cleanup(&url, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_nacks_hold_then_requeue_with_a_delivery_count() {
    let Some(url) = url() else { return };
    let queue = unique("nack");
    let mut source = AmqpSource::connect(&url, AmqpConfig::new(&queue))
        .await
        .unwrap();
    let producer = AmqpProducer::connect(&url).await.unwrap();
    producer
        .publish("", &queue, &Outgoing::new(&b"x"[..]))
        .await
        .unwrap();
    let acker = source.acker();
    let first = source.receive(10).await.unwrap().pop().unwrap();
    assert_eq!(first.message.delivery_count(), 1);
    let nacked = Instant::now();
    acker
        .nack(first.delivery, Duration::from_millis(600))
        .await
        .unwrap();
    let again = source.receive(10).await.unwrap().pop().unwrap();
    assert!(
        nacked.elapsed() >= Duration::from_millis(550),
        "{:?}",
        nacked.elapsed()
    );
    // Quorum queues count deliveries.
    assert_eq!(again.message.delivery_count(), 2);
    acker.ack(vec![again.delivery]).await.unwrap();
    source.close().await;
    assert!(drain(&url, &queue).await.is_empty());
    cleanup(&url, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_acks_never_cover_a_delivery_still_in_hand() {
    // Acks use `multiple = true` for runs of the oldest tags; a delivery held for a delayed
    // nack in the middle must not be acked by it (it would be lost).
    let Some(url) = url() else { return };
    let queue = unique("multi");
    let mut source = AmqpSource::connect(&url, AmqpConfig::new(&queue))
        .await
        .unwrap();
    let producer = AmqpProducer::connect(&url).await.unwrap();
    for i in 0..10 {
        producer
            .publish("", &queue, &Outgoing::with_id(format!("m-{i}"), &b"x"[..]))
            .await
            .unwrap();
    }
    let acker = source.acker();
    let mut got = Vec::new();
    while got.len() < 10 {
        got.extend(source.receive(10).await.unwrap());
    }
    let mut got: Vec<_> = got.into_iter().collect();
    let held = got.remove(3);
    let held_id = held.message.message_id().unwrap().to_owned();
    acker
        .ack(got.into_iter().map(|i| i.delivery).collect())
        .await
        .unwrap();
    acker
        .nack(held.delivery, Duration::from_millis(300))
        .await
        .unwrap();
    let back = source.receive(10).await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].message.message_id(), Some(held_id.as_str()));
    let back = back.into_iter().next().unwrap();
    acker.ack(vec![back.delivery]).await.unwrap();
    source.close().await;
    assert!(drain(&url, &queue).await.is_empty());
    cleanup(&url, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_acked_out_of_order_are_all_acked() {
    // The younger batch finishes first: its acks wait for the older batch's decision and then
    // go out together with it; a held delivery in the older batch is not covered.
    let Some(url) = url() else { return };
    let queue = unique("order");
    let mut source = AmqpSource::connect(&url, AmqpConfig::new(&queue))
        .await
        .unwrap();
    let producer = AmqpProducer::connect(&url).await.unwrap();
    for i in 0..20 {
        producer
            .publish("", &queue, &Outgoing::with_id(format!("m-{i}"), &b"x"[..]))
            .await
            .unwrap();
    }
    let acker = source.acker();
    let mut got = Vec::new();
    while got.len() < 20 {
        got.extend(source.receive(20).await.unwrap());
    }
    let younger = got.split_off(10);
    let mut older = got;
    let held = older.remove(2);
    let held_id = held.message.message_id().unwrap().to_owned();
    acker
        .ack(younger.into_iter().map(|i| i.delivery).collect())
        .await
        .unwrap();
    acker
        .nack(held.delivery, Duration::from_millis(300))
        .await
        .unwrap();
    acker
        .ack(older.into_iter().map(|i| i.delivery).collect())
        .await
        .unwrap();
    let back = source.receive(10).await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].message.message_id(), Some(held_id.as_str()));
    acker
        .ack(back.into_iter().map(|i| i.delivery).collect())
        .await
        .unwrap();
    source.close().await;
    assert!(drain(&url, &queue).await.is_empty());
    cleanup(&url, &queue).await;
}

#[test]
fn consumer_killed_mid_batch_is_redelivered_and_applied_once() {
    // RabbitMQ requeues everything the dead consumer held when its connection goes.
    let Some(url) = url() else { return };
    let main = tokio::runtime::Runtime::new().unwrap();
    let queue = unique("kill");
    let producer = main.block_on(AmqpProducer::connect(&url)).unwrap();
    common::killed_mid_batch(
        &main,
        || async {
            AmqpSource::connect(&url, AmqpConfig::new(&queue))
                .await
                .unwrap()
        },
        |m| {
            let producer = &producer;
            let queue = &queue;
            async move { producer.publish("", queue, &m).await.unwrap() }
        },
        || async { ready(&url, &queue).await == 0 },
        || async { drain(&url, &queue).await.is_empty() },
    );
    main.block_on(cleanup(&url, &queue));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_reconnect_and_lose_nothing() {
    // The network drops the consumer's TCP connection twice mid-stream. Deliveries on the dead
    // connection cannot be acked (their tags die with it) and are requeued by the broker; the
    // source reconnects with backoff; every message is applied once and acked once.
    let Some(url) = url() else { return };
    let queue = unique("drop");
    let proxy = Proxy::start(socket_addr(&url)).await;
    let proxied = via(&url, proxy.addr);
    let source = AmqpSource::connect(&proxied, AmqpConfig::new(&queue).prefetch(20))
        .await
        .unwrap();
    let producer = AmqpProducer::connect(&url).await.unwrap();
    let msgs = numbered(300);
    for m in &msgs {
        producer.publish("", &queue, m).await.unwrap();
    }
    let ledger = Ledger::default();
    let (stats, running, _store_dir) = start_slow(source, &ledger, 30);
    until(30, "some progress", || stats.snapshot().acked >= 50).await;
    proxy.cut_when_connected().await;
    until(30, "progress after the first cut", || {
        stats.snapshot().acked >= 150
    })
    .await;
    proxy.cut_when_connected().await;
    until(60, "all applied", || ledger.len() == 300).await;
    // Redelivered copies of what was executed before a cut are replayed and acked.
    wait_settled(&url, &queue, &stats).await;
    let snap = running.stop().await;
    ledger.assert_exactly_once(msgs.iter().map(Outgoing::id));
    assert!(drain(&url, &queue).await.is_empty(), "{snap:?}");
    cleanup(&url, &queue).await;
}

/// Ready messages in the queue (unacked ones are not counted by the broker).
async fn ready(url: &str, queue: &str) -> u32 {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
    q.message_count()
}

/// Waits until the queue has nothing ready and the consumer's counters stay still for longer
/// than any delayed nack it may hold (the tests' leases are at most 2 s).
async fn wait_settled(url: &str, queue: &str, stats: &idem_broker::Stats) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let before = stats.snapshot();
        tokio::time::sleep(Duration::from_secs(3)).await;
        if ready(url, queue).await == 0 && stats.snapshot() == before {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "consumer never settled: {:?}",
            stats.snapshot()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_deliveries_survives_receive_being_dropped() {
    // Shutdown drops a pending receive; nothing it would have returned is lost.
    let Some(url) = url() else { return };
    let queue = unique("cancel");
    let mut source = AmqpSource::connect(&url, AmqpConfig::new(&queue))
        .await
        .unwrap();
    let pending = tokio::time::timeout(Duration::from_millis(200), source.receive(10)).await;
    assert!(pending.is_err(), "nothing to receive yet");
    let producer = AmqpProducer::connect(&url).await.unwrap();
    producer
        .publish("", &queue, &Outgoing::with_id("late", &b"x"[..]))
        .await
        .unwrap();
    let got = source.receive(10).await.unwrap();
    assert_eq!(got[0].message.message_id(), Some("late"));
    source.close().await;
    // Closed without an ack: back in the queue.
    let left = drain(&url, &queue).await;
    assert_eq!(left.len(), 1);
    let _ = futures_util::stream::iter(left).collect::<Vec<_>>().await;
    cleanup(&url, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_channel_closed_by_an_error_is_opened_again() {
    // The bug: the dead-letter publisher channel was opened only on (re)connect. A
    // channel-level error closes an AMQP channel for good (here: the dead-letter exchange was
    // deleted, so the publish meets NOT_FOUND); the consuming connection stayed fine, so it
    // never reconnected, and every later dead letter failed and came back, forever. The channel
    // is now checked before each dead letter, opened again, and the topology declared again.
    let Some(url) = url() else { return };
    let queue = unique("dlx-gone");
    let source = AmqpSource::connect(&url, AmqpConfig::new(&queue))
        .await
        .unwrap();
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_delete(format!("{queue}.dlx").as_str().into(), Default::default())
        .await
        .unwrap();
    for i in 0..3 {
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            Default::default(),
            format!("no id {i}").as_bytes(),
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    let producer = AmqpProducer::connect(&url).await.unwrap();
    let good = Outgoing::new(&b"fine"[..]);
    producer.publish("", &queue, &good).await.unwrap();
    let ledger = Ledger::default();
    let (stats, running) = start(Consumer::new(
        source,
        Executor::new(idem::MemoryStore::new()),
        ns(),
        ledger.handler(),
    ));
    until(30, "every message settled", || {
        let s = stats.snapshot();
        s.acked == 1 && s.dead_lettered == 3
    })
    .await;
    let snap = running.stop().await;
    // The first dead letter met the missing exchange.
    assert!(snap.settle_errors >= 1, "{snap:?}");
    ledger.assert_exactly_once([good.id()]);
    let mut dead: Vec<Vec<u8>> = drain(&url, &format!("{queue}.dlq"))
        .await
        .into_iter()
        .map(|m| m.delivery.data)
        .collect();
    dead.sort();
    assert_eq!(dead, [&b"no id 0"[..], b"no id 1", b"no id 2"]);
    assert!(drain(&url, &queue).await.is_empty());
    let _ = conn.close(200, "bye".into()).await;
    cleanup(&url, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_queues_count_redeliveries_past_two() {
    // The bug: classic queues only flag `redelivered`, so every redelivery had a delivery count
    // of 2 and the runtime's in-progress backoff (200 ms doubling by delivery count) never grew:
    // a duplicate of a long handler was requeued about 2.5 times a second for a whole lease.
    // The source now counts the redeliveries it sees of each message.
    let Some(url) = url() else { return };
    let queue = unique("classic-count");
    let mut source = AmqpSource::connect(
        &url,
        AmqpConfig::new(&queue).queue_type(idem_broker::amqp::QueueType::Classic),
    )
    .await
    .unwrap();
    let producer = AmqpProducer::connect(&url).await.unwrap();
    producer
        .publish("", &queue, &Outgoing::with_id("m", &b"x"[..]))
        .await
        .unwrap();
    let acker = source.acker();
    let mut counts = Vec::new();
    let mut last = None;
    for _ in 0..5 {
        let d = source.receive(10).await.unwrap().pop().unwrap();
        counts.push(d.message.delivery_count());
        if counts.len() < 5 {
            acker.nack(d.delivery, Duration::ZERO).await.unwrap();
        } else {
            last = Some(d);
        }
    }
    assert_eq!(counts, [1, 2, 3, 4, 5]);
    acker.ack(vec![last.unwrap().delivery]).await.unwrap();
    source.close().await;
    assert!(drain(&url, &queue).await.is_empty());
    cleanup(&url, &queue).await;
}

/// Whether `queue` exists with exactly `args` (a declaration with other arguments is refused).
async fn declared_with(url: &str, queue: &str, args: lapin::types::FieldTable) -> bool {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let ok = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .is_ok();
    let _ = conn.close(200, "bye".into()).await;
    ok
}

fn quorum_args(dlx: Option<&str>, limit: Option<i64>) -> lapin::types::FieldTable {
    use lapin::types::AMQPValue;
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    if let Some(dlx) = dlx {
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(dlx.into()),
        );
    }
    if let Some(limit) = limit {
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit));
    }
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_are_declared_with_a_high_delivery_limit() {
    // Without an explicit `x-delivery-limit`, RabbitMQ 4.x dead-letters a quorum queue's
    // message after 20 returns, nack-requeues included: a store outage of a few minutes (idem
    // fails closed and requeues with backoff) would dead-letter messages behind idem's back.
    let Some(url) = url() else { return };
    let queue = unique("limit");
    let source = AmqpSource::connect(&url, AmqpConfig::new(&queue))
        .await
        .unwrap();
    source.close().await;
    let limit = Some(i64::from(idem_broker::amqp::DEFAULT_DELIVERY_LIMIT));
    let dlx = format!("{queue}.dlx");
    assert!(declared_with(&url, &queue, quorum_args(Some(&dlx), limit)).await);
    assert!(!declared_with(&url, &queue, quorum_args(Some(&dlx), None)).await);
    let dlq = format!("{queue}.dlq");
    assert!(declared_with(&url, &dlq, quorum_args(None, limit)).await);
    cleanup(&url, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_declared_without_a_delivery_limit_are_still_consumed() {
    // Queues declared before idem set a delivery limit cannot be changed by a declaration
    // (RabbitMQ refuses other arguments): the source keeps them as they are, with a warning,
    // instead of refusing to start.
    let Some(url) = url() else { return };
    let queue = unique("old-queue");
    let dlx = format!("{queue}.dlx");
    for (name, args) in [
        (format!("{queue}.dlq"), quorum_args(None, None)),
        (queue.clone(), quorum_args(Some(&dlx), None)),
    ] {
        assert!(declared_with(&url, &name, args).await);
    }
    let source = AmqpSource::connect(&url, AmqpConfig::new(&queue))
        .await
        .unwrap();
    let producer = AmqpProducer::connect(&url).await.unwrap();
    let msg = Outgoing::new(&b"x"[..]);
    producer.publish("", &queue, &msg).await.unwrap();
    let ledger = Ledger::default();
    let (stats, running) = start(Consumer::new(
        source,
        Executor::new(idem::MemoryStore::new()),
        ns(),
        ledger.handler(),
    ));
    until(30, "acked", || stats.snapshot().acked == 1).await;
    running.stop().await;
    ledger.assert_exactly_once([msg.id()]);
    // Unchanged.
    assert!(declared_with(&url, &queue, quorum_args(Some(&dlx), None)).await);
    cleanup(&url, &queue).await;
}
