//! Helpers shared by the integration tests: the shared server's store, unique names, and a
//! ledger table to write effects into.

#![allow(dead_code, unreachable_pub)]

use idem::Namespace;
use idem_conformance::server;
use idem_mysql::MysqlStore;
use mysql_async::prelude::Queryable;

/// The shared server's URL, or `None` (skip, loudly) outside CI.
pub fn url() -> Option<String> {
    server::url(server::MYSQL)
}

/// A name unique across tests and processes.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:x}_{:x}", std::process::id(), fastrand::u32(..))
}

/// A fresh namespace.
pub fn namespace() -> Namespace {
    Namespace::new(unique("ns")).unwrap()
}

/// A store on `table` with its schema created.
pub async fn store(url: &str, table: &str) -> MysqlStore {
    let store = MysqlStore::builder(url).table(table).build().unwrap();
    store.migrate().await.unwrap();
    store
}

/// A ledger table for effects: one row per applied transfer. Dropped by [`Ledger::drop_table`].
pub struct Ledger {
    pub pool: mysql_async::Pool,
    pub table: String,
}

impl Ledger {
    pub async fn create(url: &str) -> Self {
        let pool = mysql_async::Pool::new(url);
        let table = unique("ledger");
        pool.get_conn()
            .await
            .unwrap()
            .query_drop(format!(
                "CREATE TABLE {table} (transfer VARCHAR(64) NOT NULL, amount INT NOT NULL) \
                 ENGINE = InnoDB"
            ))
            .await
            .unwrap();
        Self { pool, table }
    }

    /// The SQL that applies one effect.
    pub fn insert(&self, transfer: &str) -> String {
        format!(
            "INSERT INTO {} (transfer, amount) VALUES ('{transfer}', 10)",
            self.table
        )
    }

    /// Committed rows for `transfer`.
    pub async fn rows(&self, transfer: &str) -> i64 {
        let n: Option<i64> = self
            .pool
            .get_conn()
            .await
            .unwrap()
            .query_first(format!(
                "SELECT COUNT(*) FROM {} WHERE transfer = '{transfer}'",
                self.table
            ))
            .await
            .unwrap();
        n.unwrap()
    }

    pub async fn drop_table(self) {
        let mut conn = self.pool.get_conn().await.unwrap();
        conn.query_drop(format!("DROP TABLE IF EXISTS {}", self.table))
            .await
            .unwrap();
        drop(conn);
        let _ = self.pool.disconnect().await;
    }
}

/// Drops `table` when dropped (at the end of a test, passed or failed).
pub struct DropTable {
    pub url: String,
    pub table: String,
}

impl Drop for DropTable {
    fn drop(&mut self) {
        on_server(
            &self.url,
            vec![format!("DROP TABLE IF EXISTS `{}`", self.table)],
        );
    }
}

/// Runs `statements` in order on one new connection to `url`, from a thread with a runtime of
/// its own: usable in a `Drop` inside a test's runtime, which cannot block on itself. Errors
/// are ignored (cleanup is best effort).
pub fn on_server(url: &str, statements: Vec<String>) {
    let url = url.to_owned();
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let pool = mysql_async::Pool::new(url.as_str());
            let mut conn = pool.get_conn().await.ok()?;
            for sql in statements {
                conn.query_drop(sql).await.ok()?;
            }
            drop(conn);
            let _ = pool.disconnect().await;
            Some(())
        })
    })
    .join();
}
