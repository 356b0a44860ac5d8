//! One consumer process of `verify --broker`: `idem __verify-consumer --spec FILE ...`, started
//! (and killed, and started again) by `verify`.
//!
//! It consumes one mode's queue through `verify`'s proxy with the real adapter, wrapped in
//! [`Tap`], which numbers and logs every delivery and every settlement (see [`super::log`]):
//! - `naive`: a plain at-least-once consumer: apply, then ack. No idem.
//! - `store`: [`idem_broker::Consumer`] over the store (any store URL; shared by all the
//!   processes); the effect is an append to this process's log, outside the store.
//! - `transactional`: receive, [`SqliteLedger::apply_once`] (ledger writes and idem's record in
//!   one SQLite transaction, in the file all processes share), ack or nack from the outcome.
//!
//! **Planned crash points** (the `--crash-*-rate` faults) are real: the process logs a `K` line
//! and SIGKILLs itself, before the effect, after it (in transactional mode: inside the
//! transaction, before the commit), or after `complete` and before the ack. The decision is a
//! hash of the seed, the transfer, the broker's delivery count and this process's number, so a
//! redelivery to a fresh process decides anew and a crash never repeats forever.
//!
//! **Stopping**: when its standard input closes (`verify` is done with it, or `verify` died),
//! the consumer stops taking messages, settles what it holds and exits.

use std::collections::HashSet;
use std::convert::Infallible;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::future::join_all;
use idem::{Acquisition, AnyStore, Attempt, Backoff, Config, Disposition, Executor, Namespace};
use idem_broker::{Acker, BrokerError, Consumer, Incoming, Message, Settings, Source};
use idem_sqlite::SqliteStore;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use super::log::LogWriter;
use super::ops;
use super::spec::{BrokerUrl, ConsumerSpec};
use crate::store_url::{OpenOptions, StoreUrl};
use crate::verify::faults::{CrashPoint, Fault, FaultPlan, PerFault};
use crate::verify::ledger::{CrashHook, DieInTransaction, TransferJob, apply_in_transaction};
use crate::verify::report::ModeName;
use crate::verify::workload::Workload;

/// The header the tap adds to each delivery: its number in this process.
const SEQ_HEADER: &str = "x-idem-verify-seq";

/// `idem __verify-consumer`: arguments given by `verify`.
#[derive(clap::Args, Debug)]
pub(crate) struct ChildArgs {
    /// The consumer spec (JSON) written by `verify`.
    #[arg(long)]
    spec: PathBuf,
    /// Which consumer slot this process fills.
    #[arg(long)]
    slot: usize,
    /// This process's number among all the mode's consumer processes, from 1.
    #[arg(long)]
    incarnation: u32,
    /// The log to append to.
    #[arg(long)]
    log: PathBuf,
}

/// What the tap, the handlers and the settlement share.
struct Ctx {
    spec: ConsumerSpec,
    log: LogWriter,
    plan: FaultPlan,
    incarnation: u32,
    workload: Workload,
    next_seq: AtomicU64,
    /// Deliveries whose handler ran (a crash "after complete" needs one).
    executed: Mutex<HashSet<u64>>,
}

impl Ctx {
    /// Appends to the log. A consumer that cannot write its evidence stops at once: `verify`
    /// would count what it did wrongly.
    fn log(&self, text: &str) {
        if let Err(e) = self.log.write(text) {
            eprintln!("error: cannot write the consumer log: {e}");
            std::process::exit(2);
        }
    }

    /// Logs the planned crash point and SIGKILLs this process.
    fn die(&self, fault: Fault, msg: u32, seq: u64) -> ! {
        self.log(&format!("K {} {msg} {seq}\n", fault.name()));
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        // Unreachable: SIGKILL cannot be caught or ignored.
        std::process::abort()
    }

    fn crash_point(&self, msg: u32, count: u32) -> Option<CrashPoint> {
        // The process number makes each process decide anew: MQTT reports every redelivery as
        // delivery 2, which alone would crash a message's consumers forever.
        let delivery = self
            .incarnation
            .wrapping_mul(1_000)
            .wrapping_add(count.min(999));
        self.plan.for_delivery(msg, delivery).crash
    }

    fn transfer_of(&self, message: &Message) -> Option<u32> {
        let id = message.message_id()?;
        let n: u32 = id.strip_prefix("t-")?.parse().ok()?;
        (n < self.spec.messages).then_some(n)
    }

    fn seq_of(message: &Message) -> u64 {
        message
            .header(SEQ_HEADER)
            .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
            .unwrap_or(0)
    }

    fn ran(&self, seq: u64) {
        self.executed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(seq);
    }

    fn take_ran(&self, seq: u64) -> bool {
        self.executed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&seq)
    }

    /// The effect of naive and store mode: one appended line, with the crash points around it.
    fn apply(&self, message: &Message, token: u64) {
        let seq = Self::seq_of(message);
        let Some(msg) = self.transfer_of(message) else {
            return;
        };
        let crash = self.crash_point(msg, message.delivery_count());
        if crash == Some(CrashPoint::BeforeEffect) {
            self.die(Fault::CrashBefore, msg, seq);
        }
        self.log(&format!("E {msg} {seq} {token}\n"));
        self.ran(seq);
        if crash == Some(CrashPoint::AfterEffect) {
            self.die(Fault::CrashAfterEffect, msg, seq);
        }
    }
}

pub(crate) async fn run(args: ChildArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.spec)
        .with_context(|| format!("reading {}", args.spec.display()))?;
    let mut spec: ConsumerSpec =
        serde_json::from_str(&text).context("parsing the consumer spec")?;
    spec.store = std::env::var(super::fleet::STORE_ENV).unwrap_or_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IDEM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let mut rates = PerFault::default();
    rates.set(Fault::CrashBefore, spec.settings.crash_before_rate);
    rates.set(
        Fault::CrashAfterEffect,
        spec.settings.crash_after_effect_rate,
    );
    rates.set(
        Fault::CrashAfterComplete,
        spec.settings.crash_after_complete_rate,
    );
    let ctx = Arc::new(Ctx {
        plan: FaultPlan::new(spec.seed, rates),
        workload: Workload::generate(spec.seed, spec.messages, spec.accounts),
        log: LogWriter::open(&args.log)
            .with_context(|| format!("opening {}", args.log.display()))?,
        incarnation: args.incarnation,
        next_seq: AtomicU64::new(1),
        executed: Mutex::new(HashSet::new()),
        spec,
    });
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        // Standard input closes when verify is done with this process, or is gone.
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
        let _ = stop_tx.send(true);
    });
    let spec = &ctx.spec;
    let url = BrokerUrl::parse(&spec.url)?;
    let (names, settings, slot) = (&spec.names, &spec.settings, args.slot);
    let source = connect(&stop, || ops::connect_source(&url, names, settings, slot)).await?;
    consume(source, Arc::clone(&ctx), stop).await?;
    Ok(ExitCode::SUCCESS)
}

/// Connects, retrying while the broker is restarting or the proxy cuts connections.
async fn connect<S, F, Fut>(stop: &watch::Receiver<bool>, mut open: F) -> anyhow::Result<S>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<S, BrokerError>>,
{
    let backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut failures = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(15), open()).await {
            Ok(Ok(source)) => return Ok(source),
            Ok(Err(e)) if tokio::time::Instant::now() >= deadline || *stop.borrow() => {
                return Err(e).context("connecting to the broker");
            }
            Err(_) if tokio::time::Instant::now() >= deadline || *stop.borrow() => {
                anyhow::bail!("connecting to the broker timed out");
            }
            _ => {
                failures += 1;
                tokio::time::sleep(backoff.delay(failures)).await;
            }
        }
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

async fn consume<S: Source>(
    source: S,
    ctx: Arc<Ctx>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    ctx.log("R\n");
    let tap = Tap {
        inner: source,
        ctx: Arc::clone(&ctx),
    };
    match ctx.spec.mode {
        ModeName::Naive => {
            settle_loop(tap, &ctx, stop, |ctx, incoming| async move {
                ctx.apply(&incoming.message, 0);
                (incoming, Some(Disposition::Ack))
            })
            .await
        }
        ModeName::Transactional => run_transactional_mode(tap, &ctx, stop).await,
        ModeName::Store => run_store_mode(tap, &ctx, stop).await,
    }
}

/// Store mode: idem's own consumer runtime.
async fn run_store_mode<S: Source>(
    tap: Tap<S>,
    ctx: &Arc<Ctx>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let url: StoreUrl = ctx.spec.store.parse()?;
    let opened = url.open(OpenOptions::default()).await?;
    let store = with_store!(opened, store => AnyStore::new(store));
    let s = ctx.spec.settings;
    let exec = Executor::with_config(
        store,
        Config::default()
            .lease(s.lease())
            // No attempt limit: kills must never exhaust (and dead-letter) a transfer.
            .max_attempts(0)
            .retry_backoff(Backoff::new(
                Duration::from_millis(20),
                Duration::from_millis(500),
            ))
            .name("verify-store"),
    );
    let handler_ctx = Arc::clone(ctx);
    let handler = move |message: Message, attempt: Attempt| {
        let ctx = Arc::clone(&handler_ctx);
        async move {
            if attempt.acquisition() == Acquisition::Takeover {
                ctx.log("T\n");
            }
            ctx.apply(&message, attempt.token().as_raw());
            Ok::<(), Infallible>(())
        }
    };
    let namespace = Namespace::new(format!("verify-store-{}", ctx.spec.run_id))?;
    Consumer::new(tap, exec, namespace, handler)
        .settings(runtime_settings(ctx))
        .run(stopped(stop))
        .await?;
    Ok(())
}

/// The runtime's settings in both idem modes.
fn runtime_settings(ctx: &Ctx) -> Settings {
    let s = ctx.spec.settings;
    let mut settings = Settings::default();
    settings.batch_size = s.prefetch.max(1);
    settings.concurrency = 2;
    settings.shutdown_grace = Duration::from_secs(5);
    settings.store_backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    settings.receive_backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    settings.in_progress_backoff = Backoff::new(Duration::from_millis(100), s.lease());
    settings
}

/// Transactional mode: idem's runtime over the SQLite store all processes share; the ledger's
/// writes and idem's record commit in one transaction, then the delivery is acked.
async fn run_transactional_mode<S: Source>(
    tap: Tap<S>,
    ctx: &Arc<Ctx>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let store = SqliteStore::open(&ctx.spec.store)
        .with_context(|| format!("opening {}", ctx.spec.store))?;
    let config = Config::default()
        // No attempt limit: kills must never exhaust (and dead-letter) a transfer.
        .max_attempts(0)
        .retry_backoff(Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(500),
        ))
        .name("verify-transactional");
    let run: Arc<str> = ctx.spec.run_id.as_str().into();
    let namespace = Namespace::new(format!("verify-tx-{}", ctx.spec.run_id))?;
    let handler_ctx = Arc::clone(ctx);
    let consumer = Consumer::transactional(
        tap,
        store,
        config,
        namespace,
        move |message: &Message, conn: &mut rusqlite::Connection| {
            let job = transfer_job(&handler_ctx, message);
            let (ctx, run) = (Arc::clone(&handler_ctx), Arc::clone(&run));
            let seq = Ctx::seq_of(message);
            Box::pin(async move {
                // Not a verify transfer: nothing to write (the tap logged it as an error).
                let Some(job) = job else {
                    return Ok(());
                };
                apply_in_transaction(conn, &run, &job).map_err(|e| e.to_string())?;
                ctx.ran(seq);
                Ok::<(), String>(())
            })
        },
    )
    .settings(runtime_settings(ctx));
    let counts = tokio::spawn(log_outcomes(Arc::clone(ctx), consumer.stats()));
    let result = consumer.run(stopped(stop)).await;
    counts.abort();
    let _ = counts.await;
    result?;
    Ok(())
}

/// Logs the runtime's executed and replayed counts as they grow (`O executed N` lines).
async fn log_outcomes(ctx: Arc<Ctx>, stats: Arc<idem_broker::Stats>) {
    let mut logged = (0, 0);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = stats.snapshot();
        let (executed, replayed) = (now.executed - logged.0, now.replayed - logged.1);
        let mut lines = String::new();
        if executed > 0 {
            lines.push_str(&format!("O executed {executed}\n"));
        }
        if replayed > 0 {
            lines.push_str(&format!("O replayed {replayed}\n"));
        }
        if !lines.is_empty() {
            ctx.log(&lines);
        }
        logged = (now.executed, now.replayed);
    }
}

/// The transfer a delivery carries, with this delivery's planned crash inside the transaction;
/// `None` for a message that is not a verify transfer.
fn transfer_job(ctx: &Arc<Ctx>, message: &Message) -> Option<TransferJob> {
    let seq = Ctx::seq_of(message);
    let msg = ctx.transfer_of(message)?;
    let die = match ctx.crash_point(msg, message.delivery_count()) {
        Some(CrashPoint::BeforeEffect) => Some(DieInTransaction::BeforeWrites),
        Some(CrashPoint::AfterEffect) => Some(DieInTransaction::AfterWrites),
        _ => None,
    };
    let fault = if die == Some(DieInTransaction::BeforeWrites) {
        Fault::CrashBefore
    } else {
        Fault::CrashAfterEffect
    };
    let hook_ctx = Arc::clone(ctx);
    Some(TransferJob {
        // The runtime keys the message by its id; the job's key is not used on this path.
        key: Namespace::new("verify-tx")
            .ok()?
            .key(Workload::message_id(msg))
            .ok()?,
        payload: ctx.workload.payload(msg),
        index: msg,
        transfer: ctx.workload.transfers[msg as usize],
        applications: 1,
        die,
        died: Arc::new(AtomicBool::new(false)),
        // Inside the transaction, on SQLite's writer thread: the whole process dies there.
        crash: CrashHook::new(move || hook_ctx.die(fault, msg, seq)),
    })
}

/// The consumer loop of naive mode: receive a batch, decide every delivery
/// (concurrently), then settle. `decide` returns `None` for a message that is not a verify
/// transfer: it is acked so that it does not come back, and logged as an error.
async fn settle_loop<S, F, Fut>(
    mut tap: Tap<S>,
    ctx: &Arc<Ctx>,
    stop: watch::Receiver<bool>,
    decide: F,
) -> anyhow::Result<()>
where
    S: Source,
    F: Fn(Arc<Ctx>, Incoming<TapDelivery<S::Delivery>>) -> Fut,
    Fut: Future<Output = (Incoming<TapDelivery<S::Delivery>>, Option<Disposition>)>,
{
    let acker = tap.acker();
    let backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let mut failures = 0;
    let prefetch = ctx.spec.settings.prefetch.max(1);
    let mut stopping = std::pin::pin!(stopped(stop));
    loop {
        let batch = tokio::select! {
            biased;
            () = &mut stopping => break,
            batch = tap.receive(prefetch) => batch,
        };
        let batch = match batch {
            Ok(batch) => {
                failures = 0;
                batch
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "receive failed; retrying");
                tokio::time::sleep(backoff.delay(failures)).await;
                continue;
            }
        };
        let decided = join_all(
            batch
                .into_iter()
                .map(|incoming| decide(Arc::clone(ctx), incoming)),
        )
        .await;
        let mut acks = Vec::new();
        let mut later = Vec::new();
        for (incoming, disposition) in decided {
            match disposition.unwrap_or(Disposition::Ack) {
                Disposition::Ack => acks.push(incoming.delivery),
                Disposition::Retry { after } => later.push((incoming.delivery, after)),
                Disposition::DeadLetter { reason } => {
                    let _ = acker
                        .dead_letter(incoming.delivery, &incoming.message, &reason)
                        .await;
                }
            }
        }
        let nacks = join_all(later.into_iter().map(|(d, after)| acker.nack(d, after)));
        let (acked, _) = tokio::join!(acker.ack(acks), nacks);
        if let Err(e) = acked {
            tracing::warn!(error = %e, "ack failed; the broker redelivers");
        }
    }
    tap.close().await;
    Ok(())
}

/// The adapter's source, numbering and logging every delivery.
struct Tap<S> {
    inner: S,
    ctx: Arc<Ctx>,
}

/// A delivery through the [`Tap`].
struct TapDelivery<D> {
    inner: D,
    seq: u64,
    msg: u32,
    crash_after_complete: bool,
}

/// Settles through the adapter's acker, logging what the broker took.
struct TapAcker<A> {
    inner: A,
    ctx: Arc<Ctx>,
}

impl<A: Clone> Clone for TapAcker<A> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            ctx: Arc::clone(&self.ctx),
        }
    }
}

impl<S: Source> Source for Tap<S> {
    type Delivery = TapDelivery<S::Delivery>;
    type Acker = TapAcker<S::Acker>;

    fn acker(&self) -> Self::Acker {
        TapAcker {
            inner: self.inner.acker(),
            ctx: Arc::clone(&self.ctx),
        }
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<Incoming<Self::Delivery>>, BrokerError> {
        let batch = self.inner.receive(max).await?;
        let mut lines = String::new();
        let out = batch
            .into_iter()
            .map(|Incoming { message, delivery }| {
                let seq = self.ctx.next_seq.fetch_add(1, Ordering::Relaxed);
                let count = message.delivery_count();
                let msg = self.ctx.transfer_of(&message);
                let crash = match msg {
                    Some(m) => {
                        lines.push_str(&format!("D {m} {seq} {count}\n"));
                        self.ctx.crash_point(m, count)
                    }
                    None => {
                        lines.push_str(&format!(
                            "! a message that is not a verify transfer: id {:?}\n",
                            message.message_id()
                        ));
                        None
                    }
                };
                let message = message.with_header(SEQ_HEADER, seq.to_string());
                Incoming::new(
                    message,
                    TapDelivery {
                        inner: delivery,
                        seq,
                        msg: msg.unwrap_or(u32::MAX),
                        crash_after_complete: crash == Some(CrashPoint::AfterComplete),
                    },
                )
            })
            .collect();
        self.ctx.log(&lines);
        Ok(out)
    }

    async fn close(self) {
        self.inner.close().await;
    }
}

impl<A: Acker> Acker for TapAcker<A> {
    type Delivery = TapDelivery<A::Delivery>;

    async fn ack(&self, deliveries: Vec<Self::Delivery>) -> Result<(), BrokerError> {
        if deliveries.is_empty() {
            return Ok(());
        }
        for d in &deliveries {
            // After `complete` (or the commit) was durable, before the ack.
            if d.crash_after_complete && self.ctx.take_ran(d.seq) {
                self.ctx.die(Fault::CrashAfterComplete, d.msg, d.seq);
            }
        }
        let seqs: Vec<u64> = deliveries.iter().map(|d| d.seq).collect();
        for seq in &seqs {
            self.ctx.take_ran(*seq);
        }
        let result = self
            .inner
            .ack(deliveries.into_iter().map(|d| d.inner).collect())
            .await;
        let tag = if result.is_ok() { 'A' } else { 'F' };
        let lines: String = seqs.iter().map(|s| format!("{tag} {s}\n")).collect();
        self.ctx.log(&lines);
        result
    }

    async fn nack(&self, delivery: Self::Delivery, delay: Duration) -> Result<(), BrokerError> {
        self.ctx.take_ran(delivery.seq);
        let seq = delivery.seq;
        let result = self.inner.nack(delivery.inner, delay).await;
        self.ctx.log(&format!("N {seq}\n"));
        result
    }

    async fn dead_letter(
        &self,
        delivery: Self::Delivery,
        message: &Message,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let seq = delivery.seq;
        self.inner
            .dead_letter(delivery.inner, message, reason)
            .await?;
        self.ctx.log(&format!("L {seq}\n"));
        Ok(())
    }

    async fn progress(&self, deliveries: &[&Self::Delivery]) -> Result<(), BrokerError> {
        let inner: Vec<&A::Delivery> = deliveries.iter().map(|d| &d.inner).collect();
        self.inner.progress(&inner).await
    }

    fn progress_interval(&self) -> Option<Duration> {
        self.inner.progress_interval()
    }
}
