//! NATS JetStream adapter against the live server (`IDEM_NATS_URL`): the adapter suite
//! (`idem_conformance::broker`), then what only JetStream has: its publish dedup window, a
//! server restart on a private `nats-server`, the dead-letter stream as an ordinary stream.
//! Each test uses its own streams and deletes them.
#![cfg(feature = "nats")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    Ledger, ServerProcess, free_port, numbered, socket_addr, sqlite_store, start, start_slow,
    unique, until, via,
};
use futures_util::StreamExt;
use idem::{Executor, Namespace};
use idem_broker::nats::{NatsConfig, NatsProducer, NatsSource};
use idem_broker::{Acker, Consumer, Message, Outgoing, Source, header};
use idem_conformance::broker::{BrokerHarness, DeadLetter};
use idem_conformance::server;
use tokio::sync::OnceCell;

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

/// The adapter suite's view of JetStream: a stream per check (`<NAME>` capturing `<name>.>`,
/// its dead-letter stream `<NAME>_DLQ`), one durable consumer `c` with a 2 s ack wait.
#[derive(Clone)]
struct Jetstream {
    url: String,
    producer: Arc<OnceCell<NatsProducer>>,
}

async fn harness() -> Option<Jetstream> {
    Some(Jetstream {
        url: url()?,
        producer: Arc::default(),
    })
}

mod adapter {
    idem_conformance::adapter_tests!(super::harness);
}

/// The ack wait of the suite's consumers: a delivery not acked (or reported in progress)
/// within it is redelivered.
const ACK_WAIT: Duration = Duration::from_secs(2);

fn suite_config(stream: &str) -> NatsConfig {
    NatsConfig::new(stream, format!("{}.>", stream.to_lowercase()), "c").ack_wait(ACK_WAIT)
}

impl BrokerHarness for Jetstream {
    type Source = NatsSource;

    fn destination(&self, check: &str) -> String {
        names(check).0
    }

    fn address(&self) -> SocketAddr {
        socket_addr(&self.url)
    }

    async fn connect(&self, stream: &str, through: Option<SocketAddr>) -> NatsSource {
        let url = through.map_or_else(|| self.url.clone(), |addr| via(&self.url, addr));
        NatsSource::connect(&url, suite_config(stream))
            .await
            .unwrap()
    }

    async fn publish(&self, stream: &str, message: &Outgoing) -> bool {
        let producer = self
            .producer
            .get_or_init(|| async { NatsProducer::connect(&self.url).await.unwrap() })
            .await;
        let subject = format!("{}.a", stream.to_lowercase());
        !producer.publish(&subject, message).await.unwrap().duplicate
    }

    async fn dead_letters(&self, stream: &str) -> Vec<DeadLetter> {
        let config = suite_config(stream);
        let Ok(mut dlq) = js(&self.url)
            .await
            .get_stream(&config.dead_letter_stream)
            .await
        else {
            return Vec::new();
        };
        let state = &dlq.info().await.unwrap().state;
        let (first, last, messages) = (state.first_sequence, state.last_sequence, state.messages);
        let mut out = Vec::new();
        if messages == 0 {
            return out;
        }
        for seq in first..=last {
            let Ok(raw) = dlq.get_raw_message(seq).await else {
                continue;
            };
            let mut message = Message::new(stream, raw.payload.clone());
            let mut reason = String::new();
            for (name, values) in raw.headers.iter() {
                let name: &str = name.as_ref();
                let Some(value) = values.first() else {
                    continue;
                };
                let value = value.as_str();
                if name == header::MESSAGE_ID {
                    message = message.with_message_id(value);
                } else if name == header::DEAD_LETTER_REASON {
                    reason = value.to_owned();
                }
                message = message.with_header(name, value.as_bytes().to_vec());
            }
            out.push(DeadLetter { message, reason });
        }
        out
    }

    async fn backlog(&self, stream: &str) -> u64 {
        consumer_backlog(&self.url, &suite_config(stream)).await
    }

    fn redelivery_timeout(&self) -> Option<Duration> {
        Some(ACK_WAIT)
    }

    async fn cleanup(&self, stream: &str) {
        cleanup(&self.url, &suite_config(stream)).await;
    }
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
