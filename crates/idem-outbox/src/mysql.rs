//! MySQL and MariaDB: [`migrate`] and [`enqueue`] inside the caller's `mysql_async`
//! transaction, and the relay's side of the table.
//!
//! MySQL has no `UPDATE ... RETURNING`, so a claim is a short READ COMMITTED transaction: a
//! plain (non-locking) read picks candidates (the oldest available pending rows whose key has
//! no earlier unfinished row), a `SELECT ... FOR UPDATE SKIP LOCKED` locks those still
//! available (MySQL 8.0, MariaDB 10.6 and later), an `UPDATE` leases them and bumps their
//! fencing token, and the transaction commits. Nothing stays locked while the relay talks to
//! the broker. There is no `LISTEN`: relays poll (and wake in process, see
//! [`Notifier`](crate::Notifier)).

use mysql_async::prelude::Queryable;
use mysql_async::{IsolationLevel, Opts, Pool, Transaction, TxOpts, Value};

use crate::error::{OutboxError, OutboxErrorKind, err, my};
use crate::message::NewMessage;
use crate::rows::{Claimed, DeadRow, Failed, OutboxStats, Requeue};
use crate::table::Table;

/// The database clock in Unix milliseconds.
const NOW: &str = "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)";

/// The DDL [`migrate`] runs, for teams that apply migrations with their own tool: the table
/// (InnoDB) and three indexes (pending rows, unfinished rows by key, sent rows by age).
pub fn schema_sql(table: &Table) -> String {
    let t = table.backticked();
    let (pending, key, sent) = (
        table.derived("pending"),
        table.derived("key"),
        table.derived("sent"),
    );
    format!(
        "CREATE TABLE IF NOT EXISTS {t} (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    message_id VARCHAR(255) NOT NULL,
    destination VARCHAR(255) NOT NULL,
    ordering_key VARCHAR(255) NULL,
    payload LONGBLOB NOT NULL,
    headers MEDIUMTEXT NULL,
    state SMALLINT NOT NULL DEFAULT 0,
    attempts INT NOT NULL DEFAULT 0,
    claim_token BIGINT NOT NULL DEFAULT 0,
    created_ms BIGINT NOT NULL,
    available_ms BIGINT NOT NULL,
    sent_ms BIGINT NULL,
    last_error TEXT NULL,
    UNIQUE KEY `{}` (message_id),
    KEY `{pending}` (state, id),
    KEY `{key}` (ordering_key, state, id),
    KEY `{sent}` (state, sent_ms)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
        table.derived("message_id")
    )
}

/// Creates the outbox table and its indexes if missing (idempotent).
///
/// # Errors
/// An [`OutboxError`] when the statement fails.
pub async fn migrate<Q: Queryable>(conn: &mut Q, table: &Table) -> Result<(), OutboxError> {
    conn.query_drop(schema_sql(table))
        .await
        .map_err(|e| my("creating the outbox table", e))
}

/// Enqueues `message` in the caller's open transaction, so it commits with the business
/// writes or not at all. Returns the row id (its position in the outbox).
///
/// # Errors
/// [`OutboxErrorKind::Invalid`] for a bad message; a database error otherwise (a duplicate
/// message id violates the unique index).
pub async fn enqueue(
    tx: &mut Transaction<'_>,
    table: &Table,
    message: &NewMessage,
) -> Result<i64, OutboxError> {
    message.check()?;
    tx.exec_drop(insert_sql(table), insert_params(message))
        .await
        .map_err(|e| my("enqueueing an outbox message", e))?;
    tx.last_insert_id()
        .map(|id| id as i64)
        .ok_or_else(|| err(OutboxErrorKind::Database, "the insert returned no row id"))
}

fn insert_sql(table: &Table) -> String {
    format!(
        "INSERT INTO {} (message_id, destination, ordering_key, payload, headers, created_ms, available_ms) \
         VALUES (?, ?, ?, ?, ?, {NOW}, {NOW})",
        table.backticked()
    )
}

fn insert_params(m: &NewMessage) -> Vec<Value> {
    vec![
        m.id.clone().into(),
        m.destination.clone().into(),
        m.key.clone().into(),
        m.payload.to_vec().into(),
        m.headers_json().into(),
    ]
}

type ClaimRow = (
    i64,
    i64,
    String,
    String,
    Option<String>,
    Vec<u8>,
    Option<String>,
    i32,
);

type DeadTuple = (
    i64,
    String,
    String,
    Option<String>,
    i32,
    Option<String>,
    i64,
);

/// The relay's and the operator's access to a MySQL outbox table.
#[derive(Clone)]
pub(crate) struct MysqlOutbox {
    pool: Pool,
    table: Table,
}

impl MysqlOutbox {
    pub(crate) fn connect(url: &str, table: Table) -> Result<Self, OutboxError> {
        let opts = Opts::from_url(url).map_err(|e| {
            err(
                OutboxErrorKind::Config,
                format!("bad MySQL URL {}: {e}", idem::redact_url(url)),
            )
        })?;
        Ok(Self {
            pool: Pool::new(opts),
            table,
        })
    }

    async fn conn(&self) -> Result<mysql_async::Conn, OutboxError> {
        self.pool
            .get_conn()
            .await
            .map_err(|e| my("connecting to the outbox database", e))
    }

    pub(crate) async fn migrate(&self) -> Result<(), OutboxError> {
        let mut conn = self.conn().await?;
        migrate(&mut conn, &self.table).await
    }

    pub(crate) async fn enqueue(&self, message: &NewMessage) -> Result<i64, OutboxError> {
        let mut tx = self
            .pool
            .start_transaction(TxOpts::default())
            .await
            .map_err(|e| my("starting a transaction", e))?;
        let id = enqueue(&mut tx, &self.table, message).await?;
        tx.commit().await.map_err(|e| my("committing", e))?;
        Ok(id)
    }

    pub(crate) async fn claim(
        &self,
        limit: usize,
        lease_ms: i64,
        stop_key: bool,
    ) -> Result<Vec<Claimed>, OutboxError> {
        let t = self.table.backticked();
        let block = if stop_key { "<> 1" } else { "= 0" };
        let mut conn = self.conn().await?;
        // Candidates: a consistent read of committed rows, so an unfinished earlier row of the
        // same key always counts (a locking read would skip it when another relay holds it).
        let candidates: Vec<i64> = conn
            .exec(
                format!(
                    "SELECT o.id FROM {t} o
                     WHERE o.state = 0 AND o.available_ms <= {NOW}
                       AND (o.ordering_key IS NULL OR NOT EXISTS (
                         SELECT 1 FROM {t} p
                         WHERE p.ordering_key = o.ordering_key AND p.id < o.id AND p.state {block}))
                     ORDER BY o.id LIMIT ?"
                ),
                (limit as u64,),
            )
            .await
            .map_err(|e| my("claiming outbox rows", e))?;
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let list = placeholders(candidates.len());
        let mut opts = TxOpts::default();
        opts.with_isolation_level(IsolationLevel::ReadCommitted);
        let mut tx = conn
            .start_transaction(opts)
            .await
            .map_err(|e| my("claiming outbox rows", e))?;
        let ids: Vec<Value> = candidates.iter().map(|&i| i.into()).collect();
        let rows: Vec<ClaimRow> = tx
            .exec(
                format!(
                    "SELECT id, claim_token + 1, message_id, destination, ordering_key, payload, headers, attempts
                     FROM {t} WHERE id IN ({list}) AND state = 0 AND available_ms <= {NOW}
                     ORDER BY id FOR UPDATE SKIP LOCKED"
                ),
                ids,
            )
            .await
            .map_err(|e| my("claiming outbox rows", e))?;
        if !rows.is_empty() {
            let locked: Vec<Value> = std::iter::once(lease_ms.into())
                .chain(rows.iter().map(|r| r.0.into()))
                .collect();
            tx.exec_drop(
                format!(
                    "UPDATE {t} SET claim_token = claim_token + 1, available_ms = {NOW} + ?
                     WHERE id IN ({})",
                    placeholders(rows.len())
                ),
                locked,
            )
            .await
            .map_err(|e| my("claiming outbox rows", e))?;
        }
        tx.commit()
            .await
            .map_err(|e| my("claiming outbox rows", e))?;
        Ok(rows
            .into_iter()
            .map(|r| Claimed {
                id: r.0,
                token: r.1,
                message_id: r.2,
                destination: r.3,
                key: r.4,
                payload: r.5,
                headers: r.6,
                attempts: r.7,
            })
            .collect())
    }

    pub(crate) async fn mark_sent(&self, rows: &[(i64, i64)]) -> Result<u64, OutboxError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let t = self.table.backticked();
        let mut params: Vec<Value> = rows.iter().map(|r| r.0.into()).collect();
        params.extend(rows.iter().flat_map(|r| [r.0.into(), r.1.into()]));
        let pairs = vec!["(?, ?)"; rows.len()].join(", ");
        let mut conn = self.conn().await?;
        conn.exec_drop(
            format!(
                "UPDATE {t} SET state = 1, sent_ms = {NOW}
                 WHERE id IN ({}) AND (id, claim_token) IN ({pairs}) AND state = 0",
                placeholders(rows.len())
            ),
            params,
        )
        .await
        .map_err(|e| my("marking outbox rows sent", e))?;
        Ok(conn.affected_rows())
    }

    pub(crate) async fn mark_failed(&self, f: &Failed) -> Result<u64, OutboxError> {
        let t = self.table.backticked();
        let mut conn = self.conn().await?;
        conn.exec_drop(
            format!(
                "UPDATE {t} SET attempts = attempts + ?, state = ?,
                   available_ms = {NOW} + ?, last_error = ?
                 WHERE id = ? AND claim_token = ? AND state = 0"
            ),
            (
                i32::from(f.counts),
                if f.dead { 2i16 } else { 0 },
                f.delay_ms,
                truncate(&f.error),
                f.id,
                f.token,
            ),
        )
        .await
        .map_err(|e| my("recording a failed publish", e))?;
        Ok(conn.affected_rows())
    }

    pub(crate) async fn stats(&self) -> Result<OutboxStats, OutboxError> {
        let mut conn = self.conn().await?;
        let row: Option<(i64, i64, i64, i64, Option<i64>)> = conn
            .query_first(format!(
                "SELECT CAST(COALESCE(SUM(state = 0), 0) AS SIGNED),
                        CAST(COALESCE(SUM(state = 0 AND attempts > 0), 0) AS SIGNED),
                        CAST(COALESCE(SUM(state = 2), 0) AS SIGNED),
                        CAST(COALESCE(SUM(state = 1), 0) AS SIGNED),
                        {NOW} - MIN(CASE WHEN state = 0 THEN created_ms END)
                 FROM {}",
                self.table.backticked()
            ))
            .await
            .map_err(|e| my("reading outbox stats", e))?;
        let (p, r, d, s, age) = row.unwrap_or_default();
        Ok(OutboxStats {
            pending: p.max(0) as u64,
            retrying: r.max(0) as u64,
            dead: d.max(0) as u64,
            sent: s.max(0) as u64,
            oldest_pending_age_ms: age.map(|a| a.max(0) as u64),
        })
    }

    pub(crate) async fn dead(&self, limit: usize) -> Result<Vec<DeadRow>, OutboxError> {
        let mut conn = self.conn().await?;
        let rows: Vec<DeadTuple> = conn
            .exec(
                format!(
                    "SELECT id, message_id, destination, ordering_key, attempts, last_error, created_ms
                     FROM {} WHERE state = 2 ORDER BY id LIMIT ?",
                    self.table.backticked()
                ),
                (limit as u64,),
            )
            .await
            .map_err(|e| my("listing dead outbox rows", e))?;
        Ok(rows
            .into_iter()
            .map(|r| DeadRow {
                id: r.0,
                message_id: r.1,
                destination: r.2,
                key: r.3,
                attempts: r.4,
                last_error: r.5,
                created_ms: r.6,
            })
            .collect())
    }

    pub(crate) async fn requeue(&self, which: &Requeue) -> Result<u64, OutboxError> {
        let base = format!(
            "UPDATE {} SET state = 0, attempts = 0, available_ms = {NOW} WHERE state = 2",
            self.table.backticked()
        );
        let mut conn = self.conn().await?;
        match which {
            Requeue::AllDead => conn.query_drop(base).await,
            Requeue::Id(id) => conn.exec_drop(format!("{base} AND id = ?"), (*id,)).await,
            Requeue::MessageId(m) => {
                conn.exec_drop(format!("{base} AND message_id = ?"), (m.as_str(),))
                    .await
            }
        }
        .map_err(|e| my("requeueing dead outbox rows", e))?;
        Ok(conn.affected_rows())
    }

    pub(crate) async fn purge_sent(&self, older_ms: i64, limit: usize) -> Result<u64, OutboxError> {
        let mut conn = self.conn().await?;
        conn.exec_drop(
            format!(
                "DELETE FROM {} WHERE state = 1 AND sent_ms < {NOW} - ? ORDER BY sent_ms LIMIT ?",
                self.table.backticked()
            ),
            (older_ms, limit as u64),
        )
        .await
        .map_err(|e| my("deleting old sent outbox rows", e))?;
        Ok(conn.affected_rows())
    }

    pub(crate) async fn close(self) {
        let _ = self.pool.disconnect().await;
    }
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

pub(crate) fn truncate(s: &str) -> String {
    if s.len() <= 2000 {
        return s.to_owned();
    }
    let mut end = 2000;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
