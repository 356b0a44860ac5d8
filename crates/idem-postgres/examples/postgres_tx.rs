//! Transactional mode: a ledger entry and idem's record commit in one transaction, so a message
//! delivered twice moves the money once.
//!
//! ```text
//! cargo run -p idem-postgres --example postgres_tx
//! ```
//!
//! Uses `IDEM_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`); it creates a
//! schema `idem_example`, and leaves it for you to look at.

use idem::{Config, Fingerprint, Namespace, Transactional};
use idem_postgres::PostgresStore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let builder = PostgresStore::builder(url).schema("idem_example");
    builder.migrate().await?;
    let store = builder.connect().await?;
    store
        .pool()
        .get()
        .await?
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS idem_example.ledger (
                 transfer text NOT NULL, account text NOT NULL, amount int8 NOT NULL)",
        )
        .await?;

    // One message, delivered twice (an at-least-once broker redelivers after a lost ack).
    let (transfer, payload) = (format!("transfer-{}", std::process::id()), b"alice->bob:10");
    let key = Namespace::new("payments")?.key(&transfer)?;
    for delivery in 1..=2 {
        let transfer = transfer.clone();
        let outcome = store
            .run_transactional(&key, Fingerprint::of(payload), &Config::default(), |tx| {
                Box::pin(async move {
                    // The effect: both legs of the transfer, in idem's transaction.
                    let insert = "INSERT INTO idem_example.ledger VALUES ($1, $2, $3)";
                    tx.execute(insert, &[&transfer, &"alice", &-10i64]).await?;
                    tx.execute(insert, &[&transfer, &"bob", &10i64]).await?;
                    Ok::<_, tokio_postgres::Error>(format!("{transfer} booked"))
                })
            })
            .await?;
        let kind = outcome.kind();
        println!("delivery {delivery}: {kind}: {:?}", outcome.into_value());
    }

    let rows: i64 = store
        .pool()
        .get()
        .await?
        .query_one(
            "SELECT count(*) FROM idem_example.ledger WHERE transfer = $1",
            &[&transfer],
        )
        .await?
        .get(0);
    println!("ledger rows for {transfer}: {rows} (one transfer, two legs)");
    assert_eq!(rows, 2);
    Ok(())
}
