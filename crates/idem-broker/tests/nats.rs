//! NATS JetStream adapter against the live server (`IDEM_NATS_URL`), and against a private
//! `nats-server` for the restart test. Each test uses its own streams and deletes them.
#![cfg(feature = "nats")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{
    Ledger, ServerProcess, free_port, numbered, sqlite_store, start, start_slow, unique, until,
};
use futures_util::StreamExt;
use idem::{Attempt, Executor, MemoryStore, Namespace};
use idem_broker::nats::{NatsConfig, NatsProducer, NatsSource};
use idem_broker::{Acker, Consumer, Message, Outgoing, Source, header};
use idem_conformance::server;

fn url() -> Option<String> {
    server::url(server::NATS)
}

fn ns() -> Namespace {
    Namespace::new("nats-test").unwrap()
}

/// A stream name and its subject, unique to the test.
fn names(prefix: &str) -> (String, String) {
    let name = unique(prefix).replace('-', "_").to_uppercase();
    let subject = format!("{}.>", name.to_lowercase());
    (name, subject)
}

async fn js(url: &str) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(async_nats::connect(url).await.unwrap())
}

async fn cleanup(url: &str, config: &NatsConfig) {
    let js = js(url).await;
    let _ = js.delete_stream(&config.stream).await;
    let _ = js.delete_stream(&config.dead_letter_stream).await;
}

/// Messages in a stream.
async fn stream_len(url: &str, stream: &str) -> u64 {
    let mut s = js(url).await.get_stream(stream).await.unwrap();
    s.info().await.unwrap().state.messages
}

/// Unacked plus undelivered messages of the consumer.
async fn consumer_backlog(url: &str, config: &NatsConfig) -> u64 {
    let s = js(url).await.get_stream(&config.stream).await.unwrap();
    let mut c: async_nats::jetstream::consumer::PullConsumer =
        s.get_consumer(&config.consumer).await.unwrap();
    let info = c.info().await.unwrap();
    info.num_pending + info.num_ack_pending as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_retries_are_deduplicated_by_the_server_and_then_by_the_store() {
    // Retries within the duplicate window are dropped by JetStream (`Nats-Msg-Id`); retries
    // after it land in the stream again and are replayed by the store. Either way: one effect.
    let Some(url) = url() else { return };
    let (stream, subjects) = names("dups");
    let subject = subjects.replace('>', "created");
    let config =
        NatsConfig::new(&stream, &subjects, "c").duplicate_window(Duration::from_millis(500));
    let source = NatsSource::connect(&url, config.clone()).await.unwrap();
    let producer = NatsProducer::connect(&url).await.unwrap();
    let msgs: Vec<Outgoing> = (0..50)
        .map(|i| Outgoing::new(format!("{i}").into_bytes()))
        .collect();
    for m in &msgs {
        assert!(!producer.publish_once(&subject, m).await.unwrap().duplicate);
        assert!(producer.publish_once(&subject, m).await.unwrap().duplicate);
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for m in &msgs {
        assert!(!producer.publish_once(&subject, m).await.unwrap().duplicate);
    }
    assert_eq!(stream_len(&url, &stream).await, 100);

    let ledger = Ledger::default();
    let (store, _dir) = sqlite_store();
    let (stats, running) =
        start(Consumer::new(source, Executor::new(store), ns(), ledger.handler()).batch_size(32));
    until(30, "100 acks", || stats.snapshot().acked == 100).await;
    let snap = running.stop().await;
    ledger.assert_exactly_once(msgs.iter().map(Outgoing::id));
    assert_eq!((snap.executed, snap.replayed), (50, 50));
    assert_eq!(consumer_backlog(&url, &config).await, 0);
    cleanup(&url, &config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_go_to_the_dead_letter_stream_with_the_reason() {
    let Some(url) = url() else { return };
    let (stream, subjects) = names("poison");
    let subject = subjects.replace('>', "x");
    let config = NatsConfig::new(&stream, &subjects, "c");
    let source = NatsSource::connect(&url, config.clone()).await.unwrap();
    let js = js(&url).await;
    // No Nats-Msg-Id: no key.
    js.publish(subject.clone(), "no id".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let producer = NatsProducer::connect(&url).await.unwrap();
    let good = Outgoing::new(&b"fine"[..]);
    producer.publish(&subject, &good).await.unwrap();

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
    let dlq = js.get_stream(&config.dead_letter_stream).await.unwrap();
    let dead = dlq.get_raw_message(1).await.unwrap();
    assert_eq!(&dead.payload[..], b"no id");
    let reason = dead
        .headers
        .get(header::DEAD_LETTER_REASON)
        .unwrap()
        .as_str()
        .to_owned();
    assert!(reason.contains("no message id"), "{reason}");
    assert_eq!(
        consumer_backlog(&url, &config).await,
        0,
        "the poison message was acked"
    );
    cleanup(&url, &config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naks_are_delayed_and_counted() {
    let Some(url) = url() else { return };
    let (stream, subjects) = names("nak");
    let config = NatsConfig::new(&stream, &subjects, "c");
    let mut source = NatsSource::connect(&url, config.clone()).await.unwrap();
    let producer = NatsProducer::connect(&url).await.unwrap();
    producer
        .publish(&subjects.replace('>', "a"), &Outgoing::new(&b"x"[..]))
        .await
        .unwrap();
    let acker = source.acker();
    let first = source.receive(10).await.unwrap().pop().unwrap();
    assert_eq!(first.message.delivery_count(), 1);
    let nacked = Instant::now();
    acker
        .nack(first.delivery, Duration::from_millis(700))
        .await
        .unwrap();
    let again = source.receive(10).await.unwrap().pop().unwrap();
    assert!(
        nacked.elapsed() >= Duration::from_millis(600),
        "{:?}",
        nacked.elapsed()
    );
    assert_eq!(again.message.delivery_count(), 2);
    acker.ack(vec![again.delivery]).await.unwrap();
    source.close().await;
    assert_eq!(consumer_backlog(&url, &config).await, 0);
    cleanup(&url, &config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_keeps_a_long_handler_from_being_redelivered() {
    // A handler that outlives the ack wait (1 s) several times over: the `+WPI` progress reports
    // keep JetStream from redelivering it, so it is delivered once and acked once.
    let Some(url) = url() else { return };
    let (stream, subjects) = names("wpi");
    let config = NatsConfig::new(&stream, &subjects, "c").ack_wait(Duration::from_secs(1));
    let source = NatsSource::connect(&url, config.clone()).await.unwrap();
    let producer = NatsProducer::connect(&url).await.unwrap();
    let msg = Outgoing::new(&b"slow"[..]);
    producer
        .publish(&subjects.replace('>', "a"), &msg)
        .await
        .unwrap();
    let ledger = Ledger::default();
    let l = ledger.clone();
    let (stats, running) = start(Consumer::new(
        source,
        Executor::new(MemoryStore::new()),
        ns(),
        move |m: Message, _: Attempt| {
            let l = l.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(3500)).await;
                l.apply(&m);
                Ok::<_, std::io::Error>(())
            }
        },
    ));
    until(30, "acked", || stats.snapshot().acked == 1).await;
    let snap = running.stop().await;
    assert_eq!(
        snap.received, 1,
        "redelivered while the handler ran: {snap:?}"
    );
    ledger.assert_exactly_once([msg.id()]);
    cleanup(&url, &config).await;
}

#[test]
fn consumer_killed_mid_batch_is_redelivered_and_applied_once() {
    // JetStream redelivers what the dead consumer did not ack once the ack wait (2 s) ends.
    let Some(url) = url() else { return };
    let main = tokio::runtime::Runtime::new().unwrap();
    let (stream, subjects) = names("kill");
    let subject = subjects.replace('>', "a");
    let config = NatsConfig::new(&stream, &subjects, "c").ack_wait(Duration::from_secs(2));
    let producer = main.block_on(NatsProducer::connect(&url)).unwrap();
    common::killed_mid_batch(
        &main,
        || async { NatsSource::connect(&url, config.clone()).await.unwrap() },
        |m| {
            let (producer, subject) = (&producer, &subject);
            async move {
                producer.publish(subject, &m).await.unwrap();
            }
        },
        || async { consumer_backlog(&url, &config).await == 0 },
        || async { consumer_backlog(&url, &config).await == 0 },
    );
    main.block_on(cleanup(&url, &config));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_nothing_and_applies_once() {
    // The NATS server is SIGKILLed mid-stream and restarted on the same port and store
    // directory (a private instance, never the shared one). The client reconnects, the pull
    // stream is recreated, unacked deliveries come back; every message is applied once.
    if url().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let store_dir = dir.path().join("js");
    let args = |port: u16| {
        vec![
            "-a".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            port.to_string(),
            "-js".to_owned(),
            "-sd".to_owned(),
            store_dir.to_string_lossy().into_owned(),
        ]
    };
    let start_server = || {
        let a = args(port);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        ServerProcess::start("nats-server", &a, port)
    };
    let Some(mut server) = start_server() else {
        return;
    };
    let url = format!("nats://127.0.0.1:{port}");
    let (stream, subjects) = names("restart");
    let subject = subjects.replace('>', "a");
    let config = NatsConfig::new(&stream, &subjects, "c").ack_wait(Duration::from_secs(2));
    let source = NatsSource::connect(&url, config.clone()).await.unwrap();
    let producer = NatsProducer::connect(&url).await.unwrap();
    let msgs = numbered(200);
    for m in &msgs {
        producer.publish(&subject, m).await.unwrap();
    }
    let ledger = Ledger::default();
    let (stats, running, _store_dir) = start_slow(source, &ledger, 20);
    until(30, "some progress", || stats.snapshot().acked >= 40).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let Some(_server) = start_server() else {
        return;
    };
    until(90, "all applied", || ledger.len() == 200).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while consumer_backlog(&url, &config).await > 0 {
        assert!(
            Instant::now() < deadline,
            "backlog left: {:?}",
            stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    running.stop().await;
    ledger.assert_exactly_once(msgs.iter().map(Outgoing::id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_jetstream_reads_back_dead_letters() {
    // The dead-letter stream is an ordinary stream: operators can read and replay it.
    let Some(url) = url() else { return };
    let (stream, subjects) = names("dlqread");
    let config = NatsConfig::new(&stream, &subjects, "c");
    let source = NatsSource::connect(&url, config.clone()).await.unwrap();
    let acker = source.acker();
    let mut source = source;
    js(&url)
        .await
        .publish(subjects.replace('>', "a"), "p".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let got = source.receive(1).await.unwrap().pop().unwrap();
    let message = got.message.clone();
    acker
        .dead_letter(got.delivery, &message, "test reason")
        .await
        .unwrap();
    let dlq = js(&url)
        .await
        .get_stream(&config.dead_letter_stream)
        .await
        .unwrap();
    let c: async_nats::jetstream::consumer::PullConsumer = dlq
        .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
        .await
        .unwrap();
    let mut batch = c.fetch().max_messages(10).messages().await.unwrap();
    let m = batch.next().await.unwrap().unwrap();
    assert_eq!(
        m.headers
            .as_ref()
            .unwrap()
            .get(header::DEAD_LETTER_REASON)
            .unwrap()
            .as_str(),
        "test reason"
    );
    source.close().await;
    cleanup(&url, &config).await;
}
