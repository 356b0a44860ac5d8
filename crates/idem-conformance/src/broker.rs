//! The adapter suite: what every broker adapter (a [`Source`] and its [`Acker`]) must do against
//! its real broker (docs/design.md, section 6), stamped per broker with
//! [`adapter_tests!`](crate::adapter_tests) so that a failure names the broker and the check.
//!
//! Each check is a plain `pub async fn check(h: &impl BrokerHarness)` that runs one scenario
//! in destinations of its own and panics with the rule it found broken: producer retries
//! applied once, poison dead-lettered with its reason, failed handlers retried and then
//! dead-lettered, delayed redelivery (of a nack, and of an in-progress duplicate), acks that
//! settle exactly the deliveries given, progress reports for slow handlers, a consumer killed
//! mid-batch, connections cut under a running consumer, shutdown within and past its grace, and
//! receives dropped mid-way. Checks use the [`MemoryStore`]: the broker is under test here, not
//! the store.
//!
//! ```ignore
//! // tests/my_broker.rs of an adapter crate
//! #[derive(Clone)]
//! struct MyHarness { url: String }
//! impl idem_conformance::broker::BrokerHarness for MyHarness { /* ... */ }
//!
//! async fn harness() -> Option<MyHarness> {
//!     let url = idem_conformance::server::url(("MY_BROKER_URL", "my://127.0.0.1:1234"))?;
//!     Some(MyHarness { url })
//! }
//!
//! mod adapter {
//!     idem_conformance::adapter_tests!(super::harness);
//! }
//! ```
//!
//! The calling crate needs `tokio` (with `macros` and `rt-multi-thread`) as a dev-dependency.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use idem::{Attempt, Backoff, Config, Executor, MemoryStore, Namespace};
use idem_broker::{
    Acker, BrokerError, Consumer, Incoming, KeyExtractor, KeyFrom, Message, Outgoing, Processor,
    Source, Stats, StatsSnapshot,
};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::proxy::Proxy;

/// What the adapter suite needs from a broker: destinations, sources, a producer, and a look at
/// what the broker holds. Cheap to clone (a URL and a configuration); clones share everything.
pub trait BrokerHarness: Clone + Send + Sync + 'static {
    /// The adapter's source.
    type Source: Source;

    /// A destination no other check or run uses, named after `check` (a queue; a stream, its
    /// subjects and its consumer; a topic and its client id). The suite connects a source to
    /// it before it publishes anything, so that a [`connect`](BrokerHarness::connect) that
    /// declares the destination (and its consumer group or session) comes first.
    fn destination(&self, check: &str) -> String;

    /// The broker's TCP address: the suite's [`Proxy`] forwards to it.
    fn address(&self) -> SocketAddr;

    /// A source consuming `destination`, connected to the broker directly, or with `through`
    /// to that address instead (the suite's [`Proxy`], which cuts its connections), declaring
    /// the destination where the adapter does. Each call is another consumer of the
    /// destination where the broker tells consumers apart (a Redis Streams consumer name);
    /// where a source *is* the destination's consumer (an MQTT session), the suite never runs
    /// two at once.
    ///
    /// The suite closes every source it connects; the future it returns must be `Send` (a
    /// check connects a source on a runtime of its own and kills that runtime).
    fn connect(
        &self,
        destination: &str,
        through: Option<SocketAddr>,
    ) -> impl Future<Output = Self::Source> + Send;

    /// Publishes `message` to `destination` with the adapter's producer, waiting for the
    /// broker's confirmation. Returns whether the broker kept this copy: `false` when its own
    /// publish dedup dropped it as a duplicate (JetStream's `Nats-Msg-Id` window).
    fn publish(&self, destination: &str, message: &Outgoing) -> impl Future<Output = bool> + Send;

    /// What the dead-letter destination of `destination` holds, oldest first (it may be
    /// consumed by reading it; the suite reads it once per check).
    fn dead_letters(&self, destination: &str) -> impl Future<Output = Vec<DeadLetter>> + Send;

    /// How many messages the broker still holds for `destination`'s consumers: delivered and
    /// not acked, or not delivered yet. Called only while no source of the destination is
    /// connected (an MQTT harness reads it by resuming the session); it must count what a
    /// source closed a moment ago handed back.
    fn backlog(&self, destination: &str) -> impl Future<Output = u64> + Send;

    /// How long the broker lets a delivery go unacked before it hands it to a consumer again,
    /// if it does: these brokers need progress reports while a handler runs (JetStream's ack
    /// wait, a Redis Streams claim idle time). `None` when a delivery stays with its consumer
    /// until it is settled or the connection ends (RabbitMQ, an MQTT session).
    fn redelivery_timeout(&self) -> Option<Duration>;

    /// Deletes `destination` and its dead-letter destination (queues, exchanges, streams,
    /// sessions). Called at the end of every check, passed or failed, on a runtime of its own
    /// (so it must not use connections made on the check's runtime).
    fn cleanup(&self, destination: &str) -> impl Future<Output = ()> + Send;
}

/// A dead-lettered message as the dead-letter destination holds it, with why.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The message: its payload, the producer's message id (where the adapter keeps it) and
    /// headers.
    pub message: Message,
    /// The reason idem gave (the `idem-dead-letter-reason` header, property or field).
    pub reason: String,
}

/// What an adapter suite setup function may return: a harness, or `None` when its server is
/// missing outside CI (see [`crate::server::url`]), which skips the check.
pub trait IntoBrokerHarness {
    /// The harness.
    type Harness: BrokerHarness;
    /// The harness, if there is one.
    fn into_broker_harness(self) -> Option<Self::Harness>;
}

impl<H: BrokerHarness> IntoBrokerHarness for H {
    type Harness = H;
    fn into_broker_harness(self) -> Option<H> {
        Some(self)
    }
}

impl<H: BrokerHarness> IntoBrokerHarness for Option<H> {
    type Harness = H;
    fn into_broker_harness(self) -> Option<H> {
        self
    }
}

/// Stamps out one `#[tokio::test]` per adapter check, calling `$setup().await` for a
/// [`BrokerHarness`](crate::broker::BrokerHarness) (or an `Option` of one: `None` skips, see
/// [`server::url`](crate::server::url)). Put it in a module named after the broker, or in the
/// broker's own test file, so that the test's path names broker and check.
///
/// The calling crate needs `tokio` (with `macros` and `rt-multi-thread`) as a dev-dependency.
#[macro_export]
macro_rules! adapter_tests {
    ($setup:path) => {
        $crate::adapter_tests!(
            $setup;
            producer_retries_are_applied_once,
            poison_messages_are_dead_lettered_with_the_reason,
            failed_handlers_are_retried_then_dead_lettered,
            nacks_are_redelivered_after_the_delay_with_a_count,
            acks_settle_exactly_the_deliveries_given,
            in_progress_duplicates_are_redelivered_later_never_acked,
            progress_keeps_a_slow_handler_from_being_redelivered,
            consumer_killed_mid_batch_is_redelivered_and_applied_once,
            dropped_connections_reconnect_and_lose_nothing,
            shutdown_finishes_in_flight_work_and_acks_it,
            shutdown_past_the_grace_hands_stuck_work_back,
            dropped_receives_lose_nothing
        );
    };
    ($setup:path; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let Some(harness) =
                    $crate::broker::IntoBrokerHarness::into_broker_harness($setup().await)
                else {
                    return;
                };
                $crate::broker::$check(&harness).await;
            }
        )+
    };
}

// ---------------------------------------------------------------------------------------------
// Helpers, public for adapter-specific tests too.

/// Counts how many times each message id's effect was applied.
#[derive(Clone, Debug, Default)]
pub struct Ledger(Arc<parking_lot::Mutex<HashMap<String, u32>>>);

impl Ledger {
    /// Applies `m`'s effect: one more for its message id (`<none>` without one).
    pub fn apply(&self, m: &Message) {
        let id = m.message_id().unwrap_or("<none>").to_owned();
        *self.0.lock().entry(id).or_default() += 1;
    }

    /// How many times the effect of `id` was applied.
    pub fn count(&self, id: &str) -> u32 {
        self.0.lock().get(id).copied().unwrap_or(0)
    }

    /// How many message ids had their effect applied.
    pub fn len(&self) -> usize {
        self.0.lock().len()
    }

    /// Whether no effect was applied.
    pub fn is_empty(&self) -> bool {
        self.0.lock().is_empty()
    }

    /// Effects applied, all ids together.
    pub fn total(&self) -> u32 {
        self.0.lock().values().sum()
    }

    /// Asserts that the effect of every id in `ids` was applied exactly once, and nothing else.
    ///
    /// # Panics
    /// When one was not, or was more than once, or another was.
    pub fn assert_exactly_once<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let map = self.0.lock();
        let mut n = 0;
        for id in ids {
            n += 1;
            assert_eq!(map.get(id).copied(), Some(1), "effect of {id}: {map:?}");
        }
        assert_eq!(map.len(), n, "unexpected effects: {map:?}");
    }

    /// A store-mode handler that applies the effect.
    pub fn handler(
        &self,
    ) -> impl Fn(Message, Attempt) -> std::future::Ready<Result<(), std::io::Error>>
    + Send
    + Sync
    + 'static {
        let ledger = self.clone();
        move |m: Message, _: Attempt| {
            ledger.apply(&m);
            std::future::ready(Ok(()))
        }
    }

    /// A store-mode handler that takes `delay` and then applies the effect.
    pub fn slow_handler(
        &self,
        delay: Duration,
    ) -> impl Fn(
        Message,
        Attempt,
    ) -> futures_util::future::BoxFuture<'static, Result<(), std::io::Error>>
    + Send
    + Sync
    + 'static {
        let ledger = self.clone();
        move |m: Message, _: Attempt| {
            let ledger = ledger.clone();
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                ledger.apply(&m);
                Ok(())
            })
        }
    }
}

/// A consumer running on a task, stopped by [`Running::stop`].
#[derive(Debug)]
pub struct Running {
    stop: oneshot::Sender<()>,
    handle: JoinHandle<Result<StatsSnapshot, BrokerError>>,
}

/// Spawns `consumer.run` with a shutdown the test triggers with [`Running::stop`]; returns its
/// counters too.
pub fn start<Src, P>(consumer: Consumer<Src, P>) -> (Arc<Stats>, Running)
where
    Src: Source,
    P: Processor,
{
    let stats = consumer.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(consumer.run(async {
        let _ = stopped.await;
    }));
    (stats, Running { stop, handle })
}

impl Running {
    /// Shuts the consumer down gracefully and returns its counters.
    ///
    /// # Panics
    /// When the consumer failed or panicked.
    pub async fn stop(self) -> StatsSnapshot {
        let _ = self.stop.send(());
        match self.handle.await {
            Ok(Ok(snap)) => snap,
            Ok(Err(e)) => panic!("the consumer failed: {e}"),
            Err(e) => panic!("the consumer panicked: {e}"),
        }
    }

    /// Waits up to `secs` for the consumer to stop by itself; returns its result.
    ///
    /// # Panics
    /// When it does not stop in time, or panicked.
    pub async fn ended_within(self, secs: u64) -> Result<StatsSnapshot, BrokerError> {
        let Running { stop, handle } = self;
        let out = match tokio::time::timeout(Duration::from_secs(secs), handle).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => panic!("the consumer panicked: {e}"),
            Err(_) => panic!("the consumer did not stop by itself within {secs} s"),
        };
        drop(stop);
        out
    }
}

/// Messages `m-0` .. `m-{n-1}`, with those ids and their number as the payload.
pub fn numbered(n: usize) -> Vec<Outgoing> {
    (0..n)
        .map(|i| Outgoing::with_id(format!("m-{i}"), i.to_string().into_bytes()))
        .collect()
}

/// Polls `cond` every 20 ms until it holds; panics after `secs`, naming `what`.
async fn until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long a consumer's counters must stay still to count as settled: longer than any
/// delayed nack it may hold (the checks' leases are at most 2 s).
const QUIET: Duration = Duration::from_secs(3);

/// Waits until the consumer's counters stay still for longer than any redelivery it may still
/// get: a delayed nack, or the broker's redelivery of an unacked delivery.
async fn settled<H: BrokerHarness>(h: &H, stats: &Stats) {
    let quiet = h.redelivery_timeout().map_or(QUIET, |t| QUIET.max(t * 2));
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let before = stats.snapshot();
        tokio::time::sleep(quiet).await;
        let now = stats.snapshot();
        if now == before {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer never settled: {now:?}"
        );
    }
}

/// A fresh destination, declared (a source connected and closed) before anything is published.
async fn fresh<H: BrokerHarness>(h: &H, check: &str) -> Destination<H> {
    let dest = Destination {
        harness: h.clone(),
        name: h.destination(check),
    };
    h.connect(&dest, None).await.close().await;
    dest
}

/// A check's destination, cleaned up ([`BrokerHarness::cleanup`]) when dropped: at the end of
/// the check, whether it passed or panicked.
struct Destination<H: BrokerHarness> {
    harness: H,
    name: String,
}

impl<H: BrokerHarness> std::ops::Deref for Destination<H> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl<H: BrokerHarness> Drop for Destination<H> {
    fn drop(&mut self) {
        // On a thread with a runtime of its own: a drop cannot wait for the check's runtime.
        // Best effort: a cleanup that fails leaves names no other run uses.
        let (harness, name) = (self.harness.clone(), std::mem::take(&mut self.name));
        let cleaned = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(harness.cleanup(&name));
            Some(())
        })
        .join();
        if !matches!(cleaned, Ok(Some(()))) {
            eprintln!("the cleanup of a destination failed");
        }
    }
}

async fn publish_all<H: BrokerHarness>(h: &H, dest: &str, msgs: &[Outgoing]) {
    for m in msgs {
        assert!(
            h.publish(dest, m).await,
            "the broker dropped {} as a duplicate",
            m.id()
        );
    }
}

async fn assert_backlog<H: BrokerHarness>(h: &H, dest: &str, expected: u64, what: &str) {
    let left = h.backlog(dest).await;
    assert_eq!(left, expected, "messages left at the broker ({what})");
}

/// Receives until `n` deliveries came (a source may return empty batches).
///
/// # Panics
/// After 30 s, or on an error retrying cannot fix.
async fn receive_at_least<S: Source>(
    source: &mut S,
    n: usize,
    what: &str,
) -> Vec<Incoming<S::Delivery>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, source.receive(n - got.len())).await {
            Ok(Ok(batch)) => got.extend(batch),
            Ok(Err(e)) if e.is_transient() => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(Err(e)) => panic!("receiving {what}: {e}"),
            Err(_) => panic!("timed out waiting for {what}: {} of {n}", got.len()),
        }
    }
    got
}

fn ids<D>(deliveries: &[Incoming<D>]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| d.message.message_id().unwrap_or("<none>").to_owned())
        .collect()
}

/// The header the checks that need two messages with one key (and two message ids) key by.
const ORDER_ID: &str = "order-id";

fn ns() -> Namespace {
    crate::unique_namespace()
}

fn exec(store: &MemoryStore, config: Config) -> Executor<MemoryStore> {
    Executor::with_config(store.clone(), config)
}

// ---------------------------------------------------------------------------------------------
// The checks.

/// A producer that lost its confirms publishes every message three times (same id): each
/// effect happens once, and every copy the broker kept is acked (a copy in the same batch
/// replays the first copy's record; one in a concurrent batch comes back and replays). Brokers
/// with publish dedup drop some copies themselves.
pub async fn producer_retries_are_applied_once<H: BrokerHarness>(h: &H) {
    let dest = fresh(h, "retries").await;
    let msgs: Vec<Outgoing> = (0..50)
        .map(|i| Outgoing::new(format!("{{\"n\": {i}}}").into_bytes()))
        .collect();
    let mut copies = 0u64;
    for _ in 0..3 {
        for m in &msgs {
            copies += u64::from(h.publish(&dest, m).await);
        }
    }
    assert!(copies >= 50, "the broker kept {copies} of 150 copies");
    let ledger = Ledger::default();
    let consumer = Consumer::new(
        h.connect(&dest, None).await,
        exec(&MemoryStore::new(), Config::default()),
        ns(),
        ledger.handler(),
    )
    .batch_size(16);
    let (stats, running) = start(consumer);
    until(60, "every copy acked", || stats.snapshot().acked == copies).await;
    settled(h, &stats).await;
    let snap = running.stop().await;
    ledger.assert_exactly_once(msgs.iter().map(Outgoing::id));
    assert_eq!(
        (snap.executed, snap.replayed, snap.acked),
        (50, copies - 50, copies),
        "{snap:?}"
    );
    assert_backlog(h, &dest, 0, "every copy acked").await;
}

/// Messages that cannot be processed go to the dead-letter destination with the reason, and
/// are acked (not redelivered): one without a usable key (an empty message id), and one whose
/// key (here an `order-id` header, so that no publish dedup drops it) was first seen with
/// another payload (a mismatch). The good ones are applied once.
///
/// One batch at a time: batches in flight together claim in no set order, so with more than
/// one the second payload could be the one first seen (the runtime orders one key's messages
/// within a batch, not across concurrent batches).
pub async fn poison_messages_are_dead_lettered_with_the_reason<H: BrokerHarness>(h: &H) {
    let dest = fresh(h, "poison").await;
    let no_key = Outgoing::with_id("", &b"no key"[..]);
    let good = Outgoing::with_id("good", &b"fine"[..]);
    let first = Outgoing::with_id("first", &b"first payload"[..]).with_header(ORDER_ID, "o-7");
    let second = Outgoing::with_id("second", &b"second payload"[..]).with_header(ORDER_ID, "o-7");
    let source = h.connect(&dest, None).await;
    publish_all(h, &dest, &[no_key, good, first, second]).await;
    let ledger = Ledger::default();
    // The key: the `order-id` header where there is one, else the message id.
    let key = |ns: &Namespace, m: &Message| match m.header(ORDER_ID) {
        Some(_) => KeyFrom::Header(ORDER_ID.to_owned()).key(ns, m),
        None => KeyFrom::MessageId.key(ns, m),
    };
    let consumer = Consumer::new(
        source,
        exec(&MemoryStore::new(), Config::default()),
        ns(),
        ledger.handler(),
    )
    .key(key)
    .concurrency(1);
    let (stats, running) = start(consumer);
    until(60, "every message settled", || {
        let s = stats.snapshot();
        s.acked == 2 && s.dead_lettered == 2
    })
    .await;
    settled(h, &stats).await;
    let snap = running.stop().await;
    ledger.assert_exactly_once(["good", "first"]);
    assert_eq!((snap.acked, snap.dead_lettered), (2, 2), "{snap:?}");
    let dead = h.dead_letters(&dest).await;
    assert_eq!(dead.len(), 2, "dead letters: {dead:?}");
    let find = |payload: &[u8]| {
        dead.iter()
            .find(|d| &d.message.payload()[..] == payload)
            .unwrap_or_else(|| panic!("no dead letter of {payload:?}: {dead:?}"))
    };
    let d = find(b"no key");
    assert!(d.reason.contains("no usable key"), "reason: {}", d.reason);
    let d = find(b"second payload");
    assert!(
        d.reason.contains("payload mismatch"),
        "reason: {}",
        d.reason
    );
    assert_eq!(d.message.message_id(), Some("second"), "{d:?}");
    assert_backlog(h, &dest, 0, "poison acked once dead-lettered").await;
}

/// A handler that fails is retried through the broker (its claim released, the delivery
/// nacked with the executor's backoff and delivered again); when the last attempt fails, the
/// message is dead-lettered with the handler's error as the reason, and acked.
pub async fn failed_handlers_are_retried_then_dead_lettered<H: BrokerHarness>(h: &H) {
    let dest = fresh(h, "failing").await;
    let source = h.connect(&dest, None).await;
    publish_all(
        h,
        &dest,
        &[
            Outgoing::with_id("flaky", &b"flaky"[..]),
            Outgoing::with_id("poison", &b"poison"[..]),
        ],
    )
    .await;
    let runs: Arc<parking_lot::Mutex<HashMap<String, u32>>> = Arc::default();
    let r = Arc::clone(&runs);
    let config = Config::default()
        .retry_backoff(Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(100),
        ))
        .max_attempts(3);
    let (stats, running) = start(Consumer::new(
        source,
        exec(&MemoryStore::new(), config),
        ns(),
        move |m: Message, attempt: Attempt| {
            let id = m.message_id().unwrap_or("<none>").to_owned();
            *r.lock().entry(id.clone()).or_default() += 1;
            std::future::ready(match id.as_str() {
                "flaky" if attempt.number() < 2 => Err("a flaky failure".to_owned()),
                "poison" => Err("always fails".to_owned()),
                _ => Ok(()),
            })
        },
    ));
    until(60, "one acked, one dead-lettered", || {
        let s = stats.snapshot();
        s.acked == 1 && s.dead_lettered == 1
    })
    .await;
    settled(h, &stats).await;
    let snap = running.stop().await;
    let runs = runs.lock().clone();
    assert_eq!(runs.get("flaky"), Some(&2), "{runs:?}");
    assert_eq!(runs.get("poison"), Some(&3), "{runs:?}");
    assert!(snap.retried >= 3, "{snap:?}");
    let dead = h.dead_letters(&dest).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].message.message_id(), Some("poison"), "{dead:?}");
    assert_eq!(&dead[0].message.payload()[..], b"poison");
    let reason = &dead[0].reason;
    assert!(
        reason.contains("attempt 3 of 3") && reason.contains("always fails"),
        "reason: {reason}"
    );
    assert_backlog(h, &dest, 0, "both settled").await;
}

/// A delivery nacked with a delay comes back no earlier than the delay, with its delivery
/// count up by one, and is gone once acked.
pub async fn nacks_are_redelivered_after_the_delay_with_a_count<H: BrokerHarness>(h: &H) {
    let dest = fresh(h, "nack").await;
    let mut source = h.connect(&dest, None).await;
    assert!(h.publish(&dest, &Outgoing::with_id("m", &b"x"[..])).await);
    let acker = source.acker();
    let first = receive_at_least(&mut source, 1, "the first delivery").await;
    let [first] = <[_; 1]>::try_from(first).unwrap_or_else(|got| panic!("{:?}", ids(&got)));
    assert_eq!(first.message.message_id(), Some("m"));
    assert_eq!(first.message.delivery_count(), 1, "{:?}", first.message);
    let delay = Duration::from_millis(700);
    let nacked = Instant::now();
    acker
        .nack(first.delivery, delay)
        .await
        .unwrap_or_else(|e| panic!("nack: {e}"));
    let again = receive_at_least(&mut source, 1, "the redelivery").await;
    let waited = nacked.elapsed();
    let [again] = <[_; 1]>::try_from(again).unwrap_or_else(|got| panic!("{:?}", ids(&got)));
    assert!(
        waited >= delay - Duration::from_millis(100),
        "redelivered after {waited:?}, before the {delay:?} delay"
    );
    assert_eq!(again.message.message_id(), Some("m"));
    assert_eq!(again.message.delivery_count(), 2, "{:?}", again.message);
    acker
        .ack(vec![again.delivery])
        .await
        .unwrap_or_else(|e| panic!("ack: {e}"));
    source.close().await;
    assert_backlog(h, &dest, 0, "acked after the redelivery").await;
}

/// Acks settle the deliveries given and no other, in any order: a younger batch acked before
/// an older one, and a delivery of the older batch held back (nacked) while the rest of its
/// batch is acked. (A broker ack that covers "everything up to this one", AMQP's `multiple`,
/// must not take the held delivery with it.)
pub async fn acks_settle_exactly_the_deliveries_given<H: BrokerHarness>(h: &H) {
    let dest = fresh(h, "acks").await;
    let mut source = h.connect(&dest, None).await;
    publish_all(h, &dest, &numbered(12)).await;
    let acker = source.acker();
    let mut older = receive_at_least(&mut source, 12, "twelve deliveries").await;
    let younger = older.split_off(6);
    let held = older.remove(2);
    let held_id = held.message.message_id().map(str::to_owned);
    acker
        .ack(younger.into_iter().map(|d| d.delivery).collect())
        .await
        .unwrap_or_else(|e| panic!("ack: {e}"));
    acker
        .nack(held.delivery, Duration::from_millis(300))
        .await
        .unwrap_or_else(|e| panic!("nack: {e}"));
    acker
        .ack(older.into_iter().map(|d| d.delivery).collect())
        .await
        .unwrap_or_else(|e| panic!("ack: {e}"));
    let back = receive_at_least(&mut source, 1, "the held delivery").await;
    assert_eq!(
        ids(&back),
        [held_id.as_deref().unwrap_or("<none>")],
        "only the held delivery comes back"
    );
    acker
        .ack(back.into_iter().map(|d| d.delivery).collect())
        .await
        .unwrap_or_else(|e| panic!("ack: {e}"));
    source.close().await;
    assert_backlog(h, &dest, 0, "all twelve acked").await;
}

/// A copy of a message whose key is being processed (here: another message with the same
/// key, so that no publish dedup drops it) is nacked with a delay, never acked while the first
/// copy's handler runs, and comes back until it replays the first copy's result.
pub async fn in_progress_duplicates_are_redelivered_later_never_acked<H: BrokerHarness>(h: &H) {
    let dest = fresh(h, "in-progress").await;
    let source = h.connect(&dest, None).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let (release, released) = watch::channel(false);
    let r = Arc::clone(&runs);
    let handler = move |_m: Message, _: Attempt| {
        r.fetch_add(1, Ordering::SeqCst);
        let mut released = released.clone();
        async move {
            let _ = released.wait_for(|go| *go).await;
            Ok::<_, std::io::Error>(())
        }
    };
    let consumer = Consumer::new(
        source,
        exec(
            &MemoryStore::new(),
            Config::default().lease(Duration::from_secs(30)),
        ),
        ns(),
        handler,
    )
    .key(KeyFrom::Header(ORDER_ID.to_owned()))
    .batch_size(1)
    .concurrency(2);
    let (stats, running) = start(consumer);
    let copy = || Outgoing::new(&b"order 7"[..]).with_header(ORDER_ID, "o-7");
    assert!(h.publish(&dest, &copy()).await);
    until(30, "the first copy's handler", || {
        runs.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(h.publish(&dest, &copy()).await);
    until(30, "the duplicate nacked twice", || {
        stats.snapshot().retried >= 2
    })
    .await;
    let snap = stats.snapshot();
    assert_eq!(snap.acked, 0, "acked while the first copy runs: {snap:?}");
    release.send_replace(true);
    until(30, "both acked", || stats.snapshot().acked == 2).await;
    settled(h, &stats).await;
    let snap = running.stop().await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran again");
    assert_eq!(
        (snap.executed, snap.replayed, snap.acked, snap.dead_lettered),
        (1, 1, 2, 0),
        "{snap:?}"
    );
    assert_backlog(h, &dest, 0, "both copies acked").await;
}

/// A handler that runs three times the broker's redelivery timeout is not redelivered meanwhile:
/// the runtime's progress reports (JetStream `+WPI`, Redis `XCLAIM`) cover every delivery of its
/// batch, the copy waiting for a later round included, and a second consumer of the
/// destination gets nothing. Brokers without a redelivery timeout run it with one consumer and
/// a 2 s handler.
pub async fn progress_keeps_a_slow_handler_from_being_redelivered<H: BrokerHarness>(h: &H) {
    let timeout = h.redelivery_timeout();
    let dest = fresh(h, "progress").await;
    let source = h.connect(&dest, None).await;
    let msg = Outgoing::new(&b"slow"[..]);
    // A producer retry: both copies land in the consumer's first batch, and the second waits
    // for the first copy's round (a later round of the same batch).
    let copies = u64::from(h.publish(&dest, &msg).await) + u64::from(h.publish(&dest, &msg).await);
    assert!(copies >= 1);
    let ledger = Ledger::default();
    let slow = timeout.map_or(Duration::from_secs(2), |t| t * 3);
    let consumer = Consumer::new(
        source,
        exec(&MemoryStore::new(), Config::default()),
        ns(),
        ledger.slow_handler(slow),
    )
    .concurrency(1);
    let (stats, running) = start(consumer);
    until(30, "the first delivery", || stats.snapshot().received >= 1).await;
    let other = match timeout {
        Some(_) => Some(start(Consumer::new(
            h.connect(&dest, None).await,
            exec(&MemoryStore::new(), Config::default()),
            ns(),
            ledger.handler(),
        ))),
        None => None,
    };
    until(60, "every copy acked", || stats.snapshot().acked == copies).await;
    let snap = running.stop().await;
    let other = match other {
        Some((_, other)) => other.stop().await,
        None => StatsSnapshot::default(),
    };
    assert_eq!(
        snap.received, copies,
        "redelivered while the handler ran: {snap:?}"
    );
    assert_eq!(other.received, 0, "handed to another consumer: {other:?}");
    assert_eq!((snap.executed, snap.replayed), (1, copies - 1), "{snap:?}");
    ledger.assert_exactly_once([msg.id()]);
    assert_backlog(h, &dest, 0, "every copy acked").await;
}

/// Scenario 8 through the broker: a consumer is killed mid-batch (its runtime dropped: no
/// graceful shutdown, no acks, its connection just goes) while the handler of `m-20` hangs
/// before its effect and most other messages are done. A new consumer on the same store
/// applies every message exactly once: it replays what completed and takes `m-20` over once
/// the dead consumer's lease (2 s) ends; nothing is left at the broker.
pub async fn consumer_killed_mid_batch_is_redelivered_and_applied_once<H: BrokerHarness>(h: &H) {
    let dest = fresh(h, "kill").await;
    let msgs = numbered(40);
    let store = MemoryStore::new();
    let config = Config::default().lease(Duration::from_secs(2));
    let ns = ns();
    let ledger = Ledger::default();
    let mut victim = Victim::start();
    let stuck = Arc::new(AtomicBool::new(false));
    let (l, s) = (ledger.clone(), Arc::clone(&stuck));
    let handler = move |m: Message, _: Attempt| {
        let (l, s) = (l.clone(), Arc::clone(&s));
        async move {
            if m.message_id() == Some("m-20") {
                s.store(true, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
            l.apply(&m);
            Ok::<_, std::io::Error>(())
        }
    };
    let (stats_tx, stats_rx) = oneshot::channel();
    victim.spawn({
        let (h, dest, ns) = (h.clone(), dest.to_string(), ns.clone());
        let executor = exec(&store, config.clone());
        async move {
            // Connected on the victim's runtime: its connection dies with it.
            let source = h.connect(&dest, None).await;
            let consumer = Consumer::new(source, executor, ns, handler).batch_size(8);
            let _ = stats_tx.send(consumer.stats());
            let _ = consumer.run(std::future::pending()).await;
        }
    });
    let victim_stats = stats_rx
        .await
        .unwrap_or_else(|_| panic!("the victim did not start"));
    publish_all(h, &dest, &msgs).await;
    until(30, "the victim stuck in m-20 with most done", || {
        stuck.load(Ordering::SeqCst) && victim_stats.snapshot().executed >= 30
    })
    .await;
    victim.kill();
    // Let the broker notice the dead connection.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (stats, rescuer) = start(Consumer::new(
        h.connect(&dest, None).await,
        exec(&store, config),
        ns,
        ledger.handler(),
    ));
    until(60, "every effect", || ledger.len() == 40).await;
    settled(h, &stats).await;
    let snap = rescuer.stop().await;
    ledger.assert_exactly_once(msgs.iter().map(Outgoing::id));
    assert!(snap.received >= 1, "{snap:?}");
    assert_backlog(h, &dest, 0, "the rescuer settled everything").await;
}

/// A runtime of its own for a consumer that a check kills: [`Victim::kill`] drops it with
/// every task and connection, as if its process died. Also killed on drop (a check that
/// failed), since a runtime cannot be dropped the ordinary way inside another.
struct Victim(Option<tokio::runtime::Runtime>);

impl Victim {
    fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("a runtime for the victim: {e}"));
        Self(Some(rt))
    }

    fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        if let Some(rt) = &self.0 {
            rt.spawn(fut);
        }
    }

    fn kill(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The network drops the consumer's connections twice mid-stream (through the suite's
/// [`Proxy`]). The source reconnects by itself; deliveries whose acks died with a connection
/// come back and are replayed; every message is applied once and nothing is left unacked.
pub async fn dropped_connections_reconnect_and_lose_nothing<H: BrokerHarness>(h: &H) {
    let dest = fresh(h, "cut").await;
    let proxy = Proxy::start(h.address()).await;
    let source = h.connect(&dest, Some(proxy.addr())).await;
    let msgs = numbered(150);
    publish_all(h, &dest, &msgs).await;
    let ledger = Ledger::default();
    let consumer = Consumer::new(
        source,
        exec(&MemoryStore::new(), Config::default()),
        ns(),
        ledger.slow_handler(Duration::from_millis(20)),
    )
    .batch_size(10)
    .concurrency(1);
    let (stats, running) = start(consumer);
    until(60, "some progress", || stats.snapshot().acked >= 30).await;
    proxy.cut_when_connected().await;
    until(60, "progress after the first cut", || {
        stats.snapshot().acked >= 80
    })
    .await;
    proxy.cut_when_connected().await;
    until(90, "every effect", || ledger.len() == 150).await;
    settled(h, &stats).await;
    let snap = running.stop().await;
    ledger.assert_exactly_once(msgs.iter().map(Outgoing::id));
    assert_backlog(h, &dest, 0, &format!("after two cuts: {snap:?}")).await;
}

/// Shutdown while a batch's handlers run: the consumer takes nothing more, lets them finish,
/// records and acks them, and closes; what it had not started goes back to the broker. The
/// next consumer gets exactly the rest: nothing acked is delivered again (it would replay), and
/// nothing is lost.
pub async fn shutdown_finishes_in_flight_work_and_acks_it<H: BrokerHarness>(h: &H) {
    let dest = fresh(h, "shutdown").await;
    let source = h.connect(&dest, None).await;
    let msgs = numbered(10);
    publish_all(h, &dest, &msgs).await;
    let store = MemoryStore::new();
    let ledger = Ledger::default();
    let started = Arc::new(AtomicUsize::new(0));
    let (l, s) = (ledger.clone(), Arc::clone(&started));
    let handler = move |m: Message, _: Attempt| {
        s.fetch_add(1, Ordering::SeqCst);
        let l = l.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            l.apply(&m);
            Ok::<_, std::io::Error>(())
        }
    };
    let consumer = Consumer::new(source, exec(&store, Config::default()), ns(), handler)
        .batch_size(3)
        .concurrency(1);
    let ns = ns();
    let (_, running) = start(consumer);
    until(30, "a handler running", || {
        started.load(Ordering::SeqCst) >= 1
    })
    .await;
    let first = running.stop().await;
    let started = started.load(Ordering::SeqCst) as u64;
    assert_eq!(
        first.executed, started,
        "a started handler did not finish: {first:?}"
    );
    assert_eq!(
        first.acked, first.executed,
        "finished but not acked: {first:?}"
    );
    assert!((1..10).contains(&first.executed), "{first:?}");
    assert_eq!(u64::from(ledger.total()), started);
    let (stats, running) = start(Consumer::new(
        h.connect(&dest, None).await,
        exec(&store, Config::default()),
        ns,
        ledger.handler(),
    ));
    until(60, "every effect", || ledger.len() == 10).await;
    settled(h, &stats).await;
    let second = running.stop().await;
    assert_eq!(
        (second.executed, second.replayed),
        (10 - first.executed, 0),
        "the first consumer's acks did not all reach the broker: {first:?} then {second:?}"
    );
    ledger.assert_exactly_once(msgs.iter().map(Outgoing::id));
    assert_backlog(h, &dest, 0, "all applied").await;
}

/// Shutdown while a handler hangs: past the grace (here 500 ms) the consumer abandons it,
/// releases its claim and closes; the delivery goes back to the broker unsettled, and the next
/// consumer runs it at once (the claim's 60 s lease need not run out).
pub async fn shutdown_past_the_grace_hands_stuck_work_back<H: BrokerHarness>(h: &H) {
    let dest = fresh(h, "grace").await;
    let source = h.connect(&dest, None).await;
    let msgs = numbered(5);
    let store = MemoryStore::new();
    let config = Config::default().lease(Duration::from_secs(60));
    let ledger = Ledger::default();
    let stuck = Arc::new(AtomicBool::new(false));
    let (l, s) = (ledger.clone(), Arc::clone(&stuck));
    let handler = move |m: Message, _: Attempt| {
        let (l, s) = (l.clone(), Arc::clone(&s));
        async move {
            if m.message_id() == Some("m-2") {
                s.store(true, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
            l.apply(&m);
            Ok::<_, std::io::Error>(())
        }
    };
    let ns = ns();
    let consumer = Consumer::new(source, exec(&store, config.clone()), ns.clone(), handler)
        .batch_size(1)
        .shutdown_grace(Duration::from_millis(500));
    let (_, running) = start(consumer);
    publish_all(h, &dest, &msgs).await;
    until(30, "the handler of m-2 stuck", || {
        stuck.load(Ordering::SeqCst)
    })
    .await;
    let stopping = Instant::now();
    let first = running.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "shutdown took {:?} with a 500 ms grace",
        stopping.elapsed()
    );
    assert_eq!(ledger.count("m-2"), 0);
    let (stats, running) = start(Consumer::new(
        h.connect(&dest, None).await,
        exec(&store, config),
        ns,
        ledger.handler(),
    ));
    until(30, "m-2 run again, well before its lease ends", || {
        ledger.count("m-2") == 1
    })
    .await;
    until(60, "every effect", || ledger.len() == 5).await;
    settled(h, &stats).await;
    let second = running.stop().await;
    ledger.assert_exactly_once(msgs.iter().map(Outgoing::id));
    assert_backlog(
        h,
        &dest,
        0,
        &format!("all applied: {first:?} then {second:?}"),
    )
    .await;
}

/// `receive` is cancel-safe: futures dropped mid-way (shutdown drops a pending one) lose no
/// delivery; at worst one comes again. Deliveries closed without an ack go back to the broker.
pub async fn dropped_receives_lose_nothing<H: BrokerHarness>(h: &H) {
    let dest = fresh(h, "cancel").await;
    let mut source = h.connect(&dest, None).await;
    // Nothing to receive yet: the receive waits (or comes back empty) and is dropped.
    if let Ok(got) = tokio::time::timeout(Duration::from_millis(300), source.receive(10)).await {
        let got = got.unwrap_or_else(|e| panic!("receive: {e}"));
        assert!(got.is_empty(), "received {:?} from nothing", ids(&got));
    }
    let msgs = numbered(20);
    publish_all(h, &dest, &msgs).await;
    let acker = source.acker();
    let mut seen: HashMap<String, Vec<_>> = HashMap::new();
    for _ in 0..200 {
        if let Ok(got) = tokio::time::timeout(Duration::from_micros(200), source.receive(3)).await {
            for d in got.unwrap_or_else(|e| panic!("receive: {e}")) {
                let id = d.message.message_id().unwrap_or("<none>").to_owned();
                seen.entry(id).or_default().push(d);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < msgs.len() {
        assert!(
            Instant::now() < deadline,
            "lost by dropped receives: {:?}",
            msgs.iter()
                .map(Outgoing::id)
                .filter(|id| !seen.contains_key(*id))
                .collect::<Vec<_>>()
        );
        if let Ok(got) = tokio::time::timeout(Duration::from_millis(500), source.receive(20)).await
        {
            for d in got.unwrap_or_else(|e| panic!("receive: {e}")) {
                let id = d.message.message_id().unwrap_or("<none>").to_owned();
                seen.entry(id).or_default().push(d);
            }
        }
    }
    assert_eq!(seen.len(), msgs.len(), "{:?}", seen.keys());
    // Ack the first ten; close with the other ten in hand: they go back to the broker.
    let mut acks = Vec::new();
    for m in &msgs[..10] {
        acks.extend(
            seen.remove(m.id())
                .unwrap_or_default()
                .into_iter()
                .map(|d| d.delivery),
        );
    }
    acker.ack(acks).await.unwrap_or_else(|e| panic!("ack: {e}"));
    drop(seen);
    source.close().await;
    assert_backlog(h, &dest, 10, "ten closed without an ack").await;
}
