//! `idem consume` through the real binary, against the live brokers (`IDEM_AMQP_URL`,
//! `IDEM_NATS_URL`, `IDEM_REDIS_URL`, `IDEM_MQTT_URL`, loopback by default; with `CI` set a
//! missing server fails the test instead of skipping it). Every test uses its own queues and
//! streams and deletes them at the end.
//!
//! What each test guards against:
//! - the issue's acceptance test: a Python producer that publishes every message twice (a
//!   retry after a lost confirm) must cause one effect per message through the sidecar, and the
//!   sidecar must stop cleanly on SIGTERM. A sidecar that ran the command per delivery would
//!   write every line twice.
//! - `--http`: duplicates stored twice in JetStream reach the endpoint once per key, with the
//!   `Idempotency-Key` header; a 500 is retried, not acked; a 4xx is neither acked as a success
//!   nor retried forever, but dead-lettered with its status after `--max-attempts`.
//! - a failing command is retried up to `--max-attempts` and then dead-lettered; when the
//!   dead-letter publish is refused the message is NOT acked (it would be lost), and once the
//!   destination exists it is dead-lettered without running the command again.
//! - Redis Streams and MQTT: the other two adapters behind the same sidecar, with producer
//!   retries that the broker cannot deduplicate (a new entry / a new QoS 1 message, same id).
//! - bad arguments fail at once with an error that names the problem and never a password.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem_broker::Outgoing;
use idem_broker::amqp::AmqpProducer;
use idem_broker::nats::NatsProducer;
use idem_broker::redis_streams::RedisStreamProducer;
use idem_conformance::server;
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

// ---------------------------------------------------------------------------------------------
// The sidecar as a child process.

/// A running `idem consume`, its stderr collected (and echoed, for failing tests).
struct Sidecar {
    child: Option<Child>,
    stderr: Arc<Lines>,
}

/// Lines a child printed.
#[derive(Default)]
struct Lines(Mutex<Vec<String>>);

impl Lines {
    fn push(&self, line: String) {
        self.0.lock().unwrap().push(line);
    }
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl Sidecar {
    /// Starts `idem consume ARGS` with `env`, and waits until it says it is consuming.
    fn start(args: &[&str], env: &[(&str, &Path)]) -> Sidecar {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_idem"));
        cmd.arg("consume")
            .args(args)
            .env("RUST_LOG", "warn,idem_broker=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("run idem consume");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Lines::default());
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[idem consume] {line}");
                sink.push(line);
            }
        });
        let mut sidecar = Sidecar {
            child: Some(child),
            stderr: lines,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sidecar.said("idem consume: consuming") {
            if let Some(status) = sidecar.child.as_mut().unwrap().try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "idem consume exited with {status} before consuming:\n{}",
                    sidecar.stderr.all().join("\n")
                );
            }
            assert!(Instant::now() < deadline, "idem consume never started");
            std::thread::sleep(Duration::from_millis(20));
        }
        sidecar
    }

    fn said(&self, text: &str) -> bool {
        self.stderr.all().iter().any(|l| l.contains(text))
    }

    /// Sends SIGTERM and waits for the exit; returns its status and the counters of the
    /// "stopped" line.
    fn stop(mut self) -> (ExitStatus, HashMap<String, u64>) {
        let mut child = self.child.take().unwrap();
        let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("idem consume did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The stderr thread may still be reading the last lines.
        let deadline = Instant::now() + Duration::from_secs(5);
        let line = loop {
            let stopped = self
                .stderr
                .all()
                .into_iter()
                .find(|l| l.starts_with("idem consume: stopped:"));
            match stopped {
                Some(l) => break l,
                None if Instant::now() > deadline => panic!(
                    "no \"stopped\" line after SIGTERM (exit {status}):\n{}",
                    self.stderr.all().join("\n")
                ),
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let counters = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
            .collect();
        (status, counters)
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn idem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run idem")
}

/// A name no other test (or run) uses.
fn unique(prefix: &str) -> String {
    format!("idem-test-consume-{prefix}-{:08x}", fastrand::u32(..))
}

/// Polls `cond` until it holds, or panics after `secs`.
async fn until(secs: u64, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn lines(path: &Path) -> Vec<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.lines().map(str::to_owned).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("reading {}: {e}", path.display()),
    }
}

fn sqlite(dir: &Path) -> String {
    format!("sqlite:{}", dir.join("idem.db").display())
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ helpers.

async fn amqp(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap()
}

/// Ready messages in `queue` (unacked ones are not counted by the broker).
async fn ready(url: &str, queue: &str) -> u32 {
    let conn = amqp(url).await;
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
    q.message_count()
}

/// Takes everything in `queue`.
async fn drain(url: &str, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
    let conn = amqp(url).await;
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        out.push(m);
    }
    let _ = conn.close(200, "bye".into()).await;
    out
}

fn amqp_header(m: &lapin::message::BasicGetMessage, name: &str) -> String {
    let headers = m.delivery.properties.headers().clone().unwrap_or_default();
    match headers.inner().get(name) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("header {name} is {other:?}"),
    }
}

/// Deletes a test's queue, dead-letter queue and exchange.
async fn amqp_cleanup(url: &str, queue: &str) {
    let conn = amqp(url).await;
    let ch = conn.create_channel().await.unwrap();
    for q in [queue.to_owned(), format!("{queue}.dlq")] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(format!("{queue}.dlx").as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
}

// ---------------------------------------------------------------------------------------------
// 1. The issue's acceptance test: a Python producer, consumed exactly once through the sidecar.

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
/// `venv` module is missing), or `None` (a loud skip, or a failure under CI).
fn python_with_pika(dir: &Path) -> Option<(PathBuf, Option<PathBuf>)> {
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
async fn a_python_producer_retrying_every_publish_is_applied_once_through_idem_consume() {
    const N: usize = 40;
    let Some(url) = server::url(server::AMQP) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some((python, pythonpath)) = python_with_pika(dir.path()) else {
        return;
    };
    let queue = unique("python");
    let effects = dir.path().join("effects.txt");
    let store = sqlite(dir.path());
    // The "consumer in another language": a shell one-liner that appends the message id, the
    // key it was given and the payload it read from stdin.
    let sidecar = Sidecar::start(
        &[
            "--from",
            &url,
            "--queue",
            &queue,
            "--namespace",
            "py-orders",
            "--store",
            &store,
            "--shell",
            "--exec",
            r#"printf '%s %s %s\n' "$IDEM_MESSAGE_ID" "$IDEMPOTENCY_KEY" "$(cat)" >> "$EFFECTS""#,
        ],
        &[("EFFECTS", &effects)],
    );

    let mut producer = tokio::process::Command::new(python);
    producer.args(["-c", PRODUCER, &url, &queue, &N.to_string()]);
    if let Some(path) = pythonpath {
        producer.env("PYTHONPATH", path);
    }
    let out = producer.output().await.unwrap();
    assert!(
        out.status.success(),
        "the producer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), N);

    until(60, "an effect per message", async || {
        lines(&effects).len() >= N
    })
    .await;
    // Let the copies that met an in-progress first run come back and be replayed. RabbitMQ
    // does not count the deliveries the sidecar holds for a delayed requeue, so the check
    // after the stop accounts for any it still held.
    until(30, "the queue to drain", async || {
        ready(&url, &queue).await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, stats) = sidecar.stop();
    assert!(status.success(), "idem consume exited with {status}");
    // Closing the connection gave back whatever was still held: every copy is acked or back
    // in the queue; none lost, none acked twice.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let left = u64::from(ready(&url, &queue).await);
    assert_eq!(
        stats["acked"] + left,
        2 * N as u64,
        "{stats:?}, {left} left"
    );

    let effects = lines(&effects);
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for line in &effects {
        let mut parts = line.splitn(3, ' ');
        let (id, key, payload) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        assert_eq!(key, format!("py-orders:{id}"), "{line}");
        let i = ids
            .iter()
            .position(|x| x == id)
            .expect("an id the producer sent");
        assert_eq!(payload, format!("{{\"n\": {i}}}"), "{line}");
        *seen.entry(id).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(
            seen.get(id.as_str()),
            Some(&1),
            "effects of {id}: {effects:#?}"
        );
    }
    assert_eq!(effects.len(), N, "{effects:#?}");
    assert_eq!(stats["executed"], N as u64, "{stats:?}");
    assert_eq!(stats["replayed"], N as u64 - left, "{stats:?}");
    amqp_cleanup(&url, &queue).await;
}

// ---------------------------------------------------------------------------------------------
// 2. `--http`: an endpoint that records every request.

/// One request the endpoint received.
#[derive(Clone, Debug)]
struct Request {
    headers: HashMap<String, String>,
    body: Vec<u8>,
    status: u16,
}

/// How the endpoint answers a request: from its `Idempotency-Key` and whether that key was seen
/// before, the status (200, 422 or 500).
type Answer = Arc<dyn Fn(&str, bool) -> u16 + Send + Sync>;

/// A minimal HTTP/1.1 endpoint: records every request and answers as `answer` says, with
/// `done <key>` as the body of a 200.
struct Endpoint {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    async fn start(answer: Answer) -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let log = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let log = Arc::clone(&log);
                let answer = Arc::clone(&answer);
                tokio::spawn(async move {
                    let _ = serve(conn, &log, &*answer).await;
                });
            }
        });
        Endpoint {
            addr,
            requests,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the requests of one connection (keep-alive).
async fn serve(
    mut conn: tokio::net::TcpStream,
    log: &Mutex<Vec<Request>>,
    answer: &(dyn Fn(&str, bool) -> u16 + Send + Sync),
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let headers: HashMap<String, String> = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .get("content-length")
            .map_or(0, |v| v.parse().unwrap());
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[head_end..head_end + len].to_vec();
        buf.drain(..head_end + len);
        let key = headers.get("idempotency-key").cloned().unwrap_or_default();
        let status = {
            let mut log = log.lock().unwrap();
            let seen = log
                .iter()
                .any(|r| r.headers.get("idempotency-key") == Some(&key));
            let status = answer(&key, seen);
            log.push(Request {
                headers,
                body,
                status,
            });
            status
        };
        let (reason, answer) = match status {
            200 => ("OK", format!("done {key}")),
            422 => ("Unprocessable Entity", "unknown customer".to_owned()),
            _ => ("Internal Server Error", "the database is down".to_owned()),
        };
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{answer}",
            answer.len()
        );
        conn.write_all(response.as_bytes()).await?;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoint_gets_each_key_once_and_a_500_is_retried() {
    const N: usize = 20;
    let Some(url) = server::url(server::NATS) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let stream = unique("http");
    let subject = format!("{stream}.in");
    let ns = "http-orders";
    // r-0 and r-7 meet a 500 first: the sidecar must retry them, not ack them.
    let failing = [format!("{ns}:r-0"), format!("{ns}:r-7")];
    let fail_first = failing.to_vec();
    let endpoint = Endpoint::start(Arc::new(move |key: &str, seen: bool| {
        if fail_first.iter().any(|k| k == key) && !seen {
            500
        } else {
            200
        }
    }))
    .await;
    let store = sqlite(dir.path());
    let sidecar = Sidecar::start(
        &[
            "--from",
            &url,
            "--stream",
            &stream,
            "--subject",
            &subject,
            "--namespace",
            ns,
            "--key",
            "header:Request-Id",
            "--store",
            &store,
            "--http",
            &endpoint.url(),
        ],
        &[],
    );

    // Each request is published twice as two different NATS messages (no shared Nats-Msg-Id,
    // so JetStream keeps both: real duplicates in the stream) with one Request-Id header.
    let producer = NatsProducer::connect(&url).await.unwrap();
    for i in 0..N {
        for _copy in 0..2 {
            let msg = Outgoing::new(format!("{{\"i\": {i}}}").into_bytes())
                .with_header("Request-Id", format!("r-{i}"));
            let published = producer.publish(&subject, &msg).await.unwrap();
            assert!(!published.duplicate);
        }
    }
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let mut in_stream = js.get_stream(&stream).await.unwrap();
    assert_eq!(
        in_stream.info().await.unwrap().state.messages,
        2 * N as u64,
        "both copies are in the stream"
    );

    let successes = || {
        endpoint
            .requests()
            .iter()
            .filter(|r| r.status == 200)
            .count()
    };
    until(60, "a 200 per key", async || successes() >= N).await;
    // Copies nacked with a delay (they met a first run in progress) come back and are replayed.
    until(60, "the durable consumer to settle", async || {
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            in_stream.get_consumer(ns).await.unwrap();
        let i = consumer.info().await.unwrap();
        i.num_ack_pending == 0 && i.num_pending == 0
    })
    .await;
    let (status, stats) = sidecar.stop();
    assert!(status.success(), "idem consume exited with {status}");

    let requests = endpoint.requests();
    let mut by_key: HashMap<String, Vec<&Request>> = HashMap::new();
    for r in &requests {
        let key = r
            .headers
            .get("idempotency-key")
            .expect("every request carries Idempotency-Key");
        by_key.entry(key.clone()).or_default().push(r);
    }
    assert_eq!(by_key.len(), N, "{by_key:#?}");
    for i in 0..N {
        let key = format!("{ns}:r-{i}");
        let reqs = &by_key[&key];
        let statuses: Vec<u16> = reqs.iter().map(|r| r.status).collect();
        if failing.contains(&key) {
            assert_eq!(statuses, [500, 200], "{key}: {reqs:#?}");
            assert_eq!(reqs[1].headers["idem-attempt"], "2", "{key}");
        } else {
            assert_eq!(statuses, [200], "{key}: {reqs:#?}");
            assert_eq!(reqs[0].headers["idem-attempt"], "1", "{key}");
        }
        for r in reqs {
            assert_eq!(r.body, format!("{{\"i\": {i}}}").into_bytes());
            assert_eq!(r.headers["content-type"], "application/octet-stream");
            assert_eq!(r.headers["idem-header-request-id"], format!("r-{i}"));
            assert_eq!(r.headers["idem-origin"], stream);
        }
    }
    assert_eq!(stats["executed"], N as u64, "{stats:?}");
    assert_eq!(stats["acked"], 2 * N as u64, "{stats:?}");
    assert!(stats["retried"] >= 2, "the 500s were retried: {stats:?}");
    assert_eq!(stats["dead_lettered"], 0, "{stats:?}");

    // The endpoint's answer is the stored result.
    let out = idem(&["get", "--store", &store, &format!("{ns}:r-3"), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["state"], "completed", "{record}");
    assert_eq!(record["result"], format!("done {ns}:r-3"), "{record}");

    let _ = js.delete_stream(&stream).await;
    let _ = js.delete_stream(format!("{stream}_DLQ")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_is_a_failed_attempt_and_dead_lettered_with_the_status() {
    // A 4xx must never be acked as a success (nothing was done) nor retried forever: it is a
    // failed attempt, and after --max-attempts the message goes to the dead-letter stream with
    // the status and the endpoint's explanation.
    let Some(url) = server::url(server::NATS) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let stream = unique("http-4xx");
    let subject = format!("{stream}.in");
    let endpoint = Endpoint::start(Arc::new(|_: &str, _: bool| 422)).await;
    let store = sqlite(dir.path());
    let sidecar = Sidecar::start(
        &[
            "--from",
            &url,
            "--stream",
            &stream,
            "--subject",
            &subject,
            "--namespace",
            "http-4xx",
            "--store",
            &store,
            "--max-attempts",
            "2",
            "--http",
            &endpoint.url(),
        ],
        &[],
    );
    let producer = NatsProducer::connect(&url).await.unwrap();
    producer
        .publish(&subject, &Outgoing::with_id("bad-1", &b"{}"[..]))
        .await
        .unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let dlq = format!("{stream}_DLQ");
    until(60, "the dead letter", async || {
        let mut s = js.get_stream(&dlq).await.unwrap();
        s.info().await.unwrap().state.messages == 1
    })
    .await;
    let (status, stats) = sidecar.stop();
    assert!(status.success(), "idem consume exited with {status}");
    let statuses: Vec<u16> = endpoint.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [422, 422], "two attempts, then no more");
    assert_eq!(stats["dead_lettered"], 1, "{stats:?}");
    assert_eq!(stats["executed"], 0, "{stats:?}");
    let dead = js
        .get_stream(&dlq)
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap();
    let reason = dead
        .headers
        .get(idem_broker::header::DEAD_LETTER_REASON)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    assert!(
        reason.contains("attempt 2 of 2 failed")
            && reason.contains("422 Unprocessable Entity")
            && reason.contains("unknown customer"),
        "{reason}"
    );
    let _ = js.delete_stream(&stream).await;
    let _ = js.delete_stream(&dlq).await;
}

// ---------------------------------------------------------------------------------------------
// 3. A failing command: retried, then dead-lettered, acked only after the dead-letter publish.

/// `sh -c` without --shell: the sidecar splits the words itself; the inner shell records each
/// attempt and fails.
const FAILING: &str =
    r#"sh -c 'echo "$IDEM_ATTEMPT" >> "$ATTEMPTS"; echo "no such customer" >&2; exit 3'"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_command_is_retried_then_dead_lettered() {
    let Some(url) = server::url(server::AMQP) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("failing");
    let attempts = dir.path().join("attempts.txt");
    let store = sqlite(dir.path());
    let sidecar = Sidecar::start(
        &[
            "--from",
            &url,
            "--queue",
            &queue,
            "--namespace",
            "dl-test",
            "--store",
            &store,
            "--max-attempts",
            "3",
            "--exec",
            FAILING,
        ],
        &[("ATTEMPTS", &attempts)],
    );
    let producer = AmqpProducer::connect(&url).await.unwrap();
    producer
        .publish(
            "",
            &queue,
            &Outgoing::with_id("order-1", &b"{\"order\": 1}"[..]),
        )
        .await
        .unwrap();
    let dlq = format!("{queue}.dlq");
    until(60, "the dead letter", async || ready(&url, &dlq).await == 1).await;
    let (status, stats) = sidecar.stop();
    assert!(status.success(), "idem consume exited with {status}");
    assert_eq!(
        lines(&attempts),
        ["1", "2", "3"],
        "three attempts, then no more"
    );
    assert_eq!(stats["dead_lettered"], 1, "{stats:?}");
    assert_eq!(stats["executed"], 0, "{stats:?}");
    assert_eq!(ready(&url, &queue).await, 0, "the original was acked");
    let dead = drain(&url, &dlq).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].delivery.data, b"{\"order\": 1}");
    let reason = amqp_header(&dead[0], idem_broker::header::DEAD_LETTER_REASON);
    assert!(
        reason.contains("attempt 3 of 3 failed") && reason.contains("exit status: 3"),
        "{reason}"
    );
    amqp_cleanup(&url, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_broker_refuses_is_not_acked() {
    // A sidecar that acked before the dead-letter publish was confirmed would lose this
    // message: the dead-letter exchange exists but routes nowhere, so every publish comes back
    // unroutable. The message must stay in the queue until a dead-letter queue is bound, and
    // then be dead-lettered without running the command again (its attempts are spent).
    let Some(url) = server::url(server::AMQP) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("refused");
    let (dlx, dlq) = (format!("{queue}.dlx"), format!("{queue}.dlq"));
    let attempts = dir.path().join("attempts.txt");
    let store = sqlite(dir.path());
    {
        let conn = amqp(&url).await;
        let ch = conn.create_channel().await.unwrap();
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        ch.queue_declare(queue.as_str().into(), durable, FieldTable::default())
            .await
            .unwrap();
        ch.exchange_declare(
            dlx.as_str().into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let _ = conn.close(200, "bye".into()).await;
    }
    let args = [
        "--from",
        &url,
        "--queue",
        &queue,
        "--no-declare",
        "--namespace",
        "dl-refused",
        "--store",
        &store,
        "--max-attempts",
        "2",
        "--exec",
        FAILING,
    ];
    let sidecar = Sidecar::start(&args, &[("ATTEMPTS", &attempts)]);
    let producer = AmqpProducer::connect(&url).await.unwrap();
    producer
        .publish(
            "",
            &queue,
            &Outgoing::with_id("order-2", &b"{\"order\": 2}"[..]),
        )
        .await
        .unwrap();
    until(60, "two attempts", async || lines(&attempts).len() >= 2).await;
    // A few refused dead-letter publishes (one a second).
    until(30, "a refused dead letter", async || {
        sidecar.said("dead-letter publish not confirmed")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, stats) = sidecar.stop();
    assert!(status.success(), "idem consume exited with {status}");
    assert_eq!(stats["dead_lettered"], 0, "{stats:?}");
    assert_eq!(stats["acked"], 0, "{stats:?}");
    assert!(stats["settle_errors"] >= 1, "{stats:?}");
    // Closing the sidecar's connection gave the unacked message back to the queue.
    until(10, "the message back in the queue", async || {
        ready(&url, &queue).await == 1
    })
    .await;

    // Now the dead letters have somewhere to go.
    {
        let conn = amqp(&url).await;
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            dlq.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_bind(
            dlq.as_str().into(),
            dlx.as_str().into(),
            queue.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let _ = conn.close(200, "bye".into()).await;
    }
    let sidecar = Sidecar::start(&args, &[("ATTEMPTS", &attempts)]);
    until(60, "the dead letter", async || ready(&url, &dlq).await == 1).await;
    let (status, stats) = sidecar.stop();
    assert!(status.success(), "idem consume exited with {status}");
    assert_eq!(stats["dead_lettered"], 1, "{stats:?}");
    assert_eq!(
        lines(&attempts),
        ["1", "2"],
        "the command did not run again"
    );
    assert_eq!(ready(&url, &queue).await, 0, "acked after the dead letter");
    let dead = drain(&url, &dlq).await;
    let reason = amqp_header(&dead[0], idem_broker::header::DEAD_LETTER_REASON);
    assert!(reason.contains("attempt 2 of 2 failed"), "{reason}");
    amqp_cleanup(&url, &queue).await;
}

// ---------------------------------------------------------------------------------------------
// Redis Streams: one more broker through the same sidecar, keyed by a JSON field.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stream_duplicates_keyed_by_a_json_field_run_once() {
    const N: usize = 10;
    let Some(url) = server::url(server::REDIS) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let stream = unique("redis");
    let effects = dir.path().join("effects.txt");
    let store = sqlite(dir.path());
    // No shell: the program reads the environment itself.
    let sidecar = Sidecar::start(
        &[
            "--from",
            &url,
            "--stream",
            &stream,
            "--namespace",
            "redis-orders",
            "--key",
            "json:/order",
            "--store",
            &store,
            "--exec",
            r#"sh -c 'echo "$IDEM_KEY_ID" >> "$EFFECTS"; echo stored-result'"#,
        ],
        &[("EFFECTS", &effects)],
    );
    // Two entries per order, each with its own message id (as two unrelated producers would):
    // only the JSON field tells they are one order.
    let producer = RedisStreamProducer::connect(&url).await.unwrap();
    for i in 0..N {
        for _ in 0..2 {
            let msg = Outgoing::new(format!("{{\"order\": \"o-{i}\"}}").into_bytes());
            producer.publish(&stream, &msg).await.unwrap();
        }
    }
    until(60, "an effect per order", async || {
        lines(&effects).len() >= N
    })
    .await;
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    until(60, "the consumer group to settle", async || {
        let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&stream)
            .query_async(&mut conn)
            .await
            .unwrap();
        groups
            .groups
            .iter()
            .any(|g| g.name == "redis-orders" && g.pending == 0 && g.lag == Some(0))
    })
    .await;
    let (status, stats) = sidecar.stop();
    assert!(status.success(), "idem consume exited with {status}");
    let mut effects = lines(&effects);
    effects.sort();
    let mut expected: Vec<String> = (0..N).map(|i| format!("o-{i}")).collect();
    expected.sort();
    assert_eq!(effects, expected);
    assert_eq!(stats["executed"], N as u64, "{stats:?}");
    assert_eq!(stats["acked"], 2 * N as u64, "{stats:?}");
    let out = idem(&["get", "--store", &store, "redis-orders:o-4", "--json"]);
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["result"], "stored-result\n", "{record}");

    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .arg(format!("{stream}:dead-letter"))
        .query_async(&mut conn)
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// MQTT: QoS 1 has no publish dedup; a producer retry is a second message with the same id.

/// Removes the persistent sessions a test left on the broker (its own and its dead-letter one).
async fn mqtt_forget_sessions(url: &str, client_ids: &[String]) {
    let (host, port) = server::host_port(url).unwrap();
    for id in client_ids {
        let mut opts = rumqttc::v5::MqttOptions::new(id, host.as_str(), port);
        opts.set_clean_start(true);
        opts.set_session_expiry_interval(Some(0));
        let (client, mut events) = rumqttc::v5::AsyncClient::new(opts, 8);
        let connected = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match events.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(
                        rumqttc::v5::mqttbytes::v5::Packet::ConnAck(_),
                    )) => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .await;
        if connected == Ok(true) {
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(1), events.poll()).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_producer_retries_run_the_command_once() {
    const N: usize = 10;
    let Some(url) = server::url(server::MQTT) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let topic = format!("{}/orders", unique("mqtt"));
    let client_id = unique("mqtt-client");
    let effects = dir.path().join("effects.txt");
    let store = sqlite(dir.path());
    let sidecar = Sidecar::start(
        &[
            "--from",
            &url,
            "--topic",
            &topic,
            "--client-id",
            &client_id,
            "--namespace",
            "mqtt-orders",
            "--store",
            &store,
            "--shell",
            "--exec",
            r#"echo "$IDEM_MESSAGE_ID $(cat)" >> "$EFFECTS""#,
        ],
        &[("EFFECTS", &effects)],
    );
    let producer = idem_broker::mqtt::MqttProducer::connect(&url)
        .await
        .unwrap();
    let msgs: Vec<Outgoing> = (0..N)
        .map(|i| Outgoing::with_id(format!("m-{i}"), format!("payload-{i}").into_bytes()))
        .collect();
    for m in &msgs {
        // The retry after a lost PUBACK: the same message id, a new MQTT message.
        producer.publish(&topic, m).await.unwrap();
        producer.publish(&topic, m).await.unwrap();
    }
    until(60, "an effect per message", async || {
        lines(&effects).len() >= N
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, stats) = sidecar.stop();
    assert!(status.success(), "idem consume exited with {status}");
    let mut got = lines(&effects);
    got.sort();
    let mut expected: Vec<String> = (0..N).map(|i| format!("m-{i} payload-{i}")).collect();
    expected.sort();
    assert_eq!(got, expected);
    assert_eq!(stats["executed"], N as u64, "{stats:?}");
    assert_eq!(stats["acked"], 2 * N as u64, "{stats:?}");
    mqtt_forget_sessions(
        &url,
        &[client_id.clone(), format!("{client_id}.dead-letter")],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// 4. Bad arguments: clear errors, at once, no password printed.

fn fails_with(args: &[&str], expected: &[&str]) {
    let mut all = vec!["consume"];
    all.extend_from_slice(args);
    let started = Instant::now();
    let out = idem(&all);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "idem {all:?} succeeded: {stderr}");
    for text in expected {
        assert!(
            stderr.contains(text),
            "idem {all:?}: expected {text:?} in:\n{stderr}"
        );
    }
    assert!(
        !stderr.contains("secret"),
        "a password was printed:\n{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "idem {all:?} took {:?} to fail",
        started.elapsed()
    );
}

#[test]
fn bad_arguments_are_refused_clearly() {
    let base = ["--namespace", "n", "--store", "memory"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        v
    };
    fails_with(
        &with(&[
            "--from",
            "kafka://u:secret@127.0.0.1:9092",
            "--exec",
            "true",
        ]),
        &[
            "unsupported broker URL scheme \"kafka\"",
            "amqp://",
            "nats://",
        ],
    );
    fails_with(
        &with(&[
            "--from",
            "amqps://u:secret@127.0.0.1",
            "--queue",
            "q",
            "--exec",
            "true",
        ]),
        &["TLS"],
    );
    fails_with(
        &with(&["--from", "amqp://127.0.0.1", "--queue", "q"]),
        &["--exec", "--http", "required"],
    );
    fails_with(
        &with(&[
            "--from",
            "amqp://127.0.0.1",
            "--queue",
            "q",
            "--exec",
            "true",
            "--http",
            "http://127.0.0.1:1/",
        ]),
        &["cannot be used with"],
    );
    fails_with(
        &with(&[
            "--from",
            "amqp://127.0.0.1",
            "--queue",
            "q",
            "--key",
            "uuid",
            "--exec",
            "true",
        ]),
        &["unknown key source \"uuid\"", "header:NAME"],
    );
    fails_with(
        &with(&[
            "--from",
            "amqp://127.0.0.1",
            "--queue",
            "q",
            "--key",
            "json:order",
            "--exec",
            "true",
        ]),
        &["unknown key source"],
    );
    fails_with(
        &with(&["--from", "amqp://127.0.0.1", "--exec", "true"]),
        &["amqp:// needs --queue"],
    );
    fails_with(
        &with(&[
            "--from",
            "amqp://127.0.0.1",
            "--queue",
            "q",
            "--topic",
            "t",
            "--exec",
            "true",
        ]),
        &["--topic does not apply to amqp://"],
    );
    fails_with(
        &with(&["--from", "nats://127.0.0.1", "--exec", "true"]),
        &["nats:// needs --stream"],
    );
    fails_with(
        &with(&[
            "--from",
            "amqp://127.0.0.1",
            "--queue",
            "q",
            "--exec",
            "no-such-program-42",
        ]),
        &["cannot find the program \"no-such-program-42\""],
    );
    fails_with(
        &with(&[
            "--from",
            "amqp://127.0.0.1",
            "--queue",
            "q",
            "--http",
            "https://u:secret@example.com/",
        ]),
        &["https is not built"],
    );
    fails_with(
        &with(&[
            "--from",
            "amqp://127.0.0.1",
            "--queue",
            "q",
            "--exec",
            "true",
            "--timeout",
            "soon",
        ]),
        &["invalid duration \"soon\""],
    );
    fails_with(
        &[
            "--namespace",
            "n",
            "--store",
            "ftp://u:secret@h/x",
            "--from",
            "amqp://127.0.0.1",
            "--queue",
            "q",
            "--exec",
            "true",
        ],
        &["unsupported store URL scheme \"ftp\""],
    );
    fails_with(
        &[
            "--namespace",
            "bad name",
            "--from",
            "amqp://127.0.0.1",
            "--queue",
            "q",
            "--exec",
            "true",
        ],
        &["--namespace", "' '"],
    );
}

#[test]
fn unreachable_brokers_fail_at_start_without_printing_passwords() {
    // Port 9 (discard) is closed on the test machines.
    let base = ["--namespace", "n", "--store", "memory", "--exec", "true"];
    for from in [
        [
            "--from",
            "amqp://guest:secret@127.0.0.1:9/%2f",
            "--queue",
            "q",
        ],
        ["--from", "nats://u:secret@127.0.0.1:9", "--stream", "S"],
        ["--from", "mqtt://u:secret@127.0.0.1:9", "--topic", "t"],
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(&from);
        let expected = format!("cannot consume from {}", from[1].replace("secret", "***"));
        fails_with(&args, &[expected.as_str(), "refused"]);
    }
}
