//! Scratch space on a shared SQL server: `bench` and `verify` create their tables under a name
//! of the run's own and drop them when they end, whatever happened, so they never touch an
//! application's tables.

use anyhow::Context;
use mysql_async::prelude::Queryable;

/// Drops a PostgreSQL schema and everything in it, on a connection of its own.
pub(crate) async fn drop_postgres_schema(url: &str, schema: &str) -> anyhow::Result<()> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let task = tokio::spawn(conn);
    let dropped = client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await;
    drop(client);
    let _ = task.await;
    dropped.with_context(|| format!("dropping the scratch schema {schema}"))
}

/// Drops MySQL tables; tries every one and reports the first failure.
pub(crate) async fn drop_mysql_tables(
    pool: &mysql_async::Pool,
    tables: &[String],
) -> anyhow::Result<()> {
    let mut result = Ok(());
    for table in tables {
        let dropped = async {
            pool.get_conn()
                .await?
                .query_drop(format!("DROP TABLE IF EXISTS `{table}`"))
                .await
        }
        .await;
        if let Err(e) = dropped {
            if result.is_ok() {
                result = Err(e).with_context(|| format!("dropping the scratch table {table}"));
            }
        }
    }
    result
}
