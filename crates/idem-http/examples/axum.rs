//! An axum service whose `POST /orders` runs once per `Idempotency-Key` and API key.
//!
//! ```sh
//! cargo run -p idem-http --example axum            # listens on 127.0.0.1:3000, store idem-http.db
//! curl -i -X POST localhost:3000/orders -H 'x-api-key: alice' \
//!      -H 'Idempotency-Key: "order-1"' -d '{"item":"book"}'
//! # The same again: the same 201, with `Idempotent-Replayed: true`, and no second order.
//! # Another body with the same key: 422. No key: 400. While the first runs: 409.
//! ```
//!
//! `IDEM_EXAMPLE_LISTEN` and `IDEM_EXAMPLE_DB` change the address and the SQLite file.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use idem_http::{Idempotency, IdempotencyLayer};

#[derive(Clone, Default)]
struct Orders {
    next_id: Arc<AtomicU64>,
}

/// The effect to protect: creating an order. With the layer, a retried POST with the same
/// key replays this answer instead of creating a second order.
async fn create_order(
    State(orders): State<Orders>,
    idem: Option<Extension<Idempotency>>,
    Json(body): Json<serde_json::Value>,
) -> impl IntoResponse {
    if let Some(Extension(idem)) = &idem
        && idem.may_have_run_before()
    {
        // An earlier attempt with this key crashed (or answered 5xx) mid-way. A real service
        // would look up what it did, by idem.downstream_key(), before doing it again.
        tracing::warn!(key = idem.key(), "earlier attempt may have run");
    }
    tokio::time::sleep(Duration::from_millis(50)).await; // the work
    let id = orders.next_id.fetch_add(1, Ordering::SeqCst) + 1;
    let mut headers = HeaderMap::new();
    if let Ok(v) = format!("/orders/{id}").parse() {
        headers.insert(header::LOCATION, v);
    }
    // Never replayed: a retry must not receive the first response's cookie.
    headers.insert(
        header::SET_COOKIE,
        header::HeaderValue::from_static("session=abc; HttpOnly"),
    );
    (
        StatusCode::CREATED,
        headers,
        Json(serde_json::json!({ "id": id, "order": body })),
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let listen = std::env::var("IDEM_EXAMPLE_LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let db = std::env::var("IDEM_EXAMPLE_DB").unwrap_or_else(|_| "idem-http.db".into());
    let store = idem_sqlite::SqliteStore::open(&db)?;

    let layer = IdempotencyLayer::builder(store)
        // Keys are scoped by API key: two clients sending the same key never share a result.
        .principal(|parts| Some(parts.headers.get("x-api-key")?.to_str().ok()?.to_owned()))
        .rule("POST:/orders=required".parse()?)
        .build()?;

    let app = Router::new()
        .route("/orders", post(create_order))
        .route("/health", get(|| async { "ok" }))
        .layer(layer)
        .with_state(Orders::default());

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    tracing::info!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
