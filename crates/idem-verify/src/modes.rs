//! idem's two modes as the harness runs them: the runtime users run
//! ([`idem_broker::Consumer`] with [`idem_broker::StoreMode`] over an [`idem::Executor`], or
//! [`idem_broker::TransactionalMode`] over a [`Transactional`] store), with the planned faults at their points and every outcome
//! counted.
//!
//! [`Watched`] wraps the runtime's processor to see each delivery's outcome (the report's
//! `outcomes`, and when an effect is recorded); in transactional mode it also runs the slow
//! work and pauses before the transaction (a transactional handler must not sleep holding the
//! write lock) and fails planned store calls before or after the transaction.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::time::Duration;

use idem::{
    Acquisition, Attempt, Claim, ClaimRequest, Completion, Fingerprint, Key, Namespace, Outcome,
    Record, Store, StoreError, Token, Transactional, TxFuture, WriteOutcome,
};
use idem_broker::{Message, Processor, RoundOutcome};

use crate::faults::{CrashPoint, ErrorSide, Fault};
use crate::harness::Stalls;
use crate::incarnation::Incarnation;
use crate::ledger::{
    CrashHook, DieInTransaction, Effect, Sabotage, TransactionalLedger, TransferJob,
};
use crate::stats::{Cell, Window};
use crate::tap::Tap;
use crate::workload::Workload;

/// A store behind one consumer's freeze gate: while the consumer is frozen, none of its store
/// calls starts or returns (no heartbeat goes out, no completion is heard). A call runs in a
/// task of its own, so that a crash, which drops the consumer's tasks, never cancels a call
/// half-way inside the shared store client: what the consumer sent completes, as a request
/// already on the wire does when a process dies; what it had not sent never goes out.
///
/// Every method forwards in its own form: batches stay batches.
pub(crate) struct Gated<S> {
    pub(crate) inner: Arc<S>,
    pub(crate) inc: Arc<Incarnation>,
}

impl<S: Store> Gated<S> {
    /// Runs `call` (built from the inner store) behind the gate, in a task of its own.
    async fn run<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<S>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        self.inc
            .gate(async move {
                match tokio::spawn(call(inner)).await {
                    Ok(out) => out,
                    Err(e) => Err(StoreError::unavailable(format!(
                        "the store call's task failed: {e}"
                    ))),
                }
            })
            .await
    }
}

impl<S: Store> Store for Gated<S> {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let req = req.clone();
        self.run(|s| async move { s.claim(&req).await }).await
    }

    async fn claim_many(&self, reqs: &[ClaimRequest]) -> Result<Vec<Claim>, StoreError> {
        let reqs = reqs.to_vec();
        self.run(|s| async move { s.claim_many(&reqs).await }).await
    }

    async fn complete(&self, c: &Completion) -> Result<WriteOutcome, StoreError> {
        let c = c.clone();
        self.run(|s| async move { s.complete(&c).await }).await
    }

    async fn complete_many(&self, cs: &[Completion]) -> Result<Vec<WriteOutcome>, StoreError> {
        let cs = cs.to_vec();
        self.run(|s| async move { s.complete_many(&cs).await })
            .await
    }

    async fn release(
        &self,
        key: &Key,
        token: Token,
        retention: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        let key = key.clone();
        self.run(move |s| async move { s.release(&key, token, retention).await })
            .await
    }

    async fn extend(
        &self,
        key: &Key,
        token: Token,
        lease: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        let key = key.clone();
        self.run(move |s| async move { s.extend(&key, token, lease).await })
            .await
    }

    async fn fail(
        &self,
        key: &Key,
        token: Token,
        reason: &str,
        retention: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        let (key, reason) = (key.clone(), reason.to_owned());
        self.run(move |s| async move { s.fail(&key, token, &reason, retention).await })
            .await
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        let key = key.clone();
        self.run(|s| async move { s.get(&key).await }).await
    }

    async fn evict(&self, key: &Key) -> Result<bool, StoreError> {
        let key = key.clone();
        self.run(|s| async move { s.evict(&key).await }).await
    }

    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        self.run(move |s| async move { s.purge_expired(limit).await })
            .await
    }

    fn max_result_bytes(&self) -> usize {
        self.inner.max_result_bytes()
    }
}

/// What the handlers of one consumer need.
pub(crate) struct HandlerCtx<E> {
    pub(crate) inc: Arc<Incarnation>,
    pub(crate) tap: Arc<Tap>,
    /// The effect: an [`Effect`] in store mode, the [`TransactionalLedger`] in transactional
    /// mode.
    pub(crate) effect: Arc<E>,
    pub(crate) workload: Arc<Workload>,
    pub(crate) stalls: Stalls,
    pub(crate) sabotage: Option<Sabotage>,
}

/// Store mode's handler: the planned crashes around the effect, slow work, the pause.
pub(crate) fn store_handler<E: Effect>(
    ctx: Arc<HandlerCtx<E>>,
) -> impl Fn(Message, Attempt) -> std::pin::Pin<Box<dyn Future<Output = Result<(), Infallible>> + Send>>
+ Send
+ Sync
+ 'static {
    move |message: Message, attempt: Attempt| {
        let ctx = Arc::clone(&ctx);
        let inc = Arc::clone(&ctx.inc);
        Box::pin(inc.clone().gate(async move {
            let Some(cell) = ctx.tap.cell(&message) else {
                ctx.inc
                    .stats
                    .error(format!("no cell for message {:?}", message.message_id()));
                return Ok(());
            };
            let Some(&transfer) = ctx.workload.transfers.get(cell.message as usize) else {
                return Ok(());
            };
            let f = cell.faults;
            if attempt.acquisition() == Acquisition::Takeover {
                inc.stats.takeovers.fetch_add(1, Ordering::Relaxed);
            }
            if f.crash == Some(CrashPoint::BeforeEffect) {
                match inc.crash(Fault::CrashBefore).await {}
            }
            if f.slow {
                inc.slow(ctx.stalls.slow).await;
            }
            for _ in 0..Sabotage::applications(ctx.sabotage, cell.message) {
                ctx.effect.apply(cell.message, transfer).await;
            }
            cell.applied(Some(attempt.token()));
            if f.crash == Some(CrashPoint::AfterEffect) {
                match inc.crash(Fault::CrashAfterEffect).await {}
            }
            if f.pause {
                inc.pause(ctx.stalls.pause).await;
            }
            Ok(())
        }))
    }
}

/// Gives a transactional handler closure its higher-ranked signature.
fn tx_fn<Tx, F>(f: F) -> F
where
    F: for<'a> Fn(&'a Message, &'a mut Tx) -> TxFuture<'a, (), String>,
{
    f
}

/// Transactional mode's handler: the ledger's writes, dying inside the transaction where the
/// plan says.
pub(crate) fn tx_handler<L: TransactionalLedger>(
    ctx: Arc<HandlerCtx<L>>,
    namespace: Namespace,
) -> impl for<'a> Fn(&'a Message, &'a mut <L::Store as Transactional>::Tx) -> TxFuture<'a, (), String>
+ Send
+ Sync
+ 'static {
    tx_fn::<<L::Store as Transactional>::Tx, _>(move |message: &Message, tx| {
        let job = job_of(&ctx, &namespace, message);
        let ledger = Arc::clone(&ctx.effect);
        Box::pin(async move {
            let Some((job, cell)) = job else {
                return Err(format!(
                    "message {:?} is not a delivery of the harness",
                    message.message_id()
                ));
            };
            ledger.apply(tx, &job).await?;
            cell.ran.store(true, Ordering::Relaxed);
            Ok(())
        })
    })
}

/// The transfer job of a delivery, with its planned death inside the transaction.
fn job_of<L>(
    ctx: &Arc<HandlerCtx<L>>,
    namespace: &Namespace,
    message: &Message,
) -> Option<(TransferJob, Arc<Cell>)> {
    let cell = ctx.tap.cell(message)?;
    let index = cell.message;
    let transfer = *ctx.workload.transfers.get(index as usize)?;
    let die = match cell.faults.crash {
        Some(CrashPoint::BeforeEffect) => Some(DieInTransaction::BeforeWrites),
        Some(CrashPoint::AfterEffect) => Some(DieInTransaction::AfterWrites),
        _ => None,
    };
    let fault = if die == Some(DieInTransaction::BeforeWrites) {
        Fault::CrashBefore
    } else {
        Fault::CrashAfterEffect
    };
    let inc = Arc::clone(&ctx.inc);
    let job = TransferJob {
        key: namespace.key(Workload::message_id(index)).ok()?,
        payload: ctx.workload.payload(index),
        index,
        transfer,
        applications: Sabotage::applications(ctx.sabotage, index),
        die,
        died: Arc::new(AtomicBool::new(false)),
        // The consumer goes down with the handler: its connection is cut at once, and the
        // panic that follows undoes the handler's writes.
        crash: CrashHook::new(move || inc.crash_now(fault)),
    };
    Some((job, cell))
}

/// Which mode a [`Watched`] processor serves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Store,
    Transactional,
}

/// The runtime's processor, watched: outcomes counted and effects marked recorded; in
/// transactional mode, the stalls and store errors the plan puts around the transaction.
pub(crate) struct Watched<P> {
    /// Shared with the task each transactional round runs in.
    pub(crate) inner: Arc<P>,
    pub(crate) inc: Arc<Incarnation>,
    pub(crate) tap: Arc<Tap>,
    pub(crate) stalls: Stalls,
    pub(crate) kind: Kind,
}

fn injected(side: &str) -> idem::Error {
    StoreError::unavailable(format!(
        "injected fault: the transactional call failed {side} reaching the store"
    ))
    .into()
}

impl<P: Processor> Watched<P> {
    fn window_of(&self, cell: &Cell) -> Window {
        if self.inc.frozen_since(cell.freezes_before) {
            Window::PauseTakeover
        } else {
            Window::Other
        }
    }

    /// Counts the outcomes of a round; an executed delivery's effect is recorded, any other's
    /// pending effect is a suspect.
    fn account(&self, cells: &[Option<Arc<Cell>>], out: &RoundOutcome<P::Output, P::Error>) {
        let stats = &self.inc.stats;
        for (i, cell) in cells.iter().enumerate() {
            let outcome = match out {
                Ok(outcomes) => outcomes.get(i),
                Err(_) => None,
            };
            match outcome {
                Some(Ok(outcome)) => {
                    stats.outcome(outcome.kind());
                    if let Some(cell) = cell {
                        if outcome.is_executed() {
                            cell.recorded();
                        } else if matches!(outcome, Outcome::LeaseLost { .. }) {
                            cell.window(self.window_of(cell));
                        } else {
                            cell.window(Window::Other);
                        }
                    }
                }
                _ => {
                    stats.outcome("store_error");
                    if let Some(cell) = cell {
                        cell.window(Window::Other);
                    }
                }
            }
        }
    }

    async fn transactional(
        &self,
        items: Vec<(Key, Fingerprint)>,
        messages: Vec<Message>,
        cells: Vec<Option<Arc<Cell>>>,
    ) -> RoundOutcome<P::Output, P::Error> {
        let stats = &self.inc.stats;
        let faults = |i: usize| cells[i].as_ref().map(|c| c.faults).unwrap_or_default();
        let slow = (0..cells.len()).filter(|&i| faults(i).slow).count();
        if slow > 0 {
            for _ in 1..slow {
                stats.faults.hit(Fault::Slow);
            }
            self.inc.slow(self.stalls.slow).await;
        }
        for i in 0..cells.len() {
            if faults(i).pause {
                self.inc.pause(self.stalls.pause).await;
            }
        }
        self.inc
            .gate(async {
                // A store error before the call: the transaction never started for it.
                let mut kept = Vec::with_capacity(items.len());
                let mut kept_messages = Vec::with_capacity(items.len());
                let mut before = vec![false; items.len()];
                for (i, (item, message)) in items.into_iter().zip(messages).enumerate() {
                    if faults(i).store_error == Some(ErrorSide::Before) {
                        stats.faults.hit(Fault::StoreError);
                        before[i] = true;
                    } else {
                        kept.push(item);
                        kept_messages.push(message);
                    }
                }
                let mut done = if kept.is_empty() {
                    Vec::new()
                } else {
                    // In a task of its own, like store mode's calls (see [`Gated`]): a crash
                    // never cancels a transaction half-way inside the store client; what the
                    // consumer began completes (commits or rolls back) on its own.
                    let inner = Arc::clone(&self.inner);
                    tokio::spawn(async move { inner.process(kept, kept_messages).await })
                        .await
                        .map_err(|e| {
                            idem::Error::from(StoreError::unavailable(format!(
                                "the transaction's task failed: {e}"
                            )))
                        })??
                }
                .into_iter();
                let mut out = Vec::with_capacity(before.len());
                for (i, before) in before.into_iter().enumerate() {
                    if before {
                        out.push(Err(injected("before")));
                        continue;
                    }
                    let Some(outcome) = done.next() else {
                        out.push(Err(injected("before")));
                        continue;
                    };
                    if faults(i).store_error == Some(ErrorSide::After) {
                        // The call happened (committed or not), but the consumer hears an error.
                        stats.faults.hit(Fault::StoreError);
                        out.push(Err(injected("after")));
                    } else {
                        out.push(outcome);
                    }
                }
                Ok(out)
            })
            .await
    }
}

impl<P: Processor> Processor for Watched<P> {
    type Output = P::Output;
    type Error = P::Error;

    async fn process(
        &self,
        items: Vec<(Key, Fingerprint)>,
        messages: Vec<Message>,
    ) -> RoundOutcome<P::Output, P::Error> {
        let cells: Vec<Option<Arc<Cell>>> = messages.iter().map(|m| self.tap.cell(m)).collect();
        let out = match self.kind {
            Kind::Store => self.inner.process(items, messages).await,
            Kind::Transactional => self.transactional(items, messages, cells.clone()).await,
        };
        self.account(&cells, &out);
        out
    }

    fn release_abandoned(&self) -> impl Future<Output = ()> + Send {
        self.inner.release_abandoned()
    }
}
