//! Transactional mode through the runtime, against the live RabbitMQ, with consumer processes
//! killed by SIGKILL over and over.
//!
//! The bug this guards against: a consumer that writes its effect and its dedup record in two
//! steps, or acks before the commit, turns every crash between those steps into a duplicate or a
//! lost message. With `Consumer::transactional` the handler's writes and idem's record commit in
//! one transaction and the delivery is acked only after it: a kill before the commit leaves
//! neither (RabbitMQ redelivers, the handler runs as if for the first time), a kill after it
//! leaves both (the redelivery replays). Every message is also published twice, as a producer
//! retry would. The test binary runs itself as the child (`child_transactional`, ignored in
//! normal runs).
#![cfg(feature = "amqp")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::unique;
use idem::{Config, Namespace};
use idem_broker::amqp::{AmqpConfig, AmqpProducer, AmqpSource};
use idem_broker::{Consumer, Message, Outgoing, Source, shutdown_signal};
use idem_conformance::server;

const QUEUE_VAR: &str = "IDEM_TEST_TX_QUEUE";
const STORE_VAR: &str = "IDEM_TEST_TX_STORE";
const TABLE_VAR: &str = "IDEM_TEST_TX_TABLE";

/// Effects live in this table, next to idem's records, in the store's own database.
fn effects_ddl(table: &str) -> String {
    format!("CREATE TABLE {table} (id TEXT NOT NULL, delivery INTEGER NOT NULL)")
}

/// The child: a transactional consumer whose handler inserts one effect row per message.
#[test]
#[ignore = "run by the other tests of this file as a child process"]
fn child_transactional() {
    let (Ok(queue), Ok(store), Ok(table)) = (
        std::env::var(QUEUE_VAR),
        std::env::var(STORE_VAR),
        std::env::var(TABLE_VAR),
    ) else {
        panic!(
            "{QUEUE_VAR}, {STORE_VAR} and {TABLE_VAR} must be set: this test is run by the others"
        );
    };
    let url = server::url(server::AMQP).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let source = AmqpSource::connect(&url, AmqpConfig::new(&queue))
            .await
            .unwrap();
        let ns = Namespace::new("tx-process-test").unwrap();
        let config = Config::default().max_attempts(0);
        let insert = format!("INSERT INTO {table} (id, delivery) VALUES (?1, ?2)");
        if let Some(path) = store.strip_prefix("sqlite:") {
            let store = idem_sqlite::SqliteStore::open(path).unwrap();
            let consumer = Consumer::transactional(
                source,
                store,
                config,
                ns,
                move |m: &Message, conn: &mut rusqlite::Connection| {
                    let insert = insert.clone();
                    let id = m.message_id().unwrap_or("?").to_owned();
                    let delivery = i64::from(m.delivery_count());
                    Box::pin(async move {
                        conn.execute(&insert, rusqlite::params![id, delivery])?;
                        Ok::<_, rusqlite::Error>(())
                    })
                },
            )
            .batch_size(16)
            .concurrency(2);
            consumer.run(shutdown_signal()).await.unwrap();
        } else if let Some(schema) = store.strip_prefix("postgres:") {
            let pg = server::url(server::POSTGRES).unwrap();
            let store = idem_postgres::PostgresStore::builder(pg)
                .schema(schema)
                .connect()
                .await
                .unwrap();
            let insert = format!("INSERT INTO {table} (id, delivery) VALUES ($1, $2)");
            let consumer = Consumer::transactional(
                source,
                store,
                config,
                ns,
                move |m: &Message, tx: &mut idem_postgres::TxClient| {
                    let insert = insert.clone();
                    let id = m.message_id().unwrap_or("?").to_owned();
                    let delivery = i32::try_from(m.delivery_count()).unwrap_or(i32::MAX);
                    Box::pin(async move {
                        tx.execute(&insert, &[&id, &delivery]).await?;
                        // Widens the time between the handler's write and the commit, where a
                        // kill must leave neither.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        Ok::<_, tokio_postgres::Error>(())
                    })
                },
            )
            .batch_size(16)
            .concurrency(2);
            consumer.run(shutdown_signal()).await.unwrap();
        } else {
            panic!("unknown store {store}");
        }
    });
}

fn spawn_child(queue: &str, store: &str, table: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "child_transactional", "--nocapture"])
        .env(QUEUE_VAR, queue)
        .env(STORE_VAR, store)
        .env(TABLE_VAR, table)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Publishes `n` messages, each twice with the same id (a producer retry after a lost confirm).
async fn publish_twice(url: &str, queue: &str, n: usize) -> Vec<String> {
    AmqpSource::connect(url, AmqpConfig::new(queue))
        .await
        .unwrap()
        .close()
        .await;
    let producer = AmqpProducer::connect(url).await.unwrap();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let m = Outgoing::with_id(format!("t-{i}"), format!("{i}").into_bytes());
        producer.publish("", queue, &m).await.unwrap();
        producer.publish("", queue, &m).await.unwrap();
        ids.push(format!("t-{i}"));
    }
    ids
}

/// How many messages the queue holds (ready or unacked counts only ready ones once the
/// consumers are gone).
async fn backlog(url: &str, queue: &str) -> u32 {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
    q.message_count()
}

async fn delete(url: &str, queue: &str) {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for q in [queue.to_owned(), format!("{queue}.dlq")] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    let _ = ch
        .exchange_delete(format!("{queue}.dlx").as_str().into(), Default::default())
        .await;
}

/// Kills consumer processes with SIGKILL at random moments, `kills` times, then lets one
/// finish; returns when `effects` reached `want` and the queue is empty.
/// Where the consumers read and write.
struct Setup<'a> {
    url: &'a str,
    queue: &'a str,
    store: &'a str,
    table: &'a str,
}

fn run_with_kills(
    rt: &tokio::runtime::Runtime,
    setup: &Setup<'_>,
    kills: usize,
    want: usize,
    effects: &dyn Fn() -> HashMap<String, u32>,
) -> usize {
    let Setup {
        url,
        queue,
        store,
        table,
    } = *setup;
    // Kills that land while messages are still being processed.
    let mut killed = 0;
    for _ in 0..kills {
        let before = effects().len();
        let mut child = spawn_child(queue, store, table);
        // Killed at a random moment once it is consuming: a fixed delay from the start let a
        // fast child (or a slow start) finish the whole stream before the second kill.
        let deadline = Instant::now() + Duration::from_secs(30);
        while effects().len() == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(fastrand::u64(..150)));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        if effects().len() >= want {
            break;
        }
        killed += 1;
    }
    let mut child = spawn_child(queue, store, table);
    // Let it install its SIGTERM handler before it may be asked to stop.
    std::thread::sleep(Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(90);
    while effects().len() < want || rt.block_on(backlog(url, queue)) > 0 {
        assert!(
            Instant::now() < deadline,
            "not drained: {} of {want} effects, backlog {}",
            effects().len(),
            rt.block_on(backlog(url, queue))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    idem_testkit::signal("TERM", [child.id()]);
    let status = child.wait().unwrap();
    assert!(status.success(), "the last consumer exited with {status}");
    killed
}

fn assert_exactly_once(effects: &HashMap<String, u32>, ids: &[String]) {
    let dup: Vec<_> = effects.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dup.is_empty(), "duplicate effects: {dup:?}");
    let lost: Vec<_> = ids.iter().filter(|id| !effects.contains_key(*id)).collect();
    assert!(lost.is_empty(), "lost effects: {lost:?}");
    assert_eq!(effects.len(), ids.len(), "unexpected effects");
}

#[test]
fn sigkilled_transactional_consumers_on_sqlite_apply_every_message_once() {
    let Some(url) = server::url(server::AMQP) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let queue = unique("tx-sqlite");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let table = "effects";
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch(&effects_ddl(table))
        .unwrap();
    let n = 3000;
    let ids = rt.block_on(publish_twice(&url, &queue, n));
    let read = || -> HashMap<String, u32> {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let mut st = conn
            .prepare("SELECT id, COUNT(*) FROM effects GROUP BY id")
            .unwrap();
        st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let store = format!("sqlite:{}", db.display());
    let setup = Setup {
        url: &url,
        queue: &queue,
        store: &store,
        table,
    };
    let killed = run_with_kills(&rt, &setup, 6, n, &read);
    assert!(
        killed >= 2,
        "only {killed} consumers were killed mid-stream"
    );
    assert_exactly_once(&read(), &ids);
    rt.block_on(delete(&url, &queue));
}

#[test]
fn sigkilled_transactional_consumers_on_postgres_apply_every_message_once() {
    let (Some(url), Some(pg)) = (server::url(server::AMQP), server::url(server::POSTGRES)) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let queue = unique("tx-postgres");
    let schema = format!("idem_tx_{:08x}", fastrand::u32(..));
    let table = format!("{schema}.effects");
    let client = rt.block_on(async {
        idem_postgres::PostgresStore::builder(pg.clone())
            .schema(&schema)
            .migrate()
            .await
            .unwrap();
        let (client, conn) = tokio_postgres::connect(&pg, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(&effects_ddl(&table).replace("INTEGER", "INT"))
            .await
            .unwrap();
        client
    });
    let n = 3000;
    let ids = rt.block_on(publish_twice(&url, &queue, n));
    let read = || -> HashMap<String, u32> {
        rt.block_on(client.query(
            &format!("SELECT id, COUNT(*)::INT FROM {table} GROUP BY id"),
            &[],
        ))
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i32>(1).unsigned_abs()))
        .collect()
    };
    let store = format!("postgres:{schema}");
    let setup = Setup {
        url: &url,
        queue: &queue,
        store: &store,
        table: &table,
    };
    let killed = run_with_kills(&rt, &setup, 6, n, &read);
    assert!(
        killed >= 2,
        "only {killed} consumers were killed mid-stream"
    );
    assert_exactly_once(&read(), &ids);
    rt.block_on(async {
        let _ = client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await;
    });
    rt.block_on(delete(&url, &queue));
}
