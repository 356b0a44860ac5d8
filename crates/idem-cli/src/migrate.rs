//! `idem migrate`: creates or upgrades a store's schema, on request. Stores never do it when
//! they connect, so that no application creates tables in a database an operator manages.

use anyhow::{Context, bail};
use idem_mysql::MysqlStore;
use idem_postgres::PostgresStore;

use crate::store_url::StoreUrl;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The store: `postgres://USER@HOST/DB` or `mysql://USER@HOST/DB` (SQLite files create
    /// their schema when opened; Redis needs none).
    #[arg(long = "store", value_name = "URL")]
    store: StoreUrl,
    /// Schema of the records table (PostgreSQL; MySQL uses the URL's database).
    #[arg(long, default_value = idem_postgres::DEFAULT_SCHEMA)]
    schema: String,
    /// The records table.
    #[arg(long, default_value = idem_postgres::DEFAULT_TABLE)]
    table: String,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    match &args.store {
        StoreUrl::Postgres(url) => {
            PostgresStore::builder(url.as_str())
                .schema(args.schema.as_str())
                .table(args.table.as_str())
                .migrate()
                .await
                .with_context(|| format!("migrating {}", args.store))?;
            println!(
                "{}: \"{}\".\"{}\" is at idem schema version {}",
                args.store,
                args.schema,
                args.table,
                idem_postgres::SCHEMA_VERSION
            );
            Ok(())
        }
        StoreUrl::Mysql(url) => {
            MysqlStore::builder(url.as_str())
                .table(args.table.as_str())
                .build()
                .with_context(|| format!("opening {}", args.store))?
                .migrate()
                .await
                .with_context(|| format!("migrating {}", args.store))?;
            println!(
                "{}: `{}` is at idem schema version {}",
                args.store,
                args.table,
                idem_mysql::SCHEMA_VERSION
            );
            Ok(())
        }
        other => bail!(
            "{other} has no schema to migrate: SQLite files get theirs when they are opened, \
             Redis and the memory store have none"
        ),
    }
}
