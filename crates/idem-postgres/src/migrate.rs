//! Creating and upgrading the schema, on request only: [`crate::PostgresStoreBuilder::migrate`]
//! (or `idem migrate`). Connecting checks the version and refuses a missing or different one
//! with [`StoreErrorKind::Schema`], so that no application silently creates tables in a
//! database an operator manages.
//!
//! Migrations are `migrations/postgres/NNNN_*.sql`, compiled in. Their version per table is kept
//! in `idem_schema_version` in the table's schema. A migration runs in one transaction under an
//! advisory lock, so several instances migrating at once apply each step once.

use idem::{StoreError, StoreErrorKind};

use crate::error::{MIGRATE_HINT, pg_error};
use crate::sql::Table;

/// The migrations, in order: `(version, sql)`.
const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("../migrations/postgres/0001_records.sql"))];

/// The schema version this code reads and writes.
pub const SCHEMA_VERSION: i32 = 1;

const VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS {schema}.idem_schema_version (
    table_name text PRIMARY KEY,
    version    integer NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// Applies the migrations `table` lacks; returns the version before and after.
pub(crate) async fn migrate(
    client: &mut tokio_postgres::Client,
    table: &Table,
) -> Result<(i32, i32), StoreError> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| pg_error("begin migration", e))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1::text))",
        &[&format!("idem migrate {}", table.qualified())],
    )
    .await
    .map_err(|e| pg_error("lock for migration", e))?;
    tx.batch_execute(&table.render(&format!(
        "CREATE SCHEMA IF NOT EXISTS {{schema}}; {VERSION_TABLE}"
    )))
    .await
    .map_err(|e| pg_error("create the version table", e))?;
    let before = version(&tx, table).await?.unwrap_or(0);
    if before > SCHEMA_VERSION {
        return Err(newer(table, before));
    }
    for (v, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > before) {
        tx.batch_execute(&table.render(sql))
            .await
            .map_err(|e| pg_error("apply a migration", e))?;
        tx.execute(
            &table.render(
                "INSERT INTO {schema}.idem_schema_version (table_name, version) VALUES ($1, $2)
                 ON CONFLICT (table_name) DO UPDATE SET version = $2, applied_at = now()",
            ),
            &[&table.name(), v],
        )
        .await
        .map_err(|e| pg_error("record the schema version", e))?;
    }
    tx.commit()
        .await
        .map_err(|e| pg_error("commit migration", e))?;
    Ok((before, SCHEMA_VERSION))
}

async fn version(
    client: &impl tokio_postgres::GenericClient,
    table: &Table,
) -> Result<Option<i32>, StoreError> {
    let row = client
        .query_opt(
            &table.render("SELECT version FROM {schema}.idem_schema_version WHERE table_name = $1"),
            &[&table.name()],
        )
        .await
        .map_err(|e| pg_error("read the schema version", e))?;
    row.map(|r| r.try_get(0))
        .transpose()
        .map_err(|e| pg_error("read the schema version", e))
}

fn newer(table: &Table, found: i32) -> StoreError {
    StoreError::new(
        StoreErrorKind::Schema,
        format!(
            "{} has idem schema version {found}, written by a newer idem; this one reads \
             version {SCHEMA_VERSION}",
            table.qualified()
        ),
    )
}

/// Checks that `table` exists at this code's version; never changes anything.
pub(crate) async fn check(
    client: &impl tokio_postgres::GenericClient,
    table: &Table,
) -> Result<(), StoreError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass($1::text) IS NOT NULL AND to_regclass($2::text) IS NOT NULL",
            &[
                &format!("\"{}\".idem_schema_version", table.schema()),
                &table.qualified(),
            ],
        )
        .await
        .and_then(|r| r.try_get(0))
        .map_err(|e| pg_error("look for the idem schema", e))?;
    let found = if exists {
        version(client, table).await?
    } else {
        None
    };
    match found {
        Some(SCHEMA_VERSION) => Ok(()),
        Some(v) if v > SCHEMA_VERSION => Err(newer(table, v)),
        Some(v) => Err(StoreError::new(
            StoreErrorKind::Schema,
            format!(
                "{} has idem schema version {v}, this idem needs {SCHEMA_VERSION}: {MIGRATE_HINT}",
                table.qualified()
            ),
        )),
        None => Err(StoreError::new(
            StoreErrorKind::Schema,
            format!("no idem table {}: {MIGRATE_HINT}", table.qualified()),
        )),
    }
}
