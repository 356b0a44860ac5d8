//! STOMP adapter against a live ActiveMQ Classic (`IDEM_STOMP_URL`, default
//! `stomp://127.0.0.1:61613`, the broker `.ci/brokers/activemq.sh` starts): the adapter suite
//! (`idem_conformance::broker`), then what only this adapter has: delayed retries held by the
//! source (never a NACK, so never the broker's DLQ), duplicates published by another client
//! (Python's `stomp.py`), a broker SIGKILLed and restarted mid-stream (a private ActiveMQ on
//! ports of its own), the admin's dead letters republished, and a consume benchmark
//! (`#[ignore]`: `bench_consume`).
#![cfg(feature = "stomp")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    Ledger, ServerProcess, free_port, numbered, socket_addr, sqlite_store, start, start_slow,
    unique, until, via,
};
use futures_util::StreamExt;
use futures_util::future::join_all;
use idem::{Attempt, Executor, Namespace};
use idem_broker::stomp::admin::StompAdmin;
use idem_broker::stomp::{MESSAGE_ID_HEADER, StompConfig, StompProducer, StompSource};
use idem_broker::{Acker, Admin, Consumer, Message, Outgoing, Source};
use idem_conformance::broker::{BrokerHarness, DeadLetter};
use idem_conformance::server;
use tokio::sync::OnceCell;

const STOMP: (&str, &str) = ("IDEM_STOMP_URL", "stomp://127.0.0.1:61613");

fn url() -> Option<String> {
    server::url(STOMP)
}

/// Logs to the test's output with `RUST_LOG` set.
fn logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

fn ns() -> Namespace {
    Namespace::new("stomp-test").unwrap()
}

/// A queue name of the test's own.
fn queue(prefix: &str) -> String {
    unique(prefix)
}

async fn admin(url: &str, queue: &str) -> StompAdmin {
    StompAdmin::connect(url, StompConfig::new(queue))
        .await
        .unwrap()
}

/// Messages the queue holds (browsed), delivered-and-unacked ones included.
async fn backlog(url: &str, queue: &str) -> u64 {
    let admin = admin(url, queue).await;
    let n = admin.backlog().await.unwrap().expect("a countable backlog");
    admin.close().await;
    n
}

/// The adapter suite's view of ActiveMQ over STOMP: a queue per check, dead letters in
/// `DLQ.<queue>`.
#[derive(Clone)]
struct Activemq {
    url: String,
    producer: Arc<OnceCell<StompProducer>>,
}

async fn harness() -> Option<Activemq> {
    logs();
    Some(Activemq {
        url: url()?,
        producer: Arc::default(),
    })
}

mod adapter {
    idem_conformance::adapter_tests!(super::harness);
}

impl BrokerHarness for Activemq {
    type Source = StompSource;

    fn destination(&self, check: &str) -> String {
        queue(check)
    }

    fn address(&self) -> SocketAddr {
        socket_addr(&self.url)
    }

    async fn connect(&self, queue: &str, through: Option<SocketAddr>) -> StompSource {
        let url = through.map_or_else(|| self.url.clone(), |addr| via(&self.url, addr));
        StompSource::connect(&url, StompConfig::new(queue))
            .await
            .unwrap()
    }

    async fn publish(&self, queue: &str, message: &Outgoing) -> bool {
        let producer = self
            .producer
            .get_or_init(|| async { StompProducer::connect(&self.url).await.unwrap() })
            .await;
        producer.publish(queue, message).await.unwrap();
        true
    }

    async fn dead_letters(&self, queue: &str) -> Vec<DeadLetter> {
        let admin = admin(&self.url, queue).await;
        let dead = admin.dead_letters(1000).await.unwrap();
        let out = dead
            .into_iter()
            .map(|d| DeadLetter {
                reason: d.reason().unwrap_or_default().to_owned(),
                message: d.into_message(),
            })
            .collect();
        admin.close().await;
        out
    }

    async fn backlog(&self, queue: &str) -> u64 {
        backlog(&self.url, queue).await
    }

    fn redelivery_timeout(&self) -> Option<Duration> {
        None
    }

    async fn cleanup(&self, queue: &str) {
        let admin = admin(&self.url, queue).await;
        admin.cleanup().await.unwrap();
        admin.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_retries_come_back_counted_and_never_reach_the_dead_letter_queue() {
    // ActiveMQ's stock configuration dead-letters a NACKed message at once; idem never NACKs:
    // a delivery to retry is held unacked and handed back after the delay, again and again.
    let Some(url) = url() else { return };
    let q = queue("held");
    let mut source = StompSource::connect(&url, StompConfig::new(&q))
        .await
        .unwrap();
    let acker = source.acker();
    let producer = StompProducer::connect(&url).await.unwrap();
    producer
        .publish(&q, &Outgoing::with_id("m", &b"x"[..]))
        .await
        .unwrap();
    let mut got = source.receive(1).await.unwrap().pop().unwrap();
    for n in 1..=5 {
        assert_eq!(got.message.delivery_count(), n);
        assert_eq!(got.message.message_id(), Some("m"));
        let nacked = Instant::now();
        acker
            .nack(got.delivery, Duration::from_millis(100))
            .await
            .unwrap();
        got = source.receive(1).await.unwrap().pop().unwrap();
        assert!(nacked.elapsed() >= Duration::from_millis(90));
    }
    let dlq = admin(&url, &q).await;
    assert!(dlq.dead_letters(10).await.unwrap().is_empty());
    acker.ack(vec![got.delivery]).await.unwrap();
    source.close().await;
    assert_eq!(backlog(&url, &q).await, 0);
    dlq.cleanup().await.unwrap();
    dlq.close().await;
    producer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_read_back_and_republished_with_their_id() {
    let Some(url) = url() else { return };
    let q = queue("redrive");
    let mut source = StompSource::connect(&url, StompConfig::new(&q))
        .await
        .unwrap();
    let acker = source.acker();
    let producer = StompProducer::connect(&url).await.unwrap();
    let msg = Outgoing::with_id("poison-1", &b"{\"n\": 1}"[..]).with_header("tenant", "acme");
    producer.publish(&q, &msg).await.unwrap();
    let got = source.receive(1).await.unwrap().pop().unwrap();
    let message = got.message.clone();
    acker
        .dead_letter(got.delivery, &message, "a reason: with\na second line")
        .await
        .unwrap();
    let admin = admin(&url, &q).await;
    assert_eq!(admin.backlog().await.unwrap(), Some(0));
    let dead = admin.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].reason(), Some("a reason: with a second line"));
    assert_eq!(dead[0].message().message_id(), Some("poison-1"));
    assert_eq!(dead[0].message().header("tenant"), Some(&b"acme"[..]));
    assert_eq!(dead[0].message().origin(), q);
    // Read once: the same admin does not hand it out twice.
    assert!(admin.dead_letters(10).await.unwrap().is_empty());
    admin
        .republish(dead.into_iter().next().unwrap())
        .await
        .unwrap();
    let again = source.receive(1).await.unwrap().pop().unwrap();
    assert_eq!(again.message.message_id(), Some("poison-1"));
    assert_eq!(again.message.header("tenant"), Some(&b"acme"[..]));
    assert_eq!(&again.message.payload()[..], b"{\"n\": 1}");
    acker.ack(vec![again.delivery]).await.unwrap();
    source.close().await;
    assert!(admin.dead_letters(10).await.unwrap().is_empty());
    assert_eq!(admin.backlog().await.unwrap(), Some(0));
    admin.cleanup().await.unwrap();
    admin.close().await;
    producer.close().await;
}

// ---------------------------------------------------------------------------------------------
// Duplicates from another client: Python's stomp.py.

/// A virtual environment with stomp.py, made once under the CI cache directory.
fn stomp_py() -> Option<PathBuf> {
    let cache = std::env::var_os("IDEM_CI_CACHE").map_or_else(
        || {
            Path::new(&std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
                .join(".cache/idem-ci")
        },
        PathBuf::from,
    );
    let venv = cache.join("stomp-py-venv");
    let python = venv.join("bin/python");
    let ok = |p: &Path| {
        Command::new(p)
            .args(["-c", "import stomp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if ok(&python) {
        return Some(python);
    }
    let run = |cmd: &mut Command| {
        cmd.stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    std::fs::create_dir_all(&cache).ok()?;
    if !run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        || !run(Command::new(venv.join("bin/pip")).args(["install", "-q", "stomp.py>=8,<10"]))
        || !ok(&python)
    {
        return idem_testkit::missing("cannot install stomp.py in a virtual environment");
    }
    Some(python)
}

const STOMP_PY_PRODUCER: &str = r#"
import sys, stomp
host, port, queue, n, header = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
conn = stomp.Connection12([(host, port)])
conn.connect(wait=True)
# Every message twice with the same id, as a producer retrying after a lost receipt does.
for copy in range(2):
    for i in range(n):
        conn.send(destination="/queue/" + queue, body="py-%d" % i,
                  headers={header: "py-%d" % i, "persistent": "true"})
conn.disconnect(receipt="bye")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_from_a_stomp_py_producer_are_applied_once() {
    let Some(url) = url() else { return };
    let Some(python) = stomp_py() else { return };
    let q = queue("stomppy");
    let source = StompSource::connect(&url, StompConfig::new(&q))
        .await
        .unwrap();
    let addr = socket_addr(&url);
    let n = 100;
    let status = Command::new(&python)
        .args(["-c", STOMP_PY_PRODUCER])
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(&q)
        .arg(n.to_string())
        .arg(MESSAGE_ID_HEADER)
        .status()
        .unwrap();
    assert!(status.success(), "the stomp.py producer failed: {status}");
    let ledger = Ledger::default();
    let (store, _dir) = sqlite_store();
    let (stats, running) =
        start(Consumer::new(source, Executor::new(store), ns(), ledger.handler()).batch_size(32));
    until(60, "every copy acked", || stats.snapshot().acked == 2 * n).await;
    let snap = running.stop().await;
    let ids: Vec<String> = (0..n).map(|i| format!("py-{i}")).collect();
    ledger.assert_exactly_once(ids.iter().map(String::as_str));
    assert_eq!((snap.executed, snap.replayed), (n, n), "{snap:?}");
    assert_eq!(backlog(&url, &q).await, 0);
}

// ---------------------------------------------------------------------------------------------
// A private ActiveMQ, SIGKILLed and restarted.

const ACTIVEMQ_JAR: &str = "/usr/share/activemq/bin/activemq.jar";

/// A private ActiveMQ instance (its own configuration, kahaDB and ports) that a test can kill
/// and start again on the same data.
struct PrivateActivemq {
    base: tempfile::TempDir,
    stomp_port: u16,
}

impl PrivateActivemq {
    fn new() -> Option<Self> {
        if !Path::new(ACTIVEMQ_JAR).exists() {
            return idem_testkit::missing(format!(
                "{ACTIVEMQ_JAR} is missing (Debian's activemq package)"
            ));
        }
        let base = tempfile::tempdir().unwrap();
        let (openwire, stomp_port) = (free_port(), free_port());
        std::fs::create_dir_all(base.path().join("conf")).unwrap();
        std::fs::create_dir_all(base.path().join("tmp")).unwrap();
        let xml = format!(
            r#"<beans xmlns="http://www.springframework.org/schema/beans"
       xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
       xsi:schemaLocation="http://www.springframework.org/schema/beans http://www.springframework.org/schema/beans/spring-beans.xsd
                           http://activemq.apache.org/schema/core http://activemq.apache.org/schema/core/activemq-core.xsd">
  <bean class="org.springframework.beans.factory.config.PropertyPlaceholderConfigurer"/>
  <broker xmlns="http://activemq.apache.org/schema/core" brokerName="idem-restart" useJmx="false"
          persistent="true" dataDirectory="${{activemq.data}}">
    <destinationPolicy><policyMap><policyEntries>
      <policyEntry queue=">"><deadLetterStrategy>
        <individualDeadLetterStrategy queuePrefix="DLQ." useQueueForQueueMessages="true"/>
      </deadLetterStrategy></policyEntry>
    </policyEntries></policyMap></destinationPolicy>
    <persistenceAdapter><kahaDB directory="${{activemq.data}}/kahadb"/></persistenceAdapter>
    <transportConnectors>
      <transportConnector name="openwire" uri="tcp://127.0.0.1:{openwire}"/>
      <transportConnector name="stomp" uri="stomp://127.0.0.1:{stomp_port}"/>
    </transportConnectors>
  </broker>
</beans>
"#
        );
        std::fs::write(base.path().join("conf/activemq.xml"), xml).unwrap();
        Some(Self { base, stomp_port })
    }

    fn url(&self) -> String {
        format!("stomp://127.0.0.1:{}", self.stomp_port)
    }

    fn start(&self) -> ServerProcess {
        let b = self.base.path();
        let d = |k: &str, v: &Path| format!("-D{k}={}", v.display());
        let mut cmd = Command::new("java");
        cmd.args(["-Xms64M", "-Xmx256M", "--add-reads=java.xml=java.logging"])
            .args([
                "--add-opens",
                "java.base/java.lang=ALL-UNNAMED",
                "--add-opens",
                "java.base/java.util=ALL-UNNAMED",
                "--add-opens",
                "java.base/java.util.concurrent=ALL-UNNAMED",
                "--add-opens",
                "java.naming/javax.naming.spi=ALL-UNNAMED",
            ])
            .arg(d("java.io.tmpdir", &b.join("tmp")))
            .arg(d("activemq.classpath", &b.join("conf")))
            .arg(d("activemq.home", Path::new("/usr/share/activemq")))
            .arg(d("activemq.base", b))
            .arg(d("activemq.conf", &b.join("conf")))
            .arg(d("activemq.data", &b.join("data")))
            .args(["-jar", ACTIVEMQ_JAR, "start"])
            .arg(format!(
                "xbean:file:{}",
                b.join("conf/activemq.xml").display()
            ))
            .current_dir(b)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        ServerProcess::spawn(&mut cmd, self.stomp_port)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_nothing_and_applies_once() {
    // ActiveMQ is SIGKILLed mid-stream and started again on the same kahaDB: persistent
    // messages survive, the client reconnects and subscribes again, unacked deliveries come
    // back (`redelivered:true`) and replay; every message is applied once.
    if url().is_none() {
        return;
    }
    let Some(broker) = PrivateActivemq::new() else {
        return;
    };
    let mut server = broker.start();
    let url = broker.url();
    let q = queue("restart");
    let source = StompSource::connect(&url, StompConfig::new(&q).heartbeat(Duration::from_secs(2)))
        .await
        .unwrap();
    let producer = StompProducer::connect(&url).await.unwrap();
    let msgs = numbered(200);
    join_all(msgs.iter().map(|m| producer.publish(&q, m)))
        .await
        .into_iter()
        .for_each(|r| r.unwrap());
    producer.close().await;
    let ledger = Ledger::default();
    let (stats, running, _store_dir) = start_slow(source, &ledger, 20);
    until(30, "some progress", || stats.snapshot().acked >= 40).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _server = broker.start();
    until(120, "all applied", || ledger.len() == 200).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = backlog(&url, &q).await;
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} left: {:?}",
            stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let snap = running.stop().await;
    ledger.assert_exactly_once(msgs.iter().map(Outgoing::id));
    assert!(snap.acked >= 200, "{snap:?}");
}

// ---------------------------------------------------------------------------------------------
// Benchmark: `cargo test -p idem-broker --features stomp --release --test stomp -- --ignored
// --nocapture bench_consume` (IDEM_BENCH_MESSAGES, default 20000).

async fn fill(url: &str, q: &str, n: usize) {
    let producer = StompProducer::connect(url).await.unwrap();
    let msgs: Vec<Outgoing> = (0..n)
        .map(|i| Outgoing::new(format!("{{\"n\": {i}}}").into_bytes()))
        .collect();
    for chunk in msgs.chunks(500) {
        join_all(chunk.iter().map(|m| producer.publish_once(q, m)))
            .await
            .into_iter()
            .for_each(|r| r.unwrap());
    }
    producer.close().await;
}

/// `iridium-stomp`'s own `Connection`, one ACK per message, for reference.
async fn raw_consume(url: &str, q: &str, n: usize) -> Duration {
    let addr = socket_addr(url);
    let conn = iridium_stomp::Connection::connect(
        &addr.to_string(),
        "",
        "",
        iridium_stomp::Connection::DEFAULT_HEARTBEAT,
    )
    .await
    .unwrap();
    let options = iridium_stomp::SubscriptionOptions::new()
        .header("activemq.prefetchSize", "256")
        .channel_capacity(256);
    let t = Instant::now();
    let mut sub = conn
        .subscribe_with_options(
            &format!("/queue/{q}"),
            iridium_stomp::AckMode::ClientIndividual,
            options,
        )
        .await
        .unwrap();
    for _ in 0..n {
        let frame = sub.next().await.unwrap();
        sub.ack_frame(&frame).await.unwrap();
    }
    let took = t.elapsed();
    drop(sub);
    conn.close().await.unwrap();
    took
}

/// The adapter without idem: the same client, subscription and ACKs, batches of 64 acked as
/// they come.
async fn source_consume(url: &str, q: &str, n: usize) -> Duration {
    let mut source = StompSource::connect(url, StompConfig::new(q))
        .await
        .unwrap();
    let acker = source.acker();
    let t = Instant::now();
    let mut got = 0;
    while got < n {
        let batch = source.receive(64).await.unwrap();
        got += batch.len();
        acker
            .ack(batch.into_iter().map(|d| d.delivery).collect())
            .await
            .unwrap();
    }
    let took = t.elapsed();
    source.close().await;
    took
}

async fn idem_consume<S: idem::Store + Clone>(url: &str, q: &str, n: usize, store: S) -> Duration {
    let source = StompSource::connect(url, StompConfig::new(q))
        .await
        .unwrap();
    let t = Instant::now();
    let consumer = Consumer::new(
        source,
        Executor::new(store),
        Namespace::new(unique("bench")).unwrap(),
        |_m: Message, _a: Attempt| std::future::ready(Ok::<_, std::io::Error>(())),
    )
    .batch_size(64);
    let (stats, running) = start(consumer);
    until(600, "every message acked", || {
        stats.snapshot().acked == n as u64
    })
    .await;
    let took = t.elapsed();
    running.stop().await;
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it with --ignored --nocapture, in release mode"]
async fn bench_consume() {
    let Some(url) = url() else { return };
    let n: usize = std::env::var("IDEM_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let redis_url = server::url(server::REDIS);
    let rate = |took: Duration| n as f64 / took.as_secs_f64();
    let rounds: usize = std::env::var("IDEM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    for round in 0..rounds {
        let q = queue("bench-iridium");
        fill(&url, &q, n).await;
        let iridium = rate(raw_consume(&url, &q, n).await);
        let q = queue("bench-raw");
        fill(&url, &q, n).await;
        let raw = rate(source_consume(&url, &q, n).await);
        let q = queue("bench-sqlite");
        fill(&url, &q, n).await;
        let (store, _dir) = sqlite_store();
        let sqlite = rate(idem_consume(&url, &q, n, store).await);
        let redis = match &redis_url {
            Some(r) => {
                let q = queue("bench-redis");
                fill(&url, &q, n).await;
                let store = idem_redis::RedisStore::connect(r).await.unwrap();
                Some(rate(idem_consume(&url, &q, n, store).await))
            }
            None => None,
        };
        println!(
            "round {round}: raw STOMP (the adapter's client, no idem) {raw:.0} msg/s; \
             iridium-stomp Connection {iridium:.0} msg/s; idem+SQLite {sqlite:.0} msg/s \
             ({:.2}x raw); idem+Redis {}",
            sqlite / raw,
            redis.map_or("skipped".to_owned(), |r| format!(
                "{r:.0} msg/s ({:.2}x raw)",
                r / raw
            ))
        );
    }
}
