//! A consumer in its own process, against the live RabbitMQ: stopped with SIGTERM (graceful
//! shutdown through `shutdown_signal`) and killed with SIGKILL (a crash). The test binary runs
//! itself as the child: `child_consumer` is ignored in normal runs and started by the parent
//! with `--ignored --exact`.
#![cfg(feature = "amqp")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{numbered, start, unique, until};
use idem::{Attempt, Config, Executor, Namespace};
use idem_broker::amqp::{AmqpConfig, AmqpProducer, AmqpSource};
use idem_broker::{Consumer, Message, Source, shutdown_signal};
use idem_conformance::server;
use lapin::options::BasicGetOptions;
use lapin::{Connection, ConnectionProperties};

const QUEUE_VAR: &str = "IDEM_TEST_CHILD_QUEUE";
const DIR_VAR: &str = "IDEM_TEST_CHILD_DIR";

/// Appends a line to the effect log shared by the processes of a test.
fn log_line(dir: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("effects.log"))
        .unwrap();
    writeln!(f, "{line}").unwrap();
}

fn log_lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("effects.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn executor(dir: &Path) -> Executor<idem_sqlite::SqliteStore> {
    let store = idem_sqlite::SqliteStore::open(dir.join("idem.db")).unwrap();
    Executor::with_config(store, Config::default().lease(Duration::from_secs(2)))
}

/// The child: consumes one message at a time; each takes 1.5 s, logged before and after its
/// effect; stops on SIGTERM.
#[test]
#[ignore = "run by the other tests of this file as a child process"]
fn child_consumer() {
    let (Ok(queue), Ok(dir)) = (std::env::var(QUEUE_VAR), std::env::var(DIR_VAR)) else {
        panic!("{QUEUE_VAR} and {DIR_VAR} must be set: this test is run by the others");
    };
    let url = server::url(server::AMQP).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stats = rt.block_on(async {
        let source = AmqpSource::connect(&url, AmqpConfig::new(&queue))
            .await
            .unwrap();
        let dir2 = dir.clone();
        let consumer = Consumer::new(
            source,
            executor(Path::new(&dir)),
            Namespace::new("process-test").unwrap(),
            move |m: Message, _: Attempt| {
                let dir = dir2.clone();
                async move {
                    let id = m.message_id().unwrap_or("?").to_owned();
                    log_line(Path::new(&dir), &format!("start {id}"));
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    log_line(Path::new(&dir), &format!("effect {id}"));
                    Ok::<_, std::io::Error>(())
                }
            },
        )
        .batch_size(1)
        .concurrency(1);
        consumer.run(shutdown_signal()).await.unwrap()
    });
    println!("child stats: {stats:?}");
}

fn spawn_child(queue: &str, dir: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "child_consumer", "--nocapture"])
        .env(QUEUE_VAR, queue)
        .env(DIR_VAR, dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: &str) {
    idem_testkit::signal(sig, [child.id()]);
}

fn wait_for_line(dir: &Path, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log_lines(dir).iter().any(|l| l == line) {
        assert!(
            Instant::now() < deadline,
            "no {line:?} in {:?}",
            log_lines(dir)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn ready_ids(url: &str, queue: &str) -> Vec<String> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut ids = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        ids.push(
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        );
    }
    let _ = conn.close(200, "bye".into()).await;
    ids
}

async fn delete(url: &str, queue: &str) {
    let conn = Connection::connect(url, ConnectionProperties::default())
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

#[test]
fn sigterm_finishes_the_message_in_hand_acks_it_and_takes_no_more() {
    // SIGTERM while a handler runs: the consumer stops taking messages, lets the handler
    // finish, records and acks it, and exits 0. Everything it had prefetched goes back to the
    // queue untouched.
    let Some(url) = server::url(server::AMQP) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let queue = unique("sigterm");
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        AmqpSource::connect(&url, AmqpConfig::new(&queue))
            .await
            .unwrap()
            .close()
            .await;
        let producer = AmqpProducer::connect(&url).await.unwrap();
        for m in numbered(5) {
            producer.publish("", &queue, &m).await.unwrap();
        }
    });
    let mut child = spawn_child(&queue, dir.path());
    wait_for_line(dir.path(), "start m-0");
    signal(&child, "TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "the child exited with {status}");
    assert_eq!(log_lines(dir.path()), ["start m-0", "effect m-0"]);
    let mut left = rt.block_on(ready_ids(&url, &queue));
    left.sort();
    assert_eq!(
        left,
        ["m-1", "m-2", "m-3", "m-4"],
        "m-0 acked, the rest requeued"
    );
    rt.block_on(delete(&url, &queue));
}

#[test]
fn sigkill_mid_handler_is_redelivered_and_applied_once() {
    // SIGKILL while the handler of m-0 runs (before its effect): nothing is acked; RabbitMQ
    // requeues everything when the process's connection dies. A new consumer on the same store
    // takes m-0 over once the dead process's lease (2 s) ends; every effect happens once.
    let Some(url) = server::url(server::AMQP) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let queue = unique("sigkill");
    let dir = tempfile::tempdir().unwrap();
    let msgs = numbered(5);
    rt.block_on(async {
        AmqpSource::connect(&url, AmqpConfig::new(&queue))
            .await
            .unwrap()
            .close()
            .await;
        let producer = AmqpProducer::connect(&url).await.unwrap();
        for m in &msgs {
            producer.publish("", &queue, m).await.unwrap();
        }
    });
    let mut child = spawn_child(&queue, dir.path());
    wait_for_line(dir.path(), "start m-0");
    signal(&child, "KILL");
    let _ = child.wait();
    assert_eq!(log_lines(dir.path()), ["start m-0"]);

    rt.block_on(async {
        let source = AmqpSource::connect(&url, AmqpConfig::new(&queue))
            .await
            .unwrap();
        let d = dir.path().to_owned();
        let (stats, running) = start(Consumer::new(
            source,
            executor(dir.path()),
            Namespace::new("process-test").unwrap(),
            move |m: Message, _: Attempt| {
                let d = d.clone();
                async move {
                    log_line(&d, &format!("effect {}", m.message_id().unwrap_or("?")));
                    Ok::<_, std::io::Error>(())
                }
            },
        ));
        until(30, "five acks", || stats.snapshot().acked >= 5).await;
        running.stop().await;
    });
    let effects: Vec<String> = log_lines(dir.path())
        .into_iter()
        .filter(|l| l.starts_with("effect"))
        .collect();
    let mut sorted = effects.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "effect m-0",
            "effect m-1",
            "effect m-2",
            "effect m-3",
            "effect m-4"
        ],
        "{effects:?}"
    );
    assert!(rt.block_on(ready_ids(&url, &queue)).is_empty());
    rt.block_on(delete(&url, &queue));
}
