//! Fault injection: which faults exist, their rates, and the seeded decision of whether one hits
//! a delivery.
//!
//! Every decision is a hash of `(seed, fault, message, delivery number)`, never a shared random
//! generator, so the same seed injects the same faults whatever the scheduling. (Store errors in
//! store mode come from a store wrapper the caller gives, deciding from `(seed, key id,
//! operation, how many times that operation ran on that key)`: see
//! [`Harness::store`](crate::Harness::store).)

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::workload::{hash, unit};

/// A kind of fault. The order is the order of the report's columns.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Fault {
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
    /// Every fault, in the order of the report's columns.
    pub const ALL: [Fault; 8] = [
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
    pub fn name(self) -> &'static str {
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
    pub fn header(self) -> &'static str {
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

    /// Separates this fault's decisions from the others' in [`hash`].
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
pub struct PerFault<T>([T; 8]);

impl<T: Copy> PerFault<T> {
    /// The value of `fault`.
    pub fn get(&self, fault: Fault) -> T {
        self.0[fault.index()]
    }

    /// Sets the value of `fault`.
    pub fn set(&mut self, fault: Fault, value: T) {
        self.0[fault.index()] = value;
    }
}

/// Counters per fault kind, shared by the tasks of one run.
#[derive(Debug, Default)]
pub struct FaultCounters([AtomicU64; 8]);

impl FaultCounters {
    /// Counts one hit of `fault`.
    pub fn hit(&self, fault: Fault) {
        self.0[fault.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn snapshot(&self) -> PerFault<u64> {
        PerFault(std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed)))
    }
}

/// Where a consumer crashes while processing a delivery.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum CrashPoint {
    /// Before the handler's effect (in store mode: holding the claim).
    BeforeEffect,
    /// After the effect, before `complete` (inside the transaction in transactional mode).
    AfterEffect,
    /// After `complete` (or the commit), before the ack.
    AfterComplete,
}

/// Which side of a store operation a transient error is on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ErrorSide {
    /// The operation did not happen.
    Before,
    /// The operation happened, but the caller hears an error (the nastier case).
    After,
}

/// The faults decided for one delivery.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Where the consumer crashes, if it does.
    pub crash: Option<CrashPoint>,
    /// The handler outlives the visibility timeout and the lease.
    pub slow: bool,
    /// The consumer freezes after the effect.
    pub pause: bool,
    /// The ack never reaches the broker.
    pub lost_ack: bool,
    /// Used by transactional mode, whose calls the harness fails itself; store mode's errors
    /// come from the store wrapper the caller gives.
    pub store_error: Option<ErrorSide>,
}

/// Rates and seed: decides which faults hit which delivery.
#[derive(Clone, Debug)]
pub struct FaultPlan {
    seed: u64,
    rates: PerFault<f64>,
}

impl FaultPlan {
    /// A plan with these rates (each a probability per delivery).
    pub fn new(seed: u64, rates: PerFault<f64>) -> Self {
        Self { seed, rates }
    }

    /// The seed of every decision.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The rate of `fault`.
    pub fn rate(&self, fault: Fault) -> f64 {
        self.rates.get(fault)
    }

    /// Whether `fault` hits delivery number `delivery` (from 1; 0 for the producer) of message
    /// `message`.
    pub fn hits(&self, fault: Fault, message: u32, delivery: u32) -> bool {
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
    pub fn detail(&self, fault: Fault, message: u32, delivery: u32) -> f64 {
        unit(hash(
            self.seed,
            fault.domain() + 1000,
            u64::from(message),
            u64::from(delivery),
        ))
    }

    /// The faults of one delivery. Of several crash points, the earliest wins.
    pub fn for_delivery(&self, message: u32, delivery: u32) -> Faults {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
