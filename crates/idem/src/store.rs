//! The [`Store`] trait: the atomic operations of the contract's state machine, and the request
//! and outcome types they exchange.
//!
//! A store keeps one [`Record`] per [`Key`]. Every operation is atomic in the store; every write
//! after a claim is fenced by the claim's [`Token`]. [`transition`](crate::transition) holds the
//! state machine as pure functions that single-writer stores (memory, SQLite) apply directly;
//! networked stores implement the same table in SQL or Lua, and the `idem-conformance` crate
//! checks that they agree.

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;

use crate::error::StoreError;
use crate::key::{Fingerprint, Key};
use crate::record::{Owner, Record, State, Timestamp, Token};

/// Default lease: how long a claim is honoured without a heartbeat.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Default retention (dedup window): 7 days, the default log retention of Kafka, so that a
/// replay of a whole default-sized log is still deduplicated.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default limit on a stored result, in bytes.
pub const DEFAULT_MAX_RESULT_BYTES: usize = 64 * 1024;

/// A request to claim a key: the input of [`Store::claim`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClaimRequest {
    /// The key to claim.
    pub key: Key,
    /// Fingerprint of the payload.
    pub fingerprint: Fingerprint,
    /// The token this claim will hold if it is acquired (drawn by the claimer, see [`Token`]).
    pub token: Token,
    /// Who claims, for operators.
    pub owner: Owner,
    /// How long the claim is honoured without an [`extend`](Store::extend).
    pub lease: Duration,
    /// How long an abandoned claim is kept after its lease ends.
    pub retention: Duration,
    /// Claims that would start attempt `max_attempts + 1` fail the record instead and return
    /// [`Claim::Exhausted`]; `None` for no limit.
    pub max_attempts: Option<NonZeroU32>,
}

impl ClaimRequest {
    /// A request with a fresh random token, this process as owner, and the default lease and
    /// retention.
    pub fn new(key: Key, fingerprint: Fingerprint) -> Self {
        Self {
            key,
            fingerprint,
            token: Token::random(),
            owner: default_owner(),
            lease: DEFAULT_LEASE,
            retention: DEFAULT_RETENTION,
            max_attempts: None,
        }
    }

    /// Sets the lease.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets the retention.
    #[must_use]
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Sets the attempt limit.
    #[must_use]
    pub fn max_attempts(mut self, max: Option<NonZeroU32>) -> Self {
        self.max_attempts = max;
        self
    }

    /// Sets the owner label.
    #[must_use]
    pub fn owner(mut self, owner: Owner) -> Self {
        self.owner = owner;
        self
    }

    /// Sets the token (tests that replay a stale token need this).
    #[must_use]
    pub fn token(mut self, token: Token) -> Self {
        self.token = token;
        self
    }
}

/// This process as an owner label: `hostname:pid`.
pub fn default_owner() -> Owner {
    static OWNER: OnceLock<Owner> = OnceLock::new();
    OWNER
        .get_or_init(|| {
            let host = hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".to_owned());
            format!("{host}:{}", std::process::id()).into()
        })
        .clone()
}

/// How an [`Acquired`](Claim::Acquired) claim came about.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum Acquisition {
    /// The key was absent: the first run.
    New,
    /// The previous attempt released the claim (its handler failed): a retry.
    Retry,
    /// The previous owner's lease expired without completing: a takeover. The previous owner
    /// may have produced its effect already (store mode's window), so takeovers are counted.
    Takeover,
    /// The key's record had outlived its retention: the message is processed again, as
    /// documented for the dedup window.
    Reprocess,
}

/// A claim that was acquired: the caller runs the handler and then completes, releases or fails
/// with [`Lease::token`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct Lease {
    /// The fencing token to present on every later write.
    pub token: Token,
    /// Which attempt this is, from 1.
    pub attempt: u32,
    /// When the lease ends on the store's clock.
    pub until: Timestamp,
    /// New, retry, takeover or reprocess.
    pub acquisition: Acquisition,
}

impl Lease {
    /// Assembles a lease, for stores.
    pub fn new(token: Token, attempt: u32, until: Timestamp, acquisition: Acquisition) -> Self {
        Self {
            token,
            attempt,
            until,
            acquisition,
        }
    }
}

/// What a claim returns (docs/design.md, section 3).
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Claim {
    /// The caller owns the key: run the handler.
    Acquired(Lease),
    /// Another consumer holds a live lease: do not run, do not ack; try again after
    /// `retry_after` (the rest of its lease).
    InProgress {
        /// The remaining lease of the current owner.
        retry_after: Duration,
    },
    /// A duplicate: the handler ran before; here is its stored result. Ack and do not run.
    Completed {
        /// The result the first run stored.
        result: Bytes,
    },
    /// The key is known with another payload fingerprint: a bug upstream. Do not run; dead-letter.
    Mismatch {
        /// The fingerprint stored with the record.
        stored: Fingerprint,
    },
    /// Attempts are exhausted (the record is failed). Do not run; dead-letter.
    Exhausted {
        /// How many attempts were made.
        attempts: u32,
        /// The reason stored when the key failed.
        reason: String,
    },
}

/// A completion: the input of [`Store::complete`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Completion {
    /// The key.
    pub key: Key,
    /// The token of the claim.
    pub token: Token,
    /// The result to store and replay to duplicates.
    pub result: Bytes,
    /// How long the completed record is remembered.
    pub retention: Duration,
}

impl Completion {
    /// A completion with the default retention.
    pub fn new(key: Key, token: Token, result: Bytes) -> Self {
        Self {
            key,
            token,
            result,
            retention: DEFAULT_RETENTION,
        }
    }

    /// Sets the retention.
    #[must_use]
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }
}

/// The outcome of a fenced write (complete, release, extend, fail).
#[must_use = "a lost lease means the work must not be acked as a success"]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum WriteOutcome {
    /// The write took effect.
    Applied,
    /// The token does not match the record (the lease expired and someone took over, or an
    /// operator evicted the key): nothing changed, and the caller must not ack as a success.
    LeaseLost,
}

impl WriteOutcome {
    /// Whether the write took effect.
    pub fn is_applied(self) -> bool {
        self == WriteOutcome::Applied
    }
}

/// Checks a result against a store's size limit: every store calls it in `complete`.
///
/// # Errors
/// [`StoreErrorKind::ResultTooLarge`](crate::StoreErrorKind::ResultTooLarge).
pub fn check_result_size(result: &[u8], limit: usize) -> Result<(), StoreError> {
    if result.len() > limit {
        return Err(StoreError::result_too_large(result.len(), limit));
    }
    Ok(())
}

/// A store of idempotency records.
///
/// Every method is one atomic operation on the store (docs/design.md, section 3). Time for leases and
/// retention is the store's own clock. Errors mean the store could not answer: callers fail
/// closed. The batch forms must behave exactly like the single forms applied in order; stores
/// override them to use one round trip or one commit.
///
/// The `idem-conformance` crate holds the checks every implementation must pass.
pub trait Store: Send + Sync + 'static {
    /// Claims a key.
    ///
    /// # Errors
    /// A [`StoreError`] when the store cannot answer.
    fn claim(&self, req: &ClaimRequest) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// Claims many keys, in order, as if by [`claim`](Store::claim) one after another.
    ///
    /// # Errors
    /// A [`StoreError`] for the whole batch when the store cannot answer.
    fn claim_many(
        &self,
        reqs: &[ClaimRequest],
    ) -> impl Future<Output = Result<Vec<Claim>, StoreError>> + Send {
        async move {
            let mut out = Vec::with_capacity(reqs.len());
            for req in reqs {
                out.push(self.claim(req).await?);
            }
            Ok(out)
        }
    }

    /// Completes a claim: stores the result and moves the record to completed, if the token
    /// still holds the claim. Completing again with the token that completed the record is
    /// [`Applied`](WriteOutcome::Applied) and keeps the first result (a retried write is safe).
    ///
    /// # Errors
    /// [`ResultTooLarge`](crate::StoreErrorKind::ResultTooLarge) before anything is written, or
    /// a [`StoreError`] when the store cannot answer.
    fn complete(
        &self,
        completion: &Completion,
    ) -> impl Future<Output = Result<WriteOutcome, StoreError>> + Send;

    /// Completes many claims, in order, as if by [`complete`](Store::complete) one after another.
    ///
    /// # Errors
    /// As [`complete`](Store::complete); an oversized result fails the whole batch before
    /// anything is written.
    fn complete_many(
        &self,
        completions: &[Completion],
    ) -> impl Future<Output = Result<Vec<WriteOutcome>, StoreError>> + Send {
        async move {
            let mut out = Vec::with_capacity(completions.len());
            for c in completions {
                out.push(self.complete(c).await?);
            }
            Ok(out)
        }
    }

    /// Releases a claim after a retryable handler failure: the record keeps its attempts and has
    /// no owner, so the next delivery retries.
    ///
    /// # Errors
    /// A [`StoreError`] when the store cannot answer.
    fn release(
        &self,
        key: &Key,
        token: Token,
        retention: Duration,
    ) -> impl Future<Output = Result<WriteOutcome, StoreError>> + Send;

    /// Extends a live claim's lease to `lease` from now (the heartbeat).
    ///
    /// # Errors
    /// A [`StoreError`] when the store cannot answer.
    fn extend(
        &self,
        key: &Key,
        token: Token,
        lease: Duration,
    ) -> impl Future<Output = Result<WriteOutcome, StoreError>> + Send;

    /// Fails a claim for good (attempts exhausted, or a permanent error): the record is kept for
    /// `retention` with `reason`, and claims return [`Claim::Exhausted`]. Failing again with the
    /// same token is [`Applied`](WriteOutcome::Applied).
    ///
    /// # Errors
    /// A [`StoreError`] when the store cannot answer.
    fn fail(
        &self,
        key: &Key,
        token: Token,
        reason: &str,
        retention: Duration,
    ) -> impl Future<Output = Result<WriteOutcome, StoreError>> + Send;

    /// Reads a record, whatever its state (including expired ones not purged yet).
    ///
    /// # Errors
    /// [`Corrupt`](crate::StoreErrorKind::Corrupt) for a record that cannot be decoded, or a
    /// [`StoreError`] when the store cannot answer.
    fn get(&self, key: &Key) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send;

    /// Removes a record whatever its state (an operator forcing reprocessing). Returns whether a
    /// record existed.
    ///
    /// # Errors
    /// A [`StoreError`] when the store cannot answer.
    fn evict(&self, key: &Key) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Deletes up to `limit` records whose retention has ended. Returns how many were deleted;
    /// call again while it returns `limit`. Bounded so that no call holds the store for long.
    ///
    /// # Errors
    /// A [`StoreError`] when the store cannot answer.
    fn purge_expired(&self, limit: usize)
    -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// The largest result [`complete`](Store::complete) accepts, in bytes.
    fn max_result_bytes(&self) -> usize {
        DEFAULT_MAX_RESULT_BYTES
    }
}

/// Operator views of a store, for `idem inspect`: not on any message's path, so they may scan.
pub trait Inspect: Store {
    /// The store's clock now (the clock leases and retention are measured on).
    ///
    /// # Errors
    /// A [`StoreError`] when the store cannot answer.
    fn now(&self) -> impl Future<Output = Result<Timestamp, StoreError>> + Send;

    /// How many records are in each state (expired records not purged yet included).
    ///
    /// # Errors
    /// A [`StoreError`] when the store cannot answer.
    fn count_by_state(&self) -> impl Future<Output = Result<Vec<(State, u64)>, StoreError>> + Send;

    /// In-progress records, at most `limit`, the earliest lease end first: claims whose lease
    /// has ended (stuck: no consumer holds them) come before every live one.
    ///
    /// # Errors
    /// A [`StoreError`] when the store cannot answer.
    fn in_progress(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Record>, StoreError>> + Send;
}

/// One operation on a store, as a [`StoreLayer`] sees it on its way to the inner store: which
/// method, and its arguments. Batches stay batches ([`ClaimMany`](StoreOp::ClaimMany),
/// [`CompleteMany`](StoreOp::CompleteMany)).
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum StoreOp<'a> {
    /// [`Store::claim`].
    Claim(&'a ClaimRequest),
    /// [`Store::claim_many`].
    ClaimMany(&'a [ClaimRequest]),
    /// [`Store::complete`].
    Complete(&'a Completion),
    /// [`Store::complete_many`].
    CompleteMany(&'a [Completion]),
    /// [`Store::release`].
    Release {
        /// The key.
        key: &'a Key,
        /// The claim's token.
        token: Token,
    },
    /// [`Store::extend`].
    Extend {
        /// The key.
        key: &'a Key,
        /// The claim's token.
        token: Token,
    },
    /// [`Store::fail`].
    Fail {
        /// The key.
        key: &'a Key,
        /// The claim's token.
        token: Token,
        /// The reason stored with the failed record.
        reason: &'a str,
    },
    /// [`Store::get`].
    Get(&'a Key),
    /// [`Store::evict`].
    Evict(&'a Key),
    /// [`Store::purge_expired`].
    PurgeExpired {
        /// The most records to delete.
        limit: usize,
    },
}

impl<'a> StoreOp<'a> {
    /// The [`Store`] method's name (`"claim_many"`, …).
    pub fn name(&self) -> &'static str {
        match self {
            StoreOp::Claim(_) => "claim",
            StoreOp::ClaimMany(_) => "claim_many",
            StoreOp::Complete(_) => "complete",
            StoreOp::CompleteMany(_) => "complete_many",
            StoreOp::Release { .. } => "release",
            StoreOp::Extend { .. } => "extend",
            StoreOp::Fail { .. } => "fail",
            StoreOp::Get(_) => "get",
            StoreOp::Evict(_) => "evict",
            StoreOp::PurgeExpired { .. } => "purge_expired",
        }
    }

    /// Whether this is a batch form (one call for many keys).
    pub fn is_batch(&self) -> bool {
        matches!(self, StoreOp::ClaimMany(_) | StoreOp::CompleteMany(_))
    }

    /// The keys the operation touches, in order: one for the single forms, one per item for the
    /// batch forms, none for [`PurgeExpired`](StoreOp::PurgeExpired).
    pub fn keys(&self) -> impl Iterator<Item = &'a Key> + 'a {
        let (one, claims, completions): (Option<&'a Key>, &'a [ClaimRequest], &'a [Completion]) =
            match *self {
                StoreOp::Claim(r) => (Some(&r.key), &[], &[]),
                StoreOp::ClaimMany(rs) => (None, rs, &[]),
                StoreOp::Complete(c) => (Some(&c.key), &[], &[]),
                StoreOp::CompleteMany(cs) => (None, &[], cs),
                StoreOp::Release { key, .. }
                | StoreOp::Extend { key, .. }
                | StoreOp::Fail { key, .. }
                | StoreOp::Get(key)
                | StoreOp::Evict(key) => (Some(key), &[], &[]),
                StoreOp::PurgeExpired { .. } => (None, &[], &[]),
            };
        one.into_iter()
            .chain(claims.iter().map(|r| &r.key))
            .chain(completions.iter().map(|c| &c.key))
    }
}

/// A store that wraps another and changes only some of what it does: the **single forwarding
/// point** for wrappers (fault injection, counting, delays, logging).
///
/// Implement [`inner`](StoreLayer::inner), and [`around`](StoreLayer::around) for what the
/// wrapper changes; every [`StoreLayer`] is a [`Store`] by a blanket implementation that hands
/// each call to the inner store **in the same form**: [`claim_many`](Store::claim_many) as
/// `claim_many` and [`complete_many`](Store::complete_many) as `complete_many`, so a wrapper can
/// never lose the inner store's batching (which a hand-written `impl Store` does silently by
/// leaving the batch methods to their one-by-one defaults). `Arc<S>` is a layer over `S`.
///
/// ```
/// use std::future::Future;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use idem::{MemoryStore, StoreError, StoreLayer, StoreOp};
///
/// /// Counts the round trips to the store.
/// struct Counted { inner: MemoryStore, calls: AtomicU64 }
///
/// impl StoreLayer for Counted {
///     type Inner = MemoryStore;
///     fn inner(&self) -> &MemoryStore { &self.inner }
///     fn around<T: Send>(
///         &self,
///         _op: StoreOp<'_>,
///         call: impl Future<Output = Result<T, StoreError>> + Send,
///     ) -> impl Future<Output = Result<T, StoreError>> + Send {
///         self.calls.fetch_add(1, Ordering::Relaxed);
///         call
///     }
/// }
/// # let _ = Counted { inner: MemoryStore::new(), calls: AtomicU64::new(0) };
/// ```
pub trait StoreLayer: Send + Sync + 'static {
    /// The wrapped store.
    type Inner: Store;

    /// The wrapped store, which every operation reaches through [`around`](StoreLayer::around).
    fn inner(&self) -> &Self::Inner;

    /// Runs one operation: `call` is the inner store's answer to `op`, not started yet (stores
    /// act only when their futures are polled, as `async fn` methods do). The default awaits
    /// it unchanged. A layer may fail
    /// without awaiting it (the store never saw the call), fail after it (the write happened,
    /// the caller hears an error), delay it, count it or log it. A batch arrives as one
    /// operation whose [`keys`](StoreOp::keys) are the batch's, and fails or succeeds as a whole,
    /// as a batch does on a real store.
    fn around<T: Send>(
        &self,
        op: StoreOp<'_>,
        call: impl Future<Output = Result<T, StoreError>> + Send,
    ) -> impl Future<Output = Result<T, StoreError>> + Send {
        let _ = op;
        call
    }
}

impl<L: StoreLayer> Store for L {
    fn claim(&self, req: &ClaimRequest) -> impl Future<Output = Result<Claim, StoreError>> + Send {
        self.around(StoreOp::Claim(req), self.inner().claim(req))
    }
    fn claim_many(
        &self,
        reqs: &[ClaimRequest],
    ) -> impl Future<Output = Result<Vec<Claim>, StoreError>> + Send {
        self.around(StoreOp::ClaimMany(reqs), self.inner().claim_many(reqs))
    }
    fn complete(
        &self,
        c: &Completion,
    ) -> impl Future<Output = Result<WriteOutcome, StoreError>> + Send {
        self.around(StoreOp::Complete(c), self.inner().complete(c))
    }
    fn complete_many(
        &self,
        cs: &[Completion],
    ) -> impl Future<Output = Result<Vec<WriteOutcome>, StoreError>> + Send {
        self.around(StoreOp::CompleteMany(cs), self.inner().complete_many(cs))
    }
    fn release(
        &self,
        key: &Key,
        token: Token,
        retention: Duration,
    ) -> impl Future<Output = Result<WriteOutcome, StoreError>> + Send {
        self.around(
            StoreOp::Release { key, token },
            self.inner().release(key, token, retention),
        )
    }
    fn extend(
        &self,
        key: &Key,
        token: Token,
        lease: Duration,
    ) -> impl Future<Output = Result<WriteOutcome, StoreError>> + Send {
        self.around(
            StoreOp::Extend { key, token },
            self.inner().extend(key, token, lease),
        )
    }
    // `async fn`: the operation borrows `key` and `reason` for one lifetime, which the future
    // returned must not tie together.
    async fn fail(
        &self,
        key: &Key,
        token: Token,
        reason: &str,
        retention: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        self.around(
            StoreOp::Fail { key, token, reason },
            self.inner().fail(key, token, reason, retention),
        )
        .await
    }
    fn get(&self, key: &Key) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send {
        self.around(StoreOp::Get(key), self.inner().get(key))
    }
    fn evict(&self, key: &Key) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.around(StoreOp::Evict(key), self.inner().evict(key))
    }
    fn purge_expired(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send {
        self.around(
            StoreOp::PurgeExpired { limit },
            self.inner().purge_expired(limit),
        )
    }
    fn max_result_bytes(&self) -> usize {
        self.inner().max_result_bytes()
    }
}

/// A shared store is the store: every call, batches included, goes to `S` unchanged.
impl<S: Store> StoreLayer for Arc<S> {
    type Inner = S;

    fn inner(&self) -> &S {
        self
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::any::AnyStore;
    use crate::key::Namespace;
    use crate::memory::MemoryStore;

    /// A store that records which of its methods were called, batch forms included.
    #[derive(Default)]
    struct Recorder {
        inner: MemoryStore,
        calls: Mutex<Vec<&'static str>>,
    }

    impl Recorder {
        fn log(&self, name: &'static str) {
            self.calls
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(name);
        }
        fn calls(&self) -> Vec<&'static str> {
            std::mem::take(&mut *self.calls.lock().unwrap_or_else(|e| e.into_inner()))
        }
    }

    impl Store for Recorder {
        async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
            self.log("claim");
            self.inner.claim(req).await
        }
        async fn claim_many(&self, reqs: &[ClaimRequest]) -> Result<Vec<Claim>, StoreError> {
            self.log("claim_many");
            self.inner.claim_many(reqs).await
        }
        async fn complete(&self, c: &Completion) -> Result<WriteOutcome, StoreError> {
            self.log("complete");
            self.inner.complete(c).await
        }
        async fn complete_many(&self, cs: &[Completion]) -> Result<Vec<WriteOutcome>, StoreError> {
            self.log("complete_many");
            self.inner.complete_many(cs).await
        }
        async fn release(
            &self,
            key: &Key,
            token: Token,
            retention: Duration,
        ) -> Result<WriteOutcome, StoreError> {
            self.inner.release(key, token, retention).await
        }
        async fn extend(
            &self,
            key: &Key,
            token: Token,
            lease: Duration,
        ) -> Result<WriteOutcome, StoreError> {
            self.inner.extend(key, token, lease).await
        }
        async fn fail(
            &self,
            key: &Key,
            token: Token,
            reason: &str,
            retention: Duration,
        ) -> Result<WriteOutcome, StoreError> {
            self.inner.fail(key, token, reason, retention).await
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
    }

    /// A layer that changes nothing but counts what passes through it.
    struct Counting<S> {
        inner: S,
        seen: Mutex<Vec<(&'static str, usize)>>,
    }

    impl<S: Store> StoreLayer for Counting<S> {
        type Inner = S;
        fn inner(&self) -> &S {
            &self.inner
        }
        fn around<T: Send>(
            &self,
            op: StoreOp<'_>,
            call: impl Future<Output = Result<T, StoreError>> + Send,
        ) -> impl Future<Output = Result<T, StoreError>> + Send {
            self.seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((op.name(), op.keys().count()));
            call
        }
    }

    /// A layer that fails every batch before it reaches the store.
    struct NoBatches<S>(S);

    impl<S: Store> StoreLayer for NoBatches<S> {
        type Inner = S;
        fn inner(&self) -> &S {
            &self.0
        }
        async fn around<T: Send>(
            &self,
            op: StoreOp<'_>,
            call: impl Future<Output = Result<T, StoreError>> + Send,
        ) -> Result<T, StoreError> {
            if op.is_batch() {
                return Err(StoreError::unavailable(format!("no {}", op.name())));
            }
            call.await
        }
    }

    async fn batch_round<S: Store>(store: &S, round: u32) {
        let ns = Namespace::new("layer").unwrap_or_else(|e| panic!("{e}"));
        let reqs: Vec<ClaimRequest> = (0..3)
            .map(|i| {
                let key = ns
                    .key(format!("k{round}-{i}"))
                    .unwrap_or_else(|e| panic!("{e}"));
                ClaimRequest::new(key, Fingerprint::of(b"p"))
            })
            .collect();
        let claims = store
            .claim_many(&reqs)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let completions: Vec<Completion> = reqs
            .iter()
            .zip(claims)
            .map(|(r, c)| match c {
                Claim::Acquired(lease) => {
                    Completion::new(r.key.clone(), lease.token, Bytes::from_static(b"ok"))
                }
                other => panic!("{other:?}"),
            })
            .collect();
        let outcomes = store
            .complete_many(&completions)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(outcomes.iter().all(|o| o.is_applied()));
    }

    #[tokio::test]
    async fn wrappers_forward_batches_as_batches() {
        let recorder = Arc::new(Recorder::default());

        // Arc<S>: a layer that changes nothing.
        batch_round(&recorder, 0).await;
        assert_eq!(recorder.calls(), ["claim_many", "complete_many"]);

        // A layer that only watches: one call per batch reaches it and the store.
        let counting = Counting {
            inner: Arc::clone(&recorder),
            seen: Mutex::new(Vec::new()),
        };
        batch_round(&counting, 1).await;
        assert_eq!(recorder.calls(), ["claim_many", "complete_many"]);
        assert_eq!(
            *counting.seen.lock().unwrap_or_else(|e| e.into_inner()),
            [("claim_many", 3), ("complete_many", 3)]
        );

        // AnyStore over a layer over the store.
        let any = AnyStore::new(Counting {
            inner: Arc::clone(&recorder),
            seen: Mutex::new(Vec::new()),
        });
        batch_round(&any, 2).await;
        assert_eq!(recorder.calls(), ["claim_many", "complete_many"]);

        // Single forms stay single.
        let ns = Namespace::new("layer").unwrap_or_else(|e| panic!("{e}"));
        let req = ClaimRequest::new(
            ns.key("single").unwrap_or_else(|e| panic!("{e}")),
            Fingerprint::of(b"p"),
        );
        assert!(matches!(any.claim(&req).await, Ok(Claim::Acquired(_))));
        assert_eq!(recorder.calls(), ["claim"]);
    }

    #[tokio::test]
    async fn a_layer_sees_the_batch_whole() {
        let recorder = Arc::new(Recorder::default());
        let store = NoBatches(Arc::clone(&recorder));
        let ns = Namespace::new("layer").unwrap_or_else(|e| panic!("{e}"));
        let reqs = [ClaimRequest::new(
            ns.key("a").unwrap_or_else(|e| panic!("{e}")),
            Fingerprint::of(b"p"),
        )];
        let e = store
            .claim_many(&reqs)
            .await
            .err()
            .unwrap_or_else(|| panic!("the batch reached the store"));
        assert_eq!(e.message(), "no claim_many");
        // Failed before the call: the store never saw it (the future was never polled).
        assert!(recorder.calls().is_empty());
        assert!(store.claim(&reqs[0]).await.is_ok());
        assert_eq!(recorder.calls(), ["claim"]);
        assert_eq!(store.max_result_bytes(), DEFAULT_MAX_RESULT_BYTES);
    }
}
