//! Redis Streams: a consumer group reads with `XREADGROUP`, acks with `XACK` only after the
//! record is durable, and claims entries abandoned by dead consumers with `XAUTOCLAIM`.
//!
//! ```sh
//! cargo run -p idem-broker --features redis-streams --example redis_streams
//! ```
//! Uses `IDEM_REDIS_URL` (default `redis://127.0.0.1:6379`) and a SQLite store in the
//! temporary directory. Stops when the deliveries are settled, or on ctrl-c.

use idem::{Attempt, Executor, Namespace};
use idem_broker::redis_streams::{RedisStreamConfig, RedisStreamProducer, RedisStreamSource};
use idem_broker::{Consumer, Message, Outgoing, shutdown_signal};
use idem_sqlite::SqliteStore;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let url =
        std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let stream = "idem-example:signups";
    let source =
        RedisStreamSource::connect(&url, RedisStreamConfig::new(stream, "welcome-mail")).await?;

    let producer = RedisStreamProducer::connect(&url).await?;
    for user in ["ada", "grace"] {
        let signup = Outgoing::new(format!(r#"{{"user": "{user}"}}"#).into_bytes());
        producer.publish(stream, &signup).await?;
        producer.publish(stream, &signup).await?; // Redis keeps both: the store dedups
    }

    let store = SqliteStore::open(std::env::temp_dir().join("idem-example-redis.db"))?;
    let consumer = Consumer::new(
        source,
        Executor::new(store),
        Namespace::new("example-welcome")?,
        |msg: Message, attempt: Attempt| async move {
            println!(
                "mailing {} (key {})",
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
        "{} mailed, {} duplicates replayed",
        report.executed, report.replayed
    );
    Ok(())
}
