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
//! - running in production: a sidecar killed with SIGKILL takes its running commands (and
//!   their children) with it, so no effect happens after the crash to be repeated after the
//!   lease; it never holds claims on more keys than it can run; the AMQP content type reaches
//!   `--http`; start-up failures (wrong password, unknown vhost, a queue declared otherwise, an
//!   unknown host, a store that cannot open) are one line naming the problem; stats lines show
//!   progress; failed attempts back off from a second, as `--retry-delay` says.

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
use idem_testkit::until_async as until;
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
        Sidecar::start_logging(args, env, Some("warn,idem_broker=info"))
    }

    /// As [`start`](Sidecar::start), with `RUST_LOG` set to `rust_log` (`None`: unset, the
    /// sidecar's default filter).
    fn start_logging(args: &[&str], env: &[(&str, &Path)], rust_log: Option<&str>) -> Sidecar {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_idem"));
        match rust_log {
            Some(filter) => cmd.env("RUST_LOG", filter),
            None => cmd.env_remove("RUST_LOG"),
        };
        cmd.arg("consume")
            .args(args)
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

impl Sidecar {
    /// Kills the sidecar with SIGKILL (no chance to clean up) and reaps it.
    fn sigkill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
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
    idem_testkit::unique(&format!("consume-{prefix}"))
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
            "pulsar://u:secret@127.0.0.1:6650",
            "--exec",
            "true",
        ]),
        &[
            "unsupported broker URL scheme \"pulsar\"",
            "amqp://",
            "kafka://",
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

// ---------------------------------------------------------------------------------------------
// 5. Running idem in production: crashes, content types, start-up errors, stats, retries.

/// Whether the process `pid` is gone (or a zombie waiting for a reaper that is not ours).
fn gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// A command that records its shell's and its background `sleep`'s pids in `$PIDS`, sleeps
/// `$SLEEP` seconds in a child (a grandchild of the sidecar's watchdog), then appends its key
/// to `$MARKERS`: the effect.
const SLOW_EFFECT: &str =
    r#"sleep "$SLEEP" & echo "$! $$" >> "$PIDS"; wait; echo "$IDEM_KEY_ID" >> "$MARKERS""#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_sidecar_takes_its_running_commands_with_it() {
    // Before: the commands ran in process groups of their own, with nothing tying them to the
    // sidecar: after a SIGKILL of the sidecar they finished their effects (unrecorded), and
    // after the lease the restarted sidecar ran them again.
    let Some(url) = server::url(server::AMQP) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("sigkill");
    let (markers, pids) = (dir.path().join("markers"), dir.path().join("pids"));
    let store = sqlite(dir.path());
    let sidecar = Sidecar::start(
        &[
            "--from",
            &url,
            "--queue",
            &queue,
            "--namespace",
            "sigkill",
            "--store",
            &store,
            "--concurrency",
            "2",
            "--shell",
            "--exec",
            SLOW_EFFECT,
        ],
        &[
            ("MARKERS", &markers),
            ("PIDS", &pids),
            ("SLEEP", Path::new("3")),
        ],
    );
    let producer = AmqpProducer::connect(&url).await.unwrap();
    for i in 0..4 {
        producer
            .publish("", &queue, &Outgoing::with_id(format!("k-{i}"), &b"{}"[..]))
            .await
            .unwrap();
    }
    until(30, "two commands running", async || lines(&pids).len() >= 2).await;
    sidecar.sigkill();
    let running: Vec<String> = lines(&pids)
        .iter()
        .flat_map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect();
    // Well past the commands' 3 s.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        lines(&markers),
        Vec::<String>::new(),
        "commands finished their effects after their sidecar was killed"
    );
    for pid in &running {
        assert!(gone(pid), "process {pid} of a command outlived its sidecar");
    }
    amqp_cleanup(&url, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_in_hand_never_exceed_the_commands_that_can_run() {
    // Before: with --concurrency 2 and the default --batch 16, two batches of up to 16 were
    // claimed while only two commands ran; after a crash every claimed key waited a whole lease
    // although its command never started.
    const N: usize = 10;
    let Some(url) = server::url(server::AMQP) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("claims");
    let (markers, pids) = (dir.path().join("markers"), dir.path().join("pids"));
    let store = sqlite(dir.path());
    let args = |concurrency: &'static str| {
        vec![
            "--from".to_owned(),
            url.clone(),
            "--queue".to_owned(),
            queue.clone(),
            "--namespace".to_owned(),
            "claims".to_owned(),
            "--store".to_owned(),
            store.clone(),
            "--concurrency".to_owned(),
            concurrency.to_owned(),
            "--shell".to_owned(),
            "--exec".to_owned(),
            SLOW_EFFECT.to_owned(),
        ]
    };
    let start = |args: &[String], sleep: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Sidecar::start(
            &args,
            &[
                ("MARKERS", &markers),
                ("PIDS", &pids),
                ("SLEEP", Path::new(sleep)),
            ],
        )
    };
    // Declares the queue; the messages then wait in it, for the next sidecar to take them all
    // at once.
    let (status, _) = start(&args("2"), "0").stop();
    assert!(status.success());
    let producer = AmqpProducer::connect(&url).await.unwrap();
    for i in 0..N {
        producer
            .publish("", &queue, &Outgoing::with_id(format!("k-{i}"), &b"{}"[..]))
            .await
            .unwrap();
    }
    let sidecar = start(&args("2"), "30");
    until(30, "two commands running", async || lines(&pids).len() >= 2).await;
    // Let a runtime that would claim more do so.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = idem(&["inspect", "--store", &store, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let started = lines(&pids).len();
    assert_eq!(started, 2, "--concurrency 2 runs two commands");
    assert_eq!(
        view["counts"]["in_progress"], 2,
        "claims in hand with two commands running: {view}"
    );
    sidecar.sigkill();

    // The restarted sidecar runs every key whose command never started at once; only the two
    // that were running wait for their lease (30 s).
    let sidecar = start(&args("8"), "0");
    until(20, "the keys that never started", async || {
        lines(&markers).len() >= N - started
    })
    .await;
    let (status, _) = sidecar.stop();
    assert!(status.success());
    amqp_cleanup(&url, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_content_type_of_an_amqp_message_reaches_the_http_endpoint() {
    // Before: only a header named content-type was read, so a message published with the AMQP
    // content_type property application/json was POSTed as application/octet-stream.
    let Some(url) = server::url(server::AMQP) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("content-type");
    let endpoint = Endpoint::start(Arc::new(|_: &str, _: bool| 200)).await;
    let store = sqlite(dir.path());
    let sidecar = Sidecar::start(
        &[
            "--from",
            &url,
            "--queue",
            &queue,
            "--namespace",
            "ct",
            "--store",
            &store,
            "--http",
            &endpoint.url(),
        ],
        &[],
    );
    let conn = amqp(&url).await;
    let ch = conn.create_channel().await.unwrap();
    for (id, content_type) in [("json-1", Some("application/json")), ("raw-1", None)] {
        let mut props = lapin::BasicProperties::default().with_message_id(id.into());
        if let Some(t) = content_type {
            props = props.with_content_type(t.into());
        }
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            b"{\"n\": 1}",
            props,
        )
        .await
        .unwrap();
    }
    let _ = conn.close(200, "bye".into()).await;
    until(30, "both requests", async || endpoint.requests().len() >= 2).await;
    let (status, _) = sidecar.stop();
    assert!(status.success());
    let by_key: HashMap<String, String> = endpoint
        .requests()
        .iter()
        .map(|r| {
            (
                r.headers["idempotency-key"].clone(),
                r.headers["content-type"].clone(),
            )
        })
        .collect();
    assert_eq!(by_key["ct:json-1"], "application/json", "{by_key:?}");
    assert_eq!(by_key["ct:raw-1"], "application/octet-stream", "{by_key:?}");
    amqp_cleanup(&url, &queue).await;
}

/// Runs `idem consume ARGS` (no `RUST_LOG`: the default filter) expecting it to fail at start;
/// returns its stderr's lines.
fn start_up_error(args: &[&str]) -> Vec<String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_idem"))
        .arg("consume")
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "idem consume {args:?} did not fail at start:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded:\n{stderr}");
    // lapin logged its ERROR lines from its own thread, sometimes after idem's message.
    std::thread::sleep(Duration::from_millis(100));
    stderr.lines().map(str::to_owned).collect()
}

/// Asserts that `lines` is one error line holding every one of `expected`.
fn one_error_line(lines: &[String], expected: &[&str]) {
    assert_eq!(lines.len(), 1, "expected one line:\n{}", lines.join("\n"));
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    for text in expected {
        assert!(
            lines[0].contains(text),
            "expected {text:?} in:\n{}",
            lines[0]
        );
    }
    assert!(
        !lines[0].contains("wrong-secret"),
        "a password: {}",
        lines[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_start_up_failures_are_one_line_naming_the_problem() {
    // Before: three lapin ERROR lines came first (wrong password, unknown vhost, a queue
    // declared with other arguments), and a server that closed the connection showed
    // "failed to parse: Parsing Error: ParserErrors { error: Nom(MapOpt) ... }".
    let Some(url) = server::url(server::AMQP) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path());
    let parsed = url::Url::parse(&url).unwrap();
    let user = parsed.username().to_owned();
    let consume = |from: &str, queue: &str| {
        start_up_error(&[
            "--from",
            from,
            "--queue",
            queue,
            "--namespace",
            "startup",
            "--store",
            &store,
            "--exec",
            "true",
        ])
    };

    let mut wrong = parsed.clone();
    wrong.set_password(Some("wrong-secret")).unwrap();
    one_error_line(
        &consume(wrong.as_str(), "q"),
        &[&format!("authentication failed for user {user:?}")],
    );

    let mut vhost = parsed.clone();
    vhost.set_path("/idem-no-such-vhost");
    one_error_line(
        &consume(vhost.as_str(), "q"),
        &["unknown vhost \"idem-no-such-vhost\""],
    );

    // A classic queue, which the sidecar would declare as a quorum queue.
    let queue = unique("startup-classic");
    {
        let conn = amqp(&url).await;
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            queue.as_str().into(),
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
    one_error_line(
        &consume(&url, &queue),
        &[
            &format!("the queue {queue:?} exists, declared with other arguments"),
            "--queue-type",
        ],
    );
    amqp_cleanup(&url, &queue).await;

    let mut unknown = parsed.clone();
    unknown.set_host(Some("idem-no-such-host.invalid")).unwrap();
    one_error_line(
        &consume(unknown.as_str(), "q"),
        &["cannot resolve host \"idem-no-such-host.invalid\""],
    );

    // A server that accepts connections, reads the protocol header and closes them (what some
    // firewalls and proxies do for a host that cannot be reached): lapin calls it a parse
    // error.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().map_while(Result::ok) {
            use std::io::Read;
            let mut header = [0u8; 8];
            let _ = conn.read_exact(&mut header);
        }
    });
    let closing = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let lines = consume(&closing, "q");
    one_error_line(&lines, &[&format!("cannot connect to 127.0.0.1:{port}: ")]);
    assert!(!lines[0].contains("Pars"), "{}", lines[0]);
}

#[test]
fn store_start_up_failures_are_one_line_naming_the_problem() {
    // Before: SQLite's "unable to open database file" four times; MariaDB's 1045 three times
    // (and only once the first message came: the pool connects on first use).
    let dir = tempfile::tempdir().unwrap();
    let consume = |store: &str| {
        start_up_error(&[
            "--from",
            "amqp://guest:guest@127.0.0.1:9/%2f",
            "--queue",
            "q",
            "--namespace",
            "startup",
            "--store",
            store,
            "--exec",
            "true",
        ])
    };
    let missing = dir.path().join("no/such/dir/idem.db");
    one_error_line(
        &consume(&format!("sqlite:{}", missing.display())),
        &[&format!(
            "cannot open the SQLite file {}: the directory {} does not exist",
            missing.display(),
            dir.path().join("no/such/dir").display()
        )],
    );
    one_error_line(
        &consume(&format!("sqlite:{}", dir.path().display())),
        &["it is a directory"],
    );

    let Some(mysql) = server::url(server::MYSQL) else {
        return;
    };
    let mut wrong = url::Url::parse(&mysql).unwrap();
    let user = wrong.username().to_owned();
    wrong.set_password(Some("wrong-secret")).unwrap();
    one_error_line(
        &consume(wrong.as_str()),
        &[&format!("authentication failed for user {user:?}")],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_sidecar_logs_stats_lines() {
    // Before: nothing between the "consuming" line and the "stopped" summary.
    let Some(url) = server::url(server::AMQP) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("stats");
    let store = sqlite(dir.path());
    let sidecar = Sidecar::start_logging(
        &[
            "--from",
            &url,
            "--queue",
            &queue,
            "--namespace",
            "stats",
            "--store",
            &store,
            "--stats-interval",
            "1s",
            "--exec",
            "true",
        ],
        &[],
        None,
    );
    let producer = AmqpProducer::connect(&url).await.unwrap();
    for i in 0..3 {
        let msg = Outgoing::with_id(format!("s-{i}"), &b"{}"[..]);
        // Each twice: one execution, one replay.
        producer.publish("", &queue, &msg).await.unwrap();
        producer.publish("", &queue, &msg).await.unwrap();
    }
    let stats_lines = || -> Vec<String> {
        sidecar
            .stderr
            .all()
            .into_iter()
            .filter(|l| l.contains(" INFO ") && l.contains("stats: "))
            .collect()
    };
    // Copies that met their first run in progress come back later (retried) and are replayed.
    until(30, "a stats line with every copy acked", async || {
        stats_lines()
            .iter()
            .any(|l| l.contains("executed=3 replayed=3 acked=6 "))
    })
    .await;
    let last = stats_lines().pop().unwrap();
    for field in [
        "stats: received=",
        "retried=",
        "dead_lettered=0 store_errors=0 settle_errors=0",
        "received_per_s=",
        "executed_per_s=",
    ] {
        assert!(last.contains(field), "{field} in {last}");
    }
    let (status, _) = sidecar.stop();
    assert!(status.success());
    amqp_cleanup(&url, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_a_usable_key_is_logged_with_its_reason() {
    // Before: a message dead-lettered for having no usable key (malformed JSON, a missing
    // pointer) left no trace in the sidecar's log, even at debug level.
    let Some(url) = server::url(server::AMQP) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("nokey");
    let store = sqlite(dir.path());
    let sidecar = Sidecar::start_logging(
        &[
            "--from",
            &url,
            "--queue",
            &queue,
            "--namespace",
            "nokey",
            "--store",
            &store,
            "--key",
            "json:/order",
            "--exec",
            "true",
        ],
        &[],
        None,
    );
    let producer = AmqpProducer::connect(&url).await.unwrap();
    producer
        .publish(
            "",
            &queue,
            &Outgoing::with_id("bad-json", &b"{not json"[..]),
        )
        .await
        .unwrap();
    producer
        .publish(
            "",
            &queue,
            &Outgoing::with_id("no-order", &br#"{"id": 1}"#[..]),
        )
        .await
        .unwrap();
    let logged = |id: &str| {
        sidecar.stderr.all().into_iter().any(|l| {
            l.contains(" WARN ")
                && l.contains("dead-lettering")
                && l.contains(id)
                && l.contains("no usable key")
        })
    };
    until(
        30,
        "both dead letters logged with their reason",
        async || logged("bad-json") && logged("no-order"),
    )
    .await;
    let (status, _) = sidecar.stop();
    assert!(status.success());
    amqp_cleanup(&url, &queue).await;
}

/// The seconds between consecutive lines of `$ATTEMPTS` (each a `date +%s.%N`).
fn gaps(attempts: &Path) -> Vec<f64> {
    let times: Vec<f64> = lines(attempts).iter().map(|l| l.parse().unwrap()).collect();
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempts_back_off_from_a_second_and_the_flags_change_it() {
    // Before: 200 ms doubling, so the 5 attempts of a message whose endpoint was not up yet
    // were spent in about 3 s; and no flag changed it.
    let Some(url) = server::url(server::AMQP) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = async |name: &str, extra: &[&str]| -> Vec<f64> {
        let queue = unique(name);
        let attempts = dir.path().join(format!("{name}.txt"));
        let store = sqlite(dir.path());
        let mut args: Vec<&str> = vec![
            "--from",
            &url,
            "--queue",
            &queue,
            "--namespace",
            name,
            "--store",
            &store,
            "--max-attempts",
            "3",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--exec", r#"sh -c 'date +%s.%N >> "$ATTEMPTS"; exit 1'"#]);
        let sidecar = Sidecar::start(&args, &[("ATTEMPTS", &attempts)]);
        let producer = AmqpProducer::connect(&url).await.unwrap();
        producer
            .publish("", &queue, &Outgoing::with_id("failing", &b"{}"[..]))
            .await
            .unwrap();
        until(60, "three attempts", async || lines(&attempts).len() >= 3).await;
        let (status, _) = sidecar.stop();
        assert!(status.success());
        amqp_cleanup(&url, &queue).await;
        gaps(&attempts)
    };
    // Defaults: 1 s, then 2 s (each ±25%).
    let gaps_default = run("retry-default", &[]).await;
    assert!(
        gaps_default[0] >= 0.7 && gaps_default[1] >= 1.4,
        "{gaps_default:?}"
    );
    // 1.5 s, capped at 1.5 s: the second delay does not double.
    let gaps_set = run(
        "retry-set",
        &["--retry-delay", "1500ms", "--max-retry-delay", "1500ms"],
    )
    .await;
    assert!(
        gaps_set.iter().all(|g| (1.0..2.5).contains(g)),
        "{gaps_set:?}"
    );
}

/// `GET path` on `addr`: the status code and the body.
async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_serves_the_series_and_health() {
    // An operator scrapes a running sidecar: `/metrics` has the executor's and the runtime's
    // series, `/healthz` answers, `/readyz` is ready while it consumes.
    let Some(url) = server::url(server::AMQP) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("metrics");
    let store = sqlite(dir.path());
    let addr = format!("127.0.0.1:{}", idem_testkit::free_port());
    let sidecar = Sidecar::start_logging(
        &[
            "--from",
            &url,
            "--queue",
            &queue,
            "--namespace",
            "metered",
            "--store",
            &store,
            "--metrics-addr",
            &addr,
            "--exec",
            "true",
        ],
        &[],
        None,
    );
    assert_eq!(http_get(&addr, "/healthz").await.0, 200);
    assert_eq!(
        http_get(&addr, "/readyz").await,
        (200, "ready\n".to_owned())
    );
    let producer = AmqpProducer::connect(&url).await.unwrap();
    for i in 0..3 {
        let msg = Outgoing::with_id(format!("m-{i}"), &b"{}"[..]);
        producer.publish("", &queue, &msg).await.unwrap();
        producer.publish("", &queue, &msg).await.unwrap();
    }
    let series = |body: &str, name: &str| -> Option<f64> {
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    until(30, "every copy acked in /metrics", async || {
        let (_, body) = http_get(&addr, "/metrics").await;
        series(&body, "idem_consumer_acked_total{consumer=\"metered\"}") == Some(6.0)
    })
    .await;
    let (status, body) = http_get(&addr, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "idem_executed_total{executor=\"metered\"} 3",
        "idem_consumer_received_total{consumer=\"metered\"}",
        "idem_consumer_in_flight{consumer=\"metered\"}",
        "idem_handler_seconds",
        "idem_store_op_seconds",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    assert_eq!(http_get(&addr, "/nope").await.0, 404);
    let (status, _) = sidecar.stop();
    assert!(status.success());
    amqp_cleanup(&url, &queue).await;
}

/// The redrive round trip through the sidecar on the broker of `from` (`dest` names the queue
/// or stream): a handler that fails until it is fixed dead-letters a message after its
/// attempts; `idem redrive` clears the failed record and republishes it; the fixed handler then
/// runs it exactly once, and a second redrive finds nothing.
async fn redrive_round_trip(from: &[&str], publish: impl AsyncFn(&Outgoing)) {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path());
    let fixed = dir.path().join("fixed");
    let effects = dir.path().join("effects.txt");
    let ns = ["--namespace", "redrive", "--store", &store];
    let sidecar_args = |extra: &[&str]| -> Vec<String> {
        from.iter()
            .chain(&ns)
            .chain(extra)
            .map(|s| (*s).to_owned())
            .collect()
    };
    // Fails (exit 1) until the `fixed` file exists; then records its effect.
    let command = r#"test -f "$FIXED" && echo "$IDEM_KEY_ID" >> "$EFFECTS""#;
    let args = sidecar_args(&[
        "--max-attempts",
        "2",
        "--retry-delay",
        "100ms",
        "--max-retry-delay",
        "200ms",
        "--shell",
        "--exec",
        command,
    ]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let env: [(&str, &Path); 2] = [("FIXED", &fixed), ("EFFECTS", &effects)];
    let sidecar = Sidecar::start(&argv, &env);
    publish(&Outgoing::with_id("order-1", &b"{}"[..])).await;
    until(60, "the failing message dead-lettered", async || {
        sidecar.said("dead-lettering")
    })
    .await;
    let (status, stats) = sidecar.stop();
    assert!(status.success());
    assert_eq!(stats["dead_lettered"], 1, "{stats:?}");
    assert!(lines(&effects).is_empty());

    // The fix, then the redrive.
    std::fs::write(&fixed, b"").unwrap();
    let redrive: Vec<&str> = ["redrive"]
        .into_iter()
        .chain(from.iter().copied())
        .chain(ns)
        .chain(["--json"])
        .collect();
    let out = idem(&redrive);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["redriven"], 1, "{report}");
    assert_eq!(
        report["dead_letters"][0]["key"], "redrive:order-1",
        "{report}"
    );
    let reason = report["dead_letters"][0]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("attempt 2 of 2 failed"), "{report}");

    let sidecar = Sidecar::start(&argv, &env);
    until(60, "the redriven message processed", async || {
        !lines(&effects).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = sidecar.stop();
    assert!(status.success());
    assert_eq!(lines(&effects), ["order-1"], "processed exactly once");
    let out = idem(&redrive);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["redriven"], 0, "nothing left to redrive: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_reprocesses_a_fixed_dead_letter_once_on_rabbitmq() {
    let Some(url) = server::url(server::AMQP) else {
        return;
    };
    let queue = unique("redrive");
    let producer = AmqpProducer::connect(&url).await.unwrap();
    redrive_round_trip(&["--from", &url, "--queue", &queue], async |m| {
        producer.publish("", &queue, m).await.unwrap();
    })
    .await;
    amqp_cleanup(&url, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_reprocesses_a_fixed_dead_letter_once_on_redis_streams() {
    let Some(url) = server::url(server::REDIS) else {
        return;
    };
    let stream = unique("redrive");
    let producer = RedisStreamProducer::connect(&url).await.unwrap();
    redrive_round_trip(&["--from", &url, "--stream", &stream], async |m| {
        producer.publish(&stream, m).await.unwrap();
    })
    .await;
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: redis::RedisResult<()> = redis::cmd("DEL")
        .arg(&stream)
        .arg(format!("{stream}:dead-letter"))
        .query_async(&mut conn)
        .await;
}

// ---------------------------------------------------------------------------------------------
// Kafka (feature `kafka`): a Python producer (confluent-kafka) that retries every publish.

/// Where `.ci/run` starts its Kafka-protocol broker (`.ci/brokers/kafka.sh`).
#[cfg(feature = "kafka")]
const KAFKA: (&str, &str) = ("IDEM_KAFKA_URL", "kafka://127.0.0.1:19092");

/// Produces N JSON messages, each twice with the same `message-id` header (a retry after a
/// lost acknowledgement, which Kafka stores as a second record), and prints the ids.
#[cfg(feature = "kafka")]
const KAFKA_PRODUCER: &str = r#"
import sys, uuid
from confluent_kafka import Producer
bootstrap, topic, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
p = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
failed = []
def report(err, msg):
    if err is not None:
        failed.append(err)
for i in range(n):
    mid = str(uuid.uuid4())
    for _ in range(2):
        p.produce(topic, value=('{"n": %d}' % i).encode(), key=("order-%d" % i).encode(),
                  headers=[("message-id", mid.encode())], on_delivery=report)
    p.poll(0)
    print(mid)
left = p.flush(30)
if left or failed:
    sys.exit("not delivered: %d left, errors %r" % (left, failed))
"#;

/// A Python with confluent-kafka (its wheel carries librdkafka), in a virtual environment made
/// once under the CI cache directory.
#[cfg(feature = "kafka")]
fn python_with_confluent_kafka() -> Option<PathBuf> {
    let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
    let cache = std::env::var_os("IDEM_CI_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/idem-ci")))
        .unwrap_or_else(|| std::env::temp_dir().join("idem-ci"));
    let venv = cache.join("confluent-kafka-venv");
    let python = venv.join("bin/python");
    let imports = |p: &Path| ok(Command::new(p).args(["-c", "import confluent_kafka"]));
    if imports(&python) {
        return Some(python);
    }
    if ok(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        && ok(Command::new(venv.join("bin/pip")).args(["install", "-q", "confluent-kafka>=2.6,<3"]))
        && imports(&python)
    {
        return Some(python);
    }
    assert!(
        !server::is_ci(),
        "cannot install confluent-kafka (python3 with venv, and PyPI, are needed); CI is set, so this fails"
    );
    eprintln!("SKIPPED: cannot install confluent-kafka");
    None
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_kafka_producer_retrying_every_publish_is_applied_once_through_idem_consume() {
    const N: usize = 40;
    let Some(url) = server::url(KAFKA) else {
        return;
    };
    let Some(python) = python_with_confluent_kafka() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("kafka");
    let effects = dir.path().join("effects.txt");
    let store = sqlite(dir.path());
    // The sidecar first: it creates the topic (and its dead-letter topic). The default log
    // filter, which shows the stats lines.
    let sidecar = Sidecar::start_logging(
        &[
            "--from",
            &url,
            "--topic",
            &topic,
            "--group",
            &format!("{topic}.g"),
            "--namespace",
            "py-kafka",
            "--store",
            &store,
            "--stats-interval",
            "1s",
            "--shell",
            "--exec",
            r#"printf '%s %s %s\n' "$IDEM_MESSAGE_ID" "$IDEMPOTENCY_KEY" "$(cat)" >> "$EFFECTS""#,
        ],
        &[("EFFECTS", &effects)],
        None,
    );
    let bootstrap = url.trim_start_matches("kafka://");
    let out = tokio::process::Command::new(&python)
        .args(["-c", KAFKA_PRODUCER, bootstrap, &topic, &N.to_string()])
        .output()
        .await
        .unwrap();
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
    // Every copy acked: N executions and N replays (a copy that met its first run in progress
    // is redelivered later and replayed).
    let all_acked = format!("executed={N} replayed={N} acked={} ", 2 * N);
    until(90, "a stats line with every copy acked", async || {
        sidecar
            .stderr
            .all()
            .iter()
            .any(|l| l.contains("stats: ") && l.contains(&all_acked))
    })
    .await;
    let (status, stats) = sidecar.stop();
    assert!(status.success(), "idem consume exited with {status}");
    assert_eq!(stats["executed"], N as u64, "{stats:?}");
    assert_eq!(stats["dead_lettered"], 0, "{stats:?}");

    let effects = lines(&effects);
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for line in &effects {
        let mut parts = line.splitn(3, ' ');
        let (id, key, payload) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        assert_eq!(key, format!("py-kafka:{id}"), "{line}");
        let i = ids
            .iter()
            .position(|x| x == id)
            .expect("an id the producer sent");
        assert_eq!(payload, format!("{{\"n\": {i}}}"), "{line}");
        *seen.entry(id).or_default() += 1;
    }
    assert_eq!(effects.len(), N, "{effects:#?}");
    for id in &ids {
        assert_eq!(seen.get(id.as_str()), Some(&1), "effects of {id}");
    }
}
