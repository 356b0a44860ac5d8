//! Transactional mode (docs/design.md, section 5): the record is written in the same PostgreSQL
//! transaction as the handler's writes. Commit = effect + record; a crash or a rollback before
//! the commit leaves neither, and the redelivery runs the handler as if for the first time. No
//! window.
//!
//! Two ways in: [`idem::Transactional`] for [`PostgresStore`] (a transaction of idem's own on a
//! pooled connection, the fastest), and [`run_in_transaction`] / [`run_batch_in_transaction`]
//! inside the caller's own transaction. What a claim, a handler's result and the final write
//! mean comes from [`idem::policy`]; this module only decides which statements carry them.
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
use std::ops::Deref;

use idem::policy::{self, Mode, Step, Verdict};
use idem::{
    ClaimRequest, CodecError, Completion, Config, Error, Fingerprint, Key, Lease, Outcome,
    StoreError, StoreErrorKind, Stored, Transactional, TxFuture, WriteOutcome,
};

use crate::exec::{Exec, Query, Tp};
use crate::ops::{self, Fenced};
use crate::sql::{Statements, Table};
use crate::{Pooled, PostgresStore};

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
/// Idem's own transaction, begun again after a failed first pass: one round trip.
const RESTART: &str = "ROLLBACK; BEGIN";
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
/// Outcomes come from [`idem::policy`] with [`Mode::Transactional`]: a result over
/// `max_result_bytes` undoes the handler's writes and fails the key.
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
    F: for<'c> FnOnce(&'c C) -> TxFuture<'c, T, E>,
{
    // One item never runs twice: it either succeeds in the first pass or is the one that failed.
    let mut handler = Some(handler);
    let items = [(key.clone(), fingerprint)];
    let mut session = tx;
    let mut outcomes = batch(
        &mut session,
        table.sql(),
        &items,
        config,
        max_result_bytes,
        &mut |tx: &mut &C, _| handler.take().map(|h| h(*tx)),
    )
    .await?;
    count(config, &outcomes);
    outcomes
        .pop()
        .ok_or_else(|| StoreError::new(StoreErrorKind::Backend, "no outcome").into())
}

/// Transactional mode for many messages in one transaction: claims them in one statement, runs
/// `handler(tx, index)` for each acquired `items[index]`, and ends with one statement at most.
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
    F: for<'c> Fn(&'c C, usize) -> TxFuture<'c, T, E>,
{
    let mut session = tx;
    let outcomes = batch(
        &mut session,
        table.sql(),
        items,
        config,
        max_result_bytes,
        &mut |tx: &mut &C, i| Some(handler(*tx, i)),
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

/// The fast path and its fallback, for one or many items, inside an open transaction. `S` is
/// the session idem runs its statements on and hands to `handler`, which returns `None` if it
/// cannot run again (a single delivery's `FnOnce`).
async fn batch<S, T, E, H>(
    s: &mut S,
    st: &Statements,
    items: &[(Key, Fingerprint)],
    config: &Config,
    max_result_bytes: usize,
    handler: &mut H,
) -> Result<Vec<Outcome<T, E>>, Error>
where
    S: Query + ?Sized,
    T: Stored,
    E: fmt::Display,
    H: for<'c> FnMut(&'c mut S, usize) -> Option<TxFuture<'c, T, E>>,
{
    let mut out: Vec<Option<Outcome<T, E>>> = (0..items.len()).map(|_| None).collect();
    for round in ops::rounds(items.iter().map(|(k, _)| k)) {
        let reqs: Vec<ClaimRequest> = round
            .iter()
            .map(|&i| request(&items[i].0, items[i].1, config))
            .collect();
        // Fast path: the savepoint and the claim (acquired keys written completed) in one
        // round trip, every handler, then the savepoint released with the non-empty results.
        let q = &*s;
        let (sp, claims) = futures_util::future::join(simple(q, BATCH_SAVEPOINT), async {
            ops::claim_new_first(&mut Tp(q), st, &reqs).await
        })
        .await;
        sp?;
        let run = steps(&round, claims?, &reqs, &mut out)?;
        match run_all(s, items, &run, config, max_result_bytes, handler).await? {
            Pass::Done { kept, results } => {
                let q = &*s;
                let (released, written) =
                    futures_util::future::join(simple(q, BATCH_KEEP), set_results(q, st, &results))
                        .await;
                released?;
                written?;
                record_kept(kept, &mut out);
            }
            Pass::Failed(failure) => {
                simple(&*s, BATCH_UNDO).await?;
                let failed = Some(failure);
                slow_round(
                    s,
                    st,
                    items,
                    &round,
                    &reqs,
                    config,
                    max_result_bytes,
                    handler,
                    failed,
                    &mut out,
                )
                .await?;
            }
        }
    }
    collect(out)
}

/// Runs parameterless statements (savepoints, `BEGIN`, `COMMIT`).
async fn simple<Q: Query + ?Sized>(q: &Q, sql: &str) -> Result<(), StoreError> {
    Tp(q).simple(sql).await
}

/// Claims of one round into outcomes (`out`) and the items to run, by the policy.
fn steps<T: Stored, E>(
    round: &[usize],
    claims: Vec<idem::Claim>,
    reqs: &[ClaimRequest],
    out: &mut [Option<Outcome<T, E>>],
) -> Result<Vec<(usize, Lease)>, Error> {
    let mut run = Vec::new();
    for (&i, (claim, req)) in round.iter().zip(claims.into_iter().zip(reqs)) {
        match policy::on_claim(claim, req.fingerprint)? {
            Step::Done(outcome) => out[i] = Some(outcome),
            Step::Run(lease) => run.push((i, lease)),
        }
    }
    Ok(run)
}

/// A first pass's failed item: its verdict (which undoes its writes) on attempt `attempt`.
struct Failure<T, E> {
    index: usize,
    attempt: u32,
    verdict: Verdict<T, E>,
}

/// What the fast path's handlers produced.
enum Pass<T, E> {
    /// Every verdict keeps its writes: (item, attempt, verdict) each, and the results that are
    /// not empty (the claim wrote the record completed with an empty one).
    Done {
        kept: Vec<(usize, u32, Verdict<T, E>)>,
        results: Vec<Completion>,
    },
    /// An item's verdict undoes its writes; later items did not run.
    Failed(Failure<T, E>),
}

/// Runs the handlers of `run` in order, stopping at the first verdict that undoes its writes.
async fn run_all<S, T, E, H>(
    s: &mut S,
    items: &[(Key, Fingerprint)],
    run: &[(usize, Lease)],
    config: &Config,
    max_result_bytes: usize,
    handler: &mut H,
) -> Result<Pass<T, E>, Error>
where
    S: ?Sized,
    T: Stored,
    E: fmt::Display,
    H: for<'c> FnMut(&'c mut S, usize) -> Option<TxFuture<'c, T, E>>,
{
    let mut kept = Vec::with_capacity(run.len());
    let mut results = Vec::new();
    for &(i, lease) in run {
        let result = handler(s, i).ok_or_else(called_twice)?.await;
        let verdict = decide(result, lease.attempt, config, max_result_bytes)?;
        if !verdict.keeps_writes() {
            return Ok(Pass::Failed(Failure {
                index: i,
                attempt: lease.attempt,
                verdict,
            }));
        }
        if let Verdict::Complete { result, .. } = &verdict {
            if !result.is_empty() {
                results.push(
                    Completion::new(items[i].0.clone(), lease.token, result.clone())
                        .retention(config.retention),
                );
            }
        }
        kept.push((i, lease.attempt, verdict));
    }
    Ok(Pass::Done { kept, results })
}

/// The policy's verdict on a handler's result.
fn decide<T: Stored, E: fmt::Display>(
    result: Result<T, E>,
    attempt: u32,
    config: &Config,
    max_result_bytes: usize,
) -> Result<Verdict<T, E>, CodecError> {
    policy::on_result(
        result,
        attempt,
        config,
        max_result_bytes,
        Mode::Transactional,
    )
}

/// The outcomes of a first pass that kept every item: their records are written (completed by
/// the claim, with the non-empty results set after).
fn record_kept<T, E>(kept: Vec<(usize, u32, Verdict<T, E>)>, out: &mut [Option<Outcome<T, E>>]) {
    for (i, attempt, verdict) in kept {
        out[i] = Some(verdict.recorded(attempt, WriteOutcome::Applied));
    }
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
/// savepoint of its own; the failed item's verdict is recorded without running it again.
#[allow(clippy::too_many_arguments)]
async fn slow_round<S, T, E, H>(
    s: &mut S,
    st: &Statements,
    items: &[(Key, Fingerprint)],
    round: &[usize],
    reqs: &[ClaimRequest],
    config: &Config,
    max_result_bytes: usize,
    handler: &mut H,
    mut failed: Option<Failure<T, E>>,
    out: &mut [Option<Outcome<T, E>>],
) -> Result<(), Error>
where
    S: Query + ?Sized,
    T: Stored,
    E: fmt::Display,
    H: for<'c> FnMut(&'c mut S, usize) -> Option<TxFuture<'c, T, E>>,
{
    let claims = ops::claim_many(&mut Tp(&*s), &st.claim, reqs).await?;
    for (i, lease) in steps(round, claims, reqs, out)? {
        let key = &items[i].0;
        let outcome = match failed.take_if(|f| f.index == i) {
            // Its writes are already undone, with the first pass's savepoint.
            Some(failure) => {
                let verdict = again(failure, &lease, config, max_result_bytes)?;
                record(&mut Tp(&*s), st, key, &lease, config, verdict).await?
            }
            None => {
                simple(&*s, SAVEPOINT).await?;
                let result = handler(s, i).ok_or_else(called_twice)?.await;
                finish(
                    &mut Tp(&*s),
                    st,
                    key,
                    &lease,
                    config,
                    max_result_bytes,
                    result,
                )
                .await?
            }
        };
        out[i] = Some(outcome);
    }
    Ok(())
}

/// A first pass's verdict for the attempt the second pass claimed. Between the two, another
/// session may have run the key (the first pass's rollback released it), and whether a failure
/// is the last attempt depends on the attempt, so an error is decided again.
fn again<T: Stored, E: fmt::Display>(
    failure: Failure<T, E>,
    lease: &Lease,
    config: &Config,
    max_result_bytes: usize,
) -> Result<Verdict<T, E>, CodecError> {
    if failure.attempt == lease.attempt {
        return Ok(failure.verdict);
    }
    match failure.verdict {
        Verdict::Release { error, .. }
        | Verdict::Fail {
            error: Some(error), ..
        } => decide(Err(error), lease.attempt, config, max_result_bytes),
        verdict => Ok(verdict),
    }
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

pub(crate) fn request(key: &Key, fingerprint: Fingerprint, config: &Config) -> ClaimRequest {
    ClaimRequest::new(key.clone(), fingerprint)
        .lease(config.lease)
        .retention(config.retention)
        .max_attempts(config.max_attempts)
        .owner(config.owner.clone())
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
    Ok(policy::on_claim(claim, fingerprint)?)
}

/// Ends the handler's savepoint (kept or undone, as the policy's verdict says) and writes the
/// final record.
pub(crate) async fn finish<X: Exec, T: Stored, E: fmt::Display>(
    x: &mut X,
    st: &Statements,
    key: &Key,
    lease: &Lease,
    config: &Config,
    max_result_bytes: usize,
    result: Result<T, E>,
) -> Result<Outcome<T, E>, Error> {
    let verdict = decide(result, lease.attempt, config, max_result_bytes)?;
    x.simple(if verdict.keeps_writes() { KEEP } else { UNDO })
        .await?;
    record(x, st, key, lease, config, verdict).await
}

/// Writes a verdict's record under the claim's token. The claim's row lock is held until the
/// transaction ends, so only a write of the caller's own in this transaction (an evict) can
/// take the key away; the policy never reports that as a success.
async fn record<X: Exec, T, E>(
    x: &mut X,
    st: &Statements,
    key: &Key,
    lease: &Lease,
    config: &Config,
    verdict: Verdict<T, E>,
) -> Result<Outcome<T, E>, Error> {
    let (which, bytes): (Fenced, &[u8]) = match &verdict {
        Verdict::Complete { result, .. } => (Fenced::Complete, result),
        Verdict::Release { .. } => (Fenced::Release, &[]),
        Verdict::Fail { reason, .. } => (Fenced::Fail, reason.as_bytes()),
    };
    let written = ops::fenced(x, st, which, key, lease.token, bytes, config.retention).await?;
    Ok(verdict.recorded(lease.attempt, written))
}

/// A pooled connection inside a transaction that idem began for
/// [`Transactional::run_batch_transactional`] (or `run_transactional`): handlers run their SQL
/// on it (it dereferences to a [`deadpool_postgres::Client`], whose statement cache it shares)
/// and idem commits. It gives no `&mut` access to the client, so a handler cannot begin a
/// transaction of its own on it (`client.transaction()` would commit idem's early); it must not
/// send `COMMIT` or `ROLLBACK` either.
pub struct TxClient(Pooled);

impl Deref for TxClient {
    type Target = deadpool_postgres::Client;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl fmt::Debug for TxClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxClient").finish_non_exhaustive()
    }
}

impl Query for TxClient {
    fn rows(
        &self,
        sql: &str,
        types: &[tokio_postgres::types::Type],
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>> + Send {
        (**self).rows(sql, types, params)
    }

    fn batch(&self, sql: &str) -> impl Future<Output = Result<(), tokio_postgres::Error>> + Send {
        (**self).batch(sql)
    }
}

/// Transactional mode in a transaction of idem's own on a pooled connection: the fastest path.
///
/// The common case costs two round trips besides the handlers' own statements: `BEGIN` sent
/// with the claim (new keys are inserted as completed in one statement), then `COMMIT` (with
/// the non-empty results). Because idem owns the transaction it needs no savepoint: if a
/// handler fails, the whole transaction is rolled back and the batch runs again with one
/// savepoint per item, so a failure undoes only its own item's writes; `handler` may then run
/// twice for an item (never for the item that failed). Outcomes are those of
/// [`run_batch_in_transaction`]. On any error nothing of the batch is committed and the
/// connection is closed rather than returned to the pool; so it is if a handler panics.
///
/// ```no_run
/// # async fn demo(store: idem_postgres::PostgresStore) -> Result<(), Box<dyn std::error::Error>> {
/// use idem::{Config, Fingerprint, Namespace, Transactional};
/// let key = Namespace::new("ledger")?.key("transfer-1")?;
/// let outcome = store
///     .run_transactional(&key, Fingerprint::of(b"10"), &Config::default(), |tx| {
///         Box::pin(async move {
///             tx.execute("INSERT INTO ledger (transfer, amount) VALUES ('transfer-1', 10)", &[])
///                 .await
///                 .map(drop)
///         })
///     })
///     .await?;
/// # let _ = outcome; Ok(()) }
/// ```
impl Transactional for PostgresStore {
    type Tx = TxClient;

    async fn run_batch_transactional<T, E, H>(
        &self,
        items: &[(Key, Fingerprint)],
        config: &Config,
        handler: H,
    ) -> Result<Vec<Outcome<T, E>>, Error>
    where
        T: Stored + Send + 'static,
        E: fmt::Display + Send + 'static,
        H: for<'a> Fn(&'a mut TxClient, usize) -> TxFuture<'a, T, E> + Send + Sync + 'static,
    {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        // Until it is kept, the connection is closed when dropped: an error or a panicking
        // handler may leave it inside a transaction, which must never go back to the pool.
        let mut client = TxClient(Pooled(Some(self.client().await?)));
        let out = owned(
            &mut client,
            self.table().sql(),
            items,
            config,
            self.max_result_bytes,
            &mut |c: &mut TxClient, i| Some(handler(c, i)),
        )
        .await;
        if let Ok(outcomes) = &out {
            client.0.keep();
            count(config, outcomes);
        }
        out
    }
}

/// Idem's own transaction on `c`: `BEGIN` with the claim, the handlers, `COMMIT`.
async fn owned<T, E, H>(
    c: &mut TxClient,
    st: &Statements,
    items: &[(Key, Fingerprint)],
    config: &Config,
    max_result_bytes: usize,
    handler: &mut H,
) -> Result<Vec<Outcome<T, E>>, Error>
where
    T: Stored,
    E: fmt::Display,
    H: for<'c> FnMut(&'c mut TxClient, usize) -> Option<TxFuture<'c, T, E>>,
{
    // An error below may leave the transaction open or aborted: the caller then closes the
    // connection. A handler's error is an outcome, not an error.
    let rounds = ops::rounds(items.iter().map(|(k, _)| k));
    let [round] = &rounds[..] else {
        // A batch repeating a key goes the general way, with savepoints.
        simple(&*c, "BEGIN").await?;
        let outcomes = batch(c, st, items, config, max_result_bytes, handler).await?;
        simple(&*c, COMMIT).await?;
        return Ok(outcomes);
    };
    let reqs: Vec<ClaimRequest> = items
        .iter()
        .map(|(key, fp)| request(key, *fp, config))
        .collect();
    let q = &*c;
    let (begun, claims) = futures_util::future::join(simple(q, "BEGIN"), async {
        ops::claim_new_first(&mut Tp(q), st, &reqs).await
    })
    .await;
    begun?;
    let mut out: Vec<Option<Outcome<T, E>>> = (0..items.len()).map(|_| None).collect();
    let run = steps(round, claims?, &reqs, &mut out)?;
    match run_all(c, items, &run, config, max_result_bytes, handler).await? {
        Pass::Done { kept, results } => {
            set_results(&*c, st, &results).await?;
            simple(&*c, COMMIT).await?;
            record_kept(kept, &mut out);
        }
        Pass::Failed(failure) => {
            // Start again with one savepoint per item; the failed item's writes are gone with
            // the rollback and its verdict is recorded without running it again.
            simple(&*c, RESTART).await?;
            out.iter_mut().for_each(|o| *o = None);
            slow_round(
                c,
                st,
                items,
                round,
                &reqs,
                config,
                max_result_bytes,
                handler,
                Some(failure),
                &mut out,
            )
            .await?;
            simple(&*c, COMMIT).await?;
        }
    }
    collect(out)
}

#[cfg(test)]
mod tests {
    use idem::{Acquisition, Timestamp, Token};

    use super::*;

    fn lease(attempt: u32) -> Lease {
        Lease::new(
            Token::random(),
            attempt,
            Timestamp::from_millis(0),
            Acquisition::Retry,
        )
    }

    fn failure(attempt: u32, config: &Config) -> Failure<(), String> {
        let verdict = decide(Err("boom".to_owned()), attempt, config, 16).expect("verdict");
        Failure {
            index: 0,
            attempt,
            verdict,
        }
    }

    #[test]
    fn a_failure_is_decided_again_for_the_attempt_the_second_pass_claimed() {
        let config = Config::default().max_attempts(2);
        // Same attempt: the first pass's verdict stands.
        let same = again(failure(1, &config), &lease(1), &config, 16).expect("verdict");
        assert!(matches!(same, Verdict::Release { .. }), "{same:?}");
        // Another session ran attempt 1 in between: this is now the last attempt.
        let later = again(failure(1, &config), &lease(2), &config, 16).expect("verdict");
        let Verdict::Fail { reason: want, .. } = failure(2, &config).verdict else {
            panic!("the policy fails the last attempt");
        };
        assert!(
            matches!(later, Verdict::Fail { ref reason, error: Some(_) } if *reason == want),
            "{later:?}"
        );
        // A result over the limit fails whatever the attempt.
        let big = Failure {
            index: 0,
            attempt: 1,
            verdict: decide::<String, String>(Ok("x".repeat(17)), 1, &config, 16).expect("verdict"),
        };
        let big = again(big, &lease(2), &config, 16).expect("verdict");
        assert!(matches!(big, Verdict::Fail { error: None, .. }), "{big:?}");
    }
}
