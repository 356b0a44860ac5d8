//! Transactional mode (docs/design.md, section 5): the record is written in the same MySQL
//! transaction as the handler's own writes. Commit = effect + record; a crash or a rollback
//! before the commit leaves neither, and the redelivery runs the handler as if for the first
//! time. No window.
//!
//! One round trip claims: `INSERT … ON DUPLICATE KEY UPDATE state = state` of a fresh
//! in-progress record, which inserts a new key or takes an exclusive lock on an existing one,
//! then `SELECT … FOR UPDATE` to read what is there, then a savepoint. The decision is
//! [`idem::transition::claim`] on that row, and every rule above it is [`idem::policy`]'s: what a
//! claim means ([`policy::on_claim`]), what a handler's result becomes
//! ([`policy::on_result`] in [`Mode::Transactional`]) and what the caller is told
//! ([`Verdict::recorded`]). The handler runs inside the savepoint; the final record (completed,
//! released or failed) is one write round trip at the end. No in-progress state is
//! ever committed, and the row stays locked until the caller commits or rolls back, so a
//! concurrent duplicate waits on the lock and then sees the completed record (or, if this
//! transaction rolled back, claims the key itself).
//!
//! Whether a row was inserted by this call is told by its token (a fresh random one per call),
//! not by "rows affected", whose meaning depends on the caller's connection flags.

use std::fmt::{self, Write as _};
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt as _;
use idem::policy::{self, Mode, Once, Step, Verdict};
use idem::{
    Acquisition, Claim, ClaimRequest, Completion, Config, Error, Fingerprint, Key, Lease, Outcome,
    Record, StoreError, StoreErrorKind, Stored, Transactional, TxFuture, transition,
};
use mysql_async::{Transaction, TxOpts};

use crate::error::{code, server_code, store_error};
use crate::exec::{self, script};
use crate::sql::{self, COLUMNS, NOW_MS, NOW_VAR, clamp};
use crate::{MysqlStore, error};

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
        let outcome = self
            .run_batch_in_transaction(tx, &items, config, |tx, _| -> TxFuture<'_, T, Once<E>> {
                // A batch of one calls its handler at most once.
                let Some(handler) = handler.take() else {
                    return Box::pin(std::future::ready(Err(Once(None))));
                };
                let run = handler(tx);
                Box::pin(async move { run.await.map_err(|e| Once(Some(e))) })
            })
            .await?
            .pop()
            .ok_or_else(|| {
                Error::from(StoreError::new(
                    StoreErrorKind::Backend,
                    "internal error: a transactional run gave no outcome",
                ))
            })?;
        policy::single(outcome)
    }

    /// Runs `handler(tx, i)` for each delivery `items[i]` whose claim is acquired, in order, in
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
    /// that a failure undoes only its own writes (the item that failed is not run again: its
    /// verdict stands). A handler may therefore be called twice for one delivery whose writes
    /// were undone with another's; as always in transactional mode, only its writes in the
    /// transaction count, and those commit once.
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
        F: for<'a> FnMut(&'a mut Transaction<'t>, usize) -> TxFuture<'a, T, E>,
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
        F: for<'a> FnMut(&'a mut Transaction<'t>, usize) -> TxFuture<'a, T, E>,
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
        // handler, so a failure undoes only its own writes. The item that failed is not run
        // again: its verdict is carried over to the careful pass.
        let mut careful = false;
        let mut carried: Option<(usize, Verdict<T, E>)> = None;
        let retention = clamp(config.retention);
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
                let lease = match policy::on_claim(claim, req.fingerprint)? {
                    Step::Run(lease) => lease,
                    Step::Done(outcome) => {
                        outcomes.push(outcome);
                        continue;
                    }
                };
                dirty[s] = true;
                let verdict = match carried.take_if(|(j, _)| *j == i) {
                    Some((_, verdict)) => verdict,
                    None => {
                        if careful && !savepoint_fresh {
                            run(tx, SAVEPOINT).await.map_err(|e| err("savepoint", e))?;
                        }
                        savepoint_fresh = false;
                        let result = handler(&mut *tx, i).await;
                        let verdict = match policy::on_result(
                            result,
                            lease.attempt,
                            config,
                            limit,
                            Mode::Transactional,
                        ) {
                            Ok(verdict) => verdict,
                            Err(e) => {
                                run(tx, ROLLBACK_TO).await.map_err(|e| err("rollback", e))?;
                                return Err(e.into());
                            }
                        };
                        if verdict.keeps_writes() {
                            wrote_before = true;
                        } else {
                            run(tx, ROLLBACK_TO).await.map_err(|e| err("rollback", e))?;
                            // Earlier handlers' writes went with it: run them again, carefully.
                            // If there were none, the savepoint was this handler's own.
                            let restart = !careful && wrote_before;
                            careful = true;
                            if restart {
                                carried = Some((i, verdict));
                                continue 'run;
                            }
                            savepoint_fresh = true;
                        }
                        verdict
                    }
                };
                let (written, _) = match &verdict {
                    Verdict::Complete { result, .. } => {
                        let c = Completion::new(req.key.clone(), lease.token, result.clone())
                            .retention(retention);
                        transition::complete(slot, &c, now)
                    }
                    Verdict::Release { .. } => {
                        transition::release(slot, lease.token, retention, now)
                    }
                    Verdict::Fail { reason, .. } => {
                        transition::fail(slot, lease.token, reason, retention, now)
                    }
                };
                outcomes.push(verdict.recorded(lease.attempt, written));
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

/// Transactional mode on a transaction the store opens on its own pool: each call begins a
/// transaction, runs the batch as
/// [`run_batch_in_transaction`](MysqlStore::run_batch_in_transaction) does, and commits. It
/// returns once the handlers' writes and the records are committed together; on an error, or if
/// a handler panics, the transaction is rolled back (neither effects nor records).
///
/// ```no_run
/// # async fn demo(store: idem_mysql::MysqlStore) -> Result<(), Box<dyn std::error::Error>> {
/// use idem::{Config, Fingerprint, Namespace, Transactional};
/// use mysql_async::prelude::Queryable;
///
/// let key = Namespace::new("ledger")?.key("transfer-1")?;
/// let outcome = store
///     .run_transactional(&key, Fingerprint::of(b"10"), &Config::default(), |tx| {
///         Box::pin(async move {
///             tx.query_drop("UPDATE accounts SET balance = balance - 10 WHERE id = 1").await
///         })
///     })
///     .await?;
/// println!("{}", outcome.kind());
/// # Ok(()) }
/// ```
///
/// Errors are those of [`run_batch_in_transaction`](MysqlStore::run_batch_in_transaction), and
/// a [`StoreError`] if the commit fails (then neither the handlers' writes nor the records
/// exist, unless the commit's answer was lost: [`StoreErrorKind::Unavailable`] says only that
/// the outcome is unknown).
impl Transactional for MysqlStore {
    type Tx = Transaction<'static>;

    async fn run_batch_transactional<T, E, H>(
        &self,
        items: &[(Key, Fingerprint)],
        config: &Config,
        handler: H,
    ) -> Result<Vec<Outcome<T, E>>, Error>
    where
        T: Stored + Send + 'static,
        E: fmt::Display + Send + 'static,
        H: for<'a> Fn(&'a mut Self::Tx, usize) -> TxFuture<'a, T, E> + Send + Sync + 'static,
    {
        let mut tx = self.begin().await?;
        let run = self.run_batch_in_transaction(&mut tx, items, config, handler);
        let run = AssertUnwindSafe(run).catch_unwind().await;
        self.finish(tx, run).await
    }
}

/// Runs statements that return nothing idem needs.
async fn run(tx: &mut Transaction<'_>, sql: &str) -> Result<(), mysql_async::Error> {
    script(tx, sql).await.ok().map(drop)
}
