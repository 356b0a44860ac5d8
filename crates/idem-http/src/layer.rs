//! The tower [`Layer`] and [`Service`]: the request path from the `Idempotency-Key` header to
//! the executor and back to a response.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Either, Full, Limited};
use idem::{
    Acquisition, Attempt, Config, Executor, Fingerprint, Heartbeat, Key, MAX_ID_LEN, Namespace,
    OnInProgress, Outcome, Store,
};
use tower_layer::Layer;
use tower_service::Service;

use crate::header::{IDEMPOTENT_REPLAYED, KeyHeaderError, parse_key};
use crate::metrics::{Answer, HttpMetrics};
use crate::problem::{problem, retry_after};
use crate::record::{Recorded, TombstoneReason};
use crate::rules::{Requirement, Rule, Rules};
use crate::{BoxError, ResponseBody};

/// The request body the inner service receives: the buffered body of a request the layer
/// handled (`Left`), or the original body of one it let through (`Right`).
pub type RequestBody<B> = Either<Full<Bytes>, B>;

/// The header naming why a replayed key has no response (`too-large` or `streamed`).
pub const IDEMPOTENCY_TOMBSTONE: HeaderName = HeaderName::from_static("idempotency-tombstone");

/// Response headers replayed by default: those that describe the body and the resource it
/// created (`Content-Encoding` too, without which a compressed body would be unreadable).
pub const DEFAULT_REPLAY_HEADERS: [HeaderName; 7] = [
    http::header::CONTENT_TYPE,
    http::header::CONTENT_ENCODING,
    http::header::LOCATION,
    http::header::CONTENT_LOCATION,
    http::header::ETAG,
    http::header::LAST_MODIFIED,
    http::header::LINK,
];

/// Whether a header must never be stored and replayed, whatever the allow-list says: cookies,
/// credentials, the date, rate-limit state, and hop-by-hop or framing headers.
pub fn never_replayed(name: &HeaderName) -> bool {
    use http::header;
    let n = name.as_str();
    matches!(
        *name,
        header::SET_COOKIE
            | header::DATE
            | header::AUTHORIZATION
            | header::PROXY_AUTHORIZATION
            | header::WWW_AUTHENTICATE
            | header::PROXY_AUTHENTICATE
            | header::COOKIE
            | header::CONNECTION
            | header::TRANSFER_ENCODING
            | header::TE
            | header::TRAILER
            | header::UPGRADE
            | header::CONTENT_LENGTH
            | header::RETRY_AFTER
            | header::AGE
    ) || n == "set-cookie2"
        || n == "keep-alive"
        || n == "proxy-connection"
        || n == IDEMPOTENT_REPLAYED.as_str()
        || n.starts_with("x-ratelimit")
        || n.starts_with("x-rate-limit")
        || n.starts_with("ratelimit")
}

/// A response extension a handler sets to have its response streamed through and not recorded
/// (a tombstone is recorded instead, so a retry is told, not re-executed).
#[derive(Clone, Copy, Debug, Default)]
pub struct Unrecorded;

/// The principal a request acts for: its tenant, user or API key, as the application knows it.
pub type PrincipalFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

/// What the handler of a request the layer executes finds in the request's extensions.
///
/// ```
/// # use idem_http::Idempotency;
/// # fn handler(req: http::Request<()>) {
/// if let Some(idem) = req.extensions().get::<Idempotency>() {
///     if idem.may_have_run_before() {
///         // A previous attempt with this key crashed or failed mid-way: check what it did
///         // before doing it again (or pass idem.downstream_key() to a payment API).
///     }
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Idempotency {
    key: Arc<str>,
    attempt: Attempt,
}

impl Idempotency {
    /// The client's `Idempotency-Key`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The claim this execution runs under (number, fencing token, lease-lost signal).
    pub fn attempt(&self) -> &Attempt {
        &self.attempt
    }

    /// How the claim was acquired: [`Acquisition::Takeover`] means an earlier attempt's lease
    /// ran out without a result (its process crashed or hung): it may have produced effects.
    /// [`Acquisition::Retry`] means an earlier attempt answered 5xx or panicked.
    pub fn acquisition(&self) -> Acquisition {
        self.attempt.acquisition()
    }

    /// Whether an earlier attempt with this key may have run (a takeover or a retry).
    pub fn may_have_run_before(&self) -> bool {
        matches!(
            self.acquisition(),
            Acquisition::Takeover | Acquisition::Retry
        )
    }

    /// The scoped key as one string (`namespace:METHOD route|principal|key`), unique per
    /// principal, to pass to downstream services that take an idempotency key.
    pub fn downstream_key(&self) -> String {
        self.attempt.idempotency_key()
    }
}

/// Why the layer could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// Neither [`principal`](IdempotencyLayerBuilder::principal) nor
    /// [`unscoped`](IdempotencyLayerBuilder::unscoped) was called.
    #[error(
        "the idempotency layer has no principal: keys of different users would collide, and one \
         user could read another's replayed response. Call .principal(|parts| ...) with the \
         tenant, user or API key of the request, or .unscoped() if every client is trusted"
    )]
    NoPrincipal,
    /// The namespace is invalid.
    #[error("invalid namespace: {0}")]
    Namespace(#[from] idem::KeyError),
}

#[derive(Clone)]
enum Scope {
    Unset,
    Unscoped,
    Principal(PrincipalFn),
}

/// The layer's settings, built by [`IdempotencyLayer::builder`].
#[derive(Clone)]
struct Settings {
    name: String,
    namespace: String,
    rules: Option<Rules>,
    max_key_len: usize,
    request_body_limit: usize,
    response_body_limit: usize,
    mismatch_status: StatusCode,
    tombstone_status: StatusCode,
    fingerprint_headers: Vec<HeaderName>,
    replay_headers: Vec<HeaderName>,
    release_server_errors: bool,
    wait: Option<Duration>,
    lease: Duration,
    heartbeat: Heartbeat,
    retention: Duration,
    max_attempts: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            name: "http".to_owned(),
            namespace: "http".to_owned(),
            rules: None,
            max_key_len: 255,
            request_body_limit: 1024 * 1024,
            response_body_limit: 1024 * 1024,
            mismatch_status: StatusCode::UNPROCESSABLE_ENTITY,
            tombstone_status: StatusCode::GONE,
            fingerprint_headers: Vec::new(),
            replay_headers: DEFAULT_REPLAY_HEADERS.to_vec(),
            release_server_errors: true,
            wait: None,
            lease: idem::DEFAULT_LEASE,
            heartbeat: Heartbeat::Auto,
            retention: Duration::from_secs(24 * 3600),
            max_attempts: 0,
        }
    }
}

/// Builds an [`IdempotencyLayer`]. Every setting has a default; only the principal (or an
/// explicit [`unscoped`](Self::unscoped)) is required.
pub struct IdempotencyLayerBuilder<S> {
    store: S,
    settings: Settings,
    scope: Scope,
}

impl<S: Store> IdempotencyLayerBuilder<S> {
    /// The principal of a request (tenant, user or API key): keys are scoped by it, so two
    /// users sending the same key get two executions and never each other's response.
    /// `None` (no principal could be found) answers 401 to requests that carry a key; return
    /// a constant such as `"anonymous"` for routes without authentication.
    #[must_use]
    pub fn principal<F>(mut self, f: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.scope = Scope::Principal(Arc::new(f));
        self
    }

    /// Keys are not scoped by principal: any client's key collides with any other's. Only for
    /// services whose clients all trust each other (one internal caller); logs a warning when
    /// the layer is built.
    #[must_use]
    pub fn unscoped(mut self) -> Self {
        self.scope = Scope::Unscoped;
        self
    }

    /// Adds a rule (first match wins). Without any rule: `POST,PATCH:/**=optional`.
    #[must_use]
    pub fn rule(mut self, rule: Rule) -> Self {
        self.settings
            .rules
            .get_or_insert_with(Rules::new)
            .push(rule);
        self
    }

    /// Replaces the rules.
    #[must_use]
    pub fn rules(mut self, rules: Rules) -> Self {
        self.settings.rules = Some(rules);
        self
    }

    /// The name labelling this layer's metrics and its executor's (default `http`).
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.settings.name = name.into();
        self
    }

    /// The namespace of the keys in the store (default `http`): give each service sharing a
    /// store its own.
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.settings.namespace = namespace.into();
        self
    }

    /// Longest accepted key, in characters (default 255, Stripe's limit).
    #[must_use]
    pub fn max_key_len(mut self, n: usize) -> Self {
        self.settings.max_key_len = n;
        self
    }

    /// Largest request body read for the fingerprint (default 1 MiB); larger ones get 413.
    #[must_use]
    pub fn request_body_limit(mut self, bytes: usize) -> Self {
        self.settings.request_body_limit = bytes;
        self
    }

    /// Largest response body recorded (default 1 MiB, and never more than the store's own
    /// result limit, 64 KiB on a default store, minus the stored headers). A larger response
    /// still goes to its client in full, but a tombstone is stored: retries get
    /// [`tombstone_status`](Self::tombstone_status), not a second execution.
    #[must_use]
    pub fn response_body_limit(mut self, bytes: usize) -> Self {
        self.settings.response_body_limit = bytes;
        self
    }

    /// Status for a key reused with another request (default 422, as the draft says; Stripe
    /// answers 400).
    #[must_use]
    pub fn mismatch_status(mut self, status: StatusCode) -> Self {
        self.settings.mismatch_status = status;
        self
    }

    /// Status for a retry of a key whose response was not kept (a tombstone) or whose attempts
    /// are exhausted (default 410 Gone: the request ran, its response is gone).
    #[must_use]
    pub fn tombstone_status(mut self, status: StatusCode) -> Self {
        self.settings.tombstone_status = status;
        self
    }

    /// Request headers that are part of the fingerprint besides method, path, query and body
    /// (default none). Add `content-type` when one body can mean two things.
    #[must_use]
    pub fn fingerprint_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.settings.fingerprint_headers = names.into_iter().collect();
        self
    }

    /// Response headers stored and replayed (default [`DEFAULT_REPLAY_HEADERS`]). Headers for
    /// which [`never_replayed`] holds are dropped even when listed.
    #[must_use]
    pub fn replay_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.settings.replay_headers = names.into_iter().collect();
        self
    }

    /// Whether a 5xx answer releases the key so a retry runs the handler again (default
    /// `true`), or is recorded and replayed like any other answer (`false`, Stripe's rule).
    /// See docs/http.md for the trade-off.
    #[must_use]
    pub fn release_server_errors(mut self, release: bool) -> Self {
        self.settings.release_server_errors = release;
        self
    }

    /// Instead of answering 409 at once, a request whose key is in flight waits up to
    /// `timeout` for the first one's result and replays it (default: no wait).
    #[must_use]
    pub fn wait_for_result(mut self, timeout: Duration) -> Self {
        self.settings.wait = Some(timeout);
        self
    }

    /// The lease of each execution (default 30 s), extended by a heartbeat while the handler
    /// runs: a crashed server's key is taken over by a retry at most this long after the crash.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.settings.lease = lease;
        self
    }

    /// How often the lease is extended (default: every third of the lease).
    #[must_use]
    pub fn heartbeat(mut self, heartbeat: Heartbeat) -> Self {
        self.settings.heartbeat = heartbeat;
        self
    }

    /// How long a completed key is remembered (default 24 hours): a key reused after that
    /// runs again.
    #[must_use]
    pub fn retention(mut self, retention: Duration) -> Self {
        self.settings.retention = retention;
        self
    }

    /// After this many released attempts (5xx, panics) the key fails for good and retries get
    /// the tombstone status (default 0: no limit).
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.settings.max_attempts = n;
        self
    }

    /// The layer.
    ///
    /// # Errors
    /// [`BuildError::NoPrincipal`] when neither [`principal`](Self::principal) nor
    /// [`unscoped`](Self::unscoped) was called; [`BuildError::Namespace`] for an invalid
    /// namespace.
    pub fn build(self) -> Result<IdempotencyLayer<S>, BuildError> {
        let principal = match self.scope {
            Scope::Unset => return Err(BuildError::NoPrincipal),
            Scope::Unscoped => {
                tracing::warn!(
                    layer = %self.settings.name,
                    "idempotency keys are NOT scoped by principal (.unscoped()): two clients \
                     sending the same key share one execution and one replayed response"
                );
                None
            }
            Scope::Principal(f) => Some(f),
        };
        let namespace = Namespace::new(&self.settings.namespace)?;
        let config = Config::default()
            .name(self.settings.name.clone())
            .lease(self.settings.lease)
            .heartbeat(self.settings.heartbeat)
            .retention(self.settings.retention)
            .max_attempts(self.settings.max_attempts)
            .on_in_progress(match self.settings.wait {
                Some(t) => OnInProgress::WaitForResult(t),
                None => OnInProgress::RetryLater,
            });
        let mut settings = self.settings;
        let rules = settings.rules.take().unwrap_or_else(Rules::default_rules);
        settings.replay_headers.retain(|h| !never_replayed(h));
        Ok(IdempotencyLayer {
            shared: Arc::new(Shared {
                metrics: HttpMetrics::new(&settings.name),
                exec: Executor::with_config(self.store, config),
                rules,
                settings,
                principal,
                namespace,
            }),
        })
    }
}

struct Shared<S> {
    exec: Executor<S>,
    settings: Settings,
    rules: Rules,
    principal: Option<PrincipalFn>,
    namespace: Namespace,
    metrics: HttpMetrics,
}

/// The `Idempotency-Key` layer: wrap a tower service (an axum `Router`, a hyper service) with
/// it. Clones share the store and settings.
///
/// ```
/// # fn demo() -> Result<(), idem_http::BuildError> {
/// use idem_http::{IdempotencyLayer, Rule};
/// let layer = IdempotencyLayer::builder(idem::MemoryStore::new())
///     .principal(|parts| {
///         let key = parts.headers.get("x-api-key")?;
///         Some(key.to_str().ok()?.to_owned())
///     })
///     .rule("POST:/orders=required".parse().expect("rule"))
///     .build()?;
/// # let _ = layer; Ok(()) }
/// ```
pub struct IdempotencyLayer<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for IdempotencyLayer<S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S> fmt::Debug for IdempotencyLayer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("name", &self.shared.settings.name)
            .field("rules", &self.shared.rules)
            .finish_non_exhaustive()
    }
}

impl<S: Store> IdempotencyLayer<S> {
    /// A builder over `store` (any idem store, or an [`idem::AnyStore`] chosen from a URL).
    pub fn builder(store: S) -> IdempotencyLayerBuilder<S> {
        IdempotencyLayerBuilder {
            store,
            settings: Settings::default(),
            scope: Scope::Unset,
        }
    }

    /// The executor underneath (its store, its settings).
    pub fn executor(&self) -> &Executor<S> {
        &self.shared.exec
    }
}

impl<S, I> Layer<I> for IdempotencyLayer<S> {
    type Service = IdempotencyService<S, I>;

    fn layer(&self, inner: I) -> Self::Service {
        IdempotencyService {
            shared: Arc::clone(&self.shared),
            inner,
        }
    }
}

/// The service [`IdempotencyLayer`] wraps around `I`.
pub struct IdempotencyService<S, I> {
    shared: Arc<Shared<S>>,
    inner: I,
}

impl<S, I: Clone> Clone for IdempotencyService<S, I> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            inner: self.inner.clone(),
        }
    }
}

impl<S, I> fmt::Debug for IdempotencyService<S, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("name", &self.shared.settings.name)
            .finish_non_exhaustive()
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, I, B, RB> Service<Request<B>> for IdempotencyService<S, I>
where
    S: Store,
    I: Service<Request<RequestBody<B>>, Response = Response<RB>> + Clone + Send + 'static,
    I::Future: Send + 'static,
    I::Error: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = I::Error;
    type Future = BoxFuture<Result<Response<ResponseBody>, I::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = Arc::clone(&self.shared);
        Box::pin(process(shared, inner, req))
    }
}

/// Boxes any response body as the layer's.
pub(crate) fn boxed<RB>(body: RB) -> ResponseBody
where
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

fn full(bytes: Bytes) -> ResponseBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Why an execution's claim is released instead of completed.
enum Failure<E> {
    /// The handler answered 5xx (with `release_server_errors`).
    ServerError(Response<ResponseBody>),
    /// The handler panicked; the panic resumes once the claim is released.
    Panic(Box<dyn Any + Send>),
    /// The inner service returned an error (it has no response).
    Service(E),
    /// The response body failed while it was being read.
    Body(StatusCode, BoxError),
}

impl<E> fmt::Display for Failure<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::ServerError(r) => write!(f, "the handler answered {}", r.status()),
            Failure::Panic(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| p.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("(no message)");
                write!(f, "the handler panicked: {msg}")
            }
            Failure::Service(_) => f.write_str("the inner service returned an error"),
            Failure::Body(status, e) => {
                write!(
                    f,
                    "the {status} response's body failed while being read: {e}"
                )
            }
        }
    }
}

/// The scoped key: `METHOD route|principal|client-key`, the prefix hashed when it would not
/// fit or could be ambiguous.
fn scoped_key(
    ns: &Namespace,
    method: &Method,
    route: &str,
    principal: &str,
    client_key: &str,
) -> Result<Key, idem::KeyError> {
    let plain = |s: &str| s.len() <= 128 && !s.contains('|') && !s.starts_with("h:");
    let principal = if plain(principal) && !principal.chars().any(char::is_control) {
        principal.to_owned()
    } else {
        format!(
            "h:{:032x}",
            xxhash_rust::xxh3::xxh3_128(principal.as_bytes())
        )
    };
    let mut id = format!("{method} {route}|{principal}|{client_key}");
    if id.len() > MAX_ID_LEN || route.contains('|') {
        let prefix = format!("{method} {route}|{principal}");
        id = format!(
            "h:{:032x}|{client_key}",
            xxhash_rust::xxh3::xxh3_128(prefix.as_bytes())
        );
    }
    ns.key(id)
}

/// The fingerprint: method, path and query, the chosen headers, the body.
fn fingerprint(parts: &Parts, headers: &[HeaderName], body: &[u8]) -> Fingerprint {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(parts.method.as_str().as_bytes());
    h.update(b"\0");
    h.update(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    for name in headers {
        h.update(b"\0");
        h.update(name.as_str().as_bytes());
        for v in parts.headers.get_all(name) {
            h.update(b"\x01");
            h.update(v.as_bytes());
        }
    }
    h.update(b"\0");
    h.update(&(body.len() as u64).to_be_bytes());
    h.update(body);
    Fingerprint::from_u128(h.digest128())
}

async fn process<S, I, B, RB>(
    shared: Arc<Shared<S>>,
    mut inner: I,
    req: Request<B>,
) -> Result<Response<ResponseBody>, I::Error>
where
    S: Store,
    I: Service<Request<RequestBody<B>>, Response = Response<RB>> + Send + 'static,
    I::Future: Send + 'static,
    I::Error: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let m = &shared.metrics;
    let settings = &shared.settings;
    let rule = shared
        .rules
        .find(req.method(), req.uri().path())
        .filter(|r| r.requirement() != Requirement::Off)
        .map(|r| (r.requirement(), r.pattern().as_str().to_owned()));
    let passthrough = |mut inner: I, req: Request<B>| async move {
        let resp = inner.call(req.map(Either::Right)).await?;
        Ok(resp.map(boxed))
    };
    let Some((requirement, route)) = rule else {
        m.answer(Answer::Passthrough);
        return passthrough(inner, req).await;
    };
    let client_key = match parse_key(req.headers(), settings.max_key_len) {
        Ok(Some(k)) => k,
        Ok(None) if requirement == Requirement::Optional => {
            m.answer(Answer::Passthrough);
            return passthrough(inner, req).await;
        }
        Ok(None) => {
            m.answer(Answer::MissingKey);
            let e = KeyHeaderError::Missing;
            return Ok(problem(
                StatusCode::BAD_REQUEST,
                "idempotency_key_missing",
                &e.to_string(),
                &[],
            ));
        }
        Err(e) => {
            m.answer(Answer::InvalidKey);
            return Ok(problem(
                StatusCode::BAD_REQUEST,
                "idempotency_key_invalid",
                &e.to_string(),
                &[],
            ));
        }
    };
    let (parts, body) = req.into_parts();
    let principal = match &shared.principal {
        None => String::new(),
        Some(f) => match f(&parts) {
            Some(p) => p,
            None => {
                m.answer(Answer::NoPrincipal);
                return Ok(problem(
                    StatusCode::UNAUTHORIZED,
                    "idempotency_principal_missing",
                    "an idempotency key is only honoured for an identified client, and this \
                     request has none",
                    &[],
                ));
            }
        },
    };
    let limit = settings.request_body_limit;
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let too_large = || {
        problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "idempotency_request_too_large",
            &format!("a request with an idempotency key may have a body of at most {limit} bytes"),
            &[],
        )
    };
    if declared.is_some_and(|n| n > limit as u64) {
        m.answer(Answer::BodyTooLarge);
        return Ok(too_large());
    }
    let body = match Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            m.answer(Answer::BodyTooLarge);
            return Ok(too_large());
        }
        Err(e) => {
            m.answer(Answer::InvalidKey);
            return Ok(problem(
                StatusCode::BAD_REQUEST,
                "request_body_unreadable",
                &format!("the request body could not be read: {e}"),
                &[],
            ));
        }
    };
    let fp = fingerprint(&parts, &settings.fingerprint_headers, &body);
    let key = match scoped_key(
        &shared.namespace,
        &parts.method,
        &route,
        &principal,
        &client_key,
    ) {
        Ok(k) => k,
        Err(e) => {
            m.answer(Answer::InvalidKey);
            return Ok(problem(
                StatusCode::BAD_REQUEST,
                "idempotency_key_invalid",
                &format!("the idempotency key cannot be used: {e}"),
                &[],
            ));
        }
    };

    // The live response of this execution, kept aside: the executor stores only its recorded
    // form, and it must reach the client even when the store refuses the completion.
    let live: Mutex<Option<Response<ResponseBody>>> = Mutex::new(None);
    let client_key: Arc<str> = client_key.into();
    let outcome = {
        let live = &live;
        let shared = &shared;
        shared
            .exec
            .run_with_fingerprint(key, fp, move |attempt: Attempt| async move {
                if attempt.acquisition() == Acquisition::Takeover {
                    shared.metrics.takeovers.increment(1);
                    tracing::warn!(
                        key = %attempt.key(),
                        attempt = attempt.number(),
                        "taking over an idempotency key whose previous attempt did not finish"
                    );
                }
                let mut req = Request::from_parts(parts, Either::Left(Full::new(body)));
                req.extensions_mut().insert(Idempotency {
                    key: client_key,
                    attempt,
                });
                let resp = match AssertUnwindSafe(inner.call(req)).catch_unwind().await {
                    Err(panic) => return Err(Failure::Panic(panic)),
                    Ok(Err(e)) => return Err(Failure::Service(e)),
                    Ok(Ok(resp)) => resp,
                };
                capture(shared, resp, live).await
            })
            .await
    };
    let take_live = || live.lock().unwrap_or_else(|e| e.into_inner()).take();
    Ok(match outcome {
        Ok(Outcome::Executed(recorded)) => {
            m.answer(Answer::Executed);
            match &recorded {
                Recorded::Tombstone { .. } => m.tombstones.increment(1),
                Recorded::Response { headers, .. } => m
                    .stored_bytes
                    .increment((Recorded::head_len(headers) + recorded.body_len()) as u64),
            }
            take_live().unwrap_or_else(|| replay(settings, recorded))
        }
        Ok(Outcome::Replayed(recorded)) => {
            m.replays.increment(1);
            m.answer(if matches!(recorded, Recorded::Tombstone { .. }) {
                Answer::Tombstone
            } else {
                Answer::Replayed
            });
            replay(settings, recorded)
        }
        Ok(Outcome::InProgress { retry_after: after }) => {
            m.conflicts.increment(1);
            m.answer(Answer::InProgress);
            retry_after(
                problem(
                    StatusCode::CONFLICT,
                    "idempotency_key_in_use",
                    "a request with this idempotency key is still being processed; retry later",
                    &[],
                ),
                after,
            )
        }
        Ok(Outcome::Mismatch { .. }) => {
            m.mismatches.increment(1);
            m.answer(Answer::Mismatch);
            problem(
                settings.mismatch_status,
                "idempotency_key_mismatch",
                "this idempotency key was already used with a different request (method, path, \
                 query, body or fingerprinted headers differ); use a new key for a new request",
                &[],
            )
        }
        Ok(
            Outcome::Released { error, .. }
            | Outcome::Exhausted {
                error: Some(error), ..
            },
        ) => {
            m.answer(Answer::Released);
            match error {
                Failure::ServerError(resp) => resp,
                Failure::Panic(p) => std::panic::resume_unwind(p),
                Failure::Service(e) => return Err(e),
                Failure::Body(status, e) => problem(
                    StatusCode::BAD_GATEWAY,
                    "response_body_failed",
                    &format!("the handler's {status} response body failed: {e}"),
                    &[],
                ),
            }
        }
        Ok(Outcome::Exhausted {
            error: None,
            reason,
            attempts,
        }) => match take_live() {
            // This execution's result was over the store's limit: the key is failed (the
            // policy's rule), and this client still gets the response.
            Some(resp) => {
                m.answer(Answer::Executed);
                m.tombstones.increment(1);
                resp
            }
            None => {
                m.answer(Answer::Tombstone);
                problem(
                    settings.tombstone_status,
                    "idempotency_key_exhausted",
                    &format!(
                        "this idempotency key was used and its response cannot be replayed: \
                         {reason}"
                    ),
                    &[("attempts", attempts.into())],
                )
            }
        },
        Ok(Outcome::LeaseLost { attempt }) => {
            m.answer(Answer::LeaseLost);
            tracing::warn!(
                attempt,
                "the idempotency lease was lost while the handler ran (it outlived its lease \
                 and another request took over): its response is not recorded"
            );
            take_live().unwrap_or_else(|| {
                problem(
                    StatusCode::CONFLICT,
                    "idempotency_lease_lost",
                    "another request took this idempotency key over; retry to get its result",
                    &[],
                )
            })
        }
        Ok(_) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "idempotency_internal",
            "unexpected idempotency outcome",
            &[],
        ),
        Err(idem::Error::Codec(e)) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "idempotency_record_unreadable",
            &format!("the stored response for this key cannot be read: {e}"),
            &[],
        ),
        Err(e) => {
            m.answer(Answer::StoreError);
            if let Some(resp) = take_live() {
                tracing::error!(
                    error = %e,
                    "the handler ran but its response could not be recorded: a retry after the \
                     lease may run it again"
                );
                resp
            } else {
                retry_after(
                    problem(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "idempotency_store_unavailable",
                        &format!("the idempotency store cannot answer: {e}"),
                        &[],
                    ),
                    Duration::from_secs(1),
                )
            }
        }
    })
}

/// Whether a response must be streamed through rather than buffered.
fn is_streamed<RB>(resp: &Response<RB>) -> bool {
    if resp.extensions().get::<Unrecorded>().is_some() {
        return true;
    }
    resp.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            let ct = ct.trim_start().to_ascii_lowercase();
            ct.starts_with("text/event-stream") || ct.starts_with("application/grpc")
        })
}

/// Reads the handler's response into its recorded form, within the limits; keeps the live
/// response for this request's client in `live`.
async fn capture<S, E, RB>(
    shared: &Shared<S>,
    resp: Response<RB>,
    live: &Mutex<Option<Response<ResponseBody>>>,
) -> Result<Recorded, Failure<E>>
where
    S: Store,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let settings = &shared.settings;
    let status = resp.status();
    let keep = |r: Response<ResponseBody>| {
        *live.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    };
    if status.is_server_error() && settings.release_server_errors {
        return Err(Failure::ServerError(resp.map(boxed)));
    }
    if is_streamed(&resp) {
        keep(resp.map(boxed));
        return Ok(Recorded::Tombstone {
            reason: TombstoneReason::Streamed,
            status,
        });
    }
    let headers: Vec<(HeaderName, HeaderValue)> = settings
        .replay_headers
        .iter()
        .flat_map(|name| {
            resp.headers()
                .get_all(name)
                .iter()
                .map(move |v| (name.clone(), v.clone()))
        })
        .collect();
    let cap = settings.response_body_limit.min(
        shared
            .exec
            .store()
            .max_result_bytes()
            .saturating_sub(Recorded::head_len(&headers)),
    );
    let (parts, body) = resp.into_parts();
    let mut body = boxed(body);
    let tombstone = Recorded::Tombstone {
        reason: TombstoneReason::TooLarge,
        status,
    };
    let declared = body.size_hint().lower();
    if declared > cap as u64 {
        keep(Response::from_parts(parts, body));
        return Ok(tombstone);
    }
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => return Err(Failure::Body(status, e)),
        };
        let Ok(data) = frame.into_data() else {
            // Trailers are not recorded.
            continue;
        };
        len += data.len();
        chunks.push(data);
        if len > cap {
            // Over the limit: the client gets what was read, then the rest as it comes.
            let read = futures_util::stream::iter(
                chunks
                    .into_iter()
                    .map(|c| Ok::<_, BoxError>(Frame::data(c))),
            );
            let rest = futures_util::stream::unfold(body, |mut b| async move {
                b.frame().await.map(|f| (f, b))
            });
            let stream = read.chain(rest);
            keep(Response::from_parts(
                parts,
                http_body_util::StreamBody::new(stream).boxed_unsync(),
            ));
            return Ok(tombstone);
        }
    }
    let body = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut all = Vec::with_capacity(len);
            for c in &chunks {
                all.extend_from_slice(c);
            }
            Bytes::from(all)
        }
    };
    keep(Response::from_parts(parts, full(body.clone())));
    Ok(Recorded::Response {
        status,
        headers,
        body,
    })
}

/// A recorded result as the response to a retry.
fn replay(settings: &Settings, recorded: Recorded) -> Response<ResponseBody> {
    let mut resp = match recorded {
        Recorded::Response {
            status,
            headers,
            body,
        } => {
            let mut resp = Response::new(full(body));
            *resp.status_mut() = status;
            for (name, value) in headers {
                resp.headers_mut().append(name, value);
            }
            resp
        }
        Recorded::Tombstone { reason, status } => {
            let detail = match reason {
                TombstoneReason::TooLarge => {
                    "this idempotency key's request was executed, but its response was too large \
                     to record; it is not executed again"
                }
                TombstoneReason::Streamed => {
                    "this idempotency key's request was executed and its response streamed \
                     without being recorded; it is not executed again"
                }
            };
            let mut resp = problem(
                settings.tombstone_status,
                "idempotency_response_not_stored",
                detail,
                &[("original_status", status.as_u16().into())],
            );
            resp.headers_mut().insert(
                IDEMPOTENCY_TOMBSTONE,
                HeaderValue::from_static(reason.as_str()),
            );
            resp
        }
    };
    resp.headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_scoped_and_fit() {
        let ns = Namespace::new("http").unwrap();
        let k = scoped_key(&ns, &Method::POST, "/orders", "alice", "k1").unwrap();
        assert_eq!(k.to_string(), "http:POST /orders|alice|k1");
        let k2 = scoped_key(&ns, &Method::POST, "/orders", "bob", "k1").unwrap();
        assert_ne!(k, k2);
        let k3 = scoped_key(&ns, &Method::POST, "/orders", "a|b", "k1").unwrap();
        assert!(k3.id().starts_with("POST /orders|h:"), "{k3}");
        let long = "x".repeat(400);
        let k4 = scoped_key(&ns, &Method::POST, &format!("/{long}"), "p", &long).unwrap();
        assert!(k4.id().len() <= MAX_ID_LEN);
        assert!(k4.id().starts_with("h:"));
    }

    #[test]
    fn header_policy() {
        assert!(never_replayed(&http::header::SET_COOKIE));
        assert!(never_replayed(&HeaderName::from_static(
            "x-ratelimit-remaining"
        )));
        assert!(never_replayed(&HeaderName::from_static("ratelimit-policy")));
        assert!(!never_replayed(&http::header::LOCATION));
    }
}
