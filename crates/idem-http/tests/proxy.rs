//! `idem proxy` against a real upstream on 127.0.0.1, through a real HTTP client: replays,
//! 500 concurrent duplicates, errors, an unreachable upstream, graceful shutdown, and a proxy
//! SIGKILLed mid-request whose key is taken over exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use http::StatusCode;
use idem_http::proxy::{Proxy, ProxyConfig, ProxyError};
use tokio::sync::oneshot;

/// What the upstream saw: per idempotency key, the `Idem-Acquisition` of each request.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<HashMap<String, Vec<String>>>>);

impl Seen {
    fn of(&self, key: &str) -> Vec<String> {
        self.0.lock().unwrap().get(key).cloned().unwrap_or_default()
    }
}

async fn upstream_orders(
    State(seen): State<Seen>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, [(&'static str, &'static str); 2], String) {
    let h = |n: &str| {
        headers
            .get(n)
            .map_or_else(String::new, |v| v.to_str().unwrap().to_owned())
    };
    let key = h("idempotency-key");
    let n = {
        let mut m = seen.0.lock().unwrap();
        let v = m.entry(key.clone()).or_default();
        v.push(h("idem-acquisition"));
        v.len()
    };
    if let Ok(ms) = h("x-delay-ms").parse::<u64>() {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if h("x-hang-first") == "1" && n == 1 {
        println!("UPSTREAM-EFFECT");
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    (
        StatusCode::CREATED,
        [("set-cookie", "s=1"), ("location", "/orders/1")],
        format!(
            "run {n} attempt {} {} body {body} host {}",
            h("idem-attempt"),
            h("idem-acquisition"),
            h("x-forwarded-host")
        ),
    )
}

async fn upstream() -> (SocketAddr, Seen, tokio::task::JoinHandle<()>) {
    let seen = Seen::default();
    let app = Router::new()
        .route("/orders", post(upstream_orders))
        .route("/api/orders", post(upstream_orders))
        .route("/health", get(|| async { "ok" }))
        .with_state(seen.clone());
    let (addr, handle) = common::serve(app).await;
    (addr, seen, handle)
}

fn config(upstream: SocketAddr) -> ProxyConfig {
    let mut c = ProxyConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        &format!("http://{upstream}"),
    )
    .unwrap()
    .parse_rules(["POST:/orders=required"])
    .unwrap()
    .principal_header("x-api-key".parse().unwrap());
    c.lease = Duration::from_secs(2);
    c.retention = Duration::from_secs(600);
    c
}

async fn start(
    config: ProxyConfig,
    store: idem::AnyStore,
) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let proxy = Proxy::bind(config, store).await.unwrap();
    let addr = proxy.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(proxy.run(async {
        let _ = rx.await;
    }));
    (addr, tx, handle)
}

fn replayed(r: &reqwest::Response) -> bool {
    r.headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_proxy_runs_each_key_once_on_every_store() {
    let (up, seen, up_handle) = upstream().await;
    for store in common::stores().await {
        let name = store.name;
        let (addr, stop, handle) = start(config(up), store.store.clone()).await;
        let c = common::client();
        let key = format!("{name}-1");

        let r = common::post(&c, addr, "/orders", "alice", Some(&key), "pay")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "{name}");
        assert!(r.headers().get("set-cookie").is_some());
        let first = r.text().await.unwrap();
        assert!(
            first.starts_with("run 1 attempt 1 new body pay host 127.0.0.1:"),
            "{first}"
        );
        let r = common::post(&c, addr, "/orders", "alice", Some(&key), "pay")
            .send()
            .await
            .unwrap();
        assert!(replayed(&r), "{name}");
        assert!(r.headers().get("set-cookie").is_none());
        assert_eq!(r.headers()["location"], "/orders/1");
        assert_eq!(r.text().await.unwrap(), first);

        // Mismatch, missing key, no principal; other routes pass through.
        let r = common::post(&c, addr, "/orders", "alice", Some(&key), "other")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let r = common::post(&c, addr, "/orders", "alice", None, "x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let r = c
            .post(format!("http://{addr}/orders"))
            .header("idempotency-key", "k")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let r = c.get(format!("http://{addr}/health")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "ok");
        assert_eq!(seen.of(&format!("\"{key}\"")).len(), 1, "{name}");

        // 500 at once with one key: the upstream sees one.
        let key = format!("{name}-500");
        let mut tasks = Vec::new();
        for _ in 0..500 {
            let c = c.clone();
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                let r = common::post(&c, addr, "/orders", "bob", Some(&key), "x")
                    .header("x-delay-ms", "300")
                    .send()
                    .await
                    .unwrap();
                (r.status(), replayed(&r))
            }));
        }
        let mut counts: HashMap<(u16, bool), usize> = HashMap::new();
        for t in tasks {
            let (s, rep) = t.await.unwrap();
            *counts.entry((s.as_u16(), rep)).or_default() += 1;
        }
        assert_eq!(
            seen.of(&format!("\"{key}\"")).len(),
            1,
            "{name}: {counts:?}"
        );
        assert_eq!(counts.get(&(201, false)), Some(&1), "{name}: {counts:?}");
        assert_eq!(
            counts.get(&(201, true)).unwrap_or(&0) + counts.get(&(409, false)).unwrap_or(&0),
            499,
            "{name}: {counts:?}"
        );
        eprintln!("{name}: proxy, 500 concurrent: {counts:?}");
        let _ = stop.send(());
        handle.await.unwrap();
        store.cleanup().await;
    }
    up_handle.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_a_502_and_releases_the_key() {
    // A port with nothing behind it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let store = idem::AnyStore::new(idem::MemoryStore::new());
    let (addr, stop, handle) = start(config(dead), store.clone()).await;
    let c = common::client();
    let r = common::post(&c, addr, "/orders", "a", Some("k"), "x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let doc: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(doc["code"], "upstream_unreachable");
    assert!(
        doc["detail"].as_str().unwrap().contains(&dead.to_string()),
        "{doc}"
    );
    let _ = stop.send(());
    handle.await.unwrap();

    // The upstream is back on that port: the retry runs (the key was released).
    let seen = Seen::default();
    let app = Router::new()
        .route("/orders", post(upstream_orders))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind(dead).await.unwrap();
    let up = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let (addr, stop, handle) = start(config(dead), store).await;
    let r = common::post(&c, addr, "/orders", "a", Some("k"), "x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(
        r.text().await.unwrap().contains(" retry "),
        "not told it is a retry"
    );
    let _ = stop.send(());
    handle.await.unwrap();
    up.abort();
}

#[tokio::test]
async fn configuration_errors_are_clear() {
    let l: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let c = ProxyConfig::new(l, "http://127.0.0.1:1").unwrap();
    let e = Proxy::bind(c, idem::MemoryStore::new())
        .await
        .err()
        .unwrap();
    assert!(matches!(e, ProxyError::NoPrincipal));
    assert!(e.to_string().contains("--principal-header"), "{e}");
    let e = ProxyConfig::new(l, "https://example").unwrap_err();
    assert!(
        e.to_string().contains("https upstreams are not supported"),
        "{e}"
    );
    let e = ProxyConfig::new(l, "http://127.0.0.1:1")
        .unwrap()
        .parse_rules(["POST /orders"])
        .unwrap_err();
    assert!(e.to_string().contains("invalid rule"), "{e}");
    // A port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let c = ProxyConfig::new(taken.local_addr().unwrap(), "http://127.0.0.1:1")
        .unwrap()
        .unscoped();
    let e = Proxy::bind(c, idem::MemoryStore::new())
        .await
        .err()
        .unwrap();
    assert!(
        e.to_string().starts_with("cannot listen on 127.0.0.1:"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_requests_in_flight_finish() {
    let (up, seen, up_handle) = upstream().await;
    let (addr, stop, handle) = start(
        config(up).parse_rules(["POST:/api/**"]).unwrap(),
        idem::AnyStore::new(idem::MemoryStore::new()),
    )
    .await;
    let c = common::client();
    let slow = {
        let c = c.clone();
        tokio::spawn(async move {
            common::post(&c, addr, "/orders", "a", Some("g"), "x")
                .header("x-delay-ms", "700")
                .send()
                .await
        })
    };
    // Shut down once the request reached the upstream.
    while seen.of("\"g\"").is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = stop.send(());
    let r = slow.await.unwrap().unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .unwrap()
        .unwrap();
    // Stopped: no new connections.
    assert!(std::net::TcpStream::connect(addr).is_err());
    up_handle.abort();
}

const CHILD_ENV: &str = "IDEM_HTTP_PROXY_CHILD";

/// The child of the crash test: a proxy over the parent's store and upstream.
#[test]
fn proxy_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let up: SocketAddr = std::env::var("IDEM_HTTP_PROXY_UPSTREAM")
        .unwrap()
        .parse()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let store = common::open(&spec).await;
        let proxy = Proxy::bind(config(up), store).await.unwrap();
        println!("LISTENING {}", proxy.local_addr().unwrap());
        std::io::stdout().flush().unwrap();
        proxy.run(std::future::pending()).await;
    });
}

/// SIGKILL the proxy while the upstream works: after the lease, the retry through a new proxy
/// is forwarded once, marked `takeover`, and later retries replay its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_mid_request_is_taken_over_once() {
    let (up, seen, up_handle) = upstream().await;
    let mut stores = vec![common::sqlite().await];
    stores.extend(common::servers().await);
    for store in stores {
        let name = store.name;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "proxy_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &store.spec)
            .env("IDEM_HTTP_PROXY_UPSTREAM", up.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr: SocketAddr = loop {
            let line = lines.next().expect("child exited").unwrap();
            if let Some((_, a)) = line.split_once("LISTENING ") {
                break a.trim().parse().unwrap();
            }
        };
        let c = common::client();
        let key = format!("{name}-crash");
        let quoted = format!("\"{key}\"");
        let first = {
            let (c, key) = (c.clone(), key.clone());
            tokio::spawn(async move {
                common::post(&c, addr, "/orders", "alice", Some(&key), "pay")
                    .header("x-hang-first", "1")
                    .send()
                    .await
            })
        };
        let t = Instant::now();
        while seen.of(&quoted).is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{name}: upstream never called"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(
            first.await.unwrap().is_err(),
            "{name}: the killed proxy answered"
        );

        let (addr, stop, handle) = start(config(up), common::open(&store.spec).await).await;
        let start_at = Instant::now();
        let body = loop {
            let r = common::post(&c, addr, "/orders", "alice", Some(&key), "pay")
                .send()
                .await
                .unwrap();
            match r.status() {
                StatusCode::CONFLICT => {
                    assert!(
                        start_at.elapsed() < Duration::from_secs(20),
                        "{name}: stuck"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                StatusCode::CREATED => break r.text().await.unwrap(),
                s => panic!("{name}: {s}"),
            }
        };
        assert!(body.contains("attempt 2 takeover"), "{name}: {body}");
        for _ in 0..3 {
            let r = common::post(&c, addr, "/orders", "alice", Some(&key), "pay")
                .send()
                .await
                .unwrap();
            assert!(replayed(&r), "{name}");
            assert_eq!(r.text().await.unwrap(), body);
        }
        // The dead proxy's request and one takeover: nothing else reached the upstream.
        assert_eq!(seen.of(&quoted), vec!["new", "takeover"], "{name}");
        eprintln!("{name}: killed proxy's key taken over once");
        let _ = stop.send(());
        handle.await.unwrap();
        store.cleanup().await;
    }
    up_handle.abort();
}
