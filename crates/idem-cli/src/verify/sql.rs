//! `verify --store postgres://…` and `mysql://…`: a scratch place on the server for the run's
//! records and ledger (the transactional ledgers themselves are `idem_verify::sql`).
//!
//! A verify run must not touch an application's tables, and must not need `idem migrate`
//! first: it creates its own (a PostgreSQL schema `idem_verify_<run>`, or MySQL tables
//! `idem_verify_<run>_*`) with the stores' own migrations, and drops them when it ends, whatever
//! happened.

use anyhow::Context;
use idem_mysql::MysqlStore;
use idem_postgres::PostgresStore;
use idem_verify::sql::scratch_name;

/// Creates the scratch schema with idem's table in it, and connects to it.
pub(crate) async fn postgres_scratch(url: &str, run_id: &str) -> anyhow::Result<PostgresStore> {
    let builder = PostgresStore::builder(url).schema(scratch_name(run_id));
    builder
        .migrate()
        .await
        .context("creating verify's scratch schema")?;
    Ok(builder.connect().await?)
}

/// Drops the scratch schema and everything in it, on a connection of its own.
pub(crate) async fn drop_postgres_scratch(url: &str, run_id: &str) -> anyhow::Result<()> {
    crate::scratch::drop_postgres_schema(url, &scratch_name(run_id)).await
}

/// Creates the scratch records table, and a store on it.
pub(crate) async fn mysql_scratch(url: &str, run_id: &str) -> anyhow::Result<MysqlStore> {
    let store = MysqlStore::builder(url)
        .table(format!("{}_records", scratch_name(run_id)))
        .build()?;
    store
        .migrate()
        .await
        .context("creating verify's scratch table")?;
    Ok(store)
}

/// Drops every scratch table of the run.
pub(crate) async fn drop_mysql_scratch(store: &MysqlStore, run_id: &str) -> anyhow::Result<()> {
    let base = scratch_name(run_id);
    let tables = ["records", "postings", "effects"].map(|t| format!("{base}_{t}"));
    crate::scratch::drop_mysql_tables(store.pool(), &tables).await
}
