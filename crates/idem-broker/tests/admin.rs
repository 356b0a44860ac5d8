//! The adapters' admins against the live brokers (`IDEM_AMQP_URL`, `IDEM_NATS_URL`,
//! `IDEM_MQTT_URL`, `IDEM_REDIS_URL`), through the factory: a message the runtime dead-letters
//! is read back with its reason and republished where it came from with the same message id.
//! Each test uses its own names and removes them with the admin's `cleanup`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Each test needs its adapter's feature; the helpers serve whichever are built.
#![cfg_attr(
    not(all(
        feature = "amqp",
        feature = "nats",
        feature = "mqtt",
        feature = "redis-streams"
    )),
    allow(dead_code, unused_imports)
)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use idem::{Attempt, Executor, MemoryStore, Namespace};
use idem_broker::{
    Acker, Admin, BrokerKind, BrokerUrl, Consumer, DeadLetter, KeyFrom, Message, Outgoing, Source,
    SourceConfig, SourceOptions,
};
use idem_conformance::server;

/// A name no other test run uses.
fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}-{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Dead letters through a fresh admin, waiting up to a few seconds for `n` of them.
async fn read_dead_letters(
    url: &BrokerUrl,
    config: &SourceConfig,
    n: usize,
) -> (idem_broker::AnyAdmin, Vec<DeadLetter>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let admin = config.admin(url).await.unwrap();
        let found = admin.dead_letters(10).await.unwrap();
        if found.len() >= n || Instant::now() >= deadline {
            return (admin, found);
        }
        admin.close().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Declares what `config` consumes, publishes one message to `destination`, and runs the
/// runtime over it with a key the message lacks, so that it is dead-lettered. Returns the
/// message id.
async fn publish_and_dead_letter(
    url: &BrokerUrl,
    config: &SourceConfig,
    destination: &str,
) -> String {
    // Declare (the queue, the stream and its consumer, the sessions), then leave.
    config.connect(url).await.unwrap().close().await;

    let id = unique("dl");
    let producer = url.producer().await.unwrap();
    let msg = Outgoing::with_id(id.clone(), &b"{\"amount\": 7}"[..]).with_header("tenant", "acme");
    producer.publish(destination, &msg).await.unwrap();

    // The message waits for the consumers: the broker counts it where it can.
    let admin = config.admin(url).await.unwrap();
    let backlog = admin.backlog().await.unwrap();
    match url.kind() {
        BrokerKind::Mqtt => assert_eq!(backlog, None),
        _ => assert_eq!(backlog, Some(1), "{url}"),
    }
    admin.close().await;

    let source = config.connect(url).await.unwrap();
    let consumer = Consumer::new(
        source,
        Executor::new(MemoryStore::new()),
        Namespace::new("admin-test").unwrap(),
        |_m: Message, _a: Attempt| async { Ok::<_, std::io::Error>(()) },
    )
    .key(KeyFrom::Header("order-id".into()));
    let stats = consumer.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(consumer.run(async {
        let _ = stopped.await;
    }));
    until("the dead letter", || stats.snapshot().dead_lettered == 1).await;
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    assert_eq!(stats.snapshot().executed, 0);
    id
}

/// The whole round: dead-lettered by the runtime, read back with its reason, republished to
/// `destination` with the same message id, gone from the dead letters, consumed again.
async fn dead_letter_round_trip(
    url: &BrokerUrl,
    config: &SourceConfig,
    destination: &str,
    origin: &str,
) {
    let id = publish_and_dead_letter(url, config, destination).await;

    let (admin, mut found) = read_dead_letters(url, config, 1).await;
    assert_eq!(found.len(), 1, "{found:?}");
    let dead = found.pop().unwrap();
    let message = dead.message();
    assert_eq!(message.message_id(), Some(id.as_str()));
    assert_eq!(&message.payload()[..], b"{\"amount\": 7}");
    assert_eq!(message.header("tenant"), Some(&b"acme"[..]));
    assert_eq!(message.origin(), origin);
    assert!(message.header("idem-dead-letter-reason").is_none());
    let reason = dead.reason().unwrap_or_default();
    assert!(
        reason.contains("no usable key") && reason.contains("order-id"),
        "{reason}"
    );

    if url.kind() == BrokerKind::Nats {
        // Past the stream's duplicate window (100 ms here) since the original publish, or
        // JetStream drops the copy (see the next test).
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    admin.republish(dead).await.unwrap();
    admin.close().await;

    // Gone from the dead letters.
    let admin = config.admin(url).await.unwrap();
    assert!(admin.dead_letters(10).await.unwrap().is_empty());
    admin.close().await;

    // Back where it came from, with the same message id.
    let mut source = config.connect(url).await.unwrap();
    let acker = source.acker();
    let got = tokio::time::timeout(Duration::from_secs(30), source.receive(10))
        .await
        .expect("the republished message did not come back")
        .unwrap();
    assert_eq!(got.len(), 1);
    let back = &got[0].message;
    assert_eq!(back.message_id(), Some(id.as_str()));
    assert_eq!(&back.payload()[..], b"{\"amount\": 7}");
    assert_eq!(back.header("tenant"), Some(&b"acme"[..]));
    assert!(back.header("idem-dead-letter-reason").is_none());
    acker
        .ack(got.into_iter().map(|i| i.delivery).collect())
        .await
        .unwrap();
    source.close().await;

    let admin = config.admin(url).await.unwrap();
    admin.cleanup().await.unwrap();
    admin.close().await;
}

fn broker_url((var, default): (&str, &str)) -> Option<BrokerUrl> {
    server::url((var, default)).map(|u| u.parse().unwrap())
}

#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_dead_letters_are_read_and_republished() {
    let Some(url) = broker_url(server::AMQP) else {
        return;
    };
    let queue = unique("admin");
    let mut options = SourceOptions::new("admin-test");
    options.queue = Some(queue.clone());
    let config = options.config(&url).unwrap();
    dead_letter_round_trip(&url, &config, &queue, &queue).await;
    // The queue is gone.
    let admin = config.admin(&url).await.unwrap();
    assert!(admin.backlog().await.is_err());
    admin.close().await;
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_dead_letters_are_read_and_republished() {
    let Some(url) = broker_url(server::NATS) else {
        return;
    };
    let stream = unique("ADMIN").replace('-', "_").to_uppercase();
    let mut options = SourceOptions::new("admin-test");
    options.stream = Some(stream.clone());
    let mut config = options.config(&url).unwrap();
    if let SourceConfig::Nats(c) = &mut config {
        // A republish within the window of the original publish would be dropped.
        c.duplicate_window = Duration::from_millis(100);
    }
    let subject = format!("{stream}.orders");
    dead_letter_round_trip(&url, &config, &subject, &stream).await;
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_refuses_a_republish_the_stream_would_drop_as_a_duplicate() {
    let Some(url) = broker_url(server::NATS) else {
        return;
    };
    let stream = unique("ADMDUP").replace('-', "_").to_uppercase();
    let mut options = SourceOptions::new("admin-test");
    options.stream = Some(stream.clone());
    // The default duplicate window: 2 minutes.
    let config = options.config(&url).unwrap();
    let id = publish_and_dead_letter(&url, &config, &format!("{stream}.orders")).await;
    let (admin, mut found) = read_dead_letters(&url, &config, 1).await;
    let dead = found.pop().unwrap();
    assert_eq!(dead.message().message_id(), Some(id.as_str()));
    let e = admin.republish(dead).await.unwrap_err();
    assert_eq!(e.kind(), idem_broker::BrokerErrorKind::Rejected, "{e}");
    assert!(e.to_string().contains("duplicate window"), "{e}");
    admin.close().await;
    // The dead letter stays.
    let (admin, found) = read_dead_letters(&url, &config, 1).await;
    assert_eq!(found.len(), 1);
    admin.cleanup().await.unwrap();
    admin.close().await;
}

#[cfg(feature = "mqtt")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_dead_letters_are_read_and_republished() {
    let Some(url) = broker_url(server::MQTT) else {
        return;
    };
    let topic = format!("idem-test/{}", unique("admin"));
    let mut options = SourceOptions::new("admin-test");
    options.topic = Some(topic.clone());
    options.client_id = Some(unique("idem-admin"));
    let config = options.config(&url).unwrap();
    dead_letter_round_trip(&url, &config, &topic, &topic).await;
}

#[cfg(feature = "redis-streams")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dead_letters_are_read_and_republished() {
    let Some(url) = broker_url(server::REDIS) else {
        return;
    };
    let stream = unique("admin");
    let mut options = SourceOptions::new("admin-test");
    options.stream = Some(stream.clone());
    let config = options.config(&url).unwrap();
    dead_letter_round_trip(&url, &config, &stream, &stream).await;
    // Both keys are gone.
    let admin = config.admin(&url).await.unwrap();
    assert!(admin.backlog().await.is_err());
    assert!(admin.dead_letters(10).await.unwrap().is_empty());
    admin.close().await;
}

#[cfg(feature = "redis-streams")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_republished_only_by_the_admin_that_read_it() {
    let Some(url) = broker_url(server::REDIS) else {
        return;
    };
    let stream = unique("admin-reader");
    let mut options = SourceOptions::new("admin-test");
    options.stream = Some(stream.clone());
    let config = options.config(&url).unwrap();
    publish_and_dead_letter(&url, &config, &stream).await;
    let (reader, mut found) = read_dead_letters(&url, &config, 1).await;
    let other = config.admin(&url).await.unwrap();
    let e = other.republish(found.pop().unwrap()).await.unwrap_err();
    assert_eq!(e.kind(), idem_broker::BrokerErrorKind::Config, "{e}");
    // Untouched: still there for the next reader.
    let (again, found) = read_dead_letters(&url, &config, 1).await;
    assert_eq!(found.len(), 1);
    again.cleanup().await.unwrap();
    for admin in [reader, other, again] {
        admin.close().await;
    }
}
