//! MQTT 5: a persistent QoS 1 session with manual acks; the producer carries the message id in
//! the `message-id` user property, and a retry of the same message is replayed, not re-run.
//!
//! ```sh
//! cargo run -p idem-broker --features mqtt --example mqtt
//! ```
//! Uses `IDEM_MQTT_URL` (default `mqtt://127.0.0.1:1883`) and an in-memory store. Stops when
//! the deliveries are settled, or on ctrl-c.

use idem::{Attempt, Executor, MemoryStore, Namespace};
use idem_broker::mqtt::{MqttConfig, MqttProducer, MqttSource};
use idem_broker::{Consumer, Message, Outgoing, shutdown_signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let url = std::env::var("IDEM_MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".to_owned());
    // The session (and so the subscription) outlives this process: start the consumer first.
    let config = MqttConfig::new("idem-example-lights", "idem-example/lights/#");
    let source = MqttSource::connect(&url, config.clone()).await?;

    let producer = MqttProducer::connect(&url).await?;
    let on = Outgoing::new(&b"kitchen: on"[..]);
    producer.publish("idem-example/lights/kitchen", &on).await?;
    producer.publish("idem-example/lights/kitchen", &on).await?; // a retry: same message id
    producer
        .publish(
            "idem-example/lights/hall",
            &Outgoing::new(&b"hall: off"[..]),
        )
        .await?;

    let consumer = Consumer::new(
        source,
        Executor::new(MemoryStore::new()),
        Namespace::new("example-lights")?,
        |msg: Message, _attempt: Attempt| async move {
            println!(
                "switching {} ({})",
                msg.origin(),
                String::from_utf8_lossy(msg.payload())
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
    println!(
        "{} switched, {} duplicates replayed; dead letters wait in session {:?}",
        report.executed,
        report.replayed,
        config.dead_letter_client_id()
    );
    Ok(())
}
