//! SQLite: [`migrate`] and [`enqueue`] inside the caller's rusqlite transaction (or on a plain
//! connection), and the relay's side of the table.
//!
//! SQLite has one writer at a time and no row locks: a claim is one `UPDATE ... RETURNING`
//! inside `BEGIN IMMEDIATE`, leasing the rows (`available_ms` = now + lease) and bumping their
//! fencing token. Several relay processes on one file are safe: claims serialise on the write
//! lock, and every later write of a row is fenced by its token.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{Connection, params};

use crate::error::{OutboxError, OutboxErrorKind, err, lite};
use crate::message::NewMessage;
use crate::rows::{Claimed, DeadRow, Failed, OutboxStats, Requeue};
use crate::table::Table;

/// The database clock in Unix milliseconds.
const NOW: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

/// The DDL [`migrate`] runs, for teams that apply migrations with their own tool: the table and
/// three partial indexes (pending rows, unfinished rows by key, sent rows by age).
pub fn schema_sql(table: &Table) -> String {
    let t = table.quoted();
    let ix = |suffix: &str| match table.schema() {
        Some(s) => format!("\"{s}\".\"{}\"", table.derived(suffix)),
        None => format!("\"{}\"", table.derived(suffix)),
    };
    let name = format!("\"{}\"", table.name());
    format!(
        "CREATE TABLE IF NOT EXISTS {t} (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL UNIQUE,
    destination TEXT NOT NULL,
    ordering_key TEXT,
    payload BLOB NOT NULL,
    headers TEXT,
    state INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    claim_token INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    available_ms INTEGER NOT NULL,
    sent_ms INTEGER,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS {} ON {name} (id) WHERE state = 0;
CREATE INDEX IF NOT EXISTS {} ON {name} (ordering_key, id) WHERE state <> 1;
CREATE INDEX IF NOT EXISTS {} ON {name} (sent_ms) WHERE state = 1;",
        ix("pending"),
        ix("key"),
        ix("sent"),
    )
}

/// Creates the outbox table and its indexes if missing (idempotent).
///
/// # Errors
/// An [`OutboxError`] when a statement fails.
pub fn migrate(conn: &Connection, table: &Table) -> Result<(), OutboxError> {
    conn.execute_batch(&schema_sql(table))
        .map_err(|e| lite("creating the outbox table", e))
}

/// Enqueues `message` on `conn`: pass the caller's open `rusqlite::Transaction` (it derefs to
/// a `Connection`) so the message commits with the business writes or not at all. Returns the
/// row id (its position in the outbox). Wake an in-process relay after the commit with
/// [`Notifier::notify`](crate::Notifier::notify); other relays find the row at their next poll.
///
/// # Errors
/// [`OutboxErrorKind::Invalid`] for a bad message; a database error otherwise (a duplicate
/// message id violates the unique index).
pub fn enqueue(conn: &Connection, table: &Table, message: &NewMessage) -> Result<i64, OutboxError> {
    message.check()?;
    let mut stmt = conn
        .prepare_cached(&format!(
            "INSERT INTO {} (message_id, destination, ordering_key, payload, headers, created_ms, available_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, {NOW}, {NOW})",
            table.quoted()
        ))
        .map_err(|e| lite("enqueueing an outbox message", e))?;
    stmt.execute(params![
        message.id,
        message.destination,
        message.key,
        message.payload.as_ref(),
        message.headers_json()
    ])
    .map_err(|e| lite("enqueueing an outbox message", e))?;
    Ok(conn.last_insert_rowid())
}

/// The relay's and the operator's access to an SQLite outbox table: one connection of its own,
/// used from blocking tasks.
#[derive(Clone)]
pub(crate) struct SqliteOutbox {
    conn: Arc<Mutex<Connection>>,
    table: Table,
}

impl SqliteOutbox {
    pub(crate) fn open(path: PathBuf, table: Table) -> Result<Self, OutboxError> {
        let conn = Connection::open(&path).map_err(|e| {
            err(
                OutboxErrorKind::Unavailable,
                format!("cannot open SQLite database {}: {e}", path.display()),
            )
        })?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(|e| lite("setting the busy timeout", e))?;
        let _: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| lite("enabling WAL", e))?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            table,
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &Table) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        let conn = Arc::clone(&self.conn);
        let table = self.table.clone();
        tokio::task::spawn_blocking(move || f(&mut conn.lock(), &table))
            .await
            .map_err(|e| {
                err(
                    OutboxErrorKind::Database,
                    format!("SQLite task failed: {e}"),
                )
            })?
    }

    pub(crate) async fn migrate(&self) -> Result<(), OutboxError> {
        self.with(|c, t| migrate(c, t)).await
    }

    pub(crate) async fn enqueue(&self, message: &NewMessage) -> Result<i64, OutboxError> {
        let message = message.clone();
        self.with(move |c, t| enqueue(c, t, &message)).await
    }

    pub(crate) async fn claim(
        &self,
        limit: usize,
        lease_ms: i64,
        stop_key: bool,
    ) -> Result<Vec<Claimed>, OutboxError> {
        self.with(move |c, t| {
            let q = t.quoted();
            let block = if stop_key { "<> 1" } else { "= 0" };
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(|e| lite("claiming outbox rows", e))?;
            let mut out = {
                let mut stmt = tx
                    .prepare_cached(&format!(
                        "UPDATE {q} SET claim_token = claim_token + 1, available_ms = {NOW} + ?2
                         WHERE id IN (
                           SELECT o.id FROM {q} o
                           WHERE o.state = 0 AND o.available_ms <= {NOW}
                             AND (o.ordering_key IS NULL OR NOT EXISTS (
                               SELECT 1 FROM {q} p
                               WHERE p.ordering_key = o.ordering_key AND p.id < o.id
                                 AND p.state {block}))
                           ORDER BY o.id LIMIT ?1)
                         RETURNING id, claim_token, message_id, destination, ordering_key,
                                   payload, headers, attempts"
                    ))
                    .map_err(|e| lite("claiming outbox rows", e))?;
                let rows = stmt
                    .query_map(params![limit as i64, lease_ms], |r| {
                        Ok(Claimed {
                            id: r.get(0)?,
                            token: r.get(1)?,
                            message_id: r.get(2)?,
                            destination: r.get(3)?,
                            key: r.get(4)?,
                            payload: r.get(5)?,
                            headers: r.get(6)?,
                            attempts: r.get(7)?,
                        })
                    })
                    .map_err(|e| lite("claiming outbox rows", e))?;
                rows.collect::<Result<Vec<_>, _>>()
                    .map_err(|e| lite("claiming outbox rows", e))?
            };
            tx.commit().map_err(|e| lite("claiming outbox rows", e))?;
            out.sort_by_key(|c| c.id);
            Ok(out)
        })
        .await
    }

    pub(crate) async fn mark_sent(&self, rows: &[(i64, i64)]) -> Result<u64, OutboxError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let rows = rows.to_vec();
        self.with(move |c, t| {
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(|e| lite("marking outbox rows sent", e))?;
            let mut n = 0;
            {
                let mut stmt = tx
                    .prepare_cached(&format!(
                        "UPDATE {} SET state = 1, sent_ms = {NOW}
                         WHERE id = ?1 AND claim_token = ?2 AND state = 0",
                        t.quoted()
                    ))
                    .map_err(|e| lite("marking outbox rows sent", e))?;
                for (id, token) in rows {
                    n += stmt
                        .execute(params![id, token])
                        .map_err(|e| lite("marking outbox rows sent", e))?
                        as u64;
                }
            }
            tx.commit()
                .map_err(|e| lite("marking outbox rows sent", e))?;
            Ok(n)
        })
        .await
    }

    pub(crate) async fn mark_failed(&self, f: &Failed) -> Result<u64, OutboxError> {
        let f = f.clone();
        self.with(move |c, t| {
            c.execute(
                &format!(
                    "UPDATE {} SET attempts = attempts + ?3, state = ?4,
                       available_ms = {NOW} + ?5, last_error = ?6
                     WHERE id = ?1 AND claim_token = ?2 AND state = 0",
                    t.quoted()
                ),
                params![
                    f.id,
                    f.token,
                    i32::from(f.counts),
                    if f.dead { 2 } else { 0 },
                    f.delay_ms,
                    f.error
                ],
            )
            .map(|n| n as u64)
            .map_err(|e| lite("recording a failed publish", e))
        })
        .await
    }

    pub(crate) async fn stats(&self) -> Result<OutboxStats, OutboxError> {
        self.with(|c, t| {
            c.query_row(
                &format!(
                    "SELECT COALESCE(SUM(state = 0), 0), COALESCE(SUM(state = 0 AND attempts > 0), 0),
                            COALESCE(SUM(state = 2), 0), COALESCE(SUM(state = 1), 0),
                            {NOW} - MIN(CASE WHEN state = 0 THEN created_ms END)
                     FROM {}",
                    t.quoted()
                ),
                [],
                |r| {
                    Ok(OutboxStats {
                        pending: r.get::<_, i64>(0)?.max(0) as u64,
                        retrying: r.get::<_, i64>(1)?.max(0) as u64,
                        dead: r.get::<_, i64>(2)?.max(0) as u64,
                        sent: r.get::<_, i64>(3)?.max(0) as u64,
                        oldest_pending_age_ms: r
                            .get::<_, Option<i64>>(4)?
                            .map(|a| a.max(0) as u64),
                    })
                },
            )
            .map_err(|e| lite("reading outbox stats", e))
        })
        .await
    }

    pub(crate) async fn dead(&self, limit: usize) -> Result<Vec<DeadRow>, OutboxError> {
        self.with(move |c, t| {
            let mut stmt = c
                .prepare(&format!(
                    "SELECT id, message_id, destination, ordering_key, attempts, last_error, created_ms
                     FROM {} WHERE state = 2 ORDER BY id LIMIT ?1",
                    t.quoted()
                ))
                .map_err(|e| lite("listing dead outbox rows", e))?;
            let rows = stmt
                .query_map([limit as i64], |r| {
                    Ok(DeadRow {
                        id: r.get(0)?,
                        message_id: r.get(1)?,
                        destination: r.get(2)?,
                        key: r.get(3)?,
                        attempts: r.get(4)?,
                        last_error: r.get(5)?,
                        created_ms: r.get(6)?,
                    })
                })
                .map_err(|e| lite("listing dead outbox rows", e))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(|e| lite("listing dead outbox rows", e))
        })
        .await
    }

    pub(crate) async fn requeue(&self, which: &Requeue) -> Result<u64, OutboxError> {
        let which = which.clone();
        self.with(move |c, t| {
            let base = format!(
                "UPDATE {} SET state = 0, attempts = 0, available_ms = {NOW} WHERE state = 2",
                t.quoted()
            );
            match which {
                Requeue::AllDead => c.execute(&base, []),
                Requeue::Id(id) => c.execute(&format!("{base} AND id = ?1"), [id]),
                Requeue::MessageId(m) => c.execute(&format!("{base} AND message_id = ?1"), [m]),
            }
            .map(|n| n as u64)
            .map_err(|e| lite("requeueing dead outbox rows", e))
        })
        .await
    }

    pub(crate) async fn purge_sent(&self, older_ms: i64, limit: usize) -> Result<u64, OutboxError> {
        self.with(move |c, t| {
            let q = t.quoted();
            c.execute(
                &format!(
                    "DELETE FROM {q} WHERE id IN (
                       SELECT id FROM {q} WHERE state = 1 AND sent_ms < {NOW} - ?1
                       ORDER BY sent_ms LIMIT ?2)"
                ),
                params![older_ms, limit as i64],
            )
            .map(|n| n as u64)
            .map_err(|e| lite("deleting old sent outbox rows", e))
        })
        .await
    }
}
