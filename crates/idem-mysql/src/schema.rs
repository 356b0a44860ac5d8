//! Versioned schema: the migrations in `migrations/mysql/`, applied only when asked
//! ([`MysqlStore::migrate`](crate::MysqlStore::migrate)), never on connect.
//!
//! One shared table, `idem_schema`, holds the version of every idem records table in the
//! database (a database may hold several, one per configured table name).

use std::fmt::Write as _;

use idem::{StoreError, StoreErrorKind};
use mysql_async::Conn;
use mysql_async::prelude::Queryable;

use crate::error::{code, server_code, store_error};
use crate::exec::{self, script};
use crate::sql::{Table, hex};

/// The migrations, in order: (version, SQL with `idem_records` for the table name).
const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("../migrations/mysql/0001_records.sql"))];

/// The schema version this code reads and writes (recorded in the `idem_schema` table).
pub const SCHEMA_VERSION: i64 = 1;

const VERSIONS: &str = "CREATE TABLE IF NOT EXISTS idem_schema (\
                        table_name VARBINARY(64) NOT NULL PRIMARY KEY, \
                        version INT NOT NULL) ENGINE = InnoDB";

fn version_query(table: &Table) -> String {
    let mut sql = String::from("SELECT version FROM idem_schema WHERE table_name = ");
    hex(&mut sql, table.name().as_bytes());
    sql
}

/// The version recorded for `table`, `None` if there is none (or no `idem_schema` at all).
async fn version(conn: &mut Conn, table: &Table) -> Result<Option<i64>, StoreError> {
    let s = script(conn, &version_query(table)).await;
    match s.error {
        Some(e) if server_code(&e) == Some(code::NO_SUCH_TABLE) => Ok(None),
        Some(e) => Err(store_error("read schema version", table.name(), e)),
        None => {
            let mut done = s.done;
            if done.first().is_none_or(|d| d.rows.is_empty()) {
                return Ok(None);
            }
            exec::scalar_i64(done.first_mut(), "schema version").map(Some)
        }
    }
}

/// Checks that `table` has the schema this code expects.
pub(crate) async fn check(conn: &mut Conn, table: &Table) -> Result<(), StoreError> {
    match version(conn, table).await? {
        Some(SCHEMA_VERSION) => Ok(()),
        None => Err(StoreError::new(
            StoreErrorKind::Schema,
            format!(
                "no idem schema for table `{}` in this database; create it with \
                 MysqlStore::migrate()",
                table.name()
            ),
        )),
        Some(v) if v < SCHEMA_VERSION => Err(StoreError::new(
            StoreErrorKind::Schema,
            format!(
                "idem table `{}` has schema version {v}, this idem needs {SCHEMA_VERSION}; \
                 upgrade it with MysqlStore::migrate()",
                table.name()
            ),
        )),
        Some(v) => Err(StoreError::new(
            StoreErrorKind::Schema,
            format!(
                "idem table `{}` has schema version {v}, newer than this idem \
                 ({SCHEMA_VERSION}); upgrade idem",
                table.name()
            ),
        )),
    }
}

/// Applies the migrations `table` lacks. Concurrent calls are serialized by a named server
/// lock; each migration is idempotent (`IF NOT EXISTS`) in case a call died half-way.
pub(crate) async fn migrate(conn: &mut Conn, table: &Table) -> Result<(), StoreError> {
    let err = |context: &str, e| store_error(context, table.name(), e);
    // The table name is a checked identifier, so it can be part of a string literal.
    let lock = format!("'idem_migrate_{}'", table.name());
    let mut done = script(conn, &format!("SELECT GET_LOCK({lock}, 30)"))
        .await
        .ok()
        .map_err(|e| err("take the migration lock", e))?;
    if exec::scalar_i64(done.first_mut(), "lock").ok() != Some(1) {
        return Err(StoreError::new(
            StoreErrorKind::Busy,
            format!(
                "another idem migration of `{}` held its lock for 30 s",
                table.name()
            ),
        ));
    }
    let result = apply(conn, table).await;
    let released = conn
        .query_drop(format!("DO RELEASE_LOCK({lock})"))
        .await
        .map_err(|e| err("release the migration lock", e));
    result.and(released)
}

async fn apply(conn: &mut Conn, table: &Table) -> Result<(), StoreError> {
    let err = |context: &str, e| store_error(context, table.name(), e);
    conn.query_drop(VERSIONS)
        .await
        .map_err(|e| err("create idem_schema", e))?;
    let current = version(conn, table).await?.unwrap_or(0);
    if current > SCHEMA_VERSION {
        return check(conn, table).await;
    }
    for &(v, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let sql = sql.replace("idem_records", table.name());
        script(conn, &sql)
            .await
            .ok()
            .map_err(|e| err("apply migration", e))?;
        let mut record = String::from("INSERT INTO idem_schema (table_name, version) VALUES (");
        hex(&mut record, table.name().as_bytes());
        let _ = write!(record, ", {v}) ON DUPLICATE KEY UPDATE version = {v}");
        conn.query_drop(record)
            .await
            .map_err(|e| err("record schema version", e))?;
    }
    Ok(())
}
