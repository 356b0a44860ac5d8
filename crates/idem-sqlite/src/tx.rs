//! Transactional mode (contract section 5): the record is written in the same SQLite
//! transaction as the handler's own writes. Commit = effect + record; a crash before the commit
//! leaves neither, and the redelivery runs the handler as if for the first time. No window.
//!
//! In this mode no in-progress state is ever committed: the claim decision, the handler's writes
//! and the final record (completed, released or failed) all happen under one write lock, so a
//! concurrent duplicate waits for the lock and then sees the completed record.

use std::fmt;

use idem::transition::{self, Change};
use idem::{
    Acquisition, Claim, ClaimRequest, Clock, Completion, Config, Error, Fingerprint, Key, Outcome,
    Record, StoreError, StoreErrorKind, Stored, SystemClock, Timestamp,
};
use rusqlite::Connection;

use crate::SqliteStore;
use crate::ops;
use crate::writer::ROLLBACK_JOB;

/// Runs `handler` exactly once per key inside the caller's open transaction on `conn`.
///
/// The caller begins the transaction (`BEGIN IMMEDIATE`, so that the claim decision holds the
/// write lock), calls this, and **commits whatever the outcome**: the record of a failed
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
    run_at(
        conn,
        key,
        fingerprint,
        config,
        max_result_bytes,
        SystemClock.now(),
        handler,
    )
}

/// Creates idem's tables in a database the caller manages (for [`run_in_transaction`]).
///
/// # Errors
/// A [`StoreError`] when the schema cannot be created or is of another version.
pub fn create_schema(conn: &Connection) -> Result<(), StoreError> {
    ops::migrate(conn)
}

pub(crate) fn run_at<T, E, F>(
    conn: &Connection,
    key: &Key,
    fingerprint: Fingerprint,
    config: &Config,
    max_result_bytes: usize,
    now: Timestamp,
    handler: F,
) -> Result<Outcome<T, E>, Error>
where
    T: Stored,
    E: fmt::Display,
    F: FnOnce(&Connection) -> Result<T, E>,
{
    let mut reprocessed = false;
    let out = decide(
        conn,
        key,
        fingerprint,
        config,
        max_result_bytes,
        now,
        &mut reprocessed,
        handler,
    );
    if let Ok(outcome) = &out {
        idem::metrics::record_outcome(&config.name, outcome, reprocessed);
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn decide<T, E, F>(
    conn: &Connection,
    key: &Key,
    fingerprint: Fingerprint,
    config: &Config,
    max_result_bytes: usize,
    now: Timestamp,
    reprocessed: &mut bool,
    handler: F,
) -> Result<Outcome<T, E>, Error>
where
    T: Stored,
    E: fmt::Display,
    F: FnOnce(&Connection) -> Result<T, E>,
{
    let req = ClaimRequest::new(key.clone(), fingerprint)
        .lease(config.lease)
        .retention(config.retention)
        .max_attempts(config.max_attempts)
        .owner(config.owner.clone());
    let mut slot = ops::load(conn, key)?;
    let (claim, change) = transition::claim(&mut slot, &req, now);
    let lease = match claim {
        Claim::Acquired(lease) => {
            *reprocessed = lease.acquisition == Acquisition::Reprocess;
            lease
        }
        Claim::Completed { result } => return Ok(Outcome::Replayed(T::decode(result)?)),
        Claim::InProgress { retry_after } => return Ok(Outcome::InProgress { retry_after }),
        Claim::Mismatch { stored } => {
            return Ok(Outcome::Mismatch {
                stored,
                received: fingerprint,
            });
        }
        Claim::Exhausted { attempts, reason } => {
            save_if(conn, change, &slot)?;
            return Ok(Outcome::Exhausted {
                attempts,
                reason,
                error: None,
            });
        }
        _ => {
            return Err(StoreError::new(StoreErrorKind::Backend, "unknown claim outcome").into());
        }
    };

    let sp = |sql: &str| {
        conn.execute_batch(sql)
            .map_err(|e| ops::sql_error("savepoint", e))
    };
    sp("SAVEPOINT idem_handler")?;
    let result = handler(conn);
    let outcome = match result {
        Ok(value) => {
            let bytes = match value.encode() {
                Ok(bytes) => bytes,
                Err(e) => {
                    sp("ROLLBACK TO idem_handler; RELEASE idem_handler")?;
                    return Err(e.into());
                }
            };
            if bytes.len() > max_result_bytes {
                sp("ROLLBACK TO idem_handler; RELEASE idem_handler")?;
                let reason = format!(
                    "the handler's result is {} bytes, over the store's limit of {max_result_bytes}; \
                     its writes were rolled back and the key is failed",
                    bytes.len()
                );
                let (_, change) =
                    transition::fail(&mut slot, lease.token, &reason, config.retention, now);
                save_if(conn, change, &slot)?;
                return Ok(Outcome::Exhausted {
                    attempts: lease.attempt,
                    reason,
                    error: None,
                });
            }
            sp("RELEASE idem_handler")?;
            let completion =
                Completion::new(key.clone(), lease.token, bytes).retention(config.retention);
            let (_, change) = transition::complete(&mut slot, &completion, now);
            save_if(conn, change, &slot)?;
            Outcome::Executed(value)
        }
        Err(error) => {
            sp("ROLLBACK TO idem_handler; RELEASE idem_handler")?;
            if config
                .max_attempts
                .is_some_and(|max| lease.attempt >= max.get())
            {
                let reason = format!("attempt {} failed: {error}", lease.attempt);
                let (_, change) =
                    transition::fail(&mut slot, lease.token, &reason, config.retention, now);
                save_if(conn, change, &slot)?;
                Outcome::Exhausted {
                    attempts: lease.attempt,
                    reason,
                    error: Some(error),
                }
            } else {
                let (_, change) =
                    transition::release(&mut slot, lease.token, config.retention, now);
                save_if(conn, change, &slot)?;
                Outcome::Released {
                    error,
                    attempt: lease.attempt,
                    retry_after: config.retry_backoff.delay(lease.attempt),
                }
            }
        }
    };
    Ok(outcome)
}

fn save_if(conn: &Connection, change: Change, slot: &Option<Record>) -> Result<(), StoreError> {
    match slot {
        Some(rec) if change.is_write() => ops::save(conn, rec),
        _ => Ok(()),
    }
}

impl SqliteStore {
    /// Transactional mode on the store's own database: runs `handler` with the writer's
    /// connection, inside the group transaction, and returns once that transaction committed
    /// the handler's writes together with the record.
    ///
    /// The handler runs on the writer thread while other operations wait: keep it to SQL on
    /// `conn` (no network calls, no sleeping). Its writes are made in a savepoint: undone if it
    /// returns `Err` or panics. Outcomes follow [`run_in_transaction`].
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use idem::{Config, Namespace};
    /// let store = idem_sqlite::SqliteStore::open("app.db")?;
    /// let key = Namespace::new("ledger")?.key("transfer-1")?;
    /// let outcome = store
    ///     .run_transactional(key, b"payload".to_vec(), Config::default(), |conn| {
    ///         conn.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1", [])
    ///             .map(|_| ())
    ///     })
    ///     .await?;
    /// # let _ = outcome; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`run_in_transaction`]; a [`StoreError`] if the batch's commit fails (then neither the
    /// handler's writes nor the record exist).
    pub async fn run_transactional<T, E, F>(
        &self,
        key: Key,
        payload: impl AsRef<[u8]>,
        config: Config,
        handler: F,
    ) -> Result<Outcome<T, E>, Error>
    where
        T: Stored + Send + 'static,
        E: fmt::Display + Send + 'static,
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    {
        let fingerprint = Fingerprint::of(payload.as_ref());
        let limit = idem::Store::max_result_bytes(self);
        // Errors travel inside Ok so the writer reports them like any other result; the
        // job's writes are undone first, so an effect never commits without its record.
        self.call(true, move |conn, now| {
            let out = run_at(conn, &key, fingerprint, &config, limit, now, handler);
            if out.is_err() {
                conn.execute_batch(ROLLBACK_JOB)
                    .map_err(|e| ops::sql_error("rollback", e))?;
            }
            Ok(out)
        })
        .await?
    }
}
