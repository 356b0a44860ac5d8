//! # idem-mysql: the MySQL / MariaDB store
//!
//! [`MysqlStore`] keeps idem records in a MySQL or MariaDB (InnoDB) table, through
//! `mysql_async`. Many consumers on many hosts share one table; leases and retention are
//! measured on the **server's clock**, so consumers with skewed clocks agree on who holds a
//! key.
//!
//! Two modes (docs/design.md, section 5):
//! - **store mode**: [`MysqlStore`] implements [`idem::Store`]; use it with [`idem::Executor`]
//!   when the handler's effects live elsewhere;
//! - **transactional mode**: [`MysqlStore`] implements [`idem::Transactional`]
//!   (`run_transactional` / `run_batch_transactional`, on a transaction the store opens), and
//!   [`MysqlStore::run_in_transaction`] / [`MysqlStore::run_batch_in_transaction`] run on
//!   yours: the record is written in the same transaction as the handler's own writes, commit =
//!   effect + record, crash = neither. See `examples/mysql_tx.rs`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use idem::{Executor, Namespace};
//! use idem_mysql::MysqlStore;
//!
//! let store = MysqlStore::builder("mysql://idem@127.0.0.1:3306/app").build()?;
//! store.migrate().await?; // creates the table: once, at deployment
//! let exec = Executor::new(store);
//! let key = Namespace::new("emails")?.key("msg-1")?;
//! let outcome = exec
//!     .run(key, b"payload", |_attempt| async { Ok::<_, std::io::Error>(()) })
//!     .await?;
//! println!("{}", outcome.kind());
//! # Ok(()) }
//! ```
//!
//! ## How it works
//!
//! - One table (`idem_records` by default), primary key `(namespace, id)` as `VARBINARY`, so
//!   keys compare byte for byte; an index on `expires_at` for purges. [`MysqlStore::migrate`]
//!   creates it; nothing is created on connect, and a missing table is a
//!   [`StoreErrorKind::Schema`] error that says so.
//! - Time is `UTC_TIMESTAMP(3)` in milliseconds: the server's clock, independent of session
//!   time zones, fixed within a statement.
//! - A claim of a new key is one round trip and one commit (an `INSERT IGNORE` that inserts
//!   it); a duplicate of a completed key is one round trip too (nothing is inserted, and the
//!   row read in the same round trip answers). Claims that change an existing record lock it
//!   (`SELECT … FOR UPDATE`), decide with [`idem::transition`] and write it back, in one short
//!   transaction, where an absent key is a plain `INSERT` and error 1062 means another claimer
//!   won the race (the transaction is tried again). A batch of claims or completions costs the
//!   same round trips as one.
//! - Completions, releases, extends and failures are single fenced `UPDATE`s
//!   (`… WHERE state = 1 AND token = ?`).
//! - The store's connections use `READ COMMITTED` (no gap locks, so concurrent claims of
//!   neighbouring keys do not deadlock) and set `CLIENT_FOUND_ROWS`, so "rows affected" by a
//!   fenced update means "rows matched by the fence".
//!
//! ## Failures
//!
//! Every error is a [`StoreError`]: `Unavailable` when the server cannot be reached or the
//! connection drops, `Timeout` when an operation outlives [`MysqlStoreBuilder::timeout`],
//! `Busy` for lock-wait timeouts and deadlocks that persist, `Schema`, `Config`, `Corrupt`. The
//! pool replaces broken connections by itself: once the server is back, operations succeed
//! again without any action.

mod error;
mod exec;
mod ops;
mod schema;
mod sql;
mod tx;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use idem::{
    Claim, ClaimRequest, Completion, DEFAULT_MAX_RESULT_BYTES, Inspect, Key, Record, State, Store,
    StoreError, StoreErrorKind, Timestamp, Token, WriteOutcome, check_result_size,
};
use mysql_async::{Conn, Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts};

use crate::ops::Ctx;
use crate::sql::Table;

pub use crate::schema::SCHEMA_VERSION;

/// The default table name.
pub const DEFAULT_TABLE: &str = "idem_records";

/// The largest result the schema can hold (`MEDIUMBLOB`).
pub const MAX_RESULT_LIMIT: usize = (1 << 24) - 1;

/// Builds a [`MysqlStore`].
#[derive(Clone)]
pub struct MysqlStoreBuilder {
    url: String,
    pool_size: usize,
    table: String,
    max_result_bytes: usize,
    timeout: Duration,
    lock_wait_timeout: Duration,
}

impl fmt::Debug for MysqlStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the URL: it may hold a password.
        f.debug_struct("MysqlStoreBuilder")
            .field("pool_size", &self.pool_size)
            .field("table", &self.table)
            .field("max_result_bytes", &self.max_result_bytes)
            .field("timeout", &self.timeout)
            .field("lock_wait_timeout", &self.lock_wait_timeout)
            .finish_non_exhaustive()
    }
}

impl MysqlStoreBuilder {
    /// Most connections the pool opens (default 16).
    #[must_use]
    pub fn pool_size(mut self, n: usize) -> Self {
        self.pool_size = n.max(1);
        self
    }

    /// The records table (default `idem_records`): 1 to 64 of `A-Z a-z 0-9 _`.
    #[must_use]
    pub fn table(mut self, name: impl Into<String>) -> Self {
        self.table = name.into();
        self
    }

    /// Largest result `complete` accepts (default 64 KiB, at most [`MAX_RESULT_LIMIT`]). The
    /// server's `max_allowed_packet` must exceed twice this (results travel as hex text).
    #[must_use]
    pub fn max_result_bytes(mut self, limit: usize) -> Self {
        self.max_result_bytes = limit;
        self
    }

    /// How long one store operation may take, connecting included, before it fails with
    /// [`StoreErrorKind::Timeout`] (default 10 s).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long a statement waits for a row lock held by another transaction before it fails
    /// with [`StoreErrorKind::Busy`] (`innodb_lock_wait_timeout`, whole seconds, default 5 s).
    #[must_use]
    pub fn lock_wait_timeout(mut self, timeout: Duration) -> Self {
        self.lock_wait_timeout = timeout;
        self
    }

    /// Builds the store. Connections are opened on first use; nothing is created on the server
    /// (see [`MysqlStore::migrate`]).
    ///
    /// # Errors
    /// [`StoreErrorKind::Config`] for a URL `mysql_async` does not accept, an invalid table
    /// name, or a result limit over [`MAX_RESULT_LIMIT`].
    pub fn build(self) -> Result<MysqlStore, StoreError> {
        let table = Table::new(&self.table)?;
        if self.max_result_bytes > MAX_RESULT_LIMIT {
            return Err(StoreError::new(
                StoreErrorKind::Config,
                format!(
                    "max_result_bytes {} is over the schema's limit of {MAX_RESULT_LIMIT} bytes",
                    self.max_result_bytes
                ),
            ));
        }
        // The message leaves the URL out: it may hold a password.
        let opts = Opts::from_url(&self.url).map_err(|e| {
            StoreError::new(StoreErrorKind::Config, format!("invalid MySQL URL: {e}"))
                .with_source(e)
        })?;
        let endpoint = format!(
            "{}:{}/{}",
            opts.ip_or_hostname(),
            opts.tcp_port(),
            opts.db_name().unwrap_or("")
        );
        let constraints = PoolConstraints::new(0, self.pool_size).ok_or_else(|| {
            StoreError::new(StoreErrorKind::Config, "pool size must be at least 1")
        })?;
        let lock_wait = self.lock_wait_timeout.as_secs().max(1);
        let opts = OptsBuilder::from_opts(opts)
            // "Affected" then means "matched": what a fenced UPDATE needs to know.
            .client_found_rows(true)
            .pool_opts(
                PoolOpts::default()
                    .with_constraints(constraints)
                    // Without a TTL the pool keeps only `min` (here 0) idle connections and
                    // closes every other one on return: one new connection per operation.
                    .with_inactive_connection_ttl(Duration::from_secs(60))
                    // Resetting costs a round trip and the statement cache on every return;
                    // idem leaves no session state behind, and a connection dropped mid-
                    // transaction is reset explicitly (see `exec::rollback`).
                    .with_reset_connection(false),
            )
            .setup(vec![
                "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED".to_owned(),
                format!("SET SESSION innodb_lock_wait_timeout = {lock_wait}"),
            ]);
        Ok(MysqlStore {
            inner: Arc::new(Inner {
                pool: Pool::new(opts),
                table,
                max_result_bytes: self.max_result_bytes,
                timeout: self.timeout,
                endpoint,
            }),
        })
    }

    /// Builds the store and checks that its table exists with this version's schema.
    ///
    /// # Errors
    /// As [`build`](Self::build), and as [`MysqlStore::check_schema`].
    pub async fn connect(self) -> Result<MysqlStore, StoreError> {
        let store = self.build()?;
        store.check_schema().await?;
        Ok(store)
    }
}

/// The MySQL / MariaDB [`Store`]. Clones share one connection pool.
#[derive(Clone)]
pub struct MysqlStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    table: Table,
    max_result_bytes: usize,
    timeout: Duration,
    /// `host:port/database`, for logs (never the credentials).
    endpoint: String,
}

impl fmt::Debug for MysqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MysqlStore")
            .field("endpoint", &self.inner.endpoint)
            .field("table", &self.inner.table.name())
            .finish_non_exhaustive()
    }
}

impl MysqlStore {
    /// A builder for the server at `url`, e.g. `mysql://user:password@host:3306/database`
    /// (any `mysql_async` URL parameter is accepted).
    pub fn builder(url: impl Into<String>) -> MysqlStoreBuilder {
        MysqlStoreBuilder {
            url: url.into(),
            pool_size: 16,
            table: DEFAULT_TABLE.to_owned(),
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            timeout: Duration::from_secs(10),
            lock_wait_timeout: Duration::from_secs(5),
        }
    }

    /// The records table.
    pub fn table(&self) -> &str {
        self.inner.table.name()
    }

    /// The connection pool, for the caller's own transactions in transactional mode.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Creates the records table (and the `idem_schema` version table) if missing, or upgrades
    /// an older schema. Safe to call concurrently and repeatedly. Needs the `CREATE` privilege.
    ///
    /// # Errors
    /// A [`StoreError`] when the server fails or refuses; [`StoreErrorKind::Schema`] if the
    /// table has a schema newer than this version of idem.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.timed("migrate", async {
            let mut conn = self.conn().await?;
            schema::migrate(&mut conn, &self.inner.table).await
        })
        .await
    }

    /// Checks that the records table exists with the schema this version of idem uses.
    ///
    /// # Errors
    /// [`StoreErrorKind::Schema`] naming the table and how to create or upgrade it; a
    /// [`StoreError`] when the server cannot answer.
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        self.timed("check schema", async {
            let mut conn = self.conn().await?;
            schema::check(&mut conn, &self.inner.table).await
        })
        .await
    }

    /// Closes the pool's connections (operations afterwards fail).
    ///
    /// # Errors
    /// A [`StoreError`] when a connection could not be closed cleanly.
    pub async fn disconnect(&self) -> Result<(), StoreError> {
        self.inner
            .pool
            .clone()
            .disconnect()
            .await
            .map_err(|e| error::store_error("disconnect", self.table(), e))
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            table: &self.inner.table,
        }
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        let mut conn = self
            .inner
            .pool
            .get_conn()
            .await
            .map_err(|e| error::store_error("connect", self.table(), e))?;
        // A connection whose last user was dropped mid-transaction was reset on return; from
        // here on it needs no reset unless this operation opens a transaction.
        conn.reset_connection(false);
        Ok(conn)
    }

    /// Runs `work` within the store's timeout.
    async fn timed<T>(
        &self,
        what: &'static str,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.inner.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::new(
                StoreErrorKind::Timeout,
                format!(
                    "mysql {what}: no answer from {} within {:?}",
                    self.inner.endpoint, self.inner.timeout
                ),
            )),
        }
    }
}

impl Store for MysqlStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        self.timed("claim", async {
            let mut conn = self.conn().await?;
            let mut claims =
                ops::claim_many(&self.ctx(), &mut conn, std::slice::from_ref(req)).await?;
            claims
                .pop()
                .ok_or_else(|| StoreError::new(StoreErrorKind::Backend, "claim gave no answer"))
        })
        .await
    }

    async fn claim_many(&self, reqs: &[ClaimRequest]) -> Result<Vec<Claim>, StoreError> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        self.timed("claim", async {
            let mut conn = self.conn().await?;
            ops::claim_many(&self.ctx(), &mut conn, reqs).await
        })
        .await
    }

    async fn complete(&self, c: &Completion) -> Result<WriteOutcome, StoreError> {
        self.complete_many(std::slice::from_ref(c))
            .await?
            .pop()
            .ok_or_else(|| StoreError::new(StoreErrorKind::Backend, "complete gave no answer"))
    }

    async fn complete_many(&self, cs: &[Completion]) -> Result<Vec<WriteOutcome>, StoreError> {
        for c in cs {
            check_result_size(&c.result, self.inner.max_result_bytes)?;
        }
        if cs.is_empty() {
            return Ok(Vec::new());
        }
        self.timed("complete", async {
            let mut conn = self.conn().await?;
            ops::complete_many(&self.ctx(), &mut conn, cs).await
        })
        .await
    }

    async fn release(
        &self,
        key: &Key,
        token: Token,
        retention: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        self.timed("release", async {
            let mut conn = self.conn().await?;
            ops::release(&self.ctx(), &mut conn, key, token, retention).await
        })
        .await
    }

    async fn extend(
        &self,
        key: &Key,
        token: Token,
        lease: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        self.timed("extend", async {
            let mut conn = self.conn().await?;
            ops::extend(&self.ctx(), &mut conn, key, token, lease).await
        })
        .await
    }

    async fn fail(
        &self,
        key: &Key,
        token: Token,
        reason: &str,
        retention: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        self.timed("fail", async {
            let mut conn = self.conn().await?;
            ops::fail(&self.ctx(), &mut conn, key, token, reason, retention).await
        })
        .await
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        self.timed("get", async {
            let mut conn = self.conn().await?;
            ops::get(&self.ctx(), &mut conn, key).await
        })
        .await
    }

    async fn evict(&self, key: &Key) -> Result<bool, StoreError> {
        self.timed("evict", async {
            let mut conn = self.conn().await?;
            ops::evict(&self.ctx(), &mut conn, key).await
        })
        .await
    }

    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        self.timed("purge", async {
            let mut conn = self.conn().await?;
            ops::purge(&self.ctx(), &mut conn, limit).await
        })
        .await
    }

    fn max_result_bytes(&self) -> usize {
        self.inner.max_result_bytes
    }
}

impl Inspect for MysqlStore {
    async fn now(&self) -> Result<Timestamp, StoreError> {
        self.timed("clock", async {
            let mut conn = self.conn().await?;
            ops::now(&self.ctx(), &mut conn).await
        })
        .await
    }

    async fn count_by_state(&self) -> Result<Vec<(State, u64)>, StoreError> {
        self.timed("count", async {
            let mut conn = self.conn().await?;
            ops::count_by_state(&self.ctx(), &mut conn).await
        })
        .await
    }

    async fn in_progress(&self, limit: usize) -> Result<Vec<Record>, StoreError> {
        self.timed("list", async {
            let mut conn = self.conn().await?;
            ops::in_progress(&self.ctx(), &mut conn, limit).await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configuration_is_refused_before_any_connection() {
        let err = MysqlStore::builder("postgres://u:topsecret@h/db")
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Config);
        assert!(!err.to_string().contains("topsecret"), "{err}");
        let err = MysqlStore::builder("mysql://u:pw@h/db")
            .table("bad name")
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Config);
        let err = MysqlStore::builder("mysql://u:pw@h/db")
            .max_result_bytes(MAX_RESULT_LIMIT + 1)
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Config);
        let store = MysqlStore::builder("mysql://u:topsecret@h:3306/db")
            .build()
            .unwrap();
        let shown = format!(
            "{store:?} {:?}",
            MysqlStore::builder("mysql://u:topsecret@h/db")
        );
        assert!(!shown.contains("topsecret"), "{shown}");
    }
}
