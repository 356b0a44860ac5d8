//! RabbitMQ adapter against the live broker (`IDEM_AMQP_URL`, default the local one): the
//! adapter suite (`idem_conformance::broker`) on quorum queues (the default) and on classic
//! queues, then what only RabbitMQ has: quorum queue arguments, classic queues' redelivery
//! counts, the dead-letter channel. Each test uses its own queues and deletes them at the end.
#![cfg(feature = "amqp")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Ledger, socket_addr, start, unique, until, via};
use idem::{Executor, Namespace};
use idem_broker::amqp::{AmqpConfig, AmqpProducer, AmqpSource, QueueType};
use idem_broker::{Acker, Consumer, Message, Outgoing, Source, header};
use idem_conformance::broker::{BrokerHarness, DeadLetter};
use idem_conformance::server;
use lapin::options::{BasicGetOptions, QueueDeleteOptions};
use lapin::types::AMQPValue;
use lapin::{Connection, ConnectionProperties};
use tokio::sync::OnceCell;

fn url() -> Option<String> {
    server::url(server::AMQP)
}

/// The adapter suite's view of RabbitMQ: a queue per check (with its `.dlx` exchange and
/// `.dlq` queue), of `queue_type`.
#[derive(Clone)]
struct Rabbit {
    url: String,
    queue_type: QueueType,
    producer: Arc<OnceCell<AmqpProducer>>,
}

async fn rabbit(queue_type: QueueType) -> Option<Rabbit> {
    Some(Rabbit {
        url: url()?,
        queue_type,
        producer: Arc::default(),
    })
}

async fn quorum() -> Option<Rabbit> {
    rabbit(QueueType::Quorum).await
}

async fn classic() -> Option<Rabbit> {
    rabbit(QueueType::Classic).await
}

mod adapter {
    idem_conformance::adapter_tests!(super::quorum);
}

mod adapter_classic {
    idem_conformance::adapter_tests!(super::classic);
}

impl BrokerHarness for Rabbit {
    type Source = AmqpSource;

    fn destination(&self, check: &str) -> String {
        unique(check)
    }

    fn address(&self) -> SocketAddr {
        socket_addr(&self.url)
    }

    async fn connect(&self, queue: &str, through: Option<SocketAddr>) -> AmqpSource {
        let url = through.map_or_else(|| self.url.clone(), |addr| via(&self.url, addr));
        AmqpSource::connect(&url, AmqpConfig::new(queue).queue_type(self.queue_type))
            .await
            .unwrap()
    }

    async fn publish(&self, queue: &str, message: &Outgoing) -> bool {
        let producer = self
            .producer
            .get_or_init(|| async { AmqpProducer::connect(&self.url).await.unwrap() })
            .await;
        producer.publish("", queue, message).await.unwrap();
        true
    }

    async fn dead_letters(&self, queue: &str) -> Vec<DeadLetter> {
        drain(&self.url, &format!("{queue}.dlq"))
            .await
            .into_iter()
            .map(|m| {
                let props = &m.delivery.properties;
                let mut message = Message::new(queue, m.delivery.data.clone());
                if let Some(id) = props.message_id() {
                    message = message.with_message_id(id.as_str());
                }
                let mut reason = String::new();
                for (name, value) in props.headers().iter().flat_map(|h| h.inner()) {
                    if let AMQPValue::LongString(v) = value {
                        if name.as_str() == header::DEAD_LETTER_REASON {
                            reason = String::from_utf8_lossy(v.as_bytes()).into_owned();
                        }
                        message = message.with_header(name.as_str(), v.as_bytes().to_vec());
                    }
                }
                DeadLetter { message, reason }
            })
            .collect()
    }

    async fn backlog(&self, queue: &str) -> u64 {
        // Unacked deliveries are requeued when their consumer's channel goes: wait for that
        // (no consumer left), then count what is ready.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (ready, consumers) = queue_state(&self.url, queue).await;
            if consumers == 0 {
                return u64::from(ready);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{queue} still has {consumers} consumers"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn redelivery_timeout(&self) -> Option<Duration> {
        None
    }

    async fn cleanup(&self, queue: &str) {
        cleanup(&self.url, queue).await;
    }
}

/// Ready messages and consumers of `queue` (a passive declare; unacked messages are not
/// counted).
async fn queue_state(url: &str, queue: &str) -> (u32, u32) {
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
    (q.message_count(), q.consumer_count())
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

/// Takes everything in `queue` (basic.get with auto-ack).
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
