//! One life of one consumer, between two crashes: how it crashes and how it freezes.
//!
//! A **crash** kills the consumer's connection to the broker (nothing it holds can be acked any
//! more; its deliveries come back after the visibility timeout) and signals its supervisor,
//! which drops the consumer with every task it runs, and starts a fresh one.
//!
//! A **pause** freezes the consumer, as a long GC or a VM stall freezes a process: nothing it
//! does reaches the outside while it lasts. Every way out of the consumer goes through a gate
//! ([`unless_frozen`]): receiving, settling, every store call (so no heartbeat extends any of its
//! leases), every handler. Timers may fire; nothing passes a gate until the freeze ends.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Poll, ready};
use std::time::Duration;

use idem_broker::memory::MemoryConnection;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::faults::Fault;
use crate::stats::Stats;

/// How a delivery crashes its consumer.
#[derive(Debug, Default)]
pub(crate) struct CrashSignal {
    pub(crate) notify: Notify,
    /// Set by the first crash: deliveries that reach a crash point while the consumer is going
    /// down anyway do not count as crashes of their own.
    fired: AtomicBool,
}

/// A consumer's pause: until when it is frozen, and how many times it froze; and whether it
/// is dead (crashed: frozen for good).
#[derive(Debug, Default)]
pub(crate) struct Freeze {
    until: Mutex<Option<Instant>>,
    count: AtomicU64,
    dead: AtomicBool,
}

impl Freeze {
    fn start(&self, how_long: Duration) {
        let until = Instant::now() + how_long;
        let mut current = self.until.lock();
        *current = Some(current.map_or(until, |c| c.max(until)));
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// When the freeze ends, if the consumer is frozen now.
    fn until(&self) -> Option<Instant> {
        if self.count() == 0 {
            // Most consumers never freeze: no lock on every poll of every delivery.
            return None;
        }
        let until = *self.until.lock();
        until.filter(|&u| u > Instant::now())
    }

    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Runs `work`, never polling it while the consumer is frozen: its timers may fire, but
/// nothing runs (no heartbeat, no ack, no crash) until the freeze ends. Once the consumer is
/// dead, `work` is never polled again: a crashed process does nothing more, even in the instant
/// before its supervisor drops its tasks.
pub(crate) fn unless_frozen<F: Future>(
    freeze: Arc<Freeze>,
    work: F,
) -> impl Future<Output = F::Output> {
    let mut work = Box::pin(work);
    let mut thaw: Option<Pin<Box<Sleep>>> = None;
    std::future::poll_fn(move |cx| {
        if freeze.dead.load(Ordering::Relaxed) {
            // Dropped by the supervisor soon; nothing to wake.
            return Poll::Pending;
        }
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

/// What one life of one consumer shares between its tasks.
#[derive(Debug)]
pub(crate) struct Incarnation {
    pub(crate) crash: CrashSignal,
    pub(crate) freeze: Arc<Freeze>,
    pub(crate) stats: Arc<Stats>,
    /// Its connection to the broker, killed by a crash.
    pub(crate) connection: MemoryConnection,
}

impl Incarnation {
    pub(crate) fn new(stats: Arc<Stats>, connection: MemoryConnection) -> Self {
        Self {
            crash: CrashSignal::default(),
            freeze: Arc::new(Freeze::default()),
            stats,
            connection,
        }
    }

    /// Crashes the consumer now (the first time; later calls change nothing): counts `fault`,
    /// cuts the connection so that nothing it holds is settled any more, and tells the
    /// supervisor, which drops the consumer with everything it runs.
    pub(crate) fn crash_now(&self, fault: Fault) {
        if !self.crash.fired.swap(true, Ordering::Relaxed) {
            self.stats.faults.hit(fault);
            self.freeze.dead.store(true, Ordering::Relaxed);
            self.connection.kill();
            self.crash.notify.notify_one();
        }
    }

    /// Crashes the consumer and never returns: the supervisor drops this task wherever it
    /// stands.
    pub(crate) async fn crash(&self, fault: Fault) -> Infallible {
        self.crash_now(fault);
        std::future::pending().await
    }

    /// A slow handler: sleeps while the consumer goes on (the heartbeat keeps beating).
    pub(crate) async fn slow(&self, how_long: Duration) {
        self.stats.faults.hit(Fault::Slow);
        tokio::time::sleep(how_long).await;
    }

    /// Freezes the whole consumer for `how_long`, then carries on.
    pub(crate) async fn pause(&self, how_long: Duration) {
        self.stats.faults.hit(Fault::Pause);
        self.freeze.start(how_long);
        // Yield so that the freeze takes hold (at the gates) before this task goes on.
        tokio::task::yield_now().await;
    }

    /// Whether the consumer crashed.
    pub(crate) fn is_dead(&self) -> bool {
        self.freeze.dead.load(Ordering::Relaxed)
    }

    /// Whether the consumer froze since `freezes_before`.
    pub(crate) fn frozen_since(&self, freezes_before: u64) -> bool {
        self.freeze.count() != freezes_before
    }

    /// Runs `work` behind this consumer's freeze gate.
    pub(crate) fn gate<F: Future>(&self, work: F) -> impl Future<Output = F::Output> + use<F> {
        unless_frozen(Arc::clone(&self.freeze), work)
    }
}
