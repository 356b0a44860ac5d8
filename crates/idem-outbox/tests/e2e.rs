//! End to end, with faults: producer transactions on PostgreSQL enqueue messages with their
//! business writes (some roll back) -> relays (child processes) -> RabbitMQ -> idem consumers
//! (child processes) in transactional mode writing a ledger in a second schema. Relays and
//! consumers are SIGKILLed and restarted at random while messages flow, and one relay is
//! killed right between the broker's confirmation and the mark. At the end: every committed
//! message is in the ledger exactly once, no rolled-back one is there. 0 lost, 0 duplicate
//! effects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Outbox, Queue, amqp, unique};
use idem::{Config, Namespace};
use idem_broker::amqp::{AmqpConfig, AmqpSource};
use idem_broker::{Consumer, Message};
use idem_outbox::{DbKind, DbUrl, NewMessage, Relay, RelayEvent, Table};
use idem_postgres::{PostgresStore, TxClient};

const ROLE: &str = "IDEM_OUTBOX_E2E_ROLE";
const TABLE: &str = "IDEM_OUTBOX_E2E_TABLE";
const SCHEMA: &str = "IDEM_OUTBOX_E2E_SCHEMA";
const QUEUE: &str = "IDEM_OUTBOX_E2E_QUEUE";

fn env(name: &str) -> String {
    std::env::var(name).unwrap()
}

/// The child processes: `relay`, `relay-hang` (hangs after its first confirmed publish,
/// before the mark) or `consumer`. They run until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let pg = env("IDEM_POSTGRES_URL");
    let broker = env("IDEM_AMQP_URL");
    match role.as_str() {
        "relay" | "relay-hang" => {
            let ob = Outbox::attach(
                DbUrl::parse(&pg).unwrap(),
                Table::new(&env(TABLE)).unwrap(),
                None,
            )
            .await;
            let mut config = ob.config(&broker);
            config.lease = Duration::from_secs(1);
            config.publish_timeout = Duration::from_millis(500);
            config.batch_size = 16;
            let producer = idem_broker::BrokerUrl::parse(&broker)
                .unwrap()
                .producer()
                .await
                .unwrap();
            let mut relay = Relay::new(ob.db.clone(), producer, config);
            if role == "relay-hang" {
                relay = relay.observe(|e| {
                    if matches!(e, RelayEvent::Published { .. }) {
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "E2E-PUBLISHED");
                        let _ = out.flush();
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                });
            }
            relay.run(std::future::pending()).await.unwrap();
        }
        "consumer" => {
            let schema = env(SCHEMA);
            let store = PostgresStore::builder(pg.as_str())
                .schema(schema.as_str())
                .connect()
                .await
                .unwrap();
            let source = AmqpSource::connect(&broker, AmqpConfig::new(env(QUEUE)))
                .await
                .unwrap();
            let ledger = format!("\"{schema}\".ledger");
            let consumer = Consumer::transactional(
                source,
                store,
                Config::default(),
                Namespace::new("outbox-e2e").unwrap(),
                move |msg: &Message, tx: &mut TxClient| {
                    let id = msg.message_id().unwrap_or_default().to_owned();
                    let body = String::from_utf8_lossy(msg.payload()).into_owned();
                    let sql = format!("INSERT INTO {ledger} (message_id, body) VALUES ($1, $2)");
                    Box::pin(async move {
                        tx.execute(&sql, &[&id, &body]).await?;
                        Ok::<(), tokio_postgres::Error>(())
                    })
                },
            )
            .batch_size(16)
            .concurrency(2);
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "E2E-CONSUMING");
            let _ = out.flush();
            drop(out);
            consumer.run(std::future::pending()).await.unwrap();
        }
        other => panic!("unknown role {other}"),
    }
}

struct Children {
    spawn_env: Vec<(String, String)>,
    live: Vec<(String, Child)>,
    kills: HashMap<String, u32>,
}

impl Children {
    fn spawn(&mut self, role: &str, stdout: bool) -> Child {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "e2e_child", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .envs(self.spawn_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(if stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::null());
        cmd.spawn().unwrap()
    }

    fn start(&mut self, role: &str) {
        let child = self.spawn(role, false);
        self.live.push((role.to_owned(), child));
    }

    /// SIGKILLs one live child of `role` (chosen at random) and starts a new one.
    fn kill_one(&mut self, role: &str) {
        let of_role: Vec<usize> = (0..self.live.len())
            .filter(|&i| self.live[i].0 == role)
            .collect();
        if of_role.is_empty() {
            return;
        }
        let i = of_role[fastrand::usize(..of_role.len())];
        let (_, mut child) = self.live.swap_remove(i);
        child.kill().unwrap();
        child.wait().unwrap();
        *self.kills.entry(role.to_owned()).or_default() += 1;
        self.start(role);
    }

    fn kill_all(&mut self) {
        for (_, mut c) in self.live.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.kill_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_to_consumer_exactly_once_with_relays_and_consumers_killed() {
    let Some(ob) = Outbox::new(DbKind::Postgres).await else {
        return;
    };
    let Some(url) = amqp() else { return };
    let q = Queue::new(&url).await;
    // The consumers' database: a schema with idem's table and the ledger (no unique index:
    // a duplicate effect would show).
    let schema = unique("obe2e");
    let builder = PostgresStore::builder(ob.url.expose()).schema(schema.as_str());
    builder.migrate().await.unwrap();
    let (pg, conn) = tokio_postgres::connect(ob.url.expose(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    pg.batch_execute(&format!(
        "CREATE TABLE \"{schema}\".ledger (message_id text NOT NULL, body text NOT NULL);
         CREATE TABLE \"{schema}\".orders (n int NOT NULL);"
    ))
    .await
    .unwrap();
    let queue = q.name.clone();
    q.delete().await; // declared again by the consumers, with nobody holding deliveries here

    let mut kids = Children {
        spawn_env: vec![
            (TABLE.to_owned(), ob.table.to_string()),
            (SCHEMA.to_owned(), schema.clone()),
            (QUEUE.to_owned(), queue.clone()),
            ("IDEM_POSTGRES_URL".to_owned(), ob.url.expose().to_owned()),
            ("IDEM_AMQP_URL".to_owned(), url.clone()),
        ],
        live: Vec::new(),
        kills: HashMap::new(),
    };
    // One consumer first (it declares the queue), then the relay that dies between publish
    // and mark.
    let mut first = kids.spawn("consumer", true);
    let out = first.stdout.take().unwrap();
    tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(out)
            .lines()
            .find(|l| l.as_ref().is_ok_and(|l| l.contains("E2E-CONSUMING")))
    })
    .await
    .unwrap()
    .expect("the consumer did not start")
    .unwrap();
    kids.live.push(("consumer".to_owned(), first));

    // Producer transactions: an order row and its message, committed or rolled back.
    let (mut producer, conn) = tokio_postgres::connect(ob.url.expose(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut committed = HashSet::new();
    let mut rolled_back = HashSet::new();
    let mut produce =
        async |n: usize, committed: &mut HashSet<String>, rolled: &mut HashSet<String>| {
            for _ in 0..n {
                let tx = producer.transaction().await.unwrap();
                let i = committed.len() + rolled.len();
                tx.execute(
                    &format!("INSERT INTO \"{schema}\".orders VALUES ($1)"),
                    &[&(i as i32)],
                )
                .await
                .unwrap();
                let msg = NewMessage::new(queue.as_str(), format!("order {i}").into_bytes())
                    .with_key(format!("account-{}", i % 7));
                idem_outbox::postgres::enqueue(&tx, &ob.table, &msg)
                    .await
                    .unwrap();
                if fastrand::u8(..10) == 0 {
                    tx.rollback().await.unwrap();
                    rolled.insert(msg.id().to_owned());
                } else {
                    tx.commit().await.unwrap();
                    committed.insert(msg.id().to_owned());
                }
            }
        };
    produce(20, &mut committed, &mut rolled_back).await;
    let mut hang = kids.spawn("relay-hang", true);
    let out = hang.stdout.take().unwrap();
    let seen = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(out)
            .lines()
            .any(|l| l.is_ok_and(|l| l.contains("E2E-PUBLISHED")))
    });
    let seen = tokio::time::timeout(Duration::from_secs(60), seen).await;
    hang.kill().unwrap();
    hang.wait().unwrap();
    assert!(seen.unwrap().unwrap(), "the hanging relay never published");

    // Chaos: two relays and two consumers, one of them killed and restarted every ~400 ms,
    // while the producer keeps committing.
    kids.start("relay");
    kids.start("relay");
    kids.start("consumer");
    let chaos_until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < chaos_until {
        produce(15, &mut committed, &mut rolled_back).await;
        tokio::time::sleep(Duration::from_millis(200 + fastrand::u64(..400))).await;
        kids.kill_one(if fastrand::bool() {
            "relay"
        } else {
            "consumer"
        });
    }
    // Calm: let them drain.
    let deadline = Instant::now() + Duration::from_secs(90);
    let ledger = format!("\"{schema}\".ledger");
    loop {
        let rows: i64 = pg
            .query_one(&format!("SELECT count(*) FROM {ledger}"), &[])
            .await
            .unwrap()
            .get(0);
        let pending = ob.db.stats().await.unwrap().pending;
        if (rows as usize >= committed.len() && pending == 0) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A moment for stragglers (a duplicate would land now), then stop everything.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kills = kids.kills.clone();
    kids.kill_all();

    let rows = pg
        .query(&format!("SELECT message_id FROM {ledger}"), &[])
        .await
        .unwrap();
    let mut applied: HashMap<String, u32> = HashMap::new();
    for r in &rows {
        *applied.entry(r.get(0)).or_default() += 1;
    }
    let lost: Vec<&String> = committed
        .iter()
        .filter(|id| !applied.contains_key(*id))
        .collect();
    let duplicated: Vec<(&String, &u32)> = applied.iter().filter(|(_, n)| **n > 1).collect();
    let phantom: Vec<&String> = applied
        .keys()
        .filter(|id| !committed.contains(*id))
        .collect();
    eprintln!(
        "e2e: {} committed, {} rolled back, {} ledger rows, kills {kills:?}",
        committed.len(),
        rolled_back.len(),
        rows.len()
    );
    assert!(
        kills.get("relay").copied().unwrap_or(0) >= 1
            || kills.get("consumer").copied().unwrap_or(0) >= 1
    );
    assert!(lost.is_empty(), "{} lost: {lost:?}", lost.len());
    assert!(duplicated.is_empty(), "duplicate effects: {duplicated:?}");
    assert!(
        phantom.is_empty(),
        "effects of rolled-back messages: {phantom:?}"
    );
    assert_eq!(rows.len(), committed.len());

    pg.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
    common::delete_queues(&url, &[queue.as_str()]).await;
    ob.drop_table().await;
}
