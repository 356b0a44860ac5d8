//! RabbitMQ: publish three orders (one of them twice, as a producer retry after a lost confirm
//! would), consume them through idem, and charge each order once.
//!
//! ```sh
//! cargo run -p idem-broker --features amqp --example amqp
//! ```
//! Uses `IDEM_AMQP_URL` (default the local broker, guest/guest) and a SQLite store in the
//! temporary directory. Stops when the four deliveries are settled, or on ctrl-c.

use idem::{Attempt, Executor, Namespace};
use idem_broker::amqp::{AmqpConfig, AmqpProducer, AmqpSource};
use idem_broker::{Consumer, Message, Outgoing, shutdown_signal};
use idem_sqlite::SqliteStore;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let url = std::env::var("IDEM_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let queue = "idem-example-orders";
    // Declares the quorum queue and its dead-letter exchange and queue.
    let source = AmqpSource::connect(&url, AmqpConfig::new(queue)).await?;

    let producer = AmqpProducer::connect(&url).await?;
    for item in ["coffee", "tea", "cake"] {
        let order = Outgoing::new(format!(r#"{{"item": "{item}"}}"#).into_bytes());
        producer.publish("", queue, &order).await?;
        if item == "tea" {
            producer.publish("", queue, &order).await?; // the retry: same message id
        }
    }

    let store = SqliteStore::open(std::env::temp_dir().join("idem-example-amqp.db"))?;
    let consumer = Consumer::new(
        source,
        Executor::new(store),
        Namespace::new("example-billing")?,
        |msg: Message, attempt: Attempt| async move {
            println!(
                "charging {} (idempotency key {})",
                String::from_utf8_lossy(msg.payload()),
                attempt.idempotency_key()
            );
            Ok::<_, std::io::Error>(())
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
        "{} charged, {} duplicates replayed, {} acked",
        report.executed, report.replayed, report.acked
    );
    Ok(())
}
