//! `idem migrate`: creates or upgrades a store's schema, on request. Stores never do it when
//! they connect, so that no application creates tables in a database an operator manages.
//!
//! Only PostgreSQL and MySQL have a schema to migrate. On the others `migrate` succeeds
//! without doing anything and says why, so that one deployment script runs on every store:
//! a SQLite store creates or upgrades its table when it opens its file, Redis and the memory
//! store keep no schema.

use anyhow::Context;
use idem_mysql::MysqlStore;
use idem_postgres::PostgresStore;

use crate::store_url::{StoreArgs, StoreUrl};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    store: StoreArgs,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let StoreArgs { store, location } = &args.store;
    location.check(store)?;
    match store {
        StoreUrl::Postgres(url) => {
            let (schema, table) = location.postgres();
            PostgresStore::builder(url.as_str())
                .schema(schema)
                .table(table)
                .migrate()
                .await
                .with_context(|| format!("migrating {store}"))?;
            println!(
                "{store}: \"{schema}\".\"{table}\" is at idem schema version {}",
                idem_postgres::SCHEMA_VERSION
            );
        }
        StoreUrl::Mysql(url) => {
            let table = location.mysql();
            MysqlStore::builder(url.as_str())
                .table(table)
                .build()
                .with_context(|| format!("opening {store}"))?
                .migrate()
                .await
                .with_context(|| format!("migrating {store}"))?;
            println!(
                "{store}: `{table}` is at idem schema version {}",
                idem_mysql::SCHEMA_VERSION
            );
        }
        StoreUrl::Sqlite(_) => println!(
            "{store}: nothing to migrate: a SQLite store creates or upgrades its table when it \
             opens the file"
        ),
        StoreUrl::Redis(_) => println!("{store}: nothing to migrate: Redis keeps no schema"),
        StoreUrl::Memory => {
            println!("{store}: nothing to migrate: the memory store keeps no schema");
        }
    }
    Ok(())
}
