//! Helpers shared by the integration tests: a private schema per test on the shared server.

#![allow(dead_code, unreachable_pub)]

use idem_conformance::server;
use idem_postgres::PostgresStore;

/// A schema of its own on the shared server, with idem's table and a `ledger` table for the
/// handlers' effects; dropped when the test ends, passed or failed.
pub struct Db {
    pub url: String,
    pub schema: String,
    pub store: PostgresStore,
    /// Whether dropping this drops the schema (not in a crash test's child process).
    owned: bool,
}

impl Db {
    /// `None` (skip, loudly) when the server is missing outside CI.
    pub async fn new(prefix: &str) -> Option<Self> {
        let url = server::url(server::POSTGRES)?;
        let schema = format!(
            "{prefix}_{:x}_{:08x}",
            std::process::id(),
            fastrand::u32(..)
        );
        let mut db = Self::in_schema(url, schema).await;
        db.owned = true;
        Some(db)
    }

    /// Attaches to an existing schema (a child process of a crash test).
    pub async fn in_schema(url: String, schema: String) -> Self {
        let builder = PostgresStore::builder(url.clone()).schema(schema.clone());
        builder.migrate().await.expect("migrate");
        let store = builder.connect().await.expect("connect");
        let client = store.pool().get().await.expect("client");
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS \"{schema}\".ledger (
                     transfer text NOT NULL, amount int NOT NULL);
                 CREATE TABLE IF NOT EXISTS \"{schema}\".accounts (
                     id int PRIMARY KEY, balance int NOT NULL);
                 INSERT INTO \"{schema}\".accounts VALUES (1, 100), (2, 0)
                     ON CONFLICT DO NOTHING;"
            ))
            .await
            .expect("create ledger");
        Self {
            url,
            schema,
            store,
            owned: false,
        }
    }

    pub fn ledger(&self) -> String {
        format!("\"{}\".ledger", self.schema)
    }

    pub fn accounts(&self) -> String {
        format!("\"{}\".accounts", self.schema)
    }

    pub async fn ledger_rows(&self) -> i64 {
        let client = self.store.pool().get().await.expect("client");
        client
            .query_one(&format!("SELECT count(*) FROM {}", self.ledger()), &[])
            .await
            .expect("count")
            .get(0)
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        // Drop runs inside the test's runtime, which cannot block on itself: clean up from a
        // thread with a runtime of its own.
        let (url, schema) = (self.url.clone(), self.schema.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .ok()?;
                tokio::spawn(conn);
                client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}
