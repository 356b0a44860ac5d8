//! [`Harness`]: runs one mode of the workload through the in-process broker
//! ([`idem_broker::memory::MemoryBroker`], with a visibility timeout) to competing, supervised
//! consumers that suffer the planned faults, and reports what the ledger says.
//!
//! - naive mode: a plain at-least-once consumer (receive, apply, ack), no idem;
//! - store mode: [`idem_broker::Consumer`] with [`StoreMode`] over an [`Executor`] on the store
//!   (`run_batch`: a claim round trip per round, handlers concurrently, completions grouped);
//! - transactional mode: [`idem_broker::Consumer`] with [`TransactionalMode`] on an
//!   [`idem::Transactional`] store, whose transaction carries the ledger's writes.
//!
//! A consumer that crashes is dropped with every task it runs (nothing it held is settled any
//! more: its connection is cut) and its supervisor starts a fresh one on a new connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::future::BoxFuture;
use idem::{Backoff, Config, Executor, Namespace, State, Store};
use idem_broker::memory::MemoryBroker;
use idem_broker::{
    BrokerError, Consumer, Message, Settings, StatsSnapshot, StoreMode, TransactionalMode,
};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::faults::{Fault, FaultCounters, FaultPlan};
use crate::incarnation::Incarnation;
use crate::ledger::{Effect, Sabotage, TransactionalLedger, quiet_simulated_crashes};
use crate::modes::{Gated, HandlerCtx, Kind, Watched, store_handler, tx_handler};
use crate::naive;
use crate::report::{Measured, ModeName, RunReport};
use crate::stats::Stats;
use crate::tap::{Tap, TapSource};
use crate::workload::Workload;

/// Timings of the slow and pause faults.
#[derive(Clone, Copy, Debug)]
pub struct Stalls {
    /// How long a slow handler takes.
    pub slow: Duration,
    /// How long a paused consumer freezes.
    pub pause: Duration,
}

impl Stalls {
    /// The defaults for a lease and a visibility timeout: a slow handler outlives both twice
    /// over (so that only the heartbeat keeps its claim), a pause lasts the lease plus three
    /// visibility timeouts (so that other consumers can take over).
    pub fn for_timing(lease: Duration, visibility_timeout: Duration) -> Self {
        Self {
            slow: (visibility_timeout * 2).max(lease * 2),
            pause: lease + visibility_timeout * 3,
        }
    }
}

/// Told when a mode starts and finishes (a progress bar, say).
pub trait Observer: Send + Sync + 'static {
    /// A mode starts; `stats` are its counters, readable while it runs.
    fn mode_started(&self, mode: ModeName, messages: u64, stats: &Arc<Stats>) {
        let _ = (mode, messages, stats);
    }

    /// The mode is over, after `elapsed`.
    fn mode_finished(
        &self,
        mode: ModeName,
        elapsed: Duration,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let _ = (mode, elapsed);
        Box::pin(async {})
    }
}

/// Everything the three modes share: the workload, the fault plan, and how the consumers run.
/// Each mode runs on a fresh broker and a fresh ledger.
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// use idem_verify::{FaultPlan, Harness, MemoryLedger, Workload, check, default_rates};
/// let harness = Harness::new(Workload::generate(42, 10_000, 100), FaultPlan::new(42, default_rates()));
/// let store = idem::MemoryStore::new();
/// let ledger = MemoryLedger::new(&harness.workload);
/// // No store errors: the store as it is.
/// let run = harness.store(store, ledger, |store, _| store).await?;
/// assert!(check(&run).ok, "{}", check(&run).detail);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Harness {
    /// The transfers.
    pub workload: Arc<Workload>,
    /// Which faults hit which delivery.
    pub plan: FaultPlan,
    /// Competing consumers (default 8).
    pub consumers: usize,
    /// Deliveries each consumer holds at once (default 32).
    pub prefetch: usize,
    /// Batches each consumer of store and transactional mode processes at once (default 4):
    /// each batch holds up to `prefetch / concurrency` deliveries.
    pub concurrency: usize,
    /// Lease of store-mode claims (default 1 s).
    pub lease: Duration,
    /// The broker's visibility timeout: an unacked delivery comes back after it (default
    /// 500 ms).
    pub visibility_timeout: Duration,
    /// How long slow handlers and pauses last.
    pub stalls: Stalls,
    /// Give up on a mode after this long (default 300 s).
    pub timeout: Duration,
    /// A deliberately broken handler, to prove the checks catch it.
    pub sabotage: Option<Sabotage>,
    /// Makes namespaces and ledger rows of this run unique in a shared store.
    pub run_id: String,
    /// Told when each mode starts and ends.
    pub observer: Option<Arc<dyn Observer>>,
}

impl Harness {
    /// A harness for `workload` and `plan`, with the default timing.
    pub fn new(workload: Workload, plan: FaultPlan) -> Self {
        let lease = Duration::from_secs(1);
        let visibility_timeout = Duration::from_millis(500);
        Self {
            workload: Arc::new(workload),
            plan,
            consumers: 8,
            prefetch: 32,
            concurrency: 4,
            lease,
            visibility_timeout,
            stalls: Stalls::for_timing(lease, visibility_timeout),
            timeout: Duration::from_secs(300),
            sabotage: None,
            run_id: format!("{:012x}", fastrand::u64(..) >> 16),
            observer: None,
        }
    }

    /// The namespace of store mode's keys.
    ///
    /// # Errors
    /// When the run id makes an invalid namespace.
    pub fn store_namespace(&self) -> anyhow::Result<Namespace> {
        Ok(Namespace::new(format!("verify-store-{}", self.run_id))?)
    }

    /// The namespace of transactional mode's keys.
    ///
    /// # Errors
    /// When the run id makes an invalid namespace.
    pub fn transactional_namespace(&self) -> anyhow::Result<Namespace> {
        Ok(Namespace::new(format!("verify-tx-{}", self.run_id))?)
    }

    /// The executor's configuration in store mode: the lease, no attempt limit (injected
    /// crashes must never exhaust, and dead-letter, a transfer), a short retry backoff.
    pub fn store_config(&self) -> Config {
        Config::default()
            .lease(self.lease)
            .max_attempts(0)
            .retry_backoff(Backoff::new(
                Duration::from_millis(20),
                Duration::from_millis(500),
            ))
            .name("verify-store")
    }

    /// The consumer runtime's settings in store and transactional mode.
    pub fn settings(&self) -> Settings {
        let mut settings = Settings::default();
        let concurrency = self.concurrency.clamp(1, self.prefetch.max(1));
        settings.batch_size = (self.prefetch / concurrency).max(1);
        settings.concurrency = concurrency;
        // Drained consumers wait for what they still hold (frozen or slow deliveries whose
        // messages others finished): their late attempts to finish are part of the test.
        settings.shutdown_grace = self.stalls.pause + self.stalls.slow + self.lease * 4;
        settings.store_backoff =
            Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
        settings.receive_backoff =
            Backoff::new(Duration::from_millis(20), Duration::from_millis(200));
        settings.in_progress_backoff = Backoff::new(Duration::from_millis(50), self.lease);
        settings
    }

    /// Naive mode: no deduplication; every delivery applies `effect`, then acks.
    ///
    /// # Errors
    /// When the ledger cannot be read at the end.
    pub async fn naive<E: Effect>(&self, effect: E) -> anyhow::Result<RunReport> {
        let stats = Arc::new(Stats::new(self.workload.transfers.len()));
        let effect = Arc::new(effect);
        let broker = self.broker();
        let tap = self.tap(&stats);
        let consumers = (0..self.consumers)
            .map(|_| {
                let ctx = Arc::new(naive::NaiveCtx {
                    broker: broker.clone(),
                    tap: Arc::clone(&tap),
                    stats: Arc::clone(&stats),
                    effect: Arc::clone(&effect),
                    workload: Arc::clone(&self.workload),
                    stalls: self.stalls,
                    prefetch: self.prefetch,
                });
                Box::pin(naive::supervise(ctx)) as BoxFuture<'static, ()>
            })
            .collect();
        let (elapsed, unacked) = self
            .drive(ModeName::Naive, &broker, &stats, consumers)
            .await;
        // Naive's only record is the ack: every suspect is a window event.
        stats.resolve_windows(|_, _| async { Ok(false) }).await?;
        let snapshot = effect.snapshot(&self.workload).await?;
        Ok(RunReport::new(
            ModeName::Naive,
            &self.workload,
            Measured::of(&stats),
            &snapshot,
            elapsed,
            unacked,
        ))
    }

    /// Store mode on `store`, with the handler's effect in `effect`. `inject` wraps the store
    /// in the caller's store-error injection (or returns it as it is), counting each error it
    /// injects as [`Fault::StoreError`] in the counters it is given; the harness reads records
    /// back from `store` itself.
    ///
    /// # Errors
    /// When the records or the ledger cannot be read back at the end.
    pub async fn store<S, W, E, F>(
        &self,
        store: S,
        effect: E,
        inject: F,
    ) -> anyhow::Result<RunReport>
    where
        S: Store,
        W: Store,
        E: Effect,
        F: FnOnce(Arc<S>, Arc<FaultCounters>) -> W,
    {
        let stats = Arc::new(Stats::new(self.workload.transfers.len()));
        let raw = Arc::new(store);
        let store = Arc::new(inject(Arc::clone(&raw), Arc::clone(&stats.faults)));
        let namespace = self.store_namespace()?;
        let effect = Arc::new(effect);
        let broker = self.broker();
        let tap = self.tap(&stats);
        let consumers = (0..self.consumers)
            .map(|_| {
                let (store, namespace, effect, tap) = (
                    Arc::clone(&store),
                    namespace.clone(),
                    Arc::clone(&effect),
                    Arc::clone(&tap),
                );
                let harness = self.clone();
                let stats = Arc::clone(&stats);
                let broker = broker.clone();
                Box::pin(supervise(
                    broker.clone(),
                    tap.clone(),
                    stats,
                    move |inc, source| {
                        let exec = Executor::with_config(
                            Gated {
                                inner: Arc::clone(&store),
                                inc: Arc::clone(&inc),
                            },
                            harness.store_config(),
                        );
                        let ctx = Arc::new(HandlerCtx {
                            inc: Arc::clone(&inc),
                            tap: Arc::clone(&tap),
                            effect: Arc::clone(&effect),
                            workload: Arc::clone(&harness.workload),
                            stalls: harness.stalls,
                            sabotage: harness.sabotage,
                        });
                        let processor = Watched {
                            inner: Arc::new(StoreMode::new(exec, store_handler(ctx))),
                            inc,
                            tap: Arc::clone(&tap),
                            stalls: harness.stalls,
                            kind: Kind::Store,
                        };
                        let consumer =
                            Consumer::with_processor(source, processor, namespace.clone())
                                .settings(harness.settings());
                        let broker = broker.clone();
                        Box::pin(async move {
                            consumer.run(async move { broker.drained().await }).await
                        })
                    },
                )) as BoxFuture<'static, ()>
            })
            .collect();
        let (elapsed, unacked) = self
            .drive(ModeName::Store, &broker, &stats, consumers)
            .await;
        // A delivery dropped by a crash whose completion reached the store before the crash
        // took effect closed its window after all: only the others can cause a duplicate.
        stats
            .resolve_windows(|message, token| {
                let (raw, namespace) = (&raw, &namespace);
                async move {
                    let key = namespace.key(Workload::message_id(message))?;
                    let record = raw.get(&key).await?;
                    Ok(record
                        .is_some_and(|r| r.state == State::Completed && r.token == Some(token)))
                }
            })
            .await
            .context("reading the store's records back")?;
        let snapshot = effect.snapshot(&self.workload).await?;
        Ok(RunReport::new(
            ModeName::Store,
            &self.workload,
            Measured::of(&stats),
            &snapshot,
            elapsed,
            unacked,
        ))
    }

    /// Transactional mode on `ledger`'s store: the ledger's writes and the record commit in one
    /// transaction. Creates the ledger first. Installs [`quiet_simulated_crashes`].
    ///
    /// # Errors
    /// When the ledger cannot be created or read.
    pub async fn transactional<L: TransactionalLedger>(
        &self,
        ledger: L,
    ) -> anyhow::Result<RunReport> {
        quiet_simulated_crashes();
        ledger.create(&self.workload).await?;
        let stats = Arc::new(Stats::new(self.workload.transfers.len()));
        let ledger = Arc::new(ledger);
        let namespace = self.transactional_namespace()?;
        let broker = self.broker();
        let tap = self.tap(&stats);
        let consumers = (0..self.consumers)
            .map(|_| {
                let (ledger, namespace, tap) =
                    (Arc::clone(&ledger), namespace.clone(), Arc::clone(&tap));
                let harness = self.clone();
                let stats = Arc::clone(&stats);
                let broker = broker.clone();
                Box::pin(supervise(
                    broker.clone(),
                    tap.clone(),
                    stats,
                    move |inc, source| {
                        let ctx = Arc::new(HandlerCtx {
                            inc: Arc::clone(&inc),
                            tap: Arc::clone(&tap),
                            effect: Arc::clone(&ledger),
                            workload: Arc::clone(&harness.workload),
                            stalls: harness.stalls,
                            sabotage: harness.sabotage,
                        });
                        let mode = TransactionalMode::new(
                            ledger.store().clone(),
                            ledger.config().clone(),
                            tx_handler(ctx, namespace.clone()),
                        );
                        let processor = Watched {
                            inner: Arc::new(mode),
                            inc,
                            tap: Arc::clone(&tap),
                            stalls: harness.stalls,
                            kind: Kind::Transactional,
                        };
                        let consumer =
                            Consumer::with_processor(source, processor, namespace.clone())
                                .settings(harness.settings());
                        let broker = broker.clone();
                        Box::pin(async move {
                            consumer.run(async move { broker.drained().await }).await
                        })
                    },
                )) as BoxFuture<'static, ()>
            })
            .collect();
        let (elapsed, unacked) = self
            .drive(ModeName::Transactional, &broker, &stats, consumers)
            .await;
        let snapshot = ledger.snapshot(&self.workload).await?;
        Ok(RunReport::new(
            ModeName::Transactional,
            &self.workload,
            Measured::of(&stats),
            &snapshot,
            elapsed,
            unacked,
        ))
    }

    /// A fresh broker for one mode.
    fn broker(&self) -> MemoryBroker {
        MemoryBroker::new("transfers")
            .with_visibility_timeout(self.visibility_timeout)
            .keep_log(false)
    }

    fn tap(&self, stats: &Arc<Stats>) -> Arc<Tap> {
        Arc::new(Tap::new(
            self.plan.clone(),
            Arc::clone(stats),
            self.workload.transfers.len() as u32,
        ))
    }

    /// Publishes the workload (with the producer's retries) and runs the consumers until the
    /// broker is drained and they are done, or the timeout passes. Returns the time taken and
    /// how many published copies were left unacked (0 when it drained).
    async fn drive(
        &self,
        mode: ModeName,
        broker: &MemoryBroker,
        stats: &Arc<Stats>,
        consumers: Vec<BoxFuture<'static, ()>>,
    ) -> (Duration, u64) {
        let total = self.workload.transfers.len() as u64;
        if let Some(o) = &self.observer {
            o.mode_started(mode, total, stats);
        }
        let start = Instant::now();
        let producer = tokio::spawn(produce(
            broker.clone(),
            Arc::clone(&self.workload),
            self.plan.clone(),
            Arc::clone(stats),
            self.visibility_timeout,
        ));
        let mut set = JoinSet::new();
        for consumer in consumers {
            set.spawn(consumer);
        }
        let all = async {
            while let Some(done) = set.join_next().await {
                if let Err(e) = done {
                    stats.error(format!("a consumer supervisor failed: {e}"));
                }
            }
        };
        if tokio::time::timeout(self.timeout, all).await.is_err() {
            set.abort_all();
            while set.join_next().await.is_some() {}
        }
        producer.abort();
        let elapsed = start.elapsed();
        if let Some(o) = &self.observer {
            o.mode_finished(mode, elapsed).await;
        }
        (elapsed, broker.outstanding() as u64)
    }
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("messages", &self.workload.transfers.len())
            .field("plan", &self.plan)
            .field("consumers", &self.consumers)
            .field("prefetch", &self.prefetch)
            .field("concurrency", &self.concurrency)
            .field("lease", &self.lease)
            .field("visibility_timeout", &self.visibility_timeout)
            .field("stalls", &self.stalls)
            .field("run_id", &self.run_id)
            .finish_non_exhaustive()
    }
}

/// The message of transfer `i`: its id set once by the producer, the transfer as payload.
pub(crate) fn message(workload: &Workload, i: u32) -> Message {
    Message::new("transfers", workload.payload(i)).with_message_id(Workload::message_id(i))
}

/// The producer: publishes every transfer once, and again when a retry fault hits it (as after
/// a lost publish confirm: the copy arrives up to one visibility timeout later).
async fn produce(
    broker: MemoryBroker,
    workload: Arc<Workload>,
    plan: FaultPlan,
    stats: Arc<Stats>,
    spread: Duration,
) {
    for i in 0..workload.transfers.len() as u32 {
        broker.publish(message(&workload, i));
        if plan.hits(Fault::DupPublish, i, 0) {
            stats.faults.hit(Fault::DupPublish);
            broker.publish_after(
                message(&workload, i),
                spread.mul_f64(plan.detail(Fault::DupPublish, i, 0)),
            );
        }
        if i % 1024 == 1023 {
            tokio::task::yield_now().await;
        }
    }
    broker.close_publishing();
}

/// Runs one consumer of store or transactional mode, started again after every crash, until
/// it stops by itself (the broker is drained and what it held is settled).
async fn supervise<F>(broker: MemoryBroker, tap: Arc<Tap>, stats: Arc<Stats>, mut start: F)
where
    F: FnMut(Arc<Incarnation>, TapSource) -> BoxFuture<'static, Result<StatsSnapshot, BrokerError>>,
{
    loop {
        let source = broker.source();
        let inc = Arc::new(Incarnation::new(Arc::clone(&stats), source.connection()));
        let source = TapSource::new(source, Arc::clone(&inc), Arc::clone(&tap));
        let run = inc.gate(start(Arc::clone(&inc), source));
        tokio::select! {
            biased;
            () = inc.crash.notify.notified() => {
                // Dropping the consumer aborts every task it runs.
                stats.restarts.fetch_add(1, Ordering::Relaxed);
            }
            done = run => {
                if let Err(e) = done {
                    stats.error(format!("a consumer stopped: {e}"));
                }
                return;
            }
        }
    }
}
