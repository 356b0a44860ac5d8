//! Transactional mode inside a sqlx transaction (feature `sqlx`): for services that already
//! talk to PostgreSQL through sqlx.
//!
//! [`run_in_transaction`] takes the connection of the caller's open transaction
//! (`&mut *tx` for a `sqlx::Transaction<'_, Postgres>`), claims the key there, runs the handler
//! in a savepoint and writes the final record in the same transaction; the caller commits.
//! Semantics are those of [`crate::run_in_transaction`]: commit = effect + record, rollback or
//! crash = neither, and a concurrent duplicate blocks on the key and then replays.

use std::fmt;

use idem::policy::Step;
use idem::{
    Config, Error, Fingerprint, Key, Outcome, StoreError, StoreErrorKind, Stored, TxFuture,
};
use sqlx_core::connection::Connection;
use sqlx_core::row::Row;
use sqlx_core::sql_str::AssertSqlSafe;
use sqlx_postgres::{PgConnection, PgRow, Postgres};

use crate::error::kind_of_sqlstate;
use crate::exec::{ClaimArgs, ClaimRow, CompleteArgs, Exec, FencedArgs, claim_row};
use crate::sql::Table;
use crate::tx;

/// Runs `handler` exactly once per key inside the caller's open sqlx transaction, whose
/// connection is `conn` (`&mut *tx`).
///
/// The caller commits whatever the outcome (a failed attempt's record counts only if
/// committed) and rolls back on `Err`. See [`crate::run_in_transaction`] for the outcomes.
///
/// ```no_run
/// # async fn demo(mut tx: sqlx_core::transaction::Transaction<'_, sqlx_postgres::Postgres>)
/// # -> Result<(), Box<dyn std::error::Error>> {
/// use idem::{Config, Fingerprint, Namespace};
/// let table = idem_postgres::Table::default();
/// let key = Namespace::new("ledger")?.key("transfer-1")?;
/// let outcome = idem_postgres::sqlx::run_in_transaction(
///     &mut tx, &table, &key, Fingerprint::of(b"10"), &Config::default(), 64 * 1024,
///     |conn| Box::pin(async move {
///         sqlx_core::query::query("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
///             .execute(&mut *conn)
///             .await
///             .map(drop)
///     }),
/// ).await?;
/// tx.commit().await?;
/// # let _ = outcome; Ok(()) }
/// ```
///
/// # Errors
/// [`StoreErrorKind::Config`] if `conn` is not inside a transaction; otherwise as
/// [`crate::run_in_transaction`]. On any error the caller must roll back.
pub async fn run_in_transaction<T, E, F>(
    conn: &mut PgConnection,
    table: &Table,
    key: &Key,
    fingerprint: Fingerprint,
    config: &Config,
    max_result_bytes: usize,
    handler: F,
) -> Result<Outcome<T, E>, Error>
where
    T: Stored,
    E: fmt::Display,
    F: for<'c> FnOnce(&'c mut PgConnection) -> TxFuture<'c, T, E>,
{
    if !conn.is_in_transaction() {
        return Err(StoreError::new(
            StoreErrorKind::Config,
            "idem_postgres::sqlx::run_in_transaction needs a connection inside a transaction \
             (conn.begin())",
        )
        .into());
    }
    let st = table.sql();
    let outcome = match tx::begin(&mut Sx(conn), st, key, fingerprint, config).await? {
        Step::Done(outcome) => outcome,
        Step::Run(lease) => {
            Sx(conn).simple(tx::SAVEPOINT).await?;
            let result = handler(conn).await;
            tx::finish(
                &mut Sx(conn),
                st,
                key,
                &lease,
                config,
                max_result_bytes,
                result,
            )
            .await?
        }
    };
    tx::count(config, std::slice::from_ref(&outcome));
    Ok(outcome)
}

/// A sqlx connection as an [`Exec`].
struct Sx<'a>(&'a mut PgConnection);

fn sqlx_error(context: &str, e: sqlx_core::error::Error) -> StoreError {
    use sqlx_core::error::Error as X;
    let (kind, detail) = match &e {
        X::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            (
                kind_of_sqlstate(&code),
                format!("{} (SQLSTATE {code})", db.message()),
            )
        }
        X::Io(_) | X::Tls(_) | X::Protocol(_) | X::PoolTimedOut | X::PoolClosed => {
            (StoreErrorKind::Unavailable, e.to_string())
        }
        _ => (StoreErrorKind::Backend, e.to_string()),
    };
    StoreError::new(kind, format!("postgres (sqlx) {context}: {detail}")).with_source(e)
}

fn get<'r, T>(row: &'r PgRow, i: usize) -> Result<T, StoreError>
where
    T: sqlx_core::decode::Decode<'r, Postgres> + sqlx_core::types::Type<Postgres>,
{
    row.try_get(i).map_err(|e| sqlx_error("decode a row", e))
}

type Query<'q> = sqlx_core::query::Query<'q, Postgres, sqlx_postgres::PgArguments>;

fn query(sql: &str) -> Query<'_> {
    sqlx_core::query::query(AssertSqlSafe(sql.to_owned()))
}

fn bind_claim<'q>(q: Query<'q>, a: &'q ClaimArgs<'_>) -> Query<'q> {
    q.bind(&a.namespaces[..])
        .bind(&a.ids[..])
        .bind(&a.fingerprints[..])
        .bind(&a.tokens[..])
        .bind(&a.owners[..])
        .bind(&a.lease_ms[..])
        .bind(&a.retention_ms[..])
        .bind(&a.max_attempts[..])
}

impl Exec for Sx<'_> {
    async fn claim_rows(
        &mut self,
        sql: &str,
        a: &ClaimArgs<'_>,
    ) -> Result<Vec<ClaimRow>, StoreError> {
        let rows = bind_claim(query(sql), a)
            .fetch_all(&mut *self.0)
            .await
            .map_err(|e| sqlx_error("claim", e))?;
        rows.iter().map(|r| claim_row!(get, r)).collect()
    }

    async fn inserted_rows(
        &mut self,
        sql: &str,
        a: &ClaimArgs<'_>,
    ) -> Result<Vec<(String, i64, i64)>, StoreError> {
        let rows = bind_claim(query(sql), a)
            .fetch_all(&mut *self.0)
            .await
            .map_err(|e| sqlx_error("claim", e))?;
        rows.iter()
            .map(|r| Ok((get(r, 0)?, get(r, 1)?, get(r, 2)?)))
            .collect()
    }

    async fn complete_rows(&mut self, sql: &str, a: &CompleteArgs) -> Result<Vec<i16>, StoreError> {
        let rows = query(sql)
            .bind(&a.namespaces[..])
            .bind(&a.ids[..])
            .bind(&a.tokens[..])
            .bind(&a.results[..])
            .bind(&a.retention_ms[..])
            .fetch_all(&mut *self.0)
            .await
            .map_err(|e| sqlx_error("complete", e))?;
        rows.iter().map(|r| get(r, 0)).collect()
    }

    async fn fenced(&mut self, sql: &str, a: &FencedArgs<'_>) -> Result<i16, StoreError> {
        let row = query(sql)
            .bind(a.namespace)
            .bind(a.id)
            .bind(a.token)
            .bind(a.bytes)
            .bind(a.ms)
            .fetch_one(&mut *self.0)
            .await
            .map_err(|e| sqlx_error("write", e))?;
        get(&row, 0)
    }

    async fn simple(&mut self, sql: &str) -> Result<(), StoreError> {
        sqlx_core::raw_sql::raw_sql(AssertSqlSafe(sql.to_owned()))
            .execute(&mut *self.0)
            .await
            .map(drop)
            .map_err(|e| sqlx_error("savepoint", e))
    }
}
