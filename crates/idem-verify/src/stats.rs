//! What a mode's run counts while it goes: deliveries per message, outcomes, faults, restarts,
//! and the **window events**, measured delivery by delivery.
//!
//! Each delivery has a cell that tracks whether it has applied its effect and not yet
//! recorded it (store mode: `complete` confirmed; naive mode: acked; transactional mode never
//! has such a state, the effect and the record commit together). A delivery that ends in that
//! state (a crash drops it, a pause ends with another consumer holding the key, its lease is
//! lost, its completion fails) is a *suspect*. After the run, a suspect whose own completion
//! landed anyway (sent to the store just before the crash) closed its window; every other
//! suspect is one window event: the one case in which store mode may repeat an effect.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

use futures_util::StreamExt as _;
use idem::Token;
use parking_lot::Mutex;

use crate::faults::{FaultCounters, Faults};

/// Why a window event happened.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Window {
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
pub struct Stats {
    deliveries: Vec<AtomicU32>,
    acked: Vec<AtomicBool>,
    acked_count: AtomicU64,
    outcomes: Mutex<BTreeMap<&'static str, u64>>,
    /// Faults injected, by kind.
    pub faults: Arc<FaultCounters>,
    suspects: Mutex<Vec<Suspect>>,
    windows: [AtomicU64; 3],
    /// Window events per message, for the per-message check.
    windows_by_message: Mutex<BTreeMap<u32, u32>>,
    pub(crate) takeovers: AtomicU64,
    pub(crate) restarts: AtomicU64,
    pub(crate) dead_letters: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Stats {
    /// Counters for a workload of `messages` transfers.
    pub fn new(messages: usize) -> Self {
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
    pub(crate) fn delivered(&self, message: u32) -> u32 {
        self.deliveries[message as usize].fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Counts an ack sent for `message` (the progress bar's count: messages acked at least
    /// once).
    pub(crate) fn ack_sent(&self, message: u32) {
        if let Some(flag) = self.acked.get(message as usize)
            && !flag.swap(true, Ordering::Relaxed)
        {
            self.acked_count.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn outcome(&self, kind: &'static str) {
        *self.outcomes.lock().entry(kind).or_default() += 1;
    }

    fn suspect(&self, suspect: Suspect) {
        self.suspects.lock().push(suspect);
    }

    /// Turns the suspects into window events: those whose own completion did not land.
    /// `landed(message, token)` asks the store whether `token` completed `message`'s record;
    /// up to 32 questions are asked at once.
    ///
    /// # Errors
    /// When `landed` fails.
    pub async fn resolve_windows<F, Fut>(&self, landed: F) -> anyhow::Result<()>
    where
        F: Fn(u32, Token) -> Fut,
        Fut: Future<Output = anyhow::Result<bool>>,
    {
        let suspects = std::mem::take(&mut *self.suspects.lock());
        let landed = &landed;
        let answers: Vec<anyhow::Result<(Suspect, bool)>> =
            futures_util::stream::iter(suspects.into_iter().map(|s| async move {
                let closed = match s.token {
                    Some(token) => landed(s.message, token).await?,
                    None => false,
                };
                Ok((s, closed))
            }))
            .buffer_unordered(32)
            .collect()
            .await;
        let mut by_message = BTreeMap::new();
        for answer in answers {
            let (s, closed) = answer?;
            if !closed {
                self.windows[s.why as usize].fetch_add(1, Ordering::Relaxed);
                *by_message.entry(s.message).or_insert(0) += 1;
            }
        }
        *self.windows_by_message.lock() = by_message;
        Ok(())
    }

    /// How many suspects wait for [`Stats::resolve_windows`].
    pub fn suspects(&self) -> usize {
        self.suspects.lock().len()
    }

    /// Window events per message (after [`Stats::resolve_windows`]).
    pub fn windows_by_message(&self) -> BTreeMap<u32, u32> {
        self.windows_by_message.lock().clone()
    }

    /// Records a failure of the harness itself (the first ten are kept).
    pub fn error(&self, what: String) {
        let mut errors = self.errors.lock();
        if errors.len() < 10 {
            errors.push(what);
        }
    }

    /// Messages acked at least once: the progress bar's count.
    pub fn acked(&self) -> u64 {
        self.acked_count.load(Ordering::Relaxed)
    }

    /// Deliveries so far.
    pub fn total_deliveries(&self) -> u64 {
        self.deliveries
            .iter()
            .map(|d| u64::from(d.load(Ordering::Relaxed)))
            .sum()
    }

    /// Deliveries beyond the first of each message.
    pub fn duplicate_deliveries(&self) -> u64 {
        self.deliveries
            .iter()
            .map(|d| u64::from(d.load(Ordering::Relaxed).saturating_sub(1)))
            .sum()
    }

    /// Deliveries by outcome.
    pub fn outcomes(&self) -> BTreeMap<&'static str, u64> {
        self.outcomes.lock().clone()
    }

    /// Window events of one cause (after [`Stats::resolve_windows`]).
    pub fn windows(&self, why: Window) -> u64 {
        self.windows[why as usize].load(Ordering::Relaxed)
    }

    /// Claims that took over an expired lease.
    pub fn takeovers(&self) -> u64 {
        self.takeovers.load(Ordering::Relaxed)
    }

    /// Consumers started again after a crash.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Transfers dead-lettered.
    pub fn dead_letters(&self) -> u64 {
        self.dead_letters.load(Ordering::Relaxed)
    }

    /// Failures of the harness itself.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().clone()
    }
}

/// A delivery that ended with its effect applied and not recorded.
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

/// One delivery as the harness follows it: which transfer, which delivery of it, its faults,
/// and where it stands (effect pending or not).
#[derive(Debug)]
pub(crate) struct Cell {
    /// The transfer (its index in the workload).
    pub(crate) message: u32,
    pub(crate) faults: Faults,
    /// The consumer's freeze count when the delivery was received.
    pub(crate) freezes_before: u64,
    /// The handler ran its effect (a crash "after complete" needs one).
    pub(crate) ran: AtomicBool,
    state: AtomicU8,
    /// The raw token of the claim the effect ran under; 0 for none.
    token: AtomicU64,
    stats: Arc<Stats>,
}

impl Cell {
    pub(crate) fn new(
        message: u32,
        faults: Faults,
        freezes_before: u64,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            message,
            faults,
            freezes_before,
            ran: AtomicBool::new(false),
            state: AtomicU8::new(IDLE),
            token: AtomicU64::new(0),
            stats,
        }
    }

    /// The effect was applied (under the claim holding `token`, in store mode); it is not
    /// recorded yet.
    pub(crate) fn applied(&self, token: Option<Token>) {
        self.token
            .store(token.map_or(0, Token::as_raw), Ordering::Relaxed);
        self.state.store(PENDING, Ordering::Relaxed);
        self.ran.store(true, Ordering::Relaxed);
    }

    /// The effect is recorded (or nothing was pending).
    pub(crate) fn recorded(&self) {
        self.state.store(IDLE, Ordering::Relaxed);
    }

    /// The delivery ends with its effect (if one is pending) not recorded: a suspect.
    pub(crate) fn window(&self, why: Window) {
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
