//! MQTT adapter against the live Mosquitto (`IDEM_MQTT_URL`), and a private `mosquitto` for the
//! restart test. Each test uses its own topics and client ids.
#![cfg(feature = "mqtt")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{
    Ledger, Proxy, ServerProcess, free_port, numbered, socket_addr, sqlite_store, start,
    start_slow, unique, until, via,
};
use idem::{Executor, MemoryStore, Namespace};
use idem_broker::mqtt::{MqttConfig, MqttProducer, MqttSource};
use idem_broker::{Consumer, Outgoing, Source, header};
use idem_conformance::server;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

fn url() -> Option<String> {
    server::url(server::MQTT)
}

fn ns() -> Namespace {
    Namespace::new("mqtt-test").unwrap()
}

/// Reconnects as `config`'s client and counts what the broker still holds for the session
/// (unacked or queued), within `wait`; then removes the session.
async fn left_in_session(url: &str, config: &MqttConfig, wait: Duration) -> usize {
    let mut source = MqttSource::connect(url, config.clone()).await.unwrap();
    let mut n = 0;
    while let Ok(Ok(got)) = tokio::time::timeout(wait, source.receive(100)).await {
        n += got.len();
    }
    source.close().await;
    n
}

/// Reads the dead letters kept for `config`'s dead-letter session.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_retries_are_applied_once() {
    let Some(url) = url() else { return };
    let id = unique("dups");
    let topic = format!("{id}/orders");
    let config = MqttConfig::new(&id, &topic);
    let source = MqttSource::connect(&url, config.clone()).await.unwrap();
    let producer = MqttProducer::connect(&url).await.unwrap();
    let msgs: Vec<Outgoing> = (0..50)
        .map(|i| Outgoing::new(format!("{i}").into_bytes()))
        .collect();
    for _ in 0..3 {
        for m in &msgs {
            producer.publish_once(&topic, m).await.unwrap();
        }
    }
    let ledger = Ledger::default();
    let (store, _dir) = sqlite_store();
    let (stats, running) =
        start(Consumer::new(source, Executor::new(store), ns(), ledger.handler()).batch_size(16));
    until(30, "150 acks", || stats.snapshot().acked == 150).await;
    let snap = running.stop().await;
    ledger.assert_exactly_once(msgs.iter().map(Outgoing::id));
    assert_eq!((snap.executed, snap.replayed), (50, 100));
    assert_eq!(
        left_in_session(&url, &config, Duration::from_millis(800)).await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_the_reason() {
    let Some(url) = url() else { return };
    let id = unique("poison");
    let topic = format!("{id}/orders");
    let config = MqttConfig::new(&id, &topic);
    let source = MqttSource::connect(&url, config.clone()).await.unwrap();
    // An MQTT 3.1.1-style message: no user property, so no message id.
    let (host, port) = idem_conformance::server::host_port(&url).unwrap();
    let (raw, mut raw_events) = AsyncClient::new(MqttOptions::new(unique("raw"), host, port), 8);
    raw.publish(&topic, QoS::AtLeastOnce, false, "no id")
        .await
        .unwrap();
    let pump = tokio::spawn(async move {
        loop {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = raw_events.poll().await {
                break;
            }
        }
    });
    pump.await.unwrap();
    let producer = MqttProducer::connect(&url).await.unwrap();
    let good = Outgoing::new(&b"fine"[..]);
    producer.publish(&topic, &good).await.unwrap();
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
    let dead = dead_letters(&url, &config).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(&dead[0].payload[..], b"no id");
    let props = dead[0].properties.clone().unwrap();
    let reason = props
        .user_properties
        .iter()
        .find(|(k, _)| k == header::DEAD_LETTER_REASON)
        .map(|(_, v)| v.clone())
        .unwrap();
    assert!(reason.contains("no message id"), "{reason}");
    assert_eq!(
        left_in_session(&url, &config, Duration::from_millis(800)).await,
        0
    );
}

#[test]
fn consumer_killed_mid_batch_resumes_its_session_and_applies_once() {
    // The persistent session keeps every unacked message; the restarted consumer (same client
    // id) gets them again.
    let Some(url) = url() else { return };
    let main = tokio::runtime::Runtime::new().unwrap();
    let id = unique("kill");
    let topic = format!("{id}/orders");
    let config = MqttConfig::new(&id, &topic);
    let producer = main.block_on(MqttProducer::connect(&url)).unwrap();
    common::killed_mid_batch(
        &main,
        || async { MqttSource::connect(&url, config.clone()).await.unwrap() },
        |m| {
            let (producer, topic) = (&producer, &topic);
            async move { producer.publish(topic, &m).await.unwrap() }
        },
        // Checking the session would take it over from the running consumer: only after.
        || async { true },
        || async { left_in_session(&url, &config, Duration::from_millis(800)).await == 0 },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_resume_the_session_and_lose_nothing() {
    // The network drops the consumer's connection twice mid-stream. The session resumes, the
    // broker resends unacked messages; stale copies are not acked under reused packet ids;
    // every message is applied once and nothing stays unacked.
    let Some(url) = url() else { return };
    let proxy = Proxy::start(socket_addr(&url)).await;
    let proxied = via(&url, proxy.addr);
    let id = unique("drop");
    let topic = format!("{id}/orders");
    let config = MqttConfig::new(&id, &topic);
    let source = MqttSource::connect(&proxied, config.clone()).await.unwrap();
    let producer = MqttProducer::connect(&url).await.unwrap();
    let msgs = numbered(150);
    for m in &msgs {
        producer.publish(&topic, m).await.unwrap();
    }
    let ledger = Ledger::default();
    let (stats, running, _store_dir) = start_slow(source, &ledger, 20);
    until(30, "some progress", || stats.snapshot().acked >= 30).await;
    proxy.cut_when_connected().await;
    until(30, "progress after the first cut", || {
        stats.snapshot().acked >= 80
    })
    .await;
    proxy.cut_when_connected().await;
    until(60, "all applied", || ledger.len() == 150).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let snap = running.stop().await;
    ledger.assert_exactly_once(msgs.iter().map(Outgoing::id));
    assert_eq!(
        left_in_session(&url, &config, Duration::from_millis(800)).await,
        0,
        "{snap:?}"
    );
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
    let Some(server) = ServerProcess::start("mosquitto", &args, port) else {
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
    terminate(server);
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

/// Stops a server with SIGTERM and waits for it to exit.
fn terminate(mut server: ServerProcess) {
    let pid = server.pid().unwrap();
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    server.wait();
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
}
