//! # idem-conformance: the checks every idem [`Store`] must pass
//!
//! A new store is done when it passes every check here. Each check is a plain
//! `pub async fn check(h: &impl Harness)` that panics with a message naming the broken rule;
//! [`conformance_tests!`] stamps out one `#[tokio::test]` per check for a store, so a failure
//! names both the store and the check.
//!
//! ```ignore
//! // tests/conformance.rs of a store crate
//! async fn harness() -> idem_conformance::ManualHarness<MyStore> {
//!     let clock = idem::ManualClock::new();
//!     idem_conformance::ManualHarness::new(MyStore::with_clock(clock.clone()), clock)
//! }
//! idem_conformance::conformance_tests!(harness);
//! ```
//!
//! Stores whose clock is a server's (Redis `TIME`, SQL `now()`) use [`RealTimeHarness`], which
//! sleeps instead of moving a clock; give it a time unit well above the store's round trip.
//! Every check works in its own fresh namespace, so checks run in parallel against one server.
//!
//! Broker adapters have a suite of their own, [`broker`]: [`adapter_tests!`] stamps its checks
//! (producer retries, poison, delayed redelivery, progress, a consumer killed mid-batch,
//! connections cut through a [`proxy::Proxy`], shutdown) for a [`broker::BrokerHarness`].

pub mod broker;
mod checks;
mod model;
pub mod proxy;
pub mod server;
mod tx;

use std::future::Future;
use std::time::Duration;

use idem::{ManualClock, Namespace, Store};

pub use crate::checks::*;
pub use crate::model::random_operation_sequences_match_the_model;
pub use crate::tx::*;

/// What a check needs from the store under test.
pub trait Harness: Send + Sync + 'static {
    /// The store under test.
    type Store: Store + Clone;

    /// The store (clones share records).
    fn store(&self) -> Self::Store;

    /// Moves the store's clock forward by `d` (or sleeps for `d` on a real clock).
    fn advance(&self, d: Duration) -> impl Future<Output = ()> + Send;

    /// The time unit of the checks: leases and retentions are small multiples of it. On a real
    /// clock it must be far above the store's round trip.
    fn unit(&self) -> Duration;

    /// How many random sequences the property check runs.
    fn property_cases(&self) -> u32 {
        64
    }

    /// A fresh namespace no other check uses.
    fn namespace(&self) -> Namespace {
        unique_namespace()
    }
}

/// What a conformance setup function may return: a harness, or `None` when its server is
/// missing outside CI (see [`server::url`]), which skips the check.
pub trait IntoHarness {
    /// The harness.
    type Harness: Harness;
    /// The harness, if there is one.
    fn into_harness(self) -> Option<Self::Harness>;
}

impl<H: Harness> IntoHarness for H {
    type Harness = H;
    fn into_harness(self) -> Option<H> {
        Some(self)
    }
}

impl<H: Harness> IntoHarness for Option<H> {
    type Harness = H;
    fn into_harness(self) -> Option<H> {
        self
    }
}

/// A fresh namespace, unique within and across processes with high probability.
pub fn unique_namespace() -> Namespace {
    Namespace::new(format!(
        "conf-{:x}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    ))
    .unwrap_or_else(|e| panic!("generated namespace is invalid: {e}"))
}

/// A harness for stores that read a [`ManualClock`]: time moves instantly.
#[derive(Clone, Debug)]
pub struct ManualHarness<S> {
    store: S,
    clock: ManualClock,
}

impl<S> ManualHarness<S> {
    /// A harness over `store`, which must read `clock`.
    pub fn new(store: S, clock: ManualClock) -> Self {
        Self { store, clock }
    }
}

impl<S: Store + Clone> Harness for ManualHarness<S> {
    type Store = S;

    fn store(&self) -> S {
        self.store.clone()
    }

    async fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }

    fn unit(&self) -> Duration {
        Duration::from_secs(10)
    }

    fn property_cases(&self) -> u32 {
        256
    }
}

/// A harness for stores on a server's clock: advancing time sleeps.
#[derive(Clone)]
pub struct RealTimeHarness<S> {
    store: S,
    unit: Duration,
    cases: u32,
    /// Dropped with the harness, at the end of the check: cleans up what the check's store
    /// lives in (a schema or a table of its own on a shared server).
    _cleanup: Option<std::sync::Arc<dyn Send + Sync>>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for RealTimeHarness<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealTimeHarness")
            .field("store", &self.store)
            .field("unit", &self.unit)
            .field("cases", &self.cases)
            .finish_non_exhaustive()
    }
}

impl<S> RealTimeHarness<S> {
    /// A harness over `store` with time unit `unit` (200 ms suits a loopback server).
    pub fn new(store: S, unit: Duration) -> Self {
        Self {
            store,
            unit,
            cases: 12,
            _cleanup: None,
        }
    }

    /// Keeps `guard` until the check ends, then drops it: give each check a schema or table of
    /// its own on a shared server, and a guard whose `Drop` removes it, so that checks (and
    /// runs) never see each other's records, not even through a purge.
    #[must_use]
    pub fn cleanup(mut self, guard: impl Send + Sync + 'static) -> Self {
        self._cleanup = Some(std::sync::Arc::new(guard));
        self
    }

    /// Sets how many random sequences the property check runs (each sleeps a few units).
    #[must_use]
    pub fn property_cases(mut self, cases: u32) -> Self {
        self.cases = cases;
        self
    }
}

impl<S: Store + Clone> Harness for RealTimeHarness<S> {
    type Store = S;

    fn store(&self) -> S {
        self.store.clone()
    }

    async fn advance(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    fn unit(&self) -> Duration {
        self.unit
    }

    fn property_cases(&self) -> u32 {
        self.cases
    }
}

/// Stamps out one `#[tokio::test]` per check, calling `$setup().await` for a [`Harness`] (or an
/// `Option` of one: `None` skips, see [`server::url`]).
///
/// The calling crate needs `tokio` (with `macros` and `rt-multi-thread`) as a dev-dependency.
#[macro_export]
macro_rules! conformance_tests {
    ($setup:path) => {
        $crate::conformance_tests!(
            $setup;
            claim_absent_acquires,
            claim_live_lease_is_in_progress,
            expired_lease_is_taken_over,
            completed_is_replayed,
            mismatch_is_reported_in_every_state,
            stale_token_writes_are_refused,
            release_then_reclaim_counts_attempts,
            extend_keeps_the_lease_alive,
            fail_makes_claims_exhausted,
            max_attempts_exhaust_on_claim,
            evict_forgets_the_key,
            retention_expiry_reprocesses,
            purge_removes_only_expired,
            concurrent_claimers_have_one_winner,
            batch_forms_equal_single_forms,
            oversized_results_are_rejected,
            keys_at_the_limits_round_trip,
            namespaces_are_isolated,
            complete_is_idempotent_for_its_token,
            random_operation_sequences_match_the_model
        );
    };
    ($setup:path; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let Some(harness) = $crate::IntoHarness::into_harness($setup().await) else {
                    return;
                };
                $crate::$check(&harness).await;
            }
        )+
    };
}
