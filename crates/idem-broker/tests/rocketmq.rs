//! RocketMQ adapter against a live name server and broker (`IDEM_ROCKETMQ_URL`, default
//! `rocketmq://127.0.0.1:9876`; `.ci/brokers/rocketmq.sh` starts them with every delay level at
//! 1 s): the adapter suite (`idem_conformance::broker`), then what only RocketMQ has: identity
//! through the retry topic, the client's traps, the admin's dead letters, a broker restart on a
//! private name server and broker (`IDEM_ROCKETMQ_BIN`), and a consume benchmark (ignored).
#![cfg(feature = "rocketmq")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    Ledger, ServerProcess, free_port, numbered, socket_addr, sqlite_store, start, until, via,
};
use idem::{Executor, Namespace};
use idem_broker::rocketmq::admin::RocketMqAdmin;
use idem_broker::rocketmq::{RocketMqConfig, RocketMqProducer, RocketMqSource};
use idem_broker::{Acker, Admin, Consumer, Outgoing, Source};
use idem_conformance::broker::{BrokerHarness, DeadLetter};
use idem_conformance::server;
use tokio::sync::OnceCell;

const ROCKETMQ: (&str, &str) = ("IDEM_ROCKETMQ_URL", "rocketmq://127.0.0.1:9876");

fn url() -> Option<String> {
    server::url(ROCKETMQ)
}

fn ns() -> Namespace {
    Namespace::new("rocketmq-test").unwrap()
}

/// A topic name unique to the test (RocketMQ names: letters, digits, `_` and `-`).
fn topic(prefix: &str) -> String {
    format!("idem_{prefix}_{:08x}", fastrand::u32(..))
}

/// The configuration of `topic` in these tests: group `g_<topic>`, every delay level 1 s (the
/// test broker's `messageDelayLevel`).
fn config(topic: &str) -> RocketMqConfig {
    RocketMqConfig::new(topic, format!("g_{topic}")).delay_levels([Duration::from_secs(1); 18])
}

/// The adapter suite's configuration: topics of one queue. The suite's poison check expects
/// the first published of two messages with one key to be the one run; RocketMQ orders
/// messages only within a queue, and a topic of 4 queues consumes them in any order.
fn suite_config(topic: &str) -> RocketMqConfig {
    let mut c = config(topic);
    c.queues = 1;
    c
}

#[derive(Clone)]
struct Rocket {
    url: String,
    producer: Arc<OnceCell<RocketMqProducer>>,
}

async fn harness() -> Option<Rocket> {
    Some(Rocket {
        url: url()?,
        producer: Arc::default(),
    })
}

mod adapter {
    idem_conformance::adapter_tests!(super::harness);
}

impl Rocket {
    async fn producer(&self) -> &RocketMqProducer {
        self.producer
            .get_or_init(|| async { RocketMqProducer::connect(&self.url).await.unwrap() })
            .await
    }
}

impl BrokerHarness for Rocket {
    type Source = RocketMqSource;

    fn destination(&self, check: &str) -> String {
        topic(&check.replace('-', "_"))
    }

    /// The name server: RocketMQ clients reach brokers at the address the name server
    /// publishes, so the suite's proxy can only stand between the client and the name server.
    fn address(&self) -> SocketAddr {
        socket_addr(&self.url)
    }

    async fn connect(&self, topic: &str, through: Option<SocketAddr>) -> RocketMqSource {
        let url = through.map_or_else(|| self.url.clone(), |addr| via(&self.url, addr));
        RocketMqSource::connect(&url, suite_config(topic))
            .await
            .unwrap()
    }

    async fn publish(&self, topic: &str, message: &Outgoing) -> bool {
        self.producer().await.publish(topic, message).await.unwrap();
        true
    }

    async fn dead_letters(&self, topic: &str) -> Vec<DeadLetter> {
        let admin = RocketMqAdmin::connect(&self.url, config(topic))
            .await
            .unwrap();
        let read = admin.dead_letters(100).await.unwrap();
        admin.close().await;
        read.into_iter()
            .map(|d| DeadLetter {
                reason: d.reason().unwrap_or_default().to_owned(),
                message: d.into_message(),
            })
            .collect()
    }

    async fn backlog(&self, topic: &str) -> u64 {
        let admin = RocketMqAdmin::connect(&self.url, config(topic))
            .await
            .unwrap();
        let left = admin.backlog().await.unwrap().unwrap();
        admin.close().await;
        left
    }

    fn redelivery_timeout(&self) -> Option<Duration> {
        // A delivery stays with its consumer until settled (or its queue moves to another
        // consumer, or 15 minutes pass).
        None
    }

    async fn cleanup(&self, topic: &str) {
        if let Ok(admin) = RocketMqAdmin::connect(&self.url, config(topic)).await {
            let _ = admin.cleanup().await;
            admin.close().await;
        }
    }
}

/// Receives until `n` deliveries came, or panics after `secs`.
async fn receive_n(
    source: &mut RocketMqSource,
    n: usize,
    secs: u64,
) -> Vec<idem_broker::Incoming<idem_broker::rocketmq::RocketMqDelivery>> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, source.receive(n - got.len())).await {
            Ok(batch) => got.extend(batch.unwrap()),
            Err(_) => panic!("received {} of {n} within {secs} s", got.len()),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_counts_survive_the_retry_topic() {
    // The broker's msg_id changes when a message comes back through %RETRY%<group>; the message
    // id (the `message-id` property, KEYS) does not, and the delivery count is
    // reconsume_times + 1. Headers come through as user properties.
    let Some(url) = url() else { return };
    let t = topic("identity");
    let mut source = RocketMqSource::connect(&url, config(&t)).await.unwrap();
    let acker = source.acker();
    let producer = RocketMqProducer::connect(&url).await.unwrap();
    let msg = Outgoing::with_id("order-7", &b"x"[..]).with_header("tenant", "acme");
    producer.publish(&t, &msg).await.unwrap();
    let mut seen = Vec::new();
    for round in 1..=3u32 {
        let [d] = <[_; 1]>::try_from(receive_n(&mut source, 1, 30).await).unwrap();
        assert_eq!(d.message.message_id(), Some("order-7"));
        assert_eq!(d.message.delivery_count(), round, "{:?}", d.message);
        assert_eq!(d.message.header("tenant"), Some(&b"acme"[..]));
        assert!(d.message.header("UNIQ_KEY").is_none(), "{:?}", d.message);
        seen.push(format!("{d:?}"));
        if round < 3 {
            acker.nack(d.delivery, Duration::ZERO).await.unwrap();
        } else {
            acker.ack(vec![d.delivery]).await.unwrap();
        }
    }
    source.close().await;
    let admin = RocketMqAdmin::connect(&url, config(&t)).await.unwrap();
    assert_eq!(admin.backlog().await.unwrap(), Some(0));
    admin.cleanup().await.unwrap();
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_message_id_stays_empty() {
    // A message published with an empty id must not get the client's UNIQ_KEY as its id: it
    // has no usable key and is dead-lettered, not run.
    let Some(url) = url() else { return };
    let t = topic("empty_id");
    let mut source = RocketMqSource::connect(&url, config(&t)).await.unwrap();
    let producer = RocketMqProducer::connect(&url).await.unwrap();
    producer
        .publish(&t, &Outgoing::with_id("", &b"x"[..]))
        .await
        .unwrap();
    let [d] = <[_; 1]>::try_from(receive_n(&mut source, 1, 30).await).unwrap();
    assert_eq!(d.message.message_id(), Some(""), "{:?}", d.message);
    source.acker().ack(vec![d.delivery]).await.unwrap();
    source.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_calls_past_the_default_blocking_pool_are_all_handed_over() {
    // Trap: on 2 cores the client's default blocking pool runs 4 listener calls and queues 16,
    // below the consumer's default 20 consume threads; the calls that do not fit are sent back
    // without running. The adapter sizes the pool from `consume_threads`: 24 one-message calls
    // held at once all reach `receive`, none is sent back (every delivery count is 1).
    let Some(url) = url() else { return };
    let t = topic("pool");
    let mut cfg = config(&t).consume_threads(24);
    cfg.batch = 1;
    let mut source = RocketMqSource::connect(&url, cfg).await.unwrap();
    let acker = source.acker();
    let producer = RocketMqProducer::connect(&url).await.unwrap();
    for m in numbered(24) {
        producer.publish(&t, &m).await.unwrap();
    }
    let held = receive_n(&mut source, 24, 60).await;
    let mut ids: Vec<_> = held
        .iter()
        .map(|d| d.message.message_id().unwrap().to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 24, "{ids:?}");
    assert!(held.iter().all(|d| d.message.delivery_count() == 1));
    acker
        .ack(held.into_iter().map(|d| d.delivery).collect())
        .await
        .unwrap();
    // Nothing comes back.
    let again = tokio::time::timeout(Duration::from_secs(3), source.receive(10)).await;
    assert!(again.is_err(), "redelivered: {again:?}");
    source.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_installs_no_global_tracing_subscriber() {
    // Trap: the client's default telemetry installs a global subscriber; a library must not.
    let Some(url) = url() else { return };
    let t = topic("tracing");
    let source = RocketMqSource::connect(&url, config(&t)).await.unwrap();
    let producer = RocketMqProducer::connect(&url).await.unwrap();
    producer
        .publish(&t, &Outgoing::new(&b"x"[..]))
        .await
        .unwrap();
    assert!(
        !tracing::dispatcher::has_been_set(),
        "a global tracing subscriber was installed"
    );
    source.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_read_back_with_reasons_and_republished_with_the_same_id() {
    // idem's dead letters go to <group>_IDEM_DLQ with the reason; the admin reads them and
    // republishes them to the topic with the same message ids (the consumer's store recognises
    // them), and the next admin does not see them again.
    let Some(url) = url() else { return };
    let t = topic("redrive");
    let mut source = RocketMqSource::connect(&url, config(&t)).await.unwrap();
    let acker = source.acker();
    let producer = RocketMqProducer::connect(&url).await.unwrap();
    for m in numbered(3) {
        producer.publish(&t, &m).await.unwrap();
    }
    for d in receive_n(&mut source, 3, 30).await {
        let message = d.message.clone();
        let reason = format!("bad {}", message.message_id().unwrap());
        acker
            .dead_letter(d.delivery, &message, &reason)
            .await
            .unwrap();
    }
    let admin = RocketMqAdmin::connect(&url, config(&t)).await.unwrap();
    let mut dead = admin.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 3, "{dead:?}");
    dead.sort_by(|a, b| a.message().message_id().cmp(&b.message().message_id()));
    for (i, d) in dead.iter().enumerate() {
        assert_eq!(d.message().message_id(), Some(format!("m-{i}").as_str()));
        assert_eq!(d.reason(), Some(format!("bad m-{i}").as_str()));
        assert_eq!(d.message().origin(), t);
        assert_eq!(&d.message().payload()[..], i.to_string().as_bytes());
    }
    for d in dead {
        admin.republish(d).await.unwrap();
    }
    let mut back = receive_n(&mut source, 3, 30).await;
    back.sort_by(|a, b| a.message.message_id().cmp(&b.message.message_id()));
    for (i, d) in back.iter().enumerate() {
        assert_eq!(d.message.message_id(), Some(format!("m-{i}").as_str()));
        assert_eq!(&d.message.payload()[..], i.to_string().as_bytes());
    }
    acker
        .ack(back.into_iter().map(|d| d.delivery).collect())
        .await
        .unwrap();
    admin.close().await;
    source.close().await;
    // Republished: a new admin does not see them again.
    let admin = RocketMqAdmin::connect(&url, config(&t)).await.unwrap();
    let left = admin.dead_letters(10).await.unwrap();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(admin.backlog().await.unwrap(), Some(0));
    admin.cleanup().await.unwrap();
    admin.close().await;
}

/// A log file in `dir`, appended to.
fn log(dir: &std::path::Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .unwrap()
}

/// A private name server and broker (store in `dir`), on free ports.
struct Private {
    namesrv: ServerProcess,
    broker: Option<ServerProcess>,
    bin: String,
    home: std::path::PathBuf,
    ns_port: u16,
    broker_port: u16,
}

impl Private {
    fn start(dir: &std::path::Path) -> Option<Self> {
        let bin = std::env::var("IDEM_ROCKETMQ_BIN").ok().or_else(|| {
            let shared = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/bin/rocketmq");
            std::path::Path::new(shared)
                .join("rocketmq-broker-rust")
                .exists()
                .then(|| shared.to_owned())
        });
        let Some(bin) = bin else {
            return idem_testkit::missing("no RocketMQ binaries (set IDEM_ROCKETMQ_BIN)");
        };
        let ns_port = free_port();
        let broker_port = loop {
            let p = free_port();
            if p > 2
                && std::net::TcpListener::bind(("127.0.0.1", p - 2)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok()
            {
                break p;
            }
        };
        std::fs::create_dir_all(dir.join("conf")).unwrap();
        let store = dir.join("store");
        std::fs::write(
            dir.join("conf/broker.toml"),
            format!(
                "[broker]\nnamesrvAddr = \"127.0.0.1:{ns_port}\"\nbrokerIp1 = \"127.0.0.1\"\n\
                 listenPort = {broker_port}\nstorePathRootDir = \"{s}\"\n\n\
                 [broker.brokerServerConfig]\nbindAddress = \"127.0.0.1\"\n\n\
                 [broker.brokerIdentity]\nbrokerName = \"broker-p\"\n\
                 brokerClusterName = \"DefaultCluster\"\nbrokerId = 0\n\n\
                 [store]\nstoreType = \"LocalFile\"\nbrokerRole = \"ASYNC_MASTER\"\n\
                 storePathRootDir = \"{s}\"\nhaListenAddress = \"127.0.0.1\"\n\
                 haListenPort = {ha}\nmessageDelayLevel = \"{levels}\"\n\
                 mappedFileSizeCommitLog = 67108864\nmappedFileSizeConsumeQueue = 120000\n\
                 maxIndexNum = 400000\nmaxHashSlotNum = 100000\n",
                s = store.display(),
                ha = broker_port + 1,
                levels = ["1s"; 18].join(" "),
            ),
        )
        .unwrap();
        let home = dir.to_path_buf();
        let mut cmd = std::process::Command::new(format!("{bin}/rocketmq-namesrv-rust"));
        cmd.args([
            "--rocketmqHome",
            &home.display().to_string(),
            "--bindAddress",
            "127.0.0.1",
            "--listenPort",
            &ns_port.to_string(),
            "--kvConfigPath",
            &home.join("kv.json").display().to_string(),
        ])
        .env("ROCKETMQ_HOME", &home)
        .env("ROCKETMQ_SECURITY_PROFILE", "development-insecure-loopback")
        .stdin(std::process::Stdio::null())
        .stdout(log(&home, "namesrv.log"))
        .stderr(std::process::Stdio::null());
        let namesrv = ServerProcess::spawn(&mut cmd, ns_port);
        let mut p = Self {
            namesrv,
            broker: None,
            bin,
            home,
            ns_port,
            broker_port,
        };
        p.start_broker();
        Some(p)
    }

    fn start_broker(&mut self) {
        let mut cmd = std::process::Command::new(format!("{}/rocketmq-broker-rust", self.bin));
        cmd.args([
            "-c",
            &self.home.join("conf/broker.toml").display().to_string(),
            "-n",
            &format!("127.0.0.1:{}", self.ns_port),
        ])
        .env("ROCKETMQ_HOME", &self.home)
        .env("ROCKETMQ_SECURITY_PROFILE", "development-insecure-loopback")
        .stdin(std::process::Stdio::null())
        .stdout(log(&self.home, "broker.log"))
        .stderr(std::process::Stdio::null());
        self.broker = Some(ServerProcess::spawn(&mut cmd, self.broker_port));
    }

    fn url(&self) -> String {
        format!("rocketmq://127.0.0.1:{}", self.ns_port)
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        if let Some(b) = self.broker.as_mut() {
            b.kill();
        }
        self.namesrv.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_mid_stream_and_restarted_loses_nothing() {
    // A private broker is SIGKILLed while a consumer works through 200 messages, and restarted
    // on the same store. The client reconnects; deliveries whose offsets were not persisted
    // come again and are replayed; every message is applied once and nothing is left.
    if url().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(mut private) = Private::start(dir.path()) else {
        return;
    };
    let url = private.url();
    let t = topic("restart");
    // The broker registers with the name server a moment after its port opens: until then
    // creating a topic is refused ("Argument is invalid").
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let source = loop {
        match RocketMqSource::connect(&url, config(&t)).await {
            Ok(source) => break source,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("the private broker is not ready yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("the private broker never got ready: {e}"),
        }
    };
    let producer = RocketMqProducer::connect(&url).await.unwrap();
    let msgs = numbered(200);
    for m in &msgs {
        producer.publish(&t, m).await.unwrap();
    }
    let ledger = Ledger::default();
    let (stats, running, _store) = common::start_slow(source, &ledger, 20);
    until(60, "some progress", || stats.snapshot().acked >= 40).await;
    if let Some(b) = private.broker.as_mut() {
        b.kill();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    private.start_broker();
    until(120, "all applied", || ledger.len() == 200).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let snap = running.stop().await;
    ledger.assert_exactly_once(msgs.iter().map(Outgoing::id));
    let admin = RocketMqAdmin::connect(&url, config(&t)).await.unwrap();
    assert_eq!(admin.backlog().await.unwrap(), Some(0), "{snap:?}");
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "holds a listener call for 40 s: run with --ignored"]
async fn a_handler_past_the_pool_task_timeout_is_not_redelivered_meanwhile() {
    // Trap: the client's blocking pool times a listener call out after 30 s and redelivers its
    // messages while the handler still runs. The adapter raises the timeout to max_handling.
    let Some(url) = url() else { return };
    let t = topic("long");
    let mut source = RocketMqSource::connect(&url, config(&t)).await.unwrap();
    let acker = source.acker();
    let producer = RocketMqProducer::connect(&url).await.unwrap();
    producer
        .publish(&t, &Outgoing::with_id("long", &b"x"[..]))
        .await
        .unwrap();
    let first = receive_n(&mut source, 1, 30).await;
    let again = tokio::time::timeout(Duration::from_secs(40), source.receive(1)).await;
    assert!(again.is_err(), "redelivered while held: {again:?}");
    acker
        .ack(first.into_iter().map(|d| d.delivery).collect())
        .await
        .unwrap();
    source.close().await;
}

/// Publishes `n` 128-byte messages to a fresh topic; returns the topic.
async fn filled_topic(url: &str, n: usize, mode: &str) -> String {
    let t = topic(&format!("bench_{mode}"));
    // Declares the topic and the group (the group starts at the topic's beginning).
    RocketMqSource::connect(url, config(&t))
        .await
        .unwrap()
        .close()
        .await;
    let producer = RocketMqProducer::connect(url).await.unwrap();
    let payload = vec![b'x'; 128];
    for i in 0..n {
        producer
            .publish(&t, &Outgoing::with_id(format!("b-{i}"), payload.clone()))
            .await
            .unwrap();
    }
    t
}

/// The raw client: a push consumer (16 consume threads, 32 messages per listener call) whose
/// listener counts and returns `ConsumeSuccess`. Messages/s from the first message on.
async fn raw_rate(url: &str, n: usize) -> f64 {
    use rocketmq_client_rust::{
        ClientResult, ClientRuntime, ClientRuntimeConfig, ConsumeConcurrentlyContext,
        ConsumeConcurrentlyStatus, DefaultMQPushConsumer, MQPushConsumer,
        MessageListenerConcurrently,
    };
    use rocketmq_model::common::message::message_ext::MessageExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    struct Count(Arc<AtomicUsize>);
    impl MessageListenerConcurrently for Count {
        fn consume_message(
            &self,
            msgs: &[&MessageExt],
            _: &ConsumeConcurrentlyContext,
        ) -> ClientResult<ConsumeConcurrentlyStatus> {
            self.0.fetch_add(msgs.len(), Ordering::SeqCst);
            Ok(ConsumeConcurrentlyStatus::ConsumeSuccess)
        }
    }
    let t = filled_topic(url, n, "raw").await;
    let mut rc = rocketmq_runtime::RuntimeConfig::for_parallelism("bench", 2)
        .with_max_blocking_threads(24)
        .unwrap();
    rc.blocking_lane_policies.metadata_io.max_concurrency = 24;
    rc.blocking_lane_policies.metadata_io.max_queue_depth = 512;
    let owner = rocketmq_runtime::RuntimeOwner::plan(rc)
        .unwrap()
        .build()
        .unwrap();
    let telemetry = rocketmq_observability::TelemetryRuntimeGuard::noop();
    let client = ClientRuntime::try_new(
        owner.root_context().component("bench"),
        ClientRuntimeConfig::default(),
        telemetry.handle(),
    )
    .unwrap();
    let handle = std::thread::scope(|s| {
        s.spawn(|| owner.block_on(async { tokio::runtime::Handle::current() }))
            .join()
            .unwrap()
    });
    let count = Arc::new(AtomicUsize::new(0));
    let (c, namesrv, group) = (
        Arc::clone(&count),
        url.trim_start_matches("rocketmq://").to_owned(),
        format!("g_{t}"),
    );
    let mut consumer = handle
        .spawn(async move {
            let mut consumer = DefaultMQPushConsumer::builder(client)
                .name_server_addr(namesrv)
                .consumer_group(group)
                .consume_thread_min(16)
                .consume_thread_max(16)
                .consume_message_batch_max_size(32)
                .pull_batch_size(32)
                .build();
            consumer.subscribe(t, "*").await.unwrap();
            consumer.register_message_listener_concurrently(Count(c));
            consumer.start().await.unwrap();
            consumer
        })
        .await
        .unwrap();
    // Timed from the first message: consumer start-up and rebalancing are not consumption.
    until(60, "the first message", || count.load(Ordering::SeqCst) > 0).await;
    let started = Instant::now();
    let first = count.load(Ordering::SeqCst);
    until(300, "every message counted", || {
        count.load(Ordering::SeqCst) >= n
    })
    .await;
    let rate = (n - first) as f64 / started.elapsed().as_secs_f64();
    handle
        .spawn(async move { consumer.shutdown().await })
        .await
        .unwrap();
    let _ = owner.shutdown_background();
    rate
}

/// idem over SQLite or Redis through the adapter, `batch` messages per listener call:
/// messages/s from the first message on.
async fn idem_rate(url: &str, n: usize, store: &str, batch: u32, threads: u32) -> f64 {
    let t = filled_topic(url, n, store).await;
    let mut cfg = config(&t).consume_threads(threads);
    cfg.batch = batch;
    let source = RocketMqSource::connect(url, cfg).await.unwrap();
    let ledger = Ledger::default();
    let (stats, running, _dir) = if store == "sqlite" {
        let (s, dir) = sqlite_store();
        let c = Consumer::new(source, Executor::new(s), ns(), ledger.handler())
            .batch_size(256)
            .concurrency(4);
        let (stats, running) = start(c);
        (stats, running, Some(dir))
    } else {
        let redis = server::url(server::REDIS).unwrap();
        let s = idem_redis::RedisStore::connect(&redis).await.unwrap();
        let c = Consumer::new(source, Executor::new(s), ns(), ledger.handler())
            .batch_size(256)
            .concurrency(4);
        let (stats, running) = start(c);
        (stats, running, None)
    };
    let n64 = n as u64;
    until(60, "the first message", || stats.snapshot().received > 0).await;
    let started = Instant::now();
    let first = stats.snapshot().acked;
    until(300, "every message acked", || stats.snapshot().acked >= n64).await;
    let rate = (n64 - first) as f64 / started.elapsed().as_secs_f64();
    running.stop().await;
    rate
}

/// The idem runs of the benchmark: name, store, messages per listener call, consume threads.
const MODES: [(&str, &str, u32, u32); 6] = [
    ("sqlite/1x64", "sqlite", 1, 64),
    ("redis/1x64", "redis", 1, 64),
    ("sqlite/1x256", "sqlite", 1, 256),
    ("redis/1x256", "redis", 1, 256),
    ("sqlite/32x64", "sqlite", 32, 64),
    ("redis/32x64", "redis", 32, 64),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --ignored --nocapture"]
async fn bench_consume_idem_vs_raw_push_consumer() {
    let Some(url) = url() else { return };
    let n: usize = std::env::var("IDEM_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mut rates: HashMap<&str, Vec<f64>> = HashMap::new();
    for _ in 0..3 {
        rates
            .entry("raw")
            .or_default()
            .push(raw_rate(&url, n).await);
        for (name, store, batch, threads) in MODES {
            let r = idem_rate(&url, n, store, batch, threads).await;
            rates.entry(name).or_default().push(r);
        }
    }
    let median = |v: &Vec<f64>| {
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let raw = median(&rates["raw"]);
    let names = std::iter::once("raw").chain(MODES.iter().map(|m| m.0));
    for mode in names {
        let m = median(&rates[mode]);
        println!(
            "rocketmq consume {mode:>12}: {m:>8.0} msg/s (runs {:?}), {:.2}x raw",
            rates[mode].iter().map(|r| r.round()).collect::<Vec<_>>(),
            m / raw
        );
    }
}
