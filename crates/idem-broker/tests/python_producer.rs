//! A producer in another language: a Python program using `pika` (installed into a virtual
//! environment by the test) publishes every message twice with the same `message_id`, as a
//! producer that retries after a lost confirm does. The Rust consumer applies each once.
#![cfg(feature = "amqp")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{Ledger, sqlite_store, start, unique, until};
use idem::{Executor, Namespace};
use idem_broker::Consumer;
use idem_broker::amqp::{AmqpConfig, AmqpSource};
use idem_conformance::server;

const PRODUCER: &str = r#"
import sys, uuid, pika
url, queue, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
ch.confirm_delivery()
for i in range(n):
    props = pika.BasicProperties(message_id=str(uuid.uuid4()), delivery_mode=2)
    body = ('{"n": %d}' % i).encode()
    for attempt in range(2):  # the retry after a "lost" confirm: same id, same body
        ch.basic_publish(exchange="", routing_key=queue, body=body, properties=props, mandatory=True)
    print(props.message_id)
conn.close()
"#;

/// A Python that can import pika (a virtual environment, or `pip install --target` where the
/// `venv` module is missing), or `None` (a loud skip, or a failure under CI) when pika cannot
/// be installed here.
fn python_with_pika(dir: &Path) -> Option<(std::path::PathBuf, Option<std::path::PathBuf>)> {
    let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
    let venv = dir.join("venv");
    if ok(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        && ok(Command::new(venv.join("bin/pip")).args(["install", "-q", "pika"]))
    {
        return Some((venv.join("bin/python"), None));
    }
    let site = dir.join("site");
    if ok(Command::new("python3")
        .args(["-m", "pip", "install", "-q", "--target"])
        .arg(&site)
        .arg("pika"))
    {
        return Some(("python3".into(), Some(site)));
    }
    assert!(
        !server::is_ci(),
        "cannot install pika (python3 with venv or pip, and PyPI, are needed); CI is set, so this fails"
    );
    eprintln!("SKIPPED: cannot install pika");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_producer_retrying_every_publish_is_applied_once() {
    let Some(url) = server::url(server::AMQP) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some((python, pythonpath)) = python_with_pika(dir.path()) else {
        return;
    };
    let queue = unique("python");
    let source = AmqpSource::connect(&url, AmqpConfig::new(&queue))
        .await
        .unwrap();
    let mut producer = tokio::process::Command::new(python);
    producer.args(["-c", PRODUCER, &url, &queue, "50"]);
    if let Some(path) = pythonpath {
        producer.env("PYTHONPATH", path);
    }
    let out = producer.output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), 50);

    let ledger = Ledger::default();
    let (store, _sdir) = sqlite_store();
    let consumer = Consumer::new(
        source,
        Executor::new(store),
        Namespace::new("python-test").unwrap(),
        ledger.handler(),
    );
    let (stats, running) = start(consumer);
    until(30, "100 acks", || stats.snapshot().acked == 100).await;
    let snap = running.stop().await;
    ledger.assert_exactly_once(ids.iter().map(String::as_str));
    assert_eq!((snap.executed, snap.replayed), (50, 50));

    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for q in [queue.clone(), format!("{queue}.dlq")] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    let _ = ch
        .exchange_delete(format!("{queue}.dlx").as_str().into(), Default::default())
        .await;
}
