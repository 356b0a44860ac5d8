//! Transactional mode, RabbitMQ into SQLite: each payment message marks its order paid in the
//! same transaction that records the message, so a crash anywhere leaves both or neither.
//!
//! ```sh
//! cargo run -p idem-broker --features amqp --example transactional_sqlite
//! ```
//! Publishes three payments (one of them twice, as a producer retry would, and one for an order
//! that was cancelled meanwhile), consumes them, and prints the orders. The update is also
//! guarded by the order's state machine (only a pending order can become paid): a payment for a
//! cancelled order is recorded as stale and acked, not retried or dead-lettered.
//! Uses `IDEM_AMQP_URL` (default the local broker) and a SQLite file in the temporary directory.

use idem::conditional::{Guarded, guard};
use idem::{Config, Namespace};
use idem_broker::amqp::{AmqpConfig, AmqpProducer, AmqpSource};
use idem_broker::{Consumer, Message, Outgoing, shutdown_signal};
use idem_sqlite::SqliteStore;
use rusqlite::{Connection, OptionalExtension};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let url = std::env::var("IDEM_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let queue = "idem-example-payments";
    let path = std::env::temp_dir().join(format!("idem-example-tx-{}.db", std::process::id()));
    Connection::open(&path)?.execute_batch(
        "CREATE TABLE orders (id TEXT PRIMARY KEY, state TEXT NOT NULL);
         INSERT INTO orders VALUES ('o-1', 'pending'), ('o-2', 'pending'), ('o-3', 'cancelled');",
    )?;
    let store = SqliteStore::open(&path)?;

    let source = AmqpSource::connect(&url, AmqpConfig::new(queue)).await?;
    let producer = AmqpProducer::connect(&url).await?;
    for order in ["o-1", "o-2", "o-3"] {
        let payment = Outgoing::new(order.as_bytes().to_vec());
        producer.publish("", queue, &payment).await?;
        if order == "o-2" {
            producer.publish("", queue, &payment).await?; // the retry: same message id
        }
    }

    // The whole consumer: the handler's writes commit with idem's record, then the ack.
    let consumer = Consumer::transactional(
        source,
        store,
        Config::default(),
        Namespace::new("example-payments")?,
        |msg: &Message, conn: &mut Connection| {
            let order = String::from_utf8_lossy(msg.payload()).into_owned();
            Box::pin(async move {
                let n = conn.execute(
                    "UPDATE orders SET state = 'paid' WHERE id = ?1 AND state = 'pending'",
                    [&order],
                )?;
                let now: Option<String> = conn
                    .query_row("SELECT state FROM orders WHERE id = ?1", [&order], |r| {
                        r.get(0)
                    })
                    .optional()?;
                let outcome = guard(n as u64, now, |state| state == "paid");
                println!("payment for {order}: {outcome}");
                Ok::<Guarded, rusqlite::Error>(outcome)
            })
        },
    );

    let stats = consumer.stats();
    let settled = async {
        while stats.snapshot().acked < 4 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    let report = consumer
        .run(async {
            tokio::select! {
                () = settled => {}
                () = shutdown_signal() => {}
            }
        })
        .await?;
    println!(
        "{} processed, {} duplicates replayed, {} acked",
        report.executed, report.replayed, report.acked
    );
    let conn = Connection::open(&path)?;
    let mut st = conn.prepare("SELECT id, state FROM orders ORDER BY id")?;
    for row in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
        let (id, state) = row?;
        println!("{id}: {state}");
    }
    drop(st);
    drop(conn);
    let _ = std::fs::remove_file(&path);
    Ok(())
}
