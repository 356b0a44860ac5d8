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

/// What a claim returns (contract section 3).
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
/// Every method is one atomic operation on the store (contract section 3). Time for leases and
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

impl<S: Store> Store for Arc<S> {
    fn claim(&self, req: &ClaimRequest) -> impl Future<Output = Result<Claim, StoreError>> + Send {
        (**self).claim(req)
    }
    fn claim_many(
        &self,
        reqs: &[ClaimRequest],
    ) -> impl Future<Output = Result<Vec<Claim>, StoreError>> + Send {
        (**self).claim_many(reqs)
    }
    fn complete(
        &self,
        c: &Completion,
    ) -> impl Future<Output = Result<WriteOutcome, StoreError>> + Send {
        (**self).complete(c)
    }
    fn complete_many(
        &self,
        cs: &[Completion],
    ) -> impl Future<Output = Result<Vec<WriteOutcome>, StoreError>> + Send {
        (**self).complete_many(cs)
    }
    fn release(
        &self,
        key: &Key,
        token: Token,
        retention: Duration,
    ) -> impl Future<Output = Result<WriteOutcome, StoreError>> + Send {
        (**self).release(key, token, retention)
    }
    fn extend(
        &self,
        key: &Key,
        token: Token,
        lease: Duration,
    ) -> impl Future<Output = Result<WriteOutcome, StoreError>> + Send {
        (**self).extend(key, token, lease)
    }
    fn fail(
        &self,
        key: &Key,
        token: Token,
        reason: &str,
        retention: Duration,
    ) -> impl Future<Output = Result<WriteOutcome, StoreError>> + Send {
        (**self).fail(key, token, reason, retention)
    }
    fn get(&self, key: &Key) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send {
        (**self).get(key)
    }
    fn evict(&self, key: &Key) -> impl Future<Output = Result<bool, StoreError>> + Send {
        (**self).evict(key)
    }
    fn purge_expired(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send {
        (**self).purge_expired(limit)
    }
    fn max_result_bytes(&self) -> usize {
        (**self).max_result_bytes()
    }
}
