//! # idem-postgres: the PostgreSQL store
//!
//! [`PostgresStore`] keeps idem records in a PostgreSQL table through a pool of tokio-postgres
//! connections (deadpool). Every transition is **one SQL statement** on the server's clock
//! (`now()`), so consumers on many hosts agree on leases whatever their own clocks say, and
//! batches (`claim_many`, `complete_many`) are one statement for the whole batch. (A statement
//! runs again, on a fresh snapshot, for the rare key that another session changed between the
//! statement's snapshot and its write; see the `sql` module.)
//!
//! Two modes (docs/design.md, section 5):
//! - **store mode**: [`PostgresStore`] implements [`idem::Store`] and [`idem::Inspect`]; use it
//!   with [`idem::Executor`] when the handler's effects live elsewhere;
//! - **transactional mode**: the record is written in the same transaction as the handler's
//!   writes: commit = effect + record, crash = neither. [`PostgresStore`] implements
//!   [`idem::Transactional`] (`run_transactional`, `run_batch_transactional`): a transaction of
//!   idem's own on a pooled connection, whose handlers write through a [`TxClient`]; the
//!   fastest path (two round trips per batch). [`run_in_transaction`] (and
//!   [`run_batch_in_transaction`]) do it in the **caller's own transaction**; with the `sqlx`
//!   feature, [`sqlx::run_in_transaction`] does it inside a `sqlx::Transaction<'_, Postgres>`.
//!   Every handler has the shape `(tx)` or, in a batch, `(tx, index)`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use idem::{Executor, Namespace};
//! use idem_postgres::PostgresStore;
//!
//! let builder = PostgresStore::builder("postgres://app@db.internal/app").pool_size(16);
//! builder.migrate().await?; // once, at deploy time: connecting never creates tables
//! let exec = Executor::new(builder.connect().await?);
//! let key = Namespace::new("emails")?.key("msg-1")?;
//! let outcome = exec
//!     .run(key, b"payload", |_attempt| async { Ok::<_, std::io::Error>(()) })
//!     .await?;
//! println!("{}", outcome.kind());
//! # Ok(()) }
//! ```
//!
//! ## Schema
//!
//! One table (default `public.idem_records`, see [`PostgresStoreBuilder::schema`] and
//! [`PostgresStoreBuilder::table`]) with primary key `(namespace, id)` and an index on
//! `expires_at`, created and upgraded by [`PostgresStoreBuilder::migrate`] from the versioned
//! files in `migrations/postgres/`. Connecting checks the version and refuses a missing schema
//! with [`StoreErrorKind::Schema`], saying how to create it.
//!
//! ## Failures
//!
//! Every error is a [`StoreError`] whose kind comes from the SQLSTATE: connection failures are
//! `Unavailable`, serialization failures and deadlocks `Busy`, a cancelled statement `Timeout`,
//! a missing table `Schema`. An operation that gets no answer within
//! [`PostgresStoreBuilder::op_timeout`] is a `Timeout` and its connection is discarded. Broken
//! connections leave the pool by themselves, so when the server comes back the same store works
//! again without a restart of the application.
//!
//! ## Retention and very large tables
//!
//! [`Store::purge_expired`] deletes the oldest expired rows, at most `limit` per call, through
//! the `expires_at` index, skipping rows that a claim is rewriting: run it periodically (every
//! few seconds with a limit of a few thousand keeps each call short). Deleted rows are reclaimed
//! by autovacuum; on a busy table lower `autovacuum_vacuum_scale_factor` for it.
//!
//! PostgreSQL cannot partition this table by time directly: a unique key on a partitioned table
//! must include the partition column, and `(namespace, id, created_at)` would let one key exist
//! twice. For tables of billions of rows, partition by a time that is a **function of the key**:
//! with producer ids that embed their creation time (UUIDv7, snowflake ids), add a generated
//! column `bucket = id_time(id)` truncated to a day, make the primary key
//! `(namespace, id, bucket)` (still unique per key, since the bucket is a function of the id),
//! `PARTITION BY RANGE (bucket)` with one partition per day, and drop a partition once every
//! key in it is past retention plus the broker's redelivery horizon: dropping a partition costs
//! nothing, deleting rows costs WAL and vacuum. A key reprocessed after its retention keeps its
//! bucket, so "past retention" must be judged by the newest message that can carry an id of
//! that day, not by the rows' `expires_at`. idem's migrations do not create this layout: create
//! the table with the same columns yourself, record it in `idem_schema_version` (its name and
//! [`SCHEMA_VERSION`]) and point [`PostgresStoreBuilder::table`] at it.
//! Short of that, hash partitioning on `(namespace, id)` keeps each index and vacuum run small
//! while purges stay as they are.

mod error;
mod exec;
mod migrate;
mod ops;
mod sql;
mod tx;

#[cfg(feature = "sqlx")]
pub mod sqlx;

use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use idem::{
    Claim, ClaimRequest, Completion, DEFAULT_MAX_RESULT_BYTES, Inspect, Key, Namespace, Record,
    State, Store, StoreError, StoreErrorKind, Timestamp, Token, WriteOutcome, check_result_size,
};
use tokio_postgres::NoTls;

use crate::error::{op_timeout, pg_error, pool_error};
use crate::exec::Tp;
pub use crate::migrate::SCHEMA_VERSION;
use crate::ops::Fenced;
pub use crate::sql::{DEFAULT_SCHEMA, DEFAULT_TABLE, Table};
pub use crate::tx::{PgTransaction, TxClient, run_batch_in_transaction, run_in_transaction};

/// Builds a [`PostgresStore`].
#[derive(Clone)]
pub struct PostgresStoreBuilder {
    url: String,
    pool_size: usize,
    schema: String,
    table: String,
    max_result_bytes: usize,
    connect_timeout: Duration,
    op_timeout: Duration,
}

impl fmt::Debug for PostgresStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password: never print it.
        f.debug_struct("PostgresStoreBuilder")
            .field("pool_size", &self.pool_size)
            .field("schema", &self.schema)
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl PostgresStoreBuilder {
    /// Most connections in the pool (default 16). Each concurrent operation holds one for one
    /// statement; transactional mode holds one for the caller's transaction.
    #[must_use]
    pub fn pool_size(mut self, n: usize) -> Self {
        self.pool_size = n.max(1);
        self
    }

    /// The schema of the records table (default `public`).
    #[must_use]
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The records table (default `idem_records`).
    #[must_use]
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Largest result `complete` accepts (default 64 KiB).
    #[must_use]
    pub fn max_result_bytes(mut self, limit: usize) -> Self {
        self.max_result_bytes = limit;
        self
    }

    /// How long to wait for a new connection, or for a free one from the pool (default 5 s).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one operation may take before it fails with
    /// [`Timeout`](idem::StoreErrorKind::Timeout) and its connection is dropped (default 10 s).
    /// It bounds how long a consumer hangs on a server that stopped answering.
    #[must_use]
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    fn pg_config(&self) -> Result<tokio_postgres::Config, StoreError> {
        let mut config = tokio_postgres::Config::from_str(&self.url).map_err(|e| {
            // The parser's message names the bad part; the URL itself is not repeated.
            StoreError::new(
                StoreErrorKind::Config,
                format!("invalid PostgreSQL URL: {e}"),
            )
        })?;
        config.connect_timeout(self.connect_timeout);
        if config.get_application_name().is_none() {
            config.application_name("idem");
        }
        Ok(config)
    }

    fn table_def(&self) -> Result<Table, StoreError> {
        Table::new(&self.schema, &self.table)
    }

    /// Creates the schema, or upgrades it to this version of idem. Safe to run from several
    /// instances at once and to run again. Connecting never does this by itself.
    ///
    /// # Errors
    /// [`StoreErrorKind::Config`] for a bad URL or table name, a [`StoreError`] from the server
    /// (`Unavailable` if it cannot be reached), or `Schema` if the table was written by a newer
    /// idem.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let table = self.table_def()?;
        let config = self.pg_config()?;
        let (mut client, conn) = config
            .connect(NoTls)
            .await
            .map_err(|e| pg_error(&format!("connect to {}", describe(&config)), e))?;
        let task = tokio::spawn(conn);
        let out = migrate::migrate(&mut client, &table).await;
        drop(client);
        let _ = task.await;
        out.map(|(before, after)| {
            if before != after {
                tracing::info!(
                    table = table.qualified(),
                    before,
                    after,
                    "idem schema migrated"
                );
            }
        })
    }

    /// Builds the pool and checks the schema (one connection, one query).
    ///
    /// # Errors
    /// [`StoreErrorKind::Config`] for a bad URL or table name; `Unavailable` if the server cannot
    /// be reached; [`StoreErrorKind::Schema`] if the table is missing or of another version (the
    /// message says how to create it).
    pub async fn connect(self) -> Result<PostgresStore, StoreError> {
        let table = self.table_def()?;
        let config = self.pg_config()?;
        let target = describe(&config);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(self.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(self.connect_timeout))
            .create_timeout(Some(self.connect_timeout))
            .recycle_timeout(Some(self.connect_timeout))
            .build()
            .map_err(|e| StoreError::new(StoreErrorKind::Config, format!("postgres pool: {e}")))?;
        let store = PostgresStore {
            pool,
            table,
            target,
            max_result_bytes: self.max_result_bytes,
            op_timeout: self.op_timeout,
        };
        let client = store.client().await?;
        migrate::check(&**client, &store.table).await?;
        Ok(store)
    }
}

/// A pooled connection that is closed when dropped, unless [`Pooled::keep`] returns it to the
/// pool.
struct Pooled(Option<deadpool_postgres::Client>);

impl Pooled {
    fn keep(mut self) {
        // Dropping the pool's object returns it to the pool.
        drop(self.0.take());
    }
}

impl Deref for Pooled {
    type Target = deadpool_postgres::Client;
    fn deref(&self) -> &Self::Target {
        // Only `keep` and `drop` take the client out, and both consume `self`.
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("Pooled used after keep"))
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// `host:port/dbname` of a config, for messages (never the password).
fn describe(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".to_owned());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or(""))
}

/// The PostgreSQL [`Store`]. Clones share one pool.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    table: Table,
    target: String,
    max_result_bytes: usize,
    op_timeout: Duration,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("server", &self.target)
            .field("table", &self.table.qualified())
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// A builder for the server at `url` (`postgres://user:password@host:port/db`; key-value
    /// strings like `host=... dbname=...` work too). TLS is not supported yet.
    pub fn builder(url: impl Into<String>) -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            url: url.into(),
            pool_size: 16,
            schema: DEFAULT_SCHEMA.to_owned(),
            table: DEFAULT_TABLE.to_owned(),
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            connect_timeout: Duration::from_secs(5),
            op_timeout: Duration::from_secs(10),
        }
    }

    /// Where the records live, for [`run_in_transaction`] on the caller's own connections.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The connection pool, for the caller's own transactions.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// `host:port/dbname` of the server (no credentials).
    pub fn server(&self) -> &str {
        &self.target
    }

    /// A pooled connection.
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Runs `f` on a pooled connection within the operation timeout. A connection whose
    /// operation timed out or lost its server is closed rather than returned to the pool: its
    /// socket may be stuck behind a statement the server never answered.
    async fn with_client<T, F, Fut>(&self, what: &str, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Pooled) -> Fut,
        Fut: Future<Output = (Pooled, Result<T, StoreError>)>,
    {
        let run = async {
            let (client, out) = f(Pooled(Some(self.client().await?))).await;
            let transient = out.as_ref().is_err_and(|e| {
                matches!(
                    e.kind(),
                    StoreErrorKind::Unavailable | StoreErrorKind::Timeout
                )
            });
            if !transient {
                client.keep();
            }
            out
        };
        // On timeout `run` is dropped with the connection inside: `Pooled` closes it.
        match tokio::time::timeout(self.op_timeout, run).await {
            Ok(out) => out,
            Err(_) => Err(op_timeout(what, self.op_timeout)),
        }
    }

    async fn fenced(
        &self,
        which: Fenced,
        key: &Key,
        token: Token,
        bytes: &[u8],
        d: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        self.with_client("write", |c| async move {
            let out =
                ops::fenced(&mut Tp(&*c), self.table.sql(), which, key, token, bytes, d).await;
            (c, out)
        })
        .await
    }
}

impl Store for PostgresStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let mut claims = self.claim_many(std::slice::from_ref(req)).await?;
        claims
            .pop()
            .ok_or_else(|| StoreError::new(StoreErrorKind::Backend, "postgres claim: no answer"))
    }

    async fn claim_many(&self, reqs: &[ClaimRequest]) -> Result<Vec<Claim>, StoreError> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        self.with_client("claim", |c| async move {
            let out = ops::claim_many(&mut Tp(&*c), &self.table.sql().claim, reqs).await;
            (c, out)
        })
        .await
    }

    async fn complete(&self, c: &Completion) -> Result<WriteOutcome, StoreError> {
        check_result_size(&c.result, self.max_result_bytes)?;
        self.fenced(Fenced::Complete, &c.key, c.token, &c.result, c.retention)
            .await
    }

    async fn complete_many(&self, cs: &[Completion]) -> Result<Vec<WriteOutcome>, StoreError> {
        for c in cs {
            check_result_size(&c.result, self.max_result_bytes)?;
        }
        if cs.is_empty() {
            return Ok(Vec::new());
        }
        self.with_client("complete", |c| async move {
            let out = ops::complete_many(&mut Tp(&*c), &self.table.sql().complete_many, cs).await;
            (c, out)
        })
        .await
    }

    async fn release(
        &self,
        key: &Key,
        token: Token,
        retention: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        self.fenced(Fenced::Release, key, token, &[], retention)
            .await
    }

    async fn extend(
        &self,
        key: &Key,
        token: Token,
        lease: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        self.fenced(Fenced::Extend, key, token, &[], lease).await
    }

    async fn fail(
        &self,
        key: &Key,
        token: Token,
        reason: &str,
        retention: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        self.fenced(Fenced::Fail, key, token, reason.as_bytes(), retention)
            .await
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        self.with_client("get", |c| async move {
            let out = async {
                let row = c
                    .query_opt(
                        &c.prepare_cached(&self.table.sql().get)
                            .await
                            .map_err(|e| pg_error("get", e))?,
                        &[&key.namespace().as_str(), &key.id()],
                    )
                    .await
                    .map_err(|e| pg_error("get", e))?;
                row.map(|r| decode_record(key, &r, 0)).transpose()
            }
            .await;
            (c, out)
        })
        .await
    }

    async fn evict(&self, key: &Key) -> Result<bool, StoreError> {
        self.with_client("evict", |c| async move {
            let out = async {
                let stmt = c
                    .prepare_cached(&self.table.sql().evict)
                    .await
                    .map_err(|e| pg_error("evict", e))?;
                c.execute(&stmt, &[&key.namespace().as_str(), &key.id()])
                    .await
                    .map(|n| n > 0)
                    .map_err(|e| pg_error("evict", e))
            }
            .await;
            (c, out)
        })
        .await
    }

    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_client("purge", |c| async move {
            let out = async {
                let stmt = c
                    .prepare_cached(&self.table.sql().purge)
                    .await
                    .map_err(|e| pg_error("purge", e))?;
                c.execute(&stmt, &[&limit])
                    .await
                    .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
                    .map_err(|e| pg_error("purge", e))
            }
            .await;
            (c, out)
        })
        .await
    }

    fn max_result_bytes(&self) -> usize {
        self.max_result_bytes
    }
}

impl Inspect for PostgresStore {
    async fn now(&self) -> Result<Timestamp, StoreError> {
        self.with_client("now", |c| async move {
            let out = c
                .query_one(self.table.sql().now, &[])
                .await
                .and_then(|r| r.try_get::<_, i64>(0))
                .map(Timestamp::from_millis)
                .map_err(|e| pg_error("now", e));
            (c, out)
        })
        .await
    }

    async fn count_by_state(&self) -> Result<Vec<(State, u64)>, StoreError> {
        self.with_client("count", |c| async move {
            let out = async {
                let rows = c
                    .query(&self.table.sql().count_by_state, &[])
                    .await
                    .map_err(|e| pg_error("count", e))?;
                rows.iter()
                    .map(|r| {
                        let code: i16 = r.try_get(0).map_err(|e| pg_error("count", e))?;
                        let n: i64 = r.try_get(1).map_err(|e| pg_error("count", e))?;
                        let state = State::from_code(i64::from(code)).ok_or_else(|| {
                            StoreError::corrupt(format!("a record has unknown state {code}"))
                        })?;
                        Ok((state, u64::try_from(n).unwrap_or(0)))
                    })
                    .collect()
            }
            .await;
            (c, out)
        })
        .await
    }

    async fn in_progress(&self, limit: usize) -> Result<Vec<Record>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_client("list", |c| async move {
            let out = async {
                let rows = c
                    .query(&self.table.sql().in_progress, &[&limit])
                    .await
                    .map_err(|e| pg_error("list", e))?;
                rows.iter()
                    .map(|r| {
                        let ns: String = r.try_get(0).map_err(|e| pg_error("list", e))?;
                        let id: String = r.try_get(1).map_err(|e| pg_error("list", e))?;
                        let key = Namespace::new(&ns).and_then(|n| n.key(&id)).map_err(|e| {
                            StoreError::corrupt(format!("stored key {ns}:{id} is invalid: {e}"))
                        })?;
                        decode_record(&key, r, 2)
                    })
                    .collect()
            }
            .await;
            (c, out)
        })
        .await
    }
}

/// Decodes the record columns of the `get` statement, starting at column `at`.
fn decode_record(key: &Key, row: &tokio_postgres::Row, at: usize) -> Result<Record, StoreError> {
    let e = |e| pg_error("decode a record", e);
    let code: i16 = row.try_get(at).map_err(e)?;
    let state = State::from_code(i64::from(code))
        .ok_or_else(|| StoreError::corrupt(format!("record {key}: unknown state {code}")))?;
    let fp: Vec<u8> = row.try_get(at + 1).map_err(e)?;
    let fingerprint = ops::fingerprint_of(key, &fp)?;
    let token: Option<i64> = row.try_get(at + 2).map_err(e)?;
    let owner: Option<String> = row.try_get(at + 3).map_err(e)?;
    let lease_until: Option<i64> = row.try_get(at + 4).map_err(e)?;
    let attempts: i32 = row.try_get(at + 5).map_err(e)?;
    let attempts = u32::try_from(attempts)
        .map_err(|_| StoreError::corrupt(format!("record {key}: attempts {attempts}")))?;
    let result: Option<Vec<u8>> = row.try_get(at + 6).map_err(e)?;
    let ts = |i| {
        row.try_get::<_, i64>(at + i)
            .map(Timestamp::from_millis)
            .map_err(e)
    };
    if state == State::InProgress && (token.is_none() || lease_until.is_none()) {
        return Err(StoreError::corrupt(format!(
            "record {key}: in progress without a token or lease"
        )));
    }
    Ok(Record::new(
        key.clone(),
        state,
        fingerprint,
        token.map(Token::from_i64),
        owner.map(Into::into),
        lease_until.map(Timestamp::from_millis),
        attempts,
        result.map(Bytes::from),
        ts(7)?,
        ts(8)?,
        ts(9)?,
    ))
}
