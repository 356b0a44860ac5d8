//! The writer: group commit.
//!
//! SQLite allows one writer at a time, and each commit costs a WAL write (and an fsync with
//! `synchronous=FULL`). Instead of one transaction per operation, one thread owns the write
//! connection and runs every queued operation in one `BEGIN IMMEDIATE ... COMMIT`: under load,
//! hundreds of claims and completes share a commit. Replies are sent only after the commit
//! succeeded, so no caller hears "done" for a write that is not durable; if the commit fails,
//! every operation of the batch gets the error.
//!
//! When the connection is idle, a caller runs its own job inline instead (see
//! [`Shared::try_inline`]): a lone operation does not pay for two thread hops.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use idem::{Clock, StoreError, StoreErrorKind, Timestamp};
use parking_lot::Mutex;
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::ops::sql_error;

/// Undoes the writes of the running isolated job (the writer releases the savepoint after).
pub(crate) const ROLLBACK_JOB: &str = "ROLLBACK TO idem_job";

/// A queued operation.
pub(crate) trait Job: Send {
    /// Runs on the writer's connection inside the batch transaction; returns the reply to send
    /// once the batch has committed.
    fn run(self: Box<Self>, conn: &mut Connection, now: Timestamp) -> Box<dyn Deliver>;
    /// Fails the job without running it (the batch could not start).
    fn abort(self: Box<Self>, err: &StoreError);
    /// Whether the job may write several rows or run user code, and so needs a savepoint to be
    /// undone alone if it fails or panics.
    fn isolated(&self) -> bool;
}

/// A reply waiting for its batch to commit.
pub(crate) trait Deliver: Send {
    fn deliver(self: Box<Self>, committed: Result<(), &StoreError>);
    /// Whether the job failed: an isolated job's writes are then undone, so a batch operation
    /// that fails halfway leaves nothing behind.
    fn failed(&self) -> bool {
        false
    }
}

/// A job from a closure.
pub(crate) struct FnJob<T, F> {
    f: F,
    tx: oneshot::Sender<Result<T, StoreError>>,
    isolated: bool,
}

impl<T, F> FnJob<T, F> {
    pub(crate) fn new(f: F, tx: oneshot::Sender<Result<T, StoreError>>, isolated: bool) -> Self {
        Self { f, tx, isolated }
    }
}

impl<T, F> Job for FnJob<T, F>
where
    T: Send + 'static,
    F: FnOnce(&mut Connection, Timestamp) -> Result<T, StoreError> + Send,
{
    fn run(self: Box<Self>, conn: &mut Connection, now: Timestamp) -> Box<dyn Deliver> {
        let value = (self.f)(conn, now);
        Box::new(Reply { tx: self.tx, value })
    }

    fn abort(self: Box<Self>, err: &StoreError) {
        let _ = self.tx.send(Err(copy(err, "batch did not start")));
    }

    fn isolated(&self) -> bool {
        self.isolated
    }
}

struct Reply<T> {
    tx: oneshot::Sender<Result<T, StoreError>>,
    value: Result<T, StoreError>,
}

impl<T: Send> Deliver for Reply<T> {
    fn deliver(self: Box<Self>, committed: Result<(), &StoreError>) {
        let value = match committed {
            Ok(()) => self.value,
            Err(e) => Err(copy(e, "commit failed")),
        };
        // The caller may have given up (a cancelled future); nothing to do then.
        let _ = self.tx.send(value);
    }

    fn failed(&self) -> bool {
        self.value.is_err()
    }
}

fn copy(e: &StoreError, context: &str) -> StoreError {
    StoreError::new(e.kind(), format!("{context}: {}", e.message()))
}

/// Counters of the writer, for benchmarks and operators.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) commits: AtomicU64,
    pub(crate) jobs: AtomicU64,
    pub(crate) inline: AtomicU64,
    /// Jobs sent to the writer thread and not yet taken by it.
    pub(crate) queued: AtomicU64,
}

/// The write connection and what every batch needs, shared by the writer thread and callers
/// that run inline.
pub(crate) struct Shared {
    pub(crate) conn: Mutex<Connection>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) stats: Stats,
    pub(crate) max_batch: usize,
    /// How long the writer waits for another process's write lock.
    pub(crate) busy_timeout: Duration,
    /// Whether an idle connection may run a caller's job on the caller's thread (see
    /// [`Shared::try_inline`]).
    pub(crate) inline: bool,
}

impl Shared {
    /// Runs `job` on the caller's thread if the connection is idle and the write lock is free
    /// at once; gives the job back otherwise (to be queued).
    ///
    /// With one operation in flight (a sequential consumer) this saves two thread hops per
    /// operation, which cost more than the SQLite work itself. Under concurrency the connection
    /// is busy, jobs queue, and the writer thread groups them into one commit. A commit with
    /// `synchronous=NORMAL` takes microseconds (no fsync), short enough to run on an async
    /// worker; with `FULL` every job goes through the writer thread.
    pub(crate) fn try_inline(&self, job: Box<dyn Job>) -> Option<Box<dyn Job>> {
        // Queued jobs mean load: joining their batch beats a commit of one.
        if !self.inline || self.stats.queued.load(Ordering::Acquire) > 0 {
            return Some(job);
        }
        let Some(mut conn) = self.conn.try_lock() else {
            return Some(job);
        };
        if begin(&conn, Duration::ZERO).is_err() {
            return Some(job);
        }
        self.stats.inline.fetch_add(1, Ordering::Relaxed);
        let mut replies = Vec::with_capacity(1);
        self.run_begun(&mut conn, std::iter::once(job), &mut replies);
        None
    }

    /// Runs a batch in one transaction and delivers the replies.
    fn run_batch(
        &self,
        conn: &mut Connection,
        jobs: &mut Vec<Box<dyn Job>>,
        replies: &mut Vec<Box<dyn Deliver>>,
    ) {
        if let Err(e) = begin(conn, self.busy_timeout) {
            tracing::warn!(error = %e, "idem sqlite: cannot start a write transaction");
            for job in jobs.drain(..) {
                job.abort(&e);
            }
            return;
        }
        self.run_begun(conn, jobs.drain(..), replies);
    }

    fn run_begun(
        &self,
        conn: &mut Connection,
        jobs: impl Iterator<Item = Box<dyn Job>>,
        replies: &mut Vec<Box<dyn Deliver>>,
    ) {
        // The clock is read under the write lock, so time never goes backwards between two
        // batches of different processes sharing the file.
        let now = self.clock.now();
        let mut rolled_back = None;
        for job in jobs {
            if let Some(e) = &rolled_back {
                job.abort(e);
                continue;
            }
            replies.push(run_job(conn, job, now));
            // Some errors (a full disk, an I/O error) make SQLite roll the whole transaction
            // back. The jobs after it must not run in autocommit mode, where each would commit
            // on its own while the batch reports failure.
            if conn.is_autocommit() {
                rolled_back = Some(StoreError::new(
                    StoreErrorKind::Unavailable,
                    "SQLite rolled the write transaction back after an error",
                ));
            }
        }
        let committed = match rolled_back {
            Some(e) => Err(e),
            None => cached(conn, "COMMIT").map_err(|e| sql_error("commit", e)),
        };
        if let Err(e) = &committed {
            tracing::error!(error = %e, "idem sqlite: commit failed; the batch is rolled back");
            let _ = conn.execute_batch("ROLLBACK");
        } else {
            self.stats.commits.fetch_add(1, Ordering::Relaxed);
            self.stats
                .jobs
                .fetch_add(replies.len() as u64, Ordering::Relaxed);
        }
        for reply in replies.drain(..) {
            reply.deliver(committed.as_ref().map(|_| ()));
        }
    }
}

/// `BEGIN IMMEDIATE`, waiting up to `patience` for another process's write lock. The
/// connection's own busy timeout is zero, so an inline attempt never blocks.
fn begin(conn: &Connection, patience: Duration) -> Result<(), StoreError> {
    let deadline = Instant::now() + patience;
    let mut pause = Duration::from_micros(100);
    loop {
        match cached(conn, "BEGIN IMMEDIATE") {
            Ok(()) => return Ok(()),
            Err(e) => {
                let e = sql_error("begin", e);
                if e.kind() != StoreErrorKind::Busy || Instant::now() >= deadline {
                    return Err(e);
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
        }
    }
}

/// Runs one statement from the connection's statement cache: `BEGIN IMMEDIATE` and `COMMIT`
/// come once or twice per message at low load, and `execute_batch` would parse them every time
/// (about 1,600 instructions each: 6,400 of a sequential message's 77,000).
fn cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

fn run_job(conn: &mut Connection, job: Box<dyn Job>, now: Timestamp) -> Box<dyn Deliver> {
    if !job.isolated() {
        return job.run(conn, now);
    }
    if let Err(e) = conn.execute_batch("SAVEPOINT idem_job") {
        job.abort(&sql_error("savepoint", e));
        return Box::new(Nothing);
    }
    match catch_unwind(AssertUnwindSafe(|| job.run(conn, now))) {
        Ok(reply) => {
            let end = if reply.failed() {
                "ROLLBACK TO idem_job; RELEASE idem_job"
            } else {
                "RELEASE idem_job"
            };
            if let Err(e) = conn.execute_batch(end) {
                tracing::error!(error = %e, "idem sqlite: cannot release a savepoint");
            }
            reply
        }
        Err(_) => {
            // The job's reply channel was dropped with the panic: its caller hears that the
            // writer gave no answer. Its writes are undone; the batch goes on.
            tracing::error!(
                "idem sqlite: a transactional handler panicked; its writes are rolled back"
            );
            let _ = conn.execute_batch("ROLLBACK TO idem_job; RELEASE idem_job");
            Box::new(Nothing)
        }
    }
}

/// The writer thread: takes queued jobs and runs them in batches.
pub(crate) fn run_writer(shared: Arc<Shared>, rx: Receiver<Box<dyn Job>>) {
    let mut jobs: Vec<Box<dyn Job>> = Vec::with_capacity(shared.max_batch);
    let mut replies: Vec<Box<dyn Deliver>> = Vec::with_capacity(shared.max_batch);
    while let Ok(first) = rx.recv() {
        jobs.push(first);
        while jobs.len() < shared.max_batch {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let mut conn = shared.conn.lock();
        shared
            .stats
            .queued
            .fetch_sub(jobs.len() as u64, Ordering::AcqRel);
        shared.run_batch(&mut conn, &mut jobs, &mut replies);
    }
}

struct Nothing;

impl Deliver for Nothing {
    fn deliver(self: Box<Self>, _: Result<(), &StoreError>) {}
}

/// The error callers see when the writer dropped their reply (a panic in their handler) or has
/// stopped.
pub(crate) fn writer_gone() -> StoreError {
    StoreError::new(
        StoreErrorKind::Unavailable,
        "the SQLite writer gave no answer (it stopped, or the transactional handler panicked)",
    )
}
