//! The [`Consumer`] runtime: receives batches from a [`Source`], runs each through a
//! [`Processor`], and settles every delivery from its outcome. Two processors come with it:
//! store mode ([`Consumer::new`]: [`idem::Executor::run_batch`], one claim round trip, handlers
//! concurrently, one completion round trip) and transactional mode
//! ([`Consumer::transactional`]: an [`idem::Transactional`] store runs the handlers in one
//! transaction that commits their writes with the records). Settlement is the same for both:
//!
//! | outcome | settlement |
//! |---|---|
//! | executed (completion durable), replayed | ack (batched) |
//! | in progress elsewhere, handler released, lease lost | nack with delay, never ack |
//! | store error (fail closed) | nack with backoff, never ack |
//! | no key / no fingerprint, mismatch, attempts exhausted | dead-letter with the reason, ack once confirmed |
//!
//! Up to `concurrency` batches are in flight at once; the broker's prefetch bounds how many
//! deliveries are held. While a batch is in hand, every one of its deliveries gets the
//! adapter's progress reports (JetStream `+WPI`, Redis `XCLAIM`), whichever round it waits
//! for. Shutdown stops receiving, lets in-flight batches finish (up to a grace period) and
//! settle, releases the claims of handlers it had to abandon, then closes the source so that
//! anything unsettled goes back to the broker.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::join_all;
use idem::{
    Attempt, Backoff, Config, Disposition, Executor, Fingerprint, Key, Namespace, Outcome, Store,
    Stored, Token, Transactional, TxFuture,
};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::error::BrokerError;
use crate::key::{FingerprintExtractor, FingerprintFrom, KeyExtractor, KeyFrom};
use crate::message::Message;
use crate::source::{Acker, Incoming, Source};

/// Processes one message. Implemented for closures `Fn(Message, Attempt) -> Future<Output =
/// Result<T, E>>`.
///
/// The handler runs only under an acquired claim; its `Ok` value is stored and replayed to
/// duplicates; an `Err` releases the claim so the message is retried with backoff (or
/// dead-lettered after the executor's attempt limit). A panic counts as an `Err`.
pub trait Handler: Send + Sync + 'static {
    /// The result stored with the record.
    type Output: Stored + Send + 'static;
    /// The handler's error, recorded as the reason when attempts run out.
    type Error: fmt::Display + Send + 'static;

    /// Processes `message` under `attempt`'s claim.
    ///
    /// # Errors
    /// Any error: the claim is released and the message retried later.
    fn call(
        &self,
        message: Message,
        attempt: Attempt,
    ) -> impl Future<Output = Result<Self::Output, Self::Error>> + Send;
}

impl<F, Fut, T, E> Handler for F
where
    F: Fn(Message, Attempt) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, E>> + Send,
    T: Stored + Send + 'static,
    E: fmt::Display + Send + 'static,
{
    type Output = T;
    type Error = E;

    fn call(
        &self,
        message: Message,
        attempt: Attempt,
    ) -> impl Future<Output = Result<T, E>> + Send {
        self(message, attempt)
    }
}

/// A handler's failure as the runtime records it: its own error, or a panic.
#[derive(Debug)]
pub enum Failure<E> {
    /// The handler returned this error.
    Handler(E),
    /// The handler panicked with this message.
    Panicked(String),
}

impl<E: fmt::Display> fmt::Display for Failure<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Handler(e) => e.fmt(f),
            Failure::Panicked(msg) => write!(f, "the handler panicked: {msg}"),
        }
    }
}

/// Processes one message in transactional mode: its writes go through `tx`, the transaction
/// that also commits the message's record. Implemented for closures
/// `Fn(&Message, &mut Tx) -> TxFuture<Result<T, E>>`, written
/// `|msg, tx| Box::pin(async move { ... })`.
///
/// An `Err` (or a panic) undoes the handler's writes and releases the key for a retry with
/// backoff (or dead-letters it after the attempt limit). Keep the handler to writes on `tx`:
/// an effect elsewhere (an HTTP call) is not undone with the transaction.
pub trait TxHandler<Tx>: Send + Sync + 'static {
    /// The result stored with the record.
    type Output: Stored + Send + 'static;
    /// The handler's error.
    type Error: fmt::Display + Send + 'static;

    /// Processes `message` with its writes on `tx`.
    fn call<'a>(
        &'a self,
        message: &'a Message,
        tx: &'a mut Tx,
    ) -> TxFuture<'a, Self::Output, Self::Error>;
}

impl<Tx, F, T, E> TxHandler<Tx> for F
where
    F: for<'a> Fn(&'a Message, &'a mut Tx) -> TxFuture<'a, T, E> + Send + Sync + 'static,
    T: Stored + Send + 'static,
    E: fmt::Display + Send + 'static,
{
    type Output = T;
    type Error = E;

    fn call<'a>(&'a self, message: &'a Message, tx: &'a mut Tx) -> TxFuture<'a, T, E> {
        self(message, tx)
    }
}

/// A delivery's outcome from a [`Processor`], or the store error that kept it from one.
pub type ItemOutcome<T, E> = Result<Outcome<T, Failure<E>>, idem::Error>;

/// A round's outcomes from a [`Processor`], or the store error that failed the whole round.
pub type RoundOutcome<T, E> = Result<Vec<ItemOutcome<T, E>>, idem::Error>;

/// Runs one round of deliveries (distinct keys) to their outcomes: the part of the runtime that
/// differs between store mode ([`StoreMode`]) and transactional mode ([`TransactionalMode`]).
/// Settlement (ack, delayed nack, dead letter) is the runtime's, the same for every processor.
pub trait Processor: Send + Sync + 'static {
    /// The result stored with each record.
    type Output: Stored + Send + 'static;
    /// The handler's error.
    type Error: fmt::Display + Send + 'static;

    /// Processes a round: `items[i]` is the key and fingerprint of `messages[i]`, every key
    /// distinct. Returns one outcome per delivery, in order.
    ///
    /// # Errors
    /// A store error for the whole round: no handler's effect was recorded (fail closed).
    fn process(
        &self,
        items: Vec<(Key, Fingerprint)>,
        messages: Vec<Message>,
    ) -> impl Future<Output = RoundOutcome<Self::Output, Self::Error>> + Send;

    /// Releases the claims of rounds whose future was dropped before their outcome was known
    /// (shutdown past the grace, a panicked batch), so that the redeliveries need not wait out
    /// a lease. The default does nothing: a transaction dropped mid-way leaves nothing behind.
    fn release_abandoned(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Store mode: an [`Executor`] over any [`Store`] and a [`Handler`] whose effects live
/// elsewhere. Handlers of a round run concurrently.
pub struct StoreMode<S, H> {
    exec: Executor<S>,
    handler: H,
    handler_seconds: Option<metrics::Histogram>,
    /// Claims of rounds whose task was aborted before their outcome was known.
    abandoned: parking_lot::Mutex<Vec<(Key, Token)>>,
}

impl<S: Store, H> StoreMode<S, H> {
    /// Store mode with `exec` and `handler`.
    pub fn new(exec: Executor<S>, handler: H) -> Self {
        Self {
            handler_seconds: handler_seconds(&exec.config().name),
            exec,
            handler,
            abandoned: parking_lot::Mutex::new(Vec::new()),
        }
    }
}

impl<S: Store, H: Handler> Processor for StoreMode<S, H> {
    type Output = H::Output;
    type Error = H::Error;

    async fn process(
        &self,
        claims: Vec<(Key, Fingerprint)>,
        messages: Vec<Message>,
    ) -> RoundOutcome<H::Output, H::Error> {
        let handler = &self.handler;
        let timer = self.handler_seconds.as_ref();
        let mut held = RoundClaims {
            claims: parking_lot::Mutex::new(Vec::new()),
            abandoned: &self.abandoned,
            decided: false,
        };
        let outcomes = {
            let held = &held;
            let messages = &messages;
            self.exec
                .run_batch(claims, |i, attempt| {
                    held.claims
                        .lock()
                        .push((attempt.key().clone(), attempt.token()));
                    let message = messages[i].clone();
                    catch_panic(timer, handler.call(message, attempt))
                })
                .await
        };
        // Every claim of the round is now completed, released, failed, or known lost.
        held.decided = true;
        outcomes
    }

    async fn release_abandoned(&self) {
        let abandoned = std::mem::take(&mut *self.abandoned.lock());
        release_claims(&self.exec, abandoned).await;
    }
}

/// Transactional mode: an [`idem::Transactional`] store runs each round's handlers in one
/// transaction that commits their writes together with the records (one item's failure undoes
/// only its own writes). No window: a crash before the commit leaves neither effect nor
/// record, and the redelivery runs the handler as if for the first time.
pub struct TransactionalMode<S, H> {
    store: S,
    config: Config,
    handler: Arc<H>,
    handler_seconds: Option<metrics::Histogram>,
}

impl<S, H> TransactionalMode<S, H> {
    /// Transactional mode on `store` with `config` (retention, attempt limit, retry backoff,
    /// owner and metrics name; the lease does not apply) and `handler`.
    pub fn new(store: S, config: Config, handler: H) -> Self {
        Self {
            handler_seconds: handler_seconds(&config.name),
            store,
            config,
            handler: Arc::new(handler),
        }
    }
}

impl<S, H> Processor for TransactionalMode<S, H>
where
    S: Transactional,
    H: TxHandler<S::Tx>,
{
    type Output = H::Output;
    type Error = H::Error;

    async fn process(
        &self,
        items: Vec<(Key, Fingerprint)>,
        messages: Vec<Message>,
    ) -> RoundOutcome<H::Output, H::Error> {
        let messages = Arc::new(messages);
        let handler = Arc::clone(&self.handler);
        let timer = self.handler_seconds.clone();
        let outcomes = self
            .store
            .run_batch_transactional(
                &items,
                &self.config,
                move |tx: &mut S::Tx, i| -> TxFuture<'_, H::Output, Failure<H::Error>> {
                    let handler = Arc::clone(&handler);
                    let messages = Arc::clone(&messages);
                    let timer = timer.clone();
                    Box::pin(async move {
                        let Some(message) = messages.get(i) else {
                            return Err(Failure::Panicked(format!("no message at index {i}")));
                        };
                        catch_panic(timer.as_ref(), handler.call(message, tx)).await
                    })
                },
            )
            .await?;
        Ok(outcomes.into_iter().map(Ok).collect())
    }
}

/// The handler-latency histogram of an executor (or a transactional config) named `name`;
/// `None` when no recorder takes it, so that handlers are not timed for nothing.
fn handler_seconds(name: &str) -> Option<metrics::Histogram> {
    let h = metrics::histogram!(metric::HANDLER_SECONDS, "executor" => name.to_owned());
    idem::metrics::records(&h).then_some(h)
}

/// Runs a handler's future, timing it (with a `timer`) and turning a panic into a failed
/// attempt.
async fn catch_panic<T, E>(
    timer: Option<&metrics::Histogram>,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, Failure<E>> {
    let start = timer.map(|_| std::time::Instant::now());
    let out = AssertUnwindSafe(fut).catch_unwind().await;
    if let (Some(timer), Some(start)) = (timer, start) {
        timer.record(start.elapsed().as_secs_f64());
    }
    match out {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure::Handler(e)),
        Err(panic) => Err(Failure::Panicked(panic_message(&*panic))),
    }
}

/// The runtime's settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Settings {
    /// Most deliveries taken per batch (default 64).
    pub batch_size: usize,
    /// Batches processed at once (default 4).
    pub concurrency: usize,
    /// How long shutdown waits for in-flight batches before abandoning them (default 30 s).
    /// Abandoned deliveries go back to the broker unsettled; the claims of their handlers are
    /// released (fenced by their tokens, best effort within 5 s), so that the redeliveries run
    /// at once instead of waiting out the lease. Like a crash, an abandoned handler may have
    /// produced its effect already (store mode's window).
    pub shutdown_grace: Duration,
    /// Delay before redelivery after a store error, growing while errors last.
    pub store_backoff: Backoff,
    /// Wait between attempts to receive while the broker is unreachable.
    pub receive_backoff: Backoff,
    /// Redelivery delay of a duplicate whose key another consumer holds, by delivery count
    /// (default 200 ms doubling), never past the rest of the other consumer's lease: most
    /// holders finish long before their lease ends, and the redelivery then replays.
    pub in_progress_backoff: Backoff,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            batch_size: 64,
            concurrency: 4,
            shutdown_grace: Duration::from_secs(30),
            store_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(30)),
            receive_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            in_progress_backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30)),
        }
    }
}

/// Counters of what a consumer did, readable while it runs ([`Consumer::stats`]). While
/// [`Consumer::run`] goes on they are also exported through the `metrics` facade, labelled with
/// the consumer's namespace (see [`metric`]).
#[derive(Debug, Default)]
pub struct Stats {
    received: AtomicU64,
    executed: AtomicU64,
    replayed: AtomicU64,
    acked: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    store_errors: AtomicU64,
    settle_errors: AtomicU64,
    metrics: std::sync::OnceLock<RuntimeMetrics>,
}

/// The metric names of the runtime, each labelled `consumer` (the namespace). Handler latency
/// is labelled `executor` (the config's name), like the executor's own `idem_*` metrics.
pub mod metric {
    /// Deliveries received.
    pub const RECEIVED: &str = "idem_consumer_received_total";
    /// Deliveries acked as a success (executed or replayed).
    pub const ACKED: &str = "idem_consumer_acked_total";
    /// Deliveries nacked for a later redelivery.
    pub const RETRIED: &str = "idem_consumer_retried_total";
    /// Deliveries dead-lettered (publish confirmed, then acked), by `reason`: `no_key`,
    /// `no_fingerprint`, `mismatch`, `exhausted`.
    pub const DEAD_LETTERED: &str = "idem_consumer_dead_lettered_total";
    /// Rounds or items that met a store error (never acked).
    pub const STORE_ERRORS: &str = "idem_consumer_store_errors_total";
    /// Acks, nacks or dead-letter publishes the broker did not take.
    pub const SETTLE_ERRORS: &str = "idem_consumer_settle_errors_total";
    /// Deliveries in hand: received and not yet settled.
    pub const IN_FLIGHT: &str = "idem_consumer_in_flight";
    /// Handler latency in seconds, by `executor`.
    pub const HANDLER_SECONDS: &str = "idem_handler_seconds";
}

/// Why a delivery was dead-lettered, as a bounded label.
#[derive(Clone, Copy, Debug)]
enum DeadKind {
    NoKey,
    NoFingerprint,
    Mismatch,
    Exhausted,
}

impl DeadKind {
    const ALL: [DeadKind; 4] = [
        DeadKind::NoKey,
        DeadKind::NoFingerprint,
        DeadKind::Mismatch,
        DeadKind::Exhausted,
    ];

    fn label(self) -> &'static str {
        match self {
            DeadKind::NoKey => "no_key",
            DeadKind::NoFingerprint => "no_fingerprint",
            DeadKind::Mismatch => "mismatch",
            DeadKind::Exhausted => "exhausted",
        }
    }
}

/// Registered handles, one set per running consumer.
struct RuntimeMetrics {
    received: metrics::Counter,
    acked: metrics::Counter,
    retried: metrics::Counter,
    dead_lettered: [metrics::Counter; 4],
    store_errors: metrics::Counter,
    settle_errors: metrics::Counter,
    in_flight: metrics::Gauge,
}

impl fmt::Debug for RuntimeMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeMetrics").finish_non_exhaustive()
    }
}

impl RuntimeMetrics {
    fn new(consumer: &str) -> Self {
        let c = |name: &'static str| metrics::counter!(name, "consumer" => consumer.to_owned());
        Self {
            received: c(metric::RECEIVED),
            acked: c(metric::ACKED),
            retried: c(metric::RETRIED),
            dead_lettered: DeadKind::ALL.map(|k| {
                metrics::counter!(metric::DEAD_LETTERED, "consumer" => consumer.to_owned(), "reason" => k.label())
            }),
            store_errors: c(metric::STORE_ERRORS),
            settle_errors: c(metric::SETTLE_ERRORS),
            in_flight: metrics::gauge!(metric::IN_FLIGHT, "consumer" => consumer.to_owned()),
        }
    }
}

/// A snapshot of [`Stats`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Deliveries received.
    pub received: u64,
    /// Deliveries whose handler ran and whose completion is durable.
    pub executed: u64,
    /// Duplicates answered from the store.
    pub replayed: u64,
    /// Deliveries acked as a success (executed or replayed).
    pub acked: u64,
    /// Deliveries nacked for a later redelivery (in progress elsewhere, handler failed, store
    /// error).
    pub retried: u64,
    /// Deliveries dead-lettered and acked.
    pub dead_lettered: u64,
    /// Batches or items that met a store error (never acked).
    pub store_errors: u64,
    /// Acks, nacks or dead-letter publishes the broker did not take (the message is redelivered).
    pub settle_errors: u64,
}

impl Stats {
    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            received: get(&self.received),
            executed: get(&self.executed),
            replayed: get(&self.replayed),
            acked: get(&self.acked),
            retried: get(&self.retried),
            dead_lettered: get(&self.dead_lettered),
            store_errors: get(&self.store_errors),
            settle_errors: get(&self.settle_errors),
        }
    }

    fn add(c: &AtomicU64, n: usize) {
        c.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn metrics(&self) -> Option<&RuntimeMetrics> {
        self.metrics.get()
    }

    fn received(&self, n: usize) {
        Self::add(&self.received, n);
        if let Some(m) = self.metrics() {
            m.received.increment(n as u64);
            m.in_flight.increment(n as f64);
        }
    }

    fn settled(&self, n: usize) {
        if let Some(m) = self.metrics() {
            m.in_flight.decrement(n as f64);
        }
    }

    fn acked(&self, n: usize) {
        Self::add(&self.acked, n);
        if let Some(m) = self.metrics() {
            m.acked.increment(n as u64);
        }
    }

    fn retried(&self) {
        Self::add(&self.retried, 1);
        if let Some(m) = self.metrics() {
            m.retried.increment(1);
        }
    }

    fn dead_lettered(&self, kind: DeadKind) {
        Self::add(&self.dead_lettered, 1);
        if let Some(m) = self.metrics() {
            m.dead_lettered[kind as usize].increment(1);
        }
    }

    fn store_error(&self) {
        Self::add(&self.store_errors, 1);
        if let Some(m) = self.metrics() {
            m.store_errors.increment(1);
        }
    }

    fn settle_error(&self) {
        Self::add(&self.settle_errors, 1);
        if let Some(m) = self.metrics() {
            m.settle_errors.increment(1);
        }
    }
}

/// Consumes a [`Source`] exactly once per key, through a [`Processor`]: store mode
/// ([`Consumer::new`]) or transactional mode ([`Consumer::transactional`]).
///
/// ```no_run
/// # #[cfg(feature = "nats")]
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem::{Attempt, Executor, MemoryStore, Namespace};
/// use idem_broker::{Consumer, Message, nats::{NatsConfig, NatsSource}};
///
/// let source = NatsSource::connect("nats://127.0.0.1:4222", NatsConfig::new("ORDERS", "orders.>", "billing")).await?;
/// let exec = Executor::new(MemoryStore::new());
/// let consumer = Consumer::new(source, exec, Namespace::new("billing")?, |msg: Message, attempt: Attempt| async move {
///     println!("charging for {} ({})", msg.message_id().unwrap_or("?"), attempt.idempotency_key());
///     Ok::<_, std::io::Error>(())
/// });
/// let stats = consumer.run(idem_broker::shutdown_signal()).await?;
/// println!("{stats:?}");
/// # Ok(()) }
/// ```
pub struct Consumer<Src: Source, P> {
    source: Src,
    processor: P,
    namespace: Namespace,
    key: Box<dyn KeyExtractor>,
    fingerprint: Box<dyn FingerprintExtractor>,
    settings: Settings,
    stats: Arc<Stats>,
}

struct Shared<P> {
    processor: P,
    namespace: Namespace,
    key: Box<dyn KeyExtractor>,
    fingerprint: Box<dyn FingerprintExtractor>,
    stats: Arc<Stats>,
    store_failures: AtomicU32,
    store_backoff: Backoff,
    in_progress_backoff: Backoff,
}

impl<Src: Source, P> fmt::Debug for Consumer<Src, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("namespace", &self.namespace)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<Src, S, H> Consumer<Src, StoreMode<S, H>>
where
    Src: Source,
    S: Store,
    H: Handler,
{
    /// Store mode: a consumer of `source` that runs `handler` once per key in `namespace` (the
    /// consumer's name), keyed by the producer's message id and fingerprinted by the whole
    /// payload. The handler's effects live elsewhere; see [`idem::Executor`] for the window a
    /// crash between the effect and the record leaves.
    pub fn new(source: Src, exec: Executor<S>, namespace: Namespace, handler: H) -> Self {
        Self::with_processor(source, StoreMode::new(exec, handler), namespace)
    }
}

impl<Src, S, H> Consumer<Src, TransactionalMode<S, H>>
where
    Src: Source,
    S: Transactional,
    H: TxHandler<S::Tx>,
{
    /// Transactional mode: a consumer of `source` whose `handler` writes through the
    /// transaction (`&mut S::Tx`) that also commits the message's record; the delivery is acked
    /// after the commit. Commit = effect + record, crash = neither: no window. `config` gives
    /// the retention, attempt limit, retry backoff and metrics name.
    ///
    /// ```no_run
    /// # #[cfg(feature = "amqp")]
    /// # async fn demo(store: idem_sqlite::SqliteStore) -> Result<(), Box<dyn std::error::Error>> {
    /// use idem::{Config, Namespace};
    /// use idem_broker::amqp::{AmqpConfig, AmqpSource};
    /// use idem_broker::{Consumer, Message, shutdown_signal};
    ///
    /// let source = AmqpSource::connect("amqp://guest:guest@127.0.0.1:5672/%2f", AmqpConfig::new("orders")).await?;
    /// let consumer = Consumer::transactional(
    ///     source, store, Config::default(), Namespace::new("billing")?,
    ///     |msg: &Message, conn: &mut rusqlite::Connection| Box::pin(async move {
    ///         conn.execute("INSERT INTO orders (body) VALUES (?1)", [msg.payload().as_ref()])?;
    ///         Ok::<_, rusqlite::Error>(())
    ///     }),
    /// );
    /// consumer.run(shutdown_signal()).await?;
    /// # Ok(()) }
    /// ```
    pub fn transactional<T, E>(
        source: Src,
        store: S,
        config: Config,
        namespace: Namespace,
        handler: H,
    ) -> Self
    where
        H: for<'a> Fn(&'a Message, &'a mut S::Tx) -> TxFuture<'a, T, E> + Send + Sync + 'static,
        T: Stored + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        Self::with_processor(
            source,
            TransactionalMode::new(store, config, handler),
            namespace,
        )
    }
}

impl<Src, P> Consumer<Src, P>
where
    Src: Source,
    P: Processor,
{
    /// A consumer of `source` that runs every round through `processor`.
    pub fn with_processor(source: Src, processor: P, namespace: Namespace) -> Self {
        Self {
            source,
            processor,
            namespace,
            key: Box::new(KeyFrom::MessageId),
            fingerprint: Box::new(FingerprintFrom::Payload),
            settings: Settings::default(),
            stats: Arc::default(),
        }
    }

    /// Where the key comes from ([`KeyFrom`] or a closure; default: the message id).
    #[must_use]
    pub fn key(mut self, key: impl KeyExtractor) -> Self {
        self.key = Box::new(key);
        self
    }

    /// What the fingerprint covers ([`FingerprintFrom`] or a closure; default: the payload).
    #[must_use]
    pub fn fingerprint(mut self, fingerprint: impl FingerprintExtractor) -> Self {
        self.fingerprint = Box::new(fingerprint);
        self
    }

    /// The runtime's settings.
    #[must_use]
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// Most deliveries per batch.
    #[must_use]
    pub fn batch_size(mut self, n: usize) -> Self {
        self.settings.batch_size = n.max(1);
        self
    }

    /// Batches processed at once.
    #[must_use]
    pub fn concurrency(mut self, n: usize) -> Self {
        self.settings.concurrency = n.max(1);
        self
    }

    /// How long shutdown waits for in-flight batches.
    #[must_use]
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.settings.shutdown_grace = grace;
        self
    }

    /// The counters, readable while [`run`](Consumer::run) goes on.
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// Runs until `shutdown` resolves (e.g. [`shutdown_signal`]), then stops taking messages,
    /// finishes or abandons what is in flight (see [`Settings::shutdown_grace`]), settles what
    /// finished, releases the claims of abandoned handlers, closes the source, and returns the
    /// counters.
    ///
    /// # Errors
    /// A [`BrokerError`] that retrying cannot fix (a [`Config`](crate::BrokerErrorKind::Config)
    /// error, say); transient broker errors are retried with backoff.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<StatsSnapshot, BrokerError> {
        let Consumer {
            mut source,
            processor,
            namespace,
            key,
            fingerprint,
            settings,
            stats,
        } = self;
        let _ = stats.metrics.set(RuntimeMetrics::new(namespace.as_str()));
        let shared = Arc::new(Shared {
            processor,
            namespace,
            key,
            fingerprint,
            stats,
            store_failures: AtomicU32::new(0),
            store_backoff: settings.store_backoff,
            in_progress_backoff: settings.in_progress_backoff,
        });
        let acker = source.acker();
        let permits = Arc::new(Semaphore::new(settings.concurrency.max(1)));
        let mut tasks = JoinSet::new();
        let mut shutdown = pin!(shutdown);
        let mut receive_failures = 0u32;
        let mut fatal = None;
        loop {
            let mut panicked = false;
            while let Some(done) = tasks.try_join_next() {
                panicked |= log_task_end(done);
            }
            if panicked {
                // A batch task that panicked left its claims behind: release them now rather
                // than make their redeliveries wait out the lease.
                shared.processor.release_abandoned().await;
            }
            let permit = tokio::select! {
                biased;
                () = &mut shutdown => break,
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break, // never closed; kept total
                },
            };
            let received = tokio::select! {
                biased;
                () = &mut shutdown => break,
                r = source.receive(settings.batch_size.max(1)) => r,
            };
            match received {
                Ok(batch) if batch.is_empty() => {}
                Ok(batch) => {
                    receive_failures = 0;
                    shared.stats.received(batch.len());
                    let shared = Arc::clone(&shared);
                    let acker = acker.clone();
                    tasks.spawn(async move {
                        process(&shared, &acker, batch, permit).await;
                    });
                }
                Err(e) if e.is_transient() => {
                    receive_failures += 1;
                    let delay = settings.receive_backoff.delay(receive_failures);
                    tracing::warn!(error = %e, ?delay, "receive failed; retrying");
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "receive failed for good; stopping");
                    fatal = Some(e);
                    break;
                }
            }
        }
        tracing::info!(in_flight = tasks.len(), "consumer stopping");
        let drained = tokio::time::timeout(settings.shutdown_grace, async {
            while let Some(done) = tasks.join_next().await {
                let _ = log_task_end(done);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                abandoned = tasks.len(),
                "shutdown grace over: abandoning in-flight batches; their deliveries go back to \
                 the broker and their claims are released"
            );
            tasks.abort_all();
            // An aborted task's future is dropped before `join_next` reports it, so every
            // round's claims are in `abandoned` once this loop ends.
            while tasks.join_next().await.is_some() {}
        }
        // Abandoned by the grace's end, or by a task that panicked while draining.
        shared.processor.release_abandoned().await;
        source.close().await;
        match fatal {
            Some(e) => Err(e),
            None => Ok(shared.stats.snapshot()),
        }
    }
}

/// Logs a batch task's end; returns whether it panicked.
fn log_task_end(done: Result<(), tokio::task::JoinError>) -> bool {
    if let Err(e) = done
        && e.is_panic()
    {
        // Handler panics are caught; this is a bug in the runtime or an adapter. The batch's
        // deliveries were not settled and go back to the broker.
        tracing::error!(error = %e, "a batch task panicked");
        return true;
    }
    false
}

/// A delivery's message on its way through a batch; the delivery itself stays in the batch's
/// list (at `idx`) so that progress reports reach it whatever round it waits for.
struct Item {
    message: Message,
    idx: usize,
    key: Key,
    fingerprint: Fingerprint,
}

/// A batch's place in the in-flight gauge, given back when the batch is done with.
struct InFlight<'a> {
    stats: &'a Stats,
    n: usize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.stats.settled(self.n);
    }
}

/// What to do with one delivery once its outcome is known.
enum Decision {
    Ack,
    Nack(Duration),
    DeadLetter(Message, String, DeadKind),
}

/// What to do with each delivery once the batch is decided.
struct Settlement<D> {
    acks: Vec<D>,
    nacks: Vec<(D, Duration)>,
    dead: Vec<(D, Message, String, DeadKind)>,
}

impl<D> Settlement<D> {
    fn new(
        deliveries: Vec<D>,
        decisions: Vec<Option<Decision>>,
        store_delay: impl Fn() -> Duration,
    ) -> Self {
        let mut settle = Self {
            acks: Vec::with_capacity(deliveries.len()),
            nacks: Vec::new(),
            dead: Vec::new(),
        };
        for (delivery, decision) in deliveries.into_iter().zip(decisions) {
            match decision {
                Some(Decision::Ack) => settle.acks.push(delivery),
                Some(Decision::Nack(delay)) => settle.nacks.push((delivery, delay)),
                Some(Decision::DeadLetter(message, reason, kind)) => {
                    settle.dead.push((delivery, message, reason, kind));
                }
                // Every delivery gets a decision; should one not, it is retried, never acked.
                None => settle.nacks.push((delivery, store_delay())),
            }
        }
        settle
    }
}

async fn process<P, A>(
    shared: &Shared<P>,
    acker: &A,
    batch: Vec<Incoming<A::Delivery>>,
    permit: tokio::sync::OwnedSemaphorePermit,
) where
    P: Processor,
    A: Acker,
{
    // Settled or not (an aborted task drops this), the batch leaves the in-flight count.
    let _in_flight = InFlight {
        stats: &shared.stats,
        n: batch.len(),
    };
    let mut deliveries = Vec::with_capacity(batch.len());
    let mut decisions: Vec<Option<Decision>> = Vec::with_capacity(batch.len());
    let mut items = Vec::with_capacity(batch.len());
    for (idx, Incoming { message, delivery }) in batch.into_iter().enumerate() {
        deliveries.push(delivery);
        decisions.push(None);
        let key = match shared.key.key(&shared.namespace, &message) {
            Ok(key) => key,
            Err(e) => {
                let reason = format!("no usable key: {e}");
                tracing::warn!(message_id = message.message_id(), %reason, "dead-lettering");
                decisions[idx] = Some(Decision::DeadLetter(message, reason, DeadKind::NoKey));
                continue;
            }
        };
        match shared.fingerprint.fingerprint(&message) {
            Ok(fingerprint) => items.push(Item {
                message,
                idx,
                key,
                fingerprint,
            }),
            Err(e) => {
                let reason = format!("no usable fingerprint: {e}");
                tracing::warn!(message_id = message.message_id(), %key, %reason, "dead-lettering");
                decisions[idx] = Some(Decision::DeadLetter(
                    message,
                    reason,
                    DeadKind::NoFingerprint,
                ));
            }
        }
    }
    // Every delivery of the batch stays unacked until the last round is decided (acks go out
    // together), so progress covers them all: those of the round running, those deferred to a
    // later round, and those decided and waiting for the batch's settlement.
    let held: Vec<&A::Delivery> = deliveries.iter().collect();
    let rounds = async {
        // A producer retry often lands both copies in one batch. Claiming both at once would
        // find the second "in progress" (held by the first) and delay it by a whole lease;
        // instead later copies wait for the first's round and then meet its durable record.
        while !items.is_empty() {
            let mut seen = HashSet::with_capacity(items.len());
            let (round, later): (Vec<_>, Vec<_>) = std::mem::take(&mut items)
                .into_iter()
                .partition(|it| seen.insert(it.key.clone()));
            items = later;
            run_round(shared, round, &mut decisions).await;
        }
    };
    with_progress(acker, &held, rounds).await;
    drop(held);
    // The next batch may start while this one's acks travel: they wait on the broker, not on
    // the store or the handlers, and the broker's prefetch still bounds what is in hand.
    drop(permit);
    let settle = Settlement::new(deliveries, decisions, || shared.store_delay());
    apply(shared, acker, settle).await;
}

/// The claims a round acquired, until the round's outcomes are known. If the round is dropped
/// before that (its task aborted at shutdown), they are handed over for release.
struct RoundClaims<'a> {
    claims: parking_lot::Mutex<Vec<(Key, Token)>>,
    abandoned: &'a parking_lot::Mutex<Vec<(Key, Token)>>,
    decided: bool,
}

impl Drop for RoundClaims<'_> {
    fn drop(&mut self) {
        if !self.decided {
            let claims = std::mem::take(self.claims.get_mut());
            self.abandoned.lock().extend(claims);
        }
    }
}

async fn run_round<P: Processor>(
    shared: &Shared<P>,
    round: Vec<Item>,
    decisions: &mut [Option<Decision>],
) {
    let items = round
        .iter()
        .map(|it| (it.key.clone(), it.fingerprint))
        .collect();
    let messages = round.iter().map(|it| it.message.clone()).collect();
    let outcomes = match shared.processor.process(items, messages).await {
        Ok(outcomes) => outcomes.into_iter().map(Some).collect(),
        Err(e) => {
            // The round failed as a whole (the claim, or the transaction): no effect was
            // recorded. Fail closed.
            tracing::warn!(error = %e, items = round.len(), "store error; nothing acked");
            shared.stats.store_error();
            round.iter().map(|_| None).collect::<Vec<_>>()
        }
    };
    let mut store_ok = true;
    for (item, outcome) in round.into_iter().zip(outcomes) {
        let decision = &mut decisions[item.idx];
        let outcome = match outcome {
            Some(Ok(outcome)) => outcome,
            Some(Err(e)) => {
                tracing::warn!(key = %item.key, error = %e, "store error; not acked");
                shared.stats.store_error();
                store_ok = false;
                *decision = Some(Decision::Nack(shared.store_delay()));
                continue;
            }
            None => {
                store_ok = false;
                *decision = Some(Decision::Nack(shared.store_delay()));
                continue;
            }
        };
        if outcome.is_executed() {
            Stats::add(&shared.stats.executed, 1);
        } else if outcome.is_replayed() {
            Stats::add(&shared.stats.replayed, 1);
        }
        *decision = Some(match outcome.disposition() {
            Disposition::Ack => Decision::Ack,
            Disposition::Retry { after } => {
                let after = if matches!(outcome, Outcome::InProgress { .. }) {
                    after.min(
                        shared
                            .in_progress_backoff
                            .delay(item.message.delivery_count()),
                    )
                } else {
                    after
                };
                tracing::debug!(key = %item.key, outcome = outcome.kind(), ?after, "redeliver later");
                Decision::Nack(after)
            }
            Disposition::DeadLetter { reason } => {
                tracing::warn!(key = %item.key, %reason, "dead-lettering");
                let kind = if matches!(outcome, Outcome::Mismatch { .. }) {
                    DeadKind::Mismatch
                } else {
                    DeadKind::Exhausted
                };
                Decision::DeadLetter(item.message, reason, kind)
            }
        });
    }
    if store_ok {
        shared.store_failures.store(0, Ordering::Relaxed);
    }
}

/// How long shutdown spends releasing the claims of aborted rounds.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Releases the claims of rounds aborted at shutdown (best effort, fenced by their tokens), so
/// that the redeliveries of their messages run at once instead of waiting out the lease.
///
/// The handlers were dropped mid-run: like a crash, this is store mode's window (an effect may
/// have happened). A release is fenced: a claim that was completed, or taken over, is left
/// alone. Claims the store cannot release now expire with their lease.
async fn release_claims<S: Store>(exec: &Executor<S>, abandoned: Vec<(Key, Token)>) {
    if abandoned.is_empty() {
        return;
    }
    let store = exec.store();
    let retention = exec.config().retention;
    let releases = join_all(
        abandoned
            .iter()
            .map(|(key, token)| store.release(key, *token, retention)),
    );
    match tokio::time::timeout(RELEASE_TIMEOUT, releases).await {
        Ok(results) => {
            let released = results
                .iter()
                .filter(|r| matches!(r, Ok(w) if w.is_applied()))
                .count();
            let failed = results.iter().filter(|r| r.is_err()).count();
            tracing::info!(
                released,
                failed,
                already_settled = results.len() - released - failed,
                "released the claims of abandoned handlers"
            );
        }
        Err(_) => tracing::warn!(
            claims = abandoned.len(),
            "the store did not release abandoned claims in time; they expire with the lease"
        ),
    }
}

/// Runs `work`, telling the broker every so often that `deliveries` are still in hand.
async fn with_progress<A: Acker, T>(
    acker: &A,
    deliveries: &[&A::Delivery],
    work: impl Future<Output = T>,
) -> T {
    let Some(every) = acker.progress_interval() else {
        return work.await;
    };
    use futures_util::FutureExt as _;
    use futures_util::future::{Fuse, FusedFuture as _};
    let mut work = pin!(work);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A report runs beside the work, never instead of it: while it waits on the broker, the
    // handlers, their heartbeats and their timeouts keep going. At most one at a time, and no
    // longer than the interval.
    let mut report = pin!(Fuse::terminated());
    loop {
        tokio::select! {
            biased;
            out = &mut work => return out,
            sent = &mut report, if !report.is_terminated() => match sent {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not report progress to the broker");
                }
                Err(_) => tracing::warn!("a progress report took longer than its interval"),
            },
            _ = ticker.tick(), if report.is_terminated() => {
                report.set(tokio::time::timeout(every, acker.progress(deliveries)).fuse());
            }
        }
    }
}

async fn apply<P, A: Acker>(shared: &Shared<P>, acker: &A, settle: Settlement<A::Delivery>) {
    let stats = &shared.stats;
    let n_acks = settle.acks.len();
    let ack = async {
        if n_acks == 0 {
            return;
        }
        match acker.ack(settle.acks).await {
            Ok(()) => stats.acked(n_acks),
            Err(e) => {
                // Not lost: the broker redelivers, and the store replays the result.
                tracing::warn!(error = %e, n_acks, "ack failed");
                stats.settle_error();
            }
        }
    };
    let nacks = join_all(settle.nacks.into_iter().map(|(d, delay)| async move {
        stats.retried();
        if let Err(e) = acker.nack(d, delay).await {
            tracing::warn!(error = %e, "nack failed; the broker redelivers anyway");
            stats.settle_error();
        }
    }));
    let dead = join_all(
        settle
            .dead
            .into_iter()
            .map(|(d, msg, reason, kind)| async move {
                match acker.dead_letter(d, &msg, &reason).await {
                    Ok(()) => stats.dead_lettered(kind),
                    Err(e) => {
                        // Not acked: the message comes back and is dead-lettered again.
                        tracing::warn!(error = %e, "dead-letter publish not confirmed; not acked");
                        stats.settle_error();
                    }
                }
            }),
    );
    tokio::join!(ack, nacks, dead);
}

impl<P> Shared<P> {
    /// Redelivery delay after a store error, growing while they last.
    fn store_delay(&self) -> Duration {
        let n = self.store_failures.fetch_add(1, Ordering::Relaxed) + 1;
        self.store_backoff.delay(n)
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// Resolves on ctrl-c or, on Unix, SIGTERM: pass it to [`Consumer::run`] for a graceful
/// shutdown.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; ctrl-c only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;

    use idem::{Executor, MemoryStore};
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;
    use crate::KeyFrom;
    use crate::memory::MemoryBroker;

    /// The runtime's metrics while it runs: received, acked, dead letters by reason, the
    /// in-flight gauge back at zero, and one handler latency sample per run handler.
    #[tokio::test(flavor = "current_thread")]
    async fn the_runtime_exports_its_counters_by_consumer() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _guard = metrics::set_default_local_recorder(&recorder);

        let broker = MemoryBroker::new("orders");
        for (id, body) in [
            ("a", "{\"k\":\"a\"}"),
            ("a", "{\"k\":\"a\"}"),
            ("b", "not json"),
        ] {
            broker.publish(Message::new("orders", body.as_bytes().to_vec()).with_message_id(id));
        }
        let exec = Executor::new(MemoryStore::new());
        let consumer = Consumer::new(
            broker.source(),
            exec,
            Namespace::new("metered").unwrap(),
            |_m: Message, _a: Attempt| async { Ok::<_, std::io::Error>(()) },
        )
        .key("json:/k".parse::<KeyFrom>().unwrap());
        let stats = consumer.stats();
        let done = async {
            while stats.snapshot().acked + stats.snapshot().dead_lettered < 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        consumer.run(done).await.unwrap();

        let mut counters = HashMap::new();
        let mut gauges = HashMap::new();
        let mut histograms = HashMap::new();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let key = key.key();
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            match value {
                DebugValue::Counter(n) => {
                    counters.insert(name, n);
                }
                DebugValue::Gauge(g) => {
                    gauges.insert(name, g.into_inner());
                }
                DebugValue::Histogram(h) => {
                    histograms.insert(name, h.len());
                }
            }
        }
        assert_eq!(
            counters.get("idem_consumer_received_total{consumer=metered}"),
            Some(&3),
            "{counters:?}"
        );
        assert_eq!(
            counters.get("idem_consumer_acked_total{consumer=metered}"),
            Some(&2),
            "{counters:?}"
        );
        assert_eq!(
            counters.get("idem_consumer_dead_lettered_total{consumer=metered,reason=no_key}"),
            Some(&1),
            "{counters:?}"
        );
        assert_eq!(
            gauges.get("idem_consumer_in_flight{consumer=metered}"),
            Some(&0.0),
            "{gauges:?}"
        );
        assert_eq!(
            histograms.get("idem_handler_seconds{executor=default}"),
            Some(&1),
            "one handler ran: {histograms:?}"
        );
    }
}
