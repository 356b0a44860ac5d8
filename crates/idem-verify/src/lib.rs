//! # idem-verify: the exactly-once checker behind `idem verify`
//!
//! A bank ledger workload ([`Workload`]: seeded transfers between accounts, each message with
//! an id set once by the producer) goes through an at-least-once broker (the in-process
//! [`idem_broker::memory::MemoryBroker`], with competing consumers and a visibility timeout) to
//! consumers that suffer the faults of a [`FaultPlan`] (producer retries, lost acks, crashes
//! before and after the effect and after `complete`, handlers slower than the broker's timeout,
//! consumers frozen past their lease, store errors). Every application of every transfer is
//! counted in a ledger, so duplicates and losses are measured, not inferred; [`check`] judges a
//! mode's [`RunReport`] by what idem promises for it.
//!
//! [`Harness`] runs one mode at a time, each on a fresh broker and ledger:
//! - [`Harness::naive`]: receive, apply, ack, no idem: shows what the faults do;
//! - [`Harness::store`]: the consumer runtime users run, [`idem_broker::Consumer`] in store
//!   mode over an [`idem::Executor`] on any [`idem::Store`] (batches: one claim round trip per
//!   round, handlers concurrently, completions grouped); the effect is an [`Effect`] outside
//!   the store;
//! - [`Harness::transactional`]: [`idem_broker::Consumer`] in transactional mode on an
//!   [`idem::Transactional`] store, whose transaction carries a [`TransactionalLedger`]'s writes
//!   together with the records.
//!
//! A project runs it against its own store (any [`idem::Store`], or a [`TransactionalLedger`]
//! for its own [`idem::Transactional`] store) and its own effect ([`Effect`]).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use idem_verify::{FaultPlan, Harness, MemoryLedger, Workload, check, default_rates};
//!
//! let seed = 42;
//! let harness = Harness::new(Workload::generate(seed, 20_000, 1_000), FaultPlan::new(seed, default_rates()));
//! let naive = harness.naive(MemoryLedger::new(&harness.workload)).await?;
//! let store = harness
//!     .store(idem::MemoryStore::new(), MemoryLedger::new(&harness.workload), |s, _| s)
//!     .await?;
//! for run in [&naive, &store] {
//!     let verdict = check(run);
//!     println!("{}: {} ({})", run.mode.as_str(), verdict.ok, verdict.detail);
//! }
//! # Ok(()) }
//! ```
//!
//! `idem verify` is this crate plus arguments, a progress bar, the table, and `--broker` (the
//! same workload through a real broker with consumer processes killed by SIGKILL). See
//! `docs/verify.md` for what each fault does and what `ok` means.

pub mod faults;
mod harness;
mod incarnation;
pub mod ledger;
mod modes;
mod naive;
pub mod report;
pub mod sql;
pub mod stats;
mod tap;
pub mod workload;

pub use crate::faults::{CrashPoint, ErrorSide, Fault, FaultCounters, FaultPlan, Faults, PerFault};
pub use crate::harness::{Harness, Observer, Stalls};
pub use crate::ledger::{
    CrashHook, DieInTransaction, Effect, MemoryLedger, Sabotage, SimulatedCrash, Snapshot,
    TransactionalLedger, TransferJob, quiet_simulated_crashes,
};
#[cfg(feature = "sqlite")]
pub use crate::ledger::{SqliteLedger, apply_in_transaction};
pub use crate::report::{
    BrokerFaults, BrokerInfo, Check, Measured, ModeName, OutboxFaults, Report, RequiredFaults,
    RunReport, StoreFailover, WindowEvents, check,
};
pub use crate::stats::{Stats, Window};
pub use crate::workload::{INITIAL_BALANCE, Transfer, Workload};

/// The default fault rates of `idem verify` (a probability per delivery each): high enough
/// that, at 100,000 transfers, every fault hits many times and the naive consumer certainly
/// applies duplicates; low enough that a run takes seconds.
pub const DEFAULT_RATES: [(Fault, f64); 8] = [
    (Fault::DupPublish, 0.01),
    (Fault::LostAck, 0.01),
    (Fault::CrashBefore, 0.001),
    (Fault::CrashAfterEffect, 0.001),
    (Fault::CrashAfterComplete, 0.001),
    (Fault::Slow, 0.002),
    (Fault::Pause, 0.0001),
    (Fault::StoreError, 0.01),
];

/// [`DEFAULT_RATES`] as a [`PerFault`].
pub fn default_rates() -> PerFault<f64> {
    let mut rates = PerFault::default();
    for (fault, rate) in DEFAULT_RATES {
        rates.set(fault, rate);
    }
    rates
}
