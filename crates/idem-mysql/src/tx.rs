//! Transactional mode (contract section 5): the record is written in the same MySQL
//! transaction as the handler's own writes. Commit = effect + record; a crash or a rollback
//! before the commit leaves neither, and the redelivery runs the handler as if for the first
//! time. No window.
//!
//! One round trip claims: `INSERT … ON DUPLICATE KEY UPDATE state = state` of a fresh
//! in-progress record, which inserts a new key or takes an exclusive lock on an existing one,
//! then `SELECT … FOR UPDATE` to read what is there, then a savepoint. The decision is
//! [`idem::transition::claim`] on that row. The handler runs inside the savepoint; the final
//! record (completed, released or failed) is one `UPDATE` at the end. No in-progress state is
//! ever committed, and the row stays locked until the caller commits or rolls back, so a
//! concurrent duplicate waits on the lock and then sees the completed record (or, if this
//! transaction rolled back, claims the key itself).
//!
//! Whether a row was inserted by this call is told by its token (a fresh random one per call),
//! not by "rows affected", whose meaning depends on the caller's connection flags.

use std::fmt::{self, Write as _};
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use idem::transition;
use idem::{
    Acquisition, Claim, ClaimRequest, Completion, Config, Error, Fingerprint, Key, Lease, Outcome,
    Record, StoreError, StoreErrorKind, Stored,
};
use mysql_async::{Transaction, TxOpts};

use crate::error::{code, server_code, store_error};
use crate::exec::{self, script};
use crate::sql::{self, COLUMNS, NOW_MS, NOW_VAR, clamp};
use crate::{MysqlStore, error};

/// What a transactional handler returns: a boxed future borrowing the transaction, written
/// `|tx| Box::pin(async move { … })`. (A boxed future, rather than an `async` closure, keeps
/// the caller's future `Send` so it can be spawned.)
pub type TxFuture<'a, T, E> = BoxFuture<'a, Result<T, E>>;

const SAVEPOINT: &str = "SAVEPOINT idem_handler";
const ROLLBACK_TO: &str = "ROLLBACK TO SAVEPOINT idem_handler";

impl MysqlStore {
    /// Runs `handler` exactly once per key inside the caller's open transaction `tx`, on this
    /// store's table.
    ///
    /// The caller starts the transaction (on any connection to the same database; `READ
    /// COMMITTED` avoids gap-lock deadlocks between claims of neighbouring keys), calls this,
    /// and **commits whatever the outcome**: the record of a failed attempt (released, or
    /// failed when attempts are exhausted) is written in the same transaction and counts only
    /// if committed. The handler's writes are made inside a savepoint and undone if it returns
    /// `Err`. `config` supplies retention, the attempt limit, the owner label and the retry
    /// backoff (lease and heartbeat do not apply: the claim never outlives the transaction).
    ///
    /// The key's row stays locked until the transaction ends: a concurrent delivery of the same
    /// key waits (up to `innodb_lock_wait_timeout`), then replays the committed result.
    ///
    /// ```no_run
    /// # async fn demo(store: idem_mysql::MysqlStore) -> Result<(), Box<dyn std::error::Error>> {
    /// use idem::{Config, Fingerprint, Namespace};
    /// use mysql_async::prelude::Queryable;
    ///
    /// let key = Namespace::new("ledger")?.key("transfer-1")?;
    /// let mut tx = store.pool().start_transaction(mysql_async::TxOpts::default()).await?;
    /// let outcome = store
    ///     .run_in_transaction(&mut tx, &key, Fingerprint::of(b"10"), &Config::default(), |tx| {
    ///         Box::pin(async move {
    ///             tx.query_drop("UPDATE accounts SET balance = balance - 10 WHERE id = 1").await
    ///         })
    ///     })
    ///     .await?;
    /// tx.commit().await?;
    /// println!("{}", outcome.kind());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// A [`StoreError`] when the server fails (a deadlock is [`StoreErrorKind::Busy`] and has
    /// rolled the whole transaction back); [`Error::Codec`] when a stored result cannot be
    /// decoded as `T`. On any error the caller should roll back.
    pub async fn run_in_transaction<'t, T, E, F>(
        &self,
        tx: &mut Transaction<'t>,
        key: &Key,
        fingerprint: Fingerprint,
        config: &Config,
        handler: F,
    ) -> Result<Outcome<T, E>, Error>
    where
        T: Stored + Send + 't,
        E: fmt::Display + Send + 't,
        F: for<'a> FnOnce(&'a mut Transaction<'t>) -> TxFuture<'a, T, E>,
    {
        let mut handler = Some(handler);
        let items = [(key.clone(), fingerprint)];
        let mut outcomes = self
            .run_batch_in_transaction(tx, &items, config, |_, tx| -> TxFuture<'_, T, Once<E>> {
                // A batch of one calls its handler at most once.
                let Some(handler) = handler.take() else {
                    return Box::pin(std::future::ready(Err(Once(None))));
                };
                let run = handler(tx);
                Box::pin(async move { run.await.map_err(|e| Once(Some(e))) })
            })
            .await?;
        let outcome = outcomes.pop().ok_or_else(|| {
            Error::from(StoreError::new(
                StoreErrorKind::Backend,
                "transactional run gave no outcome",
            ))
        })?;
        Ok(match outcome {
            Outcome::Executed(v) => Outcome::Executed(v),
            Outcome::Replayed(v) => Outcome::Replayed(v),
            Outcome::InProgress { retry_after } => Outcome::InProgress { retry_after },
            Outcome::Mismatch { stored, received } => Outcome::Mismatch { stored, received },
            Outcome::LeaseLost { attempt } => Outcome::LeaseLost { attempt },
            Outcome::Released {
                error: Once(Some(error)),
                attempt,
                retry_after,
            } => Outcome::Released {
                error,
                attempt,
                retry_after,
            },
            Outcome::Exhausted {
                attempts,
                reason,
                error,
            } => Outcome::Exhausted {
                attempts,
                reason,
                error: error.and_then(|e| e.0),
            },
            _ => {
                return Err(StoreError::new(
                    StoreErrorKind::Backend,
                    "transactional run gave an unexpected outcome",
                )
                .into());
            }
        })
    }

    /// Runs `handler(i, tx)` for each delivery `items[i]` whose claim is acquired, in order, in
    /// the caller's open transaction: the batch form of
    /// [`run_in_transaction`](Self::run_in_transaction), with one claim round trip and one
    /// write round trip for the whole batch.
    ///
    /// Outcomes come back in input order and are exactly those of calling
    /// `run_in_transaction` once per item in order in the same transaction: a key twice in the
    /// batch runs once and replays the second time.
    ///
    /// Handlers run first under one savepoint for the whole batch. If one fails (or returns a
    /// result over the limit), the writes of every handler of the batch are rolled back and the
    /// batch runs again from the start with a savepoint per handler (a round trip each), so
    /// that a failure undoes only its own writes. A handler may therefore be called twice for
    /// one delivery; as always in transactional mode, only its writes in the transaction
    /// count, and those commit once.
    ///
    /// # Errors
    /// As [`run_in_transaction`](Self::run_in_transaction), for the whole batch.
    pub async fn run_batch_in_transaction<'t, T, E, F>(
        &self,
        tx: &mut Transaction<'t>,
        items: &[(Key, Fingerprint)],
        config: &Config,
        handler: F,
    ) -> Result<Vec<Outcome<T, E>>, Error>
    where
        T: Stored + Send,
        E: fmt::Display + Send,
        F: for<'a> FnMut(usize, &'a mut Transaction<'t>) -> TxFuture<'a, T, E>,
    {
        let outcomes = self.batch(tx, items, config, handler).await?;
        for outcome in &outcomes {
            idem::metrics::record_outcome(&config.name, outcome, false);
        }
        Ok(outcomes)
    }

    async fn batch<'t, T, E, F>(
        &self,
        tx: &mut Transaction<'t>,
        items: &[(Key, Fingerprint)],
        config: &Config,
        mut handler: F,
    ) -> Result<Vec<Outcome<T, E>>, Error>
    where
        T: Stored + Send,
        E: fmt::Display + Send,
        F: for<'a> FnMut(usize, &'a mut Transaction<'t>) -> TxFuture<'a, T, E>,
    {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let table = &self.inner.table;
        let limit = self.inner.max_result_bytes;
        let err = |context: &str, e: mysql_async::Error| -> Error {
            if server_code(&e) == Some(code::DEADLOCK) {
                return StoreError::new(
                    StoreErrorKind::Busy,
                    format!(
                        "mysql {context}: deadlock; the server rolled the whole transaction \
                         back, retry it"
                    ),
                )
                .with_source(e)
                .into();
            }
            store_error(context, table.name(), e).into()
        };
        let reqs: Vec<ClaimRequest> = items
            .iter()
            .map(|(key, fp)| {
                ClaimRequest::new(key.clone(), *fp)
                    .lease(clamp(config.lease))
                    .retention(clamp(config.retention))
                    .max_attempts(config.max_attempts)
                    .owner(config.owner.clone())
            })
            .collect();

        // Claim round trip: insert-or-lock every key, read them all, set the savepoint.
        let keys = crate::ops::Keys::of(reqs.iter().map(|r| &r.key));
        let mut first_req = vec![usize::MAX; keys.distinct.len()];
        for (i, &s) in keys.slot_of.iter().enumerate() {
            if first_req[s] == usize::MAX {
                first_req[s] = i;
            }
        }
        let mut sql = format!(
            "SET {NOW_VAR} = {NOW_MS}; INSERT INTO {} ({COLUMNS}) VALUES ",
            table.q()
        );
        let firsts: Vec<&ClaimRequest> = first_req.iter().map(|&i| &reqs[i]).collect();
        for (n, req) in sql::key_order(&firsts, |r| &r.key).into_iter().enumerate() {
            if n > 0 {
                sql.push_str(", ");
            }
            sql::new_claim_values(&mut sql, req);
        }
        let _ = write!(
            sql,
            " ON DUPLICATE KEY UPDATE state = state; SELECT {NOW_VAR}; "
        );
        crate::ops::select_rows(&mut sql, table, &keys.distinct, true);
        let _ = write!(sql, "; {SAVEPOINT}");
        let mut done = script(&mut *tx, &sql)
            .await
            .ok()
            .map_err(|e| err("claim", e))?;
        let now = idem::Timestamp::from_millis(exec::scalar_i64(done.get_mut(2), "clock")?);
        let rows = done
            .get_mut(3)
            .map(|d| std::mem::take(&mut d.rows))
            .unwrap_or_default();
        let slots: Vec<Option<Record>> = keys.slots(rows)?.into_iter().map(|s| s.rec).collect();
        let inserted: Vec<bool> = slots
            .iter()
            .zip(&first_req)
            .map(|(rec, &i)| rec.as_ref().and_then(|r| r.token) == Some(reqs[i].token))
            .collect();
        let initial = slots;

        // Handlers, in order. First optimistically, all inside the savepoint set by the claim
        // round trip (a savepoint each would cost a round trip each). If one fails, that
        // savepoint undoes every handler's writes and the batch runs again with a savepoint per
        // handler, so a failure undoes only its own writes.
        let mut careful = false;
        let (outcomes, slots, dirty) = 'run: loop {
            let mut slots = initial.clone();
            let mut dirty = vec![false; slots.len()];
            let mut savepoint_fresh = true;
            // Whether a handler of this pass wrote under the shared savepoint.
            let mut wrote_before = false;
            let mut outcomes = Vec::with_capacity(items.len());
            for (i, req) in reqs.iter().enumerate() {
                let s = keys.slot_of[i];
                let slot = &mut slots[s];
                let claim = if i == first_req[s] && inserted[s] {
                    let until = slot.as_ref().and_then(|r| r.lease_until).unwrap_or(now);
                    Claim::Acquired(Lease::new(req.token, 1, until, Acquisition::New))
                } else {
                    let (claim, change) = transition::claim(slot, req, now);
                    dirty[s] |= change.is_write();
                    claim
                };
                let lease = match claim {
                    Claim::Acquired(lease) => lease,
                    Claim::Completed { result } => {
                        outcomes.push(Outcome::Replayed(T::decode(result)?));
                        continue;
                    }
                    Claim::InProgress { retry_after } => {
                        outcomes.push(Outcome::InProgress { retry_after });
                        continue;
                    }
                    Claim::Mismatch { stored } => {
                        outcomes.push(Outcome::Mismatch {
                            stored,
                            received: req.fingerprint,
                        });
                        continue;
                    }
                    Claim::Exhausted { attempts, reason } => {
                        outcomes.push(Outcome::Exhausted {
                            attempts,
                            reason,
                            error: None,
                        });
                        continue;
                    }
                    _ => {
                        return Err(StoreError::new(
                            StoreErrorKind::Backend,
                            "unknown claim outcome",
                        )
                        .into());
                    }
                };
                if careful && !savepoint_fresh {
                    run(tx, SAVEPOINT).await.map_err(|e| err("savepoint", e))?;
                }
                savepoint_fresh = false;
                dirty[s] = true;
                let result = handler(i, &mut *tx).await;
                let encoded = match &result {
                    Ok(value) => match value.encode() {
                        Ok(bytes) => Some(bytes),
                        Err(e) => {
                            run(tx, ROLLBACK_TO).await.map_err(|e| err("rollback", e))?;
                            return Err(e.into());
                        }
                    },
                    Err(_) => None,
                };
                let fits = encoded.as_ref().is_some_and(|b| b.len() <= limit);
                if fits {
                    wrote_before = true;
                } else {
                    run(tx, ROLLBACK_TO).await.map_err(|e| err("rollback", e))?;
                    // Earlier handlers' writes went with it: run them again, carefully. If
                    // there were none, the savepoint was this handler's own.
                    let restart = !careful && wrote_before;
                    careful = true;
                    if restart {
                        continue 'run;
                    }
                    savepoint_fresh = true;
                }
                let retention = clamp(config.retention);
                let outcome = match (result, encoded) {
                    (Ok(value), Some(bytes)) if fits => {
                        let c = Completion::new(req.key.clone(), lease.token, bytes)
                            .retention(retention);
                        let _ = transition::complete(slot, &c, now);
                        Outcome::Executed(value)
                    }
                    (Ok(_), bytes) => {
                        let reason = format!(
                            "the handler's result is {} bytes, over the store's limit of \
                             {limit}; its writes were rolled back and the key is failed",
                            bytes.map_or(0, |b| b.len())
                        );
                        let _ = transition::fail(slot, lease.token, &reason, retention, now);
                        Outcome::Exhausted {
                            attempts: lease.attempt,
                            reason,
                            error: None,
                        }
                    }
                    (Err(error), _)
                        if config
                            .max_attempts
                            .is_some_and(|max| lease.attempt >= max.get()) =>
                    {
                        let reason = format!("attempt {} failed: {error}", lease.attempt);
                        let _ = transition::fail(slot, lease.token, &reason, retention, now);
                        Outcome::Exhausted {
                            attempts: lease.attempt,
                            reason,
                            error: Some(error),
                        }
                    }
                    (Err(error), _) => {
                        let _ = transition::release(slot, lease.token, retention, now);
                        Outcome::Released {
                            error,
                            attempt: lease.attempt,
                            retry_after: config.retry_backoff.delay(lease.attempt),
                        }
                    }
                };
                outcomes.push(outcome);
            }
            break (outcomes, slots, dirty);
        };

        // Write round trip: the final record of every key that changed. Every row exists and
        // is locked by this transaction, so the upsert always updates.
        let changed = slots
            .iter()
            .zip(&dirty)
            .filter(|(_, d)| **d)
            .filter_map(|(rec, _)| rec.as_ref());
        for sql in sql::upserts(table, changed) {
            run(tx, &sql).await.map_err(|e| err("write records", e))?;
        }
        Ok(outcomes)
    }

    /// Transactional mode on a transaction the store opens on its own pool: runs `handler` as
    /// [`run_in_transaction`](Self::run_in_transaction) does and commits. Returns once the
    /// handler's writes and the record are committed together; on an error, or if the handler
    /// panics, the transaction is rolled back (neither effect nor record).
    ///
    /// ```no_run
    /// # async fn demo(store: idem_mysql::MysqlStore) -> Result<(), Box<dyn std::error::Error>> {
    /// use idem::{Config, Namespace};
    /// use mysql_async::prelude::Queryable;
    ///
    /// let key = Namespace::new("ledger")?.key("transfer-1")?;
    /// let outcome = store
    ///     .run_transactional(key, b"payload", Config::default(), |tx| {
    ///         Box::pin(async move {
    ///             tx.query_drop("UPDATE accounts SET balance = balance - 10 WHERE id = 1").await
    ///         })
    ///     })
    ///     .await?;
    /// # let _ = outcome; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`run_in_transaction`](Self::run_in_transaction); a [`StoreError`] if the commit
    /// fails (then neither the handler's writes nor the record exist, unless the commit's answer
    /// was lost: [`StoreErrorKind::Unavailable`] says only that the outcome is unknown).
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
        F: for<'a> FnOnce(&'a mut Transaction<'static>) -> TxFuture<'a, T, E>,
    {
        let fingerprint = Fingerprint::of(payload.as_ref());
        let mut tx = self.begin().await?;
        let run = self.run_in_transaction(&mut tx, &key, fingerprint, &config, handler);
        let run = AssertUnwindSafe(run).catch_unwind().await;
        self.finish(tx, run).await
    }

    /// The batch form of [`run_transactional`](Self::run_transactional): one transaction, one
    /// commit, for all of `items`; see
    /// [`run_batch_in_transaction`](Self::run_batch_in_transaction).
    ///
    /// # Errors
    /// As [`run_transactional`](Self::run_transactional), for the whole batch.
    pub async fn run_batch_transactional<T, E, F>(
        &self,
        items: &[(Key, Fingerprint)],
        config: &Config,
        handler: F,
    ) -> Result<Vec<Outcome<T, E>>, Error>
    where
        T: Stored + Send + 'static,
        E: fmt::Display + Send + 'static,
        F: for<'a> FnMut(usize, &'a mut Transaction<'static>) -> TxFuture<'a, T, E>,
    {
        let mut tx = self.begin().await?;
        let run = self.run_batch_in_transaction(&mut tx, items, config, handler);
        let run = AssertUnwindSafe(run).catch_unwind().await;
        self.finish(tx, run).await
    }

    async fn begin(&self) -> Result<Transaction<'static>, StoreError> {
        self.timed("begin", async {
            self.inner
                .pool
                .start_transaction(TxOpts::default())
                .await
                .map_err(|e| error::store_error("begin", self.table(), e))
        })
        .await
    }

    /// Commits after a successful run, rolls back after an error or a panic.
    async fn finish<R>(
        &self,
        tx: Transaction<'static>,
        run: std::thread::Result<Result<R, Error>>,
    ) -> Result<R, Error> {
        match run {
            Ok(Ok(out)) => {
                tx.commit()
                    .await
                    .map_err(|e| error::store_error("commit", self.table(), e))?;
                Ok(out)
            }
            Ok(Err(e)) => {
                let _ = tx.rollback().await;
                Err(e)
            }
            Err(panic) => {
                let _ = tx.rollback().await;
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_owned());
                Err(StoreError::new(
                    StoreErrorKind::Backend,
                    format!(
                        "the transactional handler panicked ({what}); its transaction was \
                         rolled back"
                    ),
                )
                .into())
            }
        }
    }
}

/// The error of a handler that can be called once, as the batch form needs an error type.
struct Once<E>(Option<E>);

impl<E: fmt::Display> fmt::Display for Once<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(e) => e.fmt(f),
            None => f.write_str("the handler was called twice"),
        }
    }
}

/// Runs statements that return nothing idem needs.
async fn run(tx: &mut Transaction<'_>, sql: &str) -> Result<(), mysql_async::Error> {
    script(tx, sql).await.ok().map(drop)
}
