//! MQTT adapter against the live Mosquitto (`IDEM_MQTT_URL`): the adapter suite
//! (`idem_conformance::broker`), then what only MQTT has: a broker restart on a private
//! `mosquitto` (the session survives it), the session that keeps dead letters. Each test uses
//! its own topics and client ids, and removes its sessions.
#![cfg(feature = "mqtt")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{
    Ledger, ServerProcess, free_port, numbered, socket_addr, start, start_slow, unique, until, via,
};
use idem::{Executor, MemoryStore, Namespace};
use idem_broker::mqtt::{MqttConfig, MqttProducer, MqttSource};
use idem_broker::{Consumer, Message, Outgoing, Source, header};
use idem_conformance::broker::{BrokerHarness, DeadLetter};
use idem_conformance::server;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::OnceCell;

fn url() -> Option<String> {
    server::url(server::MQTT)
}

fn ns() -> Namespace {
    Namespace::new("mqtt-test").unwrap()
}

/// The topic a client id consumes in these tests.
fn topic(client_id: &str) -> String {
    format!("{client_id}/orders")
}

/// Reconnects as `config`'s client and counts what the broker still holds for the session
/// (unacked or queued; at most Mosquitto's in-flight window, 20), within `wait`. The session
/// stays, with those messages unacked.
async fn left_in_session(url: &str, config: &MqttConfig, wait: Duration) -> usize {
    let mut source = MqttSource::connect(url, config.clone()).await.unwrap();
    let mut n = 0;
    while let Ok(Ok(got)) = tokio::time::timeout(wait, source.receive(100)).await {
        n += got.len();
    }
    source.close().await;
    n
}

/// Reads the dead letters kept for `config`'s dead-letter session (and lets the session end).
async fn dead_letters(url: &str, config: &MqttConfig) -> Vec<rumqttc::v5::mqttbytes::v5::Publish> {
    let (host, port) = idem_conformance::server::host_port(url).unwrap();
    let mut opts = MqttOptions::new(config.dead_letter_client_id(), host, port);
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(0));
    let (_client, mut events) = AsyncClient::new(opts, 8);
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Ok(ev)) = tokio::time::timeout_at(deadline, events.poll()).await {
        if let Event::Incoming(Packet::Publish(p)) = ev {
            out.push(p);
        }
    }
    out
}

/// The adapter suite's view of Mosquitto: a client id per check, consuming `<id>/orders` in a
/// persistent session, with its dead letters kept by the session `<id>.dead-letter`.
#[derive(Clone)]
struct Mosquitto {
    url: String,
    producer: Arc<OnceCell<MqttProducer>>,
}

async fn harness() -> Option<Mosquitto> {
    Some(Mosquitto {
        url: url()?,
        producer: Arc::default(),
    })
}

mod adapter {
    idem_conformance::adapter_tests!(super::harness);
}

impl BrokerHarness for Mosquitto {
    type Source = MqttSource;

    fn destination(&self, check: &str) -> String {
        unique(check)
    }

    fn address(&self) -> SocketAddr {
        socket_addr(&self.url)
    }

    async fn connect(&self, client_id: &str, through: Option<SocketAddr>) -> MqttSource {
        let url = through.map_or_else(|| self.url.clone(), |addr| via(&self.url, addr));
        MqttSource::connect(&url, MqttConfig::new(client_id, topic(client_id)))
            .await
            .unwrap()
    }

    async fn publish(&self, client_id: &str, message: &Outgoing) -> bool {
        let producer = self
            .producer
            .get_or_init(|| async { MqttProducer::connect(&self.url).await.unwrap() })
            .await;
        producer.publish(&topic(client_id), message).await.unwrap();
        true
    }

    async fn dead_letters(&self, client_id: &str) -> Vec<DeadLetter> {
        let config = MqttConfig::new(client_id, topic(client_id));
        dead_letters(&self.url, &config)
            .await
            .into_iter()
            .map(|p| {
                let mut message = Message::new(topic(client_id), p.payload.clone());
                let mut reason = String::new();
                for (name, value) in p.properties.iter().flat_map(|p| &p.user_properties) {
                    if name == header::MESSAGE_ID {
                        message = message.with_message_id(value.as_str());
                    } else if name == header::DEAD_LETTER_REASON {
                        reason.clone_from(value);
                    }
                    message = message.with_header(name.as_str(), value.clone());
                }
                DeadLetter { message, reason }
            })
            .collect()
    }

    async fn backlog(&self, client_id: &str) -> u64 {
        let config = MqttConfig::new(client_id, topic(client_id));
        left_in_session(&self.url, &config, Duration::from_millis(800)).await as u64
    }

    fn redelivery_timeout(&self) -> Option<Duration> {
        None
    }

    async fn cleanup(&self, client_id: &str) {
        let config = MqttConfig::new(client_id, topic(client_id));
        remove_session(&self.url, client_id).await;
        remove_session(&self.url, &config.dead_letter_client_id()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_nothing_and_applies_once() {
    // A private mosquitto (with persistence) is restarted mid-stream (SIGTERM: Mosquitto saves
    // sessions on shutdown; after a SIGKILL it would lose what changed since its last autosave,
    // see the module docs). The consumer reconnects, the session resumes with the unacked
    // messages, and every message is applied once.
    if url().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let conf = conf.to_string_lossy().into_owned();
    let args = ["-c", conf.as_str()];
    let Some(mut server) = ServerProcess::start("mosquitto", &args, port) else {
        return;
    };
    let url = format!("mqtt://127.0.0.1:{port}");
    let id = unique("restart");
    let topic = format!("{id}/orders");
    let config = MqttConfig::new(&id, &topic);
    let source = MqttSource::connect(&url, config.clone()).await.unwrap();
    let producer = MqttProducer::connect(&url).await.unwrap();
    let msgs = numbered(100);
    for m in &msgs {
        producer.publish(&topic, m).await.unwrap();
    }
    let ledger = Ledger::default();
    let (stats, running, _store_dir) = start_slow(source, &ledger, 30);
    until(30, "some progress", || stats.snapshot().acked >= 20).await;
    server.terminate();
    let Some(_server) = ServerProcess::start("mosquitto", &args, port) else {
        return;
    };
    until(60, "all applied", || ledger.len() == 100).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    running.stop().await;
    ledger.assert_exactly_once(msgs.iter().map(Outgoing::id));
    assert_eq!(
        left_in_session(&url, &config, Duration::from_millis(800)).await,
        0
    );
}

/// Removes a session from the broker: connects as its client with a clean start and no session
/// expiry, then disconnects (what an operator, or the session's expiry, does).
async fn remove_session(url: &str, client_id: &str) {
    let (host, port) = idem_conformance::server::host_port(url).unwrap();
    let mut opts = MqttOptions::new(client_id, host, port);
    opts.set_clean_start(true);
    opts.set_session_expiry_interval(Some(0));
    let (client, mut events) = AsyncClient::new(opts, 8);
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await.unwrap() {
            break;
        }
    }
    client.disconnect().await.unwrap();
    while events.poll().await.is_ok() {}
}

/// Publishes `n` messages without a message id (MQTT 3.1.1 style) at QoS 1 and waits for every
/// `PUBACK`.
async fn publish_without_ids(url: &str, topic: &str, n: usize) {
    let (host, port) = idem_conformance::server::host_port(url).unwrap();
    let (raw, mut events) = AsyncClient::new(MqttOptions::new(unique("raw"), host, port), 64);
    for i in 0..n {
        raw.publish(topic, QoS::AtLeastOnce, false, format!("no id {i}"))
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < n {
        if let Event::Incoming(Packet::PubAck(_)) = events.poll().await.unwrap() {
            acked += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_dead_letter_session_is_declared_again_and_nothing_stalls() {
    // The bug: when the dead-letter publish failed (here: the session keeping dead letters is
    // gone, so the broker answers "no matching subscribers"), the delivery was neither acked
    // nor handed back. It stayed unsettled for good, holding one of Mosquitto's 20 in-flight
    // slots of the session; after 20 such failures the broker sent the consumer nothing more.
    // Now the session is declared again, and a delivery whose dead letter still fails comes
    // back a second later.
    let Some(url) = url() else { return };
    let id = unique("dl-lost");
    let topic = format!("{id}/orders");
    let config = MqttConfig::new(&id, &topic);
    let source = MqttSource::connect(&url, config.clone()).await.unwrap();
    remove_session(&url, &config.dead_letter_client_id()).await;
    // More poison messages than Mosquitto's in-flight window, then good ones behind them.
    publish_without_ids(&url, &topic, 25).await;
    let producer = MqttProducer::connect(&url).await.unwrap();
    let good = numbered(5);
    for m in &good {
        producer.publish(&topic, m).await.unwrap();
    }
    let ledger = Ledger::default();
    let (stats, running) = start(Consumer::new(
        source,
        Executor::new(MemoryStore::new()),
        ns(),
        ledger.handler(),
    ));
    until(60, "every message settled", || {
        let s = stats.snapshot();
        s.dead_lettered == 25 && s.acked == 5
    })
    .await;
    running.stop().await;
    ledger.assert_exactly_once(good.iter().map(Outgoing::id));
    // A consumer restart declares the dead-letter session again: that must not take (and ack)
    // the dead letters it keeps.
    MqttSource::connect(&url, config.clone())
        .await
        .unwrap()
        .close()
        .await;
    assert_eq!(dead_letters(&url, &config).await.len(), 25);
    assert_eq!(
        left_in_session(&url, &config, Duration::from_millis(800)).await,
        0
    );
    remove_session(&url, &id).await;
    remove_session(&url, &config.dead_letter_client_id()).await;
}
