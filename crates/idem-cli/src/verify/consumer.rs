//! Consumers: supervised tasks that take deliveries from a [`Broker`], process them in one of
//! the three modes with the planned faults, and ack or nack.
//!
//! A consumer processes up to `prefetch` deliveries at once, each in its own task. A simulated
//! **crash** aborts the consumer with every delivery it holds in flight (nothing is acked; the
//! broker redelivers after the visibility timeout), and its supervisor starts a fresh one. A
//! **pause** freezes the whole consumer, as a long GC or a VM stall freezes a process: none of
//! its tasks is polled, so no heartbeat extends any of its leases, and it neither receives nor
//! crashes until it thaws and tries to finish what it held.
//!
//! **Window events** are measured, not inferred: each delivery tracks whether it has applied
//! its effect and not yet recorded it (store mode: `complete` confirmed; naive mode: acked;
//! transactional mode never has such a state, the effect and the record commit together). A
//! delivery interrupted in that state (a crash aborts it, a pause ends with another consumer
//! holding the key, its lease is lost, its completion fails) is a *suspect*. After the run, a
//! suspect whose own completion landed anyway (sent to the store just before the crash) closed
//! its window; every other suspect is one window event: the one case in which store mode may
//! repeat an effect.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::ready;
use std::time::Duration;

use idem::{Acquisition, Backoff, Disposition, Executor, Key, Namespace, Outcome, Store, Token};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};

use super::faults::{CrashPoint, ErrorSide, Fault, FaultCounters, FaultPlan, Faults};
use super::harness::{Broker, Delivery};
use super::ledger::{
    CrashHook, DieInTransaction, MemoryLedger, Sabotage, Settled, TransactionalLedger, TransferJob,
};
use super::workload::Workload;

/// Why a window event happened.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Window {
    /// A crash aborted a delivery between its effect and its record.
    Crash,
    /// A delivery of a consumer that was paused thawed to find that another consumer had taken
    /// over.
    PauseTakeover,
    /// Anything else that ended a delivery between its effect and its record: a lease lost
    /// without a pause (a late heartbeat), a completion that failed after its retries.
    Other,
}

/// Counters of one mode's run, shared by all its tasks.
#[derive(Debug)]
pub(crate) struct Stats {
    deliveries: Vec<AtomicU32>,
    acked: Vec<AtomicBool>,
    acked_count: AtomicU64,
    outcomes: Mutex<BTreeMap<&'static str, u64>>,
    pub(crate) faults: Arc<FaultCounters>,
    suspects: Mutex<Vec<Suspect>>,
    windows: [AtomicU64; 3],
    /// Window events per message, for the per-message check.
    windows_by_message: Mutex<BTreeMap<u32, u32>>,
    takeovers: AtomicU64,
    restarts: AtomicU64,
    dead_letters: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Stats {
    pub(crate) fn new(messages: usize) -> Self {
        Self {
            deliveries: (0..messages).map(|_| AtomicU32::new(0)).collect(),
            acked: (0..messages).map(|_| AtomicBool::new(false)).collect(),
            acked_count: AtomicU64::new(0),
            outcomes: Mutex::new(BTreeMap::new()),
            faults: Arc::new(FaultCounters::default()),
            suspects: Mutex::new(Vec::new()),
            windows: Default::default(),
            windows_by_message: Mutex::new(BTreeMap::new()),
            takeovers: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
        }
    }

    /// Counts a delivery of `message`; returns its number, from 1.
    fn delivered(&self, message: u32) -> u32 {
        self.deliveries[message as usize].fetch_add(1, Ordering::Relaxed) + 1
    }

    fn outcome(&self, kind: &'static str) {
        *self
            .outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default() += 1;
    }

    fn suspect(&self, suspect: Suspect) {
        self.suspects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(suspect);
    }

    /// Turns the suspects into window events: those whose own completion did not land.
    /// `landed(message, token)` asks the store whether `token` completed `message`'s record.
    ///
    /// # Errors
    /// When `landed` fails.
    pub(crate) async fn resolve_windows<F, Fut>(&self, landed: F) -> anyhow::Result<()>
    where
        F: Fn(u32, Token) -> Fut,
        Fut: Future<Output = anyhow::Result<bool>>,
    {
        let suspects =
            std::mem::take(&mut *self.suspects.lock().unwrap_or_else(|e| e.into_inner()));
        let mut by_message = BTreeMap::new();
        for s in suspects {
            let closed = match s.token {
                Some(token) => landed(s.message, token).await?,
                None => false,
            };
            if !closed {
                self.windows[s.why as usize].fetch_add(1, Ordering::Relaxed);
                *by_message.entry(s.message).or_insert(0) += 1;
            }
        }
        *self
            .windows_by_message
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = by_message;
        Ok(())
    }

    /// Window events per message (after [`Stats::resolve_windows`]).
    pub(crate) fn windows_by_message(&self) -> BTreeMap<u32, u32> {
        self.windows_by_message
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn error(&self, what: String) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.len() < 10 {
            errors.push(what);
        }
    }

    /// Messages acked at least once: the progress bar's count.
    pub(crate) fn acked(&self) -> u64 {
        self.acked_count.load(Ordering::Relaxed)
    }

    /// Deliveries so far.
    pub(crate) fn total_deliveries(&self) -> u64 {
        self.deliveries
            .iter()
            .map(|d| u64::from(d.load(Ordering::Relaxed)))
            .sum()
    }

    /// Deliveries beyond the first of each message.
    pub(crate) fn duplicate_deliveries(&self) -> u64 {
        self.deliveries
            .iter()
            .map(|d| u64::from(d.load(Ordering::Relaxed).saturating_sub(1)))
            .sum()
    }

    pub(crate) fn outcomes(&self) -> BTreeMap<&'static str, u64> {
        self.outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn windows(&self, why: Window) -> u64 {
        self.windows[why as usize].load(Ordering::Relaxed)
    }

    pub(crate) fn takeovers(&self) -> u64 {
        self.takeovers.load(Ordering::Relaxed)
    }

    pub(crate) fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    pub(crate) fn dead_letters(&self) -> u64 {
        self.dead_letters.load(Ordering::Relaxed)
    }

    pub(crate) fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A delivery interrupted with its effect applied and not recorded.
#[derive(Clone, Copy, Debug)]
struct Suspect {
    message: u32,
    /// The claim's token (store mode), to ask the store whether its completion landed anyway.
    token: Option<Token>,
    why: Window,
}

const IDLE: u8 = 0;
/// The effect is applied and not recorded yet.
const PENDING: u8 = 1;

/// Where one delivery stands. Dropped with an effect pending (the task was aborted by a
/// crash), it reports a crash suspect.
struct Phase<'a> {
    state: AtomicU8,
    /// The raw token of the claim the effect ran under; 0 for none.
    token: AtomicU64,
    message: u32,
    stats: &'a Stats,
}

impl Phase<'_> {
    fn suspect(&self, why: Window) {
        if self.state.swap(IDLE, Ordering::Relaxed) == PENDING {
            let token = self.token.load(Ordering::Relaxed);
            self.stats.suspect(Suspect {
                message: self.message,
                token: (token != 0).then(|| Token::from_raw(token)),
                why,
            });
        }
    }
}

impl Drop for Phase<'_> {
    fn drop(&mut self) {
        self.suspect(Window::Crash);
    }
}

/// What a mode sees of the delivery it handles.
pub(crate) struct Ctx<'a> {
    pub(crate) message: u32,
    pub(crate) delivery: u32,
    pub(crate) faults: Faults,
    pub(crate) stats: &'a Stats,
    phase: &'a Phase<'a>,
    crash: &'a CrashSignal,
    freeze: &'a Freeze,
    /// The consumer's freeze count when this delivery started.
    freezes_before: u64,
}

impl Ctx<'_> {
    /// The effect was applied (under the claim holding `token`, in store mode); it is not
    /// recorded yet.
    pub(crate) fn applied(&self, token: Option<Token>) {
        self.phase
            .token
            .store(token.map_or(0, Token::as_raw), Ordering::Relaxed);
        self.phase.state.store(PENDING, Ordering::Relaxed);
    }

    /// The effect is recorded (or nothing was pending).
    pub(crate) fn recorded(&self) {
        self.phase.state.store(IDLE, Ordering::Relaxed);
    }

    /// The delivery ends with its effect (if one is pending) not recorded: a suspect.
    pub(crate) fn window(&self, why: Window) {
        self.phase.suspect(why);
    }

    /// Crashes the consumer: signals its supervisor and never returns; the abort that follows
    /// drops this delivery wherever it stands.
    pub(crate) async fn crash(&self, fault: Fault) -> Infallible {
        if !self.crash.fired.swap(true, Ordering::Relaxed) {
            self.stats.faults.hit(fault);
            self.crash.notify.notify_one();
        }
        std::future::pending().await
    }

    /// A slow handler: sleeps while the consumer goes on (the heartbeat keeps beating).
    async fn slow(&self, how_long: Duration) {
        self.stats.faults.hit(Fault::Slow);
        tokio::time::sleep(how_long).await;
    }

    /// Freezes the whole consumer for `how_long`, then carries on.
    async fn pause(&self, how_long: Duration) {
        self.stats.faults.hit(Fault::Pause);
        self.freeze.start(how_long);
        // Yield so that the freeze takes hold before this task goes on.
        tokio::task::yield_now().await;
    }

    /// Whether the consumer was frozen while this delivery was in flight.
    fn was_frozen(&self) -> bool {
        self.freeze.count() != self.freezes_before
    }
}

/// How a delivery crashes its consumer.
#[derive(Debug, Default)]
struct CrashSignal {
    notify: Notify,
    /// Set by the first crash: deliveries that reach a crash point while the consumer is going
    /// down anyway do not count as crashes of their own.
    fired: AtomicBool,
}

/// A consumer's pause: until when it is frozen, and how many times it froze.
#[derive(Debug, Default)]
struct Freeze {
    until: Mutex<Option<Instant>>,
    count: AtomicU64,
}

impl Freeze {
    fn start(&self, how_long: Duration) {
        let until = Instant::now() + how_long;
        let mut current = self.until.lock().unwrap_or_else(|e| e.into_inner());
        *current = Some(current.map_or(until, |c| c.max(until)));
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// When the freeze ends, if the consumer is frozen now.
    fn until(&self) -> Option<Instant> {
        if self.count() == 0 {
            // Most consumers never freeze: no lock on every poll of every delivery.
            return None;
        }
        let until = *self.until.lock().unwrap_or_else(|e| e.into_inner());
        until.filter(|&u| u > Instant::now())
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Runs `work`, never polling it while the consumer is frozen: its timers may fire, but
/// nothing runs (no heartbeat, no ack, no crash) until the freeze ends.
fn unless_frozen<F: Future>(freeze: Arc<Freeze>, work: F) -> impl Future<Output = F::Output> {
    let mut work = Box::pin(work);
    let mut thaw: Option<Pin<Box<Sleep>>> = None;
    std::future::poll_fn(move |cx| {
        while let Some(until) = freeze.until() {
            let sleep = thaw.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            if sleep.deadline() != until {
                sleep.as_mut().reset(until);
            }
            ready!(sleep.as_mut().poll(cx));
        }
        work.as_mut().poll(cx)
    })
}

/// What a mode decided about a delivery.
#[derive(Debug)]
pub(crate) struct Handled {
    pub(crate) disposition: Disposition,
    /// Whether this delivery ran the effect and recorded it (a crash "after complete" applies).
    pub(crate) executed: bool,
}

impl Handled {
    fn retry(after: Duration) -> Self {
        Self {
            disposition: Disposition::Retry { after },
            executed: false,
        }
    }
}

impl From<Settled> for Handled {
    fn from(s: Settled) -> Self {
        Self {
            executed: s.is_executed(),
            disposition: s.disposition,
        }
    }
}

/// How a delivery is processed: naive, store or transactional.
pub(crate) trait Mode: Send + Sync + 'static {
    fn handle(&self, ctx: &Ctx<'_>) -> impl Future<Output = Handled> + Send;
}

/// Timings of the slow and pause faults.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stalls {
    pub(crate) slow: Duration,
    pub(crate) pause: Duration,
}

/// Backoff after a transient store error (fail closed: nack, retry later).
fn store_error_backoff(delivery: u32) -> Duration {
    Backoff::new(Duration::from_millis(20), Duration::from_millis(500)).delay(delivery)
}

/// The key of the delivery's message. Ids are generated and always valid, so an error is a
/// harness bug: counted (it fails the run), and the delivery is retried.
fn key_of(namespace: &Namespace, ctx: &Ctx<'_>) -> Option<Key> {
    match namespace.key(Workload::message_id(ctx.message)) {
        Ok(key) => Some(key),
        Err(e) => {
            ctx.stats.error(format!("message {}: {e}", ctx.message));
            None
        }
    }
}

/// No deduplication: every delivery applies the effect, then acks.
pub(crate) struct Naive {
    pub(crate) workload: Arc<Workload>,
    pub(crate) ledger: Arc<MemoryLedger>,
    pub(crate) stalls: Stalls,
}

impl Mode for Naive {
    async fn handle(&self, ctx: &Ctx<'_>) -> Handled {
        let f = ctx.faults;
        if f.crash == Some(CrashPoint::BeforeEffect) {
            match ctx.crash(Fault::CrashBefore).await {}
        }
        if f.slow {
            ctx.slow(self.stalls.slow).await;
        }
        let i = ctx.message;
        self.ledger.apply(i, self.workload.transfers[i as usize]);
        ctx.applied(None);
        ctx.stats.outcome("applied");
        if f.crash == Some(CrashPoint::AfterEffect) {
            match ctx.crash(Fault::CrashAfterEffect).await {}
        }
        if f.pause {
            ctx.pause(self.stalls.pause).await;
        }
        Handled {
            disposition: Disposition::Ack,
            executed: true,
        }
    }
}

/// idem's store mode: [`Executor::run`] over the store; the ledger is outside the store.
pub(crate) struct StoreMode<S> {
    pub(crate) exec: Executor<S>,
    pub(crate) namespace: Namespace,
    pub(crate) workload: Arc<Workload>,
    pub(crate) ledger: Arc<MemoryLedger>,
    pub(crate) stalls: Stalls,
    pub(crate) sabotage: Option<Sabotage>,
}

impl<S: Store> Mode for StoreMode<S> {
    async fn handle(&self, ctx: &Ctx<'_>) -> Handled {
        let f = ctx.faults;
        let i = ctx.message;
        let Some(key) = key_of(&self.namespace, ctx) else {
            return Handled::retry(Duration::from_secs(1));
        };
        let payload = self.workload.payload(i);
        let handler = |attempt: idem::Attempt| async move {
            if attempt.acquisition() == Acquisition::Takeover {
                ctx.stats.takeovers.fetch_add(1, Ordering::Relaxed);
            }
            if f.crash == Some(CrashPoint::BeforeEffect) {
                match ctx.crash(Fault::CrashBefore).await {}
            }
            if f.slow {
                ctx.slow(self.stalls.slow).await;
            }
            for _ in 0..Sabotage::applications(self.sabotage, i) {
                self.ledger.apply(i, self.workload.transfers[i as usize]);
            }
            ctx.applied(Some(attempt.token()));
            if f.crash == Some(CrashPoint::AfterEffect) {
                match ctx.crash(Fault::CrashAfterEffect).await {}
            }
            if f.pause {
                ctx.pause(self.stalls.pause).await;
            }
            Ok::<(), Infallible>(())
        };
        match self.exec.run(key, payload.as_bytes(), handler).await {
            Ok(outcome) => {
                ctx.stats.outcome(outcome.kind());
                match &outcome {
                    Outcome::Executed(()) => ctx.recorded(),
                    Outcome::LeaseLost { .. } if ctx.was_frozen() => {
                        ctx.window(Window::PauseTakeover);
                    }
                    _ => ctx.window(Window::Other),
                }
                Handled::from(Settled::of(&outcome))
            }
            Err(_) => {
                // Fail closed: the store did not confirm; do not ack.
                ctx.stats.outcome("store_error");
                ctx.window(Window::Other);
                Handled::retry(store_error_backoff(ctx.delivery))
            }
        }
    }
}

/// idem's transactional mode: the ledger's writes and the record commit in one transaction.
pub(crate) struct TransactionalMode<L> {
    pub(crate) ledger: Arc<L>,
    pub(crate) namespace: Namespace,
    pub(crate) workload: Arc<Workload>,
    pub(crate) stalls: Stalls,
    pub(crate) sabotage: Option<Sabotage>,
}

impl<L: TransactionalLedger> Mode for TransactionalMode<L> {
    async fn handle(&self, ctx: &Ctx<'_>) -> Handled {
        let f = ctx.faults;
        let i = ctx.message;
        // The handler runs inside the store's write transaction, where it must not sleep: slow
        // work and pauses happen before it.
        if f.slow {
            ctx.slow(self.stalls.slow).await;
        }
        if f.pause {
            ctx.pause(self.stalls.pause).await;
        }
        if f.store_error == Some(ErrorSide::Before) {
            ctx.stats.faults.hit(Fault::StoreError);
            ctx.stats.outcome("store_error");
            return Handled::retry(store_error_backoff(ctx.delivery));
        }
        let Some(key) = key_of(&self.namespace, ctx) else {
            return Handled::retry(Duration::from_secs(1));
        };
        let die = match f.crash {
            Some(CrashPoint::BeforeEffect) => Some(DieInTransaction::BeforeWrites),
            Some(CrashPoint::AfterEffect) => Some(DieInTransaction::AfterWrites),
            _ => None,
        };
        let died = Arc::new(AtomicBool::new(false));
        let job = TransferJob {
            key,
            payload: self.workload.payload(i),
            index: i,
            transfer: self.workload.transfers[i as usize],
            applications: Sabotage::applications(self.sabotage, i),
            die,
            died: Arc::clone(&died),
            crash: CrashHook::default(),
        };
        let result = self.ledger.apply_once(job).await;
        if died.load(Ordering::Relaxed) {
            // The handler died inside the transaction, which the store rolled back; now the
            // rest of the consumer goes down with it.
            let fault = match die {
                Some(DieInTransaction::BeforeWrites) => Fault::CrashBefore,
                _ => Fault::CrashAfterEffect,
            };
            match ctx.crash(fault).await {}
        }
        if f.store_error == Some(ErrorSide::After) {
            // The call happened (committed or not), but the consumer hears an error.
            ctx.stats.faults.hit(Fault::StoreError);
            ctx.stats.outcome("store_error");
            return Handled::retry(store_error_backoff(ctx.delivery));
        }
        match result {
            Ok(settled) => {
                ctx.stats.outcome(settled.kind);
                Handled::from(settled)
            }
            Err(_) => {
                ctx.stats.outcome("store_error");
                Handled::retry(store_error_backoff(ctx.delivery))
            }
        }
    }
}

/// What every consumer of one run shares.
pub(crate) struct Shared<B, M> {
    pub(crate) broker: Arc<B>,
    pub(crate) mode: M,
    pub(crate) plan: FaultPlan,
    pub(crate) stats: Arc<Stats>,
    pub(crate) prefetch: usize,
}

#[derive(PartialEq, Eq, Debug)]
enum Exit {
    Drained,
    Crashed,
}

/// Runs `consumers` supervised consumers until the broker is drained and every in-flight
/// delivery has finished (paused ones included: their late attempt to finish is part of the
/// test).
pub(crate) async fn run_consumers<B: Broker, M: Mode>(shared: Arc<Shared<B, M>>, consumers: usize) {
    let mut set = JoinSet::new();
    for _ in 0..consumers {
        let shared = Arc::clone(&shared);
        set.spawn(async move {
            while consume(&shared).await == Exit::Crashed {
                shared.stats.restarts.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while let Some(done) = set.join_next().await {
        if let Err(e) = done {
            shared
                .stats
                .error(format!("a consumer supervisor failed: {e}"));
        }
    }
}

/// One consumer's life: until drained, or until a crash.
async fn consume<B: Broker, M: Mode>(shared: &Arc<Shared<B, M>>) -> Exit {
    let crash = Arc::new(CrashSignal::default());
    let freeze = Arc::new(Freeze::default());
    unless_frozen(Arc::clone(&freeze), consume_loop(shared, crash, &freeze)).await
}

async fn consume_loop<B: Broker, M: Mode>(
    shared: &Arc<Shared<B, M>>,
    crash: Arc<CrashSignal>,
    freeze: &Arc<Freeze>,
) -> Exit {
    let mut inflight = JoinSet::new();
    let mut drained = false;
    loop {
        if drained && inflight.is_empty() {
            return Exit::Drained;
        }
        let room = shared.prefetch.saturating_sub(inflight.len());
        tokio::select! {
            biased;
            () = crash.notify.notified() => {
                // Abort everything this consumer holds, and wait until none of it runs.
                inflight.shutdown().await;
                return Exit::Crashed;
            }
            Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                if let Err(e) = done {
                    shared.stats.error(format!("a delivery task failed: {e}"));
                }
            }
            got = shared.broker.receive(room), if room > 0 && !drained => match got {
                None => drained = true,
                Some(deliveries) => {
                    for d in deliveries {
                        // Numbered now, on receipt: a delivery received just before a freeze
                        // is held through it even if its task has not run yet.
                        let received = Received {
                            number: shared.stats.delivered(d.message),
                            freezes_before: freeze.count(),
                            delivery: d,
                        };
                        let work = process(
                            Arc::clone(shared),
                            received,
                            Arc::clone(&crash),
                            Arc::clone(freeze),
                        );
                        inflight.spawn(unless_frozen(Arc::clone(freeze), work));
                    }
                }
            },
        }
    }
}

/// A delivery as its consumer received it.
struct Received<R> {
    delivery: Delivery<R>,
    /// Which delivery of its message this is, from 1.
    number: u32,
    /// The consumer's freeze count when it was received.
    freezes_before: u64,
}

/// One delivery: decide its faults, let the mode handle it, then ack, nack or dead-letter.
async fn process<B: Broker, M: Mode>(
    shared: Arc<Shared<B, M>>,
    received: Received<B::Receipt>,
    crash: Arc<CrashSignal>,
    freeze: Arc<Freeze>,
) {
    let stats = &*shared.stats;
    let Received {
        delivery: d,
        number: delivery,
        freezes_before,
    } = received;
    let faults = shared.plan.for_delivery(d.message, delivery);
    let phase = Phase {
        state: AtomicU8::new(IDLE),
        token: AtomicU64::new(0),
        message: d.message,
        stats,
    };
    let ctx = Ctx {
        message: d.message,
        delivery,
        faults,
        stats,
        phase: &phase,
        crash: &crash,
        freeze: &freeze,
        freezes_before,
    };
    let handled = shared.mode.handle(&ctx).await;
    match handled.disposition {
        Disposition::Ack => {
            if handled.executed && faults.crash == Some(CrashPoint::AfterComplete) {
                match ctx.crash(Fault::CrashAfterComplete).await {}
            }
            let taken = if faults.lost_ack {
                stats.faults.hit(Fault::LostAck);
                true
            } else {
                let taken = shared.broker.ack(&d.receipt);
                if !stats.acked[d.message as usize].swap(true, Ordering::Relaxed) {
                    stats.acked_count.fetch_add(1, Ordering::Relaxed);
                }
                taken
            };
            if !taken && ctx.was_frozen() {
                // Naive mode's only record is the ack, and this one came too late: the message
                // timed out while this consumer was frozen and goes to another consumer.
                ctx.window(Window::PauseTakeover);
            }
            ctx.recorded();
        }
        Disposition::Retry { after } => shared.broker.nack(&d.receipt, after),
        Disposition::DeadLetter { reason } => {
            // verify allows unlimited attempts, so nothing should get here; if something does,
            // it is counted, and its missing effect shows up as lost.
            stats.dead_letters.fetch_add(1, Ordering::Relaxed);
            stats.error(format!("message {} dead-lettered: {reason}", d.message));
            let _ = shared.broker.ack(&d.receipt);
        }
    }
}
