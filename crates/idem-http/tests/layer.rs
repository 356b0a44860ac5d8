//! The layer through a real HTTP client against a real axum server on 127.0.0.1, on every
//! store: one execution under 500 concurrent duplicates, mismatches, the header allow-list,
//! body caps, principals, 5xx and panics, metrics, and a server SIGKILLed mid-request whose key
//! is taken over exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use common::{Runs, TestStore, client, post as send};
use http::StatusCode;
use idem_http::{BuildError, IdempotencyLayer, PROBLEM_JSON};

async fn server(
    store: &TestStore,
    build: impl FnOnce(
        idem_http::IdempotencyLayerBuilder<idem::AnyStore>,
    ) -> idem_http::IdempotencyLayerBuilder<idem::AnyStore>,
) -> (std::net::SocketAddr, Runs, tokio::task::JoinHandle<()>) {
    let runs = Runs::default();
    let layer = build(common::layer(store.store.clone())).build().unwrap();
    let (addr, handle) = common::serve(common::app(runs.clone()).layer(layer)).await;
    (addr, runs, handle)
}

fn is_problem(r: &reqwest::Response) -> bool {
    r.headers()
        .get("content-type")
        .is_some_and(|v| v.to_str().unwrap() == PROBLEM_JSON)
}

fn replayed(r: &reqwest::Response) -> bool {
    r.headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

/// 500 requests with one key at once: the handler runs once; every other answer is a 409
/// with Retry-After or the replay of the one result.
async fn concurrent_once(store: &TestStore, wait: bool) {
    let (addr, runs, handle) = server(store, |b| {
        if wait {
            b.wait_for_result(Duration::from_secs(30))
        } else {
            b
        }
    })
    .await;
    let c = client();
    let key = if wait { "k-500-wait" } else { "k-500" };
    let mut tasks = Vec::new();
    for _ in 0..500 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let r = send(&c, addr, "/orders", "alice", Some(key), "{\"n\":1}")
                .header("x-delay-ms", "300")
                .send()
                .await
                .unwrap();
            let status = r.status();
            let rep = replayed(&r);
            let retry = r.headers().get("retry-after").is_some();
            let problem = is_problem(&r);
            (status, rep, retry, problem, r.text().await.unwrap())
        }));
    }
    let (mut executed, mut replays, mut conflicts) = (0, 0, 0);
    let mut bodies = std::collections::HashSet::new();
    for t in tasks {
        let (status, rep, retry, problem, body) = t.await.unwrap();
        match status {
            StatusCode::CREATED if rep => {
                replays += 1;
                bodies.insert(body);
            }
            StatusCode::CREATED => {
                executed += 1;
                bodies.insert(body);
            }
            StatusCode::CONFLICT => {
                assert!(retry && problem, "409 without Retry-After or problem+json");
                conflicts += 1;
            }
            other => panic!("{}: unexpected {other}: {body}", store.name),
        }
    }
    assert_eq!(runs.of("orders", key), 1, "{}: handler runs", store.name);
    assert_eq!(executed, 1, "{}", store.name);
    assert_eq!(
        bodies.len(),
        1,
        "{}: replays differ: {bodies:?}",
        store.name
    );
    assert_eq!(executed + replays + conflicts, 500);
    if wait {
        assert_eq!(conflicts, 0, "{}: waiting requests got 409", store.name);
    }
    eprintln!(
        "{}: 500 concurrent (wait={wait}): 1 executed, {replays} replayed, {conflicts} conflicts",
        store.name
    );
    handle.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_concurrent_duplicates_run_once_on_every_store() {
    for store in common::stores().await {
        concurrent_once(&store, false).await;
        if matches!(store.name, "memory" | "sqlite") {
            concurrent_once(&store, true).await;
        }
        store.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatch_replay_headers_and_errors_on_every_store() {
    for store in common::stores().await {
        let name = store.name;
        let (addr, runs, handle) = server(&store, |b| b).await;
        let c = client();

        // First run: the handler's whole response, cookies included.
        let r = send(&c, addr, "/orders/1", "alice", Some("m1"), "a")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "{name}");
        assert!(!replayed(&r));
        assert!(r.headers().get("set-cookie").is_some());
        let first = r.text().await.unwrap();

        // The replay: status, body and the allow-listed headers only.
        let r = send(&c, addr, "/orders/1", "alice", Some("m1"), "a")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "{name}");
        assert!(replayed(&r), "{name}: no Idempotent-Replayed");
        let h = r.headers().clone();
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["location"], "/orders/7");
        assert_eq!(h["etag"], "\"v1\"");
        for never in [
            "set-cookie",
            "x-ratelimit-remaining",
            "x-request-id",
            "www-authenticate",
        ] {
            assert!(h.get(never).is_none(), "{name}: {never} was replayed");
        }
        assert_eq!(r.text().await.unwrap(), first);

        // Same key, another body; same key, another path of the same route: 422.
        for (path, body) in [("/orders/1", "b"), ("/orders/2", "a")] {
            let r = send(&c, addr, path, "alice", Some("m1"), body)
                .send()
                .await
                .unwrap();
            assert_eq!(
                r.status(),
                StatusCode::UNPROCESSABLE_ENTITY,
                "{name} {path}"
            );
            assert!(is_problem(&r));
            let doc: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            assert_eq!(doc["code"], "idempotency_key_mismatch");
            assert_eq!(doc["status"], 422);
        }
        assert_eq!(runs.of("orders", "m1"), 1, "{name}");

        // Missing, malformed, too long: 400, the handler does not run.
        let r = send(&c, addr, "/orders/1", "alice", None, "a")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(is_problem(&r));
        for bad in ["\"unterminated", "two words", &"k".repeat(256)] {
            let r = c
                .post(format!("http://{addr}/orders/1"))
                .header("x-api-key", "alice")
                .header("idempotency-key", bad)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
        // The bare form is accepted, and is the same key as the quoted form.
        let r = c
            .post(format!("http://{addr}/orders/1"))
            .header("x-api-key", "alice")
            .header("idempotency-key", "m1")
            .body("a")
            .send()
            .await
            .unwrap();
        assert!(replayed(&r), "{name}: bare key is another key");

        // An optional route runs without a key every time, and once with one.
        for _ in 0..2 {
            let r = send(&c, addr, "/free", "alice", None, "")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let r = send(&c, addr, "/free", "alice", Some("f1"), "")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
        }
        assert_eq!(runs.of("free", "-"), 2);
        assert_eq!(runs.of("free", "f1"), 1);

        // Two principals, one key: two executions, each replays its own.
        for who in ["alice", "bob", "alice", "bob"] {
            let r = send(&c, addr, "/orders/9", who, Some("shared"), "x")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
        }
        assert_eq!(
            runs.of("orders", "shared"),
            2,
            "{name}: principals share a key"
        );
        // A key without a principal: 401.
        let r = c
            .post(format!("http://{addr}/orders/9"))
            .header("idempotency-key", "\"shared\"")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        handle.abort();
        store.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_caps_and_tombstones_on_every_store() {
    for store in common::stores().await {
        let name = store.name;
        let (addr, runs, handle) = server(&store, |b| {
            b.request_body_limit(1024).response_body_limit(4096)
        })
        .await;
        let c = client();

        // Request body over the limit, declared: 413 before the handler.
        let r = send(
            &c,
            addr,
            "/orders/1",
            "alice",
            Some("big-req"),
            &"x".repeat(2000),
        )
        .send()
        .await
        .unwrap();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE, "{name}");
        assert!(is_problem(&r));
        // Chunked (no Content-Length): 413 as well.
        assert_eq!(raw_chunked_post(addr, "/orders/1", 3000), 413, "{name}");
        assert_eq!(runs.total(), 0);

        // A response within the limit is replayed exactly.
        for i in 0..2 {
            let r = send(&c, addr, "/big?n=3000", "alice", Some("small"), "")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(replayed(&r), i == 1);
            assert_eq!(r.bytes().await.unwrap().len(), 3000);
        }
        // Over the limit: the first client gets it all; a retry gets the tombstone, and the
        // handler does not run again.
        let r = send(&c, addr, "/big?n=10000", "alice", Some("large"), "")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let body = r.bytes().await.unwrap();
        assert_eq!(body.len(), 10000, "{name}: first client lost bytes");
        assert_eq!(&body[..2], b"aa");
        assert_eq!(&body[9999..], b"j");
        for _ in 0..2 {
            let r = send(&c, addr, "/big?n=10000", "alice", Some("large"), "")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::GONE, "{name}");
            assert_eq!(r.headers()["idempotency-tombstone"], "too-large");
            assert!(replayed(&r));
            let doc: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            assert_eq!(doc["original_status"], 200);
        }
        assert_eq!(runs.of("big", "large"), 1, "{name}");

        // Streams pass through unrecorded; retries are told, not re-executed.
        for (path, route) in [("/events", "events"), ("/unrecorded", "unrecorded")] {
            let r = send(&c, addr, path, "alice", Some(route), "")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            assert!(!r.text().await.unwrap().is_empty());
            let r = send(&c, addr, path, "alice", Some(route), "")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::GONE, "{name} {path}");
            assert_eq!(r.headers()["idempotency-tombstone"], "streamed");
            assert_eq!(runs.of(route, route), 1);
        }
        handle.abort();
        store.cleanup().await;
    }
}

/// A chunked POST of `n` bytes over a raw socket; returns the status code.
fn raw_chunked_post(addr: std::net::SocketAddr, path: &str, n: usize) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nx-api-key: alice\r\nIdempotency-Key: \"chunked\"\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    for _ in 0..n / 500 {
        let _ = s.write_all(format!("1f4\r\n{}\r\n", "y".repeat(500)).as_bytes());
    }
    let _ = s.write_all(b"0\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_panics_release_the_key() {
    for store in [common::sqlite().await] {
        let (addr, runs, handle) = server(&store, |b| b).await;
        let c = client();
        let r = send(&c, addr, "/flaky", "alice", Some("f"), "")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(r.text().await.unwrap(), "boom");
        let r = send(&c, addr, "/flaky", "alice", Some("f"), "")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        assert!(!replayed(&r));
        assert_eq!(r.text().await.unwrap(), "ok after 2 (retry)");
        let r = send(&c, addr, "/flaky", "alice", Some("f"), "")
            .send()
            .await
            .unwrap();
        assert!(replayed(&r));
        assert_eq!(runs.of("flaky", "f"), 2);

        // A panic: the connection is lost (axum does not catch panics), the key is released,
        // the panic goes on; the retry runs again.
        let r = send(&c, addr, "/panic", "alice", Some("p"), "")
            .send()
            .await;
        assert!(r.is_err(), "a panicking handler answered: {r:?}");
        let r = send(&c, addr, "/panic", "alice", Some("p"), "")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(runs.of("panic", "p"), 2);
        handle.abort();

        // Recorded instead of released when asked (Stripe's rule).
        let (addr, runs, handle) = server(&store, |b| b.release_server_errors(false)).await;
        for _ in 0..2 {
            let r = send(&c, addr, "/flaky", "alice", Some("g"), "")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        }
        assert_eq!(runs.of("flaky", "g"), 1);
        handle.abort();
    }
}

#[tokio::test]
async fn a_layer_without_a_principal_does_not_build() {
    let e = IdempotencyLayer::builder(idem::MemoryStore::new())
        .build()
        .unwrap_err();
    assert!(matches!(e, BuildError::NoPrincipal));
    assert!(e.to_string().contains(".unscoped()"), "{e}");
    // Explicitly unscoped: builds, and one key is shared by everyone.
    let layer = IdempotencyLayer::builder(idem::AnyStore::new(idem::MemoryStore::new()))
        .unscoped()
        .build()
        .unwrap();
    let runs = Runs::default();
    let (addr, handle) = common::serve(common::app(runs.clone()).layer(layer)).await;
    let c = client();
    for who in ["alice", "bob"] {
        send(&c, addr, "/orders", who, Some("u"), "x")
            .send()
            .await
            .unwrap();
    }
    assert_eq!(runs.of("orders", "u"), 1);
    handle.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_replays_conflicts_mismatches_and_bytes() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let layer = metrics::with_local_recorder(&recorder, || {
        common::layer(idem::AnyStore::new(idem::MemoryStore::new()))
            .name("mtest")
            .build()
            .unwrap()
    });
    let runs = Runs::default();
    let (addr, handle) = common::serve(common::app(runs.clone()).layer(layer)).await;
    let c = client();
    let slow = {
        let c = c.clone();
        tokio::spawn(async move {
            send(&c, addr, "/orders", "a", Some("k"), "1")
                .header("x-delay-ms", "500")
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    // Once the first runs (under its claim), a duplicate.
    while runs.total() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = send(&c, addr, "/orders", "a", Some("k"), "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(slow.await.unwrap(), StatusCode::CREATED);
    send(&c, addr, "/orders", "a", Some("k"), "1")
        .send()
        .await
        .unwrap();
    send(&c, addr, "/orders", "a", Some("k"), "2")
        .send()
        .await
        .unwrap();
    let values: std::collections::HashMap<String, u64> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(k, _, _, v)| match v {
            metrics_util::debugging::DebugValue::Counter(n) => {
                let key = k.key();
                let labels: Vec<String> = key
                    .labels()
                    .filter(|l| l.key() != "layer" && l.key() != "executor")
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                Some((format!("{}{{{}}}", key.name(), labels.join(",")), n))
            }
            _ => None,
        })
        .collect();
    let get = |k: &str| values.get(k).copied().unwrap_or(0);
    assert_eq!(get("idem_http_replays_total{}"), 1, "{values:?}");
    assert_eq!(get("idem_http_conflicts_total{}"), 1);
    assert_eq!(get("idem_http_mismatches_total{}"), 1);
    assert_eq!(get("idem_http_requests_total{outcome=executed}"), 1);
    assert!(get("idem_http_stored_bytes_total{}") > 50, "{values:?}");
    assert_eq!(get("idem_executed_total{}"), 1);
    handle.abort();
}

const CHILD_ENV: &str = "IDEM_HTTP_CRASH_CHILD";

/// The child of the crash test: serves the layer over the parent's store; its handler says
/// `EFFECT` and hangs until the parent kills the process.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let store = common::open(&spec).await;
        let layer = common::layer(store)
            .lease(Duration::from_secs(2))
            .build()
            .unwrap();
        let app = Router::new()
            .route(
                "/orders",
                post(|| async {
                    println!("EFFECT");
                    std::io::stdout().flush().unwrap();
                    tokio::time::sleep(Duration::from_secs(600)).await;
                    "never"
                }),
            )
            .layer(layer);
        let (addr, handle) = common::serve(app).await;
        println!("LISTENING {addr}");
        std::io::stdout().flush().unwrap();
        handle.await.unwrap();
    });
}

/// SIGKILL a server mid-request: after the lease, the retry takes the key over exactly once,
/// and the handler is told an earlier attempt may have run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_request_is_taken_over_once() {
    let mut stores = vec![common::sqlite().await];
    stores.extend(common::servers().await);
    for store in stores {
        let name = store.name;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &store.spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr: std::net::SocketAddr = loop {
            let line = lines.next().expect("child exited").unwrap();
            // The test harness prints "test crash_child ... " before it, on the same line.
            if let Some((_, a)) = line.split_once("LISTENING ") {
                break a.trim().parse().unwrap();
            }
        };
        let c = client();
        let first = {
            let c = c.clone();
            tokio::spawn(async move {
                send(&c, addr, "/orders", "alice", Some("crash-1"), "pay 10")
                    .send()
                    .await
            })
        };
        let lines = tokio::task::spawn_blocking(move || {
            for line in lines.by_ref() {
                if line.unwrap().trim() == "EFFECT" {
                    return lines;
                }
            }
            panic!("child exited before its effect");
        })
        .await
        .unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        drop(lines);
        assert!(
            first.await.unwrap().is_err(),
            "{name}: the killed server answered"
        );

        // A new server on the same store: 409 until the dead one's lease ends, then one
        // takeover, then replays.
        let runs = Runs::default();
        let layer = common::layer(common::open(&store.spec).await)
            .lease(Duration::from_secs(2))
            .build()
            .unwrap();
        let (addr, handle) = common::serve(common::app(runs.clone()).layer(layer)).await;
        let start = Instant::now();
        let mut conflicts = 0;
        let body = loop {
            let r = send(&c, addr, "/orders", "alice", Some("crash-1"), "pay 10")
                .send()
                .await
                .unwrap();
            match r.status() {
                StatusCode::CONFLICT => {
                    conflicts += 1;
                    assert!(
                        start.elapsed() < Duration::from_secs(20),
                        "{name}: never taken over"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                StatusCode::CREATED => break r.text().await.unwrap(),
                s => panic!("{name}: {s}"),
            }
        };
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["acquisition"], "takeover", "{name}: {doc}");
        for _ in 0..3 {
            let r = send(&c, addr, "/orders", "alice", Some("crash-1"), "pay 10")
                .send()
                .await
                .unwrap();
            assert!(replayed(&r), "{name}");
        }
        assert_eq!(runs.of("orders", "crash-1"), 1, "{name}: takeovers");
        eprintln!("{name}: killed server's key taken over once after {conflicts} conflicts");
        handle.abort();
        store.cleanup().await;
    }
}
