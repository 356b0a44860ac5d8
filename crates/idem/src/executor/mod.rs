//! The [`Executor`]: what handler authors use. `run(key, payload, handler)` claims, runs the
//! handler only when the claim is acquired, records the result, and returns an [`Outcome`] that
//! says whether the message may be acked (docs/design.md, section 4).

mod attempt;
mod outcome;

use std::fmt;
use std::future::{Future, poll_fn};
use std::num::NonZeroU32;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;
use tracing::Instrument;

pub use self::attempt::Attempt;
use self::attempt::LeaseSignal;
pub use self::outcome::{Disposition, Outcome};
use crate::error::{Error, StoreError};
use crate::key::{Fingerprint, Key};
use crate::metrics::{Metrics, Op};
use crate::policy::{self, Mode, Step, Verdict};
use crate::record::Owner;
use crate::store::{
    Acquisition, Claim, ClaimRequest, Completion, DEFAULT_LEASE, DEFAULT_RETENTION, Lease, Store,
    WriteOutcome, default_owner,
};
use crate::stored::Stored;

/// What to do when a claim meets another consumer's live lease.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub enum OnInProgress {
    /// Return [`Outcome::InProgress`] at once: the caller has the broker redeliver later
    /// (a delayed nack), never acks. The default: it holds no consumer slot while waiting.
    #[default]
    RetryLater,
    /// Poll the store until the first run completes (then replay its result) or `timeout`
    /// passes (then [`Outcome::InProgress`]). For request/response callers that must answer.
    WaitForResult(Duration),
}

/// How often the heartbeat extends the lease while a handler runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub enum Heartbeat {
    /// Every third of the lease (the default): two extends can fail before the lease ends.
    #[default]
    Auto,
    /// At a fixed interval, which must be shorter than the lease.
    Every(Duration),
    /// Never: handlers must finish within the lease.
    Off,
}

/// Exponential backoff with jitter, for retries of failed handlers and transient store errors.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Upper bound on any delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// A backoff from `initial` doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max }
    }

    /// The delay after failure number `n` (from 1), with ±25% jitter so that consumers that
    /// failed together do not retry together.
    pub fn delay(&self, n: u32) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32 << n.saturating_sub(1).min(20));
        let base = exp.min(self.max);
        let jitter = 0.75 + fastrand::f64() * 0.5;
        base.mul_f64(jitter).min(self.max)
    }
}

/// The executor's settings. Start from `Config::default()` and change what you need:
///
/// ```
/// use std::time::Duration;
/// let config = idem::Config::default()
///     .lease(Duration::from_secs(60))
///     .max_attempts(3)
///     .name("payments");
/// assert_eq!(config.lease, Duration::from_secs(60));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// Lease of each claim.
    pub lease: Duration,
    /// Retention of completed and failed records.
    pub retention: Duration,
    /// Attempt limit, `None` for unlimited.
    pub max_attempts: Option<NonZeroU32>,
    /// Policy for in-progress duplicates.
    pub on_in_progress: OnInProgress,
    /// Lease heartbeat.
    pub heartbeat: Heartbeat,
    /// Backoff before retrying a failed handler.
    pub retry_backoff: Backoff,
    /// Owner label written with claims.
    pub owner: Owner,
    /// Name used as the `executor` label of metrics.
    pub name: String,
}

impl Config {
    /// How long a claim is honoured without a heartbeat (default 30 s). A consumer that dies
    /// mid-handler blocks redeliveries of its message for at most this long.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long a completed (or failed) record is remembered (default 7 days). Must exceed the
    /// broker's redelivery horizon; after it the key is processed again.
    #[must_use]
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// After this many attempts the key is failed and dead-lettered (default 5). `0` means no
    /// limit.
    #[must_use]
    pub fn max_attempts(mut self, max: u32) -> Self {
        self.max_attempts = NonZeroU32::new(max);
        self
    }

    /// The in-progress policy (default [`OnInProgress::RetryLater`]).
    #[must_use]
    pub fn on_in_progress(mut self, policy: OnInProgress) -> Self {
        self.on_in_progress = policy;
        self
    }

    /// The heartbeat (default [`Heartbeat::Auto`]).
    #[must_use]
    pub fn heartbeat(mut self, heartbeat: Heartbeat) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// Backoff before a failed handler is retried (default 200 ms doubling to 60 s).
    #[must_use]
    pub fn retry_backoff(mut self, backoff: Backoff) -> Self {
        self.retry_backoff = backoff;
        self
    }

    /// The owner label stored with claims (default `hostname:pid`).
    #[must_use]
    pub fn owner(mut self, owner: impl Into<Owner>) -> Self {
        self.owner = owner.into();
        self
    }

    /// The name that labels this executor's metrics (default `default`).
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            lease: DEFAULT_LEASE,
            retention: DEFAULT_RETENTION,
            max_attempts: NonZeroU32::new(5),
            on_in_progress: OnInProgress::default(),
            heartbeat: Heartbeat::default(),
            retry_backoff: Backoff::default(),
            owner: default_owner(),
            name: "default".to_owned(),
        }
    }
}

/// Runs handlers at most once per key, over any [`Store`].
///
/// Clones share the store and settings.
///
/// ```
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem::{Disposition, Executor, MemoryStore, Namespace};
///
/// let exec = Executor::new(MemoryStore::new());
/// let ns = Namespace::new("emails")?;
/// let payload = br#"{"to": "ada@example.com"}"#;
///
/// for _delivery in 0..2 {
///     let key = ns.key("msg-0192b7c4")?;
///     let outcome = exec
///         .run(key, payload, |attempt| async move {
///             // send the email, passing attempt.idempotency_key() to the provider
///             Ok::<_, std::io::Error>(format!("sent by attempt {}", attempt.number()))
///         })
///         .await?;
///     assert_eq!(outcome.disposition(), Disposition::Ack); // executed, then replayed
/// }
/// # Ok(()) }
/// ```
pub struct Executor<S> {
    inner: Arc<Inner<S>>,
}

struct Inner<S> {
    store: S,
    config: Config,
    metrics: Metrics,
}

impl<S> Clone for Executor<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S> fmt::Debug for Executor<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Executor")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// How long transient store errors on `complete` are retried after the handler finished,
/// at the least; the lease extends it.
const COMPLETE_RETRY_FLOOR: Duration = Duration::from_secs(2);

impl<S: Store> Executor<S> {
    /// An executor with the default settings.
    pub fn new(store: S) -> Self {
        Self::with_config(store, Config::default())
    }

    /// An executor with `config`.
    pub fn with_config(store: S, config: Config) -> Self {
        let metrics = Metrics::new(&config.name);
        Self {
            inner: Arc::new(Inner {
                store,
                config,
                metrics,
            }),
        }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// A claim request for `key` with this executor's lease, retention, limit and owner.
    pub fn claim_request(&self, key: Key, fingerprint: Fingerprint) -> ClaimRequest {
        policy::claim_request(key, fingerprint, &self.inner.config)
    }

    /// Processes one delivery: the fingerprint is that of `payload`.
    ///
    /// The handler runs only if the claim is acquired; its `Ok` result is recorded before this
    /// returns [`Outcome::Executed`]. See [`Outcome::disposition`] for what to do next.
    ///
    /// # Errors
    /// [`Error::Store`] when the store fails (the handler did not run, or its result could not
    /// be recorded): fail closed, do not ack, retry later. [`Error::Codec`] when a stored
    /// result cannot be decoded as `T`.
    pub async fn run<T, E, F, Fut>(
        &self,
        key: Key,
        payload: &[u8],
        handler: F,
    ) -> Result<Outcome<T, E>, Error>
    where
        T: Stored,
        E: fmt::Display,
        F: FnOnce(Attempt) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_with_fingerprint(key, Fingerprint::of(payload), handler)
            .await
    }

    /// As [`run`](Executor::run), with a fingerprint of the caller's choice (of the part of the
    /// payload that identifies it, say).
    ///
    /// # Errors
    /// As [`run`](Executor::run).
    pub async fn run_with_fingerprint<T, E, F, Fut>(
        &self,
        key: Key,
        fingerprint: Fingerprint,
        handler: F,
    ) -> Result<Outcome<T, E>, Error>
    where
        T: Stored,
        E: fmt::Display,
        F: FnOnce(Attempt) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let span = tracing::debug_span!("idem.run", key = %key);
        async move {
            let req = self.claim_request(key, fingerprint);
            let claim = self.claim(&req).await?;
            match self.settle_claim(&req, claim).await? {
                Settled::Run(lease) => {
                    let attempt = self.attempt(&req.key, lease);
                    let result = self
                        .drive(&req.key, &attempt, handler(attempt.clone()))
                        .await;
                    self.finish(&req.key, &attempt, result).await
                }
                Settled::Done(outcome) => Ok(outcome),
            }
        }
        .instrument(span)
        .await
    }

    /// Processes a batch of deliveries with one claim round trip and one completion round trip
    /// (for stores that batch): handlers of acquired keys run concurrently.
    ///
    /// `handler(i, attempt)` processes item `i`. Outcomes come back in input order. Items that
    /// meet an in-progress claim follow the [`OnInProgress`] policy after the batch's handlers
    /// have run.
    ///
    /// # Errors
    /// The outer `Err` when the batch claim fails: no handler ran. An inner `Err` when that
    /// item's result could not be recorded (fail closed for that message).
    pub async fn run_batch<T, E, F, Fut>(
        &self,
        items: Vec<(Key, Fingerprint)>,
        handler: F,
    ) -> Result<Vec<Result<Outcome<T, E>, Error>>, Error>
    where
        T: Stored,
        E: fmt::Display,
        F: Fn(usize, Attempt) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let reqs: Vec<ClaimRequest> = items
            .into_iter()
            .map(|(key, fp)| self.claim_request(key, fp))
            .collect();
        let claims = self
            .timed(Op::Claim, self.inner.store.claim_many(&reqs))
            .await?;

        let mut outcomes: Vec<Option<Result<Outcome<T, E>, Error>>> =
            (0..reqs.len()).map(|_| None).collect();
        let mut running = Vec::new();
        let mut others = Vec::new();
        for (i, claim) in claims.into_iter().enumerate() {
            self.count_claim(&claim);
            match claim {
                Claim::Acquired(lease) => running.push((i, self.attempt(&reqs[i].key, lease))),
                claim => others.push((i, claim)),
            }
        }

        // Handlers finish at different times. Each group that finishes together is recorded
        // with one completion round trip while slower handlers keep running: until a result is
        // durable, a crash makes its redelivery run the handler again, so a slow handler must
        // not hold back the completion of fast ones.
        let reqs = &reqs[..];
        let mut pending: FuturesUnordered<_> = running
            .into_iter()
            .map(|(i, attempt)| {
                let fut = handler(i, attempt.clone());
                async move {
                    let result = self.drive(&reqs[i].key, &attempt, fut).await;
                    (i, attempt, result)
                }
            })
            .collect();
        let mut finished = Vec::new();
        loop {
            if finished.is_empty() {
                match pending.next().await {
                    Some(done) => finished.push(done),
                    None => break,
                }
            }
            while let Some(Some(done)) = pending.next().now_or_never() {
                finished.push(done);
            }
            let group = std::mem::take(&mut finished);
            let mut record = pin!(self.record_group(reqs, group, &mut outcomes));
            loop {
                tokio::select! {
                    biased;
                    () = &mut record => break,
                    Some(done) = pending.next(), if !pending.is_empty() => finished.push(done),
                }
            }
        }

        for (i, claim) in others {
            let req = &reqs[i];
            outcomes[i] = Some(match self.settle_claim(req, claim).await {
                Ok(Settled::Done(outcome)) => Ok(outcome),
                Ok(Settled::Run(lease)) => {
                    let attempt = self.attempt(&req.key, lease);
                    let result = self
                        .drive(&req.key, &attempt, handler(i, attempt.clone()))
                        .await;
                    self.finish(&req.key, &attempt, result).await
                }
                Err(e) => Err(e),
            });
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(unreachable_outcome))
            .collect())
    }

    /// Records a group of finished handlers of a batch: successes with one completion round
    /// trip, failures one by one.
    async fn record_group<T: Stored, E: fmt::Display>(
        &self,
        reqs: &[ClaimRequest],
        group: Vec<(usize, Attempt, Result<T, E>)>,
        outcomes: &mut [Option<Result<Outcome<T, E>, Error>>],
    ) {
        let mut completions = Vec::new();
        let mut values = Vec::new();
        for (i, attempt, result) in group {
            let key = &reqs[i].key;
            if attempt.is_lease_lost() {
                outcomes[i] = Some(Ok(self.lost(&attempt)));
                continue;
            }
            match self.verdict(result, &attempt) {
                Ok(Verdict::Complete { value, result }) => {
                    completions.push(
                        Completion::new(key.clone(), attempt.token, result)
                            .retention(self.inner.config.retention),
                    );
                    values.push((i, value, attempt.number));
                }
                Ok(verdict) => outcomes[i] = Some(self.write(key, &attempt, verdict).await),
                Err(e) => outcomes[i] = Some(Err(e)),
            }
        }
        if completions.is_empty() {
            return;
        }
        match self.complete_with_retry(&completions).await {
            Ok(written) => {
                for ((i, value, attempt), written) in values.into_iter().zip(written) {
                    let verdict = Verdict::Complete {
                        value,
                        result: bytes::Bytes::new(),
                    };
                    outcomes[i] = Some(Ok(self.recorded(verdict, attempt, written)));
                }
            }
            Err(e) => {
                for (i, _, _) in values {
                    outcomes[i] = Some(Err(Error::Store(StoreError::new(
                        e.kind(),
                        format!("batch completion failed: {}", e.message()),
                    ))));
                }
            }
        }
    }

    /// The outcome of a verdict's write, counted.
    fn recorded<T, E>(
        &self,
        verdict: Verdict<T, E>,
        attempt: u32,
        written: WriteOutcome,
    ) -> Outcome<T, E> {
        let outcome = verdict.recorded(attempt, written);
        let m = &self.inner.metrics;
        match &outcome {
            Outcome::Executed(_) => m.executed.increment(1),
            Outcome::Released { .. } => m.released.increment(1),
            Outcome::Exhausted { .. } => m.exhausted.increment(1),
            Outcome::LeaseLost { .. } => m.lease_lost.increment(1),
            _ => {}
        }
        outcome
    }

    /// The outcome of a handler whose lease the heartbeat found lost: nothing is written.
    fn lost<T, E>(&self, attempt: &Attempt) -> Outcome<T, E> {
        self.inner.metrics.lease_lost.increment(1);
        policy::lease_lost(attempt.number)
    }

    /// The policy's verdict on a handler's result, logged when the key must fail.
    fn verdict<T: Stored, E: fmt::Display>(
        &self,
        result: Result<T, E>,
        attempt: &Attempt,
    ) -> Result<Verdict<T, E>, Error> {
        let verdict = policy::on_result(
            result,
            attempt.number,
            &self.inner.config,
            self.inner.store.max_result_bytes(),
            Mode::Store,
        )?;
        if let Verdict::Fail {
            reason,
            error: None,
        } = &verdict
        {
            tracing::error!(key = %attempt.key, "{reason}");
        }
        Ok(verdict)
    }

    fn attempt(&self, key: &Key, lease: Lease) -> Attempt {
        Attempt {
            key: key.clone(),
            token: lease.token,
            number: lease.attempt,
            acquisition: lease.acquisition,
            signal: Arc::new(LeaseSignal::default()),
        }
    }

    async fn timed<R>(
        &self,
        op: Op,
        fut: impl Future<Output = Result<R, StoreError>>,
    ) -> Result<R, StoreError> {
        let metrics = &self.inner.metrics;
        let start = metrics.timed.then(std::time::Instant::now);
        let out = fut.await;
        let elapsed = start.map_or(Duration::ZERO, |s| s.elapsed());
        metrics.store_op(op, elapsed, out.is_ok());
        if let Err(e) = &out {
            tracing::warn!(op = ?op, error = %e, "idem store operation failed");
        }
        out
    }

    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let claim = self.timed(Op::Claim, self.inner.store.claim(req)).await?;
        self.count_claim(&claim);
        Ok(claim)
    }

    fn count_claim(&self, claim: &Claim) {
        let m = &self.inner.metrics;
        match claim {
            Claim::Acquired(lease) => match lease.acquisition {
                Acquisition::Takeover => m.takeovers.increment(1),
                Acquisition::Reprocess => m.reprocessed.increment(1),
                _ => {}
            },
            Claim::InProgress { .. } => m.in_progress.increment(1),
            Claim::Completed { .. } => m.replayed.increment(1),
            Claim::Mismatch { .. } => m.mismatches.increment(1),
            Claim::Exhausted { .. } => m.exhausted.increment(1),
        }
    }

    /// Turns a claim into either a lease to run under or a final outcome, applying the
    /// in-progress policy: under `WaitForResult` an in-progress claim waits (claiming again)
    /// for the first run's result, in [`wait_for_result`](Self::wait_for_result), a future of
    /// its own that the common path never builds.
    async fn settle_claim<T: Stored, E>(
        &self,
        req: &ClaimRequest,
        claim: Claim,
    ) -> Result<Settled<T, E>, Error> {
        match (
            policy::on_claim(claim, req.fingerprint)?,
            self.inner.config.on_in_progress,
        ) {
            (Step::Run(lease), _) => Ok(Settled::Run(lease)),
            (
                Step::Done(Outcome::InProgress { retry_after }),
                OnInProgress::WaitForResult(timeout),
            ) => Box::pin(self.wait_for_result(req, retry_after, Instant::now() + timeout)).await,
            (Step::Done(outcome), _) => Ok(Settled::Done(outcome)),
        }
    }

    /// Claims again until the first run completes (its result is replayed) or `deadline`
    /// passes (then [`Outcome::InProgress`]).
    async fn wait_for_result<T: Stored, E>(
        &self,
        req: &ClaimRequest,
        mut retry_after: Duration,
        deadline: Instant,
    ) -> Result<Settled<T, E>, Error> {
        let mut polls = 0u32;
        while Instant::now() < deadline {
            // Poll quickly at first (the first run is often nearly done), then back off, never
            // past the deadline.
            polls += 1;
            let step = Duration::from_millis(5 << polls.min(6)).min(retry_after);
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(step.min(left)).await;
            let claim = self.claim(req).await?;
            retry_after = match policy::on_claim(claim, req.fingerprint)? {
                Step::Run(lease) => return Ok(Settled::Run(lease)),
                Step::Done(Outcome::InProgress { retry_after }) => retry_after,
                Step::Done(outcome) => return Ok(Settled::Done(outcome)),
            };
        }
        Ok(Settled::Done(Outcome::InProgress { retry_after }))
    }

    /// Runs the handler future, extending the lease while it is pending.
    async fn drive<Fut: Future>(&self, key: &Key, attempt: &Attempt, fut: Fut) -> Fut::Output {
        let mut fut = pin!(fut);
        // Most handlers finish in one poll or within a third of the lease: no timer for them.
        if let Poll::Ready(out) = poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
            return out;
        }
        let interval = match self.inner.config.heartbeat {
            Heartbeat::Off => return fut.await,
            Heartbeat::Auto => self.inner.config.lease / 3,
            Heartbeat::Every(d) => d,
        };
        let heartbeat = pin!(self.heartbeat(key, attempt, interval));
        let mut heartbeat = heartbeat;
        let mut beating = true;
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return out,
                () = &mut heartbeat, if beating => beating = false,
            }
        }
    }

    /// Extends the lease every `interval` until it is lost (then returns).
    async fn heartbeat(&self, key: &Key, attempt: &Attempt, interval: Duration) {
        let interval = interval.max(Duration::from_millis(1));
        loop {
            tokio::time::sleep(interval).await;
            match self
                .timed(
                    Op::Extend,
                    self.inner
                        .store
                        .extend(key, attempt.token, self.inner.config.lease),
                )
                .await
            {
                Ok(WriteOutcome::Applied) => {}
                Ok(WriteOutcome::LeaseLost) => {
                    tracing::warn!(key = %key, "lease lost while the handler ran");
                    attempt.signal.set_lost();
                    return;
                }
                // Keep beating: the final, fenced write decides whether the lease held.
                Err(_) => {}
            }
        }
    }

    /// Records the handler's result: complete, release, or fail, as the policy decides.
    async fn finish<T: Stored, E: fmt::Display>(
        &self,
        key: &Key,
        attempt: &Attempt,
        result: Result<T, E>,
    ) -> Result<Outcome<T, E>, Error> {
        if attempt.is_lease_lost() {
            return Ok(self.lost(attempt));
        }
        match self.verdict(result, attempt)? {
            // The common case, written out here: a nested future would be built and then moved
            // into this one, a copy of a few hundred bytes per message.
            Verdict::Complete { value, result } => {
                let completion = Completion::new(key.clone(), attempt.token, result)
                    .retention(self.inner.config.retention);
                let written = self
                    .complete_with_retry(std::slice::from_ref(&completion))
                    .await?;
                let written = written.first().copied().unwrap_or(WriteOutcome::LeaseLost);
                let verdict = Verdict::Complete {
                    value,
                    result: completion.result,
                };
                Ok(self.recorded(verdict, attempt.number, written))
            }
            // Releases and failures: rarer, boxed so that their future does not grow this one.
            verdict => Box::pin(self.write(key, attempt, verdict)).await,
        }
    }

    /// Makes the verdict's write and returns its outcome.
    async fn write<T, E>(
        &self,
        key: &Key,
        attempt: &Attempt,
        verdict: Verdict<T, E>,
    ) -> Result<Outcome<T, E>, Error> {
        let store = &self.inner.store;
        let retention = self.inner.config.retention;
        let token = attempt.token;
        let written = match &verdict {
            Verdict::Complete { result, .. } => {
                let completion =
                    Completion::new(key.clone(), token, result.clone()).retention(retention);
                let written = self
                    .complete_with_retry(std::slice::from_ref(&completion))
                    .await?;
                written.first().copied().unwrap_or(WriteOutcome::LeaseLost)
            }
            Verdict::Release { .. } => {
                self.timed(Op::Release, store.release(key, token, retention))
                    .await?
            }
            Verdict::Fail { reason, .. } => {
                self.timed(Op::Fail, store.fail(key, token, reason, retention))
                    .await?
            }
        };
        Ok(self.recorded(verdict, attempt.number, written))
    }

    /// Completes, retrying transient store errors for a while: the effect has happened, and
    /// every retry shrinks the window in which a redelivery would run it again. Completion is
    /// fenced and idempotent, so a retry after a lost response is safe.
    async fn complete_with_retry(
        &self,
        completions: &[Completion],
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        let give_up = Instant::now() + self.inner.config.lease.max(COMPLETE_RETRY_FLOOR);
        let mut n = 0;
        loop {
            let out = if let [one] = completions {
                self.timed(Op::Complete, self.inner.store.complete(one))
                    .await
                    .map(|w| vec![w])
            } else {
                self.timed(Op::Complete, self.inner.store.complete_many(completions))
                    .await
            };
            match out {
                Err(e) if e.is_transient() && Instant::now() < give_up => {
                    n += 1;
                    let delay =
                        Backoff::new(Duration::from_millis(10), Duration::from_secs(1)).delay(n);
                    tokio::time::sleep(delay).await;
                }
                out => return out,
            }
        }
    }
}

enum Settled<T, E> {
    Run(Lease),
    Done(Outcome<T, E>),
}

#[cold]
fn unreachable_outcome<T, E>() -> Result<Outcome<T, E>, Error> {
    // Every index is filled above; this keeps a logic slip from panicking in production.
    Err(Error::Store(StoreError::new(
        crate::StoreErrorKind::Backend,
        "internal error: batch item without an outcome",
    )))
}
