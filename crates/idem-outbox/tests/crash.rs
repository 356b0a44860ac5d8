//! A relay SIGKILLed between the broker's confirmation and the mark: a real child process
//! (this test binary again, `IDEM_OUTBOX_CRASH_CHILD`) runs a relay on PostgreSQL into RabbitMQ
//! whose observer announces the first confirmed publish and then hangs, before the rows are
//! marked sent. The parent kills it there. The rows stay pending; when the child's lease runs
//! out another relay publishes them again **with the same message ids**, and an idem consumer
//! (over a SQLite store) runs its handler once per message: every duplicate is replayed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Outbox, Queue, RelayTask, amqp};
use idem::{Attempt, Executor, Namespace};
use idem_broker::{Consumer, Message};
use idem_outbox::{DbKind, DbUrl, NewMessage, Relay, RelayEvent, Table};
use parking_lot::Mutex;

const CHILD_ENV: &str = "IDEM_OUTBOX_CRASH_CHILD";
const TABLE_ENV: &str = "IDEM_OUTBOX_CRASH_TABLE";
const LEASE: Duration = Duration::from_secs(2);

/// The child: a relay that hangs right after its first confirmed publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    if std::env::var(CHILD_ENV).is_err() {
        return;
    }
    let db = DbUrl::parse(&std::env::var("IDEM_POSTGRES_URL").unwrap()).unwrap();
    let table = Table::new(&std::env::var(TABLE_ENV).unwrap()).unwrap();
    let ob = Outbox::attach(db, table, None).await;
    let broker = std::env::var("IDEM_AMQP_URL").unwrap();
    let mut config = ob.config(&broker);
    config.lease = LEASE;
    config.publish_timeout = LEASE / 2;
    let producer = idem_broker::BrokerUrl::parse(&broker)
        .unwrap()
        .producer()
        .await
        .unwrap();
    let relay = Relay::new(ob.db.clone(), producer, config).observe(|e| {
        if let RelayEvent::Published { message_id, .. } = e {
            // Straight to fd 1 (the test harness captures `println!`).
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "PUBLISHED {message_id}");
            let _ = out.flush();
            // Hang before the mark: the parent kills this process here.
            std::thread::sleep(Duration::from_secs(3600));
        }
    });
    relay.run(std::future::pending()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_killed_between_publish_and_mark_republishes_with_the_same_id() {
    let Some(ob) = Outbox::new(DbKind::Postgres).await else {
        return;
    };
    let Some(url) = amqp() else { return };
    let mut q = Queue::new(&url).await;
    let messages: Vec<NewMessage> = (0..5)
        .map(|i| NewMessage::new(q.name.as_str(), format!("transfer {i}").into_bytes()))
        .collect();
    for m in &messages {
        ob.db.enqueue(m).await.unwrap();
    }

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env(TABLE_ENV, ob.table.to_string())
        .env("IDEM_POSTGRES_URL", ob.url.expose())
        .env("IDEM_AMQP_URL", &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        // libtest may have printed `test crash_child ... ` on the same line.
        lines.find_map(|l| {
            l.ok().and_then(|l| {
                l.split_once("PUBLISHED ")
                    .map(|(_, id)| id.trim().to_owned())
            })
        })
    });
    let line = tokio::time::timeout(Duration::from_secs(60), line).await;
    // SIGKILL: no destructor, no mark. (Also on failure, so no child outlives the test.)
    child.kill().unwrap();
    child.wait().unwrap();
    let line = line
        .expect("the child never published")
        .unwrap()
        .expect("the child exited before publishing");
    let published = line;
    assert!(messages.iter().any(|m| m.id() == published));
    let stats = ob.db.stats().await.unwrap();
    assert_eq!(
        (stats.pending, stats.sent),
        (5, 0),
        "marked despite the kill"
    );

    // An idem consumer counting handler runs per message id.
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let dir = tempfile::tempdir().unwrap();
    let store = idem_sqlite::SqliteStore::open(dir.path().join("idem.db")).unwrap();
    let counted = Arc::clone(&runs);
    let consumer = Consumer::new(
        q.take_source(),
        Executor::new(store),
        Namespace::new("outbox-crash").unwrap(),
        move |msg: Message, _attempt: Attempt| {
            let counted = Arc::clone(&counted);
            async move {
                *counted
                    .lock()
                    .entry(msg.message_id().unwrap_or_default().to_owned())
                    .or_default() += 1;
                Ok::<_, std::io::Error>(String::new())
            }
        },
    );
    let consumer_stats = consumer.stats();
    let (stop_consumer, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer = tokio::spawn(consumer.run(async {
        let _ = stopped.await;
    }));

    // A second relay takes the rows over once the child's lease has run out.
    let relay = RelayTask::spawn(ob.config(&url));
    for _ in 0..400 {
        let s = consumer_stats.snapshot();
        if s.acked >= 10 && ob.db.stats().await.unwrap().pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let relay_stats = relay.stop().await;
    let _ = stop_consumer.send(());
    let consumed = consumer.await.unwrap().unwrap();

    assert_eq!(relay_stats.published, 5, "{relay_stats:?}");
    assert_eq!(consumed.received, 10, "{consumed:?}");
    assert_eq!(consumed.executed, 5, "{consumed:?}");
    assert_eq!(consumed.replayed, 5, "{consumed:?}");
    let runs = runs.lock().clone();
    assert_eq!(runs.len(), 5);
    assert!(runs.values().all(|&n| n == 1), "{runs:?}");
    for m in &messages {
        assert_eq!(runs.get(m.id()), Some(&1), "{} not applied once", m.id());
    }
    let stats = ob.db.stats().await.unwrap();
    assert_eq!((stats.pending, stats.sent), (0, 5));
    q.delete().await;
    ob.drop_table().await;
}
