//! Shared by the HTTP tests: every store (memory and SQLite always; Redis, PostgreSQL and
//! MySQL from `IDEM_REDIS_URL`, `IDEM_POSTGRES_URL`, `IDEM_MYSQL_URL`, skipped loudly when
//! absent, a failure with `CI` set), a test application, and a real HTTP client.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post as route_post;
use bytes::Bytes;
use idem::AnyStore;
use idem_conformance::server;
use idem_http::{Idempotency, Unrecorded};

/// A store under test, described so that a child process can open the same one.
pub struct TestStore {
    pub name: &'static str,
    pub spec: String,
    pub store: AnyStore,
    _dir: Option<tempfile::TempDir>,
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{:x}_{:08x}",
        std::process::id(),
        fastrand::u32(..)
    )
}

/// Opens a store from its spec: `memory`, `sqlite:PATH`, `redis|URL|PREFIX`,
/// `postgres|URL|SCHEMA`, `mysql|URL|TABLE`.
pub async fn open(spec: &str) -> AnyStore {
    if spec == "memory" {
        return AnyStore::new(idem::MemoryStore::new());
    }
    if let Some(path) = spec.strip_prefix("sqlite:") {
        return AnyStore::new(idem_sqlite::SqliteStore::open(path).expect("open sqlite"));
    }
    let parts: Vec<&str> = spec.split('|').collect();
    match parts.as_slice() {
        ["redis", url, prefix] => AnyStore::new(
            idem_redis::RedisStore::builder(*url)
                .prefix(*prefix)
                .connect()
                .await
                .expect("connect redis"),
        ),
        ["postgres", url, schema] => {
            let b = idem_postgres::PostgresStore::builder(*url).schema(*schema);
            b.migrate().await.expect("migrate postgres");
            AnyStore::new(b.connect().await.expect("connect postgres"))
        }
        ["mysql", url, table] => {
            let s = idem_mysql::MysqlStore::builder(*url)
                .table(*table)
                .build()
                .expect("mysql store");
            s.migrate().await.expect("migrate mysql");
            AnyStore::new(s)
        }
        _ => panic!("unknown store spec {spec}"),
    }
}

/// Every store: memory, SQLite (a temporary file), and the servers that answer.
pub async fn stores() -> Vec<TestStore> {
    let mut out = Vec::new();
    out.push(TestStore {
        name: "memory",
        spec: "memory".into(),
        store: open("memory").await,
        _dir: None,
    });
    out.push(sqlite().await);
    out.extend(servers().await);
    out
}

/// A SQLite store in a temporary file.
pub async fn sqlite() -> TestStore {
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("sqlite:{}", dir.path().join("idem.db").display());
    TestStore {
        name: "sqlite",
        store: open(&spec).await,
        spec,
        _dir: Some(dir),
    }
}

/// The networked stores whose servers answer, each in a scratch namespace of its own.
pub async fn servers() -> Vec<TestStore> {
    let mut out = Vec::new();
    if let Some(url) = server::url(server::REDIS) {
        let spec = format!("redis|{url}|{}:", unique("idemhttp"));
        out.push(TestStore {
            name: "redis",
            store: open(&spec).await,
            spec,
            _dir: None,
        });
    }
    if let Some(url) = server::url(server::POSTGRES) {
        let spec = format!("postgres|{url}|{}", unique("idemhttp"));
        out.push(TestStore {
            name: "postgres",
            store: open(&spec).await,
            spec,
            _dir: None,
        });
    }
    if let Some(url) = server::url(server::MYSQL) {
        let spec = format!("mysql|{url}|{}", unique("idemhttp"));
        out.push(TestStore {
            name: "mysql",
            store: open(&spec).await,
            spec,
            _dir: None,
        });
    }
    out
}

impl TestStore {
    /// Drops the scratch schema or table (Redis keys expire with the tests' short retention).
    pub async fn cleanup(&self) {
        let parts: Vec<&str> = self.spec.split('|').collect();
        match parts.as_slice() {
            ["postgres", url, schema] => {
                let (client, conn) = tokio_postgres_connect(url).await;
                let task = tokio::spawn(conn);
                let _ = client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                    .await;
                drop(client);
                let _ = task.await;
            }
            ["mysql", url, table] => {
                use mysql_async::prelude::Queryable;
                let pool = mysql_async::Pool::new(*url);
                if let Ok(mut c) = pool.get_conn().await {
                    let _ = c.query_drop(format!("DROP TABLE IF EXISTS {table}")).await;
                }
                let _ = pool.disconnect().await;
            }
            _ => {}
        }
    }
}

async fn tokio_postgres_connect(
    url: &str,
) -> (
    tokio_postgres::Client,
    tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
) {
    tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect postgres")
}

/// How often each route of the test application ran, by route and by idempotency key.
#[derive(Clone, Default)]
pub struct Runs {
    pub total: Arc<AtomicUsize>,
    by_key: Arc<std::sync::Mutex<HashMap<String, usize>>>,
}

impl Runs {
    fn record(&self, what: &str) -> usize {
        self.total.fetch_add(1, Ordering::SeqCst);
        let mut m = self.by_key.lock().unwrap();
        let n = m.entry(what.to_owned()).or_default();
        *n += 1;
        *n
    }

    /// Runs of `route` with `key` (as the handler saw them).
    pub fn of(&self, route: &str, key: &str) -> usize {
        self.by_key
            .lock()
            .unwrap()
            .get(&format!("{route} {key}"))
            .copied()
            .unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }
}

fn key_of(idem: &Option<Extension<Idempotency>>) -> String {
    idem.as_ref()
        .map_or_else(|| "-".to_owned(), |Extension(i)| i.key().to_owned())
}

fn acquisition(idem: &Option<Extension<Idempotency>>) -> String {
    idem.as_ref().map_or_else(
        || "none".to_owned(),
        |Extension(i)| format!("{:?}", i.acquisition()).to_lowercase(),
    )
}

async fn delay(headers: &HeaderMap) {
    if let Some(ms) = headers
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// `POST /orders`: counts, waits `x-delay-ms`, answers 201 with headers of every kind.
async fn orders(
    State(runs): State<Runs>,
    idem: Option<Extension<Idempotency>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let n = runs.record(&format!("orders {}", key_of(&idem)));
    delay(&headers).await;
    let mut resp = (
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::LOCATION, "/orders/7"),
            (header::ETAG, "\"v1\""),
            (header::SET_COOKIE, "session=secret"),
        ],
        serde_json::json!({
            "run": n,
            "acquisition": acquisition(&idem),
            "body": String::from_utf8_lossy(&body),
        })
        .to_string(),
    )
        .into_response();
    let h = resp.headers_mut();
    h.insert("x-ratelimit-remaining", HeaderValue::from_static("41"));
    h.insert("x-request-id", HeaderValue::from_static("req-1"));
    h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// `POST /flaky`: 500 on its first run per key, 201 after.
async fn flaky(State(runs): State<Runs>, idem: Option<Extension<Idempotency>>) -> Response {
    let n = runs.record(&format!("flaky {}", key_of(&idem)));
    if n == 1 {
        return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response();
    }
    (
        StatusCode::CREATED,
        format!("ok after {n} ({})", acquisition(&idem)),
    )
        .into_response()
}

/// `POST /panic`: panics on its first run per key.
async fn panics(State(runs): State<Runs>, idem: Option<Extension<Idempotency>>) -> Response {
    let n = runs.record(&format!("panic {}", key_of(&idem)));
    assert!(n > 1, "first run panics");
    (StatusCode::CREATED, format!("ok after {n}")).into_response()
}

/// `POST /big?n=BYTES`: a body of `n` bytes in 1 KiB chunks.
async fn big(
    State(runs): State<Runs>,
    idem: Option<Extension<Idempotency>>,
    Query(q): Query<HashMap<String, usize>>,
) -> Response {
    runs.record(&format!("big {}", key_of(&idem)));
    let n = q.get("n").copied().unwrap_or(0);
    let chunks: Vec<Result<Bytes, std::io::Error>> = (0..n.div_ceil(1024))
        .map(|i| {
            Ok(Bytes::from(vec![
                b'a' + (i % 26) as u8;
                1024.min(n - i * 1024)
            ]))
        })
        .collect();
    (
        StatusCode::OK,
        Body::from_stream(futures_util::stream::iter(chunks)),
    )
        .into_response()
}

/// `POST /events`: an event stream (streamed through, not recorded).
async fn events(State(runs): State<Runs>, idem: Option<Extension<Idempotency>>) -> Response {
    runs.record(&format!("events {}", key_of(&idem)));
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        "data: one\n\ndata: two\n\n",
    )
        .into_response()
}

/// `POST /unrecorded`: opts out of recording with the `Unrecorded` extension.
async fn unrecorded(State(runs): State<Runs>, idem: Option<Extension<Idempotency>>) -> Response {
    runs.record(&format!("unrecorded {}", key_of(&idem)));
    let mut resp = "streamed".into_response();
    resp.extensions_mut().insert(Unrecorded);
    resp
}

/// `POST /free`: an optional-key route.
async fn free(State(runs): State<Runs>, idem: Option<Extension<Idempotency>>) -> Response {
    let n = runs.record(&format!("free {}", key_of(&idem)));
    (StatusCode::OK, format!("{n}")).into_response()
}

/// The test application's routes, before the layer.
pub fn app(runs: Runs) -> Router {
    Router::new()
        .route("/orders", route_post(orders))
        .route("/orders/{id}", route_post(orders))
        .route("/flaky", route_post(flaky))
        .route("/panic", route_post(panics))
        .route("/big", route_post(big))
        .route("/events", route_post(events))
        .route("/unrecorded", route_post(unrecorded))
        .route("/free", route_post(free))
        .with_state(runs)
}

/// The rules the tests use.
pub const RULES: [&str; 3] = [
    "POST:/free=optional",
    "POST:/orders/*=required",
    "POST:/**=required",
];

/// A server on 127.0.0.1 for `router`, until the returned handle is aborted.
pub async fn serve(router: Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    (addr, handle)
}

/// A client without proxies or connection limits.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A POST with an API key, an idempotency key and a body.
pub fn post(
    c: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
    api_key: &str,
    key: Option<&str>,
    body: &str,
) -> reqwest::RequestBuilder {
    let mut r = c
        .post(format!("http://{addr}{path}"))
        .header("x-api-key", api_key)
        .body(body.to_owned());
    if let Some(k) = key {
        r = r.header("idempotency-key", format!("\"{k}\""));
    }
    r
}

/// A layer builder over `store` with the test rules, scoped by `x-api-key`.
pub fn layer(store: AnyStore) -> idem_http::IdempotencyLayerBuilder<AnyStore> {
    let mut b = idem_http::IdempotencyLayer::builder(store)
        .principal(|parts| Some(parts.headers.get("x-api-key")?.to_str().ok()?.to_owned()))
        .retention(Duration::from_secs(600));
    for r in RULES {
        b = b.rule(r.parse().unwrap());
    }
    b
}
