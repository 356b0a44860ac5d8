//! Relay benchmark on PostgreSQL into RabbitMQ, against the relay most teams hand-write, in
//! the same run, on the same table, queue and producer:
//!
//! - **hand-written, sequential**: `SELECT ... WHERE state = 0 ORDER BY id LIMIT n`, publish
//!   each row and wait for its confirm, then one `UPDATE ... SET state = 1` for the batch;
//! - **hand-written, pipelined**: the same, with the batch's publishes in flight together
//!   (confirms awaited together);
//! - **idem relay**: [`idem_outbox::Relay`] (claim with a lease and a token in one statement,
//!   publishes in flight together, fenced mark), without and with ordering keys.
//!
//! Then the commit-to-publish latency with LISTEN/NOTIFY: an idle relay (poll interval 10 s, so
//! only the notification wakes it), one message per transaction; from the moment `COMMIT` is
//! sent to the broker's confirmation (seen by the relay's observer): median, p90, p99, max.
//!
//! ```sh
//! cargo run --release -p idem-outbox --example bench_relay -- [MESSAGES=20000] [BATCH=128] [ROUNDS=3] [LATENCY_SAMPLES=300]
//! ```
//! Uses `IDEM_POSTGRES_URL` and `IDEM_AMQP_URL` (defaults: the local servers); creates and
//! drops its own table and (classic, durable) queue.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_broker::{AnyProducer, BrokerUrl, Outgoing};
use idem_outbox::{DbUrl, NewMessage, OutboxDb, Relay, RelayConfig, RelayEvent, Table};
use tokio_postgres::NoTls;

struct Bench {
    pg: tokio_postgres::Client,
    table: Table,
    queue: String,
    amqp: String,
    db_url: DbUrl,
    db: OutboxDb,
    producer: Arc<AnyProducer>,
    channel: lapin::Channel,
}

impl Bench {
    fn t(&self) -> String {
        format!("\"{}\"", self.table.name())
    }

    async fn fill(&self, n: usize, keys: usize, round: usize) {
        self.pg
            .batch_execute(&format!("TRUNCATE {}", self.t()))
            .await
            .unwrap();
        let key = if keys == 0 {
            "NULL".to_owned()
        } else {
            format!("'k' || (g % {keys})")
        };
        self.pg
            .execute(
                &format!(
                    "INSERT INTO {} (message_id, destination, ordering_key, payload, created_ms, available_ms)
                     SELECT 'bench-{round}-' || g, $1, {key}, convert_to(repeat('x', 256), 'UTF8'), 0, 0
                     FROM generate_series(1, $2::int) g",
                    self.t()
                ),
                &[&self.queue, &(n as i32)],
            )
            .await
            .unwrap();
        self.pg
            .batch_execute(&format!("VACUUM ANALYZE {}", self.t()))
            .await
            .unwrap();
        self.channel
            .queue_purge(self.queue.as_str().into(), Default::default())
            .await
            .unwrap();
    }

    async fn pending(&self) -> i64 {
        self.pg
            .query_one(
                &format!("SELECT count(*) FROM {} WHERE state = 0", self.t()),
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    async fn queued(&self) -> u32 {
        self.channel
            .queue_declare(
                self.queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .unwrap()
            .message_count()
    }

    /// The hand-written relay: one batch after another until nothing is pending.
    async fn hand_written(&self, batch: usize, pipelined: bool) -> Duration {
        let select = self
            .pg
            .prepare(&format!(
                "SELECT id, message_id, destination, payload FROM {} WHERE state = 0 ORDER BY id LIMIT $1",
                self.t()
            ))
            .await
            .unwrap();
        let update = self
            .pg
            .prepare(&format!(
                "UPDATE {} SET state = 1, sent_ms = (extract(epoch from clock_timestamp()) * 1000)::int8 WHERE id = ANY($1)",
                self.t()
            ))
            .await
            .unwrap();
        let start = Instant::now();
        loop {
            let rows = self.pg.query(&select, &[&(batch as i64)]).await.unwrap();
            if rows.is_empty() {
                break;
            }
            let msgs: Vec<(i64, String, Outgoing)> = rows
                .iter()
                .map(|r| {
                    let payload: Vec<u8> = r.get(3);
                    (
                        r.get(0),
                        r.get(2),
                        Outgoing::with_id(r.get::<_, String>(1), payload),
                    )
                })
                .collect();
            if pipelined {
                let results = futures_util::future::join_all(
                    msgs.iter()
                        .map(|(_, d, m)| self.producer.publish_once(d, m)),
                )
                .await;
                for r in results {
                    r.unwrap();
                }
            } else {
                for (_, d, m) in &msgs {
                    self.producer.publish_once(d, m).await.unwrap();
                }
            }
            let ids: Vec<i64> = msgs.iter().map(|m| m.0).collect();
            self.pg.execute(&update, &[&ids]).await.unwrap();
        }
        start.elapsed()
    }

    fn config(&self, batch: usize) -> RelayConfig {
        let mut c = RelayConfig::new(self.db_url.clone(), BrokerUrl::parse(&self.amqp).unwrap());
        c.table = self.table.clone();
        c.batch_size = batch;
        c.retention = None;
        c.poll_interval = Duration::from_millis(20);
        c
    }

    /// The idem relay (`relays` of them on the table) until nothing is pending.
    async fn idem(&self, batch: usize, relays: usize) -> Duration {
        let mut stops = Vec::new();
        let mut handles = Vec::new();
        let start = Instant::now();
        for _ in 0..relays {
            let producer = BrokerUrl::parse(&self.amqp)
                .unwrap()
                .producer()
                .await
                .unwrap();
            let relay = Relay::new(self.db.clone(), producer, self.config(batch));
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            stops.push(tx);
            handles.push(tokio::spawn(relay.run(async {
                let _ = rx.await;
            })));
        }
        while self.pending().await > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = start.elapsed();
        for s in stops {
            let _ = s.send(());
        }
        for h in handles {
            h.await.unwrap().unwrap();
        }
        took
    }
}

fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = arg(1, 20_000);
    let batch = arg(2, 128);
    let rounds = arg(3, 3);
    let samples = arg(4, 300);
    let pg_url = std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let amqp = std::env::var("IDEM_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let table = Table::new(&format!("bench_outbox_{}", std::process::id())).unwrap();
    let queue = format!("bench-outbox-{}", std::process::id());
    let (pg, conn) = tokio_postgres::connect(&pg_url, NoTls).await.unwrap();
    tokio::spawn(conn);
    idem_outbox::postgres::migrate(&pg, &table).await.unwrap();
    let conn = lapin::Connection::connect(&amqp, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let db_url = DbUrl::parse(&pg_url).unwrap();
    let db = OutboxDb::connect(&db_url, table.clone()).await.unwrap();
    let producer = Arc::new(BrokerUrl::parse(&amqp).unwrap().producer().await.unwrap());
    let b = Bench {
        pg,
        table,
        queue,
        amqp,
        db_url,
        db,
        producer,
        channel,
    };

    println!(
        "relay throughput: {n} messages of 256 bytes, batch {batch}, PostgreSQL -> RabbitMQ (classic durable queue, publisher confirms), {rounds} rounds, median"
    );
    type Run = (&'static str, usize, usize, usize); // name, variant, keys, relays
    let runs: [Run; 6] = [
        ("hand-written, sequential confirms", 0, 0, 1),
        ("hand-written, pipelined confirms", 1, 0, 1),
        ("idem relay, no keys, 1 relay", 2, 0, 1),
        ("idem relay, 1000 keys, 1 relay", 2, 1000, 1),
        ("idem relay, no keys, 3 relays", 2, 0, 3),
        ("idem relay, 1000 keys, 3 relays", 2, 1000, 3),
    ];
    let mut rates: HashMap<&str, Vec<f64>> = HashMap::new();
    for round in 0..rounds {
        for (i, (name, variant, keys, relays)) in runs.iter().enumerate() {
            b.fill(n, *keys, round * 10 + i).await;
            let took = match variant {
                0 => b.hand_written(batch, false).await,
                1 => b.hand_written(batch, true).await,
                _ => b.idem(batch, *relays).await,
            };
            let queued = b.queued().await;
            assert_eq!(queued as usize, n, "{name}: {queued} messages in the queue");
            rates
                .entry(name)
                .or_default()
                .push(n as f64 / took.as_secs_f64());
        }
    }
    let base_seq = median(rates["hand-written, sequential confirms"].clone());
    let base_pipe = median(rates["hand-written, pipelined confirms"].clone());
    for (name, ..) in runs {
        let r = median(rates[name].clone());
        println!(
            "  {name:<36} {r:>9.0} msg/s  {:>5.2}x sequential  {:>5.2}x pipelined   (rounds: {})",
            r / base_seq,
            r / base_pipe,
            rates[name]
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    // Commit-to-publish latency with LISTEN/NOTIFY.
    b.pg.batch_execute(&format!("TRUNCATE {}", b.t()))
        .await
        .unwrap();
    b.channel
        .queue_purge(b.queue.as_str().into(), Default::default())
        .await
        .unwrap();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let producer = BrokerUrl::parse(&b.amqp).unwrap().producer().await.unwrap();
    let mut config = b.config(batch);
    config.poll_interval = Duration::from_secs(10);
    let relay = Relay::new(b.db.clone(), producer, config).observe(move |e| {
        if let RelayEvent::Published { message_id, .. } = e {
            let _ = seen_tx.send((message_id.clone(), Instant::now()));
        }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(relay.run(async {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut client, conn) = tokio_postgres::connect(&pg_url, NoTls).await.unwrap();
    tokio::spawn(conn);
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples {
        let msg = NewMessage::new(b.queue.as_str(), format!("{i}").into_bytes());
        let tx = client.transaction().await.unwrap();
        idem_outbox::postgres::enqueue(&tx, &b.table, &msg)
            .await
            .unwrap();
        let committed = Instant::now();
        tx.commit().await.unwrap();
        let (id, at) = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv())
            .await
            .expect("not published within 5 s (LISTEN did not wake the relay)")
            .unwrap();
        assert_eq!(id, msg.id());
        lat.push(at.duration_since(committed).as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(5 + fastrand::u64(..10))).await;
    }
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "commit-to-publish latency (LISTEN/NOTIFY, idle relay, {samples} samples, COMMIT sent -> broker confirm): median {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        q(0.5),
        q(0.9),
        q(0.99),
        q(1.0)
    );

    b.pg.batch_execute(&format!(
        "DROP TABLE {}; DROP FUNCTION IF EXISTS \"{}_notify\"()",
        b.t(),
        b.table.name()
    ))
    .await
    .unwrap();
    b.channel
        .queue_delete(b.queue.as_str().into(), Default::default())
        .await
        .unwrap();
}
