//! Transactional mode, RabbitMQ into PostgreSQL, with a versioned balance: each deposit carries
//! the account version it was decided against, and applies only if the account is still there
//! (`WHERE version = $3`). idem's record commits in the same transaction, then the ack.
//!
//! ```sh
//! cargo run -p idem-broker --features amqp --example transactional_postgres
//! ```
//! Publishes three deposits: one twice (a producer retry: replayed, not applied again), and one
//! decided against a version the account has since left (stale: recorded and acked, never
//! retried or dead-lettered). Uses `IDEM_AMQP_URL` and `IDEM_POSTGRES_URL` (defaults: the local
//! servers) and a schema `idem_example_balance`, dropped at the end.

use idem::conditional::{Guarded, guard};
use idem::{Config, Namespace};
use idem_broker::amqp::{AmqpConfig, AmqpProducer, AmqpSource};
use idem_broker::{Consumer, Message, Outgoing, shutdown_signal};
use idem_postgres::{PostgresStore, TxClient};

const SCHEMA: &str = "idem_example_balance";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let amqp = std::env::var("IDEM_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let pg = std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let builder = PostgresStore::builder(pg.as_str()).schema(SCHEMA);
    builder.migrate().await?;
    let store = builder.connect().await?;
    let admin = store.pool().get().await?;
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {SCHEMA}.accounts;
             CREATE TABLE {SCHEMA}.accounts (id text PRIMARY KEY, balance int8, version int8);
             INSERT INTO {SCHEMA}.accounts VALUES ('alice', 0, 0);"
        ))
        .await?;

    let queue = "idem-example-deposits";
    let source = AmqpSource::connect(&amqp, AmqpConfig::new(queue)).await?;
    let producer = AmqpProducer::connect(&amqp).await?;
    // "alice +100 at version 0", twice; "+50 at version 1"; "+70 at version 0" (stale).
    for (amount, version, copies) in [(100, 0, 2), (50, 1, 1), (70, 0, 1)] {
        let deposit = Outgoing::new(format!("alice {amount} {version}").into_bytes());
        for _ in 0..copies {
            producer.publish("", queue, &deposit).await?;
        }
    }

    let consumer = Consumer::transactional(
        source,
        store,
        Config::default(),
        Namespace::new("example-deposits")?,
        |msg: &Message, tx: &mut TxClient| {
            let body = String::from_utf8_lossy(msg.payload()).into_owned();
            Box::pin(async move {
                let mut words = body.split(' ');
                let account = words.next().unwrap_or_default().to_owned();
                let amount: i64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                let version: i64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(-1);
                let matched = tx
                    .execute(
                        &format!(
                            "UPDATE {SCHEMA}.accounts SET balance = balance + $2, \
                             version = version + 1 WHERE id = $1 AND version = $3"
                        ),
                        &[&account, &amount, &version],
                    )
                    .await?;
                let now: Option<i64> = if matched == 0 {
                    let sql = format!("SELECT version FROM {SCHEMA}.accounts WHERE id = $1");
                    tx.query_opt(&sql, &[&account]).await?.map(|r| r.get(0))
                } else {
                    None
                };
                // The deposit would have made it version + 1; any other version is stale.
                let outcome = guard(matched, now, |v| *v == version + 1);
                println!("{body}: {outcome}");
                Ok::<Guarded, tokio_postgres::Error>(outcome)
            })
        },
    )
    // One batch at a time keeps the queue's order, which versioned updates depend on.
    .concurrency(1);
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
    let row = admin
        .query_one(
            &format!("SELECT balance, version FROM {SCHEMA}.accounts WHERE id = 'alice'"),
            &[],
        )
        .await?;
    let (balance, version): (i64, i64) = (row.get(0), row.get(1));
    println!("alice: balance {balance}, version {version}");
    anyhow::ensure!(balance == 150, "expected 150, got {balance}");
    admin
        .batch_execute(&format!("DROP SCHEMA {SCHEMA} CASCADE"))
        .await?;
    Ok(())
}
