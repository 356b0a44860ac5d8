//! NATS JetStream: publish readings with `Nats-Msg-Id`; a retry inside the duplicate window is
//! dropped by the server, and the consumer applies each reading once.
//!
//! ```sh
//! cargo run -p idem-broker --features nats --example nats
//! ```
//! Uses `IDEM_NATS_URL` (default `nats://127.0.0.1:4222`, JetStream on) and an in-memory store.
//! Stops when the three readings are settled, or on ctrl-c.

use idem::{Attempt, Executor, MemoryStore, Namespace};
use idem_broker::nats::{NatsConfig, NatsProducer, NatsSource};
use idem_broker::{Consumer, Message, Outgoing, shutdown_signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let url = std::env::var("IDEM_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    // Declares the stream, its dead-letter stream and the durable pull consumer.
    let source = NatsSource::connect(
        &url,
        NatsConfig::new("IDEM_EXAMPLE", "idem-example.>", "thermostat"),
    )
    .await?;

    let producer = NatsProducer::connect(&url).await?;
    for celsius in [19, 21, 23] {
        let reading = Outgoing::new(format!(r#"{{"celsius": {celsius}}}"#).into_bytes());
        producer.publish("idem-example.readings", &reading).await?;
        let again = producer.publish("idem-example.readings", &reading).await?;
        println!(
            "retry of reading {celsius} dropped by JetStream: {}",
            again.duplicate
        );
    }

    let consumer = Consumer::new(
        source,
        Executor::new(MemoryStore::new()),
        Namespace::new("example-thermostat")?,
        |msg: Message, attempt: Attempt| async move {
            println!(
                "recording {} (delivery {}, key {})",
                String::from_utf8_lossy(msg.payload()),
                msg.delivery_count(),
                attempt.idempotency_key()
            );
            Ok::<_, std::io::Error>(())
        },
    );
    let stats = consumer.stats();
    let settled = async {
        while stats.snapshot().acked < 3 {
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
    println!("{} recorded, {} acked", report.executed, report.acked);
    Ok(())
}
