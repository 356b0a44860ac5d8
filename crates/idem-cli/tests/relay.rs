//! `idem relay` and `idem outbox` through the real binary: an outbox in SQLite, RabbitMQ
//! (`IDEM_AMQP_URL`, loopback by default; with `CI` set a missing server fails the test).
//!
//! What it guards against: a relay command that loses or repeats rows (every enqueued message
//! reaches the queue once, with its message id), a message that cannot be routed stalling the
//! others or retrying forever (it goes dead after --max-attempts and is listed with its error),
//! a requeue that does not bring it back with its original id, operator output that does not
//! match the table, and a relay that does not stop cleanly on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem_conformance::server;
use idem_outbox::{DbUrl, NewMessage, OutboxDb, Table};
use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;

fn idem(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run idem");
    assert!(
        out.status.success(),
        "idem {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "idem {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

async fn channel(url: &str) -> (Connection, lapin::Channel) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

async fn declare(url: &str, queue: &str) {
    let (conn, ch) = channel(url).await;
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "bye".into()).await;
}

/// Takes everything in `queue`: the message ids.
async fn drain(url: &str, queue: &str) -> Vec<String> {
    let (conn, ch) = channel(url).await;
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let id = m.delivery.properties.message_id().clone().unwrap();
        out.push(id.to_string());
    }
    let _ = conn.close(200, "bye".into()).await;
    out
}

async fn delete(url: &str, queues: &[&str]) {
    let (conn, ch) = channel(url).await;
    for q in queues {
        let _ = ch
            .queue_delete((*q).into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// A running `idem relay`, its stderr collected.
struct RelayProcess {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl RelayProcess {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_idem"))
            .arg("relay")
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run idem relay");
        let stderr = child.stderr.take().unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[idem relay] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            stderr: lines,
        }
    }

    /// SIGTERM; returns the `stopped:` line.
    fn stop(mut self) -> String {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "idem relay ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "idem relay exited with {status}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stopped = self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.starts_with("idem relay: stopped:"))
                .cloned();
            if let Some(l) = stopped {
                return l;
            }
            assert!(Instant::now() < deadline, "no stopped line");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn until(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_each_row_once_dead_letters_the_unroutable_and_requeues_it() {
    const N: usize = 30;
    let Some(amqp) = server::url(server::AMQP) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("app.db").display());
    let queue = idem_testkit::unique("relay-cli");
    let missing = format!("{queue}-missing");
    declare(&amqp, &queue).await;

    // The deploy step, then the application's writes (here, one transaction each).
    assert_eq!(
        idem(&["outbox", "migrate", "--from", &db, "--json"])["migrated"],
        true
    );
    let outbox = OutboxDb::connect(&DbUrl::parse(&db).unwrap(), Table::default())
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..N {
        let m = NewMessage::new(queue.as_str(), format!("{{\"n\": {i}}}").into_bytes())
            .with_key(format!("order-{}", i % 5));
        ids.push(m.id().to_owned());
        outbox.enqueue(&m).await.unwrap();
    }
    let poison = NewMessage::new(missing.as_str(), &b"{}"[..]);
    outbox.enqueue(&poison).await.unwrap();
    outbox.close().await;
    let stats = idem(&["outbox", "stats", "--from", &db, "--json"]);
    assert_eq!(stats["pending"], N as u64 + 1, "{stats}");

    let relay = RelayProcess::start(&[
        "--from",
        &db,
        "--to",
        &amqp,
        "--poll-interval",
        "100ms",
        "--max-attempts",
        "2",
        "--retry-delay",
        "100ms",
        "--stats-interval",
        "0",
    ]);
    let stats_of = || idem(&["outbox", "stats", "--from", &db, "--json"]);
    until(60, "every row sent or dead", || {
        let s = stats_of();
        s["sent"] == N as u64 && s["dead"] == 1
    })
    .await;
    let mut got = drain(&amqp, &queue).await;
    got.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(got, want, "each row once, with its message id");

    let dead = idem(&["outbox", "dead", "--from", &db, "--json"]);
    let rows = dead["dead"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{dead}");
    assert_eq!(rows[0]["message_id"], poison.id());
    assert_eq!(rows[0]["attempts"], 2, "{dead}");
    assert!(
        rows[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("unroutable"),
        "{dead}"
    );

    // The cause fixed (the queue exists now): requeued, it goes out with its original id.
    declare(&amqp, &missing).await;
    let requeued = idem(&[
        "outbox",
        "requeue",
        "--from",
        &db,
        "--message-id",
        poison.id(),
        "--json",
    ]);
    assert_eq!(requeued["requeued"], 1, "{requeued}");
    until(60, "the requeued row sent", || {
        let s = stats_of();
        s["sent"] == N as u64 + 1 && s["dead"] == 0 && s["pending"] == 0
    })
    .await;
    assert_eq!(drain(&amqp, &missing).await, vec![poison.id().to_owned()]);

    let stopped = relay.stop();
    for field in [
        format!("published={}", N + 1),
        format!("marked={}", N + 1),
        "dead=1".to_owned(),
        "fenced=0".to_owned(),
    ] {
        assert!(stopped.contains(&field), "{field} in {stopped}");
    }
    delete(&amqp, &[&queue, &missing]).await;
}

#[test]
fn bad_arguments_are_refused_clearly() {
    let fails = |args: &[&str], expected: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_idem"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "idem {args:?} succeeded");
        assert!(stderr.contains(expected), "{expected:?} in {stderr}");
        assert!(
            !stderr.contains("secret"),
            "a password was printed: {stderr}"
        );
    };
    fails(
        &[
            "relay",
            "--from",
            "oracle://u:secret@h/db",
            "--to",
            "amqp://127.0.0.1",
        ],
        "unsupported database URL",
    );
    fails(
        &[
            "relay",
            "--from",
            "sqlite:x.db",
            "--to",
            "amqp://127.0.0.1",
            "--lease",
            "5s",
            "--publish-timeout",
            "10s",
        ],
        "must be shorter than the lease",
    );
    fails(&["outbox", "requeue", "--from", "sqlite:x.db"], "--all");
}

/// A server out of reach at start exits with status 69 (`EX_UNAVAILABLE`: a supervisor starts
/// the process again later), a mistake with 1: for `idem relay` and `idem consume` alike.
#[test]
fn unreachable_servers_exit_69_and_mistakes_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("outbox.db").display());
    assert!(idem(&["outbox", "migrate", "--from", &db, "--json"])["migrated"].is_boolean());
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let closed = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let status = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_idem"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = status(&["relay", "--from", &db, "--to", &closed]);
    assert_eq!(code, Some(69), "{stderr}");
    let consume = |store: &str| {
        status(&[
            "consume",
            "--from",
            &closed,
            "--queue",
            "q",
            "--namespace",
            "n",
            "--store",
            store,
            "--exec",
            "true",
        ])
    };
    let store = format!("sqlite:{}", dir.path().join("idem.db").display());
    let (code, stderr) = consume(&store);
    assert_eq!(code, Some(69), "{stderr}");
    // Settings that cannot work: a mistake, whatever the broker.
    let (code, stderr) = status(&[
        "relay",
        "--from",
        &db,
        "--to",
        &closed,
        "--lease",
        "5s",
        "--publish-timeout",
        "10s",
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    // Arguments that do not parse: clap's usage status.
    let (code, stderr) = status(&["relay", "--from", "oracle://h/db", "--to", &closed]);
    assert_eq!(code, Some(2), "{stderr}");
    let missing = format!(
        "sqlite:{}",
        dir.path().join("no/such/dir/idem.db").display()
    );
    let (code, stderr) = consume(&missing);
    assert_eq!(code, Some(1), "{stderr}");
    let missing = format!(
        "sqlite:{}",
        dir.path().join("no/such/dir/outbox.db").display()
    );
    let (code, stderr) = status(&["relay", "--from", &missing, "--to", &closed]);
    assert_eq!(code, Some(1), "{stderr}");
}
