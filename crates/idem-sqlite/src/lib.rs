//! # idem-sqlite: the embedded default store
//!
//! [`SqliteStore`] keeps idem records in a SQLite file: no server, no set-up, durable across
//! crashes. It runs in WAL mode; one writer thread batches every concurrent claim and completion
//! into one transaction (group commit), so throughput does not collapse to one commit per
//! message.
//!
//! Two modes (docs/design.md, section 5):
//! - **store mode**: [`SqliteStore`] implements [`idem::Store`]; use it with
//!   [`idem::Executor`] when the handler's effects live elsewhere;
//! - **transactional mode**: [`SqliteStore::run_transactional`] (or
//!   [`run_in_transaction`] on your own connection) writes the record in the same SQLite
//!   transaction as the handler's own writes: commit = effect + record, crash = neither.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use idem::{Executor, Namespace};
//! use idem_sqlite::SqliteStore;
//!
//! let exec = Executor::new(SqliteStore::open("idem.db")?);
//! let key = Namespace::new("emails")?.key("msg-1")?;
//! let outcome = exec
//!     .run(key, b"payload", |_attempt| async { Ok::<_, std::io::Error>(()) })
//!     .await?;
//! println!("{}", outcome.kind());
//! # Ok(()) }
//! ```
//!
//! ## Durability: `synchronous=NORMAL` or `FULL`
//!
//! A reply (claim acquired, completion recorded) is sent only after its batch's `COMMIT`
//! returned. What that commit survives depends on [`Synchronous`]:
//! - [`Synchronous::Normal`] (the default): the commit is in the WAL file when the call returns,
//!   so it survives the process being killed (`kill -9`, OOM, panic). A power loss or kernel
//!   crash can lose the last commits before the next checkpoint. For deduplication this means
//!   a few recent messages could be processed again after a machine crash: in transactional
//!   mode the handler's writes are lost with them (they were in the same transaction), so
//!   effects stay exactly once.
//! - [`Synchronous::Full`]: every commit is fsynced before it returns; it survives power loss.
//!   Group commit shares one fsync among all operations of a batch, so the cost is per batch,
//!   not per message.

mod ops;
mod tx;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use idem::{
    Claim, ClaimRequest, Clock, Completion, DEFAULT_MAX_RESULT_BYTES, Inspect, Key, Record, State,
    Store, StoreError, StoreErrorKind, SystemClock, Timestamp, Token, WriteOutcome,
    check_result_size,
};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

pub use crate::tx::{create_schema, run_in_transaction};
use crate::writer::{FnJob, Job, Shared, Stats, run_writer, writer_gone};

/// How hard SQLite works to make each commit durable. See the crate docs.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub enum Synchronous {
    /// Commits survive a process crash; the last ones may be lost on power loss.
    #[default]
    Normal,
    /// Commits are fsynced: they survive power loss.
    Full,
}

impl Synchronous {
    fn pragma(self) -> &'static str {
        match self {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }
}

impl std::str::FromStr for Synchronous {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "normal" => Ok(Synchronous::Normal),
            "full" => Ok(Synchronous::Full),
            other => Err(format!(
                "unknown synchronous level {other:?} (normal or full)"
            )),
        }
    }
}

/// Builds a [`SqliteStore`].
#[derive(Debug)]
pub struct SqliteStoreBuilder {
    path: Option<PathBuf>,
    synchronous: Synchronous,
    max_result_bytes: usize,
    max_batch: usize,
    busy_timeout: Duration,
    clock: Arc<dyn Clock>,
}

impl SqliteStoreBuilder {
    /// Durability of each commit (default [`Synchronous::Normal`]).
    #[must_use]
    pub fn synchronous(mut self, level: Synchronous) -> Self {
        self.synchronous = level;
        self
    }

    /// Largest result `complete` accepts (default 64 KiB).
    #[must_use]
    pub fn max_result_bytes(mut self, limit: usize) -> Self {
        self.max_result_bytes = limit;
        self
    }

    /// Most operations per group commit (default 1024).
    #[must_use]
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }

    /// How long to wait for another process holding the write lock (default 5 s).
    #[must_use]
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// The clock for leases and retention (default: the host's; tests use a manual one).
    #[must_use]
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Opens (creating if needed) the database, applies the schema and starts the writer.
    ///
    /// # Errors
    /// [`StoreErrorKind::Unavailable`] if the file cannot be opened or created (the message
    /// names the path), [`StoreErrorKind::Schema`] if it holds an incompatible idem schema.
    pub fn open(self) -> Result<SqliteStore, StoreError> {
        let conn = self.connect()?;
        let shared = Arc::new(Shared {
            conn: parking_lot::Mutex::new(conn),
            clock: Arc::clone(&self.clock),
            stats: Stats::default(),
            max_batch: self.max_batch,
            busy_timeout: self.busy_timeout,
            inline: self.synchronous == Synchronous::Normal,
        });
        let (tx, rx) = mpsc::channel::<Box<dyn Job>>();
        let writer = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("idem-sqlite-writer".into())
            .spawn(move || run_writer(writer, rx))
            .map_err(|e| {
                StoreError::unavailable("cannot start the SQLite writer thread").with_source(e)
            })?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                tx,
                path: self.path,
                max_result_bytes: self.max_result_bytes,
                shared,
            }),
        })
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        let where_ = self
            .path
            .as_ref()
            .map_or_else(|| "in memory".to_owned(), |p| p.display().to_string());
        let open_err = |e: rusqlite::Error| {
            StoreError::unavailable(format!("cannot open SQLite database {where_}: {e}"))
                .with_source(e)
        };
        let conn = match &self.path {
            Some(p) => Connection::open_with_flags(
                p,
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_CREATE
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            ),
            None => Connection::open_in_memory(),
        }
        .map_err(open_err)?;
        configure(&conn, self.synchronous, self.busy_timeout).map_err(|e| {
            StoreError::new(
                e.kind(),
                format!("SQLite database {where_}: {}", e.message()),
            )
        })?;
        ops::migrate(&conn)?;
        conn.busy_timeout(Duration::ZERO)
            .map_err(|e| ops::sql_error("set busy timeout", e))?;
        Ok(conn)
    }
}

/// Applies idem's connection settings: WAL, the durability level, a busy timeout.
fn configure(conn: &Connection, sync: Synchronous, busy: Duration) -> Result<(), StoreError> {
    // Set-up waits for other processes like any client; afterwards the writer waits itself
    // (see `writer::begin`), so that an inline attempt never blocks.
    conn.busy_timeout(busy)
        .map_err(|e| ops::sql_error("set busy timeout", e))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(|e| ops::sql_error("enable WAL", e))?;
    if !mode.eq_ignore_ascii_case("wal") && !mode.eq_ignore_ascii_case("memory") {
        return Err(StoreError::new(
            StoreErrorKind::Config,
            format!("cannot enable WAL mode (journal_mode is {mode})"),
        ));
    }
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {}; PRAGMA temp_store = MEMORY; PRAGMA cache_size = -16384;",
        sync.pragma()
    ))
    .map_err(|e| ops::sql_error("configure", e))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// The embedded default [`Store`]: SQLite with group commit. Clones share one writer.
///
/// Several processes may open the same file: SQLite's lock serializes their batches, and every
/// operation's read-decide-write runs under it.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::Sender<Box<dyn Job>>,
    path: Option<PathBuf>,
    max_result_bytes: usize,
    shared: Arc<Shared>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

/// Counters of a store's writer since it opened.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct WriterStats {
    /// Transactions committed.
    pub commits: u64,
    /// Operations in them.
    pub operations: u64,
    /// Commits run inline by an idle caller rather than by the writer thread.
    pub inline: u64,
}

impl WriterStats {
    /// Operations per commit on average.
    pub fn mean_batch(&self) -> f64 {
        if self.commits == 0 {
            0.0
        } else {
            self.operations as f64 / self.commits as f64
        }
    }
}

impl SqliteStore {
    /// Opens (or creates) the database at `path` with the default settings.
    ///
    /// # Errors
    /// As [`SqliteStoreBuilder::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::builder(path).open()
    }

    /// A builder for the database at `path`.
    pub fn builder(path: impl AsRef<Path>) -> SqliteStoreBuilder {
        SqliteStoreBuilder {
            path: Some(path.as_ref().to_owned()),
            ..Self::memory_builder()
        }
    }

    /// A builder for a private in-memory database (tests, benchmarks): nothing is durable.
    pub fn memory_builder() -> SqliteStoreBuilder {
        SqliteStoreBuilder {
            path: None,
            synchronous: Synchronous::default(),
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            max_batch: 1024,
            busy_timeout: Duration::from_secs(5),
            clock: Arc::new(SystemClock),
        }
    }

    /// The database file, or `None` in memory.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// The store's clock.
    pub fn now(&self) -> Timestamp {
        self.inner.shared.clock.now()
    }

    /// Commits and operations so far.
    pub fn stats(&self) -> WriterStats {
        let stats = &self.inner.shared.stats;
        WriterStats {
            commits: stats.commits.load(Ordering::Relaxed),
            operations: stats.jobs.load(Ordering::Relaxed),
            inline: stats.inline.load(Ordering::Relaxed),
        }
    }

    /// Runs `f` on the writer's connection in the next batch; answers after the commit.
    async fn call<T, F>(&self, isolated: bool, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, Timestamp) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(FnJob::new(f, tx, isolated));
        if let Some(job) = self.inner.shared.try_inline(job) {
            let queued = &self.inner.shared.stats.queued;
            queued.fetch_add(1, Ordering::AcqRel);
            if self.inner.tx.send(job).is_err() {
                queued.fetch_sub(1, Ordering::AcqRel);
                return Err(writer_gone());
            }
        }
        rx.await.map_err(|_| writer_gone())?
    }
}

impl Inspect for SqliteStore {
    async fn now(&self) -> Result<Timestamp, StoreError> {
        Ok(self.inner.shared.clock.now())
    }

    async fn count_by_state(&self) -> Result<Vec<(State, u64)>, StoreError> {
        self.call(false, |conn, _| ops::count_by_state(conn)).await
    }

    async fn in_progress(&self, limit: usize) -> Result<Vec<Record>, StoreError> {
        self.call(false, move |conn, _| ops::list_in_progress(conn, limit))
            .await
    }
}

impl Store for SqliteStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        let req = req.clone();
        self.call(false, move |conn, now| ops::claim(conn, &req, now))
            .await
    }

    async fn claim_many(&self, reqs: &[ClaimRequest]) -> Result<Vec<Claim>, StoreError> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let reqs = reqs.to_vec();
        self.call(reqs.len() > 1, move |conn, now| {
            reqs.iter().map(|r| ops::claim(conn, r, now)).collect()
        })
        .await
    }

    async fn complete(&self, c: &Completion) -> Result<WriteOutcome, StoreError> {
        check_result_size(&c.result, self.inner.max_result_bytes)?;
        let c = c.clone();
        self.call(false, move |conn, now| ops::complete(conn, &c, now))
            .await
    }

    async fn complete_many(&self, cs: &[Completion]) -> Result<Vec<WriteOutcome>, StoreError> {
        for c in cs {
            check_result_size(&c.result, self.inner.max_result_bytes)?;
        }
        if cs.is_empty() {
            return Ok(Vec::new());
        }
        let cs = cs.to_vec();
        self.call(cs.len() > 1, move |conn, now| {
            cs.iter().map(|c| ops::complete(conn, c, now)).collect()
        })
        .await
    }

    async fn release(
        &self,
        key: &Key,
        token: Token,
        retention: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        let key = key.clone();
        self.call(false, move |conn, now| {
            ops::release(conn, &key, token, retention, now)
        })
        .await
    }

    async fn extend(
        &self,
        key: &Key,
        token: Token,
        lease: Duration,
    ) -> Result<WriteOutcome, StoreError> {
        let key = key.clone();
        self.call(false, move |conn, now| {
            ops::extend(conn, &key, token, lease, now)
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
        let key = key.clone();
        let reason = reason.to_owned();
        self.call(false, move |conn, now| {
            ops::fail(conn, &key, token, &reason, retention, now)
        })
        .await
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        let key = key.clone();
        self.call(false, move |conn, _| ops::load(conn, &key)).await
    }

    async fn evict(&self, key: &Key) -> Result<bool, StoreError> {
        let key = key.clone();
        self.call(false, move |conn, _| ops::evict(conn, &key))
            .await
    }

    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        self.call(false, move |conn, now| ops::purge(conn, now, limit))
            .await
    }

    fn max_result_bytes(&self) -> usize {
        self.inner.max_result_bytes
    }
}

/// The README's examples, compiled as doctests so that they stay true.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
