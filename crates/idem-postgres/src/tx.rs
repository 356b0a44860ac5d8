//! Transactional mode (contract section 5): the record is written in the caller's own
//! PostgreSQL transaction, with the handler's writes. Commit = effect + record; a crash or a
//! rollback before the commit leaves neither, and the redelivery runs the handler as if for the
//! first time. No window.
//!
//! The claim runs inside the transaction. A new key is inserted, so its unique index entry is
//! held until the transaction ends: a concurrent duplicate's claim blocks on that entry; when
//! the first transaction commits, the duplicate's claim runs again on a fresh snapshot and sees
//! the completed record (`Replayed`); when it rolls back, the duplicate acquires the key. Two
//! deliveries never both run the effect. Existing records (released, expired) are locked
//! `FOR UPDATE` the same way.
//!
//! The record is written once: an acquired key is written directly as *completed* (empty
//! result) before the handler runs, inside a savepoint of the caller's transaction or in a
//! transaction of idem's own. No other session can see it before the commit. If the handler
//! fails, the savepoint (or idem's transaction) is rolled back, the key is claimed again and
//! the failure is recorded (released, or failed at the attempt limit); a non-empty result is set
//! by one more statement.
//!
//! Run these in READ COMMITTED transactions (PostgreSQL's default). Under REPEATABLE READ or
//! SERIALIZABLE a concurrent duplicate gets a `Busy` error (serialization failure) instead of
//! the replay, and must retry its transaction.

use std::fmt;
use std::future::Future;

use idem::{
    Claim, ClaimRequest, Completion, Config, Error, Fingerprint, Key, Lease, Outcome, StoreError,
    StoreErrorKind, Stored, WriteOutcome,
};

use crate::exec::{Exec, Query, Tp};
use crate::ops::{self, Fenced};
use crate::sql::{Statements, Table};
use crate::{Pooled, PostgresStore};

/// A boxed future borrowing the transaction: what transactional handlers return.
pub type BoxFuture<'a, T> = futures_util::future::BoxFuture<'a, T>;

mod sealed {
    pub trait Sealed {}
    impl Sealed for tokio_postgres::Transaction<'_> {}
    impl Sealed for deadpool_postgres::Transaction<'_> {}
}

/// A transaction idem can record keys in: a [`tokio_postgres::Transaction`], or a
/// [`deadpool_postgres::Transaction`] (whose statements idem prepares once per connection).
/// Sealed: idem needs to know how each one runs statements.
#[allow(private_bounds)]
pub trait PgTransaction: sealed::Sealed + Query + Sync {}
impl PgTransaction for tokio_postgres::Transaction<'_> {}
impl PgTransaction for deadpool_postgres::Transaction<'_> {}

pub(crate) const SAVEPOINT: &str = "SAVEPOINT idem_handler";
const KEEP: &str = "RELEASE SAVEPOINT idem_handler";
const UNDO: &str = "ROLLBACK TO SAVEPOINT idem_handler; RELEASE SAVEPOINT idem_handler";
/// A `COMMIT` that fails if the transaction is aborted: PostgreSQL answers a plain `COMMIT` of
/// an aborted transaction with a rollback and no error (a handler that swallowed a failed
/// statement and returned `Ok` would otherwise be reported as executed with nothing written).
const COMMIT: &str = "SELECT 1; COMMIT";
const BATCH_SAVEPOINT: &str = "SAVEPOINT idem_batch";
const BATCH_KEEP: &str = "RELEASE SAVEPOINT idem_batch";
const BATCH_UNDO: &str = "ROLLBACK TO SAVEPOINT idem_batch; RELEASE SAVEPOINT idem_batch";

/// Runs `handler` exactly once per key inside the caller's open transaction `tx`.
///
/// The caller begins the transaction, calls this, and **commits whatever the outcome**: the
/// record of a failed attempt (released, or failed when attempts are exhausted) is written in
/// the same transaction and counts only if committed. The handler's writes are made inside a
/// savepoint and undone if it returns `Err`. `config` supplies retention, the attempt limit,
/// owner and retry backoff (the lease does not apply: the claim never outlives the transaction).
///
/// A result over `max_result_bytes` undoes the handler's writes and fails the key with the
/// reason: nothing has happened yet that a retry would repeat, but the result would never fit.
/// If the handler panics, the panic propagates and the transaction, dropped, rolls back.
///
/// The claim writes the key's record as completed before the handler runs, inside a savepoint
/// sent in the same round trip; no other session can see it before the commit, and if the
/// handler fails the savepoint is rolled back and the failure recorded instead. A successful
/// delivery with an empty result therefore costs two round trips and one row write besides the
/// caller's `BEGIN` and `COMMIT`.
///
/// ```no_run
/// # async fn demo(store: idem_postgres::PostgresStore) -> Result<(), Box<dyn std::error::Error>> {
/// use idem::{Config, Fingerprint, Namespace};
/// let mut client = store.pool().get().await?;
/// let key = Namespace::new("ledger")?.key("transfer-1")?;
/// let tx = client.transaction().await?;
/// let outcome = idem_postgres::run_in_transaction(
///     &tx, store.table(), &key, Fingerprint::of(b"10"), &Config::default(), 64 * 1024,
///     |tx| Box::pin(async move {
///         tx.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1", &[]).await?;
///         tx.execute("UPDATE accounts SET balance = balance + 10 WHERE id = 2", &[]).await?;
///         Ok::<_, tokio_postgres::Error>(())
///     }),
/// ).await?;
/// tx.commit().await?;
/// println!("{}", outcome.kind());
/// # Ok(()) }
/// ```
///
/// # Errors
/// A [`StoreError`] when the database fails (`Busy` for a serialization failure, see the module
/// docs); [`Error::Codec`] when a result cannot be encoded, or a stored one decoded, as `T`. On
/// any error the caller must roll back.
pub async fn run_in_transaction<C, T, E, F>(
    tx: &C,
    table: &Table,
    key: &Key,
    fingerprint: Fingerprint,
    config: &Config,
    max_result_bytes: usize,
    handler: F,
) -> Result<Outcome<T, E>, Error>
where
    C: PgTransaction,
    T: Stored,
    E: fmt::Display,
    F: for<'c> FnOnce(&'c C) -> BoxFuture<'c, Result<T, E>>,
{
    // One item never runs twice: it either succeeds in the first pass or is the one that failed.
    let mut handler = Some(handler);
    let items = [(key.clone(), fingerprint)];
    let mut outcomes = batch(
        tx,
        table.sql(),
        &items,
        config,
        max_result_bytes,
        |tx, _, _| handler.take().map(|h| h(tx)),
    )
    .await?;
    count(config, &outcomes);
    outcomes
        .pop()
        .ok_or_else(|| StoreError::new(StoreErrorKind::Backend, "no outcome").into())
}

/// Transactional mode for many messages in one transaction: claims them in one statement, runs
/// `handler(tx, index, key)` for each acquired one, and ends with one statement at most.
///
/// Outcomes are in the order of `items`, as if each item went through [`run_in_transaction`]
/// one after another (a key repeated in `items` is replayed from its first occurrence). All
/// handlers run inside one savepoint; if one of them fails, that savepoint is undone and the
/// items are claimed again and run each in a savepoint of its own, so a failure undoes only its
/// own item's writes and counts only its own attempt. `handler` may therefore be called twice
/// for an item whose first writes were undone (never for the item that failed).
///
/// # Errors
/// As [`run_in_transaction`], for the whole batch: the caller must roll back.
pub async fn run_batch_in_transaction<C, T, E, F>(
    tx: &C,
    table: &Table,
    items: &[(Key, Fingerprint)],
    config: &Config,
    max_result_bytes: usize,
    handler: F,
) -> Result<Vec<Outcome<T, E>>, Error>
where
    C: PgTransaction,
    T: Stored,
    E: fmt::Display,
    F: for<'c> Fn(&'c C, usize, &'c Key) -> BoxFuture<'c, Result<T, E>>,
{
    let outcomes = batch(
        tx,
        table.sql(),
        items,
        config,
        max_result_bytes,
        |tx, i, key| Some(handler(tx, i, key)),
    )
    .await?;
    count(config, &outcomes);
    Ok(outcomes)
}

/// Counts outcomes with the executor's metrics (labelled with the config's name).
pub(crate) fn count<T, E>(config: &Config, outcomes: &[Outcome<T, E>]) {
    for outcome in outcomes {
        idem::metrics::record_outcome(&config.name, outcome, false);
    }
}

/// The fast path and its fallback, for one or many items; `handler` returns `None` if it
/// cannot run again (a single delivery's `FnOnce`).
async fn batch<Q, T, E, H>(
    q: &Q,
    st: &Statements,
    items: &[(Key, Fingerprint)],
    config: &Config,
    max_result_bytes: usize,
    mut handler: H,
) -> Result<Vec<Outcome<T, E>>, Error>
where
    Q: Query + ?Sized,
    T: Stored,
    E: fmt::Display,
    H: for<'c> FnMut(&'c Q, usize, &'c Key) -> Option<BoxFuture<'c, Result<T, E>>>,
{
    let mut out: Vec<Option<Outcome<T, E>>> = (0..items.len()).map(|_| None).collect();
    for round in ops::rounds(items.iter().map(|(k, _)| k)) {
        let reqs: Vec<ClaimRequest> = round
            .iter()
            .map(|&i| request(&items[i].0, items[i].1, config))
            .collect();
        // Fast path: the savepoint and the claim (acquired keys written completed) in one
        // round trip, every handler, then the savepoint released with the non-empty results.
        let (sp, claims) =
            futures_util::future::join(async { Tp(q).simple(BATCH_SAVEPOINT).await }, async {
                ops::claim_new_first(&mut Tp(q), st, &reqs).await
            })
            .await;
        sp?;
        let run = settle_all(&round, claims?, &reqs, &mut out)?;
        match run_all(q, items, &run, config, max_result_bytes, &mut handler).await? {
            Pass::Done { values, results } => {
                let (kept, written) = futures_util::future::join(
                    async { Tp(q).simple(BATCH_KEEP).await },
                    set_results(q, st, &results),
                )
                .await;
                kept?;
                written?;
                for ((i, _), value) in run.iter().zip(values) {
                    out[*i] = Some(Outcome::Executed(value));
                }
            }
            Pass::Failed(i, result) => {
                Tp(q).simple(BATCH_UNDO).await?;
                let failed = Some((i, result));
                slow_round(
                    q,
                    st,
                    items,
                    &round,
                    &reqs,
                    config,
                    max_result_bytes,
                    &mut handler,
                    failed,
                    &mut out,
                )
                .await?;
            }
        }
    }
    collect(out)
}

/// Claims of one round into outcomes (`out`) and the items to run.
fn settle_all<T: Stored, E>(
    round: &[usize],
    claims: Vec<Claim>,
    reqs: &[ClaimRequest],
    out: &mut [Option<Outcome<T, E>>],
) -> Result<Vec<(usize, Lease)>, Error> {
    let mut run = Vec::new();
    for (&i, (claim, req)) in round.iter().zip(claims.into_iter().zip(reqs)) {
        match settle(claim, req.fingerprint)? {
            Step::Done(outcome) => out[i] = Some(outcome),
            Step::Run(lease) => run.push((i, lease)),
        }
    }
    Ok(run)
}

/// What the fast path's handlers produced.
enum Pass<T, E> {
    /// Every handler succeeded: their values, and the results that are not empty.
    Done {
        values: Vec<T>,
        results: Vec<Completion>,
    },
    /// Item `i` failed (or its result cannot be stored); later items did not run.
    Failed(usize, Result<T, E>),
}

/// Runs the handlers of `run` in order, stopping at the first failure.
async fn run_all<Q, T, E, H>(
    q: &Q,
    items: &[(Key, Fingerprint)],
    run: &[(usize, Lease)],
    config: &Config,
    max_result_bytes: usize,
    handler: &mut H,
) -> Result<Pass<T, E>, Error>
where
    Q: Query + ?Sized,
    T: Stored,
    H: for<'c> FnMut(&'c Q, usize, &'c Key) -> Option<BoxFuture<'c, Result<T, E>>>,
{
    let mut values = Vec::with_capacity(run.len());
    let mut results = Vec::new();
    for (i, lease) in run {
        let key = &items[*i].0;
        let fut = handler(q, *i, key).ok_or_else(called_twice)?;
        let result = fut.await;
        let bytes = match &result {
            Ok(value) => value.encode().ok().filter(|b| b.len() <= max_result_bytes),
            Err(_) => None,
        };
        match (result, bytes) {
            (Ok(value), Some(bytes)) => {
                if !bytes.is_empty() {
                    results.push(
                        Completion::new(key.clone(), lease.token, bytes)
                            .retention(config.retention),
                    );
                }
                values.push(value);
            }
            (result, _) => return Ok(Pass::Failed(*i, result)),
        }
    }
    Ok(Pass::Done { values, results })
}

/// Sets the non-empty results of keys the fast path wrote completed.
async fn set_results<Q: Query + ?Sized>(
    q: &Q,
    st: &Statements,
    results: &[Completion],
) -> Result<(), Error> {
    if results.is_empty() {
        return Ok(());
    }
    let written = ops::complete_many(&mut Tp(q), &st.set_result_many, results).await?;
    if written.iter().any(|w| !w.is_applied()) {
        return Err(StoreError::new(
            StoreErrorKind::Backend,
            "postgres: a key claimed in this transaction lost its record",
        )
        .into());
    }
    Ok(())
}

/// The fallback after a failure: claims the round again (in progress) and runs each item in a
/// savepoint of its own; the failed item's result is recorded as it was, without running again.
#[allow(clippy::too_many_arguments)]
async fn slow_round<Q, T, E, H>(
    q: &Q,
    st: &Statements,
    items: &[(Key, Fingerprint)],
    round: &[usize],
    reqs: &[ClaimRequest],
    config: &Config,
    max_result_bytes: usize,
    handler: &mut H,
    mut failed: Option<(usize, Result<T, E>)>,
    out: &mut [Option<Outcome<T, E>>],
) -> Result<(), Error>
where
    Q: Query + ?Sized,
    T: Stored,
    E: fmt::Display,
    H: for<'c> FnMut(&'c Q, usize, &'c Key) -> Option<BoxFuture<'c, Result<T, E>>>,
{
    let claims = ops::claim_many(&mut Tp(q), &st.claim, reqs).await?;
    for (i, lease) in settle_all(round, claims, reqs, out)? {
        let key = &items[i].0;
        let outcome = match failed.take_if(|(f, _)| *f == i) {
            Some((_, result)) => {
                run_one(
                    &mut Tp(q),
                    st,
                    key,
                    &lease,
                    config,
                    max_result_bytes,
                    async { result },
                )
                .await?
            }
            None => {
                let fut = handler(q, i, key).ok_or_else(called_twice)?;
                run_one(&mut Tp(q), st, key, &lease, config, max_result_bytes, fut).await?
            }
        };
        out[i] = Some(outcome);
    }
    Ok(())
}

fn collect<T, E>(out: Vec<Option<Outcome<T, E>>>) -> Result<Vec<Outcome<T, E>>, Error> {
    out.into_iter()
        .map(|o| {
            o.ok_or_else(|| {
                StoreError::new(StoreErrorKind::Backend, "a batch item got no outcome").into()
            })
        })
        .collect()
}

fn called_twice() -> Error {
    StoreError::new(
        StoreErrorKind::Backend,
        "idem-postgres: a single delivery's handler was needed twice",
    )
    .into()
}

/// What to do after the claim: run the handler, or answer without it.
pub(crate) enum Step<T, E> {
    Run(Lease),
    Done(Outcome<T, E>),
}

pub(crate) fn request(key: &Key, fingerprint: Fingerprint, config: &Config) -> ClaimRequest {
    ClaimRequest::new(key.clone(), fingerprint)
        .lease(config.lease)
        .retention(config.retention)
        .max_attempts(config.max_attempts)
        .owner(config.owner.clone())
}

fn settle<T: Stored, E>(claim: Claim, received: Fingerprint) -> Result<Step<T, E>, Error> {
    Ok(Step::Done(match claim {
        Claim::Acquired(lease) => return Ok(Step::Run(lease)),
        Claim::Completed { result } => Outcome::Replayed(T::decode(result)?),
        Claim::InProgress { retry_after } => Outcome::InProgress { retry_after },
        Claim::Mismatch { stored } => Outcome::Mismatch { stored, received },
        Claim::Exhausted { attempts, reason } => Outcome::Exhausted {
            attempts,
            reason,
            error: None,
        },
        _ => {
            return Err(StoreError::new(StoreErrorKind::Backend, "unknown claim outcome").into());
        }
    }))
}

/// Claims one key inside the transaction (in progress), for sessions without the fast path.
#[cfg_attr(not(feature = "sqlx"), allow(dead_code))]
pub(crate) async fn begin<X: Exec, T: Stored, E>(
    x: &mut X,
    st: &Statements,
    key: &Key,
    fingerprint: Fingerprint,
    config: &Config,
) -> Result<Step<T, E>, Error> {
    let req = request(key, fingerprint, config);
    let claim = ops::claim_many(x, &st.claim, std::slice::from_ref(&req))
        .await?
        .pop()
        .ok_or_else(|| StoreError::new(StoreErrorKind::Backend, "postgres claim: no answer"))?;
    settle(claim, fingerprint)
}

fn completed<T, E>(value: T, written: WriteOutcome, lease: &Lease) -> Outcome<T, E> {
    match written {
        WriteOutcome::Applied => Outcome::Executed(value),
        WriteOutcome::LeaseLost => lost(lease),
    }
}

/// Fails the key with `reason` (the attempt limit, or a result that cannot be stored).
async fn exhaust<X: Exec, T, E>(
    x: &mut X,
    st: &Statements,
    key: &Key,
    lease: &Lease,
    config: &Config,
    reason: String,
    error: Option<E>,
) -> Result<Outcome<T, E>, Error> {
    let w = ops::fenced(
        x,
        st,
        Fenced::Fail,
        key,
        lease.token,
        reason.as_bytes(),
        config.retention,
    )
    .await?;
    Ok(if w.is_applied() {
        Outcome::Exhausted {
            attempts: lease.attempt,
            reason,
            error,
        }
    } else {
        lost(lease)
    })
}

/// The claim's row lock is held until the transaction ends, so only a write of the caller's
/// own in this transaction (an evict) can take the key away; never report that as a success.
fn lost<T, E>(lease: &Lease) -> Outcome<T, E> {
    Outcome::LeaseLost {
        attempt: lease.attempt,
    }
}

/// Runs one acquired item's handler in its own savepoint and writes its final record.
pub(crate) async fn run_one<X, T, E, Fut>(
    x: &mut X,
    st: &Statements,
    key: &Key,
    lease: &Lease,
    config: &Config,
    max_result_bytes: usize,
    handler: Fut,
) -> Result<Outcome<T, E>, Error>
where
    X: Exec,
    T: Stored,
    E: fmt::Display,
    Fut: Future<Output = Result<T, E>>,
{
    x.simple(SAVEPOINT).await?;
    let result = handler.await;
    finish(x, st, key, lease, config, max_result_bytes, result).await
}

/// Ends the handler's savepoint (kept on success, undone otherwise) and writes the final record.
pub(crate) async fn finish<X: Exec, T: Stored, E: fmt::Display>(
    x: &mut X,
    st: &Statements,
    key: &Key,
    lease: &Lease,
    config: &Config,
    max_result_bytes: usize,
    result: Result<T, E>,
) -> Result<Outcome<T, E>, Error> {
    let token = lease.token;
    match result {
        Ok(value) => {
            let bytes = match value.encode() {
                Ok(bytes) => bytes,
                Err(e) => {
                    x.simple(UNDO).await?;
                    return Err(e.into());
                }
            };
            if bytes.len() > max_result_bytes {
                x.simple(UNDO).await?;
                let reason = format!(
                    "the handler's result is {} bytes, over the store's limit of \
                     {max_result_bytes}; its writes were rolled back and the key is failed",
                    bytes.len()
                );
                return exhaust(x, st, key, lease, config, reason, None).await;
            }
            x.simple(KEEP).await?;
            let w = ops::fenced(
                x,
                st,
                Fenced::Complete,
                key,
                token,
                &bytes,
                config.retention,
            )
            .await?;
            Ok(completed(value, w, lease))
        }
        Err(error) => {
            x.simple(UNDO).await?;
            if config
                .max_attempts
                .is_some_and(|max| lease.attempt >= max.get())
            {
                let reason = format!("attempt {} failed: {error}", lease.attempt);
                exhaust(x, st, key, lease, config, reason, Some(error)).await
            } else {
                let w =
                    ops::fenced(x, st, Fenced::Release, key, token, &[], config.retention).await?;
                if !w.is_applied() {
                    return Ok(lost(lease));
                }
                Ok(Outcome::Released {
                    error,
                    attempt: lease.attempt,
                    retry_after: config.retry_backoff.delay(lease.attempt),
                })
            }
        }
    }
}

/// A pooled connection inside a transaction that [`PostgresStore::run_transactional`] or
/// [`PostgresStore::run_batch_transactional`] began: handlers run their SQL on it and must not
/// commit or roll back themselves.
pub type TxClient = deadpool_postgres::Client;

impl PostgresStore {
    /// Transactional mode on a pooled connection, in a transaction of idem's own: runs `handler`
    /// in it and commits. Returns once the handler's writes and the record are committed
    /// together (or neither, on error). See [`PostgresStore::run_batch_transactional`].
    ///
    /// ```no_run
    /// # async fn demo(store: idem_postgres::PostgresStore) -> Result<(), Box<dyn std::error::Error>> {
    /// use idem::{Config, Namespace};
    /// let key = Namespace::new("ledger")?.key("transfer-1")?;
    /// let outcome = store
    ///     .run_transactional(&key, b"payload", &Config::default(), |tx| Box::pin(async move {
    ///         tx.execute("INSERT INTO ledger (transfer, amount) VALUES ('transfer-1', 10)", &[])
    ///             .await
    ///             .map(drop)
    ///     }))
    ///     .await?;
    /// # let _ = outcome; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`run_in_transaction`]; a [`StoreError`] if the commit fails (then neither the
    /// handler's writes nor the record exist).
    pub async fn run_transactional<T, E, F>(
        &self,
        key: &Key,
        payload: impl AsRef<[u8]>,
        config: &Config,
        handler: F,
    ) -> Result<Outcome<T, E>, Error>
    where
        T: Stored,
        E: fmt::Display,
        F: for<'c> FnOnce(&'c TxClient) -> BoxFuture<'c, Result<T, E>>,
    {
        let mut handler = Some(handler);
        let items = [(key.clone(), Fingerprint::of(payload.as_ref()))];
        let mut outcomes = self
            .owned(&items, config, |c, _, _| handler.take().map(|h| h(c)))
            .await?;
        outcomes
            .pop()
            .ok_or_else(|| StoreError::new(StoreErrorKind::Backend, "no outcome").into())
    }

    /// Transactional mode for a batch, in a transaction of idem's own on a pooled connection:
    /// the throughput path for consumers that take messages in batches.
    ///
    /// Outcomes are those of [`run_batch_in_transaction`]. The common case costs two round
    /// trips besides the handlers' own statements: `BEGIN` sent with the claim (new keys are
    /// inserted as completed in one statement), then `COMMIT` (with the non-empty results).
    /// Because idem owns the transaction it needs no savepoint: if a handler fails, the whole
    /// transaction is rolled back and the batch runs again with one savepoint per item, so a
    /// failure undoes only its own item's writes; `handler` may then run twice for an item.
    ///
    /// # Errors
    /// As [`run_in_transaction`]; on any error nothing of the batch is committed and the
    /// connection is closed rather than returned to the pool.
    pub async fn run_batch_transactional<T, E, F>(
        &self,
        items: &[(Key, Fingerprint)],
        config: &Config,
        handler: F,
    ) -> Result<Vec<Outcome<T, E>>, Error>
    where
        T: Stored,
        E: fmt::Display,
        F: for<'c> Fn(&'c TxClient, usize, &'c Key) -> BoxFuture<'c, Result<T, E>>,
    {
        self.owned(items, config, |c, i, key| Some(handler(c, i, key)))
            .await
    }

    async fn owned<T, E, H>(
        &self,
        items: &[(Key, Fingerprint)],
        config: &Config,
        mut handler: H,
    ) -> Result<Vec<Outcome<T, E>>, Error>
    where
        T: Stored,
        E: fmt::Display,
        H: for<'c> FnMut(&'c TxClient, usize, &'c Key) -> Option<BoxFuture<'c, Result<T, E>>>,
    {
        // Until it is kept, the connection is closed when dropped: an error or a panicking
        // handler may leave it inside a transaction, which must never go back to the pool.
        let client = Pooled(Some(self.client().await?));
        let out = owned_on(
            &client,
            self.table().sql(),
            items,
            config,
            self.max_result(),
            &mut handler,
        )
        .await;
        if let Ok(outcomes) = &out {
            client.keep();
            count(config, outcomes);
        }
        out
    }

    fn max_result(&self) -> usize {
        idem::Store::max_result_bytes(self)
    }
}

async fn owned_on<T, E, H>(
    client: &TxClient,
    st: &Statements,
    items: &[(Key, Fingerprint)],
    config: &Config,
    max_result_bytes: usize,
    handler: &mut H,
) -> Result<Vec<Outcome<T, E>>, Error>
where
    T: Stored,
    E: fmt::Display,
    H: for<'c> FnMut(&'c TxClient, usize, &'c Key) -> Option<BoxFuture<'c, Result<T, E>>>,
{
    // An error below may leave the transaction open or aborted: `owned` then closes the
    // connection. A handler's error is an outcome, not an error.
    let simple = |sql: &'static str| async move { Tp(client).simple(sql).await };
    let rounds = ops::rounds(items.iter().map(|(k, _)| k));
    let [round] = &rounds[..] else {
        // A batch repeating a key goes the general way, with savepoints.
        simple("BEGIN").await?;
        let outcomes = batch(client, st, items, config, max_result_bytes, |c, i, key| {
            handler(c, i, key)
        })
        .await?;
        simple(COMMIT).await?;
        return Ok(outcomes);
    };
    let reqs: Vec<ClaimRequest> = items
        .iter()
        .map(|(key, fp)| request(key, *fp, config))
        .collect();
    let (begun, claims) = futures_util::future::join(simple("BEGIN"), async {
        ops::claim_new_first(&mut Tp(client), st, &reqs).await
    })
    .await;
    begun?;
    let mut out: Vec<Option<Outcome<T, E>>> = (0..items.len()).map(|_| None).collect();
    let run = settle_all(round, claims?, &reqs, &mut out)?;
    match run_all(client, items, &run, config, max_result_bytes, handler).await? {
        Pass::Done { values, results } => {
            set_results(client, st, &results).await?;
            simple(COMMIT).await?;
            for ((i, _), value) in run.iter().zip(values) {
                out[*i] = Some(Outcome::Executed(value));
            }
        }
        Pass::Failed(i, result) => {
            // Start again with one savepoint per item; the failed item's writes are gone with
            // the rollback and its result is recorded as it was.
            simple("ROLLBACK").await?;
            simple("BEGIN").await?;
            out.iter_mut().for_each(|o| *o = None);
            let failed = Some((i, result));
            slow_round(
                client,
                st,
                items,
                round,
                &reqs,
                config,
                max_result_bytes,
                handler,
                failed,
                &mut out,
            )
            .await?;
            simple(COMMIT).await?;
        }
    }
    collect(out)
}
