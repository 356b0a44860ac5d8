//! [`FlakyStore`], the store wrapper that injects transient errors in store mode; the faults
//! themselves (which exist, their rates, the seeded decision of whether one hits a delivery)
//! are `idem_verify::faults`, re-exported here for `verify --broker`.
//!
//! Every decision is a hash of `(seed, fault, message, delivery number)` (for store errors:
//! `(seed, key id, operation, how many times that operation ran on that key)`), never a shared
//! random generator, so the same seed injects the same faults whatever the scheduling.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;

use idem::{Key, Store, StoreError, StoreLayer, StoreOp};

pub(crate) use idem_verify::faults::{
    CrashPoint, ErrorSide, Fault, FaultCounters, FaultPlan, PerFault,
};

use super::workload::{fnv1a, hash, unit};

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
/// A [`StoreLayer`]: every call reaches the inner store in its own form, so batches stay
/// batches (`claim_many`, `complete_many`). A batch is decided key by key, like the single
/// forms, and fails as a whole, as a batch does on a real store: before the call if any key's
/// decision says before, after it otherwise.
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

    /// The decision for one key's `op` (counted as one more run of it).
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
        // The lowest bit is independent of the bits `unit` used.
        Some(if h & 1 == 0 {
            ErrorSide::Before
        } else {
            ErrorSide::After
        })
    }

    /// The decision for a whole call: each key's, before winning over after.
    fn decide_call(&self, op: &StoreOp<'_>) -> Option<(Op, ErrorSide)> {
        let kind = match op {
            StoreOp::Claim(_) | StoreOp::ClaimMany(_) => Op::Claim,
            StoreOp::Complete(_) | StoreOp::CompleteMany(_) => Op::Complete,
            StoreOp::Release { .. } => Op::Release,
            StoreOp::Extend { .. } => Op::Extend,
            StoreOp::Fail { .. } => Op::Fail,
            _ => return None,
        };
        let mut side = None;
        for key in op.keys() {
            match (side, self.decide(key, kind)) {
                (_, Some(ErrorSide::Before)) => side = Some(ErrorSide::Before),
                (None, Some(ErrorSide::After)) => side = Some(ErrorSide::After),
                _ => {}
            }
        }
        let side = side?;
        self.injected.hit(Fault::StoreError);
        Some((kind, side))
    }
}

fn injected_error(op: Op, side: &str) -> StoreError {
    StoreError::unavailable(format!(
        "injected fault: {op:?} failed {side} reaching the store"
    ))
}

impl<S: Store> StoreLayer for FlakyStore<S> {
    type Inner = S;

    fn inner(&self) -> &S {
        &self.inner
    }

    fn around<T: Send>(
        &self,
        op: StoreOp<'_>,
        call: impl Future<Output = Result<T, StoreError>> + Send,
    ) -> impl Future<Output = Result<T, StoreError>> + Send {
        let decision = self.decide_call(&op);
        async move {
            match decision {
                None => call.await,
                Some((op, ErrorSide::Before)) => Err(injected_error(op, "before")),
                Some((op, ErrorSide::After)) => {
                    call.await?;
                    Err(injected_error(op, "after"))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem::{Claim, ClaimRequest, Fingerprint, MemoryStore, Namespace};

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

    #[tokio::test]
    async fn flaky_store_keeps_batches_whole() {
        // With no faults, a batch reaches the inner store as one batch.
        let counters = Arc::new(FaultCounters::default());
        let inner = MemoryStore::new();
        let store = FlakyStore::new(inner.clone(), 9, 0.0, Arc::clone(&counters));
        let ns = Namespace::new("flaky").unwrap();
        let reqs: Vec<ClaimRequest> = (0..4)
            .map(|i| ClaimRequest::new(ns.key(format!("b{i}")).unwrap(), Fingerprint::of(b"x")))
            .collect();
        let claims = store.claim_many(&reqs).await.unwrap();
        assert!(claims.iter().all(|c| matches!(c, Claim::Acquired(_))));
        // At rate 1, every batch fails, and counts as one injected fault.
        let store = FlakyStore::new(inner, 9, 1.0, Arc::clone(&counters));
        assert!(store.claim_many(&reqs).await.unwrap_err().is_transient());
        assert_eq!(counters.snapshot().get(Fault::StoreError), 1);
    }
}
