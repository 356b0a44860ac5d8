//! The transactional conformance suite against `PostgresStore` on the shared PostgreSQL server.
//! Every check works in a schema of its own (idem's table and an `effects` table), dropped when
//! it ends, so the checks run in parallel without seeing each other's rows.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use idem::TxFuture;
use idem_conformance::TxHarness;
use idem_postgres::{PostgresStore, TxClient};

use common::Db;

/// A store whose connections resolve unqualified names in the check's schema (so that
/// `write_effect`, which has no `self`, finds the check's `effects` table), and the schema's
/// guard, which drops it at the end.
struct Pg {
    store: PostgresStore,
    db: Db,
}

async fn harness() -> Option<Pg> {
    let db = Db::new("idem_tx_conformance").await?;
    let sep = if db.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{sep}options=-c%20search_path%3D{}", db.url, db.schema);
    let store = PostgresStore::builder(url)
        .schema(db.schema.clone())
        .connect()
        .await
        .expect("connect with the check's search path");
    store
        .pool()
        .get()
        .await
        .expect("client")
        .batch_execute(&format!(
            "CREATE TABLE \"{}\".effects (id text NOT NULL)",
            db.schema
        ))
        .await
        .expect("create the effects table");
    Some(Pg { store, db })
}

impl TxHarness for Pg {
    type Store = PostgresStore;

    fn store(&self) -> PostgresStore {
        self.store.clone()
    }

    fn write_effect(tx: &mut TxClient, id: String) -> TxFuture<'_, (), String> {
        Box::pin(async move {
            tx.execute("INSERT INTO effects (id) VALUES ($1)", &[&id])
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }

    async fn effects(&self, id: &str) -> u64 {
        let client = self.db.store.pool().get().await.expect("client");
        let sql = format!(
            "SELECT count(*) FROM \"{}\".effects WHERE id = $1",
            self.db.schema
        );
        let n: i64 = client
            .query_one(&sql, &[&id])
            .await
            .expect("count effects")
            .get(0);
        u64::try_from(n).expect("a count")
    }
}

idem_conformance::transactional_tests!(harness);
