//! The HTTP benchmark server: an axum handler echoing a small JSON body after simulated work,
//! with or without the idempotency layer, or `idem proxy` in front of another server.
//!
//! ```text
//! bench_server [--listen ADDR] [--store none|memory|sqlite:PATH|redis://...] [--work-ms N]
//! bench_server --proxy UPSTREAM [--listen ADDR] [--store ...]
//! ```
//!
//! Routes: `POST /echo` (echo the body after `--work-ms`, default 1) and `POST /noop` (answer
//! `{}` at once). With a store, both require an `Idempotency-Key`, scoped by `x-api-key`;
//! `--store none` (the default) serves the same routes without the layer, the baseline.
//! `--proxy` serves `idem proxy` instead, with the rule `POST:/echo=required` (other routes pass
//! through). `crates/idem-http/bench/run.sh` runs every comparison with wrk.

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::post;
use idem::AnyStore;
use idem_http::IdempotencyLayer;

struct Args {
    listen: String,
    store: String,
    work: Duration,
    proxy: Option<String>,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        listen: "127.0.0.1:8080".into(),
        store: "none".into(),
        work: Duration::from_millis(1),
        proxy: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => a.listen = value()?,
            "--store" => a.store = value()?,
            "--work-ms" => {
                a.work =
                    Duration::from_millis(value()?.parse().map_err(|e| format!("--work-ms: {e}"))?);
            }
            "--proxy" => a.proxy = Some(value()?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

async fn open(spec: &str) -> Result<Option<AnyStore>, Box<dyn std::error::Error>> {
    Ok(Some(match spec {
        "none" => return Ok(None),
        "memory" => AnyStore::new(idem::MemoryStore::new()),
        s if s.starts_with("sqlite:") => {
            AnyStore::new(idem_sqlite::SqliteStore::open(&s["sqlite:".len()..])?)
        }
        s if s.starts_with("redis://") => AnyStore::new(
            idem_redis::RedisStore::builder(s)
                .prefix(format!("idembench{}:", std::process::id()))
                .connect()
                .await?,
        ),
        s => return Err(format!("unknown store {s:?}").into()),
    }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = args()?;
    let store = open(&args.store).await?;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    if let Some(upstream) = &args.proxy {
        let store = store.unwrap_or_else(|| AnyStore::new(idem::MemoryStore::new()));
        let mut config = idem_http::proxy::ProxyConfig::new(args.listen.parse()?, upstream)?
            .parse_rules(["POST:/echo=required"])?
            .principal_header("x-api-key".parse()?);
        config.retention = Duration::from_secs(600);
        let proxy = idem_http::proxy::Proxy::bind(config, store).await?;
        println!("proxy listening on {}", proxy.local_addr()?);
        proxy.run(shutdown).await;
        return Ok(());
    }
    let work = args.work;
    let app = Router::new()
        .route(
            "/echo",
            post(move |body: Bytes| async move {
                tokio::time::sleep(work).await;
                ([(header::CONTENT_TYPE, "application/json")], body)
            }),
        )
        .route(
            "/noop",
            post(|| async { ([(header::CONTENT_TYPE, "application/json")], "{}").into_response() }),
        );
    let app = match store {
        None => app,
        Some(store) => app.layer(
            IdempotencyLayer::builder(store)
                .principal(|p| Some(p.headers.get("x-api-key")?.to_str().ok()?.to_owned()))
                .rule("POST:/**=required".parse()?)
                .retention(Duration::from_secs(600))
                .build()?,
        ),
    };
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!(
        "listening on {} (store {})",
        listener.local_addr()?,
        args.store
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
