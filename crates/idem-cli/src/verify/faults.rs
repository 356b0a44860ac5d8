//! Fault injection: which faults exist, their rates, the seeded decision of whether one hits a
//! delivery, and [`FlakyStore`], the store wrapper that injects transient errors.
//!
//! Every decision is a hash of `(seed, fault, message, delivery number)` (for store errors:
//! `(seed, key id, operation, how many times that operation ran on that key)`), never a shared
//! random generator, so the same seed injects the same faults whatever the scheduling.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idem::{Claim, ClaimRequest, Completion, Key, Record, Store, StoreError, Token, WriteOutcome};

use super::workload::{fnv1a, hash, unit};

/// A kind of fault. The order is the order of the report's columns.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum Fault {
    /// The producer publishes the same message again (a lost publish confirm).
    DupPublish,
    /// The consumer's ack never reaches the broker: the message is redelivered.
    LostAck,
    /// The consumer crashes before the handler's effect (in store mode: holding the claim).
    CrashBefore,
    /// The consumer crashes after the effect, before `complete` (store mode's window).
    CrashAfterEffect,
    /// The consumer crashes after `complete`, before the ack.
    CrashAfterComplete,
    /// The handler outlives the visibility timeout; the heartbeat keeps the lease.
    Slow,
    /// The consumer freezes past its lease with no heartbeat, then wakes and tries to finish.
    Pause,
    /// A store operation fails with a transient error, before or after it took effect.
    StoreError,
}

impl Fault {
    pub(crate) const ALL: [Fault; 8] = [
        Fault::DupPublish,
        Fault::LostAck,
        Fault::CrashBefore,
        Fault::CrashAfterEffect,
        Fault::CrashAfterComplete,
        Fault::Slow,
        Fault::Pause,
        Fault::StoreError,
    ];

    /// The stable name used in JSON.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Fault::DupPublish => "dup_publish",
            Fault::LostAck => "lost_ack",
            Fault::CrashBefore => "crash_before",
            Fault::CrashAfterEffect => "crash_after_effect",
            Fault::CrashAfterComplete => "crash_after_complete",
            Fault::Slow => "slow",
            Fault::Pause => "pause",
            Fault::StoreError => "store_error",
        }
    }

    /// A short column header.
    pub(crate) fn header(self) -> &'static str {
        match self {
            Fault::DupPublish => "dup publish",
            Fault::LostAck => "lost ack",
            Fault::CrashBefore => "crash before",
            Fault::CrashAfterEffect => "crash after effect",
            Fault::CrashAfterComplete => "crash after complete",
            Fault::Slow => "slow",
            Fault::Pause => "pause",
            Fault::StoreError => "store error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn domain(self) -> u64 {
        100 + self as u64
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A value per fault kind.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct PerFault<T>([T; 8]);

impl<T: Copy> PerFault<T> {
    pub(crate) fn get(&self, fault: Fault) -> T {
        self.0[fault.index()]
    }

    pub(crate) fn set(&mut self, fault: Fault, value: T) {
        self.0[fault.index()] = value;
    }
}

/// Counters per fault kind, shared by the tasks of one run.
#[derive(Debug, Default)]
pub(crate) struct FaultCounters([AtomicU64; 8]);

impl FaultCounters {
    pub(crate) fn hit(&self, fault: Fault) {
        self.0[fault.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> PerFault<u64> {
        PerFault(std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed)))
    }
}

/// Where a consumer crashes while processing a delivery.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) enum CrashPoint {
    BeforeEffect,
    AfterEffect,
    AfterComplete,
}

/// Which side of a store operation a transient error is on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ErrorSide {
    /// The operation did not happen.
    Before,
    /// The operation happened, but the caller hears an error (the nastier case).
    After,
}

/// The faults decided for one delivery.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Faults {
    pub(crate) crash: Option<CrashPoint>,
    pub(crate) slow: bool,
    pub(crate) pause: bool,
    pub(crate) lost_ack: bool,
    /// Used by modes that call the store directly (transactional); store mode's errors come
    /// from [`FlakyStore`].
    pub(crate) store_error: Option<ErrorSide>,
}

/// Rates and seed: decides which faults hit which delivery.
#[derive(Clone, Debug)]
pub(crate) struct FaultPlan {
    seed: u64,
    rates: PerFault<f64>,
}

impl FaultPlan {
    pub(crate) fn new(seed: u64, rates: PerFault<f64>) -> Self {
        Self { seed, rates }
    }

    pub(crate) fn seed(&self) -> u64 {
        self.seed
    }

    pub(crate) fn rate(&self, fault: Fault) -> f64 {
        self.rates.get(fault)
    }

    /// Whether `fault` hits delivery number `delivery` (from 1; 0 for the producer) of message
    /// `message`.
    pub(crate) fn hits(&self, fault: Fault, message: u32, delivery: u32) -> bool {
        let rate = self.rates.get(fault);
        rate > 0.0
            && unit(hash(
                self.seed,
                fault.domain(),
                u64::from(message),
                u64::from(delivery),
            )) < rate
    }

    /// A number in `[0, 1)` for secondary choices about a fault that hit (how long a delay,
    /// which side of an operation).
    pub(crate) fn detail(&self, fault: Fault, message: u32, delivery: u32) -> f64 {
        unit(hash(
            self.seed,
            fault.domain() + 1000,
            u64::from(message),
            u64::from(delivery),
        ))
    }

    /// The faults of one delivery. Of several crash points, the earliest wins.
    pub(crate) fn for_delivery(&self, message: u32, delivery: u32) -> Faults {
        let hit = |f| self.hits(f, message, delivery);
        let crash = [
            (Fault::CrashBefore, CrashPoint::BeforeEffect),
            (Fault::CrashAfterEffect, CrashPoint::AfterEffect),
            (Fault::CrashAfterComplete, CrashPoint::AfterComplete),
        ]
        .into_iter()
        .find(|(f, _)| hit(*f))
        .map(|(_, p)| p);
        let store_error = hit(Fault::StoreError).then(|| {
            if self.detail(Fault::StoreError, message, delivery) < 0.5 {
                ErrorSide::Before
            } else {
                ErrorSide::After
            }
        });
        Faults {
            crash,
            slow: hit(Fault::Slow),
            pause: hit(Fault::Pause),
            lost_ack: hit(Fault::LostAck),
            store_error,
        }
    }
}

/// The store operations [`FlakyStore`] can fail.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Op {
    Claim,
    Complete,
    Release,
    Extend,
    Fail,
}

/// A [`Store`] that fails a fraction of claims, completions, releases, extends and failures with
/// a transient [`StoreErrorKind::Unavailable`](idem::StoreErrorKind::Unavailable) error, half of
/// them *before* the real operation (nothing happened) and half *after* it (the write happened
/// but the caller hears an error, as when a response is lost on the network).
///
/// `get`, `evict` and `purge_expired` pass through: `verify` reads with them to check results.
pub(crate) struct FlakyStore<S> {
    inner: S,
    seed: u64,
    rate: f64,
    /// How many times each `(key id, operation)` ran: the decision's input besides the seed.
    calls: Mutex<HashMap<(u64, Op), u32>>,
    injected: Arc<FaultCounters>,
}

impl<S> FlakyStore<S> {
    pub(crate) fn new(inner: S, seed: u64, rate: f64, injected: Arc<FaultCounters>) -> Self {
        Self {
            inner,
            seed,
            rate,
            calls: Mutex::new(HashMap::new()),
            injected,
        }
    }

    fn decide(&self, key: &Key, op: Op) -> Option<ErrorSide> {
        if self.rate <= 0.0 {
            return None;
        }
        let id = fnv1a(key.id());
        let n = {
            let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            let n = calls.entry((id, op)).or_insert(0);
            *n += 1;
            *n
        };
        let h = hash(self.seed, 200 + op as u64, id, u64::from(n));
        if unit(h) >= self.rate {
            return None;
        }
        self.injected.hit(Fault::StoreError);
        // The lowest bit is independent of the bits `unit` used.
        Some(if h & 1 == 0 {
            ErrorSide::Before
        } else {
            ErrorSide::After
        })
    }

    async fn flaky<T>(
        &self,
        key: &Key,
        op: Op,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match self.decide(key, op) {
            None => call.await,
            Some(ErrorSide::Before) => Err(injected_error(op, "before")),
            Some(ErrorSide::After) => {
                call.await?;
                Err(injected_error(op, "after"))
            }
        }
    }
}

fn injected_error(op: Op, side: &str) -> StoreError {
    StoreError::unavailable(format!(
        "injected fault: {op:?} failed {side} reaching the store"
    ))
}

impl<S: Store> Store for FlakyStore<S> {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        self.flaky(&req.key, Op::Claim, self.inner.claim(req)).await
    }

    async fn complete(&self, c: &Completion) -> Result<WriteOutcome, StoreError> {
        self.flaky(&c.key, Op::Complete, self.inner.complete(c))
            .await
    }

    async fn release(
        &self,
        key: &Key,
        token: Token,
        retention: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        self.flaky(key, Op::Release, self.inner.release(key, token, retention))
            .await
    }

    async fn extend(
        &self,
        key: &Key,
        token: Token,
        lease: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        self.flaky(key, Op::Extend, self.inner.extend(key, token, lease))
            .await
    }

    async fn fail(
        &self,
        key: &Key,
        token: Token,
        reason: &str,
        retention: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        self.flaky(
            key,
            Op::Fail,
            self.inner.fail(key, token, reason, retention),
        )
        .await
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        self.inner.get(key).await
    }

    async fn evict(&self, key: &Key) -> Result<bool, StoreError> {
        self.inner.evict(key).await
    }

    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        self.inner.purge_expired(limit).await
    }

    fn max_result_bytes(&self) -> usize {
        self.inner.max_result_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem::{Fingerprint, MemoryStore, Namespace};

    fn rates(fault: Fault, rate: f64) -> PerFault<f64> {
        let mut r = PerFault::default();
        r.set(fault, rate);
        r
    }

    #[test]
    fn decisions_follow_the_seed_and_the_rate() {
        let plan = FaultPlan::new(42, rates(Fault::LostAck, 0.1));
        let again = FaultPlan::new(42, rates(Fault::LostAck, 0.1));
        let other = FaultPlan::new(43, rates(Fault::LostAck, 0.1));
        let hits = |p: &FaultPlan| -> Vec<bool> {
            (0..10_000).map(|m| p.hits(Fault::LostAck, m, 1)).collect()
        };
        assert_eq!(hits(&plan), hits(&again));
        assert_ne!(hits(&plan), hits(&other));
        let n = hits(&plan).iter().filter(|h| **h).count();
        assert!((800..1200).contains(&n), "{n} hits of 10000 at 10%");
        assert!((0..10_000).all(|m| !plan.hits(Fault::Pause, m, 1)));
    }

    #[test]
    fn the_earliest_crash_point_wins() {
        let mut r = PerFault::default();
        r.set(Fault::CrashAfterComplete, 1.0);
        r.set(Fault::CrashAfterEffect, 1.0);
        let plan = FaultPlan::new(1, r);
        assert_eq!(plan.for_delivery(3, 1).crash, Some(CrashPoint::AfterEffect));
    }

    #[tokio::test]
    async fn flaky_store_fails_before_and_after() {
        let counters = Arc::new(FaultCounters::default());
        let inner = MemoryStore::new();
        let store = FlakyStore::new(inner.clone(), 9, 1.0, Arc::clone(&counters));
        let ns = Namespace::new("flaky").unwrap();
        let (mut before, mut after) = (0, 0);
        for i in 0..64 {
            let key = ns.key(format!("k{i}")).unwrap();
            let req = ClaimRequest::new(key.clone(), Fingerprint::of(b"x"));
            assert!(store.claim(&req).await.unwrap_err().is_transient());
            // An "after" error left the claim in the store; a "before" error did not.
            match inner.get(&key).await.unwrap() {
                Some(_) => after += 1,
                None => before += 1,
            }
        }
        assert!(before > 10 && after > 10, "before {before}, after {after}");
        assert_eq!(counters.snapshot().get(Fault::StoreError), 64);
    }
}
