//! # idem-http: the HTTP `Idempotency-Key` layer over idem
//!
//! A tower [`Layer`](tower_layer::Layer) that makes POST (and any other) handlers of an axum or
//! hyper service run once per `Idempotency-Key`, over any idem [`Store`](idem::Store): SQLite,
//! Redis, PostgreSQL, MySQL, memory, or an [`AnyStore`](idem::AnyStore) chosen from a URL.
//!
//! - The key is the `Idempotency-Key` header of `draft-ietf-httpapi-idempotency-key-header`
//!   (a structured-field string, the bare form accepted too), at most 255 characters by default,
//!   required or optional per route ([`Rule`]).
//! - Keys are scoped by the application's principal (tenant, user or API key), the method and
//!   the route; a layer without a principal does not build unless `.unscoped()` says so.
//! - The request fingerprint (method, path, query, body, chosen headers) is checked before the
//!   in-flight test: a key reused for another request gets 422.
//! - The handler runs under a claim with a lease, extended by a heartbeat while it runs; its
//!   completion is fenced; a retry after a crash takes the key over once the lease ends, and
//!   the handler sees it in the [`Idempotency`] request extension.
//! - A retry while the first request runs gets 409 with `Retry-After`, or waits a bounded time
//!   and replays; a completed key replays its status, body and allowed headers (never
//!   `Set-Cookie`, `Date`, credentials or rate-limit headers) with `Idempotent-Replayed: true`.
//! - Errors are `application/problem+json`.
//!
//! The claim, outcome and lease rules are idem's own [`Executor`](idem::Executor) and
//! [`policy`](idem::policy): this crate adds HTTP, not a second state machine. docs/http.md
//! explains every choice (5xx and panics release the key; large and streamed responses leave a
//! tombstone).
//!
//! ```
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use idem_http::IdempotencyLayer;
//! let layer = IdempotencyLayer::builder(idem::MemoryStore::new())
//!     .principal(|parts| Some(parts.headers.get("x-api-key")?.to_str().ok()?.to_owned()))
//!     .rule("POST:/orders=required".parse()?)
//!     .build()?;
//! // axum: Router::new().route("/orders", post(create)).layer(layer)
//! # let _ = layer; Ok(()) }
//! ```

mod header;
mod layer;
pub mod metrics;
mod problem;
mod record;
mod rules;

#[cfg(feature = "proxy")]
pub mod proxy;

pub use crate::header::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, KeyHeaderError, parse_key};
pub use crate::layer::{
    BuildError, DEFAULT_REPLAY_HEADERS, IDEMPOTENCY_TOMBSTONE, Idempotency, IdempotencyLayer,
    IdempotencyLayerBuilder, IdempotencyService, PrincipalFn, RequestBody, Unrecorded,
    never_replayed,
};
pub use crate::problem::PROBLEM_JSON;
pub use crate::record::TombstoneReason;
pub use crate::rules::{PathPattern, Requirement, Rule, RuleError, Rules};

/// A boxed error, as bodies and services exchange them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the layer returns: the handler's own (boxed), a replay, or a
/// problem document.
pub type ResponseBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;
