//! Transactional mode (docs/design.md, section 5): the record is written in the same SQLite
//! transaction as the handler's own writes. Commit = effect + record; a crash before the commit
//! leaves neither, and the redelivery runs the handler as if for the first time. No window.
//!
//! In this mode no in-progress state is ever committed: the claim decision, the handler's writes
//! and the final record (completed, released or failed) all happen under one write lock, so a
//! concurrent duplicate waits for the lock and then sees the completed record.

use std::borrow::Borrow;
use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use idem::policy::{self, Mode, Step, Verdict};
use idem::transition::{self, Change};
use idem::{
    Acquisition, Clock, Completion, Config, Error, Fingerprint, Key, Outcome, Record, StoreError,
    StoreErrorKind, Stored, SystemClock, Timestamp, Transactional, TxFuture,
};
use rusqlite::Connection;

use crate::SqliteStore;
use crate::ops;
use crate::writer::ROLLBACK_JOB;

const SAVEPOINT: &str = "SAVEPOINT idem_handler";
const KEEP: &str = "RELEASE idem_handler";
const UNDO: &str = "ROLLBACK TO idem_handler; RELEASE idem_handler";

/// Runs `handler` exactly once per key inside the caller's open transaction on `conn`.
///
/// The form for a connection the caller manages: [`SqliteStore`] implements
/// [`Transactional`] for the store's own database. The caller begins the transaction (`BEGIN
/// IMMEDIATE`, so that the claim decision holds the write lock), calls this, and **commits
/// whatever the outcome**: the record of a failed
/// attempt (released, or failed when attempts are exhausted) is written in the same transaction
/// and counts only if committed. The handler's writes are made inside a savepoint and undone if
/// it returns `Err`. `config` supplies retention, the attempt limit and retry backoff (lease and
/// heartbeat do not apply: the claim never outlives the transaction).
///
/// A result over `max_result_bytes` undoes the handler's writes and fails the key with the
/// reason: unlike store mode, nothing has happened yet that a retry would repeat, but the
/// result would never fit.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use idem::{Config, Fingerprint, Namespace, Outcome};
/// let mut conn = rusqlite::Connection::open_in_memory()?;
/// idem_sqlite::create_schema(&conn)?;
/// conn.execute_batch("CREATE TABLE ledger (id TEXT PRIMARY KEY, amount INTEGER)")?;
/// let key = Namespace::new("ledger")?.key("transfer-1")?;
/// for _ in 0..2 {
///     let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
///     let outcome = idem_sqlite::run_in_transaction(
///         &tx, &key, Fingerprint::of(b"10"), &Config::default(), 64 * 1024,
///         |conn| conn.execute("INSERT INTO ledger VALUES ('transfer-1', 10)", []).map(|_| ()),
///     )?;
///     tx.commit()?;
///     assert!(matches!(outcome, Outcome::Executed(()) | Outcome::Replayed(())));
/// }
/// let rows: i64 = conn.query_row("SELECT COUNT(*) FROM ledger", [], |r| r.get(0))?;
/// assert_eq!(rows, 1);
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`StoreErrorKind::Config`] if `conn` is not inside a transaction; a [`StoreError`] when the
/// database fails; [`Error::Codec`] when a stored result cannot be decoded as `T`. On any error
/// the caller should roll back.
pub fn run_in_transaction<T, E, F>(
    conn: &Connection,
    key: &Key,
    fingerprint: Fingerprint,
    config: &Config,
    max_result_bytes: usize,
    handler: F,
) -> Result<Outcome<T, E>, Error>
where
    T: Stored,
    E: fmt::Display,
    F: FnOnce(&Connection) -> Result<T, E>,
{
    if conn.is_autocommit() {
        return Err(StoreError::new(
            StoreErrorKind::Config,
            "run_in_transaction needs a transaction open on the connection (BEGIN IMMEDIATE)",
        )
        .into());
    }
    let mut handler = Some(handler);
    let items = [(key.clone(), fingerprint)];
    let mut conn = conn;
    let outcome = run_items(
        &mut conn,
        &items,
        config,
        max_result_bytes,
        SystemClock.now(),
        |conn, _| Some(handler.take().map(|h| h(conn))),
    )?
    .pop();
    match outcome {
        Some(outcome) => policy::single(outcome),
        None => Err(StoreError::new(StoreErrorKind::Backend, "no outcome").into()),
    }
}

/// Creates idem's tables in a database the caller manages (for [`run_in_transaction`]).
///
/// # Errors
/// A [`StoreError`] when the schema cannot be created or is of another version.
pub fn create_schema(conn: &Connection) -> Result<(), StoreError> {
    ops::migrate(conn)
}

/// Runs every item in the open transaction on `conn`, in order, each handler in a savepoint of
/// its own (SQLite savepoints cost no round trip): a failure undoes only its own item's writes.
/// `handler` answers `None` if it could not finish without waiting, `Some(Err(Once(None)))` if it
/// cannot run twice.
fn run_items<C, T, E, H>(
    conn: &mut C,
    items: &[(Key, Fingerprint)],
    config: &Config,
    max_result_bytes: usize,
    now: Timestamp,
    mut handler: H,
) -> Result<Vec<Outcome<T, policy::Once<E>>>, Error>
where
    C: Borrow<Connection>,
    T: Stored,
    E: fmt::Display,
    H: FnMut(&mut C, usize) -> Option<Option<Result<T, E>>>,
{
    let mut outcomes = Vec::with_capacity(items.len());
    for (i, (key, fingerprint)) in items.iter().enumerate() {
        let req = policy::claim_request(key.clone(), *fingerprint, config);
        let mut slot = ops::load((*conn).borrow(), key)?;
        let (claim, claimed) = transition::claim(&mut slot, &req, now);
        let lease = match policy::on_claim(claim, *fingerprint)? {
            Step::Run(lease) => lease,
            Step::Done(outcome) => {
                // An exhausting claim writes the failed record.
                save_if((*conn).borrow(), claimed, &slot)?;
                idem::metrics::record_outcome(&config.name, &outcome, false);
                outcomes.push(outcome);
                continue;
            }
        };
        let savepoint = |conn: &C, sql: &str| {
            conn.borrow()
                .execute_batch(sql)
                .map_err(|e| ops::sql_error("savepoint", e))
        };
        savepoint(conn, SAVEPOINT)?;
        let result = match handler(conn, i) {
            Some(Some(result)) => result.map_err(|e| policy::Once(Some(e))),
            Some(None) => Err(policy::Once(None)),
            None => {
                savepoint(conn, UNDO)?;
                return Err(pending());
            }
        };
        let verdict = match policy::on_result(
            result,
            lease.attempt,
            config,
            max_result_bytes,
            Mode::Transactional,
        ) {
            Ok(verdict) => verdict,
            Err(e) => {
                savepoint(conn, UNDO)?;
                return Err(e.into());
            }
        };
        savepoint(conn, if verdict.keeps_writes() { KEEP } else { UNDO })?;
        let retention = config.retention;
        let (written, change) = match &verdict {
            Verdict::Complete { result, .. } => {
                let c =
                    Completion::new(key.clone(), lease.token, result.clone()).retention(retention);
                transition::complete(&mut slot, &c, now)
            }
            Verdict::Release { .. } => transition::release(&mut slot, lease.token, retention, now),
            Verdict::Fail { reason, .. } => {
                transition::fail(&mut slot, lease.token, reason, retention, now)
            }
        };
        let change = if claimed.is_write() {
            Change::Updated
        } else {
            change
        };
        save_if((*conn).borrow(), change, &slot)?;
        let outcome = verdict.recorded(lease.attempt, written);
        let reprocessed = lease.acquisition == Acquisition::Reprocess;
        idem::metrics::record_outcome(&config.name, &outcome, reprocessed);
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

fn save_if(conn: &Connection, change: Change, slot: &Option<Record>) -> Result<(), StoreError> {
    match slot {
        Some(rec) if change.is_write() => ops::save(conn, rec),
        _ => Ok(()),
    }
}

/// Polls a handler's future once: the writer thread cannot wait, so a handler that is not ready
/// at once is a misuse (its writes are undone and the batch fails).
fn poll_once<F: Future>(fut: F) -> Option<F::Output> {
    let fut = pin!(fut);
    match fut.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => Some(out),
        Poll::Pending => None,
    }
}

fn pending() -> Error {
    StoreError::new(
        StoreErrorKind::Config,
        "a SQLite transactional handler must finish without waiting: it runs on the store's \
         writer thread inside the group commit, so it may run SQL on the connection but not \
         await a timer, a network call or another task; nothing of the batch was written",
    )
    .into()
}

/// Transactional mode on the store's own database: the handler gets the writer's connection,
/// inside the group transaction, and the call returns once that transaction committed the
/// handler's writes together with the records.
///
/// The handler runs on the writer thread while other operations wait: keep it to SQL on the
/// connection. Its future is polled once and must be ready then (an `async` block that only
/// calls rusqlite is); one that waits fails the batch with a
/// [`Config`](StoreErrorKind::Config) error and nothing written. Each item runs in a savepoint
/// of its own, undone if its handler returns `Err` (or panics: the batch then fails, nothing of
/// it written). Outcomes follow [`run_in_transaction`].
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem::{Config, Fingerprint, Namespace, Transactional};
/// let store = idem_sqlite::SqliteStore::open("app.db")?;
/// let key = Namespace::new("ledger")?.key("transfer-1")?;
/// let outcome = store
///     .run_transactional(&key, Fingerprint::of(b"10"), &Config::default(), |conn| {
///         Box::pin(async move {
///             conn.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1", [])
///                 .map(drop)
///         })
///     })
///     .await?;
/// # let _ = outcome; Ok(()) }
/// ```
impl Transactional for SqliteStore {
    type Tx = Connection;

    async fn run_batch_transactional<T, E, H>(
        &self,
        items: &[(Key, Fingerprint)],
        config: &Config,
        handler: H,
    ) -> Result<Vec<Outcome<T, E>>, Error>
    where
        T: Stored + Send + 'static,
        E: fmt::Display + Send + 'static,
        H: for<'a> Fn(&'a mut Connection, usize) -> TxFuture<'a, T, E> + Send + Sync + 'static,
    {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let items = items.to_vec();
        let config = config.clone();
        let limit = idem::Store::max_result_bytes(self);
        // Errors travel inside Ok so the writer reports them like any other result; the job's
        // writes are undone first, so an effect never commits without its record.
        let out = self
            .call(true, move |conn, now| {
                let out = run_items(conn, &items, &config, limit, now, |conn, i| {
                    poll_once(handler(conn, i)).map(Some)
                });
                if out.is_err() {
                    conn.execute_batch(ROLLBACK_JOB)
                        .map_err(|e| ops::sql_error("rollback", e))?;
                }
                Ok(out)
            })
            .await??;
        out.into_iter().map(policy::single).collect()
    }
}
